"""vlarl: ament_python package (colcon) and a plain pip-installable package (PyPI-only path).

``pip install .`` pulls the runtime dependencies pinned in requirements.txt (one list for
setup.sh, the Dockerfiles and this file). torch==2.13.0 is satisfied by PyTorch's CPU build
(2.13.0+cpu); install that first from https://download.pytorch.org/whl/cpu, or plain PyPI gives
the CUDA build on Linux (see requirements.txt).
"""

from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "vlarl"
HERE = Path(__file__).parent
# colcon --symlink-install runs a symlink to this file from its build folder: the requirement
# files are found beside the real one.
SOURCE = Path(__file__).resolve().parent


def share_files(folder: str, patterns: tuple[str, ...] = ("*",)) -> list[tuple[str, list[str]]]:
    """Install a repository folder under share/vlarl/<folder> for ament's share lookup."""
    root = HERE / folder
    if not root.is_dir():
        return []
    files = sorted(
        str(p.relative_to(HERE)) for pat in patterns for p in root.glob(pat) if p.is_file()
    )
    return [(f"share/{PACKAGE}/{folder}", files)] if files else []


def requirements(name: str) -> list[str]:
    """Pinned requirements of a requirements file (comments and ``-r`` includes skipped)."""
    text = (SOURCE / name).read_text()
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("-")]


NODES = {
    "sim_robot": "vlarl.nodes.sim_robot:main",
    "perception": "vlarl.nodes.perception:main",
    "policy": "vlarl.nodes.policy:main",
    "safety": "vlarl.nodes.safety:main",
    "reward": "vlarl.nodes.reward:main",
    "recorder": "vlarl.nodes.recorder:main",
    "visualization": "vlarl.nodes.visualization:main",
    "bridge": "vlarl.nodes.bridge:main",
    "learner": "vlarl.nodes.learner:main",
}

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Record -> learn -> deploy on ROS 2: one-step distilled policy + residual RL",
    package_dir={"": "src"},
    packages=find_packages(where="src"),
    package_data={PACKAGE: ["py.typed"]},
    python_requires=">=3.11",
    install_requires=requirements("requirements.txt"),
    extras_require={"dev": requirements("requirements-dev.txt")},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        *share_files("launch", ("*.launch.py",)),
        *share_files("config", ("*.yaml",)),
        *share_files("urdf", ("*.urdf",)),
        *share_files("rviz", ("*.rviz",)),
        *share_files("models", ("*.onnx", "*.md", "*.json")),
    ],
    zip_safe=False,
    entry_points={
        "console_scripts": [
            "vlarl = vlarl.cli:main",
            *(f"{name} = {target}" for name, target in NODES.items()),
        ]
    },
)
