"""The image encoder: an ONNX model that turns a camera frame into a feature vector.

Encoder contract (separate from the policy's model contract in :mod:`vlarl.contract`):

Input (float32):  ``image``     [batch, 3, H, W]  preprocessed frame (see
                                 :mod:`vlarl.perception.preprocess`: crop, resize, normalize)
Output (float32): ``features``  [batch, F]        one value per feature name, in physical units

Metadata (ONNX ``metadata_props``, strings, keys prefixed ``vlarl.encoder.``):
  contract        "1"
  model_id        short name without spaces, e.g. "metaworld-pose-cnn"
  version         integer >= 0
  feature_names   JSON list of F names (e.g. hand_x, ..., goal_z)
  input_height, input_width    H, W
  crop            JSON [y0, x0, y1, x1], fractions of the frame
  mean, std       JSON lists (3 each): normalization of pixel/255 per RGB channel
  camera          camera the encoder was trained on ("" = any)
  frame_height, frame_width    frame size it was trained on (0 = any)
  tasks           JSON list of tasks it was trained on (informational)
  held_out_mae    JSON object feature -> mean absolute error on held-out episodes (informational)
  created         ISO-8601 time of export
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.perception.preprocess import PreprocessConfig, Preprocessor

ENCODER_CONTRACT = "1"
PREFIX = "vlarl.encoder."
INPUT_IMAGE = "image"
OUTPUT_FEATURES = "features"
_REQUIRED = ("contract", "model_id", "version", "feature_names", "input_height", "input_width")


class EncoderError(ValueError):
    """An encoder file does not meet the encoder contract, or cannot be run; says why."""


@dataclass(frozen=True, slots=True)
class EncoderMetadata:
    """Parsed ``vlarl.encoder.*`` metadata."""

    model_id: str
    version: int
    feature_names: tuple[str, ...]
    input_height: int
    input_width: int
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    camera: str = ""
    frame_height: int = 0
    frame_width: int = 0
    tasks: tuple[str, ...] = ()
    held_out_mae: dict[str, float] = field(default_factory=dict)
    created: str = ""

    @property
    def feature_dim(self) -> int:
        return len(self.feature_names)

    @property
    def tag(self) -> str:
        return f"{self.model_id}@{self.version}"

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(
            height=self.input_height,
            width=self.input_width,
            crop=self.crop,
            mean=self.mean,
            std=self.std,
        )

    def to_props(self) -> dict[str, str]:
        props = {
            "contract": ENCODER_CONTRACT,
            "model_id": self.model_id,
            "version": str(self.version),
            "feature_names": json.dumps(list(self.feature_names)),
            "input_height": str(self.input_height),
            "input_width": str(self.input_width),
            "crop": json.dumps(list(self.crop)),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "camera": self.camera,
            "frame_height": str(self.frame_height),
            "frame_width": str(self.frame_width),
            "tasks": json.dumps(list(self.tasks)),
            "held_out_mae": json.dumps(self.held_out_mae),
            "created": self.created,
        }
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> EncoderMetadata:
        """Parse metadata_props; :class:`EncoderError` with the reason if they are wrong."""
        raw = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise EncoderError(f"missing metadata keys: {', '.join(PREFIX + k for k in missing)}")
        if raw["contract"] != ENCODER_CONTRACT:
            raise EncoderError(
                f"encoder contract {raw['contract']!r} is not supported "
                f"(expected {ENCODER_CONTRACT!r})"
            )

        def as_int(key: str, minimum: int, default: int | None = None) -> int:
            if key not in raw and default is not None:
                return default
            try:
                value = int(raw[key])
            except ValueError:
                raise EncoderError(f"{PREFIX}{key} is not an integer: {raw[key]!r}") from None
            if value < minimum:
                raise EncoderError(f"{PREFIX}{key} must be >= {minimum}, got {value}")
            return value

        def as_json(key: str, default: Any) -> Any:
            if raw.get(key, "") == "":
                return default
            try:
                return json.loads(raw[key])
            except json.JSONDecodeError as exc:
                raise EncoderError(f"{PREFIX}{key} is not valid JSON: {exc}") from None

        def floats(key: str, n: int, default: tuple[float, ...]) -> tuple[float, ...]:
            value = as_json(key, list(default))
            if (
                not isinstance(value, list)
                or len(value) != n
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
            ):
                raise EncoderError(f"{PREFIX}{key} must be a JSON list of {n} finite numbers")
            return tuple(float(v) for v in value)

        model_id = raw["model_id"].strip()
        if not model_id or any(c in model_id for c in "@+| \t\n"):
            raise EncoderError(f"{PREFIX}model_id must be a non-empty word, got {model_id!r}")
        names = as_json("feature_names", None)
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise EncoderError(f"{PREFIX}feature_names must be a JSON list of distinct names")
        tasks = as_json("tasks", [])
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise EncoderError(f"{PREFIX}tasks must be a JSON list of task names")
        mae = as_json("held_out_mae", {})
        if not isinstance(mae, dict):
            raise EncoderError(f"{PREFIX}held_out_mae must be a JSON object")
        crop = floats("crop", 4, (0.0, 0.0, 1.0, 1.0))
        mean = floats("mean", 3, (0.5, 0.5, 0.5))
        std = floats("std", 3, (0.25, 0.25, 0.25))
        meta = cls(
            model_id=model_id,
            version=as_int("version", 0),
            feature_names=tuple(names),
            input_height=as_int("input_height", 1),
            input_width=as_int("input_width", 1),
            crop=(crop[0], crop[1], crop[2], crop[3]),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            camera=raw.get("camera", ""),
            frame_height=as_int("frame_height", 0, default=0),
            frame_width=as_int("frame_width", 0, default=0),
            tasks=tuple(tasks),
            held_out_mae={str(k): float(v) for k, v in mae.items()},
            created=raw.get("created", ""),
        )
        try:
            meta.preprocess_config()
        except ValueError as exc:
            raise EncoderError(f"bad preprocessing metadata: {exc}") from None
        return meta


class ImageEncoder:
    """An ONNX Runtime session over an encoder file, checked against the encoder contract."""

    def __init__(self, path: str | Path, *, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise EncoderError(f"encoder file not found: {self.path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(intra_op_threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise EncoderError(f"cannot load encoder {self.path}: {exc}") from None
        props = dict(self._session.get_modelmeta().custom_metadata_map)
        self.metadata = EncoderMetadata.from_props(props)
        self._check_signature()
        self.preprocessor = Preprocessor(self.metadata.preprocess_config())
        self._input = np.zeros(
            (1, 3, self.metadata.input_height, self.metadata.input_width), dtype=np.float32
        )
        probe = self(self._input)
        if not np.all(np.isfinite(probe)):
            raise EncoderError(f"encoder {self.path} returns non-finite features on a blank image")

    def _check_signature(self) -> None:
        meta = self.metadata
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_IMAGE:
            names = [i.name for i in inputs]
            raise EncoderError(f"encoder must have exactly one input {INPUT_IMAGE!r}, has {names}")
        image = inputs[0]
        if image.type != "tensor(float)":
            raise EncoderError(f"input {INPUT_IMAGE!r} must be float32, is {image.type}")
        expected = (3, meta.input_height, meta.input_width)
        shape = list(image.shape)
        if len(shape) != 4 or any(
            isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=True)
        ):
            raise EncoderError(
                f"input {INPUT_IMAGE!r} must be [batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}] per the metadata, is {shape}"
            )
        outputs = {o.name: o for o in self._session.get_outputs()}
        if OUTPUT_FEATURES not in outputs:
            raise EncoderError(f"encoder has no output {OUTPUT_FEATURES!r}: {list(outputs)}")
        out_shape = list(outputs[OUTPUT_FEATURES].shape)
        if len(out_shape) != 2 or (
            isinstance(out_shape[1], int) and out_shape[1] != meta.feature_dim
        ):
            raise EncoderError(
                f"output {OUTPUT_FEATURES!r} must be [batch, {meta.feature_dim}] "
                f"({len(meta.feature_names)} feature names), is {out_shape}"
            )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.metadata.feature_names

    @property
    def feature_dim(self) -> int:
        return self.metadata.feature_dim

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Features [B, F] of a preprocessed batch [B, 3, H, W] (float32)."""
        meta = self.metadata
        if (
            batch.dtype != np.float32
            or batch.ndim != 4
            or batch.shape[1:] != (3, meta.input_height, meta.input_width)
        ):
            raise EncoderError(
                f"input must be float32 [B, 3, {meta.input_height}, {meta.input_width}], got "
                f"{batch.dtype} {list(batch.shape)}"
            )
        (features,) = self._session.run([OUTPUT_FEATURES], {INPUT_IMAGE: batch})
        if features.shape != (batch.shape[0], meta.feature_dim):
            raise EncoderError(
                f"encoder returned features of shape {list(features.shape)}, expected "
                f"[{batch.shape[0]}, {meta.feature_dim}]"
            )
        return features

    def encode(self, frame: np.ndarray) -> np.ndarray:
        """Features [F] of one RGB uint8 frame (preprocessed per the metadata)."""
        self.preprocessor(frame, out=self._input[0])
        return self(self._input)[0]

    def encode_frames(self, frames: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Features [N, F] of RGB uint8 frames."""
        return self(self.preprocessor.batch(list(frames)))
