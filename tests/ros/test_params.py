"""Parameter validation rules shared by every node (no ROS graph needed)."""

from __future__ import annotations

import math

import pytest

from vlarl.ros.params import Param


@pytest.mark.parametrize(
    ("param", "value", "ok"),
    [
        (Param("rate", 10.0, "Hz", low=0.0, high=100.0), 50.0, True),
        (Param("rate", 10.0, "Hz", low=0.0, high=100.0), 5, True),
        (Param("rate", 10.0, "Hz", low=0.0, high=100.0), -1.0, False),
        (Param("rate", 10.0, "Hz", low=0.0, high=100.0), 101.0, False),
        (Param("rate", 10.0, "Hz"), math.nan, False),
        (Param("rate", 10.0, "Hz"), math.inf, False),
        (Param("rate", 10.0, "Hz"), "fast", False),
        (Param("rate", 10.0, "Hz"), True, False),
        (Param("steps", 5, "n", low=1), 2.5, False),
        (Param("steps", 5, "n", low=1), 0, False),
        (Param("steps", 5, "n", low=1), 7, True),
        (Param("on", True, "flag"), False, True),
        (Param("on", True, "flag"), 1, False),
        (Param("mode", "a", "m", choices=("a", "b")), "b", True),
        (Param("mode", "a", "m", choices=("a", "b")), "c", False),
        (Param("box", [0.0, 1.0], "xy"), [2.0, 3.0], True),
        (Param("box", [0.0, 1.0], "xy"), [2.0], False),
        (Param("box", [0.0, 1.0], "xy"), [2.0, math.nan], False),
    ],
)
def test_param_check(param: Param, value: object, ok: bool) -> None:
    reason = param.check(value)
    assert (reason is None) is ok, reason
    if not ok:
        assert param.name in reason


def test_descriptor_carries_ranges_and_description() -> None:
    desc = Param("rate", 10.0, "control rate in Hz", low=1.0, high=1000.0).descriptor()
    assert desc.description == "control rate in Hz"
    assert desc.floating_point_range[0].from_value == 1.0
    assert desc.floating_point_range[0].to_value == 1000.0
