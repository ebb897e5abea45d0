"""Conversions between numpy and the standard message types used on the control path.

Layouts are documented in :mod:`vlarl.topics`. Unpacking validates shape and finiteness and
raises :class:`MessageError`, so nodes can count and drop malformed input in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from vlarl.topics import ACTION_NAMES


class MessageError(ValueError):
    """A message does not have the documented layout or holds non-finite numbers."""


def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def vector_msg(
    values: np.ndarray | Sequence[float],
    *,
    stamp: Time,
    frame_id: str = "",
    names: Sequence[str] = (),
) -> JointState:
    """A stamped float vector as ``sensor_msgs/JointState.position``."""
    msg = JointState()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    if names:
        msg.name = list(names)
    msg.position = np.asarray(values, dtype=np.float64).ravel().tolist()
    return msg


def vector_from_msg(msg: JointState, *, dim: int | None = None) -> np.ndarray:
    """The ``position`` vector of a JointState as float32; checks length and finiteness."""
    values = np.asarray(msg.position, dtype=np.float64)
    if dim is not None and values.shape != (dim,):
        raise MessageError(f"expected {dim} values, got {values.size}")
    if not np.all(np.isfinite(values)):
        raise MessageError("non-finite value in vector")
    return values.astype(np.float32)


def fields_msg(fields: Sequence[str], values: Sequence[float], *, stamp: Time) -> JointState:
    """A named record (reward, status) as JointState name/position."""
    if len(fields) != len(values):
        raise ValueError("fields and values differ in length")
    return vector_msg(values, stamp=stamp, names=fields)


def fields_from_msg(msg: JointState, fields: Sequence[str]) -> dict[str, float]:
    """Read a named record; every field must be present and finite."""
    record = dict(zip(msg.name, msg.position, strict=False))
    missing = [f for f in fields if f not in record]
    if missing:
        raise MessageError(f"missing fields: {', '.join(missing)}")
    out = {f: float(record[f]) for f in fields}
    if not all(np.isfinite(v) for v in out.values()):
        raise MessageError("non-finite field value")
    return out


def action_chunk_msg(
    base: np.ndarray,
    residual: np.ndarray,
    *,
    stamp: Time,
    version_tag: str,
    step_dt: float,
) -> JointTrajectory:
    """Policy output: ``base``/``residual`` are [steps, action_dim]; point 0 is this tick."""
    msg = JointTrajectory()
    msg.header.stamp = stamp
    msg.header.frame_id = version_tag
    msg.joint_names = list(ACTION_NAMES)
    base = np.asarray(base, dtype=np.float64)
    residual = np.asarray(residual, dtype=np.float64)
    points = []
    for i in range(base.shape[0]):
        point = JointTrajectoryPoint()
        point.positions = base[i].tolist()
        point.effort = residual[i].tolist()
        t = i * step_dt
        point.time_from_start = Duration(sec=int(t), nanosec=round((t % 1.0) * 1e9))
        points.append(point)
    msg.points = points
    return msg


class ActionChunkWriter:
    """Policy output like :func:`action_chunk_msg`, written into one reused message.

    The points and their ``time_from_start`` are built once (again only when the chunk grows or
    ``step_dt`` changes), so a control tick allocates no message objects. rclpy serializes a
    message inside ``publish()``, so the returned message may be published and then rewritten;
    it is valid until the next :meth:`write`.
    """

    def __init__(self) -> None:
        self._msg = JointTrajectory()
        self._msg.joint_names = list(ACTION_NAMES)
        self._points: list[JointTrajectoryPoint] = []
        self._step_dt: float | None = None

    def write(
        self,
        base: np.ndarray,
        residual: np.ndarray,
        *,
        stamp: Time,
        version_tag: str,
        step_dt: float,
    ) -> JointTrajectory:
        """The message for ``base``/``residual`` ([steps, action_dim]; point 0 is this tick)."""
        steps = base.shape[0]
        if residual.shape[0] != steps:
            raise ValueError(f"base has {steps} steps, residual {residual.shape[0]}")
        if step_dt != self._step_dt or steps > len(self._points):
            self._build_points(max(steps, len(self._points)), step_dt)
        base_rows = np.asarray(base, dtype=np.float64).tolist()
        residual_rows = np.asarray(residual, dtype=np.float64).tolist()
        points = self._points
        for i in range(steps):
            point = points[i]
            point.positions = base_rows[i]
            point.effort = residual_rows[i]
        msg = self._msg
        msg.header.stamp = stamp
        msg.header.frame_id = version_tag
        msg.points = points[:steps]
        return msg

    def _build_points(self, steps: int, step_dt: float) -> None:
        self._points = []
        for i in range(steps):
            point = JointTrajectoryPoint()
            t = i * step_dt
            point.time_from_start = Duration(sec=int(t), nanosec=round((t % 1.0) * 1e9))
            self._points.append(point)
        self._step_dt = step_dt


def action_point_from_msg(msg: JointTrajectory, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(base [A], residual [A]) of point ``index`` of a policy action message, validated.

    The cheap read of the safety node, which acts on point 0 (this tick) only: the joint names
    and that one point are checked (length, finiteness; an empty ``effort`` is a zero residual);
    the other points are not read. Raises :class:`MessageError` like
    :func:`action_chunk_from_msg`.
    """
    if list(msg.joint_names) != list(ACTION_NAMES):
        raise MessageError(f"joint_names must be {list(ACTION_NAMES)}, got {list(msg.joint_names)}")
    points = msg.points
    if len(points) <= index:
        raise MessageError(f"action chunk has {len(points)} points, point {index} is needed")
    point = points[index]
    dim = len(ACTION_NAMES)
    if len(point.positions) != dim:
        raise MessageError(f"point {index}: expected {dim} positions, got {len(point.positions)}")
    if len(point.effort) not in (0, dim):
        raise MessageError(f"point {index}: expected 0 or {dim} effort values")
    base = np.array(point.positions, dtype=np.float64)
    residual = np.array(point.effort, dtype=np.float64) if len(point.effort) else np.zeros(dim)
    if not (np.all(np.isfinite(base)) and np.all(np.isfinite(residual))):
        raise MessageError("non-finite value in action chunk")
    return base, residual


def action_chunk_from_msg(msg: JointTrajectory) -> tuple[np.ndarray, np.ndarray]:
    """(base [steps, A], residual [steps, A]) from a policy action message, validated.

    Raises :class:`MessageError` for an empty chunk, wrong joint names or lengths, or any
    non-finite number (NaN/inf never get past this function).
    """
    if list(msg.joint_names) != list(ACTION_NAMES):
        raise MessageError(f"joint_names must be {list(ACTION_NAMES)}, got {list(msg.joint_names)}")
    if len(msg.points) == 0:
        raise MessageError("action chunk has no points")
    dim = len(ACTION_NAMES)
    base = np.empty((len(msg.points), dim), dtype=np.float64)
    residual = np.zeros((len(msg.points), dim), dtype=np.float64)
    for i, point in enumerate(msg.points):
        if len(point.positions) != dim:
            raise MessageError(f"point {i}: expected {dim} positions, got {len(point.positions)}")
        base[i] = point.positions
        if len(point.effort) not in (0, dim):
            raise MessageError(f"point {i}: expected 0 or {dim} effort values")
        if len(point.effort):
            residual[i] = point.effort
    if not (np.all(np.isfinite(base)) and np.all(np.isfinite(residual))):
        raise MessageError("non-finite value in action chunk")
    return base, residual
