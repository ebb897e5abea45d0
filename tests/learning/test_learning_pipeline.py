"""Smoke test: every learning verb end to end through the ``vlarl`` command line, tiny budget.

collect (two tasks, mixed noise) -> train-bc / train-teacher -> distill -> export (ONNX, checked
against PyTorch, loaded by the runtime's loader) -> evaluate (checkpoint and ONNX). Each run
folder must hold its config and metrics next to its checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlarl.cli import main
from vlarl.contract import ModelMetadata
from vlarl.data import load_replay

TASKS = "reach-v3,pick-place-v3"
NET = ["--hidden", "32", "--depth", "2", "--threads", "1", "--log-every", "10"]


def refused(argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The verb answers with one line naming ``reason`` and exit code 2 (no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(reason, err), err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    demos = root / "demos"
    assert (
        main(
            [
                "collect",
                "--out",
                str(demos),
                "--tasks",
                TASKS,
                "--episodes",
                "3",
                "--sigmas",
                "0,1",
                "--max-steps",
                "60",
                "--post-success-steps",
                "2",
            ]
        )
        == 0
    )
    paths = {"root": root, "demos": demos}
    for verb, name, ckpt in (("train-bc", "bc", "bc"), ("train-teacher", "teacher", "teacher")):
        assert (
            main(
                [
                    verb,
                    "--data",
                    str(demos),
                    "--out",
                    str(root / name),
                    "--train-steps",
                    "30",
                    "--chunk-length",
                    "4",
                    *NET,
                ]
            )
            == 0
        )
        paths[name] = root / name / f"{ckpt}.safetensors"
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(paths["teacher"]),
                "--data",
                str(demos),
                "--out",
                str(root / "student"),
                "--train-steps",
                "20",
                "--batch-size",
                "32",
                "--hidden",
                "16",
                "--threads",
                "1",
                "--log-every",
                "10",
            ]
        )
        == 0
    )
    paths["student"] = root / "student" / "student.safetensors"
    for name in ("student", "teacher"):
        onnx_path = root / f"{name}.onnx"
        assert (
            main(
                [
                    "export",
                    "--checkpoint",
                    str(paths[name]),
                    "--out",
                    str(onnx_path),
                    "--model-id",
                    f"smoke-{name}",
                    "--version",
                    "3",
                    "--check-samples",
                    "64",
                ]
            )
            == 0
        )
        paths[f"{name}_onnx"] = onnx_path
    return paths


def test_collect_writes_mixed_quality_replay(pipeline: dict[str, Path]) -> None:
    replay = load_replay(pipeline["demos"])
    assert replay.tasks == ("reach-v3", "pick-place-v3")
    assert set(replay.versions) == {"expert-sigma0@0", "expert-sigma1@0"}
    d = replay.data
    assert len(np.unique(d.episode)) == 6
    # The executed action is the clipped noisy one; base_action + residual reproduce it.
    np.testing.assert_allclose(d.base_action + d.residual, d.action, atol=1e-6)
    noisy = np.asarray(replay.versions)[d.policy_version] == "expert-sigma1@0"
    assert np.abs(d.residual[noisy]).mean() > 0.3 and np.abs(d.residual[~noisy]).max() == 0
    assert float(np.abs(d.action).max()) <= 1.0
    summary = json.loads((pipeline["demos"] / "metrics.json").read_text())
    assert summary["per_task"]["reach-v3"]["0"]["episodes"] == 2
    assert (pipeline["demos"] / "config.json").is_file()


def test_every_run_folder_has_config_and_metrics(pipeline: dict[str, Path]) -> None:
    for name in ("bc", "teacher", "student"):
        folder = pipeline[name].parent
        config = json.loads((folder / "config.json").read_text())
        assert config["config"]["out"] == str(folder)
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert len(lines) >= 2 and "step" in json.loads(lines[-1])
        assert json.loads((folder / "metrics.json").read_text())["sha256"]


def test_export_meets_the_contract(pipeline: dict[str, Path]) -> None:
    from vlarl.core.onnx_policy import OnnxPolicy

    for name, kind in (("student", "student"), ("teacher", "teacher")):
        path = pipeline[f"{name}_onnx"]
        model = onnx.load(str(path))
        meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
        assert (meta.model_id, meta.version, meta.kind) == (f"smoke-{name}", 3, kind)
        assert meta.tasks == ("reach-v3", "pick-place-v3") and meta.instr_dim == 384
        assert meta.chunk_length == 4 and meta.obs_dim == 39 and meta.action_dim == 4
        assert len(meta.normalization["obs_mean"]) == 39
        report = json.loads(path.with_suffix(".export.json").read_text())
        assert report["max_abs_err_vs_pytorch"] < 1e-4
        assert report["tensorrt"]["built"] or report["tensorrt"]["reason"]
        policy = OnnxPolicy.load(path, providers="cpu")
        chunk = policy.predict(np.zeros(39, np.float32), task="pick-place-v3")
        assert chunk.shape == (4, 4) and np.abs(chunk).max() <= 1.0


def test_export_with_start_noise_samples_repeatably(
    pipeline: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--start-noise: x_0 is drawn inside the graph; a new session repeats the same draws."""
    from vlarl.core.onnx_policy import OnnxPolicy

    for name in ("student", "teacher"):
        out = pipeline["root"] / f"{name}-sampling.onnx"
        args = ["export", "--checkpoint", str(pipeline[name]), "--out", str(out)]
        assert main([*args, "--start-noise", "0.5", "--tensorrt", "off"]) == 0
        report = json.loads(out.with_suffix(".export.json").read_text())
        assert report["max_abs_err_vs_pytorch"] < 1e-4  # the graph with the noise scaled to 0
        meta = OnnxPolicy.load(out, providers="cpu").metadata
        assert meta.start_noise == 0.5
        runs = []
        for _ in range(2):
            policy = OnnxPolicy.load(out, providers="cpu")
            obs = np.zeros(39, np.float32)
            runs.append([policy.predict(obs, task="reach-v3").copy() for _ in range(3)])
        assert not np.array_equal(runs[0][0], runs[0][1])  # each call draws a new start
        for a, b in zip(*runs, strict=True):
            np.testing.assert_array_equal(a, b)  # and a new session the same sequence
    refused(
        [*args[:-1], str(pipeline["root"] / "neg.onnx"), "--start-noise", "-1"],
        "start-noise",
        capsys,
    )


def test_export_refuses_to_overwrite(
    pipeline: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "export",
        "--checkpoint",
        str(pipeline["student"]),
        "--out",
        str(pipeline["student_onnx"]),
    ]
    refused(args, "exists", capsys)


def test_evaluate_checkpoint_and_onnx(pipeline: dict[str, Path]) -> None:
    root = pipeline["root"]
    out = root / "eval-student.json"
    assert (
        main(
            [
                "evaluate",
                "--policy",
                str(pipeline["student_onnx"]),
                "--tasks",
                "reach-v3",
                "--episodes",
                "2",
                "--max-steps",
                "15",
                "--replan-every",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    r = doc["tasks"]["reach-v3"]
    assert r["episodes"] == 2 and r["seeds"] == [1_000_000, 1_000_001]
    assert 0.0 <= r["ci_low"] <= r["success_rate"] <= r["ci_high"] <= 1.0
    assert doc["replan_every"] == 2 and doc["backend"] == "vlarl.core.onnx_policy"
    # The teacher checkpoint with fewer integration steps, in PyTorch.
    assert (
        main(
            [
                "evaluate",
                "--policy",
                str(pipeline["teacher"]),
                "--steps",
                "3",
                "--episodes",
                "2",
                "--max-steps",
                "10",
                "--parallel",
                "2",
            ]
        )
        == 0
    )
    default = pipeline["teacher"].parent / "eval-teacher-2tasks.json"
    assert set(json.loads(default.read_text())["tasks"]) == {"reach-v3", "pick-place-v3"}


def test_same_seeds_same_results(pipeline: dict[str, Path]) -> None:
    root = pipeline["root"]
    docs = []
    for i in range(2):
        out = root / f"repeat-{i}.json"
        main(
            [
                "evaluate",
                "--policy",
                str(pipeline["bc"]),
                "--tasks",
                "reach-v3",
                "--episodes",
                "2",
                "--max-steps",
                "40",
                "--out",
                str(out),
                "--parallel",
                "2",
            ]
        )
        docs.append(json.loads(out.read_text())["tasks"]["reach-v3"])
    assert docs[0]["per_episode"] == docs[1]["per_episode"]
    assert docs[0]["per_episode_return"] == docs[1]["per_episode_return"]
    assert docs[0]["per_episode_return"][0] != docs[0]["per_episode_return"][1]
    assert docs[0]["mean_length_success"] == docs[1]["mean_length_success"] or (
        np.isnan(docs[0]["mean_length_success"]) and np.isnan(docs[1]["mean_length_success"])
    )


def test_tampered_checkpoint_is_refused_by_every_verb(
    pipeline: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = pipeline["root"] / "bad.safetensors"
    raw = bytearray(pipeline["teacher"].read_bytes())
    raw[-3] ^= 0x10
    bad.write_bytes(bytes(raw))
    refused(["evaluate", "--policy", str(bad), "--episodes", "1"], "sha256 mismatch", capsys)
    out = str(pipeline["root"] / "x.onnx")
    refused(["export", "--checkpoint", str(bad), "--out", out], "sha256 mismatch", capsys)
    refused(
        [
            "distill",
            "--teacher",
            str(bad),
            "--data",
            str(pipeline["demos"]),
            "--out",
            str(pipeline["root"] / "s2"),
            "--train-steps",
            "1",
        ],
        "sha256 mismatch",
        capsys,
    )


def test_collect_refuses_an_existing_replay(
    pipeline: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    refused(
        ["collect", "--out", str(pipeline["demos"]), "--episodes", "1"],
        r"holds a finished collection|already holds",
        capsys,
    )
