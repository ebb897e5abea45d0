"""Offscreen camera images of the embedded robot, off the control thread.

Rendering costs ~70-100 ms per 84x84 frame on CPU (``MUJOCO_GL=osmesa``, Mesa llvmpipe), about
300 control steps' worth, so the control loop never renders. It takes a :class:`SimSnapshot` (a
copy of qpos/qvel/mocap/site positions, ~2 µs) and hands it to a :class:`BackgroundRenderer`,
whose thread owns its own ``MjData`` and GL context, recomputes the kinematics from the snapshot
and renders. MuJoCo's bindings release the GIL inside ``mjr_render``/``mjr_readPixels`` (measured:
a pure-Python loop on the main thread keeps ~98 % of its rate while a render thread works, with
no stall longer than ~2 ms, when llvmpipe rasterizes on the render thread, ``LP_NUM_THREADS=0``),
so the control thread keeps its rate while frames are rendered.

GL contexts belong to the thread that made them: an :class:`OffscreenRenderer` must be created,
used and closed on one thread, and with OSMesa a process should close one renderer before it
creates the next (two live contexts corrupt each other's frames).
"""

from __future__ import annotations

import os

# The GL backend is chosen when mujoco is imported; headless CPU machines need OSMesa.
os.environ.setdefault("MUJOCO_GL", "osmesa")

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mujoco
import numpy as np

from vlarl.sim.errors import RenderError

DEFAULT_CAMERA = "corner3"
DEFAULT_SIZE = 84


@dataclass(frozen=True, slots=True)
class SimSnapshot:
    """What rendering needs of one simulator sample, copied so another thread may use it."""

    model: Any  # mujoco.MjModel (shared, read-only)
    qpos: np.ndarray
    qvel: np.ndarray
    mocap_pos: np.ndarray
    mocap_quat: np.ndarray
    site_xpos: np.ndarray  # Meta-World writes goal sites straight into data.site_xpos
    stamp_ns: int = 0  # stamp of the sample the snapshot was taken from

    @classmethod
    def of(cls, model: Any, data: Any, *, stamp_ns: int = 0) -> SimSnapshot:
        return cls(
            model=model,
            qpos=data.qpos.copy(),
            qvel=data.qvel.copy(),
            mocap_pos=data.mocap_pos.copy(),
            mocap_quat=data.mocap_quat.copy(),
            site_xpos=data.site_xpos.copy(),
            stamp_ns=int(stamp_ns),
        )


@dataclass(frozen=True, slots=True)
class CameraConfig:
    """Which camera to render and at what size."""

    camera: str = DEFAULT_CAMERA  # a camera of the MuJoCo model (Meta-World: corner, corner2, ...)
    width: int = DEFAULT_SIZE  # pixels
    height: int = DEFAULT_SIZE  # pixels
    flip: bool = True  # Meta-World's cameras render upside down; flip rows to make them upright


def camera_names(model: Any) -> tuple[str, ...]:
    return tuple(mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam))


def check_camera(model: Any, config: CameraConfig) -> str | None:
    """Why ``config`` cannot render ``model``, or None."""
    if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, config.camera) < 0:
        return f"unknown camera {config.camera!r}; the model has: {', '.join(camera_names(model))}"
    if config.width < 1 or config.height < 1:
        return f"image size must be positive, got {config.width}x{config.height}"
    max_w, max_h = int(model.vis.global_.offwidth), int(model.vis.global_.offheight)
    if config.width > max_w or config.height > max_h:
        return f"image size {config.width}x{config.height} exceeds the model's {max_w}x{max_h}"
    return None


class OffscreenRenderer:
    """Renders RGB frames (uint8 [height, width, 3]) of a model; one thread only."""

    def __init__(self, config: CameraConfig | None = None) -> None:
        self.config = config or CameraConfig()
        self._model: Any = None
        self._renderer: mujoco.Renderer | None = None
        self._data: Any = None

    def _ensure(self, model: Any) -> mujoco.Renderer:
        if self._renderer is not None and self._model is model:
            return self._renderer
        reason = check_camera(model, self.config)
        if reason is not None:
            raise RenderError(reason)
        self._close_renderer()
        try:
            self._renderer = mujoco.Renderer(model, self.config.height, self.config.width)
        except Exception as exc:
            raise RenderError(
                f"cannot create an offscreen renderer (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r};"
                f" CPU-only machines need MUJOCO_GL=osmesa and libosmesa6): {exc}"
            ) from exc
        self._model = model
        self._data = mujoco.MjData(model)
        return self._renderer

    def render(self, snapshot: SimSnapshot) -> np.ndarray:
        """A frame of the scene as it was when ``snapshot`` was taken."""
        renderer = self._ensure(snapshot.model)
        data = self._data
        data.qpos[:] = snapshot.qpos
        data.qvel[:] = snapshot.qvel
        data.mocap_pos[:] = snapshot.mocap_pos
        data.mocap_quat[:] = snapshot.mocap_quat
        mujoco.mj_kinematics(snapshot.model, data)
        mujoco.mj_camlight(snapshot.model, data)
        data.site_xpos[:] = snapshot.site_xpos
        return self._draw(renderer, data)

    def render_data(self, model: Any, data: Any) -> np.ndarray:
        """A frame of a live ``MjData`` (same thread as the simulation only)."""
        return self._draw(self._ensure(model), data)

    def _draw(self, renderer: mujoco.Renderer, data: Any) -> np.ndarray:
        try:
            renderer.update_scene(data, camera=self.config.camera)
            frame = renderer.render()
        except Exception as exc:
            raise RenderError(f"rendering failed: {exc}") from exc
        if self.config.flip:
            frame = np.ascontiguousarray(frame[::-1])
        return frame

    def reconfigure(self, config: CameraConfig) -> None:
        """New camera/size; the GL context is rebuilt on the next frame."""
        if config != self.config:
            self.config = config
            self._close_renderer()

    def _close_renderer(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        self._renderer = None
        self._model = None
        self._data = None

    def close(self) -> None:
        self._close_renderer()

    def __enter__(self) -> OffscreenRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FrameCallback = Callable[[np.ndarray, SimSnapshot], None]


@dataclass(slots=True)
class RenderStats:
    """Counters of a :class:`BackgroundRenderer`."""

    submitted: int = 0
    frames: int = 0
    dropped: int = 0  # snapshots replaced by a newer one before they were rendered
    errors: int = 0
    last_error: str = ""
    last_render_s: float = 0.0  # wall seconds of the last render


class BackgroundRenderer:
    """A thread that renders the newest submitted snapshot and hands the frame to a callback.

    ``submit()`` never blocks: a snapshot that is still waiting when a newer one arrives is
    dropped (latest wins). ``on_frame`` runs on the render thread.
    """

    def __init__(
        self,
        on_frame: FrameCallback,
        *,
        config: CameraConfig | None = None,
        name: str = "vlarl-render",
    ) -> None:
        self._on_frame = on_frame
        self._config = config or CameraConfig()
        self._cond = threading.Condition()
        self._pending: SimSnapshot | None = None
        self._rendering = False
        self._stop = False
        self.stats = RenderStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def config(self) -> CameraConfig:
        return self._config

    def configure(self, config: CameraConfig) -> None:
        """Use ``config`` from the next frame on (the thread rebuilds its GL context)."""
        with self._cond:
            self._config = config

    def submit(self, snapshot: SimSnapshot) -> None:
        with self._cond:
            if self._stop:
                return
            if self._pending is not None:
                self.stats.dropped += 1
            self._pending = snapshot
            self.stats.submitted += 1
            self._cond.notify()

    def idle(self) -> bool:
        """True when no snapshot is waiting (the current one may still be rendering)."""
        with self._cond:
            return self._pending is None

    def busy(self) -> bool:
        """True while a snapshot waits or renders."""
        with self._cond:
            return self._pending is not None or self._rendering

    def _run(self) -> None:
        renderer = OffscreenRenderer(self._config)
        try:
            while True:
                with self._cond:
                    while self._pending is None and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                    snapshot, self._pending = self._pending, None
                    config = self._config
                    self._rendering = True
                assert snapshot is not None
                renderer.reconfigure(config)
                start = time.perf_counter()
                try:
                    frame = renderer.render(snapshot)
                    self.stats.last_render_s = time.perf_counter() - start
                    self.stats.frames += 1
                    self._on_frame(frame, snapshot)
                except Exception as exc:  # reported through stats; the thread keeps serving
                    self.stats.errors += 1
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                finally:
                    with self._cond:
                        self._rendering = False
        finally:
            renderer.close()

    def close(self, *, timeout: float = 5.0) -> None:
        """Stop the thread (after the frame in progress) and free its GL context."""
        with self._cond:
            self._stop = True
            self._pending = None
            self._cond.notify()
        self._thread.join(timeout=timeout)

    def __enter__(self) -> BackgroundRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
