"""Residual SAC/RLPD agent, learner (replay in, gated blobs out), checkpoints, the CLI verb."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from vlarl.contract import ModelMetadata
from vlarl.core.weights import check_compatible, decode_residual
from vlarl.data.replay import ReplayWriter, Transitions
from vlarl.learning.errors import LearningError
from vlarl.learning.learner import LearnerConfig, ResidualLearner
from vlarl.learning.residual_rl import (
    AgentConfig,
    ResidualSAC,
    episode_columns,
    load_learner,
    save_learner,
    warmup_scale,
)

OBS, ACT = 39, 4
SMALL = {"hidden": 32, "critics": 3, "batch_size": 32}


def _episode(
    rng: np.random.Generator,
    n: int,
    *,
    success: bool,
    residual: float = 0.0,
    intervention: bool = False,
) -> Transitions:
    obs = rng.normal(size=(n + 1, OBS)).astype(np.float32)
    base = rng.uniform(-0.5, 0.5, size=(n, ACT)).astype(np.float32)
    res = np.full((n, ACT), residual, np.float32)
    reward = np.zeros(n, np.float32)
    terminal = np.zeros(n, np.uint8)
    if success:
        reward[-1], terminal[-1] = 1.0, 1
    return Transitions.build(
        obs=obs[:-1],
        next_obs=obs[1:],
        action=base + res,
        base_action=base,
        residual=res,
        reward=reward,
        terminal=terminal,
        truncated=np.r_[np.zeros(n - 1), [not success]],
        success=terminal.copy(),
        intervention=np.full(n, int(intervention), np.uint8),
    )


def _meta() -> ModelMetadata:
    from model_factory import make_policy

    return make_policy(model_id="base-policy", version=3, seed=0).metadata


def test_exported_layers_are_the_deterministic_actor() -> None:
    agent = ResidualSAC(AgentConfig(**SMALL), seed=1)
    agent.scale = 0.3
    with np.errstate(all="ignore"):
        for p in agent.actor.parameters():  # a non-trivial actor
            p.data.normal_(0, 0.3)
    from vlarl.core.residual import MLPResidual

    actor = MLPResidual(
        agent.actor.layers(), tag="residual@1", obs_dim=OBS, action_dim=ACT, scale=0.3
    )
    rng = np.random.default_rng(0)
    out = np.zeros(ACT, np.float32)
    for _ in range(20):
        obs, base = rng.normal(size=OBS), rng.uniform(-1, 1, ACT)
        actor(obs.astype(np.float32), base.astype(np.float32), out)
        np.testing.assert_allclose(out, agent.act(obs, base, explore=False), atol=1e-5)
        assert np.abs(out).max() <= 0.3


def test_episode_columns_next_base_and_returns() -> None:
    rng = np.random.default_rng(0)
    data = Transitions.concatenate(
        [_episode(rng, 5, success=True), _episode(rng, 3, success=False)]
    )
    data.episode[5:] = 1
    cols = episode_columns(data, gamma=0.5)
    np.testing.assert_array_equal(cols["next_base"][:4], data.base_action[1:5])
    np.testing.assert_array_equal(cols["next_base"][4], data.base_action[4])  # last row: itself
    np.testing.assert_allclose(cols["mc_return"][:5], [0.0625, 0.125, 0.25, 0.5, 1.0])
    assert not cols["mc_return"][5:].any()
    assert cols["done"][4] == 1 and cols["done"].sum() == 1


def test_episode_columns_nstep_returns() -> None:
    rng = np.random.default_rng(0)
    data = Transitions.concatenate(
        [_episode(rng, 5, success=True), _episode(rng, 3, success=False)]
    )
    data.episode[5:] = 1
    cols = episode_columns(data, gamma=0.5, nstep=3)
    # Rows 0-1 see no reward within 3 steps; row 2 sees it at its 3rd step, row 4 at once.
    np.testing.assert_allclose(cols["reward"][:5], [0.0, 0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(cols["discount"][:5], [0.125, 0.125, 0.125, 0.25, 0.5])
    np.testing.assert_array_equal(cols["done"][:5], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(cols["next_obs"][0], data.next_obs[2])
    np.testing.assert_array_equal(cols["next_base"][0], data.base_action[3])
    # The failed, truncated episode: the window stops at its end and bootstraps from there.
    np.testing.assert_allclose(cols["discount"][5:], [0.125, 0.25, 0.5])
    np.testing.assert_array_equal(cols["next_obs"][6], data.next_obs[7])
    assert not cols["done"][5:].any() and not cols["reward"][5:].any()
    with pytest.raises(LearningError, match="nstep"):
        episode_columns(data, gamma=0.5, nstep=0)


def test_input_stats_fold_into_the_exported_layers() -> None:
    """Standardised inputs train better; the deployed MLP still takes raw observations."""
    from vlarl.core.residual import MLPResidual

    rng = np.random.default_rng(3)
    agent = ResidualSAC(AgentConfig(**SMALL), seed=2)
    agent.scale = 0.3
    obs_data = rng.normal(loc=0.5, scale=0.05, size=(200, OBS))
    obs_data[:, 7:10] = 0.0  # constant columns: std floored, no division by zero
    agent.set_input_stats(obs_data)
    assert float(agent.actor.in_std[7]) == pytest.approx(1e-2)
    with np.errstate(all="ignore"):
        for prm in agent.actor.parameters():
            prm.data.normal_(0, 0.3)
    actor = MLPResidual(
        agent.actor.layers(), tag="residual@1", obs_dim=OBS, action_dim=ACT, scale=0.3
    )
    out = np.zeros(ACT, np.float32)
    for obs in obs_data[:20]:
        base = rng.uniform(-1, 1, ACT)
        actor(obs.astype(np.float32), base.astype(np.float32), out)
        np.testing.assert_allclose(out, agent.act(obs, base, explore=False), atol=1e-4)
    with pytest.raises(LearningError, match="finite"):
        agent.set_input_stats(np.full((4, OBS), np.nan))


def test_snapshot_acts_as_the_version_it_froze() -> None:
    agent = ResidualSAC(AgentConfig(**SMALL), seed=4)
    agent.scale = 0.2
    with np.errstate(all="ignore"):
        for prm in agent.actor.parameters():
            prm.data.normal_(0, 0.3)
    frozen = agent.snapshot()
    obs, base = np.full(OBS, 0.1), np.zeros(ACT)
    before = agent.act(obs, base, explore=False)
    for prm in agent.actor.parameters():  # training moves on
        prm.data.add_(0.5)
    agent.scale = 0.3
    np.testing.assert_array_equal(agent.act(obs, base, explore=False, snapshot=frozen), before)
    assert not np.allclose(agent.act(obs, base, explore=False), before)


def test_critic_learns_which_residual_pays() -> None:
    """One-step bandit: reward = 1 - |residual/delta - 0.5|; the actor's mean moves to 0.5."""
    agent = ResidualSAC(AgentConfig(**SMALL, init_temperature=1e-3, gamma=0.0, lr=1e-3), seed=0)
    agent.scale = agent.config.delta
    rng = np.random.default_rng(0)
    n = 4096
    obs = (0.05 * rng.normal(size=(n, OBS))).astype(np.float32)  # nearly one state
    base = np.zeros((n, ACT), np.float32)
    u = rng.uniform(-1, 1, size=(n, ACT)).astype(np.float32)
    reward = (1.0 - np.abs(u - 0.5).mean(1)).astype(np.float32)
    cols = {
        "obs": obs,
        "base": base,
        "action": base + u * agent.config.delta,
        "reward": reward,
        "done": np.ones(n, np.float32),
        "next_obs": obs,
        "next_base": base,
        "mc_return": reward,
    }
    for _ in range(1000):
        idx = rng.integers(0, n, 32)
        agent.update({k: v[idx] for k, v in cols.items()})
    import torch

    x = torch.from_numpy(obs[:256])
    zeros = torch.zeros(256, ACT)
    with torch.no_grad():
        q_good = agent.critics(torch.cat([x, zeros, zeros + 0.5], -1)).mean()
        q_bad = agent.critics(torch.cat([x, zeros, zeros - 0.5], -1)).mean()
    assert q_good > q_bad + 0.2, (q_good, q_bad)  # the critic ranks residuals by their pay
    residual = np.array([agent.act(o, np.zeros(ACT), explore=False) for o in obs[:50]])
    u = residual / agent.config.delta
    assert 0.2 < u.mean() < 0.8, u.mean(0)  # and the actor moved from 0 toward the best (0.5)


def test_checkpoint_roundtrip_and_tampering(tmp_path: Path) -> None:
    from vlarl.learning.residual_rl import LearnerState

    agent = ResidualSAC(AgentConfig(**SMALL), seed=0)
    rng = np.random.default_rng(0)
    batch = {
        k: rng.normal(size=(32, OBS if "obs" in k else ACT)).astype(np.float32)
        for k in ("obs", "next_obs", "base", "action", "next_base")
    }
    batch.update(
        reward=np.zeros(32, np.float32),
        done=np.zeros(32, np.float32),
        mc_return=np.zeros(32, np.float32),
    )
    for _ in range(3):
        agent.update(batch)
    agent.scale = 0.2
    path = tmp_path / "learner.safetensors"
    save_learner(path, agent, LearnerState(env_steps=123, version=4, deployed_version=4))
    again, state = load_learner(path)
    assert (state.env_steps, state.version, again.updates, again.scale) == (123, 4, 3, 0.2)
    obs, base = rng.normal(size=OBS), rng.normal(size=ACT)
    np.testing.assert_allclose(
        again.act(obs, base, explore=False), agent.act(obs, base, explore=False)
    )
    # Same optimiser state: one more identical update gives identical weights.
    torch = pytest.importorskip("torch")
    torch.manual_seed(5)
    again.rng = np.random.default_rng(9)
    again.update(batch)
    torch.manual_seed(5)
    agent.rng = np.random.default_rng(9)
    agent.update(batch)
    for a, b in zip(agent.critics.parameters(), again.critics.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(LearningError, match=r"sha256|corrupt"):
        load_learner(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(LearningError):
        load_learner(tmp_path / "short.safetensors")


def test_warmup_scale() -> None:
    assert warmup_scale(100, delta=0.3, start=1000, ramp=2000) == 0.0
    assert warmup_scale(2000, delta=0.3, start=1000, ramp=2000) == pytest.approx(0.15)
    assert warmup_scale(10**6, delta=0.3, start=1000, ramp=2000) == 0.3


def _write_replay(
    directory: Path,
    rng: np.random.Generator,
    *,
    tag: str,
    episodes: int,
    successes: int,
    intervention: bool = False,
) -> None:
    with ReplayWriter(directory, source="test", tasks=["pick-place-v3"]) as writer:
        for i in range(episodes):
            ep = _episode(rng, 30, success=i < successes, intervention=intervention)
            writer.add_episode(ep, task="pick-place-v3", version=tag)


def _learner_config(**overrides: object) -> LearnerConfig:
    settings = {"learning_starts": 0, **overrides}  # tiny budgets: learn from the first batch
    return LearnerConfig(agent=AgentConfig(**SMALL), **settings)  # type: ignore[arg-type]


def test_learner_ingests_trains_gates_publishes_and_resumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    replay = tmp_path / "replay"
    _write_replay(replay, rng, tag="base-policy@3", episodes=6, successes=3)
    cfg = _learner_config(probe_transitions=60, warmup_ramp=100, utd=2)
    paths = {"checkpoint": tmp_path / "ck.safetensors", "replay_dir": replay}
    meta = _meta()
    learner = ResidualLearner(cfg, base=meta, **paths)
    assert learner.ingest() == 180
    assert len(learner.offline) == 90  # the 3 successful base episodes
    assert learner.ingest() == 0  # nothing new
    assert learner.train(max_updates=10_000) == 360  # utd x transitions
    assert learner.achieved_utd() == 2.0 and learner.updates_owed == 0
    first = learner.propose()
    assert first is not None and first.accepted and first.blob is not None
    weights = decode_residual(first.blob)
    assert (weights.tag, weights.parent, weights.base) == ("residual@1", 0, meta.tag)
    assert weights.scale == pytest.approx(0.3)
    check_compatible(weights, obs_dim=OBS, action_dim=ACT, base_tag=meta.tag, current=None)
    # Proposed is not deployed: only promote() (the gate's verdict) deploys.
    assert learner.state.deployed_version == 0
    learner.promote(first, verdict={"accepted": True})
    assert learner.state.deployed_version == 1
    # A stricter pre-screen refuses the next candidate (estimate must beat deployed by 1.0).
    learner.config.prescreen_tolerance = -1.0
    refused = learner.propose()
    assert refused is not None and not refused.accepted and refused.blob is None
    assert learner.gated == 1 and learner.state.version == 1
    with pytest.raises(LearningError, match="pre-screen"):
        learner.promote(refused)
    learner.config.prescreen_tolerance = 0.02
    second = learner.propose()
    assert second is not None and second.accepted and second.blob is not None
    assert decode_residual(second.blob).parent == 1
    learner.promote(second)
    # Interventions go to the offline buffer too; residual-acted episodes don't.
    _write_replay(replay, rng, tag="base-policy@3+residual@2", episodes=2, successes=2)
    _write_replay(replay, rng, tag="teleop", episodes=1, successes=0, intervention=True)
    assert learner.ingest() == 90
    assert len(learner.offline) == 120
    learner.train(max_updates=10_000)
    updates = learner.agent.updates
    learner.save()
    # "Killed" and restarted: same checkpoint and replay, nothing re-done, nothing lost.
    again = ResidualLearner(cfg, base=meta, **paths)
    assert again.resumed and again.state.version == 2 and again.agent.updates == updates
    assert again.state.deployed_version == 2
    assert again.ingest() == 270
    assert again.updates_owed == 270 * 2 - updates
    status = again.status()
    assert status["episodes_by_tag"]["base-policy@3"] == {"episodes": 6, "successes": 3}
    assert status["episodes_by_tag"]["base-policy@3+residual@2"]["successes"] == 2
    # A checkpoint of a residual on another base is refused: a new base starts a new learner.
    other = dataclasses.replace(meta, version=meta.version + 1)
    with pytest.raises(LearningError, match="fresh residual"):
        ResidualLearner(cfg, base=other, **paths)


def test_learner_forgives_debt_it_cannot_pay(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    replay = tmp_path / "replay"
    _write_replay(replay, rng, tag="base-policy@3", episodes=10, successes=2)
    learner = ResidualLearner(
        _learner_config(utd=4, max_owed_updates=100), base=_meta(), replay_dir=replay
    )
    assert learner.ingest() == 300
    assert learner.updates_owed == 100 and learner.updates_forgiven == 1100
    assert learner.train(max_updates=40) == 40
    status = learner.status()
    assert status["updates_owed"] == 60 and status["achieved_utd"] == pytest.approx(
        40 / 300, abs=1e-3
    )


def test_a_probe_without_success_is_extended_and_says_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    replay = tmp_path / "replay"
    _write_replay(replay, rng, tag="base-policy@3", episodes=6, successes=0)
    learner = ResidualLearner(
        _learner_config(probe_transitions=60, warmup_ramp=10, max_probe_extensions=3),
        base=_meta(),
        replay_dir=replay,
    )
    assert learner.ingest() == 180
    assert learner.probe_extensions == 2 and learner.status()["probe_transitions"] == 240
    assert learner.current_scale() == 0.0 and learner.propose() is None
    assert "no success" in learner.status()["notes"][-1]
    # A success of the base alone ends the extension: learning starts after the probe.
    _write_replay(replay, rng, tag="base-policy@3", episodes=3, successes=1)
    learner.ingest()
    assert len(learner.offline) == 30 and learner.probe_extensions == 2
    assert learner.current_scale() > 0.0


def test_learner_reports_bad_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    replay = tmp_path / "replay"
    _write_replay(replay, rng, tag="base-policy@3", episodes=2, successes=1)
    _write_replay(replay, rng, tag="base-policy@3", episodes=1, successes=1)
    shard = sorted(replay.glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-50])  # truncated after it was written
    learner = ResidualLearner(
        _learner_config(),
        base=_meta(),
        checkpoint=tmp_path / "c.safetensors",
        replay_dir=replay,
    )
    assert learner.ingest() == 30
    assert list(learner.bad_shards) == [shard.name]


def test_train_residual_verb_smoke(tmp_path: Path) -> None:
    """Both methods and both gates run end to end on a tiny budget through the real simulator,
    the policy node's residual actor and safety; the learner is the node's learner core."""
    from vlarl.learning.gate import GateConfig
    from vlarl.learning.train_residual import TrainResidualConfig, train

    tiny = {"eval_episodes": 1, "progress": False, "max_episode_steps": 30}

    def learner(**kw: object) -> LearnerConfig:
        # 30-step episodes rarely succeed: probe extensions would take the whole budget
        return _learner_config(publish_every=20, max_probe_extensions=0, **kw)

    for method in ("residual", "base"):
        summary = train(
            TrainResidualConfig(
                method=method,
                total_steps=120,
                learner=learner(probe_transitions=40, warmup_ramp=40),
                gate="none",
                eval_every=60,
                eval_max_steps=15,
                action_offset="0,0.2,0,0",
                out=str(tmp_path / method),
                **tiny,  # type: ignore[arg-type]
            )
        )
        assert [c["step"] for c in summary["curve"]] == [0, 60, 120]
        assert summary["env_steps"] >= 120
        assert (tmp_path / method / "metrics.json").is_file()
        if method == "residual":
            assert summary["candidates"] >= 1 and "+residual@" in summary["deployed"]
            assert summary["achieved_utd"] == pytest.approx(2.0, abs=0.05)
    learned = train(
        TrainResidualConfig(
            reward="learned",
            total_steps=60,
            learner=learner(probe_transitions=20, warmup_ramp=20),
            eval_every=60,
            eval_max_steps=10,
            out=str(tmp_path / "learned"),
            **tiny,  # type: ignore[arg-type]
        )
    )
    assert learned["reward"] == "learned" and len(learned["curve"]) == 2
    # The training episodes are replay data for the next detector, labelled by the flag.
    from vlarl.rewardmodels.labels import load_episodes

    recorded = load_episodes(tmp_path / "learned" / "episodes")
    assert sum(e.steps for e in recorded) == learned["online_transitions"] > 0
    assert {e.task for e in recorded} == {"pick-place-v3"}
    assert recorded[0].version == "pick-place-v3-student@1"  # the probe: the base alone acted
    assert sum(e.succeeded for e in recorded) == learned["train_successes"]
    gated = train(
        TrainResidualConfig(
            gate="rollouts",
            gate_rule=GateConfig(min_episodes=1, look_every=1, max_episodes=2),
            total_steps=200,
            learner=learner(probe_transitions=30, warmup_ramp=30),
            eval_every=200,
            eval_max_steps=10,
            out=str(tmp_path / "gated"),
            **tiny,  # type: ignore[arg-type]
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "gated" / "metrics.jsonl").open()]
    gates = [r for r in rows if r["kind"] == "gate"]
    assert gates and gated["candidates"] >= len(gates)
    accepted = [g["candidate"] for g in gates if g["accepted"]]
    assert gated["deployed"] == (accepted[-1] if accepted else "pick-place-v3-student@1")
    for g in gates:  # no verdict without a candidate success
        assert not g["accepted"] or g["candidate_successes"] > 0
    with pytest.raises(LearningError, match="action_offset"):
        train(TrainResidualConfig(action_offset="0,2,0,0", out=str(tmp_path / "bad")))


def test_averaged_actor_is_deployed_and_checkpointed(tmp_path: Path) -> None:
    from vlarl.learning.residual_rl import LearnerState

    agent = ResidualSAC(AgentConfig(**SMALL, actor_ema=0.1, lr=1e-2), seed=0)
    agent.scale = 0.3
    rng = np.random.default_rng(1)
    batch = {
        k: rng.normal(size=(32, OBS if "obs" in k else ACT)).astype(np.float32)
        for k in ("obs", "next_obs", "base", "action", "next_base")
    }
    batch.update(
        reward=rng.uniform(size=32).astype(np.float32),
        done=np.zeros(32, np.float32),
        mc_return=np.zeros(32, np.float32),
    )
    before = [p.detach().clone() for p in agent.deployable().parameters()]
    for _ in range(20):
        agent.update(batch)
    avg = list(agent.deployable().parameters())
    live = list(agent.actor.parameters())
    assert agent.deployable() is agent.actor_avg
    for b, a, lv in zip(before, avg, live, strict=True):
        moved, lead = (a - b).norm(), (lv - b).norm()
        assert 0 < moved < lead  # it follows the actor, more slowly
    path = tmp_path / "ema.safetensors"
    save_learner(path, agent, LearnerState())
    loaded, _ = load_learner(path)
    obs, base = rng.normal(size=OBS), np.zeros(ACT)
    np.testing.assert_allclose(
        loaded.act(
            obs, base, explore=False, snapshot=loaded.snapshot()._replace(actor=loaded.deployable())
        ),
        agent.act(
            obs, base, explore=False, snapshot=agent.snapshot()._replace(actor=agent.deployable())
        ),
        atol=1e-6,
    )
