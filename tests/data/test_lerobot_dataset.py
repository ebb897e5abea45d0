"""LeRobotDataset export and import: replay -> LeRobot v3.0 -> replay is exact, bags with a
camera give a video, and an exported dataset trains ``train-teacher``.

Whether LeRobot's own ``LeRobotDataset`` reads the export is checked by
bench/dataset_roundtrip.py in a separate environment (LeRobot needs torch < 2.11).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bag"))
from bag_trace import TOPIC_TYPES, TS, T, make_trace, write_recorder_bag

from vlarl import topics
from vlarl.bag.bridge import bridge_bags
from vlarl.cli import main
from vlarl.data.errors import ReplayError
from vlarl.data.lerobot import read_lerobot, write_lerobot
from vlarl.data.replay import load_replay


def _bridged(tmp_path: Path, seed: int = 21) -> tuple[Path, Path]:
    trace = make_trace(seed=seed)
    bag = tmp_path / "run"
    write_recorder_bag(bag, trace.messages, split_s=0.5)
    bridge_bags(bag, tmp_path / "replay")
    return bag, tmp_path / "replay"


def _ordered(data: object) -> np.ndarray:
    return np.lexsort((data.step, data.episode))  # type: ignore[attr-defined]


def test_replay_roundtrip_is_exact(tmp_path: Path) -> None:
    _, replay_dir = _bridged(tmp_path)
    replay = load_replay(replay_dir)
    summary = write_lerobot(replay, tmp_path / "ds")
    assert summary.frames == len(replay) and summary.episodes == len(np.unique(replay.data.episode))
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == len(replay)
    assert info["features"]["observation.state"]["shape"] == [replay.data.obs_dim]
    assert info["video_path"] is None
    stats = json.loads((tmp_path / "ds" / "meta" / "stats.json").read_text())
    assert np.allclose(stats["action"]["mean"], replay.data.action.mean(axis=0), atol=1e-6)

    back = read_lerobot(tmp_path / "ds")
    a, b = replay.data.select(_ordered(replay.data)), back.data
    for column in ("obs", "next_obs", "action", "base_action", "residual", "reward"):
        assert np.array_equal(getattr(a, column), getattr(b, column)), column
    for column in ("terminal", "truncated", "success", "intervention", "step"):
        assert np.array_equal(getattr(a, column), getattr(b, column)), column
    assert [replay.tasks[i] for i in a.task] == [back.tasks[i] for i in b.task]
    assert [replay.versions[i] for i in a.policy_version] == [
        back.versions[i] for i in b.policy_version
    ]
    with pytest.raises(ReplayError, match="not empty"):
        write_lerobot(replay, tmp_path / "ds")


def _image(stamp: int, value: int) -> bytes:
    msg = T["sensor_msgs/msg/Image"](
        header=T["std_msgs/msg/Header"](
            stamp=T["builtin_interfaces/msg/Time"](
                sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000
            ),
            frame_id="camera",
        ),
        height=16,
        width=16,
        encoding="rgb8",
        is_bigendian=0,
        step=48,
        data=np.full(16 * 16 * 3, value, dtype=np.uint8),
    )
    return bytes(TS.serialize_cdr(msg, "sensor_msgs/msg/Image"))


def test_export_from_a_bag_with_camera(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = make_trace(seed=22)
    obs_stamps = sorted({n for t, n, _ in trace.messages if t == "/" + topics.OBSERVATION})
    camera = "/" + topics.CAMERA_IMAGE
    # A camera at a fifth of the control rate; pixel value = index of the image.
    shots = [(stamp, 40 + 10 * (i % 20)) for i, stamp in enumerate(obs_stamps[::5])]
    messages = sorted(
        trace.messages + [(camera, s + 100, _image(s, v)) for s, v in shots], key=lambda m: m[1]
    )
    TOPIC_TYPES[camera] = "sensor_msgs/msg/Image"
    try:
        write_recorder_bag(tmp_path / "run", messages, split_s=0.5)
    finally:
        del TOPIC_TYPES[camera]
    out = tmp_path / "ds"
    assert main(["export-dataset", "--bag", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "video observation.images.camera" in capsys.readouterr().out
    info = json.loads((out / "meta" / "info.json").read_text())
    video = out / "videos" / "observation.images.camera" / "chunk-000" / "file-000.mp4"
    assert info["features"]["observation.images.camera"]["shape"] == [16, 16, 3]
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == info["total_frames"] == len(trace.expected)
    # Each frame shows the newest image stamped at or before its observation (lossy codec).
    back = read_lerobot(out)
    by_obs = {}
    for topic, _, data in trace.messages:
        if topic == "/" + topics.OBSERVATION:
            msg = TS.deserialize_cdr(data, "sensor_msgs/msg/JointState")
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            by_obs[np.asarray(msg.position, np.float32).tobytes()] = stamp
    shot_stamps = np.array([s for s, _ in shots])
    for row, frame in enumerate(frames):
        stamp = by_obs[back.data.obs[row].tobytes()]
        want = shots[max(int(np.searchsorted(shot_stamps, stamp, side="right")) - 1, 0)][1]
        assert abs(float(frame.mean()) - want) < 4, (row, frame.mean(), want)


def test_exported_dataset_trains_the_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, replay_dir = _bridged(tmp_path, seed=23)
    out = tmp_path / "ds"
    assert main(["export-dataset", "--replay", str(replay_dir), "--out", str(out)]) == 0
    frames = json.loads((out / "meta" / "info.json").read_text())["total_frames"]
    run = tmp_path / "teacher"
    args = ["--out", str(run), "--train-steps", "5", "--chunk-length", "4", "--no-instructions"]
    net = ["--hidden", "16", "--depth", "1", "--batch-size", "16", "--log-every", "5"]
    assert main(["train-teacher", "--data", str(out), *args, *net]) == 0
    assert f"teacher: {frames} samples" in capsys.readouterr().out
    assert (run / "teacher.safetensors").exists()


def test_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    _, replay_dir = _bridged(tmp_path, seed=24)
    cases = [
        ["--replay", str(tmp_path / "nope"), "--out", str(tmp_path / "a")],
        ["--replay", str(replay_dir), "--out", str(tmp_path / "busy")],
        ["--bag", str(tmp_path / "nope"), "--out", str(tmp_path / "b")],
    ]
    for args in cases:
        assert main(["export-dataset", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlarl export-dataset: ") and err.count("\n") == 1, err


def test_a_dataset_without_vlarl_columns_imports(tmp_path: Path) -> None:
    """Only LeRobot's own columns (what another LeRobot user's dataset has)."""
    import pyarrow.parquet as pq

    _, replay_dir = _bridged(tmp_path, seed=25)
    replay = load_replay(replay_dir)
    write_lerobot(replay, tmp_path / "ds")
    data_file = tmp_path / "ds" / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data_file)
    keep = [c for c in table.column_names if not c.startswith(("vlarl.", "next.observation"))]
    pq.write_table(table.select(keep), data_file)

    back = read_lerobot(tmp_path / "ds").data
    a = replay.data.select(_ordered(replay.data))
    assert np.array_equal(back.obs, a.obs) and np.array_equal(back.action, a.action)
    assert np.array_equal(back.base_action, a.action) and not back.residual.any()
    for episode in np.unique(back.episode):
        rows = np.flatnonzero(back.episode == episode)
        assert np.array_equal(back.step[rows], np.arange(len(rows)))
        assert np.array_equal(back.next_obs[rows[:-1]], back.obs[rows[1:]])
        assert np.array_equal(back.next_obs[rows[-1]], back.obs[rows[-1]])
    done = (a.terminal | a.truncated).astype(bool)
    assert np.array_equal(back.terminal.astype(bool), done)
