"""``vlarl train-detector``: replay episodes -> a success-detector ONNX model.

Labels follow WMPO's rule (:mod:`vlarl.rewardmodels.labels`); the threshold is chosen on a
held-out share of the episodes; the model is exported with its metadata (window, obs_dim,
threshold, debounce, tasks, instruction embeddings) and checked by loading it back. A report
(``<model>.train.json``) lands beside the model.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from vlarl.learning.runs import add_config_arguments, arg, config_from_args, write_json
from vlarl.rewardmodels.cli_common import (
    check_out,
    clean_errors,
    default_model_id,
    instructions_for,
    read_episodes,
    sidecar,
)
from vlarl.rewardmodels.detector import DetectorConfig, export_detector, train_detector
from vlarl.rewardmodels.labels import describe


@dataclass
class TrainDetectorArgs:
    data: str = arg(
        "", "replay directories with labelled episodes (comma-separated)", required=True
    )
    out: str = arg("", "ONNX file to write", required=True)
    calibration: str = arg(
        "", "more replay directories used only to choose the thresholds (e.g. near-misses)"
    )
    tasks: str = arg("", "only these tasks ('' = all in the data, 'mt10', or names)")
    model_id: str = arg("", "model id (default: <task>-success-detector)")
    version: int = arg(1, "model version in the metadata")
    window: int = arg(2, "observations per window")
    pre_steps: int = arg(2, "positives start this many steps before the success step")
    debounce: int = arg(3, "consecutive positive windows before the detector fires")
    hidden: int = arg(256, "MLP width")
    depth: int = arg(2, "hidden layers")
    points: str = arg(
        "auto", "3-d points for geometric features: auto, tcp, none or a,b@dx:dy:dz,... (m)"
    )
    rings: str = arg("none", "distance rings of the point pairs: auto (1-12 cm), none, r1,r2,...")
    ring_width: float = arg(0.002, "softness of the distance rings (m)")
    steps: int = arg(3000, "optimizer steps")
    batch: int = arg(512, "windows per step")
    lr: float = arg(1e-3, "peak learning rate")
    failed_weight: float = arg(6.0, "loss weight of windows of failed episodes (near-misses)")
    val_fraction: float = arg(0.15, "episodes held out to choose the threshold")
    seed: int = arg(0, "data split and initialization seed")
    threads: int = arg(1, "torch CPU threads")
    overwrite: bool = arg(False, "replace an existing model file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainDetectorArgs)


@clean_errors("train-detector")
def run(args: argparse.Namespace) -> int:
    a = config_from_args(TrainDetectorArgs, args)
    check_out(a.out, overwrite=a.overwrite)  # before training, not after
    episodes = read_episodes(a.data, a.tasks)
    counts = describe(episodes)
    print(f"episodes: {counts}")
    cfg = DetectorConfig(
        **{
            f.name: getattr(a, f.name)
            for f in dataclasses.fields(DetectorConfig)
            if hasattr(a, f.name)
        }
    )
    calibration = read_episodes(a.calibration, a.tasks) if a.calibration else []
    trained = train_detector(
        episodes,
        cfg,
        instructions=instructions_for(episodes),
        calibration=calibration,
        log=print,
    )
    result = export_detector(
        trained,
        a.out,
        model_id=a.model_id or default_model_id(episodes, "success-detector"),
        version=a.version,
        overwrite=a.overwrite,
        training_info={"data": a.data, "episodes": counts},
    )
    write_json(
        sidecar(a.out, ".train.json"),
        {
            "args": dataclasses.asdict(a),
            "episodes": counts,
            "calibration_episodes": describe(calibration) if calibration else {},
            "report": trained.report,
            "export": result,
        },
    )
    print(
        f"wrote {result['onnx']} ({result['bytes'] / 1024:.0f} KiB): {result['tag']}, "
        f"threshold {result['threshold']:g}, debounce {result['debounce']}, "
        f"|onnxruntime - torch| = {result['max_abs_err_vs_torch']:.1e}"
    )
    return 0
