"""The safety filter: the last word before the robot moves (ROS-free).

Every command the robot receives comes out of :class:`SafetyFilter`. It

- validates input (shape, numeric dtype, finiteness): NaN/inf or malformed arrays are rejected
  and counted, never passed on;
- drops stale and out-of-order actions (older than the newest command already issued, or older
  than ``max_action_age_s`` relative to the newest observation);
- clamps the residual to ``[-delta, +delta]``, clips base + residual to the action bounds,
  limits the per-tick change of the command, and zeroes any xyz component that would push the
  end effector further outside the workspace box (or every xyz component while the
  end-effector position is unknown). Stopping (zero xyz) is never rate limited;
- holds the robot when no fresh action arrived within ``watchdog_timeout_s`` (watchdog) or while
  an e-stop is latched. A hold is zero xyz motion plus the last gripper command, so an object
  in the gripper is not dropped;
- lets a fresh teleoperation command override the policy (intervention), through the same
  bounds, rate limit and workspace checks.

All times given to the filter (``now``) are monotonic seconds; stamps are integer nanoseconds
of the observation an action answers. The filter never logs and allocates little per tick.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
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
REJECT_REASONS = (REJECT_MALFORMED, REJECT_NONFINITE, REJECT_OUT_OF_ORDER, REJECT_STALE)

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
    """Largest change of dx, dy, dz between two consecutive commands."""
    gripper_max_delta_per_tick: float = 2.0
    """Largest change of the gripper command per tick (2.0 spans [-1, 1]: no limit)."""
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
    watchdog_timeout_s: float = 0.1
    """Hold when no fresh action was accepted for this long (monotonic time)."""
    hold_period_s: float = 0.05
    """While holding, a hold command goes out at least this often (besides one per observation)."""
    teleop_timeout_s: float = 0.2
    """Teleoperation overrides the policy while its newest message is younger than this."""
    initial_gripper: float = -1.0
    """Gripper command assumed before the first command (Meta-World resets the gripper open)."""
    stamp_reset_s: float = 1.0
    """An observation this much older than the newest one means its clock restarted."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "action_low", _vector(self.action_low, ACTION_DIM, "action_low"))
        set_(self, "action_high", _vector(self.action_high, ACTION_DIM, "action_high"))
        set_(self, "workspace_low", _vector(self.workspace_low, 3, "workspace_low"))
        set_(self, "workspace_high", _vector(self.workspace_high, 3, "workspace_high"))
        for name in (
            "delta",
            "max_delta_per_tick",
            "gripper_max_delta_per_tick",
            "ee_timeout_s",
            "max_action_age_s",
            "watchdog_timeout_s",
            "hold_period_s",
            "teleop_timeout_s",
            "initial_gripper",
            "stamp_reset_s",
        ):
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
        for i, (lo, hi) in enumerate(zip(self.workspace_low, self.workspace_high, strict=True)):
            if not lo < hi:
                raise ValueError(f"workspace_low[{i}]={lo} must be < workspace_high[{i}]={hi}")
        for name in ("max_delta_per_tick", "gripper_max_delta_per_tick"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name} must be > 0")
        for name in (
            "ee_timeout_s",
            "max_action_age_s",
            "watchdog_timeout_s",
            "hold_period_s",
            "teleop_timeout_s",
            "stamp_reset_s",
        ):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name} must be > 0")
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
            return f"hold:{self.reason}"
        if self.source == TELEOP:
            return "teleop"
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
    """

    def __init__(self, config: SafetyConfig | None = None, *, now: float = 0.0) -> None:
        self.config = config or SafetyConfig()
        self.counters = SafetyCounters()
        self._prev = np.zeros(ACTION_DIM)
        self._prev[_GRIPPER] = self.config.initial_gripper
        self._cmd = np.zeros(ACTION_DIM)
        self._tmp = np.zeros(ACTION_DIM)
        self._residual = np.zeros(ACTION_DIM)
        self._lo = np.zeros(ACTION_DIM)
        self._hi = np.zeros(ACTION_DIM)
        self._teleop_cmd = np.zeros(ACTION_DIM)
        self._ee = [0.0, 0.0, 0.0]
        self._ee_time: float | None = None
        self._teleop_time: float | None = None
        self._last_fresh = now  # last accepted action, or start time
        self._last_output: float | None = None
        self._tripped = False
        self._estop = False
        self._newest_obs_ns: int | None = None
        self._last_issued_ns: int | None = None
        self._apply_config()

    # ----------------------------------------------------------------- configuration
    def _apply_config(self) -> None:
        cfg = self.config
        self._low = np.asarray(cfg.action_low, dtype=np.float64)
        self._high = np.asarray(cfg.action_high, dtype=np.float64)
        self._rate = np.full(ACTION_DIM, cfg.max_delta_per_tick)
        self._rate[_GRIPPER] = cfg.gripper_max_delta_per_tick
        self._delta_low = np.full(ACTION_DIM, -cfg.delta)
        self._delta_high = np.full(ACTION_DIM, cfg.delta)
        self._max_age_ns = round(cfg.max_action_age_s * 1e9)
        self._reset_ns = round(cfg.stamp_reset_s * 1e9)
        # The previous command must lie within the (new) bounds for the rate limit to be
        # satisfiable at the next tick; holds are zero xyz, which the bounds contain.
        _clip(self._prev, self._low, self._high, self._prev)

    def reconfigure(self, config: SafetyConfig) -> None:
        """Switch to new limits (already validated by SafetyConfig)."""
        self.config = config
        self._apply_config()

    def start(self, now: float) -> None:
        """Arm the watchdog: the first action must arrive within the timeout of ``now``."""
        self._last_fresh = now

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

    def estop(self, latch: bool, *, now: float) -> Decision | None:
        """Latch (True) or release (False) the e-stop; latching returns an immediate hold."""
        if latch:
            if not self._estop:
                self.counters.estop_latches += 1
            self._estop = True
            return self._hold(HOLD_ESTOP, self._hold_stamp(), now)
        self._estop = False
        return None

    def observe(self, stamp_ns: int, *, now: float) -> Decision | None:
        """A new observation: remember its stamp; while the watchdog holds, answer it.

        An observation more than ``stamp_reset_s`` older than the newest one means the source
        clock restarted (e.g. the simulator was restarted): the stamps seen so far are
        forgotten, otherwise every later action would be rejected as out of order.
        """
        newest = self._newest_obs_ns
        if newest is not None and newest - stamp_ns > self._reset_ns:
            self._newest_obs_ns = stamp_ns
            self._last_issued_ns = None
        elif newest is None or stamp_ns > newest:
            self._newest_obs_ns = stamp_ns
        if self._tripped and (self._last_issued_ns is None or stamp_ns >= self._last_issued_ns):
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

    def filter(self, base: Any, residual: Any, *, stamp_ns: int, now: float) -> Decision:
        """A policy action for the observation stamped ``stamp_ns``: the command, or a reject."""
        checked_base = check_action(base)
        if isinstance(checked_base, str):
            return self._reject(checked_base, stamp_ns)
        checked_residual = check_action(residual)
        if isinstance(checked_residual, str):
            return self._reject(checked_residual, stamp_ns)
        if self._last_issued_ns is not None and stamp_ns < self._last_issued_ns:
            return self._reject(REJECT_OUT_OF_ORDER, stamp_ns)
        if self._newest_obs_ns is not None and self._newest_obs_ns - stamp_ns > self._max_age_ns:
            return self._reject(REJECT_STALE, stamp_ns)
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
        """Stamp for an unsolicited output: the newest observation (never going backwards)."""
        stamp = self._newest_obs_ns if self._newest_obs_ns is not None else 0
        if self._last_issued_ns is not None and stamp < self._last_issued_ns:
            stamp = self._last_issued_ns
        return stamp

    def _tick(self, stamp_ns: int | None, now: float) -> Decision:
        """Output for a tick without a (fresh) policy action: e-stop hold, teleop or hold."""
        stamp = self._hold_stamp() if stamp_ns is None else stamp_ns
        if self._estop:
            return self._hold(HOLD_ESTOP, stamp, now)
        if self.teleop_active(now):
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
        np.subtract(self._prev, self._rate, out=self._lo)
        np.add(self._prev, self._rate, out=self._hi)
        _clip(cmd, self._lo, self._hi, cmd)
        if cmd.tolist() != clipped:
            flags |= RATE_LIMITED
        # Rounding in prev +- rate must not leave the bounds.
        _clip(cmd, self._low, self._high, cmd)
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
        if flags & CLAMP_FLAGS:
            counters.clamped += 1
        if flags & WORKSPACE_FLAGS:
            counters.workspace_limited += 1
        np.copyto(self._prev, self._cmd)
        self._last_output = now
        if self._last_issued_ns is None or stamp_ns > self._last_issued_ns:
            self._last_issued_ns = stamp_ns
        return Decision(self._cmd.copy(), stamp_ns, source, reason, flags)
