"""Acting on the embedded robot in-process: base planner + residual + safety, one episode.

The loop is the graph's without the transport: the base policy (ONNX Runtime) plans chunks
through :class:`~vlarl.core.chunking.ChunkScheduler` as the policy node does; the residual is
the policy node's own actor (:class:`~vlarl.core.residual.MLPResidual`, decoded from the
learner's blob) with the node's exploration noise; :class:`~vlarl.core.safety.SafetyFilter`
clamps and rate-limits exactly as the safety node does; :class:`~vlarl.sim.robot.MetaWorldRobot`
(the sim_robot node's robot, with its optional ``action_offset`` deployment shift) executes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vlarl.core.chunking import ChunkScheduler
from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.core.residual import ResidualActor
from vlarl.core.safety import SafetyConfig, SafetyFilter
from vlarl.data.replay import Transitions
from vlarl.graph import GraphArgumentError, parse_action_offset
from vlarl.learning.errors import LearningError
from vlarl.sim.robot import MetaWorldRobot

EVAL_SEED = 7_000_000  # layouts of evaluation episodes: far from training seeds


def parse_offset(text: str) -> np.ndarray:
    """``--action-offset`` text: 4 comma-separated numbers in [-1, 1]."""
    try:
        return np.asarray(parse_action_offset(text), np.float64)
    except GraphArgumentError as exc:
        raise LearningError(f"action_offset: {exc}") from None


class Controller:
    """Base planner + residual + safety for one robot: the policy and safety nodes' logic."""

    def __init__(self, base: OnnxPolicy, *, task: str, replan_every: int, delta: float) -> None:
        self.base = base
        self.task = task
        self.scheduler = ChunkScheduler(
            chunk_length=base.metadata.chunk_length, replan_every=replan_every
        )
        self.chunk = np.zeros((base.metadata.chunk_length, base.metadata.action_dim), np.float32)
        self.safety = SafetyFilter(SafetyConfig(delta=delta), now=0.0)
        self.dt = float(base.metadata.control_dt)
        self.clock = 0
        self._residual = np.zeros(base.metadata.action_dim, np.float32)
        self._obs32 = np.zeros(base.metadata.obs_dim, np.float32)

    def reset(self) -> None:
        self.scheduler.reset()

    def base_action(self, obs: np.ndarray) -> np.ndarray:
        if self.scheduler.needs_plan():
            self.base.predict(obs.astype(np.float32), task=self.task, out=self.chunk)
            self.scheduler.set_plan(self.chunk)
        action, _ = self.scheduler.next()
        return np.asarray(action, np.float64)

    def residual(self, actor: ResidualActor, obs: np.ndarray, base: np.ndarray) -> np.ndarray:
        """The actor's residual for this step (the policy node's call)."""
        self._obs32[:] = obs
        actor(self._obs32, base.astype(np.float32), self._residual)
        return self._residual.astype(np.float64)

    def command(self, obs: np.ndarray, base: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """Safety's decision for (base, residual); a hold never happens in lockstep."""
        self.clock += 1
        now = self.clock * self.dt
        stamp = round(now * 1e9)
        self.safety.update_ee_position(obs[:3], now=now)
        self.safety.observe(stamp, now=now)
        decision = self.safety.filter(base, residual, stamp_ns=stamp, now=now)
        if decision.command is None:
            raise LearningError(f"safety refused an action: {decision.reason}")
        return decision.command


@dataclass
class Episode:
    """One finished episode: its transitions and how it ended."""

    data: Transitions
    success: bool  # the simulator's flag (for the record and evaluation)
    judged: bool  # what the reward source said (the flag, or the learned detector)
    residual_from: int  # first step the residual acted (hybrid rollouts); len(data) if never


def run_episode(
    robot: MetaWorldRobot,
    controller: Controller,
    *,
    actor: ResidualActor | None,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
    reward_model: Any = None,
    base_prefix: int = 0,
    episode: int = 0,
) -> Episode:
    """One episode from ``robot.reset()``: the base alone for the first ``base_prefix`` steps,
    then base + ``actor`` (+ Gaussian exploration noise of ``noise_std`` on the residual, as
    the policy node adds it). Ends at the judged success or the robot's truncation."""
    obs = robot.reset()
    controller.reset()
    if reward_model is not None:
        reward_model.reset(obs)
    rows: dict[str, list[Any]] = {
        k: [] for k in ("obs", "next_obs", "base", "action", "reward", "terminal", "success")
    }
    zeros = np.zeros(controller.base.metadata.action_dim)
    residual_from = -1
    while True:
        base = controller.base_action(obs)
        residual = zeros
        if actor is not None and len(rows["obs"]) >= base_prefix:
            if residual_from < 0:
                residual_from = len(rows["obs"])
            residual = controller.residual(actor, obs, base)
            if noise_std > 0.0 and rng is not None:
                residual = residual + rng.normal(0.0, noise_std, residual.shape)
        command = controller.command(obs, base, residual)
        result = robot.step(command)
        next_obs = robot.state.copy()
        if reward_model is None:
            judged, reward = bool(result.success), float(result.success)
        else:
            learned = reward_model.step(next_obs)
            judged, reward = bool(learned.success), float(learned.reward)
        for key, val in (
            ("obs", obs),
            ("next_obs", next_obs),
            ("base", base),
            ("action", command),
            ("reward", reward),
            ("terminal", judged),
            ("success", result.success),
        ):
            rows[key].append(val)
        obs = next_obs
        if judged or result.truncated or result.terminal:
            break
    data = episode_transitions(rows, episode=episode)
    return Episode(
        data=data,
        success=bool(data.success.any()),
        judged=bool(data.terminal[-1]),
        residual_from=residual_from if residual_from >= 0 else len(data),
    )


def episode_transitions(rows: dict[str, list[Any]], *, episode: int) -> Transitions:
    n = len(rows["obs"])
    return Transitions.build(
        obs=np.asarray(rows["obs"], np.float32),
        next_obs=np.asarray(rows["next_obs"], np.float32),
        action=np.asarray(rows["action"], np.float32),
        base_action=np.asarray(rows["base"], np.float32),
        residual=np.asarray(rows["action"], np.float32) - np.asarray(rows["base"], np.float32),
        reward=np.asarray(rows["reward"], np.float32),
        terminal=np.asarray(rows["terminal"], np.uint8),
        truncated=np.r_[np.zeros(n - 1, np.uint8), np.uint8(not rows["terminal"][-1])],
        success=np.asarray(rows["success"], np.uint8),
        episode=np.full(n, episode, np.int64),
        step=np.arange(n, dtype=np.int64),
    )


def evaluate(
    robot: MetaWorldRobot,
    controller: Controller,
    *,
    actor: ResidualActor | None,
    episodes: int,
    max_steps: int,
) -> dict[str, Any]:
    """Deterministic episodes (no exploration noise) on the fixed layouts 0 .. episodes-1 of
    ``robot`` (seeded with :data:`EVAL_SEED`); success is the simulator's flag."""
    successes, lengths = 0, []
    saved = (robot.max_episode_steps, robot.end_on_success)
    robot.max_episode_steps, robot.end_on_success = max_steps, True
    try:
        for i in range(episodes):
            obs = robot.reset(episode=i)
            controller.reset()
            for _ in range(max_steps):
                base = controller.base_action(obs)
                residual = (
                    np.zeros_like(base) if actor is None else controller.residual(actor, obs, base)
                )
                result = robot.step(controller.command(obs, base, residual))
                obs = robot.state
                if result.success:
                    successes += 1
                    lengths.append(result.step)
                    break
                if result.terminal or result.truncated:
                    break
    finally:
        robot.max_episode_steps, robot.end_on_success = saved
    return {
        "success_rate": successes / episodes,
        "successes": successes,
        "episodes": episodes,
        "mean_length_success": float(np.mean(lengths)) if lengths else None,
    }


__all__ = [
    "EVAL_SEED",
    "Controller",
    "Episode",
    "episode_transitions",
    "evaluate",
    "parse_offset",
    "run_episode",
]
