"""Residual weight streaming into the real policy node over DDS: swap, refusals, rollback.

Each test starts ``python -m vlarl.nodes.policy`` with a tiny ONNX model (tests/model_factory.py),
publishes observations and residual blobs (vlarl.core.weights) from an in-test rclpy node, and
checks the actions that come back: the version tag in frame_id and the residual in effort, which
must equal what :meth:`ResidualWeights.actor` computes on the same observation and base action.
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_factory import make_policy
from vlarl.core.candidate import SwapConfig
from vlarl.core.weights import ResidualWeights, decode_residual, encode_residual
from vlarl.graph import wait_until
from vlarl.topics import OBSERVATION, POLICY_ACTION, POLICY_STATUS, POLICY_WEIGHTS

pytestmark = pytest.mark.graph

OBS_DIM, ACT_DIM = 39, 4
T0_NS = 2_000 * 1_000_000_000
READY_TIMEOUT = 20.0


def blob(
    version: int,
    *,
    base: str = "graph-policy@1",
    model_id: str = "residual",
    obs_dim: int = OBS_DIM,
    seed: int | None = None,
) -> bytes:
    """A 2-layer residual actor, different weights per version."""
    rng = np.random.default_rng(version if seed is None else seed)
    n_in = obs_dim + ACT_DIM
    layers = [
        (rng.normal(size=(n_in, 32)) * 0.4, rng.normal(size=32) * 0.1),
        (rng.normal(size=(32, ACT_DIM)) * 0.4, rng.normal(size=ACT_DIM) * 0.1),
    ]
    return encode_residual(
        layers=layers,
        model_id=model_id,
        version=version,
        parent=version - 1,
        base=base,
        obs_dim=obs_dim,
        action_dim=ACT_DIM,
        scale=0.3,
        extra={"step": str(version * 1000)},
    )


class Harness:
    """Publishes observations and weight blobs; records actions (tag, base, residual) + status."""

    def __init__(self, context: Any) -> None:
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String, UInt8MultiArray
        from trajectory_msgs.msg import JointTrajectory

        from vlarl.nodes.policy import WEIGHTS_QOS

        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=400, reliability=ReliabilityPolicy.RELIABLE
        )
        self.node = Node("weights_test", context=context)
        self.obs_pub = self.node.create_publisher(JointState, OBSERVATION, qos)
        self.weights_pub = self.node.create_publisher(UInt8MultiArray, POLICY_WEIGHTS, WEIGHTS_QOS)
        self.lock = threading.Lock()
        # stamp -> list of (tag, base action [A], residual [A]) (a list: duplicates are visible)
        self.actions: dict[int, list[tuple[str, np.ndarray, np.ndarray]]] = {}
        self.status: list[dict[str, Any]] = []
        self.action_sub = self.node.create_subscription(
            JointTrajectory, POLICY_ACTION, self._on_action, qos
        )
        self.node.create_subscription(String, POLICY_STATUS, self._on_status, 10)
        self.set_client: Any = self.node.create_client(SetParameters, "/policy/set_parameters")
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        self.stamp = T0_NS

    def _spin(self) -> None:
        with contextlib.suppress(Exception):  # context shut down at the end of the test
            self.executor.spin()

    def _on_action(self, msg: Any) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        point = msg.points[0]
        base = np.array(point.positions, dtype=np.float32)
        residual = np.array(point.effort, dtype=np.float32)
        with self.lock:
            self.actions.setdefault(stamp, []).append((msg.header.frame_id, base, residual))

    def _on_status(self, msg: Any) -> None:
        with self.lock:
            self.status.append(json.loads(msg.data))

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()

    # ---------------------------------------------------------------- helpers
    def wait_ready(self) -> None:
        ok = wait_until(
            lambda: (
                self.obs_pub.get_subscription_count() >= 1
                and self.action_sub.get_publisher_count() >= 1
                and self.weights_pub.get_subscription_count() >= 1
                and self.set_client.service_is_ready()
            ),
            timeout=READY_TIMEOUT,
        )
        assert ok, "policy node did not come up (matched pub/sub + parameter service)"

    def publish_blob(self, payload: bytes) -> None:
        from std_msgs.msg import UInt8MultiArray

        msg = UInt8MultiArray()
        msg.data = payload
        self.weights_pub.publish(msg)

    def send_obs(self, obs: np.ndarray) -> int:
        from builtin_interfaces.msg import Time
        from sensor_msgs.msg import JointState

        self.stamp += 5_000_000
        msg = JointState()
        msg.header.stamp = Time(sec=self.stamp // 1_000_000_000, nanosec=self.stamp % 1_000_000_000)
        msg.header.frame_id = "state"
        msg.position = [float(x) for x in obs]
        self.obs_pub.publish(msg)
        return self.stamp

    def stream(
        self,
        rng: np.random.Generator,
        *,
        count: int,
        rate_hz: float = 200.0,
        during: Callable[[int], None] | None = None,
    ) -> dict[int, np.ndarray]:
        """Send ``count`` observations at ``rate_hz`` and wait until each is answered."""
        sent: dict[int, np.ndarray] = {}
        start = time.monotonic()
        for i in range(count):
            if during is not None:
                during(i)
            obs = rng.normal(size=OBS_DIM).astype(np.float32)
            sent[self.send_obs(obs)] = obs
            delay = start + (i + 1) / rate_hz - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        ok = wait_until(lambda: self.answered(sent) == len(sent), timeout=10.0)
        assert ok, f"{self.answered(sent)}/{len(sent)} answered; status {self.last_status()}"
        return sent

    def answered(self, sent: dict[int, np.ndarray]) -> int:
        with self.lock:
            return sum(1 for s in sent if s in self.actions)

    def answers(self, sent: dict[int, np.ndarray]) -> list[tuple[np.ndarray, str, Any, Any]]:
        """(obs, tag, base, residual) per sent observation in order; each answered once."""
        with self.lock:
            counts = Counter({s: len(self.actions.get(s, [])) for s in sent})
            assert all(n == 1 for n in counts.values()), (
                f"missed or doubled ticks: {[s for s, n in counts.items() if n != 1][:10]}"
            )
            return [(sent[s], *self.actions[s][0]) for s in sorted(sent)]

    def warm_up(self, rng: np.random.Generator) -> None:
        """Observations until one is answered, then enough of them for the node to check
        candidates on (SwapConfig.min_observations)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            stamp = self.send_obs(rng.normal(size=OBS_DIM))
            if wait_until(lambda s=stamp: s in self.actions, timeout=0.3):
                break
            assert time.monotonic() < deadline, "no action for warm-up observations"
        self.stream(rng, count=SwapConfig().min_observations)

    def last_status(self) -> dict[str, Any]:
        with self.lock:
            return self.status[-1] if self.status else {}

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0):
        def find() -> dict[str, Any] | None:
            with self.lock:
                return next((s for s in reversed(self.status[-3:]) if predicate(s)), None)

        assert wait_until(lambda: find() is not None, timeout=timeout), (
            f"no status matching the expectation; last: {self.last_status()}"
        )
        return find()

    def set_model(self, path: Path, tag: str) -> None:
        """``model`` set, checked on the node's worker thread and staged (status says so)."""
        result = self.set_param("model", str(path))
        assert result.successful, result.reason
        self.wait_status(lambda s: s["model"] == tag and not s["pending"])

    def set_param(self, name: str, value: Any, *, timeout: float = 15.0) -> Any:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg()]
        )
        future = self.set_client.call_async(request)
        assert wait_until(future.done, timeout=timeout), "set_parameters timed out"
        response = future.result()
        assert response is not None, "set_parameters failed"
        return response.results[0]


@pytest.fixture
def harness(rclpy_context: Any) -> Any:
    h = Harness(rclpy_context)
    yield h
    h.close()


@pytest.fixture
def model_paths(tmp_path: Path) -> dict[str, Path]:
    return {
        "v1": make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "p1.onnx"),
        "v2": make_policy(model_id="graph-policy", version=2, seed=2).save(tmp_path / "p2.onnx"),
    }


def expect_acting(
    answers: list[tuple[np.ndarray, str, Any, Any]],
    weights: ResidualWeights | None,
    *,
    base_tag: str = "graph-policy@1",
) -> None:
    """Every answer carries ``weights``' tag and its actor's output (zeros without one)."""
    actor = weights.actor() if weights is not None else None
    want_tag = base_tag if weights is None else f"{base_tag}+{weights.tag}"
    out = np.zeros(ACT_DIM, np.float32)
    for obs, tag, base, residual in answers:
        assert tag == want_tag
        if actor is None:
            assert not residual.any(), residual
        else:
            actor(obs, base, out)
            np.testing.assert_allclose(residual, out, atol=1e-6)
            assert np.abs(residual).max() <= 0.3 + 1e-6


def test_valid_blob_swaps_between_ticks_without_missing_one(start, harness, model_paths) -> None:
    """A blob published mid-stream at 200 Hz: one action per observation, the tag flips once,
    and from then on the residual is the streamed actor's output."""
    start("policy", model=str(model_paths["v1"]), status_rate_hz=10.0)
    harness.wait_ready()
    rng = np.random.default_rng(0)
    harness.warm_up(rng)
    payload = blob(1)
    w1 = decode_residual(payload)

    sent = harness.stream(
        rng, count=300, during=lambda i: harness.publish_blob(payload) if i == 100 else None
    )
    answers = harness.answers(sent)
    tags = [a[1] for a in answers]
    flips = [i for i in range(1, len(tags)) if tags[i] != tags[i - 1]]
    assert len(flips) == 1 and 100 <= flips[0] < 200, flips  # swapped within 0.5 s
    expect_acting(answers[: flips[0]], None)
    expect_acting(answers[flips[0] :], w1)
    status = harness.wait_status(lambda s: s["weights_accepted"] == 1)
    assert status["residual"] == "residual@1" and status["residual_history"] == [1]
    assert status["weights_received"] == 1 and status["weights_refused"] == 0
    assert status["dropped"] == 0 and status["residual_swaps"] == 1


def test_bad_blobs_are_refused_and_rollback(start, harness, model_paths) -> None:
    """Tampered, truncated, older, replayed, mismatched blobs: refused, counted, the running
    residual keeps acting; residual_version rolls back, pins, zeroes and follows again."""
    start("policy", model=str(model_paths["v1"]), status_rate_hz=10.0)
    harness.wait_ready()
    rng = np.random.default_rng(1)
    harness.warm_up(rng)

    good = {v: blob(v) for v in (1, 2)}
    for v, payload in good.items():
        harness.publish_blob(payload)
        harness.wait_status(lambda s, v=v: s["residual_latest"] == f"residual@{v}")
    w1, w2 = decode_residual(good[1]), decode_residual(good[2])
    expect_acting(harness.answers(harness.stream(rng, count=40)), w2)

    v3 = blob(3)
    (header_len,) = struct.unpack("<Q", v3[:8])
    tampered = bytearray(v3)
    tampered[8 + header_len + 1000] ^= 0x10
    bad = {
        "tampered": (bytes(tampered), "tampered"),
        "truncated": (v3[: len(v3) // 2], "truncated"),
        "garbage": (np.random.default_rng(5).bytes(2000), "not"),
        "older": (blob(1, seed=11), "not newer"),
        "replayed": (good[2], "not newer"),
        "dims": (blob(4, obs_dim=OBS_DIM + 3), "obs_dim=42"),
        "model_id": (blob(5, model_id="other-residual"), "another model"),
        "base": (blob(6, base="graph-policy@7"), "trained against base graph-policy@7"),
    }
    for n, (key, (payload, fragment)) in enumerate(bad.items(), start=1):
        harness.publish_blob(payload)
        status = harness.wait_status(lambda s, n=n: s["weights_refused"] == n)
        assert fragment in status["last_weight_refusal"], (key, status["last_weight_refusal"])
        assert status["residual"] == "residual@2", key
    expect_acting(harness.answers(harness.stream(rng, count=40)), w2)
    status = harness.wait_status(lambda s: s["weights_refused"] == len(bad))
    assert status["weights_received"] == 2 + len(bad) and status["weights_accepted"] == 2
    assert status["residual_history"] == [1, 2] and status["residual_latest"] == "residual@2"

    # Roll back to version 1 (ros2 param set /policy residual_version 1), mid-stream.
    result = harness.set_param("residual_version", 1)
    assert result.successful, result.reason
    expect_acting(harness.answers(harness.stream(rng, count=30)), w1)
    # A version that is not loaded is refused with the reason; version 1 keeps acting.
    result = harness.set_param("residual_version", 7)
    assert not result.successful and "not loaded" in result.reason, result.reason
    # While pinned, a newer blob is accepted into the history but does not take over.
    harness.publish_blob(blob(3))
    harness.wait_status(lambda s: s["weights_accepted"] == 3)
    expect_acting(harness.answers(harness.stream(rng, count=30)), w1)
    # 0 = zero residual; -1 = follow the newest again.
    assert harness.set_param("residual_version", 0).successful
    expect_acting(harness.answers(harness.stream(rng, count=30)), None)
    assert harness.set_param("residual_version", -1).successful
    expect_acting(harness.answers(harness.stream(rng, count=30)), decode_residual(blob(3)))
    status = harness.wait_status(lambda s: s["residual_history"] == [1, 2, 3])
    assert status["residual"] == "residual@3" and status["dropped"] == 0


def test_base_model_swap_drops_a_residual_of_another_base(start, harness, model_paths) -> None:
    start("policy", model=str(model_paths["v1"]), status_rate_hz=10.0)
    harness.wait_ready()
    rng = np.random.default_rng(2)
    harness.warm_up(rng)
    harness.publish_blob(blob(1, base="graph-policy@1"))
    harness.wait_status(lambda s: s["residual_latest"] == "residual@1")
    w1 = decode_residual(blob(1, base="graph-policy@1"))
    expect_acting(harness.answers(harness.stream(rng, count=20)), w1)

    harness.set_model(model_paths["v2"], "graph-policy@2")
    expect_acting(harness.answers(harness.stream(rng, count=30)), None, base_tag="graph-policy@2")
    status = harness.wait_status(lambda s: s["model"] == "graph-policy@2")
    assert status["residual"] == "" and status["residual_history"] == [1]

    # A residual for the new base is accepted and acts; one for "any base" survives swaps.
    harness.publish_blob(blob(2, base="graph-policy@2"))
    harness.wait_status(lambda s: s["residual_latest"] == "residual@2")
    w2 = decode_residual(blob(2, base="graph-policy@2"))
    expect_acting(harness.answers(harness.stream(rng, count=30)), w2, base_tag="graph-policy@2")
    harness.publish_blob(blob(3, base=""))
    harness.wait_status(lambda s: s["residual_latest"] == "residual@3")
    harness.set_model(model_paths["v1"], "graph-policy@1")
    w3 = decode_residual(blob(3, base=""))
    expect_acting(harness.answers(harness.stream(rng, count=30)), w3, base_tag="graph-policy@1")


def test_restarted_policy_node_gets_the_latest_blob(start, harness, model_paths) -> None:
    """Transient local: a policy node that (re)joins after the blobs were published gets the
    latest one from the learner's publisher and runs it once it passed its checks on the
    first real observations."""
    first = start("policy", model=str(model_paths["v1"]), status_rate_hz=10.0)
    harness.wait_ready()
    rng = np.random.default_rng(3)
    harness.warm_up(rng)
    for v in (1, 2):
        harness.publish_blob(blob(v))
        harness.wait_status(lambda s, v=v: s["residual_latest"] == f"residual@{v}")
    first.kill()  # a crash; the learner's publisher keeps the last blob
    assert wait_until(lambda: not first.alive(), timeout=5.0)
    with harness.lock:
        harness.status.clear()

    # (DDS may still list the dead node's endpoints until its lease runs out, so the new node
    # is recognised by its fresh counters, not by the match counts.)
    start("policy", model=str(model_paths["v1"]), status_rate_hz=10.0)
    status = harness.wait_status(lambda s: s["weights_received"] >= 1, timeout=READY_TIMEOUT)
    assert status["weights_received"] == 1 and status["weights_accepted"] == 0
    # It is checked on real observations before it may act: the first ones run without it.
    harness.warm_up(rng)
    status = harness.wait_status(lambda s: s["weights_accepted"] == 1)
    assert status["residual_history"] == [2] and status["residual_latest"] == "residual@2"
    expect_acting(harness.answers(harness.stream(rng, count=30)), decode_residual(blob(2)))
