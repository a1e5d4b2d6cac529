"""core.portable: both branches of each POSIX/Windows difference, the Windows ones forced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomfuse.core import portable

WINDOWS = sys.platform == "win32"


def posix_only(value: bool, reason: str) -> object:
    """A parameter forcing the POSIX branch: it needs what Windows lacks."""
    return pytest.param(value, marks=pytest.mark.skipif(WINDOWS, reason=reason))


@pytest.mark.parametrize("emulate", [posix_only(False, "Windows has no os.pread/os.pwrite"), True])
def test_pread_pwrite_at_offsets_leave_other_bytes_alone(tmp_path: Path, emulate: bool):
    fd = portable.open_fd(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        assert portable.pwrite(fd, b"\r\n" * 8, 0, emulate=emulate) == 16
        assert portable.pwrite(fd, b"XY", 4, emulate=emulate) == 2
        assert portable.pread(fd, 6, 2, emulate=emulate) == b"\r\nXY\r\n"  # bytes, never text
        assert portable.pread(fd, 100, 14, emulate=emulate) == b"\r\n"
        assert portable.pread(fd, 10, 16, emulate=emulate) == b""
    finally:
        os.close(fd)
    if not WINDOWS:  # Windows has no mode bits beyond read-only: the folder's ACL keeps it private
        assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600


def test_lock_is_exclusive_between_opens_and_free_after_close(tmp_path: Path):
    path = tmp_path / "lock"
    first = portable.open_fd(path, os.O_CREAT | os.O_RDWR)
    second = portable.open_fd(path, os.O_RDWR)
    try:
        assert portable.try_lock(first)
        assert not portable.try_lock(second)
        os.close(first)
        first = -1
        assert portable.try_lock(second)
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)


def test_pid_alive_tells_a_finished_process_from_a_running_one():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert portable.pid_alive(os.getpid())
    assert not portable.pid_alive(proc.pid)  # reaped: the pid is free (not reused this fast)
    assert not portable.pid_alive(0) and not portable.pid_alive(-5)


@pytest.mark.parametrize("windows", [posix_only(False, "Windows has no os.statvfs"), True])
def test_disk_stats_agree_with_the_disk(tmp_path: Path, windows: bool):
    st = portable.disk_stats(tmp_path, windows=windows)
    import shutil

    usage = shutil.disk_usage(tmp_path)
    total = st["f_blocks"] * st["f_frsize"]
    assert abs(total - usage.total) <= usage.total // 100
    assert 0 <= st["f_bavail"] <= st["f_blocks"] and st["f_namemax"] == 255


@pytest.mark.parametrize("windows", [posix_only(False, "the POSIX branch opens a folder, which Windows cannot"), True])
def test_fsync_path_takes_files_and_folders(tmp_path: Path, windows: bool):
    (tmp_path / "f").write_bytes(b"x")
    portable.fsync_path(tmp_path / "f", windows=windows)
    portable.fsync_path(tmp_path, windows=windows)
    with pytest.raises(FileNotFoundError):
        portable.fsync_path(tmp_path / "missing", windows=windows)
