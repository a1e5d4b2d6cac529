"""Instance cache: single-flight, streaming reads, bound, TTL, errors, private files."""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dicomfuse.core.errors import FsError
from dicomfuse.core.instance_cache import UNCLAIMED_GRACE, InstanceCache, disk_block
from dicomfuse.stores.base import Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def key(n: int) -> tuple[str, str, str, str]:
    return ("s", "1", "2", f"3.{n}")


def blob(n: int, size: int = 1000) -> bytes:
    return bytes([n % 256]) * size


@pytest.fixture
def cache(tmp_path: Path):
    c = InstanceCache(tmp_path, capacity=10_000, ttl=100, workers=4)
    c.start()
    yield c
    c.stop()


RDONLY = os.O_RDONLY | getattr(os, "O_BINARY", 0)  # Windows opens in text mode without O_BINARY


def read_all(cache: InstanceCache, entry) -> bytes:
    fd = os.open(entry.path, RDONLY)
    try:
        out, off = b"", 0
        while chunk := cache.read(entry, fd, off, 300):
            out += chunk
            off += len(chunk)
        return out
    finally:
        os.close(fd)


def test_single_flight(cache: InstanceCache):
    calls = []
    gate = threading.Event()

    def fetch(sink):
        calls.append(1)
        gate.wait(5)
        return sink.write(blob(1))

    entries = []
    threads = [threading.Thread(target=lambda: entries.append(cache.open(key(1), fetch))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gate.set()
    assert len(calls) == 1 and len({id(e) for e in entries}) == 1
    assert entries[0].wait_complete() == 1000
    assert read_all(cache, entries[0]) == blob(1)
    if sys.platform != "win32":  # no mode bits on Windows: the folder's ACL keeps it private
        assert oct(entries[0].path.stat().st_mode & 0o777) == oct(0o600)


def test_read_waits_only_for_its_range(cache: InstanceCache):
    first_half = threading.Event()
    release = threading.Event()

    def fetch(sink):
        sink.write(b"a" * 500)
        first_half.set()
        release.wait(5)
        sink.write(b"b" * 500)
        return 1000

    entry = cache.open(key(2), fetch)
    first_half.wait(5)
    fd = os.open(entry.path, RDONLY)
    assert cache.read(entry, fd, 0, 100) == b"a" * 100  # served before the download ends
    assert not entry.complete
    release.set()
    assert cache.read(entry, fd, 900, 200) == b"b" * 100
    os.close(fd)


def test_bound_evicts_lru_but_never_pinned(cache: InstanceCache):
    entries = []
    for n in range(12):
        e = cache.open(key(n), lambda sink, n=n: sink.write(blob(n)))
        e.wait_complete()
        entries.append(e)
        if n != 0:
            cache.release(e)
    assert cache.used_bytes <= cache.capacity + 1000  # pinned entry 0 may be over the bound alone
    assert entries[0].path.exists() and read_all(cache, entries[0]) == blob(0)
    assert cache.known_size(key(11)) == 1000
    assert cache.known_size(key(1)) is None  # least recently used went first
    cache.release(entries[0])
    assert cache.used_bytes <= cache.capacity


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="disk blocks come from statvfs")
def test_the_bound_counts_the_disk_blocks_small_files_take(tmp_path: Path):
    """--cacheSize bounds the disk space: 1000-byte files take a whole block each, so forty
    of them must not be kept under a bound of forty thousand bytes."""
    block = disk_block(tmp_path)
    assert block >= 512
    capacity = 10 * block
    cache = InstanceCache(tmp_path, capacity=capacity, ttl=100, workers=2, block=block)
    cache.start()
    try:
        for n in range(40):
            entry = cache.open(key(n), lambda sink, n=n: sink.write(blob(n)))
            assert entry.wait_complete() == 1000
            cache.release(entry)
        cache.adopt(key(99), _written(tmp_path / "upload.dcm", blob(99)), link=True)  # an upload's copy
        on_disk = sum(p.stat().st_blocks * 512 for p in tmp_path.glob("*.dcm") if p.name != "upload.dcm")
        assert on_disk <= capacity and cache.used_bytes <= capacity
        assert cache.known_size(key(39)) == 1000 and cache.known_size(key(99)) == 1000
        assert cache.known_size(key(0)) is None, "the oldest made room"
    finally:
        cache.stop()


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_too_large_is_efbig(cache: InstanceCache):
    with pytest.raises(FsError) as e:
        cache.open(key(1), lambda sink: 0, expected_size=cache.max_file + 1)
    assert e.value.errno == errno.EFBIG
    entry = cache.open(key(2), lambda sink: sink.write(b"x" * (cache.max_file + 1)))
    with pytest.raises(FsError) as e:
        entry.wait_complete()
    assert e.value.errno == errno.EFBIG
    cache.release(entry)
    assert cache.known_size(key(2)) is None


def test_failed_download_is_not_cached(cache: InstanceCache):
    def broken(sink):
        sink.write(b"partial")
        raise Unavailable("connection dropped")

    entry = cache.open(key(3), broken)
    with pytest.raises(Unavailable):
        entry.wait_complete()
    cache.release(entry)
    assert not entry.path.exists()
    again = cache.open(key(3), lambda sink: sink.write(b"whole"))
    assert again.wait_complete() == 5


def test_ttl_refetches(tmp_path: Path):
    clock = Clock()
    cache = InstanceCache(tmp_path, capacity=10_000, ttl=10, clock=clock)
    calls = []

    def fetch(sink):
        calls.append(1)
        return sink.write(b"v%d" % len(calls))

    e = cache.open(key(1), fetch)
    e.wait_complete()
    cache.release(e)
    e = cache.open(key(1), fetch)
    cache.release(e)
    assert len(calls) == 1
    assert cache.known_size(key(1)) == 2
    clock.now = 11
    assert cache.known_size(key(1)) is None  # expired: fetched again at open, maybe changed meanwhile
    e = cache.open(key(1), fetch)
    e.wait_complete()
    cache.release(e)
    assert len(calls) == 2
    cache.stop()


@pytest.mark.parametrize("ttl", [0, 5])
def test_a_download_longer_than_the_cache_time_is_joined_not_started_again(tmp_path: Path, ttl: float):
    """The cache time counts from the end of a download: a reader that opens the file while it is
    still arriving, later than the cache time after it started, joins it (one download, one
    file on disk, counted once against the bound)."""
    clock = Clock()
    cache = InstanceCache(tmp_path, capacity=10_000, ttl=ttl, clock=clock)
    cache.start()
    gate = Gate()
    try:
        first = cache.open(key(1), gate.fetch(1))
        wait_for(lambda: gate.running == 1)
        clock.now = 60  # a slow link: still downloading a minute later
        second = cache.open(key(1), gate.fetch(2))
        assert cache.known_size(key(1)) is None  # still arriving: its size is not known yet
        assert second is first and gate.order == [1]
        assert cache.prefetch(key(1), gate.fetch(3)) and gate.order == [1]
        gate.release.set()
        assert first.wait_complete(5) == 1000
        assert read_all(cache, second) == blob(1) and gate.order == [1]
        assert len(list(tmp_path.iterdir())) == 1 and cache.used_bytes == 1000
        cache.release(first)
        cache.release(second)
        clock.now = 60 + ttl + 1  # now the cache time, from the end of the download, has passed
        assert cache.known_size(key(1)) is None
        third = cache.open(key(1), gate.fetch(4))
        assert third.wait_complete(5) == 1000 and gate.order == [1, 4]
        cache.release(third)
    finally:
        gate.release.set()
        cache.stop()


@pytest.mark.parametrize("how", ["stat", "read-ahead"])
def test_cache_time_zero_hands_a_copy_fetched_for_a_stat_or_ahead_to_the_open_that_follows(tmp_path: Path, how: str):
    """With --cacheTime L,0, cp's stat (which fetches an unsized instance to learn its size) or
    read-ahead must not cost a second download at cp's open: one download per file. Once a
    program opened it, the cache time 0 holds: the next open downloads again, and nobody's
    copy stays on disk."""
    clock = Clock()
    cache = InstanceCache(tmp_path, capacity=10_000, ttl=0, clock=clock)
    cache.start()
    calls = []

    def fetch(sink):
        calls.append(1)
        return sink.write(blob(len(calls)))

    try:
        if how == "stat":
            probe = cache.open(key(1), fetch, claim=False)
            assert probe.wait_complete(5) == 1000
            cache.release(probe)
        else:
            assert cache.prefetch(key(1), fetch)
            wait_for(lambda: cache.known_size(key(1)) == 1000)
        clock.now = 3  # the program's open comes a moment later
        assert cache.known_size(key(1)) == 1000
        opened = cache.open(key(1), fetch)
        assert read_all(cache, opened) == blob(1) and len(calls) == 1
        assert cache.known_size(key(1)) is None, "opened: the cache time 0 applies"
        cache.release(opened)
        assert list(tmp_path.iterdir()) == []
        again = cache.open(key(1), fetch)
        assert again.wait_complete(5) == 1000 and len(calls) == 2
        cache.release(again)
        assert list(tmp_path.iterdir()) == []
    finally:
        cache.stop()


def test_a_copy_nobody_opens_leaves_the_disk_after_the_grace(tmp_path: Path):
    """Fetched for a stat under cache time 0 and never opened: gone after UNCLAIMED_GRACE."""
    clock = Clock()
    cache = InstanceCache(tmp_path, capacity=10_000, ttl=0, clock=clock)
    probe = cache.open(key(1), lambda sink: sink.write(blob(1)), claim=False)
    try:
        probe.wait_complete(5)
        cache.release(probe)
        assert cache.expire() == 0 and probe.path.exists()
        clock.now = UNCLAIMED_GRACE
        assert cache.expire() == 1 and list(tmp_path.iterdir()) == []
    finally:
        cache.stop()


def test_expired_files_leave_the_disk_once_nobody_reads_them(tmp_path: Path):
    """Patient data stays on disk for the cache time, not until the next open or the unmount."""
    clock = Clock()
    cache = InstanceCache(tmp_path, capacity=10_000, ttl=10, clock=clock)
    cache.start()
    in_use = cache.open(key(1), lambda sink: sink.write(blob(1)))
    done = cache.open(key(2), lambda sink: sink.write(blob(2)))
    in_use.wait_complete()
    done.wait_complete()
    cache.release(done)
    assert cache.expire() == 0
    clock.now = 11
    assert cache.expire() == 1
    assert not done.path.exists() and read_all(cache, in_use) == blob(1)
    cache.release(in_use)
    assert not in_use.path.exists()
    assert list(tmp_path.iterdir()) == [] and cache.used_bytes == 0
    cache.stop()


def test_with_no_cache_time_a_file_leaves_the_disk_when_its_reader_closes(tmp_path: Path):
    cache = InstanceCache(tmp_path, capacity=10_000, ttl=0)
    cache.start()
    entry = cache.open(key(1), lambda sink: sink.write(blob(1)))
    assert read_all(cache, entry) == blob(1)
    cache.release(entry)
    assert list(tmp_path.iterdir()) == []
    cache.stop()


def test_expired_files_are_swept_without_any_further_use_of_the_cache(tmp_path: Path):
    """A file fetched ahead that nobody opened: no release ever comes for it. (It waits for
    its reader UNCLAIMED_GRACE, longer than this cache time.)"""
    clock = Clock()
    cache = InstanceCache(tmp_path, capacity=10_000, ttl=0.2, clock=clock)
    cache.start()
    assert cache.prefetch(key(1), lambda sink: sink.write(blob(1)))
    wait_for(lambda: cache.used_bytes == 1000)
    assert len(list(tmp_path.iterdir())) == 1
    clock.now = UNCLAIMED_GRACE
    wait_for(lambda: list(tmp_path.iterdir()) == [])
    assert cache.used_bytes == 0
    cache.stop()


# ---------------------------------------------------------------------------------------------
# Read-ahead: bounded pool, demand first, promotion, cancellation, never over the bound


class Gate:
    """A fetch that blocks until released, counting how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.order: list[int] = []

    def fetch(self, n: int, size: int = 1000):  # type: ignore[no-untyped-def]
        def run(sink):  # type: ignore[no-untyped-def]
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
                self.order.append(n)
            try:
                assert self.release.wait(10)
                sink.write(blob(n, size))
                return size
            finally:
                with self.lock:
                    self.running -= 1
        return run


def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_prefetch_runs_on_the_bounded_pool_single_flight(tmp_path: Path):
    cache = InstanceCache(tmp_path, capacity=100_000, ttl=100, workers=4)
    cache.start()
    gate = Gate()
    try:
        for n in range(6):
            assert cache.prefetch(key(n), gate.fetch(n), 1000)
        assert cache.prefetch(key(0), gate.fetch(100), 1000), "in flight already: single-flight"
        wait_for(lambda: gate.running == 3)
        gate.release.set()
        wait_for(lambda: all(cache.known_size(key(n)) == 1000 for n in range(6)))
        assert gate.peak == 3, "never more read-ahead downloads at once than workers, less the one kept"
        entry = cache.open(key(3), gate.fetch(99))
        assert read_all(cache, entry) == blob(3), "a read-ahead file is served from the cache"
        cache.release(entry)
        assert 99 not in gate.order and 100 not in gate.order and len(gate.order) == 6
    finally:
        cache.stop()


@contextmanager
def read_ahead_queued(tmp_path: Path, count: int) -> Iterator[tuple[InstanceCache, Gate]]:
    """A one-worker cache with read-ahead of files 0..count-1: 0 runs (held at the gate), the
    others are queued."""
    cache = InstanceCache(tmp_path, capacity=100_000, ttl=100, workers=1)
    cache.start()
    gate = Gate()
    try:
        for n in range(count):
            cache.prefetch(key(n), gate.fetch(n), 1000)
        wait_for(lambda: gate.running == 1)
        yield cache, gate
    finally:
        cache.stop()


def test_a_file_someone_waits_for_goes_before_read_ahead_and_promotes_it(tmp_path: Path):
    with read_ahead_queued(tmp_path, 5) as (cache, gate):  # 0 runs; 1..4 queued
        demand = cache.open(key(10), gate.fetch(10))
        promoted = cache.open(key(4), gate.fetch(4))
        gate.release.set()
        wait_for(lambda: len(gate.order) == 6)
        assert gate.order[:3] == [0, 10, 4], gate.order
        assert cache.prefetch_stats["promoted"] == 1
        for entry in (demand, promoted):
            cache.release(entry)


def test_cancel_drops_only_read_ahead_that_has_not_started(tmp_path: Path):
    with read_ahead_queued(tmp_path, 3) as (cache, gate):
        assert not cache.cancel(key(0)), "already running: it finishes"
        assert cache.cancel(key(1)) and cache.cancel(key(2))
        assert not cache.cancel(key(2))
        gate.release.set()
        wait_for(lambda: cache.known_size(key(0)) == 1000)
        assert gate.order == [0]
        assert cache.known_size(key(1)) is None and cache.used_bytes == 1000
        assert len(list(tmp_path.glob("*.dcm"))) == 1, "cancelled read-ahead leaves no file"


def test_a_queued_read_ahead_pinned_by_an_open_is_never_cancelled(tmp_path: Path):
    """A file opened while its read-ahead is still queued (the copy is pinned at open, read
    later): cancelling the read-ahead then (the reader jumped elsewhere) retired the entry its
    reader waits on, and the read hung forever, in the kernel too (unkillable, no unmount)."""
    with read_ahead_queued(tmp_path, 3) as (cache, gate):  # 0 runs; 1 and 2 queued
        opened = cache.pin_fresh(key(2))
        assert opened is not None
        assert not cache.cancel(key(2)), "someone holds it: it is a download someone waits for"
        assert cache.cancel(key(1))
        assert cache.prefetch_stats["promoted"] == 1
        gate.release.set()
        assert read_all(cache, opened) == blob(2)
        cache.release(opened)
        assert gate.order == [0, 2]


def test_read_ahead_never_exceeds_the_bound_nor_evicts_files_in_use(tmp_path: Path):
    cache = InstanceCache(tmp_path, capacity=4000, ttl=100, workers=4)
    cache.start()
    gate = Gate()
    gate.release.set()
    try:
        in_use = [cache.open(key(n), gate.fetch(n)) for n in range(3)]
        wait_for(lambda: all(e.complete for e in in_use))
        assert cache.prefetch(key(10), gate.fetch(10), 1000)
        assert not cache.prefetch(key(11), gate.fetch(11), 1000), "3 in use + 1 ahead fill the 4000 bytes"
        assert not cache.prefetch(key(12), gate.fetch(12)), "unknown size: guessed from the last file"
        wait_for(lambda: cache.known_size(key(10)) == 1000)
        assert cache.used_bytes <= 4000 and cache.prefetch_stats["refused"] == 2
        for entry in in_use:
            assert read_all(cache, entry) == blob(int(entry.key[3].split(".")[1]))
            cache.release(entry)
        assert cache.prefetch(key(11), gate.fetch(11), 1000), "room again once files are released"
        wait_for(lambda: cache.known_size(key(11)) == 1000)
        assert cache.used_bytes <= 4000
    finally:
        cache.stop()


def test_read_ahead_never_pushes_out_read_ahead_nobody_has_read_yet(tmp_path: Path):
    cache = InstanceCache(tmp_path, capacity=4000, ttl=100, workers=2)  # room for four 1000-byte files
    cache.start()
    gate = Gate()
    gate.release.set()
    try:
        assert all(cache.prefetch(key(n), gate.fetch(n), 1000) for n in range(4))
        wait_for(lambda: all(cache.known_size(key(n)) == 1000 for n in range(4)))
        assert not cache.prefetch(key(5), gate.fetch(5), 1000), "the four unread files keep their place"
        assert all(cache.known_size(key(n)) == 1000 for n in range(4))
        demand = cache.open(key(6), gate.fetch(6))  # a file a program waits for may push one out
        assert read_all(cache, demand) == blob(6)
        cache.release(demand)
    finally:
        cache.stop()


def test_a_download_someone_waits_for_gets_a_worker_while_every_read_ahead_hangs(tmp_path: Path):
    """Read-ahead downloads stuck on a silent server never hold every worker: the file a
    program waits for starts at once (it waited for the stuck ones to time out)."""
    cache = InstanceCache(tmp_path, capacity=10_000_000, ttl=100, workers=4)
    cache.start()
    hang = threading.Event()
    started: list[int] = []

    def stuck(n: int):
        def fetch(sink):
            started.append(n)
            hang.wait(10)
            return sink.write(b"late")
        return fetch

    for n in range(8):
        assert cache.prefetch(key(n), stuck(n), 4)
    wanted = cache.open(key(99), lambda sink: sink.write(b"now"))
    try:
        assert wanted.wait_complete(timeout=5) == 3, "the demanded download waited behind read-ahead"
        assert len(started) == 3  # 4 workers, one kept for downloads someone waits for
    finally:
        hang.set()
        cache.release(wanted)
        cache.stop()


def test_downloads_of_unknown_size_make_room_as_their_bytes_arrive(tmp_path: Path):
    """A download whose size was not known reserved nothing: the cache went over its bound by
    up to its size until it ended. The bytes on disk stay within the bound as they arrive."""
    cache = InstanceCache(tmp_path, capacity=4500, ttl=100, workers=2)
    cache.start()
    try:
        for n in range(4):  # 4 × 1000 bytes, complete and unused
            e = cache.open(key(n), lambda sink, n=n: sink.write(bytes(1000)))
            e.wait_complete()
            cache.release(e)
        peak = []

        def fetch(sink):
            for _ in range(10):
                sink.write(bytes(100))
                peak.append(sum(f.stat().st_size for f in tmp_path.iterdir() if f.is_file()))
            return 1000

        e = cache.open(key(9), fetch)  # size unknown
        e.wait_complete()
        cache.release(e)
        assert max(peak) <= 4500, peak
        assert cache.used_bytes <= 4500
    finally:
        cache.stop()


class FillingDisk:
    """An unbuffered cache file on a disk with ``room`` bytes free: a write takes part of its
    bytes when the disk fills, the next one fails with ENOSPC, as a FileIO does."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        if self.room == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = bytes(data[: self.room])
        self.room -= len(taken)
        self.data += taken
        return len(taken)

    def flush(self) -> None:
        pass


def test_a_cache_file_on_a_full_disk_is_never_taken_for_a_whole_copy(tmp_path: Path):
    """A store that writes a chunk and ignores how much of it was taken (the local folder
    store did) got a short copy marked complete on a disk filling up: cp exited 0 with a cut
    file. The sink writes everything or raises."""
    from dicomfuse.core.instance_cache import CachedInstance, _ProgressSink

    entry = CachedInstance(key(1), tmp_path / "x", 0.0)
    entry.reserved = 10_000
    raw = FillingDisk(room=2500)
    sink = _ProgressSink(entry, raw, limit=10_000)  # type: ignore[arg-type]
    assert sink.write(b"a" * 1000) == 1000
    with pytest.raises(OSError) as caught:
        sink.write(b"b" * 2000)
    assert caught.value.errno == errno.ENOSPC
    assert entry.written == len(raw.data) == 2500


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="POSIX disk space")
def test_files_no_one_reads_make_way_when_the_disk_is_fuller_than_cache_size_says(tmp_path: Path, monkeypatch):
    """--cacheSize larger than the disk's free space (the default 10 GB on a small disk): the
    files no one reads filled the disk and every new read failed with ENOSPC until they
    expired. The disk's room bounds the cache too."""
    import types

    disk_size = 5000

    def statvfs(path):  # type: ignore[no-untyped-def]
        used = sum(p.stat().st_size for p in Path(path).iterdir())
        return types.SimpleNamespace(f_bavail=disk_size - used, f_frsize=1, f_blocks=disk_size)

    monkeypatch.setattr("dicomfuse.core.instance_cache.os.statvfs", statvfs)
    cache = InstanceCache(tmp_path, capacity=10**9, ttl=100, workers=2)
    cache.start()
    try:
        for n in range(8):
            entry = cache.open(key(n), lambda sink, n=n: sink.write(blob(n)), expected_size=1000)
            assert entry.wait_complete() == 1000
            assert read_all(cache, entry) == blob(n)
            cache.release(entry)
        on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
        assert on_disk <= disk_size - disk_size // 20  # the margin stays free
        assert cache.fresh(key(7)) is not None and cache.fresh(key(0)) is None  # the oldest made way
    finally:
        cache.stop()


def test_a_download_stopped_by_a_full_disk_is_said_at_error_once(cache: InstanceCache, caplog):
    def full(sink):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    with caplog.at_level("DEBUG"):
        for n in range(3):
            entry = cache.open(key(n), full)
            with pytest.raises(OSError):
                entry.wait_complete()
            cache.release(entry)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "is full" in errors[0].getMessage()


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="POSIX disk space")
def test_read_ahead_never_reserves_more_of_the_disk_than_is_free(tmp_path: Path, monkeypatch):
    """Reservations of downloads not written yet have not left the free space yet: counted as if
    they had, each one raised the bound by as much as it added, read-ahead overcommitted a small
    disk and the file cp waited for failed with ENOSPC. Read-ahead also leaves room for it."""
    import types

    disk_size = 10_000

    def statvfs(path):  # type: ignore[no-untyped-def]
        used = sum(p.stat().st_size for p in Path(path).iterdir())
        return types.SimpleNamespace(f_bavail=disk_size - used, f_frsize=1, f_blocks=disk_size)

    monkeypatch.setattr("dicomfuse.core.instance_cache.os.statvfs", statvfs)
    gate = threading.Event()
    cache = InstanceCache(tmp_path, capacity=10**9, ttl=100, workers=2)
    cache.start()
    try:
        def fetch(n):  # type: ignore[no-untyped-def]
            def run(sink):  # type: ignore[no-untyped-def]
                gate.wait(10)
                return sink.write(blob(n))
            return run

        admitted = [n for n in range(20) if cache.prefetch(key(n), fetch(n), expected_size=1000)]
        margin = disk_size // 20
        assert len(admitted) * 1000 + 1000 <= disk_size - margin  # room left for a file asked for
        assert len(admitted) >= 5
        gate.set()
        demanded = cache.open(key(99), lambda sink: sink.write(blob(99)), expected_size=1000)
        assert demanded.wait_complete() == 1000
        cache.release(demanded)
    finally:
        gate.set()
        cache.stop()


def test_a_file_that_cannot_be_created_leaves_no_entry_behind(tmp_path: Path, monkeypatch):
    """No file descriptor left for a moment (or the cache folder read-only): the entry was
    indexed before its file was created, so every later open of that instance was handed a
    download that never started, and read ENOENT until unmount."""
    from dicomfuse.core import portable

    cache = InstanceCache(tmp_path, capacity=10_000, ttl=100, workers=2)
    cache.start()
    open_fd = portable.open_fd

    def exhausted(path, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_CREAT:
            raise OSError(errno.EMFILE, "Too many open files")
        return open_fd(path, flags, *args)

    try:
        monkeypatch.setattr(portable, "open_fd", exhausted)
        with pytest.raises(FsError) as refused:
            cache.open(key(1), lambda sink: sink.write(blob(1)))
        assert refused.value.errno == errno.EMFILE
        assert not cache.prefetch(key(2), lambda sink: sink.write(blob(2)))
        assert cache.used_bytes == 0
        monkeypatch.setattr(portable, "open_fd", open_fd)
        entry = cache.open(key(1), lambda sink: sink.write(blob(1)))
        assert read_all(cache, entry) == blob(1)
        cache.release(entry)
    finally:
        cache.stop()


def test_a_cache_folder_removed_meanwhile_is_made_again(tmp_path: Path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    cache = InstanceCache(folder, capacity=10_000, ttl=100, workers=2)
    cache.start()
    try:
        folder.rmdir()
        entry = cache.open(key(1), lambda sink: sink.write(blob(1)))
        assert read_all(cache, entry) == blob(1)
        cache.release(entry)
        if sys.platform != "win32":
            assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    finally:
        cache.stop()


def test_giving_way_keeps_links_to_queued_uploads_whose_deletion_frees_nothing(tmp_path: Path, monkeypatch):
    cache = InstanceCache(tmp_path, capacity=10**6, ttl=100, workers=2)
    try:
        queued = tmp_path / "queued.dcm"
        queued.write_bytes(blob(1))
        cache.adopt(key(1), queued, link=True)
        plain = tmp_path / "stored.dcm"
        plain.write_bytes(blob(2))
        cache.adopt(key(2), plain)
        monkeypatch.setattr(cache, "_free_bytes", lambda: 0)  # a disk that stays full
        assert cache.give_way(1000)
        assert cache.known_size(key(1)) == 1000 and cache.known_size(key(2)) is None
        assert not cache.give_way(1000), "nothing left that would free the disk"
    finally:
        cache.stop()
