"""The deployment gate's rule: interleaving, promotion on evidence, no promotion on a zero tie."""

from __future__ import annotations

import pytest

from vlarl.learning.errors import LearningError
from vlarl.learning.gate import CANDIDATE, DEPLOYED, DeploymentGate, GateConfig, prob_better


def _play(gate: DeploymentGate, candidate: list[bool], deployed: list[bool]):  # type: ignore[no-untyped-def]
    """Feed outcomes in the gate's own interleaved order until it decides."""
    outcomes = {CANDIDATE: iter(candidate), DEPLOYED: iter(deployed)}
    arms = []
    while True:
        arm = gate.next_arm()
        arms.append(arm)
        verdict = gate.record(arm, next(outcomes[arm]))
        if verdict is not None:
            return verdict, arms


def test_a_tie_at_zero_never_promotes() -> None:
    rule = GateConfig(min_episodes=4, look_every=4, max_episodes=12)
    gate = DeploymentGate(rule, deployed="base@1")
    gate.propose("base@1+residual@3")
    verdict, arms = _play(gate, [False] * 12, [False] * 12)
    assert not verdict.accepted and "tie at zero" in verdict.reason
    assert verdict.candidate_episodes == verdict.deployed_episodes == 12
    assert arms[:4] == [CANDIDATE, DEPLOYED, CANDIDATE, DEPLOYED]  # interleaved
    assert gate.deployed == "base@1" and not gate.in_trial


def test_a_worse_candidate_is_refused_early_and_a_better_one_promoted() -> None:
    rule = GateConfig()
    gate = DeploymentGate(rule, deployed="a@1")
    gate.propose("a@2")
    worse, _ = _play(gate, [False] * 30, [True] * 30)
    assert not worse.accepted and worse.candidate_episodes == rule.min_episodes
    assert gate.deployed == "a@1"
    gate.propose("a@3")
    better, _ = _play(gate, [True] * 30, [i % 4 == 0 for i in range(30)])
    assert better.accepted and better.probability >= better.threshold
    assert gate.deployed == "a@3" and len(gate.verdicts) == 2
    # Equal evidence is not evidence of better: an even match runs to the last look, refused.
    gate.propose("a@4")
    even, _ = _play(gate, [i % 2 == 0 for i in range(30)], [i % 2 == 1 for i in range(30)])
    assert not even.accepted and even.candidate_episodes == rule.max_episodes


def test_posterior_probability_and_rule_checks() -> None:
    assert prob_better((0, 0), (10, 10)) == pytest.approx(0.5, abs=1e-3)
    assert prob_better((10, 0), (10, 10)) > 0.999
    assert prob_better((5, 5), (10, 10), margin=0.2) < 0.5
    assert GateConfig().looks == 5
    with pytest.raises(LearningError):
        GateConfig(confidence=1.0)
    with pytest.raises(LearningError):
        GateConfig(min_episodes=10, max_episodes=5)
    gate = DeploymentGate(GateConfig(), deployed="a@1")
    gate.propose("a@2")
    with pytest.raises(LearningError, match="still running"):
        gate.propose("a@3")
