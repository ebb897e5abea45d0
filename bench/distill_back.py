"""Distill-back benchmark (issue 11, part 4): does a distilled base act better on the shifted arm
by itself, and does it keep its success on the nominal arm?

1. RL data stand-in: on the shifted robot (``MetaWorldRobot(action_offset=...)``, default
   +0.2 on dy) the scripted expert acts with its commands corrected by the shift
   (command = clip(expert - offset)); the successful episodes' commands are recorded with
   ``ReplayWriter``, as the residual's collection would record them (``base_action`` = the
   expert's uncorrected action, ``residual`` = the correction). Layouts: robot seed 7, disjoint
   from the evaluation's.
2. One round of ``vlarl.learning.distill_back.distill_back`` with its default config (the tuned
   recipe) from the shipped teacher and student checkpoints, on the default demonstrations
   (regenerated when missing) plus that RL data. Wall time and CPU time are measured.
3. ``vlarl.learning.evaluate`` (50 fixed layouts, seeds 1,000,000+, replan every 4) of the
   original base and the new base, on the shifted and on the nominal arm.

Writes ``bench/results/distill_back.json`` and ``bench/results/distill_back.png``.
Run: ``nice -n 5 python bench/distill_back.py`` (about 10 minutes on a free core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BASE = ROOT / "models" / "pick-place-v3-student.onnx"
COLLECTED_BY = "expert-shift-corrected@0"


def collect_rl_data(out: Path, *, task: str, offset: np.ndarray, episodes: int, seed: int) -> dict:
    """Successful shift-corrected expert episodes on the shifted robot, in the replay format."""
    from vlarl.data.replay import ReplayWriter, Transitions
    from vlarl.learning import envs
    from vlarl.sim.robot import MetaWorldRobot

    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    robot = MetaWorldRobot(task, seed=seed, action_offset=offset)
    expert = envs.expert_for(task)
    kept = attempts = rows = 0
    with ReplayWriter(out, source="bench:expert-shift-corrected", tasks=[task]) as writer:
        while kept < episodes and attempts < 3 * episodes:
            obs = robot.reset(episode=attempts).copy()
            attempts += 1
            cols: dict[str, list[Any]] = {
                k: [] for k in ("obs", "next_obs", "action", "base_action", "reward", "success")
            }
            while not robot.done:
                clean = envs.expert_action(expert, obs)
                command = np.clip(clean - offset, -1.0, 1.0)
                step = robot.step(command)
                next_obs = robot.state.copy()
                for key, value in (
                    ("obs", obs),
                    ("next_obs", next_obs),
                    ("action", command),
                    ("base_action", clean),
                    ("reward", step.reward),
                    ("success", int(step.success)),
                ):
                    cols[key].append(value)
                obs = next_obs
            if not robot.success:
                continue
            n = len(cols["obs"])
            action = np.asarray(cols["action"], np.float32)
            base = np.asarray(cols["base_action"], np.float32)
            terminal = np.zeros(n, np.uint8)
            terminal[-1] = 1
            writer.add_episode(
                Transitions.build(
                    obs=np.asarray(cols["obs"], np.float32),
                    next_obs=np.asarray(cols["next_obs"], np.float32),
                    action=action,
                    base_action=base,
                    residual=action - base,
                    reward=np.asarray(cols["reward"], np.float32),
                    terminal=terminal,
                    truncated=np.zeros(n, np.uint8),
                    success=np.asarray(cols["success"], np.uint8),
                ),
                task=task,
                version=COLLECTED_BY,
            )
            kept += 1
            rows += n
    summary = {"episodes_kept": kept, "attempts": attempts, "rows": rows, "env_steps": rows}
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_model(policy: Path, *, offset: str, episodes: int, out: Path) -> dict:
    from vlarl.learning.evaluate import EvaluateConfig, evaluate

    if out.is_file():
        doc = json.loads(out.read_text())
    else:
        doc = evaluate(
            EvaluateConfig(
                policy=str(policy),
                episodes=episodes,
                replan_every=4,
                action_offset=offset,
                out=str(out),
            ),
            quiet=True,
        )
    o = doc["overall"]
    return {
        "success_rate": o["success_rate"],
        "successes": o["successes"],
        "episodes": o["episodes"],
        "ci95": [round(o["ci_low"], 3), round(o["ci_high"], 3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--action-offset", default="0,0.2,0,0")
    parser.add_argument("--rl-episodes", type=int, default=100, help="successful RL episodes")
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-distill-back"))
    parser.add_argument("--demos", default=str(ROOT / "data" / "default" / "pick-place-mixed"))
    parser.add_argument("--rl-fraction", type=float, default=None, help="override the default")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.chdir(ROOT)

    from vlarl.learning.distill_back import (
        DistillBackConfig,
        distill_back,
        ensure_demonstrations,
    )
    from vlarl.learning.train_residual import parse_offset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    offset = parse_offset(args.action_offset)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rl = collect_rl_data(
        work / "rl", task="pick-place-v3", offset=offset, episodes=args.rl_episodes, seed=7
    )
    print(f"RL data: {rl}")
    demos = ensure_demonstrations(Path(args.demos))
    cfg = DistillBackConfig(overwrite=True)
    if args.rl_fraction is not None:
        cfg.rl_fraction = args.rl_fraction
    tag = f"f{cfg.rl_fraction:g}"
    result = distill_back(
        cfg,
        demos=[demos],
        rl_data=[work / "rl"],
        out=work / f"round1-{tag}",
        parent="pick-place-v3-student@1",
        collected_by=COLLECTED_BY,
        version=2,
        model_id="pick-place-v3-student",
    )
    finals = {k: round(v, 5) for k, v in result.losses.items() if k != "curves"}
    print(
        f"distill-back: {result.tag} in {result.wall_s:.0f} s wall, {result.cpu_s:.0f} s CPU "
        f"({result.stage_s}); losses {finals}"
    )
    evals: dict[str, dict[str, Any]] = {}
    for name, model in (("original", BASE), ("distilled", result.onnx)):
        evals[name] = {}
        for arm, off in (("shifted", args.action_offset), ("nominal", "0,0,0,0")):
            suffix = tag if name == "distilled" else "base"
            evals[name][arm] = evaluate_model(
                model,
                offset=off,
                episodes=args.eval_episodes,
                out=work / f"eval-{name}-{suffix}-{arm}.json",
            )
            print(f"{name:9s} on the {arm:7s} arm: {evals[name][arm]}")
    doc = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "pick-place-v3",
        "action_offset": args.action_offset,
        "original_base": "models/pick-place-v3-student.onnx",
        "original_shifted_success": evals["original"]["shifted"]["success_rate"],
        "distilled_shifted_success": evals["distilled"]["shifted"]["success_rate"],
        "original_nominal_success": evals["original"]["nominal"]["success_rate"],
        "distilled_nominal_success": evals["distilled"]["nominal"]["success_rate"],
        "distill_back_wall_s": round(result.wall_s, 1),
        "distill_back_cpu_s": round(result.cpu_s, 1),
        "distill_back_stage_s": result.stage_s,
        "eval": {"episodes": args.eval_episodes, "seeds_from": 1_000_000, "replan_every": 4},
        "evaluations": evals,
        "rl_data": {**rl, "collected_by": COLLECTED_BY, "robot_seed": 7},
        "config": asdict(cfg),
        "new_base": {
            "tag": result.tag,
            "sha256": result.sha256,
            "lineage": result.metadata.lineage,
            "max_abs_err_vs_pytorch": result.max_abs_err_vs_pytorch,
        },
        "losses": result.losses,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": cfg.threads,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "bench_wall_s": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_back.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, RESULTS / "distill_back.png")
    print(f"wrote {RESULTS / 'distill_back.json'}")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    arms = ("shifted", "nominal")
    width = 0.38
    for k, name in enumerate(("original", "distilled")):
        rates = [doc["evaluations"][name][a]["success_rate"] for a in arms]
        lows = [
            r - doc["evaluations"][name][a]["ci95"][0] for r, a in zip(rates, arms, strict=True)
        ]
        highs = [
            doc["evaluations"][name][a]["ci95"][1] - r for r, a in zip(rates, arms, strict=True)
        ]
        xs = np.arange(len(arms)) + (k - 0.5) * width
        ax.bar(xs, rates, width, yerr=[lows, highs], capsize=4, label=f"{name} base alone")
    ax.set_xticks(np.arange(len(arms)))
    ax.set_xticklabels([f"shifted arm ({doc['action_offset']})", "nominal arm"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"success ({doc['eval']['episodes']} episodes, 95% CI)")
    ax.set_title(f"distill-back, one round ({doc['distill_back_cpu_s']:.0f} s CPU)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
