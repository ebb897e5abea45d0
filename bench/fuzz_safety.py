"""Fuzzing the safety node: typed random attacks on every input of a real safety process.

The safety node runs as its own process with the shipped limits (config/safety.yaml: the hard
envelope). This process is the attacker and, between attacks, the honest graph. Hypothesis
strategies generate attacks: sequences of policy actions (any stamp, frame_id, joint names,
chunk, NaN/inf/huge values), teleoperation, observations and hand states (any stamp and
values), e-stop calls (latch and the refused SetBool release), explicit e-stop releases,
parameter changes of every safety parameter (any type, relaxing or tightening) and floods of
any of them (same stamp, stamps stepping by a few microseconds, stamps racing ahead, values
alternating -1/+1).

Every command the node publishes is checked as it arrives, with the safety process's own
publish time (DDS source timestamp) for the per-second rate limit:

- unsafe: non-finite, outside the envelope's action bounds, a hold with xyz motion or a changed
  gripper, a change over the per-command limit (stopping excepted), more travel in any window
  than one burst plus the per-second rate of the window (+2 ms), any command but a hold
  published after an e-stop latch was acknowledged and before a release was requested, a
  moving command whose frame_id is neither a policy version tag nor 'teleop';
- messages: generated attack messages (topics, service and parameter calls); the honest ticks
  of the probes are counted apart (``honest_messages``);
- relaxations_accepted: an accepted parameter change that loosens a limit beyond its start
  value (or changes a read-only one);
- crashes: the safety process died (it is restarted and the run goes on);
- lockouts: after an attack (the node has handled what it was sent, the operator released a
  latched e-stop and restored the limits, teleop messages have gone stale) honest 80 Hz ticks
  are not answered within one watchdog period (0.1 s);
- answered_good_fraction: honest ticks answered by a command carrying their stamp and tag.

    nice -n 5 python bench/fuzz_safety.py [--messages 100000] [--seed 0]

Writes bench/results/fuzz.json and fuzz.png.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.rosenv import ensure_local_discovery

RESULTS = Path(__file__).resolve().parent / "results"
TAG = "fuzz-policy@1+residual@1"
HONEST_DT_NS = 12_500_000  # 80 Hz
HAND = (0.0, 0.6, 0.2)  # inside the workspace box
SOURCE_SLACK_S = 0.002  # safety's monotonic reading vs its publish time
_TAG_PART = r"[^\s@+|]{1,100}@(0|[1-9][0-9]{0,17})"
VERSION_TAG = re.compile(rf"{_TAG_PART}(\+{_TAG_PART})?")
NAMES = ("dx", "dy", "dz", "gripper")


# ----------------------------------------------------------------------------- strategies


def strategies() -> Any:
    """The attack strategy (hypothesis): a list of steps, each one input of the safety node."""
    from hypothesis import strategies as st

    from vlarl.nodes.safety import PARAMS

    any_float = st.one_of(
        st.floats(-1.5, 1.5),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 1.0, -1.0, 0.0]),
    )
    vec = st.one_of(
        st.lists(st.floats(-1.2, 1.2), min_size=4, max_size=4),
        st.lists(any_float, min_size=4, max_size=4),
        st.lists(any_float, min_size=0, max_size=7),
    )
    # Stamps relative to the honest clock (ns), or absolute junk.
    stamp = st.one_of(
        st.tuples(st.just("rel"), st.integers(-200_000_000, 200_000_000)),
        st.tuples(
            st.just("rel"),
            st.sampled_from([3600 * 10**9, -3600 * 10**9, 10**15, -(10**15), 1, -1, 0]),
        ),
        st.tuples(st.just("abs"), st.integers(-(2**31), 2**31 - 1), st.integers(0, 2**32 - 1)),
    )
    frame_id = st.one_of(
        st.just(TAG),
        st.just(TAG),
        st.just(TAG),
        st.just(TAG),
        st.sampled_from(["teleop", "hold:estop", "hold:watchdog", "", "teleop@1", "a@1+b@2+c@3"]),
        st.text(max_size=30),
        st.from_regex(VERSION_TAG, fullmatch=True),
    )
    names = st.sampled_from([NAMES] * 6 + [NAMES[::-1], NAMES[:3], ("x", "y", "z", "g"), ()])
    action = st.tuples(
        st.just("action"), stamp, frame_id, names, st.lists(st.tuples(vec, vec), max_size=3)
    )
    teleop = st.tuples(st.just("teleop"), stamp, st.lists(any_float, min_size=4, max_size=4))
    observation = st.tuples(st.just("observation"), stamp, vec)
    hand = st.tuples(
        st.just("hand"),
        stamp,
        st.one_of(
            st.lists(st.floats(-1.0, 1.5), min_size=3, max_size=3),
            st.lists(any_float, min_size=0, max_size=40),
        ),
    )
    estop = st.tuples(st.just("estop"), st.booleans())
    release = st.tuples(st.just("release"), st.one_of(st.just(""), st.text(max_size=20)))
    by_name = {p.name: p for p in PARAMS}
    param_value = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(0.0, 3.0),
        st.integers(-5, 10**6),
        st.booleans(),
        st.text(max_size=8),
        st.lists(st.floats(-100.0, 100.0), min_size=0, max_size=5),
        st.lists(st.floats(-1.2, 1.2), min_size=3, max_size=4),
    )
    scaled = st.tuples(st.sampled_from(sorted(by_name)), st.floats(0.0, 3.0))
    param = st.tuples(
        st.just("param"),
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from([*sorted(by_name), "no_such_param"]), param_value),
                scaled.map(lambda nv: (nv[0], _scale(by_name[nv[0]].default, nv[1]))),
            ),
            min_size=1,
            max_size=3,
        ),
    )
    single = st.one_of(action, action, teleop, observation, hand, estop, release, param)
    flood = st.tuples(
        st.just("flood"),
        st.one_of(action, teleop, observation, hand),
        st.integers(50, 1500),
        st.sampled_from(["same", "step", "race", "alternate"]),
    )
    return st.lists(st.one_of(single, single, flood), min_size=1, max_size=10)


def _scale(default: Any, factor: float) -> Any:
    """A parameter value near its start value (factor 0..3: tightening or loosening)."""
    if isinstance(default, bool):
        return factor < 1.0
    if isinstance(default, (int, float)):
        return float(default) * factor if isinstance(default, float) else int(default * factor)
    if isinstance(default, list):
        return [float(v) * factor for v in default]
    return default


# ----------------------------------------------------------------------------- checking


@dataclass
class Checker:
    """Online checks of the command stream against the envelope (see the module doc)."""

    low: np.ndarray
    high: np.ndarray
    burst: np.ndarray
    rate: np.ndarray
    unsafe: int = 0
    examples: list[str] = field(default_factory=list)
    prev: np.ndarray | None = None
    # Moving commands (safety's publish time, s) and the e-stop calls that succeeded
    # (latch: when its reply came; release: when it was sent), judged at the end.
    moving_times: list[float] = field(default_factory=list)
    latches: list[float] = field(default_factory=list)
    releases: list[float] = field(default_factory=list)
    # Window check state per component: travel C and min over earlier commands of C - r t.
    travel: np.ndarray = field(default_factory=lambda: np.zeros(4))
    min_slack: np.ndarray = field(default_factory=lambda: np.full(4, np.inf))
    commands: int = 0
    holds: int = 0
    gaps: int = 0

    def gap(self) -> None:
        """Commands were lost on the way here (sequence numbers jumped): start afresh."""
        self.gaps += 1
        self.prev = None
        self.travel[:] = 0.0
        self.min_slack[:] = np.inf

    def bad(self, why: str) -> None:
        self.unsafe += 1
        if len(self.examples) < 20:
            self.examples.append(why)

    def estop_violations(self) -> int:
        """Commands other than holds published after a latch was acknowledged with no release
        requested in between (wall clock: the safety process's source time vs this one's)."""
        latches, releases = np.sort(self.latches), np.sort(self.releases)
        bad = 0
        for t in self.moving_times:
            i = np.searchsorted(latches, t)
            if i == 0:
                continue
            latched_at = latches[i - 1]
            j = np.searchsorted(releases, t)
            if j == 0 or releases[j - 1] < latched_at:
                bad += 1
                if len(self.examples) < 20:
                    self.examples.append(f"moving command {t - latched_at:.4f} s after a latch")
        self.unsafe += bad
        return bad

    def command(self, frame_id: str, position: np.ndarray, source_s: float) -> None:
        self.commands += 1
        if position.shape != (4,) or not np.all(np.isfinite(position)):
            self.bad(f"non-finite or malformed command {position!r}")
            return
        if np.any(position < self.low - 1e-12) or np.any(position > self.high + 1e-12):
            self.bad(f"command outside the bounds {position.tolist()}")
        hold = frame_id.startswith("hold:")
        if hold:
            self.holds += 1
            if np.any(position[:3] != 0.0):
                self.bad(f"hold with xyz motion {position.tolist()}")
            if self.prev is not None and position[3] != self.prev[3]:
                self.bad(f"hold changed the gripper {self.prev[3]} -> {position[3]}")
        else:
            if frame_id != "teleop" and VERSION_TAG.fullmatch(frame_id) is None:
                self.bad(f"moving command with frame_id {frame_id[:40]!r}")
            self.moving_times.append(source_s)
        if self.prev is not None:
            step = np.abs(position - self.prev)
            stopping = np.zeros(4, dtype=bool)
            stopping[:3] = position[:3] == 0.0
            over = (step > self.burst + 1e-9) & ~stopping
            if np.any(over):
                self.bad(f"change {step.tolist()} over the per-command limit")
            # Stopping is free; every other change is paid from the per-second budget.
            self.travel += np.where(stopping, 0.0, step)
            slack = self.travel - self.rate * source_s
            excess = slack - self.min_slack
            if np.any(excess > self.burst + self.rate * SOURCE_SLACK_S + 1e-9):
                self.bad(f"travel {excess.tolist()} over the per-second rate in a window")
        np.minimum(self.min_slack, self.travel - self.rate * source_s, out=self.min_slack)
        self.prev = position.copy()


def _clamp_ns(ns: int) -> int:
    """Within what builtin_interfaces/Time can carry (int32 seconds)."""
    return min(max(ns, -(2**31) * 10**9), (2**31 - 1) * 10**9)


def relaxes(name: str, value: Any, envelope: dict[str, Any], read_only: set[str]) -> bool:
    """Whether an accepted parameter value loosens a limit beyond its start value."""
    try:
        return _relaxes(name, value, envelope, read_only)
    except TypeError:  # a value of another type was accepted: as bad as a relaxation
        return True


def _relaxes(name: str, value: Any, envelope: dict[str, Any], read_only: set[str]) -> bool:
    if name in read_only:
        return value != envelope[name]
    start = envelope.get(name)
    if name in ("action_low", "workspace_low"):
        return any(v < s for v, s in zip(value, start, strict=False)) or len(value) != len(start)
    if name in ("action_high", "workspace_high"):
        return any(v > s for v, s in zip(value, start, strict=False)) or len(value) != len(start)
    if name == "workspace_enabled":
        return bool(start) and not value
    if name == "hold_rate_hz":
        return value < start
    if name == "estop_release" or start is None:
        return False
    return not value <= start  # every other limit: larger is looser (NaN counts as looser)


# ----------------------------------------------------------------------------- the run


class Fuzzer:
    def __init__(self, args: argparse.Namespace) -> None:
        import rclpy
        from geometry_msgs.msg import TwistStamped
        from rcl_interfaces.srv import GetParameters, SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from std_srvs.srv import SetBool
        from trajectory_msgs.msg import JointTrajectory

        from vlarl import topics
        from vlarl.core.safety import SafetyConfig
        from vlarl.graph import start_node
        from vlarl.nodes.safety import PARAMS

        self.args = args
        self.start_node = start_node
        self.log_dir = Path("runs") / "bench-fuzz-safety"
        cfg = SafetyConfig()
        self.config = cfg
        self.envelope = {p.name: p.default for p in PARAMS}
        self.read_only = {p.name for p in PARAMS if p.read_only}
        self.checker = Checker(
            low=np.asarray(cfg.action_low),
            high=np.asarray(cfg.action_high),
            burst=np.array([cfg.max_delta_per_tick] * 3 + [cfg.gripper_max_delta_per_tick]),
            rate=np.array([cfg.max_delta_per_s] * 3 + [cfg.gripper_max_delta_per_s]),
        )
        self.safety = self.start_node("safety", domain_id=args.domain_id, log_dir=self.log_dir)
        rclpy.init(domain_id=args.domain_id)
        self.node = rclpy.create_node("fuzz_safety_bench")
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=2000, reliability=ReliabilityPolicy.RELIABLE
        )
        node = self.node
        self.pub_action = node.create_publisher(JointTrajectory, topics.POLICY_ACTION, qos)
        self.pub_teleop = node.create_publisher(TwistStamped, topics.TELEOP, qos)
        self.pub_obs = node.create_publisher(JointState, topics.OBSERVATION, qos)
        self.pub_state = node.create_publisher(JointState, topics.TASK_STATE, qos)
        # The honest robot, perception and policy publish through writers of their own, as in
        # the graph: the attacker's floods do not queue ahead of them in one writer.
        honest = rclpy.create_node("fuzz_honest_graph")
        self.honest_node = honest
        self.honest_action = honest.create_publisher(JointTrajectory, topics.POLICY_ACTION, qos)
        self.honest_obs = honest.create_publisher(JointState, topics.OBSERVATION, qos)
        self.honest_state = honest.create_publisher(JointState, topics.TASK_STATE, qos)
        self.estop_client = node.create_client(SetBool, topics.SAFETY_ESTOP)
        self.param_client = node.create_client(SetParameters, "/safety/set_parameters")
        self.get_client = node.create_client(GetParameters, "/safety/get_parameters")
        self.GetParameters = GetParameters
        self.drain_ms: list[float] = []
        self.lock = threading.Lock()
        self.last_seq = -10
        self.unanswered_calls = 0
        self.last_source_s = 0.0
        self.last_rx = 0.0
        self.recent: collections.deque = collections.deque(maxlen=12)
        self.last_attack: list[tuple] = []
        self.maybe_latched = False
        self.answers: dict[int, float] = {}  # honest stamp -> receive time (TAG commands)
        self.status: dict[str, Any] = {}
        node.create_subscription(JointState, topics.COMMAND, self._on_command, qos)
        node.create_subscription(String, topics.SAFETY_STATUS, self._on_status, 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(node)
        self.spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self.spinner.start()
        self.msgs = {"JointTrajectory": JointTrajectory, "JointState": JointState}
        self.TwistStamped = TwistStamped
        self.SetBool = SetBool
        self.SetParameters = SetParameters
        self.messages = 0
        self.by_kind: dict[str, int] = {}
        self.crashes = 0
        self.lockouts = 0
        self.attacks = 0
        self.honest_ticks = 0
        self.honest_messages = 0
        self.honest_answered = 0
        self.recovery_ms: list[float] = []
        self.relaxations_accepted = 0
        self.param_calls_accepted = 0
        self.param_calls_refused = 0
        self.releases = 0
        self.wait_ready()

    # ------------------------------------------------------------------ plumbing
    def _on_command(self, msg: Any, info: Any) -> None:
        from vlarl.ros.msgs import stamp_to_ns

        position = np.asarray(msg.position, dtype=np.float64)
        seq = info["publication_sequence_number"]
        with self.lock:
            self.last_source_s = info["source_timestamp"] / 1e9
            self.last_rx = time.monotonic()
            if seq is None or seq != self.last_seq + 1:
                self.checker.gap()
            self.last_seq = seq if seq is not None else -10
            self.checker.command(msg.header.frame_id, position, info["source_timestamp"] / 1e9)
            self.recent.append((msg.header.frame_id, stamp_to_ns(msg.header.stamp)))
            if msg.header.frame_id == TAG:
                self.answers.setdefault(stamp_to_ns(msg.header.stamp), time.monotonic())

    def _on_status(self, msg: Any) -> None:
        with self.lock:
            self.status = json.loads(msg.data)

    def wait_ready(self) -> None:
        from vlarl.graph import wait_until

        def up() -> bool:
            return (
                self.pub_action.get_subscription_count() >= 1
                and self.pub_obs.get_subscription_count() >= 1
                and self.pub_state.get_subscription_count() >= 1
                and self.honest_action.get_subscription_count() >= 1
                and self.honest_obs.get_subscription_count() >= 1
                and self.honest_state.get_subscription_count() >= 1
                and self.pub_teleop.get_subscription_count() >= 1
                and self.node.count_publishers("safety/command") >= 1
            )

        if not wait_until(up, timeout=60.0):
            raise RuntimeError(f"safety node did not come up (see {self.log_dir})")
        assert self.estop_client.wait_for_service(timeout_sec=30.0)
        assert self.param_client.wait_for_service(timeout_sec=30.0)
        assert self.get_client.wait_for_service(timeout_sec=30.0)

    def call(self, client: Any, request: Any, timeout: float = 2.0) -> Any:
        future = client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.0005)
        return future.result() if future.done() else None

    def count(self, kind: str, n: int = 1) -> None:
        self.messages += n
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n

    # ------------------------------------------------------------------ messages
    def stamp(self, spec: tuple) -> Any:
        from builtin_interfaces.msg import Time

        from vlarl.ros.msgs import ns_to_stamp

        if spec[0] == "abs":
            return Time(sec=spec[1], nanosec=spec[2])
        return ns_to_stamp(_clamp_ns(time.time_ns() + spec[1]))

    def build(self, step: tuple) -> tuple[Any, Any]:
        """(publisher, message) for one message step."""
        from trajectory_msgs.msg import JointTrajectoryPoint

        kind = step[0]
        if kind == "action":
            _, stamp, frame_id, names, points = step
            msg = self.msgs["JointTrajectory"]()
            msg.header.stamp = self.stamp(stamp)
            msg.header.frame_id = frame_id
            msg.joint_names = list(names)
            for positions, effort in points:
                p = JointTrajectoryPoint()
                p.positions = [float(v) for v in positions]
                p.effort = [float(v) for v in effort]
                msg.points.append(p)
            return self.pub_action, msg
        if kind == "teleop":
            msg = self.TwistStamped()
            msg.header.stamp = self.stamp(step[1])
            v = step[2]
            msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = v[0], v[1], v[2]
            msg.twist.angular.z = v[3]
            return self.pub_teleop, msg
        msg = self.msgs["JointState"]()
        msg.header.stamp = self.stamp(step[1])
        values = [float(v) for v in step[2]]
        if kind == "hand":
            msg.position = values + [0.0] * max(0, 39 - len(values)) if len(values) >= 3 else values
            return self.pub_state, msg
        msg.position = values
        return self.pub_obs, msg

    def flood(self, step: tuple) -> None:
        from vlarl.ros.msgs import ns_to_stamp, stamp_to_ns

        _, inner, n, mode = step
        pub, msg = self.build(inner)
        base = stamp_to_ns(msg.header.stamp)
        values = None
        if mode == "alternate":
            if inner[0] == "action" and msg.points:
                values = [list(msg.points[0].positions), [-v for v in msg.points[0].positions]]
            elif inner[0] == "teleop":
                values = [1.0, -1.0]
        for k in range(n):
            if mode == "step":
                msg.header.stamp = ns_to_stamp(_clamp_ns(base + 5_000 * k))
            elif mode == "race":
                msg.header.stamp = ns_to_stamp(_clamp_ns(base + 20_000_000 * k))
            elif mode == "alternate" and values is not None:
                if inner[0] == "action":
                    msg.points[0].positions = values[k % 2]
                else:
                    msg.twist.linear.x = values[k % 2]
                msg.header.stamp = ns_to_stamp(_clamp_ns(base + 5_000 * k))
            pub.publish(msg)
        self.count(f"flood:{inner[0]}", n)

    def param(self, changes: list[tuple[str, Any]], *, operator: bool = False) -> None:
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue

        params = []
        for name, value in changes:
            pv = ParameterValue()
            if isinstance(value, bool):
                pv.type, pv.bool_value = ParameterType.PARAMETER_BOOL, value
            elif isinstance(value, int):
                pv.type, pv.integer_value = ParameterType.PARAMETER_INTEGER, value
            elif isinstance(value, float):
                pv.type, pv.double_value = ParameterType.PARAMETER_DOUBLE, value
            elif isinstance(value, str):
                pv.type, pv.string_value = ParameterType.PARAMETER_STRING, value
            else:
                pv.type = ParameterType.PARAMETER_DOUBLE_ARRAY
                pv.double_array_value = [float(v) for v in value]
            params.append(Parameter(name=name, value=pv))
        sent_at = time.time()
        response = self.call(
            self.param_client,
            self.SetParameters.Request(parameters=params),
            timeout=10.0 if operator else 2.0,
        )
        if response is None:
            self.unanswered_calls += 1
            if any(n == "estop_release" for n, _ in changes):
                with self.lock:  # it may have released: do not count what follows as unsafe
                    self.checker.releases.append(sent_at)
        if operator:
            if response is not None and any(
                n == "estop_release" and r.successful
                for (n, _), r in zip(changes, response.results, strict=False)
            ):
                with self.lock:
                    self.checker.releases.append(sent_at)
                self.maybe_latched = False
            return
        self.count("parameters")
        if response is None:
            return
        for (name, value), result in zip(changes, response.results, strict=False):
            if not result.successful:
                self.param_calls_refused += 1
                continue
            self.param_calls_accepted += 1
            if name == "estop_release" and value:
                with self.lock:
                    self.checker.releases.append(sent_at)
                self.maybe_latched = False
                self.releases += 1
            if name in self.envelope and relaxes(name, value, self.envelope, self.read_only):
                self.relaxations_accepted += 1
                print(f"RELAXATION ACCEPTED: {name} = {value!r}")

    def attack(self, steps: list[tuple]) -> bool:
        """Play one attack; True if it included teleoperation (let it go stale after)."""
        teleop = False
        self.last_attack = steps
        for step in steps:
            kind = step[0]
            if kind == "flood":
                teleop |= step[1][0] == "teleop"
                self.flood(step)
            elif kind == "estop":
                reply = self.call(self.estop_client, self.SetBool.Request(data=step[1]))
                if step[1] and reply is not None and reply.success:
                    with self.lock:
                        self.checker.latches.append(time.time())
                self.maybe_latched |= step[1]
                self.count("estop")
            elif kind == "release":
                self.param([("estop_release", step[1])])
            elif kind == "param":
                self.param(step[1])
            else:
                teleop |= kind == "teleop"
                pub, msg = self.build(step)
                pub.publish(msg)
                self.count(kind)
        return teleop

    # ------------------------------------------------------------------ recovery
    def restore(self) -> None:
        """The operator after an attack: release a latched e-stop, restore the limits."""
        with self.lock:
            latched = bool(self.status.get("estop")) or self.maybe_latched
        if latched:
            self.param([("estop_release", "fuzz operator: attack over")], operator=True)
        restore = [
            (n, v)
            for n, v in self.envelope.items()
            if n not in self.read_only and n != "estop_release"
        ]
        self.param(restore, operator=True)

    def probe(self) -> None:
        """Honest ticks at 80 Hz (hand state, observation, action): the first answer must come
        within one watchdog period of the first tick."""
        from vlarl.ros.msgs import ns_to_stamp

        state = self.msgs["JointState"]()
        state.position = [*HAND, *([0.0] * 36)]
        obs = self.msgs["JointState"]()
        obs.position = [0.0] * 3
        _, action = self.build(
            ("action", ("rel", 0), TAG, NAMES, [([0.1, 0.0, 0.0, 0.0], [0.0] * 4)])
        )
        first = time.monotonic()
        stamps = []
        first_answer: float | None = None
        next_tick = first
        while True:
            now = time.monotonic()
            if now >= next_tick and len(stamps) < self.args.probe_ticks:
                stamp = ns_to_stamp(time.time_ns())
                state.header.stamp = obs.header.stamp = action.header.stamp = stamp
                self.honest_state.publish(state)
                self.honest_obs.publish(obs)
                self.honest_action.publish(action)
                stamps.append(stamp.sec * 10**9 + stamp.nanosec)
                next_tick += HONEST_DT_NS / 1e9
            with self.lock:
                answered = [self.answers[s] for s in stamps if s in self.answers]
            if answered and first_answer is None:
                first_answer = min(answered)
            if len(stamps) >= self.args.probe_ticks and (
                len(answered) == len(stamps) or now - next_tick > 0.1
            ):
                break
            time.sleep(0.0005)
        self.honest_messages += 3 * len(stamps)
        self.honest_ticks += len(stamps)
        self.honest_answered += len(answered)
        recovery = math.inf if first_answer is None else first_answer - first
        self.recovery_ms.append(recovery * 1e3)
        if recovery > self.config.watchdog_timeout_s:
            self.lockouts += 1
            with self.lock:
                recent, status = list(self.recent), dict(self.status)
            print(f"LOCKOUT: first honest answer after {recovery * 1e3:.1f} ms")
            print(f"  honest stamps {stamps[:2]}..., recent commands {recent}")
            print(f"  status {status}")
            print(f"  attack {[str(step)[:300] for step in self.last_attack]}")

    def after_attack(self, teleop: bool) -> None:
        if self.safety.process.poll() is not None:
            self.crashes += 1
            print(f"CRASH: safety exited with {self.safety.process.returncode}; restarting")
            self.safety = self.start_node(
                "safety", domain_id=self.args.domain_id, log_dir=self.log_dir
            )
            self.wait_ready()
        # The attack is over once the node has everything it was sent (reliable writers: all
        # acknowledged) and has handled it (a service call queues behind every message that
        # arrived before it), and this process has read the commands it answered with: on this
        # loaded machine a flood takes a while to digest.
        from rclpy.duration import Duration

        started = time.monotonic()
        for pub in (self.pub_action, self.pub_teleop):  # the node's reliable readers
            pub.wait_for_all_acked(Duration(seconds=1.0))
        self.restore()
        self.call(self.get_client, self.GetParameters.Request(names=["delta"]), timeout=5.0)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with self.lock:
                fresh = time.time() - self.last_source_s < 0.02
                idle = time.monotonic() - self.last_rx > 0.06
            if fresh or idle:
                break
            time.sleep(0.002)
        self.drain_ms.append((time.monotonic() - started) * 1e3)
        if teleop:
            time.sleep(self.config.teleop_timeout_s + 0.01)
        self.probe()
        self.attacks += 1

    def close(self) -> None:
        from vlarl.graph import stop_all

        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.honest_node.destroy_node()
        stop_all([self.safety])
        import rclpy

        rclpy.try_shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="stop after this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-ticks", type=int, default=6, help="honest ticks per probe")
    parser.add_argument("--out", default=str(RESULTS / "fuzz.json"))
    args = parser.parse_args()
    ensure_local_discovery()
    from vlarl.graph import free_domain_id

    args.domain_id = int(os.environ.get("ROS_DOMAIN_ID") or free_domain_id())
    os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)

    from hypothesis import HealthCheck, Phase, given, seed, settings

    load_at_start = list(os.getloadavg())
    started = time.monotonic()
    fuzz = Fuzzer(args)
    attack_strategy = strategies()
    try:
        rounds = 0
        while fuzz.messages < args.messages:

            @seed(args.seed + rounds)
            @settings(
                max_examples=50,
                phases=[Phase.generate],
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(steps=attack_strategy)
            def run(steps: list[tuple]) -> None:
                if fuzz.messages >= args.messages:
                    return
                teleop = fuzz.attack(steps)
                fuzz.after_attack(teleop)

            run()
            rounds += 1
            print(
                f"{fuzz.messages} messages, {fuzz.attacks} attacks, unsafe "
                f"{fuzz.checker.unsafe}, lockouts {fuzz.lockouts}, crashes {fuzz.crashes}",
                flush=True,
            )
        time.sleep(0.5)
        with fuzz.lock:
            status = dict(fuzz.status)
            fuzz.checker.estop_violations()
    finally:
        fuzz.close()
    elapsed = time.monotonic() - started
    recovery = np.asarray([r for r in fuzz.recovery_ms if math.isfinite(r)])
    summary = {
        "messages": fuzz.messages,
        "unsafe_commands": fuzz.checker.unsafe,
        "crashes": fuzz.crashes,
        "lockouts": fuzz.lockouts,
        "answered_good_fraction": round(fuzz.honest_answered / max(1, fuzz.honest_ticks), 4),
        "relaxations_accepted": fuzz.relaxations_accepted,
        "attacks": fuzz.attacks,
        "messages_by_kind": dict(sorted(fuzz.by_kind.items())),
        "commands_checked": fuzz.checker.commands,
        "command_stream_gaps": fuzz.checker.gaps,
        "holds_checked": fuzz.checker.holds,
        "unsafe_examples": fuzz.checker.examples,
        "honest_ticks": fuzz.honest_ticks,
        "honest_messages": fuzz.honest_messages,
        "honest_answered": fuzz.honest_answered,
        "recovery_ms": {
            "p50": round(float(np.percentile(recovery, 50)), 2) if len(recovery) else None,
            "p99": round(float(np.percentile(recovery, 99)), 2) if len(recovery) else None,
            "max": round(float(recovery.max()), 2) if len(recovery) else None,
            "watchdog_ms": fuzz.config.watchdog_timeout_s * 1e3,
        },
        "drain_ms": {
            "p50": round(float(np.percentile(fuzz.drain_ms, 50)), 2),
            "max": round(float(np.max(fuzz.drain_ms)), 2),
            "note": "after each attack: until the node acknowledged every message, handled "
            "them (a get_parameters call queues behind), the operator restored the limits and "
            "this process read the commands so far; then the honest ticks start",
        },
        "unanswered_parameter_calls": fuzz.unanswered_calls,
        "parameter_changes_accepted": fuzz.param_calls_accepted,
        "parameter_changes_refused": fuzz.param_calls_refused,
        "estop_releases_with_reason": fuzz.releases,
        "safety_status_at_end": status,
        "seconds": round(elapsed, 1),
        "seed": args.seed,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    _plot(fuzz.recovery_ms, summary, out.with_suffix(".png"))
    print(json.dumps({k: summary[k] for k in list(summary)[:6]}))
    print(f"{fuzz.attacks} attacks in {elapsed:.0f} s -> {out}")
    return 0


def _plot(recovery_ms: list[float], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    rec = np.asarray(recovery_ms)
    finite = np.isfinite(rec)
    ax.plot(np.flatnonzero(finite), rec[finite], ".", markersize=3, color="tab:blue")
    ax.plot(np.flatnonzero(~finite), np.full((~finite).sum(), 150.0), "x", color="tab:red")
    ax.axhline(summary["recovery_ms"]["watchdog_ms"], color="k", linestyle="--", linewidth=1,
               label="one watchdog period (lockout above)")  # fmt: skip
    ax.set_xlabel("attack")
    ax.set_ylabel("first honest tick -> its command [ms]")
    ax.set_title(
        f"{summary['messages']} messages, {summary['attacks']} attacks: unsafe "
        f"{summary['unsafe_commands']}, lockouts {summary['lockouts']}, crashes "
        f"{summary['crashes']}, relaxations accepted {summary['relaxations_accepted']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    reasons = summary["safety_status_at_end"].get("rejected_reasons", {})
    if reasons:
        names = sorted(reasons, key=lambda k: -reasons[k])
        ax2.barh(names, [reasons[n] for n in names], color="tab:orange")
        ax2.set_xscale("symlog")
    ax2.set_xlabel("inputs refused by reason (safety status)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
