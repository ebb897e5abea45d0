"""Training smoke, ONNX round trip, metadata, refused files (tampered, corrupt, wrong kind)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from vlarl.rewardmodels.detector import DetectorConfig, SuccessDetector, train_detector
from vlarl.rewardmodels.errors import RewardModelError
from vlarl.rewardmodels.labels import Episode, relabel_rewards, windows_of
from vlarl.rewardmodels.modelfile import KIND_DETECTOR, load_model_file
from vlarl.rewardmodels.progress import ProgressModel, RewardMix


def test_detector_file_carries_its_metadata_and_matches_torch(tiny_models: Any) -> None:
    det = SuccessDetector.load(tiny_models.detector)
    meta = det.metadata
    assert (meta.kind, meta.model_id, meta.window, meta.obs_dim) == (
        KIND_DETECTOR,
        "tiny-success-detector",
        3,
        39,
    )
    assert meta.tasks == ("pick-place-v3",) and meta.instr_dim == 0
    assert 0.0 < det.threshold < 1.0 and det.debounce == 2
    assert meta.params["pre_steps"] == 1 and "WMPO" in meta.params["label_rule"]
    assert len(meta.normalization["obs_mean"]) == 39
    assert meta.normalization["points"] == [0, 4, 11, 36]
    ep = tiny_models.episodes[0]
    probs = det.probabilities(ep.obs, task="pick-place-v3")
    assert probs.shape == (ep.obs.shape[0],)
    assert np.all((probs >= 0) & (probs <= 1))
    # the sliding window at run time gives the same numbers as the whole-episode batch
    det.reset()
    pushed = []
    for o in ep.obs:
        det.push(o)
        pushed.append(det.prob)
    np.testing.assert_allclose(pushed, probs, atol=1e-5)
    # and so does the raw session on explicitly built windows
    raw = det.model.run(windows_of(ep.obs, 3), None)
    np.testing.assert_allclose(raw, probs, atol=1e-6)


def test_progress_file_and_runtime(tiny_models: Any) -> None:
    pm = ProgressModel.load(tiny_models.progress)
    assert pm.metadata.kind == "progress" and pm.metadata.window == 2
    ep = next(e for e in tiny_models.episodes if e.succeeded)
    d = pm.steps_to_go(ep.obs, task="pick-place-v3")
    assert d.shape == (ep.obs.shape[0],) and np.all(d >= 0) and np.all(d <= 500)
    pm.reset()
    pushed = [pm.push(o) for o in ep.obs]
    np.testing.assert_allclose(pushed, d, rtol=1e-4, atol=1e-3)
    assert ProgressModel.value_of(pushed[-1]) == -pushed[-1]


def test_refuses_tampered_corrupt_and_wrong_files(tiny_models: Any, tmp_path: Path) -> None:
    src = tiny_models.detector
    data = src.read_bytes()
    # tampered weights: change bytes inside the largest initializer; still valid ONNX
    model = onnx.load_model_from_string(data)
    biggest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    start = data.find(biggest.raw_data)
    assert start > 0
    tampered = bytearray(data)
    tampered[start + 8 : start + 12] = b"\x11\x22\x33\x44"
    bad = tmp_path / "tampered.onnx"
    bad.write_bytes(bytes(tampered))
    with pytest.raises(RewardModelError, match="modified or corrupted"):
        SuccessDetector.load(bad)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RewardModelError, match="ONNX"):
        SuccessDetector.load(truncated)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(RewardModelError, match="empty"):
        SuccessDetector.load(empty)
    with pytest.raises(RewardModelError, match="not found"):
        SuccessDetector.load(tmp_path / "missing.onnx")
    with pytest.raises(RewardModelError, match="is a progress model"):
        SuccessDetector.load(tiny_models.progress)
    with pytest.raises(RewardModelError, match="success-detector model, not a progress"):
        ProgressModel.load(src)
    # a model without the reward-model metadata (e.g. a policy) is not a reward model
    stripped = onnx.load_model_from_string(data)
    del stripped.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(stripped.SerializeToString())
    with pytest.raises(RewardModelError, match="not a vlarl reward model"):
        load_model_file(plain, kind=KIND_DETECTOR)
    # a valid copy still loads; threshold and debounce overrides are validated
    good = tmp_path / "copy.onnx"
    shutil.copy(src, good)
    assert SuccessDetector.load(good, threshold=0.7, debounce=4).debounce == 4
    with pytest.raises(RewardModelError, match="threshold"):
        SuccessDetector.load(good, threshold=1.5)
    with pytest.raises(RewardModelError, match="debounce"):
        SuccessDetector.load(good, debounce=0)


def test_training_refuses_data_that_cannot_train_a_detector() -> None:
    obs = np.zeros((5, 39), np.float32)
    failed = [Episode(i, "pick-place-v3", obs, None) for i in range(3)]
    with pytest.raises(RewardModelError, match="positives"):
        train_detector(failed, DetectorConfig(steps=1))
    two = [Episode(0, "pick-place-v3", obs, 2), Episode(1, "push-v3", obs, None)]
    with pytest.raises(RewardModelError, match="instruction embedding"):
        train_detector(two, DetectorConfig(steps=1))


def test_relabel_rewards_with_the_learned_models(tiny_models: Any, reward_replay: Path) -> None:
    from vlarl.data.replay import load_replay

    replay = load_replay(reward_replay)
    det = SuccessDetector.load(tiny_models.detector)
    pm = ProgressModel.load(tiny_models.progress)
    mix = RewardMix(progress_weight=0.01, success_weight=1.0)
    out = relabel_rewards(replay.data, task_names=replay.tasks, detector=det, progress=pm, mix=mix)
    for ep, rows in replay.data.episodes():
        obs = np.concatenate([replay.data.obs[rows[:1]], replay.data.next_obs[rows]])
        d = pm.steps_to_go(obs, task="pick-place-v3")
        first = det.detect(obs, task="pick-place-v3")
        if first is not None:
            first = max(first, 1)  # a fire at o_0 counts for the first transition
        assert out.detected_step[ep] == first
        sparse = np.zeros(rows.size)
        if first is not None:
            assert first >= 1
            sparse[first - 1] = 1.0
            assert out.data.success[rows][first - 1 :].all()
        np.testing.assert_allclose(
            out.data.reward[rows], sparse + 0.01 * (d[:-1] - d[1:]), atol=1e-5
        )
        np.testing.assert_allclose(out.value[rows], -d[1:], atol=1e-4)


def test_multi_task_detector_carries_instructions_and_per_task_thresholds(
    tiny_models: Any, tmp_path: Path
) -> None:
    """Two tasks (the real episodes, half of them named as a second task) with instruction
    vectors: the file carries the embeddings and a threshold per task; the runtime selects."""
    from dataclasses import replace

    from vlarl.rewardmodels.detector import export_detector

    eps = [
        replace(e, task="pick-place-v3" if i % 2 == 0 else "push-v3")
        for i, e in enumerate(tiny_models.episodes + tiny_models.episodes)
    ]
    rng = np.random.default_rng(0)
    instructions = {t: rng.normal(size=16).astype(np.float32) for t in ("pick-place-v3", "push-v3")}
    cfg = DetectorConfig(window=2, hidden=32, steps=40, batch=128, eval_every=20)
    trained = train_detector(eps, cfg, instructions=instructions)
    export_detector(trained, tmp_path / "mt.onnx", model_id="tiny-mt-detector")
    det = SuccessDetector.load(tmp_path / "mt.onnx")
    meta = det.metadata
    assert meta.instr_dim == 16 and set(meta.tasks) == {"pick-place-v3", "push-v3"}
    np.testing.assert_allclose(meta.instructions["push-v3"], instructions["push-v3"], rtol=1e-6)
    assert set(meta.params["task_thresholds"]) <= {"pick-place-v3", "push-v3"}
    for task in meta.tasks:
        det.select_task(task)
        assert det.threshold == det.threshold_for(task)
    ep = eps[0]
    a = det.probabilities(ep.obs, task="pick-place-v3")
    b = det.probabilities(ep.obs, task="push-v3")
    assert not np.allclose(a, b)  # the instruction is an input
    assert SuccessDetector.load(tmp_path / "mt.onnx", threshold=0.6).threshold_for("push-v3") == 0.6
    with pytest.raises(RewardModelError, match="does not know task"):
        det.probabilities(ep.obs, task="reach-v3")


def test_calibration_episodes_choose_the_threshold_but_do_not_train(tiny_models: Any) -> None:
    """Hard negatives given for calibration only: the threshold is chosen with them in view
    (copies of successes relabelled as failures make firing on them cost), and the report
    counts them apart from the validation share."""
    from dataclasses import replace

    eps = tiny_models.episodes
    fakes = [replace(e, episode=1000 + i, success_step=None) for i, e in enumerate(eps)]
    other = [replace(eps[0], task="push-v3")]  # a task the model does not know: skipped
    cfg = DetectorConfig(window=2, pre_steps=1, debounce=2, hidden=32, steps=40, batch=128,
                         eval_every=20)  # fmt: skip
    plain = train_detector(eps, cfg)
    hard = train_detector(eps, cfg, calibration=[*fakes, *other])
    assert hard.report["calibration_only_episodes"] == len(fakes)
    assert hard.report["val_episodes"] == plain.report["val_episodes"]
    calib = hard.report["calibration"]
    assert calib["val_episodes"] == plain.report["val_episodes"] + len(fakes)
    from vlarl.rewardmodels.detector import first_fire
    from vlarl.rewardmodels.nets import predict

    # they do not train: the same network (same seed, same data) scores the same windows
    w = windows_of(eps[0].obs, 2)
    np.testing.assert_allclose(predict(plain.head, w, None), predict(hard.head, w, None), atol=1e-6)
    # the reported false successes include every fake that fires at the chosen threshold
    fired = sum(
        first_fire(
            predict(hard.head, windows_of(e.obs, 2), None),
            threshold=hard.threshold,
            debounce=2,
        )
        is not None
        for e in fakes
    )
    assert calib["val_false_success_in_failed"] >= fired
