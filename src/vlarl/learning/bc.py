"""``vlarl train-bc``: plain behavior cloning, an MLP regressor of the action chunk.

The baseline: the same inputs, chunks, network size and demonstrations as the teacher, trained
with mean squared error. On mixed-quality data it learns the average of what the
demonstrators did in a state, noise included (e.g. clipped noise pulls saturated gripper
commands toward zero), where a flow model started from the centre of its noise recovers the
typical action instead.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import trange

from vlarl.learning.checkpoint import save_checkpoint
from vlarl.learning.networks import BCPolicy, parameter_count
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

CHECKPOINT = "bc.safetensors"


@dataclass
class BCConfig:
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
    hidden: int = arg(512, "hidden width of the MLP")
    depth: int = arg(3, "hidden layers of the MLP")
    train_steps: int = arg(20_000, "gradient steps")
    batch_size: int = arg(256, "samples per gradient step")
    lr: float = arg(3e-4, "peak learning rate (AdamW, warm-up then cosine decay)")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    ema: float = arg(0.999, "decay of the weight average that is saved")
    seed: int = arg(0, "random seed")
    threads: int = arg(1, "PyTorch CPU threads")
    log_every: int = arg(500, "steps between metrics lines")
    overwrite: bool = arg(False, "replace an existing checkpoint in --out")


def bc_loss(
    policy: BCPolicy, obs: torch.Tensor, chunks: torch.Tensor, instr: torch.Tensor | None
) -> torch.Tensor:
    target = policy.normalized_targets(chunks)
    return torch.mean((policy.predict_normalized(policy.condition(obs, instr)) - target) ** 2)


def train(cfg: BCConfig) -> dict[str, object]:
    with run_folder(cfg.out, overwrite=cfg.overwrite, marker=CHECKPOINT) as run_dir:
        return _train(cfg, run_dir)


def _train(cfg: BCConfig, run_dir: Path) -> dict[str, object]:
    set_threads(cfg.threads)
    set_seed(cfg.seed)
    write_config(run_dir, "train-bc", cfg)
    dataset, replay = load_demonstrations(
        cfg.data,
        tasks=cfg.tasks,
        chunk_length=cfg.chunk_length,
        use_instructions=cfg.instructions,
        episodes=cfg.episodes,
    )
    policy = new_policy(
        "bc",
        dataset,
        hidden=cfg.hidden,
        depth=cfg.depth,
        obs_kind=replay.obs_kind,
        task_norm=cfg.task_norm,
    )
    assert isinstance(policy, BCPolicy)
    policy.train()
    ema = EMA(policy, cfg.ema)
    opt = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = dataset.tensors()
    gen = torch.Generator().manual_seed(cfg.seed)
    log = MetricsLog(run_dir)
    print(
        f"bc: {len(dataset)} samples, tasks {list(dataset.tasks)}, "
        f"{parameter_count(policy) / 1e6:.2f}M parameters"
    )
    running = 0.0
    bar = trange(cfg.train_steps, desc="train-bc", unit="step", mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total=cfg.train_steps, base=cfg.lr)
        index = torch.randint(len(dataset), (cfg.batch_size,), generator=gen)
        loss = bc_loss(policy, *data.batch(index))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        ema.update(policy)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.train_steps:
            bar.set_postfix(loss=f"{running:.4f}")
            log.log(step=step + 1, loss=running, lr=opt.param_groups[0]["lr"])
    digest = save_checkpoint(
        run_dir / CHECKPOINT,
        ema.module,
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
        "parameters": parameter_count(ema.module),
    }
    log.summary(**summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, BCConfig)


def run(args: argparse.Namespace) -> int:
    summary = train(config_from_args(BCConfig, args))
    print(f"saved {summary['checkpoint']} (final loss {summary['final_loss']:.4f})")
    return 0
