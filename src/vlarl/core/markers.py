"""RViz markers for the control loop, as plain data (no ROS): build here, convert in the node.

What is drawn, in frame ``world`` (Meta-World's frame; the robot base sits at its origin):

- ``command``: an arrow from the end effector along the commanded xyz (scaled by
  ``arrow_scale`` metres per unit action); green for a policy command, blue for teleop, red
  while safety holds.
- ``plan``: the planned chunk as a line strip, integrated from the hand position the way
  Meta-World moves the hand (``clip(action, -1, 1) * step_scale`` metres per step, 1/100).
- ``residual``: an arrow from the end effector along this tick's residual xyz.
- ``status``: view-facing text above the hand with value, success and the policy version tag.

A marker whose input is missing (not received yet, or stale) comes back as a ``delete`` so
RViz drops what it showed before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Vec3 = tuple[float, float, float]
RGBA = tuple[float, float, float, float]

ARROW = "arrow"
LINE_STRIP = "line_strip"
TEXT = "text"
NAMESPACES = ("command", "plan", "residual", "status")

COLOR_POLICY: RGBA = (0.1, 0.8, 0.2, 1.0)
COLOR_TELEOP: RGBA = (0.2, 0.4, 1.0, 1.0)
COLOR_HOLD: RGBA = (0.9, 0.1, 0.1, 1.0)
COLOR_PLAN: RGBA = (0.0, 0.8, 0.9, 0.9)
COLOR_RESIDUAL: RGBA = (1.0, 0.55, 0.0, 1.0)
COLOR_TEXT: RGBA = (1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True, slots=True)
class MarkerConfig:
    """How the markers are scaled and styled."""

    frame_id: str = "world"  # frame of every marker
    arrow_scale: float = 0.1  # metres of arrow per unit of action (command and residual)
    step_scale: float = 0.01  # metres the hand moves per unit action per step (Meta-World: 1/100)
    shaft_diameter: float = 0.008  # arrow shaft diameter, m
    head_diameter: float = 0.016  # arrow head diameter, m
    line_width: float = 0.004  # plan line width, m
    text_height: float = 0.03  # text height, m
    text_offset: float = 0.12  # text height above the hand, m
    lifetime_s: float = 1.0  # RViz drops a marker not refreshed for this long (0 = never)


@dataclass(frozen=True, slots=True)
class MarkerSpec:
    """One marker as plain data; :mod:`vlarl.nodes.visualization` turns it into a Marker."""

    ns: str
    id: int
    kind: str  # ARROW | LINE_STRIP | TEXT
    action: str = "add"  # "add" | "delete"
    points: tuple[Vec3, ...] = ()
    position: Vec3 = (0.0, 0.0, 0.0)  # text anchor
    scale: Vec3 = (0.0, 0.0, 0.0)  # per RViz: arrow (shaft, head, 0), line (width, 0, 0), text z
    color: RGBA = COLOR_TEXT
    text: str = ""


@dataclass(frozen=True, slots=True)
class VizInputs:
    """Latest inputs (None = not available): hand xyz, command, plan, residual, reward fields."""

    hand: np.ndarray | None = None  # (3,) end-effector position, m
    command: np.ndarray | None = None  # (4,) dx, dy, dz, gripper
    command_tag: str = ""  # command frame_id: version tag, 'teleop' or 'hold:<reason>'
    plan: np.ndarray | None = None  # (steps, 4) base action chunk, point 0 = this tick
    residual: np.ndarray | None = None  # (steps, 4) residual, point 0 = this tick
    version: str = ""  # policy version tag of the plan
    value: float | None = None
    success: bool | None = None


def _vec(v: np.ndarray) -> Vec3:
    return (float(v[0]), float(v[1]), float(v[2]))


def command_color(tag: str) -> RGBA:
    """Colour of the command arrow by who commanded it."""
    if tag.startswith("hold"):
        return COLOR_HOLD
    if tag == "teleop":
        return COLOR_TELEOP
    return COLOR_POLICY


def integrate_plan(hand: np.ndarray, plan: np.ndarray, step_scale: float) -> np.ndarray:
    """Hand positions along a chunk: [steps + 1, 3], starting at ``hand``."""
    deltas = np.clip(np.asarray(plan, dtype=np.float64)[:, :3], -1.0, 1.0) * step_scale
    path = np.empty((deltas.shape[0] + 1, 3), dtype=np.float64)
    path[0] = hand
    np.cumsum(deltas, axis=0, out=path[1:])
    path[1:] += hand
    return path


def status_text(inputs: VizInputs) -> str:
    value = "n/a" if inputs.value is None else f"{inputs.value:+.2f}"
    success = "n/a" if inputs.success is None else ("yes" if inputs.success else "no")
    lines = [f"value {value}   success {success}"]
    if inputs.version:
        lines.append(inputs.version)
    if inputs.command_tag and inputs.command_tag != inputs.version:
        lines.append(f"command: {inputs.command_tag}")
    return "\n".join(lines)


def _delete(ns: str, kind: str) -> MarkerSpec:
    return MarkerSpec(ns=ns, id=0, kind=kind, action="delete")


def build_markers(inputs: VizInputs, config: MarkerConfig | None = None) -> list[MarkerSpec]:
    """The four markers (or their deletes) for the latest inputs."""
    cfg = config or MarkerConfig()
    hand = None if inputs.hand is None else np.asarray(inputs.hand, dtype=np.float64)[:3]
    arrow_scale = (cfg.shaft_diameter, cfg.head_diameter, 0.0)
    out: list[MarkerSpec] = []

    if hand is not None and inputs.command is not None:
        tip = hand + np.asarray(inputs.command, dtype=np.float64)[:3] * cfg.arrow_scale
        out.append(
            MarkerSpec(
                ns="command",
                id=0,
                kind=ARROW,
                points=(_vec(hand), _vec(tip)),
                scale=arrow_scale,
                color=command_color(inputs.command_tag),
            )
        )
    else:
        out.append(_delete("command", ARROW))

    if hand is not None and inputs.plan is not None and len(inputs.plan) > 0:
        path = integrate_plan(hand, inputs.plan, cfg.step_scale)
        out.append(
            MarkerSpec(
                ns="plan",
                id=0,
                kind=LINE_STRIP,
                points=tuple(_vec(p) for p in path),
                scale=(cfg.line_width, 0.0, 0.0),
                color=COLOR_PLAN,
            )
        )
    else:
        out.append(_delete("plan", LINE_STRIP))

    if hand is not None and inputs.residual is not None and len(inputs.residual) > 0:
        residual = np.asarray(inputs.residual, dtype=np.float64)[0, :3]
        out.append(
            MarkerSpec(
                ns="residual",
                id=0,
                kind=ARROW,
                points=(_vec(hand), _vec(hand + residual * cfg.arrow_scale)),
                scale=arrow_scale,
                color=COLOR_RESIDUAL,
            )
        )
    else:
        out.append(_delete("residual", ARROW))

    if hand is not None:
        anchor = hand + np.array([0.0, 0.0, cfg.text_offset])
        out.append(
            MarkerSpec(
                ns="status",
                id=0,
                kind=TEXT,
                position=_vec(anchor),
                scale=(0.0, 0.0, cfg.text_height),
                color=COLOR_TEXT,
                text=status_text(inputs),
            )
        )
    else:
        out.append(_delete("status", TEXT))
    return out
