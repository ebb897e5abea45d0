"""What the reward-model verbs share: reading episodes, task embeddings, a sidecar report."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.rewardmodels.errors import RewardModelError
from vlarl.rewardmodels.labels import Episode, load_episodes


def data_dirs(text: str) -> list[str]:
    dirs = [d.strip() for d in text.split(",") if d.strip()]
    if not dirs:
        raise RewardModelError("--data needs at least one replay directory")
    return dirs


def read_episodes(data: str, tasks: str) -> list[Episode]:
    """Episodes of the replay directories in ``data`` (comma-separated), optionally of
    ``tasks`` only ('' = all, 'mt10', or names)."""
    wanted = None
    if tasks.strip():
        from vlarl.learning.envs import parse_tasks

        wanted = parse_tasks(tasks)
    return load_episodes(data_dirs(data), tasks=wanted)


def instructions_for(episodes: list[Episode]) -> dict[str, np.ndarray] | None:
    """Instruction embeddings of the tasks when there are several (None for one task)."""
    tasks = list(dict.fromkeys(e.task for e in episodes))
    if len(tasks) < 2:
        return None
    from vlarl.learning.instructions import task_embeddings

    table = task_embeddings(tasks)
    return {t: table[i] for i, t in enumerate(tasks)}


def default_model_id(episodes: list[Episode], kind: str) -> str:
    tasks = list(dict.fromkeys(e.task for e in episodes))
    return f"{tasks[0] if len(tasks) == 1 else 'multitask'}-{kind}"


def check_out(out: str, *, overwrite: bool) -> None:
    path = Path(out)
    if path.suffix != ".onnx":
        raise RewardModelError(f"--out must end in .onnx, got {out}")
    if path.exists() and not overwrite:
        raise RewardModelError(f"{out} exists; pass --overwrite to replace it")


def sidecar(out: str | Path, suffix: str) -> Path:
    out = Path(out)
    return out.with_name(out.stem + suffix)


def summary_line(report: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in report.items() if isinstance(v, (int, float, str)))


def clean_errors(verb: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Bad input (missing/corrupt replay data or model files, bad options) -> one clear line on
    stderr and exit status 2, instead of a traceback."""

    def wrap(run: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(run)
        def inner(*args: Any, **kwargs: Any) -> int:
            from vlarl.data.errors import ReplayError
            from vlarl.learning.errors import LearningError

            try:
                return run(*args, **kwargs)
            except (RewardModelError, ReplayError, LearningError) as exc:
                print(f"vlarl {verb}: {exc}", file=sys.stderr)
                return 2

        return inner

    return wrap
