"""Action-chunk execution: run the planned chunk step by step and re-plan on a schedule.

The same scheduler drives the policy node and in-process evaluation, so a model behaves the
same in both. A model predicts ``chunk_length`` actions per call; the scheduler executes the
first ``replan_every`` of them, then asks for a new plan (``replan_every == chunk_length`` is
open-loop chunking, ``replan_every == 1`` re-plans every tick).
"""

from __future__ import annotations

import numpy as np


class ChunkScheduler:
    """Hands out one action per control tick from the current chunk."""

    def __init__(self, *, chunk_length: int, replan_every: int) -> None:
        if chunk_length < 1:
            raise ValueError("chunk_length must be >= 1")
        if not 1 <= replan_every <= chunk_length:
            raise ValueError(f"replan_every must be in [1, {chunk_length}], got {replan_every}")
        self.chunk_length = chunk_length
        self.replan_every = replan_every
        self._chunk: np.ndarray | None = None
        self._index = 0

    def needs_plan(self) -> bool:
        """True when the next tick must run the model first."""
        return self._chunk is None or self._index >= self.replan_every

    def set_plan(self, chunk: np.ndarray) -> None:
        """Install a freshly predicted chunk [chunk_length, action_dim]."""
        if chunk.ndim != 2 or chunk.shape[0] != self.chunk_length:
            raise ValueError(f"expected a chunk of {self.chunk_length} steps, got {chunk.shape}")
        self._chunk = chunk
        self._index = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """(action for this tick, the rest of the plan from this tick on)."""
        if self._chunk is None or self._index >= self.replan_every:
            raise RuntimeError("no plan for this tick: call set_plan first")
        remaining = self._chunk[self._index :]
        self._index += 1
        return remaining[0], remaining

    def reset(self) -> None:
        """Drop the current plan (episode boundary, model swap)."""
        self._chunk = None
        self._index = 0
