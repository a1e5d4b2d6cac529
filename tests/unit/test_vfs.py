"""The Vfs without a mount: the same contract the mounted suite checks, on the bare core."""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicomfuse.core.errors import ENOATTR, FsError
from dicomfuse.core.vfs import Vfs, VfsConfig
from dicomfuse.core.workdirs import WorkDirs
from dicomfuse.dicomfile import DicomUids
from dicomfuse.stores.local import LocalDataset
from tests.conftest import DicomFactory


@pytest.fixture
def dataset(tmp_path: Path) -> LocalDataset:
    (tmp_path / "ds" / "store").mkdir(parents=True)
    return LocalDataset(tmp_path / "ds")


def uids_of(inst: object) -> DicomUids:
    return DicomUids(inst.study_uid, inst.series_uid, inst.sop_uid)  # type: ignore[attr-defined]


def make_vfs(dataset: LocalDataset, tmp_path: Path, **config) -> Vfs:
    vfs = Vfs(dataset, VfsConfig(**config), WorkDirs(tmp_path / "work"))
    vfs.start()
    return vfs


def upload(vfs: Vfs, path: str, data: bytes) -> None:
    fh = vfs.create(path).fh
    try:
        vfs.write(fh, data, 0)
        vfs.flush(fh)
    finally:
        vfs.release(fh)


def read(vfs: Vfs, path: str) -> bytes:
    result = vfs.open(path, os.O_RDONLY)
    out = b""
    while chunk := vfs.read(result.fh, 65536, len(out)):
        out += chunk
    vfs.release(result.fh)
    return out


def errno_of(fn, *args) -> int:
    with pytest.raises(FsError) as e:
        fn(*args)
    return e.value.errno  # type: ignore[return-value]


def on_server(dataset: LocalDataset, dicom: DicomFactory, **kwargs) -> tuple[object, str]:  # type: ignore[no-untyped-def]
    """An instance stored in "store" behind the mount's back, and its path in the mount."""
    inst = dicom.instance(**kwargs)
    dataset.open_store("store").store_files([inst.path])
    return inst, f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"


def test_upload_read_delete(dataset, tmp_path, dicom: DicomFactory):
    vfs = make_vfs(dataset, tmp_path)
    inst = dicom.instance()
    upload(vfs, "/store/any-name.dcm", inst.path.read_bytes())
    target = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    assert vfs.getattr(target).size == inst.path.stat().st_size
    assert read(vfs, target) == inst.path.read_bytes()
    assert vfs.getattr("/store/any-name.dcm").size == inst.path.stat().st_size  # the name written stays valid
    vfs.unlink(target)
    assert errno_of(vfs.getattr, target) == errno.ENOENT
    # Its study held only the file the mount added: the server's listing says it is gone too.
    assert inst.study_uid not in dict(vfs.readdir("/store"))
    vfs.shutdown()


def test_deletion_disabled(dataset, tmp_path, dicom: DicomFactory):
    inst = dicom.instance()
    dataset.open_store("store").store_files([inst.path])
    vfs = make_vfs(dataset, tmp_path, deletion_enabled=False)
    target = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    assert errno_of(vfs.unlink, target) == errno.EPERM
    assert errno_of(vfs.rmdir, "/store") == errno.EPERM
    assert vfs.getattr(target).size > 0
    vfs.shutdown()


def test_deletion_disabled_refuses_renaming_a_store(dataset, tmp_path):
    """Renaming a store deletes the old one: with deletion disabled it is refused, and nothing
    is created or deleted."""
    dataset.create_store("empty")
    vfs = make_vfs(dataset, tmp_path, deletion_enabled=False)
    assert errno_of(vfs.rename, "/empty", "/renamed") == errno.EPERM
    assert sorted(dataset.list_stores()) == ["empty", "store"]
    assert sorted(dict(vfs.readdir("/"))) == ["empty", "store"]
    vfs.shutdown()


def test_refusals(dataset, tmp_path, dicom: DicomFactory):
    inst = dicom.instance()
    dataset.open_store("store").store_files([inst.path])
    vfs = make_vfs(dataset, tmp_path)
    study = f"/store/{inst.study_uid}"
    series = f"{study}/{inst.series_uid}"
    assert errno_of(vfs.mkdir, f"{study}/x") == errno.EPERM
    assert errno_of(vfs.mkdir, f"{series}/x") == errno.EPERM
    assert errno_of(vfs.mkdir, "/bad name") == errno.EINVAL
    assert errno_of(vfs.mkdir, "/store") == errno.EEXIST
    assert errno_of(vfs.create, "/x.dcm") == errno.EPERM
    assert errno_of(vfs.create, f"{study}/x.dcm") == errno.EPERM
    assert errno_of(vfs.rename, series, f"{study}/1.2.3") == errno.EPERM
    assert errno_of(vfs.rmdir, study) == errno.EPERM
    assert errno_of(vfs.rmdir, "/store") == errno.ENOTEMPTY
    assert errno_of(vfs.getattr, "/store/not-a-uid") == errno.ENOENT
    assert errno_of(vfs.getattr, f"{series}/{inst.sop_uid}.dcm/deeper") == errno.ENOENT
    assert errno_of(vfs.truncate, f"{series}/{inst.sop_uid}.dcm", 1) == errno.EPERM
    assert errno_of(vfs.getxattr, series, "user.none") == ENOATTR  # ENODATA on Linux, ENOATTR on macOS
    vfs.shutdown()


def test_bad_upload_keeps_bytes(dataset, tmp_path):
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.create("/store/notes.txt").fh
    vfs.write(fh, b"plain text", 0)
    assert errno_of(vfs.flush, fh) == errno.EINVAL
    vfs.release(fh)
    kept = [p for p in vfs.workdirs.failed.iterdir() if not p.name.endswith(".json")]
    assert [p.read_bytes() for p in kept] == [b"plain text"]
    if sys.platform != "win32":  # no mode bits on Windows: the folder's ACL keeps it private
        assert oct(kept[0].stat().st_mode & 0o777) == oct(0o600)
    vfs.shutdown()


def test_largest_file_is_cachesize_over_4(dataset, tmp_path):
    vfs = make_vfs(dataset, tmp_path, cache_bytes=4 * 1024 * 1024)
    fh = vfs.create("/store/big.dcm").fh
    assert errno_of(vfs.write, fh, b"x" * 10, 1024 * 1024) == errno.EFBIG
    vfs.release(fh)
    vfs.shutdown()


def test_a_copy_whose_write_failed_fails_with_that_error_and_keeps_no_useless_part(dataset, tmp_path,
                                                                                    dicom: DicomFactory,
                                                                                    monkeypatch):
    """A write refused (EFBIG) or failed (a full cache disk: ENOSPC): close() reports that error,
    not "invalid DICOM", and the part written is neither sent nor kept as a failed upload."""
    from dicomfuse.core import portable

    vfs = make_vfs(dataset, tmp_path, cache_bytes=4 * 1024 * 1024)
    data = dicom.instance(pixel_bytes=4096).path.read_bytes()
    fh = vfs.create("/store/big.dcm").fh
    vfs.write(fh, data, 0)
    assert errno_of(vfs.write, fh, b"x" * 10, 1024 * 1024) == errno.EFBIG
    assert errno_of(vfs.flush, fh) == errno.EFBIG
    vfs.release(fh)

    real = portable.pwrite

    def disk_full(fd: int, data: bytes, offset: int) -> int:
        if offset > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(portable, "pwrite", disk_full)
    fh = vfs.create("/store/full.dcm").fh
    vfs.write(fh, data[:100], 0)
    assert errno_of(vfs.write, fh, data[100:], 100) == errno.ENOSPC
    vfs.release(fh)  # no flush: release sends nothing either
    assert list(vfs.spool.failed.iterdir()) == []
    assert list((dataset.root / "store").iterdir()) == []
    assert [p.name for p in vfs.spool.directory.iterdir() if p.is_file()] == []
    vfs.shutdown()


def test_gui_new_folder_becomes_a_store_when_renamed(dataset, tmp_path):
    vfs = make_vfs(dataset, tmp_path)
    vfs.mkdir("/untitled folder")
    assert "untitled folder" in dict(vfs.readdir("/"))
    assert not (tmp_path / "ds" / "untitled folder").exists()
    vfs.rename("/untitled folder", "/study-2024")
    assert (tmp_path / "ds" / "study-2024").is_dir()
    names = dict(vfs.readdir("/"))
    assert "study-2024" in names and "untitled folder" not in names
    vfs.shutdown()


def test_a_folder_renamed_to_a_hidden_name_never_becomes_a_store(dataset, tmp_path):
    """mkdir of a dot-name at the dataset level is refused (EPERM): so is giving one by rename, to
    a store or to a GUI "New folder", which created a hidden store on the server."""
    vfs = make_vfs(dataset, tmp_path)
    vfs.mkdir("/plainx")
    vfs.mkdir("/untitled folder")
    assert errno_of(vfs.mkdir, "/.dotdirect") == errno.EPERM
    assert errno_of(vfs.rename, "/plainx", "/.Spotlight-V100") == errno.EPERM
    assert errno_of(vfs.rename, "/untitled folder", "/.Trashes") == errno.EPERM
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["plainx", "store"]
    assert {"plainx", "untitled folder"} <= set(dict(vfs.readdir("/")))
    vfs.shutdown()


def test_side_files_are_local(dataset, tmp_path):
    vfs = make_vfs(dataset, tmp_path)
    upload(vfs, "/store/.DS_Store", b"finder")
    upload(vfs, "/._x", b"apple double")
    assert read(vfs, "/store/.DS_Store") == b"finder"
    assert ".DS_Store" in dict(vfs.readdir("/store"))
    assert list(dataset.open_store("store").studies()) == []
    vfs.unlink("/store/.DS_Store")
    assert errno_of(vfs.getattr, "/store/.DS_Store") == errno.ENOENT
    vfs.shutdown()


def test_overwrite_refused_keeps_original(dataset, tmp_path, dicom: DicomFactory):
    inst = dicom.instance()
    dataset.open_store("store").store_files([inst.path])
    vfs = make_vfs(dataset, tmp_path)
    target = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    res = vfs.open(target, os.O_WRONLY | os.O_TRUNC)
    vfs.write(res.fh, b"garbage", 0)
    assert errno_of(vfs.flush, res.fh) == errno.EINVAL
    vfs.release(res.fh)
    assert read(vfs, target) == inst.path.read_bytes()
    vfs.shutdown()


def test_side_file_renames(dataset, tmp_path, dicom: DicomFactory):
    vfs = make_vfs(dataset, tmp_path)
    upload(vfs, "/store/.x.swp", b"swap")
    assert errno_of(vfs.rename, "/store/.x.swp", "/store/9.9.9/.x.swp") == errno.ENOENT  # no such folder
    vfs.rename("/store/.x.swp", "/.x.swp")  # another existing folder: still local
    assert read(vfs, "/.x.swp") == b"swap"
    # An editor writes a side name, then gives the file its real name: that is the upload.
    inst = dicom.instance()
    upload(vfs, "/store/.scan.dcm.swp", inst.path.read_bytes())
    assert list(dataset.open_store("store").studies()) == []
    assert errno_of(vfs.rename, "/store/.scan.dcm.swp", "/scan.dcm") == errno.EPERM  # another folder
    vfs.rename("/store/.scan.dcm.swp", "/store/scan.dcm")
    assert list(dataset.open_store("store").studies()) == [inst.study_uid]
    vfs.shutdown()


def test_file_cut_between_elements_is_refused_before_sending(dataset, tmp_path, dicom: DicomFactory):
    """A cut that falls exactly before the pixel data parses cleanly; the core must still refuse
    it (with the same check the local store uses) so no server ever gets a half image."""
    data = dicom.instance(pixel_bytes=8192).path.read_bytes()
    cut = data[: data.rindex(b"\xe0\x7f\x10\x00")]  # up to the (7FE0,0010) Pixel Data tag
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.create("/store/half.dcm").fh
    vfs.write(fh, cut, 0)
    with pytest.raises(FsError) as e:
        vfs.flush(fh)
    assert e.value.errno == errno.EINVAL
    assert "server refused" not in str(e.value) and "truncated" in str(e.value)  # refused locally
    vfs.release(fh)
    assert list(dataset.open_store("store").studies()) == []
    vfs.shutdown()


class SlowWalks:
    """Wraps a local store: its walk blocks until released, and listings are counted."""

    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        import threading

        self.store = store
        self.name = store.name
        self.release = threading.Event()
        self.series_listed = 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.store, name)

    def series(self, study_uid, series_uid=None):  # type: ignore[no-untyped-def]
        self.series_listed += 1
        return self.store.series(study_uid, series_uid)

    def walk(self, study_uid=None):  # type: ignore[no-untyped-def]
        assert self.release.wait(10)
        return self.store.walk(study_uid)


def test_a_slow_store_walk_holds_listings_up_only_for_its_grace(dataset: LocalDataset, tmp_path: Path,
                                                                dicom: DicomFactory):
    import time

    insts = [dicom.instance(study=i) for i in range(6)]
    dataset.open_store("store").store_files([i.path for i in insts])
    slow = SlowWalks(dataset.open_store("store"))
    dataset.open_store = lambda name: slow  # type: ignore[method-assign]
    vfs = make_vfs(dataset, tmp_path, walk_grace=0.3)
    try:
        studies = [name for name, _ in vfs.readdir("/store")]
        for study in studies:  # a tree walk: the third folder starts the store walk, which hangs
            vfs.readdir(f"/store/{study}")
        assert vfs._walking, "the walk is still hanging, yet every folder was listed, one by one"
        assert slow.series_listed == len(studies)
        slow.release.set()
        deadline = time.monotonic() + 5
        while vfs._walking and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not vfs._walking, "the walk finished in the background"
    finally:
        slow.release.set()
        vfs.shutdown()


def test_upper_case_suffix_finds_the_instance_and_lists_it_once(dataset, tmp_path, dicom: DicomFactory):
    vfs = make_vfs(dataset, tmp_path)
    inst = dicom.instance()
    upload(vfs, "/store/x.dcm", inst.path.read_bytes())
    series = f"/store/{inst.study_uid}/{inst.series_uid}"
    assert read(vfs, f"{series}/{inst.sop_uid}.DCM") == inst.path.read_bytes()
    assert [name for name, _ in vfs.readdir(series)] == [f"{inst.sop_uid}.dcm"]


def test_discard_drops_a_file_being_written_without_sending_it(dataset, tmp_path, dicom: DicomFactory):
    vfs = make_vfs(dataset, tmp_path)
    inst = dicom.instance()
    fh = vfs.create("/store/a.dcm").fh
    vfs.write(fh, inst.path.read_bytes(), 0)
    vfs.discard(fh)
    assert "a.dcm" not in dict(vfs.readdir("/store"))
    assert not list(vfs.spool.failed.iterdir()) and not list((tmp_path / "ds" / "store").iterdir())
    assert errno_of(vfs.getattr, "/store/a.dcm") == errno.ENOENT


def test_check_delete_foresees_refusals_and_changes_nothing(dataset, tmp_path, dicom: DicomFactory):
    inst = dicom.instance()
    vfs = make_vfs(dataset, tmp_path)
    upload(vfs, "/store/a.dcm", inst.path.read_bytes())
    target = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    vfs.check_delete(target)  # allowed: nothing raised, and still there
    assert vfs.getattr(target).size == inst.path.stat().st_size
    assert errno_of(vfs.check_delete, f"/store/{inst.study_uid}") == errno.EPERM  # a study cannot go
    assert errno_of(vfs.check_delete, "/store/1.2.3") == errno.ENOENT
    assert errno_of(vfs.check_delete, "/store") == errno.ENOTEMPTY  # asked of the server, one page
    assert errno_of(vfs.check_delete, "/") == errno.EPERM
    vfs.mkdir("/New folder")
    vfs.check_delete("/New folder")
    locked = make_vfs(dataset, tmp_path / "second", deletion_enabled=False)
    assert errno_of(locked.check_delete, target) == errno.EPERM


def test_a_file_whose_values_cannot_be_read_fails_its_copy_cleanly(dataset, tmp_path, dicom: DicomFactory):
    """A value pydicom cannot read (an unknown VR): close() says EINVAL, the handle is closed,
    the bytes are kept in failed/, and the next mount on the same cache starts."""
    data = dicom.instance().path.read_bytes()
    at = data.index(b"\x08\x00\x18\x00UI")
    bad = data[:at + 4] + b"UQ" + data[at + 6:]
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.create("/store/bad.dcm").fh
    vfs.write(fh, bad, 0)
    assert errno_of(vfs.flush, fh) == errno.EINVAL
    vfs.release(fh)
    assert [p.read_bytes() for p in vfs.spool.failed.iterdir() if not p.name.endswith(".json")] == [bad]
    assert not list(vfs.spool.directory.glob("*.part"))
    vfs.shutdown()
    make_vfs(dataset, tmp_path).shutdown()


def test_a_bug_in_the_upload_check_loses_no_bytes_and_no_handle(dataset, tmp_path, dicom: DicomFactory,
                                                                monkeypatch):
    """Should the check raise anything unexpected: release still closes the handle and keeps the
    bytes, and a mount starting over such a leftover file starts."""
    from dicomfuse.core import uploads
    from dicomfuse.core import vfs as vfs_module

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    data = dicom.instance().path.read_bytes()
    vfs = make_vfs(dataset, tmp_path)
    monkeypatch.setattr(vfs_module, "inspect_dicom", broken)
    fh = vfs.create("/store/a.dcm").fh
    vfs.write(fh, data, 0)
    with pytest.raises(RuntimeError):
        vfs.flush(fh)
    vfs.release(fh)
    assert [p.read_bytes() for p in vfs.spool.failed.iterdir() if not p.name.endswith(".json")] == [data]
    assert not list(vfs.spool.directory.glob("*.part"))
    vfs.shutdown()
    orphan = vfs.spool.directory / "99999-1-1.part"  # left by a mount that was killed
    orphan.write_bytes(data)
    monkeypatch.setattr(uploads, "check_upload", broken)
    make_vfs(dataset, tmp_path).shutdown()
    assert orphan.read_bytes() == data  # not understood, so left where it is: never deleted


def test_a_backup_left_by_an_overwrite_the_mount_stopped_in_is_not_kept_as_an_upload(dataset, tmp_path,
                                                                                     dicom: DicomFactory):
    """The server's old copy, read before an overwrite, is not the user's file: after a crash it
    is removed at the next start, while an upload left half-way is kept in failed/."""
    from dicomfuse.core.uploads import BACKUP_SUFFIX, PART_SUFFIX

    vfs = make_vfs(dataset, tmp_path)
    vfs.shutdown()
    data = dicom.instance().path.read_bytes()
    backup = vfs.spool.directory / f"99999-1-1{BACKUP_SUFFIX}"  # left by a mount that was killed
    upload_left = vfs.spool.directory / f"99999-1-2{PART_SUFFIX}"
    backup.write_bytes(data)
    upload_left.write_bytes(data)
    after = make_vfs(dataset, tmp_path)
    assert not backup.exists() and not upload_left.exists()
    assert [p.read_bytes() for p in after.spool.failed.iterdir() if not p.name.endswith(".json")] == [data]
    after.shutdown()


def test_an_overwrite_keeps_the_file_and_its_folders_listed_between_delete_and_store(dataset, tmp_path,
                                                                                    dicom: DicomFactory,
                                                                                    monkeypatch):
    """Overwriting the only instance of a study deletes it first: the server has no such study
    until the new bytes are stored. A listing refreshed in that gap must still show them."""
    from dicomfuse.stores.local import LocalStore

    inst = dicom.instance()
    data = inst.path.read_bytes()
    assert dataset.open_store("store").store_files([inst.path])[0].stored  # on the server already
    vfs = make_vfs(dataset, tmp_path, listing_ttl=0.0)  # every look asks the server again
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    seen: list[object] = []
    real = LocalStore.store_files

    def store_files(self, paths, uids=None):  # type: ignore[no-untyped-def]
        assert not (dataset.root / "store" / inst.study_uid).exists()  # in the gap
        seen.append(vfs.getattr(f"/store/{inst.study_uid}").is_dir)
        seen.append(vfs.getattr(path).is_dir)
        return real(self, paths, uids)

    monkeypatch.setattr(LocalStore, "store_files", store_files)
    upload(vfs, path, data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert seen == [True, False]
    vfs.shutdown()


def test_a_refused_file_is_not_sent_again_unless_it_changes(dataset, tmp_path):
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.create("/store/notes.dcm").fh
    vfs.write(fh, b"not dicom", 0)
    assert errno_of(vfs.flush, fh) == errno.EINVAL
    vfs.flush(fh)  # Windows flushes again at cleanup: the refusal is not repeated
    vfs.release(fh)
    assert len(list(vfs.spool.failed.glob("*notes.dcm"))) == 1


def _failing_once(monkeypatch) -> list[int]:
    """LocalStore.store_files answers one Unavailable (a server error past the retries), then works."""
    from dicomfuse.stores.base import Unavailable
    from dicomfuse.stores.local import LocalStore

    calls: list[int] = []
    real = LocalStore.store_files

    def store_files(self, paths, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(paths))
        if len(calls) == 1:
            raise Unavailable("HTTP 503 (injected)")
        return real(self, paths, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "store_files", store_files)
    return calls


def test_an_upload_close_reported_failed_is_not_sent_behind_the_users_back(dataset, tmp_path,
                                                                          dicom: DicomFactory, monkeypatch):
    """close() said EIO and where the bytes are kept: neither a second flush (Windows' cleanup)
    nor release sends them after all, and they stay listed as failed with their sidecar."""
    calls = _failing_once(monkeypatch)
    vfs = make_vfs(dataset, tmp_path)
    inst = dicom.instance()
    fh = vfs.create("/store/scan.dcm").fh
    vfs.write(fh, inst.path.read_bytes(), 0)
    assert errno_of(vfs.flush, fh) == errno.EIO
    vfs.flush(fh)
    vfs.release(fh)
    assert calls == [1]
    assert not (dataset.root / "store" / inst.study_uid).exists()
    kept = [p for p in vfs.spool.failed.iterdir() if not p.name.endswith(".json")]
    assert [p.read_bytes() for p in kept] == [inst.path.read_bytes()]
    assert (kept[0].parent / (kept[0].name + ".json")).exists()
    vfs.shutdown()


def test_a_failed_upload_written_again_and_sent_is_no_longer_listed_as_failed(dataset, tmp_path,
                                                                            dicom: DicomFactory, monkeypatch):
    _failing_once(monkeypatch)
    vfs = make_vfs(dataset, tmp_path)
    inst = dicom.instance()
    data = inst.path.read_bytes()
    fh = vfs.create("/store/scan.dcm").fh
    vfs.write(fh, data, 0)
    assert errno_of(vfs.flush, fh) == errno.EIO
    vfs.write(fh, data, 0)  # the program writes the file again through the same handle
    vfs.flush(fh)
    vfs.release(fh)
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert stored.read_bytes() == data
    assert list(vfs.spool.failed.iterdir()) == []
    vfs.shutdown()


def test_a_file_closed_empty_is_a_local_placeholder_until_written(dataset, tmp_path, dicom: DicomFactory):
    vfs = make_vfs(dataset, tmp_path)
    vfs.release(vfs.create("/store/IMG1.dcm").fh)  # Finder's and Explorer's first step of a copy
    assert dict(vfs.readdir("/store"))["IMG1.dcm"].size == 0
    assert not list((tmp_path / "ds" / "store").iterdir()) and not list(vfs.spool.failed.iterdir())
    inst = dicom.instance()
    fh = vfs.open("/store/IMG1.dcm", os.O_WRONLY | os.O_TRUNC).fh
    vfs.write(fh, inst.path.read_bytes(), 0)
    vfs.flush(fh)
    vfs.release(fh)
    target = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    assert read(vfs, target) == inst.path.read_bytes()
    vfs.release(vfs.create("/store/IMG2.dcm").fh)
    vfs.rename("/store/IMG2.dcm", "/store/IMG3.dcm")  # renamed: still a placeholder, nothing sent
    vfs.unlink("/store/IMG3.dcm")
    assert "IMG3.dcm" not in dict(vfs.readdir("/store"))


def test_rename_without_replace_keeps_an_existing_target(dataset, tmp_path):
    vfs = make_vfs(dataset, tmp_path)
    for name in ("._a", "._b"):
        fh = vfs.create(f"/store/{name}").fh
        vfs.write(fh, name.encode(), 0)
        vfs.release(fh)
    assert errno_of(lambda: vfs.rename("/store/._a", "/store/._b", replace=False)) == errno.EEXIST
    vfs.rename("/store/._a", "/store/._c", replace=False)
    assert set(dict(vfs.readdir("/store"))) == {"._b", "._c"}


def test_hidden_system_folders_never_become_stores(dataset, tmp_path):
    vfs = make_vfs(dataset, tmp_path)
    for name in (".DocumentRevisions-V100", ".Trashes", ".anything"):
        assert errno_of(vfs.mkdir, f"/{name}") == errno.EPERM
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["store"]


def test_rm_of_a_file_still_being_written_sends_nothing(dataset, tmp_path, dicom: DicomFactory):
    """WinFsp's FUSE layer deletes at Cleanup, before Close flushes: a cancelled copy."""
    vfs = make_vfs(dataset, tmp_path)
    inst = dicom.instance()
    fh = vfs.create("/store/a.dcm").fh
    vfs.write(fh, inst.path.read_bytes()[:1000], 0)
    vfs.unlink("/store/a.dcm")
    vfs.write(fh, inst.path.read_bytes()[1000:], 1000)  # the program still writes: it goes nowhere
    vfs.flush(fh)
    vfs.release(fh)
    assert not list((tmp_path / "ds" / "store").iterdir()) and not list(vfs.spool.failed.iterdir())
    assert "a.dcm" not in dict(vfs.readdir("/store"))


@pytest.mark.parametrize("mode", ["sync", "writeback"])
def test_the_uids_read_at_close_go_to_the_store_with_the_file(dataset, tmp_path, dicom: DicomFactory,
                                                               monkeypatch, mode):
    """Every file is parsed once, at close: the store is given its UIDs (a DICOMweb store then
    sends it without parsing it again)."""
    from dicomfuse.stores.local import LocalStore

    given: list[object] = []
    real = LocalStore.store_files

    def store_files(self, paths, uids=None):  # type: ignore[no-untyped-def]
        given.append(uids)
        return real(self, paths, uids)

    monkeypatch.setattr(LocalStore, "store_files", store_files)
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode)
    inst = dicom.instance()
    upload(vfs, "/store/a.dcm", inst.path.read_bytes())
    if vfs.writeback is not None:
        assert vfs.writeback.wait_idle(10)
    assert given == [[uids_of(inst)]]
    vfs.shutdown()


def test_a_queued_file_cannot_be_changed_through_the_handle_that_queued_it(dataset, tmp_path,
                                                                        dicom: DicomFactory):
    """fsync queues the file, and the handle's fd is then the queued bytes (shared with the
    cache): neither write nor ftruncate may change them; a new open may."""
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert vfs.writeback is not None
    inst = dicom.instance()
    data = inst.path.read_bytes()
    fh = vfs.create("/store/a.dcm").fh
    vfs.write(fh, data, 0)
    vfs.fsync(fh)
    assert errno_of(vfs.truncate, "/store/a.dcm", len(data) // 2, fh) == errno.EIO
    assert errno_of(vfs.write, fh, b"x", 0) == errno.EIO
    vfs.release(fh)
    assert vfs.writeback.wait_idle(10)
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert stored.read_bytes() == data
    assert read(vfs, f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm") == data
    vfs.shutdown()


def test_a_queued_file_this_computer_cannot_read_for_a_moment_is_sent_later(dataset, tmp_path, dicom: DicomFactory,
                                                                             monkeypatch):
    """No file descriptor left while a batch was being sent: the whole batch went to failed/ for
    good (cp had succeeded), as if the server had refused it. It is sent again later now."""
    from dicomfuse.stores.base import LocalReadError

    store_class = type(dataset.open_store("store"))
    store_files = store_class.store_files
    calls: list[int] = []

    def short_of_fds(self, paths, uids=None):  # type: ignore[no-untyped-def]
        calls.append(len(paths))
        if len(calls) <= 3:  # longer than the attempts a refusing server gets
            raise LocalReadError("cannot read 1.dcm while sending it (Too many open files)")
        return store_files(self, paths, uids)

    monkeypatch.setattr(store_class, "store_files", short_of_fds)
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert vfs.writeback is not None
    vfs.writeback.backoff_base = vfs.writeback.backoff_max = 0.05
    vfs.writeback.max_attempts = 2
    inst = dicom.instance()
    upload(vfs, "/store/a.dcm", inst.path.read_bytes())
    assert vfs.writeback.wait_idle(10)
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert stored.read_bytes() == inst.path.read_bytes() and len(calls) == 4
    assert not vfs.writeback.failed()
    vfs.shutdown()


@pytest.mark.parametrize("mode", ["sync", "writeback"])
def test_a_valid_file_the_mount_cannot_read_to_check_is_not_called_bad_dicom(dataset, tmp_path, dicom: DicomFactory,
                                                                             monkeypatch, mode: str):
    """No file descriptor left at close(): cp said "Invalid argument", the errno for a file that
    is not DICOM, and the log called the file refused. The system's errno now, bytes kept."""
    from dicomfuse import dicomfile

    def exhausted(path):  # type: ignore[no-untyped-def]
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(dicomfile, "_read_if_small", exhausted)
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode)
    inst = dicom.instance()
    fh = vfs.create("/store/a.dcm").fh
    vfs.write(fh, inst.path.read_bytes(), 0)
    assert errno_of(vfs.flush, fh) == errno.EMFILE
    vfs.release(fh)
    kept = [p for p in (tmp_path / "work").rglob("failed/*") if not p.name.endswith(".json")]
    assert [p.read_bytes() for p in kept] == [inst.path.read_bytes()]
    vfs.shutdown()


def test_an_upload_the_cache_cannot_take_leaves_no_unconfirmed_file(dataset, tmp_path, dicom: DicomFactory,
                                                                     monkeypatch):
    """The cache folder on another disk, or read-only: the stored upload's spool file stayed, and
    dicomfuse status then said the server may not have it (exit 1)."""
    vfs = make_vfs(dataset, tmp_path)

    def elsewhere(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(vfs.cache, "adopt", elsewhere)
    inst = dicom.instance()
    upload(vfs, "/store/a.dcm", inst.path.read_bytes())
    assert (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").exists()
    assert [p.name for p in (tmp_path / "work" / "spool").iterdir() if p.is_file()] == []
    vfs.shutdown()


def test_an_upload_that_finds_the_disk_full_makes_cached_copies_nobody_reads_go(dataset, tmp_path,
                                                                                dicom: DicomFactory, monkeypatch):
    """cp into the mount failed with ENOSPC while the disk was full of the mount's own cached
    copies, none of them open: they give way to the upload now (ones being read stay)."""
    from dicomfuse.core import portable

    read_inst, read_path = on_server(dataset, dicom)
    open_inst, open_path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path)
    assert read(vfs, read_path) == read_inst.path.read_bytes()  # cached, then closed
    held = vfs.open(open_path, os.O_RDONLY).fh
    assert vfs.read(held, 1 << 20, 0) == open_inst.path.read_bytes()  # cached and open
    cached = _cache_files(tmp_path)
    assert len(cached) == 2
    full = {"disk": True}
    monkeypatch.setattr(vfs.cache, "_free_bytes", lambda: 0 if full["disk"] else 1 << 40)
    pwrite = portable.pwrite

    def on_a_full_disk(fd, data, offset):  # type: ignore[no-untyped-def]
        if full["disk"] and len(_cache_files(tmp_path)) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        full["disk"] = False
        return pwrite(fd, data, offset)

    monkeypatch.setattr(portable, "pwrite", on_a_full_disk)
    inst = dicom.instance()
    upload(vfs, "/store/new.dcm", inst.path.read_bytes())
    assert (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").exists()
    assert vfs.read(held, 1 << 20, 0) == open_inst.path.read_bytes()  # the open one stayed
    vfs.release(held)
    vfs.shutdown()


def test_a_cached_copy_deleted_behind_the_mount_is_downloaded_again(dataset, tmp_path, dicom: DicomFactory):
    """The cache folder removed while mounted: a copy cached before read ENOENT until its cache
    time ended (300 s by default)."""
    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path)
    assert read(vfs, path) == inst.path.read_bytes()
    for cached in _cache_files(tmp_path):
        cached.unlink()
    assert read(vfs, path) == inst.path.read_bytes()
    assert read(vfs, path) == inst.path.read_bytes()
    vfs.shutdown()


def test_a_failed_rm_leaves_the_queued_upload_queued(dataset, tmp_path, dicom: DicomFactory, monkeypatch):
    """rm answers EIO when the server cannot delete: then nothing changed, and the copy waiting
    in the write-back queue is still sent (it was dropped before the server was asked)."""
    from dicomfuse.stores.base import Unavailable
    from dicomfuse.stores.local import LocalStore

    vfs = Vfs(dataset, VfsConfig(upload_mode="writeback"), WorkDirs(tmp_path / "work"))  # not started: nothing sent
    assert vfs.writeback is not None
    inst = dicom.instance()
    data = inst.path.read_bytes()
    upload(vfs, "/store/a.dcm", data)
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"

    def down(self, *args: object) -> None:
        raise Unavailable("HTTP 503 (injected)")

    monkeypatch.setattr(LocalStore, "delete_instance", down)
    assert errno_of(vfs.unlink, path) == errno.EIO
    assert vfs.writeback.has_pending("store", uids_of(inst))
    assert read(vfs, path) == data
    vfs.shutdown()


def test_rm_succeeds_when_the_server_has_already_deleted_the_instance(dataset, tmp_path, dicom: DicomFactory,
                                                                      monkeypatch):
    """A DELETE whose answer was lost is retried and finds nothing: the instance is gone, which
    is what rm asked for; it must not say ENOENT and leave the file listed."""
    from dicomfuse.stores.base import NotFound
    from dicomfuse.stores.local import LocalStore

    inst = dicom.instance()
    assert dataset.open_store("store").store_files([inst.path])[0].stored
    real = LocalStore.delete_instance

    def lost_answer(self, *args: str) -> None:
        real(self, *args)
        raise NotFound("HTTP 404 on the retry (injected)")

    monkeypatch.setattr(LocalStore, "delete_instance", lost_answer)
    vfs = make_vfs(dataset, tmp_path)
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    vfs.getattr(path)
    vfs.unlink(path)
    assert errno_of(vfs.getattr, path) == errno.ENOENT
    assert f"{inst.sop_uid}.dcm" not in dict(vfs.readdir(f"/store/{inst.study_uid}/{inst.series_uid}"))
    vfs.shutdown()


def test_rm_of_an_instance_drops_the_names_it_was_written_under(dataset, tmp_path, dicom: DicomFactory):
    """cp B over A.dcm stores B and deletes A; the name A.dcm then stands for B until B goes."""
    a, b = dicom.series(2)
    assert dataset.open_store("store").store_files([a.path])[0].stored
    vfs = make_vfs(dataset, tmp_path)
    series = f"/store/{a.study_uid}/{a.series_uid}"
    upload(vfs, f"{series}/{a.sop_uid}.dcm", b.path.read_bytes())
    assert vfs.getattr(f"{series}/{a.sop_uid}.dcm").size == b.path.stat().st_size
    vfs.unlink(f"{series}/{b.sop_uid}.dcm")
    assert errno_of(vfs.getattr, f"{series}/{a.sop_uid}.dcm") == errno.ENOENT
    vfs.shutdown()


def _held_sends(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """LocalStore.store_files waits for ``release`` (``sending`` is set while it waits)."""
    from dicomfuse.stores.local import LocalStore

    sending, release = threading.Event(), threading.Event()
    real = LocalStore.store_files

    def store_files(self, paths, uids=None):  # type: ignore[no-untyped-def]
        sending.set()
        assert release.wait(10)
        return real(self, paths, uids)

    monkeypatch.setattr(LocalStore, "store_files", store_files)
    return sending, release


def _uploading(dataset, tmp_path, dicom: DicomFactory, monkeypatch):  # type: ignore[no-untyped-def]
    """A write-back Vfs whose upload of one instance (copied in as /store/a.dcm) is being sent
    and held there: (vfs, instance, its bytes, the event that lets the send go on)."""
    sending, release = _held_sends(monkeypatch)
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert vfs.writeback is not None
    inst = dicom.instance()
    data = inst.path.read_bytes()
    upload(vfs, "/store/a.dcm", data)
    assert sending.wait(10)
    return vfs, inst, data, release


@pytest.mark.parametrize("newer_queued", [False, True])
def test_rm_of_a_file_whose_upload_is_being_sent_deletes_it_once_stored(dataset, tmp_path, dicom: DicomFactory,
                                                                        monkeypatch, newer_queued: bool):
    """rm succeeds at once; the copy being sent cannot be stopped, so it is deleted from the
    server when the server confirms it (a newer copy still queued is simply dropped)."""
    vfs, inst, data, release = _uploading(dataset, tmp_path, dicom, monkeypatch)
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    if newer_queued:
        upload(vfs, "/store/again.dcm", data[:-1] + bytes([data[-1] ^ 0xFF]))
    vfs.unlink(path)
    assert errno_of(vfs.getattr, path) == errno.ENOENT
    release.set()
    assert vfs.writeback.wait_idle(10)
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert not stored.exists()
    assert errno_of(vfs.getattr, path) == errno.ENOENT
    vfs.shutdown()


def test_a_file_written_again_after_rm_during_its_upload_stays(dataset, tmp_path, dicom: DicomFactory, monkeypatch):
    vfs, inst, data, release = _uploading(dataset, tmp_path, dicom, monkeypatch)
    vfs.unlink(f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm")
    upload(vfs, "/store/b.dcm", data)  # copied in again: it must stay
    release.set()
    assert vfs.writeback.wait_idle(10)
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert stored.read_bytes() == data
    vfs.shutdown()


def test_write_back_fsync_puts_the_queued_file_on_disk_and_close_alone_does_not_wait(
        dataset, tmp_path, dicom: DicomFactory, monkeypatch):
    """cp (no fsync): close() queues the file and the queue fsyncs it in a group moments later;
    a program that calls fsync() gets it on disk before fsync() returns."""
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    queue = vfs.writeback
    assert queue is not None
    submits: list[bool] = []
    syncs: list[int] = []
    real_submit, real_sync = queue.submit, queue.sync

    def submit(*args, durable: bool = True, **kwargs):
        submits.append(durable)
        return real_submit(*args, durable=durable, **kwargs)

    def sync() -> None:
        syncs.append(1)
        real_sync()

    monkeypatch.setattr(queue, "submit", submit)
    monkeypatch.setattr(queue, "sync", sync)
    first, second, third = (dicom.instance() for _ in range(3))

    upload(vfs, "/store/a.dcm", first.path.read_bytes())  # write, flush, close: what cp does
    assert submits == [False] and syncs == []

    fh = vfs.create("/store/b.dcm").fh  # write, fsync, close
    vfs.write(fh, second.path.read_bytes(), 0)
    vfs.fsync(fh)
    vfs.release(fh)
    assert submits == [False, True] and syncs == [1]  # and what a flush queued meanwhile

    fh = vfs.create("/store/c.dcm").fh  # write, close() (flush), then fsync of the queued file
    vfs.write(fh, third.path.read_bytes(), 0)
    vfs.flush(fh)
    vfs.fsync(fh)
    vfs.release(fh)
    assert submits == [False, True, False] and syncs == [1, 1]

    # sync FILE: fsync through a read-only handle of a file queued earlier
    target = f"/store/{third.study_uid}/{third.series_uid}/{third.sop_uid}.dcm"
    fh = vfs.open(target, os.O_RDONLY).fh
    vfs.fsync(fh)
    vfs.release(fh)
    assert syncs == [1, 1, 1]
    vfs.shutdown()
    for inst in (first, second, third):
        assert (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").exists()


def test_a_refused_upload_is_on_disk_before_it_is_kept(dataset, tmp_path, monkeypatch):
    """Sync mode sends without fsync (the server has the file when close() returns); bytes it
    refused may be the only copy, so they are fsynced as they are kept."""
    from dicomfuse.core import portable

    fsynced: list[Path] = []
    real = portable.fsync_path
    monkeypatch.setattr(portable, "fsync_path", lambda path, **kw: (fsynced.append(Path(path)), real(path))[1])
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.create("/store/notes.txt").fh
    vfs.write(fh, b"plain text", 0)
    spool = vfs._handle(fh).spool_path
    assert errno_of(vfs.flush, fh) == errno.EINVAL
    vfs.release(fh)
    assert spool in fsynced
    vfs.shutdown()


@pytest.mark.parametrize("mode", ["sync", "writeback"])
def test_an_overwrite_reaches_the_server(dataset, tmp_path, dicom: DicomFactory, mode):
    """The copy kept to put back if the server refuses the new bytes comes from the server: in
    write-back mode the cache already holds the queued new bytes, and a backup made of them had
    the overwrite end as "identical, nothing to do" with the old instance left on the server."""
    from dicomfuse.samples import write_instance

    inst = dicom.instance()
    dataset.open_store("store").store_files([inst.path])
    newer = tmp_path / "newer.dcm"
    write_instance(newer, inst.study_uid, inst.series_uid, inst.sop_uid, pixel_bytes=4096, patient_name="OTHER^NAME")
    assert newer.read_bytes() != inst.path.read_bytes()
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode)
    target = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    assert read(vfs, target) == inst.path.read_bytes()  # cached, as a viewer would have it
    fh = vfs.open(target, os.O_WRONLY | os.O_TRUNC).fh
    vfs.write(fh, newer.read_bytes(), 0)
    vfs.flush(fh)
    vfs.release(fh)
    assert read(vfs, target) == newer.read_bytes()
    vfs.shutdown()  # write-back: drains the queue
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert stored.read_bytes() == newer.read_bytes(), "the server still holds the old instance"


def test_a_refused_copy_does_not_hide_a_newer_copy_still_queued(dataset, tmp_path, dicom: DicomFactory):
    """Write-back: the server refuses a copy while a newer copy of the same file waits its turn;
    the file stays in its folder with the newer bytes, and the newer copy lands."""
    import threading

    from dicomfuse.samples import write_instance

    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    queue = vfs.writeback
    assert queue is not None
    inst = dicom.instance()
    newer = tmp_path / "newer.dcm"
    write_instance(newer, inst.study_uid, inst.series_uid, inst.sop_uid, pixel_bytes=4096, patient_name="OTHER^NAME")
    real_send = queue._send_batch
    first_in_flight, release = threading.Event(), threading.Event()
    calls = []

    def send_batch(store, items):
        calls.append(len(calls))
        if len(calls) == 1:
            first_in_flight.set()
            assert release.wait(5)
            return [(item, False, "refused by the server") for item in items]
        return real_send(store, items)

    queue._send_batch = send_batch
    upload(vfs, "/store/first.dcm", inst.path.read_bytes())
    assert first_in_flight.wait(5)
    upload(vfs, "/store/second.dcm", newer.read_bytes())  # waits: the older copy is being sent
    release.set()
    assert queue.wait_idle(10)
    series = f"/store/{inst.study_uid}/{inst.series_uid}"
    assert f"{inst.sop_uid}.dcm" in [name for name, _ in vfs.readdir(series)]
    assert read(vfs, f"{series}/{inst.sop_uid}.dcm") == newer.read_bytes()
    vfs.shutdown()
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert stored.read_bytes() == newer.read_bytes()


@pytest.mark.parametrize("mode", ["sync", "writeback"])
@pytest.mark.parametrize("other_on_server", [False, True])
def test_another_instance_written_over_a_name_replaces_the_instance_of_that_name(dataset, tmp_path,
                                                                                dicom: DicomFactory,
                                                                                other_on_server, mode):
    """cp B.dcm onto A's name: the name holds B and A is deleted, whether the server held B
    already or not (it was kept when B was there already)."""
    a, b = dicom.series(2)
    store = dataset.open_store("store")
    store.store_files([a.path, *([b.path] if other_on_server else [])])
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode)
    name_a = f"/store/{a.study_uid}/{a.series_uid}/{a.sop_uid}.dcm"
    fh = vfs.open(name_a, os.O_WRONLY | os.O_TRUNC).fh
    vfs.write(fh, b.path.read_bytes(), 0)
    vfs.flush(fh)
    vfs.release(fh)
    assert read(vfs, name_a) == b.path.read_bytes()
    vfs.shutdown()  # write-back: drains the queue
    on_server = {i.sop_uid for i in store.instances(a.study_uid, a.series_uid)}
    assert on_server == {b.sop_uid}


def test_truncating_an_instance_is_refused_and_leaves_it_unchanged(dataset, tmp_path, dicom: DicomFactory):
    """truncate -s N (open without O_TRUNC, then ftruncate) is EPERM; truncate -s 0 (the way
    WinFsp and macFUSE start a replacement, so not refused at once) is EPERM at close, and no
    empty file is kept as a failed upload."""
    inst, name = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.open(name, os.O_WRONLY).fh
    assert errno_of(vfs.truncate, name, 10, fh) == errno.EPERM
    vfs.release(fh)
    fh = vfs.open(name, os.O_WRONLY).fh
    vfs.truncate(name, 0, fh)
    assert errno_of(vfs.flush, fh) == errno.EPERM
    vfs.release(fh)
    assert list(vfs.spool.failed.iterdir()) == []
    assert read(vfs, name) == inst.path.read_bytes()
    vfs.shutdown()


def test_setxattr_honours_create_and_replace(dataset, tmp_path):
    vfs = make_vfs(dataset, tmp_path)
    assert errno_of(lambda: vfs.setxattr("/store", "user.tag", b"1", replace=True)) == ENOATTR
    vfs.setxattr("/store", "user.tag", b"1", create=True)
    assert errno_of(lambda: vfs.setxattr("/store", "user.tag", b"2", create=True)) == errno.EEXIST
    vfs.setxattr("/store", "user.tag", b"3", replace=True)
    assert vfs.getxattr("/store", "user.tag") == b"3"
    vfs.shutdown()


def test_an_instance_says_whether_the_cache_holds_it(dataset, tmp_path, dicom: DicomFactory):
    """``user.dicomfuse.cached``: how ``dicomfuse prefetch`` learns which files stayed. Read-only,
    and not listed (cp -a would copy it)."""
    from dicomfuse.core.vfs import CACHED_XATTR

    insts = dicom.series(7, pixel_bytes=400 * 1024)  # a 2 MiB cache holds 5 of them
    dataset.open_store("store").store_files([i.path for i in insts])
    vfs = make_vfs(dataset, tmp_path, cache_bytes=2 * 1024 * 1024, read_ahead=0)
    names = [f"/store/{i.study_uid}/{i.series_uid}/{i.sop_uid}.dcm" for i in insts]
    assert [vfs.getxattr(n, CACHED_XATTR) for n in names] == [b"no"] * 7  # asking does not fetch
    read(vfs, names[0])
    assert vfs.getxattr(names[0], CACHED_XATTR) == b"yes"
    for name in names[1:]:
        read(vfs, name)
    assert [vfs.getxattr(n, CACHED_XATTR) for n in names] == [b"no"] * 2 + [b"yes"] * 5  # the first pushed out
    assert CACHED_XATTR not in vfs.listxattr(names[-1])
    assert errno_of(lambda: vfs.setxattr(names[0], CACHED_XATTR, b"yes")) == errno.EPERM
    assert errno_of(vfs.getxattr, f"/store/{insts[0].study_uid}", CACHED_XATTR) == ENOATTR  # a folder
    assert errno_of(vfs.getxattr, names[0] + ".gone", CACHED_XATTR) == errno.ENOENT
    vfs.shutdown()


def test_a_reader_that_stopped_at_the_old_size_before_the_download_ended_is_warned_about(
        dataset, tmp_path, dicom: DicomFactory, caplog, monkeypatch):
    """The instance grew on the server after it was listed; the OS stops its reader at the listed
    size, and a quick reader (cp) closed while the rest was still arriving: the warning that its
    copy may be incomplete was only given if the download had ended by the close."""
    import threading

    from dicomfuse.samples import write_instance
    from tests.mounting import wait_for

    inst = dicom.instance(pixel_bytes=2000)
    dataset.open_store("store").store_files([inst.path])
    store_class = type(dataset.open_store("store"))
    vfs = make_vfs(dataset, tmp_path)
    series = f"/store/{inst.study_uid}/{inst.series_uid}"
    name = f"{inst.sop_uid}.dcm"
    listed = dict(vfs.readdir(series))[name].size
    bigger = write_instance(tmp_path / "bigger.dcm", inst.study_uid, inst.series_uid, inst.sop_uid, pixel_bytes=9000)
    whole = bigger.read_bytes()
    rest = threading.Event()

    def slow(self, study, series_uid, sop, sink):  # type: ignore[no-untyped-def]
        sink.write(whole[:listed])
        rest.wait(5)
        sink.write(whole[listed:])
        return len(whole)

    monkeypatch.setattr(store_class, "retrieve", slow)
    fh = vfs.open(f"{series}/{name}", os.O_RDONLY).fh
    assert vfs.read(fh, listed, 0) == whole[:listed]  # the OS asks no further than the listed size
    vfs.release(fh)
    assert "changed on the server since it was listed" not in caplog.text
    rest.set()
    wait_for(lambda: "changed on the server since it was listed" in caplog.text, 5, what="the warning")
    vfs.shutdown()


def test_an_instance_replaced_on_the_server_after_it_was_listed_shows_its_new_size(dataset, tmp_path,
                                                                                  dicom: DicomFactory, caplog):
    """Another client replaced the instance (same UIDs, other size) after this mount listed
    it: once its bytes are read, stat and listings show their size (reads come from them), and
    the log says a copy made meanwhile may be incomplete."""
    from dicomfuse.samples import write_instance

    inst = dicom.instance(pixel_bytes=2000)
    dataset.open_store("store").store_files([inst.path])
    vfs = make_vfs(dataset, tmp_path)
    series = f"/store/{inst.study_uid}/{inst.series_uid}"
    name = f"{inst.sop_uid}.dcm"
    assert dict(vfs.readdir(series))[name].size == inst.path.stat().st_size
    bigger = write_instance(tmp_path / "bigger.dcm", inst.study_uid, inst.series_uid, inst.sop_uid, pixel_bytes=9000)
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / name
    stored.write_bytes(bigger.read_bytes())  # replaced behind the mount's back
    assert read(vfs, f"{series}/{name}") == bigger.read_bytes()
    assert vfs.getattr(f"{series}/{name}").size == len(bigger.read_bytes())
    assert dict(vfs.readdir(series))[name].size == len(bigger.read_bytes())
    assert "changed on the server since it was listed" in caplog.text
    vfs.shutdown()


def test_an_open_file_removed_meanwhile_keeps_its_size_for_its_reader(dataset, tmp_path, dicom: DicomFactory):
    """libfuse (hard_remove) asks the attributes of an open, removed file by handle with no path."""
    inst, name = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.open(name, os.O_RDONLY).fh
    data = inst.path.read_bytes()
    assert vfs.read(fh, 100, 0) == data[:100]
    vfs.unlink(name)
    assert vfs.getattr(None, fh).size == len(data)  # type: ignore[arg-type]
    assert vfs.read(fh, len(data), 0) == data
    vfs.release(fh)
    assert errno_of(vfs.getattr, None) == errno.ENOENT
    vfs.shutdown()


def queued_upload(dataset: LocalDataset, tmp_path: Path, dicom: DicomFactory):  # type: ignore[no-untyped-def]
    """A write-back Vfs with one upload held in its queue (sent only at the drain)."""
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    queue = vfs.writeback
    assert queue is not None
    queue.settle = queue.max_settle = 60.0
    inst = dicom.instance()
    upload(vfs, "/store/a.dcm", inst.path.read_bytes())
    return vfs, queue, inst


def test_rm_of_a_file_waiting_in_the_write_back_queue_cancels_its_upload(dataset, tmp_path, dicom: DicomFactory):
    """The copy is queued, not sent yet: rm removes it from its folder and from the queue, and
    it never reaches the server (it was sent anyway, and rm said 'No such file')."""
    vfs, queue, inst = queued_upload(dataset, tmp_path, dicom)
    name = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    assert queue.has_pending("store", uids_of(inst))
    vfs.unlink(name)
    assert errno_of(vfs.getattr, name) == errno.ENOENT
    assert not queue.has_pending("store", uids_of(inst)) and queue.pending() == []
    vfs.shutdown()  # drains the queue
    assert not (dataset.root / "store" / inst.study_uid).exists()
    assert not list(vfs.spool.failed.iterdir())


def test_a_queued_file_reads_back_from_the_queue_when_the_cache_dropped_it(dataset, tmp_path, dicom: DicomFactory):
    """Write-back: the cache shares the queued bytes, but a small cache may evict them before
    the upload; the file still reads (from the queue's copy), not ENOENT from the server."""
    vfs, queue, inst = queued_upload(dataset, tmp_path, dicom)
    name = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    vfs.cache.evict(("store", inst.study_uid, inst.series_uid, inst.sop_uid))
    assert read(vfs, name) == inst.path.read_bytes()
    vfs.shutdown()


def test_a_folder_the_server_cannot_list_is_an_error_though_it_holds_queued_files(dataset, tmp_path,
                                                                                 dicom: DicomFactory, monkeypatch):
    """Server down: a folder holding files copied in through the mount was listed with only those
    files, and no error. A listing that looks complete but is not misleads tools: rsync --delete
    run from inside such a folder emptied a mirror of it. Now the listing fails (EIO), and the
    queued files still answer by name: stat, open and read."""
    from dicomfuse.stores.base import Unavailable
    from dicomfuse.stores.local import LocalStore

    vfs, _, inst = queued_upload(dataset, tmp_path, dicom)

    def down(*args, **kwargs):
        raise Unavailable("connection refused")

    for method in ("studies", "series", "instances", "walk"):
        monkeypatch.setattr(LocalStore, method, down)
    series = f"/store/{inst.study_uid}/{inst.series_uid}"
    for folder in (f"/store/{inst.study_uid}", series, "/store/1.2.3"):
        assert errno_of(vfs.readdir, folder) == errno.EIO, folder
    name = f"{series}/{inst.sop_uid}.dcm"
    assert vfs.getattr(name).size == inst.path.stat().st_size
    assert read(vfs, name) == inst.path.read_bytes()
    monkeypatch.undo()
    vfs.shutdown()


def test_a_file_queued_longer_than_the_overlay_lasts_stays_in_its_folders(dataset, tmp_path, dicom: DicomFactory,
                                                                          monkeypatch):
    """Write-back: a file copied in stays listed (with its study and series) for as long as its
    upload is not over, however long that takes (it vanished once the listings' overlay expired,
    while still queued); once stored, it stays listed while the server's index may lag."""
    from dicomfuse.stores.local import LocalStore

    vfs, inst, data, release = _uploading(dataset, tmp_path, dicom, monkeypatch)
    now = [time.monotonic()]
    monkeypatch.setattr(vfs.listings, "_clock", lambda: now[0])
    study, series = f"/store/{inst.study_uid}", f"/store/{inst.study_uid}/{inst.series_uid}"
    name = f"{inst.sop_uid}.dcm"

    def listed() -> bool:
        return (inst.study_uid in dict(vfs.readdir("/store")) and inst.series_uid in dict(vfs.readdir(study))
                and name in dict(vfs.readdir(series)))

    vfs.readdir(series)  # the server's listing, cached: it does not have the file yet
    now[0] += 10 * vfs.listings.overlay_ttl
    assert listed()
    assert vfs.getattr(f"{series}/{name}").size == len(data)
    assert read(vfs, f"{series}/{name}") == data
    # A lagging index (Google's) does not list it yet when the upload is confirmed.
    for method in ("studies", "series", "instances"):
        monkeypatch.setattr(LocalStore, method, lambda *args, **kwargs: iter(()))
    release.set()
    assert vfs.writeback is not None and vfs.writeback.wait_idle(10)
    assert (dataset.root / "store" / inst.study_uid / inst.series_uid / name).exists()
    now[0] += vfs.listings.overlay_ttl / 2
    assert listed()
    vfs.shutdown()


def test_uploads_an_earlier_run_left_queued_show_in_their_folders(dataset, tmp_path, dicom: DicomFactory,
                                                                  monkeypatch):
    """A mount stopped (or killed) with uploads queued: at the next start they are in their
    folders again and read back, while they wait to be sent."""
    vfs, queue, inst = queued_upload(dataset, tmp_path, dicom)
    queue.stop(drain=False)
    vfs.shutdown()
    assert not (dataset.root / "store" / inst.study_uid).exists()
    sending, release = _held_sends(monkeypatch)
    again = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert sending.wait(10)  # being sent again, held there
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    assert inst.study_uid in dict(again.readdir("/store"))
    assert f"{inst.sop_uid}.dcm" in dict(again.readdir(f"/store/{inst.study_uid}/{inst.series_uid}"))
    assert read(again, path) == inst.path.read_bytes()
    release.set()
    assert again.writeback is not None and again.writeback.wait_idle(10)
    again.shutdown()


def test_a_file_queued_by_a_flush_reads_back_before_its_writer_closes_it(dataset, tmp_path, dicom: DicomFactory):
    """Write-back: a flush (or fsync) queues the file and moves its bytes into the queue while
    the writer still holds it open; a reader opening it meanwhile gets those bytes, not ENOENT."""
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert vfs.writeback is not None
    vfs.writeback.settle = vfs.writeback.max_settle = 60.0  # held in the queue
    on_server(dataset, dicom)  # its series exists: the file is written under its own name there
    inst = dicom.instance()
    data = inst.path.read_bytes()
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    fh = vfs.create(path).fh
    vfs.write(fh, data, 0)
    vfs.flush(fh)
    assert vfs.writeback.has_pending("store", uids_of(inst))
    assert read(vfs, path) == data
    vfs.cache.evict(("store", inst.study_uid, inst.series_uid, inst.sop_uid))
    assert read(vfs, path) == data  # from the queue's copy
    vfs.release(fh)
    assert read(vfs, path) == data
    vfs.shutdown()


def test_a_file_removed_while_its_upload_was_sent_stays_removed_after_a_failed_send_and_a_restart(
        dataset, tmp_path, dicom: DicomFactory, monkeypatch):
    """rm while the upload is being sent; that send fails and the mount stops before the retry.
    The next start sends the journaled upload again: it must delete it once stored, not bring
    the removed file back."""
    from dicomfuse.stores.base import Unavailable
    from dicomfuse.stores.local import LocalStore

    sending, release = threading.Event(), threading.Event()

    def failing(self, paths, uids=None):  # type: ignore[no-untyped-def]
        sending.set()
        assert release.wait(10)
        raise Unavailable("connection reset")

    monkeypatch.setattr(LocalStore, "store_files", failing)
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback", drain_timeout=0.5)
    inst = dicom.instance()
    upload(vfs, "/store/a.dcm", inst.path.read_bytes())
    assert sending.wait(10)
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    vfs.unlink(path)
    release.set()
    vfs.shutdown()
    monkeypatch.undo()
    again = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert errno_of(again.getattr, path) == errno.ENOENT  # not listed while it waits to be sent
    assert again.writeback is not None and again.writeback.wait_idle(10)
    assert not (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").exists()
    assert errno_of(again.getattr, path) == errno.ENOENT
    again.shutdown()


def test_two_copies_of_one_instance_closed_at_once_leave_the_server_with_the_bytes_the_mount_shows(
        dataset, tmp_path, dicom: DicomFactory, monkeypatch):
    """Sync mode, two programs copy different bytes of the same instance at the same time. A
    server like Orthanc keeps the first copy it gets and answers "stored" to the second. Both
    uploads found no instance and both sent: the server kept one, the mount showed the other.
    One instance's uploads go one at a time: the second is an overwrite of the first."""
    from dicomfuse.stores.base import StowOutcome
    from dicomfuse.stores.local import LocalStore

    on_server(dataset, dicom)  # the series exists
    inst = dicom.instance()
    first = inst.path.read_bytes()
    second = first[:-1] + bytes([first[-1] ^ 0xFF])
    both_sending = threading.Barrier(2, timeout=1)
    real = LocalStore.store_files

    def keeps_the_first(self, paths, uids=None):  # type: ignore[no-untyped-def]
        data = Path(paths[0]).read_bytes()
        try:
            both_sending.wait()
        except threading.BrokenBarrierError:
            pass  # one at a time
        if data == second:
            time.sleep(0.1)  # the other copy reaches the server first
        target = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
        if target.exists():
            return [StowOutcome(Path(paths[0]), True, inst.study_uid, inst.series_uid, inst.sop_uid)]
        return real(self, paths, uids)

    monkeypatch.setattr(LocalStore, "store_files", keeps_the_first)
    vfs = make_vfs(dataset, tmp_path)
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    errors: list[BaseException] = []

    def copy(data: bytes, name: str) -> None:
        try:
            upload(vfs, f"/store/{inst.study_uid}/{inst.series_uid}/{name}", data)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=copy, args=(data, name))
               for data, name in ((first, f"{inst.sop_uid}.dcm"), (second, "other.dcm"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    stored = (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").read_bytes()
    assert read(vfs, path) == stored
    vfs.shutdown()


@pytest.mark.parametrize("mode", ["sync", "writeback"])
def test_a_copy_made_while_an_rm_of_the_same_instance_runs_is_neither_hidden_nor_lost(
        dataset, tmp_path, dicom: DicomFactory, monkeypatch, mode: str):
    """rm's DELETE is done but its answer is slow; meanwhile the file is copied back in. The
    copy reached the server, yet the rm, ending after it, hid it from the mount (found by a bug
    hunt). rm and uploads of one instance now go one after the other."""
    from dicomfuse.stores.local import LocalStore

    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode)
    assert vfs.getattr(path).size == inst.path.stat().st_size
    deleted, answer = threading.Event(), threading.Event()
    real = LocalStore.delete_instance

    def slow_answer(self, *args):  # type: ignore[no-untyped-def]
        real(self, *args)
        deleted.set()
        assert answer.wait(10)

    monkeypatch.setattr(LocalStore, "delete_instance", slow_answer)
    rm = threading.Thread(target=vfs.unlink, args=(path,))
    rm.start()
    assert deleted.wait(10)
    cp = threading.Thread(target=upload, args=(vfs, "/store/again.dcm", inst.path.read_bytes()))
    cp.start()
    time.sleep(0.2)  # the copy goes as far as it can while the rm waits for its answer
    answer.set()
    rm.join(10)
    cp.join(10)
    if vfs.writeback is not None:
        assert vfs.writeback.wait_idle(10)
    on_disk = (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").exists()
    assert on_disk and vfs.getattr(path).size == inst.path.stat().st_size
    vfs.shutdown()


def write_over(vfs: Vfs, path: str, data: bytes, *, truncate: bool = True) -> None:
    """Open an existing name for writing (as cp over it does) and write ``data``."""
    fh = vfs.open(path, os.O_WRONLY | (os.O_TRUNC if truncate else 0)).fh
    try:
        vfs.write(fh, data, 0)
        vfs.flush(fh)
    finally:
        vfs.release(fh)


@pytest.mark.parametrize("mode", ["sync", "writeback"])
def test_an_instance_copied_back_over_its_own_name_gets_it_back_and_the_other_stays(
        dataset, tmp_path, dicom: DicomFactory, mode):
    """cp B.dcm A.dcm (A deleted, the name stands for B), then A restored from a backup with
    cp A.dcm series/: A is stored and reads under its name, and B, never touched, stays."""
    a, b = dicom.series(2)
    store = dataset.open_store("store")
    store.store_files([a.path, b.path])
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode)
    name_a = f"/store/{a.study_uid}/{a.series_uid}/{a.sop_uid}.dcm"
    name_b = f"/store/{a.study_uid}/{a.series_uid}/{b.sop_uid}.dcm"
    write_over(vfs, name_a, b.path.read_bytes())
    if vfs.writeback is not None:
        assert vfs.writeback.wait_idle(10)
    write_over(vfs, name_a, a.path.read_bytes())
    if vfs.writeback is not None:
        assert vfs.writeback.wait_idle(10)
    assert read(vfs, name_a) == a.path.read_bytes()
    assert read(vfs, name_b) == b.path.read_bytes()
    assert {i.sop_uid for i in store.instances(a.study_uid, a.series_uid)} == {a.sop_uid, b.sop_uid}
    vfs.shutdown()


@pytest.mark.parametrize("mode", ["sync", "writeback"])
def test_deletion_disabled_refuses_another_instance_written_over_a_name(dataset, tmp_path, dicom: DicomFactory,
                                                                         mode):
    """It would delete the instance of that name: EPERM at close, nothing sent, the name keeps
    reading its own instance (it read the other one, and cp said it copied)."""
    a, b = dicom.series(2)
    store = dataset.open_store("store")
    store.store_files([a.path])
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode, deletion_enabled=False)
    name_a = f"/store/{a.study_uid}/{a.series_uid}/{a.sop_uid}.dcm"
    assert errno_of(write_over, vfs, name_a, b.path.read_bytes()) == errno.EPERM
    assert read(vfs, name_a) == a.path.read_bytes()
    vfs.shutdown()
    assert {i.sop_uid for i in store.instances(a.study_uid, a.series_uid)} == {a.sop_uid}
    assert len(list(vfs.spool.failed.glob("*.dcm"))) == 1  # the bytes are kept


def test_write_back_with_deletion_disabled_refuses_a_changed_instance_at_close(dataset, tmp_path,
                                                                               dicom: DicomFactory):
    """Not later in the background, behind the program's back; an unchanged rewrite is fine."""
    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback", deletion_enabled=False)
    data = inst.path.read_bytes()
    assert read(vfs, path) == data
    write_over(vfs, path, data, truncate=False)  # the same bytes: nothing to delete
    changed = data[:-1] + bytes([data[-1] ^ 0xFF])
    assert errno_of(lambda: write_over(vfs, path, changed, truncate=False)) == errno.EPERM
    assert vfs.writeback is not None and vfs.writeback.wait_idle(10)
    assert vfs.writeback.failed() == []  # the refused one never reached the queue
    vfs.shutdown()
    assert (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").read_bytes() == data


@pytest.mark.parametrize("deletion", [True, False])
def test_rm_of_a_name_a_file_was_copied_in_as_deletes_its_instance(dataset, tmp_path, dicom: DicomFactory,
                                                                     deletion):
    """cp x.dcm store/ then rm store/x.dcm: the name stands for the instance (it reads it); rm
    said it removed it and did nothing. It deletes it (EPERM when deletion is disabled)."""
    inst = dicom.instance()
    vfs = make_vfs(dataset, tmp_path, deletion_enabled=deletion)
    upload(vfs, "/store/x.dcm", inst.path.read_bytes())
    stored = dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert stored.exists()
    if not deletion:
        assert errno_of(vfs.unlink, "/store/x.dcm") == errno.EPERM
        assert stored.exists() and read(vfs, "/store/x.dcm") == inst.path.read_bytes()
        return
    vfs.unlink("/store/x.dcm")
    assert not stored.exists()
    assert errno_of(vfs.getattr, "/store/x.dcm") == errno.ENOENT
    assert errno_of(vfs.getattr, f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm") == errno.ENOENT
    vfs.shutdown()


def test_rm_of_an_instance_just_copied_in_under_another_name_is_refused(dataset, tmp_path, dicom: DicomFactory):
    """rsync -a --delete-after of files named IM0000.dcm...: the names it wrote are never listed,
    so it removes every <UID>.dcm it sees as extraneous: the instances it just copied in. Such
    an rm is EBUSY. rm of the name written undoes the copy: it stored nothing new (the instance
    was there), so the name goes and the instance stays; then the instance can be removed."""
    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path)
    series = path.rsplit("/", 1)[0]
    upload(vfs, f"{series}/IM0000.dcm", inst.path.read_bytes())  # identical: nothing sent
    assert errno_of(vfs.unlink, path) == errno.EBUSY
    assert vfs.getattr(path).size == inst.path.stat().st_size
    vfs.unlink(f"{series}/IM0000.dcm")
    assert errno_of(vfs.getattr, f"{series}/IM0000.dcm") == errno.ENOENT
    assert vfs.getattr(path).size == inst.path.stat().st_size
    vfs.unlink(path)
    assert errno_of(vfs.getattr, path) == errno.ENOENT
    vfs.shutdown()


def test_write_back_editor_save_through_a_temporary_name_succeeds(dataset, tmp_path, dicom: DicomFactory):
    """GIO editors write .goutputstream-XXXX, then rename it over the file: the rename failed
    with ENOENT in write-back mode although the new bytes were queued."""
    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    series = path.rsplit("/", 1)[0]
    data = inst.path.read_bytes()
    changed = data[:-1] + bytes([data[-1] ^ 0xFF])
    upload(vfs, f"{series}/.goutputstream-AB12", changed)
    vfs.rename(f"{series}/.goutputstream-AB12", path)
    assert read(vfs, path) == changed
    assert errno_of(vfs.getattr, f"{series}/.goutputstream-AB12") == errno.ENOENT
    assert vfs.writeback is not None and vfs.writeback.wait_idle(10)
    assert (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").read_bytes() == changed
    vfs.shutdown()


def test_truncating_an_instance_to_its_own_size_changes_nothing_and_succeeds(dataset, tmp_path,
                                                                              dicom: DicomFactory):
    """rsync --inplace of an unchanged file ftruncates it to its size: no error."""
    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path)
    size = inst.path.stat().st_size
    fh = vfs.open(path, os.O_WRONLY).fh
    vfs.truncate(path, size, fh)
    assert errno_of(vfs.truncate, path, size - 1, fh) == errno.EPERM
    vfs.flush(fh)
    vfs.release(fh)
    assert read(vfs, path) == inst.path.read_bytes()
    vfs.shutdown()


def test_a_refused_emptying_shows_the_instance_at_its_size_again_at_once(dataset, tmp_path, dicom: DicomFactory):
    """truncate -s 0 X.dcm fails at close (an instance cannot be emptied); the name must not
    go on showing the empty file until its writer is released, and the OS is told."""
    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path)
    told: list[str] = []
    vfs.notify_changed = told.append
    fh = vfs.open(path, os.O_WRONLY | os.O_TRUNC).fh
    assert errno_of(vfs.flush, fh) == errno.EPERM
    assert vfs.getattr(path).size == inst.path.stat().st_size
    assert path in told
    vfs.release(fh)
    vfs.shutdown()


def test_a_stopping_mount_leaves_no_spool_copy_of_an_upload_the_server_confirmed(dataset, tmp_path,
                                                                                 dicom: DicomFactory):
    """SIGTERM while a program still holds a file it copied in (stored at its flush): the spool
    copy was left behind and the next start reported it as a failed upload."""
    inst = dicom.instance()
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.create("/store/x.dcm").fh
    vfs.write(fh, inst.path.read_bytes(), 0)
    vfs.flush(fh)
    handle = vfs._handles[fh]
    vfs.shutdown()  # before the release
    assert not handle.spool_path.exists()


def test_a_store_emptied_of_what_this_mount_copied_in_can_be_removed_at_once(dataset, tmp_path,
                                                                             dicom: DicomFactory):
    """mkdir scratch, cp a file in, rm it: rmdir scratch waited 15 s then said ENOTEMPTY for
    a minute, for the study folder the copy had shown."""
    inst = dicom.instance()
    vfs = make_vfs(dataset, tmp_path)
    vfs.mkdir("/scratch")
    upload(vfs, "/scratch/x.dcm", inst.path.read_bytes())
    vfs.unlink(f"/scratch/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm")
    vfs.rmdir("/scratch")
    assert not (dataset.root / "scratch").exists()
    vfs.shutdown()


def test_a_writer_handle_closed_while_a_stat_runs_gives_its_last_size(dataset, tmp_path, dicom: DicomFactory):
    """The OS sends release while another thread may stat the file through the same handle."""
    inst = dicom.instance()
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.create("/store/x.dcm").fh
    vfs.write(fh, inst.path.read_bytes(), 0)
    handle = vfs._handles[fh]
    vfs.release(fh)
    assert handle.size == inst.path.stat().st_size
    vfs.shutdown()


def test_times_given_to_files_are_shown_while_mounted(dataset, tmp_path, dicom: DicomFactory):
    """cp -p and rsync -a set the source's time on what they wrote (rsync on its temporary
    name, then renames it): the instance shows it, so the next rsync -a sees it unchanged.
    A file copied in without one shows when it was copied; the others, the mount's start."""
    vfs = make_vfs(dataset, tmp_path)
    stored, stored_path = on_server(dataset, dicom)
    assert vfs.getattr(stored_path).mtime == vfs.mounted_at
    a, b, c = dicom.instance(), dicom.instance(), dicom.instance()

    def name(inst) -> str:  # type: ignore[no-untyped-def]
        return f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"

    fh = vfs.create("/store/a.dcm").fh  # cp -p: the time is set on the open file, before close
    vfs.write(fh, a.path.read_bytes(), 0)
    vfs.set_times("/store/a.dcm", 1_000_000_000.0)
    vfs.flush(fh)
    vfs.release(fh)
    assert vfs.getattr(name(a)).mtime == 1_000_000_000.0
    assert vfs.getattr("/store/a.dcm").mtime == 1_000_000_000.0
    upload(vfs, f"{stored_path.rsplit('/', 1)[0]}/.b.dcm.Xy12", b.path.read_bytes())  # rsync's temporary name
    vfs.set_times(f"{stored_path.rsplit('/', 1)[0]}/.b.dcm.Xy12", 1_100_000_000.0)
    vfs.rename(f"{stored_path.rsplit('/', 1)[0]}/.b.dcm.Xy12", f"{stored_path.rsplit('/', 1)[0]}/b.dcm")
    assert vfs.getattr(name(b)).mtime == 1_100_000_000.0
    before = time.time()
    upload(vfs, "/store/c.dcm", c.path.read_bytes())
    assert vfs.getattr(name(c)).mtime >= before
    vfs.set_times(stored_path, 1_200_000_000.0)  # touch -d
    vfs.set_times(stored_path, None)  # touch -a: the modification time is left alone
    listed = dict(vfs.readdir(stored_path.rsplit("/", 1)[0]))
    assert listed[stored_path.rsplit("/", 1)[1]].mtime == 1_200_000_000.0
    vfs.unlink(stored_path)
    upload(vfs, "/store/again.dcm", stored.path.read_bytes())
    assert vfs.getattr(stored_path).mtime >= before  # copied in anew: not the removed file's time
    vfs.shutdown()


def _same_uids_other_bytes(inst, tmp_path: Path, pixel_bytes: int = 9000) -> bytes:  # type: ignore[no-untyped-def]
    from dicomfuse.samples import write_instance

    path = tmp_path / f"other-{inst.sop_uid}.dcm"
    write_instance(path, inst.study_uid, inst.series_uid, inst.sop_uid, pixel_bytes=pixel_bytes)
    return path.read_bytes()


def test_write_back_a_name_given_back_is_not_deleted_by_the_copy_it_replaced(dataset, tmp_path,
                                                                            dicom: DicomFactory):
    """cp B.dcm A.dcm, then A back over A.dcm, both still queued: when B was confirmed, A was
    deleted as "replaced by B", though it had been written again since."""
    a, b = dicom.series(2)
    store = dataset.open_store("store")
    store.store_files([a.path])
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert vfs.writeback is not None
    vfs.writeback.settle = vfs.writeback.max_settle = 60.0  # both wait for the drain
    name_a = f"/store/{a.study_uid}/{a.series_uid}/{a.sop_uid}.dcm"
    write_over(vfs, name_a, b.path.read_bytes())
    write_over(vfs, name_a, a.path.read_bytes())
    vfs.shutdown()
    assert {i.sop_uid for i in store.instances(a.study_uid, a.series_uid)} == {a.sop_uid, b.sop_uid}


def test_write_back_a_removed_copy_over_a_name_replaces_nothing_later(dataset, tmp_path, dicom: DicomFactory):
    """cp B.dcm A.dcm then rm A.dcm (B dropped from the queue); a later, unrelated copy of B
    deleted A when it was confirmed."""
    a, b = dicom.series(2)
    store = dataset.open_store("store")
    store.store_files([a.path])
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert vfs.writeback is not None
    vfs.writeback.settle = vfs.writeback.max_settle = 60.0
    name_a = f"/store/{a.study_uid}/{a.series_uid}/{a.sop_uid}.dcm"
    write_over(vfs, name_a, b.path.read_bytes())
    vfs.unlink(name_a)
    upload(vfs, "/store/b.dcm", b.path.read_bytes())
    vfs.shutdown()
    assert b.sop_uid in {i.sop_uid for i in store.instances(a.study_uid, a.series_uid)}
    assert a.sop_uid in {i.sop_uid for i in store.instances(a.study_uid, a.series_uid)}


@pytest.mark.parametrize("mode", ["sync", "writeback"])
def test_rm_of_a_name_whose_copy_stored_nothing_new_leaves_the_instance(dataset, tmp_path, dicom: DicomFactory,
                                                                         mode):
    """cp series/X.dcm store/keep.dcm; rm store/keep.dcm deleted X. So did rsync removing its
    temporary name after an identical re-send was interrupted, or after a refused rename."""
    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode)
    assert read(vfs, path) == inst.path.read_bytes()
    upload(vfs, "/store/keep.dcm", inst.path.read_bytes())
    if vfs.writeback is not None:
        assert vfs.writeback.wait_idle(10)
    vfs.unlink("/store/keep.dcm")
    assert errno_of(vfs.getattr, "/store/keep.dcm") == errno.ENOENT
    assert vfs.getattr(path).size == inst.path.stat().st_size
    vfs.shutdown()
    assert (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").exists()


def test_a_name_copied_in_shows_its_instance_as_it_is_now(dataset, tmp_path, dicom: DicomFactory):
    """cp X store/scan.dcm, then X overwritten (bigger) through its own name: scan.dcm kept the
    old size, and reads through it were cut at it with no error. Gone on the server: ENOENT."""
    inst = dicom.instance()
    vfs = make_vfs(dataset, tmp_path)
    upload(vfs, "/store/scan.dcm", inst.path.read_bytes())
    path = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    bigger = _same_uids_other_bytes(inst, tmp_path, pixel_bytes=inst.path.stat().st_size * 3)
    write_over(vfs, path, bigger)
    assert vfs.getattr("/store/scan.dcm").size == len(bigger)
    assert read(vfs, "/store/scan.dcm") == bigger
    dataset.open_store("store").delete_instance(inst.study_uid, inst.series_uid, inst.sop_uid)  # another client
    vfs.cache.evict(("store", inst.study_uid, inst.series_uid, inst.sop_uid))
    vfs.listings = type(vfs.listings)(0.0, keep=vfs.listings.keep)  # its listings have expired
    assert errno_of(vfs.getattr, "/store/scan.dcm") == errno.ENOENT
    vfs.shutdown()


def test_write_back_with_deletion_disabled_compares_with_the_server_not_only_the_cache(
        dataset, tmp_path, dicom: DicomFactory):
    """The same bytes copied over an instance never read are accepted (they were EPERM); other
    bytes of it under any name are EPERM at close (a new name was accepted, then refused later)."""
    inst, path = on_server(dataset, dicom)
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback", deletion_enabled=False)
    write_over(vfs, path, inst.path.read_bytes())  # not read before: nothing cached
    changed = _same_uids_other_bytes(inst, tmp_path)
    assert errno_of(lambda: upload(vfs, "/store/changed.dcm", changed)) == errno.EPERM
    assert errno_of(lambda: upload(vfs, f"{path.rsplit('/', 1)[0]}/IM0001.dcm", changed)) == errno.EPERM
    assert vfs.writeback is not None and vfs.writeback.wait_idle(10)
    assert vfs.writeback.failed() == []
    vfs.shutdown()
    assert (dataset.root / "store" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm").read_bytes() == \
        inst.path.read_bytes()


def test_the_alias_table_keeps_each_instances_names_in_step():
    from dicomfuse.core.paths import DicomPath
    from dicomfuse.core.vfs import Alias, _AliasTable
    from dicomfuse.dicomfile import DicomUids

    table = _AliasTable()
    a, b = DicomUids("1.1", "1.2", "1.3"), DicomUids("1.1", "1.2", "1.4")
    x, y = DicomPath.parse("/s/x.dcm"), DicomPath.parse("/s/y.dcm")
    table[x] = Alias(a, 1, 0.0)
    table[y] = Alias(a, 1, 0.0)
    assert table.names_of("s", "1.3") == [x, y]
    table[x] = Alias(b, 1, 0.0)  # the name now stands for another instance
    assert table.names_of("s", "1.3") == [y] and table.names_of("s", "1.4") == [x]
    del table[y]
    assert table.pop(x, None) is not None and table.pop(x, None) is None
    assert table.names_of("s", "1.3") == [] and table.names_of("s", "1.4") == [] and not table._names


@pytest.mark.parametrize("told", [True, False])
def test_an_instance_listed_without_size_bypasses_the_page_cache_only_if_the_os_keeps_size_0(
        dataset, tmp_path, dicom: DicomFactory, monkeypatch, told: bool):
    """A server that lists no sizes: the OS took size 0 from a stat. The open learns the true
    size; once the OS is told, its page cache serves the reads (and programs can map the file:
    mmap of a direct_io file fails with ENODEV). Only if it cannot be told must reads bypass it,
    or they would stop at 0."""
    inst, path = on_server(dataset, dicom)
    store_class = type(dataset.open_store("store"))
    listed = store_class.instances
    monkeypatch.setattr(store_class, "instances", lambda self, *args: iter(
        [dataclasses.replace(info, size=None) for info in listed(self, *args)]))
    vfs = make_vfs(dataset, tmp_path)
    told_paths: list[str] = []
    vfs.notify_changed = lambda p: told_paths.append(p) is None and told
    assert vfs.readdir(os.path.dirname(path))  # listed without a size
    opened = vfs.open(path, os.O_RDONLY)
    assert path in told_paths
    assert opened.direct_io is not told
    assert vfs.read(opened.fh, 1 << 20, 0) == inst.path.read_bytes()
    vfs.release(opened.fh)
    vfs.shutdown()


@pytest.mark.parametrize("mode", ["sync", "writeback"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_an_upload_the_server_stores_altered_reads_as_the_server_keeps_it(
        dataset, tmp_path, dicom: DicomFactory, monkeypatch, mode: str, existing: bool):
    """A server may change an instance it stores and say so (STOW WarningReason 0xB000, as
    dcm4chee's attribute coercion): reads must give its copy, not the bytes sent, which the
    mount kept as the cached copy."""
    inst, path = on_server(dataset, dicom) if existing else (dicom.instance(), None)
    store_class = type(dataset.open_store("store"))
    stored = store_class.store_files

    def coercing(self, paths, uids=None):  # type: ignore[no-untyped-def]
        coerced = []
        for source in paths:
            ds = pydicom.dcmread(source)
            ds.InstitutionName = "CHANGED BY THE SERVER"
            ds.save_as(tmp_path / "coerced.dcm", enforce_file_format=True)
            coerced.append(tmp_path / "coerced.dcm")
        return [dataclasses.replace(outcome, path=source, altered=outcome.stored)
                for source, outcome in zip(paths, stored(self, coerced), strict=True)]

    monkeypatch.setattr(store_class, "store_files", coercing)
    vfs = make_vfs(dataset, tmp_path, upload_mode=mode)
    target = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    if existing:
        assert read(vfs, target) == inst.path.read_bytes()  # cached, as a copy out leaves it
    new = inst.path.read_bytes() if not existing else _changed(inst.path, tmp_path)
    upload(vfs, target if existing else "/store/new.dcm", new)
    if vfs.writeback is not None:
        assert vfs.writeback.wait_idle(10)
    on_disk = dataset.open_store("store")
    server_copy = io.BytesIO()
    on_disk.retrieve(inst.study_uid, inst.series_uid, inst.sop_uid, server_copy)
    assert b"CHANGED BY THE SERVER" in server_copy.getvalue()
    assert read(vfs, target) == server_copy.getvalue()
    assert vfs.getattr(target).size == len(server_copy.getvalue())
    vfs.shutdown()


def _changed(path: Path, tmp_path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    ds.StudyDescription = "edited"
    ds.save_as(tmp_path / "edited.dcm", enforce_file_format=True)
    return (tmp_path / "edited.dcm").read_bytes()


def test_an_overwrite_with_no_room_for_the_previous_version_fails_cleanly(dataset, tmp_path, dicom: DicomFactory,
                                                                          monkeypatch, caplog):
    """The disk has no room for the copy of the instance an overwrite keeps until the new one is
    stored: ENOSPC at close, one ERROR line, the bytes kept with that reason; not 'failed
    unexpectedly' with a traceback, and not a second attempt at release."""
    inst, path = on_server(dataset, dicom)
    store_class = type(dataset.open_store("store"))
    calls = []

    def full_disk(self, study, series, sop, sink):  # type: ignore[no-untyped-def]
        calls.append(sop)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_class, "retrieve", full_disk)
    vfs = make_vfs(dataset, tmp_path)
    fh = vfs.open(path, os.O_WRONLY | os.O_TRUNC).fh
    vfs.write(fh, _changed(inst.path, tmp_path), 0)
    with caplog.at_level("DEBUG"):
        assert errno_of(vfs.flush, fh) == errno.ENOSPC
        vfs.release(fh)
    assert len(calls) == 1
    assert not [r for r in caplog.records if "unexpected" in r.getMessage() or r.exc_info]
    [kept] = [p for p in (tmp_path / "work").rglob("failed/*") if not p.name.endswith(".json")]
    assert kept.read_bytes() == _changed(inst.path, tmp_path)
    monkeypatch.undo()
    assert read(vfs, path) == inst.path.read_bytes()
    vfs.shutdown()


def test_write_back_with_a_full_disk_at_the_journal_is_enospc_and_leaves_no_half_record(
        dataset, tmp_path, dicom: DicomFactory, monkeypatch):
    from dicomfuse.core.writeback import WriteBackQueue

    def full(self, record, item, *, durable):  # type: ignore[no-untyped-def]
        record.write_bytes(b"")  # created, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WriteBackQueue, "_write_new_record", full)
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    inst = dicom.instance()
    fh = vfs.create("/store/new.dcm").fh
    vfs.write(fh, inst.path.read_bytes(), 0)
    assert errno_of(vfs.flush, fh) == errno.ENOSPC
    vfs.release(fh)
    assert vfs.writeback is not None
    assert [p.name for p in vfs.writeback.directory.glob("*.json")] == ["status.json"]
    kept = [p for p in (tmp_path / "work").rglob("failed/*") if not p.name.endswith(".json")]
    assert [p.read_bytes() for p in kept] == [inst.path.read_bytes()]
    vfs.shutdown()


def _sizes_unlisted(dataset: LocalDataset, monkeypatch) -> type:  # type: ignore[no-untyped-def]
    store_class = type(dataset.open_store("store"))
    listed = store_class.instances
    monkeypatch.setattr(store_class, "instances", lambda self, *args: iter(
        [dataclasses.replace(info, size=None) for info in listed(self, *args)]))
    return store_class


def test_a_stat_waits_for_an_unknown_size_as_long_as_its_bytes_keep_arriving(dataset, tmp_path,
                                                                              dicom: DicomFactory, monkeypatch):
    """tar archives exactly the size its stat saw, and never opens a file of size 0: a stat that
    gave up on a download still arriving (a large file on a slow link) had tar archive it empty.
    A stall (nothing arriving) still ends the wait."""
    inst, path = on_server(dataset, dicom, pixel_bytes=50_000)
    stalled, stalled_path = on_server(dataset, dicom, pixel_bytes=50_000)
    store_class = _sizes_unlisted(dataset, monkeypatch)
    whole = inst.path.read_bytes()
    assert len(stalled.path.read_bytes()) == len(whole)

    def slow(self, study, series, sop, sink):  # type: ignore[no-untyped-def]
        if sop == stalled.sop_uid:
            time.sleep(0.8)  # nothing for longer than the wait (0.5 s), though less than two of them
        step = len(whole) // 6 + 1
        for start in range(0, len(whole), step):  # 6 chunks, 0.15 s apart: 0.9 s in all
            time.sleep(0.15)
            sink.write(whole[start:start + step])
        return len(whole)

    monkeypatch.setattr(store_class, "retrieve", slow)
    vfs = make_vfs(dataset, tmp_path, stat_fetch_timeout=0.5, instance_ttl=0)
    assert vfs.getattr(path, caller=100).size == len(whole)  # 0.9 s > 0.5 s, but never 0.5 s without a byte
    waits: list[int] = []
    wait = vfs._wait_while_arriving
    monkeypatch.setattr(vfs, "_wait_while_arriving", lambda *args: waits.append(1) or wait(*args))
    assert vfs.getattr(stalled_path, caller=200).size == 0  # a stall: given up, size unknown
    # The kernel's LOOKUP then GETATTR of one stat: the second does not wait all over again.
    assert vfs.getattr(stalled_path, caller=200).size == 0
    assert waits == [1]
    vfs.shutdown()


def test_cache_time_zero_downloads_once_for_cps_stat_then_open(dataset, tmp_path, dicom: DicomFactory, monkeypatch):
    """cp stats an instance of unknown size (which fetches it to learn its size), then opens it:
    with an instance cache time of 0 the open downloaded it a second time."""
    inst, path = on_server(dataset, dicom)
    store_class = _sizes_unlisted(dataset, monkeypatch)
    fetched: list[str] = []
    retrieve = store_class.retrieve
    monkeypatch.setattr(store_class, "retrieve",
                        lambda self, *args: fetched.append(args[2]) or retrieve(self, *args))
    vfs = make_vfs(dataset, tmp_path, instance_ttl=0)
    whole = inst.path.read_bytes()
    assert vfs.getattr(path, caller=100).size == len(whole)
    assert read(vfs, path) == whole and fetched == [inst.sop_uid]
    assert read(vfs, path) == whole and len(fetched) == 2, "opened again: cache time 0, asked again"
    assert _cache_files(tmp_path) == []
    vfs.shutdown()


def test_an_instance_of_unknown_size_too_large_to_read_is_not_shown_empty(dataset, tmp_path,
                                                                         dicom: DicomFactory, monkeypatch):
    """Shown as 0, tar archived it empty and exited 0 (it never opens a file of size 0); shown
    at least as large as the largest readable file, it is opened, and the open says EFBIG."""
    inst, path = on_server(dataset, dicom, pixel_bytes=1_500_000)
    _sizes_unlisted(dataset, monkeypatch)
    vfs = make_vfs(dataset, tmp_path, cache_bytes=4 * 1024 * 1024)  # the largest readable file: 1 MiB
    for caller in (100, 100, None):  # the stat that found it too large, then every later one
        assert vfs.getattr(path, caller=caller).size == 1024 * 1024 + 1
    assert errno_of(vfs.open, path, os.O_RDONLY) == errno.EFBIG
    vfs.shutdown()


def _cache_files(tmp_path: Path) -> list[Path]:
    return [f for f in (tmp_path / "work").rglob("*") if f.is_file() and "cache" in f.parts and f.stat().st_size]


def _open_cache_fds(tmp_path: Path) -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [link for link in links if link.startswith(str(tmp_path / "work")) and not link.endswith("mount.lock")]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_an_unsized_instance_too_large_to_read_fails_its_open_keeping_nothing(dataset, tmp_path,
                                                                               dicom: DicomFactory, monkeypatch):
    """Opened without a stat first (cat of a path): EFBIG, and neither the partial download nor
    its file handle stays behind. Each open left cacheSize/4 of patient data on disk, pinned
    (so never counted or removed) until unmount, and a file descriptor open."""
    inst, path = on_server(dataset, dicom, pixel_bytes=1_500_000)
    _sizes_unlisted(dataset, monkeypatch)
    vfs = make_vfs(dataset, tmp_path, cache_bytes=4 * 1024 * 1024)
    for _ in range(3):
        assert errno_of(vfs.open, path, os.O_RDONLY) == errno.EFBIG
    assert _cache_files(tmp_path) == [] and _open_cache_fds(tmp_path) == []
    vfs.shutdown()


def test_an_instance_of_known_size_too_large_to_read_is_refused_at_open(dataset, tmp_path, dicom: DicomFactory):
    """Not at its first read: numpy.memmap of it returned, and its first page killed the
    program with SIGBUS."""
    inst, path = on_server(dataset, dicom, pixel_bytes=1_500_000)
    vfs = make_vfs(dataset, tmp_path, cache_bytes=4 * 1024 * 1024)
    assert vfs.getattr(path).size == inst.path.stat().st_size  # listed with its size
    assert errno_of(vfs.open, path, os.O_RDONLY) == errno.EFBIG
    vfs.shutdown()


def test_a_size_the_cache_learnt_for_an_unsized_listing_stays_once_the_copy_is_gone(
        dataset, tmp_path, dicom: DicomFactory, monkeypatch):
    """Read-ahead cached a file its listing gave no size for; it is then read whole. Once the
    cached copy expired, stat showed 0 again, though the file had been read."""
    inst, path = on_server(dataset, dicom)
    _sizes_unlisted(dataset, monkeypatch)
    vfs = make_vfs(dataset, tmp_path)
    from dicomfuse.core.paths import DicomPath

    assert [a.size for _, a in vfs.readdir(os.path.dirname(path))] == [0]  # ls -l: no size listed
    assert vfs._prefetch(DicomPath.parse(path))
    key = vfs._key(DicomPath.parse(path))
    from tests.mounting import wait_for

    wait_for(lambda: vfs.cache.known_size(key) is not None, 10, what="the read-ahead download")
    fh = vfs.open(path, os.O_RDONLY).fh
    assert vfs.read(fh, 1 << 20, 0) == inst.path.read_bytes()
    vfs.release(fh)
    monkeypatch.setattr(vfs.cache, "known_size", lambda key: None)  # the cached copy expired
    assert vfs.getattr(path).size == inst.path.stat().st_size
    vfs.shutdown()


def test_instances_found_too_large_are_remembered_within_a_bound(dataset, tmp_path, dicom: DicomFactory,
                                                                 monkeypatch):
    """A long-running mount stats ever more such files: only the newest are remembered; a
    forgotten one is found too large again at its next stat, never shown empty."""
    paths = [on_server(dataset, dicom, pixel_bytes=1_500_000)[1] for _ in range(3)]
    _sizes_unlisted(dataset, monkeypatch)
    vfs = make_vfs(dataset, tmp_path, cache_bytes=4 * 1024 * 1024)
    vfs._too_large.max_size = 2
    fetched: list[str] = []
    fetch = vfs._fetch_size
    monkeypatch.setattr(vfs, "_fetch_size", lambda p: fetched.append(str(p)) or fetch(p))
    for caller, path in enumerate(paths, start=100):  # one program per file: each stat may fetch
        assert vfs.getattr(path, caller=caller).size == 1024 * 1024 + 1
    assert len(vfs._too_large) == 2 and len(fetched) == 3
    assert vfs.getattr(paths[2], caller=200).size == 1024 * 1024 + 1 and len(fetched) == 3  # remembered
    assert vfs.getattr(paths[0], caller=201).size == 1024 * 1024 + 1 and len(fetched) == 4  # forgotten: asked again
    vfs.shutdown()


@pytest.mark.parametrize("fails", [False, True], ids=["answered", "refused"])
def test_callers_listing_one_folder_at_once_share_one_request(dataset, tmp_path, dicom: DicomFactory,
                                                              monkeypatch, fails: bool):
    """Eight readers of a data loader starting on one series: one listing request, whose answer
    (or error) each of them gets."""
    inst, path = on_server(dataset, dicom)
    series = os.path.dirname(path)
    store_class = type(dataset.open_store("store"))
    listed = store_class.instances
    calls: list[int] = []
    gate = threading.Event()

    def slow(self, *args):  # type: ignore[no-untyped-def]
        calls.append(1)
        assert gate.wait(5)
        if fails:
            from dicomfuse.stores.base import Unavailable

            raise Unavailable("the server is down")
        return listed(self, *args)

    monkeypatch.setattr(store_class, "instances", slow)
    vfs = make_vfs(dataset, tmp_path)
    vfs.getattr(os.path.dirname(series))  # the study: resolved before the readers start
    outcomes: list[object] = []

    def reader() -> None:
        try:
            outcomes.append(sorted(dict(vfs.readdir(series))))
        except FsError as exc:
            outcomes.append(exc.errno)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # every reader has asked by now
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert outcomes == [errno.EIO] * 8 if fails else outcomes == [[os.path.basename(path)]] * 8
    vfs.shutdown()


def test_a_file_removed_as_its_upload_ends_is_not_listed_again(dataset, tmp_path, dicom: DicomFactory):
    """Write-back: rm of a file whose upload the server has just stored, before the queue says so.
    The rm deletes it from the server; the upload's end then listed it again, gone, for the
    overlay's lifetime (30 s): `cat` said ENOENT on a file `ls` showed."""
    inst = dicom.instance()
    vfs = make_vfs(dataset, tmp_path, upload_mode="writeback")
    assert vfs.writeback is not None
    release = threading.Event()
    told = vfs.writeback._on_done
    assert told is not None

    def late(item, stored, reason):  # type: ignore[no-untyped-def]
        assert release.wait(10)
        told(item, stored, reason)

    vfs.writeback._on_done = late
    upload(vfs, "/store/new.dcm", inst.path.read_bytes())
    target = f"/store/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    store = dataset.open_store("store")
    deadline = time.monotonic() + 10
    while not list(store.instances(inst.study_uid, inst.series_uid, inst.sop_uid)):
        assert time.monotonic() < deadline, "the upload was not stored"
        time.sleep(0.02)
    vfs.unlink(target)  # the queue has not said it is done yet
    release.set()
    assert vfs.writeback.wait_idle(10)
    assert inst.study_uid not in dict(vfs.readdir("/store"))  # nor its study, which held only it
    assert errno_of(vfs.getattr, target) == errno.ENOENT
    assert not list(store.instances(inst.study_uid, inst.series_uid, inst.sop_uid))
    vfs.shutdown()


def test_a_failed_listing_answers_the_callers_right_behind_it(dataset, tmp_path, dicom: DicomFactory,
                                                             monkeypatch):
    """The kernel sends one folder's listings and lookups one after another: readers of a
    failing series each went through the whole retry chain in turn (5 ls: 78 s). A listing that
    just failed answers the next callers for 2 s; after that, and after a success, they ask."""
    import dicomfuse.core.vfs as vfs_module
    from dicomfuse.stores.base import Unavailable

    inst, path = on_server(dataset, dicom)
    series = os.path.dirname(path)
    store_class = type(dataset.open_store("store"))
    listed = store_class.instances
    calls: list[int] = []
    down = [True]

    def failing(self, *args):  # type: ignore[no-untyped-def]
        calls.append(1)
        if down[0]:
            raise Unavailable("the server is down")
        return listed(self, *args)

    monkeypatch.setattr(store_class, "instances", failing)
    vfs = make_vfs(dataset, tmp_path)
    vfs.getattr(os.path.dirname(series))
    for _ in range(3):
        assert errno_of(vfs.readdir, series) == errno.EIO
    assert len(calls) == 1
    monkeypatch.setattr(vfs_module, "LISTING_FAILURE_REUSE_S", 0.0)
    down[0] = False
    assert os.path.basename(path) in dict(vfs.readdir(series))
    assert len(calls) == 2
    vfs.shutdown()


def _replace_behind(dataset: LocalDataset, inst, new: bytes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Another client replaces the instance on the server."""
    store = dataset.open_store("store")
    store.delete_instance(inst.study_uid, inst.series_uid, inst.sop_uid)
    (tmp_path / "other-client.dcm").write_bytes(new)
    store.store_files([tmp_path / "other-client.dcm"])


def read_from(vfs: Vfs, fh: int, offset: int = 0) -> bytes:
    out = b""
    while chunk := vfs.read(fh, 65536, offset + len(out)):
        out += chunk
    return out


def test_two_programs_reading_two_versions_never_share_the_page_cache(dataset, tmp_path, dicom: DicomFactory):
    """The OS keeps one page cache per file. A program kept reading the old version (its copy
    pinned) while another opened the new one: pages each brought in were served to the other,
    both got old and new bytes mixed (a hunt, every time). The second bypasses the page cache
    while the first is open; once it is closed, the next open drops the old pages and the one
    after keeps the new ones."""
    inst, path = on_server(dataset, dicom)
    old = inst.path.read_bytes()
    new = _changed(inst.path, tmp_path)
    vfs = make_vfs(dataset, tmp_path, instance_ttl=0.2)
    a = vfs.open(path, os.O_RDONLY)
    assert (a.direct_io, a.keep_cache) == (False, False)
    assert vfs.read(a.fh, 4096, 0) == old[:4096]
    _replace_behind(dataset, inst, new, tmp_path)
    time.sleep(0.3)  # the cached copy expires: the next open fetches the new version
    b = vfs.open(path, os.O_RDONLY)
    assert b.direct_io and not b.keep_cache  # the OS holds pages of A's version, and A reads on
    assert read_from(vfs, b.fh) == new
    assert read_from(vfs, a.fh) == old  # A's copy, whole
    vfs.release(a.fh)
    vfs.release(b.fh)
    c = vfs.open(path, os.O_RDONLY)
    assert (c.direct_io, c.keep_cache) == (False, False)  # the old pages go
    assert read_from(vfs, c.fh) == new
    d = vfs.open(path, os.O_RDONLY)
    assert (d.direct_io, d.keep_cache) == (False, True)  # C's pages are of this very copy
    vfs.release(c.fh)
    vfs.release(d.fh)
    vfs.shutdown()


def test_the_copy_a_program_reads_is_the_one_cached_when_it_opened(dataset, tmp_path, dicom: DicomFactory):
    """keep_cache was decided at open for the copy cached then, but the copy was chosen at the
    first read: expired meanwhile, the new version was read into pages of the old (a hunt:
    old for the first 384 KiB, new after). The copy cached at open is pinned at open."""
    inst, path = on_server(dataset, dicom)
    old = inst.path.read_bytes()
    vfs = make_vfs(dataset, tmp_path, instance_ttl=0.2)
    first = vfs.open(path, os.O_RDONLY)
    assert read_from(vfs, first.fh) == old
    vfs.release(first.fh)
    again = vfs.open(path, os.O_RDONLY)
    assert again.keep_cache  # the OS's pages are of the copy cached now
    _replace_behind(dataset, inst, _changed(inst.path, tmp_path), tmp_path)
    time.sleep(0.3)  # that copy expires before the first read
    assert read_from(vfs, again.fh) == old  # the copy its kept pages came from
    vfs.release(again.fh)
    vfs.shutdown()


def test_a_failed_upload_is_kept_with_the_dataset_it_was_for(dataset, tmp_path):
    """So that 'dicomfuse retry' never sends it to another dataset sharing the cache folder."""
    from dicomfuse.core.uploads import files_in, is_sidecar, read_sidecar

    vfs = make_vfs(dataset, tmp_path, dataset_label=str(tmp_path / "ds"))
    fh = vfs.create("/store/notdicom.dcm").fh
    vfs.write(fh, b"not DICOM", 0)
    assert errno_of(vfs.flush, fh) == errno.EINVAL
    vfs.release(fh)
    kept = [p for p in files_in(tmp_path / "work" / "spool" / "failed") if not is_sidecar(p)]
    assert [read_sidecar(p).dataset for p in kept] == [str(tmp_path / "ds")]  # type: ignore[union-attr]
    vfs.shutdown()


def test_names_copied_in_and_times_given_are_remembered_for_the_newest_files_only(dataset, tmp_path,
                                                                                  dicom: DicomFactory):
    """Each file copied in under another name, or given a time, was remembered for as long as
    the mount ran, though never removed through it: a mount running for days grew by about
    6 KB per upload. The newest are kept; an older name is forgotten."""
    from dicomfuse.core import vfs as vfs_module

    vfs = make_vfs(dataset, tmp_path)
    vfs._aliases.max_size = vfs._times.max_size = 3
    insts = dicom.series(5)
    for n, inst in enumerate(insts):
        upload(vfs, f"/store/IM{n}.dcm", inst.path.read_bytes())
    assert len(vfs._aliases) == 3 and len(vfs._times) == 3
    assert errno_of(vfs.getattr, "/store/IM0.dcm") == errno.ENOENT  # forgotten: the oldest
    assert read(vfs, "/store/IM4.dcm") == insts[4].path.read_bytes()
    assert vfs._aliases.names_of("store", insts[0].sop_uid) == []
    assert vfs_module._RECENT_NAMES >= 10_000
    vfs.shutdown()
