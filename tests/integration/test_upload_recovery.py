"""Nothing lost on upload, default (sync) mode: kill -9 of the mount during a STOW leaves the
bytes on disk, the next start reports them, and `dicomfuse retry` sends them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DicomFactory, google_backend, requires_fuse, run
from tests.mounting import Mount, unmount_command, wait_for

pytestmark = [requires_fuse, pytest.mark.mount]


def test_kill_9_during_a_sync_upload_then_retry_sends_it(healthcare, tmp_path: Path, dicom: DicomFactory):  # type: ignore[no-untyped-def]
    google = google_backend(healthcare, tmp_path)
    inst = dicom.instance()
    workdir = tmp_path / "crash"
    m = Mount(google.address, workdir, *google.extra_args).start()
    copy = None
    try:
        os.listdir(m.path / "store-a")  # a token first
        healthcare.clear_log()  # the session's stand-in has seen other tests' STOWs
        healthcare.inject(stall=True, times=1, method="POST", path_contains="/dicomWeb/studies")  # never answers
        copy = subprocess.Popen(["cp", str(inst.path), str(m.path / "store-a")], stderr=subprocess.PIPE)
        wait_for(lambda: any(r.method == "POST" and r.path.endswith("/dicomWeb/studies") for r in healthcare.requests),
                 20, what="the STOW to start")
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)
        assert copy.wait(30) != 0, "the copy cannot have succeeded"
    finally:
        if copy is not None and copy.poll() is None:
            copy.kill()
        run(*unmount_command(m.path, lazy=True))
    healthcare.clear_faults()
    assert not google.has(inst)
    m2 = Mount(google.address, workdir, *google.extra_args).start()
    try:
        wait_for(lambda: "left by a mount that stopped" in m2.log_text(), 20, what="the warning about the file")
    finally:
        m2.stop()
    status = run(sys.executable, "-m", "dicomfuse", "status", "--cacheDir", m.cache_dir, "--logDir", m.log_dir)
    assert status.returncode == 1 and "dicomfuse retry" in status.stdout + status.stderr
    retry = run(sys.executable, "-m", "dicomfuse", "retry", "-a", google.address, "--keyFile", str(google.key_file),
                "--cacheDir", m.cache_dir, "--store", "store-a", "--logDir", m.log_dir)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "stored" in retry.stdout
    assert google.server_bytes(inst) == inst.path.read_bytes()
    status = run(sys.executable, "-m", "dicomfuse", "status", "--cacheDir", m.cache_dir, "--logDir", m.log_dir)
    assert status.returncode == 0, status.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_an_upload_lets_it_finish_then_unmounts(sig: int, healthcare, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                dicom: DicomFactory):
    google = google_backend(healthcare, tmp_path)
    inst = dicom.instance()
    m = Mount(google.address, tmp_path / "term", *google.extra_args).start()
    copy = None
    try:
        os.listdir(m.path / "store-a")
        healthcare.clear_log()
        healthcare.inject(delay=3.0, times=1, method="POST", path_contains="/dicomWeb/studies")
        copy = subprocess.Popen(["cp", str(inst.path), str(m.path / "store-a")], stderr=subprocess.PIPE)
        wait_for(lambda: healthcare.faults_left() == 0, 20, what="the STOW to start")
        assert copy.poll() is None, "the STOW is still being answered: the copy waits for it"
        assert m.stop(sig) == 0, m.diagnostics()
        assert copy.wait(30) == 0, copy.stderr.read() if copy.stderr else ""
    finally:
        if copy is not None and copy.poll() is None:
            copy.kill()
        healthcare.clear_faults()
    assert not os.path.ismount(m.path)
    assert google.server_bytes(inst) == inst.path.read_bytes(), "the upload in flight finished"


def test_more_signals_during_the_shutdown_never_cut_it_short(healthcare, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                             dicom: DicomFactory):
    """Ctrl+C twice (a one-file build gets each one twice), then SIGTERM while the write-back
    queue drains: the default action that libfuse gives the signals back ended the process at
    once, with the upload cut off and patient data left in the cache. The shutdown goes on and
    says so."""
    google = google_backend(healthcare, tmp_path)
    inst = dicom.instance()
    m = Mount(google.address, tmp_path / "again", *google.extra_args, "--uploadMode", "writeback").start()
    copy = None
    try:
        os.listdir(m.path / "store-a")  # a token first
        healthcare.clear_log()
        healthcare.inject(delay=4.0, times=1, method="POST", path_contains="/dicomWeb/studies")
        copy = subprocess.Popen(["cp", str(inst.path), str(m.path / "store-a")], stderr=subprocess.PIPE)
        assert copy.wait(30) == 0, copy.stderr.read() if copy.stderr else ""  # queued
        wait_for(lambda: healthcare.faults_left() == 0, 20, what="the STOW to start")
        assert m.proc is not None
        m.proc.send_signal(signal.SIGINT)
        m.proc.send_signal(signal.SIGINT)
        wait_for(lambda: not os.path.ismount(m.path), 20, what="the mount to be gone")
        time.sleep(0.5)  # the shutdown has begun; the upload it waits for is answered in 4 s
        for sig in (signal.SIGTERM, signal.SIGINT):
            m.proc.send_signal(sig)
        assert m.proc.wait(60) == 0, m.diagnostics()
    finally:
        if copy is not None and copy.poll() is None:
            copy.kill()
        healthcare.clear_faults()
        m.stop()
    assert "Still unmounting" in m.log_text()
    assert google.server_bytes(inst) == inst.path.read_bytes(), "the upload in flight finished"
    assert [p for p in Path(m.cache_dir, "mounts").rglob("*") if p.is_file()] == [], "the cache is wiped"
