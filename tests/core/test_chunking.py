"""ChunkScheduler: executing chunks and re-planning on a schedule."""

from __future__ import annotations

import numpy as np
import pytest

from vlarl.core.chunking import ChunkScheduler


def chunk(h: int, a: int = 4, offset: float = 0.0) -> np.ndarray:
    return (np.arange(h * a, dtype=np.float32).reshape(h, a) + offset).copy()


@pytest.mark.parametrize(
    ("chunk_length", "replan_every"), [(0, 1), (-1, 1), (4, 0), (4, 5), (1, 2), (4, -1)]
)
def test_bad_arguments(chunk_length: int, replan_every: int) -> None:
    with pytest.raises(ValueError):
        ChunkScheduler(chunk_length=chunk_length, replan_every=replan_every)


def test_needs_a_plan_first() -> None:
    s = ChunkScheduler(chunk_length=4, replan_every=2)
    assert s.needs_plan()
    with pytest.raises(RuntimeError):
        s.next()


@pytest.mark.parametrize("replan_every", [1, 2, 3, 4])
def test_executes_replan_every_steps_then_asks(replan_every: int) -> None:
    s = ChunkScheduler(chunk_length=4, replan_every=replan_every)
    plan = chunk(4)
    s.set_plan(plan)
    for i in range(replan_every):
        assert not s.needs_plan()
        action, remaining = s.next()
        np.testing.assert_array_equal(action, plan[i])
        np.testing.assert_array_equal(remaining, plan[i:])
        assert remaining.shape == (4 - i, 4)
    assert s.needs_plan()
    with pytest.raises(RuntimeError):
        s.next()


def test_new_plan_restarts_from_its_first_step() -> None:
    s = ChunkScheduler(chunk_length=3, replan_every=2)
    s.set_plan(chunk(3))
    s.next()
    s.next()
    second = chunk(3, offset=100.0)
    s.set_plan(second)
    action, remaining = s.next()
    np.testing.assert_array_equal(action, second[0])
    assert remaining.shape[0] == 3


def test_replanning_early_is_allowed() -> None:
    s = ChunkScheduler(chunk_length=4, replan_every=4)
    s.set_plan(chunk(4))
    s.next()
    s.set_plan(chunk(4, offset=50.0))  # e.g. a model swap installs a fresh plan mid-chunk
    np.testing.assert_array_equal(s.next()[0], chunk(4, offset=50.0)[0])


def test_reset_drops_the_plan() -> None:
    s = ChunkScheduler(chunk_length=4, replan_every=4)
    s.set_plan(chunk(4))
    s.next()
    s.reset()
    assert s.needs_plan()
    with pytest.raises(RuntimeError):
        s.next()


@pytest.mark.parametrize("shape", [(3, 4), (5, 4), (4,), (4, 4, 1)])
def test_wrong_chunk_shape_is_rejected_and_keeps_the_old_plan(shape: tuple[int, ...]) -> None:
    s = ChunkScheduler(chunk_length=4, replan_every=2)
    plan = chunk(4)
    s.set_plan(plan)
    with pytest.raises(ValueError):
        s.set_plan(np.zeros(shape, dtype=np.float32))
    np.testing.assert_array_equal(s.next()[0], plan[0])


def test_single_step_chunks() -> None:
    s = ChunkScheduler(chunk_length=1, replan_every=1)
    for k in range(3):
        assert s.needs_plan()
        s.set_plan(np.full((1, 4), k, dtype=np.float32))
        action, remaining = s.next()
        assert action.tolist() == [k] * 4 and remaining.shape == (1, 4)


def test_long_run_plan_count() -> None:
    s = ChunkScheduler(chunk_length=8, replan_every=3)
    plans = 0
    for _ in range(30):
        if s.needs_plan():
            s.set_plan(chunk(8))
            plans += 1
        s.next()
    assert plans == 10
