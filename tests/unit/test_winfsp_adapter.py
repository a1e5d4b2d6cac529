"""The Windows adapter without Windows: the NTSTATUS table, mount points, volume parameters and
mount options (backends/windows.py), and the WinFsp adapter's translation, paging and mounting
(backends/winfsp.py) over the stand-in binding (tests/fakes/winfspy), or the real winfspy where it
imports."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from dicomfuse.backends import windows
from dicomfuse.core import errors, policy
from dicomfuse.core.errors import FsError
from dicomfuse.core.vfs import Attr, Vfs, VfsConfig
from dicomfuse.core.workdirs import WorkDirs
from dicomfuse.stores.local import LocalDataset
from tests.conftest import DicomFactory
from tests.fakes.winfspy import _standin

CORE = Path(__file__).resolve().parents[2] / "src" / "dicomfuse" / "core"
DIRECTORY = 0x1  # CreateOptions FILE_DIRECTORY_FILE (wdm.h)


@pytest.fixture
def winfsp() -> Iterator[ModuleType]:
    """The adapter module and its binding: the real winfspy where it imports, else the stand-in."""
    real = _standin.real_binding()
    if real is not None:
        import dicomfuse.backends.winfsp as module

        module.binding = real  # type: ignore[attr-defined]
        yield module
        return
    with _standin.adapter() as module:
        yield module


@pytest.fixture
def standin(winfsp: ModuleType) -> ModuleType:
    """For tests that need the stand-in's recording FileSystem (never the real one)."""
    if not winfsp.binding.__name__.startswith("tests."):
        pytest.skip("needs the stand-in binding")
    return winfsp


# ---------------------------------------------------------------------------------------------
# The NTSTATUS table


def errnos_raised_by_the_core() -> set[int]:
    """Every errno named in the core's source (FsError(errno.X…), the policy table, the store
    error table), plus ENOATTR."""
    names = set()
    for source in CORE.glob("*.py"):
        names |= set(re.findall(r"\berrno\.(E[A-Z0-9]+)\b", source.read_text()))
    values = {getattr(errno, name) for name in names}
    values |= {row[1] for row in errors.STORE_ERRNO}
    values |= {cell.errno for row in policy.TABLE.values() for cell in row if isinstance(cell, policy.Deny)}
    values.add(errors.ENOATTR)
    return values


def test_the_grep_finds_the_core_errnos() -> None:
    found = errnos_raised_by_the_core()
    assert {errno.ENOENT, errno.EEXIST, errno.EPERM, errno.EACCES, errno.ENOTEMPTY, errno.EFBIG, errno.EIO} <= found


@pytest.mark.parametrize("err", sorted(errnos_raised_by_the_core()), ids=lambda e: errno.errorcode.get(e, str(e)))
def test_every_errno_the_core_raises_has_an_ntstatus(err: int) -> None:
    assert windows.ntstatus_name(err) is not None


def test_every_ntstatus_has_the_binding_value(winfsp: ModuleType) -> None:
    binding = winfsp.binding.plumbing.NTSTATUS  # 0.8.4 exports NTSTATUS from winfspy.plumbing only
    for name, value in windows.NTSTATUS.items():
        assert binding[name] == value, name
    assert set(windows.ERRNO_TO_NTSTATUS.values()) <= set(windows.NTSTATUS)


@pytest.mark.parametrize(("err", "context", "expected"), [
    (errno.ENOENT, windows.PLAIN, "STATUS_OBJECT_NAME_NOT_FOUND"),
    (errno.ENOENT, windows.IN_FOLDER, "STATUS_OBJECT_PATH_NOT_FOUND"),
    (errno.EEXIST, windows.PLAIN, "STATUS_OBJECT_NAME_COLLISION"),
    (errno.EPERM, windows.PLAIN, "STATUS_ACCESS_DENIED"),
    (errno.EACCES, windows.PLAIN, "STATUS_ACCESS_DENIED"),
    (errno.ENOTEMPTY, windows.PLAIN, "STATUS_DIRECTORY_NOT_EMPTY"),
    (errno.ENOTDIR, windows.PLAIN, "STATUS_NOT_A_DIRECTORY"),
    (errno.EISDIR, windows.PLAIN, "STATUS_FILE_IS_A_DIRECTORY"),
    (errno.EINVAL, windows.PLAIN, "STATUS_INVALID_PARAMETER"),
    (errno.EINVAL, windows.NAMING, "STATUS_OBJECT_NAME_INVALID"),
    (errno.EFBIG, windows.PLAIN, "STATUS_FILE_TOO_LARGE"),
    (errno.EIO, windows.PLAIN, "STATUS_UNEXPECTED_IO_ERROR"),
    (errno.ENOSPC, windows.PLAIN, "STATUS_DISK_FULL"),
    (errno.ENODATA, windows.PLAIN, "STATUS_NO_EAS_ON_FILE"),
    (errno.ENOTSUP, windows.PLAIN, "STATUS_NOT_SUPPORTED"),
    (errno.ETIMEDOUT, windows.PLAIN, "STATUS_IO_TIMEOUT"),
])
def test_ntstatus_for(err: int, context: str, expected: str) -> None:
    assert windows.ntstatus_for(err, context) == windows.NTSTATUS[expected]


def test_eremoteio_where_the_os_has_it() -> None:
    if not hasattr(errno, "EREMOTEIO"):
        pytest.skip("no EREMOTEIO on this OS")
    assert windows.ntstatus_name(errno.EREMOTEIO) == "STATUS_UNEXPECTED_IO_ERROR"


def test_an_errno_missing_from_the_table_falls_back() -> None:
    assert windows.ntstatus_name(99_999) is None
    assert windows.ntstatus_for(99_999) == windows.NTSTATUS["STATUS_UNEXPECTED_IO_ERROR"]


# ---------------------------------------------------------------------------------------------
# Mount points


@pytest.mark.parametrize("text", ["J:", "j:", "J:\\", "j:/", " J: "])
def test_a_free_drive_letter_is_normalised(text: str) -> None:
    asked: list[str] = []
    assert windows.check_mount_point(text, drive_in_use=lambda d: asked.append(d) or False) == "J:"
    assert asked == ["J:"]


def test_a_drive_in_use_is_refused() -> None:
    with pytest.raises(ValueError, match=r"drive K: is already in use"):
        windows.check_mount_point("k:", drive_in_use=lambda d: d == "K:")


@pytest.mark.parametrize(("text", "why"), [
    ("", "no mount point"),
    ("J", "not a drive letter: write J:"),
    ("JJ:", "not a valid drive letter or folder path"),
    ("1:", "not a valid drive letter or folder path"),
    ("J::", "not a valid drive letter or folder path"),
    ("J:dicom", "relative to a drive's current folder"),
    ("\\\\server\\share", "network path"),
    ("//server/share", "network path"),
    ("C:\\scans\\a<b", "not a valid drive letter or folder path"),
    ("mnt|x", "not a valid drive letter or folder path"),
])
def test_malformed_mount_points_are_refused_in_one_line(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        windows.check_mount_point(text, drive_in_use=lambda d: False)
    assert why in str(info.value) and "\n" not in str(info.value)


def test_a_new_folder_whose_parent_exists(tmp_path: Path) -> None:
    assert windows.check_mount_point(str(tmp_path / "mnt")) == str(tmp_path / "mnt")


def test_a_relative_folder_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert windows.check_mount_point("mnt") == str(tmp_path / "mnt")


def test_a_folder_whose_parent_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist: create it first"):
        windows.check_mount_point(str(tmp_path / "nope" / "mnt"))


def test_an_existing_folder_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        windows.check_mount_point(str(tmp_path / "full"))
    with pytest.raises(ValueError, match="is not a folder"):
        windows.check_mount_point(str(tmp_path / "file"))


def test_an_empty_folder_is_removed_for_the_mount_and_made_again(tmp_path: Path) -> None:
    """WinFsp creates a folder mount point itself and fails if it exists: an empty one is
    accepted, removed just before mounting and created again after."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    assert windows.check_mount_point(str(folder)) == str(folder)
    assert windows.free_mount_folder(str(folder)) is True
    assert not folder.exists()
    windows.restore_mount_folder(str(folder))
    assert folder.is_dir()
    assert windows.free_mount_folder(str(tmp_path / "never-made")) is False
    assert windows.free_mount_folder("J:") is False


def test_a_folder_filled_after_the_check_is_not_removed(tmp_path: Path) -> None:
    folder = tmp_path / "mnt"
    folder.mkdir()
    windows.check_mount_point(str(folder))
    (folder / "late").write_text("x")
    with pytest.raises(OSError):
        windows.free_mount_folder(str(folder))
    assert (folder / "late").exists()


# ---------------------------------------------------------------------------------------------
# Volume parameters, label, mount options


def test_volume_params_are_winfspys_keywords(winfsp: ModuleType) -> None:
    factory = winfsp.binding.file_system._volume_params_factory
    assert windows.VOLUME_PARAM_NAMES == set(inspect.signature(factory).parameters)
    params = windows.volume_params("Research")
    assert set(params) <= windows.VOLUME_PARAM_NAMES
    factory(**params)  # the real one fills an FSP_FSCTL_VOLUME_PARAMS: unknown names fail here


def test_volume_params_values() -> None:
    params = windows.volume_params("Research", now=1_700_000_000)
    assert params["file_info_timeout"] == 1000
    assert (params["case_sensitive_search"], params["case_preserved_names"], params["unicode_on_disk"]) == (0, 1, 1)
    assert params["persistent_acls"] == params["post_cleanup_when_modified_only"] == 1
    assert params["um_file_context_is_user_context2"] == params["flush_and_purge_on_cleanup"] == 1
    assert params["file_system_name"] == "DICOMFuse" and params["prefix"] == ""
    assert params["sector_size"] * params["sectors_per_allocation_unit"] == windows.ALLOCATION_UNIT
    assert params["volume_creation_time"] == windows.filetime(1_700_000_000)
    # winfspy's doctest: dt_to_filetime(datetime(2009, 7, 25, 23, 0)) == 128930364000000000
    assert windows.filetime(datetime(2009, 7, 25, 23, 0, tzinfo=timezone.utc).timestamp()) == 128930364000000000
    assert params["volume_serial_number"] == windows.volume_params("Research")["volume_serial_number"]
    assert params["volume_serial_number"] != windows.volume_params("Clinical")["volume_serial_number"]
    assert params["reject_irp_prior_to_transact0"] == 0
    assert windows.volume_params("Research", drive=False)["reject_irp_prior_to_transact0"] == 1


@pytest.mark.parametrize(("name", "label"), [
    ("Research", "Research"),
    ("", "DICOMFuse"),
    (None, "DICOMFuse"),
    ("x" * 40, "x" * 32),
    ("a" * 31 + "\U0001F600", "a" * 31),  # an emoji takes two UTF-16 units: not cut in half
    ("\U0001F600" * 16, "\U0001F600" * 16),
])
def test_volume_label(name: str | None, label: str) -> None:
    assert windows.volume_label(name) == label
    assert len(label.encode("utf-16-le")) <= 64  # winfspy's ll_get_volume_info check


def test_volume_params_refuse_a_label_winfspy_would_refuse() -> None:
    with pytest.raises(ValueError):
        windows.volume_params("x" * 33)


def test_mount_settings_read_winfsp_and_fuse_options() -> None:
    settings = windows.mount_settings({"fsname": "dicomfuse", "hard_remove": True, "attr_timeout": "2",
                                       "ThreadCount": "8", "volname": "Scans", "debug": True,
                                       "max_component_length": "200"})
    assert settings.thread_count == 8 and settings.label == "Scans" and settings.debug
    assert settings.params == {"file_info_timeout": 2000, "max_component_length": 200}
    assert windows.mount_settings({"FileInfoTimeout": "500", "attr_timeout": "2"}).params == {"file_info_timeout": 500}
    assert windows.mount_settings({}).thread_count == windows.THREAD_COUNT == 16


@pytest.mark.parametrize(("options", "why"), [
    ({"no_such_option": True}, "unknown mount option for WinFsp: no_such_option"),
    ({"ThreadCount": "many"}, "ThreadCount needs a whole number"),
    ({"ThreadCount": "0"}, "must be at least 1"),
    ({"prefix": "\\server\\share"}, "not supported"),
])
def test_mount_settings_refuse(options: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        windows.mount_settings(options)


def test_file_info() -> None:
    info = windows.file_info(Attr(False, 5000, 10.0), "1.2.3.dcm")
    assert info["file_size"] == 5000 and info["allocation_size"] == 8192
    assert info["file_attributes"] == windows.FILE_ATTRIBUTE_ARCHIVE
    assert info["last_write_time"] == windows.EPOCH_AS_FILETIME + 100_000_000
    assert windows.file_info(Attr(True), "1.2")["file_attributes"] == windows.FILE_ATTRIBUTE_DIRECTORY
    hidden = windows.file_info(Attr(False, 1), "desktop.ini")["file_attributes"]
    assert hidden == windows.FILE_ATTRIBUTE_ARCHIVE | windows.FILE_ATTRIBUTE_HIDDEN


def test_constants_match_the_binding(winfsp: ModuleType) -> None:
    fa = winfsp.binding.FILE_ATTRIBUTE
    for name in ("READONLY", "HIDDEN", "DIRECTORY", "ARCHIVE", "NORMAL"):
        assert fa[f"FILE_ATTRIBUTE_{name}"] == getattr(windows, f"FILE_ATTRIBUTE_{name}"), name
    assert winfsp.DIRECTORY_FILE == winfsp.binding.CREATE_FILE_CREATE_OPTIONS.FILE_DIRECTORY_FILE == DIRECTORY


@pytest.mark.parametrize(("name", "path"), [("\\", "/"), ("\\a", "/a"), ("\\a\\b\\c.DCM", "/a/b/c.DCM"),
                                            ("\\a\\", "/a")])
def test_vfs_path(name: str, path: str) -> None:
    assert windows.vfs_path(name) == path


# ---------------------------------------------------------------------------------------------
# translate


class Raising:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any) -> Any:
            raise self.exc
        return fail


def status_of(winfsp: ModuleType, call: Any) -> str:
    with pytest.raises(winfsp.NTStatusError) as info:
        call()
    return windows.STATUS_NAMES[int(info.value.value)]


def ops_over(winfsp: ModuleType, vfs: Any) -> Any:
    return winfsp.WinFspOperations(vfs, "Test")


def test_translate_fs_error_at_its_level(winfsp: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    ops = ops_over(winfsp, Raising(FsError(errno.EPERM, "upload not allowed at root level", logging.WARNING)))
    with caplog.at_level(logging.DEBUG, logger="dicomfuse.backends.winfsp"):
        assert status_of(winfsp, lambda: ops.get_volume_info()) == "STATUS_ACCESS_DENIED"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "get_volume_info: upload not allowed at root level")]


def test_translate_does_not_repeat_the_operation_its_message_names(winfsp: ModuleType,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    ops = ops_over(winfsp, Raising(FsError(errno.EPERM, "get_volume_info: not now", logging.WARNING)))
    with caplog.at_level(logging.DEBUG, logger="dicomfuse.backends.winfsp"):
        assert status_of(winfsp, lambda: ops.get_volume_info()) == "STATUS_ACCESS_DENIED"
    assert [r.getMessage() for r in caplog.records] == ["get_volume_info: not now"]


def test_translate_os_error(winfsp: ModuleType) -> None:
    ops = ops_over(winfsp, Raising(OSError(errno.ENOSPC, "No space left on device")))
    assert status_of(winfsp, lambda: ops.get_volume_info()) == "STATUS_DISK_FULL"


def test_translate_an_errno_without_ntstatus(winfsp: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    ops = ops_over(winfsp, Raising(OSError(99_999, "odd")))
    with caplog.at_level(logging.WARNING):
        assert status_of(winfsp, lambda: ops.get_volume_info()) == "STATUS_UNEXPECTED_IO_ERROR"
    assert "no NTSTATUS for errno 99999" in caplog.text


def test_translate_a_bug_never_reaches_the_dispatcher(winfsp: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    ops = ops_over(winfsp, Raising(KeyError("bug")))
    with caplog.at_level(logging.ERROR):
        assert status_of(winfsp, lambda: ops.get_volume_info()) == "STATUS_UNEXPECTED_IO_ERROR"
    assert "Unexpected error in get_volume_info" in caplog.text and "KeyError" in caplog.text


def test_translate_lets_an_ntstatus_through(winfsp: ModuleType) -> None:
    error = winfsp.NTStatusError(windows.NTSTATUS["STATUS_END_OF_FILE"])
    ops = ops_over(winfsp, Raising(error))
    assert status_of(winfsp, lambda: ops.get_volume_info()) == "STATUS_END_OF_FILE"


# ---------------------------------------------------------------------------------------------
# read_directory paging


class ListingVfs:
    """A Vfs that lists ``names`` in /s (changeable between calls) and knows nothing else."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.readdirs = 0

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        self.readdirs += 1
        return [(name, Attr(False, 10)) for name in sorted(self.names)]

    def getattr(self, path: str, fh: int | None = None) -> Attr:
        return Attr(True)


def names(entries: list[dict[str, Any]]) -> list[str]:
    return [e["file_name"] for e in entries]


def folder(winfsp: ModuleType, path: str) -> Any:
    return winfsp.OpenFile(path, True, 0)


def test_read_directory_pages_by_marker(winfsp: ModuleType) -> None:
    vfs = ListingVfs(["1.3.dcm", "1.10.dcm", "1.2.dcm", "$RECYCLE.BIN"])
    ops, ctx = ops_over(winfsp, vfs), folder(winfsp, "/s")
    everything = names(ops.read_directory(ctx, None))
    assert everything == [".", "..", "$RECYCLE.BIN", "1.10.dcm", "1.2.dcm", "1.3.dcm"]
    assert names(ops.read_directory(ctx, ".")) == everything[1:]
    assert names(ops.read_directory(ctx, "..")) == everything[2:]
    assert names(ops.read_directory(ctx, "1.10.dcm")) == ["1.2.dcm", "1.3.dcm"]
    assert names(ops.read_directory(ctx, "1.11.dcm")) == ["1.2.dcm", "1.3.dcm"], "a marker gone meanwhile"
    assert names(ops.read_directory(ctx, "1.3.dcm")) == []
    assert vfs.readdirs == 1, "one snapshot per scan"


def test_read_directory_pages_one_snapshot_until_the_scan_restarts(winfsp: ModuleType) -> None:
    vfs = ListingVfs(["a.dcm", "b.dcm"])
    ops, ctx = ops_over(winfsp, vfs), folder(winfsp, "/s")
    assert names(ops.read_directory(ctx, None)) == [".", "..", "a.dcm", "b.dcm"]
    vfs.names.append("c.dcm")
    assert names(ops.read_directory(ctx, "a.dcm")) == ["b.dcm"]
    assert names(ops.read_directory(ctx, None))[-1] == "c.dcm"


def test_the_root_has_no_dot_entries(winfsp: ModuleType) -> None:
    ops, ctx = ops_over(winfsp, ListingVfs(["store-a", "store-b"])), folder(winfsp, "/")
    assert names(ops.read_directory(ctx, None)) == ["store-a", "store-b"]
    assert names(ops.read_directory(ctx, "store-a")) == ["store-b"]


# ---------------------------------------------------------------------------------------------
# The adapter over a real core (local store): what the replays do not reach


@pytest.fixture
def local(tmp_path: Path, dicom: DicomFactory, winfsp: ModuleType) -> Iterator[SimpleNamespace]:
    (tmp_path / "data" / "store-a").mkdir(parents=True)
    dataset = LocalDataset(tmp_path / "data")
    inst = dicom.instance()
    dataset.open_store("store-a").store_files([inst.path])
    vfs = Vfs(dataset, VfsConfig(), WorkDirs(tmp_path / "work"))
    vfs.start()
    try:
        path = f"\\store-a\\{inst.study_uid}\\{inst.series_uid}\\{inst.sop_uid}.dcm"
        yield SimpleNamespace(ops=ops_over(winfsp, vfs), vfs=vfs, inst=inst, path=path, winfsp=winfsp)
    finally:
        vfs.shutdown()


def test_a_missing_folder_is_path_not_found(local: SimpleNamespace) -> None:
    study, series = local.inst.study_uid, local.inst.series_uid
    w, ops = local.winfsp, local.ops
    assert status_of(w, lambda: ops.open(f"\\store-a\\{study}\\{series}\\1.2.3.dcm", 0, 0)) \
        == "STATUS_OBJECT_NAME_NOT_FOUND"
    assert status_of(w, lambda: ops.open(f"\\store-a\\{study}\\1.9.9\\1.2.3.dcm", 0, 0)) \
        == "STATUS_OBJECT_PATH_NOT_FOUND"
    assert status_of(w, lambda: ops.get_security_by_name("\\nostore\\x")) == "STATUS_OBJECT_PATH_NOT_FOUND"
    assert status_of(w, lambda: ops.get_security_by_name("\\nostore")) == "STATUS_OBJECT_NAME_NOT_FOUND"
    assert status_of(w, lambda: ops.create("\\nostore\\x.dcm", 0, 0, 0, None, 0)) == "STATUS_OBJECT_PATH_NOT_FOUND"


def test_create_an_existing_name_collides(local: SimpleNamespace) -> None:
    assert status_of(local.winfsp, lambda: local.ops.create(local.path, 0, 0, 0, None, 0)) \
        == "STATUS_OBJECT_NAME_COLLISION"
    assert status_of(local.winfsp, lambda: local.ops.create("\\store-a", DIRECTORY, 0, 0, None, 0)) \
        == "STATUS_OBJECT_NAME_COLLISION"


def test_an_invalid_store_name_is_a_name_error(local: SimpleNamespace) -> None:
    assert status_of(local.winfsp, lambda: local.ops.create("\\bad name!", DIRECTORY, 0, 0, None, 0)) \
        == "STATUS_OBJECT_NAME_INVALID"


def test_an_attributes_only_open_never_opens_the_data(local: SimpleNamespace) -> None:
    ctx = local.ops.open(local.path, 0, windows.FILE_READ_ATTRIBUTES | windows.DELETE)
    assert ctx.fh is None
    assert local.ops.get_file_info(ctx)["file_size"] == local.inst.path.stat().st_size
    local.ops.close(ctx)


def test_reads_writes_and_sizes_on_a_side_file(local: SimpleNamespace) -> None:
    ops, w = local.ops, local.winfsp
    ctx = ops.create("\\store-a\\desktop.ini", 0, windows.FILE_GENERIC_WRITE, 0, None, 0)
    assert ops.write(ctx, b"abcdef", 0, False, False) == 6
    assert ops.write(ctx, b"XYZ", -1, True, False) == 3  # write_to_end_of_file: offset -1
    assert ops.write(ctx, b"0123456789", 7, False, True) == 2  # constrained: never past the end
    assert ops.write(ctx, b"!", 9, False, True) == 0
    ops.set_file_size(ctx, 64 * 1024, True)  # an allocation beyond the end changes nothing
    assert ops.get_file_info(ctx)["file_size"] == 9
    ops.set_file_size(ctx, 4, True)  # an allocation below the end cuts the file
    assert ops.read(ctx, 0, 100) == b"abcd"
    assert status_of(w, lambda: ops.read(ctx, 4, 10)) == "STATUS_END_OF_FILE"
    ops.flush(ctx)
    ops.flush(None)  # the volume
    ops.cleanup(ctx, None, 0)
    ops.close(ctx)
    again = ops.open("\\store-a\\desktop.ini", 0, windows.FILE_GENERIC_READ)
    assert ops.read(again, 0, 100) == b"abcd"
    assert ops.get_dir_info_by_name(ops.open("\\store-a", 1, 0), "desktop.ini")["file_attributes"] \
        & windows.FILE_ATTRIBUTE_HIDDEN
    ops.close(again)


def test_truncating_an_instance_outside_an_overwrite_is_refused(local: SimpleNamespace) -> None:
    ctx = local.ops.open(local.path, 0, windows.FILE_READ_ATTRIBUTES)
    assert status_of(local.winfsp, lambda: local.ops.set_file_size(ctx, 3, False)) == "STATUS_ACCESS_DENIED"
    local.ops.set_file_size(ctx, local.inst.path.stat().st_size, False)  # to its own size: nothing lost
    local.ops.close(ctx)


def test_read_then_write_swaps_the_core_handle(local: SimpleNamespace) -> None:
    ops = local.ops
    ctx = ops.open(local.path, 0, windows.FILE_GENERIC_READ | windows.FILE_GENERIC_WRITE)
    original = local.inst.path.read_bytes()
    assert ops.read(ctx, 0, 128) == original[:128]
    assert not ctx.writable
    assert ops.write(ctx, original[:128], 0, False, False) == 128  # the same bytes: the upload changes nothing
    assert ctx.writable
    ops.cleanup(ctx, None, windows.CLEANUP_SET_LAST_WRITE_TIME)
    ops.close(ctx)
    assert ctx.fh is None


def test_can_delete(local: SimpleNamespace) -> None:
    ops, w = local.ops, local.winfsp
    assert status_of(w, lambda: ops.can_delete(ops.open("\\", 1, 0), "\\")) == "STATUS_ACCESS_DENIED"
    assert status_of(w, lambda: ops.can_delete(ops.open("\\store-a", 1, 0), "\\store-a")) \
        == "STATUS_DIRECTORY_NOT_EMPTY"
    ops.can_delete(ops.open(local.path, 0, windows.DELETE), local.path)


def test_a_delete_the_core_refuses_is_logged(local: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    ctx = local.ops.open("\\store-a\\" + local.inst.study_uid, 1, windows.DELETE)
    with caplog.at_level(logging.WARNING):
        local.ops.cleanup(ctx, "\\store-a\\" + local.inst.study_uid, windows.CLEANUP_DELETE)
    assert "failed after Windows took it as done" in caplog.text
    local.ops.close(ctx)


def test_rename_over_an_existing_name(local: SimpleNamespace) -> None:
    ops, w = local.ops, local.winfsp
    ops.close(ops.create("\\New folder", DIRECTORY, 0, 0, None, 0))
    ctx = ops.open("\\New folder", 1, windows.DELETE)
    assert status_of(w, lambda: ops.rename(ctx, "\\New folder", "\\store-a", False)) \
        == "STATUS_OBJECT_NAME_COLLISION"
    assert status_of(w, lambda: ops.rename(ctx, "\\New folder", "\\bad name!", False)) \
        == "STATUS_OBJECT_NAME_INVALID"
    ops.rename(ctx, "\\New folder", "\\New Folder", False)  # only the case changes: no collision check
    assert ctx.path == "/New Folder"
    ops.close(ctx)


def test_volume_information_and_security(local: SimpleNamespace) -> None:
    ops = local.ops
    info = ops.get_volume_info()
    assert info["volume_label"] == "Test" and 0 < info["free_size"] <= info["total_size"]
    ops.set_volume_label("Scans")
    assert ops.get_volume_info()["volume_label"] == "Scans"
    attributes, handle, size = ops.get_security_by_name("\\store-a")
    assert attributes == windows.FILE_ATTRIBUTE_DIRECTORY and size > 0
    ctx = ops.open("\\store-a", 1, 0)
    descriptor, length = ops.get_security(ctx)
    assert (descriptor, length) == (handle, size)
    ops.set_security(ctx, 4, None)
    assert ops.set_basic_info(ctx, 0, 0, 0, 0, 0, None)["file_attributes"] == windows.FILE_ATTRIBUTE_DIRECTORY


# ---------------------------------------------------------------------------------------------
# run(): mount, serve until a signal, unmount


class MountVfs:
    def __init__(self) -> None:
        self.dataset = SimpleNamespace(name="Research dataset")
        self.started = 0

    def start(self) -> None:
        self.started += 1


def stop_when_mounted(standin: ModuleType) -> threading.Thread:
    """SIGTERM this process once the stand-in reports the dispatcher started and run() has its
    handler in place (never before: the default handler would end the test run)."""
    def wait_then_signal() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            systems = standin.binding.FileSystem.instances
            if systems and systems[-1].started and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=wait_then_signal, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(sys.platform == "win32",
                    reason="os.kill(pid, SIGTERM) is TerminateProcess on Windows: it would end the test run")
def test_run_mounts_with_16_threads_and_stops_on_sigterm(standin: ModuleType, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lib = standin.binding.plumbing.lib
    monkeypatch.setattr(lib, "calls", [])
    monkeypatch.setattr(standin.binding.FileSystem, "instances", [])
    monkeypatch.setattr(standin, "_stat", lambda path: None)
    folder = tmp_path / "mnt"
    folder.mkdir()
    before = signal.getsignal(signal.SIGTERM)
    vfs = MountVfs()
    thread = stop_when_mounted(standin)

    standin.run(vfs, str(folder), {"fsname": "dicomfuse", "attr_timeout": "2"})  # type: ignore[arg-type]

    thread.join(5)
    fs = standin.binding.FileSystem.instances[-1]
    assert fs.mountpoint == str(folder) and not fs.started and vfs.started == 1
    expected = {**windows.volume_params("Research dataset", drive=False), "file_info_timeout": 2000}
    del expected["volume_creation_time"], fs.volume_params["volume_creation_time"]
    assert fs.volume_params == expected
    assert fs.operations.label == "Research dataset"
    assert [name for name, _ in lib.calls] == ["FspFileSystemSetMountPoint", "FspFileSystemStartDispatcher",
                                               "FspFileSystemStopDispatcher", "FspFileSystemDelete"]
    assert lib.calls[1][1][1] == 16
    assert folder.is_dir(), "the empty folder is there again after unmounting"
    assert signal.getsignal(signal.SIGTERM) == before


def test_run_raises_when_the_mount_never_came_up(standin: ModuleType, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    lib = standin.binding.plumbing.lib
    monkeypatch.setattr(lib, "calls", [])
    collision = windows.NTSTATUS["STATUS_OBJECT_NAME_COLLISION"]  # WinFsp's answer for a folder that exists
    monkeypatch.setattr(lib, "results", {"FspFileSystemSetMountPoint": collision})
    folder = tmp_path / "mnt"
    folder.mkdir()
    with pytest.raises(RuntimeError, match="STATUS_OBJECT_NAME_COLLISION"):
        standin.run(MountVfs(), str(folder), {})  # type: ignore[arg-type]
    assert folder.is_dir()
    assert [name for name, _ in lib.calls] == ["FspFileSystemSetMountPoint", "FspFileSystemStopDispatcher",
                                               "FspFileSystemDelete"]


def test_run_refuses_bad_options_before_mounting(standin: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standin.binding.FileSystem, "instances", [])
    with pytest.raises(RuntimeError, match="unknown mount option"):
        standin.run(MountVfs(), "J:", {"bogus": True})  # type: ignore[arg-type]
    assert standin.binding.FileSystem.instances == []


def test_another_winfspy_version_starts_its_own_way(standin: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = standin.binding.plumbing.lib
    monkeypatch.setattr(lib, "calls", [])
    monkeypatch.setattr(standin.binding, "__version__", "0.9.0")
    fs = standin.binding.FileSystem("J:", standin.WinFspOperations(MountVfs(), "x"))
    standin._start(fs, 16)
    assert lib.calls[1][0] == "FspFileSystemStartDispatcher" and lib.calls[1][1][1] == 0
    fs.stop()


def test_flush_file_buffers_is_fsync(local: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """FlushFileBuffers of a file is its fsync (written bytes uploaded, or in write-back mode on
    disk), of a read-only file too; with no file, of the volume, what is queued goes to disk."""
    calls: list[object] = []
    monkeypatch.setattr(local.ops.vfs, "fsync", lambda fh: calls.append(("fsync", fh)))
    monkeypatch.setattr(local.ops.vfs, "sync", lambda: calls.append("sync"))
    ctx = local.ops.open(local.path, 0, windows.FILE_GENERIC_READ)
    local.ops.read(ctx, 0, 10)  # the data is opened at the first read
    local.ops.flush(ctx)
    local.ops.flush(None)
    assert calls == [("fsync", ctx.fh), "sync"]
    local.ops.close(ctx)
