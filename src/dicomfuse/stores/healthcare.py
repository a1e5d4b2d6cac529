"""A Google Cloud Healthcare API dataset: its DICOM stores through the management API, each store
through Google's DICOMweb dialect.

What differs from a plain DICOMweb server, and is handled here:

* every request carries an OAuth access token (:mod:`dicomfuse.stores.auth`), refreshed ahead of
  expiry; a 401 drops the token and sends the request once more;
* stores are listed with ``pageSize``/``nextPageToken`` to the end, created with
  ``POST …/dicomStores?dicomStoreId=ID`` and deleted with ``DELETE …/dicomStores/ID``;
  Google deletes a store *with everything in it*, so :meth:`delete_store` first checks that it
  holds no study;
* QIDO ``limit`` is at most 5,000 for studies and series and 50,000 for instances, paged with
  ``offset`` until a short page (no 15,000 cap);
* WADO asks for ``application/dicom; transfer-syntax=*``: without ``transfer-syntax=*`` Google
  transcodes to explicit VR little endian and the bytes would not be the stored file;
* instances are deleted with DICOMweb ``DELETE`` (Google's own extension);
* 429 ``RESOURCE_EXHAUSTED`` is retried for every method, honouring ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

from dicomfuse.stores.auth import BearerAuth, TokenSource
from dicomfuse.stores.base import (
    STORE_ID_RULE,
    AlreadyExists,
    InvalidName,
    NotEmpty,
    NotFound,
    StoreError,
    Unavailable,
    is_valid_store_id,
)
from dicomfuse.stores.dicomweb import DicomwebStore
from dicomfuse.stores.http import DEFAULT_TIMEOUT, HttpClient, RetryPolicy, Timeout, make_session, safe_path

logger = logging.getLogger(__name__)

STUDY_SERIES_LIMIT = 5_000
INSTANCE_LIMIT = 50_000
STORES_PAGE_SIZE = 1_000
INDEX_SETTLE_S = 5.0
"""Google's search index shows another client's writes "a few seconds" later. A store deleted
with everything in it must look empty this long after it first did."""
RETRIEVE_ACCEPTS = (
    "application/dicom; transfer-syntax=*",
    'multipart/related; type="application/dicom"; transfer-syntax=*',
)
"""Both ask for the stored transfer syntax; the single-part form is Google's convenience."""

ROLE_HINT = "the identity needs the Healthcare DICOM Editor role (roles/healthcare.dicomEditor) on the dataset"
STORE_ADMIN_HINT = (
    "creating and deleting stores needs healthcare.dicomStores.create and .delete: grant the identity the "
    "Healthcare DICOM Store Administrator role (roles/healthcare.dicomStoreAdmin) on the dataset"
)
"""For a 403 to a store's creation or deletion, where the DICOM Editor role is not the answer."""


class HealthcareDataset:
    """One ``…/projects/P/locations/L/datasets/D`` URL as a :class:`~dicomfuse.stores.base.Dataset`.

    ``dataset_url`` is the dataset's full URL (any host, so that private endpoints and test
    stand-ins work). ``tokens`` authorizes requests; None sends none (a proxy that adds them)."""

    lists_sizes = False  # Google's QIDO gives no file sizes

    def __init__(
        self,
        dataset_url: str,
        tokens: TokenSource | None,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        pool_size: int = 16,
        ca_bundle: str | os.PathLike[str] | None = None,
        study_page_size: int = STUDY_SERIES_LIMIT,
        instance_page_size: int = INSTANCE_LIMIT,
        stores_page_size: int = STORES_PAGE_SIZE,
    ) -> None:
        if urlsplit(dataset_url).scheme not in ("http", "https"):
            raise ValueError("a Cloud Healthcare dataset URL starts with https://")
        self.url = dataset_url.rstrip("/")
        self.name = self.url.rsplit("/", 1)[-1]
        session = make_session(pool_size, ca_bundle)
        auth = BearerAuth(tokens) if tokens is not None else None
        session.auth = auth
        self.client = HttpClient(
            session, timeout=timeout, retry=retry, on_unauthorized=auth.unauthorized if auth else None,
            forbidden_hint=ROLE_HINT,
        )
        self.study_page_size = min(study_page_size, STUDY_SERIES_LIMIT)
        self.instance_page_size = min(instance_page_size, INSTANCE_LIMIT)
        self.stores_page_size = min(max(1, stores_page_size), STORES_PAGE_SIZE)
        self.index_settle_s = INDEX_SETTLE_S
        self._lock = threading.Lock()
        self._stores: dict[str, DicomwebStore] = {}  # protected by _lock

    def __repr__(self) -> str:
        return f"HealthcareDataset({safe_path(self.url)!r})"

    # -- stores ------------------------------------------------------------------------------

    def list_stores(self) -> Iterator[str]:
        url = f"{self.url}/dicomStores"
        page_token: str | None = None
        seen_tokens: set[str] = set()
        while True:
            params: dict[str, str | int] = {"pageSize": self.stores_page_size}
            if page_token:
                params["pageToken"] = page_token
            page = _json_object("GET", url, self.client.request("GET", url, params=params))
            for store in page.get("dicomStores") or []:
                name = store.get("name") if isinstance(store, dict) else None
                if isinstance(name, str) and "/dicomStores/" in name:
                    yield name.rsplit("/dicomStores/", 1)[1]
            page_token = page.get("nextPageToken") or None
            if page_token is None or page_token in seen_tokens:
                return
            seen_tokens.add(page_token)

    def open_store(self, store_id: str) -> DicomwebStore:
        with self._lock:
            store = self._stores.get(store_id)
            if store is None:
                store = DicomwebStore(
                    store_id,
                    f"{self._store_url(store_id)}/dicomWeb",
                    self.client,
                    orthanc_rest_url=None,
                    page_size=self.study_page_size,
                    instance_page_size=self.instance_page_size,
                    retrieve_accepts=RETRIEVE_ACCEPTS,
                    silent_caps=False,  # its documented maxima bound the page sizes; it warns when it cuts
                )
                self._stores[store_id] = store
        return store

    def create_store(self, store_id: str) -> None:
        """Create an empty store. A POST is not repeated blindly by the HTTP layer (it sends it
        again only when it never left, or got 429); a 5xx or a lost answer is tried again here,
        with backoff, and a 409 to a repeated attempt means an earlier one did create it."""
        self._check_id(store_id)
        url = f"{self.url}/dicomStores"
        attempts = max(1, self.client.retry.attempts)
        for attempt in range(1, attempts + 1):
            try:
                response = self.client.request(
                    "POST",
                    url,
                    params={"dicomStoreId": store_id},
                    data=b"{}",
                    headers={"Content-Type": "application/json"},
                    idempotent=False,
                    bad_request=InvalidName,
                    forbidden_hint=STORE_ADMIN_HINT,
                )
            except AlreadyExists:
                if attempt > 1 and self._store_exists(store_id):
                    break  # the earlier attempt created it; only its answer was lost
                raise
            except Unavailable as exc:
                if attempt == attempts:
                    raise
                delay = self.client.retry.backoff(attempt)
                logger.info("Creating DICOM store %s failed (%s); trying again in %.1f s", store_id, exc, delay)
                time.sleep(delay)
                continue
            response.close()
            break
        logger.debug("Created DICOM store %s in dataset %s", store_id, self.name)

    def _store_exists(self, store_id: str) -> bool:
        try:
            self.client.request("GET", self._store_url(store_id)).close()
        except NotFound:
            return False
        return True

    def delete_store(self, store_id: str) -> None:
        """Delete a store only when no study is in it: Google would delete its data too. It is
        searched twice, ``INDEX_SETTLE_S`` apart: an instance another client stored just before
        the first search may not show in it yet (Google's search index lags behind writes)."""
        store = self.open_store(store_id)
        for check in range(2):
            if store.has_studies():
                raise NotEmpty(f"store {store_id} holds studies; only an empty store is deleted")
            if check == 0:
                logger.info("Store %s looks empty; searching it again in %.0f s before deleting it (Google's "
                            "search index may not show another client's latest writes yet)", store_id,
                            self.index_settle_s)
                time.sleep(self.index_settle_s)
        response = self.client.request("DELETE", self._store_url(store_id), forbidden_hint=STORE_ADMIN_HINT)
        response.close()
        with self._lock:
            self._stores.pop(store_id, None)
        logger.debug("Deleted DICOM store %s from dataset %s", store_id, self.name)

    def close(self) -> None:
        self.client.close()

    # -- helpers -----------------------------------------------------------------------------

    def _store_url(self, store_id: str) -> str:
        return f"{self.url}/dicomStores/{quote(store_id, safe='')}"

    @staticmethod
    def _check_id(store_id: str) -> None:
        if not is_valid_store_id(store_id):
            raise InvalidName(f"{store_id!r} is not a DICOM store ID ({STORE_ID_RULE})")


def _json_object(method: str, url: str, response: Any) -> dict[str, Any]:
    with response:
        try:
            document = json.loads(response.content or b"{}")
        except ValueError as exc:
            raise StoreError(f"{method} {safe_path(url)}: answer is not JSON") from exc
    if not isinstance(document, dict):
        raise StoreError(f"{method} {safe_path(url)}: answer is not a JSON object")
    return document
