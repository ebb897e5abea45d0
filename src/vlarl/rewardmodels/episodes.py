"""Labelled episodes for the reward models: noisy scripted experts plus deliberate near-misses.

Two kinds of episodes, written to one replay directory (:mod:`vlarl.data.replay`), labelled by
the simulator's success flag (the development stand-in for the human label service):

* **noisy experts** (:func:`vlarl.learning.collect.run_episode`): the task's scripted expert
  with Gaussian action noise of std ``sigma``; high noise fails often (FACTS.md), and failures
  wander through many states near the goal.
* **near-misses** ("stop short"): a noisy-expert episode that succeeded at step ``s`` is
  replayed from the same start with the same actions up to step ``s - k`` (``k`` drawn from
  ``stop_short``), after which the arm only drifts (small random xyz, gripper held) for
  ``drift_steps`` steps. The state is then a few centimetres / degrees short of success, which
  is exactly where a success detector is tempted to fire. If the drift happens to succeed after
  all, the simulator says so and the episode counts as a success (labels are never assumed).

Version tags name the kind: ``expert-sigma0.5@0``, ``nearmiss-sigma0.3@0`` (so the
``policy_version`` column says which episodes are near-misses).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.data.replay import ReplayWriter, Transitions, list_shards
from vlarl.learning import envs
from vlarl.learning.collect import parse_sigmas, run_episode, version_tag
from vlarl.learning.runs import add_config_arguments, arg, config_from_args, write_json
from vlarl.rewardmodels.cli_common import clean_errors
from vlarl.rewardmodels.errors import RewardDataError

NEAR_MISS_SEED_OFFSET = 50_000  # near-miss episode j of a task starts from seed + offset + j


@dataclass
class RewardDataConfig:
    out: str = arg(
        "", "replay directory to create (refuses one that already holds shards)", required=True
    )
    tasks: str = arg(envs.DEFAULT_TASK, "task name, comma-separated names, or 'mt10'")
    episodes: int = arg(100, "noisy-expert episodes per task")
    sigmas: str = arg("0,0.3,0.5,0.75,1.0", "expert noise std, assigned round-robin")
    near_misses: int = arg(30, "stop-short near-miss episodes per task")
    near_miss_sigmas: str = arg("0,0.3", "expert noise of the episodes near-misses are cut from")
    stop_short: str = arg("4,16", "a near-miss stops between these many steps before success")
    drift_steps: int = arg(60, "steps a near-miss drifts after stopping (then truncated)")
    drift_sigma: float = arg(0.15, "std of the random xyz drift after stopping")
    seed: int = arg(0, "noisy episode i starts from seed + i; near-miss j from seed + 50000 + j")
    max_steps: int = arg(envs.MAX_EPISODE_STEPS, "steps after which an episode is truncated")
    post_success_steps: int = arg(10, "steps recorded after the first success")


class CopyingExpert:
    """A scripted expert that gets a copy of the observation.

    Some Meta-World experts change the observation they are given in place (door-open-v3's
    shifts the handle position by 5 cm), which would corrupt the recorded observations and make
    a replay differ from its original.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        return self.inner.get_action(np.array(obs, dtype=np.float64, copy=True))


@dataclass
class NearMiss:
    """One stop-short episode."""

    data: Transitions
    succeeded: bool
    stop_step: int  # steps taken from the expert's actions before drifting
    success_step: int  # where the uncut episode succeeded


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise RewardDataError(f"expected 'low,high' integers, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise RewardDataError(f"expected 1 <= low <= high, got {text!r}")
    return lo, hi


def _episode_data(rows: dict[str, list[Any]], succeeded: bool) -> Transitions:
    n = len(rows["obs"])
    terminal = np.zeros(n, np.uint8)
    truncated = np.zeros(n, np.uint8)
    (terminal if succeeded else truncated)[-1] = 1
    action = np.asarray(rows["action"], np.float32)
    base = np.asarray(rows["base_action"], np.float32)
    return Transitions.build(
        obs=np.asarray(rows["obs"], np.float32),
        next_obs=np.asarray(rows["next_obs"], np.float32),
        action=action,
        base_action=base,
        residual=action - base,
        reward=np.asarray(rows["reward"], np.float32),
        terminal=terminal,
        truncated=truncated,
        success=np.asarray(rows["success"], np.uint8),
    )


def near_miss_episode(
    env: Any,
    expert: Any,
    *,
    seed: int,
    sigma: float,
    stop_short: tuple[int, int],
    drift_steps: int,
    drift_sigma: float,
    rng: np.random.Generator,
    max_steps: int,
    post_success_steps: int,
    retries: int = 3,
) -> NearMiss | None:
    """A stop-short episode from start ``seed``; None when none could be cut from it.

    After stopping, the arm backs off slowly (against its last motion) plus a random drift, so
    momentum does not carry it over the line. When it succeeds anyway (a drawer sliding shut),
    the cut is moved earlier and tried again (``retries`` tries in all); the returned episode
    is labelled by the simulator's flag (``succeeded``), never assumed to be a failure.
    """
    data, ok = run_episode(
        env, expert, seed=seed, sigma=sigma, rng=rng, max_steps=max_steps, post_success_steps=0
    )
    if not ok:
        return None
    success_step = int(np.argmax(data.success)) + 1  # steps taken when the flag first rose
    k = int(rng.integers(stop_short[0], stop_short[1] + 1))
    result: NearMiss | None = None
    for _ in range(retries):
        stop = success_step - k
        if stop < 1:
            break
        result = _replay_and_drift(
            env,
            data,
            seed=seed,
            stop=stop,
            success_step=success_step,
            drift_steps=drift_steps,
            drift_sigma=drift_sigma,
            rng=rng,
            max_steps=max_steps,
            post_success_steps=post_success_steps,
        )
        if result is None or not result.succeeded:
            return result
        k = int(k * 1.5) + 4
    return None


def _replay_and_drift(
    env: Any,
    data: Transitions,
    *,
    seed: int,
    stop: int,
    success_step: int,
    drift_steps: int,
    drift_sigma: float,
    rng: np.random.Generator,
    max_steps: int,
    post_success_steps: int,
) -> NearMiss | None:
    obs = envs.reset_episode(env, seed)
    if not np.allclose(obs, data.obs[0], atol=1e-4):
        return None  # the start is not reproducible (should not happen with CopyingExpert)
    rows: dict[str, list[Any]] = {
        k: [] for k in ("obs", "next_obs", "action", "base_action", "reward", "success")
    }
    succeeded = False
    after = 0
    gripper = float(data.action[stop - 1, 3])
    back = -0.3 * data.action[max(0, stop - 3) : stop, :3].astype(np.float64).mean(axis=0)
    for t in range(stop + drift_steps):
        if t < stop:
            action = data.action[t].astype(np.float64)
            clean = data.base_action[t].astype(np.float64)
        else:
            action = np.empty(4)
            action[:3] = back + drift_sigma * rng.standard_normal(3)
            action[3] = gripper
            action = np.clip(action, -1.0, 1.0)
            clean = action
        next_obs, reward, _, trunc, success = envs.step_env(env, action)
        if t == stop - 1 and not np.allclose(next_obs, data.next_obs[t], atol=1e-4):
            return None  # the replay diverged: no near-miss from this start
        rows["obs"].append(obs)
        rows["next_obs"].append(next_obs)
        rows["action"].append(action)
        rows["base_action"].append(clean)
        rows["reward"].append(reward)
        succeeded = succeeded or success
        rows["success"].append(int(succeeded))
        obs = next_obs
        if succeeded:
            after += 1
            if after > post_success_steps:
                break
        if trunc or t + 1 >= max_steps:
            break
    return NearMiss(_episode_data(rows, succeeded), succeeded, stop, success_step)


def collect_reward_data(cfg: RewardDataConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Write noisy-expert and near-miss episodes of ``cfg.tasks`` to ``cfg.out``."""
    tasks = envs.parse_tasks(cfg.tasks)
    sigmas = parse_sigmas(cfg.sigmas)
    nm_sigmas = parse_sigmas(cfg.near_miss_sigmas)
    stop_short = parse_range(cfg.stop_short)
    if cfg.episodes < 0 or cfg.near_misses < 0 or cfg.episodes + cfg.near_misses < 1:
        raise RewardDataError("--episodes and --near-misses must be >= 0 and not both 0")
    out = Path(cfg.out)
    if out.is_dir() and list_shards(out):
        raise RewardDataError(f"{out} already holds replay shards; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_task: dict[str, dict[str, Any]] = {}
    near_miss_ids: list[int] = []
    with ReplayWriter(
        out,
        source="reward:metaworld-expert+nearmiss",
        obs_kind="state",
        tasks=tasks,
        extra={"sigmas": sigmas, "config": asdict(cfg)},
    ) as writer:
        for ti, task in enumerate(tasks):
            env = envs.make_env(task)
            expert = CopyingExpert(envs.expert_for(task))
            stats: dict[str, Any] = {"expert": {}, "near_miss": {"episodes": 0}}
            outcomes: dict[str, list[bool]] = {f"{s:g}": [] for s in sigmas}
            for i in range(cfg.episodes):
                sigma = sigmas[i % len(sigmas)]
                rng = np.random.default_rng([cfg.seed, i, ti, 11])
                data, ok = run_episode(
                    env,
                    expert,
                    seed=cfg.seed + i,
                    sigma=sigma,
                    rng=rng,
                    max_steps=cfg.max_steps,
                    post_success_steps=cfg.post_success_steps,
                )
                writer.add_episode(data, task=task, version=version_tag(sigma))
                outcomes[f"{sigma:g}"].append(ok)
            stats["expert"] = {
                s: {"episodes": len(v), "success_rate": float(np.mean(v)) if v else None}
                for s, v in outcomes.items()
            }
            made = attempts = 0
            while made < cfg.near_misses and attempts < 4 * cfg.near_misses + 10:
                sigma = nm_sigmas[attempts % len(nm_sigmas)]
                rng = np.random.default_rng([cfg.seed, attempts, ti, 13])
                nm = near_miss_episode(
                    env,
                    expert,
                    seed=cfg.seed + NEAR_MISS_SEED_OFFSET + attempts,
                    sigma=sigma,
                    stop_short=stop_short,
                    drift_steps=cfg.drift_steps,
                    drift_sigma=cfg.drift_sigma,
                    rng=rng,
                    max_steps=cfg.max_steps,
                    post_success_steps=cfg.post_success_steps,
                )
                attempts += 1
                if nm is None or nm.succeeded:
                    continue
                made += 1
                ep = writer.add_episode(nm.data, task=task, version=f"nearmiss-sigma{sigma:g}@0")
                stats["near_miss"]["episodes"] += 1
                near_miss_ids.append(ep)
            env.close()
            per_task[task] = stats
            if not quiet:
                rates = ", ".join(
                    f"sigma {s}: {v['success_rate']:.2f}"
                    for s, v in stats["expert"].items()
                    if v["episodes"]
                )
                print(
                    f"{task}: {rates}; {stats['near_miss']['episodes']} near-misses "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    rows = sum(info.rows for info in writer.written)
    summary = {
        "tasks": list(tasks),
        "rows": rows,
        "per_task": per_task,
        "near_miss_episodes": len(near_miss_ids),
        "seconds": round(time.perf_counter() - t0, 1),
        "config": asdict(cfg),
    }
    write_json(out / "reward_data.json", summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RewardDataConfig)


@clean_errors("collect-reward")
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(RewardDataConfig, args)
    summary = collect_reward_data(cfg)
    print(
        f"wrote {summary['rows']} transitions to {cfg.out} "
        f"({summary['near_miss_episodes']} near-miss failures)"
    )
    return 0
