"""The recorder's topic list and QoS conversion (no ROS graph needed)."""

from __future__ import annotations

import pytest

from vlarl import topics
from vlarl.nodes.recorder import (
    DEFAULT_TOPICS,
    default_bag_name,
    message_class,
    plan_topics,
    to_bag_qos,
)


def test_default_topics_are_the_control_path() -> None:
    plans = plan_topics("", record_images=False)
    assert [p.name for p in plans] == list(DEFAULT_TOPICS)
    assert {p.name for p in plans} == {
        topics.TASK_STATE,
        topics.ROBOT_STATUS,
        topics.JOINT_STATES,
        topics.OBSERVATION,
        topics.POLICY_ACTION,
        topics.COMMAND,
        topics.SAFETY_STATUS,
        topics.REWARD,
        topics.EPISODE,
        topics.HUMAN_LABEL,
        topics.TELEOP,
        topics.LEARNER_GATE,
    }
    types = {p.name: p.msgtype for p in plans}
    assert types[topics.POLICY_ACTION] == "trajectory_msgs/msg/JointTrajectory"
    assert types[topics.TELEOP] == "geometry_msgs/msg/TwistStamped"
    with_images = plan_topics("", record_images=True)
    assert with_images[-1].name == topics.CAMERA_IMAGE
    assert with_images[-1].msgtype == "sensor_msgs/msg/Image"
    for plan in with_images:  # every type is installed as an rclpy message class
        assert message_class(plan.msgtype).__name__ == plan.msgtype.rsplit("/", 1)[1]


def test_explicit_topic_list() -> None:
    plans = plan_topics(
        " reward, /robot/status ,my/topic:std_msgs/String, reward", record_images=True
    )
    assert [(p.name, p.msgtype) for p in plans] == [
        ("reward", "sensor_msgs/msg/JointState"),
        ("/robot/status", "sensor_msgs/msg/JointState"),
        ("my/topic", "std_msgs/msg/String"),
    ]
    with pytest.raises(ValueError, match="not in the topic table"):
        plan_topics("unknown/topic", record_images=False)
    with pytest.raises(ValueError, match="not a message type"):
        plan_topics("x:String", record_images=False)
    with pytest.raises(ValueError, match="not installed"):
        message_class("no_such_pkg/msg/Nothing")


def test_qos_conversion_and_bag_name() -> None:
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    qos = to_bag_qos(QoSProfile(depth=7, reliability=ReliabilityPolicy.BEST_EFFORT))
    assert qos.depth == 7 and qos.reliability.name == "BEST_EFFORT"
    assert qos.history.name == "KEEP_LAST" and qos.durability.name == "VOLATILE"
    assert default_bag_name().startswith("vlarl-")
