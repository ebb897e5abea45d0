"""safety node: the only node that publishes the robot command.

A thin ROS adapter over :class:`vlarl.core.safety.SafetyFilter`:

- ``policy/action`` (JointTrajectory, point 0 = this tick; only point 0 is read and validated,
  the rest of the chunk never reaches the command) -> filtered ``safety/command``
  (JointState dx, dy, dz, gripper; stamp = the action's stamp; frame_id = its version tag,
  'teleop' or 'hold:<reason>'); malformed, non-finite, stale, future-stamped, repeated and
  out-of-order actions, and actions whose frame_id is not a policy version tag, are dropped and
  counted by reason (``last_rejection`` in the status says the latest and why);
- ``observation`` stamps: the age limit for actions, and the ticks at which the watchdog answers
  with holds (so a lock-stepped simulator keeps stepping in place);
- ``robot/task_state`` position[0:3]: the end-effector xyz for the workspace box;
- ``teleop/twist`` (TwistStamped): while fresh, overrides the policy (intervention);
- a steady-clock watchdog timer; the ``safety/estop`` SetBool service latches a hold (``false``
  is refused: nobody releases the e-stop by accident); the release is the explicit, logged
  operation ``ros2 param set /safety estop_release "<who: why>"``;
- limits: the values at start (config/safety.yaml, ``--ros-args -p``) are the hard envelope;
  ``set_parameters`` may only tighten within it, and says which bound a refused change breaks;
- ``safety/status`` (JSON) at ``status_rate_hz`` and whenever the hold state changes.

``realtime_priority`` > 0 runs the process under SCHED_FIFO (see :mod:`vlarl.ros.realtime`).
"""

# ruff: noqa: E402 - rclpy must not be imported before discovery is restricted to localhost.
from __future__ import annotations

import gc

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()

import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import rclpy
from geometry_msgs.msg import TwistStamped
from rclpy.clock import Clock, ClockType
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from std_srvs.srv import SetBool
from trajectory_msgs.msg import JointTrajectory

from vlarl import topics
from vlarl.core.safety import (
    MAX_WATCHDOG_TIMEOUT_S,
    REJECT_HELP,
    REJECT_MALFORMED,
    REJECT_NONFINITE,
    REJECT_TAG,
    Decision,
    SafetyConfig,
    SafetyFilter,
    check_version_tag,
)
from vlarl.ros.msgs import MessageError, action_point_from_msg, ns_to_stamp, stamp_to_ns
from vlarl.ros.params import Param, declare
from vlarl.ros.realtime import MAX_PRIORITY, current_policy, set_realtime_priority

_DEFAULTS = SafetyConfig()
SHUTDOWN_ACK_TIMEOUT_S = 0.5  # at most this long per publisher for the last hold's delivery

PARAMS: tuple[Param, ...] = (
    Param("delta", _DEFAULTS.delta, "residual bound: residual clipped to [-delta, +delta]",
          low=0.0, high=2.0),
    Param("action_low", list(_DEFAULTS.action_low), "lower bound of dx, dy, dz, gripper"),
    Param("action_high", list(_DEFAULTS.action_high), "upper bound of dx, dy, dz, gripper"),
    Param("max_delta_per_tick", _DEFAULTS.max_delta_per_tick,
          "largest change of dx, dy, dz between consecutive commands", low=1e-6, high=2.0),
    Param("gripper_max_delta_per_tick", _DEFAULTS.gripper_max_delta_per_tick,
          "largest change of the gripper command per command (>= its range: no limit)",
          low=1e-6, high=2.0),
    Param("max_delta_per_s", _DEFAULTS.max_delta_per_s,
          "sustained change of dx, dy, dz per second (budget refill, capped at one burst)",
          low=1e-6, high=1e6),
    Param("gripper_max_delta_per_s", _DEFAULTS.gripper_max_delta_per_s,
          "sustained change of the gripper command per second", low=1e-6, high=1e6),
    Param("workspace_enabled", _DEFAULTS.workspace_enabled,
          "keep the end effector in the workspace box (needs robot/task_state)"),
    Param("workspace_low", list(_DEFAULTS.workspace_low), "workspace box lower corner xyz, m"),
    Param("workspace_high", list(_DEFAULTS.workspace_high), "workspace box upper corner xyz, m"),
    Param("ee_timeout_s", _DEFAULTS.ee_timeout_s,
          "end-effector position older than this is unknown: no xyz motion", low=1e-3, high=60.0),
    Param("max_action_age_s", _DEFAULTS.max_action_age_s,
          "reject actions older than the newest observation by more than this",
          low=1e-3, high=60.0),
    Param("max_action_lead_s", _DEFAULTS.max_action_lead_s,
          "reject actions stamped ahead of the newest observation by more than this",
          low=1e-4, high=MAX_WATCHDOG_TIMEOUT_S),
    Param("watchdog_timeout_s", _DEFAULTS.watchdog_timeout_s,
          "hold when no fresh action was accepted for this long", low=1e-3,
          high=MAX_WATCHDOG_TIMEOUT_S),
    Param("hold_rate_hz", 1.0 / _DEFAULTS.hold_period_s,
          "minimum rate of hold commands while holding", low=0.1, high=1000.0),
    Param("teleop_timeout_s", _DEFAULTS.teleop_timeout_s,
          "teleoperation overrides the policy while younger than this", low=1e-3, high=60.0),
    Param("initial_gripper", _DEFAULTS.initial_gripper,
          "gripper command held before the first command", low=-1.0, high=1.0, read_only=True),
    Param("estop_release", "",
          "set to '<who: why>' to release a latched e-stop (logged); the only way to release it"),
    Param("watchdog_check_hz", 200.0, "rate of the watchdog timer (steady clock)",
          low=10.0, high=2000.0, read_only=True),
    Param("status_rate_hz", 2.0, "rate of safety/status", low=0.1, high=100.0, read_only=True),
    Param("executor", "events", "rclpy executor: events (EventsExecutor) or single",
          choices=("events", "single"), read_only=True),
    Param("realtime_priority", 0,
          "SCHED_FIFO priority of this process (0 = normal scheduling); needs CAP_SYS_NICE or "
          "an rtprio limit, else a warning and normal scheduling",
          low=0, high=MAX_PRIORITY, read_only=True),
)  # fmt: skip

# Node parameters that map 1:1 onto SafetyConfig fields.
_CONFIG_PARAMS = (
    "delta",
    "action_low",
    "action_high",
    "max_delta_per_tick",
    "gripper_max_delta_per_tick",
    "max_delta_per_s",
    "gripper_max_delta_per_s",
    "workspace_enabled",
    "workspace_low",
    "workspace_high",
    "ee_timeout_s",
    "max_action_age_s",
    "max_action_lead_s",
    "watchdog_timeout_s",
    "teleop_timeout_s",
    "initial_gripper",
)


def config_changes(values: dict[str, Any]) -> dict[str, Any]:
    """SafetyConfig fields from (some) node parameter values."""
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name in _CONFIG_PARAMS:
            changes[name] = tuple(value) if isinstance(value, list) else value
        elif name == "hold_rate_hz":
            changes["hold_period_s"] = 1.0 / float(value)
    return changes


def check_watchdog_rate(config: SafetyConfig, check_hz: float) -> str | None:
    """The watchdog timer must tick at least twice per timeout to detect it in time."""
    if config.watchdog_timeout_s < 2.0 / check_hz:
        return (
            f"watchdog_timeout_s={config.watchdog_timeout_s} is shorter than two watchdog "
            f"check periods (watchdog_check_hz={check_hz})"
        )
    return None


class SafetyNode(Node):
    """ROS adapter of the safety filter (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("safety", **kwargs)
        self._params = declare(self, PARAMS, self._on_param_change)
        config = SafetyConfig().with_changes(**config_changes(self._params))
        reason = check_watchdog_rate(config, self._params["watchdog_check_hz"])
        if reason is not None:
            raise ValueError(f"safety: bad parameter: {reason}")
        self.executor_kind: str = self._params["executor"]
        self.realtime_priority = int(self._params["realtime_priority"])
        now = time.monotonic()
        self.filter = SafetyFilter(config, now=now)  # the start-up limits: the hard envelope
        self.filter.start(now)
        self.bad_task_state = 0
        self.last_rejection: dict[str, Any] = {}

        control_qos = QoSProfile(depth=10)  # reliable, volatile: as rclpy's default publishers
        self._command_pub = self.create_publisher(JointState, topics.COMMAND, control_qos)
        self._status_pub = self.create_publisher(String, topics.SAFETY_STATUS, 10)
        self.create_subscription(
            JointTrajectory, topics.POLICY_ACTION, self._on_action, control_qos
        )
        self.create_subscription(TwistStamped, topics.TELEOP, self._on_teleop, control_qos)
        # Best effort subscriptions match both reliable and best-effort publishers.
        self.create_subscription(
            JointState, topics.OBSERVATION, self._on_observation, qos_profile_sensor_data
        )
        self.create_subscription(
            JointState, topics.TASK_STATE, self._on_task_state, qos_profile_sensor_data
        )
        self.create_service(SetBool, topics.SAFETY_ESTOP, self._on_estop)
        steady = Clock(clock_type=ClockType.STEADY_TIME)  # never sim time: /clock may stall
        self.create_timer(1.0 / self._params["watchdog_check_hz"], self._on_watchdog, clock=steady)
        self.create_timer(1.0 / self._params["status_rate_hz"], self.publish_status, clock=steady)

        self._command = JointState()
        self._command.name = list(topics.ACTION_NAMES)
        self._holding = self.filter.holding
        self.stop_requested = False  # set by the signal handler
        self.stopped: Future = Future()  # done after the shutdown hold went out
        self.get_logger().info(
            f"safety up: delta={config.delta} watchdog={config.watchdog_timeout_s}s "
            f"workspace={'on' if config.workspace_enabled else 'off'} "
            f"executor={self.executor_kind}"
        )

    # ----------------------------------------------------------------- parameters
    def _on_param_change(self, accepted: dict[str, Any]) -> str | None:
        changes = config_changes(accepted)
        release = accepted.get("estop_release", "")
        if release and changes:
            return "release the e-stop in a set_parameters call of its own"
        if release:
            return self._release_estop(release)
        try:
            config = self.filter.config.with_changes(**changes)
            reason = check_watchdog_rate(config, self._params["watchdog_check_hz"])
            if reason is None:
                self.filter.reconfigure(config)  # refuses anything beyond the hard envelope
        except ValueError as exc:
            reason = str(exc)
        if reason is not None:
            self.get_logger().warning(f"parameter change refused: {reason}")
            return reason
        self.get_logger().info(f"limits changed: {changes}")
        return None

    def _release_estop(self, reason: str) -> str | None:
        refusal = self.filter.release_estop(reason)
        if refusal is not None:
            self.get_logger().warning(f"e-stop release refused: {refusal}")
            return f"e-stop release refused: {refusal}"
        self.get_logger().warning(f"e-stop released: {self.filter.last_release_reason}")
        self._check_state_change()
        return None

    # ----------------------------------------------------------------- callbacks
    def _on_action(self, msg: JointTrajectory) -> None:
        now = time.monotonic()
        stamp_ns = stamp_to_ns(msg.header.stamp)
        tag = msg.header.frame_id
        refusal = check_version_tag(tag)
        if refusal is not None:
            self._rejected(self.filter.reject(REJECT_TAG, stamp_ns), refusal)
            return
        try:
            base, residual = action_point_from_msg(msg)  # point 0: this tick
        except MessageError as exc:
            reason = REJECT_NONFINITE if "non-finite" in str(exc) else REJECT_MALFORMED
            self._rejected(self.filter.reject(reason, stamp_ns), str(exc))
            return
        decision = self.filter.filter(base, residual, stamp_ns=stamp_ns, now=now)
        if decision.command is not None:
            self._publish(decision, tag)
        else:
            self._rejected(decision, REJECT_HELP.get(decision.reason, ""))

    def _rejected(self, decision: Decision, detail: str) -> None:
        self.last_rejection = {
            "reason": decision.reason,
            "detail": detail[:160],
            "stamp_ns": decision.stamp_ns,
        }

    def _on_observation(self, msg: JointState) -> None:
        decision = self.filter.observe(stamp_to_ns(msg.header.stamp), now=time.monotonic())
        if decision is not None:
            self._publish(decision)

    def _on_task_state(self, msg: JointState) -> None:
        if len(msg.position) < 3 or not self.filter.update_ee_position(
            msg.position[0:3], now=time.monotonic()
        ):
            self.bad_task_state += 1

    def _on_teleop(self, msg: TwistStamped) -> None:
        twist = msg.twist
        self.filter.teleop(
            (twist.linear.x, twist.linear.y, twist.linear.z, twist.angular.z),
            now=time.monotonic(),
        )

    def _on_estop(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        if request.data:
            self._publish(self.filter.latch_estop(now=time.monotonic()))
            response.success = True
            response.message = "e-stop latched: holding"
        else:
            self.filter.counters.estop_release_refused += 1
            response.success = False
            response.message = (
                "refused: the e-stop is released only explicitly, with a reason: "
                "ros2 param set /safety estop_release '<who: why>'"
            )
        self.get_logger().warning(response.message)
        self._check_state_change()
        return response

    def _on_watchdog(self) -> None:
        if self.stop_requested:
            self._shutdown_hold()
            return
        decision = self.filter.check(time.monotonic())
        if decision is not None:
            self._publish(decision)
        self._check_state_change()

    # ----------------------------------------------------------------- outputs
    def _publish(self, decision: Decision, version_tag: str = "") -> None:
        msg = self._command
        msg.header.stamp = ns_to_stamp(decision.stamp_ns)
        msg.header.frame_id = decision.frame_id(version_tag)
        msg.position = decision.command.tolist()  # type: ignore[union-attr]
        self._command_pub.publish(msg)

    def _check_state_change(self) -> None:
        holding = self.filter.holding
        if holding != self._holding:
            self._holding = holding
            self.publish_status()

    def status(self) -> dict[str, Any]:
        status = self.filter.status(time.monotonic())
        status["bad_task_state"] = self.bad_task_state
        status["last_rejection"] = self.last_rejection
        return status

    def publish_status(self) -> None:
        self._status_pub.publish(String(data=json.dumps(self.status())))

    def _shutdown_hold(self) -> None:
        """Last words on Ctrl-C: one hold command and a final status, then stop spinning."""
        if self.stopped.done():
            return
        self._publish(self.filter.shutdown_hold(time.monotonic()))
        self.publish_status()
        # Reliable delivery needs the writer alive until readers acknowledge: destroying the
        # node right after publishing can drop the hold (seen once in a fresh-clone run).
        for pub in (self._command_pub, self._status_pub):
            pub.wait_for_all_acked(Duration(seconds=SHUTDOWN_ACK_TIMEOUT_S))
        self.stopped.set_result(True)


def _make_executor(node: SafetyNode) -> Any:
    """EventsExecutor (about half the CPU of SingleThreadedExecutor, measured) where rclpy has
    it (Kilted and later); otherwise the SingleThreadedExecutor."""
    if node.executor_kind == "events":
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError:
            node.get_logger().warning("rclpy has no EventsExecutor: using SingleThreadedExecutor")
        else:
            return EventsExecutor(context=node.context)
    return SingleThreadedExecutor(context=node.context)


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    args = list(sys.argv if argv is None else argv)
    # Our own SIGINT/SIGTERM handling: the node publishes a last hold before it goes.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node: SafetyNode | None = None
    try:
        try:
            node = SafetyNode()
        except ValueError as exc:  # a bad parameter at start-up
            print(f"safety: {exc}", file=sys.stderr)
            return 2
        reason = set_realtime_priority(node.realtime_priority)
        if reason is not None:
            node.get_logger().warning(f"{reason}: normal scheduling")
        elif node.realtime_priority:
            node.get_logger().info(f"scheduling {current_policy()}")
        executor = _make_executor(node)
        executor.add_node(node)

        def request_stop(signum: int, frame: Any) -> None:
            # A repeat (ros2 launch's SIGINT right after the terminal's) must not cut the last
            # hold's acknowledgement short (it is bounded: SHUTDOWN_ACK_TIMEOUT_S per publisher).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if node is not None:
                node.stop_requested = True  # the next watchdog tick sends the hold and stops

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        # Start-up objects out of the collector's reach: no multi-ms full collections per tick.
        gc.collect()
        gc.freeze()
        try:
            # Not executor.spin(): with rclpy Kilted's EventsExecutor, spin() without a timeout
            # never fires timers (measured); spinning in bounded slices does.
            while node.context.ok() and not node.stopped.done():
                executor.spin_until_future_complete(node.stopped, timeout_sec=1.0)
        finally:
            executor.shutdown()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
