"""Logging: INFO and ERROR on the terminal; DEBUG, INFO and ERROR files, rotated.

Tracebacks are written without exception messages (:class:`MessageFreeFormatter`): a message can
quote the data that raised it, and that can be a patient's name."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import TextIO

from dicomfuse.core.privacy import HIDDEN
from dicomfuse.tracebacks import format_without_messages

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILES = (("debug.log", logging.DEBUG), ("info.log", logging.INFO), ("error.log", logging.ERROR))
MAX_BYTES = 10 * 1024 * 1024  # per file, then rotated
BACKUPS = 5


class RotatingLog(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler that keeps count of the file's size itself.

    The stock handler asks the file before every record (two stats, a seek and a tell) and
    formats each record twice, once only to measure it: a fifth of the mount's system calls in
    a write-back copy. This one learns the size when it opens the file and adds what it writes,
    so a file may pass ``maxBytes`` by one record (or by what another process wrote to it). A
    log that is not a regular file (a pipe, a terminal, /dev/null) is never rotated. A message
    that UTF-8 cannot encode (a file name in another encoding) is written with escapes. A file it
    creates is 0600 whatever the umask: log lines name paths and UIDs, not for other users.

    A file that cannot be written (a full disk) says so in one line on stderr, naming the file and
    the system's reason, and once more when it is written again; a record that cannot be
    formatted says so once per place that logs it. Never logging's "--- Logging error ---" block
    for each record: its traceback and the record's raw arguments (a patient's name, maybe)."""

    def __init__(self, filename: Path, max_bytes: int, backup_count: int) -> None:
        super().__init__(filename, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8",
                         errors="backslashreplace")
        # The handler's lock (held around emit) guards these fields.
        self._size: int | None = None  # unknown until the file is (re)opened
        self._regular = True
        self._failing = False  # the file could not be written and stderr was told
        self._emit_failed = False  # the record being emitted failed
        self._bad_record = False  # ... because it could not be formatted

    def emit(self, record: logging.LogRecord) -> None:
        self._emit_failed = self._bad_record = False
        super().emit(record)
        if self._failing and not self._emit_failed:
            self._failing = False
            _tell(f"INFO the log file {self.baseFilename} is written again")

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        self._emit_failed = True
        if self._bad_record:
            _tell_bad_record(record, exc)
        elif not self._failing:
            self._failing = True
            reason = (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__
            _tell(f"ERROR cannot write the log file {self.baseFilename} ({reason}); "
                  "its records are lost until it can be written again")

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 - logging's name
        if self._size is None:
            if self.stream is None:
                self.stream = self._open()
            self._regular = os.path.isfile(self.baseFilename)
            self._size = self.stream.seek(0, os.SEEK_END) if self._regular else 0
        return self._regular and 0 < self.maxBytes <= self._size

    def _open(self) -> TextIO:
        # FileHandler keeps a reference to the built-in open (usable while the interpreter exits)
        builtin_open = getattr(self, "_builtin_open", open)
        stream: TextIO = builtin_open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                                      opener=_private)
        return stream

    def doRollover(self) -> None:  # noqa: N802
        # Drop the stream first: closing it flushes, which can fail (a full disk) yet closes the
        # file, and a closed stream kept here would refuse every later record.
        stream, self.stream = self.stream, None
        try:
            if stream:
                stream.close()
            super().doRollover()
        finally:
            self._size = None  # learnt again when the file is (re)opened: a failed reopen is retried

    def format(self, record: logging.LogRecord) -> str:
        try:
            text = super().format(record)
        except Exception:
            self._bad_record = True
            raise
        if self._size is not None:
            self._size += len((text + self.terminator).encode("utf-8", "backslashreplace"))
        return text


class ConsoleLog(logging.StreamHandler):  # type: ignore[type-arg]
    """The terminal's handler: a record that cannot be formatted is told as :class:`RotatingLog`
    tells it (once, without its arguments); a terminal that cannot be written is not told."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._bad_record = False  # the record being emitted could not be formatted (handler's lock)

    def emit(self, record: logging.LogRecord) -> None:
        self._bad_record = False
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        try:
            return super().format(record)
        except Exception:
            self._bad_record = True
            raise

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self._bad_record:
            _tell_bad_record(record, sys.exc_info()[1])


class MessageFreeFormatter(logging.Formatter):
    """Formats a record's traceback (``log.exception``, ``exc_info=True``) with its frames and
    exception types but not their messages: ``int()``, pydicom and others quote the values that
    failed, and one can be a patient's name. Every handler of the mount uses it, at every level.
    Names users gave files (``core.privacy``) are shown as their placeholders."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        # A record goes to up to four handlers (terminal, debug, info, error): hidden once.
        done = getattr(record, "_dicomfuse_hidden", None)
        if done is None or done[0] != record.message:
            done = (record.message, HIDDEN.redact(record.message))
            record._dicomfuse_hidden = done  # type: ignore[attr-defined]
        record.message = done[1]
        return super().formatMessage(record)

    def formatException(  # noqa: N802 - logging's name
        self, ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
    ) -> str:
        exc = ei[1]
        return "" if exc is None else format_without_messages(exc)

    def format(self, record: logging.LogRecord) -> str:
        # Another formatter may have cached its own rendering (with messages) on the record.
        cached, record.exc_text = record.exc_text, None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached


def _tell(line: str) -> None:
    """One line on stderr, outside logging (whose own files may be what fails)."""
    try:
        if sys.stderr:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
    except (OSError, ValueError):
        pass  # no terminal to tell


_bad_call_sites: set[tuple[str, int]] = set()  # guarded by _bad_call_sites_lock
_bad_call_sites_lock = threading.Lock()


def _tell_bad_record(record: logging.LogRecord, exc: BaseException | None) -> None:
    """Name a log call whose record cannot be formatted (its arguments do not fit its message),
    once per call site whichever handlers meet it; never its arguments."""
    site = (record.pathname, record.lineno)
    with _bad_call_sites_lock:
        if site in _bad_call_sites:
            return
        _bad_call_sites.add(site)
    _tell(f"ERROR a log record of {record.name} ({os.path.basename(record.pathname)} line {record.lineno}) "
          f"cannot be formatted ({type(exc).__name__}); it is left out")


def _private(path: str, flags: int) -> int:
    """``open``'s opener: a file created 0600, not with the umask's mode."""
    return os.open(path, flags, 0o600)


def default_log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_log_dir("dicomfuse", appauthor=False))


def setup_logging(log_dir: Path | None, *, console_level: int = logging.INFO) -> Path:
    """Configure the root logger; return the folder of the log files. An existing folder is used
    as it is (it may be shared: its mode is never changed); a missing one is created 0700. Raises
    :class:`~dicomfuse.core.workdirs.FolderError` (one line) when the folder or its files cannot
    be used, before the root logger is touched."""
    from dicomfuse.core.workdirs import FolderError, folder_problem, user_dir

    folder = log_dir or default_log_dir()
    files: list[tuple[RotatingLog, int]] = []
    try:
        user_dir(folder)
        for name, level in FILES:
            files.append((RotatingLog(folder / name, max_bytes=MAX_BYTES, backup_count=BACKUPS), level))
    except OSError as exc:
        for handler, _ in files:
            handler.close()
        raise FolderError(folder_problem(folder, exc)) from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG)
    console = ConsoleLog()
    console.setLevel(console_level)
    console.setFormatter(MessageFreeFormatter("%(levelname)s %(message)s"))
    root.addHandler(console)
    for handler, level in files:
        handler.setLevel(level)
        handler.setFormatter(MessageFreeFormatter(FORMAT))
        root.addHandler(handler)
    # Libraries' request traces would repeat ours. urllib3's warnings quote what a server sent
    # (a header it could not parse, whole) and the URL with its query: only its errors pass.
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # (pydicom's: see dicomfile)
    # google-auth warns about each credential source it tried; our one line says what failed.
    logging.getLogger("google.auth").setLevel(logging.ERROR)
    # mfusepy logs as "fuse": a DEBUG line with the ctypes arguments for every refused call (each
    # lookup of a name not there yet), which repeats the adapter's own line.
    logging.getLogger("fuse").setLevel(logging.INFO)
    threading.excepthook = log_uncaught_in_thread
    return folder


def log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """What a thread did not catch, as one ERROR line naming the error's type, and its stack
    without messages at DEBUG: Python's default hook prints the whole traceback, messages
    included, on the terminal, and a message may quote a DICOM value or a server's answer."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "a thread"
    logger = logging.getLogger("dicomfuse")
    logger.error("%s stopped on an unexpected %s (its message is not shown: it may quote patient data)",
                 name, args.exc_type.__name__)
    if args.exc_value is not None:
        logger.debug("The stack of that %s:\n%s", args.exc_type.__name__, format_without_messages(args.exc_value))
