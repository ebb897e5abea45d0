"""Test-wide settings: DDS stays on loopback, and every test process gets its own domain."""

from __future__ import annotations

import os

# Before anything imports rclpy: no multicast off this machine.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
