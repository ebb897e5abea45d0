"""The whole graph across processes: the loop closes, a dead policy makes safety hold, and the
main command runs end to end and leaves a bag that reads back completely."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from vlarl import topics
from vlarl.graph import config_path, package_root, wait_until
from vlarl.rosenv import child_env

pytestmark = pytest.mark.graph

DEFAULT_MODEL = package_root() / "models" / "pick-place-v3-student.onnx"
needs_model = pytest.mark.skipif(
    not DEFAULT_MODEL.exists(), reason="default model not built (scripts/build_default_model.sh)"
)


def _watchdog_timeout() -> float:
    params = yaml.safe_load(config_path("safety.yaml").read_text())
    return float(params["safety"]["ros__parameters"]["watchdog_timeout_s"])


@needs_model
def test_loop_closes_and_dead_policy_makes_safety_hold(start, rclpy_context) -> None:  # type: ignore[no-untyped-def]
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState

    commands: list[tuple[float, str]] = []
    lock = threading.Lock()
    node = Node("test_observer", context=rclpy_context)

    def on_command(msg: JointState) -> None:
        with lock:
            commands.append((time.monotonic(), msg.header.frame_id))

    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(JointState, topics.COMMAND, on_command, qos)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        start("safety")
        policy = start("policy", model=str(DEFAULT_MODEL), task="pick-place-v3")
        start("perception")
        start("sim_robot", task="pick-place-v3", camera_rate_hz=0.0)

        def policy_commands() -> int:
            with lock:
                return sum(1 for _, tag in commands if not tag.startswith("hold"))

        assert wait_until(lambda: policy_commands() >= 200, timeout=60.0), (
            f"loop did not close: {len(commands)} commands"
        )
        with lock:
            tags = {tag for _, tag in commands if not tag.startswith("hold")}
        assert any(tag.startswith("pick-place-v3-student@") for tag in tags), tags

        policy.kill()
        killed_at = time.monotonic()

        def first_hold_after_kill() -> float | None:
            with lock:
                for stamp, tag in commands:
                    if stamp >= killed_at and tag.startswith("hold:"):
                        return stamp
            return None

        assert wait_until(lambda: first_hold_after_kill() is not None, timeout=5.0)
        gap = first_hold_after_kill()
        assert gap is not None
        gap_s = gap - killed_at
        timeout = _watchdog_timeout()
        print(f"policy killed -> first hold after {1000 * gap_s:.1f} ms (timeout {timeout} s)")
        assert gap_s <= timeout + 0.1
        # The robot keeps being held: commands continue, all of them holds.
        time.sleep(0.5)
        with lock:
            late = [tag for stamp, tag in commands if stamp > gap + 0.05]
        assert late, "no commands after the hold started"
        assert all(tag.startswith("hold:") for tag in late)
    finally:
        executor.shutdown()
        node.destroy_node()


@needs_model
def test_main_command_end_to_end(tmp_path: Path, domain_id: int) -> None:
    results = tmp_path / "logs" / "bringup.json"  # the run folder's, by default
    cmd = [
        sys.executable,
        "-m",
        "vlarl.cli",
        "bringup",
        "--episodes",
        "2",
        "--max-episode-steps",
        "150",
        "--domain-id",
        str(domain_id),
        "--bag-dir",
        str(tmp_path / "bags"),
        "--run-dir",
        str(tmp_path / "logs"),
        "--camera-rate",
        "2",
        "--timeout",
        "150",
    ]
    proc = subprocess.run(
        cmd, env=child_env(domain_id=domain_id), capture_output=True, text=True, timeout=200
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "episode   2/2" in proc.stdout
    data = json.loads(results.read_text())
    assert len(data["episodes"]) == 2
    assert data["control_rate_hz"] > 0
    bag = Path(data["bag"])
    assert bag.is_dir() and (bag / "metadata.yaml").is_file()

    from vlarl.bag.reader import topic_counts

    counts = topic_counts(bag)
    for topic in (topics.OBSERVATION, topics.POLICY_ACTION, topics.COMMAND, topics.REWARD):
        name = topic if topic.startswith("/") else "/" + topic
        assert counts.get(name, 0) > 0, (topic, counts)
    assert data["bag_messages"] == sum(counts.values())
