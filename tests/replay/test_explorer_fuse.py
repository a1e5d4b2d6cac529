"""Explorer's flows as WinFsp's FUSE layer delivers them (tests/replay/explorer_fuse.py), replayed
through the FUSE adapter at the libfuse boundary over a started core and each real backend (the
local store, Orthanc, the Cloud Healthcare stand-in); outcomes are checked at the server.

This is the Windows mount of Python >= 3.12 (mfusepy over winfsp-x64.dll), which
tests/replay/test_explorer.py (winfspy) does not cover. The server-side checks and the recorder
are test_finder.py's.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mfusepy")

from dicomfuse.backends.options import default_options  # noqa: E402
from dicomfuse.samples import SampleInstance  # noqa: E402
from dicomfuse.stores.open import open_dataset  # noqa: E402
from tests.conftest import PATIENT_NAME, DicomFactory  # noqa: E402
from tests.replay import explorer as ex  # noqa: E402
from tests.replay import explorer_fuse as wf  # noqa: E402
from tests.replay.conftest import Replayed  # noqa: E402
from tests.replay.fuse_boundary import OK, ReplayResult, Stat, Step  # noqa: E402
from tests.replay.test_finder import (  # noqa: E402
    Session,
    assert_only_dicom_reached_the_server,
    at_server,
    errors_logged,
    has,
    record_server,
    same_uids_new_bytes,
    server_bytes,
)

SERIES = "/{store}/{study}/{series}"
INSTANCE = f"{SERIES}/{{sop}}.dcm"


@pytest.fixture
def win(replayed: Replayed, caplog: pytest.LogCaptureFixture) -> Iterator[Session]:
    """Explorer in front of the FUSE adapter, through WinFsp-FUSE, on a freshly mounted volume."""
    caplog.set_level(logging.INFO)
    recorder = record_server(replayed.vfs)
    with wf.WinFspFuseBoundary(replayed.vfs) as boundary:
        session = Session(boundary, replayed.backend, recorder, {"store": replayed.backend.store_name}, {})
        session.replay(wf.mount())
        yield session
    assert PATIENT_NAME not in caplog.text, "a patient name reached a log line"


def explorer_listing(session: Session, folder: str) -> list[str]:
    """What Explorer shows in ``folder`` now: an open and a QueryDirectory."""
    result = session.replay([*wf.create_file(folder, "look", ex.FILE_OPEN, ex.LIST, folder=True, exists=True),
                             *wf.query_directory(folder)])
    return wf.listing(result, folder)


def retrieves(session: Session) -> int:
    return sum(1 for name, _ in session.server.calls if name == "retrieve")


def ops(result: ReplayResult, op: str) -> list[tuple[Step, int]]:
    return [(step, rc) for step, rc, _ in result.results if step.op == op]


# ---------------------------------------------------------------------------------------------
# Browse: listings, probes, one file's details


def test_browse_lists_every_level_and_its_probes_stay_quiet(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    insts = dicom.series(3)
    win.backend.seed(insts)
    win.at(insts[0])
    result = win.replay(wf.browse())

    assert win.names["store"] in wf.listing(result, "/")
    assert ".." not in wf.listing(result, "/"), "WinFsp-FUSE gives the root no dot entries"
    store = wf.listing(result, "/{store}")
    assert store[:2] == [".", ".."] and insts[0].study_uid in store, "(a shared Orthanc holds other studies)"
    assert wf.listing(result, "/{store}/{study}") == [".", "..", insts[0].series_uid]
    assert wf.listing(result, SERIES) == [".", "..", *sorted(f"{i.sop_uid}.dcm" for i in insts)]
    probes = [(step.path, rc) for step, rc, _ in result.results if step.why.startswith("[intf] GetDirInfoByName")]
    assert len(probes) == len(ex.PROBES_AT_ROOT) + 3 * len(ex.PROBES_EVERYWHERE)
    assert all(rc == -errno.ENOENT for _, rc in probes), "desktop.ini, Thumbs.db & co. are found nowhere"
    assert wf.opened_size(result, "details") == insts[0].path.stat().st_size, "the details pane shows the true size"
    assert win.server.mutations() == [] and win.server.uploads == []
    assert_only_dicom_reached_the_server(win.server, win.backend, [])
    assert errors_logged(caplog, logging.WARNING) == [], "a probe Explorer makes by itself is no warning"


@pytest.mark.parametrize("replayed", ["local"], indirect=True)
def test_an_open_for_attributes_only_downloads_nothing(win: Session, dicom: DicomFactory) -> None:
    inst = dicom.instance(pixel_bytes=200_000)
    win.backend.seed([inst])
    win.at(inst)
    win.replay(wf.open_folder(SERIES, probes=()))
    before = retrieves(win)
    win.replay([*wf.create_file(INSTANCE, "details", ex.FILE_OPEN, ex.ATTRIBUTES, exists=True),
                *wf.close(INSTANCE, "details")])
    deadline = time.monotonic() + 1.0  # the cache downloads on its own threads
    while retrieves(win) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert retrieves(win) == before, "the details pane (or a delete) downloaded the instance"


# ---------------------------------------------------------------------------------------------
# Copy out


def test_copy_out_reads_the_stored_bytes_in_64k_reads(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Explorer shows the series, then the user drags the instance out: the size the Open hands
    Windows must be the true one (Google lists none), or the copy comes out short."""
    neighbour = dicom.instance()
    inst = dicom.instance(pixel_bytes=200_000)
    win.backend.seed([neighbour, inst])
    win.at(inst)
    win.replay(wf.open_folder(SERIES))
    original = inst.path.read_bytes()
    result = win.replay(wf.copy_out(INSTANCE, len(original)))

    assert wf.opened_size(result, "src") == len(original), "Windows would read no further than this"
    assert wf.reads(result, "src") == original == server_bytes(win.backend, inst)
    assert len(ops(result, "read")) == math.ceil(len(original) / wf.CHUNK)
    assert win.server.mutations() == []
    assert errors_logged(caplog) == []


def test_upper_case_dcm_names_find_and_copy_the_instance(win: Session, dicom: DicomFactory) -> None:
    """WinFsp-FUSE mounts case-sensitive ([loop]): "<uid>.DCM" reaches getattr as typed."""
    inst = dicom.instance(pixel_bytes=100_000)
    win.backend.seed([inst])
    win.at(inst)
    upper = f"{SERIES}/{{sop}}.DCM"
    original = inst.path.read_bytes()
    result = win.replay([*wf.find_file(SERIES, "{sop}.DCM", exists=True), *wf.copy_out(upper, len(original))])
    assert wf.opened_size(result, "src") == len(original)
    assert wf.reads(result, "src") == original


# ---------------------------------------------------------------------------------------------
# Drag in


def test_drag_into_a_store_folder_uploads_the_file_once(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    inst = dicom.instance(study=7, name="scan-0001.dcm", pixel_bytes=200_000)
    data = inst.path.read_bytes()
    win.names["name"] = "scan-0001.dcm"
    win.files.update(wf.split("file", data))
    result = win.replay(wf.drag_into_store("file", len(data)))

    assert [rc for _, rc in ops(result, "fsync")] == [0], "FlushFileBuffers: the upload, and its status"
    assert has(win.backend, inst)
    assert server_bytes(win.backend, inst) == data
    assert win.server.uploads == [data], "one upload, at the flush; the close sends nothing more"
    assert inst.study_uid in explorer_listing(win, "/{store}")
    assert_only_dicom_reached_the_server(win.server, win.backend, [data])
    assert errors_logged(caplog) == []


def test_drag_into_a_series_folder_uploads_the_file(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    seeded, new = dicom.series(2, pixel_bytes=150_000)
    win.backend.seed([seeded])
    win.at(new)
    data = new.path.read_bytes()
    win.files.update(wf.split("file", data))
    win.replay(wf.drag_into_series("file", len(data)))

    assert has(win.backend, new)
    assert server_bytes(win.backend, new) == data
    assert server_bytes(win.backend, seeded) == seeded.path.read_bytes(), "the neighbour is untouched"
    assert {f"{new.sop_uid}.dcm", f"{seeded.sop_uid}.dcm"} <= set(explorer_listing(win, SERIES))
    assert_only_dicom_reached_the_server(win.server, win.backend, [data])
    assert errors_logged(caplog) == []


def test_replace_of_an_existing_instance_puts_the_new_bytes_on_the_server(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """"Replace the file in the destination": FILE_OVERWRITE_IF; WinFsp-FUSE opens O_WRONLY (no
    O_TRUNC) and then sends ftruncate(0) as the Overwrite ([intf])."""
    old = dicom.instance()
    win.backend.seed([old])
    win.at(old)
    new = same_uids_new_bytes(old, tmp_path)
    assert new != old.path.read_bytes()
    win.files.update(wf.split("file", new))
    result = win.replay(wf.replace("file", len(new)))

    assert [step.args for step, _ in ops(result, "truncate")][:1] == [(0,)], "the Overwrite"
    assert server_bytes(win.backend, old) == new
    sops = [i.sop_uid for i in at_server(win.backend).instances(old.study_uid, old.series_uid)]
    assert sops == [old.sop_uid], "one instance under those UIDs, not two"
    assert win.server.uploads == [new]
    assert errors_logged(caplog) == []


# ---------------------------------------------------------------------------------------------
# Delete, and a cancelled copy


def test_delete_removes_the_instance_at_the_server(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    gone, kept = dicom.series(2)
    win.backend.seed([gone, kept])
    win.at(gone)
    unlink_ok = (OK,) if win.backend.can_delete else (errno.EPERM,)
    steps = [dataclasses.replace(s, ok=unlink_ok) if s.op == "unlink" else s for s in wf.delete(SERIES, "{sop}.dcm")]
    result = win.replay(steps)

    assert [wf.nt_status(rc) for _, rc in ops(result, "mkdir")] == ["STATUS_ACCESS_DENIED"], "no Recycle Bin"
    if win.backend.can_delete:
        assert not has(win.backend, gone)
        assert wf.listing(result, SERIES) == [".", "..", f"{kept.sop_uid}.dcm"], "gone from its folder at once"
    else:
        assert has(win.backend, gone)
    assert has(win.backend, kept)
    assert [c for c in win.server.mutations() if c[0] != "delete_instance"] == []
    assert errors_logged(caplog) == [], "the refused $RECYCLE.BIN is not an error"


def test_a_cancelled_copy_uploads_nothing(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    first, new = dicom.series(2, pixel_bytes=150_000)
    win.backend.seed([first])
    win.at(new)
    data = new.path.read_bytes()
    win.files.update(wf.split("file", data))
    win.replay(wf.cancelled_copy_in(INSTANCE, "file", len(data)))

    assert not has(win.backend, new), "the partial file is an instance at the server now"
    assert win.server.uploads == [], "the partial file was sent"
    assert f"{new.sop_uid}.dcm" not in explorer_listing(win, SERIES)
    assert errors_logged(caplog, logging.WARNING) == [], "a cancel is no failure"


# ---------------------------------------------------------------------------------------------
# New folder


def test_new_folder_renamed_to_a_store_id_creates_the_store(
        win: Session, caplog: pytest.LogCaptureFixture) -> None:
    new = f"store-{uuid.uuid4().hex[:8]}"
    win.names["new"] = new
    can = win.backend.can_create_stores
    result = win.replay(wf.new_folder_renamed(rename_ok=(OK,) if can else (errno.EPERM,)))
    root = explorer_listing(win, "/")
    if can:
        assert win.backend.store_ids is not None and new in win.backend.store_ids()
        assert new in root and "New folder" not in root
        assert win.server.mutations() == [("create_store", (new,))]
        win.replay(wf.delete_folder("/{new}"))  # an empty store: CanDelete lists it, Cleanup rmdirs it
        assert new not in win.backend.store_ids()
        assert new not in explorer_listing(win, "/")
    else:
        (_, rc), = ops(result, "rename")
        assert wf.nt_status(rc) == "STATUS_ACCESS_DENIED"
        assert "New folder" in root and new not in root, "refused: the folder keeps its local name"
    assert_only_dicom_reached_the_server(win.server, win.backend, [])
    assert errors_logged(caplog) == []


def test_new_folder_renamed_onto_an_existing_store_never_reaches_the_adapter(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    """MoveFileEx without MOVEFILE_REPLACE_EXISTING onto a name that exists: WinFsp-FUSE's Rename
    answers STATUS_OBJECT_NAME_COLLISION itself ([intf] fsp_fuse_intf_Rename)."""
    inst = dicom.instance()
    win.backend.seed([inst])
    result = win.replay([
        *wf.create_file("/New folder", "nf", ex.FILE_CREATE, ex.LIST, folder=True, exists=False),
        *wf.create_file("/New folder", "mv", ex.FILE_OPEN, ex.MOVE, folder=True, exists=True),
        *wf.rename("/New folder", "/{store}", exists=True),
    ])
    assert ops(result, "rename") == []
    assert has(win.backend, inst) and win.server.mutations() == []
    assert {"New folder", win.names["store"]} <= set(explorer_listing(win, "/"))
    assert errors_logged(caplog) == []


def test_new_folder_never_renamed_stays_on_this_computer(win: Session) -> None:
    result = win.replay(wf.new_folder_kept())
    assert "New folder" in wf.listing(result, "/")
    assert win.server.mutations() == []
    backend = win.backend
    elsewhere = open_dataset(backend.address, key_file=backend.key_file)  # what the next mount would see
    try:
        assert "New folder" not in list(elsewhere.list_stores())
    finally:
        elsewhere.close()


def test_new_folder_below_the_dataset_level_is_refused(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    inst = dicom.instance()
    win.backend.seed([inst])
    win.at(inst)
    for parent in ("/{store}/{study}", "/{store}", SERIES):
        result = win.replay(wf.new_folder_below(parent))
        assert [wf.nt_status(rc) for _, rc in ops(result, "mkdir")] == ["STATUS_ACCESS_DENIED"], parent
    assert "New folder" not in explorer_listing(win, "/{store}/{study}")
    assert win.server.mutations() == []
    assert errors_logged(caplog) == []


# ---------------------------------------------------------------------------------------------
# The shell's own files


@pytest.mark.parametrize("folder", ["/", "/{store}", "/{store}/{study}", SERIES])
def test_desktop_ini_and_thumbs_db_stay_on_this_computer(
        win: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture, folder: str) -> None:
    inst = dicom.instance()
    win.backend.seed([inst])
    win.at(inst)
    for name in ("desktop.ini", "Thumbs.db"):
        win.files.update(wf.split(name, wf.SIDE_FILE))
    result = win.replay(wf.side_files(folder))

    assert {"desktop.ini", "Thumbs.db"} <= set(wf.listing(result, folder))
    after = explorer_listing(win, folder)
    assert "desktop.ini" not in after and "Thumbs.db" in after, "deleted again / kept"
    assert win.server.mutations() == [] and win.server.uploads == []
    assert_only_dicom_reached_the_server(win.server, win.backend, [])
    assert errors_logged(caplog) == []


# ---------------------------------------------------------------------------------------------
# Who may write: uid=-1,gid=-1 ([fuse.c], [posix], [security])


def _stats(win: Session, inst: SampleInstance) -> dict[str, Stat]:
    """What getattr gives WinFsp-FUSE for the root, a store and an instance (the adapter's
    uid/gid are 0, as on Windows)."""
    win.at(inst)
    out: dict[str, Stat] = {}
    for path in ("/", "/{store}", INSTANCE):
        rc, st = win.boundary.getattr(path.format(**win.names))
        assert rc == 0 and st is not None
        out[path] = st
    return out


@pytest.mark.parametrize("replayed", ["local"], indirect=True)
def test_with_uid_and_gid_minus_one_explorer_owns_what_it_sees(win: Session, dicom: DicomFactory) -> None:
    inst = dicom.instance()
    win.backend.seed([inst])
    stats = _stats(win, inst)
    assert wf.may_add_to(stats["/"], wf.WINFSP_FUSE_OPTIONS), "New folder at the dataset level"
    assert wf.may_add_to(stats["/{store}"], wf.WINFSP_FUSE_OPTIONS), "drag into a store"
    assert wf.access_for_user(stats[INSTANCE], wf.WINFSP_FUSE_OPTIONS) & 2, "replace"


@pytest.mark.parametrize("replayed", ["local"], indirect=True)
def test_the_default_windows_options_let_explorer_write(win: Session, dicom: DicomFactory) -> None:
    inst = dicom.instance()
    win.backend.seed([inst])
    stats = _stats(win, inst)
    defaults = default_options("win32")
    assert wf.may_add_to(stats["/{store}"], defaults)
