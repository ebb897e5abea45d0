"""LeRobotDataset (format v3.0) out of a replay or bags, and back into a replay.

The layout written is the one LeRobot 0.4's ``LeRobotDataset`` reads from a local ``root``:

- ``meta/info.json``: ``codebase_version`` "v3.0", fps, totals, ``data_path`` /
  ``video_path`` templates and the ``features`` (dtype, shape, names; video info);
- ``meta/tasks.parquet``: one row per task, the task text as the (pandas) index, ``task_index``;
- ``meta/episodes/chunk-000/file-000.parquet``: per episode its index, tasks, length, the data
  file and the ``[dataset_from_index, dataset_to_index)`` rows in it, per camera the video file
  and ``[from_timestamp, to_timestamp)`` in it, and ``stats/<feature>/<stat>`` columns;
- ``meta/stats.json``: per feature min, max, mean, std, count and the 1/10/50/90/99 % quantiles
  (images per channel, scaled to [0, 1]);
- ``data/chunk-000/file-000.parquet``: one row per frame;
- ``videos/<camera>/chunk-000/file-000.mp4``: every episode's frames back to back (AV1,
  yuv420p, a keyframe every 2 frames, as LeRobot encodes), when the source has images.

One frame is one replay transition: ``observation.state`` = obs, ``action`` = the executed
action, ``next.observation.state`` = next_obs, ``next.reward``, ``next.done`` (terminal or
truncated), ``next.success``, and vlarl's own columns under ``vlarl.*`` (base action,
residual, terminal, truncated, intervention, policy version tag index, the replay's step:
frames are numbered 0..n-1 without the gaps of dropped transitions) so that
:func:`read_lerobot` gives back the replay it came from. A LeRobotDataset from elsewhere needs
only ``observation.state`` and ``action``; the rest defaults (next_obs: the next frame's state).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.data.errors import ReplayError
from vlarl.data.replay import Replay, Transitions, load_replay, write_shard
from vlarl.sim.layout import CONTROL_DT

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CAMERA_KEY = "observation.images.camera"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
VIDEO_CODEC = "libsvtav1"
DEFAULT_FPS = round(1.0 / CONTROL_DT)
"""Frames per second: one frame per Meta-World control step (80 Hz)."""

_INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`write_lerobot` wrote."""

    root: Path
    frames: int
    episodes: int
    tasks: tuple[str, ...]
    cameras: tuple[str, ...]


def _pa() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet
    except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
        raise ReplayError(f"writing a LeRobotDataset needs pyarrow ({exc})") from None
    return pa


def _stats(values: np.ndarray, axis: int | tuple[int, ...]) -> dict[str, Any]:
    values = values.astype(np.float64)
    out = {
        "min": np.min(values, axis=axis),
        "max": np.max(values, axis=axis),
        "mean": np.mean(values, axis=axis),
        "std": np.std(values, axis=axis),
        "count": np.array([values.shape[0]]),
    }
    for q in QUANTILES:
        out[f"q{round(q * 100):02d}"] = np.quantile(values, q, axis=axis)
    return {k: np.asarray(v).tolist() for k, v in out.items()}


def _image_stats(frames: np.ndarray) -> dict[str, Any]:
    """Per-channel statistics of [N, H, W, 3] uint8 frames, in [0, 1], shaped (3, 1, 1)."""
    chw = frames.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    flat = _stats(chw, axis=(0, 2, 3))
    return {
        k: (v if k == "count" else np.asarray(v).reshape(3, 1, 1).tolist()) for k, v in flat.items()
    }


def _write_video(path: Path, frames: np.ndarray, fps: int) -> dict[str, Any]:
    av: Any = importlib.import_module("av")
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration otherwise
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = int(frames.shape[1]), int(frames.shape[2])
    with av.open(str(path), "w") as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps, options={"g": "2", "crf": "30"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {
        "video.height": height,
        "video.width": width,
        "video.codec": "av1",
        "video.pix_fmt": "yuv420p",
        "video.is_depth_map": False,
        "video.fps": fps,
        "video.channels": 3,
        "has_audio": False,
    }


def _tasks_table(pa: Any, tasks: Sequence[str]) -> Any:
    """meta/tasks.parquet as pandas writes a frame indexed by task text (what LeRobot reads)."""
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    schema = pa.schema(
        [("task_index", pa.int64()), ("__index_level_0__", pa.string())],
        metadata={b"pandas": json.dumps(pandas_meta).encode()},
    )
    return pa.table(
        {"task_index": list(range(len(tasks))), "__index_level_0__": list(tasks)}, schema=schema
    )


def write_lerobot(
    replay: Replay,
    root: str | os.PathLike[str],
    *,
    fps: int = DEFAULT_FPS,
    images: np.ndarray | None = None,
    robot_type: str = "sawyer",
) -> ExportSummary:
    """Write ``replay`` as a LeRobotDataset v3.0 at ``root`` (which must not exist or be empty).

    ``images``: one uint8 RGB frame [N, H, W, 3] per replay row (the camera view at the row's
    observation), written as the video ``observation.images.camera``.
    """
    pa = _pa()
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ReplayError(f"{root}: exists and is not empty; give a new folder")
    if fps < 1:
        raise ReplayError(f"fps must be >= 1, got {fps}")
    data = replay.data
    if not len(data):
        raise ReplayError("the replay has no transitions to export")
    if images is not None and (images.ndim != 4 or images.shape[0] != len(data)):
        raise ReplayError(f"images must be [{len(data)}, H, W, 3], got {images.shape}")

    # Frames ordered by episode, then step; episodes renumbered 0..E-1 in order of appearance.
    order = np.lexsort((data.step, data.episode))
    data = data.select(order)
    frames_images = images[order] if images is not None else None
    episode_ids, starts, lengths = np.unique(data.episode, return_index=True, return_counts=True)
    episode_index = np.repeat(np.arange(len(episode_ids)), lengths)
    frame_index = np.concatenate([np.arange(n) for n in lengths])
    n = len(data)
    names = tuple(replay.tasks)
    used = sorted(set(data.task.tolist()))
    tasks = tuple(names[i] for i in used)
    task_index = np.searchsorted(np.array(used), data.task).astype(np.int64)
    versions = list(replay.versions)

    state_dim, action_dim = data.obs_dim, data.action_dim
    columns: dict[str, tuple[np.ndarray, str]] = {
        "observation.state": (data.obs, "float32"),
        "action": (data.action, "float32"),
        "next.observation.state": (data.next_obs, "float32"),
        "next.reward": (data.reward, "float32"),
        "next.done": ((data.terminal | data.truncated).astype(bool), "bool"),
        "next.success": (data.success.astype(bool), "bool"),
        "vlarl.base_action": (data.base_action, "float32"),
        "vlarl.residual": (data.residual, "float32"),
        "vlarl.terminal": (data.terminal.astype(bool), "bool"),
        "vlarl.truncated": (data.truncated.astype(bool), "bool"),
        "vlarl.intervention": (data.intervention.astype(bool), "bool"),
        "vlarl.policy_version": (data.policy_version.astype(np.int64), "int64"),
        "vlarl.step": (data.step.astype(np.int64), "int64"),
        "timestamp": ((frame_index / fps).astype(np.float32), "float32"),
        "frame_index": (frame_index.astype(np.int64), "int64"),
        "episode_index": (episode_index.astype(np.int64), "int64"),
        "index": (np.arange(n, dtype=np.int64), "int64"),
        "task_index": (task_index, "int64"),
    }
    vector_names = {
        "observation.state": [f"obs_{i}" for i in range(state_dim)],
        "next.observation.state": [f"obs_{i}" for i in range(state_dim)],
        "action": ["dx", "dy", "dz", "grip"][:action_dim]
        if action_dim == 4
        else [f"a_{i}" for i in range(action_dim)],
    }
    features: dict[str, Any] = {}
    arrays = {}
    for key, (values, dtype) in columns.items():
        values = np.asarray(values)
        if values.ndim == 2:
            width = int(values.shape[1])
            features[key] = {
                "dtype": dtype,
                "shape": [width],
                "names": vector_names.get(key, [f"{key}_{i}" for i in range(width)]),
            }
            flat = pa.array(values.reshape(-1).astype(dtype))
            arrays[key] = pa.FixedSizeListArray.from_arrays(flat, width)
        else:
            features[key] = {"dtype": dtype, "shape": [1], "names": None}
            arrays[key] = pa.array(values.astype(dtype))

    data_file = root / DATA_PATH.format(chunk_index=0, file_index=0)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    pa.parquet.write_table(pa.table(arrays), data_file, compression="snappy")

    cameras: tuple[str, ...] = ()
    if frames_images is not None:
        video_file = root / VIDEO_PATH.format(video_key=CAMERA_KEY, chunk_index=0, file_index=0)
        info = _write_video(video_file, frames_images, fps)
        height, width = int(frames_images.shape[1]), int(frames_images.shape[2])
        features[CAMERA_KEY] = {
            "dtype": "video",
            "shape": [height, width, 3],
            "names": ["height", "width", "channels"],
            "info": info,
        }
        cameras = (CAMERA_KEY,)

    def feature_stats(key: str, rows: slice) -> dict[str, Any]:
        if key == CAMERA_KEY:
            assert frames_images is not None
            return _image_stats(frames_images[rows])
        values = np.asarray(columns[key][0])[rows].astype(np.float64)
        return _stats(values if values.ndim == 2 else values[:, None], axis=0)

    stats_keys = [k for k in features if features[k]["dtype"] != "bool"]
    stats = {k: feature_stats(k, slice(None)) for k in stats_keys}
    episode_rows: dict[str, list[Any]] = {
        "episode_index": [],
        "tasks": [],
        "length": [],
        "data/chunk_index": [],
        "data/file_index": [],
        "dataset_from_index": [],
        "dataset_to_index": [],
        "meta/episodes/chunk_index": [],
        "meta/episodes/file_index": [],
    }
    for key in cameras:
        for field in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
            episode_rows[f"videos/{key}/{field}"] = []
    for e, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        rows = slice(start, start + length)
        episode_rows["episode_index"].append(e)
        episode_rows["tasks"].append(sorted({tasks[i] for i in task_index[rows].tolist()}))
        episode_rows["length"].append(length)
        episode_rows["data/chunk_index"].append(0)
        episode_rows["data/file_index"].append(0)
        episode_rows["dataset_from_index"].append(start)
        episode_rows["dataset_to_index"].append(start + length)
        episode_rows["meta/episodes/chunk_index"].append(0)
        episode_rows["meta/episodes/file_index"].append(0)
        for key in cameras:
            episode_rows[f"videos/{key}/chunk_index"].append(0)
            episode_rows[f"videos/{key}/file_index"].append(0)
            episode_rows[f"videos/{key}/from_timestamp"].append(start / fps)
            episode_rows[f"videos/{key}/to_timestamp"].append((start + length) / fps)
        for key in stats_keys:
            for stat, value in feature_stats(key, rows).items():
                episode_rows.setdefault(f"stats/{key}/{stat}", []).append(
                    np.asarray(value, dtype=np.float64).reshape(-1).tolist()
                )
    episodes_file = root / EPISODES_PATH
    episodes_file.parent.mkdir(parents=True, exist_ok=True)
    pa.parquet.write_table(pa.table(episode_rows), episodes_file)
    pa.parquet.write_table(_tasks_table(pa, tasks), root / TASKS_PATH)

    info_doc = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(episode_ids),
        "total_frames": n,
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{len(episode_ids)}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if cameras else None,
        "features": features,
        "vlarl": {"policy_versions": versions, "obs_kind": replay.obs_kind},
    }
    (root / INFO_PATH).write_text(json.dumps(info_doc, indent=2), encoding="utf-8")
    (root / STATS_PATH).write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return ExportSummary(root, n, len(episode_ids), tasks, cameras)


def is_lerobot_dataset(path: str | os.PathLike[str]) -> bool:
    """A folder with ``meta/info.json`` (a LeRobotDataset root)."""
    return (Path(path) / INFO_PATH).is_file()


def _read_tasks(pa: Any, path: Path) -> list[str]:
    table = pa.parquet.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}") or b"{}")
    index_cols = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
    name_col = index_cols[0] if index_cols else "task"
    if name_col not in table.column_names or "task_index" not in table.column_names:
        raise ReplayError(f"{path}: no task text / task_index columns")
    names = table.column(name_col).to_pylist()
    index = table.column("task_index").to_pylist()
    tasks = [""] * len(names)
    for name, i in zip(names, index, strict=True):
        tasks[int(i)] = str(name)
    return tasks


def read_lerobot(path: str | os.PathLike[str]) -> Replay:
    """A LeRobotDataset v3.0 (local folder) as a replay: one row per frame."""
    pa = _pa()
    root = Path(path)
    try:
        info = json.loads((root / INFO_PATH).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReplayError(f"{root}: not a LeRobotDataset ({exc})") from None
    if not str(info.get("codebase_version", "")).startswith("v3"):
        raise ReplayError(
            f"{root}: LeRobotDataset version {info.get('codebase_version')!r}; "
            "only v3.x is read (convert older ones with LeRobot's converter)"
        )
    files = sorted((root / "data").glob("*/*.parquet"))
    if not files:
        raise ReplayError(f"{root}: no data/*/*.parquet files")
    table = pa.concat_tables([pa.parquet.read_table(f) for f in files])
    needed = ("observation.state", "action", *_INDEX_COLUMNS)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ReplayError(f"{root}: frames lack {missing} (needed to train from them)")

    def col(name: str) -> np.ndarray:
        column = table.column(name).combine_chunks()
        if isinstance(column.type, (pa.FixedSizeListType, pa.ListType)):
            return np.asarray(column.values.to_numpy(zero_copy_only=False)).reshape(len(table), -1)
        return np.asarray(column.to_numpy(zero_copy_only=False))

    def optional(name: str, default: np.ndarray) -> np.ndarray:
        return col(name) if name in table.column_names else default

    episode = col("episode_index").astype(np.int64)
    order = np.lexsort((col("frame_index"), episode))
    obs = col("observation.state").astype(np.float32)[order]
    step_column = "vlarl.step" if "vlarl.step" in table.column_names else "frame_index"
    episode, step = episode[order], col(step_column).astype(np.int64)[order]
    n = len(obs)
    # next_obs: the next frame's state within the episode (the last frame keeps its own).
    last = np.r_[episode[1:] != episode[:-1], True]
    follow = np.where(last, np.arange(n), np.arange(n) + 1)
    next_obs = optional("next.observation.state", obs[follow])
    if "next.observation.state" in table.column_names:
        next_obs = next_obs.astype(np.float32)[order]
    zeros = np.zeros(n, np.uint8)

    def flag(name: str, default: np.ndarray) -> np.ndarray:
        if name not in table.column_names:
            return default
        return col(name).astype(np.uint8)[order]

    done = flag("next.done", last.astype(np.uint8))
    terminal = flag("vlarl.terminal", done)
    truncated = flag("vlarl.truncated", zeros)
    action = col("action").astype(np.float32)[order]
    base = (
        col("vlarl.base_action").astype(np.float32)[order]
        if "vlarl.base_action" in table.column_names
        else action
    )
    residual = (
        col("vlarl.residual").astype(np.float32)[order]
        if "vlarl.residual" in table.column_names
        else np.zeros_like(action)
    )
    reward = (
        col("next.reward").astype(np.float32)[order]
        if "next.reward" in table.column_names
        else np.zeros(n, np.float32)
    )
    versions = list(info.get("vlarl", {}).get("policy_versions") or [f"lerobot:{root.name}@0"])
    version = (
        col("vlarl.policy_version").astype(np.int32)[order]
        if "vlarl.policy_version" in table.column_names
        else np.zeros(n, np.int32)
    )
    tasks = _read_tasks(pa, root / TASKS_PATH)
    data = Transitions.build(
        obs=obs,
        next_obs=next_obs,
        action=action,
        base_action=base,
        residual=residual,
        reward=reward,
        terminal=terminal,
        truncated=truncated,
        success=flag("next.success", zeros),
        intervention=flag("vlarl.intervention", zeros),
        episode=episode,
        step=step,
        policy_version=version,
        task=col("task_index").astype(np.int32)[order],
    )
    return Replay(
        data=data,
        tasks=tuple(tasks),
        versions=tuple(versions),
        obs_kind="state",
        shards=[],
        skipped=[],
    )


def load_replay_or_lerobot(directories: Iterable[str | os.PathLike[str]]) -> Replay:
    """:func:`~vlarl.data.replay.load_replay` over replay directories and LeRobotDatasets alike
    (each LeRobotDataset is read into a temporary replay shard first)."""
    dirs = [Path(d) for d in directories]
    if not any(is_lerobot_dataset(d) for d in dirs):
        return load_replay(dirs)
    with tempfile.TemporaryDirectory(prefix="vlarl-lerobot-") as tmp:
        resolved: list[Path] = []
        for i, d in enumerate(dirs):
            if not is_lerobot_dataset(d):
                resolved.append(d)
                continue
            replay = read_lerobot(d)
            shard_dir = Path(tmp) / f"lerobot-{i}"
            write_shard(
                shard_dir / "shard-000000.safetensors",
                replay.data,
                tasks=replay.tasks,
                source=f"lerobot:{d.name}",
                versions=replay.versions,
            )
            resolved.append(shard_dir)
        return load_replay(resolved)
