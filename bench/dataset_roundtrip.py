"""Data out and back in: a recorded run -> LeRobotDataset -> LeRobot's own loader, vlarl's
reader and ``train-teacher``.

1. ``vlarl bringup`` runs the real node graph (lockstep, the shipped student, camera on) for a
   few episodes and records a rosbag2 bag;
2. ``vlarl export-dataset --bag`` writes a LeRobotDataset v3.0 (parquet, meta, AV1 video);
3. LeRobot's ``LeRobotDataset`` (installed in a separate venv, ``--lerobot-python``, because
   LeRobot 0.4 needs torch < 2.11; see shared FACTS) loads it and iterates every frame, camera
   included; the states and actions it returns are compared with the bridged replay;
4. vlarl's reader takes the dataset back to a replay (exact equality checked) and
   ``train-teacher`` trains a few steps on it;
5. the other direction: LeRobot writes a dataset of the same frames (its own
   ``LeRobotDataset.create``/``add_frame``/``save_episode``), vlarl's reader imports it (states
   and actions compared) and ``train-teacher`` trains on it.

Prints and saves ``bench/results/dataset_roundtrip.json`` and ``dataset_roundtrip.png``.
``loaded_by_lerobot`` is false (with the reason) when no LeRobot interpreter is given or it
fails: never assumed.

    nice -n 5 python bench/dataset_roundtrip.py --lerobot-python /work/lerobot-venv/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- LeRobot side
def lerobot_check(root: str, out: str) -> int:
    """Run under LeRobot's interpreter: load with ``LeRobotDataset``, iterate every frame,
    save states/actions/indices (npz) and a summary (json) to ``out``."""
    import numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    summary: dict[str, object] = {}
    errors = []
    dataset = None
    for backend in ("torchcodec", "pyav"):
        try:
            dataset = LeRobotDataset("local/vlarl-export", root=root, video_backend=backend)
            dataset[0]  # decodes a video frame: fails here if the backend cannot
            summary["video_backend"] = backend
            break
        except Exception as exc:  # a backend that cannot decode here: try the next
            errors.append(f"{backend}: {type(exc).__name__}: {exc}"[:300])
            dataset = None
    if dataset is None:
        summary["error"] = "; ".join(errors)
        Path(out, "summary.json").write_text(json.dumps(summary))
        return 1
    summary["backend_errors"] = errors
    start = time.perf_counter()
    states, actions, episodes, frames, cameras = [], [], [], [], []
    for i in range(len(dataset)):
        item = dataset[i]
        states.append(item["observation.state"].numpy())
        actions.append(item["action"].numpy())
        episodes.append(int(item["episode_index"]))
        frames.append(int(item["frame_index"]))
        for key in dataset.meta.camera_keys:
            cameras.append(item[key].numpy())  # [3, H, W] float in [0, 1]
    summary.update(
        lerobot_version=__import__("lerobot").__version__,
        frames=len(dataset),
        episodes=dataset.num_episodes,
        fps=dataset.fps,
        camera_keys=list(dataset.meta.camera_keys),
        camera_frames=len(cameras),
        camera_shapes=sorted({str(c.shape) for c in cameras}),
        iterate_s=round(time.perf_counter() - start, 2),
    )
    np.savez(
        Path(out, "frames.npz"),
        state=np.stack(states),
        action=np.stack(actions),
        episode=np.array(episodes),
        frame=np.array(frames),
        camera=np.stack(cameras) if cameras else np.zeros((0,)),
    )
    # The other direction: a dataset LeRobot itself writes (state + action only, no vlarl
    # columns), from the same frames, for vlarl's importer to read.
    state_dim, action_dim = len(states[0]), len(actions[0])
    created = LeRobotDataset.create(
        "local/lerobot-made",
        fps=dataset.fps,
        root=Path(out, "created"),
        features={
            "observation.state": {"dtype": "float32", "shape": (state_dim,), "names": None},
            "action": {"dtype": "float32", "shape": (action_dim,), "names": None},
        },
        use_videos=False,
    )
    for episode in sorted(set(episodes)):
        for i in (i for i, e in enumerate(episodes) if e == episode):
            created.add_frame(
                {"observation.state": states[i], "action": actions[i], "task": "lerobot task"}
            )
        created.save_episode()
    created.finalize()
    summary["created_frames"] = created.meta.total_frames
    Path(out, "summary.json").write_text(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------- vlarl side
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--camera-rate", type=float, default=10.0, help="camera frames per s")
    parser.add_argument("--lerobot-python", default="/work/lerobot-venv/bin/python")
    parser.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", 70)))
    parser.add_argument("--lerobot-check", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lerobot_check:
        return lerobot_check(*args.lerobot_check)

    import numpy as np

    from vlarl.bag.bridge import bridge_bags
    from vlarl.cli import main as vlarl
    from vlarl.data.export_cli import camera_frames
    from vlarl.data.lerobot import read_lerobot
    from vlarl.data.replay import load_replay

    _record_camera()
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="vlarl-roundtrip-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        code = vlarl(
            [
                "bringup",
                "--episodes",
                str(args.episodes),
                "--bag-dir",
                str(tmp / "bags"),
                "--results",
                str(tmp / "bringup.json"),
                "--log-dir",
                str(tmp / "logs"),
                "--domain-id",
                str(args.domain_id),
                "--camera-rate",
                str(args.camera_rate),
            ]
        )
        if code != 0:
            raise SystemExit(f"bringup failed ({code})")
        bags = sorted(p for p in (tmp / "bags").iterdir() if p.is_dir())
        result["bringup_s"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        root = tmp / "dataset"
        code = vlarl(["export-dataset", "--bag", *map(str, bags), "--out", str(root)])
        if code != 0:
            raise SystemExit(f"export-dataset failed ({code})")
        result["export_s"] = round(time.perf_counter() - t0, 2)
        info = json.loads((root / "meta" / "info.json").read_text())
        result["frames"] = info["total_frames"]
        result["episodes"] = info["total_episodes"]
        result["fps"] = info["fps"]
        result["camera_keys"] = [k for k, f in info["features"].items() if f["dtype"] == "video"]
        result["dataset_bytes"] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

        # The replay the export came from (the same bridge, ordered as the export orders it).
        bridge_bags(bags, tmp / "replay")
        replay = load_replay(tmp / "replay")
        data = replay.data.select(np.lexsort((replay.data.step, replay.data.episode)))
        replay_sorted = dataclasses.replace(replay, data=data)

        back = read_lerobot(root).data
        result["vlarl_reader_equal"] = {
            "state": bool(np.array_equal(back.obs, data.obs)),
            "next_state": bool(np.array_equal(back.next_obs, data.next_obs)),
            "action": bool(np.array_equal(back.action, data.action)),
            "reward": bool(np.array_equal(back.reward, data.reward)),
        }

        lerobot_out = tmp / "lerobot"
        lerobot_out.mkdir()
        loaded = False
        if Path(args.lerobot_python).exists():
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env["HF_HUB_OFFLINE"] = "1"
            t0 = time.perf_counter()
            check = subprocess.run(
                [
                    args.lerobot_python,
                    __file__,
                    "--lerobot-check",
                    str(root),
                    str(lerobot_out),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            result["lerobot_load_s"] = round(time.perf_counter() - t0, 1)
            summary_path = lerobot_out / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            result["lerobot"] = summary
            if check.returncode == 0 and (lerobot_out / "frames.npz").exists():
                frames = np.load(lerobot_out / "frames.npz")
                equal = {
                    "state": bool(np.array_equal(frames["state"], data.obs)),
                    "action": bool(np.array_equal(frames["action"], data.action)),
                    "every_frame": int(summary.get("frames", -1)) == len(data),
                    "camera_every_frame": int(summary.get("camera_frames", -1))
                    == len(data) * len(result["camera_keys"]),  # type: ignore[arg-type]
                }
                result["lerobot_equal"] = equal
                # Import of a dataset LeRobot wrote: the same states and actions come back.
                made = read_lerobot(lerobot_out / "created").data
                result["lerobot_made_import_equal"] = {
                    "frames": len(made) == len(data),
                    "state": bool(np.array_equal(made.obs, data.obs)),
                    "action": bool(np.array_equal(made.action, data.action)),
                }
                if len(frames["camera"]):
                    # The video is lossy (AV1): how far LeRobot's decoded frames are from the
                    # camera images the export aligned to each frame (0..255 scale).
                    sent = camera_frames([str(b) for b in bags], replay_sorted, "")
                    decoded = frames["camera"].transpose(0, 2, 3, 1) * 255.0
                    assert sent is not None
                    error = np.abs(decoded - sent.astype(np.float64))
                    result["camera_mean_abs_error"] = round(float(error.mean()), 2)
                loaded = all(equal.values())
            else:
                result["lerobot_error"] = (check.stderr or check.stdout)[-2000:]
        else:
            result["lerobot_error"] = f"no LeRobot interpreter at {args.lerobot_python}"
        result["loaded_by_lerobot"] = loaded
        result["roundtrip_equal"] = {
            "actions": bool(
                result["vlarl_reader_equal"]["action"]  # type: ignore[index]
                and result.get("lerobot_equal", {}).get("action", False)  # type: ignore[attr-defined]
            ),
            "states": bool(
                result["vlarl_reader_equal"]["state"]  # type: ignore[index]
                and result.get("lerobot_equal", {}).get("state", False)  # type: ignore[attr-defined]
            ),
        }

        t0 = time.perf_counter()
        teacher = [
            "train-teacher",
            "--data",
            str(root),
            "--out",
            str(tmp / "teacher"),
            "--train-steps",
            "200",
            "--chunk-length",
            "4",
            "--hidden",
            "64",
            "--depth",
            "2",
            "--no-instructions",
            "--log-every",
            "100",
        ]
        result["train_teacher_exit"] = vlarl(teacher)
        result["train_teacher_s"] = round(time.perf_counter() - t0, 1)
        if (lerobot_out / "created").exists():  # and from the dataset LeRobot itself wrote
            teacher[2], teacher[4] = str(lerobot_out / "created"), str(tmp / "teacher-lerobot")
            result["train_teacher_lerobot_made_exit"] = vlarl(teacher)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dataset_roundtrip.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    _plot(result)
    return 0 if result["loaded_by_lerobot"] else 1


def _record_camera() -> None:
    """Have bringup's recorder also record camera/image_raw (its ``record_images`` parameter,
    for which bringup has no flag): the bag then holds what a camera export needs."""
    import vlarl.bringup as bringup

    start_node = bringup.start_node

    def start_with_images(name: str, **kwargs: object) -> object:
        if name == "recorder":
            overrides = dict(kwargs.get("overrides") or {})  # type: ignore[call-overload]
            kwargs["overrides"] = {**overrides, "record_images": True}
        return start_node(name, **kwargs)  # type: ignore[arg-type]

    bringup.start_node = start_with_images  # type: ignore[assignment]


def _plot(result: dict[str, object]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["bringup_s", "export_s", "lerobot_load_s", "train_teacher_s"]
    values = [float(result.get(s, 0.0)) for s in stages]  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([s.removesuffix("_s") for s in stages], values)
    ax.set_xlabel("seconds")
    ax.set_title(
        f"{result['frames']} frames, {result['episodes']} episodes; "
        f"loaded by LeRobot: {result['loaded_by_lerobot']}"
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "dataset_roundtrip.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
