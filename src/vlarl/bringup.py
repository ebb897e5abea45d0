"""``vlarl bringup``: the whole node graph against the embedded robot, from one command.

Starts every node of :data:`vlarl.graph.GRAPH` as its own process with the same parameter files
the ROS 2 launch file uses, resets the simulator once the graph is connected, runs N episodes,
records them to a rosbag2, and prints per-episode success, the control rate achieved and where
the bag is. The figures also go to ``<run folder>/bringup.json``. Bad arguments (an unknown
task, a model that is missing, corrupt or does not know the task, an output that cannot be
written) are refused before any node starts.

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop every node (each runs in its own process group, which
is killed if a node outlives its Ctrl-C), then print the summary so far (episodes, bag, results)
and exit with 128 + the signal number, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from vlarl.graph import (
    MODES,
    GraphArgumentError,
    GraphArguments,
    RunningNode,
    argument_help,
    check_arguments,
    free_domain_id,
    node_names,
    node_overrides,
    start_node,
    stop_all,
)
from vlarl.rosenv import ensure_local_discovery

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A stop signal arrived (raised once, in the main thread, by the handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    for sig in STOP_SIGNALS:  # the first one wins; later ones must not break the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _kill_process_groups(nodes: list[RunningNode]) -> None:
    """SIGKILL what is left of each node's process group (its own session: start_new_session)."""
    for node in nodes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.process.pid, signal.SIGKILL)


class BringupError(RuntimeError):
    """The graph failed while running (not a bad argument): one line, exit code 1."""

    exit_code = 1


class NodeExitError(BringupError):
    """Node processes ended while the graph ran; the message carries each one's reason."""

    def __init__(self, what: str, nodes: list[RunningNode]) -> None:
        reasons = "; ".join(f"{n.spec.name}: {_exit_reason(n)}" for n in nodes)
        super().__init__(f"node(s) {what}: {reasons}")


@dataclass
class EpisodeResult:
    """One finished episode as the reward node reported it."""

    episode: int
    success: bool
    steps: int
    episode_return: float
    wall_s: float
    residual: str = ""  # residual version acting when the episode ended ("" = base alone)


class _ActingStatus(TypedDict):
    """What the supervisor last heard from the policy and learner status topics."""

    residual: str  # residual version acting ("" = base alone)
    learner: dict[str, Any] | None  # last learner/status message


@dataclass
class BringupResult:
    """What ``bringup.json`` holds."""

    task: str
    model: str
    mode: str
    domain_id: int
    episodes: list[EpisodeResult] = field(default_factory=list)
    success_rate: float = 0.0
    control_rate_hz: float = 0.0
    steps: int = 0
    bag: str | None = None
    bag_messages: int | None = None
    bag_topics: dict[str, int] | None = None
    safety: dict[str, Any] | None = None
    learner: dict[str, Any] | None = None  # last learner/status (with --learn)
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = ""


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The graph's arguments (:class:`vlarl.graph.GraphArguments`, shared with the launch
    file) plus what only this command has: episodes, domain, time limit, run folder."""
    defaults = GraphArguments()
    for f in fields(GraphArguments):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = argument_help(f.name) + " (default: %(default)s)"
        if isinstance(default, bool):
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                help=help_text,
            )  # fmt: skip
        elif f.name == "mode":
            parser.add_argument(flag, dest=f.name, choices=MODES, default=default, help=help_text)
        else:
            parser.add_argument(
                flag, dest=f.name, type=type(default), default=default, help=help_text
            )
    parser.add_argument(
        "--episodes", type=int, default=20, help="episodes to run (default: %(default)s)"
    )
    parser.add_argument(
        "--domain-id",
        type=int,
        default=None,
        help="ROS_DOMAIN_ID, 0-232 (default: $ROS_DOMAIN_ID, else a free one)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="give up after seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--run-dir",
        "--log-dir",
        dest="run_dir",
        default=None,
        help="run folder: node logs, results, learner replay and checkpoint "
        "(default: runs/bringup-<UTC time>)",
    )
    parser.add_argument(
        "--results",
        default=None,
        help="where to write the JSON figures (default: <run folder>/bringup.json)",
    )


def _writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and check a file can be written there, before any work."""
    if path.exists() and not path.is_dir():
        raise GraphArgumentError(f"{what} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphArgumentError(f"{what} {path}: cannot create it ({exc.strerror})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise GraphArgumentError(f"{what} {path}: not a writable folder")


def _check_numbers(args: argparse.Namespace) -> None:
    if args.episodes < 1:
        raise GraphArgumentError(f"--episodes must be >= 1, got {args.episodes}")
    if not args.timeout > 0:
        raise GraphArgumentError(f"--timeout must be > 0 s, got {args.timeout}")
    if args.domain_id is not None and not 0 <= args.domain_id <= 232:
        raise GraphArgumentError(f"--domain-id must be in 0-232, got {args.domain_id}")


def _check_outputs(args: argparse.Namespace, run_dir: Path, results_path: Path) -> None:
    if results_path.is_dir():
        raise GraphArgumentError(f"--results {results_path} is a folder; give a file name")
    _writable_dir(run_dir, "run folder")
    _writable_dir(results_path.parent, "--results folder")
    if args.record:
        _writable_dir(Path(args.bag_dir), "--bag-dir")


def _domain_id(requested: int | None) -> int:
    if requested is not None:
        return requested
    env_domain = os.environ.get("ROS_DOMAIN_ID", "").strip()
    if not env_domain:
        return free_domain_id()
    if not env_domain.isdigit() or int(env_domain) > 232:
        raise GraphArgumentError(f"ROS_DOMAIN_ID={env_domain!r} is not a domain id (0-232)")
    return int(env_domain)


def _exit_reason(node: RunningNode) -> str:
    """Why a node process ended, from its log: the line it printed last (its error)."""
    if node.log_path is None or not node.log_path.is_file():
        return f"exit code {node.process.returncode}"
    try:
        lines = node.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"exit code {node.process.returncode}"
    meaningful = [line.strip() for line in lines if line.strip()]
    prefix = f"{node.spec.name}: "
    own = [line.removeprefix(prefix) for line in meaningful if line.startswith(prefix)]
    reason = (own or meaningful or [f"exit code {node.process.returncode}"])[-1]
    return f"{reason} (log: {node.log_path})"


def graph_arguments(args: argparse.Namespace) -> GraphArguments:
    """The graph's share of the parsed options (what the launch file's arguments also set)."""
    return GraphArguments(**{f.name: getattr(args, f.name) for f in fields(GraphArguments)})


def run(args: argparse.Namespace) -> int:
    ensure_local_discovery()
    graph_args = graph_arguments(args)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    log_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"bringup-{stamp}"
    results_path = Path(args.results) if args.results else log_dir / "bringup.json"
    # Everything that can be refused is refused here, before a node starts.
    _check_numbers(args)
    check_arguments(graph_args)
    _check_outputs(args, log_dir, results_path)
    domain_id = _domain_id(args.domain_id)
    os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    bag_dir = Path(args.bag_dir).resolve()
    bag_name = f"vlarl-{args.task}-{stamp}"
    overrides = node_overrides(graph_args, run_dir=log_dir, bag_name=bag_name)
    model = str(overrides["policy"]["model"])
    names = node_names(graph_args)

    print(f"vlarl bringup: task {args.task}, model {model}, {args.episodes} episodes")
    print(f"  ROS_DOMAIN_ID={domain_id} (export it to watch with ros2 / rviz); logs in {log_dir}")
    result = BringupResult(
        task=args.task,
        model=model,
        mode=args.mode,
        domain_id=domain_id,
        machine=machine_info(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    nodes: list[RunningNode] = []
    interrupted: Interrupted | None = None
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in STOP_SIGNALS}
    try:
        try:
            for name in names:
                nodes.append(
                    start_node(
                        name, domain_id=domain_id, overrides=overrides.get(name), log_dir=log_dir
                    )
                )
            _supervise(args, names, nodes, result)
        except Interrupted as exc:
            interrupted = exc
        finally:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)  # nothing may cut the clean-up short
            stop_all(nodes, timeout=10.0)
            _kill_process_groups(nodes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted is not None:
        done = len(result.episodes)
        wins = sum(e.success for e in result.episodes)
        _say(
            f"interrupted by {interrupted} after {done}/{args.episodes} episodes "
            f"({wins} successes); every node stopped"
        )

    if args.record:
        bag_path = bag_dir / bag_name
        result.bag = str(bag_path)
        try:
            from vlarl.bag.reader import topic_counts

            counts = topic_counts(bag_path)
            result.bag_topics = counts
            result.bag_messages = sum(counts.values())
            _say(f"bag: {bag_path} ({result.bag_messages} messages, read back with rosbags)")
        except Exception as exc:  # report, keep the episode results
            _say(f"bag: {bag_path} could not be read back: {exc}")

    results_path.parent.mkdir(parents=True, exist_ok=True)
    payload = asdict(result)
    results_path.write_text(json.dumps(payload, indent=2) + "\n")
    _say(f"results: {results_path}")
    if interrupted is not None:
        return 128 + interrupted.signum
    done = len(result.episodes)
    return 0 if done == args.episodes else 1


def _say(line: str) -> None:
    """Print a summary line; after SIGHUP the terminal may be gone (then the JSON still is)."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def _supervise(
    args: argparse.Namespace,
    names: list[str],
    nodes: list[RunningNode],
    result: BringupResult,
) -> None:
    """Watch the graph over DDS until the episodes are done (runs in this process)."""
    import rclpy
    from rclpy.client import Client
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from vlarl import topics

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)  # run() handles the signals
    node = rclpy.create_node("bringup_supervisor")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    status_index = {name: i for i, name in enumerate(topics.ROBOT_STATUS_FIELDS)}
    state: dict[str, Any] = {
        "max_episode_seen": -1,
        "first_episode": None,
        "status_count": 0,
        "count_start": None,
        "safety": None,
        "episode_start": time.monotonic(),
    }
    episodes: list[EpisodeResult] = result.episodes  # filled as they end: kept on a Ctrl-C
    acting: _ActingStatus = {"residual": "", "learner": None}

    def on_status(msg: JointState) -> None:
        if len(msg.position) != len(status_index):
            return
        episode = int(msg.position[status_index["episode"]])
        state["max_episode_seen"] = max(state["max_episode_seen"], episode)
        if state["first_episode"] is not None and episode >= state["first_episode"]:
            if state["count_start"] is None:
                state["count_start"] = time.monotonic()
            state["status_count"] += 1

    def on_episode(msg: String) -> None:
        try:
            info = json.loads(msg.data)
        except json.JSONDecodeError:
            return
        first = state["first_episode"]
        if first is None or int(info.get("episode", -1)) < first or len(episodes) >= args.episodes:
            return
        now = time.monotonic()
        ep = EpisodeResult(
            episode=int(info["episode"]),
            success=bool(info.get("success", False)),
            steps=int(info.get("steps", 0)),
            episode_return=float(info.get("return", 0.0)),
            wall_s=round(now - state["episode_start"], 3),
            residual=acting["residual"],
        )
        state["episode_start"] = now
        episodes.append(ep)
        verdict = "success" if ep.success else "failure"
        print(
            f"  episode {len(episodes):3d}/{args.episodes}: {verdict:7s} in {ep.steps:3d} steps "
            f"({ep.wall_s:.2f} s)" + (f" with {ep.residual}" if ep.residual else ""),
            flush=True,
        )

    def on_policy(msg: String) -> None:
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            acting["residual"] = str(json.loads(msg.data).get("residual", ""))

    def on_learner(msg: String) -> None:
        with contextlib.suppress(json.JSONDecodeError):
            acting["learner"] = json.loads(msg.data)

    def on_safety(msg: String) -> None:
        with contextlib.suppress(json.JSONDecodeError):
            state["safety"] = json.loads(msg.data)

    qos = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(JointState, topics.ROBOT_STATUS, on_status, qos)
    node.create_subscription(String, topics.EPISODE, on_episode, 50)
    node.create_subscription(String, topics.SAFETY_STATUS, on_safety, 10)
    node.create_subscription(String, topics.POLICY_STATUS, on_policy, 10)
    node.create_subscription(String, topics.LEARNER_STATUS, on_learner, 10)
    reset: Client[Trigger.Request, Trigger.Response] = node.create_client(Trigger, topics.SIM_RESET)

    deadline = time.monotonic() + args.timeout
    try:
        expected = set(names)
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
            dead = [n for n in nodes if not n.alive()]
            if dead:
                raise NodeExitError("exited during start-up", dead)
            if expected <= set(node.get_node_names()) and reset.service_is_ready():
                break
        else:
            raise BringupError(f"graph did not come up within --timeout {args.timeout:g} s")
        # Let discovery of every publisher/subscriber pair settle before the first real episode.
        settle_until = time.monotonic() + 1.0
        while time.monotonic() < settle_until:
            executor.spin_once(timeout_sec=0.05)
        print(f"  graph up in {time.monotonic() - t0:.1f} s: {', '.join(names)}", flush=True)
        future = reset.call_async(Trigger.Request())
        executor.spin_until_future_complete(future, timeout_sec=10.0)
        response = future.result() if future.done() else None
        if response is None or not response.success:
            raise BringupError("simulator reset failed (sim_robot/reset did not answer success)")
        state["first_episode"] = state["max_episode_seen"] + 1
        state["episode_start"] = time.monotonic()
        while len(episodes) < args.episodes and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
            dead = [n for n in nodes if not n.alive()]
            if dead:
                raise NodeExitError("died", dead)
        elapsed = time.monotonic() - (state["count_start"] or time.monotonic())
        result.steps = int(state["status_count"])
        result.control_rate_hz = round(state["status_count"] / elapsed, 1) if elapsed > 0 else 0.0
        result.success_rate = (
            round(sum(e.success for e in episodes) / len(episodes), 4) if episodes else 0.0
        )
        # one more status from safety for the counters
        until = time.monotonic() + 0.6
        while time.monotonic() < until:
            executor.spin_once(timeout_sec=0.05)
        result.safety = state["safety"]
        result.learner = acting["learner"]
        print(
            f"success: {sum(e.success for e in episodes)}/{len(episodes)} "
            f"({100 * result.success_rate:.0f}%), control rate {result.control_rate_hz:.0f} Hz "
            f"({args.mode}, {result.steps} steps)",
            flush=True,
        )
        if len(episodes) < args.episodes:
            print(f"timed out after {args.timeout:.0f} s with {len(episodes)} episodes")
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
