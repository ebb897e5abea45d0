"""Executor choice and spinning, shared by the nodes.

rclpy 9.1 (the Kilted wheels) ships ``rclpy.experimental.EventsExecutor``, which costs about half
the CPU per callback of the SingleThreadedExecutor (measured on the safety and sim nodes), but
its ``spin()`` and ``spin_until_future_complete()`` without a timeout hold the GIL and never run
a callback; ``spin_once(timeout_sec=...)`` in a loop works. :func:`spin` does that.

Stopping: :func:`spin` (in the main thread) and :func:`run_node` turn SIGINT and SIGTERM into a
stop request that ends the spin loop between callbacks. They never raise ``KeyboardInterrupt``:
raised inside a callback that C++ called (the EventsExecutor's, through pybind11) it aborted
the process (exit -6) under ``ros2 launch``, whose Ctrl-C reaches each node twice (the
terminal's and launch's own SIGINT).
"""

from __future__ import annotations

import signal
import threading
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


def stop_on_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> threading.Event:
    """An event set by any of ``signals`` (Python handlers replace rclpy's and the default
    ``KeyboardInterrupt``); call from the main thread.

    After the first, those signals are ignored: a repeat (launch's SIGINT after the terminal's)
    must not cut the clean-up short, and one arriving while the interpreter finalizes would
    otherwise meet the default action and kill the process (exit -2).
    """
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        for other in signals:
            signal.signal(other, signal.SIG_IGN)
        stop.set()

    for signum in signals:
        signal.signal(signum, request_stop)
    return stop


def spin(
    executor: Any,
    *,
    context: Any = None,
    period_s: float = 0.2,
    stop: threading.Event | None = None,
) -> None:
    """Spin until the context shuts down or ``stop`` is set (``spin_once`` with a timeout, in a
    loop). In the main thread without ``stop``, SIGINT/SIGTERM set one (see the module doc).

    Start-up objects (models, messages, modules) are moved out of the garbage collector's
    reach first, so a full collection does not stall a control tick for milliseconds.
    """
    import gc

    import rclpy

    if stop is None and threading.current_thread() is threading.main_thread():
        stop = stop_on_signals()
    gc.collect()
    gc.freeze()

    while rclpy.ok(context=context) and not (stop is not None and stop.is_set()):
        executor.spin_once(timeout_sec=period_s)


def run_node(factory: Callable[[], Any], *, name: str, argv: Sequence[str] | None = None) -> int:
    """``main()`` of a node that spins a SingleThreadedExecutor: init, build, spin, clean up.

    A ``ValueError`` from ``factory`` (a bad start-up parameter) is printed and exits 2; SIGINT
    and SIGTERM end the spin (exit 0); a node with a ``shutdown()`` method (worker threads) gets
    it called before it is destroyed.
    """
    import sys

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(
        args=list(sys.argv if argv is None else argv),
        signal_handler_options=SignalHandlerOptions.NO,
    )
    stop = stop_on_signals()
    node: Any = None
    try:
        try:
            node = factory()
        except ValueError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
        while rclpy.ok(context=node.context) and not stop.is_set():
            executor.spin_once(timeout_sec=0.2)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            if hasattr(node, "shutdown"):
                node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
