"""visualization node: a MarkerArray for RViz of what the control loop is doing.

Subscribes ``safety/command``, ``policy/action``, ``robot/task_state`` (hand xyz =
position[0:3]) and ``reward`` (value, success), all raw and best effort: the callbacks only keep
the latest bytes, and the ``viz_rate_hz`` timer decodes the newest of each, so the control-rate
topics cost no deserialization here. The markers (command arrow at the end effector, planned
chunk, residual arrow, value/success/version text, frame ``world``) are built by the ROS-free
:func:`vlarl.core.markers.build_markers`; this module only converts them to messages.
"""

from __future__ import annotations

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from builtin_interfaces.msg import Duration  # noqa: E402
from geometry_msgs.msg import Point  # noqa: E402
from rclpy.clock import Clock, ClockType  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from vlarl import topics  # noqa: E402
from vlarl.core.markers import (  # noqa: E402
    ARROW,
    LINE_STRIP,
    TEXT,
    MarkerConfig,
    MarkerSpec,
    VizInputs,
    build_markers,
)
from vlarl.ros.msgs import (  # noqa: E402
    MessageError,
    action_chunk_from_msg,
    fields_from_msg,
    vector_from_msg,
)
from vlarl.ros.params import Param, declare  # noqa: E402

_D = MarkerConfig()
LATEST_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT
)
_KINDS = {ARROW: Marker.ARROW, LINE_STRIP: Marker.LINE_STRIP, TEXT: Marker.TEXT_VIEW_FACING}

PARAMS: tuple[Param, ...] = (
    Param("viz_rate_hz", 10.0, "marker publishing rate", low=0.1, high=100.0, read_only=True),
    Param("frame_id", _D.frame_id, "frame of the markers (Meta-World's world frame)"),
    Param("arrow_scale", _D.arrow_scale, "metres of arrow per unit action (command, residual)",
          low=0.0, high=10.0),
    Param("step_scale", _D.step_scale, "metres the hand moves per unit action per step "
          "(Meta-World: 1/100), for the planned chunk", low=0.0, high=1.0),
    Param("line_width", _D.line_width, "planned-chunk line width, m", low=1e-4, high=0.1),
    Param("text_height", _D.text_height, "text height, m", low=1e-3, high=1.0),
    Param("stale_after_s", 1.0, "inputs older than this are not drawn", low=0.01, high=60.0),
)  # fmt: skip


def to_marker(spec: MarkerSpec, *, frame_id: str, stamp: Any, lifetime_s: float) -> Marker:
    """One :class:`MarkerSpec` as a visualization_msgs/Marker."""
    marker = Marker()
    marker.header.frame_id = frame_id
    marker.header.stamp = stamp
    marker.ns = spec.ns
    marker.id = spec.id
    marker.type = _KINDS[spec.kind]
    if spec.action == "delete":
        marker.action = Marker.DELETE
        return marker
    marker.action = Marker.ADD
    marker.pose.orientation.w = 1.0
    marker.pose.position.x, marker.pose.position.y, marker.pose.position.z = spec.position
    marker.scale.x, marker.scale.y, marker.scale.z = spec.scale
    marker.color.r, marker.color.g, marker.color.b, marker.color.a = spec.color
    marker.points = [Point(x=p[0], y=p[1], z=p[2]) for p in spec.points]
    marker.text = spec.text
    sec = int(lifetime_s)
    marker.lifetime = Duration(sec=sec, nanosec=round((lifetime_s - sec) * 1e9))
    return marker


class VisualizationNode(Node):
    """Publishes the markers at ``viz_rate_hz`` (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("visualization", **kwargs)
        self._params = declare(self, PARAMS)
        self._latest: dict[str, tuple[float, bytes]] = {}
        self.bad_inputs = 0
        self.published = 0
        self._pub = self.create_publisher(MarkerArray, topics.MARKERS, 10)
        for topic in (topics.COMMAND, topics.TASK_STATE, topics.REWARD):
            self._listen(JointState, topic)
        self._listen(JointTrajectory, topics.POLICY_ACTION)
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(1.0 / self._params["viz_rate_hz"], self.publish_markers, clock=steady)

    def _listen(self, msg_type: Any, topic: str) -> None:
        def keep(data: bytes, topic: str = topic) -> None:
            self._latest[topic] = (time.monotonic(), data)

        self.create_subscription(msg_type, topic, keep, LATEST_QOS, raw=True)

    def _fresh(self, topic: str, msg_type: Any, now: float) -> Any | None:
        entry = self._latest.get(topic)
        if entry is None or now - entry[0] > self._params["stale_after_s"]:
            return None
        try:
            return deserialize_message(entry[1], msg_type)
        except Exception:
            self.bad_inputs += 1
            return None

    def inputs(self) -> VizInputs:
        """The latest fresh, valid inputs; malformed ones are counted and left out."""
        now = time.monotonic()
        fields: dict[str, Any] = {}
        task = self._fresh(topics.TASK_STATE, JointState, now)
        if task is not None and len(task.position) >= 3:
            hand = np.asarray(task.position[0:3], dtype=np.float64)
            if np.all(np.isfinite(hand)):
                fields["hand"] = hand
        command = self._fresh(topics.COMMAND, JointState, now)
        if command is not None:
            try:
                fields["command"] = vector_from_msg(command, dim=topics.ACTION_DIM)
                fields["command_tag"] = command.header.frame_id
            except MessageError:
                self.bad_inputs += 1
        action = self._fresh(topics.POLICY_ACTION, JointTrajectory, now)
        if action is not None:
            try:
                fields["plan"], fields["residual"] = action_chunk_from_msg(action)
                fields["version"] = action.header.frame_id
            except MessageError:
                self.bad_inputs += 1
        reward = self._fresh(topics.REWARD, JointState, now)
        if reward is not None:
            try:
                record = fields_from_msg(reward, ("value", "success"))
                fields["value"] = record["value"]
                fields["success"] = record["success"] >= 0.5
            except MessageError:
                self.bad_inputs += 1
        return VizInputs(**fields)

    def config(self) -> MarkerConfig:
        p = self._params
        return MarkerConfig(
            frame_id=p["frame_id"],
            arrow_scale=p["arrow_scale"],
            step_scale=p["step_scale"],
            line_width=p["line_width"],
            text_height=p["text_height"],
        )

    def publish_markers(self) -> None:
        config = self.config()
        stamp = self.get_clock().now().to_msg()
        array = MarkerArray()
        array.markers = [
            to_marker(spec, frame_id=config.frame_id, stamp=stamp, lifetime_s=config.lifetime_s)
            for spec in build_markers(self.inputs(), config)
        ]
        self._pub.publish(array)
        self.published += 1


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    from vlarl.ros.executors import run_node

    return run_node(VisualizationNode, name="visualization", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
