"""``vlarl export-dataset``: a replay or rosbag2 bags -> a LeRobotDataset (v3.0).

``--replay DIR[,DIR]`` exports replay directories as they are; ``--bag BAG ...`` bridges the
bags first (the same assembly as ``vlarl bridge``, into a temporary replay) and, when they
recorded the camera (``camera/image_raw``, rgb8/bgr8), adds each frame's camera view as video:
the newest image stamped at or before the frame's observation. The dataset trains vlarl's
policies again with ``--data OUT`` (see :mod:`vlarl.data.lerobot`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from bisect import bisect_right
from pathlib import Path

import numpy as np

from vlarl import topics
from vlarl.bag.bridge import BridgeConfig, bridge_bags
from vlarl.bag.errors import BagError
from vlarl.data.errors import ReplayError
from vlarl.data.lerobot import DEFAULT_FPS, load_replay_or_lerobot, write_lerobot
from vlarl.data.replay import Replay, load_replay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--replay", metavar="DIR[,DIR]", help="replay directories to export")
    source.add_argument("--bag", nargs="+", metavar="BAG", help="rosbag2 bags to export")
    parser.add_argument("--out", required=True, metavar="DIR", help="new dataset folder")
    parser.add_argument(
        "--fps",
        type=int,
        default=DEFAULT_FPS,
        help="frames per second: one frame per control step (default %(default)s)",
    )
    parser.add_argument(
        "--namespace",
        default=BridgeConfig.namespace,
        help="--bag: ROS namespace of the recorded topics (default: the root namespace)",
    )
    parser.add_argument("--no-video", action="store_true", help="--bag: leave the camera out")


def _stamp_ns(header: object) -> int:
    stamp = header.stamp  # type: ignore[attr-defined]
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _rgb(msg: object) -> np.ndarray | None:
    encoding = str(msg.encoding).lower()  # type: ignore[attr-defined]
    if encoding not in ("rgb8", "bgr8"):
        return None
    h, w, step = int(msg.height), int(msg.width), int(msg.step)  # type: ignore[attr-defined]
    raw = np.asarray(msg.data, dtype=np.uint8).reshape(h, step)[:, : w * 3]  # type: ignore[attr-defined]
    image = raw.reshape(h, w, 3)
    return image[..., ::-1].copy() if encoding == "bgr8" else image.copy()


def camera_frames(bags: list[str], replay: Replay, namespace: str) -> np.ndarray | None:
    """Per replay row, the newest camera image stamped at or before its observation (None
    when the bags recorded no usable camera images)."""
    from vlarl.bag.reader import read_decoded

    prefix = "/" + namespace.strip("/") + "/" if namespace.strip("/") else "/"
    obs_topic, cam_topic = prefix + topics.OBSERVATION, prefix + topics.CAMERA_IMAGE
    stamp_of: dict[bytes, int] = {}
    images: list[tuple[int, np.ndarray]] = []
    for bag in bags:
        for topic, _, msg in read_decoded(bag, topics={obs_topic, cam_topic}):
            if topic == obs_topic:
                key = np.asarray(msg.position, dtype=np.float32).tobytes()
                stamp_of.setdefault(key, _stamp_ns(msg.header))
            else:
                image = _rgb(msg)
                if image is not None:
                    images.append((_stamp_ns(msg.header), image))
    if not images:
        return None
    images.sort(key=lambda item: item[0])
    stamps = [s for s, _ in images]
    shape = images[0][1].shape
    out = np.zeros((len(replay.data), *shape), np.uint8)
    for row, obs in enumerate(replay.data.obs):
        stamp = stamp_of.get(np.ascontiguousarray(obs).tobytes())
        k = 0 if stamp is None else max(bisect_right(stamps, stamp) - 1, 0)
        if images[k][1].shape == shape:
            out[row] = images[k][1]
    return out


def run(args: argparse.Namespace) -> int:
    try:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ReplayError(f"{out}: exists and is not an empty folder; give a new one")
        if args.replay:
            dirs = [d.strip() for d in args.replay.split(",") if d.strip()]
            summary = write_lerobot(load_replay_or_lerobot(dirs), out, fps=args.fps)
        else:
            with tempfile.TemporaryDirectory(prefix="vlarl-export-") as tmp:
                report = bridge_bags(
                    args.bag, Path(tmp) / "replay", config=BridgeConfig(namespace=args.namespace)
                )
                if not report.transitions:
                    raise ReplayError("the bags hold no complete transition:\n" + report.summary())
                replay = load_replay(Path(tmp) / "replay")
            frames = None if args.no_video else camera_frames(args.bag, replay, args.namespace)
            summary = write_lerobot(replay, out, fps=args.fps, images=frames)
    except (ReplayError, BagError, OSError) as exc:
        print(f"vlarl export-dataset: {exc}", file=sys.stderr)
        return 2
    video = f", video {', '.join(summary.cameras)}" if summary.cameras else ", no video"
    print(
        f"export-dataset: {summary.frames} frames in {summary.episodes} episodes, "
        f"tasks {list(summary.tasks)}{video} -> {summary.root}"
    )
    return 0
