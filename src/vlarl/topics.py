"""The one place where every topic and service of the graph is named and described.

Nodes import the names from here; the README's topic table is generated from ``TOPICS``
(``vlarl topics --markdown``) and a test checks that the two agree.

Conventions (see DESIGN.md): standard message types only; every control-path message carries a
header stamp; the stamp of an observation is the stamp of the simulator/sensor sample it was
made from, and every action/command reuses the stamp of the observation it answers, so a
transition can be assembled by stamp alone. Vectors without a natural standard type travel as
``sensor_msgs/JointState`` whose ``position`` holds the vector (``name`` lists the fields where the
layout is short enough to name; otherwise the layout is given below).
"""

from __future__ import annotations

from dataclasses import dataclass

# Action layout of the embedded robot (Meta-World): end-effector delta xyz + gripper, in [-1, 1].
ACTION_NAMES: tuple[str, ...] = ("dx", "dy", "dz", "gripper")
ACTION_DIM = len(ACTION_NAMES)

# Field names of the reward message (sensor_msgs/JointState.name), in order.
REWARD_FIELDS: tuple[str, ...] = (
    "reward",
    "success",
    "value",
    "terminal",
    "truncated",
    "episode",
    "step",
)
# Field names of the simulator status message, in order.
ROBOT_STATUS_FIELDS: tuple[str, ...] = (
    "episode",
    "step",
    "success",
    "terminal",
    "truncated",
    "env_reward",
)

CLOCK = "/clock"
CAMERA_IMAGE = "camera/image_raw"
JOINT_STATES = "joint_states"
TASK_STATE = "robot/task_state"
ROBOT_STATUS = "robot/status"
OBSERVATION = "observation"
POLICY_ACTION = "policy/action"
POLICY_STATUS = "policy/status"
COMMAND = "safety/command"
SAFETY_STATUS = "safety/status"
REWARD = "reward"
EPISODE = "reward/episode"
HUMAN_LABEL = "reward/human_label"
TELEOP = "teleop/twist"
POLICY_WEIGHTS = "policy_weights"
LEARNER_STATUS = "learner/status"
LEARNER_GATE = "learner/gate"
BRIDGE_STATUS = "bridge/status"
MARKERS = "visualization/markers"

# Services
SIM_RESET = "sim_robot/reset"
SAFETY_ESTOP = "safety/estop"
REWARD_LABEL = "reward/label"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One row of the topic table."""

    name: str
    msg_type: str
    publisher: str
    rate: str
    layout: str
    kind: str = "topic"


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(CLOCK, "rosgraph_msgs/Clock", "sim_robot", "every sim step", "simulated time"),
    TopicSpec(
        CAMERA_IMAGE,
        "sensor_msgs/Image",
        "sim_robot",
        "camera_rate_hz (5)",
        "rgb8, camera_width x camera_height (84x84), stamp = sim sample time",
    ),
    TopicSpec(
        JOINT_STATES,
        "sensor_msgs/JointState",
        "sim_robot",
        "control rate",
        "Sawyer right_j0..right_j6, r_close, l_close: position, velocity",
    ),
    TopicSpec(
        TASK_STATE,
        "sensor_msgs/JointState",
        "sim_robot",
        "control rate",
        "position = 39-d Meta-World state (hand xyz, gripper, object poses, previous frame, "
        "goal); frame_id = task name; privileged (development only)",
    ),
    TopicSpec(
        ROBOT_STATUS,
        "sensor_msgs/JointState",
        "sim_robot",
        "control rate",
        "name/position = " + ", ".join(ROBOT_STATUS_FIELDS) + "; same stamp as task_state",
    ),
    TopicSpec(
        OBSERVATION,
        "sensor_msgs/JointState",
        "perception",
        "control rate (state) / camera rate (image)",
        "position = observation vector (model contract obs); frame_id = 'state' or 'image'; "
        "stamp = source sample stamp",
    ),
    TopicSpec(
        POLICY_ACTION,
        "trajectory_msgs/JointTrajectory",
        "policy",
        "control rate",
        "joint_names = dx, dy, dz, gripper; points[0] = this tick, points[1:] = rest of the "
        "chunk; positions = base action, effort = residual; stamp = observation stamp; "
        "frame_id = policy version tag 'model@version+residual@version' (safety refuses any "
        "other: 'teleop' and 'hold:*' are its own)",
    ),
    TopicSpec(
        POLICY_STATUS,
        "std_msgs/String",
        "policy",
        "status_rate_hz (1)",
        "JSON: active model tag, path, providers, task, replan_every, residual tag, counters "
        "(ticks, published, dropped = malformed + failed + no_model, plans, swaps, refused), "
        "last_refusal; residual weights: residual_version, residual_history, weights_received "
        "/ accepted / refused, last_weight_refusal",
    ),
    TopicSpec(
        COMMAND,
        "sensor_msgs/JointState",
        "safety (only)",
        "control rate",
        "name = dx, dy, dz, gripper; position = command to the robot; stamp = observation "
        "stamp; frame_id = version tag of the action, 'teleop', or 'hold:<reason>'; sim_robot "
        "obeys only the safety node's publisher (gid checked)",
    ),
    TopicSpec(
        SAFETY_STATUS,
        "std_msgs/String",
        "safety",
        "status_rate_hz (2)",
        "JSON: state, holding reason, counters (commands, clamped, rejected by reason, "
        "watchdog_trips, estop latches / releases, relaxations_refused), last_rejection, "
        "last_estop_release",
    ),
    TopicSpec(
        REWARD,
        "sensor_msgs/JointState",
        "reward",
        "control rate",
        "name/position = " + ", ".join(REWARD_FIELDS) + "; stamp = state after the step",
    ),
    TopicSpec(
        EPISODE,
        "std_msgs/String",
        "reward",
        "once per episode",
        "JSON: episode, task, success, steps, return, success_source",
    ),
    TopicSpec(
        HUMAN_LABEL,
        "std_msgs/String",
        "reward",
        "per label",
        "JSON: stamp (ns of the latest status), episode, label (success/failure), success, task, "
        "applied (ended the episode: success_source human), success_source",
    ),
    TopicSpec(
        TELEOP,
        "geometry_msgs/TwistStamped",
        "teleoperation",
        "while intervening",
        "linear = delta xyz, angular.z = gripper; overrides the policy through safety",
    ),
    TopicSpec(
        BRIDGE_STATUS,
        "std_msgs/String",
        "bridge",
        "status_rate_hz (1)",
        "JSON: shards and rows written, poll errors, the cumulative bridge report (messages per "
        "topic, splits, bad splits with their error, dropped rows by reason)",
    ),
    TopicSpec(
        LEARNER_STATUS,
        "std_msgs/String",
        "learner",
        "status_rate_hz (1)",
        "JSON: transitions ingested, buffers, updates, version / deployed version, residual "
        "scale, published / gated candidates, recent success, episodes and successes per tag; "
        "gate: mode, phase, candidate and deployed tags, tally per arm, verdicts, hold, note",
    ),
    TopicSpec(
        LEARNER_GATE,
        "std_msgs/String",
        "learner",
        "once per verdict",
        "JSON: candidate, deployed (version tags), accepted, reason, probability, threshold, "
        "candidate / deployed episodes and successes, rule, env_steps; QoS reliable, transient "
        "local, depth 20",
    ),
    TopicSpec(
        POLICY_WEIGHTS,
        "std_msgs/UInt8MultiArray",
        "learner",
        "per accepted update",
        "safetensors blob of the residual actor (vlarl.core.weights, format vlarl.residual/1): "
        "tensors layer{i}.weight/bias; metadata model_id, version, parent, base, dims, scale, "
        "extra, digest; QoS reliable, transient local, depth 1 (late joiners get the latest)",
    ),
    TopicSpec(
        MARKERS,
        "visualization_msgs/MarkerArray",
        "visualization",
        "viz_rate_hz (10)",
        "command arrow at the end effector, planned chunk, residual, value/success text",
    ),
    TopicSpec(
        SIM_RESET,
        "std_srvs/Trigger",
        "sim_robot",
        "on request",
        "end the episode (truncated) and reset",
        kind="service",
    ),
    TopicSpec(
        SAFETY_ESTOP,
        "std_srvs/SetBool",
        "safety",
        "on request",
        "true latches a hold; false is refused: release with ros2 param set /safety "
        "estop_release '<who: why>' (logged)",
        kind="service",
    ),
    TopicSpec(
        REWARD_LABEL,
        "std_srvs/SetBool",
        "reward",
        "on request",
        "human label: true = success, false = failure; with success_source human it ends the "
        "episode in progress; always published on reward/human_label",
        kind="service",
    ),
)


def markdown_table() -> str:
    """The README's topic table."""
    rows = [
        "| name | kind | type | publisher | rate | layout |",
        "|---|---|---|---|---|---|",
    ]
    for spec in TOPICS:
        rows.append(
            f"| `{spec.name}` | {spec.kind} | `{spec.msg_type}` | {spec.publisher} | "
            f"{spec.rate} | {spec.layout} |"
        )
    return "\n".join(rows)
