"""Concurrency soak: 16 threads list, read, upload and delete through one mount at once for a
bounded time, with seeded random operations (the seed is printed; DICOMFUSE_SOAK_SEED replays a
run, DICOMFUSE_SOAK_SECONDS makes it longer). Afterwards every upload that was not deleted is on
the server byte-identical, no deleted file is listed, the cache kept its bound, no thread is
stuck and the mount's memory did not run away."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Backend, DicomFactory, requires_fuse
from tests.mounting import Mount

pytestmark = [requires_fuse, pytest.mark.mount]

THREADS = 16
SECONDS = float(os.environ.get("DICOMFUSE_SOAK_SECONDS", "20"))
CACHE_MB = 8


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cache_bytes(m: Mount) -> int:
    total = 0
    for p in (m.cache_dir / "mounts").glob("*/cache/*.dcm"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass  # evicted between the listing and the stat
    return total


@dataclass
class Ledger:
    """What the threads did, for the checks afterwards."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    uploaded: dict[str, tuple[Path, bytes]] = field(default_factory=dict)  # SOP UID -> (mount path, bytes)
    deleted: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    operations: int = 0
    peak_cache: int = 0


def test_sixteen_threads_reading_listing_uploading_deleting(orthanc, mount_factory, dicom: DicomFactory):  # type: ignore[no-untyped-def]
    from tests.conftest import _orthanc_backend

    backend: Backend = _orthanc_backend(orthanc)
    seed = int(os.environ.get("DICOMFUSE_SOAK_SEED", str(random.SystemRandom().randrange(1 << 30))))
    print(f"soak seed {seed} ({SECONDS:.0f} s, {THREADS} threads)")
    seeded = dicom.series(24, study=0, series=0, pixel_bytes=200_000) + dicom.series(24, study=0, series=1,
                                                                                      pixel_bytes=200_000)
    backend.seed(seeded)
    known = {i.sop_uid: i for i in seeded}
    to_upload = [[dicom.instance(study=1 + t, series=0, pixel_bytes=30_000) for _ in range(12)]
                 for t in range(THREADS)]
    m = mount_factory(backend, "--cacheSize", str(CACHE_MB), "--cacheTime", "2,30", "--readAhead", "4")
    series_dirs = [backend.series_path(m, seeded[0]), backend.series_path(m, seeded[-1])]
    store_dir = m.path / backend.store_name
    assert m.proc is not None
    rss_start = rss_kib(m.proc.pid)
    ledger = Ledger()
    stop_at = time.monotonic() + SECONDS

    def worker(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        mine = list(to_upload[index])
        while time.monotonic() < stop_at:
            op = rng.choice(("list", "read", "read", "upload", "delete"))
            try:
                if op == "list":
                    os.listdir(rng.choice(series_dirs))
                elif op == "read":
                    inst = known[rng.choice(list(known))]
                    data = backend.instance_path(m, inst).read_bytes()
                    if data != inst.path.read_bytes():
                        with ledger.lock:
                            ledger.errors.append(f"read {inst.sop_uid}: wrong bytes")
                elif op == "upload" and mine:
                    inst = mine.pop()
                    with open(inst.path, "rb") as src, open(store_dir / inst.path.name, "wb") as dst:
                        dst.write(src.read())
                    with ledger.lock:
                        ledger.uploaded[inst.sop_uid] = (backend.instance_path(m, inst), inst.path.read_bytes())
                elif op == "delete":
                    with ledger.lock:
                        candidates = [uid for uid in ledger.uploaded if uid not in ledger.deleted]
                        uid = rng.choice(candidates) if candidates else None
                        if uid is not None:
                            ledger.deleted.add(uid)  # claimed: no other thread deletes it
                    if uid is not None:
                        os.unlink(ledger.uploaded[uid][0])
            except OSError as exc:
                with ledger.lock:
                    ledger.errors.append(f"{op}: {exc}")
            with ledger.lock:
                ledger.operations += 1
                ledger.peak_cache = max(ledger.peak_cache, cache_bytes(m))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 120)
    assert not any(t.is_alive() for t in threads), f"a thread is stuck (seed {seed})"
    assert not ledger.errors, f"seed {seed}: {ledger.errors[:5]}"
    assert ledger.operations > THREADS * 5, ledger.operations
    assert ledger.uploaded, "the run uploaded something"

    for uid, (path, data) in ledger.uploaded.items():
        inst = next(i for group in to_upload for i in group if i.sop_uid == uid)
        if uid in ledger.deleted:
            assert not backend.has(inst), f"deleted {uid} is still on the server (seed {seed})"
            kept = [p for u, (p, _) in ledger.uploaded.items() if p.parent == path.parent and u not in ledger.deleted]
            if kept:
                assert path.name not in os.listdir(path.parent), f"deleted {uid} is still listed (seed {seed})"
            else:  # the series held only uploads that were all deleted: it is gone with them
                assert not path.parent.exists(), f"emptied series {path.parent.name} is still listed (seed {seed})"
        else:
            assert backend.server_bytes(inst) == data, f"upload {uid} differs on the server (seed {seed})"
    # The bound holds except for files in use at that moment (16 readers of 200 KB at most).
    assert ledger.peak_cache <= CACHE_MB * 1024 * 1024 + THREADS * 250_000, ledger.peak_cache
    assert rss_kib(m.proc.pid) - rss_start < 150 * 1024, "the mount's memory grew without bound"
