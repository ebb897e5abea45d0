"""Episode accounting: sparse/env/progress reward, boundaries, missed samples, success sources,
human labels, the status/observation join; real Meta-World."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vlarl.core.reward import (
    ConstantValue,
    EpisodeAccountant,
    HumanSuccess,
    LabelRefused,
    ObservationJoin,
    RewardOutput,
    SimSuccess,
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


class StepsLeft:
    """A value source from a table: -d(o) with d = 50 - step (None for steps it lacks)."""

    def __init__(self, missing: tuple[int, ...] = ()) -> None:
        self.missing = missing
        self.resets = 0

    def value(self, s: StatusSample, obs: np.ndarray | None, task: str) -> float | None:
        return None if s.step in self.missing else -float(50 - s.step)

    def reset(self) -> None:
        self.resets += 1


def test_value_comes_from_the_value_source() -> None:
    source = StepsLeft()
    acc = EpisodeAccountant(value_source=source)
    outputs, _ = run(acc, [sample(0, 1), sample(0, 2), sample(1, 1)])
    assert [o.value for o in outputs] == [-49.0, -48.0, -49.0]
    assert source.resets == 2  # once per episode
    assert ConstantValue().value(sample(0, 1), None, "") == 0.0


def test_progress_scheme_is_dense_plus_sparse() -> None:
    """r = progress_weight * (d(o_t) - d(o_t+1)) + success_weight on the success step."""
    acc = EpisodeAccountant(
        scheme="progress",
        value_source=StepsLeft(missing=(3,)),
        progress_weight=0.1,
        success_weight=2.0,
    )
    samples = [sample(0, 0), sample(0, 1), sample(0, 2), sample(0, 3), sample(0, 4)]
    samples.append(sample(0, 5, success=True, terminal=True))
    outputs, summaries = run(acc, samples)
    # step 0: no step taken; step 3: no value (no dense reward, value held); step 4: d 47 -> 46
    assert [o.reward for o in outputs] == pytest.approx([0.0, 0.1, 0.1, 0.0, 0.2, 2.1])
    assert [o.value for o in outputs] == [-50.0, -49.0, -48.0, -48.0, -46.0, -45.0]
    assert summaries[0].episode_return == pytest.approx(2.5)


def test_success_sources() -> None:
    assert isinstance(make_success_source("sim"), SimSuccess)
    human = make_success_source("human")
    assert isinstance(human, HumanSuccess)
    assert not human.success(sample(0, 3, success=True), None, "pick-place-v3")
    assert success_source_problem("human") is None
    problem = success_source_problem("detector")
    assert problem is not None and "needs a success detector" in problem
    with pytest.raises(SuccessSourceUnavailable, match="detector_model"):
        make_success_source("detector")
    with pytest.raises(SuccessSourceUnavailable, match="one of"):
        make_success_source("oracle")


def test_human_label_ends_the_episode_at_its_next_sample() -> None:
    acc = EpisodeAccountant(success_source=HumanSuccess())
    with pytest.raises(LabelRefused, match="no episode"):
        acc.label(True)
    # the robot's own flag is ignored: only the label decides
    outputs, summaries = run(acc, [sample(4, 1), sample(4, 2, success=True)])
    assert [o.success for o in outputs] == [False, False] and summaries == []
    assert acc.label(True) == 4
    outputs, summaries = run(acc, [sample(4, 3)])
    assert (outputs[0].reward, outputs[0].success, outputs[0].terminal) == (1.0, True, True)
    assert [(s.episode, s.success, s.end, s.steps, s.success_source) for s in summaries] == [
        (4, True, "label", 3, "human")
    ]
    with pytest.raises(LabelRefused, match="already ended"):
        acc.label(False)
    # samples after the labelled end earn nothing and end nothing
    outputs, summaries = run(acc, [sample(4, 4), sample(4, 5, terminal=True)])
    assert [o.reward for o in outputs] == [0.0, 0.0] and summaries == []
    # a failure label: truncated, no reward
    run(acc, [sample(5, 1)])
    acc.label(False)
    outputs, summaries = run(acc, [sample(5, 2)])
    assert (outputs[0].reward, outputs[0].truncated, outputs[0].terminal) == (0.0, True, False)
    assert (summaries[0].success, summaries[0].end) == (False, "label")
    assert acc.labels_applied == 2


def test_human_label_without_a_following_sample() -> None:
    acc = EpisodeAccountant(success_source=HumanSuccess())
    run(acc, [sample(1, 1), sample(1, 2)])
    assert acc.expire_label() is None  # nothing pending
    acc.label(True)
    summary = acc.expire_label()
    assert summary is not None and (summary.success, summary.end, summary.steps) == (
        True,
        "label",
        2,
    )
    assert acc.episode is None
    # a new episode while a label is pending: the old one ends with its label
    run(acc, [sample(2, 1)])
    acc.label(True)
    _, summaries = run(acc, [sample(3, 1)])
    assert [(s.episode, s.success, s.end) for s in summaries] == [(2, True, "label")]
    assert acc.episode == 3


def test_observation_join_pairs_by_stamp_in_status_order() -> None:
    ms = 1_000_000
    join = ObservationJoin(timeout_ns=100 * ms)
    # no observation stream: statuses are released at once, without observations
    join.add_status(10, "s10", now_ns=0)
    assert join.ready(now_ns=0) == [("s10", None)]
    # the stream starts: a status waits for its observation, which may come after it
    join.add_observation(20, np.array([2.0]), now_ns=1 * ms)
    join.add_status(20, "s20", now_ns=1 * ms)
    join.add_status(30, "s30", now_ns=2 * ms)
    out = join.ready(now_ns=2 * ms)
    assert [(i, None if o is None else float(o[0])) for i, o in out] == [("s20", 2.0)]
    assert join.ready(now_ns=3 * ms) == []  # s30 waits
    join.add_observation(30, np.array([3.0]), now_ns=4 * ms)
    assert [i for i, _ in join.ready(now_ns=4 * ms)] == ["s30"]
    # a lost observation: a newer one arrives first -> released without
    join.add_status(40, "s40", now_ns=5 * ms)
    join.add_status(50, "s50", now_ns=5 * ms)
    join.add_observation(50, np.array([5.0]), now_ns=6 * ms)
    out = join.ready(now_ns=6 * ms)
    assert [(i, o is None) for i, o in out] == [("s40", True), ("s50", False)]
    # a status whose observation never comes is released after the timeout
    join.add_observation(55, np.array([5.5]), now_ns=7 * ms)
    join.add_status(60, "s60", now_ns=7 * ms)
    assert join.ready(now_ns=50 * ms) == []
    assert join.ready(now_ns=108 * ms) == [("s60", None)]
    assert join.unmatched == 3 and len(join) == 0
    with pytest.raises(ValueError):
        ObservationJoin(timeout_ns=-1)


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
