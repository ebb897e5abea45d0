"""``vlarl export``: a checkpoint -> an ONNX model meeting the runtime's contract (+ TensorRT).

The exported graph is the whole policy: raw ``obs`` [B, obs_dim] (and ``instruction``
[B, instr_dim] for instruction-conditioned models) in, ``action_chunk`` [B, H, A] in robot
units out, with observation standardization and action scaling inside (:mod:`vlarl.contract`).
A teacher is exported with its K Euler steps unrolled (``--steps``), a student as one network
evaluation; both start from x_0 = 0, so the graph is deterministic, unless ``--start-noise s``
draws x_0 ~ N(0, s^2 I) inside the graph (ONNX ``RandomNormalLike``: a fresh start per call, as a
flow policy samples; the contract's inputs and outputs stay the same). Metadata: model id,
version, kind, dims, chunk length, tasks, per-task instruction embeddings (the runtime needs no
sentence encoder), normalization and control period.

Checks: ONNX Runtime (CPU) against PyTorch on observations drawn around the training data
(max abs error printed; above ``--tolerance`` the export fails and nothing is written), then the
runtime's own loader. With start noise the numerical check runs on the same graph with the
noise scaled to 0 (the only difference), and the noisy graph must give finite chunks that vary
between calls. With a GPU, an fp16 TensorRT engine is built beside the ONNX and checked
against ONNX Runtime; without one that step is skipped with the reason.
"""

from __future__ import annotations

import argparse
import io
import math
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlarl.contract import (
    INPUT_INSTRUCTION,
    INPUT_OBS,
    OUTPUT_ACTION_CHUNK,
    ModelMetadata,
)
from vlarl.data.replay import atomic_write_bytes
from vlarl.learning import tensorrt
from vlarl.learning.checkpoint import Checkpoint, load_checkpoint
from vlarl.learning.errors import ExportCheckError, LearningError
from vlarl.learning.networks import ConsistencyPolicy, FlowPolicy, PolicyBase
from vlarl.learning.runs import add_config_arguments, arg, config_from_args, write_json

OPSET = 17


@dataclass
class ExportConfig:
    checkpoint: str = arg("", "checkpoint to export (.safetensors)", required=True)
    out: str = arg(
        "", "ONNX file to write (refuses to overwrite without --overwrite)", required=True
    )
    model_id: str = arg("", "model id in the metadata (default: <first task>-<kind>)")
    version: int = arg(1, "model version in the metadata (increase with every export)")
    steps: int = arg(0, "teacher only: Euler steps unrolled into the graph (0 = the model's K)")
    start_noise: float = arg(
        0.0, "std of the start x_0 drawn inside the graph per call (0 = x_0 = 0, deterministic)"
    )
    tolerance: float = arg(1e-4, "largest allowed |onnxruntime - pytorch| on the check inputs")
    check_samples: int = arg(512, "observations used for the numerical check")
    tensorrt: str = arg("auto", "fp16 TensorRT engine: 'auto' (if a GPU is here), 'on', 'off'")
    overwrite: bool = arg(False, "replace an existing ONNX file")
    seed: int = arg(0, "seed of the check inputs and of the graph's start noise")


class _Sampler(nn.Module):
    """The policy from x_0 = start_noise * N(0, I); 0 traces to the deterministic x_0 = 0."""

    def __init__(self, policy: PolicyBase, start_noise: float) -> None:
        super().__init__()
        self.policy = policy
        self.start_noise = start_noise

    def act(self, obs: torch.Tensor, instruction: torch.Tensor | None) -> torch.Tensor:
        if self.start_noise == 0.0 or not isinstance(self.policy, FlowPolicy | ConsistencyPolicy):
            return self.policy(obs, instruction)
        cond = self.policy.condition(obs, instruction)
        zeros = cond.new_zeros(cond.shape[0], self.policy.flat)
        start = self.start_noise * torch.randn_like(zeros)
        return self.policy.to_chunk(self.policy.sample_normalized(cond, start))


class _ObsOnly(_Sampler):
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.act(obs, None)


class _ObsInstruction(_Sampler):
    def forward(self, obs: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        return self.act(obs, instruction)


def metadata_for(
    ckpt: Checkpoint,
    *,
    model_id: str,
    version: int,
    steps: int,
    start_noise: float = 0.0,
    lineage: dict[str, Any] | None = None,
) -> ModelMetadata:
    spec = ckpt.spec
    normalization: dict[str, Any] = dict(ckpt.policy.normalizer.to_json())
    if ckpt.policy.task_norm is not None:  # the graph uses these, not the global statistics
        normalization["per_task"] = ckpt.policy.task_norm.to_json(list(ckpt.tasks))
    if spec.kind == "teacher":
        normalization["integration_steps"] = steps
    if start_noise > 0:
        normalization["start_noise"] = start_noise
    return ModelMetadata(
        model_id=model_id,
        version=version,
        obs_kind=spec.obs_kind,
        obs_dim=spec.obs_dim,
        action_dim=spec.action_dim,
        chunk_length=spec.chunk_length,
        instr_dim=spec.instr_dim,
        tasks=tuple(ckpt.tasks),
        kind=spec.kind,
        instructions={t: tuple(float(x) for x in v) for t, v in ckpt.instructions.items()},
        normalization=normalization,
        control_dt=spec.control_dt,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        lineage=dict(lineage or {}),
    )


def to_onnx_bytes(policy: PolicyBase, *, start_noise: float = 0.0) -> bytes:
    """The policy as ONNX (dynamic batch), without metadata."""
    spec = policy.spec
    policy = policy.eval()
    obs = torch.zeros(2, spec.obs_dim)
    wrapper: nn.Module
    if spec.instr_dim > 0:
        wrapper = _ObsInstruction(policy, start_noise)
        args: tuple[torch.Tensor, ...] = (obs, torch.zeros(2, spec.instr_dim))
        names = [INPUT_OBS, INPUT_INSTRUCTION]
    else:
        wrapper = _ObsOnly(policy, start_noise)
        args = (obs,)
        names = [INPUT_OBS]
    axes = {n: {0: "batch"} for n in names} | {OUTPUT_ACTION_CHUNK: {0: "batch"}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: fast, no external data, and these MLPs need nothing newer.
        torch.onnx.export(
            wrapper,
            args,
            buf,  # type: ignore[arg-type]
            input_names=names,
            output_names=[OUTPUT_ACTION_CHUNK],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    return buf.getvalue()


def seed_random_nodes(onnx_bytes: bytes, *, seed: int) -> bytes:
    """Give the graph's random nodes a seed: a new session draws the same sequence of starts,
    so evaluations repeat exactly (each call still draws a new start)."""
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    random_nodes = [n for n in model.graph.node if n.op_type.startswith("Random")]
    if not random_nodes:
        return onnx_bytes
    for node in random_nodes:
        for attr in [a for a in node.attribute if a.name == "seed"]:
            node.attribute.remove(attr)
        node.attribute.append(onnx.helper.make_attribute("seed", float(seed)))
    return model.SerializeToString()


def with_metadata(onnx_bytes: bytes, meta: ModelMetadata, *, doc: str) -> bytes:
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    del model.metadata_props[:]
    for key, value in meta.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = doc
    model.producer_name = "vlarl"
    model.model_version = meta.version
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_inputs(ckpt: Checkpoint, n: int, seed: int) -> dict[str, np.ndarray]:
    """Observations around the training data (mean +- 2 std, some outliers) and task rows."""
    rng = np.random.default_rng(seed)
    norm = ckpt.policy.normalizer
    mean = norm.obs_mean.numpy()
    std = norm.obs_std.numpy()
    obs = mean + std * rng.normal(0, 1.0, (n, mean.size)) * rng.choice([0.5, 1.0, 3.0], (n, 1))
    feeds = {INPUT_OBS: obs.astype(np.float32)}
    if ckpt.spec.instr_dim > 0:
        rows = np.stack([ckpt.instructions[t] for t in ckpt.tasks])
        feeds[INPUT_INSTRUCTION] = rows[rng.integers(0, len(rows), n)].astype(np.float32)
    return feeds


def ort_run(onnx_bytes: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_ACTION_CHUNK], feeds)[0]


def export(cfg: ExportConfig, *, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export, check and write ``cfg.out``; ``lineage`` goes into the metadata (distill-back)."""
    out = Path(cfg.out)
    if out.suffix != ".onnx":
        raise LearningError(f"--out must end in .onnx, got {out}")
    if out.exists() and not cfg.overwrite:
        raise LearningError(f"{out} exists; pass --overwrite to replace it")
    if cfg.tensorrt not in ("auto", "on", "off"):
        raise LearningError("--tensorrt must be 'auto', 'on' or 'off'")
    ckpt = load_checkpoint(cfg.checkpoint)
    policy = ckpt.policy
    steps = 0
    if isinstance(policy, FlowPolicy):
        steps = cfg.steps or policy.spec.steps
        policy.steps = steps
    elif cfg.steps:
        raise LearningError("--steps applies to teacher checkpoints only")
    model_id = (
        cfg.model_id or f"{ckpt.tasks[0] if len(ckpt.tasks) == 1 else 'multitask'}-{ckpt.spec.kind}"
    )
    if not (math.isfinite(cfg.start_noise) and cfg.start_noise >= 0):
        raise LearningError(f"--start-noise must be >= 0, got {cfg.start_noise}")
    if cfg.start_noise > 0 and not isinstance(policy, FlowPolicy | ConsistencyPolicy):
        raise LearningError("--start-noise applies to teacher and student checkpoints only")
    meta = metadata_for(
        ckpt,
        model_id=model_id,
        version=cfg.version,
        steps=steps,
        start_noise=cfg.start_noise,
        lineage=lineage,
    )
    doc = (
        f"vlarl {ckpt.spec.kind} policy exported from {Path(cfg.checkpoint).name} "
        f"(sha256 {ckpt.sha256[:16]}, step {ckpt.step})"
    )
    onnx_bytes = with_metadata(
        seed_random_nodes(to_onnx_bytes(policy, start_noise=cfg.start_noise), seed=cfg.seed),
        meta,
        doc=doc,
    )

    feeds = check_inputs(ckpt, cfg.check_samples, cfg.seed)
    with torch.no_grad():
        instr = feeds.get(INPUT_INSTRUCTION)
        reference = policy(
            torch.from_numpy(feeds[INPUT_OBS]), None if instr is None else torch.from_numpy(instr)
        ).numpy()
    # With start noise, the same graph traced with the noise scaled to 0 is checked numerically.
    checked = onnx_bytes if cfg.start_noise == 0 else to_onnx_bytes(policy, start_noise=0.0)
    got = ort_run(checked, feeds)
    max_err = float(np.max(np.abs(got - reference)))
    if not max_err <= cfg.tolerance:
        raise ExportCheckError(
            f"ONNX Runtime differs from PyTorch by {max_err:.3e} "
            f"(> --tolerance {cfg.tolerance:g}); nothing written"
        )
    if cfg.start_noise > 0:
        _check_sampling(onnx_bytes, feeds)
    atomic_write_bytes(out, onnx_bytes, overwrite=cfg.overwrite)
    runtime_check = _runtime_check(out)

    report = tensorrt.EngineReport(built=False, reason="disabled (--tensorrt off)")
    if cfg.tensorrt != "off":
        reason = tensorrt.unavailable_reason()
        if reason and cfg.tensorrt == "on":
            raise LearningError(f"--tensorrt on, but {reason}")
        report = tensorrt.build_engine(out, out.with_suffix(".engine"), fp16=True)
        first = {k: v[:16] for k, v in feeds.items()}
        report = tensorrt.check_engine(report, first, got[:16], OUTPUT_ACTION_CHUNK)
    result = {
        "onnx": str(out),
        "bytes": len(onnx_bytes),
        "sha256": _sha256(onnx_bytes),
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": ckpt.sha256,
        "metadata": meta.to_props(),
        "check_samples": cfg.check_samples,
        "max_abs_err_vs_pytorch": max_err,
        "runtime_loader": runtime_check,
        "tensorrt": asdict(report),
        "config": asdict(cfg),
    }
    write_json(out.with_suffix(".export.json"), result)
    result["tensorrt_text"] = report.describe()
    return result


def _check_sampling(onnx_bytes: bytes, feeds: dict[str, np.ndarray]) -> None:
    """A sampling graph gives finite chunks, and two calls on the same input differ."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    first, second = (sess.run([OUTPUT_ACTION_CHUNK], feeds)[0] for _ in range(2))
    if not (np.isfinite(first).all() and np.isfinite(second).all()):
        raise ExportCheckError("the sampling graph gave non-finite actions; nothing written")
    if np.array_equal(first, second):
        raise ExportCheckError("the sampling graph gave the same chunks twice; nothing written")


def _runtime_check(path: Path) -> str:
    """Load the file with the policy node's loader, when it is installed."""
    try:
        from vlarl.core.onnx_policy import OnnxPolicy
    except ImportError:
        return "skipped: vlarl.core.onnx_policy not installed"
    policy = OnnxPolicy.load(path, providers="cpu", intra_op_threads=1)
    return f"ok: {policy.tag} loads in vlarl.core.onnx_policy"


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    result = export(config_from_args(ExportConfig, args))
    meta = result["metadata"]
    print(
        f"wrote {result['onnx']} ({result['bytes'] / 1024:.0f} KiB): "
        f"{meta['vlarl.model_id']}@{meta['vlarl.version']}, kind {meta['vlarl.kind']}, "
        f"chunk {meta['vlarl.chunk_length']}, instr_dim {meta['vlarl.instr_dim']}"
    )
    print(
        f"max |onnxruntime - pytorch| = {result['max_abs_err_vs_pytorch']:.2e} over "
        f"{result['check_samples']} observations"
    )
    print(f"runtime loader: {result['runtime_loader']}")
    print(result["tensorrt_text"])
    return 0
