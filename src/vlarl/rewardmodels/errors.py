"""Errors of the reward-model package: one place, so callers can catch them by type."""

from __future__ import annotations


class RewardModelError(ValueError):
    """A reward model (success detector, progress model) cannot be used or built.

    Raised for a model file that is missing, corrupt, tampered with or of the wrong kind, for
    inputs of the wrong shape, and for training data that cannot train a model (no positives,
    no successful episodes, ...). The message says what is wrong.
    """


class RewardDataError(RewardModelError):
    """Replay data cannot be labelled: episodes without steps, inconsistent columns, ..."""
