"""rosbag2's stock layouts through the reader and the bridge: file- and message-compressed
(zstd) bags, sqlite3 and mcap, ``pkg/Type`` names, metadata whose QoS disagrees with the storage
or is written as integers, namespaced recordings and bags of another stack's topics.

The bags are written by rosbags' own Writer in the layout ``ros2 bag record`` leaves (see
bag_trace.write_stock_bag); ground truth comes from bag_trace.make_trace.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
import zstandard
from bag_trace import make_trace, match_rows, write_stock_bag
from rosbags.highlevel import AnyReader
from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)

from vlarl.bag.bridge import BridgeConfig, BridgeFollower, bridge_bags
from vlarl.bag.errors import BagError, BridgeError, MetadataError
from vlarl.bag.metadata import check_metadata, qos_to_yaml
from vlarl.bag.reader import read_decoded, read_messages, read_metadata, topic_counts, topic_types
from vlarl.bag.splits import bag_layout
from vlarl.bag.writer import default_typestore
from vlarl.data.replay import load_replay

_NONE = QosTime(0, 0)
RELIABLE_QOS = Qos(
    QosHistory.KEEP_LAST,
    10,
    QosReliability.RELIABLE,
    QosDurability.VOLATILE,
    _NONE,
    _NONE,
    QosLiveliness.AUTOMATIC,
    _NONE,
    False,
)


def _meta(bag: Path) -> dict[str, Any]:
    return yaml.safe_load((bag / "metadata.yaml").read_text())


def _rewrite_qos(bag: Path, change: dict[str, Any]) -> None:
    """Give every topic in metadata.yaml one QoS profile (the storage files record none)."""
    doc = _meta(bag)
    for topic in doc["rosbag2_bagfile_information"]["topics_with_message_count"]:
        profile = qos_to_yaml(RELIABLE_QOS)
        profile.update(change)
        topic["topic_metadata"]["offered_qos_profiles"] = [profile]
    (bag / "metadata.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.parametrize(
    ("storage", "compression", "short_types"),
    [
        ("mcap", "file", False),
        ("sqlite3", "file", True),
        ("mcap", "message", True),
        ("sqlite3", "message", False),
    ],
)
def test_compressed_stock_bags(
    storage: str, compression: str, short_types: bool, tmp_path: Path
) -> None:
    trace = make_trace(seed=11)
    bag = tmp_path / "stock"
    files = write_stock_bag(
        bag,
        trace.messages,
        storage=storage,
        splits=3,
        compression=compression,
        short_types=short_types,
    )
    info = read_metadata(bag)  # rosbag2's rules accept what rosbag2 writes
    assert info["compression_mode"] == compression and info["compression_format"] == "zstd"
    if compression == "file":
        assert all(f.name.endswith(".zstd") for f in files)
        assert info["relative_file_paths"] == [f.name for f in files]
    if short_types:
        types = {t["topic_metadata"]["type"] for t in info["topics_with_message_count"]}
        assert "sensor_msgs/JointState" in types

    assert bag_layout(bag).splits == files and not bag_layout(bag).missing
    sent = sorted((t, n, d) for t, n, d in trace.messages)
    got = sorted((m.topic, m.log_time_ns, m.data) for m in read_messages(bag))
    assert got == sent  # every message back, decompressed, byte for byte
    assert topic_types(bag)["/observation"] == "sensor_msgs/msg/JointState"
    decoded = [m for _, _, m in read_decoded(bag, topics={"/observation"})]
    assert decoded and all(len(m.position) == 39 for m in decoded)

    report = bridge_bags(bag, tmp_path / "replay")
    assert report.splits == 3 and not report.bad_splits and not report.malformed
    assert not report.notes
    match_rows(load_replay(tmp_path / "replay"), trace.expected)


def test_a_split_being_compressed_is_read_once(tmp_path: Path) -> None:
    """While rosbag2 compresses a closed split both ``x.mcap`` and ``x.mcap.zstd`` exist."""
    trace = make_trace(seed=12)
    bag = tmp_path / "stock"
    files = write_stock_bag(bag, trace.messages, storage="mcap", splits=2, compression="file")
    plain = bag / files[1].name.removesuffix(".zstd")
    with open(files[1], "rb") as src, open(plain, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    layout = bag_layout(bag)
    assert layout.splits == [files[0], plain] and layout.finished
    report = bridge_bags(bag, tmp_path / "replay")
    assert report.splits == 2
    match_rows(load_replay(tmp_path / "replay"), trace.expected)
    plain.unlink()  # compression done: the same split, not a new one
    again = bridge_bags(bag, tmp_path / "replay")
    assert again.splits == 0 and again.transitions == 0


def test_metadata_qos_disagreeing_with_storage_and_integer_qos(tmp_path: Path) -> None:
    trace = make_trace(seed=13)
    bag = tmp_path / "stock"
    write_stock_bag(bag, trace.messages, storage="mcap", splits=2)
    _rewrite_qos(bag, {"reliability": "best_effort", "durability": "transient_local"})
    # rosbags matches metadata and storage connections by QoS: the folder reads as empty ...
    with AnyReader([bag], default_typestore=default_typestore()) as reader:
        assert sum(1 for _ in reader.messages()) == 0
    # ... while each split read on its own has every message.
    assert sum(topic_counts(bag).values()) == len(trace.messages)
    bridge_bags(bag, tmp_path / "replay")
    match_rows(load_replay(tmp_path / "replay"), trace.expected)

    # QoS policies as rmw enum integers: rosbag2 reads them, so does check_metadata.
    _rewrite_qos(bag, {"history": 1, "reliability": 1, "durability": 2, "liveliness": 1})
    read_metadata(bag)
    assert sum(1 for _ in read_messages(bag)) == len(trace.messages)
    doc = _meta(bag)
    profile = doc["rosbag2_bagfile_information"]["topics_with_message_count"][0]
    profile["topic_metadata"]["offered_qos_profiles"][0]["reliability"] = 9
    with pytest.raises(MetadataError, match="reliability"):
        check_metadata(doc)


def test_namespaced_recording_bridged_without_then_with_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlarl.cli import main

    trace = make_trace(seed=14)
    bag = tmp_path / "stock"
    write_stock_bag(bag, trace.messages, storage="sqlite3", splits=2, namespace="robot1")
    replay = tmp_path / "replay"
    code = main(["bridge", str(bag), "--replay", str(replay)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "needs /observation (sensor_msgs/msg/JointState)" in err
    assert "/robot1/observation" in err and "--namespace /robot1" in err

    # A follower (no up-front check) reads the bag and finds nothing under the root namespace;
    # its ledger must not count the bag as done for another namespace.
    with BridgeFollower(bag, replay) as follower:
        assert follower.poll(final=True) == [] and follower.last_report.transitions == 0
    assert main(["bridge", str(bag), "--replay", str(replay), "--namespace", "/robot1"]) == 0
    match_rows(load_replay(replay), trace.expected)
    ledger = json.loads((replay / "bridge-ledger.json").read_text())
    assert len(ledger["bags"]) == 2
    again = bridge_bags(bag, replay, config=BridgeConfig(namespace="robot1"))
    assert again.transitions == 0 and again.splits == 0


def test_bag_of_another_stack_is_refused(tmp_path: Path) -> None:
    ts = default_typestore()
    from rosbags.rosbag2 import Writer

    bag = tmp_path / "other"
    with Writer(bag, version=9) as writer:
        conn = writer.add_connection("/odom_text", "std_msgs/msg/String", typestore=ts)
        msg = ts.types["std_msgs/msg/String"](data="x")
        writer.write(conn, 1, bytes(ts.serialize_cdr(msg, "std_msgs/msg/String")))
    with pytest.raises(BridgeError) as info:
        bridge_bags(bag, tmp_path / "replay")
    text = str(info.value)
    for needed in ("/observation", "/policy/action", "/safety/command", "/reward"):
        assert needed in text
    assert "found /odom_text (std_msgs/msg/String)" in text
    assert not (tmp_path / "replay" / "bridge-ledger.json").exists()


def test_unreadable_bags_raise_bag_errors(tmp_path: Path) -> None:
    trace = make_trace(seed=15)
    bag = tmp_path / "stock"
    files = write_stock_bag(bag, trace.messages, storage="mcap", splits=2, compression="file")
    files[0].write_bytes(b"\x28\xb5\x2f\xfd" + b"junk" * 100)
    with pytest.raises(BagError, match="cannot open"):
        list(read_messages(bag))
    with pytest.raises(BagError, match="no bag"):
        list(read_messages(tmp_path / "nope"))
    shutil.rmtree(bag)
    (tmp_path / "garbage.mcap").write_bytes(b"not an mcap file")
    with pytest.raises(BagError):
        topic_types(tmp_path / "garbage.mcap")
