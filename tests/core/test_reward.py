"""Episode accounting: sparse/env reward, boundaries, missed samples, sources; real Meta-World."""

from __future__ import annotations

import json
import math

import pytest

from vlarl.core.reward import (
    ConstantValue,
    EpisodeAccountant,
    RewardOutput,
    StatusSample,
    SuccessSourceUnavailable,
    make_success_source,
    success_source_problem,
)
from vlarl.topics import REWARD_FIELDS, ROBOT_STATUS_FIELDS


def sample(
    episode: int,
    step: int,
    *,
    success: bool = False,
    terminal: bool = False,
    truncated: bool = False,
    env_reward: float = 0.5,
) -> StatusSample:
    return StatusSample(episode, step, success, terminal, truncated, env_reward)


def run(acc: EpisodeAccountant, samples: list[StatusSample], task: str = "pick-place-v3"):
    outputs, summaries = [], []
    for s in samples:
        out, done = acc.update(s, task=task)
        outputs.append(out)
        summaries.extend(done)
    return outputs, summaries


def test_sparse_reward_on_the_success_step_and_one_summary() -> None:
    acc = EpisodeAccountant()
    samples = [sample(0, k) for k in range(1, 5)] + [sample(0, 5, success=True, terminal=True)]
    outputs, summaries = run(acc, samples)
    assert [o.reward for o in outputs] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert [o.terminal for o in outputs] == [False] * 4 + [True]
    assert outputs[-1].success and not outputs[0].success
    assert len(summaries) == 1
    summary = summaries[0].to_dict()
    assert summary == {
        "episode": 0,
        "task": "pick-place-v3",
        "success": True,
        "steps": 5,
        "return": 1.0,
        "success_source": "sim",
        "reward_scheme": "sparse",
        "end": "terminal",
        "samples": 5,
    }
    assert json.loads(summaries[0].to_json())["return"] == 1.0


def test_success_counts_once_and_terminates_when_the_sim_does_not() -> None:
    acc = EpisodeAccountant(terminate_on_success=True)
    outputs, summaries = run(
        acc, [sample(3, 1), sample(3, 2, success=True), sample(3, 3, success=True)]
    )
    assert [o.reward for o in outputs] == [0.0, 1.0, 0.0]
    assert outputs[1].terminal  # our terminal: success ends the episode
    assert len(summaries) == 1 and summaries[0].end == "success" and summaries[0].steps == 2
    # without terminate_on_success the episode runs on until the sim truncates it
    acc = EpisodeAccountant(terminate_on_success=False)
    samples = [sample(1, 1), sample(1, 2, success=True), sample(1, 3, success=True)]
    samples.append(sample(1, 4, truncated=True))
    outputs, summaries = run(acc, samples)
    assert [o.reward for o in outputs] == [0.0, 1.0, 0.0, 0.0]
    assert not any(o.terminal for o in outputs) and outputs[-1].truncated
    assert summaries[0].success and summaries[0].end == "truncated"
    assert summaries[0].episode_return == 1.0


def test_truncated_failure() -> None:
    acc = EpisodeAccountant()
    outputs, summaries = run(
        acc, [sample(7, k) for k in range(1, 10)] + [sample(7, 10, truncated=True)]
    )
    assert sum(o.reward for o in outputs) == 0.0
    assert outputs[-1].truncated and not outputs[-1].terminal
    assert len(summaries) == 1
    assert (summaries[0].success, summaries[0].end, summaries[0].steps) == (False, "truncated", 10)


def test_env_scheme_uses_the_shaped_reward() -> None:
    acc = EpisodeAccountant(scheme="env")
    rewards = [0.25, 1.5, 3.0, 9.75]
    samples = [sample(2, k + 1, env_reward=r) for k, r in enumerate(rewards[:-1])]
    samples.append(sample(2, 4, env_reward=rewards[-1], success=True, terminal=True))
    outputs, summaries = run(acc, samples)
    assert [o.reward for o in outputs] == rewards
    assert summaries[0].episode_return == pytest.approx(sum(rewards))
    assert summaries[0].reward_scheme == "env"
    with pytest.raises(ValueError, match="scheme"):
        EpisodeAccountant(scheme="dense")


def test_missed_samples() -> None:
    acc = EpisodeAccountant(terminate_on_success=False)
    # success step (3) and the truncation sample of episode 0 are missed
    samples = [sample(0, 1), sample(0, 2), sample(0, 4, success=True), sample(0, 5, success=True)]
    samples += [sample(1, 1), sample(1, 2, success=True, terminal=True)]
    outputs, summaries = run(acc, samples)
    assert [o.reward for o in outputs] == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert [(s.episode, s.success, s.end, s.steps, s.samples) for s in summaries] == [
        (0, True, "unterminated", 5, 4),
        (1, True, "terminal", 2, 2),
    ]
    # a whole episode missed, then a duplicate and an out-of-order sample: dropped
    out, done = acc.update(sample(5, 3), task="t")
    assert out is not None and done == []
    assert acc.update(sample(5, 3))[0] is None
    assert acc.update(sample(5, 2))[0] is None
    assert acc.dropped == 2
    # samples after the end of an episode earn nothing and end nothing again
    acc = EpisodeAccountant()
    outputs, summaries = run(
        acc, [sample(0, 1, success=True, terminal=True), sample(0, 2, success=True)]
    )
    assert [o.reward for o in outputs] == [1.0, 0.0]
    assert len(summaries) == 1
    # a simulator that restarts (episode numbers start over) still starts a new episode
    outputs, summaries = run(acc, [sample(9, 1), sample(0, 1, success=True, terminal=True)])
    assert outputs[1] is not None and outputs[1].reward == 1.0
    assert [(s.episode, s.end) for s in summaries] == [(9, "unterminated"), (0, "terminal")]


def test_flush_ends_the_open_episode() -> None:
    acc = EpisodeAccountant()
    run(acc, [sample(4, 1), sample(4, 2)])
    summary = acc.flush()
    assert summary is not None and summary.end == "unterminated" and summary.steps == 2
    assert acc.flush() is None


def test_value_comes_from_the_value_source() -> None:
    class StepsLeft:
        def value(self, s: StatusSample) -> float:
            return -float(50 - s.step)

    acc = EpisodeAccountant(value_source=StepsLeft())
    outputs, _ = run(acc, [sample(0, 1), sample(0, 2)])
    assert [o.value for o in outputs] == [-49.0, -48.0]
    assert ConstantValue().value(sample(0, 1)) == 0.0


def test_success_sources() -> None:
    assert make_success_source("sim").name == "sim"
    for name in ("human", "detector"):
        problem = success_source_problem(name)
        assert problem is not None and "not implemented" in problem and "'sim'" in problem
        with pytest.raises(SuccessSourceUnavailable, match="not implemented"):
            make_success_source(name)
    with pytest.raises(SuccessSourceUnavailable, match="one of"):
        make_success_source("oracle")


def test_status_fields_and_reward_layout() -> None:
    fields = dict(zip(ROBOT_STATUS_FIELDS, [3.0, 17.0, 1.0, 0.0, 0.0, 4.5], strict=True))
    s = StatusSample.from_fields(fields)
    assert (s.episode, s.step, s.success, s.terminal, s.env_reward) == (3, 17, True, False, 4.5)
    with pytest.raises(ValueError, match="missing"):
        StatusSample.from_fields({"episode": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        StatusSample.from_fields({**fields, "env_reward": math.nan})
    out = RewardOutput(1.0, True, 0.25, True, False, 3, 17)
    assert dict(zip(REWARD_FIELDS, out.values(), strict=True)) == {
        "reward": 1.0,
        "success": 1.0,
        "value": 0.25,
        "terminal": 1.0,
        "truncated": 0.0,
        "episode": 3.0,
        "step": 17.0,
    }


def test_against_real_meta_world_expert() -> None:
    """The scripted expert on pick-place-v3: the reward fires exactly at the sim's first success."""
    gym = pytest.importorskip("gymnasium")
    import metaworld  # noqa: F401  (registers the environments)
    from metaworld.policies import SawyerPickPlaceV3Policy

    env = gym.make("Meta-World/MT1", env_name="pick-place-v3", seed=0)
    policy = SawyerPickPlaceV3Policy()
    obs, _ = env.reset(seed=0)
    acc = EpisodeAccountant(scheme="sparse", terminate_on_success=False)
    first_success = None
    rewards = []
    summaries = []
    for step in range(1, 151):
        obs, env_reward, terminated, _, info = env.step(policy.get_action(obs))
        succ = bool(info["success"])
        if succ and first_success is None:
            first_success = step
        status = StatusSample(0, step, succ, bool(terminated), step == 150, float(env_reward))
        out, done = acc.update(status, task="pick-place-v3")
        assert out is not None
        rewards.append(out.reward)
        summaries.extend(done)
    env.close()
    assert first_success is not None
    assert rewards.index(1.0) == first_success - 1 and sum(rewards) == 1.0
    assert len(summaries) == 1 and summaries[0].success and summaries[0].steps == 150


def test_sim_robot_sample_sequence_with_stamps() -> None:
    """sim_robot: step 0 after a reset, lockstep re-sends (same stamp), and the extra truncated
    sample a reset request publishes (same step, newer stamp)."""
    acc = EpisodeAccountant(scheme="env")
    seq = [
        (sample(0, 0, env_reward=7.0), 1),  # state after reset: no step, no reward
        (sample(0, 1, env_reward=1.0), 2),
        (sample(0, 2, env_reward=2.0), 3),
        (sample(0, 2, env_reward=2.0), 3),  # lockstep re-send: dropped
        (sample(0, 3, env_reward=3.0), 4),
        (sample(0, 3, env_reward=3.0, truncated=True), 5),  # reset requested: ends, no reward
        (sample(1, 0, env_reward=0.0), 6),
        (sample(1, 1, env_reward=4.0, success=True, terminal=True), 7),
    ]
    outputs, summaries = [], []
    for s, stamp in seq:
        out, done = acc.update(s, task="push-v3", stamp_ns=stamp)
        outputs.append(out)
        summaries.extend(done)
    assert outputs[3] is None and acc.dropped == 1
    assert [o.reward for o in outputs if o is not None] == [0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 4.0]
    assert outputs[5] is not None and outputs[5].truncated
    assert [(s.episode, s.end, s.steps, s.samples, s.episode_return) for s in summaries] == [
        (0, "truncated", 3, 5, 6.0),
        (1, "terminal", 1, 2, 4.0),
    ]
    # an older stamp within the episode is dropped too
    assert acc.update(sample(1, 2), stamp_ns=6)[0] is None
