"""The upload spool: sidecars of failed uploads, and orphans left by a mount that was killed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomfuse.core.uploads import (
    ORPHAN_REASON,
    FailedInfo,
    Spool,
    is_sidecar,
    orphans_warning,
    process_started_at,
    read_sidecar,
    sidecar_path,
    writer_alive,
)
from dicomfuse.samples import make_uid, write_instance
from tests.conftest import PATIENT_NAME


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    directory = tmp_path / "spool"
    failed = directory / "failed"
    failed.mkdir(parents=True)
    return Spool(directory, failed)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def part(spool: Spool, pid: int, data: bytes, when: int | None = None, n: int = 0) -> Path:
    path = spool.directory / f"{pid}-{int(time.time()) if when is None else when}-{n}.part"
    path.write_bytes(data)
    return path


def test_keep_failed_writes_a_private_sidecar(spool):
    path, fd = spool.new_file()
    os.write(fd, b"bytes")
    os.close(fd)
    before = time.time()
    kept = spool.keep_failed(path, "my scan.dcm", store="ct", reason="the server refused the file (409)")
    assert not path.exists() and kept.parent == spool.failed and kept.read_bytes() == b"bytes"
    assert kept.name.endswith("-my_scan.dcm")
    note = sidecar_path(kept)
    assert note.name == kept.name + ".json" and is_sidecar(note) and not is_sidecar(kept)
    if sys.platform != "win32":  # no mode bits on Windows: the folder's ACL keeps it private
        assert stat.S_IMODE(note.stat().st_mode) == 0o600
    data = json.loads(note.read_text())
    assert set(data) == {"store", "name", "reason", "failed_at"}
    assert data["store"] == "ct" and data["name"] == "my scan.dcm"
    assert data["reason"] == "the server refused the file (409)"
    assert before <= data["failed_at"] <= time.time()
    assert read_sidecar(kept) == FailedInfo("ct", "my scan.dcm", "the server refused the file (409)", data["failed_at"])
    assert [p.name for p in spool.failed.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_keep_failed_old_signature_and_names_that_look_like_sidecars(spool):
    a, fd = spool.new_file()
    os.close(fd)
    kept = spool.keep_failed(a, "notes.json")
    assert not kept.name.endswith(".json")  # bytes never look like a sidecar
    info = read_sidecar(kept)
    assert info is not None and info.store is None and info.reason is None and info.name == "notes.json"
    b, fd = spool.new_file()
    os.close(fd)
    assert spool.keep_failed(b, "notes.json") != kept  # same second, same label: distinct names
    assert read_sidecar(spool.failed / "nothing") is None


def test_orphans_are_files_of_dead_writers(spool):
    gone = dead_pid()
    orphan = part(spool, gone, b"x")
    own, fd = spool.new_file()
    os.close(fd)
    other_spool = Spool(spool.directory, spool.failed)  # another spool of this process
    own2, fd = other_spool.new_file()
    os.close(fd)
    live = part(spool, os.getppid(), b"y")  # a live process of another pid
    previous_life = part(spool, os.getpid(), b"z", when=1000)  # this pid, before a restart
    (spool.directory / "notes.txt").write_bytes(b"n")
    (spool.directory / "abc-1-2.part").write_bytes(b"n")
    found = spool.orphans()
    assert sorted(found) == sorted([orphan, previous_life])
    assert own.exists() and own2.exists() and live.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process start times are read from /proc")
def test_a_live_pid_that_started_after_the_spool_is_not_its_writer(spool):
    """pid reuse: a mount that was pid 1 of a container, killed mid-upload; after the restart
    pid 1 is alive again, but it started after the file's spool was made, so it is not the
    writer: the file is an orphan (status lists it, retry finds it, the next start rescues it)."""
    parent = os.getppid()
    started = process_started_at(parent)
    assert started is not None and started <= time.time()
    reused = part(spool, parent, b"r", when=int(started) - 60)  # written before the live process started
    live = part(spool, parent, b"y", when=int(started))  # its own spool, made the second it started
    assert writer_alive(parent, int(started)) and not writer_alive(parent, int(started) - 60)
    assert spool.orphans() == [reused]
    kept = spool.rescue_orphans()
    assert len(kept) == 1 and kept[0].read_bytes() == b"r" and not reused.exists()
    assert live.exists()


def test_where_start_times_cannot_be_read_a_live_pid_keeps_its_files(spool, monkeypatch):
    monkeypatch.setattr("dicomfuse.core.uploads.process_started_at", lambda pid: None)
    live = part(spool, os.getppid(), b"y", when=1000)
    assert spool.orphans() == []
    assert live.exists()


def test_rescue_orphans_keeps_bytes_with_a_reason_and_drops_empty_ones(spool, tmp_path):
    gone = dead_pid()
    study, series, sop = make_uid("s"), make_uid("s", 1), make_uid("s", 1, 1)
    dcm = write_instance(tmp_path / "x.dcm", study, series, sop)
    data = dcm.read_bytes()
    valid = part(spool, gone, data, n=0)
    junk = part(spool, gone, b"half a file", n=1)
    empty = part(spool, gone, b"", n=2)
    live = part(spool, os.getppid(), b"y")
    kept = spool.rescue_orphans()
    assert len(kept) == 2 and not valid.exists() and not junk.exists() and not empty.exists() and live.exists()
    by_name = {p.name.split("-", 3)[3]: p for p in kept}
    assert by_name[f"{sop}.dcm"].read_bytes() == data
    assert by_name[junk.stem].read_bytes() == b"half a file"
    for path in kept:
        info = read_sidecar(path)
        assert info is not None and info.reason == ORPHAN_REASON and info.store is None
    assert spool.rescue_orphans() == []
    assert orphans_warning(2, spool.failed) == (
        f"2 file(s) left by a mount that stopped before uploading them are kept in {spool.failed}; "
        "send them with 'dicomfuse retry'"
    )


def test_an_orphan_the_check_fails_on_is_logged_without_the_message(spool, monkeypatch, caplog):
    """A leftover file the upload check raises on is left in place, and the error names the
    exception and where, not its message (reading DICOM, it may quote a value)."""
    from dicomfuse.core import uploads

    def broken(path: Path) -> None:
        int(PATIENT_NAME)

    orphan = part(spool, dead_pid(), b"x")
    monkeypatch.setattr(uploads, "check_upload", broken)
    assert spool.rescue_orphans() == []
    assert orphan.exists()
    assert "ValueError at test_spool.py" in caplog.text and "in broken" in caplog.text
    assert PATIENT_NAME not in caplog.text


def test_a_spool_folder_removed_while_mounted_is_made_again(spool: Spool):
    """Every cp into the mount failed with ENOENT once the spool folder had been removed (a
    clean-up script, a tmp cleaner); and a failed upload's bytes could not be kept."""
    import shutil

    shutil.rmtree(spool.directory)
    path, fd = spool.new_file()
    os.write(fd, b"bytes")
    os.close(fd)
    if sys.platform != "win32":
        assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    assert not spool.failed.exists()  # it was inside
    kept = spool.keep_failed(path, "upload.dcm", store="s", reason="refused")
    assert kept.read_bytes() == b"bytes" and kept.parent == spool.failed
