"""The recorder as a real process over DDS: every message into a split mcap bag, SIGKILL-safe."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlarl.bag.metadata import check_metadata
from vlarl.bag.reader import BagMessage, read_messages, read_metadata, topic_counts
from vlarl.bag.splits import bag_layout, read_split
from vlarl.graph import wait_until
from vlarl.topics import EPISODE, POLICY_ACTION, ROBOT_STATUS, ROBOT_STATUS_FIELDS, TELEOP

pytestmark = pytest.mark.graph

READY_TIMEOUT = 20.0


class Publishers:
    """An in-test node publishing on a few control-path topics (reliable, like the graph)."""

    def __init__(self, context: Any) -> None:
        from geometry_msgs.msg import TwistStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE
        )
        self.node = Node("recorder_test", context=context)
        self.pubs = {
            ROBOT_STATUS: self.node.create_publisher(JointState, ROBOT_STATUS, qos),
            POLICY_ACTION: self.node.create_publisher(JointTrajectory, POLICY_ACTION, qos),
            EPISODE: self.node.create_publisher(String, EPISODE, qos),
            TELEOP: self.node.create_publisher(TwistStamped, TELEOP, qos),
        }
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        # the context is shut down at the end of the test
        with contextlib.suppress(Exception):
            self.executor.spin()

    def matched(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in self.pubs.values())

    def publish_tick(self, i: int) -> dict[str, Any]:
        """One tick: status + action every time, teleop every 5th, episode every 50th."""
        from geometry_msgs.msg import TwistStamped
        from std_msgs.msg import String

        from vlarl.ros.msgs import action_chunk_msg, fields_msg, ns_to_stamp

        stamp = ns_to_stamp(1_000_000_000_000 + i * 12_500_000)
        sent: dict[str, Any] = {}
        status = fields_msg(ROBOT_STATUS_FIELDS, [i // 50, i % 50, 0.0, 0.0, 0.0, 0.1 * i],
                            stamp=stamp)  # fmt: skip
        sent[ROBOT_STATUS] = status
        base = [[0.01 * i, 0.0, -0.01 * i, 1.0]] * 4
        residual = [[0.0, 0.001 * i, 0.0, 0.0]] * 4
        sent[POLICY_ACTION] = action_chunk_msg(
            base, residual, stamp=stamp, version_tag=f"student@{i}+residual@0", step_dt=0.0125
        )
        if i % 5 == 0:
            twist = TwistStamped()
            twist.header.stamp = stamp
            twist.twist.linear.x = float(i)
            sent[TELEOP] = twist
        if i % 50 == 49:
            sent[EPISODE] = String(data=f'{{"episode": {i // 50}}}')
        for topic, msg in sent.items():
            self.pubs[topic].publish(msg)
        return sent

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


def _decode(msg: Any) -> Any:
    from geometry_msgs.msg import TwistStamped
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    classes = {
        "/" + ROBOT_STATUS: JointState,
        "/" + POLICY_ACTION: JointTrajectory,
        "/" + EPISODE: String,
        "/" + TELEOP: TwistStamped,
    }
    return deserialize_message(msg.data, classes[msg.topic])


def test_records_every_message_and_closes_on_ctrl_c(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    recorder = start(
        "recorder",
        output_dir=str(tmp_path),
        bag_name="run",
        split_size_mb=0.03,
        split_duration_s=0.0,
        fsync=False,
    )
    pubs = Publishers(rclpy_context)
    try:
        assert wait_until(pubs.matched, timeout=READY_TIMEOUT), "recorder did not subscribe"
        sent: dict[str, list[Any]] = {}
        for i in range(300):
            for topic, msg in pubs.publish_tick(i).items():
                sent.setdefault(topic, []).append(msg)
            time.sleep(0.001)
        time.sleep(0.3)
        assert recorder.stop(timeout=10.0) == 0
    finally:
        pubs.close()

    bag = tmp_path / "run"
    log = recorder.log_path.read_text() if recorder.log_path else ""
    assert f"recorder: bag {bag}" in log
    expected = {"/" + t: len(msgs) for t, msgs in sent.items()}
    assert topic_counts(bag) == expected  # every message, read back by rosbags
    got: dict[str, list[Any]] = {}
    for m in read_messages(bag):
        got.setdefault(m.topic, []).append(_decode(m))
    for topic, msgs in sent.items():
        assert got["/" + topic] == msgs  # identical content, in order
    info = read_metadata(bag)
    check_metadata(yaml.safe_load((bag / "metadata.yaml").read_text()))
    assert info["message_count"] == sum(expected.values())
    assert len(info["files"]) >= 3
    assert all(f["path"].endswith(".mcap") for f in info["files"])
    assert not (bag / ".partial").exists()
    topic_meta = {t["topic_metadata"]["name"]: t for t in info["topics_with_message_count"]}
    status_meta = topic_meta["/" + ROBOT_STATUS]["topic_metadata"]
    assert status_meta["type"] == "sensor_msgs/msg/JointState"
    assert status_meta["type_description_hash"].startswith("RIHS01_")
    assert status_meta["offered_qos_profiles"][0]["reliability"] == "reliable"


def test_sigkill_keeps_closed_splits_and_loses_under_a_second_of_the_open_one(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    """Issue 12, finding 6: a SIGKILLed recorder lost its whole open split (0 bytes on disk)."""
    recorder = start(
        "recorder",
        output_dir=str(tmp_path),
        bag_name="killed",
        split_size_mb=0.02,
        split_duration_s=0.0,
        fsync=False,
    )
    pubs = Publishers(rclpy_context)
    bag = tmp_path / "killed"

    def closed_splits() -> int:
        try:
            return len(yaml.safe_load((bag / "metadata.yaml").read_text())
                       ["rosbag2_bagfile_information"]["files"])  # fmt: skip
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            return 0

    try:
        assert wait_until(pubs.matched, timeout=READY_TIMEOUT), "recorder did not subscribe"
        i = 0
        deadline = time.monotonic() + 20.0
        while closed_splits() < 3 and time.monotonic() < deadline:
            pubs.publish_tick(i)
            i += 1
            time.sleep(0.001)
        # Slower, into splits that stay open for a while (20 kB is ~100 ticks): then kill.
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            pubs.publish_tick(i)
            i += 1
            time.sleep(0.02)
        killed_ns = time.time_ns()
        recorder.kill()
    finally:
        pubs.close()
    assert closed_splits() >= 3
    info = read_metadata(bag)
    assert sum(1 for _ in read_messages(bag)) == info["message_count"] > 0
    layout = bag_layout(bag)
    assert len(layout.open) == 1 and any("not closed" in n for n in layout.notes)
    salvaged = read_split(layout.open[0])
    assert salvaged.error is not None and "open split" in salvaged.error
    # Closed splits + the salvaged open split hold the first ticks, in order, without gaps,
    # up to less than a second before the kill.
    messages = [
        BagMessage(t, "", log, data)
        for p in layout.closed
        for t, log, data in read_split(p).messages
    ] + [BagMessage(t, "", log, data) for t, log, data in salvaged.messages]
    statuses = [_decode(m) for m in messages if m.topic == "/" + ROBOT_STATUS]
    steps = [round(s.position[5] / 0.1) for s in statuses]
    assert steps == list(range(len(steps)))
    assert len(steps) <= i
    last_ns = max(m.log_time_ns for m in messages if m.topic == "/" + ROBOT_STATUS)
    assert (killed_ns - last_ns) / 1e9 < 1.0


def test_refuses_to_overwrite_a_bag_or_record_unknown_types(start: Any, tmp_path: Path) -> None:
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    for overrides, reason in (
        ({"bag_name": "taken"}, "exists already"),
        ({"bag_name": "x", "topics": "a:foo/Bar"}, "no message definition"),
    ):  # one after the other: both log to logs/recorder.log
        node = start("recorder", output_dir=str(tmp_path), **overrides)
        assert wait_until(lambda node=node: not node.alive(), timeout=READY_TIMEOUT)
        assert node.process.returncode == 2
        assert reason in (node.log_path.read_text() if node.log_path else "")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "x").exists()  # refused before creating anything


def test_records_the_simulator_stream(start: Any, rclpy_context: Any, tmp_path: Path) -> None:
    """sim_robot (realtime, holding: no policy) + reward + recorder: the bag holds the sim's
    stream without gaps, a reward for every status stamp, and the episode summaries."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from std_msgs.msg import String

    episodes: list[str] = []
    node = Node("episode_watch", context=rclpy_context)
    node.create_subscription(String, EPISODE, lambda m: episodes.append(m.data), 10)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    recorder = start(
        "recorder",
        output_dir=str(tmp_path),
        bag_name="sim",
        record_images=True,
        split_duration_s=1.0,
        fsync=False,
    )
    start("reward")
    start("sim_robot", mode="realtime", max_episode_steps=40, camera_rate_hz=5.0, executor="single")
    try:
        deadline = time.monotonic() + 40.0
        while len(episodes) < 3 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
        assert len(episodes) >= 3, "no episodes from sim_robot + reward"
        assert recorder.stop(timeout=10.0) == 0
    finally:
        executor.shutdown()
        node.destroy_node()

    from vlarl.bag.reader import read_decoded

    bag = tmp_path / "sim"
    info = read_metadata(bag)
    assert len(info["files"]) >= 2  # split by duration
    status: list[tuple[int, int, int]] = []  # (stamp, episode, step)
    rewards: dict[int, Any] = {}
    summaries = []
    images = 0
    for topic, _, msg in read_decoded(bag):
        if topic == "/" + ROBOT_STATUS:
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            status.append((stamp, int(msg.position[0]), int(msg.position[1])))
        elif topic == "/reward":
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            rewards[stamp] = msg
        elif topic == "/" + EPISODE:
            summaries.append(json.loads(msg.data))
        elif topic == "/camera/image_raw":
            assert (msg.encoding, msg.width, msg.height) == ("rgb8", 84, 84)
            images += 1
    assert images > 0
    # no gaps: consecutive statuses advance by one step or start the next episode at step 0
    for (_, e0, s0), (_, e1, s1) in itertools.pairwise(status):
        assert (e1, s1) in ((e0, s0 + 1), (e0 + 1, 0)), ((e0, s0), (e1, s1))
    # a reward for every status stamp, except before the reward node had discovered the sim
    # (the sim starts publishing at once) and the last few still in flight at Ctrl-C
    has_reward = [s in rewards for s, _, _ in status]
    first = has_reward.index(True)
    last = len(has_reward) - 1 - has_reward[::-1].index(True)
    assert all(has_reward[first : last + 1]) and len(status) - 1 - last <= 3
    assert last - first + 1 >= 80
    full = [s for s in summaries if s["steps"] == 40]
    assert len(full) >= 1 and all(not s["success"] and s["task"] == "pick-place-v3" for s in full)
