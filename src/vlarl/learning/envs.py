"""Meta-World for learning: task sets, seeded episode starts, scripted experts.

Episodes start from a fixed seed: ``reset_episode(env, seed)`` draws the task's random start
(object and goal positions) from a generator seeded with ``seed``, so episode ``seed`` is the
same scene in every run, for every model. The environment is the one the robot node uses
(``gym.make('Meta-World/MT1', env_name=task, seed=...)``); only how the start is drawn differs.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from vlarl.learning.errors import LearningError

DEFAULT_TASK = "pick-place-v3"
MT10: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
TASK_SETS: dict[str, tuple[str, ...]] = {"mt10": MT10, "MT10": MT10}
OBS_DIM = 39
ACTION_DIM = 4
MAX_EPISODE_STEPS = 500
CONTROL_DT = 0.0125


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'mt10' -> the MT10 tasks; 'a,b' or a list -> those tasks (validated)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    tasks: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            for task in TASK_SETS.get(name, (name,)):
                if task not in tasks:
                    tasks.append(task)
    if not tasks:
        raise LearningError("no tasks given")
    known = known_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise LearningError(f"unknown Meta-World task(s): {', '.join(unknown)}")
    return tuple(tasks)


def known_tasks() -> set[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return set(ALL_V3_ENVIRONMENTS)


def make_env(task: str) -> Any:
    """A Meta-World v3 environment for ``task`` (no rendering, 500-step episodes)."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers the environments)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("Meta-World/MT1", env_name=task, seed=0)
        env.reset(seed=0)
    # We choose each episode's start ourselves (reset_episode), not from the 50 preset tasks.
    env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
    return env


def reset_episode(env: Any, seed: int) -> np.ndarray:
    """Reset to the start drawn from ``seed``; returns the first observation (float64, 39)."""
    raw = env.unwrapped
    raw._freeze_rand_vec = False
    raw.seeded_rand_vec = True
    raw.seed(int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs, _ = env.reset()
    return np.asarray(obs, dtype=np.float64)


def step_env(env: Any, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, bool]:
    """(next_obs, reward, terminal, truncated, success) for one clipped action."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs, reward, terminated, truncated, info = env.step(
            np.clip(action, -1.0, 1.0).astype(np.float32)
        )
    success = bool(info.get("success", 0.0) >= 1.0)
    return np.asarray(obs, np.float64), float(reward), bool(terminated), bool(truncated), success


def expert_for(task: str) -> Any:
    """The scripted expert policy of ``task`` (``.get_action(obs) -> action``)."""
    from metaworld.policies import ENV_POLICY_MAP

    try:
        policy_cls: Any = ENV_POLICY_MAP[task]
    except KeyError:
        raise LearningError(f"Meta-World has no scripted expert for {task!r}") from None
    return policy_cls()


def expert_action(expert: Any, obs: np.ndarray) -> np.ndarray:
    # A copy: some experts (door-open-v3) edit the observation they are given in place.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.clip(np.asarray(expert.get_action(obs.copy()), np.float64), -1.0, 1.0)
