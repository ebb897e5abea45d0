"""Errors of the bag package (writing and reading rosbag2 directories)."""

from __future__ import annotations


class BagError(RuntimeError):
    """A rosbag2 directory cannot be written or read as asked."""


class BagExistsError(BagError, FileExistsError):
    """The target bag path exists already; bags are never overwritten."""


class BagClosedError(BagError):
    """A write to a bag writer that was closed."""


class UnknownTopicError(BagError, KeyError):
    """A write to a topic that was never added to the bag (or an unknown message type)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MetadataError(BagError, ValueError):
    """A metadata.yaml that rosbag2 would not accept."""


class BridgeError(BagError):
    """The bag bridge cannot go on as asked (a replay directory it does not own, a ledger that
    cannot be read or was built with other settings, no bag at a path)."""
