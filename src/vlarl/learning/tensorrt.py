"""TensorRT: an fp16 engine built from the exported ONNX, checked against ONNX Runtime.

Needs the ``tensorrt`` Python package and a CUDA GPU; running the engine also needs a way to
hold GPU memory (PyTorch with CUDA, or ``cuda-python``). Without them every entry point
returns a clear reason instead of failing (:func:`unavailable_reason`), so CPU-only machines
and CI skip this step with that reason.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class EngineReport:
    """What happened to the TensorRT step: built and checked, or skipped with a reason."""

    built: bool
    reason: str = ""
    engine: str = ""
    build_s: float = 0.0
    max_abs_err_vs_ort: float | None = None
    checked: bool = False

    def describe(self) -> str:
        if not self.built:
            return f"TensorRT skipped: {self.reason}"
        check = (
            f", max |engine - onnxruntime| = {self.max_abs_err_vs_ort:.2e}"
            if self.checked
            else f" (not run: {self.reason})"
            if self.reason
            else ""
        )
        return f"TensorRT fp16 engine {self.engine} built in {self.build_s:.1f} s{check}"


def _gpu_count() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except Exception:
        pass
    try:
        cudart = _cudart()
        err, count = cudart.cudaGetDeviceCount()
        return int(count) if int(err) == 0 else 0
    except Exception:
        return 0


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def unavailable_reason() -> str | None:
    """Why TensorRT cannot be used here (None when it can)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        gpus = _gpu_count()
        if gpus == 0:
            return "no GPU in this session (no CUDA device; tensorrt package not installed)"
        return "the tensorrt Python package is not installed (pip install tensorrt)"
    if _gpu_count() == 0:
        return "no GPU in this session (tensorrt is installed but no CUDA device is visible)"
    return None


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = True,
    max_batch: int = 16,
    workspace_mb: int = 1024,
) -> EngineReport:
    """Build a serialized engine from ``onnx_path`` (dynamic batch 1..max_batch)."""
    reason = unavailable_reason()
    if reason:
        return EngineReport(built=False, reason=reason)
    import tensorrt as trt

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        return EngineReport(built=False, reason=f"TensorRT cannot parse the ONNX: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        width = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *width), (1, *width), (max_batch, *width))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return EngineReport(built=False, reason="TensorRT failed to build the engine (see log)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    return EngineReport(built=True, engine=str(engine_path), build_s=time.perf_counter() - t0)


class EngineRunner:
    """Runs a serialized engine on float32 numpy inputs (GPU memory via torch or cuda-python)."""

    def __init__(self, engine_path: str | Path) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        import tensorrt as trt

        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot deserialize the TensorRT engine {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("running engines needs PyTorch with CUDA in this implementation")
        self._torch = torch
        self._stream = torch.cuda.Stream()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep: list[Any] = []
        for name in self.inputs:
            arr = torch.from_numpy(np.ascontiguousarray(feeds[name], np.float32)).cuda()
            keep.append(arr)
            self.context.set_input_shape(name, tuple(arr.shape))
            self.context.set_tensor_address(name, arr.data_ptr())
        outs: dict[str, Any] = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        self.context.execute_async_v3(self._stream.cuda_stream)
        self._stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}


def check_engine(
    report: EngineReport, feeds: Mapping[str, np.ndarray], reference: np.ndarray, output: str
) -> EngineReport:
    """Run the engine on ``feeds`` and record its max abs difference to ``reference``."""
    if not report.built:
        return report
    try:
        got = EngineRunner(report.engine).run(feeds)[output]
    except Exception as exc:  # a built engine we cannot run here: say so, keep the engine
        report.reason = f"engine built but not run: {exc}"
        return report
    report.max_abs_err_vs_ort = float(np.max(np.abs(got - reference)))
    report.checked = True
    return report
