"""The upload spool: files being written through the mount live in private local files until
``close()``; then they are checked (complete Part-10 DICOM with its three UIDs) and sent.
A file that fails keeps its bytes in ``spool/failed`` and the user is told where; a small
sidecar ``<file>.json`` beside it says for which store and why (never patient data), and
``dicomfuse retry`` sends them again.

Spool files are named ``<pid>-<time>-<n>.part`` (``<time>``: when the writer made its spool,
after it started): a file whose writer process is gone (the mount was killed while writing or
uploading it; another process that started later may have its pid) is an *orphan*, rescued into ``failed/`` at the
next start (:meth:`Spool.rescue_orphans`).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomfuse.core import portable
from dicomfuse.core.errors import FsError
from dicomfuse.core.privacy import HIDDEN
from dicomfuse.core.workdirs import make_again
from dicomfuse.dicomfile import DicomUids, Unreadable, check_upload
from dicomfuse.tracebacks import describe

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
BACKUP_SUFFIX = ".previous"  # the server's copy of an instance being overwritten
SIDECAR_SUFFIX = ".json"
ORPHAN_REASON = "the mount stopped (crash or kill) before this file was uploaded"
# log.warning(ORPHANS_WARNING, len(kept), spool.failed): see orphans_warning()
ORPHANS_WARNING = ("%d file(s) left by a mount that stopped before uploading them are kept in %s; "
                   "send them with 'dicomfuse retry'")
_TMP_SUFFIX = ".tmp"
_NAMES = itertools.count()  # process-wide: two spools created in the same second never collide
_OWN_PREFIXES: set[str] = set()  # prefixes of the spools of this process (pid reuse across restarts)


def orphans_warning(count: int, failed: Path) -> str:
    """The WARNING the mount logs at start when it rescued ``count`` orphans into ``failed``."""
    return ORPHANS_WARNING % (count, failed)


@dataclass(frozen=True)
class FailedInfo:
    """What the sidecar of a failed upload says: the store it was for (None when unknown), the
    name it was written under (a file name or UIDs), the reason and when (epoch seconds)."""

    store: str | None
    name: str
    reason: str | None
    failed_at: float | None
    dataset: str | None = None  # the dataset's label (as write-back records have): None when unknown


def sidecar_path(path: Path) -> Path:
    """The sidecar of the failed upload ``path``: ``<name>.json`` beside it."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def is_sidecar(path: Path) -> bool:
    """True for ``X.json`` when ``X`` exists beside it (kept bytes never end in ``.json``)."""
    return path.name.endswith(SIDECAR_SUFFIX) and path.with_name(path.name[: -len(SIDECAR_SUFFIX)]).exists()


def read_sidecar(path: Path) -> FailedInfo | None:
    """The sidecar of the failed upload ``path``, or None when there is none or it is torn."""
    try:
        data = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        store, reason, when = data.get("store"), data.get("reason"), data.get("failed_at")
        dataset = data.get("dataset")
        return FailedInfo(
            store=str(store) if store else None,
            name=str(data.get("name") or path.name),
            reason=None if reason is None else str(reason),
            failed_at=None if when is None else float(when),
            dataset=str(dataset) if dataset else None,
        )
    except (OSError, ValueError, TypeError):
        return None


def write_sidecar(path: Path, info: FailedInfo) -> None:
    """Write (atomically replace) the sidecar of the failed upload ``path``."""
    data: dict[str, Any] = {"store": info.store, "name": info.name, "reason": info.reason,
                            "failed_at": info.failed_at}
    if info.dataset is not None:
        data["dataset"] = info.dataset
    write_json_atomic(sidecar_path(path), data)


def write_json(fd: int, data: dict[str, Any], *, durable: bool, private: bool = False) -> None:
    """Write ``data`` as JSON to the new or emptied file ``fd`` (made 0600 first when
    ``private``), fsync it when ``durable``, and close it (also on failure)."""
    try:
        if private:
            portable.make_private(fd)
        view = memoryview(json.dumps(data, indent=1).encode("utf-8"))
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any], *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON, 0600: a temporary file (hidden; fsynced when
    ``durable``), then a rename, so a reader sees the old or the new contents, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{next(_NAMES)}{_TMP_SUFFIX}")
    fd = portable.open_fd(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    try:
        write_json(fd, data, durable=durable, private=True)
        os.replace(tmp, path)
    except BaseException:
        Spool.discard(tmp)
        raise


def files_in(folder: Path) -> list[Path]:
    """The visible regular files of ``folder``, sorted by name (none if it cannot be read)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [folder / n for n in names if not n.startswith(".") and (folder / n).is_file()]


pid_alive = portable.pid_alive  # re-exported: status and retry use it from here

# Seconds a process must have started after the time in a spool file's name before it is known
# not to be its writer: both times are truncated to the second (the name's and the boot time's),
# and one more covers a small step of the clock.
START_SLACK = 2.0


def process_started_at(pid: int) -> float | None:
    """When the process ``pid`` started (epoch seconds), or None when it cannot be told (not
    Linux, no such process, /proc not readable). Linux: field 22 of ``/proc/<pid>/stat`` (clock
    ticks since boot) plus the boot time (``btime`` of ``/proc/stat``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        # the command name (field 2) is in parentheses and may hold spaces or parentheses itself
        fields = stat_line[stat_line.rindex(b")") + 1:].split()
        ticks = int(fields[22 - 3])  # fields[0] is field 3 (the state)
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_alive(pid: int, written_at: int) -> bool:
    """Whether the process that named a spool file ``<pid>-<written_at>-<n>`` may still be
    running: a process of that pid exists and did not start after ``written_at`` (a spool is
    made by a running process, so its name's time is after its writer started; a process that
    started later has only reused the pid: pid 1 of a restarted container, a service after a
    reboot). Where the start time cannot be told (not Linux), a live pid counts as the writer."""
    if not pid_alive(pid):
        return False
    started = process_started_at(pid)
    return started is None or started < written_at + START_SLACK


def orphan_files(directory: Path, suffix: str = PART_SUFFIX) -> list[Path]:
    """Spool files of ``directory`` (``<pid>-<time>-<n>.part``, or another ``suffix``) whose
    writer is gone: its process is dead, or the process with its pid started after the file's
    spool was made (the pid was reused: pid 1 in a restarted container), or it has this
    process's pid but was not written by a spool of this process. A live writer of another pid
    keeps its files: a running mount's uploads in progress are never orphans. Reads only
    (``dicomfuse status`` uses it on a mount's folder)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    own_pid = os.getpid()
    found = []
    for name in names:
        if not name.endswith(suffix):
            continue
        parts = name[: -len(suffix)].split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        pid = int(parts[0])
        if pid == own_pid:
            if f"{parts[0]}-{parts[1]}" in _OWN_PREFIXES:
                continue
        elif writer_alive(pid, int(parts[1])):
            continue
        path = directory / name
        if path.is_file():
            found.append(path)
    return found


def inspect_dicom(path: Path) -> DicomUids:
    """The UIDs of a complete Part-10 file; FsError(EINVAL) saying why it is not one."""
    if path.stat().st_size == 0:
        raise FsError(errno.EINVAL, "empty file is not DICOM", logging.ERROR)
    result = check_upload(path)
    if isinstance(result, Unreadable):  # no file descriptor left, say: not the file's fault
        raise FsError(result.errno, f"{result} to check it", logging.ERROR)
    if isinstance(result, str):
        raise FsError(errno.EINVAL, result, logging.ERROR)
    return result


class Spool:
    """Private local files for writes in progress, and a ``failed`` folder for the bytes of
    uploads the server did not confirm."""

    def __init__(self, directory: Path, failed: Path, dataset: str | None = None) -> None:
        """``dataset``: the label of the dataset this mount's uploads go to, written beside each
        one kept (None for files whose dataset is not known, as a crashed mount's leftovers)."""
        self.directory = directory
        self.failed = failed
        self.dataset = dataset
        self._prefix = f"{os.getpid()}-{int(time.time())}"
        _OWN_PREFIXES.add(self._prefix)

    def new_file(self, suffix: str = PART_SUFFIX) -> tuple[Path, int]:
        """A new empty 0600 file and a read/write fd on it: an upload being written, or with
        ``BACKUP_SUFFIX`` the copy of an instance an overwrite may have to store back."""
        path = self.directory / f"{self._prefix}-{next(_NAMES)}{suffix}"
        try:
            fd = portable.open_fd(path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
        except FileNotFoundError:
            if not make_again(self.directory, "upload spool"):
                raise
            fd = portable.open_fd(path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
        return path, fd

    def keep_failed(self, path: Path, label: str, *, store: str | None = None, reason: str | None = None,
                    ours: bool = True) -> Path:
        """Move a failed upload's bytes to ``failed/`` under a recognisable name, with a sidecar
        ``<name>.json`` (store, name, reason, time); return the kept path. ``label`` (the file
        name or UIDs; a name that may be a patient's is hidden in log lines) and ``reason`` (our
        own message) must not be patient data."""
        # no trailing dot: Windows drops it from a file name (and the sidecar would not match)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[-120:].rstrip(".") or "upload"
        if safe.endswith(SIDECAR_SUFFIX):
            safe += "_"  # kept bytes never look like a sidecar
        HIDDEN.hide_like(safe, label)  # the log line naming where it is kept hides it as it hid the name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        make_again(self.failed, "failed uploads")
        target = self.failed / f"{stamp}-{next(_NAMES)}-{safe}"
        while target.exists() or sidecar_path(target).exists():  # another process, same second
            target = self.failed / f"{stamp}-{next(_NAMES)}-{safe}"
        try:
            os.replace(path, target)
        except OSError:
            shutil.copyfile(path, target)
            os.chmod(target, 0o600)
            try:
                self.discard(path)
            except OSError as exc:  # Windows: still open somewhere; the bytes are safe in the copy
                log.warning("Cannot remove %s after keeping a copy: %s", path, exc.strerror or exc)
        try:
            # ``ours``: written through this mount, to its dataset (a crashed mount's leftover
            # may have been written to another dataset sharing the cache folder)
            write_sidecar(target, FailedInfo(store, label, reason, time.time(), self.dataset if ours else None))
        except OSError as exc:  # the bytes are safe; only the note is missing
            log.warning("Cannot write the note beside %s: %s", target, exc.strerror or exc)
        return target

    def orphans(self, suffix: str = PART_SUFFIX) -> list[Path]:
        """Spool files (``<pid>-<time>-<n>.part``, or another ``suffix``) whose writer is gone:
        see :func:`orphan_files`."""
        return orphan_files(self.directory, suffix)

    def rescue_orphans(self) -> list[Path]:
        """Move each non-empty orphan to ``failed/`` (with a sidecar saying why; named by its
        SOPInstanceUID when it is complete DICOM), delete empty ones; return the kept paths.
        Backups left by an overwrite the mount stopped in are deleted: they are the server's old
        copy, which the user was replacing, and the new bytes are kept (or queued) themselves."""
        backups = self.orphans(BACKUP_SUFFIX)
        for path in backups:
            self.discard(path)
        if backups:
            log.info("Removed %d copies of instances being overwritten when a mount stopped (their new "
                     "bytes are kept in %s, or queued)", len(backups), self.failed)
        kept = []
        for path in self.orphans():
            try:
                if path.stat().st_size == 0:
                    self.discard(path)
                    continue
                uids = check_upload(path)
                label = f"{uids.sop_uid}.dcm" if isinstance(uids, DicomUids) else path.stem
                kept.append(self.keep_failed(path, label, reason=ORPHAN_REASON, ours=False))
            except FileNotFoundError:
                continue  # another mount starting at the same time took it
            except OSError as exc:
                log.error("Cannot keep the spool file %s left by a mount that stopped: %s", path, exc.strerror or exc)
            except Exception as exc:  # never stop a mount from starting over one file
                # Its type and place only: reading a DICOM file, a message may quote its values.
                log.error("Cannot look at the spool file %s left by a mount that stopped (%s)", path, describe(exc))
        return kept

    @staticmethod
    def discard(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
