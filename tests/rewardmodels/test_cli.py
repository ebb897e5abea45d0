"""The reward-model verbs of the ``vlarl`` command line, end to end on real episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlarl.cli import main
from vlarl.rewardmodels.detector import SuccessDetector
from vlarl.rewardmodels.progress import ProgressModel


def test_train_and_evaluate_verbs(reward_replay: Path, tmp_path: Path) -> None:
    det = tmp_path / "det.onnx"
    prog = tmp_path / "prog.onnx"
    tiny = ["--steps", "30", "--batch", "64", "--hidden", "32"]
    cal = ["--calibration", str(reward_replay), "--rings", "auto"]
    assert (
        main(["train-detector", "--data", str(reward_replay), "--out", str(det), *tiny, *cal]) == 0
    )
    assert main(["train-progress", "--data", str(reward_replay), "--out", str(prog), *tiny]) == 0
    assert SuccessDetector.load(det).metadata.model_id == "pick-place-v3-success-detector"
    assert ProgressModel.load(prog).metadata.model_id == "pick-place-v3-progress"
    report = json.loads((tmp_path / "det.train.json").read_text())
    assert report["episodes"]["pick-place-v3"]["episodes"] == 6
    assert report["report"]["calibration_only_episodes"] == 6
    assert report["calibration_episodes"]["pick-place-v3"]["episodes"] == 6
    assert len(SuccessDetector.load(det).metadata.normalization["rings"]) == 23
    out = tmp_path / "eval"
    args = ["eval-reward", "--data", str(reward_replay), "--detector", str(det)]
    assert main([*args, "--progress", str(prog), "--out", str(out)]) == 0
    doc = json.loads((out / "reward_eval.json").read_text())
    assert doc["detector"]["episodes"] == 6 and 0.0 <= doc["detector"]["accuracy"] <= 1.0
    assert "progress_corr" in doc["progress"]
    assert (out / "detector.png").stat().st_size > 0 and (out / "progress.png").is_file()
    # refusals: an existing model without --overwrite, a wrong suffix, missing data
    assert main(["train-detector", "--data", str(reward_replay), "--out", str(det)]) == 2
    assert main(["train-progress", "--data", str(reward_replay), "--out", "x.txt"]) == 2
    assert main(["eval-reward", "--data", str(tmp_path / "none"), "--detector", str(det)]) == 2
    assert main(["eval-reward", "--data", str(reward_replay)]) == 2  # nothing to evaluate


def test_collect_reward_refuses_a_used_directory(
    reward_replay: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["collect-reward", "--out", str(reward_replay), "--episodes", "1"]) == 2
    assert "already holds replay shards" in capsys.readouterr().err
