"""Opened instances on disk: single-flight downloads that stream into a private cache file,
reads served as soon as their byte range has arrived, an LRU bound on total bytes, and a TTL.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from dicomfuse.core.errors import FsError

log = logging.getLogger(__name__)

CacheKey = tuple[str, str, str, str]  # store, study, series, sop
Fetch = Callable[[BinaryIO], int]


class CachedInstance:
    """One cache file. ``cond`` guards ``written``, ``complete``, ``error``; the cache's lock
    guards ``pins``, ``last_used`` and ``retired``."""

    def __init__(self, key: CacheKey, path: Path, fetched_at: float) -> None:
        self.key = key
        self.path = path
        self.fetched_at = fetched_at
        self.cond = threading.Condition()
        self.written = 0
        self.complete = False
        self.error: BaseException | None = None
        self.pins = 0
        self.last_used = fetched_at
        self.retired = False

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
    """A file-like sink that counts bytes, wakes readers and enforces the size limit."""

    def __init__(self, entry: CachedInstance, raw: BinaryIO, limit: int) -> None:
        self._entry = entry
        self._raw = raw
        self._limit = limit

    def write(self, data: bytes) -> int:
        entry = self._entry
        if entry.written + len(data) > self._limit:
            raise FsError(errno.EFBIG, f"instance larger than the largest allowed file ({self._limit} bytes)")
        n = self._raw.write(data)
        self._raw.flush()
        with entry.cond:
            entry.written += n
            entry.cond.notify_all()
        return n

    def flush(self) -> None:
        self._raw.flush()


class InstanceCache:
    """Bounded by ``capacity`` bytes (largest file ``capacity // 4``); entries older than ``ttl``
    seconds are fetched again on the next open. Entries in use are never evicted."""

    def __init__(
        self,
        directory: Path,
        capacity: int,
        ttl: float,
        *,
        workers: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.capacity = capacity
        self.max_file = capacity // 4
        self.ttl = ttl
        self._clock = clock
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._names = itertools.count()
        self._lock = threading.Lock()
        # Protected by _lock: the index, LRU order, byte total, and entries' pins/last_used.
        self._entries: OrderedDict[CacheKey, CachedInstance] = OrderedDict()
        self._bytes = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the download pool (in the filesystem's init, after any fork)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="download")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- queries ----------------------------------------------------------------------------

    def known_size(self, key: CacheKey) -> int | None:
        with self._lock:
            entry = self._entries.get(key)
        return entry.size if entry is not None else None

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._bytes

    # -- use --------------------------------------------------------------------------------

    def open(self, key: CacheKey, fetch: Fetch, expected_size: int | None = None) -> CachedInstance:
        """A pinned entry for ``key``: the cached one if fresh, the download in flight if any,
        else a new download started on the pool. Call :meth:`release` when done."""
        if expected_size is not None and expected_size > self.max_file:
            raise FsError(errno.EFBIG, f"instance of {expected_size} bytes exceeds cacheSize/4")
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (entry.error is not None or now - entry.fetched_at >= self.ttl):
                self._retire(entry)
                entry = None
            if entry is not None:
                entry.pins += 1
                entry.last_used = now
                self._entries.move_to_end(key)
                return entry
            entry = CachedInstance(key, self.directory / f"{next(self._names)}.dcm", now)
            entry.pins = 1
            self._entries[key] = entry
            self._make_room(expected_size or 0)
            # Created under the lock: a second opener may open it for reading at once.
            raw = os.fdopen(os.open(entry.path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600), "wb")
        if self._pool is None:
            self.start()
        assert self._pool is not None
        self._pool.submit(self._download, entry, fetch, raw)
        return entry

    def release(self, entry: CachedInstance) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins <= 0 and entry.retired:
                self._unlink(entry)
            else:
                self._make_room(0)

    @staticmethod
    def read(entry: CachedInstance, fd: int, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the instance through the reader's ``fd``
        (opened on ``entry.path``), waiting only for that range to arrive."""
        entry.wait_for(offset + size)
        return os.pread(fd, size, offset)

    def adopt(self, key: CacheKey, source: Path) -> int:
        """Move a file the mount just uploaded into the cache as a complete entry."""
        size = source.stat().st_size
        if size > self.max_file:
            return size
        now = self._clock()
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._retire(old)
            entry = CachedInstance(key, self.directory / f"{next(self._names)}.dcm", now)
            os.replace(source, entry.path)
            os.chmod(entry.path, 0o600)
            entry.written, entry.complete = size, True
            self._entries[key] = entry
            self._bytes += size
            self._make_room(0)
        return size

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

    def _download(self, entry: CachedInstance, fetch: Fetch, raw: BinaryIO) -> None:
        try:
            with raw:
                fetch(_ProgressSink(entry, raw, self.max_file))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting reader
            log.debug("Download of %s failed: %s", entry.key[3], exc)
            with entry.cond:
                entry.error = exc
                entry.cond.notify_all()
            with self._lock:
                self._retire(entry)
            return
        with self._lock:  # lock order: cache lock, then the entry's condition
            with entry.cond:
                entry.complete = True
                entry.cond.notify_all()
            if entry.retired:
                if entry.pins <= 0:
                    self._unlink(entry)
            else:
                self._bytes += entry.written
                self._make_room(0)

    def _retire(self, entry: CachedInstance) -> None:
        """Caller holds _lock. Drop from the index; delete the file once nobody reads it."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if not entry.retired:
            entry.retired = True
            if entry.complete:  # only complete entries are counted in _bytes
                self._bytes -= entry.written
        if entry.pins <= 0:
            self._unlink(entry)

    def _unlink(self, entry: CachedInstance) -> None:
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass

    def _make_room(self, incoming: int) -> None:
        """Caller holds _lock. Evict least recently used, unpinned, complete entries until the
        total plus ``incoming`` fits the capacity."""
        for key in list(self._entries):
            if self._bytes + incoming <= self.capacity:
                return
            entry = self._entries[key]
            if entry.pins <= 0 and entry.complete:
                self._retire(entry)
        if self._bytes + incoming > self.capacity:
            log.debug("Instance cache over its bound while files are in use (%d bytes)", self._bytes)
