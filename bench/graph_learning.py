"""The self-improvement loop through the real graph: success rising, versions named, gated.

Runs ``vlarl bringup --learn`` (sim_robot, policy, safety, reward, recorder, bridge and learner,
each its own process, talking over DDS on loopback) on the shifted robot of
``bench/learning.py`` for ``--episodes`` episodes, then reads what the loop left on disk:

- ``bringup.json``: every episode's outcome and the residual version acting when it ended;
- the replay shards the bridge wrote from the bags: every transition's policy version tag
  (base alone, or base + residual@N) and its episode's outcome;
- the learner's last status (``achieved_utd``, ``updates_owed``) and every verdict of its
  deployment gate, read back from the bag (``learner/gate``).

Writes ``bench/results/graph_learning.json`` (success per block of episodes and per acting
version, transitions per version, any transition without a version) and
``bench/results/graph_learning.png`` (success over episodes, with the versions as they arrive).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def gate_verdicts(bag_dir: Path) -> list[dict]:
    """Every verdict the learner published on learner/gate, as the recorder bagged it."""
    from rclpy.serialization import deserialize_message
    from std_msgs.msg import String

    from vlarl.bag.reader import read_messages
    from vlarl.topics import LEARNER_GATE

    verdicts = []
    for bag in sorted(p for p in bag_dir.iterdir() if p.is_dir()):
        for m in read_messages(bag, topics=["/" + LEARNER_GATE]):
            verdicts.append(json.loads(deserialize_message(m.data, String).data))
    return verdicts


def replay_versions(replay_dir: Path) -> dict:
    """Transitions and episodes per version tag in the bridge's shards."""
    from vlarl.data.replay import list_shards, read_shard

    per_tag: dict[str, dict[str, int]] = defaultdict(
        lambda: {"transitions": 0, "episodes": 0, "successes": 0}
    )
    unnamed = 0
    shards = 0
    for path in list_shards(replay_dir):
        data, info = read_shard(path)
        shards += 1
        tags = np.asarray(info.versions, dtype=object)[data.policy_version]
        unnamed += int(sum(1 for t in tags if not t or str(t).startswith("unknown")))
        for tag in set(tags):
            per_tag[str(tag)]["transitions"] += int((tags == tag).sum())
        for _, rows in data.episodes():
            # An episode is counted under the version that took its first step.
            entry = per_tag[str(tags[rows[0]])]
            entry["episodes"] += 1
            entry["successes"] += int(data.success[rows].any())
    return {"shards": shards, "unnamed_transitions": unnamed, "per_version": dict(per_tag)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=240, help="episodes the robot runs")
    p.add_argument("--action-offset", default="0,0.2,0,0", help="the simulated robot's shift")
    p.add_argument("--max-episode-steps", type=int, default=120, help="truncation limit")
    p.add_argument("--block", type=int, default=20, help="episodes per success block")
    p.add_argument(
        "--mode",
        choices=("realtime", "lockstep"),
        default="realtime",
        help="simulator pacing: realtime (80 Hz, as a real arm; the learner keeps pace) or "
        "lockstep (as fast as the graph runs: the robot outruns the learner's updates)",
    )
    p.add_argument("--timeout", type=float, default=3000.0, help="give up after seconds")
    p.add_argument("--out", default="runs/bench-graph-learning", help="bags, replay, logs")
    p.add_argument("--results", default=str(RESULTS / "graph_learning.json"))
    args = p.parse_args()

    out = (ROOT / args.out).resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    cmd = [
        sys.executable,
        "-m",
        "vlarl.cli",
        "bringup",
        "--learn",
        "--episodes",
        str(args.episodes),
        "--action-offset",
        args.action_offset,
        "--max-episode-steps",
        str(args.max_episode_steps),
        "--mode",
        args.mode,
        "--camera-rate",
        "0",
        "--timeout",
        str(args.timeout),
        "--bag-dir",
        str(out / "bags"),
        "--log-dir",
        str(out / "logs"),
        "--replay-dir",
        str(out / "replay"),
        "--learner-checkpoint",
        str(out / "learner.safetensors"),
        "--results",
        str(out / "bringup.json"),
    ]
    print("running:", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    with open(out / "bringup.log", "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"bringup failed (exit {proc.returncode}); see {out / 'bringup.log'}")
        return 1
    bringup = json.loads((out / "bringup.json").read_text())
    episodes = bringup["episodes"]
    blocks = []
    for i in range(0, len(episodes), args.block):
        chunk = episodes[i : i + args.block]
        blocks.append(
            {
                "first_episode": i + 1,
                "episodes": len(chunk),
                "success_rate": sum(e["success"] for e in chunk) / len(chunk),
                "residuals": sorted({e["residual"] or "base" for e in chunk}),
            }
        )
    by_version: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in episodes:
        entry = by_version[e["residual"] or "base"]
        entry[0] += 1
        entry[1] += int(e["success"])
    replay = replay_versions(out / "replay")
    learner = bringup.get("learner") or {}
    verdicts = gate_verdicts(out / "bags")
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "action_offset": args.action_offset,
        "mode": args.mode,
        "episodes": len(episodes),
        "steps": bringup["steps"],
        "control_rate_hz": bringup["control_rate_hz"],
        "wall_s": round(wall, 1),
        "blocks": blocks,
        "success_by_acting_residual": {
            k: {"episodes": v[0], "success_rate": v[1] / v[0]} for k, v in by_version.items()
        },
        "replay": replay,
        "unnamed_transitions": replay["unnamed_transitions"],
        "achieved_utd": learner.get("achieved_utd"),
        "updates_owed": learner.get("updates_owed"),
        "updates_forgiven": learner.get("updates_forgiven"),
        "gate_verdicts": verdicts,
        "residual_versions_promoted": sum(bool(v.get("accepted")) for v in verdicts),
        "learner": bringup.get("learner"),
        "machine": bringup.get("machine"),
    }
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    for b in blocks:
        print(
            f"  episodes {b['first_episode']:4d}-{b['first_episode'] + b['episodes'] - 1:4d}: "
            f"success {b['success_rate']:.2f}  ({', '.join(b['residuals'])})"
        )
    print(
        f"replay: {replay['shards']} shards, "
        f"{sum(v['transitions'] for v in replay['per_version'].values())} transitions, "
        f"{replay['unnamed_transitions']} without a version; wall {wall:.0f} s"
    )
    print(
        f"learner: achieved utd {result['achieved_utd']}, updates owed {result['updates_owed']}; "
        f"gate: {len(verdicts)} verdicts, {result['residual_versions_promoted']} promoted"
    )
    plot(result, episodes, Path(args.results).with_suffix(".png"), block=args.block)
    return 0


def plot(result: dict, episodes: list[dict], path: Path, *, block: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = np.array([e["success"] for e in episodes], float)
    window = min(block, len(ok))
    rolling = np.convolve(ok, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(np.arange(window, len(ok) + 1), rolling, label=f"success, last {window} episodes")
    last = None
    for i, e in enumerate(episodes):
        tag = e["residual"] or "base"
        if tag != last and tag != "base":
            ax.axvline(i + 1, color="0.85", lw=0.8, zorder=0)
        last = tag
    ax.set_xlabel("episode (graph: sim, policy, safety, recorder, bridge, learner processes)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Self-improvement through the ROS 2 graph, offset {result['action_offset']}")
    ax.text(0.01, 0.02, "grey lines: a new residual version acting", transform=ax.transAxes)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
