"""``vlarl improve``: the base policy improves itself, in-process (PLD's three stages, repeated).

One round on the current base version B:

1. **Residual RL** (PLD stage 1): a fresh residual learner on B
   (:class:`~vlarl.learning.train_residual.ResidualStage`, the learner node's core and the
   rollout gate) for ``residual_steps`` environment steps.
2. **Hybrid rollouts** (PLD stage 2): B acts alone for a random prefix of each episode (the
   probe; uniform in ``[0, hybrid_prefix * horizon]`` steps), then B + the deployed residual
   (deterministic) takes over; the successful episodes are kept as RL data (replay format, the
   version tag that acted in every row). A round whose rollouts yield no success says so and
   collects again (up to ``hybrid_retries`` times) instead of distilling nothing.
3. **Distill back** (PLD stage 3 / RLDG): the flow teacher is fine-tuned on the demonstrations
   plus those successes and re-distilled into a one-step student, exported with its lineage
   (:mod:`vlarl.learning.distill_back`).
4. **Gate**: the new base alone and B alone act on interleaved episodes
   (:class:`~vlarl.learning.gate.DeploymentGate`); the verdict is written into the new base's
   lineage. Promoted: the next round starts on it with a fresh residual. Refused: B stays and
   its residual learner continues.

Every stage's environment steps (gate episodes included) and wall time are counted. Each
evaluation is the deterministic policy on ``eval_episodes`` fixed held-out layouts, success by
the simulator's flag. The graph runs the same pieces (``learner`` node: the same learner core;
bag bridge: the same replay format).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.core.residual import EXPLORATION_NOISE_STD, MLPResidual
from vlarl.data.replay import ReplayWriter
from vlarl.graph import resolve_model_path
from vlarl.learning.distill_back import (
    DEFAULT_DEMOS,
    DEFAULT_STUDENT,
    DEFAULT_TEACHER,
    DistillBackConfig,
    distill_back,
    ensure_demonstrations,
    set_gate_verdict,
)
from vlarl.learning.errors import LearningError
from vlarl.learning.gate import CANDIDATE, DeploymentGate, GateConfig
from vlarl.learning.learner import LearnerConfig
from vlarl.learning.rollouts import EVAL_SEED, Controller, evaluate, parse_offset, run_episode
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
from vlarl.learning.train_residual import GATES, ResidualStage
from vlarl.sim.robot import MetaWorldRobot, check_task


@dataclass
class ImproveConfig:
    task: str = arg("pick-place-v3", "Meta-World task")
    base_model: str = arg("models/pick-place-v3-student.onnx", "the base version to start from")
    teacher: str = arg(DEFAULT_TEACHER, "flow teacher checkpoint of that base")
    student: str = arg(DEFAULT_STUDENT, "student checkpoint of that base")
    demos: str = arg(DEFAULT_DEMOS, "demonstrations of the base (regenerated if missing)")
    replan_every: int = arg(4, "base actions executed per chunk before re-planning")
    action_offset: str = arg(
        "0,0,0,0", "deployment shift of the simulated robot: it executes clip(command + offset)"
    )
    rounds: int = arg(2, "improvement rounds (residual -> hybrid -> distill -> gate)")
    residual_steps: str = arg(
        "15000,5000", "environment steps of residual RL per round (the last value repeats)"
    )
    max_episode_steps: int = arg(120, "training and rollout episodes are truncated here")
    residual_noise_std: float = arg(EXPLORATION_NOISE_STD, "exploration noise on the residual")
    gate: str = arg(
        "none",
        "residual versions during the residual stage: none (every pre-screened candidate acts; "
        "measured faster, bench/results/learning.json) | rollouts (each on the gate's verdict); "
        "base versions always go through the gate",
    )
    gate_rule: GateConfig = nested(GateConfig, "the deployment gate's rule")  # noqa: RUF009
    learner: LearnerConfig = nested(  # noqa: RUF009
        LearnerConfig, "the learner core (its seed also seeds the layouts)"
    )
    hybrid_episodes: int = arg(60, "hybrid rollout episodes per round (PLD stage 2)")
    hybrid_prefix: float = arg(0.5, "the base alone for up to this fraction of the horizon")
    hybrid_retries: int = arg(2, "collect again this often when a round yields no success")
    rl_fraction: float = arg(0.5, "distill-back: share of every batch from the RL successes")
    finetune_steps: int = arg(2000, "distill-back: teacher fine-tuning steps")
    distill_steps: int = arg(1500, "distill-back: student re-distillation steps")
    eval_episodes: int = arg(50, "evaluation episodes (fixed held-out layouts)")
    eval_max_steps: int = arg(150, "steps after which an evaluation episode counts as failed")
    threads: int = arg(1, "torch threads")
    out: str = arg("runs/improve", "run folder")
    overwrite: bool = arg(False, "replace a finished run in --out")

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise LearningError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.rounds < 1 or self.hybrid_episodes < 1 or self.hybrid_retries < 0:
            raise LearningError("rounds and hybrid_episodes must be >= 1, hybrid_retries >= 0")
        if not 0.0 <= self.hybrid_prefix <= 1.0:
            raise LearningError("hybrid_prefix must be in [0, 1]")
        self.residual_steps_per_round()

    def residual_steps_per_round(self) -> list[int]:
        try:
            steps = [int(v) for v in self.residual_steps.split(",")]
        except ValueError:
            raise LearningError(
                f"residual_steps must be comma-separated integers, got {self.residual_steps!r}"
            ) from None
        if not steps or min(steps) < 0:
            raise LearningError("residual_steps must be integers >= 0")
        return [steps[min(i, len(steps) - 1)] for i in range(self.rounds)]


class Improver:
    """The rounds' shared state: robots, the current base, its residual stage, step counts."""

    def __init__(self, config: ImproveConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.offset = parse_offset(config.action_offset)
        self.seed = config.learner.seed
        self.robot = MetaWorldRobot(
            config.task,
            seed=self.seed,
            end_on_success=False,
            max_episode_steps=config.max_episode_steps,
            action_offset=self.offset,
        )
        self.eval_robot = MetaWorldRobot(config.task, seed=EVAL_SEED, action_offset=self.offset)
        self.rng = np.random.default_rng(self.seed + 101)
        self.env_steps = 0
        self.episodes = 0
        self.t0 = time.perf_counter()
        self.base = OnnxPolicy.load(resolve_model_path(config.base_model))
        self.teacher, self.student = config.teacher, config.student
        self.stage = self._new_stage()

    def _controller(self, policy: OnnxPolicy) -> Controller:
        return Controller(
            policy,
            task=self.config.task,
            replan_every=self.config.replan_every,
            delta=self.config.learner.agent.delta,
        )

    def _new_stage(self) -> ResidualStage:
        return ResidualStage(
            self.base,
            learner=self.config.learner,
            gate=self.config.gate,
            gate_rule=self.config.gate_rule,
            noise_std=self.config.residual_noise_std,
            seed=self.seed,
        )

    def evaluate(self, policy: OnnxPolicy, actor: MLPResidual | None) -> float:
        res = evaluate(
            self.eval_robot,
            self._controller(policy),
            actor=actor,
            episodes=self.config.eval_episodes,
            max_steps=self.config.eval_max_steps,
        )
        return float(res["success_rate"])

    def residual_stage(self, steps: int, log: MetricsLog) -> dict[str, Any]:
        t = time.perf_counter()
        controller = self._controller(self.base)
        start = self.env_steps
        while self.env_steps - start < steps:
            arm, actor = self.stage.next_actor()
            tag = self.stage.tag_of(actor)
            ep = run_episode(
                self.robot,
                controller,
                actor=actor,
                noise_std=self.config.residual_noise_std,
                rng=self.stage.rng,
                episode=self.episodes,
            )
            self.env_steps += len(ep.data)
            self.episodes += 1
            verdict = self.stage.learn_from(ep, tag=tag, arm=arm)
            if verdict is not None:
                log.log(kind="residual_gate", env_steps=self.env_steps, **verdict.as_dict())
        learner = self.stage.learner
        return {
            "env_steps": self.env_steps - start,
            "wall_s": round(time.perf_counter() - t, 1),
            "deployed": self.stage.deployed_tag,
            "candidates": self.stage.proposed,
            "verdicts": len(self.stage.verdicts),
            "updates": learner.agent.updates,
            "achieved_utd": round(learner.achieved_utd(), 3),
        }

    def hybrid_rollouts(self, folder: Path) -> dict[str, Any]:
        """PLD stage 2: base-alone prefix, then base + deployed residual; keep successes."""
        t = time.perf_counter()
        c = self.config
        controller = self._controller(self.base)
        actor = self.stage.deployed
        tag = self.stage.tag_of(actor)
        kept, tried, steps = 0, 0, 0
        longest_prefix = int(c.hybrid_prefix * c.max_episode_steps)
        with ReplayWriter(folder, source="improve:hybrid", tasks=[c.task]) as writer:
            for _attempt in range(1 + c.hybrid_retries):
                for _ in range(c.hybrid_episodes):
                    prefix = int(self.rng.integers(0, longest_prefix + 1))
                    ep = run_episode(
                        self.robot,
                        controller,
                        actor=actor,
                        base_prefix=prefix,
                        episode=self.episodes,
                    )
                    tried += 1
                    steps += len(ep.data)
                    self.episodes += 1
                    if ep.success:
                        kept += 1
                        writer.add_episode(ep.data, task=c.task, version=tag)
                if kept:
                    break
                print(f"  hybrid rollouts of {tag}: no success in {tried} episodes; again")
        self.env_steps += steps
        return {
            "episodes": tried,
            "successes": kept,
            "env_steps": steps,
            "acted": tag,
            "wall_s": round(time.perf_counter() - t, 1),
        }

    def base_gate(self, candidate: OnnxPolicy) -> dict[str, Any]:
        """The new base alone against the current base alone, interleaved, until a verdict."""
        t = time.perf_counter()
        gate = DeploymentGate(self.config.gate_rule, deployed=self.base.tag)
        gate.propose(candidate.tag)
        controllers = {
            CANDIDATE: self._controller(candidate),
            "deployed": self._controller(self.base),
        }
        steps = 0
        while True:
            arm = gate.next_arm()
            ep = run_episode(self.robot, controllers[arm], actor=None, episode=self.episodes)
            steps += len(ep.data)
            self.episodes += 1
            verdict = gate.record(arm, ep.judged)
            if verdict is not None:
                break
        self.env_steps += steps
        return {
            **verdict.as_dict(),
            "env_steps": steps,
            "wall_s": round(time.perf_counter() - t, 1),
        }


def improve(config: ImproveConfig) -> dict[str, Any]:
    set_threads(config.threads)
    torch.manual_seed(config.learner.seed)
    steps_per_round = config.residual_steps_per_round()
    # Every input is checked before the long work (the demonstrations may take minutes).
    reason = check_task(config.task)
    if reason is not None:
        raise LearningError(reason)
    parse_offset(config.action_offset)
    base = OnnxPolicy.load(resolve_model_path(config.base_model))
    if config.task not in base.metadata.tasks:
        raise LearningError(
            f"{base.tag} does not know task {config.task!r} (its tasks: "
            f"{', '.join(base.metadata.tasks)}); pass --base-model for it"
        )
    for name in ("teacher", "student"):
        if not resolve_model_path(getattr(config, name)).is_file():
            raise LearningError(f"--{name} {getattr(config, name)}: no such checkpoint")
    demos = ensure_demonstrations(Path(config.demos))
    with run_folder(config.out, overwrite=config.overwrite, marker="metrics.json") as run_dir:
        write_config(run_dir, "improve", config)
        log = MetricsLog(run_dir)
        imp = Improver(config, run_dir)
        original = imp.evaluate(imp.base, None)
        print(f"original base {imp.base.tag} alone: {original:.2f}", flush=True)
        log.log(kind="eval", what="original_base", tag=imp.base.tag, success=original)
        rounds: list[dict[str, Any]] = []
        for r, steps in enumerate(steps_per_round, start=1):
            row: dict[str, Any] = {"round": r, "base": imp.base.tag}
            row["residual"] = imp.residual_stage(steps, log)
            row["base_plus_residual_success"] = imp.evaluate(imp.base, imp.stage.deployed)
            print(
                f"round {r}: {imp.stage.deployed_tag} {row['base_plus_residual_success']:.2f} "
                f"after {imp.env_steps} env steps",
                flush=True,
            )
            round_dir = run_dir / f"round{r}"
            row["hybrid"] = imp.hybrid_rollouts(round_dir / "hybrid")
            if row["hybrid"]["successes"] == 0:
                row["distill"] = {"skipped": "the hybrid rollouts yielded no success"}
                row["new_base_alone_success"] = None
                rounds.append(row)
                log.log(kind="round", **row)
                continue
            name, version = imp.base.metadata.model_id, imp.base.metadata.version + 1
            dcfg = replace(
                DistillBackConfig(),
                teacher=imp.teacher,
                student=imp.student,
                rl_fraction=config.rl_fraction,
                finetune_steps=config.finetune_steps,
                distill_steps=config.distill_steps,
                seed=config.learner.seed,
                threads=config.threads,
                tensorrt="off",
            )
            result = distill_back(
                dcfg,
                demos=[demos],
                rl_data=[round_dir / "hybrid"],
                out=round_dir / "distill",
                parent=imp.base.tag,
                collected_by=row["hybrid"]["acted"],
                version=version,
                model_id=name,
            )
            row["distill"] = {
                "onnx": str(result.onnx),
                "tag": result.tag,
                "wall_s": round(result.wall_s, 1),
            }
            candidate = OnnxPolicy.load(result.onnx)
            row["new_base_alone_success"] = imp.evaluate(candidate, None)
            row["gate"] = imp.base_gate(candidate)
            accepted = bool(row["gate"]["accepted"])
            set_gate_verdict(
                result.onnx,
                "promoted" if accepted else "rejected",
                reason=row["gate"]["reason"],
                candidate_successes=row["gate"]["candidate_successes"],
                deployed_successes=row["gate"]["deployed_successes"],
                episodes=row["gate"]["candidate_episodes"],
            )
            print(
                f"round {r}: new base {result.tag} alone {row['new_base_alone_success']:.2f} "
                f"(gate: {'promoted' if accepted else 'refused'}, {row['gate']['reason']})",
                flush=True,
            )
            if accepted:
                imp.base = OnnxPolicy.load(result.onnx)
                imp.teacher = str(result.teacher_checkpoint)
                imp.student = str(result.student_checkpoint)
                imp.stage = imp._new_stage()  # a fresh residual on the new base
            row["env_steps_total"] = imp.env_steps
            row["wall_s_total"] = round(time.perf_counter() - imp.t0, 1)
            rounds.append(row)
            log.log(kind="round", **row)
        final_base = imp.evaluate(imp.base, None)
        summary = {
            "task": config.task,
            "seed": config.learner.seed,
            "action_offset": imp.offset.tolist(),
            "original_base": config.base_model,
            "original_base_success": original,
            "final_base": imp.base.tag,
            "final_base_path": str(imp.base.path),
            "final_base_alone_success": final_base,
            "rounds": rounds,
            "env_steps": imp.env_steps,
            "wall_s": round(time.perf_counter() - imp.t0, 1),
        }
        log.summary(**summary)
        write_json(run_dir / "improve.json", summary)
        return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ImproveConfig)


def run(args: argparse.Namespace) -> int:
    s = improve(config_from_args(ImproveConfig, args))
    print(
        f"base {s['final_base']} alone: {s['final_base_alone_success']:.2f} (original "
        f"{s['original_base_success']:.2f}) after {s['env_steps']} env steps, {s['wall_s']} s"
    )
    return 0


__all__ = ["ImproveConfig", "improve"]
