"""open_dataset: --datasetAddr values to datasets."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from dicomfuse.stores.local import LocalDataset
from dicomfuse.stores.open import HealthcareAddress, open_dataset, parse_healthcare_address

HC = "https://healthcare.googleapis.com"


def url_path(folder: Path) -> str:
    """The path part of a file:// URL for ``folder``: ``/tmp/x`` on POSIX, ``/C:/Users/x`` on
    Windows (``file://C:\\x`` would name a host ``C:``)."""
    return "/" + folder.as_posix().lstrip("/")


def test_folder_path(tmp_path: Path) -> None:
    dataset = open_dataset(str(tmp_path))
    assert isinstance(dataset, LocalDataset)
    assert dataset.root == tmp_path


def test_relative_folder_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    dataset = open_dataset("data")
    assert isinstance(dataset, LocalDataset)
    assert dataset.root.resolve() == (tmp_path / "data").resolve()


def test_home_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))  # what expanduser reads on Windows
    (tmp_path / "dicom").mkdir()
    dataset = open_dataset("~/dicom")
    assert isinstance(dataset, LocalDataset) and dataset.root == tmp_path / "dicom"


@pytest.mark.parametrize("prefix", ["file://", "file://localhost", "FILE://"])
def test_file_url(tmp_path: Path, prefix: str) -> None:
    folder = tmp_path / "with space"
    folder.mkdir()
    dataset = open_dataset(prefix + url_path(folder).replace(" ", "%20"))
    assert isinstance(dataset, LocalDataset)
    assert dataset.root == folder


def test_file_url_of_another_host(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="another host"):
        open_dataset(f"file://server{tmp_path}")


@pytest.mark.parametrize("address", ["{tmp}/absent", "file://{url}/absent", "C:\\no\\such\\folder"])
def test_missing_folder(tmp_path: Path, address: str) -> None:
    with pytest.raises(ValueError, match="does not exist") as info:
        open_dataset(address.format(tmp=tmp_path, url=url_path(tmp_path)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("address", "meant"), [
    ("127.0.0.1:8042/dicom-web", "http://127.0.0.1:8042/dicom-web"),
    ("localhost:8042/dicom-web", "http://localhost:8042/dicom-web"),
    ("healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d",
     "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d"),
])
def test_a_server_address_without_its_scheme_says_which_was_meant(address: str, meant: str,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no such folder here
    with pytest.raises(ValueError, match=f"did you mean {re.escape(meant)}"):
        open_dataset(address)


def test_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ValueError, match="not a folder"):
        open_dataset(str(tmp_path / "f"))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (f"{HC}/v1/projects/p/locations/us-central1/datasets/d", ("v1", "p", "us-central1", "d")),
        (
            f"{HC}/v1beta1/projects/my-proj/locations/europe-west4/datasets/ds.1/",
            ("v1beta1", "my-proj", "europe-west4", "ds.1"),
        ),
        (f"  {HC}/v1/projects/p/locations/l/datasets/d/  ", ("v1", "p", "l", "d")),
        ("https://HEALTHCARE.googleapis.com/v1/projects/p/locations/l/datasets/d", ("v1", "p", "l", "d")),
    ],
)
def test_parse_healthcare_address(address: str, expected: tuple[str, ...]) -> None:
    parsed = parse_healthcare_address(address)
    assert isinstance(parsed, HealthcareAddress)
    assert parsed == (HC, *expected)
    api_root, version, project, location, dataset = parsed
    assert (api_root, version, project, location, dataset) == (HC, *expected)


@pytest.mark.parametrize(
    "address",
    [
        "http://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d",
        "https://example.com/v1/projects/p/locations/l/datasets/d",
        f"{HC}/v2/projects/p/locations/l/datasets/d",
        f"{HC}/v1/projects/p/locations/l/datasets/d/dicomStores/s",
        f"{HC}/v1/projects/p/locations/l/datasets",
        f"{HC}/v1/projects/p/locations/l/datasets//",
        f"{HC}/v1/projects/p/locations/l/datasets/d?x=1",
        "/some/folder",
        "",
    ],
)
def test_parse_healthcare_address_rejects_others(address: str) -> None:
    assert parse_healthcare_address(address) is None


@pytest.mark.parametrize("suffix", ["", "/"])
def test_healthcare_dataset_without_credentials_says_how_to_get_them(
    suffix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import google.auth.compute_engine._metadata as metadata

    from dicomfuse.stores.auth import CredentialsError

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    monkeypatch.setattr(metadata, "_NO_GCE_CHECK", True)
    with pytest.raises(CredentialsError, match="gcloud auth application-default login"):
        open_dataset(f"{HC}/v1beta1/projects/p/locations/l/datasets/d{suffix}")


def test_unreadable_key_file_is_named(tmp_path: Path) -> None:
    from dicomfuse.stores.auth import CredentialsError

    with pytest.raises(CredentialsError, match="cannot read key file .*missing.json"):
        open_dataset(f"{HC}/v1/projects/p/locations/l/datasets/d", key_file=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CredentialsError, match="bad.json"):
        open_dataset(f"{HC}/v1/projects/p/locations/l/datasets/d", key_file=bad)


def test_healthcare_host_with_a_non_dataset_path() -> None:
    with pytest.raises(ValueError, match="datasets/D"):
        open_dataset(f"{HC}/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb")


class FakeDicomwebDataset:
    def __init__(self, url: str, session: object = None, **kwargs: object) -> None:
        self.url = url
        self.session = session
        self.kwargs = kwargs


@pytest.fixture
def fake_dicomweb(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("dicomfuse.stores.dicomweb")
    fake.DicomwebDataset = FakeDicomwebDataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dicomfuse.stores.dicomweb", fake)


@pytest.mark.usefixtures("fake_dicomweb")
@pytest.mark.parametrize("url", ["http://127.0.0.1:8042/dicom-web", "https://pacs.example.org/wado/"])
def test_other_http_urls_are_dicomweb(url: str) -> None:
    dataset = open_dataset(url)
    assert isinstance(dataset, FakeDicomwebDataset)
    assert (dataset.url, dataset.kwargs) == (url, {"orthanc_rest_url": "auto"})
    session = dataset.session
    assert session.auth is None and session.verify is True  # type: ignore[attr-defined]
    assert session.get_adapter(url)._pool_maxsize == 16  # type: ignore[attr-defined]


@pytest.mark.usefixtures("fake_dicomweb")
def test_dicomweb_timeout_is_passed_on() -> None:
    dataset = open_dataset("http://127.0.0.1:8042/dicom-web", timeout=(3.0, 30.0))
    assert isinstance(dataset, FakeDicomwebDataset)
    assert dataset.kwargs == {"orthanc_rest_url": "auto", "timeout": (3.0, 30.0)}


@pytest.mark.usefixtures("fake_dicomweb")
def test_dicomweb_pool_and_ca_bundle_go_to_its_session(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    dataset = open_dataset("https://pacs.example.org/dicom-web", pool_size=24, ca_bundle=bundle)
    assert isinstance(dataset, FakeDicomwebDataset)
    assert dataset.session.verify == str(bundle)  # type: ignore[attr-defined]
    assert dataset.session.get_adapter("https://pacs.example.org")._pool_maxsize == 24  # type: ignore[attr-defined]


@pytest.mark.usefixtures("fake_dicomweb")
def test_a_login_in_a_dicomweb_address_goes_to_its_session_not_its_urls() -> None:
    from requests.auth import HTTPBasicAuth

    dataset = open_dataset("http://ana%40lab:p%3Ass%2Fw%20rd@pacs.example.org:8042/dicom-web")
    assert isinstance(dataset, FakeDicomwebDataset)
    assert dataset.url == "http://pacs.example.org:8042/dicom-web"
    auth = dataset.session.auth  # type: ignore[attr-defined]
    assert (auth.username, auth.password) == ("ana@lab", "p:ss/w rd")
    # Sent to that host and port only: not to an --orthancRest elsewhere, nor after a redirect.
    import requests

    def sent(url: str) -> str | None:
        return auth(requests.Request("GET", url).prepare()).headers.get("Authorization")

    assert sent("http://pacs.example.org:8042/dicom-web/studies") == \
        HTTPBasicAuth("ana@lab", "p:ss/w rd")(requests.Request("GET", "http://x").prepare()).headers["Authorization"]
    assert sent("http://pacs.example.org:8043/tools/find") is None
    assert sent("http://other.example.org:8042/dicom-web/studies") is None


@pytest.mark.parametrize("address", ["http://alice:pa/SECRET@127.0.0.1:8042/dicom-web",
                                     "http://alice:pa#SECRET@127.0.0.1:8042/dicom-web",
                                     "http://alice:pa?SECRET@127.0.0.1:8042/dicom-web"])
def test_a_login_with_unencoded_characters_is_refused_without_showing_it(address: str) -> None:
    """urlsplit ends the host at the first / ? #: the rest of the password became the path,
    printed in 'Cannot reach the dataset: GET /SECRET@127.0.0.1:…' and every log."""
    with pytest.raises(ValueError, match="percent-encoded") as info:
        open_dataset(address)
    assert "SECRET" not in str(info.value) and "pa" not in str(info.value).split(":")[0]


@pytest.mark.parametrize(("address", "shown"), [
    ("http://u:secret@h:8042/dicom-web", "http://h:8042/dicom-web"),
    ("https://u:secret@h/rs?x=1", "https://h/rs?x=1"),
    ("u:secret@h:8042/dicom-web", "h:8042/dicom-web"),
    ("http://h:8042/dicom-web", "http://h:8042/dicom-web"),
    ("/data/user@site/dicoms", "/data/user@site/dicoms"),
    ("scans@2024/x", "scans@2024/x"),  # a folder name with an @ and no password
    ("https://kheops.example/api/link/B18jTXCzTrQzj1ZednqHUY/", "https://kheops.example/api/link/<token>/"),
    ("https://litevna.app/key_3b1f9a/dicomweb", "https://litevna.app/key_<token>/dicomweb"),
])
def test_without_login(address: str, shown: str) -> None:
    from dicomfuse.stores.open import has_login, without_login

    assert without_login(address) == shown
    assert has_login(address) == (address.startswith("http") and "secret" in address)


@pytest.mark.parametrize("address", ["u:secret@localhost:8042/dicom-web", "u:secret@pacs.example.org/dicom-web"])
def test_an_address_with_a_login_and_no_scheme_is_refused_without_repeating_the_password(address: str) -> None:
    with pytest.raises(ValueError) as info:
        open_dataset(address)
    assert "secret" not in str(info.value) and "http://" in str(info.value)


def test_a_healthcare_address_with_a_login_is_refused_without_repeating_it() -> None:
    with pytest.raises(ValueError, match="--keyFile") as info:
        open_dataset(f"https://u:secret@{HC[8:]}/v1/projects/p/locations/l/datasets/d")
    assert "secret" not in str(info.value)


def test_real_dicomweb_dataset_opens_without_a_request() -> None:
    pytest.importorskip("dicomfuse.stores.dicomweb")
    dataset = open_dataset("http://127.0.0.1:9/dicom-web")
    assert type(dataset).__name__ == "DicomwebDataset"
    dataset.close()


@pytest.mark.parametrize("address", ["", "   ", "ftp://host/x", "s3://bucket/key", "dicom://pacs:104"])
def test_garbage_is_refused_naming_what_is_accepted(address: str) -> None:
    with pytest.raises(ValueError) as info:
        open_dataset(address)
    message = str(info.value)
    assert "folder path" in message and "http(s)://" in message and "\n" not in message


@pytest.mark.parametrize(("url", "store"), [
    ("https://kheops.example/api/link/B18jTXCzTrQzj1ZednqHUY", "api"),  # as for Kheops' plain /api root
    ("https://kheops.example/api/link/B18jTXCzTrQzj1ZednqHUY/", "api"),
    ("https://kheops.example/api", "api"),  # unchanged: queued uploads name their store
    ("https://litevna.app/key_3b1f9a/dicomweb", "litevna.app"),
    ("http://h:8080/dcm4chee-arc/aets/DCM4CHEE/rs", "DCM4CHEE"),
    ("http://h:8080/dcm4chee-arc/aets/KEY_IMAGES/rs", "KEY_IMAGES"),  # an AE title, no token
    ("http://h/links/dicom-web", "links"),
    ("http://h/link/dicom-web", "link"),
])
def test_an_access_token_in_the_path_names_no_store_and_is_never_shown(url: str, store: str) -> None:
    """Kheops' "link URL" (/api/link/{token}) named the store folder after the token, which then
    stood in every log line, failed-upload record and status line."""
    from dicomfuse.stores.dicomweb import store_name_from_url
    from dicomfuse.stores.http import safe_path

    assert store_name_from_url(url) == store
    shown = safe_path(url + "/studies/1.2.3")
    assert "B18jTX" not in shown and "3b1f9a" not in shown and shown.endswith("/studies/1.2.3")
    assert ("<token>" in shown) == ("B18jTX" in url or "3b1f9a" in url)
