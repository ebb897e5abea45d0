"""The deployment gate: a candidate version is promoted only on evidence from robot rollouts.

A candidate (a residual or base version) and the deployed version act on interleaved episodes
(candidate, deployed, candidate, ...), so both are judged on the same stretch of the robot's
life. The rule, stated once:

- Each arm's success probability gets a uniform Beta(1, 1) prior; after ``s`` successes in ``n``
  episodes its posterior is Beta(1 + s, 1 + n - s).
- The gate looks at the tallies after ``min_episodes`` episodes per arm and then every
  ``look_every`` more, up to ``max_episodes``: ``K`` looks in all.
- At a look it computes ``P = P(p_candidate > p_deployed + margin | data)``. It **promotes**
  when ``P >= 1 - (1 - confidence) / K`` (the error budget split over the looks, Bonferroni),
  **refuses early** when ``P <= futility`` (hopeless: stopping for futility never promotes, so
  it costs power, not false promotions) or ``P <= (1 - confidence) / K``, and otherwise
  continues; at the last look anything short of promotion is a refusal (the deployed version
  stays).
- A candidate with no success never promotes, whatever the deployed version did (a tie at zero
  is no evidence).

The critic may pre-screen candidates before they reach the robot (the learner does); it never
decides here. ``bench/gate.py`` measures the false promotion rate against candidates known to be
worse and the true promotion rate against candidates known to be better.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from vlarl.learning.errors import LearningError
from vlarl.learning.runs import arg

CANDIDATE = "candidate"
DEPLOYED = "deployed"
_GRID = 2001  # points of the integration grid for P(p_c > p_d + margin)


@dataclass
class GateConfig:
    """The gate's rule (see the module doc)."""

    confidence: float = arg(0.95, "promote at this confidence that the candidate is better")
    min_episodes: int = arg(10, "episodes per arm before the first look")
    look_every: int = arg(5, "episodes per arm between looks")
    max_episodes: int = arg(30, "episodes per arm at the last look (then the deployed stays)")
    margin: float = arg(0.0, "the candidate must beat the deployed success rate by this")
    futility: float = arg(
        0.2, "refuse at a look where P(better) is at most this (ends hopeless trials early)"
    )

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1.0:
            raise LearningError(f"gate confidence must be in (0.5, 1), got {self.confidence}")
        if self.min_episodes < 1 or self.look_every < 1:
            raise LearningError("gate min_episodes and look_every must be >= 1")
        if self.max_episodes < self.min_episodes:
            raise LearningError("gate max_episodes must be >= min_episodes")
        if not 0.0 <= self.margin < 1.0:
            raise LearningError(f"gate margin must be in [0, 1), got {self.margin}")
        if not 0.0 <= self.futility < 0.5:
            raise LearningError(f"gate futility must be in [0, 0.5), got {self.futility}")

    @property
    def looks(self) -> int:
        return 1 + (self.max_episodes - self.min_episodes) // self.look_every

    @property
    def per_look_error(self) -> float:
        return (1.0 - self.confidence) / self.looks


def prob_better(
    successes: tuple[int, int], episodes: tuple[int, int], *, margin: float = 0.0
) -> float:
    """P(p_a > p_b + margin) under independent Beta(1 + s, 1 + n - s) posteriors."""
    (sa, sb), (na, nb) = successes, episodes
    x = np.linspace(0.0, 1.0, _GRID)
    pdf_b = stats.beta.pdf(x, 1 + sb, 1 + nb - sb)
    # P(p_a > x + margin) for each x of p_b, weighted by p_b's density.
    tail_a = stats.beta.sf(np.minimum(x + margin, 1.0), 1 + sa, 1 + na - sa)
    tail_a[x + margin >= 1.0] = 0.0
    return float(np.clip(np.trapezoid(pdf_b * tail_a, x), 0.0, 1.0))


@dataclass
class Verdict:
    """One gate decision, published and recorded."""

    candidate: str
    deployed: str
    accepted: bool
    reason: str
    probability: float
    threshold: float
    candidate_successes: int
    candidate_episodes: int
    deployed_successes: int
    deployed_episodes: int
    rule: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeploymentGate:
    """Interleaves a candidate with the deployed version and decides by :class:`GateConfig`."""

    config: GateConfig
    deployed: str
    candidate: str | None = None
    tally: dict[str, list[int]] = field(default_factory=dict)  # arm -> [episodes, successes]
    verdicts: list[Verdict] = field(default_factory=list)

    def propose(self, candidate: str) -> None:
        """Start a trial of ``candidate`` (a version tag) against the deployed version."""
        if self.candidate is not None:
            raise LearningError(f"a trial of {self.candidate} is still running")
        self.candidate = candidate
        self.tally = {CANDIDATE: [0, 0], DEPLOYED: [0, 0]}

    @property
    def in_trial(self) -> bool:
        return self.candidate is not None

    def next_arm(self) -> str:
        """Who acts in the next episode: the arm with fewer episodes, the candidate on ties."""
        if self.candidate is None:
            return DEPLOYED
        return CANDIDATE if self.tally[CANDIDATE][0] <= self.tally[DEPLOYED][0] else DEPLOYED

    def record(self, arm: str, success: bool) -> Verdict | None:
        """Count one finished episode of ``arm``; the verdict when the trial is decided."""
        if self.candidate is None:
            return None
        if arm not in self.tally:
            raise LearningError(f"arm must be {CANDIDATE} or {DEPLOYED}, got {arm!r}")
        entry = self.tally[arm]
        entry[0] += 1
        entry[1] += int(bool(success))
        (nc, sc), (nd, sd) = self.tally[CANDIDATE], self.tally[DEPLOYED]
        n = min(nc, nd)
        c = self.config
        at_look = n >= c.min_episodes and (n - c.min_episodes) % c.look_every == 0 and nc == nd
        if not at_look:
            return None
        p = prob_better((sc, sd), (nc, nd), margin=c.margin)
        last = n >= c.max_episodes
        err = c.per_look_error
        if p <= max(err, c.futility):
            bound = max(err, c.futility)
            accepted, reason = False, f"P(better) {p:.4f} <= {bound:.4f}: clearly not better"
        elif sc > 0 and p >= 1.0 - err:
            accepted, reason = True, f"P(better) {p:.4f} >= {1.0 - err:.4f}"
        elif last and sc == 0:
            accepted, reason = False, "no candidate success (a tie at zero is no evidence)"
        elif last:
            accepted, reason = False, f"P(better) {p:.4f} < {1.0 - err:.4f} after {n} episodes"
        else:
            return None
        verdict = Verdict(
            candidate=self.candidate,
            deployed=self.deployed,
            accepted=accepted,
            reason=reason,
            probability=p,
            threshold=1.0 - err,
            candidate_successes=sc,
            candidate_episodes=nc,
            deployed_successes=sd,
            deployed_episodes=nd,
            rule=(
                f"Beta(1,1) posteriors, promote if P(p_c > p_d + {c.margin}) >= "
                f"1 - {1.0 - c.confidence:.3f}/{c.looks} at looks n = {c.min_episodes}, "
                f"+{c.look_every} .. {c.max_episodes} per arm, refuse if P <= "
                f"{max(err, c.futility):.3f}; no candidate success never promotes"
            ),
        )
        if accepted:
            self.deployed = self.candidate
        self.candidate = None
        self.verdicts.append(verdict)
        return verdict


__all__ = ["CANDIDATE", "DEPLOYED", "DeploymentGate", "GateConfig", "Verdict", "prob_better"]
