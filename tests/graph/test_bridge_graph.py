"""The bag bridge on a bag the real graph recorded (``vlarl bringup``: sim_robot, perception,
policy, safety, reward, recorder as processes over DDS): every transition checks out against
the raw messages of the bag, and batch and live ingestion agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlarl.bag import cdr
from vlarl.bag.bridge import BridgeConfig, BridgeFollower, bridge_bags
from vlarl.bag.reader import read_messages
from vlarl.data.replay import load_replay
from vlarl.graph import package_root
from vlarl.rosenv import child_env

pytestmark = pytest.mark.graph

DEFAULT_MODEL = package_root() / "models" / "pick-place-v3-student.onnx"


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="default model not built")
def test_bridge_on_a_recorded_run(tmp_path: Path, domain_id: int) -> None:
    results = tmp_path / "bringup.json"
    cmd = [
        sys.executable, "-m", "vlarl.cli", "bringup",
        "--episodes", "2", "--max-episode-steps", "150", "--domain-id", str(domain_id),
        "--bag-dir", str(tmp_path / "bags"), "--results", str(results),
        "--log-dir", str(tmp_path / "logs"), "--camera-rate", "0", "--timeout", "150",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=child_env(domain_id=domain_id), capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(results.read_text())
    bag = Path(summary["bag"])
    counted = {int(e["episode"]) for e in summary["episodes"]}

    report = bridge_bags(bag, tmp_path / "replay")
    assert report.transitions > 100 and not report.bad_splits
    replay = load_replay(tmp_path / "replay")
    data = replay.data

    # The raw messages, decoded independently of the bridge, keyed by stamp; the samples of
    # each (bag episode, step) from robot/status (the first stamp: not a reset marker).
    states: dict[int, np.ndarray] = {}
    commands: dict[int, tuple[str, np.ndarray]] = {}
    rewards: dict[int, np.ndarray] = {}
    samples: dict[tuple[int, int], int] = {}
    topics = {"/robot/task_state", "/safety/command", "/reward", "/robot/status"}
    for m in read_messages(bag, topics=topics):
        js = cdr.joint_state(m.data)
        if m.topic == "/robot/task_state":
            states.setdefault(js.stamp_ns, js.position.astype(np.float32))
        elif m.topic == "/safety/command":
            commands.setdefault(js.stamp_ns, (js.frame_id, js.position.astype(np.float32)))
        elif m.topic == "/reward":
            rewards.setdefault(js.stamp_ns, js.position)
        else:
            samples.setdefault((int(js.position[0]), int(js.position[1])), js.stamp_ns)
    bag_episode = {
        replay_ep: bag_ep
        for info in replay.shards
        for replay_ep, bag_ep in info.extra["bridge"]["episodes"]
    }

    ends = 0
    checked = 0
    for episode, rows in data.episodes():
        if bag_episode[episode] not in counted:
            # The warm-up episode: it was already running when the recorder subscribed (its
            # first messages may predate the bag) and bringup's reset cut it short; the
            # episodes bringup counts are the ones after that reset.
            continue
        checked += 1
        assert np.all(np.diff(data.step[rows]) == 1)  # consecutive steps
        assert np.array_equal(data.next_obs[rows[:-1]], data.obs[rows[1:]])  # a chain
        ends += int(data.terminal[rows[-1]] or data.truncated[rows[-1]])
        assert not (data.terminal[rows[:-1]] | data.truncated[rows[:-1]]).any()
        for i in rows:
            step = int(data.step[i])
            stamp = samples[(bag_episode[episode], step)]
            next_stamp = samples[(bag_episode[episode], step + 1)]
            assert np.array_equal(data.obs[i], states[stamp])  # observation == its state
            assert np.array_equal(data.next_obs[i], states[next_stamp])
            tag, command = commands[stamp]  # the first command answering it was executed
            assert np.array_equal(data.action[i], command)
            assert replay.versions[data.policy_version[i]] == tag
            reward = rewards[next_stamp]  # reward, success, value, terminal, truncated, ep, step
            assert data.reward[i] == np.float32(reward[0])
            assert data.terminal[i] == int(reward[3] >= 0.5)
    assert checked == len(counted) >= 2
    assert ends >= 2  # the episodes bringup ran ended with their flag
    policy = np.array([not replay.versions[v].startswith("hold:") for v in data.policy_version])
    expected = np.clip(data.base_action + data.residual, -1.0, 1.0)
    matches = np.all(np.abs(data.action - expected) < 1e-6, axis=1)
    assert matches[policy].mean() > 0.95  # the rest were rate-limited by safety

    # Live ingestion of the same (closed) bag gives the same transitions.
    with BridgeFollower(bag, tmp_path / "live", config=BridgeConfig(grace_s=0.5)) as follower:
        assert follower.poll()
    live = load_replay(tmp_path / "live").data
    assert len(live) == len(data)
    for name in ("obs", "next_obs", "action", "reward", "step", "terminal", "truncated"):
        assert np.array_equal(getattr(live, name), getattr(data, name)), name
