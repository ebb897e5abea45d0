"""``vlarl train-teacher``: a conditional flow-matching (rectified-flow) policy over action chunks.

Training (rectified flow / conditional flow matching): for a demonstration chunk x_1
(normalized to [-1, 1]), noise x_0 ~ N(0, I) and t ~ U(0, 1), regress the velocity network on
the straight path: || v(x_t, t | obs, task) - (x_1 - x_0) ||^2 with x_t = (1 - t) x_0 + t x_1.
Acting integrates dx/dt = v from x_0 to t=1 in K Euler steps (``--steps``, default 10); the
deployed start is x_0 = 0. The condition is the normalized observation and, with
``--instructions``, the task instruction's sentence embedding, so one model serves many tasks.
The saved weights are an exponential moving average of the trained ones.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import trange

from vlarl.learning.checkpoint import save_checkpoint
from vlarl.learning.errors import LearningError
from vlarl.learning.networks import FlowPolicy, parameter_count
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
from vlarl.learning.training import (
    EMA,
    cosine_lr,
    instructions_of,
    load_demonstrations,
    make_optimizer,
    new_policy,
)

CHECKPOINT = "teacher.safetensors"


@dataclass
class TeacherConfig:
    data: str = arg(
        "", "replay directory of demonstrations (comma-separate several)", required=True
    )
    out: str = arg("", "run folder for the checkpoint, config.json and metrics", required=True)
    tasks: str = arg("", "tasks to train on ('mt10', names); empty = every task in the data")
    instructions: bool = arg(True, "condition on the task instruction's sentence embedding")
    task_norm: bool = arg(
        False, "standardize observations per task (the instruction picks the statistics)"
    )
    episodes: str = arg(
        "all", "demonstrations to learn from: 'all' or 'success' (reached the goal)"
    )
    chunk_length: int = arg(8, "actions per predicted chunk (H)")
    steps: int = arg(10, "Euler integration steps K when acting")
    hidden: int = arg(512, "hidden width of the MLP")
    depth: int = arg(3, "hidden layers of the MLP")
    train_steps: int = arg(20_000, "gradient steps")
    batch_size: int = arg(256, "samples per gradient step")
    lr: float = arg(3e-4, "peak learning rate (AdamW, warm-up then cosine decay)")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    ema: float = arg(0.999, "decay of the weight average that is saved")
    time_sampling: str = arg("uniform", "how t is drawn: 'uniform' or 'beta' (more noisy t)")
    source: str = arg(
        "gaussian",
        "training noise x_0: 'gaussian' N(0, I), or 'scaled' r * N(0, I) with r ~ U(0, 1) "
        "(covers the deployed start x_0 = 0)",
    )
    seed: int = arg(0, "random seed")
    threads: int = arg(1, "PyTorch CPU threads")
    log_every: int = arg(500, "steps between metrics lines")
    overwrite: bool = arg(False, "replace an existing checkpoint in --out")


def sample_time(n: int, how: str, gen: torch.Generator) -> torch.Tensor:
    if how == "uniform":
        return torch.rand(n, generator=gen)
    if how == "beta":  # pi0-style: emphasise the noisy end (small t) where acting starts
        u = torch.rand(n, generator=gen)
        return 1.0 - u.sqrt()
    raise LearningError(f"--time-sampling must be 'uniform' or 'beta', got {how!r}")


def sample_source(shape: torch.Size, how: str, gen: torch.Generator) -> torch.Tensor:
    """Training start points x_0.

    'gaussian' (the default): x_0 ~ N(0, I). In d = H*A = 32 dimensions its samples lie on a
    shell of radius about sqrt(d), so the deployed start x_0 = 0 is never seen in training.
    'scaled' (an experiment): x_0 = r * z with r ~ U(0, 1), a scale mixture whose density is
    highest at 0, so the deployed path is trained on. The shared radius couples the dimensions,
    so the path from 0 no longer ends on the per-dimension median; on MT10 it did worse
    (85.4% against 91.8% with N(0, I), bench/results/policy_success.json, ablations_mt10).
    """
    z = torch.randn(shape, generator=gen)
    if how == "gaussian":
        return z
    if how == "scaled":
        return torch.rand((shape[0], 1), generator=gen) * z
    raise LearningError(f"--source must be 'gaussian' or 'scaled', got {how!r}")


def flow_matching_loss(
    policy: FlowPolicy,
    obs: torch.Tensor,
    chunks: torch.Tensor,
    instr: torch.Tensor | None,
    *,
    time_sampling: str,
    gen: torch.Generator,
    source: str = "gaussian",
) -> torch.Tensor:
    x1 = policy.normalized_targets(chunks)
    x0 = sample_source(x1.shape, source, gen)
    t = sample_time(x1.shape[0], time_sampling, gen)
    xt = (1.0 - t)[:, None] * x0 + t[:, None] * x1
    cond = policy.condition(obs, instr)
    return torch.mean((policy.velocity(xt, t, cond) - (x1 - x0)) ** 2)


def train(cfg: TeacherConfig) -> dict[str, object]:
    with run_folder(cfg.out, overwrite=cfg.overwrite, marker=CHECKPOINT) as run_dir:
        return _train(cfg, run_dir)


def _train(cfg: TeacherConfig, run_dir: Path) -> dict[str, object]:
    set_threads(cfg.threads)
    set_seed(cfg.seed)
    write_config(run_dir, "train-teacher", cfg)
    dataset, replay = load_demonstrations(
        cfg.data,
        tasks=cfg.tasks,
        chunk_length=cfg.chunk_length,
        use_instructions=cfg.instructions,
        episodes=cfg.episodes,
    )
    policy = new_policy(
        "teacher",
        dataset,
        hidden=cfg.hidden,
        depth=cfg.depth,
        obs_kind=replay.obs_kind,
        steps=cfg.steps,
        task_norm=cfg.task_norm,
    )
    assert isinstance(policy, FlowPolicy)
    policy.train()
    ema = EMA(policy, cfg.ema)
    opt = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = dataset.tensors()
    gen = torch.Generator().manual_seed(cfg.seed)
    log = MetricsLog(run_dir)
    print(
        f"teacher: {len(dataset)} samples, tasks {list(dataset.tasks)}, "
        f"{parameter_count(policy) / 1e6:.2f}M parameters"
    )
    running = 0.0
    bar = trange(cfg.train_steps, desc="train-teacher", unit="step", mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total=cfg.train_steps, base=cfg.lr)
        index = torch.randint(len(dataset), (cfg.batch_size,), generator=gen)
        obs, chunks, instr = data.batch(index)
        loss = flow_matching_loss(
            policy,
            obs,
            chunks,
            instr,
            time_sampling=cfg.time_sampling,
            gen=gen,
            source=cfg.source,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        ema.update(policy)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.train_steps:
            bar.set_postfix(loss=f"{running:.4f}")
            log.log(step=step + 1, loss=running, lr=opt.param_groups[0]["lr"])
    final = ema.module
    digest = save_checkpoint(
        run_dir / CHECKPOINT,
        final,
        step=cfg.train_steps,
        instructions=instructions_of(dataset),
        config=asdict(cfg),
        overwrite=True,
    )
    summary = {
        "checkpoint": str(run_dir / CHECKPOINT),
        "sha256": digest,
        "final_loss": running,
        "samples": len(dataset),
        "tasks": list(dataset.tasks),
        "parameters": parameter_count(final),
    }
    log.summary(**summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TeacherConfig)


def run(args: argparse.Namespace) -> int:
    summary = train(config_from_args(TeacherConfig, args))
    print(f"saved {summary['checkpoint']} (final loss {summary['final_loss']:.4f})")
    return 0
