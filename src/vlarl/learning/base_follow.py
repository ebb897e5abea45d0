"""One residual learner per base model: follow the base the policy runs (ROS-free).

The policy node's base model can be swapped (``ros2 param set /policy model <file.onnx>``) and
rolled back. A residual is trained against one base: its replay rows carry that base's actions
and its blobs name that base (the policy drops a residual of another base). :class:`BaseFollower`
keeps one :class:`~vlarl.learning.learner.ResidualLearner` per base, one at a time:

- the policy reports the same base tag: nothing happens;
- another tag: its model file (the ``path`` the policy reports) is loaded and checked (it loads,
  its tag is the reported one, its obs/action dims are the learner's, it knows the task). A file
  that fails is refused with a reason and the current learner stays (fail closed: nothing is
  learned or published for a base the learner cannot check);
- a checked base: the current learner saves its checkpoint, then the learner of the new base
  starts, resumed from that base's checkpoint when one exists (a rollback), else fresh. It
  learns only from episodes acted on its base (``base_only``).

Checkpoint rule: the configured ``checkpoint`` belongs to the start-up base (as before); every
other base ``model_id@version`` gets ``<checkpoint stem>.<model_id>@<version>.safetensors`` next
to it (and its deployed blob ``<...>.deployed.safetensors`` beside that).

Residual versions are one sequence across bases (the policy accepts only versions newer than the
newest it took, whatever their base): a learner that starts or resumes never mints a version at
or below one already minted by this follower, nor (after a restart) by the learner of any base
whose checkpoint lies next to ``checkpoint``.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlarl.contract import ContractError, ModelMetadata
from vlarl.data.errors import ReplayError
from vlarl.data.replay import header_metadata
from vlarl.learning.errors import LearningError
from vlarl.learning.learner import LearnerConfig, ResidualLearner

_UNSAFE = re.compile(r"[^A-Za-z0-9@._-]")


def load_base(path: Path) -> ModelMetadata:
    """The metadata of the base model at ``path`` (:class:`ContractError` when it is refused)."""
    from vlarl.core.onnx_policy import OnnxPolicy

    return OnnxPolicy.load(path, providers="cpu").metadata


@dataclass(frozen=True)
class Switch:
    """A base switch that happened."""

    previous: str  # the base tag before
    base: str  # the base tag now
    checkpoint: Path  # the new learner's checkpoint
    resumed: bool  # True: resumed from that base's checkpoint (a rollback), False: fresh

    def describe(self) -> str:
        how = "resumed from" if self.resumed else "fresh, checkpoint"
        return f"base {self.previous} -> {self.base}: residual learner {how} {self.checkpoint}"


class BaseFollower:
    """The residual learner of the base the policy runs (see the module's docstring)."""

    def __init__(
        self,
        config: LearnerConfig,
        *,
        base: ModelMetadata,
        checkpoint: str | Path,
        replay_dir: str | Path | None,
        task: str = "",
        loader: Callable[[Path], ModelMetadata] = load_base,
    ) -> None:
        self.config = config
        self.start_tag = base.tag
        self.checkpoint = Path(checkpoint)
        self.replay_dir = replay_dir
        self.task = task
        self.loader = loader
        self.learner = self._learner(base)
        state = self.learner.state
        state.version = max(state.version, self.minted_by_other_bases())
        self.bases_seen: list[str] = [base.tag]
        self.switches = 0
        self.refusals = 0
        self.last = ""  # the last switch or refusal, in words

    @property
    def base_tag(self) -> str:
        return self.learner.base_tag

    def checkpoint_for(self, tag: str) -> Path:
        """The checkpoint of base ``tag``'s learner (the rule in the module's docstring)."""
        if tag == self.start_tag:
            return self.checkpoint
        name = f"{self.checkpoint.stem}.{_UNSAFE.sub('_', tag)}{self.checkpoint.suffix}"
        return self.checkpoint.with_name(name)

    def minted_by_other_bases(self) -> int:
        """The highest version in the checkpoints of the other bases' learners (0: none). An
        unreadable one counts as none: it cannot be resumed either."""
        stem, suffix = self.checkpoint.stem, self.checkpoint.suffix
        pattern = f"{glob.escape(stem)}.*{glob.escape(suffix)}"
        highest = 0
        for path in self.checkpoint.parent.glob(pattern):
            if path.name.endswith(f".deployed{suffix}"):
                continue
            try:
                state = json.loads(header_metadata(path.read_bytes(), str(path))["state"])
                highest = max(highest, int(state["version"]), int(state["deployed_version"]))
            except (OSError, ReplayError, KeyError, TypeError, ValueError):
                continue
        return highest

    def _learner(self, base: ModelMetadata) -> ResidualLearner:
        return ResidualLearner(
            self.config,
            base=base,
            checkpoint=self.checkpoint_for(base.tag),
            replay_dir=self.replay_dir,
            base_only=True,
        )

    def wants_switch(self, tag: str) -> bool:
        """Whether the policy's base ``tag`` is another than the learner's ('' : not known)."""
        return bool(tag) and tag != self.base_tag

    def check(self, tag: str, path: str | Path) -> ModelMetadata:
        """Load and check the base model the policy reports; :class:`LearningError` says why
        it is refused. No learner state is touched (call it outside the learner's lock)."""
        where = Path(path)
        try:
            meta = self.loader(where)
        except (ContractError, OSError) as exc:
            raise LearningError(f"base {tag}: {where} cannot be loaded: {exc}") from None
        if meta.tag != tag:
            raise LearningError(
                f"base {tag}: {where} holds {meta.tag}, not the tag the policy reports"
            )
        learner = self.learner
        if meta.obs_dim != learner.obs_dim or meta.action_dim != learner.action_dim:
            raise LearningError(
                f"base {tag}: obs/action dims {meta.obs_dim}/{meta.action_dim}, the learner's "
                f"are {learner.obs_dim}/{learner.action_dim}"
            )
        if self.task and self.task not in meta.tasks:
            raise LearningError(f"base {tag} does not know task {self.task!r}")
        return meta

    def refuse(self, reason: str) -> None:
        """Record a refused switch (the current learner stays)."""
        self.refusals += 1
        self.last = f"refused: {reason}; the learner stays on {self.base_tag}"

    def switch(self, base: ModelMetadata) -> Switch:
        """Save the current learner and start (or resume) the learner of ``base``.

        A learner that cannot start (its checkpoint is of another base, or unreadable) raises
        :class:`LearningError` before anything changes, except that the current learner's
        checkpoint was saved.
        """
        if base.tag == self.base_tag:
            raise LearningError(f"the learner already runs on {base.tag}")
        current = self.learner
        current.save()
        minted = max(current.state.version, current.state.deployed_version)
        learner = self._learner(base)
        state = learner.state
        state.version = max(state.version, minted)
        previous, self.learner = current.base_tag, learner
        if base.tag not in self.bases_seen:
            self.bases_seen.append(base.tag)
        self.switches += 1
        done = Switch(previous, base.tag, self.checkpoint_for(base.tag), learner.resumed)
        self.last = done.describe()
        return done

    def follow(self, tag: str, path: str | Path) -> Switch | None:
        """:meth:`check` then :meth:`switch`; None when nothing changed (same base, or refused:
        then :attr:`last` says why)."""
        if not self.wants_switch(tag):
            return None
        try:
            return self.switch(self.check(tag, path))
        except LearningError as exc:
            self.refuse(str(exc))
            return None

    def status(self) -> dict[str, object]:
        return {
            "base": self.base_tag,
            "bases_seen": list(self.bases_seen),
            "base_switches": self.switches,
            "base_refusals": self.refusals,
            "base_switch": self.last,
        }


__all__ = ["BaseFollower", "Switch", "load_base"]
