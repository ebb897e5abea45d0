"""Network hygiene for DDS, applied before rclpy starts.

DDS discovers peers by multicast unless told otherwise. Every entry point of vlarl calls
:func:`ensure_local_discovery` before ``import rclpy`` so that, unless the user opted in to
multi-machine discovery by setting ``ROS_AUTOMATIC_DISCOVERY_RANGE`` themselves, no packet
leaves loopback.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_DISCOVERY_RANGE = "LOCALHOST"


def ensure_local_discovery(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Default ROS_AUTOMATIC_DISCOVERY_RANGE to LOCALHOST and the RMW to Fast DDS.

    Values the user already set are kept (multi-machine use is opt-in).
    """
    target = os.environ if env is None else env
    target.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", DEFAULT_DISCOVERY_RANGE)
    target.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return target


def child_env(
    *, domain_id: int | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment for a child process of the graph: local discovery, optional domain id."""
    env = dict(os.environ)
    ensure_local_discovery(env)
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    env.setdefault("MUJOCO_GL", "osmesa")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env
