"""Run any ONNX policy that meets the model contract (:mod:`vlarl.contract`) with ONNX Runtime.

:meth:`OnnxPolicy.load` refuses a file that is missing, unreadable, not ONNX, or breaks the
contract (metadata, input/output names, ranks, dims, element types), and finally runs a probe
inference on zeros whose output must have the contract's shape and be finite. Every refusal is a
:class:`~vlarl.contract.ContractError` whose message names the problem, so a node can answer a
parameter change with it and keep the policy it has.

The batch-1 hot path (:meth:`OnnxPolicy.predict`) binds preallocated input/output buffers to
the session once (ONNX Runtime I/O binding) and only copies the observation in and the chunk
out per call. ``predict`` is not re-entrant: call it from one thread at a time.
"""

from __future__ import annotations

import hashlib
import math
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from vlarl.contract import (
    INPUT_INSTRUCTION,
    INPUT_OBS,
    OUTPUT_ACTION_CHUNK,
    ContractError,
    ModelMetadata,
)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Preference order for providers="auto".
AUTO_ORDER: tuple[str, ...] = (TENSORRT, CUDA, CPU)
# Explicit provider requests -> the provider chain handed to ONNX Runtime (CPU as fallback for
# operators the accelerator does not implement).
PROVIDER_CHOICES: dict[str, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": (CUDA, CPU),
    "tensorrt": (TENSORRT, CUDA, CPU),
}
PROVIDER_REQUESTS: tuple[str, ...] = ("auto", *PROVIDER_CHOICES)


class ProviderError(ContractError):
    """The requested execution provider is not available on this machine."""


class PolicyOutputError(RuntimeError):
    """The model produced non-finite actions for this input; the caller should hold."""


def choose_providers(request: str, available: Sequence[str]) -> list[str]:
    """Provider chain for ``request`` ("auto", "cpu", "cuda", "tensorrt") given ``available``.

    "auto" keeps TensorRT > CUDA > CPU among those available. An explicit accelerator that is
    not available raises :class:`ProviderError`.
    """
    request = request.strip().lower()
    if request == "auto":
        chain = [p for p in AUTO_ORDER if p in available]
        return chain or [CPU]
    if request not in PROVIDER_CHOICES:
        raise ProviderError(
            f"unknown providers {request!r}: expected one of {', '.join(PROVIDER_REQUESTS)}"
        )
    wanted = PROVIDER_CHOICES[request]
    if wanted[0] not in available:
        raise ProviderError(
            f"providers={request!r} asks for {wanted[0]}, which this onnxruntime build does "
            f"not offer (available: {', '.join(available) or 'none'})"
        )
    return [p for p in wanted if p in available] or [CPU]


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """Declared dims of a graph input/output: ints, or names/'?' for symbolic dims."""
    shape = value_info.type.tensor_type.shape
    out: list[int | str] = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or "?")
    return out


def _check_io(model: onnx.ModelProto, meta: ModelMetadata) -> int | None:
    """Check graph inputs/outputs against the contract; return a fixed batch size or None."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {v.name: v for v in graph.input if v.name not in initializers}
    outputs = {v.name: v for v in graph.output}
    expected_inputs = [INPUT_OBS] + ([INPUT_INSTRUCTION] if meta.instr_dim > 0 else [])
    for name in expected_inputs:
        if name not in inputs:
            raise ContractError(
                f"model has no input {name!r} (inputs: {', '.join(inputs) or 'none'})"
            )
    extra = [n for n in inputs if n not in expected_inputs]
    if extra:
        why = (
            " (vlarl.instr_dim is 0, so the model must not take an instruction)"
            if INPUT_INSTRUCTION in extra
            else ""
        )
        raise ContractError(f"model has unexpected inputs: {', '.join(extra)}{why}")
    if OUTPUT_ACTION_CHUNK not in outputs:
        raise ContractError(
            f"model has no output {OUTPUT_ACTION_CHUNK!r} (outputs: {', '.join(outputs)})"
        )

    batch: int | None = None
    checks: list[tuple[str, onnx.ValueInfoProto, list[tuple[str, int]]]] = [
        (INPUT_OBS, inputs[INPUT_OBS], [("obs_dim", meta.obs_dim)]),
        (
            OUTPUT_ACTION_CHUNK,
            outputs[OUTPUT_ACTION_CHUNK],
            [("chunk_length", meta.chunk_length), ("action_dim", meta.action_dim)],
        ),
    ]
    if meta.instr_dim > 0:
        checks.append(
            (INPUT_INSTRUCTION, inputs[INPUT_INSTRUCTION], [("instr_dim", meta.instr_dim)])
        )
    for name, info, wanted in checks:
        ttype = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            raise ContractError(f"{name!r} must be a tensor")
        if ttype.elem_type != onnx.TensorProto.FLOAT:
            got = onnx.TensorProto.DataType.Name(ttype.elem_type).lower()
            raise ContractError(f"{name!r} must be float32, got {got}")
        if not ttype.HasField("shape"):
            continue  # no declared shape: the probe inference checks it
        dims = _dims(info)
        if len(dims) != 1 + len(wanted):
            raise ContractError(
                f"{name!r} must have rank {1 + len(wanted)} "
                f"[batch, {', '.join(k for k, _ in wanted)}], got rank {len(dims)} {dims}"
            )
        if isinstance(dims[0], int):
            if dims[0] != 1 and name == INPUT_OBS:
                raise ContractError(
                    f"{name!r} has a fixed batch dimension of {dims[0]}; it must be dynamic or 1"
                )
            batch = dims[0] if name == INPUT_OBS else batch
        for (key, value), dim in zip(wanted, dims[1:], strict=True):
            if isinstance(dim, int) and dim != value:
                raise ContractError(
                    f"{name!r} has {dim} for {key}, but the metadata says vlarl.{key}={value}"
                )
    return batch


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class OnnxPolicy:
    """A loaded, validated policy model. Create with :meth:`load`."""

    def __init__(
        self,
        *,
        path: Path,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        sha256: str,
        fixed_batch: int | None,
    ) -> None:
        self.path = path
        self.metadata = metadata
        self.sha256 = sha256
        self._session = session
        self._fixed_batch = fixed_batch
        self.providers: list[str] = list(session.get_providers())
        m = metadata
        # Preallocated batch-1 buffers, bound to the session once.
        self._obs = np.zeros((1, m.obs_dim), dtype=np.float32)
        self._instr = np.zeros((1, max(m.instr_dim, 1)), dtype=np.float32)
        self._out = np.zeros((1, m.chunk_length, m.action_dim), dtype=np.float32)
        self._binding = session.io_binding()
        self._binding.bind_ortvalue_input(INPUT_OBS, ort.OrtValue.ortvalue_from_numpy(self._obs))
        if m.instr_dim > 0:
            self._binding.bind_ortvalue_input(
                INPUT_INSTRUCTION, ort.OrtValue.ortvalue_from_numpy(self._instr)
            )
        self._binding.bind_ortvalue_output(
            OUTPUT_ACTION_CHUNK, ort.OrtValue.ortvalue_from_numpy(self._out)
        )
        self._embeddings = {
            t: np.asarray(v, dtype=np.float32).reshape(1, -1) for t, v in m.instructions.items()
        }
        self._tasks = frozenset(m.tasks)
        self._task: str | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        providers: str = "auto",
        intra_op_threads: int = 1,
        max_bytes: int | None = None,
    ) -> OnnxPolicy:
        """Load and validate ``path``; raise :class:`ContractError` saying why it is refused.

        The file is stat-ed before it is read: not a regular file, or larger than ``max_bytes``
        (None: no cap), is refused without reading it, and it is never read past the cap.
        """
        path = Path(path)
        if intra_op_threads < 1:
            raise ValueError("intra_op_threads must be >= 1")
        chain = choose_providers(providers, ort.get_available_providers())
        data = _read_model_file(path, max_bytes)
        if not data:
            raise ContractError(f"model file is empty: {path}")
        try:
            model = onnx.load_model_from_string(data)
        except Exception as exc:
            raise ContractError(
                f"{path.name} is not a readable ONNX model (corrupt or truncated?): {exc}"
            ) from None
        if not model.HasField("graph") or not model.graph.output:
            raise ContractError(f"{path.name} is not a complete ONNX model (corrupt or truncated?)")
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise ContractError(f"{path.name} fails the ONNX checker: {_first_line(exc)}") from None
        meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
        fixed_batch = _check_io(model, meta)
        del model
        try:
            session = ort.InferenceSession(
                data, sess_options=_session_options(intra_op_threads), providers=chain
            )
        except Exception as exc:
            raise ContractError(
                f"onnxruntime cannot load {path.name}: {_first_line(exc)}"
            ) from None
        if chain[0] != CPU and providers.strip().lower() != "auto":
            active = session.get_providers()
            if chain[0] not in active:
                raise ProviderError(
                    f"{chain[0]} could not be initialised for {path.name} "
                    f"(active: {', '.join(active)}); missing CUDA/TensorRT libraries?"
                )
        policy = cls(
            path=path,
            session=session,
            metadata=meta,
            sha256=hashlib.sha256(data).hexdigest(),
            fixed_batch=fixed_batch,
        )
        policy._probe()
        return policy

    def _probe(self) -> None:
        """Run zeros (and the first task's instruction) through the model; check the output."""
        m = self.metadata
        task = m.tasks[0]
        try:
            self._select_task(task)
            self._obs.fill(0.0)
            feeds = {INPUT_OBS: self._obs}
            if m.instr_dim > 0:
                feeds[INPUT_INSTRUCTION] = self._instr
            (out,) = self._session.run([OUTPUT_ACTION_CHUNK], feeds)
        except Exception as exc:
            raise ContractError(
                f"probe inference failed for {self.path.name}: {_first_line(exc)}"
            ) from None
        expected = (1, m.chunk_length, m.action_dim)
        if out.shape != expected:
            raise ContractError(
                f"probe inference returned shape {tuple(out.shape)}, expected {expected} "
                "[batch, chunk_length, action_dim]"
            )
        if out.dtype != np.float32:
            raise ContractError(f"probe inference returned {out.dtype}, expected float32")
        if not np.all(np.isfinite(out)):
            raise ContractError("probe inference on zeros returned non-finite actions")
        # The bound fast path must give the same numbers as the generic one.
        try:
            self._session.run_with_iobinding(self._binding)
        except Exception as exc:
            raise ContractError(
                f"probe inference (bound buffers) failed for {self.path.name}: {_first_line(exc)}"
            ) from None
        if not np.all(np.isfinite(self._out)):
            raise ContractError("probe inference (bound buffers) returned non-finite actions")
        # A sampling policy draws a new start per call; a deterministic one must agree.
        if m.start_noise == 0 and not np.allclose(self._out, out, rtol=1e-4, atol=1e-6):
            raise ContractError("probe inference differs between bound and generic runs")

    # ------------------------------------------------------------------ inference
    @property
    def tag(self) -> str:
        """``model_id@version``."""
        return self.metadata.tag

    def instruction(self, task: str) -> np.ndarray:
        """The instruction embedding [instr_dim] of ``task`` (empty for single-task models)."""
        self._check_task(task)
        if self.metadata.instr_dim == 0:
            return np.zeros(0, dtype=np.float32)
        return self._embeddings[task][0].copy()

    def _check_task(self, task: str) -> None:
        if task not in self._tasks:
            raise ContractError(
                f"task {task!r} is not one of {self.tag}'s tasks: {', '.join(self.metadata.tasks)}"
            )

    def _select_task(self, task: str) -> None:
        self._check_task(task)
        if self.metadata.instr_dim > 0:
            self._instr[...] = self._embeddings[task]
        self._task = task

    def predict(self, obs: np.ndarray, *, task: str, out: np.ndarray | None = None) -> np.ndarray:
        """One observation [obs_dim] -> action chunk [chunk_length, action_dim] (float32).

        Writes into ``out`` when given (shape [chunk_length, action_dim], float32), else returns
        a new array. Raises ``ValueError`` for a wrong observation shape,
        :class:`ContractError` for a task the model does not know and
        :class:`PolicyOutputError` when the model's output is not finite.
        """
        if task is not self._task and task != self._task:
            self._select_task(task)
        obs_buf = self._obs
        if obs.shape != obs_buf.shape[1:]:
            raise ValueError(
                f"expected an observation of shape {obs_buf.shape[1:]}, got {obs.shape}"
            )
        np.copyto(obs_buf[0], obs, casting="same_kind")
        self._session.run_with_iobinding(self._binding)
        chunk = self._out[0]
        # One reduction checks finiteness; an overflowing sum of finite values re-checks.
        if not math.isfinite(chunk.sum()) and not np.isfinite(chunk).all():
            raise PolicyOutputError(f"{self.tag} produced non-finite actions")
        if out is None:
            return chunk.copy()
        np.copyto(out, chunk)
        return out

    def predict_batch(self, obs: np.ndarray, instruction: np.ndarray | None = None) -> np.ndarray:
        """Observations [B, obs_dim] (+ instructions [B, instr_dim]) -> chunks [B, H, A]."""
        m = self.metadata
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != m.obs_dim:
            raise ValueError(f"expected observations [B, {m.obs_dim}], got {obs.shape}")
        if self._fixed_batch is not None and obs.shape[0] != self._fixed_batch:
            raise ValueError(f"{self.tag} takes a fixed batch of {self._fixed_batch}")
        feeds = {INPUT_OBS: obs}
        if m.instr_dim > 0:
            if instruction is None:
                raise ValueError(f"{self.tag} is multi-task: pass instruction [B, {m.instr_dim}]")
            instruction = np.ascontiguousarray(instruction, dtype=np.float32)
            if instruction.shape != (obs.shape[0], m.instr_dim):
                raise ValueError(
                    f"expected instructions [{obs.shape[0]}, {m.instr_dim}], "
                    f"got {instruction.shape}"
                )
            feeds[INPUT_INSTRUCTION] = instruction
        elif instruction is not None and instruction.size:
            raise ValueError(f"{self.tag} takes no instruction (vlarl.instr_dim is 0)")
        (chunks,) = self._session.run([OUTPUT_ACTION_CHUNK], feeds)
        if not np.all(np.isfinite(chunks)):
            raise PolicyOutputError(f"{self.tag} produced non-finite actions")
        return np.asarray(chunks)

    def __repr__(self) -> str:
        return f"OnnxPolicy({self.tag}, {self.path}, providers={self.providers})"


def _read_model_file(path: Path, max_bytes: int | None) -> bytes:
    """The file's bytes: stat first (regular file, size within ``max_bytes``), then a read that
    stops one byte past the cap (a file that grew meanwhile is refused, not read whole)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ContractError(f"model file not found: {path}") from None
    except OSError as exc:
        raise ContractError(f"cannot stat model file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ContractError(f"model path is not a file: {path}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ContractError(
            f"model file {path.name} is {info.st_size} bytes, over the cap of {max_bytes} bytes"
        )
    limit = info.st_size if max_bytes is None else max_bytes
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except MemoryError:
        raise ContractError(
            f"model file {path.name} ({info.st_size} bytes) does not fit in memory"
        ) from None
    except OSError as exc:
        raise ContractError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ContractError(f"model file {path.name} grew past {limit} bytes while being read")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
