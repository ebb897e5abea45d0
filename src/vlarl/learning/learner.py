"""The off-board learner: replay shards in, gated residual-actor weight blobs out (ROS-free).

:class:`ResidualLearner` is what the ``learner`` node runs in its worker thread:

1. :meth:`ingest` reads the replay shards the bag bridge has written since the last call
   (shard names only grow), splits them into the offline buffer (successful episodes acted by
   the base alone, and every intervention step: HIL-SERL puts those in both buffers) and the
   online buffer (everything), and counts episodes and successes per acting version tag;
2. :meth:`train` runs SAC/RLPD updates (``utd`` per ingested transition);
3. :meth:`propose` turns the current actor into a candidate version and gates it: the critic's
   off-policy estimate of the candidate on recent states must not be below the deployed
   version's by more than ``gate_tolerance`` (RL-100's "not worse than deployed"); an accepted
   candidate comes back as a weight blob (:mod:`vlarl.core.weights`) with model id, version,
   parent version and digest;
4. :meth:`save` checkpoints the agent and the learner's state (safetensors, atomic). A killed
   learner restarted on the same checkpoint and replay folder resumes: the replay shards (rebuilt
   from the bags by the bridge) are re-read, so no transition is lost.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.contract import ModelMetadata
from vlarl.core.weights import encode_residual
from vlarl.data.errors import ReplayError
from vlarl.data.replay import list_shards, read_shard
from vlarl.learning.errors import LearningError
from vlarl.learning.residual_rl import (
    AgentConfig,
    LearnerState,
    ReplayBuffer,
    ResidualSAC,
    episode_columns,
    load_learner,
    sample_symmetric,
    save_learner,
    warmup_scale,
)


@dataclass
class LearnerConfig:
    """What the learner node's parameters set."""

    replay_dir: str = "replay/live"
    """Replay folder the bag bridge writes (live mode)."""
    checkpoint: str = "runs/learner/learner.safetensors"
    """Learner checkpoint: resumed from when it exists."""
    model_id: str = "residual"
    """Model id of the published residual actor (its tag is model_id@version)."""
    delta: float = 0.3
    """Residual bound (the safety node's delta)."""
    utd: int = 2
    """Critic updates per ingested transition."""
    critics: int = 4
    """Critic ensemble size."""
    critic_subset: int = 2
    """Target: min over this many random target critics."""
    hidden: int = 128
    """Hidden width of actor and critics."""
    batch_size: int = 128
    """Transitions per update (half offline, half online)."""
    gamma: float = 0.99
    """Discount."""
    lr: float = 3e-4
    """Learning rate of critics and temperature."""
    actor_lr: float = 1e-4
    """Learning rate of the actor."""
    init_temperature: float = 0.001
    """Initial SAC temperature."""
    nstep: int = 3
    """n-step returns in the critic's target."""
    normalize_obs: bool = True
    """Standardise observations with the statistics of the data at the first update."""
    actor_pessimism: float = 0.5
    """The actor maximises mean - this * std of the ensemble's Q."""
    actor_ema: float = 0.002
    """Polyak rate of the averaged actor that is published (0 = the actor itself)."""
    bc_weight: float = 0.5
    """Pull of the residual toward zero (toward the base) at the start."""
    bc_decay_updates: int = 8000
    """Updates over which that pull fades out."""
    probe_transitions: int = 1000
    """The residual stays zero until this many transitions were ingested (PLD's probe)."""
    warmup_ramp: int = 2000
    """Transitions over which the published residual's bound ramps from 0 to delta."""
    publish_every: int = 500
    """Updates between candidate versions."""
    gate: str = "critic"
    """critic: publish only if the critic's estimate is not worse than the deployed version's;
    none: publish every candidate."""
    gate_tolerance: float = 0.02
    """How much lower the candidate's estimate may be than the deployed version's."""
    gate_states: int = 1024
    """Most recent states the gate evaluates on."""
    seed: int = 0
    """Seed of the agent."""


@dataclass
class Candidate:
    """A gated candidate version."""

    version: int
    parent: int
    accepted: bool
    estimate: float
    deployed_estimate: float
    blob: bytes | None


class ResidualLearner:
    def __init__(self, config: LearnerConfig, *, base: ModelMetadata) -> None:
        self.config = config
        self.base_tag = base.tag
        self.obs_dim = base.obs_dim
        self.action_dim = base.action_dim
        checkpoint = Path(config.checkpoint)
        if checkpoint.exists():
            self.agent, self.state = load_learner(checkpoint, seed=config.seed)
            if self.agent.config.obs_dim != self.obs_dim:
                raise LearningError(
                    f"{checkpoint} was trained for obs_dim {self.agent.config.obs_dim}, the "
                    f"base model has {self.obs_dim}"
                )
            self.resumed = True
        else:
            self.agent = ResidualSAC(
                AgentConfig.from_settings(
                    config, obs_dim=self.obs_dim, action_dim=self.action_dim, residual=True
                ),
                seed=config.seed,
            )
            self.state = LearnerState()
            self.resumed = False
        self.rng = np.random.default_rng(config.seed + self.state.version)
        self.online = ReplayBuffer(obs_dim=self.obs_dim, action_dim=self.action_dim)
        self.offline = ReplayBuffer(obs_dim=self.obs_dim, action_dim=self.action_dim)
        self.transitions = 0  # ingested in this process (all shards re-read on start)
        self.updates_owed = 0.0
        self.updates_done = 0
        self._seen: set[str] = set()
        self.bad_shards: dict[str, str] = {}
        self.episodes_by_tag: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.recent_episodes: list[tuple[str, bool]] = []
        self.deployed_layers: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.deployed_scale = 0.0
        self.published: list[dict[str, Any]] = []
        self.gated = 0
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ data
    def ingest(self) -> int:
        """Read new shards; returns the number of transitions added."""
        added = 0
        for path in list_shards(self.config.replay_dir):
            if path.name in self._seen:
                continue
            try:
                data, info = read_shard(path)
            except ReplayError as exc:
                if path.name not in self.bad_shards:
                    self.bad_shards[path.name] = str(exc)
                continue
            self._seen.add(path.name)
            if data.obs_dim != self.obs_dim or data.action_dim != self.action_dim:
                self.bad_shards[path.name] = (
                    f"shard dims {data.obs_dim}/{data.action_dim} do not match the base model"
                )
                continue
            cols = episode_columns(data, gamma=self.config.gamma, nstep=self.config.nstep)
            self.online.add(**cols)
            tags = np.asarray(info.versions, dtype=object)[data.policy_version]
            offline_rows = data.intervention.astype(bool)
            for _, rows in data.episodes():
                tag = str(tags[rows[0]])
                ok = bool(data.success[rows].any())
                counts = self.episodes_by_tag[tag]
                counts[0] += 1
                counts[1] += int(ok)
                self.recent_episodes.append((tag, ok))
                if ok and "+" not in tag and tag != "teleop":
                    offline_rows[rows] = True
            if offline_rows.any():
                self.offline.add(**{k: v[offline_rows] for k, v in cols.items()})
            added += len(data)
        self.recent_episodes = self.recent_episodes[-200:]
        self.transitions += added
        self.state.env_steps = max(self.state.env_steps, self.transitions)
        # Owed = utd per transition, minus what the agent (possibly resumed) already ran.
        self.updates_owed = max(0.0, self.transitions * self.config.utd - self.agent.updates)
        return added

    # ------------------------------------------------------------------ learning
    def train(self, max_updates: int) -> int:
        """Up to ``max_updates`` of the updates owed; returns how many ran."""
        if len(self.online) < self.config.batch_size:
            return 0
        n = int(min(max_updates, self.updates_owed))
        if n and self.agent.updates == 0 and self.config.normalize_obs:
            # Once, before the first update; a resumed agent keeps its statistics.
            self.agent.set_input_stats(self.online.latest("obs", len(self.online)))
        for i in range(n):
            batch = sample_symmetric(self.rng, self.online, self.offline, self.config.batch_size)
            stats = self.agent.update(batch, update_actor=(i % self.config.utd == 0))
        if n:
            self.last_stats = asdict(stats)
        self.updates_owed -= n
        self.updates_done += n
        return n

    def current_scale(self) -> float:
        return warmup_scale(
            self.state.env_steps,
            delta=self.config.delta,
            start=self.config.probe_transitions,
            ramp=self.config.warmup_ramp,
        )

    def propose(self) -> Candidate | None:
        """A gated candidate from the current actor (None while still probing)."""
        scale = self.current_scale()
        if scale <= 0.0 or len(self.online) == 0:
            return None
        self.agent.scale = scale
        layers = self.agent.deployable().layers()
        obs = self.online.latest("obs", self.config.gate_states)
        base = self.online.latest("base", self.config.gate_states)
        estimate = self.agent.value_of(layers, scale, obs, base)
        deployed = self.agent.value_of(self.deployed_layers, self.deployed_scale, obs, base)
        version = self.state.version + 1
        parent = self.state.deployed_version
        accepted = self.config.gate == "none" or estimate >= deployed - self.config.gate_tolerance
        blob = None
        if accepted:
            blob = encode_residual(
                layers=layers,
                model_id=self.config.model_id,
                version=version,
                parent=parent,
                base=self.base_tag,
                obs_dim=self.obs_dim,
                action_dim=self.action_dim,
                uses_base_action=True,
                scale=scale,
                extra={
                    "estimate": f"{estimate:.5f}",
                    "deployed_estimate": f"{deployed:.5f}",
                    "env_steps": str(self.state.env_steps),
                    "updates": str(self.agent.updates),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            self.state.version = version
            self.state.deployed_version = version
            self.deployed_layers = layers
            self.deployed_scale = scale
            self.published.append(
                {
                    "version": version,
                    "parent": parent,
                    "estimate": estimate,
                    "deployed_estimate": deployed,
                    "env_steps": self.state.env_steps,
                }
            )
        else:
            self.gated += 1
        return Candidate(version, parent, accepted, estimate, deployed, blob)

    def adopt_deployed(
        self, version: int, layers: list[tuple[np.ndarray, np.ndarray]], scale: float
    ) -> None:
        """Take a persisted deployed blob as the deployed version (restart after a crash).

        A version number is spent once its blob is persisted, checkpoint or not: the next
        candidate gets a higher one, so no version is ever minted twice.
        """
        self.state.version = max(self.state.version, int(version))
        self.state.deployed_version = int(version)
        self.deployed_layers = layers
        self.deployed_scale = float(scale)

    def save(self) -> None:
        Path(self.config.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        self.state.extra = {
            "deployed_scale": self.deployed_scale,
            "published": self.published[-20:],
        }
        save_learner(self.config.checkpoint, self.agent, self.state)

    def status(self) -> dict[str, Any]:
        recent = self.recent_episodes[-20:]
        return {
            "transitions": self.transitions,
            "env_steps": self.state.env_steps,
            "online": len(self.online),
            "offline": len(self.offline),
            "updates": self.agent.updates,
            "updates_owed": int(self.updates_owed),
            "version": self.state.version,
            "deployed_version": self.state.deployed_version,
            "scale": self.current_scale(),
            "published": len(self.published),
            "gated": self.gated,
            "resumed": self.resumed,
            "bad_shards": len(self.bad_shards),
            "recent_success": (sum(ok for _, ok in recent) / len(recent)) if recent else None,
            "episodes_by_tag": {
                k: {"episodes": v[0], "successes": v[1]} for k, v in self.episodes_by_tag.items()
            },
            "stats": self.last_stats,
        }

    def status_json(self) -> str:
        return json.dumps(self.status(), default=float)


__all__ = ["Candidate", "LearnerConfig", "ResidualLearner"]
