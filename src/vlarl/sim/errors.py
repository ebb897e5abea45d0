"""Errors of the embedded robot, each with a message that says what to do about it."""

from __future__ import annotations


class SimError(RuntimeError):
    """Base class of the simulator's errors."""


class UnknownTaskError(SimError, ValueError):
    """The task name is not one of Meta-World's v3 tasks."""


class InvalidActionError(SimError, ValueError):
    """An action does not have the shape [4], holds non-finite numbers or leaves [-1, 1]."""


class EpisodeOverError(SimError):
    """``step()`` after the episode ended (terminal or truncated) and before ``reset()``."""


class RenderError(SimError):
    """The offscreen renderer cannot be created or cannot render (camera, size, GL)."""
