"""Actor <-> learner over DDS: the real learner process streams gated residual versions to the
real policy process, which acts with them; a learner killed mid-run resumes from its checkpoint
and the replay folder, and its next version continues the numbering (no data, no version lost).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_factory import make_policy
from vlarl.data.replay import ReplayWriter, Transitions
from vlarl.graph import wait_until
from vlarl.topics import LEARNER_STATUS, OBSERVATION, POLICY_ACTION, POLICY_STATUS

pytestmark = pytest.mark.graph

OBS_DIM, ACT_DIM = 39, 4
TIMEOUT = 60.0
LEARNER = {
    "probe_transitions": 0,
    "learning_starts": 0,
    "warmup_ramp": 0,
    "publish_every": 40,
    "utd": 1,
    "hidden": 16,
    "critics": 2,
    "batch_size": 16,
    "prescreen": "none",
    "gate": "none",  # these tests follow each version as soon as it is published
    "safety_check_timeout_s": 2.0,
    "poll_period_s": 0.1,
    "status_rate_hz": 5.0,
}


def _write_episodes(replay: Path, *, tag: str, episodes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with ReplayWriter(replay, source="test", tasks=["pick-place-v3"]) as writer:
        for i in range(episodes):
            n = 25
            obs = rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
            base = rng.uniform(-0.5, 0.5, size=(n, ACT_DIM)).astype(np.float32)
            reward = np.zeros(n, np.float32)
            reward[-1] = float(i % 2 == 0)
            data = Transitions.build(
                obs=obs[:-1],
                next_obs=obs[1:],
                action=base,
                base_action=base,
                reward=reward,
                terminal=(reward > 0).astype(np.uint8),
                success=(reward > 0).astype(np.uint8),
            )
            writer.add_episode(data, task="pick-place-v3", version=tag)


class Harness:
    def __init__(self, context: Any) -> None:
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        self.node = Node("learner_test", context=context)
        self.obs_pub = self.node.create_publisher(JointState, OBSERVATION, 50)
        self.lock = threading.Lock()
        self.tags: list[str] = []
        self.learner: list[dict[str, Any]] = []
        self.policy: list[dict[str, Any]] = []
        self.node.create_subscription(JointTrajectory, POLICY_ACTION, self._on_action, 50)
        self.node.create_subscription(String, LEARNER_STATUS, self._on_learner, 10)
        self.node.create_subscription(String, POLICY_STATUS, self._on_policy, 10)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        self.stamp = 1_000 * 1_000_000_000

    def _spin(self) -> None:
        with contextlib.suppress(Exception):
            self.executor.spin()

    def _on_action(self, msg: Any) -> None:
        with self.lock:
            self.tags.append(msg.header.frame_id)

    def _on_learner(self, msg: Any) -> None:
        with self.lock:
            self.learner.append(json.loads(msg.data))

    def _on_policy(self, msg: Any) -> None:
        with self.lock:
            self.policy.append(json.loads(msg.data))

    def send_obs(self, rng: np.random.Generator) -> None:
        from builtin_interfaces.msg import Time
        from sensor_msgs.msg import JointState

        self.stamp += 12_500_000
        msg = JointState()
        msg.header.stamp = Time(sec=self.stamp // 10**9, nanosec=self.stamp % 10**9)
        msg.header.frame_id = "state"
        msg.position = [float(x) for x in rng.normal(size=OBS_DIM)]
        self.obs_pub.publish(msg)

    def drive_until(self, predicate: Any, rng: np.random.Generator, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send_obs(rng)
            with self.lock:
                if predicate(self):
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()


def test_learner_streams_versions_to_the_policy_and_resumes_after_kill(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    model = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "base.onnx")
    replay = tmp_path / "replay"
    checkpoint = tmp_path / "learner.safetensors"
    _write_episodes(replay, tag="graph-policy@1", episodes=4, seed=0)
    start("policy", model=str(model), task="pick-place-v3")
    start("safety")  # the learner publishes only once safety's delta equals its own
    learner = start(
        "learner",
        base_model=str(model),
        replay_dir=str(replay),
        checkpoint=str(checkpoint),
        **LEARNER,
    )
    h = Harness(rclpy_context)
    rng = np.random.default_rng(0)
    try:
        # The policy acts with the learner's first version, named in every action.
        assert h.drive_until(lambda s: any("+residual@" in t for t in s.tags), rng, TIMEOUT), (
            h.tags[-3:],
            h.learner[-1:],
            h.policy[-1:],
        )
        first = next(t for t in h.tags if "+residual@" in t)
        assert first.startswith("graph-policy@1+residual@")
        assert h.drive_until(
            lambda s: bool(s.learner) and s.learner[-1]["published"] >= 1, rng, 10.0
        )
        with h.lock:
            status = h.learner[-1]
        assert status["transitions"] == 100
        assert status["episodes_by_tag"]["graph-policy@1"] == {"episodes": 4, "successes": 2}
        version_before = int(first.rsplit("@", 1)[1])

        # Kill it hard, give the replay more data, restart on the same checkpoint.
        assert wait_until(checkpoint.exists, timeout=10.0)
        learner.kill()
        _write_episodes(replay, tag=first, episodes=4, seed=1)
        with h.lock:
            h.learner.clear()
        start(
            "learner",
            base_model=str(model),
            replay_dir=str(replay),
            checkpoint=str(checkpoint),
            **LEARNER,
        )

        def resumed_and_newer(s: Harness) -> bool:
            return (
                bool(s.learner)
                and s.learner[-1]["resumed"]
                and any(
                    "+residual@" in t and int(t.rsplit("@", 1)[1]) > version_before
                    for t in s.tags[-20:]
                )
            )

        assert h.drive_until(resumed_and_newer, rng, TIMEOUT), (h.tags[-3:], h.learner[-1:])
        with h.lock:
            status = h.learner[-1]
        assert status["transitions"] == 200  # every shard re-read, none twice
        assert status["version"] > version_before
    finally:
        h.close()


def test_learner_publishes_nothing_when_safety_delta_differs(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    model = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "base.onnx")
    replay = tmp_path / "replay"
    _write_episodes(replay, tag="graph-policy@1", episodes=4, seed=0)
    start("safety", delta=0.2)  # the learner's delta is the default 0.3
    start(
        "learner",
        base_model=str(model),
        replay_dir=str(replay),
        checkpoint=str(tmp_path / "learner.safetensors"),
        **LEARNER,
    )
    h = Harness(rclpy_context)
    try:
        assert wait_until(
            lambda: bool(h.learner) and h.learner[-1]["delta_check"].startswith("mismatch"),
            timeout=TIMEOUT,
        ), h.learner[-1:]
        # It trains, but no version is ever published or proposed.
        assert wait_until(lambda: h.learner[-1]["updates"] >= 80, timeout=TIMEOUT)
        time.sleep(1.0)
        assert h.learner[-1]["published"] == 0 and h.learner[-1]["version"] == 0
        assert "safety's delta is 0.2" in h.learner[-1]["delta_check"]
    finally:
        h.close()
