"""Rendering tests: Mesa's llvmpipe rasterizes on the render thread itself (as sim_robot does by
default), so the GIL measurement is not confounded by rasterizer worker threads."""

from __future__ import annotations

import os

os.environ.setdefault("LP_NUM_THREADS", "0")
