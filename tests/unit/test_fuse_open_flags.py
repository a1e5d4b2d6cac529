"""What the FUSE adapter tells the kernel about each open file, in libfuse's own struct."""

from __future__ import annotations

import pytest

mfusepy = pytest.importorskip("mfusepy")

from dicomfuse.backends.fuse import FuseOperations  # noqa: E402
from dicomfuse.core.vfs import OpenResult  # noqa: E402

HAS_NOFLUSH = any(field[0] == "noflush" for field in mfusepy.fuse_file_info._fields_)


def filled(result: OpenResult) -> object:
    fi = mfusepy.fuse_file_info()
    FuseOperations._fill(fi, result)
    return fi


def test_handle_and_cache_flags_reach_the_struct():
    fi = filled(OpenResult(7, direct_io=True))
    assert (fi.fh, fi.direct_io, fi.keep_cache) == (7, 1, 0)
    fi = filled(OpenResult(8, keep_cache=True))
    assert (fi.fh, fi.direct_io, fi.keep_cache) == (8, 0, 1)


@pytest.mark.skipif(not HAS_NOFLUSH, reason="libfuse < 3.11 has no noflush")
def test_only_handles_the_core_says_need_no_flush_skip_it():
    assert filled(OpenResult(1, no_flush=True)).noflush == 1  # a read-only file: close() costs nothing
    assert filled(OpenResult(2)).noflush == 0  # a file being written: its upload runs at flush


def test_read_only_opens_need_no_flush_and_writes_do(tmp_path):
    from dicomfuse.core.vfs import Vfs, VfsConfig
    from dicomfuse.core.workdirs import WorkDirs
    from dicomfuse.samples import make_uid, write_instance
    from dicomfuse.stores.local import LocalDataset

    (tmp_path / "ds" / "store").mkdir(parents=True)
    vfs = Vfs(LocalDataset(tmp_path / "ds"), VfsConfig(), WorkDirs(tmp_path / "work"))
    vfs.start()
    try:
        study, series, sop = make_uid("f", "st"), make_uid("f", "se"), make_uid("f", "sop")
        write_instance(tmp_path / "a.dcm", study, series, sop)
        created = vfs.create("/store/a.dcm")
        assert not created.no_flush
        vfs.write(created.fh, (tmp_path / "a.dcm").read_bytes(), 0)
        vfs.flush(created.fh)
        vfs.release(created.fh)
        opened = vfs.open(f"/store/{study}/{series}/{sop}.dcm", 0)
        assert opened.no_flush
        vfs.release(opened.fh)
    finally:
        vfs.shutdown()
