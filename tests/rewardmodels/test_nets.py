"""Geometric features of the reward models' network: point offsets (Meta-World's fingertip
centre) and distance rings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlarl.rewardmodels.nets import (
    DEFAULT_RINGS,
    METAWORLD_POINTS,
    METAWORLD_TCP_OFFSET,
    WindowNet,
    parse_points,
    parse_rings,
)


def test_parse_points_and_rings() -> None:
    points, offsets = parse_points("tcp", 39)
    assert points == METAWORLD_POINTS and offsets[0] == METAWORLD_TCP_OFFSET
    assert all(o == (0.0, 0.0, 0.0) for o in offsets[1:])
    assert parse_points("auto", 39) == (METAWORLD_POINTS, ((0.0, 0.0, 0.0),) * 4)
    assert parse_points("0@0:0:-0.045,4,11,36", 39) == (points, offsets)
    assert parse_points("auto", 12) == ((), ()) and parse_points("tcp", 12) == ((), ())
    assert parse_points("none", 39) == ((), ())
    assert parse_points("0@0:0:-0.05, 36", 39) == ((0, 36), ((0.0, 0.0, -0.05), (0.0, 0.0, 0.0)))
    for bad in ("0@1:2", "x", "37"):
        with pytest.raises(ValueError):
            parse_points(bad, 39)
    assert parse_rings("auto") == DEFAULT_RINGS and parse_rings("none") == ()
    assert parse_rings("0.05,0.07") == (0.05, 0.07)
    for bad in ("0.05,-1", "a"):
        with pytest.raises(ValueError):
            parse_rings(bad)


def test_offset_geometry_measures_the_fingertip_centre_to_goal_distance() -> None:
    """With the offset, the hand-goal distance feature is Meta-World's reach distance."""
    import warnings

    from vlarl.learning import envs

    env = envs.make_env("reach-v3")
    obs = envs.reset_episode(env, 3)
    rng = np.random.default_rng(0)
    rows, truth = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(40):
            obs, *_ = envs.step_env(env, rng.uniform(-1, 1, 4))
            rows.append(obs)
            truth.append(env.unwrapped.tcp_center - env.unwrapped._target_pos)
    env.close()
    points, offsets = parse_points("tcp", 39)
    net = WindowNet(obs_dim=39, window=1, points=points, point_offsets=offsets, rings=(0.05,))
    plain = WindowNet(obs_dim=39, window=1, points=points)
    x = torch.from_numpy(np.asarray(rows, np.float32)[:, None])
    pair = 2  # (hand, goal) is the third pair of (hand, obj, obj2, goal)
    truth = np.asarray(truth)
    got = net._geometry(x)[:, 0, 4 * pair : 4 * pair + 4].numpy()
    raw = plain._geometry(x)[:, 0, 4 * pair : 4 * pair + 4].numpy()
    assert np.max(np.abs(got[:, :3] - truth)) < 0.006  # the fingertips' spread
    assert np.max(np.abs(got[:, 3] - np.linalg.norm(truth, axis=1))) < 0.006
    assert np.min(np.abs(raw[:, 2] - truth[:, 2])) > 0.04  # without the offset: 4.5 cm off
    # rings: ~1 inside the radius, ~0 outside, one feature per pair, radius and observation
    net.fit_normalization(x[:, 0].numpy())
    out = net(x)  # runs with the ring features
    assert out.shape == (40,)
    dist = torch.tensor([[0.040], [0.049], [0.051], [0.060]])
    inside = torch.sigmoid((net.ring_radii - dist) / net.ring_width)[:, 0]
    assert inside[0] > 0.99 and inside[1] > 0.6 and inside[2] < 0.4 and inside[3] < 0.01
    assert net.normalization_json()["rings"] == [0.05]
    with pytest.raises(ValueError):
        WindowNet(obs_dim=39, window=1, points=points, point_offsets=offsets[:2])
