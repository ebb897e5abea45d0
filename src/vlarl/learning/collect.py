"""``vlarl collect``: demonstrations from Meta-World's scripted experts, optionally noisy.

Each episode runs the task's scripted expert with Gaussian noise of std ``sigma`` added to its
action (clipped to [-1, 1]); the executed (noisy) action is what is recorded as ``action``, the
clean expert action as ``base_action`` and their difference as ``residual``. Noise levels are
assigned to episodes round-robin from ``--sigmas``, so a mix such as ``0,0.3,0.5,1.0`` makes the
data mixed-quality on purpose (FACTS.md: pick-place succeeds 100% at sigma 0, ~40% at sigma 1).
Episode ``i`` of a task starts from seed ``seed + i`` (:func:`vlarl.learning.envs.reset_episode`).
Episodes stop at success (after ``post_success_steps`` more steps) or at ``max_steps``.

Writes a replay directory (:mod:`vlarl.data.replay`) plus ``config.json`` and ``metrics.json``
(success rate and length per task and noise level).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlarl.data.replay import ReplayWriter, Transitions, list_shards
from vlarl.learning import envs
from vlarl.learning.errors import LearningError
from vlarl.learning.runs import (
    MetricsLog,
    add_config_arguments,
    arg,
    config_from_args,
    run_folder,
    write_config,
)


@dataclass
class CollectConfig:
    out: str = arg(
        "", "replay directory to create (refuses one that already holds shards)", required=True
    )
    tasks: str = arg(envs.DEFAULT_TASK, "task name, comma-separated names, or 'mt10'")
    episodes: int = arg(100, "episodes per task")
    sigmas: str = arg("0,0.3,0.5,1.0", "expert noise std per episode, assigned round-robin")
    seed: int = arg(0, "episode i of each task starts from seed + i; the noise is seeded too")
    max_steps: int = arg(envs.MAX_EPISODE_STEPS, "steps after which an episode is truncated")
    post_success_steps: int = arg(10, "steps recorded after the first success (holding still)")
    shard_rows: int = arg(50_000, "rows per replay shard (cut at episode boundaries)")


def parse_sigmas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LearningError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 or not np.isfinite(v) for v in values):
        raise LearningError(f"--sigmas must be non-negative numbers, got {text!r}")
    return values


def version_tag(sigma: float) -> str:
    return f"expert-sigma{sigma:g}@0"


def run_episode(
    env: object,
    expert: object,
    *,
    seed: int,
    sigma: float,
    rng: np.random.Generator,
    max_steps: int,
    post_success_steps: int,
) -> tuple[Transitions, bool]:
    """One noisy-expert episode; returns its transitions and whether it succeeded."""
    obs = envs.reset_episode(env, seed)
    rows: dict[str, list[np.ndarray | float | int]] = {
        k: [] for k in ("obs", "next_obs", "action", "base_action", "reward", "success")
    }
    succeeded = False
    after = 0
    for _ in range(max_steps):
        clean = envs.expert_action(expert, obs)
        noisy = np.clip(clean + sigma * rng.standard_normal(clean.shape), -1.0, 1.0)
        next_obs, reward, _, trunc, success = envs.step_env(env, noisy)
        rows["obs"].append(obs)
        rows["next_obs"].append(next_obs)
        rows["action"].append(noisy)
        rows["base_action"].append(clean)
        rows["reward"].append(reward)
        succeeded = succeeded or success
        rows["success"].append(int(succeeded))
        obs = next_obs
        if succeeded:
            after += 1
            if after > post_success_steps:
                break
        if trunc:
            break
    n = len(rows["obs"])
    action = np.asarray(rows["action"], np.float32)
    base = np.asarray(rows["base_action"], np.float32)
    terminal = np.zeros(n, np.uint8)
    trunc_col = np.zeros(n, np.uint8)
    if succeeded:
        terminal[-1] = 1
    else:
        trunc_col[-1] = 1
    data = Transitions.build(
        obs=np.asarray(rows["obs"], np.float32),
        next_obs=np.asarray(rows["next_obs"], np.float32),
        action=action,
        base_action=base,
        residual=action - base,
        reward=np.asarray(rows["reward"], np.float32),
        terminal=terminal,
        truncated=trunc_col,
        success=np.asarray(rows["success"], np.uint8),
    )
    return data, succeeded


def collect(cfg: CollectConfig) -> dict[str, object]:
    tasks = envs.parse_tasks(cfg.tasks)
    sigmas = parse_sigmas(cfg.sigmas)
    if cfg.episodes < 1:
        raise LearningError("--episodes must be >= 1")
    if (Path(cfg.out) / "metrics.json").exists():
        # collect never replaces a replay (its shards may already be training data).
        raise LearningError(f"{cfg.out} holds a finished collection; choose another --out")
    with run_folder(cfg.out, overwrite=False, marker="metrics.json") as out:
        return _collect(cfg, out, tasks, sigmas)


def _collect(
    cfg: CollectConfig, out: Path, tasks: tuple[str, ...], sigmas: list[float]
) -> dict[str, object]:
    if list_shards(out):
        raise LearningError(f"{out} already holds replay shards; choose a new --out")
    write_config(out, "collect", cfg)
    log = MetricsLog(out)
    stats: dict[str, dict[str, dict[str, float]]] = {}
    total = len(tasks) * cfg.episodes
    with (
        ReplayWriter(
            out,
            source="demo:metaworld-expert",
            obs_kind="state",
            tasks=tasks,
            shard_rows=cfg.shard_rows,
            extra={"sigmas": sigmas},
        ) as writer,
        tqdm(total=total, desc="collect", unit="ep") as bar,
    ):
        for task in tasks:
            env = envs.make_env(task)
            expert = envs.expert_for(task)
            per_sigma: dict[float, list[tuple[bool, int]]] = {s: [] for s in sigmas}
            for i in range(cfg.episodes):
                sigma = sigmas[i % len(sigmas)]
                seed = cfg.seed + i
                rng = np.random.default_rng([cfg.seed, i, tasks.index(task), 7])
                data, ok = run_episode(
                    env,
                    expert,
                    seed=seed,
                    sigma=sigma,
                    rng=rng,
                    max_steps=cfg.max_steps,
                    post_success_steps=cfg.post_success_steps,
                )
                writer.add_episode(data, task=task, version=version_tag(sigma))
                per_sigma[sigma].append((ok, len(data)))
                log.log(task=task, episode=i, seed=seed, sigma=sigma, success=ok, length=len(data))
                bar.update(1)
            env.close()
            stats[task] = {
                f"{s:g}": {
                    "episodes": len(v),
                    "success_rate": float(np.mean([ok for ok, _ in v])) if v else float("nan"),
                    "mean_length": float(np.mean([n for _, n in v])) if v else float("nan"),
                }
                for s, v in per_sigma.items()
            }
    rows = sum(info.rows for info in writer.written)
    summary = {
        "tasks": list(tasks),
        "sigmas": sigmas,
        "rows": rows,
        "shards": len(writer.written),
        "per_task": stats,
    }
    log.summary(**summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, CollectConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(CollectConfig, args)
    summary = collect(cfg)
    print(f"wrote {summary['rows']} transitions in {summary['shards']} shard(s) to {cfg.out}")
    per_task: dict[str, dict[str, dict[str, float]]] = summary["per_task"]  # type: ignore[assignment]
    for task, per in per_task.items():
        cells = ", ".join(
            f"sigma {s}: {v['success_rate']:.2f} ({v['mean_length']:.0f} steps)"
            for s, v in per.items()
        )
        print(f"  {task}: {cells}")
    return 0
