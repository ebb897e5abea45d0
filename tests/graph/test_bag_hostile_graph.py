"""Issue 12, findings 6 and 9 through the live bridge node: a bag whose recorder was killed
(open split left in ``.partial/``) and a bag whose metadata.yaml is a 1 KB YAML alias bomb
(83 MB and 9x per line before). The real bridge process must stay up and small, and say in its
status which bag was not closed and which metadata it refused."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from vlarl.bag.writer import SplitBagWriter, default_typestore
from vlarl.graph import wait_until
from vlarl.topics import BRIDGE_STATUS

pytestmark = pytest.mark.graph


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefghijkl", "bcdefghijklm"[: levels - 1], strict=False):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_bridge_node_names_an_unclosed_bag_and_refuses_an_alias_bomb(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from std_msgs.msg import String

    bags = tmp_path / "bags"
    ts = default_typestore()
    unclosed = SplitBagWriter(bags / "unclosed", fsync=False, max_bytes=2_000)
    unclosed.add_topic("/a", "std_msgs/msg/String")
    for i in range(30):
        data = ts.serialize_cdr(
            ts.types["std_msgs/msg/String"](data="x" * 100), "std_msgs/msg/String"
        )
        unclosed.write("/a", 1_000_000_000 + i, bytes(data))
    unclosed.flush()  # left open: what a SIGKILLed recorder leaves
    bomb = bags / "bomb"
    bomb.mkdir()
    (bomb / "metadata.yaml").write_text(_alias_bomb())
    # two splits: the first counts as closed, so the live bridge reads this bag now
    for k, split in enumerate(sorted((bags / "unclosed").glob("*.mcap"))[:2]):
        (bomb / f"bomb_{k}.mcap").write_bytes(split.read_bytes())

    statuses: list[dict[str, Any]] = []
    lock = threading.Lock()
    node = Node("bridge_observer", context=rclpy_context)

    def on_status(msg: String) -> None:
        with lock:
            statuses.append(json.loads(msg.data))

    node.create_subscription(String, BRIDGE_STATUS, on_status, 10)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        bridge = start("bridge", bag_dir=str(bags), replay_dir=str(tmp_path / "replay"),
                       period_s=0.2, status_rate_hz=5.0)  # fmt: skip

        def notes() -> list[str]:
            with lock:
                return list(statuses[-1]["report"]["notes"]) if statuses else []

        def reported() -> bool:
            text = "\n".join(notes())
            return "aliases" in text and "not closed" in text and "open split skipped" in text

        assert wait_until(reported, timeout=60.0), notes()
        assert bridge.alive()
        assert _rss_mb(bridge.process.pid) < 400
    finally:
        with contextlib.suppress(Exception):
            executor.shutdown()
        node.destroy_node()
        unclosed.close()
