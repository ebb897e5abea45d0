"""Tiny ONNX policy models for tests, built with ``onnx.helper`` (no torch).

:func:`make_policy` builds a contract-valid MLP policy and returns it together with a numpy
reference of the same network, so tests can check what ONNX Runtime computes.
:func:`make_broken` builds models that break the contract in one named way each
(:data:`BROKEN` maps each kind to a fragment the refusal reason must contain).
:func:`write_truncated`, :func:`write_garbage` write damaged files.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vlarl.contract import INPUT_INSTRUCTION, INPUT_OBS, OUTPUT_ACTION_CHUNK, ModelMetadata

OPSET = 17
IR_VERSION = 9


@dataclass(frozen=True)
class Spec:
    """What to build: dimensions, metadata and the network's hidden layer sizes."""

    obs_dim: int = 39
    action_dim: int = 4
    chunk_length: int = 8
    instr_dim: int = 0
    tasks: tuple[str, ...] = ("pick-place-v3",)
    model_id: str = "test-policy"
    version: int = 1
    hidden: tuple[int, ...] = (32,)
    seed: int = 0
    weight_scale: float = 0.3
    obs_kind: str = "state"
    control_dt: float = 0.0125

    def metadata(self) -> ModelMetadata:
        rng = np.random.default_rng(self.seed + 1000)
        instructions = (
            {
                t: tuple(float(x) for x in rng.normal(size=self.instr_dim).round(4))
                for t in self.tasks
            }
            if self.instr_dim > 0
            else {}
        )
        return ModelMetadata(
            model_id=self.model_id,
            version=self.version,
            obs_kind=self.obs_kind,
            obs_dim=self.obs_dim,
            action_dim=self.action_dim,
            chunk_length=self.chunk_length,
            instr_dim=self.instr_dim,
            tasks=self.tasks,
            kind="student",
            instructions=instructions,
            normalization={},
            control_dt=self.control_dt,
            created="2026-01-01T00:00:00Z",
        )


@dataclass
class Built:
    """A built model, its metadata and a numpy reference ``reference(obs[B,D], instr|None)``."""

    model: onnx.ModelProto
    metadata: ModelMetadata
    reference: Callable[[np.ndarray, np.ndarray | None], np.ndarray]

    def save(self, path: Path) -> Path:
        return save(self.model, path)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _weights(spec: Spec) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(spec.seed)
    sizes = [spec.obs_dim + spec.instr_dim, *spec.hidden, spec.chunk_length * spec.action_dim]
    layers = []
    for n_in, n_out in itertools.pairwise(sizes):
        w = (rng.normal(size=(n_in, n_out)) * spec.weight_scale / np.sqrt(n_in)).astype(np.float32)
        b = (rng.normal(size=n_out) * 0.1).astype(np.float32)
        layers.append((w, b))
    return layers


def _tensor(name: str, elem: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def make_policy(
    spec: Spec | None = None,
    *,
    obs_name: str = INPUT_OBS,
    instr_name: str = INPUT_INSTRUCTION,
    out_name: str = OUTPUT_ACTION_CHUNK,
    declared_obs_shape: Sequence[int | str | None] | None = None,
    declared_out_shape: Sequence[int | str | None] | None = None,
    runtime_out_shape: Sequence[int] | None = None,
    elem_type: int = TensorProto.FLOAT,
    metadata_props: dict[str, str] | None = None,
    with_instruction_input: bool | None = None,
    post: str | None = None,
    **spec_fields: object,
) -> Built:
    """A tanh-MLP policy: ``tanh(MLP([obs, instruction])).reshape(B, H, A)``.

    Keyword arguments beyond the explicit ones update :class:`Spec`. The explicit ones exist
    to break the contract on purpose: other names, declared shapes, element type, metadata
    (``metadata_props`` replaces the generated props), a missing/extra instruction input,
    ``runtime_out_shape`` (Reshape target), and ``post``: ``"nan"`` (all outputs NaN),
    ``"sqrt_obs0"`` (NaN when obs[0] < 0, finite otherwise).
    """
    spec = replace(spec or Spec(), **spec_fields)  # type: ignore[arg-type]
    meta = spec.metadata()
    layers = _weights(spec)
    H, A = spec.chunk_length, spec.action_dim
    use_instr = spec.instr_dim > 0 if with_instruction_input is None else with_instruction_input
    float_np = np.float64 if elem_type == TensorProto.DOUBLE else np.float32

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = obs_name
    if use_instr:
        nodes.append(helper.make_node("Concat", [obs_name, instr_name], ["x_in"], axis=1))
        x = "x_in"
    for i, (w, b) in enumerate(layers):
        inits += [
            numpy_helper.from_array(w.astype(float_np), f"w{i}"),
            numpy_helper.from_array(b.astype(float_np), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"z{i}"]))
        x = f"z{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    nodes.append(helper.make_node("Tanh", [x], ["t"]))
    x = "t"
    if post == "nan":
        inits.append(numpy_helper.from_array(np.array(0.0, dtype=float_np), "zero"))
        nodes.append(helper.make_node("Div", ["zero", "zero"], ["nan"]))
        nodes.append(helper.make_node("Add", [x, "nan"], ["t_nan"]))
        x = "t_nan"
    elif post == "sqrt_obs0":
        inits += [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "s0"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "s1"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "ax1"),
        ]
        nodes.append(helper.make_node("Slice", [obs_name, "s0", "s1", "ax1"], ["obs0"]))
        nodes.append(helper.make_node("Sqrt", ["obs0"], ["sq"]))
        nodes.append(helper.make_node("Add", [x, "sq"], ["t_sq"]))
        x = "t_sq"
    target = list(runtime_out_shape) if runtime_out_shape is not None else [-1, H, A]
    inits.append(numpy_helper.from_array(np.array(target, dtype=np.int64), "shape"))
    nodes.append(helper.make_node("Reshape", [x, "shape"], [out_name]))

    default_obs: list[int | str | None] = ["batch", spec.obs_dim]
    default_out: list[int | str | None] = ["batch", H, A]
    obs_shape = declared_obs_shape if declared_obs_shape is not None else default_obs
    out_shape = declared_out_shape if declared_out_shape is not None else default_out
    inputs = [_tensor(obs_name, elem_type, obs_shape)]
    if use_instr:
        inputs.append(_tensor(instr_name, elem_type, ["batch", spec.instr_dim]))
    outputs = [_tensor(out_name, elem_type, out_shape)]
    graph = helper.make_graph(nodes, "vlarl_test_policy", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="vlarl-tests",
    )
    model.ir_version = IR_VERSION
    props = meta.to_props() if metadata_props is None else metadata_props
    helper.set_model_props(model, props)

    def reference(obs: np.ndarray, instruction: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float64)
        if use_instr:
            assert instruction is not None
            x = np.concatenate([x, np.asarray(instruction, dtype=np.float64)], axis=1)
        for i, (w, b) in enumerate(layers):
            x = x @ w.astype(np.float64) + b.astype(np.float64)
            if i < len(layers) - 1:
                x = np.maximum(x, 0.0)
        x = np.tanh(x)
        if post == "sqrt_obs0":
            with np.errstate(invalid="ignore"):
                x = x + np.sqrt(np.asarray(obs, dtype=np.float64)[:, :1])
        return x.reshape(-1, H, A)

    return Built(model=model, metadata=meta, reference=reference)


def _props_without(key: str) -> dict[str, str]:
    props = Spec().metadata().to_props()
    del props["vlarl." + key]
    return props


def _props_with(**changes: str) -> dict[str, str]:
    props = Spec().metadata().to_props()
    props.update({"vlarl." + k: v for k, v in changes.items()})
    return props


# kind -> (builder, fragment the refusal reason must contain)
BROKEN: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "no_metadata": (lambda: make_policy(metadata_props={}).model, "missing metadata"),
    "missing_obs_dim_key": (
        lambda: make_policy(metadata_props=_props_without("obs_dim")).model,
        "vlarl.obs_dim",
    ),
    "contract_version": (
        lambda: make_policy(metadata_props=_props_with(contract="99")).model,
        "contract version",
    ),
    "tasks_not_json": (
        lambda: make_policy(metadata_props=_props_with(tasks="[pick")).model,
        "vlarl.tasks",
    ),
    "version_not_int": (
        lambda: make_policy(metadata_props=_props_with(version="v2")).model,
        "vlarl.version",
    ),
    "wrong_input_name": (lambda: make_policy(obs_name="observation").model, "'obs'"),
    "wrong_output_name": (lambda: make_policy(out_name="actions").model, "'action_chunk'"),
    "obs_rank": (
        lambda: make_policy(declared_obs_shape=["batch", 39, 1]).model,
        "rank",
    ),
    "obs_dim_mismatch": (
        lambda: make_policy(metadata_props=_props_with(obs_dim="40")).model,
        "obs_dim",
    ),
    "chunk_length_mismatch": (
        lambda: make_policy(metadata_props=_props_with(chunk_length="10")).model,
        "chunk_length",
    ),
    "action_dim_mismatch": (
        lambda: make_policy(metadata_props=_props_with(action_dim="7")).model,
        "action_dim",
    ),
    "float64": (lambda: make_policy(elem_type=TensorProto.DOUBLE).model, "float32"),
    "missing_instruction_input": (
        lambda: make_policy(instr_dim=3, tasks=("a", "b"), with_instruction_input=False).model,
        "'instruction'",
    ),
    "unexpected_instruction_input": (
        lambda: make_policy(with_instruction_input=True).model,
        "instruction",
    ),
    "fixed_batch_2": (
        lambda: make_policy(declared_obs_shape=[2, 39]).model,
        "batch",
    ),
    "probe_nan": (lambda: make_policy(post="nan").model, "non-finite"),
    "probe_wrong_shape": (
        # declared symbolic, but at run time the graph yields [1, 4, 8] instead of [1, 8, 4]
        lambda: (
            make_policy(declared_out_shape=["batch", "h", "a"], runtime_out_shape=[-1, 4, 8]).model
        ),
        "shape",
    ),
    "probe_runtime_error": (
        # Reshape to a size that cannot hold 32 numbers: the probe inference itself fails
        lambda: (
            make_policy(declared_out_shape=["batch", "h", "a"], runtime_out_shape=[-1, 5, 5]).model
        ),
        "probe inference failed",
    ),
}


def make_broken(kind: str) -> onnx.ModelProto:
    return BROKEN[kind][0]()


def write_truncated(valid: Path, out: Path, *, fraction: float) -> Path:
    """The first ``fraction`` of a valid model's bytes."""
    data = Path(valid).read_bytes()
    out.write_bytes(data[: max(1, int(len(data) * fraction))])
    return out


def write_garbage(out: Path, *, size: int = 4096, seed: int = 0) -> Path:
    out.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return out


# ---------------------------------------------------------------------------- residual blobs
def residual_layers(
    widths: Sequence[int], *, seed: int = 0, scale: float = 0.4
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random (weight [in, out], bias [out]) pairs along ``widths`` (input width first)."""
    rng = np.random.default_rng(seed)
    return [
        (
            (rng.normal(size=(a, b)) * scale / np.sqrt(a)).astype(np.float32),
            (rng.normal(size=b) * 0.1).astype(np.float32),
        )
        for a, b in itertools.pairwise(widths)
    ]


def nan_on_real_obs_layers(in_dim: int, action_dim: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Finite weights whose output is NaN for any input that is not (nearly) zero, and finite
    (zero) on the all-zeros probe: two ReLU units overflow to +inf (one for x.w > 0, one for
    x.w < 0), the next layer subtracts inf from inf."""
    big = np.float32(3e38)
    w0 = np.zeros((in_dim, 4), dtype=np.float32)
    w0[:, 0] = w0[:, 2] = big
    w0[:, 1] = w0[:, 3] = -big
    w1 = np.zeros((4, action_dim), dtype=np.float32)
    w1[0], w1[2], w1[1], w1[3] = 1.0, -1.0, 1.0, -1.0
    return [(w0, np.zeros(4, np.float32)), (w1, np.zeros(action_dim, np.float32))]


def residual_blob(
    version: int,
    *,
    base: str,
    obs_dim: int = 39,
    action_dim: int = 4,
    layers: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    hidden: Sequence[int] = (32,),
    parent: int | None = None,
    model_id: str = "residual",
    scale: float = 0.3,
    seed: int | None = None,
) -> bytes:
    """A residual actor blob (vlarl.core.weights), as the learner publishes one."""
    from vlarl.core.weights import encode_residual

    n_in = obs_dim + action_dim
    if layers is None:
        layers = residual_layers(
            [n_in, *hidden, action_dim], seed=version if seed is None else seed
        )
    return encode_residual(
        layers=layers,
        model_id=model_id,
        version=version,
        parent=version - 1 if parent is None else parent,
        base=base,
        obs_dim=obs_dim,
        action_dim=action_dim,
        scale=scale,
    )


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk space (all holes)."""
    with Path(path).open("wb") as f:
        f.truncate(size)
    return Path(path)
