"""Issue 12, finding 7: a learner killed between persisting a version and checkpointing it came
back and published a different residual under the same version number. Here the real learner
process is killed and restarted on exactly that state (deployed blob newer than the
checkpoint); every version seen on ``policy_weights`` must map to one blob."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from test_learner_graph import LEARNER, _write_episodes

from model_factory import make_policy
from vlarl.core.weights import decode_residual
from vlarl.graph import wait_until
from vlarl.topics import POLICY_WEIGHTS

pytestmark = pytest.mark.graph

TIMEOUT = 60.0
MODEL_ID = "crash-test"  # only this learner's blobs count (other tests may share the domain)


class WeightsLog:
    """Every blob seen on policy_weights: version -> set of sha256 digests of the bytes."""

    def __init__(self, context: Any) -> None:
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from std_msgs.msg import UInt8MultiArray

        from vlarl.nodes.learner import WEIGHTS_QOS

        self.node = Node("weights_log", context=context)
        self.lock = threading.Lock()
        self.blobs: dict[int, set[str]] = {}
        self.order: list[int] = []
        self.node.create_subscription(UInt8MultiArray, POLICY_WEIGHTS, self._on_blob, WEIGHTS_QOS)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        with contextlib.suppress(Exception):
            self.executor.spin()

    def _on_blob(self, msg: Any) -> None:
        blob = bytes(msg.data)
        weights = decode_residual(blob)
        if weights.model_id != MODEL_ID:
            return
        version = weights.version
        with self.lock:
            self.blobs.setdefault(version, set()).add(hashlib.sha256(blob).hexdigest())
            self.order.append(version)

    def newest(self) -> int:
        with self.lock:
            return max(self.blobs, default=0)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()


def _checkpoint_version(path: Path) -> int:
    from vlarl.learning.residual_rl import load_learner

    return load_learner(path)[1].version


def test_restart_between_blob_and_checkpoint_never_reuses_a_version(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    model = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "base.onnx")
    replay = tmp_path / "replay"
    checkpoint = tmp_path / "learner.safetensors"
    deployed = checkpoint.with_suffix(".deployed.safetensors")
    settings = {
        **LEARNER,
        "publish_every": 20,
        "model_id": MODEL_ID,
        "base_model": str(model),
        "replay_dir": str(replay),
        "checkpoint": str(checkpoint),
    }
    _write_episodes(replay, tag="graph-policy@1", episodes=4, seed=0)
    log = WeightsLog(rclpy_context)
    try:
        start("safety")  # the learner publishes only once safety's delta equals its own
        learner = start("learner", **settings)
        assert wait_until(lambda: log.newest() >= 1 and checkpoint.exists(), timeout=TIMEOUT)
        stale = tmp_path / "stale.safetensors"
        shutil.copyfile(checkpoint, stale)
        stale_version = _checkpoint_version(stale)
        # more data: newer versions are persisted and published after the copy was taken
        _write_episodes(replay, tag="graph-policy@1", episodes=4, seed=1)
        assert wait_until(lambda: log.newest() > stale_version, timeout=TIMEOUT), log.blobs
        learner.kill()
        deployed_blob = deployed.read_bytes()
        deployed_version = decode_residual(deployed_blob).version
        assert deployed_version > stale_version
        # the crash window: the blob of the newest version persisted, its checkpoint not yet
        shutil.copyfile(stale, checkpoint)
        start("learner", **settings)
        _write_episodes(replay, tag="graph-policy@1", episodes=4, seed=2)
        assert wait_until(lambda: log.newest() > deployed_version, timeout=TIMEOUT), log.blobs
    finally:
        log.close()
    reused = {v: len(d) for v, d in log.blobs.items() if len(d) > 1}
    assert not reused, f"versions published with different blobs: {reused}"
    assert hashlib.sha256(deployed_blob).hexdigest() in log.blobs[deployed_version]
