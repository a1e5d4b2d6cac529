"""A plain DICOMweb server (QIDO-RS, WADO-RS, STOW-RS) as a dataset with one store.

Orthanc gets two extras through its REST API when it is detected (or named): instance sizes in
listings and deletion, which its DICOMweb plugin refuses (405).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, TypeVar
from urllib.parse import quote, unquote, urlsplit
from xml.etree import ElementTree

import requests

if TYPE_CHECKING:
    from dicomfuse.dicomfile import DicomUids  # pydicom is imported only when uploading

from dicomfuse.dicomfile import check_upload
from dicomfuse.stores.base import (
    InstanceInfo,
    InvalidDicom,
    LocalReadError,
    NotFound,
    StoreError,
    StowOutcome,
    Transcoded,
    Unavailable,
    Unsupported,
    listed_present,
)
from dicomfuse.stores.http import (
    DEFAULT_TIMEOUT,
    HttpClient,
    MultipartReader,
    ResumingSink,
    RetryPolicy,
    Timeout,
    TransferCut,
    body_errors,
    error_for_response,
    make_session,
    parse_content_type,
    safe_path,
    server_error_detail,
    without_path_tokens,
    write_all,
)
from dicomfuse.stores.transfer_syntax import (
    WILDCARD,
    StoredSyntaxCheck,
    is_uid,
    transfer_syntax_of,
    with_transfer_syntax,
)
from dicomfuse.tracebacks import describe

logger = logging.getLogger(__name__)
T = TypeVar("T")

STUDY_UID_TAG = "0020000D"
SERIES_UID_TAG = "0020000E"
SOP_UID_TAG = "00080018"
FAILURE_REASON_TAG = "00081197"
WARNING_REASON_TAG = "00081196"  # in a Referenced SOP item: stored, but not as sent (0xB000 coercion…)
FAILED_SOP_SEQUENCE_TAG = "00081198"
REFERENCED_SOP_SEQUENCE_TAG = "00081199"
REFERENCED_SOP_UID_TAG = "00081155"
AVAILABLE_SYNTAX_TAG = "00083002"  # AvailableTransferSyntaxUID: what dcm4chee stores an instance in
# Google adds its own words to a refused instance (FailureDetail 0009,0097 in XML, FailureDetailJSON
# 0009,1097 in JSON). They are never read: a server's text may quote the instance's attributes.

DICOM_JSON = "application/dicom+json"
WALK_INCLUDE_FIELDS = f"includefield={STUDY_UID_TAG}&includefield={SERIES_UID_TAG}"
"""The query a walk adds to its instance searches: both parent UIDs, as repeated parameters
(the form PS3.18, Orthanc and Google all accept; :class:`HttpClient` params hold one value each)."""
RETRIEVE_ACCEPTS = (
    'multipart/related; type="application/dicom"; transfer-syntax=*',
    'multipart/related; type="application/dicom"',
    "application/dicom",
)
"""WADO-RS Accept headers, best first. Orthanc answers 400 to ``application/dicom``."""

GENERIC_PATH_SEGMENTS = frozenset({"dicom-web", "dicomweb", "rs", "wado", "wado-rs", "qido-rs", "stow-rs"})
_API_VERSION = re.compile(r"v\d+(\.\d+)*(beta\d*)?", re.IGNORECASE)
_FORBIDDEN_NAME_CHARACTERS = '<>:"/\\|?*'

DEFAULT_PAGE_SIZE = 1000
ROUND_PAGE = 100  # a short page of a multiple of this many entries may be a server's maximum (1,000 or 5,000)
QIDO_LIMIT_FALLBACKS = (200, 100)
"""Smaller ``limit`` values a search refused with HTTP 400 is sent again with, in turn: Microsoft's
DICOM service refuses a limit above 200."""
DOWNLOAD_CHUNK_BYTES = 256 * 1024  # small enough that a first read waits for little more than its bytes
UPLOAD_CHUNK_BYTES = 1024 * 1024
MAX_EPILOGUE_BYTES = 64 * 1024
STOW_BATCH_FILES = 50
STOW_BATCH_BYTES = 64 * 1024 * 1024
ORTHANC_ID_CACHE = 100_000  # SOP UID -> Orthanc ID entries remembered per store
STUDY_IDS_REUSE_S = 10.0  # a walk reuses the study listing of the last few seconds (find lists the store first)
ORTHANC_LIST_MATCH = 50  # SOP UIDs per /tools/find when asking which of them a series holds
ORTHANC_DETECT_RETRY_S = 60.0  # a detection that could not ask (5xx, refused) is tried again after this
ORTHANC_DETECT_SLOW_S = 3.0  # ... unless it failed only after this long: then never again
ORTHANC_FIND_PAGE = 10_000  # resources per /tools/find page when walking Orthanc's index
SYNTAX_CACHE_ENTRIES = 100_000  # instances whose stored transfer syntax is remembered per store
SYNTAX_TTL_S = 30.0  # a series' stored transfer syntaxes are searched again after this long
WILDCARD_PROBE_EVERY = 50  # a server that refuses transfer-syntax=* is asked for it again every so many reads

OrthancSetting = str | None
"""Orthanc's REST root URL, ``"auto"`` (detect it), or None (never use it)."""


# ---------------------------------------------------------------------------------------------
# Names


def _folder_safe(name: str) -> str:
    """``name`` with the characters Windows forbids in a folder name replaced by ``-``."""
    cleaned = "".join("-" if c in _FORBIDDEN_NAME_CHARACTERS or ord(c) < 32 else c for c in name)
    return cleaned.strip(" .") or "dicomweb"


def host_name(url: str) -> str:
    """The URL's host, without port or credentials, safe as a folder name."""
    return _folder_safe(urlsplit(url).hostname or "dicomweb")


def store_name_from_url(url: str) -> str:
    """The last path segment of ``url`` that is not a generic DICOMweb one, else the host.

    ``http://127.0.0.1:8042/dicom-web`` → ``127.0.0.1``;
    ``http://h:8080/dcm4chee-arc/aets/DCM4CHEE/rs`` → ``DCM4CHEE``."""
    # An access token in the path names no store: a Kheops link's store is "api", as its root's.
    segments = [unquote(s) for s in without_path_tokens(urlsplit(url).path).split("/") if s]
    for segment in reversed(segments):
        # An API version (Microsoft's DICOM service: /v1, /v2) names no store either.
        if segment.lower() not in GENERIC_PATH_SEGMENTS and not _API_VERSION.fullmatch(segment):
            return _folder_safe(segment)
    return host_name(url)


# ---------------------------------------------------------------------------------------------
# DICOM JSON


def _first_value(entry: object, tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON dataset, or None."""
    if not isinstance(entry, dict):
        return None
    element = entry.get(tag)
    if element is None:
        element = entry.get(tag.lower())  # PS3.18 F.2 asks for upper case; some servers write lower
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    return values[0]


def _uid_of(entry: object, tag: str) -> str | None:
    value = _first_value(entry, tag)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _stored_syntax_of(entry: object) -> str | None:
    """The one transfer syntax UID a search entry's AvailableTransferSyntaxUID (0008,3002) gives,
    or None (absent, not a UID, or several: then which is stored is not said)."""
    element = entry.get(AVAILABLE_SYNTAX_TAG) if isinstance(entry, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        return None
    uids = {v.strip() for v in values}
    if len(uids) != 1:
        return None
    uid = uids.pop()
    return sys.intern(uid) if is_uid(uid) else None


def _sequence_items(dataset: object, tag: str) -> list[object]:
    if not isinstance(dataset, dict):
        return []
    element = dataset.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


# ---------------------------------------------------------------------------------------------
# Orthanc's REST API


class OrthancRest:
    """The Orthanc REST calls that do what its DICOMweb cannot (delete) or does slowly (lookups,
    listings with sizes, whole-store walks, streamed downloads)."""

    def __init__(self, client: HttpClient, rest_url: str) -> None:
        self.client = client
        self.url = rest_url.rstrip("/")

    @staticmethod
    def detect(client: HttpClient, base_url: str) -> bool | None:
        """True if ``base_url`` is Orthanc's REST root and lets the mount read its index, False
        if it answered as something else or refused, None if it could not be asked (try again
        later). An authorization plugin or a proxy may let ``/system`` and DICOMweb through and
        refuse ``/tools/find``: without the index the mount reads DICOMweb only (and knows it
        lists no sizes), rather than failing every listing."""
        url = base_url.rstrip("/")
        system: Any = None
        for method, probe, body in (
            ("GET", f"{url}/system", None),
            ("POST", f"{url}/tools/find", json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": "0"},
                                                       "Limit": 1}).encode()),
            ("GET", f"{url}/instances?since=0&limit=1", None),
        ):
            try:
                response = client.request(method, probe, data=body, attempts=1, passthrough=range(300, 600),
                                          headers={"Content-Type": "application/json"} if body else None)
            except Unavailable as exc:
                if exc.timed_out:
                    # Silent past the timeout (a proxy that drops other paths than DICOMweb's):
                    # asked again before each call, every call would wait as long.
                    logger.info("Orthanc's REST API did not answer %s %s within the timeout: reading through "
                                "DICOMweb only, which lists no file sizes", method, safe_path(probe))
                    return False
                logger.debug("Orthanc detection at %s failed: %s", safe_path(probe), exc)
                return None
            with response:
                if response.status_code in (408, 429) or response.status_code >= 500:
                    return None
                if response.status_code != 200 and system is not None:
                    logger.info("Orthanc's REST API refuses %s %s (HTTP %d): reading through DICOMweb only, "
                                "which lists no file sizes", method, safe_path(probe), response.status_code)
                if response.status_code != 200:
                    return False
                if system is None:
                    try:
                        system = _json(response)
                    except ValueError:
                        return False
                    if not (isinstance(system, dict) and "DicomAet" in system and "Version" in system):
                        return False
        return True

    def _find(self, body: dict[str, Any]) -> list[Any]:
        """One ``/tools/find`` request: Orthanc's index, no file read (unlike a QIDO search,
        which computes the attributes it returns from the files)."""
        response = self.client.request(
            "POST",
            f"{self.url}/tools/find",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            idempotent=True,  # a search changes nothing
        )
        with response:
            found = _json(response)
        if not isinstance(found, list):
            raise StoreError(f"POST {safe_path(self.url)}/tools/find: answer is not a JSON list")
        return found

    def find(self, level: str, query: dict[str, str], *, expand: bool = False) -> list[Any]:
        """Resources of ``level`` whose UIDs match ``query`` exactly."""
        return self._find({"Level": level, "Query": query, "Expand": expand})

    def find_all(self, level: str, *, page: int = ORTHANC_FIND_PAGE) -> Iterator[dict[str, Any]]:
        """Every expanded resource of ``level`` in the index, paged with limit/since on its list
        (``GET /studies?expand``). Not ``/tools/find``: where an administrator set Orthanc's
        LimitFindResults or LimitFindInstances, a find returns that many (and one more) and no
        page after it, so a store would show only the first of its studies."""
        plural = {"Study": "studies", "Series": "series", "Instance": "instances"}[level]
        since = 0
        while True:
            found = self._get_json(f"/{plural}?expand&since={since}&limit={page}")
            if not isinstance(found, list):
                raise StoreError(f"GET {safe_path(self.url)}/{plural}: answer is not a JSON list")
            yield from (r for r in found if isinstance(r, dict))
            if len(found) < page:
                return
            since += len(found)

    def series_instances(self, study_uid: str, series_uid: str) -> list[tuple[str, int | None, str]]:
        """(SOPInstanceUID, stored size, Orthanc ID) of every instance of a series, from the
        index in two requests (an absent series: one, and an empty list).

        Orthanc files a series under its patient too: instances of one SeriesInstanceUID with
        different PatientIDs (a corrected ID, a merge) are in as many Orthanc series, all listed
        here. Two Orthanc instances of one SOPInstanceUID (stored by another client with
        different PatientIDs) are one file: the one :func:`chosen` picks, everywhere."""
        found = self.find("Series", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid})
        by_sop: dict[str, tuple[str, int | None, str]] = {}
        for series_id in sorted(str(f) for f in found):
            for entry in self._get_json(f"/series/{quote(series_id, safe='')}/instances"):
                sop_uid = entry.get("MainDicomTags", {}).get("SOPInstanceUID") if isinstance(entry, dict) else None
                if isinstance(sop_uid, str) and isinstance(entry.get("ID"), str):
                    size = entry.get("FileSize")
                    listed = (sop_uid, size if isinstance(size, int) else None, entry["ID"])
                    if sop_uid not in by_sop or chosen(by_sop[sop_uid][2], listed[2]) == listed[2]:
                        by_sop[sop_uid] = listed
        return list(by_sop.values())

    def study_series(self, study_uid: str) -> list[str]:
        """The SeriesInstanceUIDs of a study, from its resource's children (one Orthanc study per
        patient of the study): not cut by LimitFindResults, unlike a find of its series."""
        series: dict[str, None] = {}
        for study_id in sorted(str(f) for f in self.find("Study", {"StudyInstanceUID": study_uid})):
            for entry in self._get_json(f"/studies/{quote(study_id, safe='')}/series"):
                uid = entry.get("MainDicomTags", {}).get("SeriesInstanceUID") if isinstance(entry, dict) else None
                if isinstance(uid, str):
                    series[sys.intern(uid)] = None
        return list(series)

    def find_instances(self, study_uid: str, series_uid: str, sop_uid: str) -> list[dict[str, Any]]:
        """Every expanded instance resource (``ID``, ``FileSize``…) of ``sop_uid``: one, or
        more when Orthanc keeps it under several patients."""
        query = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}
        return [r for r in self.find("Instance", query, expand=True) if isinstance(r, dict) and "ID" in r]

    def find_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> dict[str, Any] | None:
        """The expanded instance resource the mount shows for ``sop_uid`` (:func:`chosen`), or
        None if absent."""
        found = self.find_instances(study_uid, series_uid, sop_uid)
        return min(found, key=lambda r: str(r["ID"])) if found else None

    def present(self, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> set[str]:
        """The subset of ``sop_uids`` in the series, from the index: one find per
        ``ORTHANC_LIST_MATCH`` UIDs (DICOM UID list matching, values joined by backslashes)."""
        wanted = list(dict.fromkeys(sop_uids))  # each UID asked once
        found: set[str] = set()
        for start in range(0, len(wanted), ORTHANC_LIST_MATCH):
            chunk = wanted[start:start + ORTHANC_LIST_MATCH]
            # An administrator's LimitFindInstances cuts a find below the UIDs asked, with no
            # sign: the ones not found are asked again until a find finds none of them (one
            # find when none is there, as for files copied in new). Taking a present instance
            # for a new one would send an overwrite that Orthanc ignores.
            while chunk:
                query = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
                         "SOPInstanceUID": "\\".join(chunk)}
                hits = {uid for entry in self.find("Instance", query, expand=True)
                        if isinstance(entry, dict)
                        and isinstance(uid := entry.get("MainDicomTags", {}).get("SOPInstanceUID"), str)}
                hits &= set(chunk)
                if not hits:
                    break
                found |= hits
                chunk = [uid for uid in chunk if uid not in hits]
        return found & set(wanted)

    def _get_json(self, path: str) -> Any:
        response = self.client.request("GET", f"{self.url}{path}", headers={"Accept": "application/json"})
        with response:
            return _json(response)

    def delete_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> None:
        """Delete an instance (its DICOMweb plugin answers 405 to DELETE), every copy Orthanc
        keeps of it under other patients included: else the file would come back. NotFound if
        absent."""
        found = self.find_instances(study_uid, series_uid, sop_uid)
        if not found:
            raise NotFound(f"instance {sop_uid} is not in series {series_uid}")
        for resource in found:
            try:
                self.client.request("DELETE", f"{self.url}/instances/{quote(str(resource['ID']), safe='')}").close()
            except NotFound:
                continue  # deleted meanwhile by someone else


class _Page(NamedTuple):
    """One QIDO-RS answer."""

    entries: list[object]
    limit: int
    """The ``limit`` it was asked with (after any 400 to a larger one)."""
    more: bool
    """The server said more results can be requested: HTTP 206 Partial Content (dcm4chee-arc-light,
    which adds no warning) or a ``Warning: 299`` (PS3.18; its text varies by server, and a 299
    about something else costs one request more at worst)."""


def _smaller_limit(limit: object) -> int | None:
    """The first of :data:`QIDO_LIMIT_FALLBACKS` below ``limit``, or None."""
    if not isinstance(limit, int):
        return None
    return next((n for n in QIDO_LIMIT_FALLBACKS if n < limit), None)


def chosen(a: str, b: str) -> str:
    """Of two Orthanc IDs of one SOPInstanceUID, the one the mount lists and reads: the same
    in every listing, lookup and walk, so that a size shown is that of the bytes read."""
    return min(a, b)


# ---------------------------------------------------------------------------------------------
# STOW-RS: the files, the streamed body and the response


@dataclass(frozen=True)
class _StowFile:
    index: int
    path: Path
    size: int
    study_uid: str | None
    series_uid: str | None
    sop_uid: str


def _inspect_stow_file(index: int, path: Path, known: DicomUids | None = None) -> _StowFile | StowOutcome:
    """A file's size and UIDs: ``known`` when the caller read them already (the mount checks
    every file at close: parsing it again costs a sender ~0.2 ms of Python per file while the
    mount's own callbacks wait for it), else read from its header. A file that cannot be sent
    becomes a refused outcome."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return StowOutcome(path, stored=False, reason=f"cannot read the file ({exc.strerror or type(exc).__name__})")
    if known is not None:
        return _StowFile(index, path, size, known.study_uid, known.series_uid, known.sop_uid)
    import pydicom  # heavy: only when uploading

    try:
        dataset = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
    except OSError as exc:
        reason = f"cannot read the file ({exc.strerror or type(exc).__name__})"
        return StowOutcome(path, stored=False, reason=reason)
    except Exception as exc:  # pydicom raises many kinds of errors on non-DICOM bytes; they quote values
        logger.debug("%s: pydicom cannot read it (%s)", path.name, describe(exc))
        return StowOutcome(path, stored=False, reason="not a DICOM file")
    meta = getattr(dataset, "file_meta", None)
    sop_uid = str(
        dataset.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else "") or ""
    ).strip()
    study_uid = str(dataset.get("StudyInstanceUID") or "").strip() or None
    series_uid = str(dataset.get("SeriesInstanceUID") or "").strip() or None
    if not sop_uid:
        return StowOutcome(path, stored=False, reason="not a DICOM file (no SOPInstanceUID)")
    return _StowFile(index, path, size, study_uid, series_uid, sop_uid)


def _batches(files: Sequence[_StowFile], max_files: int, max_bytes: int) -> Iterator[list[_StowFile]]:
    """Consecutive batches of at most ``max_files`` files and ``max_bytes`` bytes (a larger
    file goes alone)."""
    batch: list[_StowFile] = []
    batch_bytes = 0
    for item in files:
        if batch and (len(batch) >= max_files or batch_bytes + item.size > max_bytes):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(item)
        batch_bytes += item.size
    if batch:
        yield batch


class MultipartUpload:
    """A ``multipart/related; type="application/dicom"`` request body streamed from files.

    ``len()`` gives the exact byte count, so ``requests`` sends a Content-Length instead of
    chunked encoding; each iteration reads the files afresh (a retried request resends)."""

    def __init__(self, files: Sequence[tuple[Path, int]], boundary: str | None = None) -> None:
        self.files = list(files)
        self.boundary = boundary or f"dicomfuse-{uuid.uuid4().hex}"
        self._part_head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._closing = f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        per_part = len(self._part_head) + 2  # head, then CRLF before the next delimiter
        return sum(size + per_part for _, size in self.files) + len(self._closing)

    def __iter__(self) -> Iterator[bytes]:
        for path, size in self.files:
            yield self._part_head
            yield from _read_exactly(path, size)
            yield b"\r\n"
        yield self._closing


def _read_exactly(path: Path, size: int) -> Iterator[bytes]:
    """The file's bytes in chunks; StoreError if it no longer has ``size`` bytes (a
    Content-Length already went out)."""
    sent = 0
    try:
        with open(path, "rb") as handle:
            while sent < size:
                chunk = handle.read(min(UPLOAD_CHUNK_BYTES, size - sent))
                if not chunk:
                    break
                sent += len(chunk)
                yield chunk
    except OSError as exc:
        raise LocalReadError(f"cannot read {path.name} while sending it ({exc.strerror})") from exc
    if sent != size:
        raise StoreError(f"{path.name} changed size while being sent")


CONFLICT_REASONS = (0x0110, 0x0111, 0x0119)
"""FailureReasons a 409 may give for an instance held with other bytes: Google's processing
failure (the only one it sends), a duplicate, a class-instance conflict. A 409 with another
(dcm4chee's 409 when every file of a request failed: 0xA900, 0xC000…) is a plain refusal:
looking the instance up and sending it again would only repeat it."""

FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0112: "no such object instance",
    0x0117: "invalid object instance",
    0x0119: "class-instance conflict",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0131: "duplicate transaction UID",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}


def failure_reason_text(code: int) -> str:
    """``failure reason 0xA700 (out of resources)`` for a STOW FailureReason code."""
    if code in FAILURE_REASONS:
        meaning = FAILURE_REASONS[code]
    elif 0xA700 <= code <= 0xA7FF:
        meaning = "out of resources"
    elif 0xA900 <= code <= 0xA9FF:
        meaning = "data set does not match SOP class"
    elif 0xC000 <= code <= 0xCFFF:
        meaning = "cannot understand"
    else:
        meaning = "refused"
    return f"failure reason 0x{code:04X} ({meaning})"


@dataclass
class StowResult:
    """What a STOW response body says: stored SOP UIDs and refused ones with a reason."""

    stored: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)  # the FailureReason of a refused one, when given
    altered: set[str] = field(default_factory=set)  # stored with a WarningReason: not byte for byte as sent

    def add_failure(self, sop_uid: str | None, code: object) -> None:
        """A refused instance; its reason is the FailureReason code, in our words (the server's
        free text, which may quote the instance's attributes, is never kept)."""
        if not sop_uid:
            return
        try:
            number = int(str(code).strip(), 0) if not isinstance(code, int) else code
        except ValueError:
            reason = "refused by the server"
        else:
            reason = failure_reason_text(number)
            self.codes[sop_uid] = number
        self.failed[sop_uid] = reason


def parse_stow_json(document: object) -> StowResult:
    """The outcome lists of a DICOM JSON STOW response (a dataset, or a list of one)."""
    if isinstance(document, list):
        document = document[0] if document else {}
    result = StowResult()
    for item in _sequence_items(document, REFERENCED_SOP_SEQUENCE_TAG):
        uid = _uid_of(item, REFERENCED_SOP_UID_TAG)
        if uid:
            result.stored.add(uid)
            if _first_value(item, WARNING_REASON_TAG) is not None:
                result.altered.add(uid)
    for item in _sequence_items(document, FAILED_SOP_SEQUENCE_TAG):
        result.add_failure(_uid_of(item, REFERENCED_SOP_UID_TAG), _first_value(item, FAILURE_REASON_TAG))
    return result


def parse_stow_xml(text: bytes) -> StowResult:
    """The outcome lists of a NativeDicomModel (``application/dicom+xml``) STOW response."""
    root = ElementTree.fromstring(text)
    result = StowResult()

    def attribute(parent: ElementTree.Element, tag: str) -> ElementTree.Element | None:
        for child in parent:
            if child.tag.rsplit("}", 1)[-1] == "DicomAttribute" and child.get("tag", "").upper() == tag:
                return child
        return None

    def first_value(parent: ElementTree.Element, tag: str) -> str | None:
        element = attribute(parent, tag)
        if element is None:
            return None
        for child in element:
            if child.tag.rsplit("}", 1)[-1] == "Value" and child.text:
                return child.text.strip()
        return None

    def items(tag: str) -> list[ElementTree.Element]:
        element = attribute(root, tag)
        if element is None:
            return []
        return [c for c in element if c.tag.rsplit("}", 1)[-1] == "Item"]

    for item in items(REFERENCED_SOP_SEQUENCE_TAG):
        uid = first_value(item, REFERENCED_SOP_UID_TAG)
        if uid:
            result.stored.add(uid)
            if first_value(item, WARNING_REASON_TAG) is not None:
                result.altered.add(uid)
    for item in items(FAILED_SOP_SEQUENCE_TAG):
        result.add_failure(first_value(item, REFERENCED_SOP_UID_TAG), first_value(item, FAILURE_REASON_TAG))
    return result


def parse_stow_response(response: requests.Response) -> StowResult | None:
    """The STOW outcome lists of a response body, or None if it holds none (an error body)."""
    media_type, _ = parse_content_type(response.headers.get("Content-Type"))
    body = response.content
    if not body.strip():
        return None
    try:
        if media_type.endswith("xml"):
            return parse_stow_xml(body)
        document = json.loads(body)
    except (ValueError, ElementTree.ParseError):
        return None
    dataset = document[0] if isinstance(document, list) and document else document
    if not isinstance(dataset, dict) or not (
        REFERENCED_SOP_SEQUENCE_TAG in dataset or FAILED_SOP_SEQUENCE_TAG in dataset
    ):
        return None
    return parse_stow_json(document)


# ---------------------------------------------------------------------------------------------
# The store


class DicomwebStore:
    """One DICOMweb root URL as a :class:`~dicomfuse.stores.base.Store`. Thread-safe."""

    def __init__(
        self,
        name: str,
        root_url: str,
        client: HttpClient,
        *,
        orthanc_rest_url: OrthancSetting = "auto",
        page_size: int = DEFAULT_PAGE_SIZE,
        instance_page_size: int | None = None,
        retrieve_accepts: Sequence[str] = RETRIEVE_ACCEPTS,
        stow_batch_files: int = STOW_BATCH_FILES,
        stow_batch_bytes: int = STOW_BATCH_BYTES,
        silent_caps: bool = True,
    ) -> None:
        """``page_size`` is the QIDO ``limit`` for studies and series, ``instance_page_size``
        (default: the same) for instances; ``retrieve_accepts`` the WADO-RS Accept headers to
        try, best first (a 400/406 moves on to the next). ``silent_caps``: whether the server may
        answer fewer results than ``limit`` before the end without saying so (False for Google,
        whose maxima the page sizes respect and which says when more results remain)."""
        instance_page_size = page_size if instance_page_size is None else instance_page_size
        if min(page_size, instance_page_size) < 1:
            raise ValueError("page sizes must be at least 1")
        if not retrieve_accepts:
            raise ValueError("at least one Accept header is needed")
        self.name = name
        self.root_url = root_url.rstrip("/")
        self.client = client
        self.page_size = page_size
        self.instance_page_size = instance_page_size
        self.retrieve_accepts = tuple(retrieve_accepts)
        self.stow_batch_files = max(1, stow_batch_files)
        self.stow_batch_bytes = max(1, stow_batch_bytes)
        self.silent_caps = silent_caps
        self._paging_lock = threading.Lock()  # protects _longest_page and _limit_ceiling
        self._longest_page: dict[str, int] = {}  # UID tag of a search level -> most entries one page of it held
        self._limit_ceiling: int | None = None  # the largest limit the server accepts, once it refused one
        self._orthanc_lock = threading.Lock()  # protects _orthanc and _orthanc_known
        self._orthanc: OrthancRest | None = None
        self._orthanc_known = orthanc_rest_url is None
        self._orthanc_unsure_at = -math.inf  # when detection last could not ask
        if orthanc_rest_url not in (None, "auto"):
            self._orthanc = OrthancRest(client, str(orthanc_rest_url))
            self._orthanc_known = True
        # Accepts that ask for the stored bytes (transfer-syntax=*), and the others (which let
        # the server choose, so transcode: PS3.18 lets it send Explicit VR Little Endian).
        self._wildcard_accepts = tuple(a for a in self.retrieve_accepts if transfer_syntax_of(a) == WILDCARD)
        self._plain_accepts = tuple(a for a in self.retrieve_accepts if transfer_syntax_of(a) is None)
        self._accept_lock = threading.Lock()  # protects the fields down to _transcode_warned
        self._accept_starts: dict[str, int] = {}  # Accept group -> index of the one that answered last
        self._wildcard_refused = False  # the server's last answer to transfer-syntax=* was a refusal
        self._wildcard_accepted = False  # it accepted transfer-syntax=* at least once
        self._wildcard_skips = 0  # retrieves that did not ask for it since it was last asked for
        self._transcode_warned = False
        self._syntax_lock = threading.Lock()  # protects the fields down to _syntaxes_unlisted
        # (study, series) -> {SOP UID: the stored transfer syntax, None if unknown}, least recently
        # used first, bounded by SYNTAX_CACHE_ENTRIES instances in all.
        # (when searched, {SOP UID: ...}) per series.
        self._syntaxes: OrderedDict[tuple[str, str], tuple[float, dict[str, str | None]]] = OrderedDict()
        self._syntax_entries = 0
        self._syntax_searches: dict[tuple[str, str], threading.Event] = {}  # series being searched
        self._syntaxes_unlisted = False  # the server's searches give no AvailableTransferSyntaxUID
        self._ids_lock = threading.Lock()
        # (study, series, SOP) UIDs -> Orthanc ID (bounded): all three, as one SOP Instance UID may be
        # stored in two series (an edited copy), and each path must read its own file.
        self._orthanc_ids: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._study_ids: tuple[float, dict[str, str]] = (float("-inf"), {})  # (listed at, Orthanc ID -> UID)

    def __repr__(self) -> str:
        return f"DicomwebStore(name={self.name!r}, root={safe_path(self.root_url)!r})"

    # -- Orthanc ----------------------------------------------------------------------------------

    def orthanc(self) -> OrthancRest | None:
        """Orthanc's REST API when configured or detected (detection asks once; when it could
        not ask, a 5xx or a refused connection, it asks again ``ORTHANC_DETECT_RETRY_S`` later,
        not before every call)."""
        with self._orthanc_lock:
            if self._orthanc_known:
                return self._orthanc
            if time.monotonic() - self._orthanc_unsure_at < ORTHANC_DETECT_RETRY_S:
                return None
        base = self._orthanc_base_url()
        started = time.monotonic()
        detected = OrthancRest.detect(self.client, base) if base else False
        if detected is None and time.monotonic() - started >= ORTHANC_DETECT_SLOW_S:
            # Failed only after a long wait (a gateway's 504, a connection held then closed):
            # asked again, it would hold a user's call as long. None for the mount's life.
            logger.info("%s: Orthanc's REST API failed to answer after %.0f s: reading through DICOMweb only, "
                        "which lists no file sizes", self.name, time.monotonic() - started)
            detected = False
        with self._orthanc_lock:
            if detected is None:
                self._orthanc_unsure_at = time.monotonic()
            if detected is not None and not self._orthanc_known:
                self._orthanc = OrthancRest(self.client, base) if detected and base else None
                self._orthanc_known = True
                logger.debug("%s: Orthanc REST API %s", self.name, "found" if detected else "absent")
            return self._orthanc

    def _orthanc_base_url(self) -> str | None:
        head, _, last = self.root_url.rpartition("/")
        return head if last.lower() == "dicom-web" and "://" in head else None

    def _orthanc_failed(self, exc: BaseException, what: str, instead: str) -> None:
        """An Orthanc REST call failed: say so and let the caller ask DICOMweb ``instead``. Not
        when the server was silent past the timeout: its DICOMweb is the same server, and would
        only make the caller wait as long again (the error is raised)."""
        if isinstance(exc, Unavailable) and exc.timed_out:
            raise exc
        logger.debug("%s: %s failed (%s); %s", self.name, what, exc, instead)

    # -- QIDO-RS ----------------------------------------------------------------------------------

    # -- lookups through Orthanc's index -----------------------------------------------------
    #
    # Looking one UID up by QIDO makes Orthanc compute the resource's attributes (reading its
    # files); /tools/find answers from the index. Any failure falls back to QIDO.

    def _ask_orthanc(self, call: Callable[[OrthancRest], T], what: str, instead: str) -> T | None:
        """``call`` on Orthanc's REST API; None when there is none, or it failed (said at DEBUG:
        the caller does ``instead`` through DICOMweb)."""
        orthanc = self.orthanc()
        if orthanc is None:
            return None
        try:
            return call(orthanc)
        except (StoreError, ValueError) as exc:
            self._orthanc_failed(exc, what, instead)
            return None

    def _sized(self, orthanc: OrthancRest, call: Callable[[OrthancRest], T], what: str) -> T:
        """``call`` on Orthanc's REST API, for instances with their sizes. A failure raises: the
        mount was set up for a server whose listings give sizes (the OS keeps them for a
        while), and a DICOMweb search in its place would list every file as empty, which
        ``tar`` and ``cp`` then copy empty. The listing is asked again next time."""
        try:
            return call(orthanc)
        except ValueError as exc:
            raise StoreError(f"{what}: unexpected answer ({type(exc).__name__})") from None
        except StoreError as exc:
            logger.debug("%s: %s failed (%s)", self.name, what, exc)
            raise

    def _orthanc_exists(self, level: str, query: dict[str, str]) -> bool | None:
        return self._ask_orthanc(lambda orthanc: bool(orthanc.find(level, query)), "Orthanc find", "asking DICOMweb")

    def _orthanc_studies(self) -> list[str] | None:
        """Every StudyInstanceUID from Orthanc's index (its study QIDO reads files to compute
        each study's attributes), or None to search DICOMweb instead."""
        orthanc = self.orthanc()
        if orthanc is None:
            return None
        try:
            ids = self._orthanc_study_ids(orthanc)
        except (StoreError, ValueError) as exc:
            self._orthanc_failed(exc, "Orthanc study listing", "asking DICOMweb")
            return None
        self._study_ids = (time.monotonic(), ids)
        return list(dict.fromkeys(ids.values()))  # a study of several patients is several Orthanc studies

    @staticmethod
    def _orthanc_study_ids(orthanc: OrthancRest) -> dict[str, str]:
        """Orthanc ID -> StudyInstanceUID of every study in the index."""
        return {
            r["ID"]: sys.intern(uid)
            for r in orthanc.find_all("Study")
            if isinstance(r.get("ID"), str)
            and isinstance(uid := r.get("MainDicomTags", {}).get("StudyInstanceUID"), str)
        }

    def _remember_ids(self, ids: dict[tuple[str, str, str], str]) -> None:
        with self._ids_lock:
            self._orthanc_ids.update(ids)
            while len(self._orthanc_ids) > ORTHANC_ID_CACHE:
                self._orthanc_ids.popitem(last=False)

    def studies(self, study_uid: str | None = None) -> Iterator[str]:
        if study_uid:
            exists = self._orthanc_exists("Study", {"StudyInstanceUID": study_uid})
            if exists is not None:
                if exists:
                    yield study_uid
                return
        else:
            listed = self._orthanc_studies()
            if listed is not None:
                yield from listed
                return
        filters = {"StudyInstanceUID": study_uid} if study_uid else {}
        yield from self._search(f"{self.root_url}/studies", STUDY_UID_TAG, filters, study_uid, self.page_size)

    def has_studies(self) -> bool:
        """Whether any study is in the store: one QIDO request with ``limit=1``."""
        return bool(self._search_page(f"{self.root_url}/studies", {"limit": 1}, lookup=False).entries)

    def series(self, study_uid: str, series_uid: str | None = None) -> Iterator[str]:
        if series_uid:
            exists = self._orthanc_exists("Series", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid})
            if exists is not None:
                if exists:
                    yield series_uid
                return
        else:
            # Its QIDO (like a find) is cut where LimitFindResults is set: a study's series
            # come from its resource's children instead.
            listed = self._ask_orthanc(lambda orthanc: orthanc.study_series(study_uid),
                                       "Orthanc series listing", "asking DICOMweb")
            if listed is not None:
                yield from listed
                return
        url = f"{self.root_url}/studies/{_segment(study_uid)}/series"
        filters = {"SeriesInstanceUID": series_uid} if series_uid else {}
        yield from self._search(url, SERIES_UID_TAG, filters, series_uid, self.page_size)

    def instances(self, study_uid: str, series_uid: str, sop_uid: str | None = None) -> Iterator[InstanceInfo]:
        orthanc = self.orthanc()
        if orthanc is not None and not sop_uid:
            # Orthanc's index lists a series completely, with sizes, in two requests; its QIDO
            # reads every file of the series for each page (and a page more to see the end).
            listed = self._sized(orthanc, lambda o: o.series_instances(study_uid, series_uid),
                                 "Orthanc series listing")
            self._remember_ids({(study_uid, series_uid, sop): instance_id for sop, _, instance_id in listed})
            for sop, size, _ in listed:
                yield InstanceInfo(study_uid, series_uid, sop, size)
            return
        if orthanc is not None and sop_uid:
            found = self._sized(orthanc, lambda o: o.find_instance(study_uid, series_uid, sop_uid), "Orthanc find")
            if found is not None:
                self._remember_ids({(study_uid, series_uid, sop_uid): str(found["ID"])})
                size = found.get("FileSize")
                yield InstanceInfo(study_uid, series_uid, sop_uid, size if isinstance(size, int) else None)
            return
        url = f"{self._series_url(study_uid, series_uid)}/instances"
        filters = {"SOPInstanceUID": sop_uid} if sop_uid else {}
        uids = self._search(url, SOP_UID_TAG, filters, sop_uid, self.instance_page_size)
        for uid in uids:
            yield InstanceInfo(study_uid, series_uid, uid)  # DICOMweb lists no sizes

    def present(self, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> set[str]:
        """Which of ``sop_uids`` the series holds: Orthanc's index when there is one (its cost
        grows with the UIDs asked, not the series), else the series listing."""
        if not sop_uids:
            return set()
        orthanc = self.orthanc()
        if orthanc is not None:
            try:
                return orthanc.present(study_uid, series_uid, sop_uids)
            except (StoreError, ValueError) as exc:
                self._orthanc_failed(exc, "Orthanc find", "listing the series instead")
        return listed_present(self, study_uid, series_uid, sop_uids)

    def _series_url(self, study_uid: str, series_uid: str) -> str:
        return f"{self.root_url}/studies/{_segment(study_uid)}/series/{_segment(series_uid)}"

    def walk(self, study_uid: str | None = None) -> Iterator[InstanceInfo]:
        """Every instance of the store (``GET {root}/instances``) or of one study
        (``GET {root}/studies/{study}/instances``) with its study and series UIDs, paged with the
        instance page size; sizes are None. On Orthanc the store is walked through its REST index
        instead, with sizes (a failure raises: see :meth:`_sized`).

        ``includefield`` asks for both parent UIDs: Orthanc returns them anyway, but PS3.18
        lets a server leave out a level named in the path unless asked. An entry lacking a UID
        (or naming another study) is skipped. A 404 at the store level raises (the server cannot
        search instances store-wide: list folder by folder there); an absent study yields nothing."""
        orthanc = self.orthanc() if study_uid is None else None
        if orthanc is not None:
            yield from self._sized(orthanc, self._walk_orthanc, "walking Orthanc's index")
            return
        if study_uid is None:
            url = f"{self.root_url}/instances?{WALK_INCLUDE_FIELDS}"
        else:
            url = f"{self.root_url}/studies/{_segment(study_uid)}/instances?{WALK_INCLUDE_FIELDS}"
        entries = self._search_entries(url, SOP_UID_TAG, {}, self.instance_page_size, lookup=False,
                                       parents=(STUDY_UID_TAG, SERIES_UID_TAG))
        skipped = 0
        for sop_uid, entry in entries:
            study = _uid_of(entry, STUDY_UID_TAG)
            series = _uid_of(entry, SERIES_UID_TAG)
            if study is None or series is None or (study_uid is not None and study != study_uid):
                skipped += 1
                continue
            # Every instance of a series repeats its two parent UIDs: share one string each.
            yield InstanceInfo(sys.intern(study), sys.intern(series), sop_uid)
        if skipped:
            logger.debug("%s: walk skipped %d entries lacking a parent UID or of another study", self.name, skipped)

    def _walk_orthanc(self, orthanc: OrthancRest) -> list[InstanceInfo]:
        """The whole tree from Orthanc's index, sizes included: paged finds of series and
        instances (and of studies, unless the store was just listed) that read no file, where its
        instance QIDO reads every one."""
        # The study listing that came just before (find, ls -R and du list the store first) has
        # the studies already: asking again would cost the walk a third of its time. Taken, not
        # kept: a store of 100,000 studies need not hold their Orthanc IDs until its next listing.
        (listed_at, studies), self._study_ids = self._study_ids, (float("-inf"), {})
        if time.monotonic() - listed_at > STUDY_IDS_REUSE_S:
            studies = self._orthanc_study_ids(orthanc)
        series: dict[str, tuple[str, str]] = {}
        for r in orthanc.find_all("Series"):
            uid = r.get("MainDicomTags", {}).get("SeriesInstanceUID")
            parent = studies.get(r.get("ParentStudy"))
            if isinstance(uid, str) and parent is not None and "ID" in r:
                series[r["ID"]] = (parent, sys.intern(uid))
        out: dict[tuple[str, str, str], tuple[InstanceInfo, str]] = {}
        for r in orthanc.find_all("Instance"):
            sop = r.get("MainDicomTags", {}).get("SOPInstanceUID")
            parents = series.get(r.get("ParentSeries"))
            if isinstance(sop, str) and parents is not None:
                size = r.get("FileSize")
                key, instance_id = (parents[0], parents[1], sop), str(r["ID"])
                if key in out and chosen(out[key][1], instance_id) != instance_id:
                    continue  # a copy under another patient: see OrthancRest.series_instances
                out[key] = (InstanceInfo(*key, size if isinstance(size, int) else None), instance_id)
        self._remember_ids({key: instance_id for key, (_, instance_id) in out.items()})
        return [info for info, _ in out.values()]

    def _search(
        self, url: str, uid_tag: str, filters: dict[str, str], wanted: str | None, page_size: int
    ) -> Iterator[str]:
        """UIDs of a QIDO-RS search (just ``wanted`` when given: a server may ignore the filter),
        paged to the end."""
        for uid, _ in self._search_entries(url, uid_tag, filters, page_size, lookup=bool(filters)):
            if wanted is None:
                yield uid
            elif uid == wanted:
                yield uid
                return

    def _search_entries(
        self, url: str, uid_tag: str, filters: dict[str, str], page_size: int, *, lookup: bool,
        parents: tuple[str, ...] = (),
    ) -> Iterator[tuple[str, object]]:
        """Each entry of a QIDO-RS search with its UID (``uid_tag``), once per UID (per UID and
        the ``parents`` tags' UIDs: a store-wide search of instances holds one SOP UID once per
        series holding it), paged with limit/offset until a short page that is the end, or an
        empty one.

        A short page is not the end when the server says more results can be requested (PS3.18's
        ``Warning: 299``), or when it may be the server's own maximum (:meth:`_may_be_cut`):
        then the next page is asked for (offset + the entries received). A page that brings no
        new UID ends the search too: a server that ignores limit/offset answers everything every
        time, and must not make this loop forever."""
        seen: set[object] = set()
        offset = 0
        while True:
            params: dict[str, str | int] = {**filters, "limit": self._page_limit(page_size), "offset": offset}
            page = self._search_page(url, params, lookup=lookup)
            fresh = 0
            for entry in page.entries:
                uid = _uid_of(entry, uid_tag)
                identity = (uid, *(_uid_of(entry, tag) for tag in parents)) if parents else uid
                if uid is None or identity in seen:
                    continue
                seen.add(identity)
                fresh += 1
                yield uid, entry
            if fresh == 0:
                if page.entries and not seen:
                    logger.warning("%s: GET %s: %d search results, none with its UID (%s): not DICOM JSON as "
                                   "PS3.18 F.2 writes it; listed as empty", self.name, safe_path(url),
                                   len(page.entries), uid_tag)
                return
            count = len(page.entries)
            may_be_cut = self._may_be_cut(uid_tag, count)
            if count < page.limit and not page.more and not may_be_cut:
                return
            offset += count

    def _page_limit(self, page_size: int) -> int:
        """The ``limit`` to search with: ``page_size``, or less if the server refused as much."""
        with self._paging_lock:
            ceiling = self._limit_ceiling
        return page_size if ceiling is None else min(page_size, ceiling)

    def _lower_limit(self, refused: int, accepted: int) -> None:
        """Search with at most ``accepted`` results per page from now on (said once at INFO)."""
        with self._paging_lock:
            if self._limit_ceiling is not None and self._limit_ceiling <= accepted:
                return
            self._limit_ceiling = accepted
        logger.info("%s: the server refused a search with limit=%d (HTTP 400) and accepted limit=%d; "
                    "searching %d results per page from now on", self.name, refused, accepted, accepted)

    def _may_be_cut(self, level: str, count: int) -> bool:
        """Whether a page of ``count`` entries at ``level`` (a UID tag), if shorter than the
        ``limit`` asked and without a word from the server, may have been cut at the server's own
        maximum rather than be the end; records ``count`` for the pages to come.

        A server that lowers ``limit`` to its maximum answers exactly that many entries on every
        page it cuts, and never more on any page: a page shorter than the longest this level has
        answered is the end. Any other may be the cap (dcm4chee's ``qidoMaxNumberOfResults``,
        say), and costs one request more: the next page, empty at the end. So a level's first
        listing costs one more, later ones only when their last page is as long as any before
        (a store of fewer studies than ``limit``: each listing of it), none once a page of the
        full ``limit`` came back. A server that says when it cuts (Google, ``silent_caps``
        False) or does not cut (Orthanc, found through its REST API) is taken at its word, but
        for a round-numbered page: a maximum of 1,000 or 5,000 met without a warning."""
        with self._paging_lock:
            longest = self._longest_page.get(level, 0)
            self._longest_page[level] = max(longest, count)
        with self._orthanc_lock:
            orthanc = self._orthanc_known and self._orthanc is not None
        if not self.silent_caps or orthanc:
            return count % ROUND_PAGE == 0
        return count >= longest

    def _search_page(self, url: str, params: dict[str, str | int], *, lookup: bool) -> _Page:
        """One QIDO-RS page (see :class:`_Page`). 204 and (below the store level, or for a
        lookup) 404 are empty. A 400 to a ``limit`` larger than the smallest of
        :data:`QIDO_LIMIT_FALLBACKS` is asked again with the next smaller one, which the store
        keeps to if accepted; a 400 to the smallest raises (the server refuses something else)."""
        asked = params.get("limit")
        while True:
            smaller = _smaller_limit(params.get("limit"))
            response = self.client.request("GET", url, params=params, headers={"Accept": DICOM_JSON},
                                           passthrough=(404,) if smaller is None else (400, 404))
            if response.status_code != 400 or smaller is None:
                break
            response.close()
            logger.debug("%s: GET %s: HTTP 400 to limit=%s; asking with limit=%d",
                         self.name, safe_path(url), params.get("limit"), smaller)
            params = {**params, "limit": smaller}
        limit = params.get("limit")
        if isinstance(asked, int) and isinstance(limit, int) and limit < asked:
            self._lower_limit(asked, limit)
        sent_limit = limit if isinstance(limit, int) else sys.maxsize
        with response:
            if response.status_code == 404:
                if self._is_store_level(url) and not lookup:
                    raise error_for_response("GET", url, response)
                return _Page([], sent_limit, False)
            if response.status_code == 204 or not response.content.strip():
                return _Page([], sent_limit, False)
            more = response.status_code == 206 or bool(_WARNING_299.search(response.headers.get("Warning") or ""))
            try:
                page = _json(response)
            except ValueError as exc:
                raise StoreError(f"GET {safe_path(url)}: answer is not JSON") from exc
        if not isinstance(page, list):
            raise StoreError(f"GET {safe_path(url)}: answer is not a JSON list")
        return _Page(page, sent_limit, more)

    def _is_store_level(self, url: str) -> bool:
        """Whether a search URL names the whole store (``{root}/studies``, ``{root}/instances``),
        where a 404 means the store (or that search) is missing rather than an empty result."""
        return url.split("?", 1)[0] in (f"{self.root_url}/studies", f"{self.root_url}/instances")

    # -- WADO-RS ----------------------------------------------------------------------------------

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str, sink: BinaryIO) -> int:
        """The stored bytes into ``sink``. An answer cut off in the middle is asked for again
        (up to the retry policy's attempts); the sink gets each byte once."""
        resuming = ResumingSink(sink, sop_uid)
        attempts = max(1, self.client.retry.attempts)
        silent_before = False
        for attempt in range(1, attempts + 1):
            resuming.restart()
            try:
                self._retrieve_once(study_uid, series_uid, sop_uid, resuming)  # type: ignore[arg-type]
                return resuming.finish()
            except TransferCut as exc:
                if attempt == attempts or (exc.timed_out and silent_before):
                    raise  # a hung server is asked once more, not for every attempt
                silent_before = silent_before or exc.timed_out
                delay = self.client.retry.backoff(attempt)
                logger.info("%s: download of %s cut after %d bytes (%s); asking again in %.2f s",
                            self.name, sop_uid, resuming.delivered, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retrieve_once(self, study_uid: str, series_uid: str, sop_uid: str, sink: BinaryIO) -> int:
        """One download: Orthanc's REST file when there is one, else WADO-RS.

        WADO-RS asks for ``transfer-syntax=*`` (the stored bytes) first. A server that refuses it
        is asked for the instance's stored transfer syntax by its UID, learnt from a QIDO search
        of its series (AvailableTransferSyntaxUID, one search per series), and what it sends is
        checked against that syntax. Only when the server does not say what it stores are the
        Accepts that let it transcode used, with a warning (once per store)."""
        orthanc = self.orthanc()
        if orthanc is not None:
            written = self._retrieve_from_orthanc(orthanc, study_uid, series_uid, sop_uid, sink)
            if written is not None:
                return written
        try:
            return self._retrieve_wado(study_uid, series_uid, sop_uid, sink)
        except Transcoded:
            # Nothing was written. The syntax remembered may be stale (the instance was replaced
            # since): searched again, once.
            if not self._forget_syntax(study_uid, series_uid, sop_uid):
                raise
            logger.debug("%s: %s came in another transfer syntax than remembered; searching again", self.name, sop_uid)
            return self._retrieve_wado(study_uid, series_uid, sop_uid, sink)

    def _retrieve_wado(self, study_uid: str, series_uid: str, sop_uid: str, sink: BinaryIO) -> int:
        url = f"{self._series_url(study_uid, series_uid)}/instances/{_segment(sop_uid)}"
        refusal: StoreError | None = None
        known = self._known_syntax(study_uid, series_uid, sop_uid)
        if self._wildcard_accepts and self._ask_wildcard(known):
            outcome = self._retrieve_with(url, "wildcard", self._wildcard_accepts, sop_uid, known, sink)
            with self._accept_lock:
                self._wildcard_refused = isinstance(outcome, StoreError)
                self._wildcard_accepted = self._wildcard_accepted or not self._wildcard_refused
            if not isinstance(outcome, StoreError):
                return outcome
            refusal = outcome
        stored = known if known is not None else self._stored_syntax(study_uid, series_uid, sop_uid)
        if stored is not None:
            exact = tuple(dict.fromkeys(with_transfer_syntax(a, stored) for a in self.retrieve_accepts))
            outcome = self._retrieve_with(url, "exact", exact, sop_uid, stored, sink)
            if not isinstance(outcome, StoreError):
                return outcome
            refusal = outcome
        if self._plain_accepts:
            # Verified against the stored syntax when known; else possibly transcoded.
            outcome = self._retrieve_with(url, "plain", self._plain_accepts, sop_uid, stored, sink)
            if not isinstance(outcome, StoreError):
                if stored is None:
                    self._warn_transcoding()
                return outcome
            refusal = outcome
        assert refusal is not None
        raise refusal

    def _retrieve_with(
        self, url: str, group: str, accepts: Sequence[str], sop_uid: str, stored: str | None, sink: BinaryIO
    ) -> int | StoreError:
        """Ask with each of ``accepts`` (the one of the ``group`` that answered last first) until
        one is not refused (400, 406); the bytes written, or the error of the last refusal. With
        ``stored``, an answer in another transfer syntax raises :class:`Transcoded`."""
        with self._accept_lock:
            first = min(self._accept_starts.get(group, 0), len(accepts) - 1)
        order = [first, *(i for i in range(len(accepts)) if i != first)]
        refusal: StoreError | None = None
        for index in order:
            headers = {"Accept": accepts[index], "Accept-Encoding": "identity"}
            response = self.client.request("GET", url, headers=headers, stream=True, passthrough=(400, 406))
            with response:
                if response.status_code in (400, 406):
                    logger.debug("%s: HTTP %d to Accept %s", self.name, response.status_code, accepts[index])
                    refusal = error_for_response("GET", url, response)
                    continue
                check = None if stored is None else StoredSyntaxCheck(sink, sop_uid, stored)
                written = _copy_instance(url, response, sink, check)
            if index != first:
                with self._accept_lock:
                    self._accept_starts[group] = index
            return written
        assert refusal is not None
        return refusal

    def _ask_wildcard(self, known: str | None) -> bool:
        """Whether to ask for ``transfer-syntax=*``: yes unless the server refused it last time
        and either the stored syntax is known already (asking for it is as good, and one request)
        or the server never accepted it (then every ``WILDCARD_PROBE_EVERY``-th retrieve still
        asks, to find a server that refuses it for some instances only). A server that accepted
        it before is asked first whenever the stored syntax is unknown: it may accept it again."""
        with self._accept_lock:
            if not self._wildcard_refused:
                return True
            if known is not None:
                return False
            if self._wildcard_accepted:
                return True
            self._wildcard_skips += 1
            if self._wildcard_skips >= WILDCARD_PROBE_EVERY:
                self._wildcard_skips = 0
                return True
            return False

    def _warn_transcoding(self) -> None:
        with self._accept_lock:
            if self._transcode_warned:
                return
            self._transcode_warned = True
            accept = self._plain_accepts[self._accept_starts.get("plain", 0)]
        logger.warning(
            "%s: the server refuses transfer-syntax=* and does not say in which transfer syntax it stores "
            "instances (AvailableTransferSyntaxUID): files read may be transcoded by the server, not the stored "
            "bytes (Accept: %s)",
            self.name,
            accept,
        )

    # -- stored transfer syntaxes -------------------------------------------------------------

    def _known_syntax(self, study_uid: str, series_uid: str, sop_uid: str) -> str | None:
        """The stored transfer syntax of an instance if a search told it already (no request)."""
        with self._syntax_lock:
            listed = self._series_syntaxes((study_uid, series_uid))
            return None if listed is None else listed.get(sop_uid)

    def _series_syntaxes(self, key: tuple[str, str]) -> dict[str, str | None] | None:
        """Caller holds _syntax_lock. What the last search of a series said, if it is recent: an
        instance stored again in another transfer syntax meanwhile would be asked for in the old
        one, which a server that transcodes on request sends without a word."""
        searched = self._syntaxes.get(key)
        if searched is None:
            return None
        searched_at, listed = searched
        if time.monotonic() - searched_at > SYNTAX_TTL_S:
            del self._syntaxes[key]
            self._syntax_entries -= len(listed)
            return None
        return listed

    def _forget_syntax(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """Drop an instance's remembered transfer syntax; whether one was remembered."""
        with self._syntax_lock:
            searched = self._syntaxes.get((study_uid, series_uid))
            listed = None if searched is None else searched[1]
            if listed is None or listed.get(sop_uid) is None:
                return False
            del listed[sop_uid]
            self._syntax_entries -= 1
            return True

    def _stored_syntax(self, study_uid: str, series_uid: str, sop_uid: str) -> str | None:
        """The transfer syntax the server stores an instance in, from its AvailableTransferSyntaxUID
        (0008,3002): searched for the whole series once (concurrent callers wait for one search),
        then for the instance alone if the series' search did not list it. None when the server
        does not say (or says several)."""
        key = (study_uid, series_uid)
        while True:
            with self._syntax_lock:
                if self._syntaxes_unlisted:
                    return None
                listed = self._series_syntaxes(key)
                if listed is not None:
                    self._syntaxes.move_to_end(key)
                    if sop_uid in listed:
                        return listed[sop_uid]
                    break
                searching = self._syntax_searches.get(key)
                mine = searching is None
                if searching is None:
                    searching = self._syntax_searches[key] = threading.Event()
            if not mine:
                searching.wait()
                continue
            try:
                found = self._search_syntaxes(study_uid, series_uid, {})
                self._remember_syntaxes(key, found)
            finally:
                with self._syntax_lock:
                    del self._syntax_searches[key]
                searching.set()
            if sop_uid in found:
                return found[sop_uid]  # what was just searched, whatever its age says
            with self._syntax_lock:
                if self._syntaxes_unlisted:
                    return None
            break
        found = self._search_syntaxes(study_uid, series_uid, {"SOPInstanceUID": sop_uid})
        self._remember_syntaxes(key, {sop_uid: found.get(sop_uid)})
        return found.get(sop_uid)

    def _search_syntaxes(self, study_uid: str, series_uid: str, filters: dict[str, str]) -> dict[str, str | None]:
        """SOP UID -> stored transfer syntax (None: not said) of a series' instances. A server
        that cannot answer (other than by being unavailable) or names no transfer syntax for any
        instance is not asked again."""
        url = f"{self._series_url(study_uid, series_uid)}/instances?includefield={AVAILABLE_SYNTAX_TAG}"
        try:
            entries = dict(self._search_entries(url, SOP_UID_TAG, filters, self.instance_page_size, lookup=True))
        except Unavailable:
            raise
        except StoreError as exc:
            logger.debug("%s: cannot search stored transfer syntaxes (%s)", self.name, exc)
            entries, unlisted = {}, True
        else:
            unlisted = False
        found = {uid: _stored_syntax_of(entry) for uid, entry in entries.items()}
        if found and all(syntax is None for syntax in found.values()):
            logger.debug("%s: the server's searches name no one stored transfer syntax", self.name)
            unlisted = True
        if unlisted:
            with self._syntax_lock:
                self._syntaxes_unlisted = True
        return found

    def _remember_syntaxes(self, key: tuple[str, str], found: dict[str, str | None]) -> None:
        with self._syntax_lock:
            listed = self._syntaxes.setdefault(key, (time.monotonic(), {}))[1]
            self._syntaxes.move_to_end(key)
            self._syntax_entries += len(found.keys() - listed.keys())
            listed.update(found)
            while self._syntax_entries > SYNTAX_CACHE_ENTRIES and len(self._syntaxes) > 1:
                _, (_, dropped) = self._syntaxes.popitem(last=False)
                self._syntax_entries -= len(dropped)

    def _retrieve_from_orthanc(
        self, orthanc: OrthancRest, study_uid: str, series_uid: str, sop_uid: str, sink: BinaryIO
    ) -> int | None:
        """The stored file from Orthanc's REST API, which streams from its first byte (its
        WADO-RS builds the whole answer before sending any). None: use WADO-RS instead (only
        when nothing was written yet)."""
        key = (study_uid, series_uid, sop_uid)
        with self._ids_lock:
            instance_id = self._orthanc_ids.get(key)
        try:
            if instance_id is None:
                found = orthanc.find_instance(study_uid, series_uid, sop_uid)
                if found is None:
                    raise NotFound(f"instance {sop_uid} is not in series {series_uid}")
                instance_id = str(found["ID"])
                self._remember_ids({key: instance_id})
            url = f"{orthanc.url}/instances/{quote(instance_id, safe='')}/file"
            response = self.client.request(
                "GET", url, headers={"Accept": "application/dicom", "Accept-Encoding": "identity"}, stream=True
            )
        except NotFound:
            with self._ids_lock:
                self._orthanc_ids.pop(key, None)
            raise
        except (StoreError, ValueError, KeyError) as exc:
            self._orthanc_failed(exc, "Orthanc file download", "using WADO-RS")
            return None
        with response:
            return _copy_instance(url, response, sink)

    # -- STOW-RS ----------------------------------------------------------------------------------

    def store_files(self, paths: Sequence[Path], uids: Sequence[DicomUids] | None = None) -> list[StowOutcome]:
        if uids is not None and len(uids) != len(paths):
            raise ValueError(f"{len(uids)} UIDs for {len(paths)} files")
        outcomes: list[StowOutcome | None] = [None] * len(paths)
        sendable: list[_StowFile] = []
        for index, path in enumerate(paths):
            inspected = _inspect_stow_file(index, Path(path), None if uids is None else uids[index])
            if isinstance(inspected, StowOutcome):
                outcomes[index] = inspected
            else:
                sendable.append(inspected)
        for batch in _batches(sendable, self.stow_batch_files, self.stow_batch_bytes):
            for item, outcome in self._stow(batch):
                outcomes[item.index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _stow(self, batch: list[_StowFile], *, again: bool = True) -> list[tuple[_StowFile, StowOutcome]]:
        """Send one batch; one outcome per file. A 413 splits the batch in two.

        STOW is a POST: HttpClient never repeats it once bytes may have gone out. When the answer
        is lost (the connection dropped, the server failed), whether the server stored the
        files is unknown: each one is looked up, those found count as stored, and the missing
        ones are sent once more. So a file is stored once, never twice, never silently lost."""
        url = f"{self.root_url}/studies"
        upload = MultipartUpload([(item.path, item.size) for item in batch])
        try:
            response = self.client.request(
                "POST",
                url,
                data=upload,
                headers={"Content-Type": upload.content_type, "Accept": DICOM_JSON},
                idempotent=False,
                passthrough=(400, 409, 413, 415),
                bad_request=InvalidDicom,
            )
        except Unavailable as exc:
            if not again:
                raise
            return self._stow_unknown(batch, exc)
        with response:
            status = response.status_code
            if status == 413 and len(batch) > 1:
                middle = len(batch) // 2
                return self._stow(batch[:middle]) + self._stow(batch[middle:])
            result = parse_stow_response(response) or StowResult()
            refusal = None
            conflict = status == 409
            if status >= 400:
                detail = server_error_detail(response)
                refusal = f"HTTP {status}" + (f": {detail}" if detail else "")
        logger.debug(
            "STOW of %d files: HTTP %d, %d stored, %d failed",
            len(batch),
            status,
            len(result.stored),
            len(result.failed),
        )
        outcomes = [(item, _stow_outcome(item, result, refusal, conflict)) for item in batch]
        if len(batch) > 1 and status < 400:
            # Some stored, some not (PS3.18: 202, or 200 from some servers): a file the server holds
            # already fails with a processing failure or a duplicate in such an answer, where a
            # request of its own gets a 409 that says it. Such files are sent again alone. If that
            # answer is lost, the error stands (the caller sends the batch again): looking the file
            # up would find the instance it was refused for, and take the refusal for a success.
            return [(item, outcome) if outcome.stored or result.codes.get(item.sop_uid) not in CONFLICT_REASONS
                    else self._stow([item], again=False)[0] for item, outcome in outcomes]
        return outcomes

    def _stow_unknown(self, batch: list[_StowFile], cause: Unavailable) -> list[tuple[_StowFile, StowOutcome]]:
        """The STOW's answer was lost: look each file up; send the missing ones again, with the
        HTTP retries' backoff and number of attempts (a server restarting loses more than one
        answer), looking up again after each lost one. Never sent to a server holding it."""
        found: list[tuple[_StowFile, StowOutcome]] = []
        missing = batch
        attempts = max(1, self.client.retry.attempts - 1)  # its attempts count the first send
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(self.client.retry.backoff(attempt - 1))
            logger.info("STOW of %d file(s) got no answer (%s); checking which were stored", len(missing), cause)
            still: list[_StowFile] = []
            for item in missing:
                present = next(iter(self.instances(item.study_uid, item.series_uid, item.sop_uid)), None)
                if present is None:
                    still.append(item)
                else:
                    found.append((item, _stow_outcome(item, StowResult(stored={item.sop_uid}), None)))
            if not still:
                return found
            logger.info("Sending %d file(s) the server does not hold yet again", len(still))
            try:
                return found + self._stow(still, again=False)
            except Unavailable as exc:
                if attempt == attempts:
                    raise
                cause, missing = exc, still
        raise cause  # not reached: the last attempt returns or raises

    # -- delete -----------------------------------------------------------------------------------

    def delete_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> None:
        orthanc = self.orthanc()
        if orthanc is not None:
            orthanc.delete_instance(study_uid, series_uid, sop_uid)
            with self._ids_lock:
                self._orthanc_ids.pop((study_uid, series_uid, sop_uid), None)
            return
        url = f"{self._series_url(study_uid, series_uid)}/instances/{_segment(sop_uid)}"
        try:
            response = self.client.request("DELETE", url, passthrough=(405, 501))
        except NotFound:
            # 404: the instance is gone, or the server has no such route (dcm4chee deletes only
            # rejected studies): taking the second for the first would make rm a silent no-op,
            # and a later copy of a new version would count as new, ignored by the server.
            if next(iter(self.instances(study_uid, series_uid, sop_uid)), None) is None:
                raise
            raise Unsupported(f"DELETE {safe_path(url)}: HTTP 404 while the instance is there, "
                              "the server does not delete instances") from None
        with response:
            if response.status_code in (405, 501):
                raise Unsupported(f"DELETE {safe_path(url)}: HTTP {response.status_code}, the server does not delete")


def _stow_outcome(item: _StowFile, result: StowResult, refusal: str | None, conflict: bool = False) -> StowOutcome:
    if item.sop_uid in result.stored:
        stored, reason = True, None
    elif item.sop_uid in result.failed:
        stored, reason = False, result.failed[item.sop_uid]
    else:
        stored, reason = False, refusal or "server did not confirm"
    return StowOutcome(
        item.path,
        stored=stored,
        study_uid=item.study_uid,
        series_uid=item.series_uid,
        sop_uid=item.sop_uid,
        reason=reason,
        conflict=conflict and not stored and result.codes.get(item.sop_uid, CONFLICT_REASONS[0]) in CONFLICT_REASONS,
        altered=stored and item.sop_uid in result.altered,
    )


_NAMED_MEDIA_TYPES = frozenset({
    "text/html", "text/plain", "text/xml", "application/json", "application/xml", "application/dicom+json",
    "application/dicom+xml", "application/zip", "image/jpeg", "image/png",
})
"""Unexpected Content-Types an error names (an HTML login page, say); any other header value is
server text, and is not quoted."""


def _copy_instance(
    url: str, response: requests.Response, sink: BinaryIO, check: StoredSyntaxCheck | None = None
) -> int:
    """Stream a WADO-RS answer into ``sink``: the first part of a multipart body, or a
    single-part body; raise if it is cut short. With ``check``, an answer in another transfer
    syntax than the stored one raises :class:`Transcoded` before any byte reaches ``sink``."""
    if response.status_code == 204:
        # No content: dcm4chee answers so for UIDs it does not hold (an instance deleted by
        # another client since it was listed). Never a file of 0 bytes.
        raise NotFound(f"GET {safe_path(url)}: HTTP 204, no instance")
    media_type, params = parse_content_type(response.headers.get("Content-Type"))
    target: BinaryIO = sink if check is None else check  # type: ignore[assignment]
    with body_errors("GET", url):
        if media_type.startswith("multipart/"):
            if check is not None:
                check.declared(params.get("transfer-syntax"), "its Content-Type")
            on_first_part = None if check is None else check.part_headers
            written = _copy_first_part(url, response, params.get("boundary", ""), target, on_first_part)
        elif media_type in ("application/dicom", "application/octet-stream", ""):
            if check is not None:
                check.declared(params.get("transfer-syntax"), "its Content-Type")
            written = _copy_single_part(url, response, target)
        else:
            shown = media_type if media_type in _NAMED_MEDIA_TYPES else "of another kind"
            raise StoreError(f"GET {safe_path(url)}: unexpected Content-Type {shown}")
    if written == 0:  # a DICOM file has at least its data set; an empty answer is not one
        raise StoreError(f"GET {safe_path(url)}: HTTP {response.status_code} with an empty body, no instance")
    if check is not None:
        check.finish()
    if not media_type.startswith("multipart/") and "Content-Length" not in response.headers \
            and not getattr(response.raw, "chunked", False):
        _check_whole(url, sink, written)
    return written


def _copy_first_part(
    url: str,
    response: requests.Response,
    boundary: str,
    sink: BinaryIO,
    on_first_part: Callable[[Mapping[str, str]], None] | None = None,
) -> int:
    if not boundary:
        raise StoreError(f"GET {safe_path(url)}: multipart answer without a boundary")
    reader = MultipartReader(boundary, sink, on_first_part)
    epilogue = 0
    for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
        if reader.done:
            epilogue += len(chunk)  # drained so the connection can be reused
            if epilogue > MAX_EPILOGUE_BYTES:
                break
            continue
        reader.feed(chunk)
    return reader.finish()


_CUT_PROBLEMS = ("truncated DICOM file", "truncated or corrupt DICOM", "no readable data set")


def _check_whole(url: str, sink: BinaryIO, written: int) -> None:
    """A single-part body ended by closing the connection (HTTP/1.0 style: no Content-Length,
    not chunked): a connection cut in the middle looks the same as its end, so the DICOM file
    is checked instead: one whose last element runs past its end was cut (the rest is asked
    for again). Only where the sink is a file (the instance cache)."""
    path = getattr(sink, "path", None)
    if path is None:
        return
    problem = check_upload(Path(path))
    # Only what a cut body looks like: an element running past the end, a parse that fails, no
    # data set after the file meta. Not the upload check's other doubts (an image SOP class
    # without pixel data is a valid spectroscopy object, served as stored).
    if isinstance(problem, str) and problem.startswith(_CUT_PROBLEMS):
        raise TransferCut(f"GET {safe_path(url)}: body ended by the connection after {written} bytes, "
                          "and the DICOM file is cut short")


def _copy_single_part(url: str, response: requests.Response, sink: BinaryIO) -> int:
    written = 0
    for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
        write_all(sink, chunk)
        written += len(chunk)
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and not response.headers.get("Content-Encoding") and written < int(declared):
        raise TransferCut(f"GET {safe_path(url)}: body ended after {written} of {declared} bytes (truncated)")
    return written


_WARNING_299 = re.compile(r"(?:^|,)\s*299\b")
"""A ``Warning`` header holding a warning with code 299 (values are comma-separated)."""


def _json(response: requests.Response) -> Any:
    """The JSON body (``json.loads`` on bytes: no charset guessing on short bodies)."""
    return json.loads(response.content)


def _segment(uid: str) -> str:
    """A UID as one URL path segment (UIDs are digits and dots; quote anything else)."""
    return quote(uid, safe="")


# ---------------------------------------------------------------------------------------------
# The dataset


class DicomwebDataset:
    """A DICOMweb server as a dataset holding exactly one store, named after its root URL.

    ``session`` may carry authentication; :meth:`close` closes it (given or made here).
    ``orthanc_rest_url``: Orthanc's REST root, ``"auto"`` to detect it (``GET {base}/system``
    where base is the root URL without ``/dicom-web``), or None to never use it."""

    def __init__(
        self,
        root_url: str,
        session: requests.Session | None = None,
        *,
        orthanc_rest_url: OrthancSetting = "auto",
        timeout: Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        pool_size: int = 16,
        ca_bundle: str | os.PathLike[str] | None = None,
        stow_batch_files: int = STOW_BATCH_FILES,
        stow_batch_bytes: int = STOW_BATCH_BYTES,
    ) -> None:
        scheme = urlsplit(root_url).scheme
        if scheme not in ("http", "https"):
            raise ValueError("a DICOMweb root URL starts with http:// or https://")
        self.root_url = root_url.rstrip("/")
        self.name = host_name(self.root_url)
        if session is None:
            session = make_session(pool_size, ca_bundle)
        self.client = HttpClient(session, timeout=timeout, retry=retry)
        self.store = DicomwebStore(
            store_name_from_url(self.root_url),
            self.root_url,
            self.client,
            orthanc_rest_url=orthanc_rest_url,
            page_size=page_size,
            stow_batch_files=stow_batch_files,
            stow_batch_bytes=stow_batch_bytes,
        )

    def __repr__(self) -> str:
        return f"DicomwebDataset(name={self.name!r}, store={self.store.name!r})"

    def list_stores(self) -> Iterator[str]:
        yield self.store.name

    @property
    def lists_sizes(self) -> bool:
        """Listings give sizes only through Orthanc's REST API (QIDO-RS has no file size)."""
        return self.store.orthanc() is not None

    def open_store(self, store_id: str) -> DicomwebStore:
        if store_id != self.store.name:
            raise NotFound(f"no store {store_id!r} on this DICOMweb server (it has {self.store.name!r})")
        return self.store

    def create_store(self, store_id: str) -> None:
        raise Unsupported("a DICOMweb server cannot create stores")

    def delete_store(self, store_id: str) -> None:
        raise Unsupported("a DICOMweb server cannot delete stores")

    def close(self) -> None:
        self.client.close()
