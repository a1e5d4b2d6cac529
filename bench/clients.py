"""The baselines: what a competent DICOMweb client does directly, without the mount.

Each client opens its own ``requests.Session`` (so connection set-up is in its time, as it is in
a fresh mount's) and reports how many requests it made.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

DICOM_JSON = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
FAILED_SOP_SEQUENCE = "00081198"
TIMEOUT = (10, 120)
WADO_HEADERS = {"Accept": WADO_ACCEPT, "Accept-Encoding": "identity"}
"""The exact stored bytes, as the mount asks for them: Orthanc would otherwise gzip the multipart
answer for a client that accepts it (``requests`` does), which measures compression, not transfer."""


@dataclass(frozen=True)
class Outcome:
    """A baseline run: seconds, requests and what it found (a count of items or bytes)."""

    seconds: float
    requests: int
    items: int
    first_byte: float | None = None  # seconds until the first byte of the answer (curl only)


def session(pool: int = 1) -> requests.Session:
    s = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


def uid_of(entry: Any, tag: str) -> str | None:
    try:
        value = entry[tag]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return value if isinstance(value, str) else None


def qido(s: requests.Session, url: str, params: dict[str, Any] | None = None) -> list[Any]:
    response = s.get(url, params=params, headers={"Accept": DICOM_JSON}, timeout=TIMEOUT)
    response.raise_for_status()
    if response.status_code == 204 or not response.content.strip():
        return []
    answer = response.json()
    if not isinstance(answer, list):
        raise RuntimeError(f"QIDO {url}: answer is not a JSON list")
    return answer


def qido_paged(s: requests.Session, url: str, page_size: int, params: dict[str, Any] | None = None,
               ) -> tuple[list[Any], int]:
    """Every entry of a QIDO search, ``limit``/``offset`` pages until a short one; (entries, requests)."""
    entries: list[Any] = []
    pages = 0
    while True:
        page = qido(s, url, {**(params or {}), "limit": page_size, "offset": len(entries)})
        pages += 1
        entries.extend(page)
        if len(page) < page_size:
            return entries, pages


def series_url(dicomweb: str, study_uid: str, series_uid: str) -> str:
    return f"{dicomweb}/studies/{study_uid}/series/{series_uid}"


def list_series(dicomweb: str, study_uid: str, series_uid: str) -> Outcome:
    """One QIDO request for the instances of a series."""
    started = time.perf_counter()
    with session() as s:
        entries = qido(s, f"{series_url(dicomweb, study_uid, series_uid)}/instances")
    return Outcome(time.perf_counter() - started, 1, len(entries))


def list_studies(dicomweb: str, page_size: int) -> Outcome:
    """Every study of the store, paged."""
    started = time.perf_counter()
    with session() as s:
        entries, pages = qido_paged(s, f"{dicomweb}/studies", page_size)
    uids = {uid_of(e, STUDY_UID) for e in entries} - {None}
    return Outcome(time.perf_counter() - started, pages, len(uids))


def list_tree(dicomweb: str, page_size: int) -> Outcome:
    """The whole store tree: store-level ``/instances`` paged, with the study and series UIDs."""
    started = time.perf_counter()
    with session() as s:
        entries, pages = qido_paged(s, f"{dicomweb}/instances", page_size,
                                    {"includefield": "StudyInstanceUID,SeriesInstanceUID"})
    tree = {(uid_of(e, STUDY_UID), uid_of(e, SERIES_UID), uid_of(e, SOP_UID)) for e in entries}
    if any(None in path for path in tree):
        raise RuntimeError("a store-level QIDO entry lacks a study, series or SOP instance UID")
    return Outcome(time.perf_counter() - started, pages, len(tree))


def first_part(body: bytes, content_type: str) -> bytes:
    """The first part of a ``multipart/related`` body."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise RuntimeError(f"multipart answer without a boundary: {content_type}")
    delimiter = b"--" + boundary.encode()
    start = body.index(delimiter)
    headers_end = body.index(b"\r\n\r\n", start) + 4
    end = body.index(b"\r\n" + delimiter, headers_end)
    return body[headers_end:end]


def download_series(dicomweb: str, study_uid: str, series_uid: str, dest: Path, workers: int = 16) -> Outcome:
    """List the series' SOP UIDs with one QIDO, then WADO-RS every instance, ``workers`` at once
    (threads sharing one session with a ``workers``-connection pool), each to ``dest/<uid>.dcm``."""
    started = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    base = series_url(dicomweb, study_uid, series_uid)
    with session(workers) as s:
        sop_uids = [uid_of(e, SOP_UID) for e in qido(s, f"{base}/instances")]

        def fetch(sop_uid: str | None) -> int:
            response = s.get(f"{base}/instances/{sop_uid}", headers=WADO_HEADERS, timeout=TIMEOUT)
            response.raise_for_status()
            data = first_part(response.content, response.headers.get("Content-Type", ""))
            (dest / f"{sop_uid}.dcm").write_bytes(data)
            return len(data)

        with ThreadPoolExecutor(workers) as pool:
            total = sum(pool.map(fetch, sop_uids))
    return Outcome(time.perf_counter() - started, 1 + len(sop_uids), total)


def curl_download(url: str, dest: Path, accept: str = WADO_ACCEPT) -> Outcome:
    """``curl -s -o dest`` of a WADO-RS URL (the multipart body, as it comes), or of any URL
    with another ``accept``, with curl's own time to the first byte of the body."""
    started = time.perf_counter()
    result = subprocess.run(
        ["curl", "-s", "-f", "-o", str(dest), "-H", f"Accept: {accept}", "-w", "%{time_starttransfer}", url],
        check=True, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    return Outcome(seconds, 1, dest.stat().st_size, first_byte=float(result.stdout.strip()))


def orthanc_instance_id(rest_url: str, sop_uid: str) -> str:
    """The Orthanc ID of an instance (``POST /tools/lookup`` of its SOP Instance UID)."""
    with session() as s:
        response = s.post(f"{rest_url}/tools/lookup", data=sop_uid, headers={"Accept": "application/json"},
                          timeout=TIMEOUT)
        response.raise_for_status()
        found = response.json()
    ids = [r["ID"] for r in found if isinstance(r, dict) and r.get("Type") == "Instance" and "ID" in r]
    if len(ids) != 1:
        raise RuntimeError(f"Orthanc's /tools/lookup found {len(ids)} instances for {sop_uid}")
    return str(ids[0])


def stow_parallel(dicomweb: str, paths: Sequence[Path], workers: int = 8) -> Outcome:
    """STOW-RS every file, one instance per request, ``workers`` requests at once."""
    started = time.perf_counter()
    with session(workers) as s:

        def store(path: Path) -> None:
            boundary = uuid.uuid4().hex
            body = b"".join((
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                path.read_bytes(),
                f"\r\n--{boundary}--\r\n".encode(),
            ))
            response = s.post(
                f"{dicomweb}/studies",
                data=body,
                headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                         "Accept": DICOM_JSON},
                timeout=TIMEOUT,
            )
            response.raise_for_status()
            answer = response.json() if response.content.strip() else {}
            if isinstance(answer, dict) and answer.get(FAILED_SOP_SEQUENCE, {}).get("Value"):
                raise RuntimeError(f"STOW refused {path.name}: {answer[FAILED_SOP_SEQUENCE]}")

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(store, paths))
    return Outcome(time.perf_counter() - started, len(paths), len(paths))


def count_instances(dicomweb: str, study_uid: str, series_uid: str) -> int:
    """How many instances the server lists in a series (0 if it does not know the series)."""
    with session() as s:
        response = s.get(f"{series_url(dicomweb, study_uid, series_uid)}/instances",
                         params={"includefield": "SOPInstanceUID"}, headers={"Accept": DICOM_JSON},
                         timeout=TIMEOUT)
    if response.status_code in (204, 404) or not response.content.strip():
        return 0
    response.raise_for_status()
    return len(response.json())
