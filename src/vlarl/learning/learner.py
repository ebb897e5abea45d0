"""The learner core: transitions in, residual-actor candidate versions out (ROS-free).

One core for both transports: the ``learner`` node feeds it the replay shards the bag bridge
writes (:meth:`ResidualLearner.ingest`), ``vlarl improve`` / ``vlarl train-residual`` feed it
each finished episode directly (:meth:`ResidualLearner.add`); everything after that is the
same code:

1. :meth:`add` splits an episode into the offline buffer (successful episodes acted by the base
   alone, and every intervention step: HIL-SERL puts those in both buffers) and the online
   buffer (everything), counts episodes and successes per acting version tag, and keeps each
   episode's :class:`EpisodeOutcome` (the tag that acted most, its share of the steps, the
   success flag) for :meth:`take_outcomes` (the graph's deployment gate reads them);
2. :meth:`train` runs the SAC/RLPD updates owed (``utd`` per transition; the actor every
   ``utd``-th update). A learner that cannot keep up says so (``achieved_utd``,
   ``updates_owed``) and forgives debt beyond ``max_owed_updates`` (``updates_forgiven``) instead
   of falling ever further behind;
3. :meth:`propose` turns the averaged actor into a candidate version (a weight blob,
   :mod:`vlarl.core.weights`, with model id, version, parent and digest). The critic only
   pre-screens: a candidate it rates below the deployed version by more than
   ``prescreen_tolerance`` is not proposed. Promotion is decided on robot rollouts by
   :class:`vlarl.learning.gate.DeploymentGate`; :meth:`promote` records the verdict;
4. :meth:`save` checkpoints the agent and the learner's state (safetensors, atomic). A killed
   learner restarted on the same checkpoint and replay folder resumes: the replay shards (rebuilt
   from the bags by the bridge) are re-read, so no transition is lost.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.contract import ModelMetadata
from vlarl.core.weights import encode_residual
from vlarl.data.errors import ReplayError
from vlarl.data.replay import Transitions, list_shards, read_shard
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
from vlarl.learning.runs import arg, nested

PRESCREENS = ("critic", "none")


@dataclass
class LearnerConfig:
    """The learner core's settings, for the graph's node and in-process runs alike; the defaults
    are the tuned recipe. The node's parameters and the verbs' flags are built from these
    fields (``vlarl.nodes.learner.PARAMS``, :func:`vlarl.learning.runs.add_config_arguments`)."""

    agent: AgentConfig = nested(AgentConfig, "the agent's hyper-parameters")  # noqa: RUF009
    utd: int = arg(2, "critic updates per transition (update-to-data ratio)")
    nstep: int = arg(3, "n-step returns in the critic's target")
    normalize_obs: bool = arg(True, "standardise observations with the first data's statistics")
    probe_transitions: int = arg(1000, "the residual stays zero for this many transitions (probe)")
    learning_starts: int = arg(
        500,
        "transitions before the first update; the input statistics come from them (they must "
        "span several layouts: one episode's goal is constant)",
    )
    warmup_ramp: int = arg(2000, "transitions over which the residual bound ramps to delta")
    publish_every: int = arg(100, "updates between candidate versions")
    prescreen: str = arg(
        "critic",
        "critic: a candidate the critic rates below the deployed version by more than "
        "prescreen_tolerance is not proposed | none: every candidate is proposed",
    )
    prescreen_tolerance: float = arg(0.02, "how much lower the candidate's estimate may be")
    prescreen_states: int = arg(1024, "most recent states the pre-screen evaluates on")
    max_probe_extensions: int = arg(
        3, "a probe that found no success is doubled this often before learning starts anyway"
    )
    max_owed_updates: int = arg(
        4000, "update debt beyond this is forgiven and counted (the learner says it fell behind)"
    )
    model_id: str = arg("residual", "model id of the residual versions (tag model_id@version)")
    seed: int = arg(0, "seed of the agent and of batch sampling")

    def __post_init__(self) -> None:
        if self.prescreen not in PRESCREENS:
            raise LearningError(f"prescreen must be one of {', '.join(PRESCREENS)}")
        for name in ("utd", "nstep", "publish_every", "prescreen_states"):
            if getattr(self, name) < 1:
                raise LearningError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.probe_transitions, self.warmup_ramp, self.max_owed_updates) < 0:
            raise LearningError("probe_transitions, warmup_ramp, max_owed_updates must be >= 0")
        if self.learning_starts < 0:
            raise LearningError(f"learning_starts must be >= 0, got {self.learning_starts}")


@dataclass(frozen=True)
class EpisodeOutcome:
    """One added episode as a deployment gate sees it."""

    tag: str  # the version tag that acted in most of its steps
    share: float  # the share of its steps that tag acted in (1.0: one version throughout)
    success: bool  # the episode's success flag (the reward node's judgement in the graph)


OUTCOMES_KEPT = 10_000  # outcomes not taken are dropped oldest first beyond this


@dataclass
class Candidate:
    """A candidate version (``blob`` None when the critic's pre-screen refused it)."""

    version: int
    parent: int
    accepted: bool
    estimate: float
    deployed_estimate: float
    blob: bytes | None
    layers: list[tuple[np.ndarray, np.ndarray]] | None = None
    scale: float = 0.0

    @property
    def tag(self) -> str:
        return f"@{self.version}"


def base_of(tag: str) -> str:
    """The base a replay version tag names (``base@v`` of ``base@v+residual@N``); '' for tags
    that name none (``teleop``, ``hold:<reason>``)."""
    head = tag.split("+", 1)[0]
    return head if "@" in head else ""


def other_base(tag: str, base_tag: str) -> bool:
    """Whether ``tag`` names a base other than ``base_tag``."""
    named = base_of(tag)
    return bool(named) and named != base_tag


class ResidualLearner:
    def __init__(
        self,
        config: LearnerConfig,
        *,
        base: ModelMetadata,
        checkpoint: str | Path | None = None,
        replay_dir: str | Path | None = None,
        base_only: bool = False,
    ) -> None:
        self.config = config
        # Only episodes acted on this base (see :meth:`add`); the others are counted.
        self.base_only = base_only
        self.foreign_transitions = 0
        self.base_tag = base.tag
        self.obs_dim = base.obs_dim
        self.action_dim = base.action_dim
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.replay_dir = Path(replay_dir) if replay_dir else None
        if self.checkpoint is not None and self.checkpoint.exists():
            self.agent, self.state = load_learner(self.checkpoint, seed=config.seed)
            if self.agent.config.obs_dim != self.obs_dim:
                raise LearningError(
                    f"{self.checkpoint} was trained for obs_dim {self.agent.config.obs_dim}, "
                    f"the base model has {self.obs_dim}"
                )
            trained_on = self.state.extra.get("base", self.base_tag)
            if trained_on != self.base_tag:
                raise LearningError(
                    f"{self.checkpoint} is a residual of {trained_on}, not of {self.base_tag}: "
                    "a new base starts a fresh residual learner (use another checkpoint)"
                )
            self.resumed = True
        else:
            agent_config = replace(
                config.agent, obs_dim=self.obs_dim, action_dim=self.action_dim, residual=True
            )
            self.agent = ResidualSAC(agent_config, seed=config.seed)
            self.state = LearnerState()
            self.resumed = False
        self.rng = np.random.default_rng(config.seed + self.state.version)
        self.online = ReplayBuffer(obs_dim=self.obs_dim, action_dim=self.action_dim)
        self.offline = ReplayBuffer(obs_dim=self.obs_dim, action_dim=self.action_dim)
        self.transitions = 0  # added in this process (all shards are re-read on start)
        self.updates_owed = 0.0
        self.updates_done = 0  # in this process
        self.updates_forgiven = 0
        self._seen: set[str] = set()
        self.bad_shards: dict[str, str] = {}
        self.episodes_by_tag: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.recent_episodes: list[tuple[str, bool]] = []
        self.outcomes: deque[EpisodeOutcome] = deque(maxlen=OUTCOMES_KEPT)
        self.deployed_layers: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.deployed_scale = float(self.state.extra.get("deployed_scale", 0.0))
        self.published: list[dict[str, Any]] = list(self.state.extra.get("published", []))
        self.gated = 0
        self.last_stats: dict[str, float] = {}
        self.probe_transitions = config.probe_transitions  # extended while nothing succeeds
        self.probe_extensions = 0
        self.notes: list[str] = []

    # ------------------------------------------------------------------ data
    def ingest(self) -> int:
        """Read the replay folder's new shards; returns the number of transitions added."""
        if self.replay_dir is None:
            raise LearningError("this learner has no replay folder to ingest (use add())")
        added = 0
        for path in list_shards(self.replay_dir):
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
            added += self.add(data, info.versions)
        return added

    def add(self, data: Transitions, versions: Sequence[str]) -> int:
        """Add whole episodes (``data.policy_version`` indexes ``versions``, the tags that
        acted); returns the number of transitions added.

        With ``base_only`` an episode in which any step names another base (the part of its tag
        before ``+``: ``base@v`` or ``base@v+residual@N``) is left out and counted in
        ``foreign_transitions``: its base actions are another policy's. Steps that name no base
        (``teleop``, ``hold:<reason>``) do not decide.
        """
        if self.base_only and len(data):
            data = self._own_base(data, versions)
        if len(data) == 0:
            return 0
        cols = episode_columns(data, gamma=self.config.agent.gamma, nstep=self.config.nstep)
        self.online.add(**cols)
        names = np.asarray(list(versions), dtype=object)
        tags = names[data.policy_version]
        offline_rows = data.intervention.astype(bool)
        for _, rows in data.episodes():
            tag = str(tags[rows[0]])
            ok = bool(data.success[rows].any())
            counts = self.episodes_by_tag[tag]
            counts[0] += 1
            counts[1] += int(ok)
            self.recent_episodes.append((tag, ok))
            acted, steps = np.unique(data.policy_version[rows], return_counts=True)
            most = int(np.argmax(steps))
            self.outcomes.append(
                EpisodeOutcome(str(names[acted[most]]), float(steps[most] / len(rows)), ok)
            )
            if ok and "+" not in tag and tag != "teleop":
                offline_rows[rows] = True
        if offline_rows.any():
            self.offline.add(**{k: v[offline_rows] for k, v in cols.items()})
        self.recent_episodes = self.recent_episodes[-200:]
        self.transitions += len(data)
        self.state.env_steps = max(self.state.env_steps, self.transitions)
        self._extend_probe_without_success()
        # Owed = utd per transition, minus what the agent (possibly resumed) already ran and
        # what was forgiven.
        learnable = max(0, self.transitions - self.config.learning_starts)
        owed = learnable * self.config.utd - self.agent.updates - self.updates_forgiven
        if owed > self.config.max_owed_updates:
            self.updates_forgiven += int(owed - self.config.max_owed_updates)
            owed = self.config.max_owed_updates
        self.updates_owed = max(0.0, float(owed))
        return len(data)

    def _own_base(self, data: Transitions, versions: Sequence[str]) -> Transitions:
        """The episodes of ``data`` that no step of another base acted in."""
        foreign = np.array([other_base(str(t), self.base_tag) for t in versions], dtype=bool)
        bad_rows = foreign[data.policy_version]
        if not bad_rows.any():
            return data
        keep = np.ones(len(data), dtype=bool)
        for _, rows in data.episodes():
            if bad_rows[rows].any():
                keep[rows] = False
        self.foreign_transitions += int((~keep).sum())
        return data.select(keep)

    def take_outcomes(self) -> list[EpisodeOutcome]:
        """The outcomes of the episodes added since the last call, oldest first."""
        out = list(self.outcomes)
        self.outcomes.clear()
        return out

    # ------------------------------------------------------------------ learning
    def train(self, max_updates: int) -> int:
        """Up to ``max_updates`` of the updates owed; returns how many ran."""
        if len(self.online) < self.config.agent.batch_size:
            return 0
        if self.agent.updates == 0 and len(self.online) < self.config.learning_starts:
            return 0
        n = int(min(max_updates, self.updates_owed))
        if n and self.agent.updates == 0 and self.config.normalize_obs:
            # Once, before the first update; a resumed agent keeps its statistics.
            self.agent.set_input_stats(self.online.latest("obs", len(self.online)))
        self.agent.scale = self.current_scale()
        batch_size = self.config.agent.batch_size
        for _ in range(n):
            batch = sample_symmetric(self.rng, self.online, self.offline, batch_size)
            # The actor every utd-th update (the critic runs utd times per actor step).
            stats = self.agent.update(batch, update_actor=self.agent.updates % self.config.utd == 0)
        if n:
            self.last_stats = asdict(stats)
        self.updates_owed -= n
        self.updates_done += n
        return n

    def achieved_utd(self) -> float:
        """Updates run per transition added, in this process."""
        return self.updates_done / self.transitions if self.transitions else 0.0

    def _extend_probe_without_success(self) -> None:
        """A probe that ends with an empty offline buffer (no success of the base alone, no
        intervention) would start RL with nothing to anchor it: probe longer, and say so."""
        probe = max(self.probe_transitions, self.config.probe_transitions)
        while (
            self.state.env_steps > probe
            and len(self.offline) == 0
            and self.probe_extensions < self.config.max_probe_extensions
            and self.state.deployed_version == 0
        ):
            self.probe_transitions = 2 * probe
            self.probe_extensions += 1
            note = (
                f"probe found no success in {probe} transitions: extended to "
                f"{self.probe_transitions} ({self.probe_extensions}/"
                f"{self.config.max_probe_extensions})"
            )
            self.notes.append(note)
            print(f"learner: {note}", flush=True)
            probe = self.probe_transitions

    def current_scale(self) -> float:
        return warmup_scale(
            self.state.env_steps,
            delta=self.config.agent.delta,
            start=max(self.probe_transitions, self.config.probe_transitions),
            ramp=self.config.warmup_ramp,
        )

    def propose(self) -> Candidate | None:
        """A pre-screened candidate from the averaged actor (None while still probing).

        A candidate that passes the pre-screen takes the next version number; it is deployed
        only when :meth:`promote` is called with it (after the gate's verdict).
        """
        scale = self.current_scale()
        if scale <= 0.0 or len(self.online) == 0:
            return None
        self.agent.scale = scale
        layers = self.agent.deployable().layers()
        obs = self.online.latest("obs", self.config.prescreen_states)
        base = self.online.latest("base", self.config.prescreen_states)
        estimate = self.agent.value_of(layers, scale, obs, base)
        deployed = self.agent.value_of(self.deployed_layers, self.deployed_scale, obs, base)
        version = self.state.version + 1
        parent = self.state.deployed_version
        accepted = (
            self.config.prescreen == "none"
            or estimate >= deployed - self.config.prescreen_tolerance
        )
        if not accepted:
            self.gated += 1
            return Candidate(version, parent, False, estimate, deployed, None)
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
        return Candidate(version, parent, True, estimate, deployed, blob, layers, scale)

    def promote(self, candidate: Candidate, *, verdict: dict[str, Any] | None = None) -> None:
        """Record ``candidate`` as the deployed version (the gate promoted it)."""
        if candidate.layers is None:
            raise LearningError(f"candidate {candidate.version} was refused by the pre-screen")
        self.state.deployed_version = candidate.version
        self.deployed_layers = candidate.layers
        self.deployed_scale = candidate.scale
        self.published.append(
            {
                "version": candidate.version,
                "parent": candidate.parent,
                "estimate": candidate.estimate,
                "deployed_estimate": candidate.deployed_estimate,
                "env_steps": self.state.env_steps,
                "verdict": verdict,
            }
        )

    def save(self, path: str | Path | None = None) -> None:
        target = Path(path) if path else self.checkpoint
        if target is None:
            raise LearningError("no checkpoint path to save the learner to")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.state.extra = {
            "base": self.base_tag,
            "deployed_scale": self.deployed_scale,
            "published": self.published[-20:],
        }
        save_learner(target, self.agent, self.state)

    def status(self) -> dict[str, Any]:
        recent = self.recent_episodes[-20:]
        return {
            "base": self.base_tag,
            "transitions": self.transitions,
            "env_steps": self.state.env_steps,
            "online": len(self.online),
            "offline": len(self.offline),
            "updates": self.agent.updates,
            "updates_owed": int(self.updates_owed),
            "updates_forgiven": self.updates_forgiven,
            "utd": self.config.utd,
            "achieved_utd": round(self.achieved_utd(), 3),
            "version": self.state.version,
            "deployed_version": self.state.deployed_version,
            "scale": self.current_scale(),
            "published": len(self.published),
            "gated": self.gated,
            "resumed": self.resumed,
            "bad_shards": len(self.bad_shards),
            "foreign_transitions": self.foreign_transitions,
            "probe_transitions": max(self.probe_transitions, self.config.probe_transitions),
            "notes": self.notes[-5:],
            "recent_success": (sum(ok for _, ok in recent) / len(recent)) if recent else None,
            "episodes_by_tag": {
                k: {"episodes": v[0], "successes": v[1]} for k, v in self.episodes_by_tag.items()
            },
            "stats": self.last_stats,
        }

    def status_json(self) -> str:
        return json.dumps(self.status(), default=float)


__all__ = [
    "Candidate",
    "EpisodeOutcome",
    "LearnerConfig",
    "ResidualLearner",
    "base_of",
    "other_base",
]
