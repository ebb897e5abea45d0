"""The command line: every verb answers a bad input with one line and exit code 2.

Verbs run in this process through :func:`vlarl.cli.main` (imports are shared, so the whole table
takes seconds); one case runs the real console entry point in a child process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlarl.cli import VERBS, main
from vlarl.graph import package_root
from vlarl.rosenv import child_env

MODEL = package_root() / "models" / "pick-place-v3-student.onnx"
needs_model = pytest.mark.skipif(not MODEL.exists(), reason="default model not built")


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """verb -> (arguments, a word the one-line reason must contain)."""
    missing = str(tmp / "missing")
    return {
        "bringup": (["--task", "nope-v3"], "unknown Meta-World task"),
        "topics": (["--bogus"], "unrecognized arguments"),
        "bridge": ([missing, "--replay", str(tmp / "replay")], "no bag"),
        "collect": (["--tasks", "nope-v3", "--out", str(tmp / "c")], "unknown Meta-World task"),
        "train-bc": (["--data", missing, "--out", str(tmp / "bc")], "not a replay directory"),
        "train-teacher": (["--data", missing, "--out", str(tmp / "t")], "not a replay directory"),
        "distill": (
            ["--teacher", missing + ".safetensors", "--data", missing, "--out", str(tmp / "d")],
            "cannot read checkpoint",
        ),
        "export": (
            ["--checkpoint", missing + ".safetensors", "--out", str(tmp / "x.onnx")],
            "cannot read checkpoint",
        ),
        "evaluate": (["--policy", missing + ".onnx"], "not found"),
        "collect-reward": (["--tasks", "nope-v3", "--out", str(tmp / "cr")], "unknown"),
        "train-detector": (["--data", missing, "--out", str(tmp / "d.onnx")], "not a replay"),
        "train-progress": (["--data", missing, "--out", str(tmp / "p.onnx")], "not a replay"),
        "train-residual": (["--task", "nope-v3", "--out", str(tmp / "res")], "unknown"),
        "eval-reward": (["--data", missing, "--detector", missing + ".onnx"], "not a replay"),
        "export-dataset": (["--replay", missing, "--out", str(tmp / "ds")], "not a replay"),
        "distill-back": (
            [
                *("--rl-data", missing, "--out", str(tmp / "db")),
                *("--parent", "a", "--collected-by", "b"),
            ],
            "model_id@version",
        ),
        "improve": (["--task", "nope-v3", "--out", str(tmp / "imp")], "unknown Meta-World task"),
    }


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, verb: str, reason: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlarl {verb}"), err
    assert reason in lines[0], err
    assert "Traceback" not in err


def test_every_verb_has_a_bad_input_case(tmp_path: Path) -> None:
    assert set(_bad_inputs(tmp_path)) == set(VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_bad_input_is_one_line_and_exit_code_2(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, reason = _bad_inputs(tmp_path)[verb]
    code, err = _run([verb, *argv], capsys)
    _assert_one_line_error(code, err, verb, reason)


def test_a_bad_flag_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["evaluate", "--policy", "x.onnx", "--episodes", "many"], capsys)
    _assert_one_line_error(code, err, "evaluate", "invalid int value")


@needs_model
def test_bringup_refuses_before_any_node_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(MODEL.read_bytes()[:1000])
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (["--model", str(tmp_path / "missing.onnx")], "not found"),
        (["--model", str(corrupt)], "corrupt"),
        (["--task", "nope-v3"], "unknown Meta-World task"),
        (["--task", "reach-v3"], "does not know task 'reach-v3'"),
        (["--results", "/dev/null/bringup.json"], "not a folder"),
        (["--results", str(tmp_path)], "is a folder"),
        (["--bag-dir", str(a_file)], "not a folder"),
        (["--action-offset", "0,2,0,0"], "action offset"),
        (["--learn", "--no-record"], "needs the recording"),
        (["--episodes", "0"], "--episodes"),
        (["--domain-id", "500"], "--domain-id"),
    ]
    for extra, reason in cases:
        run_dir = tmp_path / "run"
        code, err = _run(["bringup", "--run-dir", str(run_dir), *extra], capsys)
        _assert_one_line_error(code, err, "bringup", reason)
        assert not list(run_dir.glob("*.log")), f"a node started for {extra}"


def test_bringup_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run(["bringup", "--help"], capsys)
    assert code == 0
    out = _help_text("bringup")
    for default in ("(default: pick-place-v3)", "(default: 20)", "(default: lockstep)",
                    "(default: 0,0,0,0)", "(default: <run folder>/bringup.json)"):  # fmt: skip
        assert default in out, default


def _help_text(verb: str) -> str:
    import argparse
    import importlib

    module = importlib.import_module(VERBS[verb][0])
    parser = argparse.ArgumentParser(prog=f"vlarl {verb}")
    module.add_arguments(parser)
    return " ".join(parser.format_help().split())


def test_collect_does_not_name_a_flag_it_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demos"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code, err = _run(["collect", "--out", str(out), "--episodes", "1"], capsys)
    _assert_one_line_error(code, err, "collect", "choose another --out")
    assert "--overwrite" not in err
    assert "--overwrite" not in _help_text("collect")


@needs_model
def test_evaluate_action_offset_shifts_the_arm(tmp_path: Path) -> None:
    from vlarl.learning.evaluate import EvaluateConfig, evaluate

    def one(offset: str) -> dict[str, object]:
        cfg = EvaluateConfig(
            policy=str(MODEL),
            episodes=1,
            max_steps=40,
            parallel=1,
            action_offset=offset,
            out=str(tmp_path / f"eval-{offset}.json"),
        )
        return evaluate(cfg, quiet=True)

    plain, shifted = one("0,0,0,0"), one("0,0.5,0,0")
    assert plain["action_offset"] == [0.0, 0.0, 0.0, 0.0]
    assert shifted["action_offset"] == [0.0, 0.5, 0.0, 0.0]
    task = "pick-place-v3"
    plain_return = plain["tasks"][task]["per_episode_return"]  # type: ignore[index]
    shifted_return = shifted["tasks"][task]["per_episode_return"]  # type: ignore[index]
    assert plain_return != shifted_return


def test_console_entry_point_reports_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vlarl.cli", "bringup", "--episodes", "0"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_line_error(proc.returncode, proc.stderr, "bringup", "--episodes must be >= 1")


@pytest.mark.graph
def test_node_start_up_error_names_the_reason_from_its_log(tmp_path: Path) -> None:
    from vlarl.bringup import NodeExitError
    from vlarl.graph import start_node

    node = start_node("perception", overrides={"source": "nope"}, log_dir=tmp_path)
    assert node.process.wait(timeout=60) != 0
    message = str(NodeExitError("exited during start-up", [node]))
    assert "source must be one of" in message, message
    assert "see logs" not in message


@needs_model
@pytest.mark.graph
def test_learner_refuses_a_task_its_base_does_not_know(tmp_path: Path) -> None:
    from vlarl.bringup import NodeExitError
    from vlarl.graph import start_node

    node = start_node(
        "learner",
        overrides={
            "base_model": str(MODEL),
            "task": "reach-v3",
            "replay_dir": str(tmp_path / "replay"),
            "checkpoint": str(tmp_path / "learner.safetensors"),
        },
        log_dir=tmp_path,
    )
    assert node.process.wait(timeout=90) == 2
    message = str(NodeExitError("exited during start-up", [node]))
    assert "does not know task 'reach-v3'" in message, message
