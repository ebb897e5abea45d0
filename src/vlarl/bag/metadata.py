"""rosbag2's ``metadata.yaml``: build it for a split bag, and check one the way rosbag2 reads it.

The layout follows what rosbag2 itself writes and reads (``rosbag2_storage``'s YAML conversion,
metadata version 9, the version Jazzy, Kilted and Rolling write and the newest that rosbags
reads): one top-level key ``rosbag2_bagfile_information`` holding

- ``version`` (int), ``storage_identifier`` (``mcap`` | ``sqlite3``),
- ``duration: {nanoseconds}``, ``starting_time: {nanoseconds_since_epoch}``, ``message_count``,
- ``topics_with_message_count``: a list of ``{topic_metadata: {name, type,
  serialization_format, offered_qos_profiles, type_description_hash}, message_count}``; from
  version 9 on ``offered_qos_profiles`` is a YAML *sequence* of QoS maps whose policies are
  lower-case names (``reliable``, ``volatile``, ``automatic``, ...); before 9 it was a string,
- ``compression_format``, ``compression_mode`` (empty strings: no compression),
- ``relative_file_paths`` (file names relative to the bag directory),
- ``files``: per file ``{path, starting_time, duration, message_count}`` (version >= 5),
- ``custom_data`` (a string map or null, version >= 6), ``ros_distro`` (version >= 8).

:func:`check_metadata` applies the same required-key and type rules rosbag2's decoder applies,
so a file that passes it is one ``ros2 bag info`` can load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from rosbags.interfaces import Qos

from vlarl.bag.errors import MetadataError

METADATA_VERSION: Final[Literal[9]] = 9
"""The rosbag2 metadata version written: the current one (QoS as YAML maps, ros_distro)."""

STORAGE_EXTENSIONS = {"mcap": ".mcap", "sqlite3": ".db3"}

_QOS_KEYS = (
    "history",
    "depth",
    "reliability",
    "durability",
    "deadline",
    "lifespan",
    "liveliness",
    "liveliness_lease_duration",
    "avoid_ros_namespace_conventions",
)
# Names rmw's qos_string_conversions accept (what rosbag2 >= v9 decodes policies with).
_QOS_NAMES = {
    "history": {"system_default", "keep_last", "keep_all", "unknown"},
    "reliability": {"system_default", "reliable", "best_effort", "unknown", "best_available"},
    "durability": {"system_default", "transient_local", "volatile", "unknown", "best_available"},
    "liveliness": {"system_default", "automatic", "manual_by_topic", "unknown", "best_available"},
}

# Largest rmw enum value of each policy (liveliness skips the removed MANUAL_BY_NODE = 2).
_QOS_MAX = {"history": 3, "reliability": 4, "durability": 4, "liveliness": 5}


@dataclass
class TopicRecord:
    """A topic of the bag as rosbag2 describes it."""

    name: str
    msgtype: str
    type_description_hash: str
    offered_qos: Sequence[Qos] = ()
    serialization_format: str = "cdr"
    message_count: int = 0


@dataclass
class FileRecord:
    """One closed storage file (split) of the bag."""

    path: str
    starting_time_ns: int
    duration_ns: int
    message_count: int
    topic_counts: dict[str, int] = field(default_factory=dict)


def qos_to_yaml(qos: Qos) -> dict[str, Any]:
    """One QoS profile as version-9 metadata writes it (policy names, sec/nsec times)."""
    return {
        "history": qos.history.name.lower(),
        "depth": int(qos.depth),
        "reliability": qos.reliability.name.lower(),
        "durability": qos.durability.name.lower(),
        "deadline": {"sec": int(qos.deadline.sec), "nsec": int(qos.deadline.nsec)},
        "lifespan": {"sec": int(qos.lifespan.sec), "nsec": int(qos.lifespan.nsec)},
        "liveliness": qos.liveliness.name.lower(),
        "liveliness_lease_duration": {
            "sec": int(qos.liveliness_lease_duration.sec),
            "nsec": int(qos.liveliness_lease_duration.nsec),
        },
        "avoid_ros_namespace_conventions": bool(qos.avoid_ros_namespace_conventions),
    }


def build_metadata(
    *,
    storage: str,
    topics: Sequence[TopicRecord],
    files: Sequence[FileRecord],
    ros_distro: str,
    custom_data: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole ``metadata.yaml`` document for a bag made of ``files`` (closed splits only)."""
    if storage not in STORAGE_EXTENSIONS:
        raise MetadataError(f"unknown storage {storage!r}")
    counted = [f for f in files if f.message_count > 0]
    if counted:
        start = min(f.starting_time_ns for f in counted)
        end = max(f.starting_time_ns + f.duration_ns for f in counted)
    else:
        start = end = 0
    info: dict[str, Any] = {
        "version": METADATA_VERSION,
        "storage_identifier": storage,
        "duration": {"nanoseconds": int(end - start)},
        "starting_time": {"nanoseconds_since_epoch": int(start)},
        "message_count": int(sum(f.message_count for f in files)),
        "topics_with_message_count": [
            {
                "topic_metadata": {
                    "name": t.name,
                    "type": t.msgtype,
                    "serialization_format": t.serialization_format,
                    "offered_qos_profiles": [qos_to_yaml(q) for q in t.offered_qos],
                    "type_description_hash": t.type_description_hash,
                },
                "message_count": int(t.message_count),
            }
            for t in topics
        ],
        "compression_format": "",
        "compression_mode": "",
        "relative_file_paths": [f.path for f in files],
        "files": [
            {
                "path": f.path,
                "starting_time": {"nanoseconds_since_epoch": int(f.starting_time_ns)},
                "duration": {"nanoseconds": int(f.duration_ns)},
                "message_count": int(f.message_count),
            }
            for f in files
        ],
        "custom_data": dict(custom_data) if custom_data else None,
        "ros_distro": ros_distro,
    }
    return {"rosbag2_bagfile_information": info}


def _need(node: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(node, Mapping) or key not in node:
        raise MetadataError(f"{where}: missing key {key!r}")
    value = node[key]
    if kind is int and isinstance(value, bool):
        raise MetadataError(f"{where}.{key}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise MetadataError(f"{where}.{key}: expected {kind}, got {type(value).__name__}")
    return value


def _nonneg(node: Mapping[str, Any], key: str, inner: str, where: str) -> int:
    sub = _need(node, key, Mapping, where)
    value = _need(sub, inner, int, f"{where}.{key}")
    if value < 0:  # rosbag2 reads these as uint64
        raise MetadataError(f"{where}.{key}.{inner} must be >= 0")
    return int(value)


def _check_qos(profile: Any, where: str) -> None:
    if not isinstance(profile, Mapping):
        raise MetadataError(f"{where}: a QoS profile must be a map")
    for key in _QOS_KEYS:
        if key not in profile:
            raise MetadataError(f"{where}: missing key {key!r}")
    for key, names in _QOS_NAMES.items():
        value = profile[key]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _QOS_MAX[key]:
            continue  # the rmw enum value itself (rosbag2 reads those too)
        if value not in names:
            raise MetadataError(f"{where}.{key}: {value!r} is not one of {sorted(names)}")
    for key in ("deadline", "lifespan", "liveliness_lease_duration"):
        _need(profile[key], "sec", int, f"{where}.{key}")
        _need(profile[key], "nsec", int, f"{where}.{key}")
    _need(profile, "depth", int, where)
    _need(profile, "avoid_ros_namespace_conventions", bool, where)


def _uncompressed(name: str) -> str:
    """A split file's name without a compression suffix (``.zstd``: rosbag2's file mode)."""
    return name.rsplit("/", 1)[-1].removesuffix(".zstd")


def check_metadata(document: Any) -> dict[str, Any]:
    """Check a parsed ``metadata.yaml`` against rosbag2's decoding rules; return its info map.

    Raises :class:`MetadataError` naming the first key rosbag2 would fail on.
    """
    root = "rosbag2_bagfile_information"
    info = _need(document, root, Mapping, "metadata")
    version = _need(info, "version", int, root)
    if not 1 <= version <= METADATA_VERSION:
        raise MetadataError(f"{root}.version {version} is not one rosbag2 knows (1..9)")
    storage = _need(info, "storage_identifier", str, root)
    if storage not in STORAGE_EXTENSIONS:
        raise MetadataError(f"{root}.storage_identifier {storage!r} is not mcap or sqlite3")
    _nonneg(info, "duration", "nanoseconds", root)
    _nonneg(info, "starting_time", "nanoseconds_since_epoch", root)
    total = _need(info, "message_count", int, root)
    topics = _need(info, "topics_with_message_count", list, root)
    for i, entry in enumerate(topics):
        where = f"{root}.topics_with_message_count[{i}]"
        meta = _need(entry, "topic_metadata", Mapping, where)
        for key in ("name", "type", "serialization_format"):
            _need(meta, key, str, f"{where}.topic_metadata")
        if version >= 9:
            profiles = _need(meta, "offered_qos_profiles", list, f"{where}.topic_metadata")
            for j, profile in enumerate(profiles):
                _check_qos(profile, f"{where}.topic_metadata.offered_qos_profiles[{j}]")
        elif version >= 4:
            _need(meta, "offered_qos_profiles", str, f"{where}.topic_metadata")
        if version >= 7:
            _need(meta, "type_description_hash", str, f"{where}.topic_metadata")
        _need(entry, "message_count", int, where)
    if sum(int(t["message_count"]) for t in topics) != total:
        raise MetadataError(f"{root}: topics' message counts do not add up to message_count")
    paths = _need(info, "relative_file_paths", list, root)
    if not all(isinstance(p, str) for p in paths):
        raise MetadataError(f"{root}.relative_file_paths must be strings")
    if version >= 3:
        _need(info, "compression_format", str, root)
        _need(info, "compression_mode", str, root)
    if version >= 5:
        files = _need(info, "files", list, root)
        for i, entry in enumerate(files):
            where = f"{root}.files[{i}]"
            _need(entry, "path", str, where)
            _nonneg(entry, "starting_time", "nanoseconds_since_epoch", where)
            _nonneg(entry, "duration", "nanoseconds", where)
            _need(entry, "message_count", int, where)
        if sum(int(f["message_count"]) for f in files) != total:
            raise MetadataError(f"{root}: files' message counts do not add up to message_count")
        # With file compression one list may name a split before compression, the other after.
        if [_uncompressed(f["path"]) for f in files] != [_uncompressed(p) for p in paths]:
            raise MetadataError(f"{root}: files and relative_file_paths list different files")
    if version >= 6:
        if "custom_data" not in info:
            raise MetadataError(f"{root}: missing key 'custom_data'")
        custom = info["custom_data"]
        if custom is not None and not (
            isinstance(custom, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in custom.items())
        ):
            raise MetadataError(f"{root}.custom_data must be a map of strings (or null)")
    if version >= 8:
        _need(info, "ros_distro", str, root)
    return dict(info)


MAX_METADATA_BYTES = 16 * 1024 * 1024
"""Largest metadata.yaml read (a bag with 50,000 splits needs about 10 MB)."""

MAX_METADATA_EVENTS = 4_000_000
"""Most YAML events (scalars, maps, sequences) a metadata.yaml may hold."""


def parse_metadata_text(text: str, *, where: str = "metadata.yaml") -> Any:
    """Parse metadata.yaml text with bounded cost: anchors and aliases (what a YAML "billion
    laughs" bomb multiplies with; rosbag2 never writes them) and more than
    :data:`MAX_METADATA_EVENTS` events are refused before anything is built."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster on long lists
    if len(text) > MAX_METADATA_BYTES:
        raise MetadataError(f"{where}: larger than {MAX_METADATA_BYTES} bytes; not read")
    try:
        for count, event in enumerate(yaml.parse(text, Loader=loader)):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise MetadataError(
                    f"{where}: YAML anchors/aliases are not allowed in bag metadata; not read"
                )
            if count >= MAX_METADATA_EVENTS:
                raise MetadataError(f"{where}: over {MAX_METADATA_EVENTS} YAML nodes; not read")
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise MetadataError(f"{where}: not valid YAML ({exc})") from None


def load_metadata_file(path: str | os.PathLike[str]) -> Any:
    """Read and parse one metadata.yaml with bounded cost (see :func:`parse_metadata_text`);
    the size is checked before the file is read."""
    where = str(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_METADATA_BYTES:
                raise MetadataError(f"{where}: larger than {MAX_METADATA_BYTES} bytes; not read")
            raw = handle.read(size + 1)
    except OSError as exc:
        raise MetadataError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise MetadataError(f"{where}: larger than {MAX_METADATA_BYTES} bytes; not read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MetadataError(f"{where}: not UTF-8 text") from None
    return parse_metadata_text(text, where=where)
