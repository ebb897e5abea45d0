"""The reward and visualization nodes as real processes over DDS.

Reward: simulator-flag episodes; the learned success detector (and progress value) deciding
from real Meta-World observations; a run-time switch of the success source with refusals; the
human label service ending an episode and its label message.
"""

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
    HUMAN_LABEL,
    MARKERS,
    OBSERVATION,
    POLICY_ACTION,
    REWARD,
    REWARD_FIELDS,
    REWARD_LABEL,
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
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from std_srvs.srv import SetBool
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
        self.obs_pub = self.node.create_publisher(JointState, OBSERVATION, qos)
        self.lock = threading.Lock()
        self.rewards: list[tuple[int, dict[str, float]]] = []
        self.episodes: list[dict[str, Any]] = []
        self.labels: list[dict[str, Any]] = []
        self.markers: list[Any] = []
        self.reward_sub = self.node.create_subscription(JointState, REWARD, self._on_reward, qos)
        self.episode_sub = self.node.create_subscription(String, EPISODE, self._on_episode, 50)
        self.label_sub = self.node.create_subscription(String, HUMAN_LABEL, self._on_label, 50)
        self.label_client = self.node.create_client(SetBool, REWARD_LABEL)
        self.param_client = self.node.create_client(SetParameters, "/reward/set_parameters")
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

    def _on_label(self, msg: Any) -> None:
        with self.lock:
            self.labels.append(json.loads(msg.data))

    def call(self, future: Any, timeout: float = 10.0) -> Any:
        assert wait_until(future.done, timeout=timeout), "service call timed out"
        return future.result()

    def set_param(self, name: str, value: Any) -> Any:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        assert self.param_client.wait_for_service(timeout_sec=READY_TIMEOUT)
        request = SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg()]
        )
        return self.call(self.param_client.call_async(request)).results[0]

    def label(self, success: bool) -> Any:
        from std_srvs.srv import SetBool

        assert self.label_client.wait_for_service(timeout_sec=READY_TIMEOUT)
        return self.call(self.label_client.call_async(SetBool.Request(data=success)))

    def wait_ready(self, *, observations: bool = False) -> None:
        assert wait_until(
            lambda: (
                self.status_pub.get_subscription_count() > 0
                and self.task_pub.get_subscription_count() > 0
                and (not observations or self.obs_pub.get_subscription_count() > 0)
                and self.reward_sub.get_publisher_count() > 0
                and self.episode_sub.get_publisher_count() > 0
            ),
            timeout=READY_TIMEOUT,
        ), "reward node did not come up"

    def play(
        self,
        episode: int,
        obs: np.ndarray | None,
        *,
        stamp0: int,
        success_at: int | None = None,
        truncate_last: bool = False,
        terminal_last: bool = False,
        obs_first: bool = False,
        steps: int | None = None,
    ) -> list[int]:
        """Publish steps 0..n of one episode (status + task state + observation, one stamp).

        The robot's success flag is only raised at ``success_at`` (None: never); its last
        sample may say truncated or terminal (a robot that ends the episode itself)."""
        n = (obs.shape[0] if obs is not None else int(steps or 0) + 1) - 1
        stamps = []
        for k in range(n + 1):
            stamp = stamp0 + k * 12_500_000
            stamps.append(stamp)
            flag = float(success_at is not None and k >= success_at)
            trunc = float(truncate_last and k == n)
            term = float(terminal_last and k == n)
            status = [episode, k, flag, term, trunc, 0.0]
            state = obs[k] if obs is not None else np.zeros(39)
            self.task_pub.publish(_vector(state, stamp_ns=stamp, frame="pick-place-v3"))
            if obs is not None and obs_first:
                self.obs_pub.publish(_vector(obs[k], stamp_ns=stamp, frame="state"))
            self.status_pub.publish(_vector(status, stamp_ns=stamp, names=ROBOT_STATUS_FIELDS))
            if obs is not None and not obs_first:
                self.obs_pub.publish(_vector(obs[k], stamp_ns=stamp, frame="state"))
            time.sleep(0.004)
        return stamps

    def rewards_of(self, episode: int) -> list[dict[str, float]]:
        with self.lock:
            return [r for _, r in self.rewards if r["episode"] == episode]

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


def test_reward_node_refuses_a_detector_source_without_a_detector(start: Any) -> None:
    node = start("reward", success_source="detector", detector_model="models/missing.onnx")
    assert wait_until(lambda: not node.alive(), timeout=READY_TIMEOUT)
    assert node.process.returncode == 2
    log = node.log_path.read_text() if node.log_path else ""
    assert "detector_model refused: model file not found" in log
    assert "success_source 'detector' needs a success detector" in log


DETECTOR = "models/pick-place-v3-success-detector.onnx"  # resolved against the package
PROGRESS = "models/pick-place-v3-progress.onnx"


def _real_episodes() -> tuple[np.ndarray, int, np.ndarray]:
    """(observations of a noisy-expert success on pick-place-v3, its success step, those of a
    near-miss that stops a few centimetres short), from the real simulator."""
    from vlarl.learning import envs
    from vlarl.learning.collect import run_episode
    from vlarl.rewardmodels.episodes import CopyingExpert, near_miss_episode
    from vlarl.rewardmodels.labels import observation_sequence, success_step_of

    env = envs.make_env("pick-place-v3")
    expert = CopyingExpert(envs.expert_for("pick-place-v3"))
    data, ok = run_episode(
        env,
        expert,
        seed=515151,
        sigma=0.2,
        rng=np.random.default_rng(3),
        max_steps=300,
        post_success_steps=6,
    )
    assert ok
    near = None
    seed = 525252
    while near is None or near.succeeded:
        near = near_miss_episode(
            env,
            expert,
            seed=seed,
            sigma=0.0,
            stop_short=(6, 10),
            drift_steps=30,
            drift_sigma=0.1,
            rng=np.random.default_rng(seed),
            max_steps=300,
            post_success_steps=0,
        )
        seed += 1
    env.close()
    s = success_step_of(data.success)
    assert s is not None
    obs = observation_sequence(data, np.arange(len(data)))
    return obs, s, observation_sequence(near.data, np.arange(len(near.data)))


def test_detector_decides_success_from_real_observations(start: Any, rclpy_context: Any) -> None:
    """The robot's flag never rises: success (and the reward) come from the learned detector,
    exactly as the offline runtime decides on the same observations; value from the progress
    model. A near-miss is not a success."""
    from vlarl.graph import package_root
    from vlarl.rewardmodels.detector import SuccessDetector, first_fire

    obs, s, near = _real_episodes()
    offline = SuccessDetector.load(package_root() / DETECTOR)
    k_fire = offline.detect(obs, task="pick-place-v3")  # sliding window + debounce
    assert k_fire is not None and abs(k_fire - s) <= 4, (k_fire, s)  # the shipped model
    cut = obs[: s + 1]  # as a simulator that ends the episode at its success step
    cut_probs = offline.probabilities(cut, task="pick-place-v3")
    fired_by_s = first_fire(cut_probs, threshold=offline.threshold, debounce=offline.debounce)
    eos_success = fired_by_s is not None or bool(cut_probs[-1] >= offline.threshold)
    start("reward", success_source="detector", detector_model=DETECTOR, progress_model=PROGRESS)
    h = Harness(rclpy_context)
    try:
        h.wait_ready(observations=True)
        # an observation stream that is already running (several samples, so that under load
        # the node has seen the stream before the first status of the episode arrives)
        for i in range(5):
            h.obs_pub.publish(_vector(obs[0], stamp_ns=T0_NS - (5 - i) * 10**8, frame="state"))
            time.sleep(0.05)
        h.play(0, obs, stamp0=T0_NS)  # status first, then the observation (as in lockstep)
        h.play(1, near, stamp0=T0_NS + 10**10, truncate_last=True, obs_first=True)
        h.play(2, cut, stamp0=T0_NS + 2 * 10**10, terminal_last=True)
        assert wait_until(lambda: len(h.episodes) >= 3, timeout=15.0), h.episodes
        time.sleep(0.2)
    finally:
        h.close()
    first = h.rewards_of(0)
    assert len(first) == obs.shape[0]
    hits = [int(r["step"]) for r in first if r["reward"] == 1.0]
    assert hits == [k_fire]  # the node decides as the offline runtime does
    ended = next(r for r in first if r["terminal"] == 1.0)
    assert ended["success"] == 1.0 and int(ended["step"]) == k_fire
    # value = -d(o): negative, and nearer zero at the success than at the start
    values = [r["value"] for r in first]
    assert all(v <= 0.0 for v in values) and values[0] < -10.0
    assert values[k_fire] > values[0] + 10.0
    second = h.rewards_of(1)
    assert len(second) == near.shape[0]
    assert all(r["reward"] == 0.0 and r["success"] == 0.0 for r in second)
    summaries = {e["episode"]: e for e in h.episodes}
    assert (summaries[0]["success"], summaries[0]["end"]) == (True, "success")
    assert (summaries[1]["success"], summaries[1]["end"]) == (False, "truncated")
    # the robot ended episode 2 at the success step: the final window was judged on its own
    assert (summaries[2]["success"], summaries[2]["end"]) == (eos_success, "terminal")
    assert {e["success_source"] for e in h.episodes} == {"detector"}


def test_success_source_switches_at_run_time(start: Any, rclpy_context: Any, tmp_path: Any) -> None:
    _, _, near = _real_episodes()
    start("reward", detector_model=DETECTOR)
    h = Harness(rclpy_context)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx model")
    try:
        h.wait_ready(observations=True)
        # the robot raises its flag at the end of the near-miss: 'sim' believes it
        h.play(0, near, stamp0=T0_NS, success_at=near.shape[0] - 1)
        assert wait_until(lambda: len(h.episodes) >= 1, timeout=10.0)
        assert h.set_param("success_source", "detector").successful
        h.play(1, near, stamp0=T0_NS + 10**10, success_at=near.shape[0] - 1, truncate_last=True)
        assert wait_until(lambda: len(h.episodes) >= 2, timeout=10.0)
        refused = h.set_param("detector_model", str(corrupt))
        assert not refused.successful and "detector_model refused" in refused.reason
        assert "not a readable ONNX" in refused.reason
        refused = h.set_param("detector_model", "")
        assert not refused.successful and "needs a success detector" in refused.reason
        refused = h.set_param("success_source", "oracle")
        assert not refused.successful and "one of" in refused.reason
        assert h.set_param("success_source", "human").successful
        h.play(2, None, stamp0=T0_NS + 2 * 10**10, success_at=2, steps=3, truncate_last=True)
        assert wait_until(lambda: len(h.episodes) >= 3, timeout=10.0)
    finally:
        h.close()
    assert [(e["episode"], e["success_source"], e["success"]) for e in h.episodes] == [
        (0, "sim", True),
        (1, "detector", False),
        (2, "human", False),
    ]


def test_human_label_ends_the_episode_and_is_published(start: Any, rclpy_context: Any) -> None:
    start("reward", success_source="human")
    h = Harness(rclpy_context)
    try:
        h.wait_ready()
        assert wait_until(lambda: h.label_sub.get_publisher_count() > 0, timeout=READY_TIMEOUT)
        answer = h.label(True)
        assert not answer.success and "no episode" in answer.message
        # the robot's own flag (step 2) is ignored with success_source human
        h.play(0, None, stamp0=T0_NS, success_at=2, steps=4)
        assert wait_until(lambda: len(h.rewards_of(0)) == 5, timeout=10.0)
        answer = h.label(True)
        assert answer.success and "episode 0" in answer.message
        stamp = T0_NS + 5 * 12_500_000
        h.status_pub.publish(_vector([0, 5, 0, 0, 0, 0], stamp_ns=stamp, names=ROBOT_STATUS_FIELDS))
        assert wait_until(lambda: len(h.episodes) >= 1 and len(h.labels) >= 2, timeout=10.0)
        answer = h.label(False)  # the episode is over
        assert not answer.success and "already ended" in answer.message
        # a failure label on the next episode, with no further sample: ends after the timeout
        h.play(1, None, stamp0=T0_NS + 10**10, steps=2)
        assert wait_until(lambda: len(h.rewards_of(1)) == 3, timeout=10.0)
        assert h.label(False).success
        assert wait_until(lambda: len(h.episodes) >= 2, timeout=10.0)
        time.sleep(0.2)
    finally:
        h.close()
    rewards = h.rewards_of(0)
    assert [r["reward"] for r in rewards] == [0.0] * 5 + [1.0]
    assert [r["success"] for r in rewards] == [0.0] * 5 + [1.0]
    assert rewards[-1]["terminal"] == 1.0
    assert [(e["episode"], e["success"], e["end"], e["success_source"]) for e in h.episodes] == [
        (0, True, "label", "human"),
        (1, False, "label", "human"),
    ]
    applied = [lab for lab in h.labels if lab["applied"]]
    assert [(lab["episode"], lab["label"], lab["success"]) for lab in applied] == [
        (0, "success", True),
        (1, "failure", False),
    ]
    assert applied[0]["stamp"] == T0_NS + 4 * 12_500_000  # the latest status when labelled
    assert all(lab["task"] == "pick-place-v3" for lab in applied)
    assert len(h.labels) == 4  # refused labels are recorded too


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
