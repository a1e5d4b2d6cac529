"""Turn a ``--datasetAddr`` value into a :class:`~dicomfuse.stores.base.Dataset`.

Accepted addresses:

* a folder path, or ``file:///path/to/folder``: a local dataset (each sub-folder is a store);
* ``https://healthcare.googleapis.com/v1/projects/P/locations/L/datasets/D`` (or ``v1beta1``):
  a Cloud Healthcare API dataset. The same path on another host (a private endpoint, a proxy,
  a test stand-in) is one too;
* any other ``http(s)://`` URL: a DICOMweb server, shown as a dataset with one store. A login
  (HTTP basic authentication) is taken from the URL (``http://USER:PASSWORD@host/dicom-web``),
  else from ``~/.netrc`` (requests reads it); it never stays in the URLs the store builds, logs
  or shows.

Concrete stores other than the local one are imported lazily, so a local dataset needs none of
their dependencies.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

from dicomfuse.stores.base import Dataset
from dicomfuse.stores.http import hide_path_tokens
from dicomfuse.stores.local import DEFAULT_RESCAN_INTERVAL, LocalDataset

HEALTHCARE_HOST = "healthcare.googleapis.com"
HEALTHCARE_VERSIONS = ("v1", "v1beta1")

ACCEPTED = (
    "a folder path, file:///path, "
    f"https://{HEALTHCARE_HOST}/v1/projects/P/locations/L/datasets/D, "
    "or an http(s):// DICOMweb URL"
)

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_WINDOWS_DRIVE_RE = re.compile(r"^[A-Za-z]:[\\/]")
_HEALTHCARE_PATH_RE = re.compile(
    r"^/(?P<version>v1|v1beta1)/projects/(?P<project>[^/]+)"
    r"/locations/(?P<location>[^/]+)/datasets/(?P<dataset>[^/]+)/?$"
)


def split_login(address: str) -> tuple[str, tuple[str, str] | None]:
    """``http://USER:PASSWORD@host/path`` → (``http://host/path``, (USER, PASSWORD)),
    percent-decoded (a ``@`` or ``:`` in a password is written ``%40``, ``%3A``); an address with
    no login comes back as it is, with None."""
    parts = urlsplit(address)
    if not parts.scheme or "@" not in parts.netloc:
        return address, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def check_authority(address: str) -> None:
    """Raise ValueError when the host and port of an http(s) address cannot be read, as when a
    password holds an unencoded ``/ ? # @`` (``http://u:pa/ss@host``: the host would be
    ``u``, the rest of the password a path, shown in messages). Never repeats the address."""
    parts = urlsplit(address.strip())
    host_port = parts.netloc.rsplit("@", 1)[-1]
    port = host_port.rsplit(":", 1)[1] if ":" in host_port and not host_port.endswith("]") else ""
    if port and not port.isdigit():
        raise ValueError("its host and port cannot be read: a user name or password holding / ? # @ or : must be "
                         "percent-encoded (%2F %3F %23 %40 %3A), or put in ~/.netrc")


def without_login(address: str) -> str:
    """``address`` as it may be shown or logged: a login in it (``USER:PASSWORD@``, with or without
    a scheme) is dropped, and an access token in its path (Kheops' ``/link/{token}``) hidden."""
    text = address.strip()
    if _SCHEME_RE.match(text):
        text = split_login(text)[0]
    else:
        head, sep, rest = text.partition("/")  # user:password@host:8042/dicom-web, written without http://
        if "@" in head and ":" in head.rsplit("@", 1)[0]:
            text = head.rsplit("@", 1)[1] + sep + rest
    return hide_path_tokens(text)


def has_login(address: str) -> bool:
    """Whether ``address`` carries a login (``http://USER:PASSWORD@host…``)."""
    return split_login(address.strip())[1] is not None


class HealthcareAddress(NamedTuple):
    """The parts of a Cloud Healthcare API dataset URL."""

    api_root: str  # "https://healthcare.googleapis.com"
    version: str  # "v1" or "v1beta1"
    project: str
    location: str
    dataset: str


def parse_healthcare_address(address: str, *, any_host: bool = False) -> HealthcareAddress | None:
    """The parts of ``https://healthcare.googleapis.com/{v1|v1beta1}/projects/P/locations/L/
    datasets/D`` (a trailing slash allowed), or None when ``address`` is not such a URL.
    ``any_host`` accepts the same path on any http(s) host."""
    parts = urlsplit(address.strip())
    if any_host:
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return None
    elif parts.scheme.lower() != "https" or (parts.hostname or "") != HEALTHCARE_HOST:
        return None
    if parts.query or parts.fragment:
        return None
    match = _HEALTHCARE_PATH_RE.match(parts.path)
    if match is None:
        return None
    return HealthcareAddress(
        api_root=f"{parts.scheme.lower()}://{parts.netloc.lower()}",
        version=match["version"],
        project=match["project"],
        location=match["location"],
        dataset=match["dataset"],
    )


def open_dataset(
    address: str,
    *,
    key_file: str | Path | None = None,
    timeout: float | tuple[float, float] | None = None,
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL,
    orthanc_rest: str | None = "auto",
    pool_size: int = 16,
    ca_bundle: str | Path | None = None,
) -> Dataset:
    """The dataset ``address`` names. Raises :class:`ValueError` (one line, naming what is
    accepted) for an address that is none of them or a folder that does not exist.

    ``key_file`` (service-account JSON), ``timeout`` (seconds per HTTP request, or
    (connect, read); None keeps the store's default) and ``pool_size`` (connections kept per
    host) and ``ca_bundle`` (PEM file of trusted CAs) are for the remote datasets;
    ``rescan_interval`` is for a local one."""
    text = address.strip()
    if not text:
        raise ValueError(f"empty dataset address: give {ACCEPTED}")
    shown = without_login(text)  # for messages: a password is not repeated on the screen or in the log
    scheme_match = _SCHEME_RE.match(text)
    if scheme_match is None or _WINDOWS_DRIVE_RE.match(text):
        return _local_dataset(Path(text).expanduser(), shown, rescan_interval)
    scheme = scheme_match.group(1).lower()
    if scheme == "file":
        return _local_dataset(_file_url_path(text), text, rescan_interval)
    if scheme in ("http", "https"):
        check_authority(text)
    if scheme not in ("http", "https"):
        if _looks_like_a_host(shown):  # localhost:8042/dicom-web
            raise ValueError(f"{shown!r} has no http:// or https://: did you mean http://{shown}?")
        raise ValueError(f"unsupported dataset address scheme {scheme!r}: give {ACCEPTED}")
    if (urlsplit(text).hostname or "") == HEALTHCARE_HOST or parse_healthcare_address(text, any_host=True):
        if has_login(text):
            raise ValueError(f"{shown!r}: a Cloud Healthcare API address takes no user name or password "
                             "(credentials come from --keyFile or the application default credentials)")
        return _healthcare_dataset(text, key_file=key_file, timeout=timeout, pool_size=pool_size,
                                   ca_bundle=ca_bundle)
    return _dicomweb_dataset(text, timeout=timeout, orthanc_rest=orthanc_rest, pool_size=pool_size,
                             ca_bundle=ca_bundle)


def _looks_like_a_host(text: str) -> bool:
    """``host:port/path``, ``healthcare.googleapis.com/v1/…``: a server's address without its scheme."""
    head = text.split("/", 1)[0]
    name, _, port = head.partition(":")
    return bool(name) and (name == "localhost" or "." in name) and (not port or port.isdecimal()) \
        and not text.startswith((".", "~"))


def _local_dataset(folder: Path, address: str, rescan_interval: float) -> Dataset:
    if not folder.exists():
        if _looks_like_a_host(address):
            scheme = "https" if address.startswith(HEALTHCARE_HOST) else "http"
            raise ValueError(f"dataset folder {address!r} does not exist; for a server, give its address with "
                             f"{scheme}:// (did you mean {scheme}://{address}?)")
        raise ValueError(f"dataset folder {address!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"dataset address {address!r} is not a folder")
    # Absolute: the mounted process runs in another folder (libfuse moves it to /).
    return LocalDataset(folder.absolute(), rescan_interval=rescan_interval)


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URL {url!r} names another host: only local folders can be mounted")
    if not parts.path:
        raise ValueError(f"file URL {url!r} names no folder: write file:///path/to/folder")
    return Path(url2pathname(parts.path))  # url2pathname also percent-decodes


def _healthcare_dataset(
    url: str,
    *,
    key_file: str | Path | None,
    timeout: float | tuple[float, float] | None,
    pool_size: int = 16,
    ca_bundle: str | Path | None = None,
) -> Dataset:
    """Raises ValueError for a malformed URL and :class:`~dicomfuse.stores.auth.CredentialsError`
    when no credentials can be loaded."""
    address = parse_healthcare_address(url, any_host=True)
    if address is None:
        raise ValueError(
            f"not a Cloud Healthcare dataset URL: {url!r}; expected "
            f"https://{HEALTHCARE_HOST}/v1/projects/P/locations/L/datasets/D"
        )
    from dicomfuse.stores.auth import TokenSource, load_credentials  # lazy: google-auth
    from dicomfuse.stores.healthcare import HealthcareDataset

    credentials = load_credentials(key_file)
    # The token service is reached through the same TLS trust: behind an inspecting proxy with
    # a private CA, it is intercepted like the API.
    tokens = (TokenSource(credentials, ca_bundle=ca_bundle) if timeout is None
              else TokenSource(credentials, timeout=timeout, ca_bundle=ca_bundle))
    dataset_url = (
        f"{address.api_root}/{address.version}/projects/{address.project}"
        f"/locations/{address.location}/datasets/{address.dataset}"
    )
    if timeout is None:
        return HealthcareDataset(dataset_url, tokens, pool_size=pool_size, ca_bundle=ca_bundle)
    return HealthcareDataset(dataset_url, tokens, timeout=timeout, pool_size=pool_size, ca_bundle=ca_bundle)


def _dicomweb_dataset(
    url: str,
    *,
    timeout: float | tuple[float, float] | None,
    orthanc_rest: str | None,
    pool_size: int = 16,
    ca_bundle: str | Path | None = None,
) -> Dataset:
    """``orthanc_rest``: "auto" (detect), None or "off" (never), or the REST API's URL."""
    from dicomfuse.stores.dicomweb import DicomwebDataset  # lazy: only remote mounts need it
    from dicomfuse.stores.http import HostAuth, make_session

    rest = None if orthanc_rest in (None, "off") else orthanc_rest
    url, login = split_login(url)
    session = make_session(pool_size, ca_bundle)
    if login is not None:
        session.auth = HostAuth(*login, url=url)
    if timeout is None:
        dataset: Dataset = DicomwebDataset(url, session, orthanc_rest_url=rest)
    else:
        dataset = DicomwebDataset(url, session, orthanc_rest_url=rest, timeout=timeout)
    return dataset
