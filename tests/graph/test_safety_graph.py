"""The safety node as a real process over DDS: the only way a command reaches the robot.

Each test starts ``python -m vlarl.nodes.safety`` (the ``start`` fixture), plays policy,
observation, hand position and teleoperation from an in-test rclpy node, and checks every
command that comes back: good actions pass with their stamp and tag; NaN/inf, malformed and
out-of-range actions (also hypothesis-generated streams) never produce a non-finite or
out-of-bounds command and the residual part never exceeds delta; when actions stop, holds start
within the watchdog timeout; the e-stop latches and releases; teleoperation overrides while
fresh; invalid parameter values are refused. The issue-12 findings each have a test: a
future-stamped action locks nothing out, reserved frame ids are refused, a flood is rate limited
per unit of time (one command per observation), limits cannot be relaxed beyond the start
envelope and the e-stop is released only explicitly, and sim_robot ignores a rogue publisher
on safety/command.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlarl.graph import wait_until
from vlarl.topics import (
    ACTION_NAMES,
    COMMAND,
    OBSERVATION,
    POLICY_ACTION,
    SAFETY_ESTOP,
    SAFETY_STATUS,
    TASK_STATE,
    TELEOP,
)

pytestmark = pytest.mark.graph

T0_NS = 1_000 * 1_000_000_000  # synthetic sample stamps start here
DT_NS = 12_500_000  # 80 Hz
READY_TIMEOUT = 20.0
REPLY_TIMEOUT = 2.0
HAND = (0.0, 0.6, 0.2)  # inside the default workspace box
TAG = "test-model@1+residual@1"
# Defaults from config/safety.yaml that the checks below rely on.
DELTA = 0.3
RATE = 1.0
RATE_PER_S = 80.0
WATCHDOG_S = 0.1
# The test node plays ticks far faster than 80 Hz; tests of the arithmetic lift the per-second
# rate limit (the per-command limit stays) so that it never binds there. The per-second limit
# has its own tests against the defaults.
FAST = {"max_delta_per_s": 1e5, "gripper_max_delta_per_s": 1e5}


class Command:
    __slots__ = ("frame_id", "position", "received", "stamp_ns")

    def __init__(self, received: float, stamp_ns: int, frame_id: str, position: np.ndarray):
        self.received = received
        self.stamp_ns = stamp_ns
        self.frame_id = frame_id
        self.position = position


class Harness:
    """In-test rclpy node: plays the policy, perception, robot state and teleop sides."""

    def __init__(self, context: Any) -> None:
        from geometry_msgs.msg import TwistStamped
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from std_srvs.srv import SetBool
        from trajectory_msgs.msg import JointTrajectory

        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE
        )
        self.node = Node("safety_test", context=context)
        self.action_pub = self.node.create_publisher(JointTrajectory, POLICY_ACTION, qos)
        self.obs_pub = self.node.create_publisher(JointState, OBSERVATION, qos)
        self.state_pub = self.node.create_publisher(JointState, TASK_STATE, qos)
        self.teleop_pub = self.node.create_publisher(TwistStamped, TELEOP, qos)
        self.lock = threading.Lock()
        self.commands: list[Command] = []
        self.status: list[dict[str, Any]] = []
        self.node.create_subscription(JointState, COMMAND, self._on_command, qos)
        self.node.create_subscription(String, SAFETY_STATUS, self._on_status, qos)
        self.estop_client: Any = self.node.create_client(SetBool, SAFETY_ESTOP)
        self.param_client: Any = self.node.create_client(SetParameters, "/safety/set_parameters")
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self.spinner.start()
        self.stamp_ns = T0_NS

    # ------------------------------------------------------------------ plumbing
    def _on_command(self, msg: Any) -> None:
        from vlarl.ros.msgs import stamp_to_ns

        assert list(msg.name) == list(ACTION_NAMES)
        cmd = Command(
            time.monotonic(),
            stamp_to_ns(msg.header.stamp),
            msg.header.frame_id,
            np.asarray(msg.position, dtype=np.float64),
        )
        with self.lock:
            self.commands.append(cmd)

    def _on_status(self, msg: Any) -> None:
        with self.lock:
            self.status.append(json.loads(msg.data))

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.spinner.join(timeout=2.0)

    def wait_ready(self) -> None:
        from vlarl.ros.msgs import ns_to_stamp

        def matched() -> bool:
            return (
                self.action_pub.get_subscription_count() >= 1
                and self.obs_pub.get_subscription_count() >= 1
                and self.state_pub.get_subscription_count() >= 1
                and self.teleop_pub.get_subscription_count() >= 1
                and self.node.count_publishers(COMMAND) >= 1
                and bool(self.status_snapshot())
            )

        assert wait_until(matched, timeout=READY_TIMEOUT), "safety node did not come up"
        assert self.estop_client.wait_for_service(timeout_sec=READY_TIMEOUT)
        assert self.param_client.wait_for_service(timeout_sec=READY_TIMEOUT)
        # Subscriptions are matched both ways once a probe observation gets a hold back
        # (the watchdog has tripped: no policy yet).
        probe = self.next_stamp()

        def probe_answered() -> bool:
            self.publish_state(probe)
            self.obs_pub.publish(self._vector(np.zeros(3), probe))
            return self.wait_command(lambda c: c.stamp_ns == probe, timeout=0.2) is not None

        del ns_to_stamp
        assert wait_until(probe_answered, timeout=READY_TIMEOUT, interval=0.0)

    def status_snapshot(self) -> dict[str, Any] | None:
        with self.lock:
            return self.status[-1] if self.status else None

    def status_mark(self) -> int:
        with self.lock:
            return len(self.status)

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, *, after: int = 0
    ) -> dict:
        """The newest status message (from index ``after`` on) that satisfies ``predicate``."""
        found: dict[str, Any] = {}

        def check() -> bool:
            with self.lock:
                for s in reversed(self.status[after:]):
                    if predicate(s):
                        found.update(s)
                        return True
            return False

        assert wait_until(check, timeout=timeout), f"status never matched: {self.status[-1:]}"
        return found

    def mark(self) -> int:
        with self.lock:
            return len(self.commands)

    def since(self, mark: int) -> list[Command]:
        with self.lock:
            return list(self.commands[mark:])

    def wait_command(
        self, predicate: Callable[[Command], bool], *, timeout: float, mark: int = 0
    ) -> Command | None:
        deadline = time.monotonic() + timeout
        while True:
            for c in self.since(mark):
                if predicate(c):
                    return c
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.0005)

    # ------------------------------------------------------------------ publishing
    def next_stamp(self) -> int:
        self.stamp_ns += DT_NS
        return self.stamp_ns

    @staticmethod
    def _vector(values: Any, stamp_ns: int) -> Any:
        from vlarl.ros.msgs import ns_to_stamp, vector_msg

        return vector_msg(values, stamp=ns_to_stamp(stamp_ns))

    def publish_state(self, stamp_ns: int, hand: Sequence[float] = HAND) -> None:
        state = np.zeros(39)
        state[:3] = hand
        self.state_pub.publish(self._vector(state, stamp_ns))

    def publish_action(
        self,
        stamp_ns: int,
        base: Any,
        residual: Any,
        *,
        tag: str = TAG,
        names: Sequence[str] = ACTION_NAMES,
        extra_points: int = 0,
    ) -> None:
        """A policy action; ``base``/``residual`` may be any float sequences (even wrong length
        or NaN): the message is built by hand, not by the validating helpers."""
        from builtin_interfaces.msg import Duration
        from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

        from vlarl.ros.msgs import ns_to_stamp

        msg = JointTrajectory()
        msg.header.stamp = ns_to_stamp(stamp_ns)
        msg.header.frame_id = tag
        msg.joint_names = list(names)
        points = []
        for i in range(1 + extra_points):
            p = JointTrajectoryPoint()
            p.positions = [float(v) for v in base]
            p.effort = [float(v) for v in residual]
            p.time_from_start = Duration(sec=0, nanosec=i * DT_NS)
            points.append(p)
        msg.points = points
        self.action_pub.publish(msg)

    def tick(self, base: Any, residual: Any = (0, 0, 0, 0), **kwargs: Any) -> int:
        """One control tick as the graph does it: robot state, observation, policy action."""
        stamp = self.next_stamp()
        self.publish_state(stamp)
        self.obs_pub.publish(self._vector(np.zeros(3), stamp))
        self.publish_action(stamp, base, residual, **kwargs)
        return stamp

    def step(self, base: Any, residual: Any = (0, 0, 0, 0), **kwargs: Any) -> Command:
        """A lock-stepped tick: publish, then wait for the command answering it."""
        tag = kwargs.get("tag", TAG)
        mark = self.mark()
        stamp = self.tick(base, residual, **kwargs)
        cmd = self.wait_command(
            lambda c: c.stamp_ns == stamp and not c.frame_id.startswith("hold:watchdog"),
            timeout=REPLY_TIMEOUT,
            mark=mark,
        )
        assert cmd is not None, f"no command for tick {stamp} ({tag})"
        return cmd

    def publish_teleop(self, values: Sequence[float]) -> None:
        from geometry_msgs.msg import TwistStamped

        msg = TwistStamped()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = values[:3]
        msg.twist.angular.z = values[3]
        self.teleop_pub.publish(msg)

    def release_estop(self, reason: str) -> list[Any]:
        return self.set_parameters(estop_release=reason)

    def estop(self, latch: bool) -> Any:
        from std_srvs.srv import SetBool

        future = self.estop_client.call_async(SetBool.Request(data=latch))
        assert wait_until(future.done, timeout=REPLY_TIMEOUT), "e-stop service did not answer"
        return future.result()

    def set_parameters(self, **values: Any) -> list[Any]:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        )
        future = self.param_client.call_async(request)
        assert wait_until(future.done, timeout=REPLY_TIMEOUT), "set_parameters did not answer"
        response: Any = future.result()
        return list(response.results)


@pytest.fixture
def harness(start: Any, rclpy_context: Any) -> Any:
    safety = start("safety", **FAST)
    h = Harness(rclpy_context)
    try:
        h.wait_ready()
        yield h
        assert safety.alive(), "safety node died during the test"
    finally:
        h.close()


def answers(stamp_ns: int, frame_id: str) -> Callable[[Command], bool]:
    return lambda c: c.stamp_ns == stamp_ns and c.frame_id == frame_id


def assert_command_safe(cmd: Command) -> None:
    assert cmd.position.shape == (4,), cmd.position
    assert np.all(np.isfinite(cmd.position)), cmd.position
    assert np.all(np.abs(cmd.position) <= 1.0), cmd.position


# ---------------------------------------------------------------------------- (a)


def test_good_actions_pass_with_their_stamp_and_tag(harness: Harness) -> None:
    rng = np.random.default_rng(0)
    latencies = []
    for k in range(40):
        base = 0.6 * np.sin(0.2 * k + np.arange(4))
        residual = rng.uniform(-0.25, 0.25, 4)
        sent = time.monotonic()
        cmd = harness.step(base, residual)
        latencies.append(cmd.received - sent)
        assert cmd.frame_id == TAG
        np.testing.assert_allclose(cmd.position, base + residual, atol=1e-12)
    lat = np.array(latencies) * 1e3
    print(f"\naction -> command round trip: p50 {np.median(lat):.2f} ms, max {lat.max():.2f} ms")
    # (The status may already say "holding": the watchdog trips once the ticks stop.)
    status = harness.wait_status(lambda s: s["policy_commands"] >= 40, timeout=3.0)
    assert status["rejected"] == 0 and status["clamped"] == 0


# ---------------------------------------------------------------------------- (b)

BAD_STREAM: list[tuple[list[float], list[float], Sequence[str], int, bool]] = [
    # (base, residual, names, extra_points, counted as rejected)
    ([math.nan, 0, 0, 0], [0, 0, 0, 0], ACTION_NAMES, 0, True),
    ([0, 0, 0, 0], [0, math.inf, 0, 0], ACTION_NAMES, 0, True),
    ([-math.inf, 0, 0, 0], [0, 0, 0, 0], ACTION_NAMES, 2, True),
    ([0, 0, 0], [0, 0, 0, 0], ACTION_NAMES, 0, True),
    ([0, 0, 0, 0, 0], [0, 0, 0, 0], ACTION_NAMES, 0, True),
    ([0, 0, 0, 0], [0, 0], ACTION_NAMES, 0, True),
    ([0.1, 0, 0, 0], [0, 0, 0, 0], ("x", "y", "z", "g"), 0, True),
    ([0.1, 0, 0, 0], [0, 0, 0, 0], ACTION_NAMES[:3], 0, True),
    ([5.0, -7.0, 1e300, -1e300], [0, 0, 0, 0], ACTION_NAMES, 0, False),
    ([0.0, 0.0, 0.0, 0.0], [10.0, -10.0, 0.9, -0.9], ACTION_NAMES, 0, False),
    ([0.9, 0.9, -0.9, 0.9], [1e200, -1e200, 0.0, 0.0], ACTION_NAMES, 0, False),
]


def check_stream(
    commands: list[Command],
    sent: dict[int, np.ndarray],
    prev: np.ndarray | None,
    tags: Sequence[str] = (TAG,),
) -> np.ndarray | None:
    """Every command safe; policy commands within delta of the clipped base per dimension,
    except where the rate limit binds (``prev`` is the command before, in order)."""
    rates = np.array([RATE, RATE, RATE, 2.0])
    for cmd in commands:
        assert_command_safe(cmd)
        if cmd.frame_id.startswith("hold:"):
            assert np.all(cmd.position[:3] == 0.0)
        elif cmd.frame_id in tags:
            base = sent[cmd.stamp_ns]
            for i in range(4):
                within = abs(cmd.position[i] - np.clip(base[i], -1, 1)) <= DELTA + 1e-9
                rate_bound = prev is not None and abs(cmd.position[i] - prev[i]) >= rates[i] - 1e-9
                assert within or rate_bound, (i, cmd.position, base, prev)
            if prev is not None:
                assert np.all(np.abs(cmd.position - prev) <= rates + 1e-9), (cmd.position, prev)
        else:
            raise AssertionError(f"unexpected command source {cmd.frame_id!r}")
        prev = cmd.position
    return prev


def test_bad_actions_never_reach_the_command_topic(harness: Harness) -> None:
    rejected_before = harness.status_snapshot()["rejected"]  # type: ignore[index]
    expected_rejects = 0
    sent: dict[int, np.ndarray] = {}
    mark = harness.mark()
    harness.step([0.2, 0.2, 0.2, 0.2])  # a known previous command
    for base, residual, names, extra, rejected in BAD_STREAM:
        stamp = harness.tick(base, residual, names=names, extra_points=extra, tag="bad@1")
        sent[stamp] = np.asarray([*base, 0, 0, 0, 0][:4], dtype=np.float64)
        expected_rejects += rejected
        if not rejected:
            cmd = harness.wait_command(
                answers(stamp, "bad@1"),
                timeout=REPLY_TIMEOUT,
                mark=mark,
            )
            assert cmd is not None, f"no clipped command for {base} + {residual}"
            assert_command_safe(cmd)
            np.testing.assert_array_less(
                np.abs(cmd.position - np.clip(sent[stamp], -1, 1)), DELTA + 1e-9
            )
    harness.step([0.0, 0.0, 0.0, 0.0])  # flush: everything before it has been handled
    for cmd in harness.since(mark):
        assert_command_safe(cmd)
        if cmd.frame_id == "bad@1":
            assert cmd.stamp_ns in sent
    status = harness.wait_status(
        lambda s: s["rejected"] >= rejected_before + expected_rejects, timeout=3.0
    )
    assert status["rejected"] == rejected_before + expected_rejects
    assert status["rejected_reasons"]["nonfinite"] >= 3
    assert status["rejected_reasons"]["malformed"] >= 5


floats_any = st.one_of(
    st.floats(-1.5, 1.5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 2.0, -2.0]),
)
vec = st.one_of(
    st.lists(st.floats(-1.5, 1.5), min_size=4, max_size=4),  # plausible
    st.lists(floats_any, min_size=4, max_size=4),  # anything, NaN/inf/huge included
)
action = st.tuples(
    st.one_of(vec, st.lists(floats_any, min_size=0, max_size=6)),  # base
    st.one_of(vec, st.just([]), st.lists(floats_any, min_size=1, max_size=6)),  # residual
    st.sampled_from([ACTION_NAMES] * 10 + [ACTION_NAMES[::-1], ("dx", "dy", "dz")]),
    st.integers(0, 2),  # extra chunk points (the same numbers again)
)


def test_hypothesis_action_streams_only_give_safe_commands(harness: Harness) -> None:
    state: dict[str, Any] = {"prev": None, "examples": 0, "published": 0, "sent": 0}
    sent: dict[int, np.ndarray] = {}
    deadline = time.monotonic() + 35.0

    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(stream=st.lists(action, min_size=1, max_size=6))
    def run(stream: list[tuple[list[float], list[float], tuple[str, ...], int]]) -> None:
        assert time.monotonic() < deadline, "hypothesis run took too long"
        mark = harness.mark()
        for base, residual, names, extra in stream:
            stamp = harness.next_stamp()
            harness.publish_state(stamp)
            harness.obs_pub.publish(harness._vector(np.zeros(3), stamp))
            harness.publish_action(
                stamp, base, residual, names=names, extra_points=extra, tag="hypothesis@1"
            )
            sent[stamp] = np.asarray((list(base) + [0.0] * 4)[:4], dtype=np.float64)
        flush = harness.step([0.0, 0.0, 0.0, 0.0]).stamp_ns
        sent[flush] = np.zeros(4)
        new = harness.since(mark)
        state["prev"] = check_stream(new, sent, state["prev"], tags=(TAG, "hypothesis@1"))
        state["examples"] += 1
        state["sent"] += len(stream)
        state["published"] += sum(1 for c in new if c.frame_id == "hypothesis@1")

    run()
    print(
        f"\nhypothesis: {state['examples']} streams, {state['sent']} actions, "
        f"{state['published']} passed (clamped/limited), the rest rejected"
    )
    assert state["examples"] >= 20 and state["published"] >= 5


# ---------------------------------------------------------------------------- (c)


def test_safety_holds_within_its_timeout_when_the_policy_stops(harness: Harness) -> None:
    for _ in range(5):
        harness.step([0.1, 0.0, 0.0, 0.5])
    trips_before = harness.wait_status(lambda s: s["state"] == "ok", timeout=3.0)["watchdog_trips"]
    after = harness.status_mark()
    # The "policy" runs free at 80 Hz for half a second, then dies.
    last_sent = 0.0
    for _ in range(40):
        harness.tick([0.1, 0.0, 0.0, 0.5])
        last_sent = time.monotonic()
        time.sleep(DT_NS / 1e9)
    mark = harness.mark()
    hold = harness.wait_command(
        lambda c: c.frame_id == "hold:watchdog", timeout=WATCHDOG_S + 2.0, mark=mark
    )
    assert hold is not None, "no hold after the policy stopped"
    gap = hold.received - last_sent
    print(f"\nwatchdog: first hold {gap * 1e3:.1f} ms after the last action "
          f"(timeout {WATCHDOG_S * 1e3:.0f} ms)")  # fmt: skip
    assert gap <= WATCHDOG_S + 0.05, f"hold came {gap:.3f} s after the last action"
    assert gap >= WATCHDOG_S - 0.01, f"hold came too early: {gap:.3f} s"
    np.testing.assert_allclose(hold.position, [0.0, 0.0, 0.0, 0.5])  # gripper kept
    # Holds keep coming at the minimum rate while nothing arrives...
    time.sleep(0.5)
    holds = [c for c in harness.since(mark) if c.frame_id == "hold:watchdog"]
    assert len(holds) >= 6, len(holds)
    # ...and each new observation is answered with a hold carrying its stamp.
    for _ in range(3):
        stamp = harness.next_stamp()
        harness.obs_pub.publish(harness._vector(np.zeros(3), stamp))
        c = harness.wait_command(
            answers(stamp, "hold:watchdog"),
            timeout=REPLY_TIMEOUT,
            mark=mark,
        )
        assert c is not None
    status = harness.wait_status(lambda s: s["state"] == "holding", timeout=3.0, after=after)
    assert status["reason"] == "watchdog" and status["watchdog_trips"] == trips_before + 1
    # The policy comes back: commands follow it again.
    after = harness.status_mark()
    cmd = harness.step([0.1, 0.0, 0.0, 0.5])
    assert cmd.frame_id == TAG
    harness.wait_status(lambda s: s["state"] == "ok", timeout=3.0, after=after)


# ---------------------------------------------------------------------------- (d)


def test_estop_latches_a_hold_until_released(harness: Harness) -> None:
    harness.step([0.3, 0.0, -0.2, 0.7])
    mark = harness.mark()
    reply = harness.estop(True)
    assert reply.success
    first = harness.wait_command(
        lambda c: c.frame_id == "hold:estop", timeout=REPLY_TIMEOUT, mark=mark
    )
    assert first is not None  # immediate hold on latching
    for _ in range(10):
        cmd = harness.step([0.9, 0.9, 0.9, -1.0], tag=TAG)
        assert cmd.frame_id == "hold:estop"
        np.testing.assert_array_equal(cmd.position, [0.0, 0.0, 0.0, 0.7])
    harness.publish_teleop([0.5, 0.5, 0.5, 0.5])  # not even teleop gets through
    cmd = harness.step([0.9, 0.9, 0.9, -1.0])
    assert cmd.frame_id == "hold:estop"
    status = harness.wait_status(lambda s: s["estop"], timeout=3.0)
    assert status["state"] == "holding" and status["reason"] == "estop"
    time.sleep(0.25)  # let the teleop message go stale
    after = harness.status_mark()
    refused = harness.estop(False)  # SetBool false releases nothing
    assert not refused.success and "estop_release" in refused.message
    cmd = harness.step([0.3, 0.0, -0.2, 0.7])
    assert cmd.frame_id == "hold:estop"
    assert not harness.release_estop("   ")[0].successful  # a release must say why
    results = harness.release_estop("test: released on purpose")
    assert all(r.successful for r in results), [r.reason for r in results]
    cmd = harness.step([0.3, 0.0, -0.2, 0.7])
    assert cmd.frame_id == TAG
    np.testing.assert_allclose(cmd.position, [0.3, 0.0, -0.2, 0.7])
    status = harness.wait_status(lambda s: not s["estop"], timeout=3.0, after=after)
    assert status["estop_latches"] == 1 and status["estop_releases"] == 1
    assert status["last_estop_release"] == "test: released on purpose"


# ---------------------------------------------------------------------------- (e)


def test_teleop_overrides_while_fresh_then_control_returns(harness: Harness) -> None:
    harness.step([0.1, 0.1, 0.1, -1.0])
    teleop = [0.4, -0.3, 0.2, 0.8]
    for _ in range(10):
        harness.publish_teleop(teleop)
        time.sleep(0.002)
        cmd = harness.step([0.1, 0.1, 0.1, -1.0])
        assert cmd.frame_id == "teleop", cmd.frame_id
        np.testing.assert_allclose(cmd.position, teleop)
    harness.publish_teleop([math.nan, 0.0, 0.0, 0.0])  # refused, never used
    cmd = harness.step([0.1, 0.1, 0.1, -1.0])
    assert np.all(np.isfinite(cmd.position))
    harness.publish_teleop([3.0, -3.0, 0.0, 2.0])  # clipped to the bounds
    time.sleep(0.01)
    cmd = harness.step([0.1, 0.1, 0.1, -1.0])
    assert cmd.frame_id == "teleop"
    np.testing.assert_allclose(cmd.position, [1.0, -1.0, 0.0, 1.0])
    time.sleep(0.3)  # teleop_timeout_s = 0.2: the policy is back in control
    for _ in range(3):
        cmd = harness.step([0.1, 0.1, 0.1, -1.0])
    assert cmd.frame_id == TAG
    np.testing.assert_allclose(cmd.position, [0.1, 0.1, 0.1, -1.0])
    status = harness.wait_status(lambda s: s["teleop_commands"] >= 11, timeout=3.0)
    assert status["teleop_rejected"] == 1


# ---------------------------------------------------------------------------- (f)


def test_invalid_parameter_values_are_refused(harness: Harness) -> None:
    bad: list[dict[str, Any]] = [
        {"delta": -0.5},
        {"delta": math.nan},
        {"action_low": [0.5, -1.0, -1.0, -1.0]},
        {"action_low": [-1.0, -1.0, -1.0]},
        {"workspace_low": [0.0, 0.0, 1.0], "workspace_high": [1.0, 1.0, 0.5]},
        {"watchdog_timeout_s": 0.005},  # shorter than two 200 Hz watchdog checks
        {"initial_gripper": 3.0},
        {"executor": "single"},  # read-only
        {"delta": "wide"},  # wrong type
    ]
    for values in bad:
        results = harness.set_parameters(**values)
        assert results and not all(r.successful for r in results), values
        assert any(r.reason for r in results), values
    # Still the defaults: residual clamped to 0.3.
    cmd = harness.step([0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(cmd.position, [0.3, 0.3, 0.3, 0.0])
    # A valid change is accepted and takes effect at once.
    results = harness.set_parameters(delta=0.1, action_high=[1.0, 1.0, 0.25, 1.0])
    assert all(r.successful for r in results), [r.reason for r in results]
    cmd = harness.step([0.0, 0.0, 0.2, 0.0], [0.5, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(cmd.position, [0.1, 0.1, 0.25, 0.0])


def test_single_threaded_executor_serves_the_same(start: Any, rclpy_context: Any) -> None:
    """The fallback executor: actions pass, a stopped policy gets held."""
    safety = start("safety", executor="single", **FAST)
    h = Harness(rclpy_context)
    try:
        h.wait_ready()
        for _ in range(5):
            cmd = h.step([0.2, -0.1, 0.0, 0.4], [0.05, 0.0, 0.0, 0.0])
            assert cmd.frame_id == TAG
            np.testing.assert_allclose(cmd.position, [0.25, -0.1, 0.0, 0.4])
        mark, last = h.mark(), time.monotonic()
        hold = h.wait_command(lambda c: c.frame_id == "hold:watchdog", timeout=2.0, mark=mark)
        assert hold is not None and hold.received - last <= WATCHDOG_S + 0.05
        assert safety.alive()
    finally:
        h.close()


def test_bad_startup_parameters_stop_the_node(start: Any) -> None:
    node = start("safety", watchdog_timeout_s=0.001)
    assert wait_until(lambda: not node.alive(), timeout=15.0), "started with a bad parameter"
    assert node.process.returncode != 0


def test_ctrl_c_sends_a_last_hold_and_exits_cleanly(start: Any, rclpy_context: Any) -> None:
    safety = start("safety")
    h = Harness(rclpy_context)
    try:
        h.wait_ready()
        h.step([0.2, 0.0, 0.0, 0.4])
        mark = h.mark()
        assert safety.stop(timeout=5.0) == 0
        last = h.wait_command(lambda c: c.frame_id == "hold:shutdown", timeout=2.0, mark=mark)
        assert last is not None
        np.testing.assert_array_equal(last.position, [0.0, 0.0, 0.0, 0.4])
    finally:
        h.close()


# ---------------------------------------------------------------------------- issue 12


@pytest.fixture
def defaults(start: Any, rclpy_context: Any) -> Any:
    """A safety node with the shipped defaults (config/safety.yaml), per-second rate included."""
    safety = start("safety")
    h = Harness(rclpy_context)
    try:
        h.wait_ready()
        yield h
        assert safety.alive(), "safety node died during the test"
    finally:
        h.close()


def test_a_future_stamped_action_locks_nothing_out(harness: Harness) -> None:
    """Finding 1: one action stamped an hour ahead used to lock the policy out."""
    harness.step([0.1, 0.0, 0.0, 0.0])
    hour_ns = 3600 * 1_000_000_000
    harness.publish_action(harness.stamp_ns + hour_ns, [0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0])
    cmd = harness.step([0.2, 0.0, 0.0, 0.0])  # answered at once
    assert cmd.frame_id == TAG
    np.testing.assert_allclose(cmd.position, [0.2, 0.0, 0.0, 0.0])
    # A forged observation an hour ahead: the next real observation is followed at once.
    harness.obs_pub.publish(harness._vector(np.zeros(3), harness.stamp_ns + hour_ns))
    cmd = harness.step([0.3, 0.0, 0.0, 0.0])
    assert cmd.frame_id == TAG
    for c in harness.since(0):
        assert c.stamp_ns < harness.stamp_ns + hour_ns or c.frame_id.startswith("hold:")
    status = harness.wait_status(lambda s: s["rejected_reasons"]["future"] >= 1, timeout=3.0)
    assert status["rejected_reasons"]["future"] == 1


def test_reserved_and_foreign_frame_ids_are_refused(harness: Harness) -> None:
    """Finding 2: actions tagged 'teleop' or 'hold:*' were relayed as moving commands."""
    harness.step([0.1, 0.0, 0.0, 0.0])
    mark = harness.mark()
    tags = ["teleop", "hold:estop", "hold:watchdog", "", "not a tag", "m@1+r@2+x@3"]
    for tag in tags:
        harness.tick([0.6, 0.6, 0.0, 0.0], tag=tag)
    harness.step([0.0, 0.0, 0.0, 0.0])  # flush
    for c in harness.since(mark):
        assert c.frame_id == TAG or c.frame_id == "hold:watchdog", c.frame_id
        assert c.frame_id != "hold:watchdog" or np.all(c.position[:3] == 0.0)
    status = harness.wait_status(lambda s: s["rejected_reasons"]["tag"] >= len(tags), timeout=3.0)
    assert status["rejected_reasons"]["tag"] == len(tags)
    assert status["last_rejection"]["reason"] == "tag"
    assert "version tag" in status["last_rejection"]["detail"]


def test_a_flood_is_rate_limited_per_time_and_per_observation(defaults: Harness) -> None:
    """Finding 3: a 2 kHz flood swung the command from -1 to +1 inside one tick."""
    h = defaults
    h.step([0.0, 0.0, 0.0, 0.0])
    # Many actions for one observation: one command.
    mark = h.mark()
    stamp = h.next_stamp()
    h.publish_state(stamp)
    h.obs_pub.publish(h._vector(np.zeros(3), stamp))
    for k in range(50):
        h.publish_action(stamp, [(-1.0) ** k, 0.0, 0.0, 0.0], [0, 0, 0, 0])
    h.step([0.0, 0.0, 0.0, 0.0])  # flush
    answered = [c for c in h.since(mark) if c.stamp_ns == stamp and c.frame_id == TAG]
    assert len(answered) == 1, len(answered)
    # An observation and an action each, as fast as this process can publish them.
    time.sleep(0.05)
    mark = h.mark()
    for k in range(300):
        stamp = h.next_stamp()
        h.obs_pub.publish(h._vector(np.zeros(3), stamp))
        h.publish_action(stamp, [(-1.0) ** k, 0.0, 0.0, 0.0], [0, 0, 0, 0])
    h.publish_state(h.stamp_ns)
    assert h.wait_command(lambda c: c.stamp_ns == h.stamp_ns, timeout=REPLY_TIMEOUT, mark=mark)
    flood = [c for c in h.since(mark) if c.frame_id == TAG]
    assert len(flood) >= 20, len(flood)
    xs = np.array([c.position[0] for c in flood])
    travelled = float(np.abs(np.diff(xs)).sum())
    span = flood[-1].received - flood[0].received
    # Receive times lag send times by a jittery amount: allow 20 ms of it.
    allowed = RATE + RATE_PER_S * (span + 0.02)
    print(f"\nflood: {len(flood)} commands in {span * 1e3:.1f} ms, x travelled {travelled:.2f}")
    assert travelled <= allowed, (travelled, allowed, span)
    assert np.all(np.abs(np.diff(xs)) <= RATE + 1e-9)


def test_limits_can_only_be_tightened_and_the_estop_needs_an_explicit_release(
    defaults: Harness,
) -> None:
    """Finding 4: every limit could be relaxed through set_parameters; anyone released the
    e-stop."""
    h = defaults
    relax: list[dict[str, Any]] = [
        {"delta": 0.5},
        {"delta": 100.0},
        {"action_high": [100.0, 1.0, 1.0, 1.0]},
        {"action_low": [-1.0, -1.0, -1.0, -50.0]},
        {"max_delta_per_tick": 2.0},
        {"max_delta_per_s": 1e6},
        {"watchdog_timeout_s": 60.0},
        {"watchdog_timeout_s": 0.5},
        {"max_action_age_s": 10.0},
        {"teleop_timeout_s": 5.0},
        {"workspace_enabled": False},
        {"workspace_high": [5.0, 5.0, 5.0]},
        {"initial_gripper": 1.0},
        {"delta": 0.1, "watchdog_timeout_s": 0.5},  # one relaxation spoils the whole call
    ]
    for values in relax:
        results = h.set_parameters(**values)
        assert results and not all(r.successful for r in results), values
        assert any(r.reason for r in results), values
    cmd = h.step([0.9, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0])  # still the start limits
    np.testing.assert_allclose(cmd.position, [1.0, 0.0, 0.0, 0.0])
    results = h.set_parameters(delta=0.5)
    assert "hard bound" in results[0].reason and "tightened" in results[0].reason
    # Tightening works, and so does going back up to the start value.
    assert all(r.successful for r in h.set_parameters(action_high=[0.4, 1.0, 1.0, 1.0]))
    time.sleep(0.02)
    cmd = h.step([0.9, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(cmd.position, [0.4, 0.0, 0.0, 0.0])
    assert all(r.successful for r in h.set_parameters(action_high=[1.0, 1.0, 1.0, 1.0]))
    # The e-stop: SetBool false and an empty reason release nothing.
    assert h.estop(True).success
    assert not h.estop(False).success
    assert not h.release_estop("  ")[0].successful  # a reason is required
    h.release_estop("")  # setting it empty is no release either
    assert h.step([0.1, 0.0, 0.0, 0.0]).frame_id == "hold:estop"
    assert all(r.successful for r in h.release_estop("operator: test over"))
    assert h.step([0.1, 0.0, 0.0, 0.0]).frame_id == TAG
    status = h.wait_status(lambda s: s["estop_releases"] == 1, timeout=3.0)
    assert status["relaxations_refused"] >= 10 and status["estop_release_refused"] >= 1
    assert status["last_estop_release"] == "operator: test over"


@pytest.mark.parametrize("command_source", ["safety", "rogue"])
def test_sim_robot_obeys_only_the_safety_node(
    start: Any, rclpy_context: Any, command_source: str
) -> None:
    """Finding 4: a publisher on safety/command moved the hand with the e-stop latched.

    With ``command_source`` = the rogue's own name (the control case) its commands step the
    robot: the check, not something else, is what stops them."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState

    from vlarl.ros.msgs import stamp_to_ns

    start("safety", **FAST)
    start("sim_robot", camera_rate_hz=0.0, lockstep_timeout_s=0.1, command_source=command_source)
    h = Harness(rclpy_context)
    rogue = Node("rogue", context=rclpy_context)
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    rogue_pub = rogue.create_publisher(JointState, COMMAND, qos)
    samples: list[tuple[int, np.ndarray]] = []
    lock = threading.Lock()

    def on_state(msg: Any) -> None:
        with lock:
            samples.append((stamp_to_ns(msg.header.stamp), np.array(msg.position[:3])))

    h.node.create_subscription(JointState, TASK_STATE, on_state, qos)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(rogue)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert wait_until(lambda: bool(samples), timeout=60.0), "sim_robot did not come up"
        assert wait_until(lambda: rogue_pub.get_subscription_count() >= 2, timeout=READY_TIMEOUT)
        assert h.estop_client.wait_for_service(timeout_sec=READY_TIMEOUT)
        assert h.param_client.wait_for_service(timeout_sec=READY_TIMEOUT)
        assert h.estop(True).success
        with lock:
            first_stamp, first_hand = samples[-1]
        # The rogue answers every sample with a full +y command, for a second (the control
        # case: until the robot took 20 steps, discovery of the rogue's name may take a while).
        deadline = time.monotonic() + (1.0 if command_source == "safety" else 10.0)
        answered = 0
        while time.monotonic() < deadline:
            if command_source == "rogue" and len({s for s, _ in samples}) > 20:
                break
            with lock:
                stamp = samples[-1][0]
            msg = h._vector([0.0, 1.0, 0.0, 1.0], stamp)
            msg.name = list(ACTION_NAMES)
            rogue_pub.publish(msg)
            answered += 1
            time.sleep(0.005)
        with lock:
            newest_stamp = max(s for s, _ in samples)
            rogue_moved = samples[-1][1] - first_hand
        if command_source == "rogue":
            assert newest_stamp > first_stamp and rogue_moved[1] > 0.02, rogue_moved
            return
        assert newest_stamp == first_stamp, "the robot stepped on a rogue command"
        np.testing.assert_allclose(rogue_moved, 0.0, atol=1e-9)
        # The real safety node is obeyed: release, then play perception and policy for the
        # robot's samples (policy +y): the hand moves.
        assert all(r.successful for r in h.release_estop("test: rogue gone"))
        for _ in range(40):
            with lock:
                stamp = samples[-1][0]
            h.obs_pub.publish(h._vector(np.zeros(3), stamp))
            h.publish_action(stamp, [0.0, 0.5, 0.0, -1.0], [0, 0, 0, 0])
            wait_until(lambda s=stamp: samples[-1][0] > s, timeout=REPLY_TIMEOUT, interval=0.001)
        with lock:
            moved = samples[-1][1] - first_hand
        print(f"\nrogue: {answered} commands ignored; via safety the hand moved {moved} m")
        assert moved[1] > 0.02, moved
    finally:
        executor.shutdown(timeout_sec=2.0)
        rogue.destroy_node()
        spinner.join(timeout=2.0)
        h.close()
