"""OS adapters: each only translates its binding's callbacks into :class:`dicomfuse.core.vfs.Vfs`
calls. ``fuse`` (mfusepy: libfuse on Linux, macFUSE on macOS, WinFsp's FUSE layer on Windows
with Python >= 3.12) and ``winfsp`` (winfspy: Windows with Python 3.10/3.11). Each is imported
only when chosen, so the core and the tests of other systems never need its binding."""

from __future__ import annotations

import importlib.util
import sys


def adapter_name(platform: str = sys.platform, winfspy_installed: bool | None = None) -> str:
    """``"winfsp"`` on Windows when winfspy is installed (the dependency markers install it for
    Python < 3.12), else ``"fuse"``."""
    if platform != "win32":
        return "fuse"
    if winfspy_installed is None:
        winfspy_installed = importlib.util.find_spec("winfspy") is not None
    return "winfsp" if winfspy_installed else "fuse"
