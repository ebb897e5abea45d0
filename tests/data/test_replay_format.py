"""The replay format: roundtrips, atomic no-overwrite writes, and clear errors for bad shards."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlarl.data import (
    FORMAT,
    ReplayError,
    ReplayExistsError,
    ReplayWriter,
    Transitions,
    list_shards,
    load_replay,
    read_shard,
    write_shard,
)
from vlarl.data.replay import COLUMNS, shard_name


def make_episode(n: int, *, obs_dim: int = 5, action_dim: int = 3, seed: int = 0) -> Transitions:
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1, 1, (n, action_dim)).astype(np.float32)
    residual = rng.uniform(-0.1, 0.1, (n, action_dim)).astype(np.float32)
    success = np.zeros(n, np.uint8)
    success[-1] = 1
    return Transitions.build(
        obs=rng.normal(size=(n, obs_dim)),
        next_obs=rng.normal(size=(n, obs_dim)),
        action=np.clip(base + residual, -1, 1),
        base_action=base,
        residual=residual,
        reward=rng.normal(size=n),
        terminal=success,
        success=success,
        intervention=rng.integers(0, 2, n),
    )


def assert_same(a: Transitions, b: Transitions) -> None:
    for name in COLUMNS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_roundtrip_keeps_every_column_and_the_metadata(tmp_path: Path) -> None:
    data = make_episode(17)
    data.policy_version[:] = 1
    path = tmp_path / shard_name(0)
    info = write_shard(
        path,
        data,
        tasks=["pick-place-v3"],
        source="test",
        versions=["expert@0", "model@3+residual@7"],
        extra={"note": "x"},
    )
    back, meta = read_shard(path)
    assert_same(data, back)
    assert meta.rows == 17 and meta.tasks == ("pick-place-v3",)
    assert meta.versions == ("expert@0", "model@3+residual@7")
    assert meta.sha256 == info.sha256 and len(meta.sha256) == 64
    assert meta.extra == {"note": "x"} and meta.source == "test" and meta.obs_kind == "state"
    # The header carries the documented keys as plain strings.
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])["__metadata__"]
    assert header["format"] == FORMAT
    assert json.loads(header["versions"]) == ["expert@0", "model@3+residual@7"]
    assert {"tasks", "source", "obs_kind", "created", "sha256"} <= set(header)


def test_writer_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / shard_name(0)
    write_shard(path, make_episode(3), tasks=["t"], source="a")
    before = path.read_bytes()
    with pytest.raises(ReplayExistsError, match="refusing to overwrite"):
        write_shard(path, make_episode(4, seed=1), tasks=["t"], source="b")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_truncated_shard_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / shard_name(0)
    write_shard(path, make_episode(20), tasks=["t"], source="a")
    raw = path.read_bytes()
    for cut in (4, 100, len(raw) - 10):
        path.write_bytes(raw[:cut])
        with pytest.raises(ReplayError, match="truncated"):
            read_shard(path)


def test_tampered_tensor_bytes_fail_the_digest(tmp_path: Path) -> None:
    path = tmp_path / shard_name(0)
    write_shard(path, make_episode(20), tasks=["t"], source="a")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # inside the last tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(ReplayError, match="sha256 mismatch"):
        read_shard(path)


def test_foreign_and_garbage_files_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(foreign), metadata={"format": "other/1"})
    with pytest.raises(ReplayError, match=r"is not 'vlarl.replay/1'"):
        read_shard(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ReplayError):
        read_shard(garbage)
    with pytest.raises(ReplayError, match="cannot read"):
        read_shard(tmp_path / "missing.safetensors")


def test_malformed_columns_are_rejected_before_writing(tmp_path: Path) -> None:
    data = make_episode(5)
    data.reward = data.reward.astype(np.float64)
    with pytest.raises(ReplayError, match=r"reward.*dtype"):
        write_shard(tmp_path / shard_name(0), data, tasks=["t"], source="a")
    data = make_episode(5)
    data.task[:] = 3
    with pytest.raises(ReplayError, match="task index"):
        write_shard(tmp_path / shard_name(0), data, tasks=["t"], source="a")
    data = make_episode(5)
    data.obs[2, 1] = np.nan
    with pytest.raises(ReplayError, match="non-finite"):
        write_shard(tmp_path / shard_name(0), data, tasks=["t"], source="a")
    assert not list(tmp_path.iterdir())


def test_directory_reader_raises_or_reports_and_skips_bad_shards(tmp_path: Path) -> None:
    with ReplayWriter(tmp_path, source="demo", tasks=["a"], shard_rows=10) as w:
        for i in range(3):
            w.add_episode(make_episode(12, seed=i), task="a", version="expert@0")
    shards = list_shards(tmp_path)
    assert len(shards) == 3
    raw = shards[1].read_bytes()
    shards[1].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReplayError, match="shard-000001"):
        load_replay(tmp_path)
    reported: list[str] = []
    replay = load_replay(tmp_path, skip_bad=True, on_skip=lambda p, why: reported.append(p.name))
    assert reported == ["shard-000001.safetensors"]
    assert len(replay) == 24 and sorted(set(replay.data.episode.tolist())) == [0, 2]
    assert replay.skipped[0][0] == shards[1]


def test_writer_cuts_at_episode_boundaries_and_continues_numbering(tmp_path: Path) -> None:
    with ReplayWriter(tmp_path, source="demo", shard_rows=25) as w:
        w.add_episode(make_episode(10), task="reach-v3", version="expert-sigma0@0")
        w.add_episode(make_episode(10), task="push-v3", version="expert-sigma1@0")
        w.add_episode(make_episode(10), task="reach-v3", version="expert-sigma1@0")  # flush: 30
        w.add_episode(make_episode(5), task="push-v3", version="expert-sigma0@0")
    assert [p.name for p in list_shards(tmp_path)] == [shard_name(0), shard_name(1)]
    first, info = read_shard(tmp_path / shard_name(0))
    assert len(first) == 30 and info.tasks == ("reach-v3", "push-v3")
    # A second writer appends after the existing shards and episode ids.
    with ReplayWriter(tmp_path, source="rollout") as w2:
        assert w2.add_episode(make_episode(4), task="pick-place-v3", version="model@1") == 4
    replay = load_replay(tmp_path)
    assert len(list_shards(tmp_path)) == 3
    assert replay.tasks == ("reach-v3", "push-v3", "pick-place-v3")
    names = replay.task_names()
    episodes = dict(replay.data.episodes())
    assert [names[episodes[e][0]] for e in range(5)] == [
        "reach-v3",
        "push-v3",
        "reach-v3",
        "push-v3",
        "pick-place-v3",
    ]
    versions = np.asarray(replay.versions)[replay.data.policy_version]
    assert versions[episodes[1][0]] == "expert-sigma1@0"
    assert versions[episodes[4][0]] == "model@1"
    only = load_replay(tmp_path, tasks=["push-v3"])
    assert len(only) == 15


def test_two_directories_get_distinct_episode_ids(tmp_path: Path) -> None:
    for name in ("a", "b"):
        with ReplayWriter(tmp_path / name, source=name) as w:
            w.add_episode(make_episode(3), task="t", version="v@0")
            w.add_episode(make_episode(3), task="t", version="v@0")
    replay = load_replay([tmp_path / "a", tmp_path / "b"])
    assert sorted(set(replay.data.episode.tolist())) == [0, 1, 2, 3]


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no shards"):
        load_replay(tmp_path)
    with pytest.raises(ReplayError, match="does not exist"):
        load_replay(tmp_path / "nope")


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(0, 40),
    obs_dim=st.integers(1, 9),
    action_dim=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_roundtrip_property(
    tmp_path: Path, n: int, obs_dim: int, action_dim: int, seed: int
) -> None:
    data = (
        make_episode(n, obs_dim=obs_dim, action_dim=action_dim, seed=seed)
        if n
        else Transitions.empty(obs_dim=obs_dim, action_dim=action_dim)
    )
    path = tmp_path / f"p-{n}-{obs_dim}-{action_dim}-{seed}" / shard_name(0)
    if path.exists():
        return
    write_shard(path, data, tasks=["t"], source="prop")
    back, info = read_shard(path)
    assert_same(data, back)
    assert info.rows == n
