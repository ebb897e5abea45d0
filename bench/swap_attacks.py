"""Issue 12, finding 5: every blob and model case that the policy node once accepted, against a
real policy node process, while real Meta-World observations stream at the control rate.

The policy node runs with its defaults (the shipped student, SwapConfig's caps and budget). A
pacing thread publishes expert-rollout states on ``observation`` at 80 Hz (the model's
control_dt); the main thread plays the learner (``policy_weights``) and the operator
(``ros2 param set /policy model ...``), one case at a time, and waits for the node's verdict
(policy/status, or the set-parameters answer). Per case:

- ``verdict``: accepted or refused, with the node's one-line reason;
- ``ticks_lost``: observations sent from the start of the case to 0.3 s after its verdict that
  were not answered exactly once;
- ``max_tick_latency_ms``: the slowest observation -> action round trip in that window.

``accepted_bad`` counts bad cases that were accepted (must be 0); the good cases (learner
versions before and after the attacks, a valid model) must be accepted.

    python bench/swap_attacks.py [--rate 80]

Writes bench/results/swap_attacks.json and swap_attacks.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.rosenv import ensure_local_discovery

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=80.0, help="observation rate [Hz]")
    parser.add_argument("--task", default="pick-place-v3")
    parser.add_argument("--model", default="models/pick-place-v3-student.onnx")
    parser.add_argument("--out", default=str(RESULTS / "swap_attacks.json"))
    parser.add_argument("--only", default="", help="comma-separated case names (debugging)")
    parser.add_argument("--publish-blob", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish_blob:
        return publish_blob(Path(args.publish_blob))

    sys.setswitchinterval(0.0001)  # pacing, publishing and receiving share this process
    ensure_local_discovery()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests"))
    from control_loop import expert_states

    from model_factory import (
        make_policy,
        nan_on_real_obs_layers,
        residual_blob,
        residual_layers,
        sparse_file,
    )
    from vlarl.core.candidate import SwapConfig
    from vlarl.graph import free_domain_id, resolve_model_path, start_node, stop_all

    domain_id = int(os.environ.get("ROS_DOMAIN_ID") or free_domain_id())
    os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    model = str(resolve_model_path(args.model))
    states = expert_states(args.task)
    obs_dim, action_dim = int(states.shape[1]), 4
    n_in = obs_dim + action_dim
    load_at_start = list(os.getloadavg())
    swap = SwapConfig()
    work = Path(tempfile.mkdtemp(prefix="swap-attacks-"))

    import rclpy
    from rcl_interfaces.srv import SetParameters
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from vlarl import topics
    from vlarl.ros.msgs import ns_to_stamp, stamp_to_ns

    log_dir = Path("runs") / "bench-swap-attacks"
    overrides: dict[str, object] = {"model": model, "task": args.task, "status_rate_hz": 20.0}
    nodes = [start_node("policy", domain_id=domain_id, overrides=overrides, log_dir=log_dir)]
    rclpy.init(domain_id=domain_id)
    node = rclpy.create_node("swap_attacks_bench")
    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    pub_obs = node.create_publisher(JointState, topics.OBSERVATION, qos)
    set_client: Any = node.create_client(SetParameters, "/policy/set_parameters")

    lock = threading.Lock()
    answers: dict[int, list[int]] = {}  # obs stamp -> receive times (perf_counter ns)
    base_tags: list[str] = []
    status: list[dict] = []

    def on_action(msg: JointTrajectory) -> None:
        now = time.perf_counter_ns()
        with lock:
            answers.setdefault(stamp_to_ns(msg.header.stamp), []).append(now)
            if not base_tags:
                base_tags.append(msg.header.frame_id.split("+", 1)[0])

    def on_status(msg: String) -> None:
        with lock:
            status.append(json.loads(msg.data))

    node.create_subscription(JointTrajectory, topics.POLICY_ACTION, on_action, qos)
    node.create_subscription(String, topics.POLICY_STATUS, on_status, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()

    stop = threading.Event()
    sent: list[tuple[int, int]] = []  # (obs stamp, send time perf_counter ns), in order
    period_ns = int(1e9 / args.rate)

    def pace() -> None:
        msg = JointState()
        msg.header.frame_id = "state"
        start = time.perf_counter_ns() + 20_000_000
        i = 0
        while not stop.is_set():
            target = start + i * period_ns
            while (remaining := target - time.perf_counter_ns()) > 0:
                if remaining > 300_000:
                    time.sleep((remaining - 200_000) / 1e9)
            stamp_ns = time.time_ns()
            msg.header.stamp = ns_to_stamp(stamp_ns)
            msg.position = states[i % len(states)].tolist()
            sent_at = time.perf_counter_ns()
            pub_obs.publish(msg)
            sent.append((stamp_ns, sent_at))
            i += 1

    def last_status() -> dict:
        with lock:
            return dict(status[-1]) if status else {}

    def wait_status(predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = last_status()
            if s and predicate(s):
                return s
            time.sleep(0.02)
        raise RuntimeError(f"no verdict within {timeout} s; last status {last_status()}")

    def set_model(path: Path) -> Any:
        request = SetParameters.Request(
            parameters=[Parameter("model", value=str(path)).to_parameter_msg()]
        )
        future = set_client.call_async(request)
        deadline = time.monotonic() + 30.0
        while not future.done():
            if time.monotonic() > deadline:
                raise RuntimeError("set_parameters timed out")
            time.sleep(0.005)
        return future.result().results[0]

    blob_files = iter(range(1000))

    def blob_case(payload: bytes) -> Callable[[], tuple[str, str]]:
        path = work / f"blob{next(blob_files)}.safetensors"
        path.write_bytes(payload)

        def run() -> tuple[str, str]:
            before = last_status()
            seen = before["weights_accepted"] + before["weights_refused"]
            # The learner is its own process, as in the graph (its DDS writers and its GIL
            # are not the robot side's).
            learner = subprocess.run(
                [sys.executable, __file__, "--publish-blob", str(path)],
                env=os.environ,
                timeout=120,
                capture_output=True,
                text=True,
            )
            if learner.returncode != 0:
                raise RuntimeError(f"blob publisher failed: {learner.stderr[-2000:]}")
            s = wait_status(lambda s: s["weights_accepted"] + s["weights_refused"] > seen)
            if s["weights_accepted"] > before["weights_accepted"]:
                return "accepted", s["last_check"]
            return "refused", s["last_weight_refusal"]

        return run

    def model_case(path: Path) -> Callable[[], tuple[str, str]]:
        def run() -> tuple[str, str]:
            before = last_status()
            result = set_model(path)
            if not result.successful:
                return "refused", result.reason
            s = wait_status(
                lambda s: (
                    s["refused"] > before["refused"]
                    or (s["sha256"] != before["sha256"] and not s["pending"])
                )
            )
            if s["refused"] > before["refused"]:
                return "refused", s["last_refusal"]
            return "accepted", s["last_check"]

        return run

    rows: list[dict] = []
    try:
        deadline = time.monotonic() + 60
        while not (
            pub_obs.get_subscription_count() >= 1
            and set_client.service_is_ready()
            and node.count_publishers(topics.POLICY_ACTION) >= 1
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("policy node did not come up (see runs/bench-swap-attacks)")
            time.sleep(0.1)
        threading.Thread(target=pace, daemon=True).start()
        deadline = time.monotonic() + 30
        while not base_tags or not status:
            if time.monotonic() > deadline:
                raise RuntimeError("no action from the policy node")
            time.sleep(0.05)
        base = base_tags[0]
        time.sleep(1.0)  # settle: the node has recent observations to check candidates on

        def blob(version: int, **kw: Any) -> bytes:
            return residual_blob(version, base=base, obs_dim=obs_dim, **kw)

        print("building the cases ...", flush=True)
        garbage = work / "garbage_60MB.onnx"
        garbage.write_bytes(np.random.default_rng(0).bytes(60_000_000))
        spec = {"model_id": "bench-policy", "version": 3}
        cases: list[tuple[str, str, bool, str, Callable[[], tuple[str, str]]]] = [
            # (name, kind, bad, what the finding saw, run)
            ("learner_v1", "blob", False, "", blob_case(blob(1, hidden=(256, 256)))),
            (
                "nan_on_real_observations",
                "blob",
                True,
                "accepted: robot held until a manual rollback",
                blob_case(blob(2, layers=nan_on_real_obs_layers(n_in, action_dim))),
            ),
            (
                "actor_50MB",
                "blob",
                True,
                "accepted: 1.2 s latency, two thirds of ticks lost",
                blob_case(blob(2, hidden=(3500, 3500))),
            ),
            (
                "actor_3000_layers",
                "blob",
                True,
                "accepted",
                blob_case(blob(2, layers=residual_layers([n_in, *[16] * 2999, action_dim]))),
            ),
            (
                "version_999999999999999999",
                "blob",
                True,
                "accepted: every later learner version refused",
                blob_case(blob(999_999_999_999_999_999, parent=1, hidden=(256, 256))),
            ),
            (
                "version_jump_5000",
                "blob",
                True,
                "(not tried)",
                blob_case(blob(5001, parent=1, hidden=(256, 256))),
            ),
            ("learner_v2", "blob", False, "", blob_case(blob(2, hidden=(256, 256)))),
            (
                "model_obs_dim_40",
                "model",
                True,
                "accepted: all ticks dropped",
                model_case(make_policy(obs_dim=40, **spec).save(work / "obs40.onnx")),
            ),
            (
                "model_action_dim_7",
                "model",
                True,
                "accepted: all ticks dropped",
                model_case(make_policy(action_dim=7, **spec).save(work / "act7.onnx")),
            ),
            (
                "model_nan_on_real_observations",
                "model",
                True,
                "(not tried)",
                model_case(make_policy(post="sqrt_obs0", **spec).save(work / "sqrt.onnx")),
            ),
            (
                "model_3000_layers",
                "model",
                True,
                "(not tried)",
                model_case(make_policy(hidden=(16,) * 3000, **spec).save(work / "deep.onnx")),
            ),
            (
                "model_file_1GiB",
                "model",
                True,
                "control loop blocked 10.5 s",
                model_case(sparse_file(work / "one_gib.onnx", 1 << 30)),
            ),
            (
                "model_file_200GiB_sparse",
                "model",
                True,
                "node crashed (MemoryError)",
                model_case(sparse_file(work / "huge.onnx", 200 << 30)),
            ),
            (
                "model_garbage_60MB_under_cap",
                "model",
                True,
                "(not tried: read whole and parsed on the worker thread)",
                model_case(garbage),
            ),
            (
                "model_valid",
                "model",
                False,
                "",
                model_case(make_policy(model_id="bench-policy", version=2).save(work / "ok.onnx")),
            ),
            ("model_back_to_student", "model", False, "", model_case(Path(model))),
        ]
        if args.only:
            cases = [c for c in cases if c[0] in args.only.split(",")]
        for name, kind, bad, before, run in cases:
            first = len(sent)
            started = time.perf_counter()
            verdict, reason = run()
            took = time.perf_counter() - started
            time.sleep(0.3)
            last = len(sent)
            rows.append(
                {
                    "case": name,
                    "kind": kind,
                    "bad": bad,
                    "before_the_fix": before,
                    "verdict": verdict,
                    "reason": reason,
                    "verdict_s": round(took, 3),
                    "window": [first, last],
                }
            )
            print(f"{name:32s} {verdict:8s} {took:6.2f} s  {reason[:110]}", flush=True)
        stop.set()
        time.sleep(1.0)  # last answers
        final_status = last_status()
        with lock:
            got = {k: list(v) for k, v in answers.items()}
    finally:
        stop.set()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        stop_all(nodes)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    for row in rows:
        first, last = row.pop("window")
        window = sent[first:last]
        lost = sum(1 for stamp, _ in window if len(got.get(stamp, ())) != 1)
        latencies = [(got[s][0] - t) / 1e6 for s, t in window if s in got]
        row["ticks"] = len(window)
        row["ticks_lost"] = lost
        row["max_tick_latency_ms"] = round(max(latencies), 2) if latencies else None
    bad_rows = [r for r in rows if r["bad"]]
    summary = {
        "accepted_bad": sum(1 for r in bad_rows if r["verdict"] == "accepted"),
        "refused_good": sum(1 for r in rows if not r["bad"] and r["verdict"] != "accepted"),
        "max_ticks_lost": max(r["ticks_lost"] for r in rows),
        "max_tick_latency_ms": max(r["max_tick_latency_ms"] or 0.0 for r in rows),
        "cases": rows,
        "rate_hz": args.rate,
        "observations_sent": len(sent),
        "observations_answered": sum(1 for stamp, _ in sent if stamp in got),
        "swap_config": {k: getattr(swap, k) for k in swap.__dataclass_fields__},
        "node_status": {
            k: final_status.get(k)
            for k in (
                "ticks",
                "published",
                "model",
                "residual",
                "residual_history",
                "weights_accepted",
                "weights_refused",
                "refused",
                "dropped",
                "tick_budget_ms",
                "base_cost_ms",
                "residual_cost_ms",
            )
        },
        "what": "each finding-5 blob/model case against a real policy node (default settings) "
        "while real Meta-World observations stream at rate_hz; ticks_lost = observations from "
        "the case's start to 0.3 s after its verdict not answered exactly once",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    _plot(rows, summary, out.with_suffix(".png"))
    print(
        f"accepted_bad {summary['accepted_bad']} of {len(bad_rows)} bad cases, refused_good "
        f"{summary['refused_good']}, max_ticks_lost {summary['max_ticks_lost']}, max tick "
        f"latency {summary['max_tick_latency_ms']} ms -> {out}"
    )
    return 0 if summary["accepted_bad"] == 0 and summary["refused_good"] == 0 else 1


def publish_blob(path: Path) -> int:
    """The learner's side of a blob case (run as its own process): publish, wait for the ack."""
    ensure_local_discovery()
    import rclpy
    from std_msgs.msg import UInt8MultiArray

    from vlarl import topics
    from vlarl.nodes.policy import WEIGHTS_QOS

    rclpy.init()
    try:
        node = rclpy.create_node("swap_attacks_learner")
        pub = node.create_publisher(UInt8MultiArray, topics.POLICY_WEIGHTS, WEIGHTS_QOS)
        deadline = time.monotonic() + 30.0
        while pub.get_subscription_count() < 1:
            if time.monotonic() > deadline:
                print("no policy node subscribed to policy_weights", file=sys.stderr)
                return 1
            time.sleep(0.05)
        msg = UInt8MultiArray()
        msg.data = path.read_bytes()
        pub.publish(msg)
        pub.wait_for_all_acked(rclpy.duration.Duration(seconds=30.0))
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    return 0


def _plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    names = [r["case"] for r in rows]
    y = np.arange(len(rows))
    colors = [
        ("tab:red" if r["verdict"] == "accepted" else "tab:green")
        if r["bad"]
        else ("tab:blue" if r["verdict"] == "accepted" else "tab:orange")
        for r in rows
    ]
    ax.barh(y, [r["ticks_lost"] for r in rows], color=colors)
    ax.set_yticks(y, [f"{n} ({r['verdict']})" for n, r in zip(names, rows, strict=True)])
    ax.invert_yaxis()
    ax.set_xlabel("ticks lost during the case")
    ax.set_xlim(0, max(1, summary["max_ticks_lost"] + 1))
    ax.set_title(
        f"accepted_bad {summary['accepted_bad']}, max_ticks_lost {summary['max_ticks_lost']} "
        f"({summary['rate_hz']:g} Hz)",
        fontsize=10,
    )
    ax2.barh(y, [r["max_tick_latency_ms"] or 0.0 for r in rows], color=colors)
    ax2.axvline(1e3 / summary["rate_hz"], color="k", ls=":", lw=1, label="control period")
    ax2.set_xlabel("slowest observation -> action round trip in the case [ms]")
    ax2.legend(fontsize=8)
    ax2.set_title("green: bad case refused, blue: good case accepted", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
