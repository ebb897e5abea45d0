"""The firing rule (sliding window, threshold, debounce) and the shipped models on real episodes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vlarl.core.reward import DetectorSuccess, EpisodeAccountant, StatusSample
from vlarl.graph import package_root
from vlarl.rewardmodels.detector import SuccessDetector, fire_mask, first_fire
from vlarl.rewardmodels.errors import RewardModelError

SHIPPED = package_root() / "models" / "pick-place-v3-success-detector.onnx"


def test_first_fire_needs_debounce_consecutive_windows() -> None:
    p = np.array([0.1, 0.95, 0.2, 0.9, 0.92, 0.3, 0.97, 0.99, 0.98])
    assert first_fire(p, threshold=0.9, debounce=1) == 1
    assert first_fire(p, threshold=0.9, debounce=2) == 4  # 0.9, 0.92
    assert first_fire(p, threshold=0.9, debounce=3) == 8  # 0.97, 0.99, 0.98
    assert first_fire(p, threshold=0.91, debounce=2) == 7
    assert first_fire(p, threshold=0.9, debounce=4) is None
    assert first_fire(p[:1], threshold=0.05, debounce=2) is None
    assert fire_mask(p, threshold=0.9, debounce=2).tolist() == [False] * 4 + [True] * 5


def test_push_follows_the_rule_and_reset_starts_over(tiny_models: Any) -> None:
    ep = next(e for e in tiny_models.episodes if e.succeeded)
    for debounce in (1, 2, 3):
        det = SuccessDetector.load(tiny_models.detector, debounce=debounce, threshold=0.5)
        probs = det.probabilities(ep.obs, task="pick-place-v3")
        expected = first_fire(probs, threshold=0.5, debounce=debounce)
        fired = [det.push(o) for o in ep.obs]
        assert det.fired_at == expected
        first = fired.index(True) if True in fired else None
        assert first == expected
        if first is not None:
            assert all(fired[first:])  # latched for the episode
        det.reset()
        assert not det.fired and det.fired_at is None
        det.push(ep.obs[0])
        assert det.prob == pytest.approx(float(probs[0]), abs=1e-5)  # the window starts over
    with pytest.raises(RewardModelError, match="shape"):
        det.push(np.zeros(5, np.float32))
    bad = ep.obs[1].copy()
    bad[2] = np.nan
    with pytest.raises(RewardModelError, match="non-finite"):
        det.push(bad)
    with pytest.raises(RewardModelError, match="does not know task"):
        det.select_task("push-v3")


def _real_episodes() -> tuple[np.ndarray, int, np.ndarray]:
    """(obs of a scripted-expert success, its success step, obs of a near-miss)."""
    from vlarl.learning import envs
    from vlarl.learning.collect import run_episode
    from vlarl.rewardmodels.episodes import CopyingExpert, near_miss_episode
    from vlarl.rewardmodels.labels import observation_sequence, success_step_of

    env = envs.make_env("pick-place-v3")
    expert = CopyingExpert(envs.expert_for("pick-place-v3"))
    data, ok = run_episode(
        env,
        expert,
        seed=424242,
        sigma=0.2,
        rng=np.random.default_rng(1),
        max_steps=300,
        post_success_steps=5,
    )
    assert ok
    rows = np.arange(len(data))
    nm = None
    seed = 434343
    while nm is None:
        nm = near_miss_episode(
            env,
            expert,
            seed=seed,
            sigma=0.0,
            stop_short=(6, 10),
            drift_steps=40,
            drift_sigma=0.1,
            rng=np.random.default_rng(seed),
            max_steps=300,
            post_success_steps=5,
        )
        seed += 1
        if nm is not None and nm.succeeded:
            nm = None
    env.close()
    s = success_step_of(data.success)
    assert s is not None
    nm_obs = observation_sequence(nm.data, np.arange(len(nm.data)))
    return observation_sequence(data, rows), s, nm_obs


def test_shipped_detector_on_a_real_success_and_a_near_miss() -> None:
    assert SHIPPED.is_file(), f"{SHIPPED} is missing: rebuild it (see its .md card)"
    det = SuccessDetector.load(SHIPPED)
    obs, s, near = _real_episodes()
    k = det.detect(obs, task="pick-place-v3")
    assert k is not None and abs(k - s) <= 4, (k, s)
    assert det.detect(near, task="pick-place-v3") is None
    # through the accountant, as the reward node runs it (the robot's flag is never set)
    acc = EpisodeAccountant(success_source=DetectorSuccess(det))
    rewards = []
    for step, o in enumerate(obs):
        out, _ = acc.update(
            StatusSample(0, step, False, False, False, 0.0), task="pick-place-v3", obs=o
        )
        assert out is not None
        rewards.append(out.reward)
        if out.terminal:
            break
    assert sum(rewards) == 1.0 and abs(rewards.index(1.0) - s) <= 4
    acc = EpisodeAccountant(success_source=DetectorSuccess(det))
    for step, o in enumerate(near):
        last = step == len(near) - 1
        out, done = acc.update(
            StatusSample(1, step, False, False, last, 0.0), task="pick-place-v3", obs=o
        )
        assert out is not None and out.reward == 0.0 and not out.success
    assert done and not done[0].success and done[0].success_source == "detector"
