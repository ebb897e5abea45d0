"""The ``vlarl`` command line: one verb per stage.

Each verb lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their verb runs, so ``vlarl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vlarl.rosenv import ensure_local_discovery

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "bringup": ("vlarl.bringup", "run the whole node graph on the embedded robot and record it"),
    "topics": ("vlarl.topics_cli", "print the topic table (markdown)"),
    "bridge": ("vlarl.bag.bridge_cli", "rosbag2 bags -> replay shards (batch, or --follow live)"),
    "export-dataset": (
        "vlarl.data.export_cli",
        "a replay or rosbag2 bags -> a LeRobotDataset (v3.0: parquet, meta, video)",
    ),
    "collect": ("vlarl.learning.collect", "collect (noisy) scripted-expert demos into a replay"),
    "train-bc": ("vlarl.learning.bc", "train a plain BC policy (MLP regressor of action chunks)"),
    "train-teacher": ("vlarl.learning.teacher", "train the rectified-flow teacher (action chunks)"),
    "distill": (
        "vlarl.learning.distill",
        "consistency-distill the teacher into a one-step policy",
    ),
    "distill-back": (
        "vlarl.learning.distill_back",
        "a new base version: fine-tune the teacher on demos + RL successes, re-distill, export",
    ),
    "export": ("vlarl.learning.export", "export a checkpoint to ONNX (and TensorRT on a GPU)"),
    "evaluate": ("vlarl.learning.evaluate", "evaluate a policy in-process on Meta-World"),
    "collect-reward": (
        "vlarl.rewardmodels.episodes",
        "collect labelled noisy-expert episodes and near-misses for the reward models",
    ),
    "train-detector": ("vlarl.rewardmodels.cli_train_detector", "train the success detector"),
    "train-progress": ("vlarl.rewardmodels.cli_train_progress", "train the steps-to-go model"),
    "train-residual": (
        "vlarl.learning.train_residual",
        "residual RL (PLD + RLPD) on the base policy, in-process on Meta-World",
    ),
    "improve": (
        "vlarl.learning.improve",
        "the base improves itself: residual RL -> hybrid rollouts -> distill back -> gate",
    ),
    "eval-reward": (
        "vlarl.rewardmodels.cli_eval_reward",
        "evaluate a success detector / progress model on held-out episodes",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlarl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    args = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not args or args[0] in ("-h", "--help") or args[0] not in VERBS:
        top.parse_args(args)  # prints help or the error, exits
        return 2
    verb, rest = args[0], args[1:]
    module_name, help_text = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"vlarl {verb}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)))


if __name__ == "__main__":
    raise SystemExit(main())
