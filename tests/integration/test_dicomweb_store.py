"""DicomwebDataset/DicomwebStore against a real Orthanc with its DICOMweb plugin."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from dicomfuse.dicomfile import DicomUids
from dicomfuse.samples import SampleInstance, make_uid, write_instance, write_samples
from dicomfuse.stores.base import Dataset, NotFound, Store, StoreError, Transcoded, Unavailable, Unsupported
from dicomfuse.stores.dicomweb import DicomwebDataset, DicomwebStore, store_name_from_url
from tests.conftest import PATIENT_NAME, DicomFactory
from tests.fakes.http_server import LoopbackServer, Reply, Seen
from tests.orthanc_server import OrthancServer

ABSENT_UID = "1.2.826.0.1.3680043.8.498.999999"


@pytest.fixture
def dataset(orthanc: OrthancServer) -> Iterator[DicomwebDataset]:
    orthanc.reset()
    ds = DicomwebDataset(orthanc.dicomweb_url, page_size=2)
    yield ds
    ds.close()


@pytest.fixture
def store(dataset: DicomwebDataset) -> DicomwebStore:
    return dataset.open_store(next(dataset.list_stores()))


@pytest.fixture
def samples(tmp_path: Path) -> list[SampleInstance]:
    return write_samples(tmp_path / "samples", studies=5, series_per_study=1, instances_per_series=3)


def stored(store: Store, samples: list[SampleInstance]) -> None:
    outcomes = store.store_files([s.path for s in samples])
    assert [o.path for o in outcomes] == [s.path for s in samples]
    assert all(o.stored for o in outcomes), [o.reason for o in outcomes if not o.stored]


# -- names and the dataset (no server needed) -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://127.0.0.1:8042/dicom-web", "127.0.0.1"),
        ("http://127.0.0.1:8042/dicom-web/", "127.0.0.1"),
        ("http://h:8080/dcm4chee-arc/aets/DCM4CHEE/rs", "DCM4CHEE"),
        ("https://pacs.example.org/orthanc/dicom-web", "orthanc"),
        ("https://user:pw@pacs.example.org:443/", "pacs.example.org"),
        ("http://[::1]:8042/dicomweb", "--1"),
        ("http://h/wado-rs/QIDO-RS", "h"),
        ("https://ws-svc.dicom.azurehealthcareapis.com/v1", "ws-svc.dicom.azurehealthcareapis.com"),
        ("https://ws-svc.dicom.azurehealthcareapis.com/v2/partitions/north", "north"),
    ],
)
def test_store_name_from_url(url: str, name: str) -> None:
    assert store_name_from_url(url) == name


def test_dataset_has_one_store() -> None:
    ds = DicomwebDataset("http://h:8080/dcm4chee-arc/aets/DCM4CHEE/rs", orthanc_rest_url=None)
    try:
        assert isinstance(ds, Dataset)
        assert list(ds.list_stores()) == ["DCM4CHEE"]
        assert isinstance(ds.open_store("DCM4CHEE"), Store)
        with pytest.raises(NotFound):
            ds.open_store("other")
        with pytest.raises(Unsupported):
            ds.create_store("new")
        with pytest.raises(Unsupported):
            ds.delete_store("DCM4CHEE")
    finally:
        ds.close()


# -- against Orthanc -----------------------------------------------------------------------------


@pytest.mark.orthanc
def test_store_then_list_with_paging(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples)
    assert store.page_size == 2
    assert sorted(store.studies()) == sorted({s.study_uid for s in samples})
    for study_uid in {s.study_uid for s in samples}:
        in_study = [s for s in samples if s.study_uid == study_uid]
        assert list(store.series(study_uid)) == [in_study[0].series_uid]
        infos = list(store.instances(study_uid, in_study[0].series_uid))
        assert sorted(i.sop_uid for i in infos) == sorted(s.sop_uid for s in in_study)
        for info in infos:
            assert info.study_uid == study_uid
            assert info.size == (Path(in_study[0].path).parent / f"{info.sop_uid}.dcm").stat().st_size


@pytest.mark.orthanc
def test_lookups_by_uid(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples)
    one = samples[4]
    assert list(store.studies(one.study_uid)) == [one.study_uid]
    assert list(store.series(one.study_uid, one.series_uid)) == [one.series_uid]
    [info] = store.instances(one.study_uid, one.series_uid, one.sop_uid)
    assert info.sop_uid == one.sop_uid
    assert info.size == one.path.stat().st_size
    assert list(store.studies(ABSENT_UID)) == []
    assert list(store.series(one.study_uid, ABSENT_UID)) == []
    assert list(store.instances(one.study_uid, one.series_uid, ABSENT_UID)) == []


@pytest.mark.orthanc
@pytest.mark.parametrize("per_find", [1, 50])
def test_present_names_the_instances_a_series_holds_from_orthanc_s_index(
    store: DicomwebStore, samples: list[SampleInstance], monkeypatch: pytest.MonkeyPatch, per_find: int
) -> None:
    first, second, third = samples[:3]  # one series
    stored(store, [first, third])
    monkeypatch.setattr("dicomfuse.stores.dicomweb.ORTHANC_LIST_MATCH", per_find)
    monkeypatch.setattr(store, "instances", None)  # the series is never listed
    asked = [first.sop_uid, second.sop_uid, third.sop_uid, ABSENT_UID]
    assert store.present(first.study_uid, first.series_uid, asked) == {first.sop_uid, third.sop_uid}
    assert store.present(first.study_uid, ABSENT_UID, asked) == set()
    assert store.present(first.study_uid, first.series_uid, []) == set()


def test_present_without_orthanc_lists_the_series(orthanc: OrthancServer, samples: list[SampleInstance]) -> None:
    orthanc.reset()
    ds = DicomwebDataset(orthanc.dicomweb_url, orthanc_rest_url=None)
    try:
        first, second, third = samples[:3]
        stored(ds.store, [first, third])
        asked = [first.sop_uid, second.sop_uid, ABSENT_UID]
        assert ds.store.present(first.study_uid, first.series_uid, asked) == {first.sop_uid}
    finally:
        ds.close()


@pytest.mark.orthanc
def test_absent_study_and_series_yield_nothing(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples[:1])
    assert list(store.series(ABSENT_UID)) == []
    assert list(store.instances(ABSENT_UID, ABSENT_UID)) == []
    assert list(store.instances(samples[0].study_uid, ABSENT_UID)) == []


@pytest.mark.orthanc
def test_empty_store_lists_nothing(store: DicomwebStore) -> None:
    assert list(store.studies()) == []


@pytest.mark.orthanc
def test_retrieve_is_byte_identical(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples[:3])
    for sample in samples[:3]:
        sink = io.BytesIO()
        written = store.retrieve(sample.study_uid, sample.series_uid, sample.sop_uid, sink)
        assert sink.getvalue() == sample.path.read_bytes()
        assert written == sample.path.stat().st_size


@pytest.mark.orthanc
def test_retrieve_large_instance_streams_to_a_file(store: DicomwebStore, tmp_path: Path) -> None:
    uids = [make_uid("large", part) for part in ("study", "series", "sop")]
    path = write_instance(tmp_path / "large.dcm", *uids, pixel_bytes=3 * 1024 * 1024 + 17)
    stored_outcome = store.store_files([path])
    assert stored_outcome[0].stored
    target = tmp_path / "copy.dcm"
    with open(target, "wb") as sink:
        written = store.retrieve(*uids, sink)
    assert written == path.stat().st_size
    assert target.read_bytes() == path.read_bytes()


@pytest.mark.orthanc
def test_concurrent_retrieves(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples)

    def fetch(sample: SampleInstance) -> bytes:
        sink = io.BytesIO()
        store.retrieve(sample.study_uid, sample.series_uid, sample.sop_uid, sink)
        return sink.getvalue()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(fetch, samples * 2))
    assert results == [s.path.read_bytes() for s in samples * 2]


@pytest.mark.orthanc
def test_retrieve_absent_is_not_found(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples[:1])
    sample = samples[0]
    with pytest.raises(NotFound):
        store.retrieve(sample.study_uid, sample.series_uid, ABSENT_UID, io.BytesIO())
    with pytest.raises(NotFound):
        store.retrieve(ABSENT_UID, sample.series_uid, sample.sop_uid, io.BytesIO())


@pytest.mark.orthanc
def test_delete_then_second_delete_is_not_found(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples[:3])
    gone, kept = samples[0], samples[1]
    store.delete_instance(gone.study_uid, gone.series_uid, gone.sop_uid)
    remaining = {i.sop_uid for i in store.instances(gone.study_uid, gone.series_uid)}
    assert gone.sop_uid not in remaining
    assert kept.sop_uid in remaining
    with pytest.raises(NotFound):
        store.retrieve(gone.study_uid, gone.series_uid, gone.sop_uid, io.BytesIO())
    with pytest.raises(NotFound):
        store.delete_instance(gone.study_uid, gone.series_uid, gone.sop_uid)


def _orthanc_post(orthanc: OrthancServer, path: Path) -> None:
    """Store a file through Orthanc's own API, as another client would."""
    import requests

    requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), timeout=30).raise_for_status()


@pytest.mark.orthanc
def test_a_series_of_several_patient_ids_is_listed_whole(orthanc: OrthancServer, store: DicomwebStore,
                                                          tmp_path: Path) -> None:
    """Orthanc files a series under its patient: instances of one series with different
    PatientIDs (an ID corrected by an overwrite) are in two Orthanc series. A listing, a
    lookup and a walk must show them all, not those of the first."""
    study, series = make_uid("pid", 1), make_uid("pid", 1, 1)
    paths = [write_instance(tmp_path / f"{n}.dcm", study, series, make_uid("pid", 1, 1, n), patient_id=pid)
             for n, pid in ((1, "P1"), (2, "P1"), (3, "P2"))]
    for path in paths:
        _orthanc_post(orthanc, path)
    want = {make_uid("pid", 1, 1, n): path.stat().st_size for n, path in zip((1, 2, 3), paths, strict=True)}
    assert {i.sop_uid: i.size for i in store.instances(study, series)} == want
    assert {i.sop_uid: i.size for i in store.walk() if i.series_uid == series} == want
    assert list(store.series(study)) == [series]
    assert list(store.studies()).count(study) == 1
    for sop_uid, path in zip(want, paths, strict=True):
        sink = io.BytesIO()
        store.retrieve(study, series, sop_uid, sink)
        assert sink.getvalue() == path.read_bytes()


@pytest.mark.orthanc
def test_an_orthanc_whose_finds_are_limited_is_listed_whole(orthanc: OrthancServer, tmp_path: Path) -> None:
    """An administrator set LimitFindResults/LimitFindInstances (advised for large Orthancs): a
    find returns that many plus one and no page after it. The store's studies and its walk
    must still be complete (Orthanc's own QIDO is cut there too: only its REST API can tell)."""
    limited = OrthancServer(extra_config={"LimitFindResults": 5, "LimitFindInstances": 7}).start()
    try:
        study = make_uid("lim", 0)
        paths = [write_instance(tmp_path / f"{n}.dcm", make_uid("lim", n), make_uid("lim", n, 1),
                                make_uid("lim", n, 1, 1)) for n in range(12)]
        paths += [write_instance(tmp_path / f"s{n}.dcm", study, make_uid("lim", 0, 1), make_uid("lim", 0, 1, n))
                  for n in range(2, 12)]
        paths += [write_instance(tmp_path / f"r{n}.dcm", study, make_uid("lim", 0, 2, n), make_uid("lim", 0, 2, n, 1))
                  for n in range(9)]  # a study of 10 series
        for path in paths:
            _orthanc_post(limited, path)
        ds = DicomwebDataset(limited.dicomweb_url)
        try:
            store = ds.store
            assert len(set(store.studies())) == 12
            assert len(list(store.walk())) == 31
            assert len(list(store.series(study))) == 10
            assert len(list(store.instances(study, make_uid("lim", 0, 1)))) == 11
            # Which of these a series holds (write-back's overwrites): a find cut at 7 + 1.
            held = [make_uid("lim", 0, 1, n) for n in (1, *range(2, 12))]
            asked = [*held, make_uid("lim", 0, 1, 99)]
            assert store.present(study, make_uid("lim", 0, 1), asked) == set(held)
        finally:
            ds.close()
    finally:
        limited.stop()


@pytest.mark.orthanc
def test_an_instance_orthanc_keeps_under_two_patients_reads_as_listed_and_is_deleted_whole(
        orthanc: OrthancServer, store: DicomwebStore, tmp_path: Path) -> None:
    """Another client stored one SOPInstanceUID twice with different PatientIDs: Orthanc keeps
    both. The size listed is that of the bytes read, and rm deletes both (else it comes back)."""
    study, series, sop = make_uid("twin", 1), make_uid("twin", 1, 1), make_uid("twin", 1, 1, 1)
    a = write_instance(tmp_path / "a.dcm", study, series, sop, patient_id="P1")
    b = write_instance(tmp_path / "b.dcm", study, series, sop, patient_id="P2-LONGER-ID")
    for path in (a, b):
        _orthanc_post(orthanc, path)
    for listing in (list(store.instances(study, series)), list(store.instances(study, series, sop)),
                    [i for i in store.walk() if i.sop_uid == sop]):
        [info] = listing
        sink = io.BytesIO()
        store.retrieve(study, series, sop, sink)
        assert sink.getvalue() in (a.read_bytes(), b.read_bytes())
        assert info.size == len(sink.getvalue())
    store.delete_instance(study, series, sop)
    assert list(store.instances(study, series)) == []
    with pytest.raises(NotFound):
        store.delete_instance(study, series, sop)


@pytest.mark.orthanc
def test_delete_with_the_wrong_series_is_not_found(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples[:1])
    sample = samples[0]
    with pytest.raises(NotFound):
        store.delete_instance(sample.study_uid, ABSENT_UID, sample.sop_uid)
    assert [i.sop_uid for i in store.instances(sample.study_uid, sample.series_uid)] == [sample.sop_uid]


@pytest.mark.orthanc
def test_non_dicom_file_is_a_refused_outcome(
    store: DicomwebStore, samples: list[SampleInstance], tmp_path: Path
) -> None:
    junk = tmp_path / "notes.dcm"
    junk.write_bytes(b"this is not DICOM\r\n" * 20)
    missing = tmp_path / "missing.dcm"
    outcomes = store.store_files([samples[0].path, junk, missing, samples[1].path])
    assert [o.path for o in outcomes] == [samples[0].path, junk, missing, samples[1].path]
    assert [o.stored for o in outcomes] == [True, False, False, True]
    assert outcomes[1].reason == "not a DICOM file"
    assert outcomes[2].reason is not None and "cannot read" in outcomes[2].reason
    assert outcomes[0].sop_uid == samples[0].sop_uid
    assert outcomes[0].study_uid == samples[0].study_uid
    assert outcomes[0].series_uid == samples[0].series_uid


@pytest.mark.orthanc
def test_resending_identical_files_counts_as_stored(store: DicomwebStore, samples: list[SampleInstance]) -> None:
    stored(store, samples[:2])
    stored(store, samples[:2])


@pytest.mark.orthanc
def test_stow_of_files_whose_uids_are_known_reads_no_header(
    orthanc: OrthancServer, store: DicomwebStore, samples: list[SampleInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount has parsed every file at close: given their UIDs, the store sends them without
    parsing them again (a sender's Python time is taken from the mount's own callbacks)."""
    import pydicom

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was parsed again")

    orthanc.reset()
    monkeypatch.setattr(pydicom, "dcmread", no_parse)
    batch = samples[:3]
    uids = [DicomUids(s.study_uid, s.series_uid, s.sop_uid) for s in batch]
    outcomes = store.store_files([s.path for s in batch], uids)
    assert [(o.path, o.stored, o.sop_uid) for o in outcomes] == [(s.path, True, s.sop_uid) for s in batch]
    assert {i.sop_uid for i in store.instances(batch[0].study_uid, batch[0].series_uid)} == {s.sop_uid for s in batch}
    # Without them, the store reads each file's UIDs itself (here: cannot, so none is sent).
    [refused] = store.store_files([samples[3].path])
    assert not refused.stored and refused.reason == "not a DICOM file"
    assert orthanc.instance_count() == 3
    with pytest.raises(ValueError):
        store.store_files([s.path for s in batch], uids[:2])


@pytest.mark.orthanc
def test_stow_in_small_batches(orthanc: OrthancServer, samples: list[SampleInstance]) -> None:
    orthanc.reset()
    ds = DicomwebDataset(orthanc.dicomweb_url, stow_batch_files=2)
    try:
        stored(ds.store, samples)
    finally:
        ds.close()
    assert orthanc.instance_count() == len(samples)


@pytest.mark.orthanc
def test_without_orthanc_rest(orthanc: OrthancServer, samples: list[SampleInstance]) -> None:
    orthanc.reset()
    ds = DicomwebDataset(orthanc.dicomweb_url, orthanc_rest_url=None)
    try:
        stored(ds.store, samples[:2])
        sample = samples[0]
        infos = list(ds.store.instances(sample.study_uid, sample.series_uid))
        assert {i.size for i in infos} == {None}
        with pytest.raises(Unsupported):  # Orthanc's DICOMweb DELETE answers 405
            ds.store.delete_instance(sample.study_uid, sample.series_uid, sample.sop_uid)
    finally:
        ds.close()


@pytest.mark.orthanc
def test_explicit_orthanc_rest_url(orthanc: OrthancServer, samples: list[SampleInstance]) -> None:
    orthanc.reset()
    ds = DicomwebDataset(orthanc.dicomweb_url, orthanc_rest_url=orthanc.url)
    try:
        stored(ds.store, samples[:1])
        sample = samples[0]
        [info] = ds.store.instances(sample.study_uid, sample.series_uid)
        assert info.size == sample.path.stat().st_size
        ds.store.delete_instance(sample.study_uid, sample.series_uid, sample.sop_uid)
        assert list(ds.store.studies()) == []
    finally:
        ds.close()


# -- odd servers: a scripted stand-in on 127.0.0.1 ----------------------------------------------------

Answer = tuple[int, dict[str, str], bytes]


class FakeDicomweb(LoopbackServer):
    """A DICOMweb stand-in whose answers a test sets with ``route`` (method, path+query, headers
    → status, headers, body). ``close_early`` sends fewer body bytes than promised."""

    def __init__(self) -> None:
        super().__init__(self._answer)
        self.route: Callable[[str, str, dict[str, str], bytes], Answer] = lambda *_: (404, {}, b"")
        self.close_early = 0
        self.stall_paths: tuple[str, ...] = ()  # requests to these never get an answer
        self.datasets: list[DicomwebDataset] = []

    def _answer(self, seen: Seen) -> Reply:
        status, headers, body = self.route(seen.method, seen.path, seen.headers, seen.body)
        return Reply(status, body, headers, short_by=self.close_early, stall=seen.path.startswith(self.stall_paths))

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        return [(s.method, s.path, s.headers) for s in self.seen]

    @property
    def url(self) -> str:
        return f"{self.base_url}/dicom-web"

    def stop(self) -> None:
        for ds in self.datasets:
            ds.close()
        super().stop()


@pytest.fixture
def fake() -> Iterator[FakeDicomweb]:
    server = FakeDicomweb()
    yield server
    server.stop()


def fake_store(fake: FakeDicomweb, **kwargs: object) -> DicomwebStore:
    from dicomfuse.stores.http import RetryPolicy

    ds = DicomwebDataset(
        fake.url,
        orthanc_rest_url=None,
        retry=RetryPolicy(attempts=1),
        **kwargs,  # type: ignore[arg-type]
    )
    fake.datasets.append(ds)
    return ds.store


def dicom_json(*uids: str, tag: str = "0020000D") -> bytes:
    return json.dumps([{tag: {"vr": "UI", "Value": [uid]}} for uid in uids]).encode()


@pytest.mark.parametrize("held", [True, False], ids=["still-there", "gone"])
def test_a_404_to_delete_is_gone_only_if_the_instance_is(fake: FakeDicomweb, held: bool) -> None:
    """A server without an instance DELETE route answers 404 (dcm4chee deletes only rejected
    studies): taken for 'already gone', rm said it deleted and nothing was; a new version
    copied later counted as a new file, which the server ignored."""
    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if method == "DELETE":
            return 404, {}, b""
        if "/instances" in path and held:
            return 200, {"Content-Type": "application/dicom+json"}, dicom_json("1.2.3", tag="00080018")
        return 204, {}, b""

    fake.route = route
    store = fake_store(fake)
    with pytest.raises(Unsupported if held else NotFound):
        store.delete_instance("1.1", "1.2", "1.2.3")


@pytest.mark.parametrize("page_size", [2, 3, 10])
def test_server_that_ignores_limit_and_offset(fake: FakeDicomweb, page_size: int) -> None:
    fake.route = lambda *_: (200, {"Content-Type": "application/dicom+json"}, dicom_json("1.1", "1.2", "1.3"))
    store = fake_store(fake, page_size=page_size)
    assert list(store.studies()) == ["1.1", "1.2", "1.3"]
    assert len(fake.requests) <= 2
    fake.clear()
    assert list(store.studies("1.2")) == ["1.2"]  # the filter is ignored too
    assert list(store.studies("9.9")) == []
    assert len(fake.requests) <= 3


def capped_search(uids: list[str], cap: int | None, *, status: int = 200, warning: str | None = None,
                  tag: str = "0020000D") -> Callable[[str, str, dict[str, str], bytes], Answer]:
    """A search over ``uids`` (of ``tag``) that answers at most ``cap`` results per page whatever
    the ``limit``; a page it cut has ``status`` and the ``Warning`` header ``warning``."""
    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        query = parse_qs(urlsplit(path).query)
        offset, limit = int(query["offset"][0]), int(query["limit"][0])
        size = limit if cap is None else min(limit, cap)
        page = uids[offset:offset + size]
        cut = size < limit and offset + size < len(uids)
        answer_headers = {"Content-Type": "application/dicom+json"}
        if cut and warning is not None:
            answer_headers["Warning"] = warning
        return (status if cut else 200), answer_headers, dicom_json(*page, tag=tag)

    return route


def offsets(fake: FakeDicomweb) -> list[int]:
    """The offsets of the QIDO searches made (Orthanc REST calls left out)."""
    return [int(parse_qs(urlsplit(path).query)["offset"][0]) for _, path, _ in fake.requests
            if path.startswith("/dicom-web/")]


@pytest.mark.parametrize("cap", [3, 150])
def test_a_server_that_cuts_pages_silently_is_listed_to_the_end(fake: FakeDicomweb, cap: int) -> None:
    """A server whose own maximum is below our limit (dcm4chee's qidoMaxNumberOfResults) and
    that says nothing of it: a short page that may be that maximum is followed by the next."""
    studies = [f"1.{n}" for n in range(2 * cap + cap // 2)]
    fake.route = capped_search(studies, cap)
    store = fake_store(fake)
    assert list(store.studies()) == studies
    assert offsets(fake) == [0, cap, 2 * cap]  # the last page is shorter than the cut ones: the end


def test_a_short_page_costs_a_request_more_only_while_it_may_be_a_cut(fake: FakeDicomweb) -> None:
    studies = [f"1.{n}" for n in range(25)]
    fake.route = capped_search(studies, None)
    store = fake_store(fake, page_size=10)
    assert list(store.studies()) == studies
    assert offsets(fake) == [0, 10, 20]  # a full page: the server does not cut below our limit
    fake.clear()
    fake.route = capped_search(studies[:4], None)
    assert list(store.studies()) == studies[:4]
    assert offsets(fake) == [0]
    other = fake_store(fake, page_size=10)  # knows nothing of the server yet
    fake.clear()
    assert list(other.studies()) == studies[:4]
    assert offsets(fake) == [0, 4]  # 4 may be its maximum: one request more, empty
    fake.clear()
    fake.route = capped_search(studies[:3], None)
    assert list(other.studies()) == studies[:3]
    assert offsets(fake) == [0]  # shorter than a page it answered before: not a cut


@pytest.mark.parametrize(("status", "warning"), [
    (206, None),  # dcm4chee-arc-light: Partial Content, no warning
    (200, '299 dicomweb: "Result set truncated; use offset to page"'),
    (200, '299 {+SERVICE}: "The number of results exceeded the maximum supported by the server. '
          'Additional results can be requested."'),
], ids=["206", "299-other-words", "299-ps3.18"])
def test_a_server_that_says_it_cut_the_page_is_asked_for_the_rest(fake: FakeDicomweb, status: int,
                                                                  warning: str | None) -> None:
    """Even where a short page is otherwise the end (a server that says when it cuts)."""
    studies = [f"1.{n}" for n in range(7)]
    fake.route = capped_search(studies, 3, status=status, warning=warning)
    store = fake_store(fake, page_size=10)
    store.silent_caps = False
    assert list(store.studies()) == studies
    assert offsets(fake) == [0, 3, 6]


def test_orthanc_found_through_its_rest_api_is_not_asked_past_a_short_page(fake: FakeDicomweb) -> None:
    """Orthanc does not cut a search below its limit: its series listings cost what they did
    (here through QIDO, this stand-in's REST API finding nothing)."""
    series = [f"1.2.{n}" for n in range(4)]
    fake.route = capped_search(series, None, tag="0020000E")
    ds = DicomwebDataset(fake.url, orthanc_rest_url=fake.base_url)
    fake.datasets.append(ds)
    assert list(ds.store.series("1.2")) == series
    assert offsets(fake) == [0]


def refusing_limits_above(largest: int, route: Callable[[str, str, dict[str, str], bytes], Answer]
                          ) -> Callable[[str, str, dict[str, str], bytes], Answer]:
    """Microsoft's DICOM service: a QIDO ``limit`` above 200 is a 400, with words of its own."""
    def refuse(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if int(parse_qs(urlsplit(path).query)["limit"][0]) > largest:
            return 400, {"Content-Type": "application/json"}, json.dumps({"message": ECHOED}).encode()
        return route(method, path, headers, body)

    return refuse


def limits(fake: FakeDicomweb) -> list[int]:
    return [int(parse_qs(urlsplit(path).query)["limit"][0]) for _, path, _ in fake.requests]


def test_a_server_that_refuses_our_limit_is_searched_with_a_smaller_one(
        fake: FakeDicomweb, caplog: pytest.LogCaptureFixture) -> None:
    studies = [f"1.{n}" for n in range(250)]
    fake.route = refusing_limits_above(200, capped_search(studies, None))
    store = fake_store(fake)
    with caplog.at_level("INFO", logger="dicomfuse"):
        assert list(store.studies("1.7")) == ["1.7"]  # the start-up probe is such a lookup
        assert list(store.studies()) == studies
        assert list(store.series("1.7")) == []  # the stand-in lists studies only: the limit is what counts
    assert limits(fake) == [1000, 200, 200, 200, 200]  # the page size that worked is kept
    assert offsets(fake) == [0, 0, 0, 200, 0]
    refusals = [r for r in caplog.records if "limit=1000" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelname == "INFO"
    assert "HTTP 400" in refusals[0].getMessage() and ECHOED not in caplog.text


def test_a_refusal_that_a_smaller_limit_does_not_cure_is_an_error(fake: FakeDicomweb) -> None:
    fake.route = lambda *_: (400, {"Content-Type": "application/json"}, json.dumps({"message": ECHOED}).encode())
    store = fake_store(fake)
    with pytest.raises(StoreError, match="HTTP 400") as raised:
        list(store.studies())
    assert ECHOED not in str(raised.value)
    assert limits(fake) == [1000, 200, 100]
    fake.clear()
    with pytest.raises(StoreError, match="HTTP 400"):
        list(store.studies())
    assert limits(fake) == [1000, 200, 100]  # nothing was learnt
    fake.clear()
    with pytest.raises(StoreError, match="HTTP 400"):
        list(fake_store(fake, page_size=200).studies())
    assert limits(fake) == [200, 100]


def test_qido_404_and_204_are_empty_below_studies(fake: FakeDicomweb) -> None:
    fake.route = lambda method, path, *_: (404 if "/series" in path else 204, {}, b"")
    store = fake_store(fake)
    assert list(store.series("1.2")) == []
    assert list(store.instances("1.2", "1.3")) == []
    assert list(store.studies()) == []


def test_single_part_retrieve_and_accept_fallback(fake: FakeDicomweb) -> None:
    payload = b"\x00" * 128 + b"DICM" + b"\r\n--x\r\n" * 100

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if headers.get("Accept") != "application/dicom":
            return 406, {}, b""
        return 200, {"Content-Type": "application/dicom"}, payload

    fake.route = route
    store = fake_store(fake)
    sink = io.BytesIO()
    assert store.retrieve("1", "2", "3", sink) == len(payload)
    assert sink.getvalue() == payload
    assert [r[2]["Accept"] for r in fake.requests][-1] == "application/dicom"
    # transfer-syntax=*, the search for the stored transfer syntax (refused too), then the others
    assert len(fake.requests) == 4
    assert fake.requests[1][1].startswith("/dicom-web/studies/1/series/2/instances?includefield=00083002")
    fake.clear()
    store.retrieve("1", "2", "3", io.BytesIO())
    assert len(fake.requests) == 1  # the Accept that worked is tried first from now on


IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
WILDCARD_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def transcoded(data: bytes) -> bytes:
    """``data`` as a server transcodes it when asked for no transfer syntax: Explicit VR LE."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True)
    return out.getvalue()


class Archive:
    """A dcm4chee-like server for one series of Implicit VR instances: ``transfer-syntax=*`` is
    refused (for the SOP UIDs in ``refuses_wildcard``; all by default), its own transfer syntax
    asked by UID is answered when ``exact``, no transfer syntax gets Explicit VR Little Endian;
    searches name the stored syntax (AvailableTransferSyntaxUID) when ``available``; multipart
    answers are refused unless ``multipart``.
    ``declares`` replaces the transfer syntax its answers declare (a server that says one thing
    and sends another)."""

    def __init__(self, tmp_path: Path, count: int = 3) -> None:
        self.study, self.series = make_uid("ts", "study"), make_uid("ts", "series")
        self.files: dict[str, bytes] = {}
        for i in range(count):
            sop = make_uid("ts", "instance", i)
            path = write_instance(tmp_path / f"{i}.dcm", self.study, self.series, sop, transfer_syntax=IMPLICIT_LE)
            self.files[sop] = path.read_bytes()
        self.sops = list(self.files)
        self.syntaxes = dict.fromkeys(self.sops, IMPLICIT_LE)  # what each is stored in
        self.refuses_wildcard: set[str] = set(self.sops)
        self.exact = True
        self.available = True
        self.declares: str | None = None
        self.multipart = True  # False: multipart Accepts are refused
        self.transcodes_on_request = False  # True: a transfer syntax asked by UID is always sent
        self.implicit = dict(self.files)  # each instance in Implicit VR, as such a server sends it

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        from urllib.parse import parse_qs, urlsplit

        from dicomfuse.stores.transfer_syntax import transfer_syntax_of

        parts = urlsplit(path)
        if parts.path.endswith("/instances"):
            wanted = parse_qs(parts.query).get("SOPInstanceUID")
            entries = []
            for sop in self.sops:
                if wanted is None or sop in wanted:
                    entry = {"00080018": {"vr": "UI", "Value": [sop]}}
                    if self.available:
                        entry["00083002"] = {"vr": "UI", "Value": [self.syntaxes[sop]]}
                    entries.append(entry)
            return 200, {"Content-Type": "application/dicom+json"}, json.dumps(entries).encode()
        sop = parts.path.rsplit("/", 1)[-1]
        accept = headers.get("Accept", "")
        asked = transfer_syntax_of(accept)
        if accept.startswith("multipart/") and not self.multipart:
            return 406, {}, b""
        stored = self.syntaxes[sop]
        if asked == "*" and sop not in self.refuses_wildcard or asked == stored and self.exact:
            data, syntax = self.files[sop], stored
        elif self.transcodes_on_request and asked in (IMPLICIT_LE, EXPLICIT_LE):
            data, syntax = (self.implicit[sop] if asked == IMPLICIT_LE else transcoded(self.implicit[sop])), asked
        elif asked is None:
            data, syntax = self.files[sop] if stored == EXPLICIT_LE else transcoded(self.files[sop]), EXPLICIT_LE
        else:
            return 406, {}, b""
        syntax = self.declares or syntax
        if not accept.startswith("multipart/"):
            return 200, {"Content-Type": f"application/dicom; transfer-syntax={syntax}"}, data
        head = f"--b\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n\r\n".encode()
        multipart = 'multipart/related; type="application/dicom"; boundary=b'
        return 200, {"Content-Type": multipart}, head + data + b"\r\n--b--"

    def retrieve(self, store: DicomwebStore, sop: str) -> bytes:
        sink = io.BytesIO()
        store.retrieve(self.study, self.series, sop, sink)
        return sink.getvalue()


@pytest.fixture
def archive(fake: FakeDicomweb, tmp_path: Path) -> Archive:
    archive = Archive(tmp_path)
    fake.route = archive.route
    return archive


def test_a_server_refusing_the_wildcard_is_asked_for_the_stored_transfer_syntax(
        fake: FakeDicomweb, archive: Archive, caplog: pytest.LogCaptureFixture) -> None:
    """A server that refuses transfer-syntax=* and transcodes when asked for none: the stored
    syntax comes from one search per series, and each instance is asked for in it by UID."""
    store = fake_store(fake)
    with caplog.at_level("WARNING"):
        assert [archive.retrieve(store, sop) for sop in archive.sops] == list(archive.files.values())
    accepts = [r[2]["Accept"] for r in first_pages(fake.requests)]
    exact = f'multipart/related; type="application/dicom"; transfer-syntax={IMPLICIT_LE}'
    assert accepts == [WILDCARD_ACCEPT, "application/dicom+json", exact, exact, exact]
    assert "includefield=00083002" in fake.requests[1][1]
    assert caplog.records == []


@pytest.mark.parametrize("single_part", [False, True])
def test_a_transcoded_answer_is_refused(fake: FakeDicomweb, archive: Archive, single_part: bool) -> None:
    """The stored transfer syntax is known but the server only answers in another one: an error
    naming the instance and both syntaxes, and no byte written."""
    archive.exact = False
    archive.multipart = not single_part
    sink = io.BytesIO()
    with pytest.raises(Transcoded) as caught:
        fake_store(fake).retrieve(archive.study, archive.series, archive.sops[0], sink)
    assert sink.getvalue() == b""
    assert archive.sops[0] in str(caught.value)
    assert f"transfer syntax {EXPLICIT_LE} (its {'Content-Type' if single_part else 'part header'})" in str(
        caught.value)
    assert f"stores {IMPLICIT_LE}" in str(caught.value)


def test_bytes_whose_file_meta_contradicts_the_declared_transfer_syntax_are_refused(
        fake: FakeDicomweb, archive: Archive) -> None:
    archive.exact = False
    archive.declares = IMPLICIT_LE  # what the header says; the bytes are Explicit VR LE
    sink = io.BytesIO()
    with pytest.raises(Transcoded, match=f"{EXPLICIT_LE} \\(its file meta information\\)"):
        fake_store(fake).retrieve(archive.study, archive.series, archive.sops[0], sink)
    assert sink.getvalue() == b""


def test_an_instance_stored_again_in_another_transfer_syntax_is_searched_again(
        fake: FakeDicomweb, archive: Archive) -> None:
    store = fake_store(fake)
    first, replaced, _ = archive.sops
    assert archive.retrieve(store, first) == archive.files[first]  # the series' syntaxes are remembered
    archive.files[replaced] = transcoded(archive.files[replaced])
    archive.syntaxes[replaced] = EXPLICIT_LE
    assert archive.retrieve(store, replaced) == archive.files[replaced]


def test_stored_transfer_syntaxes_are_searched_again_after_a_while(
        fake: FakeDicomweb, archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that sends any transfer syntax asked by UID: an instance stored again in another
    one since its series was searched was read in the old one, a transcode, without a word."""
    monkeypatch.setattr("dicomfuse.stores.dicomweb.SYNTAX_TTL_S", 0.0)
    archive.transcodes_on_request = True
    store = fake_store(fake)
    first, replaced, _ = archive.sops
    assert archive.retrieve(store, first) == archive.files[first]  # the series' syntaxes are remembered
    archive.files[replaced] = transcoded(archive.files[replaced])  # stored again, in Explicit VR
    archive.syntaxes[replaced] = EXPLICIT_LE
    assert archive.retrieve(store, replaced) == archive.files[replaced]


def test_a_server_that_does_not_say_what_it_stores_is_read_with_one_warning(
        fake: FakeDicomweb, archive: Archive, caplog: pytest.LogCaptureFixture) -> None:
    archive.available = False
    store = fake_store(fake)
    with caplog.at_level("WARNING"):
        assert [archive.retrieve(store, sop) for sop in archive.sops] == [
            transcoded(data) for data in archive.files.values()]
    [warning] = caplog.records
    assert warning.levelname == "WARNING"
    assert "may be transcoded" in warning.getMessage()
    assert 'Accept: multipart/related; type="application/dicom")' in warning.getMessage()
    # the search is not repeated for a server whose searches name no transfer syntax
    assert [r[2]["Accept"] for r in first_pages(fake.requests)][1:] == ["application/dicom+json"] + [
        'multipart/related; type="application/dicom"'] * 3


def test_a_wildcard_refused_for_one_instance_is_still_asked_for_the_others(
        fake: FakeDicomweb, archive: Archive) -> None:
    """One instance refused transfer-syntax=* (on a server that does not say what it stores)
    does not make every later read skip it."""
    archive.available = False
    first, refused, last = archive.sops
    archive.refuses_wildcard = {refused}
    store = fake_store(fake)
    assert archive.retrieve(store, first) == archive.files[first]
    assert archive.retrieve(store, refused) == transcoded(archive.files[refused])
    fake.clear()
    assert archive.retrieve(store, last) == archive.files[last]
    assert [r[2]["Accept"] for r in fake.requests] == [WILDCARD_ACCEPT]


def test_a_server_accepting_the_wildcard_costs_one_request_per_instance(
        fake: FakeDicomweb, archive: Archive) -> None:
    archive.refuses_wildcard = set()
    store = fake_store(fake)
    assert [archive.retrieve(store, sop) for sop in archive.sops] == list(archive.files.values())
    assert [r[2]["Accept"] for r in fake.requests] == [WILDCARD_ACCEPT] * 3


def test_concurrent_reads_of_a_series_search_its_transfer_syntaxes_once(fake: FakeDicomweb, tmp_path: Path) -> None:
    archive = Archive(tmp_path, count=8)
    fake.route = archive.route
    store = fake_store(fake)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda sop: archive.retrieve(store, sop), archive.sops))
    assert got == list(archive.files.values())
    assert sum("includefield=00083002" in r[1] for r in first_pages(fake.requests)) == 1


def first_pages(requests: list[tuple[str, str, dict[str, str]]]) -> list[tuple[str, str, dict[str, str]]]:
    """The requests without the searches' next pages (asked for after a page that may be the
    server's own cap on a server not known to say when it cuts)."""
    return [r for r in requests if not re.search(r"[?&]offset=[1-9]", r[1])]


def test_truncated_single_part_raises(fake: FakeDicomweb) -> None:
    fake.route = lambda *_: (200, {"Content-Type": "application/dicom"}, b"x" * 5000)
    fake.close_early = 100
    with pytest.raises(Unavailable):
        fake_store(fake).retrieve("1", "2", "3", io.BytesIO())


@pytest.mark.parametrize("status", [204, 200])
def test_an_empty_answer_to_a_retrieve_is_never_a_file(fake: FakeDicomweb, status: int) -> None:
    """dcm4chee answers 204 to a retrieve of UIDs it does not hold (an instance another client
    deleted since it was listed): cp copied it as a file of 0 bytes, exit 0."""
    fake.route = lambda *_: (status, {"Content-Type": "application/dicom"} if status == 200 else {}, b"")
    with pytest.raises(NotFound if status == 204 else StoreError) as info:
        fake_store(fake).retrieve("1", "2", "3", io.BytesIO())
    assert isinstance(info.value, NotFound) == (status == 204)


def test_truncated_multipart_raises(fake: FakeDicomweb) -> None:
    body = b"--bnd\r\nContent-Type: application/dicom\r\n\r\n" + b"y" * 5000 + b"\r\n--bnd--"
    content_type = 'multipart/related; type="application/dicom"; boundary="bnd"'
    fake.route = lambda *_: (200, {"Content-Type": content_type}, body)
    assert fake_store(fake).retrieve("1", "2", "3", io.BytesIO()) == 5000
    fake.close_early = 4
    with pytest.raises(Unavailable):
        fake_store(fake).retrieve("1", "2", "3", io.BytesIO())


def stow_json(stored: list[str], failed: list[tuple[str, int]], detail: str | None = None) -> bytes:
    """A STOW answer; ``detail``: Google's FailureDetailJSON (0009,1097) on each refused item."""
    def item(uid: str, **extra: object) -> dict[str, object]:
        entry: dict[str, object] = {"00081155": {"vr": "UI", "Value": [uid]}}
        entry.update(extra)
        return entry

    words = {} if detail is None else {"00090010": {"vr": "LO", "Value": ["GOOGLE"]},
                                       "00091097": {"vr": "LT", "Value": [detail]}}

    return json.dumps(
        {
            "00081199": {"vr": "SQ", "Value": [item(u) for u in stored]},
            "00081198": {
                "vr": "SQ",
                "Value": [item(u, **{"00081197": {"vr": "US", "Value": [code]}}, **words) for u, code in failed],
            },
        }
    ).encode()


def stow_xml(stored: list[str], failed: list[tuple[str, int]], detail: str | None = None) -> bytes:
    """A STOW answer; ``detail``: Google's FailureDetail (0009,0097) on each refused item."""
    ns = 'xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"'
    words = "" if detail is None else (
        f'<DicomAttribute tag="00090097" vr="LT" privateCreator="GOOGLE"><Value number="1">{detail}</Value>'
        "</DicomAttribute>"
    )
    ok = "".join(
        f'<Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">{u}</Value></DicomAttribute></Item>'
        for u in stored
    )
    bad = "".join(
        f'<Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">{u}</Value>'
        f'</DicomAttribute><DicomAttribute tag="00081197" vr="US"><Value number="1">{code}</Value>'
        f"</DicomAttribute>{words}</Item>"
        for u, code in failed
    )
    return (
        f'<?xml version="1.0"?><NativeDicomModel {ns}>'
        f'<DicomAttribute tag="00081198" vr="SQ">{bad}</DicomAttribute>'
        f'<DicomAttribute tag="00081199" vr="SQ">{ok}</DicomAttribute></NativeDicomModel>'
    ).encode()


@pytest.mark.parametrize(
    ("status", "content_type", "render"),
    [
        (200, "application/dicom+json", stow_json),
        (202, "application/dicom+json", stow_json),
        (409, "application/dicom+json", stow_json),
        (200, "application/dicom+xml; charset=utf-8", stow_xml),
    ],
)
def test_stow_outcomes_map_back_to_paths(
    fake: FakeDicomweb,
    tmp_path: Path,
    status: int,
    content_type: str,
    render: Callable[[list[str], list[tuple[str, int]]], bytes],
) -> None:
    samples = write_samples(tmp_path, studies=1, series_per_study=1, instances_per_series=3)
    ok, bad, silent = samples
    sent: list[bytes] = []

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        sent.append(body)
        assert method == "POST" and path == "/dicom-web/studies"
        assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
        return status, {"Content-Type": content_type}, render([ok.sop_uid], [(bad.sop_uid, 0xA700)])

    fake.route = route
    outcomes = fake_store(fake).store_files([s.path for s in samples])
    assert [o.stored for o in outcomes] == [True, False, False]
    assert outcomes[1].reason == "failure reason 0xA700 (out of resources)"
    assert outcomes[2].reason == ("server did not confirm" if status < 400 else "HTTP 409")
    assert all(s.path.read_bytes() in sent[0] for s in samples)  # streamed body holds each file


@pytest.mark.parametrize(("code", "conflict"), [(0x0110, True), (0x0111, True), (0xA900, False), (0xC000, False),
                                              (None, True)])
def test_a_409_is_a_conflict_with_a_stored_instance_only_for_a_reason_that_can_mean_it(
        fake: FakeDicomweb, tmp_path: Path, code: int | None, conflict: bool) -> None:
    """Google answers 409 (FailureReason 0x0110) for an instance it holds with other bytes: the
    mount then overwrites it. dcm4chee answers 409 whenever every file of a request failed,
    e.g. 0xA900 for a data set that does not match its SOP class: a plain refusal (the mount
    looked the instance up and sent it again, and logged that it was overwriting it)."""
    [sample] = write_samples(tmp_path, studies=1, series_per_study=1, instances_per_series=1)
    body = stow_json([], [] if code is None else [(sample.sop_uid, code)])
    fake.route = lambda *_: (409, {"Content-Type": "application/dicom+json"}, body)
    [outcome] = fake_store(fake).store_files([sample.path])
    assert not outcome.stored and outcome.conflict is conflict


@pytest.mark.parametrize("render", ["json", "xml"])
def test_an_instance_stored_with_a_warning_reason_is_stored_altered(fake: FakeDicomweb, tmp_path: Path,
                                                                      render: str) -> None:
    """dcm4chee coerces attributes on store and says so with WarningReason 0xB000 in the
    Referenced SOP item (202): the instance is stored, but not byte for byte as sent."""
    coerced, plain = write_samples(tmp_path, studies=1, series_per_study=1, instances_per_series=2)
    warning = {"00081196": {"vr": "US", "Value": [0xB000]}}
    if render == "json":
        body = json.dumps({"00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [coerced.sop_uid]}, **warning},
            {"00081155": {"vr": "UI", "Value": [plain.sop_uid]}}]}}).encode()
        content_type = "application/dicom+json"
    else:
        item = '<Item number="{n}"><DicomAttribute tag="00081155" vr="UI"><Value number="1">{uid}</Value>' \
               '</DicomAttribute>{extra}</Item>'
        extra = '<DicomAttribute tag="00081196" vr="US"><Value number="1">45056</Value></DicomAttribute>'
        body = ('<?xml version="1.0"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
                '<DicomAttribute tag="00081199" vr="SQ">' + item.format(n=1, uid=coerced.sop_uid, extra=extra)
                + item.format(n=2, uid=plain.sop_uid, extra="") + "</DicomAttribute></NativeDicomModel>").encode()
        content_type = "application/dicom+xml"
    fake.route = lambda *_: (202, {"Content-Type": content_type}, body)
    outcomes = fake_store(fake).store_files([coerced.path, plain.path])
    assert [(o.stored, o.altered) for o in outcomes] == [(True, True), (True, False)]


ECHOED = f"Cannot store: PatientName '{PATIENT_NAME}' does not match PatientID 123"
"""A server's words quoting the instance it refused."""


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"Message": "Unsupported media type", "HttpStatus": 415}, "HTTP 415"),
        ({"Message": ECHOED, "Details": ECHOED, "HttpStatus": 415, "OrthancStatus": 15},
         "HTTP 415: Orthanc error 15 (bad file format)"),
        ({"error": {"code": 415, "message": ECHOED, "status": "INVALID_ARGUMENT"}}, "HTTP 415: INVALID_ARGUMENT"),
    ],
)
def test_stow_4xx_without_outcomes_refuses_with_the_status_and_code_not_the_servers_words(
        fake: FakeDicomweb, tmp_path: Path, body: dict[str, object], reason: str) -> None:
    samples = write_samples(tmp_path, studies=1, series_per_study=1, instances_per_series=1)
    fake.route = lambda *_: (415, {}, json.dumps(body).encode())
    [outcome] = fake_store(fake).store_files([samples[0].path])
    assert not outcome.stored
    assert outcome.reason == reason


@pytest.mark.parametrize(("content_type", "render"), [("application/dicom+json", stow_json),
                                                       ("application/dicom+xml", stow_xml)])
def test_stow_failure_detail_is_never_kept(fake: FakeDicomweb, tmp_path: Path, content_type: str,
                                           render: Callable[..., bytes]) -> None:
    """Google adds its own words to a refused instance (FailureDetail); they may quote the
    instance's attributes: the reason is the FailureReason code only."""
    [sample] = write_samples(tmp_path, studies=1, series_per_study=1, instances_per_series=1)
    fake.route = lambda *_: (409, {"Content-Type": content_type}, render([], [(sample.sop_uid, 0x0110)], ECHOED))
    [outcome] = fake_store(fake).store_files([sample.path])
    assert not outcome.stored and outcome.conflict
    assert outcome.reason == "failure reason 0x0110 (processing failure)"


def test_a_failed_orthanc_lookup_logs_no_server_words(fake: FakeDicomweb, caplog: pytest.LogCaptureFixture) -> None:
    """Orthanc's /tools/find refuses with an error quoting patient data: the lookup falls back
    to QIDO and the DEBUG line that says so names the status and code, not the server's words."""
    from dicomfuse.stores.http import RetryPolicy

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if path.startswith("/tools/find"):
            return 400, {}, json.dumps({"Details": ECHOED, "Message": ECHOED, "OrthancStatus": 8}).encode()
        return 200, {"Content-Type": "application/dicom+json"}, dicom_json("1.2")

    fake.route = route
    ds = DicomwebDataset(fake.url, orthanc_rest_url=fake.base_url, retry=RetryPolicy(attempts=1))
    fake.datasets.append(ds)
    with caplog.at_level("DEBUG"):
        assert list(ds.store.studies("1.2")) == ["1.2"]
    assert "POST /tools/find: HTTP 400 Bad Request: Orthanc error 8 (bad request)" in caplog.text
    assert PATIENT_NAME not in caplog.text and "PatientID" not in caplog.text


def test_a_file_pydicom_cannot_read_is_refused_without_quoting_its_error(
        fake: FakeDicomweb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """pydicom's errors quote the bytes or values they failed on: the DEBUG line names the
    exception and where, never its message."""
    import pydicom

    def quoting(*args: object, **kwargs: object) -> None:
        raise ValueError(f"invalid literal for int() with base 10: '{PATIENT_NAME}'")

    [sample] = write_samples(tmp_path, studies=1, series_per_study=1, instances_per_series=1)
    monkeypatch.setattr(pydicom, "dcmread", quoting)
    with caplog.at_level("DEBUG"):
        [outcome] = fake_store(fake).store_files([sample.path])
    assert not outcome.stored and outcome.reason == "not a DICOM file"
    assert "pydicom cannot read it (ValueError at test_dicomweb_store.py" in caplog.text
    assert PATIENT_NAME not in caplog.text


@pytest.mark.parametrize(("content_type", "named"), [("text/html; charset=utf-8", "text/html"),
                                                     (f"application/{PATIENT_NAME}", "of another kind")])
def test_an_unexpected_content_type_is_named_only_when_it_is_a_known_one(fake: FakeDicomweb, content_type: str,
                                                                         named: str) -> None:
    fake.route = lambda *_: (200, {"Content-Type": content_type}, b"<html>login</html>")
    with pytest.raises(StoreError) as caught:
        fake_store(fake).retrieve("1", "2", "3", io.BytesIO())
    assert str(caught.value) == f"GET /dicom-web/studies/1/series/2/instances/3: unexpected Content-Type {named}"


@pytest.mark.parametrize("system", ["503", "silent"])
def test_an_orthanc_detection_that_could_not_ask_is_not_repeated_before_every_call(fake: FakeDicomweb,
                                                                                   system: str) -> None:
    """A proxy in front of /dicom-web that answers other paths 503, or drops them: the /system
    probe was sent again before every lookup, each waiting the full timeout when silent (cp -r
    of 24 files: 56 s instead of 1 s)."""
    from dicomfuse.stores.http import RetryPolicy

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if path.startswith("/system") or path.startswith("/tools") or path.startswith("/instances"):
            return (503, {}, b"")
        return (200, {"Content-Type": "application/dicom+json"}, b"[]")

    fake.route = route
    if system == "silent":
        fake.stall_paths = ("/system",)
    ds = DicomwebDataset(fake.url, orthanc_rest_url="auto", retry=RetryPolicy(attempts=1), timeout=(1.0, 0.5))
    fake.datasets.append(ds)
    for uid in ("1.2.3", "1.2.4", "1.2.5"):
        assert list(ds.store.studies(uid)) == []
        assert list(ds.store.series(uid)) == []
    assert sum(1 for _, path, _ in fake.requests if path.startswith("/system")) == 1


class _FileSink:
    """A sink that is a file, as the instance cache's is (it names its path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close()

    def write(self, data: bytes) -> int:
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()


@pytest.mark.parametrize("kind", ["image", "no-pixel-data"])
def test_a_body_ended_by_the_connection_and_cut_is_asked_for_again(tmp_path: Path, dicom: DicomFactory,
                                                                   kind: str) -> None:
    """An HTTP/1.0-style server (no Content-Length, not chunked: the body ends when the
    connection closes) whose connection drops in the middle: the cut file was served as
    complete, cp exit 0. The DICOM file is checked instead, and the rest is asked for again."""
    import http.server
    import socketserver
    import threading

    whole = dicom.instance(pixel_bytes=8192).path.read_bytes()
    if kind == "no-pixel-data":  # image attributes, no pixel data: a spectroscopy object is so, whole
        import io as _io

        import pydicom

        ds = pydicom.dcmread(_io.BytesIO(whole))
        del ds.PixelData
        out = _io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        whole = out.getvalue()
    answers: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):  # HTTP/1.0: the connection closes after each answer
        def do_GET(self) -> None:  # noqa: N802
            body = whole if answers or kind == "no-pixel-data" else whole[:6000]  # the image's first answer is cut
            answers.append(len(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from dicomfuse.stores.http import RetryPolicy

        ds = DicomwebDataset(f"http://127.0.0.1:{server.server_address[1]}/dicom-web", orthanc_rest_url=None,
                             retry=RetryPolicy(attempts=3, backoff_base=0.01, backoff_max=0.02))
        sink = _FileSink(tmp_path / "copy.dcm")
        try:
            written = ds.store.retrieve("1.2.3", "1.2.4", "1.2.5", sink)  # type: ignore[arg-type]
        finally:
            sink.close()
            ds.close()
    finally:
        server.shutdown()
        server.server_close()
    assert answers == ([6000, len(whole)] if kind == "image" else [len(whole)])
    assert written == len(whole) and (tmp_path / "copy.dcm").read_bytes() == whole


def test_search_results_with_tags_in_lower_case_are_read(fake: FakeDicomweb, caplog: pytest.LogCaptureFixture) -> None:
    """A server writing DICOM JSON tags in lower case (PS3.18 F.2 asks for upper case): the
    store listed empty, cp -r copied nothing with exit 0, and no log line said why."""
    studies = [{"0020000d": {"vr": "UI", "Value": [f"1.2.{n}"]}} for n in range(3)]
    fake.route = lambda *_: (200, {"Content-Type": "application/dicom+json"}, json.dumps(studies).encode())
    assert list(fake_store(fake).studies()) == ["1.2.0", "1.2.1", "1.2.2"]
    # Answers with no UID at all are still empty, and now said at WARNING.
    fake.route = lambda *_: (200, {"Content-Type": "application/dicom+json"}, b'[{"00100010": {"vr": "PN"}}]')
    with caplog.at_level("WARNING"):
        assert list(fake_store(fake).studies()) == []
    assert "none with its UID" in caplog.text


def test_an_orthanc_detection_that_fails_slowly_is_not_asked_again(fake: FakeDicomweb,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway that holds /system and then answers 504 (or closes): asked again every minute,
    inline, the detection held a user's ls for as long each time (hunt 58: 30-60 s)."""
    import time as _time

    from dicomfuse.stores import dicomweb
    from dicomfuse.stores.http import RetryPolicy

    monkeypatch.setattr(dicomweb, "ORTHANC_DETECT_SLOW_S", 0.2)
    monkeypatch.setattr(dicomweb, "ORTHANC_DETECT_RETRY_S", 0.0)  # a quick failure would be asked each time

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if path.startswith("/system"):
            _time.sleep(0.3)
            return (504, {}, b"")
        return (200, {"Content-Type": "application/dicom+json"}, b"[]")

    fake.route = route
    ds = DicomwebDataset(fake.url, orthanc_rest_url="auto", retry=RetryPolicy(attempts=1))
    fake.datasets.append(ds)
    for uid in ("1.2.3", "1.2.4", "1.2.5"):
        assert list(ds.store.studies(uid)) == []
    assert sum(1 for _, path, _ in fake.requests if path.startswith("/system")) == 1
