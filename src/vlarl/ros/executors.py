"""Executor choice and spinning, shared by the nodes.

rclpy 9.1 (the Kilted wheels) ships ``rclpy.experimental.EventsExecutor``, which costs about half
the CPU per callback of the SingleThreadedExecutor (measured on the safety and sim nodes), but
its ``spin()`` and ``spin_until_future_complete()`` without a timeout hold the GIL and never run
a callback; ``spin_once(timeout_sec=...)`` in a loop works. :func:`spin` does that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

EXECUTOR_KINDS = ("events", "single")


def make_executor(kind: str, *, context: Any = None) -> Any:
    """``events``: rclpy.experimental.EventsExecutor; ``single``: SingleThreadedExecutor."""
    if kind == "events":
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError:  # older rclpy: fall back
            pass
        else:
            return EventsExecutor(context=context)
    from rclpy.executors import SingleThreadedExecutor

    return SingleThreadedExecutor(context=context)


def spin(executor: Any, *, context: Any = None, period_s: float = 0.2) -> None:
    """Spin until the context shuts down (``spin_once`` with a timeout, in a loop).

    Start-up objects (models, messages, modules) are moved out of the garbage collector's
    reach first, so a full collection does not stall a control tick for milliseconds.
    """
    import gc

    import rclpy

    gc.collect()
    gc.freeze()

    while rclpy.ok(context=context):
        executor.spin_once(timeout_sec=period_s)


def run_node(factory: Callable[[], Any], *, name: str, argv: Sequence[str] | None = None) -> int:
    """``main()`` of a node that spins a SingleThreadedExecutor: init, build, spin, clean up.

    A ``ValueError`` from ``factory`` (a bad start-up parameter) is printed and exits 2; Ctrl-C
    ends the spin; a node with a ``shutdown()`` method (worker threads) gets it called before it
    is destroyed.
    """
    import sys

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init(args=list(sys.argv if argv is None else argv))
    node: Any = None
    try:
        try:
            node = factory()
        except ValueError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            if hasattr(node, "shutdown"):
                node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
