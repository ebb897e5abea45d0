"""Acting with a trained policy, whatever it is stored in: a checkpoint or an ONNX file.

Every policy here answers ``predict_batch(obs [B, obs_dim], instruction [B, instr_dim] | None)
-> action_chunk [B, H, A]`` in robot units and knows the embedding of each task it was trained
on (``instruction(task)``). ONNX files go through the runtime's loader
(:class:`vlarl.core.onnx_policy.OnnxPolicy`) when it is installed, so evaluation measures the
deployed path; otherwise through an ONNX Runtime session with the same contract checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vlarl.contract import (
    INPUT_INSTRUCTION,
    INPUT_OBS,
    OUTPUT_ACTION_CHUNK,
    ContractError,
    ModelMetadata,
)
from vlarl.learning.checkpoint import Checkpoint, load_checkpoint
from vlarl.learning.errors import LearningError
from vlarl.learning.networks import ConsistencyPolicy, FlowPolicy


class ActingPolicy(Protocol):
    name: str
    chunk_length: int
    action_dim: int
    obs_dim: int
    tasks: tuple[str, ...]

    def instruction(self, task: str) -> np.ndarray | None: ...

    def predict_batch(self, obs: np.ndarray, instruction: np.ndarray | None) -> np.ndarray: ...


class TorchPolicy:
    """A checkpoint acting in PyTorch (CPU); teachers integrate ``steps`` Euler steps."""

    def __init__(
        self, ckpt: Checkpoint, *, steps: int = 0, noise_scale: float = 0.0, seed: int = 0
    ) -> None:
        self.ckpt = ckpt
        self.module = ckpt.policy.eval()
        spec = ckpt.spec
        self.name = f"{spec.kind}:{ckpt.path.name}"
        self.kind = spec.kind
        self.chunk_length = spec.chunk_length
        self.action_dim = spec.action_dim
        self.obs_dim = spec.obs_dim
        self.tasks = tuple(ckpt.tasks)
        self.steps = steps or (spec.steps if spec.kind == "teacher" else 1)
        self.noise_scale = noise_scale
        self._gen = torch.Generator().manual_seed(seed)

    def instruction(self, task: str) -> np.ndarray | None:
        row = self.ckpt.instruction_batch(task, 1)
        return None if row is None else row[0]

    @torch.no_grad()
    def predict_batch(self, obs: np.ndarray, instruction: np.ndarray | None) -> np.ndarray:
        obs_t = torch.as_tensor(np.asarray(obs, np.float32))
        instr_t = (
            None if instruction is None else torch.as_tensor(np.asarray(instruction, np.float32))
        )
        m = self.module
        if isinstance(m, (FlowPolicy, ConsistencyPolicy)):
            cond = m.condition(obs_t, instr_t)
            noise = None
            if self.noise_scale > 0:
                noise = self.noise_scale * torch.randn(obs_t.shape[0], m.flat, generator=self._gen)
            x = m.sample_normalized(cond, noise, steps=self.steps)
            return m.to_chunk(x).numpy()
        return m(obs_t, instr_t).numpy()


class OrtPolicy:
    """An ONNX file meeting the model contract, run in ONNX Runtime (CPU)."""

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        import onnx
        import onnxruntime as ort

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ContractError(f"{path}: not a readable ONNX file ({exc})") from None
        props = {p.key: p.value for p in model.metadata_props}
        self.metadata = ModelMetadata.from_props(props)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        want = {INPUT_OBS} | ({INPUT_INSTRUCTION} if self.metadata.instr_dim > 0 else set())
        if names != want:
            raise ContractError(
                f"{path}: inputs {sorted(names)}, the contract wants {sorted(want)}"
            )
        outs = [o.name for o in self.session.get_outputs()]
        if outs != [OUTPUT_ACTION_CHUNK]:
            raise ContractError(f"{path}: outputs {outs}, the contract wants [action_chunk]")

    def predict_batch(self, obs: np.ndarray, instruction: np.ndarray | None) -> np.ndarray:
        feeds: dict[str, Any] = {INPUT_OBS: np.asarray(obs, np.float32)}
        if self.metadata.instr_dim > 0:
            feeds[INPUT_INSTRUCTION] = np.asarray(instruction, np.float32)
        return self.session.run([OUTPUT_ACTION_CHUNK], feeds)[0]


class OnnxActingPolicy:
    """Adapter: an ONNX model (runtime loader or :class:`OrtPolicy`) as an acting policy."""

    def __init__(self, path: Path, *, threads: int = 1, prefer_runtime: bool = True) -> None:
        runner: Any = None
        self.backend = "onnxruntime"
        loader = _runtime_loader() if prefer_runtime else None
        if loader is not None:
            runner = loader.load(str(path), providers="cpu", intra_op_threads=threads)
            self.backend = "vlarl.core.onnx_policy"
        if runner is None:
            runner = OrtPolicy(path, threads=threads)
        self.runner = runner
        meta: ModelMetadata = runner.metadata
        self.metadata = meta
        self.name = f"onnx:{path.name}"
        self.kind = meta.kind
        self.chunk_length = meta.chunk_length
        self.action_dim = meta.action_dim
        self.obs_dim = meta.obs_dim
        self.tasks = tuple(meta.tasks)

    def instruction(self, task: str) -> np.ndarray | None:
        if self.metadata.instr_dim == 0:
            return None
        if task not in self.metadata.instructions:
            raise LearningError(f"{self.name} has no instruction embedding for task {task!r}")
        return np.asarray(self.metadata.instructions[task], np.float32)

    def predict_batch(self, obs: np.ndarray, instruction: np.ndarray | None) -> np.ndarray:
        return np.asarray(self.runner.predict_batch(np.asarray(obs, np.float32), instruction))


def _runtime_loader() -> Any:
    """The policy node's loader class, or None where it is not installed."""
    try:
        from vlarl.core.onnx_policy import OnnxPolicy
    except ImportError:
        return None
    return OnnxPolicy


def load_acting_policy(
    path: str | os.PathLike[str],
    *,
    steps: int = 0,
    noise_scale: float = 0.0,
    threads: int = 1,
    seed: int = 0,
) -> ActingPolicy:
    """A checkpoint (``.safetensors``) or an ONNX model (``.onnx``) ready to act."""
    path = Path(path)
    if path.suffix == ".onnx":
        if steps or noise_scale:
            raise LearningError("--steps/--noise-scale apply to checkpoints, not to ONNX files")
        return OnnxActingPolicy(path, threads=threads)
    if path.suffix == ".safetensors":
        torch.set_num_threads(max(1, threads))
        return TorchPolicy(load_checkpoint(path), steps=steps, noise_scale=noise_scale, seed=seed)
    raise LearningError(f"{path}: expected a .safetensors checkpoint or an .onnx model")
