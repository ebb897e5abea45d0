"""The deployment gate over the ROS graph: the learner node's trial state machine (ROS-free).

In-process (``vlarl train-residual --gate rollouts``) the trainer picks who acts in each
episode. In the graph the policy node acts and the learner only reads the replay the bridge
writes, seconds later; this class is the learner node's side of the same
:class:`~vlarl.learning.gate.DeploymentGate` (same :class:`~vlarl.learning.gate.GateConfig`):

1. ``begin(N)``: a pre-screened candidate ``N`` starts a trial. The policy is first pinned to the
   deployed version (``residual_version`` = the deployed version, 0 while none is: the zero
   residual); only then does the node publish the candidate's blob, so the policy checks and
   loads it but does not act with it (phase ``loading``).
2. The policy's status lists ``N`` among its loaded versions: phase ``trial``. A refusal of the
   blob (its ``weights_refused`` counter moves, ``N`` is not loaded and the refusal does not name
   only other versions, such as the deployed blob published again) ends the trial refused.
3. At each episode boundary (``reward/episode``) the next arm is chosen and pinned: the arm with
   fewer episodes assigned so far, the candidate on ties (the rule of ``DeploymentGate.next_arm``,
   applied to the episodes assigned rather than to those already judged, because outcomes reach
   the learner only through the bridge, several episodes late).
4. Outcomes come only from the replay: an episode counts for an arm when the tag that acted in at
   least ``min_share`` of its steps is that arm's full tag (``base@v`` for the zero residual,
   ``base@v+model_id@N`` otherwise, what the policy stamps on every action); any other episode is
   ignored (another version, a mixed episode, teleoperation). Counted outcomes are fed to the
   gate in pairs (one candidate, one deployed episode), so its looks fall where its rule says.
5. A verdict ends the trial: promoted, the candidate becomes the deployed version and is pinned;
   refused, the deployed version stays pinned. A trial also ends refused when the policy refuses
   the blob or a pin, or when its ``residual_version`` changes under the trial (a restarted policy
   comes back following the newest blob: it is pinned again at once).

The policy's ``residual_version`` belongs to the gate while this runs: a value of -1 (a restarted
policy node) is overridden at once; an explicit pin set by someone else (an operator's rollback)
is respected: the gate holds (no trial) until ``residual_version`` is set back to -1.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from vlarl.learning.errors import LearningError
from vlarl.learning.gate import (
    CANDIDATE,
    DEPLOYED,
    DeploymentGate,
    GateConfig,
    Verdict,
    prob_better,
)
from vlarl.learning.learner import EpisodeOutcome
from vlarl.learning.runs import arg, nested

GRAPH_GATES = ("rollouts", "none")
IDLE, PINNING, LOADING, TRIAL = "idle", "pinning", "loading", "trial"


@dataclass
class GraphGateConfig:
    """The graph's deployment gate; the learner node's gate parameters are built from it."""

    gate: str = arg(
        "rollouts",
        "rollouts: a candidate acts only in trial episodes interleaved with the deployed version "
        "until the gate's verdict (learner/gate) | none: every pre-screened candidate is "
        "published and followed at once",
    )
    rule: GateConfig = nested(GateConfig, "the deployment gate's rule")  # noqa: RUF009
    gate_min_share: float = arg(
        0.9,
        "an episode counts for a version that acted in at least this share of its steps (an arm "
        "switch lands a few ticks into the next episode)",
    )

    def __post_init__(self) -> None:
        if self.gate not in GRAPH_GATES:
            raise LearningError(f"gate must be one of {', '.join(GRAPH_GATES)}, got {self.gate!r}")
        if not 0.5 < self.gate_min_share <= 1.0:
            raise LearningError(f"gate_min_share must be in (0.5, 1], got {self.gate_min_share}")


@dataclass(frozen=True)
class Pin:
    """Set the policy node's ``residual_version`` to ``version`` (0: the zero residual)."""

    version: int
    why: str


Action = Pin | Verdict


class GraphGate:
    """The learner node's trial state machine (see the module doc).

    Every :class:`Pin` it returns is taken as sent: the caller reports its answer with
    :meth:`pin_done` (and no other pin is returned until then). Verdicts are returned before the
    pin that follows them, so a promoted version is persisted before it is pinned.
    """

    def __init__(
        self,
        rule: GateConfig,
        *,
        base_tag: str,
        model_id: str,
        deployed_version: int,
        min_share: float = 0.9,
    ) -> None:
        self.base_tag = base_tag
        self.model_id = model_id
        self.min_share = min_share
        self.deployed_version = deployed_version
        self.gate = DeploymentGate(rule, deployed=self.tag_of(deployed_version))
        self.phase = IDLE
        self.candidate_version = 0
        self.want = deployed_version  # the residual_version the policy should run
        self.pin: int | None = None  # the residual_version the policy runs (None: not known)
        self.pending: int | None = None  # a pin sent and not answered yet
        self.loaded: set[int] = set()  # residual versions loaded on the policy (its status)
        self.hold = ""  # why the gate holds (someone else pinned the policy)
        self.note = ""  # the last thing that kept a trial from starting or ended it early
        self.assigned = {CANDIDATE: 0, DEPLOYED: 0}
        self.queued: dict[str, deque[bool]] = {CANDIDATE: deque(), DEPLOYED: deque()}
        self.ignored = 0
        self._refused_before = 0
        self._mismatches = 0

    # ------------------------------------------------------------------ tags
    def tag_of(self, version: int) -> str:
        """The tag the policy stamps while ``residual_version`` = ``version`` acts."""
        return self.base_tag if version == 0 else f"{self.base_tag}+{self.model_id}@{version}"

    @property
    def candidate_tag(self) -> str:
        return self.tag_of(self.candidate_version) if self.phase != IDLE else ""

    @property
    def verdicts(self) -> list[Verdict]:
        return self.gate.verdicts

    def set_deployed(self, version: int) -> None:
        """The deployed version as the learner's books say (re-published on start)."""
        if self.phase != IDLE:
            raise LearningError("the deployed version cannot change during a trial")
        self.deployed_version = version
        self.gate.deployed = self.tag_of(version)
        self.want = version

    # ------------------------------------------------------------------ a trial
    def blocked(self) -> str | None:
        """Why no trial can start now (None: one can)."""
        if self.phase != IDLE:
            return f"a trial of {self.candidate_tag} is running"
        if self.hold:
            return self.hold
        if self.pending is not None:
            return f"waiting for the policy to answer residual_version={self.pending}"
        if self.pin is None:
            return "no policy/status heard yet: the policy's residual_version is not known"
        if self.pin != self.want:
            return (
                f"the policy runs residual_version={self.pin}, not the deployed version "
                f"{self.want} (it is not loaded on the policy)"
            )
        return None

    def begin(self, candidate_version: int) -> Pin:
        """Start a trial of ``candidate_version``: first pin the deployed version."""
        reason = self.blocked()
        if reason is not None:
            raise LearningError(f"cannot start a trial: {reason}")
        if candidate_version <= self.deployed_version:
            raise LearningError(
                f"candidate {candidate_version} is not newer than the deployed "
                f"{self.deployed_version}"
            )
        self.phase = PINNING
        self.candidate_version = candidate_version
        self.gate.propose(self.tag_of(candidate_version))
        self.assigned = {CANDIDATE: 0, DEPLOYED: 0}
        self.queued = {CANDIDATE: deque(), DEPLOYED: deque()}
        self.ignored = 0
        self.want = self.deployed_version
        self.pending = self.deployed_version
        return Pin(
            self.deployed_version,
            f"the deployed {self.tag_of(self.deployed_version)} acts while the policy checks "
            f"candidate {self.tag_of(candidate_version)}",
        )

    def published(self, weights_refused: int) -> None:
        """The candidate's blob went out; ``weights_refused``: the policy's counter before."""
        if self.phase != PINNING or self.pin != self.deployed_version:
            raise LearningError("the candidate may be published only once the deployed is pinned")
        self.phase = LOADING
        self._refused_before = weights_refused

    def cancel(self, reason: str) -> None:
        """Give up a trial before its blob was published (no verdict: nothing was tried)."""
        if self.phase != PINNING:
            raise LearningError(f"only an unpublished trial can be cancelled (phase {self.phase})")
        self.gate.candidate = None
        self.phase = IDLE
        self.note = reason

    # ------------------------------------------------------------------ inputs
    def pin_done(self, version: int, error: str = "") -> list[Action]:
        """The policy's answer to a pin (``error``: its refusal, or no answer)."""
        if self.pending != version:
            return []
        self.pending = None
        if not error:
            self.pin = version
            self._mismatches = 0
            return self._towards_want()
        if self.phase == PINNING:
            self.cancel(f"the policy did not take residual_version={version}: {error}")
            return []
        if self.phase in (LOADING, TRIAL):
            return self._end(f"the policy did not take residual_version={version}: {error}")
        self.note = f"the policy did not take residual_version={version}: {error}"
        return []

    def policy_status(self, status: dict[str, Any]) -> list[Action]:
        """A ``policy/status`` message (JSON as a dict)."""
        try:
            observed = int(status["residual_version"])
            loaded = {int(v) for v in status.get("residual_history", [])}
            refused = int(status.get("weights_refused", 0))
        except (KeyError, TypeError, ValueError):
            return []
        self.loaded = loaded
        actions: list[Action] = []
        if self.phase == LOADING:
            if self.candidate_version in loaded:
                self.phase = TRIAL
            elif refused > self._refused_before:
                why = str(status.get("last_weight_refusal", "")) or "no reason given"
                if self._about_another_blob(why):
                    self._refused_before = refused  # e.g. the deployed blob published again
                else:
                    actions += self._end(f"the policy refused the candidate's blob: {why}")
        if self.pending is not None or self.phase == PINNING:
            return actions
        if self.pin is not None and observed != self.pin:
            # One status may be older than the last pin's answer: an explicit value must be
            # seen twice. -1 is never the gate's: a restarted policy follows the newest blob.
            self._mismatches += 1
            if observed >= 0 and self._mismatches < 2:
                return actions
            self._mismatches = 0
            pinned, self.pin = self.pin, observed
            self.hold = (
                f"residual_version was set to {observed} outside the gate: no trial until it "
                "is set back to -1"
                if observed >= 0
                else ""
            )
            if self.phase in (LOADING, TRIAL):
                return actions + self._end(
                    f"the policy's residual_version became {observed} during the trial (the "
                    f"gate had pinned {pinned})"
                )
        elif self.pin is None:
            self.pin = observed
        else:
            self._mismatches = 0
        return actions + self._towards_want()

    def _about_another_blob(self, reason: str) -> bool:
        """A refusal that names versions of this model, none of them the candidate."""
        named = {int(v) for v in re.findall(rf"{re.escape(self.model_id)}@(\d+)", reason)}
        return bool(named) and self.candidate_version not in named

    def on_boundary(self) -> list[Action]:
        """An episode ended (``reward/episode``): pin the arm that acts in the next one."""
        if self.phase != TRIAL:
            return []
        arm = CANDIDATE if self.assigned[CANDIDATE] <= self.assigned[DEPLOYED] else DEPLOYED
        self.assigned[arm] += 1
        self.want = self.candidate_version if arm == CANDIDATE else self.deployed_version
        return self._towards_want()

    def on_episode(self, outcome: EpisodeOutcome) -> list[Action]:
        """An episode the learner ingested from the replay."""
        if self.phase != TRIAL:
            return []
        if outcome.share < self.min_share:
            self.ignored += 1
            return []
        if outcome.tag == self.tag_of(self.candidate_version):
            arm = CANDIDATE
        elif outcome.tag == self.tag_of(self.deployed_version):
            arm = DEPLOYED
        else:
            self.ignored += 1
            return []
        self.queued[arm].append(outcome.success)
        candidate, deployed = self.queued[CANDIDATE], self.queued[DEPLOYED]
        while candidate and deployed:
            self.gate.record(CANDIDATE, candidate.popleft())
            verdict = self.gate.record(DEPLOYED, deployed.popleft())
            if verdict is not None:
                return self._decided(verdict)
        return []

    # ------------------------------------------------------------------ endings
    def _decided(self, verdict: Verdict) -> list[Action]:
        self.phase = IDLE
        if verdict.accepted:
            self.deployed_version = self.candidate_version
        self.want = self.deployed_version
        return [verdict, *self._towards_want()]

    def _end(self, reason: str) -> list[Action]:
        """End the trial refused without the gate's verdict (``reason`` says why)."""
        (nc, sc), (nd, sd) = self.gate.tally[CANDIDATE], self.gate.tally[DEPLOYED]
        rule = self.gate.config
        verdict = Verdict(
            candidate=self.tag_of(self.candidate_version),
            deployed=self.gate.deployed,
            accepted=False,
            reason=reason,
            probability=prob_better((sc, sd), (nc, nd), margin=rule.margin),
            threshold=1.0 - rule.per_look_error,
            candidate_successes=sc,
            candidate_episodes=nc,
            deployed_successes=sd,
            deployed_episodes=nd,
            rule="ended before the gate's verdict: the deployed version stays",
        )
        self.gate.candidate = None
        self.gate.verdicts.append(verdict)
        self.note = reason
        return self._decided(verdict)

    def _towards_want(self) -> list[Action]:
        """Pin the version wanted (the zero residual while it is not loaded on the policy)."""
        target = self.want if self.want == 0 or self.want in self.loaded else 0
        if self.pending is not None or self.hold or target == self.pin:
            return []
        self.pending = target
        if target != self.want:
            why = f"the zero residual: {self.tag_of(self.want)} is not loaded on the policy"
        elif self.phase == TRIAL and target == self.candidate_version:
            why = f"candidate {self.tag_of(target)} acts in the next episode"
        else:
            why = f"deployed {self.tag_of(target)} acts"
        return [Pin(target, why)]

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """For ``learner/status``."""
        last = self.verdicts[-1] if self.verdicts else None
        tally = self.gate.tally if self.phase != IDLE else {}
        return {
            "mode": "rollouts",
            "phase": self.phase,
            "candidate": self.candidate_tag,
            "deployed": self.tag_of(self.deployed_version),
            "tally": {
                arm: {"episodes": n, "successes": s, "waiting": len(self.queued[arm])}
                for arm, (n, s) in tally.items()
            },
            "assigned": dict(self.assigned) if self.phase == TRIAL else {},
            "ignored": self.ignored,
            "verdicts": len(self.verdicts),
            "promoted": sum(v.accepted for v in self.verdicts),
            "last_verdict": None
            if last is None
            else {"candidate": last.candidate, "accepted": last.accepted, "reason": last.reason},
            "residual_version": self.pin,
            "wanted": self.want,
            "hold": self.hold,
            "note": self.note,
        }


__all__ = [
    "GRAPH_GATES",
    "IDLE",
    "LOADING",
    "PINNING",
    "TRIAL",
    "GraphGate",
    "GraphGateConfig",
    "Pin",
]
