"""vlarl: a ROS 2 stack with which a robot improves its own policy while it works.

The Python API (README, "Python API") is the names in ``__all__``. They load on first use, so
``import vlarl`` stays cheap for the node processes and the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS: dict[str, str] = {
    "OnnxPolicy": "vlarl.core.onnx_policy",
    "ContractError": "vlarl.contract",
    "MetaWorldRobot": "vlarl.sim.robot",
    "SafetyConfig": "vlarl.core.safety",
    "SafetyFilter": "vlarl.core.safety",
    "ReplayWriter": "vlarl.data.replay",
    "load_replay": "vlarl.data.replay",
    "encode_residual": "vlarl.core.weights",
    "decode_residual": "vlarl.core.weights",
    "EvaluateConfig": "vlarl.learning.evaluate",
    "evaluate": "vlarl.learning.evaluate",
    "GraphArguments": "vlarl.graph",
    "node_overrides": "vlarl.graph",
    "start_node": "vlarl.graph",
}
__all__ = [
    "ContractError",
    "EvaluateConfig",
    "GraphArguments",
    "MetaWorldRobot",
    "OnnxPolicy",
    "ReplayWriter",
    "SafetyConfig",
    "SafetyFilter",
    "__version__",
    "decode_residual",
    "encode_residual",
    "evaluate",
    "load_replay",
    "node_overrides",
    "start_node",
]

if TYPE_CHECKING:
    from vlarl.contract import ContractError
    from vlarl.core.onnx_policy import OnnxPolicy
    from vlarl.core.safety import SafetyConfig, SafetyFilter
    from vlarl.core.weights import decode_residual, encode_residual
    from vlarl.data.replay import ReplayWriter, load_replay
    from vlarl.graph import GraphArguments, node_overrides, start_node
    from vlarl.learning.evaluate import EvaluateConfig, evaluate
    from vlarl.sim.robot import MetaWorldRobot


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlarl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
