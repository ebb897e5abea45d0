"""``vlarl train-residual``: residual RL in-process on Meta-World (no ROS), for benchmarks.

The loop is the graph's, without the transport: the shipped base policy (ONNX Runtime) plans
chunks through :class:`~vlarl.core.chunking.ChunkScheduler`, the residual actor adds its
correction, :class:`~vlarl.core.safety.SafetyFilter` clamps and rate-limits exactly as the
safety node does, and :class:`~vlarl.sim.robot.MetaWorldRobot` (the sim_robot node's robot,
with its optional ``action_offset`` deployment shift) executes the command. Reward is the
simulator's success flag (sparse: 1 at success, which ends the episode) or a learned success
detector (``--reward learned``).

Methods: ``residual`` (PLD + RLPD: frozen base + residual SAC), ``sac`` (residual-free SAC/RLPD
on the same data: the base's probe rollouts as offline data, then its own actor), ``base``
(the base alone). The first ``probe_steps`` environment steps run the base alone for every
method (PLD's probe; its successful episodes warm the offline buffer). Every ``eval_every``
steps the deterministic policy is evaluated on ``eval_episodes`` fixed held-out layouts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlarl.core.chunking import ChunkScheduler
from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.core.safety import SafetyConfig, SafetyFilter
from vlarl.data.replay import ReplayWriter, Transitions
from vlarl.graph import resolve_model_path
from vlarl.learning.errors import LearningError
from vlarl.learning.residual_rl import (
    ActorSnapshot,
    AgentConfig,
    LearnerState,
    ReplayBuffer,
    ResidualSAC,
    episode_columns,
    sample_symmetric,
    save_learner,
    warmup_scale,
)
from vlarl.learning.runs import (
    MetricsLog,
    add_config_arguments,
    arg,
    config_from_args,
    run_folder,
    set_threads,
    write_config,
    write_json,
)
from vlarl.sim.robot import MetaWorldRobot

METHODS = ("residual", "sac", "base")
EVAL_SEED = 7_000_000  # layouts of evaluation episodes: far from training seeds


@dataclass
class TrainResidualConfig:
    method: str = arg("residual", "residual (PLD+RLPD) | sac (residual-free) | base (no learning)")
    task: str = arg("pick-place-v3", "Meta-World task")
    base_model: str = arg("models/pick-place-v3-student.onnx", "frozen base policy (ONNX)")
    replan_every: int = arg(4, "base actions executed per chunk before re-planning")
    action_offset: str = arg(
        "0,0,0,0", "deployment shift of the simulated robot: it executes clip(command + offset)"
    )
    seed: int = arg(0, "seed of the learner and of the training layouts")
    total_steps: int = arg(20_000, "environment steps")
    max_episode_steps: int = arg(120, "training episodes are truncated after this many steps")
    probe_steps: int = arg(1_000, "first steps driven by the base alone (warm the offline buffer)")
    warmup_ramp: int = arg(2_000, "steps over which the residual bound ramps from 0 to delta")
    utd: int = arg(2, "critic updates per environment step (update-to-data ratio)")
    delta: float = arg(0.3, "residual bound (the safety node's delta)")
    critics: int = arg(4, "critic ensemble size")
    critic_subset: int = arg(2, "target = min over this many random target critics")
    hidden: int = arg(128, "hidden width of actor and critics")
    batch_size: int = arg(128, "batch size (half offline, half online)")
    gamma: float = arg(0.99, "discount")
    lr: float = arg(3e-4, "learning rate (critics, temperature)")
    actor_lr: float = arg(1e-4, "actor learning rate (0 = lr)")
    nstep: int = arg(3, "n-step returns for the critic's target")
    normalize_obs: bool = arg(True, "standardise observations with the first rollouts' stats")
    target_entropy: float = arg(0.0, "SAC entropy target (0 = -action_dim)")
    init_temperature: float = arg(0.001, "initial SAC temperature")
    calql_alpha: float = arg(0.0, "Cal-QL regulariser weight for the warm start (0 = off)")
    calql_steps: int = arg(0, "updates with the Cal-QL regulariser")
    bc_weight: float = arg(0.5, "PAC-style pull of the residual toward zero at the start")
    bc_decay_updates: int = arg(8_000, "updates over which that pull fades to bc_floor")
    bc_floor: float = arg(0.0, "the pull's weight after it has faded")
    actor_pessimism: float = arg(0.5, "actor maximises mean - this * std of the critics' Q")
    actor_ema: float = arg(0.002, "Polyak rate of the deployed, averaged actor (0 = the actor)")
    reward: str = arg("sim", "sim (the simulator's success flag) | learned (success detector)")
    detector_model: str = arg(
        "models/pick-place-v3-success-detector.onnx", "success detector for --reward learned"
    )
    gate: str = arg(
        "none",
        "none: the actor being trained acts and is evaluated | rollouts: RL-100's gate, a "
        "candidate snapshot and the deployed version take turns on training episodes; the "
        "candidate is deployed (and evaluated) only if it succeeds at least as often",
    )
    gate_episodes: int = arg(6, "training episodes each of candidate and deployed act for")
    gate_tolerance: float = arg(0.0, "how much lower a candidate's success rate may be")
    detector_threshold: float = arg(
        0.0, "--reward learned: detector threshold (0 = the model's own); higher = stricter"
    )
    progress_model: str = arg(
        "", "--reward learned: progress model whose d(o_t) - d(o_t+1) is added (empty = none)"
    )
    progress_weight: float = arg(0.01, "weight of that progress reward per step of progress")
    eval_every: int = arg(2_500, "environment steps between evaluations")
    eval_episodes: int = arg(20, "evaluation episodes (fixed layouts, deterministic policy)")
    eval_max_steps: int = arg(150, "steps after which an evaluation episode counts as failed")
    save_checkpoints: bool = arg(True, "save the learner at every evaluation (checkpoints/)")
    record_episodes: bool = arg(
        True,
        "write every training episode to <out>/episodes in the replay format, the flag in its "
        "success column (labelled data for the next detector: its false successes included)",
    )
    threads: int = arg(1, "torch threads")
    out: str = arg("runs/residual", "run folder (config, metrics, learner checkpoint)")
    overwrite: bool = arg(False, "replace a finished run in --out")
    progress: bool = arg(True, "show a progress bar")


def parse_offset(text: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise LearningError(
            f"action_offset must be 4 comma-separated numbers, got {text!r}"
        ) from None
    if len(values) != 4 or not np.isfinite(values).all() or max(map(abs, values)) > 1.0:
        raise LearningError(f"action_offset must be 4 finite numbers in [-1, 1], got {text!r}")
    return np.asarray(values, np.float64)


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

    def reset(self) -> None:
        self.scheduler.reset()

    def base_action(self, obs: np.ndarray) -> np.ndarray:
        if self.scheduler.needs_plan():
            self.base.predict(obs.astype(np.float32), task=self.task, out=self.chunk)
            self.scheduler.set_plan(self.chunk)
        action, _ = self.scheduler.next()
        return np.asarray(action, np.float64)

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


def evaluate_policy(
    agent: ResidualSAC | None,
    controller: Controller,
    robot: MetaWorldRobot,
    *,
    method: str,
    episodes: int,
    max_steps: int,
    snapshot: ActorSnapshot | None = None,
) -> dict[str, Any]:
    """Deterministic episodes on the fixed evaluation layouts (episode i of the eval robot)."""
    successes, lengths = 0, []
    saved = robot.max_episode_steps
    robot.max_episode_steps = max_steps
    try:
        for i in range(episodes):
            obs = robot.reset(episode=i)
            controller.reset()
            for _ in range(max_steps):
                base, residual = _act(
                    agent, controller, obs, method=method, explore=False, snapshot=snapshot
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
        robot.max_episode_steps = saved
    return {
        "success_rate": successes / episodes,
        "successes": successes,
        "episodes": episodes,
        "mean_length_success": float(np.mean(lengths)) if lengths else None,
    }


def deployable(agent: ResidualSAC | None) -> ActorSnapshot | None:
    """What the robot would run: the averaged actor when the agent keeps one."""
    if agent is None or agent.actor_avg is None:
        return None
    return ActorSnapshot(agent.actor_avg, agent.scale)


class RolloutGate:
    """RL-100's gate, measured on the robot's own training episodes (no extra steps).

    A candidate (a frozen snapshot of the actor being trained) and the deployed version take
    turns, one episode each, both exploring. Once each has acted ``episodes`` times the
    candidate is deployed if its success rate is at least the deployed version's over the same
    period minus ``tolerance``, and the next candidate's trial begins. Taking turns compares
    the two on the same stretch of the robot's life, so an early lucky streak of the deployed
    version cannot block every later candidate.
    """

    def __init__(self, deployed: ActorSnapshot, *, episodes: int, tolerance: float) -> None:
        self.deployed = deployed
        self.deployed_version = 0
        self.episodes = episodes
        self.tolerance = tolerance
        self.candidate: ActorSnapshot | None = None
        self.proposed = 0
        self.acting: str | None = None  # "candidate" | "deployed" while an episode runs
        self.tally = {"candidate": [0, 0], "deployed": [0, 0]}  # [episodes, successes]

    def start_episode(self, propose: Callable[[], ActorSnapshot]) -> ActorSnapshot:
        """Who acts in the next episode (``propose`` makes a new candidate when needed)."""
        if self.candidate is None:
            self.candidate = propose()
            self.proposed += 1
            self.tally = {"candidate": [0, 0], "deployed": [0, 0]}
        cand, dep = self.tally["candidate"][0], self.tally["deployed"][0]
        self.acting = "candidate" if cand <= dep else "deployed"
        return self.candidate if self.acting == "candidate" else self.deployed

    def end_episode(self, success: bool) -> dict[str, Any] | None:
        """Count the episode; the verdict when the candidate's trial is complete."""
        if self.acting is None:
            return None
        entry = self.tally[self.acting]
        entry[0] += 1
        entry[1] += int(success)
        cand, dep = self.tally["candidate"], self.tally["deployed"]
        if cand[0] < self.episodes or dep[0] < self.episodes:
            return None
        rate, deployed_rate = cand[1] / cand[0], dep[1] / dep[0]
        accepted = rate >= deployed_rate - self.tolerance
        verdict = {
            "candidate": self.proposed,
            "success_rate": rate,
            "deployed_rate": deployed_rate,
            "deployed_version": self.deployed_version,
            "accepted": accepted,
        }
        if accepted:
            assert self.candidate is not None
            self.deployed, self.deployed_version = self.candidate, self.proposed
        self.candidate = None
        return verdict


def _act(
    agent: ResidualSAC | None,
    controller: Controller,
    obs: np.ndarray,
    *,
    method: str,
    explore: bool,
    snapshot: ActorSnapshot | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(base, residual) as handed to safety. Residual-free SAC: its action goes in as base.

    ``snapshot``: a frozen version acts instead of the actor being trained.
    """
    if method == "sac":
        assert agent is not None
        zeros = np.zeros(4)
        action = agent.act(obs, zeros, explore=explore, snapshot=snapshot)
        return np.clip(action, -1.0, 1.0), zeros
    base = controller.base_action(obs)
    if agent is None:
        return base, np.zeros_like(base)
    if (agent.scale if snapshot is None else snapshot.scale) == 0.0:
        return base, np.zeros_like(base)
    return base, agent.act(obs, base, explore=explore, snapshot=snapshot)


def train(config: TrainResidualConfig) -> dict[str, Any]:
    if config.method not in METHODS:
        raise LearningError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.gate not in ("none", "rollouts"):
        raise LearningError(f"gate must be none or rollouts, got {config.gate!r}")
    if config.gate_episodes < 1:
        raise LearningError(f"gate_episodes must be >= 1, got {config.gate_episodes}")
    if config.reward not in ("sim", "learned"):
        raise LearningError(f"reward must be sim or learned, got {config.reward!r}")
    offset = parse_offset(config.action_offset)
    set_threads(config.threads)
    torch.manual_seed(config.seed)
    base_policy = OnnxPolicy.load(resolve_model_path(config.base_model))
    meta = base_policy.metadata
    reward_model = None
    if config.reward == "learned":
        from vlarl.rewardmodels.online import LearnedReward

        # The detector's success (sparse, as the flag run gets), plus progress if asked.
        reward_model = LearnedReward.load(
            detector=config.detector_model,
            progress=config.progress_model or None,
            threshold=config.detector_threshold or None,
            progress_weight=config.progress_weight,
            task=config.task,
        )
    with (
        run_folder(config.out, overwrite=config.overwrite, marker="metrics.json") as run_dir,
        ExitStack() as stack,
    ):
        write_config(run_dir, "train-residual", config)
        log = MetricsLog(run_dir)
        recorder = (
            stack.enter_context(
                ReplayWriter(
                    run_dir / "episodes",
                    source=f"train-residual:{config.method}",
                    tasks=[config.task],
                    extra={"reward": config.reward, "seed": config.seed},
                )
            )
            if config.record_episodes
            else None
        )
        robot = MetaWorldRobot(
            config.task,
            seed=config.seed,
            end_on_success=False,
            max_episode_steps=config.max_episode_steps,
            action_offset=offset,
        )
        eval_robot = MetaWorldRobot(config.task, seed=EVAL_SEED, action_offset=offset)
        controller = Controller(
            base_policy, task=config.task, replan_every=config.replan_every, delta=config.delta
        )
        eval_controller = Controller(
            base_policy, task=config.task, replan_every=config.replan_every, delta=config.delta
        )
        agent: ResidualSAC | None = None
        if config.method != "base":
            residual = config.method == "residual"
            agent = ResidualSAC(
                AgentConfig.from_settings(
                    config,
                    obs_dim=meta.obs_dim,
                    action_dim=meta.action_dim,
                    residual=residual,
                    # The pull toward zero means "toward the base": residual only.
                    bc_weight=config.bc_weight if residual else 0.0,
                    bc_floor=config.bc_floor if residual else 0.0,
                ),
                seed=config.seed,
            )
        online = ReplayBuffer(
            obs_dim=meta.obs_dim, action_dim=meta.action_dim, capacity=config.total_steps + 1
        )
        offline = ReplayBuffer(
            obs_dim=meta.obs_dim, action_dim=meta.action_dim, capacity=config.total_steps + 1
        )
        rng = np.random.default_rng(config.seed)
        # Rollouts gate: the deployed version starts as the base alone (a zero bound) or, for
        # residual-free SAC, its untried initial actor.
        gate = (
            RolloutGate(
                agent.snapshot(), episodes=config.gate_episodes, tolerance=config.gate_tolerance
            )
            if agent is not None and config.gate == "rollouts"
            else None
        )
        acting: ActorSnapshot | None = None  # None: the actor being trained
        curve: list[dict[str, Any]] = []
        episodes, train_successes = 0, 0
        detector_false, detector_missed = 0, 0  # learned reward vs the flag, training episodes
        episode_rows: dict[str, list[Any]] = {
            k: [] for k in ("obs", "next_obs", "base", "action", "reward", "terminal", "success")
        }
        t0 = time.perf_counter()
        update_s = 0.0
        obs = robot.reset()
        controller.reset()
        if reward_model is not None:
            reward_model.reset(obs)

        def evaluate_now(step: int) -> None:
            # Each method's own deterministic policy (the residual's bound is 0 until the
            # probe ends, i.e. it is the base; residual-free SAC starts from its random actor).
            res = evaluate_policy(
                agent,
                eval_controller,
                eval_robot,
                method=config.method,
                episodes=config.eval_episodes,
                max_steps=config.eval_max_steps,
                snapshot=gate.deployed if gate else deployable(agent),
            )
            if gate:
                res.update(deployed_version=gate.deployed_version, candidates=gate.proposed)
            res.update(
                step=step,
                wall_s=round(time.perf_counter() - t0, 1),
                train_episodes=episodes,
                train_successes=train_successes,
            )
            curve.append(res)
            log.log(kind="eval", **res)
            if agent is not None and config.save_checkpoints:
                # The learner as it was evaluated (actor, critics, optimisers): for inspection.
                save_learner(
                    run_dir / "checkpoints" / f"step{step:07d}.safetensors",
                    agent,
                    LearnerState(env_steps=step),
                )

        def version_at(step: int) -> str:
            # What acts from ``step`` on, for the recorded episodes' version tag.
            if agent is None or step <= config.probe_steps:
                return "base@0"
            return f"{config.method}@{agent.updates}"

        episode_version = version_at(1)
        evaluate_now(0)
        bar = tqdm(
            total=config.total_steps,
            disable=not config.progress,
            desc=f"{config.method} seed {config.seed}",
            unit="step",
        )
        for step in range(1, config.total_steps + 1):
            probing = step <= config.probe_steps
            if agent is not None and config.method == "residual":
                agent.scale = warmup_scale(
                    step, delta=config.delta, start=config.probe_steps, ramp=config.warmup_ramp
                )
            if probing or agent is None:
                base = controller.base_action(obs)
                act_base, act_res = base, np.zeros_like(base)
            else:
                if gate and gate.acting is None:  # the first step after the probe
                    assert agent is not None
                    acting = gate.start_episode(agent.snapshot)
                act_base, act_res = _act(
                    agent, controller, obs, method=config.method, explore=True, snapshot=acting
                )
            command = controller.command(obs, act_base, act_res)
            result = robot.step(command)
            next_obs = robot.state.copy()
            # The learned detector decides success where a real robot has no flag.
            if reward_model is None:
                success, reward = bool(result.success), float(result.success)
            else:
                learned = reward_model.step(next_obs)
                success, reward = bool(learned.success), float(learned.reward)
            terminal = success
            # Residual-free SAC never sees a base action: its critic learns from commands.
            stored_base = np.zeros(4) if config.method == "sac" else act_base
            for key, val in (
                ("obs", obs),
                ("next_obs", next_obs),
                ("base", stored_base),
                ("action", command),
                ("reward", reward),
                ("terminal", terminal),
                ("success", result.success),
            ):
                episode_rows[key].append(val)
            obs = next_obs
            done = terminal or result.truncated
            if done:
                data = _episode_transitions(episode_rows, episode=episodes)
                cols = episode_columns(data, gamma=config.gamma, nstep=config.nstep)
                online.add(**cols)
                ended_ok = bool(data.success.any())  # the simulator's flag: for the record
                train_successes += int(ended_ok)
                # What the learner may know: the flag, or with a learned reward the detector.
                judged_ok = ended_ok if reward_model is None else bool(terminal)
                if reward_model is not None:
                    detector_false += int(judged_ok and not ended_ok)
                    detector_missed += int(ended_ok and not judged_ok)
                if probing and judged_ok:
                    offline.add(**cols)
                if recorder is not None:
                    recorder.add_episode(data, task=config.task, version=episode_version)
                if gate and gate.acting is not None:
                    assert agent is not None
                    verdict = gate.end_episode(judged_ok)
                    if verdict:
                        log.log(kind="gate", step=step, **verdict)
                    acting = gate.start_episode(agent.snapshot)
                episodes += 1
                log.log(
                    kind="episode",
                    step=step,
                    episode=episodes,
                    success=ended_ok,
                    judged_success=judged_ok,
                    length=len(data),
                )
                episode_rows = {k: [] for k in episode_rows}
                episode_version = version_at(step + 1)
                obs = robot.reset()
                controller.reset()
                if reward_model is not None:
                    reward_model.reset(obs)
            if agent is not None and step > config.probe_steps // 2 and len(online) > 0:
                if config.normalize_obs and agent.updates == 0:
                    agent.set_input_stats(online.latest("obs", len(online)))
                u0 = time.perf_counter()
                for k in range(config.utd):
                    batch = sample_symmetric(rng, online, offline, config.batch_size)
                    stats = agent.update(
                        batch, update_actor=(k == config.utd - 1) and step > config.probe_steps
                    )
                update_s += time.perf_counter() - u0
                if step % 500 == 0:
                    log.log(kind="update", step=step, **asdict(stats))
            if step % config.eval_every == 0:
                evaluate_now(step)
                bar.set_postfix(success=f"{curve[-1]['success_rate']:.2f}")
            bar.update(1)
        bar.close()
        wall = time.perf_counter() - t0
        summary = {
            "method": config.method,
            "seed": config.seed,
            "task": config.task,
            "action_offset": offset.tolist(),
            "reward": config.reward,
            "curve": curve,
            "final_success": curve[-1]["success_rate"],
            "train_episodes": episodes,
            "train_successes": train_successes,
            "wall_s": round(wall, 1),
            "update_s": round(update_s, 1),
            "updates": agent.updates if agent else 0,
            "offline_transitions": len(offline),
            "detector_false_successes": detector_false,
            "detector_missed_successes": detector_missed,
            "candidates": gate.proposed if gate else 0,
            "deployed_version": gate.deployed_version if gate else 0,
            "online_transitions": len(online),
        }
        if agent is not None and config.method == "residual":
            summary["residual_layers"] = len(agent.actor.layers())
        log.summary(**summary)
        write_json(run_dir / "curve.json", summary)
        return summary


def _episode_transitions(rows: dict[str, list[Any]], *, episode: int) -> Transitions:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainResidualConfig)


def run(args: argparse.Namespace) -> int:
    summary = train(config_from_args(TrainResidualConfig, args))
    steps = ", ".join(f"{c['step']}: {c['success_rate']:.2f}" for c in summary["curve"])
    print(f"{summary['method']} seed {summary['seed']}: success by step {{{steps}}}")
    print(f"wall {summary['wall_s']} s (updates {summary['update_s']} s)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))

__all__ = ["RolloutGate", "TrainResidualConfig", "evaluate_policy", "train"]
