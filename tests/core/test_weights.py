"""The residual weight blob: exact roundtrip, and every kind of damage refused with a reason."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from vlarl.core.residual import ResidualSlot
from vlarl.core.weights import (
    FORMAT,
    ResidualWeights,
    WeightError,
    check_compatible,
    decode_residual,
    encode_residual,
)
from vlarl.data.replay import tensor_digest

OBS, ACT = 39, 4


def make_layers(
    widths: list[int], *, seed: int = 0, in_dim: int = OBS + ACT
) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    layers = []
    for out in [*widths, ACT]:
        layers.append(
            (
                (rng.normal(size=(in_dim, out)) * 0.2).astype(np.float32),
                (rng.normal(size=out) * 0.1).astype(np.float32),
            )
        )
        in_dim = out
    return layers


def blob_for(**overrides: Any) -> bytes:
    kwargs: dict[str, Any] = {
        "layers": make_layers([32, 16]),
        "model_id": "residual",
        "version": 3,
        "parent": 2,
        "base": "student@1",
        "obs_dim": OBS,
        "action_dim": ACT,
        "scale": 0.25,
        "extra": {"gate": "0.61", "step": 1200},
    }
    kwargs.update(overrides)
    return encode_residual(**kwargs)


def split(blob: bytes) -> tuple[int, dict[str, Any]]:
    """(offset of the tensor area, parsed header)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return 8 + n, json.loads(blob[8 : 8 + n])


def resave(blob: bytes, **meta_changes: str) -> bytes:
    """A well-formed safetensors file with edited metadata and the old digest."""
    _, header = split(blob)
    meta = dict(header["__metadata__"])
    meta.update(meta_changes)
    return bytes(st_save(st_load(blob), metadata=meta))


def redigest(blob: bytes, **meta_changes: str) -> bytes:
    """Edited metadata with a digest recomputed the way the module does (a consistent blob)."""
    _, header = split(blob)
    meta = {**header["__metadata__"], **meta_changes}
    tensors = st_load(blob)
    canonical = json.dumps(
        {k: v for k, v in meta.items() if k != "digest"}, sort_keys=True, separators=(",", ":")
    )
    meta["digest"] = tensor_digest(
        {**tensors, "__metadata__": np.frombuffer(canonical.encode(), np.uint8)}
    )
    return bytes(st_save(tensors, metadata=meta))


def refused(blob: bytes, fragment: str = "") -> str:
    with pytest.raises(WeightError) as info:
        decode_residual(blob)
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------- roundtrip
def test_roundtrip_is_exact_and_the_actor_computes_the_mlp() -> None:
    layers = make_layers([32, 16], seed=5)
    blob = blob_for(layers=layers)
    w = decode_residual(blob)
    assert isinstance(w, ResidualWeights)
    assert (w.model_id, w.version, w.parent, w.base) == ("residual", 3, 2, "student@1")
    assert (w.obs_dim, w.action_dim, w.uses_base_action, w.scale) == (OBS, ACT, True, 0.25)
    assert w.tag == "residual@3"
    assert w.extra == {"gate": "0.61", "step": "1200"}
    assert len(w.layers) == len(layers)
    for (w_got, b_got), (w_want, b_want) in zip(w.layers, layers, strict=True):
        assert w_got.dtype == np.float32 and b_got.dtype == np.float32
        np.testing.assert_array_equal(w_got, w_want)
        np.testing.assert_array_equal(b_got, b_want)
        assert not w_got.flags.writeable  # the verified weights cannot be changed afterwards
    assert len(w.digest) == 64
    assert decode_residual(blob).digest == w.digest  # deterministic
    again = encode_residual(
        layers=layers,
        model_id="residual",
        version=3,
        parent=2,
        base="student@1",
        obs_dim=OBS,
        action_dim=ACT,
        scale=0.25,
        extra={"gate": "0.61", "step": 1200},
    )  # (safetensors orders header keys freely, so compare content, not bytes)
    assert decode_residual(again).digest == w.digest

    rng = np.random.default_rng(0)
    actor = w.actor()
    assert actor.tag == "residual@3"
    slot = ResidualSlot(obs_dim=OBS, action_dim=ACT)
    slot.install(actor)
    for _ in range(5):
        obs = rng.normal(size=OBS).astype(np.float32)
        base = rng.uniform(-1, 1, size=ACT).astype(np.float32)
        x = np.concatenate([obs, base]).astype(np.float64)
        for i, (wi, bi) in enumerate(layers):
            x = x @ wi + bi
            if i < len(layers) - 1:
                x = np.maximum(x, 0.0)
        np.testing.assert_allclose(slot.compute(obs, base), 0.25 * np.tanh(x), atol=1e-5)


def test_obs_only_actor_and_empty_base_and_parent_zero() -> None:
    layers = make_layers([8], in_dim=OBS)
    w = decode_residual(
        blob_for(layers=layers, uses_base_action=False, base="", version=1, parent=0, extra=None)
    )
    assert not w.uses_base_action and w.base == "" and w.parent == 0 and w.extra == {}
    out = np.zeros(ACT, np.float32)
    w.actor()(np.ones(OBS, np.float32), np.full(ACT, 7.0, np.float32), out)
    assert np.isfinite(out).all() and np.all(np.abs(out) <= 0.25)


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(min_value=1, max_value=24), min_size=0, max_size=4),
    obs_dim=st.integers(min_value=1, max_value=50),
    action_dim=st.integers(min_value=1, max_value=8),
    uses_base_action=st.booleans(),
    version=st.integers(min_value=1, max_value=10**9),
    scale=st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_random_shapes_roundtrip(
    widths: list[int],
    obs_dim: int,
    action_dim: int,
    uses_base_action: bool,
    version: int,
    scale: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    width = obs_dim + (action_dim if uses_base_action else 0)
    layers = []
    for n_out in [*widths, action_dim]:
        layers.append(
            (
                rng.normal(size=(width, n_out)).astype(np.float32),
                rng.normal(size=n_out).astype(np.float32),
            )
        )
        width = n_out
    blob = encode_residual(
        layers=layers,
        model_id="r.1_x-y",
        version=version,
        parent=version - 1,
        base="",
        obs_dim=obs_dim,
        action_dim=action_dim,
        uses_base_action=uses_base_action,
        scale=scale,
    )
    w = decode_residual(blob)
    assert (w.obs_dim, w.action_dim, w.uses_base_action, w.version) == (
        obs_dim,
        action_dim,
        uses_base_action,
        version,
    )
    assert w.scale == scale and w.parent == version - 1
    assert [(a.shape, b.shape) for a, b in w.layers] == [(a.shape, b.shape) for a, b in layers]
    for (a, b), (a0, b0) in zip(w.layers, layers, strict=True):
        assert a.tobytes() == a0.tobytes() and b.tobytes() == b0.tobytes()
    out = np.zeros(action_dim, np.float32)
    w.actor()(np.zeros(obs_dim, np.float32), np.zeros(action_dim, np.float32), out)
    assert np.isfinite(out).all()


# ---------------------------------------------------------------------------- damage
def test_every_sampled_byte_flip_in_the_tensor_area_is_refused() -> None:
    blob = blob_for()
    start, _ = split(blob)
    rng = np.random.default_rng(1)
    positions = rng.choice(np.arange(start, len(blob)), size=50, replace=False)
    for pos in [start, len(blob) - 1, *positions.tolist()]:
        for xor in (0x01, 0x80, 0xFF):
            damaged = bytearray(blob)
            damaged[pos] ^= xor
            message = refused(bytes(damaged))
            assert "tampered" in message or "non-finite" in message, (pos, message)


def test_every_byte_flip_in_the_header_is_refused() -> None:
    blob = blob_for()
    start, _ = split(blob)
    for pos in range(start):  # the length prefix and the JSON header, every byte
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        refused(bytes(damaged))


def test_truncation_at_many_lengths_is_refused() -> None:
    blob = blob_for()
    start, _ = split(blob)
    lengths = {0, 1, 7, 8, 9, start - 1, start, start + 1, len(blob) - 4, len(blob) - 1}
    lengths |= set(np.linspace(0, len(blob) - 1, 60).astype(int).tolist())
    for n in sorted(lengths):
        refused(blob[:n])
    refused(blob[: len(blob) // 2], "truncated")
    refused(blob + b"\x00\x00\x00\x00")  # appended bytes are not silently ignored either


def test_not_safetensors_at_all() -> None:
    refused(b"", "truncated")
    refused(b"\x00" * 64)
    refused(b"hello world, this is not a weight blob", "")
    refused(np.random.default_rng(0).bytes(4096))
    replay_like = bytes(st_save({"obs": np.zeros((2, 3), np.float32)}, metadata={"format": "x"}))
    refused(replay_like, "format")
    no_meta = bytes(st_save({"layer0.weight": np.zeros((43, 4), np.float32)}))
    refused(no_meta, "metadata")


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("version", "4"),  # bumped without re-digest
        ("version", "2"),
        ("parent", "0"),
        ("base", ""),
        ("base", "student@2"),
        ("model_id", "other"),
        ("scale", "0.5"),
        ("uses_base_action", "false"),
        ("obs_dim", "40"),
        ("extra", '{"gate": "0.99"}'),
    ],
)
def test_metadata_edits_without_a_new_digest_are_refused(change: str, value: str) -> None:
    refused(resave(blob_for(), **{change: value}), "digest mismatch")


def test_metadata_tampered_digest_and_keys() -> None:
    blob = blob_for()
    refused(resave(blob, digest="0" * 64), "digest mismatch")
    refused(resave(blob, digest="not-hex"), "sha256")
    refused(resave(blob, format="vlarl.residual/2"), "format")
    refused(resave(blob, owner="me"), "unexpected ['owner']")
    _, header = split(blob)
    meta = dict(header["__metadata__"])
    del meta["parent"]
    refused(bytes(st_save(st_load(blob), metadata=meta)), "missing ['parent']")


@pytest.mark.parametrize(
    ("change", "value", "fragment"),
    [
        ("version", "0", "version"),
        ("version", "-1", "version"),
        ("version", "3.0", "version"),
        ("version", "three", "version"),
        ("parent", "3", "parent"),  # not older than the version
        ("model_id", "bad name", "model_id"),
        ("base", "no-version", "base"),
        ("obs_dim", "40", "do not chain"),
        ("action_dim", "5", "chain"),
        ("uses_base_action", "yes", "uses_base_action"),
        ("uses_base_action", "false", "do not chain"),
        ("scale", "nan", "scale"),
        ("scale", "-1", "scale"),
        ("scale", "big", "scale"),
        ("extra", "[1, 2]", "extra"),
        ("extra", "{not json", "extra"),
    ],
)
def test_consistent_but_invalid_metadata_is_refused(change: str, value: str, fragment: str) -> None:
    """Even a blob whose digest matches is checked field by field."""
    refused(redigest(blob_for(), **{change: value}), fragment)


def test_bad_tensors_with_a_matching_digest_are_refused() -> None:
    blob = blob_for()
    _, header = split(blob)
    meta = header["__metadata__"]

    def rebuild(tensors: dict[str, np.ndarray]) -> bytes:
        canonical = json.dumps(
            {k: v for k, v in meta.items() if k != "digest"}, sort_keys=True, separators=(",", ":")
        )
        digest = tensor_digest(
            {**tensors, "__metadata__": np.frombuffer(canonical.encode(), np.uint8)}
        )
        return bytes(st_save(tensors, metadata={**meta, "digest": digest}))

    tensors = st_load(blob)
    nan = dict(tensors)
    nan["layer1.weight"] = nan["layer1.weight"].copy()
    nan["layer1.weight"][3, 2] = np.nan
    refused(rebuild(nan), "non-finite")
    f64 = dict(tensors)
    f64["layer0.bias"] = f64["layer0.bias"].astype(np.float64)
    refused(rebuild(f64), "float32")
    gap = {k: v for k, v in tensors.items() if not k.startswith("layer1.")}
    refused(rebuild(gap), "layer")
    stray = {**tensors, "optimizer.state": np.zeros(3, np.float32)}
    refused(rebuild(stray), "unexpected tensors")
    chain = dict(tensors)
    chain["layer1.weight"] = np.zeros((31, 16), np.float32)
    refused(rebuild(chain), "do not chain")
    refused(rebuild({}), "no layers")


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(WeightError, match="model_id"):
        blob_for(model_id="has space")
    with pytest.raises(WeightError, match="version"):
        blob_for(version=0)
    with pytest.raises(WeightError, match="parent"):
        blob_for(version=3, parent=3)
    with pytest.raises(WeightError, match="base"):
        blob_for(base="student")
    with pytest.raises(WeightError, match="scale"):
        blob_for(scale=0.0)
    with pytest.raises(WeightError, match="chain"):
        blob_for(obs_dim=OBS + 1)
    with pytest.raises(WeightError, match="no layers"):
        blob_for(layers=[])
    bad = make_layers([8])
    bad[0][0][0, 0] = np.inf
    with pytest.raises(WeightError, match="NaN or infinity"):
        blob_for(layers=bad)


# ---------------------------------------------------------------------------- compatibility
def test_check_compatible() -> None:
    v3 = decode_residual(blob_for())
    v4 = decode_residual(blob_for(version=4, parent=3))
    check_compatible(v3, obs_dim=OBS, action_dim=ACT, base_tag="student@1", current=None)
    check_compatible(v4, obs_dim=OBS, action_dim=ACT, base_tag="student@1", current=v3)
    any_base = decode_residual(blob_for(version=5, parent=4, base=""))
    check_compatible(any_base, obs_dim=OBS, action_dim=ACT, base_tag="other@9", current=v4)

    def no(w: ResidualWeights, fragment: str, **kwargs: Any) -> None:
        args: dict[str, Any] = {
            "obs_dim": OBS,
            "action_dim": ACT,
            "base_tag": "student@1",
            "current": v3,
        }
        args.update(kwargs)
        with pytest.raises(WeightError, match=fragment):
            check_compatible(w, **args)

    no(v3, "not newer")  # replayed
    no(decode_residual(blob_for(version=2, parent=1)), "not newer")  # older
    no(v4, "not newer", current=v4)
    no(decode_residual(blob_for(model_id="other", version=9, parent=0)), "another model")
    no(v4, "obs_dim=39", obs_dim=OBS + 1)
    no(v4, "action_dim=4", action_dim=ACT + 3)
    no(v4, "trained against base student@1", base_tag="student@2")
    no(v4, "trained against base", base_tag="", current=None)


def test_format_constant() -> None:
    assert FORMAT == "vlarl.residual/1"
    _, header = split(blob_for())
    assert header["__metadata__"]["format"] == FORMAT
    assert sorted(k for k in header if k != "__metadata__") == [
        "layer0.bias",
        "layer0.weight",
        "layer1.bias",
        "layer1.weight",
        "layer2.bias",
        "layer2.weight",
    ]
