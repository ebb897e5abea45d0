"""Real Meta-World episodes (noisy experts + near-misses) and tiny trained reward models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from vlarl.rewardmodels.labels import Episode


@dataclass
class TinyModels:
    detector: Path
    progress: Path
    episodes: list[Episode]


@pytest.fixture(scope="session")
def reward_replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replay directory: 4 scripted-expert and 2 near-miss pick-place-v3 episodes."""
    from vlarl.rewardmodels.episodes import RewardDataConfig, collect_reward_data

    out = tmp_path_factory.mktemp("reward") / "replay"
    collect_reward_data(
        RewardDataConfig(
            out=str(out),
            tasks="pick-place-v3",
            episodes=4,
            sigmas="0,0.1",
            near_misses=2,
            near_miss_sigmas="0",
            seed=7,
            post_success_steps=5,
        ),
        quiet=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_models(reward_replay: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """A detector and a progress model trained for a few dozen steps on ``reward_replay``."""
    from vlarl.rewardmodels.detector import DetectorConfig, export_detector, train_detector
    from vlarl.rewardmodels.labels import load_episodes
    from vlarl.rewardmodels.progress import ProgressConfig, export_progress, train_progress

    episodes = load_episodes(reward_replay)
    folder = tmp_path_factory.mktemp("models")
    det = train_detector(
        episodes,
        DetectorConfig(
            window=3, pre_steps=1, debounce=2, hidden=32, steps=60, batch=128, eval_every=30
        ),
    )
    export_detector(det, folder / "det.onnx", model_id="tiny-success-detector")
    prog = train_progress(
        episodes, ProgressConfig(window=2, hidden=32, steps=60, batch=128, eval_every=30)
    )
    export_progress(prog, folder / "prog.onnx", model_id="tiny-progress")
    return TinyModels(folder / "det.onnx", folder / "prog.onnx", episodes)
