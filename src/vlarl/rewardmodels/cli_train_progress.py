"""``vlarl train-progress``: replay episodes -> a steps-to-go (progress) ONNX model.

Targets need no labels beyond the episodes' success flags (:mod:`vlarl.rewardmodels.labels`).
A report (``<model>.train.json``) lands beside the model.
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
from vlarl.rewardmodels.labels import describe
from vlarl.rewardmodels.progress import ProgressConfig, export_progress, train_progress


@dataclass
class TrainProgressArgs:
    data: str = arg(
        "", "replay directories with labelled episodes (comma-separated)", required=True
    )
    out: str = arg("", "ONNX file to write", required=True)
    tasks: str = arg("", "only these tasks ('' = all in the data, 'mt10', or names)")
    model_id: str = arg("", "model id (default: <task>-progress)")
    version: int = arg(1, "model version in the metadata")
    window: int = arg(2, "observations per window")
    hidden: int = arg(256, "MLP width")
    depth: int = arg(2, "hidden layers")
    points: str = arg("auto", "3-d points for geometric features: auto, none or a,b,...")
    steps: int = arg(3000, "optimizer steps")
    batch: int = arg(512, "windows per step")
    lr: float = arg(1e-3, "peak learning rate")
    censored_weight: float = arg(0.5, "weight of the lower-bound loss on failed episodes")
    max_steps: int = arg(500, "steps-to-go targets are capped here")
    val_fraction: float = arg(0.15, "episodes held out to pick the best weights")
    seed: int = arg(0, "data split and initialization seed")
    threads: int = arg(1, "torch CPU threads")
    overwrite: bool = arg(False, "replace an existing model file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainProgressArgs)


@clean_errors("train-progress")
def run(args: argparse.Namespace) -> int:
    a = config_from_args(TrainProgressArgs, args)
    check_out(a.out, overwrite=a.overwrite)  # before training, not after
    episodes = read_episodes(a.data, a.tasks)
    counts = describe(episodes)
    print(f"episodes: {counts}")
    cfg = ProgressConfig(
        **{
            f.name: getattr(a, f.name)
            for f in dataclasses.fields(ProgressConfig)
            if hasattr(a, f.name)
        }
    )
    trained = train_progress(episodes, cfg, instructions=instructions_for(episodes), log=print)
    result = export_progress(
        trained,
        a.out,
        model_id=a.model_id or default_model_id(episodes, "progress"),
        version=a.version,
        overwrite=a.overwrite,
        training_info={"data": a.data, "episodes": counts},
    )
    write_json(
        sidecar(a.out, ".train.json"),
        {
            "args": dataclasses.asdict(a),
            "episodes": counts,
            "report": trained.report,
            "export": result,
        },
    )
    print(
        f"wrote {result['onnx']} ({result['bytes'] / 1024:.0f} KiB): {result['tag']}, "
        f"|onnxruntime - torch| = {result['max_abs_err_vs_torch']:.1e}"
    )
    return 0
