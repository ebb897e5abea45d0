"""Episode accounting: reward, success, value, episode boundaries and summaries.

ROS-free; the reward node feeds it one :class:`StatusSample` per ``robot/status`` message, with
the observation of the same stamp when learned models need it (:class:`ObservationJoin` pairs
them).

- **Success** comes from a pluggable :class:`SuccessSource` (:func:`make_success_source`):
  ``sim`` (the simulator's own flag, privileged, for development), ``human`` (labels from the
  label service: :meth:`EpisodeAccountant.label` ends the episode with the label at its next
  sample; the robot's flag is ignored) or ``detector`` (a learned
  :class:`~vlarl.rewardmodels.detector.SuccessDetector` over a sliding window of observations,
  threshold and debounce; when the robot ends an episode, its final window is also judged on
  its own, which is WMPO's rule: the detector classifies the episode's final window).
- **Reward** scheme ``sparse`` (default): 1.0 on the first sample of an episode where the success
  source says success, else 0.0. ``env``: Meta-World's shaped reward as the simulator reports it.
  ``progress``: ``progress_weight * (d(o_t) - d(o_t+1)) + success_weight * sparse`` with the
  progress model's steps-to-go d (:class:`~vlarl.rewardmodels.progress.RewardMix`).
- **Value** comes from a pluggable :class:`ValueSource` (the progress model: -d(o); 0.0 without).
- **Boundaries**: an episode ends at the first sample with ``terminal`` or ``truncated`` (and,
  with ``terminate_on_success``, at the first success; or at a human label). A summary is
  produced once per episode. Missed samples are tolerated: a success seen late still counts
  once, and a new episode number ends the previous episode (``end = "unterminated"``) if its last
  samples were missed. Re-sent samples (same stamp) and out-of-order ones are dropped; a newer
  sample of the same step (sim_robot's extra ``truncated`` sample on a reset) ends the episode
  with reward 0.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vlarl.topics import REWARD_FIELDS, ROBOT_STATUS_FIELDS

if TYPE_CHECKING:
    from vlarl.rewardmodels.detector import SuccessDetector
    from vlarl.rewardmodels.progress import ProgressModel

SUCCESS_SOURCES: tuple[str, ...] = ("sim", "human", "detector")
REWARD_SCHEMES: tuple[str, ...] = ("sparse", "env", "progress")


class SuccessSourceUnavailable(ValueError):
    """The requested success source is known but cannot be used (now): the reason says why."""


class LabelRefused(ValueError):
    """A human label cannot be applied (no episode in progress, already ended, ...)."""


@dataclass(frozen=True, slots=True)
class StatusSample:
    """One ``robot/status`` record (layout :data:`vlarl.topics.ROBOT_STATUS_FIELDS`)."""

    episode: int
    step: int
    success: bool
    terminal: bool
    truncated: bool
    env_reward: float

    @classmethod
    def from_fields(cls, fields: Mapping[str, float]) -> StatusSample:
        """From a name->value map; raises ``ValueError`` for missing or non-finite fields."""
        missing = [f for f in ROBOT_STATUS_FIELDS if f not in fields]
        if missing:
            raise ValueError(f"status is missing fields: {', '.join(missing)}")
        values = {f: float(fields[f]) for f in ROBOT_STATUS_FIELDS}
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError("status holds a non-finite value")
        return cls(
            episode=int(values["episode"]),
            step=int(values["step"]),
            success=values["success"] >= 0.5,
            terminal=values["terminal"] >= 0.5,
            truncated=values["truncated"] >= 0.5,
            env_reward=values["env_reward"],
        )


@dataclass(frozen=True, slots=True)
class RewardOutput:
    """What the reward topic carries for one status sample (:data:`REWARD_FIELDS`)."""

    reward: float
    success: bool
    value: float
    terminal: bool
    truncated: bool
    episode: int
    step: int

    def values(self) -> list[float]:
        """The values in :data:`vlarl.topics.REWARD_FIELDS` order."""
        record = {
            "reward": self.reward,
            "success": 1.0 if self.success else 0.0,
            "value": self.value,
            "terminal": 1.0 if self.terminal else 0.0,
            "truncated": 1.0 if self.truncated else 0.0,
            "episode": float(self.episode),
            "step": float(self.step),
        }
        return [record[f] for f in REWARD_FIELDS]


@dataclass(frozen=True, slots=True)
class EpisodeSummary:
    """One finished episode (the ``reward/episode`` JSON)."""

    episode: int
    task: str
    success: bool
    steps: int
    episode_return: float
    success_source: str
    reward_scheme: str
    end: str  # "terminal" | "truncated" | "success" | "label" | "unterminated"
    samples: int  # status samples seen in this episode (fewer than steps if some were missed)

    def to_dict(self) -> dict[str, object]:
        return {
            "episode": self.episode,
            "task": self.task,
            "success": self.success,
            "steps": self.steps,
            "return": self.episode_return,
            "success_source": self.success_source,
            "reward_scheme": self.reward_scheme,
            "end": self.end,
            "samples": self.samples,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)


class SuccessSource(Protocol):
    """Decides whether the state after a step is a success."""

    name: str

    def success(self, sample: StatusSample, obs: np.ndarray | None, task: str) -> bool: ...

    def reset(self) -> None: ...


class ValueSource(Protocol):
    """Estimates the value (progress) of the state after a step; None when it cannot."""

    def value(self, sample: StatusSample, obs: np.ndarray | None, task: str) -> float | None: ...

    def reset(self) -> None: ...


class SimSuccess:
    """The simulator's own success flag (privileged; evaluation always uses it)."""

    name = "sim"

    def success(self, sample: StatusSample, obs: np.ndarray | None, task: str) -> bool:
        return sample.success

    def reset(self) -> None:
        pass


class HumanSuccess:
    """Success only from human labels (:meth:`EpisodeAccountant.label`); the robot's flag and
    every sample say "not yet"."""

    name = "human"

    def success(self, sample: StatusSample, obs: np.ndarray | None, task: str) -> bool:
        return False

    def reset(self) -> None:
        pass


class DetectorSuccess:
    """The learned success detector over the observation stream (fails closed).

    Each new observation slides the detector's window; success once it fired (``debounce``
    consecutive windows at/above its threshold; latched for the episode). At the last sample
    of an episode (the robot says terminal/truncated) the final window is also judged alone
    (probability >= threshold), since no later window can confirm it. Without an observation,
    or when the model refuses one (wrong size, unknown task), nothing new is decided: the
    latched state stands and the error is counted.
    """

    name = "detector"

    def __init__(self, detector: SuccessDetector) -> None:
        self.detector = detector
        detector.reset()  # a switch mid-episode starts from an empty window
        self.errors = 0
        self.last_error = ""
        self._task = ""

    def reset(self) -> None:
        self.detector.reset()

    def success(self, sample: StatusSample, obs: np.ndarray | None, task: str) -> bool:
        from vlarl.rewardmodels.errors import RewardModelError

        det = self.detector
        if obs is None:
            return det.fired
        try:
            if task and task != self._task:
                det.select_task(task)
                self._task = task
            fired = det.push(obs)
        except RewardModelError as exc:
            self.errors += 1
            self.last_error = str(exc)
            return det.fired
        if fired:
            return True
        return (sample.terminal or sample.truncated) and det.prob >= det.threshold


class ConstantValue:
    """A fixed value for every state (0.0 until a progress model is plugged in)."""

    def __init__(self, value: float = 0.0) -> None:
        self._value = float(value)

    def value(self, sample: StatusSample, obs: np.ndarray | None, task: str) -> float | None:
        return self._value

    def reset(self) -> None:
        pass


class ProgressValue:
    """The progress model's value estimate -d(o) of the newest observation (None without one)."""

    def __init__(self, model: ProgressModel) -> None:
        self.model = model
        model.reset()
        self.errors = 0
        self.last_error = ""
        self._task = ""

    def reset(self) -> None:
        self.model.reset()

    def value(self, sample: StatusSample, obs: np.ndarray | None, task: str) -> float | None:
        from vlarl.rewardmodels.errors import RewardModelError

        if obs is None:
            return None
        try:
            if task and task != self._task:
                self.model.select_task(task)
                self._task = task
            return -self.model.push(obs)
        except RewardModelError as exc:
            self.errors += 1
            self.last_error = str(exc)
            return None


def success_source_problem(name: str, *, detector: SuccessDetector | None = None) -> str | None:
    """Why ``name`` cannot be used as the success source now, or None if it can."""
    if name not in SUCCESS_SOURCES:
        return f"success_source must be one of {', '.join(SUCCESS_SOURCES)}, got {name!r}"
    if name == "detector" and detector is None:
        return (
            "success_source 'detector' needs a success detector: set detector_model to a "
            "model that loads (see the node's log for why the current one did not)"
        )
    return None


def make_success_source(name: str, *, detector: SuccessDetector | None = None) -> SuccessSource:
    """The success source called ``name``; raises :class:`SuccessSourceUnavailable` if refused."""
    problem = success_source_problem(name, detector=detector)
    if problem is not None:
        raise SuccessSourceUnavailable(problem)
    if name == "human":
        return HumanSuccess()
    if name == "detector":
        assert detector is not None
        return DetectorSuccess(detector)
    return SimSuccess()


class ObservationJoin:
    """Pairs status samples with the observation of the same stamp, in status order.

    Status samples wait (FIFO) for their observation. The head is released with its
    observation when it arrives; without one (None) when an observation newer than it has been
    seen (its own was lost), when it waited ``timeout_ns``, or at once when no observation has
    arrived within ``timeout_ns`` (the stream is off: nothing to wait for). Observations are
    kept by stamp (at most ``capacity``; the oldest go first).
    """

    def __init__(self, *, timeout_ns: int, capacity: int = 256) -> None:
        if timeout_ns < 0 or capacity < 1:
            raise ValueError("timeout_ns must be >= 0 and capacity >= 1")
        self.timeout_ns = int(timeout_ns)
        self.capacity = capacity
        self._obs: dict[int, np.ndarray] = {}
        self._pending: deque[tuple[int, int, object]] = deque()  # (stamp, arrival, item)
        self._newest_obs_stamp = -1
        self._last_obs_arrival: int | None = None
        self.unmatched = 0  # statuses released without an observation

    def __len__(self) -> int:
        return len(self._pending)

    def add_observation(self, stamp_ns: int, obs: np.ndarray, now_ns: int) -> None:
        self._last_obs_arrival = now_ns
        self._newest_obs_stamp = max(self._newest_obs_stamp, stamp_ns)
        self._obs[stamp_ns] = obs
        while len(self._obs) > self.capacity:
            del self._obs[next(iter(self._obs))]

    def add_status(self, stamp_ns: int, item: object, now_ns: int) -> None:
        self._pending.append((stamp_ns, now_ns, item))

    def stream_alive(self, now_ns: int) -> bool:
        last = self._last_obs_arrival
        return last is not None and now_ns - last <= self.timeout_ns

    def ready(self, now_ns: int) -> list[tuple[object, np.ndarray | None]]:
        """Released (item, observation or None) pairs, oldest first."""
        out: list[tuple[object, np.ndarray | None]] = []
        alive = self.stream_alive(now_ns)
        while self._pending:
            stamp, arrived, item = self._pending[0]
            obs = self._obs.pop(stamp, None)
            waiting = obs is None and alive and stamp >= self._newest_obs_stamp
            if waiting and now_ns - arrived < self.timeout_ns:
                break  # keep waiting for it
            self._pending.popleft()
            if obs is None:
                self.unmatched += 1
            else:  # observations older than this one can never be matched any more
                for old in [s for s in self._obs if s < stamp]:
                    del self._obs[old]
            out.append((item, obs))
        return out


@dataclass
class _Episode:
    number: int
    task: str
    last_step: int
    last_stamp: int | None = None
    samples: int = 0
    episode_return: float = 0.0
    succeeded: bool = False
    ended: bool = False
    pending_label: bool | None = None
    last_value: float | None = None


class EpisodeAccountant:
    """Turns status samples into reward outputs and once-per-episode summaries."""

    def __init__(
        self,
        *,
        scheme: str = "sparse",
        success_source: SuccessSource | None = None,
        value_source: ValueSource | None = None,
        terminate_on_success: bool = True,
        progress_weight: float = 0.01,
        success_weight: float = 1.0,
    ) -> None:
        if scheme not in REWARD_SCHEMES:
            raise ValueError(f"reward scheme must be one of {', '.join(REWARD_SCHEMES)}")
        self.scheme = scheme
        self.success_source: SuccessSource = success_source or SimSuccess()
        self.value_source: ValueSource = value_source or ConstantValue(0.0)
        self.terminate_on_success = terminate_on_success
        self.progress_weight = float(progress_weight)
        self.success_weight = float(success_weight)
        self._episode: _Episode | None = None
        self.dropped = 0  # duplicate / out-of-order samples
        self.episodes_finished = 0
        self.labels_applied = 0

    @property
    def episode(self) -> int | None:
        """Number of the episode in progress (None before the first sample or after its end)."""
        current = self._episode
        return None if current is None or current.ended else current.number

    def label(self, success: bool) -> int:
        """A human label for the episode in progress: it ends with this outcome at its next
        sample (or at :meth:`expire_label`). Returns the episode number; raises
        :class:`LabelRefused` when no episode is in progress."""
        current = self._episode
        if current is None:
            raise LabelRefused("no episode in progress: no robot status has been received")
        if current.ended:
            raise LabelRefused(
                f"episode {current.number} already ended; label an episode while it runs"
            )
        current.pending_label = bool(success)
        return current.number

    def expire_label(self) -> EpisodeSummary | None:
        """End the episode with its pending label now (no sample came to carry it)."""
        current = self._episode
        if current is None or current.ended or current.pending_label is None:
            return None
        current.succeeded = current.pending_label  # the return holds only published rewards
        self.labels_applied += 1
        return self._finish(current, "label")

    def update(
        self,
        sample: StatusSample,
        *,
        task: str = "",
        stamp_ns: int | None = None,
        obs: np.ndarray | None = None,
    ) -> tuple[RewardOutput | None, list[EpisodeSummary]]:
        """Account one sample: (reward output or None if dropped, summaries finished by it).

        ``stamp_ns`` (the status stamp) tells a re-sent sample (same stamp: dropped) from a new
        sample of the same step (a newer stamp, e.g. the extra ``truncated`` sample a reset
        publishes: accepted, reward 0). Only a sample whose step advanced earns reward; so does
        not a ``step == 0`` sample (the state after a reset). ``obs`` is the observation of the
        same stamp (the state after the step) for learned success/value sources.
        """
        finished: list[EpisodeSummary] = []
        current = self._episode
        if current is not None and sample.episode == current.number:
            last_stamp = current.last_stamp
            newer = stamp_ns is not None and last_stamp is not None
            if (
                stamp_ns is not None and last_stamp is not None and stamp_ns <= last_stamp
            ) or sample.step < current.last_step:
                self.dropped += 1
                return None, finished
            new_step = sample.step > current.last_step
            if not new_step and not newer:
                ends_now = (sample.terminal or sample.truncated) and not current.ended
                if not ends_now:  # a duplicate we cannot tell apart by stamp
                    self.dropped += 1
                    return None, finished
        else:
            if current is not None and not current.ended:
                if current.pending_label is not None:
                    done = self.expire_label()
                    if done is not None:
                        finished.append(done)
                else:
                    finished.append(self._finish(current, "unterminated"))
            current = self._episode = _Episode(number=sample.episode, task=task, last_step=0)
            new_step = sample.step > 0
            self.success_source.reset()
            self.value_source.reset()
        if task:
            current.task = task
        current.last_step = sample.step
        if stamp_ns is not None:
            current.last_stamp = stamp_ns

        if current.ended:  # samples after the end of an episode: nothing new is decided
            out = RewardOutput(
                reward=0.0,
                success=current.succeeded,
                value=current.last_value or 0.0,
                terminal=sample.terminal,
                truncated=sample.truncated,
                episode=sample.episode,
                step=sample.step,
            )
            return out, finished

        label = current.pending_label
        success_now = bool(self.success_source.success(sample, obs, current.task))
        if label is not None:
            success_now = label
        value_now = self.value_source.value(sample, obs, current.task)
        dense = 0.0
        if value_now is not None:
            if current.last_value is not None and new_step:
                dense = value_now - current.last_value  # = d(o_t) - d(o_t+1)
            current.last_value = value_now
        first_success = success_now and not current.succeeded
        if not new_step and label is None:  # no step was taken: no reward
            reward = 0.0
        elif self.scheme == "sparse":
            reward = 1.0 if first_success else 0.0
        elif self.scheme == "progress":
            reward = self.success_weight * float(first_success) + self.progress_weight * dense
        else:
            reward = float(sample.env_reward)
        terminal = sample.terminal or (self.terminate_on_success and success_now)
        truncated = sample.truncated
        if label is not None:
            terminal, truncated = label, not label
        value = float(current.last_value) if current.last_value is not None else 0.0

        current.samples += 1
        current.episode_return += reward
        current.succeeded = current.succeeded or success_now
        if terminal or truncated:
            if label is not None:
                end = "label"
                self.labels_applied += 1
            elif sample.terminal:
                end = "terminal"
            elif terminal:
                end = "success"
            else:
                end = "truncated"
            finished.append(self._finish(current, end))
        out = RewardOutput(
            reward=reward,
            success=success_now,
            value=value,
            terminal=terminal,
            truncated=truncated,
            episode=sample.episode,
            step=sample.step,
        )
        return out, finished

    def flush(self) -> EpisodeSummary | None:
        """End the open episode (shutdown); None if there is none."""
        current = self._episode
        if current is None or current.ended:
            return None
        if current.pending_label is not None:
            return self.expire_label()
        return self._finish(current, "unterminated")

    def _finish(self, episode: _Episode, end: str) -> EpisodeSummary:
        episode.ended = True
        self.episodes_finished += 1
        return EpisodeSummary(
            episode=episode.number,
            task=episode.task,
            success=episode.succeeded,
            steps=episode.last_step,
            episode_return=episode.episode_return,
            success_source=self.success_source.name,
            reward_scheme=self.scheme,
            end=end,
            samples=episode.samples,
        )
