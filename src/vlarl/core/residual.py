"""The residual slot: a correction added (by safety, clamped to ±delta) to the base action.

Until an RL residual actor is installed the slot holds the zero residual with the empty tag,
which is the real behaviour of a robot running its base policy alone. An actor is anything that
implements :class:`ResidualActor` (``tag``, dims, ``__call__(obs, base_action, out)``); the
RL issue installs one (e.g. :class:`MLPResidual` built from a verified safetensors blob, or a
small ONNX model) with :meth:`ResidualSlot.install`, which checks dims and a probe call before
swapping it in atomically. The version tag of the active actor goes into every action's
frame_id after a ``+`` (``model@3+residual@7``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

_TAG = re.compile(r"^[A-Za-z0-9_.\-]+@\d+$")
EXPLORATION_NOISE_STD = 0.05
"""Std of the Gaussian noise added to an active residual while learning (the policy node's
``residual_noise_std`` under ``--learn``; ``vlarl train-residual`` / ``improve`` use it too)."""


class ResidualError(ValueError):
    """An actor that does not fit the slot, or one that produced non-finite numbers."""


@runtime_checkable
class ResidualActor(Protocol):
    """A residual actor: deterministic residual action for (observation, base action)."""

    tag: str
    obs_dim: int
    action_dim: int

    def __call__(self, obs: np.ndarray, base_action: np.ndarray, out: np.ndarray) -> None:
        """Write the residual [action_dim] for ``obs`` [obs_dim] and ``base_action`` into out."""
        ...


class MLPResidual:
    """A numpy MLP actor: ``scale * tanh(MLP([obs, base_action]))`` with ReLU hidden layers.

    ``layers`` is a sequence of (weight [in, out], bias [out]); the input is the observation,
    followed by the base action when ``uses_base_action`` is true (PLD conditions the residual
    on the base action). ``scale`` bounds the output; safety clamps it again to ±delta.
    """

    def __init__(
        self,
        layers: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        tag: str,
        obs_dim: int,
        action_dim: int,
        uses_base_action: bool = True,
        scale: float = 1.0,
    ) -> None:
        if not layers:
            raise ResidualError("an MLP needs at least one layer")
        in_dim = obs_dim + (action_dim if uses_base_action else 0)
        self._w: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        width = in_dim
        for i, (w, b) in enumerate(layers):
            w = np.ascontiguousarray(w, dtype=np.float32)
            b = np.ascontiguousarray(b, dtype=np.float32)
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise ResidualError(
                    f"layer {i}: expected weight [{width}, n] and bias [n], "
                    f"got {w.shape}, {b.shape}"
                )
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise ResidualError(f"layer {i} has non-finite weights")
            self._w.append(w)
            self._b.append(b)
            width = w.shape[1]
        if width != action_dim:
            raise ResidualError(f"last layer has {width} outputs, expected action_dim={action_dim}")
        if not (np.isfinite(scale) and scale > 0):
            raise ResidualError("scale must be a positive finite number")
        self.tag = tag
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.uses_base_action = uses_base_action
        self.scale = float(scale)
        self._x = np.zeros(in_dim, dtype=np.float32)
        self._h = [np.zeros(w.shape[1], dtype=np.float32) for w in self._w]

    def __call__(self, obs: np.ndarray, base_action: np.ndarray, out: np.ndarray) -> None:
        x = self._x
        x[: self.obs_dim] = obs
        if self.uses_base_action:
            x[self.obs_dim :] = base_action
        last = len(self._w) - 1
        for i, (w, b, h) in enumerate(zip(self._w, self._b, self._h, strict=True)):
            np.matmul(x, w, out=h)
            h += b
            if i < last:
                np.maximum(h, 0.0, out=h)
            x = h
        np.tanh(x, out=out)
        out *= self.scale


class ResidualSlot:
    """Holds the active residual actor (or none: zero residual, tag ``""``)."""

    def __init__(self, *, obs_dim: int, action_dim: int) -> None:
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self._actor: ResidualActor | None = None
        self._out = np.zeros(action_dim, dtype=np.float32)

    @property
    def tag(self) -> str:
        """Version tag of the installed actor, ``""`` for the zero residual."""
        actor = self._actor
        return "" if actor is None else actor.tag

    @property
    def active(self) -> bool:
        return self._actor is not None

    def install(self, actor: ResidualActor) -> None:
        """Check ``actor`` fits (dims, tag, a finite probe on zeros), then make it active."""
        if not _TAG.match(actor.tag):
            raise ResidualError(f"residual tag must look like 'name@version', got {actor.tag!r}")
        if actor.obs_dim != self.obs_dim or actor.action_dim != self.action_dim:
            raise ResidualError(
                f"actor {actor.tag} is for obs_dim={actor.obs_dim}, action_dim="
                f"{actor.action_dim}; the policy has {self.obs_dim}, {self.action_dim}"
            )
        probe = np.full(self.action_dim, np.nan, dtype=np.float32)
        try:
            actor(
                np.zeros(self.obs_dim, dtype=np.float32),
                np.zeros(self.action_dim, dtype=np.float32),
                probe,
            )
        except Exception as exc:
            raise ResidualError(f"actor {actor.tag} failed its probe call: {exc}") from None
        if not np.isfinite(probe).all():
            raise ResidualError(f"actor {actor.tag} returned non-finite values on zeros")
        self._actor = actor  # one reference assignment: atomic for concurrent readers

    def clear(self) -> None:
        """Back to the zero residual."""
        self._actor = None

    def compute(self, obs: np.ndarray, base_action: np.ndarray) -> np.ndarray:
        """The residual [action_dim] for this tick (a buffer reused on the next call).

        Raises :class:`ResidualError` if the actor's output is not finite (the caller holds).
        """
        out = self._out
        actor = self._actor
        if actor is None:
            out.fill(0.0)
            return out
        actor(obs, base_action, out)
        if not np.isfinite(out).all():
            raise ResidualError(f"residual {actor.tag} produced non-finite values")
        return out
