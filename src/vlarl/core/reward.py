"""Episode accounting: reward, success, episode boundaries and summaries from robot status.

ROS-free; the reward node feeds it one :class:`StatusSample` per ``robot/status`` message.

- **Success** comes from a pluggable :class:`SuccessSource`. Implemented: ``sim`` (the
  simulator's own flag, privileged, for development). ``human`` and ``detector`` are named but
  refused with a reason until they exist (:func:`make_success_source`).
- **Reward** scheme ``sparse`` (default): 1.0 on the first sample of an episode where the success
  source says success, else 0.0. ``env``: Meta-World's shaped reward as the simulator reports it.
- **Value** comes from a pluggable :class:`ValueSource` (0.0 until a progress model exists).
- **Boundaries**: an episode ends at the first sample with ``terminal`` or ``truncated`` (and,
  with ``terminate_on_success``, at the first success). A summary is produced once per episode.
  Missed samples are tolerated: a success seen late still counts once, and a new episode number
  ends the previous episode (``end = "unterminated"``) if its last samples were missed.
  Re-sent samples (same stamp) and out-of-order ones are dropped; a newer sample of the same
  step (sim_robot's extra ``truncated`` sample on a reset) ends the episode with reward 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from vlarl.topics import REWARD_FIELDS, ROBOT_STATUS_FIELDS

SUCCESS_SOURCES: tuple[str, ...] = ("sim", "human", "detector")
REWARD_SCHEMES: tuple[str, ...] = ("sparse", "env")

_UNAVAILABLE = {
    "human": "success_source 'human' is not implemented yet (human labels arrive with the "
    "labelling service in a later issue); use 'sim'",
    "detector": "success_source 'detector' is not implemented yet (the learned success detector "
    "arrives in a later issue); use 'sim'",
}


class SuccessSourceUnavailable(ValueError):
    """The requested success source is known but cannot be used (yet)."""


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
    end: str  # "terminal" | "truncated" | "success" | "unterminated"
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

    def success(self, sample: StatusSample) -> bool: ...


class ValueSource(Protocol):
    """Estimates the value (progress) of the state after a step."""

    def value(self, sample: StatusSample) -> float: ...


class SimSuccess:
    """The simulator's own success flag (privileged; evaluation always uses it)."""

    name = "sim"

    def success(self, sample: StatusSample) -> bool:
        return sample.success


class ConstantValue:
    """A fixed value for every state (0.0 until a progress model is plugged in)."""

    def __init__(self, value: float = 0.0) -> None:
        self._value = float(value)

    def value(self, sample: StatusSample) -> float:
        return self._value


def success_source_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as the success source, or None if it can."""
    if name not in SUCCESS_SOURCES:
        return f"success_source must be one of {', '.join(SUCCESS_SOURCES)}, got {name!r}"
    return _UNAVAILABLE.get(name)


def make_success_source(name: str) -> SuccessSource:
    """The success source called ``name``; raises :class:`SuccessSourceUnavailable` if refused."""
    problem = success_source_problem(name)
    if problem is not None:
        raise SuccessSourceUnavailable(problem)
    return SimSuccess()


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


class EpisodeAccountant:
    """Turns status samples into reward outputs and once-per-episode summaries."""

    def __init__(
        self,
        *,
        scheme: str = "sparse",
        success_source: SuccessSource | None = None,
        value_source: ValueSource | None = None,
        terminate_on_success: bool = True,
    ) -> None:
        if scheme not in REWARD_SCHEMES:
            raise ValueError(f"reward scheme must be one of {', '.join(REWARD_SCHEMES)}")
        self.scheme = scheme
        self.success_source: SuccessSource = success_source or SimSuccess()
        self.value_source: ValueSource = value_source or ConstantValue(0.0)
        self.terminate_on_success = terminate_on_success
        self._episode: _Episode | None = None
        self.dropped = 0  # duplicate / out-of-order samples
        self.episodes_finished = 0

    def update(
        self, sample: StatusSample, *, task: str = "", stamp_ns: int | None = None
    ) -> tuple[RewardOutput | None, list[EpisodeSummary]]:
        """Account one sample: (reward output or None if dropped, summaries finished by it).

        ``stamp_ns`` (the status stamp) tells a re-sent sample (same stamp: dropped) from a new
        sample of the same step (a newer stamp, e.g. the extra ``truncated`` sample a reset
        publishes: accepted, reward 0). Only a sample whose step advanced earns reward; so does
        not a ``step == 0`` sample (the state after a reset).
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
                finished.append(self._finish(current, "unterminated"))
            current = self._episode = _Episode(number=sample.episode, task=task, last_step=0)
            new_step = sample.step > 0
        if task:
            current.task = task
        current.last_step = sample.step
        if stamp_ns is not None:
            current.last_stamp = stamp_ns

        success_now = bool(self.success_source.success(sample))
        first_success = success_now and not current.succeeded
        if not new_step or current.ended:  # no step was taken / the episode is over: no reward
            reward = 0.0
        elif self.scheme == "sparse":
            reward = 1.0 if first_success else 0.0
        else:
            reward = float(sample.env_reward)
        terminal = sample.terminal or (self.terminate_on_success and success_now)
        truncated = sample.truncated
        value = float(self.value_source.value(sample))

        if not current.ended:
            current.samples += 1
            current.episode_return += reward
            current.succeeded = current.succeeded or success_now
            if terminal or truncated:
                if sample.terminal:
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
