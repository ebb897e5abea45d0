"""The residual slot: zero residual by default, installable actors with a version tag."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vlarl.core.residual import MLPResidual, ResidualActor, ResidualError, ResidualSlot

OBS, ACT = 39, 4


def mlp(
    tag: str = "residual@1", *, uses_base_action: bool = True, scale: float = 0.2, seed: int = 0
):
    rng = np.random.default_rng(seed)
    n_in = OBS + (ACT if uses_base_action else 0)
    layers = [
        (rng.normal(size=(n_in, 16)) * 0.3, rng.normal(size=16) * 0.1),
        (rng.normal(size=(16, ACT)) * 0.3, rng.normal(size=ACT) * 0.1),
    ]
    actor = MLPResidual(
        layers, tag=tag, obs_dim=OBS, action_dim=ACT, uses_base_action=uses_base_action, scale=scale
    )
    return actor, layers


def reference(layers, obs, base, *, uses_base_action=True, scale=0.2) -> np.ndarray:
    x = np.concatenate([obs, base]) if uses_base_action else obs
    (w0, b0), (w1, b1) = layers
    return scale * np.tanh(np.maximum(x @ w0 + b0, 0.0) @ w1 + b1)


def test_default_is_the_zero_residual_with_empty_tag() -> None:
    slot = ResidualSlot(obs_dim=OBS, action_dim=ACT)
    assert slot.tag == "" and not slot.active
    r = slot.compute(np.ones(OBS, np.float32), np.ones(ACT, np.float32))
    assert r.shape == (ACT,) and r.dtype == np.float32 and not r.any()
    r[:] = 5.0  # a caller scribbling on the buffer does not leak into the next tick
    assert not slot.compute(np.ones(OBS, np.float32), np.ones(ACT, np.float32)).any()


@pytest.mark.parametrize("uses_base_action", [True, False])
def test_installed_mlp_matches_reference(uses_base_action: bool) -> None:
    actor, layers = mlp(uses_base_action=uses_base_action)
    assert isinstance(actor, ResidualActor)
    slot = ResidualSlot(obs_dim=OBS, action_dim=ACT)
    slot.install(actor)
    assert slot.active and slot.tag == "residual@1"
    rng = np.random.default_rng(1)
    for _ in range(5):
        obs = rng.normal(size=OBS).astype(np.float32)
        base = rng.uniform(-1, 1, size=ACT).astype(np.float32)
        got = slot.compute(obs, base)
        want = reference(layers, obs, base, uses_base_action=uses_base_action)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.all(np.abs(got) <= 0.2 + 1e-6)
    slot.clear()
    assert slot.tag == "" and not slot.compute(obs, base).any()


def test_base_action_changes_the_residual_only_when_used() -> None:
    obs = np.zeros(OBS, np.float32)
    with_base, _ = mlp(uses_base_action=True)
    without, _ = mlp(uses_base_action=False)
    out1, out2 = np.empty(ACT, np.float32), np.empty(ACT, np.float32)
    with_base(obs, np.ones(ACT, np.float32), out1)
    with_base(obs, -np.ones(ACT, np.float32), out2)
    assert not np.allclose(out1, out2)
    without(obs, np.ones(ACT, np.float32), out1)
    without(obs, -np.ones(ACT, np.float32), out2)
    np.testing.assert_array_equal(out1, out2)


def test_install_refuses_misfits() -> None:
    slot = ResidualSlot(obs_dim=OBS, action_dim=ACT)
    with pytest.raises(ResidualError, match="name@version"):
        slot.install(mlp("residual")[0])
    with pytest.raises(ResidualError, match="name@version"):
        slot.install(mlp("a+b@1")[0])
    other = ResidualSlot(obs_dim=10, action_dim=ACT)
    with pytest.raises(ResidualError, match="obs_dim"):
        other.install(mlp()[0])
    assert not other.active


def test_install_refuses_an_actor_that_fails_or_is_non_finite() -> None:
    class Broken:
        tag = "broken@1"
        obs_dim = OBS
        action_dim = ACT

        def __init__(self, value: float | None) -> None:
            self.value = value

        def __call__(self, obs: np.ndarray, base_action: np.ndarray, out: np.ndarray) -> None:
            if self.value is None:
                raise RuntimeError("boom")
            out.fill(self.value)

    slot = ResidualSlot(obs_dim=OBS, action_dim=ACT)
    good, _ = mlp("good@2")
    slot.install(good)
    with pytest.raises(ResidualError, match="probe"):
        slot.install(Broken(None))
    with pytest.raises(ResidualError, match="non-finite"):
        slot.install(Broken(np.nan))
    assert slot.tag == "good@2"  # the previous actor stays


def test_non_finite_output_at_run_time_raises() -> None:
    class SometimesNaN:
        tag = "flaky@3"
        obs_dim = OBS
        action_dim = ACT

        def __call__(self, obs: np.ndarray, base_action: np.ndarray, out: np.ndarray) -> None:
            out.fill(np.nan if obs[0] > 0 else 0.01)

    slot = ResidualSlot(obs_dim=OBS, action_dim=ACT)
    slot.install(SometimesNaN())
    assert np.allclose(slot.compute(np.zeros(OBS, np.float32), np.zeros(ACT, np.float32)), 0.01)
    obs = np.zeros(OBS, np.float32)
    obs[0] = 1.0
    with pytest.raises(ResidualError, match="flaky@3"):
        slot.compute(obs, np.zeros(ACT, np.float32))


def test_mlp_construction_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ResidualError, match="at least one"):
        MLPResidual([], tag="r@1", obs_dim=OBS, action_dim=ACT)
    with pytest.raises(ResidualError, match="layer 0"):
        MLPResidual(
            [(rng.normal(size=(5, ACT)), np.zeros(ACT))], tag="r@1", obs_dim=OBS, action_dim=ACT
        )
    with pytest.raises(ResidualError, match="outputs"):
        MLPResidual(
            [(rng.normal(size=(OBS + ACT, 3)), np.zeros(3))], tag="r@1", obs_dim=OBS, action_dim=ACT
        )
    w = rng.normal(size=(OBS + ACT, ACT))
    w[0, 0] = np.inf
    with pytest.raises(ResidualError, match="non-finite"):
        MLPResidual([(w, np.zeros(ACT))], tag="r@1", obs_dim=OBS, action_dim=ACT)
    with pytest.raises(ResidualError, match="scale"):
        MLPResidual(
            [(rng.normal(size=(OBS + ACT, ACT)), np.zeros(ACT))],
            tag="r@1",
            obs_dim=OBS,
            action_dim=ACT,
            scale=0.0,
        )


def test_swapping_actors_while_computing_never_mixes() -> None:
    """A reader thread sees either actor's exact output, never a torn mix or an error."""
    slot = ResidualSlot(obs_dim=OBS, action_dim=ACT)
    a, la = mlp("a@1", seed=1)
    _, lb = mlp("b@2", seed=2)
    obs = np.full(OBS, 0.1, np.float32)
    base = np.zeros(ACT, np.float32)
    want = {
        "a@1": reference(la, obs, base),
        "b@2": reference(lb, obs, base),
    }
    slot.install(a)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            actor_tag = slot.tag
            out = slot.compute(obs, base).copy()
            if not any(np.allclose(out, w, atol=1e-5) for w in want.values()):
                errors.append(f"{actor_tag}: {out}")

    t = threading.Thread(target=reader)
    t.start()
    # fresh actor objects each time, as every weight update builds a new actor
    actors = [mlp("b@2", seed=2)[0] if i % 2 else mlp("a@1", seed=1)[0] for i in range(200)]
    for actor in actors:
        slot.install(actor)
    stop.set()
    t.join(timeout=10)
    assert not errors, errors[:3]
