"""The reward-model file: an ONNX graph plus ``vlarl.*`` metadata, checked before it is used.

Both reward models take a window of observations and give one number per window:

=================  ===================================  =========================================
name               shape / dtype                        meaning
=================  ===================================  =========================================
``window``         [batch, window, obs_dim] float32     the last ``window`` observations, oldest
                                                        first (raw units; normalization inside)
``instruction``    [batch, instr_dim] float32           task embedding; only when instr_dim > 0
``success_prob``   [batch] float32                      detector: P(the task is done), in [0, 1]
``steps_to_go``    [batch] float32                      progress: predicted steps to success, >= 0
=================  ===================================  =========================================

Metadata (ONNX ``metadata_props``, strings, keys prefixed ``vlarl.``): ``reward_contract`` ("1"),
``kind`` ("success-detector" | "progress"), ``model_id``, ``version``, ``obs_kind``, ``obs_dim``,
``window``, ``instr_dim``, ``tasks`` (JSON list), ``instructions`` (JSON task -> embedding),
``params`` (JSON: kind-specific settings such as ``threshold``/``debounce``/``pre_steps`` or
``max_steps``), ``training`` (JSON summary), ``normalization`` (JSON, informational),
``control_dt``, ``created`` and ``graph_sha256`` (sha256 of the serialized graph: weights and
operators). :func:`load_model_file` refuses, with a :class:`RewardModelError` that says why, a file
that is missing, empty, not ONNX, truncated, fails the ONNX checker, lacks or breaks the metadata,
whose graph does not match its digest (tampered or corrupted), has the wrong inputs/outputs, or
gives non-finite / out-of-range numbers on a probe.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.rewardmodels.errors import RewardModelError

REWARD_CONTRACT = "1"
PREFIX = "vlarl."
KIND_DETECTOR = "success-detector"
KIND_PROGRESS = "progress"
KINDS = (KIND_DETECTOR, KIND_PROGRESS)
INPUT_WINDOW = "window"
INPUT_INSTRUCTION = "instruction"
OUTPUTS = {KIND_DETECTOR: "success_prob", KIND_PROGRESS: "steps_to_go"}
OPSET = 17
_REQUIRED = ("reward_contract", "kind", "model_id", "version", "obs_kind", "obs_dim", "window",
             "instr_dim", "tasks", "graph_sha256")  # fmt: skip


@dataclass(frozen=True)
class RewardModelMetadata:
    """Parsed and validated metadata of a reward model."""

    kind: str
    model_id: str
    version: int
    obs_kind: str
    obs_dim: int
    window: int
    instr_dim: int
    tasks: tuple[str, ...]
    instructions: dict[str, tuple[float, ...]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    control_dt: float = 0.0125
    created: str = ""
    graph_sha256: str = ""

    @property
    def tag(self) -> str:
        return f"{self.model_id}@{self.version}"

    @property
    def output(self) -> str:
        return OUTPUTS[self.kind]

    def to_props(self) -> dict[str, str]:
        props = {
            "reward_contract": REWARD_CONTRACT,
            "kind": self.kind,
            "model_id": self.model_id,
            "version": str(self.version),
            "obs_kind": self.obs_kind,
            "obs_dim": str(self.obs_dim),
            "window": str(self.window),
            "instr_dim": str(self.instr_dim),
            "tasks": json.dumps(list(self.tasks)),
            "instructions": json.dumps({k: list(v) for k, v in self.instructions.items()}),
            "params": json.dumps(self.params),
            "training": json.dumps(self.training),
            "normalization": json.dumps(self.normalization),
            "control_dt": repr(float(self.control_dt)),
            "created": self.created,
            "graph_sha256": self.graph_sha256,
        }
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> RewardModelMetadata:
        raw = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise RewardModelError(
                "not a vlarl reward model: metadata lacks " + ", ".join(PREFIX + k for k in missing)
            )
        if raw["reward_contract"] != REWARD_CONTRACT:
            raise RewardModelError(
                f"reward-model contract {raw['reward_contract']!r} is not supported "
                f"(expected {REWARD_CONTRACT!r})"
            )
        if raw["kind"] not in KINDS:
            raise RewardModelError(f"{PREFIX}kind must be one of {KINDS}, got {raw['kind']!r}")

        def as_int(key: str, minimum: int) -> int:
            try:
                value = int(raw[key])
            except ValueError:
                raise RewardModelError(f"{PREFIX}{key} is not an integer: {raw[key]!r}") from None
            if value < minimum:
                raise RewardModelError(f"{PREFIX}{key} must be >= {minimum}, got {value}")
            return value

        def as_json(key: str, default: Any, typ: type) -> Any:
            text = raw.get(key, "")
            if text == "":
                return default
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RewardModelError(f"{PREFIX}{key} is not valid JSON: {exc}") from None
            if not isinstance(value, typ):
                raise RewardModelError(f"{PREFIX}{key} must be a JSON {typ.__name__}")
            return value

        model_id = raw["model_id"].strip()
        if not model_id or any(c in model_id for c in "@+| \t\n"):
            raise RewardModelError(f"{PREFIX}model_id must be a non-empty word, got {model_id!r}")
        if raw["obs_kind"] not in ("state", "image"):
            raise RewardModelError(f"{PREFIX}obs_kind must be 'state' or 'image'")
        tasks = as_json("tasks", [], list)
        if not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise RewardModelError(f"{PREFIX}tasks must be a non-empty JSON list of task names")
        instr_dim = as_int("instr_dim", 0)
        instructions: dict[str, tuple[float, ...]] = {}
        for task, vec in as_json("instructions", {}, dict).items():
            if not isinstance(vec, list) or len(vec) != instr_dim:
                raise RewardModelError(
                    f"{PREFIX}instructions[{task!r}] must hold {instr_dim} numbers"
                )
            values = tuple(float(x) for x in vec)
            if not all(math.isfinite(x) for x in values):
                raise RewardModelError(f"{PREFIX}instructions[{task!r}] has non-finite values")
            instructions[str(task)] = values
        if instr_dim > 0 and any(t not in instructions for t in tasks):
            lacking = [t for t in tasks if t not in instructions]
            raise RewardModelError(f"no instruction embedding for tasks: {', '.join(lacking)}")
        digest = raw["graph_sha256"].strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise RewardModelError(f"{PREFIX}graph_sha256 is not a sha256 hex digest")
        try:
            control_dt = float(raw.get("control_dt", "0.0125"))
        except ValueError:
            raise RewardModelError(f"{PREFIX}control_dt is not a number") from None
        return cls(
            kind=raw["kind"],
            model_id=model_id,
            version=as_int("version", 0),
            obs_kind=raw["obs_kind"],
            obs_dim=as_int("obs_dim", 1),
            window=as_int("window", 1),
            instr_dim=instr_dim,
            tasks=tuple(tasks),
            instructions=instructions,
            params=as_json("params", {}, dict),
            training=as_json("training", {}, dict),
            normalization=as_json("normalization", {}, dict),
            control_dt=control_dt,
            created=raw.get("created", ""),
            graph_sha256=digest,
        )


def graph_digest(model: Any) -> str:
    """sha256 of the serialized graph (operators, weights, inputs/outputs), not the metadata."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def attach_metadata(onnx_bytes: bytes, meta: RewardModelMetadata, *, doc: str) -> bytes:
    """The model with ``meta`` (its ``graph_sha256`` computed here) as metadata_props."""
    import dataclasses

    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    meta = dataclasses.replace(meta, graph_sha256=graph_digest(model))
    del model.metadata_props[:]
    for key, value in meta.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = doc
    model.producer_name = "vlarl"
    model.model_version = meta.version
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


@dataclass
class LoadedModel:
    """A verified reward model: its ONNX Runtime session, metadata and instruction rows."""

    path: Path
    session: Any
    metadata: RewardModelMetadata
    sha256: str
    embeddings: dict[str, np.ndarray]

    def instruction_row(self, task: str) -> np.ndarray:
        """The [1, instr_dim] embedding of ``task``; refuses a task the model does not know."""
        if task not in self.metadata.tasks:
            raise RewardModelError(
                f"{self.metadata.tag} does not know task {task!r} "
                f"(its tasks: {', '.join(self.metadata.tasks)})"
            )
        if self.metadata.instr_dim == 0:
            return np.zeros((1, 0), np.float32)
        return self.embeddings[task]

    def run(self, windows: np.ndarray, instructions: np.ndarray | None) -> np.ndarray:
        """[B, window, obs_dim] (+ [B, instr_dim]) -> [B] float32."""
        feeds = {INPUT_WINDOW: windows}
        if self.metadata.instr_dim > 0:
            if instructions is None:
                raise RewardModelError(f"{self.metadata.tag} is multi-task: needs instructions")
            feeds[INPUT_INSTRUCTION] = instructions
        (out,) = self.session.run([self.metadata.output], feeds)
        return np.asarray(out, dtype=np.float32).reshape(-1)


def _check_io(model: Any, meta: RewardModelMetadata) -> None:
    import onnx

    init = {t.name for t in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in init}
    outputs = {v.name: v for v in model.graph.output}
    wanted = [INPUT_WINDOW] + ([INPUT_INSTRUCTION] if meta.instr_dim > 0 else [])
    if sorted(inputs) != sorted(wanted):
        raise RewardModelError(
            f"inputs must be {wanted} for vlarl.instr_dim={meta.instr_dim}, got {sorted(inputs)}"
        )
    if meta.output not in outputs:
        raise RewardModelError(
            f"a {meta.kind} model must have output {meta.output!r}, got {sorted(outputs)}"
        )
    dims = {
        INPUT_WINDOW: [meta.window, meta.obs_dim],
        INPUT_INSTRUCTION: [meta.instr_dim],
        meta.output: [],
    }
    for name, info in [*inputs.items(), (meta.output, outputs[meta.output])]:
        ttype = info.type.tensor_type
        if ttype.elem_type != onnx.TensorProto.FLOAT:
            raise RewardModelError(f"{name!r} must be float32")
        if not ttype.HasField("shape"):
            continue
        declared = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        if len(declared) != 1 + len(dims[name]):
            raise RewardModelError(f"{name!r} must have rank {1 + len(dims[name])}")
        for got, want in zip(declared[1:], dims[name], strict=True):
            if got is not None and got != want:
                raise RewardModelError(
                    f"{name!r} has shape {declared}, but the metadata says {dims[name]}"
                )


def load_model_file(path: str | Path, *, kind: str, intra_op_threads: int = 1) -> LoadedModel:
    """Load and verify a reward model of ``kind``; raise :class:`RewardModelError` if refused."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.exists():
        raise RewardModelError(f"model file not found: {path}")
    if not path.is_file():
        raise RewardModelError(f"model path is not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RewardModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise RewardModelError(f"model file is empty: {path}")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise RewardModelError(
            f"{path.name} is not a readable ONNX model (corrupt or truncated?): {_first_line(exc)}"
        ) from None
    if not model.HasField("graph") or not model.graph.output:
        raise RewardModelError(f"{path.name} is not a complete ONNX model (corrupt or truncated?)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise RewardModelError(f"{path.name} fails the ONNX checker: {_first_line(exc)}") from None
    meta = RewardModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    if meta.kind != kind:
        raise RewardModelError(f"{path.name} is a {meta.kind} model, not a {kind} model")
    digest = graph_digest(model)
    if digest != meta.graph_sha256:
        raise RewardModelError(
            f"{path.name}: graph digest {digest[:12]}... does not match the metadata's "
            f"{meta.graph_sha256[:12]}...: the weights were modified or corrupted"
        )
    _check_io(model, meta)
    del model
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, intra_op_threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RewardModelError(f"onnxruntime cannot load {path.name}: {_first_line(exc)}") from None
    embeddings = {t: np.asarray(v, np.float32).reshape(1, -1) for t, v in meta.instructions.items()}
    loaded = LoadedModel(path, session, meta, hashlib.sha256(data).hexdigest(), embeddings)
    _probe(loaded)
    return loaded


def _probe(model: LoadedModel) -> None:
    meta = model.metadata
    windows = np.zeros((2, meta.window, meta.obs_dim), np.float32)
    instr = np.repeat(model.instruction_row(meta.tasks[0]), 2, axis=0)
    try:
        out = model.run(windows, instr if meta.instr_dim else None)
    except RewardModelError:
        raise
    except Exception as exc:
        raise RewardModelError(
            f"probe inference failed for {model.path.name}: {_first_line(exc)}"
        ) from None
    if out.shape != (2,):
        raise RewardModelError(f"probe inference returned shape {out.shape}, expected (batch,)")
    if not np.all(np.isfinite(out)):
        raise RewardModelError(f"probe inference of {model.path.name} is not finite")
    if meta.kind == KIND_DETECTOR and (out.min() < 0.0 or out.max() > 1.0):
        raise RewardModelError("a success detector must output probabilities in [0, 1]")
    if meta.kind == KIND_PROGRESS and out.min() < 0.0:
        raise RewardModelError("a progress model must output steps_to_go >= 0")
