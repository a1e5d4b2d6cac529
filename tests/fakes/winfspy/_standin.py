"""Test helper, not part of winfspy's surface: load ``dicomfuse.backends.winfsp`` over this
stand-in, for one test at a time.

``adapter()`` makes this package importable as ``winfspy`` (and its modules as ``winfspy.*``),
imports the adapter, and on exit removes both, so no other test ever sees the stand-in. On
Windows with the real winfspy importable, ``real_binding()`` says so and tests use the real one.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

_MODULES = ("_version", "plumbing", "plumbing.bindings", "plumbing.status", "plumbing.exceptions",
            "plumbing.file_attribute", "plumbing.win32_filetime", "plumbing.security_descriptor",
            "operations", "file_system")
ADAPTER = "dicomfuse.backends.winfsp"


def real_binding() -> ModuleType | None:
    """The real winfspy, on Windows where it imports (WinFsp installed); else None."""
    if sys.platform != "win32":
        return None
    try:
        return importlib.import_module("winfspy")
    except Exception:  # noqa: BLE001 - not installed, or WinFsp's DLL missing: use the stand-in
        return None


def _ours(name: str) -> bool:
    return name == "winfspy" or name.startswith("winfspy.") or name == ADAPTER


@contextmanager
def adapter() -> Iterator[ModuleType]:
    """The adapter module bound to the stand-in (``.binding`` is the stand-in package)."""
    saved = {name: module for name, module in sys.modules.items() if _ours(name)}
    for name in saved:
        del sys.modules[name]
    package = __package__ or "tests.fakes.winfspy"
    for sub in ("", *(f".{m}" for m in _MODULES)):
        sys.modules["winfspy" + sub] = importlib.import_module(package + sub)
    backends = importlib.import_module("dicomfuse.backends")
    had_attr = hasattr(backends, "winfsp")
    previous = getattr(backends, "winfsp", None)
    try:
        module = importlib.import_module(ADAPTER)
        module.binding = sys.modules["winfspy"]  # type: ignore[attr-defined]
        yield module
    finally:
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        if had_attr:
            backends.winfsp = previous  # type: ignore[attr-defined]
        elif hasattr(backends, "winfsp"):
            delattr(backends, "winfsp")
