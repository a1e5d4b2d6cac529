"""A local stand-in for the parts of Google's Cloud Healthcare API (v1 and v1beta1) that a DICOM
filesystem uses, on 127.0.0.1 over plain HTTP, built on :class:`tests.fakes.http_server.LoopbackServer`.

What it serves (``{v}`` is ``v1`` or ``v1beta1``; both paths see the same data):

* ``POST /token``: the OAuth 2 service-account JWT-bearer grant (RFC 7523), as Google's token
  endpoint answers it. The assertion is verified against the public key of a key file written by
  :meth:`HealthcareStandIn.write_key_file`.
* ``/{v}/projects/P/locations/L/datasets/D``: ``GET`` (the dataset), ``dicomStores`` list / create,
  ``dicomStores/S`` get / delete, ``operations/O`` get.
* ``…/dicomStores/S/dicomWeb/``: QIDO-RS (``studies``, ``series``, ``instances``,
  ``studies/{s}/series``, ``studies/{s}/instances``, ``studies/{s}/series/{r}/instances``),
  WADO-RS of an instance, a series or a study, STOW-RS (``studies`` and ``studies/{s}``), and
  DELETE of an instance (``{}``), a series or a study (a finished long-running operation).
  Metadata, frames, rendered and bulkdata resources answer 501 (not emulated).

Every API call needs ``Authorization: Bearer <token>`` from ``/token``. Errors have Google's
shape ``{"error": {"code", "message", "status"}}``. Faults (:meth:`HealthcareStandIn.inject`),
missing IAM permissions (:meth:`HealthcareStandIn.deny`) and search-index lag
(:attr:`HealthcareStandIn.index_lag`) can be set at any time from any thread.

Behaviour follows Google's published reference and conformance statement where they speak; each
place where they are silent is marked in a comment starting with ``GUESS:``.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import fnmatch
import io
import itertools
import json
import re
import secrets
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape, quoteattr

import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.uid import UID

from dicomfuse.dicomfile import DicomUids, check_upload
from dicomfuse.samples import SECONDARY_CAPTURE, UID_PREFIX, make_dataset
from dicomfuse.stores.base import InstanceInfo, NotFound, StowOutcome
from tests.fakes.http_server import LoopbackServer, Reply, Seen

# ---------------------------------------------------------------------------------------------
# Google's published numbers and strings

API_VERSIONS = ("v1", "v1beta1")
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # the aud google-auth puts in every assertion
HEALTHCARE_SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
API_SCOPES = frozenset({HEALTHCARE_SCOPE, CLOUD_PLATFORM_SCOPE})  # REST reference: "one of the following OAuth scopes"
MAX_ASSERTION_LIFETIME = 3600  # Google's token endpoint refuses JWTs valid for more than 60 minutes
UNAUTHENTICATED_MESSAGE = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other "
    "valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
WWW_AUTHENTICATE = 'Bearer realm="https://accounts.google.com/"'

STORE_PAGE_SIZE_DEFAULT = 100  # dicomStores.list: "If not specified, 100 is used. May not be larger than 1000."
STORE_PAGE_SIZE_MAX = 1000

# QIDO limits: (default, maximum) per level. Defaults: Google's adapter team (100 for studies and
# series, 1,000 for instances); maximums: 5,000 for studies and series, 50,000 for instances.
QIDO_LIMITS: dict[str, tuple[int, int]] = {"studies": (100, 5000), "series": (100, 5000), "instances": (1000, 50000)}
QIDO_MAX_OFFSET = 1_000_000

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"  # the conformance statement's default retrieve syntax
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
RETRIEVE_TRANSFER_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
    }
)  # the transfer-syntax values the conformance statement lists for instance retrieval, besides "*"

MORE_RESULTS_WARNING = "There are additional results that can be requested"  # PS3.18 8.3.4.4 wording
FAILURE_PROCESSING = 0x0110  # 272: the FailureReason Google sends for refused instances (seen on a real 409)
FAILURE_DETAIL_TAG = "00090097"  # Google's private FailureDetail (LT), private creator "GOOGLE": XML answers
# "either an additional FailureDetail (0009, 0097) tag (for XML responses) or FailureDetailJSON (0009,1097)
# tag (for JSON responses) will be returned" (Google's DICOM conformance statement, STOW-RS).
FAILURE_DETAIL_JSON_TAG = "00091097"
PRIVATE_CREATOR_TAG = "00090010"
CONFLICT_DETAIL = (
    "An instance already exists in this DICOM store with the same Study/Series/SOPInstance UID, "
    "but the DICOM files differ (checksum mismatch)."
)  # Google's wording for this conflict in dicomStores.import errors
STANDIN_IMPLEMENTATION_UID = UID_PREFIX + "7.1"  # written into the file meta of transcoded instances

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    406: "INVALID_ARGUMENT",  # GUESS: no gRPC code maps to 406; Google's DICOMweb front end says INVALID_ARGUMENT
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_STATUS_MESSAGES = {
    401: UNAUTHENTICATED_MESSAGE,
    429: "Resource has been exhausted (e.g. check quota).",
    500: "Internal error encountered.",
    502: "The service is currently unavailable.",
    503: "The service is currently unavailable.",
    504: "The request timed out.",
}
JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
DICOM_JSON = "application/dicom+json"

# Attributes the search index holds: keyword -> (tag, level). Level 0 study, 1 series, 2 instance.
_INDEXED: dict[str, tuple[str, int]] = {
    "StudyInstanceUID": ("0020000D", 0),
    "StudyDate": ("00080020", 0),
    "StudyTime": ("00080030", 0),
    "AccessionNumber": ("00080050", 0),
    "ReferringPhysicianName": ("00080090", 0),
    "StudyDescription": ("00081030", 0),
    "PatientName": ("00100010", 0),
    "PatientID": ("00100020", 0),
    "PatientBirthDate": ("00100030", 0),
    "PatientSex": ("00100040", 0),
    "StudyID": ("00200010", 0),
    "SeriesInstanceUID": ("0020000E", 1),
    "Modality": ("00080060", 1),
    "SeriesDescription": ("0008103E", 1),
    "SeriesNumber": ("00200011", 1),
    "SOPClassUID": ("00080016", 2),
    "SOPInstanceUID": ("00080018", 2),
    "InstanceNumber": ("00200013", 2),
    "NumberOfFrames": ("00280008", 2),
    "Rows": ("00280010", 2),
    "Columns": ("00280011", 2),
}
_TAG_LEVEL = {tag: level for tag, level in _INDEXED.values()}
_UID_TAGS = ("0020000D", "0020000E", "00080018")
# Computed attributes, returned on includefield (or "all"): tag -> (level, vr).
_COMPUTED = {
    "00080061": (0, "CS"),  # ModalitiesInStudy
    "00201206": (0, "IS"),  # NumberOfStudyRelatedSeries
    "00201208": (0, "IS"),  # NumberOfStudyRelatedInstances
    "00201209": (1, "IS"),  # NumberOfSeriesRelatedInstances
    "00083002": (2, "UI"),  # AvailableTransferSyntaxUID
}
# Matching keys Google's search supports per level (study keys, then series, then instance).
_SEARCHABLE = {
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDate",
    "SeriesInstanceUID",
    "Modality",
    "SOPInstanceUID",
}
_LEVEL_RANK = {"studies": 0, "series": 1, "instances": 2}
_GOOGLE_STANDARD_PARAMS = frozenset(
    {"$.xgafv", "alt", "callback", "fields", "key", "prettyPrint", "quotaUser", "upload_protocol", "uploadType"}
)
_UNSUPPORTED_DICOMWEB = frozenset({"metadata", "frames", "rendered", "bulkdata", "thumbnail"})
_STORE_ID_EXTRA = "_-."
_API_PATH_RE = re.compile(r"^/(v1|v1beta1)/projects/([^/]+)/locations/([^/]+)/datasets/([^/]+)(/.*)?$")


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Recorded:
    """One request as the stand-in saw it: never the token, never the body.

    ``query`` maps each parameter to its value (a repeated parameter's values joined by ``,``,
    which DICOMweb treats as the same thing). ``status`` is None for a dropped or stalled request."""

    method: str
    path: str
    query: dict[str, str]
    authorized: bool
    status: int | None


@dataclass
class _Fault:
    status: int | None
    times: int
    method: str | None
    path_contains: str | None
    retry_after: str | None
    delay: float
    drop: bool
    stall: bool
    skip: int = 0  # matching requests let through untouched before the fault applies

    def matches(self, method: str, raw_path: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path_contains is None or self.path_contains in raw_path


@dataclass
class _Token:
    expires_at: float
    scopes: frozenset[str]


@dataclass
class _Key:
    client_email: str
    public_pem: str


class _Instance:
    """One stored instance. ``data`` is None for a synthetic instance (bytes made on demand)."""

    __slots__ = ("sop_class", "transfer_syntax", "attrs", "data")

    def __init__(
        self, sop_class: str, transfer_syntax: str, attrs: dict[str, dict[str, Any]] | None, data: bytes | None
    ) -> None:
        self.sop_class = sop_class
        self.transfer_syntax = transfer_syntax
        self.attrs = attrs
        self.data = data


Key = tuple[str, str, str]


class _Tree:
    """Studies ▸ series ▸ SOP instances, with sorted listings cached until the next change."""

    def __init__(self) -> None:
        self.studies: dict[str, dict[str, dict[str, _Instance]]] = {}
        self._study_list: list[str] | None = None
        self._series_lists: dict[str, list[str]] = {}
        self._sop_lists: dict[tuple[str, str], list[str]] = {}
        self._all_series: list[tuple[str, str]] | None = None
        self._all_instances: list[Key] | None = None

    def copy(self) -> _Tree:
        other = _Tree()
        other.studies = {s: {r: dict(sops) for r, sops in series.items()} for s, series in self.studies.items()}
        return other

    def get(self, key: Key) -> _Instance | None:
        return self.studies.get(key[0], {}).get(key[1], {}).get(key[2])

    def put(self, key: Key, instance: _Instance) -> None:
        study, series, sop = key
        study_map = self.studies.get(study)
        if study_map is None:
            study_map = self.studies[study] = {}
            self._study_list = None
        series_map = study_map.get(series)
        if series_map is None:
            series_map = study_map[series] = {}
            self._series_lists.pop(study, None)
            self._all_series = None
        if sop not in series_map:
            self._sop_lists.pop((study, series), None)
            self._all_instances = None
        series_map[sop] = instance

    def remove(self, key: Key) -> _Instance | None:
        study, series, sop = key
        series_map = self.studies.get(study, {}).get(series)
        if series_map is None or sop not in series_map:
            return None
        instance = series_map.pop(sop)
        self._sop_lists.pop((study, series), None)
        self._all_instances = None
        if not series_map:
            del self.studies[study][series]
            self._series_lists.pop(study, None)
            self._all_series = None
            if not self.studies[study]:
                del self.studies[study]
                self._study_list = None
        return instance

    def study_list(self) -> list[str]:
        # GUESS: Google's result order is undocumented; UID (string) order is stable across pages.
        if self._study_list is None:
            self._study_list = sorted(self.studies)
        return self._study_list

    def series_list(self, study: str) -> list[str]:
        if study not in self.studies:
            return []
        cached = self._series_lists.get(study)
        if cached is None:
            cached = self._series_lists[study] = sorted(self.studies[study])
        return cached

    def sop_list(self, study: str, series: str) -> list[str]:
        series_map = self.studies.get(study, {}).get(series)
        if series_map is None:
            return []
        cached = self._sop_lists.get((study, series))
        if cached is None:
            cached = self._sop_lists[(study, series)] = sorted(series_map)
        return cached

    def all_series(self) -> list[tuple[str, str]]:
        if self._all_series is None:
            self._all_series = [(s, r) for s in self.study_list() for r in self.series_list(s)]
        return self._all_series

    def study_instances(self, study: str) -> list[Key]:
        return [(study, r, i) for r in self.series_list(study) for i in self.sop_list(study, r)]

    def all_instances(self) -> list[Key]:
        if self._all_instances is None:
            self._all_instances = [key for s in self.study_list() for key in self.study_instances(s)]
        return self._all_instances

    def first_instance(self, study: str, series: str | None = None) -> _Instance | None:
        series_uids = [series] if series is not None else self.series_list(study)[:1]
        for series_uid in series_uids:
            sops = self.sop_list(study, series_uid)
            if sops:
                return self.studies[study][series_uid][sops[0]]
        return None


class _Store:
    """One DICOM store: the true state, and the search index when it lags behind."""

    def __init__(self, resource: dict[str, Any]) -> None:
        self.resource = resource
        self.true = _Tree()
        self.index: _Tree | None = None  # None: the index shows the true state
        self.events: deque[tuple[float, str, Key, _Instance | None]] = deque()


@dataclass
class _Dataset:
    stores: dict[str, _Store] = field(default_factory=dict)


@dataclass
class _Examined:
    """One STOW part after parsing: UIDs and what to store, or the reason it is refused."""

    data: bytes
    uids: DicomUids | None = None
    sop_class: str | None = None
    transfer_syntax: str | None = None
    attrs: dict[str, dict[str, Any]] | None = None
    refusal: str | None = None
    sop_uid: str | None = None  # known even for some refused parts


@dataclass
class _Result:
    stored: bool
    sop_class: str | None
    uids: DicomUids | None
    sop_uid: str | None
    detail: str | None = None


class _ApiError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _json_reply(status: int, document: object, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(document).encode(), {"Content-Type": JSON_CONTENT_TYPE, **(headers or {})})


def google_error(
    code: int, message: str | None = None, status: str | None = None, headers: dict[str, str] | None = None
) -> Reply:
    """An error in Google's JSON shape. GUESS: the message texts (other than 401, 403 and the canonical
    429/5xx ones) are plausible wordings, not Google's exact strings; clients should key on code and status."""
    error = {
        "code": code,
        "message": message or _STATUS_MESSAGES.get(code, "Request failed."),
        "status": status or _STATUS_NAMES.get(code, "UNKNOWN"),
    }
    return _json_reply(code, {"error": error}, headers)


def _fail(code: int, message: str | None = None, status: str | None = None) -> _ApiError:
    return _ApiError(google_error(code, message, status))


def _oauth_error(error: str, description: str) -> Reply:
    return _json_reply(400, {"error": error, "error_description": description})


# ---------------------------------------------------------------------------------------------
# Small parsers


def _split_header_list(value: str) -> list[str]:
    """Comma-separated header items, commas inside quotes kept."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """The lower-cased media type and its parameters (names lower-cased, quotes removed)."""
    message = email.message.Message()
    message["content-type"] = value
    media_type = value.split(";", 1)[0].strip().lower()
    params = {name.lower(): str(val) for name, val in message.get_params(failobj=[])[1:]}
    return media_type, params


def _split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]] | None:
    """The parts of a multipart body, or None when it is malformed (no delimiter, no closing
    delimiter, a part without a header section)."""
    delimiter = b"--" + boundary.encode("latin-1")
    if body.startswith(delimiter):
        position = 0
    else:
        position = body.find(b"\r\n" + delimiter)
        if position < 0:
            return None
        position += 2
    parts: list[tuple[dict[str, str], bytes]] = []
    while True:
        position += len(delimiter)
        if body[position : position + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            return None
        start = line_end + 2
        following = body.find(b"\r\n" + delimiter, start)
        if following < 0:
            return None
        part = body[start:following]
        if part.startswith(b"\r\n"):
            raw_headers, content = b"", part[2:]
        else:
            header_end = part.find(b"\r\n\r\n")
            if header_end < 0:
                return None
            raw_headers, content = part[:header_end], part[header_end + 4 :]
        headers = {}
        for line in raw_headers.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
        position = following + 2


def _attribute_tag(name: str) -> str | None:
    """``0020000D`` for ``0020000D`` or ``StudyInstanceUID``; None for an unknown name."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return name.upper()
    tag = tag_for_keyword(name)
    return f"{tag:08X}" if tag is not None else None


def _first_text(element: dict[str, Any] | None) -> str | None:
    if not element:
        return None
    values = element.get("Value")
    if not values:
        return ""
    value = values[0]
    if isinstance(value, dict):
        return str(value.get("Alphabetic", ""))
    return str(value)


def _value_matches(wanted: str, actual: str | None, *, uid: bool, date: bool) -> bool:
    if actual is None:
        return False
    if uid:
        return actual in {v.strip() for v in wanted.split(",")}  # UID list matching
    if date and "-" in wanted:
        low, _, high = wanted.partition("-")
        return (not low or actual >= low) and (not high or actual <= high)
    if "*" in wanted or "?" in wanted:
        return fnmatch.fnmatchcase(actual.lower(), wanted.lower())
    return actual == wanted


def _index_attributes(ds: pydicom.Dataset) -> dict[str, dict[str, Any]]:
    attrs: dict[str, dict[str, Any]] = {}
    for keyword, (tag, _level) in _INDEXED.items():
        if tag in _UID_TAGS or keyword not in ds:
            continue
        try:
            attrs[tag] = ds.data_element(keyword).to_json_dict(None, 1 << 20)  # type: ignore[union-attr]
        except Exception:  # an unreadable value is simply not indexed
            continue
    return attrs


def _examine(data: bytes) -> _Examined:
    """Parse one uploaded instance with the same rules as the local store (complete Part-10 file
    with valid Study, Series and SOP Instance UIDs)."""
    with tempfile.TemporaryDirectory(prefix="hc-standin-") as folder:
        path = Path(folder) / "part.dcm"
        path.write_bytes(data)
        checked = check_upload(path)
    sop_uid = None
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        sop_uid = str(header.get("SOPInstanceUID") or "") or None
    except Exception:
        header = None
    if isinstance(checked, str):
        return _Examined(data, refusal=f"Failed to parse the DICOM instance: {checked}.", sop_uid=sop_uid)
    assert header is not None
    meta = getattr(header, "file_meta", None)
    sop_class = str(header.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
    if not sop_class:
        return _Examined(data, refusal="Failed to parse the DICOM instance: no SOPClassUID.", sop_uid=sop_uid)
    transfer_syntax = str(meta.get("TransferSyntaxUID")) if meta is not None else EXPLICIT_VR_LITTLE_ENDIAN
    return _Examined(
        data,
        uids=checked,
        sop_class=sop_class,
        transfer_syntax=transfer_syntax,
        attrs=_index_attributes(header),
        sop_uid=checked.sop_uid,
    )


def _transcode(data: bytes, target: str) -> bytes | None:
    """The instance re-encoded in ``target`` by pydicom, or None when the stand-in cannot (any
    change into or out of a compressed syntax). The file meta always changes, so even a no-op
    transcode never returns the original bytes."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        source = UID(str(ds.file_meta.TransferSyntaxUID))
        wanted = UID(target)
        if source != wanted and (source.is_compressed or wanted.is_compressed):
            return None
        ds.file_meta.TransferSyntaxUID = wanted
        ds.file_meta.ImplementationClassUID = STANDIN_IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = "GHC_STANDIN"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()
    except Exception:
        return None


def _synthetic_bytes(key: Key) -> bytes:
    ds = make_dataset(key[0], key[1], key[2], pixel_bytes=256, patient_name="Synthetic^Study", patient_id="SYNTHETIC")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _valid_store_id(store_id: str) -> bool:
    """Google's rule: 1-256 Unicode letters, numbers, underscores, dashes and periods."""
    return 1 <= len(store_id) <= 256 and all(c.isalnum() or c in _STORE_ID_EXTRA for c in store_id)


# ---------------------------------------------------------------------------------------------
# The stand-in


class HealthcareStandIn:
    """A Cloud Healthcare API on 127.0.0.1. ``start()`` it, make a dataset and a key file, and
    point a client at :meth:`create_dataset`'s URL with ``token_uri`` from the key file."""

    def __init__(
        self,
        *,
        project: str = "test-project",
        location: str = "us-central1",
        token_lifetime: float = 3600.0,
        index_lag: float = 0.0,
    ) -> None:
        self.project = project
        self.location = location
        self.token_lifetime = token_lifetime
        self.index_lag = index_lag
        self.qido_warning = False
        """GUESS knob: Google does not document a ``Warning: 299`` header on truncated QIDO
        pages, so none is sent unless this is set (a client must page until a short page or 204)."""
        self.requests: list[Recorded] = []
        self.tokens_issued = 0
        self.expired_token_requests = 0
        self._lock = threading.RLock()
        self._server: LoopbackServer | None = None
        self._datasets: dict[str, _Dataset] = {}
        self._keys: dict[str, _Key] = {}
        self._tokens: dict[str, _Token] = {}
        self._faults: list[_Fault] = []
        self._denied: set[str] = set()
        self._operations: dict[str, dict[str, Any]] = {}
        self._synthetic_cache: dict[Key, bytes] = {}
        self._salt = secrets.randbelow(9_000_000) + 1_000_000
        self._serial = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> HealthcareStandIn:
        if self._server is None:
            self._server = LoopbackServer(self._respond, record=False)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> HealthcareStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the stand-in is not started")
        return self._server.base_url

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    # -- direct set-up (no HTTP) -------------------------------------------------------------

    def create_dataset(self, dataset_id: str, version: str = "v1") -> str:
        """Create (or keep) a dataset and return its URL for ``version`` (both versions serve it)."""
        if version not in API_VERSIONS:
            raise ValueError(f"unknown API version {version!r}")
        with self._lock:
            self._datasets.setdefault(dataset_id, _Dataset())
        return f"{self.url}/{version}/{self._dataset_name(dataset_id)}"

    def create_store(self, dataset_id: str, store_id: str) -> None:
        with self._lock:
            dataset = self._require_dataset(dataset_id)
            if store_id in dataset.stores:
                raise ValueError(f"store {store_id!r} exists already")
            dataset.stores[store_id] = _Store({"name": self._store_name(dataset_id, store_id)})

    def store_ids(self, dataset_id: str) -> list[str]:
        with self._lock:
            return sorted(self._require_dataset(dataset_id).stores)

    def store_view(self, dataset_id: str, store_id: str) -> StoreView:
        return StoreView(self, dataset_id, store_id)

    def add_synthetic_studies(self, dataset_id: str, store_id: str, count: int) -> list[str]:
        """Add ``count`` metadata-only studies (one series, one instance each), indexed at once.
        Their bytes are a small valid DICOM file made on demand."""
        with self._lock:
            store = self._require_store(dataset_id, store_id)
            studies = []
            for _ in range(count):
                study = f"{UID_PREFIX}99.{self._salt}.{next(self._serial)}"
                key = (study, study + ".1", study + ".1.1")
                instance = _Instance(SECONDARY_CAPTURE, EXPLICIT_VR_LITTLE_ENDIAN, None, None)
                store.true.put(key, instance)
                if store.index is not None:
                    store.index.put(key, instance)
                studies.append(study)
            return studies

    def write_key_file(
        self, path: Path, *, client_email: str = "dicomfuse-test@test-project.iam.gserviceaccount.com"
    ) -> Path:
        """Write a service-account key file (fresh RSA key) whose ``token_uri`` is this stand-in,
        and remember its public key to verify the assertions signed with it."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        public_pem = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        key_id = secrets.token_hex(20)
        document = {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": key_id,
            "private_key": private_pem,
            "client_email": client_email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{client_email}",
            "universe_domain": "googleapis.com",
        }
        with self._lock:
            self._keys[key_id] = _Key(client_email, public_pem)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
        return path

    # -- faults and knobs ----------------------------------------------------------------------

    def inject(
        self,
        *,
        status: int | None = None,
        times: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        retry_after: str | None = None,
        delay: float = 0.0,
        drop: bool = False,
        stall: bool = False,
        skip: int = 0,
    ) -> None:
        """Fault the next ``times`` requests that match ``method`` (any if None) and whose raw path
        (with query) contains ``path_contains`` (any if None), after letting ``skip`` of them
        through. Each request takes at most one fault, the oldest matching one; ``/token``
        requests can be faulted too.

        Effects, in this order:

        * ``stall``: the request is never answered (held until :meth:`stop`); nothing else applies.
        * ``delay``: sleep that many seconds first.
        * ``drop``: then close the connection without any answer.
        * ``status``: then answer that status with a Google error body (``Retry-After:
          retry_after`` if given; ``WWW-Authenticate`` for 401).
        * with only ``delay`` (no status, no drop), the request is then served normally.

        ``status`` left as None means 503 unless ``delay``, ``drop`` or ``stall`` was given, so
        ``inject()`` alone is one 503."""
        if status is None and not (delay or drop or stall):
            status = 503
        with self._lock:
            self._faults.append(_Fault(status, times, method, path_contains, retry_after, delay, drop, stall, skip))

    def faults_left(self) -> int:
        """How many injected faults no request has taken yet: 0 once the last one's request
        arrived (``requests`` records a request only once it is answered)."""
        with self._lock:
            return len(self._faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def deny(self, permission: str | None) -> None:
        """Simulate a missing IAM permission (e.g. ``healthcare.dicomStores.dicomWebWrite``);
        ``"*"`` denies every permission; None grants everything again."""
        with self._lock:
            if permission is None:
                self._denied.clear()
            else:
                self._denied.add(permission)

    def issued_tokens(self) -> list[str]:
        """Every access token issued so far (tests check that none ever reaches a log line)."""
        with self._lock:
            return list(self._tokens)

    def clear_log(self) -> None:
        """Forget the recorded requests and reset ``tokens_issued`` and ``expired_token_requests``."""
        with self._lock:
            self.requests.clear()
            self.tokens_issued = 0
            self.expired_token_requests = 0

    # -- names -----------------------------------------------------------------------------------

    def _dataset_name(self, dataset_id: str) -> str:
        return f"projects/{self.project}/locations/{self.location}/datasets/{dataset_id}"

    def _store_name(self, dataset_id: str, store_id: str) -> str:
        return f"{self._dataset_name(dataset_id)}/dicomStores/{store_id}"

    def _require_dataset(self, dataset_id: str) -> _Dataset:
        dataset = self._datasets.get(dataset_id)
        if dataset is None:
            raise ValueError(f"no dataset {dataset_id!r}: call create_dataset first")
        return dataset

    def _require_store(self, dataset_id: str, store_id: str) -> _Store:
        store = self._require_dataset(dataset_id).stores.get(store_id)
        if store is None:
            raise NotFound(f"no store {store_id!r} in dataset {dataset_id!r}")
        return store

    # -- request entry point --------------------------------------------------------------------

    def _respond(self, seen: Seen) -> Reply:
        split = urlsplit(seen.path)
        query = {name: ",".join(values) for name, values in parse_qs(split.query, keep_blank_values=True).items()}
        headers = {name.lower(): value for name, value in seen.headers.items()}
        authorized = False
        reply: Reply | None = None
        fault = self._take_fault(seen.method, seen.path)
        try:
            if fault is not None:
                reply = self._fault_reply(fault)
            if reply is None:
                if split.path == "/token":
                    reply = self._token_endpoint(seen.method, headers, seen.body)
                else:
                    token = self._authenticate(headers)
                    authorized = True
                    reply = self._route(seen.method, split.path, query, headers, seen.body, token)
        except _ApiError as exc:
            reply = exc.reply
        except Exception:  # a bug in the stand-in: answer like Google's 500, keep the trace visible
            traceback.print_exc()
            reply = google_error(500)
        status = None if reply.drop or reply.stall else reply.status
        with self._lock:
            self.requests.append(Recorded(seen.method, split.path, query, authorized, status))
        return reply

    def _take_fault(self, method: str, raw_path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, raw_path):
                    if fault.skip > 0:
                        fault.skip -= 1
                        return None
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _fault_reply(self, fault: _Fault) -> Reply | None:
        if fault.stall:
            return Reply(503, b"", stall=True)
        if fault.delay:
            time.sleep(fault.delay)
        if fault.drop:
            return Reply(drop=True)
        if fault.status is None:
            return None
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        if fault.status == 401:
            headers["WWW-Authenticate"] = WWW_AUTHENTICATE + ', error="invalid_token"'
        return google_error(fault.status, headers=headers)

    # -- OAuth ------------------------------------------------------------------------------------

    def _token_endpoint(self, method: str, headers: dict[str, str], body: bytes) -> Reply:
        if method != "POST":
            return _json_reply(405, {"error": "invalid_request", "error_description": "Use POST."})
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        grant_type = form.get("grant_type", "")
        if grant_type != JWT_BEARER_GRANT:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        assertion = form.get("assertion")
        if not assertion:
            return _oauth_error("invalid_request", "Missing required parameter: assertion")
        return self._grant(assertion)

    def _grant(self, assertion: str) -> Reply:
        from google.auth import jwt

        try:
            header = jwt.decode_header(assertion)
            claims = jwt.decode(assertion, verify=False)
        except Exception:
            return _oauth_error("invalid_grant", "Invalid JWT: the assertion is not a JWT.")
        with self._lock:
            keys = {kid: key for kid, key in self._keys.items() if key.client_email == claims.get("iss")}
        if not keys:
            return _oauth_error("invalid_grant", "Invalid grant: account not found")
        kid = header.get("kid")
        certs = {kid: keys[kid].public_pem} if kid in keys else {k: key.public_pem for k, key in keys.items()}
        try:
            # google-auth always signs for Google's endpoint URI, whatever token_uri says; accept both.
            jwt.decode(
                assertion, certs=certs, audience=[GOOGLE_TOKEN_AUDIENCE, self.token_uri], clock_skew_in_seconds=10
            )
        except ValueError as exc:
            text = str(exc).lower()
            if "audience" in text:
                return _oauth_error(
                    "invalid_grant",
                    f"Invalid JWT: Failed audience check. The right audience is {GOOGLE_TOKEN_AUDIENCE}",
                )
            if "expired" in text or "early" in text or "iat" in text or "exp" in text:
                return _oauth_error("invalid_grant", self._short_lived_message())
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        issued, expires = claims.get("iat"), claims.get("exp")
        if not isinstance(issued, int | float) or not isinstance(expires, int | float):
            return _oauth_error("invalid_grant", self._short_lived_message())
        if expires - issued > MAX_ASSERTION_LIFETIME or expires <= issued:
            return _oauth_error("invalid_grant", self._short_lived_message())
        scopes = frozenset(str(claims.get("scope") or "").split())
        if not scopes:
            return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = "ya29.standin-" + secrets.token_urlsafe(32)
        lifetime = float(self.token_lifetime)
        with self._lock:
            self._tokens[token] = _Token(time.monotonic() + lifetime, scopes)
            self.tokens_issued += 1
        return _json_reply(200, {"access_token": token, "expires_in": max(1, int(lifetime)), "token_type": "Bearer"})

    @staticmethod
    def _short_lived_message() -> str:
        return (
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
            "Check your iat and exp values in the JWT claim."
        )

    def _authenticate(self, headers: dict[str, str]) -> _Token:
        value = headers.get("authorization", "")
        scheme, _, credential = value.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise _ApiError(google_error(401, headers={"WWW-Authenticate": WWW_AUTHENTICATE}))
        with self._lock:
            token = self._tokens.get(credential.strip())
            # GUESS: an expired token gets the same 401 body as an unknown one, plus error="invalid_token".
            if token is not None and token.expires_at <= time.monotonic():
                self.expired_token_requests += 1
                token = None
        if token is None:
            raise _ApiError(
                google_error(401, headers={"WWW-Authenticate": WWW_AUTHENTICATE + ', error="invalid_token"'})
            )
        return token

    def _authorize(self, token: _Token, permission: str, resource: str) -> None:
        # Google APIs answer a token without a required scope with this 403 (scopes are not checked at /token).
        if not token.scopes & API_SCOPES:
            raise _ApiError(
                _json_reply(
                    403,
                    {
                        "error": {
                            "code": 403,
                            "message": "Request had insufficient authentication scopes.",
                            "status": "PERMISSION_DENIED",
                            "details": [
                                {
                                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                    "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                                    "domain": "googleapis.com",
                                    "metadata": {"service": "healthcare.googleapis.com"},
                                }
                            ],
                        }
                    },
                )
            )
        with self._lock:
            denied = "*" in self._denied or permission in self._denied
        if denied:
            message = (
                f"Permission '{permission}' denied on resource '//healthcare.googleapis.com/{resource}' "
                "(or it may not exist)."
            )
            raise _ApiError(google_error(403, message, "PERMISSION_DENIED"))

    # -- routing ----------------------------------------------------------------------------------

    def _route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes, token: _Token
    ) -> Reply:
        match = _API_PATH_RE.match(path)
        if match is None:
            raise _fail(404, "Requested entity was not found.")
        version, project, location, dataset_id, rest = match.groups()
        project, location, dataset_id = unquote(project), unquote(location), unquote(dataset_id)
        segments = [unquote(s) for s in (rest or "").split("/") if s]
        dataset_name = f"projects/{project}/locations/{location}/datasets/{dataset_id}"

        def dataset() -> _Dataset:
            with self._lock:
                found = self._datasets.get(dataset_id)
            if found is None or project != self.project or location != self.location:
                raise _fail(404, f"Dataset {dataset_name} not found.")
            return found

        if not segments:
            if method != "GET":
                raise _fail(404, "Method not found.")
            self._authorize(token, "healthcare.datasets.get", dataset_name)
            dataset()
            return _json_reply(200, {"name": dataset_name, "timeZone": "UTC"})
        if segments[0] == "operations" and len(segments) == 2 and method == "GET":
            self._authorize(token, "healthcare.operations.get", dataset_name)
            dataset()
            with self._lock:
                operation = self._operations.get(f"{dataset_name}/operations/{segments[1]}")
            if operation is None:
                raise _fail(404, f"Operation {dataset_name}/operations/{segments[1]} not found.")
            return _json_reply(200, operation)
        if segments[0] != "dicomStores":
            raise _fail(404, "Requested entity was not found.")
        if len(segments) == 1:
            if method == "GET":
                self._authorize(token, "healthcare.dicomStores.list", dataset_name)
                return self._list_stores(dataset(), dataset_id, query)
            if method == "POST":
                self._authorize(token, "healthcare.dicomStores.create", dataset_name)
                return self._create_store(dataset(), dataset_id, query, body)
            raise _fail(404, "Method not found.")
        store_id = segments[1]
        store_name = f"{dataset_name}/dicomStores/{store_id}"
        if len(segments) == 2:
            if method == "GET":
                self._authorize(token, "healthcare.dicomStores.get", store_name)
                return _json_reply(200, self._store(dataset(), store_id, store_name).resource)
            if method == "DELETE":
                self._authorize(token, "healthcare.dicomStores.delete", store_name)
                with self._lock:
                    if dataset().stores.pop(store_id, None) is None:
                        raise _fail(404, f"DICOM store {store_name} not found.")
                return _json_reply(200, {})
            raise _fail(404, "Method not found.")
        if segments[2] != "dicomWeb":
            raise _fail(404, "Requested entity was not found.")
        permission = {
            "GET": "healthcare.dicomStores.dicomWebRead",
            "POST": "healthcare.dicomStores.dicomWebWrite",
            "DELETE": "healthcare.dicomStores.dicomWebDelete",
        }.get(method)
        if permission is None:
            raise _fail(404, "Method not found.")
        self._authorize(token, permission, store_name)
        store = self._store(dataset(), store_id, store_name)
        base = f"{self.url}/{version}/{store_name}/dicomWeb"
        return self._dicomweb(method, store, store_name, dataset_name, segments[3:], query, headers, body, base)

    def _store(self, dataset: _Dataset, store_id: str, store_name: str) -> _Store:
        with self._lock:
            store = dataset.stores.get(store_id)
        if store is None:
            raise _fail(404, f"DICOM store {store_name} not found.")
        return store

    # -- store management -------------------------------------------------------------------------

    def _list_stores(self, dataset: _Dataset, dataset_id: str, query: dict[str, str]) -> Reply:
        raw_size = query.get("pageSize", "")
        try:
            page_size = int(raw_size) if raw_size else 0
        except ValueError:
            raise _fail(400, f"Invalid value at 'page_size' (TYPE_INT32), \"{raw_size}\"") from None
        if page_size < 0:
            raise _fail(400, "page_size must not be negative.")
        # AIP-158: 0 means the default; GUESS: a larger value is coerced to the maximum, not refused.
        page_size = min(page_size or STORE_PAGE_SIZE_DEFAULT, STORE_PAGE_SIZE_MAX)
        after = ""
        token = query.get("pageToken", "")
        if token:
            try:
                decoded = base64.urlsafe_b64decode(token.encode()).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                decoded = ""
            if not decoded.startswith("after:"):
                raise _fail(400, "Invalid page token.")  # GUESS: Google's exact wording
            after = decoded[len("after:") :]
        with self._lock:
            names = sorted(dataset.stores)  # GUESS: stores listed in ID order
            page = [n for n in names if n > after][: page_size + 1]
            resources = [dataset.stores[n].resource for n in page[:page_size]]
        document: dict[str, Any] = {"dicomStores": resources} if resources else {}
        if len(page) > page_size:
            document["nextPageToken"] = base64.urlsafe_b64encode(f"after:{page[page_size - 1]}".encode()).decode()
        return _json_reply(200, document)

    def _create_store(self, dataset: _Dataset, dataset_id: str, query: dict[str, str], body: bytes) -> Reply:
        store_id = query.get("dicomStoreId")
        if not store_id:
            raise _fail(400, "dicomStoreId is required.")
        if not _valid_store_id(store_id):
            raise _fail(
                400,
                f"Invalid dicom_store_id {store_id!r}: it must be 1-256 characters of letters, numbers, "
                "underscores, dashes and periods.",
            )
        try:
            document = json.loads(body) if body.strip() else {}
        except ValueError:
            raise _fail(400, "Invalid JSON payload received.") from None
        if not isinstance(document, dict):
            raise _fail(400, "Invalid JSON payload received. Expected an object.")
        name = self._store_name(dataset_id, store_id)
        resource = {k: v for k, v in document.items() if k != "name"}  # GUESS: given fields echoed unchecked
        resource["name"] = name
        with self._lock:
            if store_id in dataset.stores:
                raise _fail(409, f"already exists: {name}", "ALREADY_EXISTS")
            dataset.stores[store_id] = _Store(resource)
        return _json_reply(200, resource)

    # -- DICOMweb ---------------------------------------------------------------------------------

    def _dicomweb(
        self,
        method: str,
        store: _Store,
        store_name: str,
        dataset_name: str,
        parts: list[str],
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        base: str,
    ) -> Reply:
        if any(p in _UNSUPPORTED_DICOMWEB for p in parts):
            raise _fail(501, "This DICOMweb resource is not emulated by the stand-in.", "UNIMPLEMENTED")
        shape = tuple(p if p in ("studies", "series", "instances") else "{}" for p in parts)
        uids = [p for p in parts if p not in ("studies", "series", "instances")]
        study = uids[0] if uids else None
        series = uids[1] if len(uids) > 1 else None
        if method == "GET":
            qido = {
                ("studies",): "studies",
                ("series",): "series",
                ("instances",): "instances",
                ("studies", "{}", "series"): "series",
                ("studies", "{}", "instances"): "instances",
                ("studies", "{}", "series", "{}", "instances"): "instances",
            }.get(shape)
            if qido is not None:
                return self._qido(store, qido, study, series, query, headers)
            if shape in (("studies", "{}"), ("studies", "{}", "series", "{}")):
                return self._retrieve(store, (study, series, None), headers, single_allowed=False)
            if shape == ("studies", "{}", "series", "{}", "instances", "{}"):
                return self._retrieve(store, (study, series, uids[2]), headers, single_allowed=True)
        elif method == "POST":
            if shape in (("studies",), ("studies", "{}")):
                return self._stow(store, study, headers, body, base)
        elif method == "DELETE":
            if shape == ("studies", "{}", "series", "{}", "instances", "{}"):
                assert study is not None and series is not None
                return self._delete_instance(store, (study, series, uids[2]))
            if shape in (("studies", "{}"), ("studies", "{}", "series", "{}")):
                assert study is not None
                return self._delete_many(store, dataset_name, study, series)
        raise _fail(404, "Requested entity was not found.")

    # -- the search index --------------------------------------------------------------------------

    def _before_change(self, store: _Store) -> None:
        if store.index is None and self.index_lag > 0:
            store.index = store.true.copy()

    def _after_change(self, store: _Store, op: str, key: Key, instance: _Instance | None, now: float) -> None:
        if store.index is not None:
            store.events.append((now, op, key, instance))

    def _visible(self, store: _Store, now: float) -> _Tree:
        """The tree QIDO sees: changes older than ``index_lag`` applied, newer ones not yet."""
        if store.index is None:
            return store.true
        lag = self.index_lag
        while store.events and store.events[0][0] + lag <= now:
            _, op, key, instance = store.events.popleft()
            if op == "put" and instance is not None:
                store.index.put(key, instance)
            else:
                store.index.remove(key)
        if not store.events:
            store.index = None
            return store.true
        return store.index

    # -- QIDO ---------------------------------------------------------------------------------------

    def _qido(
        self,
        store: _Store,
        level: str,
        study: str | None,
        series: str | None,
        query: dict[str, str],
        headers: dict[str, str],
    ) -> Reply:
        accept = headers.get("accept", "")
        if accept and not any(
            _media_type(item)[0] in ("*/*", "application/*", DICOM_JSON, "application/json")
            for item in _split_header_list(accept)
        ):
            # GUESS: only DICOM JSON results are emulated (Google also offers multipart XML).
            raise _fail(406, f"Unsupported Accept header for search: {accept}.")
        default_limit, max_limit = QIDO_LIMITS[level]
        limit = self._int_param(query, "limit", default_limit, minimum=1)
        limit = min(limit, max_limit)  # GUESS: a limit above the maximum is lowered to it, not refused
        offset = self._int_param(query, "offset", 0, minimum=0)
        if offset > QIDO_MAX_OFFSET:
            raise _fail(400, f"offset must be at most {QIDO_MAX_OFFSET}.")  # GUESS: refused with 400
        includes, include_all = self._includes(query.get("includefield", ""))
        filters = self._filters(query, level)
        rank = _LEVEL_RANK[level]
        with self._lock:
            tree = self._visible(store, time.monotonic())
            candidates = self._candidates(tree, level, study, series, filters)
            if filters:
                candidates = [key for key in candidates if self._matches(tree, key, filters)]
            page = candidates[offset : offset + limit]
            more = len(candidates) > offset + limit
            entries = [
                self._entry(tree, key, rank, study is not None, series is not None, includes, include_all)
                for key in page
            ]
        if not entries:
            return Reply(204, b"", {})  # Google answers a search without matches with 204 No Content
        reply_headers = {"Content-Type": "application/dicom+json; charset=utf-8"}
        if more and self.qido_warning:
            reply_headers["Warning"] = f'299 healthcare.googleapis.com "{MORE_RESULTS_WARNING}"'
        return Reply(200, json.dumps(entries).encode(), reply_headers)

    @staticmethod
    def _int_param(query: dict[str, str], name: str, default: int, *, minimum: int) -> int:
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise _fail(400, f"Invalid {name} value: {raw!r}.") from None
        if value < minimum:
            raise _fail(400, f"Invalid {name} value: {raw!r}.")  # GUESS: refused, not clamped
        return value

    @staticmethod
    def _includes(raw: str) -> tuple[set[str], bool]:
        tags: set[str] = set()
        include_all = False
        for name in (n.strip() for n in raw.split(",") if n.strip()):
            if name.lower() == "all":
                include_all = True
                continue
            tag = _attribute_tag(name)
            if tag is None:
                raise _fail(400, f"Invalid includefield: {name!r} is neither a DICOM tag nor a keyword.")
            tags.add(tag)
        return tags, include_all

    @staticmethod
    def _filters(query: dict[str, str], level: str) -> dict[str, str]:
        filters: dict[str, str] = {}
        for name, value in query.items():
            if name in ("limit", "offset", "includefield", "fuzzymatching") or name in _GOOGLE_STANDARD_PARAMS:
                continue  # GUESS: fuzzymatching is accepted and literal matching done anyway
            tag = _attribute_tag(name)
            keyword = keyword_for_tag(int(tag, 16)) if tag else ""
            if not keyword or keyword not in _SEARCHABLE:
                raise _fail(400, f"Unsupported search parameter: {name!r}.")
            if _TAG_LEVEL[_INDEXED[keyword][0]] > _LEVEL_RANK[level]:
                raise _fail(400, f"{keyword} cannot be used to search for {level}.")
            filters[_INDEXED[keyword][0]] = value
        return filters

    @staticmethod
    def _candidates(
        tree: _Tree, level: str, study: str | None, series: str | None, filters: dict[str, str]
    ) -> list[Any]:
        wanted_studies = filters.get("0020000D")
        if level == "studies":
            if wanted_studies is not None:
                return [s for s in sorted({v.strip() for v in wanted_studies.split(",")}) if s in tree.studies]
            return tree.study_list()
        if level == "series":
            if study is not None:
                return [(study, r) for r in tree.series_list(study)]
            if wanted_studies is not None:
                wanted = sorted({v.strip() for v in wanted_studies.split(",")})
                return [(s, r) for s in wanted for r in tree.series_list(s)]
            return tree.all_series()
        if study is not None and series is not None:
            return [(study, series, i) for i in tree.sop_list(study, series)]
        if study is not None:
            return tree.study_instances(study)
        if wanted_studies is not None:
            return [k for s in sorted({v.strip() for v in wanted_studies.split(",")}) for k in tree.study_instances(s)]
        return tree.all_instances()

    @staticmethod
    def _level_instance(tree: _Tree, key: Any) -> _Instance | None:
        if isinstance(key, str):
            return tree.first_instance(key)
        if len(key) == 2:
            return tree.first_instance(key[0], key[1])
        return tree.get(key)

    def _matches(self, tree: _Tree, key: Any, filters: dict[str, str]) -> bool:
        keys = (key,) if isinstance(key, str) else tuple(key)
        instance = self._level_instance(tree, key)
        for tag, wanted in filters.items():
            if tag in _UID_TAGS:
                position = _UID_TAGS.index(tag)
                actual: str | None = keys[position] if position < len(keys) else None
                if not _value_matches(wanted, actual, uid=True, date=False):
                    return False
                continue
            attrs = instance.attrs if instance is not None and instance.attrs is not None else {}
            if tag == "00080060" and instance is not None and instance.attrs is None:
                actual = "OT"
            else:
                actual = _first_text(attrs.get(tag))
            if not _value_matches(wanted, actual, uid=False, date=tag == "00080020"):
                return False
        return True

    def _entry(
        self,
        tree: _Tree,
        key: Any,
        rank: int,
        study_in_path: bool,
        series_in_path: bool,
        includes: set[str],
        include_all: bool,
    ) -> dict[str, Any]:
        keys = (key,) if isinstance(key, str) else tuple(key)
        # GUESS (per PS3.18, and Google's own clients ask includefield for parent UIDs): a level named in
        # the path is not repeated in the results unless includefield asks for it.
        levels = {rank}
        if rank >= 1 and not study_in_path:
            levels.add(0)
        if rank == 2 and not series_in_path:
            levels.add(1)
        if include_all:
            levels = set(range(rank + 1))
        instance = self._level_instance(tree, key)
        held = self._held_attributes(instance)
        entry: dict[str, dict[str, Any]] = {}
        for position, tag in enumerate(_UID_TAGS[: rank + 1]):
            if position in levels or tag in includes:
                entry[tag] = {"vr": "UI", "Value": [keys[position]]}
        for tag, element in held.items():
            level = _TAG_LEVEL.get(tag, 2)
            if level <= rank and (level in levels or tag in includes):
                entry[tag] = element
        for tag, (level, vr) in _COMPUTED.items():
            if level <= rank and (include_all or tag in includes):
                value = self._computed(tree, keys, tag, instance)
                if value is not None:
                    entry[tag] = {"vr": vr, "Value": value}
        return dict(sorted(entry.items()))

    @staticmethod
    def _held_attributes(instance: _Instance | None) -> dict[str, dict[str, Any]]:
        if instance is None:
            return {}
        held = dict(instance.attrs) if instance.attrs is not None else {"00080060": {"vr": "CS", "Value": ["OT"]}}
        held["00080016"] = {"vr": "UI", "Value": [instance.sop_class]}
        return held

    @staticmethod
    def _computed(tree: _Tree, keys: tuple[str, ...], tag: str, instance: _Instance | None) -> list[Any] | None:
        study = keys[0]
        if tag == "00201206":
            return [len(tree.series_list(study))]
        if tag == "00201208":
            return [len(tree.study_instances(study))]
        if tag == "00080061":
            modalities = set()
            for series in tree.series_list(study):
                first = tree.first_instance(study, series)
                if first is not None:
                    modalities.add(_first_text((first.attrs or {}).get("00080060")) or "OT")
            return sorted(m for m in modalities if m)
        if tag == "00201209" and len(keys) >= 2:
            return [len(tree.sop_list(study, keys[1]))]
        if tag == "00083002" and instance is not None and len(keys) == 3:
            return [instance.transfer_syntax]
        return None

    # -- WADO ---------------------------------------------------------------------------------------

    def _bytes_of(self, key: Key, instance: _Instance) -> bytes:
        if instance.data is not None:
            return instance.data
        with self._lock:
            cached = self._synthetic_cache.get(key)
        if cached is None:
            cached = _synthetic_bytes(key)
            with self._lock:
                self._synthetic_cache[key] = cached
        return cached

    @staticmethod
    def _negotiate(accept: str, *, single_allowed: bool) -> tuple[bool, str] | None:
        """(multipart?, transfer syntax or "*") for the first acceptable Accept item, else None."""
        for item in _split_header_list(accept or "*/*"):
            media_type, params = _media_type(item)
            syntax = params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN).strip()
            if syntax != "*" and syntax not in RETRIEVE_TRANSFER_SYNTAXES:
                continue
            if media_type == "multipart/related":
                if params.get("type", "application/dicom").lower() == "application/dicom":
                    return True, syntax
            elif media_type == "application/dicom" and single_allowed:
                return False, syntax
            elif media_type in ("*/*", "multipart/*"):
                return True, EXPLICIT_VR_LITTLE_ENDIAN  # GUESS: */* gets the documented default (multipart, 1.2.1)
        return None

    def _retrieve(
        self,
        store: _Store,
        target: tuple[str | None, str | None, str | None],
        headers: dict[str, str],
        *,
        single_allowed: bool,
    ) -> Reply:
        accept = headers.get("accept", "")
        negotiated = self._negotiate(accept, single_allowed=single_allowed)
        if negotiated is None:
            raise _fail(406, f"Unsupported Accept header: {accept or '(none)'}.")
        multipart, syntax = negotiated
        study, series, sop = target
        assert study is not None
        with self._lock:
            if sop is not None and series is not None:
                instance = store.true.get((study, series, sop))
                found = [((study, series, sop), instance)] if instance is not None else []
            elif series is not None:
                sops = store.true.sop_list(study, series)
                found = [((study, series, i), store.true.studies[study][series][i]) for i in sops]
            else:
                found = [(k, store.true.studies[k[0]][k[1]][k[2]]) for k in store.true.study_instances(study)]
        if not found:
            what = "Instance" if sop else "Series" if series else "Study"
            raise _fail(404, f"{what} not found.")
        bodies: list[tuple[bytes, str]] = []
        for key, instance in found:
            data = self._bytes_of(key, instance)
            if syntax == "*":
                bodies.append((data, instance.transfer_syntax))
                continue
            transcoded = _transcode(data, syntax)
            if transcoded is None:
                # GUESS: a transcode the stand-in cannot do (to or from a compressed syntax) is 406.
                raise _fail(406, f"Cannot transcode {instance.transfer_syntax} to {syntax}.")
            bodies.append((transcoded, syntax))
        if not multipart:
            data, used = bodies[0]
            return Reply(200, data, {"Content-Type": f"application/dicom; transfer-syntax={used}"})
        # GUESS: Google's exact multipart layout (part headers, closing CRLF, top-level parameters).
        boundary = uuid.uuid4().hex
        chunks = []
        for data, used in bodies:
            head = f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={used}\r\n\r\n"
            chunks.append(head.encode() + data + b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode())
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        if syntax != "*":
            content_type += f"; transfer-syntax={syntax}"
        return Reply(200, b"".join(chunks), {"Content-Type": content_type})

    # -- STOW ---------------------------------------------------------------------------------------

    def _stow(self, store: _Store, study: str | None, headers: dict[str, str], body: bytes, base: str) -> Reply:
        content_type = headers.get("content-type", "")
        if not content_type:
            raise _fail(400, "Content-Type header is required.")
        media_type, params = _media_type(content_type)
        examined: list[_Examined] = []
        if media_type == "application/dicom":
            examined.append(_examine(body))  # Google's own CLI stores single application/dicom bodies
        elif media_type == "multipart/related":
            part_type = params.get("type", "application/dicom").lower()
            if part_type != "application/dicom":
                # GUESS: Google also takes DICOM JSON + bulk data; the stand-in only takes Part-10 parts.
                raise _fail(400, f"Unsupported multipart type {part_type!r}.")
            boundary = params.get("boundary")
            if not boundary:
                raise _fail(400, "The multipart/related Content-Type has no boundary.")
            parts = _split_multipart(body, boundary)
            if parts is None:
                raise _fail(400, "Malformed multipart/related body.")
            if not parts:
                raise _fail(400, "The request has no parts.")
            for part_headers, content in parts:
                part_media = _media_type(part_headers.get("content-type", "application/dicom"))[0]
                if part_media != "application/dicom":
                    examined.append(_Examined(content, refusal=f"Unsupported part Content-Type {part_media!r}."))
                else:
                    examined.append(_examine(content))
        else:
            raise _fail(400, f"Unsupported Content-Type {media_type!r} for a store request.")
        with self._lock:
            results = [self._commit(store, item, study, immediate=False) for item in examined]
        stored = sum(r.stored for r in results)
        # PS3.18 statuses (Google's 409 for a refused instance is observed; 202 for a mix is a GUESS).
        status = 200 if stored == len(results) else 409 if stored == 0 else 202
        studies = {r.uids.study_uid for r in results if r.uids is not None}
        retrieve_study = study or (studies.pop() if len(studies) == 1 else None)
        accept = headers.get("accept", "")
        wants_json = any(
            _media_type(item)[0] in (DICOM_JSON, "application/json") for item in _split_header_list(accept)
        )
        if wants_json:
            document = self._stow_json(results, base, retrieve_study)
            return Reply(status, json.dumps(document).encode(), {"Content-Type": "application/dicom+json"})
        # Google answers in DICOM XML unless DICOM JSON is asked for (observed on real 409s).
        return Reply(status, self._stow_xml(results, base, retrieve_study), {"Content-Type": "application/dicom+xml"})

    def _commit(self, store: _Store, item: _Examined, study: str | None, *, immediate: bool) -> _Result:
        """Store one examined part as STOW does (caller holds the lock)."""
        if item.refusal is not None or item.uids is None:
            return _Result(False, item.sop_class, None, item.sop_uid, item.refusal or "Invalid DICOM instance.")
        uids = item.uids
        if study is not None and uids.study_uid != study:
            # GUESS: refused like other instances, with this detail.
            detail = "The StudyInstanceUID of the instance does not match the study in the request path."
            return _Result(False, item.sop_class, uids, uids.sop_uid, detail)
        key = (uids.study_uid, uids.series_uid, uids.sop_uid)
        existing = store.true.get(key)
        if existing is not None:
            if self._bytes_of(key, existing) == item.data:
                return _Result(True, item.sop_class, uids, uids.sop_uid)  # Google accepts an identical re-upload
            return _Result(False, item.sop_class, uids, uids.sop_uid, CONFLICT_DETAIL)
        assert item.sop_class is not None and item.transfer_syntax is not None
        instance = _Instance(item.sop_class, item.transfer_syntax, item.attrs, item.data)
        if immediate:
            store.true.put(key, instance)
            if store.index is not None:
                store.index.put(key, instance)
        else:
            self._before_change(store)
            store.true.put(key, instance)
            self._after_change(store, "put", key, instance, time.monotonic())
        return _Result(True, item.sop_class, uids, uids.sop_uid)

    @staticmethod
    def _instance_url(base: str, uids: DicomUids) -> str:
        return f"{base}/studies/{uids.study_uid}/series/{uids.series_uid}/instances/{uids.sop_uid}"

    def _stow_json(self, results: list[_Result], base: str, study: str | None) -> dict[str, Any]:
        document: dict[str, Any] = {}
        # Observed: a study RetrieveURL at the top. GUESS: only when the request names, or all parts share, one study.
        if study is not None:
            document["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
        failed, referenced = [], []
        for result in results:
            # GUESS: failed items carry the SOP class/instance UIDs when the part could be parsed (observed
            # failures of unparsable parts carry none).
            item: dict[str, Any] = {}
            if result.sop_class:
                item["00081150"] = {"vr": "UI", "Value": [result.sop_class]}
            if result.sop_uid:
                item["00081155"] = {"vr": "UI", "Value": [result.sop_uid]}
            if result.stored and result.uids is not None:
                item["00081190"] = {"vr": "UR", "Value": [self._instance_url(base, result.uids)]}
                referenced.append(item)
            else:
                item["00081197"] = {"vr": "US", "Value": [FAILURE_PROCESSING]}
                # GUESS: in JSON the private creator is sent as its own element (XML has privateCreator="GOOGLE").
                item[PRIVATE_CREATOR_TAG] = {"vr": "LO", "Value": ["GOOGLE"]}
                item[FAILURE_DETAIL_JSON_TAG] = {"vr": "LT", "Value": [result.detail or ""]}
                failed.append(dict(sorted(item.items())))
        if failed:
            document["00081198"] = {"vr": "SQ", "Value": failed}
        if referenced:
            document["00081199"] = {"vr": "SQ", "Value": referenced}
        return document

    def _stow_xml(self, results: list[_Result], base: str, study: str | None) -> bytes:
        def attribute(tag: str, vr: str, keyword: str, values: list[str], creator: str | None = None) -> str:
            extra = f" privateCreator={quoteattr(creator)}" if creator else ""
            inner = "".join(f'<Value number="{n}">{escape(v)}</Value>' for n, v in enumerate(values, 1))
            return f'<DicomAttribute tag="{tag}" vr="{vr}" keyword="{keyword}"{extra}>{inner}</DicomAttribute>'

        def sequence(tag: str, keyword: str, items: list[str]) -> str:
            inner = "".join(f'<Item number="{n}">{body}</Item>' for n, body in enumerate(items, 1))
            return f'<DicomAttribute tag="{tag}" vr="SQ" keyword="{keyword}">{inner}</DicomAttribute>'

        failed, referenced = [], []
        for result in results:
            parts = []
            if result.sop_class:
                parts.append(attribute("00081150", "UI", "ReferencedSOPClassUID", [result.sop_class]))
            if result.sop_uid:
                parts.append(attribute("00081155", "UI", "ReferencedSOPInstanceUID", [result.sop_uid]))
            if result.stored and result.uids is not None:
                parts.append(attribute("00081190", "UR", "RetrieveURL", [self._instance_url(base, result.uids)]))
                referenced.append("".join(parts))
            else:
                parts.append(attribute("00081197", "US", "FailureReason", [str(FAILURE_PROCESSING)]))
                parts.append(attribute(FAILURE_DETAIL_TAG, "LT", "FailureDetail", [result.detail or ""], "GOOGLE"))
                failed.append("".join(parts))
        body = []
        if study is not None:
            body.append(attribute("00081190", "UR", "RetrieveURL", [f"{base}/studies/{study}"]))
        if failed:
            body.append(sequence("00081198", "FailedSOPSequence", failed))
        if referenced:
            body.append(sequence("00081199", "ReferencedSOPSequence", referenced))
        return ("<NativeDicomModel>" + "".join(body) + "</NativeDicomModel>").encode()

    # -- DELETE -------------------------------------------------------------------------------------

    def _delete_instance(self, store: _Store, key: Key) -> Reply:
        with self._lock:
            self._before_change(store)
            removed = store.true.remove(key)
            if removed is not None:
                self._after_change(store, "remove", key, None, time.monotonic())
        if removed is None:
            raise _fail(404, "Instance not found.")
        return _json_reply(200, {})  # REST reference: "the response body is an empty JSON object"

    def _delete_many(self, store: _Store, dataset_name: str, study: str, series: str | None) -> Reply:
        with self._lock:
            keys = (
                [(study, series, i) for i in store.true.sop_list(study, series)]
                if series is not None
                else list(store.true.study_instances(study))
            )
            if not keys:
                raise _fail(404, f"{'Series' if series else 'Study'} not found.")  # GUESS: 404, no operation
            self._before_change(store)
            now = time.monotonic()
            for key in keys:
                store.true.remove(key)
                self._after_change(store, "remove", key, None, now)
            name = f"{dataset_name}/operations/{next(self._serial)}{secrets.randbelow(10**6)}"
            method = "DeleteSeries" if series else "DeleteStudy"
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            # GUESS: the long-running operation is already done when it is returned.
            self._operations[name] = {
                "name": name,
                "metadata": {
                    "@type": "type.googleapis.com/google.cloud.healthcare.v1.OperationMetadata",
                    "apiMethodName": f"google.cloud.healthcare.v1.dicomweb.DicomWebService.{method}",
                    "createTime": stamp,
                    "endTime": stamp,
                },
                "done": True,
                "response": {"@type": "type.googleapis.com/google.protobuf.Empty"},
            }
        return _json_reply(200, {"name": name})

    # -- direct access for StoreView ----------------------------------------------------------------

    def _view_store(self, dataset_id: str, store_id: str) -> _Store:
        with self._lock:
            return self._require_store(dataset_id, store_id)


class StoreView:
    """Direct access to one store's true state (no HTTP, no index lag) for assertions and seeding."""

    def __init__(self, standin: HealthcareStandIn, dataset_id: str, store_id: str) -> None:
        self._standin = standin
        self.dataset_id = dataset_id
        self.store_id = store_id

    def _store(self) -> _Store:
        return self._standin._view_store(self.dataset_id, self.store_id)

    def store_files(self, paths: Sequence[Path], uids: Sequence[object] | None = None, *,
                    lagging: bool = False) -> list[StowOutcome]:
        """Store files with STOW's rules (same refusals), indexed at once, or with ``lagging``
        as another client's STOW is (searches show them ``index_lag`` seconds later); ``uids``
        are ignored (the server examines what it is sent)."""
        outcomes = []
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                outcomes.append(StowOutcome(Path(path), stored=False, reason=f"cannot read the file ({exc.strerror})"))
                continue
            examined = _examine(data)
            with self._standin._lock:
                result = self._standin._commit(self._store(), examined, None, immediate=not lagging)
            uids = result.uids
            outcomes.append(
                StowOutcome(
                    Path(path),
                    stored=result.stored,
                    study_uid=uids.study_uid if uids else None,
                    series_uid=uids.series_uid if uids else None,
                    sop_uid=result.sop_uid,
                    reason=None if result.stored else result.detail,
                )
            )
        return outcomes

    def delete_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> None:
        """Delete as another client would (DELETE of the instance: the index catches up as usual)."""
        reply = self._standin._delete_instance(self._store(), (study_uid, series_uid, sop_uid))
        assert reply.status == 200, reply

    def studies(self, study_uid: str | None = None) -> Iterator[str]:
        with self._standin._lock:
            listed = list(self._store().true.study_list())
        return iter([s for s in listed if study_uid is None or s == study_uid])

    def series(self, study_uid: str, series_uid: str | None = None) -> Iterator[str]:
        with self._standin._lock:
            listed = list(self._store().true.series_list(study_uid))
        return iter([r for r in listed if series_uid is None or r == series_uid])

    def instances(self, study_uid: str, series_uid: str, sop_uid: str | None = None) -> Iterator[InstanceInfo]:
        with self._standin._lock:
            tree = self._store().true
            found = [
                ((study_uid, series_uid, i), tree.studies[study_uid][series_uid][i])
                for i in tree.sop_list(study_uid, series_uid)
                if sop_uid is None or i == sop_uid
            ]
        infos = [InstanceInfo(k[0], k[1], k[2], len(self._standin._bytes_of(k, inst))) for k, inst in found]
        return iter(infos)

    def instance_bytes(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes | None:
        key = (study_uid, series_uid, sop_uid)
        with self._standin._lock:
            instance = self._store().true.get(key)
        return None if instance is None else self._standin._bytes_of(key, instance)

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str, sink: BinaryIO) -> int:
        data = self.instance_bytes(study_uid, series_uid, sop_uid)
        if data is None:
            raise NotFound(f"instance {sop_uid} is not in series {series_uid}")
        sink.write(data)
        return len(data)

    def all_instances(self) -> list[tuple[str, str, str]]:
        with self._standin._lock:
            return list(self._store().true.all_instances())


__all__ = ["HealthcareStandIn", "Recorded", "StoreView", "google_error"]
