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
    REJECT_FUTURE,
    REJECT_MALFORMED,
    REJECT_NO_OBSERVATION,
    REJECT_NONFINITE,
    REJECT_OUT_OF_ORDER,
    REJECT_REPEATED,
    REJECT_STALE,
    REJECT_TAG,
    REJECTED,
    RESIDUAL_CLAMPED,
    TELEOP,
    WORKSPACE_LIMITED,
    WORKSPACE_UNKNOWN,
    Decision,
    SafetyConfig,
    SafetyFilter,
    check_action,
    check_version_tag,
)

MS = 1_000_000  # ns
INSIDE = (0.0, 0.6, 0.2)  # a hand position well inside the default workspace box


def make(now: float = 0.0, *, ee: Any = INSIDE, **changes: Any) -> SafetyFilter:
    f = SafetyFilter(SafetyConfig().with_changes(**changes), now=now)
    f.start(now)
    if ee is not None:
        assert f.update_ee_position(ee, now=now)
    return f


def act(
    f: SafetyFilter,
    base: Any,
    residual: Any = (0, 0, 0, 0),
    *,
    stamp: int,
    now: float,
    observe: bool = True,
    tag: str | None = None,
) -> Decision:
    """A control tick: the observation stamped ``stamp`` (unless ``observe`` is False), then
    the policy's action for it."""
    if observe:
        f.observe(stamp, now=now)
    return f.filter(base, residual, stamp_ns=stamp, now=now, tag=tag)


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
    d = act(f, [0.1, 0, 0, 0], stamp=40 * MS, now=0.02, observe=False)
    assert d.reason == REJECT_OUT_OF_ORDER and not d.published
    f.observe(300 * MS, now=0.04)
    d = act(f, [0.1, 0, 0, 0], stamp=150 * MS, now=0.05, observe=False)
    assert d.reason == REJECT_STALE
    assert act(f, [0.1, 0, 0, 0], stamp=200 * MS, now=0.06, observe=False).published  # max age
    assert f.counters.rejected_reasons[REJECT_OUT_OF_ORDER] == 1
    assert f.counters.rejected_reasons[REJECT_STALE] == 1
    assert f.counters.rejected == 2


def test_no_action_is_accepted_before_the_first_observation() -> None:
    f = make()
    d = act(f, [0.1, 0, 0, 0], stamp=5 * MS, now=0.01, observe=False)
    assert d.reason == REJECT_NO_OBSERVATION and not d.published
    assert act(f, [0.1, 0, 0, 0], stamp=5 * MS, now=0.02).published


def test_a_restarted_observation_clock_is_followed() -> None:
    f = make()
    assert act(f, [0.1, 0, 0, 0], stamp=100_000 * MS, now=0.01).published
    f.observe(10 * MS, now=0.02)  # the simulator restarted: its clock starts again
    d = act(f, [0.1, 0, 0, 0], stamp=10 * MS, now=0.03, observe=False)
    assert d.published and d.stamp_ns == 10 * MS


def test_one_future_stamped_action_does_not_lock_the_policy_out() -> None:
    """Finding 1: an action stamped an hour ahead is refused; the next good tick is answered."""
    f = make()
    assert act(f, [0.1, 0, 0, 0], stamp=1000 * MS, now=0.0).published
    hour = 3600 * 1000 * MS
    d = act(f, [0.1, 0, 0, 0], stamp=1000 * MS + hour, now=0.001, observe=False)
    assert d.reason == REJECT_FUTURE and not d.published
    lead = round(f.config.max_action_lead_s * 1e9)
    assert act(f, [0, 0, 0, 0], stamp=1000 * MS + lead + 1, now=0.002, observe=False).reason == (
        REJECT_FUTURE
    )
    d = act(f, [0.2, 0, 0, 0], stamp=1012 * MS, now=0.0125)
    assert d.source == POLICY and d.stamp_ns == 1012 * MS
    assert f.counters.rejected_reasons[REJECT_FUTURE] == 2


def test_a_forged_observation_stamp_is_overridden_by_the_next_real_one() -> None:
    f = make()
    assert act(f, [0.1, 0, 0, 0], stamp=1000 * MS, now=0.0).published
    f.observe(1000 * MS + 3600 * 1000 * MS, now=0.001)  # an hour ahead
    d = act(f, [0.1, 0, 0, 0], stamp=1012 * MS, now=0.002, observe=False)
    assert d.reason == REJECT_STALE
    assert act(f, [0.1, 0, 0, 0], stamp=1012 * MS, now=0.0125).source == POLICY  # real obs
    f.observe(5 * MS, now=0.013)  # far in the past
    assert act(f, [0.1, 0, 0, 0], stamp=1025 * MS, now=0.025).source == POLICY


def test_an_action_within_the_lead_does_not_deadlock_a_lockstep_robot() -> None:
    """A command stamped slightly ahead went out; the lock-stepped robot, still at its sample,
    republishes it: its real action is answered (no wait for stamps that never advance)."""
    f = make()
    assert act(f, [0.1, 0, 0, 0], stamp=1000 * MS, now=0.0).published
    assert act(f, [0.1, 0, 0, 0], stamp=1040 * MS, now=0.001, observe=False).published
    d = act(f, [0.1, 0, 0, 0], stamp=1000 * MS, now=0.02)  # the republished sample
    assert d.source == POLICY and d.stamp_ns == 1000 * MS


def test_at_most_one_command_per_observation() -> None:
    f = make()
    assert act(f, [0.1, 0, 0, 0], stamp=10 * MS, now=0.0).published
    for i in range(5):
        d = act(f, [0.2, 0, 0, 0], stamp=10 * MS, now=0.001 * (i + 1), observe=False)
        assert d.reason == REJECT_REPEATED and not d.published
    assert act(f, [0.2, 0, 0, 0], stamp=10 * MS, now=0.01).published  # republished sample
    assert f.counters.policy_commands == 2 and f.counters.rejected_reasons[REJECT_REPEATED] == 5


def test_a_flood_moves_the_command_no_faster_than_the_rate_per_second() -> None:
    """Finding 3: 2 kHz of actions alternating -1/+1 (each its own observation) inside one
    12.5 ms tick: the command moves by at most one burst plus the refill of that time."""
    f = make()
    assert act(f, [0.0, 0, 0, 0], stamp=1 * MS, now=0.0).published
    cfg = f.config
    commands = [f.last_command[0]]
    now, stamp = 0.0, 1 * MS
    for k in range(25):  # 25 actions in 12.5 ms
        now += 0.0005
        stamp += MS // 2
        d = act(f, [(-1.0) ** k, 0, 0, 0], stamp=stamp, now=now)
        assert d.published
        commands.append(d.command[0])  # type: ignore[index]
    travelled = float(np.abs(np.diff(commands)).sum())
    assert travelled <= cfg.max_delta_per_tick + cfg.max_delta_per_s * now + 1e-9, travelled
    assert travelled < 2.5  # per message, 25 swings of up to 1.0 each would have passed
    # Given time, the full per-tick change is available again.
    d = act(f, [1.0, 0, 0, 0], stamp=stamp + 13 * MS, now=now + 0.0125)
    assert abs(d.command[0] - commands[-1]) == pytest.approx(  # type: ignore[index]
        min(cfg.max_delta_per_tick, 1.0 - commands[-1])
    )


@pytest.mark.parametrize(
    ("tag", "ok"),
    [
        ("pick-place-v3-student@1", True),
        ("pick-place-v3-student@0+residual@17", True),
        ("expert-sigma0.1@0", True),
        ("teleop", False),
        ("teleop@1", False),
        ("hold:estop", False),
        ("hold:watchdog", False),
        ("", False),
        ("model", False),
        ("model@", False),
        ("model@01", False),
        ("model@1+", False),
        ("a@1+b@2+c@3", False),
        ("model@1 ", False),
        ("org/model:v2@3", True),  # the model contract allows any word without @ + | or space
        ("hold:model@1", False),
        ("x" * 101 + "@1", False),
        ("model@" + "9" * 19, False),
    ],
)
def test_only_policy_version_tags_are_accepted(tag: str, ok: bool) -> None:
    """Finding 2: 'teleop', 'hold:*' and anything not a version tag is refused with a reason."""
    reason = check_version_tag(tag)
    assert (reason is None) == ok, reason
    f = make()
    d = act(f, [0.1, 0, 0, 0], stamp=1 * MS, now=0.0, tag=tag)
    assert d.published == ok
    if not ok:
        assert d.reason == REJECT_TAG and reason and "frame_id" in reason


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


def test_estop_latches_until_released_with_a_reason() -> None:
    f = make()
    act(f, [0.3, 0.3, 0.3, 0.5], stamp=1 * MS, now=0.0)
    f.observe(2 * MS, now=0.0)
    d = f.latch_estop(now=0.01)
    assert d.reason == HOLD_ESTOP and d.frame_id() == "hold:estop"
    assert d.command is not None
    np.testing.assert_allclose(d.command, [0, 0, 0, 0.5])
    for i in range(5):
        d = act(f, [0.9, 0.9, 0.9, -0.5], stamp=(3 + i) * MS, now=0.02 + 0.01 * i)
        assert d.source == HOLD and d.reason == HOLD_ESTOP
        np.testing.assert_allclose(d.command, [0, 0, 0, 0.5])
    assert f.status(0.1)["state"] == "holding" and f.status(0.1)["estop"]
    d = f.check(0.5)  # policy gone as well: still an e-stop hold
    assert d is not None and d.reason == HOLD_ESTOP
    assert f.release_estop("   ") is not None and f.estop_latched  # no reason: refused
    assert f.release_estop("alice: arm cleared") is None and not f.estop_latched
    assert f.release_estop("again") == "no e-stop is latched"
    assert f.status(0.6)["last_estop_release"] == "alice: arm cleared"
    f.update_ee_position(INSIDE, now=0.6)
    d = act(f, [0.5, 0.0, 0.0, 0.5], stamp=20 * MS, now=0.61)
    assert d.source == POLICY
    np.testing.assert_allclose(d.command, [0.5, 0.0, 0.0, 0.5])
    c = f.counters
    assert c.estop_latches == 1 and c.estop_releases == 1 and c.estop_release_refused == 2
    assert f.status(0.62)["state"] == "ok"


# ------------------------------------------------------------------------- envelope


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"delta": 0.5}, "delta"),
        ({"action_low": (-1.0, -1.0, -1.0, -1.0)}, "action_low"),
        ({"action_high": (0.6, 0.5, 0.5, 1.0)}, "action_high"),
        ({"max_delta_per_tick": 0.6}, "max_delta_per_tick"),
        ({"max_delta_per_s": 100.0}, "max_delta_per_s"),
        ({"gripper_max_delta_per_s": 200.0}, "gripper_max_delta_per_s"),
        ({"watchdog_timeout_s": 0.2}, "watchdog_timeout_s"),
        ({"max_action_age_s": 0.2}, "max_action_age_s"),
        ({"max_action_lead_s": 0.08}, "max_action_lead_s"),
        ({"teleop_timeout_s": 0.5}, "teleop_timeout_s"),
        ({"ee_timeout_s": 1.0}, "ee_timeout_s"),
        ({"hold_period_s": 0.1}, "hold_period_s"),
        ({"workspace_enabled": False}, "workspace_enabled"),
        ({"workspace_low": (-0.6, 0.35, 0.02)}, "workspace_low"),
        ({"workspace_high": (0.55, 1.1, 0.55)}, "workspace_high"),
        ({"initial_gripper": 0.0}, "initial_gripper"),
    ],
)
def test_limits_may_only_be_tightened_within_the_start_envelope(
    changes: dict[str, Any], fragment: str
) -> None:
    """Finding 4: every limit has a hard bound fixed at start."""
    start = SafetyConfig().with_changes(
        delta=0.3,
        action_low=(-0.5, -0.5, -0.5, -1.0),
        action_high=(0.5, 0.5, 0.5, 1.0),
        max_delta_per_tick=0.5,
    )
    f = SafetyFilter(start, now=0.0)
    with pytest.raises(ValueError, match="tightened") as info:
        f.reconfigure(start.with_changes(**changes))
    assert fragment in str(info.value)
    assert f.config == start and f.counters.relaxations_refused == 1
    tighter = start.with_changes(
        delta=0.1, action_high=(0.2, 0.5, 0.5, 1.0), max_delta_per_s=10.0, watchdog_timeout_s=0.06
    )
    f.reconfigure(tighter)
    assert f.config == tighter
    f.reconfigure(start)  # back up to the hard bound: allowed
    assert f.config == start


def test_hard_ceilings_hold_whatever_the_start_values() -> None:
    with pytest.raises(ValueError, match="cannot be disabled"):
        SafetyConfig(watchdog_timeout_s=60.0)
    with pytest.raises(ValueError, match="action space"):
        SafetyConfig(action_low=(-100.0, -1.0, -1.0, -1.0))
    with pytest.raises(ValueError, match="action space"):
        SafetyConfig(action_high=(1.0, 1.0, 1.0, 50.0))
    with pytest.raises(ValueError, match="max_action_lead_s"):
        SafetyConfig(max_action_lead_s=0.1, watchdog_timeout_s=0.1)
    with pytest.raises(ValueError, match="delta"):
        SafetyFilter(SafetyConfig(delta=0.5), envelope=SafetyConfig(delta=0.3))


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
    assert f.check(0.25) is None  # this observation is answered: no second teleop command
    f.latch_estop(now=0.17)
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
    st.tuples(st.just("tighten"), st.floats(0.0, 1.0)),
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
    moving: dict[int, int] = {}  # moving commands per stamp
    reanswerable: dict[int, int] = {}  # observations of a stamp after it was answered
    for (kind, *args), dt in steps:
        now += dt
        d: Decision | None
        if kind == "action":
            d = act(f, args[0], args[1], stamp=args[2] * MS, now=now, observe=False)
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
        elif kind == "tighten":
            f.reconfigure(f.envelope.with_changes(delta=f.envelope.delta * args[0]))
            d = None
        elif args[0]:
            d = f.latch_estop(now=now)
        else:
            f.release_estop("test")
            d = None
        if kind == "observe" and moving.get(args[0] * MS):
            reanswerable[args[0] * MS] = reanswerable.get(args[0] * MS, 0) + 1
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
        if d.source != HOLD:  # at most one moving command per observation received
            moving[d.stamp_ns] = moving.get(d.stamp_ns, 0) + 1
            assert moving[d.stamp_ns] <= 1 + reanswerable.get(d.stamp_ns, 0)
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
