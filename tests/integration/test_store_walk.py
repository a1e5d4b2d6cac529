"""``walk()`` of each store against real servers: Orthanc with its DICOMweb plugin, the Cloud
Healthcare API stand-in, and a local folder; plus odd DICOMweb servers on a scripted loopback.

A walk returns every instance with its study and series UIDs in one request per page of
instances, whatever the number of studies and series, and gives the same listings as listing
folder by folder."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from dicomfuse.core.discovery import build_tree
from dicomfuse.core.paths import DicomPath, instance_name
from dicomfuse.core.tree import Entry
from dicomfuse.samples import SampleInstance, make_uid, write_instance
from dicomfuse.stores.auth import TokenSource, load_credentials
from dicomfuse.stores.base import InstanceInfo, NotFound, Store, WalkableStore
from dicomfuse.stores.dicomweb import DICOM_JSON, DicomwebDataset, DicomwebStore
from dicomfuse.stores.healthcare import HealthcareDataset
from dicomfuse.stores.http import RetryPolicy, make_session
from dicomfuse.stores.local import LocalDataset, LocalStore
from tests.conftest import DicomFactory
from tests.fakes.healthcare import HealthcareStandIn
from tests.fakes.http_server import LoopbackServer, Reply, Seen
from tests.orthanc_server import OrthancServer

PAGE = 2
SHAPE = ((3, 2), (1,), (2, 1))
"""Instances per series, per study: 3 studies, 5 series, 9 instances (8 folders to list)."""
INCLUDE_BOTH = "0020000D,0020000E"  # the includefield values of a request, joined as the stand-in does
ABSENT_UID = "1.2.826.0.1.3680043.8.498.999999"


def seed_files(dicom: DicomFactory) -> list[SampleInstance]:
    return [
        dicom.instance(study, series, pixel_bytes=512 * (study + 1))  # sizes differ by study
        for study, counts in enumerate(SHAPE)
        for series, count in enumerate(counts)
        for _ in range(count)
    ]


def triples(infos: list[InstanceInfo] | list[SampleInstance]) -> set[tuple[str, str, str]]:
    return {(i.study_uid, i.series_uid, i.sop_uid) for i in infos}


def study_uids(samples: list[SampleInstance]) -> list[str]:
    return list(dict.fromkeys(s.study_uid for s in samples))


Listings = dict[DicomPath, list[tuple[str, Entry]]]


def folder_listings(store: Store, studies: list[str]) -> Listings:
    """What the Vfs lists folder by folder today: one request per study and per series."""
    found: Listings = {}
    for study in studies:
        series_uids = list(store.series(study))
        found[DicomPath((store.name, study))] = sorted((s, Entry(True)) for s in series_uids)
        for series in series_uids:
            found[DicomPath((store.name, study, series))] = sorted(
                (instance_name(i.sop_uid), Entry(False, i.size)) for i in store.instances(study, series)
            )
    return found


def walk_listings(store: WalkableStore, store_name: str, studies: list[str]) -> Listings:
    return {
        path: sorted(children)
        for path, children in build_tree(store.walk()).listings(store_name)
        if path.study in studies
    }


# -- the DICOMweb servers: Orthanc and the Cloud Healthcare stand-in ------------------------------------


@dataclass
class Server:
    """A seeded DICOMweb store and the QIDO requests it received since :meth:`clear`."""

    store: DicomwebStore
    samples: list[SampleInstance]
    searches: Callable[[], list[tuple[str, dict[str, str]]]]  # (path below the root, query) of each GET
    clear: Callable[[], None]
    total: Callable[[], int]  # instances in the whole store (Orthanc is shared by the session)

    def pages(self, instances: int) -> int:
        """Requests a walk of ``instances`` needs: full pages, then a short or empty one."""
        return instances // self.store.instance_page_size + 1


@pytest.fixture
def orthanc_server(orthanc: OrthancServer, dicom: DicomFactory) -> Iterator[Server]:
    seen: list[str] = []
    session = make_session(4, None)

    def record(response: requests.Response, *args: object, **kwargs: object) -> None:
        if response.request.method == "GET" and response.request.url:
            seen.append(response.request.url)

    session.hooks["response"].append(record)
    dataset = DicomwebDataset(orthanc.dicomweb_url, session=session, orthanc_rest_url=None)
    store = DicomwebStore(dataset.store.name, dataset.root_url, dataset.client, orthanc_rest_url=None,
                          page_size=1000, instance_page_size=PAGE)
    samples = seed_files(dicom)
    seeder = DicomwebDataset(orthanc.dicomweb_url, orthanc_rest_url=None)
    try:
        assert all(o.stored for o in seeder.store.store_files([s.path for s in samples]))
    finally:
        seeder.close()
    root = urlsplit(store.root_url).path

    def searches() -> list[tuple[str, dict[str, str]]]:
        return [
            (urlsplit(url).path[len(root):], {k: ",".join(v) for k, v in parse_qs(urlsplit(url).query).items()})
            for url in seen
        ]

    yield Server(store, samples, searches, seen.clear, orthanc.instance_count)
    dataset.close()


@pytest.fixture(scope="module")
def standin() -> Iterator[HealthcareStandIn]:
    """A stand-in of our own: without the shared one's index lag, a stored instance is found at once."""
    with HealthcareStandIn() as server:
        yield server


def google_dataset(standin: HealthcareStandIn, tmp_path: Path, **kwargs: int) -> tuple[HealthcareDataset, str]:
    dataset_id = f"walk-{uuid.uuid4().hex[:10]}"
    url = standin.create_dataset(dataset_id)
    standin.create_store(dataset_id, "store-a")
    key = standin.write_key_file(tmp_path / f"key-{dataset_id}.json")
    key.chmod(0o600)
    return HealthcareDataset(url, TokenSource(load_credentials(key)), **kwargs), dataset_id  # type: ignore[arg-type]


@pytest.fixture
def google_server(standin: HealthcareStandIn, dicom: DicomFactory, tmp_path: Path) -> Iterator[Server]:
    dataset, dataset_id = google_dataset(standin, tmp_path, instance_page_size=PAGE)
    store = dataset.open_store("store-a")
    samples = seed_files(dicom)
    assert all(o.stored for o in standin.store_view(dataset_id, "store-a").store_files([s.path for s in samples]))
    root = urlsplit(store.root_url).path

    def searches() -> list[tuple[str, dict[str, str]]]:
        return [
            (r.path[len(root):], r.query) for r in standin.requests if r.method == "GET" and r.path.startswith(root)
        ]

    yield Server(store, samples, searches, standin.clear_log, lambda: len(samples))
    dataset.close()


@pytest.fixture(params=["orthanc", "google"])
def server(request: pytest.FixtureRequest) -> Server:
    return request.getfixturevalue(f"{request.param}_server")  # type: ignore[no-any-return]


def test_dicomweb_stores_are_walkable(server: Server) -> None:
    assert isinstance(server.store, WalkableStore)
    assert isinstance(server.store, Store)


def test_walk_of_the_store_costs_pages_not_folders(server: Server) -> None:
    total = server.total()
    server.clear()
    infos = list(server.store.walk())
    mine = [i for i in infos if i.study_uid in study_uids(server.samples)]
    assert triples(mine) == triples(server.samples)
    assert len(mine) == len(server.samples)
    assert all(i.size is None for i in infos)
    assert len(infos) == total and len({i.sop_uid for i in infos}) == total
    searches = server.searches()
    assert len(searches) == server.pages(total)
    assert {path for path, _ in searches} == {"/instances"}  # never a study or series folder
    assert [query["offset"] for _, query in searches] == [str(PAGE * n) for n in range(len(searches))]
    assert all(query["limit"] == str(PAGE) and query["includefield"] == INCLUDE_BOTH for _, query in searches)


def test_walk_keeps_one_sop_uid_held_by_two_series(server: Server, dicom: DicomFactory, tmp_path: Path) -> None:
    """An edited copy (other study and series, same SOP Instance UID) beside the original: the
    store-wide walk kept one entry per SOP UID, so the copy's series listed empty after ls -R
    and cp -r of the store copied one file less, exit 0."""
    original = server.samples[0]
    edited = tmp_path / "edited.dcm"
    study, series = make_uid(dicom.seed, "study", 9), make_uid(dicom.seed, "series", 9, 9)
    write_instance(edited, study, series, original.sop_uid, pixel_bytes=700)
    assert all(o.stored for o in server.store.store_files([edited]))
    try:
        walked = triples([i for i in server.store.walk() if i.sop_uid == original.sop_uid])
        assert walked == {(original.study_uid, original.series_uid, original.sop_uid),
                          (study, series, original.sop_uid)}
        assert walk_listings(server.store, server.store.name, [study]) == folder_listings(server.store, [study])
    finally:  # a server shared by other tests, which count on unique SOP Instance UIDs
        if isinstance(server.store, DicomwebStore) and server.store.orthanc() is None and "/dicom-web" in \
                server.store.root_url:  # Orthanc deletes through its REST API only
            remover = DicomwebDataset(server.store.root_url, orthanc_rest_url="auto")
            remover.store.delete_instance(study, series, original.sop_uid)
            remover.close()
        else:
            server.store.delete_instance(study, series, original.sop_uid)


def test_walk_of_one_study(server: Server) -> None:
    study = server.samples[0].study_uid
    expected = [s for s in server.samples if s.study_uid == study]
    assert len(expected) == 5  # two series, more than two pages
    server.clear()
    infos = list(server.store.walk(study))
    assert triples(infos) == triples(expected) and len(infos) == len(expected)
    searches = server.searches()
    assert [path for path, _ in searches] == [f"/studies/{study}/instances"] * server.pages(len(expected))
    assert all(query["includefield"] == INCLUDE_BOTH for _, query in searches)


def test_walk_of_an_absent_study_yields_nothing(server: Server) -> None:
    server.clear()
    assert list(server.store.walk(ABSENT_UID)) == []
    assert len(server.searches()) == 1


def test_walk_gives_the_listings_of_every_folder(server: Server) -> None:
    studies = study_uids(server.samples)
    assert walk_listings(server.store, server.store.name, studies) == folder_listings(server.store, studies)


def test_orthanc_returns_the_parent_uids_of_instances(orthanc_server: Server) -> None:
    """Orthanc (1.10 + DICOMweb 1.7) answers both parent UIDs with or without includefield,
    repeated or comma-separated; the walk asks anyway, for servers that do not."""
    store = orthanc_server.store
    study = orthanc_server.samples[0].study_uid
    for path in ("/instances", f"/studies/{study}/instances"):
        for query in ({}, {"includefield": "0020000D,0020000E"}):
            response = store.client.request("GET", store.root_url + path, params={**query, "limit": 1},
                                            headers={"Accept": DICOM_JSON})
            with response:
                entry = json.loads(response.content)[0]
            assert {"0020000D", "0020000E", "00080018"} <= entry.keys(), (path, query)


def test_google_repeats_the_study_uid_below_a_study_only_when_asked(google_server: Server) -> None:
    """Why the walk sends includefield: the stand-in, like PS3.18 allows, leaves out the level
    named in the path unless includefield asks for it."""
    store = google_server.store
    study = google_server.samples[0].study_uid
    url = f"{store.root_url}/studies/{study}/instances"
    for params, has_study in (({}, False), ({"includefield": "0020000D"}, True)):
        with store.client.request("GET", url, params={**params, "limit": 1}, headers={"Accept": DICOM_JSON}) as r:
            entry = json.loads(r.content)[0]
        assert ("0020000D" in entry) is has_study
        assert "0020000E" in entry


def test_google_walks_with_pages_of_50000(standin: HealthcareStandIn, tmp_path: Path) -> None:
    """120 studies: 240 folder listings, or one walk request at Google's instance limit."""
    dataset, dataset_id = google_dataset(standin, tmp_path)
    try:
        studies = standin.add_synthetic_studies(dataset_id, "store-a", 120)
        standin.clear_log()
        infos = list(dataset.open_store("store-a").walk())
        assert sorted(i.study_uid for i in infos) == sorted(studies)
        assert all(i.series_uid == i.study_uid + ".1" for i in infos)
        walks = [r for r in standin.requests if r.path.endswith("/dicomWeb/instances")]
        assert len(walks) == len([r for r in standin.requests if "/dicomWeb/" in r.path]) == 1
        assert walks[0].query["limit"] == "50000"
    finally:
        dataset.close()


# -- odd DICOMweb servers -------------------------------------------------------------------------------


Answer = Callable[[str, dict[str, str]], Reply]


class ScriptedDicomweb(LoopbackServer):
    """Answers every GET with ``answer(path, query)``."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(lambda seen: self._route(seen))
        self.answer = answer

    def _route(self, seen: Seen) -> Reply:
        split = urlsplit(seen.path)
        return self.answer(split.path, {k: ",".join(v) for k, v in parse_qs(split.query).items()})

    @property
    def url(self) -> str:
        return f"{self.base_url}/dicom-web"


Scripted = Callable[[Answer], tuple[ScriptedDicomweb, DicomwebStore]]


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    """Makes a scripted server and a store on it with pages of ``PAGE``."""
    made: list[tuple[ScriptedDicomweb, DicomwebDataset]] = []

    def make(answer: Answer) -> tuple[ScriptedDicomweb, DicomwebStore]:
        server = ScriptedDicomweb(answer)
        dataset = DicomwebDataset(server.url, orthanc_rest_url=None, retry=RetryPolicy(attempts=1), page_size=PAGE)
        made.append((server, dataset))
        return server, dataset.store

    yield make
    for server, dataset in made:
        dataset.close()
        server.stop()


def entry(study: str | None, series: str | None, sop: str) -> dict[str, object]:
    tags = {"0020000D": study, "0020000E": series, "00080018": sop}
    return {tag: {"vr": "UI", "Value": [uid]} for tag, uid in tags.items() if uid is not None}


def page_of(*entries: dict[str, object]) -> Reply:
    return Reply(200, json.dumps(list(entries)).encode(), {"Content-Type": DICOM_JSON})


def test_walk_of_a_server_that_ignores_limit_and_offset_ends(scripted: Scripted) -> None:
    everything = page_of(entry("1.1", "1.1.1", "1.1.1.1"), entry("1.1", "1.1.1", "1.1.1.2"), entry("1.2", "1.2.1", "1"))
    server, store = scripted(lambda path, query: everything)
    assert [i.sop_uid for i in store.walk()] == ["1.1.1.1", "1.1.1.2", "1"]
    assert len(server.seen) == 2  # the second page brought nothing new


def test_walk_skips_incomplete_entries_and_repeats(scripted: Scripted) -> None:
    pages = {
        "0": page_of(entry("1.1", "1.1.1", "1.1.1.1"), entry(None, "1.1.1", "1.1.1.2")),
        "2": page_of(entry("1.1", None, "1.1.1.3"), entry("1.1", "1.1.1", "1.1.1.1")),  # a repeat: the store moved
        "4": page_of(entry("1.1", "1.1.1", "1.1.1.4")),
    }
    server, store = scripted(lambda path, query: pages[query["offset"]])
    assert [i.sop_uid for i in store.walk()] == ["1.1.1.1", "1.1.1.4"]
    assert len(server.seen) == 3


def test_walk_of_one_study_skips_entries_of_other_studies(scripted: Scripted) -> None:
    server, store = scripted(lambda path, query: page_of(entry("1.1", "1.1.1", "1.1.1.1"), entry("1.2", "1.2.1", "2")))
    assert [(i.study_uid, i.sop_uid) for i in store.walk("1.1")] == [("1.1", "1.1.1.1")]
    assert urlsplit(server.seen[0].path).path == "/dicom-web/studies/1.1/instances"


@pytest.mark.parametrize("last", [Reply(204, b"", {}), page_of()], ids=["204", "empty"])
def test_walk_ends_on_204_and_an_empty_page(scripted: Scripted, last: Reply) -> None:
    pages = {"0": page_of(entry("1.1", "1.1.1", "1"), entry("1.1", "1.1.1", "2")), "2": last}
    server, store = scripted(lambda path, query: pages[query["offset"]])
    assert [i.sop_uid for i in store.walk()] == ["1", "2"]
    assert len(server.seen) == 2


def test_a_server_without_store_level_instance_search_raises(scripted: Scripted) -> None:
    """The store must not look empty: the caller falls back to listing folder by folder."""
    server, store = scripted(lambda path, query: Reply(404, b"", {}))
    with pytest.raises(NotFound):
        list(store.walk())
    assert list(store.walk("1.1")) == []  # an absent study, as for series()
    assert list(store.series("1.1")) == [] and list(store.instances("1.1", "1.1.1")) == []
    with pytest.raises(NotFound):
        list(store.studies())


# -- a local folder -------------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path, dicom: DicomFactory) -> tuple[LocalStore, list[SampleInstance]]:
    root = tmp_path / "dataset"
    (root / "store-a").mkdir(parents=True)
    store = LocalDataset(root, rescan_interval=3600.0).open_store("store-a")
    samples = seed_files(dicom)
    assert all(o.stored for o in store.store_files([s.path for s in samples]))
    return store, samples


def test_local_walk_with_sizes(local: tuple[LocalStore, list[SampleInstance]]) -> None:
    store, samples = local
    assert isinstance(store, WalkableStore)
    infos = list(store.walk())
    assert triples(infos) == triples(samples) and len(infos) == len(samples)
    assert {i.sop_uid: i.size for i in infos} == {s.sop_uid: s.path.stat().st_size for s in samples}
    study = samples[0].study_uid
    assert triples(list(store.walk(study))) == triples([s for s in samples if s.study_uid == study])
    assert list(store.walk(ABSENT_UID)) == []


def test_local_walk_gives_the_listings_of_every_folder(local: tuple[LocalStore, list[SampleInstance]]) -> None:
    store, samples = local
    studies = study_uids(samples)
    assert walk_listings(store, store.name, studies) == folder_listings(store, studies)


def test_local_walk_of_a_study_just_written_by_another_process(
    local: tuple[LocalStore, list[SampleInstance]], tmp_path: Path
) -> None:
    store, samples = local
    assert list(store.walk())  # index built; the next periodic check is an hour away
    study, series, sop = (make_uid("walk-new", level) for level in ("study", "series", "sop"))
    write_instance(tmp_path / "dataset" / "store-a" / "any" / "depth" / "IMG0001", study, series, sop)
    assert triples(list(store.walk(study))) == {(study, series, sop)}


def test_local_walk_of_a_missing_store(tmp_path: Path) -> None:
    (tmp_path / "dataset").mkdir()
    with pytest.raises(NotFound):
        list(LocalDataset(tmp_path / "dataset").open_store("gone").walk())


def test_orthanc_with_its_rest_api_walks_and_lists_from_its_index(orthanc: OrthancServer, dicom: DicomFactory) -> None:
    """With Orthanc's REST API, a walk is three paged resource lists (GET /studies?expand…: no
    file is read, and unlike /tools/find not cut by LimitFindResults) and gives true sizes; the
    study listing comes from the index too."""
    posts: list[str] = []
    session = make_session(4, None)

    def record(response: requests.Response, *args: object, **kwargs: object) -> None:
        posts.append(f"{response.request.method} {urlsplit(response.request.url or '').path}")

    session.hooks["response"].append(record)
    dataset = DicomwebDataset(orthanc.dicomweb_url, session=session, orthanc_rest_url="auto")
    try:
        samples = seed_files(dicom)
        assert all(o.stored for o in dataset.store.store_files([s.path for s in samples]))
        assert dataset.store.orthanc() is not None  # detected (and its index probed) before the count
        posts.clear()
        infos = [i for i in dataset.store.walk() if i.sop_uid in {s.sop_uid for s in samples}]
        assert triples(infos) == triples(samples)
        assert {i.sop_uid: i.size for i in infos} == {s.sop_uid: s.path.stat().st_size for s in samples}
        assert not any("/dicom-web/" in p for p in posts), posts
        assert [p for p in posts if p != "GET /system"] == ["GET /studies", "GET /series", "GET /instances"], posts
        assert set(study_uids(samples)) <= set(dataset.store.studies())
        # find, ls -R and du list the store just before they walk it: that listing's studies are
        # reused, so the walk costs two searches (series, instances), not three.
        posts.clear()
        again = [i for i in dataset.store.walk() if i.sop_uid in {s.sop_uid for s in samples}]
        assert triples(again) == triples(samples)
        assert posts == ["GET /series", "GET /instances"], posts
    finally:
        dataset.close()
