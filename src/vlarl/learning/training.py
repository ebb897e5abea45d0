"""Pieces the training verbs share: loading demonstrations, building a policy, EMA, LR."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch
from torch import nn

from vlarl.data.errors import ReplayError
from vlarl.data.lerobot import load_replay_or_lerobot
from vlarl.data.replay import Replay
from vlarl.learning import envs
from vlarl.learning.dataset import ChunkDataset, build_chunks
from vlarl.learning.errors import LearningError
from vlarl.learning.instructions import task_embeddings
from vlarl.learning.networks import PolicyBase, PolicySpec, build_policy

M = TypeVar("M", bound=nn.Module)


def load_demonstrations(
    data: str,
    *,
    tasks: str,
    chunk_length: int,
    use_instructions: bool,
    episodes: str = "all",
) -> tuple[ChunkDataset, Replay]:
    """Chunked samples of one or more replay directories or LeRobotDatasets (comma-separated).

    ``episodes`` = "success" keeps only the episodes that reached the goal (success-filtered
    learning from the same demonstrations); "all" keeps everything.
    """
    dirs = [Path(d.strip()) for d in data.split(",") if d.strip()]
    if not dirs:
        raise LearningError("--data names no replay directory")
    try:
        replay = load_replay_or_lerobot(dirs)  # LeRobotDatasets train too
    except ReplayError as exc:
        raise LearningError(f"cannot load demonstrations: {exc}") from None
    chosen = envs.parse_tasks(tasks) if tasks else tuple(replay.tasks)
    lacking = [t for t in chosen if t not in replay.tasks]
    if lacking:
        raise LearningError(f"the replay has no data of {lacking} (it has {list(replay.tasks)})")
    replay = select_episodes(replay, episodes)
    instructions = task_embeddings(chosen) if use_instructions else None
    dataset = build_chunks(
        replay, chunk_length=chunk_length, tasks=chosen, instructions=instructions
    )
    return dataset, replay


def select_episodes(replay: Replay, which: str) -> Replay:
    """All episodes, or only those with a success (see :func:`load_demonstrations`)."""
    if which == "all":
        return replay
    if which != "success":
        raise LearningError(f"--episodes must be 'all' or 'success', got {which!r}")
    data = replay.data
    good = np.unique(data.episode[data.success == 1])
    if good.size == 0:
        raise LearningError("no successful episode in the demonstrations")
    return dataclasses.replace(replay, data=data.select(np.isin(data.episode, good)))


def new_policy(
    kind: str,
    dataset: ChunkDataset,
    *,
    hidden: int,
    depth: int,
    obs_kind: str,
    steps: int = 10,
    instr_proj: int = 64,
    time_features: int = 16,
    task_norm: bool = False,
) -> PolicyBase:
    """A fresh policy of ``kind`` sized for ``dataset``, with its normalizer fitted to it."""
    instr_dim = 0 if dataset.instructions is None else int(dataset.instructions.shape[1])
    multi_task = len(dataset.tasks) > 1
    spec = PolicySpec(
        kind=kind,
        obs_dim=int(dataset.obs.shape[1]),
        action_dim=int(dataset.chunks.shape[2]),
        chunk_length=dataset.chunk_length,
        instr_dim=instr_dim,
        hidden=hidden,
        depth=depth,
        instr_proj=instr_proj,
        time_features=time_features,
        steps=steps,
        obs_kind=obs_kind,
        tasks=list(dataset.tasks),
        control_dt=envs.CONTROL_DT,
        instr_norm=instr_dim > 0 and multi_task,
        task_norm=task_norm,
    )
    if task_norm and instr_dim == 0:
        raise LearningError("--task-norm needs instruction conditioning (--instructions)")
    policy = build_policy(spec)
    if dataset.instructions is not None:
        policy.cond.fit_instructions(dataset.instructions)
    if policy.task_norm is not None and dataset.instructions is not None:
        policy.task_norm.fit(dataset.obs, dataset.task, dataset.instructions)
    policy.normalizer.fit(
        dataset.obs,
        action_low=-np.ones(spec.action_dim),
        action_high=np.ones(spec.action_dim),
    )
    return policy


def instructions_of(dataset: ChunkDataset) -> dict[str, np.ndarray] | None:
    if dataset.instructions is None:
        return None
    return {t: dataset.instructions[i] for i, t in enumerate(dataset.tasks)}


class EMA(Generic[M]):
    """Exponential moving average of a module's weights (the copy is what gets saved)."""

    def __init__(self, module: M, decay: float) -> None:
        self.decay = decay
        self.module: M = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for ema_p, p in zip(self.module.parameters(), module.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_b.copy_(b)


def cosine_lr(step: int, *, total: int, base: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(module: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
    )
