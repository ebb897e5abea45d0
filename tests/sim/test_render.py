"""Offscreen rendering from state snapshots, on the calling thread and in the background."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vlarl.sim.errors import RenderError
from vlarl.sim.render import BackgroundRenderer, CameraConfig, OffscreenRenderer, SimSnapshot
from vlarl.sim.robot import MetaWorldRobot


@pytest.fixture(scope="module")
def robot():
    with MetaWorldRobot("pick-place-v3", seed=0) as r:
        for _ in range(5):
            r.step(np.array([0.6, -0.3, 0.2, 1.0]))
        yield r


def test_render_84x84_uint8_frame_from_a_snapshot_matches_the_live_scene(robot):
    with OffscreenRenderer(CameraConfig(camera="corner3", width=84, height=84)) as renderer:
        frame = renderer.render(robot.snapshot(stamp_ns=5))
        assert frame.shape == (84, 84, 3) and frame.dtype == np.uint8
        assert frame.std() > 10, "a real scene, not a blank frame"
        live = renderer.render_data(robot.model, robot.data)
        assert np.array_equal(frame, live)
        # A snapshot is a copy: stepping afterwards does not change its frame.
        snap = robot.snapshot()
        for _ in range(10):
            robot.step(np.array([-1.0, 0.0, 0.0, 0.0]))
        assert np.array_equal(renderer.render(snap), renderer.render(snap))
        assert not np.array_equal(renderer.render(snap), renderer.render(robot.snapshot()))


def test_unknown_camera_and_oversized_frames_are_refused(robot):
    with (
        OffscreenRenderer(CameraConfig(camera="nope")) as renderer,
        pytest.raises(RenderError, match=r"unknown camera 'nope'.*corner2"),
    ):
        renderer.render(robot.snapshot())
    with (
        OffscreenRenderer(CameraConfig(width=5000, height=84)) as renderer,
        pytest.raises(RenderError, match="exceeds"),
    ):
        renderer.render(robot.snapshot())


def test_background_renderer_delivers_stamped_frames_and_keeps_the_gil_free(robot):
    frames: list[tuple[int, tuple[int, ...]]] = []
    got = threading.Event()

    def on_frame(frame: np.ndarray, snapshot: SimSnapshot) -> None:
        frames.append((snapshot.stamp_ns, frame.shape))
        got.set()

    with BackgroundRenderer(on_frame, config=CameraConfig(width=64, height=48)) as bg:
        bg.submit(robot.snapshot(stamp_ns=123))
        assert got.wait(30.0), f"no frame: {bg.stats}"
        assert frames[0] == (123, (48, 64, 3))
        # The main thread keeps running Python while frames render: the render thread must
        # not hold the GIL for a whole frame.
        got.clear()
        renders_before = bg.stats.frames
        stall = 0.0
        last = start = time.perf_counter()
        submitted = 0
        while bg.stats.frames - renders_before < 3 and time.perf_counter() - start < 30.0:
            if bg.idle() and submitted < 3:
                bg.submit(robot.snapshot(stamp_ns=1000 + submitted))
                submitted += 1
            now = time.perf_counter()
            stall, last = max(stall, now - last), now
        render_s = bg.stats.last_render_s
        assert bg.stats.frames - renders_before >= 3 and bg.stats.errors == 0
        assert stall < 0.5 * render_s, f"main thread stalled {stall:.3f}s per {render_s:.3f}s frame"


def test_background_renderer_drops_all_but_the_newest_and_reports_errors(robot):
    seen: list[int] = []
    done = threading.Event()

    def on_frame(frame: np.ndarray, snapshot: SimSnapshot) -> None:
        seen.append(snapshot.stamp_ns)
        if snapshot.stamp_ns == 9:
            done.set()

    with BackgroundRenderer(on_frame, config=CameraConfig(width=32, height=32)) as bg:
        for stamp in range(10):
            bg.submit(robot.snapshot(stamp_ns=stamp))
        assert done.wait(30.0)
        assert seen[-1] == 9 and len(seen) < 10 and bg.stats.dropped == 10 - len(seen)
        bg.configure(CameraConfig(camera="missing"))
        bg.submit(robot.snapshot(stamp_ns=10))
        deadline = time.monotonic() + 10
        while bg.stats.errors == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bg.stats.errors == 1 and "unknown camera" in bg.stats.last_error
