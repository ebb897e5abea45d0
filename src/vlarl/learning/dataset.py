"""Training samples from a replay: (observation, task, the next ``chunk_length`` actions).

For the row at step i of an episode, the target chunk is the executed actions of steps
i .. i+H-1; past the episode's last step the last action is repeated. Every row of every
episode is a sample: BC, teacher and student all train on exactly the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlarl.data.replay import Replay
from vlarl.learning.errors import LearningError


@dataclass
class ChunkDataset:
    """Samples as arrays; ``task`` indexes ``tasks`` and ``instructions`` (if any)."""

    obs: np.ndarray  # [N, obs_dim] float32, raw units
    chunks: np.ndarray  # [N, H, A] float32, robot units
    task: np.ndarray  # [N] int64
    tasks: tuple[str, ...]
    instructions: np.ndarray | None  # [len(tasks), instr_dim] float32, or None

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def chunk_length(self) -> int:
        return int(self.chunks.shape[1])

    def tensors(self) -> TensorData:
        instr = None
        if self.instructions is not None:
            instr = torch.from_numpy(self.instructions[self.task])
        return TensorData(
            obs=torch.from_numpy(self.obs),
            chunks=torch.from_numpy(self.chunks),
            instr=instr,
        )


@dataclass
class TensorData:
    obs: torch.Tensor
    chunks: torch.Tensor
    instr: torch.Tensor | None

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        instr = None if self.instr is None else self.instr[index]
        return self.obs[index], self.chunks[index], instr


def chunk_indices(length: int, chunk_length: int) -> np.ndarray:
    """[length, H] row offsets: i, i+1, ..., clipped to the episode's last row."""
    return np.minimum(np.arange(length)[:, None] + np.arange(chunk_length)[None, :], length - 1)


def build_chunks(
    replay: Replay,
    *,
    chunk_length: int,
    tasks: tuple[str, ...],
    instructions: np.ndarray | None,
) -> ChunkDataset:
    """Chunked samples of the replay's rows whose task is in ``tasks``."""
    if chunk_length < 1:
        raise LearningError("chunk_length must be >= 1")
    data = replay.data
    names = replay.task_names()
    obs_parts, chunk_parts, task_parts = [], [], []
    for _, rows in data.episodes():
        task_name = str(names[rows[0]])
        if task_name not in tasks:
            continue
        idx = rows[chunk_indices(len(rows), chunk_length)]
        obs_parts.append(data.obs[rows])
        chunk_parts.append(data.action[idx])
        task_parts.append(np.full(len(rows), tasks.index(task_name), np.int64))
    if not obs_parts:
        raise LearningError(f"the replay has no episodes of tasks {list(tasks)}")
    return ChunkDataset(
        obs=np.ascontiguousarray(np.concatenate(obs_parts), dtype=np.float32),
        chunks=np.ascontiguousarray(np.concatenate(chunk_parts), dtype=np.float32),
        task=np.concatenate(task_parts),
        tasks=tasks,
        instructions=instructions,
    )
