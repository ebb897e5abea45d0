"""``vlarl eval-reward``: a success detector and/or progress model on held-out episodes.

Prints the figures and, with ``--out DIR``, writes ``DIR/reward_eval.json`` plus plots
(``detector.png``: confusion summary and detection-delay histogram; ``progress.png``: predicted
vs true steps-to-go). See :mod:`vlarl.rewardmodels.evaluation` for the definitions.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlarl.learning.runs import add_config_arguments, arg, config_from_args, write_json
from vlarl.rewardmodels.cli_common import clean_errors, read_episodes
from vlarl.rewardmodels.errors import RewardModelError
from vlarl.rewardmodels.labels import Episode, describe


@dataclass
class EvalRewardArgs:
    data: str = arg("", "held-out replay directories (comma-separated)", required=True)
    detector: str = arg("", "success-detector ONNX file ('' = skip)")
    progress: str = arg("", "progress ONNX file ('' = skip)")
    tasks: str = arg("", "only these tasks ('' = all in the data, 'mt10', or names)")
    threshold: float = arg(0.0, "detector threshold (0 = the model's)")
    debounce: int = arg(0, "detector debounce (0 = the model's)")
    out: str = arg("", "folder for reward_eval.json and the plots ('' = print only)")
    name: str = arg("", "title of the plots")


def evaluate(
    episodes: list[Episode],
    *,
    detector: str = "",
    progress: str = "",
    threshold: float = 0.0,
    debounce: int = 0,
    out: Path | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Evaluate the given model files on ``episodes``; plots into ``out`` when given."""
    from vlarl.graph import resolve_model_path
    from vlarl.rewardmodels import evaluation as ev
    from vlarl.rewardmodels.detector import SuccessDetector
    from vlarl.rewardmodels.progress import ProgressModel

    if not detector and not progress:
        raise RewardModelError("nothing to evaluate: pass --detector and/or --progress")
    doc: dict[str, Any] = {"episodes": describe(episodes)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if detector:
        det = SuccessDetector.load(
            resolve_model_path(detector), threshold=threshold or None, debounce=debounce or None
        )
        metrics, records = ev.evaluate_detector(det, episodes)
        doc["detector"] = {
            "model": det.tag,
            "path": str(det.path),
            "sha256": det.model.sha256,
            "threshold": det.threshold,
            "task_thresholds": {t: det.threshold_for(t) for t in det.metadata.tasks},
            "debounce": det.debounce,
            "window": det.metadata.window,
            **metrics,
        }
        doc["detector_records"] = records
        if out is not None:
            ev.plot_detector(
                metrics,
                records,
                out / "detector.png",
                title=f"{name or det.tag}: success detector, held-out episodes",
            )
    if progress:
        pm = ProgressModel.load(resolve_model_path(progress))
        metrics, arrays = ev.evaluate_progress(pm, episodes)
        doc["progress"] = {
            "model": pm.tag,
            "path": str(pm.path),
            "sha256": pm.model.sha256,
            **metrics,
        }
        if out is not None:
            ev.plot_progress(
                arrays,
                metrics,
                out / "progress.png",
                title=f"{name or pm.tag}: steps-to-go, held-out successes",
            )
    return doc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalRewardArgs)


@clean_errors("eval-reward")
def run(args: argparse.Namespace) -> int:
    a = config_from_args(EvalRewardArgs, args)
    episodes = read_episodes(a.data, a.tasks)
    out = Path(a.out) if a.out else None
    doc = evaluate(
        episodes,
        detector=a.detector,
        progress=a.progress,
        threshold=a.threshold,
        debounce=a.debounce,
        out=out,
        name=a.name,
    )
    doc["args"] = asdict(a)
    shown = {k: v for k, v in doc.items() if k != "detector_records"}
    for part in ("detector", "progress"):
        if part in shown:
            shown[part] = {k: v for k, v in shown[part].items() if k != "per_task"}
    print(json.dumps(shown, indent=1, default=str))
    if out is not None:
        write_json(out / "reward_eval.json", doc)
        print(f"wrote {out / 'reward_eval.json'} and plots")
    return 0
