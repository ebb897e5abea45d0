"""The progress model: steps-to-go d(o) toward task completion, and the dense reward it gives.

Trained on the same episodes as the detector with no extra labels (:mod:`.labels`): in a
successful episode d(o_k) = s - k (0 from the success step on); in a failed one the target is a
lower bound (success did not come in the remaining steps), used by a one-sided loss, so states
of failing episodes are pushed towards "far from done" without inventing a number for them.

- **Value** published by the reward node (next to the action markers in RViz):
  ``value = -d(o)`` in steps (0 at success, more negative the further away).
- **Dense reward** (self-improving embodied foundation models): r_t = d(o_t) - d(o_{t+1}) --
  about +1 per step of progress; it telescopes, so an episode's dense return is d(o_0) - d(o_T).
  :class:`RewardMix` weighs it against the sparse success reward: ``progress_weight * dense +
  success_weight * sparse``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlarl.rewardmodels.errors import RewardModelError
from vlarl.rewardmodels.labels import (
    DEFAULT_MAX_STEPS,
    Episode,
    build_windows,
    split_episodes,
    windows_of,
)
from vlarl.rewardmodels.modelfile import (
    INPUT_INSTRUCTION,
    INPUT_WINDOW,
    KIND_PROGRESS,
    LoadedModel,
    load_model_file,
)


# ---------------------------------------------------------------------- reward helpers
@dataclass(frozen=True)
class RewardMix:
    """How the dense progress reward and the sparse success reward are combined."""

    progress_weight: float = 0.01  # per step of progress (d drops by 1): 0.01
    success_weight: float = 1.0  # on the step success is first detected

    def combine(self, sparse: np.ndarray | float, dense: np.ndarray | float) -> Any:
        return self.success_weight * np.asarray(sparse, np.float32) + self.progress_weight * (
            np.asarray(dense, np.float32)
        )

    def scalar(self, sparse: float, dense: float) -> float:
        return float(self.success_weight * sparse + self.progress_weight * dense)


def dense_rewards(steps_to_go: np.ndarray) -> np.ndarray:
    """r_t = d(o_t) - d(o_{t+1}) for a sequence d(o_0..o_T): [T] float32."""
    d = np.asarray(steps_to_go, np.float32)
    return d[:-1] - d[1:]


# ---------------------------------------------------------------------- runtime
class ProgressModel:
    """A verified progress model with a sliding window (one observation per step)."""

    def __init__(self, model: LoadedModel) -> None:
        import onnxruntime as ort

        meta = model.metadata
        if meta.kind != KIND_PROGRESS:
            raise RewardModelError(f"{meta.tag} is a {meta.kind} model, not a progress model")
        self.model = model
        self.metadata = meta
        self.max_steps = float(meta.params.get("max_steps", DEFAULT_MAX_STEPS))
        self._window = np.zeros((1, meta.window, meta.obs_dim), np.float32)
        self._instr = np.zeros((1, max(1, meta.instr_dim)), np.float32)
        self._out = np.zeros(1, np.float32)
        self._binding = model.session.io_binding()
        self._binding.bind_ortvalue_input(
            INPUT_WINDOW, ort.OrtValue.ortvalue_from_numpy(self._window)
        )
        if meta.instr_dim > 0:
            self._binding.bind_ortvalue_input(
                INPUT_INSTRUCTION, ort.OrtValue.ortvalue_from_numpy(self._instr)
            )
        self._binding.bind_ortvalue_output(meta.output, ort.OrtValue.ortvalue_from_numpy(self._out))
        self.task = meta.tasks[0]
        self.select_task(self.task)
        self._count = 0
        self.steps = math.nan  # d(o) of the newest observation

    @classmethod
    def load(cls, path: str | Path, *, intra_op_threads: int = 1) -> ProgressModel:
        return cls(load_model_file(path, kind=KIND_PROGRESS, intra_op_threads=intra_op_threads))

    @property
    def tag(self) -> str:
        return self.metadata.tag

    @property
    def path(self) -> Path:
        return self.model.path

    def select_task(self, task: str) -> None:
        row = self.model.instruction_row(task)
        if self.metadata.instr_dim > 0:
            self._instr[...] = row
        self.task = task

    def reset(self) -> None:
        self._count = 0
        self.steps = math.nan

    def push(self, obs: np.ndarray) -> float:
        """Add the newest observation; returns d(o) (steps to go, >= 0, capped at max_steps)."""
        window = self._window[0]
        if obs.shape != window.shape[1:]:
            raise RewardModelError(
                f"expected an observation of shape {window.shape[1:]}, got {obs.shape}"
            )
        if not math.isfinite(float(obs.sum())) and not np.isfinite(obs).all():
            raise RewardModelError("observation holds non-finite values")
        if self._count == 0:
            window[...] = obs
        else:
            for i in range(window.shape[0] - 1):
                window[i] = window[i + 1]
            window[-1] = obs
        self._count += 1
        self.model.session.run_with_iobinding(self._binding)
        d = float(self._out[0])
        self.steps = min(max(d, 0.0), self.max_steps) if math.isfinite(d) else self.max_steps
        return self.steps

    @staticmethod
    def value_of(steps_to_go: float) -> float:
        """The value estimate published for a state: -d(o)."""
        return -float(steps_to_go)

    def steps_to_go(self, obs: np.ndarray, *, task: str) -> np.ndarray:
        """d(o) [T] for one episode's observations o_0..o_{T-1}."""
        meta = self.metadata
        obs = np.asarray(obs, np.float32)
        if obs.ndim != 2 or obs.shape[1] != meta.obs_dim:
            raise RewardModelError(f"expected observations [T, {meta.obs_dim}], got {obs.shape}")
        instr = None
        if meta.instr_dim > 0:
            instr = np.repeat(self.model.instruction_row(task), obs.shape[0], axis=0)
        else:
            self.model.instruction_row(task)
        d = self.model.run(windows_of(obs, meta.window), instr)
        return np.clip(np.where(np.isfinite(d), d, self.max_steps), 0.0, self.max_steps)

    def __repr__(self) -> str:
        return f"ProgressModel({self.tag}, window={self.metadata.window})"


# ---------------------------------------------------------------------- training
@dataclass
class ProgressConfig:
    """Training settings of the progress (steps-to-go) model."""

    window: int = 2  # observations per window
    hidden: int = 256  # MLP width
    depth: int = 2  # hidden layers
    points: str = "auto"  # geometric-feature points: auto/tcp (Meta-World), none, a,b@dx:dy:dz
    raw_window: bool = True  # raw observations of the whole window (False: the newest only)
    steps: int = 3000  # optimizer steps
    batch: int = 512  # windows per step
    lr: float = 1e-3  # peak learning rate (cosine schedule)
    weight_decay: float = 1e-4  # AdamW weight decay
    scale: float = 100.0  # steps per output unit (the loss works in these units)
    censored_weight: float = 0.5  # weight of the one-sided loss on failed episodes
    val_fraction: float = 0.15  # episodes held out to pick the best weights
    eval_every: int = 250  # steps between validation passes
    max_steps: int = DEFAULT_MAX_STEPS  # targets are capped here
    seed: int = 0  # data split and initialization
    threads: int = 1  # torch CPU threads


@dataclass
class TrainedProgress:
    head: Any  # nets.StepsHead
    config: ProgressConfig
    tasks: tuple[str, ...]
    instructions: dict[str, np.ndarray]
    report: dict[str, Any] = field(default_factory=dict)
    val_windows: np.ndarray | None = None
    val_instructions: np.ndarray | None = None


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def train_progress(
    episodes: Sequence[Episode],
    cfg: ProgressConfig,
    *,
    instructions: dict[str, np.ndarray] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainedProgress:
    """Train the steps-to-go regressor; raises RewardModelError without successful episodes."""
    import torch

    from vlarl.rewardmodels.nets import StepsHead, WindowNet, cosine_lr, parse_points, predict

    log = log or (lambda _msg: None)
    if cfg.window < 1 or cfg.steps < 1 or cfg.batch < 1 or cfg.scale <= 0:
        raise RewardModelError("window, steps, batch and scale must be positive")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    tasks = tuple(dict.fromkeys(e.task for e in episodes))
    if not any(e.succeeded for e in episodes):
        raise RewardModelError("no successful episode: steps-to-go needs episodes that succeed")
    table: np.ndarray | None = None
    instr_map: dict[str, np.ndarray] = {}
    if len(tasks) > 1:
        if instructions is None or any(t not in instructions for t in tasks):
            raise RewardModelError("a multi-task model needs an instruction embedding per task")
        table = np.stack([np.asarray(instructions[t], np.float32) for t in tasks])
        instr_map = {t: table[i] for i, t in enumerate(tasks)}
    train_eps, val_eps = split_episodes(episodes, fraction=cfg.val_fraction, seed=cfg.seed)
    if not val_eps:
        val_eps = train_eps
    tr = build_windows(train_eps, window=cfg.window, max_steps=cfg.max_steps, tasks=tasks)
    va = build_windows(val_eps, window=cfg.window, max_steps=cfg.max_steps, tasks=tasks)
    log(
        f"progress: {len(train_eps)} train / {len(val_eps)} val episodes, {len(tr)} windows "
        f"({int((~tr.censored).sum())} with exact targets)"
    )
    try:
        points, offsets = parse_points(cfg.points, tr.obs.shape[1])
    except ValueError as exc:
        raise RewardModelError(str(exc)) from None
    net = WindowNet(
        obs_dim=tr.obs.shape[1],
        window=cfg.window,
        instr_dim=0 if table is None else table.shape[1],
        hidden=cfg.hidden,
        depth=cfg.depth,
        points=points,
        point_offsets=offsets,
        raw=cfg.raw_window,
    )
    rng = np.random.default_rng(cfg.seed)
    sample = rng.choice(len(tr), size=min(len(tr), 20000), replace=False)
    net.fit_normalization(tr.obs, tr.windows(sample))
    head = StepsHead(net, cfg.scale)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    va_windows = va.windows()
    va_instr = None if table is None else table[va.task]
    exact_va = ~va.censored

    def val_error() -> float:
        pred = predict(head, va_windows, va_instr)
        return float(np.mean(np.abs(pred[exact_va] - va.steps_to_go[exact_va])))

    best: tuple[float, dict[str, Any] | None, int] = (math.inf, None, 0)
    t0 = time.perf_counter()
    huber = torch.nn.HuberLoss(reduction="none", delta=0.2)
    target_all = (tr.steps_to_go / cfg.scale).astype(np.float32)
    for step in range(cfg.steps):
        net.train()
        idx = rng.integers(0, len(tr), cfg.batch)
        w = torch.from_numpy(tr.windows(idx))
        ins = None if table is None else torch.from_numpy(table[tr.task[idx]])
        pred = nn_softplus(net(w, ins))
        target = torch.from_numpy(target_all[idx])
        cens = torch.from_numpy(tr.censored[idx])
        exact_loss = huber(pred, target)
        lower_loss = huber(torch.clamp(target - pred, min=0.0), torch.zeros_like(pred))
        loss = torch.where(cens, cfg.censored_weight * lower_loss, exact_loss).mean()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total=cfg.steps, base=cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            err = val_error()
            if err < best[0]:
                best = (err, {k: v.detach().clone() for k, v in net.state_dict().items()}, step + 1)
            log(
                f"  step {step + 1}: loss {loss.item():.4f}, val MAE {err:.1f} steps "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    if best[1] is not None:
        net.load_state_dict(best[1])
    head.eval()
    pred = predict(head, va_windows, va_instr)
    succ_rows = ~va.censored
    report = {
        "train_episodes": len(train_eps),
        "val_episodes": len(val_eps),
        "train_windows": len(tr),
        "best_step": best[2],
        "val_mae_steps": best[0],
        "val_corr": pearson(pred[succ_rows], va.steps_to_go[succ_rows]),
        "seconds": round(time.perf_counter() - t0, 1),
        "config": dataclasses.asdict(cfg),
    }
    log(f"progress: val MAE {best[0]:.1f} steps, corr {report['val_corr']:.3f}")
    return TrainedProgress(
        head=head,
        config=cfg,
        tasks=tasks,
        instructions=instr_map,
        report=report,
        val_windows=va_windows,
        val_instructions=va_instr,
    )


def nn_softplus(x: Any) -> Any:
    import torch

    return torch.nn.functional.softplus(x)


def export_progress(
    trained: TrainedProgress,
    out: str | Path,
    *,
    model_id: str,
    version: int = 1,
    overwrite: bool = False,
    tolerance: float = 1e-2,
    training_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the progress model as ONNX with metadata (checked like the detector's)."""
    from vlarl.rewardmodels.nets import export_window_model

    err = export_window_model(
        trained,
        out,
        kind=KIND_PROGRESS,
        model_id=model_id,
        version=version,
        params={
            "max_steps": trained.config.max_steps,
            "scale": trained.config.scale,
            "value": "-steps_to_go",
            "dense_reward": "d(o_t) - d(o_t+1)",
        },
        doc=f"vlarl progress (steps-to-go) model over {trained.head.net.window} observations",
        overwrite=overwrite,
        tolerance=tolerance,
        training_info=training_info,
    )
    loaded = ProgressModel.load(out)
    return {
        "onnx": str(out),
        "bytes": Path(out).stat().st_size,
        "sha256": loaded.model.sha256,
        "tag": loaded.tag,
        "max_abs_err_vs_torch": err,
    }
