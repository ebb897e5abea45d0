"""Unit checks of the learning pieces: chunking, networks, losses, Wilson intervals, configs."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from vlarl.data import ReplayWriter, Transitions, load_replay
from vlarl.learning import envs
from vlarl.learning.bc import bc_loss
from vlarl.learning.dataset import build_chunks, chunk_indices
from vlarl.learning.distill import consistency_losses, make_student
from vlarl.learning.errors import LearningError
from vlarl.learning.evaluate import wilson_interval
from vlarl.learning.networks import (
    BCPolicy,
    ConsistencyPolicy,
    FlowPolicy,
    PolicySpec,
    build_policy,
)
from vlarl.learning.runs import add_config_arguments, arg, config_from_args
from vlarl.learning.teacher import flow_matching_loss


def test_chunk_indices_repeat_the_last_action_past_the_end() -> None:
    idx = chunk_indices(4, 3)
    assert idx.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 3], [3, 3, 3]]


def test_build_chunks_never_crosses_episodes(tmp_path: Path) -> None:
    with ReplayWriter(tmp_path, source="t") as w:
        for ep, (n, task) in enumerate([(5, "a"), (3, "b"), (4, "a")]):
            action = np.full((n, 2), 10 * ep, np.float32) + np.arange(n)[:, None]
            w.add_episode(
                Transitions.build(
                    obs=np.full((n, 3), ep), next_obs=np.zeros((n, 3)), action=action
                ),
                task=task,
                version="v@0",
            )
    replay = load_replay(tmp_path)
    ds = build_chunks(replay, chunk_length=3, tasks=("a", "b"), instructions=None)
    assert len(ds) == 12 and ds.chunks.shape == (12, 3, 2)
    # Episode 1 (task b) rows: actions 10, 11, 12 -> last chunk repeats 12.
    rows = np.flatnonzero(ds.obs[:, 0] == 1)
    assert ds.chunks[rows[-1], :, 0].tolist() == [12, 12, 12]
    assert ds.chunks[rows[0], :, 0].tolist() == [10, 11, 12]
    assert set(ds.task[rows].tolist()) == {1}
    only_a = build_chunks(replay, chunk_length=2, tasks=("a",), instructions=None)
    assert len(only_a) == 9
    with pytest.raises(LearningError):
        build_chunks(replay, chunk_length=2, tasks=("zzz",), instructions=None)


def spec(kind: str, instr_dim: int = 0) -> PolicySpec:
    return PolicySpec(
        kind=kind,
        obs_dim=5,
        action_dim=2,
        chunk_length=4,
        instr_dim=instr_dim,
        hidden=32,
        depth=2,
        instr_proj=4,
        time_features=4,
        steps=5,
        tasks=["a"],
    )


def test_policies_output_robot_units_inside_the_action_bounds() -> None:
    torch.manual_seed(0)
    for kind in ("bc", "teacher", "student"):
        policy = build_policy(spec(kind, instr_dim=6)).eval()
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(50.0)  # huge outputs must still be clamped
            out = policy(torch.randn(7, 5), torch.randn(7, 6))
        assert out.shape == (7, 4, 2)
        assert float(out.abs().max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="instruction"):
        build_policy(spec("bc", instr_dim=6))(torch.randn(1, 5))


def test_consistency_boundary_condition_and_teacher_initialisation() -> None:
    torch.manual_seed(1)
    teacher = build_policy(spec("teacher"))
    assert isinstance(teacher, FlowPolicy)
    student = make_student(teacher, hidden=0, depth=0)
    assert isinstance(student, ConsistencyPolicy) and student.spec.kind == "student"
    cond = torch.randn(3, 5)
    x = torch.randn(3, 8)
    # f(x, 1) = x exactly.
    assert torch.equal(student.consistency(x, torch.ones(3), cond), x)
    # Initialised from the teacher, f(x, t) is one Euler step of the teacher to t = 1.
    t = torch.full((3,), 0.3)
    euler = x + 0.7 * teacher.velocity(x, t, cond)
    torch.testing.assert_close(student.consistency(x, t, cond), euler)
    smaller = make_student(teacher, hidden=16, depth=1)
    assert smaller.spec.hidden == 16
    assert torch.equal(smaller.normalizer.obs_std, teacher.normalizer.obs_std)


def test_instruction_standardization_is_part_of_the_model() -> None:
    torch.manual_seed(5)
    s = spec("teacher", instr_dim=6)
    s.instr_norm = True
    teacher = build_policy(s)
    assert isinstance(teacher, FlowPolicy)
    emb = np.random.default_rng(0).normal(0.1, 0.05, (3, 6)).astype(np.float32)
    teacher.cond.fit_instructions(emb)
    np.testing.assert_allclose(
        teacher.cond.instr_std.numpy(), np.maximum(emb.std(0), 1e-2), rtol=1e-5
    )
    obs = torch.randn(2, 5)
    x = torch.zeros(2, 8)
    # Conditioning on task 0 equals projecting its standardized embedding.
    cond = teacher.condition(obs, torch.from_numpy(emb[[0, 0]]))
    z = (torch.from_numpy(emb[0]) - teacher.cond.instr_mean) / teacher.cond.instr_std
    assert teacher.cond.proj is not None
    torch.testing.assert_close(cond[:, 5:], teacher.cond.proj(z).expand(2, -1))
    assert teacher.velocity(x, torch.zeros(2), cond).shape == (2, 8)
    # A fresh, smaller student takes the teacher's standardization along.
    student = make_student(teacher, hidden=16, depth=1)
    assert torch.equal(student.cond.instr_std, teacher.cond.instr_std)


def test_teacher_integration_is_euler_on_the_grid() -> None:
    torch.manual_seed(2)
    teacher = build_policy(spec("teacher"))
    assert isinstance(teacher, FlowPolicy)
    cond = torch.randn(2, 5)
    x = torch.zeros(2, 8)
    manual = x.clone()
    for k in range(5):
        manual = manual + 0.2 * teacher.velocity(manual, torch.full((2,), k / 5), cond)
    torch.testing.assert_close(teacher.sample_normalized(cond), manual)
    # Deterministic acting: same input, same chunk.
    obs = torch.randn(2, 5)
    assert torch.equal(teacher(obs), teacher(obs))


@pytest.mark.parametrize("source", ["gaussian", "scaled"])
def test_flow_teacher_recovers_the_expert_where_bc_learns_the_noisy_mean(source: str) -> None:
    """The mechanism behind teacher > BC on mixed-quality demos, on a toy problem.

    Demonstrations are clip(expert + N(0, 1)): the mean action (what MSE regression learns) is
    shrunk toward zero wherever the expert saturates, while the flow integrated from the centre
    of its noise (x_0 = 0) lands near the median, which is the expert's action. Both noise
    sources hold (``scaled`` is the one the per-task-normalised teacher trains on).
    """
    torch.manual_seed(3)

    def toy(kind: str) -> PolicySpec:
        return PolicySpec(
            kind=kind,
            obs_dim=5,
            action_dim=2,
            chunk_length=2,
            instr_dim=0,
            hidden=64,
            depth=2,
            instr_proj=4,
            time_features=4,
            steps=10,
            tasks=["a"],
        )

    def expert(obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(2 * obs[:, :1, None], -1, 1).expand(obs.shape[0], 2, 2)

    flow, bc = build_policy(toy("teacher")), build_policy(toy("bc"))
    assert isinstance(flow, FlowPolicy) and isinstance(bc, BCPolicy)
    opts = [torch.optim.Adam(m.parameters(), lr=3e-3) for m in (flow, bc)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(800):
        obs = torch.randn(128, 5, generator=gen)
        demos = torch.clamp(expert(obs) + torch.randn(128, 2, 2, generator=gen), -1, 1)
        losses = (
            flow_matching_loss(
                flow, obs, demos, None, time_sampling="uniform", gen=gen, source=source
            ),
            bc_loss(bc, obs, demos, None),
        )
        for opt, loss in zip(opts, losses, strict=True):
            opt.zero_grad()
            loss.backward()
            opt.step()
    obs = torch.randn(512, 5, generator=gen)
    saturated = obs[:, 0].abs() > 0.5
    with torch.no_grad():
        err_flow = (flow(obs) - expert(obs)).abs()[saturated].mean().item()
        err_bc = (bc(obs) - expert(obs)).abs()[saturated].mean().item()
    assert err_flow < 0.8 * err_bc, (err_flow, err_bc)


def test_distillation_losses_are_finite_and_zero_for_a_perfect_student() -> None:
    torch.manual_seed(4)
    teacher = build_policy(spec("teacher"))
    assert isinstance(teacher, FlowPolicy)
    student = make_student(teacher, hidden=0, depth=0)
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(32, 5)
    chunks = torch.rand(32, 4, 2) * 2 - 1
    cd, anchor = consistency_losses(
        student,
        student,
        teacher,
        obs,
        chunks,
        None,
        grid=5,
        anchor_fraction=0.25,
        noise_scale=0.0,
        gen=gen,
    )
    assert math.isfinite(cd.item()) and math.isfinite(anchor.item())
    assert cd.requires_grad and anchor.requires_grad
    # With a one-interval grid, the teacher's Euler step IS the path's end: a student equal to
    # the teacher-initialised one has zero consistency and anchor loss.
    cd1, anchor1 = consistency_losses(
        student,
        student,
        teacher,
        obs,
        chunks,
        None,
        grid=1,
        anchor_fraction=0.5,
        noise_scale=0.0,
        gen=gen,
    )
    assert cd1.item() < 1e-10 and anchor1.item() < 1e-10


def test_wilson_interval_matches_known_values() -> None:
    low, high = wilson_interval(45, 50)
    assert low == pytest.approx(0.7864, abs=1e-3) and high == pytest.approx(0.9565, abs=1e-3)
    low, high = wilson_interval(50, 50)
    assert high == 1.0 and low == pytest.approx(0.9287, abs=1e-3)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_parse_tasks() -> None:
    assert envs.parse_tasks("mt10") == envs.MT10
    assert envs.parse_tasks("reach-v3, push-v3,reach-v3") == ("reach-v3", "push-v3")
    with pytest.raises(LearningError, match="unknown"):
        envs.parse_tasks("fly-to-the-moon-v3")


def test_episode_starts_are_fixed_by_the_seed() -> None:
    a, b = envs.make_env("pick-place-v3"), envs.make_env("pick-place-v3")
    try:
        first = envs.reset_episode(a, 5)
        np.testing.assert_array_equal(first, envs.reset_episode(b, 5))
        assert not np.array_equal(first, envs.reset_episode(a, 6))
        np.testing.assert_array_equal(first, envs.reset_episode(a, 5))
    finally:
        a.close()
        b.close()


@dataclass
class _Cfg:
    data: str = arg("", "where", required=True)
    steps: int = arg(3, "how many")
    rate: float = arg(0.5, "how fast")
    flag: bool = arg(True, "on or off")


def test_config_dataclasses_become_command_lines() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Cfg)
    cfg = config_from_args(_Cfg, parser.parse_args(["--data", "x", "--steps", "7", "--no-flag"]))
    assert cfg == _Cfg(data="x", steps=7, rate=0.5, flag=False)
    assert "how fast" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_a_run_folder_is_held_by_one_run_at_a_time(tmp_path: Path) -> None:
    from vlarl.learning.runs import run_folder

    folder = tmp_path / "run"
    with run_folder(folder, overwrite=False, marker="done") as held:
        assert (held / ".lock").read_text().strip().isdigit()
        with (
            pytest.raises(LearningError, match="in use by another run"),
            run_folder(folder, overwrite=True, marker="done"),
        ):
            pass
        (held / "done").write_text("x")
    assert not (folder / ".lock").exists()
    with (
        pytest.raises(LearningError, match="exists; pass --overwrite"),
        run_folder(folder, overwrite=False, marker="done"),
    ):
        pass
    with run_folder(folder, overwrite=True, marker="done"):
        pass
