"""The reward and visualization nodes as real processes over DDS."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import numpy as np
import pytest

from vlarl.graph import wait_until
from vlarl.topics import (
    COMMAND,
    EPISODE,
    MARKERS,
    POLICY_ACTION,
    REWARD,
    REWARD_FIELDS,
    ROBOT_STATUS,
    ROBOT_STATUS_FIELDS,
    TASK_STATE,
)

pytestmark = pytest.mark.graph

READY_TIMEOUT = 20.0
T0_NS = 5_000 * 1_000_000_000


class Harness:
    """In-test node: publishes status/task state/command/action/reward, records what comes back."""

    def __init__(self, context: Any) -> None:
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory
        from visualization_msgs.msg import MarkerArray

        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=200, reliability=ReliabilityPolicy.RELIABLE
        )
        self.node = Node("reward_test", context=context)
        self.status_pub = self.node.create_publisher(JointState, ROBOT_STATUS, qos)
        self.task_pub = self.node.create_publisher(JointState, TASK_STATE, qos)
        self.command_pub = self.node.create_publisher(JointState, COMMAND, qos)
        self.action_pub = self.node.create_publisher(JointTrajectory, POLICY_ACTION, qos)
        self.reward_pub = self.node.create_publisher(JointState, REWARD, qos)
        self.lock = threading.Lock()
        self.rewards: list[tuple[int, dict[str, float]]] = []
        self.episodes: list[dict[str, Any]] = []
        self.markers: list[Any] = []
        self.reward_sub = self.node.create_subscription(JointState, REWARD, self._on_reward, qos)
        self.episode_sub = self.node.create_subscription(String, EPISODE, self._on_episode, 50)
        self.marker_sub = self.node.create_subscription(MarkerArray, MARKERS, self._on_markers, 10)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        # the context is shut down at the end of the test
        with contextlib.suppress(Exception):
            self.executor.spin()

    def _on_reward(self, msg: Any) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self.lock:
            self.rewards.append((stamp, dict(zip(msg.name, msg.position, strict=True))))

    def _on_episode(self, msg: Any) -> None:
        with self.lock:
            self.episodes.append(json.loads(msg.data))

    def _on_markers(self, msg: Any) -> None:
        with self.lock:
            self.markers.append(msg)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


def _vector(values: Any, *, stamp_ns: int, frame: str = "", names: Any = ()) -> Any:
    from vlarl.ros.msgs import ns_to_stamp, vector_msg

    return vector_msg(values, stamp=ns_to_stamp(stamp_ns), frame_id=frame, names=names)


def test_reward_node_rewards_and_episodes(start: Any, rclpy_context: Any) -> None:
    start("reward")
    h = Harness(rclpy_context)
    try:
        assert wait_until(
            lambda: (
                h.status_pub.get_subscription_count() > 0
                and h.task_pub.get_subscription_count() > 0
                and h.reward_sub.get_publisher_count() > 0
                and h.episode_sub.get_publisher_count() > 0
            ),
            timeout=READY_TIMEOUT,
        ), "reward node did not come up"
        state = np.zeros(39)
        # a simulator that is already running: task states before the first status of interest
        for k in range(25):
            h.task_pub.publish(_vector(state, stamp_ns=T0_NS - k, frame="pick-place-v3"))
            time.sleep(0.02)
        # (episode, step, success, terminal, truncated, env_reward); episode 2 misses its end
        script = [(0, k, 0, 0, 0, 0.5 * k) for k in range(1, 5)] + [(0, 5, 1, 1, 0, 9.0)]
        script += [(1, k, 0, 0, 0, 1.0) for k in range(1, 4)] + [(1, 4, 0, 0, 1, 1.0)]
        script += [(2, 1, 0, 0, 0, 0.0), (2, 2, 0, 0, 0, 0.0), (3, 1, 0, 0, 0, 0.0)]
        stamps = []
        for i, values in enumerate(script):
            stamp = T0_NS + (i + 1) * 12_500_000
            stamps.append(stamp)
            # as sim_robot does: the task state of the same tick, then the status
            h.task_pub.publish(_vector(state, stamp_ns=stamp, frame="pick-place-v3"))
            h.status_pub.publish(_vector(values, stamp_ns=stamp, names=ROBOT_STATUS_FIELDS))
            if i == 2:  # a lockstep re-send (same stamp): no second reward
                h.status_pub.publish(_vector(values, stamp_ns=stamp, names=ROBOT_STATUS_FIELDS))
            if i == 6:  # a malformed sample: dropped, no reward, nothing breaks
                h.status_pub.publish(_vector([1.0, 2.0], stamp_ns=stamp, names=["episode", "x"]))
        assert wait_until(
            lambda: len(h.rewards) >= len(script) and len(h.episodes) >= 3, timeout=10.0
        ), (len(h.rewards), h.episodes)
        time.sleep(0.2)
    finally:
        h.close()

    assert [s for s, _ in h.rewards] == stamps  # one reward per sample, stamped like it
    assert all(list(r) == list(REWARD_FIELDS) for _, r in h.rewards)
    rewards = [r["reward"] for _, r in h.rewards]
    assert rewards == [0.0, 0.0, 0.0, 0.0, 1.0] + [0.0] * 4 + [0.0, 0.0, 0.0]
    assert [r["terminal"] for _, r in h.rewards][4] == 1.0
    assert [r["truncated"] for _, r in h.rewards][8] == 1.0
    assert all(r["value"] == 0.0 for _, r in h.rewards)
    assert [(r["episode"], r["step"]) for _, r in h.rewards] == [(s[0], s[1]) for s in script]
    summaries = [
        {k: e[k] for k in ("episode", "task", "success", "steps", "return", "success_source")}
        for e in h.episodes
    ]
    assert summaries == [
        {"episode": 0, "task": "pick-place-v3", "success": True, "steps": 5, "return": 1.0,
         "success_source": "sim"},
        {"episode": 1, "task": "pick-place-v3", "success": False, "steps": 4, "return": 0.0,
         "success_source": "sim"},
        {"episode": 2, "task": "pick-place-v3", "success": False, "steps": 2, "return": 0.0,
         "success_source": "sim"},
    ]  # fmt: skip
    assert [e["end"] for e in h.episodes] == ["terminal", "truncated", "unterminated"]


def test_reward_node_refuses_unimplemented_success_source(start: Any) -> None:
    node = start("reward", success_source="detector")
    assert wait_until(lambda: not node.alive(), timeout=READY_TIMEOUT)
    assert node.process.returncode == 2
    log = node.log_path.read_text() if node.log_path else ""
    assert "success_source 'detector' is not implemented yet" in log


def test_visualization_publishes_markers(start: Any, rclpy_context: Any) -> None:
    from visualization_msgs.msg import Marker

    from vlarl.ros.msgs import action_chunk_msg, ns_to_stamp

    start("visualization", viz_rate_hz=20.0)
    h = Harness(rclpy_context)
    hand = np.array([0.1, 0.6, 0.2])
    state = np.zeros(39)
    state[0:3] = hand
    plan = np.tile([1.0, 0.0, -1.0, 1.0], (5, 1))
    residual = np.zeros((5, 4))
    residual[0] = [0.0, 0.5, 0.0, 0.0]
    tag = "student@2+residual@1"

    def complete() -> bool:
        with h.lock:
            arrays = list(h.markers)
        return any(
            len(a.markers) == 4 and all(m.action == Marker.ADD for m in a.markers) for a in arrays
        )

    try:
        assert wait_until(
            lambda: (
                h.marker_sub.get_publisher_count() > 0 and h.task_pub.get_subscription_count() > 0
            ),
            timeout=READY_TIMEOUT,
        ), "visualization node did not come up"
        deadline = time.monotonic() + 10.0
        while not complete() and time.monotonic() < deadline:
            stamp = ns_to_stamp(T0_NS)
            h.task_pub.publish(_vector(state, stamp_ns=T0_NS, frame="pick-place-v3"))
            h.command_pub.publish(
                _vector(
                    [0.5, 0.0, -0.5, 1.0],
                    stamp_ns=T0_NS,
                    frame=tag,
                    names=["dx", "dy", "dz", "gripper"],
                )
            )
            h.action_pub.publish(
                action_chunk_msg(plan, residual, stamp=stamp, version_tag=tag, step_dt=0.0125)
            )
            values = [0.0, 1.0, 0.3, 1.0, 0.0, 0.0, 5.0]
            h.reward_pub.publish(_vector(values, stamp_ns=T0_NS, names=REWARD_FIELDS))
            time.sleep(0.05)
        assert complete(), "no complete MarkerArray"
    finally:
        h.close()

    array = next(
        a for a in h.markers if len(a.markers) == 4 and all(m.action == 0 for m in a.markers)
    )
    by_ns = {m.ns: m for m in array.markers}
    assert all(m.header.frame_id == "world" for m in array.markers)
    arrow = by_ns["command"]
    assert arrow.type == Marker.ARROW
    np.testing.assert_allclose([arrow.points[0].x, arrow.points[0].y, arrow.points[0].z], hand)
    tip = [arrow.points[1].x, arrow.points[1].y, arrow.points[1].z]
    np.testing.assert_allclose(tip, hand + 0.1 * np.array([0.5, 0.0, -0.5]))
    line = by_ns["plan"]
    assert line.type == Marker.LINE_STRIP and len(line.points) == 6
    end = [line.points[-1].x, line.points[-1].y, line.points[-1].z]
    np.testing.assert_allclose(end, hand + 5 * 0.01 * np.array([1.0, 0.0, -1.0]))
    assert by_ns["residual"].type == Marker.ARROW
    text = by_ns["status"]
    assert text.type == Marker.TEXT_VIEW_FACING
    assert "value +0.30" in text.text and "success yes" in text.text and tag in text.text
