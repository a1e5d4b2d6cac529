"""Write-back uploads: with ``--uploadMode writeback`` a checked file is handed to this queue at
``close()``, which returns at once; the queue sends it in the background, batched per study on a
small pool of threads, retried with backoff, and journaled on disk so that a crash loses nothing.
``cp -r`` of a thousand files is then a few large requests instead of a thousand blocking round
trips, at the price of errors arriving later: in the log, in ``failed/`` and in
``dicomfuse status``.

The queue directory (``cache_root/spool/writeback``, 0700; files 0600) holds:

- ``<id>.json`` + ``<id>.dcm``: one pending upload. The record is small (dataset, store, UIDs,
  size, attempts, times, last error; never patient data). A new one is written in place before
  the bytes move in (until they do, a torn record describes nothing, and names its id inside, so
  a stale one is never taken for it), often in the file of a finished upload's record (a
  ``.free-<n>.tmp`` file: a new file costs an inode, which ext4 without a journal allocates
  slowly after many deletions); a record is later rewritten atomically (temporary file, rename).
  The bytes are the upload itself, moved in. Both are fsynced
  before :meth:`WriteBackQueue.submit` returns, or, for a ``close()`` without fsync, by the
  queue's group commit about a second later (``sync_delay``).
- ``failed/<id>.json`` + ``failed/<id>.dcm``: an upload the server refused or that failed
  ``max_attempts`` times with an error answer (a server that cannot be reached is retried
  until it is back). The bytes are kept: they may be the only copy.
- ``status.json``: a snapshot for ``dicomfuse status`` (another process), rewritten atomically.
- ``queue.lock``: an flock held while a queue lives, so that two mounts never send (or delete)
  each other's files.

Every file operation is ordered so that at any moment an upload is either confirmed stored by
the server or complete on disk (record and bytes, pending or failed); :meth:`recover` finishes
or undoes whatever a crash of the process interrupted. A power cut can also catch uploads not yet
group-committed: their record may survive with its bytes cut short, which :meth:`recover` keeps
in ``failed/`` rather than send.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dicomfuse.core import portable
from dicomfuse.core.uploads import write_json, write_json_atomic
from dicomfuse.core.workdirs import make_again, private_dir
from dicomfuse.dicomfile import DicomUids, check_upload, is_uid
from dicomfuse.stores.base import LocalReadError, StoreError, Unavailable
from dicomfuse.tracebacks import describe, format_without_messages

log = logging.getLogger(__name__)

RECORD_VERSION = 1
STATUS_NAME = "status.json"
LOCK_NAME = "queue.lock"
FAILED_DIR = "failed"
DATA_SUFFIX = ".dcm"
RECORD_SUFFIX = ".json"
_ID_RE = re.compile(r"[0-9a-f]{32}")
_TMP_SUFFIX = ".tmp"
_UNKNOWN = "unknown"
# A Cloud Healthcare dataset's path, under either API version (stores/open.py accepts both: the
# same dataset, so the same label).
_HEALTHCARE_PATH_RE = re.compile(r"/(?:v1|v1beta1)(/projects/[^/]+/locations/[^/]+/datasets/[^/]+)")

GroupKey = tuple[str, str]  # (store, StudyInstanceUID)
InstanceKey = tuple[str, str, str, str]  # (store, study, series, SOP Instance UID)


def instance_key(store: str, uids: DicomUids) -> InstanceKey:
    """One instance of a store: its three UIDs (the same SOP UID in two series is two)."""
    return (store, uids.study_uid, uids.series_uid, uids.sop_uid)


def queue_dir(cache_root: Path) -> Path:
    """The write-back queue directory of a cache root (``--cacheDir``)."""
    return cache_root / "spool" / "writeback"


@dataclass(frozen=True)
class QueuedUpload:
    """One upload in the queue (or, with ``path`` inside ``failed/``, one that failed for good).
    ``dataset`` is the label of the dataset it was written to: a record is only ever sent to
    the dataset it was queued for."""

    id: str
    store: str
    uids: DicomUids
    size: int
    path: Path
    attempts: int
    queued_at: float
    last_error: str | None
    dataset: str | None = None
    # Its file was removed (rm) while it was being sent: once the server confirms it, the
    # instance is deleted there. Journaled, so that a restart does not bring it back.
    removed: bool = False

    @property
    def display(self) -> str:
        """``store/study/series/sop.dcm``: its path in the mount, safe to log (UIDs only)."""
        u = self.uids
        return f"{self.store}/{u.study_uid}/{u.series_uid}/{u.sop_uid}.dcm"


# send_batch(store, items) -> one (item, stored, reason) per item. A StoreError raised is a
# transient failure of the whole batch (retried); stored=False is a final refusal of that item.
SendBatch = Callable[[str, list[QueuedUpload]], list[tuple[QueuedUpload, bool, str | None]]]
OnDone = Callable[[QueuedUpload, bool, str | None], None]


class QueueBusy(Exception):
    """Another live queue (usually another mount) holds the queue directory."""


# ---------------------------------------------------------------------------------------------
# Records on disk (shared with ``dicomfuse status``)


def dataset_label(address: str | None) -> str | None:
    """A dataset address as stored in records: credentials in a URL are dropped, and the same
    dataset however it is written gets the same label (no trailing slash, host in lower case, a
    Cloud Healthcare dataset under ``v1`` whether given as ``v1`` or ``v1beta1``). Records are
    compared by the label of what they hold (:func:`same_dataset`), so a record written before a
    spelling was normalised here is still recognised."""
    if address is None:
        return None
    parts = urlsplit(address.strip())
    if parts.scheme and "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    if parts.scheme in ("http", "https"):
        path = parts.path.rstrip("/")
        healthcare = _HEALTHCARE_PATH_RE.fullmatch(path)
        if healthcare is not None and not parts.query:
            path = "/v1" + healthcare.group(1)
        return urlunsplit(parts._replace(netloc=parts.netloc.lower(), path=path))
    return address.strip().rstrip("/") or address


def same_dataset(recorded: str | None, label: str | None) -> bool:
    """Whether a record's ``dataset`` (as written, by this or an earlier version) names the
    dataset labelled ``label``."""
    return dataset_label(recorded) == dataset_label(label)


def _record(item: QueuedUpload, **extra: Any) -> dict[str, Any]:
    u = item.uids
    return {
        "version": RECORD_VERSION, "id": item.id, "dataset": item.dataset, "store": item.store,
        "study_uid": u.study_uid, "series_uid": u.series_uid, "sop_uid": u.sop_uid, "size": item.size,
        "attempts": item.attempts, "queued_at": item.queued_at, "last_error": item.last_error,
        **({"removed": True} if item.removed else {}), **extra,
    }


def read_record(path: Path, *, strict: bool = True) -> QueuedUpload | None:
    """The upload a record describes (its bytes are ``<id>.dcm`` beside it), or None when the
    record is missing, torn or implausible. ``strict`` also requires a store and valid UIDs
    (a pending record must say exactly where to send; a failed one only needs to be shown)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        item_id = path.name[: -len(RECORD_SUFFIX)]
        uids = DicomUids(str(data["study_uid"]), str(data["series_uid"]), str(data["sop_uid"]))
        item = QueuedUpload(
            id=item_id, store=str(data["store"]), uids=uids, size=int(data["size"]),
            path=path.with_name(item_id + DATA_SUFFIX), attempts=int(data["attempts"]),
            queued_at=float(data["queued_at"]),
            last_error=None if data.get("last_error") is None else str(data["last_error"]),
            dataset=None if data.get("dataset") is None else str(data["dataset"]),
            removed=data.get("removed") is True,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if data.get("id") != item_id or item.size < 0 or item.attempts < 0:
        return None
    if strict and (not item.store or not all(is_uid(x) for x in (uids.study_uid, uids.series_uid, uids.sop_uid))):
        return None
    return item


def record_paths(directory: Path) -> list[Path]:
    """``<id>.json`` records in a folder (temporary files, status and lock excluded)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        directory / name for name in names
        if name.endswith(RECORD_SUFFIX) and _ID_RE.fullmatch(name[: -len(RECORD_SUFFIX)])
    )


def read_status(directory: Path) -> dict[str, Any] | None:
    """The last ``status.json`` snapshot of a queue directory, or None."""
    try:
        data = json.loads((directory / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any], *, durable: bool) -> None:
    """Replace ``path`` atomically (temporary file + rename); ``durable`` fsyncs it first."""
    write_json_atomic(path, data, durable=durable)


_fsync_path = portable.fsync_path


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _move_in(source: Path, target: Path, *, durable: bool = True) -> None:
    """Move ``source`` to ``target`` (rename; a copy when they are on different filesystems),
    0600, and fsynced when ``durable``."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = target.with_name(f".{target.name}{_TMP_SUFFIX}")
        try:
            with open(source, "rb") as src, open(portable.open_fd(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC),
                                                 "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                if durable:
                    os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            _unlink(tmp)
            raise
        _unlink(source)
    if os.stat(target).st_mode & 0o777 != 0o600:
        os.chmod(target, 0o600)  # a change of mode would cost one more journal commit: only if needed
    if durable:
        _fsync_path(target)


_FREE_RECORDS_MAX = 64  # finished records kept for reuse (a cp keeps a few dozen pending at most)


def _clean_temporary(directory: Path) -> None:
    """Remove temporary files a crash left half written (their targets are intact)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(_TMP_SUFFIX):
            _unlink(directory / name)


def _new_id() -> str:
    """32 hex digits: the time in microseconds, then random bits. Unique, and sorting by name
    lists uploads in the order they were queued."""
    return f"{time.time_ns() // 1000:014x}{uuid.uuid4().hex[:18]}"


def _lock(path: Path) -> int:
    fd = portable.open_fd(path, os.O_CREAT | os.O_RDWR)
    if not portable.try_lock(fd):
        os.close(fd)
        raise QueueBusy(
            f"another dicomfuse mount is sending the write-back uploads in {path.parent}; "
            "give this mount another --cacheDir or use --uploadMode sync"
        ) from None
    return fd


# ---------------------------------------------------------------------------------------------
# The queue


@dataclass
class _Entry:
    """A pending upload in memory: not sent before ``not_before`` (clock time) unless it is only
    settling (not backing off) and its study has a full batch or the queue is draining."""

    item: QueuedUpload
    not_before: float
    backoff: bool = False


class WriteBackQueue:
    """A durable, parallel, per-study batching upload queue. Thread-safe. Send and file work
    happen outside the lock; only small records are held in memory (never file bytes)."""

    def __init__(
        self,
        directory: Path,
        send_batch: SendBatch,
        *,
        workers: int = 4,
        batch_files: int = 50,
        batch_bytes: int = 64 * 1024 * 1024,
        max_attempts: int = 8,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        on_done: OnDone | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        settle: float = 0.2,
        max_settle: float = 2.0,
        status_interval: float = 0.5,
        heartbeat: float = 10.0,
        dataset: str | None = None,
        sync_delay: float = 1.0,
    ) -> None:
        """``dataset`` labels the records (use the dataset's address, or anything stable that
        tells datasets apart): :meth:`recover` adopts only records of the same label, so an
        upload is never sent to a store of the same name in another dataset. ``settle``: a study's
        new files are sent once it had no new file for this long (so that a ``cp -r`` fills
        batches), or after ``max_settle`` at most. ``heartbeat``: the status snapshot is
        rewritten at least this often while running, so ``dicomfuse status`` can tell a live
        mount from a dead one. ``sync_delay``: uploads queued without fsync are fsynced in one
        group this long after the first of them (a ``cp`` of many files costs a few fsyncs, and
        none for the files sent and removed by then). ``sleep`` is accepted for compatibility and
        unused: workers wait on a condition variable, so a submit or stop wakes them at once."""
        if workers < 1 or batch_files < 1 or batch_bytes < 1 or max_attempts < 1:
            raise ValueError("workers, batch_files, batch_bytes and max_attempts must be at least 1")
        del sleep
        self.directory = private_dir(directory)
        self.failed_dir = private_dir(directory / FAILED_DIR)
        self._lock_fd: int | None = _lock(directory / LOCK_NAME)
        self.dataset = dataset_label(dataset)
        self._send_batch = send_batch
        self._on_done = on_done
        self._clock = clock
        self.workers = workers
        self.batch_files = batch_files
        self.batch_bytes = batch_bytes
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.settle = settle
        self.max_settle = max(settle, max_settle)
        self.status_interval = status_interval
        self.heartbeat = heartbeat
        self.sync_delay = sync_delay
        self._rng = random.Random()
        lock = threading.RLock()
        # Two conditions on one lock: senders wait on _work, and a submit wakes one of them, not
        # every thread of the queue (a cp of a thousand files would wake them all a thousand
        # times, each to find nothing to do). _cond wakes the status thread and waiters for idle.
        self._cond = threading.Condition(lock)
        self._work = threading.Condition(lock)
        # Protected by _cond:
        self._groups: dict[GroupKey, dict[str, _Entry]] = {}  # pending, in submit order per study
        self._where: dict[str, GroupKey] = {}  # pending id -> its group
        # (store, study, series, SOP UID) -> pending (not in flight) id. An instance is its three
        # UIDs: an edited copy of one in another study (same SOP UID) is another upload.
        self._by_instance: dict[InstanceKey, str] = {}
        self._in_flight: dict[str, QueuedUpload] = {}
        self._submitting: set[str] = set()  # ids being journaled by submit()
        self._failed: dict[str, QueuedUpload] = {}
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._threads: list[threading.Thread] = []  # senders
        self._status_thread: threading.Thread | None = None
        self._live_workers = 0
        self._recovered = False
        self._accepting = True
        self._draining = False
        self._halt = False
        self._released = False
        self._status_dirty = True
        self._status_written = float("-inf")  # clock time
        self._status_lock = threading.Lock()  # serialises snapshot writes (taken before _cond)
        self._status_wakes_at = float("-inf")  # clock time the status thread sleeps until
        self._free_records: list[Path] = []  # record files of finished uploads, to be reused
        self._recycling = True  # until stop(): no new record is written after it
        self._free_lock = threading.Lock()
        self._free_names = itertools.count()
        # Uploads submitted without fsync, until the syncer (or sync()) has fsynced them:
        self._unsynced: list[tuple[int, QueuedUpload]] = []  # (submit number, upload)
        self._submitted = 0  # submit number of the last upload queued without fsync
        self._unsynced_cond = threading.Condition()
        self._sync_lock = threading.Lock()  # held while a group is being fsynced
        self._syncer: threading.Thread | None = None
        self._syncer_stop = False

    # ======================================================================================
    # lifecycle

    def recover(self) -> list[QueuedUpload]:
        """Adopt the uploads an earlier process left journaled (it crashed, or stopped with work
        pending) and finish what a crash interrupted; return the adopted uploads. Call once,
        before :meth:`start`. Never raises on a damaged journal: a record that cannot be read
        has its bytes moved to ``failed/`` (kept, logged); a leftover temporary file or a record
        whose bytes are gone is removed. Records of another dataset are left untouched."""
        with self._cond:
            if self._threads:
                raise RuntimeError("recover() must be called before start()")
            self._recovered = True
        _clean_temporary(self.directory)
        _clean_temporary(self.failed_dir)
        self._recover_failed()
        adopted: list[QueuedUpload] = []
        other = 0
        for record in record_paths(self.directory):
            item_id = record.name[: -len(RECORD_SUFFIX)]
            if self._known(item_id):
                continue
            data = record.with_name(item_id + DATA_SUFFIX)
            item = read_record(record)
            if item is None:
                if data.exists():
                    self._keep_unreadable(item_id, data, "its queue record was damaged, so its store is unknown")
                else:
                    _unlink(record)
                continue
            if not data.exists():
                # A submit interrupted before its bytes moved in (the caller still has them),
                # or a finished upload interrupted between deleting its bytes and its record.
                log.info("Removed the write-back record %s: its bytes are not in the queue", item_id)
                _unlink(record)
                continue
            if not same_dataset(item.dataset, self.dataset):
                other += 1
                continue
            try:
                size = data.stat().st_size
            except OSError:
                size = -1
            if size != item.size:
                # Bytes cut short, e.g. by a power cut before the group fsync: never sent as they
                # are. Kept in failed/ with the record's store, for the user to copy again.
                kept = self._fail(item, f"its bytes on disk ({size}) do not match the {item.size} queued")
                with self._cond:
                    self._failed[kept.id] = kept
                continue
            adopted.append(item)
        known_ids = {r.name[: -len(RECORD_SUFFIX)] for r in record_paths(self.directory)}
        for name in os.listdir(self.directory):
            stem = name[: -len(DATA_SUFFIX)]
            if not name.endswith(DATA_SUFFIX) or not _ID_RE.fullmatch(stem) or stem in known_ids:
                continue
            if not self._known(stem):
                self._keep_unreadable(stem, self.directory / name, "its queue record was lost")
        if other:
            log.warning("%d write-back upload(s) in %s belong to another dataset; they are kept and sent "
                        "when that dataset is mounted with this cache folder (in either upload mode)", other,
                        self.directory)
        kept: list[QueuedUpload] = []
        superseded: list[QueuedUpload] = []
        now = self._clock()
        with self._cond:
            for item in sorted(adopted, key=lambda i: i.queued_at):
                dropped = self._add_pending(item, now)
                superseded.extend(dropped)
            superseded_ids = {s.id for s in superseded}
            kept = [item for item in adopted if item.id not in superseded_ids]
            self._mark_dirty()
            self._cond.notify_all()
            self._work.notify_all()
        for item in superseded:
            self._remove_files(item)
        self._status_changed()
        return kept

    def start(self) -> None:
        """Start the worker threads (after a daemon's fork). Recovers first if :meth:`recover`
        was not called, so that journaled uploads are never stranded."""
        with self._cond:
            if self._threads:
                return
            if not self._accepting:
                raise RuntimeError("the write-back queue is stopped")
            recovered = self._recovered
        if not recovered:
            left = self.recover()
            if left:
                log.info("%d upload(s) left by an earlier run will be sent again", len(left))
        with self._cond:
            for n in range(self.workers):
                thread = threading.Thread(target=self._worker, name=f"dicomfuse-writeback-{n}", daemon=True)
                self._threads.append(thread)
                self._live_workers += 1
            threads = list(self._threads)
            self._status_thread = threading.Thread(target=self._status_loop, name="dicomfuse-writeback-status",
                                                   daemon=True)
            self._syncer = threading.Thread(target=self._sync_loop, name="dicomfuse-writeback-sync", daemon=True)
        for thread in threads:
            thread.start()
        self._status_thread.start()
        self._syncer.start()
        self._status_changed()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting uploads and stop the workers. ``drain`` first sends what is queued
        (settle delays skipped; backoff kept), for at most ``timeout`` seconds overall. Batches
        in flight are waited for within ``timeout``; what is not confirmed stays journaled for
        the next start. If a batch is still in flight when ``timeout`` ends, its worker records
        the outcome when it returns and the directory lock is released then (or at exit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if not self._accepting:
                return
            self._accepting = False
            self._draining = drain
            started = bool(self._threads)
            self._cond.notify_all()
            self._work.notify_all()  # draining: what waited for its settle time goes now
        if drain and started:
            self.wait_idle(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._halt = True
            self._cond.notify_all()
            self._work.notify_all()
            threads = list(self._threads)
            status_thread = self._status_thread
        if status_thread is not None:
            status_thread.join(1.0)  # it only writes a small file
        with self._cond:  # a submit that got in before the stop: its files are on disk too
            while self._submitting:
                self._cond.wait(0.1)
        try:
            self.sync()  # what stays queued must be on disk for the next start
        except OSError as exc:
            log.error("Queued uploads could not all be written to disk at stop: %s", exc.strerror or exc)
        with self._unsynced_cond:
            self._syncer_stop = True
            self._unsynced_cond.notify_all()
        if self._syncer is not None:
            self._syncer.join(5.0)
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in threads)
        with self._cond:
            left = len(self._where) + len(self._in_flight)
        if left:
            log.info("%d write-back upload(s) stay queued in %s; the next mount of this dataset with this cache "
                     "folder sends them (in either upload mode)", left, self.directory)
        self._drop_free_records()  # also when a sender is still busy: the process may exit first
        if alive:
            log.warning("The write-back queue stopped with %d upload batch(es) still being sent; "
                        "they stay queued until the server confirms them", alive)
        else:
            self._release()

    # ======================================================================================
    # submitting and observing

    def submit(self, store: str, uids: DicomUids, source: Path, *, durable: bool = True) -> QueuedUpload:
        """Queue a checked file: the record (written first) and the bytes (moved in, not copied,
        when on the same filesystem). With ``durable`` both are fsynced with their directory
        before it returns; without, a background thread fsyncs them in groups ``sync_delay`` later
        (:meth:`sync` waits for that), the way a local disk treats a file closed without
        fsync: a crash of the process loses nothing, a power cut in those moments may. A pending
        upload of the same (store, SOP Instance UID) is superseded: the newer bytes win, the
        older entry is removed (an upload already being sent is not interrupted; the newer one
        follows it). A superseded upload gets no ``on_done``."""
        if not store:
            raise ValueError("no store")
        if not all(is_uid(x) for x in (uids.study_uid, uids.series_uid, uids.sop_uid)):
            raise ValueError("invalid DICOM UIDs")
        item_id = _new_id()
        with self._cond:
            if not self._accepting:
                raise RuntimeError("the write-back queue is stopped")
            self._submitting.add(item_id)  # recover() running meanwhile must not take it for debris
        try:
            try:
                return self._submit(item_id, store, uids, source, durable)
            except FileNotFoundError:
                if not self._folder_back():
                    raise
                return self._submit(item_id, store, uids, source, durable)
        finally:
            with self._cond:
                self._submitting.discard(item_id)
                if not self._accepting:
                    self._cond.notify_all()  # stop() waits for submits in progress

    def _folder_back(self) -> bool:
        """The queue's folder removed while mounted (a cleaner, rm -rf of the cache folder): made
        again (0700), with its lock taken again, or every copy in would fail with ENOENT. False
        if it was there (asked only when a submit found no folder: no stat per upload)."""
        with self._cond:
            if not make_again(self.directory, "write-back queue (and the uploads it held)"):
                return False
            private_dir(self.failed_dir)
            old, self._lock_fd = self._lock_fd, _lock(self.directory / LOCK_NAME)
            if old is not None:
                os.close(old)
            return True

    def _submit(self, item_id: str, store: str, uids: DicomUids, source: Path, durable: bool) -> QueuedUpload:
        item = QueuedUpload(
            id=item_id, store=store, uids=uids, size=os.stat(source).st_size,
            path=self.directory / (item_id + DATA_SUFFIX), attempts=0, queued_at=time.time(),
            last_error=None, dataset=self.dataset,
        )
        record = self._record_path(item)
        try:
            self._write_new_record(record, item, durable=durable)
        except BaseException:
            _unlink(record)  # half written (a full disk): not a record the next start should read
            raise
        try:
            _move_in(source, item.path, durable=durable)
        except BaseException:
            _unlink(record)
            raise
        if durable:
            _fsync_path(self.directory)
        else:
            with self._unsynced_cond:
                self._submitted += 1
                self._unsynced.append((self._submitted, item))
                if len(self._unsynced) == 1:
                    self._unsynced_cond.notify()  # the syncer starts its delay; later ones join that group
        with self._cond:
            if self._halt:
                # Stopped meanwhile: stop() fsyncs it (it waits for submits in progress) for the next start.
                log.info("Upload of %s queued after the queue stopped; the next start sends it", item.display)
                return item
            superseded = self._add_pending(item, self._clock() + self.settle, newest=True)
            self._mark_dirty()
            self._work.notify()  # one sender looks (and sets the settle timer); the others sleep on
        if superseded and not durable:
            self._fsync_group([item])  # the newer copy on disk before the older one goes
        for old in superseded:
            self._remove_files(old)
            log.info("Upload of %s: a newer copy replaces the one still queued", old.display)
        self._status_changed()
        return item

    def sync(self) -> None:
        """fsync every upload submitted without it before this call (bytes, record, their
        folder); returns when they are on disk. What an ``fsync()`` of a file in the mount waits
        for. Raises OSError when one of them could not be written (it is tried again later)."""
        with self._unsynced_cond:
            upto = self._submitted
        failed = self._commit(upto)
        if failed:
            raise OSError(errno.EIO, f"{len(failed)} queued upload(s) could not be written to disk "
                                     f"(e.g. {failed[0].display})")

    def _commit(self, upto: int | None = None) -> list[QueuedUpload]:
        """fsync the uploads submitted up to number ``upto`` (all when None) that no one has
        fsynced yet; return those that failed, which stay to be tried again."""
        with self._sync_lock:  # a group being fsynced by the syncer is finished first
            with self._unsynced_cond:
                group = [(n, i) for n, i in self._unsynced if upto is None or n <= upto]
                self._unsynced = [(n, i) for n, i in self._unsynced if upto is not None and n > upto]
            failed_ids = {i.id for i in self._fsync_group([i for _, i in group])}
            if failed_ids:
                with self._unsynced_cond:
                    self._unsynced[:0] = [(n, i) for n, i in group if i.id in failed_ids]
        return [i for _, i in group if i.id in failed_ids]

    def _sync_loop(self) -> None:
        """Group commit: ``sync_delay`` after an upload is queued without fsync, fsync it with
        every other one queued meanwhile (after a failure, again a second later). Waking per
        upload instead made a ``cp`` of many files one fsync group, and a wake-up, per file."""
        while True:
            with self._unsynced_cond:
                while not self._unsynced and not self._syncer_stop:
                    self._unsynced_cond.wait()
                deadline = time.monotonic() + self.sync_delay
                while not self._syncer_stop and (left := deadline - time.monotonic()) > 0:
                    self._unsynced_cond.wait(left)
                if self._syncer_stop:
                    return  # stop() syncs what is left itself
            if self._commit():
                with self._unsynced_cond:
                    self._unsynced_cond.wait(1.0)

    def _fsync_group(self, group: list[QueuedUpload]) -> list[QueuedUpload]:
        """fsync each upload's bytes and record, then the folder; the uploads that failed."""
        if not group:
            return []
        failed: list[QueuedUpload] = []
        for item in group:
            for path in (item.path, self._record_path(item)):
                try:
                    _fsync_path(path)
                except FileNotFoundError:
                    pass  # sent and removed already, or moved to failed/ (fsynced there)
                except OSError as exc:
                    log.error("Cannot write the queued upload %s to disk: %s", item.display, exc.strerror or exc)
                    failed.append(item)
                    break
        try:
            _fsync_path(self.directory)
        except OSError as exc:
            log.error("Cannot write the write-back queue folder %s to disk: %s", self.directory, exc.strerror or exc)
            return list(group)
        return failed

    def cancel(self, store: str, uids: DicomUids) -> QueuedUpload | None:
        """Drop the queued copy of this instance that is not being sent yet (its file was
        removed in the mount): its bytes and record go, it is never sent. None if there is none."""
        with self._cond:
            item_id = self._by_instance.get(instance_key(store, uids))
            if item_id is None:
                return None
            item = self._pop_pending(item_id).item
            self._mark_dirty()
            self._cond.notify_all()  # wait_idle: this may have been the last one
        self._remove_files(item)
        log.info("Upload of %s cancelled: the file was removed before it was sent", item.display)
        self._status_changed()
        return item

    def mark_removed(self, store: str, uids: DicomUids, removed: bool = True) -> bool:
        """Say (journaled) that the copy of this instance being sent now was removed in the
        mount, so the instance is deleted from the server once the server confirms it, also
        after a restart; ``removed=False`` takes that back (the rm failed, or the file was written
        again). Returns whether a copy is being sent."""
        with self._cond:
            key = instance_key(store, uids)
            marked = [replace(i, removed=removed) for i in self._in_flight.values()
                      if instance_key(i.store, i.uids) == key and i.removed != removed]
            for item in marked:
                self._in_flight[item.id] = item
            sending = any(instance_key(i.store, i.uids) == key for i in self._in_flight.values())
        for item in marked:
            self._rewrite_record(item)
        return sending

    def queued_copy(self, store: str, uids: DicomUids) -> Path | None:
        """The bytes of the newest copy of this instance still in the queue (waiting or being
        sent), or None."""
        with self._cond:
            key = instance_key(store, uids)
            item_id = self._by_instance.get(key)
            if item_id is not None:
                return self._groups[self._where[item_id]][item_id].item.path
            for item in self._in_flight.values():
                if instance_key(item.store, item.uids) == key:
                    return item.path
        return None

    def sending(self, store: str, uids: DicomUids) -> bool:
        """Whether a copy of this instance is being sent now (it can no longer be cancelled)."""
        key = instance_key(store, uids)
        with self._cond:
            return any(instance_key(i.store, i.uids) == key for i in self._in_flight.values())

    def has_pending(self, store: str, uids: DicomUids) -> bool:
        """Whether a copy of this instance is queued and not yet being sent."""
        with self._cond:
            return instance_key(store, uids) in self._by_instance

    def holds(self, store: str, study: str, series: str | None = None, sop: str | None = None) -> bool:
        """Whether an upload not ended yet (waiting or being sent) goes to this study, or to
        this series of it, or is this instance of that series."""
        with self._cond:
            if sop is not None and series is not None:
                item_id = self._by_instance.get((store, study, series, sop))
                waiting = [self._groups[self._where[item_id]][item_id].item] if item_id is not None else []
            else:
                waiting = [e.item for e in self._groups.get((store, study), {}).values()]
            return any(
                i.store == store and i.uids.study_uid == study and series in (None, i.uids.series_uid)
                and sop in (None, i.uids.sop_uid) and not i.removed
                for i in itertools.chain(waiting, self._in_flight.values()))

    def pending(self) -> list[QueuedUpload]:
        """Uploads not yet confirmed nor failed (including those being sent), oldest first."""
        with self._cond:
            items = [e.item for group in self._groups.values() for e in group.values()]
            items.extend(self._in_flight.values())
        return sorted(items, key=lambda i: i.queued_at)

    def failed(self) -> list[QueuedUpload]:
        """Uploads in ``failed/`` (this run's and, after :meth:`recover`, earlier ones whose
        bytes are still there); ``last_error`` says why, ``path`` is where the bytes are."""
        with self._cond:
            return sorted(self._failed.values(), key=lambda i: i.queued_at)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or being sent; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._where or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # ======================================================================================
    # internals: state (_add_pending, _pop_pending, _pick and _next_batch run under _cond)

    def _known(self, item_id: str) -> bool:
        with self._cond:
            return item_id in self._where or item_id in self._in_flight or item_id in self._submitting

    def _record_path(self, item: QueuedUpload) -> Path:
        return item.path.with_name(item.id + RECORD_SUFFIX)

    def _add_pending(self, item: QueuedUpload, not_before: float, *, newest: bool | None = None,
                     backoff: bool = False) -> list[QueuedUpload]:
        """Queue ``item``; return the uploads this supersedes: a pending one of the same SOP, or
        ``[item]`` itself when it is the older of the two. ``newest``: True when ``item`` is a
        new submit (it wins), False when it comes back from a failed send (a pending one of its
        SOP was submitted after it was taken), None when recovering (queued_at decides)."""
        sop_key = instance_key(item.store, item.uids)
        other_id = self._by_instance.get(sop_key)
        if other_id is not None and other_id != item.id:
            other_key = self._where[other_id]
            other = self._groups[other_key][other_id].item
            if newest is False or (newest is None and other.queued_at > item.queued_at):
                return [item]
            self._pop_pending(other_id)
            superseded = [other]
        else:
            superseded = []
        key = (item.store, item.uids.study_uid)
        self._groups.setdefault(key, {})[item.id] = _Entry(item, not_before, backoff)
        self._where[item.id] = key
        self._by_instance[sop_key] = item.id
        return superseded

    def _pop_pending(self, item_id: str) -> _Entry:
        key = self._where.pop(item_id)
        group = self._groups[key]
        entry = group.pop(item_id)
        if not group:
            del self._groups[key]
        sop_key = instance_key(entry.item.store, entry.item.uids)
        if self._by_instance.get(sop_key) == item_id:
            del self._by_instance[sop_key]
        return entry

    def _pick(self, now: float) -> tuple[tuple[GroupKey, list[QueuedUpload]] | None, float | None]:
        """The next batch (the study whose oldest ready upload is oldest), or when to look again.

        New uploads of a study are ready together once the study has had no new upload for
        ``settle`` seconds (a ``cp -r`` moved on), or it has a full batch, or its oldest has
        waited ``max_settle``, or the queue drains. Uploads backing off are ready at their
        retry time."""
        best: tuple[tuple[int, float], GroupKey, list[_Entry]] | None = None
        wake: float | None = None
        flying = {instance_key(i.store, i.uids) for i in self._in_flight.values()}
        sending = Counter((i.store, i.uids.study_uid) for i in self._in_flight.values())
        for key, group in self._groups.items():
            # A study's batches go in parallel (a cp -r of one big study uses every worker), but
            # a newer copy of an instance waits until the older one being sent is confirmed.
            entries = [e for e in group.values() if instance_key(e.item.store, e.item.uids) not in flying]
            fresh = [e for e in entries if not e.backoff]
            ready = [e for e in entries if e.backoff and e.not_before <= now]
            later = [e.not_before for e in entries if e.backoff and e.not_before > now]
            if fresh:
                settled = max(e.not_before for e in fresh)
                overdue = min(e.not_before for e in fresh) - self.settle + self.max_settle
                full = len(fresh) >= self.batch_files or sum(e.item.size for e in fresh) >= self.batch_bytes
                if full or self._draining or settled <= now or overdue <= now:
                    ready.extend(fresh)
                else:
                    later.append(min(settled, overdue))
            if later:
                wake = min(later) if wake is None else min(wake, *later)
            if ready:
                # The study with the fewest uploads being sent first (a small study does not wait
                # behind a big one's backlog), then the one whose oldest ready upload is oldest.
                rank = (sending[key], min(e.item.queued_at for e in ready))
                if best is None or rank < best[0]:
                    best = (rank, key, ready)
        if best is None:
            return None, wake
        _, key, ready = best
        ready.sort(key=lambda e: e.item.queued_at)
        batch: list[QueuedUpload] = []
        total = 0
        for e in ready:
            if batch and (len(batch) >= self.batch_files or total + e.item.size > self.batch_bytes):
                break
            batch.append(e.item)
            total += e.item.size
        for item in batch:
            self._pop_pending(item.id)
            self._in_flight[item.id] = item
        self._mark_dirty()
        return (key, batch), wake

    def _next_batch(self) -> tuple[GroupKey, list[QueuedUpload]] | None:
        """Under the lock: wait for a batch to send, or the halt (None). A sender that takes a
        batch wakes another, which takes the next one if there is one."""
        while True:
            if self._halt:
                return None
            now = self._clock()
            picked, wake = self._pick(now)
            if picked is not None:
                self._work.notify()
                return picked
            self._work.wait(None if wake is None else max(0.0, wake - now))

    # ======================================================================================
    # internals: workers

    def _worker(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._next_batch()
                if batch is None:
                    return
                self._send(*batch)
        finally:
            with self._cond:
                self._live_workers -= 1
                last = self._live_workers == 0 and self._halt
                self._cond.notify_all()
            if last:
                self._release()

    def _send(self, key: GroupKey, items: list[QueuedUpload]) -> None:
        """One batch: call send_batch (no lock held), then record each outcome on disk, then in
        memory. Its SOP Instance UIDs stay "being sent" (no newer copy of them goes) until all of
        that is done."""
        store, study = key
        error: str | None = None
        unreachable = False
        answers: dict[str, tuple[bool, str | None]] = {}
        try:
            for item, stored, reason in self._send_batch(store, list(items)):
                answers[item.id] = (bool(stored), reason)
        except StoreError as exc:
            error = str(exc) or type(exc).__name__
            # Waited for however long it lasts: a server that cannot be reached, or this
            # computer unable to read the queued files for a while (no file descriptor left).
            unreachable = (isinstance(exc, Unavailable) and exc.unreachable) or isinstance(exc, LocalReadError)
        except Exception as exc:  # a bug in send_batch: retried like a transient failure, never lost
            error = f"unexpected {type(exc).__name__}"
            log.error("Sending uploads of study %s to store %s raised an unexpected %s; they will be retried",
                      study, store, describe(exc))
            # The stack without messages: sending reads DICOM files, and a message may quote a value.
            log.debug("send_batch failed:\n%s", format_without_messages(exc))
        with self._cond:  # marked removed meanwhile (mark_removed): that goes on with them
            items = [self._in_flight.get(item.id, item) for item in items]
        retry: list[QueuedUpload] = []
        done: list[tuple[QueuedUpload, bool, str | None]] = []
        errors: list[str] = []
        for item in items:
            answer = answers.get(item.id)
            if error is not None or answer is None:
                why = error or "the server gave no answer for the file"
                errors.append(why)
                retry.append(replace(item, attempts=item.attempts + 1, last_error=why))
            elif answer[0]:
                self._remove_files(item)
                log.info("Uploaded %s", item.display)
                done.append((item, True, None))
            else:
                reason = answer[1] or "refused by the server"
                errors.append(reason)
                if item.removed:  # the user removed it: nothing to keep, nothing to report
                    self._remove_files(item)
                    log.info("Upload of %s refused (%s); its file had been removed", item.display, reason)
                    done.append((item, False, reason))
                else:
                    done.append((self._fail(item, reason), False, reason))
        requeue: list[QueuedUpload] = []
        for item in retry:
            # A server that cannot be reached at all is waited for, however long it is down (the
            # backoff is capped): giving up would only move the files aside for a manual retry.
            if item.attempts >= self.max_attempts and not unreachable:
                reason = f"{item.last_error}; gave up after {item.attempts} attempts"
                done.append((self._fail(item, reason), False, reason))
            else:
                self._rewrite_record(item)
                requeue.append(item)
        if requeue:
            delay = self._backoff(max(i.attempts for i in requeue))
            log.warning("Upload of %d file(s) of study %s to store %s failed (%s); retrying in %.1f s",
                        len(requeue), study, store, requeue[0].last_error, delay)
        for item, stored, reason in done:
            self._notify_done(item, stored, reason)
        superseded: list[QueuedUpload] = []
        with self._cond:
            now = self._clock()
            for item in items:
                self._in_flight.pop(item.id, None)
            for item in requeue:
                superseded.extend(self._add_pending(item, now + delay, newest=False, backoff=True))
            for item, stored, _ in done:
                if not stored and not item.removed:
                    self._failed[item.id] = item
            if errors:
                self._last_error, self._last_error_at = errors[-1], time.time()
            self._mark_dirty()
            self._cond.notify_all()
            self._work.notify()  # a newer copy of an instance just sent may go now
        for item in superseded:
            self._remove_files(item)
        self._status_changed()

    def _backoff(self, attempts: int) -> float:
        """Exponential backoff with jitter: base·2^(attempts-1), capped, times 0.5–1."""
        delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, attempts - 1))
        return delay * (0.5 + 0.5 * self._rng.random())

    def _notify_done(self, item: QueuedUpload, stored: bool, reason: str | None) -> None:
        if self._on_done is None:
            return
        try:
            self._on_done(item, stored, reason)
        except Exception as exc:  # it may store the original back: a message may quote a DICOM value
            log.error("The write-back completion callback failed for %s (%s)", item.display, describe(exc))
            log.debug("on_done failed:\n%s", format_without_messages(exc))

    # ======================================================================================
    # internals: files

    def _rewrite_record(self, item: QueuedUpload) -> None:
        try:
            _write_json(self._record_path(item), _record(item), durable=True)
        except OSError as exc:  # the older record still describes the upload: nothing is lost
            log.warning("Cannot update the write-back record of %s: %s", item.display, exc.strerror)

    def _remove_files(self, item: QueuedUpload) -> None:
        """Forget a confirmed or superseded upload: bytes first, then the record (a record without
        bytes is discarded by recover(); bytes without a record would be kept as failed), which
        is kept for the next upload's record while fewer than ``_FREE_RECORDS_MAX`` are."""
        try:
            _unlink(item.path)
            self._recycle_record(self._record_path(item))
        except OSError as exc:  # harmless: the next recover() sends it again or discards it
            log.warning("Cannot remove the queued copy of %s: %s", item.display, exc.strerror)

    def _write_new_record(self, record: Path, item: QueuedUpload, *, durable: bool) -> None:
        """Write the record of an upload whose bytes are not in the queue yet, in place, in a
        free record file when there is one."""
        with self._free_lock:
            free = self._free_records.pop() if self._free_records else None
        if free is not None:
            try:
                os.replace(free, record)
            except OSError:
                pass  # gone meanwhile: a new file then
        write_json(portable.open_fd(record, os.O_CREAT | os.O_TRUNC | os.O_WRONLY), _record(item), durable=durable)

    def _drop_free_records(self) -> None:
        """Remove the free record files, and keep none from now on (the queue is stopping)."""
        with self._free_lock:
            self._recycling = False
            free, self._free_records = self._free_records, []
        for path in free:
            _unlink(path)

    def _recycle_record(self, record: Path) -> None:
        """Keep a finished upload's record file (renamed out of the journal) for a new record."""
        with self._free_lock:
            keep = self._recycling and len(self._free_records) < _FREE_RECORDS_MAX
            name = next(self._free_names) if keep else None
        if name is None:
            _unlink(record)
            return
        free = record.with_name(f".free-{name}{_TMP_SUFFIX}")
        try:
            os.replace(record, free)
        except FileNotFoundError:
            return
        with self._free_lock:
            self._free_records.append(free)

    def _fail(self, item: QueuedUpload, reason: str) -> QueuedUpload:
        """Move an upload to ``failed/``: record there first, then the bytes, then the pending
        record goes (recover() completes an interrupted move). One ERROR line says where."""
        kept = replace(item, path=self.failed_dir / (item.id + DATA_SUFFIX), last_error=reason)
        try:
            _write_json(self.failed_dir / (item.id + RECORD_SUFFIX), _record(kept, failed_at=time.time()),
                        durable=True)
            _fsync_path(item.path)  # it may have been queued without fsync: these bytes may be the only copy
            os.replace(item.path, kept.path)
            _fsync_path(self.failed_dir)
            _unlink(self._record_path(item))
        except OSError as exc:
            kept = replace(item, last_error=reason)
            log.error("Upload of %s failed (%s); its bytes are kept at %s (moving them to %s failed: %s)",
                      item.display, reason, item.path, self.failed_dir, exc.strerror)
            return kept
        log.error("Upload of %s failed (%s); its bytes are kept at %s", item.display, reason, kept.path)
        return kept

    def _keep_unreadable(self, item_id: str, data: Path, why: str) -> None:
        """Bytes whose record is unreadable or lost: kept in ``failed/``. Their UIDs are read
        back from the file when it parses; the store cannot be known."""
        parsed = check_upload(data)
        uids = parsed if isinstance(parsed, DicomUids) else DicomUids(_UNKNOWN, _UNKNOWN, _UNKNOWN)
        try:
            st = data.stat()
            size, mtime = st.st_size, st.st_mtime
        except OSError:
            size, mtime = 0, time.time()
        item = QueuedUpload(item_id, _UNKNOWN, uids, size, data, 0, mtime, why, self.dataset)
        kept = self._fail(item, why)
        with self._cond:
            self._failed[item_id] = kept

    def _recover_failed(self) -> None:
        """Load ``failed/`` records, finishing moves a crash interrupted."""
        for record in record_paths(self.failed_dir):
            item = read_record(record, strict=False)
            if item is None:
                continue  # dicomfuse status still lists its bytes
            stray = self.directory / (item.id + DATA_SUFFIX)
            try:
                if stray.exists() and not item.path.exists():
                    os.replace(stray, item.path)  # finish a move to failed/ that a crash cut short
                _unlink(self.directory / (item.id + RECORD_SUFFIX))
            except OSError as exc:
                log.warning("Cannot finish keeping the failed upload %s: %s", item.id, exc.strerror)
                continue
            if not item.path.exists():
                _unlink(record)  # the user removed the bytes: nothing left to report
                continue
            with self._cond:
                self._failed[item.id] = item

    # ======================================================================================
    # internals: status snapshot and lock

    def _status_loop(self) -> None:
        """Rate-limited snapshot writes, and a heartbeat while workers are busy sending (a long
        upload must not look like a dead mount)."""
        while True:
            with self._cond:
                while True:
                    if self._halt:
                        return
                    now = self._clock()
                    due = self._status_written + (self.status_interval if self._status_dirty else self.heartbeat)
                    if due <= now:
                        break
                    self._status_wakes_at = due
                    self._cond.wait(due - now)
            self._write_status()

    def _mark_dirty(self) -> None:
        """Under ``_cond``: the snapshot changed. The status thread is woken only if it sleeps
        past the next write's time (for the heartbeat): not once per file of a ``cp``."""
        self._status_dirty = True
        if self._status_wakes_at > max(self._clock(), self._status_written) + self.status_interval:
            self._cond.notify_all()

    def _status_changed(self) -> None:
        """Write the snapshot now if the rate limit allows, else leave it to the status thread."""
        with self._cond:
            self._mark_dirty()
            due = self._status_written + self.status_interval <= self._clock()
        if due:
            self._write_status()

    def _write_status(self, *, force: bool = False) -> None:
        with self._status_lock:
            with self._cond:
                now = self._clock()
                interval = self.status_interval if self._status_dirty else self.heartbeat
                if not force and now < self._status_written + interval:
                    return
                if self._released:
                    return
                self._status_written = now
                self._status_dirty = False
                snapshot = self._snapshot()
            try:
                _write_json(self.directory / STATUS_NAME, snapshot, durable=False)
            except OSError as exc:
                log.debug("cannot write the write-back status: %s", exc)

    def _snapshot(self) -> dict[str, Any]:
        pending = [e.item for group in self._groups.values() for e in group.values()]
        flying = list(self._in_flight.values())
        wall = time.time()
        oldest = min((i.queued_at for i in pending + flying), default=None)
        return {
            "version": RECORD_VERSION, "pid": os.getpid(), "dataset": self.dataset,
            "running": bool(self._threads) and not self._halt, "heartbeat": self.heartbeat,
            "pending": len(pending), "pending_bytes": sum(i.size for i in pending),
            "in_flight": len(flying), "in_flight_bytes": sum(i.size for i in flying),
            "failed": len(self._failed), "oldest_queued_at": oldest,
            "oldest_pending_age": None if oldest is None else max(0.0, wall - oldest),
            "last_error": self._last_error, "last_error_at": self._last_error_at, "updated_at": wall,
        }

    def _release(self) -> None:
        """The last snapshot (not running), then the directory lock goes."""
        self._write_status(force=True)
        with self._cond:
            if self._released:
                return
            self._released = True
            fd, self._lock_fd = self._lock_fd, None
        self._drop_free_records()
        if fd is not None:
            os.close(fd)
