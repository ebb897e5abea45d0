"""Layouts of the embedded robot's vectors, importable without MuJoCo or Meta-World.

The 39-d Meta-World v3 state (``robot/task_state``):

    [0:3]   hand (end-effector) xyz, metres
    [3]     gripper opening, 0 (closed) .. 1 (open)
    [4:7]   first object xyz          [7:11]  first object quaternion (w, x, y, z)
    [11:18] second object pose (xyz + quaternion), zeros when the task has one object
    [18:36] the previous frame of [0:18]
    [36:39] goal xyz
"""

from __future__ import annotations

DEFAULT_TASK = "pick-place-v3"
STATE_DIM = 39
ACTION_DIM = 4
CONTROL_DT = 0.0125  # Meta-World v3: frame_skip 5 x timestep 0.0025 s
MAX_EPISODE_STEPS = 500

HAND = slice(0, 3)
GRIPPER = 3
OBJECT = slice(4, 7)
OBJECT_QUAT = slice(7, 11)
GOAL = slice(36, 39)
PROPRIO = slice(0, 4)  # hand xyz + gripper opening: what the arm knows about itself

# sensor_msgs/JointState names of the Sawyer arm and its two finger slides, in this order.
JOINT_NAMES: tuple[str, ...] = (
    "right_j0",
    "right_j1",
    "right_j2",
    "right_j3",
    "right_j4",
    "right_j5",
    "right_j6",
    "r_close",
    "l_close",
)

# The privileged-state features a learned pose estimator regresses from a camera image, as
# (name, index into the 39-d state).
POSE_FEATURES: tuple[tuple[str, int], ...] = (
    ("hand_x", 0),
    ("hand_y", 1),
    ("hand_z", 2),
    ("gripper", 3),
    ("obj_x", 4),
    ("obj_y", 5),
    ("obj_z", 6),
    ("goal_x", 36),
    ("goal_y", 37),
    ("goal_z", 38),
)
POSE_FEATURE_NAMES: tuple[str, ...] = tuple(name for name, _ in POSE_FEATURES)
POSE_FEATURE_INDEX: tuple[int, ...] = tuple(index for _, index in POSE_FEATURES)
