"""The ``vlarl`` command line: one verb per stage.

Each verb lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their verb runs, so ``vlarl --help`` stays fast. A user error
(bad argument, a file that is missing or refused, an output that cannot be written) is one line
``vlarl <verb>: error: <reason>`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing
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


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (reason and where to look), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the input was wrong", not "vlarl has a bug"."""
    from vlarl.bag.errors import BagError
    from vlarl.contract import ContractError
    from vlarl.core.weights import WeightError
    from vlarl.data.errors import ReplayError
    from vlarl.graph import GraphArgumentError
    from vlarl.learning.errors import LearningError
    from vlarl.rewardmodels.errors import RewardModelError
    from vlarl.sim.errors import UnknownTaskError

    return (
        BagError,
        ContractError,
        GraphArgumentError,
        LearningError,
        OSError,  # a path that does not exist, is not writable, is a folder, ...
        ReplayError,
        RewardModelError,
        UnknownTaskError,
        WeightError,
    )


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vlarl", description=__doc__.splitlines()[0])
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
    parser = OneLineParser(prog=f"vlarl {verb}", description=help_text)
    module.add_arguments(parser)
    parsed = parser.parse_args(rest)
    try:
        return int(module.run(parsed))
    except KeyboardInterrupt as exc:
        # A verb may say where it stopped and how to go on (the exception's one-line text).
        detail = f" {one_line(exc)}" if str(exc).strip() else ""
        print(f"vlarl {verb}: interrupted{detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        # A failure the verb names itself (exit_code), or a user error: one line, no traceback.
        code = getattr(exc, "exit_code", None)
        if code is None and not isinstance(exc, user_error_types()):
            raise
        print(f"vlarl {verb}: error: {one_line(exc)}", file=sys.stderr)
        return int(code) if code is not None else EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
