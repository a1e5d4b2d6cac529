"""Opened instances on disk: single-flight downloads that stream into a private cache file,
reads served as soon as their byte range has arrived, an LRU bound on total bytes, and a TTL.

Downloads run on one bounded pool of workers. A file someone is waiting for goes ahead of files
fetched ahead of time (read-ahead, ``prefetch``); a read-ahead still queued is promoted when
someone opens it, and can be cancelled. Read-ahead only starts when its bytes fit in the bound
next to everything complete or in flight, and never evicts a file in use.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dicomfuse.core import portable
from dicomfuse.core.errors import FsError
from dicomfuse.core.workdirs import make_again
from dicomfuse.tracebacks import describe

log = logging.getLogger(__name__)

CacheKey = tuple[str, str, str, str]  # store, study, series, sop
Fetch = Callable[[BinaryIO], int]


_SERIALS = itertools.count(1)


class CachedInstance:
    """One cache file. ``cond`` guards ``written``, ``complete``, ``error``; the cache's lock
    guards ``pins``, ``last_used`` and ``retired``."""

    def __init__(self, key: CacheKey, path: Path, fetched_at: float) -> None:
        self.key = key
        self.serial = next(_SERIALS)  # tells two copies of one instance apart, never reused
        self.path = path
        self.fetched_at = fetched_at
        self.cond = threading.Condition()
        self.written = 0
        self.complete = False
        self.error: BaseException | None = None
        self.pins = 0
        self.last_used = fetched_at
        self.retired = False
        self.reserved = 0  # bytes counted for it in the cache's total while it downloads
        self.task: _Task | None = None  # its download, while queued or running
        self.then: list[Callable[[int], None]] = []  # told the size once complete (guarded by cond)
        self.linked = False  # a hard link to a queued upload's file: deleting it frees no disk
        self.prefetched = False  # fetched ahead of time, not opened yet
        # Fetched for someone still to come (read-ahead, a stat learning the size), not opened
        # by a program yet: kept at least UNCLAIMED_GRACE for it, whatever the cache time.
        self.unclaimed = False

    @property
    def size(self) -> int | None:
        return self.written if self.complete else None

    def wait_for(self, end: int) -> None:
        """Block until ``end`` bytes are on disk or the download ended; re-raise its error."""
        with self.cond:
            while not self.complete and self.error is None and self.written < end:
                self.cond.wait()
            if self.error is not None and self.written < end:
                raise self.error

    def wait_complete(self, timeout: float | None = None) -> int | None:
        """The final size once the download ends (re-raising its error), or None if
        ``timeout`` seconds pass first."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.complete or self.error is not None, timeout):
                return None
            if self.error is not None:
                raise self.error
            return self.written


class _ProgressSink:
    """A file-like sink that counts bytes, wakes readers and enforces the size limit.
    ``outgrown`` is called when the bytes written pass what was reserved for the entry."""

    def __init__(self, entry: CachedInstance, raw: BinaryIO, limit: int,
                 outgrown: Callable[[CachedInstance], None] = lambda entry: None) -> None:
        self._entry = entry
        self._raw = raw
        self._limit = limit
        self._outgrown = outgrown

    @property
    def path(self) -> Path:
        """The file the bytes go to: a store that cannot tell from HTTP whether an answer came
        whole (a body ended by closing the connection) checks the DICOM file itself."""
        return self._entry.path

    def write(self, data: bytes) -> int:
        entry = self._entry
        if entry.written + len(data) > self._limit:
            raise FsError(errno.EFBIG, f"instance larger than the largest allowed file ({self._limit} bytes)")
        view = memoryview(data)
        with view:
            while len(view):
                # An unbuffered file may take part of a write (a disk filling up): the rest is
                # written, or the error that stops it (ENOSPC) raised. A short copy never passes
                # for a whole one.
                n = self._raw.write(view)
                if not n:
                    raise OSError(errno.EIO, "the cache file accepted no bytes")
                with entry.cond:
                    entry.written += n
                    entry.cond.notify_all()
                view = view[n:]
        self._raw.flush()
        if entry.written > entry.reserved:
            self._outgrown(entry)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()


DEMAND, AHEAD = 0, 1
"""Download priorities: someone waits for it; fetched ahead of time."""


class _Task:
    """One queued download. ``state``: queued, running, cancelled (guarded by the pool's lock)."""

    __slots__ = ("fn", "priority", "state")

    def __init__(self, fn: Callable[[], None], priority: int) -> None:
        self.fn = fn
        self.priority = priority
        self.state = "queued"


class _PriorityPool:
    """A fixed number of worker threads taking the most urgent queued task first (FIFO within a
    priority). Tasks can be cancelled or promoted while still queued. Tasks fetched ahead never
    take the last quarter of the workers (at least one): a download someone waits for always
    finds a free worker, even when every read-ahead download hangs on a silent server."""

    def __init__(self, workers: int, name: str) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, _Task]] = []  # guarded by _cond
        self._seq = itertools.count()
        self._closed = False
        count = max(1, workers)
        self.ahead_limit = max(1, count - max(1, count // 4))
        self._running_ahead = 0  # guarded by _cond
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[], None], priority: int) -> _Task:
        task = _Task(fn, priority)
        with self._cond:
            heapq.heappush(self._heap, (priority, next(self._seq), task))
            self._cond.notify()
        return task

    def promote(self, task: _Task, priority: int) -> None:
        """Move a queued task up (a stale heap slot is skipped when popped)."""
        with self._cond:
            if task.state == "queued" and priority < task.priority:
                task.priority = priority
                heapq.heappush(self._heap, (priority, next(self._seq), task))
                self._cond.notify()

    def cancel(self, task: _Task) -> bool:
        """True if the task had not started (it never will)."""
        with self._cond:
            if task.state != "queued":
                return False
            task.state = "cancelled"
            return True

    def queued(self) -> int:
        with self._cond:
            return sum(1 for _, _, t in self._heap if t.state == "queued")

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            for _, _, task in self._heap:
                if task.state == "queued":
                    task.state = "cancelled"
            self._heap.clear()
            self._cond.notify_all()

    def _next(self) -> _Task | None:
        """Under _cond: the task to run now, if any (stale heap slots are dropped)."""
        while self._heap:
            priority, _, candidate = self._heap[0]
            if candidate.state != "queued" or priority != candidate.priority:
                heapq.heappop(self._heap)
                continue
            if priority != DEMAND and self._running_ahead >= self.ahead_limit:
                return None  # the rest of the workers are kept for downloads someone waits for
            heapq.heappop(self._heap)
            return candidate
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    task = self._next()
                    if task is not None:
                        break
                    self._cond.wait()
                task.state = "running"
                ahead = task.priority != DEMAND
                if ahead:
                    self._running_ahead += 1
            try:
                task.fn()
            except BaseException:  # noqa: BLE001 - a task reports its own errors
                log.exception("Download task failed")
            finally:
                if ahead:
                    with self._cond:
                        self._running_ahead -= 1
                        self._cond.notify()


DISK_MARGIN = 64 << 20
"""Free space the cache leaves on its disk (at most a twentieth of the disk): room for uploads
being written and for other programs (an upload that needs more makes files nobody reads go:
:meth:`InstanceCache.give_way`)."""


UNCLAIMED_GRACE = 10.0
"""Seconds a copy nobody opened yet (fetched ahead, or by a stat to learn its size) stays fresh
for the program that opens it next, even under a shorter cache time: with ``--cacheTime L,0``
every file would otherwise be downloaded twice, once for ``cp``'s stat and again for its open."""

MAX_BLOCK = 16 * 1024
"""A larger reported block (ZFS gives its record size) is not what a small file takes there."""


def _statvfs(directory: Path) -> os.statvfs_result | None:
    """The figures of ``directory``'s disk; None where the system gives none (Windows)."""
    try:
        return os.statvfs(directory) if hasattr(os, "statvfs") else None
    except OSError:
        return None


def disk_block(directory: Path) -> int:
    """The allocation unit of ``directory``'s disk, for :class:`InstanceCache`'s ``block``
    (4 KiB where the system does not say, as on Windows: NTFS's usual cluster)."""
    disk = _statvfs(directory)
    size = (disk.f_frsize or disk.f_bsize) if disk is not None else 4096
    return min(MAX_BLOCK, max(1, size))


class InstanceCache:
    """Bounded by ``capacity`` bytes (largest file ``capacity // 4``); entries older than ``ttl``
    seconds are fetched again on the next open, and their files deleted once nobody reads them
    (patient data stays on disk no longer than asked). Entries in use are never evicted.

    ``block``: the disk's allocation unit; each file counts as its size rounded up to it, so
    that the bound holds for the disk space used, not only for the bytes (a thousand 1 KiB files
    take 4 MiB on a disk of 4 KiB blocks). :func:`disk_block` gives a folder's."""

    def __init__(
        self,
        directory: Path,
        capacity: int,
        ttl: float,
        *,
        workers: int = 8,
        clock: Callable[[], float] = time.monotonic,
        block: int = 1,
        remake: Callable[[], object] | None = None,
    ) -> None:
        self.directory = directory
        self.capacity = capacity
        self.block = max(1, block)
        # Makes the folder again (and what guards it) if it was removed; OSError if it cannot.
        self._remake = remake or (lambda: make_again(directory, "instance cache"))
        self.max_file = capacity // 4
        self.ttl = ttl
        self._clock = clock
        self._workers = workers
        self._pool: _PriorityPool | None = None
        self._sweeper: threading.Thread | None = None
        self._stopping = threading.Event()
        self._names = itertools.count()
        self._over = False  # the last _make_room left the cache over its bound (files in use)
        self._lock = threading.Lock()
        # Protected by _lock: the index, LRU order, byte total (complete files plus the
        # reservations of downloads in flight, each rounded up to whole blocks), entries'
        # pins/last_used/reserved/prefetched.
        self._entries: OrderedDict[CacheKey, CachedInstance] = OrderedDict()
        self._bytes = 0
        self._typical = 0  # size of the last file completed: the guess for read-ahead of unknown size
        self._said: dict[str, float] = {}  # when each once-a-minute line was last logged
        self._said_lock = threading.Lock()  # apart: lines are said with or without _lock held
        self._in_flight: set[CachedInstance] = set()  # downloads not ended: their reservations are not on disk yet
        self.prefetch_stats = {"started": 0, "refused": 0, "cancelled": 0, "promoted": 0}

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the download pool (in the filesystem's init, after any fork)."""
        if self._pool is None:
            self._pool = _PriorityPool(self._workers, "download")
        if self._sweeper is None:
            self._stopping.clear()
            self._sweeper = threading.Thread(target=self._sweep, name="cache-expiry", daemon=True)
            self._sweeper.start()

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._sweeper is not None:
            self._stopping.set()
            self._sweeper.join(5)
            self._sweeper = None

    def expire(self) -> int:
        """Delete the files of expired entries nobody reads (those in use go at their release);
        return how many went."""
        now = self._clock()
        with self._lock:
            expired = [e for e in self._entries.values() if self._expired(e, now) and e.pins <= 0]
            for entry in expired:
                self._retire(entry)
        return len(expired)

    def _sweep(self) -> None:
        interval = min(max(self.ttl / 2, 1.0), 60.0)
        while not self._stopping.wait(interval):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - the next sweep tries again; files go at unmount anyway
                log.debug("cache expiry sweep failed", exc_info=True)

    # -- queries ----------------------------------------------------------------------------

    def fresh(self, key: CacheKey) -> CachedInstance | None:
        """The entry of ``key`` if it has not expired (complete or still arriving)."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or self._stale(entry, self._clock()):
            return None
        return entry

    def pin_fresh(self, key: CacheKey) -> CachedInstance | None:
        """The entry of ``key`` pinned (call :meth:`release`) if it is fresh; None, and nothing
        fetched, if it is not."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or self._stale(entry, self._clock()):
                return None
            self._pin(entry, self._clock())
            return entry

    def _pin(self, entry: CachedInstance, now: float, *, claim: bool = True) -> None:
        """Caller holds _lock. Pin ``entry`` for a reader: a queued read-ahead of it becomes a
        download someone waits for (moved to the front, and never cancelled from now on).
        ``claim``: a program's open, from which the cache time is the one asked for."""
        if claim:
            entry.unclaimed = False
        entry.pins += 1
        entry.last_used = now
        self._entries.move_to_end(entry.key)
        if entry.prefetched:
            entry.prefetched = False
            if entry.task is not None and entry.task.state == "queued" and self._pool is not None:
                self._pool.promote(entry.task, DEMAND)
                self.prefetch_stats["promoted"] += 1

    def known_size(self, key: CacheKey) -> int | None:
        """The size of the complete, fresh cached copy (an expired one is fetched again at open,
        and may have changed on the server since)."""
        entry = self.fresh(key)
        return None if entry is None else entry.size

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._bytes

    # -- use --------------------------------------------------------------------------------

    def open(self, key: CacheKey, fetch: Fetch, expected_size: int | None = None, *,
             claim: bool = True) -> CachedInstance:
        """A pinned entry for ``key``: the cached one if fresh, the download in flight if any
        (a queued read-ahead is moved to the front), else a new download. Call :meth:`release`
        when done. ``claim=False``: not for a program's open (a stat learning the size), so the
        copy waits for that open (UNCLAIMED_GRACE) even if the cache time is shorter."""
        if expected_size is not None and expected_size > self.max_file:
            raise FsError(errno.EFBIG, f"instance of {expected_size} bytes exceeds cacheSize/4")
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._stale(entry, now):
                self._retire(entry)
                entry = None
            if entry is not None:
                self._pin(entry, now, claim=claim)
                return entry
            entry = self._new_entry(key, now, expected_size or 0)
            entry.pins = 1
            entry.unclaimed = not claim
        self._submit(entry, fetch, DEMAND)
        return entry

    def prefetch(self, key: CacheKey, fetch: Fetch, expected_size: int | None = None) -> bool:
        """Make sure ``key`` is cached or on its way, fetching it ahead of time behind every
        download someone waits for. False only when its bytes would not fit next to the files
        in use and in flight: the bound is never exceeded for read-ahead."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not self._stale(entry, now):
                return True  # cached or in flight: single-flight
            # Unknown size: guess the last file's, or an eighth of the largest file at first.
            size = expected_size if expected_size is not None else (self._typical or self.max_file // 8)
            self._make_room(self._on_disk(size), keep_unread=True)
            # Read-ahead leaves room on the disk for a file someone asks for meanwhile.
            if size > self.max_file or self._bytes + self._on_disk(size) > self._limit(headroom=size):
                self.prefetch_stats["refused"] += 1
                return False
            if entry is not None:
                self._retire(entry)
            try:
                entry = self._new_entry(key, now, size)
            except FsError:  # no file for it now (said at ERROR): a reader's open will say why
                self.prefetch_stats["refused"] += 1
                return False
            entry.prefetched = entry.unclaimed = True
            self.prefetch_stats["started"] += 1
        self._submit(entry, fetch, AHEAD)
        return True

    def cancel(self, key: CacheKey) -> bool:
        """Drop a read-ahead of ``key`` that has not started (nobody opened it). True if it
        was dropped."""
        with self._lock:
            entry = self._entries.get(key)
            if (entry is None or not entry.prefetched or entry.pins > 0 or entry.task is None
                    or self._pool is None):
                return False
            if not self._pool.cancel(entry.task):
                return False
            entry.task = None
            self._retire(entry)
            self.prefetch_stats["cancelled"] += 1
            return True

    def _new_entry(self, key: CacheKey, now: float, reserve: int) -> CachedInstance:
        """Caller holds _lock. Create the entry's file (empty, 0600: a second opener may open it
        for reading at once), then index it and reserve its expected bytes. A file that cannot
        be created indexes nothing (else every later open would be handed a download that never
        starts): FsError with the system's errno."""
        entry = CachedInstance(key, self.directory / f"{next(self._names)}.dcm", now)
        self._create_file(entry.path)
        self._entries[key] = entry
        entry.reserved = reserve
        self._bytes += self._on_disk(reserve)
        self._in_flight.add(entry)
        self._make_room(0)
        return entry

    def _create_file(self, path: Path) -> None:
        """Caller holds _lock. Create ``path`` empty; a cache folder removed meanwhile is made
        again (0700). Failing, said at ERROR once a minute (one line naming the folder and the
        system's reason), and FsError for the read that needed it."""
        try:
            try:
                os.close(portable.open_fd(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC))
                return
            except FileNotFoundError:
                if self.directory.exists():
                    raise
            self._remake()
            os.close(portable.open_fd(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC))
        except OSError as exc:
            code = exc.errno or errno.EIO
            reason = exc.strerror or str(exc)
            if self._now_and_then("create failed"):
                log.error("Cannot create a file in the instance cache (%s): %s; reads of files not cached yet "
                          "fail until it can", self.directory, reason)
            raise FsError(code, f"cannot create a file in the instance cache: {reason}") from None

    def _submit(self, entry: CachedInstance, fetch: Fetch, priority: int) -> None:
        if self._pool is None:
            self.start()
        assert self._pool is not None
        task = self._pool.submit(lambda: self._download(entry, fetch), priority)
        with self._lock:
            if entry.task is None and not entry.complete and entry.error is None:
                entry.task = task

    def release(self, entry: CachedInstance, *, gone: bool = False) -> None:
        """Unpin ``entry``; ``gone``: its file was deleted behind the cache, so this copy is
        forgotten (a newer copy of the instance is not touched)."""
        with self._lock:
            if gone:
                self._retire(entry)
            entry.pins -= 1
            if entry.pins <= 0 and entry.retired:
                self._unlink(entry)
            elif entry.pins <= 0 and self._expired(entry, self._clock()):
                self._retire(entry)  # e.g. --cacheTime ...,0: kept while read, not after
            elif entry.pins <= 0 and self._over:
                self._make_room(0)  # it can go now, and the cache is over its bound

    @staticmethod
    def read(entry: CachedInstance, fd: int, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the instance through the reader's ``fd``
        (opened on ``entry.path``), waiting only for that range to arrive."""
        entry.wait_for(offset + size)
        return portable.pread(fd, size, offset)

    def adopt(self, key: CacheKey, source: Path, *, link: bool = False) -> int:
        """Move a file the mount just uploaded into the cache as a complete entry; with ``link``,
        the entry is a hard link to it (a queued upload: the same bytes, no copy; ``source``
        stays, and must be private already)."""
        size = source.stat().st_size
        if size > self.max_file:
            return size
        now = self._clock()
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._retire(old)
            entry = CachedInstance(key, self.directory / f"{next(self._names)}.dcm", now)
            if link:
                os.link(source, entry.path)
                entry.linked = True
            else:
                os.replace(source, entry.path)
                os.chmod(entry.path, 0o600)
            entry.written, entry.complete = size, True
            self._entries[key] = entry
            self._bytes += self._on_disk(size)
            self._make_room(0)
        return size

    def give_way(self, needed: int) -> bool:
        """Delete cached files nobody reads, least recently used first, until the cache's disk
        has ``needed`` bytes free: an upload being written to the same disk found it full.
        True if any went (worth writing again)."""
        gone = False
        with self._lock:
            for key in list(self._entries):
                if self._free_bytes() >= needed:
                    break
                entry = self._entries[key]
                if entry.pins <= 0 and entry.complete and not entry.linked:
                    self._retire(entry)
                    gone = True
        if gone and self._now_and_then("gave way"):
            log.info("The cache's disk was full: cached copies nobody was reading were deleted for an upload")
        return gone

    def _free_bytes(self) -> int:
        disk = _statvfs(self.directory)
        return 0 if disk is None else disk.f_bavail * disk.f_frsize

    def evict(self, key: CacheKey) -> None:
        """Forget ``key`` (deleted or overwritten): open readers keep their bytes."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._retire(entry)

    def wipe(self) -> None:
        with self._lock:
            for entry in list(self._entries.values()):
                self._retire(entry)

    # -- internals --------------------------------------------------------------------------

    def _download(self, entry: CachedInstance, fetch: Fetch) -> None:
        try:
            with open(portable.open_fd(entry.path, os.O_RDWR), "r+b", buffering=0) as raw:
                fetch(_ProgressSink(entry, raw, self.max_file, self._outgrown))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting reader
            log.debug("Download of %s failed: %s", entry.key[3], exc)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                self._disk_full()
            with entry.cond:
                entry.error = exc
                entry.cond.notify_all()
            with self._lock:
                entry.task = None
                self._retire(entry)
            return
        with self._lock:  # lock order: cache lock, then the entry's condition
            with entry.cond:
                entry.complete = True
                entry.fetched_at = self._clock()  # the cache time counts from here
                entry.cond.notify_all()
                then, entry.then = entry.then, []
            entry.task = None
            self._in_flight.discard(entry)
            if entry.retired:
                if entry.pins <= 0:
                    self._unlink(entry)
            else:
                self._bytes += self._on_disk(entry.written) - self._on_disk(entry.reserved)
                entry.reserved = 0
                self._typical = entry.written
                self._make_room(0)
        for call in then:
            try:
                call(entry.written)
            except Exception as exc:  # noqa: BLE001 - a caller's bug must not fail the download
                log.debug("a call after the download of %s failed: %s", entry.key[3], describe(exc))

    @staticmethod
    def when_complete(entry: CachedInstance, call: Callable[[int], None]) -> None:
        """Call ``call(size)`` once ``entry``'s download has ended whole: now if it has, else
        from the downloading thread (never if it fails)."""
        with entry.cond:
            if not entry.complete:
                if entry.error is None:
                    entry.then.append(call)
                return
        call(entry.written)

    def _on_disk(self, size: int) -> int:
        """The disk space a file of ``size`` bytes takes: whole blocks."""
        return -(-size // self.block) * self.block

    def _now_and_then(self, line: str) -> bool:
        """Whether to log ``line`` now: each is said at most once a minute (a full disk fails
        every read and write until there is room)."""
        now = self._clock()
        with self._said_lock:
            if now - self._said.get(line, float("-inf")) < 60:
                return False
            self._said[line] = now
            return True

    def _disk_full(self) -> None:
        """A download found the cache's disk full: said once a minute at ERROR (the read fails
        with ENOSPC, which would otherwise leave the user guessing which disk)."""
        if not self._now_and_then("disk full"):
            return
        log.error("The disk of the instance cache (%s) is full: files cannot be read through the mount until "
                  "there is room (free space there, or give a smaller --cacheSize)", self.directory)

    def _outgrown(self, entry: CachedInstance) -> None:
        """A download passed its reservation (its size was unknown, or a guess): count the
        bytes on disk as they arrive and make room for them, so the bound holds during the
        download, not only after it."""
        with self._lock:
            if entry.retired or entry.complete:
                return
            written = entry.written
            if written > entry.reserved:
                self._bytes += self._on_disk(written) - self._on_disk(entry.reserved)
                entry.reserved = written
                self._make_room(0)

    def _expired(self, entry: CachedInstance, now: float) -> bool:
        """Caller holds _lock. Complete (or failed) and older than the TTL."""
        return (entry.complete or entry.error is not None) and now - entry.fetched_at >= self._ttl_of(entry)

    def _ttl_of(self, entry: CachedInstance) -> float:
        return max(self.ttl, UNCLAIMED_GRACE) if entry.unclaimed and entry.error is None else self.ttl

    def _stale(self, entry: CachedInstance, now: float) -> bool:
        """Not to be handed out again: failed, or complete for longer than the cache time. A
        download still in flight is never stale, whatever the cache time (even 0) and however
        long it takes: a second reader joins it (single-flight) instead of starting another
        download beside it, whose bytes the cache bound would not see."""
        return entry.error is not None or (entry.complete and now - entry.fetched_at >= self._ttl_of(entry))

    def _retire(self, entry: CachedInstance) -> None:
        """Caller holds _lock. Drop from the index; delete the file once nobody reads it."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if not entry.retired:
            entry.retired = True
            self._bytes -= self._on_disk(entry.written if entry.complete else entry.reserved)
            entry.reserved = 0
            self._in_flight.discard(entry)
        if entry.pins <= 0:
            self._unlink(entry)

    def _unlink(self, entry: CachedInstance) -> None:
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass
        except PermissionError:  # Windows, a download still writing it: _download deletes it at its end
            log.debug("Cache file %s is still open; deleted once its download ends", entry.path.name)

    def _make_room(self, incoming: int, *, keep_unread: bool = False) -> None:
        """Caller holds _lock. Evict least recently used, unpinned, complete entries until the
        total plus ``incoming`` fits the capacity. ``keep_unread``: not files fetched ahead that
        nobody opened yet (read-ahead must not push out read-ahead still to be read)."""
        limit = self._limit()
        self._over = False
        if self._bytes + incoming <= limit:
            return
        for key in list(self._entries):
            if self._bytes + incoming <= limit:
                return
            entry = self._entries[key]
            if entry.pins <= 0 and entry.complete and not (keep_unread and entry.prefetched):
                self._retire(entry)
        if self._bytes + incoming > limit:
            # Files in use hold the rest: the next one released makes room (not every release:
            # a warm re-read releases a file per open, and each check costs a statvfs).
            self._over = True
            log.debug("Instance cache over its bound while files are in use (%d bytes)", self._bytes)

    def _limit(self, headroom: int = 0) -> int:
        """Caller holds _lock. The bytes the cache may hold now: ``capacity``, or less when its
        disk has less room (what it holds plus the free space, less a margin kept for uploads and
        other programs, and less ``headroom``). Files no one reads make way for new ones before a
        download fails with ENOSPC, whatever --cacheSize says.

        The total counts what downloads in flight reserved; the part of it not written yet has
        not left the free space yet: it is taken off, or every reservation would raise the
        limit by as much as it adds, and read-ahead would overcommit the disk."""
        disk = _statvfs(self.directory)
        if disk is None:
            return self.capacity
        free = disk.f_bavail * disk.f_frsize
        margin = min(DISK_MARGIN, disk.f_blocks * disk.f_frsize // 20)
        unwritten = sum(max(0, e.reserved - e.written) for e in self._in_flight)
        return min(self.capacity, self._bytes - unwritten + free - margin - headroom)
