"""sim_robot + perception as real processes over DDS, with a test-side command source.

The test node plays policy + safety: it answers every observation with a command carrying the
observation's stamp, so the lockstep loop closes only if stamps survive the whole path.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vlarl.topics import (
    ACTION_NAMES,
    CAMERA_IMAGE,
    CLOCK,
    COMMAND,
    JOINT_STATES,
    OBSERVATION,
    ROBOT_STATUS,
    ROBOT_STATUS_FIELDS,
    SIM_RESET,
    TASK_STATE,
)

pytestmark = pytest.mark.graph

START_TIMEOUT = 40.0  # node start-up (imports, Meta-World build) on a loaded 2-core machine


class Probe:
    """Test-side node: records the robot's topics and answers observations with commands."""

    def __init__(self, context: Any, *, answer: bool = True, action=(0.4, -0.2, 0.1, 0.5)):
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import Image, JointState

        self.node = Node("probe", context=context)
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.command_pub = self.node.create_publisher(JointState, COMMAND, qos)
        self.observations: list[Any] = []
        self.states: list[Any] = []
        self.status: list[Any] = []
        self.images: list[Any] = []
        self.joints: list[Any] = []
        self.clock: list[Any] = []
        self.answer = answer
        self.answered = 0
        self._command = JointState()
        self._command.name = list(ACTION_NAMES)
        self._command.position = list(action)
        self.node.create_subscription(JointState, OBSERVATION, self._on_observation, qos)
        self.answer_states = False  # answer robot/task_state directly (no perception)
        self.node.create_subscription(JointState, TASK_STATE, self._on_state, qos)
        self.node.create_subscription(JointState, ROBOT_STATUS, self.status.append, qos)
        self.node.create_subscription(JointState, JOINT_STATES, self.joints.append, qos)
        self.node.create_subscription(Clock, CLOCK, self.clock.append, qos)
        self.node.create_subscription(Image, CAMERA_IMAGE, self.images.append, QoSProfile(depth=5))
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def _on_state(self, msg: Any) -> None:
        self.states.append(msg)
        if self.answer_states:
            self.send(msg.header.stamp)

    def _on_observation(self, msg: Any) -> None:
        self.observations.append(msg)
        if self.answer:
            self.send(msg.header.stamp)

    def send(self, stamp: Any, values: Any = None) -> None:
        if values is not None:
            from sensor_msgs.msg import JointState

            msg = JointState()
            msg.name = list(ACTION_NAMES)
            msg.position = [float(v) for v in values]
        else:
            msg = self._command
        msg.header.stamp = stamp
        self.command_pub.publish(msg)
        self.answered += 1

    def last(self, field: str) -> float:
        """A field of the newest robot/status message (NaN before the first)."""
        return status_of(self.status[-1])[field] if self.status else float("nan")

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.05)
        return predicate()

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def call(self, srv_type: Any, name: str, request: Any, timeout: float = 20.0) -> Any:
        client: Any = self.node.create_client(srv_type, name)
        assert self.spin_until(client.service_is_ready, timeout), f"{name} not available"
        future = client.call_async(request)
        assert self.spin_until(future.done, timeout), f"{name} did not answer"
        return future.result()

    def set_params(self, node_name: str, **values: Any) -> Any:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request()
        request.parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        return self.call(SetParameters, f"/{node_name}/set_parameters", request).results

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


def ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def status_of(msg: Any) -> dict[str, float]:
    from vlarl.ros.msgs import fields_from_msg

    return fields_from_msg(msg, ROBOT_STATUS_FIELDS)


@pytest.fixture
def probe(rclpy_context):
    p = Probe(rclpy_context)
    yield p
    p.close()


def test_lockstep_loop_closes_through_perception(start, probe):
    sim = start("sim_robot", max_episode_steps=60, camera_rate_hz=0.0, command_source="probe")
    perception = start("perception", source="state")
    assert probe.spin_until(lambda: len(probe.observations) > 0, START_TIMEOUT), "no observation"
    steps = 200
    t0, n0 = time.monotonic(), len(probe.states)
    assert probe.spin_until(lambda: len(probe.states) >= n0 + steps, 60.0), (
        f"loop stalled after {len(probe.states)} samples"
    )
    rate = (len(probe.states) - n0) / (time.monotonic() - t0)
    print(f"\nlockstep sim <-> perception <-> test node: {rate:.0f} steps/s")
    probe.answer = False
    probe.spin_for(0.3)
    assert sim.alive() and perception.alive()

    # Observation = task state, same stamp, frame_id 'state'.
    by_stamp = {ns(m.header.stamp): m for m in probe.states}
    for obs in probe.observations[-50:]:
        state = by_stamp[ns(obs.header.stamp)]
        assert obs.header.frame_id == "state"
        assert list(obs.position) == list(state.position) and len(obs.position) == 39
    # Stamps strictly increase over distinct samples; status shares the state's stamp.
    stamps = [ns(m.header.stamp) for m in probe.states]
    distinct = sorted(set(stamps))
    assert distinct == list(dict.fromkeys(stamps)), "samples out of order"
    status = {ns(m.header.stamp): status_of(m) for m in probe.status}
    assert set(by_stamp) <= set(status)
    # Episodes advance: 60-step episodes truncate, the next starts at step 0.
    records = [status[s] for s in distinct]
    truncated = [r for r in records if r["truncated"] == 1.0]
    assert truncated and all(r["step"] == 60 for r in truncated)
    episodes = sorted({int(r["episode"]) for r in records})
    assert len(episodes) >= 3 and episodes == list(range(episodes[0], episodes[-1] + 1))
    for prev, cur in itertools.pairwise(records):
        if prev["episode"] == cur["episode"]:
            assert cur["step"] == prev["step"] + 1, "stepped without exactly one command"
        else:
            assert prev["truncated"] == 1.0 and cur["step"] == 0
    # The state moves with the commanded direction (+x) inside an episode.
    first = next(i for i, r in enumerate(records) if r["step"] == 0)
    hand0 = np.asarray(by_stamp[distinct[first]].position[:3])
    hand1 = np.asarray(by_stamp[distinct[first + 20]].position[:3])
    assert hand1[0] - hand0[0] > 0.02
    # Joint states and clock ride along with every sample.
    assert probe.joints and len(probe.joints[-1].position) == 9
    assert probe.joints[-1].name[0] == "right_j0" and probe.clock
    # Ctrl-C shuts perception down cleanly; then the test node answers the robot directly.
    assert perception.stop() == 0
    probe.answer_states = True
    probe.send(probe.states[-1].header.stamp)
    t0, n0 = time.monotonic(), len(probe.states)
    probe.spin_for(2.0)
    direct = (len(probe.states) - n0) / (time.monotonic() - t0)
    print(f"lockstep sim <-> test node: {direct:.0f} steps/s")
    assert direct > 20
    assert sim.stop() == 0


def test_lockstep_waits_for_a_matching_valid_command(start, probe):
    probe.answer = False
    start(
        "sim_robot",
        camera_rate_hz=0.0,
        lockstep_timeout_s=0.3,
        use_sim_time=True,
        command_source="probe",
    )
    assert probe.spin_until(lambda: len(probe.states) > 0, START_TIMEOUT)
    probe.spin_for(1.0)
    stamps = {ns(m.header.stamp) for m in probe.states}
    assert len(stamps) == 1, "stepped without a command"
    assert len(probe.states) >= 3, "the unanswered sample is re-published"
    stamp = probe.states[-1].header.stamp
    n = len(probe.states)
    probe.send(stamp, [0.1, 0.2, 0.3])  # wrong length
    probe.send(stamp, [0.0, float("nan"), 0.0, 0.0])  # NaN
    probe.send(stamp, [2.0, 0.0, 0.0, 0.0])  # outside [-1, 1]
    from builtin_interfaces.msg import Time

    probe.send(Time(sec=1, nanosec=0), [0.0, 0.0, 0.0, 0.0])  # stale stamp
    probe.spin_for(0.4)
    assert {ns(m.header.stamp) for m in probe.states} == stamps, "malformed command applied"
    probe.send(stamp, [0.0, 0.0, 0.0, 0.0])
    assert probe.spin_until(lambda: probe.last("step") == 1.0, 10.0)
    assert len({ns(m.header.stamp) for m in probe.states}) == 2 and len(probe.states) > n
    # use_sim_time: stamps are simulated time (ticks x 12.5 ms), the same as /clock.
    assert sorted({ns(m.header.stamp) for m in probe.states}) == [12_500_000, 25_000_000]
    assert probe.spin_until(lambda: ns(probe.clock[-1].clock) == 25_000_000, 5.0)


def test_reset_service_and_task_parameter(start, probe):
    from std_srvs.srv import Trigger

    probe.answer = False
    start("sim_robot", camera_rate_hz=0.0, command_source="probe")
    assert probe.spin_until(lambda: len(probe.states) > 0, START_TIMEOUT)
    for k in range(1, 4):  # three steps by hand
        probe.send(probe.states[-1].header.stamp)
        assert probe.spin_until(lambda k=k: probe.last("step") == k, 10.0)

    response = probe.call(Trigger, SIM_RESET, Trigger.Request())
    assert response.success and "truncated" in response.message, response.message
    assert probe.spin_until(lambda: probe.last("episode") == 1.0, 10.0)
    flagged = status_of(probe.status[-2])
    assert flagged["episode"] == 0.0 and flagged["truncated"] == 1.0 and flagged["step"] == 3.0
    assert status_of(probe.status[-1])["step"] == 0.0

    bad = probe.set_params("sim_robot", task="pick-plce-v3")
    assert not bad[0].successful and "pick-place-v3" in bad[0].reason
    assert probe.states[-1].header.frame_id == "pick-place-v3"
    good = probe.set_params("sim_robot", task="reach-v3")
    assert good[0].successful, good[0].reason
    assert probe.spin_until(lambda: probe.states[-1].header.frame_id == "reach-v3", 10.0)
    assert probe.spin_until(lambda: probe.last("episode") == 2.0, 10.0)
    bad_camera = probe.set_params("sim_robot", camera_name="nowhere")
    assert not bad_camera[0].successful and "corner2" in bad_camera[0].reason


def test_camera_rate_and_image_perception(start, probe):
    rate = 2.0  # low enough that a loaded 2-core machine renders every frame (~0.1-0.5 s each)
    start("sim_robot", camera_rate_hz=rate, mode="realtime", command_source="probe")
    start("perception", source="image")
    probe.answer = False
    assert probe.spin_until(lambda: len(probe.images) >= 2, START_TIMEOUT), "no camera images"
    n0, t0 = len(probe.images), time.monotonic()
    probe.spin_for(3.0)
    measured = (len(probe.images) - n0) / (time.monotonic() - t0)
    print(f"\ncamera: {measured:.1f} frames/s at camera_rate_hz {rate}")
    assert 0.4 * rate <= measured <= 1.4 * rate
    image = probe.images[-1]
    assert (image.encoding, image.height, image.width, image.step) == ("rgb8", 84, 84, 252)
    assert image.header.frame_id == "corner3" and len(image.data) == 84 * 84 * 3
    state_stamps = {ns(m.header.stamp): m for m in probe.states}
    assert ns(image.header.stamp) in state_stamps, "image stamp is not a sample's stamp"

    # Realtime mode: the robot steps on its own timer (holding without commands) ...
    steps = [status_of(m)["step"] + 1000 * status_of(m)["episode"] for m in probe.status]
    assert steps[-1] - steps[0] > 40
    # ... and applies fresh commands: stream +y commands for a second.
    y0 = probe.states[-1].position[1]
    first_new = len(probe.states)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        probe.send(probe.states[-1].header.stamp, [0.0, 1.0, 0.0, -1.0])
        probe.spin_for(0.02)
    # The furthest +y reached: an episode may end (and the arm reset) inside the window.
    reached = max((m.position[1] for m in probe.states[first_new:]), default=y0)
    assert reached - y0 > 0.05, "realtime mode did not apply commands"

    assert probe.spin_until(lambda: len(probe.observations) >= 3, 30.0), "no image observations"
    obs = probe.observations[-1]
    assert obs.header.frame_id == "image" and len(obs.position) == 14
    assert list(obs.name[:3]) == ["hand_x", "hand_y", "hand_z"]
    assert ns(obs.header.stamp) in {ns(m.header.stamp) for m in probe.images}
    state_stamps = {ns(m.header.stamp): m for m in probe.states}
    state = np.asarray(state_stamps[ns(obs.header.stamp)].position)
    estimate = np.asarray(obs.position)
    assert np.allclose(estimate[10:14], state[:4])  # proprioception of the same sample
    assert np.abs(estimate[:3] - state[:3]).max() < 0.06, "hand estimate far from the truth"

    # Lockstep with a frame per sample: image observations close the loop.
    results = probe.set_params("sim_robot", mode="lockstep", camera_every_sample=True)
    assert all(r.successful for r in results)
    probe.answer = True
    n_obs, t0 = len(probe.observations), time.monotonic()
    assert probe.spin_until(
        lambda: len({ns(m.header.stamp) for m in probe.observations[n_obs:]}) >= 8, 30.0
    )
    print(f"lockstep on image observations: {8 / (time.monotonic() - t0):.1f} steps/s")
    probe.answer = False
    probe.spin_for(0.3)
    answered = {ns(m.header.stamp) for m in probe.observations[n_obs:]}
    image_stamps = {ns(m.header.stamp) for m in probe.images}
    assert answered <= image_stamps
    stepped = [s for s in {ns(m.header.stamp) for m in probe.states} if s > min(answered)]
    assert len(stepped) >= 7, "lockstep did not advance on image observations"


def _publishers(probe: Probe) -> tuple[Any, Any]:
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState

    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    return (
        probe.node.create_publisher(JointState, TASK_STATE, qos),
        probe.node.create_publisher(Image, CAMERA_IMAGE, QoSProfile(depth=2)),
    )


def _state_msg(stamp_ns: int, values: Any) -> Any:
    from vlarl.ros.msgs import ns_to_stamp, vector_msg

    return vector_msg(values, stamp=ns_to_stamp(stamp_ns), frame_id="pick-place-v3")


def test_perception_state_path_drops_malformed_states(start, probe):
    probe.answer = False
    state_pub, _ = _publishers(probe)
    start("perception", source="state")
    good = np.linspace(-0.5, 0.5, 39)

    def valid_state_answered() -> bool:
        state_pub.publish(_state_msg(1_000, good))  # repeated until perception is up and matched
        return bool(probe.observations)

    assert probe.spin_until(valid_state_answered, START_TIMEOUT), "no observation from a state"
    bad = good.copy()
    bad[7] = np.nan
    for stamp, values in ((2_000, bad), (3_000, good[:20]), (4_000, good)):
        state_pub.publish(_state_msg(stamp, values))
    assert probe.spin_until(lambda: ns(probe.observations[-1].header.stamp) == 4_000, 10.0)
    stamps = {ns(m.header.stamp) for m in probe.observations}
    assert 2_000 not in stamps and 3_000 not in stamps
    assert np.allclose(probe.observations[-1].position, good)


def test_perception_image_path_pairs_by_stamp_and_drops_malformed_frames(start, probe):
    from sensor_msgs.msg import Image

    from vlarl.ros.msgs import ns_to_stamp

    probe.answer = False
    state_pub, image_pub = _publishers(probe)
    start("perception", source="image", proprio="task_state")
    frame = np.random.default_rng(0).integers(0, 256, size=(84, 84, 3), dtype=np.uint8)
    state = np.zeros(39)

    def image(stamp_ns: int, *, encoding="rgb8", size=84, camera="corner3") -> Image:
        msg = Image()
        msg.header.stamp = ns_to_stamp(stamp_ns)
        msg.header.frame_id = camera
        msg.height = msg.width = size
        msg.encoding = encoding
        msg.step = size * 3
        msg.data = frame[:size, :size].tobytes()
        return msg

    def send(stamp_ns: int, **kwargs: Any) -> None:
        state[:4] = [stamp_ns * 1e-6, 0.6, 0.2, 1.0]
        state_pub.publish(_state_msg(stamp_ns, state))
        image_pub.publish(image(stamp_ns, **kwargs))

    def valid_frame_answered() -> bool:
        send(1_000_000)  # repeated until perception is up and matched
        return bool(probe.observations)

    assert probe.spin_until(valid_frame_answered, START_TIMEOUT), "no observation from a frame"
    send(2_000_000, encoding="mono8")
    send(3_000_000, size=64)
    send(4_000_000, camera="corner")
    state_pub.publish(_state_msg(5_000_000, np.full(39, np.nan)))  # NaN proprioception
    probe.spin_for(0.2)
    image_pub.publish(image(5_000_000))
    probe.spin_for(0.5)
    send(6_000_000)
    assert probe.spin_until(lambda: ns(probe.observations[-1].header.stamp) == 6_000_000, 10.0)
    stamps = {ns(m.header.stamp) for m in probe.observations}
    assert stamps & {2_000_000, 3_000_000, 4_000_000, 5_000_000} == set()
    obs = probe.observations[-1]
    assert obs.header.frame_id == "image" and len(obs.position) == 14
    assert np.all(np.isfinite(obs.position))
    assert np.allclose(obs.position[10:14], [6.0, 0.6, 0.2, 1.0])  # the same sample's proprio
    refused = probe.set_params("perception", encoder_path="/nonexistent/encoder.onnx")
    assert not refused[0].successful and "not found" in refused[0].reason
