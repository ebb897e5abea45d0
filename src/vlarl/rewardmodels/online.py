"""The learned reward in-process: detector + progress model stepped with an environment.

For an RL loop that steps Meta-World (or any robot) directly, without ROS::

    reward_model = LearnedReward.load(
        detector="models/pick-place-v3-success-detector.onnx",
        progress="models/pick-place-v3-progress.onnx",
        task="pick-place-v3",
    )
    obs, _ = env.reset(seed=0)
    value = reward_model.reset(obs)                   # o_0: fills the windows, no reward
    while True:
        obs, _, terminated, truncated, _ = env.step(action)
        r = reward_model.step(obs, last=terminated or truncated)
        # r.reward, r.success, r.value (= -d(o)), r.terminal (success ends the episode)
        if r.terminal or terminated or truncated:
            break

It is the reward node's decision, not a re-implementation: every call goes through the same
:class:`~vlarl.core.reward.EpisodeAccountant` with the same
:class:`~vlarl.core.reward.DetectorSuccess` (sliding window, the model's threshold (per task for
multi-task models) and debounce, latched; at the episode's last observation the final window
is also judged alone) and :class:`~vlarl.core.reward.ProgressValue` (value = -d(o)) the node
uses. The reward is the node's ``progress`` scheme with a progress model,
``success_weight * [first success] + progress_weight * (d(o_{t-1}) - d(o_t))``, and its
``sparse`` scheme without one. Defaults match ``config/reward.yaml``.

Unlike the node (which fails closed and counts the error), a bad observation here raises
:class:`~vlarl.rewardmodels.errors.RewardModelError`: in-process, a wrong shape is a bug in the
caller, not a lost message.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vlarl.core.reward import (
    ConstantValue,
    DetectorSuccess,
    EpisodeAccountant,
    ProgressValue,
    StatusSample,
)
from vlarl.rewardmodels.detector import SuccessDetector
from vlarl.rewardmodels.errors import RewardModelError
from vlarl.rewardmodels.progress import ProgressModel


class LearnedStep(NamedTuple):
    """What one step earned (unpacks as ``reward, success, value, terminal``)."""

    reward: float  # success_weight on the first success + progress_weight * (d_prev - d_now)
    success: bool  # the detector says the task is solved (latched for the episode)
    value: float  # -d(o): minus the predicted steps to success (0.0 without a progress model)
    terminal: bool  # the episode ends here on the reward's decision (success, with
    # terminate_on_success) or because ``last`` was passed


class LearnedReward:
    """Success detector + progress model as a per-step reward (see the module docstring)."""

    def __init__(
        self,
        detector: SuccessDetector,
        progress: ProgressModel | None = None,
        *,
        task: str | None = None,
        progress_weight: float = 0.01,
        success_weight: float = 1.0,
        terminate_on_success: bool = True,
    ) -> None:
        self.detector = detector
        self.progress = progress
        self.task = task or detector.metadata.tasks[0]
        self.select_task(self.task)  # refuses a task a model does not know
        self._accountant = EpisodeAccountant(
            scheme="progress" if progress is not None else "sparse",
            success_source=DetectorSuccess(detector),
            value_source=ProgressValue(progress) if progress is not None else ConstantValue(),
            terminate_on_success=terminate_on_success,
            progress_weight=progress_weight,
            success_weight=success_weight,
        )
        self._obs_dim = detector.metadata.obs_dim
        if progress is not None and progress.metadata.obs_dim != self._obs_dim:
            raise RewardModelError(
                f"detector reads {self._obs_dim} numbers per observation, progress model "
                f"{progress.metadata.obs_dim}"
            )
        self._episode = -1
        self._step = -1  # -1: reset() not called yet

    @classmethod
    def load(
        cls,
        *,
        detector: str | Path,
        progress: str | Path | None = None,
        task: str | None = None,
        threshold: float | None = None,
        debounce: int | None = None,
        progress_weight: float = 0.01,
        success_weight: float = 1.0,
        terminate_on_success: bool = True,
    ) -> LearnedReward:
        """Load and verify the model files (relative paths: cwd, then the package, as the
        nodes resolve them); ``threshold``/``debounce`` None = the model's own."""
        from vlarl.graph import resolve_model_path

        det = SuccessDetector.load(
            resolve_model_path(str(detector)), threshold=threshold, debounce=debounce
        )
        pm = None if progress is None else ProgressModel.load(resolve_model_path(str(progress)))
        return cls(
            det,
            pm,
            task=task,
            progress_weight=progress_weight,
            success_weight=success_weight,
            terminate_on_success=terminate_on_success,
        )

    def select_task(self, task: str) -> None:
        """The task of the next episodes (multi-task models); refuses an unknown one."""
        self.detector.select_task(task)
        if self.progress is not None:
            self.progress.select_task(task)
        self.task = task

    @property
    def threshold(self) -> float:
        return self.detector.threshold

    @property
    def debounce(self) -> int:
        return self.detector.debounce

    @property
    def prob(self) -> float:
        """The detector's probability for the newest window."""
        return self.detector.prob

    def _check(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        if obs.shape != (self._obs_dim,):
            raise RewardModelError(
                f"expected an observation of shape ({self._obs_dim},), got {obs.shape}"
            )
        if not math.isfinite(float(obs.sum())):
            raise RewardModelError("observation holds non-finite values")
        return obs

    def reset(self, obs: np.ndarray, *, task: str | None = None) -> float:
        """Start an episode at its first observation o_0 (no reward); returns its value."""
        obs = self._check(obs)
        if task is not None and task != self.task:
            self.select_task(task)
        self._episode += 1
        self._step = 0
        out, _ = self._accountant.update(
            StatusSample(self._episode, 0, False, False, False, 0.0), task=self.task, obs=obs
        )
        assert out is not None
        return out.value

    def step(self, obs: np.ndarray, *, last: bool = False) -> LearnedStep:
        """The observation after one more step; ``last``: the episode ends with it (the
        environment terminated or truncated), so its final window is also judged alone."""
        if self._step < 0:
            raise RewardModelError("call reset(first_observation) before step()")
        obs = self._check(obs)
        self._step += 1
        sample = StatusSample(self._episode, self._step, False, False, bool(last), 0.0)
        out, _ = self._accountant.update(sample, task=self.task, obs=obs)
        assert out is not None  # steps always advance
        return LearnedStep(out.reward, out.success, out.value, out.terminal or out.truncated)

    def __repr__(self) -> str:
        pm = self.progress.tag if self.progress is not None else None
        return f"LearnedReward({self.detector!r}, progress={pm}, task={self.task})"
