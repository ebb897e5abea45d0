"""What every learning verb shares: dataclass configs as command lines, run folders, metrics.

A verb's options are the fields of its config dataclass; each field is declared with
:func:`arg`, whose help text is the field's one-line doc. A run folder holds ``config.json``
(the config, the command line, versions), ``metrics.jsonl`` (one JSON object per logged step)
and ``metrics.json`` (the final summary) next to the run's checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import sys
import time
import types
import typing
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from vlarl.learning.errors import LearningError

T = TypeVar("T")


def arg(default: Any, help: str, *, required: bool = False, short: str | None = None) -> Any:
    """A config field with its one-line doc (used as the command-line help)."""
    meta = {"help": help, "required": required, "short": short}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls: type[T], help: str) -> Any:
    """A config field that is itself a config dataclass (its flags are flattened in)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "nested": True})


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One ``--field-name`` option per dataclass field (bools get ``--x/--no-x``); the fields
    of a :func:`nested` config get their own flags under their own names (names are unique
    across the nesting: argparse refuses a repeated one)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            add_config_arguments(parser, hints[f.name])
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        help_text = f.metadata.get("help", "")
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if typ is bool:
            parser.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        conv = typ if typ in (int, float, str) else str
        required = bool(f.metadata.get("required"))
        suffix = "" if required else f" (default: {default})"
        parser.add_argument(
            *names,
            dest=f.name,
            type=conv,
            default=default,
            required=required,
            help=help_text + suffix,
        )


def config_from_args(cls: Any, args: argparse.Namespace) -> Any:
    """Build the config dataclass from parsed arguments (unknown attributes are ignored)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            values[f.name] = config_from_args(hints[f.name], args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def flat_fields(cls: type[Any]) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Every leaf field of a (nested) config: name -> (field, its type)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[dataclasses.Field[Any], Any]] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            out.update(flat_fields(hints[f.name]))
        else:
            out[f.name] = (f, hints[f.name])
    return out


def flat_values(config: Any) -> dict[str, Any]:
    """Every leaf value of a (nested) config instance by field name."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("nested"):
            out.update(flat_values(value))
        else:
            out[f.name] = value
    return out


def config_differences(
    saved: Mapping[str, Any], config: Any, *, may_differ: frozenset[str] = frozenset()
) -> list[str]:
    """``name: saved -> now`` for each leaf setting of ``config`` that differs from ``saved``
    (a config as ``config.json`` stores it); settings in ``may_differ`` and settings the saved
    config does not have are not compared."""

    def leaves(doc: Mapping[str, Any], like: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(like):
            if f.metadata.get("nested"):
                inner = doc.get(f.name)
                if isinstance(inner, Mapping):
                    out.update(leaves(inner, getattr(like, f.name)))
            elif f.name in doc:
                out[f.name] = doc[f.name]
        return out

    before = leaves(saved, config)
    now = json.loads(json.dumps(flat_values(config), default=_json_default))
    return [
        f"{name}: {before[name]!r} -> {value!r}"
        for name, value in now.items()
        if name not in may_differ and name in before and before[name] != value
    ]


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    """Limit PyTorch's CPU threads (the machine is shared; 1-2 threads are plenty here)."""
    import torch

    torch.set_num_threads(max(1, threads))
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


LOCK = ".lock"


@contextlib.contextmanager
def run_folder(
    path: str | os.PathLike[str],
    *,
    overwrite: bool,
    marker: str,
    resume_marker: str | None = None,
    resume: bool = False,
) -> Iterator[Path]:
    """Create and hold the run folder for one run.

    Refuses a folder holding ``marker`` (a finished run) unless ``overwrite``, and a folder
    another run is using (it holds ``.lock`` with that run's process id; delete a stale one).
    A verb that can resume names its resume state (``resume_marker``, relative to the folder):
    then a folder holding one (an interrupted run) is refused unless ``resume`` or
    ``overwrite``, and ``resume`` needs one (and no ``marker``: a finished run has nothing to
    resume).
    """
    run_dir = Path(path)
    if resume:
        if resume_marker is None:
            raise LearningError("this verb cannot resume a run")
        if (run_dir / marker).exists():
            raise LearningError(
                f"{run_dir} holds a finished run ({marker}): nothing to resume; pass "
                "--overwrite (without --resume) to run it again, or choose another --out"
            )
        if not (run_dir / resume_marker).is_file():
            raise LearningError(
                f"{run_dir} holds no interrupted run to resume (no {resume_marker}); "
                "start it without --resume"
            )
    elif (run_dir / marker).exists() and not overwrite:
        raise LearningError(f"{run_dir / marker} exists; pass --overwrite or choose another --out")
    elif resume_marker is not None and (run_dir / resume_marker).exists() and not overwrite:
        raise LearningError(
            f"{run_dir} holds an interrupted run ({resume_marker}); pass --resume to continue "
            "it, --overwrite to start over, or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = lock.read_text().strip() if lock.is_file() else "?"
        raise LearningError(
            f"{run_dir} is in use by another run (process {owner}); if that run is gone, "
            f"delete {lock}"
        ) from None
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    try:
        yield run_dir
    finally:
        lock.unlink(missing_ok=True)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("vlarl", "torch", "numpy", "onnx", "onnxruntime", "metaworld", "mujoco"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:
            continue
    return out


def write_config(
    run_dir: Path, verb: str, config: Any, *, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``config.json``: the verb, its config, the command line and package versions
    (and ``extra``, e.g. what a resumed run started as)."""
    doc = {
        "verb": verb,
        "config": dataclasses.asdict(config),
        "argv": sys.argv,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": _versions(),
        **(extra or {}),
    }
    write_json(run_dir / "config.json", doc)
    return doc


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class MetricsLog:
    """Appends one JSON line per call to ``metrics.jsonl``; ``summary`` writes metrics.json.

    A resumed run keeps the first ``keep_bytes`` of the log (what its resume state covers; lines
    after it describe work the resumed run redoes) and counts ``time_s`` from ``elapsed_s``.
    """

    def __init__(
        self, run_dir: Path, *, keep_bytes: int | None = None, elapsed_s: float = 0.0
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "metrics.json"
        if keep_bytes is None:
            self.path.write_text("")
        else:
            with open(self.path, "ab") as fh:
                if fh.tell() < keep_bytes:
                    raise LearningError(
                        f"{self.path} is shorter ({fh.tell()} bytes) than its resume state says "
                        f"({keep_bytes})"
                    )
                fh.truncate(keep_bytes)
        self._t0 = time.perf_counter() - elapsed_s

    def size(self) -> int:
        """Bytes logged so far (what a resume state records to keep)."""
        return self.path.stat().st_size if self.path.exists() else 0

    def log(self, **values: Any) -> None:
        values = {"time_s": round(time.perf_counter() - self._t0, 3), **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(values, default=_json_default) + "\n")

    def summary(self, **values: Any) -> None:
        write_json(self.summary_path, values)
