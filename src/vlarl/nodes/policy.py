"""policy node: observation -> action chunk from an ONNX policy (+ residual slot), hot-swappable.

Subscribes ``observation`` (sensor_msgs/JointState) and publishes ``policy/action``
(trajectory_msgs/JointTrajectory): the rest of the current chunk in ``positions``, the residual
in ``effort`` (point 0 only; later points are planned without one), the observation's stamp,
and ``frame_id`` = ``model_id@version`` (+ ``+residual@version`` when a residual is installed).

``ros2 param set /policy model <path>`` loads and validates the new file inside the
set-parameters callback, which runs between two control ticks (the executor is single-threaded:
observations that arrive meanwhile wait in the node's queue, none is lost; a load takes about
15-50 ms). A refused file (missing, corrupt, contract-breaking) is
answered with the reason and the running policy keeps control; an accepted one is staged and
the next control tick switches to it (one reference swap between two ticks). Changing ``task``,
``replan_every``, ``providers`` or ``intra_op_threads`` goes through the same path.

Malformed observations (wrong length, non-finite) and non-finite model output are counted and
answered with nothing: the safety node's watchdog then holds the robot.

Residual weights arrive on ``policy_weights`` (std_msgs/UInt8MultiArray, a safetensors blob, see
:mod:`vlarl.core.weights`; reliable + transient local, so a restarted node gets the latest blob).
They are decoded, verified (digest, format, shapes), checked against the running base and the
latest accepted version (same model id, strictly newer), built into an actor and probed in the
default callback group, never on the control path; the control tick then installs the staged
actor between two ticks (one reference swap). A refused blob is counted with its reason and the
previous residual keeps acting. The last accepted versions stay loaded: ``residual_version``
= N rolls back to (pins) version N, 0 runs the zero residual, -1 follows the newest. When the
base model is swapped, a residual trained against another base is dropped (zero residual).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import String, UInt8MultiArray  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from vlarl.contract import ContractError  # noqa: E402
from vlarl.core.chunking import ChunkScheduler  # noqa: E402
from vlarl.core.onnx_policy import PROVIDER_REQUESTS, OnnxPolicy  # noqa: E402
from vlarl.core.residual import MLPResidual, ResidualError, ResidualSlot  # noqa: E402
from vlarl.core.weights import (  # noqa: E402
    ResidualWeights,
    WeightError,
    check_compatible,
    decode_residual,
)
from vlarl.graph import resolve_model_path  # noqa: E402
from vlarl.ros.msgs import (  # noqa: E402
    ActionChunkWriter,
    MessageError,
    stamp_to_ns,
    vector_from_msg,
)
from vlarl.ros.params import Param, declare  # noqa: E402
from vlarl.ros.realtime import MAX_PRIORITY, current_policy, set_realtime_priority  # noqa: E402
from vlarl.topics import (  # noqa: E402
    OBSERVATION,
    POLICY_ACTION,
    POLICY_STATUS,
    POLICY_WEIGHTS,
    ROBOT_STATUS,
)

DEFAULT_MODEL = "models/pick-place-v3-student.onnx"
# rclpy's MultiThreadedExecutor is not offered: its dispatch fell hundreds of milliseconds behind
# at 200 Hz (GIL contention between its wait loop and the worker threads), so the observation
# queue overflowed and ~150 consecutive ticks were lost (bench/control_loop.py, swap test).
EXECUTORS = ("single_threaded", "events")
# Reliable and deep enough to bridge half a second of stall at 200 Hz without losing a tick
# (stale answers are harmless: safety judges them by their stamp).
OBS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE
)
ACTION_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE
)
# The learner's latest blob, kept by its publisher for late joiners (a restarted policy node).
WEIGHTS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
RESIDUAL_HISTORY = 5  # accepted residual versions kept loaded for rollback

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
    Param(
        "residual_version",
        -1,
        "residual actor from policy_weights: -1 = follow the newest accepted blob, 0 = zero "
        "residual, N = roll back to / pin accepted version N (refused unless N is among the "
        f"last {RESIDUAL_HISTORY} accepted)",
        low=-1,
        high=2**62,
    ),
    Param(
        "residual_noise_std",
        0.0,
        "exploration while learning: Gaussian noise of this std added to an active residual "
        "(the noisy residual is what goes out, is recorded and is learned from; safety still "
        "clamps it to +-delta); 0 = deterministic",
        low=0.0,
        high=1.0,
    ),
    Param("status_rate_hz", 1.0, "rate of the JSON status message", low=0.1, high=50.0),
    Param(
        "executor",
        "events",
        "events (rclpy EventsExecutor: cheapest and lowest latency) or single_threaded; with "
        "either, a model load delays the ticks queued meanwhile (none is lost)",
        choices=EXECUTORS,
        read_only=True,
    ),
    Param(
        "realtime_priority",
        0,
        "SCHED_FIFO priority of this process (0 = normal scheduling); needs CAP_SYS_NICE or an "
        "rtprio limit, else a warning and normal scheduling",
        low=0,
        high=MAX_PRIORITY,
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


@dataclass(frozen=True, eq=False)
class ResidualChoice:
    """The residual the control path should run (``weights`` None: the zero residual)."""

    weights: ResidualWeights | None = None
    actor: MLPResidual | None = None


ZERO_RESIDUAL = ResidualChoice()


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
        # Residual weights: written in the default callback group (weights + parameters), the
        # choice is picked up by the control thread between two ticks.
        self._history: dict[int, tuple[ResidualWeights, MLPResidual]] = {}  # oldest first
        self._latest: ResidualWeights | None = None  # newest accepted (version order)
        self._residual_staged: ResidualChoice = ZERO_RESIDUAL
        self._residual_active: ResidualChoice = ZERO_RESIDUAL  # control thread only
        self.weights_received = 0
        self.weights_accepted = 0
        self.weights_refused = 0
        self.last_weight_refusal = ""
        self.weight_prepare_ms = 0.0
        self.residual_swaps = 0

        self._config = declare(self, PARAMS, self._on_change)
        self._config = dict(self._config)
        self._reset_on_episode = bool(self._config["reset_on_episode"])
        self._noise_std = float(self._config["residual_noise_std"])
        self._noise_rng = np.random.default_rng()
        self.executor_kind = str(self._config["executor"])
        self.realtime_priority = int(self._config["realtime_priority"])
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
        self._action_writer = ActionChunkWriter()  # one reused message: no per-tick allocation
        self.create_subscription(
            JointState, OBSERVATION, self._on_observation, OBS_QOS, callback_group=control
        )
        self.create_subscription(
            JointState, ROBOT_STATUS, self._on_robot_status, OBS_QOS, callback_group=control
        )
        self._residual_mode = int(self._config["residual_version"])
        # Not the control group: decoding and probing a blob runs between two ticks (the
        # executor is single-threaded), about a millisecond for a 2x256 actor.
        self.create_subscription(
            UInt8MultiArray,
            POLICY_WEIGHTS,
            self._on_weights,
            WEIGHTS_QOS,
            callback_group=self.default_callback_group,
        )
        self._status_pub = self.create_publisher(String, POLICY_STATUS, 10)
        self.create_timer(1.0 / float(self._config["status_rate_hz"]), self._publish_status)

    # ------------------------------------------------------------------ control path
    def _install(self, rt: Runtime | None) -> None:
        """Switch the control path to ``rt`` and the staged residual (control thread, between
        ticks)."""
        previous = self._active
        if rt is not previous:
            self._active = rt
            if rt is not None:
                rt.scheduler.reset()
                if previous is not None:
                    self.swaps += 1
                    self.get_logger().info(
                        f"active policy {previous.policy.tag} -> {rt.policy.tag} ({rt.path}, "
                        f"task {rt.task}, replan_every {rt.scheduler.replan_every})"
                    )
        if rt is not None:
            self._install_residual(rt, base_changed=rt is not previous)

    def _install_residual(self, rt: Runtime, *, base_changed: bool) -> None:
        """Put the staged residual into ``rt``'s slot, unless it belongs to another base."""
        choice = self._residual_staged
        if choice is self._residual_active and not base_changed:
            return
        self._residual_active = choice
        slot = rt.residual
        before = slot.tag
        w = choice.weights
        if w is None or choice.actor is None:
            slot.clear()
        elif (w.obs_dim, w.action_dim) != (slot.obs_dim, slot.action_dim) or (
            w.base and w.base != rt.policy.tag
        ):
            slot.clear()
            self.get_logger().warning(
                f"dropped residual {w.tag}: trained against base {w.base} (obs_dim "
                f"{w.obs_dim}, action_dim {w.action_dim}), the active base is {rt.policy.tag}; "
                "zero residual until a matching one arrives"
            )
        else:
            try:
                slot.install(choice.actor)
            except ResidualError as exc:  # cannot happen after the probe, but fail closed
                slot.clear()
                self.get_logger().error(f"residual {w.tag} not installed: {exc}")
        if slot.tag != before:
            self.residual_swaps += 1
            self.get_logger().info(
                f"active residual {before or 'zero'} -> {slot.tag or 'zero'} on {rt.policy.tag}"
            )

    def _on_observation(self, msg: JointState) -> None:
        rt = self._staged
        if rt is not self._active or self._residual_staged is not self._residual_active:
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
        if self._noise_std > 0.0 and residual_slot.active:
            block[0] += self._noise_rng.normal(0.0, self._noise_std, residual.shape[0])
        tag = rt.policy.tag
        if residual_slot.active:
            tag = f"{tag}+{residual_slot.tag}"
        self._pub.publish(
            self._action_writer.write(
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

    # ------------------------------------------------------------------ residual weights
    def _on_weights(self, msg: UInt8MultiArray) -> None:
        """Decode, verify, build and probe a residual blob, then stage it (not the control
        thread)."""
        self.weights_received += 1
        start = time.perf_counter()
        rt = self._staged
        try:
            w = decode_residual(msg.data)
            if rt is None:
                raise WeightError(f"{w.tag}: no base model is loaded to check it against")
            meta = rt.policy.metadata
            check_compatible(
                w,
                obs_dim=meta.obs_dim,
                action_dim=meta.action_dim,
                base_tag=rt.policy.tag,
                current=self._latest,
            )
            actor = w.actor()
            # Probe on a scratch slot: dims, tag format and a finite output on zeros.
            ResidualSlot(obs_dim=meta.obs_dim, action_dim=meta.action_dim).install(actor)
        except (WeightError, ResidualError) as exc:
            self.weights_refused += 1
            self.last_weight_refusal = str(exc)
            self.get_logger().warning(
                f"refused residual weights ({len(msg.data)} bytes): {exc}; "
                f"keeping {self._residual_staged_tag()}"
            )
            return
        self._latest = w
        self._history[w.version] = (w, actor)
        while len(self._history) > RESIDUAL_HISTORY:  # the pinned version is never evicted
            del self._history[next(v for v in self._history if v != self._residual_mode)]
        self.weights_accepted += 1
        self.weight_prepare_ms = (time.perf_counter() - start) * 1e3
        self._stage_residual()
        self.get_logger().info(
            f"accepted residual {w.describe()} in {self.weight_prepare_ms:.1f} ms; "
            f"residual_version={self._residual_mode} -> running {self._residual_staged_tag()}"
        )

    def _stage_residual(self) -> None:
        """Stage the residual that ``residual_version`` and the history call for."""
        mode = self._residual_mode
        if mode == 0:
            entry = None
        elif mode < 0:
            entry = self._history.get(self._latest.version) if self._latest else None
        else:
            entry = self._history.get(mode)  # a start-up pin waits for its version to arrive
        if entry is None:
            choice = ZERO_RESIDUAL
        elif entry[0] is self._residual_staged.weights:
            return
        else:
            choice = ResidualChoice(weights=entry[0], actor=entry[1])
        self._residual_staged = choice  # the next control tick installs it

    def _residual_staged_tag(self) -> str:
        w = self._residual_staged.weights
        return "the zero residual" if w is None else w.tag

    # ------------------------------------------------------------------ parameters
    def _on_change(self, changes: dict[str, Any]) -> str | None:
        """Validate a parameter change; load a new model here, off the control thread."""
        if "residual_version" in changes:
            version = int(changes["residual_version"])
            if version > 0 and version not in self._history:
                accepted = ", ".join(map(str, self._history)) or "none"
                reason = (
                    f"residual version {version} is not loaded (accepted versions kept: {accepted})"
                )
                self.refused += 1
                self.last_refusal = f"residual_version={version}: {reason}"
                self.get_logger().warning(f"refused residual_version={version}: {reason}")
                return reason
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
        if "residual_noise_std" in changes:
            self._noise_std = float(changes["residual_noise_std"])
        if "residual_version" in changes:
            self._residual_mode = int(changes["residual_version"])
            self._stage_residual()
            self.get_logger().info(
                f"residual_version={self._residual_mode}: running {self._residual_staged_tag()} "
                "from the next tick"
            )
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
            "residual_version": self._residual_mode,
            "residual_history": list(self._history),
            "residual_latest": self._latest.tag if self._latest else "",
            "residual_swaps": self.residual_swaps,
            "weights_received": self.weights_received,
            "weights_accepted": self.weights_accepted,
            "weights_refused": self.weights_refused,
            "last_weight_refusal": self.last_weight_refusal,
            "weight_prepare_ms": round(self.weight_prepare_ms, 3),
        }

    def _publish_status(self) -> None:
        self._status_pub.publish(String(data=json.dumps(self.status())))


def main(args: list[str] | None = None) -> int:
    ensure_local_discovery()
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from vlarl.ros.executors import make_executor, spin

    rclpy.init(args=args)
    node: PolicyNode | None = None
    try:
        node = PolicyNode()
        reason = set_realtime_priority(node.realtime_priority)
        if reason is not None:
            node.get_logger().warning(f"{reason}: normal scheduling")
        elif node.realtime_priority:
            node.get_logger().info(f"scheduling {current_policy()}")
        executor = make_executor("events" if node.executor_kind == "events" else "single")
        executor.add_node(node)
        spin(executor)  # gc.freeze() first, then spin_once() slices
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


__all__ = [
    "DEFAULT_MODEL",
    "PARAMS",
    "WEIGHTS_QOS",
    "PolicyNode",
    "ResidualChoice",
    "Runtime",
    "build_runtime",
    "main",
]
