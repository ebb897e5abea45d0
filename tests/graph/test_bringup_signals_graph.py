"""Issue 12, finding 8: ``vlarl bringup`` on SIGHUP left 7 node processes running; on Ctrl-C it
printed a traceback and no summary. Each stop signal must stop every node (no process of the
run's domain left), print the summary so far and exit with 128 + the signal number."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlarl.bag.splits import bag_layout
from vlarl.graph import package_root, wait_until
from vlarl.rosenv import child_env

pytestmark = pytest.mark.graph

DEFAULT_MODEL = package_root() / "models" / "pick-place-v3-student.onnx"


def _node_processes(domain_id: int) -> list[int]:
    """Pids of vlarl node processes running on ``domain_id`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vlarl.nodes." in cmdline and f"ROS_DOMAIN_ID={domain_id}".encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="default model not built")
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT])
def test_stop_signal_stops_every_node_and_prints_the_summary(
    tmp_path: Path, domain_id: int, signum: signal.Signals
) -> None:
    results = tmp_path / "bringup.json"
    cmd = [sys.executable, "-m", "vlarl.cli", "bringup", "--episodes", "100",
           "--domain-id", str(domain_id), "--bag-dir", str(tmp_path / "bags"),
           "--results", str(results), "--log-dir", str(tmp_path / "logs"),
           "--camera-rate", "0", "--timeout", "150"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=child_env(domain_id=domain_id), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: any("graph up" in ln for ln in lines), timeout=120.0), lines
        time.sleep(1.0)
        assert len(_node_processes(domain_id)) >= 5
        proc.send_signal(signum)
        proc.wait(timeout=60.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _node_processes(domain_id):  # never leave any behind, even on a failure
            os.kill(pid, signal.SIGKILL)
    reader.join(timeout=5.0)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    out = "".join(lines)
    assert proc.returncode == 128 + signum, out + err
    assert "Traceback" not in out + err
    assert f"interrupted by {signum.name}" in out
    assert "results:" in out and "bag:" in out
    assert _node_processes(domain_id) == []
    data = json.loads(results.read_text())
    # the recorder was stopped, not killed: its bag is closed and lists every split
    assert bag_layout(data["bag"]).finished
