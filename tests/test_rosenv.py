"""DDS stays on loopback unless the user opted in."""

from __future__ import annotations

from vlarl.rosenv import child_env, ensure_local_discovery


def test_defaults_to_localhost() -> None:
    env: dict[str, str] = {}
    ensure_local_discovery(env)
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"


def test_keeps_an_explicit_choice() -> None:
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET"}
    ensure_local_discovery(env)
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SUBNET"


def test_child_env_sets_domain() -> None:
    env = child_env(domain_id=42)
    assert env["ROS_DOMAIN_ID"] == "42"
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] in ("LOCALHOST", "SUBNET", "SYSTEM_DEFAULT", "OFF")
