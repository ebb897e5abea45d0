"""``vlarl bridge BAG... --replay DIR``: rosbag2 bags -> replay shards (batch or ``--follow``).

Batch: every split of the given bags (bag directories, single .mcap/.db3 files, or folders of
bag directories) into ``DIR``, with a progress bar; prints the report (also written to
``DIR/bridge-report.json``). Running it again on the same bags adds nothing. A bag without
the control-path topics is refused (exit 2) with what is needed and what it holds.

``--follow``: poll BAG (a bag directory or the recorder's output folder) every ``--period-s``
and ingest each split as it closes, until Ctrl-C; prints the shards as they are written.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from vlarl.bag.bridge import BridgeConfig, BridgeFollower, bridge_bags
from vlarl.bag.errors import BridgeError
from vlarl.data.errors import ReplayError
from vlarl.data.replay import ShardInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bags", nargs="+", metavar="BAG", help="bag directories or files")
    parser.add_argument("--replay", required=True, metavar="DIR", help="replay directory")
    parser.add_argument("--follow", action="store_true", help="ingest splits as they close")
    parser.add_argument("--period-s", type=float, default=1.0, help="--follow: poll period")
    parser.add_argument(
        "--chunk", type=int, default=0, metavar="H", help="chunk-level transitions of H actions"
    )
    parser.add_argument("--gamma", type=float, default=0.99, help="discount inside a chunk")
    parser.add_argument("--chunk-stride", type=int, default=1, help="steps between chunk starts")
    parser.add_argument(
        "--holds", choices=("keep", "drop"), default="keep", help="safety hold steps"
    )
    parser.add_argument("--namespace", default="", help="ROS namespace of the recorded topics")
    parser.add_argument(
        "--grace-s", type=float, default=2.0, help="how late parts of a sample may arrive"
    )
    parser.add_argument(
        "--idle-finish-s",
        type=float,
        default=0.0,
        help="--follow: a bag unchanged this long counts as finished (0: when closed)",
    )
    parser.add_argument("--task", default="unknown", help="task name when the bag has none")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _config(args: argparse.Namespace) -> BridgeConfig:
    return BridgeConfig(
        chunk=args.chunk,
        gamma=args.gamma,
        chunk_stride=args.chunk_stride,
        holds=args.holds,
        namespace=args.namespace,
        grace_s=args.grace_s,
        idle_finish_s=args.idle_finish_s,
        default_task=args.task,
    )


def _batch(args: argparse.Namespace, config: BridgeConfig) -> int:
    from tqdm import tqdm

    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="bridge", unit="split", file=sys.stderr)
        bar.update(done - bar.n)

    try:
        report = bridge_bags(args.bags, args.replay, config=config, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary())
    return 0


def _follow(args: argparse.Namespace, config: BridgeConfig) -> int:
    follower = BridgeFollower(args.bags, args.replay, config=config)
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def on_shards(infos: list[ShardInfo]) -> None:
        for info in infos:
            print(f"bridge: {info.path.name}: {info.rows} transitions", flush=True)

    print(f"bridge: following {', '.join(args.bags)} into {args.replay}", flush=True)
    follower.run(stop, args.period_s, on_shards=on_shards)
    report = follower.report
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary())
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        if args.follow:
            return _follow(args, config)
        return _batch(args, config)
    except (BridgeError, ReplayError) as exc:
        print(f"vlarl bridge: {exc}", file=sys.stderr)
        return 2
