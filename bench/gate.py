"""Deployment gate benchmark (issue 11): does the rollout gate refuse worse candidates?

Three policies on the same deployment (the shipped base on the arm shifted by
``--action-offset``, real simulator, real safety filter, the policy node's chunking): ``plain``
is the deployed base alone; ``broken`` is the base with a constant residual that doubles the
shift (plus exploration noise), a candidate known to be worse; ``corrected`` is the base with
the constant residual that cancels the shift, a candidate known to be better. Each trial runs
:class:`vlarl.learning.gate.DeploymentGate` (the code ``vlarl improve`` runs) from scratch on
fresh layouts, candidate and deployed taking turns, until its verdict:

- ``worse`` trials: deployed = plain, candidate = broken -> a promotion is a false promotion;
- ``equal`` trials: deployed = plain, candidate = plain under another name (the hardest case
  for the error rate: p_candidate = p_deployed exactly) -> a promotion is a false promotion;
- ``better`` trials: deployed = plain, candidate = corrected -> a promotion is a true one.

Writes ``bench/results/gate.json`` (``false_promotion_rate``, ``true_promotion_rate``, the
episodes spent per verdict, each trial's tallies) and ``bench/results/gate.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vlarl.core.onnx_policy import OnnxPolicy
from vlarl.graph import resolve_model_path
from vlarl.learning.gate import CANDIDATE, DeploymentGate, GateConfig
from vlarl.learning.rollouts import Controller, parse_offset, run_episode
from vlarl.learning.runs import set_threads
from vlarl.sim.robot import MetaWorldRobot

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KINDS = ("worse", "equal", "better")
LAYOUT_OFFSET = {"worse": 0, "better": 500, "equal": 1000}  # each kind its own layouts


class ConstantResidual:
    """A residual actor that always adds the same correction (safety clamps it to ±delta)."""

    obs_dim = 39
    action_dim = 4

    def __init__(self, tag: str, value: np.ndarray) -> None:
        self.tag = tag
        self.value = np.asarray(value, np.float32)

    def __call__(self, obs: np.ndarray, base_action: np.ndarray, out: np.ndarray) -> None:
        out[:] = self.value


def run_trial(
    kind: str, trial: int, args: argparse.Namespace, base: OnnxPolicy, rule: GateConfig
) -> dict:
    offset = parse_offset(args.action_offset)
    robot = MetaWorldRobot(
        args.task,
        seed=args.seed * 10_000 + trial + LAYOUT_OFFSET[kind],
        end_on_success=True,
        max_episode_steps=args.max_episode_steps,
        action_offset=offset,
    )
    controller = Controller(base, task=args.task, replan_every=4, delta=0.3)
    rng = np.random.default_rng(trial)
    # (actor, noise std) of each arm
    deployed = (None, 0.0)
    candidate = {
        "worse": (ConstantResidual("broken@1", offset), args.noise),
        "equal": (ConstantResidual("same@1", np.zeros_like(offset)), 0.0),
        "better": (ConstantResidual("corrected@1", -offset), args.noise),
    }[kind]
    gate = DeploymentGate(rule, deployed="deployed")
    gate.propose("candidate")
    episodes = 0
    while True:
        arm = gate.next_arm()
        actor, noise = candidate if arm == CANDIDATE else deployed
        ep = run_episode(robot, controller, actor=actor, noise_std=noise, rng=rng, episode=episodes)
        episodes += 1
        verdict = gate.record(arm, ep.success)
        if verdict is not None:
            return {"kind": kind, "trial": trial, "episodes": episodes, **verdict.as_dict()}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colors = ("tab:red", "tab:orange", "tab:green")
    for ax, kind, color in zip(axes, KINDS, colors, strict=True):
        trials = [t for t in doc["trials"] if t["kind"] == kind]
        acc = [t["episodes"] for t in trials if t["accepted"]]
        ref = [t["episodes"] for t in trials if not t["accepted"]]
        ax.hist(
            [acc, ref],
            bins=8,
            stacked=True,
            color=[color, "tab:gray"],
            label=["promoted", "refused"],
        )
        rate = len(acc) / max(1, len(trials))
        ax.set_title(f"candidate known {kind}: promoted {rate:.2f} of {len(trials)}")
        ax.set_xlabel("episodes spent until the verdict")
        ax.legend()
    axes[0].set_ylabel("trials")
    fig.suptitle(doc["rule"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="trials per kind")
    p.add_argument("--task", default="pick-place-v3")
    p.add_argument("--base-model", default="models/pick-place-v3-student.onnx")
    p.add_argument("--action-offset", default="0,0.2,0,0")
    p.add_argument("--noise", type=float, default=0.05, help="candidates' exploration noise")
    p.add_argument("--max-episode-steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "gate.json"))
    args = p.parse_args()
    set_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = OnnxPolicy.load(resolve_model_path(args.base_model), providers="cpu")
    rule = GateConfig()
    t0 = time.perf_counter()
    trials = []
    for kind in KINDS:
        for trial in range(args.trials):
            res = run_trial(kind, trial, args, base, rule)
            trials.append(res)
            print(
                f"{kind:6s} trial {trial:2d}: {'PROMOTED' if res['accepted'] else 'refused '} "
                f"after {res['episodes']:3d} episodes (candidate {res['candidate_successes']}/"
                f"{res['candidate_episodes']}, deployed {res['deployed_successes']}/"
                f"{res['deployed_episodes']}, P {res['probability']:.3f})",
                flush=True,
            )

    def rate(kind: str) -> float:
        sel = [t for t in trials if t["kind"] == kind]
        return sum(t["accepted"] for t in sel) / len(sel)

    def success(kind: str, arm: str) -> float:
        sel = [t for t in trials if t["kind"] == kind]
        s = sum(t[f"{arm}_successes"] for t in sel)
        return s / max(1, sum(t[f"{arm}_episodes"] for t in sel))

    doc = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": args.task,
        "base_model": args.base_model,
        "action_offset": args.action_offset,
        "noise": args.noise,
        "gate": asdict(rule),
        "rule": trials[0]["rule"],
        "trials_per_kind": args.trials,
        "false_promotion_rate": rate("worse"),
        "equal_promotion_rate": rate("equal"),
        "true_promotion_rate": rate("better"),
        "episodes_per_verdict": {
            kind: float(np.mean([t["episodes"] for t in trials if t["kind"] == kind]))
            for kind in KINDS
        },
        "observed_success": {
            "plain": (success("worse", "deployed") + success("better", "deployed")) / 2,
            "broken": success("worse", "candidate"),
            "corrected": success("better", "candidate"),
            "plain_as_candidate": success("equal", "candidate"),
        },
        "trials": trials,
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": {"node": platform.node(), "python": platform.python_version()},
        "goals": {"false_promotion_rate": "<= 0.05", "equal_promotion_rate": "<= 0.05"},
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(
        f"false promotion rate {doc['false_promotion_rate']:.3f} (equal candidate "
        f"{doc['equal_promotion_rate']:.3f}), true promotion rate "
        f"{doc['true_promotion_rate']:.3f}, episodes per verdict {doc['episodes_per_verdict']}"
    )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
