"""The Cloud Healthcare API stand-in, driven the way a client drives Google: google-auth service
account credentials, an AuthorizedSession, plain HTTP against 127.0.0.1."""

from __future__ import annotations

import email.message
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import google.auth.crypt
import google.auth.exceptions
import google.auth.jwt
import pydicom
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth.transport.requests import AuthorizedSession, Request
from google.oauth2 import service_account
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from dicomfuse.samples import SampleInstance, make_dataset, make_uid, write_instance
from dicomfuse.stores.base import NotFound
from tests.fakes.healthcare import HealthcareStandIn

HEALTHCARE_SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
DICOM_ANY = "application/dicom; transfer-syntax=*"
MULTIPART_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# -- fixtures and helpers ------------------------------------------------------------------------


@dataclass
class Client:
    hc: HealthcareStandIn
    dataset_url: str
    session: AuthorizedSession
    key_file: Path
    folder: Path
    seed: str

    def store_url(self, store: str = "store") -> str:
        return f"{self.dataset_url}/dicomStores/{store}"

    def web(self, store: str = "store") -> str:
        return f"{self.store_url(store)}/dicomWeb"

    def instance_url(self, inst: SampleInstance, store: str = "store") -> str:
        return f"{self.web(store)}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"

    def dicom(self, study: int = 0, series: int = 0, number: int | None = None, **kwargs: Any) -> SampleInstance:
        number = number if number is not None else len(list(self.folder.glob("*.dcm")))
        study_uid = make_uid(self.seed, "study", study)
        series_uid = make_uid(self.seed, "series", study, series)
        sop_uid = make_uid(self.seed, "sop", study, series, number)
        kwargs.setdefault("pixel_bytes", 512)
        path = write_instance(self.folder / f"{uuid.uuid4().hex}.dcm", study_uid, series_uid, sop_uid, **kwargs)
        return SampleInstance(path, study_uid, series_uid, sop_uid)

    def stow(self, *parts: bytes, study: str | None = None, accept: str | None = None) -> requests.Response:
        body, content_type = multipart(*parts)
        headers = {"Content-Type": content_type}
        if accept:
            headers["Accept"] = accept
        url = f"{self.web()}/studies" + (f"/{study}" if study else "")
        return self.session.post(url, data=body, headers=headers)


def credentials(key_file: Path, scopes: list[str] | None = None) -> service_account.Credentials:
    return service_account.Credentials.from_service_account_file(str(key_file), scopes=scopes or [HEALTHCARE_SCOPE])


def multipart(*parts: bytes, boundary: str = "b0und4ry") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def error_of(response: requests.Response) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == response.status_code
    return error


def multipart_parts(response: requests.Response) -> list[tuple[str, bytes]]:
    message = email.message.Message()
    message["content-type"] = response.headers["Content-Type"]
    boundary = message.get_param("boundary")
    assert isinstance(boundary, str)
    chunks = response.content.split(b"--" + boundary.encode())
    parts = []
    for chunk in chunks[1:-1]:
        head, _, content = chunk.partition(b"\r\n\r\n")
        assert content.endswith(b"\r\n")
        parts.append((head.decode().strip(), content[:-2]))
    assert chunks[-1].startswith(b"--")
    return parts


def value(entry: dict[str, Any], tag: str) -> Any:
    return entry[tag]["Value"][0]


@pytest.fixture
def hc() -> Iterator[HealthcareStandIn]:
    with HealthcareStandIn() as standin:  # stopped even when the test fails
        yield standin


@pytest.fixture
def client(hc: HealthcareStandIn, tmp_path: Path) -> Iterator[Client]:
    dataset_url = hc.create_dataset("ds")
    key_file = hc.write_key_file(tmp_path / "key.json")
    hc.create_store("ds", "store")
    session = AuthorizedSession(credentials(key_file))
    folder = tmp_path / "files"
    folder.mkdir()
    yield Client(hc, dataset_url, session, key_file, folder, uuid.uuid4().hex)
    session.close()


# -- OAuth ---------------------------------------------------------------------------------------


def test_token_flow_and_request_log(client: Client) -> None:
    response = client.session.get(f"{client.dataset_url}/dicomStores", params={"pageSize": "5"})
    assert response.status_code == 200
    assert client.hc.tokens_issued == 1
    token_request, api_request = client.hc.requests
    assert (token_request.method, token_request.path, token_request.authorized) == ("POST", "/token", False)
    assert token_request.status == 200
    assert api_request.authorized and api_request.status == 200
    assert api_request.query == {"pageSize": "5"}
    assert api_request.path.endswith("/datasets/ds/dicomStores")
    assert client.session.credentials.token not in repr(client.hc.requests)
    client.hc.clear_log()
    assert client.hc.requests == [] and client.hc.tokens_issued == 0


def test_key_file_is_a_real_service_account_file(client: Client) -> None:
    info = json.loads(client.key_file.read_text())
    assert info["type"] == "service_account" and info["token_uri"] == client.hc.token_uri
    assert info["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert info["client_email"] == "dicomfuse-test@test-project.iam.gserviceaccount.com"
    creds = credentials(client.key_file, [CLOUD_PLATFORM_SCOPE])
    creds.refresh(Request())
    assert creds.token and creds.expiry is not None


def test_bad_signature_is_refused(hc: HealthcareStandIn, tmp_path: Path) -> None:
    key_file = hc.write_key_file(tmp_path / "key.json")
    info = json.loads(key_file.read_text())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key_file.write_text(json.dumps(info))
    with pytest.raises(google.auth.exceptions.RefreshError, match="invalid_grant: Invalid JWT Signature"):
        credentials(key_file).refresh(Request())
    assert hc.tokens_issued == 0
    assert hc.requests[-1].status == 400


def sign(key_file: Path, **claims: Any) -> bytes:
    info = json.loads(key_file.read_text())
    signer = google.auth.crypt.RSASigner.from_service_account_info(info)
    now = int(time.time())
    payload = {
        "iss": info["client_email"],
        "aud": info["token_uri"],
        "iat": now,
        "exp": now + 3600,
        "scope": HEALTHCARE_SCOPE,
    }
    payload.update(claims)
    return google.auth.jwt.encode(signer, {k: v for k, v in payload.items() if v is not None})


REFUSED_ASSERTIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"iss": "stranger@test-project.iam.gserviceaccount.com"}, "invalid_grant", "account not found"),
    ({"aud": "https://example.com/token"}, "invalid_grant", "Failed audience check"),
    ({"exp": int(time.time()) + 7200}, "invalid_grant", "short-lived"),
    ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, "invalid_grant", "short-lived"),
    ({"scope": None}, "invalid_scope", "Invalid OAuth scope"),
]


def test_token_endpoint_refusals(hc: HealthcareStandIn, tmp_path: Path) -> None:
    key_file = hc.write_key_file(tmp_path / "key.json")
    for claims, error, description in REFUSED_ASSERTIONS:
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": sign(key_file, **claims)}
        response = requests.post(hc.token_uri, data=form)
        assert response.status_code == 400, claims
        assert response.json()["error"] == error
        assert description in response.json()["error_description"]
    assert hc.tokens_issued == 0


def test_token_endpoint_grant_type_and_google_audience(hc: HealthcareStandIn, tmp_path: Path) -> None:
    key_file = hc.write_key_file(tmp_path / "key.json")
    response = requests.post(hc.token_uri, data={"grant_type": "password", "assertion": "x"})
    assert (response.status_code, response.json()["error"]) == (400, "unsupported_grant_type")
    grant = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    response = requests.post(hc.token_uri, data={"grant_type": grant})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assertion = sign(key_file, aud="https://oauth2.googleapis.com/token")  # what google-auth always sends
    response = requests.post(hc.token_uri, data={"grant_type": grant, "assertion": assertion})
    assert response.status_code == 200
    token = response.json()
    assert token["token_type"] == "Bearer" and token["expires_in"] == 3600 and token["access_token"]


def test_missing_bogus_and_expired_tokens_get_401(client: Client) -> None:
    url = f"{client.dataset_url}/dicomStores"
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}):
        response = requests.get(url, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="https://accounts.google.com/"')
        error = error_of(response)
        assert error["status"] == "UNAUTHENTICATED"
        assert error["message"].startswith("Request had invalid authentication credentials.")
    assert client.hc.expired_token_requests == 0

    client.hc.token_lifetime = 0.4
    short = credentials(client.key_file)
    short.refresh(Request())
    assert requests.get(url, headers={"Authorization": f"Bearer {short.token}"}).status_code == 200
    time.sleep(0.5)
    response = requests.get(url, headers={"Authorization": f"Bearer {short.token}"})
    assert response.status_code == 401 and 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert client.hc.expired_token_requests == 1
    assert client.hc.requests[-1].authorized is False


def test_expires_in_is_the_lifetime_and_at_least_one(hc: HealthcareStandIn, tmp_path: Path) -> None:
    key_file = hc.write_key_file(tmp_path / "key.json")
    grant = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    for lifetime, expected in ((0.2, 1), (125.9, 125)):
        hc.token_lifetime = lifetime
        response = requests.post(hc.token_uri, data={"grant_type": grant, "assertion": sign(key_file)})
        assert response.json()["expires_in"] == expected


def test_insufficient_scope_is_403(client: Client) -> None:
    session = AuthorizedSession(credentials(client.key_file, ["https://www.googleapis.com/auth/devstorage.read_only"]))
    response = session.get(f"{client.dataset_url}/dicomStores")
    assert response.status_code == 403
    error = error_of(response)
    assert error["status"] == "PERMISSION_DENIED"
    assert error["message"] == "Request had insufficient authentication scopes."


def test_authorized_session_refreshes_after_an_injected_401(client: Client) -> None:
    client.hc.inject(status=401, path_contains="/dicomStores")
    response = client.session.get(f"{client.dataset_url}/dicomStores")
    assert response.status_code == 200
    assert client.hc.tokens_issued == 2
    assert [r.status for r in client.hc.requests if r.path != "/token"] == [401, 200]


# -- store management ----------------------------------------------------------------------------


def test_store_list_pages_with_next_page_token(client: Client) -> None:
    for n in range(7):
        client.hc.create_store("ds", f"s{n:02d}")
    url = f"{client.dataset_url}/dicomStores"
    names, token, pages = [], None, 0
    while True:
        params = {"pageSize": "3", **({"pageToken": token} if token else {})}
        document = client.session.get(url, params=params).json()
        pages += 1
        assert len(document["dicomStores"]) <= 3
        names += [store["name"].rsplit("/", 1)[1] for store in document["dicomStores"]]
        token = document.get("nextPageToken")
        if token is None:
            break
    assert pages == 3
    assert names == sorted(client.hc.store_ids("ds")) == [f"s{n:02d}" for n in range(7)] + ["store"]
    assert (
        document["dicomStores"][-1]["name"]
        == "projects/test-project/locations/us-central1/datasets/ds/dicomStores/store"
    )

    for bad in ({"pageToken": "garbage"}, {"pageToken": "YWZ0ZXI"}, {"pageSize": "-1"}, {"pageSize": "x"}):
        response = client.session.get(url, params=bad)
        assert response.status_code == 400 and error_of(response)["status"] == "INVALID_ARGUMENT"


def test_store_list_default_and_maximum_page_size(client: Client) -> None:
    for n in range(1100):
        client.hc.create_store("ds", f"bulk-{n:04d}")
    url = f"{client.dataset_url}/dicomStores"
    first = client.session.get(url).json()
    assert len(first["dicomStores"]) == 100 and "nextPageToken" in first
    capped = client.session.get(url, params={"pageSize": "5000"}).json()
    assert len(capped["dicomStores"]) == 1000 and "nextPageToken" in capped
    rest = client.session.get(url, params={"pageSize": "5000", "pageToken": capped["nextPageToken"]}).json()
    assert len(rest["dicomStores"]) == 101 and "nextPageToken" not in rest


def test_empty_dataset_lists_no_stores(client: Client) -> None:
    other = client.hc.create_dataset("empty")
    response = client.session.get(f"{other}/dicomStores")
    assert response.status_code == 200 and response.json() == {}


def test_create_get_delete_store(client: Client) -> None:
    url = f"{client.dataset_url}/dicomStores"
    created = client.session.post(url, params={"dicomStoreId": "new.store_1-x"}, json={"labels": {"k": "v"}})
    assert created.status_code == 200
    name = "projects/test-project/locations/us-central1/datasets/ds/dicomStores/new.store_1-x"
    assert created.json() == {"name": name, "labels": {"k": "v"}}
    again = client.session.post(url, params={"dicomStoreId": "new.store_1-x"}, json={})
    assert again.status_code == 409 and error_of(again)["status"] == "ALREADY_EXISTS"
    fetched = client.session.get(f"{url}/new.store_1-x")
    assert fetched.status_code == 200 and fetched.json()["name"] == name
    no_body = client.session.post(url, params={"dicomStoreId": "no-body"})
    assert no_body.status_code == 200

    inst = client.dicom()
    assert all(o.stored for o in client.hc.store_view("ds", "new.store_1-x").store_files([inst.path]))
    deleted = client.session.delete(f"{url}/new.store_1-x")  # Google deletes a store that holds data
    assert deleted.status_code == 200 and deleted.json() == {}
    assert "new.store_1-x" not in client.hc.store_ids("ds")
    gone = client.session.get(f"{url}/new.store_1-x")
    assert gone.status_code == 404 and error_of(gone)["status"] == "NOT_FOUND"
    assert client.session.delete(f"{url}/new.store_1-x").status_code == 404
    with pytest.raises(NotFound):
        list(client.hc.store_view("ds", "new.store_1-x").studies())


def test_store_id_rule(client: Client) -> None:
    url = f"{client.dataset_url}/dicomStores"
    for store_id in ["", "has space", "a/b", "semi;colon", "x" * 257, "star*", "emoji\u2603"]:
        response = client.session.post(url, params={"dicomStoreId": store_id}, json={})
        assert response.status_code == 400, store_id
        assert error_of(response)["status"] == "INVALID_ARGUMENT"
    assert client.hc.store_ids("ds") == ["store"]
    valid = ["x" * 256, "A.b-c_d", "9", "\u00fcnic\u00f6de"]
    for store_id in valid:
        assert client.session.post(url, params={"dicomStoreId": store_id}, json={}).status_code == 200, store_id
    assert client.hc.store_ids("ds") == sorted([*valid, "store"])


def test_unknown_dataset_store_and_path_are_404(client: Client) -> None:
    base = client.dataset_url.rsplit("/datasets/", 1)[0]
    for url in (
        f"{base}/datasets/nope/dicomStores",
        f"{base}/datasets/nope",
        f"{client.store_url('nope')}",
        f"{client.web('nope')}/studies",
        f"{client.hc.url}/v2/whatever",
        f"{client.dataset_url.replace('test-project', 'other-project')}/dicomStores",
    ):
        response = client.session.get(url)
        assert response.status_code == 404, url
        assert error_of(response)["status"] == "NOT_FOUND"
    assert client.session.get(client.dataset_url).json()["name"].endswith("/datasets/ds")


def test_v1_and_v1beta1_serve_the_same_data(client: Client) -> None:
    beta = client.hc.create_dataset("ds", version="v1beta1")
    assert beta == client.dataset_url.replace("/v1/", "/v1beta1/")
    assert client.session.post(f"{beta}/dicomStores", params={"dicomStoreId": "beta"}, json={}).status_code == 200
    names = [s["name"] for s in client.session.get(f"{client.dataset_url}/dicomStores").json()["dicomStores"]]
    assert names[0].endswith("/dicomStores/beta")


# -- QIDO ----------------------------------------------------------------------------------------


def test_qido_default_limit_offset_and_204_at_the_end(client: Client) -> None:
    studies = sorted(client.hc.add_synthetic_studies("ds", "store", 120))
    url = f"{client.web()}/studies"
    first = client.session.get(url)
    assert first.status_code == 200
    assert first.headers["Content-Type"].startswith("application/dicom+json")
    assert [value(e, "0020000D") for e in first.json()] == studies[:100]  # default limit 100, stable order
    assert "Warning" not in first.headers
    rest = client.session.get(url, params={"offset": "100", "limit": "50"}).json()
    assert [value(e, "0020000D") for e in rest] == studies[100:]
    end = client.session.get(url, params={"offset": "120"})
    assert end.status_code == 204 and end.content == b""

    client.hc.qido_warning = True
    assert "Warning" in client.session.get(url, params={"limit": "10"}).headers
    assert "Warning" not in client.session.get(url, params={"limit": "10", "offset": "110"}).headers


def test_qido_bad_limit_or_offset_is_400(client: Client) -> None:
    for params in ({"limit": "0"}, {"limit": "-3"}, {"limit": "ten"}, {"offset": "-1"}, {"offset": "1000001"}):
        response = client.session.get(f"{client.web()}/studies", params=params)
        assert response.status_code == 400, params
        assert error_of(response)["status"] == "INVALID_ARGUMENT"


def test_qido_instance_and_series_defaults(client: Client) -> None:
    client.hc.add_synthetic_studies("ds", "store", 1200)
    instances = client.session.get(f"{client.web()}/instances").json()
    assert len(instances) == 1000  # default limit for instances
    assert {"0020000D", "0020000E", "00080018", "00080016"} <= set(instances[0])
    series = client.session.get(f"{client.web()}/series").json()
    assert len(series) == 100
    assert {"0020000D", "0020000E"} <= set(series[0])
    assert len(client.session.get(f"{client.web()}/instances", params={"limit": "60000"}).json()) == 1200


def test_qido_filters_and_includefield(client: Client) -> None:
    a1, a2, b1 = client.dicom(0, 0), client.dicom(0, 0), client.dicom(1, 0, patient_name="Other^Person")
    outcomes = client.hc.store_view("ds", "store").store_files([a1.path, a2.path, b1.path])
    assert all(o.stored for o in outcomes)
    web = client.web()

    def get(path: str, **params: str) -> list[dict[str, Any]]:
        response = client.session.get(f"{web}/{path}", params=params)
        assert response.status_code in (200, 204), response.text
        return response.json() if response.status_code == 200 else []

    assert [value(e, "0020000D") for e in get("studies", StudyInstanceUID=a1.study_uid)] == [a1.study_uid]
    assert [value(e, "0020000D") for e in get("studies", **{"0020000D": b1.study_uid})] == [b1.study_uid]
    assert len(get("studies", StudyInstanceUID=f"{a1.study_uid},{b1.study_uid}")) == 2
    assert get("studies", StudyInstanceUID="1.2.3") == []
    assert [value(e, "0020000D") for e in get("studies", PatientName="Other^Person")] == [b1.study_uid]
    assert len(get("studies", PatientName="*^P*")) == 2

    series = get(f"studies/{a1.study_uid}/series")
    assert [value(e, "0020000E") for e in series] == [a1.series_uid]
    assert "0020000D" not in series[0]  # in the path, so not repeated unless asked for
    assert value(get(f"studies/{a1.study_uid}/series", includefield="0020000D")[0], "0020000D") == a1.study_uid

    instances = get(f"studies/{a1.study_uid}/series/{a1.series_uid}/instances")
    assert sorted(value(e, "00080018") for e in instances) == sorted([a1.sop_uid, a2.sop_uid])
    assert value(instances[0], "00080016") == "1.2.840.10008.5.1.4.1.1.7"
    assert "0020000D" not in instances[0] and "0020000E" not in instances[0]
    asked = get(
        f"studies/{a1.study_uid}/series/{a1.series_uid}/instances", includefield="StudyInstanceUID,SeriesInstanceUID"
    )
    assert value(asked[0], "0020000D") == a1.study_uid and value(asked[0], "0020000E") == a1.series_uid

    found = get("instances", SOPInstanceUID=b1.sop_uid)
    assert [(value(e, "0020000D"), value(e, "0020000E")) for e in found] == [(b1.study_uid, b1.series_uid)]
    in_study = get(f"studies/{a1.study_uid}/instances")
    assert len(in_study) == 2 and "0020000E" in in_study[0] and "0020000D" not in in_study[0]
    assert [value(e, "0020000D") for e in get("series", StudyInstanceUID=b1.study_uid)] == [b1.study_uid]

    everything = get("studies", StudyInstanceUID=a1.study_uid, includefield="all")[0]
    assert value(everything, "00201208") == 2 and value(everything, "00201206") == 1
    assert everything["00080061"]["Value"] == ["OT"]
    assert value(everything, "00100010") == {"Alphabetic": "Demo^Patient"}
    with_syntax = get("instances", SOPInstanceUID=a1.sop_uid, includefield="00083002")[0]
    assert value(with_syntax, "00083002") == EXPLICIT_LE

    for path, params in (
        ("studies", {"SeriesInstanceUID": a1.series_uid}),  # a series key cannot select studies
        ("studies", {"Foo": "bar"}),
        ("studies", {"StudyDescription": "x"}),  # not a searchable attribute
        ("studies", {"includefield": "NoSuchKeyword"}),
    ):
        response = client.session.get(f"{web}/{path}", params=params)
        assert response.status_code == 400, params
    xml = client.session.get(f"{web}/studies", headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert xml.status_code == 406


def test_qido_reflects_index_lag(client: Client) -> None:
    client.hc.index_lag = 0.4
    inst = client.dicom()
    stored_at = time.monotonic()
    assert client.stow(inst.path.read_bytes()).status_code == 200
    studies = f"{client.web()}/studies"
    assert client.session.get(studies).status_code == 204  # not indexed yet
    assert client.session.get(client.instance_url(inst), headers={"Accept": DICOM_ANY}).status_code == 200
    assert list(client.hc.store_view("ds", "store").studies()) == [inst.study_uid]
    time.sleep(max(0.0, stored_at + 0.45 - time.monotonic()))
    assert [value(e, "0020000D") for e in client.session.get(studies).json()] == [inst.study_uid]

    deleted_at = time.monotonic()
    assert client.session.delete(client.instance_url(inst)).status_code == 200
    assert client.session.get(client.instance_url(inst), headers={"Accept": DICOM_ANY}).status_code == 404
    assert client.session.get(studies).status_code == 200  # still in the index
    time.sleep(max(0.0, deleted_at + 0.45 - time.monotonic()))
    assert client.session.get(studies).status_code == 204


# -- WADO ----------------------------------------------------------------------------------------


def test_wado_original_bytes_only_with_transfer_syntax_wildcard(client: Client) -> None:
    inst = client.dicom()
    original = inst.path.read_bytes()
    client.hc.store_view("ds", "store").store_files([inst.path])
    url = client.instance_url(inst)

    single = client.session.get(url, headers={"Accept": DICOM_ANY})
    assert single.status_code == 200 and single.content == original
    assert single.headers["Content-Type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert single.headers["Content-Length"] == str(len(original))

    multi = client.session.get(url, headers={"Accept": MULTIPART_ANY})
    assert multi.status_code == 200 and multi.headers["Content-Type"].startswith("multipart/related")
    [(head, content)] = multipart_parts(multi)
    assert content == original and f"transfer-syntax={EXPLICIT_LE}" in head

    for accept in ("application/dicom", 'multipart/related; type="application/dicom"', None):
        response = client.session.get(url, headers={"Accept": accept} if accept else {})
        assert response.status_code == 200
        data = response.content if accept == "application/dicom" else multipart_parts(response)[0][1]
        assert data != original  # transcoded to the default syntax, never the stored bytes
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE and ds.SOPInstanceUID == inst.sop_uid
        assert ds.PixelData == pydicom.dcmread(inst.path).PixelData

    implicit = client.session.get(url, headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2"})
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(implicit.content)).file_meta.TransferSyntaxUID == (
        "1.2.840.10008.1.2"
    )
    for accept in ("application/json", "image/jpeg", "application/dicom; transfer-syntax=1.2.3", "text/html"):
        response = client.session.get(url, headers={"Accept": accept})
        assert response.status_code == 406, accept
    # the first acceptable item of a list wins
    listed = client.session.get(url, headers={"Accept": f"application/json, {DICOM_ANY}"})
    assert listed.status_code == 200 and listed.content == original

    missing = client.session.get(url.replace(inst.sop_uid, "1.2.3.4"), headers={"Accept": DICOM_ANY})
    assert missing.status_code == 404 and error_of(missing)["status"] == "NOT_FOUND"


def test_wado_series_and_study_are_multipart_only(client: Client) -> None:
    first, second = client.dicom(0, 0), client.dicom(0, 0)
    client.hc.store_view("ds", "store").store_files([first.path, second.path])
    series_url = f"{client.web()}/studies/{first.study_uid}/series/{first.series_uid}"
    for url in (series_url, f"{client.web()}/studies/{first.study_uid}"):
        response = client.session.get(url, headers={"Accept": MULTIPART_ANY})
        assert response.status_code == 200
        assert sorted(c for _, c in multipart_parts(response)) == sorted(
            [first.path.read_bytes(), second.path.read_bytes()]
        )
        assert client.session.get(url, headers={"Accept": DICOM_ANY}).status_code == 406
    assert client.session.get(f"{series_url}/metadata").status_code == 501


def test_wado_of_a_compressed_instance(client: Client) -> None:
    ds = make_dataset(make_uid(client.seed, "j1"), make_uid(client.seed, "j2"), make_uid(client.seed, "j3"))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = client.folder / "jpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert client.stow(path.read_bytes()).status_code == 200
    url = f"{client.web()}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert client.session.get(url, headers={"Accept": "application/dicom"}).status_code == 406
    original = client.session.get(url, headers={"Accept": DICOM_ANY})
    assert original.content == path.read_bytes()
    assert original.headers["Content-Type"] == f"application/dicom; transfer-syntax={JPEGBaseline8Bit}"
    same = client.session.get(url, headers={"Accept": f"application/dicom; transfer-syntax={JPEGBaseline8Bit}"})
    assert same.status_code == 200 and same.content != path.read_bytes()


# -- STOW ----------------------------------------------------------------------------------------


def test_stow_success_json(client: Client) -> None:
    a, b = client.dicom(), client.dicom()
    response = client.stow(a.path.read_bytes(), b.path.read_bytes(), accept="application/dicom+json")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    document = response.json()
    assert value(document, "00081190") == f"{client.web()}/studies/{a.study_uid}"
    items = document["00081199"]["Value"]
    assert sorted(value(i, "00081155") for i in items) == sorted([a.sop_uid, b.sop_uid])
    assert all(value(i, "00081150") == "1.2.840.10008.5.1.4.1.1.7" for i in items)
    assert {value(i, "00081190") for i in items} == {client.instance_url(a), client.instance_url(b)}
    assert "00081198" not in document
    assert (
        client.hc.store_view("ds", "store").instance_bytes(a.study_uid, a.series_uid, a.sop_uid) == a.path.read_bytes()
    )


def xml_items(response: requests.Response, tag: str) -> list[dict[str, tuple[str, str | None]]]:
    """Items of a sequence in a NativeDicomModel: tag -> (first value, privateCreator)."""
    root = ElementTree.fromstring(response.content)
    assert root.tag == "NativeDicomModel"
    items = []
    for attribute in root.findall("DicomAttribute"):
        if attribute.get("tag") == tag:
            for item in attribute.findall("Item"):
                items.append(
                    {
                        a.get("tag", ""): (a.findtext("Value") or "", a.get("privateCreator"))
                        for a in item.findall("DicomAttribute")
                    }
                )
    return items


def test_stow_partial_success_xml_by_default(client: Client) -> None:
    good = client.dicom()
    response = client.stow(good.path.read_bytes(), b"this is not DICOM at all")
    assert response.status_code == 202
    assert response.headers["Content-Type"] == "application/dicom+xml"
    [stored] = xml_items(response, "00081199")
    assert stored["00081155"][0] == good.sop_uid
    [failed] = xml_items(response, "00081198")
    assert failed["00081197"][0] == "272"
    detail, creator = failed["00090097"]
    assert creator == "GOOGLE" and detail.startswith("Failed to parse the DICOM instance")
    assert "00081155" not in failed  # the part's UIDs are unknown


def test_stow_conflict_and_identical_reupload(client: Client) -> None:
    first = client.dicom(number=7)
    assert client.stow(first.path.read_bytes()).status_code == 200
    assert client.stow(first.path.read_bytes()).status_code == 200  # the same bytes again: accepted
    changed = client.dicom(number=7, patient_name="Changed^Name")
    assert (changed.sop_uid, changed.path.read_bytes()) != (first.sop_uid, first.path.read_bytes())
    assert changed.sop_uid == first.sop_uid
    response = client.stow(changed.path.read_bytes(), accept="application/dicom+json")
    assert response.status_code == 409
    [failed] = response.json()["00081198"]["Value"]
    assert value(failed, "00081197") == 0x0110 and value(failed, "00081155") == first.sop_uid
    assert "00090097" not in failed  # JSON answers carry FailureDetailJSON (0009,1097), XML FailureDetail
    assert "checksum mismatch" in value(failed, "00091097")
    assert "00081199" not in response.json()
    kept = client.hc.store_view("ds", "store").instance_bytes(first.study_uid, first.series_uid, first.sop_uid)
    assert kept == first.path.read_bytes()


def test_stow_all_refused_is_409(client: Client) -> None:
    truncated = client.dicom().path.read_bytes()[:-300]
    response = client.stow(b"garbage", truncated, accept="application/dicom+json")
    assert response.status_code == 409
    assert len(response.json()["00081198"]["Value"]) == 2
    assert client.hc.store_view("ds", "store").all_instances() == []


def test_stow_with_a_study_in_the_path(client: Client) -> None:
    inst = client.dicom()
    wrong = client.stow(inst.path.read_bytes(), study="1.2.3.4", accept="application/dicom+json")
    assert wrong.status_code == 409
    assert "does not match" in value(wrong.json()["00081198"]["Value"][0], "00091097")
    assert value(wrong.json(), "00081190").endswith("/studies/1.2.3.4")
    right = client.stow(inst.path.read_bytes(), study=inst.study_uid)
    assert right.status_code == 200


MALFORMED_STOW: list[tuple[str | None, bytes]] = [
    ("text/plain", b"hello"),
    ("multipart/related; type=application/dicom", b"--x\r\n\r\nabc\r\n--x--"),  # no boundary
    ('multipart/related; type="application/dicom"; boundary=other', b"--x\r\n\r\nabc\r\n--x--"),
    ('multipart/related; type="application/dicom"; boundary=x', b"--x\r\nContent-Type: application/dicom\r\n\r\nab"),
    ('multipart/related; type="application/dicom"; boundary=x', b"--x--\r\n"),
    ('multipart/related; type="application/dicom+json"; boundary=x', b"--x\r\n\r\n{}\r\n--x--"),
    (None, b""),
]


def test_stow_malformed_requests_are_400(client: Client) -> None:
    for content_type, body in MALFORMED_STOW:
        headers = {"Content-Type": content_type} if content_type else {}
        response = client.session.post(f"{client.web()}/studies", data=body, headers=headers)
        assert response.status_code == 400, (content_type, body)
        assert error_of(response)["status"] == "INVALID_ARGUMENT"
    assert client.hc.store_view("ds", "store").all_instances() == []


def test_stow_single_part_and_chunked_bodies(client: Client) -> None:
    single = client.dicom()
    response = client.session.post(
        f"{client.web()}/studies", data=single.path.read_bytes(), headers={"Content-Type": "application/dicom"}
    )
    assert response.status_code == 200
    chunked = client.dicom()
    body, content_type = multipart(chunked.path.read_bytes())

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = client.session.post(f"{client.web()}/studies", data=pieces(), headers={"Content-Type": content_type})
    assert response.status_code == 200
    view = client.hc.store_view("ds", "store")
    assert view.instance_bytes(chunked.study_uid, chunked.series_uid, chunked.sop_uid) == chunked.path.read_bytes()
    assert view.instance_bytes(single.study_uid, single.series_uid, single.sop_uid) == single.path.read_bytes()


# -- DELETE --------------------------------------------------------------------------------------


def test_delete_instance_series_and_study(client: Client) -> None:
    a, b, c = client.dicom(0, 0), client.dicom(0, 1), client.dicom(1, 0)
    view = client.hc.store_view("ds", "store")
    view.store_files([a.path, b.path, c.path])
    deleted = client.session.delete(client.instance_url(a))
    assert deleted.status_code == 200 and deleted.json() == {}
    again = client.session.delete(client.instance_url(a))
    assert again.status_code == 404 and error_of(again)["status"] == "NOT_FOUND"
    assert view.instance_bytes(a.study_uid, a.series_uid, a.sop_uid) is None

    operation = client.session.delete(f"{client.web()}/studies/{c.study_uid}")
    assert operation.status_code == 200
    name = operation.json()["name"]
    assert "/datasets/ds/operations/" in name
    status = client.session.get(f"{client.hc.url}/v1/{name}").json()
    assert status["done"] is True and "error" not in status
    assert list(view.studies()) == [a.study_uid]
    series = client.session.delete(f"{client.web()}/studies/{b.study_uid}/series/{b.series_uid}")
    assert series.status_code == 200 and view.all_instances() == []
    assert client.session.delete(f"{client.web()}/studies/{c.study_uid}").status_code == 404


# -- faults and IAM ------------------------------------------------------------------------------


def test_injected_statuses(client: Client) -> None:
    url = f"{client.dataset_url}/dicomStores"
    client.session.get(url)  # get a token first: an unfiltered fault would hit the token request
    client.hc.inject()
    first = client.session.get(url)
    assert first.status_code == 503 and error_of(first)["status"] == "UNAVAILABLE"
    assert client.session.get(url).status_code == 200

    client.hc.inject(status=429, retry_after="1")
    limited = client.session.get(url)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    assert error_of(limited)["status"] == "RESOURCE_EXHAUSTED"
    client.hc.inject(status=500, times=2)
    responses = [client.session.get(url) for _ in range(3)]
    assert [r.status_code for r in responses] == [500, 500, 200]
    assert error_of(responses[0])["status"] == "INTERNAL"

    client.hc.inject(status=503, method="POST", path_contains="/dicomWeb/studies")
    assert client.session.get(url).status_code == 200
    assert client.session.get(f"{client.web()}/studies").status_code == 204
    assert client.stow(client.dicom().path.read_bytes()).status_code == 503
    assert client.stow(client.dicom().path.read_bytes()).status_code == 200


def test_injected_delay_drop_and_stall(client: Client) -> None:
    url = f"{client.dataset_url}/dicomStores"
    client.session.get(url)  # get a token first
    client.hc.inject(delay=0.3)
    started = time.monotonic()
    assert client.session.get(url).status_code == 200
    assert time.monotonic() - started >= 0.3
    client.hc.inject(delay=0.2, status=503)
    assert client.session.get(url).status_code == 503

    client.hc.inject(drop=True)
    with pytest.raises(requests.ConnectionError):
        client.session.get(url)
    assert client.hc.requests[-1].status is None

    client.hc.inject(stall=True)
    with pytest.raises(requests.ReadTimeout):
        client.session.get(url, timeout=0.3)
    assert client.session.get(url).status_code == 200


def test_deny_permissions(client: Client) -> None:
    inst = client.dicom()
    client.hc.deny("healthcare.dicomStores.dicomWebWrite")
    refused = client.stow(inst.path.read_bytes())
    assert refused.status_code == 403
    error = error_of(refused)
    assert error["status"] == "PERMISSION_DENIED"
    resource = "//healthcare.googleapis.com/projects/test-project/locations/us-central1/datasets/ds/dicomStores/store"
    assert error["message"] == (
        f"Permission 'healthcare.dicomStores.dicomWebWrite' denied on resource '{resource}' (or it may not exist)."
    )
    assert client.session.get(f"{client.web()}/studies").status_code == 204  # reading is still allowed

    client.hc.deny("healthcare.dicomStores.dicomWebDelete")
    assert client.session.delete(client.instance_url(inst)).status_code == 403
    client.hc.deny("*")
    listed = client.session.get(f"{client.dataset_url}/dicomStores")
    assert listed.status_code == 403 and "'healthcare.dicomStores.list'" in error_of(listed)["message"]
    created = client.session.post(f"{client.dataset_url}/dicomStores", params={"dicomStoreId": "x"}, json={})
    assert "'healthcare.dicomStores.create'" in error_of(created)["message"]
    missing = client.session.get(f"{client.web('nope')}/studies")
    assert missing.status_code == 403  # IAM is checked before existence
    client.hc.deny(None)
    assert client.stow(inst.path.read_bytes()).status_code == 200
    assert client.session.delete(client.store_url()).status_code == 200


# -- scale and direct access ---------------------------------------------------------------------


def test_25000_synthetic_studies_paged_by_offset(client: Client) -> None:
    studies = client.hc.add_synthetic_studies("ds", "store", 25_000)
    assert len(set(studies)) == 25_000
    url = f"{client.web()}/studies"
    started = time.monotonic()
    seen: list[str] = []
    requests_made = 0
    while True:
        response = client.session.get(url, params={"limit": "10000", "offset": str(len(seen))})
        requests_made += 1
        if response.status_code == 204:
            break
        page = [value(e, "0020000D") for e in response.json()]
        assert len(page) == 5000  # capped at the maximum
        seen += page
    assert requests_made == 6
    assert seen == sorted(studies)
    assert time.monotonic() - started < 10

    study = studies[12_345]
    [entry] = client.session.get(f"{url}/{study}/series").json()
    series = value(entry, "0020000E")
    [entry] = client.session.get(f"{url}/{study}/series/{series}/instances").json()
    sop = value(entry, "00080018")
    data = client.session.get(f"{url}/{study}/series/{series}/instances/{sop}", headers={"Accept": DICOM_ANY})
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data.content))
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (study, series, sop)
    [info] = client.hc.store_view("ds", "store").instances(study, series)
    assert info.size == len(data.content)


def test_store_view_uses_stow_rules(client: Client, tmp_path: Path) -> None:
    view = client.hc.store_view("ds", "store")
    good = client.dicom(0, 0)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 200)
    outcomes = view.store_files([good.path, garbage, tmp_path / "missing.dcm"])
    assert [o.stored for o in outcomes] == [True, False, False]
    assert (outcomes[0].study_uid, outcomes[0].series_uid, outcomes[0].sop_uid) == (
        good.study_uid,
        good.series_uid,
        good.sop_uid,
    )
    assert outcomes[1].reason and outcomes[2].reason
    conflict = client.dicom(0, 0, number=0, patient_name="Another^Name")
    assert conflict.sop_uid == good.sop_uid
    [refused] = view.store_files([conflict.path])
    assert not refused.stored and "checksum mismatch" in (refused.reason or "")

    assert list(view.studies()) == [good.study_uid] and list(view.studies("1.2.3")) == []
    assert list(view.series(good.study_uid)) == [good.series_uid]
    [info] = view.instances(good.study_uid, good.series_uid)
    assert info.size == good.path.stat().st_size
    assert view.all_instances() == [(good.study_uid, good.series_uid, good.sop_uid)]
    sink = tmp_path / "out.dcm"
    with open(sink, "wb") as handle:
        assert view.retrieve(good.study_uid, good.series_uid, good.sop_uid, handle) == good.path.stat().st_size
    assert sink.read_bytes() == good.path.read_bytes()
    with open(sink, "wb") as handle, pytest.raises(NotFound):
        view.retrieve(good.study_uid, good.series_uid, "1.2.3", handle)
    # seeded instances are indexed at once, whatever the lag
    client.hc.index_lag = 30
    later = client.dicom(2, 0)
    view.store_files([later.path])
    assert len(client.session.get(f"{client.web()}/studies").json()) == 2
