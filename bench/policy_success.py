"""Success of plain BC, the flow teacher (K=10) and the one-step student on mixed-quality demos.

Two settings, each with all three models trained on the same demonstrations:

* ``pick-place-v3``: single-task models, built by ``scripts/build_default_model.sh`` (run here
  when its outputs are missing) into ``runs/default``.
* ``mt10``: one multi-task model per kind over the ten MT10 tasks (instruction-conditioned),
  built here (``runs/mt10``, ``runs/mt10-tasknorm``, ``runs/mt10-success``; recipe below),
  plus ablations.

Every model is exported to ONNX and evaluated in-process through the policy node's loader for
``--episodes`` episodes per task from fixed seeds (episode i starts from seed 1_000_000 + i),
chunks executed by the same ChunkScheduler as the robot, success = the simulator's flag. Rates
carry 95% Wilson intervals.

Ablations: the single-task teacher acting from sampled noise (x_0 ~ N(0, I)) instead of x_0 = 0;
on MT10 the teacher/student with one global observation standardization, the teacher trained
from a scaled source, BC with per-task standardization, and the teacher trained on the
successful episodes only (``MT10_ABLATIONS``).

    python bench/policy_success.py [--episodes 50] [--replan-every 4] [--skip-mt10]

Saves ``bench/results/policy_success.json`` and ``policy_success.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SEED = 1_000_000
MODELS = ("bc", "teacher_k10", "student_1step")
LABELS = {
    "bc": "plain BC (MLP)",
    "teacher_k10": "flow teacher, K=10",
    "student_1step": "consistency student, 1 step",
}

# The MT10 recipe: the single-task one (scripts/build_default_model.sh) with the same noise mix
# and 400 episodes per task (collected as episodes 0-99 and 100-399), longer training for ten
# tasks (60k steps, 3x512), and instruction embeddings standardized over the tasks. The three
# main models all learn from every demonstration (the "same demonstrations"): plain BC
# (one global observation standardization, as before), the teacher with observations
# standardized per task (--task-norm: the instruction picks the statistics inside the graph;
# one global standardization squashes reach/push/pick-place's goal coordinates to a sixth of
# their own range), and its student. Ablations (MT10_ABLATIONS; same demonstrations unless
# said): the first teacher/student (global standardization), the task-norm teacher trained from
# x_0 = r * z, r ~ U(0, 1) (--source scaled), BC with per-task standardization, and the first
# recipe trained on the successful episodes only (--episodes success: NOT the same
# demonstrations).
MT10_COLLECT = {  # replay folder -> collect arguments
    ROOT / "data" / "mt10" / "mixed": "--tasks mt10 --episodes 100 --sigmas 0,0.5,1.0,2.0 --seed 0",
    ROOT / "data" / "mt10" / "mixed-b": "--tasks mt10 --episodes 300 --sigmas 0,0.5,1.0,2.0 "
    "--seed 100",
}
MT10_DATA = ",".join(str(p) for p in MT10_COLLECT)
MT10_COMMON = "--chunk-length 8 --hidden 512 --depth 3 --seed 0 --train-steps 60000"
MT10_DISTILL = "--hidden 256 --train-steps 15000 --lr 3e-4 --seed 0"
# The main recipe since session 4: the teacher trains for 150k steps (BC stays at 60k: at 150k
# it is worse), and teacher and student act from a start x_0 ~ N(0, 0.5^2 I) drawn inside the
# ONNX graph (export --start-noise 0.5) instead of x_0 = 0; the student is distilled for that
# start (--noise-scale 0.5).
MT10_LONG = "--chunk-length 8 --hidden 512 --depth 3 --seed 0 --train-steps 150000"
MT10_DISTILL_NOISE = (
    "--hidden 256 --train-steps 30000 --lr 3e-4 --seed 0 --noise-scale 0.5 --anchor-fraction 0.5"
)
START_NOISE = "--start-noise 0.5"


@dataclass(frozen=True)
class Mt10Model:
    ckpt: Path
    verb: str
    extra: str
    teacher: str = ""  # for a student: the MT10_MODELS key of its teacher
    group: str = "main"  # "main" or the ablation it belongs to
    export: str = ""  # extra `vlarl export` arguments
    onnx_name: str = ""  # the ONNX file's model part when not the key (earlier files are reused)


# model -> how it is built; a teacher comes before its student.
MT10_MODELS: dict[str, Mt10Model] = {
    # BC at 60k steps: at 150k it is worse (ablation "training_length").
    "bc": Mt10Model(ROOT / "runs/mt10/bc/bc.safetensors", "train-bc", MT10_COMMON),
    "teacher_k10": Mt10Model(
        ROOT / "runs/mt10-long/teacher/teacher.safetensors",
        "train-teacher",
        f"{MT10_LONG} --steps 10 --task-norm",
        export=START_NOISE,
    ),
    "student_1step": Mt10Model(
        ROOT / "runs/mt10-long/student-ns0.5/student.safetensors",
        "distill",
        MT10_DISTILL_NOISE,
        teacher="teacher_k10",
        export=START_NOISE,
    ),
    "teacher_x0_zero": Mt10Model(
        ROOT / "runs/mt10-long/teacher/teacher.safetensors",
        "train-teacher",
        f"{MT10_LONG} --steps 10 --task-norm",
        group="x0_zero",
    ),
    "bc_150k": Mt10Model(
        ROOT / "runs/mt10-long/bc/bc.safetensors", "train-bc", MT10_LONG, group="training_length"
    ),
    "teacher_60k": Mt10Model(
        ROOT / "runs/mt10-tasknorm/teacher/teacher.safetensors",
        "train-teacher",
        f"{MT10_COMMON} --steps 10 --task-norm",
        group="training_length",
        onnx_name="teacher_k10",
    ),
    "student_60k": Mt10Model(
        ROOT / "runs/mt10-tasknorm/student/student.safetensors",
        "distill",
        MT10_DISTILL,
        teacher="teacher_60k",
        group="training_length",
        onnx_name="student_1step",
    ),
    "bc_task_norm": Mt10Model(
        ROOT / "runs/mt10-tasknorm/bc/bc.safetensors",
        "train-bc",
        f"{MT10_COMMON} --task-norm",
        group="bc_task_norm",
    ),
    "teacher_global_norm": Mt10Model(
        ROOT / "runs/mt10/teacher/teacher.safetensors",
        "train-teacher",
        f"{MT10_COMMON} --steps 10",
        group="global_norm",
    ),
    "student_global_norm": Mt10Model(
        ROOT / "runs/mt10/student/student.safetensors",
        "distill",
        MT10_DISTILL,
        teacher="teacher_global_norm",
        group="global_norm",
    ),
    "teacher_task_norm_scaled": Mt10Model(
        ROOT / "runs/mt10-tasknorm/teacher-scaled/teacher.safetensors",
        "train-teacher",
        f"{MT10_COMMON} --steps 10 --task-norm --source scaled",
        group="task_norm_scaled",
    ),
    "teacher_success": Mt10Model(
        ROOT / "runs/mt10-success/teacher/teacher.safetensors",
        "train-teacher",
        f"{MT10_COMMON} --steps 10 --episodes success",
        group="success_filtered",
    ),
    "student_success": Mt10Model(
        ROOT / "runs/mt10-success/student/student.safetensors",
        "distill",
        MT10_DISTILL,
        teacher="teacher_success",
        group="success_filtered",
    ),
}
MT10_ABLATIONS = {
    "x0_zero": "the main teacher acting from x_0 = 0 (deterministic) instead of sampled x_0",
    "training_length": "each kind at the other training length: BC for 150k steps; the "
    "task-norm teacher for 60k steps and its student (distilled for x_0 = 0), acting from "
    "x_0 = 0 (session 3's main models)",
    "bc_task_norm": "plain BC with the teacher's per-task standardization (same demonstrations "
    "and width; 60k steps)",
    "global_norm": "the first MT10 teacher and its student: one global observation "
    "standardization, as the main BC (same demonstrations and width; 60k steps, x_0 = 0)",
    "task_norm_scaled": "the task-norm teacher trained from x_0 = r * z, r ~ U(0, 1) "
    "(--source scaled) instead of N(0, I) (same demonstrations and width; 60k steps, x_0 = 0)",
    "success_filtered": "teacher with global standardization trained on the successful episodes "
    "only (--episodes success: NOT the same demonstrations); its student distilled on every state",
}


def sh(cmd: list[str], *, log: Path) -> None:
    """Run a vlarl verb (or script), appending its output to ``log``; fail loudly."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")


def vlarl(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlarl.cli", *args]


def build_mt10(log: Path, models: dict[str, Mt10Model]) -> None:
    for folder, args in MT10_COLLECT.items():
        if not (folder / "metrics.json").is_file():
            sh(vlarl("collect", "--out", str(folder), *args.split()), log=log)
    for spec in models.values():
        if spec.ckpt.is_file():
            continue
        argv = ["--data", MT10_DATA, "--out", str(spec.ckpt.parent), *spec.extra.split()]
        if spec.verb == "distill":
            argv = ["--teacher", str(MT10_MODELS[spec.teacher].ckpt), *argv]
        sh(vlarl(spec.verb, *argv), log=log)


def export_all(
    models: dict[str, Path],
    prefix: str,
    log: Path,
    extra_args: dict[str, str] | None = None,
    names: dict[str, str] | None = None,
) -> dict[str, Path]:
    """ONNX files of the given checkpoints (teachers with K=10 unrolled), beside them."""
    out = {}
    for model, ckpt in models.items():
        name = (names or {}).get(model) or model
        path = ckpt.parent.parent / "onnx" / f"{prefix}-{name.replace('_', '-')}.onnx"
        if not path.is_file():
            extra = ["--steps", "10"] if model.startswith("teacher") else []
            extra += (extra_args or {}).get(model, "").split()
            kind = model.split("_")[0]
            sh(
                vlarl(
                    "export",
                    "--checkpoint",
                    str(ckpt),
                    "--out",
                    str(path),
                    "--model-id",
                    f"{prefix}-{kind}",
                    "--tensorrt",
                    "off",
                    *extra,
                ),
                log=log,
            )
        out[model] = path
    return out


def evaluate(
    policy: Path, tasks: str, *, episodes: int, replan: int, noise_scale: float = 0.0
) -> dict[str, Any]:
    from vlarl.learning.evaluate import EvaluateConfig
    from vlarl.learning.evaluate import evaluate as run_eval
    from vlarl.learning.runs import write_json

    tag = f"-noise{noise_scale:g}" if noise_scale else ""
    out = policy.parent / f"eval-{policy.stem}-{tasks.replace(',', '+')}-r{replan}{tag}.json"
    cfg = EvaluateConfig(
        policy=str(policy),
        tasks=tasks,
        episodes=episodes,
        seed=SEED,
        replan_every=replan,
        noise_scale=noise_scale,
        out=str(out),
    )
    # Evaluation is deterministic (fixed seeds, one thread): an earlier result of the same
    # model file (sha256) under the same settings is reused instead of re-running it.
    digest = hashlib.sha256(policy.read_bytes()).hexdigest()

    def settings(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in ("policy", "out")}

    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("policy_sha256") == digest and settings(old["config"]) == settings(asdict(cfg)):
            print(f"  reusing {out.relative_to(ROOT)} (same model file and settings)", flush=True)
            return old
    doc = run_eval(cfg, quiet=True)
    doc["policy_sha256"] = digest
    write_json(out, {k: v for k, v in doc.items() if k != "out"})
    return doc


def cell(doc: dict[str, Any], task: str) -> dict[str, Any]:
    r = doc["tasks"][task]
    return {
        k: r[k]
        for k in (
            "success_rate",
            "episodes",
            "successes",
            "ci_low",
            "ci_high",
            "mean_length_success",
        )
    }


def data_summary(folder: Path) -> dict[str, Any]:
    doc = json.loads((folder / "metrics.json").read_text())
    return {
        "replay": str(folder.relative_to(ROOT)),
        "rows": doc["rows"],
        "sigmas": doc["sigmas"],
        "expert_success_per_sigma": {
            t: {s: v["success_rate"] for s, v in per.items()} for t, per in doc["per_task"].items()
        },
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list[tuple[str, dict[str, Any]]] = []
    if "pick-place-v3" in doc["results"]:
        groups.append(("pick-place-v3\n(single-task)", doc["results"]["pick-place-v3"]))
    if "mt10" in doc["results"]:
        mt = doc["results"]["mt10"]
        for task, row in mt["per_task"].items():
            groups.append((task.removesuffix("-v3").replace("-", "\n"), row))
        groups.append(("MT10\noverall", mt["overall"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 4.2))
    colors = {"bc": "#999999", "teacher_k10": "#c05a2b", "student_1step": "#2b7bc0"}
    width = 0.27
    x = np.arange(len(groups))
    for j, model in enumerate(MODELS):
        rates = np.array([g[1][model]["success_rate"] for g in groups])
        lo = rates - np.array([g[1][model]["ci_low"] for g in groups])
        hi = np.array([g[1][model]["ci_high"] for g in groups]) - rates
        ax.bar(
            x + (j - 1) * width,
            100 * rates,
            width,
            yerr=100 * np.vstack([lo, hi]),
            capsize=2,
            color=colors[model],
            label=LABELS[model],
            error_kw={"lw": 0.8},
        )
    ax.set_xticks(x, [g[0] for g in groups], fontsize=7)
    ax.set_ylabel("success (%), 95% Wilson CI")
    ax.set_ylim(0, 112)
    if "pick-place-v3" in doc["results"] and "mt10" in doc["results"]:
        ax.axvline(0.5, color="black", lw=0.8, ls="--")
        ax.text(0.5 + 0.1, 106, "MT10: one multi-task model per kind", fontsize=8, va="center")
        ax.text(-0.4, 106, "single-task", fontsize=8, va="center")
    ax.set_title(
        f"{doc['settings']['episodes']} episodes per task, fixed seeds; demonstrations: scripted "
        "experts with noise sigma in {0, 0.5, 1, 2} (mixed quality)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--replan-every", type=int, default=4)
    parser.add_argument("--skip-mt10", action="store_true")
    parser.add_argument(
        "--mt10-ablations",
        default=",".join(MT10_ABLATIONS),
        help=f"MT10 ablation groups to build and evaluate, of {', '.join(MT10_ABLATIONS)} "
        "('' = none; missing checkpoints are trained first)",
    )
    parser.add_argument("--skip-pick-place", action="store_true")
    parser.add_argument(
        "--replan-sweep",
        default="1,2,4,8",
        help="replan_every values tried with the single-task student ('' = none)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "policy_success.json")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    log = ROOT / "runs" / "bench-policy-success.log"
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    doc: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "episodes": args.episodes,
            "seed_of_episode_i": f"{SEED} + i",
            "replan_every": args.replan_every,
            "max_steps": 500,
            "backend": "ONNX Runtime CPU via vlarl.core.onnx_policy",
            "success_source": "simulator flag",
        },
        "data": {},
        "results": {},
    }
    if args.out.is_file():  # keep the other setting's results when re-running one of them
        old = json.loads(args.out.read_text())
        doc["results"].update(old.get("results", {}))
        doc["data"].update(old.get("data", {}))
        for key in ("replan_sweep", "ablation_sampled_teacher", "ablations_mt10"):
            if key in old:
                doc[key] = old[key]

    if not args.skip_pick_place:
        runs = ROOT / "runs" / "default"
        if not (runs / "student" / "student.safetensors").is_file():
            sh(["bash", str(ROOT / "scripts" / "build_default_model.sh")], log=log)
        files = export_all(
            {
                "bc": runs / "bc" / "bc.safetensors",
                "teacher_k10": runs / "teacher" / "teacher.safetensors",
                "student_1step": runs / "student" / "student.safetensors",
            },
            "pick-place-v3",
            log,
        )
        row = {}
        for model, path in files.items():
            print(f"evaluating {model} on pick-place-v3 ...", flush=True)
            row[model] = cell(
                evaluate(path, "pick-place-v3", episodes=args.episodes, replan=args.replan_every),
                "pick-place-v3",
            )
        doc["results"]["pick-place-v3"] = {"models": "single-task", **row}
        doc["data"]["pick-place-v3"] = data_summary(ROOT / "data" / "default" / "pick-place-mixed")
        sweep = [int(x) for x in args.replan_sweep.split(",") if x.strip()]
        if sweep:
            doc["replan_sweep"] = {
                "model": "single-task student (ONNX)",
                "success_rate": {
                    str(r): cell(
                        evaluate(
                            files["student_1step"],
                            "pick-place-v3",
                            episodes=args.episodes,
                            replan=r,
                        ),
                        "pick-place-v3",
                    )
                    for r in sweep
                },
            }
        # Ablation: the same teacher acting from sampled noise x_0 ~ N(0, I) instead of x_0 = 0.
        print("evaluating the teacher with sampled x_0 on pick-place-v3 ...", flush=True)
        sampled = evaluate(
            runs / "teacher" / "teacher.safetensors",
            "pick-place-v3",
            episodes=args.episodes,
            replan=args.replan_every,
            noise_scale=1.0,
        )
        doc["ablation_sampled_teacher"] = {
            "model": "single-task teacher checkpoint, K=10, x_0 ~ N(0, I) (PyTorch)",
            "pick-place-v3": cell(sampled, "pick-place-v3"),
        }
    if not args.skip_mt10:
        groups = [g.strip() for g in args.mt10_ablations.split(",") if g.strip()]
        unknown = [g for g in groups if g not in MT10_ABLATIONS]
        if unknown:
            raise SystemExit(f"unknown --mt10-ablations {unknown}; known: {list(MT10_ABLATIONS)}")
        models = {m: x for m, x in MT10_MODELS.items() if x.group == "main" or x.group in groups}
        build_mt10(log, models)
        files = export_all(
            {m: spec.ckpt for m, spec in models.items()},
            "mt10",
            log,
            {m: spec.export for m, spec in models.items()},
            {m: spec.onnx_name for m, spec in models.items()},
        )
        per_task: dict[str, dict[str, Any]] = {}
        overall: dict[str, Any] = {}
        for model, path in files.items():
            print(f"evaluating {model} on MT10 ...", flush=True)
            res = evaluate(path, "mt10", episodes=args.episodes, replan=args.replan_every)
            for task in res["tasks"]:
                per_task.setdefault(task, {})[model] = cell(res, task)
            overall[model] = {
                k: res["overall"][k]
                for k in ("success_rate", "episodes", "successes", "ci_low", "ci_high")
            }
        doc["results"]["mt10"] = {
            "models": "one multi-task model per kind (instruction-conditioned), all trained on "
            "every demonstration at the same width: plain BC (60k steps; 150k is worse) with one "
            "global observation standardization, the teacher (150k steps) with per-task "
            "standardization, the "
            "student distilled from it on every state; teacher and student act from "
            "x_0 ~ N(0, 0.5^2 I) drawn inside the ONNX graph",
            "recipe": {
                m: f"vlarl {MT10_MODELS[m].verb} {MT10_MODELS[m].extra}"
                + (f"; vlarl export {MT10_MODELS[m].export}" if MT10_MODELS[m].export else "")
                for m in MODELS
            },
            "per_task": {t: {m: row[m] for m in MODELS} for t, row in per_task.items()},
            "overall": {m: overall[m] for m in MODELS},
        }
        doc["ablations_mt10"] = {
            group: {
                "models": about,
                "recipe": {
                    m: f"vlarl {spec.verb} {spec.extra}"
                    for m, spec in MT10_MODELS.items()
                    if spec.group == group
                },
                "per_task": {
                    t: {m: row[m] for m, spec in MT10_MODELS.items() if spec.group == group}
                    for t, row in per_task.items()
                },
                "overall": {
                    m: overall[m] for m, spec in MT10_MODELS.items() if spec.group == group
                },
            }
            for group, about in MT10_ABLATIONS.items()
            if group in groups
        }
        doc["data"]["mt10"] = [data_summary(folder) for folder in MT10_COLLECT]

    goals: dict[str, Any] = {}
    settings = []
    if "pick-place-v3" in doc["results"]:
        settings.append(("pick-place-v3", doc["results"]["pick-place-v3"]))
    if "mt10" in doc["results"]:
        settings.append(("mt10", doc["results"]["mt10"]["overall"]))
        settings.append(("mt10:pick-place-v3", doc["results"]["mt10"]["per_task"]["pick-place-v3"]))
    for name, row in settings:
        b, t, s = (row[m]["success_rate"] for m in MODELS)
        goals[name] = {
            "student_over_teacher": s / t if t else float("nan"),
            "student_at_least_95pct_of_teacher": s >= 0.95 * t,
            "teacher_above_bc": t > b,
            "student_above_bc": s > b,
            "teacher_minus_bc": t - b,
            "student_minus_bc": s - b,
            # "clear": the 95% Wilson intervals do not overlap.
            "teacher_clearly_above_bc": row["teacher_k10"]["ci_low"] > row["bc"]["ci_high"],
            "student_clearly_above_bc": row["student_1step"]["ci_low"] > row["bc"]["ci_high"],
        }
    doc["goals"] = goals
    if "pick-place-v3" in doc["results"] and "mt10" in doc["results"]:
        single = doc["results"]["pick-place-v3"]["student_1step"]["success_rate"]
        multi = doc["results"]["mt10"]["per_task"]["pick-place-v3"]["student_1step"]["success_rate"]
        doc["default_model"] = {
            "pick-place-v3 single-task student": single,
            "pick-place-v3 MT10 student": multi,
            "chosen": "single-task" if single >= multi else "multi-task",
        }
    doc["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "note": "shared machine; success rates do not depend on load",
    }
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, args.out.with_suffix(".png"))
    for name, row in settings:
        cells = "  ".join(
            f"{m}: {100 * row[m]['success_rate']:.0f}% "
            f"[{100 * row[m]['ci_low']:.0f}, {100 * row[m]['ci_high']:.0f}]"
            for m in MODELS
        )
        print(f"{name:20s} {cells}")
    print(f"goals: {json.dumps(goals)}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
