"""Task instructions: the bundled sentence encoder runs offline; embeddings are cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlarl.learning import instructions
from vlarl.learning.envs import MT10


def test_every_mt10_task_has_its_own_instruction() -> None:
    texts = [instructions.instruction_for(t) for t in MT10]
    assert len(set(texts)) == len(MT10)
    assert instructions.instruction_for("hammer-v3") == "do the task: hammer"


def test_embeddings_are_normalized_distinct_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLARL_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = instructions.task_embeddings(["pick-place-v3", "push-v3", "drawer-close-v3"])
    assert emb.shape == (3, instructions.EMBED_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    # Puck tasks are closer to each other than to closing a drawer.
    assert sims[0, 1] > sims[0, 2]
    cached = sorted(p.name for p in (tmp_path / "instructions").iterdir())
    assert len(cached) == 3
    # The second call reads the cache (no encoder): same numbers, even if the encoder is gone.
    monkeypatch.setattr(instructions, "_load_encoder", lambda: pytest.fail("encoder loaded"))
    again = instructions.task_embeddings(["pick-place-v3", "push-v3", "drawer-close-v3"])
    np.testing.assert_array_equal(emb, again)
