"""sim_robot: a Meta-World task as a robot on the ROS graph.

Publishes, per simulator sample (all with one stamp): ``robot/task_state`` (39-d privileged
state, frame_id = task), ``joint_states`` (Sawyer joints + finger slides), ``robot/status``
(episode, step, success, terminal, truncated, env_reward) and ``/clock`` (simulated time);
``camera/image_raw`` (rgb8) at ``camera_rate_hz`` (or, in lockstep with
``camera_every_sample``, once per sample), rendered on a background thread from a snapshot of
the newest sample and stamped with that sample's stamp. Takes
``safety/command`` (dx, dy, dz, gripper) from the safety node only: each message's publisher
gid (rclpy message info) must be the gid of the one ``safety/command`` publisher of the node
named ``command_source`` (graph API); messages from any other publisher are dropped and
counted (``foreign``), and while two publishers claim that name none is trusted (fail closed).
Without DDS security a node name can be forged; the check stops every other publisher.
``sim_robot/reset`` (std_srvs/Trigger) ends the episode
as truncated and resets; the ``task`` and ``seed`` parameters rebuild the environment.

Modes:
  lockstep (default, "as fast as the graph allows"): publish sample k, wait for a command whose
      stamp equals sample k's stamp, apply it, step, publish sample k+1 at once. Without an
      answer within ``lockstep_timeout_s`` sample k is published again (same stamp); the robot
      never steps without a command.
  realtime: a timer at 1/control_dt applies the newest command if it arrived within
      ``command_timeout_s``, else a hold (zero xyz, last gripper), steps and publishes.

Episode ends: the final sample carries terminal/truncated; the robot then resets and publishes
step 0 of the next episode. A reset request (or a task/seed change) publishes one extra sample
of the unchanged state with a new stamp and ``truncated = 1`` before resetting, so every episode
ends with a flagged sample. Stamps come from the node clock (wall time) and strictly increase;
with ``use_sim_time`` they are the simulated time itself (ticks x dt, a reset counts as a tick),
which is what ``/clock`` says.
"""

from __future__ import annotations

import array
import os
import sys
import time
from typing import Any

import numpy as np

from vlarl.rosenv import ensure_local_discovery
from vlarl.sim.layout import CONTROL_DT, DEFAULT_TASK, JOINT_NAMES, MAX_EPISODE_STEPS, STATE_DIM
from vlarl.topics import (
    CAMERA_IMAGE,
    CLOCK,
    COMMAND,
    JOINT_STATES,
    ROBOT_STATUS,
    ROBOT_STATUS_FIELDS,
    SIM_RESET,
    TASK_STATE,
)

_NODE_NAME = "sim_robot"
COMMAND_SOURCE = "safety"
_GRAPH_REFRESH_S = 0.05  # at most this often, the graph is asked again for an unknown gid
_REPORT_PERIOD_S = 10.0
_WARN_THROTTLE_S = 2.0


def _params() -> list[Any]:
    from vlarl.ros.params import Param
    from vlarl.sim.render import DEFAULT_CAMERA

    return [
        Param(
            "task",
            DEFAULT_TASK,
            "Meta-World v3 task; a change ends the episode (truncated), "
            "rebuilds the environment and resets",
        ),
        Param(
            "seed",
            0,
            "base seed: fixes the task's layouts; episode k resets with a seed "
            "derived from (seed, k); a change rebuilds like a task change",
            low=0,
            high=2**31 - 1,
        ),
        Param(
            "mode",
            "lockstep",
            "lockstep: step once per command answering the newest sample; "
            "realtime: step on a timer at 1/control_dt",
            choices=("lockstep", "realtime"),
        ),
        Param(
            "control_dt",
            CONTROL_DT,
            "realtime mode: wall seconds per step (0.0125 = Meta-World's dt, i.e. real time)",
            low=0.001,
            high=1.0,
        ),
        Param(
            "max_episode_steps",
            MAX_EPISODE_STEPS,
            "steps after which an episode is truncated",
            low=1,
            high=1_000_000,
        ),
        Param("end_on_success", True, "end the episode (terminal) when the task succeeds"),
        Param(
            "action_offset",
            [0.0, 0.0, 0.0, 0.0],
            "deployment shift for self-improvement experiments: the robot executes "
            "clip(command + offset) (a miscalibrated arm); commands and bags are unchanged",
            low=-1.0,
            high=1.0,
        ),
        Param(
            "command_timeout_s",
            0.1,
            "realtime mode: a command older than this is not applied; the robot holds",
            low=0.001,
            high=10.0,
        ),
        Param(
            "lockstep_timeout_s",
            0.25,
            "lockstep mode: publish the current sample again if "
            "no command answers it within this time",
            low=0.005,
            high=60.0,
        ),
        Param(
            "camera_rate_hz",
            5.0,
            "camera frames per wall second (0 disables the camera)",
            low=0.0,
            high=100.0,
        ),
        Param(
            "camera_every_sample",
            False,
            "lockstep mode: render every sample instead of camera_rate_hz, so image "
            "observations can close the lockstep loop (which then runs at the render rate)",
        ),
        Param(
            "camera_name",
            DEFAULT_CAMERA,
            "MuJoCo camera to render (corner, corner2, "
            "corner3, corner4, topview, behindGripper, gripperPOV)",
        ),
        Param("camera_width", 84, "camera image width (pixels)", low=8, high=640),
        Param("camera_height", 84, "camera image height (pixels)", low=8, high=480),
        Param("publish_joint_states", True, "publish joint_states every sample"),
        Param(
            "executor",
            "single",
            "rclpy executor: single (SingleThreadedExecutor) or events "
            "(rclpy.experimental.EventsExecutor); the command publisher check needs single: "
            "rclpy 9.1's EventsExecutor cannot deliver message info",
            choices=("events", "single"),
            read_only=True,
        ),
        Param(
            "command_source",
            COMMAND_SOURCE,
            "name of the only node whose safety/command publisher the robot obeys (checked "
            "per message by publisher gid); '' obeys any publisher (needs executor events "
            "or single)",
            read_only=True,
        ),
        Param(
            "render_threads",
            0,
            "Mesa llvmpipe rasterizer threads (LP_NUM_THREADS); 0 "
            "rasterizes on the render thread alone, leaving other cores to the control loop",
            low=0,
            high=64,
            read_only=True,
        ),
    ]


class CommandSource:
    """Which publisher of ``safety/command`` the robot obeys: the gid of the one publisher of
    the node called ``name`` (in the robot's namespace), looked up in the ROS graph."""

    def __init__(self, node: Any, name: str) -> None:
        self.node = node
        self.name = name
        self.gid: bytes | None = None
        self._asked = -float("inf")

    def refresh(self) -> None:
        self._asked = time.monotonic()
        gids = {
            bytes(info.endpoint_gid)
            for info in self.node.get_publishers_info_by_topic(COMMAND)
            if info.node_name == self.name and info.node_namespace == self.node.get_namespace()
        }
        self.gid = gids.pop() if len(gids) == 1 else None  # two claimants: trust neither

    def trusts(self, gid: bytes) -> bool:
        if gid != self.gid and time.monotonic() - self._asked >= _GRAPH_REFRESH_S:
            self.refresh()  # a (re)started safety node, or a foreign publisher
        return gid == self.gid


def _build_node_class() -> type:
    """The node class, defined after rclpy may be imported (see main())."""
    from rclpy.clock import Clock as RosClock
    from rclpy.clock import ClockType
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image, JointState
    from std_srvs.srv import Trigger

    from vlarl.ros.msgs import MessageError, fields_msg, stamp_to_ns, vector_from_msg, vector_msg
    from vlarl.ros.params import declare
    from vlarl.sim.errors import InvalidActionError, SimError
    from vlarl.sim.render import BackgroundRenderer, CameraConfig, SimSnapshot, check_camera
    from vlarl.sim.robot import MetaWorldRobot, check_task

    class SimRobotNode(Node):
        """Thin ROS adapter over :class:`vlarl.sim.robot.MetaWorldRobot`."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(_NODE_NAME, **kwargs)
            self._p = declare(self, _params(), self._on_params)
            os.environ.setdefault("LP_NUM_THREADS", str(self._p["render_threads"]))
            self._sim_time = bool(self.get_parameter("use_sim_time").value)
            # Timers run on wall time even with use_sim_time: this node is the source of /clock,
            # and in lockstep simulated time stands still while it waits for a command.
            self._steady = RosClock(clock_type=ClockType.STEADY_TIME)
            self._robot = self._make_robot(self._p, first_episode=0)

            qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            self._pub_state = self.create_publisher(JointState, TASK_STATE, qos)
            self._pub_status = self.create_publisher(JointState, ROBOT_STATUS, qos)
            self._pub_joints = self.create_publisher(JointState, JOINT_STATES, qos)
            self._pub_clock = self.create_publisher(Clock, CLOCK, qos)
            self._pub_image = self.create_publisher(Image, CAMERA_IMAGE, QoSProfile(depth=2))
            if self._p["command_source"] and self._p["executor"] == "events":
                raise ValueError(
                    "command_source needs executor single: rclpy's EventsExecutor cannot "
                    "deliver the publisher gid (message info)"
                )
            self._source = CommandSource(self, self._p["command_source"])
            self.create_subscription(
                JointState,
                COMMAND,
                self._on_command if self._source.name else self._on_any_command,
                qos,
            )
            self.create_service(Trigger, SIM_RESET, self._on_reset)

            # Messages are built once and updated in place every sample.
            zero = vector_msg(np.zeros(STATE_DIM), stamp=self._zero_stamp())
            self._state_msg = zero
            self._state_msg.header.frame_id = self._robot.task
            self._status_msg = fields_msg(
                ROBOT_STATUS_FIELDS, [0.0] * len(ROBOT_STATUS_FIELDS), stamp=self._zero_stamp()
            )
            self._joint_msg = JointState()
            self._joint_msg.name = list(JOINT_NAMES)
            self._clock_msg = Clock()
            self._status = np.zeros(len(ROBOT_STATUS_FIELDS), dtype=np.float64)
            self._joint_pos = np.zeros(len(JOINT_NAMES), dtype=np.float64)
            self._joint_vel = np.zeros(len(JOINT_NAMES), dtype=np.float64)
            self._command = np.zeros(4, dtype=np.float64)
            self._hold = np.zeros(4, dtype=np.float64)
            self._command_mono: float | None = None

            self._dt_ns = round(self._robot.dt * 1e9)
            self._ticks = 0
            self._stamp_ns = 0
            self._published_mono = time.monotonic()
            self.counters = {
                "steps": 0,
                "samples": 0,
                "episodes": 0,
                "commands": 0,
                "malformed": 0,
                "stale": 0,
                "republished": 0,
                "holds": 0,
                "resets": 0,
                "foreign": 0,
            }
            self._report_steps = 0
            self._report_mono = time.monotonic()

            self._renderer: BackgroundRenderer | None = None
            self._every_sample = False
            self._last_image: tuple[int, Image] | None = None
            self._camera_timer: Any = None
            self._tick_timer: Any = None
            self._lockstep_timer: Any = None
            self._configure_camera(self._p)
            self._configure_mode(self._p)
            self.create_timer(_REPORT_PERIOD_S, self._report, clock=self._steady)
            self._publish_sample()
            self.get_logger().info(
                f"{self._robot.task} (seed {self._robot.seed}), mode {self._p['mode']}, camera "
                f"{self._p['camera_name']} {self._p['camera_width']}x{self._p['camera_height']} "
                f"at {self._p['camera_rate_hz']} Hz"
            )

        # -------------------------------------------------------------- construction helpers
        def _zero_stamp(self) -> Any:
            from builtin_interfaces.msg import Time

            return Time()

        def _make_robot(self, p: dict[str, Any], *, first_episode: int) -> MetaWorldRobot:
            return MetaWorldRobot(
                p["task"],
                seed=p["seed"],
                max_episode_steps=p["max_episode_steps"],
                end_on_success=p["end_on_success"],
                first_episode=first_episode,
                action_offset=list(p["action_offset"]),
            )

        def _camera_config(self, p: dict[str, Any]) -> CameraConfig:
            return CameraConfig(
                camera=p["camera_name"], width=p["camera_width"], height=p["camera_height"]
            )

        def _configure_camera(self, p: dict[str, Any]) -> None:
            if self._camera_timer is not None:
                self.destroy_timer(self._camera_timer)
                self._camera_timer = None
            self._every_sample = bool(p["camera_every_sample"]) and p["mode"] == "lockstep"
            rate = float(p["camera_rate_hz"])
            if rate <= 0.0 and not self._every_sample:
                return
            config = self._camera_config(p)
            if self._renderer is None:
                self._renderer = BackgroundRenderer(self._publish_frame, config=config)
            else:
                self._renderer.configure(config)
            if not self._every_sample:
                self._camera_timer = self.create_timer(
                    1.0 / rate, self._on_camera_timer, clock=self._steady
                )

        def _configure_mode(self, p: dict[str, Any]) -> None:
            for attr in ("_tick_timer", "_lockstep_timer"):
                timer = getattr(self, attr)
                if timer is not None:
                    self.destroy_timer(timer)
                    setattr(self, attr, None)
            if p["mode"] == "realtime":
                self._tick_timer = self.create_timer(
                    float(p["control_dt"]), self._on_tick, clock=self._steady
                )
            else:
                period = max(0.002, float(p["lockstep_timeout_s"]) / 2.0)
                self._lockstep_timer = self.create_timer(
                    period, self._on_lockstep_timer, clock=self._steady
                )
                self._published_mono = time.monotonic()

        # -------------------------------------------------------------- publishing
        def _next_stamp_ns(self) -> int:
            self._ticks += 1
            if self._sim_time:
                return self._ticks * self._dt_ns
            # The node clock without use_sim_time is the system clock: time.time_ns() reads the
            # same clock as get_clock().now() at a fraction of the cost.
            now = time.time_ns()
            return now if now > self._stamp_ns else self._stamp_ns + 1

        def _publish_sample(self, *, repeat: bool = False, truncate: bool = False) -> None:
            """Publish the robot's current sample; ``repeat`` re-sends it with its stamp."""
            robot = self._robot
            if not repeat:
                self._stamp_ns = stamp_ns = self._next_stamp_ns()
                sec, nanosec = divmod(stamp_ns, 1_000_000_000)
                robot.status_values(out=self._status)
                if truncate:
                    self._status[4] = 1.0
                for msg in (self._state_msg, self._status_msg, self._joint_msg):
                    msg.header.stamp.sec = sec
                    msg.header.stamp.nanosec = nanosec
                self._state_msg.position = array.array("d", robot.state.tobytes())
                self._status_msg.position = array.array("d", self._status.tobytes())
                if self._p["publish_joint_states"]:
                    robot.joint_positions(out=self._joint_pos)
                    robot.joint_velocities(out=self._joint_vel)
                    self._joint_msg.position = array.array("d", self._joint_pos.tobytes())
                    self._joint_msg.velocity = array.array("d", self._joint_vel.tobytes())
                self._clock_msg.clock.sec = sec
                self._clock_msg.clock.nanosec = nanosec
                self.counters["samples"] += 1
            # The observation path first: perception -> policy -> safety -> command.
            self._pub_state.publish(self._state_msg)
            self._pub_status.publish(self._status_msg)
            if self._p["publish_joint_states"]:
                self._pub_joints.publish(self._joint_msg)
            if not repeat:
                self._pub_clock.publish(self._clock_msg)
            if self._every_sample and self._renderer is not None:
                self._frame_for_sample(repeat)
            self._published_mono = time.monotonic()

        def _frame_for_sample(self, repeat: bool) -> None:
            """camera_every_sample: render this sample; on a repeat, re-send its frame if it was
            rendered already, render it if that failed, and otherwise let the render finish."""
            renderer = self._renderer
            assert renderer is not None
            last = self._last_image
            if repeat and last is not None and last[0] == self._stamp_ns:
                self._pub_image.publish(last[1])
            elif not repeat or not renderer.busy():
                renderer.submit(self._robot.snapshot(stamp_ns=self._stamp_ns))

        def _publish_frame(self, frame: np.ndarray, snapshot: SimSnapshot) -> None:
            """Render thread: one camera frame, stamped with its sample's stamp."""
            msg = Image()
            sec, nanosec = divmod(snapshot.stamp_ns, 1_000_000_000)
            msg.header.stamp.sec = sec
            msg.header.stamp.nanosec = nanosec
            renderer = self._renderer
            msg.header.frame_id = renderer.config.camera if renderer is not None else ""
            msg.height, msg.width = int(frame.shape[0]), int(frame.shape[1])
            msg.encoding = "rgb8"
            msg.is_bigendian = 0
            msg.step = int(frame.shape[1]) * 3
            msg.data = array.array("B", frame.tobytes())
            self._pub_image.publish(msg)
            self._last_image = (snapshot.stamp_ns, msg)

        # -------------------------------------------------------------- stepping
        def _advance(self, action: np.ndarray) -> None:
            """Step once with ``action``, publish; at an episode end reset and publish step 0."""
            self._robot.step(action)
            self.counters["steps"] += 1
            self._publish_sample()
            if self._robot.done:
                self._start_next_episode()

        def _start_next_episode(self) -> None:
            self._robot.reset()
            self.counters["episodes"] += 1
            self._publish_sample()

        def _on_command(self, msg: JointState, info: Any) -> None:
            gid = info["publisher_gid"]
            if gid is None or not self._source.trusts(bytes(gid["data"])):
                self.counters["foreign"] += 1
                self.get_logger().warning(
                    f"ignoring a command from a publisher that is not {self._source.name!r}'s "
                    f"({self.counters['foreign']} so far)",
                    throttle_duration_sec=_WARN_THROTTLE_S,
                )
                return
            self._on_any_command(msg)

        def _on_any_command(self, msg: JointState) -> None:
            self.counters["commands"] += 1
            try:
                action = MetaWorldRobot.validate_action(vector_from_msg(msg, dim=4))
            except (MessageError, InvalidActionError) as exc:
                self.counters["malformed"] += 1
                self.get_logger().warning(
                    f"ignoring malformed command ({self.counters['malformed']} so far): {exc}",
                    throttle_duration_sec=_WARN_THROTTLE_S,
                )
                return
            if self._p["mode"] == "lockstep":
                if stamp_to_ns(msg.header.stamp) != self._stamp_ns:
                    self.counters["stale"] += 1
                    return
                self._advance(action)
            else:
                self._command[:] = action
                self._command_mono = time.monotonic()

        def _on_tick(self) -> None:
            """Realtime mode: one step per timer tick, with the newest fresh command or a hold."""
            fresh = (
                self._command_mono is not None
                and time.monotonic() - self._command_mono <= self._p["command_timeout_s"]
            )
            if fresh:
                action = self._command
            else:
                action = self._robot.hold_action(out=self._hold)
                self.counters["holds"] += 1
            self._advance(action)

        def _on_lockstep_timer(self) -> None:
            if time.monotonic() - self._published_mono >= self._p["lockstep_timeout_s"]:
                self.counters["republished"] += 1
                self._publish_sample(repeat=True)

        def _on_camera_timer(self) -> None:
            if self._renderer is not None:
                self._renderer.submit(self._robot.snapshot(stamp_ns=self._stamp_ns))

        # -------------------------------------------------------------- episode control
        def _end_episode(self, reason: str) -> str:
            """Flag the current episode truncated (extra sample) unless it already ended."""
            robot = self._robot
            ended = f"episode {robot.episode} ended at step {robot.step_count}"
            if not robot.done:
                self._publish_sample(truncate=True)
                ended += f" (truncated: {reason})"
            self.counters["resets"] += 1
            return ended

        def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Any:
            try:
                ended = self._end_episode("reset requested")
                self._start_next_episode()
            except SimError as exc:
                response.success = False
                response.message = f"reset failed: {exc}"
                return response
            response.success = True
            response.message = f"{ended}; episode {self._robot.episode} started"
            self.get_logger().info(response.message)
            return response

        def _on_params(self, changes: dict[str, Any]) -> str | None:
            new = {**self._p, **changes}
            if "task" in changes:
                reason = check_task(new["task"])
                if reason is not None:
                    return reason
            camera_keys = {"camera_name", "camera_width", "camera_height"}
            if camera_keys & changes.keys():
                reason = check_camera(self._robot.model, self._camera_config(new))
                if reason is not None:
                    return reason
            rebuild = ("task" in changes and changes["task"] != self._robot.task) or (
                "seed" in changes and changes["seed"] != self._robot.seed
            )
            if rebuild:
                old = self._robot
                try:
                    robot = self._make_robot(new, first_episode=old.episode + 1)
                except Exception as exc:
                    return f"cannot build {new['task']} (seed {new['seed']}): {exc}"
                ended = self._end_episode(f"task/seed changed to {new['task']}/{new['seed']}")
                self._robot = robot
                old.close()
                self._state_msg.header.frame_id = robot.task
                self.counters["episodes"] += 1
                self._publish_sample()
                self.get_logger().info(f"{ended}; now {robot.task} seed {robot.seed}")
            self._robot.max_episode_steps = int(new["max_episode_steps"])
            self._robot.end_on_success = bool(new["end_on_success"])
            self._robot.set_action_offset(list(new["action_offset"]))
            if {"mode", "control_dt", "lockstep_timeout_s"} & changes.keys():
                self._configure_mode(new)
            if ({"camera_rate_hz", "camera_every_sample", "mode"} | camera_keys) & changes.keys():
                self._configure_camera(new)
            return None

        # -------------------------------------------------------------- reporting, shutdown
        def _report(self) -> None:
            now = time.monotonic()
            rate = (self.counters["steps"] - self._report_steps) / max(
                1e-9, now - self._report_mono
            )
            self._report_steps, self._report_mono = self.counters["steps"], now
            stats = self._renderer.stats if self._renderer is not None else None
            camera = (
                f", camera frames {stats.frames} dropped {stats.dropped} errors {stats.errors}"
                + (f" ({stats.last_error})" if stats.errors else "")
                if stats is not None
                else ""
            )
            self.get_logger().info(
                f"{rate:.0f} steps/s; episode {self._robot.episode} step "
                f"{self._robot.step_count}; "
                + ", ".join(f"{k} {v}" for k, v in self.counters.items())
                + camera
            )

        def close(self) -> None:
            if self._renderer is not None:
                self._renderer.close()
                self._renderer = None
            self._robot.close()

    return SimRobotNode


def main(args: list[str] | None = None) -> None:
    ensure_local_discovery()
    from vlarl.ros.executors import make_executor, spin

    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=args)
    node = None
    executor = None
    try:
        node = _build_node_class()()
        executor = make_executor(node.get_parameter("executor").value)
        executor.add_node(node)
        spin(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, RuntimeError) as exc:  # bad parameters, model or task: say why, exit 1
        print(f"sim_robot: cannot run: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
