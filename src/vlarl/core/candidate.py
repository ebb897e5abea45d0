"""Checks a candidate must pass before it may replace the running policy (ROS-free).

A candidate is either a residual actor decoded from a weight blob (``policy_weights``) or a base
model file (the ``model`` parameter; later also learner-produced base versions). Both go through
the same gates, each refusing with a one-line reason (:class:`CandidateRefused`, or the
``ContractError``/``WeightError`` of the loader):

1. size: the blob's byte count, or the file's size from ``stat`` before a byte is read
   (:func:`check_blob_size`, :func:`check_model_file`; :func:`load_model_candidate` never reads
   past the cap, so a 200 GiB sparse file is a refusal, not a ``MemoryError``);
2. the robot's contract (:class:`RobotContract`, fixed at start): obs_dim and action_dim must be
   what the running robot provides, not only consistent with the candidate's own metadata;
3. lineage (versions a learner produces, :func:`check_lineage`): above the newest accepted
   version by at most ``max_version_step``, never above ``max_version``; a refused jump leaves
   the newest accepted version as it was, so later learner versions still pass;
4. recent real observations (:func:`verify_candidate`): the candidate's output on each of the
   last observations the control path answered (with the base action it ran, for a residual)
   must be finite and within ``±action_bound``;
5. a compute budget per tick, measured before the swap: the median time of the candidate's share
   of one tick, timed on those observations, plus what the rest of the tick costs, must fit in
   ``tick_budget_fraction`` of the control period.

The settings are one dataclass, :class:`SwapConfig`; the policy node derives its parameters
from it. :class:`CandidateWorker` runs the loading and checking on a background thread, so none
of it ever runs on the control path.
"""

from __future__ import annotations

import random
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vlarl.contract import ContractError
from vlarl.core.onnx_policy import OnnxPolicy, PolicyOutputError

MIB = 1 << 20
# Output tolerance above action_bound (float32 rounding of a clipped or tanh output).
_BOUND_SLACK = 1e-5


class CandidateRefused(ValueError):
    """A candidate that may not replace the running policy; the message says why (one line)."""


@dataclass(frozen=True)
class SwapConfig:
    """Limits every candidate (residual blob or base model file) must meet before a swap.

    The policy node's parameters (read-only: fixed at start) are derived from these fields.
    """

    max_blob_bytes: int = 8 * MIB
    """Largest residual weight blob accepted (a 2x256 actor is about 0.3 MB)."""
    max_model_bytes: int = 64 * MIB
    """Largest model file accepted, checked with stat before reading (the student is 0.85 MB)."""
    tick_budget_fraction: float = 0.25
    """Share of the control period one tick (base model + residual) may use, measured."""
    timing_calls: int = 16
    """Timed calls of a candidate; their median is its cost per tick."""
    check_observations: int = 32
    """A candidate's outputs are checked on this many of the most recent real observations,
    and on as many sampled uniformly from all those seen."""
    min_observations: int = 8
    """A candidate waits until the control path has seen this many observations."""
    action_bound: float = 1.0
    """Outputs (base chunk and residual) must be finite and within +-action_bound."""
    max_version_step: int = 1000
    """A learner version may be at most this far above the newest accepted one."""
    max_version: int = 1_000_000_000
    """No version above this is accepted (also for the first one a fresh node sees)."""
    obs_dim: int = 0
    """Observation size the robot provides; 0 = the start-up model's (else the first
    observation's)."""
    control_period_s: float = 0.0
    """Control period the budget derives from; 0 = the start-up model's control_dt."""

    def __post_init__(self) -> None:
        for name in ("max_blob_bytes", "max_model_bytes", "timing_calls", "check_observations"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 1 <= self.min_observations <= self.check_observations:
            raise ValueError("min_observations must be between 1 and check_observations")
        if not 0.0 < self.tick_budget_fraction <= 1.0:
            raise ValueError("tick_budget_fraction must be in (0, 1]")
        if not self.action_bound > 0.0:
            raise ValueError("action_bound must be > 0")
        if self.max_version_step < 1 or self.max_version < 1:
            raise ValueError("max_version_step and max_version must be >= 1")
        if self.obs_dim < 0 or self.control_period_s < 0.0:
            raise ValueError("obs_dim and control_period_s must be >= 0")


@dataclass(frozen=True)
class RobotContract:
    """What the running robot provides and expects, fixed at start."""

    obs_dim: int
    action_dim: int
    control_period_s: float

    def check_dims(self, what: str, obs_dim: int, action_dim: int) -> None:
        if obs_dim != self.obs_dim or action_dim != self.action_dim:
            raise CandidateRefused(
                f"{what} has obs_dim={obs_dim}, action_dim={action_dim}; the robot provides "
                f"obs_dim={self.obs_dim} and takes action_dim={self.action_dim}"
            )

    def tick_budget_s(self, config: SwapConfig) -> float:
        return config.tick_budget_fraction * self.control_period_s


# ---------------------------------------------------------------------------- size
def check_blob_size(size: int, config: SwapConfig) -> None:
    if size > config.max_blob_bytes:
        raise CandidateRefused(
            f"blob of {size} bytes is over the cap of {config.max_blob_bytes} bytes "
            "(max_blob_bytes)"
        )


def check_model_file(path: str | Path, config: SwapConfig) -> int:
    """Stat ``path`` (nothing is read): a regular file within the cap; returns its size."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ContractError(f"model file not found: {path}") from None
    except OSError as exc:
        raise ContractError(f"cannot stat model file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ContractError(f"model path is not a file: {path}")
    if info.st_size > config.max_model_bytes:
        raise CandidateRefused(
            f"model file {path.name} is {info.st_size} bytes, over the cap of "
            f"{config.max_model_bytes} bytes (max_model_bytes)"
        )
    return int(info.st_size)


def load_model_candidate(
    path: str | Path,
    *,
    config: SwapConfig,
    contract: RobotContract | None,
    providers: str = "auto",
    intra_op_threads: int = 1,
    expected_sha256: str = "",
) -> OnnxPolicy:
    """A base model file as a candidate: size cap (stat first, bounded read), the model
    contract, the robot's dims (when known) and, for learner-produced versions, the digest.

    Real-observation and budget checks follow with :func:`verify_candidate`.
    """
    check_model_file(path, config)
    policy = OnnxPolicy.load(
        path,
        providers=providers,
        intra_op_threads=intra_op_threads,
        max_bytes=config.max_model_bytes,
    )
    if contract is not None:
        meta = policy.metadata
        contract.check_dims(f"model {policy.tag}", meta.obs_dim, meta.action_dim)
    if expected_sha256 and policy.sha256 != expected_sha256:
        raise CandidateRefused(
            f"model {policy.tag}: sha256 {policy.sha256[:12]}... is not the announced "
            f"{expected_sha256[:12]}..."
        )
    return policy


# ---------------------------------------------------------------------------- lineage
def check_lineage(
    tag: str,
    *,
    version: int,
    parent: int,
    newest: int | None,
    config: SwapConfig,
) -> None:
    """A learner version must follow the newest accepted one (``newest``, None: none yet):
    strictly newer, at most ``max_version_step`` ahead, never above ``max_version``."""
    if version > config.max_version:
        raise CandidateRefused(
            f"{tag}: version {version} is above the ceiling {config.max_version} (max_version)"
        )
    if not 0 <= parent < version:
        raise CandidateRefused(f"{tag}: parent {parent} is not older than version {version}")
    if newest is None:
        return
    if version <= newest:
        raise CandidateRefused(f"{tag} is not newer than the newest accepted version {newest}")
    if version - newest > config.max_version_step:
        raise CandidateRefused(
            f"{tag} jumps {version - newest} versions past the newest accepted {newest} "
            f"(max_version_step={config.max_version_step}): not in the learner's lineage"
        )


# ---------------------------------------------------------------------------- observations
class RecentObservations:
    """Real observations the control path answered, with the base action it ran: the last
    ``capacity`` of them, plus a uniform sample (reservoir) of ``capacity`` over every one seen,
    so a candidate is also checked on states from earlier in the run, not only the last second.

    ``add`` is called by the control thread once per tick (small copies under a lock);
    ``snapshot`` by the checking thread.
    """

    def __init__(self, *, capacity: int, obs_dim: int, action_dim: int, seed: int = 0) -> None:
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self._capacity = capacity
        self._obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self._base = np.zeros((capacity, action_dim), dtype=np.float32)
        self._pool_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self._pool_base = np.zeros((capacity, action_dim), dtype=np.float32)
        self._next = 0
        self._seen = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Observations seen so far."""
        return self._seen

    def add(self, obs: np.ndarray, base_action: np.ndarray | None = None) -> None:
        with self._lock:
            i = self._next
            self._obs[i] = obs
            if base_action is None:
                self._base[i] = 0.0
            else:
                self._base[i] = base_action
            self._next = (i + 1) % self._capacity
            # Reservoir sampling (Algorithm R): every observation seen is in the pool with
            # probability capacity / seen.
            j = self._seen if self._seen < self._capacity else self._rng.randrange(self._seen + 1)
            if j < self._capacity:
                self._pool_obs[j] = self._obs[i]
                self._pool_base[j] = self._base[i]
            self._seen += 1

    def snapshot(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the last ``n`` (or fewer) observations and base actions, oldest first,
        followed by the reservoir's (those not among the last ones)."""
        with self._lock:
            k = min(n, self._seen, self._capacity)
            idx = (self._next - k + np.arange(k)) % self._capacity
            obs, base = self._obs[idx], self._base[idx]
            if self._seen > self._capacity:  # the reservoir holds older ones too
                obs = np.concatenate([obs, self._pool_obs])
                base = np.concatenate([base, self._pool_base])
            return obs.copy(), base.copy()


# ---------------------------------------------------------------------------- candidates
class Candidate(Protocol):
    """What :func:`verify_candidate` needs: a tag, dims, and one tick's computation."""

    tag: str
    obs_dim: int
    action_dim: int

    def run(self, obs: np.ndarray, base_action: np.ndarray) -> np.ndarray:
        """The candidate's outputs for one tick (raise on failure)."""
        ...


class PolicyCandidate:
    """A base model: one tick costs one chunk prediction (a re-plan tick, the worst case)."""

    def __init__(self, policy: OnnxPolicy, task: str) -> None:
        meta = policy.metadata
        self.policy = policy
        self.task = task
        self.tag = policy.tag
        self.obs_dim = meta.obs_dim
        self.action_dim = meta.action_dim
        self._chunk = np.zeros((meta.chunk_length, meta.action_dim), dtype=np.float32)

    def run(self, obs: np.ndarray, base_action: np.ndarray) -> np.ndarray:
        return self.policy.predict(obs, task=self.task, out=self._chunk)


class ResidualCandidate:
    """A residual actor (``actor(obs, base_action, out)``, e.g. :class:`MLPResidual`)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.tag = str(actor.tag)
        self.obs_dim = int(actor.obs_dim)
        self.action_dim = int(actor.action_dim)
        self._out = np.zeros(self.action_dim, dtype=np.float32)

    def run(self, obs: np.ndarray, base_action: np.ndarray) -> np.ndarray:
        self._out.fill(np.nan)
        self.actor(obs, base_action, self._out)
        return self._out


@dataclass(frozen=True)
class CheckReport:
    """What a passed check measured."""

    tag: str
    observations: int
    cost_s: float  # median time of the candidate's share of one tick
    tick_s: float  # cost_s + the rest of the tick
    budget_s: float
    timed_calls: int

    def describe(self) -> str:
        return (
            f"{self.tag}: finite and in range on {self.observations} recent observations; "
            f"{self.cost_s * 1e3:.3f} ms per tick (tick {self.tick_s * 1e3:.3f} ms of a "
            f"{self.budget_s * 1e3:.2f} ms budget)"
        )


def verify_candidate(
    candidate: Candidate,
    observations: np.ndarray,
    base_actions: np.ndarray,
    *,
    contract: RobotContract,
    config: SwapConfig,
    rest_of_tick_s: float = 0.0,
) -> CheckReport:
    """Dims, outputs on recent real observations, then the measured compute budget.

    ``observations`` [N, obs_dim] and ``base_actions`` [N, action_dim] are what the control path
    saw and ran (:meth:`RecentObservations.snapshot`); ``rest_of_tick_s`` is what the other part
    of a tick costs (the running base for a residual, the running residual for a base model).
    Raises :class:`CandidateRefused` with the reason.
    """
    tag = candidate.tag
    contract.check_dims(tag, candidate.obs_dim, candidate.action_dim)
    n = int(observations.shape[0])
    if n < config.min_observations:
        raise CandidateRefused(
            f"{tag}: only {n} recent observations to check it on "
            f"(min_observations={config.min_observations})"
        )
    bound = config.action_bound + _BOUND_SLACK
    budget = contract.tick_budget_s(config)
    with np.errstate(all="ignore"):  # non-finite outputs are the finding, not a warning
        # The budget first: a slow candidate is refused after a few calls.
        cost, calls = measure_cost(
            lambda i: candidate.run(observations[i % n], base_actions[i % n]),
            calls=config.timing_calls,
            limit_s=budget - rest_of_tick_s,
            errors=_failed_call(tag),
        )
        tick = cost + rest_of_tick_s
        if tick > budget:
            raise CandidateRefused(
                f"{tag} needs {cost * 1e3:.3f} ms per tick (median of {calls} calls; tick "
                f"{tick * 1e3:.3f} ms), over the budget of {budget * 1e3:.2f} ms "
                f"({config.tick_budget_fraction:g} of the {contract.control_period_s * 1e3:g} ms "
                "control period)"
            )
        for i in range(n):
            try:
                out = candidate.run(observations[i], base_actions[i])
            except PolicyOutputError:
                out = np.array([np.nan])
            except Exception as exc:
                raise CandidateRefused(
                    f"{tag} failed on recent observation {i}: {_first_line(exc)}"
                ) from None
            if not np.isfinite(out).all():
                raise CandidateRefused(
                    f"{tag} gives non-finite outputs on recent real observations ({i + 1} checked)"
                )
            peak = float(np.abs(out).max())
            if peak > bound:
                raise CandidateRefused(
                    f"{tag} gives outputs up to {peak:.4g} on recent real observations, outside "
                    f"+-{config.action_bound:g} (action_bound)"
                )
    return CheckReport(
        tag=tag,
        observations=n,
        cost_s=cost,
        tick_s=tick,
        budget_s=budget,
        timed_calls=calls,
    )


def measure_cost(
    call: Callable[[int], Any],
    *,
    calls: int,
    limit_s: float,
    errors: Callable[[Exception], None] | None = None,
) -> tuple[float, int]:
    """Median seconds of ``call(i)`` over ``calls`` calls, and how many ran.

    Stops early once three calls were all slower than ``limit_s`` (noise only adds time, so
    the candidate cannot pass): a slow candidate costs a few calls, not ``calls`` of them.
    """
    times: list[float] = []
    for i in range(calls):
        start = time.perf_counter()
        try:
            call(i)
        except PolicyOutputError:
            pass  # a non-finite output costs what it costs; the output check reports it
        except Exception as exc:
            if errors is None:
                raise
            errors(exc)
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and min(times) > limit_s:
            break
    return float(np.median(times)), len(times)


# ---------------------------------------------------------------------------- worker
Job = Callable[[Callable[[], bool]], Any]


class CandidateWorker:
    """One background thread that runs candidate jobs in submission order.

    ``submit(kind, job)``: ``job(cancelled)`` runs on the worker thread; a newer job of the same
    kind replaces one still waiting and makes ``cancelled()`` true for one running (a job waiting
    for observations checks it). Outcomes (the job's return value, or the exception it raised)
    are collected with :meth:`drain`, from the thread that applies them.
    """

    def __init__(self, name: str = "candidates") -> None:
        self._cond = threading.Condition()
        self._waiting: dict[str, tuple[int, Job]] = {}
        self._running: tuple[str, int] | None = None
        self._latest: dict[str, int] = {}
        self._serial = 0
        self._done: deque[tuple[str, Any]] = deque()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, kind: str, job: Job) -> list[str]:
        """Queue ``job``; returns the kinds of jobs it replaced (not yet started)."""
        with self._cond:
            self._serial += 1
            replaced = [kind] if kind in self._waiting else []
            self._waiting[kind] = (self._serial, job)
            self._latest[kind] = self._serial
            self._cond.notify_all()
            return replaced

    @property
    def busy(self) -> list[str]:
        """Kinds running or waiting."""
        with self._cond:
            kinds = [self._running[0]] if self._running else []
            return kinds + [k for k in self._waiting if k not in kinds]

    def drain(self) -> list[tuple[str, Any]]:
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                kind = min(self._waiting, key=lambda k: self._waiting[k][0])
                serial, job = self._waiting.pop(kind)
                self._running = (kind, serial)

            def cancelled(kind: str = kind, serial: int = serial) -> bool:
                return self._stopped or self._latest.get(kind) != serial

            try:
                outcome: Any = job(cancelled)
            except Exception as exc:  # the outcome of a refused candidate
                outcome = exc
            with self._cond:
                self._running = None
            self._done.append((kind, outcome))


def wait_for(
    predicate: Callable[[], bool],
    cancelled: Callable[[], bool],
    *,
    poll_s: float = 0.02,
) -> bool:
    """Poll ``predicate`` until true (True) or ``cancelled()`` (False)."""
    while not predicate():
        if cancelled():
            return False
        time.sleep(poll_s)
    return True


def _failed_call(tag: str) -> Callable[[Exception], None]:
    def refuse(exc: Exception) -> None:
        raise CandidateRefused(f"{tag} failed on a recent observation: {_first_line(exc)}")

    return refuse


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


__all__ = [
    "CandidateRefused",
    "CandidateWorker",
    "CheckReport",
    "PolicyCandidate",
    "RecentObservations",
    "ResidualCandidate",
    "RobotContract",
    "SwapConfig",
    "check_blob_size",
    "check_lineage",
    "check_model_file",
    "load_model_candidate",
    "measure_cost",
    "verify_candidate",
    "wait_for",
]
