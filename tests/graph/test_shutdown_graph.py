"""Issue 12, finding 8 under ``ros2 launch``: a Ctrl-C there reaches each node twice (the
terminal's SIGINT to the process group, then launch's own), and the policy node aborted (exit
-6, a KeyboardInterrupt thrown through pybind11) while safety skipped acknowledging its last
hold. ``launch`` is not on PyPI, so this sends exactly those two SIGINTs to each node of the
launch file's graph: every node must exit 0 without a traceback, and the last command the robot
side saw must be safety's hold."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vlarl import topics
from vlarl.graph import GRAPH, package_root, wait_until

pytestmark = pytest.mark.graph

DEFAULT_MODEL = package_root() / "models" / "pick-place-v3-student.onnx"


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="default model not built")
def test_double_ctrl_c_stops_every_node_cleanly_after_a_last_hold(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState

    commands: list[str] = []
    lock = threading.Lock()
    node = Node("shutdown_observer", context=rclpy_context)

    def on_command(msg: JointState) -> None:
        with lock:
            commands.append(msg.header.frame_id)

    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(JointState, topics.COMMAND, on_command, qos)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    overrides: dict[str, dict[str, Any]] = {
        "sim_robot": {"task": "pick-place-v3", "camera_rate_hz": 0.0},
        "policy": {"model": str(DEFAULT_MODEL), "task": "pick-place-v3"},
        "recorder": {"output_dir": str(tmp_path / "bags"), "bag_name": "shutdown"},
    }
    try:
        nodes = [start(spec.name, **overrides.get(spec.name, {})) for spec in GRAPH]

        def moving() -> int:
            with lock:
                return sum(1 for tag in commands if not tag.startswith("hold"))

        assert wait_until(lambda: moving() >= 50, timeout=90.0), commands[-5:]
        for running in nodes:  # the terminal's Ctrl-C, then launch's SIGINT right after
            running.process.send_signal(signal.SIGINT)
        time.sleep(0.05)
        for running in nodes:
            if running.alive():
                running.process.send_signal(signal.SIGINT)
        codes = {}
        for running in nodes:
            try:
                codes[running.spec.name] = running.process.wait(timeout=20.0)
            except Exception:
                codes[running.spec.name] = None
        time.sleep(0.3)  # the observer takes what is still queued
    finally:
        executor.shutdown()
        node.destroy_node()
    logs = {
        running.spec.name: running.log_path.read_text(errors="replace")
        for running in nodes
        if running.log_path is not None
    }
    assert codes == {spec.name: 0 for spec in GRAPH}, (codes, logs)
    for name, text in logs.items():
        assert "Traceback" not in text and "terminate called" not in text, (name, text[-2000:])
    with lock:
        assert commands and commands[-1].startswith("hold"), commands[-5:]
    assert (tmp_path / "bags" / "shutdown" / "metadata.yaml").is_file()
