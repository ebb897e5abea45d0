"""Measure a success detector and a progress model on held-out episodes; plots.

Detector, per episode (the decision the reward node makes): the detector runs over the whole
recorded episode (o_0 .. o_n) with its threshold and debounce; it **fires** or not.

- ``accuracy``/``precision``/``recall``: episode-level, positives = episodes the simulator
  says succeeded; ``false_success_in_failed``: failed episodes in which it fired (count and
  rate; near-misses counted separately too).
- ``detection_delay_steps``: fire step - true success step over detected successes (negative
  = before the simulator's flag, which the positives' ``pre_steps`` allow); ``by_success_step``:
  share of successes detected at or before the success step (what a graph whose simulator ends
  the episode at success needs); ``early``: fired more than ``pre_steps + 5`` steps early.
- ``window_*``: per-window accuracy/precision/recall against the WMPO labels.
- ``end_on_success``: the same episodes as a graph whose simulator ends each episode at its
  success step (``sim_robot end_on_success``) sees them: successful episodes cut at ``s``, and
  the reward node's rule at an episode's last sample (fired, or the final window alone at or
  above the threshold); ``recall`` and ``false_success_in_failed`` under that rule.

Progress, on successful episodes (o_0 .. o_s): Pearson and Spearman correlation between the
predicted and the true steps-to-go (equivalently between -d(o) and -time-to-success), pooled
over all steps; mean absolute error; the mean per-episode correlation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.rewardmodels.detector import SuccessDetector, first_fire
from vlarl.rewardmodels.labels import Episode, success_labels
from vlarl.rewardmodels.progress import ProgressModel, pearson

EARLY_SLACK = 5


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(x.size, np.float64)
        r[order] = np.arange(x.size)
        # average ranks of ties
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]

    return pearson(ranks(np.asarray(a)), ranks(np.asarray(b)))


def _episode_counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    tp = sum(1 for r in records if r["success"] and r["fired"] is not None)
    fn = sum(1 for r in records if r["success"] and r["fired"] is None)
    fp = sum(1 for r in records if not r["success"] and r["fired"] is not None)
    tn = sum(1 for r in records if not r["success"] and r["fired"] is None)
    n = len(records)
    failed = fp + tn
    near = [r for r in records if r["near_miss"]]
    delays = [
        r["fired"] - r["success_step"] for r in records if r["success"] and r["fired"] is not None
    ]
    g_tp = sum(1 for r in records if r["success"] and r["end_on_success_verdict"])
    g_fp = sum(1 for r in records if not r["success"] and r["end_on_success_verdict"])
    return {
        "episodes": n,
        "successes": tp + fn,
        "failures": failed,
        "near_misses": len(near),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "accuracy": _ratio(tp + tn, n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "false_success_in_failed": fp,
        "false_success_in_failed_rate": _ratio(fp, failed),
        "false_success_in_near_misses": sum(1 for r in near if r["fired"] is not None),
        "detection_delay_steps": _delay_stats(delays),
        "by_success_step": _ratio(sum(1 for d in delays if d <= 0), tp + fn),
        "early": sum(1 for r in records if r["success"] and r["fired"] is not None
                     and r["fired"] < r["success_step"] - r["pre_steps"] - EARLY_SLACK),
        "end_on_success": {
            "accuracy": _ratio(g_tp + failed - g_fp, n),
            "recall": _ratio(g_tp, tp + fn),
            "false_success_in_failed": g_fp,
        },
    }  # fmt: skip


def _delay_stats(delays: Sequence[int]) -> dict[str, Any]:
    if not delays:
        return {"n": 0}
    d = np.asarray(delays, np.float64)
    return {
        "n": int(d.size),
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "p90_abs": float(np.percentile(np.abs(d), 90)),
        "min": int(d.min()),
        "max": int(d.max()),
        "histogram": {
            str(int(v)): int(c) for v, c in zip(*np.unique(d, return_counts=True), strict=True)
        },
    }


def evaluate_detector(
    detector: SuccessDetector, episodes: Sequence[Episode]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-episode records) on ``episodes``."""
    pre = int(detector.metadata.params.get("pre_steps", 0))
    records: list[dict[str, Any]] = []
    w_pred: list[np.ndarray] = []
    w_true: list[np.ndarray] = []
    for ep in episodes:
        probs = detector.probabilities(ep.obs, task=ep.task)
        thr = detector.threshold_for(ep.task)
        k = first_fire(probs, threshold=thr, debounce=detector.debounce)
        labels = success_labels(ep.obs.shape[0], ep.success_step, pre_steps=pre)
        w_pred.append(probs >= thr)
        w_true.append(labels > 0)
        end = ep.success_step if ep.success_step is not None else ep.steps
        graph = (k is not None and k <= end) or bool(probs[end] >= thr)
        records.append({
            "episode": ep.episode, "task": ep.task, "version": ep.version,
            "success": ep.succeeded, "success_step": ep.success_step, "steps": ep.steps,
            "near_miss": ep.near_miss, "fired": k, "pre_steps": pre,
            "max_prob": float(probs.max()), "end_on_success_verdict": graph,
        })  # fmt: skip
    metrics = _episode_counts(records)
    wp = np.concatenate(w_pred)
    wt = np.concatenate(w_true)
    metrics["window_accuracy"] = float(np.mean(wp == wt))
    metrics["window_precision"] = _ratio(float(np.sum(wp & wt)), float(np.sum(wp)))
    metrics["window_recall"] = _ratio(float(np.sum(wp & wt)), float(np.sum(wt)))
    metrics["windows"] = int(wt.size)
    metrics["max_prob_in_failed"] = max(
        (r["max_prob"] for r in records if not r["success"]), default=None
    )
    tasks = sorted({r["task"] for r in records})
    if len(tasks) > 1:
        metrics["per_task"] = {
            t: _episode_counts([r for r in records if r["task"] == t]) for t in tasks
        }
    return metrics, records


def evaluate_progress(
    progress: ProgressModel, episodes: Sequence[Episode]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metrics, arrays for the scatter plot) on the successful ``episodes``."""
    preds: list[np.ndarray] = []
    trues: list[np.ndarray] = []
    tasks: list[np.ndarray] = []
    per_episode: list[float] = []
    failed_start: list[float] = []
    success_start: list[float] = []
    names = sorted({e.task for e in episodes})
    for ep in episodes:
        d = progress.steps_to_go(ep.obs, task=ep.task)
        if ep.success_step is None:
            failed_start.append(float(d[0]))
            continue
        s = ep.success_step
        true = (s - np.arange(s + 1)).astype(np.float32)
        pred = d[: s + 1]
        preds.append(pred)
        trues.append(true)
        tasks.append(np.full(pred.size, names.index(ep.task)))
        success_start.append(float(d[0]))
        c = pearson(pred, true)
        if np.isfinite(c):
            per_episode.append(c)
    if not preds:
        return {"episodes": 0}, {}
    p = np.concatenate(preds)
    t = np.concatenate(trues)
    ti = np.concatenate(tasks)
    metrics: dict[str, Any] = {
        "episodes": len(preds),
        "points": int(p.size),
        "progress_corr": pearson(-p, -t),
        "progress_spearman": spearman(-p, -t),
        "mae_steps": float(np.mean(np.abs(p - t))),
        "mean_episode_corr": float(np.mean(per_episode)) if per_episode else None,
        "d0_mean_successful": float(np.mean(success_start)),
        "d0_mean_failed": float(np.mean(failed_start)) if failed_start else None,
    }
    if len(names) > 1:
        metrics["per_task"] = {
            name: {
                "progress_corr": pearson(-p[ti == i], -t[ti == i]),
                "mae_steps": float(np.mean(np.abs(p[ti == i] - t[ti == i]))),
                "points": int(np.sum(ti == i)),
            }
            for i, name in enumerate(names)
            if np.any(ti == i)
        }
    return metrics, {"pred": p, "true": t, "task": ti, "tasks": np.asarray(names)}


# ---------------------------------------------------------------------- plots
def plot_detector(
    metrics: dict[str, Any], records: Sequence[dict[str, Any]], path: Path, *, title: str
) -> None:
    """Confusion summary (left) and detection-delay histogram (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    cm = np.array([[metrics["tp"], metrics["fn"]], [metrics["fp"], metrics["tn"]]])
    ax1.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax1.text(j, i, str(v), ha="center", va="center", fontsize=14)
    ax1.set_xticks([0, 1], ["fired", "did not fire"])
    ax1.set_yticks([0, 1], ["succeeded\n(sim flag)", "failed"])
    acc = metrics["accuracy"] or 0.0
    ax1.set_title(
        f"episodes: accuracy {acc:.3f}, false success in failed "
        f"{metrics['false_success_in_failed']}/{metrics['failures']}",
        fontsize=9,
    )
    delays = [
        r["fired"] - r["success_step"] for r in records if r["success"] and r["fired"] is not None
    ]
    if delays:
        lo, hi = min(delays), max(delays)
        ax2.hist(delays, bins=np.arange(lo - 0.5, hi + 1.5, 1.0), color="tab:green")
    ax2.axvline(0, color="k", lw=1, ls="--")
    ax2.set_xlabel("fire step - true success step")
    ax2.set_ylabel("episodes")
    ax2.set_title("detection delay (negative = before the simulator's flag)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_progress(
    arrays: dict[str, np.ndarray], metrics: dict[str, Any], path: Path, *, title: str
) -> None:
    """Predicted vs true steps-to-go on held-out successful episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    if arrays:
        tasks = arrays["tasks"]
        for i, name in enumerate(tasks):
            sel = arrays["task"] == i
            ax.scatter(
                arrays["true"][sel],
                arrays["pred"][sel],
                s=3,
                alpha=0.35,
                label=str(name) if len(tasks) > 1 else None,
            )
        top = float(max(arrays["true"].max(), arrays["pred"].max()))
        ax.plot([0, top], [0, top], "k--", lw=1)
        if len(tasks) > 1:
            ax.legend(fontsize=6, markerscale=3)
    ax.set_xlabel("true steps to success")
    ax.set_ylabel("predicted steps to go d(o)")
    corr = metrics.get("progress_corr")
    ax.set_title(
        f"{title}\nPearson(-d, -time-to-success) = {corr if corr is None else round(corr, 3)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
