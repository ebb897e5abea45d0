"""A Meta-World v3 task as a robot: reset, step, state, joints, success, episode bookkeeping.

:class:`MetaWorldRobot` wraps ``gymnasium.make('Meta-World/MT1', env_name=TASK, seed=SEED)``.
The seed fixes the benchmark's 50 object/goal layouts of the task; episode ``k`` is reset with a
seed derived from ``(seed, k)`` alone, so episode ``k`` starts the same however the episodes
before it went. Episodes end on success (``end_on_success``: terminal) or after
``max_episode_steps`` steps (truncated); the robot then refuses to step until ``reset()``.

ROS-free; the ``sim_robot`` node is a thin adapter over this class.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from vlarl.sim.errors import EpisodeOverError, InvalidActionError, UnknownTaskError
from vlarl.sim.layout import (
    ACTION_DIM,
    DEFAULT_TASK,
    JOINT_NAMES,
    MAX_EPISODE_STEPS,
    STATE_DIM,
)
from vlarl.sim.render import SimSnapshot

# Actions a hair outside [-1, 1] (float round-off) are clipped; anything further is refused.
ACTION_TOLERANCE = 1e-6


@functools.cache
def task_names() -> tuple[str, ...]:
    """Meta-World's v3 task names, sorted."""
    import metaworld

    return tuple(sorted(metaworld.ALL_V3_ENVIRONMENTS))


def check_task(name: str) -> str | None:
    """Why ``name`` is not a Meta-World v3 task (with close matches), or None if it is."""
    if name in task_names():
        return None
    close = difflib.get_close_matches(name, task_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown Meta-World task {name!r}{hint} ({len(task_names())} tasks, e.g. reach-v3)"


def episode_seed(seed: int, episode: int) -> int:
    """The reset seed of episode ``episode`` under base seed ``seed`` (a 32-bit integer)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, episode]).generate_state(1)[0])


@dataclass(slots=True)
class StepResult:
    """What one ``step()`` did."""

    reward: float  # Meta-World's shaped reward of this step (0..10)
    success: bool  # the simulator's success flag after this step
    terminal: bool  # the episode ended because of success (and end_on_success)
    truncated: bool  # the episode ended because it reached max_episode_steps
    episode: int  # episode index (0-based, counts every reset)
    step: int  # steps taken in this episode, this one included


class MetaWorldRobot:
    """One Meta-World v3 task, stepped like a robot at ``dt`` = 0.0125 s per step."""

    def __init__(
        self,
        task: str = DEFAULT_TASK,
        *,
        seed: int = 0,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        end_on_success: bool = True,
        first_episode: int = 0,
        action_offset: Any = None,
    ) -> None:
        reason = check_task(task)
        if reason is not None:
            raise UnknownTaskError(reason)
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        import gymnasium as gym
        import metaworld  # noqa: F401 - registers the Meta-World/* environments

        self._task = task
        self._seed = int(seed)
        self.max_episode_steps = int(max_episode_steps)
        self.end_on_success = bool(end_on_success)
        self._env: Any = gym.make(
            "Meta-World/MT1", env_name=task, seed=self._seed, disable_env_checker=True
        )
        self._unwrapped: Any = cast(Any, self._env.unwrapped)
        # Episode length is ours to enforce (max_episode_steps may change between steps).
        self._unwrapped.max_path_length = 1 << 62
        model = self._unwrapped.model
        import mujoco

        joint_ids = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, n) for n in JOINT_NAMES]
        if min(joint_ids) < 0:
            missing = [n for n, i in zip(JOINT_NAMES, joint_ids, strict=True) if i < 0]
            raise RuntimeError(f"Meta-World model lacks joints {missing}")
        self._qpos_index = np.asarray(model.jnt_qposadr[joint_ids], dtype=np.intp)
        self._qvel_index = np.asarray(model.jnt_dofadr[joint_ids], dtype=np.intp)
        self._camera_names = tuple(
            mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)
        )
        self._dt = float(self._unwrapped.dt)
        self._action = np.zeros(ACTION_DIM, dtype=np.float64)
        self._last_action = np.zeros(ACTION_DIM, dtype=np.float64)
        self._applied = np.zeros(ACTION_DIM, dtype=np.float64)
        self._offset = np.zeros(ACTION_DIM, dtype=np.float64)
        self.set_action_offset(action_offset)
        self._state = np.zeros(STATE_DIM, dtype=np.float64)
        self._episode = int(first_episode) - 1
        self._step = 0
        self._total_steps = 0
        self._reward = 0.0
        self._success = False
        self._terminal = False
        self._truncated = False
        self.reset()

    # ------------------------------------------------------------------ episode control
    def reset(self, *, episode: int | None = None) -> np.ndarray:
        """Start the next episode (or episode ``episode``); returns its initial state."""
        self._episode = self._episode + 1 if episode is None else int(episode)
        ep_seed = episode_seed(self._seed, self._episode)
        # The task wrapper draws the layout from the env's generator *before* reseeding it, so
        # seed it first: the layout and everything after depend on (seed, episode) alone.
        self._unwrapped.seed(ep_seed)
        obs, _info = self._env.reset(seed=ep_seed)
        self._set_state(obs)
        self._step = 0
        self._reward = 0.0
        self._success = False
        self._terminal = False
        self._truncated = False
        self._last_action[:] = 0.0
        self._last_action[3] = -1.0  # Meta-World resets with the gripper open
        return self._state

    def step(self, action: np.ndarray | Any) -> StepResult:
        """Apply one action (delta xyz + gripper in [-1, 1]) for one control step.

        Raises :class:`InvalidActionError` (nothing is applied) for a wrong shape, a non-finite
        number or a value outside [-1, 1]; :class:`EpisodeOverError` once the episode ended.
        """
        action_arr = self.validate_action(action, out=self._action)
        if self._terminal or self._truncated:
            how = "terminal" if self._terminal else "truncated"
            raise EpisodeOverError(
                f"episode {self._episode} ended ({how}) at step {self._step}; call reset()"
            )
        applied = action_arr
        if self._offset_active:
            # The miscalibrated actuator: it executes command + offset (within its range).
            applied = np.clip(action_arr + self._offset, -1.0, 1.0, out=self._applied)
        obs, reward, _terminated, _truncated, info = self._env.step(applied)
        self._set_state(obs)
        self._last_action[:] = action_arr
        self._step += 1
        self._total_steps += 1
        self._reward = float(reward)
        self._success = bool(info.get("success", 0.0) >= 1.0)
        self._terminal = self._success and self.end_on_success
        self._truncated = (not self._terminal) and self._step >= self.max_episode_steps
        return StepResult(
            reward=self._reward,
            success=self._success,
            terminal=self._terminal,
            truncated=self._truncated,
            episode=self._episode,
            step=self._step,
        )

    def set_action_offset(self, offset: Any) -> None:
        """A deployment shift: every command is executed as ``clip(command + offset)``.

        It stands in for a miscalibrated robot (a drifting end-effector frame, a biased
        gripper): the command topic and the recorded bag still show the commanded action, as on
        hardware, so a learner must discover the shift from its effects. ``None`` = no shift.
        """
        if offset is None:
            self._offset[:] = 0.0
        else:
            arr = np.asarray(offset, dtype=np.float64)
            if arr.shape != (ACTION_DIM,) or not np.isfinite(arr).all():
                raise ValueError(
                    f"action_offset must be {ACTION_DIM} finite numbers, got {offset!r}"
                )
            if np.abs(arr).max() > 1.0:
                raise ValueError("action_offset entries must lie in [-1, 1]")
            self._offset[:] = arr
        self._offset_active = bool(np.any(self._offset != 0.0))

    @property
    def action_offset(self) -> np.ndarray:
        return self._offset.copy()

    @staticmethod
    def validate_action(action: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """``action`` as a float64 [4] array in [-1, 1], or :class:`InvalidActionError`."""
        try:
            arr = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidActionError(f"action is not a numeric vector: {exc}") from None
        if arr.shape != (ACTION_DIM,):
            raise InvalidActionError(
                f"action must have shape ({ACTION_DIM},) (dx, dy, dz, gripper), got {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise InvalidActionError(f"action has non-finite values: {arr.tolist()}")
        peak = float(np.abs(arr).max())
        if peak > 1.0 + ACTION_TOLERANCE:
            raise InvalidActionError(f"action outside [-1, 1] (max |a| = {peak:.6g}): {arr}")
        if out is None:
            out = np.empty(ACTION_DIM, dtype=np.float64)
        np.clip(arr, -1.0, 1.0, out=out)
        return out

    def hold_action(self, out: np.ndarray | None = None) -> np.ndarray:
        """The action that keeps the arm still: zero xyz, the last gripper command."""
        if out is None:
            out = np.zeros(ACTION_DIM, dtype=np.float64)
        out[:3] = 0.0
        out[3] = self._last_action[3]
        return out

    def _set_state(self, obs: np.ndarray) -> None:
        if obs.shape != (STATE_DIM,):
            raise RuntimeError(f"Meta-World returned a state of shape {obs.shape}")
        self._state[:] = obs

    # ------------------------------------------------------------------ read-outs
    @property
    def task(self) -> str:
        return self._task

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def dt(self) -> float:
        """Simulated seconds per step (0.0125 s for Meta-World v3)."""
        return self._dt

    @property
    def episode(self) -> int:
        return self._episode

    @property
    def step_count(self) -> int:
        """Steps taken in the current episode."""
        return self._step

    @property
    def total_steps(self) -> int:
        """Steps taken since construction, over all episodes."""
        return self._total_steps

    @property
    def state(self) -> np.ndarray:
        """The 39-d state (see :mod:`vlarl.sim.layout`); updated in place by step/reset."""
        return self._state

    @property
    def reward(self) -> float:
        return self._reward

    @property
    def success(self) -> bool:
        return self._success

    @property
    def terminal(self) -> bool:
        return self._terminal

    @property
    def truncated(self) -> bool:
        return self._truncated

    @property
    def done(self) -> bool:
        return self._terminal or self._truncated

    @property
    def last_action(self) -> np.ndarray:
        return self._last_action

    @property
    def camera_names(self) -> tuple[str, ...]:
        return self._camera_names

    @property
    def model(self) -> Any:
        """The MuJoCo model (shared with renderers; treat as read-only)."""
        return self._unwrapped.model

    @property
    def data(self) -> Any:
        return self._unwrapped.data

    def joint_positions(self, out: np.ndarray | None = None) -> np.ndarray:
        """Positions of right_j0..right_j6, r_close, l_close (rad, m)."""
        return np.take(self._unwrapped.data.qpos, self._qpos_index, out=out)

    def joint_velocities(self, out: np.ndarray | None = None) -> np.ndarray:
        """Velocities of right_j0..right_j6, r_close, l_close (rad/s, m/s)."""
        return np.take(self._unwrapped.data.qvel, self._qvel_index, out=out)

    def status_values(self, out: np.ndarray | None = None) -> np.ndarray:
        """episode, step, success, terminal, truncated, env_reward (ROBOT_STATUS_FIELDS order)."""
        if out is None:
            out = np.empty(6, dtype=np.float64)
        out[0] = self._episode
        out[1] = self._step
        out[2] = 1.0 if self._success else 0.0
        out[3] = 1.0 if self._terminal else 0.0
        out[4] = 1.0 if self._truncated else 0.0
        out[5] = self._reward if math.isfinite(self._reward) else 0.0
        return out

    def snapshot(self, *, stamp_ns: int = 0) -> SimSnapshot:
        """A copy of what rendering needs, safe to hand to another thread."""
        return SimSnapshot.of(self._unwrapped.model, self._unwrapped.data, stamp_ns=stamp_ns)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> MetaWorldRobot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
