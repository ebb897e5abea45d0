"""urdf/sawyer.urdf and rviz/vlarl.rviz: well-formed, and the URDF matches the simulated Sawyer.

The URDF's forward kinematics (computed here from the XML alone) must put the 'hand' link where
MuJoCo puts Meta-World's hand body for the same joint angles: same base pose, offsets, axes.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml

from vlarl.sim.layout import JOINT_NAMES

ROOT = Path(__file__).resolve().parents[1]
URDF = ROOT / "urdf" / "sawyer.urdf"
RVIZ = ROOT / "rviz" / "vlarl.rviz"


def _floats(text: str | None, n: int = 3) -> np.ndarray:
    values = np.array([float(v) for v in (text or "").split()] or [0.0] * n)
    assert values.shape == (n,)
    return values


def _rpy(r: float, p: float, y: float) -> np.ndarray:
    cr, sr, cp, sp, cy, sy = (
        math.cos(r),
        math.sin(r),
        math.cos(p),
        math.sin(p),
        math.cos(y),
        math.sin(y),
    )
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


class Urdf:
    def __init__(self, path: Path) -> None:
        self.root = ET.parse(path).getroot()
        assert self.root.tag == "robot"
        self.links = {link.get("name") for link in self.root.findall("link")}
        self.joints = {}
        for joint in self.root.findall("joint"):
            origin = joint.find("origin")
            axis = joint.find("axis")
            limit = joint.find("limit")
            self.joints[joint.get("name")] = {
                "type": joint.get("type"),
                "parent": joint.find("parent").get("link"),
                "child": joint.find("child").get("link"),
                "xyz": _floats(origin.get("xyz") if origin is not None else None),
                "rpy": _floats(origin.get("rpy") if origin is not None else None),
                "axis": _floats(axis.get("xyz")) if axis is not None else np.array([1.0, 0, 0]),
                "limit": None
                if limit is None
                else (float(limit.get("lower")), float(limit.get("upper"))),
                "effort": None if limit is None else limit.get("effort"),
                "velocity": None if limit is None else limit.get("velocity"),
            }
        self.by_child = {j["child"]: (name, j) for name, j in self.joints.items()}

    def pose(self, link: str, q: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """World pose (R, p) of ``link`` for joint values ``q``."""
        chain = []
        while link in self.by_child:
            name, joint = self.by_child[link]
            chain.append((name, joint))
            link = joint["parent"]
        assert link == "world"
        rot, pos = np.eye(3), np.zeros(3)
        for name, joint in reversed(chain):
            pos = pos + rot @ joint["xyz"]
            rot = rot @ _rpy(*joint["rpy"])
            if joint["type"] == "revolute":
                rot = rot @ _axis_rotation(joint["axis"], q[name])
            elif joint["type"] == "prismatic":
                pos = pos + rot @ (joint["axis"] * q[name])
        return rot, pos


@pytest.fixture(scope="module")
def urdf() -> Urdf:
    return Urdf(URDF)


@pytest.fixture(scope="module")
def sim_model():  # type: ignore[no-untyped-def]
    mujoco = pytest.importorskip("mujoco")
    import metaworld

    xml = Path(metaworld.__file__).parent / "assets" / "sawyer_xyz" / "sawyer_pick_place_v3.xml"
    return mujoco, mujoco.MjModel.from_xml_path(str(xml))


def test_urdf_is_a_tree_rooted_at_world(urdf: Urdf) -> None:
    children = [j["child"] for j in urdf.joints.values()]
    assert len(children) == len(set(children)), "a link with two parents"
    for joint in urdf.joints.values():
        assert joint["parent"] in urdf.links and joint["child"] in urdf.links
    assert urdf.links - set(children) == {"world"}
    assert urdf.by_child["base"][1]["parent"] == "world"
    np.testing.assert_allclose(urdf.by_child["base"][1]["xyz"], 0.0)  # Meta-World's base pose


def test_joint_names_match_the_sim(urdf: Urdf, sim_model) -> None:  # type: ignore[no-untyped-def]
    movable = [n for n, j in urdf.joints.items() if j["type"] != "fixed"]
    assert sorted(movable) == sorted(JOINT_NAMES)
    assert [n for n in movable if n.startswith("right_j")] == [f"right_j{i}" for i in range(7)]
    mujoco, model = sim_model
    for name in JOINT_NAMES:
        joint = urdf.joints[name]
        sim = model.joint(name)
        expected = "revolute" if int(sim.type[0]) == mujoco.mjtJoint.mjJNT_HINGE else "prismatic"
        assert joint["type"] == expected, name
        np.testing.assert_allclose(joint["axis"], sim.axis, err_msg=name)
        np.testing.assert_allclose(joint["limit"], sim.range, err_msg=name)
        assert float(joint["effort"]) > 0 and float(joint["velocity"]) > 0


def test_forward_kinematics_match_mujoco(urdf: Urdf, sim_model) -> None:  # type: ignore[no-untyped-def]
    mujoco, model = sim_model
    data = mujoco.MjData(model)
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = {}
        for name in JOINT_NAMES:
            lo, hi = model.joint(name).range
            q[name] = float(rng.uniform(lo, hi))
            data.qpos[model.joint(name).qposadr[0]] = q[name]
        mujoco.mj_kinematics(model, data)
        for link in ("right_l3", "hand", "rightclaw", "leftclaw"):
            rot, pos = urdf.pose(link, q)
            np.testing.assert_allclose(pos, data.body(link).xpos, atol=1e-6, err_msg=link)
            np.testing.assert_allclose(
                rot, data.body(link).xmat.reshape(3, 3), atol=1e-6, err_msg=link
            )


def test_rviz_config() -> None:
    config = yaml.safe_load(RVIZ.read_text())
    manager = config["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "world"
    displays = {d["Class"]: d for d in manager["Displays"]}
    markers = displays["rviz_default_plugins/MarkerArray"]
    assert markers["Topic"]["Value"] == "/visualization/markers" and markers["Enabled"]
    robot = displays["rviz_default_plugins/RobotModel"]
    assert robot["Description Source"] == "Topic"
    assert robot["Description Topic"]["Value"] == "/robot_description"
    image = displays["rviz_default_plugins/Image"]
    assert image["Topic"]["Value"] == "/camera/image_raw"
    from vlarl.topics import CAMERA_IMAGE, MARKERS

    assert (
        markers["Topic"]["Value"] == "/" + MARKERS and image["Topic"]["Value"] == "/" + CAMERA_IMAGE
    )
