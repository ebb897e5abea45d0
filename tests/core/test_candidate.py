"""Candidate checks before a swap (vlarl.core.candidate), without a graph: size caps checked
before reading, the robot's dims, the learner's lineage, outputs on real observations, the
measured compute budget, and the worker that runs them off the control path."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from model_factory import (
    make_policy,
    nan_on_real_obs_layers,
    residual_blob,
    residual_layers,
    sparse_file,
)
from vlarl.contract import ContractError
from vlarl.core.candidate import (
    CandidateRefused,
    CandidateWorker,
    PolicyCandidate,
    RecentObservations,
    ResidualCandidate,
    RobotContract,
    SwapConfig,
    check_blob_size,
    check_lineage,
    check_model_file,
    load_model_candidate,
    measure_cost,
    verify_candidate,
)
from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.core.weights import decode_residual

OBS, ACT = 39, 4
CONTRACT = RobotContract(obs_dim=OBS, action_dim=ACT, control_period_s=0.0125)
CONFIG = SwapConfig()
BASE = "test-policy@1"


def real_like_observations(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Observations shaped like Meta-World states (positions around 0.1-0.7 m, quaternions)
    and base actions in [-1, 1]."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-0.3, 0.8, size=(n, OBS)).astype(np.float32)
    base = rng.uniform(-1, 1, size=(n, ACT)).astype(np.float32)
    return obs, base


def residual(payload: bytes) -> ResidualCandidate:
    return ResidualCandidate(decode_residual(payload).actor())


# ---------------------------------------------------------------------------- settings
def test_node_parameters_are_derived_from_swap_config() -> None:
    from vlarl.nodes.policy import SWAP_PARAMS, swap_config

    params = {p.name: p for p in SWAP_PARAMS}
    assert set(params) == {f.name for f in dataclasses.fields(SwapConfig)}
    for f in dataclasses.fields(SwapConfig):
        assert params[f.name].default == getattr(CONFIG, f.name), f.name
        assert params[f.name].read_only, f"{f.name} must be fixed at start"
        assert params[f.name].check(getattr(CONFIG, f.name)) is None
    assert swap_config({p.name: p.default for p in SWAP_PARAMS}) == CONFIG


@pytest.mark.parametrize(
    "bad",
    [
        {"max_blob_bytes": 0},
        {"tick_budget_fraction": 0.0},
        {"tick_budget_fraction": 1.5},
        {"min_observations": 100, "check_observations": 10},
        {"max_version_step": 0},
        {"action_bound": 0.0},
    ],
)
def test_swap_config_refuses_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        SwapConfig(**bad)


# ---------------------------------------------------------------------------- size
def test_blob_size_cap() -> None:
    check_blob_size(CONFIG.max_blob_bytes, CONFIG)
    with pytest.raises(CandidateRefused, match="over the cap"):
        check_blob_size(50_000_000, CONFIG)


def test_200_gib_sparse_file_is_refused_by_stat_without_reading(tmp_path: Path) -> None:
    huge = sparse_file(tmp_path / "huge.onnx", 200 << 30)
    with pytest.raises(CandidateRefused, match="over the cap"):
        check_model_file(huge, CONFIG)
    with pytest.raises(CandidateRefused, match="over the cap"):
        load_model_candidate(huge, config=CONFIG, contract=CONTRACT)
    # The loader itself refuses it from stat too (never a MemoryError).
    with pytest.raises(ContractError, match="over the cap"):
        OnnxPolicy.load(huge, max_bytes=CONFIG.max_model_bytes)


def test_model_file_must_be_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="not found"):
        check_model_file(tmp_path / "missing.onnx", CONFIG)
    with pytest.raises(ContractError, match="not a file"):
        check_model_file(tmp_path, CONFIG)
    with pytest.raises(ContractError, match="not a file"):
        OnnxPolicy.load("/dev/zero", max_bytes=1024)


def test_a_file_that_grows_past_the_cap_is_never_read_whole(tmp_path: Path) -> None:
    path = make_policy().save(tmp_path / "p.onnx")
    size = path.stat().st_size
    # The cap below the real size: refused from stat.
    with pytest.raises(ContractError, match="over the cap"):
        OnnxPolicy.load(path, max_bytes=size - 1)
    assert OnnxPolicy.load(path, max_bytes=size).metadata.obs_dim == OBS


# ---------------------------------------------------------------------------- contract
@pytest.mark.parametrize(
    ("fields", "fragment"),
    [({"obs_dim": 40}, "obs_dim=40"), ({"action_dim": 7}, "action_dim=7")],
)
def test_self_consistent_model_with_other_dims_is_refused(
    tmp_path: Path, fields: dict, fragment: str
) -> None:
    path = make_policy(**fields).save(tmp_path / "other.onnx")
    OnnxPolicy.load(path)  # self-consistent: the model contract alone accepts it
    with pytest.raises(CandidateRefused, match=fragment):
        load_model_candidate(path, config=CONFIG, contract=CONTRACT)


def test_residual_with_other_dims_is_refused() -> None:
    candidate = residual(residual_blob(1, base=BASE, obs_dim=40))
    obs, base = real_like_observations()
    with pytest.raises(CandidateRefused, match="obs_dim=40"):
        verify_candidate(candidate, obs, base, contract=CONTRACT, config=CONFIG)


# ---------------------------------------------------------------------------- lineage
def test_lineage_refuses_absurd_versions_and_keeps_following_the_learner() -> None:
    check_lineage("residual@1", version=1, parent=0, newest=None, config=CONFIG)
    check_lineage("residual@8", version=8, parent=7, newest=7, config=CONFIG)
    with pytest.raises(CandidateRefused, match="above the ceiling"):
        check_lineage(
            "residual@999999999999999999",
            version=999_999_999_999_999_999,
            parent=7,
            newest=7,
            config=CONFIG,
        )
    with pytest.raises(CandidateRefused, match="above the ceiling"):  # also on a fresh node
        check_lineage("r", version=999_999_999_999_999_999, parent=0, newest=None, config=CONFIG)
    with pytest.raises(CandidateRefused, match="max_version_step"):
        check_lineage("r", version=7 + 1001, parent=7, newest=7, config=CONFIG)
    with pytest.raises(CandidateRefused, match="not newer"):
        check_lineage("r", version=7, parent=6, newest=7, config=CONFIG)
    # The refusals did not move the lineage: the learner's next version still follows.
    check_lineage("residual@8", version=8, parent=7, newest=7, config=CONFIG)


# ---------------------------------------------------------------------------- real observations
def test_blob_that_gives_nan_on_real_observations_is_refused() -> None:
    payload = residual_blob(1, base=BASE, layers=nan_on_real_obs_layers(OBS + ACT, ACT))
    w = decode_residual(payload)  # valid blob: finite weights, digest fine
    out = np.full(ACT, np.nan, np.float32)
    w.actor()(np.zeros(OBS, np.float32), np.zeros(ACT, np.float32), out)
    assert np.isfinite(out).all()  # the old zeros probe passes it
    obs, base = real_like_observations()
    with pytest.raises(CandidateRefused, match="non-finite outputs on recent real"):
        verify_candidate(ResidualCandidate(w.actor()), obs, base, contract=CONTRACT, config=CONFIG)


def test_good_residual_passes_and_reports_its_cost() -> None:
    obs, base = real_like_observations()
    report = verify_candidate(
        residual(residual_blob(1, base=BASE, hidden=(256, 256))),
        obs,
        base,
        contract=CONTRACT,
        config=CONFIG,
        rest_of_tick_s=0.0002,
    )
    assert report.observations == len(obs)
    assert 0 < report.cost_s < report.tick_s <= report.budget_s
    assert report.budget_s == pytest.approx(0.25 * 0.0125)
    assert report.timed_calls == CONFIG.timing_calls


def test_base_model_out_of_range_or_nan_on_real_observations_is_refused(tmp_path: Path) -> None:
    # tanh(MLP) + sqrt(obs[0]): in range and finite on zeros, above 1 for obs[0] > 0 and NaN
    # for obs[0] < 0.
    path = make_policy(post="sqrt_obs0", weight_scale=3.0).save(tmp_path / "sqrt.onnx")
    policy = load_model_candidate(path, config=CONFIG, contract=CONTRACT)
    candidate = PolicyCandidate(policy, "pick-place-v3")
    obs, base = real_like_observations()
    obs[:, 0] = 0.9
    with pytest.raises(CandidateRefused, match="outside"):
        verify_candidate(candidate, obs, base, contract=CONTRACT, config=CONFIG)
    obs[5, 0] = -0.2
    obs[:5, 0] = 0.0
    with pytest.raises(CandidateRefused, match="non-finite"):
        verify_candidate(candidate, obs, base, contract=CONTRACT, config=CONFIG)


def test_too_few_observations_is_not_a_check() -> None:
    obs, base = real_like_observations(n=CONFIG.min_observations - 1)
    with pytest.raises(CandidateRefused, match="min_observations"):
        verify_candidate(
            residual(residual_blob(1, base=BASE)), obs, base, contract=CONTRACT, config=CONFIG
        )


# ---------------------------------------------------------------------------- budget
def test_3000_layer_actor_is_over_the_budget_and_measured_briefly() -> None:
    widths = [OBS + ACT, *([16] * 2999), ACT]
    payload = residual_blob(1, base=BASE, layers=residual_layers(widths))
    assert len(payload) < CONFIG.max_blob_bytes  # the size cap alone would let it through
    obs, base = real_like_observations()
    start = time.perf_counter()
    with pytest.raises(CandidateRefused, match="over the budget"):
        verify_candidate(residual(payload), obs, base, contract=CONTRACT, config=CONFIG)
    # The real-observation pass plus about three timed calls, not timing_calls of them.
    assert time.perf_counter() - start < 5.0


def test_budget_counts_the_rest_of_the_tick() -> None:
    obs, base = real_like_observations()
    candidate = residual(residual_blob(1, base=BASE))
    budget = CONTRACT.tick_budget_s(CONFIG)
    verify_candidate(candidate, obs, base, contract=CONTRACT, config=CONFIG)
    with pytest.raises(CandidateRefused, match="over the budget"):
        verify_candidate(
            candidate, obs, base, contract=CONTRACT, config=CONFIG, rest_of_tick_s=budget
        )


def test_measure_cost_stops_early_for_a_slow_call() -> None:
    cost, calls = measure_cost(lambda i: time.sleep(0.01), calls=50, limit_s=0.001)
    assert calls == 3 and cost >= 0.01
    cost, calls = measure_cost(lambda i: None, calls=20, limit_s=0.001)
    assert calls == 20 and cost < 0.001


# ---------------------------------------------------------------------------- plumbing
def test_recent_observations_keep_the_newest_in_order_and_a_sample_of_all() -> None:
    ring = RecentObservations(capacity=4, obs_dim=2, action_dim=1)
    for i in range(4):
        ring.add(np.array([i, -i], np.float32), np.array([i], np.float32))
    obs, base = ring.snapshot(10)
    assert obs[:, 0].tolist() == [0, 1, 2, 3] and base[:, 0].tolist() == [0, 1, 2, 3]
    for i in range(4, 1000):
        ring.add(np.array([i, -i], np.float32), np.array([i], np.float32))
    obs, base = ring.snapshot(10)
    assert len(ring) == 1000
    assert obs[:4, 0].tolist() == [996, 997, 998, 999]  # the last ones, in order
    assert len(obs) == 8 and (obs[:, 0] == base[:, 0]).all()
    assert obs[4:, 0].min() < 900  # the reservoir reaches back beyond the last ones
    obs, _ = ring.snapshot(2)
    assert obs[:2, 0].tolist() == [998, 999]
    ring.add(np.array([9, 9], np.float32))  # no base action (no model yet): zeros
    assert ring.snapshot(1)[1][0].tolist() == [0.0]


def test_a_state_seen_earlier_in_the_run_is_checked_too(tmp_path: Path) -> None:
    """A model that is NaN only for obs[0] < 0 passes the last observations (obs[0] > 0) but
    not the run's sample, which remembers the earlier obs[0] < 0 states."""
    path = make_policy(post="sqrt_obs0").save(tmp_path / "sqrt.onnx")
    candidate = PolicyCandidate(
        load_model_candidate(path, config=CONFIG, contract=CONTRACT), "pick-place-v3"
    )
    ring = RecentObservations(capacity=CONFIG.check_observations, obs_dim=OBS, action_dim=ACT)
    obs, _ = real_like_observations(n=400)
    obs[:, 0] = np.where(np.arange(400) < 200, -0.1, 0.0)  # early in the run x < 0, then 0
    for row in obs:
        ring.add(row)
    recent, base = ring.snapshot(CONFIG.check_observations)
    n = CONFIG.check_observations
    verify_candidate(candidate, recent[:n], base[:n], contract=CONTRACT, config=CONFIG)
    with pytest.raises(CandidateRefused, match="non-finite"):
        verify_candidate(candidate, recent, base, contract=CONTRACT, config=CONFIG)


def test_worker_runs_jobs_in_order_off_the_calling_thread_and_replaces_waiting_ones() -> None:
    worker = CandidateWorker("test")
    gate = threading.Event()
    seen: list[tuple[str, int]] = []
    caller = threading.get_ident()
    try:

        def job(name: str, blocking: bool = False):  # type: ignore[no-untyped-def]
            def run(cancelled):  # type: ignore[no-untyped-def]
                assert threading.get_ident() != caller
                if blocking:
                    gate.wait(5.0)
                if name == "boom":
                    raise CandidateRefused("boom refused")
                seen.append((name, threading.get_ident()))
                return name

            return run

        worker.submit("model", job("m1", blocking=True))
        time.sleep(0.05)
        assert worker.submit("blob", job("b1")) == []
        assert worker.submit("blob", job("b2")) == ["blob"]  # b1 never ran
        worker.submit("other", job("boom"))
        gate.set()
        deadline = time.monotonic() + 5.0
        done: list = []
        while len(done) < 3 and time.monotonic() < deadline:
            done += worker.drain()
            time.sleep(0.01)
        assert [k for k, _ in done] == ["model", "blob", "other"]
        assert done[0][1] == "m1" and done[1][1] == "b2"
        assert isinstance(done[2][1], CandidateRefused)
        assert [n for n, _ in seen] == ["m1", "b2"]
    finally:
        worker.stop()


def test_worker_cancels_a_running_job_when_a_newer_one_of_its_kind_arrives() -> None:
    worker = CandidateWorker("test")
    started = threading.Event()
    try:

        def waiting(cancelled):  # type: ignore[no-untyped-def]
            started.set()
            deadline = time.monotonic() + 5.0
            while not cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)
            return "cancelled" if cancelled() else "timed out"

        worker.submit("model", waiting)
        assert started.wait(5.0)
        worker.submit("model", lambda cancelled: "newer")
        deadline = time.monotonic() + 5.0
        done: list = []
        while len(done) < 2 and time.monotonic() < deadline:
            done += worker.drain()
            time.sleep(0.01)
        assert [v for _, v in done] == ["cancelled", "newer"]
    finally:
        worker.stop()
