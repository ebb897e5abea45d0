"""The policy node as a real process over DDS: answers, hot swaps, refusals.

Each test starts ``python -m vlarl.nodes.policy`` with tiny models from tests/model_factory.py,
publishes observations from an in-test rclpy node and checks the actions that come back.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_factory import Built, make_broken, make_policy, save, write_garbage, write_truncated
from vlarl.graph import wait_until
from vlarl.topics import (
    ACTION_NAMES,
    OBSERVATION,
    POLICY_ACTION,
    POLICY_STATUS,
    ROBOT_STATUS,
    ROBOT_STATUS_FIELDS,
)

pytestmark = pytest.mark.graph

OBS_DIM = 39
T0_NS = 1_000 * 1_000_000_000  # synthetic sample stamps start here
READY_TIMEOUT = 20.0


class Harness:
    """An in-test rclpy node: publishes observations/status, records actions and status."""

    def __init__(self, context: Any) -> None:
        from rcl_interfaces.srv import GetParameters, SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=200, reliability=ReliabilityPolicy.RELIABLE
        )
        self.node = Node("policy_test", context=context)
        self.obs_pub = self.node.create_publisher(JointState, OBSERVATION, qos)
        self.status_pub = self.node.create_publisher(JointState, ROBOT_STATUS, qos)
        self.lock = threading.Lock()
        self.actions: list[tuple[int, str, np.ndarray, list[str]]] = []  # stamp, tag, base, names
        self.status: list[dict[str, Any]] = []
        self.action_sub = self.node.create_subscription(
            JointTrajectory, POLICY_ACTION, self._on_action, qos
        )
        self.node.create_subscription(String, POLICY_STATUS, self._on_status, 10)
        self.set_client = self.node.create_client(SetParameters, "/policy/set_parameters")
        self.get_client = self.node.create_client(GetParameters, "/policy/get_parameters")
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        with contextlib.suppress(Exception):  # context shut down at the end of the test
            self.executor.spin()

    def _on_action(self, msg: Any) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        base = np.array([p.positions for p in msg.points], dtype=np.float64)
        with self.lock:
            self.actions.append((stamp, msg.header.frame_id, base, list(msg.joint_names)))

    def _on_status(self, msg: Any) -> None:
        with self.lock:
            self.status.append(json.loads(msg.data))

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()

    # ---------------------------------------------------------------- helpers
    def wait_ready(self) -> None:
        """Pub/sub matched and parameter service up (hard timeout)."""
        ok = wait_until(
            lambda: (
                self.obs_pub.get_subscription_count() >= 1
                and self.action_sub.get_publisher_count() >= 1
                and self.set_client.service_is_ready()
            ),
            timeout=READY_TIMEOUT,
        )
        assert ok, "policy node did not come up (matched pub/sub + parameter service)"

    def send_obs(self, stamp_ns: int, obs: np.ndarray) -> None:
        from builtin_interfaces.msg import Time
        from sensor_msgs.msg import JointState

        msg = JointState()
        msg.header.stamp = Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
        msg.header.frame_id = "state"
        msg.position = [float(x) for x in obs]
        self.obs_pub.publish(msg)

    def send_status(self, stamp_ns: int, *, episode: int, step: int) -> None:
        from builtin_interfaces.msg import Time
        from sensor_msgs.msg import JointState

        values = {"episode": episode, "step": step}
        msg = JointState()
        msg.header.stamp = Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
        msg.name = list(ROBOT_STATUS_FIELDS)
        msg.position = [float(values.get(f, 0.0)) for f in ROBOT_STATUS_FIELDS]
        self.status_pub.publish(msg)

    def n_actions(self) -> int:
        with self.lock:
            return len(self.actions)

    def actions_by_stamp(self) -> dict[int, tuple[str, np.ndarray]]:
        with self.lock:
            return {s: (tag, base) for s, tag, base, _ in self.actions}

    def wait_actions(self, n: int, *, timeout: float) -> bool:
        return wait_until(lambda: self.n_actions() >= n, timeout=timeout)

    def missing(self, sent: dict[int, np.ndarray]) -> str:
        """Diagnosis for a failed wait: which observations went unanswered, node counters."""
        got = self.actions_by_stamp()
        order = sorted(sent)
        lost = [i for i, s in enumerate(order) if s not in got]
        with self.lock:
            last = self.status[-1] if self.status else {}
        return f"{len(got)}/{len(sent)} answered; unanswered indices {lost[:20]}; status {last}"

    def warm_up(self, rng: np.random.Generator) -> None:
        """Send observations until the first action comes back."""
        stamp = T0_NS - 10_000_000_000
        deadline = time.monotonic() + READY_TIMEOUT
        while self.n_actions() == 0:
            assert time.monotonic() < deadline, "no action for warm-up observations"
            self.send_obs(stamp, rng.normal(size=OBS_DIM))
            stamp += 1_000_000
            self.wait_actions(1, timeout=0.3)
        time.sleep(0.2)
        with self.lock:
            self.actions.clear()

    def call(self, future_factory: Callable[[], Any], *, timeout: float = 15.0) -> Any:
        future = future_factory()
        assert wait_until(future.done, timeout=timeout), "service call timed out"
        return future.result()

    def set_param(self, name: str, value: Any, *, timeout: float = 15.0) -> Any:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg()]
        )
        result = self.call(lambda: self.set_client.call_async(request), timeout=timeout)
        return result.results[0]

    def get_param(self, name: str) -> Any:
        from rcl_interfaces.srv import GetParameters

        assert self.get_client.wait_for_service(timeout_sec=5.0)
        request = GetParameters.Request(names=[name])
        result = self.call(lambda: self.get_client.call_async(request))
        return result.values[0].string_value

    def latest_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict:
        def find() -> dict[str, Any] | None:
            with self.lock:
                return next((s for s in reversed(self.status) if predicate(s)), None)

        assert wait_until(lambda: find() is not None, timeout=timeout), (
            f"no status matching the expectation; last: {self.status[-1:]}"
        )
        found = find()
        assert found is not None
        return found


@pytest.fixture
def harness(rclpy_context: Any):  # type: ignore[no-untyped-def]
    h = Harness(rclpy_context)
    yield h
    h.close()


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Built | Path]:
    v1 = make_policy(model_id="graph-policy", version=1, seed=1)
    v2 = make_policy(model_id="graph-policy", version=2, seed=2)
    return {
        "v1": v1,
        "v2": v2,
        "v1_path": v1.save(tmp_path / "policy_v1.onnx"),
        "v2_path": v2.save(tmp_path / "policy_v2.onnx"),
    }


def stream(
    harness: Harness,
    rng: np.random.Generator,
    *,
    count: int,
    rate_hz: float,
    first_stamp: int = T0_NS,
    during: Callable[[int], None] | None = None,
) -> dict[int, np.ndarray]:
    """Publish ``count`` observations at ``rate_hz``; ``during(i)`` runs before obs i is sent."""
    sent: dict[int, np.ndarray] = {}
    period = 1.0 / rate_hz
    start = time.monotonic()
    for i in range(count):
        if during is not None:
            during(i)
        stamp = first_stamp + i * 5_000_000
        obs = rng.normal(size=OBS_DIM).astype(np.float32)
        harness.send_obs(stamp, obs)
        sent[stamp] = obs
        delay = start + (i + 1) * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return sent


def check_chunks(
    sent: dict[int, np.ndarray],
    received: dict[int, tuple[str, np.ndarray]],
    refs: dict[str, Built],
    *,
    chunk_length: int,
    replan_every: int,
) -> None:
    """Every action equals the model's chunk from the observation it last planned on."""
    plan: np.ndarray | None = None
    plan_tag = ""
    executed = 0
    for stamp in sorted(sent):
        tag, base = received[stamp]
        steps = base.shape[0]
        if steps == chunk_length:  # a re-plan happened at this tick
            plan = refs[tag].reference(sent[stamp][None].astype(np.float64))[0]
            plan_tag = tag
            executed = 0
        if plan is None:  # still executing a plan made during the warm-up
            continue
        assert tag == plan_tag, f"{tag} published a chunk planned by {plan_tag}"
        assert steps == chunk_length - executed, f"schedule broken at {stamp}"
        np.testing.assert_allclose(base, plan[executed:], atol=1e-5)
        executed += 1
        assert executed <= replan_every


def test_observations_in_actions_out(start, harness: Harness, models, tmp_path: Path) -> None:
    """(a) stamps and version tag carried over; chunks follow the schedule; resets; bad obs."""
    start("policy", model=str(models["v1_path"]), replan_every=3, status_rate_hz=10.0)
    harness.wait_ready()
    rng = np.random.default_rng(0)
    harness.warm_up(rng)

    sent = stream(harness, rng, count=40, rate_hz=100.0)
    assert harness.wait_actions(len(sent), timeout=10.0), harness.missing(sent)
    received = harness.actions_by_stamp()
    assert set(received) == set(sent)
    assert {tag for tag, _ in received.values()} == {"graph-policy@1"}
    with harness.lock:
        assert all(names == list(ACTION_NAMES) for *_, names in harness.actions)
    refs = {"graph-policy@1": models["v1"]}
    check_chunks(sent, received, refs, chunk_length=8, replan_every=3)

    # Episode boundary: bring the schedule to right after a fresh plan, then announce step 0
    # of a new episode at stamp S; the observation at S must be planned afresh (8 points where
    # the schedule alone would give 7).
    def points_for(stamp: int) -> int:
        harness.send_obs(stamp, rng.normal(size=OBS_DIM))
        assert wait_until(lambda: stamp in harness.actions_by_stamp(), timeout=5.0)
        return harness.actions_by_stamp()[stamp][1].shape[0]

    stamp = max(sent) + 5_000_000
    for _ in range(4):
        stamp += 5_000_000
        if points_for(stamp) == 8:
            break
    else:
        pytest.fail("no plan tick within replan_every observations")
    stamp += 5_000_000
    harness.send_status(stamp, episode=1, step=0)
    time.sleep(0.3)
    assert points_for(stamp) == 8, "no re-plan at the episode start"
    assert points_for(stamp + 1) == 7

    # Malformed observations are answered with nothing and counted.
    n = harness.n_actions()
    harness.send_obs(stamp + 5_000_000, rng.normal(size=OBS_DIM - 1))
    bad = rng.normal(size=OBS_DIM)
    bad[3] = np.nan
    harness.send_obs(stamp + 10_000_000, bad)
    harness.send_obs(stamp + 15_000_000, rng.normal(size=OBS_DIM))  # a good one after them
    assert harness.wait_actions(n + 1, timeout=5.0)
    time.sleep(0.2)
    assert harness.n_actions() == n + 1
    assert stamp + 15_000_000 in harness.actions_by_stamp()
    status = harness.latest_status(lambda s: s["malformed"] >= 2, timeout=5.0)
    assert status["malformed"] == 2
    assert status["model"] == "graph-policy@1"
    assert status["episode_resets"] >= 1


@pytest.mark.parametrize("executor", ["events", "single_threaded"])
def test_swap_to_valid_model_misses_no_tick(start, harness: Harness, models, executor: str) -> None:
    """(b) swap mid-stream at 200 Hz: one action per observation, the tag flips once."""
    start(
        "policy",
        model=str(models["v1_path"]),
        replan_every=2,
        status_rate_hz=10.0,
        executor=executor,
    )
    harness.wait_ready()
    rng = np.random.default_rng(1)
    harness.warm_up(rng)

    results: list[Any] = []

    def swap_at(i: int) -> None:
        if i == 150:
            threading.Thread(
                target=lambda: results.append(harness.set_param("model", str(models["v2_path"]))),
                daemon=True,
            ).start()

    sent = stream(harness, rng, count=400, rate_hz=200.0, during=swap_at)
    assert harness.wait_actions(len(sent), timeout=15.0), harness.missing(sent)
    assert wait_until(lambda: bool(results), timeout=10.0), "set_parameters never answered"
    assert results[0].successful, results[0].reason
    time.sleep(0.3)

    with harness.lock:
        counts = Counter(stamp for stamp, *_ in harness.actions)
    assert set(counts) == set(sent), f"missed ticks: {len(set(sent) - set(counts))}"
    assert max(counts.values()) == 1, "an observation was answered twice"

    received = harness.actions_by_stamp()
    tags = [received[s][0] for s in sorted(sent)]
    flips = [i for i in range(1, len(tags)) if tags[i] != tags[i - 1]]
    assert tags[0] == "graph-policy@1" and tags[-1] == "graph-policy@2"
    assert len(flips) == 1, f"version tag changed {len(flips)} times"
    # The swap took effect close to when it was asked for, not at the end of the stream.
    # (ticks queued in the node when the new model was staged may already run it)
    assert 100 <= flips[0] < 390, flips
    refs = {"graph-policy@1": models["v1"], "graph-policy@2": models["v2"]}
    check_chunks(sent, received, refs, chunk_length=8, replan_every=2)
    status = harness.latest_status(lambda s: s["model"] == "graph-policy@2", timeout=5.0)
    assert status["swaps"] == 1 and status["refused"] == 0
    assert harness.get_param("model") == str(models["v2_path"])


def test_bad_swaps_are_refused_and_old_model_keeps_control(
    start, harness: Harness, models, tmp_path: Path
) -> None:
    """(c) missing, corrupt, truncated, contract-breaking files: refused with a reason (at once
    when stat tells, else by the worker thread, in policy/status), the parameter goes back to
    the running model, and the old model answers every observation meanwhile."""
    start("policy", model=str(models["v1_path"]), status_rate_hz=20.0)
    harness.wait_ready()
    rng = np.random.default_rng(2)
    harness.warm_up(rng)

    at_once = {
        "missing": (tmp_path / "does_not_exist.onnx", "not found"),
        "directory": (tmp_path, "not a file"),
    }
    checked = {
        "corrupt": (write_garbage(tmp_path / "corrupt.onnx"), "not a readable ONNX"),
        "truncated": (
            write_truncated(models["v1_path"], tmp_path / "truncated.onnx", fraction=0.6),
            "not a readable ONNX",
        ),
        "contract": (save(make_broken("obs_dim_mismatch"), tmp_path / "dims.onnx"), "obs_dim"),
        "probe_nan": (save(make_broken("probe_nan"), tmp_path / "nan.onnx"), "non-finite"),
    }
    results: dict[str, Any] = {}
    refusals: dict[str, str] = {}

    def refuse_one_by_one() -> None:
        for key, (path, _) in at_once.items():
            results[key] = harness.set_param("model", str(path))
        for n, (key, (path, _)) in enumerate(checked.items(), start=len(at_once) + 1):
            results[key] = harness.set_param("model", str(path))
            status = harness.latest_status(lambda s, n=n: s["refused"] == n, timeout=10.0)
            refusals[key] = status["last_refusal"]

    worker = threading.Thread(target=refuse_one_by_one, daemon=True)
    sent = stream(
        harness,
        rng,
        count=400,
        rate_hz=100.0,
        during=lambda i: worker.start() if i == 20 else None,
    )
    worker.join(timeout=30.0)
    assert harness.wait_actions(len(sent), timeout=15.0), harness.missing(sent)
    assert len(refusals) == len(checked), (sorted(results), refusals)
    for key, (_, fragment) in at_once.items():
        assert not results[key].successful, f"{key} was accepted"
        assert fragment in results[key].reason, f"{key}: {results[key].reason!r}"
    for key, (path, fragment) in checked.items():
        assert results[key].successful, f"{key}: {results[key].reason}"  # queued for checking
        assert fragment in refusals[key] and str(path) in refusals[key], (key, refusals[key])

    received = harness.actions_by_stamp()
    assert set(received) == set(sent)
    assert {tag for tag, _ in received.values()} == {"graph-policy@1"}
    check_chunks(sent, received, {"graph-policy@1": models["v1"]}, chunk_length=8, replan_every=8)
    assert wait_until(lambda: harness.get_param("model") == str(models["v1_path"]), timeout=5.0)
    refused = len(at_once) + len(checked)
    status = harness.latest_status(lambda s: s["refused"] == refused, timeout=5.0)
    assert status["model"] == "graph-policy@1" and status["swaps"] == 0

    # A task the model does not know is refused the same way.
    result = harness.set_param("task", "door-open-v3")
    assert not result.successful and "does not know task" in result.reason


def test_start_without_model_holds_then_accepts_one(start, harness: Harness, models, tmp_path):
    """A node whose model file is missing answers nothing until a valid model is set."""
    start("policy", model=str(tmp_path / "not_yet.onnx"), status_rate_hz=10.0)
    harness.wait_ready()
    rng = np.random.default_rng(3)
    status = harness.latest_status(lambda s: "not found" in s["load_error"], timeout=10.0)
    assert status["model"] == ""
    for i in range(5):
        harness.send_obs(T0_NS + i, rng.normal(size=OBS_DIM))
    harness.latest_status(lambda s: s["no_model"] >= 5, timeout=5.0)
    assert harness.n_actions() == 0

    # Without a model, other parameters are stored and checked when a model loads (on the
    # worker thread: the verdict is in policy/status and the parameter goes back).
    assert harness.set_param("task", "push-v3").successful
    result = harness.set_param("model", str(models["v1_path"]))
    assert result.successful, result.reason
    status = harness.latest_status(lambda s: s["refused"] == 1, timeout=10.0)
    assert "does not know task 'push-v3'" in status["last_refusal"]
    back = str(tmp_path / "not_yet.onnx")
    assert wait_until(lambda: harness.get_param("model") == back, timeout=5.0)
    assert harness.set_param("task", "pick-place-v3").successful
    result = harness.set_param("model", str(models["v1_path"]))
    assert result.successful, result.reason
    # The observations seen without a model (obs_dim from the first one) are what it is
    # checked on; warm_up sends more until it answers.
    harness.warm_up(rng)
    sent = stream(harness, rng, count=10, rate_hz=100.0)
    assert harness.wait_actions(len(sent), timeout=5.0)
    assert {tag for tag, _ in harness.actions_by_stamp().values()} == {"graph-policy@1"}
