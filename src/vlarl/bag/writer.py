"""A rosbag2 writer that splits by duration and size and survives being killed.

:class:`SplitBagWriter` writes a rosbag2 directory the way ``ros2 bag record`` lays one out::

    <bag>/metadata.yaml
    <bag>/<bag>_0.mcap
    <bag>/<bag>_1.mcap
    ...

Each split is written with ``rosbags.rosbag2.Writer`` (real mcap or sqlite3 storage, message
definitions and RIHS01 type hashes embedded) into a staging folder ``<bag>/.partial/<bag>_<k>/``;
when the split closes (its duration or size limit is reached, or the writer closes) the finished
file moves into the bag directory and ``metadata.yaml`` is rewritten atomically (temp file +
rename) to list every closed split. A recorder that is SIGKILLed therefore leaves a bag whose
``metadata.yaml`` lists exactly the closed splits, all complete and readable.

The open split (in ``.partial/``) is not lost either (mcap): its pending chunk is written out and
handed to the OS at least every ``flush_period_s`` (0.25 s by default; :meth:`SplitBagWriter.write`
and :meth:`SplitBagWriter.flush_if_due`, which a recorder calls from a timer for quiet topics),
so a SIGKILL loses at most that long of messages per topic (plus whatever the process had not
yet taken from DDS: its receive delay, on a loaded machine the larger part). Every chunk
carries a CRC32 of its records (rosbags writes 0 there), so salvage
(:func:`vlarl.bag.splits.read_split`) keeps each intact chunk of an unclosed or damaged split
and stops at the first damaged one.

Messages arrive already serialized (CDR bytes, e.g. from an rclpy subscription with
``raw=True``): the writer never deserializes. Not thread-safe: call it from one thread.
"""

from __future__ import annotations

import os
import shutil
import time
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from rosbags.interfaces import Connection, Qos
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.storage_mcap import McapWriter, PendingChunk
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from vlarl.bag.errors import BagClosedError, BagError, BagExistsError, UnknownTopicError
from vlarl.bag.metadata import (
    METADATA_VERSION,
    STORAGE_EXTENSIONS,
    FileRecord,
    TopicRecord,
    build_metadata,
)

PARTIAL_DIR = ".partial"
"""Staging folder (inside the bag) of the split being written."""

RECORD_OVERHEAD_BYTES = 47
"""Bytes an mcap message costs besides its payload (record header + message-index entry)."""

DEFAULT_FLUSH_PERIOD_S = 0.25
"""How often the open split's pending mcap chunk is written out (bounds what a SIGKILL loses)."""

_PLUGINS = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


class _CrcMcapWriter(McapWriter):
    """rosbags' mcap storage with a CRC32 over each chunk's records (the mcap spec's
    ``uncompressed_crc``; rosbags writes 0 = none), so salvage can tell an intact chunk from a
    damaged one. Otherwise the same bytes as rosbags' ``close_chunk``."""

    def close_chunk(self) -> None:
        from rosbags.rosbag2.storage_mcap import (
            write_record,
            write_string,
            write_uint16,
            write_uint32,
            write_uint64,
        )

        chunk = self.chunk
        records = chunk.bio.getvalue()
        rec = BytesIO()
        write_uint64(rec, chunk.message_start_time)
        write_uint64(rec, chunk.message_end_time)
        write_uint64(rec, len(records))
        write_uint32(rec, zlib.crc32(records))
        compressed = self.compressor(records)
        write_string(rec, self.compression)
        write_uint64(rec, len(compressed))
        rec.write(compressed)
        chunk_start = self.bio.tell()
        write_record(self.bio, 0x06, rec)
        chunk_end = self.bio.tell()
        offsets: list[tuple[int, int]] = []
        for cid, msgs in chunk.msgs.items():
            offsets.append((cid, self.bio.tell()))
            rec = BytesIO()
            write_uint16(rec, cid)
            write_uint32(rec, len(msgs) * 16)
            for ts, offset in msgs:
                write_uint64(rec, ts)
                write_uint64(rec, offset)
            write_record(self.bio, 0x07, rec)
        rec = BytesIO()
        write_uint64(rec, chunk.message_start_time)
        write_uint64(rec, chunk.message_end_time)
        write_uint64(rec, chunk_start)
        write_uint64(rec, chunk_end - chunk_start)
        write_uint32(rec, len(offsets) * 10)
        for cid, offset in offsets:
            write_uint16(rec, cid)
            write_uint64(rec, offset)
        write_uint64(rec, self.bio.tell() - chunk_end)
        write_string(rec, self.compression)
        write_uint64(rec, len(compressed))
        write_uint64(rec, len(records))
        self.chunks.append(rec)
        self.chunk = PendingChunk(2**63 - 1, 0, BytesIO(), defaultdict(list))

    def flush_chunk(self) -> bool:
        """Write the pending chunk (if any) and hand the file's bytes to the OS."""
        wrote = self.chunk.bio.tell() > 0
        if wrote:
            self.close_chunk()
        self.bio.flush()
        return wrote


class _Rosbag2Writer(Writer):
    STORAGE_PLUGINS: Mapping[StoragePlugin, type[Any]] = {
        **Writer.STORAGE_PLUGINS,
        StoragePlugin.MCAP: _CrcMcapWriter,
    }


@cache
def default_typestore() -> Typestore:
    """rosbags' type store for ROS 2 Kilted (definitions and hashes match the rclpy wheels)."""
    return get_typestore(Stores.ROS2_KILTED)


def ros2_type_name(msg_type: str) -> str:
    """``pkg/Type`` or ``pkg/msg/Type`` as rosbag2 names it: ``pkg/msg/Type``."""
    parts = msg_type.strip().split("/")
    if len(parts) == 2 and all(parts):
        return f"{parts[0]}/msg/{parts[1]}"
    if len(parts) == 3 and all(parts):
        return msg_type.strip()
    raise UnknownTopicError(f"not a message type name: {msg_type!r}")


@dataclass
class _Topic:
    record: TopicRecord
    msgdef: str


@dataclass
class _OpenSplit:
    index: int
    stage: Path
    writer: Writer
    connections: dict[str, Connection]
    start_ns: int
    end_ns: int
    count: int = 0
    size: int = 0
    topic_counts: dict[str, int] = field(default_factory=dict)


class SplitBagWriter:
    """Write serialized messages to a split rosbag2 directory (see the module docs)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_duration_s: float = 0.0,
        max_bytes: int = 0,
        storage: str = "mcap",
        typestore: Typestore | None = None,
        ros_distro: str = "kilted",
        custom_data: Mapping[str, str] | None = None,
        fsync: bool = True,
        flush_period_s: float = DEFAULT_FLUSH_PERIOD_S,
    ) -> None:
        """Create the bag directory ``path`` (which must not exist) and an empty metadata.yaml.

        ``max_duration_s``/``max_bytes`` close a split once its messages span that long / once
        the next message would take it past that many bytes (0 = no limit). ``storage`` is
        ``mcap`` (default, like ``ros2 bag record``) or ``sqlite3``. ``fsync`` flushes each closed
        split and metadata.yaml to disk before it is listed. ``flush_period_s`` (mcap) writes the
        open split's pending chunk out at least this often (0: only when it fills, 1 MiB).
        """
        self.path = Path(path)
        if storage not in _PLUGINS:
            raise BagError(f"storage must be one of {', '.join(_PLUGINS)}, got {storage!r}")
        if not (max_duration_s >= 0.0) or max_bytes < 0:
            raise BagError("split limits must be >= 0 (0 = no limit)")
        if not (flush_period_s >= 0.0):
            raise BagError("flush_period_s must be >= 0 (0 = flush only full chunks)")
        if self.path.exists() or self.path.is_symlink():
            raise BagExistsError(f"{self.path} exists already; refusing to overwrite a bag")
        try:
            self.path.mkdir(parents=True)
        except FileExistsError:
            raise BagExistsError(
                f"{self.path} exists already; refusing to overwrite a bag"
            ) from None
        self.name = self.path.name
        self.storage = storage
        self.max_duration_ns = round(max_duration_s * 1e9)
        self.max_bytes = int(max_bytes)
        self.ros_distro = ros_distro
        self.custom_data = dict(custom_data) if custom_data else None
        self.fsync = fsync
        self.flush_period_s = float(flush_period_s)
        self._last_flush = time.monotonic()
        self._typestore = typestore
        self._topics: dict[str, _Topic] = {}
        self._files: list[FileRecord] = []
        self._split: _OpenSplit | None = None
        self._next_index = 0
        self._written = 0
        self._written_by_topic: dict[str, int] = {}
        self._closed = False
        self._write_metadata()

    # ------------------------------------------------------------------ topics
    def add_topic(
        self,
        topic: str,
        msgtype: str,
        *,
        offered_qos: Sequence[Qos] = (),
        msgdef: str | None = None,
        type_hash: str | None = None,
        serialization_format: str = "cdr",
    ) -> None:
        """Register a topic before its first message.

        ``msgtype`` is ``pkg/msg/Type`` (``pkg/Type`` is accepted). The message definition and
        RIHS01 hash come from the type store unless given. Adding a topic again with the same
        type is a no-op; with another type it is an error.
        """
        self._check_open()
        msgtype = ros2_type_name(msgtype)
        known = self._topics.get(topic)
        if known is not None:
            if known.record.msgtype != msgtype:
                raise BagError(
                    f"topic {topic} is recorded as {known.record.msgtype}, not {msgtype}"
                )
            return
        if msgdef is None or type_hash is None:
            store = self._typestore or default_typestore()
            try:
                msgdef, _ = store.generate_msgdef(msgtype, ros_version=2)
                type_hash = store.hash_rihs01(msgtype)
            except Exception as exc:
                raise UnknownTopicError(f"unknown message type {msgtype}: {exc}") from exc
        entry = _Topic(
            record=TopicRecord(
                name=topic,
                msgtype=msgtype,
                type_description_hash=type_hash,
                offered_qos=tuple(offered_qos),
                serialization_format=serialization_format,
            ),
            msgdef=msgdef,
        )
        self._topics[topic] = entry
        self._written_by_topic[topic] = 0
        if self._split is not None:
            self._split.connections[topic] = self._connect(self._split.writer, entry)

    def has_topic(self, topic: str) -> bool:
        return topic in self._topics

    # ------------------------------------------------------------------ writing
    def write(self, topic: str, timestamp_ns: int, data: bytes | memoryview) -> None:
        """Append one serialized message with log time ``timestamp_ns`` (ns since the epoch)."""
        if self._closed:
            raise BagClosedError(f"bag {self.path} is closed")
        split = self._split
        if topic not in self._topics:
            raise UnknownTopicError(f"topic {topic} was not added to bag {self.path}")
        size = len(data) + RECORD_OVERHEAD_BYTES
        if split is not None and (
            (self.max_duration_ns and timestamp_ns - split.start_ns >= self.max_duration_ns)
            or (self.max_bytes and split.size + size > self.max_bytes)
        ):
            self._close_split()
            split = None
        if split is None:
            split = self._open_split(timestamp_ns)
        split.writer.write(split.connections[topic], timestamp_ns, data)
        split.count += 1
        split.size += size
        split.topic_counts[topic] = split.topic_counts.get(topic, 0) + 1
        if timestamp_ns < split.start_ns:
            split.start_ns = timestamp_ns
        if timestamp_ns > split.end_ns:
            split.end_ns = timestamp_ns
        self._written += 1
        self._written_by_topic[topic] += 1
        self.flush_if_due()

    def flush_if_due(self, now_s: float | None = None) -> bool:
        """Write out the open split's pending chunk if ``flush_period_s`` passed since the last
        flush (``now_s``: ``time.monotonic()``). True if a chunk was written."""
        if not self.flush_period_s or self._closed or self._split is None:
            return False
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - self._last_flush < self.flush_period_s:
            return False
        return self.flush()

    def flush(self) -> bool:
        """Write the open split's pending chunk to its file now (mcap; a no-op for sqlite3)."""
        self._last_flush = time.monotonic()
        split = self._split
        if self._closed or split is None:
            return False
        storage = split.writer.storage
        return isinstance(storage, _CrcMcapWriter) and storage.flush_chunk()

    def rotate_if_due(self, now_ns: int) -> bool:
        """Close the open split if its duration limit passed at ``now_ns`` (for quiet topics)."""
        split = self._split
        if (
            self._closed
            or split is None
            or not self.max_duration_ns
            or now_ns - split.start_ns < self.max_duration_ns
        ):
            return False
        self._close_split()
        return True

    def split_now(self) -> bool:
        """Close the open split now (the next message opens a new one); False if none is open."""
        if self._closed or self._split is None:
            return False
        self._close_split()
        return True

    def close(self) -> None:
        """Close the open split and write the final metadata.yaml. Idempotent."""
        if self._closed:
            return
        try:
            if self._split is not None:
                self._close_split()
            self._write_metadata()
        finally:
            self._closed = True
        partial = self.path / PARTIAL_DIR
        if partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()

    # ------------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def message_count(self) -> int:
        """Messages written so far (closed splits and the open one)."""
        return self._written

    def topic_counts(self) -> dict[str, int]:
        """Messages written so far per topic."""
        return dict(self._written_by_topic)

    @property
    def files(self) -> list[FileRecord]:
        """The closed splits, in order."""
        return list(self._files)

    @property
    def metadata_path(self) -> Path:
        return self.path / "metadata.yaml"

    def __enter__(self) -> SplitBagWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()  # keep what was written, also on an error

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise BagClosedError(f"bag {self.path} is closed")

    def _connect(self, writer: Writer, topic: _Topic) -> Connection:
        rec = topic.record
        return writer.add_connection(
            rec.name,
            rec.msgtype,
            msgdef=topic.msgdef,
            rihs01=rec.type_description_hash,
            serialization_format=rec.serialization_format,
            offered_qos_profiles=list(rec.offered_qos),
        )

    def _open_split(self, first_ns: int) -> _OpenSplit:
        index = self._next_index
        self._next_index += 1
        stage = self.path / PARTIAL_DIR / f"{self.name}_{index}"
        if stage.exists():  # left over by nobody we know of: never write into it
            raise BagError(f"staging folder {stage} exists already")
        writer = _Rosbag2Writer(
            stage, version=METADATA_VERSION, storage_plugin=_PLUGINS[self.storage]
        )
        writer.open()
        connections = {name: self._connect(writer, topic) for name, topic in self._topics.items()}
        self._split = _OpenSplit(
            index=index,
            stage=stage,
            writer=writer,
            connections=connections,
            start_ns=first_ns,
            end_ns=first_ns,
        )
        return self._split

    def _close_split(self) -> None:
        split = self._split
        assert split is not None
        self._split = None
        split.writer.close()
        produced = [p for p in split.stage.iterdir() if p.name != "metadata.yaml"]
        if len(produced) != 1:
            raise BagError(f"expected one storage file in {split.stage}, found {produced}")
        target = self.path / f"{self.name}_{split.index}{STORAGE_EXTENSIONS[self.storage]}"
        if self.fsync:
            _fsync_file(produced[0])
        os.replace(produced[0], target)
        shutil.rmtree(split.stage, ignore_errors=True)
        self._files.append(
            FileRecord(
                path=target.name,
                starting_time_ns=split.start_ns,
                duration_ns=split.end_ns - split.start_ns,
                message_count=split.count,
                topic_counts=dict(split.topic_counts),
            )
        )
        for name, count in split.topic_counts.items():
            self._topics[name].record.message_count += count
        self._write_metadata()

    def _write_metadata(self) -> None:
        document = build_metadata(
            storage=self.storage,
            topics=[t.record for t in self._topics.values()],
            files=self._files,
            ros_distro=self.ros_distro,
            custom_data=self.custom_data,
        )
        text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
        tmp = self.path / ".metadata.yaml.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, self.metadata_path)
        if self.fsync:
            _fsync_dir(self.path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
