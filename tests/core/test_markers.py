"""Marker building as plain data; plan integration checked against Meta-World's own motion."""

from __future__ import annotations

import numpy as np
import pytest

from vlarl.core.markers import (
    ARROW,
    COLOR_HOLD,
    COLOR_POLICY,
    COLOR_TELEOP,
    LINE_STRIP,
    TEXT,
    MarkerConfig,
    VizInputs,
    build_markers,
    command_color,
    integrate_plan,
    status_text,
)

HAND = np.array([0.05, 0.6, 0.2])


def by_ns(markers):
    return {m.ns: m for m in markers}


def test_all_markers_from_full_inputs() -> None:
    plan = np.tile([1.0, -0.5, 0.0, 1.0], (5, 1))
    residual = np.zeros((5, 4))
    residual[0] = [0.1, 0.0, -0.2, 0.0]
    inputs = VizInputs(
        hand=HAND,
        command=np.array([0.5, 0.0, -1.0, 1.0]),
        command_tag="student@3+residual@7",
        plan=plan,
        residual=residual,
        version="student@3+residual@7",
        value=0.25,
        success=False,
    )
    cfg = MarkerConfig(arrow_scale=0.2, step_scale=0.01)
    markers = by_ns(build_markers(inputs, cfg))
    assert set(markers) == {"command", "plan", "residual", "status"}
    assert all(m.action == "add" for m in markers.values())

    cmd = markers["command"]
    assert cmd.kind == ARROW and cmd.color == COLOR_POLICY
    np.testing.assert_allclose(cmd.points[0], HAND)
    np.testing.assert_allclose(cmd.points[1], HAND + np.array([0.1, 0.0, -0.2]))

    line = markers["plan"]
    assert line.kind == LINE_STRIP and len(line.points) == 6
    np.testing.assert_allclose(line.points[0], HAND)
    np.testing.assert_allclose(line.points[-1], HAND + 5 * np.array([0.01, -0.005, 0.0]))

    res = markers["residual"]
    np.testing.assert_allclose(res.points[1], HAND + np.array([0.02, 0.0, -0.04]))

    text = markers["status"]
    assert text.kind == TEXT
    assert "value +0.25" in text.text and "success no" in text.text
    assert "student@3+residual@7" in text.text and "command:" not in text.text
    np.testing.assert_allclose(text.position, HAND + np.array([0.0, 0.0, cfg.text_offset]))
    assert text.scale[2] == cfg.text_height


def test_missing_inputs_become_deletes() -> None:
    markers = by_ns(build_markers(VizInputs()))
    assert all(m.action == "delete" for m in markers.values())
    markers = by_ns(build_markers(VizInputs(hand=HAND, value=None, success=True)))
    assert markers["status"].action == "add" and "value n/a" in markers["status"].text
    assert markers["status"].text.startswith("value n/a   success yes")
    for ns in ("command", "plan", "residual"):
        assert markers[ns].action == "delete"


def test_command_colours_and_text() -> None:
    assert command_color("hold:watchdog") == COLOR_HOLD
    assert command_color("teleop") == COLOR_TELEOP
    assert command_color("m@1+r@0") == COLOR_POLICY
    text = status_text(VizInputs(value=-1.0, success=True, version="m@1", command_tag="hold:estop"))
    assert text.splitlines() == ["value -1.00   success yes", "m@1", "command: hold:estop"]


def test_plan_is_clipped_like_the_simulator() -> None:
    path = integrate_plan(np.zeros(3), np.array([[3.0, -3.0, 0.5, 0.0]] * 2), 0.01)
    np.testing.assert_allclose(path, [[0, 0, 0], [0.01, -0.01, 0.005], [0.02, -0.02, 0.01]])


def test_step_scale_matches_meta_world_hand_motion() -> None:
    """Meta-World moves its mocap target by clip(a)*action_scale per step: so does the plan."""
    gym = pytest.importorskip("gymnasium")
    import metaworld  # noqa: F401

    env = gym.make("Meta-World/MT1", env_name="pick-place-v3", seed=0)
    env.reset(seed=0)
    sim = env.unwrapped
    assert MarkerConfig().step_scale == pytest.approx(sim.action_scale)
    rng = np.random.default_rng(0)
    plan = rng.uniform(-0.8, 0.8, size=(6, 4))
    start = sim.data.mocap_pos[0].copy()
    targets = [start.copy()]
    for action in plan:
        env.step(action.astype(np.float32))
        targets.append(sim.data.mocap_pos[0].copy())
    env.close()
    np.testing.assert_allclose(
        integrate_plan(start, plan, MarkerConfig().step_scale), np.array(targets), atol=1e-6
    )
