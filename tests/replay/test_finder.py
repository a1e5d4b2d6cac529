"""Finder's flows (tests/replay/finder.py) replayed through the FUSE adapter at the libfuse
boundary, against a started core over each real backend; outcomes are checked at the server.

Every server request the core makes goes through :class:`ServerRecorder`, so a test can say that
nothing but the dragged DICOM bytes reached the server: no ``._*`` companion, no ``.DS_Store``, no
xattr, no "untitled folder". Refusals the system makes Finder trigger by itself must be quiet: no
log line at ERROR (nor WARNING for the probes).
"""

from __future__ import annotations

import errno
import io
import logging
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mfusepy")

from dicomfuse.core.paths import is_gui_folder_name, is_side_file  # noqa: E402
from dicomfuse.core.vfs import Vfs, VfsConfig  # noqa: E402
from dicomfuse.core.workdirs import WorkDirs  # noqa: E402
from dicomfuse.samples import SampleInstance, write_instance  # noqa: E402
from dicomfuse.stores.open import open_dataset  # noqa: E402
from tests.conftest import PATIENT_NAME, Backend, DicomFactory  # noqa: E402
from tests.replay import finder  # noqa: E402
from tests.replay.conftest import Replayed  # noqa: E402
from tests.replay.fuse_boundary import FUSE_MAJOR, OK, FuseBoundary, ReplayResult, Step, replay  # noqa: E402

RENAME_NOREPLACE = 1 << 0  # linux/fs.h
RENAME_EXCHANGE = 1 << 1


# ---------------------------------------------------------------------------------------------
# What reaches the server


@dataclass
class ServerRecorder:
    """Every call the core makes on the dataset and its stores, with the bytes of each upload."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    uploads: list[bytes] = field(default_factory=list)

    def mutations(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [c for c in self.calls if c[0] in ("create_store", "delete_store", "store_files", "delete_instance")]


class _RecordingStore:
    def __init__(self, inner: Any, recorder: ServerRecorder) -> None:
        self._inner, self._recorder = inner, recorder

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self._recorder.calls.append((name, args))
            if name == "store_files":
                self._recorder.uploads.extend(Path(p).read_bytes() for p in args[0])
            return attr(*args, **kwargs)

        return recorded


class _RecordingDataset(_RecordingStore):
    def open_store(self, store_id: str) -> Any:
        self._recorder.calls.append(("open_store", (store_id,)))
        return _RecordingStore(self._inner.open_store(store_id), self._recorder)


def record_server(vfs: Vfs) -> ServerRecorder:
    """Route the (not yet used) core's server requests through a recorder."""
    recorder = ServerRecorder()
    vfs.dataset = _RecordingDataset(vfs.dataset, recorder)  # type: ignore[assignment]
    return recorder


def assert_only_dicom_reached_the_server(recorder: ServerRecorder, backend: Backend, dragged: list[bytes]) -> None:
    for op, args in recorder.calls:
        for arg in args:
            if isinstance(arg, str):
                assert not is_side_file(arg) and not is_gui_folder_name(arg), f"{op}{args} reached the server"
    for payload in recorder.uploads:
        assert payload in dragged, "bytes other than a dragged DICOM file were uploaded (xattr? AppleDouble?)"
    if backend.store_ids is not None:
        for store in backend.store_ids():
            assert not is_side_file(store) and not is_gui_folder_name(store), f"store {store!r} on the server"
    if backend.name == "local":
        for path in Path(backend.address).rglob("*"):
            assert not is_side_file(path.name) and not is_gui_folder_name(path.name), f"{path} on the server"


def at_server(backend: Backend) -> Any:
    """A view of the server that sees what another client (the core) just wrote: the local
    backend's store object keeps its own index, refreshed on an interval, so it is opened anew."""
    if backend.name == "local":
        from dicomfuse.stores.local import LocalDataset

        return LocalDataset(Path(backend.address)).open_store(backend.store_name)
    return backend.server


def has(backend: Backend, inst: SampleInstance) -> bool:
    return any(True for _ in at_server(backend).instances(inst.study_uid, inst.series_uid, inst.sop_uid))


def server_bytes(backend: Backend, inst: SampleInstance) -> bytes:
    sink = io.BytesIO()
    at_server(backend).retrieve(inst.study_uid, inst.series_uid, inst.sop_uid, sink)
    return sink.getvalue()


def errors_logged(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= level]


# ---------------------------------------------------------------------------------------------
# The session: Finder in front of the adapter


@dataclass
class Session:
    boundary: FuseBoundary
    backend: Backend
    server: ServerRecorder
    names: dict[str, str]
    files: dict[str, bytes]

    def replay(self, steps: list[Step], **outcomes: tuple[int, ...]) -> ReplayResult:
        return replay(self.boundary, steps, self.names, files=self.files, outcomes=outcomes)

    def at(self, inst: SampleInstance) -> None:
        self.names.update(study=inst.study_uid, series=inst.series_uid, sop=inst.sop_uid)

    def listing(self, folder: str) -> set[str]:
        rc, entries = self.boundary.readdir(folder.format(**self.names))
        assert rc == 0, f"readdir {folder}: {rc}"
        return {e.name for e in entries} - {".", ".."}


@pytest.fixture
def session(replayed: Replayed, caplog: pytest.LogCaptureFixture) -> Iterator[Session]:
    caplog.set_level(logging.INFO)
    recorder = record_server(replayed.vfs)
    names = {"store": replayed.backend.store_name}
    files = {"._": finder.apple_double(), ".DS_Store": finder.ds_store()}
    with FuseBoundary(replayed.vfs, finder.FINDER) as boundary:
        yield Session(boundary, replayed.backend, recorder, names, files)
    assert PATIENT_NAME not in caplog.text, "a patient name reached a log line"


def same_uids_new_bytes(inst: SampleInstance, folder: Path) -> bytes:
    """Another version of ``inst``: same UIDs, different pixels and size."""
    path = folder / f"new-{inst.sop_uid}.dcm"
    write_instance(path, inst.study_uid, inst.series_uid, inst.sop_uid, pixel_bytes=8192,
                   patient_name="Replaced^Version")
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Browse, and what the system probes by itself


def test_browse_reads_listings_probes_side_names_and_keeps_ds_store_local(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    insts = dicom.series(3)
    session.backend.seed(insts)
    session.at(insts[0])
    names = [f"{i.sop_uid}.dcm" for i in insts]
    steps = [
        *finder.browse_folder("/", ["{store}"]),
        *finder.browse_folder("/{store}", ["{study}"]),
        *finder.browse_folder("/{store}/{study}", ["{series}"]),
        *finder.browse_folder("/{store}/{study}/{series}", names, files=names),
    ]
    for folder in ("/", "/{store}", "/{store}/{study}", "/{store}/{study}/{series}"):
        steps += finder.write_ds_store(folder)
    result = session.replay(steps)

    listed = [{e.name for e in entries} for step, _, entries in result.results if step.op == "readdir"]
    assert session.names["store"] in listed[0] and session.names["study"] in listed[1]
    assert session.names["series"] in listed[2] and set(names) <= listed[3]
    stats = {step.path.rsplit("/", 1)[-1]: st for step, _, st in result.results if step.op == "getattr"}
    sizes = {name: st.size for name, st in stats.items() if name.endswith(".dcm") and not name.startswith("._")}
    assert set(sizes) == set(names)
    if session.backend.sizes_known:
        assert sizes == {f"{i.sop_uid}.dcm": i.path.stat().st_size for i in insts}
    assert result.read["ds2"] == finder.ds_store(), ".DS_Store reads back what Finder wrote"
    assert ".DS_Store" in session.listing("/{store}/{study}/{series}"), "kept on this computer, listed"
    assert session.server.mutations() == [], "browsing changed nothing at the server"
    assert_only_dicom_reached_the_server(session.server, session.backend, [])
    assert errors_logged(caplog) == []


def test_volume_probes_are_refused_quietly(session: Session, caplog: pytest.LogCaptureFixture) -> None:
    before = session.backend.store_ids() if session.backend.store_ids else None
    session.replay(finder.volume_probes())
    assert session.server.mutations() == []
    if before is not None:
        assert session.backend.store_ids() == before
    assert errors_logged(caplog, logging.WARNING) == [], "a probe the system makes by itself is no warning"


def test_system_folders_at_the_dataset_root_never_become_stores(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    """revisiond makes /.DocumentRevisions-V100 on volumes it saves versions on (eclecticlight.co,
    "Managing macOS versioning and the .DocumentRevisions-V100 folder", 2025); the name is a valid
    store ID and not a side name, so the core asks the server to create a store."""
    steps = [Step("mkdir", f"/{name}", (0o755,), ok=(errno.EPERM,), why="system folder")
             for name in (".DocumentRevisions-V100", ".Spotlight-V100", ".fseventsd", ".Trashes")]
    session.replay(steps)
    assert session.server.mutations() == []
    assert errors_logged(caplog, logging.WARNING) == []


# ---------------------------------------------------------------------------------------------
# Copy out


def test_copy_out_after_browsing_reads_the_stored_bytes_in_1mib_chunks_to_eof(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Finder shows the series, then the user drags the last instance out: the listing's stats
    may not know its size yet (Google lists none), the copy must still get every byte."""
    small = dicom.series(2)
    big = dicom.instance(pixel_bytes=(5 * finder.MiB) // 2)
    session.backend.seed([*small, big])
    session.at(big)
    names = [f"{i.sop_uid}.dcm" for i in (*small, big)]  # Finder stats a neighbour before this one
    session.replay(finder.browse_folder("/{store}/{study}/{series}", names, files=names))
    path = "/{store}/{study}/{series}/{sop}.dcm"
    reads_before = len([c for c in session.boundary.trace if c.op == "read"])
    result = session.replay(finder.copy_out(path))
    original = big.path.read_bytes()
    assert result.read["src"] == original == server_bytes(session.backend, big)
    reads = len([c for c in session.boundary.trace if c.op == "read"]) - reads_before
    assert reads == math.ceil(len(original) / finder.MiB) + 1, "1 MiB chunks, then the 0-byte read at EOF"
    learnt = path.format(**session.names) in session.boundary.native.invalidated
    assert learnt == (not session.backend.sizes_known), "a size learnt at open is pushed to the kernel"
    assert session.server.mutations() == []
    assert errors_logged(caplog) == []


# ---------------------------------------------------------------------------------------------
# Drag in


def test_drag_into_a_store_folder_uploads_the_file_and_keeps_its_companion_local(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    inst = dicom.instance(study=7, name="IMG0001.dcm", pixel_bytes=200_000)
    session.files["file"] = inst.path.read_bytes()
    session.replay(finder.drag_in("/{store}", "IMG0001.dcm"))
    assert has(session.backend, inst)
    assert server_bytes(session.backend, inst) == session.files["file"]
    listing = session.listing("/{store}")
    assert inst.study_uid in listing, "the new study shows at once"
    assert "._IMG0001.dcm" in listing, "the AppleDouble companion stays, on this computer only"
    assert len(session.server.uploads) == 1
    assert_only_dicom_reached_the_server(session.server, session.backend, [session.files["file"]])
    assert errors_logged(caplog) == []


def test_drag_into_a_series_folder_uploads_the_file_under_its_uid_name(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    seeded = dicom.instance()
    session.backend.seed([seeded])
    inst = dicom.instance(pixel_bytes=200_000)  # same study and series
    session.at(inst)
    session.files["file"] = inst.path.read_bytes()
    session.replay(finder.drag_in("/{store}/{study}/{series}", "{sop}.dcm"))
    assert server_bytes(session.backend, inst) == session.files["file"]
    assert server_bytes(session.backend, seeded) == seeded.path.read_bytes(), "the neighbour is untouched"
    listing = session.listing("/{store}/{study}/{series}")
    assert {f"{inst.sop_uid}.dcm", f"{seeded.sop_uid}.dcm", f"._{inst.sop_uid}.dcm"} <= listing
    assert_only_dicom_reached_the_server(session.server, session.backend, [session.files["file"]])
    assert errors_logged(caplog) == []


def test_drag_in_survives_finders_zero_byte_placeholder(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    inst = dicom.instance(study=8, name="IMG0002.dcm")
    session.files["file"] = inst.path.read_bytes()
    session.replay(finder.drag_in("/{store}", "IMG0002.dcm", placeholder=True))
    assert server_bytes(session.backend, inst) == session.files["file"]
    assert errors_logged(caplog) == []


# ---------------------------------------------------------------------------------------------
# Replace


@pytest.mark.parametrize("atomic_o_trunc", [True, False], ids=["O_TRUNC-in-open", "open-then-truncate"])
def test_replace_by_reopening_with_o_trunc_overwrites_the_instance(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path,
        atomic_o_trunc: bool) -> None:
    old = dicom.instance()
    session.backend.seed([old])
    session.at(old)
    session.files["file"] = same_uids_new_bytes(old, tmp_path)
    session.replay(finder.replace_by_truncate("/{store}/{study}/{series}", "{sop}.dcm",
                                              atomic_o_trunc=atomic_o_trunc))
    assert server_bytes(session.backend, old) == session.files["file"]
    sops = [i.sop_uid for i in at_server(session.backend).instances(old.study_uid, old.series_uid)]
    assert sops == [old.sop_uid], "one instance under those UIDs, not two"
    _, st = session.boundary.getattr("/{store}/{study}/{series}/{sop}.dcm".format(**session.names))
    assert st is not None and st.size == len(session.files["file"])
    assert_only_dicom_reached_the_server(session.server, session.backend, [session.files["file"]])
    assert errors_logged(caplog) == []


def test_replace_by_deleting_then_copying_overwrites_the_instance(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    old = dicom.instance()
    session.backend.seed([old])
    session.at(old)
    session.files["file"] = same_uids_new_bytes(old, tmp_path)
    session.replay(finder.replace_by_delete("/{store}/{study}/{series}", "{sop}.dcm"))
    assert server_bytes(session.backend, old) == session.files["file"]
    assert_only_dicom_reached_the_server(session.server, session.backend, [session.files["file"]])
    assert errors_logged(caplog) == []


# ---------------------------------------------------------------------------------------------
# Delete


def test_delete_refuses_the_trash_quietly_then_deletes_at_the_server(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    keep = dicom.instance()
    session.backend.seed([keep])
    gone = dicom.instance()
    session.at(gone)
    session.files["file"] = gone.path.read_bytes()
    folder, name = "/{store}/{study}/{series}", "{sop}.dcm"
    session.replay(finder.drag_in(folder, name))  # with its ._ companion
    assert has(session.backend, gone)
    result = session.replay(finder.delete(folder, name))
    assert [rc for step, rc, _ in result.results if step.op == "unlink"] == [0, 0], "the file and its companion"
    assert not has(session.backend, gone)
    assert has(session.backend, keep)
    listing = session.listing(folder)
    assert f"{gone.sop_uid}.dcm" not in listing and f"._{gone.sop_uid}.dcm" not in listing
    assert f"{keep.sop_uid}.dcm" in listing
    assert [c for c in session.server.calls if c[0] == "delete_instance"] == [
        ("delete_instance", (gone.study_uid, gone.series_uid, gone.sop_uid))]
    assert errors_logged(caplog) == [], "the refused .Trashes is not an error"


# ---------------------------------------------------------------------------------------------
# New folder


def test_new_folder_renamed_to_a_store_id_creates_the_store_and_trashing_it_deletes_it(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    new_store = f"finder-{uuid.uuid4().hex[:8]}"
    session.names["new"] = new_store
    creates = session.backend.can_create_stores
    session.replay([
        *finder.new_folder("/"),
        *finder.rename_new_folder("/", "untitled folder", "{new}", ok="store_create"),
    ], store_create=(OK,) if creates else (errno.EPERM,))
    if creates:
        assert session.backend.store_ids is not None and new_store in session.backend.store_ids()
        assert new_store in session.listing("/") and "untitled folder" not in session.listing("/")
        assert session.server.mutations() == [("create_store", (new_store,))]
        session.replay(finder.delete_folder("/", "{new}"))  # a mistake: Move to Trash
        assert new_store not in session.backend.store_ids()
        assert session.server.mutations()[-1] == ("delete_store", (new_store,))
    else:
        assert "untitled folder" in session.listing("/"), "refused: the folder keeps its local name"
        assert [c[0] for c in session.server.mutations()] == ["create_store"]
        rc, _ = session.boundary.getattr(f"/{new_store}")
        assert rc == -errno.ENOENT
    assert_only_dicom_reached_the_server(session.server, session.backend, [])
    assert errors_logged(caplog) == []


def test_new_folder_below_the_dataset_level_is_refused(
        session: Session, dicom: DicomFactory, caplog: pytest.LogCaptureFixture) -> None:
    inst = dicom.instance()
    session.backend.seed([inst])
    session.at(inst)
    for parent in ("/{store}", "/{store}/{study}", "/{store}/{study}/{series}"):
        session.replay([
            Step("getattr", f"{parent}/untitled folder", ok=(errno.ENOENT,), why="[newfolder]"),
            Step("mkdir", f"{parent}/untitled folder", (0o755,), ok=(errno.EPERM,), why="only stores are made"),
        ])
    assert session.server.mutations() == []
    assert errors_logged(caplog) == []


def test_unrenamed_new_folder_disappears_when_the_core_shuts_down(replayed: Replayed, tmp_path: Path) -> None:
    backend = replayed.backend
    core = Vfs(open_dataset(backend.address, key_file=backend.key_file), VfsConfig(), WorkDirs(tmp_path / "core2"))
    core.start()
    try:
        with FuseBoundary(core, finder.FINDER) as boundary:
            replay(boundary, [*finder.new_folder("/"), *finder.new_folder("/", "untitled folder 2")], {})
            _, entries = boundary.readdir("/")
            assert {"untitled folder", "untitled folder 2"} <= {e.name for e in entries}
    finally:
        core.shutdown()
    with FuseBoundary(replayed.vfs, finder.FINDER) as boundary:  # the next core to mount the dataset
        _, entries = boundary.readdir("/")
        assert not {"untitled folder", "untitled folder 2"} & {e.name for e in entries}
        assert boundary.getattr("/untitled folder")[0] == -errno.ENOENT
    if backend.store_ids is not None:
        assert not any(is_gui_folder_name(s) for s in backend.store_ids())


# ---------------------------------------------------------------------------------------------
# Rename flags (libfuse 3): not Finder's, but the same boundary


@pytest.mark.skipif(FUSE_MAJOR != 3, reason="rename flags exist in libfuse 3 only")
@pytest.mark.parametrize("replayed", ["local"], indirect=True)
def test_rename_flags_are_honoured_or_refused(session: Session, dicom: DicomFactory) -> None:
    inst = dicom.instance()
    session.backend.seed([inst])
    session.at(inst)
    folder = "/{store}/{study}/{series}"
    a, b = f"{folder}/._a", f"{folder}/._b"
    session.files.update(a=b"a" * 10, b=b"b" * 20)
    for path, key in ((a, "a"), (b, "b")):
        session.replay([
            Step("create", path, handle=key),
            Step("write_all", path, (finder.Data(key), 4096), handle=key),
            Step("release", path, handle=key),
        ])
    session.replay([
        Step("rename", a, (b, RENAME_NOREPLACE), ok=(errno.EEXIST,), why="mv -n: renameat2(RENAME_NOREPLACE)"),
        Step("rename", a, (b, RENAME_EXCHANGE), ok=(errno.EINVAL, OK), why="renameat2(RENAME_EXCHANGE)"),
    ])
    sizes = {p: session.boundary.getattr(p.format(**session.names))[1] for p in (a, b)}
    assert all(st is not None for st in sizes.values()), "both names still exist"
