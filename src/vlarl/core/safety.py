"""The safety filter: the last word before the robot moves (ROS-free).

Every command the robot receives comes out of :class:`SafetyFilter`. It

- validates input (shape, numeric dtype, finiteness): NaN/inf or malformed arrays are rejected
  and counted, never passed on;
- checks provenance: a policy action must carry a policy version tag (``model@version`` or
  ``model@version+residual@version``); ``teleop``, ``hold:*`` and anything else are refused;
- checks the stamp against the robot's newest observation (the one received last): an action
  older than ``max_action_age_s`` or ahead by more than ``max_action_lead_s`` (a small tolerance
  for an action overtaking its observation) is refused, so no single stamp can lock the policy
  out; at most one moving command answers an observation (a republished observation, as the
  lock-stepped simulator sends when it got no command, may be answered once more);
- clamps the residual to ``[-delta, +delta]``, clips base + residual to the action bounds,
  limits the change of the command per unit of time (a budget per component refilled at
  ``max_delta_per_s`` and capped at ``max_delta_per_tick``, monotonic time: a flood of actions
  cannot move the command faster), and zeroes any xyz component that would push the end
  effector further outside the workspace box (or every xyz component while the end-effector
  position is unknown). Stopping (zero xyz) is never rate limited;
- holds the robot when no fresh action arrived within ``watchdog_timeout_s`` (watchdog, at most
  ``MAX_WATCHDOG_TIMEOUT_S``: it cannot be disabled) or while an e-stop is latched; the e-stop is
  released only by :meth:`SafetyFilter.release_estop` with a stated reason. A hold is zero xyz
  motion plus the last gripper command, so an object in the gripper is not dropped;
- lets a fresh teleoperation command override the policy (intervention), through the same
  bounds, rate limit and workspace checks.

The limits a filter starts with are its hard envelope: :meth:`SafetyFilter.reconfigure` accepts
new limits only if they are as strict or stricter (:meth:`SafetyConfig.relaxations`).

All times given to the filter (``now``) are monotonic seconds; stamps are integer nanoseconds
of the observation an action answers. The filter never logs and allocates little per tick.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from operator import ge, le
from typing import Any

import numpy as np

from vlarl.topics import ACTION_DIM

# Decision.flags bits
RESIDUAL_CLAMPED = 1
BOUNDS_CLIPPED = 2
RATE_LIMITED = 4
WORKSPACE_LIMITED = 8
WORKSPACE_UNKNOWN = 16
CLAMP_FLAGS = RESIDUAL_CLAMPED | BOUNDS_CLIPPED | RATE_LIMITED
WORKSPACE_FLAGS = WORKSPACE_LIMITED | WORKSPACE_UNKNOWN

# Decision.source values
POLICY = "policy"
TELEOP = "teleop"
HOLD = "hold"
REJECTED = "rejected"

# Reasons
HOLD_WATCHDOG = "watchdog"
HOLD_ESTOP = "estop"
HOLD_SHUTDOWN = "shutdown"
REJECT_MALFORMED = "malformed"
REJECT_NONFINITE = "nonfinite"
REJECT_OUT_OF_ORDER = "out_of_order"
REJECT_STALE = "stale"
REJECT_FUTURE = "future"
REJECT_REPEATED = "repeated"
REJECT_NO_OBSERVATION = "no_observation"
REJECT_TAG = "tag"
REJECT_REASONS = (
    REJECT_MALFORMED,
    REJECT_NONFINITE,
    REJECT_OUT_OF_ORDER,
    REJECT_STALE,
    REJECT_FUTURE,
    REJECT_REPEATED,
    REJECT_NO_OBSERVATION,
    REJECT_TAG,
)
REJECT_HELP = {
    REJECT_MALFORMED: "not 4 numbers (base and residual) with the action joint names",
    REJECT_NONFINITE: "NaN or infinite value",
    REJECT_OUT_OF_ORDER: "older than a command already issued for a newer observation",
    REJECT_STALE: "stamped more than max_action_age_s before the newest observation",
    REJECT_FUTURE: "stamped more than max_action_lead_s after the newest observation",
    REJECT_REPEATED: "this observation was already answered by a command",
    REJECT_NO_OBSERVATION: "no observation received yet",
    REJECT_TAG: "frame_id is not a policy version tag (model@version[+residual@version])",
}
"""Why each reject reason refuses an input (status and log text)."""

MAX_WATCHDOG_TIMEOUT_S = 1.0
"""The watchdog can be shortened, never lengthened beyond this, nor switched off."""
ACTION_LIMIT = 1.0
"""The robot's action space is [-1, 1] per component: no bound may lie outside it."""

TELEOP_TAG = "teleop"
HOLD_TAG_PREFIX = "hold:"
_TAG_FORM = "model@version[+residual@version]"
_TAG_PART = r"[^\s@+|]{1,100}@(0|[1-9][0-9]{0,17})"
_VERSION_TAG = re.compile(rf"{_TAG_PART}(\+{_TAG_PART})?")


def check_version_tag(tag: str) -> str | None:
    """None if ``tag`` is a policy version tag ``model@version[+residual@version]``, else why not.

    ``teleop`` and ``hold:<reason>`` are the safety node's own tags and are reserved: an action
    carrying them would be filed as an intervention or a hold downstream.
    """
    if tag == TELEOP_TAG or tag.startswith(HOLD_TAG_PREFIX):
        return f"frame_id {tag[:40]!r} is reserved for the safety node's own commands"
    if _VERSION_TAG.fullmatch(tag) is None or tag.split("@", 1)[0] == TELEOP_TAG:
        return (
            f"frame_id {tag[:40]!r} is not a policy version tag (model@version[+residual@version])"
        )
    return None


_XYZ = slice(0, 3)
_GRIPPER = 3
_SHAPE = (ACTION_DIM,)


def _vector(value: Any, dim: int, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be {dim} numbers") from exc
    if len(out) != dim:
        raise ValueError(f"{name} must have {dim} numbers, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite")
    return out


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    """Limits of the safety filter; :meth:`__post_init__` refuses inconsistent values."""

    delta: float = 0.3
    """Residual bound: each residual component is clipped to [-delta, +delta]."""
    action_low: tuple[float, ...] = (-1.0, -1.0, -1.0, -1.0)
    """Lower bound of each command component (dx, dy, dz, gripper)."""
    action_high: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    """Upper bound of each command component (dx, dy, dz, gripper)."""
    max_delta_per_tick: float = 1.0
    """Largest change of dx, dy, dz between two consecutive commands (the burst)."""
    gripper_max_delta_per_tick: float = 2.0
    """Largest change of the gripper command per command (2.0 spans [-1, 1]: no limit)."""
    max_delta_per_s: float = 80.0
    """Sustained rate limit of dx, dy, dz per second of monotonic time (80 = 1.0 per 12.5 ms
    tick): the change budget refills at this rate up to ``max_delta_per_tick``."""
    gripper_max_delta_per_s: float = 160.0
    """Sustained rate limit of the gripper command per second (160 = 2.0 per 12.5 ms tick)."""
    workspace_enabled: bool = True
    """Enforce the workspace box on the end-effector position (needs a fresh position)."""
    workspace_low: tuple[float, ...] = (-0.55, 0.35, 0.02)
    """Lower corner of the end-effector box, metres (Meta-World world frame)."""
    workspace_high: tuple[float, ...] = (0.55, 1.05, 0.55)
    """Upper corner of the end-effector box, metres (Meta-World world frame)."""
    ee_timeout_s: float = 0.5
    """An end-effector position older than this is unknown: no xyz motion while unknown."""
    max_action_age_s: float = 0.1
    """Reject an action whose stamp is older than the newest observation by more than this."""
    max_action_lead_s: float = 0.05
    """Reject an action stamped ahead of the newest observation by more than this (an action may
    overtake its observation on the way; one from the future must not block later ones)."""
    watchdog_timeout_s: float = 0.1
    """Hold when no fresh action was accepted for this long (monotonic time; at most
    MAX_WATCHDOG_TIMEOUT_S)."""
    hold_period_s: float = 0.05
    """While holding, a hold command goes out at least this often (besides one per observation)."""
    teleop_timeout_s: float = 0.2
    """Teleoperation overrides the policy while its newest message is younger than this."""
    initial_gripper: float = -1.0
    """Gripper command assumed before the first command (Meta-World resets the gripper open)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "action_low", _vector(self.action_low, ACTION_DIM, "action_low"))
        set_(self, "action_high", _vector(self.action_high, ACTION_DIM, "action_high"))
        set_(self, "workspace_low", _vector(self.workspace_low, 3, "workspace_low"))
        set_(self, "workspace_high", _vector(self.workspace_high, 3, "workspace_high"))
        for name in (*_NOT_LARGER, "initial_gripper"):  # the scalar settings
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite")
            set_(self, name, float(value))
        if not isinstance(self.workspace_enabled, bool):
            raise ValueError("workspace_enabled must be a bool")
        if self.delta < 0.0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        for i, (lo, hi) in enumerate(zip(self.action_low, self.action_high, strict=True)):
            if not lo < hi:
                raise ValueError(f"action_low[{i}]={lo} must be < action_high[{i}]={hi}")
            if not lo <= 0.0 <= hi and i < 3:
                raise ValueError(f"action bounds of component {i} must contain 0 (the hold)")
            if lo < -ACTION_LIMIT or hi > ACTION_LIMIT:
                raise ValueError(
                    f"action bounds of component {i} must lie within the robot's action space "
                    f"[-{ACTION_LIMIT:g}, {ACTION_LIMIT:g}], got [{lo:g}, {hi:g}]"
                )
        for i, (lo, hi) in enumerate(zip(self.workspace_low, self.workspace_high, strict=True)):
            if not lo < hi:
                raise ValueError(f"workspace_low[{i}]={lo} must be < workspace_high[{i}]={hi}")
        for name in (
            "max_delta_per_tick",
            "gripper_max_delta_per_tick",
            "max_delta_per_s",
            "gripper_max_delta_per_s",
            "ee_timeout_s",
            "max_action_age_s",
            "max_action_lead_s",
            "watchdog_timeout_s",
            "hold_period_s",
            "teleop_timeout_s",
        ):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name} must be > 0")
        if self.watchdog_timeout_s > MAX_WATCHDOG_TIMEOUT_S:
            raise ValueError(
                f"watchdog_timeout_s={self.watchdog_timeout_s:g} exceeds "
                f"{MAX_WATCHDOG_TIMEOUT_S:g} s: the watchdog cannot be disabled"
            )
        if self.max_action_lead_s >= self.watchdog_timeout_s:
            raise ValueError(
                "max_action_lead_s must be shorter than watchdog_timeout_s (an action stamped "
                "ahead must not hold later ones back for a whole watchdog period)"
            )
        if not self.action_low[_GRIPPER] <= self.initial_gripper <= self.action_high[_GRIPPER]:
            raise ValueError("initial_gripper must lie within the gripper's action bounds")

    def with_changes(self, **changes: Any) -> SafetyConfig:
        """A copy with some fields changed (validated; raises ValueError with the reason)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown safety setting(s): {', '.join(unknown)}")
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def relaxations(self, envelope: SafetyConfig) -> list[str]:
        """Each way this config is less strict than ``envelope`` (empty: within it).

        Strict means: smaller residual bound, narrower action bounds, smaller rate limits, a
        workspace box inside the envelope's (and not switched off), shorter timeouts and age
        limits, holds at least as often, the same initial gripper.
        """
        out: list[str] = []
        for name in _NOT_LARGER:
            value, bound = getattr(self, name), getattr(envelope, name)
            if value > bound:
                out.append(f"{name}={value:g} exceeds its hard bound {bound:g}")
        for name, tighter in (
            ("action_low", ge),
            ("action_high", le),
            ("workspace_low", ge),
            ("workspace_high", le),
        ):
            value, bound = getattr(self, name), getattr(envelope, name)
            if not all(map(tighter, value, bound)):
                out.append(f"{name}={list(value)} lies outside its hard bound {list(bound)}")
        if envelope.workspace_enabled and not self.workspace_enabled:
            out.append("workspace_enabled cannot be switched off")
        if self.initial_gripper != envelope.initial_gripper:
            out.append("initial_gripper is fixed at start")
        return out


_NOT_LARGER = (
    "delta",
    "max_delta_per_tick",
    "gripper_max_delta_per_tick",
    "max_delta_per_s",
    "gripper_max_delta_per_s",
    "ee_timeout_s",
    "max_action_age_s",
    "max_action_lead_s",
    "watchdog_timeout_s",
    "hold_period_s",
    "teleop_timeout_s",
)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the filter decided for one input or tick."""

    command: np.ndarray | None
    """The command to publish (float64[4], a fresh copy), or None: publish nothing."""
    stamp_ns: int
    """Stamp for the command: the action's stamp, or the newest observation's for holds."""
    source: str
    """POLICY, TELEOP, HOLD or REJECTED."""
    reason: str = ""
    """Why it holds or rejects ('watchdog', 'estop', 'nonfinite', ...); '' otherwise."""
    flags: int = 0
    """Bits: RESIDUAL_CLAMPED, BOUNDS_CLIPPED, RATE_LIMITED, WORKSPACE_LIMITED/UNKNOWN."""

    @property
    def published(self) -> bool:
        return self.command is not None

    def frame_id(self, version_tag: str = "") -> str:
        """header.frame_id of the command: the version tag, 'teleop' or 'hold:<reason>'."""
        if self.source == HOLD:
            return f"{HOLD_TAG_PREFIX}{self.reason}"
        if self.source == TELEOP:
            return TELEOP_TAG
        return version_tag


@dataclass(slots=True)
class SafetyCounters:
    """Running totals, reported on the status topic."""

    commands: int = 0
    """Commands issued (policy, teleop and holds)."""
    policy_commands: int = 0
    """Commands that came from a policy action."""
    teleop_commands: int = 0
    """Commands that came from teleoperation (intervention steps)."""
    holds: int = 0
    """Hold commands issued (watchdog or e-stop)."""
    clamped: int = 0
    """Commands changed by the residual clamp, the action bounds or the rate limit."""
    workspace_limited: int = 0
    """Commands whose xyz was zeroed by the workspace box (or an unknown hand position)."""
    rejected: int = 0
    """Inputs dropped: malformed, non-finite, stale or out of order (policy and teleop)."""
    rejected_reasons: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0)
    )
    """Rejections by reason."""
    teleop_rejected: int = 0
    """Teleoperation messages dropped (malformed or non-finite); also counted in rejected."""
    watchdog_trips: int = 0
    """Times the watchdog tripped (once per trip, not per hold command)."""
    estop_latches: int = 0
    """Times an e-stop was latched."""
    estop_releases: int = 0
    """Times a latched e-stop was released (each with a logged reason)."""
    estop_release_refused: int = 0
    """Release attempts refused (no reason given, or nothing latched)."""
    relaxations_refused: int = 0
    """Reconfigurations refused because they would loosen a limit beyond its hard bound."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rejected_reasons"] = dict(self.rejected_reasons)
        return out


def check_action(value: Any) -> np.ndarray | str:
    """``value`` as a float64[ACTION_DIM] array, or the reason it is not acceptable."""
    if type(value) is np.ndarray and value.dtype == np.float64 and value.shape == _SHAPE:
        array = value  # the hot path: what the node hands over
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError, OverflowError):
            return REJECT_MALFORMED
        if array.dtype.kind not in "iuf" or array.shape != _SHAPE:
            return REJECT_MALFORMED
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError, OverflowError):  # pragma: no cover - numeric dtypes
            return REJECT_MALFORMED
    if not all(map(math.isfinite, array.tolist())):
        return REJECT_NONFINITE
    return array


def _clip(x: np.ndarray, low: np.ndarray, high: np.ndarray, out: np.ndarray) -> None:
    """np.clip without its overhead (about half the time for 4 elements)."""
    np.maximum(x, low, out=out)
    np.minimum(out, high, out=out)


class SafetyFilter:
    """Stateful filter between the policy (and teleoperation) and the robot command.

    Call :meth:`start` once, then per input: :meth:`filter` (policy action),
    :meth:`observe` (new observation), :meth:`teleop` (teleoperation message),
    :meth:`update_ee_position` (end-effector position), and :meth:`check` from a timer.
    Every method that returns a :class:`Decision` with a command expects it to be published.
    ``envelope`` (default: ``config``) holds the hard bounds that :meth:`reconfigure` never
    loosens.
    """

    def __init__(
        self,
        config: SafetyConfig | None = None,
        *,
        now: float = 0.0,
        envelope: SafetyConfig | None = None,
    ) -> None:
        self.config = config or SafetyConfig()
        self.envelope = envelope or self.config
        relaxed = self.config.relaxations(self.envelope)
        if relaxed:
            raise ValueError("; ".join(relaxed))
        self.counters = SafetyCounters()
        self._prev = np.zeros(ACTION_DIM)
        self._prev[_GRIPPER] = self.config.initial_gripper
        self._cmd = np.zeros(ACTION_DIM)
        self._tmp = np.zeros(ACTION_DIM)
        self._residual = np.zeros(ACTION_DIM)
        self._lo = np.zeros(ACTION_DIM)
        self._hi = np.zeros(ACTION_DIM)
        self._budget = np.zeros(ACTION_DIM)
        self._budget_time: float | None = None
        self._teleop_cmd = np.zeros(ACTION_DIM)
        self._ee = [0.0, 0.0, 0.0]
        self._ee_time: float | None = None
        self._teleop_time: float | None = None
        self._last_fresh = now  # last accepted action, or start time
        self._last_output: float | None = None
        self._tripped = False
        self._estop = False
        self._newest_obs_ns: int | None = None
        self._last_moving_ns: int | None = None  # stamp of the last policy/teleop command
        self.last_release_reason = ""
        self._apply_config()

    # ----------------------------------------------------------------- configuration
    def _apply_config(self) -> None:
        cfg = self.config
        self._low = np.asarray(cfg.action_low, dtype=np.float64)
        self._high = np.asarray(cfg.action_high, dtype=np.float64)
        self._burst = np.full(ACTION_DIM, cfg.max_delta_per_tick)
        self._burst[_GRIPPER] = cfg.gripper_max_delta_per_tick
        self._refill = np.full(ACTION_DIM, cfg.max_delta_per_s)
        self._refill[_GRIPPER] = cfg.gripper_max_delta_per_s
        np.minimum(self._budget, self._burst, out=self._budget)
        self._delta_low = np.full(ACTION_DIM, -cfg.delta)
        self._delta_high = np.full(ACTION_DIM, cfg.delta)
        self._max_age_ns = round(cfg.max_action_age_s * 1e9)
        self._max_lead_ns = round(cfg.max_action_lead_s * 1e9)
        # The previous command must lie within the (new) bounds for the rate limit to be
        # satisfiable at the next tick; holds are zero xyz, which the bounds contain.
        _clip(self._prev, self._low, self._high, self._prev)

    def reconfigure(self, config: SafetyConfig) -> None:
        """Switch to new limits (validated by SafetyConfig) within the hard envelope.

        Raises ValueError naming every limit that would be loosened beyond its hard bound.
        """
        relaxed = config.relaxations(self.envelope)
        if relaxed:
            self.counters.relaxations_refused += 1
            raise ValueError(
                "; ".join(relaxed) + " (limits are fixed at start and may only be tightened)"
            )
        self.config = config
        self._apply_config()

    def start(self, now: float) -> None:
        """Arm the watchdog: the first action must arrive within the timeout of ``now``."""
        self._last_fresh = now
        self._budget[:] = self._burst
        self._budget_time = now

    # ----------------------------------------------------------------- state
    @property
    def holding(self) -> bool:
        """E-stop latched, or watchdog tripped (teleoperation, if fresh, still drives)."""
        return self._estop or self._tripped

    @property
    def hold_reason(self) -> str:
        if self._estop:
            return HOLD_ESTOP
        if self._tripped:
            return HOLD_WATCHDOG
        return ""

    @property
    def estop_latched(self) -> bool:
        return self._estop

    @property
    def watchdog_tripped(self) -> bool:
        return self._tripped

    @property
    def last_command(self) -> np.ndarray:
        """The last command issued (a copy); before any, the initial hold."""
        return self._prev.copy()

    def teleop_active(self, now: float) -> bool:
        return (
            self._teleop_time is not None
            and now - self._teleop_time <= self.config.teleop_timeout_s
        )

    @property
    def ee_position(self) -> tuple[float, ...] | None:
        """The last end-effector xyz recorded (fresh or not), or None."""
        return None if self._ee_time is None else tuple(self._ee)

    def ee_position_known(self, now: float) -> bool:
        return self._ee_time is not None and now - self._ee_time <= self.config.ee_timeout_s

    def status(self, now: float) -> dict[str, Any]:
        """JSON-ready summary: state ok/holding, reason, e-stop, teleop, counters."""
        teleop = self.teleop_active(now)
        held = self._estop or (self._tripped and not teleop)
        return {
            "state": "holding" if held else "ok",
            "reason": self.hold_reason,
            "estop": self._estop,
            "last_estop_release": self.last_release_reason,
            "teleop": teleop,
            "ee_known": self.ee_position_known(now),
            **self.counters.as_dict(),
        }

    # ----------------------------------------------------------------- inputs
    def update_ee_position(self, position: Any, *, now: float) -> bool:
        """Record the end-effector xyz; False (and nothing recorded) if it is not 3 finite."""
        try:
            array = np.asarray(position, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            return False
        if array.shape != (3,) or not np.isfinite(array).all():
            return False
        self._ee = array.tolist()
        self._ee_time = now
        return True

    def teleop(self, action: Any, *, now: float) -> bool:
        """Record a teleoperation action [dx, dy, dz, gripper]; False if rejected (counted)."""
        checked = check_action(action)
        if isinstance(checked, str):
            self._reject(checked)
            self.counters.teleop_rejected += 1
            return False
        self._teleop_cmd[:] = checked
        self._teleop_time = now
        return True

    def latch_estop(self, *, now: float) -> Decision:
        """Latch the e-stop: an immediate hold, and holds until :meth:`release_estop`."""
        if not self._estop:
            self.counters.estop_latches += 1
        self._estop = True
        return self._hold(HOLD_ESTOP, self._hold_stamp(), now)

    def release_estop(self, reason: str) -> str | None:
        """Release a latched e-stop, stating why (logged by the caller); None, or why refused."""
        reason = reason.strip()
        refusal = None
        if not self._estop:
            refusal = "no e-stop is latched"
        elif not reason:
            refusal = "a release must state a reason (who and why)"
        if refusal is not None:
            self.counters.estop_release_refused += 1
            return refusal
        self._estop = False
        self.counters.estop_releases += 1
        self.last_release_reason = reason[:200]
        return None

    def observe(self, stamp_ns: int, *, now: float) -> Decision | None:
        """A new observation: the robot's current stamp; while the watchdog holds, answer it.

        The newest observation is the one received last: the robot's stamps only increase, so
        an older one means its clock restarted (or the one before was forged) and is followed
        at once. A repeat of an observation already answered (the lock-stepped simulator
        republishes a sample it got no command for) may be answered once more.
        """
        self._newest_obs_ns = stamp_ns
        if self._last_moving_ns is not None and self._last_moving_ns >= stamp_ns:
            self._last_moving_ns = stamp_ns - 1
        if self._tripped:
            return self._tick(stamp_ns, now)
        return None

    def check(self, now: float) -> Decision | None:
        """Watchdog tick (call it often): trip after the timeout; repeat holds at the period."""
        if not self._tripped:
            if now - self._last_fresh <= self.config.watchdog_timeout_s:
                return None
            self._tripped = True
            self.counters.watchdog_trips += 1
            return self._tick(None, now)
        if self._last_output is None or now - self._last_output >= self.config.hold_period_s:
            return self._tick(None, now)
        return None

    def reject(self, reason: str, stamp_ns: int = 0) -> Decision:
        """Count an input rejected before it reached the filter (e.g. an unparsable message)."""
        return self._reject(reason, stamp_ns)

    def shutdown_hold(self, now: float) -> Decision:
        """The last command before the node goes away: a hold."""
        return self._hold(HOLD_SHUTDOWN, self._hold_stamp(), now)

    def filter(
        self, base: Any, residual: Any, *, stamp_ns: int, now: float, tag: str | None = None
    ) -> Decision:
        """A policy action for the observation stamped ``stamp_ns``: the command, or a reject.

        ``tag`` is the action's version tag (its frame_id), checked with
        :func:`check_version_tag`; in-process callers without one pass None.
        """
        if tag is not None and check_version_tag(tag) is not None:
            return self._reject(REJECT_TAG, stamp_ns)
        checked_base = check_action(base)
        if isinstance(checked_base, str):
            return self._reject(checked_base, stamp_ns)
        checked_residual = check_action(residual)
        if isinstance(checked_residual, str):
            return self._reject(checked_residual, stamp_ns)
        newest = self._newest_obs_ns
        if newest is None:
            return self._reject(REJECT_NO_OBSERVATION, stamp_ns)
        if stamp_ns - newest > self._max_lead_ns:
            return self._reject(REJECT_FUTURE, stamp_ns)
        if newest - stamp_ns > self._max_age_ns:
            return self._reject(REJECT_STALE, stamp_ns)
        last = self._last_moving_ns
        if last is not None and stamp_ns <= last:
            return self._reject(REJECT_REPEATED if stamp_ns == last else REJECT_OUT_OF_ORDER)
        # Fresh: the policy is alive.
        self._last_fresh = now
        self._tripped = False
        if self._estop:
            return self._hold(HOLD_ESTOP, stamp_ns, now)
        if self.teleop_active(now):
            return self._teleop_command(stamp_ns, now)

        cmd = self._cmd
        res = self._residual
        _clip(checked_residual, self._delta_low, self._delta_high, res)
        flags = RESIDUAL_CLAMPED if res.tolist() != checked_residual.tolist() else 0
        np.add(checked_base, res, out=cmd)
        flags |= self._limit(cmd, now)
        return self._issue(POLICY, stamp_ns, flags, now)

    # ----------------------------------------------------------------- internals
    def _hold_stamp(self) -> int:
        """Stamp for an unsolicited output: the newest observation's."""
        return self._newest_obs_ns if self._newest_obs_ns is not None else 0

    def _tick(self, stamp_ns: int | None, now: float) -> Decision | None:
        """Output for a tick without a (fresh) policy action: e-stop hold, teleop or hold.

        Teleoperation answers each observation once; between observations the timer sends
        nothing while it drives.
        """
        stamp = self._hold_stamp() if stamp_ns is None else stamp_ns
        if self._estop:
            return self._hold(HOLD_ESTOP, stamp, now)
        if self.teleop_active(now):
            if self._last_moving_ns is not None and stamp <= self._last_moving_ns:
                return None
            return self._teleop_command(stamp, now)
        return self._hold(HOLD_WATCHDOG, stamp, now)

    def _reject(self, reason: str, stamp_ns: int = 0) -> Decision:
        counters = self.counters
        counters.rejected += 1
        counters.rejected_reasons[reason] = counters.rejected_reasons.get(reason, 0) + 1
        return Decision(None, stamp_ns, REJECTED, reason)

    def _limit(self, cmd: np.ndarray, now: float) -> int:
        """Bounds, rate limit and workspace, in place; the flags of what changed ``cmd``."""
        flags = 0
        before = cmd.tolist()
        _clip(cmd, self._low, self._high, cmd)
        clipped = cmd.tolist()
        if clipped != before:
            flags |= BOUNDS_CLIPPED
        # The change budget: refilled with the time since the last moving command, capped at
        # one burst; a command may change each component by at most what is left.
        budget = self._budget
        if self._budget_time is None:
            budget[:] = self._burst
        else:
            elapsed = max(0.0, now - self._budget_time)
            np.multiply(self._refill, elapsed, out=self._tmp)
            np.add(budget, self._tmp, out=budget)
            np.minimum(budget, self._burst, out=budget)
        self._budget_time = now
        np.subtract(self._prev, budget, out=self._lo)
        np.add(self._prev, budget, out=self._hi)
        _clip(cmd, self._lo, self._hi, cmd)
        if cmd.tolist() != clipped:
            flags |= RATE_LIMITED
        # Rounding in prev +- budget must not leave the bounds.
        _clip(cmd, self._low, self._high, cmd)
        np.subtract(cmd, self._prev, out=self._tmp)
        np.abs(self._tmp, out=self._tmp)
        np.subtract(budget, self._tmp, out=budget)
        np.maximum(budget, 0.0, out=budget)
        # Zeroing xyz (stopping) is never rate limited, like a hold.
        if self.config.workspace_enabled:
            flags |= self._workspace(cmd, now)
        return flags

    def _workspace(self, cmd: np.ndarray, now: float) -> int:
        if not self.ee_position_known(now):
            if cmd[0] or cmd[1] or cmd[2]:
                cmd[_XYZ] = 0.0
                return WORKSPACE_UNKNOWN
            return 0
        ee, low, high = self._ee, self.config.workspace_low, self.config.workspace_high
        flags = 0
        xyz = cmd.tolist()
        for i in range(3):  # three scalars: cheaper than numpy masks
            v = xyz[i]
            if (v < 0.0 and ee[i] < low[i]) or (v > 0.0 and ee[i] > high[i]):
                cmd[i] = 0.0
                flags = WORKSPACE_LIMITED
        return flags

    def _teleop_command(self, stamp_ns: int, now: float) -> Decision:
        np.copyto(self._cmd, self._teleop_cmd)
        flags = self._limit(self._cmd, now)
        return self._issue(TELEOP, stamp_ns, flags, now)

    def _hold(self, reason: str, stamp_ns: int, now: float) -> Decision:
        cmd = self._cmd
        cmd[_XYZ] = 0.0
        cmd[_GRIPPER] = self._prev[_GRIPPER]
        return self._issue(HOLD, stamp_ns, 0, now, reason)

    def _issue(
        self, source: str, stamp_ns: int, flags: int, now: float, reason: str = ""
    ) -> Decision:
        counters = self.counters
        counters.commands += 1
        if source == POLICY:
            counters.policy_commands += 1
        elif source == TELEOP:
            counters.teleop_commands += 1
        else:
            counters.holds += 1
        if source != HOLD:
            self._last_moving_ns = stamp_ns
        if flags & CLAMP_FLAGS:
            counters.clamped += 1
        if flags & WORKSPACE_FLAGS:
            counters.workspace_limited += 1
        np.copyto(self._prev, self._cmd)
        self._last_output = now
        return Decision(self._cmd.copy(), stamp_ns, source, reason, flags)
