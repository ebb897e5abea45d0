"""Latency of the teacher (K Euler steps) against the one-step student, batch 1, same run.

For each backend both models answer the same observations (real states around the training
data), in alternating blocks so both see the same machine conditions:

* ``pytorch-cpu``: the PyTorch modules, one intra-op thread, ``torch.inference_mode``.
* ``onnxruntime-cpu``: the exported ONNX files through the policy node's loader
  (:class:`vlarl.core.onnx_policy.OnnxPolicy`, I/O-bound batch-1 path), one intra-op thread.
* ``onnxruntime-cuda``, ``tensorrt`` (fp16 engine), ``torch-cuda``: only where available;
  otherwise the row records ``skipped: <reason>``.

    python bench/policy_latency.py [--teacher T.safetensors --student S.safetensors]

Defaults are the checkpoints ``scripts/build_default_model.sh`` writes. Saves
``bench/results/policy_latency.json`` (per backend and model: p50_ms, p99_ms, ...; speedup) and
``policy_latency.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_RUNS = ROOT / "runs" / "default"


def stats(samples_ns: list[int]) -> dict[str, float]:
    ms = np.asarray(samples_ns, np.float64) / 1e6
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "n": int(ms.size),
    }


def time_pair(
    calls: dict[str, Callable[[int], object]], *, iters: int, warmup: int, block: int = 100
) -> dict[str, dict[str, float]]:
    """Time each call ``iters`` times, alternating blocks of ``block`` calls between them."""
    for fn in calls.values():
        for i in range(warmup):
            fn(i)
    samples: dict[str, list[int]] = {k: [] for k in calls}
    clock = time.perf_counter_ns
    done = 0
    while done < iters:
        n = min(block, iters - done)
        for name, fn in calls.items():
            out = samples[name]
            for i in range(done, done + n):
                t0 = clock()
                fn(i)
                out.append(clock() - t0)
        done += n
    return {k: stats(v) for k, v in samples.items()}


def predictor(runner: Any, pool: np.ndarray, task: str) -> Callable[[int], object]:
    return lambda i: runner.predict(pool[i % len(pool)], task=task)


def engine_caller(engine: Any, feeds: list[dict[str, np.ndarray]]) -> Callable[[int], object]:
    return lambda i: engine.run(feeds[i % len(feeds)])


def observations(ckpt: Any, n: int, seed: int = 0) -> np.ndarray:
    norm = ckpt.policy.normalizer
    rng = np.random.default_rng(seed)
    mean, std = norm.obs_mean.numpy(), norm.obs_std.numpy()
    return (mean + std * rng.normal(size=(n, mean.size))).astype(np.float32)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from vlarl.core.onnx_policy import OnnxPolicy
    from vlarl.learning import tensorrt
    from vlarl.learning.checkpoint import load_checkpoint
    from vlarl.learning.export import metadata_for, to_onnx_bytes, with_metadata
    from vlarl.learning.networks import FlowPolicy

    torch.set_num_threads(1)
    teacher_ckpt = load_checkpoint(args.teacher)
    student_ckpt = load_checkpoint(args.student)
    teacher = teacher_ckpt.policy.eval()
    student = student_ckpt.policy.eval()
    if not isinstance(teacher, FlowPolicy):
        raise SystemExit(f"{args.teacher} is not a teacher checkpoint")
    teacher.steps = args.steps
    one_eval = copy.deepcopy(teacher)  # reference: one velocity evaluation of the teacher
    one_eval.steps = 1
    task = args.task
    obs_pool = observations(teacher_ckpt, 256)
    instr = teacher_ckpt.instruction_batch(task, 1)
    names = {
        "teacher": f"teacher_k{args.steps}",
        "student": "student_1step",
        "teacher1": "reference_teacher_k1",
    }
    results: dict[str, Any] = {}

    # --- PyTorch CPU
    obs_t = [torch.from_numpy(o[None]) for o in obs_pool]
    instr_t = None if instr is None else torch.from_numpy(instr)
    with torch.inference_mode():
        timed = time_pair(
            {
                names["teacher"]: lambda i: teacher(obs_t[i % 256], instr_t),
                names["student"]: lambda i: student(obs_t[i % 256], instr_t),
                names["teacher1"]: lambda i: one_eval(obs_t[i % 256], instr_t),
            },
            iters=args.iters,
            warmup=args.warmup,
        )
    results["pytorch-cpu"] = timed

    # --- ONNX Runtime CPU via the runtime loader (the deployed path)
    tmp = Path(tempfile.mkdtemp(prefix="vlarl-latency-"))
    files = {}
    for key, ckpt, module, steps in (
        ("teacher", teacher_ckpt, teacher, args.steps),
        ("student", student_ckpt, student, 0),
        ("teacher1", teacher_ckpt, one_eval, 1),
    ):
        meta = metadata_for(ckpt, model_id=f"bench-{key}", version=1, steps=steps)
        files[key] = tmp / f"{key}.onnx"
        files[key].write_bytes(with_metadata(to_onnx_bytes(module), meta, doc="bench"))
    runners = {k: OnnxPolicy.load(p, providers="cpu", intra_op_threads=1) for k, p in files.items()}
    out_buf = np.zeros((teacher.spec.chunk_length, teacher.spec.action_dim), np.float32)
    results["onnxruntime-cpu"] = time_pair(
        {
            names["teacher"]: lambda i: runners["teacher"].predict(
                obs_pool[i % 256], task=task, out=out_buf
            ),
            names["student"]: lambda i: runners["student"].predict(
                obs_pool[i % 256], task=task, out=out_buf
            ),
            names["teacher1"]: lambda i: runners["teacher1"].predict(
                obs_pool[i % 256], task=task, out=out_buf
            ),
        },
        iters=args.iters,
        warmup=args.warmup,
    )

    # --- Accelerators, where present
    if "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            cuda = {k: OnnxPolicy.load(p, providers="cuda") for k, p in files.items()}
            results["onnxruntime-cuda"] = time_pair(
                {names[k]: predictor(r, obs_pool, task) for k, r in cuda.items()},
                iters=args.iters,
                warmup=args.warmup,
            )
        except Exception as exc:
            results["onnxruntime-cuda"] = {"skipped": f"CUDA provider failed: {exc}"}
    else:
        results["onnxruntime-cuda"] = {
            "skipped": "no GPU in this session (onnxruntime offers no CUDAExecutionProvider)"
        }
    reason = tensorrt.unavailable_reason()
    if reason is None:
        try:
            engines = {}
            for k, p in files.items():
                rep = tensorrt.build_engine(p, p.with_suffix(".engine"), fp16=True)
                if not rep.built:
                    raise RuntimeError(rep.reason)
                engines[k] = tensorrt.EngineRunner(rep.engine)
            feeds = [
                {"obs": o[None]} | ({} if instr is None else {"instruction": instr})
                for o in obs_pool
            ]
            results["tensorrt"] = time_pair(
                {names[k]: engine_caller(e, feeds) for k, e in engines.items()},
                iters=args.iters,
                warmup=args.warmup,
            )
        except Exception as exc:
            results["tensorrt"] = {"skipped": f"TensorRT failed: {exc}"}
    else:
        results["tensorrt"] = {"skipped": reason}
    if torch.cuda.is_available():
        tg, sg = teacher.cuda(), student.cuda()
        obs_g = [o.cuda() for o in obs_t]
        ig = None if instr_t is None else instr_t.cuda()

        def sync(fn: Callable[[], object]) -> object:
            out = fn()
            torch.cuda.synchronize()
            return out

        with torch.inference_mode():
            results["torch-cuda"] = time_pair(
                {
                    names["teacher"]: lambda i: sync(lambda: tg(obs_g[i % 256], ig)),
                    names["student"]: lambda i: sync(lambda: sg(obs_g[i % 256], ig)),
                },
                iters=args.iters,
                warmup=args.warmup,
            )
    else:
        results["torch-cuda"] = {"skipped": "no GPU in this session (torch.cuda unavailable)"}

    for row in results.values():
        if "skipped" in row:
            continue
        t, s = row[names["teacher"]], row[names["student"]]
        row["speedup_p50"] = t["p50_ms"] / s["p50_ms"]
        row["speedup_p99"] = t["p99_ms"] / s["p99_ms"]
        row["speedup"] = row["speedup_p50"]
    measured = [r for r in results.values() if "skipped" not in r]
    ort_student = results["onnxruntime-cpu"][names["student"]]
    doc = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "what": (
            f"batch-1 latency of one action chunk: teacher with K={args.steps} Euler steps "
            "vs the one-step consistency student; same run, same backend, alternating "
            f"blocks of 100 calls; {args.iters} timed calls after {args.warmup} warm-up"
        ),
        "teacher": str(args.teacher),
        "student": str(args.student),
        "task": task,
        "models": {
            "reference_teacher_k1": "the teacher's network evaluated once (not a policy: shows "
            "what one of its K steps costs)",
            "teacher": {
                "kind": "teacher",
                "steps": args.steps,
                "hidden": teacher.spec.hidden,
                "depth": teacher.spec.depth,
            },
            "student": {
                "kind": "student",
                "steps": 1,
                "hidden": student.spec.hidden,
                "depth": student.spec.depth,
            },
            "chunk_length": teacher.spec.chunk_length,
            "instr_dim": teacher.spec.instr_dim,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "load_average_before": list(args.load_before),
            "load_average_after": list(os.getloadavg()),
            "note": "shared machine: other jobs were running; p99 includes their interference",
            "threads": 1,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
        },
        "backends": results,
        "goals": {
            "student_at_least_10x_faster_on_every_backend": all(
                r["speedup_p50"] >= 10.0 for r in measured
            ),
            "student_p99_below_0.5ms_on_onnxruntime_cpu": ort_student["p99_ms"] < 0.5,
        },
    }
    return doc


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v) for k, v in doc["backends"].items() if "skipped" not in v]
    models: list[str] = []
    for _, row in rows:
        models += [m for m, v in row.items() if isinstance(v, dict) and m not in models]
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    width = 0.8 / len(models)
    x = np.arange(len(rows))
    colors = {"teacher": "#c05a2b", "student": "#2b7bc0", "reference": "#bbbbbb"}
    for j, model in enumerate(models):
        xs = [
            x[i] + (j - (len(models) - 1) / 2) * width
            for i, (_, r) in enumerate(rows)
            if model in r
        ]
        p50 = [r[model]["p50_ms"] for _, r in rows if model in r]
        p99 = [r[model]["p99_ms"] for _, r in rows if model in r]
        color = colors[model.split("_")[0]]
        bars = ax.bar(xs, p50, width, label=f"{model} (p50)", color=color)
        ax.scatter(
            xs, p99, marker="_", s=250, color="black", label="p99" if j == 0 else None, zorder=3
        )
        for b, v in zip(bars, p50, strict=True):
            ax.annotate(
                f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7
            )
    for i, (_, r) in enumerate(rows):
        top = max(v["p99_ms"] for v in r.values() if isinstance(v, dict))
        ax.annotate(
            f"student {r['speedup_p50']:.1f}x faster (p50)",
            (x[i], top),
            xytext=(0, 10),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            fontweight="bold",
        )
    ax.set_xticks(x, [k for k, _ in rows])
    ax.set_yscale("log")
    ax.set_ylabel("latency per action chunk, batch 1 (ms, log)")
    skipped = [k for k, v in doc["backends"].items() if "skipped" in v]
    title = "flow teacher (K Euler steps) vs one-step consistency student, 1 thread"
    if skipped:
        title += f"\nskipped (no GPU in this session): {', '.join(skipped)}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", type=Path, default=DEFAULT_RUNS / "teacher" / "teacher.safetensors"
    )
    parser.add_argument(
        "--student", type=Path, default=DEFAULT_RUNS / "student" / "student.safetensors"
    )
    parser.add_argument("--task", default="pick-place-v3")
    parser.add_argument("--steps", type=int, default=10, help="teacher Euler steps K")
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "policy_latency.json")
    args = parser.parse_args()
    for p in (args.teacher, args.student):
        if not p.is_file():
            parser.error(f"{p} not found: run scripts/build_default_model.sh first")
    args.load_before = os.getloadavg()
    doc = bench(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, args.out.with_suffix(".png"))
    for backend, row in doc["backends"].items():
        if "skipped" in row:
            print(f"{backend:18s} skipped: {row['skipped']}")
            continue
        cells = "  ".join(
            f"{m}: p50 {v['p50_ms']:.3f} ms p99 {v['p99_ms']:.3f} ms"
            for m, v in row.items()
            if isinstance(v, dict)
        )
        print(
            f"{backend:18s} {cells}  speedup {row['speedup_p50']:.1f}x (p99 "
            f"{row['speedup_p99']:.1f}x)"
        )
    print(f"goals: {doc['goals']}")
    print(
        f"load average before/after: {doc['machine']['load_average_before']} / "
        f"{doc['machine']['load_average_after']}"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
