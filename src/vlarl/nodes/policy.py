"""policy node: observation -> action chunk from an ONNX policy (+ residual slot), hot-swappable.

Subscribes ``observation`` (sensor_msgs/JointState) and publishes ``policy/action``
(trajectory_msgs/JointTrajectory): the rest of the current chunk in ``positions``, the residual
in ``effort`` (point 0 only; later points are planned without one), the observation's stamp,
and ``frame_id`` = ``model_id@version`` (+ ``+residual@version`` when a residual is installed).

``ros2 param set /policy model <path>`` loads and validates the new file inside the
set-parameters callback, which runs in its own callback group of a multi-threaded executor, so
control ticks go on while it loads. A refused file (missing, corrupt, contract-breaking) is
answered with the reason and the running policy keeps control; an accepted one is staged and
the next control tick switches to it (one reference swap between two ticks). Changing ``task``,
``replan_every``, ``providers`` or ``intra_op_threads`` goes through the same path.

Malformed observations (wrong length, non-finite) and non-finite model output are counted and
answered with nothing: the safety node's watchdog then holds the robot.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from vlarl.contract import ContractError  # noqa: E402
from vlarl.core.chunking import ChunkScheduler  # noqa: E402
from vlarl.core.onnx_policy import PROVIDER_REQUESTS, OnnxPolicy  # noqa: E402
from vlarl.core.residual import ResidualError, ResidualSlot  # noqa: E402
from vlarl.graph import resolve_model_path  # noqa: E402
from vlarl.ros.msgs import MessageError, action_chunk_msg, stamp_to_ns, vector_from_msg  # noqa: E402
from vlarl.ros.params import Param, declare  # noqa: E402
from vlarl.topics import OBSERVATION, POLICY_ACTION, POLICY_STATUS, ROBOT_STATUS  # noqa: E402

DEFAULT_MODEL = "models/pick-place-v3-student.onnx"
EXECUTORS = ("multi_threaded", "single_threaded", "events")
# Reliable and deep enough to bridge half a second of stall at 200 Hz without losing a tick
# (stale answers are harmless: safety judges them by their stamp).
OBS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE
)
ACTION_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE
)

PARAMS: tuple[Param, ...] = (
    Param(
        "model",
        DEFAULT_MODEL,
        "ONNX policy file meeting the model contract; relative paths: cwd, then the package. "
        "Setting it (even to the same path) loads, validates and swaps in the file.",
    ),
    Param("task", "pick-place-v3", "task to run; must be one of the model's tasks"),
    Param(
        "replan_every",
        0,
        "execute this many steps of a chunk before re-planning (0 = the model's chunk_length)",
        low=0,
        high=100_000,
    ),
    Param(
        "providers",
        "auto",
        "ONNX Runtime execution providers (auto = TensorRT > CUDA > CPU)",
        choices=PROVIDER_REQUESTS,
    ),
    Param("intra_op_threads", 1, "ONNX Runtime intra-op threads", low=1, high=64),
    Param(
        "reset_on_episode",
        True,
        "drop the current chunk and re-plan at the first observation of a new episode "
        "(episode boundaries from robot/status)",
    ),
    Param("status_rate_hz", 1.0, "rate of the JSON status message", low=0.1, high=50.0),
    Param(
        "executor",
        "multi_threaded",
        "multi_threaded: model loads run beside the control ticks (about twice the CPU per "
        "tick); single_threaded / events (EventsExecutor, cheapest): a load delays the ticks "
        "queued meanwhile (none is lost)",
        choices=EXECUTORS,
        read_only=True,
    ),
)
# Parameters whose change builds a new runtime (and, for the first three, reloads the file).
_RELOAD = ("model", "providers", "intra_op_threads")
_RUNTIME = (*_RELOAD, "task", "replan_every")


@dataclass(frozen=True, eq=False)
class Runtime:
    """Everything one control tick needs, swapped as one reference."""

    policy: OnnxPolicy
    task: str
    scheduler: ChunkScheduler
    residual: ResidualSlot
    chunk: np.ndarray  # [H, A] buffer predict() writes into
    residual_block: np.ndarray  # [H, A] zeros; row 0 holds this tick's residual
    step_dt: float
    path: str

    @property
    def obs_dim(self) -> int:
        return self.policy.metadata.obs_dim


def build_runtime(
    config: dict[str, Any],
    *,
    current: Runtime | None = None,
    reload: bool = True,
) -> Runtime:
    """A runtime for ``config``; reuses ``current``'s policy unless ``reload``.

    Raises :class:`ContractError` (or ``ValueError``) with the reason to refuse.
    """
    if reload or current is None:
        path = resolve_model_path(str(config["model"]))
        policy = OnnxPolicy.load(
            path,
            providers=str(config["providers"]),
            intra_op_threads=int(config["intra_op_threads"]),
        )
    else:
        path, policy = current.policy.path, current.policy
    meta = policy.metadata
    task = str(config["task"])
    if task not in meta.tasks:
        raise ContractError(
            f"{meta.tag} does not know task {task!r} (its tasks: {', '.join(meta.tasks)})"
        )
    replan = int(config["replan_every"]) or meta.chunk_length
    if replan > meta.chunk_length:
        raise ContractError(
            f"replan_every={replan} exceeds {meta.tag}'s chunk_length={meta.chunk_length}"
        )
    residual = (
        current.residual
        if current is not None
        and current.residual.obs_dim == meta.obs_dim
        and current.residual.action_dim == meta.action_dim
        else ResidualSlot(obs_dim=meta.obs_dim, action_dim=meta.action_dim)
    )
    shape = (meta.chunk_length, meta.action_dim)
    return Runtime(
        policy=policy,
        task=task,
        scheduler=ChunkScheduler(chunk_length=meta.chunk_length, replan_every=replan),
        residual=residual,
        chunk=np.zeros(shape, dtype=np.float32),
        residual_block=np.zeros(shape, dtype=np.float32),
        step_dt=float(meta.control_dt),
        path=str(path),
    )


class PolicyNode(Node):
    """The policy node (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("policy", **kwargs)
        self._config: dict[str, Any] = {}
        self._staged: Runtime | None = None  # written by the parameter thread
        self._active: Runtime | None = None  # read/written by the control thread only
        self.ticks = 0
        self.published = 0
        self.malformed = 0
        self.failed = 0  # non-finite/failed model or residual output
        self.no_model = 0
        self.plans = 0
        self.swaps = 0
        self.refused = 0
        self.episode_resets = 0
        self.last_refusal = ""
        self.load_error = ""
        self._episode_start_ns = 0
        self._reset_done_ns = 0
        self._last_episode: float | None = None

        self._config = declare(self, PARAMS, self._on_change)
        self._config = dict(self._config)
        self._reset_on_episode = bool(self._config["reset_on_episode"])
        self.executor_kind = str(self._config["executor"])
        try:
            self._staged = build_runtime(self._config)
        except (ContractError, ValueError) as exc:
            self.load_error = str(exc)
            self.get_logger().error(
                f"no policy: {exc}. Observations go unanswered (safety holds) until "
                "`ros2 param set /policy model <path>` names a valid model."
            )
        else:
            self.get_logger().info(
                f"loaded {self._staged.policy.tag} from {self._staged.path} "
                f"(providers {', '.join(self._staged.policy.providers)}, "
                f"task {self._staged.task}, replan_every {self._staged.scheduler.replan_every})"
            )

        control = MutuallyExclusiveCallbackGroup()
        self._pub = self.create_publisher(JointTrajectory, POLICY_ACTION, ACTION_QOS)
        self.create_subscription(
            JointState, OBSERVATION, self._on_observation, OBS_QOS, callback_group=control
        )
        self.create_subscription(
            JointState, ROBOT_STATUS, self._on_robot_status, OBS_QOS, callback_group=control
        )
        self._status_pub = self.create_publisher(String, POLICY_STATUS, 10)
        self.create_timer(1.0 / float(self._config["status_rate_hz"]), self._publish_status)

    # ------------------------------------------------------------------ control path
    def _install(self, rt: Runtime | None) -> None:
        """Switch the control path to ``rt`` (runs on the control thread, between ticks)."""
        previous = self._active
        self._active = rt
        if rt is None:
            return
        rt.scheduler.reset()
        if previous is not None:
            self.swaps += 1
            self.get_logger().info(
                f"active policy {previous.policy.tag} -> {rt.policy.tag} ({rt.path}, task "
                f"{rt.task}, replan_every {rt.scheduler.replan_every})"
            )

    def _on_observation(self, msg: JointState) -> None:
        rt = self._staged
        if rt is not self._active:
            self._install(rt)
        if rt is None:
            self.no_model += 1
            return
        self.ticks += 1
        try:
            obs = vector_from_msg(msg, dim=rt.obs_dim)
        except MessageError:
            self.malformed += 1
            return
        scheduler = rt.scheduler
        if (
            self._episode_start_ns > self._reset_done_ns
            and self._reset_on_episode
            and stamp_to_ns(msg.header.stamp) >= self._episode_start_ns
        ):
            scheduler.reset()
            self._reset_done_ns = self._episode_start_ns
            self.episode_resets += 1
        if scheduler.needs_plan():
            try:
                rt.policy.predict(obs, task=rt.task, out=rt.chunk)
            except Exception:  # non-finite output or a run-time failure: answer nothing
                self.failed += 1
                return
            scheduler.set_plan(rt.chunk)
            self.plans += 1
        action, remaining = scheduler.next()
        residual_slot = rt.residual
        try:
            residual = residual_slot.compute(obs, action)
        except ResidualError:
            self.failed += 1
            return
        block = rt.residual_block[: remaining.shape[0]]
        block[0] = residual
        tag = rt.policy.tag
        if residual_slot.active:
            tag = f"{tag}+{residual_slot.tag}"
        self._pub.publish(
            action_chunk_msg(
                remaining, block, stamp=msg.header.stamp, version_tag=tag, step_dt=rt.step_dt
            )
        )
        self.published += 1

    def _on_robot_status(self, msg: JointState) -> None:
        """Note where an episode starts (stamp of its step-0 status or of its first status)."""
        try:
            names = msg.name
            episode = msg.position[names.index("episode")]
            step = msg.position[names.index("step")]
        except (ValueError, IndexError):
            return
        if step == 0 or (self._last_episode is not None and episode != self._last_episode):
            self._episode_start_ns = stamp_to_ns(msg.header.stamp)
        self._last_episode = episode

    # ------------------------------------------------------------------ parameters
    def _on_change(self, changes: dict[str, Any]) -> str | None:
        """Validate a parameter change; load a new model here, off the control thread."""
        if self._staged is None and "model" not in changes:
            pass  # no model to check against: stored, validated with the next model load
        elif any(k in changes for k in _RUNTIME):
            config = {**self._config, **changes}
            reload = any(k in changes for k in _RELOAD)
            try:
                rt = build_runtime(config, current=self._staged, reload=reload)
            except (ContractError, ValueError) as exc:
                self.refused += 1
                what = ", ".join(f"{k}={v}" for k, v in changes.items())
                self.last_refusal = f"{what}: {exc}"
                self.get_logger().warning(f"refused {what}: {exc}; keeping the running policy")
                return str(exc)
            self._staged = rt  # the next control tick switches to it
            self.load_error = ""
            self.get_logger().info(
                f"staged {rt.policy.tag} from {rt.path} (providers "
                f"{', '.join(rt.policy.providers)}, task {rt.task}); active from the next tick"
            )
        if "reset_on_episode" in changes:
            self._reset_on_episode = bool(changes["reset_on_episode"])
        self._config.update(changes)
        return None

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        rt = self._active if self._active is not None else self._staged
        return {
            "model": rt.policy.tag if rt else "",
            "path": rt.path if rt else "",
            "sha256": rt.policy.sha256[:16] if rt else "",
            "providers": rt.policy.providers if rt else [],
            "task": rt.task if rt else "",
            "replan_every": rt.scheduler.replan_every if rt else 0,
            "residual": rt.residual.tag if rt else "",
            "ticks": self.ticks,
            "published": self.published,
            "dropped": self.malformed + self.failed + self.no_model,
            "malformed": self.malformed,
            "failed": self.failed,
            "no_model": self.no_model,
            "plans": self.plans,
            "episode_resets": self.episode_resets,
            "swaps": self.swaps,
            "refused": self.refused,
            "last_refusal": self.last_refusal,
            "load_error": self.load_error,
        }

    def _publish_status(self) -> None:
        self._status_pub.publish(String(data=json.dumps(self.status())))


def main(args: list[str] | None = None) -> int:
    ensure_local_discovery()
    import rclpy
    from rclpy.executors import (
        Executor,
        ExternalShutdownException,
        MultiThreadedExecutor,
        SingleThreadedExecutor,
    )

    rclpy.init(args=args)
    node: PolicyNode | None = None
    try:
        node = PolicyNode()
        executor: Executor
        if node.executor_kind == "events":
            from vlarl.ros.executors import make_executor, spin

            executor = make_executor("events")
            executor.add_node(node)
            spin(executor)
            return 0
        if node.executor_kind == "single_threaded":
            executor = SingleThreadedExecutor()
        else:
            # Two threads: the control group and the default group (parameter services,
            # status), so a model load in a set-parameters call does not block control ticks.
            executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as exc:  # a bad start-up parameter
        print(f"policy: {exc}", file=sys.stderr)
        return 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DEFAULT_MODEL", "PARAMS", "PolicyNode", "Runtime", "build_runtime", "main"]
