"""The node graph, described once, for both ways of running it.

``launch/bringup.launch.py`` (ROS 2 install) and ``vlarl bringup`` (PyPI-only) both read
:data:`GRAPH`, the same per-node parameter files under ``config/`` and the same per-run
parameters (:func:`node_overrides` of one :class:`GraphArguments`), so the two cannot drift.
Each node runs as its own process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from vlarl.core.residual import EXPLORATION_NOISE_STD
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
    """The folder holding config/, models/, launch/: the source tree, the ament share folder
    (colcon), or the share folder a ``pip install .`` wheel put beside its environment."""
    source_root = Path(__file__).resolve().parents[2]
    if (source_root / "config").is_dir() and (source_root / "package.xml").is_file():
        return source_root
    if os.environ.get("AMENT_PREFIX_PATH"):
        try:
            from ament_index_python.packages import get_package_share_directory

            return Path(get_package_share_directory(PACKAGE))
        except Exception:
            pass  # not in this ament index; a pip install may still hold it
    import site
    import sysconfig

    # setup.py's data_files land in the install scheme's data folder: sys.prefix for a venv
    # or system install, the user base for ``pip install --user``.
    for base in (sysconfig.get_path("data"), sys.prefix, site.getuserbase()):
        candidate = Path(base) / "share" / PACKAGE
        if (candidate / "config").is_dir():
            return candidate
    raise FileNotFoundError(
        "cannot find vlarl's config/: not a source checkout, an ament package or a pip install"
    )


def config_path(name: str) -> Path:
    return package_root() / "config" / name


def resolve_model_path(path: str) -> Path:
    """A model path as given; relative paths are tried against the cwd, then the package."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    packaged = package_root() / candidate
    return packaged if packaged.exists() else candidate


class GraphArgumentError(ValueError):
    """A run of the graph was asked for something it cannot do (found before any node starts)."""


# What the self-improvement loop (``--learn`` / ``learn:=true``) changes: exploration noise on
# the residual (what goes out is recorded and learned from) and shorter bag splits, so the
# learner sees the first data within seconds.
LEARN_RESIDUAL_NOISE_STD = EXPLORATION_NOISE_STD  # the in-process loops explore the same
LEARN_SPLIT_S = 10.0


@dataclass(frozen=True)
class GraphArguments:
    """One run of the graph: ``vlarl bringup``'s options and the launch file's arguments.

    Both are built from these fields (name, default, help); :func:`node_overrides` turns them
    into the parameters every node gets on top of its ``config/`` file.
    """

    task: str = "pick-place-v3"
    model: str = "models/pick-place-v3-student.onnx"
    mode: str = "lockstep"
    record: bool = True
    learn: bool = False
    action_offset: str = "0,0,0,0"
    seed: int = -1
    max_episode_steps: int = 0
    camera_rate: float = -1.0
    split_s: float = 0.0
    bag_dir: str = "bags"
    replay_dir: str = ""
    learner_checkpoint: str = ""
    use_sim_time: bool = False

    @classmethod
    def from_strings(cls, values: Mapping[str, str]) -> GraphArguments:
        """From launch-argument strings (``true``/``false``, numbers); unknown keys ignored."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            text = str(values[f.name]).strip()
            kind = type(getattr(cls, f.name))
            try:
                if kind is bool:
                    if text.lower() not in ("true", "false"):
                        raise ValueError
                    kwargs[f.name] = text.lower() == "true"
                else:
                    kwargs[f.name] = kind(text)
            except ValueError:
                raise GraphArgumentError(f"{f.name}:={text!r} is not a {kind.__name__}") from None
        return cls(**kwargs)


# One line of help per argument (the bringup flag and the launch argument say the same).
ARGUMENT_HELP: dict[str, str] = {
    "task": "Meta-World task; the model must know it",
    "model": "ONNX policy meeting the model contract (relative: cwd, then the package)",
    "mode": "simulator pacing: lockstep | realtime",
    "record": "record the control-path topics to a rosbag2",
    "learn": "also start the bag bridge and the residual RL learner (needs record)",
    "action_offset": "deployment shift of the simulated robot: it executes "
    "clip(command + offset); 4 comma-separated numbers in [-1, 1]",
    "seed": "simulator seed (-1 = the config's)",
    "max_episode_steps": "truncation limit (0 = the config's)",
    "camera_rate": "camera Hz, 0 = off (-1 = the config's)",
    "split_s": f"recorder split duration in s (0 = the config's; {LEARN_SPLIT_S:g} s "
    "with learn, so the learner sees data soon)",
    "bag_dir": "folder for recorded bags",
    "replay_dir": "learn: replay folder ('' = <run folder>/replay)",
    "learner_checkpoint": "learn: learner checkpoint, resumed if it exists "
    "('' = <run folder>/learner.safetensors)",
    "use_sim_time": "nodes follow /clock",
}
MODES = ("lockstep", "realtime")
# Arguments whose "unset" value leaves the node's config file in charge: (node, parameter).
CONFIG_BACKED: dict[str, tuple[str, str]] = {
    "seed": ("sim_robot", "seed"),
    "max_episode_steps": ("sim_robot", "max_episode_steps"),
    "camera_rate": ("sim_robot", "camera_rate_hz"),
    "split_s": ("recorder", "split_duration_s"),
}


def config_value(node: str, key: str) -> Any:
    """A parameter's value in ``config/<node>.yaml`` (None when the file does not set it)."""
    import yaml

    data = yaml.safe_load(config_path(f"{node}.yaml").read_text()) or {}
    return (data.get(node) or {}).get("ros__parameters", {}).get(key)


def argument_help(name: str) -> str:
    """One line of help for a graph argument; config-backed ones say the config's value."""
    text = ARGUMENT_HELP[name]
    if name in CONFIG_BACKED:
        node, key = CONFIG_BACKED[name]
        text += f"; config/{node}.yaml has {config_value(node, key)}"
    return text


def parse_action_offset(text: str) -> list[float]:
    """``"0,0.2,0,0"`` -> 4 finite numbers in [-1, 1] (:class:`GraphArgumentError` otherwise)."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(-1.0 <= v <= 1.0 for v in values):
        raise GraphArgumentError(
            f"action offset must be 4 comma-separated numbers in [-1, 1] (dx,dy,dz,gripper), "
            f"got {text!r}"
        )
    return values


def reward_models_for(task: str) -> dict[str, str]:
    """The packaged success detector and progress model that know ``task`` ('' = none).

    ``models/<task>-<kind>.onnx`` first, then the MT10 model for an MT10 task: the reward node
    must not score another task with a pick-place model.
    """
    from vlarl.learning.envs import MT10

    models = package_root() / "models"
    chosen: dict[str, str] = {}
    for key, kind in (("detector_model", "success-detector"), ("progress_model", "progress")):
        candidates = [models / f"{task}-{kind}.onnx"]
        if task in MT10:
            candidates.append(models / f"mt10-{kind}.onnx")
        found = next((c for c in candidates if c.is_file()), None)
        chosen[key] = str(found) if found is not None else ""
    return chosen


def node_names(args: GraphArguments) -> list[str]:
    """The nodes one run starts, in start order."""
    names = [spec.name for spec in GRAPH if args.record or spec.name != "recorder"]
    if args.learn:
        names += [spec.name for spec in LEARNING]
    return names


def node_overrides(
    args: GraphArguments, *, run_dir: Path, bag_name: str
) -> dict[str, dict[str, Any]]:
    """Per-node parameters of one run, on top of ``config/<node>.yaml``.

    ``run_dir`` holds what the run writes besides the bag (learner replay and checkpoint by
    default); ``bag_name`` is the recording's folder name under ``bag_dir``.
    """
    model = str(resolve_model_path(args.model).resolve())
    bag_dir = Path(args.bag_dir).expanduser().resolve()
    overrides: dict[str, dict[str, Any]] = {
        "sim_robot": {
            "task": args.task,
            "mode": args.mode,
            "action_offset": parse_action_offset(args.action_offset),
        },
        "policy": {"model": model, "task": args.task},
        "reward": {"task": args.task, **reward_models_for(args.task)},
    }
    if args.seed >= 0:
        overrides["sim_robot"]["seed"] = args.seed
    if args.max_episode_steps > 0:
        overrides["sim_robot"]["max_episode_steps"] = args.max_episode_steps
    if args.camera_rate >= 0:
        overrides["sim_robot"]["camera_rate_hz"] = float(args.camera_rate)
    if args.record:
        overrides["recorder"] = {"output_dir": str(bag_dir), "bag_name": bag_name}
        if args.split_s > 0 or args.learn:
            overrides["recorder"]["split_duration_s"] = float(args.split_s or LEARN_SPLIT_S)
    if args.learn:
        replay = Path(args.replay_dir) if args.replay_dir else run_dir / "replay"
        checkpoint = (
            Path(args.learner_checkpoint)
            if args.learner_checkpoint
            else run_dir / "learner.safetensors"
        )
        overrides["policy"]["residual_noise_std"] = LEARN_RESIDUAL_NOISE_STD
        overrides["bridge"] = {"bag_dir": str(bag_dir / bag_name), "replay_dir": str(replay)}
        overrides["learner"] = {
            "base_model": model,
            "task": args.task,
            "replay_dir": str(replay),
            "checkpoint": str(checkpoint),
        }
    for name in node_names(args):
        overrides.setdefault(name, {})["use_sim_time"] = args.use_sim_time
    return {name: overrides[name] for name in node_names(args)}


def check_arguments(args: GraphArguments) -> None:
    """Refuse, before any node starts, what would leave the robot held or the run useless:
    a bad task, a missing or corrupt model, a task the model does not know, a bad offset.
    Raises :class:`GraphArgumentError` saying what to change."""
    from vlarl.contract import ContractError
    from vlarl.core.onnx_policy import OnnxPolicy
    from vlarl.learning.envs import known_tasks

    if args.mode not in MODES:
        raise GraphArgumentError(f"mode must be one of {', '.join(MODES)}, got {args.mode!r}")
    parse_action_offset(args.action_offset)
    if args.learn and not args.record:
        raise GraphArgumentError("learn needs the recording (the bags are the learner's data)")
    known = known_tasks()
    if args.task not in known:
        import difflib

        close = difflib.get_close_matches(args.task, sorted(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GraphArgumentError(f"unknown Meta-World task {args.task!r}{hint}")
    path = resolve_model_path(args.model)
    try:
        policy = OnnxPolicy.load(path, providers="cpu")
    except ContractError as exc:
        raise GraphArgumentError(f"model {args.model}: {exc}") from None
    tasks = policy.metadata.tasks
    if args.task not in tasks:
        raise GraphArgumentError(
            f"model {path.name} does not know task {args.task!r} (its tasks: {', '.join(tasks)}); "
            "pass a model trained on it"
        )


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
