"""The node graph, described once, for both ways of running it.

``launch/bringup.launch.py`` (ROS 2 install) and ``vlarl bringup`` (PyPI-only) both read
:data:`GRAPH` and the same per-node parameter files under ``config/``, so the two cannot drift.
Each node runs as its own process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vlarl.rosenv import child_env

PACKAGE = "vlarl"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node of the graph: its name, console script (== ROS executable) and module."""

    name: str
    module: str
    description: str

    @property
    def executable(self) -> str:
        return self.name

    @property
    def params_file(self) -> str:
        return f"{self.name}.yaml"


GRAPH: tuple[NodeSpec, ...] = (
    NodeSpec("sim_robot", "vlarl.nodes.sim_robot", "Meta-World task as a robot"),
    NodeSpec("perception", "vlarl.nodes.perception", "images/state -> stamped observation"),
    NodeSpec("policy", "vlarl.nodes.policy", "one-step ONNX policy + residual slot"),
    NodeSpec("safety", "vlarl.nodes.safety", "clamp, limits, watchdog, e-stop: the command"),
    NodeSpec("reward", "vlarl.nodes.reward", "reward, success, episode boundaries"),
    NodeSpec("recorder", "vlarl.nodes.recorder", "control-path topics -> rosbag2 (mcap)"),
    NodeSpec("visualization", "vlarl.nodes.visualization", "MarkerArray for RViz"),
)
# The self-improvement loop, started on request (``vlarl bringup --learn``, ``learn:=true``);
# the learner can as well run on another machine of the same ROS 2 network.
LEARNING: tuple[NodeSpec, ...] = (
    NodeSpec("bridge", "vlarl.nodes.bridge", "closed bag splits -> replay shards (live)"),
    NodeSpec("learner", "vlarl.nodes.learner", "replay -> residual SAC/RLPD -> policy_weights"),
)
NODES_BY_NAME = {spec.name: spec for spec in (*GRAPH, *LEARNING)}


def package_root() -> Path:
    """The folder holding config/, models/, launch/: the source tree or the ament share dir."""
    source_root = Path(__file__).resolve().parents[2]
    if (source_root / "config").is_dir() and (source_root / "package.xml").is_file():
        return source_root
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE))
    except Exception as exc:
        raise FileNotFoundError(
            "cannot find vlarl's config/: neither a source checkout nor an installed ament package"
        ) from exc


def config_path(name: str) -> Path:
    return package_root() / "config" / name


def resolve_model_path(path: str) -> Path:
    """A model path as given; relative paths are tried against the cwd, then the package."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    packaged = package_root() / candidate
    return packaged if packaged.exists() else candidate


def _ros_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_ros_value(v) for v in value) + "]"
    return repr(value)


def node_command(
    spec: NodeSpec,
    *,
    overrides: Mapping[str, Any] | None = None,
    extra_params_files: Sequence[Path] = (),
) -> list[str]:
    """Command line that runs one node with its parameter file and overrides."""
    cmd = [sys.executable, "-m", spec.module, "--ros-args", "-r", f"__node:={spec.name}"]
    common = config_path("common.yaml")
    if common.is_file():
        cmd += ["--params-file", str(common)]
    own = config_path(spec.params_file)
    if own.is_file():
        cmd += ["--params-file", str(own)]
    for extra in extra_params_files:
        cmd += ["--params-file", str(extra)]
    # Node-qualified (``node:key:=value``): a bare ``-p key:=value`` lands in the ``/**`` section,
    # which the node's own file section overrides once common.yaml has created ``/**`` first.
    for key, value in (overrides or {}).items():
        cmd += ["-p", f"{spec.name}:{key}:={_ros_value(value)}"]
    return cmd


@dataclass
class RunningNode:
    """A node process started by :func:`start_node`."""

    spec: NodeSpec
    process: subprocess.Popen[bytes]
    log_path: Path | None

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, *, timeout: float = 5.0) -> int:
        """Ctrl-C (SIGINT) first for a clean shutdown, then SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to the rest of the graph."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5.0)


def start_node(
    spec: NodeSpec | str,
    *,
    domain_id: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    log_dir: Path | None = None,
    env_extra: Mapping[str, str] | None = None,
) -> RunningNode:
    """Start one node as its own process (stdout/stderr to ``log_dir/<name>.log`` if given)."""
    if isinstance(spec, str):
        spec = NODES_BY_NAME[spec]
    env = child_env(domain_id=domain_id, extra=dict(env_extra or {}))
    out: IO[bytes] | int = subprocess.DEVNULL
    log_path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{spec.name}.log"
        out = open(log_path, "wb")  # noqa: SIM115 - handed to the child process
    process = subprocess.Popen(
        node_command(spec, overrides=overrides),
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if not isinstance(out, int):
        out.close()
    return RunningNode(spec=spec, process=process, log_path=log_path)


def stop_all(nodes: Sequence[RunningNode], *, timeout: float = 5.0) -> None:
    """Stop nodes in reverse start order; never raises."""
    for node in reversed(list(nodes)):
        try:
            node.stop(timeout=timeout)
        except Exception:
            node.kill()


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def free_domain_id(seed: int | None = None) -> int:
    """A ROS_DOMAIN_ID unlikely to collide with concurrent runs on this machine (1..100)."""
    base = os.getpid() if seed is None else seed
    return 1 + (base * 7919 + time.monotonic_ns() // 1_000_000) % 100
