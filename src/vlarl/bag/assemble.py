"""Control-path messages -> transitions, joined by header stamp (ROS-free, streaming).

What the graph puts on the wire for one simulator sample with stamp ``S`` (see
:mod:`vlarl.topics` and the nodes):

- ``robot/status`` (stamp S): episode, step (actions taken so far in the episode), success,
  terminal, truncated, env_reward of the state at S; ``robot/task_state`` (stamp S): frame_id =
  task name;
- ``observation`` (stamp S): the observation vector of that state, frame_id ``state``/``image``;
- ``policy/action`` (stamp S): point 0 = base action for this tick (``positions``) and residual
  (``effort``), frame_id = version tag;
- ``safety/command`` (stamp S): the command sent to the robot, frame_id = version tag,
  ``teleop`` or ``hold:<reason>``;
- ``reward`` (stamp S): the reward node's verdict on the state at S, i.e. on the step that *led
  to* S: reward, success, value, terminal, truncated, episode, step.

So a transition is a pair of consecutive samples (a, b) of one episode: obs = observation(a),
action = command(a), base/residual = policy action(a), next_obs = observation(b), reward,
success, terminal, truncated = reward(b), step = step(a) = step(b) - 1. The sample at which the
episode ends (terminal/truncated) is only ever a ``next_obs``; the action answering it never ran.

Decisions (and why):

- **Duplicates**: a re-sent sample (the lockstep simulator repeats a sample with its stamp when no
  command answered it) yields a second observation/action/command with the same stamp. The
  *first* of each is kept: in lockstep the simulator executes the first command whose stamp
  matches, and later ones are stale. Duplicates are counted.
- **Teleop steps** (command frame_id ``teleop``): intervention = 1, action = the teleop command,
  base_action/residual = what the policy proposed at that stamp, zeros if it proposed nothing;
  version tag ``teleop``.
- **Hold steps** (``hold:<reason>``): kept by default (``holds="keep"``), with the hold command as
  action, base/residual as for teleop and version tag ``hold:<reason>``. The robot really executed
  the hold, so the transition is true data (a reward or an episode end while holding must not be
  lost, and dropping it would leave a gap that breaks chunk windows and n-step returns); a learner
  that wants only policy-driven steps filters by the version tag. ``holds="drop"`` drops them.
- **Missing parts**: a pair without observation, next observation, command, reward (of b), or
  — for a policy command — the policy action is dropped and counted by reason; so is a pair whose
  steps are not consecutive (``gap``, e.g. samples lost in a corrupt split).
- **Reset marker**: sim_robot ends an episode on request with one extra sample of the same step
  and a newer stamp flagged truncated. That sample's "action" never ran, so it is not a
  transition; its truncated flag moves to the transition into its predecessor (the last real
  step), which then ends the episode.
- **After the end**: samples of an episode after the reward node ended it (e.g. success with
  ``terminate_on_success`` while the simulator goes on) are dropped and counted.
- **Episodes**: a segment of consecutive samples with one episode number (from ``reward``, else
  ``robot/status``); a new number, or a restarted simulator (steps going back while stamps go
  on, or stamps jumping back by more than ``RESTART_NS``), starts a new segment. Each segment
  becomes one replay episode with a fresh id. Late messages of a sample already settled (and
  samples with neither observation nor status) are counted as orphans and ignored.
- **Realtime mode**: the pairing assumes the command answering sample a is what the robot
  executed between a and b. That is exact in lockstep mode (the default); with
  ``mode: realtime`` a command that arrives after the simulator's tick is applied one tick late
  (or replaced by a hold), which the bag cannot show.

Streaming: :meth:`TransitionAssembler.feed` takes messages in log-time order; a sample is
*settled* once the stream is ``grace_ns`` past its first message (its late parts have arrived).
:meth:`TransitionAssembler.collect` emits the transitions of settled, ended episodes (an episode
longer than ``max_open_steps`` is emitted in parts under one replay id); the state needed to go
on (the raw messages of unfinished samples and a small :class:`Cursor`) can be saved and
restored, so a follower can stop and resume between any two bag splits.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from vlarl import topics
from vlarl.bag import cdr
from vlarl.data.replay import Transitions

# role -> (topic name in the topic table, ROS 2 message type)
ROLES: dict[str, tuple[str, str]] = {
    "observation": (topics.OBSERVATION, "sensor_msgs/msg/JointState"),
    "action": (topics.POLICY_ACTION, "trajectory_msgs/msg/JointTrajectory"),
    "command": (topics.COMMAND, "sensor_msgs/msg/JointState"),
    "reward": (topics.REWARD, "sensor_msgs/msg/JointState"),
    "status": (topics.ROBOT_STATUS, "sensor_msgs/msg/JointState"),
    "task": (topics.TASK_STATE, "sensor_msgs/msg/JointState"),
}
TELEOP_TAG = "teleop"
HOLD_PREFIX = "hold:"
UNKNOWN_TAG = "unknown@0"
HOLD_POLICIES = ("keep", "drop")
RESTART_NS = 10_000_000_000
"""Stamps this far behind the episode's last one mean the source clock restarted."""

# Fields the bridge reads of the reward and status records (vlarl.topics lists them all).
_REWARD_NEEDED = ("reward", "success", "terminal", "truncated", "episode", "step")
_STATUS_NEEDED = ("episode", "step")
assert set(_REWARD_NEEDED) <= set(topics.REWARD_FIELDS)
assert set(_STATUS_NEEDED) <= set(topics.ROBOT_STATUS_FIELDS)

# Reasons a candidate transition (a pair of consecutive samples) is not written.
DROP_NO_OBS = "no_observation"
DROP_NO_NEXT_OBS = "no_next_observation"
DROP_NO_COMMAND = "no_command"
DROP_NO_ACTION = "no_policy_action"
DROP_NO_REWARD = "no_reward"
DROP_GAP = "gap"
DROP_HOLD = "hold"
DROP_OBS_MISMATCH = "obs_mismatch"
DROP_ACTION_MISMATCH = "action_mismatch"
DROP_MARKER_UNAPPLIED = "reset_marker_unapplied"
# Reasons a whole sample is left out (counted per sample).
DROP_AFTER_END = "after_episode_end"
DROP_NO_EPISODE = "no_episode_info"


def topic_roles(namespace: str = "") -> dict[str, str]:
    """Bag topic name -> role, for topics under ``namespace`` ('' = the root namespace)."""
    ns = namespace.strip("/")
    prefix = f"/{ns}/" if ns else "/"
    return {prefix + name.lstrip("/"): role for role, (name, _) in ROLES.items()}


@dataclass(slots=True)
class _Sample:
    """Everything recorded about one simulator sample (one stamp)."""

    stamp: int
    first_log: int
    raw: list[tuple[str, int, bytes]] = field(default_factory=list)  # (role, log ns, CDR)
    obs: np.ndarray | None = None
    obs_kind: str = ""
    base: np.ndarray | None = None
    residual: np.ndarray | None = None
    action_tag: str = ""
    command: np.ndarray | None = None
    command_tag: str = ""
    # reward message: reward, success, terminal, truncated, episode, step
    reward: tuple[float, bool, bool, bool, int, int] | None = None
    # status message: episode, step
    status: tuple[int, int] | None = None
    task: str = ""

    @property
    def anchored(self) -> bool:
        """Has an observation or a status: a real sample, not a stray late message."""
        return self.obs is not None or self.status is not None

    def info(self) -> tuple[int, int] | None:
        """(episode, step), from the reward message, else the status; None if neither."""
        if self.reward is not None:
            return self.reward[4], self.reward[5]
        return self.status

    @property
    def ends(self) -> bool:
        return self.reward is not None and (self.reward[2] or self.reward[3])


@dataclass
class Cursor:
    """Where the episode walk stands: the latest segment (episode) and its last sample."""

    episode: int
    replay_episode: int | None  # id given to it in the replay (None: nothing written yet)
    last_step: int | None
    last_stamp: int
    ended: bool  # ended by its reward (terminal/truncated), or closed by a later episode
    open: bool  # samples of it are still to come (the walk resumes inside it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Cursor:
        return cls(
            episode=int(raw["episode"]),
            replay_episode=None if raw["replay_episode"] is None else int(raw["replay_episode"]),
            last_step=None if raw["last_step"] is None else int(raw["last_step"]),
            last_stamp=int(raw["last_stamp"]),
            ended=bool(raw["ended"]),
            open=bool(raw["open"]),
        )


@dataclass
class _Segment:
    episode: int
    replay_episode: int | None
    samples: list[_Sample]
    last_step: int | None
    last_stamp: int
    ended: bool = False
    before: Cursor | None = None  # the cursor before this segment's first held sample

    def cursor(self, *, open_: bool) -> Cursor:
        return Cursor(
            self.episode,
            self.replay_episode,
            self.last_step,
            self.last_stamp,
            self.ended,
            open_,
        )


@dataclass
class EpisodeRows:
    """Transitions of one replay episode produced by one :meth:`collect` (maybe a part of it)."""

    replay_episode: int
    bag_episode: int
    obs: list[np.ndarray] = field(default_factory=list)
    next_obs: list[np.ndarray] = field(default_factory=list)
    action: list[np.ndarray] = field(default_factory=list)
    base_action: list[np.ndarray] = field(default_factory=list)
    residual: list[np.ndarray] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    terminal: list[int] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    success: list[int] = field(default_factory=list)
    intervention: list[int] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    version: list[str] = field(default_factory=list)
    task: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.step)

    def to_transitions(
        self, version_index: Callable[[str], int], task_index: Callable[[str], int]
    ) -> Transitions:
        """Columns of these rows; version/task names mapped through the given indexers."""
        return Transitions(
            obs=np.stack(self.obs).astype(np.float32),
            next_obs=np.stack(self.next_obs).astype(np.float32),
            action=np.stack(self.action).astype(np.float32),
            base_action=np.stack(self.base_action).astype(np.float32),
            residual=np.stack(self.residual).astype(np.float32),
            reward=np.asarray(self.reward, dtype=np.float32),
            terminal=np.asarray(self.terminal, dtype=np.uint8),
            truncated=np.asarray(self.truncated, dtype=np.uint8),
            success=np.asarray(self.success, dtype=np.uint8),
            intervention=np.asarray(self.intervention, dtype=np.uint8),
            episode=np.full(len(self), self.replay_episode, dtype=np.int64),
            step=np.asarray(self.step, dtype=np.int64),
            policy_version=np.asarray([version_index(v) for v in self.version], np.int32),
            task=np.asarray([task_index(t) for t in self.task], np.int32),
        )


@dataclass
class Shape:
    """Observation kind/width and action width every written row must share (set by the first)."""

    obs_kind: str | None = None
    obs_dim: int | None = None
    action_dim: int | None = None


@dataclass
class AssemblyCounts:
    """What an assembler saw besides the transitions (drained by :meth:`take_counts`)."""

    dropped: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    orphans: int = 0  # messages of samples that never had an observation or status (or late)
    unterminated: int = 0  # episodes closed by a later one without a terminal/truncated reward


def _finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all())


class TransitionAssembler:
    """Joins one bag's control-path messages into transitions (see the module docstring).

    ``feed`` messages in log-time order; ``collect`` returns the finished episodes' rows.
    ``carry()`` and ``cursor_state()`` say how to resume: build a new assembler with the cursor
    and feed it the carried messages, then go on with the rest of the stream.
    """

    def __init__(
        self,
        *,
        grace_ns: int = 2_000_000_000,
        max_open_steps: int = 2000,
        holds: str = "keep",
        shape: Shape | None = None,
        cursor: Cursor | None = None,
        last_task: str = "",
        default_task: str = "unknown",
    ) -> None:
        if holds not in HOLD_POLICIES:
            raise ValueError(f"holds must be one of {HOLD_POLICIES}, got {holds!r}")
        if grace_ns < 0 or max_open_steps < 1:
            raise ValueError("grace_ns must be >= 0 and max_open_steps >= 1")
        self.grace_ns = int(grace_ns)
        self.max_open_steps = int(max_open_steps)
        self.holds = holds
        self.shape = shape if shape is not None else Shape()
        self.default_task = default_task
        self.last_task = last_task
        self.counts = AssemblyCounts()
        self._samples: list[_Sample] = []  # not yet walked, in order of first message
        self._index: dict[int, _Sample] = {}  # stamp -> sample still open to late messages
        self._watermark = -1  # newest log time fed
        self._cursor = cursor
        self._open: _Segment | None = None
        if cursor is not None and cursor.open and not cursor.ended:
            self._open = _Segment(
                cursor.episode,
                cursor.replay_episode,
                [],
                cursor.last_step,
                cursor.last_stamp,
                before=cursor,
            )

    # ------------------------------------------------------------------ input
    def feed(self, role: str, log_ns: int, data: bytes) -> None:
        """One recorded message of ``role`` (see :data:`ROLES`); malformed ones are counted."""
        try:
            stamp, apply = self._decode(role, data)
        except (cdr.CdrError, ValueError):
            self.counts.malformed[role] += 1
            return
        if log_ns > self._watermark:
            self._watermark = log_ns
        sample = self._index.get(stamp)
        if sample is None:
            sample = _Sample(stamp=stamp, first_log=log_ns)
            self._index[stamp] = sample
            self._samples.append(sample)
        if apply(sample):
            sample.raw.append((role, log_ns, data))
        else:
            self.counts.duplicates[role] += 1

    def _decode(self, role: str, data: bytes) -> tuple[int, Callable[[_Sample], bool]]:
        """(stamp, a function that stores the message in a sample; False if it had one)."""
        if role == "action":
            head = cdr.trajectory_head(data)
            if head.points == 0 or head.positions.size == 0:
                raise ValueError("action without points")
            base = head.positions
            residual = head.effort if head.effort.size else np.zeros_like(base)
            if residual.shape != base.shape or not (_finite(base) and _finite(residual)):
                raise ValueError("bad action point")

            def put_action(s: _Sample) -> bool:
                if s.base is not None:
                    return False
                s.base, s.residual, s.action_tag = base, residual, head.frame_id
                return True

            return head.stamp_ns, put_action
        if role == "task":  # only the header: frame_id = task name
            stamp, task = cdr.header(data)

            def put_task(s: _Sample) -> bool:
                if s.task:
                    return False
                s.task = task
                return True

            return stamp, put_task
        js = cdr.joint_state(data)
        if role == "observation":
            if js.position.size == 0 or not _finite(js.position):
                raise ValueError("bad observation")

            def put_obs(s: _Sample) -> bool:
                if s.obs is not None:
                    return False
                s.obs, s.obs_kind = js.position, js.frame_id or "state"
                return True

            return js.stamp_ns, put_obs
        if role == "command":
            if js.position.size == 0 or not _finite(js.position):
                raise ValueError("bad command")

            def put_command(s: _Sample) -> bool:
                if s.command is not None:
                    return False
                s.command, s.command_tag = js.position, js.frame_id
                return True

            return js.stamp_ns, put_command
        if role == "reward":
            rec = self._fields(js, _REWARD_NEEDED)
            reward = (
                rec["reward"],
                rec["success"] >= 0.5,
                rec["terminal"] >= 0.5,
                rec["truncated"] >= 0.5,
                int(rec["episode"]),
                int(rec["step"]),
            )

            def put_reward(s: _Sample) -> bool:
                if s.reward is not None:
                    return False
                s.reward = reward
                return True

            return js.stamp_ns, put_reward
        if role == "status":
            rec = self._fields(js, _STATUS_NEEDED)
            status = (int(rec["episode"]), int(rec["step"]))

            def put_status(s: _Sample) -> bool:
                if s.status is not None:
                    return False
                s.status = status
                return True

            return js.stamp_ns, put_status
        raise ValueError(f"unknown role {role!r}")

    @staticmethod
    def _fields(js: cdr.JointStateFields, names: Iterable[str]) -> dict[str, float]:
        record = dict(zip(js.name, js.position.tolist(), strict=False))
        out: dict[str, float] = {}
        for name in names:
            value = record.get(name)
            if value is None or not math.isfinite(value):
                raise ValueError(f"field {name} missing or non-finite")
            out[name] = float(value)
        return out

    # ------------------------------------------------------------------ state
    @property
    def cursor(self) -> Cursor | None:
        """The walk's position (latest segment)."""
        return self._cursor

    def cursor_state(self) -> Cursor | None:
        """The cursor to restore with the carried messages: the state just before them."""
        seg = self._open
        if seg is None:
            return self._cursor
        if not seg.samples:
            return seg.before
        if seg.replay_episode is None:  # nothing of it written: it restarts from the carry
            return seg.before
        first = seg.samples[0]
        info = first.info()
        # The walk resumes inside this episode, just before its first carried sample.
        return Cursor(
            seg.episode,
            seg.replay_episode,
            None if info is None else info[1],
            first.stamp - 1,
            False,
            True,
        )

    def carry(self) -> list[tuple[str, int, bytes]]:
        """Raw messages (role, log ns, CDR) of every sample still needed, in log-time order."""
        held: list[_Sample] = list(self._open.samples) if self._open is not None else []
        held.extend(self._samples)
        messages = [m for s in held for m in s.raw]
        messages.sort(key=lambda m: m[1])
        return messages

    @property
    def pending_samples(self) -> int:
        return len(self._samples) + (len(self._open.samples) if self._open is not None else 0)

    def take_counts(self) -> AssemblyCounts:
        """The counts since the last call (and reset them)."""
        counts, self.counts = self.counts, AssemblyCounts()
        return counts

    # ------------------------------------------------------------------ output
    def collect(self, *, final: bool = False, next_episode: Callable[[], int]) -> list[EpisodeRows]:
        """Rows of every settled episode that ended (all samples settled when ``final``).

        ``next_episode()`` hands out replay episode ids. An episode still running is held back
        until it ends, unless it has more than ``max_open_steps`` settled samples: then all but
        its newest transition is written (that one waits, in case the next sample is a reset
        marker that flags it truncated), continuing under the same replay id later. ``final``
        writes every transition it has.
        """
        out: list[EpisodeRows] = []
        limit = self._watermark - self.grace_ns
        settled = 0
        for sample in self._samples:
            if not final and sample.first_log > limit:
                break
            settled += 1
        walk, self._samples = self._samples[:settled], self._samples[settled:]
        for sample in walk:
            if self._index.get(sample.stamp) is sample:
                del self._index[sample.stamp]
            self._walk(sample, out, next_episode)
        seg = self._open
        if seg is not None:
            if final and len(seg.samples) > 1:
                self._emit(seg, out, next_episode, closing=False, keep=1)
            elif len(seg.samples) > max(2, self.max_open_steps):
                self._emit(seg, out, next_episode, closing=False, keep=2)
        return out

    def _walk(self, s: _Sample, out: list[EpisodeRows], next_episode: Callable[[], int]) -> None:
        if not s.anchored:
            self.counts.orphans += len(s.raw)
            return
        if s.task:
            self.last_task = s.task
        info = s.info()
        seg = self._open
        cur = self._cursor
        if info is None:
            if seg is not None and not seg.ended and s.stamp > seg.last_stamp:
                seg.samples.append(s)
                seg.last_stamp = s.stamp
                seg.last_step = None
                self._cursor = seg.cursor(open_=True)
            else:
                self.counts.dropped[DROP_NO_EPISODE] += 1
            return
        episode, step = info
        same = cur is not None and episode == cur.episode
        if cur is not None and same:
            newer = s.stamp > cur.last_stamp
            back = cur.last_step is not None and step < cur.last_step
            # A restarted simulator counts again from the same episode number: its steps go
            # back while its (wall-clock) stamps go on, or its (sim-time) stamps jump back.
            same = not ((newer and back) or s.stamp < cur.last_stamp - RESTART_NS)
            if same and (not newer or back):
                self.counts.orphans += len(s.raw)  # late or out of order: not part of the walk
                return
        if same:
            if cur is None or cur.ended or seg is None:
                self.counts.dropped[DROP_AFTER_END] += 1
                return
            seg.samples.append(s)
            seg.last_step, seg.last_stamp = step, s.stamp
        else:
            if seg is not None:
                if not seg.ended:
                    self.counts.unterminated += 1
                seg.ended = True
                self._emit(seg, out, next_episode, closing=True)
            seg = self._open = _Segment(episode, None, [s], step, s.stamp, before=self._cursor)
        if s.ends:
            seg.ended = True
            self._emit(seg, out, next_episode, closing=True)
        self._cursor = seg.cursor(open_=not seg.ended)
        if seg.ended:
            self._open = None

    def _emit(
        self,
        seg: _Segment,
        out: list[EpisodeRows],
        next_episode: Callable[[], int],
        *,
        closing: bool,
        keep: int = 1,
    ) -> None:
        """Rows of the segment's pairs; unless it is closed, its last ``keep`` samples stay
        (and the pairs among them are written later)."""
        samples = seg.samples
        upto = len(samples) if closing else len(samples) - keep + 1
        rows = EpisodeRows(replay_episode=-1, bag_episode=seg.episode)
        for a, b in pairwise(samples[:upto]):
            self._pair(a, b, rows)
        if len(rows):
            if seg.replay_episode is None:  # an id only for an episode that has rows
                seg.replay_episode = next_episode()
            rows.replay_episode = seg.replay_episode
            out.append(rows)
        seg.samples = [] if closing else samples[-keep:]
        self._cursor = seg.cursor(open_=not closing)

    def _pair(self, a: _Sample, b: _Sample, rows: EpisodeRows) -> None:
        dropped = self.counts.dropped
        rb = b.reward
        if rb is None:
            dropped[DROP_NO_REWARD] += 1
            return
        a_info = a.info()
        step_a = None if a_info is None else a_info[1]
        step_b = rb[5]
        if step_a is not None and step_b == step_a and b.stamp > a.stamp and rb[3]:
            # sim_robot's reset marker: the episode was truncated at sample a.
            if len(rows) and rows.step[-1] == step_a - 1:
                rows.truncated[-1] = 1
            else:
                dropped[DROP_MARKER_UNAPPLIED] += 1
            return
        if step_b < 1 or (step_a is not None and step_b != step_a + 1):
            dropped[DROP_GAP] += 1
            return
        if a.obs is None:
            dropped[DROP_NO_OBS] += 1
            return
        if b.obs is None:
            dropped[DROP_NO_NEXT_OBS] += 1
            return
        if a.command is None:
            dropped[DROP_NO_COMMAND] += 1
            return
        tag = a.command_tag
        command = a.command
        if tag == TELEOP_TAG or tag.startswith(HOLD_PREFIX):
            if tag != TELEOP_TAG and self.holds == "drop":
                dropped[DROP_HOLD] += 1
                return
            if a.base is not None and a.base.shape == command.shape:
                base, residual = a.base, a.residual
            else:
                base = residual = np.zeros_like(command)
        else:
            if a.base is None:
                dropped[DROP_NO_ACTION] += 1
                return
            base, residual = a.base, a.residual
            tag = tag or a.action_tag or UNKNOWN_TAG
        if base.shape != command.shape:
            dropped[DROP_ACTION_MISMATCH] += 1
            return
        shape = self.shape
        if (
            a.obs.shape != b.obs.shape
            or a.obs_kind != b.obs_kind
            or (shape.obs_kind is not None and a.obs_kind != shape.obs_kind)
            or (shape.obs_dim is not None and a.obs.shape[0] != shape.obs_dim)
        ):
            dropped[DROP_OBS_MISMATCH] += 1
            return
        if shape.action_dim is not None and command.shape[0] != shape.action_dim:
            dropped[DROP_ACTION_MISMATCH] += 1
            return
        shape.obs_kind = a.obs_kind
        shape.obs_dim = int(a.obs.shape[0])
        shape.action_dim = int(command.shape[0])
        assert residual is not None
        rows.obs.append(a.obs)
        rows.next_obs.append(b.obs)
        rows.action.append(command)
        rows.base_action.append(base)
        rows.residual.append(residual)
        rows.reward.append(float(rb[0]))
        rows.success.append(int(rb[1]))
        rows.terminal.append(int(rb[2]))
        rows.truncated.append(int(rb[3] and not rb[2]))
        rows.intervention.append(1 if tag == TELEOP_TAG else 0)
        rows.step.append(step_b - 1)
        rows.version.append(tag)
        rows.task.append(a.task or b.task or self.last_task or self.default_task)


def chunk_transitions(
    data: Transitions, *, horizon: int, gamma: float = 0.99, stride: int = 1
) -> tuple[Transitions, Counter[str]]:
    """Chunk-level transitions from per-step ones, for learners of action chunks.

    Row for a chunk starting at step t of an episode: obs = obs_t; action/base_action/residual =
    the ``horizon`` executed actions t..t+H-1 flattened step-major ([H*A], action j at
    ``[j*A:(j+1)*A]``); reward = sum_j gamma^j r_{t+j}; next_obs = the observation after the
    chunk; success/intervention = any within the chunk; policy_version/task/step = those of step
    t (the tag that acted at the chunk start). Chunks start every ``stride`` steps.

    A chunk that reaches a terminal step early ends there: reward sums the steps it has, the
    remaining actions repeat its last action (nothing is bootstrapped after a terminal, so they
    do not matter), terminal = 1. A chunk cut by a truncation or by missing steps is dropped
    (bootstrapping it with gamma^H would be wrong); the counts say how many, by reason.
    """
    if horizon < 1 or stride < 1:
        raise ValueError("horizon and stride must be >= 1")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError("gamma must be in [0, 1]")
    dropped: Counter[str] = Counter()
    picks: list[np.ndarray] = []  # [H] row indices per chunk (last real row repeated)
    lengths: list[int] = []
    for _, rows in data.episodes():
        steps = data.step[rows]
        ends = (data.terminal[rows] | data.truncated[rows]).astype(bool)
        n = len(rows)
        for i in range(0, n, stride):
            take = [i]
            ok = True
            while len(take) < horizon:
                j = take[-1]
                if ends[j]:
                    break
                if j + 1 >= n or steps[j + 1] != steps[j] + 1:
                    ok = False
                    break
                take.append(j + 1)
            last = take[-1]
            if not ok:
                dropped["chunk_cut"] += 1
                continue
            if len(take) < horizon and not data.terminal[rows[last]]:
                dropped["chunk_truncated"] += 1
                continue
            lengths.append(len(take))
            take += [last] * (horizon - len(take))
            picks.append(rows[np.asarray(take)])
    a_dim = data.action_dim
    if not picks:
        empty = Transitions.empty(obs_dim=data.obs_dim, action_dim=a_dim * horizon)
        return empty, dropped
    idx = np.stack(picks)  # [N, H]
    n_chunks = idx.shape[0]
    length = np.asarray(lengths)
    real = np.arange(horizon)[None, :] < length[:, None]  # [N, H]
    discount = (gamma ** np.arange(horizon, dtype=np.float64))[None, :]
    reward = (data.reward[idx].astype(np.float64) * discount * real).sum(axis=1)
    last = idx[np.arange(n_chunks), length - 1]

    def flat(col: np.ndarray) -> np.ndarray:
        return col[idx].reshape(n_chunks, horizon * a_dim).astype(np.float32)

    chunked = Transitions(
        obs=data.obs[idx[:, 0]],
        next_obs=data.next_obs[last],
        action=flat(data.action),
        base_action=flat(data.base_action),
        residual=flat(data.residual),
        reward=reward.astype(np.float32),
        terminal=data.terminal[last],
        truncated=data.truncated[last],
        success=(data.success[idx] * real).max(axis=1).astype(np.uint8),
        intervention=(data.intervention[idx] * real).max(axis=1).astype(np.uint8),
        episode=data.episode[idx[:, 0]],
        step=data.step[idx[:, 0]],
        policy_version=data.policy_version[idx[:, 0]],
        task=data.task[idx[:, 0]],
    )
    return chunked, dropped
