"""Checkpoints: safetensors roundtrips that rebuild the same policy; bad files are clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vlarl.learning.checkpoint import load_checkpoint, save_checkpoint
from vlarl.learning.errors import CheckpointError
from vlarl.learning.networks import PolicySpec, build_policy


def small_policy(kind: str, *, instr_dim: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    spec = PolicySpec(
        kind=kind,
        obs_dim=6,
        action_dim=2,
        chunk_length=3,
        instr_dim=instr_dim,
        hidden=16,
        depth=2,
        instr_proj=4,
        time_features=3,
        steps=4,
        tasks=["a", "b"] if instr_dim else ["a"],
    )
    policy = build_policy(spec).eval()
    policy.normalizer.fit(
        np.random.default_rng(seed).normal(2.0, 3.0, (50, 6)),
        action_low=-np.ones(2),
        action_high=np.ones(2),
    )
    return policy


@pytest.mark.parametrize("kind", ["bc", "teacher", "student"])
def test_roundtrip_rebuilds_the_same_policy(tmp_path: Path, kind: str) -> None:
    policy = small_policy(kind, instr_dim=5)
    emb = {"a": np.arange(5, dtype=np.float32), "b": -np.arange(5, dtype=np.float32)}
    path = tmp_path / "p.safetensors"
    digest = save_checkpoint(
        path, policy, step=123, instructions=emb, config={"lr": 1e-3}, parent="abc"
    )
    ckpt = load_checkpoint(path)
    assert ckpt.sha256 == digest and ckpt.step == 123 and ckpt.parent == "abc"
    assert ckpt.spec == policy.spec and ckpt.tasks == ("a", "b")
    assert ckpt.config == {"lr": 1e-3}
    np.testing.assert_array_equal(ckpt.instructions["b"], emb["b"])
    obs = torch.randn(4, 6) * 3 + 2
    instr = torch.from_numpy(np.stack([emb["a"]] * 4))
    with torch.no_grad():
        np.testing.assert_array_equal(policy(obs, instr).numpy(), ckpt.policy(obs, instr).numpy())
    assert ckpt.normalization["obs_mean"] == pytest.approx(policy.normalizer.obs_mean.tolist())
    assert ckpt.instruction_batch("a", 2).shape == (2, 5)
    with pytest.raises(CheckpointError, match="not trained on task 'zzz'"):
        ckpt.instruction_batch("zzz")


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, small_policy("teacher"), step=1)
    raw = path.read_bytes()
    for cut in (3, 200, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_checkpoint(path)


def test_tampered_weights_fail_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, small_policy("student"), step=1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 + 100] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path)


def test_tampered_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, small_policy("bc"), step=1)
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    spec = json.loads(header["__metadata__"]["spec"])
    spec["hidden"] = 32  # weights no longer fit
    header["__metadata__"]["spec"] = json.dumps(spec)
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    path.write_bytes(struct.pack("<Q", len(new_header)) + new_header + raw[8 + hlen :])
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(path)


def test_foreign_files_and_replay_shards_are_not_checkpoints(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "x.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="no metadata"):
        load_checkpoint(path)
    save_file({"w": np.zeros(2, np.float32)}, str(path), metadata={"format": "vlarl.replay/1"})
    with pytest.raises(CheckpointError, match=r"not 'vlarl.checkpoint/1'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_no_pickle_in_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, small_policy("teacher"), step=1)
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    assert b"\x80\x04" not in raw[: 8 + hlen]  # no pickle protocol marker in the header
