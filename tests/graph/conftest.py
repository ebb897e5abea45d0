"""Fixtures for graph tests: real node processes talking over DDS, with hard timeouts."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlarl.graph import RunningNode, start_node, stop_all

_domains = itertools.count()


@pytest.fixture
def domain_id() -> int:
    """A domain id for this test alone (different per test and per pytest process)."""
    return 1 + (os.getpid() * 13 + next(_domains) * 17) % 100


@pytest.fixture
def rclpy_context(domain_id: int) -> Iterator[object]:
    """An initialised rclpy context on the test's domain, shut down afterwards."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    try:
        yield context
    finally:
        context.try_shutdown()


@pytest.fixture
def graph_nodes(domain_id: int, tmp_path: Path) -> Iterator[list[RunningNode]]:
    """Start nodes with ``graph_nodes.append(start(...))``-style helper; all stopped at the end."""
    started: list[RunningNode] = []
    yield started
    stop_all(started, timeout=3.0)


@pytest.fixture
def start(domain_id: int, tmp_path: Path, graph_nodes: list[RunningNode]):  # type: ignore[no-untyped-def]
    """``start("safety", overrides={...})`` starts a node process on the test's domain."""

    def _start(name: str, **overrides: object) -> RunningNode:
        node = start_node(name, domain_id=domain_id, overrides=overrides, log_dir=tmp_path / "logs")
        graph_nodes.append(node)
        return node

    return _start
