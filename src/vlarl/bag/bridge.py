"""The bag bridge: rosbag2 bags -> replay shards, in batch or following a recording live.

ROS-free (rosbags and mcap read the files; :mod:`vlarl.bag.cdr` decodes the few layouts
needed), so it runs where no ROS is installed. Reads bag directories (``metadata.yaml`` +
splits, mcap or sqlite3, written by the vlarl recorder or by stock ``ros2 bag record``) and
single ``.mcap``/``.db3`` files, in rosbag2's stock layouts too (zstd file compression, split
files ``*.mcap.zstd``/``*.db3.zstd``; zstd message compression; types spelled ``pkg/Type``; see
:mod:`vlarl.bag.splits`). How messages become transitions (join by header stamp, teleop,
holds, missing parts, episodes) is documented in :mod:`vlarl.bag.assemble`.

**Which bags.** Batch mode first checks that every bag records the control path
(observation, policy action, safety command, reward under ``namespace``) and refuses one that
does not, naming what it needs and what it found (and the namespace it seems to use), rather
than bridging it to 0 transitions.

**The ledger.** Every replay directory the bridge writes holds ``bridge-ledger.json``: per bag
(and namespace: the same recording read under another namespace is other data), the splits
already ingested (by name without a ``.zstd`` suffix, so a split compressed after it was read
is not read again), where the episode walk stands, and the name of a *carry* file with
the raw messages of samples not yet written (an episode still running, messages that may still
get late parts). Batch and live mode share it: :func:`bridge_bags` is one final pass of the same
machinery. Each commit is: carry file (new name) -> shard (whose header ``extra.bridge.delta``
says how the commit changes the ledger) -> ledger (atomic replace). Killing the bridge at any
point therefore loses nothing and duplicates nothing: before the shard exists the old ledger
still points at the old carry and the splits are read again; after the shard but before the
ledger, the next start finds the shard one commit ahead and rolls the ledger forward with its
delta. A directory with shards that no ledger accounts for is refused (the bridge never mixes
its rows into someone else's replay), and one follower at a time may write to a directory (a
lock file).

**Live.** :class:`BridgeFollower` polls a bag (or a folder of bags, e.g. the recorder's
``output_dir``) for *closed* splits (see :mod:`vlarl.bag.splits`), ingests each exactly once, and
writes one shard per bag per poll that produced transitions. An episode cut by a split boundary
stays in the carry and is written whole when the split that finishes it closes. When the
recorder closes the bag (or, with ``idle_finish_s``, when a bag stopped changing), what is left
is written.

**Bad splits.** A split that cannot be read (truncated, garbage) is reported with the error and
skipped; from a damaged mcap the messages before the damage are salvaged; everything else is
kept. Transitions that straddle the lost part are dropped and counted (``gap``/missing parts).

**Unclosed bags.** A bag whose recorder was killed keeps its open split in ``.partial/``; the
report's notes name the bag. While the bag may still grow its open split is skipped (and the
notes say so); once it counts as finished (batch mode, or idle) the open split is read up to its
last intact chunk and listed among the bad splits with what was salvaged.

**Report.** :class:`BridgeReport`: messages read per topic, splits read, bad splits with their
error, transitions and episodes written, shards, and dropped candidates by reason. The follower
keeps a cumulative one in the ledger and writes it to ``bridge-report.json`` in the replay
directory after every commit.

**Chunks.** With ``BridgeConfig(chunk=H)`` the shards hold chunk-level transitions (see
:func:`vlarl.bag.assemble.chunk_transitions`) instead of per-step ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vlarl.bag.assemble import (
    HOLD_POLICIES,
    ROLES,
    Cursor,
    EpisodeRows,
    Shape,
    TransitionAssembler,
    chunk_transitions,
    topic_roles,
)
from vlarl.bag.errors import BridgeError
from vlarl.bag.splits import (
    BagLayout,
    bag_layout,
    bag_topics,
    find_bags,
    is_bag,
    newest_change,
    read_split,
    split_id,
)
from vlarl.data.errors import ReplayError
from vlarl.data.replay import (
    SHARD_PATTERN,
    ShardInfo,
    Transitions,
    atomic_write_bytes,
    header_metadata,
    list_shards,
    read_shard,
    shard_name,
    write_shard,
)

__all__ = [
    "LEDGER_NAME",
    "REPORT_NAME",
    "BadSplit",
    "BridgeConfig",
    "BridgeFollower",
    "BridgeReport",
    "bridge_bags",
    "chunk_transitions",
]

log = logging.getLogger(__name__)

LEDGER_NAME = "bridge-ledger.json"
REPORT_NAME = "bridge-report.json"
LOCK_NAME = ".bridge.lock"
LEDGER_FORMAT = "vlarl.bridge-ledger/1"
CARRY_MAGIC = b"VLCARRY1"
_CARRY_PREFIX = "bridge-carry-"


@dataclass(frozen=True)
class BridgeConfig:
    """How bags become replay rows (the first four must stay the same for a replay directory)."""

    chunk: int = 0
    """0: per-step transitions; H >= 1: chunk-level transitions of H executed actions."""
    gamma: float = 0.99
    """Discount inside a chunk (chunk mode only)."""
    chunk_stride: int = 1
    """Steps between the starts of consecutive chunks (chunk mode only)."""
    holds: str = "keep"
    """Safety hold steps: keep (action = the hold, tag 'hold:<reason>') or drop."""
    namespace: str = ""
    """ROS namespace of the recorded topics ('' = /observation, /policy/action, ...)."""
    grace_s: float = 2.0
    """Log-time window in which late parts of a sample (reward, command) are still joined."""
    max_open_steps: int = 2000
    """A running episode is written in parts once it holds more than this many samples."""
    shard_rows: int = 50_000
    """Batch: start a new shard (at a split boundary) once this many rows are pending."""
    default_task: str = "unknown"
    """Task name for rows when the bag has no robot/task_state."""
    idle_finish_s: float = 0.0
    """Live: a bag that has not changed for this long counts as finished (0 = only when the
    recorder closes it); its unlisted split files are then read too."""
    fsync: bool = True
    """Flush ledger and carry files to disk before they count."""

    def __post_init__(self) -> None:
        if self.chunk < 0 or self.chunk_stride < 1:
            raise BridgeError("chunk must be >= 0 and chunk_stride >= 1")
        if not 0.0 <= self.gamma <= 1.0:
            raise BridgeError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.holds not in HOLD_POLICIES:
            raise BridgeError(f"holds must be one of {HOLD_POLICIES}, got {self.holds!r}")
        if self.grace_s < 0 or self.max_open_steps < 1 or self.shard_rows < 1:
            raise BridgeError("grace_s must be >= 0, max_open_steps and shard_rows >= 1")
        if self.idle_finish_s < 0:
            raise BridgeError("idle_finish_s must be >= 0")

    def fixed(self) -> dict[str, Any]:
        """The settings a replay directory is built with (recorded in its ledger)."""
        return {
            "chunk": self.chunk,
            "gamma": self.gamma if self.chunk else None,
            "chunk_stride": self.chunk_stride if self.chunk else None,
            "holds": self.holds,
        }


@dataclass
class BadSplit:
    """A split that could not be read in full."""

    path: str
    error: str
    salvaged: int = 0  # messages recovered from it anyway


@dataclass
class BridgeReport:
    """What a bridge run (or, cumulated in the ledger, a replay directory) read and wrote."""

    messages: dict[str, int] = field(default_factory=dict)
    """Messages read per topic (bridged topics only)."""
    splits: int = 0
    """Splits read (bad ones included)."""
    bad_splits: list[BadSplit] = field(default_factory=list)
    transitions: int = 0
    """Rows written (chunks in chunk mode)."""
    episodes: int = 0
    """Replay episodes started."""
    shards: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    """Candidate transitions not written, by reason (see vlarl.bag.assemble)."""
    duplicates: dict[str, int] = field(default_factory=dict)
    """Re-sent messages (same stamp) ignored, per role."""
    malformed: dict[str, int] = field(default_factory=dict)
    """Messages that could not be decoded or had non-finite values, per role."""
    orphans: int = 0
    """Messages of samples without observation and status (or arriving too late)."""
    unterminated: int = 0
    """Episodes that ended without a terminal/truncated reward (the next one began)."""
    notes: list[str] = field(default_factory=list)

    def add(self, other: BridgeReport) -> None:
        for name in ("messages", "dropped", "duplicates", "malformed"):
            mine: dict[str, int] = getattr(self, name)
            for key, value in getattr(other, name).items():
                mine[key] = mine.get(key, 0) + int(value)
        self.splits += other.splits
        self.bad_splits.extend(other.bad_splits)
        self.transitions += other.transitions
        self.episodes += other.episodes
        self.shards.extend(other.shards)
        self.orphans += other.orphans
        self.unterminated += other.unterminated
        for note in other.notes:
            if note not in self.notes:
                self.notes.append(note)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BridgeReport:
        known = {f.name for f in fields(cls)}
        values = {k: copy.deepcopy(v) for k, v in raw.items() if k in known}
        values["bad_splits"] = [BadSplit(**b) for b in raw.get("bad_splits", [])]
        return cls(**values)

    def summary(self) -> str:
        """A few lines for people."""
        lines = [
            f"{self.transitions} transitions in {self.episodes} new episodes, "
            f"{len(self.shards)} shard(s); {self.splits} split(s) read, "
            f"{len(self.bad_splits)} bad"
        ]
        if self.messages:
            lines.append(
                "messages: " + ", ".join(f"{t} {n}" for t, n in sorted(self.messages.items()))
            )
        if self.dropped:
            lines.append(
                "dropped: " + ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items()))
            )
        extras = []
        if self.duplicates:
            extras.append(f"duplicates {sum(self.duplicates.values())}")
        if self.malformed:
            extras.append(f"malformed {sum(self.malformed.values())}")
        if self.orphans:
            extras.append(f"orphan messages {self.orphans}")
        if self.unterminated:
            extras.append(f"unterminated episodes {self.unterminated}")
        if extras:
            lines.append("ignored: " + ", ".join(extras))
        for bad in self.bad_splits:
            lines.append(f"bad split {bad.path}: {bad.error} (salvaged {bad.salvaged} messages)")
        lines.extend(self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------- carry files
def _write_atomic(path: Path, payload: bytes, *, fsync: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        try:
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _encode_carry(messages: Sequence[tuple[str, int, bytes]]) -> bytes:
    index = []
    offset = 0
    for role, log_ns, data in messages:
        index.append([role, int(log_ns), offset, len(data)])
        offset += len(data)
    payload = b"".join(m[2] for m in messages)
    head = json.dumps({"messages": index, "sha256": hashlib.sha256(payload).hexdigest()})
    raw = head.encode()
    return CARRY_MAGIC + struct.pack("<Q", len(raw)) + raw + payload


def _decode_carry(blob: bytes, where: str) -> list[tuple[str, int, bytes]]:
    if not blob.startswith(CARRY_MAGIC) or len(blob) < len(CARRY_MAGIC) + 8:
        raise BridgeError(f"{where}: not a bridge carry file")
    (size,) = struct.unpack_from("<Q", blob, len(CARRY_MAGIC))
    start = len(CARRY_MAGIC) + 8
    try:
        head = json.loads(blob[start : start + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BridgeError(f"{where}: carry header is not JSON ({exc})") from None
    payload = blob[start + size :]
    if hashlib.sha256(payload).hexdigest() != head.get("sha256"):
        raise BridgeError(f"{where}: carry file is damaged (sha256 mismatch)")
    return [
        (str(role), int(log_ns), bytes(payload[offset : offset + length]))
        for role, log_ns, offset, length in head["messages"]
    ]


# --------------------------------------------------------------------------- the follower
def _lock_directory(directory: Path) -> Any:
    """An exclusive lock on the replay directory for this follower's lifetime (one writer)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        return None
    handle = open(directory / LOCK_NAME, "a+b")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise BridgeError(
            f"{directory}: another bridge is writing to this replay directory"
        ) from None
    return handle


def _fresh_state(config: BridgeConfig) -> dict[str, Any]:
    return {
        "format": LEDGER_FORMAT,
        "seq": 0,
        "config": config.fixed(),
        "shape": {"obs_kind": None, "obs_dim": None, "action_dim": None},
        "next_shard": 0,
        "next_episode": 0,
        "bags": {},
        "totals": BridgeReport().to_dict(),
    }


def _apply_delta(state: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """The ledger after one commit (the same function writes it and rolls it forward)."""
    new = copy.deepcopy(state)
    new["seq"] = int(delta["seq"])
    before = new["bags"].get(delta["bag"]) or {}
    entry = copy.deepcopy(delta["entry"])
    entry["done"] = list(before.get("done", [])) + list(delta["added"])
    new["bags"][delta["bag"]] = entry
    new["next_episode"] = int(delta["next_episode"])
    new["next_shard"] = int(delta["next_shard"])
    new["shape"] = dict(delta["shape"])
    totals = BridgeReport.from_dict(new["totals"])
    totals.add(BridgeReport.from_dict(delta["report"]))
    new["totals"] = totals.to_dict()
    return new


def _read_extra(path: Path) -> dict[str, Any]:
    """The ``extra`` header entry of a shard, reading only its header."""
    where = str(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ReplayError(f"{where}: file is truncated")
            (size,) = struct.unpack("<Q", head)
            payload = head + handle.read(size)
    except OSError as exc:
        raise ReplayError(f"{where}: cannot read ({exc})") from None
    meta = header_metadata(payload, where)
    try:
        extra = json.loads(meta.get("extra", "{}") or "{}")
    except json.JSONDecodeError:
        return {}
    return extra if isinstance(extra, dict) else {}


@dataclass
class _Pending:
    """Rows collected for one bag since its last commit."""

    rows: list[EpisodeRows] = field(default_factory=list)
    count: int = 0
    report: BridgeReport = field(default_factory=BridgeReport)


class BridgeFollower:
    """Ingests the closed splits of bags into a replay directory, each exactly once.

    ``bags``: one path or several, each a bag (directory or storage file) or a folder whose
    sub-directories are bags (looked up again at every poll, so new recordings are found).
    ``poll()`` reads what closed since the last poll and returns the shards it wrote;
    ``run(stop_event, period_s)`` polls until the event is set. Restart-safe: a new follower on
    the same ``replay_dir`` goes on where the last one committed (see the module docstring).
    """

    def __init__(
        self,
        bags: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        replay_dir: str | os.PathLike[str],
        *,
        config: BridgeConfig | None = None,
    ) -> None:
        if isinstance(bags, (str, os.PathLike)):
            bags = [bags]
        self.sources = [Path(b) for b in bags]
        if not self.sources:
            raise BridgeError("no bag paths given")
        self.replay_dir = Path(replay_dir)
        self.config = config or BridgeConfig()
        self._roles = topic_roles(self.config.namespace)
        self.replay_dir.mkdir(parents=True, exist_ok=True)
        self.last_report = BridgeReport()
        self._state: dict[str, Any] = {}
        self._assemblers: dict[str, TransitionAssembler] = {}
        self._shape = Shape()
        self._next_episode = 0
        self._announce: list[ShardInfo] = []  # committed shards poll() has not returned yet
        self._lock = _lock_directory(self.replay_dir)
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give up the replay directory (the lock that keeps a second bridge out). Idempotent;
        everything committed is on disk already, so there is nothing to flush."""
        lock = getattr(self, "_lock", None)
        self._lock = None
        if lock is not None:
            lock.close()

    def __enter__(self) -> BridgeFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ ledger
    @property
    def ledger_path(self) -> Path:
        return self.replay_dir / LEDGER_NAME

    @property
    def report(self) -> BridgeReport:
        """Everything this replay directory's ledger has recorded, over all runs."""
        return BridgeReport.from_dict(self._state["totals"])

    def _load(self) -> None:
        """Read the ledger (rolling it forward to a shard committed after it), then restore."""
        config = self.config
        path = self.ledger_path
        if path.exists():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise BridgeError(f"{path}: cannot read the bridge ledger ({exc})") from None
            if not isinstance(state, dict) or state.get("format") != LEDGER_FORMAT:
                raise BridgeError(f"{path}: not a {LEDGER_FORMAT} ledger")
            if state["config"] != config.fixed():
                raise BridgeError(
                    f"{self.replay_dir}: built with bridge settings {state['config']}, "
                    f"asked for {config.fixed()}; use another replay directory"
                )
        else:
            state = _fresh_state(config)
        for shard in list_shards(self.replay_dir):
            index = int(SHARD_PATTERN.match(shard.name).group(1))  # type: ignore[union-attr]
            if index < state["next_shard"]:
                continue
            bridge = _read_extra(shard).get("bridge")
            delta = bridge.get("delta") if isinstance(bridge, dict) else None
            if isinstance(delta, dict) and delta.get("seq") == state["seq"] + 1:
                log.warning("%s: rolled forward to the commit of %s", path, shard.name)
                state = _apply_delta(state, delta)  # shard committed, ledger not yet written
                self._write_ledger(state)
                self._announce.append(read_shard(shard)[1])
                continue
            if path.exists():
                raise BridgeError(
                    f"{self.replay_dir}: shard {shard.name} is not accounted for by "
                    f"{LEDGER_NAME} (seq {state['seq']}): another writer shares this directory"
                )
            raise BridgeError(
                f"{self.replay_dir}: holds replay shards that the bridge did not write; "
                "refusing to add bag transitions to them (use an empty or bridge-owned directory)"
            )
        self._state = state
        self._restore()

    def _restore(self) -> None:
        """In-memory state from the ledger: shape, episode counter, one assembler per bag."""
        state = self._state
        self._shape = Shape(**state["shape"])
        self._next_episode = int(state["next_episode"])
        self._assemblers = {}
        referenced = set()
        for key, bag in state["bags"].items():
            asm = self._new_assembler(bag)
            if bag.get("carry"):
                carry_path = self.replay_dir / bag["carry"]
                referenced.add(bag["carry"])
                try:
                    blob = carry_path.read_bytes()
                except OSError as exc:
                    raise BridgeError(f"{carry_path}: carry file missing ({exc})") from None
                for role, log_ns, data in _decode_carry(blob, str(carry_path)):
                    asm.feed(role, log_ns, data)
                asm.take_counts()  # counted when first read
            self._assemblers[key] = asm
        for stale in self.replay_dir.glob(f"{_CARRY_PREFIX}*"):
            if stale.name not in referenced:
                stale.unlink(missing_ok=True)

    def _new_assembler(self, bag: dict[str, Any]) -> TransitionAssembler:
        cfg = self.config
        cursor = bag.get("cursor")
        return TransitionAssembler(
            grace_ns=round(cfg.grace_s * 1e9),
            max_open_steps=cfg.max_open_steps,
            holds=cfg.holds,
            shape=self._shape,
            cursor=Cursor.from_dict(cursor) if cursor else None,
            last_task=str(bag.get("last_task", "")),
            default_task=cfg.default_task,
        )

    def _write_ledger(self, state: dict[str, Any]) -> None:
        payload = json.dumps(state, indent=1, sort_keys=True).encode()
        _write_atomic(self.ledger_path, payload, fsync=self.config.fsync)

    def _take_episode(self) -> int:
        episode = self._next_episode
        self._next_episode += 1
        return episode

    # ------------------------------------------------------------------ polling
    def bags(self) -> list[Path]:
        """The bags the sources hold now."""
        found: list[Path] = []
        for source in self.sources:
            for bag in find_bags(source):
                if bag not in found:
                    found.append(bag)
        return found

    def _plan(self, *, final: bool) -> list[tuple[str, Path, BagLayout, list[Path], bool]]:
        """Per bag with work to do: (key, path, layout, new splits, finished now)."""
        plan = []
        for bag in self.bags():
            key = self._bag_key(bag)
            entry = self._state["bags"].get(key)
            done = set(entry["done"]) if entry else set()
            layout = bag_layout(bag)
            finished = final or layout.finished
            idle = self.config.idle_finish_s
            if not finished and idle > 0 and time.time() - newest_change(bag) > idle:
                finished = True
            candidates = layout.splits if finished else layout.closed
            new = [p for p in candidates if split_id(p.name) not in done]
            missing = [n for n in layout.missing if split_id(n) not in done]
            was_finished = bool(entry and entry["finished"])
            if new or missing or (finished and not was_finished):
                plan.append((key, bag, layout, new, finished))
        return plan

    def _bag_key(self, bag: Path) -> str:
        """The ledger's name for a bag: its path, and the namespace read from it (the same
        recording bridged under another namespace is other data, read anew)."""
        key = str(bag.resolve())
        namespace = self.config.namespace.strip("/")
        return f"{key}#namespace=/{namespace}" if namespace else key

    def pending_splits(self, *, final: bool = False) -> list[Path]:
        """The splits the next poll would read."""
        return [p for _, _, _, new, _ in self._plan(final=final) for p in new]

    def poll(
        self,
        *,
        final: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[ShardInfo]:
        """Ingest every split closed since the last poll; the shards written, in order
        (including any committed by an earlier poll that failed, or rolled forward at start).

        ``final`` treats every bag as finished (its open/unlisted splits are read and its last
        episode written as it stands): what batch mode does. ``progress(done, total)`` is called
        after each split.
        """
        self.last_report = BridgeReport()
        plan = self._plan(final=final)
        total = sum(len(new) for *_, new, _ in plan)
        done_splits = 0
        try:
            for key, bag, layout, new, finished in plan:
                entry = self._state["bags"].get(key) or {
                    "path": str(bag),
                    "done": [],
                    "finished": False,
                    "cursor": None,
                    "last_task": "",
                    "carry": None,
                }
                entry = copy.deepcopy(entry)
                asm = self._assemblers.get(key) or self._new_assembler(entry)
                self._assemblers[key] = asm
                pending = _Pending()
                for note in layout.notes:
                    pending.report.notes.append(note)
                for name in layout.missing:
                    if split_id(name) not in entry["done"]:
                        entry["done"].append(split_id(name))
                        pending.report.bad_splits.append(
                            BadSplit(str(bag / name), "listed in metadata.yaml but missing")
                        )
                if not finished:
                    for split in layout.open:
                        pending.report.notes.append(
                            f"{split}: open split skipped until the bag is closed or idle"
                        )
                for split in new:
                    self._ingest(split, asm, pending.report)
                    entry["done"].append(split_id(split.name))
                    last = finished and split == new[-1]
                    rows = asm.collect(final=last, next_episode=self._take_episode)
                    pending.rows.extend(rows)
                    pending.count += sum(len(r) for r in rows)
                    done_splits += 1
                    if progress is not None:
                        progress(done_splits, total)
                    if pending.count >= self.config.shard_rows and not last:
                        self._commit(key, entry, asm, pending)
                        pending = _Pending()
                if finished and not new:
                    rows = asm.collect(final=True, next_episode=self._take_episode)
                    pending.rows.extend(rows)
                    pending.count += sum(len(r) for r in rows)
                entry["finished"] = finished
                self._commit(key, entry, asm, pending)
        except BaseException:
            self._load()  # back to what the ledger on disk says; the next poll redoes the rest
            raise
        written, self._announce = self._announce, []
        return written

    def _ingest(self, split: Path, asm: TransitionAssembler, report: BridgeReport) -> None:
        read = read_split(split, topics=self._roles.keys())
        report.splits += 1
        if read.error is not None:
            report.bad_splits.append(BadSplit(str(split), read.error, read.salvaged))
            log.warning("bad split %s: %s (salvaged %d messages)", split, read.error, read.salvaged)
        wrong = set()
        for topic, msgtype in read.types.items():
            role = self._roles.get(topic)
            if role is not None and msgtype and msgtype != ROLES[role][1]:
                wrong.add(topic)
                note = f"{topic} is recorded as {msgtype}, not {ROLES[role][1]}: not bridged"
                if note not in report.notes:
                    report.notes.append(note)
        counts: Counter[str] = Counter()
        roles = self._roles
        for topic, log_ns, data in read.messages:
            if topic in wrong:
                continue
            counts[topic] += 1
            asm.feed(roles[topic], log_ns, data)
        for topic, n in counts.items():
            report.messages[topic] = report.messages.get(topic, 0) + n

    def _commit(
        self,
        key: str,
        entry: dict[str, Any],
        asm: TransitionAssembler,
        pending: _Pending,
    ) -> ShardInfo | None:
        """Carry file -> shard (holding this commit's ledger delta) -> ledger; the shard if any."""
        old = self._state
        seq = int(old["seq"]) + 1
        report = pending.report
        counts = asm.take_counts()
        _add_counts(report.dropped, counts.dropped)
        _add_counts(report.duplicates, counts.duplicates)
        _add_counts(report.malformed, counts.malformed)
        report.orphans += counts.orphans
        report.unterminated += counts.unterminated
        report.episodes += self._next_episode - int(old["next_episode"])
        data, tasks, versions, episodes = self._rows_to_data(pending.rows, report)

        cursor = asm.cursor_state()
        entry["cursor"] = cursor.to_dict() if cursor is not None else None
        entry["last_task"] = asm.last_task
        old_entry = old["bags"].get(key) or {}
        old_carry = old_entry.get("carry")
        carry = asm.carry()
        if carry:
            entry["carry"] = f"{_CARRY_PREFIX}{seq:08d}.bin"
            _write_atomic(
                self.replay_dir / entry["carry"], _encode_carry(carry), fsync=self.config.fsync
            )
        else:
            entry["carry"] = None
        next_shard = int(old["next_shard"])
        path: Path | None = None
        if data is not None and len(data):
            path = self.replay_dir / shard_name(next_shard)
            next_shard += 1
            report.transitions += len(data)
            report.shards.append(path.name)
        done = list(entry["done"])
        before = list(old_entry.get("done", []))
        assert done[: len(before)] == before
        delta = {
            "seq": seq,
            "bag": key,
            "entry": {k: v for k, v in entry.items() if k != "done"},
            "added": done[len(before) :],
            "next_episode": self._next_episode,
            "next_shard": next_shard,
            "shape": asdict(self._shape),
            "report": report.to_dict(),
        }
        state = _apply_delta(old, delta)

        info: ShardInfo | None = None
        if path is not None and data is not None:
            extra: dict[str, Any] = {"bridge": {"episodes": episodes, "delta": delta}}
            if self.config.chunk:
                extra["chunk"] = {
                    "horizon": self.config.chunk,
                    "gamma": self.config.gamma,
                    "stride": self.config.chunk_stride,
                    "layout": "action, base_action, residual: H actions flattened step-major",
                }
            info = write_shard(
                path,
                data,
                tasks=tasks,
                source=f"bag:{Path(entry['path']).name}",
                obs_kind=self._shape.obs_kind or "state",
                versions=versions,
                extra=extra,
            )
        self._write_ledger(state)
        self._state = state
        if info is not None:
            self._announce.append(info)
        if old_carry and old_carry != entry["carry"]:
            (self.replay_dir / old_carry).unlink(missing_ok=True)
        self.last_report.add(report)
        report_payload = json.dumps(self.report.to_dict(), indent=1).encode()
        atomic_write_bytes(self.replay_dir / REPORT_NAME, report_payload, overwrite=True)
        return info

    def _rows_to_data(
        self, rows: list[EpisodeRows], report: BridgeReport
    ) -> tuple[Transitions | None, list[str], list[str], list[list[int]]]:
        """(rows as one Transitions, chunked in chunk mode; tasks; versions; [replay, bag]
        episode ids)."""
        tasks: list[str] = []
        versions: list[str] = []
        rows = [r for r in rows if len(r)]
        if not rows:
            return None, tasks, versions, []

        def index_of(names: list[str]) -> Callable[[str], int]:
            def get(name: str) -> int:
                if name not in names:
                    names.append(name)
                return names.index(name)

            return get

        parts = [r.to_transitions(index_of(versions), index_of(tasks)) for r in rows]
        data = Transitions.concatenate(parts)
        episodes = [list(e) for e in sorted({(r.replay_episode, r.bag_episode) for r in rows})]
        if self.config.chunk:
            data, chunk_drops = chunk_transitions(
                data,
                horizon=self.config.chunk,
                gamma=self.config.gamma,
                stride=self.config.chunk_stride,
            )
            _add_counts(report.dropped, chunk_drops)
        return data, tasks, versions, episodes

    def run(
        self,
        stop_event: threading.Event,
        period_s: float = 1.0,
        *,
        on_shards: Callable[[list[ShardInfo]], None] | None = None,
    ) -> None:
        """Poll every ``period_s`` until ``stop_event`` is set; a failed poll is logged and
        retried at the next period (nothing it did counts until it commits)."""
        while not stop_event.is_set():
            try:
                infos = self.poll()
            except (BridgeError, ReplayError, OSError) as exc:
                log.error("bridge poll failed: %s", exc)
                infos = []
            if infos and on_shards is not None:
                on_shards(infos)
            stop_event.wait(period_s)


def bridge_bags(
    bag_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    replay_dir: str | os.PathLike[str],
    *,
    config: BridgeConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BridgeReport:
    """Batch: every split of the given bags -> replay shards in ``replay_dir``; the report.

    Each path is a bag directory, a single ``.mcap``/``.db3`` file, or a folder of bag
    directories. Splits are read in order, so episodes that span splits are joined; a bad split
    is reported and skipped. ``replay_dir`` must be empty, new, or one the bridge owns (its
    ledger): then only what the ledger has not seen is added, so running it twice adds nothing.
    """
    if isinstance(bag_paths, (str, os.PathLike)):
        bag_paths = [bag_paths]
    paths = [Path(p) for p in bag_paths]
    if not paths:
        raise BridgeError("no bag paths given")
    for path in paths:
        if not path.exists():
            raise BridgeError(f"no bag at {path}: it does not exist")
        if not is_bag(path) and not find_bags(path):
            raise BridgeError(f"no bag at {path}: no metadata.yaml, .mcap or .db3 files")
    namespace = (config or BridgeConfig()).namespace
    for path in paths:
        for bag in find_bags(path):
            check_control_topics(bag, namespace)
    with BridgeFollower(paths, replay_dir, config=config) as follower:
        follower.poll(final=True, progress=progress)
        return follower.last_report


CONTROL_ROLES = ("observation", "action", "command", "reward")
"""The roles without which a bag yields no transition (status and task state are optional)."""


def check_control_topics(bag: str | os.PathLike[str], namespace: str = "") -> None:
    """Raise :class:`BridgeError` naming what is needed and what was found when ``bag`` lacks
    a control-path topic (of the right type) under ``namespace``."""
    found = bag_topics(bag)
    roles = {role: topic for topic, role in topic_roles(namespace).items()}
    needed = {roles[role]: ROLES[role][1] for role in CONTROL_ROLES}
    lacking = [topic for topic, msgtype in needed.items() if found.get(topic) != msgtype]
    if not lacking:
        return
    hint = ""
    suffixes = {ROLES[role][0].strip("/") for role in CONTROL_ROLES}
    prefixes = sorted(
        {
            topic[: -len(suffix) - 1]
            for topic in found
            for suffix in suffixes
            if topic.endswith("/" + suffix) and topic != "/" + suffix
        }
    )
    if prefixes:
        hint = "; recorded under a namespace? try --namespace " + " or ".join(prefixes)
    seen = ", ".join(f"{t} ({m})" for t, m in sorted(found.items())) or "no topics"
    raise BridgeError(
        f"{bag}: not a recording of the vlarl control path: it needs "
        + ", ".join(f"{t} ({m})" for t, m in needed.items())
        + f"; missing {', '.join(lacking)}; found {seen}{hint}"
    )


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        into[key] = into.get(key, 0) + int(value)
