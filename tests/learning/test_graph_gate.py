"""The graph's deployment gate (vlarl.learning.graph_gate), without a ROS graph: pins, arms,
outcomes by acting tag, verdicts; and the episode outcomes the learner core hands it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vlarl.data.replay import Transitions
from vlarl.learning.errors import LearningError
from vlarl.learning.gate import GateConfig, Verdict
from vlarl.learning.graph_gate import (
    IDLE,
    LOADING,
    PINNING,
    TRIAL,
    Action,
    GraphGate,
    GraphGateConfig,
    Pin,
)
from vlarl.learning.learner import EpisodeOutcome, LearnerConfig, ResidualLearner
from vlarl.learning.residual_rl import AgentConfig

BASE = "base-policy@3"


def tag(version: int) -> str:
    return BASE if version == 0 else f"{BASE}+residual@{version}"


def status(version: int, history: list[int], refused: int = 0, why: str = "") -> dict[str, Any]:
    """A policy/status message as the policy node publishes it (the fields the gate reads)."""
    return {
        "residual_version": version,
        "residual_history": history,
        "weights_refused": refused,
        "last_weight_refusal": why,
    }


def pins(actions: list[Action]) -> list[int]:
    return [a.version for a in actions if isinstance(a, Pin)]


def verdicts(actions: list[Action]) -> list[Verdict]:
    return [a for a in actions if isinstance(a, Verdict)]


def answer(gate: GraphGate, actions: list[Action]) -> list[Action]:
    """The policy takes every pin (as the node reports its answers)."""
    out = list(actions)
    for version in pins(actions):
        out += answer(gate, gate.pin_done(version))
    return out


def trial(deployed: int = 0, candidate: int = 1, **rule: Any) -> GraphGate:
    """A gate whose trial of ``candidate`` is running (the policy loaded its blob)."""
    gate = GraphGate(GateConfig(**rule), base_tag=BASE, model_id="residual", deployed_version=0)
    loaded = [v for v in (deployed,) if v]
    assert answer(gate, gate.policy_status(status(-1, loaded)))  # a fresh policy: pinned
    if deployed:
        gate.set_deployed(deployed)
        answer(gate, gate.policy_status(status(0, loaded)))
    assert gate.blocked() is None
    first = gate.begin(candidate)
    assert first.version == deployed  # the deployed version is pinned before anything else
    assert gate.phase == PINNING and gate.pin_done(deployed) == []
    gate.published(weights_refused=0)
    assert gate.phase == LOADING
    assert gate.policy_status(status(deployed, [*loaded, candidate])) == []
    assert gate.phase == TRIAL
    return gate


def run(gate: GraphGate, episodes: list[tuple[str, bool]]) -> list[Action]:
    """Feed episodes, each after the boundary that chose its arm; the actions that came out."""
    out: list[Action] = []
    for t, ok in episodes:
        out += answer(gate, gate.on_boundary())
        out += answer(gate, gate.on_episode(EpisodeOutcome(t, 1.0, ok)))
    return out


def alternate(cand: list[bool], dep: list[bool], c: int = 1, d: int = 0) -> list[tuple[str, bool]]:
    return [
        pair for ab in zip(cand, dep, strict=True) for pair in ((tag(c), ab[0]), (tag(d), ab[1]))
    ]


def test_a_clearly_better_candidate_is_promoted_and_pinned() -> None:
    gate = trial()
    out = run(gate, alternate([True] * 10, [False] * 10))
    (verdict,) = verdicts(out)
    assert verdict.accepted and verdict.candidate == tag(1) and verdict.deployed == tag(0)
    assert (verdict.candidate_episodes, verdict.candidate_successes) == (10, 10)
    assert (verdict.deployed_episodes, verdict.deployed_successes) == (10, 0)
    assert verdict.probability >= verdict.threshold
    assert gate.phase == IDLE and gate.deployed_version == 1 and gate.want == 1
    # Verdict first (the node persists the version), then its pin; it stays pinned (the policy
    # never "follows the newest" under the gate).
    assert out[-2] is verdict and pins(out[-1:]) == [1] and gate.pin == 1
    assert gate.status()["promoted"] == 1 and gate.status()["deployed"] == tag(1)
    # The next trial runs against the new deployed version.
    assert gate.begin(2).version == 1


def test_a_worse_candidate_is_refused_early_and_the_deployed_is_pinned_again() -> None:
    gate = trial(deployed=4, candidate=5)
    out = run(gate, alternate([False] * 10, [True] * 10, c=5, d=4))
    (verdict,) = verdicts(out)
    assert not verdict.accepted and "clearly not better" in verdict.reason
    assert verdict.candidate_episodes == verdict.deployed_episodes == 10
    assert gate.phase == IDLE and gate.deployed_version == 4
    assert gate.pin == 4 and pins(out)[-1] == 4  # the refused candidate is never followed


def test_a_tie_at_zero_is_refused_at_the_last_look_only() -> None:
    gate = trial(min_episodes=4, look_every=2, max_episodes=8)
    out = run(gate, alternate([False] * 7, [False] * 7))
    assert verdicts(out) == [] and gate.phase == TRIAL
    (verdict,) = verdicts(run(gate, alternate([False], [False])))
    assert not verdict.accepted and "no candidate success" in verdict.reason
    assert verdict.candidate_episodes == verdict.deployed_episodes == 8


def test_arms_alternate_at_episode_ends_starting_with_the_candidate() -> None:
    gate = trial(deployed=2, candidate=3)
    chosen = []
    for _ in range(5):
        chosen += pins(answer(gate, gate.on_boundary()))
    assert chosen == [3, 2, 3, 2, 3]
    assert gate.assigned == {"candidate": 3, "deployed": 2}
    # No pin while the last one is unanswered: the next one waits for the answer.
    first = gate.on_boundary()
    assert pins(first) == [2] and gate.on_boundary() == []
    assert pins(gate.pin_done(2)) == [3]


def test_episodes_of_other_versions_and_mixed_episodes_are_ignored() -> None:
    gate = trial(min_episodes=2, look_every=1, max_episodes=4)
    for t, share in (
        (tag(7), 1.0),  # another residual version
        ("other-base@1", 1.0),  # another base
        ("teleop", 1.0),
        (tag(1), 0.6),  # the candidate acted in only 60% of the steps
    ):
        assert gate.on_episode(EpisodeOutcome(t, share, True)) == []
    assert gate.ignored == 4 and gate.gate.tally == {"candidate": [0, 0], "deployed": [0, 0]}
    # A switch a few ticks into the episode still counts for the arm that acted.
    out = gate.on_episode(EpisodeOutcome(tag(1), 0.95, True))
    out += gate.on_episode(EpisodeOutcome(tag(0), 1.0, False))
    assert out == [] and gate.gate.tally == {"candidate": [1, 1], "deployed": [1, 0]}


def test_outcomes_are_judged_in_pairs_whatever_order_they_arrive_in() -> None:
    gate = trial()
    # The bridge delivers twelve candidate episodes before any deployed one.
    for _ in range(12):
        assert gate.on_episode(EpisodeOutcome(tag(1), 1.0, True)) == []
    assert gate.gate.tally["candidate"] == [0, 0] and len(gate.queued["candidate"]) == 12
    out: list[Action] = []
    for _ in range(10):
        out += gate.on_episode(EpisodeOutcome(tag(0), 1.0, False))
    (verdict,) = verdicts(out)
    # Decided at the first look, with equal episodes per arm.
    assert verdict.accepted and verdict.candidate_episodes == verdict.deployed_episodes == 10


def test_episodes_before_the_trial_runs_do_not_count() -> None:
    gate = GraphGate(GateConfig(), base_tag=BASE, model_id="residual", deployed_version=0)
    answer(gate, gate.policy_status(status(-1, [])))
    gate.begin(1)
    gate.pin_done(0)
    gate.published(weights_refused=0)
    assert gate.on_episode(EpisodeOutcome(tag(0), 1.0, True)) == []  # still loading
    assert gate.on_boundary() == []  # nothing to choose while the candidate is not loaded
    assert gate.gate.tally == {"candidate": [0, 0], "deployed": [0, 0]}


def test_a_blob_the_policy_refuses_ends_the_trial_refused() -> None:
    gate = GraphGate(GateConfig(), base_tag=BASE, model_id="residual", deployed_version=0)
    answer(gate, gate.policy_status(status(-1, [])))
    gate.begin(1)
    gate.pin_done(0)
    gate.published(weights_refused=2)
    assert gate.policy_status(status(0, [], refused=2)) == []  # an older refusal
    # The deployed blob, published again after an earlier refusal, is refused as not newer.
    again = "residual@4 is not newer than the latest accepted residual@7 (older or replayed)"
    assert gate.policy_status(status(0, [], refused=3, why=again)) == []
    assert gate.phase == LOADING
    out = gate.policy_status(status(0, [], refused=4, why="residual@1: output not finite"))
    (verdict,) = verdicts(out)
    assert not verdict.accepted and "output not finite" in verdict.reason
    assert verdict.candidate_episodes == 0 and gate.phase == IDLE and gate.deployed_version == 0
    assert gate.status()["verdicts"] == 1 and gate.blocked() is None  # the next one may start


def test_a_refused_pin_ends_the_trial_and_an_unpinned_deployed_publishes_nothing() -> None:
    gate = trial()
    (pin,) = gate.on_boundary()
    assert isinstance(pin, Pin) and pin.version == 1
    (verdict,) = verdicts(gate.pin_done(1, "residual version 1 is not loaded"))
    assert not verdict.accepted and "not loaded" in verdict.reason
    assert gate.phase == IDLE
    # Before the blob is published, a pin the policy does not take cancels the trial.
    answer(gate, gate.policy_status(status(0, [1])))
    gate.begin(2)
    assert gate.pin_done(0, "no answer in 5.0 s") == []
    assert gate.phase == IDLE and "no answer" in gate.note
    with pytest.raises(LearningError):
        gate.published(weights_refused=0)


def test_a_restarted_policy_is_pinned_again_and_its_trial_ends() -> None:
    gate = trial(deployed=2, candidate=3)
    answer(gate, gate.on_boundary())  # the candidate acts
    # The policy restarts: residual_version -1, only the candidate's blob (kept by the
    # learner's publisher) is loaded.
    out = gate.policy_status(status(-1, [3]))
    (verdict,) = verdicts(out)
    assert not verdict.accepted and "became -1" in verdict.reason
    assert pins(out) == [0]  # the deployed 2 is not loaded there: the zero residual
    gate.pin_done(0)
    assert gate.blocked() is not None and "not loaded" in str(gate.blocked())
    # Once the deployed version is loaded again, it is pinned.
    assert pins(gate.policy_status(status(0, [2, 3]))) == [2]


def test_a_pin_set_by_hand_holds_the_gate_until_it_is_handed_back() -> None:
    gate = trial(deployed=2, candidate=3)
    # A stale status (older than the last pin) is tolerated once.
    assert gate.policy_status(status(1, [1, 2, 3])) == []
    out = gate.policy_status(status(1, [1, 2, 3]))
    (verdict,) = verdicts(out)
    assert not verdict.accepted and pins(out) == []  # the operator's rollback stands
    assert "outside the gate" in str(gate.blocked())
    assert gate.policy_status(status(1, [1, 2, 3])) == []
    with pytest.raises(LearningError):
        gate.begin(4)
    # Handed back (-1): the deployed version is pinned again and trials may start.
    assert pins(answer(gate, gate.policy_status(status(-1, [1, 2, 3])))) == [2]
    assert gate.blocked() is None


def test_graph_gate_config_defaults_and_checks() -> None:
    config = GraphGateConfig()
    assert config.gate == "rollouts" and config.rule == GateConfig()
    with pytest.raises(LearningError):
        GraphGateConfig(gate="critic")
    with pytest.raises(LearningError):
        GraphGateConfig(gate_min_share=0.4)


def test_gate_parameters_of_the_learner_node_are_the_config_defaults() -> None:
    from vlarl.learning.runs import flat_values
    from vlarl.nodes.learner import PARAMS, gate_config

    params = {p.name: p for p in PARAMS}
    for name, value in flat_values(GraphGateConfig()).items():
        assert params[name].default == value, name
        assert params[name].check(value) is None, name
    assert gate_config({p.name: p.default for p in PARAMS}) == GraphGateConfig()


def test_the_learner_keeps_each_episode_outcome_with_the_tag_that_acted_most() -> None:
    from model_factory import make_policy

    base = make_policy(model_id="base-policy", version=3, seed=0).metadata
    learner = ResidualLearner(
        LearnerConfig(agent=AgentConfig(hidden=16, critics=2, batch_size=16)), base=base
    )
    rng = np.random.default_rng(0)
    n = 10
    versions = np.r_[[0, 0], np.ones(n - 2, int), np.ones(n, int)]  # a switch 2 ticks in
    success = np.zeros(2 * n, np.uint8)
    success[n - 1] = 1
    data = Transitions.build(
        obs=rng.normal(size=(2 * n, 39)),
        next_obs=rng.normal(size=(2 * n, 39)),
        action=rng.uniform(-1, 1, size=(2 * n, 4)),
        success=success,
        episode=np.repeat([0, 1], n),
        step=np.tile(np.arange(n), 2),
        policy_version=versions,
    )
    learner.add(data, [tag(0), tag(1)])
    assert learner.take_outcomes() == [
        EpisodeOutcome(tag(1), 0.8, True),
        EpisodeOutcome(tag(1), 1.0, False),
    ]
    assert learner.take_outcomes() == []
    # The per-tag counts still name the first step's version.
    assert learner.status()["episodes_by_tag"][tag(0)] == {"episodes": 1, "successes": 1}
