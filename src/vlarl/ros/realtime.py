"""Real-time scheduling for the control-path processes (opt-in).

On a machine whose cores are shared with other work, a control tick waits behind whatever else
is runnable: with normal (CFS/EEVDF) scheduling this showed up as 10-60 ms stalls of the
policy -> safety -> command path every few seconds (bench/control_loop.py). Under SCHED_FIFO
the control path runs before any normal-priority process, so only the kernel, interrupts and
the hypervisor can delay it.

:func:`set_realtime_priority` moves every thread of the calling process to SCHED_FIFO; threads
created afterwards inherit it. It needs CAP_SYS_NICE (root) or an ``rtprio`` limit
(``/etc/security/limits.conf``: ``@robot - rtprio 98``); without either it changes nothing
and says why, and the node runs on with normal scheduling (this is about latency, not
safety). The kernel's RT throttling (``/proc/sys/kernel/sched_rt_runtime_us``, 95% by default)
keeps a runaway real-time thread from freezing the machine.
"""

from __future__ import annotations

import os

MAX_PRIORITY = 99


def set_realtime_priority(priority: int) -> str | None:
    """Run all threads of this process under SCHED_FIFO at ``priority`` (1-99).

    ``priority`` 0 leaves the scheduling alone. Returns None on success (or for 0), otherwise
    the reason it could not be applied (threads already changed keep the new policy).
    """
    if priority == 0:
        return None
    if not 1 <= priority <= MAX_PRIORITY:
        raise ValueError(f"realtime priority must be 0 (off) or 1..{MAX_PRIORITY}, got {priority}")
    if not hasattr(os, "sched_setscheduler"):
        return "SCHED_FIFO is not available on this platform"
    param = os.sched_param(priority)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]  # the calling thread only
    try:
        for tid in tids:
            try:
                os.sched_setscheduler(tid, os.SCHED_FIFO, param)
            except ProcessLookupError:  # the thread ended meanwhile
                continue
    except PermissionError:
        limit = _rtprio_limit()
        return (
            f"SCHED_FIFO priority {priority} not permitted (needs CAP_SYS_NICE or an rtprio "
            f"limit >= {priority}; RLIMIT_RTPRIO is {limit})"
        )
    except OSError as exc:
        return f"SCHED_FIFO priority {priority} refused: {exc}"
    return None


def current_policy() -> str:
    """``fifo:<priority>``, ``rr:<priority>`` or ``other`` for the calling thread."""
    if not hasattr(os, "sched_getscheduler"):
        return "other"
    policy = os.sched_getscheduler(0)
    if policy == os.SCHED_FIFO:
        return f"fifo:{os.sched_getparam(0).sched_priority}"
    if policy == os.SCHED_RR:
        return f"rr:{os.sched_getparam(0).sched_priority}"
    return "other"


def _rtprio_limit() -> str:
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
    except (ImportError, AttributeError, OSError):
        return "unknown"
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


__all__ = ["MAX_PRIORITY", "current_policy", "set_realtime_priority"]
