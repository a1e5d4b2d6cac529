"""``dicomfuse prefetch``: on a running mount, and mounting first with the same flags."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import Backend, DicomFactory, requires_fuse, run
from tests.mounting import Mount, wait_for

pytestmark = [requires_fuse, pytest.mark.mount]


def cached_files(m: Mount) -> int:
    return sum(1 for _ in (m.cache_dir / "mounts").glob("*/cache/*.dcm"))


def test_prefetch_a_study_of_a_running_mount(backend: Backend, mount_factory, dicom: DicomFactory):
    insts = dicom.series(4, series=0) + dicom.series(3, series=1)
    backend.seed(insts)
    m = mount_factory(backend, "--readAhead", "0")
    study = m.path / backend.store_name / insts[0].study_uid
    r = run(sys.executable, "-m", "dicomfuse", "prefetch", study, "--threads", "4", "--logDir", m.log_dir)
    assert r.returncode == 0, r.stderr
    assert "7/7 files" in r.stderr and "ETA done" in r.stderr
    assert cached_files(m) == 7
    for inst in insts:  # served from the cache now, byte-identical
        assert backend.instance_path(m, inst).read_bytes() == inst.path.read_bytes()


def test_prefetch_of_more_than_the_cache_holds_says_so_and_exits_3(backend: Backend, mount_factory,
                                                                    dicom: DicomFactory):
    """It said "8/8 files ... ETA done" and exited 0 with most of them pushed out of the cache."""
    insts = dicom.series(8, pixel_bytes=700 * 1024)  # 5.6 MB; the cache holds 4 MiB
    backend.seed(insts)
    m = mount_factory(backend, "--readAhead", "0", "--cacheSize", "4")
    series = backend.series_path(m, insts[0])
    r = run(sys.executable, "-m", "dicomfuse", "prefetch", series, "--threads", "1", "--logDir", m.log_dir)
    assert r.returncode == 3, r.stderr
    assert "8/8 files" in r.stderr
    kept = cached_files(m)
    assert 0 < kept < 8
    assert r.stderr.rstrip().endswith(
        f"dicomfuse prefetch: {8 - kept} of the 8 files read did not stay in the cache (the mount's --cacheSize is too "
        "small, or its --cacheTime shorter than this prefetch took): what did not stay is downloaded again when read")


def test_prefetch_of_a_path_that_is_not_a_folder_is_refused(tmp_path: Path):
    r = run(sys.executable, "-m", "dicomfuse", "prefetch", tmp_path / "missing", "--logDir", tmp_path / "logs")
    assert r.returncode == 2 and "not a folder" in r.stderr


def test_prefetch_of_a_folder_that_is_not_on_a_mount_is_refused(tmp_path: Path):
    """It would read every file below it (and through any mount inside it)."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.dcm").write_bytes(b"not read")
    r = run(sys.executable, "-m", "dicomfuse", "prefetch", tmp_path / "plain", "--logDir", tmp_path / "logs")
    assert r.returncode == 2 and "not on a DICOMFuse mount" in r.stderr, r.stderr


def test_prefetch_mounting_first_with_the_same_flags(backend: Backend, dicom: DicomFactory, tmp_path: Path):
    insts = dicom.series(5)
    backend.seed(insts)
    series = f"{backend.store_name}/{insts[0].study_uid}/{insts[0].series_uid}"
    m = Mount(backend.address, tmp_path / "standalone", *backend.extra_args, "--readAhead", "0", series,
              subcommand=("prefetch",)).start()
    try:
        wait_for(lambda: cached_files(m) == 5, 30, what="the series to be warmed")
        assert backend.instance_path(m, insts[-1]).read_bytes() == insts[-1].path.read_bytes()
    finally:
        m.stop()


def test_a_folder_that_cannot_be_listed_is_named_and_fails_the_prefetch(healthcare, mount_factory, tmp_path: Path,
                                                                          dicom: DicomFactory):
    """A study whose listing keeps failing must not be skipped silently ("6/6 files ... done", exit
    0 while three of them were never read): each such folder is named, and the exit code is 1."""
    from tests.conftest import google_backend

    backend = google_backend(healthcare, tmp_path)
    good, bad = dicom.series(3, study=0), dicom.series(3, study=1)
    backend.seed(good + bad)
    m = mount_factory(backend, "--readAhead", "0")
    store = m.path / backend.store_name
    wait_for(lambda: len(list(store.iterdir())) == 2, 30, what="both studies to be listed")
    broken = store / bad[0].study_uid
    # every search below the second study fails, more often than the mount retries
    for fragment in (f"studies/{bad[0].study_uid}/series", f"studies/{bad[0].study_uid}/instances",
                     "dicomWeb/instances"):
        healthcare.inject(status=500, times=1000, method="GET", path_contains=fragment)
    try:
        r = run(sys.executable, "-m", "dicomfuse", "prefetch", store, "--threads", "4", "--logDir", m.log_dir)
        assert r.returncode == 1, r.stderr
        assert f"dicomfuse prefetch: cannot list {broken}: Input/output error\n" in r.stderr
        assert "3/3 files" in r.stderr
        assert r.stderr.rstrip().endswith(f"1 folder below {store} could not be listed; their instances were not "
                                          "prefetched")
        # the folder itself: said so, not "no instances below"
        r = run(sys.executable, "-m", "dicomfuse", "prefetch", broken, "--logDir", m.log_dir)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == f"dicomfuse prefetch: cannot list {broken}: Input/output error"
    finally:
        healthcare.clear_faults()
