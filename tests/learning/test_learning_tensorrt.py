"""TensorRT: an fp16 engine from the exported ONNX matches ONNX Runtime (GPU only), and without
a GPU every entry point says why it skipped instead of failing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlarl.learning import tensorrt
from vlarl.learning.checkpoint import load_checkpoint, save_checkpoint
from vlarl.learning.export import check_inputs, metadata_for, ort_run, to_onnx_bytes, with_metadata
from vlarl.learning.networks import PolicySpec, build_policy

REASON = tensorrt.unavailable_reason()


def exported_student(tmp_path: Path) -> tuple[Path, object]:
    torch.manual_seed(0)
    spec = PolicySpec(
        kind="student",
        obs_dim=39,
        action_dim=4,
        chunk_length=8,
        instr_dim=0,
        hidden=64,
        depth=2,
        tasks=["pick-place-v3"],
    )
    policy = build_policy(spec)
    policy.normalizer.fit(
        np.random.default_rng(0).normal(size=(64, 39)),
        action_low=-np.ones(4),
        action_high=np.ones(4),
    )
    save_checkpoint(tmp_path / "s.safetensors", policy, step=0)
    ckpt = load_checkpoint(tmp_path / "s.safetensors")
    meta = metadata_for(ckpt, model_id="trt-test", version=1, steps=0)
    path = tmp_path / "s.onnx"
    path.write_bytes(with_metadata(to_onnx_bytes(ckpt.policy), meta, doc="test"))
    return path, ckpt


@pytest.mark.skipif(REASON is None, reason="a GPU is present: the skip path does not apply")
def test_without_a_gpu_the_engine_step_skips_with_the_reason(tmp_path: Path) -> None:
    path, ckpt = exported_student(tmp_path)
    report = tensorrt.build_engine(path, tmp_path / "s.engine")
    assert not report.built and report.reason == REASON
    assert "no GPU" in REASON or "not installed" in REASON
    assert report.describe().startswith("TensorRT skipped: ")
    assert not (tmp_path / "s.engine").exists()
    feeds = check_inputs(ckpt, 4, 0)
    same = tensorrt.check_engine(report, feeds, ort_run(path.read_bytes(), feeds), "action_chunk")
    assert not same.checked
    with pytest.raises(RuntimeError, match=r"GPU|tensorrt"):
        tensorrt.EngineRunner(tmp_path / "s.engine")


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT unavailable: {REASON}")
def test_fp16_engine_matches_onnxruntime(tmp_path: Path) -> None:
    path, ckpt = exported_student(tmp_path)
    report = tensorrt.build_engine(path, tmp_path / "s.engine", fp16=True)
    assert report.built, report.reason
    feeds = check_inputs(ckpt, 16, 1)
    reference = ort_run(path.read_bytes(), feeds)
    report = tensorrt.check_engine(report, feeds, reference, "action_chunk")
    assert report.checked, report.reason
    assert report.max_abs_err_vs_ort is not None and report.max_abs_err_vs_ort < 2e-2
