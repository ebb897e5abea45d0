"""The control-path nodes' parameter files agree with their parameter tables.

Every key of config/policy.yaml and config/safety.yaml is declared and valid, and the executor
and real-time defaults of file and table are the same (the events executor, normal scheduling).
"""

from __future__ import annotations

import pytest
import yaml

from vlarl.graph import config_path


def table(node: str):  # type: ignore[no-untyped-def]
    if node == "policy":
        from vlarl.nodes.policy import PARAMS
    else:
        from vlarl.nodes.safety import PARAMS
    return {p.name: p for p in PARAMS}


@pytest.mark.parametrize("node", ["policy", "safety"])
def test_parameter_file_matches_table(node: str) -> None:
    values = yaml.safe_load(config_path(f"{node}.yaml").read_text())[node]["ros__parameters"]
    params = table(node)
    for name, value in values.items():
        assert name in params, f"config/{node}.yaml sets undeclared {name}"
        assert params[name].check(value) is None, (name, value, params[name].check(value))
    assert values["executor"] == params["executor"].default == "events"
    assert values["realtime_priority"] == params["realtime_priority"].default == 0


def test_policy_offers_no_multi_threaded_executor() -> None:
    assert table("policy")["executor"].check("multi_threaded") is not None
