"""Errors of the data package: one place, so callers can catch them by type."""

from __future__ import annotations


class ReplayError(ValueError):
    """A replay shard or directory cannot be used: missing, truncated, tampered or malformed.

    The message names the file and says what is wrong with it.
    """


class ReplayExistsError(ReplayError, FileExistsError):
    """A writer was asked to write a shard that already exists (shards are never overwritten)."""
