"""The Cloud Healthcare dataset client against the stand-in of Google's API, without a mount:
what goes over the wire (limits, Accept headers, page tokens) and what comes back (outcomes,
errors) for each Store/Dataset call."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomfuse.samples import make_uid, write_instance
from dicomfuse.stores.auth import TokenSource, load_credentials
from dicomfuse.stores.base import AlreadyExists, Forbidden, InvalidName, NotEmpty, NotFound, Unavailable
from dicomfuse.stores.healthcare import HealthcareDataset
from dicomfuse.stores.http import RetryPolicy
from tests.fakes.healthcare import HealthcareStandIn

FAST_RETRY = RetryPolicy(attempts=3, backoff_base=0.01, backoff_max=0.05, retry_after_max=0.05)


@pytest.fixture(scope="module")
def standin() -> Iterator[HealthcareStandIn]:
    with HealthcareStandIn() as server:
        yield server


@pytest.fixture
def dataset(standin: HealthcareStandIn, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HealthcareDataset]:
    dataset_id = f"ds-{abs(hash(request.node.name)) % 10**8}"
    url = standin.create_dataset(dataset_id)
    standin.create_store(dataset_id, "store-a")
    key = standin.write_key_file(tmp_path / "key.json")
    key.chmod(0o600)
    ds = HealthcareDataset(url, TokenSource(load_credentials(key)), retry=FAST_RETRY)
    ds.dataset_id = dataset_id  # type: ignore[attr-defined]
    standin.clear_faults()
    standin.clear_log()
    try:
        yield ds
    finally:
        ds.close()


def instance(folder: Path, tag: str, n: int = 0, pixel_bytes: int = 2048) -> tuple[Path, str, str, str]:
    study, series, sop = make_uid(tag, "study"), make_uid(tag, "series"), make_uid(tag, "sop", n)
    path = folder / f"{tag}-{n}-{pixel_bytes}.dcm"
    write_instance(path, study, series, sop, pixel_bytes=pixel_bytes)
    return path, study, series, sop


def test_stores_are_paged_with_page_tokens_of_at_most_1000(standin: HealthcareStandIn,
                                                           dataset: HealthcareDataset) -> None:
    for i in range(1_200):
        standin.create_store(dataset.dataset_id, f"s{i:05d}")  # type: ignore[attr-defined]
    assert len(set(dataset.list_stores())) == 1_201
    lists = [r for r in standin.requests if r.path.endswith("/dicomStores") and r.method == "GET"]
    assert [r.query.get("pageSize") for r in lists] == ["1000", "1000"]
    assert "pageToken" not in lists[0].query and lists[1].query.get("pageToken")


def test_create_store_errors(standin: HealthcareStandIn, dataset: HealthcareDataset) -> None:
    dataset.create_store("new.store-1")
    assert "new.store-1" in standin.store_ids(dataset.dataset_id)  # type: ignore[attr-defined]
    with pytest.raises(AlreadyExists):
        dataset.create_store("new.store-1")
    with pytest.raises(InvalidName):
        dataset.create_store("no spaces")
    assert not any(r.method == "POST" and "no spaces" in str(r.query) for r in standin.requests)


def test_create_store_is_tried_again_after_a_server_error(standin: HealthcareStandIn,
                                                         dataset: HealthcareDataset) -> None:
    standin.inject(status=500, times=1, method="POST", path_contains="dicomStores?")
    dataset.create_store("after-a-500")
    assert "after-a-500" in standin.store_ids(dataset.dataset_id)  # type: ignore[attr-defined]
    posts = [r for r in standin.requests if r.method == "POST" and r.path.endswith("/dicomStores")]
    assert len(posts) == 2


def test_create_store_whose_first_answer_was_an_error_but_which_exists_then(standin: HealthcareStandIn,
                                                                           dataset: HealthcareDataset) -> None:
    """A 5xx whose request did create the store (seen as: it exists when asked again): the 409
    to the second attempt is success, not EEXIST."""
    dataset_id = dataset.dataset_id  # type: ignore[attr-defined]
    standin.inject(status=503, times=1, method="POST", path_contains="dicomStores?", delay=0.3)
    creator = threading.Timer(0.1, standin.create_store, (dataset_id, "made-meanwhile"))
    creator.start()
    try:
        dataset.create_store("made-meanwhile")
    finally:
        creator.join()
    posts = [r for r in standin.requests if r.method == "POST" and r.path.endswith("/dicomStores")]
    assert len(posts) == 2
    with pytest.raises(AlreadyExists):  # a first attempt's 409 is still EEXIST
        dataset.create_store("made-meanwhile")


def test_delete_store_checks_it_is_empty_first(standin: HealthcareStandIn, dataset: HealthcareDataset,
                                               tmp_path: Path) -> None:
    path, study, series, sop = instance(tmp_path, "del")
    standin.store_view(dataset.dataset_id, "store-a").store_files([path])  # type: ignore[attr-defined]
    with pytest.raises(NotEmpty):
        dataset.delete_store("store-a")
    assert "store-a" in standin.store_ids(dataset.dataset_id)  # type: ignore[attr-defined]
    assert not any(r.method == "DELETE" for r in standin.requests), "nothing was deleted"
    dataset.create_store("empty")
    dataset.delete_store("empty")
    assert "empty" not in standin.store_ids(dataset.dataset_id)  # type: ignore[attr-defined]


def test_qido_uses_google_limits_and_wado_asks_for_the_stored_syntax(standin: HealthcareStandIn,
                                                                     dataset: HealthcareDataset,
                                                                     tmp_path: Path) -> None:
    path, study, series, sop = instance(tmp_path, "wire")
    store = dataset.open_store("store-a")
    assert store.store_files([path])[0].stored
    assert list(store.studies()) == [study]
    assert list(store.series(study)) == [series]
    assert [i.sop_uid for i in store.instances(study, series)] == [sop]
    sink = io.BytesIO()
    assert store.retrieve(study, series, sop, sink) == path.stat().st_size
    assert sink.getvalue() == path.read_bytes()
    searches = [r for r in standin.requests if r.method == "GET" and "/dicomWeb/" in r.path]
    limits = {r.path.rsplit("/", 1)[-1]: r.query.get("limit") for r in searches if "limit" in r.query}
    assert limits == {"studies": "5000", "series": "5000", "instances": "50000"}


def test_stow_conflict_is_reported_with_googles_code_not_its_words(standin: HealthcareStandIn,
                                                                   dataset: HealthcareDataset, tmp_path: Path) -> None:
    """Google's FailureDetail text is never kept (it may quote the instance's attributes): the
    reason is its FailureReason code, and a 409 marks the conflict."""
    path, study, series, sop = instance(tmp_path, "conflict")
    store = dataset.open_store("store-a")
    assert store.store_files([path])[0].stored
    assert store.store_files([path])[0].stored, "identical bytes again: Google accepts them"
    other = tmp_path / "other.dcm"
    write_instance(other, study, series, sop, pixel_bytes=4096)
    outcome = store.store_files([other])[0]
    assert not outcome.stored and outcome.conflict
    assert outcome.reason == "failure reason 0x0110 (processing failure)"
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(path.read_bytes()[:400])
    refused = store.store_files([bad])[0]
    assert not refused.stored and refused.reason == "failure reason 0x0110 (processing failure)"


def test_429_on_stow_is_sent_again_and_a_503_is_looked_up_before_sending_again(
    standin: HealthcareStandIn, dataset: HealthcareDataset, tmp_path: Path
) -> None:
    store = dataset.open_store("store-a")
    path, *_ = instance(tmp_path, "throttle")
    list(store.studies())  # a token first: faults below are for STOW only
    standin.inject(status=429, times=1, method="POST", retry_after="0")
    assert store.store_files([path])[0].stored
    other, study, series, sop = instance(tmp_path, "unavailable")
    standin.clear_log()
    standin.inject(status=503, times=1, method="POST")
    assert store.store_files([other])[0].stored, "the 503 may or may not have stored it: looked up, then sent"
    calls = [(r.method, r.path.rsplit("/", 1)[-1]) for r in standin.requests if "/dicomWeb/" in r.path]
    assert calls[0][0] == "POST" and calls[-1][0] == "POST" and len([c for c in calls if c[0] == "POST"]) == 2
    assert any(method == "GET" for method, _ in calls[1:-1]), "looked up before sending again"
    assert len([i for i in standin.store_view(dataset.dataset_id, "store-a").instances(study, series)]) == 1  # type: ignore[attr-defined]


def test_missing_instance_and_denied_permission(standin: HealthcareStandIn, dataset: HealthcareDataset) -> None:
    store = dataset.open_store("store-a")
    with pytest.raises(NotFound):
        store.retrieve("1.2.3", "1.2.4", "1.2.5", io.BytesIO())
    standin.deny("healthcare.dicomStores.dicomWebRead")
    try:
        with pytest.raises(Forbidden, match="403"):
            list(store.studies())
    finally:
        standin.deny(None)


def test_instance_delete_uses_dicomweb_delete(standin: HealthcareStandIn, dataset: HealthcareDataset,
                                              tmp_path: Path) -> None:
    path, study, series, sop = instance(tmp_path, "rm")
    store = dataset.open_store("store-a")
    store.store_files([path])
    store.delete_instance(study, series, sop)
    view = standin.store_view(dataset.dataset_id, "store-a")  # type: ignore[attr-defined]
    assert view.instance_bytes(study, series, sop) is None
    with pytest.raises(NotFound):
        store.delete_instance(study, series, sop)


@pytest.mark.parametrize(("cap", "warning"), [(1000, False), (750, True)])
def test_a_server_that_lowers_the_limit_is_still_listed_to_the_end(standin: HealthcareStandIn,
                                                                   dataset: HealthcareDataset, monkeypatch,
                                                                   cap: int, warning: bool) -> None:
    """A server whose maximum page is below the limit asked for answers short pages before the
    end: a round-numbered page, or one with PS3.18's 'additional results' warning, is not the
    end of the listing."""
    import tests.fakes.healthcare as fake

    monkeypatch.setattr(fake, "QIDO_LIMITS", {**fake.QIDO_LIMITS, "studies": (100, cap)})
    monkeypatch.setattr(standin, "qido_warning", warning)
    made = set(standin.add_synthetic_studies(dataset.dataset_id, "store-a", 1_200))  # type: ignore[attr-defined]
    listed = list(dataset.open_store("store-a").studies())
    assert len(listed) == len(set(listed)) == 1_200 and set(listed) == made


@pytest.fixture
def quick_token_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """google-auth retries a 5xx of the token service after 1 and 2 s: at once here."""
    import types

    from google.auth import _exponential_backoff

    monkeypatch.setattr(_exponential_backoff, "time", types.SimpleNamespace(sleep=lambda seconds: None))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_token_service_that_does_not_answer_is_unreachable_like_the_server(
    standin: HealthcareStandIn, dataset: HealthcareDataset, tmp_path: Path, quick_token_retries: None
) -> None:
    """Write-back waits for an unreachable server however long it is down, and gives up after its
    attempts on error answers: a network outage that hits the token renewal first (the token
    service is down like everything else) must read as unreachable too, not as an error answer."""
    store = dataset.open_store("store-a")
    standin.inject(drop=True, times=100, path_contains="/token")  # the network is down
    with pytest.raises(Unavailable, match="could not reach Google's token service") as raised:
        list(store.studies())
    assert raised.value.unreachable
    standin.clear_faults()
    standin.inject(status=500, times=100, path_contains="/token")  # it answers, with an error
    with pytest.raises(Unavailable, match="token service is unavailable") as raised:
        list(store.studies())
    assert not raised.value.unreachable
    standin.clear_faults()
    # a refused connection (nothing listens where the token service should be)
    key = json.loads(standin.write_key_file(tmp_path / "refused.json").read_text())
    key["token_uri"] = f"http://127.0.0.1:{closed_port()}/token"
    (tmp_path / "refused.json").write_text(json.dumps(key))
    refused = HealthcareDataset(dataset.url, TokenSource(load_credentials(tmp_path / "refused.json")),
                                retry=FAST_RETRY)
    try:
        with pytest.raises(Unavailable, match="could not reach Google's token service") as raised:
            list(refused.open_store("store-a").studies())
        assert raised.value.unreachable
    finally:
        refused.close()


def test_a_stalled_token_service_is_given_up_after_the_http_timeout(standin: HealthcareStandIn,
                                                                     dataset: HealthcareDataset,
                                                                     tmp_path: Path) -> None:
    """README: 'Nothing hangs … Input/output error after about twice the timeout'. A file
    operation waiting for a new access token waits for the token service at most --httpTimeout
    too, not google-auth's own 120 s."""
    from dicomfuse.stores.open import open_dataset

    key = standin.write_key_file(tmp_path / "key.json")
    key.chmod(0o600)
    opened = open_dataset(dataset.url, key_file=key, timeout=1.0)
    try:
        store = opened.open_store("store-a")
        standin.inject(stall=True, times=1, path_contains="/token")  # answered only when the stand-in stops
        started = time.monotonic()
        with pytest.raises(Unavailable, match="token service: timed out") as raised:
            list(store.studies())
        assert time.monotonic() - started < 10, "bounded by the 1 s timeout, not 120 s"
        assert raised.value.timed_out and raised.value.unreachable
        assert list(store.studies()) == [], "the next token request is answered"
    finally:
        opened.close()


def test_an_error_answer_of_the_token_service_reads_as_one_clean_line(standin: HealthcareStandIn,
                                                                      dataset: HealthcareDataset,
                                                                      quick_token_retries: None) -> None:
    """google-auth turns a Google API error body into "{'code': 500, …}: None": the message says
    the HTTP status and Google's status name instead (never its message, the server's words)."""
    standin.inject(status=500, times=100, path_contains="/token")
    with pytest.raises(Unavailable) as raised:
        list(dataset.open_store("store-a").studies())
    assert str(raised.value) == "Google's token service is unavailable (HTTP 500): INTERNAL"


def test_denied_store_management_names_the_store_administrator_role(standin: HealthcareStandIn,
                                                                    dataset: HealthcareDataset) -> None:
    """The DICOM Editor hint fits instance reads and writes, not a denied store create or delete."""
    dataset.create_store("empty")
    try:
        for permission, call in [("healthcare.dicomStores.create", lambda: dataset.create_store("new")),
                                 ("healthcare.dicomStores.delete", lambda: dataset.delete_store("empty"))]:
            standin.deny(permission)
            with pytest.raises(Forbidden, match="403") as raised:
                call()
            assert "Healthcare DICOM Store Administrator role (roles/healthcare.dicomStoreAdmin)" in str(raised.value)
            assert "DICOM Editor" not in str(raised.value)
            standin.deny(None)
        standin.deny("healthcare.dicomStores.dicomWebRead")
        with pytest.raises(Forbidden) as raised:  # delete_store first checks the store is empty: an instance read
            dataset.delete_store("empty")
        assert "DICOM Editor role" in str(raised.value)
    finally:
        standin.deny(None)
