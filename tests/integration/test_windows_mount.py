"""Windows: a real WinFsp mount of a local dataset on a free drive letter, used the way cmd and Explorer use it.

Runs on Windows only, with WinFsp installed (CI: ``choco install winfsp -y``), as
``python -m dicomfuse -a <folder> -p X: --cacheDir … --logDir …``. Elsewhere it skips.

Written before it could run anywhere (no Windows machine here), from cli/main.py and tests/mounting.py.
What it assumes of the Windows adapter (backends/winfsp.py, in progress), each a guess to check on the first run:
- ``-p X:`` names a drive letter that is not in use yet, and the mount creates it;
- the drive answers ``os.path.isdir("X:\\")`` once mounted, and disappears when the process ends;
- Ctrl+Break (the console signal a parent can send to a child in its own process group; Ctrl+C cannot be
  aimed at one) stops the mount as Ctrl+C does: unmount, wipe the cache, exit status 0.
"""

from __future__ import annotations

import os
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PATIENT_NAME, Backend, DicomFactory, _local_backend

pytestmark = [pytest.mark.mount, pytest.mark.skipif(sys.platform != "win32", reason="Windows only (WinFsp)")]

MOUNT_TIMEOUT = 60.0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def winfsp_installed() -> bool:
    if sys.platform != "win32":
        return False
    import winreg

    try:  # WinFsp's installer records its folder in the 32-bit registry view, as winfspy and mfusepy read it
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\WinFsp", 0,
                            winreg.KEY_READ | winreg.KEY_WOW64_32KEY) as key:
            folder = str(winreg.QueryValueEx(key, "InstallDir")[0])
    except OSError:
        return False
    return Path(folder, "bin").is_dir()


def free_drive_letter() -> str:
    if sys.platform != "win32":
        raise RuntimeError("drive letters are Windows only")
    import ctypes

    used = ctypes.windll.kernel32.GetLogicalDrives()
    for letter in reversed(string.ascii_uppercase[3:]):  # Z: down to D:, as net use and WinFsp's tools do
        if not used & (1 << (ord(letter) - ord("A"))) and not os.path.exists(f"{letter}:\\"):
            return f"{letter}:"
    raise RuntimeError("no free drive letter")


def cmd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """A cmd.exe built-in (dir, copy, del) as a user types it."""
    return subprocess.run(["cmd", "/d", "/c", *map(str, args)], capture_output=True, text=True, timeout=120)


class DriveMount:
    """``python -m dicomfuse -a FOLDER -p X:`` in its own console process group."""

    def __init__(self, address: str, workdir: Path) -> None:
        self.drive = free_drive_letter()
        self.root = Path(self.drive + "\\")
        self.logs = workdir / "logs"
        self.output = workdir / "mount-output.txt"
        self.argv = [sys.executable, "-m", "dicomfuse", "-a", address, "-p", self.drive,
                     "--cacheDir", str(workdir / "cache"), "--logDir", str(self.logs)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DriveMount:
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)  # type: ignore[attr-defined]
        proc = self.proc
        try:
            wait_for(lambda: self.root.is_dir() or proc.poll() is not None, MOUNT_TIMEOUT, f"the drive {self.drive}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"the drive did not appear:\n{self.diagnostics()}") from None
        assert self.root.is_dir(), f"dicomfuse exited {proc.returncode} before mounting:\n{self.diagnostics()}"
        return self

    def ctrl_break(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ctrl_break(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_text(self) -> str:
        files = sorted(self.logs.glob("*.log*")) + ([self.output] if self.output.exists() else [])
        return "".join(p.read_text(errors="replace") for p in files)

    def diagnostics(self) -> str:
        parts = [f"argv: {' '.join(self.argv)}",
                 f"exit status: {self.proc.poll() if self.proc else None}"]
        if self.output.exists():
            parts.append("output:\n" + self.output.read_text(errors="replace")[-4000:])
        debug = self.logs / "debug.log"
        if debug.exists():
            parts.append("debug.log tail:\n" + debug.read_text(errors="replace")[-4000:])
        return "\n\n".join(parts)


@pytest.fixture
def local(tmp_path: Path) -> Backend:
    if not winfsp_installed():
        reason = "needs WinFsp 2.x (the installer from https://winfsp.dev, or choco install winfsp)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return _local_backend(tmp_path / "dataset")


@pytest.fixture
def drive(local: Backend, tmp_path: Path) -> Iterator[DriveMount]:
    mount = DriveMount(local.address, tmp_path / "work")
    (tmp_path / "work").mkdir()
    try:
        yield mount.start()
    finally:
        mount.stop()
        wait_for(lambda: not mount.root.exists(), 30, f"{mount.drive} to go away")
        assert PATIENT_NAME not in mount.log_text()


def test_list_copy_out_copy_in_delete_and_new_folder(local: Backend, drive: DriveMount, dicom: DicomFactory,
                                                     tmp_path: Path) -> None:
    seeded = dicom.series(2)
    local.seed(seeded)
    inst = seeded[0]
    on_drive = drive.root / local.store_name / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"

    # Listing: the store at the top, the instance at the bottom of the tree.
    assert local.store_name in os.listdir(drive.root)
    listing = cmd("dir", "/s", "/b", drive.root)
    assert listing.returncode == 0, listing.stderr
    assert str(on_drive).lower() in listing.stdout.lower()

    # Copy out: byte-identical.
    out = tmp_path / "out"
    out.mkdir()
    copied = cmd("copy", "/b", "/y", on_drive, out)
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert (out / on_drive.name).read_bytes() == inst.path.read_bytes()

    # Copy in: the file lands in its own study and series, on the server too.
    new = dicom.instance(study=1)
    uploaded = drive.root / local.store_name / new.study_uid / new.series_uid / f"{new.sop_uid}.dcm"
    result = cmd("copy", "/b", "/y", new.path, drive.root / local.store_name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert local.has(new)
    assert uploaded.read_bytes() == new.path.read_bytes()

    # Delete it (del's exit status says nothing: check what is left).
    cmd("del", "/q", uploaded)
    assert not uploaded.exists()
    assert not local.has(new)

    # Explorer's "New folder" at the top, renamed: the rename creates the store; nothing else reaches the server.
    os.mkdir(drive.root / "New folder")
    os.rename(drive.root / "New folder", drive.root / "store-b")
    assert local.store_ids is not None
    assert "store-b" in local.store_ids() and "New folder" not in local.store_ids()
    assert "store-b" in os.listdir(drive.root)


def test_ctrl_break_unmounts_and_exits_0(local: Backend, drive: DriveMount) -> None:
    assert local.store_name in os.listdir(drive.root)
    status = drive.ctrl_break()
    assert status == 0, drive.diagnostics()
    wait_for(lambda: not drive.root.exists(), 30, f"{drive.drive} to go away")
    assert "cache wiped" in drive.output.read_text(errors="replace")
