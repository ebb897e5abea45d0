"""LearnedReward: the shipped pick-place-v3 detector + progress model as the reward of a loop
that steps Meta-World directly, with the reward node's rule (threshold, debounce, latch,
final-window check, progress scheme)."""

from __future__ import annotations

import numpy as np
import pytest

from vlarl.graph import package_root
from vlarl.rewardmodels.errors import RewardModelError
from vlarl.rewardmodels.online import LearnedReward

TASK = "pick-place-v3"
DETECTOR = package_root() / "models" / f"{TASK}-success-detector.onnx"
PROGRESS = package_root() / "models" / f"{TASK}-progress.onnx"


def _rollout(
    reward: LearnedReward | None, *, seed: int, sigma: float, max_steps: int, stop_on_terminal: bool
) -> tuple[np.ndarray, list[tuple[float, bool, float, bool]], int | None, float]:
    """Step the real simulator with the noisy scripted expert; returns (o_0..o_n, per-step
    outputs, simulator success step, value of o_0)."""
    from vlarl.learning import envs
    from vlarl.rewardmodels.episodes import CopyingExpert

    env = envs.make_env(TASK)
    expert = CopyingExpert(envs.expert_for(TASK))
    rng = np.random.default_rng(seed)
    obs = envs.reset_episode(env, seed)
    seen = [obs]
    outs: list[tuple[float, bool, float, bool]] = []
    value0 = reward.reset(obs) if reward is not None else 0.0
    sim_success: int | None = None
    for t in range(max_steps):
        action = expert.get_action(obs) + sigma * rng.standard_normal(4)
        obs, _, terminated, truncated, success = envs.step_env(env, action)
        seen.append(obs)
        if success and sim_success is None:
            sim_success = t + 1
        last = terminated or truncated or t + 1 == max_steps
        if reward is not None:
            out = reward.step(obs, last=last)
            outs.append(tuple(out))  # type: ignore[arg-type]
            if out.terminal and stop_on_terminal:
                break
        if last or (reward is None and sim_success is not None and t + 1 >= sim_success + 5):
            break
    env.close()
    return np.asarray(seen), outs, sim_success, value0


def test_success_and_dense_reward_match_the_models_batch_path() -> None:
    lr = LearnedReward.load(detector=DETECTOR, progress=PROGRESS, task=TASK)
    obs, outs, sim_s, value0 = _rollout(lr, seed=424242, sigma=0.2, max_steps=300,
                                        stop_on_terminal=True)  # fmt: skip
    assert sim_s is not None  # the expert solved it (the simulator says so)
    rewards = np.array([o[0] for o in outs])
    success = [o[1] for o in outs]
    values = np.array([o[2] for o in outs])
    k = success.index(True) + 1  # the observation o_k at which the reward said success
    assert abs(k - sim_s) <= 4, (k, sim_s)
    assert outs[-1][3] and len(outs) == k  # terminate_on_success ends the episode there
    # the same decision as the detector's batch path over the episode's observations
    assert lr.detector.detect(obs, task=TASK) == k
    # value = -d(o_t) of the progress model; reward = 1 on success + 0.01 * (d_prev - d_now)
    d = lr.progress.steps_to_go(obs, task=TASK)
    assert value0 == pytest.approx(-d[0], abs=1e-3)
    np.testing.assert_allclose(values, -d[1:], atol=1e-3)
    dense = 0.01 * (d[:-1] - d[1:])
    expected = dense.copy()
    expected[k - 1] += 1.0
    np.testing.assert_allclose(rewards, expected, atol=1e-4)
    assert rewards.sum() == pytest.approx(1.0 + 0.01 * (d[0] - d[k]), abs=1e-3)  # telescopes


def test_noisy_failure_is_never_a_success_and_the_loop_can_continue_past_success() -> None:
    # sigma 1.0 from this start never succeeds in 150 steps (asserted below)
    lr = LearnedReward.load(detector=DETECTOR, progress=PROGRESS, task=TASK)
    obs, outs, sim_s, _ = _rollout(lr, seed=6, sigma=1.0, max_steps=150, stop_on_terminal=True)
    assert sim_s is None
    assert not any(o[1] for o in outs) and not any(o[3] for o in outs[:-1])
    assert outs[-1][3]  # `last` ends the episode
    d = lr.progress.steps_to_go(obs, task=TASK)  # only dense reward, no success bonus
    np.testing.assert_allclose([o[0] for o in outs], 0.01 * (d[:-1] - d[1:]), atol=1e-4)
    # without terminate_on_success: success is latched and paid once
    lr = LearnedReward.load(detector=DETECTOR, progress=None, task=TASK, terminate_on_success=False)
    _, outs, sim_s, _ = _rollout(lr, seed=424242, sigma=0.2, max_steps=300,
                                 stop_on_terminal=False)  # fmt: skip
    assert sim_s is not None
    flags = [o[1] for o in outs]
    first = flags.index(True)
    assert all(flags[first:]) and len(outs) > first + 3
    assert [o[0] for o in outs].count(1.0) == 1 and sum(o[0] for o in outs) == 1.0
    assert all(o[2] == 0.0 for o in outs)  # no progress model: value 0


def test_final_window_is_judged_alone_at_the_last_step() -> None:
    # a debounce no episode can meet: only the reward node's last-sample rule can say success
    obs, _, sim_s, _ = _rollout(None, seed=424242, sigma=0.2, max_steps=300,
                                stop_on_terminal=False)  # fmt: skip
    assert sim_s is not None
    for last in (False, True):
        lr = LearnedReward.load(detector=DETECTOR, task=TASK, debounce=1000)
        lr.reset(obs[0])
        outs = [lr.step(o) for o in obs[1:sim_s]]
        final = lr.step(obs[sim_s], last=last)
        assert not any(o.success for o in outs)
        assert lr.prob >= lr.threshold  # the success state's own window is confident
        assert final.success is last and final.terminal is last
        assert final.reward == (1.0 if last else 0.0)


def test_bad_use_is_refused_clearly() -> None:
    lr = LearnedReward.load(detector=DETECTOR, progress=PROGRESS)
    assert lr.task == TASK
    with pytest.raises(RewardModelError, match="reset"):
        lr.step(np.zeros(39))
    with pytest.raises(RewardModelError, match="shape"):
        lr.reset(np.zeros(38))
    bad = np.zeros(39)
    bad[3] = np.inf
    with pytest.raises(RewardModelError, match="non-finite"):
        lr.reset(bad)
    with pytest.raises(RewardModelError, match="does not know task"):
        LearnedReward.load(detector=DETECTOR, task="push-v3")
