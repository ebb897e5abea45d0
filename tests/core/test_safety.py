"""The safety filter without ROS: clamps, limits, workspace, rejects, watchdog, e-stop, teleop.

Property tests (hypothesis) throw arbitrary inputs and input sequences at the filter and check
that every command it issues is finite, within bounds, rate limited, inside the workspace rule
and, for the policy, within delta of the (clipped) base action. A last test runs the scripted
expert of Meta-World pick-place-v3 through the filter with the default limits: they must not
cost it its successes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vlarl.core.safety import (
    BOUNDS_CLIPPED,
    HOLD,
    HOLD_ESTOP,
    HOLD_WATCHDOG,
    POLICY,
    RATE_LIMITED,
    REJECT_MALFORMED,
    REJECT_NONFINITE,
    REJECT_OUT_OF_ORDER,
    REJECT_STALE,
    REJECTED,
    RESIDUAL_CLAMPED,
    TELEOP,
    WORKSPACE_LIMITED,
    WORKSPACE_UNKNOWN,
    Decision,
    SafetyConfig,
    SafetyFilter,
    check_action,
)

MS = 1_000_000  # ns
INSIDE = (0.0, 0.6, 0.2)  # a hand position well inside the default workspace box


def make(now: float = 0.0, *, ee: Any = INSIDE, **changes: Any) -> SafetyFilter:
    f = SafetyFilter(SafetyConfig().with_changes(**changes), now=now)
    f.start(now)
    if ee is not None:
        assert f.update_ee_position(ee, now=now)
    return f


def act(f: SafetyFilter, base: Any, residual: Any = (0, 0, 0, 0), *, stamp: int, now: float):
    return f.filter(base, residual, stamp_ns=stamp, now=now)


# ------------------------------------------------------------------------- config


def test_config_defaults_are_valid_and_documented() -> None:
    cfg = SafetyConfig()
    assert cfg.delta > 0 and cfg.watchdog_timeout_s <= 0.1
    assert cfg.action_low == (-1.0,) * 4 and cfg.action_high == (1.0,) * 4
    doc = SafetyConfig.__doc__ or ""
    assert "refuses" in doc


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"delta": -0.1}, "delta"),
        ({"delta": math.nan}, "finite"),
        ({"action_low": (0.5, -1, -1, -1)}, "contain 0"),
        ({"action_low": (-1, -1, -1, 1), "action_high": (1, 1, 1, 1)}, "action_low[3]"),
        ({"action_low": (-1, -1, -1)}, "4 numbers"),
        ({"action_high": ("a", 1, 1, 1)}, "numbers"),
        ({"workspace_low": (0.0, 0.0, 1.0), "workspace_high": (1.0, 1.0, 0.5)}, "workspace"),
        ({"max_delta_per_tick": 0.0}, "max_delta_per_tick"),
        ({"watchdog_timeout_s": 0.0}, "watchdog_timeout_s"),
        ({"hold_period_s": -1.0}, "hold_period_s"),
        ({"initial_gripper": 2.0}, "initial_gripper"),
        ({"workspace_enabled": 1}, "bool"),
        ({"no_such_field": 1}, "unknown"),
    ],
)
def test_config_refuses_bad_values_with_a_reason(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        SafetyConfig().with_changes(**changes)
    assert fragment in str(info.value)


# ------------------------------------------------------------------------- filtering


def test_good_action_passes_unchanged() -> None:
    f = make()
    d = act(f, [0.5, -0.2, 0.1, 0.3], [0.1, 0.05, -0.1, 0.0], stamp=10 * MS, now=0.01)
    assert d.source == POLICY and d.flags == 0 and d.stamp_ns == 10 * MS
    np.testing.assert_allclose(d.command, [0.6, -0.15, 0.0, 0.3])
    assert d.frame_id("model@3+residual@2") == "model@3+residual@2"
    assert f.counters.commands == 1 and f.counters.clamped == 0


def test_residual_is_clamped_to_delta_then_bounds_clip() -> None:
    f = make(delta=0.2)
    d = act(f, [0.1, 0.0, 0.95, 0.0], [0.5, -0.5, 0.2, 0.0], stamp=1, now=0.01)
    np.testing.assert_allclose(d.command, [0.3, -0.2, 1.0, 0.0])
    assert d.flags & RESIDUAL_CLAMPED and d.flags & BOUNDS_CLIPPED
    assert f.counters.clamped == 1


def test_out_of_range_base_is_clipped_to_bounds() -> None:
    f = make(action_low=(-0.5, -0.5, -0.5, -1), action_high=(0.5, 0.5, 0.5, 1))
    d = act(f, [1e9, -1e9, 0.3, 5.0], stamp=1, now=0.01)
    np.testing.assert_allclose(d.command, [0.5, -0.5, 0.3, 1.0])
    assert d.flags == BOUNDS_CLIPPED


def test_rate_limit_per_tick_with_its_own_gripper_limit() -> None:
    f = make(max_delta_per_tick=0.25, gripper_max_delta_per_tick=0.5, initial_gripper=-1.0)
    d1 = act(f, [1.0, -1.0, 0.1, 1.0], stamp=1, now=0.01)
    np.testing.assert_allclose(d1.command, [0.25, -0.25, 0.1, -0.5])
    assert d1.flags & RATE_LIMITED
    d2 = act(f, [1.0, -1.0, 0.1, 1.0], stamp=2, now=0.02)
    np.testing.assert_allclose(d2.command, [0.5, -0.5, 0.1, 0.0])
    d3 = act(f, [0.5, -0.5, 0.1, 0.0], stamp=3, now=0.03)
    assert d3.flags == 0


def test_stopping_is_never_rate_limited() -> None:
    f = make(max_delta_per_tick=0.1, ee=None)  # no hand position: xyz must be zero
    f._prev[:3] = 0.8  # as if moving fast when the position got lost
    d = act(f, [0.8, 0.8, 0.8, -1.0], stamp=1, now=0.01)
    np.testing.assert_allclose(d.command, [0.0, 0.0, 0.0, -1.0])
    assert d.flags & WORKSPACE_UNKNOWN


def test_workspace_zeroes_only_components_pushing_further_out() -> None:
    f = make(ee=(-0.6, 1.1, 0.3))  # outside low x and high y, z inside
    d = act(f, [-0.5, 0.5, -0.5, 0.2], stamp=1, now=0.01)
    np.testing.assert_allclose(d.command, [0.0, 0.0, -0.5, 0.2])
    assert d.flags & WORKSPACE_LIMITED and f.counters.workspace_limited == 1
    d = act(f, [0.5, -0.5, 0.5, 0.2], stamp=2, now=0.02)  # back inside: allowed
    np.testing.assert_allclose(d.command, [0.5, -0.5, 0.5, 0.2])
    assert d.flags == 0


def test_unknown_or_stale_hand_position_fails_closed() -> None:
    f = make(ee=None)
    d = act(f, [0.5, 0.5, 0.5, 0.7], stamp=1, now=0.01)
    np.testing.assert_allclose(d.command, [0.0, 0.0, 0.0, 0.7])
    assert d.flags & WORKSPACE_UNKNOWN
    assert not f.update_ee_position([0.0, math.nan, 0.2], now=0.02)
    assert not f.update_ee_position([0.0, 0.2], now=0.02)
    assert f.update_ee_position(INSIDE, now=0.02)
    d = act(f, [0.5, 0.5, 0.5, 0.7], stamp=2, now=0.03)
    np.testing.assert_allclose(d.command, [0.5, 0.5, 0.5, 0.7])
    d = act(f, [0.5, 0.5, 0.5, 0.7], stamp=3, now=0.02 + f.config.ee_timeout_s + 0.01)
    np.testing.assert_allclose(d.command, [0.0, 0.0, 0.0, 0.7])


def test_workspace_disabled_needs_no_hand_position() -> None:
    f = make(ee=None, workspace_enabled=False)
    d = act(f, [0.5, 0.5, 0.5, 0.7], stamp=1, now=0.01)
    np.testing.assert_allclose(d.command, [0.5, 0.5, 0.5, 0.7])


@pytest.mark.parametrize(
    ("base", "reason"),
    [
        ([math.nan, 0, 0, 0], REJECT_NONFINITE),
        ([0, math.inf, 0, 0], REJECT_NONFINITE),
        ([0, 0, -math.inf, 0], REJECT_NONFINITE),
        ([0, 0, 0], REJECT_MALFORMED),
        ([0, 0, 0, 0, 0], REJECT_MALFORMED),
        ([[0, 0, 0, 0]], REJECT_MALFORMED),
        ("0000", REJECT_MALFORMED),
        (["0", "0", "0", "0"], REJECT_MALFORMED),
        ([None, 0, 0, 0], REJECT_MALFORMED),
        ([[0, 1], 0, 0, 0], REJECT_MALFORMED),
        (None, REJECT_MALFORMED),
        (np.array([1j, 0, 0, 0]), REJECT_MALFORMED),
        ([10**400, 0, 0, 0], REJECT_MALFORMED),
        ([True, False, True, False], REJECT_MALFORMED),
    ],
)
def test_malformed_and_non_finite_actions_are_rejected(base: Any, reason: str) -> None:
    f = make()
    d = act(f, base, stamp=1, now=0.01)
    assert d.command is None and d.source == REJECTED and d.reason == reason
    assert f.counters.rejected == 1 and f.counters.rejected_reasons[reason] == 1
    d = act(f, [0, 0, 0, 0], base, stamp=2, now=0.02)  # the same junk as residual
    assert d.command is None and d.reason == reason
    assert f.counters.commands == 0


def test_huge_finite_values_are_clipped_not_rejected() -> None:
    f = make()
    d = act(f, [1e308, -1e308, 1e308, -1e308], [1e308] * 4, stamp=1, now=0.01)
    assert d.command is not None and np.all(np.abs(d.command) <= 1.0)


def test_out_of_order_and_stale_actions_are_dropped() -> None:
    f = make(max_action_age_s=0.1)
    assert act(f, [0.1, 0, 0, 0], stamp=50 * MS, now=0.01).published
    d = act(f, [0.1, 0, 0, 0], stamp=40 * MS, now=0.02)
    assert d.reason == REJECT_OUT_OF_ORDER and not d.published
    assert act(f, [0.1, 0, 0, 0], stamp=50 * MS, now=0.03).published  # equal stamp: fine
    f.observe(300 * MS, now=0.04)
    d = act(f, [0.1, 0, 0, 0], stamp=150 * MS, now=0.05)
    assert d.reason == REJECT_STALE
    assert act(f, [0.1, 0, 0, 0], stamp=200 * MS, now=0.06).published  # exactly max age
    assert f.counters.rejected_reasons[REJECT_OUT_OF_ORDER] == 1
    assert f.counters.rejected_reasons[REJECT_STALE] == 1
    assert f.counters.rejected == 2


def test_a_restarted_observation_clock_is_followed() -> None:
    f = make()
    f.observe(100_000 * MS, now=0.0)
    assert act(f, [0.1, 0, 0, 0], stamp=100_000 * MS, now=0.01).published
    f.observe(10 * MS, now=0.02)  # the simulator restarted: its clock starts again
    d = act(f, [0.1, 0, 0, 0], stamp=10 * MS, now=0.03)
    assert d.published and d.stamp_ns == 10 * MS


# ------------------------------------------------------------------------- watchdog


def test_watchdog_trips_once_holds_and_recovers() -> None:
    f = make(watchdog_timeout_s=0.1, hold_period_s=0.05)
    assert act(f, [0.4, 0, 0, 0.6], stamp=1 * MS, now=0.0).published
    f.observe(2 * MS, now=0.0)
    assert f.check(0.05) is None and f.check(0.1) is None
    d = f.check(0.1001)
    assert d is not None and d.source == HOLD and d.reason == HOLD_WATCHDOG
    assert d.command is not None
    np.testing.assert_allclose(d.command, [0.0, 0.0, 0.0, 0.6])  # gripper kept: no drop
    assert d.frame_id("ignored") == "hold:watchdog" and d.stamp_ns == 2 * MS
    assert f.counters.watchdog_trips == 1 and f.holding
    assert f.check(0.12) is None  # within the hold period
    d = f.check(0.151)
    assert d is not None and d.reason == HOLD_WATCHDOG
    d = f.observe(3 * MS, now=0.16)  # each new observation is answered with a hold
    assert d is not None and d.stamp_ns == 3 * MS and d.source == HOLD
    assert f.counters.watchdog_trips == 1 and f.counters.holds == 3
    d = act(f, [0.4, 0, 0, 0.6], stamp=3 * MS, now=0.17)  # fresh action: recover
    assert d.source == POLICY and not f.holding
    assert f.observe(4 * MS, now=0.18) is None
    assert f.check(0.3) is not None and f.counters.watchdog_trips == 2


def test_watchdog_is_armed_from_start() -> None:
    f = make(now=5.0)
    assert f.check(5.05) is None
    d = f.check(5.2)
    assert d is not None and d.reason == HOLD_WATCHDOG and d.command is not None
    np.testing.assert_allclose(d.command, [0, 0, 0, f.config.initial_gripper])


def test_rejected_actions_do_not_feed_the_watchdog() -> None:
    f = make()
    assert act(f, [0.1, 0, 0, 0], stamp=1, now=0.0).published
    for i in range(20):
        act(f, [math.nan, 0, 0, 0], stamp=2 + i, now=0.01 * i)
    d = f.check(0.11)
    assert d is not None and d.reason == HOLD_WATCHDOG


# ------------------------------------------------------------------------- e-stop


def test_estop_latches_until_released() -> None:
    f = make()
    act(f, [0.3, 0.3, 0.3, 0.5], stamp=1 * MS, now=0.0)
    f.observe(2 * MS, now=0.0)
    d = f.estop(True, now=0.01)
    assert d is not None and d.reason == HOLD_ESTOP and d.frame_id() == "hold:estop"
    assert d.command is not None
    np.testing.assert_allclose(d.command, [0, 0, 0, 0.5])
    for i in range(5):
        d = act(f, [0.9, 0.9, 0.9, -0.5], stamp=(3 + i) * MS, now=0.02 + 0.01 * i)
        assert d.source == HOLD and d.reason == HOLD_ESTOP
        np.testing.assert_allclose(d.command, [0, 0, 0, 0.5])
    assert f.status(0.1)["state"] == "holding" and f.status(0.1)["estop"]
    d = f.check(0.5)  # policy gone as well: still an e-stop hold
    assert d is not None and d.reason == HOLD_ESTOP
    assert f.estop(False, now=0.6) is None
    f.update_ee_position(INSIDE, now=0.6)
    d = act(f, [0.5, 0.0, 0.0, 0.5], stamp=20 * MS, now=0.61)
    assert d.source == POLICY
    np.testing.assert_allclose(d.command, [0.5, 0.0, 0.0, 0.5])
    assert f.counters.estop_latches == 1 and f.status(0.62)["state"] == "ok"


# ------------------------------------------------------------------------- teleop


def test_teleop_overrides_while_fresh_then_policy_returns() -> None:
    f = make(teleop_timeout_s=0.2)
    assert f.teleop([0.2, -0.3, 0.4, 1.0], now=0.0)
    d = act(f, [0.9, 0.9, 0.9, -1.0], stamp=1, now=0.1)
    assert d.source == TELEOP and d.frame_id("tag") == "teleop" and d.stamp_ns == 1
    np.testing.assert_allclose(d.command, [0.2, -0.3, 0.4, 1.0])
    d = act(f, [0.9, 0.9, 0.9, -1.0], stamp=2, now=0.25)
    assert d.source == POLICY
    assert f.counters.teleop_commands == 1 and f.counters.policy_commands == 1


def test_teleop_is_checked_and_bounded() -> None:
    f = make()
    assert not f.teleop([math.nan, 0, 0, 0], now=0.0)
    assert not f.teleop([0, 0, 0], now=0.0)
    assert f.counters.teleop_rejected == 2 and f.counters.rejected == 2
    assert not f.teleop_active(0.0)
    assert f.teleop([5.0, -5.0, 0.0, 3.0], now=0.0)
    d = act(f, [0, 0, 0, 0], stamp=1, now=0.01)
    np.testing.assert_allclose(d.command, [1.0, -1.0, 0.0, 1.0])
    assert d.flags & BOUNDS_CLIPPED


def test_teleop_drives_while_the_policy_is_dead_but_not_through_estop() -> None:
    f = make()
    f.teleop([0.1, 0.0, 0.0, 0.0], now=0.0)
    d = f.check(0.15)  # no policy at all: the watchdog trips, teleop still drives
    assert d is not None and d.source == TELEOP
    f.teleop([0.1, 0.0, 0.0, 0.0], now=0.15)
    d = f.observe(7, now=0.16)
    assert d is not None and d.source == TELEOP and d.stamp_ns == 7
    assert f.status(0.16)["state"] == "ok" and f.status(0.16)["teleop"]
    f.estop(True, now=0.17)
    d = f.observe(8, now=0.18)
    assert d is not None and d.source == HOLD and d.reason == HOLD_ESTOP


def test_reconfigure_keeps_previous_command_within_new_bounds() -> None:
    f = make(max_delta_per_tick=0.1)
    for i in range(10):
        act(f, [1.0, 0, 0, 0], stamp=i, now=0.001 * i)
    f.reconfigure(SafetyConfig().with_changes(action_high=(0.3, 1, 1, 1), max_delta_per_tick=0.1))
    d = act(f, [1.0, 0, 0, 0], stamp=20, now=0.02)
    assert d.command is not None and d.command[0] == pytest.approx(0.3)


def test_status_is_json_ready() -> None:
    import json

    f = make()
    act(f, [math.nan] * 4, stamp=1, now=0.0)
    status = json.loads(json.dumps(f.status(0.0)))
    assert status["state"] == "ok" and status["rejected"] == 1
    assert status["rejected_reasons"]["nonfinite"] == 1
    assert {"commands", "clamped", "rejected", "watchdog_trips", "estop"} <= set(status)


# ------------------------------------------------------------------------- properties

finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)
any_shape = hnp.array_shapes(min_dims=0, max_dims=3, max_side=6)
junk = st.one_of(
    hnp.arrays(np.float64, any_shape, elements=finite_or_not),
    hnp.arrays(np.float64, (4,), elements=finite_or_not),
    hnp.arrays(np.float64, (4,), elements=st.floats(-1e300, 1e300)),
    hnp.arrays(np.float32, (4,), elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    hnp.arrays(np.int64, (4,)),
    st.lists(finite_or_not, min_size=0, max_size=6),
    st.lists(st.integers(-(10**30), 10**30), min_size=4, max_size=4),
    st.lists(st.one_of(st.none(), st.text(max_size=3), finite_or_not), min_size=4, max_size=4),
    st.none(),
    st.text(max_size=8),
)  # fmt: skip
plausible = hnp.arrays(np.float64, (4,), elements=st.floats(-3.0, 3.0))
anything = st.one_of(plausible, plausible, junk)


def assert_safe(f: SafetyFilter, d: Decision, prev: np.ndarray, now: float) -> None:
    """Invariants of every issued command."""
    cfg = f.config
    cmd = d.command
    assert cmd is not None and cmd.shape == (4,) and cmd.dtype == np.float64
    assert np.all(np.isfinite(cmd))
    assert np.all(cmd >= np.asarray(cfg.action_low)) and np.all(cmd <= np.asarray(cfg.action_high))
    if d.source == HOLD:
        assert np.all(cmd[:3] == 0.0) and cmd[3] == prev[3]
        return
    rate = np.array([cfg.max_delta_per_tick] * 3 + [cfg.gripper_max_delta_per_tick])
    for i in range(4):
        stopped = i < 3 and cmd[i] == 0.0  # stopping is always allowed
        assert stopped or abs(cmd[i] - prev[i]) <= rate[i] + 1e-12, (i, cmd, prev)
    if cfg.workspace_enabled:
        if not f.ee_position_known(now):
            assert np.all(cmd[:3] == 0.0)
        else:
            ee = f.ee_position
            assert ee is not None
            for i in range(3):
                assert not (cmd[i] < 0 and ee[i] < cfg.workspace_low[i])
                assert not (cmd[i] > 0 and ee[i] > cfg.workspace_high[i])


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(base=anything, residual=anything, delta=st.floats(0.0, 1.5))
def test_any_single_input_gives_a_safe_command_or_a_reject(
    base: Any, residual: Any, delta: float
) -> None:
    f = make(delta=delta, max_delta_per_tick=2.0, gripper_max_delta_per_tick=2.0)
    prev = f.last_command
    d = act(f, base, residual, stamp=1, now=0.01)
    if d.command is None:
        assert d.source == REJECTED and d.reason in (REJECT_MALFORMED, REJECT_NONFINITE)
        assert f.counters.rejected == 1 and f.counters.commands == 0
        return
    assert_safe(f, d, prev, 0.01)
    # Without rate limit (2.0 spans the bounds) and inside the box, the residual's
    # contribution to the command is within [-delta, delta] of the clipped base.
    b = np.clip(np.asarray(base, dtype=np.float64), -1.0, 1.0)
    assert np.all(np.abs(d.command - b) <= delta + 1e-9)
    r = np.asarray(residual, dtype=np.float64)
    if np.all(np.abs(r) <= delta) and np.all(np.abs(np.asarray(base) + r) <= 1.0):
        np.testing.assert_allclose(d.command, np.asarray(base) + r, atol=1e-12)


step = st.one_of(
    st.tuples(st.just("action"), anything, anything, st.integers(-20, 400)),
    st.tuples(st.just("observe"), st.integers(0, 400)),
    st.tuples(st.just("check")),
    st.tuples(st.just("teleop"), anything),
    st.tuples(st.just("ee"), hnp.arrays(np.float64, (3,), elements=st.floats(-1.5, 1.5))),
    st.tuples(st.just("estop"), st.booleans()),
)


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    steps=st.lists(st.tuples(step, st.floats(0.0, 0.15)), min_size=1, max_size=60),
    delta=st.floats(0.0, 1.0),
    rate=st.floats(0.05, 2.0),
    gripper_rate=st.floats(0.05, 2.0),
    box_lo=hnp.arrays(np.float64, (3,), elements=st.floats(-1.0, 0.0)),
    box_size=hnp.arrays(np.float64, (3,), elements=st.floats(0.05, 1.0)),
)
def test_any_input_sequence_only_ever_issues_safe_commands(
    steps: list[tuple[tuple[Any, ...], float]],
    delta: float,
    rate: float,
    gripper_rate: float,
    box_lo: np.ndarray,
    box_size: np.ndarray,
) -> None:
    f = make(
        ee=None,
        delta=delta,
        max_delta_per_tick=rate,
        gripper_max_delta_per_tick=gripper_rate,
        workspace_low=tuple(box_lo),
        workspace_high=tuple(box_lo + box_size),
    )
    now = 0.0
    prev = f.last_command
    last_stamp = -(2**63)
    for (kind, *args), dt in steps:
        now += dt
        d: Decision | None
        if kind == "action":
            d = act(f, args[0], args[1], stamp=args[2] * MS, now=now)
        elif kind == "observe":
            d = f.observe(args[0] * MS, now=now)
        elif kind == "check":
            d = f.check(now)
        elif kind == "teleop":
            f.teleop(args[0], now=now)
            d = None
        elif kind == "ee":
            f.update_ee_position(args[0], now=now)
            d = None
        else:
            d = f.estop(args[0], now=now)
        if d is None or d.command is None:
            continue
        assert_safe(f, d, prev, now)
        if d.source == POLICY and not d.flags & (
            RATE_LIMITED | WORKSPACE_LIMITED | WORKSPACE_UNKNOWN
        ):
            b = np.clip(np.asarray(args[0], dtype=np.float64), -1.0, 1.0)
            assert np.all(np.abs(d.command - b) <= delta + 1e-9)
        if f.estop_latched:
            assert d.source == HOLD and d.reason == HOLD_ESTOP
        assert d.stamp_ns >= last_stamp  # issued stamps never go backwards
        last_stamp = d.stamp_ns
        prev = d.command
        np.testing.assert_array_equal(f.last_command, prev)
    c = f.counters
    assert c.commands == c.policy_commands + c.teleop_commands + c.holds
    assert c.rejected == sum(c.rejected_reasons.values())


def test_check_action_accepts_only_finite_numeric_length_4() -> None:
    out = check_action(np.arange(4, dtype=np.int32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert check_action(np.zeros(4, dtype=np.float32)).dtype == np.float64  # type: ignore[union-attr]
    assert check_action(np.zeros(3)) == REJECT_MALFORMED
    assert check_action([0, 0, 0, math.nan]) == REJECT_NONFINITE


# ------------------------------------------------------------------------- real robot


def test_default_limits_do_not_cost_the_pick_place_expert_its_successes() -> None:
    """Meta-World pick-place-v3: the scripted expert through the filter (defaults, a random
    residual within delta, the hand position from the state) keeps succeeding and never
    touches the workspace box."""
    gym = pytest.importorskip("gymnasium")
    pytest.importorskip("metaworld")
    from metaworld.policies import SawyerPickPlaceV3Policy

    env = gym.make("Meta-World/MT1", env_name="pick-place-v3", seed=0)
    expert = SawyerPickPlaceV3Policy()
    f = SafetyFilter(SafetyConfig(), now=0.0)
    rng = np.random.default_rng(0)
    successes, episodes, stamp, now = 0, 8, 0, 0.0
    hands = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        for _ in range(200):
            stamp += 12_500_000
            now += 0.0125
            f.update_ee_position(obs[:3], now=now)
            f.observe(stamp, now=now)
            residual = rng.uniform(-0.05, 0.05, 4)  # a small exploring residual
            d = f.filter(expert.get_action(obs), residual, stamp_ns=stamp, now=now)
            assert d.source == POLICY and d.command is not None
            hands.append(obs[:3].copy())
            obs, _, terminated, truncated, info = env.step(d.command.astype(np.float32))
            if info["success"]:
                successes += 1
                break
            if terminated or truncated:
                break
    env.close()
    assert successes == episodes, f"{successes}/{episodes}"
    assert f.counters.workspace_limited == 0 and f.counters.rejected == 0
    h = np.array(hands)
    assert np.all(h >= np.array(f.config.workspace_low)) and np.all(
        h <= np.array(f.config.workspace_high)
    )
