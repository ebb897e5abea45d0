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

A run can be interrupted and resumed. At every evaluation, and when Ctrl-C or SIGTERM stops
it, the run writes its resume state to ``<out>/resume``: the learner checkpoint, the deployed
and candidate blobs, and ``state.json`` (counters, curve, the gate's trial, random states, the
replay shards it covers and how much of ``metrics.jsonl``). Finished episodes are on disk at
every save (``<out>/episodes``, or ``<out>/resume/episodes`` without ``--record-episodes``).
``--resume`` continues from there: the learner's buffers are rebuilt from the recorded
episodes, recording and metrics go on in the same files, and the run ends with the same
summary as an uninterrupted one; the resume folder is removed when the run finishes.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.core.residual import EXPLORATION_NOISE_STD, MLPResidual
from vlarl.core.weights import decode_residual
from vlarl.data.replay import ReplayWriter, Transitions, atomic_write_bytes, read_shard
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
    config_differences,
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
RESUME_DIR = "resume"
RESUME_STATE = f"{RESUME_DIR}/state.json"
RESUME_FORMAT = "vlarl.train_residual.resume/1"
# Settings a resumed run may change; every other one must be what the run was started with.
FREE_ON_RESUME = frozenset(
    {"total_steps", "threads", "progress", "out", "overwrite", "resume", "save_checkpoints"}
)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    overwrite: bool = arg(False, "replace a finished (or interrupted) run in --out")
    resume: bool = arg(
        False, "continue the interrupted run in --out from its resume state (same settings)"
    )
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
        if self.resume and self.overwrite:
            raise LearningError("--resume continues the run in --out, --overwrite replaces it")


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
        checkpoint: Path | None = None,
    ) -> None:
        self.base_tag = base.tag
        self.learner = ResidualLearner(learner, base=base.metadata, checkpoint=checkpoint)
        self.gate = DeploymentGate(gate_rule, deployed=base.tag) if gate == "rollouts" else None
        self.noise_std = noise_std
        self.rng = np.random.default_rng(seed + 17)
        self.deployed: MLPResidual | None = None
        self.deployed_blob: bytes | None = None  # the deployed actor's blob (resume state)
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
                    self.deployed, self.deployed_blob = actor, cand.blob
                self.verdicts.append({"step": self.learner.transitions, **verdict.as_dict()})
        u0 = time.perf_counter()
        self.learner.train(max_updates=int(self.learner.updates_owed))
        self.update_s += time.perf_counter() - u0
        due = self.learner.agent.updates - self.last_propose_at >= self.learner.config.publish_every
        if self.gate is not None:
            # A trial costs tens of episodes: none for a residual still ramping up from zero.
            cfg = self.learner.config
            due = due and self.learner.transitions >= cfg.probe_transitions + cfg.warmup_ramp
        if due and self.candidate is None:
            self.last_propose_at = self.learner.agent.updates
            proposal = self.learner.propose()
            if proposal is not None and proposal.blob is not None:
                actor = decode_residual(proposal.blob).actor()  # what the policy node installs
                self.proposed += 1
                if self.gate is None:
                    self.learner.promote(proposal)
                    self.deployed, self.deployed_blob = actor, proposal.blob
                else:
                    self.candidate = (proposal, actor)
                    self.gate.propose(self.tag_of(actor))
        return verdict

    @property
    def deployed_tag(self) -> str:
        return self.tag_of(self.deployed)

    def save_resume(self, folder: Path, tag: str) -> dict[str, Any]:
        """Write what resuming this stage needs: the learner checkpoint and the deployed and
        candidate blobs into ``folder`` (file names carry ``tag``); returns the rest, for the
        resume state's JSON."""
        learner = self.learner
        checkpoint = f"learner-{tag}.safetensors"
        learner.save(folder / checkpoint)
        doc: dict[str, Any] = {
            "checkpoint": checkpoint,
            "proposed": self.proposed,
            "last_propose_at": self.last_propose_at,
            "verdicts": self.verdicts,
            "update_s": self.update_s,
            "deployed_blob": None,
            "candidate": None,
            "gate": None,
            "learner": {
                "transitions": learner.transitions,
                "updates_owed": learner.updates_owed,
                "updates_done": learner.updates_done,
                "updates_forgiven": learner.updates_forgiven,
                "gated": learner.gated,
                "probe_transitions": learner.probe_transitions,
                "probe_extensions": learner.probe_extensions,
                "notes": learner.notes,
                "last_stats": learner.last_stats,
            },
            "rng": {
                "exploration": self.rng.bit_generator.state,
                "batches": learner.rng.bit_generator.state,
                "agent": learner.agent.rng.bit_generator.state,
                "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            },
        }
        if self.deployed_blob is not None:
            doc["deployed_blob"] = f"deployed-{tag}.blob"
            atomic_write_bytes(folder / doc["deployed_blob"], self.deployed_blob, overwrite=True)
        cand = None if self.candidate is None else self.candidate[0]
        if cand is not None and cand.blob is not None:
            name = f"candidate-{tag}.blob"
            atomic_write_bytes(folder / name, cand.blob, overwrite=True)
            doc["candidate"] = {
                "version": cand.version,
                "parent": cand.parent,
                "estimate": cand.estimate,
                "deployed_estimate": cand.deployed_estimate,
                "scale": cand.scale,
                "blob": name,
            }
        if self.gate is not None:
            doc["gate"] = {
                "deployed": self.gate.deployed,
                "candidate": self.gate.candidate,
                "tally": self.gate.tally,
            }
        return doc

    def restore(
        self, doc: dict[str, Any], folder: Path, recorded: Transitions | None, tags: list[str]
    ) -> None:
        """Continue from :meth:`save_resume`'s ``doc``: the learner (built on its checkpoint)
        re-adds the ``recorded`` episodes (``policy_version`` indexes ``tags``) to rebuild its
        buffers, then gets back its counters, random states, deployed actor and the gate's
        trial."""
        learner = self.learner
        counters = doc["learner"]
        if not learner.resumed:
            raise LearningError(f"{folder / doc['checkpoint']}: the learner checkpoint is missing")
        # Set before the episodes go back in, so their re-adding does not extend the probe again.
        learner.probe_transitions = int(counters["probe_transitions"])
        learner.probe_extensions = int(counters["probe_extensions"])
        if recorded is not None:
            learner.add(recorded, tags)
        if learner.transitions != counters["transitions"]:
            raise LearningError(
                f"{folder}: the recorded episodes hold {learner.transitions} transitions, the "
                f"resume state {counters['transitions']}; they are not of this run"
            )
        learner.updates_owed = float(counters["updates_owed"])
        learner.updates_done = int(counters["updates_done"])
        learner.updates_forgiven = int(counters["updates_forgiven"])
        learner.gated = int(counters["gated"])
        learner.notes = list(counters["notes"])
        learner.last_stats = dict(counters["last_stats"])
        rng = doc["rng"]
        self.rng.bit_generator.state = rng["exploration"]
        learner.rng.bit_generator.state = rng["batches"]
        learner.agent.rng.bit_generator.state = rng["agent"]
        torch_state = np.frombuffer(base64.b64decode(rng["torch"]), np.uint8).copy()
        torch.set_rng_state(torch.from_numpy(torch_state))
        self.proposed = int(doc["proposed"])
        self.last_propose_at = int(doc["last_propose_at"])
        self.verdicts = list(doc["verdicts"])
        self.update_s = float(doc["update_s"])
        if doc["deployed_blob"] is not None:
            self.deployed_blob = (folder / doc["deployed_blob"]).read_bytes()
            weights = decode_residual(self.deployed_blob)
            self.deployed = weights.actor()
            learner.deployed_layers = [(w.copy(), b.copy()) for w, b in weights.layers]
        if doc["candidate"] is not None:
            saved = doc["candidate"]
            blob = (folder / saved["blob"]).read_bytes()
            weights = decode_residual(blob)
            cand = Candidate(
                version=int(saved["version"]),
                parent=int(saved["parent"]),
                accepted=True,
                estimate=float(saved["estimate"]),
                deployed_estimate=float(saved["deployed_estimate"]),
                blob=blob,
                layers=[(w.copy(), b.copy()) for w, b in weights.layers],
                scale=float(saved["scale"]),
            )
            self.candidate = (cand, weights.actor())
        if self.gate is not None and doc["gate"] is not None:
            self.gate.deployed = doc["gate"]["deployed"]
            self.gate.candidate = doc["gate"]["candidate"]
            self.gate.tally = {arm: list(n) for arm, n in doc["gate"]["tally"].items()}


class StopSignals:
    """SIGINT and SIGTERM stop the run (:class:`KeyboardInterrupt`), except inside a
    :meth:`held` block (an episode's bookkeeping, a resume save): there the stop waits for the
    block's end, so the resume state never holds half an episode. Only the main thread can
    install signal handlers; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.holding = 0
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.holding:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"by {signal.Signals(signum).name}")

    def ignore(self) -> None:
        """From now on a stop signal changes nothing (the clean-up after a stop must finish)."""
        self.holding += 1

    @contextmanager
    def held(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if not self.holding and self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(f"by {signal.Signals(signum).name}")


def _read_recorded(folder: Path, names: Sequence[str]) -> tuple[Transitions | None, list[str]]:
    """The episodes of the shards ``names`` in ``folder``, in order, as one batch whose
    ``policy_version`` indexes the returned version tags."""
    tags: list[str] = []
    parts = []
    for name in names:
        data, info = read_shard(folder / name)
        index = []
        for tag in info.versions:
            if tag not in tags:
                tags.append(tag)
            index.append(tags.index(tag))
        if len(data):
            data.policy_version = np.asarray(index, np.int32)[data.policy_version]
            parts.append(data)
    return (Transitions.concatenate(parts) if parts else None), tags


def _load_resume_state(run_dir: Path, config: TrainResidualConfig) -> dict[str, Any]:
    """The resume state of the interrupted run in ``run_dir``, checked against ``config``."""
    try:
        started = json.loads((run_dir / "config.json").read_text())
        state = json.loads((run_dir / RESUME_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise LearningError(f"{run_dir}: cannot read the run to resume ({exc})") from None
    if started.get("verb") != "train-residual" or state.get("format") != RESUME_FORMAT:
        raise LearningError(f"{run_dir}: not an interrupted train-residual run")
    differences = config_differences(started["config"], config, may_differ=FREE_ON_RESUME)
    if differences:
        raise LearningError(
            f"--resume: {run_dir} was started with other settings ({'; '.join(differences)}); "
            "resume it with the settings it was started with"
        )
    return dict(state)


def train(config: TrainResidualConfig) -> dict[str, Any]:
    offset = parse_offset(config.action_offset)
    set_threads(config.threads)
    torch.manual_seed(config.learner.seed)
    base_policy = OnnxPolicy.load(resolve_model_path(config.base_model))
    learner_config = config.learner
    learning = config.method == "residual"
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
        run_folder(
            config.out,
            overwrite=config.overwrite,
            marker="metrics.json",
            resume_marker=RESUME_STATE,
            resume=config.resume,
        ) as run_dir,
        ExitStack() as stack,
        StopSignals() as stops,
    ):
        resume_dir = run_dir / RESUME_DIR
        saved: dict[str, Any] | None = None
        if config.resume:
            saved = _load_resume_state(run_dir, config)
            started = json.loads((run_dir / "config.json").read_text())
            first = {
                "first_created": started.get("first_created", started["created"]),
                "first_argv": started.get("first_argv", started["argv"]),
            }
            write_config(run_dir, "train-residual", config, extra=first)
        else:
            shutil.rmtree(resume_dir, ignore_errors=True)  # an overwritten run's
            write_config(run_dir, "train-residual", config)
        log = (
            MetricsLog(run_dir)
            if saved is None
            else MetricsLog(run_dir, keep_bytes=saved["metrics_bytes"], elapsed_s=saved["wall_s"])
        )
        # The learner's buffers are rebuilt from the recorded episodes on --resume: a learning
        # run records them even without --record-episodes (then only until it finishes).
        episodes_dir = run_dir / "episodes" if config.record_episodes else resume_dir / "episodes"
        recorder = (
            stack.enter_context(
                ReplayWriter(
                    episodes_dir,
                    source=f"train-residual:{config.method}",
                    tasks=[config.task],
                    extra={"reward": config.reward, "seed": config.learner.seed},
                )
            )
            if config.record_episodes or learning
            else None
        )
        shards: list[str] = [] if saved is None else list(saved["shards"])
        episodes, train_successes, steps = 0, 0, 0
        detector_false, detector_missed = 0, 0
        next_eval = 0
        curve: list[dict[str, Any]] = []
        resumes = 0
        if saved is not None:
            steps, episodes = int(saved["steps"]), int(saved["episodes"])
            train_successes = int(saved["train_successes"])
            detector_false = int(saved["detector_false_successes"])
            detector_missed = int(saved["detector_missed_successes"])
            next_eval, curve = int(saved["next_eval"]), list(saved["curve"])
            resumes = int(saved["resumes"]) + 1
        robot = MetaWorldRobot(
            config.task,
            seed=config.learner.seed,
            end_on_success=False,
            max_episode_steps=config.max_episode_steps,
            first_episode=episodes,  # a resumed run goes on with the next layout
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
        stage_saved = None if saved is None else saved["stage"]
        stage = ResidualStage(
            base_policy,
            learner=learner_config,
            gate=config.gate,
            gate_rule=config.gate_rule,
            noise_std=config.residual_noise_std,
            seed=config.learner.seed,
            checkpoint=(
                resume_dir / stage_saved["checkpoint"] if stage_saved is not None else None
            ),
        )
        if stage_saved is not None:
            recorded, tags = _read_recorded(episodes_dir, shards)
            stage.restore(stage_saved, resume_dir, recorded, tags)
        elif saved is not None:
            stage.rng.bit_generator.state = saved["rng"]["exploration"]
        if saved is not None:
            log.log(kind="resume", step=steps, episode=episodes, resumes=resumes)
        t0 = time.perf_counter() - (0.0 if saved is None else float(saved["wall_s"]))
        exploration_rng = stage.rng.bit_generator.state  # before the episode that runs next
        save_count = 0 if saved is None else int(saved["save"])
        listed = 0  # the recorder's shards already in ``shards``

        def save_resume_state() -> None:
            """Flush the recorder and write the resume state (atomic: ``state.json`` names the
            files of this save, older files go after it is in place)."""
            nonlocal save_count, listed
            with stops.held():
                if recorder is not None:
                    recorder.flush()
                    shards.extend(info.path.name for info in recorder.written[listed:])
                    listed = len(recorder.written)
                save_count += 1
                tag = f"{save_count:06d}"
                resume_dir.mkdir(parents=True, exist_ok=True)
                stage_state = stage.save_resume(resume_dir, tag) if learning else None
                state = {
                    "format": RESUME_FORMAT,
                    "save": save_count,
                    "resumes": resumes,
                    "steps": steps,
                    "episodes": episodes,
                    "train_successes": train_successes,
                    "detector_false_successes": detector_false,
                    "detector_missed_successes": detector_missed,
                    "next_eval": next_eval,
                    "curve": curve,
                    "wall_s": round(time.perf_counter() - t0, 3),
                    "metrics_bytes": log.size(),
                    "episodes_dir": str(episodes_dir.relative_to(run_dir)),
                    "shards": shards,
                    "stage": stage_state,
                    "rng": {"exploration": exploration_rng},
                }
                if stage_state is not None:
                    stage_state["rng"]["exploration"] = exploration_rng
                write_json(run_dir / RESUME_STATE, state)
                for old in resume_dir.glob("*-*.*"):
                    if old.is_file() and old.stem.rpartition("-")[2] != tag:
                        old.unlink()

        def evaluate_next() -> None:
            """Evaluate the deployed version at step ``next_eval`` and move that on."""
            nonlocal next_eval
            step = next_eval
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
            with stops.held():  # an evaluation counts whole or not at all
                curve.append(res)
                log.log(kind="eval", **res)
                if learning and config.save_checkpoints:
                    stage.learner.save(run_dir / "checkpoints" / f"step{step:07d}.safetensors")
                next_eval += config.eval_every

        bar = tqdm(
            total=config.total_steps,
            initial=min(steps, config.total_steps),
            disable=not config.progress,
            desc=f"{config.method} seed {config.learner.seed}",
            unit="step",
        )
        try:
            while True:
                evaluated = False
                while steps >= next_eval and next_eval <= config.total_steps:
                    evaluate_next()
                    bar.set_postfix(success=f"{curve[-1]['success_rate']:.2f}")
                    evaluated = True
                if evaluated:
                    save_resume_state()
                if steps >= config.total_steps:
                    break
                arm, actor = stage.next_actor() if learning else (DEPLOYED, None)
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
                with stops.held():  # an episode counts whole or not at all
                    n = len(episode.data)
                    steps += n
                    episodes += 1
                    train_successes += int(episode.success)
                    if reward_model is not None:
                        detector_false += int(episode.judged and not episode.success)
                        detector_missed += int(episode.success and not episode.judged)
                    if learning:
                        verdict = stage.learn_from(episode, tag=tag, arm=arm)
                        if verdict is not None:
                            log.log(kind="gate", step=steps, **verdict.as_dict())
                    written = 0 if recorder is None else len(recorder.written)
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
                    exploration_rng = stage.rng.bit_generator.state
                    bar.update(n)
                    if recorder is not None and len(recorder.written) > written:
                        save_resume_state()  # a full shard went to disk: the state covers it
        except KeyboardInterrupt:
            stops.ignore()  # nothing may cut the save short
            bar.close()
            save_resume_state()
            kept = f", all kept in {episodes_dir}" if recorder is not None else ""
            raise KeyboardInterrupt(
                f"at {steps}/{config.total_steps} env steps ({episodes} episodes{kept}); "
                f"continue with the same command plus --resume "
                f"(vlarl train-residual --out {config.out} ... --resume)"
            ) from None
        bar.close()
        if recorder is not None:
            recorder.flush()
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
            "resumes": resumes,
            "learner": {k: v for k, v in learner.status().items() if k != "episodes_by_tag"},
        }
        if learning:
            learner.save(run_dir / "learner.safetensors")
        log.summary(**summary)
        write_json(run_dir / "curve.json", summary)
        shutil.rmtree(resume_dir, ignore_errors=True)  # finished: nothing left to resume
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
