"""recorder node: the control-path topics -> a split rosbag2 (mcap) directory.

A thin ROS adapter over :class:`vlarl.bag.writer.SplitBagWriter`:

- subscribes every recorded topic with ``raw=True`` (the message class fixes the type; the
  callback receives the CDR bytes as they came off the wire, never deserialized) and writes
  them with the receive time (node clock) as log time, like ``ros2 bag record``;
- subscriptions are reliable; a topic whose publisher offers best effort is re-subscribed best
  effort (a reliable subscription would never match it), as rosbag2 adapts its QoS;
- each topic's offered QoS profiles and RIHS01 type hash go into the bag's metadata;
- splits close by duration (``split_duration_s``) and size (``split_size_mb``); metadata.yaml is
  rewritten after every closed split, so a SIGKILL leaves every closed split listed and readable;
- the open split's messages reach its file within ``flush_period_s`` (mcap chunks written out
  by the writer and, for quiet topics, by a timer), so a SIGKILL loses at most that long of each
  topic; the bridge and :func:`vlarl.bag.splits.read_split` salvage the open split;
- Ctrl-C/SIGTERM: takes what is still queued, closes the bag, prints its path and counts.

Default topics: robot/task_state, robot/status, joint_states, observation, policy/action,
safety/command, safety/status, reward, reward/episode, reward/human_label, teleop/twist,
learner/gate (the deployment gate's verdicts) (+ camera/image_raw with ``record_images``).
``topics`` overrides the list: comma-separated names from the topic table, or ``name:pkg/Type``
for anything else.
"""

from __future__ import annotations

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from rclpy.clock import Clock, ClockType  # noqa: E402
from rclpy.duration import Duration  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import (  # noqa: E402
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)
from rclpy.subscription import Subscription  # noqa: E402
from rosbags.interfaces import (  # noqa: E402
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)

from vlarl import topics  # noqa: E402
from vlarl.bag.errors import BagError  # noqa: E402
from vlarl.bag.writer import (  # noqa: E402
    DEFAULT_FLUSH_PERIOD_S,
    SplitBagWriter,
    default_typestore,
    ros2_type_name,
)
from vlarl.ros.params import Param, declare  # noqa: E402

DEFAULT_TOPICS: tuple[str, ...] = (
    topics.TASK_STATE,
    topics.ROBOT_STATUS,
    topics.JOINT_STATES,
    topics.OBSERVATION,
    topics.POLICY_ACTION,
    topics.COMMAND,
    topics.SAFETY_STATUS,
    topics.REWARD,
    topics.EPISODE,
    topics.HUMAN_LABEL,
    topics.TELEOP,
    topics.LEARNER_GATE,
)
_TYPES = {spec.name: spec.msg_type for spec in topics.TOPICS if spec.kind == "topic"}

PARAMS: tuple[Param, ...] = (
    Param("output_dir", "bags", "folder the bag directory is created in", read_only=True),
    Param("bag_name", "", "bag directory name (empty: vlarl-<UTC time>); must not exist",
          read_only=True),
    Param("topics", "", "comma-separated topics to record (empty: the control-path topics); "
          "'name:pkg/Type' for topics outside the topic table", read_only=True),
    Param("record_images", False, "also record camera/image_raw", read_only=True),
    Param("split_duration_s", 60.0, "close a split after this many seconds (0: never)",
          low=0.0, high=86_400.0, read_only=True),
    Param("split_size_mb", 256.0, "close a split before it grows past this many MB (0: never)",
          low=0.0, high=1_000_000.0, read_only=True),
    Param("storage", "mcap", "rosbag2 storage plugin", choices=("mcap", "sqlite3"),
          read_only=True),
    Param("fsync", True, "flush each closed split and metadata.yaml to disk", read_only=True),
    Param("flush_period_s", DEFAULT_FLUSH_PERIOD_S, "write the open split's messages to its "
          "file at least this often (mcap; 0: only full 1 MiB chunks)", low=0.0, high=60.0,
          read_only=True),
    Param("qos_depth", 1000, "subscription queue depth per topic", low=1, high=100_000,
          read_only=True),
    Param("status_period_s", 10.0, "log a line with the counts this often (0: never)",
          low=0.0, high=3600.0, read_only=True),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class TopicPlan:
    """A topic to record: ROS name as given, message type ``pkg/msg/Type``."""

    name: str
    msgtype: str


def plan_topics(spec: str, *, record_images: bool) -> list[TopicPlan]:
    """The topics to record from the ``topics`` parameter; raises ``ValueError`` with a reason."""
    entries = [e.strip() for e in spec.split(",") if e.strip()] if spec.strip() else []
    if not entries:
        entries = list(DEFAULT_TOPICS)
        if record_images:
            entries.append(topics.CAMERA_IMAGE)
    plans: list[TopicPlan] = []
    seen: set[str] = set()
    for entry in entries:
        name, _, given_type = entry.partition(":")
        name = name.strip()
        msg_type = given_type.strip() or _TYPES.get(name) or _TYPES.get(name.lstrip("/"))
        if not name:
            raise ValueError(f"empty topic name in {entry!r}")
        if msg_type is None:
            raise ValueError(
                f"topic {name!r} is not in the topic table: give its type as '{name}:pkg/Type'"
            )
        try:
            msgtype = ros2_type_name(msg_type)
        except BagError as exc:
            raise ValueError(str(exc)) from None
        if name in seen:
            continue
        seen.add(name)
        plans.append(TopicPlan(name=name, msgtype=msgtype))
    return plans


def message_class(msgtype: str) -> Any:
    """The rclpy message class of ``pkg/msg/Type``; ``ValueError`` if it is not installed."""
    pkg, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError):
        raise ValueError(f"message type {msgtype} is not installed") from None


def default_bag_name(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"vlarl-{stamp}"


def _qos_time(duration: Duration) -> QosTime:
    ns = int(duration.nanoseconds)
    return QosTime(ns // 1_000_000_000, ns % 1_000_000_000)


def to_bag_qos(profile: QoSProfile) -> Qos:
    """An rclpy QoS profile as rosbags' Qos (the enums share rmw's values)."""
    return Qos(
        QosHistory(int(profile.history)),
        int(profile.depth),
        QosReliability(int(profile.reliability)),
        QosDurability(int(profile.durability)),
        _qos_time(profile.deadline),
        _qos_time(profile.lifespan),
        QosLiveliness(int(profile.liveliness)),
        _qos_time(profile.liveliness_lease_duration),
        bool(profile.avoid_ros_namespace_conventions),
    )


class RecorderNode(Node):
    """ROS adapter of the split bag writer (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("recorder", **kwargs)
        self._params = declare(self, PARAMS)
        p = self._params
        plans = plan_topics(p["topics"], record_images=p["record_images"])
        # Everything that can refuse the start is checked before the bag directory exists.
        self._plans: dict[str, TopicPlan] = {}  # resolved name -> plan
        self._classes: dict[str, Any] = {}
        for plan in plans:
            if plan.msgtype not in default_typestore().types:
                raise ValueError(f"{plan.name}: no message definition for {plan.msgtype}")
            resolved = self.resolve_topic_name(plan.name)
            self._classes[resolved] = message_class(plan.msgtype)
            self._plans[resolved] = plan
        name = p["bag_name"].strip() or default_bag_name()
        if "/" in name or name in (".", ".."):
            raise ValueError(f"bag_name must be a plain folder name, got {name!r}")
        self.bag_path = Path(p["output_dir"]).expanduser().resolve() / name
        try:
            self.writer = SplitBagWriter(
                self.bag_path,
                max_duration_s=p["split_duration_s"],
                max_bytes=round(p["split_size_mb"] * 1_000_000),
                storage=p["storage"],
                ros_distro=os.environ.get("ROS_DISTRO") or "kilted",
                custom_data={"recorded_by": "vlarl recorder"},
                fsync=p["fsync"],
                flush_period_s=p["flush_period_s"],
            )
        except BagError as exc:
            raise ValueError(str(exc)) from None
        self.received = 0
        self.write_errors = 0
        self._last_error = ""
        self._closed = False
        self.stop_requested = False
        self._subs: dict[str, Subscription[Any]] = {}
        self._best_effort: set[str] = set()
        for resolved in self._plans:
            self._subscribe(resolved, best_effort=False)
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(1.0, self._adapt_qos, clock=steady)
        if p["split_duration_s"] > 0:
            period = min(1.0, p["split_duration_s"] / 4.0)
            self.create_timer(period, self._rotate, clock=steady)
        if p["flush_period_s"] > 0:
            self.create_timer(p["flush_period_s"] / 4.0, self._flush, clock=steady)
        if p["status_period_s"] > 0:
            self.create_timer(p["status_period_s"], self.log_status, clock=steady)
        self.get_logger().info(
            f"recording {len(self._plans)} topics to {self.bag_path} ({p['storage']}, split "
            f"{p['split_duration_s']:g} s / {p['split_size_mb']:g} MB): "
            + ", ".join(sorted(self._plans))
        )

    # ----------------------------------------------------------------- subscriptions
    def _qos(self, *, best_effort: bool) -> QoSProfile:
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=self._params["qos_depth"],
            reliability=ReliabilityPolicy.BEST_EFFORT
            if best_effort
            else ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.VOLATILE,
        )

    def _subscribe(self, topic: str, *, best_effort: bool) -> None:
        old = self._subs.pop(topic, None)
        if old is not None:
            self.destroy_subscription(old)

        def callback(data: bytes, topic: str = topic) -> None:
            self._on_message(topic, data)

        self._subs[topic] = self.create_subscription(
            self._classes[topic], topic, callback, self._qos(best_effort=best_effort), raw=True
        )
        if best_effort:
            self._best_effort.add(topic)

    def _adapt_qos(self) -> None:
        """Re-subscribe best effort where a publisher offers only best effort."""
        for topic in self._plans:
            if topic in self._best_effort:
                continue
            infos = self.get_publishers_info_by_topic(topic)
            if any(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for i in infos):
                self.get_logger().warning(
                    f"{topic}: a publisher offers best effort; recording it best effort"
                )
                self._subscribe(topic, best_effort=True)

    # ----------------------------------------------------------------- recording
    def _register(self, topic: str) -> None:
        offered = []
        try:
            offered = [to_bag_qos(i.qos_profile) for i in self.get_publishers_info_by_topic(topic)]
        except Exception as exc:  # QoS is metadata only: record without it rather than fail
            self.get_logger().warning(f"{topic}: offered QoS unavailable ({exc})")
        self.writer.add_topic(topic, self._plans[topic].msgtype, offered_qos=offered)

    def _on_message(self, topic: str, data: bytes) -> None:
        if self._closed:
            return
        now_ns = self.get_clock().now().nanoseconds
        try:
            if not self.writer.has_topic(topic):
                self._register(topic)
            self.writer.write(topic, now_ns, data)
            self.received += 1
        except Exception as exc:
            self.write_errors += 1
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                self.get_logger().error(f"cannot write {topic} to {self.bag_path}: {exc}")

    def _rotate(self) -> None:
        if self._closed:
            return
        try:
            self.writer.rotate_if_due(self.get_clock().now().nanoseconds)
        except Exception as exc:
            self.write_errors += 1
            self.get_logger().error(f"cannot close a split of {self.bag_path}: {exc}")

    def _flush(self) -> None:
        if self._closed:
            return
        try:
            self.writer.flush_if_due()
        except Exception as exc:
            self.write_errors += 1
            self.get_logger().error(f"cannot write to {self.bag_path}: {exc}")

    def summary(self) -> str:
        counts = self.writer.topic_counts()
        parts = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
        return (
            f"{self.bag_path}: {self.writer.message_count} messages, "
            f"{len(self.writer.files)} closed splits" + (f" ({parts})" if parts else "")
        )

    def log_status(self) -> None:
        errors = f", {self.write_errors} write errors" if self.write_errors else ""
        self.get_logger().info(f"recording {self.summary()}{errors}")

    def close(self) -> None:
        """Close the bag (idempotent) and print where it is."""
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        print(f"recorder: bag {self.summary()}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from vlarl.ros.executors import stop_on_signals

    args = list(sys.argv if argv is None else argv)
    # Our own SIGINT/SIGTERM handling: take what is still queued, then close the bag.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node: RecorderNode | None = None
    try:
        try:
            node = RecorderNode()
        except ValueError as exc:
            print(f"recorder: {exc}", file=sys.stderr)
            return 2
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)

        stop = stop_on_signals()  # SIGINT/SIGTERM: stop (repeats ignored while the bag closes)
        try:
            while not (stop.is_set() or node.stop_requested):
                executor.spin_once(timeout_sec=0.1)
            # Drain: keep taking messages until nothing arrived for a moment (at most 2 s).
            deadline = time.monotonic() + 2.0
            quiet_since = time.monotonic()
            seen = node.received
            while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.2:
                executor.spin_once(timeout_sec=0.02)
                if node.received != seen:
                    seen = node.received
                    quiet_since = time.monotonic()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            node.close()
            executor.shutdown()
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
