"""WMPO labelling, steps-to-go targets, windows, episode extraction, offline relabelling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlarl.data.replay import Transitions, load_replay
from vlarl.rewardmodels.errors import RewardDataError
from vlarl.rewardmodels.labels import (
    Episode,
    build_windows,
    episodes_from_transitions,
    label_replay,
    relabel_rewards,
    split_episodes,
    steps_to_go,
    success_labels,
    window_index,
)
from vlarl.rewardmodels.progress import RewardMix, dense_rewards


def test_wmpo_positives_are_only_the_end_of_successful_episodes() -> None:
    # 10 steps -> 11 observations; success at o_7; pre_steps 2 -> windows ending at o_5.. are +
    assert success_labels(11, 7, pre_steps=2).tolist() == [0] * 5 + [1] * 6
    assert success_labels(11, 7, pre_steps=0).tolist() == [0] * 7 + [1] * 4
    assert success_labels(11, None, pre_steps=2).tolist() == [0] * 11  # failed: all negative
    assert success_labels(4, 1, pre_steps=5).tolist() == [1] * 4  # clipped at o_0
    with pytest.raises(ValueError):
        success_labels(4, 1, pre_steps=-1)


def test_steps_to_go_exact_for_successes_and_a_lower_bound_for_failures() -> None:
    d, cens = steps_to_go(6, 3)
    assert d.tolist() == [3, 2, 1, 0, 0, 0] and not cens.any()
    d, cens = steps_to_go(5, None)  # 4 steps, never succeeded: d(o_k) >= 4 - k + 1
    assert d.tolist() == [5, 4, 3, 2, 1] and cens.all()
    d, _ = steps_to_go(700, None, max_steps=500)
    assert d.max() == 500
    assert dense_rewards(np.array([3.0, 2.0, 2.5, 0.0])).tolist() == [1.0, -0.5, 2.5]


def test_windows_end_at_each_observation_and_pad_with_the_first() -> None:
    assert window_index(4, 3).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3]]
    assert window_index(2, 1).tolist() == [[0], [1]]
    with pytest.raises(ValueError):
        window_index(3, 0)


def _transitions() -> Transitions:
    """Two interleaved episodes, rows out of step order; episode 7 succeeds at o_2."""
    obs = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    rows = {  # (episode, step, obs value, next value, success)
        0: (7, 1, 1.0, 2.0, 1),
        1: (9, 0, 10.0, 11.0, 0),
        2: (7, 0, 0.0, 1.0, 0),
        3: (9, 1, 11.0, 12.0, 0),
        4: (7, 2, 2.0, 3.0, 1),
    }
    ep = np.array([r[0] for r in rows.values()])
    step = np.array([r[1] for r in rows.values()])
    o = np.array([[r[2]] * 3 for r in rows.values()], np.float32)
    n = np.array([[r[3]] * 3 for r in rows.values()], np.float32)
    succ = np.array([r[4] for r in rows.values()])
    del obs
    return Transitions.build(
        obs=o,
        next_obs=n,
        action=np.zeros((5, 4)),
        episode=ep,
        step=step,
        success=succ,
        task=np.array([0, 1, 0, 1, 0]),
    )


def test_episodes_from_transitions() -> None:
    eps = episodes_from_transitions(_transitions(), task_names=["pick-place-v3", "push-v3"])
    assert [(e.episode, e.task, e.steps, e.success_step) for e in eps] == [
        (7, "pick-place-v3", 3, 2),
        (9, "push-v3", 2, None),
    ]
    assert eps[0].obs[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # o_0 = obs[step 0], then next_obs
    assert eps[1].obs[:, 0].tolist() == [10.0, 11.0, 12.0]
    only = episodes_from_transitions(
        _transitions(), task_names=["pick-place-v3", "push-v3"], tasks=["push-v3"]
    )
    assert [e.episode for e in only] == [9]
    mixed = _transitions()
    mixed.task[2] = 1
    with pytest.raises(RewardDataError, match="mixes tasks"):
        episodes_from_transitions(mixed, task_names=["a", "b"])


def test_label_replay_of_real_episodes(reward_replay: Path) -> None:
    episodes, ws = label_replay(reward_replay, window=3, pre_steps=2)
    assert len(episodes) == 6
    succeeded = [e for e in episodes if e.succeeded]
    near = [e for e in episodes if e.near_miss]
    assert len(near) == 2 and all(not e.succeeded for e in near)
    assert len(succeeded) >= 3
    assert len(ws) == sum(e.obs.shape[0] for e in episodes)
    for i, ep in enumerate(episodes):
        rows = ws.episode == i
        labels = ws.label[rows]
        if ep.success_step is None:
            assert labels.sum() == 0 and ws.censored[rows].all()
        else:  # exactly the tail from success_step - pre_steps on
            first = int(np.argmax(labels))
            assert first == ep.success_step - 2 and labels[first:].all()
            assert ws.steps_to_go[rows][ep.success_step] == 0
        # each window ends at its own observation
        np.testing.assert_array_equal(ws.windows(np.flatnonzero(rows))[:, -1], ep.obs)
    # the success flags come from the replay's columns: the simulator said so
    replay = load_replay(reward_replay)
    assert int(replay.data.success.sum()) > 0


def test_split_keeps_every_group_in_training() -> None:
    obs = np.zeros((3, 2), np.float32)
    eps = [Episode(i, "t", obs, 1 if i < 6 else None) for i in range(10)]
    train, val = split_episodes(eps, fraction=0.3, seed=0)
    assert len(train) + len(val) == 10 and val
    assert any(e.succeeded for e in train) and any(not e.succeeded for e in train)
    with pytest.raises(RewardDataError):
        build_windows([], window=2)


def test_relabel_without_models_uses_the_replay_flags(reward_replay: Path) -> None:
    replay = load_replay(reward_replay)
    mix = RewardMix(progress_weight=0.0, success_weight=2.0)
    out = relabel_rewards(replay.data, task_names=replay.tasks, mix=mix, terminal_on_success=True)
    for ep, rows in replay.data.episodes():
        first = out.detected_step[ep]
        flags = replay.data.success[rows]
        if flags.any():
            assert first == int(np.argmax(flags)) + 1
            assert out.data.reward[rows].tolist().count(2.0) == 1
            assert out.data.reward[rows][first - 1] == 2.0 and out.data.terminal[rows[first - 1]]
        else:
            assert first is None and not out.data.reward[rows].any()
    assert not np.shares_memory(out.data.reward, replay.data.reward)  # a copy
