"""The model contract: what an ONNX file must be for the policy node to run it.

Inputs (float32):
  ``obs``          [batch, obs_dim]     observation as published on the observation topic
                                        (raw units; normalization is inside the graph).
  ``instruction``  [batch, instr_dim]   task-instruction embedding; present only when
                                        ``instr_dim > 0`` (multi-task models).
Output (float32):
  ``action_chunk`` [batch, chunk_length, action_dim]  actions in robot units, already
                                        de-normalized and inside [-1, 1].

Metadata (ONNX ``metadata_props``, all strings; keys prefixed ``vlarl.``):
  contract        contract version, currently "1"
  model_id        short name, e.g. "pick-place-v3-student"
  version         integer >= 0, increases with every export of the same model_id
  kind            "student" | "teacher" | "bc" | other free text
  obs_kind        "state" | "image"
  obs_dim, action_dim, chunk_length, instr_dim   integers
  tasks           JSON list of task names the model was trained on
  instructions    JSON object task -> embedding list (length instr_dim); empty when instr_dim=0
  normalization   JSON object: obs_mean, obs_std, action_low, action_high (informational: the
                  graph applies them); ``start_noise`` > 0 marks a sampling policy (x_0 drawn
                  inside the graph, so two calls on the same input differ)
  control_dt      seconds per action step the model was trained for
  created         ISO-8601 time of export
  lineage         optional JSON object: where a distilled base version came from (parent base
                  tag, digests of its training data, the residual version that collected the RL
                  data, the gate's verdict); absent for models trained from scratch
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

CONTRACT_VERSION = "1"
PREFIX = "vlarl."
INPUT_OBS = "obs"
INPUT_INSTRUCTION = "instruction"
OUTPUT_ACTION_CHUNK = "action_chunk"

REQUIRED_KEYS = (
    "contract",
    "model_id",
    "version",
    "obs_kind",
    "obs_dim",
    "action_dim",
    "chunk_length",
    "instr_dim",
    "tasks",
)


class ContractError(ValueError):
    """A model file does not meet the model contract; the message says why."""


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """Parsed and validated ``vlarl.*`` metadata of a policy model."""

    model_id: str
    version: int
    obs_kind: str
    obs_dim: int
    action_dim: int
    chunk_length: int
    instr_dim: int
    tasks: tuple[str, ...]
    kind: str = "student"
    instructions: dict[str, tuple[float, ...]] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    control_dt: float = 0.0125
    created: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """Version tag written into every action: ``model_id@version``."""
        return f"{self.model_id}@{self.version}"

    @property
    def start_noise(self) -> float:
        """Std of the start noise the graph draws per call (0: a deterministic policy)."""
        value = self.normalization.get("start_noise", 0.0)
        return float(value) if isinstance(value, int | float) else 0.0

    def to_props(self) -> dict[str, str]:
        """Metadata as ONNX metadata_props (string -> string)."""
        props = {
            "contract": CONTRACT_VERSION,
            "model_id": self.model_id,
            "version": str(self.version),
            "kind": self.kind,
            "obs_kind": self.obs_kind,
            "obs_dim": str(self.obs_dim),
            "action_dim": str(self.action_dim),
            "chunk_length": str(self.chunk_length),
            "instr_dim": str(self.instr_dim),
            "tasks": json.dumps(list(self.tasks)),
            "instructions": json.dumps({k: list(v) for k, v in self.instructions.items()}),
            "normalization": json.dumps(self.normalization),
            "control_dt": repr(float(self.control_dt)),
            "created": self.created,
        }
        if self.lineage:
            props["lineage"] = json.dumps(self.lineage, sort_keys=True)
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Parse ONNX metadata_props; raise :class:`ContractError` with the reason."""
        raw = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise ContractError(f"missing metadata keys: {', '.join(PREFIX + k for k in missing)}")
        if raw["contract"] != CONTRACT_VERSION:
            raise ContractError(
                f"contract version {raw['contract']!r} is not supported (expected "
                f"{CONTRACT_VERSION!r})"
            )

        def as_int(key: str, minimum: int) -> int:
            try:
                value = int(raw[key])
            except ValueError:
                raise ContractError(f"{PREFIX}{key} is not an integer: {raw[key]!r}") from None
            if value < minimum:
                raise ContractError(f"{PREFIX}{key} must be >= {minimum}, got {value}")
            return value

        def as_json(key: str, default: Any) -> Any:
            if key not in raw or raw[key] == "":
                return default
            try:
                return json.loads(raw[key])
            except json.JSONDecodeError as exc:
                raise ContractError(f"{PREFIX}{key} is not valid JSON: {exc}") from None

        model_id = raw["model_id"].strip()
        if not model_id or any(c in model_id for c in "@+| \t\n"):
            raise ContractError(f"{PREFIX}model_id must be a non-empty word, got {model_id!r}")
        obs_kind = raw["obs_kind"]
        if obs_kind not in ("state", "image"):
            raise ContractError(f"{PREFIX}obs_kind must be 'state' or 'image', got {obs_kind!r}")
        tasks = as_json("tasks", [])
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ContractError(f"{PREFIX}tasks must be a non-empty JSON list of task names")
        instr_dim = as_int("instr_dim", 0)
        instructions_raw = as_json("instructions", {})
        if not isinstance(instructions_raw, dict):
            raise ContractError(f"{PREFIX}instructions must be a JSON object")
        instructions: dict[str, tuple[float, ...]] = {}
        for task, vec in instructions_raw.items():
            if not isinstance(vec, list) or len(vec) != instr_dim:
                raise ContractError(
                    f"{PREFIX}instructions[{task!r}] must be a list of {instr_dim} numbers"
                )
            values = tuple(float(x) for x in vec)
            if not all(math.isfinite(x) for x in values):
                raise ContractError(f"{PREFIX}instructions[{task!r}] has non-finite values")
            instructions[str(task)] = values
        if instr_dim > 0:
            lacking = [t for t in tasks if t not in instructions]
            if lacking:
                raise ContractError(f"no instruction embedding for tasks: {', '.join(lacking)}")
        normalization = as_json("normalization", {})
        if not isinstance(normalization, dict):
            raise ContractError(f"{PREFIX}normalization must be a JSON object")
        try:
            control_dt = float(raw.get("control_dt", "0.0125"))
        except ValueError:
            raise ContractError(f"{PREFIX}control_dt is not a number") from None
        lineage = as_json("lineage", {})
        if not isinstance(lineage, dict):
            raise ContractError(f"{PREFIX}lineage must be a JSON object")
        return cls(
            model_id=model_id,
            version=as_int("version", 0),
            obs_kind=obs_kind,
            obs_dim=as_int("obs_dim", 1),
            action_dim=as_int("action_dim", 1),
            chunk_length=as_int("chunk_length", 1),
            instr_dim=instr_dim,
            tasks=tuple(tasks),
            kind=raw.get("kind", ""),
            instructions=instructions,
            normalization=normalization,
            control_dt=control_dt,
            created=raw.get("created", ""),
            lineage=lineage,
        )
