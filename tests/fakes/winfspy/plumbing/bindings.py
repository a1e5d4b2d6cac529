"""The cffi binding (``_bindings.pyd``) replaced by a recorder.

Real 0.8.4 loads winfsp-x64.dll here and exposes ``ffi`` and ``lib``. The stand-in ``lib`` has the
four dispatcher functions ``FileSystem`` calls; each records its call and answers
STATUS_SUCCESS, or the status a test put in ``lib.results[name]``.
"""

from __future__ import annotations

from typing import Any


class _Lib:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.results: dict[str, int] = {}

    def _call(self, name: str, *args: Any) -> int:
        self.calls.append((name, args))
        return self.results.get(name, 0)

    def FspFileSystemSetMountPoint(self, file_system: Any, mount_point: str) -> int:  # noqa: N802
        return self._call("FspFileSystemSetMountPoint", file_system, mount_point)

    def FspFileSystemStartDispatcher(self, file_system: Any, thread_count: int) -> int:  # noqa: N802
        return self._call("FspFileSystemStartDispatcher", file_system, thread_count)

    def FspFileSystemStopDispatcher(self, file_system: Any) -> None:  # noqa: N802
        self._call("FspFileSystemStopDispatcher", file_system)

    def FspFileSystemDelete(self, file_system: Any) -> None:  # noqa: N802
        self._call("FspFileSystemDelete", file_system)


lib = _Lib()
ffi = None  # GUESS: nothing in the adapter touches cffi's ffi; a test that needs it should fail loudly


def enable_debug_log() -> None:
    """Real: points WinFsp's debug log at stderr. Nothing to do without WinFsp."""
