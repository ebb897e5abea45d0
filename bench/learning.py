"""Learning benchmark: base alone vs base + residual (PLD + RLPD), the learner node's core.

Methods: ``residual`` (every candidate the critic pre-screens is deployed at once: ``--gate
none``), ``residual-gated`` (a candidate is deployed only on the rollout gate's verdict from
interleaved episodes: ``--gate rollouts``) and ``base`` (the base alone, no learning).

Each (method, seed) is one ``vlarl train-residual`` run in its own process (``--workers`` at a
time), all on the same deployment: the shipped base policy on the default task, with the
simulated robot's ``action_offset`` shift (by default +0.2 on dy: a miscalibrated arm on which
the base policy alone succeeds far less often; on the nominal robot it already succeeds in
50/50 episodes and there is nothing to improve). Success of each method's deterministic policy
on fixed held-out layouts is measured every ``--eval-every`` environment steps.

Writes ``bench/results/learning.json`` (per method and seed: success at each step count, wall
time) and ``bench/results/learning.png`` (success over environment steps, mean and per seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# bench method -> train-residual flags
METHODS: dict[str, list[str]] = {
    "residual": ["--method", "residual", "--gate", "none"],
    "residual-gated": ["--method", "residual", "--gate", "rollouts"],
    "base": ["--method", "base", "--gate", "none"],
}


def run_one(method: str, seed: int, args: argparse.Namespace, out_root: Path) -> dict:
    out = out_root / f"{method}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "vlarl.learning.train_residual",
        *METHODS[method],
        "--seed",
        str(seed),
        "--total-steps",
        str(args.steps),
        "--eval-every",
        str(args.eval_every),
        "--eval-episodes",
        str(args.eval_episodes),
        "--action-offset",
        args.action_offset,
        "--reward",
        args.reward,
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
        *args.extra,
    ]
    log = out_root / f"{method}-seed{seed}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed (exit {proc.returncode}); see {log}")
    summary = json.loads((out / "curve.json").read_text())
    summary["process_wall_s"] = round(time.perf_counter() - t0, 1)
    steps = ", ".join(f"{c['step']}:{c['success_rate']:.2f}" for c in summary["curve"])
    print(f"  {method:14s} seed {seed}: {steps}  ({summary['wall_s']:.0f} s)", flush=True)
    return summary


def logged(method: str, seed: int, out_root: Path) -> dict | None:
    """A run's curve from its folder: the final summary, or the evaluations logged so far."""
    run = out_root / f"{method}-seed{seed}"
    if (run / "curve.json").is_file():
        return json.loads((run / "curve.json").read_text())
    if not (run / "metrics.jsonl").is_file():
        return None
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    curve = [row for row in rows if row.get("kind") == "eval"]
    if not curve:
        return None
    return {
        "method": method,
        "seed": seed,
        "curve": curve,
        "complete": False,
        "wall_s": curve[-1]["wall_s"],
        "final_success": curve[-1]["success_rate"],
    }


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"residual": "tab:green", "residual-gated": "tab:purple", "base": "tab:blue"}
    labels = {
        "residual": "base + residual (PLD + RLPD), pre-screened candidates deployed",
        "residual-gated": "base + residual, deployed on the rollout gate's verdict",
        "base": "base alone",
    }
    for method, runs in doc["runs"].items():
        n = min(len(r["curve"]) for r in runs.values())
        curves = [[c["success_rate"] for c in r["curve"][:n]] for r in runs.values()]
        steps = [c["step"] for c in next(iter(runs.values()))["curve"][:n]]
        arr = np.array(curves)
        for row in arr:
            ax.plot(steps, row, color=colors.get(method), alpha=0.25, lw=1)
        ax.plot(
            steps,
            arr.mean(0),
            color=colors.get(method),
            lw=2.2,
            label=f"{labels.get(method, method)} (mean of {len(curves)} seeds)",
        )
    for method, cmp in doc.get("comparison", {}).items():
        ax.plot(
            cmp["other_steps"],
            cmp["other_mean_success"],
            color=colors.get(method),
            ls="--",
            lw=1.6,
            label=f"{labels.get(method, method)}, reward {cmp['other_reward']} (mean)",
        )
    ax.axhline(0.95, color="grey", ls=":", lw=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success rate (held-out layouts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        f"{doc['task']}, action offset {doc['action_offset']}, reward {doc.get('reward', 'sim')}"
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="residual,residual-gated,base", help=", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--eval-every", type=int, default=2_500)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--action-offset", default="0,0.2,0,0")
    p.add_argument("--reward", default="sim", help="sim | learned")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/bench-learning")
    p.add_argument("--out", default=str(RESULTS / "learning.json"))
    p.add_argument(
        "--aggregate-only",
        action="store_true",
        help="do not train: collect what the runs in --runs-dir logged so far (unfinished runs "
        "are marked complete: false)",
    )
    p.add_argument(
        "--compare-with",
        default=None,
        help="a learning.json of the same methods and seeds with the other reward: adds the "
        "ratio of final success (this run / that run) per method (issue 5's learned-vs-flag goal) "
        "and of mean success over the checkpoints after step 0",
    )
    p.add_argument("extra", nargs="*", help="more train-residual options (after --)")
    args = p.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out_root = (ROOT / args.runs_dir).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    print(
        f"learning benchmark: {methods} x seeds {seeds}, {args.steps} steps, "
        f"offset {args.action_offset}, reward {args.reward}",
        flush=True,
    )
    jobs = [(m, s) for m in methods for s in seeds]
    if args.aggregate_only:
        found = {job: logged(job[0], job[1], out_root) for job in jobs}
        results = {job: r for job, r in found.items() if r is not None}
        methods = [m for m in methods if any(job[0] == m for job in results)]
    else:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = {job: pool.submit(run_one, job[0], job[1], args, out_root) for job in jobs}
            results = {job: f.result() for job, f in futures.items()}
    doc: dict = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "pick-place-v3",
        "base_model": "models/pick-place-v3-student.onnx",
        "action_offset": args.action_offset,
        "reward": args.reward,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_episodes": args.eval_episodes,
        "runs": {m: {str(s): results[(m, s)] for s in seeds if (m, s) in results} for m in methods},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "workers": args.workers,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    for runs in doc["runs"].values():
        for r in runs.values():
            r.pop("residual_layers", None)
    summary = {}
    for m in methods:
        runs = list(doc["runs"][m].values())
        n = min(len(r["curve"]) for r in runs)
        curves = [[c["success_rate"] for c in r["curve"][:n]] for r in runs]
        steps = [c["step"] for c in runs[0]["curve"][:n]]
        mean = [sum(col) / len(col) for col in zip(*curves, strict=True)]
        summary[m] = {
            "seeds": len(runs),
            "complete": all(r.get("complete", True) for r in runs),
            "steps": steps,
            "mean_success": mean,
            "mean_wall_s": sum(r["wall_s"] for r in runs) / len(runs),
        }
    doc["summary"] = summary
    if "residual" in summary:
        res = summary["residual"]
        first = next(
            (st for st, v in zip(res["steps"], res["mean_success"], strict=True) if v >= 0.95), None
        )
        others = [m for m in summary if m == "base"]
        ahead = [
            all(
                res["mean_success"][i] > summary[o]["mean_success"][i]
                for o in others
                if i < len(summary[o]["mean_success"])
            )
            for i in range(1, len(res["steps"]))
        ]
        doc["goals"] = {
            "residual_reaches_95pct_at_step": first,
            "residual_95pct_within_20k": first is not None and first <= 20_000,
            "residual_ahead_at_every_checkpoint_after_0": all(ahead),
            "ahead_per_checkpoint": dict(zip(res["steps"][1:], ahead, strict=True)),
        }
        if "residual-gated" in summary:
            gated = summary["residual-gated"]
            pairs = zip(gated["steps"], gated["mean_success"], strict=True)
            doc["goals"]["gated_reaches_95pct_at_step"] = next(
                (st for st, v in pairs if v >= 0.95), None
            )
    if args.compare_with:
        other = json.loads(Path(args.compare_with).read_text())
        comparison = {}
        for m in summary:
            if m not in other.get("summary", {}):
                continue
            mine, theirs = summary[m]["mean_success"][-1], other["summary"][m]["mean_success"][-1]
            # The whole curve as well as its end: mean success over the checkpoints after 0.
            n = min(len(summary[m]["mean_success"]), len(other["summary"][m]["mean_success"]))
            my_area = sum(summary[m]["mean_success"][1:n]) / max(1, n - 1)
            their_area = sum(other["summary"][m]["mean_success"][1:n]) / max(1, n - 1)
            comparison[m] = {
                "reward": args.reward,
                "final_success": mine,
                "other_reward": other.get("reward"),
                "other_final_success": theirs,
                "ratio": (mine / theirs) if theirs > 0 else None,
                "mean_success_after_0": my_area,
                "other_mean_success_after_0": their_area,
                "area_ratio": (my_area / their_area) if their_area > 0 else None,
                "other_steps": other["summary"][m]["steps"],
                "other_mean_success": other["summary"][m]["mean_success"],
                "same_seeds": sorted(doc["runs"][m]) == sorted(other["runs"].get(m, {})),
                "same_steps": other.get("steps") == args.steps,
            }
        doc["comparison"] = comparison
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(
        json.dumps(
            {"summary": summary, "goals": doc.get("goals"), "comparison": doc.get("comparison")},
            indent=1,
        )
    )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
