"""policy node: observation -> action chunk from an ONNX policy (+ residual slot), hot-swappable.

Subscribes ``observation`` (sensor_msgs/JointState) and publishes ``policy/action``
(trajectory_msgs/JointTrajectory): the rest of the current chunk in ``positions``, the residual
in ``effort`` (point 0 only; later points are planned without one), the observation's stamp,
and ``frame_id`` = ``model_id@version`` (+ ``+residual@version`` when a residual is installed).

``ros2 param set /policy model <path>`` is answered at once with what can be judged without
reading the file (missing, not a regular file, over ``max_model_bytes``: refused with the
reason); anything else is accepted for checking and loaded on the candidate worker thread,
never on the control path: the model contract, the robot's dims (obs_dim as the robot
provides it, action_dim = the command's size), its outputs on recent real observations (finite,
within ±action_bound) and its measured cost per tick against the budget (a share of the control
period), all with :mod:`vlarl.core.candidate`. A verified model is staged and the next control
tick switches to it (one reference swap between two ticks); a refused one is reported in
policy/status (``refused``, ``last_refusal``), the parameter goes back to the running model's
value, and the running policy keeps control. Changing ``providers`` or ``intra_op_threads``
reloads the same way; ``task`` and ``replan_every`` apply at once to the running model.

Malformed observations (wrong length, non-finite) and non-finite model output are counted and
answered with nothing: the safety node's watchdog then holds the robot.

Residual weights arrive on ``policy_weights`` (std_msgs/UInt8MultiArray, a safetensors blob, see
:mod:`vlarl.core.weights`; reliable + transient local, so a restarted node gets the latest blob).
The subscription takes the serialized message (a blob over ``max_blob_bytes`` is refused without
deserializing it); the worker thread decodes and verifies it (digest, format, shapes), checks
it against the running base and the learner's lineage (same model id, newer than the newest
accepted by at most ``max_version_step``), then on recent real observations and against the
budget; the control tick then installs the staged actor between two ticks (one reference swap).
A refused blob is counted with its reason (``last_weight_refusal``) and the previous residual
keeps acting. The last accepted versions stay loaded: ``residual_version`` = N rolls back to
(pins) version N, 0 runs the zero residual, -1 follows the newest. When the base model is
swapped, a residual trained against another base is dropped (zero residual).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import String, UInt8MultiArray  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from vlarl.contract import ContractError  # noqa: E402
from vlarl.core.candidate import (  # noqa: E402
    CandidateRefused,
    CandidateWorker,
    CheckReport,
    PolicyCandidate,
    RecentObservations,
    ResidualCandidate,
    RobotContract,
    SwapConfig,
    check_blob_size,
    check_lineage,
    check_model_file,
    load_model_candidate,
    measure_cost,
    verify_candidate,
    wait_for,
)
from vlarl.core.chunking import ChunkScheduler  # noqa: E402
from vlarl.core.onnx_policy import (  # noqa: E402
    PROVIDER_REQUESTS,
    OnnxPolicy,
    choose_providers,
)
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
    ACTION_NAMES,
    OBSERVATION,
    POLICY_ACTION,
    POLICY_STATUS,
    POLICY_WEIGHTS,
    ROBOT_STATUS,
)

DEFAULT_MODEL = "models/pick-place-v3-student.onnx"
# The robot takes one command of this size per tick (safety/command: dx, dy, dz, gripper).
ROBOT_ACTION_DIM = len(ACTION_NAMES)
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
# How often the executor thread picks up the worker's verdicts (a swap waits at most this long).
APPLY_PERIOD_S = 0.005
# CDR framing of a UInt8MultiArray around its data (layout + sequence headers), generously.
_BLOB_FRAMING_BYTES = 1024

_SWAP = SwapConfig()
# One parameter per SwapConfig field, same name; read-only: the limits are fixed at start.
SWAP_PARAMS: tuple[Param, ...] = (
    Param("max_blob_bytes", _SWAP.max_blob_bytes,
          "largest residual weight blob accepted (bytes)", low=1, high=2**40, read_only=True),
    Param("max_model_bytes", _SWAP.max_model_bytes,
          "largest model file accepted (bytes, stat before reading)", low=1, high=2**40,
          read_only=True),
    Param("tick_budget_fraction", _SWAP.tick_budget_fraction,
          "share of the control period one tick (base + residual) may use, measured on the "
          "candidate before a swap", low=0.01, high=1.0, read_only=True),
    Param("timing_calls", _SWAP.timing_calls,
          "timed calls of a candidate (their median is its cost per tick)", low=1, high=10_000,
          read_only=True),
    Param("check_observations", _SWAP.check_observations,
          "recent real observations a candidate's outputs are checked on", low=1, high=10_000,
          read_only=True),
    Param("min_observations", _SWAP.min_observations,
          "a candidate waits until this many observations were seen", low=1, high=10_000,
          read_only=True),
    Param("action_bound", _SWAP.action_bound,
          "candidate outputs must be finite and within +-action_bound", low=1e-6, high=1e6,
          read_only=True),
    Param("max_version_step", _SWAP.max_version_step,
          "a residual version may be at most this far above the newest accepted one",
          low=1, high=2**62, read_only=True),
    Param("max_version", _SWAP.max_version, "no residual version above this is accepted",
          low=1, high=2**62, read_only=True),
    Param("obs_dim", _SWAP.obs_dim,
          "observation size the robot provides; 0 = the start-up model's (else the first "
          "observation's)", low=0, high=1_000_000, read_only=True),
    Param("control_period_s", _SWAP.control_period_s,
          "control period the tick budget derives from; 0 = the start-up model's control_dt",
          low=0.0, high=10.0, read_only=True),
)  # fmt: skip


def swap_config(values: dict[str, Any]) -> SwapConfig:
    """The SwapConfig the node's parameter values describe."""
    return SwapConfig(**{f.name: values[f.name] for f in fields(SwapConfig)})


PARAMS: tuple[Param, ...] = (
    Param(
        "model",
        DEFAULT_MODEL,
        "ONNX policy file meeting the model contract; relative paths: cwd, then the package. "
        "Setting it (even to the same path) loads and checks the file off the control path "
        "and swaps it in when it passes (verdict in policy/status).",
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
        "events (rclpy EventsExecutor: cheapest and lowest latency) or single_threaded; "
        "models and blobs are loaded and checked on a worker thread with either",
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
    *SWAP_PARAMS,
)
# Parameters whose change loads the file again (on the worker thread).
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
    cost_s: float = 0.0  # measured median time of one chunk prediction

    @property
    def obs_dim(self) -> int:
        return self.policy.metadata.obs_dim


def build_runtime(
    config: dict[str, Any],
    policy: OnnxPolicy,
    *,
    current: Runtime | None = None,
    cost_s: float = 0.0,
) -> Runtime:
    """A runtime running ``policy`` with ``config``'s task and schedule.

    Raises :class:`ContractError` with the reason to refuse.
    """
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
        path=str(policy.path),
        cost_s=cost_s,
    )


@dataclass(frozen=True, eq=False)
class ResidualChoice:
    """The residual the control path should run (``weights`` None: the zero residual)."""

    weights: ResidualWeights | None = None
    actor: MLPResidual | None = None
    cost_s: float = 0.0  # measured median time of one call


ZERO_RESIDUAL = ResidualChoice()


@dataclass(frozen=True)
class ModelRequest:
    """A parameter change that loads a model file; ``previous``: the values to go back to."""

    changes: dict[str, Any]
    previous: dict[str, Any]
    path: str
    task: str
    providers: str
    intra_op_threads: int

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.changes.items())


@dataclass(frozen=True)
class ModelVerdict:
    request: ModelRequest
    policy: OnnxPolicy | None = None
    report: CheckReport | None = None
    reason: str = ""


@dataclass(frozen=True)
class BlobVerdict:
    size: int
    prepare_s: float = 0.0  # deserialize, decode and check, on the worker
    weights: ResidualWeights | None = None
    actor: MLPResidual | None = None
    report: CheckReport | None = None
    reason: str = ""


# What a candidate may be refused with (each carries a one-line reason).
_REFUSALS = (ContractError, WeightError, ResidualError, CandidateRefused)


class PolicyNode(Node):
    """The policy node (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("policy", **kwargs)
        self._config: dict[str, Any] = {}
        self._staged: Runtime | None = None  # written by the executor thread (verdicts)
        self._active: Runtime | None = None  # read/written by the control path only
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
        self.last_check = ""
        self._episode_start_ns = 0
        self._reset_done_ns = 0
        self._last_episode: float | None = None
        # Residual weights: verdicts are applied in the executor thread, the choice is picked
        # up by the control path between two ticks.
        self._history: dict[int, tuple[ResidualWeights, MLPResidual, float]] = {}  # oldest first
        self._latest: ResidualWeights | None = None  # newest accepted (version order)
        self._lineage_newest: ResidualWeights | None = None  # the worker's view of it
        self._residual_staged: ResidualChoice = ZERO_RESIDUAL
        self._residual_active: ResidualChoice = ZERO_RESIDUAL  # control path only
        self.weights_received = 0
        self.weights_accepted = 0
        self.weights_refused = 0
        self.last_weight_refusal = ""
        self.weight_prepare_ms = 0.0
        self.residual_swaps = 0
        self._pending: dict[str, str] = {}  # worker job kind -> what it checks
        self._reverting = False

        self._config = dict(declare(self, PARAMS, self._on_change))
        self.swap_config = swap_config(self._config)
        self._reset_on_episode = bool(self._config["reset_on_episode"])
        self._noise_std = float(self._config["residual_noise_std"])
        self._noise_rng = np.random.default_rng()
        self.executor_kind = str(self._config["executor"])
        self.realtime_priority = int(self._config["realtime_priority"])
        # The robot's contract: obs_dim from the parameter, else the start-up model, else the
        # first observation; the control period likewise (else the first model's control_dt).
        self._obs_dim = self.swap_config.obs_dim
        self._control_period_s = self.swap_config.control_period_s
        self._recent: RecentObservations | None = None
        self._active_model_values = {k: self._config[k] for k in _RELOAD}
        try:
            self._staged = self._load_startup_model()
        except _REFUSALS as exc:
            self.load_error = str(exc)
            self.get_logger().error(
                f"no policy: {exc}. Observations go unanswered (safety holds) until "
                "`ros2 param set /policy model <path>` names a valid model."
            )
        else:
            self.get_logger().info(
                f"loaded {self._staged.policy.tag} from {self._staged.path} "
                f"(providers {', '.join(self._staged.policy.providers)}, "
                f"task {self._staged.task}, replan_every {self._staged.scheduler.replan_every}, "
                f"{self._staged.cost_s * 1e3:.3f} ms per plan)"
            )
        if self._obs_dim:
            self._fix_obs_dim(self._obs_dim)
        self._worker = CandidateWorker("policy-candidates")

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
        # Serialized messages: the size cap is checked before anything is deserialized, and
        # deserializing, decoding and checking run on the worker thread.
        self.create_subscription(
            UInt8MultiArray,
            POLICY_WEIGHTS,
            self._on_weights,
            WEIGHTS_QOS,
            callback_group=self.default_callback_group,
            raw=True,
        )
        self._status_pub = self.create_publisher(String, POLICY_STATUS, 10)
        self.create_timer(1.0 / float(self._config["status_rate_hz"]), self._publish_status)
        self.create_timer(APPLY_PERIOD_S, self._apply_verdicts)

    # ------------------------------------------------------------------ contract
    def _fix_obs_dim(self, obs_dim: int) -> None:
        self._obs_dim = obs_dim
        self._recent = RecentObservations(
            capacity=self.swap_config.check_observations,
            obs_dim=obs_dim,
            action_dim=ROBOT_ACTION_DIM,
        )

    def _contract(self, control_dt: float) -> RobotContract | None:
        """The robot's contract (None while obs_dim is not known yet)."""
        if not self._obs_dim:
            return None
        return RobotContract(
            obs_dim=self._obs_dim,
            action_dim=ROBOT_ACTION_DIM,
            control_period_s=self._control_period_s or control_dt,
        )

    def _load_startup_model(self) -> Runtime:
        """The start-up model: size cap, contract, the robot's dims and the budget, measured on
        zeros (no real observation exists yet)."""
        config = self._config
        policy = load_model_candidate(
            resolve_model_path(str(config["model"])),
            config=self.swap_config,
            contract=None,
            providers=str(config["providers"]),
            intra_op_threads=int(config["intra_op_threads"]),
        )
        meta = policy.metadata
        contract = RobotContract(
            obs_dim=self._obs_dim or meta.obs_dim,
            action_dim=ROBOT_ACTION_DIM,
            control_period_s=self._control_period_s or meta.control_dt,
        )
        contract.check_dims(f"model {policy.tag}", meta.obs_dim, meta.action_dim)
        rt = build_runtime(config, policy)
        zeros = np.zeros(meta.obs_dim, dtype=np.float32)
        budget = contract.tick_budget_s(self.swap_config)
        cost, calls = measure_cost(
            lambda _: policy.predict(zeros, task=rt.task, out=rt.chunk),
            calls=self.swap_config.timing_calls,
            limit_s=budget,
        )
        if cost > budget:
            raise CandidateRefused(
                f"model {policy.tag} needs {cost * 1e3:.3f} ms per plan (median of {calls} "
                f"calls), over the budget of {budget * 1e3:.2f} ms"
            )
        self._obs_dim = contract.obs_dim
        self._control_period_s = contract.control_period_s
        return build_runtime(config, policy, cost_s=cost)

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
            except ResidualError as exc:  # cannot happen after the checks, but fail closed
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
            self._note_observation(msg)
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
        recent = self._recent
        if recent is not None:  # what candidates are checked on before a swap
            recent.add(obs, action)
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

    def _note_observation(self, msg: JointState) -> None:
        """Without a model: keep well-formed observations for checking the first one (the
        first observation fixes obs_dim when neither the parameter nor a model did)."""
        try:
            obs = vector_from_msg(msg, dim=self._obs_dim or len(msg.position))
        except MessageError:
            return
        if self._recent is None:
            if not obs.size:
                return
            self._fix_obs_dim(int(obs.size))
            self.get_logger().info(f"obs_dim {obs.size} fixed by the first observation")
        assert self._recent is not None
        self._recent.add(obs)

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

    # ------------------------------------------------------------------ candidate checks
    def _wait_for_observations(self, tag: str, cancelled: Callable[[], bool]) -> None:
        """Block the worker until enough real observations were seen (or a newer job came)."""
        needed = self.swap_config.min_observations
        if not wait_for(
            lambda: self._recent is not None and len(self._recent) >= needed, cancelled
        ):
            raise CandidateRefused(f"{tag}: replaced by a newer request before it was checked")

    def _recent_snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        assert self._recent is not None
        return self._recent.snapshot(self.swap_config.check_observations)

    def _check_model(self, request: ModelRequest, cancelled: Callable[[], bool]) -> ModelVerdict:
        """Worker thread: load and check a model file; never touches the control path."""
        try:
            contract = self._contract(0.0)
            policy = load_model_candidate(
                resolve_model_path(request.path),
                config=self.swap_config,
                contract=contract,
                providers=request.providers,
                intra_op_threads=request.intra_op_threads,
            )
            if request.task not in policy.metadata.tasks:
                raise ContractError(
                    f"{policy.tag} does not know task {request.task!r} (its tasks: "
                    f"{', '.join(policy.metadata.tasks)})"
                )
            self._wait_for_observations(policy.tag, cancelled)
            contract = self._contract(policy.metadata.control_dt)
            assert contract is not None
            obs, base = self._recent_snapshot()
            report = verify_candidate(
                PolicyCandidate(policy, request.task),
                obs,
                base,
                contract=contract,
                config=self.swap_config,
                rest_of_tick_s=self._residual_staged.cost_s,
            )
        except _REFUSALS as exc:
            return ModelVerdict(request, reason=str(exc))
        return ModelVerdict(request, policy=policy, report=report)

    def _check_blob(self, raw: bytes, cancelled: Callable[[], bool]) -> BlobVerdict:
        """Worker thread: deserialize, decode and check a residual blob."""
        size = len(raw)
        start = time.perf_counter()
        try:
            msg = deserialize_message(raw, UInt8MultiArray)
            data = bytes(msg.data)
            size = len(data)
            check_blob_size(size, self.swap_config)
            w = decode_residual(data)
            rt = self._staged
            if rt is None:
                raise WeightError(f"{w.tag}: no base model is loaded to check it against")
            meta = rt.policy.metadata
            newest = self._lineage_newest
            check_compatible(
                w,
                obs_dim=meta.obs_dim,
                action_dim=meta.action_dim,
                base_tag=rt.policy.tag,
                current=newest,
            )
            check_lineage(
                w.tag,
                version=w.version,
                parent=w.parent,
                newest=None if newest is None else newest.version,
                config=self.swap_config,
            )
            actor = w.actor()
            # Dims, tag format and a finite output on zeros (a scratch slot).
            ResidualSlot(obs_dim=meta.obs_dim, action_dim=meta.action_dim).install(actor)
            self._wait_for_observations(w.tag, cancelled)
            contract = self._contract(meta.control_dt)
            assert contract is not None
            obs, base = self._recent_snapshot()
            report = verify_candidate(
                ResidualCandidate(actor),
                obs,
                base,
                contract=contract,
                config=self.swap_config,
                rest_of_tick_s=rt.cost_s,
            )
        except _REFUSALS as exc:
            return BlobVerdict(size, reason=str(exc))
        except Exception as exc:  # a message that does not even deserialize
            return BlobVerdict(size, reason=f"not a UInt8MultiArray message: {exc}")
        self._lineage_newest = w  # refused blobs never move the lineage
        return BlobVerdict(
            size,
            prepare_s=time.perf_counter() - start,
            weights=w,
            actor=actor,
            report=report,
        )

    def _apply_verdicts(self) -> None:
        """Executor thread: stage what passed, report what did not."""
        for kind, verdict in self._worker.drain():
            self._pending.pop(kind, None)
            if isinstance(verdict, ModelVerdict):
                self._apply_model(verdict)
            elif isinstance(verdict, BlobVerdict):
                self._apply_blob(verdict)
            else:  # a bug in a check: report it, keep running
                self.get_logger().error(f"candidate check failed ({kind}): {verdict!r}")
            for busy in self._worker.busy:
                self._pending.setdefault(busy, "")

    def _refuse_model(self, request: ModelRequest, reason: str) -> None:
        self.refused += 1
        self.last_refusal = f"{request.describe()}: {reason}"
        self.get_logger().warning(
            f"refused {request.describe()}: {reason}; keeping the running policy"
        )
        # The parameters go back to what runs, unless they were changed again meanwhile.
        back = [
            Parameter(k, value=request.previous[k])
            for k, v in request.changes.items()
            if self._config.get(k) == v
        ]
        if back:
            self._reverting = True
            try:
                self.set_parameters(back)
            finally:
                self._reverting = False

    def _apply_model(self, verdict: ModelVerdict) -> None:
        request = verdict.request
        if verdict.policy is None or verdict.report is None:
            self._refuse_model(request, verdict.reason)
            return
        try:
            rt = build_runtime(
                self._config, verdict.policy, current=self._staged, cost_s=verdict.report.cost_s
            )
        except ContractError as exc:
            self._refuse_model(request, str(exc))
            return
        self._staged = rt  # the next control tick switches to it
        self._active_model_values = {k: self._config[k] for k in _RELOAD}
        self.load_error = ""
        self.last_check = verdict.report.describe()
        self.get_logger().info(
            f"staged {rt.policy.tag} from {rt.path} (providers "
            f"{', '.join(rt.policy.providers)}, task {rt.task}); {self.last_check}; active "
            "from the next tick"
        )

    def _refuse_blob(self, size: int, reason: str) -> None:
        self.weights_refused += 1
        self.last_weight_refusal = reason
        self.get_logger().warning(
            f"refused residual weights ({size} bytes): {reason}; "
            f"keeping {self._residual_staged_tag()}"
        )

    def _apply_blob(self, verdict: BlobVerdict) -> None:
        w, actor, report = verdict.weights, verdict.actor, verdict.report
        if w is None or actor is None or report is None:
            self._refuse_blob(verdict.size, verdict.reason)
            return
        self._latest = w
        self._history[w.version] = (w, actor, report.cost_s)
        while len(self._history) > RESIDUAL_HISTORY:  # the pinned version is never evicted
            del self._history[next(v for v in self._history if v != self._residual_mode)]
        self.weights_accepted += 1
        self.weight_prepare_ms = verdict.prepare_s * 1e3
        self.last_check = report.describe()
        self._stage_residual()
        self.get_logger().info(
            f"accepted residual {w.describe()}; {self.last_check}; "
            f"residual_version={self._residual_mode} -> running {self._residual_staged_tag()}"
        )

    # ------------------------------------------------------------------ residual weights
    def _on_weights(self, raw: bytes) -> None:
        """A serialized blob message: the size cap here, everything else on the worker."""
        self.weights_received += 1
        if len(raw) > self.swap_config.max_blob_bytes + _BLOB_FRAMING_BYTES:
            self._refuse_blob(
                len(raw),
                f"message of {len(raw)} bytes is over the cap of "
                f"{self.swap_config.max_blob_bytes} bytes (max_blob_bytes); not deserialized",
            )
            return
        replaced = self._worker.submit("blob", lambda cancelled: self._check_blob(raw, cancelled))
        self._pending["blob"] = f"residual blob of {len(raw)} bytes"
        for _ in replaced:
            self._refuse_blob(0, "replaced by a newer blob before it was checked")

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
            choice = ResidualChoice(weights=entry[0], actor=entry[1], cost_s=entry[2])
        self._residual_staged = choice  # the next control tick installs it

    def _residual_staged_tag(self) -> str:
        w = self._residual_staged.weights
        return "the zero residual" if w is None else w.tag

    # ------------------------------------------------------------------ parameters
    def _on_change(self, changes: dict[str, Any]) -> str | None:
        """Validate a parameter change; model files are queued for the worker thread."""
        if self._reverting:  # a refused model's parameters going back to what runs
            self._config.update(changes)
            return None
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
        reload = {k: v for k, v in changes.items() if k in _RELOAD}
        if reload:
            refusal = self._request_model(changes, reload)
            if refusal is not None:
                return refusal
        elif self._staged is not None and any(k in changes for k in _RUNTIME):
            config = {**self._config, **changes}
            try:
                rt = build_runtime(
                    config, self._staged.policy, current=self._staged, cost_s=self._staged.cost_s
                )
            except ContractError as exc:
                self.refused += 1
                what = ", ".join(f"{k}={v}" for k, v in changes.items())
                self.last_refusal = f"{what}: {exc}"
                self.get_logger().warning(f"refused {what}: {exc}; keeping the running policy")
                return str(exc)
            self._staged = rt  # the next control tick switches to it
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

    def _request_model(self, changes: dict[str, Any], reload: dict[str, Any]) -> str | None:
        """What can be judged without reading the file is answered now (missing, not a file,
        over the size cap, unknown provider); the rest is queued for the worker thread."""
        config = {**self._config, **changes}
        what = ", ".join(f"{k}={v}" for k, v in changes.items())
        try:
            path = resolve_model_path(str(config["model"]))
            check_model_file(path, self.swap_config)
            import onnxruntime as ort

            choose_providers(str(config["providers"]), ort.get_available_providers())
        except _REFUSALS as exc:
            self.refused += 1
            self.last_refusal = f"{what}: {exc}"
            self.get_logger().warning(f"refused {what}: {exc}; keeping the running policy")
            return str(exc)
        request = ModelRequest(
            changes=dict(reload),
            previous={k: self._active_model_values[k] for k in reload},
            path=str(config["model"]),
            task=str(config["task"]),
            providers=str(config["providers"]),
            intra_op_threads=int(config["intra_op_threads"]),
        )
        replaced = self._worker.submit(
            "model", lambda cancelled: self._check_model(request, cancelled)
        )
        if replaced:
            self.get_logger().info("a model request still waiting was replaced by a newer one")
        self._pending["model"] = f"model {path.name} ({what})"
        self.get_logger().info(f"checking {what} on the worker thread")
        return None

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        rt = self._staged  # what runs from the next tick on
        contract = self._contract(rt.policy.metadata.control_dt if rt else 0.0)
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
            "pending": sorted(v for v in self._pending.values() if v),
            "last_check": self.last_check,
            "obs_dim": self._obs_dim,
            "action_dim": ROBOT_ACTION_DIM,
            "tick_budget_ms": round(contract.tick_budget_s(self.swap_config) * 1e3, 3)
            if contract
            else 0.0,
            "base_cost_ms": round(rt.cost_s * 1e3, 4) if rt else 0.0,
            "residual_cost_ms": round(self._residual_staged.cost_s * 1e3, 4),
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

    def shutdown(self) -> None:
        self._worker.stop()


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
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DEFAULT_MODEL",
    "PARAMS",
    "SWAP_PARAMS",
    "WEIGHTS_QOS",
    "PolicyNode",
    "ResidualChoice",
    "Runtime",
    "build_runtime",
    "main",
    "swap_config",
]
