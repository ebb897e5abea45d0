"""perception: camera images and proprioception in, a stamped observation out.

``source: state``: each ``robot/task_state`` sample is published on ``observation`` unchanged
(same vector, same stamp, frame_id ``state``): the simulator's privileged state standing in for a
pose estimator. Control rate.

``source: image``: each ``camera/image_raw`` frame is preprocessed with OpenCV (crop, resize,
normalize per the encoder's metadata), run through the ONNX image encoder (a learned pose
estimator, see models/image_encoder.md), and published as features ++ proprioception with the
image's stamp and frame_id ``image``. Proprioception is the sample with the image's stamp (within
``proprio_max_skew_s``) from ``robot/task_state`` (hand xyz + gripper opening) or
``joint_states`` (9 positions + 9 velocities), or nothing. Camera rate.

Malformed input (wrong length/encoding/size/camera, non-finite numbers) is counted and dropped
with a throttled warning; nothing malformed reaches the observation topic.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from vlarl.rosenv import ensure_local_discovery
from vlarl.sim.layout import JOINT_NAMES, PROPRIO, STATE_DIM
from vlarl.topics import CAMERA_IMAGE, JOINT_STATES, OBSERVATION, TASK_STATE

_NODE_NAME = "perception"
_WARN_THROTTLE_S = 2.0
_REPORT_PERIOD_S = 10.0

PROPRIO_NAMES = {
    "task_state": ("proprio_hand_x", "proprio_hand_y", "proprio_hand_z", "proprio_gripper"),
    "joint_states": tuple(f"{j}_pos" for j in JOINT_NAMES) + tuple(f"{j}_vel" for j in JOINT_NAMES),
    "none": (),
}


def _params() -> list[Any]:
    from vlarl.ros.params import Param

    return [
        Param(
            "source",
            "state",
            "state: pass the privileged task state through; image: "
            "camera frames through the ONNX encoder",
            choices=("state", "image"),
            read_only=True,
        ),
        Param(
            "encoder_path",
            "models/image_encoder.onnx",
            "image source: ONNX image encoder "
            "(relative paths: cwd, then the package); a change reloads it",
        ),
        Param(
            "proprio",
            "task_state",
            "image source: proprioception appended to the features: "
            "task_state (hand xyz + gripper), joint_states (positions + velocities) or none",
            choices=("task_state", "joint_states", "none"),
            read_only=True,
        ),
        Param(
            "proprio_max_skew_s",
            0.0,
            "image source: largest stamp difference between a "
            "frame and its proprioception sample (0: same sample only)",
            low=0.0,
            high=1.0,
        ),
        Param(
            "state_dim",
            STATE_DIM,
            "expected length of robot/task_state",
            low=1,
            high=4096,
            read_only=True,
        ),
        Param(
            "check_camera",
            True,
            "image source: drop frames whose frame_id (camera) or size differ from those the "
            "encoder was trained on",
        ),
        Param(
            "intra_op_threads", 1, "ONNX Runtime intra-op threads", low=1, high=64, read_only=True
        ),
        Param(
            "executor",
            "events",
            "rclpy executor: events (rclpy.experimental.EventsExecutor) "
            "or single (SingleThreadedExecutor)",
            choices=("events", "single"),
            read_only=True,
        ),
    ]


def _build_node_class() -> type:
    from rclpy.clock import Clock as RosClock
    from rclpy.clock import ClockType
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState

    from vlarl.graph import resolve_model_path
    from vlarl.perception.encoder import EncoderError, ImageEncoder
    from vlarl.perception.pairing import StampPairer
    from vlarl.perception.preprocess import PreprocessError, image_to_rgb
    from vlarl.ros.msgs import stamp_to_ns, vector_msg
    from vlarl.ros.params import declare

    class PerceptionNode(Node):
        """Thin ROS adapter: validation, pairing, encoder call, publishing."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(_NODE_NAME, **kwargs)
            self._p = declare(self, _params(), self._on_params)
            qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            self._pub = self.create_publisher(JointState, OBSERVATION, qos)
            self.counters = {"published": 0, "malformed": 0, "unpaired": 0, "superseded": 0}
            self._out = JointState()
            self._encoder: ImageEncoder | None = None
            self._source = self._p["source"]
            if self._source == "state":
                self._out.header.frame_id = "state"
                self.create_subscription(JointState, TASK_STATE, self._on_state, qos)
            else:
                self._encoder = self._load_encoder(self._p["encoder_path"])
                self._proprio = self._p["proprio"]
                self._pairer: StampPairer[Any] = StampPairer(
                    max_skew_ns=round(self._p["proprio_max_skew_s"] * 1e9)
                )
                if self._proprio == "task_state":
                    self.create_subscription(JointState, TASK_STATE, self._on_task_proprio, qos)
                elif self._proprio == "joint_states":
                    self.create_subscription(JointState, JOINT_STATES, self._on_joint_proprio, qos)
                self.create_subscription(Image, CAMERA_IMAGE, self._on_image, QoSProfile(depth=2))
            self._report_mono = time.monotonic()
            self.create_timer(
                _REPORT_PERIOD_S, self._report, clock=RosClock(clock_type=ClockType.STEADY_TIME)
            )
            detail = (
                f", encoder {self._encoder.metadata.tag} ({self._encoder.feature_dim} features, "
                f"camera {self._encoder.metadata.camera or 'any'}), proprio {self._p['proprio']}"
                if self._encoder is not None
                else ""
            )
            self.get_logger().info(f"source {self._source}{detail}")

        # ------------------------------------------------------------------ helpers
        def _load_encoder(self, path: str) -> ImageEncoder:
            return ImageEncoder(
                resolve_model_path(path), intra_op_threads=self._p["intra_op_threads"]
            )

        def _drop(self, what: str, reason: str) -> None:
            self.counters["malformed"] += 1
            self.get_logger().warning(
                f"dropping malformed {what} ({self.counters['malformed']} so far): {reason}",
                throttle_duration_sec=_WARN_THROTTLE_S,
            )

        def _on_params(self, changes: dict[str, Any]) -> str | None:
            if "encoder_path" in changes and self._source == "image":
                try:
                    encoder = self._load_encoder(changes["encoder_path"])
                except EncoderError as exc:
                    return str(exc)
                self._encoder = encoder
                self.get_logger().info(f"encoder {encoder.metadata.tag} loaded")
            if "proprio_max_skew_s" in changes and self._source == "image":
                self._pairer.max_skew_ns = round(changes["proprio_max_skew_s"] * 1e9)
            return None

        # ------------------------------------------------------------------ state source
        def _on_state(self, msg: JointState) -> None:
            values = np.frombuffer(msg.position, dtype=np.float64)
            if values.shape[0] != self._p["state_dim"]:
                self._drop(
                    "task_state", f"expected {self._p['state_dim']} values, got {values.shape[0]}"
                )
                return
            if not np.isfinite(values).all():
                self._drop("task_state", "non-finite value in state")
                return
            out = self._out
            out.header.stamp = msg.header.stamp
            out.position = msg.position
            self._pub.publish(out)
            self.counters["published"] += 1

        # ------------------------------------------------------------------ image source
        def _proprio_vector(self, msg: JointState, *, what: str) -> np.ndarray | None:
            values = np.frombuffer(msg.position, dtype=np.float64)
            if what == "task_state":
                if values.shape[0] != self._p["state_dim"]:
                    self._drop(
                        what, f"expected {self._p['state_dim']} values, got {values.shape[0]}"
                    )
                    return None
                vec = values[PROPRIO].astype(np.float32)
            else:
                velocities = np.frombuffer(msg.velocity, dtype=np.float64)
                n = len(JOINT_NAMES)
                if values.shape[0] != n or velocities.shape[0] != n:
                    self._drop(
                        what,
                        f"expected {n} positions and velocities, got "
                        f"{values.shape[0]} and {velocities.shape[0]}",
                    )
                    return None
                vec = np.concatenate([values, velocities]).astype(np.float32)
            if not np.isfinite(vec).all():
                self._drop(what, "non-finite proprioception")
                return None
            return vec

        def _on_task_proprio(self, msg: JointState) -> None:
            self._add_proprio(msg, "task_state")

        def _on_joint_proprio(self, msg: JointState) -> None:
            self._add_proprio(msg, "joint_states")

        def _add_proprio(self, msg: JointState, what: str) -> None:
            vec = self._proprio_vector(msg, what=what)
            if vec is None:
                return
            done = self._pairer.add_proprio(stamp_to_ns(msg.header.stamp), vec)
            self.counters["unpaired"] = self._pairer.unpaired
            if done is not None:
                _, (frame, stamp), proprio = done
                self._encode_and_publish(frame, stamp, proprio)

        def _on_image(self, msg: Image) -> None:
            encoder = self._encoder
            assert encoder is not None
            try:
                frame = image_to_rgb(
                    height=msg.height,
                    width=msg.width,
                    encoding=msg.encoding,
                    step=msg.step,
                    data=msg.data,
                )
            except PreprocessError as exc:
                self._drop("image", str(exc))
                return
            meta = encoder.metadata
            if self._p["check_camera"]:
                if meta.camera and msg.header.frame_id != meta.camera:
                    self._drop(
                        "image",
                        f"camera {msg.header.frame_id!r} is not the encoder's {meta.camera!r} "
                        "(set check_camera false to accept it)",
                    )
                    return
                if meta.frame_height and (msg.height, msg.width) != (
                    meta.frame_height,
                    meta.frame_width,
                ):
                    self._drop(
                        "image",
                        f"frame size {msg.width}x{msg.height} is not the encoder's "
                        f"{meta.frame_width}x{meta.frame_height} (set check_camera false to "
                        "accept it)",
                    )
                    return
            if self._proprio == "none":
                self._encode_and_publish(frame, msg.header.stamp, np.zeros(0, np.float32))
                return
            # The frame buffer belongs to msg; keep a copy only if it has to wait.
            paired = self._pairer.add_frame(
                stamp_to_ns(msg.header.stamp), (np.array(frame), msg.header.stamp)
            )
            self.counters["superseded"] = self._pairer.superseded
            self.counters["unpaired"] = self._pairer.unpaired
            if paired is None:
                return
            if isinstance(paired, bool):
                self.get_logger().warning(
                    f"no proprioception for a frame ({self.counters['unpaired']} so far)",
                    throttle_duration_sec=_WARN_THROTTLE_S,
                )
                return
            self._encode_and_publish(frame, msg.header.stamp, paired)

        def _encode_and_publish(self, frame: np.ndarray, stamp: Any, proprio: np.ndarray) -> None:
            encoder = self._encoder
            assert encoder is not None
            try:
                features = encoder.encode(frame)
            except (PreprocessError, EncoderError) as exc:
                self._drop("image", str(exc))
                return
            if not np.isfinite(features).all():
                self._drop("image", "encoder returned non-finite features")
                return
            values = np.concatenate([features, proprio]).astype(np.float64)
            out = vector_msg(values, stamp=stamp, frame_id="image")
            out.name = [*encoder.feature_names, *PROPRIO_NAMES[self._proprio]]
            self._pub.publish(out)
            self.counters["published"] += 1

        # ------------------------------------------------------------------ reporting
        def _report(self) -> None:
            self.get_logger().info(
                ", ".join(f"{k} {v}" for k, v in self.counters.items()),
                throttle_duration_sec=_REPORT_PERIOD_S,
            )

    return PerceptionNode


def main(args: list[str] | None = None) -> None:
    ensure_local_discovery()
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from vlarl.ros.executors import make_executor, spin

    rclpy.init(args=args)
    node = None
    executor = None
    try:
        node = _build_node_class()()
        executor = make_executor(node.get_parameter("executor").value)
        executor.add_node(node)
        spin(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, RuntimeError) as exc:  # bad parameters, model or task: say why, exit 1
        print(f"perception: cannot run: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
