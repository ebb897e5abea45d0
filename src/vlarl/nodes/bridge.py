"""bridge node: closed bag splits -> replay shards, live (a thin adapter over BridgeFollower).

Polls ``bag_dir`` (the recorder's ``output_dir``: every bag recorded there, new ones included)
every ``period_s``, ingests each closed split exactly once into ``replay_dir`` (restart-safe: the
ledger there says what is done), and publishes a JSON status on ``bridge/status``. The same
machinery as ``vlarl bridge BAG... --replay DIR [--follow]``; this node exists so that
``ros2 launch vlarl bringup.launch.py learn:=true`` starts the whole loop.
"""

from __future__ import annotations

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

import json  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from rclpy.node import Node  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from vlarl import topics  # noqa: E402
from vlarl.bag.bridge import BridgeConfig, BridgeFollower  # noqa: E402
from vlarl.bag.errors import BridgeError  # noqa: E402
from vlarl.data.errors import ReplayError  # noqa: E402
from vlarl.ros.params import Param, declare  # noqa: E402

PARAMS: tuple[Param, ...] = (
    Param(
        "bag_dir", "bags", "folder of bags to follow (the recorder's output_dir)", read_only=True
    ),
    Param("replay_dir", "replay/live", "replay folder to write (with its ledger)", read_only=True),
    Param("period_s", 1.0, "polling period", low=0.05, high=600.0),
    Param(
        "holds", "keep", "safety hold steps: keep or drop", choices=("keep", "drop"), read_only=True
    ),
    Param("status_rate_hz", 1.0, "rate of bridge/status", low=0.1, high=50.0),
)


class BridgeNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("bridge", **kwargs)
        self._p = declare(self, PARAMS, lambda changes: None)
        # No mkdir: the recorder refuses to record into an existing bag directory, and the
        # follower waits for a path that does not exist yet.
        try:
            self.follower = BridgeFollower(
                str(self._p["bag_dir"]),
                str(self._p["replay_dir"]),
                config=BridgeConfig(holds=str(self._p["holds"])),
            )
        except (BridgeError, ReplayError, OSError) as exc:
            raise ValueError(f"cannot follow {self._p['bag_dir']}: {exc}") from None
        self.shards = 0
        self.rows = 0
        self.errors = 0
        self.last_error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._status_pub = self.create_publisher(String, topics.BRIDGE_STATUS, 10)
        self.create_timer(1.0 / float(self._p["status_rate_hz"]), self._publish_status)
        self._worker = threading.Thread(target=self._work, name="bridge", daemon=True)
        self._worker.start()
        self.get_logger().info(f"following {self._p['bag_dir']} -> {self._p['replay_dir']}")

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                infos = self.follower.poll()
            except (BridgeError, ReplayError, OSError) as exc:
                with self._lock:
                    self.errors += 1
                    self.last_error = str(exc)
                self.get_logger().error(f"poll failed (retrying): {exc}")
                infos = []
            if infos:
                with self._lock:
                    self.shards += len(infos)
                    self.rows += sum(i.rows for i in infos)
            self._stop.wait(float(self._p["period_s"]))

    def _publish_status(self) -> None:
        with self._lock:
            report = self.follower.report.to_dict()
            doc = {
                "shards": self.shards,
                "rows": self.rows,
                "errors": self.errors,
                "last_error": self.last_error,
                "report": report,
            }
        self._status_pub.publish(String(data=json.dumps(doc, default=str)))

    def shutdown(self) -> None:
        self._stop.set()
        self._worker.join(timeout=30.0)
        self.follower.close()


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    from vlarl.ros.executors import run_node

    return run_node(BridgeNode, name="bridge", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
