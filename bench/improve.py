"""Self-improvement benchmark (issue 11): the base policy improves itself with `vlarl improve`.

pick-place-v3 on the arm shifted by ``--action-offset`` (as in learning.json), ``--seeds`` seeds,
each one ``vlarl improve`` run in its own process (``--workers`` at a time): the original base
alone; base + residual after each round's residual RL; the new base alone (no residual) after
distill-back; the gate's verdict; env steps (gate episodes included) and wall time of every
stage. Evaluations: ``--eval-episodes`` fixed held-out layouts, the simulator's flag.

Writes ``bench/results/improve.json`` (top-level ``final_base_alone_success`` = mean over seeds
of the last round's base alone, ``original_base_success``, ``total_env_steps`` (mean), ``runs``
per seed and round) and ``bench/results/improve.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run_one(seed: int, args: argparse.Namespace, out_root: Path) -> dict[str, Any]:
    out = out_root / f"seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "vlarl.cli",
        "improve",
        "--seed",
        str(seed),
        "--action-offset",
        args.action_offset,
        "--rounds",
        str(args.rounds),
        "--residual-steps",
        args.residual_steps,
        "--eval-episodes",
        str(args.eval_episodes),
        "--out",
        str(out),
        "--overwrite",
        *args.extra,
    ]
    log = out_root / f"seed{seed}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed (exit {proc.returncode}); see {log}")
    summary = json.loads((out / "improve.json").read_text())
    summary["process_wall_s"] = round(time.perf_counter() - t0, 1)
    print(
        f"  seed {seed}: original {summary['original_base_success']:.2f} -> "
        + ", ".join(
            f"round {r['round']}: +res {r['base_plus_residual_success']:.2f}, new base "
            f"{r['new_base_alone_success']}"
            for r in summary["rounds"]
        )
        + f"; final {summary['final_base_alone_success']:.2f} at {summary['env_steps']} steps",
        flush=True,
    )
    return summary


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    labelled: set[str] = set()
    for run in doc["runs"].values():
        xs, ys, kinds = [0], [run["original_base_success"]], ["base"]
        steps = 0
        for r in run["rounds"]:
            steps += r["residual"]["env_steps"]
            xs.append(steps)
            ys.append(r["base_plus_residual_success"])
            kinds.append("base + residual")
            steps = r.get("env_steps_total", steps)
            if r.get("new_base_alone_success") is not None:
                xs.append(steps)
                ys.append(r["new_base_alone_success"])
                kinds.append("new base alone")
        ax.plot(xs, ys, "-", color="gray", alpha=0.4)
        for x, y, k in zip(xs, ys, kinds, strict=True):
            color = {"base": "tab:blue", "base + residual": "tab:green"}.get(k, "tab:purple")
            ax.plot(x, y, "o", color=color, label=None if k in labelled else k)
            labelled.add(k)
    ax.axhline(0.95, color="k", ls=":", lw=1, label="goal 0.95")
    ax.set_xlabel("environment steps (all stages)")
    ax.set_ylabel(f"success ({doc['eval_episodes']} held-out layouts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"vlarl improve on {doc['task']}, arm offset {doc['action_offset']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--action-offset", default="0,0.2,0,0")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--residual-steps", default="15000,5000")
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--runs-dir", default="runs/bench-improve")
    p.add_argument("--out", default=str(RESULTS / "improve.json"))
    p.add_argument("extra", nargs="*", help="more `vlarl improve` flags (after --)")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out_root = ROOT / args.runs_dir
    out_root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        runs = list(pool.map(lambda s: run_one(s, args, out_root), range(args.seeds)))
    n = len(runs)
    doc = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": runs[0]["task"],
        "action_offset": args.action_offset,
        "eval_episodes": args.eval_episodes,
        "rounds": args.rounds,
        "residual_steps": args.residual_steps,
        "improve_flags": args.extra,
        "final_base_alone_success": sum(r["final_base_alone_success"] for r in runs) / n,
        "original_base_success": sum(r["original_base_success"] for r in runs) / n,
        "total_env_steps": sum(r["env_steps"] for r in runs) / n,
        "runs": {str(r["seed"]): r for r in runs},
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": {"node": platform.node(), "python": platform.python_version()},
        "goals": {"final_base_alone_success": ">= 0.95 (aim 0.99)", "total_env_steps": "<= 40000"},
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(
        f"final base alone {doc['final_base_alone_success']:.3f} (original "
        f"{doc['original_base_success']:.3f}) at {doc['total_env_steps']:.0f} env steps (mean)"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
