"""Read rosbag2 bags back with rosbags' ``AnyReader``: ours and ``ros2 bag record``'s alike.

Works for a bag directory (mcap or sqlite3, one or many splits, with metadata.yaml) or a single
storage file. Messages come back as raw CDR bytes (:func:`read_messages`) or decoded into
rosbags' message classes (:func:`read_decoded`), ordered by log time across splits.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosbags.highlevel import AnyReader

from vlarl.bag.errors import BagError
from vlarl.bag.metadata import check_metadata, load_metadata_file
from vlarl.bag.writer import default_typestore


@dataclass(frozen=True, slots=True)
class BagMessage:
    """One recorded message: topic, type (``pkg/msg/Type``), log time (ns) and CDR bytes."""

    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes


def _open(path: str | os.PathLike[str]) -> AnyReader:
    bag = Path(path)
    if not bag.exists():
        raise BagError(f"no bag at {bag}")
    if (bag / "metadata.yaml").is_file():
        load_metadata_file(bag / "metadata.yaml")  # bounded: refuse a YAML bomb before rosbags
    try:
        return AnyReader([bag], default_typestore=default_typestore())
    except Exception as exc:
        raise BagError(f"cannot open bag {bag}: {exc}") from exc


def read_messages(
    path: str | os.PathLike[str], *, topics: Collection[str] | None = None
) -> Iterator[BagMessage]:
    """Every message of the bag (or of ``topics``), in log-time order, as raw bytes."""
    reader = _open(path)
    with reader:
        connections = [c for c in reader.connections if topics is None or c.topic in topics]
        if not connections:
            return
        for connection, timestamp, data in reader.messages(connections=connections):
            yield BagMessage(connection.topic, connection.msgtype, int(timestamp), bytes(data))


def read_decoded(
    path: str | os.PathLike[str], *, topics: Collection[str] | None = None
) -> Iterator[tuple[str, int, Any]]:
    """(topic, log time ns, decoded message) for every message, in log-time order."""
    reader = _open(path)
    with reader:
        connections = [c for c in reader.connections if topics is None or c.topic in topics]
        if not connections:
            return
        for connection, timestamp, data in reader.messages(connections=connections):
            yield connection.topic, int(timestamp), reader.deserialize(data, connection.msgtype)


def topic_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Messages per topic, counted by reading every message back (not from the metadata)."""
    counts: dict[str, int] = {}
    reader = _open(path)
    with reader:
        for topic in sorted({c.topic for c in reader.connections}):
            counts[topic] = 0
        for connection, _, _ in reader.messages():
            counts[connection.topic] += 1
    return counts


def topic_types(path: str | os.PathLike[str]) -> dict[str, str]:
    """Topic name -> message type (``pkg/msg/Type``) as the bag records them."""
    reader = _open(path)
    with reader:
        return {c.topic: c.msgtype for c in reader.connections}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``rosbag2_bagfile_information`` map of a bag directory, checked as rosbag2 reads it."""
    return check_metadata(load_metadata_file(Path(path) / "metadata.yaml"))
