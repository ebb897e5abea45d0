"""`vlarl improve` end to end on a tiny budget: the real simulator, the shipped base with its
teacher and student checkpoints, the learner core, hybrid rollouts, distill-back and the gate.
Every stage's steps are counted and the new base carries its lineage and the gate's verdict."""

from __future__ import annotations

from pathlib import Path

from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.learning.collect import CollectConfig, collect
from vlarl.learning.distill_back import lineage_of
from vlarl.learning.gate import GateConfig
from vlarl.learning.improve import ImproveConfig, improve
from vlarl.learning.learner import LearnerConfig
from vlarl.learning.residual_rl import AgentConfig


def test_improve_runs_every_stage_and_records_lineage(tmp_path: Path) -> None:
    demos = tmp_path / "demos"
    collect(CollectConfig(out=str(demos), tasks="pick-place-v3", episodes=2, sigmas="0"))
    summary = improve(
        ImproveConfig(
            demos=str(demos),
            action_offset="0,0.2,0,0",
            rounds=1,
            residual_steps="300",
            max_episode_steps=60,
            learner=LearnerConfig(
                agent=AgentConfig(hidden=16, critics=2, batch_size=16),
                probe_transitions=100,
                learning_starts=50,
                warmup_ramp=50,
                publish_every=50,
            ),
            gate_rule=GateConfig(min_episodes=1, look_every=1, max_episodes=2),
            hybrid_episodes=3,
            hybrid_prefix=0.5,
            finetune_steps=20,
            distill_steps=20,
            eval_episodes=1,
            eval_max_steps=60,
            out=str(tmp_path / "run"),
        )
    )
    (row,) = summary["rounds"]
    stages = row["residual"]["env_steps"] + row["hybrid"]["env_steps"]
    if row["hybrid"]["successes"]:
        stages += row["gate"]["env_steps"]
        onnx = Path(row["distill"]["onnx"])
        new_base = OnnxPolicy.load(onnx)
        assert new_base.tag == "pick-place-v3-student@2"
        lineage = lineage_of(onnx)
        assert lineage["parent"] == "pick-place-v3-student@1"
        assert lineage["collected_by"] == row["hybrid"]["acted"]
        assert lineage["gate"]["verdict"] in ("promoted", "rejected")
        assert (lineage["gate"]["verdict"] == "promoted") == row["gate"]["accepted"]
        assert summary["final_base"] == (
            new_base.tag if row["gate"]["accepted"] else "pick-place-v3-student@1"
        )
    else:
        assert row["distill"] == {"skipped": "the hybrid rollouts yielded no success"}
    assert summary["env_steps"] == stages
    assert row["residual"]["env_steps"] >= 300
    assert (tmp_path / "run" / "improve.json").is_file()
