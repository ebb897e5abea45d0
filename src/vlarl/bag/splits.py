"""The storage files (splits) of rosbag2 bags: which exist, which are closed, and reading one.

A bag is a directory (``metadata.yaml`` + ``<name>_<k>.mcap|.db3`` splits, as both the vlarl
recorder and stock ``ros2 bag record`` write it) or a single ``.mcap``/``.db3`` file.

rosbag2's compression is read as it writes it: ``--compression-mode file`` leaves each closed
split zstd-compressed under the name ``<split>.mcap.zstd`` / ``<split>.db3.zstd`` (decompressed
into a temporary file to be read), ``--compression-mode message`` compresses every message's
CDR bytes with zstd (each message that starts with a zstd frame is decompressed; CDR never
starts that way, so this needs no metadata and works for a single storage file too). Message
types spelled ``pkg/Type`` (older rosbag2 and its own test bags) are read as ``pkg/msg/Type``.

Closed splits: the vlarl recorder lists a split in ``metadata.yaml`` the moment it closes (the
open split lives in ``.partial/`` until then) and removes ``.partial/`` when the bag is closed.
Stock ``ros2 bag record`` writes the open split in the bag directory itself; a split is closed
once a later split exists, and metadata.yaml lists every split when the bag is closed. So:
closed = listed in metadata.yaml, or followed by a later split file; the bag is finished when
metadata.yaml lists every split file and there is no ``.partial/``.

:func:`read_split` reads one split on its own (rosbags' reader for a single storage file); a
split that cannot be read is reported with a readable reason, and for mcap files every intact
chunk before the damage is salvaged with a sequential scan (mcap's stream reader, chunk CRCs
checked: the vlarl writer puts one on every chunk and writes the open split's chunks out at
least every ``flush_period_s``, 0.25 s by default).

Open splits: a vlarl bag whose recorder was killed keeps its open split in
``.partial/<name>_<k>/``; :func:`bag_layout` lists it (``open``, also in ``splits`` after the
closed ones) and says in its notes that the bag was not closed.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vlarl.bag.errors import MetadataError, UnknownTopicError
from vlarl.bag.metadata import load_metadata_file
from vlarl.bag.writer import PARTIAL_DIR, ros2_type_name

STORAGE_SUFFIXES = (".mcap", ".db3")
COMPRESSED_SUFFIX = ".zstd"
"""What rosbag2's file compression appends to a split's name (the only format it ships)."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SPLIT_NUMBER = re.compile(r"_(\d+)$")


@dataclass(frozen=True)
class BagLayout:
    """What a bag directory (or file) holds right now."""

    path: Path
    splits: list[Path]  # in split order
    closed: list[Path]  # the closed ones among them, in order
    finished: bool  # the recorder closed the bag (no more splits will come)
    missing: list[str] = field(default_factory=list)  # listed in metadata.yaml but absent
    notes: list[str] = field(default_factory=list)
    open: list[Path] = field(default_factory=list)  # open splits in .partial/ (vlarl recorder)


def storage_suffix(path: Path) -> str | None:
    """``.mcap``/``.db3`` for a storage file (file-compressed ones included), else None."""
    name = path.name
    if name.endswith(COMPRESSED_SUFFIX):
        name = name[: -len(COMPRESSED_SUFFIX)]
    suffix = Path(name).suffix
    return suffix if suffix in STORAGE_SUFFIXES else None


def is_storage_file(path: Path) -> bool:
    return storage_suffix(path) is not None and not path.name.startswith(".")


def normalize_msgtype(msgtype: str) -> str:
    """``pkg/Type`` -> ``pkg/msg/Type`` (both spellings name the same ROS 2 message); a name
    of another shape is kept as it is (it matches no type the bridge reads)."""
    try:
        return ros2_type_name(msgtype)
    except UnknownTopicError:
        return msgtype


def decompress_message(data: bytes) -> bytes:
    """A message's CDR bytes, zstd-decompressed first when rosbag2 compressed it."""
    if data[:4] != ZSTD_MAGIC:
        return data
    import zstandard

    return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31)


def is_bag(path: str | os.PathLike[str]) -> bool:
    """A storage file, or a directory with metadata.yaml or storage files in it."""
    path = Path(path)
    if path.is_file():
        return is_storage_file(path)
    if not path.is_dir():
        return False
    if (path / "metadata.yaml").is_file():
        return True
    return any(is_storage_file(p) and p.is_file() for p in path.iterdir())


def find_bags(root: str | os.PathLike[str]) -> list[Path]:
    """``root`` itself if it is a bag, else its sub-directories that are bags (sorted)."""
    root = Path(root)
    if is_bag(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_bag(p))


def _split_number(path: Path) -> int | None:
    suffix = storage_suffix(path)
    stem = path.name[: path.name.rindex(suffix)] if suffix else path.stem
    match = _SPLIT_NUMBER.search(stem)
    return int(match.group(1)) if match else None


def _listed_files(bag: Path) -> tuple[list[str] | None, str | None]:
    """File names metadata.yaml lists (None if it is missing or unreadable, with why)."""
    meta = bag / "metadata.yaml"
    if not meta.is_file():
        return None, None
    try:
        doc = load_metadata_file(meta)
        info = doc["rosbag2_bagfile_information"]
        paths = info.get("relative_file_paths") or []
        return [Path(str(p)).name for p in paths], None
    except MetadataError as exc:
        return None, f"unreadable: {exc}"
    except (KeyError, TypeError, AttributeError) as exc:
        return None, f"{meta}: unreadable ({exc})"


def split_id(name: str) -> str:
    """A split's name without rosbag2's file-compression suffix: the same split before and
    after ``--compression-mode file`` compressed it (what the bridge ledger records)."""
    return name[: -len(COMPRESSED_SUFFIX)] if name.endswith(COMPRESSED_SUFFIX) else name


def bag_layout(path: str | os.PathLike[str]) -> BagLayout:
    """The splits of a bag, which of them are closed, and whether the bag is finished."""
    bag = Path(path)
    if bag.is_file():
        return BagLayout(bag, [bag], [bag], finished=True)
    listed, problem = _listed_files(bag)
    notes = [problem] if problem else []
    on_disk: dict[str, Path] = {}
    for p in sorted(bag.iterdir(), key=lambda p: p.name):
        if is_storage_file(p) and p.is_file():
            # While rosbag2 compresses a closed split both files exist and only the plain one
            # is complete: prefer it (sorted order puts it first).
            on_disk.setdefault(split_id(p.name), p)
    listed_ids = [split_id(n) for n in listed or []]
    listed_name = dict(zip(listed_ids, listed or [], strict=True))
    order: dict[str, int] = {}
    for i, name in enumerate(listed_ids):
        order.setdefault(name, i)
    names = set(on_disk) | set(listed_ids)

    def key(name: str) -> tuple[int, int, str]:
        number = _split_number(Path(name))
        if number is not None:
            return (number, order.get(name, 0), name)
        return (order.get(name, 1 << 30), 0, name)

    ordered = sorted(names, key=key)
    missing = [listed_name.get(n, n) for n in ordered if n not in on_disk]
    splits = [on_disk[n] for n in ordered if n in on_disk]
    listed_set = set(listed_ids)
    closed: list[Path] = []
    for i, split in enumerate(splits):
        later = any(_split_number(s) is not None for s in splits[i + 1 :])
        if split_id(split.name) in listed_set or later:
            closed.append(split)
    partial = (bag / PARTIAL_DIR).exists()
    finished = listed is not None and not partial and all(n in listed_set for n in on_disk)
    if listed is None and not problem:
        notes.append(f"{bag}: no metadata.yaml; splits found by their file names")
    open_splits = _open_splits(bag, taken=set(on_disk) | set(listed or []))
    if open_splits:
        notes.append(
            f"{bag}: not closed (its recorder is still writing, or was stopped without closing "
            f"it); open split(s): " + ", ".join(str(p.relative_to(bag)) for p in open_splits)
        )
    return BagLayout(bag, splits + open_splits, closed, finished, missing, notes, open=open_splits)


def _open_splits(bag: Path, *, taken: set[str]) -> list[Path]:
    """Storage files in the vlarl writer's staging folder, in split order."""
    stage = bag / PARTIAL_DIR
    if not stage.is_dir():
        return []
    found: list[Path] = []
    try:
        for folder in stage.iterdir():
            if folder.is_dir() and not folder.is_symlink():
                found.extend(
                    p
                    for p in folder.iterdir()
                    if is_storage_file(p) and p.is_file() and p.name not in taken
                )
    except OSError:
        return []
    return sorted(found, key=lambda p: (_split_number(p) or 0, p.name))


def bag_topics(path: str | os.PathLike[str]) -> dict[str, str]:
    """Topic -> message type (``pkg/msg/Type``) a bag records: as metadata.yaml lists them,
    or, without a readable one (a recorder killed early, a single file), as its splits do."""
    bag = Path(path)
    found: dict[str, str] = {}
    meta = bag / "metadata.yaml"
    if bag.is_dir() and meta.is_file():
        try:
            doc = load_metadata_file(meta)
            for entry in doc["rosbag2_bagfile_information"]["topics_with_message_count"]:
                topic = entry["topic_metadata"]
                found[str(topic["name"])] = normalize_msgtype(str(topic["type"]))
        except (MetadataError, KeyError, TypeError, AttributeError):
            found = {}
        if found:
            return found
    from rosbags.rosbag2 import Reader

    for split in bag_layout(bag).splits:
        try:
            with storage_file(split) as plain, Reader(plain) as reader:
                for conn in reader.connections:
                    found.setdefault(conn.topic, normalize_msgtype(conn.msgtype))
        except Exception:  # a damaged split: the bridge reports it when it reads it
            continue
    return found


def newest_change(bag: str | os.PathLike[str]) -> float:
    """Newest modification time of the bag's files (and its staging folder), in seconds."""
    bag = Path(bag)
    times = [bag.stat().st_mtime]
    stack = [bag]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                times.append(entry.stat(follow_symlinks=False).st_mtime)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
            except OSError:
                continue
    return max(times)


@dataclass
class SplitRead:
    """The messages read from one split: (topic, log time ns, CDR bytes), in log-time order."""

    path: Path
    messages: list[tuple[str, int, bytes]]
    types: dict[str, str]  # topic -> message type, as the split records it
    error: str | None = None  # why the split could not be read in full
    salvaged: int = 0  # messages recovered from a damaged split


@contextmanager
def storage_file(path: Path) -> Iterator[Path]:
    """``path`` itself, or for a file-compressed split its decompressed copy (removed after)."""
    if not path.name.endswith(COMPRESSED_SUFFIX):
        yield path
        return
    import zstandard

    with tempfile.TemporaryDirectory(prefix="vlarl-split-") as tmp:
        plain = Path(tmp) / path.name[: -len(COMPRESSED_SUFFIX)]
        with open(path, "rb") as src, open(plain, "wb") as dst:
            zstandard.ZstdDecompressor().copy_stream(src, dst)
        yield plain


def read_split(path: Path, *, topics: Collection[str] | None = None) -> SplitRead:
    """Every message of ``topics`` (all when None) in one storage file.

    Never raises for a bad file: the error is returned, with the messages that could be
    salvaged before the damage (mcap only).
    """
    from rosbags.rosbag2 import Reader

    messages: list[tuple[str, int, bytes]] = []
    types: dict[str, str] = {}
    try:
        with storage_file(path) as plain, Reader(plain) as reader:
            types = {c.topic: normalize_msgtype(c.msgtype) for c in reader.connections}
            conns = [c for c in reader.connections if topics is None or c.topic in topics]
            if conns:
                for conn, timestamp, data in reader.messages(connections=conns):
                    messages.append((conn.topic, int(timestamp), decompress_message(data)))
        return SplitRead(path, messages, types)
    except Exception as exc:  # rosbags, zstandard raise several types for damaged files
        error = readable_error(path, exc)
    if path.suffix == ".mcap":
        salvaged, salvaged_types = _salvage_mcap(path, topics)
        if len(salvaged) > len(messages):
            messages, types = salvaged, salvaged_types or types
    return SplitRead(path, messages, types, error=error, salvaged=len(messages))


def readable_error(path: Path, exc: BaseException) -> str:
    """Why a split could not be read, in words (not e.g. "OverflowError: int too large")."""
    if path.parent.parent.name == PARTIAL_DIR:
        return "open split (its recorder was stopped before closing it): read to its last chunk"
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    if size == 0:
        return "empty file"
    text = str(exc).strip()
    if isinstance(exc, OverflowError | MemoryError | struct.error | IndexError):
        return "damaged: a size or offset field is out of range; not a complete mcap/db3 file"
    if type(exc).__name__ == "ReaderError" and text:
        return f"damaged or not a rosbag2 split: {text}"
    return f"damaged or not a rosbag2 split: {type(exc).__name__}" + (f": {text}" if text else "")


def _salvage_mcap(
    path: Path, topics: Collection[str] | None
) -> tuple[list[tuple[str, int, bytes]], dict[str, str]]:
    """Messages of an mcap file read front to back up to the first damaged record."""
    from mcap.records import Channel, Message, Schema
    from mcap.stream_reader import StreamReader

    schemas: dict[int, str] = {}
    channels: dict[int, tuple[str, str]] = {}
    out: list[tuple[str, int, bytes]] = []
    try:
        with open(path, "rb") as handle:
            # no record can be longer than the file: a garbage length fails fast, never allocates
            limit = max(1, min(1 << 30, os.fstat(handle.fileno()).st_size))
            reader = StreamReader(handle, validate_crcs=True, record_size_limit=limit)
            for record in reader.records:
                if isinstance(record, Schema):
                    schemas[record.id] = record.name
                elif isinstance(record, Channel):
                    channels[record.id] = (record.topic, schemas.get(record.schema_id, ""))
                elif isinstance(record, Message):
                    topic = channels.get(record.channel_id)
                    if topic is not None and (topics is None or topic[0] in topics):
                        data = decompress_message(bytes(record.data))
                        out.append((topic[0], int(record.log_time), data))
    except Exception:  # the damage: keep what came before it
        pass
    out.sort(key=lambda m: m[1])
    return out, {topic: normalize_msgtype(msgtype) for topic, msgtype in channels.values()}
