"""The networks: small MLPs with LayerNorm over (noisy action chunk, time, observation, task).

All three policies map a raw observation (and a task-instruction embedding) to an action chunk
[B, chunk_length, action_dim] in robot units, with the normalization inside the module, so the
module is exactly what gets exported to ONNX (:mod:`vlarl.contract`):

* :class:`BCPolicy`: plain behavior cloning, an MLP regressor of the chunk.
* :class:`FlowPolicy`: the teacher, a rectified-flow velocity field v(x_t, t | obs, task);
  acting integrates dx/dt = v from t=0 (x_0 = noise) to t=1 in ``steps`` Euler steps.
* :class:`ConsistencyPolicy`: the student, a consistency function
  f(x_t, t) = x_t + (1 - t) * F(x_t, t | obs, task) with f(x, 1) = x built in; acting is one
  evaluation f(x_0, 0).

Conventions: t=0 is noise, t=1 is data, x_t = (1 - t) x_0 + t x_1, velocity x_1 - x_0. Actions
inside the networks are normalized to [-1, 1] per dimension. ``x_0`` is zero at deployment
(deterministic acting, the centre of the noise distribution); a ``noise`` argument gives
stochastic acting for experiments.

The observation vector is whatever the observation topic carries: the 39-d Meta-World state
(which includes the proprioception), or an image-feature vector concatenated with
proprioception; the networks only see ``obs_dim`` numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

OBS_CLIP = 10.0  # normalized observations are clipped to +-OBS_CLIP (robust to outliers)


@dataclass
class PolicySpec:
    """Everything needed to rebuild a policy module (stored in checkpoints as JSON)."""

    kind: str  # "bc" | "teacher" | "student"
    obs_dim: int
    action_dim: int
    chunk_length: int
    instr_dim: int
    hidden: int = 512
    depth: int = 3
    instr_proj: int = 64
    time_features: int = 16
    steps: int = 10
    obs_kind: str = "state"
    tasks: list[str] = field(default_factory=list)
    control_dt: float = 0.0125
    instr_norm: bool = False  # standardize instruction embeddings over the training tasks
    task_norm: bool = False  # standardize observations per task (task chosen by the instruction)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PolicySpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


class Normalizer(nn.Module):
    """Observation standardization and action scaling, as buffers (exported with the graph)."""

    obs_mean: Tensor
    obs_std: Tensor
    action_low: Tensor
    action_high: Tensor

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_low", -torch.ones(action_dim))
        self.register_buffer("action_high", torch.ones(action_dim))

    def fit(
        self,
        obs: np.ndarray,
        *,
        action_low: np.ndarray,
        action_high: np.ndarray,
        std_floor: float = 1e-2,
    ) -> None:
        """Set the statistics from data; dimensions that barely vary get std ``std_floor``."""
        mean = obs.mean(axis=0, dtype=np.float64)
        std = np.maximum(obs.std(axis=0, dtype=np.float64), std_floor)
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        self.action_low.copy_(torch.as_tensor(action_low, dtype=torch.float32))
        self.action_high.copy_(torch.as_tensor(action_high, dtype=torch.float32))

    def norm_obs(self, obs: Tensor) -> Tensor:
        return ((obs - self.obs_mean) / self.obs_std).clamp(-OBS_CLIP, OBS_CLIP)

    def norm_action(self, action: Tensor) -> Tensor:
        return 2.0 * (action - self.action_low) / (self.action_high - self.action_low) - 1.0

    def denorm_action(self, action: Tensor) -> Tensor:
        scaled = self.action_low + (action + 1.0) * 0.5 * (self.action_high - self.action_low)
        return torch.minimum(torch.maximum(scaled, self.action_low), self.action_high)

    def to_json(self) -> dict[str, list[float]]:
        return {
            "obs_mean": [float(x) for x in self.obs_mean],
            "obs_std": [float(x) for x in self.obs_std],
            "action_low": [float(x) for x in self.action_low],
            "action_high": [float(x) for x in self.action_high],
        }


class TaskObsNorm(nn.Module):
    """Per-task observation standardization; the task is the one whose instruction is nearest.

    Multi-task data standardized with one set of statistics squashes what matters inside one
    task: MT10's goal positions spread over the whole workspace, so reach-v3's goal (a 10 cm
    box) spans a sixth of the range it has on its own. Here every training task keeps its own
    mean and std, and the row is picked inside the graph by the nearest stored instruction
    embedding (squared distance, exact ties impossible for distinct tasks), so the exported
    model's inputs stay (obs, instruction). Each task's std is floored at ``floor`` times the
    global std (and ``std_floor``), so a dimension that barely varies in one task's data cannot
    blow up outside it.
    """

    keys: Tensor
    key_sq: Tensor
    mean: Tensor
    std: Tensor

    def __init__(self, num_tasks: int, obs_dim: int, instr_dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(num_tasks, instr_dim))
        self.register_buffer("key_sq", torch.zeros(num_tasks))
        self.register_buffer("mean", torch.zeros(num_tasks, obs_dim))
        self.register_buffer("std", torch.ones(num_tasks, obs_dim))

    def fit(
        self,
        obs: np.ndarray,
        task: np.ndarray,
        embeddings: np.ndarray,
        *,
        floor: float = 0.1,
        std_floor: float = 1e-2,
    ) -> None:
        """Statistics of ``obs`` rows per task index ``task``; ``embeddings`` [num_tasks, dim]."""
        if embeddings.shape[0] != self.mean.shape[0]:
            raise ValueError("one instruction embedding per task is needed")
        global_std = obs.std(axis=0, dtype=np.float64)
        for i in range(self.mean.shape[0]):
            rows = obs[task == i]
            if rows.shape[0] == 0:
                raise ValueError(f"no observations of task index {i}")
            mean = rows.mean(axis=0, dtype=np.float64)
            std = np.maximum(rows.std(axis=0, dtype=np.float64), floor * global_std)
            self.mean[i] = torch.as_tensor(mean, dtype=torch.float32)
            self.std[i] = torch.as_tensor(np.maximum(std, std_floor), dtype=torch.float32)
        keys = torch.as_tensor(np.asarray(embeddings, np.float32))
        self.keys.copy_(keys)
        self.key_sq.copy_((keys * keys).sum(dim=1))

    def weights(self, instruction: Tensor) -> Tensor:
        """One-hot [B, num_tasks] of the nearest stored instruction."""
        dist = self.key_sq[None, :] - 2.0 * instruction @ self.keys.T  # + |instr|^2, same per row
        hit = (dist <= dist.min(dim=1, keepdim=True).values).to(instruction.dtype)
        return hit / hit.sum(dim=1, keepdim=True)

    def forward(self, obs: Tensor, instruction: Tensor) -> Tensor:
        w = self.weights(instruction)
        return ((obs - w @ self.mean) / (w @ self.std)).clamp(-OBS_CLIP, OBS_CLIP)

    def to_json(self, tasks: list[str]) -> dict[str, dict[str, list[float]]]:
        return {
            t: {
                "obs_mean": [float(x) for x in self.mean[i]],
                "obs_std": [float(x) for x in self.std[i]],
            }
            for i, t in enumerate(tasks)
        }


def mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    """``depth`` x (Linear, LayerNorm, SiLU), then a Linear to ``out_dim``."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class TimeFeatures(nn.Module):
    """Fixed Fourier features of t in [0, 1]: sin/cos at geometric frequencies."""

    freqs: Tensor

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        freqs = math.pi * torch.logspace(0, math.log10(64.0), n) if n > 0 else torch.zeros(0)
        self.register_buffer("freqs", freqs)

    def forward(self, t: Tensor) -> Tensor:
        arg = t[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class Conditioner(nn.Module):
    """Normalized observation, plus the instruction embedding projected to ``instr_proj``.

    With ``spec.instr_norm`` the embedding is first standardized per dimension over the
    training tasks' embeddings (buffers, inside the exported graph): sentence embeddings of
    related instructions ("push the puck ..." / "pick up the puck ...") are close, and
    standardizing spreads exactly the dimensions in which the tasks differ.
    """

    instr_mean: Tensor
    instr_std: Tensor

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.instr_dim = spec.instr_dim
        self.proj = nn.Linear(spec.instr_dim, spec.instr_proj) if spec.instr_dim > 0 else None
        self.out_dim = spec.obs_dim + (spec.instr_proj if spec.instr_dim > 0 else 0)
        self.instr_norm = bool(spec.instr_norm and spec.instr_dim > 0)
        if self.instr_norm:
            self.register_buffer("instr_mean", torch.zeros(spec.instr_dim))
            self.register_buffer("instr_std", torch.ones(spec.instr_dim))

    def fit_instructions(self, embeddings: np.ndarray, *, std_floor: float = 1e-2) -> None:
        """Standardization statistics from the training tasks' embeddings [num_tasks, dim]."""
        if not self.instr_norm:
            return
        mean = embeddings.mean(axis=0, dtype=np.float64)
        std = np.maximum(embeddings.std(axis=0, dtype=np.float64), std_floor)
        self.instr_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.instr_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, obs_n: Tensor, instruction: Tensor | None) -> Tensor:
        if self.proj is None:
            return obs_n
        if instruction is None:
            raise ValueError("this model is conditioned on a task instruction; none was given")
        if self.instr_norm:
            instruction = (instruction - self.instr_mean) / self.instr_std
        return torch.cat([obs_n, self.proj(instruction)], dim=-1)


class PolicyBase(nn.Module):
    """Raw obs (+ instruction) -> action chunk [B, H, A] in robot units."""

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.spec = spec
        self.flat = spec.chunk_length * spec.action_dim
        self.normalizer = Normalizer(spec.obs_dim, spec.action_dim)
        self.cond = Conditioner(spec)
        self.task_norm: TaskObsNorm | None = None
        if spec.task_norm:
            if spec.instr_dim <= 0 or not spec.tasks:
                raise ValueError("per-task normalization needs instruction conditioning and tasks")
            self.task_norm = TaskObsNorm(len(spec.tasks), spec.obs_dim, spec.instr_dim)

    def norm_obs(self, obs: Tensor, instruction: Tensor | None) -> Tensor:
        """Standardized observations: per task (``spec.task_norm``) or with global statistics."""
        if self.task_norm is None:
            return self.normalizer.norm_obs(obs)
        if instruction is None:
            raise ValueError("this model is conditioned on a task instruction; none was given")
        return self.task_norm(obs, instruction)

    def condition(self, obs: Tensor, instruction: Tensor | None) -> Tensor:
        return self.cond(self.norm_obs(obs, instruction), instruction)

    def to_chunk(self, x_norm: Tensor) -> Tensor:
        chunk = x_norm.reshape(-1, self.spec.chunk_length, self.spec.action_dim)
        return self.normalizer.denorm_action(chunk)

    def normalized_targets(self, chunk: Tensor) -> Tensor:
        """Robot-unit chunks [B, H, A] -> flat normalized training targets [B, H*A]."""
        return self.normalizer.norm_action(chunk).reshape(chunk.shape[0], -1)


class BCPolicy(PolicyBase):
    """Plain BC: an MLP regressor from (obs, task) to the action chunk."""

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__(spec)
        self.net = mlp(self.cond.out_dim, spec.hidden, spec.depth, self.flat)

    def predict_normalized(self, cond: Tensor) -> Tensor:
        return self.net(cond)

    def forward(self, obs: Tensor, instruction: Tensor | None = None) -> Tensor:
        return self.to_chunk(self.net(self.condition(obs, instruction)))


class ChunkField(nn.Module):
    """The shared backbone: (x_t, t, condition) -> a vector the size of the chunk."""

    def __init__(self, spec: PolicySpec, cond_dim: int) -> None:
        super().__init__()
        flat = spec.chunk_length * spec.action_dim
        self.time = TimeFeatures(spec.time_features)
        self.net = mlp(flat + 2 * spec.time_features + cond_dim, spec.hidden, spec.depth, flat)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.net(torch.cat([x, self.time(t), cond], dim=-1))


class FlowPolicy(PolicyBase):
    """The teacher: rectified flow over normalized action chunks, Euler-integrated."""

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__(spec)
        self.field = ChunkField(spec, self.cond.out_dim)
        self.steps = spec.steps

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.field(x, t, cond)

    def integrate(
        self, x: Tensor, cond: Tensor, *, t0: float = 0.0, t1: float = 1.0, steps: int
    ) -> Tensor:
        """Euler-integrate dx/dt = v(x, t) from t0 to t1 in ``steps`` equal steps."""
        dt = (t1 - t0) / steps
        for k in range(steps):
            t = torch.full((x.shape[0],), t0 + k * dt, dtype=x.dtype, device=x.device)
            x = x + dt * self.velocity(x, t, cond)
        return x

    def sample_normalized(
        self, cond: Tensor, noise: Tensor | None = None, steps: int = 0
    ) -> Tensor:
        x = torch.zeros(cond.shape[0], self.flat, dtype=cond.dtype, device=cond.device)
        if noise is not None:
            x = noise
        return self.integrate(x, cond, steps=steps or self.steps)

    def forward(self, obs: Tensor, instruction: Tensor | None = None) -> Tensor:
        return self.to_chunk(self.sample_normalized(self.condition(obs, instruction)))


class ConsistencyPolicy(PolicyBase):
    """The student: a consistency function that maps any point of a teacher ODE path to its end.

    f(x_t, t) = x_t + (1 - t) * F(x_t, t): the boundary condition f(x, 1) = x holds by
    construction, and with F initialized from the teacher's velocity field f starts as one Euler
    step of the teacher. Acting is a single evaluation at t=0.
    """

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__(spec)
        self.field = ChunkField(spec, self.cond.out_dim)

    def consistency(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return x + (1.0 - t)[:, None] * self.field(x, t, cond)

    def sample_normalized(
        self, cond: Tensor, noise: Tensor | None = None, steps: int = 1
    ) -> Tensor:
        x = torch.zeros(cond.shape[0], self.flat, dtype=cond.dtype, device=cond.device)
        if noise is not None:
            x = noise
        t = torch.zeros(cond.shape[0], dtype=cond.dtype, device=cond.device)
        out = self.consistency(x, t, cond)
        # Optional multi-step consistency sampling (steps > 1): re-noise to t_k, jump to the end.
        for k in range(1, steps):
            tk = k / steps
            z = torch.zeros_like(out) if noise is None else torch.randn_like(out)
            x = (1.0 - tk) * z + tk * out
            out = self.consistency(x, torch.full_like(t, tk), cond)
        return out

    def forward(self, obs: Tensor, instruction: Tensor | None = None) -> Tensor:
        return self.to_chunk(self.sample_normalized(self.condition(obs, instruction)))


POLICY_CLASSES: dict[str, type[PolicyBase]] = {
    "bc": BCPolicy,
    "teacher": FlowPolicy,
    "student": ConsistencyPolicy,
}


def build_policy(spec: PolicySpec) -> PolicyBase:
    try:
        cls = POLICY_CLASSES[spec.kind]
    except KeyError:
        raise ValueError(f"unknown policy kind {spec.kind!r}") from None
    return cls(spec)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
