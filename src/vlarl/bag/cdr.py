"""A small, tolerant CDR reader for the few control-path message layouts the bag bridge needs.

Why not rosbags' deserializer: it insists that a buffer ends exactly where the message ends, and
the bytes ``rclpy``/Fast DDS put on the wire (which the recorder stores as they came) carry
alignment padding after the message, so rosbags refuses them ("CDR message size mismatch").
This reader parses the fields it needs front to back and ignores whatever follows; it is also
about ten times faster on a JointTrajectory because it stops after point 0.

Plain (X)CDR1 as ROS 2 uses it: a 4-byte encapsulation header (``00 01`` little endian, ``00 00``
big endian), then fields aligned to their own size relative to the end of that header; strings
are a uint32 length (counting the NUL) plus bytes; sequences a uint32 count plus elements.
Malformed or truncated input raises :class:`CdrError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np


class CdrError(ValueError):
    """The bytes are not a CDR message of the expected layout (truncated, corrupt)."""


_ENDIAN = {0: ">", 1: "<"}  # second byte of the encapsulation header: 0 = CDR_BE, 1 = CDR_LE
_F64_LE = np.dtype("<f8")
_F64_BE = np.dtype(">f8")


_U32 = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}
_I32 = {"<": struct.Struct("<i"), ">": struct.Struct(">i")}
_STRINGS_CACHE: dict[bytes, list[str]] = {}  # name lists repeat in every message of a topic
_STRINGS_CACHE_MAX = 256


class _Reader:
    __slots__ = ("buf", "end", "f64", "i32_", "pos", "u32_")

    def __init__(self, data: bytes | memoryview) -> None:
        buf = memoryview(data)
        if len(buf) < 4:
            raise CdrError(f"{len(buf)} bytes: too short for a CDR message")
        kind = buf[1]
        if buf[0] != 0 or kind not in _ENDIAN:
            raise CdrError(f"unsupported CDR encapsulation {bytes(buf[:2]).hex()}")
        fmt = _ENDIAN[kind]
        self.u32_ = _U32[fmt].unpack_from
        self.i32_ = _I32[fmt].unpack_from
        self.f64 = _F64_LE if fmt == "<" else _F64_BE
        self.buf = buf[4:]
        self.end = len(self.buf)
        self.pos = 0

    def u32(self) -> int:
        pos = self.pos + (-self.pos & 3)
        if pos + 4 > self.end:
            raise CdrError("message is truncated")
        self.pos = pos + 4
        return int(self.u32_(self.buf, pos)[0])

    def i32(self) -> int:
        pos = self.pos + (-self.pos & 3)
        if pos + 4 > self.end:
            raise CdrError("message is truncated")
        self.pos = pos + 4
        return int(self.i32_(self.buf, pos)[0])

    def string(self) -> str:
        size = self.u32()
        if size == 0:  # some writers encode "" as length 0
            return ""
        pos = self.pos
        if pos + size > self.end:
            raise CdrError("message is truncated")
        self.pos = pos + size
        try:
            return str(self.buf[pos : pos + size - 1], "utf-8")
        except UnicodeDecodeError as exc:
            raise CdrError(f"string is not UTF-8 ({exc})") from None

    def strings(self) -> list[str]:
        start = self.pos
        count = self.u32()
        if count > self.end:  # each string takes at least 4 bytes
            raise CdrError(f"sequence of {count} strings in a {self.end}-byte message")
        if count == 0:
            return []
        spans = []
        for _ in range(count):  # walk the lengths; decode only a sequence not seen before
            size = self.u32()
            if self.pos + size > self.end:
                raise CdrError("message is truncated")
            spans.append((self.pos, size))
            self.pos += size
        key = bytes(self.buf[start : self.pos])
        cached = _STRINGS_CACHE.get(key)
        if cached is None:
            try:
                cached = [str(self.buf[p : p + n - 1], "utf-8") if n else "" for p, n in spans]
            except UnicodeDecodeError as exc:
                raise CdrError(f"string is not UTF-8 ({exc})") from None
            if len(_STRINGS_CACHE) < _STRINGS_CACHE_MAX:
                _STRINGS_CACHE[key] = cached
        return list(cached)

    def f64s(self) -> np.ndarray:
        count = self.u32()
        if count == 0:
            return np.zeros(0, dtype=np.float64)
        pos = self.pos + (-self.pos & 7)
        if pos + 8 * count > self.end:
            raise CdrError("message is truncated")
        values = np.frombuffer(self.buf, dtype=self.f64, count=count, offset=pos)
        self.pos = pos + 8 * count
        return values.astype(np.float64)  # native order, and a copy that owns its memory

    def skip_f64s(self) -> None:
        count = self.u32()
        if count:
            pos = self.pos + (-self.pos & 7)
            if pos + 8 * count > self.end:
                raise CdrError("message is truncated")
            self.pos = pos + 8 * count

    def stamp_ns(self) -> int:
        sec = self.i32()
        nanosec = self.u32()
        return sec * 1_000_000_000 + nanosec


@dataclass(frozen=True, slots=True)
class JointStateFields:
    """What the bridge reads of a ``sensor_msgs/msg/JointState``."""

    stamp_ns: int
    frame_id: str
    name: list[str]
    position: np.ndarray  # float64


@dataclass(frozen=True, slots=True)
class TrajectoryHead:
    """What the bridge reads of a ``trajectory_msgs/msg/JointTrajectory``: header and point 0."""

    stamp_ns: int
    frame_id: str
    joint_names: list[str]
    points: int
    positions: np.ndarray  # point 0, float64 (empty without points)
    effort: np.ndarray  # point 0, float64 (may be empty)


def header(data: bytes | memoryview) -> tuple[int, str]:
    """(stamp ns, frame_id) of any message that starts with a ``std_msgs/Header``."""
    r = _Reader(data)
    return r.stamp_ns(), r.string()


def joint_state(data: bytes | memoryview) -> JointStateFields:
    """Header, ``name`` and ``position`` of a JointState (velocity/effort are not read)."""
    r = _Reader(data)
    stamp = r.stamp_ns()
    frame = r.string()
    names = r.strings()
    position = r.f64s()
    return JointStateFields(stamp, frame, names, position)


def trajectory_head(data: bytes | memoryview) -> TrajectoryHead:
    """Header, joint names, point count and point 0's positions/effort of a JointTrajectory."""
    r = _Reader(data)
    stamp = r.stamp_ns()
    frame = r.string()
    names = r.strings()
    count = r.u32()
    if count > r.end:
        raise CdrError(f"{count} trajectory points in a {r.end}-byte message")
    if count == 0:
        empty = np.zeros(0, dtype=np.float64)
        return TrajectoryHead(stamp, frame, names, 0, empty, empty)
    positions = r.f64s()
    r.skip_f64s()  # velocities
    r.skip_f64s()  # accelerations
    effort = r.f64s()
    return TrajectoryHead(stamp, frame, names, count, positions, effort)
