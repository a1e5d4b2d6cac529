"""The log files: what goes in, and their rotation."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from dicomfuse.cli import logs
from dicomfuse.cli.logs import RotatingLog, setup_logging
from tests.conftest import PATIENT_NAME


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging configures the root logger: put it back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("fuse").level)
    hook, urllib3_level = threading.excepthook, logging.getLogger("urllib3").level
    yield
    threading.excepthook = hook
    logging.getLogger("urllib3").setLevel(urllib3_level)
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("fuse").setLevel(saved[2])


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)


def test_a_file_is_rotated_once_it_reaches_its_size(tmp_path: Path):
    handler = RotatingLog(tmp_path / "x.log", max_bytes=1000, backup_count=2)
    try:
        for n in range(55):
            handler.handle(record(f"line {n:03d} " + "." * 40))  # 50 characters and a newline
    finally:
        handler.close()
    current, first = (tmp_path / "x.log").read_text(), (tmp_path / "x.log.1").read_text()
    assert len(first) == 1000  # 20 lines: rotated before the 21st, the file having reached its size
    assert first.startswith("line 020") and current.startswith("line 040")
    assert current.splitlines()[-1].startswith("line 054")
    assert (tmp_path / "x.log.2").exists() and not (tmp_path / "x.log.3").exists()


def test_the_size_of_an_existing_file_counts(tmp_path: Path):
    (tmp_path / "x.log").write_text("y" * 997 + "\n")  # left by an earlier run
    handler = RotatingLog(tmp_path / "x.log", max_bytes=1000, backup_count=1)
    try:
        handler.handle(record("a"))  # 998 before it: written, now at the size
        handler.handle(record("b"))  # rotates first
    finally:
        handler.close()
    assert (tmp_path / "x.log.1").read_text() == "y" * 997 + "\na\n"
    assert (tmp_path / "x.log").read_text() == "b\n"


def test_a_log_that_is_a_pipe_gets_every_record_and_is_never_rotated(tmp_path: Path):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    handler = RotatingLog(fifo, max_bytes=10, backup_count=1)  # opens the pipe: the reader is there
    try:
        for n in range(3):
            handler.handle(record(f"record {n}"))
    finally:
        handler.close()
    reader.join(10)
    assert received == [b"record 0\nrecord 1\nrecord 2\n"]
    assert not (tmp_path / "log.fifo.1").exists()


def test_sizes_count_bytes_and_unencodable_names_are_escaped(tmp_path: Path):
    handler = RotatingLog(tmp_path / "x.log", max_bytes=1000, backup_count=1)
    try:
        handler.handle(record("é" * 300))  # 600 bytes, 300 characters
        handler.handle(record("é" * 300))  # 1,200 bytes: the next record rotates
        handler.handle(record("name \udce9.dcm"))  # os.fsdecode of a Latin-1 byte
    finally:
        handler.close()
    assert (tmp_path / "x.log.1").stat().st_size == 1202
    assert (tmp_path / "x.log").read_text() == "name \\udce9.dcm\n"


def test_debug_log_keeps_our_lines_without_mfusepy_repeating_them(tmp_path: Path, root_logging: None):
    folder = setup_logging(tmp_path / "logs")
    logging.getLogger("dicomfuse.backends.fuse").debug("getattr: no such entry: /s/x.dcm")
    logging.getLogger("fuse").debug("FUSE operation getattr_fuse_3 ((b'/s/x.dcm', <LP_c_stat>)) raised")
    logging.getLogger("fuse").warning("mfusepy's warnings still count")
    for handler in logging.getLogger().handlers:
        handler.flush()
    debug = (folder / "debug.log").read_text()
    assert "getattr: no such entry: /s/x.dcm" in debug
    assert "FUSE operation" not in debug
    assert "mfusepy's warnings still count" in debug


def _raise_quoting(value: str) -> None:
    try:
        int(value)  # ValueError: invalid literal for int() with base 10: '<value>'
    except ValueError as exc:
        raise RuntimeError(f"could not check {value}") from exc


def test_tracebacks_are_logged_without_messages(tmp_path: Path, root_logging: None,
                                                capsys: pytest.CaptureFixture[str]):
    """An exception's message can quote the value that raised it (a patient's name): tracebacks
    in every log file and on the terminal keep their frames and types, never the messages, even
    when another formatter cached its rendering on the record first."""
    folder = setup_logging(tmp_path / "logs")
    log = logging.getLogger("dicomfuse.test")
    try:
        _raise_quoting(PATIENT_NAME)
    except RuntimeError:
        log.exception("Unexpected error in release; answering EIO")
        log.debug("the same at DEBUG", exc_info=True)
        cached = logging.LogRecord("dicomfuse.test", logging.ERROR, __file__, 1, "cached", None, sys.exc_info())
        logging.Formatter().format(cached)  # caches a rendering with the messages on the record
        assert PATIENT_NAME in (cached.exc_text or "")
        logging.getLogger().handle(cached)
    for handler in logging.getLogger().handlers:
        handler.flush()
    terminal = capsys.readouterr().err
    for text in ((folder / "debug.log").read_text(), (folder / "error.log").read_text(), terminal):
        assert "Unexpected error in release" in text and "cached" in text
        assert "in _raise_quoting" in text and "ValueError" in text and "RuntimeError" in text
        assert "direct cause" in text
        assert PATIENT_NAME not in text and PATIENT_NAME.split("^")[0] not in text


posix_only = pytest.mark.skipif(sys.platform == "win32", reason="no mode bits on Windows")


@posix_only
def test_an_existing_log_folder_keeps_its_mode(tmp_path: Path, root_logging: None):
    """--logDir may be a shared folder: it is never chmodded (it used to be made 0700)."""
    shared = tmp_path / "shared-logs"
    shared.mkdir()
    os.chmod(shared, 0o755)
    setup_logging(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


@posix_only
def test_a_log_folder_it_creates_is_private_and_log_files_are_0600(tmp_path: Path, root_logging: None):
    old = os.umask(0o022)
    try:
        folder = setup_logging(tmp_path / "new" / "logs")
        handler = RotatingLog(folder / "x.log", max_bytes=30, backup_count=1)
        try:
            for n in range(3):
                handler.handle(record(f"record {n} " + "." * 20))  # rotates: a new file each time
        finally:
            handler.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("debug.log", "info.log", "error.log", "x.log", "x.log.1"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name


def test_an_unusable_log_folder_is_one_line_and_leaves_logging_alone(tmp_path: Path, root_logging: None):
    from dicomfuse.core.workdirs import FolderError

    (tmp_path / "afile").write_text("x")
    before = list(logging.getLogger().handlers)
    with pytest.raises(FolderError) as exc:
        setup_logging(tmp_path / "afile" / "logs")
    assert str(exc.value) == f"{tmp_path / 'afile' / 'logs'} is not a folder ({tmp_path / 'afile'} is a file)"
    assert logging.getLogger().handlers == before


# ---------------------------------------------------------------------------------------------
# A log that cannot be written


class _Disk:
    """Log files on a disk that can be filled (every write then fails with ENOSPC) and freed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        disk = self

        class FillableFile(io.FileIO):
            def write(self, data: bytes) -> int:  # type: ignore[override]
                if disk.full:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return super().write(data)

        def open_fillable(handler: RotatingLog) -> TextIO:
            raw = FillableFile(os.open(handler.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a")
            return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace")

        monkeypatch.setattr(RotatingLog, "_open", open_fillable)


def test_a_full_disk_is_one_line_per_file_and_one_when_it_is_written_again(
        tmp_path: Path, root_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """It was logging's "--- Logging error ---" block (a traceback and the record's raw arguments,
    maybe a patient's name) for every record and every file; the mount goes on regardless."""
    disk = _Disk(monkeypatch)
    folder = setup_logging(tmp_path / "logs", console_level=logging.CRITICAL)  # the terminal: only the notes
    log = logging.getLogger("dicomfuse.test")
    log.info("before: %s", "fine")
    disk.full = True
    for n in range(5):
        log.info("patient %s, record %d", PATIENT_NAME, n)
        log.error("patient %s, error %d", PATIENT_NAME, n)
    full = capsys.readouterr().err.splitlines()
    assert sorted(full) == sorted(
        f"ERROR cannot write the log file {folder / name} (No space left on device); "
        "its records are lost until it can be written again"
        for name in ("debug.log", "info.log", "error.log")
    )
    disk.full = False
    log.error("after: %s", "written")
    assert sorted(capsys.readouterr().err.splitlines()) == sorted(
        f"INFO the log file {folder / name} is written again" for name in ("debug.log", "info.log", "error.log")
    )
    for name in ("debug.log", "info.log", "error.log"):
        assert "after: written" in (folder / name).read_text()
    disk.full = True
    log.error("again")
    assert len(capsys.readouterr().err.splitlines()) == 3  # a new episode is told again
    disk.full = False  # the handlers are closed after the test


def test_a_log_file_that_fails_while_rotating_is_written_again_once_it_can_be(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Closing the full file at a rotation fails yet closes it: the closed stream was kept, and
    every later record refused even once the disk had room."""
    disk = _Disk(monkeypatch)
    handler = RotatingLog(tmp_path / "x.log", max_bytes=30, backup_count=1)
    try:
        handler.handle(record("first " + "." * 30))  # at its size: the next record rotates
        handler.stream.write("buffered")  # not flushed yet: closing the file will flush it
        disk.full = True
        handler.handle(record("lost"))
        disk.full = False
        handler.handle(record("second"))
        handler.handle(record("third"))
    finally:
        handler.close()
    assert capsys.readouterr().err.splitlines() == [
        f"ERROR cannot write the log file {tmp_path / 'x.log'} (No space left on device); "
        "its records are lost until it can be written again",
        f"INFO the log file {tmp_path / 'x.log'} is written again",
    ]
    assert (tmp_path / "x.log").read_text() == "second\nthird\n"


def _log_badly(log: logging.Logger) -> None:
    log.error("patient %d", PATIENT_NAME)  # TypeError: every handler meets it, the terminal and the files


def test_a_record_that_cannot_be_formatted_is_named_once_without_its_arguments(
        tmp_path: Path, root_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(logs, "_bad_call_sites", set())
    folder = setup_logging(tmp_path / "logs")
    log = logging.getLogger("dicomfuse.test")
    for _ in range(3):
        _log_badly(log)
    log.info("the mount goes on")
    line = _log_badly.__code__.co_firstlineno + 1
    terminal = capsys.readouterr().err
    assert terminal.splitlines() == [
        f"ERROR a log record of dicomfuse.test (test_logs.py line {line}) cannot be formatted (TypeError); "
        "it is left out",
        "INFO the mount goes on",
    ]
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "the mount goes on" in (folder / "info.log").read_text()
    assert PATIENT_NAME not in (folder / "debug.log").read_text()


def read_logs(folder: Path) -> str:
    return "".join((folder / name).read_text() for name, _ in logs.FILES)


def test_an_exception_a_thread_does_not_catch_is_one_line_without_its_message(
    tmp_path: Path, root_logging: None, capsys: pytest.CaptureFixture[str]
):
    """Python's default hook prints the traceback, messages included, on the terminal: a
    google-auth ValueError quoting a token answer's field, a pydicom error quoting a value."""
    folder = setup_logging(tmp_path / "logs")

    def fails() -> None:
        int(PATIENT_NAME)

    thread = threading.Thread(target=fails, name="token-refresh")
    thread.start()
    thread.join()
    err = capsys.readouterr().err
    written = read_logs(folder)
    assert "ERROR token-refresh stopped on an unexpected ValueError (its message is not shown" in err
    assert "Traceback" not in err
    assert "in fails" in (folder / "debug.log").read_text()  # the stack, for a bug report
    assert PATIENT_NAME not in err + written


def test_urllib3_warnings_that_quote_what_a_server_sent_are_not_logged(
    tmp_path: Path, root_logging: None, capsys: pytest.CaptureFixture[str]
):
    folder = setup_logging(tmp_path / "logs")
    logging.getLogger("urllib3.connectionpool").warning(
        "Failed to parse headers (url=%s): %s, unparsed data: %r", "http://h/rs/studies?limit=1000", "Defect",
        f"{PATIENT_NAME} this line has no colon")
    assert PATIENT_NAME not in capsys.readouterr().err + read_logs(folder)
