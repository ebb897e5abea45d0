"""Crash benchmark (issue 12): SIGKILL the recorder and the learner at random moments.

Recorder: this process publishes three control-path topics with sequence numbers
(``robot/status`` and ``policy/action`` at 80 Hz, ``teleop/twist`` at 16 Hz); a real recorder
process records them (1 s splits, the default flush period) and is SIGKILLed at a random moment
2-5 s into each recording. Afterwards its closed splits are read (each must read in full: the
messages metadata.yaml counts, no error) and its open split is salvaged
(:func:`vlarl.bag.splits.read_split`). Per topic, ``lost_s`` is the time from the kill back to
the newest message of that topic on disk; what is on disk must be the messages sent, in order,
without a gap. ``max_receive_lag_s`` is the longest a message took from ``publish()`` to the
recorder's callback (its log time): on a loaded machine that delay, not the flush, dominates.

Learner: a real learner process trains on a replay folder that grows by four episodes per
round, and is SIGKILLed at a random moment 1-6 s after its first published version of the
round. Every other kill also restores the checkpoint copied before the last version was
published: the state a kill between persisting a version's blob and checkpointing it leaves
(the window of finding 7, too narrow to hit by chance). Every blob of this run's model id seen
on ``policy_weights`` is logged; ``version_reuse`` counts versions seen with more than one
distinct blob.

    python bench/crash.py [--kills 10] [--learner-kills 10] [--seed 0]

Writes bench/results/crash.json and crash.png.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.rosenv import ensure_local_discovery

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_LOST_S = 1.0
TOPIC_PERIODS_S = {"robot/status": 1 / 80, "policy/action": 1 / 80, "teleop/twist": 1 / 16}
OBS_DIM, ACT_DIM = 39, 4
MODEL_ID = f"crash-bench-{os.getpid()}"  # only this run's blobs count (the domain is shared)
STARTED: list[Any] = []  # every node process started here: none may outlive the benchmark


def start(name: str, **kwargs: Any) -> Any:
    from vlarl.graph import start_node

    node = start_node(name, **kwargs)
    STARTED.append(node)
    return node


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class Traffic:
    """Publishes the three topics from a thread; each message carries its sequence number."""

    def __init__(self, context: Any) -> None:
        from geometry_msgs.msg import TwistStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from trajectory_msgs.msg import JointTrajectory

        self.qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.node = Node("crash_bench_traffic", context=context)
        self.classes = {
            "robot/status": JointState,
            "policy/action": JointTrajectory,
            "teleop/twist": TwistStamped,
        }
        self.pubs: dict[str, Any] = {}
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.sent: dict[str, int] = {}
        self.running = threading.Event()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def begin(self, prefix: str) -> str:
        """Fresh publishers under ``prefix`` (a killed recorder's subscriptions stay matched
        until its lease runs out); the recorder's ``topics`` parameter for them."""
        for pub in self.pubs.values():
            self.node.destroy_publisher(pub)
        self.pubs = {
            t: self.node.create_publisher(c, f"{prefix}/{t}", self.qos)
            for t, c in self.classes.items()
        }
        self.sent = dict.fromkeys(self.pubs, 0)
        return ",".join(
            f"{prefix}/{t}:{c.__module__.split('.')[0]}/msg/{c.__name__}"
            for t, c in self.classes.items()
        )

    def matched(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in self.pubs.values())

    def _message(self, topic: str, seq: int) -> Any:
        msg = self.classes[topic]()
        msg.header.frame_id = str(seq)
        now = time.time_ns()  # when it was sent: the recorder's receive delay is measured
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
        return msg

    def _run(self) -> None:
        start = time.monotonic()
        tick = 0
        while not self.closing.is_set():
            if not self.running.is_set():
                time.sleep(0.01)
                start, tick = time.monotonic(), 0
                continue
            tick += 1
            for topic in ("robot/status", "policy/action"):
                self.pubs[topic].publish(self._message(topic, self.sent[topic]))
                self.sent[topic] += 1
            if tick % 5 == 0:
                topic = "teleop/twist"
                self.pubs[topic].publish(self._message(topic, self.sent[topic]))
                self.sent[topic] += 1
            time.sleep(max(0.0, start + tick / 80.0 - time.monotonic()))

    def close(self) -> None:
        self.closing.set()
        self.thread.join(timeout=2.0)
        self.executor.shutdown()
        self.node.destroy_node()


def recorder_kills(
    kills: int, rng: random.Random, context: Any, domain_id: int, work: Path
) -> dict[str, Any]:
    from rclpy.serialization import deserialize_message

    from vlarl.bag.splits import bag_layout, read_split

    traffic = Traffic(context)
    runs: list[dict[str, Any]] = []
    try:
        for k in range(kills):
            name = f"kill{k}"
            topics = traffic.begin(f"crash{os.getpid()}_{k}")
            recorder = start(
                "recorder",
                domain_id=domain_id,
                overrides={
                    "output_dir": str(work),
                    "bag_name": name,
                    "split_duration_s": 1.0,
                    "topics": topics,
                    "fsync": False,
                },
                log_dir=work / "logs" / name,
            )
            if not wait_for(traffic.matched, 60.0):
                recorder.kill()
                raise RuntimeError("recorder did not subscribe (see logs)")
            traffic.running.set()
            recording_s = rng.uniform(2.0, 5.0)
            time.sleep(recording_s)
            killed_ns = time.time_ns()
            recorder.process.kill()
            recorder.process.wait(timeout=10.0)
            traffic.running.clear()
            time.sleep(0.1)
            layout = bag_layout(work / name)
            closed_intact = True
            closed_problems: list[str] = []
            closed_messages = 0
            receive_lag = 0.0
            on_disk: dict[str, list[tuple[int, int]]] = {t: [] for t in traffic.classes}
            listed = _listed_counts(work / name)
            unlisted = 0  # complete but not yet listed: killed between the move and the listing
            for split in layout.splits:
                read = read_split(split)
                unlisted += split not in layout.closed and split not in layout.open
                if split in layout.closed:
                    closed_messages += len(read.messages)
                    if read.error is not None or listed.get(split.name) != len(read.messages):
                        closed_intact = False
                        closed_problems.append(
                            f"{split.name}: {read.error or 'read in full'}, "
                            f"{len(read.messages)} messages, metadata lists "
                            f"{listed.get(split.name)}"
                        )
                for topic, log_ns, data in read.messages:
                    key = topic.split("/", 2)[2]  # /crash<k>/<topic>
                    header = deserialize_message(data, traffic.classes[key]).header
                    on_disk[key].append((int(header.frame_id), log_ns))
                    sent_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
                    receive_lag = max(receive_lag, (log_ns - sent_ns) / 1e9)
            lost: dict[str, float] = {}
            in_order = True
            for topic, got in on_disk.items():
                seqs = [s for s, _ in got]
                in_order &= seqs == list(range(len(seqs)))
                last = max((log for _, log in got), default=0)
                lost[topic] = round((killed_ns - last) / 1e9, 4) if got else float("inf")
            run = {
                "bag": name,
                "killed_after_s": round(recording_s, 3),
                "closed_splits": len(layout.closed),
                "closed_messages": closed_messages,
                "closed_splits_intact": closed_intact,
                "closed_problems": closed_problems,
                "open_splits": len(layout.open),
                "unlisted_splits": unlisted,
                "sent": dict(traffic.sent),
                "on_disk": {t: len(v) for t, v in on_disk.items()},
                "in_order_no_gap": in_order,
                "lost_s": lost,
                "max_receive_lag_s": round(receive_lag, 4),
            }
            runs.append(run)
            print(
                f"recorder kill {k + 1}/{kills}: {len(layout.closed)} closed splits, "
                f"lost " + ", ".join(f"{t} {s:.3f} s" for t, s in lost.items()),
                flush=True,
            )
    finally:
        traffic.close()
    return {"runs": runs}


def _listed_counts(bag: Path) -> dict[str, int]:
    from vlarl.bag.metadata import load_metadata_file

    info = load_metadata_file(bag / "metadata.yaml")["rosbag2_bagfile_information"]
    return {Path(f["path"]).name: int(f["message_count"]) for f in info["files"]}


def _write_episodes(replay: Path, *, episodes: int, seed: int, tag: str) -> None:
    from vlarl.data.replay import ReplayWriter, Transitions

    data_rng = np.random.default_rng(seed)
    with ReplayWriter(replay, source="crash-bench", tasks=["pick-place-v3"]) as writer:
        for i in range(episodes):
            n = 25
            obs = data_rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
            base = data_rng.uniform(-0.5, 0.5, size=(n, ACT_DIM)).astype(np.float32)
            reward = np.zeros(n, np.float32)
            reward[-1] = float(i % 2 == 0)
            data = Transitions.build(
                obs=obs[:-1],
                next_obs=obs[1:],
                action=base,
                base_action=base,
                reward=reward,
                terminal=(reward > 0).astype(np.uint8),
                success=(reward > 0).astype(np.uint8),
            )
            writer.add_episode(data, task="pick-place-v3", version=tag)


class WeightsLog:
    """Every blob seen on policy_weights: version -> distinct sha256 digests."""

    def __init__(self, context: Any) -> None:
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from std_msgs.msg import UInt8MultiArray

        from vlarl.nodes.learner import WEIGHTS_QOS
        from vlarl.topics import POLICY_WEIGHTS

        self.node = Node("crash_bench_weights", context=context)
        self.lock = threading.Lock()
        self.blobs: dict[int, set[str]] = {}
        self.received = 0
        self.node.create_subscription(UInt8MultiArray, POLICY_WEIGHTS, self._on_blob, WEIGHTS_QOS)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        with contextlib.suppress(Exception):  # the context is shut down at the end
            self.executor.spin()

    def _on_blob(self, msg: Any) -> None:
        from vlarl.core.weights import decode_residual

        blob = bytes(msg.data)
        weights = decode_residual(blob)
        version = weights.version
        if weights.model_id != MODEL_ID:
            return
        with self.lock:
            self.blobs.setdefault(version, set()).add(hashlib.sha256(blob).hexdigest())
            self.received += 1

    def newest(self) -> int:
        with self.lock:
            return max(self.blobs, default=0)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()


def learner_kills(
    kills: int, rng: random.Random, context: Any, domain_id: int, work: Path, model: str
) -> dict[str, Any]:
    from vlarl.core.onnx_policy import OnnxPolicy
    from vlarl.learning.residual_rl import load_learner

    replay = work / "replay"
    checkpoint = work / "learner.safetensors"
    stale = work / "stale.safetensors"
    settings = {
        "base_model": model,
        "replay_dir": str(replay),
        "checkpoint": str(checkpoint),
        "model_id": MODEL_ID,
        "probe_transitions": 0,
        "warmup_ramp": 0,
        "publish_every": 20,
        "utd": 1,
        "hidden": 16,
        "critics": 2,
        "batch_size": 16,
        "gate": "none",
        "poll_period_s": 0.1,
    }
    tag = OnnxPolicy.load(model, providers="cpu").metadata.tag
    log = WeightsLog(context)
    rounds: list[dict[str, Any]] = []
    try:
        for k in range(kills):
            _write_episodes(replay, episodes=4, seed=k, tag=tag)
            before = log.newest()
            learner = start(
                "learner", domain_id=domain_id, overrides=settings, log_dir=work / "logs"
            )
            published = wait_for(lambda: log.newest() > before, 120.0)  # noqa: B023
            if checkpoint.exists():
                shutil.copyfile(checkpoint, stale)
            time.sleep(rng.uniform(1.0, 6.0))
            learner.process.kill()
            learner.process.wait(timeout=10.0)
            window = k % 2 == 1 and stale.exists()
            if window:
                shutil.copyfile(stale, checkpoint)
            checkpoint_version = load_learner(checkpoint)[1].version if checkpoint.exists() else 0
            rounds.append(
                {
                    "round": k,
                    "published_this_round": published,
                    "newest_version": log.newest(),
                    "checkpoint_version_after_kill": checkpoint_version,
                    "crash_window_restored": window,
                }
            )
            print(
                f"learner kill {k + 1}/{kills}: newest version {log.newest()}, checkpoint "
                f"{checkpoint_version}" + (" (crash window restored)" if window else ""),
                flush=True,
            )
        # one last start: the versions after the final kill must not reuse a number either
        before = log.newest()
        learner = start("learner", domain_id=domain_id, overrides=settings, log_dir=work / "logs")
        _write_episodes(replay, episodes=4, seed=kills, tag=tag)
        wait_for(lambda: log.newest() > before, 120.0)
        learner.stop(timeout=20.0)
        time.sleep(0.5)
    finally:
        log.close()
    with log.lock:
        versions = {v: len(d) for v, d in sorted(log.blobs.items())}
        received = log.received
    return {"rounds": rounds, "versions": versions, "blobs_received": received}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="recorder kills")
    parser.add_argument("--learner-kills", type=int, default=10, help="learner kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="models/pick-place-v3-student.onnx")
    parser.add_argument("--out", default=str(RESULTS / "crash.json"))
    args = parser.parse_args()
    if args.kills < 1 or args.learner_kills < 1:
        print("crash: --kills and --learner-kills must be >= 1", file=sys.stderr)
        return 2
    ensure_local_discovery()
    import rclpy
    from rclpy.context import Context

    from vlarl.graph import free_domain_id, resolve_model_path

    model = str(resolve_model_path(args.model))
    domain_id = int(os.environ.get("ROS_DOMAIN_ID") or free_domain_id())
    rng = random.Random(args.seed)
    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    work = Path(tempfile.mkdtemp(prefix="vlarl-crash-"))
    try:
        recorder = recorder_kills(args.kills, rng, context, domain_id, work / "bags")
        learner = learner_kills(args.learner_kills, rng, context, domain_id, work / "learn", model)
    finally:
        for node in STARTED:
            node.kill()
        context.try_shutdown()
    runs = recorder["runs"]
    max_lost = max(max(r["lost_s"].values()) for r in runs)
    summary = {
        "kills": len(runs),
        "max_lost_s": max_lost,
        "max_lost_s_per_topic": {t: max(r["lost_s"][t] for r in runs) for t in TOPIC_PERIODS_S},
        "goal_lost_s": GOAL_LOST_S,
        "max_receive_lag_s": max(r["max_receive_lag_s"] for r in runs),
        "closed_splits_intact": all(r["closed_splits_intact"] for r in runs),
        "in_order_no_gap": all(r["in_order_no_gap"] for r in runs),
        "closed_splits": sum(r["closed_splits"] for r in runs),
        "unlisted_splits": sum(r["unlisted_splits"] for r in runs),
        "learner_kills": len(learner["rounds"]),
        "learner_crash_window_kills": sum(r["crash_window_restored"] for r in learner["rounds"]),
        "versions_published": len(learner["versions"]),
        "version_reuse": sum(1 for n in learner["versions"].values() if n > 1),
        "recorder_runs": runs,
        "learner": learner,
        "command": "python bench/crash.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"kills {summary['kills']}, max_lost_s {max_lost:.3f} (goal <= {GOAL_LOST_S}), "
        f"closed_splits_intact {summary['closed_splits_intact']}, in order without gap "
        f"{summary['in_order_no_gap']}; learner kills {summary['learner_kills']} "
        f"({summary['learner_crash_window_kills']} in the crash window), versions "
        f"{summary['versions_published']}, version_reuse {summary['version_reuse']}"
    )
    print(f"results: {out}")
    plot(summary, out.with_suffix(".png"))
    return 0


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["recorder_runs"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(runs))
    width = 0.8 / len(TOPIC_PERIODS_S)
    for i, topic in enumerate(TOPIC_PERIODS_S):
        ax.bar(x + i * width, [r["lost_s"][topic] for r in runs], width, label=topic)
    ax.axhline(GOAL_LOST_S, color="red", linestyle="--", label="goal (1 s)")
    ax.set_xlabel("recorder SIGKILL #")
    ax.set_ylabel("lost before the kill (s)")
    ax.set_title("recorder: newest message on disk per topic")
    ax.legend(fontsize=8)
    versions = summary["learner"]["versions"]
    bx.bar([int(v) for v in versions], list(versions.values()), color="tab:green")
    bx.axhline(1, color="red", linestyle="--", label="one blob per version")
    bx.set_xlabel("learner version")
    bx.set_ylabel("distinct blobs seen")
    bx.set_title(
        f"learner: {summary['learner_kills']} SIGKILLs, version_reuse {summary['version_reuse']}"
    )
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
