"""vlarl.ros.msgs: the reused action message and the point-0 read of the safety node."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from trajectory_msgs.msg import JointTrajectory

from vlarl.ros.msgs import (
    ActionChunkWriter,
    MessageError,
    action_chunk_from_msg,
    action_chunk_msg,
    action_point_from_msg,
    ns_to_stamp,
)
from vlarl.topics import ACTION_NAMES


def as_dict(msg: JointTrajectory) -> dict:
    return {
        "stamp": (msg.header.stamp.sec, msg.header.stamp.nanosec),
        "frame_id": msg.header.frame_id,
        "names": list(msg.joint_names),
        "points": [
            (
                list(p.positions),
                list(p.effort),
                (p.time_from_start.sec, p.time_from_start.nanosec),
            )
            for p in msg.points
        ],
    }


def test_writer_matches_action_chunk_msg_across_lengths_and_dt() -> None:
    rng = np.random.default_rng(0)
    writer = ActionChunkWriter()
    # Shrinking, growing and a new step_dt, as a replanning schedule and a model swap do.
    for steps, dt in [(8, 0.0125), (5, 0.0125), (8, 0.0125), (12, 0.0125), (3, 0.4), (16, 0.4)]:
        base = rng.uniform(-1, 1, size=(steps, 4)).astype(np.float32)
        residual = np.zeros_like(base)
        residual[0] = rng.uniform(-0.3, 0.3, size=4)
        stamp = ns_to_stamp(int(rng.integers(1, 2**60)))
        expected = action_chunk_msg(base, residual, stamp=stamp, version_tag="m@3", step_dt=dt)
        msg = writer.write(base, residual, stamp=stamp, version_tag="m@3", step_dt=dt)
        assert as_dict(msg) == as_dict(expected)
        # What goes on the wire is the same message.
        wire = deserialize_message(serialize_message(msg), JointTrajectory)
        assert as_dict(wire) == as_dict(expected)


def test_writer_refuses_mismatched_residual() -> None:
    with pytest.raises(ValueError, match="residual"):
        ActionChunkWriter().write(
            np.zeros((4, 4)), np.zeros((3, 4)), stamp=ns_to_stamp(1), version_tag="", step_dt=0.1
        )


def chunk(points: list[tuple[list[float], list[float]]], names=ACTION_NAMES) -> JointTrajectory:
    from trajectory_msgs.msg import JointTrajectoryPoint

    msg = JointTrajectory()
    msg.joint_names = list(names)
    out = []
    for positions, effort in points:
        p = JointTrajectoryPoint()
        p.positions = [float(v) for v in positions]
        p.effort = [float(v) for v in effort]
        out.append(p)
    msg.points = out
    return msg


def test_point_read_equals_row_of_the_full_read() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(-1, 1, size=(6, 4))
    residual = rng.uniform(-1, 1, size=(6, 4))
    msg = action_chunk_msg(base, residual, stamp=ns_to_stamp(5), version_tag="", step_dt=0.1)
    full_base, full_residual = action_chunk_from_msg(msg)
    for index in (0, 3, 5):
        b, r = action_point_from_msg(msg, index)
        np.testing.assert_array_equal(b, full_base[index])
        np.testing.assert_array_equal(r, full_residual[index])
        assert b.dtype == r.dtype == np.float64
    b, r = action_point_from_msg(chunk([([0.1, 0.2, 0.3, 0.4], [])]))  # no effort: zero residual
    np.testing.assert_array_equal(r, np.zeros(4))


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (chunk([]), "0 points"),
        (chunk([([0, 0, 0, 0], [])], names=("a", "b", "c", "d")), "joint_names"),
        (chunk([([0, 0, 0], [])]), "expected 4 positions"),
        (chunk([([0, 0, 0, 0], [0, 0])]), "0 or 4 effort"),
        (chunk([([math.nan, 0, 0, 0], [])]), "non-finite"),
        (chunk([([0, 0, 0, 0], [0, math.inf, 0, 0])]), "non-finite"),
    ],
)
def test_point_read_rejects_a_bad_point_zero(msg: JointTrajectory, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        action_point_from_msg(msg)


def test_point_read_ignores_later_points() -> None:
    """Only point 0 becomes a command, so only point 0 is read (the full read still refuses)."""
    msg = chunk([([0.1, 0, 0, 0], []), ([math.nan, 0, 0], [1.0])])
    base, _ = action_point_from_msg(msg)
    np.testing.assert_array_equal(base, [0.1, 0, 0, 0])
    with pytest.raises(MessageError):
        action_chunk_from_msg(msg)
    with pytest.raises(MessageError, match="point 1 is needed"):
        action_point_from_msg(chunk([([0, 0, 0, 0], [])]), 1)
