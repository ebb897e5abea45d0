"""The bridge's CDR reader against rosbags' serializer (both byte orders) and rclpy's bytes."""

from __future__ import annotations

import numpy as np
import pytest

from vlarl.bag import cdr
from vlarl.bag.writer import default_typestore

TS = default_typestore()
T = TS.types


def _joint_state(stamp: int, frame: str, names: list[str], position: np.ndarray) -> object:
    return T["sensor_msgs/msg/JointState"](
        header=T["std_msgs/msg/Header"](
            stamp=T["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9),
            frame_id=frame,
        ),
        name=names,
        position=position,
        velocity=np.zeros(0),
        effort=np.arange(3.0),
    )


@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize("n", [0, 1, 4, 39])
def test_joint_state(little_endian: bool, n: int) -> None:
    stamp = 1_700_000_123_456_789_012
    position = np.linspace(-1, 1, n)
    names = [f"j{i}" * (i % 3) for i in range(n)]  # empty and odd-length strings: alignment
    msg = _joint_state(stamp, "st" * (n % 3), names, position)
    data = bytes(TS.serialize_cdr(msg, "sensor_msgs/msg/JointState", little_endian=little_endian))
    js = cdr.joint_state(data)
    assert js.stamp_ns == stamp and js.frame_id == "st" * (n % 3) and js.name == names
    assert np.array_equal(js.position, position) and js.position.dtype == np.float64
    assert cdr.header(data) == (stamp, "st" * (n % 3))
    with pytest.raises(cdr.CdrError):
        cdr.joint_state(data[: 4 + 8 + len(data) // 3] if n else data[:10])


def test_trajectory_head_reads_point_zero() -> None:
    point_t = T["trajectory_msgs/msg/JointTrajectoryPoint"]
    duration_t = T["builtin_interfaces/msg/Duration"]
    points = [
        point_t(
            positions=np.full(4, 0.1 * k),
            velocities=np.zeros(0 if k else 4),
            accelerations=np.zeros(0),
            effort=np.full(4, -0.01 * (k + 1)),
            time_from_start=duration_t(sec=0, nanosec=12_500_000 * k),
        )
        for k in range(5)
    ]
    msg = T["trajectory_msgs/msg/JointTrajectory"](
        header=T["std_msgs/msg/Header"](
            stamp=T["builtin_interfaces/msg/Time"](sec=5, nanosec=6), frame_id="m@1+r@2"
        ),
        joint_names=["dx", "dy", "dz", "gripper"],
        points=points,
    )
    head = cdr.trajectory_head(bytes(TS.serialize_cdr(msg, "trajectory_msgs/msg/JointTrajectory")))
    assert head.stamp_ns == 5_000_000_006 and head.frame_id == "m@1+r@2" and head.points == 5
    assert head.joint_names == ["dx", "dy", "dz", "gripper"]
    assert head.positions.tolist() == [0.0] * 4 and head.effort.tolist() == [-0.01] * 4


def test_rclpy_bytes_with_trailing_padding() -> None:
    """What the recorder stores (Fast DDS bytes) has padding rosbags' deserializer refuses."""
    pytest.importorskip("rclpy")
    from rclpy.serialization import serialize_message

    from vlarl.ros.msgs import action_chunk_msg, ns_to_stamp, vector_msg

    raw = bytes(serialize_message(vector_msg([0.5, 1.5], stamp=ns_to_stamp(7), frame_id="x")))
    js = cdr.joint_state(raw)
    assert js.stamp_ns == 7 and js.frame_id == "x" and js.position.tolist() == [0.5, 1.5]
    chunk = action_chunk_msg(
        np.ones((3, 4)), np.full((3, 4), 0.25), stamp=ns_to_stamp(9), version_tag="v", step_dt=0.1
    )
    head = cdr.trajectory_head(bytes(serialize_message(chunk)))
    assert head.points == 3 and head.effort.tolist() == [0.25] * 4


def test_garbage_is_refused() -> None:
    with pytest.raises(cdr.CdrError):
        cdr.joint_state(b"\x00\x01")
    with pytest.raises(cdr.CdrError):
        cdr.joint_state(b"\x07\x07\x00\x00" + bytes(40))
    with pytest.raises(cdr.CdrError):  # a string longer than the message
        cdr.joint_state(b"\x00\x01\x00\x00" + bytes(8) + b"\xff\xff\x00\x00")
