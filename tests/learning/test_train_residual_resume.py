"""``vlarl train-residual``: an interrupted run keeps its episodes and resumes (``--resume``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_residual_rl import _learner_config

import vlarl.learning.train_residual as train_residual
from vlarl.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, main
from vlarl.data.replay import Transitions, list_shards, read_shard
from vlarl.learning.errors import LearningError
from vlarl.learning.gate import GateConfig
from vlarl.learning.train_residual import RESUME_STATE, TrainResidualConfig, train

# The smoke test's tiny budget, as command-line flags (the nested learner's flags included).
TINY_FLAGS = [
    "--total-steps", "150", "--eval-every", "60", "--eval-episodes", "1",
    "--eval-max-steps", "10", "--max-episode-steps", "30", "--no-progress", "--gate", "none",
    "--action-offset", "0,0.2,0,0", "--hidden", "32", "--critics", "3", "--batch-size", "32",
    "--publish-every", "20", "--max-probe-extensions", "0", "--probe-transitions", "40",
    "--warmup-ramp", "40", "--learning-starts", "0",
]  # fmt: skip


def _recorded(folder: Path) -> Transitions:
    return Transitions.concatenate([read_shard(p)[0] for p in list_shards(folder)])


def _interrupt_episode(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """The ``at``-th training episode is cut short by Ctrl-C (KeyboardInterrupt)."""
    run_episode = train_residual.run_episode
    calls = [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return run_episode(*args, **kwargs)

    monkeypatch.setattr(train_residual, "run_episode", interrupted)


def test_ctrl_c_keeps_the_episodes_and_resume_finishes_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    flags = ["train-residual", "--out", str(out), *TINY_FLAGS]
    _interrupt_episode(monkeypatch, at=4)
    assert main(flags) == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlarl train-residual: interrupted at 90/150")
    assert "--resume" in err[0] and "Traceback" not in err[0]
    # Every finished episode is on disk, and the resume state says where the run stood.
    before = _recorded(out / "episodes")
    assert len(before) == 90 and len(np.unique(before.episode)) == 3
    state = json.loads((out / RESUME_STATE).read_text())
    assert (state["steps"], state["episodes"], state["next_eval"]) == (90, 3, 120)
    assert [c["step"] for c in state["curve"]] == [0, 60]
    assert state["stage"]["learner"]["transitions"] == 90
    assert (out / "resume" / state["stage"]["deployed_blob"]).is_file()  # gate none: deployed
    assert (out / "resume" / state["stage"]["checkpoint"]).is_file()
    assert not (out / "metrics.json").exists() and not (out / ".lock").exists()
    monkeypatch.undo()

    # Not silently restarted; not resumed with settings that matter changed.
    assert main(flags) == EXIT_USER_ERROR
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main([*flags, "--seed", "3", "--resume"]) == EXIT_USER_ERROR
    assert "seed: 0 -> 3" in capsys.readouterr().err
    assert main([*flags, "--action-offset", "0,0,0,0", "--resume"]) == EXIT_USER_ERROR
    assert "action_offset" in capsys.readouterr().err

    assert main([*flags, "--resume"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["env_steps"] >= 150 and summary["resumes"] == 1
    assert [c["step"] for c in summary["curve"]] == [0, 60, 120]
    assert summary["learner"]["resumed"] and summary["achieved_utd"] == pytest.approx(2.0, 0.05)
    after = _recorded(out / "episodes")
    # The episodes from before the interruption are still there, unchanged, and the learner's
    # buffer is every recorded episode (re-read on resume, then added to).
    np.testing.assert_array_equal(after.obs[:90], before.obs)
    np.testing.assert_array_equal(after.episode, np.repeat(np.arange(5), 30))
    assert summary["online_transitions"] == len(after) == summary["env_steps"]
    assert summary["train_episodes"] == 5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["episode"] for r in rows if r["kind"] == "episode"] == [1, 2, 3, 4, 5]
    assert [r["kind"] for r in rows].count("resume") == 1
    assert not (out / "resume").exists()  # finished: nothing left to resume
    assert main([*flags, "--resume"]) == EXIT_USER_ERROR
    assert "finished run" in capsys.readouterr().err


def test_sigterm_waits_for_the_episode_bookkeeping_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during an episode's bookkeeping stops the run after it: the resume state counts
    that episode whole; without --record-episodes the learner's episodes are kept for the
    resume only. The deployment gate's state comes back too."""
    out = tmp_path / "run"

    def config(**kw: Any) -> TrainResidualConfig:
        return TrainResidualConfig(
            total_steps=120,
            max_episode_steps=30,
            eval_every=60,
            eval_episodes=1,
            eval_max_steps=10,
            gate="rollouts",
            gate_rule=GateConfig(min_episodes=1, look_every=1, max_episodes=2),
            learner=_learner_config(
                publish_every=20, max_probe_extensions=0, probe_transitions=30, warmup_ramp=30
            ),
            record_episodes=False,
            progress=False,
            out=str(out),
            **kw,
        )

    learn_from = train_residual.ResidualStage.learn_from
    calls = [0]

    def learn_then_stop(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled after this episode's bookkeeping
        return learn_from(self, *args, **kwargs)

    monkeypatch.setattr(train_residual.ResidualStage, "learn_from", learn_then_stop)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="at 60/120 env steps"):
        train(config())
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handlers are gone
    monkeypatch.undo()
    state = json.loads((out / RESUME_STATE).read_text())
    assert (state["steps"], state["episodes"]) == (60, 2)
    assert state["stage"]["learner"]["transitions"] == 60
    # A candidate was on trial: its blob and the gate's tally are part of the resume state.
    trial = state["stage"]["gate"]
    assert trial["candidate"] == "pick-place-v3-student@1+residual@1"
    assert (out / "resume" / state["stage"]["candidate"]["blob"]).is_file()
    assert len(_recorded(out / "resume" / "episodes")) == 60

    with pytest.raises(LearningError, match="--overwrite replaces it"):
        config(resume=True, overwrite=True)
    summary = train(config(resume=True))
    assert summary["env_steps"] >= 120 and summary["online_transitions"] == summary["env_steps"]
    assert [c["step"] for c in summary["curve"]] == [0, 60, 120]
    assert summary["candidates"] >= 1 and summary["learner"]["resumed"]
    assert not (out / "resume").exists() and not (out / "episodes").exists()


def test_resume_needs_an_interrupted_run(tmp_path: Path) -> None:
    with pytest.raises(LearningError, match="no interrupted run to resume"):
        train(TrainResidualConfig(out=str(tmp_path / "none"), resume=True, progress=False))
    assert not (tmp_path / "none").exists()


def test_run_folder_tells_an_interrupted_run_from_a_finished_one(tmp_path: Path) -> None:
    from vlarl.learning.runs import run_folder

    folder = tmp_path / "run"
    markers = {"marker": "done", "resume_marker": "resume/state.json"}
    with pytest.raises(LearningError, match="no interrupted run to resume"):
        run_folder(folder, overwrite=False, resume=True, **markers).__enter__()
    (folder / "resume").mkdir(parents=True)
    (folder / "resume" / "state.json").write_text("{}")
    with pytest.raises(LearningError, match="pass --resume to continue it, --overwrite"):
        run_folder(folder, overwrite=False, **markers).__enter__()
    with run_folder(folder, overwrite=False, resume=True, **markers) as held:
        assert held == folder
    with run_folder(folder, overwrite=True, **markers) as held:
        assert held == folder
    (folder / "done").write_text("")
    with pytest.raises(LearningError, match="finished run"):
        run_folder(folder, overwrite=False, resume=True, **markers).__enter__()
    # A verb without a resume state is as before: only a finished run is refused.
    (folder / "done").unlink()
    with run_folder(folder, overwrite=False, marker="done"):
        pass
    with pytest.raises(LearningError, match="cannot resume"):
        run_folder(folder, overwrite=False, marker="done", resume=True).__enter__()
