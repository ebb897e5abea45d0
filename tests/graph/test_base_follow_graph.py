"""A base swap over DDS: the operator sets the policy's ``model`` to another base, the learner
drops the residual of the old base and a fresh learner trains and publishes on the new one; a
rollback resumes the old base's learner, whose versions continue the one sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_learner_graph import LEARNER, TIMEOUT, Harness, _write_episodes

from model_factory import make_policy
from vlarl.graph import wait_until

pytestmark = pytest.mark.graph

A, B = "graph-policy@1", "graph-policy@2"


def _set_model(h: Harness, path: Path) -> None:
    """``ros2 param set /policy model <path>`` (the policy's set_parameters service)."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    client = h.node.create_client(SetParameters, "/policy/set_parameters")
    assert client.wait_for_service(timeout_sec=10.0)
    request = SetParameters.Request(
        parameters=[Parameter("model", value=str(path)).to_parameter_msg()]
    )
    future = client.call_async(request)
    assert wait_until(future.done, timeout=15.0), "set_parameters timed out"
    assert future.result().results[0].successful, future.result().results[0].reason
    h.node.destroy_client(client)


def _residual_version(tag: str, base: str) -> int | None:
    head, _, rest = tag.partition("+")
    return int(rest.rsplit("@", 1)[1]) if head == base and rest.startswith("residual@") else None


def _acted(h: Harness, base: str, above: int = 0) -> bool:
    return any((v := _residual_version(t, base)) is not None and v > above for t in h.tags[-20:])


def test_base_swap_starts_a_fresh_learner_and_a_rollback_resumes(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    model_a = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "a.onnx")
    model_b = make_policy(model_id="graph-policy", version=2, seed=2).save(tmp_path / "b.onnx")
    replay = tmp_path / "replay"
    checkpoint = tmp_path / "learner.safetensors"
    _write_episodes(replay, tag=A, episodes=4, seed=0)
    start("policy", model=str(model_a), task="pick-place-v3")
    start("safety")
    start(
        "learner",
        base_model=str(model_a),
        replay_dir=str(replay),
        checkpoint=str(checkpoint),
        **LEARNER,
    )
    h = Harness(rclpy_context)
    rng = np.random.default_rng(0)

    def learner_status(s: Harness) -> dict[str, Any]:
        return s.learner[-1] if s.learner else {}

    try:
        # Base A: the policy acts with the learner's residual for A.
        assert h.drive_until(lambda s: _acted(s, A), rng, TIMEOUT), (h.tags[-3:], h.learner[-1:])
        with h.lock:
            version_a = max(v for t in h.tags if (v := _residual_version(t, A)) is not None)
        assert h.drive_until(lambda s: learner_status(s).get("base") == A, rng, TIMEOUT)

        # The operator swaps the base to B: the policy drops A's residual, the learner starts
        # a fresh learner on B, which learns only from B's episodes.
        _set_model(h, model_b)
        assert h.drive_until(lambda s: bool(s.policy) and s.policy[-1]["model"] == B, rng, TIMEOUT)
        assert h.drive_until(lambda s: learner_status(s).get("base") == B, rng, TIMEOUT), h.learner[
            -1:
        ]
        _write_episodes(replay, tag=B, episodes=4, seed=1)
        # The next published blob is B's (the policy installs a residual only of its own base)
        # and its version continues the sequence.
        assert h.drive_until(lambda s: _acted(s, B, above=version_a), rng, TIMEOUT), (
            h.tags[-3:],
            h.learner[-1:],
            h.policy[-1:],
        )
        with h.lock:
            version_b = max(v for t in h.tags if (v := _residual_version(t, B)) is not None)
        # The status is published at its own rate: wait for one from after B's ingestion.
        assert h.drive_until(lambda s: learner_status(s).get("transitions") == 100, rng, TIMEOUT)
        with h.lock:
            status = learner_status(h)
        assert status["bases_seen"] == [A, B] and status["base_switches"] == 1
        assert not status["resumed"] and status["transitions"] == 100
        assert status["foreign_transitions"] >= 100  # A's 4 episodes, at least
        assert f"base {A} -> {B}: residual learner fresh" in status["base_switch"]
        assert checkpoint.with_name(f"learner.{B}.safetensors").exists()

        # Rollback to A: A's learner resumes from its checkpoint; its versions go on above B's.
        _set_model(h, model_a)

        def resumed_on_a(s: Harness) -> bool:
            status = learner_status(s)
            return status.get("base") == A and bool(status.get("resumed"))

        assert h.drive_until(resumed_on_a, rng, TIMEOUT), h.learner[-1:]
        with h.lock:
            status = learner_status(h)
        assert status["version"] >= version_b > version_a  # not restarted at 1
        assert status["base_switches"] == 2 and status["bases_seen"] == [A, B]
        assert f"base {B} -> {A}: residual learner resumed" in status["base_switch"]
        _write_episodes(replay, tag=A, episodes=4, seed=2)
        assert h.drive_until(lambda s: _acted(s, A, above=version_b), rng, TIMEOUT), (
            h.tags[-3:],
            h.learner[-1:],
            h.policy[-1:],
        )
    finally:
        h.close()


def test_a_base_swap_abandons_the_running_trial_without_a_verdict(
    start: Any, rclpy_context: Any, tmp_path: Path
) -> None:
    model_a = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "a.onnx")
    model_b = make_policy(model_id="graph-policy", version=2, seed=2).save(tmp_path / "b.onnx")
    replay = tmp_path / "replay"
    _write_episodes(replay, tag=A, episodes=4, seed=0)
    start("policy", model=str(model_a), task="pick-place-v3")
    start("safety")
    start(
        "learner",
        base_model=str(model_a),
        replay_dir=str(replay),
        checkpoint=str(tmp_path / "learner.safetensors"),
        **{**LEARNER, "gate": "rollouts", "policy_timeout_s": 5.0},
    )
    h = Harness(rclpy_context)
    rng = np.random.default_rng(0)

    def gate(s: Harness) -> dict[str, Any]:
        return s.learner[-1]["gate"] if s.learner else {}

    try:
        # A candidate of A is on trial (loaded on the policy, the deployed zero residual pinned).
        on_trial = h.drive_until(lambda s: gate(s).get("phase") == "trial", rng, TIMEOUT)
        assert on_trial, h.learner[-1:]
        assert gate(h)["candidate"].startswith(f"{A}+residual@")
        _set_model(h, model_b)

        def started_over(s: Harness) -> bool:
            g = gate(s)
            return (
                s.learner[-1]["base"] == B
                and g["phase"] == "idle"
                and g["deployed"] == B  # the zero residual on B
                and g["residual_version"] == 0
            )

        assert h.drive_until(started_over, rng, TIMEOUT), h.learner[-1:]
        with h.lock:
            g = gate(h)
        assert g["verdicts"] == 0 and g["last_verdict"] is None  # nothing was decided
        # B's learner has no episode of B yet (A's are not its data): no candidate of B either.
        assert g["note"] == f"started over on base {B}" and g["candidate"] == ""

        def ingested(s: Harness) -> bool:
            return s.learner[-1]["foreign_transitions"] == 100  # A's 4 episodes, left out

        assert h.drive_until(ingested, rng, TIMEOUT), h.learner[-1:]
        with h.lock:
            assert h.learner[-1]["transitions"] == 0 and gate(h)["candidate"] == ""
    finally:
        h.close()
