"""ros2 launch vlarl bringup.launch.py [task:=...] [model:=...] [record:=true] [rviz:=false]
[use_sim_time:=false] [mode:=lockstep]

Brings up the same node graph as ``vlarl bringup`` (the PyPI-only path), from the same node
list (:data:`vlarl.graph.GRAPH`) and the same parameter files under ``config/``.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from vlarl.graph import GRAPH, LEARNING

SHARE = get_package_share_directory("vlarl")


def _config(name: str) -> str:
    return os.path.join(SHARE, "config", name)


def generate_launch_description() -> LaunchDescription:
    task = LaunchConfiguration("task")
    model = LaunchConfiguration("model")
    record = LaunchConfiguration("record")
    rviz = LaunchConfiguration("rviz")
    use_sim_time = LaunchConfiguration("use_sim_time")
    mode = LaunchConfiguration("mode")
    learn = LaunchConfiguration("learn")
    sim_time = ParameterValue(use_sim_time, value_type=bool)

    arguments = [
        DeclareLaunchArgument("task", default_value="pick-place-v3", description="Meta-World task"),
        DeclareLaunchArgument(
            "model",
            default_value=os.path.join(SHARE, "models", "pick-place-v3-student.onnx"),
            description="ONNX policy meeting the vlarl model contract",
        ),
        DeclareLaunchArgument("record", default_value="true", description="record a rosbag2"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz2"),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false", description="nodes follow /clock"
        ),
        DeclareLaunchArgument(
            "mode", default_value="lockstep", description="simulator pacing: lockstep | realtime"
        ),
        DeclareLaunchArgument(
            "learn",
            default_value="false",
            description="also start the bag bridge and the residual RL learner",
        ),
        # Network hygiene: stay on this machine unless the user exported another range.
        SetEnvironmentVariable(
            "ROS_AUTOMATIC_DISCOVERY_RANGE",
            os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST"),
        ),
    ]

    per_node = {
        "sim_robot": {"task": task, "mode": mode},
        "policy": {"model": model, "task": task},
    }
    nodes = []
    for spec in GRAPH:
        params: list[object] = [_config("common.yaml"), _config(spec.params_file)]
        params.append({"use_sim_time": sim_time, **per_node.get(spec.name, {})})
        nodes.append(
            Node(
                package="vlarl",
                executable=spec.executable,
                name=spec.name,
                parameters=params,
                output="screen",
                emulate_tty=True,
                condition=IfCondition(record) if spec.name == "recorder" else None,
            )
        )

    for spec in LEARNING:
        nodes.append(
            Node(
                package="vlarl",
                executable=spec.executable,
                name=spec.name,
                parameters=[
                    _config("common.yaml"),
                    _config(spec.params_file),
                    {"use_sim_time": sim_time},
                ],
                output="screen",
                emulate_tty=True,
                condition=IfCondition(learn),
            )
        )

    with open(os.path.join(SHARE, "urdf", "sawyer.urdf"), encoding="utf-8") as handle:
        robot_description = handle.read()
    viz = [
        Node(
            package="robot_state_publisher",
            executable="robot_state_publisher",
            parameters=[{"robot_description": robot_description, "use_sim_time": sim_time}],
            condition=IfCondition(rviz),
        ),
        Node(
            package="rviz2",
            executable="rviz2",
            arguments=["-d", os.path.join(SHARE, "rviz", "vlarl.rviz")],
            parameters=[{"use_sim_time": sim_time}],
            condition=IfCondition(rviz),
        ),
    ]
    return LaunchDescription([*arguments, *nodes, *viz])
