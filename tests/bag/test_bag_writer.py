"""SplitBagWriter: real rosbag2 directories (mcap/sqlite3) read back with rosbags and mcap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mcap.reader import make_reader
from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import Reader as Rosbag2Reader

from vlarl.bag.errors import (
    BagClosedError,
    BagError,
    BagExistsError,
    MetadataError,
    UnknownTopicError,
)
from vlarl.bag.metadata import check_metadata
from vlarl.bag.reader import read_decoded, read_messages, read_metadata, topic_counts, topic_types
from vlarl.bag.writer import PARTIAL_DIR, SplitBagWriter, default_typestore

TS = default_typestore()
T = TS.types


def _stamp(ns: int) -> object:
    return T["builtin_interfaces/msg/Time"](sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _header(ns: int, frame: str = "") -> object:
    return T["std_msgs/msg/Header"](stamp=_stamp(ns), frame_id=frame)


def _cdr(msg: object, msgtype: str) -> bytes:
    return bytes(TS.serialize_cdr(msg, msgtype))


def joint_state(i: int) -> bytes:
    msg = T["sensor_msgs/msg/JointState"](
        header=_header(i * 12_500_000, "state"),
        name=["a", "b", "c"],
        position=np.arange(3, dtype=np.float64) + i,
        velocity=np.zeros(0, dtype=np.float64),
        effort=np.zeros(0, dtype=np.float64),
    )
    return _cdr(msg, "sensor_msgs/msg/JointState")


def trajectory(i: int) -> bytes:
    point_t = T["trajectory_msgs/msg/JointTrajectoryPoint"]
    duration_t = T["builtin_interfaces/msg/Duration"]
    points = [
        point_t(
            positions=np.full(4, 0.01 * i + k),
            velocities=np.zeros(0),
            accelerations=np.zeros(0),
            effort=np.full(4, -0.001 * i),
            time_from_start=duration_t(sec=0, nanosec=12_500_000 * k),
        )
        for k in range(8)
    ]
    msg = T["trajectory_msgs/msg/JointTrajectory"](
        header=_header(i * 12_500_000, "model@1+residual@0"),
        joint_names=["dx", "dy", "dz", "gripper"],
        points=points,
    )
    return _cdr(msg, "trajectory_msgs/msg/JointTrajectory")


def text(i: int) -> bytes:
    return _cdr(T["std_msgs/msg/String"](data=f'{{"episode": {i}}}'), "std_msgs/msg/String")


def image(i: int) -> bytes:
    msg = T["sensor_msgs/msg/Image"](
        header=_header(i * 12_500_000, "camera"),
        height=8,
        width=8,
        encoding="rgb8",
        is_bigendian=0,
        step=24,
        data=np.full(8 * 8 * 3, i % 256, dtype=np.uint8),
    )
    return _cdr(msg, "sensor_msgs/msg/Image")


TOPICS = {
    "/robot/status": ("sensor_msgs/msg/JointState", joint_state),
    "/policy/action": ("trajectory_msgs/msg/JointTrajectory", trajectory),
    "/reward/episode": ("std_msgs/msg/String", text),
    "/camera/image_raw": ("sensor_msgs/msg/Image", image),
}


def write_stream(
    writer: SplitBagWriter, n: int, *, t0: int = 1_700_000_000_000_000_000, dt: int = 12_500_000
) -> list[tuple[str, int, bytes]]:
    """n ticks; every tick writes status + action, every 10th an image, every 50th a String."""
    for topic, (msgtype, _) in TOPICS.items():
        writer.add_topic(topic, msgtype)
    sent = []
    for i in range(n):
        now = t0 + i * dt
        names = ["/robot/status", "/policy/action"]
        if i % 10 == 0:
            names.append("/camera/image_raw")
        if i % 50 == 49:
            names.append("/reward/episode")
        for k, topic in enumerate(names):
            data = TOPICS[topic][1](i)
            writer.write(topic, now + k, data)
            sent.append((topic, now + k, data))
    return sent


def per_topic(sent: list[tuple[str, int, bytes]]) -> dict[str, int]:
    """Messages per topic, with 0 for registered topics that got none."""
    counts: dict[str, int] = dict.fromkeys(TOPICS, 0)
    for topic, _, _ in sent:
        counts[topic] = counts.get(topic, 0) + 1
    return counts


def check_bag(bag: Path, sent: list[tuple[str, int, bytes]]) -> dict:
    """Every message back, identical bytes and times, in order; metadata consistent with files."""
    got = [(m.topic, m.log_time_ns, m.data) for m in read_messages(bag)]
    assert len(got) == len(sent)
    assert got == sent
    assert topic_counts(bag) == per_topic(sent)
    info = read_metadata(bag)
    doc = yaml.safe_load((bag / "metadata.yaml").read_text())
    check_metadata(doc)
    assert info["version"] == 9
    assert info["message_count"] == len(sent)
    files = info["files"]
    assert info["relative_file_paths"] == [f["path"] for f in files]
    assert [f["path"] for f in files] == [
        f"{bag.name}_{k}.{'mcap' if info['storage_identifier'] == 'mcap' else 'db3'}"
        for k in range(len(files))
    ]
    assert sorted(p.name for p in bag.iterdir()) == sorted(
        ["metadata.yaml", *(f["path"] for f in files)]
    )
    # Per-file counts, start times and durations match the file contents.
    for f in files:
        with Rosbag2Reader(bag / f["path"]) as single:
            stamps = [t for _, t, _ in single.messages()]
        assert len(stamps) == f["message_count"]
        assert min(stamps) == f["starting_time"]["nanoseconds_since_epoch"]
        assert max(stamps) - min(stamps) == f["duration"]["nanoseconds"]
    assert info["starting_time"]["nanoseconds_since_epoch"] == sent[0][1]
    assert info["duration"]["nanoseconds"] == sent[-1][1] - sent[0][1]
    by_topic = {
        t["topic_metadata"]["name"]: t["message_count"] for t in info["topics_with_message_count"]
    }
    assert by_topic == per_topic(sent)
    return info


def test_split_by_size_reads_back_every_message(tmp_path: Path) -> None:
    bag = tmp_path / "run_size"
    with SplitBagWriter(bag, max_bytes=60_000) as writer:
        sent = write_stream(writer, 600)
        assert writer.message_count == len(sent)
    info = check_bag(bag, sent)
    assert len(info["files"]) >= 4
    sizes = [(bag / f["path"]).stat().st_size for f in info["files"]]
    # every split but the last is near the limit and none is far beyond it (mcap index overhead)
    assert all(s < 60_000 * 1.3 for s in sizes), sizes
    assert all(s > 60_000 * 0.5 for s in sizes[:-1]), sizes
    # Independent check of each split with the mcap library: complete files with a summary.
    for f in info["files"]:
        with open(bag / f["path"], "rb") as handle:
            reader = make_reader(handle)
            assert reader.get_header().profile == "ros2"
            summary = reader.get_summary()
            assert summary is not None and summary.statistics is not None
            assert summary.statistics.message_count == f["message_count"]
            assert {s.encoding for s in summary.schemas.values()} == {"ros2msg"}
            assert {c.message_encoding for c in summary.channels.values()} == {"cdr"}


def test_split_by_duration(tmp_path: Path) -> None:
    bag = tmp_path / "run_duration"
    with SplitBagWriter(bag, max_duration_s=1.0) as writer:
        sent = write_stream(writer, 400)  # 400 ticks of 12.5 ms = 5 s
    info = check_bag(bag, sent)
    assert len(info["files"]) == 5
    for f in info["files"]:
        assert f["duration"]["nanoseconds"] < 1_000_000_000


def test_decoded_messages_match(tmp_path: Path) -> None:
    bag = tmp_path / "decoded"
    with SplitBagWriter(bag, max_bytes=20_000) as writer:
        write_stream(writer, 120)
    decoded = list(read_decoded(bag, topics={"/policy/action"}))
    assert len(decoded) == 120
    for i, (topic, _, msg) in enumerate(decoded):
        assert topic == "/policy/action"
        assert msg.header.frame_id == "model@1+residual@0"
        assert len(msg.points) == 8
        np.testing.assert_allclose(msg.points[3].positions, np.full(4, 0.01 * i + 3))
    assert topic_types(bag)["/robot/status"] == "sensor_msgs/msg/JointState"


def test_sqlite3_storage(tmp_path: Path) -> None:
    bag = tmp_path / "sq"
    with SplitBagWriter(bag, max_bytes=40_000, storage="sqlite3") as writer:
        sent = write_stream(writer, 200)
    info = check_bag(bag, sent)
    assert info["storage_identifier"] == "sqlite3"
    assert len(info["files"]) >= 2


def test_offered_qos_in_metadata_and_readable(tmp_path: Path) -> None:
    infinite = QosTime(9223372036, 854775807)
    qos = Qos(
        QosHistory.UNKNOWN,
        0,
        QosReliability.RELIABLE,
        QosDurability.VOLATILE,
        infinite,
        infinite,
        QosLiveliness.AUTOMATIC,
        infinite,
        False,
    )
    bag = tmp_path / "qos"
    with SplitBagWriter(bag, max_bytes=5_000) as writer:
        writer.add_topic("/reward/episode", "std_msgs/String", offered_qos=[qos])
        for i in range(100):
            writer.write("/reward/episode", 1_000 + i, text(i))
    info = read_metadata(bag)
    profile = info["topics_with_message_count"][0]["topic_metadata"]["offered_qos_profiles"][0]
    assert profile["reliability"] == "reliable"
    assert profile["durability"] == "volatile"
    assert profile["history"] == "unknown"
    assert profile["deadline"] == {"sec": 9223372036, "nsec": 854775807}
    assert len(info["files"]) > 1
    assert sum(1 for _ in read_messages(bag)) == 100


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    bag = tmp_path / "existing"
    with SplitBagWriter(bag) as writer:
        sent = write_stream(writer, 20)
    before = {p.name: p.read_bytes() for p in bag.iterdir()}
    with pytest.raises(BagExistsError):
        SplitBagWriter(bag)
    assert {p.name: p.read_bytes() for p in bag.iterdir()} == before
    check_bag(bag, sent)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(BagExistsError):
        SplitBagWriter(empty)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with pytest.raises(BagExistsError):
        SplitBagWriter(a_file)
    assert a_file.read_text() == "keep me"


def test_errors_are_clear(tmp_path: Path) -> None:
    writer = SplitBagWriter(tmp_path / "errs", max_duration_s=1.0)
    with pytest.raises(UnknownTopicError, match="was not added"):
        writer.write("/nope", 1, b"\x00\x01\x00\x00")
    with pytest.raises(UnknownTopicError, match="unknown message type"):
        writer.add_topic("/x", "no_pkg/msg/Nothing")
    with pytest.raises(UnknownTopicError, match="not a message type"):
        writer.add_topic("/x", "JointState")
    writer.add_topic("/s", "std_msgs/msg/String")
    writer.add_topic("/s", "std_msgs/String")  # same type again: fine
    with pytest.raises(BagError, match="recorded as"):
        writer.add_topic("/s", "sensor_msgs/msg/JointState")
    writer.write("/s", 10, text(0))
    assert not writer.rotate_if_due(10 + 999_999_999)
    assert writer.rotate_if_due(10 + 1_000_000_000)  # quiet topic: the split closes on time
    assert len(writer.files) == 1
    writer.write("/s", 2_000_000_000, text(1))
    assert writer.split_now()
    assert not writer.split_now()
    writer.close()
    writer.close()
    with pytest.raises(BagClosedError):
        writer.write("/s", 3, text(2))
    assert [f.message_count for f in writer.files] == [1, 1]
    with pytest.raises(BagError, match="storage"):
        SplitBagWriter(tmp_path / "bad", storage="rosbag1")


def test_empty_bag_has_valid_metadata(tmp_path: Path) -> None:
    bag = tmp_path / "nothing"
    SplitBagWriter(bag).close()
    info = read_metadata(bag)
    assert info["message_count"] == 0 and info["files"] == []
    assert list(read_messages(bag)) == []


_CHILD = textwrap.dedent(
    """
    import sys
    from vlarl.bag.writer import SplitBagWriter, default_typestore
    ts = default_typestore()
    String = ts.types["std_msgs/msg/String"]
    writer = SplitBagWriter(sys.argv[1], max_bytes=4_000)
    writer.add_topic("/a", "std_msgs/msg/String")
    writer.add_topic("/b", "std_msgs/msg/String")
    closed = 0
    i = 0
    while True:  # until killed
        topic = "/a" if i % 3 else "/b"
        data = bytes(ts.serialize_cdr(String(data=f"m{i}"), "std_msgs/msg/String"))
        writer.write(topic, 1_000_000 + i, data)
        i += 1
        if len(writer.files) != closed:
            closed = len(writer.files)
            print(closed, flush=True)
    """
)


def test_sigkill_leaves_closed_splits_readable(tmp_path: Path) -> None:
    bag = tmp_path / "killed"
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(bag)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30.0
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or int(line) >= 4:
                break
        time.sleep(0.01)  # keep writing into the open split
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    info = read_metadata(bag)
    assert len(info["files"]) >= 4
    got = list(read_messages(bag))
    assert len(got) == info["message_count"]
    ts = default_typestore()
    # Exactly the first N messages the child wrote, in order, nothing torn.
    for i, msg in enumerate(got):
        assert msg.topic == ("/a" if i % 3 else "/b")
        assert msg.log_time_ns == 1_000_000 + i
        assert ts.deserialize_cdr(msg.data, "std_msgs/msg/String").data == f"m{i}"
    # The split that was open when the process died is not listed (it stays in the stage dir).
    listed = {f["path"] for f in info["files"]}
    assert {p.name for p in bag.glob("*.mcap")} >= listed
    assert (bag / PARTIAL_DIR).is_dir()


# The keys rosbag2_storage's YAML encoder writes for BagMetadata / TopicMetadata / files (v9).
ROSBAG2_V9_KEYS = {
    "version",
    "storage_identifier",
    "duration",
    "starting_time",
    "message_count",
    "topics_with_message_count",
    "compression_format",
    "compression_mode",
    "relative_file_paths",
    "files",
    "custom_data",
    "ros_distro",
}


def test_metadata_has_rosbag2_v9_layout_and_the_checker_can_fail(tmp_path: Path) -> None:
    bag = tmp_path / "layout"
    with SplitBagWriter(bag, max_bytes=30_000, custom_data={"k": "v"}) as writer:
        write_stream(writer, 100)
    doc = yaml.safe_load((bag / "metadata.yaml").read_text())
    info = doc["rosbag2_bagfile_information"]
    assert set(doc) == {"rosbag2_bagfile_information"}
    assert set(info) == ROSBAG2_V9_KEYS
    assert info["custom_data"] == {"k": "v"} and info["ros_distro"] == "kilted"
    topic = info["topics_with_message_count"][0]
    assert set(topic) == {"topic_metadata", "message_count"}
    assert set(topic["topic_metadata"]) == {
        "name",
        "type",
        "serialization_format",
        "offered_qos_profiles",
        "type_description_hash",
    }
    assert isinstance(topic["topic_metadata"]["offered_qos_profiles"], list)  # v9: a sequence
    assert set(info["files"][0]) == {"path", "starting_time", "duration", "message_count"}
    check_metadata(doc)

    def broken(change) -> dict:  # type: ignore[no-untyped-def]
        copy = yaml.safe_load(yaml.safe_dump(doc))
        change(copy["rosbag2_bagfile_information"])
        return copy

    bad = [
        lambda i: i.pop("ros_distro"),
        lambda i: i.pop("files"),
        lambda i: i.update(version=10),
        lambda i: i.update(message_count=i["message_count"] + 1),
        lambda i: i["topics_with_message_count"][0]["topic_metadata"].update(
            offered_qos_profiles="- history: 1"
        ),
        lambda i: i["topics_with_message_count"][0]["topic_metadata"].pop("type_description_hash"),
        lambda i: i["files"][0].update(path="elsewhere.mcap"),
        lambda i: i.update(storage_identifier="rosbag1"),
    ]
    for change in bad:
        with pytest.raises(MetadataError):
            check_metadata(broken(change))
    qos_doc = broken(lambda i: None)
    qos_topic = qos_doc["rosbag2_bagfile_information"]["topics_with_message_count"][0]
    qos_topic["topic_metadata"]["offered_qos_profiles"] = [
        {
            "history": "keep_last",
            "depth": 10,
            "reliability": "very_reliable",
            "durability": "volatile",
            "deadline": {"sec": 0, "nsec": 0},
            "lifespan": {"sec": 0, "nsec": 0},
            "liveliness": "automatic",
            "liveliness_lease_duration": {"sec": 0, "nsec": 0},
            "avoid_ros_namespace_conventions": False,
        }
    ]
    with pytest.raises(MetadataError, match="reliability"):
        check_metadata(qos_doc)
