"""``vlarl distill``: consistency distillation of the flow teacher into a one-step student.

The student is a consistency function f(x_t, t | obs, task) = x_t + (1 - t) F(x_t, t | obs, task)
(f(x, 1) = x by construction) that maps any point of the teacher's ODE path to the path's end,
so acting is one evaluation f(x_0, 0). As in Consistency Policy (Prasad et al. 2024) and the
consistency head of RL-100, the student learns from the frozen teacher on the demonstrations'
observations, with two terms:

1. Consistency distillation (Song et al. 2023): on the teacher's K-step grid t_n = n/K, take
   x_{t_n} = (1 - t_n) x_0 + t_n x_1 (x_1 a demonstration chunk, x_0 ~ N(0, I)), let the teacher
   take one Euler step to x^_{t_{n+1}}, and pull f(x_{t_n}, t_n) toward the EMA target network's
   f-(x^_{t_{n+1}}, t_{n+1}). Chained over the grid this makes f reproduce the teacher's K-step
   solution from any start.
2. An endpoint anchor (RL-100-style): for a fraction of the batch, start where the deployed
   policy starts (x_0 = noise_scale * z; zero by default), integrate the teacher's full K steps
   and regress f(x_0, 0) on the result, so the one point the robot uses is matched directly
   (with x_0 = 0 these answers are computed once for every sample before training).

The student may be smaller than the teacher (default 3x256 against the teacher's 3x512; it
then starts fresh with the teacher's normalization). With the teacher's size (``--hidden 0``)
its F starts as the teacher's velocity field, so f starts as one Euler step of the teacher
(which, from x_0 = 0 at t = 0, is the mean chunk: BC) and distillation moves it to the teacher's
K-step answer. The student learns on every state of the demonstrations.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import trange

from vlarl.learning.checkpoint import load_checkpoint, save_checkpoint
from vlarl.learning.dataset import ChunkDataset
from vlarl.learning.errors import LearningError
from vlarl.learning.networks import ConsistencyPolicy, FlowPolicy, build_policy, parameter_count
from vlarl.learning.runs import (
    MetricsLog,
    add_config_arguments,
    arg,
    config_from_args,
    run_folder,
    set_seed,
    set_threads,
    write_config,
)
from vlarl.learning.training import EMA, cosine_lr, load_demonstrations, make_optimizer

CHECKPOINT = "student.safetensors"


@dataclass
class DistillConfig:
    teacher: str = arg("", "teacher checkpoint (teacher.safetensors)", required=True)
    data: str = arg(
        "", "replay directory of the teacher's demonstrations (comma-separate)", required=True
    )
    out: str = arg(
        "", "run folder for the student checkpoint, config.json and metrics", required=True
    )
    grid: int = arg(0, "ODE grid intervals for consistency (0 = the teacher's K)")
    hidden: int = arg(256, "student hidden width (0 = the teacher's; then it starts from it)")
    depth: int = arg(0, "student hidden layers (0 = the teacher's)")
    train_steps: int = arg(10_000, "gradient steps")
    batch_size: int = arg(256, "samples per gradient step")
    lr: float = arg(3e-4, "peak learning rate (AdamW, warm-up then cosine decay)")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    target_ema: float = arg(0.95, "decay of the consistency target network f-")
    ema: float = arg(0.999, "decay of the weight average that is saved")
    anchor_weight: float = arg(1.0, "weight of the endpoint anchor term (0 = pure consistency)")
    anchor_fraction: float = arg(0.25, "share of each batch used for the endpoint anchor")
    noise_scale: float = arg(0.0, "std of the deployed start x_0 used by the anchor")
    seed: int = arg(0, "random seed")
    threads: int = arg(1, "PyTorch CPU threads")
    log_every: int = arg(500, "steps between metrics lines")
    overwrite: bool = arg(False, "replace an existing checkpoint in --out")


def make_student(teacher: FlowPolicy, *, hidden: int, depth: int) -> ConsistencyPolicy:
    """A student with the teacher's inputs; it copies the teacher's weights when sizes match."""
    spec = copy.deepcopy(teacher.spec)
    spec.kind = "student"
    spec.steps = 1
    spec.hidden = hidden or spec.hidden
    spec.depth = depth or spec.depth
    student = build_policy(spec)
    assert isinstance(student, ConsistencyPolicy)
    if (spec.hidden, spec.depth) == (teacher.spec.hidden, teacher.spec.depth):
        student.load_state_dict(teacher.state_dict(), strict=True)
    else:
        student.normalizer.load_state_dict(teacher.normalizer.state_dict())
        if student.cond.instr_norm:
            student.cond.instr_mean.copy_(teacher.cond.instr_mean)
            student.cond.instr_std.copy_(teacher.cond.instr_std)
        if student.task_norm is not None and teacher.task_norm is not None:
            student.task_norm.load_state_dict(teacher.task_norm.state_dict())
    return student


def consistency_losses(
    student: ConsistencyPolicy,
    target: ConsistencyPolicy,
    teacher: FlowPolicy,
    obs: torch.Tensor,
    chunks: torch.Tensor,
    instr: torch.Tensor | None,
    *,
    grid: int,
    anchor_fraction: float,
    noise_scale: float,
    gen: torch.Generator,
    anchor_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(consistency-distillation loss, endpoint-anchor loss) for one batch.

    ``anchor_targets`` [B, H*A] are the teacher's K-step answers from x_0 = 0 for this batch,
    precomputed once (deterministic start); without them they are integrated here.
    """
    b = obs.shape[0]
    x1 = student.normalized_targets(chunks)
    cond = student.condition(obs, instr)
    n = torch.randint(0, grid, (b,), generator=gen)
    t_n = n.float() / grid
    t_next = (n + 1).float() / grid
    x0 = torch.randn(x1.shape, generator=gen)
    x_t = (1.0 - t_n)[:, None] * x0 + t_n[:, None] * x1
    with torch.no_grad():
        cond_teacher = teacher.condition(obs, instr)
        x_next = x_t + (1.0 / grid) * teacher.velocity(x_t, t_n, cond_teacher)
        goal = target.consistency(x_next, t_next, target.condition(obs, instr))
    cd = torch.mean((student.consistency(x_t, t_n, cond) - goal) ** 2)
    m = round(anchor_fraction * b)
    if m == 0:
        return cd, torch.zeros(())
    if anchor_targets is not None and noise_scale == 0:
        start = torch.zeros((m, x1.shape[1]))
        end = anchor_targets[:m]
    else:
        start = noise_scale * torch.randn((m, x1.shape[1]), generator=gen)
        with torch.no_grad():
            end = teacher.integrate(start.clone(), cond_teacher[:m], steps=grid)
    zero_t = torch.zeros(m)
    anchor = torch.mean((student.consistency(start, zero_t, cond[:m]) - end) ** 2)
    return cd, anchor


@torch.no_grad()
def teacher_endpoints(
    teacher: FlowPolicy, dataset: ChunkDataset, *, steps: int, batch: int = 4096
) -> torch.Tensor:
    """The teacher's K-step answer from x_0 = 0 for every sample (the deployed start)."""
    data = dataset.tensors()
    out = torch.empty(len(dataset), teacher.flat)
    for lo in trange(
        0, len(dataset), batch, desc="teacher endpoints", unit="batch", mininterval=1.0
    ):
        index = torch.arange(lo, min(lo + batch, len(dataset)))
        obs, _, instr = data.batch(index)
        out[index] = teacher.sample_normalized(teacher.condition(obs, instr), steps=steps)
    return out


def train(cfg: DistillConfig) -> dict[str, object]:
    with run_folder(cfg.out, overwrite=cfg.overwrite, marker=CHECKPOINT) as run_dir:
        return _train(cfg, run_dir)


def _train(cfg: DistillConfig, run_dir: Path) -> dict[str, object]:
    set_threads(cfg.threads)
    set_seed(cfg.seed)
    write_config(run_dir, "distill", cfg)
    ckpt = load_checkpoint(cfg.teacher)
    teacher = ckpt.policy
    if not isinstance(teacher, FlowPolicy):
        raise LearningError(f"{cfg.teacher} is a {ckpt.spec.kind!r} checkpoint, not a teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    grid = cfg.grid or teacher.spec.steps
    if not 0 < cfg.anchor_fraction <= 1 and cfg.anchor_weight > 0:
        raise LearningError("--anchor-fraction must be in (0, 1]")
    dataset, _ = load_demonstrations(
        cfg.data,
        tasks=",".join(ckpt.tasks),
        chunk_length=teacher.spec.chunk_length,
        use_instructions=teacher.spec.instr_dim > 0,
    )
    if dataset.instructions is not None:  # the teacher's own embeddings, not recomputed ones
        for i, task in enumerate(dataset.tasks):
            dataset.instructions[i] = ckpt.instructions[task]
    anchors = None
    if cfg.anchor_weight > 0 and cfg.noise_scale == 0:
        anchors = teacher_endpoints(teacher, dataset, steps=grid)
    student = make_student(teacher, hidden=cfg.hidden, depth=cfg.depth)
    student.train()
    target = EMA(student, cfg.target_ema)
    ema = EMA(student, cfg.ema)
    opt = make_optimizer(student, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = dataset.tensors()
    gen = torch.Generator().manual_seed(cfg.seed)
    log = MetricsLog(run_dir)
    print(
        f"distill: {len(dataset)} samples, grid {grid}, student "
        f"{parameter_count(student) / 1e6:.2f}M parameters (teacher "
        f"{parameter_count(teacher) / 1e6:.2f}M)"
    )
    run_cd = run_anchor = 0.0
    bar = trange(cfg.train_steps, desc="distill", unit="step", mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total=cfg.train_steps, base=cfg.lr)
        index = torch.randint(len(dataset), (cfg.batch_size,), generator=gen)
        obs, chunks, instr = data.batch(index)
        cd, anchor = consistency_losses(
            student,
            target.module,
            teacher,
            obs,
            chunks,
            instr,
            grid=grid,
            anchor_fraction=cfg.anchor_fraction if cfg.anchor_weight > 0 else 0.0,
            noise_scale=cfg.noise_scale,
            gen=gen,
            anchor_targets=None if anchors is None else anchors[index],
        )
        loss = cd + cfg.anchor_weight * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        target.update(student)
        ema.update(student)
        a, c = anchor.item(), cd.item()
        run_cd = 0.98 * run_cd + 0.02 * c if step else c
        run_anchor = 0.98 * run_anchor + 0.02 * a if step else a
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.train_steps:
            bar.set_postfix(cd=f"{run_cd:.5f}", anchor=f"{run_anchor:.5f}")
            log.log(
                step=step + 1, consistency=run_cd, anchor=run_anchor, lr=opt.param_groups[0]["lr"]
            )
    digest = save_checkpoint(
        run_dir / CHECKPOINT,
        ema.module,
        step=cfg.train_steps,
        instructions=ckpt.instructions or None,
        config=asdict(cfg),
        parent=ckpt.sha256,
        overwrite=True,
    )
    summary = {
        "checkpoint": str(run_dir / CHECKPOINT),
        "sha256": digest,
        "teacher": ckpt.sha256,
        "consistency_loss": run_cd,
        "anchor_loss": run_anchor,
        "grid": grid,
        "samples": len(dataset),
        "parameters": parameter_count(ema.module),
    }
    log.summary(**summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DistillConfig)


def run(args: argparse.Namespace) -> int:
    summary = train(config_from_args(DistillConfig, args))
    print(
        f"saved {summary['checkpoint']} (consistency {summary['consistency_loss']:.5f}, "
        f"anchor {summary['anchor_loss']:.5f})"
    )
    return 0
