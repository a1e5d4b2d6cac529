"""LocalDataset / LocalStore against real files in tmp_path."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGBaseline8Bit

from dicomfuse import samples
from dicomfuse.dicomfile import DicomUids, check_upload
from dicomfuse.stores import local
from dicomfuse.stores.base import (
    AlreadyExists,
    Dataset,
    InstanceInfo,
    InvalidName,
    NotEmpty,
    NotFound,
    Store,
)
from dicomfuse.stores.local import LocalDataset, LocalStore
from tests.conftest import PATIENT_NAME

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def dataset(tmp_path: Path) -> LocalDataset:
    root = tmp_path / "dataset"
    root.mkdir()
    return LocalDataset(root, rescan_interval=0)


@pytest.fixture
def store(dataset: LocalDataset) -> LocalStore:
    dataset.create_store("s")
    return dataset.open_store("s")


def write(path: Path, study: str = STUDY, series: str = SERIES, sop: str = SOP, **kwargs: object) -> Path:
    return samples.write_instance(path, study, series, sop, **kwargs)


def uid(*parts: object) -> str:
    return samples.make_uid("test", *parts)


def read_back(store: LocalStore, study: str, series: str, sop: str) -> bytes:
    sink = io.BytesIO()
    count = store.retrieve(study, series, sop, sink)
    assert count == len(sink.getvalue())
    return sink.getvalue()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def age(tree: Path, seconds: float = 60) -> None:
    """Backdate every mtime under ``tree`` so its folders count as settled."""
    past = time.time() - seconds
    for folder, _, files in os.walk(tree):
        for name in files:
            os.utime(os.path.join(folder, name), (past, past))
        os.utime(folder, (past, past))


# ---------------------------------------------------------------------------------------------
# Protocol and dataset


def test_satisfies_the_protocols(dataset: LocalDataset, store: LocalStore) -> None:
    assert isinstance(dataset, Dataset)
    assert isinstance(store, Store)
    assert store.name == "s"
    dataset.close()


def test_list_stores_sorted_skipping_hidden_and_files(dataset: LocalDataset) -> None:
    for name in ("zeta", "alpha", ".hidden", "Mid"):
        (dataset.root / name).mkdir()
    (dataset.root / "file.dcm").write_bytes(b"x")
    assert list(dataset.list_stores()) == ["Mid", "alpha", "zeta"]


def test_list_stores_of_a_missing_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        list(LocalDataset(tmp_path / "absent").list_stores())


@pytest.mark.parametrize("name", ["a", "A-b_c.1", "x" * 255, "1.2.3"])
def test_create_store_valid_names(dataset: LocalDataset, name: str) -> None:
    dataset.create_store(name)
    assert (dataset.root / name).is_dir()
    assert list(dataset.list_stores()) == [name]
    assert list(dataset.open_store(name).studies()) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "a b", "x" * 257, ".hidden", "a\n", "a;b", "a\0"])
def test_create_store_invalid_names(dataset: LocalDataset, name: str) -> None:
    with pytest.raises(InvalidName):
        dataset.create_store(name)
    assert list(dataset.list_stores()) == []


def test_create_store_name_too_long_for_the_file_system(dataset: LocalDataset) -> None:
    try:
        dataset.create_store("x" * 256)  # valid ID; most file systems allow 255 bytes
    except InvalidName:
        assert list(dataset.list_stores()) == []
    else:
        assert list(dataset.list_stores()) == ["x" * 256]


def test_create_existing_store(dataset: LocalDataset) -> None:
    dataset.create_store("s")
    with pytest.raises(AlreadyExists):
        dataset.create_store("s")


def test_store_opened_before_creation_works_right_after(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    dataset = LocalDataset(root, rescan_interval=3600)
    early = dataset.open_store("later")
    with pytest.raises(NotFound):
        list(early.studies())
    dataset.create_store("later")
    assert list(early.studies()) == []
    assert dataset.open_store("later") is early


@pytest.mark.parametrize("boot_seconds", [5.0, 100_000.0], ids=["just-booted", "up-for-a-day"])
def test_a_study_written_by_another_process_is_found_by_its_uid_on_a_machine_just_booted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boot_seconds: float) -> None:
    """The monotonic clock counts from boot: "never checked" was 0.0, which is less than the
    rescan interval ago for the first hour after a machine starts, so a study the index lacked
    was not looked for in the folder tree."""
    monkeypatch.setattr(local.time, "monotonic", lambda: boot_seconds)
    root = tmp_path / "d"
    (root / "s").mkdir(parents=True)
    store = LocalDataset(root, rescan_interval=3600).open_store("s")
    assert list(store.studies()) == []  # index built; the next periodic check is an hour away
    samples.write_instance(root / "s" / "new.dcm", STUDY, SERIES, SOP)
    assert [i.sop_uid for i in store.walk(STUDY)] == [SOP]
    assert list(store.studies(STUDY)) == [STUDY]


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../escape"])
def test_open_store_rejects_names_that_cannot_be_stores(dataset: LocalDataset, name: str) -> None:
    with pytest.raises(NotFound):
        dataset.open_store(name)


def test_missing_store_fails_on_first_use(dataset: LocalDataset, tmp_path: Path) -> None:
    store = dataset.open_store("absent")
    with pytest.raises(NotFound):
        list(store.studies())
    with pytest.raises(NotFound):
        list(store.series(STUDY))
    with pytest.raises(NotFound):
        list(store.instances(STUDY, SERIES))
    with pytest.raises(NotFound):
        store.retrieve(STUDY, SERIES, SOP, io.BytesIO())
    with pytest.raises(NotFound):
        store.store_files([write(tmp_path / "in.dcm")])
    with pytest.raises(NotFound):
        store.delete_instance(STUDY, SERIES, SOP)


def test_delete_store(dataset: LocalDataset, store: LocalStore) -> None:
    (dataset.root / "s" / "empty" / "nested").mkdir(parents=True)
    dataset.delete_store("s")
    assert not (dataset.root / "s").exists()
    assert list(dataset.list_stores()) == []
    with pytest.raises(NotFound):
        list(store.studies())


def test_delete_absent_store(dataset: LocalDataset) -> None:
    with pytest.raises(NotFound):
        dataset.delete_store("absent")
    (dataset.root / "file").write_bytes(b"")
    with pytest.raises(NotFound):
        dataset.delete_store("file")


def test_delete_store_with_instances_is_refused(dataset: LocalDataset, store: LocalStore, tmp_path: Path) -> None:
    assert store.store_files([write(tmp_path / "in.dcm")])[0].stored
    with pytest.raises(NotEmpty):
        dataset.delete_store("s")
    assert list(store.studies()) == [STUDY]


@pytest.mark.parametrize("leftover", ["notes.txt", "deep/er/.DS_Store", "garbage.dcm"])
def test_delete_store_with_any_file_is_refused(dataset: LocalDataset, store: LocalStore, leftover: str) -> None:
    path = dataset.root / "s" / leftover
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"keep me")
    with pytest.raises(NotEmpty):
        dataset.delete_store("s")
    assert path.read_bytes() == b"keep me"


def test_recreated_store_starts_empty(dataset: LocalDataset, store: LocalStore, tmp_path: Path) -> None:
    store.store_files([write(tmp_path / "in.dcm")])
    store.delete_instance(STUDY, SERIES, SOP)
    dataset.delete_store("s")
    dataset.create_store("s")
    assert list(dataset.open_store("s").studies()) == []


# ---------------------------------------------------------------------------------------------
# Index of files placed by others


@pytest.fixture
def populated(store: LocalStore) -> dict[str, Path]:
    """Files with arbitrary names and depths, plus files that must be skipped."""
    root = store._root
    study2, series2 = uid("study", 2), uid("series", 2)
    files = {
        "plain": write(root / "a" / "b" / "c" / "IM0001", sop=uid("sop", 1)),
        "upper": write(root / "x.DCM", sop=uid("sop", 2)),
        "uid_name": write(root / f"{uid('sop', 3)}", sop=uid("sop", 3)),
        "other_study": write(root / "deep" / "er" / "file.dcm", study2, series2, uid("sop", 4)),
        "other_series": write(root / "file2.dcm", STUDY, series2, uid("sop", 5)),
    }
    write(root / "dicom.txt", sop=uid("skipped", "ext"))  # wrong extension: not even read
    write(root / ".hidden.dcm", sop=uid("skipped", "hidden"))
    write(root / ".hidden" / "in.dcm", sop=uid("skipped", "hidden-dir"))
    (root / "garbage.dcm").write_bytes(os.urandom(3000))
    (root / "empty").write_bytes(b"")
    (root / "README").write_text("not DICOM")
    no_sop = samples.make_dataset(STUDY, SERIES, uid("skipped", "no-sop"))
    del no_sop.SOPInstanceUID
    no_sop.save_as(root / "nosop.dcm", enforce_file_format=True)
    raw = write(root / "raw-src.dcm", sop=uid("skipped", "raw")).read_bytes()
    (root / "raw-src.dcm").unlink()
    (root / "no-preamble.dcm").write_bytes(raw[132:])
    return files


def test_index_of_nested_files_with_arbitrary_names(store: LocalStore, populated: dict[str, Path]) -> None:
    study2, series2 = uid("study", 2), uid("series", 2)
    assert list(store.studies()) == sorted([STUDY, study2])
    assert list(store.series(STUDY)) == sorted([SERIES, series2])
    assert list(store.series(study2)) == [series2]
    assert [i.sop_uid for i in store.instances(STUDY, SERIES)] == sorted(uid("sop", n) for n in (1, 2, 3))
    assert [i.sop_uid for i in store.instances(STUDY, series2)] == [uid("sop", 5)]
    assert [i.sop_uid for i in store.instances(study2, series2)] == [uid("sop", 4)]


def test_sizes_are_file_sizes(store: LocalStore, populated: dict[str, Path]) -> None:
    sizes = {i.sop_uid: i.size for i in store.instances(STUDY, SERIES)}
    assert sizes == {
        uid("sop", 1): populated["plain"].stat().st_size,
        uid("sop", 2): populated["upper"].stat().st_size,
        uid("sop", 3): populated["uid_name"].stat().st_size,
    }


def test_lookups_by_uid(store: LocalStore, populated: dict[str, Path]) -> None:
    assert list(store.studies(STUDY)) == [STUDY]
    assert list(store.studies("1.2.3.999")) == []
    assert list(store.series(STUDY, SERIES)) == [SERIES]
    assert list(store.series(STUDY, "1.2.3.999")) == []
    assert list(store.series("1.2.3.999")) == []
    found = list(store.instances(STUDY, SERIES, uid("sop", 2)))
    assert found == [InstanceInfo(STUDY, SERIES, uid("sop", 2), populated["upper"].stat().st_size)]
    assert list(store.instances(STUDY, SERIES, "1.2.3.999")) == []
    assert list(store.instances(STUDY, "1.2.3.999")) == []
    assert list(store.instances("1.2.3.999", SERIES)) == []


def test_retrieve_returns_identical_bytes(store: LocalStore, populated: dict[str, Path]) -> None:
    data = read_back(store, STUDY, SERIES, uid("sop", 1))
    assert data == populated["plain"].read_bytes()


def test_retrieve_large_file_in_chunks(store: LocalStore) -> None:
    path = write(store._root / "big.dcm", pixel_bytes=3 * local.CHUNK_SIZE)

    class CountingSink(io.BytesIO):
        writes = 0

        def write(self, data: bytes) -> int:  # type: ignore[override]
            self.writes += 1
            return super().write(data)

    sink = CountingSink()
    assert store.retrieve(STUDY, SERIES, SOP, sink) == path.stat().st_size
    assert sink.getvalue() == path.read_bytes()
    assert sink.writes == 4


def test_retrieve_absent_instance(store: LocalStore, populated: dict[str, Path]) -> None:
    with pytest.raises(NotFound):
        store.retrieve(STUDY, SERIES, "1.2.3.999", io.BytesIO())
    with pytest.raises(NotFound):
        store.retrieve(STUDY, "1.2.3.999", uid("sop", 1), io.BytesIO())


def test_retrieve_file_removed_behind_the_index(dataset: LocalDataset, tmp_path: Path) -> None:
    (dataset.root / "s").mkdir()
    store = LocalDataset(dataset.root, rescan_interval=3600).open_store("s")
    path = write(store._root / "x.dcm")
    assert list(store.studies()) == [STUDY]
    path.unlink()
    with pytest.raises(NotFound):
        store.retrieve(STUDY, SERIES, SOP, io.BytesIO())
    assert list(store.instances(STUDY, SERIES)) == []  # sizes come from a stat: vanished is skipped


def test_retrieve_propagates_sink_errors(store: LocalStore) -> None:
    write(store._root / "x.dcm")

    class FullSink(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as info:
        store.retrieve(STUDY, SERIES, SOP, FullSink())
    assert not isinstance(info.value, NotFound)


def test_duplicate_sop_files_are_listed_once(store: LocalStore) -> None:
    write(store._root / "copy-a.dcm")
    write(store._root / "copy-b.dcm")
    assert [i.sop_uid for i in store.instances(STUDY, SERIES)] == [SOP]


def test_a_duplicate_sop_is_read_from_its_canonical_copy(store: LocalStore, tmp_path: Path) -> None:
    write(store._root / "a-first-by-name.dcm", instance_number=1)
    canonical = write(store._root / STUDY / SERIES / f"{SOP}.dcm", instance_number=2)
    assert read_back(store, STUDY, SERIES, SOP) == canonical.read_bytes()
    assert list(store.instances(STUDY, SERIES, SOP)) == list(store.instances(STUDY, SERIES))


def test_work_per_instance_does_not_grow_with_the_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading, looking up, storing or deleting one instance looks at that instance only: a copy
    of a 5,000-instance series was quadratic (each read built the whole series' SOP table)."""
    count = 60
    root = tmp_path / "d"
    sops = [uid("sop", n) for n in range(count)]
    for n, sop in enumerate(sops):
        write(root / "s" / f"{n}.dcm", sop=sop)
    store = LocalDataset(root).open_store("s")  # the default rescan interval, as a mount has
    assert len(list(store.instances(STUDY, SERIES))) == count  # the index is built
    looked_at = {"instances": 0}
    sops_of, primary = local._Index.sops, local._Index._primary

    def counting_sops(index: local._Index, study_uid: str, series_uid: str) -> dict[str, Path]:
        found = sops_of(index, study_uid, series_uid)
        looked_at["instances"] += len(found)
        return found

    def counting_primary(index: local._Index, paths: set[Path]) -> Path:
        looked_at["instances"] += 1
        return primary(index, paths)

    monkeypatch.setattr(local._Index, "sops", counting_sops)
    monkeypatch.setattr(local._Index, "_primary", counting_primary)
    for sop in sops:
        assert read_back(store, STUDY, SERIES, sop)
        assert [i.sop_uid for i in store.instances(STUDY, SERIES, sop)] == [sop]
    assert store.store_files([write(tmp_path / "new.dcm", sop=uid("sop", "new"))])[0].stored
    store.delete_instance(STUDY, SERIES, sops[0])
    assert looked_at["instances"] <= 2 * count + 2  # it was 2 * count * count


# ---------------------------------------------------------------------------------------------
# Refresh


def test_files_added_by_another_process_become_visible(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "s").mkdir(parents=True)
    store = LocalDataset(root).open_store("s")  # default rescan interval
    assert list(store.studies()) == []
    script = (
        "import sys; from pathlib import Path; from dicomfuse.samples import write_instance;"
        f"write_instance(Path(sys.argv[1]), {STUDY!r}, {SERIES!r}, {SOP!r})"
    )
    target = root / "s" / "sub" / "new.dcm"
    subprocess.run([sys.executable, "-c", script, str(target)], check=True)
    wait_for(lambda: list(store.studies()) == [STUDY])
    target.unlink()
    wait_for(lambda: list(store.studies()) == [])


def test_file_rewritten_in_place_shows_its_new_size(store: LocalStore) -> None:
    path = write(store._root / "x.dcm", pixel_bytes=1000)
    assert next(store.instances(STUDY, SERIES)).size == path.stat().st_size
    write(path, pixel_bytes=9000)
    assert next(store.instances(STUDY, SERIES)).size == path.stat().st_size


def test_file_rewritten_in_place_with_other_uids(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "s").mkdir(parents=True)
    store = LocalDataset(root, rescan_interval=0, full_rescan_interval=0.2).open_store("s")
    path = write(store._root / "x.dcm")
    age(store._root)
    assert list(store.studies()) == [STUDY]
    other = uid("study", "replaced")
    write(path, study=other)  # same name, same inode: no folder mtime changes
    age(store._root)
    wait_for(lambda: list(store.studies()) == [other])


def test_unchanged_tree_is_not_parsed_again(
    store: LocalStore, populated: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    age(store._root)
    list(store.studies())  # index with settled mtimes
    calls: list[Path] = []
    real = local._read_indexed_uids

    def counting(path: Path) -> object:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(local, "_read_indexed_uids", counting)
    for _ in range(3):
        list(store.studies())
    assert calls == []
    write(store._root / "a" / "b" / "c" / "IM0002", sop=uid("sop", 99))
    assert uid("sop", 99) in [i.sop_uid for i in store.instances(STUDY, SERIES)]
    assert calls == [store._root / "a" / "b" / "c" / "IM0002"]


def test_rapid_additions_in_the_same_folder_are_all_seen(store: LocalStore) -> None:
    for n in range(5):
        write(store._root / "flat" / f"{n}.dcm", sop=uid("rapid", n))
        assert len(list(store.instances(STUDY, SERIES))) == n + 1


# ---------------------------------------------------------------------------------------------
# store_files


def test_store_files_writes_the_canonical_layout(store: LocalStore, tmp_path: Path) -> None:
    source = write(tmp_path / "upload" / "anything.bin")
    [outcome] = store.store_files([source])
    assert outcome.stored and outcome.reason is None
    assert (outcome.path, outcome.study_uid, outcome.series_uid, outcome.sop_uid) == (source, STUDY, SERIES, SOP)
    target = store._root / STUDY / SERIES / f"{SOP}.dcm"
    assert target.read_bytes() == source.read_bytes()
    assert source.exists()
    assert list(store.instances(STUDY, SERIES)) == [InstanceInfo(STUDY, SERIES, SOP, target.stat().st_size)]
    assert read_back(store, STUDY, SERIES, SOP) == source.read_bytes()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize(
    "transfer_syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian], ids=["deflated", "big-endian"]
)
def test_store_files_other_transfer_syntaxes(store: LocalStore, tmp_path: Path, transfer_syntax: str) -> None:
    source = write(tmp_path / "in.dcm", transfer_syntax=transfer_syntax)
    assert store.store_files([source])[0].stored


def encapsulated_file(path: Path, transfer_syntax: str = JPEGBaseline8Bit) -> Path:
    ds = samples.make_dataset(STUDY, SERIES, SOP, transfer_syntax=transfer_syntax)
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x01" * 2000 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def test_store_files_encapsulated(store: LocalStore, tmp_path: Path) -> None:
    source = encapsulated_file(tmp_path / "jpeg.dcm")
    assert store.store_files([source])[0].stored


def test_a_cut_file_is_refused_in_one_line_without_pydicom_s_warnings(tmp_path: Path) -> None:
    """pydicom warns as it reads a cut file, as a Python warning (printed to the terminal with a
    line of its source) and through its logger (into our log files): the refusal's reason is
    all the user should get. A separate interpreter: pytest resets the warning filters."""
    import subprocess
    import sys

    source = encapsulated_file(tmp_path / "jpeg.dcm")
    cut_file = cut(source, 1000)
    code = ("import logging, sys; logging.basicConfig(level=logging.DEBUG); "
            "from dicomfuse.dicomfile import check_upload; print(check_upload(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(cut_file)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "no readable data set after the file meta information (truncated?)"
    assert done.stderr == ""


@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.8.1",
                                             "1.2.826.0.1.3680043.8.498.77.1"],
                         ids=["jpeg-xl", "deflated-image-frames", "private"])
def test_transfer_syntaxes_newer_than_pydicom_or_private_are_stored_and_cuts_still_refused(
        store: LocalStore, tmp_path: Path, transfer_syntax: str) -> None:
    """pydicom raises ValueError when asked whether a transfer syntax it does not know is
    deflated or encapsulated: such files were refused as 'inconsistent DICOM attributes'."""
    # pydicom writes no transfer syntax it does not know: one of the same padded length, swapped.
    stand_in = {"1.2.840.10008.1.2.4.110": "1.2.840.10008.1.2.4.100",
                "1.2.840.10008.1.2.8.1": "1.2.840.10008.1.2.4.50"}.get(transfer_syntax, transfer_syntax)
    source = encapsulated_file(tmp_path / "new.dcm", stand_in)
    data = source.read_bytes()
    assert data.count(stand_in.encode()) == 1
    source.write_bytes(data.replace(stand_in.encode(), transfer_syntax.encode().ljust(len(stand_in), b"\0")))
    assert check_upload(source) == DicomUids(STUDY, SERIES, SOP)
    assert store.store_files([source])[0].stored
    for keep in (source.stat().st_size - 3, source.stat().st_size // 2):
        assert isinstance(check_upload(cut(source, keep)), str)


def cut(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"cut-{keep}-{path.name}")
    out.write_bytes(data[:keep])
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken input
def test_store_files_refuses_bad_files(store: LocalStore, tmp_path: Path) -> None:
    good = write(tmp_path / "good.dcm", sop=uid("good"))
    text = tmp_path / "text.dcm"
    text.write_text("hello")
    no_sop = samples.make_dataset(STUDY, SERIES, uid("nosop"))
    del no_sop.SOPInstanceUID
    no_sop.save_as(tmp_path / "nosop.dcm", enforce_file_format=True)
    bad_uid = samples.make_dataset(STUDY, "1.2.abc", uid("baduid"))
    bad_uid.save_as(tmp_path / "baduid.dcm", enforce_file_format=True)
    no_preamble = tmp_path / "no-preamble.dcm"
    no_preamble.write_bytes(good.read_bytes()[132:])
    paths = [text, good, tmp_path / "nosop.dcm", tmp_path / "baduid.dcm", no_preamble, tmp_path / "absent.dcm"]

    outcomes = store.store_files(paths)

    assert [o.path for o in outcomes] == paths
    assert [o.stored for o in outcomes] == [False, True, False, False, False, False]
    reasons = [o.reason or "" for o in outcomes]
    assert "Part-10" in reasons[0]
    assert "SOPInstanceUID" in reasons[2]
    assert "SeriesInstanceUID is not a valid UID" in reasons[3]
    assert "Part-10" in reasons[4]
    assert "cannot read" in reasons[5]
    assert [i.sop_uid for s in store.series(STUDY) for i in store.instances(STUDY, s)] == [uid("good")]


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.2, 0.999])
def test_store_files_refuses_truncated_files(store: LocalStore, tmp_path: Path, fraction: float, parsed: str) -> None:
    good = write(tmp_path / "good.dcm", pixel_bytes=8192)
    truncated = cut(good, int(good.stat().st_size * fraction))
    [outcome] = store.store_files([truncated])
    assert not outcome.stored
    assert "truncated" in (outcome.reason or "") or "corrupt" in (outcome.reason or "")
    assert list(store.studies()) == []


@pytest.fixture(params=["in memory", "from the file"])
def parsed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The upload check both ways: small files are read once and parsed in memory, larger ones
    parsed from the file (here: every file, by setting the limit to 0)."""
    from dicomfuse import dicomfile

    if request.param == "from the file":
        monkeypatch.setattr(dicomfile, "_IN_MEMORY_MAX", 0)
    return str(request.param)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken input
def test_store_files_refuses_truncated_files_at_every_cut(store: LocalStore, tmp_path: Path, parsed: str) -> None:
    good = write(tmp_path / "good.dcm", pixel_bytes=64)
    data = good.read_bytes()
    truncated = tmp_path / "t.dcm"
    for keep in range(133, len(data)):
        truncated.write_bytes(data[:keep])
        [outcome] = store.store_files([truncated])
        assert not outcome.stored, f"accepted a file cut at {keep} of {len(data)} bytes"
    assert list(store.studies()) == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken input
def test_store_files_refuses_truncated_encapsulated_file(store: LocalStore, tmp_path: Path, parsed: str) -> None:
    good = encapsulated_file(tmp_path / "jpeg.dcm")
    for keep in (-4, -8, -500):
        [outcome] = store.store_files([cut(good, keep)])
        assert not outcome.stored, keep


def unknown_vr_file(tmp_path: Path) -> Path:
    """Complete DICOM whose SOPInstanceUID element has a VR no standard defines ("UQ")."""
    data = write(tmp_path / "good.dcm").read_bytes()
    at = data.index(b"\x08\x00\x18\x00UI")
    bad = tmp_path / "unknown-vr.dcm"
    bad.write_bytes(data[:at + 4] + b"UQ" + data[at + 6:])
    return bad


def test_a_value_that_cannot_be_read_is_a_refusal_not_an_exception(store: LocalStore, tmp_path: Path,
                                                                    parsed: str) -> None:
    """check_upload returns the reason for every file it cannot accept: an exception escaping it
    failed a copy with EIO, leaked its handle and stopped the next mount from starting."""
    from dicomfuse.dicomfile import check_upload

    bad = unknown_vr_file(tmp_path)
    reason = "inconsistent DICOM attributes (SOPInstanceUID (0008,0018): cannot be read (NotImplementedError))"
    assert check_upload(bad) == reason
    [outcome] = store.store_files([bad])
    assert not outcome.stored and "inconsistent" in (outcome.reason or "")


def test_a_value_that_is_not_a_number_is_named_never_quoted(store: LocalStore, tmp_path: Path, parsed: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """An image attribute holding text (here the patient's name) is refused with a reason naming
    the attribute; the DEBUG line says where it failed, without int()'s message, which would
    quote the value ("invalid literal for int() with base 10: '...'")."""
    from dicomfuse.dicomfile import check_upload

    ds = pydicom.dcmread(write(tmp_path / "good.dcm", patient_name="Anonymous"))
    placeholder = "9" * len(PATIENT_NAME)
    ds.NumberOfFrames = placeholder
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    bad.write_bytes(bad.read_bytes().replace(placeholder.encode(), PATIENT_NAME.encode()))
    with caplog.at_level("DEBUG"):
        reason = check_upload(bad)
        [outcome] = store.store_files([bad])
    assert reason == "inconsistent DICOM attributes (NumberOfFrames (0028,0008): not a number)"
    assert not outcome.stored and outcome.reason == reason
    assert "NumberOfFrames (0028,0008)" in caplog.text
    assert PATIENT_NAME not in caplog.text and PATIENT_NAME.split("^")[0] not in caplog.text


def _sop_element(data: bytes) -> tuple[int, int]:
    """Start and end of the SOPInstanceUID element of an explicit VR little endian file."""
    start = data.index(b"\x08\x00\x18\x00UI")
    return start, start + 8 + int.from_bytes(data[start + 6:start + 8], "little")


def _sop(value: str) -> bytes:
    raw = value.encode() + (b"\0" if len(value) % 2 else b"")
    return b"\x08\x00\x18\x00UI" + len(raw).to_bytes(2, "little") + raw


@pytest.mark.parametrize("layout", ["repeated at the end", "repeated next to it", "moved to the end"])
def test_store_files_refuses_elements_repeated_or_out_of_order(store: LocalStore, tmp_path: Path, parsed: str,
                                                               layout: str) -> None:
    """pydicom keeps the last copy of a repeated element, a server may keep the first: such a
    file would be stored under UIDs other than those the mount shows. Refused at close."""
    data = write(tmp_path / "good.dcm").read_bytes()
    start, end = _sop_element(data)
    other = _sop(uid("other"))
    bad = {"repeated at the end": data + other,
           "repeated next to it": data[:end] + other + data[end:],
           "moved to the end": data[:start] + data[end:] + data[start:end]}[layout]
    path = tmp_path / "bad.dcm"
    path.write_bytes(bad)
    [outcome] = store.store_files([path])
    assert not outcome.stored
    assert outcome.reason == "DICOM elements out of order or repeated (the file's identity would be ambiguous)"
    assert list(store.studies()) == []


def test_store_files_refuses_short_pixel_data(store: LocalStore, tmp_path: Path, parsed: str) -> None:
    ds = samples.make_dataset(STUDY, SERIES, SOP, pixel_bytes=4096)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    [outcome] = store.store_files([tmp_path / "short.dcm"])
    assert not outcome.stored
    assert "pixel data is shorter" in (outcome.reason or "")


@pytest.mark.parametrize("padding", [2, 8, 9, 512, 2048 * 3])
def test_store_files_accepts_trailing_zero_padding(store: LocalStore, tmp_path: Path, parsed: str,
                                                   padding: int) -> None:
    """A file padded with zeros to a block size (an archiver, a CD writer) is complete: 8 zero
    bytes or more read as empty (0000,0000) elements, which sort first and were refused as
    "elements out of order or repeated", though a server (Orthanc) takes the file."""
    path = write(tmp_path / "padded.dcm")
    path.write_bytes(path.read_bytes() + b"\0" * padding)
    [outcome] = store.store_files([path])
    assert outcome.stored, outcome.reason
    assert read_back(store, STUDY, SERIES, SOP) == path.read_bytes()


@pytest.mark.parametrize("tail", [b"\0" * 12 + b"\1", b"\0" * ((1 << 20) + 8)])
def test_store_files_refuses_what_follows_the_data_set_unless_it_is_zero_padding(
        store: LocalStore, tmp_path: Path, parsed: str, tail: bytes) -> None:
    path = write(tmp_path / "tail.dcm")
    path.write_bytes(path.read_bytes() + tail)
    [outcome] = store.store_files([path])
    assert not outcome.stored
    assert "neither elements nor zero padding" in (outcome.reason or "")


def test_store_files_overwrites_the_same_sop(store: LocalStore, tmp_path: Path) -> None:
    first = write(tmp_path / "v1.dcm", instance_number=1)
    second = write(tmp_path / "v2.dcm", instance_number=2, pixel_bytes=8000)
    store.store_files([first])
    store.store_files([second])
    assert [i.sop_uid for i in store.instances(STUDY, SERIES)] == [SOP]
    assert read_back(store, STUDY, SERIES, SOP) == second.read_bytes()


def test_store_files_removes_a_copy_at_another_path(store: LocalStore, tmp_path: Path) -> None:
    external = write(store._root / "imported" / "IM0001")
    assert list(store.instances(STUDY, SERIES))
    source = write(tmp_path / "new.dcm", instance_number=7)
    assert store.store_files([source])[0].stored
    assert not external.exists()
    assert (store._root / "imported").is_dir()  # a folder this store did not lay out stays
    assert [i.sop_uid for i in store.instances(STUDY, SERIES)] == [SOP]
    assert read_back(store, STUDY, SERIES, SOP) == source.read_bytes()


def test_store_files_moves_a_sop_to_its_new_study(store: LocalStore, tmp_path: Path) -> None:
    other_study, other_series = uid("study", "b"), uid("series", "b")
    store.store_files([write(tmp_path / "a.dcm")])
    store.store_files([write(tmp_path / "b.dcm", other_study, other_series)])
    assert list(store.studies()) == [other_study]
    assert not (store._root / STUDY).exists()


def test_store_files_does_not_resurrect_a_deleted_store(dataset: LocalDataset, tmp_path: Path) -> None:
    (dataset.root / "s").mkdir()
    store = LocalDataset(dataset.root, rescan_interval=3600).open_store("s")
    assert list(store.studies()) == []  # index built: the store exists
    (dataset.root / "s").rmdir()  # deleted behind the index
    with pytest.raises(NotFound):
        store.store_files([write(tmp_path / "a.dcm")])
    assert not (dataset.root / "s").exists()


def test_store_files_of_a_file_already_in_place(store: LocalStore, tmp_path: Path) -> None:
    store.store_files([write(tmp_path / "a.dcm")])
    target = store._root / STUDY / SERIES / f"{SOP}.dcm"
    before = target.read_bytes()
    assert store.store_files([target])[0].stored
    assert target.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# delete_instance


def test_delete_instance_prunes_empty_folders(store: LocalStore, tmp_path: Path) -> None:
    other = uid("sop", "other")
    store.store_files([write(tmp_path / "a.dcm"), write(tmp_path / "b.dcm", sop=other)])
    store.delete_instance(STUDY, SERIES, SOP)
    assert [i.sop_uid for i in store.instances(STUDY, SERIES)] == [other]
    assert (store._root / STUDY / SERIES).is_dir()
    store.delete_instance(STUDY, SERIES, other)
    assert list(store.studies()) == []
    assert list(store._root.iterdir()) == []
    with pytest.raises(NotFound):
        store.delete_instance(STUDY, SERIES, other)


def test_delete_instance_keeps_folders_it_did_not_lay_out(store: LocalStore) -> None:
    path = write(store._root / "imported" / "a" / "IM1")
    store.delete_instance(STUDY, SERIES, SOP)
    assert not path.exists()
    assert (store._root / "imported" / "a").is_dir()


def test_delete_instance_keeps_other_files_in_its_folder(store: LocalStore, tmp_path: Path) -> None:
    store.store_files([write(tmp_path / "a.dcm")])
    note = store._root / STUDY / SERIES / "note.txt"
    note.write_text("mine")
    store.delete_instance(STUDY, SERIES, SOP)
    assert note.read_text() == "mine"


def test_delete_instance_removes_every_copy(store: LocalStore) -> None:
    write(store._root / "one.dcm")
    write(store._root / "two" / "x.dcm")
    store.delete_instance(STUDY, SERIES, SOP)
    assert list(store.studies()) == []
    assert not (store._root / "one.dcm").exists()


def test_delete_absent_instance(store: LocalStore) -> None:
    with pytest.raises(NotFound):
        store.delete_instance(STUDY, SERIES, SOP)


def test_delete_instance_removed_behind_the_index(dataset: LocalDataset) -> None:
    (dataset.root / "s").mkdir()
    store = LocalDataset(dataset.root, rescan_interval=3600).open_store("s")
    path = write(store._root / "x.dcm")
    assert list(store.studies()) == [STUDY]
    path.unlink()
    with pytest.raises(NotFound):
        store.delete_instance(STUDY, SERIES, SOP)
    assert list(store.studies()) == []


# ---------------------------------------------------------------------------------------------
# Concurrency


def test_threads_listing_and_storing(store: LocalStore, tmp_path: Path) -> None:
    writers, per_writer = 4, 8
    sources = [
        [
            write(tmp_path / f"w{w}" / f"{n}.dcm", uid("study", w), uid("series", w, n % 2), uid("sop", w, n))
            for n in range(per_writer)
        ]
        for w in range(writers)
    ]
    errors: list[BaseException] = []
    done = threading.Event()

    def store_all(paths: list[Path]) -> None:
        try:
            for path in paths:
                assert store.store_files([path])[0].stored
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def list_forever() -> None:
        try:
            while not done.is_set():
                for study in store.studies():
                    for series in store.series(study):
                        for info in store.instances(study, series):
                            try:
                                store.retrieve(study, series, info.sop_uid, io.BytesIO())
                            except NotFound:
                                pass  # deleted between listing and reading is fine
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    listers = [threading.Thread(target=list_forever) for _ in range(4)]
    storers = [threading.Thread(target=store_all, args=(paths,)) for paths in sources]
    for thread in listers + storers:
        thread.start()
    for thread in storers:
        thread.join(timeout=60)
    done.set()
    for thread in listers:
        thread.join(timeout=60)

    assert errors == []
    assert len(list(store.studies())) == writers
    total = sum(len(list(store.instances(st, se))) for st in store.studies() for se in store.series(st))
    assert total == writers * per_writer
    assert pydicom.dcmread(store._root / uid("study", 0) / uid("series", 0, 0) / f"{uid('sop', 0, 0)}.dcm")


def test_store_ids_windows_cannot_make_are_refused_there_only():
    from dicomfuse.stores.base import InvalidName
    from dicomfuse.stores.local import _validate_new_store_id

    for name in ("CON", "nul.x", "com1", "study.", "LPT9"):
        with pytest.raises(InvalidName, match="Windows"):
            _validate_new_store_id(name, windows=True)
        if not name.endswith("."):
            _validate_new_store_id(name, windows=False)  # a valid store ID elsewhere
    _validate_new_store_id("console", windows=True)
