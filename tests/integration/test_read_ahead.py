"""Read-ahead through a real mount: a program going through a series in order finds the next
files already fetched; random access and --readAhead 0 fetch nothing ahead. Observed through the
mount's private cache folder (one file per cached instance), never through timing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Backend, DicomFactory, requires_fuse, run
from tests.mounting import Mount, wait_for

pytestmark = [requires_fuse, pytest.mark.mount]


def cached_files(m: Mount) -> int:
    return sum(1 for _ in (m.cache_dir / "mounts").glob("*/cache/*.dcm"))


def listed_in_order(backend: Backend, m: Mount, insts) -> list[Path]:  # type: ignore[no-untyped-def]
    folder = backend.series_path(m, insts[0])
    import os

    return [folder / name for name in os.listdir(folder)]  # readdir order: what cp -r and tar follow


def test_reading_a_series_in_order_fetches_ahead(backend: Backend, mount_factory, dicom: DicomFactory):
    insts = dicom.series(12)
    backend.seed(insts)
    m = mount_factory(backend, "--readAhead", "4")
    files = listed_in_order(backend, m, insts)
    for path in files[:2]:
        path.read_bytes()
    wait_for(lambda: cached_files(m) >= 6, 20, what="4 files fetched ahead of the reader")
    time.sleep(0.5)
    assert cached_files(m) == 6, "no more than the window ahead"
    r = run("cp", "-r", backend.series_path(m, insts[0]), m.path.parent / "copy")
    assert r.returncode == 0, r.stderr
    originals = {i.sop_uid: i.path.read_bytes() for i in insts}
    for copy in (m.path.parent / "copy").iterdir():
        assert copy.read_bytes() == originals[copy.name[:-4]]


def test_random_access_and_read_ahead_off_fetch_nothing_ahead(backend: Backend, mount_factory,
                                                             dicom: DicomFactory):
    insts = dicom.series(12)
    backend.seed(insts)
    m = mount_factory(backend, "--readAhead", "4")
    files = listed_in_order(backend, m, insts)
    for i in (9, 2, 6):
        files[i].read_bytes()
    off = mount_factory(backend, "--readAhead", "0")
    for path in listed_in_order(backend, off, insts)[:5]:
        path.read_bytes()
    time.sleep(1.0)  # give a wrong read-ahead the time to show
    assert cached_files(m) == 3
    assert cached_files(off) == 5
