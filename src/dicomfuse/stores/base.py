"""The small, synchronous protocol every remote store satisfies, its record types and its errors.

A *dataset* holds named DICOM *stores*; a store holds studies ▸ series ▸ instances, all named by
their DICOM UIDs. Concrete stores (``dicomweb``, ``healthcare``, ``local``) only speak their
protocol: they know nothing of paths, caches or errno. The core maps :class:`StoreError`
subclasses to errno in one table (``dicomfuse.core.errors``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

if TYPE_CHECKING:
    from dicomfuse.dicomfile import DicomUids

# ---------------------------------------------------------------------------------------------
# Store IDs

STORE_ID_MAX = 256
STORE_ID_RULE = "1-256 letters, digits, '_', '-', '.'"


def is_valid_store_id(name: str) -> bool:
    """The store ID rule of the Cloud Healthcare API (Unicode letters and numbers, ``_ - .``, at
    most 256 characters), applied to every dataset."""
    return (
        0 < len(name) <= STORE_ID_MAX
        and all(c.isalnum() or c in "_-." for c in name)
        and name not in (".", "..")
    )


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class InstanceInfo:
    """One instance as a listing returns it. ``size`` is the stored file's byte size when the
    server can tell it cheaply (local folder, Orthanc's REST API), else ``None``."""

    study_uid: str
    series_uid: str
    sop_uid: str
    size: int | None = None


@dataclass(frozen=True)
class StowOutcome:
    """What the server said about one file sent by :meth:`Store.store_files`.

    ``stored`` is True only when the server confirmed the SOP instance (Referenced SOP). On a
    refusal ``reason`` is a short human-readable reason (never patient data)."""

    path: Path
    stored: bool
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    reason: str | None = None
    # Refused with HTTP 409: how Google refuses other bytes under UIDs it holds (it also uses
    # 409 for files it cannot parse, so a caller that cares checks what the server holds).
    conflict: bool = False
    # Stored with a WarningReason (0xB000 coercion, 0xB006 elements discarded): the server keeps
    # other bytes than those sent, so the sent file must not stand for the stored one.
    altered: bool = False


# ---------------------------------------------------------------------------------------------
# Errors: one hierarchy, mapped to errno by the core in one place.


class StoreError(Exception):
    """Base of every error a store raises. ``str(err)`` is safe to log (no PHI, no tokens)."""

    status: int | None = None
    """The HTTP status of the server's answer, when the error is an error answer."""


class NotFound(StoreError):
    """The store, study, series or instance does not exist on the server."""


class AlreadyExists(StoreError):
    """A store with that ID exists already, or an instance conflicts with a stored one."""


class InvalidDicom(StoreError):
    """The server (or a local parse) refused the file as DICOM; the message says why."""


class InvalidName(StoreError):
    """A store ID that the server does not accept."""


class NotEmpty(StoreError):
    """A store that still holds studies cannot be deleted or renamed."""


class Forbidden(StoreError):
    """Authentication or permission failure after a token refresh (401/403)."""


class Unsupported(StoreError):
    """The server lacks this capability (e.g. store creation on a plain DICOMweb server)."""


class TooLarge(StoreError):
    """The server refused a request body as too large (413)."""


class Transcoded(StoreError):
    """The server sent an instance in another transfer syntax than the one it stores it in: not
    the stored bytes. The message names the instance and both transfer syntax UIDs."""


class LocalReadError(StoreError):
    """A file being sent could not be read from this computer's disk (no file descriptor left,
    an I/O error): no fault of the file nor of the server; worth sending again later."""


class Unavailable(StoreError):
    """Server error, quota, timeout or dropped connection, after the retries were spent."""

    timed_out: bool = False
    """The server was silent past the connect or read timeout (``--httpTimeout``)."""
    unreachable: bool = False
    """No answer came at all (refused or dropped connection, timeout), as opposed to an error
    answer (5xx, 429): the server or the network is down, not this request at fault."""


# ---------------------------------------------------------------------------------------------
# Protocols


@runtime_checkable
class Store(Protocol):
    """One DICOM store. Listings are iterators that page until the server is exhausted (no
    result cap). The optional UID filter turns a listing into a lookup of one UID that no listing
    showed yet: it yields that one entry, or nothing."""

    name: str

    def studies(self, study_uid: str | None = None) -> Iterator[str]:
        """StudyInstanceUIDs in the store (or just ``study_uid`` if it exists)."""
        ...

    def series(self, study_uid: str, series_uid: str | None = None) -> Iterator[str]:
        """SeriesInstanceUIDs of one study. An absent study yields nothing."""
        ...

    def instances(
        self, study_uid: str, series_uid: str, sop_uid: str | None = None
    ) -> Iterator[InstanceInfo]:
        """Instances of one series. An absent series yields nothing."""
        ...

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str, sink: BinaryIO) -> int:
        """Write the instance's stored bytes (never a transcode) to ``sink`` as they arrive and
        return how many were written. Raises :class:`NotFound` if absent. A truncated or
        broken transfer raises (never returns a short count as success)."""
        ...

    def store_files(self, paths: Sequence[Path], uids: Sequence[DicomUids] | None = None) -> list[StowOutcome]:
        """Send DICOM Part-10 files (STOW-RS or equivalent); one outcome per path, same order.
        A refusal of one file is an outcome, not an exception; a transport failure raises.
        ``uids`` (one per path) are the files' UIDs when the caller has parsed them already (the
        mount checks every file at close): a store may use them instead of parsing each again."""
        ...

    def delete_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> None:
        """Delete one instance. :class:`Unsupported` when the server cannot delete,
        :class:`NotFound` when it is absent."""
        ...


@runtime_checkable
class WalkableStore(Protocol):
    """Optional capability of a :class:`Store`: the whole tree in a few store-level requests.

    A tree walk (``ls -R``, ``find``, ``du``, ``cp -r``) folder by folder costs one request per
    study and one per series; a walk costs one per page of instances. An instance the walk misses
    is absent from its series' listing, so a walk either pages to the end or raises."""

    def walk(self, study_uid: str | None = None) -> Iterator[InstanceInfo]:
        """Every instance of the store (or of one study) with its study and series UIDs, paged to
        the end; sizes when the store knows them cheaply, else None. An absent study yields
        nothing; a store the server cannot walk raises a :class:`StoreError`."""
        ...


@runtime_checkable
class PresenceStore(Protocol):
    """Optional capability of a :class:`Store`: which of some instances of a series it holds, at
    a cost that grows with their number, not with the series' (a write-back batch asks this
    before every upload into a series that may hold thousands)."""

    def present(self, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> set[str]:
        """The subset of ``sop_uids`` the series holds."""
        ...


def instances_present(store: Store, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> set[str]:
    """The subset of ``sop_uids`` a series holds: the store's own answer where it has one
    (:class:`PresenceStore`), else from the series listing."""
    if isinstance(store, PresenceStore):
        return store.present(study_uid, series_uid, sop_uids)
    return listed_present(store, study_uid, series_uid, sop_uids)


def listed_present(store: Store, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> set[str]:
    """The subset of ``sop_uids`` in the series listing (what any store can answer)."""
    return {i.sop_uid for i in store.instances(study_uid, series_uid)} & set(sop_uids)


@runtime_checkable
class Dataset(Protocol):
    """A container of stores: a Cloud Healthcare dataset, a folder of folders, or a single
    DICOMweb server shown as a dataset with one store."""

    name: str

    def list_stores(self) -> Iterator[str]:
        """Store IDs, paged to the end."""
        ...

    def open_store(self, store_id: str) -> Store:
        """A handle on one store (no request needed; a missing store fails on first use)."""
        ...

    def create_store(self, store_id: str) -> None:
        """Create an empty store. :class:`InvalidName`, :class:`AlreadyExists` or
        :class:`Unsupported` when it cannot."""
        ...

    def delete_store(self, store_id: str) -> None:
        """Delete an *empty* store. :class:`NotEmpty` if it holds studies (checked right
        before), :class:`Unsupported` when the server cannot."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def lists_sizes(dataset: Dataset) -> bool:
    """Whether the dataset's listings give instance sizes (an optional ``lists_sizes``
    attribute or property of a dataset; assumed when absent)."""
    return bool(getattr(dataset, "lists_sizes", True))


def write_all(sink: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` (a raw file object may accept only part of a write)."""
    view = memoryview(data)
    with view:
        while len(view):
            written = sink.write(view)
            if written is None or written >= len(view):
                return
            if written <= 0:
                raise OSError("the sink accepted no bytes")
            view = view[written:]
