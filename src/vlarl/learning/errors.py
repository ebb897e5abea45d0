"""Errors of the learning package: one place, so callers can catch them by type."""

from __future__ import annotations


class LearningError(RuntimeError):
    """A learning verb cannot go on: bad arguments, missing inputs, a failed check."""


class CheckpointError(LearningError, ValueError):
    """A checkpoint file is missing, truncated, tampered or not a vlarl checkpoint."""


class ExportCheckError(LearningError):
    """An exported model does not compute what the PyTorch model computes."""
