"""``vlarl evaluate``: run a policy for N episodes per task in-process (no ROS) and report success.

Episode ``i`` of every task starts from seed ``seed + i``
(:func:`vlarl.learning.envs.reset_episode`), so every model meets the same scenes. Chunks are
executed with :class:`vlarl.core.chunking.ChunkScheduler`, exactly as the policy node does:
the first ``replan_every`` actions of each chunk are executed, then the model runs again.
Episodes are stepped in lockstep groups of ``parallel`` so the model runs batched (batching
changes speed; actions only up to float rounding). An episode succeeds when the simulator's
success flag is raised within ``max_steps``. Success rates come with a 95% Wilson score interval.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vlarl.core.chunking import ChunkScheduler
from vlarl.graph import GraphArgumentError, parse_action_offset
from vlarl.learning import envs
from vlarl.learning.errors import LearningError
from vlarl.learning.policies import ActingPolicy, load_acting_policy
from vlarl.learning.runs import add_config_arguments, arg, config_from_args, write_json

DEFAULT_EVAL_SEED = 1_000_000  # far from the collection seeds (0, 1, 2, ...)


@dataclass
class EvaluateConfig:
    policy: str = arg(
        "", "policy to run: a .safetensors checkpoint or an .onnx model", required=True
    )
    tasks: str = arg("", "tasks ('mt10', names); empty = every task the model was trained on")
    episodes: int = arg(50, "episodes per task")
    seed: int = arg(DEFAULT_EVAL_SEED, "episode i starts from seed + i")
    replan_every: int = arg(0, "actions executed per chunk before re-planning (0 = chunk length)")
    steps: int = arg(0, "integration steps for a teacher checkpoint (0 = the model's own)")
    noise_scale: float = arg(0.0, "std of the start noise x_0 for checkpoints (0 = deterministic)")
    max_steps: int = arg(envs.MAX_EPISODE_STEPS, "steps after which an episode counts as failed")
    action_offset: str = arg(
        "0,0,0,0",
        "deployment shift of the simulated robot: it executes clip(action + offset) "
        "(dx,dy,dz,gripper, as vlarl bringup --action-offset)",
    )
    parallel: int = arg(10, "episodes stepped in lockstep (batched inference)")
    threads: int = arg(1, "inference threads (PyTorch or ONNX Runtime intra-op)")
    out: str = arg("", "results JSON (default: eval-<model>-<tasks>.json beside the policy)")


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (robust at 0% and 100%)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class TaskResult:
    task: str
    episodes: int
    successes: int
    success_rate: float
    ci_low: float
    ci_high: float
    mean_length_success: float
    plans: int
    mean_plan_ms: float
    seeds: list[int]
    per_episode: list[bool]
    per_episode_return: list[float]  # sum of the simulator's shaped reward (a trajectory check)


def evaluate_task(
    policy: ActingPolicy,
    task: str,
    *,
    episodes: int,
    seed: int,
    replan_every: int,
    max_steps: int,
    parallel: int,
    progress: tqdm | None = None,
    action_offset: np.ndarray | None = None,
) -> TaskResult:
    """Run ``episodes`` episodes of ``task``; ``parallel`` at a time in lockstep.

    With ``action_offset`` the arm is miscalibrated: it executes ``clip(action + offset)``."""
    if task not in policy.tasks:
        raise LearningError(
            f"{policy.name} was not trained on {task!r} (its tasks: {', '.join(policy.tasks)})"
        )
    chunk = policy.chunk_length
    replan = replan_every or chunk
    if not 1 <= replan <= chunk:
        raise LearningError(f"--replan-every must be in [1, {chunk}] (0 = {chunk}), got {replan}")
    instr_row = policy.instruction(task)
    parallel = max(1, min(parallel, episodes))
    env_pool = [envs.make_env(task) for _ in range(parallel)]
    results: list[bool] = [False] * episodes
    lengths: list[int] = [0] * episodes
    returns: list[float] = [0.0] * episodes
    plans = 0
    plan_time = 0.0
    try:
        for start in range(0, episodes, parallel):
            ids = list(range(start, min(episodes, start + parallel)))
            n = len(ids)
            pool = env_pool[:n]
            scheds = [ChunkScheduler(chunk_length=chunk, replan_every=replan) for _ in ids]
            obs = np.stack(
                [envs.reset_episode(e, seed + i) for e, i in zip(pool, ids, strict=True)]
            )
            alive = np.ones(n, bool)
            instr = None if instr_row is None else np.repeat(instr_row[None], n, axis=0)
            for t in range(max_steps):
                need = [j for j in range(n) if alive[j] and scheds[j].needs_plan()]
                if need:
                    t0 = time.perf_counter()
                    chunks = policy.predict_batch(
                        obs[need].astype(np.float32), None if instr is None else instr[need]
                    )
                    plan_time += time.perf_counter() - t0
                    plans += 1
                    for k, j in enumerate(need):
                        scheds[j].set_plan(np.asarray(chunks[k], np.float64))
                for j in range(n):
                    if not alive[j]:
                        continue
                    action, _ = scheds[j].next()
                    if action_offset is not None:
                        action = np.clip(action + action_offset, -1.0, 1.0)
                    next_obs, reward, _, truncated, success = envs.step_env(pool[j], action)
                    obs[j] = next_obs
                    returns[ids[j]] += reward
                    if success:
                        results[ids[j]] = True
                        lengths[ids[j]] = t + 1
                        alive[j] = False
                    elif truncated:
                        alive[j] = False
                if not alive.any():
                    break
            if progress is not None:
                progress.update(n)
    finally:
        for e in env_pool:
            e.close()
    k = int(sum(results))
    low, high = wilson_interval(k, episodes)
    ok_lengths = [n for n, ok in zip(lengths, results, strict=True) if ok]
    return TaskResult(
        task=task,
        episodes=episodes,
        successes=k,
        success_rate=k / episodes,
        ci_low=low,
        ci_high=high,
        mean_length_success=float(np.mean(ok_lengths)) if ok_lengths else float("nan"),
        plans=plans,
        mean_plan_ms=1e3 * plan_time / max(1, plans),
        seeds=[seed + i for i in range(episodes)],
        per_episode=results,
        per_episode_return=[round(r, 6) for r in returns],
    )


def evaluate(cfg: EvaluateConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Evaluate ``cfg.policy``; returns (and writes) the results document."""
    if cfg.episodes < 1:
        raise LearningError("--episodes must be >= 1")
    try:
        offset = np.asarray(parse_action_offset(cfg.action_offset), np.float64)
    except GraphArgumentError as exc:
        raise LearningError(f"--action-offset: {exc}") from None
    policy = load_acting_policy(
        cfg.policy, steps=cfg.steps, noise_scale=cfg.noise_scale, threads=cfg.threads, seed=cfg.seed
    )
    tasks = envs.parse_tasks(cfg.tasks) if cfg.tasks else policy.tasks
    results: dict[str, TaskResult] = {}
    t0 = time.perf_counter()
    with tqdm(total=len(tasks) * cfg.episodes, desc="evaluate", unit="ep", disable=quiet) as bar:
        for task in tasks:
            results[task] = evaluate_task(
                policy,
                task,
                episodes=cfg.episodes,
                seed=cfg.seed,
                replan_every=cfg.replan_every,
                max_steps=cfg.max_steps,
                parallel=cfg.parallel,
                progress=bar,
                action_offset=offset if offset.any() else None,
            )
    total_k = sum(r.successes for r in results.values())
    total_n = sum(r.episodes for r in results.values())
    low, high = wilson_interval(total_k, total_n)
    doc = {
        "policy": str(cfg.policy),
        "model": policy.name,
        "kind": getattr(policy, "kind", ""),
        "backend": getattr(policy, "backend", "torch"),
        "config": asdict(cfg),
        "replan_every": cfg.replan_every or policy.chunk_length,
        "chunk_length": policy.chunk_length,
        "success_source": "simulator flag (info['success'])",
        "action_offset": offset.tolist(),
        "overall": {
            "episodes": total_n,
            "successes": total_k,
            "success_rate": total_k / total_n,
            "ci_low": low,
            "ci_high": high,
        },
        "tasks": {t: asdict(r) for t, r in results.items()},
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    out = Path(cfg.out) if cfg.out else default_out(Path(cfg.policy), tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, doc)
    doc["out"] = str(out)
    return doc


def default_out(policy_path: Path, tasks: tuple[str, ...]) -> Path:
    label = tasks[0] if len(tasks) == 1 else f"{len(tasks)}tasks"
    return policy_path.parent / f"eval-{policy_path.stem}-{label}.json"


def format_results(doc: dict[str, Any]) -> str:
    lines = [f"{doc['model']} (replan every {doc['replan_every']} of {doc['chunk_length']})"]
    for task, r in doc["tasks"].items():
        lines.append(
            f"  {task:28s} {r['successes']:3d}/{r['episodes']:<3d} "
            f"{100 * r['success_rate']:5.1f}%  95% CI [{100 * r['ci_low']:.1f}, "
            f"{100 * r['ci_high']:.1f}]  plan {r['mean_plan_ms']:.2f} ms"
        )
    o = doc["overall"]
    lines.append(
        f"  {'overall':28s} {o['successes']:3d}/{o['episodes']:<3d} "
        f"{100 * o['success_rate']:5.1f}%  95% CI [{100 * o['ci_low']:.1f}, "
        f"{100 * o['ci_high']:.1f}]"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvaluateConfig)


def run(args: argparse.Namespace) -> int:
    doc = evaluate(config_from_args(EvaluateConfig, args))
    print(format_results(doc))
    print(f"wrote {doc['out']}")
    return 0
