"""The residual actor's weight blob: what the learner streams to the policy node.

A blob is a safetensors file (bytes) holding the actor's MLP as tensors ``layer{i}.weight``
([in, out] float32) and ``layer{i}.bias`` ([out] float32), i = 0..n-1, and these header metadata
keys (safetensors ``__metadata__``, all strings):

================  ========================================================================
key               meaning
================  ========================================================================
format            ``vlarl.residual/1``
model_id          name part of the version tag (``[A-Za-z0-9_.-]+``), e.g. ``residual``
version           integer >= 1; tag = ``model_id@version``
parent            version this one was trained from, ``0 <= parent < version`` (0 = none)
base              tag of the base model it was trained against (``model@3``), ``""`` = any
obs_dim           observation size the actor reads
action_dim        action size it writes
uses_base_action  ``true``: input = [obs, base_action]; ``false``: input = obs
scale             output bound: ``scale * tanh(MLP(x))`` (ReLU hidden layers)
extra             JSON object of strings (free-form: gate estimate, step, created time, ...)
digest            sha256 hex, see below
================  ========================================================================

The digest is :func:`vlarl.data.replay.tensor_digest` over the layer tensors plus one more
entry, ``__metadata__``: the UTF-8 bytes of the canonical JSON (sorted keys, no spaces) of every
other metadata key. So a flipped weight byte *and* an edited header (a version bumped, a base
changed, ...) both break it. The digest detects corruption and careless edits, it is not a
signature: whoever can publish on the topic can also write a consistent blob.

:func:`decode_residual` refuses (:class:`WeightError`, with the reason) anything that is not such
a blob: truncated, not safetensors, missing or invalid metadata, wrong format, digest mismatch,
non-finite weights, layer shapes that do not chain. :func:`check_compatible` then decides whether
a valid blob may replace the running one (dims, base model, model id, strictly newer version).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from vlarl.core.residual import MLPResidual
from vlarl.data.replay import tensor_digest

FORMAT = "vlarl.residual/1"
METADATA_KEYS = (
    "format",
    "model_id",
    "version",
    "parent",
    "base",
    "obs_dim",
    "action_dim",
    "uses_base_action",
    "scale",
    "extra",
    "digest",
)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_TAG = re.compile(r"^[A-Za-z0-9_.\-]+@\d+$")
_UINT = re.compile(r"^(0|[1-9][0-9]{0,17})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TENSOR = re.compile(r"^layer(0|[1-9][0-9]*)\.(weight|bias)$")
_MAX_HEADER = 1 << 20  # a residual MLP's header is a few kB; refuse absurd ones early


class WeightError(ValueError):
    """A blob that is not a valid residual actor, or one that may not replace the running one."""


@dataclass(frozen=True, eq=False)
class ResidualWeights:
    """A decoded, verified residual actor blob (arrays are read-only)."""

    model_id: str  # name part of the tag, e.g. "residual" ([A-Za-z0-9_.-]+)
    version: int  # >= 1
    parent: int  # version it was trained from; 0 = none
    base: str  # tag of the base model it was trained against, "" = any
    obs_dim: int  # observation size the actor reads
    action_dim: int  # residual size it writes
    uses_base_action: bool  # input is [obs, base_action] (else obs alone)
    scale: float  # output bound: scale * tanh(...)
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (W [in,out] float32, b [out])
    digest: str  # sha256 hex over tensors + metadata (see the module doc)
    extra: dict[str, str] = field(default_factory=dict)  # free-form

    @property
    def tag(self) -> str:
        """Version tag ``model_id@version`` (goes into every action's frame_id)."""
        return f"{self.model_id}@{self.version}"

    @property
    def in_dim(self) -> int:
        """Input width of the first layer."""
        return self.obs_dim + (self.action_dim if self.uses_base_action else 0)

    def actor(self) -> MLPResidual:
        """A fresh actor (own scratch buffers; shares the read-only weights)."""
        return MLPResidual(
            self.layers,
            tag=self.tag,
            obs_dim=self.obs_dim,
            action_dim=self.action_dim,
            uses_base_action=self.uses_base_action,
            scale=self.scale,
        )

    def describe(self) -> str:
        """One line for logs: tag, parent, base, layer widths."""
        widths = [self.in_dim, *(int(w.shape[1]) for w, _ in self.layers)]
        return (
            f"{self.tag} (parent {self.parent}, base {self.base or 'any'}, "
            f"{'x'.join(map(str, widths))}, scale {self.scale:g})"
        )


# ---------------------------------------------------------------------------- helpers
def _canonical_digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """tensor_digest over the tensors plus the canonical JSON of the metadata (digest excluded)."""
    meta = {k: v for k, v in metadata.items() if k != "digest"}
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return tensor_digest(
        {**tensors, "__metadata__": np.frombuffer(canonical.encode("utf-8"), dtype=np.uint8)}
    )


def _check_chain(
    shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    *,
    in_dim: int,
    action_dim: int,
) -> None:
    """Raise WeightError unless the (weight, bias) shapes chain from in_dim to action_dim."""
    if not shapes:
        raise WeightError("the actor has no layers")
    width = in_dim
    for i, (w, b) in enumerate(shapes):
        if len(w) != 2 or w[0] != width or tuple(b) != (w[1],):
            raise WeightError(
                f"layer shapes do not chain: layer{i} should be weight [{width}, n] and bias [n], "
                f"got {list(w)} and {list(b)}"
            )
        if w[1] < 1:
            raise WeightError(f"layer{i} has no outputs")
        width = w[1]
    if width != action_dim:
        raise WeightError(f"the last layer has {width} outputs, expected action_dim={action_dim}")


def _positive_int(value: Any, name: str, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise WeightError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- encode
def encode_residual(
    *,
    layers: Sequence[tuple[Any, Any]],
    model_id: str,
    version: int,
    parent: int,
    base: str,
    obs_dim: int,
    action_dim: int,
    uses_base_action: bool = True,
    scale: float,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The safetensors blob for a residual MLP (raises :class:`WeightError` on bad input).

    ``layers`` are (weight [in, out], bias [out]) pairs, converted to float32; ``extra`` values
    are stored as strings (``str(value)``).
    """
    if not isinstance(model_id, str) or not _NAME.match(model_id):
        raise WeightError(f"model_id must match [A-Za-z0-9_.-]+, got {model_id!r}")
    version = _positive_int(version, "version")
    parent = _positive_int(parent, "parent", low=0)
    if parent >= version:
        raise WeightError(f"parent ({parent}) must be older than version ({version})")
    if not isinstance(base, str) or (base and not _TAG.match(base)):
        raise WeightError(f"base must be '' or a tag like 'model@3', got {base!r}")
    obs_dim = _positive_int(obs_dim, "obs_dim")
    action_dim = _positive_int(action_dim, "action_dim")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise WeightError(f"scale must be a number, got {scale!r}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise WeightError(f"scale must be a positive finite number, got {scale}")
    tensors: dict[str, np.ndarray] = {}
    for i, (w, b) in enumerate(layers):
        tensors[f"layer{i}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
        tensors[f"layer{i}.bias"] = np.ascontiguousarray(b, dtype=np.float32)
    in_dim = obs_dim + (action_dim if uses_base_action else 0)
    n = len(tensors) // 2
    _check_chain(
        [(tensors[f"layer{i}.weight"].shape, tensors[f"layer{i}.bias"].shape) for i in range(n)],
        in_dim=in_dim,
        action_dim=action_dim,
    )
    if not all(np.isfinite(t).all() for t in tensors.values()):
        raise WeightError("the weights contain NaN or infinity")
    extra_json = json.dumps(
        {str(k): str(v) for k, v in (extra or {}).items()}, sort_keys=True, ensure_ascii=True
    )
    metadata = {
        "format": FORMAT,
        "model_id": model_id,
        "version": str(version),
        "parent": str(parent),
        "base": base,
        "obs_dim": str(obs_dim),
        "action_dim": str(action_dim),
        "uses_base_action": "true" if uses_base_action else "false",
        "scale": repr(scale),
        "extra": extra_json,
    }
    metadata["digest"] = _canonical_digest(tensors, metadata)
    return bytes(st_save(tensors, metadata=metadata))


# ---------------------------------------------------------------------------- decode
def _header_metadata(blob: bytes) -> dict[str, str]:
    if len(blob) < 8:
        raise WeightError(f"truncated: {len(blob)} bytes is not a safetensors blob")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > _MAX_HEADER:
        raise WeightError(f"not a residual blob: header length {header_len} is implausible")
    if header_len > len(blob) - 8:
        raise WeightError(
            f"truncated: the header says {header_len} bytes, the blob has {len(blob) - 8}"
        )
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightError(f"not safetensors: the header is not valid JSON ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WeightError("no string metadata in the header: not a residual blob")
    return meta


def _meta_uint(meta: Mapping[str, str], key: str, *, low: int) -> int:
    raw = meta[key]
    if not _UINT.match(raw) or int(raw) < low:
        raise WeightError(f"metadata {key}={raw!r} is not an integer >= {low}")
    return int(raw)


def decode_residual(blob: bytes | bytearray | memoryview) -> ResidualWeights:
    """Parse and verify a blob; raise :class:`WeightError` saying what is wrong."""
    try:
        blob = bytes(blob)
    except TypeError:
        raise WeightError(f"a blob must be bytes, got {type(blob).__name__}") from None
    meta = _header_metadata(blob)
    if meta.get("format") != FORMAT:
        raise WeightError(f"format {meta.get('format')!r} is not {FORMAT!r}")
    missing = [k for k in METADATA_KEYS if k not in meta]
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if missing or unknown:
        raise WeightError(f"metadata: missing {missing}, unexpected {unknown}")
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error type
        raise WeightError(
            f"not a readable safetensors blob, truncated or corrupt ({exc})"
        ) from None

    # Digest first: a tampered blob is reported as tampered, whatever else it broke.
    if not _HEX64.match(meta["digest"]):
        raise WeightError(f"metadata digest {meta['digest'][:80]!r} is not a sha256 hex digest")
    digest = _canonical_digest(tensors, meta)
    if digest != meta["digest"]:
        raise WeightError(
            f"digest mismatch (header {meta['digest'][:12]}..., content {digest[:12]}...): "
            "the blob was tampered with or corrupted"
        )

    model_id = meta["model_id"]
    if not _NAME.match(model_id):
        raise WeightError(f"metadata model_id {model_id!r} is not [A-Za-z0-9_.-]+")
    version = _meta_uint(meta, "version", low=1)
    parent = _meta_uint(meta, "parent", low=0)
    if parent >= version:
        raise WeightError(f"metadata parent {parent} is not older than version {version}")
    base = meta["base"]
    if base and not _TAG.match(base):
        raise WeightError(f"metadata base {base!r} is not '' or a tag like 'model@3'")
    obs_dim = _meta_uint(meta, "obs_dim", low=1)
    action_dim = _meta_uint(meta, "action_dim", low=1)
    if meta["uses_base_action"] not in ("true", "false"):
        raise WeightError(f"metadata uses_base_action={meta['uses_base_action']!r}")
    uses_base_action = meta["uses_base_action"] == "true"
    try:
        scale = float(meta["scale"])
    except ValueError:
        raise WeightError(f"metadata scale={meta['scale']!r} is not a number") from None
    if not (math.isfinite(scale) and scale > 0):
        raise WeightError(f"metadata scale={scale} is not a positive finite number")
    try:
        extra = json.loads(meta["extra"])
    except json.JSONDecodeError as exc:
        raise WeightError(f"metadata extra is not valid JSON ({exc})") from None
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise WeightError("metadata extra must be a JSON object of strings")

    bad_names = sorted(k for k in tensors if not _TENSOR.match(k))
    if bad_names:
        raise WeightError(f"unexpected tensors {bad_names[:5]}")
    n = len(tensors) // 2
    expected = {f"layer{i}.{part}" for i in range(n) for part in ("weight", "bias")}
    if set(tensors) != expected:
        raise WeightError(
            f"tensors must be layer0..layer{n - 1} weight+bias, got {sorted(tensors)[:10]}"
        )
    layers = []
    for i in range(n):
        w, b = tensors[f"layer{i}.weight"], tensors[f"layer{i}.bias"]
        if w.dtype != np.float32 or b.dtype != np.float32:
            raise WeightError(f"layer{i} is {w.dtype}/{b.dtype}, expected float32")
        layers.append((w, b))
    _check_chain(
        [(w.shape, b.shape) for w, b in layers],
        in_dim=obs_dim + (action_dim if uses_base_action else 0),
        action_dim=action_dim,
    )
    for i, (w, b) in enumerate(layers):
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise WeightError(f"layer{i} has non-finite weights")
        w.flags.writeable = False
        b.flags.writeable = False
    return ResidualWeights(
        model_id=model_id,
        version=version,
        parent=parent,
        base=base,
        obs_dim=obs_dim,
        action_dim=action_dim,
        uses_base_action=uses_base_action,
        scale=scale,
        layers=tuple(layers),
        digest=digest,
        extra=dict(extra),
    )


# ---------------------------------------------------------------------------- compatibility
def check_compatible(
    w: ResidualWeights,
    *,
    obs_dim: int,
    action_dim: int,
    base_tag: str,
    current: ResidualWeights | None,
) -> None:
    """Raise :class:`WeightError` unless ``w`` may replace ``current`` on this policy.

    Refused: other obs/action dims; a non-empty ``w.base`` other than ``base_tag`` (the running
    base model); another model id than ``current``'s; a version not newer than ``current``'s
    (older or replayed blobs).
    """
    if w.obs_dim != obs_dim or w.action_dim != action_dim:
        raise WeightError(
            f"{w.tag} is for obs_dim={w.obs_dim}, action_dim={w.action_dim}; the policy has "
            f"obs_dim={obs_dim}, action_dim={action_dim}"
        )
    if w.base and w.base != base_tag:
        raise WeightError(
            f"{w.tag} was trained against base {w.base}, the running base is {base_tag or 'none'}"
        )
    if current is None:
        return
    if w.model_id != current.model_id:
        raise WeightError(
            f"{w.tag} is another model than the running residual {current.tag} "
            f"(model id {w.model_id!r} != {current.model_id!r})"
        )
    if w.version <= current.version:
        raise WeightError(
            f"{w.tag} is not newer than the latest accepted {current.tag} (older or replayed)"
        )


__all__ = [
    "FORMAT",
    "METADATA_KEYS",
    "ResidualWeights",
    "WeightError",
    "check_compatible",
    "decode_residual",
    "encode_residual",
]
