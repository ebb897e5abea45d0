"""Issue 12, findings 6 and 9, without a graph: a killed writer's open split reaches disk within
its flush period, salvage keeps every intact chunk before a damage, split errors are readable,
and a YAML alias bomb in metadata.yaml is refused cheaply."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from vlarl.bag.errors import BagError, MetadataError
from vlarl.bag.metadata import load_metadata_file, parse_metadata_text
from vlarl.bag.reader import read_messages, read_metadata
from vlarl.bag.splits import bag_layout, read_split
from vlarl.bag.writer import SplitBagWriter, default_typestore

TS = default_typestore()
STRING = TS.types["std_msgs/msg/String"]


def _cdr(text: str) -> bytes:
    return bytes(TS.serialize_cdr(STRING(data=text), "std_msgs/msg/String"))


_CHILD = textwrap.dedent(
    """
    import sys, time
    from vlarl.bag.writer import SplitBagWriter, default_typestore
    ts = default_typestore()
    String = ts.types["std_msgs/msg/String"]
    writer = SplitBagWriter(sys.argv[1], max_bytes=200_000, fsync=False, flush_period_s=0.25)
    writer.add_topic("/a", "std_msgs/msg/String")
    writer.add_topic("/b", "std_msgs/msg/String")
    i = 0
    while True:  # until killed
        topic = "/a" if i % 3 else "/b"
        data = bytes(ts.serialize_cdr(String(data=f"m{i}" + "x" * 200), "std_msgs/msg/String"))
        writer.write(topic, time.time_ns(), data)
        if i == 0:
            print("writing", flush=True)
        i += 1
        time.sleep(0.001)
    """
)


def test_sigkill_loses_at_most_the_flush_period_of_the_open_split(tmp_path: Path) -> None:
    bag = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(bag)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
        time.sleep(2.0)
        killed_ns = time.time_ns()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    layout = bag_layout(bag)
    assert layout.closed and len(layout.open) == 1
    assert any("not closed" in note for note in layout.notes)
    closed = [m for p in layout.closed for m in read_split(p).messages]
    opened = read_split(layout.open[0])
    assert opened.error is not None and opened.salvaged > 0
    messages = closed + opened.messages
    texts = [TS.deserialize_cdr(data, "std_msgs/msg/String").data for _, _, data in messages]
    assert texts == [f"m{i}" + "x" * 200 for i in range(len(texts))]  # no gap, nothing torn
    for topic in ("/a", "/b"):
        last = max(log for t, log, _ in messages if t == topic)
        assert (killed_ns - last) / 1e9 < 1.0  # the promise; flush period 0.25 s (+ load)
    # the bag's listed part still reads as a bag; the bridge names the unclosed bag
    assert sum(1 for _ in read_messages(bag)) == read_metadata(bag)["message_count"]
    assert "open split" in str(opened.error)  # how the bridge reports it (bad_splits)


def _bag_with_chunks(path: Path, chunks: int, per_chunk: int) -> list[str]:
    texts = []
    with SplitBagWriter(path, fsync=False, flush_period_s=0) as writer:
        writer.add_topic("/a", "std_msgs/msg/String")
        for c in range(chunks):
            for k in range(per_chunk):
                text = f"c{c}k{k}" + "y" * 300
                writer.write("/a", 1_000_000_000 + len(texts), _cdr(text))
                texts.append(text)
            writer.flush()
    return texts


def _chunk_offsets(path: Path) -> list[int]:
    from mcap.records import Chunk
    from mcap.stream_reader import StreamReader

    offsets = []
    with open(path, "rb") as handle:
        reader = StreamReader(handle, emit_chunks=True)
        for record in reader.records:
            if isinstance(record, Chunk):
                offsets.append(handle.tell())  # just past the chunk
    return offsets


def test_salvage_keeps_every_intact_chunk_before_a_damage(tmp_path: Path) -> None:
    texts = _bag_with_chunks(tmp_path / "bag", chunks=6, per_chunk=40)
    split = next((tmp_path / "bag").glob("*.mcap"))
    ends = _chunk_offsets(split)
    assert len(ends) >= 6
    payload = bytearray(split.read_bytes())
    # one flipped byte inside the 4th message chunk (the first chunk holds schema + channel)
    target = (ends[3] + ends[4]) // 2
    payload[target] ^= 0xFF
    split.write_bytes(bytes(payload))
    read = read_split(split)
    assert read.error is not None
    got = [TS.deserialize_cdr(d, "std_msgs/msg/String").data for _, _, d in read.messages]
    assert got[: 3 * 40] == texts[: 3 * 40]  # every chunk before the damage
    assert read.salvaged >= 3 * 40


@pytest.mark.parametrize("where", ["length", "garbage", "empty"])
def test_bad_split_errors_are_readable(tmp_path: Path, where: str) -> None:
    _bag_with_chunks(tmp_path / "bag", chunks=2, per_chunk=5)
    split = next((tmp_path / "bag").glob("*.mcap"))
    payload = bytearray(split.read_bytes())
    if where == "length":  # the first record's length field: 2**64 - 1
        payload[9:17] = b"\xff" * 8
    elif where == "garbage":
        payload = bytearray(os.urandom(len(payload)))
    else:
        payload = bytearray()
    split.write_bytes(bytes(payload))
    read = read_split(split)
    assert read.error
    assert "Overflow" not in read.error and "int too large" not in read.error
    assert read.error.startswith(("damaged", "empty"))


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    previous = "a"
    for name in "bcdefghijklm"[: levels - 1]:
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
        previous = name
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_in_metadata_is_refused_cheaply(tmp_path: Path) -> None:
    bomb = _alias_bomb()
    assert len(bomb) < 1024
    bag = tmp_path / "bag"
    _bag_with_chunks(bag, chunks=1, per_chunk=3)
    (bag / "metadata.yaml").write_text(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(MetadataError, match="aliases"):
            load_metadata_file(bag / "metadata.yaml")
        with pytest.raises(BagError, match="aliases"):
            list(read_messages(bag))  # refused before rosbags' own YAML loader sees it
        layout = bag_layout(bag)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000
    assert any("aliases" in note for note in layout.notes)


def test_metadata_size_and_node_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlarl.bag.metadata as metadata

    monkeypatch.setattr(metadata, "MAX_METADATA_BYTES", 1000)
    big = tmp_path / "metadata.yaml"
    big.write_text("a: [" + ",".join(["1"] * 600) + "]\n")
    with pytest.raises(MetadataError, match="larger than"):
        load_metadata_file(big)
    monkeypatch.setattr(metadata, "MAX_METADATA_EVENTS", 100)
    with pytest.raises(MetadataError, match="YAML nodes"):
        parse_metadata_text("a: [" + ",".join(["1"] * 200) + "]\n")
    assert parse_metadata_text("a: [1, 2]\n") == {"a": [1, 2]}


def test_live_bridge_notes_the_open_split_it_skips(tmp_path: Path) -> None:
    from vlarl.bag.bridge import BridgeConfig, BridgeFollower

    bag = tmp_path / "bags" / "live"
    writer = SplitBagWriter(bag, fsync=False, max_bytes=3_000)
    writer.add_topic("/a", "std_msgs/msg/String")
    for i in range(40):
        writer.write("/a", 1_000_000_000 + i, _cdr(f"m{i}" + "z" * 100))
    writer.flush()
    follower = BridgeFollower(tmp_path / "bags", tmp_path / "replay",
                              config=BridgeConfig(grace_s=0.3, fsync=False))  # fmt: skip
    follower.poll()
    notes = follower.last_report.notes
    assert any("not closed" in n for n in notes), notes
    assert any("open split skipped" in n for n in notes), notes
    writer.close()
