"""Explorer's call sequences (tests/replay/explorer.py) replayed through the WinFsp adapter over a
real core and a real server (the local store, Orthanc, the Cloud Healthcare stand-in): outcomes
are checked at the server. Only winfspy is replaced (tests/fakes/winfspy); on Windows with the
real winfspy importable, the real one is used."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from dicomfuse.samples import write_instance
from dicomfuse.stores.open import open_dataset
from tests.conftest import PATIENT_NAME, Backend, DicomFactory
from tests.fakes.winfspy import _standin
from tests.replay import explorer as ex
from tests.replay.conftest import Replayed


@pytest.fixture
def winfsp() -> Iterator[ModuleType]:
    """The adapter module, over the real winfspy where it imports (Windows), else the stand-in."""
    if _standin.real_binding() is not None:
        import dicomfuse.backends.winfsp as module

        yield module
        return
    with _standin.adapter() as module:
        yield module


@dataclass
class Explorer:
    replayed: Replayed
    replay: ex.Replay
    counting: ex.CountingProxy

    @property
    def backend(self) -> Backend:
        return self.replayed.backend

    def run(self, calls: tuple[ex.Call, ...], **names: str) -> list[ex.Outcome]:
        self.replay.names = {**self.replay.names, **names}
        return self.replay.run(calls)

    def listing(self, path: str) -> list[str]:
        """The names Explorer gets for a folder now (a fresh open and QueryDirectory)."""
        self.run((ex.create_file(path, "look", ex.FILE_OPEN, ex.FOLDER_OPTIONS, ex.LIST),
                  ex.Call("QueryDirectory", handle="look", args=(ex.SMALL_BUFFER,)),
                  ex.Call("close", handle="look")))
        return self.replay.listings["look"]


@pytest.fixture
def explorer(replayed: Replayed, winfsp: ModuleType) -> Explorer:
    counting = ex.CountingProxy(replayed.vfs.dataset)
    replayed.vfs.dataset = counting  # every store request now goes through the counter
    operations = winfsp.WinFspOperations(replayed.vfs, "DICOMFuse")
    replay = ex.Replay(operations, winfsp.NTStatusError, names={"store": replayed.backend.store_name})
    return Explorer(replayed, replay, counting)


def uids(inst: Any) -> dict[str, str]:
    return {"study": inst.study_uid, "series": inst.series_uid, "sop": inst.sop_uid}


# -- browse and copy out -----------------------------------------------------------------------


def test_browse_lists_each_level_pages_and_downloads_nothing(explorer: Explorer, dicom: DicomFactory) -> None:
    series = dicom.series(6)
    explorer.backend.seed(series)
    explorer.run(ex.BROWSE, **uids(series[0]))

    assert explorer.backend.store_name in explorer.replay.listings["root"]
    store = explorer.replay.listings["store"]
    assert store[:2] == [".", ".."] and series[0].study_uid in store  # Orthanc's store is shared by the session
    assert len(store) == len(set(store)), "each study once, across the pages"
    assert explorer.replay.listings["study"] == [".", "..", series[0].series_uid]
    assert explorer.replay.listings["series"] == [".", "..", *sorted(f"{i.sop_uid}.dcm" for i in series)]
    assert explorer.replay.pages["series"] > 1, "the small buffer should have made the FSD page with markers"
    details = explorer.replay.sizes["details"]
    assert details == (series[0].path.stat().st_size if explorer.backend.sizes_known else 0)
    assert explorer.counting.calls["store.retrieve"] == 0, "browsing must not download an instance"


def test_copy_out_reads_the_stored_bytes(explorer: Explorer, dicom: DicomFactory) -> None:
    inst = dicom.instance(pixel_bytes=200_000)  # several 64 KiB reads
    explorer.backend.seed([inst])
    explorer.replay.sources = {}
    explorer.run(ex.COPY_OUT, **uids(inst))
    assert explorer.replay.sizes["src"] == inst.path.stat().st_size, "open must tell the true size"
    assert explorer.replay.read["src"] == inst.path.read_bytes() == explorer.backend.server_bytes(inst)


def test_copy_out_by_an_upper_case_suffix(explorer: Explorer, dicom: DicomFactory) -> None:
    inst = dicom.instance()
    explorer.backend.seed([inst])
    upper = tuple(dataclasses.replace(c, path=c.path.replace(".dcm", ".DCM")) for c in ex.COPY_OUT)
    explorer.run(upper, **uids(inst))
    assert explorer.replay.read["src"] == inst.path.read_bytes()


# -- copy in -------------------------------------------------------------------------------------


def test_drag_into_a_store_folder_uploads_the_file(explorer: Explorer, dicom: DicomFactory) -> None:
    inst = dicom.instance(name="scan-0001.dcm")
    explorer.replay.sources = {"scan-0001.dcm": inst.path.read_bytes()}
    explorer.run(ex.DRAG_INTO_STORE, name="scan-0001.dcm")
    assert explorer.backend.has(inst)
    assert explorer.backend.server_bytes(inst) == inst.path.read_bytes()
    assert inst.study_uid in explorer.listing("\\{store}")


def test_drag_into_the_dataset_level_is_refused(explorer: Explorer, dicom: DicomFactory) -> None:
    inst = dicom.instance(name="scan-0002.dcm")
    explorer.replay.sources = {"scan-0002.dcm": inst.path.read_bytes()}
    explorer.run(ex.DRAG_INTO_ROOT, name="scan-0002.dcm")
    assert not explorer.backend.has(inst)
    assert "scan-0002.dcm" not in explorer.listing("\\")


def test_drag_into_a_series_folder_with_overwrite_if(explorer: Explorer, dicom: DicomFactory) -> None:
    first, new = dicom.series(2)
    explorer.backend.seed([first])
    explorer.replay.sources = {new.sop_uid: new.path.read_bytes()}
    explorer.run(ex.DRAG_INTO_SERIES, **uids(new))
    assert explorer.backend.has(new)  # (has() first: the local store's view rescans for a UID it lacks)
    assert explorer.backend.server_bytes(new) == new.path.read_bytes()
    assert f"{new.sop_uid}.dcm" in explorer.listing("\\{store}\\{study}\\{series}")


def test_replace_an_instance_puts_the_new_bytes_on_the_server(explorer: Explorer, dicom: DicomFactory) -> None:
    old = dicom.instance()
    explorer.backend.seed([old])
    changed = write_instance(dicom.folder / "changed" / "x.dcm", old.study_uid, old.series_uid, old.sop_uid,
                             pixel_bytes=9000, patient_name=PATIENT_NAME)
    assert changed.read_bytes() != old.path.read_bytes()
    explorer.replay.sources = {old.sop_uid: changed.read_bytes()}
    outcomes = explorer.run(ex.OVERWRITE, **uids(old))
    assert [o.call.op for o in outcomes][:1] == ["CreateFile"]
    assert explorer.backend.has(old)
    assert explorer.backend.server_bytes(old) == changed.read_bytes()


def test_a_file_that_is_not_dicom(explorer: Explorer, caplog: pytest.LogCaptureFixture) -> None:
    """FlushFileBuffers gets the refusal; a plain copy (no flush) sees success everywhere, as
    Explorer does, and the file is missing from its folder afterwards; the log says why."""
    junk = b"not a DICOM file\r\n" * 500
    explorer.replay.sources = {"notes.dcm": junk, "memo.dcm": junk}
    explorer.run(ex.REFUSED_WITH_FLUSH, name="notes.dcm")
    with caplog.at_level(logging.ERROR):
        explorer.run(ex.REFUSED_AT_CLOSE, name="memo.dcm")
    listing = explorer.listing("\\{store}")
    assert "notes.dcm" not in listing and "memo.dcm" not in listing
    assert any("memo.dcm" in r.getMessage() and "kept" in r.getMessage() for r in caplog.records)
    assert explorer.counting.calls["store.store_files"] == 0, "nothing that is not DICOM is sent"


def test_a_cancelled_copy_leaves_nothing_on_the_server(explorer: Explorer, dicom: DicomFactory,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    first, new = dicom.series(2, pixel_bytes=150_000)
    explorer.backend.seed([first])
    explorer.replay.sources = {new.sop_uid: new.path.read_bytes()}
    with caplog.at_level(logging.INFO):
        explorer.run(ex.CANCELLED_COPY_IN, **uids(new))
    assert not explorer.backend.has(new)
    assert explorer.counting.calls["store.store_files"] == 0
    assert f"{new.sop_uid}.dcm" not in explorer.listing("\\{store}\\{study}\\{series}")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "a cancel is no failure"
    assert not any(explorer.replayed.vfs.spool.failed.iterdir()), "nothing kept as a failed upload"


# -- delete --------------------------------------------------------------------------------------


def test_delete_removes_the_instance_at_the_server(explorer: Explorer, dicom: DicomFactory) -> None:
    gone, kept = dicom.series(2)
    explorer.backend.seed([gone, kept])
    assert explorer.backend.can_delete
    explorer.run(ex.DELETE, **uids(gone))
    assert not explorer.backend.has(gone)
    assert explorer.backend.has(kept)
    assert explorer.replay.listings["series"] == [".", "..", f"{kept.sop_uid}.dcm"]


# -- new folders -----------------------------------------------------------------------------------


def test_new_folder_renamed_to_a_store_id(explorer: Explorer) -> None:
    new = f"store-{uuid.uuid4().hex[:8]}"
    can = explorer.backend.can_create_stores
    explorer.run(ex.new_folder_renamed(ex.OK if can else ex.DENIED), new=new)
    root = explorer.listing("\\")
    if can:
        assert explorer.backend.store_ids is not None and new in explorer.backend.store_ids()
        assert new in root and "New folder" not in root
        explorer.run(ex.delete_folder("\\{new}"))  # an empty store: deleted at the server
        assert new not in explorer.backend.store_ids()
        assert new not in explorer.listing("\\")
    else:  # a plain DICOMweb server cannot create stores: refused, the folder stays as it was
        assert "New folder" in root and new not in root


def test_new_folder_never_renamed_stays_on_this_computer(explorer: Explorer) -> None:
    explorer.run(ex.NEW_FOLDER_KEPT)
    assert "New folder" in explorer.replay.listings["root"]
    backend = explorer.backend
    elsewhere = open_dataset(backend.address, key_file=backend.key_file)  # what the next mount would see
    try:
        assert "New folder" not in list(elsewhere.list_stores())
    finally:
        elsewhere.close()


def test_a_new_folder_can_be_opened_and_deleted(explorer: Explorer) -> None:
    explorer.run(ex.NEW_FOLDER_KEPT)
    assert explorer.listing("\\New folder") == [".", ".."]  # the user opens it
    explorer.run(ex.delete_folder("\\New folder"))  # can_delete lists it to check it is empty
    assert "New folder" not in explorer.listing("\\")


def test_a_store_with_studies_cannot_be_deleted(explorer: Explorer, dicom: DicomFactory) -> None:
    inst = dicom.instance()
    explorer.backend.seed([inst])
    explorer.run(ex.delete_folder("\\{store}", "STATUS_DIRECTORY_NOT_EMPTY"))
    assert explorer.backend.has(inst)


def test_new_folder_below_the_dataset_level_is_refused(explorer: Explorer, dicom: DicomFactory) -> None:
    inst = dicom.instance()
    explorer.backend.seed([inst])
    explorer.run(ex.NEW_FOLDER_DEEPER, **uids(inst))
    explorer.counting.reset()
    explorer.run(ex.NEW_FOLDER_DEEPER, **uids(inst))
    assert explorer.counting.total() == 0, explorer.counting.calls


# -- the shell's own names never reach the server ----------------------------------------------------


@pytest.mark.parametrize("level", ["root", "store", "study", "series"])
def test_shell_files_make_no_server_request(explorer: Explorer, dicom: DicomFactory, level: str) -> None:
    inst = dicom.instance()
    explorer.backend.seed([inst])
    explorer.replay.names = {**explorer.replay.names, **uids(inst)}
    folder = {"root": "", "store": "\\{store}", "study": "\\{store}\\{study}",
              "series": "\\{store}\\{study}\\{series}"}[level]
    explorer.listing(folder or "\\")  # Explorer shows the folder before anything else
    explorer.counting.reset()

    explorer.run(ex.side_files(folder))

    assert explorer.counting.total() == 0, explorer.counting.calls
    assert {"desktop.ini", "Thumbs.db"} <= set(explorer.replay.listings["dir"])
    assert "desktop.ini" not in explorer.listing(folder or "\\"), "deleted again"
