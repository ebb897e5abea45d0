"""A recorded control loop for the bridge tests: the messages the graph's nodes put on the wire,
and, computed alongside (not by the bridge), the transitions a bag of them must yield.

Per simulator sample with stamp S (as sim_robot, perception, policy, safety and reward do):
robot/status + robot/task_state (stamp S), observation (S), policy/action (S; point 0 = base,
effort = residual, frame_id = version tag), safety/command (S; frame_id = tag | teleop |
hold:<reason>), reward (S; the verdict on the step that led to S). Log times follow the stamps
by a fraction of a millisecond, except some reward messages that arrive after the next sample.

The episodes exercise: success (terminal), time limit (truncated), sim_robot's reset marker
(an extra sample of the same step, truncated), a re-sent sample (duplicates), teleop with and
without a policy proposal, watchdog holds (one followed by the policy's late answer), a version
swap, a missing reward, a missing command, and samples after the reward node ended an episode.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

from vlarl import topics
from vlarl.bag.writer import SplitBagWriter, default_typestore

TS = default_typestore()
T = TS.types
TICK_NS = 12_500_000
T0_NS = 1_700_000_000_000_000_000
OBS_DIM = 39
TAG_A = "student@3+residual@0"
TAG_B = "student@3+residual@1"

TOPIC_TYPES = {
    "/" + topics.ROBOT_STATUS: "sensor_msgs/msg/JointState",
    "/" + topics.TASK_STATE: "sensor_msgs/msg/JointState",
    "/" + topics.OBSERVATION: "sensor_msgs/msg/JointState",
    "/" + topics.POLICY_ACTION: "trajectory_msgs/msg/JointTrajectory",
    "/" + topics.COMMAND: "sensor_msgs/msg/JointState",
    "/" + topics.REWARD: "sensor_msgs/msg/JointState",
    "/" + topics.EPISODE: "std_msgs/msg/String",
}


# --------------------------------------------------------------------------- serialization
class RosbagsCdr:
    """Serialize with rosbags' typestore (exact-size CDR, as rosbags writes and reads it)."""

    name = "rosbags"

    def joint_state(self, stamp: int, frame: str, names: list[str], position: np.ndarray) -> bytes:
        msg = T["sensor_msgs/msg/JointState"](
            header=T["std_msgs/msg/Header"](
                stamp=T["builtin_interfaces/msg/Time"](
                    sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000
                ),
                frame_id=frame,
            ),
            name=list(names),
            position=np.asarray(position, dtype=np.float64),
            velocity=np.zeros(0, dtype=np.float64),
            effort=np.zeros(0, dtype=np.float64),
        )
        return bytes(TS.serialize_cdr(msg, "sensor_msgs/msg/JointState"))

    def trajectory(self, stamp: int, frame: str, base: np.ndarray, residual: np.ndarray) -> bytes:
        point_t = T["trajectory_msgs/msg/JointTrajectoryPoint"]
        duration_t = T["builtin_interfaces/msg/Duration"]
        points = [
            point_t(
                positions=np.asarray(base[i], dtype=np.float64),
                velocities=np.zeros(0, dtype=np.float64),
                accelerations=np.zeros(0, dtype=np.float64),
                effort=np.asarray(residual[i], dtype=np.float64),
                time_from_start=duration_t(sec=0, nanosec=TICK_NS * i),
            )
            for i in range(base.shape[0])
        ]
        msg = T["trajectory_msgs/msg/JointTrajectory"](
            header=T["std_msgs/msg/Header"](
                stamp=T["builtin_interfaces/msg/Time"](
                    sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000
                ),
                frame_id=frame,
            ),
            joint_names=list(topics.ACTION_NAMES),
            points=points,
        )
        return bytes(TS.serialize_cdr(msg, "trajectory_msgs/msg/JointTrajectory"))

    def string(self, text: str) -> bytes:
        return bytes(TS.serialize_cdr(T["std_msgs/msg/String"](data=text), "std_msgs/msg/String"))


class RclpyCdr:
    """Serialize with rclpy (what the recorder stores: Fast DDS bytes, padded at the end)."""

    name = "rclpy"

    def joint_state(self, stamp: int, frame: str, names: list[str], position: np.ndarray) -> bytes:
        from rclpy.serialization import serialize_message

        from vlarl.ros.msgs import ns_to_stamp, vector_msg

        return bytes(
            serialize_message(
                vector_msg(position, stamp=ns_to_stamp(stamp), frame_id=frame, names=names)
            )
        )

    def trajectory(self, stamp: int, frame: str, base: np.ndarray, residual: np.ndarray) -> bytes:
        from rclpy.serialization import serialize_message

        from vlarl.ros.msgs import action_chunk_msg, ns_to_stamp

        msg = action_chunk_msg(
            base, residual, stamp=ns_to_stamp(stamp), version_tag=frame, step_dt=0.0125
        )
        return bytes(serialize_message(msg))

    def string(self, text: str) -> bytes:
        from rclpy.serialization import serialize_message
        from std_msgs.msg import String

        return bytes(serialize_message(String(data=text)))


# --------------------------------------------------------------------------- the trace
@dataclass
class Expected:
    """One transition the bag must yield (ground truth)."""

    bag_episode: int
    step: int
    obs: np.ndarray
    next_obs: np.ndarray
    action: np.ndarray
    base: np.ndarray
    residual: np.ndarray
    reward: float
    terminal: int
    truncated: int
    success: int
    intervention: int
    tag: str
    task: str


@dataclass
class Trace:
    messages: list[tuple[str, int, bytes]] = field(default_factory=list)  # log-time order
    expected: list[Expected] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    # per transition (episode, step): log times of every message it is made of
    parts: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def by_key(self) -> dict[tuple[int, int], Expected]:
        return {(e.bag_episode, e.step): e for e in self.expected}


@dataclass
class StepPlan:
    """What happens at one sample (how its command comes about)."""

    command: str = "policy"  # policy | teleop | hold
    propose: bool = True  # the policy answers this sample
    late_policy: bool = False  # hold first, then the policy's late answer (+ a stale command)
    resend: bool = False  # the simulator re-sends the sample (duplicates)
    no_reward: bool = False  # the reward message of this sample is lost
    no_command: bool = False  # the command of this sample is lost


@dataclass
class EpisodePlan:
    length: int  # actions taken
    end: str  # success | timeout | reset
    task: str
    steps: dict[int, StepPlan] = field(default_factory=dict)
    tag_switch: int | None = None  # from this step on the policy carries TAG_B
    after_end: int = 0  # samples the simulator sends after the reward node ended the episode


def default_plan() -> list[EpisodePlan]:
    return [
        EpisodePlan(14, "success", "pick-place-v3", {5: StepPlan(resend=True)}, after_end=2),
        EpisodePlan(
            12,
            "timeout",
            "pick-place-v3",
            {
                3: StepPlan(command="teleop"),
                4: StepPlan(command="teleop"),
                5: StepPlan(command="teleop", propose=False),
                6: StepPlan(command="teleop", propose=False),
            },
        ),
        EpisodePlan(
            10,
            "reset",
            "pick-place-v3",
            {
                6: StepPlan(command="hold", propose=False),
                7: StepPlan(command="hold", late_policy=True),
            },
        ),
        EpisodePlan(
            16,
            "success",
            "push-v3",
            {4: StepPlan(no_reward=True), 9: StepPlan(no_command=True)},
            tag_switch=8,
        ),
        EpisodePlan(11, "timeout", "push-v3"),
    ]


def long_plan() -> list[EpisodePlan]:
    """The default plan followed by plain episodes (a longer recording for live tests)."""
    extra = [EpisodePlan(12, "success" if i % 2 else "timeout", "push-v3") for i in range(6)]
    return default_plan() + extra


def make_trace(
    *,
    seed: int = 0,
    plan: list[EpisodePlan] | None = None,
    serializer: Any = None,
    first_episode: int = 0,
    t0_ns: int = T0_NS,
    log_offset_ns: int = 0,
) -> Trace:
    """Messages of the plan's episodes, and the transitions they must yield.

    Stamps start at ``t0_ns``; log times follow the stamps, shifted by ``log_offset_ns`` (a
    simulator on simulated time). ``Trace.parts`` holds stamps, i.e. log times minus the offset.
    """
    rng = np.random.default_rng(seed)
    ser = serializer or RosbagsCdr()
    plan = plan if plan is not None else default_plan()
    trace = Trace()
    events: list[tuple[int, int, str, bytes]] = []  # (log ns, order, topic, data)
    order = [0]

    def emit(topic: str, log_ns: int, data: bytes) -> None:
        order[0] += 1
        events.append((log_ns + log_offset_ns, order[0], "/" + topic, data))

    def emit_js(topic: str, log_ns: int, stamp: int, frame: str, names: Any, values: Any) -> None:
        emit(topic, log_ns, ser.joint_state(stamp, frame, list(names), np.asarray(values)))

    tick = [0]

    def next_stamp() -> int:
        tick[0] += 1
        return t0_ns + tick[0] * TICK_NS

    for e_offset, ep in enumerate(plan):
        episode = first_episode + e_offset
        # States (observations) of the episode: obs[k] after k actions.
        obs = rng.uniform(-1, 1, size=(ep.length + 1, OBS_DIM))
        rewards = np.round(rng.normal(size=ep.length + 1), 6)
        rewards[0] = 0.0
        gripper = 0.0
        stamps: list[int] = []
        reward_logs: dict[int, int] = {}
        answered: dict[int, dict[str, Any]] = {}
        for k in range(ep.length + 1):
            s = next_stamp()
            stamps.append(s)
            last = k == ep.length
            success = ep.end == "success" and last
            terminal = success
            truncated = ep.end == "timeout" and last
            step_plan = ep.steps.get(k, StepPlan())
            status = [episode, k, float(success), float(terminal), float(truncated), 0.1 * k]
            sends = 2 if step_plan.resend else 1
            for repeat in range(sends):
                base_log = s + repeat * 250_000_000  # a re-send comes lockstep_timeout_s later
                emit(
                    topics.ROBOT_STATUS,
                    base_log + 100_000,
                    ser.joint_state(s, "", list(topics.ROBOT_STATUS_FIELDS), np.array(status)),
                )
                emit(
                    topics.TASK_STATE,
                    base_log + 110_000,
                    ser.joint_state(s, ep.task, [], obs[k]),
                )
                emit(
                    topics.OBSERVATION, base_log + 300_000, ser.joint_state(s, "state", [], obs[k])
                )
            if step_plan.resend:
                trace.duplicates.update(["status", "task", "observation"])
            # the reward node's verdict on the step that led here
            reward_msg = [
                rewards[k],
                float(success),
                0.0,
                float(terminal),
                float(truncated),
                float(episode),
                float(k),
            ]
            reward_log = s + (20_000_000 if k % 4 == 3 else 400_000)  # some after the next sample
            reward_logs[k] = reward_log
            if not step_plan.no_reward:
                emit(
                    topics.REWARD,
                    reward_log,
                    ser.joint_state(s, "", list(topics.REWARD_FIELDS), np.array(reward_msg)),
                )
            # policy + safety answer the sample (also the final one: never executed)
            tag = TAG_B if ep.tag_switch is not None and k >= ep.tag_switch else TAG_A
            base_chunk = np.round(rng.uniform(-1, 1, size=(4, 4)), 6)
            residual_chunk = np.zeros((4, 4))
            residual_chunk[0] = np.round(rng.uniform(-0.05, 0.05, size=4), 6)
            proposal = (base_chunk[0], residual_chunk[0])
            commands: list[tuple[str, np.ndarray]] = []
            policy_command = np.clip(base_chunk[0] + residual_chunk[0], -1, 1)
            if step_plan.command == "teleop":
                commands.append(("teleop", np.round(rng.uniform(-1, 1, size=4), 6)))
            elif step_plan.command == "hold":
                commands.append(("hold:watchdog", np.array([0.0, 0.0, 0.0, gripper])))
                if step_plan.late_policy:
                    commands.append((tag, policy_command))  # stale: the hold already ran
                    trace.duplicates["command"] += 1
            else:
                commands.append((tag, policy_command))
            for repeat in range(sends):
                answer_log = s + repeat * 250_000_000
                if step_plan.propose:
                    if repeat:  # the second answer plans anew: another base action
                        emit(
                            topics.POLICY_ACTION,
                            answer_log + 600_000,
                            ser.trajectory(s, tag, base_chunk[::-1].copy(), residual_chunk),
                        )
                        trace.duplicates["action"] += 1
                    else:
                        emit(
                            topics.POLICY_ACTION,
                            answer_log + 600_000,
                            ser.trajectory(s, tag, base_chunk, residual_chunk),
                        )
                if not step_plan.no_command:
                    for j, (ctag, cmd) in enumerate(commands):
                        if repeat and j == 0:
                            cmd = np.clip(cmd + 0.5, -1, 1)  # a different (stale) command
                            trace.duplicates["command"] += 1
                        elif repeat:
                            continue
                        emit(
                            topics.COMMAND,
                            answer_log + 700_000 + 50_000 * j,
                            ser.joint_state(s, ctag, list(topics.ACTION_NAMES), cmd),
                        )
            executed_tag, executed = commands[0]
            if executed_tag == "teleop" or executed_tag.startswith("hold:"):
                if step_plan.propose:
                    base, residual = proposal
                else:
                    base, residual = np.zeros(4), np.zeros(4)
            else:
                base, residual = proposal
            gripper = float(executed[3])
            if not last:
                # transition k: obs[k] --command--> obs[k+1], judged by reward(k+1)
                pending = dict(
                    bag_episode=episode,
                    step=k,
                    obs=obs[k],
                    next_obs=obs[k + 1],
                    action=executed,
                    base=base,
                    residual=residual,
                    tag=executed_tag,
                    task=ep.task,
                    intervention=int(executed_tag == "teleop"),
                    skip=step_plan.no_command,
                )
                answered[k] = pending
            if step_plan.resend:
                tick[0] += 21  # the simulator waited lockstep_timeout_s before re-sending
        # rewards decide the transitions' reward/flags
        for k in range(ep.length):
            p = answered[k]
            nxt = ep.steps.get(k + 1, StepPlan())
            if nxt.no_reward:
                trace.dropped["no_reward"] += 1
                continue
            if p["skip"]:
                trace.dropped["no_command"] += 1
                continue
            last = k + 1 == ep.length
            trace.expected.append(
                Expected(
                    bag_episode=episode,
                    step=k,
                    obs=p["obs"].astype(np.float32),
                    next_obs=p["next_obs"].astype(np.float32),
                    action=np.asarray(p["action"], dtype=np.float32),
                    base=np.asarray(p["base"], dtype=np.float32),
                    residual=np.asarray(p["residual"], dtype=np.float32),
                    reward=float(rewards[k + 1]),
                    terminal=int(last and ep.end == "success"),
                    truncated=int(last and ep.end in ("timeout", "reset")),
                    success=int(last and ep.end == "success"),
                    intervention=p["intervention"],
                    tag=p["tag"],
                    task=p["task"],
                )
            )
            trace.parts[(episode, k)] = [stamps[k], stamps[k + 1], reward_logs[k + 1]]
        if ep.end == "reset":
            # sim_robot's reset: one more sample of the same state and step, truncated
            s = next_stamp()
            k = ep.length
            status = [episode, k, 0.0, 0.0, 1.0, 0.0]
            emit_js(topics.ROBOT_STATUS, s + 100_000, s, "", topics.ROBOT_STATUS_FIELDS, status)
            emit_js(topics.TASK_STATE, s + 110_000, s, ep.task, [], obs[k])
            emit_js(topics.OBSERVATION, s + 300_000, s, "state", [], obs[k])
            reward_msg = [0.0, 0.0, 0.0, 0.0, 1.0, float(episode), float(k)]
            emit_js(topics.REWARD, s + 400_000, s, "", topics.REWARD_FIELDS, reward_msg)
            trace.parts[(episode, k - 1)].append(s + 400_000)
        for extra in range(ep.after_end):
            # the simulator goes on after the reward node ended the episode: not transitions
            s = next_stamp()
            k = ep.length + 1 + extra
            status = [episode, k, 1.0, 0.0, 0.0, 0.0]
            emit_js(topics.ROBOT_STATUS, s + 100_000, s, "", topics.ROBOT_STATUS_FIELDS, status)
            emit_js(topics.OBSERVATION, s + 300_000, s, "state", [], rng.uniform(-1, 1, OBS_DIM))
            reward_msg = [0.0, 1.0, 0.0, 0.0, 0.0, float(episode), float(k)]
            emit_js(topics.REWARD, s + 400_000, s, "", topics.REWARD_FIELDS, reward_msg)
            trace.dropped["after_episode_end"] += 1
        emit(topics.EPISODE, stamps[-1] + 900_000, ser.string(f'{{"episode": {episode}}}'))
    events.sort(key=lambda e: (e[0], e[1]))
    trace.messages = [(topic, log_ns, data) for log_ns, _, topic, data in events]
    return trace


# --------------------------------------------------------------------------- writing bags
def write_recorder_bag(
    path: Path,
    messages: list[tuple[str, int, bytes]],
    *,
    storage: str = "mcap",
    split_s: float = 0.1,
    close: bool = True,
) -> SplitBagWriter:
    """The way the vlarl recorder writes: SplitBagWriter, split by duration."""
    writer = SplitBagWriter(path, max_duration_s=split_s, storage=storage, fsync=False)
    for topic, msgtype in TOPIC_TYPES.items():
        writer.add_topic(topic, msgtype)
    for topic, log_ns, data in messages:
        writer.write(topic, log_ns, data)
    if close:
        writer.close()
    return writer


def write_stock_bag(
    path: Path,
    messages: list[tuple[str, int, bytes]],
    *,
    storage: str,
    splits: int,
    compression: str = "",
    short_types: bool = False,
    namespace: str = "",
) -> list[Path]:
    """Like stock ``ros2 bag record`` with splitting: ``<bag>/<bag>_<k>.<ext>`` files, each
    written by rosbags' own Writer, and one metadata.yaml (rosbags' layout) listing them all.

    ``compression``: "file" (each split zstd-compressed to ``<bag>_<k>.<ext>.zstd``, as
    ``--compression-mode file``) or "message" (every message zstd-compressed); ``short_types``
    spells types ``pkg/Type`` (older rosbag2, its own test bags); ``namespace`` records every
    topic under it (``/ns/observation``, ...)."""
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    ext = ".mcap" if storage == "mcap" else ".db3"
    if compression:
        assert compression in ("file", "message")
    suffix = ext + ".zstd" if compression == "file" else ext
    prefix = "/" + namespace.strip("/") if namespace.strip("/") else ""
    path.mkdir(parents=True)
    bounds = np.array_split(np.arange(len(messages)), splits)
    files: list[Path] = []
    documents: list[dict[str, Any]] = []
    for k, idx in enumerate(bounds):
        stage = path.parent / f".stage-{path.name}-{k}"
        writer = Writer(stage, version=9, storage_plugin=plugin)
        if compression:
            writer.set_compression(
                CompressionMode.FILE if compression == "file" else CompressionMode.MESSAGE,
                CompressionFormat.ZSTD,
            )
        writer.open()
        conns = {}
        for topic, msgtype in TOPIC_TYPES.items():
            name = msgtype.replace("/msg/", "/") if short_types else msgtype
            msgdef, _ = TS.generate_msgdef(msgtype, ros_version=2)
            conns[topic] = writer.add_connection(
                prefix + topic, name, msgdef=msgdef, rihs01=TS.hash_rihs01(msgtype)
            )
        for i in idx:
            topic, log_ns, data = messages[int(i)]
            writer.write(conns[topic], log_ns, data)
        writer.close()
        (produced,) = [p for p in stage.iterdir() if p.name.endswith(suffix)]
        target = path / f"{path.name}_{k}{suffix}"
        produced.rename(target)
        documents.append(yaml.safe_load((stage / "metadata.yaml").read_text()))
        shutil.rmtree(stage)
        files.append(target)
    info = documents[0]["rosbag2_bagfile_information"]
    infos = [d["rosbag2_bagfile_information"] for d in documents]
    info["relative_file_paths"] = [f.name for f in files]
    info["files"] = [{**i["files"][0], "path": f.name} for i, f in zip(infos, files, strict=True)]
    info["message_count"] = sum(i["message_count"] for i in infos)
    counts: Counter[str] = Counter()
    for i in infos:
        for t in i["topics_with_message_count"]:
            counts[t["topic_metadata"]["name"]] += t["message_count"]
    for t in info["topics_with_message_count"]:
        t["message_count"] = counts[t["topic_metadata"]["name"]]
    start = min(i["starting_time"]["nanoseconds_since_epoch"] for i in infos)
    end = max(
        i["starting_time"]["nanoseconds_since_epoch"] + i["duration"]["nanoseconds"] for i in infos
    )
    info["starting_time"]["nanoseconds_since_epoch"] = start
    info["duration"]["nanoseconds"] = end - start
    (path / "metadata.yaml").write_text(yaml.safe_dump(documents[0], sort_keys=False))
    return files


def rows_by_key(replay: Any) -> dict[tuple[int, int], dict[str, Any]]:
    """Replay rows keyed by (replay episode, step), with version/task names resolved."""
    data = replay.data
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for i in range(len(data)):
        key = (int(data.episode[i]), int(data.step[i]))
        assert key not in out, f"duplicate transition {key}"
        out[key] = {
            "obs": data.obs[i],
            "next_obs": data.next_obs[i],
            "action": data.action[i],
            "base": data.base_action[i],
            "residual": data.residual[i],
            "reward": float(data.reward[i]),
            "terminal": int(data.terminal[i]),
            "truncated": int(data.truncated[i]),
            "success": int(data.success[i]),
            "intervention": int(data.intervention[i]),
            "tag": replay.versions[int(data.policy_version[i])],
            "task": replay.tasks[int(data.task[i])],
        }
    return out


def match_rows(
    replay: Any, expected: list[Expected], *, exact: bool = True
) -> dict[tuple[int, int], tuple[int, int]]:
    """Map each replay episode to one bag episode and compare every row to the ground truth.

    With ``exact`` every expected transition must be present; otherwise the rows must be a
    subset. Returns {(bag episode, step): (replay episode, step)}.
    """
    rows = rows_by_key(replay)
    truth = {(e.bag_episode, e.step): e for e in expected}
    # the replay episode of a row is found through its observation (unique random vectors)
    by_obs = {e.obs.tobytes(): (e.bag_episode, e.step) for e in expected}
    mapping: dict[tuple[int, int], tuple[int, int]] = {}
    episode_map: dict[int, int] = {}
    for key, row in rows.items():
        truth_key = by_obs.get(row["obs"].tobytes())
        assert truth_key is not None, f"row {key} matches no expected transition"
        assert episode_map.setdefault(key[0], truth_key[0]) == truth_key[0]
        assert key[1] == truth_key[1], f"row {key}: step {key[1]}, expected {truth_key[1]}"
        e = truth[truth_key]
        check: Callable[[str, Any], None]

        def check(name: str, want: Any, row: dict[str, Any] = row, key: Any = key) -> None:
            got = row[name]
            if isinstance(want, np.ndarray):
                assert np.array_equal(got, want), f"{key} {name}: {got} != {want}"
            else:
                assert got == want, f"{key} {name}: {got!r} != {want!r}"

        check("next_obs", e.next_obs)
        check("action", e.action)
        check("base", e.base)
        check("residual", e.residual)
        check("reward", float(np.float32(e.reward)))
        for flag in ("terminal", "truncated", "success", "intervention", "tag", "task"):
            check(flag, getattr(e, flag))
        mapping[truth_key] = key
    if exact:
        assert set(mapping) == set(truth), f"missing: {sorted(set(truth) - set(mapping))}"
    assert len(set(episode_map.values())) == len(episode_map)  # one replay id per bag episode
    return mapping
