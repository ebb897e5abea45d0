"""Issue 12, finding 5: blobs and model files that the policy node once accepted, against the
real node process over DDS, while observations stream at 100 Hz.

Each case must be refused with its reason in policy/status, the running version keeps acting,
and every observation sent meanwhile is answered exactly once (loading and checking run on
the node's worker thread, never on the control path). A valid learner version after the
attacks is still accepted (no version jump locks the lineage).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_weights_graph import ACT_DIM, OBS_DIM, Harness

from model_factory import (
    make_policy,
    nan_on_real_obs_layers,
    residual_blob,
    residual_layers,
    sparse_file,
)
from vlarl.graph import wait_until

pytestmark = pytest.mark.graph

BASE = "graph-policy@1"


class Stream:
    """Observations at ``rate_hz`` from a background thread until stopped."""

    def __init__(self, harness: Harness, rate_hz: float = 100.0) -> None:
        self.harness = harness
        self.period = 1.0 / rate_hz
        self.sent: list[int] = []
        self.events: list[tuple[str, int]] = []  # (what, index of the next observation)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        start = time.monotonic()
        i = 0
        while not self._stop.is_set():
            self.sent.append(self.harness.send_obs(rng.normal(size=OBS_DIM)))
            i += 1
            delay = start + i * self.period - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def mark(self, what: str) -> None:
        self.events.append((what, len(self.sent)))

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def check_every_tick_answered_once(self) -> Counter:
        h = self.harness
        ok = wait_until(
            lambda: h.answered(dict.fromkeys(self.sent)) == len(self.sent), timeout=10.0
        )
        with h.lock:
            counts = Counter({s: len(h.actions.get(s, [])) for s in self.sent})
            tags = Counter(h.actions[s][0][0] for s in self.sent if s in h.actions)
        lost = [i for i, s in enumerate(self.sent) if counts[s] != 1]
        assert ok and not lost, (
            f"{len(lost)} of {len(self.sent)} ticks lost or doubled (indices {lost[:3]} .. "
            f"{lost[-3:]}; events {self.events})"
        )
        return tags


@pytest.fixture
def harness(rclpy_context: Any) -> Any:
    h = Harness(rclpy_context)
    yield h
    h.close()


def refused(harness: Harness, key: str, count: int, field: str) -> str:
    status = harness.wait_status(lambda s: s[field] == count, timeout=20.0)
    return str(status["last_weight_refusal" if field == "weights_refused" else "last_refusal"])


def test_finding_5_blobs_are_refused_and_learner_versions_still_follow(
    start, harness: Harness, tmp_path: Path
) -> None:
    model = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "p1.onnx")
    # A 1 MB cap stands in for the default 8 MiB one (a 50 MB actor is bench/swap_attacks.py's
    # case), so the test does not time multi-MB DDS transfers.
    cap = 1_000_000
    start("policy", model=str(model), status_rate_hz=20.0, max_blob_bytes=cap)
    harness.wait_ready()
    harness.warm_up(np.random.default_rng(0))
    n_in = OBS_DIM + ACT_DIM
    over_cap = residual_layers([n_in, 512, 512, ACT_DIM])  # 1.15 MB
    attacks = {
        "nan_on_real_observations": (
            residual_blob(2, base=BASE, layers=nan_on_real_obs_layers(n_in, ACT_DIM)),
            "non-finite outputs on recent real observations",
        ),
        "over_size_cap": (residual_blob(2, base=BASE, layers=over_cap), "max_blob_bytes"),
        "3000_layers": (
            residual_blob(2, base=BASE, layers=residual_layers([n_in, *[4] * 2999, ACT_DIM])),
            "over the budget",
        ),
        "version_999999999999999999": (
            residual_blob(999_999_999_999_999_999, base=BASE, parent=1),
            "above the ceiling",
        ),
        "version_jump": (residual_blob(1 + 5000, base=BASE, parent=1), "max_version_step"),
    }
    assert len(attacks["over_size_cap"][0]) > cap
    with Stream(harness) as stream:
        harness.publish_blob(residual_blob(1, base=BASE))
        harness.wait_status(lambda s: s["residual_latest"] == "residual@1", timeout=20.0)
        for n, (key, (payload, fragment)) in enumerate(attacks.items(), start=1):
            stream.mark(key)
            harness.publish_blob(payload)
            reason = refused(harness, key, n, "weights_refused")
            assert fragment in reason, (key, reason)
            assert harness.last_status()["residual_latest"] == "residual@1", key
        harness.publish_blob(residual_blob(2, base=BASE))  # the learner's next version
        status = harness.wait_status(lambda s: s["residual_latest"] == "residual@2", timeout=20.0)
        time.sleep(0.3)
    tags = stream.check_every_tick_answered_once()
    assert set(tags) <= {BASE, f"{BASE}+residual@1", f"{BASE}+residual@2"}, tags
    assert status["weights_refused"] == len(attacks) and status["weights_accepted"] == 2
    assert status["dropped"] == 0 and status["residual_history"] == [1, 2]


def test_finding_5_model_files_are_refused_without_losing_a_tick(
    start, harness: Harness, tmp_path: Path
) -> None:
    v1 = make_policy(model_id="graph-policy", version=1, seed=1).save(tmp_path / "p1.onnx")
    v2 = make_policy(model_id="graph-policy", version=2, seed=2).save(tmp_path / "p2.onnx")
    # A 1.25 ms budget (0.1 of 12.5 ms) instead of the default 3.1 ms: the 3000-layer model
    # costs 2-3 ms on an idle core and far more under load, so the default made the verdict
    # depend on the machine's load; the honest models cost ~0.03 ms either way.
    start("policy", model=str(v1), status_rate_hz=20.0, tick_budget_fraction=0.1)
    harness.wait_ready()
    harness.warm_up(np.random.default_rng(1))
    spec = {"model_id": "graph-policy", "version": 3}
    attacks = {
        "obs_dim_40": (make_policy(obs_dim=40, **spec), "obs_dim=40"),
        "action_dim_7": (make_policy(action_dim=7, **spec), "action_dim=7"),
        "nan_on_real_observations": (make_policy(post="sqrt_obs0", **spec), "recent real"),
        "3000_layers": (make_policy(hidden=(8,) * 3000, **spec), "over the budget"),
    }
    files = {key: built.save(tmp_path / f"{key}.onnx") for key, (built, _) in attacks.items()}
    at_once = {
        "file_1_GiB": sparse_file(tmp_path / "one_gib.onnx", 1 << 30),
        "sparse_200_GiB": sparse_file(tmp_path / "huge.onnx", 200 << 30),
    }
    with Stream(harness) as stream:
        n = 0
        for key, path in at_once.items():
            result = harness.set_param("model", str(path))
            assert not result.successful and "over the cap" in result.reason, (key, result)
            n += 1
        for key, path in files.items():
            stream.mark(key)
            result = harness.set_param("model", str(path))
            assert result.successful, (key, result.reason)  # queued for the worker thread
            n += 1
            reason = refused(harness, key, n, "refused")
            assert attacks[key][1] in reason, (key, reason)
            assert harness.last_status()["model"] == BASE
        harness.set_model(v2, "graph-policy@2")
        time.sleep(0.3)
    tags = stream.check_every_tick_answered_once()
    assert set(tags) == {BASE, "graph-policy@2"}, tags
    status = harness.wait_status(lambda s: s["model"] == "graph-policy@2")
    assert status["refused"] == n and status["dropped"] == 0 and status["swaps"] == 1
