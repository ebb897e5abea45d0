"""Distill-back end to end on a tiny teacher/student and tiny data: the teacher's loss falls, the
new base exports, loads in the policy node's loader with its lineage, and the gate's verdict can
be rewritten into it (new digest, everything else kept)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_factory import Spec, make_policy
from vlarl.cli import main
from vlarl.contract import ContractError, ModelMetadata
from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.data.replay import ReplayWriter, load_replay
from vlarl.learning import distill, envs, teacher
from vlarl.learning.checkpoint import load_checkpoint
from vlarl.learning.collect import CollectConfig, collect, run_episode
from vlarl.learning.distill_back import (
    DistillBackConfig,
    DistillBackResult,
    distill_back,
    lineage_of,
    replay_digest,
    set_gate_verdict,
    student_from_onnx,
    teacher_from_student,
)
from vlarl.learning.errors import LearningError

TASK = "pick-place-v3"
COLLECTED_BY = "tiny-student@1+residual@3"


def tiny_config(tmp: Path, **overrides: object) -> DistillBackConfig:
    values: dict[str, object] = {
        "teacher": str(tmp / "teacher" / "teacher.safetensors"),
        "student": str(tmp / "student" / "student.safetensors"),
        "finetune_steps": 60,
        "finetune_lr": 1e-3,
        "distill_steps": 60,
        "distill_lr": 3e-3,
        "batch_size": 32,
        "warmup": 5,
        "log_every": 10,
        "check_samples": 32,
        "tensorrt": "off",
    }
    values.update(overrides)
    return DistillBackConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DistillBackResult]:
    root = tmp_path_factory.mktemp("distill_back")
    collect(
        CollectConfig(
            out=str(root / "demos"),
            tasks=TASK,
            episodes=3,
            sigmas="0,1",
            max_steps=60,
            post_success_steps=2,
        )
    )
    # RL data as the residual writes it: one successful and one failed episode.
    env, expert = envs.make_env(TASK), envs.expert_for(TASK)
    with ReplayWriter(root / "rl", source="rl:test", tasks=[TASK]) as writer:
        for seed, steps in ((50, 150), (51, 20)):
            data, _ = run_episode(
                env,
                expert,
                seed=seed,
                sigma=0.0,
                rng=np.random.default_rng(seed),
                max_steps=steps,
                post_success_steps=2,
            )
            writer.add_episode(data, task=TASK, version=COLLECTED_BY)
    env.close()
    teacher.train(
        teacher.TeacherConfig(
            data=str(root / "demos"),
            out=str(root / "teacher"),
            instructions=False,
            chunk_length=4,
            hidden=32,
            depth=2,
            train_steps=20,
            batch_size=32,
            log_every=10,
        )
    )
    distill.train(
        distill.DistillConfig(
            teacher=str(root / "teacher" / "teacher.safetensors"),
            data=str(root / "demos"),
            out=str(root / "student"),
            hidden=16,
            train_steps=20,
            batch_size=32,
            log_every=10,
        )
    )
    result = distill_back(
        tiny_config(root),
        demos=[root / "demos"],
        rl_data=[root / "rl"],
        out=root / "round1",
        parent="tiny-student@1",
        collected_by=COLLECTED_BY,
        version=2,
        model_id="tiny-student",
    )
    return root, result


def test_distill_back_fine_tunes_exports_and_keeps_lineage(
    tiny: tuple[Path, DistillBackResult],
) -> None:
    root, result = tiny
    assert result.losses["finetune_final"] < result.losses["finetune_first"]
    assert result.losses["anchor_final"] < result.losses["anchor_first"]
    assert result.max_abs_err_vs_pytorch <= 1e-4
    assert result.sha256 == hashlib.sha256(result.onnx.read_bytes()).hexdigest()
    policy = OnnxPolicy.load(result.onnx, providers="cpu", intra_op_threads=1)
    assert policy.tag == "tiny-student@2"
    lineage = policy.metadata.lineage
    assert lineage == result.metadata.lineage
    assert lineage["parent"] == "tiny-student@1"
    assert lineage["collected_by"] == COLLECTED_BY
    assert lineage["gate"] == {"verdict": "pending"}
    demos, rl = load_replay(root / "demos"), load_replay(root / "rl")
    assert [d["sha256"] for d in lineage["data"]["demos"]] == [replay_digest(demos, root / "demos")]
    assert [d["sha256"] for d in lineage["data"]["rl"]] == [replay_digest(rl, root / "rl")]
    assert lineage["data"]["rl"][0]["rows"] == len(rl)
    ckpts = lineage["checkpoints"]
    assert ckpts["student"] != ckpts["parent_student"]
    assert ckpts["teacher"] != ckpts["parent_teacher"]
    # The new base acts: finite chunks of the contract's shape.
    chunk = policy.predict(np.zeros(39, np.float32), task=TASK)
    assert chunk.shape == (4, 4) and np.isfinite(chunk).all()


def test_data_digest_names_the_data(tiny: tuple[Path, DistillBackResult], tmp_path: Path) -> None:
    root, _ = tiny
    copy = tmp_path / "rl"
    shutil.copytree(root / "rl", copy)
    assert replay_digest(load_replay(copy), copy) == replay_digest(
        load_replay(root / "rl"), root / "rl"
    )
    with ReplayWriter(copy, source="rl:test", tasks=[TASK]) as writer:
        data = load_replay(root / "rl").data
        writer.add_episode(data.select(data.episode == 0), task=TASK, version=COLLECTED_BY)
    assert replay_digest(load_replay(copy), copy) != replay_digest(
        load_replay(root / "rl"), root / "rl"
    )


def test_gate_verdict_rewrite_changes_digest_and_keeps_the_rest(
    tiny: tuple[Path, DistillBackResult], tmp_path: Path
) -> None:
    _, result = tiny
    path = tmp_path / "base.onnx"
    shutil.copy(result.onnx, path)
    before = onnx.load_model(str(path))
    digest = set_gate_verdict(path, "promoted", successes=18, episodes=20)
    assert digest != result.sha256
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    after = onnx.load_model(str(path))
    assert after.graph.SerializeToString() == before.graph.SerializeToString()
    old = {p.key: p.value for p in before.metadata_props}
    new = {p.key: p.value for p in after.metadata_props}
    assert {k: v for k, v in new.items() if k != "vlarl.lineage"} == {
        k: v for k, v in old.items() if k != "vlarl.lineage"
    }
    lineage = lineage_of(path)
    assert lineage["gate"] == {"verdict": "promoted", "successes": 18, "episodes": 20}
    assert {k: v for k, v in lineage.items() if k != "gate"} == {
        k: v for k, v in result.metadata.lineage.items() if k != "gate"
    }
    loaded = OnnxPolicy.load(path, providers="cpu", intra_op_threads=1)
    assert loaded.metadata.lineage == lineage
    with pytest.raises(LearningError, match="verdict must be one of"):
        set_gate_verdict(path, "maybe")


def test_gate_verdict_refuses_a_model_without_lineage(tmp_path: Path) -> None:
    path = make_policy(Spec()).save(tmp_path / "plain.onnx")
    original = path.read_bytes()
    with pytest.raises(LearningError, match="no lineage"):
        set_gate_verdict(path, "promoted")
    assert path.read_bytes() == original


def test_lineage_metadata_round_trip_and_refusal() -> None:
    meta = make_policy(Spec()).metadata
    assert "vlarl.lineage" not in meta.to_props()  # models from scratch are unchanged
    with_lineage = ModelMetadata.from_props(
        {**meta.to_props(), "vlarl.lineage": json.dumps({"parent": "a@1"})}
    )
    assert with_lineage.lineage == {"parent": "a@1"}
    assert ModelMetadata.from_props(with_lineage.to_props()) == with_lineage
    with pytest.raises(ContractError, match="lineage must be a JSON object"):
        ModelMetadata.from_props({**meta.to_props(), "vlarl.lineage": "[1, 2]"})


def test_cli_refuses_bad_input_in_one_line(
    tiny: tuple[Path, DistillBackResult], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = tiny

    def argv(parent: str, *extra: str) -> list[str]:
        return [
            "distill-back",
            "--rl-data",
            str(root / "rl"),
            "--demos",
            str(root / "demos"),
            "--out",
            str(root / "cli"),
            "--parent",
            parent,
            "--collected-by",
            COLLECTED_BY,
            "--teacher",
            str(root / "teacher" / "teacher.safetensors"),
            "--student",
            str(root / "student" / "student.safetensors"),
            *extra,
        ]

    assert main(argv("tiny-student@1", "--rl-fraction", "1.5")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--rl-fraction must be in [0, 1]" in err
    assert main(argv("no-version")) == 2
    assert "model_id@version" in capsys.readouterr().err
    assert not (root / "cli").exists()


def test_student_from_onnx_recovers_the_exported_checkpoint(
    tiny: tuple[Path, DistillBackResult], tmp_path: Path
) -> None:
    _, result = tiny
    digest = student_from_onnx(result.onnx, tmp_path / "student.safetensors")
    assert digest == result.metadata.lineage["checkpoints"]["student"]
    teacher_digest = teacher_from_student(
        load_checkpoint(tmp_path / "student.safetensors"),
        [tiny[0] / "demos"],
        tmp_path / "teacher" / "teacher.safetensors",
        tiny_config(tiny[0], finetune_steps=10),
    )
    teacher_ckpt = load_checkpoint(tmp_path / "teacher" / "teacher.safetensors")
    assert teacher_ckpt.spec.kind == "teacher" and teacher_ckpt.sha256 == teacher_digest
    assert teacher_ckpt.parent == digest
