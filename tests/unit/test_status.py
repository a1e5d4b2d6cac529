"""``dicomfuse status``: the report on pending and failed uploads, and its exit codes."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from dicomfuse.cli.status import EXIT_CLEAN, EXIT_FAILED, EXIT_PENDING, run_status, status_report
from dicomfuse.core.writeback import QueuedUpload, WriteBackQueue, queue_dir
from dicomfuse.dicomfile import DicomUids
from tests.conftest import PATIENT_NAME, DicomFactory


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def source(cache: Path, name: str, data: bytes) -> Path:
    folder = cache / "spool"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def uids(study: int, n: int) -> DicomUids:
    return DicomUids(f"1.2.9.{study}", f"1.2.9.{study}.1", f"1.2.9.{study}.1.{n}")


def refuse(store: str, items: list[QueuedUpload]):
    return [(item, False, "the server refused the file (409)") for item in items]


def test_nothing_to_report(cache):
    text, code = status_report(cache)  # the cache folder does not even exist
    assert code == EXIT_CLEAN
    assert "nothing waiting" in text and "Failed uploads: none." in text
    assert not cache.exists()  # reporting creates nothing


def test_pending_uploads_waiting_for_the_next_start(cache, dicom: DicomFactory):
    q = WriteBackQueue(queue_dir(cache), refuse, dataset="https://host/dicom-web")
    inst = dicom.instance()  # real DICOM with a patient name: it must not reach the report
    size = inst.path.stat().st_size
    q.submit("ct", DicomUids(inst.study_uid, inst.series_uid, inst.sop_uid), inst.path)
    q.submit("ct", uids(1, 1), source(cache, "a", b"x" * 2048))
    q.submit("mr", uids(2, 1), source(cache, "b", b"y" * 10))
    q.stop(drain=False)
    text, code = status_report(cache)
    assert code == EXIT_PENDING
    assert "3 uploads pending" in text and "oldest queued 0 s ago" in text
    assert f"store ct of https://host/dicom-web: 2 uploads, {(size + 2048) / 1024:.1f} KiB" in text
    assert "store mr of https://host/dicom-web: 1 upload, 10 bytes" in text
    assert "No running mount is sending them" in text
    assert "Failed uploads: none." in text
    assert PATIENT_NAME not in text and PATIENT_NAME.split("^")[0] not in text


def test_pending_uploads_being_sent_by_a_live_mount(cache):
    hold = threading.Event()
    started = threading.Event()

    def send(store, items):
        started.set()
        hold.wait(5)
        return [(item, True, None) for item in items]

    q = WriteBackQueue(queue_dir(cache), send, settle=0.0, status_interval=0.02)
    try:
        q.start()
        q.submit("ct", uids(1, 1), source(cache, "a", b"x"))
        assert started.wait(2)
        deadline = time.monotonic() + 2
        while '"in_flight": 1' not in (queue_dir(cache) / "status.json").read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        text, code = status_report(cache)
        assert code == EXIT_PENDING
        assert f"A running mount (pid {os.getpid()}) is sending them: 1 being sent now" in text
    finally:
        hold.set()
        q.stop(timeout=5)
    text, code = status_report(cache)
    assert code == EXIT_CLEAN and "nothing waiting" in text


def test_a_crashed_mount_is_not_taken_for_a_live_one(cache):
    q = WriteBackQueue(queue_dir(cache), refuse)
    q.submit("ct", uids(1, 1), source(cache, "a", b"x"))
    q.stop(drain=False)
    status_file = queue_dir(cache) / "status.json"
    status = json.loads(status_file.read_text())
    # what a mount killed mid-run leaves: running, but its pid is gone
    status_file.write_text(json.dumps({**status, "running": True, "pid": 2**22 + 12345, "updated_at": time.time()}))
    text, code = status_report(cache)
    assert code == EXIT_PENDING and "No running mount is sending them" in text
    # a live pid that stopped reporting
    status_file.write_text(json.dumps({**status, "running": True, "pid": os.getpid(),
                                       "updated_at": time.time() - 3600, "heartbeat": 10}))
    text, _ = status_report(cache)
    assert "has not reported for 60 min; it may be stuck" in text
    status_file.write_text("{torn")
    text, code = status_report(cache)
    assert code == EXIT_PENDING and "No running mount is sending them" in text


def test_failed_uploads_of_both_modes(cache):
    q = WriteBackQueue(queue_dir(cache), refuse, settle=0.0)
    q.start()
    item = q.submit("ct", uids(1, 7), source(cache, "a", b"z" * 3000))
    q.submit("ct", uids(1, 8), source(cache, "b", b"w"))
    assert q.wait_idle(5)
    q.stop()
    sync_failed = cache / "spool" / "failed"
    sync_failed.mkdir(parents=True, exist_ok=True)
    (sync_failed / "20240101-120000-0-scan.dcm").write_bytes(b"s" * 5)
    text, code = status_report(cache)
    assert code == EXIT_FAILED
    assert "Failed uploads: 3." in text
    kept = queue_dir(cache) / "failed" / f"{item.id}.dcm"
    assert f"  ct/1.2.9.1/1.2.9.1.1/1.2.9.1.1.7.dcm  2.9 KiB  (the server refused the file (409))\n    {kept}\n" in text
    assert f"  20240101-120000-0-scan.dcm  5 bytes  (reason in the error log)\n    {sync_failed}{os.sep}" in text
    assert "nothing waiting" in text


def test_failed_wins_over_pending_for_the_exit_code(cache):
    q = WriteBackQueue(queue_dir(cache), refuse)
    q.submit("ct", uids(1, 1), source(cache, "a", b"x"))
    q.stop(drain=False)
    (cache / "spool" / "failed").mkdir(parents=True)
    (cache / "spool" / "failed" / "kept.dcm").write_bytes(b"k")
    text, code = status_report(cache)
    assert code == EXIT_FAILED and "1 upload pending" in text and "kept.dcm" in text


def test_run_status_prints_the_report(cache, capsys):
    cache.mkdir()  # a mount made it (and left it: only its instance cache is wiped)
    assert run_status(["--cacheDir", str(cache)]) == EXIT_CLEAN
    out = capsys.readouterr().out
    assert str(cache) in out and "Failed uploads: none." in out
    assert run_status(["--bogus"]) == 2


def test_a_cache_folder_that_does_not_exist_is_an_error_not_all_clear(tmp_path, capsys):
    """A mistyped --cacheDir must not read as 'nothing waiting, nothing failed' (exit 0)."""
    assert run_status(["--cacheDir", str(tmp_path / "typo")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_uploads_left_unconfirmed_by_a_sync_mount_that_stopped(cache, capsys):
    """kill -9 of a sync-mode mount during an upload leaves its bytes in spool/*.part: the server
    may not have them, so status must not say all clear (they are not sent by themselves)."""
    import subprocess
    import sys

    from dicomfuse.core.uploads import Spool

    spool_dir = cache / "spool"
    spool_dir.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a mount that is gone
    orphan = spool_dir / f"{proc.pid}-{int(time.time())}-0.part"
    orphan.write_bytes(b"o" * 3000)
    (spool_dir / f"{proc.pid}-{int(time.time())}-1.part").write_bytes(b"")  # opened, never written
    (spool_dir / f"{proc.pid}-{int(time.time())}-2.previous").write_bytes(b"p")  # the server's old copy
    live = spool_dir / f"{os.getppid()}-{int(time.time())}-0.part"  # a running mount's upload in progress
    live.write_bytes(b"l")
    own, fd = Spool(spool_dir, spool_dir / "failed").new_file()  # and this process's own
    os.write(fd, b"w")
    os.close(fd)
    text, code = status_report(cache)
    assert code == EXIT_FAILED
    assert "Unconfirmed uploads left by a mount that stopped: 1." in text
    assert "'dicomfuse retry -a ADDRESS --store NAME' sends them" in text
    assert f"moves them to {spool_dir / 'failed'}" in text
    assert f"  {orphan}  2.9 KiB  (not confirmed uploaded; dicomfuse retry sends it)\n" in text
    assert str(live) not in text and str(own) not in text and ".previous" not in text
    assert "Failed uploads: none." in text and "nothing waiting" in text
    assert run_status(["--cacheDir", str(cache)]) == EXIT_FAILED
    assert str(orphan) in capsys.readouterr().out
    orphan.unlink()
    assert status_report(cache)[1] == EXIT_CLEAN  # what a live mount writes is no reason to worry


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process start times are read from /proc")
def test_an_upload_whose_pid_a_later_process_took_is_listed(cache, capsys):
    """A sync mount that was pid 1 of a container, killed mid-upload: after the restart a new
    pid 1 runs, but it started after the file was named: status lists it and exits 1."""
    spool_dir = cache / "spool"
    spool_dir.mkdir(parents=True)
    orphan = spool_dir / f"{os.getppid()}-1000-0.part"  # the parent of this test started after 1970
    orphan.write_bytes(b"o" * 2000)
    text, code = status_report(cache)
    assert code == EXIT_FAILED
    assert f"  {orphan}  2.0 KiB  (not confirmed uploaded; dicomfuse retry sends it)\n" in text
    from dicomfuse.cli.retry import gather

    assert [item.path for item in gather(cache)] == [orphan]


def deny_reading(monkeypatch, folder: Path) -> None:
    """``folder`` and what is under it cannot be listed, as for a user other than the mount's
    (chmod cannot show it when the tests run as root)."""
    real = os.listdir

    def listdir(path="."):
        if Path(path) == folder or folder in Path(path).parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)


def test_a_cache_folder_this_user_cannot_read_is_an_error_not_all_clear(cache, capsys, monkeypatch):
    """status run by another user than the mount's (an admin, a monitoring check) must not say
    "nothing waiting, none failed" and exit 0 while failed uploads are there."""
    failed = cache / "spool" / "failed"
    failed.mkdir(parents=True)
    (failed / "20250101-000000-0-scan.dcm").write_bytes(b"x")
    deny_reading(monkeypatch, cache / "spool")
    assert run_status(["--cacheDir", str(cache)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"dicomfuse status: cannot read {cache / 'spool'}: Permission denied (run as the user "
                            "the mount runs as)\n")


def test_only_an_unreadable_queue_folder_is_said_too(cache, capsys, monkeypatch):
    (cache / "spool" / "failed").mkdir(parents=True)
    queue_dir(cache).mkdir()
    deny_reading(monkeypatch, queue_dir(cache))
    assert run_status(["--cacheDir", str(cache)]) == 2
    assert f"cannot read {queue_dir(cache)}: Permission denied" in capsys.readouterr().err
    monkeypatch.undo()
    assert run_status(["--cacheDir", str(cache)]) == EXIT_CLEAN  # folders missing or empty: all clear


def test_status_help_gives_the_exit_codes(capsys):
    assert run_status(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 some uploads failed or were left unconfirmed by a mount that stopped" in out
    assert "2 the cache folder is not a folder or cannot be read by this user" in out
    assert "3 uploads pending" in out


def test_a_running_mount_of_another_dataset_is_not_said_to_send_them(cache):
    """Uploads of dataset A left pending; a write-back mount of dataset B then holds the queue
    (it keeps A's for A's next mount): status said B's mount was sending them."""
    from dicomfuse.stores.base import Unavailable

    def down(store, items):  # type: ignore[no-untyped-def]
        raise Unavailable("the server is down")

    a = WriteBackQueue(queue_dir(cache), down, settle=0.0, dataset="http://a.example/dicom-web", backoff_base=60)
    a.start()
    a.submit("ct", uids(1, 1), source(cache, "a", b"x"))
    a.stop(drain=False)
    b = WriteBackQueue(queue_dir(cache), down, settle=0.0, status_interval=0.02, dataset="http://b.example/dicom-web")
    try:
        b.start()
        deadline = time.monotonic() + 2
        while '"running": true' not in (queue_dir(cache) / "status.json").read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        text, code = status_report(cache)
        assert code == EXIT_PENDING
        assert "A running mount" not in text, text
        assert "No running mount is sending them" in text
    finally:
        b.stop(timeout=5)
