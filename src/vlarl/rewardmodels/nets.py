"""The reward models' network (torch): a small MLP over a window of observations.

Input: a window [B, L, obs_dim] of raw observations (oldest first) and, for multi-task models,
the task's instruction embedding [B, instr_dim]. Inside: per-feature standardization (buffers,
exported with the graph), the window flattened together with its L-1 frame-to-frame
differences (standardized separately, so small motions are visible), optional **geometric
features**, clipped to +-10, a linear projection of the instruction, then an MLP with LayerNorm
and SiLU to one number per window.

Geometric features: given the start indices of 3-d points in the observation (``points``; for
Meta-World's 39-d state ``0, 4, 11, 36`` = hand, first object, second object, goal), each
optionally shifted by a constant offset (``point_offsets``), the difference vector and the
distance of every pair of points in every observation of the window (standardized). Meta-World
judges reaching by the fingertip centre (``tcp_center``), 4.5 cm below the hand position the
observation carries, so ``tcp`` (``auto`` with that offset) shifts the hand point by that
much: reach-v3's success (fingertip centre within 5 cm of the goal) is then one of the
distances, not a curved surface in the raw difference vector. Success in these tasks is a
statement about such distances (object within a few centimetres of the goal), which a plain MLP
over raw coordinates learns only approximately from a few hundred episodes; with the distances
given it learns the boundary much better.

Distance rings (``rings``, radii in metres): per pair distance ``dist`` and radius ``r``,
``sigmoid((r - dist) / ring_width)``, about 1 inside and 0 outside. Success radii are a few
centimetres while the standardized distance spans the whole workspace, so without them the MLP
puts a near-miss 5 mm outside the radius (the stop-short episodes) almost where it puts a
success; with them the radius is one sharp feature.

The head turns that number into what the model file promises: a probability (detector,
``sigmoid``) or steps-to-go (progress, ``scale * softplus``), so the exported graph is the whole
model and the runtime applies nothing.
"""

from __future__ import annotations

import io
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlarl.rewardmodels.errors import RewardModelError
from vlarl.rewardmodels.modelfile import (
    INPUT_INSTRUCTION,
    INPUT_WINDOW,
    OPSET,
    RewardModelMetadata,
    attach_metadata,
)

CLIP = 10.0
STD_FLOOR = 1e-3


class WindowNet(nn.Module):
    """MLP over (window, deltas, instruction) -> one raw output per window."""

    obs_mean: Tensor
    obs_std: Tensor
    delta_std: Tensor
    geo_mean: Tensor
    geo_std: Tensor
    pair_a: Tensor
    pair_b: Tensor
    pair_offset: Tensor
    ring_radii: Tensor

    def __init__(
        self,
        *,
        obs_dim: int,
        window: int,
        instr_dim: int = 0,
        hidden: int = 256,
        depth: int = 2,
        instr_proj: int = 32,
        points: tuple[int, ...] = (),
        point_offsets: tuple[tuple[float, float, float], ...] = (),
        rings: tuple[float, ...] = (),
        ring_width: float = 0.002,
        raw: bool = True,
    ) -> None:
        super().__init__()
        self.obs_dim, self.window, self.instr_dim = obs_dim, window, instr_dim
        if any(p < 0 or p + 3 > obs_dim for p in points):
            raise ValueError(f"points {points} do not fit an observation of {obs_dim} numbers")
        if point_offsets and len(point_offsets) != len(points):
            raise ValueError("point_offsets needs one (dx, dy, dz) per point")
        self.points = tuple(int(p) for p in points)
        offsets = [tuple(float(v) for v in o) for o in point_offsets] or [(0.0, 0.0, 0.0)] * len(
            self.points
        )
        if any(len(o) != 3 for o in offsets):
            raise ValueError("each point offset has three numbers (dx, dy, dz)")
        self.point_offsets = tuple(offsets)
        self.raw = bool(raw) or not self.points  # without geometry the raw window is needed
        n = len(self.points)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        self.n_pairs = len(pairs)
        pts, offs = self.points, self.point_offsets
        self.register_buffer(
            "pair_a",
            torch.tensor([pts[i] + c for i, _ in pairs for c in range(3)], dtype=torch.long),
        )
        self.register_buffer(
            "pair_b",
            torch.tensor([pts[j] + c for _, j in pairs for c in range(3)], dtype=torch.long),
        )
        # constant part of every pair's difference vector: offset(a) - offset(b)
        self.register_buffer(
            "pair_offset",
            torch.tensor(
                [offs[i][c] - offs[j][c] for i, j in pairs for c in range(3)], dtype=torch.float32
            ),
        )
        self.has_offsets = any(any(v != 0.0 for v in o) for o in offs)
        if rings and (ring_width <= 0 or any(r <= 0 for r in rings)):
            raise ValueError("rings and ring_width must be positive")
        self.rings = tuple(float(r) for r in rings) if self.n_pairs else ()
        self.ring_width = float(ring_width)
        self.register_buffer("ring_radii", torch.tensor(self.rings, dtype=torch.float32))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("delta_std", torch.ones(obs_dim))
        self.register_buffer("geo_mean", torch.zeros(4 * self.n_pairs))
        self.register_buffer("geo_std", torch.ones(4 * self.n_pairs))
        in_dim = (window * obs_dim if self.raw else obs_dim) + (window - 1) * obs_dim
        in_dim += window * 4 * self.n_pairs
        in_dim += window * self.n_pairs * len(self.rings)
        self.instr = nn.Linear(instr_dim, instr_proj) if instr_dim > 0 else None
        if self.instr is not None:
            in_dim += instr_proj
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def fit_normalization(self, obs: np.ndarray, windows: np.ndarray | None = None) -> None:
        """Statistics of the observations (and of the frame differences inside ``windows``)."""
        mean = obs.mean(axis=0)
        std = np.maximum(obs.std(axis=0), STD_FLOOR)
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        if windows is not None and self.window > 1:
            deltas = np.diff(windows, axis=1).reshape(-1, self.obs_dim)
            dstd = np.maximum(np.sqrt((deltas.astype(np.float64) ** 2).mean(axis=0)), STD_FLOOR)
            self.delta_std.copy_(torch.as_tensor(dstd, dtype=torch.float32))
        if self.n_pairs:
            with torch.no_grad():
                geo_t = self._geometry(torch.from_numpy(np.asarray(obs, np.float32)[:, None]))
            geo = geo_t.reshape(-1, 4 * self.n_pairs).numpy()
            self.geo_mean.copy_(torch.as_tensor(geo.mean(axis=0)))
            self.geo_std.copy_(torch.as_tensor(np.maximum(geo.std(axis=0), STD_FLOOR)))

    def _geometry(self, window: Tensor) -> Tensor:
        """[B, L, 4 * pairs]: per pair the difference vector (3) then the distance (1)."""
        diff = window[:, :, self.pair_a] - window[:, :, self.pair_b]
        if self.has_offsets:
            diff = diff + self.pair_offset
        diff = diff.reshape(window.shape[0], window.shape[1], self.n_pairs, 3)
        dist = torch.sqrt((diff * diff).sum(dim=3, keepdim=True) + 1e-12)
        return torch.cat([diff, dist], dim=3).reshape(window.shape[0], window.shape[1], -1)

    def forward(self, window: Tensor, instruction: Tensor | None = None) -> Tensor:
        x = (window - self.obs_mean) / self.obs_std
        parts = [x.flatten(1) if self.raw else x[:, -1]]
        if self.window > 1:
            d = (window[:, 1:] - window[:, :-1]) / self.delta_std
            parts.append(d.flatten(1))
        if self.n_pairs:
            geo = self._geometry(window)
            parts.append(((geo - self.geo_mean) / self.geo_std).flatten(1))
            if self.rings:  # [B, L, pairs, rings]: ~1 inside each radius, ~0 outside
                dist = geo.reshape(geo.shape[0], geo.shape[1], self.n_pairs, 4)[..., 3:4]
                inside = torch.sigmoid((self.ring_radii - dist) / self.ring_width)
                parts.append(inside.flatten(1))
        feats = torch.clamp(torch.cat(parts, dim=1), -CLIP, CLIP)
        if self.instr is not None:
            if instruction is None:
                raise ValueError("this model is multi-task: pass the instruction embedding")
            feats = torch.cat([feats, self.instr(instruction)], dim=1)
        return self.mlp(feats).squeeze(1)

    def normalization_json(self) -> dict[str, Any]:
        return {
            "obs_mean": self.obs_mean.tolist(),
            "obs_std": self.obs_std.tolist(),
            "delta_std": self.delta_std.tolist(),
            "points": list(self.points),
            "point_offsets": [list(o) for o in self.point_offsets],
            "rings": list(self.rings),
            "ring_width": self.ring_width,
            "raw_window": self.raw,
        }


METAWORLD_POINTS = (0, 4, 11, 36)  # hand, first object, second object, goal in the 39-d state
# Meta-World's fingertip centre (tcp_center, what reach-v3 and grasping rewards measure) is this
# far from the hand position in the observation (the hand's orientation is fixed; measured
# spread < 5 mm); ``tcp`` uses it instead of the raw hand position.
METAWORLD_TCP_OFFSET = (0.0, 0.0, -0.045)
METAWORLD_OFFSETS = (METAWORLD_TCP_OFFSET, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))

# radii (m) of the distance rings of the success detector: 1 to 12 cm every 5 mm
DEFAULT_RINGS = tuple(round(0.01 + 0.005 * i, 3) for i in range(23))


def parse_rings(text: str) -> tuple[float, ...]:
    """``auto`` (:data:`DEFAULT_RINGS`), ``none`` or comma-separated radii in metres."""
    text = text.strip().lower()
    if text == "auto":
        return DEFAULT_RINGS
    if text in ("", "none"):
        return ()
    try:
        rings = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"rings must be 'auto', 'none' or radii in metres: {text!r}") from None
    if any(not r > 0 for r in rings):
        raise ValueError(f"ring radii must be positive: {text!r}")
    return rings


PointSpec = tuple[tuple[int, ...], tuple[tuple[float, float, float], ...]]


def parse_points(text: str, obs_dim: int) -> PointSpec:
    """(points, offsets) from ``auto`` (Meta-World's points for a 39-d state, else none),
    ``tcp`` (the same with the hand shifted to the fingertip centre), ``none`` or ``a,b,...``
    where an item may carry an offset as ``index@dx:dy:dz`` (e.g. ``0@0:0:-0.045,4,36``)."""
    text = text.strip().lower()
    if text in ("auto", "tcp"):
        if obs_dim != 39:
            return (), ()
        zero = ((0.0, 0.0, 0.0),) * len(METAWORLD_POINTS)
        return METAWORLD_POINTS, METAWORLD_OFFSETS if text == "tcp" else zero
    if text in ("", "none"):
        return (), ()
    points: list[int] = []
    offsets: list[tuple[float, float, float]] = []
    try:
        for item in text.split(","):
            index, _, off = item.partition("@")
            points.append(int(index))
            values = tuple(float(v) for v in off.split(":")) if off else (0.0, 0.0, 0.0)
            if len(values) != 3:
                raise ValueError
            offsets.append((values[0], values[1], values[2]))
    except ValueError:
        raise ValueError(
            "points must be 'auto', 'none' or comma-separated indices (optionally "
            f"index@dx:dy:dz): {text!r}"
        ) from None
    if any(p < 0 or p + 3 > obs_dim for p in points):
        raise ValueError(f"points {points} do not fit an observation of {obs_dim} numbers")
    return tuple(points), tuple(offsets)


class ProbabilityHead(nn.Module):
    """Detector graph: sigmoid of the logit."""

    def __init__(self, net: WindowNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, window: Tensor, instruction: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.net(window, instruction))


class StepsHead(nn.Module):
    """Progress graph: ``scale * softplus(raw)`` steps to go (>= 0)."""

    def __init__(self, net: WindowNet, scale: float) -> None:
        super().__init__()
        self.net = net
        self.scale = float(scale)

    def forward(self, window: Tensor, instruction: Tensor | None = None) -> Tensor:
        return self.scale * nn.functional.softplus(self.net(window, instruction))


class _NoInstruction(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, window: Tensor) -> Tensor:
        return self.head(window)


def to_onnx_bytes(head: nn.Module, *, net: WindowNet, output: str) -> bytes:
    """The head as ONNX (dynamic batch), without metadata."""
    head = head.eval()
    window = torch.zeros(2, net.window, net.obs_dim)
    if net.instr_dim > 0:
        module: nn.Module = head
        args: tuple[Tensor, ...] = (window, torch.zeros(2, net.instr_dim))
        names = [INPUT_WINDOW, INPUT_INSTRUCTION]
    else:
        module = _NoInstruction(head)
        args = (window,)
        names = [INPUT_WINDOW]
    axes = {n: {0: "batch"} for n in [*names, output]}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,  # type: ignore[arg-type]
            input_names=names,
            output_names=[output],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    return buf.getvalue()


def predict(
    head: nn.Module, windows: np.ndarray, instructions: np.ndarray | None, *, batch: int = 8192
) -> np.ndarray:
    """Run ``head`` over many windows (no grad), in batches; [N] float32."""
    out = []
    head.eval()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            w = torch.from_numpy(np.ascontiguousarray(windows[i : i + batch], np.float32))
            ins = None
            if instructions is not None:
                ins = torch.from_numpy(np.ascontiguousarray(instructions[i : i + batch]))
            out.append(head(w, ins).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def export_window_model(
    trained: Any,
    out: str | Path,
    *,
    kind: str,
    model_id: str,
    version: int,
    params: dict[str, Any],
    doc: str,
    overwrite: bool,
    tolerance: float,
    training_info: dict[str, Any] | None,
) -> float:
    """Write a trained window model (detector or progress) as ONNX with its metadata.

    ``trained`` has ``head``, ``tasks``, ``instructions``, ``report``, ``val_windows`` and
    ``val_instructions``. ONNX Runtime is checked against torch on up to 2048 validation windows
    first; nothing is written when the check (or the path) fails. Returns the largest error.
    """
    import onnxruntime as ort

    from vlarl.data.replay import atomic_write_bytes

    out = Path(out)
    if out.suffix != ".onnx":
        raise RewardModelError(f"the model file must end in .onnx, got {out}")
    if out.exists() and not overwrite:
        raise RewardModelError(f"{out} exists; pass overwrite to replace it")
    net = trained.head.net
    meta = RewardModelMetadata(
        kind=kind,
        model_id=model_id,
        version=version,
        obs_kind="state",
        obs_dim=net.obs_dim,
        window=net.window,
        instr_dim=net.instr_dim,
        tasks=trained.tasks,
        instructions={t: tuple(float(x) for x in v) for t, v in trained.instructions.items()},
        params=params,
        training={
            **(training_info or {}),
            **{k: v for k, v in trained.report.items() if k != "config"},
        },
        normalization=net.normalization_json(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        graph_sha256="0" * 64,
    )
    data = attach_metadata(to_onnx_bytes(trained.head, net=net, output=meta.output), meta, doc=doc)
    windows = trained.val_windows
    if windows is None or windows.shape[0] == 0:
        windows = np.zeros((4, net.window, net.obs_dim), np.float32)
    windows = windows[:2048]
    instr = None if trained.val_instructions is None else trained.val_instructions[:2048]
    reference = predict(trained.head, windows, instr)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {INPUT_WINDOW: windows}
    if instr is not None:
        feeds[INPUT_INSTRUCTION] = instr
    got = sess.run([meta.output], feeds)[0]
    err = float(np.max(np.abs(got - reference)))
    if not err <= tolerance:
        raise RewardModelError(f"ONNX Runtime differs from torch by {err:.2e}; nothing written")
    atomic_write_bytes(out, data, overwrite=overwrite)
    return err


def cosine_lr(step: int, *, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + float(np.cos(np.pi * min(1.0, progress))))
