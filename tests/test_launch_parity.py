"""The launch file and ``vlarl bringup`` give every node the same parameters.

The launch file's own description-building function (:func:`node_parameters`, what its
``OpaqueFunction`` starts) is imported from ``launch/bringup.launch.py`` (``launch`` and
``launch_ros`` are not on PyPI); ``vlarl bringup``'s side is the command line each node process
gets. Both are reduced to the parameters the node ends up with: its section of every parameter
file in order, then the overrides (``-p node:key:=value`` values are YAML, as rcl reads them).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from vlarl import bringup
from vlarl.graph import (
    LEARN_RESIDUAL_NOISE_STD,
    LEARN_SPLIT_S,
    NODES_BY_NAME,
    GraphArgumentError,
    GraphArguments,
    node_command,
    node_overrides,
    package_root,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = package_root() / "models" / "pick-place-v3-student.onnx"
needs_model = pytest.mark.skipif(not MODEL.exists(), reason="default model not built")


def _launch_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bringup_launch", ROOT / "launch/bringup.launch.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _file_section(path: str, node: str) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    params: dict[str, Any] = {}
    for key in ("/**", node, f"/{node}"):
        params.update((data.get(key) or {}).get("ros__parameters", {}))
    return params


def _from_launch(parameters: list[Any], node: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for entry in parameters:
        merged.update(_file_section(entry, node) if isinstance(entry, str) else entry)
    return merged


def _from_command(cmd: list[str], node: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for flag, value in itertools.pairwise(cmd):
        if flag == "--params-file":
            merged.update(_file_section(value, node))
        elif flag == "-p":
            target, _, text = value.partition(":=")
            owner, _, key = target.partition(":")
            assert owner == node, value
            merged[key] = yaml.safe_load(text)
    return merged


def _as_lists(params: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


# The same run asked both ways: bringup's flags, the launch file's name:=value arguments.
CASES = {
    "defaults": ([], {}),
    "learn": (
        ["--learn", "--action-offset", "0,0.2,0,0", "--task", "pick-place-v3"],
        {"learn": "true", "action_offset": "0,0.2,0,0", "task": "pick-place-v3"},
    ),
    "learn-own-model-and-split": (
        ["--learn", "--model", str(MODEL), "--split-s", "3", "--replay-dir", "/tmp/r"],
        {"learn": "true", "model": str(MODEL), "split_s": "3", "replay_dir": "/tmp/r"},
    ),
    "no-record-realtime": (
        ["--no-record", "--mode", "realtime", "--camera-rate", "0", "--seed", "7"],
        {"record": "false", "mode": "realtime", "camera_rate": "0", "seed": "7"},
    ),
    "sim-time-steps": (
        ["--use-sim-time", "--max-episode-steps", "150", "--bag-dir", "/tmp/b"],
        {"use_sim_time": "true", "max_episode_steps": "150", "bag_dir": "/tmp/b"},
    ),
}


@needs_model
@pytest.mark.parametrize("case", sorted(CASES))
def test_launch_and_bringup_give_every_node_the_same_parameters(case: str) -> None:
    flags, launch_values = CASES[case]
    launch = _launch_module()
    run_dir, bag_name = Path("/tmp/vlarl-run"), "vlarl-test-bag"
    values = {name: default for name, (default, _) in launch.launch_arguments().items()}
    values.update(launch_values)
    plan = launch.node_parameters(values, run_dir=run_dir, bag_name=bag_name)
    from_launch = {spec.name: _as_lists(_from_launch(params, spec.name)) for spec, params in plan}

    parser = argparse.ArgumentParser()
    bringup.add_arguments(parser)
    args = bringup.graph_arguments(parser.parse_args(flags))
    overrides = node_overrides(args, run_dir=run_dir, bag_name=bag_name)
    from_bringup = {
        name: _from_command(node_command(NODES_BY_NAME[name], overrides=extra), name)
        for name, extra in overrides.items()
    }
    assert list(from_launch) == list(from_bringup)
    for name in from_bringup:
        assert from_launch[name] == from_bringup[name], name
    # What the issue found drifting: learner's model and task, noise, split, offset.
    if args.learn:
        assert from_bringup["learner"]["base_model"] == from_bringup["policy"]["model"]
        assert from_bringup["learner"]["task"] == from_bringup["sim_robot"]["task"]
        assert from_bringup["policy"]["residual_noise_std"] == LEARN_RESIDUAL_NOISE_STD
        assert from_bringup["recorder"]["split_duration_s"] == (args.split_s or LEARN_SPLIT_S)
        assert "bridge" in from_bringup
    else:
        assert "learner" not in from_bringup and "bridge" not in from_bringup
    offset = [float(v) for v in args.action_offset.split(",")]
    assert from_launch["sim_robot"]["action_offset"] == offset
    assert ("recorder" in from_launch) == args.record


def test_every_graph_argument_is_a_launch_argument_and_a_bringup_flag() -> None:
    launch = _launch_module()
    parser = argparse.ArgumentParser()
    bringup.add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    declared = launch.launch_arguments()
    for name, value in vars(GraphArguments()).items():
        assert defaults[name] == value, name
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        assert declared[name][0] == text, name
    assert {"task", "model", "record", "learn", "action_offset", "mode", "rviz"} <= set(declared)


@needs_model
def test_launch_refuses_bad_arguments_before_any_node() -> None:
    launch = _launch_module()
    values = {name: default for name, (default, _) in launch.launch_arguments().items()}
    for bad, reason in (
        ({"task": "reach-v3"}, "does not know task"),
        ({"task": "nope-v3"}, "unknown Meta-World task"),
        ({"model": "/nonexistent/model.onnx"}, "not found"),
        ({"learn": "yes"}, "not a bool"),
        ({"action_offset": "0,2,0,0"}, "action offset"),
        ({"learn": "true", "record": "false"}, "needs the recording"),
    ):
        with pytest.raises(GraphArgumentError, match=reason):
            launch.node_parameters({**values, **bad}, run_dir=Path("/tmp/x"), bag_name="b")


def test_reward_node_gets_models_that_know_the_task() -> None:
    from vlarl.rewardmodels.modelfile import load_model_file

    for task in ("pick-place-v3", "push-v3", "door-open-v3"):
        reward = node_overrides(GraphArguments(task=task), run_dir=Path("r"), bag_name="b")[
            "reward"
        ]
        assert reward["task"] == task
        for key, kind in (("detector_model", "success-detector"), ("progress_model", "progress")):
            assert reward[key], (task, key)
            loaded = load_model_file(reward[key], kind=kind)
            assert task in loaded.metadata.tasks, (task, key)
    # A task no packaged model knows: no learned reward model at all.
    reward = node_overrides(GraphArguments(task="soccer-v3"), run_dir=Path("r"), bag_name="b")
    assert reward["reward"]["detector_model"] == reward["reward"]["progress_model"] == ""
