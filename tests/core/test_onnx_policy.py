"""OnnxPolicy: real ONNX Runtime sessions over tiny models built with onnx.helper."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_factory import (
    BROKEN,
    make_broken,
    make_policy,
    save,
    write_garbage,
    write_truncated,
)
from vlarl.contract import ContractError
from vlarl.core.onnx_policy import (
    CPU,
    CUDA,
    TENSORRT,
    OnnxPolicy,
    PolicyOutputError,
    ProviderError,
    choose_providers,
)

TASK = "pick-place-v3"


@pytest.fixture
def valid(tmp_path: Path):  # type: ignore[no-untyped-def]
    built = make_policy(seed=3)
    return built, built.save(tmp_path / "policy.onnx")


def test_valid_model_loads_with_metadata_and_cpu(valid) -> None:
    built, path = valid
    policy = OnnxPolicy.load(path)
    assert policy.metadata == built.metadata
    assert policy.tag == "test-policy@1"
    assert policy.path == path
    assert policy.providers == [CPU]  # this machine has no GPU
    assert len(policy.sha256) == 64


def test_predict_matches_numpy_reference(valid) -> None:
    built, path = valid
    policy = OnnxPolicy.load(path)
    rng = np.random.default_rng(0)
    for _ in range(5):
        obs = rng.normal(size=39).astype(np.float32)
        chunk = policy.predict(obs, task=TASK)
        assert chunk.shape == (8, 4) and chunk.dtype == np.float32
        np.testing.assert_allclose(chunk, built.reference(obs[None])[0], atol=1e-5)
    # float64 observations are accepted (cast), results identical
    obs64 = rng.normal(size=39)
    np.testing.assert_allclose(
        policy.predict(obs64, task=TASK), policy.predict(obs64.astype(np.float32), task=TASK)
    )


def test_predict_returns_independent_arrays_or_writes_out(valid) -> None:
    _, path = valid
    policy = OnnxPolicy.load(path)
    a = policy.predict(np.ones(39, np.float32), task=TASK)
    a_copy = a.copy()
    b = policy.predict(-np.ones(39, np.float32), task=TASK)
    np.testing.assert_array_equal(a, a_copy)  # not overwritten by the next call
    assert not np.allclose(a, b)
    out = np.empty((8, 4), np.float32)
    assert policy.predict(np.ones(39, np.float32), task=TASK, out=out) is out
    np.testing.assert_array_equal(out, a)


def test_predict_rejects_bad_obs_and_unknown_task(valid) -> None:
    _, path = valid
    policy = OnnxPolicy.load(path)
    with pytest.raises(ValueError, match="shape"):
        policy.predict(np.zeros(38, np.float32), task=TASK)
    with pytest.raises(ValueError, match="shape"):
        policy.predict(np.zeros((1, 39), np.float32), task=TASK)
    with pytest.raises(ContractError, match="door-open-v3"):
        policy.predict(np.zeros(39, np.float32), task="door-open-v3")


def test_predict_batch_matches_single(valid) -> None:
    built, path = valid
    policy = OnnxPolicy.load(path)
    obs = np.random.default_rng(1).normal(size=(6, 39)).astype(np.float32)
    chunks = policy.predict_batch(obs)
    assert chunks.shape == (6, 8, 4)
    np.testing.assert_allclose(chunks, built.reference(obs), atol=1e-5)
    for i in range(6):
        np.testing.assert_allclose(chunks[i], policy.predict(obs[i], task=TASK), atol=1e-6)
    with pytest.raises(ValueError):
        policy.predict_batch(obs[:, :10])
    with pytest.raises(ValueError, match="no instruction"):
        policy.predict_batch(obs, np.zeros((6, 3), np.float32))


def test_multitask_model_uses_the_task_embedding(tmp_path: Path) -> None:
    tasks = ("pick-place-v3", "push-v3", "reach-v3")
    built = make_policy(instr_dim=5, tasks=tasks, model_id="mt", hidden=(16, 16))
    policy = OnnxPolicy.load(built.save(tmp_path / "mt.onnx"))
    assert policy.metadata.instr_dim == 5
    obs = np.random.default_rng(2).normal(size=39).astype(np.float32)
    outs = {}
    for task in tasks:
        instr = np.asarray(built.metadata.instructions[task], dtype=np.float32)
        np.testing.assert_array_equal(policy.instruction(task), instr)
        outs[task] = policy.predict(obs, task=task)
        np.testing.assert_allclose(
            outs[task], built.reference(obs[None], instr[None])[0], atol=1e-5
        )
    assert not np.allclose(outs["push-v3"], outs["reach-v3"])
    # switching back gives the first answer again (the bound instruction buffer is updated)
    np.testing.assert_allclose(policy.predict(obs, task=tasks[0]), outs[tasks[0]], atol=1e-6)
    with pytest.raises(ContractError, match="not one of"):
        policy.predict(obs, task="door-open-v3")
    batch_instr = np.stack([policy.instruction(t) for t in tasks])
    chunks = policy.predict_batch(np.stack([obs] * 3), batch_instr)
    for i, task in enumerate(tasks):
        np.testing.assert_allclose(chunks[i], outs[task], atol=1e-5)
    with pytest.raises(ValueError, match="multi-task"):
        policy.predict_batch(np.stack([obs] * 3))


def test_fixed_batch_of_one_is_accepted(tmp_path: Path) -> None:
    built = make_policy(declared_obs_shape=[1, 39], declared_out_shape=[1, 8, 4])
    policy = OnnxPolicy.load(built.save(tmp_path / "b1.onnx"))
    obs = np.zeros(39, np.float32)
    np.testing.assert_allclose(
        policy.predict(obs, task=TASK), built.reference(obs[None])[0], atol=1e-5
    )
    with pytest.raises(ValueError, match="fixed batch"):
        policy.predict_batch(np.zeros((2, 39), np.float32))


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_contract_breaking_models_are_refused_with_the_reason(kind: str, tmp_path: Path) -> None:
    path = save(make_broken(kind), tmp_path / f"{kind}.onnx")
    with pytest.raises(ContractError) as info:
        OnnxPolicy.load(path)
    assert BROKEN[kind][1] in str(info.value), str(info.value)


def test_missing_file_and_directory_and_empty(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="not found"):
        OnnxPolicy.load(tmp_path / "nope.onnx")
    with pytest.raises(ContractError, match="not a file"):
        OnnxPolicy.load(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ContractError, match="empty"):
        OnnxPolicy.load(tmp_path / "empty.onnx")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(valid, tmp_path: Path) -> None:
    _, path = valid
    path.chmod(0)
    try:
        with pytest.raises(ContractError, match="cannot read"):
            OnnxPolicy.load(path)
    finally:
        path.chmod(0o644)


def test_every_truncation_into_the_model_is_refused(valid, tmp_path: Path) -> None:
    """Cuts anywhere are refused, except exactly between two trailing *optional* metadata
    entries (metadata_props is serialized last): such a file is a complete, valid model that
    only lacks e.g. ``vlarl.created``, and it loads the same network."""
    built, path = valid
    full = OnnxPolicy.load(path)
    size = path.stat().st_size
    cuts = sorted({*np.linspace(1, size - 1, 80).astype(int).tolist(), *range(size - 120, size)})
    out = tmp_path / "cut.onnx"
    obs = np.random.default_rng(0).normal(size=39).astype(np.float32)
    loaded = []
    for cut in cuts:
        out.write_bytes(path.read_bytes()[:cut])
        try:
            policy = OnnxPolicy.load(out)
        except ContractError:
            continue
        loaded.append(cut)
        meta = policy.metadata
        assert (meta.model_id, meta.version, meta.obs_dim, meta.chunk_length, meta.tasks) == (
            built.metadata.model_id,
            built.metadata.version,
            39,
            8,
            (TASK,),
        )
        np.testing.assert_array_equal(policy.predict(obs, task=TASK), full.predict(obs, task=TASK))
    assert len(loaded) <= 4, loaded  # at most the optional trailing entries
    assert all(cut > size - 200 for cut in loaded)
    write_truncated(path, out, fraction=0.6)
    with pytest.raises(ContractError, match="not a readable ONNX"):
        OnnxPolicy.load(out)


@pytest.mark.parametrize("seed", range(5))
def test_random_garbage_is_refused(seed: int, tmp_path: Path) -> None:
    path = write_garbage(tmp_path / "garbage.onnx", size=64 + 997 * seed, seed=seed)
    with pytest.raises(ContractError):
        OnnxPolicy.load(path)


def test_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("this is not a model\n" * 20)
    with pytest.raises(ContractError, match="ONNX"):
        OnnxPolicy.load(path)


def test_non_finite_output_at_run_time_raises(tmp_path: Path) -> None:
    # sqrt(obs[0]) is 0 on the zeros probe (accepted) and NaN for negative obs[0]
    built = make_policy(post="sqrt_obs0")
    policy = OnnxPolicy.load(built.save(tmp_path / "sqrt.onnx"))
    good = np.zeros(39, np.float32)
    good[0] = 4.0
    np.testing.assert_allclose(
        policy.predict(good, task=TASK), built.reference(good[None])[0], atol=1e-5
    )
    bad = good.copy()
    bad[0] = -1.0
    out = np.full((8, 4), 7.0, np.float32)
    with pytest.raises(PolicyOutputError, match="non-finite"):
        policy.predict(bad, task=TASK, out=out)
    assert (out == 7.0).all(), "out must not be touched when the output is refused"
    with pytest.raises(PolicyOutputError):
        policy.predict_batch(np.stack([good, bad]))


def test_choose_providers() -> None:
    everything = [TENSORRT, CUDA, CPU, "AzureExecutionProvider"]
    assert choose_providers("auto", everything) == [TENSORRT, CUDA, CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("AUTO", ["AzureExecutionProvider", CPU]) == [CPU]
    assert choose_providers("cpu", everything) == [CPU]
    assert choose_providers("cuda", everything) == [CUDA, CPU]
    assert choose_providers("tensorrt", everything) == [TENSORRT, CUDA, CPU]
    assert choose_providers("tensorrt", [TENSORRT, CPU]) == [TENSORRT, CPU]
    with pytest.raises(ProviderError, match="CUDAExecutionProvider"):
        choose_providers("cuda", [CPU])
    with pytest.raises(ProviderError, match="TensorrtExecutionProvider"):
        choose_providers("tensorrt", [CUDA, CPU])
    with pytest.raises(ProviderError, match="unknown providers"):
        choose_providers("gpu", everything)


def test_explicit_provider_on_this_machine(valid) -> None:
    _, path = valid
    assert OnnxPolicy.load(path, providers="cpu").providers == [CPU]
    available = ort.get_available_providers()
    for request, provider in (("cuda", CUDA), ("tensorrt", TENSORRT)):
        if provider in available:
            continue
        with pytest.raises(ProviderError, match=provider):
            OnnxPolicy.load(path, providers=request)


def test_intra_op_threads_validated(valid) -> None:
    _, path = valid
    with pytest.raises(ValueError):
        OnnxPolicy.load(path, intra_op_threads=0)
    assert OnnxPolicy.load(path, intra_op_threads=2).predict(np.zeros(39), task=TASK).shape == (
        8,
        4,
    )


@pytest.mark.gpu
@pytest.mark.skipif(
    CUDA not in ort.get_available_providers(), reason="no CUDA execution provider here"
)
def test_cuda_provider_matches_cpu(valid) -> None:
    _, path = valid
    cpu = OnnxPolicy.load(path, providers="cpu")
    gpu = OnnxPolicy.load(path, providers="cuda")
    assert gpu.providers[0] == CUDA
    obs = np.random.default_rng(0).normal(size=39).astype(np.float32)
    np.testing.assert_allclose(gpu.predict(obs, task=TASK), cpu.predict(obs, task=TASK), atol=1e-4)
