"""Residual RL: PLD stage 1 with RLPD, ROS-free (the learner node and the benchmark drive it).

The base policy is frozen. A small Gaussian actor proposes a residual ``r = scale * tanh(u)``
on top of the base action (``scale`` grows from 0 to ``delta`` over a warm-up, PLD's
schedule); safety clamps ``r`` to ``[-delta, delta]`` again. Training is SAC with automatic
entropy and RLPD's recipe:

- a critic ensemble whose members have LayerNorm after every hidden layer; the TD target takes
  the minimum over a random subset of the target critics (REDQ/RLPD);
- an update-to-data ratio above one (``utd`` critic updates per environment step);
- symmetric sampling: half of every batch from the offline buffer (the base policy's successful
  rollouts and demonstrations), half from the online buffer;
- optionally a conservative start (Cal-QL: a CQL regulariser whose push-down is bounded below by
  the Monte-Carlo return of the data) for the first ``calql_steps`` updates.

What made it stable on the shifted robot (bench/learning.py; without these the deterministic
policy swung between 0.85 and 0.0 success from one checkpoint to the next):

- n-step returns (``episode_columns(nstep=3)``): a sparse success reward reaches the early,
  decisive steps (the approach that misses the grasp) in a third of the updates;
- inputs standardised with the first rollouts' statistics (the 2 cm the shift costs is tiny next
  to raw positions); folded into the first layer on export, so the deployed MLP is unchanged;
- a small initial temperature and a slower actor (1e-4): a residual that starts near-uniform
  in [-delta, delta] mostly teaches the critic about failures;
- a pessimistic actor objective, mean - 0.5 std of the ensemble's Q: the actor no longer
  follows one critic's optimism into residuals the data never tried (the collapses were a
  large upward dz and gripper residual the critics extrapolated to).
- a stronger early pull toward the base (0.5, fading over 8k updates) and a Polyak-averaged
  copy of the actor (rate 0.002) as the deployed policy: the greedy policy of the live actor
  still swings between updates, its average does much less.

The critic sees (observation, base action, residual / delta); the residual it learns from is
always the one the robot executed, ``clip((command - base) / delta, -1, 1)``, so teleoperated
steps (interventions) and safety-clamped steps teach it what actually happened. With
``residual=False`` the same code is a residual-free SAC/RLPD learner over the full action
(the benchmark's ablation).

The deployable actor (the mean path ``scale * tanh(mean)``, ReLU MLP) is exported as layers for
:class:`vlarl.core.residual.MLPResidual`, bit-for-bit the network the policy node runs.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

from vlarl.core.safety import SafetyConfig
from vlarl.data.errors import ReplayError
from vlarl.data.replay import Transitions, atomic_write_bytes, header_metadata, tensor_digest
from vlarl.learning.errors import LearningError
from vlarl.learning.runs import arg

CHECKPOINT_FORMAT = "vlarl.residual_learner/1"
SAFETY_DELTA = SafetyConfig().delta  # one source: the safety node's default bound


@dataclass
class AgentConfig:
    """Hyper-parameters of the residual SAC/RLPD agent; the defaults are the tuned recipe
    (bench/results/learning.json). The learner node's parameters, ``vlarl improve`` and
    ``vlarl train-residual`` flags are built from these fields."""

    obs_dim: int = arg(39, "observation size (set from the base model's contract)")
    action_dim: int = arg(4, "action size (set from the base model's contract)")
    residual: bool = arg(True, "a residual on a frozen base (PLD); false: SAC over the action")
    delta: float = arg(SAFETY_DELTA, "residual bound; must equal the safety node's delta")
    hidden: int = arg(128, "width of every hidden layer (actor and critics)")
    actor_layers: int = arg(2, "hidden layers of the actor (ReLU, exportable to MLPResidual)")
    critics: int = arg(4, "critic ensemble size (LayerNorm critics)")
    critic_subset: int = arg(2, "TD target = min over this many random target critics")
    gamma: float = arg(0.99, "discount")
    tau: float = arg(0.005, "Polyak rate of the target critics")
    lr: float = arg(3e-4, "Adam learning rate of critics and temperature")
    actor_lr: float = arg(1e-4, "Adam learning rate of the actor (0 = lr)")
    batch_size: int = arg(128, "transitions per update (half offline, half online)")
    init_temperature: float = arg(0.001, "initial SAC entropy temperature")
    target_entropy: float = arg(0.0, "entropy target (0 = -action_dim)")
    calql_alpha: float = arg(0.0, "weight of the Cal-QL regulariser (0 = off)")
    calql_steps: int = arg(0, "updates that use the Cal-QL regulariser (conservative start)")
    actor_init_scale: float = arg(0.01, "scale of the actor's output layer at init")
    bc_weight: float = arg(0.5, "PAC-style pull of the residual toward zero at the start")
    bc_decay_updates: int = arg(8_000, "updates over which that pull fades to bc_floor")
    bc_floor: float = arg(0.0, "the pull's weight after it has faded")
    actor_ema: float = arg(
        0.0, "Polyak rate of an averaged actor deployed instead of the live one (0 = off)"
    )
    actor_pessimism: float = arg(0.5, "the actor maximises mean - this * std of the critics' Q")

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> AgentConfig:
        """The agent's hyper-parameters from a learner or run config: every field of this
        class that ``settings`` also has (same name), then ``overrides``."""
        names = {f.name for f in fields(cls)}
        values = {n: getattr(settings, n) for n in names if hasattr(settings, n)}
        return cls(**{**values, **overrides})

    @property
    def actor_in(self) -> int:
        return self.obs_dim + (self.action_dim if self.residual else 0)

    @property
    def critic_in(self) -> int:
        return self.actor_in + self.action_dim


class CriticEnsemble(nn.Module):
    """``n`` independent Q networks evaluated in one batched pass (LayerNorm + ReLU)."""

    def __init__(self, in_dim: int, hidden: int, n: int, layers: int = 2) -> None:
        super().__init__()
        self.n = n
        dims = [in_dim] + [hidden] * layers + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.ln_w = nn.ParameterList()
        self.ln_b = nn.ParameterList()
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            w = torch.empty(n, a, b)
            for k in range(n):
                nn.init.kaiming_uniform_(w[k].T, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(a)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-bound, bound)))
            if i < layers:
                self.ln_w.append(nn.Parameter(torch.ones(n, 1, b)))
                self.ln_b.append(nn.Parameter(torch.zeros(n, 1, b)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in] -> Q [n, B]."""
        h = x.unsqueeze(0).expand(self.n, -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.layer_norm(h, h.shape[-1:]) * self.ln_w[i] + self.ln_b[i]
                h = F.relu(h)
        return h.squeeze(-1)


class GaussianActor(nn.Module):
    """A tanh-Gaussian actor with a ReLU trunk; its mean path is what gets deployed."""

    # Buffers registered in __init__ (declared here so they type as tensors, not Tensor | Module).
    in_mean: torch.Tensor
    in_std: torch.Tensor

    def __init__(self, in_dim: int, action_dim: int, hidden: int, layers: int, init_scale: float):
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.mean = nn.Linear(dims[-1], action_dim)
        self.log_std = nn.Linear(dims[-1], action_dim)
        # Input standardisation (identity until set_input_stats); folded into the first layer
        # on export, so the deployed MLP takes raw inputs.
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        with torch.no_grad():
            self.mean.weight.mul_(init_scale)
            self.mean.bias.zero_()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) / self.in_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(x)
        for layer in self.trunk:
            x = F.relu(layer(x))
        log_std = torch.tanh(self.log_std(x))  # squashed into [-5, 2]
        return self.mean(x), -5.0 + 3.5 * (log_std + 1.0)

    def sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised tanh-squashed sample in [-1, 1] and its log-probability."""
        mean, log_std = self(x)
        std = log_std.exp()
        pre = mean + std * torch.randn_like(mean)
        u = torch.tanh(pre)
        logp = (-0.5 * ((pre - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2.0 * (math.log(2.0) - pre - F.softplus(-2.0 * pre))).sum(-1)
        return u, logp

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(W [in, out], b [out]) for the trunk and the mean head (MLPResidual's layout).

        The input standardisation is folded into the first layer:
        ``((x - m) / s) W + b = x (W / s) + (b - (m / s) W)``.
        """
        out = []
        for i, lin in enumerate([*self.trunk, self.mean]):
            w = lin.weight.detach().T.double()
            b = lin.bias.detach().double()
            if i == 0:
                scale = self.in_std.double().unsqueeze(1)
                b = b - (self.in_mean.double() / self.in_std.double()) @ w
                w = w / scale
            out.append(
                (
                    w.contiguous().numpy().astype(np.float32),
                    b.numpy().astype(np.float32).copy(),
                )
            )
        return out


class ActorSnapshot(NamedTuple):
    """A frozen actor version and the bound it acts with."""

    actor: GaussianActor
    scale: float


class ReplayBuffer:
    """A growing in-memory buffer of transitions (numpy), with the next base action."""

    def __init__(self, *, obs_dim: int, action_dim: int, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self.size = 0
        self._cols = {
            "obs": np.zeros((capacity, obs_dim), np.float32),
            "base": np.zeros((capacity, action_dim), np.float32),
            "action": np.zeros((capacity, action_dim), np.float32),
            "reward": np.zeros(capacity, np.float32),
            "done": np.zeros(capacity, np.float32),
            "next_obs": np.zeros((capacity, obs_dim), np.float32),
            "next_base": np.zeros((capacity, action_dim), np.float32),
            "mc_return": np.zeros(capacity, np.float32),
            "discount": np.zeros(capacity, np.float32),
        }

    def __len__(self) -> int:
        return self.size

    def add(self, **columns: np.ndarray) -> None:
        n = len(columns["obs"])
        if n == 0:
            return
        if self.size + n > self.capacity:
            raise LearningError(f"replay buffer full ({self.capacity} transitions)")
        for name, arr in self._cols.items():
            arr[self.size : self.size + n] = columns[name]
        self.size += n

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        idx = rng.integers(0, self.size, size=n)
        return {k: v[idx] for k, v in self._cols.items()}

    def latest(self, name: str, n: int) -> np.ndarray:
        """The newest ``n`` rows of one column (a view)."""
        return self._cols[name][max(0, self.size - n) : self.size]


def sample_symmetric(
    rng: np.random.Generator, online: ReplayBuffer, offline: ReplayBuffer, n: int
) -> dict[str, np.ndarray]:
    """RLPD's batch: half online, half offline (all online while the offline buffer is empty)."""
    if len(offline) == 0:
        return online.sample(rng, n)
    a = online.sample(rng, n // 2)
    b = offline.sample(rng, n - n // 2)
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def episode_columns(
    data: Transitions,
    *,
    reward: np.ndarray | None = None,
    gamma: float,
    nstep: int = 1,
) -> dict[str, np.ndarray]:
    """Buffer columns for whole episodes of ``data`` (rows in step order within an episode).

    ``next_base`` is the base action of the following step (the one that answered next_obs);
    for an episode's last row it repeats the row's own base action. ``done`` is the terminal
    flag (truncation bootstraps). ``mc_return`` is the discounted return-to-go (for Cal-QL).

    With ``nstep`` > 1 each row carries an n-step return: ``reward`` sums the discounted
    rewards of the next ``m = min(nstep, steps left)`` steps, ``next_obs``/``next_base``/``done``
    are those of the m-th step and ``discount`` is ``gamma ** m`` (the bootstrap's weight).
    """
    if nstep < 1:
        raise LearningError(f"nstep must be >= 1, got {nstep}")
    rewards = data.reward if reward is None else np.asarray(reward, np.float32)
    n = len(data)
    next_base_1 = data.base_action.copy()
    mc = np.zeros(n, np.float32)
    ret = np.zeros(n, np.float32)
    done = np.zeros(n, np.float32)
    discount = np.full(n, gamma, np.float32)
    next_obs = data.next_obs.copy()
    next_base = data.base_action.copy()
    for _, rows in data.episodes():
        rows = rows[np.argsort(data.step[rows], kind="stable")]
        if len(rows) > 1:
            next_base_1[rows[:-1]] = data.base_action[rows[1:]]
        g = 0.0
        for r in rows[::-1]:
            g = float(rewards[r]) + gamma * g
            mc[r] = g
        length = len(rows)
        for i, r in enumerate(rows):
            m = min(nstep, length - i)
            window = rows[i : i + m]
            ret[r] = float(np.dot(gamma ** np.arange(m), rewards[window]))
            last = window[-1]
            done[r] = float(data.terminal[last])
            discount[r] = gamma**m
            next_obs[r] = data.next_obs[last]
            next_base[r] = next_base_1[last]
    return {
        "obs": data.obs,
        "base": data.base_action,
        "action": data.action,
        "reward": ret,
        "done": done,
        "next_obs": next_obs,
        "next_base": next_base,
        "mc_return": mc,
        "discount": discount,
    }


@dataclass
class UpdateStats:
    critic_loss: float = 0.0
    actor_loss: float = 0.0
    alpha: float = 0.0
    q_mean: float = 0.0
    entropy: float = 0.0
    calql: float = 0.0


class ResidualSAC:
    """The agent: actor, critic ensemble, targets, temperature, and their optimisers."""

    def __init__(self, config: AgentConfig, *, seed: int = 0) -> None:
        self.config = config
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        c = config
        self.actor = GaussianActor(
            c.actor_in, c.action_dim, c.hidden, c.actor_layers, c.actor_init_scale
        )
        self.critics = CriticEnsemble(c.critic_in, c.hidden, c.critics)
        self.target = CriticEnsemble(c.critic_in, c.hidden, c.critics)
        self.target.load_state_dict(self.critics.state_dict())
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.actor_avg = copy.deepcopy(self.actor).requires_grad_(False) if c.actor_ema else None
        self.log_alpha = torch.tensor(math.log(c.init_temperature), requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr or c.lr)
        self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=c.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=c.lr)
        self.target_entropy = c.target_entropy or -float(c.action_dim)
        self.updates = 0
        self.scale = 0.0 if c.residual else 1.0  # output bound of the acting residual
        self._in = np.zeros(c.actor_in, np.float32)

    # ------------------------------------------------------------------ acting
    def act(
        self,
        obs: np.ndarray,
        base: np.ndarray,
        *,
        explore: bool,
        snapshot: ActorSnapshot | None = None,
    ) -> np.ndarray:
        """The residual (or, residual-free, the action) for one step, within [-scale, scale].

        ``snapshot``: act with a frozen earlier version (the deployed one) instead of the
        actor being trained.
        """
        c = self.config
        actor, scale = (self.actor, self.scale) if snapshot is None else snapshot
        x = self._in
        x[: c.obs_dim] = obs
        if c.residual:
            x[c.obs_dim :] = base
        with torch.no_grad():
            xt = torch.from_numpy(x).unsqueeze(0)
            if explore:
                u, _ = actor.sample(xt)
            else:
                u = torch.tanh(actor(xt)[0])
        return (u[0].numpy().astype(np.float64)) * scale

    def snapshot(self) -> ActorSnapshot:
        """A frozen copy of the actor and its current bound."""
        return ActorSnapshot(copy.deepcopy(self.actor).requires_grad_(False), self.scale)

    def deployable(self) -> GaussianActor:
        """The actor to deploy: the averaged copy when there is one, else the actor."""
        return self.actor if self.actor_avg is None else self.actor_avg

    def set_input_stats(self, obs: np.ndarray, *, min_std: float = 1e-2) -> None:
        """Standardise the observation part of actor and critic inputs with these samples'
        mean and std (floored at ``min_std``); the base action part stays as it is."""
        obs = np.asarray(obs, np.float64)
        if obs.ndim != 2 or obs.shape[1] != self.config.obs_dim or len(obs) < 2:
            raise LearningError(f"need [n >= 2, {self.config.obs_dim}] observations")
        if not np.isfinite(obs).all():
            raise LearningError("observations for input statistics are not finite")
        with torch.no_grad():
            d = self.config.obs_dim
            self.actor.in_mean[:d] = torch.from_numpy(obs.mean(0)).float()
            self.actor.in_std[:d] = torch.from_numpy(np.maximum(obs.std(0), min_std)).float()
            if self.actor_avg is not None:
                self.actor_avg.in_mean.copy_(self.actor.in_mean)
                self.actor_avg.in_std.copy_(self.actor.in_std)

    def _actor_input(self, obs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return torch.cat([obs, base], -1) if self.config.residual else obs

    def _critic_action(self, base: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The executed residual / delta (residual) or the executed action (residual-free)."""
        if not self.config.residual:
            return action
        return np.clip((action - base) / self.config.delta, -1.0, 1.0)

    # ------------------------------------------------------------------ learning
    def update(
        self,
        batch: Mapping[str, np.ndarray],
        *,
        update_actor: bool = True,
    ) -> UpdateStats:
        c = self.config
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        act = torch.from_numpy(
            self._critic_action(batch["base"], batch["action"]).astype(np.float32)
        )
        x = self._actor_input(t["obs"], t["base"])
        nx = self._actor_input(t["next_obs"], t["next_base"])
        alpha = self.log_alpha.exp().detach()
        # The actor's u means a residual of scale * u; in the critic's units that is
        # (scale / delta) * u.
        unit = self.scale / c.delta if c.residual else 1.0
        with torch.no_grad():
            nu, nlogp = self.actor.sample(nx)
            subset = self.rng.choice(c.critics, size=c.critic_subset, replace=False)
            q_next = self.target(torch.cat([self.actor.normalize(nx), nu * unit], -1))
            q_next = q_next[torch.from_numpy(subset)]
            q_next = q_next.min(0).values - alpha * nlogp
            discount = t.get("discount", c.gamma)
            y = t["reward"] + discount * (1.0 - t["done"]) * q_next
        xn = self.actor.normalize(x)  # the critics see standardised inputs too
        q = self.critics(torch.cat([xn, act], -1))
        critic_loss = ((q - y.unsqueeze(0)) ** 2).mean(1).sum()
        stats = UpdateStats(q_mean=float(q.detach().mean()))
        if c.calql_alpha > 0 and self.updates < c.calql_steps:
            # Cal-QL: push down Q of policy/random actions, but not below the data's MC return;
            # push up Q of the data's actions.
            with torch.no_grad():
                pu, _ = self.actor.sample(x)
                ru = torch.empty_like(pu).uniform_(-1, 1)
            q_pi = self.critics(torch.cat([xn, pu * unit], -1))
            q_rand = self.critics(torch.cat([xn, ru], -1))
            q_pi = torch.maximum(q_pi, t["mc_return"].unsqueeze(0))
            push_down = torch.logsumexp(torch.stack([q_pi, q_rand]), 0)
            reg = (push_down - q).mean(1).sum()
            critic_loss = critic_loss + c.calql_alpha * reg
            stats.calql = float(reg)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        with torch.no_grad():
            for p, tp in zip(self.critics.parameters(), self.target.parameters(), strict=True):
                tp.lerp_(p, c.tau)
        stats.critic_loss = float(critic_loss.detach()) / c.critics
        if update_actor:
            u, logp = self.actor.sample(x)
            q_all = self.critics(torch.cat([xn, u * unit], -1))
            q_pi = q_all.mean(0)
            if c.actor_pessimism > 0.0:
                q_pi = q_pi - c.actor_pessimism * q_all.std(0)
            actor_loss = (alpha * logp - q_pi).mean()
            fade = max(0.0, 1.0 - self.updates / max(1, c.bc_decay_updates))
            bc = c.bc_floor + (c.bc_weight - c.bc_floor) * fade
            if bc > 0.0:
                mean_u = torch.tanh(self.actor(x)[0])
                actor_loss = actor_loss + bc * (mean_u**2).sum(-1).mean()
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            if self.actor_avg is not None:
                with torch.no_grad():
                    for p, ap in zip(
                        self.actor.parameters(), self.actor_avg.parameters(), strict=True
                    ):
                        ap.lerp_(p, c.actor_ema)
            alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()
            stats.actor_loss = float(actor_loss.detach())
            stats.entropy = float(-logp.detach().mean())
        stats.alpha = float(self.log_alpha.detach().exp())
        self.updates += 1
        return stats

    # ------------------------------------------------------------------ gate
    def value_of(
        self,
        layers: list[tuple[np.ndarray, np.ndarray]] | None,
        scale: float,
        obs: np.ndarray,
        base: np.ndarray,
    ) -> float:
        """Off-policy estimate: mean ensemble Q of a deterministic residual on these states.

        ``layers`` None means the zero residual. The gate compares a candidate with the
        deployed version under the same critic on the same recent states.
        """
        c = self.config
        with torch.no_grad():
            o = torch.from_numpy(obs.astype(np.float32))
            b = torch.from_numpy(base.astype(np.float32))
            x = self._actor_input(o, b)
            if layers is None:
                u = torch.zeros(len(o), c.action_dim)
            else:
                h = x
                for i, (w, bias) in enumerate(layers):
                    h = h @ torch.from_numpy(w) + torch.from_numpy(bias)
                    if i < len(layers) - 1:
                        h = F.relu(h)
                u = torch.tanh(h) * (scale / c.delta if c.residual else 1.0)
            return float(self.critics(torch.cat([self.actor.normalize(x), u], -1)).mean())

    # ------------------------------------------------------------------ persistence
    def _modules_to_save(self) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = [
            ("actor.", self.actor),
            ("critics.", self.critics),
            ("target.", self.target),
        ]
        if self.actor_avg is not None:
            out.append(("actor_avg.", self.actor_avg))
        return out

    def state_tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for prefix, module in self._modules_to_save():
            for k, v in module.state_dict().items():
                out[prefix + k] = v.detach().contiguous().numpy().copy()
        out["log_alpha"] = self.log_alpha.detach().reshape(1).numpy().copy()
        for name, opt in (
            ("actor_opt", self.actor_opt),
            ("critic_opt", self.critic_opt),
            ("alpha_opt", self.alpha_opt),
        ):
            for pid, st in opt.state_dict()["state"].items():
                for key, val in st.items():
                    arr = val.detach().numpy() if torch.is_tensor(val) else np.asarray(val)
                    out[f"{name}.{pid}.{key}"] = (
                        np.asarray(arr, np.float32)
                        .reshape(arr.shape if np.ndim(arr) else (1,))
                        .copy()
                    )
        return out

    def load_state_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        for prefix, module in self._modules_to_save():
            state = {
                k[len(prefix) :]: torch.from_numpy(v.copy())
                for k, v in tensors.items()
                if k.startswith(prefix)
            }
            module.load_state_dict(state, strict=True)
        with torch.no_grad():
            self.log_alpha.copy_(torch.from_numpy(tensors["log_alpha"].copy()).reshape(()))
        for name, opt in (
            ("actor_opt", self.actor_opt),
            ("critic_opt", self.critic_opt),
            ("alpha_opt", self.alpha_opt),
        ):
            sd = opt.state_dict()
            params = [p for group in opt.param_groups for p in group["params"]]
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for key, val in tensors.items():
                if key.startswith(name + "."):
                    _, pid, field_name = key.split(".", 2)
                    v = torch.from_numpy(val.copy())
                    # step is a scalar; exp_avg/exp_avg_sq take the parameter's shape (scalars
                    # were saved as [1]).
                    shape = () if field_name == "step" else params[int(pid)].shape
                    v = v.reshape(shape)
                    opt_state.setdefault(int(pid), {})[field_name] = v
            sd["state"] = opt_state
            opt.load_state_dict(sd)


@dataclass
class LearnerState:
    """What a checkpoint restores besides the networks."""

    env_steps: int = 0
    version: int = 0
    deployed_version: int = 0
    ingested: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def save_learner(path: str | Path, agent: ResidualSAC, state: LearnerState) -> str:
    """Write agent + state atomically as safetensors (overwrites the previous checkpoint)."""
    tensors = agent.state_tensors()
    digest = tensor_digest(tensors)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(asdict(agent.config)),
        "state": json.dumps(asdict(state), default=str),
        "updates": str(agent.updates),
        "scale": repr(agent.scale),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sha256": digest,
    }
    atomic_write_bytes(Path(path), st_save(tensors, metadata=meta), overwrite=True)
    return digest


def load_learner(path: str | Path, *, seed: int = 0) -> tuple[ResidualSAC, LearnerState]:
    """Read and verify a learner checkpoint; :class:`LearningError` says what is wrong."""
    where = str(path)
    try:
        payload = Path(path).read_bytes()
        meta = header_metadata(payload, where)
    except (OSError, ReplayError) as exc:
        raise LearningError(f"{where}: cannot read learner checkpoint ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise LearningError(f"{where}: format {meta.get('format')!r} is not {CHECKPOINT_FORMAT}")
    try:
        tensors = st_load(payload)
    except Exception as exc:
        raise LearningError(f"{where}: truncated or corrupt checkpoint ({exc})") from None
    if tensor_digest(tensors) != meta.get("sha256"):
        raise LearningError(f"{where}: sha256 mismatch, the checkpoint was modified or corrupted")
    try:
        config = AgentConfig(**json.loads(meta["config"]))
        state = LearnerState(**json.loads(meta["state"]))
        agent = ResidualSAC(config, seed=seed)
        agent.load_state_tensors(tensors)
        agent.updates = int(meta["updates"])
        agent.scale = float(meta["scale"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise LearningError(f"{where}: checkpoint does not fit ({exc})") from None
    return agent, state


def warmup_scale(env_steps: int, *, delta: float, start: int, ramp: int) -> float:
    """PLD's residual schedule: 0 before ``start`` steps, then linear up to ``delta``."""
    if env_steps <= start:
        return 0.0
    if ramp <= 0:
        return delta
    return delta * min(1.0, (env_steps - start) / ramp)


__all__ = [
    "ActorSnapshot",
    "AgentConfig",
    "CriticEnsemble",
    "GaussianActor",
    "LearnerState",
    "ReplayBuffer",
    "ResidualSAC",
    "UpdateStats",
    "episode_columns",
    "load_learner",
    "sample_symmetric",
    "save_learner",
    "warmup_scale",
]
