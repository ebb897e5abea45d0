"""Pairing frames with proprioception by stamp."""

from __future__ import annotations

import numpy as np

from vlarl.perception.pairing import StampPairer


def vec(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float32)


def test_exact_stamp_match_from_history():
    pairer: StampPairer[str] = StampPairer(history=8)
    for s in (10, 20, 30):
        assert pairer.add_proprio(s, vec(s)) is None
    assert pairer.add_frame(20, "f")[0] == 20  # type: ignore[index]
    assert pairer.add_frame(15, "g") is False  # no sample with that stamp
    assert pairer.add_frame(5, "h") is False
    assert pairer.unpaired == 2


def test_frame_newer_than_history_waits_and_completes():
    pairer: StampPairer[str] = StampPairer()
    pairer.add_proprio(10, vec(1))
    assert pairer.add_frame(20, "a") is None
    assert pairer.add_frame(30, "b") is None  # supersedes "a"
    assert pairer.superseded == 1
    assert pairer.add_proprio(20, vec(2)) is None  # still waiting for 30
    done = pairer.add_proprio(30, vec(3))
    assert done is not None and done[0] == 30 and done[1] == "b" and done[2][0] == 3
    assert pairer.add_proprio(40, vec(4)) is None  # nothing waits any more
    assert pairer.add_frame(50, "c") is None
    assert pairer.add_proprio(60, vec(6)) is None  # no sample at 50: the frame is unpaired
    assert pairer.unpaired == 1


def test_skew_tolerance_picks_the_nearest_sample():
    pairer: StampPairer[str] = StampPairer(max_skew_ns=5)
    for s in (100, 110, 120):
        pairer.add_proprio(s, vec(s))
    assert pairer.add_frame(112, "x")[0] == 110  # type: ignore[index]
    assert pairer.add_frame(116, "y")[0] == 120  # type: ignore[index]
    assert pairer.add_frame(105, "z")[0] in (100, 110)  # type: ignore[index]
    strict: StampPairer[str] = StampPairer(max_skew_ns=0)
    strict.add_proprio(100, vec(1))
    strict.add_proprio(110, vec(2))
    assert strict.add_frame(105, "w") is False


def test_out_of_order_and_repeated_samples():
    pairer: StampPairer[str] = StampPairer(history=4)
    pairer.add_proprio(10, vec(1))
    pairer.add_proprio(10, vec(2))  # a re-published sample replaces, never duplicates
    pairer.add_proprio(5, vec(9))  # older than the newest: ignored
    assert pairer.add_frame(10, "a")[0] == 2  # type: ignore[index]
    assert pairer.add_frame(5, "b") is False
    for s in range(20, 70, 10):
        pairer.add_proprio(s, vec(s))
    assert pairer.add_frame(10, "old") is False  # fell out of the history
