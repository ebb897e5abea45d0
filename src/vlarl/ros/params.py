"""Declare node parameters from one table, with descriptors, and validate every change.

A node lists its parameters as :class:`Param` rows; :func:`declare` declares them with
``ParameterDescriptor`` (description, ranges, read-only) and installs one set-parameters
callback that checks types, ranges and choices, then hands accepted values to the node's
``on_change`` hook (which may still refuse with a reason, e.g. a model file that does not load).
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.parameter import Parameter

_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}


@dataclass(frozen=True, slots=True)
class Param:
    """One declared parameter: name, default, one-line description and optional bounds."""

    name: str
    default: bool | int | float | str | list[float]
    description: str
    low: float | None = None
    high: float | None = None
    choices: Sequence[str] | None = None
    read_only: bool = False

    def check(self, value: Any) -> str | None:
        """Reason the value is not acceptable, or None."""
        if isinstance(self.default, bool):
            return None if isinstance(value, bool) else f"{self.name} must be a bool"
        if isinstance(self.default, list):
            # Values that come through the parameter services arrive as array.array('d').
            if not isinstance(value, (list, tuple, array.array)) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in value
            ):
                return f"{self.name} must be a list of finite numbers"
            if len(value) != len(self.default):
                return f"{self.name} must have {len(self.default)} numbers"
            if self.low is not None and min(value) < self.low:
                return f"{self.name} entries must be >= {self.low}"
            if self.high is not None and max(value) > self.high:
                return f"{self.name} entries must be <= {self.high}"
            return None
        if isinstance(self.default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{self.name} must be a number"
            if isinstance(self.default, int) and not isinstance(value, int):
                return f"{self.name} must be an integer"
            if not math.isfinite(value):
                return f"{self.name} must be finite"
            if self.low is not None and value < self.low:
                return f"{self.name} must be >= {self.low}, got {value}"
            if self.high is not None and value > self.high:
                return f"{self.name} must be <= {self.high}, got {value}"
            return None
        if not isinstance(value, str):
            return f"{self.name} must be a string"
        if self.choices is not None and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        return None

    def descriptor(self) -> ParameterDescriptor:
        desc = ParameterDescriptor(description=self.description, read_only=self.read_only)
        if isinstance(self.default, list):
            desc.type = ParameterType.PARAMETER_DOUBLE_ARRAY
        else:
            desc.type = _TYPES[type(self.default)]
        if isinstance(self.default, float) and (self.low is not None or self.high is not None):
            desc.floating_point_range = [
                FloatingPointRange(
                    from_value=-math.inf if self.low is None else float(self.low),
                    to_value=math.inf if self.high is None else float(self.high),
                    step=0.0,
                )
            ]
        elif (
            isinstance(self.default, int)
            and not isinstance(self.default, bool)
            and self.low is not None
            and self.high is not None
        ):
            desc.integer_range = [
                IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)
            ]
        if self.choices is not None:
            desc.additional_constraints = "one of: " + ", ".join(self.choices)
        return desc


OnChange = Callable[[dict[str, Any]], str | None]


def _plain(spec: Param, value: Any) -> Any:
    """ints given for float parameters as float; double arrays (array.array) as lists."""
    if isinstance(spec.default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, array.array):
        return value.tolist()
    return value


def declare(
    node: Node, params: Sequence[Param], on_change: OnChange | None = None
) -> dict[str, Any]:
    """Declare ``params`` on ``node``; return their current values by name.

    Values given at start-up (parameter files, ``--ros-args -p``) are validated too: a bad one
    raises ``ValueError`` so the node refuses to start rather than run with it.
    ``on_change`` receives the accepted new values of a set-parameters call and returns a
    reason string to refuse them, or None to accept.
    """
    by_name = {p.name: p for p in params}
    values: dict[str, Any] = {}
    for p in params:
        value = _plain(p, node.declare_parameter(p.name, p.default, p.descriptor()).value)
        reason = p.check(value)
        if reason is not None:
            raise ValueError(f"{node.get_name()}: bad parameter: {reason}")
        values[p.name] = value

    def callback(changes: list[Parameter]) -> SetParametersResult:
        accepted: dict[str, Any] = {}
        for change in changes:
            spec = by_name.get(change.name)
            if spec is None:
                continue  # parameters rclpy itself owns (use_sim_time, ...)
            value = _plain(spec, change.value)
            reason = spec.check(value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
            accepted[change.name] = value
        if accepted and on_change is not None:
            reason = on_change(accepted)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        values.update(accepted)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(callback)
    return values


def params_from_config(
    cls: type[Any],
    *,
    read_only: Sequence[str] = (),
    bounds: dict[str, tuple[float | None, float | None]] | None = None,
    choices: dict[str, Sequence[str]] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[Param, ...]:
    """One :class:`Param` per leaf field of a (nested) config dataclass, in field order: the
    dataclass default is the parameter's default and its one-line doc (``arg(help=...)``) the
    description, so the node's parameters cannot drift from the config. Numbers without
    explicit ``bounds`` must be >= 0."""
    from vlarl.learning.runs import flat_fields

    bounds = bounds or {}
    choices = choices or {}
    out = []
    for name, (f, _typ) in flat_fields(cls).items():
        if name in exclude:
            continue
        default: Any = f.default_factory() if callable(f.default_factory) else f.default
        low, high = bounds.get(name, (None, None))
        if (
            name not in bounds
            and isinstance(default, (int, float))
            and not isinstance(default, bool)
        ):
            low = 0
        out.append(
            Param(
                name,
                list(default) if isinstance(default, tuple) else default,
                f.metadata.get("help", ""),
                low=low,
                high=high,
                choices=choices.get(name),
                read_only=name in read_only,
            )
        )
    return tuple(out)
