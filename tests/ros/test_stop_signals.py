"""Stop signals become a stop request, never a KeyboardInterrupt (which, thrown through a C++
callback of the EventsExecutor, aborted the policy node with exit -6), and repeats are ignored."""

from __future__ import annotations

import os
import signal
import time

from vlarl.ros.executors import stop_on_signals


def test_first_signal_sets_the_stop_and_repeats_are_ignored() -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = stop_on_signals()
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert stop.is_set()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # launch's repeat: no KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
