"""The bag bridge: real rosbag2 files (vlarl recorder's and stock layouts) -> replay shards.

Ground truth comes from tests/bag/bag_trace.py, which builds the messages the graph's nodes put
on the wire and, alongside, the transitions they must yield; the bridge never sees it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from bag_trace import (
    T0_NS,
    TAG_A,
    TAG_B,
    TICK_NS,
    EpisodePlan,
    RclpyCdr,
    RosbagsCdr,
    long_plan,
    make_trace,
    match_rows,
    rows_by_key,
    write_recorder_bag,
    write_stock_bag,
)

from vlarl.bag import bridge as bridge_module
from vlarl.bag.assemble import chunk_transitions
from vlarl.bag.bridge import (
    LEDGER_NAME,
    REPORT_NAME,
    BridgeConfig,
    BridgeFollower,
    BridgeReport,
    bridge_bags,
)
from vlarl.bag.errors import BridgeError
from vlarl.bag.splits import bag_layout
from vlarl.bag.writer import PARTIAL_DIR
from vlarl.data.replay import Transitions, list_shards, load_replay, read_shard, write_shard

BRIDGED = {
    "/robot/status",
    "/robot/task_state",
    "/observation",
    "/policy/action",
    "/safety/command",
    "/reward",
}


def _sent_per_topic(messages: list[tuple[str, int, bytes]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for topic, _, _ in messages:
        if topic in BRIDGED:
            counts[topic] = counts.get(topic, 0) + 1
    return counts


# --------------------------------------------------------------------------- (a) recorder bags
@pytest.mark.parametrize("serializer", [RosbagsCdr(), RclpyCdr()], ids=lambda s: s.name)
def test_recorder_bag_roundtrip(serializer: Any, tmp_path: Path) -> None:
    if serializer.name == "rclpy":
        pytest.importorskip("rclpy")
    trace = make_trace(serializer=serializer)
    bag = tmp_path / "run"
    write_recorder_bag(bag, trace.messages, split_s=0.1)
    assert len(bag_layout(bag).closed) >= 8  # episodes cross split boundaries

    report = bridge_bags(bag, tmp_path / "replay")
    replay = load_replay(tmp_path / "replay")
    match_rows(replay, trace.expected)  # every step present, every column exact
    assert len(replay) == report.transitions == len(trace.expected)
    assert report.episodes == 5
    assert report.dropped == dict(trace.dropped)
    assert report.duplicates == {
        {"status": "status", "task": "task"}.get(k, k): v for k, v in trace.duplicates.items()
    }
    assert report.messages == _sent_per_topic(trace.messages)
    assert report.splits == len(bag_layout(bag).splits) and not report.bad_splits
    assert set(replay.versions) == {TAG_A, TAG_B, "teleop", "hold:watchdog"}
    assert set(replay.tasks) == {"pick-place-v3", "push-v3"}
    assert replay.obs_kind == "state"
    on_disk = json.loads((tmp_path / "replay" / REPORT_NAME).read_text())
    assert on_disk["transitions"] == report.transitions
    assert on_disk["dropped"] == report.dropped

    # Running it again adds nothing (the ledger knows these splits).
    again = bridge_bags(bag, tmp_path / "replay")
    assert again.transitions == 0 and again.shards == [] and again.splits == 0
    assert len(load_replay(tmp_path / "replay")) == len(trace.expected)


def test_teleop_and_hold_steps(tmp_path: Path) -> None:
    trace = make_trace()
    bag = tmp_path / "run"
    write_recorder_bag(bag, trace.messages, split_s=0.2)
    bridge_bags(bag, tmp_path / "keep")
    rows = rows_by_key(load_replay(tmp_path / "keep"))
    teleop = [r for r in rows.values() if r["tag"] == "teleop"]
    holds = [r for r in rows.values() if r["tag"] == "hold:watchdog"]
    assert len(teleop) == 4 and all(r["intervention"] == 1 for r in teleop)
    assert sum(not r["base"].any() for r in teleop) == 2  # no proposal: zeros
    assert len(holds) == 2 and all(r["intervention"] == 0 for r in holds)
    assert all(not r["action"][:3].any() for r in holds)  # holds stop xyz
    assert sum(r["intervention"] for r in rows.values()) == 4

    report = bridge_bags(bag, tmp_path / "drop", config=BridgeConfig(holds="drop"))
    dropped = rows_by_key(load_replay(tmp_path / "drop"))
    assert report.dropped["hold"] == 2
    assert len(dropped) == len(rows) - 2
    assert not any(r["tag"].startswith("hold:") for r in dropped.values())


# --------------------------------------------------------------------------- (b) stock layout
def _split_ranges(bag: Path) -> dict[str, tuple[int, int]]:
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    return {
        f["path"]: (
            f["starting_time"]["nanoseconds_since_epoch"],
            f["starting_time"]["nanoseconds_since_epoch"] + f["duration"]["nanoseconds"],
        )
        for f in info["files"]
    }


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_stock_split_bag(storage: str, tmp_path: Path) -> None:
    trace = make_trace(seed=3)
    bag = tmp_path / "stock"
    files = write_stock_bag(bag, trace.messages, storage=storage, splits=4)
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["storage_identifier"] == storage and len(meta["files"]) == 4
    report = bridge_bags(bag, tmp_path / "replay")
    assert report.splits == 4 and not report.bad_splits
    match_rows(load_replay(tmp_path / "replay"), trace.expected)

    # (c) for this storage: a split overwritten with junk is reported and skipped.
    clean = files[1].read_bytes()
    files[1].write_bytes(os.urandom(len(clean)))
    report = bridge_bags(bag, tmp_path / "corrupt")
    assert [Path(b.path).name for b in report.bad_splits] == [files[1].name]
    assert report.bad_splits[0].salvaged == 0 and report.splits == 4
    mapping = match_rows(load_replay(tmp_path / "corrupt"), trace.expected, exact=False)
    lost = _split_ranges(bag)[files[1].name]
    safe = {
        key
        for key, parts in trace.parts.items()
        if max(parts) + 1_000_000 < lost[0] or min(parts) > lost[1]
    }
    assert safe and safe <= set(mapping) and len(mapping) < len(trace.expected)
    files[1].write_bytes(clean)

    # A stock recorder killed before it wrote metadata.yaml: splits found by their names.
    (bag / "metadata.yaml").unlink()
    report = bridge_bags(bag, tmp_path / "no-meta")
    assert report.splits == len(files)
    assert any("no metadata.yaml" in n for n in report.notes)
    match_rows(load_replay(tmp_path / "no-meta"), trace.expected)

    # A single storage file is a bag too (here: the first split, episodes cut at its end).
    single = bridge_bags(files[0], tmp_path / "single")
    assert single.splits == 1 and single.transitions > 0
    match_rows(load_replay(tmp_path / "single"), trace.expected, exact=False)


# --------------------------------------------------------------------------- (c) corrupt splits
def test_corrupt_and_missing_splits(tmp_path: Path) -> None:
    trace = make_trace(seed=5)
    bag = tmp_path / "run"
    write_recorder_bag(bag, trace.messages, storage="mcap", split_s=0.12)
    splits = bag_layout(bag).splits
    n = len(splits)
    assert n >= 7
    ranges = _split_ranges(bag)
    truncated, garbage, missing = splits[1], splits[n // 2], splits[n - 2]
    payload = truncated.read_bytes()
    truncated.write_bytes(payload[: len(payload) // 2])  # a copy cut short
    garbage.write_bytes(os.urandom(garbage.stat().st_size))  # a split overwritten with junk
    missing.unlink()  # listed in metadata.yaml, gone from the disk
    bad_names = {truncated.name, garbage.name, missing.name}
    lost = [ranges[s.name] for s in (truncated, garbage, missing)]
    # junk over the summary at the end: unreadable for rosbags, the data is salvaged
    damaged_end = splits[n - 3]
    payload = bytearray(damaged_end.read_bytes())
    payload[-120:] = os.urandom(120)
    damaged_end.write_bytes(bytes(payload))
    bad_names.add(damaged_end.name)

    report = bridge_bags(bag, tmp_path / "replay")
    bad = {Path(b.path).name: b for b in report.bad_splits}
    assert set(bad) == bad_names
    assert "missing" in bad[missing.name].error
    assert all(b.error for b in bad.values())
    assert bad[garbage.name].salvaged == 0
    start, end = ranges[damaged_end.name]
    in_split = sum(1 for t, log, _ in trace.messages if t in BRIDGED and start <= log <= end)
    assert bad[damaged_end.name].salvaged == in_split > 0
    assert report.splits == len(splits) - 1  # the missing one cannot be read

    replay = load_replay(tmp_path / "replay")
    mapping = match_rows(replay, trace.expected, exact=False)  # what is written is exact

    def intact(parts: list[int]) -> bool:
        lo, hi = min(parts), max(parts) + 1_000_000
        return not any(lo <= stop and begin <= hi for begin, stop in lost)

    safe = {key for key, parts in trace.parts.items() if intact(parts)}
    assert safe and safe <= set(mapping)  # everything readable is kept
    assert len(mapping) < len(trace.expected)
    assert report.dropped.get("gap", 0) + report.dropped.get("no_observation", 0) > 0


@pytest.mark.parametrize("clock", ["wall", "sim"])
def test_simulator_restart_in_one_bag(clock: str, tmp_path: Path) -> None:
    """The simulator dies mid-episode 0 and a new one counts from episode 0 again."""
    first = make_trace(seed=21, plan=[EpisodePlan(12, "timeout", "push-v3")])
    cut = T0_NS + 8 * TICK_NS + 5_000_000  # the recording of the first run ends here
    first.messages = [m for m in first.messages if m[1] < cut]
    kept = [e for e in first.expected if max(first.parts[(0, e.step)]) + 1_000_000 < cut]
    assert 0 < len(kept) < len(first.expected)
    if clock == "wall":  # stamps go on
        second = make_trace(seed=22, t0_ns=cut + 10**9)
    else:  # simulated time starts over; the log (receive) time goes on
        second = make_trace(seed=22, t0_ns=10**9, log_offset_ns=cut - 10**9 + 10**9)
    for e in second.expected:
        e.bag_episode += 100  # same episode numbers in the bag; apart in the ground truth
    bag = tmp_path / "run"
    write_recorder_bag(bag, first.messages + second.messages, split_s=0.25)
    report = bridge_bags(bag, tmp_path / "replay")
    match_rows(load_replay(tmp_path / "replay"), kept + second.expected)
    assert report.unterminated == 1  # the first run's episode 0 never ended
    assert report.orphans == 0


# --------------------------------------------------------------------------- (d) live
LIVE = BridgeConfig(grace_s=0.3, fsync=False)


def _live_run(
    tmp_path: Path,
    *,
    crash: tuple[str, int] | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
    config: BridgeConfig = LIVE,
) -> tuple[list[list[Any]], Any]:
    """Record the trace with a split writer in steps, polling a follower in between.

    ``crash = (where, n)`` kills the follower (abandons the object) at its n-th commit, at
    ``carry`` (after the carry file is written), ``shard`` (after the shard is written) or
    ``ledger`` (after the ledger is written); a new follower takes over.
    """
    trace = make_trace(seed=11, plan=long_plan())
    bag = tmp_path / "bags" / "run"
    replay = tmp_path / "replay"
    writer = write_recorder_bag(bag, [], split_s=0.2, close=False)
    polls: list[list[Any]] = []
    state = {"commits": 0, "crashed": False}

    class Killed(Exception):
        pass

    if crash is not None:
        assert monkeypatch is not None
        where, n = crash
        real_ledger = BridgeFollower._write_ledger
        real_shard = bridge_module.write_shard

        def shard(*args: Any, **kwargs: Any) -> Any:
            if where == "carry" and not state["crashed"] and state["commits"] + 1 == n:
                state["crashed"] = True
                raise Killed
            info = real_shard(*args, **kwargs)
            if where == "shard" and not state["crashed"] and state["commits"] + 1 == n:
                state["crashed"] = True
                raise Killed
            return info

        def ledger(self: BridgeFollower, data: dict[str, Any]) -> None:
            real_ledger(self, data)
            if data["seq"] > 0:
                state["commits"] += 1
            if where == "ledger" and not state["crashed"] and state["commits"] == n:
                state["crashed"] = True
                raise Killed

        monkeypatch.setattr(bridge_module, "write_shard", shard)
        monkeypatch.setattr(BridgeFollower, "_write_ledger", ledger)

    follower = BridgeFollower(tmp_path / "bags", replay, config=config)

    def poll() -> None:
        nonlocal follower
        try:
            polls.append(follower.poll())
        except Killed:
            follower.close()  # the process died: its lock on the directory went with it
            follower = BridgeFollower(tmp_path / "bags", replay, config=config)  # restart
            polls.append(follower.poll())

    msgs = trace.messages
    step = max(1, len(msgs) // 8)
    for start in range(0, len(msgs), step):
        for topic, log_ns, data in msgs[start : start + step]:
            writer.write(topic, log_ns, data)
        poll()
    writer.close()
    poll()
    poll()
    follower.close()
    return polls, trace


def test_follower_ingests_closed_splits_once(tmp_path: Path) -> None:
    trace = make_trace(seed=11, plan=long_plan())
    bag = tmp_path / "bags" / "run"
    replay = tmp_path / "replay"
    writer = write_recorder_bag(bag, [], split_s=0.2, close=False)
    follower = BridgeFollower(tmp_path / "bags", replay, config=LIVE)
    assert follower.poll() == []  # the bag has no closed split yet
    msgs = trace.messages
    cut = len(msgs) // 2
    for topic, log_ns, data in msgs[:cut]:
        writer.write(topic, log_ns, data)
    first = follower.poll()
    assert first, "closed splits with finished episodes should give shards"
    assert (bag / PARTIAL_DIR).exists()
    assert follower.poll() == []  # nothing new closed
    early = load_replay(replay)
    match_rows(early, trace.expected, exact=False)
    # only whole episodes so far: each written episode holds all its expected steps
    per_episode: dict[int, set[int]] = {}
    for e in trace.expected:
        per_episode.setdefault(e.bag_episode, set()).add(e.step)
    written = match_rows(early, trace.expected, exact=False)
    for episode in {k[0] for k in written}:
        assert {k[1] for k in written if k[0] == episode} == per_episode[episode]

    for topic, log_ns, data in msgs[cut:]:
        writer.write(topic, log_ns, data)
    writer.close()
    rest = follower.poll()
    assert rest
    assert follower.poll() == []
    replay_all = load_replay(replay)
    match_rows(replay_all, trace.expected)
    # each episode, also those cut by split boundaries, went whole into one shard
    for info in first + rest:
        data, _ = read_shard(info.path)
        for shard_episode in np.unique(data.episode):
            assert (replay_all.data.episode == shard_episode).sum() == (
                data.episode == shard_episode
            ).sum()
    report = follower.report
    assert report.transitions == len(trace.expected)
    assert report.dropped == dict(trace.dropped)

    # One writer per replay directory.
    with pytest.raises(BridgeError, match="another bridge"):
        BridgeFollower(tmp_path / "bags", replay, config=LIVE)
    follower.close()
    # A restarted follower (new object, same ledger) ingests nothing twice.
    again = BridgeFollower(tmp_path / "bags", replay, config=LIVE)
    assert again.poll() == []
    again.close()
    assert bridge_bags(tmp_path / "bags", replay, config=LIVE).transitions == 0
    assert len(load_replay(replay)) == len(trace.expected)


@pytest.mark.parametrize("crash", [("carry", 2), ("shard", 2), ("ledger", 1)])
def test_follower_killed_mid_commit_recovers(
    crash: tuple[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls, trace = _live_run(tmp_path, crash=crash, monkeypatch=monkeypatch)
    assert any(polls)
    replay = load_replay(tmp_path / "replay")
    match_rows(replay, trace.expected)  # no duplicate (asserted per key), nothing lost
    assert len(replay) == len(trace.expected)
    shards = list_shards(tmp_path / "replay")
    returned = [info.path.name for p in polls for info in p]
    assert sorted(returned) == [p.name for p in shards]  # each announced once by poll()
    ledger = json.loads((tmp_path / "replay" / LEDGER_NAME).read_text())
    carries = {p.name for p in (tmp_path / "replay").glob("bridge-carry-*")}
    referenced = {b["carry"] for b in ledger["bags"].values() if b["carry"]}
    assert carries == referenced  # stale carry files are cleaned up
    assert ledger["totals"]["transitions"] == len(trace.expected)
    assert ledger["totals"]["dropped"] == dict(trace.dropped)


def test_follower_writes_long_episodes_in_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = BridgeConfig(grace_s=0.3, fsync=False, max_open_steps=4)
    polls, trace = _live_run(tmp_path, crash=("shard", 3), monkeypatch=monkeypatch, config=config)
    replay = load_replay(tmp_path / "replay")
    match_rows(replay, trace.expected)  # one replay id per episode, nothing twice or lost
    shards_of: dict[int, set[str]] = {}
    for info in [i for p in polls for i in p]:
        data, _ = read_shard(info.path)
        for episode in np.unique(data.episode):
            shards_of.setdefault(int(episode), set()).add(info.path.name)
    assert any(len(names) > 1 for names in shards_of.values())  # continued in a later shard


def test_live_follows_a_stock_recording(tmp_path: Path) -> None:
    """Stock ``ros2 bag record``: the open split lies in the bag directory, no metadata yet."""
    trace = make_trace(seed=2)
    staged = tmp_path / "staged"
    files = write_stock_bag(staged, trace.messages, storage="mcap", splits=5)
    bag = tmp_path / "bags" / "stock"
    bag.mkdir(parents=True)
    follower = BridgeFollower(bag, tmp_path / "replay", config=LIVE)
    for k, split in enumerate(files):
        (bag / split.name).write_bytes(split.read_bytes())  # split k opens: k-1 is closed
        layout = bag_layout(bag)
        assert [p.name for p in layout.closed] == [f.name for f in files[:k]]
        assert not layout.finished
        follower.poll()
    (bag / "metadata.yaml").write_text((staged / "metadata.yaml").read_text())  # closed
    assert bag_layout(bag).finished
    follower.poll()
    match_rows(load_replay(tmp_path / "replay"), trace.expected)


def test_idle_bag_counts_as_finished(tmp_path: Path) -> None:
    trace = make_trace(seed=4)
    bag = tmp_path / "run"
    writer = write_recorder_bag(bag, trace.messages, split_s=0.1, close=False)
    follower = BridgeFollower(bag, tmp_path / "replay", config=LIVE)
    follower.poll()
    partial = len(load_replay(tmp_path / "replay"))
    assert 0 < partial < len(trace.expected)  # the last episode is still open
    follower.close()
    idle = BridgeFollower(
        bag, tmp_path / "replay", config=BridgeConfig(grace_s=0.3, fsync=False, idle_finish_s=1e-3)
    )
    idle.poll()  # a recorder that died: its open split is lost, the rest is written
    idle.close()
    replay = load_replay(tmp_path / "replay")
    assert len(replay) > partial
    match_rows(replay, trace.expected, exact=False)
    writer.close()


# --------------------------------------------------------------------------- (f) chunks
def _steps(rewards: list[float], *, end: str, episode: int, first_step: int = 0) -> Transitions:
    n = len(rewards)
    obs = np.arange(n + 1, dtype=np.float32)[:, None] + 100 * episode
    action = np.stack([np.full(2, 10 * episode + i, np.float32) for i in range(n)])
    terminal = np.zeros(n, np.uint8)
    truncated = np.zeros(n, np.uint8)
    if end == "terminal":
        terminal[-1] = 1
    elif end == "truncated":
        truncated[-1] = 1
    return Transitions.build(
        obs=obs[:-1],
        next_obs=obs[1:],
        action=action,
        reward=np.asarray(rewards, np.float32),
        terminal=terminal,
        truncated=truncated,
        episode=episode,
        step=np.arange(first_step, first_step + n),
    )


def test_chunk_transitions_rules() -> None:
    data = Transitions.concatenate(
        [
            _steps([1.0, 2.0, 3.0, 4.0, 5.0], end="terminal", episode=0),
            _steps([1.0, 1.0, 1.0, 1.0], end="truncated", episode=1),
            _steps([1.0, 1.0, 1.0], end="none", episode=2),
        ]
    )
    chunks, dropped = chunk_transitions(data, horizon=3, gamma=0.5)
    # episode 0: starts 0..4, the last two end early at the terminal step
    ep0 = chunks.select(chunks.episode == 0)
    assert ep0.step.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(
        ep0.reward, [1 + 1 + 0.75, 2 + 1.5 + 1.0, 3 + 2 + 1.25, 4 + 2.5, 5.0]
    )
    assert ep0.terminal.tolist() == [0, 0, 1, 1, 1]
    assert ep0.action.shape == (5, 6)
    assert ep0.action[3].tolist() == [3, 3, 4, 4, 4, 4]  # padded with the last action
    assert ep0.next_obs[:, 0].tolist() == [3, 4, 5, 5, 5]
    assert ep0.obs[:, 0].tolist() == [0, 1, 2, 3, 4]
    # episode 1: truncated at step 3: windows cut short by it are dropped
    ep1 = chunks.select(chunks.episode == 1)
    assert ep1.step.tolist() == [0, 1] and ep1.truncated.tolist() == [0, 1]
    # episode 2: no end recorded: windows that run off the data are dropped
    assert (chunks.episode == 2).sum() == 1
    assert dropped == {"chunk_truncated": 2, "chunk_cut": 2}
    strided, _ = chunk_transitions(data, horizon=3, gamma=0.5, stride=2)
    assert strided.select(strided.episode == 0).step.tolist() == [0, 2, 4]


def test_bridge_chunk_mode(tmp_path: Path) -> None:
    trace = make_trace(seed=7)
    bag = tmp_path / "run"
    write_recorder_bag(bag, trace.messages, split_s=0.1)
    bridge_bags(bag, tmp_path / "steps")
    report = bridge_bags(bag, tmp_path / "chunks", config=BridgeConfig(chunk=4, gamma=0.9))
    steps = load_replay(tmp_path / "steps")
    chunks = load_replay(tmp_path / "chunks")
    want, drops = chunk_transitions(steps.data, horizon=4, gamma=0.9)
    assert len(chunks) == len(want) == report.transitions > 0
    order = np.lexsort((chunks.data.step, chunks.data.episode))
    got = chunks.data.select(order)
    for name, column in want.columns().items():
        if name in ("policy_version", "task"):
            continue
        np.testing.assert_array_equal(getattr(got, name), column, err_msg=name)
    assert [chunks.versions[v] for v in got.policy_version] == [
        steps.versions[v] for v in want.policy_version
    ]
    for reason, n in drops.items():
        assert report.dropped[reason] == n
    info = chunks.shards[0]
    assert info.extra["chunk"]["horizon"] == 4
    with pytest.raises(BridgeError, match="settings"):
        bridge_bags(bag, tmp_path / "chunks")  # the directory was built with chunk=4


# --------------------------------------------------------------------------- refusals, CLI
def test_refuses_foreign_replay_and_bad_paths(tmp_path: Path) -> None:
    trace = make_trace(seed=1)
    bag = tmp_path / "run"
    write_recorder_bag(bag, trace.messages, split_s=0.5)
    foreign = tmp_path / "demos"
    obs = np.zeros((3, 4), np.float32)
    write_shard(
        foreign / "shard-000000.safetensors",
        Transitions.build(obs=obs, next_obs=obs, action=np.zeros((3, 4), np.float32)),
        tasks=["t"],
        source="demo",
    )
    with pytest.raises(BridgeError, match="did not write"):
        bridge_bags(bag, foreign)
    assert len(list_shards(foreign)) == 1
    with pytest.raises(BridgeError, match="does not exist"):
        bridge_bags(tmp_path / "nope", tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BridgeError, match="no bag"):
        bridge_bags(tmp_path / "empty", tmp_path / "r")
    # a shard in a bridge-owned directory that its ledger does not know of
    bridge_bags(bag, tmp_path / "owned")
    shard = list_shards(tmp_path / "owned")[0]
    (tmp_path / "owned" / "shard-000007.safetensors").write_bytes(shard.read_bytes())
    with pytest.raises(BridgeError, match="not accounted for"):
        BridgeFollower(bag, tmp_path / "owned")


def test_cli_bridge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlarl.cli import main

    trace = make_trace(seed=9)
    bag = tmp_path / "run"
    write_recorder_bag(bag, trace.messages, split_s=0.2)
    assert main(["bridge", str(bag), "--replay", str(tmp_path / "replay"), "--json"]) == 0
    out = capsys.readouterr().out
    report = BridgeReport.from_dict(json.loads(out))
    assert report.transitions == len(trace.expected)
    assert (tmp_path / "replay" / REPORT_NAME).exists()
    assert main(["bridge", str(bag), "--replay", str(tmp_path / "replay")]) == 0
    assert "0 transitions" in capsys.readouterr().out
    assert main(["bridge", str(tmp_path / "nope"), "--replay", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
