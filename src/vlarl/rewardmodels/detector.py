"""The learned success detector: train (torch), export (ONNX + metadata), run (ONNX Runtime).

A binary classifier over a window of the last ``window`` observations (and the task's
instruction embedding when it serves several tasks), trained on WMPO's labels
(:mod:`vlarl.rewardmodels.labels`: positives only at the end of successful episodes).

At run time (:class:`SuccessDetector`) the window slides one observation per control step; the
detector **fires** once ``debounce`` consecutive windows score at least ``threshold`` and stays
fired until :meth:`SuccessDetector.reset` (a new episode). The threshold is chosen on held-out
validation episodes at training time (fewest false successes in failed episodes first, then
fewest missed successes; a multi-task model also gets one per task) and stored in the model's
metadata with the debounce; both can be overridden at load time.

The reward node uses :meth:`SuccessDetector.push` per observation; the learner calls
:meth:`SuccessDetector.probabilities` / :meth:`SuccessDetector.fire_mask` on whole episodes
(:func:`vlarl.rewardmodels.labels.relabel_rewards`): the same model, the same rule.
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
    DEFAULT_PRE_STEPS,
    Episode,
    WindowSet,
    build_windows,
    describe,
    split_episodes,
    windows_of,
)
from vlarl.rewardmodels.modelfile import (
    INPUT_INSTRUCTION,
    INPUT_WINDOW,
    KIND_DETECTOR,
    LoadedModel,
    load_model_file,
)

LABEL_RULE = (
    "WMPO: the window ending at o_k is positive iff the episode succeeded and k >= "
    "success_step - pre_steps; all other windows (failed episodes, earlier parts of successful "
    "ones) are negative"
)


# ---------------------------------------------------------------------- the firing rule
def first_fire(probs: np.ndarray, *, threshold: float, debounce: int) -> int | None:
    """Index of the window at which ``debounce`` consecutive probabilities >= ``threshold``
    have been seen (the last of them), or None."""
    above = np.asarray(probs) >= threshold
    if debounce <= 1:
        hits = np.flatnonzero(above)
        return int(hits[0]) if hits.size else None
    if above.size < debounce:
        return None
    runs = np.convolve(above.astype(np.int32), np.ones(debounce, np.int32), mode="valid")
    hits = np.flatnonzero(runs >= debounce)
    return int(hits[0]) + debounce - 1 if hits.size else None


def fire_mask(probs: np.ndarray, *, threshold: float, debounce: int) -> np.ndarray:
    """bool [T]: fired (latched) from the first firing window on."""
    mask = np.zeros(np.asarray(probs).shape[0], bool)
    first = first_fire(probs, threshold=threshold, debounce=debounce)
    if first is not None:
        mask[first:] = True
    return mask


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
        raise RewardModelError(f"threshold must be in (0, 1), got {threshold}")
    return threshold


def check_debounce(debounce: int) -> int:
    if isinstance(debounce, bool) or int(debounce) != debounce or debounce < 1:
        raise RewardModelError(f"debounce must be an integer >= 1, got {debounce}")
    return int(debounce)


# ---------------------------------------------------------------------- runtime
class SuccessDetector:
    """A verified detector model with a sliding window, a threshold and a debounce.

    ``push`` is the per-step hot path (preallocated, bound buffers; no allocation beyond
    ONNX Runtime's own); it is not re-entrant: call it from one thread at a time.
    """

    def __init__(
        self, model: LoadedModel, *, threshold: float | None = None, debounce: int | None = None
    ) -> None:
        import onnxruntime as ort

        meta = model.metadata
        if meta.kind != KIND_DETECTOR:
            raise RewardModelError(f"{meta.tag} is a {meta.kind} model, not a success detector")
        self.model = model
        self.metadata = meta
        self._override = None if threshold is None else check_threshold(threshold)
        self._default_threshold = check_threshold(meta.params.get("threshold", 0.5))
        per_task = meta.params.get("task_thresholds", {})
        if not isinstance(per_task, dict):
            raise RewardModelError("vlarl.params task_thresholds must be a JSON object")
        self._task_thresholds = {str(t): check_threshold(v) for t, v in per_task.items()}
        self.threshold = self.threshold_for(meta.tasks[0])
        self.debounce = check_debounce(
            int(meta.params.get("debounce", 2)) if debounce is None else debounce
        )
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
        self._count = 0  # observations pushed this episode
        self._run = 0  # consecutive windows at/above the threshold
        self.prob = 0.0
        self.fired = False
        self.fired_at: int | None = None  # index of the push (0-based) at which it fired

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        threshold: float | None = None,
        debounce: int | None = None,
        intra_op_threads: int = 1,
    ) -> SuccessDetector:
        """Load and verify a detector file (:func:`load_model_file`); raises RewardModelError."""
        model = load_model_file(path, kind=KIND_DETECTOR, intra_op_threads=intra_op_threads)
        return cls(model, threshold=threshold, debounce=debounce)

    @property
    def tag(self) -> str:
        return self.metadata.tag

    @property
    def path(self) -> Path:
        return self.model.path

    def threshold_for(self, task: str) -> float:
        """The firing threshold for ``task``: the load-time override, else the task's own
        (multi-task models calibrate one per task), else the model's."""
        if self._override is not None:
            return self._override
        return self._task_thresholds.get(task, self._default_threshold)

    def select_task(self, task: str) -> None:
        """Condition on ``task`` (multi-task models); refuses a task the model does not know."""
        row = self.model.instruction_row(task)
        if self.metadata.instr_dim > 0:
            self._instr[...] = row
        self.task = task
        self.threshold = self.threshold_for(task)

    def reset(self) -> None:
        """A new episode: empty the window, clear the debounce and the fired latch."""
        self._count = 0
        self._run = 0
        self.prob = 0.0
        self.fired = False
        self.fired_at = None

    def push(self, obs: np.ndarray) -> bool:
        """Add one observation (the newest), score the window; True once the detector fired."""
        window = self._window[0]
        if obs.shape != window.shape[1:]:
            raise RewardModelError(
                f"expected an observation of shape {window.shape[1:]}, got {obs.shape}"
            )
        if not math.isfinite(float(obs.sum())) and not np.isfinite(obs).all():
            raise RewardModelError("observation holds non-finite values")
        if self._count == 0:
            window[...] = obs  # pad with the first observation, as in training
        else:
            for i in range(window.shape[0] - 1):
                window[i] = window[i + 1]
            window[-1] = obs
        self.model.session.run_with_iobinding(self._binding)
        prob = float(self._out[0])
        self.prob = prob if math.isfinite(prob) else 0.0
        self._run = self._run + 1 if self.prob >= self.threshold else 0
        if not self.fired and self._run >= self.debounce:
            self.fired = True
            self.fired_at = self._count
        self._count += 1
        return self.fired

    def probabilities(self, obs: np.ndarray, *, task: str) -> np.ndarray:
        """P(success) [T] of every window of one episode's observations o_0..o_{T-1}."""
        meta = self.metadata
        obs = np.asarray(obs, np.float32)
        if obs.ndim != 2 or obs.shape[1] != meta.obs_dim:
            raise RewardModelError(f"expected observations [T, {meta.obs_dim}], got {obs.shape}")
        windows = windows_of(obs, meta.window)
        instr = None
        if meta.instr_dim > 0:
            instr = np.repeat(self.model.instruction_row(task), obs.shape[0], axis=0)
        else:
            self.model.instruction_row(task)  # refuses unknown tasks
        probs = self.model.run(windows, instr)
        return np.where(np.isfinite(probs), probs, 0.0).astype(np.float32)

    def fire_mask(self, probs: np.ndarray, *, task: str | None = None) -> np.ndarray:
        """Fired (latched) per window of one episode of ``task`` (default: the selected one)."""
        thr = self.threshold_for(task) if task is not None else self.threshold
        return fire_mask(probs, threshold=thr, debounce=self.debounce)

    def detect(self, obs: np.ndarray, *, task: str) -> int | None:
        """Index k of the observation at which the detector fires over a whole episode."""
        return first_fire(
            self.probabilities(obs, task=task),
            threshold=self.threshold_for(task),
            debounce=self.debounce,
        )

    def __repr__(self) -> str:
        return (
            f"SuccessDetector({self.tag}, threshold={self.threshold:g}, "
            f"debounce={self.debounce}, window={self.metadata.window})"
        )


# ---------------------------------------------------------------------- training
@dataclass
class DetectorConfig:
    """Training settings of the success detector."""

    window: int = 2  # observations per window
    pre_steps: int = DEFAULT_PRE_STEPS  # positives start this many steps before success
    debounce: int = 3  # consecutive positive windows before firing
    hidden: int = 256  # MLP width
    depth: int = 2  # hidden layers
    points: str = "auto"  # geometric-feature points: auto/tcp (Meta-World), none, a,b@dx:dy:dz
    rings: str = "none"  # distance rings (radii, m) of the point pairs: auto, none, r1,r2,..
    ring_width: float = 0.002  # softness (m) of the rings
    raw_window: bool = True  # raw observations of the whole window (False: the newest only)
    steps: int = 3000  # optimizer steps
    batch: int = 512  # windows per step
    lr: float = 1e-3  # peak learning rate (cosine schedule)
    weight_decay: float = 1e-4  # AdamW weight decay
    pos_weight: float = 0.0  # loss weight of positives (0: sqrt(negatives / positives))
    failed_weight: float = 6.0  # loss weight of windows of failed episodes (near-misses)
    val_fraction: float = 0.15  # episodes held out to choose the threshold and the best weights
    eval_every: int = 250  # steps between validation passes
    max_steps: int = DEFAULT_MAX_STEPS  # cap of episode length (labels only)
    seed: int = 0  # data split and initialization
    threads: int = 1  # torch CPU threads


@dataclass
class TrainedDetector:
    """A trained detector before export."""

    head: Any  # nets.ProbabilityHead
    config: DetectorConfig
    tasks: tuple[str, ...]
    instructions: dict[str, np.ndarray]
    threshold: float
    report: dict[str, Any] = field(default_factory=dict)
    task_thresholds: dict[str, float] = field(default_factory=dict)
    val_windows: np.ndarray | None = None  # for the export check
    val_instructions: np.ndarray | None = None


def _instruction_rows(ws: WindowSet, table: np.ndarray | None) -> np.ndarray | None:
    return None if table is None else table[ws.task]


def calibrate_threshold(
    prob_seqs: Sequence[np.ndarray],
    episodes: Sequence[Episode],
    *,
    debounce: int,
    pre_steps: int,
    early_slack: int = 5,
) -> tuple[float, dict[str, Any]]:
    """The threshold with the fewest errors on validation episodes.

    Errors, in order of weight: firing in a failed episode (x3), firing more than
    ``pre_steps + early_slack`` steps before the true success, missing a success. Among equally
    good thresholds the middle of the best range is taken (the most margin either way).
    """
    grid = np.round(
        np.concatenate([np.arange(0.05, 0.95, 0.025), np.arange(0.95, 0.996, 0.005)]), 4
    )
    scores = []
    for thr in grid:
        false_fail = missed = early = 0
        for probs, ep in zip(prob_seqs, episodes, strict=True):
            k = first_fire(probs, threshold=float(thr), debounce=debounce)
            if ep.success_step is None:
                false_fail += k is not None
            elif k is None:
                missed += 1
            elif k < ep.success_step - pre_steps - early_slack:
                early += 1
        scores.append((3 * false_fail + early + missed, false_fail, early, missed))
    errors = np.array([s[0] for s in scores])
    best = np.flatnonzero(errors == errors.min())
    # the longest contiguous run of best thresholds, then its middle
    runs = np.split(best, np.flatnonzero(np.diff(best) != 1) + 1)
    run = max(runs, key=len)
    choice = int(run[len(run) // 2])
    detail = {
        "threshold": float(grid[choice]),
        "val_errors": int(scores[choice][0]),
        "val_false_success_in_failed": int(scores[choice][1]),
        "val_early": int(scores[choice][2]),
        "val_missed": int(scores[choice][3]),
        "best_range": [float(grid[run[0]]), float(grid[run[-1]])],
        "val_episodes": len(episodes),
    }
    return float(grid[choice]), detail


def train_detector(
    episodes: Sequence[Episode],
    cfg: DetectorConfig,
    *,
    instructions: dict[str, np.ndarray] | None = None,
    calibration: Sequence[Episode] = (),
    log: Callable[[str], None] | None = None,
) -> TrainedDetector:
    """Train on ``episodes`` (a validation share held out); raises RewardModelError for data
    that cannot train a detector (no successful or no failed episodes, ...).

    ``calibration``: more held-out episodes (e.g. a set of hard near-misses) that join the
    validation share only where thresholds are chosen; they never train the network."""
    import torch

    from vlarl.rewardmodels.nets import (
        ProbabilityHead,
        WindowNet,
        cosine_lr,
        parse_points,
        parse_rings,
        predict,
    )

    log = log or (lambda _msg: None)
    if cfg.window < 1 or cfg.steps < 1 or cfg.batch < 1:
        raise RewardModelError("window, steps and batch must be >= 1")
    check_debounce(cfg.debounce)
    if cfg.pre_steps + 1 < cfg.debounce:
        log(
            f"note: pre_steps={cfg.pre_steps} < debounce-1: the detector cannot fire by the "
            "success step itself"
        )
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    tasks = tuple(dict.fromkeys(e.task for e in episodes))
    if not any(e.succeeded for e in episodes):
        raise RewardModelError("no successful episode: a success detector needs positives")
    if all(e.succeeded for e in episodes):
        log("warning: no failed episode in the data; negatives come only from early steps")
    multi = len(tasks) > 1
    table: np.ndarray | None = None
    instr_map: dict[str, np.ndarray] = {}
    if multi:
        if instructions is None or any(t not in instructions for t in tasks):
            raise RewardModelError("a multi-task detector needs an instruction embedding per task")
        table = np.stack([np.asarray(instructions[t], np.float32) for t in tasks])
        instr_map = {t: table[i] for i, t in enumerate(tasks)}
    train_eps, val_eps = split_episodes(episodes, fraction=cfg.val_fraction, seed=cfg.seed)
    if not val_eps:
        val_eps = train_eps
    tr = build_windows(
        train_eps, window=cfg.window, pre_steps=cfg.pre_steps, max_steps=cfg.max_steps, tasks=tasks
    )
    va = build_windows(
        val_eps, window=cfg.window, pre_steps=cfg.pre_steps, max_steps=cfg.max_steps, tasks=tasks
    )
    n_pos = int(tr.label.sum())
    n_neg = len(tr) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise RewardModelError("training windows need both positives and negatives")
    pos_w = cfg.pos_weight or float(np.sqrt(n_neg / n_pos))
    failed = np.array([not train_eps[i].succeeded for i in tr.episode], bool)
    weight = np.where(tr.label > 0, pos_w, np.where(failed, cfg.failed_weight, 1.0))
    log(
        f"detector: {len(train_eps)} train / {len(val_eps)} val episodes, {len(tr)} windows "
        f"({n_pos} positive, pos_weight {pos_w:.2f}), tasks {', '.join(tasks)}"
    )

    try:
        points, offsets = parse_points(cfg.points, tr.obs.shape[1])
        rings = parse_rings(cfg.rings)
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
        rings=rings,
        ring_width=cfg.ring_width,
        raw=cfg.raw_window,
    )
    rng = np.random.default_rng(cfg.seed)
    sample = rng.choice(len(tr), size=min(len(tr), 20000), replace=False)
    net.fit_normalization(tr.obs, tr.windows(sample))
    head = ProbabilityHead(net)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    va_windows = va.windows()
    va_instr = _instruction_rows(va, table)
    va_w = np.where(va.label > 0, pos_w, 1.0)

    def val_loss() -> float:
        p = np.clip(predict(head, va_windows, va_instr), 1e-6, 1 - 1e-6)
        y = va.label.astype(np.float64)
        return float(np.sum(va_w * -(y * np.log(p) + (1 - y) * np.log(1 - p))) / va_w.sum())

    best: tuple[float, dict[str, Any] | None, int] = (math.inf, None, 0)
    t0 = time.perf_counter()
    bce = torch.nn.BCEWithLogitsLoss(reduction="none")
    for step in range(cfg.steps):
        net.train()
        idx = rng.integers(0, len(tr), cfg.batch)
        w = torch.from_numpy(tr.windows(idx))
        ins = None if table is None else torch.from_numpy(table[tr.task[idx]])
        y = torch.from_numpy(tr.label[idx].astype(np.float32))
        sw = torch.from_numpy(weight[idx].astype(np.float32))
        loss = (bce(net(w, ins), y) * sw).sum() / sw.sum()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total=cfg.steps, base=cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            vl = val_loss()
            if vl < best[0]:
                best = (vl, {k: v.detach().clone() for k, v in net.state_dict().items()}, step + 1)
            log(
                f"  step {step + 1}: train loss {loss.item():.4f}, val loss {vl:.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    if best[1] is not None:
        net.load_state_dict(best[1])
    head.eval()
    probs = predict(head, va_windows, va_instr)
    seqs = [probs[va.episode == i] for i in range(len(val_eps))]
    val_only = len(val_eps)
    extra = [e for e in calibration if e.task in tasks]
    if len(extra) < len(calibration):
        log(f"note: {len(calibration) - len(extra)} calibration episodes of unknown tasks skipped")
    if extra:
        ca = build_windows(
            extra, window=cfg.window, pre_steps=cfg.pre_steps, max_steps=cfg.max_steps, tasks=tasks
        )
        cprobs = predict(head, ca.windows(), _instruction_rows(ca, table))
        seqs += [cprobs[ca.episode == i] for i in range(len(extra))]
        val_eps = [*val_eps, *extra]
        log(f"detector: {len(extra)} more episodes for the thresholds only: {describe(extra)}")
    threshold, calib = calibrate_threshold(
        seqs, val_eps, debounce=cfg.debounce, pre_steps=cfg.pre_steps
    )
    task_thresholds: dict[str, float] = {}
    if len(tasks) > 1:  # one threshold per task, on that task's validation episodes
        for task in tasks:
            members = [i for i, e in enumerate(val_eps) if e.task == task]
            if any(val_eps[i].succeeded for i in members):
                thr, detail = calibrate_threshold(
                    [seqs[i] for i in members],
                    [val_eps[i] for i in members],
                    debounce=cfg.debounce,
                    pre_steps=cfg.pre_steps,
                )
                task_thresholds[task] = thr
                calib.setdefault("per_task", {})[task] = detail
        log(
            "detector: per-task thresholds "
            + ", ".join(f"{t} {v:g}" for t, v in task_thresholds.items())
        )
    thr_rows = np.array([task_thresholds.get(t, threshold) for t in tasks])[va.task]
    pred = probs >= thr_rows
    report = {
        "train_episodes": len(train_eps),
        "val_episodes": val_only,
        "calibration_only_episodes": len(extra),
        "train_windows": len(tr),
        "positives": n_pos,
        "pos_weight": pos_w,
        "best_step": best[2],
        "val_loss": best[0],
        "val_window_accuracy": float(np.mean(pred == (va.label > 0))),
        "calibration": calib,
        "seconds": round(time.perf_counter() - t0, 1),
        "config": dataclasses.asdict(cfg),
    }
    log(
        f"detector: threshold {threshold:g} (val errors {calib['val_errors']}: "
        f"{calib['val_false_success_in_failed']} false in failed, {calib['val_early']} early, "
        f"{calib['val_missed']} missed of {len(val_eps)} episodes)"
    )
    return TrainedDetector(
        head=head,
        config=cfg,
        tasks=tasks,
        instructions=instr_map,
        threshold=threshold,
        report=report,
        task_thresholds=task_thresholds,
        val_windows=va_windows,
        val_instructions=va_instr,
    )


def export_detector(
    trained: TrainedDetector,
    out: str | Path,
    *,
    model_id: str,
    version: int = 1,
    overwrite: bool = False,
    tolerance: float = 1e-4,
    training_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the detector as ONNX with metadata; checks ONNX Runtime against torch and loads it
    back with :class:`SuccessDetector`. Nothing is written when a check fails."""
    from vlarl.rewardmodels.nets import export_window_model

    err = export_window_model(
        trained,
        out,
        kind=KIND_DETECTOR,
        model_id=model_id,
        version=version,
        params={
            "threshold": trained.threshold,
            "task_thresholds": trained.task_thresholds,
            "debounce": trained.config.debounce,
            "pre_steps": trained.config.pre_steps,
            "label_rule": LABEL_RULE,
        },
        doc=(
            f"vlarl success detector over {trained.head.net.window} observations "
            f"({', '.join(trained.tasks)})"
        ),
        overwrite=overwrite,
        tolerance=tolerance,
        training_info=training_info,
    )
    loaded = SuccessDetector.load(out)
    return {
        "onnx": str(out),
        "bytes": Path(out).stat().st_size,
        "sha256": loaded.model.sha256,
        "tag": loaded.tag,
        "threshold": loaded.threshold,
        "debounce": loaded.debounce,
        "max_abs_err_vs_torch": err,
    }
