"""OpenCV preprocessing: shapes, normalization, crop, validation, Image-field decoding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vlarl.perception.preprocess import (
    PreprocessConfig,
    PreprocessError,
    Preprocessor,
    channel_stats,
    image_to_rgb,
)


def test_constant_frame_normalizes_per_channel():
    config = PreprocessConfig(height=84, width=84, mean=(0.1, 0.5, 0.9), std=(0.5, 0.25, 0.1))
    frame = np.empty((84, 84, 3), dtype=np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 0, 128, 255
    out = Preprocessor(config)(frame)
    assert out.shape == (3, 84, 84) and out.dtype == np.float32
    expected = [(0 / 255 - 0.1) / 0.5, (128 / 255 - 0.5) / 0.25, (255 / 255 - 0.9) / 0.1]
    for c in range(3):
        assert np.allclose(out[c], expected[c], atol=1e-5)


def test_resize_and_crop_to_the_encoder_input():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    pre = Preprocessor(PreprocessConfig(height=32, width=48))
    assert pre(frame).shape == (3, 32, 48)
    # Crop the left half exactly: a frame whose left half is white and right half black.
    frame[:, :80] = 255
    frame[:, 80:] = 0
    crop = Preprocessor(
        PreprocessConfig(
            height=60, width=40, crop=(0.0, 0.0, 1.0, 0.5), mean=(0, 0, 0), std=(1, 1, 1)
        )
    )
    assert crop.crop_box(120, 160) == (0, 0, 120, 80)
    assert np.allclose(crop(frame), 1.0)
    # Channel order is kept (RGB in, RGB planes out).
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    planes = Preprocessor(PreprocessConfig(height=10, width=10, mean=(0, 0, 0), std=(1, 1, 1)))(rgb)
    assert planes[0].min() == 1.0 and planes[1].max() == 0.0 and planes[2].max() == 0.0


def test_batch_and_preallocated_output():
    pre = Preprocessor(PreprocessConfig(height=16, width=16))
    frames = [np.full((20, 20, 3), v, dtype=np.uint8) for v in (0, 100, 200)]
    batch = pre.batch(frames)
    assert batch.shape == (3, 3, 16, 16)
    out = np.empty((3, 16, 16), dtype=np.float32)
    assert pre(frames[1], out=out) is out and np.allclose(out, batch[1])
    with pytest.raises(ValueError, match="out must be"):
        pre(frames[1], out=np.empty((3, 8, 8), dtype=np.float32))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((84, 84, 3), dtype=np.float32), "uint8"),
        (np.zeros((84, 84), dtype=np.uint8), r"\[height, width, 3\]"),
        (np.zeros((84, 84, 4), dtype=np.uint8), r"\[height, width, 3\]"),
        (np.zeros((1, 84, 3), dtype=np.uint8), "too small"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_frames_are_refused(frame, message):
    with pytest.raises(PreprocessError, match=message):
        Preprocessor(PreprocessConfig())(frame)


def test_config_is_validated():
    with pytest.raises(ValueError, match="crop"):
        PreprocessConfig(crop=(0.5, 0.0, 0.4, 1.0))
    with pytest.raises(ValueError, match="std"):
        PreprocessConfig(std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        PreprocessConfig(height=0)


def test_channel_stats():
    frames = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    frames[0, ..., 0] = 255
    mean, std = channel_stats(frames)
    assert mean[0] == pytest.approx(0.5) and mean[1] == 0.0
    assert std[0] == pytest.approx(0.5) and std[1] == pytest.approx(1e-3)


def test_image_fields_rgb8_bgr8_and_row_padding():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(
        image_to_rgb(height=4, width=5, encoding="rgb8", step=15, data=rgb.tobytes()), rgb
    )
    padded = np.zeros((4, 16), dtype=np.uint8)
    padded[:, :15] = rgb.reshape(4, 15)
    assert np.array_equal(
        image_to_rgb(height=4, width=5, encoding="rgb8", step=16, data=padded.tobytes()), rgb
    )
    bgr = rgb[..., ::-1].copy()
    assert np.array_equal(
        image_to_rgb(height=4, width=5, encoding="bgr8", step=15, data=bgr.tobytes()), rgb
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"encoding": "mono8"}, "unsupported encoding"),
        ({"step": 10}, "row step"),
        ({"height": 5}, "expected step"),
        ({"height": 1}, "too small"),
    ],
)
def test_bad_image_fields_are_refused(fields, message):
    args: dict[str, Any] = {
        "height": 4,
        "width": 5,
        "encoding": "rgb8",
        "step": 15,
        "data": bytes(60),
    }
    args.update(fields)
    with pytest.raises(PreprocessError, match=message):
        image_to_rgb(**args)
