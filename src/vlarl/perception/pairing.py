"""Pair each camera frame with the proprioception sample of (nearly) the same stamp.

Images arrive after the proprioception of the same sample (rendering takes ~100 ms), so the
usual case is an exact stamp match in a short history. A frame newer than every proprioception
sample waits (one slot, newest wins) until a sample at or after its stamp arrives.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


class StampPairer(Generic[T]):
    """History of proprioception vectors by stamp, and one waiting frame of type ``T``."""

    def __init__(self, *, history: int = 256, max_skew_ns: int = 0) -> None:
        if history < 1:
            raise ValueError("history must be >= 1")
        self.max_skew_ns = int(max_skew_ns)
        self._stamps: deque[int] = deque(maxlen=history)
        self._values: deque[np.ndarray] = deque(maxlen=history)
        self._waiting: tuple[int, T] | None = None
        self.superseded = 0  # waiting frames replaced by a newer frame before pairing
        self.unpaired = 0  # frames with no proprioception sample within the skew

    def add_proprio(self, stamp_ns: int, values: np.ndarray) -> tuple[int, T, np.ndarray] | None:
        """Record a proprioception sample; returns a waiting frame it completes, if any."""
        if self._stamps and stamp_ns < self._stamps[-1]:
            return None  # out of order (a repeated old sample): keep the history sorted
        if self._stamps and stamp_ns == self._stamps[-1]:
            self._values[-1] = values
        else:
            self._stamps.append(stamp_ns)
            self._values.append(values)
        if self._waiting is not None and stamp_ns >= self._waiting[0]:
            frame_stamp, frame = self._waiting
            self._waiting = None
            match = self.lookup(frame_stamp)
            if match is not None:
                return frame_stamp, frame, match
            self.unpaired += 1
        return None

    def lookup(self, stamp_ns: int) -> np.ndarray | None:
        """The sample nearest ``stamp_ns`` within ``max_skew_ns``, or None."""
        best: np.ndarray | None = None
        best_gap = self.max_skew_ns + 1
        for s, v in zip(reversed(self._stamps), reversed(self._values), strict=True):
            gap = abs(s - stamp_ns)
            if gap < best_gap:
                best, best_gap = v, gap
                if gap == 0:
                    break
            elif s < stamp_ns:
                break  # older and getting further away
        return best

    def add_frame(self, stamp_ns: int, frame: T) -> np.ndarray | bool | None:
        """Proprioception for a frame: the vector, ``False`` if it will never come (too old,
        nothing within the skew), or ``None`` if the frame now waits for a newer sample."""
        newest = self._stamps[-1] if self._stamps else None
        if newest is None or stamp_ns > newest:
            if self._waiting is not None:
                self.superseded += 1
            self._waiting = (stamp_ns, frame)
            return None
        match = self.lookup(stamp_ns)
        if match is None:
            self.unpaired += 1
            return False
        return match

    def clear(self) -> None:
        self._stamps.clear()
        self._values.clear()
        self._waiting = None
