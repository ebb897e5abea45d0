"""The learner follows the policy's base: a swap starts a fresh residual learner on the new
base, a rollback resumes the previous base's learner, rows of another base are left out, and a
base whose file cannot be checked is refused (the current learner stays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_factory import make_policy
from vlarl.core.weights import decode_residual
from vlarl.data.replay import ReplayWriter, Transitions
from vlarl.learning.base_follow import BaseFollower
from vlarl.learning.learner import LearnerConfig, ResidualLearner, base_of, other_base
from vlarl.learning.residual_rl import AgentConfig

OBS, ACT = 39, 4


def _config() -> LearnerConfig:
    return LearnerConfig(
        agent=AgentConfig(hidden=16, critics=2, batch_size=16),
        learning_starts=0,
        probe_transitions=0,
        warmup_ramp=0,
        utd=1,
        prescreen="none",
    )


def _write(replay: Path, tags: list[str], seed: int) -> None:
    """One 20-step episode per tag (base actions from the seed, odd episodes succeed)."""
    rng = np.random.default_rng(seed)
    with ReplayWriter(replay, source="test", tasks=["pick-place-v3"]) as writer:
        for i, tag in enumerate(tags):
            n = 20
            obs = rng.normal(size=(n + 1, OBS)).astype(np.float32)
            base = rng.uniform(-0.5, 0.5, size=(n, ACT)).astype(np.float32)
            reward = np.zeros(n, np.float32)
            reward[-1] = float(i % 2)
            data = Transitions.build(
                obs=obs[:-1],
                next_obs=obs[1:],
                action=base,
                base_action=base,
                reward=reward,
                terminal=(reward > 0).astype(np.uint8),
                success=(reward > 0).astype(np.uint8),
            )
            writer.add_episode(data, task="pick-place-v3", version=tag)


def _models(tmp_path: Path) -> dict[str, Path]:
    return {
        "A": make_policy(model_id="pol", version=1, seed=1).save(tmp_path / "a.onnx"),
        "B": make_policy(model_id="pol", version=2, seed=2).save(tmp_path / "b.onnx"),
        "wide": make_policy(model_id="pol", version=3, obs_dim=40).save(tmp_path / "wide.onnx"),
    }


def _learn_and_mint(learner: ResidualLearner) -> int:
    """Ingest, train and promote one candidate; returns its version."""
    learner.ingest()
    assert learner.train(max_updates=10_000) > 0
    candidate = learner.propose()
    assert candidate is not None and candidate.blob is not None
    assert decode_residual(candidate.blob).base == learner.base_tag
    learner.promote(candidate)
    return candidate.version


def test_base_tags_of_replay_rows() -> None:
    assert base_of("pol@1") == "pol@1"
    assert base_of("pol@1+residual@7") == "pol@1"
    assert base_of("teleop") == "" and base_of("hold:stale") == ""
    assert other_base("pol@2+residual@1", "pol@1") and not other_base("pol@1", "pol@1")
    assert not other_base("teleop", "pol@1")


def test_swap_starts_fresh_rollback_resumes_and_foreign_rows_are_left_out(
    tmp_path: Path,
) -> None:
    models = _models(tmp_path)
    replay = tmp_path / "replay"
    checkpoint = tmp_path / "ck" / "learner.safetensors"
    a = make_policy(model_id="pol", version=1, seed=1).metadata
    _write(replay, ["pol@1"] * 4, seed=0)
    follower = BaseFollower(_config(), base=a, checkpoint=checkpoint, replay_dir=replay)
    assert follower.follow("pol@1", models["A"]) is None  # same base: nothing happens
    first = _learn_and_mint(follower.learner)
    assert (first, follower.base_tag) == (1, "pol@1")

    # The policy swaps to B: A is saved, B starts fresh on B's rows only.
    _write(replay, ["pol@2", "pol@2+residual@2", "pol@1+residual@1", "teleop"], seed=1)
    switch = follower.follow("pol@2", models["B"])
    assert switch is not None and not switch.resumed
    assert (switch.previous, switch.base) == ("pol@1", "pol@2")
    assert switch.checkpoint == checkpoint.with_name("learner.pol@2.safetensors")
    assert checkpoint.exists()  # A's learner saved on the way out
    b = follower.learner
    assert b.base_tag == "pol@2" and not b.resumed and b.agent.updates == 0
    # B's rows (its own and its residual's) and the teleop episode; A's 5 episodes are left out.
    assert b.ingest() == 3 * 20
    assert b.foreign_transitions == 5 * 20
    assert set(b.episodes_by_tag) == {"pol@2", "pol@2+residual@2", "teleop"}
    second = _learn_and_mint(b)
    assert second == first + 1  # one version sequence across bases
    assert follower.status()["bases_seen"] == ["pol@1", "pol@2"]

    # Rollback to A: A's learner resumes from its checkpoint and its versions continue.
    a_updates = ResidualLearner(_config(), base=a, checkpoint=checkpoint).agent.updates
    back = follower.follow("pol@1", models["A"])
    assert back is not None and back.resumed and back.checkpoint == checkpoint
    assert follower.learner.agent.updates == a_updates > 0
    assert follower.learner.state.deployed_version == first
    # A's 4 base episodes, its residual's one and the teleop episode (it names no base).
    assert follower.learner.ingest() == 6 * 20
    assert _learn_and_mint(follower.learner) == second + 1
    assert follower.switches == 2 and follower.refusals == 0

    # And forward to B again: B resumes too.
    again = follower.follow("pol@2", models["B"])
    assert again is not None and again.resumed
    assert follower.learner.state.version == second + 1

    # Restarted on A (a new process): B's checkpoint holds the highest version minted so far,
    # and the start-up learner never mints at or below it.
    follower.learner.save()
    restarted = BaseFollower(_config(), base=a, checkpoint=checkpoint, replay_dir=replay)
    assert restarted.minted_by_other_bases() == second + 1
    assert restarted.learner.resumed and restarted.learner.state.version == second + 1
    _write(replay, ["pol@1"] * 2, seed=2)  # new data: updates are owed again
    assert _learn_and_mint(restarted.learner) == second + 2


def test_a_base_that_cannot_be_checked_is_refused(tmp_path: Path) -> None:
    models = _models(tmp_path)
    checkpoint = tmp_path / "learner.safetensors"
    a = make_policy(model_id="pol", version=1, seed=1).metadata
    follower = BaseFollower(_config(), base=a, checkpoint=checkpoint, replay_dir=None)
    learner = follower.learner
    cases = {
        "pol@2": (tmp_path / "missing.onnx", "cannot be loaded"),
        "pol@9": (models["B"], "holds pol@2, not the tag"),
        "pol@3": (models["wide"], "obs/action dims 40/4"),
    }
    for tag, (path, reason) in cases.items():
        assert follower.follow(tag, path) is None
        assert follower.last.startswith("refused:") and reason in follower.last
        assert follower.learner is learner and follower.base_tag == "pol@1"
    # A base that does not know the learner's task is refused too.
    tasked = BaseFollower(
        _config(), base=a, checkpoint=checkpoint, replay_dir=None, task="drawer-open-v3"
    )
    assert tasked.follow("pol@2", models["B"]) is None and "task" in tasked.last
    assert follower.refusals == 3 and follower.switches == 0
    assert follower.status()["bases_seen"] == ["pol@1"]
    assert not checkpoint.exists()  # nothing was saved for a refused switch


def test_a_new_base_whose_checkpoint_is_another_base_is_refused(tmp_path: Path) -> None:
    models = _models(tmp_path)
    checkpoint = tmp_path / "learner.safetensors"
    a = make_policy(model_id="pol", version=1, seed=1).metadata
    follower = BaseFollower(_config(), base=a, checkpoint=checkpoint, replay_dir=None)
    # Someone put A's checkpoint where B's belongs: B's learner cannot start from it.
    follower.learner.save(follower.checkpoint_for("pol@2"))
    assert follower.follow("pol@2", models["B"]) is None
    assert "residual of pol@1" in follower.last and follower.base_tag == "pol@1"
