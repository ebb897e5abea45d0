"""MetaWorldRobot: determinism per seed, episode ends, action validation, joint layout."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest

from vlarl.sim.errors import EpisodeOverError, InvalidActionError, UnknownTaskError
from vlarl.sim.layout import JOINT_NAMES, STATE_DIM
from vlarl.sim.robot import MetaWorldRobot, check_task, episode_seed, task_names


@pytest.fixture(scope="module")
def robot():
    with MetaWorldRobot("reach-v3", seed=3) as r:
        yield r


def test_task_list_and_unknown_task_is_refused_with_a_hint():
    assert "pick-place-v3" in task_names() and len(task_names()) == 50
    assert check_task("push-v3") is None
    reason = check_task("pick-plce-v3")
    assert reason is not None and "pick-place-v3" in reason
    with pytest.raises(UnknownTaskError, match="unknown Meta-World task"):
        MetaWorldRobot("no-such-task-v3")


def test_episode_seeds_are_deterministic_and_distinct():
    assert episode_seed(0, 5) == episode_seed(0, 5)
    assert len({episode_seed(s, e) for s in range(3) for e in range(50)}) == 150


def test_reset_is_deterministic_per_seed_and_episode(robot):
    first = [robot.reset(episode=k).copy() for k in range(4)]
    assert robot.state.shape == (STATE_DIM,)
    with MetaWorldRobot("reach-v3", seed=3) as other:
        assert np.array_equal(other.state, first[0])  # construction resets episode 0
        # Episode 3 starts the same whatever happened before it.
        other.step(np.array([0.5, -0.2, 0.1, 1.0]))
        assert np.array_equal(other.reset(episode=3), first[3])
        assert other.episode == 3 and other.step_count == 0
    layouts = {tuple(np.round(s[36:39], 6)) for s in first}  # goal xyz
    assert len(layouts) > 1, "different episodes should see different layouts"
    with MetaWorldRobot("reach-v3", seed=4) as reseeded:
        assert not np.array_equal(reseeded.state, first[0])


def test_steps_are_deterministic(robot):
    actions = np.random.default_rng(0).uniform(-1, 1, size=(15, 4))
    runs = []
    for _ in range(2):
        robot.reset(episode=7)
        for a in actions:
            robot.step(a)
        runs.append(robot.state.copy())
    assert np.array_equal(runs[0], runs[1])
    assert robot.step_count == 15 and robot.total_steps >= 30


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (np.zeros(3), r"shape \(4,\)"),
        (np.zeros((2, 4)), r"shape \(4,\)"),
        (np.array([0.0, np.nan, 0.0, 0.0]), "non-finite"),
        (np.array([0.0, 0.0, np.inf, 0.0]), "non-finite"),
        (np.array([1.5, 0.0, 0.0, 0.0]), r"outside \[-1, 1\]"),
        (["a", "b", "c", "d"], "not a numeric vector"),
    ],
)
def test_invalid_actions_are_refused_and_change_nothing(robot, action, message):
    robot.reset(episode=1)
    before, steps = robot.state.copy(), robot.step_count
    with pytest.raises(InvalidActionError, match=message):
        robot.step(action)
    assert np.array_equal(robot.state, before) and robot.step_count == steps


def test_round_off_outside_the_box_is_clipped(robot):
    robot.reset(episode=1)
    result = robot.step(np.array([1.0 + 1e-9, -1.0 - 1e-9, 0.0, 0.0]))
    assert result.step == 1 and np.all(np.abs(robot.last_action) <= 1.0)


def test_truncation_at_max_steps_then_refusal_until_reset(robot):
    robot.max_episode_steps = 4
    try:
        robot.reset(episode=2)
        flags = [robot.step(np.zeros(4)) for _ in range(4)]
        assert [f.truncated for f in flags] == [False, False, False, True]
        assert not any(f.terminal for f in flags) and robot.done
        status = robot.status_values()
        assert status.tolist()[:5] == [2.0, 4.0, 0.0, 0.0, 1.0]
        with pytest.raises(EpisodeOverError, match="call reset"):
            robot.step(np.zeros(4))
        robot.reset()
        assert robot.episode == 3 and robot.step_count == 0 and not robot.done
    finally:
        robot.max_episode_steps = 500


def test_success_ends_the_episode_as_terminal_with_the_expert(robot):
    from metaworld.policies import ENV_POLICY_MAP

    policy = cast(Any, ENV_POLICY_MAP["reach-v3"])()
    robot.reset(episode=0)
    result = None
    while not robot.done:
        result = robot.step(np.clip(policy.get_action(robot.state), -1, 1))
    assert result is not None and result.success and result.terminal and not result.truncated
    assert result.step < 200 and robot.status_values()[3] == 1.0

    robot.end_on_success = False
    try:
        robot.reset(episode=0)
        for _ in range(result.step + 5):
            res = robot.step(np.clip(policy.get_action(robot.state), -1, 1))
        assert res.success and not res.terminal and not robot.done
    finally:
        robot.end_on_success = True


def test_joint_layout_and_gripper_slides(robot):
    robot.reset(episode=0)
    q, qd = robot.joint_positions(), robot.joint_velocities()
    assert q.shape == qd.shape == (len(JOINT_NAMES),) == (9,)
    for _ in range(10):
        robot.step(np.array([0.0, 0.0, 0.0, 1.0]))  # +1 closes the gripper
    q = robot.joint_positions()
    assert q[7] > 0.01 and q[8] < -0.01, "r_close and l_close slide toward each other"
    assert robot.state[3] < 0.9, "gripper opening (state[3]) shrinks when closing"
    out = np.empty(9)
    assert robot.joint_positions(out=out) is out


def test_hold_keeps_the_hand_where_a_move_would_not(robot):
    robot.reset(episode=0)
    for _ in range(10):
        robot.step(robot.hold_action())
    start = robot.state[:3].copy()
    for _ in range(10):
        robot.step(robot.hold_action())
    held = np.abs(robot.state[:3] - start).max()
    for _ in range(10):
        robot.step(np.array([1.0, 0.0, 0.0, -1.0]))
    moved = np.abs(robot.state[:3] - start).max()
    assert held < 0.005 < moved
    assert robot.hold_action()[:3].tolist() == [0.0, 0.0, 0.0]
    assert robot.hold_action()[3] == -1.0  # the last gripper command
