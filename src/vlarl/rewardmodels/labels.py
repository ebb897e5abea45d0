"""Labels for the reward models from replay episodes, and rewards recomputed offline.

An episode of ``n`` transitions (rows sorted by ``step``) is seen as the ``n + 1`` observations
``o_0 = obs[0]`` and ``o_k = next_obs[k - 1]`` (the state after ``k`` steps, which is what the
reward node sees with ``robot/status`` step ``k``). ``success[k - 1] = 1`` says the task is solved
at ``o_k``; the first such ``k`` is the episode's **success step** ``s`` (None: a failed
episode). Episode ids and success flags come from the replay's ``episode``/``step``/``success``
columns, whichever source filled them: the simulator in development, the human label service on
a robot (through the bag bridge).

- **Success detector (WMPO's rule)**: the window ending at ``o_k`` is positive only in the final
  part of a successful episode, ``k >= s - pre_steps`` (the few steps just before success, the
  success step, and whatever was recorded after it); every other window is negative, the earlier
  part of successful episodes included, and so is every window of a failed episode.
- **Progress (steps-to-go)**: ``d(o_k) = max(s - k, 0)`` in a successful episode; in a failed
  episode the target is censored: success did not come within the remaining ``n - k`` steps, so
  ``d(o_k) >= n - k + 1`` (a lower bound, used as such by the loss). Targets are capped at
  ``max_steps``.
- **Windows**: the window of ``o_k`` is ``o_{k-L+1} .. o_k``; before the episode has ``L``
  observations it is padded with ``o_0`` (the runtime does the same).

:func:`relabel_rewards` is the offline twin of the reward node: it runs the same
:class:`~vlarl.rewardmodels.detector.SuccessDetector` and
:class:`~vlarl.rewardmodels.progress.ProgressModel` over replay transitions and returns them with
recomputed reward and success columns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vlarl.data.replay import Replay, Transitions, load_replay
from vlarl.rewardmodels.errors import RewardDataError

if TYPE_CHECKING:
    from vlarl.rewardmodels.detector import SuccessDetector
    from vlarl.rewardmodels.progress import ProgressModel, RewardMix

DEFAULT_PRE_STEPS = 2
DEFAULT_MAX_STEPS = 500


@dataclass
class Episode:
    """One episode as an observation sequence with its outcome."""

    episode: int
    task: str
    obs: np.ndarray  # [n + 1, obs_dim] float32: o_0 .. o_n
    success_step: int | None  # first k with the task solved at o_k; None = failed
    version: str = ""
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # replay rows

    @property
    def steps(self) -> int:
        return int(self.obs.shape[0] - 1)

    @property
    def succeeded(self) -> bool:
        return self.success_step is not None

    @property
    def near_miss(self) -> bool:
        return self.version.startswith("nearmiss")


def observation_sequence(data: Transitions, rows: np.ndarray) -> np.ndarray:
    """``o_0 .. o_n`` of one episode's rows (sorted by step)."""
    if rows.size == 0:
        raise RewardDataError("an episode without transitions has no observations")
    return np.concatenate([data.obs[rows[:1]], data.next_obs[rows]]).astype(np.float32)


def success_step_of(success: np.ndarray) -> int | None:
    """First ``k`` (1-based) whose flag is set, or None."""
    hits = np.flatnonzero(np.asarray(success) > 0)
    return int(hits[0]) + 1 if hits.size else None


def episodes_from_transitions(
    data: Transitions,
    *,
    task_names: Sequence[str],
    version_names: Sequence[str] = (),
    tasks: Iterable[str] | None = None,
) -> list[Episode]:
    """Split transitions into :class:`Episode` objects (optionally only some tasks)."""
    keep = None if tasks is None else set(tasks)
    out: list[Episode] = []
    for ep, rows in data.episodes():
        task_ids = np.unique(data.task[rows])
        if task_ids.size != 1:
            raise RewardDataError(f"episode {ep} mixes tasks {task_ids.tolist()}")
        if not 0 <= int(task_ids[0]) < len(task_names):
            raise RewardDataError(f"episode {ep}: task index {int(task_ids[0])} has no name")
        task = task_names[int(task_ids[0])]
        if keep is not None and task not in keep:
            continue
        version = ""
        if version_names:
            v = int(data.policy_version[rows[0]])
            version = version_names[v] if 0 <= v < len(version_names) else ""
        out.append(
            Episode(
                episode=ep,
                task=task,
                obs=observation_sequence(data, rows),
                success_step=success_step_of(data.success[rows]),
                version=version,
                rows=rows,
            )
        )
    return out


def load_episodes(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | Replay,
    *,
    tasks: Iterable[str] | None = None,
    skip_bad: bool = False,
) -> list[Episode]:
    """Episodes of one or more replay directories (or a loaded :class:`Replay`)."""
    replay = source if isinstance(source, Replay) else load_replay(source, skip_bad=skip_bad)
    episodes = episodes_from_transitions(
        replay.data, task_names=replay.tasks, version_names=replay.versions, tasks=tasks
    )
    if not episodes:
        raise RewardDataError("no episodes (of the requested tasks) in the replay data")
    return episodes


def success_labels(n_obs: int, success_step: int | None, *, pre_steps: int) -> np.ndarray:
    """WMPO labels [n_obs] (uint8) of the windows ending at o_0 .. o_{n_obs-1}."""
    if pre_steps < 0:
        raise ValueError("pre_steps must be >= 0")
    labels = np.zeros(n_obs, np.uint8)
    if success_step is not None:
        labels[max(0, success_step - pre_steps) :] = 1
    return labels


def steps_to_go(
    n_obs: int, success_step: int | None, *, max_steps: int = DEFAULT_MAX_STEPS
) -> tuple[np.ndarray, np.ndarray]:
    """(target [n_obs] float32, censored [n_obs] bool): steps from o_k to success.

    Censored targets (failed episodes) are lower bounds: ``n - k + 1`` with ``n = n_obs - 1``.
    """
    k = np.arange(n_obs)
    if success_step is None:
        target = (n_obs - 1) - k + 1
        censored = np.ones(n_obs, bool)
    else:
        target = np.maximum(success_step - k, 0)
        censored = np.zeros(n_obs, bool)
    return np.minimum(target, max_steps).astype(np.float32), censored


def window_index(n_obs: int, window: int) -> np.ndarray:
    """[n_obs, window] indices into o_0..o_{n_obs-1}: row k = k-L+1 .. k, padded with 0."""
    if window < 1:
        raise ValueError("window must be >= 1")
    idx = np.arange(n_obs)[:, None] + np.arange(-window + 1, 1)[None, :]
    return np.maximum(idx, 0)


def windows_of(obs: np.ndarray, window: int) -> np.ndarray:
    """[n_obs, window, obs_dim] windows of one observation sequence."""
    return np.ascontiguousarray(obs[window_index(obs.shape[0], window)], dtype=np.float32)


@dataclass
class WindowSet:
    """All windows of a set of episodes, as indices into one stacked observation array."""

    obs: np.ndarray  # [M, obs_dim] every observation of every episode
    index: np.ndarray  # [N, window] rows of ``obs`` forming window i
    label: np.ndarray  # [N] uint8 success-detector label
    steps_to_go: np.ndarray  # [N] float32 progress target
    censored: np.ndarray  # [N] bool: the target is a lower bound
    task: np.ndarray  # [N] int64 index into ``tasks``
    episode: np.ndarray  # [N] int64 position of the episode in the list it came from
    step: np.ndarray  # [N] int64 k of the window's last observation
    tasks: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def windows(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        idx = self.index if rows is None else self.index[rows]
        return self.obs[idx]


def build_windows(
    episodes: Sequence[Episode],
    *,
    window: int,
    pre_steps: int = DEFAULT_PRE_STEPS,
    max_steps: int = DEFAULT_MAX_STEPS,
    tasks: Sequence[str] | None = None,
) -> WindowSet:
    """Label every window of ``episodes`` (WMPO labels and steps-to-go targets)."""
    if not episodes:
        raise RewardDataError("no episodes to label")
    names = tuple(tasks) if tasks is not None else tuple(dict.fromkeys(e.task for e in episodes))
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("obs", "index", "label", "d", "cens", "task", "episode", "step")
    }
    offset = 0
    for i, ep in enumerate(episodes):
        if ep.task not in names:
            raise RewardDataError(f"episode {ep.episode}: task {ep.task!r} not in {names}")
        n_obs = ep.obs.shape[0]
        d, cens = steps_to_go(n_obs, ep.success_step, max_steps=max_steps)
        parts["obs"].append(ep.obs)
        parts["index"].append(window_index(n_obs, window) + offset)
        parts["label"].append(success_labels(n_obs, ep.success_step, pre_steps=pre_steps))
        parts["d"].append(d)
        parts["cens"].append(cens)
        parts["task"].append(np.full(n_obs, names.index(ep.task), np.int64))
        parts["episode"].append(np.full(n_obs, i, np.int64))
        parts["step"].append(np.arange(n_obs, dtype=np.int64))
        offset += n_obs
    obs = np.concatenate(parts["obs"]).astype(np.float32)
    if not np.all(np.isfinite(obs)):
        raise RewardDataError("observations hold non-finite values")
    return WindowSet(
        obs=obs,
        index=np.concatenate(parts["index"]),
        label=np.concatenate(parts["label"]),
        steps_to_go=np.concatenate(parts["d"]),
        censored=np.concatenate(parts["cens"]),
        task=np.concatenate(parts["task"]),
        episode=np.concatenate(parts["episode"]),
        step=np.concatenate(parts["step"]),
        tasks=names,
    )


def label_replay(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | Replay,
    *,
    window: int,
    pre_steps: int = DEFAULT_PRE_STEPS,
    max_steps: int = DEFAULT_MAX_STEPS,
    tasks: Iterable[str] | None = None,
) -> tuple[list[Episode], WindowSet]:
    """Episodes of replay data and their labelled windows, in one call."""
    episodes = load_episodes(source, tasks=tasks)
    return episodes, build_windows(
        episodes, window=window, pre_steps=pre_steps, max_steps=max_steps
    )


def split_episodes(
    episodes: Sequence[Episode], *, fraction: float, seed: int
) -> tuple[list[Episode], list[Episode]]:
    """(train, validation): ``fraction`` of each (task, outcome, near-miss) group held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("fraction must be in [0, 1)")
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, bool, bool], list[int]] = {}
    for i, ep in enumerate(episodes):
        groups.setdefault((ep.task, ep.succeeded, ep.near_miss), []).append(i)
    val: set[int] = set()
    for members in groups.values():
        k = round(fraction * len(members))
        if k and len(members) > 1:
            val.update(rng.choice(members, size=min(k, len(members) - 1), replace=False).tolist())
    train = [e for i, e in enumerate(episodes) if i not in val]
    held = [e for i, e in enumerate(episodes) if i in val]
    return train, held


@dataclass
class Relabeled:
    """Transitions with recomputed rewards, and what the models said per episode."""

    data: Transitions
    detected_step: dict[int, int | None]  # episode id -> first k the detector fired
    value: np.ndarray  # [N] value estimate -d(o_k) of each row's next_obs (0 without a model)


def relabel_rewards(
    data: Transitions,
    *,
    task_names: Sequence[str],
    detector: SuccessDetector | None = None,
    progress: ProgressModel | None = None,
    mix: RewardMix | None = None,
    terminal_on_success: bool = False,
) -> Relabeled:
    """The rewards the reward node would have given, computed offline on replay transitions.

    Success per row (the state after the step) comes from ``detector`` (sliding window,
    threshold, debounce; latched for the rest of the episode) or, without one, from the
    replay's own ``success`` column. Reward = ``mix.success_weight`` on the first success row +
    ``mix.progress_weight * (d(o_{k-1}) - d(o_k))`` with a progress model (see
    :class:`~vlarl.rewardmodels.progress.RewardMix`). Returns a copy; ``data`` is unchanged.
    With ``terminal_on_success`` the first success row is also marked terminal.
    """
    from vlarl.rewardmodels.progress import RewardMix

    mix = mix or RewardMix()
    out = Transitions(**{k: v.copy() for k, v in data.columns().items()})
    value = np.zeros(len(data), np.float32)
    detected: dict[int, int | None] = {}
    for ep, rows in data.episodes():
        task = task_names[int(data.task[rows[0]])]
        obs = observation_sequence(data, rows)
        if detector is not None:
            fired = detector.fire_mask(detector.probabilities(obs, task=task), task=task)
            success = fired[1:]  # row k-1 <-> o_k
        else:
            success = np.maximum.accumulate(data.success[rows] > 0)
        first = success_step_of(success)
        detected[ep] = first
        sparse = np.zeros(rows.size, np.float32)
        if first is not None:
            sparse[first - 1] = 1.0
        dense = np.zeros(rows.size, np.float32)
        if progress is not None:
            d = progress.steps_to_go(obs, task=task)
            dense = d[:-1] - d[1:]
            value[rows] = -d[1:]
        out.reward[rows] = mix.combine(sparse, dense)
        out.success[rows] = success.astype(np.uint8)
        if terminal_on_success and first is not None:
            out.terminal[rows[first - 1]] = 1
    return Relabeled(out, detected, value)


def describe(episodes: Sequence[Episode]) -> dict[str, Any]:
    """Counts per task: episodes, successes, near-misses, failures."""
    out: dict[str, Any] = {}
    for ep in episodes:
        row = out.setdefault(
            ep.task, {"episodes": 0, "succeeded": 0, "failed": 0, "near_miss": 0, "steps": 0}
        )
        row["episodes"] += 1
        row["succeeded" if ep.succeeded else "failed"] += 1
        row["near_miss"] += int(ep.near_miss)
        row["steps"] += ep.steps
    return out
