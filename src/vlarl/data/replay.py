"""The replay format: one on-disk format for demonstrations, rollouts and recorded bags.

A replay is a directory of shards ``shard-000000.safetensors``, ``shard-000001.safetensors``, ...
Each shard holds one row per transition (N rows):

==============  =========  ===========  ====================================================
column          dtype      shape        meaning
==============  =========  ===========  ====================================================
obs             float32    [N, obs_dim] observation before the action
next_obs        float32    [N, obs_dim] observation after the action
action          float32    [N, A]       the executed command (what the robot did)
base_action     float32    [N, A]       what the base policy (or expert) asked for
residual        float32    [N, A]       the residual added on top (zeros without one)
reward          float32    [N]          reward of this transition
terminal        uint8      [N]          1 when the episode ended in a terminal state
truncated       uint8      [N]          1 when the episode was cut off (time limit, stop)
success         uint8      [N]          1 when the task was solved at next_obs
intervention    uint8      [N]          1 when a human (teleop) produced the action
episode         int64      [N]          episode id, unique within a replay directory
step            int64      [N]          step index inside the episode (0 = first action)
policy_version  int32      [N]          index into the shard's ``versions`` list
task            int32      [N]          index into the shard's ``tasks`` list
==============  =========  ===========  ====================================================

Header metadata (safetensors ``__metadata__``, all strings): ``format`` ("vlarl.replay/1"),
``tasks`` (JSON list), ``source`` (free text, e.g. "demo:metaworld-expert", "bag:run-3"),
``obs_kind`` ("state" | "image"), ``versions`` (JSON list of version tags such as "expert@0" or
"model@3+residual@7"), ``created`` (ISO-8601), ``extra`` (JSON object, free-form) and ``sha256``
(hex digest of the tensor bytes, see :func:`tensor_digest`).

Writers write atomically (a temporary file, then a link to the final name that fails if the name
exists): a shard is never overwritten and never seen half-written. Readers verify structure and
digest and raise :class:`~vlarl.data.errors.ReplayError` saying what is wrong; a directory reader
can report and skip bad shards instead (``skip_bad=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from vlarl.data.errors import ReplayError, ReplayExistsError

FORMAT = "vlarl.replay/1"
SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.safetensors$")
OBS_KINDS = ("state", "image")

# column -> (dtype, rank): rank 2 columns are per-row vectors.
COLUMNS: dict[str, tuple[np.dtype[Any], int]] = {
    "obs": (np.dtype(np.float32), 2),
    "next_obs": (np.dtype(np.float32), 2),
    "action": (np.dtype(np.float32), 2),
    "base_action": (np.dtype(np.float32), 2),
    "residual": (np.dtype(np.float32), 2),
    "reward": (np.dtype(np.float32), 1),
    "terminal": (np.dtype(np.uint8), 1),
    "truncated": (np.dtype(np.uint8), 1),
    "success": (np.dtype(np.uint8), 1),
    "intervention": (np.dtype(np.uint8), 1),
    "episode": (np.dtype(np.int64), 1),
    "step": (np.dtype(np.int64), 1),
    "policy_version": (np.dtype(np.int32), 1),
    "task": (np.dtype(np.int32), 1),
}
FLAG_COLUMNS = ("terminal", "truncated", "success", "intervention")
REQUIRED_METADATA = ("format", "tasks", "source", "obs_kind", "versions", "created", "sha256")


def shard_name(index: int) -> str:
    """File name of shard number ``index``."""
    return f"shard-{index:06d}.safetensors"


@dataclass
class Transitions:
    """A batch of transitions as columns (see the module doc for the layout)."""

    obs: np.ndarray
    next_obs: np.ndarray
    action: np.ndarray
    base_action: np.ndarray
    residual: np.ndarray
    reward: np.ndarray
    terminal: np.ndarray
    truncated: np.ndarray
    success: np.ndarray
    intervention: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    policy_version: np.ndarray
    task: np.ndarray

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.action.shape[1])

    @classmethod
    def build(
        cls,
        *,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray | None = None,
        base_action: np.ndarray | None = None,
        residual: np.ndarray | None = None,
        terminal: np.ndarray | None = None,
        truncated: np.ndarray | None = None,
        success: np.ndarray | None = None,
        intervention: np.ndarray | None = None,
        episode: np.ndarray | int = 0,
        step: np.ndarray | None = None,
        policy_version: np.ndarray | int = 0,
        task: np.ndarray | int = 0,
    ) -> Transitions:
        """Columns with defaults: base_action = action, residual = 0, flags = 0, steps 0..N-1."""
        action = np.asarray(action, dtype=np.float32)
        n = action.shape[0]

        def col(value: Any, name: str) -> np.ndarray:
            dtype, _ = COLUMNS[name]
            arr = np.asarray(value, dtype=dtype)
            return np.full(n, arr, dtype=dtype) if arr.ndim == 0 else arr

        return cls(
            obs=np.asarray(obs, dtype=np.float32),
            next_obs=np.asarray(next_obs, dtype=np.float32),
            action=action,
            base_action=action.copy() if base_action is None else col(base_action, "base_action"),
            residual=np.zeros_like(action) if residual is None else col(residual, "residual"),
            reward=col(0.0 if reward is None else reward, "reward"),
            terminal=col(0 if terminal is None else terminal, "terminal"),
            truncated=col(0 if truncated is None else truncated, "truncated"),
            success=col(0 if success is None else success, "success"),
            intervention=col(0 if intervention is None else intervention, "intervention"),
            episode=col(episode, "episode"),
            step=np.arange(n, dtype=np.int64) if step is None else col(step, "step"),
            policy_version=col(policy_version, "policy_version"),
            task=col(task, "task"),
        )

    @classmethod
    def empty(cls, *, obs_dim: int, action_dim: int) -> Transitions:
        z = np.zeros((0, action_dim), np.float32)
        o = np.zeros((0, obs_dim), np.float32)
        return cls.build(obs=o, next_obs=o.copy(), action=z)

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> array, in the order of :data:`COLUMNS`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self, *, where: str = "transitions") -> None:
        """Check dtypes, ranks and lengths; raise :class:`ReplayError` naming the first problem."""
        cols = self.columns()
        n = len(self)
        for name, (dtype, rank) in COLUMNS.items():
            arr = cols[name]
            if not isinstance(arr, np.ndarray):
                raise ReplayError(f"{where}: column {name!r} is not an array")
            if arr.dtype != dtype:
                raise ReplayError(f"{where}: column {name!r} has dtype {arr.dtype}, want {dtype}")
            if arr.ndim != rank:
                raise ReplayError(f"{where}: column {name!r} has rank {arr.ndim}, want {rank}")
            if arr.shape[0] != n:
                raise ReplayError(f"{where}: column {name!r} has {arr.shape[0]} rows, want {n}")
        if self.next_obs.shape[1] != self.obs.shape[1]:
            raise ReplayError(f"{where}: next_obs width {self.next_obs.shape[1]} != obs width")
        for name in ("base_action", "residual"):
            if cols[name].shape[1] != self.action.shape[1]:
                raise ReplayError(f"{where}: {name} width differs from action width")
        for name in ("obs", "next_obs", "action", "base_action", "residual", "reward"):
            if n and not np.isfinite(cols[name]).all():
                raise ReplayError(f"{where}: column {name!r} has non-finite values")
        for name in FLAG_COLUMNS:
            if n and cols[name].max() > 1:
                raise ReplayError(f"{where}: flag column {name!r} has values other than 0/1")

    def select(self, index: np.ndarray) -> Transitions:
        """Rows picked by a boolean mask or an index array."""
        return Transitions(**{k: v[index] for k, v in self.columns().items()})

    @classmethod
    def concatenate(cls, parts: Sequence[Transitions]) -> Transitions:
        if not parts:
            raise ValueError("nothing to concatenate")
        names = [f.name for f in fields(cls)]
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in names})

    def episodes(self) -> Iterator[tuple[int, np.ndarray]]:
        """(episode id, row indices sorted by step) for each episode, in order of first row."""
        ids, first = np.unique(self.episode, return_index=True)
        for ep in ids[np.argsort(first)]:
            rows = np.flatnonzero(self.episode == ep)
            yield int(ep), rows[np.argsort(self.step[rows], kind="stable")]


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's header says about it."""

    path: Path
    rows: int
    tasks: tuple[str, ...]
    source: str
    obs_kind: str
    versions: tuple[str, ...]
    created: str
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape, then the raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{','.join(map(str, arr.shape))}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def atomic_write_bytes(path: Path, payload: bytes, *, overwrite: bool = False) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder.

    Without ``overwrite`` the final name is created with a hard link, which fails when the name
    exists, so a concurrent writer cannot clobber it either.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ReplayExistsError(f"{path}: exists; refusing to overwrite") from None
        except OSError:  # file systems without hard links
            if path.exists():
                raise ReplayExistsError(f"{path}: exists; refusing to overwrite") from None
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_list(raw: str, key: str, where: str) -> list[str]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ReplayError(f"{where}: metadata {key!r} is not valid JSON ({exc})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReplayError(f"{where}: metadata {key!r} must be a JSON list of strings")
    return value


def write_shard(
    path: str | os.PathLike[str],
    data: Transitions,
    *,
    tasks: Sequence[str],
    source: str,
    obs_kind: str = "state",
    versions: Sequence[str] = ("unknown@0",),
    extra: Mapping[str, Any] | None = None,
) -> ShardInfo:
    """Write one shard atomically; refuses to overwrite. Returns what the header says."""
    path = Path(path)
    where = str(path)
    data.validate(where=where)
    if obs_kind not in OBS_KINDS:
        raise ReplayError(f"{where}: obs_kind must be one of {OBS_KINDS}, got {obs_kind!r}")
    if not tasks:
        raise ReplayError(f"{where}: a shard needs at least one task name")
    if len(data):
        if data.task.min() < 0 or data.task.max() >= len(tasks):
            raise ReplayError(f"{where}: task index out of range of {len(tasks)} tasks")
        if data.policy_version.min() < 0 or data.policy_version.max() >= len(versions):
            raise ReplayError(f"{where}: policy_version out of range of {len(versions)} versions")
    tensors = {k: np.ascontiguousarray(v) for k, v in data.columns().items()}
    created = datetime.now(UTC).isoformat(timespec="seconds")
    metadata = {
        "format": FORMAT,
        "tasks": json.dumps(list(tasks)),
        "source": source,
        "obs_kind": obs_kind,
        "versions": json.dumps(list(versions)),
        "created": created,
        "extra": json.dumps(dict(extra or {})),
        "sha256": tensor_digest(tensors),
    }
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))
    return ShardInfo(
        path=path,
        rows=len(data),
        tasks=tuple(tasks),
        source=source,
        obs_kind=obs_kind,
        versions=tuple(versions),
        created=created,
        sha256=metadata["sha256"],
        extra=dict(extra or {}),
    )


def header_metadata(payload: bytes, where: str) -> dict[str, str]:
    if len(payload) < 8:
        raise ReplayError(f"{where}: file is truncated ({len(payload)} bytes)")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > len(payload) - 8:
        raise ReplayError(f"{where}: file is truncated (header says {header_len} bytes)")
    try:
        header = json.loads(payload[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReplayError(f"{where}: header is not valid JSON ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ReplayError(f"{where}: no metadata in the header: not a vlarl replay shard")
    return {str(k): str(v) for k, v in meta.items()}


def read_shard(path: str | os.PathLike[str]) -> tuple[Transitions, ShardInfo]:
    """Read and verify one shard; raise :class:`ReplayError` saying what is wrong."""
    path = Path(path)
    where = str(path)
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise ReplayError(f"{where}: cannot read ({exc.strerror or exc})") from None
    meta = header_metadata(payload, where)
    if meta.get("format") != FORMAT:
        raise ReplayError(f"{where}: format {meta.get('format')!r} is not {FORMAT!r}")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ReplayError(f"{where}: metadata lacks {', '.join(missing)}")
    try:
        tensors = st_load(payload)
    except Exception as exc:  # safetensors raises its own error type for bad buffers
        raise ReplayError(
            f"{where}: not a readable safetensors file, truncated or corrupt ({exc})"
        ) from None
    unknown = sorted(set(tensors) - set(COLUMNS))
    absent = sorted(set(COLUMNS) - set(tensors))
    if absent or unknown:
        raise ReplayError(f"{where}: columns missing {absent} / unexpected {unknown}")
    digest = tensor_digest(tensors)
    if digest != meta["sha256"]:
        raise ReplayError(
            f"{where}: sha256 mismatch (header {meta['sha256'][:12]}..., "
            f"data {digest[:12]}...): the shard was modified or corrupted"
        )
    data = Transitions(**{k: tensors[k] for k in COLUMNS})
    data.validate(where=where)
    tasks = _json_list(meta["tasks"], "tasks", where)
    versions = _json_list(meta["versions"], "versions", where)
    if not tasks:
        raise ReplayError(f"{where}: metadata 'tasks' is empty")
    if meta["obs_kind"] not in OBS_KINDS:
        raise ReplayError(f"{where}: obs_kind {meta['obs_kind']!r} is not one of {OBS_KINDS}")
    if len(data):
        if data.task.min() < 0 or data.task.max() >= len(tasks):
            raise ReplayError(f"{where}: task index out of range of {len(tasks)} tasks")
        if data.policy_version.min() < 0 or data.policy_version.max() >= len(versions):
            raise ReplayError(f"{where}: policy_version out of range of {len(versions)} versions")
    try:
        extra = json.loads(meta.get("extra", "{}") or "{}")
    except json.JSONDecodeError as exc:
        raise ReplayError(f"{where}: metadata 'extra' is not valid JSON ({exc})") from None
    info = ShardInfo(
        path=path,
        rows=len(data),
        tasks=tuple(tasks),
        source=meta["source"],
        obs_kind=meta["obs_kind"],
        versions=tuple(versions),
        created=meta["created"],
        sha256=meta["sha256"],
        extra=extra if isinstance(extra, dict) else {},
    )
    return data, info


def list_shards(directory: str | os.PathLike[str]) -> list[Path]:
    """Shard files of a replay directory in index order (other files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReplayError(f"{directory}: not a replay directory (does not exist)")
    return sorted(p for p in directory.iterdir() if SHARD_PATTERN.match(p.name))


@dataclass
class Replay:
    """Transitions of one or more replay directories, with task and version names merged."""

    data: Transitions
    tasks: tuple[str, ...]
    versions: tuple[str, ...]
    obs_kind: str
    shards: list[ShardInfo]
    skipped: list[tuple[Path, str]]

    def __len__(self) -> int:
        return len(self.data)

    def task_names(self) -> np.ndarray:
        """Per-row task name."""
        return np.asarray(self.tasks, dtype=object)[self.data.task]


def load_replay(
    directories: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    skip_bad: bool = False,
    on_skip: Callable[[Path, str], None] | None = None,
    tasks: Sequence[str] | None = None,
) -> Replay:
    """Read every shard of one or more replay directories into one :class:`Replay`.

    Task and version indices are remapped into merged name lists. Episode ids are made unique
    across directories by offsetting later directories. With ``skip_bad`` a bad shard is reported
    (``on_skip(path, reason)``) and skipped instead of raising. ``tasks`` keeps only those tasks.
    """
    if isinstance(directories, (str, os.PathLike)):
        directories = [directories]
    parts: list[Transitions] = []
    infos: list[ShardInfo] = []
    skipped: list[tuple[Path, str]] = []
    all_tasks: list[str] = []
    all_versions: list[str] = []
    obs_kinds: set[str] = set()
    episode_offset = 0
    for directory in directories:
        dir_max_episode = -1
        shards = list_shards(directory)
        if not shards:
            raise ReplayError(f"{directory}: no shards (shard-*.safetensors) in this directory")
        for shard in shards:
            try:
                data, info = read_shard(shard)
            except ReplayError as exc:
                if not skip_bad:
                    raise
                skipped.append((shard, str(exc)))
                if on_skip is not None:
                    on_skip(shard, str(exc))
                continue
            task_map = np.array([_index_of(all_tasks, t) for t in info.tasks], dtype=np.int32)
            ver_map = np.array([_index_of(all_versions, v) for v in info.versions], np.int32)
            if len(data):
                data.task = task_map[data.task]
                data.policy_version = ver_map[data.policy_version]
                dir_max_episode = max(dir_max_episode, int(data.episode.max()))
                data.episode = data.episode + episode_offset
            parts.append(data)
            infos.append(info)
            obs_kinds.add(info.obs_kind)
        episode_offset += dir_max_episode + 1
    if not parts:
        raise ReplayError("no readable shards: " + "; ".join(r for _, r in skipped))
    if len(obs_kinds) > 1:
        raise ReplayError(f"shards mix observation kinds {sorted(obs_kinds)}")
    widths = {(p.obs_dim, p.action_dim) for p in parts}
    if len(widths) > 1:
        raise ReplayError(f"shards disagree on (obs_dim, action_dim): {sorted(widths)}")
    merged = Transitions.concatenate(parts)
    if tasks is not None:
        unknown = [t for t in tasks if t not in all_tasks]
        if unknown:
            raise ReplayError(f"tasks not in the replay: {unknown} (it has {all_tasks})")
        keep = np.isin(merged.task, [all_tasks.index(t) for t in tasks])
        merged = merged.select(keep)
    return Replay(
        data=merged,
        tasks=tuple(all_tasks),
        versions=tuple(all_versions),
        obs_kind=obs_kinds.pop(),
        shards=infos,
        skipped=skipped,
    )


def _index_of(names: list[str], name: str) -> int:
    if name not in names:
        names.append(name)
    return names.index(name)


class ReplayWriter:
    """Appends episodes to a replay directory, one shard per ``shard_rows`` rows (or more).

    Shards are cut at episode boundaries, so an episode never spans two shards. Shard numbers
    continue after the highest existing one, and episode ids after the highest existing id.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        source: str,
        obs_kind: str = "state",
        tasks: Sequence[str] = (),
        shard_rows: int = 50_000,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.obs_kind = obs_kind
        self.tasks: list[str] = list(tasks)
        self.versions: list[str] = []
        self.shard_rows = shard_rows
        self.extra: dict[str, Any] = dict(extra or {})
        self.written: list[ShardInfo] = []
        self._pending: list[Transitions] = []
        self._pending_rows = 0
        existing = list_shards(self.directory)
        self._next_index = 1 + max(
            (int(SHARD_PATTERN.match(p.name).group(1)) for p in existing),  # type: ignore[union-attr]
            default=-1,
        )
        self._next_episode = 0
        for path in existing:
            data, _ = read_shard(path)
            if len(data):
                self._next_episode = max(self._next_episode, int(data.episode.max()) + 1)

    def task_index(self, task: str) -> int:
        return _index_of(self.tasks, task)

    def version_index(self, tag: str) -> int:
        return _index_of(self.versions, tag)

    def add_episode(self, data: Transitions, *, task: str, version: str) -> int:
        """Append one episode (its ``episode``, ``task`` and ``policy_version`` are set here)."""
        episode = self._next_episode
        self._next_episode += 1
        n = len(data)
        data.episode = np.full(n, episode, np.int64)
        data.task = np.full(n, self.task_index(task), np.int32)
        data.policy_version = np.full(n, self.version_index(version), np.int32)
        data.validate(where=f"episode {episode}")
        self._pending.append(data)
        self._pending_rows += n
        if self._pending_rows >= self.shard_rows:
            self.flush()
        return episode

    def flush(self) -> ShardInfo | None:
        """Write what is pending as the next shard (nothing when nothing is pending)."""
        if not self._pending:
            return None
        data = Transitions.concatenate(self._pending)
        path = self.directory / shard_name(self._next_index)
        info = write_shard(
            path,
            data,
            tasks=self.tasks,
            source=self.source,
            obs_kind=self.obs_kind,
            versions=self.versions,
            extra=self.extra,
        )
        self._next_index += 1
        self._pending.clear()
        self._pending_rows = 0
        self.written.append(info)
        return info

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ReplayWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
