"""Camera frame -> encoder input: crop, resize and normalize with OpenCV.

The same function prepares training frames and live frames, so the encoder sees identical
inputs in both. Frames are RGB uint8 [height, width, 3]; the result is float32 [3, H, W]
(channel-first), ``(pixel / 255 - mean) / std`` per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessError(ValueError):
    """A frame cannot be turned into encoder input (dtype, shape, channels)."""


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    """How a frame becomes encoder input."""

    height: int = 84  # encoder input height (pixels)
    width: int = 84  # encoder input width (pixels)
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # y0, x0, y1, x1 (fractions)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel mean of pixel/255
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)  # per-channel std of pixel/255

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        y0, x0, y1, x1 = self.crop
        if not (0.0 <= y0 < y1 <= 1.0 and 0.0 <= x0 < x1 <= 1.0):
            raise ValueError(
                f"crop must satisfy 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1: {self.crop}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per channel (3)")
        if min(self.std) <= 0.0:
            raise ValueError(f"std must be positive, got {self.std}")


class Preprocessor:
    """Crop -> resize -> normalize -> CHW, into preallocated buffers (no per-frame allocation
    beyond OpenCV's resize output)."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self._scale = (1.0 / (255.0 * np.asarray(config.std, dtype=np.float32))).reshape(1, 1, 3)
        self._offset = (
            np.asarray(config.mean, dtype=np.float32) / np.asarray(config.std, dtype=np.float32)
        ).reshape(1, 1, 3)
        self._hwc = np.empty((config.height, config.width, 3), dtype=np.float32)

    def check_frame(self, frame: np.ndarray) -> None:
        """Raise :class:`PreprocessError` unless ``frame`` is RGB uint8 [h, w, 3]."""
        if not isinstance(frame, np.ndarray):
            raise PreprocessError(f"frame must be a numpy array, got {type(frame).__name__}")
        if frame.dtype != np.uint8:
            raise PreprocessError(f"frame must be uint8, got {frame.dtype}")
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise PreprocessError(f"frame must be [height, width, 3] RGB, got shape {frame.shape}")
        if frame.shape[0] < 2 or frame.shape[1] < 2:
            raise PreprocessError(f"frame too small: {frame.shape[1]}x{frame.shape[0]}")

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Pixel box (y0, x0, y1, x1) of the crop for a frame of the given size."""
        y0, x0, y1, x1 = self.config.crop
        top, left = round(y0 * height), round(x0 * width)
        bottom, right = max(top + 1, round(y1 * height)), max(left + 1, round(x1 * width))
        return top, left, bottom, right

    def __call__(self, frame: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """``frame`` (RGB uint8 [h, w, 3]) as float32 [3, H, W]; written into ``out`` if given."""
        self.check_frame(frame)
        cfg = self.config
        top, left, bottom, right = self.crop_box(frame.shape[0], frame.shape[1])
        region = frame[top:bottom, left:right]
        if region.shape[0] != cfg.height or region.shape[1] != cfg.width:
            shrinking = region.shape[0] > cfg.height or region.shape[1] > cfg.width
            region = cv2.resize(
                np.ascontiguousarray(region),
                (cfg.width, cfg.height),
                interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
            )
        hwc = self._hwc
        np.multiply(region, self._scale, out=hwc, casting="unsafe")
        np.subtract(hwc, self._offset, out=hwc)
        if out is None:
            out = np.empty((3, cfg.height, cfg.width), dtype=np.float32)
        elif out.shape != (3, cfg.height, cfg.width) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 [3, {cfg.height}, {cfg.width}]")
        out[:] = hwc.transpose(2, 0, 1)
        return out

    def batch(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Frames as one float32 [B, 3, H, W] batch."""
        cfg = self.config
        result = np.empty((len(frames), 3, cfg.height, cfg.width), dtype=np.float32)
        for i, frame in enumerate(frames):
            self(frame, out=result[i])
        return result


def channel_stats(frames: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of pixel/255 over uint8 frames [N, h, w, 3] (for training)."""
    values = frames.reshape(-1, 3).astype(np.float64) / 255.0
    mean = values.mean(axis=0)
    std = np.maximum(values.std(axis=0), 1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def image_to_rgb(*, height: int, width: int, encoding: str, step: int, data: Any) -> np.ndarray:
    """An RGB uint8 [height, width, 3] view/copy of ``sensor_msgs/Image`` fields.

    Accepts ``rgb8`` and ``bgr8`` (row padding allowed); anything else raises
    :class:`PreprocessError` with the reason.
    """
    if encoding not in ("rgb8", "bgr8"):
        raise PreprocessError(f"unsupported encoding {encoding!r} (need rgb8 or bgr8)")
    if height < 2 or width < 2:
        raise PreprocessError(f"image too small: {width}x{height}")
    if step < width * 3:
        raise PreprocessError(f"row step {step} < width*3 = {width * 3}")
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size != step * height:
        raise PreprocessError(
            f"image data has {buffer.size} bytes, expected step*height = {step * height}"
        )
    rows = buffer.reshape(height, step)[:, : width * 3]
    frame: np.ndarray = rows.reshape(height, width, 3)
    if encoding == "bgr8":
        return np.asarray(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_BGR2RGB))
    return frame
