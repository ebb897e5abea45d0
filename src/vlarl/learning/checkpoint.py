"""Checkpoints: safetensors files (no pickle) with a verified digest.

Tensors: the policy module's state dict under ``model.<name>`` and, for instruction-conditioned
models, the task embeddings as ``instructions`` [num_tasks, instr_dim].
Header metadata (strings): ``format`` ("vlarl.checkpoint/1"), ``kind``, ``spec`` (JSON
:class:`~vlarl.learning.networks.PolicySpec`), ``config`` (JSON training config),
``normalization`` (JSON), ``step``, ``tasks`` (JSON), ``parent`` (digest of the checkpoint this
one was made from, e.g. the teacher of a student), ``created`` and ``sha256`` (digest of the
tensor bytes, as in the replay format). Writes are atomic; loading a truncated, tampered or
foreign file raises :class:`~vlarl.learning.errors.CheckpointError` saying why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from vlarl.data.errors import ReplayError
from vlarl.data.replay import atomic_write_bytes, header_metadata, tensor_digest
from vlarl.learning.errors import CheckpointError
from vlarl.learning.networks import PolicyBase, PolicySpec, build_policy

FORMAT = "vlarl.checkpoint/1"
MODEL_PREFIX = "model."
REQUIRED = ("format", "kind", "spec", "step", "tasks", "sha256")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt policy and what its header says."""

    path: Path
    policy: PolicyBase
    spec: PolicySpec
    step: int
    tasks: tuple[str, ...]
    instructions: dict[str, np.ndarray]
    config: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    parent: str = ""
    created: str = ""
    sha256: str = ""

    def instruction_batch(self, task: str, batch: int = 1) -> np.ndarray | None:
        """The task's embedding repeated ``batch`` times ([batch, instr_dim]), or None."""
        if self.spec.instr_dim == 0:
            return None
        if task not in self.instructions:
            raise CheckpointError(
                f"{self.path}: model was not trained on task {task!r} "
                f"(it knows {', '.join(self.tasks)})"
            )
        return np.repeat(self.instructions[task][None, :], batch, axis=0)


def save_checkpoint(
    path: str | os.PathLike[str],
    policy: PolicyBase,
    *,
    step: int,
    instructions: Mapping[str, np.ndarray] | None = None,
    config: Mapping[str, Any] | None = None,
    parent: str = "",
    overwrite: bool = True,
) -> str:
    """Write ``policy`` atomically; returns the digest of the tensor bytes."""
    spec = policy.spec
    tensors: dict[str, np.ndarray] = {
        MODEL_PREFIX + k: v.detach().cpu().contiguous().numpy()
        for k, v in policy.state_dict().items()
    }
    if spec.instr_dim > 0:
        if not instructions or any(t not in instructions for t in spec.tasks):
            raise CheckpointError("an instruction-conditioned policy needs every task's embedding")
        tensors["instructions"] = np.stack(
            [np.asarray(instructions[t], np.float32) for t in spec.tasks]
        )
    digest = tensor_digest(tensors)
    metadata = {
        "format": FORMAT,
        "kind": spec.kind,
        "spec": json.dumps(spec.to_dict()),
        "config": json.dumps(dict(config or {}), default=str),
        "normalization": json.dumps(policy.normalizer.to_json()),
        "step": str(int(step)),
        "tasks": json.dumps(list(spec.tasks)),
        "parent": parent,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sha256": digest,
    }
    try:
        atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata), overwrite=overwrite)
    except ReplayError as exc:
        raise CheckpointError(str(exc)) from None
    return digest


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read, verify and rebuild a policy; raise :class:`CheckpointError` with the reason."""
    path = Path(path)
    where = str(path)
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read checkpoint ({exc.strerror or exc})") from None
    try:
        meta = header_metadata(payload, where)
    except ReplayError as exc:
        raise CheckpointError(str(exc).replace("vlarl replay shard", "vlarl checkpoint")) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format {meta.get('format')!r} is not {FORMAT!r}")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: checkpoint metadata lacks {', '.join(missing)}")
    try:
        tensors = st_load(payload)
    except Exception as exc:
        raise CheckpointError(
            f"{where}: not a readable safetensors file, truncated or corrupt ({exc})"
        ) from None
    digest = tensor_digest(tensors)
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"{where}: sha256 mismatch (header {meta['sha256'][:12]}..., "
            f"data {digest[:12]}...): the checkpoint was modified or corrupted"
        )
    try:
        spec = PolicySpec.from_dict(json.loads(meta["spec"]))
        config = json.loads(meta.get("config", "{}") or "{}")
        normalization = json.loads(meta.get("normalization", "{}") or "{}")
        tasks = tuple(json.loads(meta["tasks"]))
        step = int(meta["step"])
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: malformed checkpoint metadata ({exc})") from None
    if spec.kind != meta["kind"]:
        raise CheckpointError(f"{where}: kind {meta['kind']!r} disagrees with spec {spec.kind!r}")
    try:
        policy = build_policy(spec)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: cannot build the policy ({exc})") from None
    state = {
        k[len(MODEL_PREFIX) :]: torch.from_numpy(v.copy())
        for k, v in tensors.items()
        if k.startswith(MODEL_PREFIX)
    }
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{where}: weights do not fit the spec ({first})") from None
    policy.eval()
    instructions: dict[str, np.ndarray] = {}
    if spec.instr_dim > 0:
        emb = tensors.get("instructions")
        if emb is None or emb.shape != (len(tasks), spec.instr_dim):
            raise CheckpointError(f"{where}: instruction embeddings missing or mis-shaped")
        instructions = {t: emb[i].astype(np.float32) for i, t in enumerate(tasks)}
    return Checkpoint(
        path=path,
        policy=policy,
        spec=spec,
        step=step,
        tasks=tasks,
        instructions=instructions,
        config=config,
        normalization=normalization,
        parent=meta.get("parent", ""),
        created=meta.get("created", ""),
        sha256=digest,
    )
