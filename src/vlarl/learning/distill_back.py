"""``vlarl distill-back``: a new base version from the demonstrations plus the RL successes.

PLD's stage 3 (and RLDG): what the residual learned on the robot is distilled back into the base
policy, so the next base acts well without a residual. Three steps, one function
(:func:`distill_back`):

1. Fine-tune the flow teacher (supervised, rectified flow as ``vlarl train-teacher``) starting from
   the current base's teacher checkpoint. Every batch draws ``rl_fraction`` of its rows from the
   RL data (the successful episodes the residual collected, replay folders as ``ReplayWriter``
   writes them; their ``action`` column, the executed command, is the label) and the rest from the
   demonstrations, so the teacher keeps what it knew (RLDG's claim: the generalist does not forget).
   The saved teacher is an EMA of the fine-tuned weights.
2. Re-distill a one-step student from the fine-tuned teacher, starting from the current base's
   student checkpoint: consistency distillation plus the endpoint anchor, exactly the losses of
   ``vlarl distill`` (:func:`vlarl.learning.distill.consistency_losses`), on the same mixture, with
   far fewer steps (the student only has to follow the teacher's change).
3. Export the student to ONNX through ``vlarl export``'s path (ONNX Runtime checked against
   PyTorch, then the policy node's loader), with LINEAGE in the model's metadata
   (``vlarl.lineage``): the parent base tag, sha256 digests of every data folder it was trained on,
   the residual version that collected the RL data, and the gate's verdict, "pending" until
   :func:`set_gate_verdict` rewrites it after the gate.

The defaults are the tuned recipe and keep one round under ~3-4 minutes on one CPU core
(``bench/distill_back.py`` measures it on the shifted arm).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlarl.contract import ModelMetadata
from vlarl.data.errors import ReplayError
from vlarl.data.replay import Replay, ShardInfo, atomic_write_bytes, load_replay
from vlarl.graph import resolve_model_path
from vlarl.learning.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from vlarl.learning.dataset import TensorData, build_chunks
from vlarl.learning.distill import consistency_losses
from vlarl.learning.errors import LearningError
from vlarl.learning.export import ExportConfig, export, with_metadata
from vlarl.learning.networks import ConsistencyPolicy, FlowPolicy
from vlarl.learning.runs import (
    MetricsLog,
    add_config_arguments,
    arg,
    config_from_args,
    run_folder,
    set_seed,
    set_threads,
    write_config,
    write_json,
)
from vlarl.learning.teacher import flow_matching_loss
from vlarl.learning.training import EMA, cosine_lr, make_optimizer, select_episodes

DEFAULT_TEACHER = "models/pick-place-v3-teacher.safetensors"
DEFAULT_STUDENT = "models/pick-place-v3-student.safetensors"
DEFAULT_DEMOS = "data/default/pick-place-mixed"
# The demonstrations of the default base: the `vlarl collect` call of
# scripts/build_default_model.sh (deterministic; ~10 minutes on this machine).
DEFAULT_DEMO_RECIPE: dict[str, Any] = {
    "tasks": "pick-place-v3",
    "episodes": 400,
    "sigmas": "0,0.5,1.0,2.0",
    "seed": 0,
}
VERDICTS = ("pending", "promoted", "rejected")
TEACHER_FILE = "teacher.safetensors"
STUDENT_FILE = "student.safetensors"


@dataclass
class DistillBackConfig:
    teacher: str = arg(DEFAULT_TEACHER, "flow teacher checkpoint of the current base (fine-tuned)")
    student: str = arg(
        DEFAULT_STUDENT, "one-step student checkpoint of the current base (re-distilled)"
    )
    rl_fraction: float = arg(0.5, "share of every batch drawn from the RL data (the mixture ratio)")
    rl_episodes: str = arg("success", "RL episodes learned from: 'success' or 'all'")
    finetune_steps: int = arg(2000, "teacher fine-tuning gradient steps")
    finetune_lr: float = arg(3e-4, "teacher peak learning rate (AdamW, warm-up then cosine)")
    finetune_ema: float = arg(0.99, "decay of the teacher weight average that is saved")
    distill_steps: int = arg(1500, "student re-distillation gradient steps")
    distill_lr: float = arg(3e-4, "student peak learning rate (AdamW, warm-up then cosine)")
    distill_ema: float = arg(0.99, "decay of the student weight average that is exported")
    target_ema: float = arg(0.95, "decay of the consistency target network f-")
    anchor_weight: float = arg(1.0, "weight of the endpoint anchor term (0 = pure consistency)")
    anchor_fraction: float = arg(0.25, "share of each distillation batch used for the anchor")
    batch_size: int = arg(256, "samples per gradient step (both stages)")
    weight_decay: float = arg(1e-4, "AdamW weight decay (both stages)")
    warmup: int = arg(100, "learning-rate warm-up steps (both stages)")
    tolerance: float = arg(1e-4, "largest allowed |onnxruntime - pytorch| in the export check")
    check_samples: int = arg(256, "observations used for the export's numerical check")
    tensorrt: str = arg("auto", "fp16 TensorRT engine: 'auto' (if a GPU is here), 'on', 'off'")
    seed: int = arg(0, "random seed")
    threads: int = arg(1, "PyTorch CPU threads")
    log_every: int = arg(100, "steps between metrics lines")
    overwrite: bool = arg(False, "replace a finished distill-back in --out")


@dataclass
class DistillBackInputs:
    """What one round distills (the command line's inputs; :func:`distill_back` takes them)."""

    rl_data: str = arg(
        "", "replay folders of RL-collected episodes (comma-separated)", required=True
    )
    out: str = arg("", "run folder: checkpoints, ONNX model, config and metrics", required=True)
    parent: str = arg(
        "", "tag of the base this round starts from (model_id@version)", required=True
    )
    collected_by: str = arg(
        "", "version tag that collected the RL data (e.g. base@1+residual@7)", required=True
    )
    demos: str = arg(DEFAULT_DEMOS, "replay folders of the demonstrations (comma-separated)")
    make_demos: bool = arg(
        True, "regenerate the default demonstrations into --demos when that folder does not exist"
    )
    version: int = arg(0, "version of the new base (0 = the parent's version + 1)")
    model_id: str = arg("", "model id of the new base (empty = the parent's)")


@dataclass
class DistillBackResult:
    """What one round produced."""

    onnx: Path
    sha256: str  # of the ONNX file
    metadata: ModelMetadata
    teacher_checkpoint: Path
    student_checkpoint: Path
    losses: dict[str, Any]  # first/final values and the logged curves of every loss
    wall_s: float
    cpu_s: float  # CPU time of this process (the budget is one core; the machine may be shared)
    stage_s: dict[str, float] = field(default_factory=dict)
    max_abs_err_vs_pytorch: float = float("nan")

    @property
    def tag(self) -> str:
        return self.metadata.tag


def replay_digest(replay: Replay, folder: Path) -> str:
    """sha256 of one replay folder: its shard names with each shard's verified tensor digest
    (the shards' creation times do not enter: regenerated data has the same digest)."""
    h = hashlib.sha256()
    for info in _shards_of(replay, folder):
        h.update(f"{info.path.name}:{info.sha256}\n".encode())
    return h.hexdigest()


def _shards_of(replay: Replay, folder: Path) -> list[ShardInfo]:
    here = Path(folder).resolve()
    return sorted(
        (s for s in replay.shards if s.path.parent.resolve() == here), key=lambda s: s.path.name
    )


def ensure_demonstrations(folder: Path) -> Path:
    """The default base's demonstrations in ``folder``: regenerated (deterministically, the same
    ``vlarl collect`` call as scripts/build_default_model.sh) when the folder does not exist."""
    folder = Path(folder)
    if (folder / "metrics.json").is_file():
        return folder
    if folder.exists():
        raise LearningError(
            f"{folder} exists but holds no finished collection (no metrics.json); delete it to "
            "regenerate the demonstrations, or pass --demos"
        )
    from vlarl.learning.collect import CollectConfig, collect

    collect(CollectConfig(out=str(folder), **DEFAULT_DEMO_RECIPE))
    return folder


def parse_tag(tag: str) -> tuple[str, int]:
    """``model_id@version`` -> (model_id, version)."""
    model_id, sep, version = tag.rpartition("@")
    if not sep or not model_id or not version.isdigit():
        raise LearningError(
            f"a base tag is model_id@version (e.g. pick-place-v3-student@1), got {tag!r}"
        )
    return model_id, int(version)


def _load_samples(
    folders: list[Path], teacher: Checkpoint, *, episodes: str, what: str
) -> tuple[TensorData, list[dict[str, Any]]]:
    """Chunked samples of ``folders`` for the teacher's tasks, with each folder's digest."""
    if not folders:
        raise LearningError(f"no {what} folder given")
    try:
        replay = load_replay(folders)
    except ReplayError as exc:
        raise LearningError(f"cannot load the {what}: {exc}") from None
    records = [
        {
            "name": f.name,
            "sha256": replay_digest(replay, f),
            "rows": sum(s.rows for s in _shards_of(replay, f)),
        }
        for f in folders
    ]
    replay = select_episodes(replay, episodes)
    tasks = tuple(t for t in teacher.tasks if t in replay.tasks)
    if not tasks:
        raise LearningError(
            f"the {what} hold none of the model's tasks {list(teacher.tasks)} "
            f"(they hold {list(replay.tasks)})"
        )
    instructions = None
    if teacher.spec.instr_dim > 0:  # the model's own embeddings, no sentence encoder needed
        instructions = np.stack([teacher.instructions[t] for t in tasks]).astype(np.float32)
    dataset = build_chunks(
        replay, chunk_length=teacher.spec.chunk_length, tasks=tasks, instructions=instructions
    )
    return dataset.tensors(), records


class MixedBatches:
    """Batches with ``rl_fraction`` of the rows from the RL data, the rest from the demos,
    shuffled (so the distillation's anchor rows are a fair share of both)."""

    def __init__(
        self, demos: TensorData, rl: TensorData, *, rl_fraction: float, batch_size: int
    ) -> None:
        self.data = TensorData(
            obs=torch.cat([demos.obs, rl.obs]),
            chunks=torch.cat([demos.chunks, rl.chunks]),
            instr=None
            if demos.instr is None or rl.instr is None
            else torch.cat([demos.instr, rl.instr]),
        )
        self.n_demo = demos.obs.shape[0]
        self.n_rl = rl.obs.shape[0]
        self.n_from_rl = round(rl_fraction * batch_size)
        self.batch_size = batch_size

    def sample(
        self, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m = self.n_from_rl
        index = torch.cat(
            [
                torch.randint(self.n_demo, (self.batch_size - m,), generator=gen),
                self.n_demo + torch.randint(self.n_rl, (m,), generator=gen),
            ]
        )
        index = index[torch.randperm(self.batch_size, generator=gen)]
        return self.data.batch(index)


def finetune_teacher(
    ckpt: Checkpoint, batches: MixedBatches, cfg: DistillBackConfig, log: MetricsLog
) -> tuple[FlowPolicy, list[tuple[int, float]]]:
    """Stage 1: flow matching on the mixture, from the current teacher; returns its EMA."""
    teacher = ckpt.policy
    assert isinstance(teacher, FlowPolicy)
    time_sampling = str(ckpt.config.get("time_sampling", "uniform"))
    source = str(ckpt.config.get("source", "gaussian"))
    teacher.train()
    ema = EMA(teacher, cfg.finetune_ema)
    opt = make_optimizer(teacher, lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve: list[tuple[int, float]] = []
    running = 0.0
    for step in range(cfg.finetune_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(
                step, total=cfg.finetune_steps, base=cfg.finetune_lr, warmup=cfg.warmup
            )
        obs, chunks, instr = batches.sample(gen)
        loss = flow_matching_loss(
            teacher, obs, chunks, instr, time_sampling=time_sampling, gen=gen, source=source
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        ema.update(teacher)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.finetune_steps:
            curve.append((step + 1, running))
            log.log(stage="finetune", step=step + 1, loss=running)
    final = ema.module
    for p in final.parameters():
        p.requires_grad_(False)
    return final, curve


def redistill_student(
    student_ckpt: Checkpoint,
    teacher: FlowPolicy,
    batches: MixedBatches,
    cfg: DistillBackConfig,
    log: MetricsLog,
) -> tuple[ConsistencyPolicy, dict[str, list[tuple[int, float]]]]:
    """Stage 2: consistency distillation of the new teacher, from the current student."""
    student = student_ckpt.policy
    assert isinstance(student, ConsistencyPolicy)
    student.train()
    target = EMA(student, cfg.target_ema)
    ema = EMA(student, cfg.distill_ema)
    opt = make_optimizer(student, lr=cfg.distill_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    grid = teacher.spec.steps
    curves: dict[str, list[tuple[int, float]]] = {"consistency": [], "anchor": []}
    run_cd = run_anchor = 0.0
    for step in range(cfg.distill_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(
                step, total=cfg.distill_steps, base=cfg.distill_lr, warmup=cfg.warmup
            )
        obs, chunks, instr = batches.sample(gen)
        # The anchor integrates the teacher's K steps from x_0 = 0 for its rows, here per batch:
        # precomputing them for every demonstration would cost more than the whole stage.
        cd, anchor = consistency_losses(
            student,
            target.module,
            teacher,
            obs,
            chunks,
            instr,
            grid=grid,
            anchor_fraction=cfg.anchor_fraction if cfg.anchor_weight > 0 else 0.0,
            noise_scale=0.0,
            gen=gen,
        )
        loss = cd + cfg.anchor_weight * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        target.update(student)
        ema.update(student)
        c, a = cd.item(), anchor.item()
        run_cd = 0.98 * run_cd + 0.02 * c if step else c
        run_anchor = 0.98 * run_anchor + 0.02 * a if step else a
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.distill_steps:
            curves["consistency"].append((step + 1, run_cd))
            curves["anchor"].append((step + 1, run_anchor))
            log.log(stage="distill", step=step + 1, consistency=run_cd, anchor=run_anchor)
    return ema.module, curves


def _check_config(cfg: DistillBackConfig) -> None:
    if not 0.0 <= cfg.rl_fraction <= 1.0:
        raise LearningError(f"--rl-fraction must be in [0, 1], got {cfg.rl_fraction}")
    if cfg.finetune_steps < 1 or cfg.distill_steps < 1:
        raise LearningError("--finetune-steps and --distill-steps must be >= 1")
    if cfg.batch_size < 2:
        raise LearningError(f"--batch-size must be >= 2, got {cfg.batch_size}")
    if cfg.anchor_weight > 0 and not 0 < cfg.anchor_fraction <= 1:
        raise LearningError("--anchor-fraction must be in (0, 1]")


def distill_back(
    config: DistillBackConfig,
    *,
    demos: list[Path],
    rl_data: list[Path],
    out: Path,
    parent: str,
    collected_by: str,
    version: int,
    model_id: str,
) -> DistillBackResult:
    """One round of distill-back: fine-tune, re-distill, export with lineage (module doc)."""
    _check_config(config)
    parse_tag(parent)
    if version < 0:
        raise LearningError(f"version must be >= 0, got {version}")
    out = Path(out)
    onnx_path = out / f"{model_id}-v{version}.onnx"
    with run_folder(out, overwrite=config.overwrite, marker=onnx_path.name) as run_dir:
        return _distill_back(
            config,
            demos=[Path(d) for d in demos],
            rl_data=[Path(d) for d in rl_data],
            run_dir=run_dir,
            onnx_path=onnx_path,
            parent=parent,
            collected_by=collected_by,
            version=version,
            model_id=model_id,
        )


def _distill_back(
    cfg: DistillBackConfig,
    *,
    demos: list[Path],
    rl_data: list[Path],
    run_dir: Path,
    onnx_path: Path,
    parent: str,
    collected_by: str,
    version: int,
    model_id: str,
) -> DistillBackResult:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    set_threads(cfg.threads)
    set_seed(cfg.seed)
    write_config(run_dir, "distill-back", cfg)
    teacher_ckpt = load_checkpoint(resolve_model_path(cfg.teacher))
    student_ckpt = load_checkpoint(resolve_model_path(cfg.student))
    if not isinstance(teacher_ckpt.policy, FlowPolicy):
        raise LearningError(
            f"{cfg.teacher} is a {teacher_ckpt.spec.kind!r} checkpoint, not a teacher"
        )
    if not isinstance(student_ckpt.policy, ConsistencyPolicy):
        raise LearningError(
            f"{cfg.student} is a {student_ckpt.spec.kind!r} checkpoint, not a student"
        )
    ts, ss = teacher_ckpt.spec, student_ckpt.spec
    if (ts.obs_dim, ts.action_dim, ts.chunk_length, ts.instr_dim, tuple(ts.tasks)) != (
        ss.obs_dim,
        ss.action_dim,
        ss.chunk_length,
        ss.instr_dim,
        tuple(ss.tasks),
    ):
        raise LearningError(f"{cfg.student} does not fit {cfg.teacher} (dims or tasks differ)")
    demo_data, demo_records = _load_samples(
        demos, teacher_ckpt, episodes="all", what="demonstrations"
    )
    rl_samples, rl_records = _load_samples(
        rl_data, teacher_ckpt, episodes=cfg.rl_episodes, what="RL data"
    )
    batches = MixedBatches(
        demo_data, rl_samples, rl_fraction=cfg.rl_fraction, batch_size=cfg.batch_size
    )
    log = MetricsLog(run_dir)
    print(
        f"distill-back: {batches.n_demo} demonstration and {batches.n_rl} RL samples, "
        f"{batches.n_from_rl}/{cfg.batch_size} of every batch from the RL data"
    )
    stage_s: dict[str, float] = {"load": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    teacher, ft_curve = finetune_teacher(teacher_ckpt, batches, cfg, log)
    teacher_digest = save_checkpoint(
        run_dir / TEACHER_FILE,
        teacher,
        step=teacher_ckpt.step + cfg.finetune_steps,
        instructions=teacher_ckpt.instructions or None,
        config={"distill_back": asdict(cfg), "stage": "finetune"},
        parent=teacher_ckpt.sha256,
    )
    stage_s["finetune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student, cd_curves = redistill_student(student_ckpt, teacher, batches, cfg, log)
    student_digest = save_checkpoint(
        run_dir / STUDENT_FILE,
        student,
        step=student_ckpt.step + cfg.distill_steps,
        instructions=student_ckpt.instructions or None,
        config={"distill_back": asdict(cfg), "stage": "distill"},
        parent=teacher_digest,
    )
    stage_s["distill"] = time.perf_counter() - t0

    lineage = {
        "parent": parent,
        "collected_by": collected_by,
        "data": {"demos": demo_records, "rl": rl_records},
        "rl_fraction": cfg.rl_fraction,
        "rl_episodes": cfg.rl_episodes,
        "checkpoints": {
            "parent_teacher": teacher_ckpt.sha256,
            "parent_student": student_ckpt.sha256,
            "teacher": teacher_digest,
            "student": student_digest,
        },
        "gate": {"verdict": "pending"},
    }
    t0 = time.perf_counter()
    exported = export(
        ExportConfig(
            checkpoint=str(run_dir / STUDENT_FILE),
            out=str(onnx_path),
            model_id=model_id,
            version=version,
            tolerance=cfg.tolerance,
            check_samples=cfg.check_samples,
            tensorrt=cfg.tensorrt,
            overwrite=True,
            seed=cfg.seed,
        ),
        lineage=lineage,
    )
    stage_s["export"] = time.perf_counter() - t0
    metadata = ModelMetadata.from_props(exported["metadata"])
    losses = {
        "finetune_first": ft_curve[0][1],
        "finetune_final": ft_curve[-1][1],
        "consistency_first": cd_curves["consistency"][0][1],
        "consistency_final": cd_curves["consistency"][-1][1],
        "anchor_first": cd_curves["anchor"][0][1],
        "anchor_final": cd_curves["anchor"][-1][1],
        "curves": {"finetune": ft_curve, **cd_curves},
    }
    wall = time.perf_counter() - t_start
    result = DistillBackResult(
        onnx=onnx_path,
        sha256=str(exported["sha256"]),
        metadata=metadata,
        teacher_checkpoint=run_dir / TEACHER_FILE,
        student_checkpoint=run_dir / STUDENT_FILE,
        losses=losses,
        wall_s=wall,
        cpu_s=time.process_time() - cpu_start,
        stage_s={k: round(v, 2) for k, v in stage_s.items()},
        max_abs_err_vs_pytorch=float(exported["max_abs_err_vs_pytorch"]),
    )
    log.summary(
        onnx=str(onnx_path),
        sha256=result.sha256,
        tag=result.tag,
        lineage=lineage,
        losses={k: v for k, v in losses.items() if k != "curves"},
        wall_s=round(wall, 2),
        cpu_s=round(result.cpu_s, 2),
        stage_s=result.stage_s,
        max_abs_err_vs_pytorch=result.max_abs_err_vs_pytorch,
    )
    return result


def student_from_onnx(path: str | Path, out: str | Path) -> str:
    """Write the torch checkpoint of an exported one-step student (its exact weights, read from
    the ONNX initializers); returns the checkpoint digest, which equals the digest of the
    checkpoint the file was exported from (recorded as ``checkpoint_sha256`` by the export)."""
    import onnx
    from onnx import numpy_helper

    from vlarl.learning.networks import PolicySpec, build_policy

    model = onnx.load_model(str(path))
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    if meta.kind != "student" or meta.start_noise > 0:
        raise LearningError(f"{path} is not a deterministic one-step student ({meta.kind})")
    weights = {
        t.name.removeprefix("policy."): numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name.startswith("policy.")
    }
    cond_proj = weights.get("cond.proj.weight")
    first = weights["field.net.0.weight"]
    depth = sum(1 for k in weights if k.startswith("field.net.") and k.endswith(".weight")) // 2
    spec = PolicySpec(
        kind="student",
        obs_dim=meta.obs_dim,
        action_dim=meta.action_dim,
        chunk_length=meta.chunk_length,
        instr_dim=meta.instr_dim,
        hidden=int(first.shape[0]),
        depth=depth,
        instr_proj=64 if cond_proj is None else int(cond_proj.shape[0]),
        time_features=0,
        steps=1,
        obs_kind=meta.obs_kind,
        tasks=list(meta.tasks),
        control_dt=meta.control_dt,
        instr_norm="cond.instr_mean" in weights,
        task_norm="task_norm.mean" in weights,
    )
    flat = meta.chunk_length * meta.action_dim
    # The first layer sees [x (flat), time features (2 * n), condition]; solve for n.
    cond_dim = meta.obs_dim + (spec.instr_proj if meta.instr_dim > 0 else 0)
    spec.time_features = (int(first.shape[1]) - flat - cond_dim) // 2
    policy = build_policy(spec)
    state = policy.state_dict()
    missing = [n for n in state if n not in weights and n != "field.time.freqs"]
    if missing:  # the time frequencies are a function of the spec; every other tensor must be read
        raise LearningError(f"{path}: the graph does not hold {', '.join(missing)}")
    for name in state:
        if name in weights:
            state[name] = torch.from_numpy(weights[name].copy())
    policy.load_state_dict(state, strict=True)
    instructions = {t: np.asarray(v, np.float32) for t, v in meta.instructions.items()}
    return save_checkpoint(
        out, policy, step=0, instructions=instructions or None, config={"from_onnx": str(path)}
    )


def teacher_from_student(
    student: Checkpoint, demos: list[Path], out: str | Path, cfg: DistillBackConfig
) -> str:
    """A flow teacher for a base whose own teacher is not at hand: the student's network read as
    a velocity field, then trained by flow matching on the demonstrations
    (``cfg.finetune_steps``, ``cfg.finetune_lr``).

    Why it is a valid start: the student is f(x_t, t) = x_t + (1 - t) F(x_t, t), and on the
    straight path x_t = (1 - t) x_0 + t x_1 the flow-matching target x_1 - x_0 equals
    (x_1 - x_t) / (1 - t), which is F when f(x_t, t) = x_1. So F is the velocity field that
    f implies; one Euler step of it from x_0 = 0 is exactly the student's action.
    """
    from vlarl.learning.networks import build_policy

    spec = dataclasses.replace(student.spec, kind="teacher", steps=10)
    teacher = build_policy(spec)
    teacher.load_state_dict(student.policy.state_dict(), strict=True)
    ckpt = dataclasses.replace(student, policy=teacher, spec=spec, config={})
    data, _ = _load_samples(demos, ckpt, episodes="all", what="demonstrations")
    batches = MixedBatches(data, data, rl_fraction=0.0, batch_size=cfg.batch_size)
    with run_folder(Path(out).parent, overwrite=True, marker=Path(out).name) as run_dir:
        trained, curve = finetune_teacher(ckpt, batches, cfg, MetricsLog(run_dir))
    print(f"teacher from student: flow-matching loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f}")
    return save_checkpoint(
        out,
        trained,
        step=cfg.finetune_steps,
        instructions=student.instructions or None,
        config={"teacher_from_student": student.sha256, "recipe": asdict(cfg)},
        parent=student.sha256,
    )


def lineage_of(path: str | Path) -> dict[str, Any]:
    """The ``vlarl.lineage`` of an ONNX model ({} for a model trained from scratch)."""
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}).lineage


def set_gate_verdict(path: str | Path, verdict: str, **details: Any) -> str:
    """Write the gate's verdict into a distilled base's lineage; returns the file's new sha256.

    Only ``vlarl.lineage.gate`` changes (the graph and every other field stay as exported); the
    file is replaced atomically and must still load in the policy node's loader. ``details``
    (e.g. episodes, successes, the rule) are stored beside the verdict.
    """
    import onnx

    from vlarl.core.onnx_policy import OnnxPolicy

    if verdict not in VERDICTS:
        raise LearningError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    path = Path(path)
    payload = path.read_bytes()
    model = onnx.load_model_from_string(payload)
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    if not meta.lineage:
        raise LearningError(f"{path} has no lineage: it is not a distilled base version")
    lineage = json.loads(json.dumps(meta.lineage))
    lineage["gate"] = json.loads(json.dumps({"verdict": verdict, **details}, default=str))
    new = with_metadata(payload, dataclasses.replace(meta, lineage=lineage), doc=model.doc_string)
    atomic_write_bytes(path, new, overwrite=True)
    OnnxPolicy.load(path, providers="cpu", intra_op_threads=1)
    digest = hashlib.sha256(new).hexdigest()
    record = path.with_suffix(".export.json")
    if record.is_file():  # keep the export record's digest and metadata in step with the file
        doc = json.loads(record.read_text())
        doc.update(sha256=digest, bytes=len(new), metadata=dict(_meta_props(new)))
        write_json(record, doc)
    return digest


def _meta_props(onnx_bytes: bytes) -> dict[str, str]:
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    return {p.key: p.value for p in model.metadata_props}


def _split(text: str) -> list[Path]:
    return [Path(p.strip()) for p in text.split(",") if p.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DistillBackInputs)
    add_config_arguments(parser, DistillBackConfig)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except LearningError as exc:
        print(f"vlarl distill-back: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(DistillBackConfig, args)
    inputs: DistillBackInputs = config_from_args(DistillBackInputs, args)
    parent_id, parent_version = parse_tag(inputs.parent)
    demos = _split(inputs.demos)
    if inputs.make_demos:
        for folder in demos:
            if not folder.exists():
                print(f"{folder} does not exist: regenerating the default demonstrations there")
                ensure_demonstrations(folder)
    result = distill_back(
        cfg,
        demos=demos,
        rl_data=_split(inputs.rl_data),
        out=Path(inputs.out),
        parent=inputs.parent,
        collected_by=inputs.collected_by,
        version=inputs.version or parent_version + 1,
        model_id=inputs.model_id or parent_id,
    )
    losses = result.losses
    print(
        f"wrote {result.onnx} ({result.tag}, sha256 {result.sha256[:16]}...) in "
        f"{result.wall_s:.0f} s ({result.cpu_s:.0f} s CPU); teacher loss "
        f"{losses['finetune_first']:.4f} -> "
        f"{losses['finetune_final']:.4f}, consistency {losses['consistency_first']:.5f} -> "
        f"{losses['consistency_final']:.5f}, anchor {losses['anchor_first']:.5f} -> "
        f"{losses['anchor_final']:.5f}; max |onnxruntime - pytorch| "
        f"{result.max_abs_err_vs_pytorch:.1e}"
    )
    print(f"lineage: parent {inputs.parent}, collected by {inputs.collected_by}, gate pending")
    return 0
