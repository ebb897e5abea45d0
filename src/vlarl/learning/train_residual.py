"""``vlarl train-residual``: PLD stage 1 (residual RL on a frozen base) in-process, no ROS.

The learner is the graph's learner core (:class:`~vlarl.learning.learner.ResidualLearner`, the
code the ``learner`` node runs); only the transport differs: each finished episode goes to
:meth:`~vlarl.learning.learner.ResidualLearner.add` directly instead of through a bag, the
bridge and a replay shard. Between episodes the learner runs the updates it owes (``utd`` per
transition), and every ``publish_every`` updates it proposes a candidate version (a weight
blob, pre-screened by its critic). The robot acts with decoded blobs, as the policy node does
(:mod:`vlarl.learning.rollouts`). With ``--gate rollouts`` (the default) a candidate is
promoted only by :class:`~vlarl.learning.gate.DeploymentGate` on interleaved training episodes
(candidate vs deployed); with ``--gate none`` every pre-screened candidate is deployed at once.

Reward is the simulator's success flag (sparse: 1 at success, which ends the episode) or a
learned success detector (``--reward learned``). Every ``eval_every`` steps the deployed
version is evaluated on ``eval_episodes`` fixed held-out layouts, without exploration noise.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.core.residual import EXPLORATION_NOISE_STD, MLPResidual
from vlarl.core.weights import decode_residual
from vlarl.data.replay import ReplayWriter
from vlarl.graph import resolve_model_path
from vlarl.learning.errors import LearningError
from vlarl.learning.gate import CANDIDATE, DEPLOYED, DeploymentGate, GateConfig, Verdict
from vlarl.learning.learner import Candidate, LearnerConfig, ResidualLearner
from vlarl.learning.rollouts import (
    EVAL_SEED,
    Controller,
    Episode,
    evaluate,
    parse_offset,
    run_episode,
)
from vlarl.learning.runs import (
    MetricsLog,
    add_config_arguments,
    arg,
    config_from_args,
    nested,
    run_folder,
    set_threads,
    write_config,
    write_json,
)
from vlarl.sim.robot import MetaWorldRobot

METHODS = ("residual", "base")
GATES = ("rollouts", "none")


@dataclass
class TrainResidualConfig:
    method: str = arg("residual", "residual (PLD + RLPD on the frozen base) | base (no learning)")
    task: str = arg("pick-place-v3", "Meta-World task")
    base_model: str = arg("models/pick-place-v3-student.onnx", "frozen base policy (ONNX)")
    replan_every: int = arg(4, "base actions executed per chunk before re-planning")
    action_offset: str = arg(
        "0,0,0,0", "deployment shift of the simulated robot: it executes clip(command + offset)"
    )
    total_steps: int = arg(20_000, "environment steps")
    max_episode_steps: int = arg(120, "training episodes are truncated after this many steps")
    residual_noise_std: float = arg(
        EXPLORATION_NOISE_STD, "exploration: Gaussian noise added to the residual (policy node's)"
    )
    gate: str = arg(
        "rollouts",
        "rollouts: a candidate is deployed only on the gate's verdict from interleaved "
        "episodes | none: every pre-screened candidate is deployed at once",
    )
    gate_rule: GateConfig = nested(GateConfig, "the deployment gate's rule")  # noqa: RUF009
    learner: LearnerConfig = nested(  # noqa: RUF009
        LearnerConfig, "the learner core (its seed also seeds the training layouts)"
    )
    reward: str = arg("sim", "sim (the simulator's success flag) | learned (success detector)")
    detector_model: str = arg(
        "models/pick-place-v3-success-detector.onnx", "success detector for --reward learned"
    )
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LearningError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.gate not in GATES:
            raise LearningError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.reward not in ("sim", "learned"):
            raise LearningError(f"reward must be sim or learned, got {self.reward!r}")
        if self.residual_noise_std < 0.0:
            raise LearningError("residual_noise_std must be >= 0")


class ResidualStage:
    """Residual learning on one base, episode by episode: act, learn, propose, gate.

    ``vlarl train-residual`` runs one; ``vlarl improve`` runs one per base version.
    """

    def __init__(
        self,
        base: OnnxPolicy,
        *,
        learner: LearnerConfig,
        gate: str,
        gate_rule: GateConfig,
        noise_std: float,
        seed: int,
    ) -> None:
        self.base_tag = base.tag
        self.learner = ResidualLearner(learner, base=base.metadata)
        self.gate = DeploymentGate(gate_rule, deployed=base.tag) if gate == "rollouts" else None
        self.noise_std = noise_std
        self.rng = np.random.default_rng(seed + 17)
        self.deployed: MLPResidual | None = None
        self.candidate: tuple[Candidate, MLPResidual] | None = None
        self.last_propose_at = 0  # learner updates at the last proposal
        self.proposed = 0
        self.verdicts: list[dict[str, Any]] = []
        self.update_s = 0.0

    def tag_of(self, actor: MLPResidual | None) -> str:
        """The version tag the policy node would stamp: base, or base+residual."""
        return self.base_tag if actor is None else f"{self.base_tag}+{actor.tag}"

    def next_actor(self) -> tuple[str, MLPResidual | None]:
        """Who acts in the next episode: (gate arm, actor)."""
        if self.gate is not None and self.candidate is not None:
            arm = self.gate.next_arm()
            return arm, (self.candidate[1] if arm == CANDIDATE else self.deployed)
        return DEPLOYED, self.deployed

    def learn_from(self, episode: Episode, *, tag: str, arm: str) -> Verdict | None:
        """Add a finished episode, judge it for the gate, catch up on updates, propose."""
        self.learner.add(episode.data, [tag])
        verdict = None
        if self.gate is not None and self.candidate is not None:
            verdict = self.gate.record(arm, episode.judged)
            if verdict is not None:
                cand, actor = self.candidate
                self.candidate = None
                if verdict.accepted:
                    self.learner.promote(cand, verdict=verdict.as_dict())
                    self.deployed = actor
                self.verdicts.append({"step": self.learner.transitions, **verdict.as_dict()})
        u0 = time.perf_counter()
        self.learner.train(max_updates=int(self.learner.updates_owed))
        self.update_s += time.perf_counter() - u0
        due = self.learner.agent.updates - self.last_propose_at >= self.learner.config.publish_every
        if due and self.candidate is None:
            self.last_propose_at = self.learner.agent.updates
            proposal = self.learner.propose()
            if proposal is not None and proposal.blob is not None:
                actor = decode_residual(proposal.blob).actor()  # what the policy node installs
                self.proposed += 1
                if self.gate is None:
                    self.learner.promote(proposal)
                    self.deployed = actor
                else:
                    self.candidate = (proposal, actor)
                    self.gate.propose(self.tag_of(actor))
        return verdict

    @property
    def deployed_tag(self) -> str:
        return self.tag_of(self.deployed)


def train(config: TrainResidualConfig) -> dict[str, Any]:
    offset = parse_offset(config.action_offset)
    set_threads(config.threads)
    torch.manual_seed(config.learner.seed)
    base_policy = OnnxPolicy.load(resolve_model_path(config.base_model))
    learner_config = config.learner
    reward_model = None
    if config.reward == "learned":
        from vlarl.rewardmodels.online import LearnedReward

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
                    extra={"reward": config.reward, "seed": config.learner.seed},
                )
            )
            if config.record_episodes
            else None
        )
        robot = MetaWorldRobot(
            config.task,
            seed=config.learner.seed,
            end_on_success=False,
            max_episode_steps=config.max_episode_steps,
            action_offset=offset,
        )
        eval_robot = MetaWorldRobot(config.task, seed=EVAL_SEED, action_offset=offset)
        delta = learner_config.agent.delta
        controller = Controller(
            base_policy, task=config.task, replan_every=config.replan_every, delta=delta
        )
        eval_controller = Controller(
            base_policy, task=config.task, replan_every=config.replan_every, delta=delta
        )
        stage = ResidualStage(
            base_policy,
            learner=learner_config,
            gate=config.gate,
            gate_rule=config.gate_rule,
            noise_std=config.residual_noise_std,
            seed=config.learner.seed,
        )
        curve: list[dict[str, Any]] = []
        episodes, train_successes, steps = 0, 0, 0
        detector_false, detector_missed = 0, 0
        t0 = time.perf_counter()

        def evaluate_now(step: int) -> None:
            res = evaluate(
                eval_robot,
                eval_controller,
                actor=stage.deployed,
                episodes=config.eval_episodes,
                max_steps=config.eval_max_steps,
            )
            res.update(
                step=step,
                env_steps=steps,
                deployed=stage.deployed_tag,
                candidates=stage.proposed,
                wall_s=round(time.perf_counter() - t0, 1),
                train_episodes=episodes,
                train_successes=train_successes,
                achieved_utd=round(stage.learner.achieved_utd(), 3),
            )
            curve.append(res)
            log.log(kind="eval", **res)
            if config.method == "residual" and config.save_checkpoints:
                stage.learner.save(run_dir / "checkpoints" / f"step{step:07d}.safetensors")

        evaluate_now(0)
        next_eval = config.eval_every
        bar = tqdm(
            total=config.total_steps,
            disable=not config.progress,
            desc=f"{config.method} seed {config.learner.seed}",
            unit="step",
        )
        while steps < config.total_steps:
            arm, actor = stage.next_actor() if config.method == "residual" else (DEPLOYED, None)
            tag = stage.tag_of(actor)
            episode = run_episode(
                robot,
                controller,
                actor=actor,
                noise_std=config.residual_noise_std,
                rng=stage.rng,
                reward_model=reward_model,
                episode=episodes,
            )
            n = len(episode.data)
            steps += n
            episodes += 1
            train_successes += int(episode.success)
            if reward_model is not None:
                detector_false += int(episode.judged and not episode.success)
                detector_missed += int(episode.success and not episode.judged)
            if config.method == "residual":
                verdict = stage.learn_from(episode, tag=tag, arm=arm)
                if verdict is not None:
                    log.log(kind="gate", step=steps, **verdict.as_dict())
            if recorder is not None:  # after the learner: the writer renumbers the rows
                recorder.add_episode(episode.data, task=config.task, version=tag)
            log.log(
                kind="episode",
                step=steps,
                episode=episodes,
                version=tag,
                success=episode.success,
                judged_success=episode.judged,
                length=n,
            )
            bar.update(n)
            while steps >= next_eval and next_eval <= config.total_steps:
                evaluate_now(next_eval)
                bar.set_postfix(success=f"{curve[-1]['success_rate']:.2f}")
                next_eval += config.eval_every
        bar.close()
        wall = time.perf_counter() - t0
        learner = stage.learner
        summary = {
            "method": config.method,
            "seed": config.learner.seed,
            "task": config.task,
            "action_offset": offset.tolist(),
            "reward": config.reward,
            "gate": config.gate,
            "curve": curve,
            "final_success": curve[-1]["success_rate"],
            "train_episodes": episodes,
            "train_successes": train_successes,
            "env_steps": steps,
            "wall_s": round(wall, 1),
            "update_s": round(stage.update_s, 1),
            "updates": learner.agent.updates,
            "achieved_utd": round(learner.achieved_utd(), 3),
            "updates_owed": int(learner.updates_owed),
            "offline_transitions": len(learner.offline),
            "online_transitions": len(learner.online),
            "detector_false_successes": detector_false,
            "detector_missed_successes": detector_missed,
            "candidates": stage.proposed,
            "deployed": stage.deployed_tag,
            "verdicts": stage.verdicts,
            "learner": {k: v for k, v in learner.status().items() if k != "episodes_by_tag"},
        }
        if config.method == "residual":
            learner.save(run_dir / "learner.safetensors")
        log.summary(**summary)
        write_json(run_dir / "curve.json", summary)
        return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainResidualConfig)


def run(args: argparse.Namespace) -> int:
    summary = train(config_from_args(TrainResidualConfig, args))
    steps = ", ".join(f"{c['step']}: {c['success_rate']:.2f}" for c in summary["curve"])
    print(f"{summary['method']} seed {summary['seed']}: success by step {{{steps}}}")
    print(
        f"wall {summary['wall_s']} s (updates {summary['update_s']} s), deployed "
        f"{summary['deployed']}, achieved utd {summary['achieved_utd']}"
    )
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))

__all__ = [
    "ResidualStage",
    "TrainResidualConfig",
    "train",
]
