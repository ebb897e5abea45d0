"""Read rosbag2 bags back: ours and ``ros2 bag record``'s alike.

Works for a bag directory (mcap or sqlite3, one or many splits, with or without metadata.yaml)
or a single storage file, in rosbag2's stock layouts: file-compressed splits
(``*.mcap.zstd``/``*.db3.zstd``), message-compressed (zstd) messages, types spelled
``pkg/Type``. Messages come back as raw CDR bytes (:func:`read_messages`) or decoded into
rosbags' message classes (:func:`read_decoded`), ordered by log time across splits.

Each split file is read on its own (see :mod:`vlarl.bag.splits`), not through rosbags'
``AnyReader`` on the directory: that one matches storage and metadata.yaml connections by QoS,
so a stock bag whose metadata.yaml and storage disagree on QoS would read as empty. Errors of
the libraries underneath come out as :class:`~vlarl.bag.errors.BagError`.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Collection, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlarl.bag.errors import BagError
from vlarl.bag.metadata import check_metadata, load_metadata_file
from vlarl.bag.splits import (
    bag_layout,
    bag_topics,
    decompress_message,
    normalize_msgtype,
    storage_file,
)
from vlarl.bag.writer import default_typestore


@dataclass(frozen=True, slots=True)
class BagMessage:
    """One recorded message: topic, type (``pkg/msg/Type``), log time (ns) and CDR bytes."""

    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes


def _splits(path: str | os.PathLike[str]) -> list[Path]:
    bag = Path(path)
    if not bag.exists():
        raise BagError(f"no bag at {bag}")
    if (bag / "metadata.yaml").is_file():
        load_metadata_file(bag / "metadata.yaml")  # bounded: refuse a YAML bomb before rosbags
    layout = bag_layout(bag)
    # An open split (a recorder killed mid-write) is read by the bridge, which salvages it.
    splits = [split for split in layout.splits if split not in layout.open]
    if not splits and not (bag / "metadata.yaml").is_file():
        raise BagError(f"no bag at {bag}: no metadata.yaml, .mcap or .db3 files")
    return splits


def _split_messages(
    split: Path, stack: ExitStack, topics: Collection[str] | None, msgdefs: dict[str, Any]
) -> Iterator[BagMessage]:
    """The messages of one split (opened on ``stack``), in log-time order."""
    from rosbags.rosbag2 import Reader

    try:
        plain = stack.enter_context(storage_file(split))
        reader = stack.enter_context(Reader(plain))
    except Exception as err:  # rosbags and zstandard raise many types for unreadable files
        raise BagError(f"cannot open {split}: {type(err).__name__}: {err}") from err
    connections = [c for c in reader.connections if topics is None or c.topic in topics]
    for conn in connections:
        msgdefs.setdefault(normalize_msgtype(conn.msgtype), conn.msgdef)
    if not connections:
        return
    try:
        for conn, timestamp, data in reader.messages(connections=connections):
            yield BagMessage(
                conn.topic,
                normalize_msgtype(conn.msgtype),
                int(timestamp),
                decompress_message(bytes(data)),
            )
    except Exception as err:
        raise BagError(f"cannot read {split}: {type(err).__name__}: {err}") from err


def _messages(
    path: str | os.PathLike[str],
    topics: Collection[str] | None,
    msgdefs: dict[str, Any],
) -> Iterator[BagMessage]:
    splits = _splits(path)
    with ExitStack() as stack:
        streams = [_split_messages(s, stack, topics, msgdefs) for s in splits]
        yield from heapq.merge(*streams, key=lambda m: m.log_time_ns)


def read_messages(
    path: str | os.PathLike[str], *, topics: Collection[str] | None = None
) -> Iterator[BagMessage]:
    """Every message of the bag (or of ``topics``), in log-time order, as raw bytes."""
    return _messages(path, topics, {})


class _Decoder:
    """rosbags' Kilted type store, plus the types a bag defines itself (its msgdefs)."""

    def __init__(self, msgdefs: dict[str, Any]) -> None:
        self.typestore = default_typestore()
        self.msgdefs = msgdefs

    def decode(self, msgtype: str, data: bytes) -> Any:
        if msgtype not in self.typestore.types:
            self._register(msgtype)
        try:
            return self.typestore.deserialize_cdr(data, msgtype)
        except Exception as err:  # rosbags' serde raises several types for bad bytes
            raise BagError(f"cannot decode a {msgtype} message: {err}") from err

    def _register(self, msgtype: str) -> None:
        from rosbags.interfaces import MessageDefinitionFormat
        from rosbags.typesys import get_types_from_idl, get_types_from_msg

        msgdef = self.msgdefs.get(msgtype)
        if msgdef is None or msgdef.format == MessageDefinitionFormat.NONE:
            raise BagError(f"message type {msgtype} is unknown and the bag does not define it")
        try:
            if msgdef.format == MessageDefinitionFormat.MSG:
                types = get_types_from_msg(msgdef.data, msgtype)
            else:
                types = get_types_from_idl(msgdef.data)
            self.typestore.register(types)
        except Exception as err:
            raise BagError(f"cannot read the definition of {msgtype}: {err}") from err


def read_decoded(
    path: str | os.PathLike[str], *, topics: Collection[str] | None = None
) -> Iterator[tuple[str, int, Any]]:
    """(topic, log time ns, decoded message) for every message, in log-time order."""
    msgdefs: dict[str, Any] = {}
    decoder = _Decoder(msgdefs)
    for message in _messages(path, topics, msgdefs):
        yield message.topic, message.log_time_ns, decoder.decode(message.msgtype, message.data)


def topic_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Messages per topic, counted by reading every message back (not from the metadata)."""
    counts = dict.fromkeys(sorted(topic_types(path)), 0)
    for message in read_messages(path):
        counts[message.topic] = counts.get(message.topic, 0) + 1
    return counts


def topic_types(path: str | os.PathLike[str]) -> dict[str, str]:
    """Topic name -> message type (``pkg/msg/Type``) as the bag's splits record them."""
    from rosbags.rosbag2 import Reader

    types: dict[str, str] = {}
    for split in _splits(path):
        try:
            with storage_file(split) as plain, Reader(plain) as reader:
                for conn in reader.connections:
                    types.setdefault(conn.topic, normalize_msgtype(conn.msgtype))
        except Exception as err:
            raise BagError(f"cannot open {split}: {type(err).__name__}: {err}") from err
    for topic, msgtype in bag_topics(path).items():  # topics listed but without messages
        types.setdefault(topic, msgtype)
    return types


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``rosbag2_bagfile_information`` map of a bag directory, checked as rosbag2 reads it."""
    return check_metadata(load_metadata_file(Path(path) / "metadata.yaml"))
