"""ros2 launch vlarl bringup.launch.py [task:=...] [model:=...] [record:=true] [learn:=false]
[action_offset:=0,0,0,0] [mode:=lockstep] [rviz:=false] [use_sim_time:=false] ...

Brings up the same node graph as ``vlarl bringup`` (the PyPI-only path) from one description:
the node list (:data:`vlarl.graph.GRAPH`), the parameter files under ``config/`` and the per-run
parameters :func:`vlarl.graph.node_overrides` makes from the arguments (the fields of
:class:`vlarl.graph.GraphArguments`, which are also ``vlarl bringup``'s options). The arguments
are checked before any node starts (unknown task, a model that is missing, corrupt or does not
know the task). ``launch`` and ``launch_ros`` are imported only inside
:func:`generate_launch_description`, so :func:`node_parameters` can be imported and compared
with ``vlarl bringup`` without a ROS 2 install.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlarl.graph import (
    NODES_BY_NAME,
    GraphArguments,
    NodeSpec,
    argument_help,
    check_arguments,
    config_path,
    node_names,
    node_overrides,
    package_root,
)

# Arguments only the launch file has (RViz needs a ROS 2 install).
LAUNCH_ONLY: dict[str, tuple[str, str]] = {
    "rviz": ("false", "start RViz2 and robot_state_publisher"),
}


def _launch_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def launch_arguments() -> dict[str, tuple[str, str]]:
    """Every launch argument: name -> (default, description)."""
    defaults = GraphArguments()
    declared = {
        f.name: (_launch_text(getattr(defaults, f.name)), argument_help(f.name))
        for f in fields(GraphArguments)
    }
    return {**declared, **LAUNCH_ONLY}


def node_parameters(
    values: Mapping[str, str], *, run_dir: Path, bag_name: str
) -> list[tuple[NodeSpec, list[Any]]]:
    """The nodes to start, each with its ``parameters`` list (files, then this run's values).

    ``values`` are the launch arguments as strings. This is what the launch description starts;
    ``vlarl bringup`` builds its command lines from the same :func:`node_overrides`.
    """
    args = GraphArguments.from_strings(values)
    check_arguments(args)
    overrides = node_overrides(args, run_dir=run_dir, bag_name=bag_name)
    plan = []
    for name in node_names(args):
        spec = NODES_BY_NAME[name]
        files = [str(config_path("common.yaml")), str(config_path(spec.params_file))]
        plan.append((spec, [*files, overrides[name]]))
    return plan


def _graph_nodes(context: Any) -> list[Any]:
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    values = {name: LaunchConfiguration(name).perform(context) for name in launch_arguments()}
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    plan = node_parameters(
        values,
        run_dir=Path("runs") / f"launch-{stamp}",
        bag_name=f"vlarl-{values['task']}-{stamp}",
    )
    return [
        Node(
            package="vlarl",
            executable=spec.executable,
            name=spec.name,
            parameters=parameters,
            output="screen",
            emulate_tty=True,
        )
        for spec, parameters in plan
    ]


def generate_launch_description() -> Any:
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
    from launch.conditions import IfCondition
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node
    from launch_ros.parameter_descriptions import ParameterValue

    share = package_root()
    rviz = LaunchConfiguration("rviz")
    sim_time = ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)
    arguments = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, (default, description) in launch_arguments().items()
    ]
    with open(share / "urdf" / "sawyer.urdf", encoding="utf-8") as handle:
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
            arguments=["-d", str(share / "rviz" / "vlarl.rviz")],
            parameters=[{"use_sim_time": sim_time}],
            condition=IfCondition(rviz),
        ),
    ]
    return LaunchDescription(
        [
            *arguments,
            # Network hygiene: stay on this machine unless the user exported another range.
            SetEnvironmentVariable(
                "ROS_AUTOMATIC_DISCOVERY_RANGE",
                os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST"),
            ),
            OpaqueFunction(function=_graph_nodes),
            *viz,
        ]
    )
