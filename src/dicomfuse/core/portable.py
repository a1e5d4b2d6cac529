"""What differs between POSIX and Windows for the core's own files, in one place.

The core keeps patient data in private files (the instance cache, the upload spool, the
write-back journal). On Windows, ``os.open`` opens in text mode unless told ``O_BINARY`` (a
CRLF translation would corrupt instances), there is no ``pread``/``pwrite``, no ``flock``, no
``statvfs``, a folder cannot be opened to fsync it, and ``os.kill(pid, 0)`` *terminates* the
process instead of probing it. Everything here has one POSIX and one Windows branch, and both
are exercised by the unit tests on Linux (the Windows branches by forcing them).
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from pathlib import Path
from typing import Any

WINDOWS = os.name == "nt"
BINARY = getattr(os, "O_BINARY", 0)  # 0 on POSIX
ACCMODE = getattr(os, "O_ACCMODE", os.O_RDONLY | os.O_WRONLY | os.O_RDWR)  # Windows has no os.O_ACCMODE

_seek_lock = threading.Lock()  # pread/pwrite emulation: one seek+read at a time per process


def open_fd(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """``os.open`` in binary mode, private (0600) when it creates the file. On Windows the file is
    opened with FILE_SHARE_DELETE so that, as on POSIX, it can be renamed or deleted while open (a
    spool file moved to failed/ by a flush, a cache file evicted while a reader has it): the CRT
    behind ``os.open`` never shares delete access, and MoveFileEx/DeleteFile then fail with a
    sharing violation (WinError 32)."""
    if not WINDOWS:
        return os.open(path, flags | BINARY, mode)
    return _windows_open(os.fspath(path), flags)


@functools.cache
def _kernel32() -> Any:
    """kernel32 with the signatures used here declared once (every open of a cached or spooled
    file goes through CreateFileW: no per-call setup on that path)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.CreateFileW.argtypes = [wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD, wintypes.LPVOID,
                                     wintypes.DWORD, wintypes.DWORD, wintypes.HANDLE]
    kernel32.CreateFileW.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.GetExitCodeProcess.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD)]
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    return kernel32


def _windows_open(path: str, flags: int) -> int:
    """CreateFileW with every share mode, as a binary CRT fd."""
    import ctypes
    import msvcrt
    from ctypes import wintypes

    kernel32 = _kernel32()
    generic_read, generic_write = 0x80000000, 0x40000000
    access = {os.O_RDONLY: generic_read, os.O_WRONLY: generic_write,
              os.O_RDWR: generic_read | generic_write}[flags & ACCMODE]
    if flags & os.O_CREAT:  # CREATE_NEW, CREATE_ALWAYS, OPEN_ALWAYS
        disposition = 1 if flags & os.O_EXCL else 2 if flags & os.O_TRUNC else 4
    else:  # TRUNCATE_EXISTING, OPEN_EXISTING
        disposition = 5 if flags & os.O_TRUNC else 3
    share = 0x1 | 0x2 | 0x4  # FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE
    handle = kernel32.CreateFileW(path, access, share, None, disposition, 0x80, None)  # FILE_ATTRIBUTE_NORMAL
    if handle is None or handle == wintypes.HANDLE(-1).value:  # INVALID_HANDLE_VALUE
        code = ctypes.get_last_error()  # type: ignore[attr-defined]
        raise OSError(None, ctypes.FormatError(code), path, code)  # type: ignore[attr-defined]
    try:
        return msvcrt.open_osfhandle(handle, flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND))  # type: ignore[attr-defined]
    except BaseException:
        kernel32.CloseHandle(handle)
        raise


def pread(fd: int, size: int, offset: int, *, emulate: bool = WINDOWS) -> bytes:
    if not emulate:
        return os.pread(fd, size, offset)
    with _seek_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)


def pwrite(fd: int, data: bytes, offset: int, *, emulate: bool = WINDOWS) -> int:
    if not emulate:
        return os.pwrite(fd, data, offset)
    with _seek_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def try_lock(fd: int, *, windows: bool = WINDOWS) -> bool:
    """Take an exclusive lock on the open file ``fd`` without waiting; False when another
    process holds it. The lock goes with the process (released when it dies)."""
    if windows:
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def make_private(fd: int) -> None:
    """0600 for a file created by someone else's umask (Windows: the folder's ACL decides)."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o600)


def fsync_path(path: Path, *, windows: bool = WINDOWS) -> None:
    """fsync a file, or a folder so that renames in it are durable (Windows cannot open a
    folder; NTFS journals its renames)."""
    if windows and path.is_dir():
        return
    # FlushFileBuffers needs write access: on Windows os.fsync of a read-only fd fails (EBADF).
    # open_fd shares delete access there: the write-back queue's group commit must never stop a
    # sender from removing a file it has just uploaded.
    fd = open_fd(path, os.O_RDWR if windows else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int, *, windows: bool = WINDOWS) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive; when it cannot be
    told, alive, so that its files are left alone)."""
    if pid <= 0:
        return False
    if windows:
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # PermissionError: another user's; anything else: cannot tell
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    kernel32 = _kernel32()
    process_query_limited_information, still_active, access_denied = 0x1000, 259, 5
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return ctypes.get_last_error() == access_denied  # type: ignore[attr-defined]
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def disk_stats(path: Path, *, windows: bool = WINDOWS) -> dict[str, int]:
    """``statfs`` numbers for the disk holding ``path``."""
    if not windows:
        st = os.statvfs(path)
        return {
            "f_bsize": st.f_bsize, "f_frsize": st.f_frsize, "f_blocks": st.f_blocks,
            "f_bfree": st.f_bfree, "f_bavail": st.f_bavail, "f_files": st.f_files,
            "f_ffree": st.f_ffree, "f_favail": st.f_favail, "f_namemax": 255,
        }
    usage = shutil.disk_usage(path)
    block = 4096
    return {
        "f_bsize": block, "f_frsize": block, "f_blocks": usage.total // block,
        "f_bfree": usage.free // block, "f_bavail": usage.free // block, "f_files": 0,
        "f_ffree": 0, "f_favail": 0, "f_namemax": 255,
    }
