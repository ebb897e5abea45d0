"""Per-task observation standardization and the teacher's training source (the MT10 recipe)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlarl.learning.checkpoint import load_checkpoint, save_checkpoint
from vlarl.learning.dataset import ChunkDataset
from vlarl.learning.distill import make_student
from vlarl.learning.errors import LearningError
from vlarl.learning.export import metadata_for, ort_run, to_onnx_bytes
from vlarl.learning.networks import FlowPolicy, PolicySpec, build_policy
from vlarl.learning.teacher import sample_source
from vlarl.learning.training import new_policy

TASKS = ["a", "b", "c"]


def task_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations whose location and spread differ per task; one embedding per task."""
    rng = np.random.default_rng(seed)
    task = rng.integers(0, 3, 600)
    scale = np.array([0.3, 1.0, 3.0])[task][:, None]
    obs = (rng.normal(size=(600, 5)) * scale + 2.0 * task[:, None]).astype(np.float32)
    emb = rng.normal(size=(3, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return obs, task, emb


def tn_spec(kind: str, **kw: object) -> PolicySpec:
    return PolicySpec(
        kind=kind,
        obs_dim=5,
        action_dim=2,
        chunk_length=3,
        instr_dim=6,
        hidden=32,
        depth=2,
        instr_proj=4,
        time_features=3,
        steps=4,
        tasks=list(TASKS),
        instr_norm=True,
        task_norm=True,
        **kw,  # type: ignore[arg-type]
    )


def fitted(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    obs, task, emb = task_data(seed)
    policy = build_policy(tn_spec(kind)).eval()
    policy.normalizer.fit(obs, action_low=-np.ones(2), action_high=np.ones(2))
    policy.cond.fit_instructions(emb)
    assert policy.task_norm is not None
    policy.task_norm.fit(obs, task, emb)
    return policy, obs, task, emb


def test_each_task_is_standardized_with_its_own_statistics() -> None:
    policy, obs, task, emb = fitted("teacher")
    z = policy.norm_obs(torch.from_numpy(obs), torch.from_numpy(emb[task])).numpy()
    for i in range(3):
        rows = z[task == i]
        np.testing.assert_allclose(rows.mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(rows.std(0), 1.0, rtol=1e-3)
    # One global standardization squashes the small task (std 0.3 of a spread of ~2.5).
    g = policy.normalizer.norm_obs(torch.from_numpy(obs)).numpy()
    assert g[task == 0].std(0).max() < 0.2


def test_the_nearest_instruction_picks_the_statistics() -> None:
    policy, _, _, emb = fitted("bc")
    assert policy.task_norm is not None
    noisy = emb + 0.01 * np.random.default_rng(1).normal(size=emb.shape).astype(np.float32)
    w = policy.task_norm.weights(torch.from_numpy(noisy)).numpy()
    np.testing.assert_array_equal(w, np.eye(3, dtype=np.float32))
    # The same observation reads differently under different tasks.
    obs = torch.full((1, 5), 2.0)
    za = policy.norm_obs(obs, torch.from_numpy(emb[[0]]))
    zb = policy.norm_obs(obs, torch.from_numpy(emb[[1]]))
    assert not torch.allclose(za, zb)
    with pytest.raises(ValueError, match="instruction"):
        policy.norm_obs(obs, None)


def test_std_floor_is_relative_to_the_global_spread() -> None:
    obs, task, emb = task_data()
    obs[task == 0, 2] = 1.0  # constant within task a
    policy = build_policy(tn_spec("bc"))
    assert policy.task_norm is not None
    policy.task_norm.fit(obs, task, emb, floor=0.1)
    assert policy.task_norm.std[0, 2].item() == pytest.approx(0.1 * obs[:, 2].std(), rel=1e-4)
    # Far outside a task's data the input is clipped, never unbounded.
    far = torch.full((1, 5), 1e6)
    assert policy.norm_obs(far, torch.from_numpy(emb[[0]])).abs().max().item() <= 10.0
    with pytest.raises(ValueError, match="task index"):
        policy.task_norm.fit(obs[task != 2], task[task != 2], emb)


@pytest.mark.parametrize("kind", ["bc", "teacher", "student"])
def test_onnx_graph_selects_the_task_like_pytorch(kind: str) -> None:
    policy, obs, task, emb = fitted(kind, seed=2)
    feeds = {"obs": obs[:9], "instruction": emb[task[:9]]}
    with torch.no_grad():
        ref = policy(torch.from_numpy(feeds["obs"]), torch.from_numpy(feeds["instruction"]))
    out = ort_run(to_onnx_bytes(policy), feeds)
    np.testing.assert_allclose(out, ref.numpy(), atol=2e-5)


def test_checkpoint_roundtrip_and_metadata(tmp_path: Path) -> None:
    policy, obs, task, emb = fitted("teacher", seed=3)
    path = tmp_path / "t.safetensors"
    save_checkpoint(path, policy, step=1, instructions=dict(zip(TASKS, emb, strict=True)))
    ckpt = load_checkpoint(path)
    assert ckpt.spec.task_norm and ckpt.policy.task_norm is not None
    o, i = torch.from_numpy(obs[:4]), torch.from_numpy(emb[task[:4]])
    with torch.no_grad():
        np.testing.assert_array_equal(policy(o, i).numpy(), ckpt.policy(o, i).numpy())
    meta = metadata_for(ckpt, model_id="m", version=0, steps=4)
    per_task = meta.normalization["per_task"]
    assert list(per_task) == TASKS
    assert per_task["c"]["obs_std"] == pytest.approx(policy.task_norm.std[2].tolist())
    # Specs written before the option existed load as global standardization.
    old = {k: v for k, v in policy.spec.to_dict().items() if k != "task_norm"}
    assert PolicySpec.from_dict(old).task_norm is False


def test_a_smaller_student_takes_the_teachers_task_statistics() -> None:
    teacher, obs, task, emb = fitted("teacher", seed=4)
    assert isinstance(teacher, FlowPolicy)
    student = make_student(teacher, hidden=16, depth=1)
    assert student.task_norm is not None and teacher.task_norm is not None
    assert torch.equal(student.task_norm.std, teacher.task_norm.std)
    assert torch.equal(student.task_norm.keys, teacher.task_norm.keys)
    o, i = torch.from_numpy(obs[:5]), torch.from_numpy(emb[task[:5]])
    torch.testing.assert_close(student.norm_obs(o, i), teacher.norm_obs(o, i))


def test_new_policy_fits_task_statistics_and_needs_instructions() -> None:
    obs, task, emb = task_data(5)
    chunks = np.zeros((len(obs), 3, 2), np.float32)
    ds = ChunkDataset(obs=obs, chunks=chunks, task=task, tasks=tuple(TASKS), instructions=emb)
    policy = new_policy("bc", ds, hidden=16, depth=1, obs_kind="state", task_norm=True)
    assert policy.spec.task_norm and policy.task_norm is not None
    np.testing.assert_allclose(policy.task_norm.mean[1].numpy(), obs[task == 1].mean(0), rtol=1e-5)
    plain = new_policy("bc", ds, hidden=16, depth=1, obs_kind="state")
    assert plain.task_norm is None
    no_instr = ChunkDataset(
        obs=obs, chunks=chunks, task=task, tasks=tuple(TASKS), instructions=None
    )
    with pytest.raises(LearningError, match="instruction"):
        new_policy("bc", no_instr, hidden=16, depth=1, obs_kind="state", task_norm=True)


def test_scaled_source_covers_the_deployed_start() -> None:
    d = 32
    gen = torch.Generator().manual_seed(0)
    g = sample_source(torch.Size((20000, d)), "gaussian", gen)
    s = sample_source(torch.Size((20000, d)), "scaled", torch.Generator().manual_seed(0))
    # Gaussian samples sit on a shell of radius ~sqrt(d): none come near x_0 = 0.
    assert (g.norm(dim=1) < 0.25 * math.sqrt(d)).float().mean().item() < 1e-3
    # The scale mixture puts ~a quarter of its samples within a quarter of that radius.
    near = (s.norm(dim=1) < 0.25 * math.sqrt(d)).float().mean().item()
    assert 0.2 < near < 0.3
    assert s.mean(0).abs().max().item() < 0.03  # still centred on 0
    # 'gaussian' draws exactly what the teacher drew before the option existed.
    assert torch.equal(
        sample_source(torch.Size((4, d)), "gaussian", torch.Generator().manual_seed(7)),
        torch.randn((4, d), generator=torch.Generator().manual_seed(7)),
    )
    with pytest.raises(LearningError, match="source"):
        sample_source(torch.Size((2, d)), "uniform", gen)
