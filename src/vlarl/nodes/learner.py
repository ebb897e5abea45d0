"""learner node: replay shards (from the bag bridge) -> residual SAC/RLPD -> policy_weights.

A thin adapter over :class:`vlarl.learning.learner.ResidualLearner`. A worker thread ingests
the shards the bridge writes into ``replay_dir``, runs ``utd`` updates per new transition,
proposes a candidate every ``publish_every`` updates, and publishes each candidate the gate
accepts on ``policy_weights`` (std_msgs/UInt8MultiArray; reliable, transient local, so a policy
node that starts later still gets the newest version). It checkpoints after every published
version and on shutdown; restarted on the same ``checkpoint`` and ``replay_dir`` it resumes and
re-publishes the deployed version.

One version, one blob, across crashes: an accepted candidate's blob is persisted (``<checkpoint
stem>.deployed.safetensors``, atomic + fsync), then the checkpoint is saved, and only then is the
blob published. On start, a persisted deployed blob is re-published byte for byte and its version
counts as spent even when the checkpoint is older (killed between the two writes), so the next
candidate gets a higher version. It needs no simulator and no robot: it can run on another
machine of the same ROS 2 network, reading a replay folder the bridge fills there.
"""

from __future__ import annotations

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from rclpy.node import Node  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from std_msgs.msg import String, UInt8MultiArray  # noqa: E402

from vlarl import topics  # noqa: E402
from vlarl.contract import ContractError  # noqa: E402
from vlarl.core.onnx_policy import OnnxPolicy  # noqa: E402
from vlarl.core.weights import WeightError, decode_residual  # noqa: E402
from vlarl.data.replay import atomic_write_bytes  # noqa: E402
from vlarl.graph import resolve_model_path  # noqa: E402
from vlarl.learning.errors import LearningError  # noqa: E402
from vlarl.learning.learner import LearnerConfig, ResidualLearner  # noqa: E402
from vlarl.ros.params import Param, declare  # noqa: E402

WEIGHTS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)

PARAMS: tuple[Param, ...] = (
    Param(
        "base_model",
        "models/pick-place-v3-student.onnx",
        "the frozen base policy the residual corrects (its tag goes into every blob)",
        read_only=True,
    ),
    Param("replay_dir", "replay/live", "replay folder the bag bridge writes", read_only=True),
    Param(
        "checkpoint",
        "runs/learner/learner.safetensors",
        "learner checkpoint (resumed from when it exists)",
        read_only=True,
    ),
    Param("model_id", "residual", "model id of the published residual actor", read_only=True),
    Param(
        "delta", 0.3, "residual bound (the safety node's delta)", low=0.0, high=1.0, read_only=True
    ),
    Param("utd", 2, "critic updates per ingested transition", low=1, high=64),
    Param("critics", 4, "critic ensemble size", low=2, high=32, read_only=True),
    Param("hidden", 128, "hidden width of actor and critics", low=8, high=4096, read_only=True),
    Param("batch_size", 128, "transitions per update", low=2, high=65536, read_only=True),
    Param(
        "probe_transitions",
        1000,
        "transitions before the first non-zero residual",
        low=0,
        high=10**9,
    ),
    Param(
        "warmup_ramp",
        2000,
        "transitions over which the residual bound ramps to delta",
        low=0,
        high=10**9,
    ),
    Param("publish_every", 500, "updates between candidate versions", low=1, high=10**9),
    Param(
        "gate",
        "critic",
        "critic: publish only if not worse than deployed; none: always",
        choices=("critic", "none"),
    ),
    Param("gate_tolerance", 0.02, "allowed drop of the critic's estimate", low=0.0, high=1e6),
    Param("poll_period_s", 0.5, "how often the replay folder is polled", low=0.01, high=60.0),
    Param("seed", 0, "agent seed", low=0, high=2**31 - 1, read_only=True),
    Param("status_rate_hz", 1.0, "rate of learner/status", low=0.1, high=50.0),
    Param("threads", 1, "torch threads", low=1, high=64, read_only=True),
)


class LearnerNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("learner", **kwargs)
        self._p = declare(self, PARAMS, self._on_change)
        import torch

        torch.set_num_threads(int(self._p["threads"]))
        path = resolve_model_path(str(self._p["base_model"]))
        try:
            base = OnnxPolicy.load(path, providers="cpu").metadata
        except ContractError as exc:
            raise ValueError(f"base_model {path}: {exc}") from None
        config = LearnerConfig(
            replay_dir=str(self._p["replay_dir"]),
            checkpoint=str(self._p["checkpoint"]),
            model_id=str(self._p["model_id"]),
            delta=float(self._p["delta"]),
            utd=int(self._p["utd"]),
            critics=int(self._p["critics"]),
            hidden=int(self._p["hidden"]),
            batch_size=int(self._p["batch_size"]),
            probe_transitions=int(self._p["probe_transitions"]),
            warmup_ramp=int(self._p["warmup_ramp"]),
            publish_every=int(self._p["publish_every"]),
            gate=str(self._p["gate"]),
            gate_tolerance=float(self._p["gate_tolerance"]),
            seed=int(self._p["seed"]),
        )
        try:
            self.learner = ResidualLearner(config, base=base)
        except LearningError as exc:
            raise ValueError(str(exc)) from None
        self._deployed_path = Path(config.checkpoint).with_suffix(".deployed.safetensors")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._weights_pub = self.create_publisher(
            UInt8MultiArray, topics.POLICY_WEIGHTS, WEIGHTS_QOS
        )
        self._status_pub = self.create_publisher(String, topics.LEARNER_STATUS, 10)
        self.create_timer(1.0 / float(self._p["status_rate_hz"]), self._publish_status)
        if self._deployed_path.exists():
            self._republish_deployed()
        self.get_logger().info(
            f"learner for {base.tag}: replay {config.replay_dir}, checkpoint "
            f"{config.checkpoint} ({'resumed' if self.learner.resumed else 'new'})"
        )
        self._worker = threading.Thread(target=self._work, name="learner", daemon=True)
        self._worker.start()

    def _on_change(self, changes: dict[str, Any]) -> str | None:
        if hasattr(self, "learner"):
            with self._lock:
                cfg = self.learner.config
                for key in (
                    "utd",
                    "probe_transitions",
                    "warmup_ramp",
                    "publish_every",
                    "gate",
                    "gate_tolerance",
                ):
                    if key in changes:
                        setattr(cfg, key, changes[key])
        return None

    def _republish_deployed(self) -> None:
        try:
            blob = self._deployed_path.read_bytes()
            weights = decode_residual(blob)
        except (OSError, WeightError) as exc:
            self.get_logger().warning(f"no deployed version to re-publish: {exc}")
            return
        if weights.model_id != self.learner.config.model_id:
            self.get_logger().warning(
                f"{self._deployed_path} holds {weights.tag}, not a {self.learner.config.model_id} "
                "version: not re-published"
            )
            return
        self.learner.adopt_deployed(
            weights.version, [(w.copy(), b.copy()) for w, b in weights.layers], weights.scale
        )
        self._publish_blob(blob)
        self.get_logger().info(f"re-published deployed {weights.tag}")

    def _publish_blob(self, blob: bytes) -> None:
        msg = UInt8MultiArray()
        msg.data = blob  # bytes are accepted for uint8[] fields
        self._weights_pub.publish(msg)

    def _work(self) -> None:
        learner = self.learner
        since_propose = 0
        while not self._stop.is_set():
            with self._lock:
                added = learner.ingest()
                ran = learner.train(max_updates=50)
            since_propose += ran
            if since_propose >= learner.config.publish_every:
                since_propose = 0
                with self._lock:
                    candidate = learner.propose()
                if candidate is not None and candidate.blob is not None:
                    # persist before publishing: a crash in between re-publishes this very blob
                    atomic_write_bytes(self._deployed_path, candidate.blob, overwrite=True)
                    with self._lock:
                        learner.save()
                    self._publish_blob(candidate.blob)
                    self.get_logger().info(
                        f"published {learner.config.model_id}@{candidate.version} (parent "
                        f"{candidate.parent}, estimate {candidate.estimate:.3f} vs deployed "
                        f"{candidate.deployed_estimate:.3f}, {learner.state.env_steps} steps)"
                    )
                elif candidate is not None:
                    self.get_logger().info(
                        f"gated candidate {candidate.version}: estimate "
                        f"{candidate.estimate:.3f} < deployed {candidate.deployed_estimate:.3f}"
                    )
            if not added and not ran:
                self._stop.wait(float(self._p["poll_period_s"]))

    def _publish_status(self) -> None:
        with self._lock:
            text = self.learner.status_json()
        self._status_pub.publish(String(data=text))

    def shutdown(self) -> None:
        self._stop.set()
        self._worker.join(timeout=10.0)
        with self._lock:
            try:
                self.learner.save()
            except Exception as exc:  # report; the last published checkpoint stays
                print(f"learner: final checkpoint failed: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    from vlarl.ros.executors import run_node

    return run_node(LearnerNode, name="learner", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
