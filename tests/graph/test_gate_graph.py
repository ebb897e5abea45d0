"""The deployment gate over DDS (issue 11, part 6): the real learner pins the real policy to the
deployed version, publishes a candidate that the policy loads but does not act with, switches
arms at episode ends, judges the episodes of the replay by the version that acted, and publishes
its verdict on learner/gate; without the policy's parameter service it publishes nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_learner_graph import ACT_DIM, LEARNER, OBS_DIM, TIMEOUT, Harness, _write_episodes

from model_factory import make_policy
from vlarl.bag.reader import read_messages
from vlarl.data.replay import ReplayWriter, Transitions
from vlarl.graph import wait_until
from vlarl.topics import EPISODE, LEARNER_GATE

pytestmark = pytest.mark.graph

GATED = {
    **LEARNER,
    "gate": "rollouts",
    # 3/3 against 0/3 is P(better) 0.986 >= 1 - 0.05/2: promoted at the first look.
    "min_episodes": 3,
    "look_every": 1,
    "max_episodes": 4,
    "policy_timeout_s": 5.0,
}


def _write_outcomes(replay: Path, *, tag: str, successes: list[bool], seed: int) -> None:
    """Episodes acted by ``tag`` alone, with the given success flags."""
    rng = np.random.default_rng(seed)
    with ReplayWriter(replay, source="test", tasks=["pick-place-v3"]) as writer:
        for ok in successes:
            n = 20
            obs = rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
            base = rng.uniform(-0.5, 0.5, size=(n, ACT_DIM)).astype(np.float32)
            flag = np.zeros(n, np.uint8)
            flag[-1] = int(ok)
            data = Transitions.build(
                obs=obs[:-1],
                next_obs=obs[1:],
                action=base,
                base_action=base,
                reward=flag.astype(np.float32),
                terminal=flag,
                truncated=1 - flag,
                success=flag,
            )
            writer.add_episode(data, task="pick-place-v3", version=tag)


class GateHarness(Harness):
    """The learner test's harness, plus learner/gate and episode ends."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        self.verdicts: list[dict[str, Any]] = []
        qos = QoSProfile(
            depth=20,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        self.node.create_subscription(String, LEARNER_GATE, self._on_gate, qos)
        self.episode_pub = self.node.create_publisher(String, EPISODE, 10)
        self.episode = 0

    def _on_gate(self, msg: Any) -> None:
        with self.lock:
            self.verdicts.append(json.loads(msg.data))

    def end_episode(self) -> None:
        from std_msgs.msg import String

        self.episode += 1
        self.episode_pub.publish(String(data=json.dumps({"episode": self.episode})))


def test_candidate_is_loaded_but_pinned_out_until_the_gate_promotes_it(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    model = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "base.onnx")
    replay = tmp_path / "replay"
    checkpoint = tmp_path / "learner.safetensors"
    base = "graph-policy@1"
    _write_episodes(replay, tag=base, episodes=4, seed=0)
    recorder = start("recorder", output_dir=str(tmp_path), bag_name="run", fsync=False)
    start("policy", model=str(model), task="pick-place-v3")
    start("safety")  # the learner publishes only once safety's delta equals its own
    start(
        "learner",
        base_model=str(model),
        replay_dir=str(replay),
        checkpoint=str(checkpoint),
        **GATED,
    )
    h = GateHarness(rclpy_context)
    rng = np.random.default_rng(0)
    try:
        # The policy has checked and loaded a candidate; the gate's trial runs.
        def loaded(s: Harness) -> bool:
            return (
                bool(s.learner and s.policy)
                and s.learner[-1]["gate"]["phase"] == "trial"
                and bool(s.policy[-1]["residual_history"])
            )

        assert h.drive_until(loaded, rng, TIMEOUT), (h.learner[-1:], h.policy[-1:])
        with h.lock:
            gate = h.learner[-1]["gate"]
            candidate = gate["candidate"]
            version = int(candidate.rsplit("@", 1)[1])
            assert candidate == f"{base}+residual@{version}"
            assert gate["deployed"] == base and gate["residual_version"] == 0
            assert version in h.policy[-1]["residual_history"]
            h.tags.clear()
        # Pinned to the deployed version (the zero residual): the candidate does not act.
        time.sleep(0.5)
        assert h.drive_until(lambda s: len(s.tags) >= 50, rng, 10.0)
        with h.lock:
            assert set(h.tags) == {base}, set(h.tags)
            assert h.policy[-1]["residual_version"] == 0
            assert h.learner[-1]["published"] == 0  # nothing deployed before a verdict
            assert not h.verdicts

        # An episode ends: the candidate acts in the next one.
        h.end_episode()
        assert h.drive_until(lambda s: bool(s.tags) and s.tags[-1] == candidate, rng, 10.0), h.tags[
            -3:
        ]

        # The replay shows the candidate succeeding where the deployed version fails, and a
        # failed episode of another version, which the gate ignores (else no 3 of 3).
        _write_outcomes(replay, tag=candidate, successes=[True] * 3, seed=1)
        _write_outcomes(replay, tag=f"{base}+residual@999", successes=[False], seed=2)
        _write_outcomes(replay, tag=base, successes=[False] * 3, seed=3)
        assert h.drive_until(lambda s: bool(s.verdicts), rng, TIMEOUT), h.learner[-1:]
        with h.lock:
            verdict = h.verdicts[0]
        assert verdict["accepted"] and verdict["candidate"] == candidate
        assert verdict["deployed"] == base
        assert (verdict["candidate_episodes"], verdict["candidate_successes"]) == (3, 3)
        assert (verdict["deployed_episodes"], verdict["deployed_successes"]) == (3, 0)
        assert verdict["probability"] >= verdict["threshold"]

        # Promoted: persisted, deployed in the learner's books, pinned on the policy.
        assert wait_until(
            lambda: (
                h.learner[-1]["deployed_version"] == version
                and h.policy[-1]["residual_version"] == version
            ),
            timeout=10.0,
        ), (h.learner[-1:], h.policy[-1:])
        assert checkpoint.with_suffix(".deployed.safetensors").exists()
        assert h.learner[-1]["gate"]["verdicts"] >= 1
        assert recorder.stop(timeout=10.0) == 0
    finally:
        h.close()
    # The verdict is in the bag.
    from rclpy.serialization import deserialize_message
    from std_msgs.msg import String

    recorded = [
        json.loads(deserialize_message(m.data, String).data)
        for m in read_messages(tmp_path / "run", topics=["/" + LEARNER_GATE])
    ]
    assert recorded[:1] == [verdict]


def test_learner_publishes_no_candidate_without_the_policy_parameter_service(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    model = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "base.onnx")
    replay = tmp_path / "replay"
    _write_episodes(replay, tag="graph-policy@1", episodes=4, seed=0)
    start("safety")
    start(
        "learner",
        base_model=str(model),
        replay_dir=str(replay),
        checkpoint=str(tmp_path / "learner.safetensors"),
        **GATED,
    )
    h = GateHarness(rclpy_context)
    try:
        # It trains past several proposal points, but proposes and publishes nothing.
        assert wait_until(
            lambda: bool(h.learner) and h.learner[-1]["updates"] >= 2 * GATED["publish_every"],
            timeout=TIMEOUT,
        ), h.learner[-1:]
        time.sleep(1.0)
        status = h.learner[-1]
        assert status["version"] == 0 and status["published"] == 0
        assert "/policy/set_parameters is not reachable" in status["gate"]["note"]
        assert status["gate"]["phase"] == "idle" and not h.verdicts
    finally:
        h.close()


def test_a_candidate_the_policy_refuses_ends_its_trial_refused(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    model = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "base.onnx")
    replay = tmp_path / "replay"
    _write_episodes(replay, tag="graph-policy@1", episodes=4, seed=0)
    start("policy", model=str(model), task="pick-place-v3", max_blob_bytes=256)
    start("safety")
    start(
        "learner",
        base_model=str(model),
        replay_dir=str(replay),
        checkpoint=str(tmp_path / "learner.safetensors"),
        **GATED,
    )
    h = GateHarness(rclpy_context)
    rng = np.random.default_rng(0)
    try:
        assert h.drive_until(lambda s: bool(s.verdicts), rng, TIMEOUT), h.learner[-1:]
        with h.lock:
            verdict = h.verdicts[0]
            tags = set(h.tags)
        assert not verdict["accepted"] and verdict["deployed"] == "graph-policy@1"
        assert "the policy refused the candidate's blob" in verdict["reason"]
        assert "max_blob_bytes" in verdict["reason"]
        assert verdict["candidate_episodes"] == verdict["deployed_episodes"] == 0
        assert tags == {"graph-policy@1"}  # nothing but the deployed version ever acted
        assert wait_until(
            lambda: (
                h.learner[-1]["gate"]["verdicts"] >= 1
                and h.learner[-1]["deployed_version"] == 0
                and h.policy[-1]["residual_version"] == 0
            ),
            timeout=10.0,
        ), (h.learner[-1:], h.policy[-1:])
    finally:
        h.close()
