"""vlarl.ros.realtime: SCHED_FIFO for every thread of a process, or a clear reason why not.

The calls run in child processes, so the test process itself never changes its scheduling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlarl.ros.realtime import current_policy, set_realtime_priority

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setscheduler"), reason="needs Linux scheduling calls"
)

# A thread started before the call, one after it, and the main thread report their policy.
CHILD = r"""
import json, os, resource, sys, threading
from vlarl.ros.realtime import current_policy, set_realtime_priority

if sys.argv[2] == "unprivileged":
    # start from normal scheduling whatever the parent runs with (a child inherits it)
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)  # root keeps CAP_SYS_NICE: become nobody
seen = {}
go = threading.Event()

def report(name):
    go.wait()
    seen[name] = current_policy()

before = threading.Thread(target=report, args=("before",))
before.start()
reason = set_realtime_priority(int(sys.argv[1]))
after = threading.Thread(target=report, args=("after",))
after.start()
go.set()
before.join()
after.join()
seen["main"] = current_policy()
print(json.dumps({"reason": reason, **seen}))
"""


def run_child(priority: int, mode: str) -> dict[str, str | None]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(priority), mode],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_zero_changes_nothing() -> None:
    before = current_policy()
    assert set_realtime_priority(0) is None
    assert current_policy() == before


@pytest.mark.parametrize("priority", [-1, 100])
def test_out_of_range_priority_is_an_error(priority: int) -> None:
    with pytest.raises(ValueError, match=r"0 \(off\) or 1\.\.99"):
        set_realtime_priority(priority)


def test_all_threads_run_fifo_when_permitted() -> None:
    result = run_child(7, "as-is")
    if result["reason"] is not None:
        pytest.skip(f"no real-time permission here: {result['reason']}")
    assert result == {"reason": None, "before": "fifo:7", "after": "fifo:7", "main": "fifo:7"}


def test_refusal_is_reported_and_scheduling_left_alone() -> None:
    result = run_child(7, "unprivileged")
    assert result["reason"] is not None and "not permitted" in result["reason"]
    assert "RLIMIT_RTPRIO is 0" in result["reason"]
    assert result["before"] == result["after"] == result["main"] == "other"
