"""A folder of folders of DICOM files as a dataset: each immediate sub-folder of the root is a store.

Reading: every Part-10 file below a store folder (any name, any depth; suffix ``.dcm``, none, or
numeric as in ``1.2.840…3.1``) whose header holds Study, Series and SOP Instance UIDs is an
instance. Other files are skipped (DEBUG log). Hidden entries (names starting with ``.``) are
ignored, which is also how in-flight temporary files stay invisible.

Writing: :meth:`LocalStore.store_files` lays files out as ``<store>/<Study>/<Series>/<SOP>.dcm``,
atomically (temporary file in the same folder, fsync, ``os.replace``), and removes any other copy
of the same SOP so an instance is never listed twice.

Index and refresh: each store keeps an index study ▸ series ▸ SOP ▸ file(s), built on first use.
At most once per ``rescan_interval`` seconds (1 s by default) a use re-checks the folder tree:
one ``stat`` per directory; only directories whose mtime changed are listed again, and only new or
changed files (size or mtime) are parsed again. Files added, replaced or removed by other
processes are therefore seen within about one interval. Directory mtimes closer than two seconds
to the check are treated as unsettled and re-listed at the next check (mtime granularity can be
coarse), so a file still being written is picked up once it settles. A file rewritten in place
(same name, no rename) changes no directory mtime: sizes come from a ``stat`` at listing time so
they are always right, and a full check (every folder listed, every file stat'ed, still only
changed files parsed) every ``full_rescan_interval`` seconds (60 s) catches changed UIDs.

Logs name stores and UIDs, never file or folder names below a store (they may hold patient names).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import pydicom

from dicomfuse.dicomfile import UID_KEYWORDS, DicomUids, check_upload, is_uid, uids_of
from dicomfuse.stores.base import (
    STORE_ID_RULE,
    AlreadyExists,
    Forbidden,
    InstanceInfo,
    InvalidName,
    NotEmpty,
    NotFound,
    StoreError,
    StowOutcome,
    Unavailable,
    is_valid_store_id,
    write_all,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
DEFAULT_RESCAN_INTERVAL = 1.0
_T = TypeVar("_T")
DEFAULT_FULL_RESCAN_INTERVAL = 60.0
_RACY_WINDOW_NS = 2_000_000_000
_UNSETTLED = -1  # a recorded mtime that never matches: list the directory again at the next check

# ---------------------------------------------------------------------------------------------
# Names


def _is_plain_name(name: str) -> bool:
    """A single, visible path component (what a store folder can be called)."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


# Names Windows gives to devices in every folder, and its rule that a name cannot end in a dot:
# a store so named could not be made, or would be made under another name.
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def _validate_new_store_id(store_id: str, windows: bool = os.name == "nt") -> None:
    if not is_valid_store_id(store_id):
        raise InvalidName(f"invalid store ID {store_id!r}: use {STORE_ID_RULE}")
    if store_id.startswith("."):
        raise InvalidName(f"invalid store ID {store_id!r}: a leading '.' would hide the store")
    if windows and (store_id.endswith(".") or store_id.split(".")[0].lower() in _WINDOWS_DEVICES):
        raise InvalidName(f"invalid store ID {store_id!r} for a folder on Windows (a device name or a final '.')")


def _may_be_dicom_name(name: str) -> bool:
    """``x.dcm`` (any case), no suffix, or a numeric suffix (files named after their UID)."""
    suffix = os.path.splitext(name)[1][1:]
    return suffix == "" or suffix.lower() == "dcm" or suffix.isdigit()


def _store_error(exc: OSError, action: str) -> StoreError:
    """The store error for a local OS failure; the message holds no file content."""
    if isinstance(exc, PermissionError):
        return Forbidden(f"{action}: permission denied")
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{action}: no such file or folder")
    return Unavailable(f"{action}: {exc.strerror or type(exc).__name__}")


# ---------------------------------------------------------------------------------------------
# Scanning


def _read_indexed_uids(path: Path) -> DicomUids | None:
    """The UIDs of a file met while scanning (header only), or None to skip it."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(UID_KEYWORDS))
        uids = uids_of(ds)
    except Exception as exc:  # pydicom raises many types on garbage; a scan must never crash
        log.debug("skipped a file: not readable as DICOM (%s)", type(exc).__name__)
        return None
    if isinstance(uids, str):
        log.debug("skipped a DICOM file: %s", uids)
        return None
    return uids


# ---------------------------------------------------------------------------------------------
# Index


@dataclass(frozen=True)
class _FileState:
    size: int
    mtime_ns: int
    uids: DicomUids | None


@dataclass(frozen=True)
class _DirState:
    mtime_ns: int
    subdirs: tuple[str, ...]
    files: dict[str, _FileState]


class _Index:
    """Study ▸ series ▸ SOP ▸ the files holding it. Not thread-safe: its owner locks."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._uids: dict[Path, DicomUids] = {}
        self._tree: dict[str, dict[str, dict[str, set[Path]]]] = {}
        self._by_sop: dict[str, set[Path]] = {}

    def add(self, path: Path, uids: DicomUids) -> None:
        if self._uids.get(path) == uids:
            return
        self.remove(path)
        self._uids[path] = uids
        series = self._tree.setdefault(uids.study_uid, {}).setdefault(uids.series_uid, {})
        series.setdefault(uids.sop_uid, set()).add(path)
        self._by_sop.setdefault(uids.sop_uid, set()).add(path)

    def remove(self, path: Path) -> None:
        uids = self._uids.pop(path, None)
        if uids is None:
            return
        study = self._tree[uids.study_uid]
        series = study[uids.series_uid]
        series[uids.sop_uid].discard(path)
        if not series[uids.sop_uid]:
            del series[uids.sop_uid]
            if not series:
                del study[uids.series_uid]
                if not study:
                    del self._tree[uids.study_uid]
        self._by_sop[uids.sop_uid].discard(path)
        if not self._by_sop[uids.sop_uid]:
            del self._by_sop[uids.sop_uid]

    def clear(self) -> None:
        self._uids.clear()
        self._tree.clear()
        self._by_sop.clear()

    def studies(self) -> list[str]:
        return sorted(self._tree)

    def series(self, study_uid: str) -> list[str]:
        return sorted(self._tree.get(study_uid, {}))

    def sops(self, study_uid: str, series_uid: str) -> dict[str, Path]:
        """SOP UID → the file that serves it (the canonical copy when there are several)."""
        instances = self._tree.get(study_uid, {}).get(series_uid, {})
        return {sop: self._primary(paths) for sop, paths in sorted(instances.items())}

    def file_of(self, study_uid: str, series_uid: str, sop_uid: str) -> Path | None:
        """The file that serves one SOP, as :meth:`sops` would give it, without touching the
        rest of the series (a read of each file of a big series must not cost the series)."""
        paths = self._tree.get(study_uid, {}).get(series_uid, {}).get(sop_uid)
        return self._primary(paths) if paths else None

    def copies(self, study_uid: str, series_uid: str, sop_uid: str) -> list[Path]:
        return sorted(self._tree.get(study_uid, {}).get(series_uid, {}).get(sop_uid, ()))

    def copies_of_sop(self, sop_uid: str) -> list[Path]:
        return sorted(self._by_sop.get(sop_uid, ()))

    def _primary(self, paths: set[Path]) -> Path:
        if len(paths) == 1:
            return next(iter(paths))  # the usual case: no canonical path to build
        return min(paths, key=lambda p: (p != self.canonical_path(self._uids[p]), str(p)))

    def canonical_path(self, uids: DicomUids) -> Path:
        return self._root / uids.study_uid / uids.series_uid / f"{uids.sop_uid}.dcm"


def _one_sop(index: _Index, study_uid: str, series_uid: str, sop_uid: str) -> dict[str, Path]:
    path = index.file_of(study_uid, series_uid, sop_uid)
    return {} if path is None else {sop_uid: path}


def _diff(old: dict[Path, _DirState], new: dict[Path, _DirState]) -> tuple[list[Path], list[tuple[Path, DicomUids]]]:
    """Indexed files that disappeared or changed, and files to (re-)index."""
    removed: list[Path] = []
    added: list[tuple[Path, DicomUids]] = []
    for folder in old.keys() | new.keys():
        before, after = old.get(folder), new.get(folder)
        if before is after:
            continue
        old_files = before.files if before else {}
        new_files = after.files if after else {}
        for name, state in old_files.items():
            if state.uids and (name not in new_files or new_files[name].uids != state.uids):
                removed.append(folder / name)
        for name, state in new_files.items():
            if state.uids and (name not in old_files or old_files[name].uids != state.uids):
                added.append((folder / name, state.uids))
    return removed, added


# ---------------------------------------------------------------------------------------------
# Store


class LocalStore:
    """One store: a folder whose DICOM files, at any depth, are its instances."""

    def __init__(
        self,
        root: Path,
        *,
        rescan_interval: float = DEFAULT_RESCAN_INTERVAL,
        full_rescan_interval: float = DEFAULT_FULL_RESCAN_INTERVAL,
    ) -> None:
        self.name = root.name
        self._root = root
        self._rescan_interval = rescan_interval
        self._full_rescan_interval = full_rescan_interval
        # _scan_lock serialises whoever changes the index (a scan, or the index update after a
        # write) and guards _dirs. Order: _scan_lock before _lock.
        self._scan_lock = threading.Lock()
        self._dirs: dict[Path, _DirState] = {}
        # "Never": a monotonic clock counts from boot, so 0.0 is less than an interval ago for
        # the first hour after a machine starts (a lookup of a new study then found nothing).
        self._full_checked_at = -math.inf
        # _lock guards _index, _exists, _built and _checked_at; held only for dict work.
        self._lock = threading.Lock()
        self._index = _Index(root)
        self._exists = False
        self._built = False
        self._checked_at = -math.inf
        # _layout_lock makes "mkdir + create temp file" and "rmdir of an empty folder" exclusive.
        self._layout_lock = threading.Lock()

    # -- listings -------------------------------------------------------------------------

    def studies(self, study_uid: str | None = None) -> Iterator[str]:
        found = self._listed(lambda index: index.studies(), study_uid)
        return iter(found if study_uid is None else [u for u in found if u == study_uid])

    def series(self, study_uid: str, series_uid: str | None = None) -> Iterator[str]:
        found = self._listed(lambda index: index.series(study_uid), series_uid)
        return iter(found if series_uid is None else [u for u in found if u == series_uid])

    def instances(self, study_uid: str, series_uid: str, sop_uid: str | None = None) -> Iterator[InstanceInfo]:
        if sop_uid is None:
            sops = self._listed(lambda index: index.sops(study_uid, series_uid), None)
        else:
            sops = self._listed(lambda index: _one_sop(index, study_uid, series_uid, sop_uid), sop_uid)
        infos = []
        for sop, path in sops.items():
            try:
                size = path.stat().st_size
            except OSError:
                continue  # removed since the last check
            infos.append(InstanceInfo(study_uid, series_uid, sop, size))
        return iter(infos)

    def walk(self, study_uid: str | None = None) -> Iterator[InstanceInfo]:
        """Every instance of the store (or of one study) from one read of the index, sizes from a
        ``stat`` as :meth:`instances` gives them (files removed since the last check are left
        out). A study the index lacks checks the folder tree again first, as a lookup does."""

        def read(index: _Index) -> dict[str, dict[str, dict[str, Path]]]:
            studies = index.studies() if study_uid is None else [study_uid]
            return {
                study: {series: index.sops(study, series) for series in index.series(study)}
                for study in studies
                if index.series(study)
            }

        for study, series_sops in self._listed(read, study_uid).items():
            for series, sops in series_sops.items():
                for sop, path in sops.items():
                    try:
                        size = path.stat().st_size
                    except OSError:
                        continue  # removed since the last check
                    yield InstanceInfo(study, series, sop, size)

    # -- instances ------------------------------------------------------------------------

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str, sink: BinaryIO) -> int:
        with self._fresh_index() as index:
            path = index.file_of(study_uid, series_uid, sop_uid)
        if path is None:
            raise NotFound(f"instance {sop_uid} not found in store {self.name!r}")
        try:
            source = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"instance {sop_uid} not found in store {self.name!r}") from None
        except OSError as exc:
            raise _store_error(exc, f"reading instance {sop_uid}") from exc
        with source:
            written = _copy_to_sink(source, sink, f"reading instance {sop_uid}")
        log.debug("retrieved %s from %s: %d bytes", sop_uid, self.name, written)
        return written

    def store_files(self, paths: Sequence[Path], uids: Sequence[DicomUids] | None = None) -> list[StowOutcome]:
        del uids  # like a server, the folder checks each file it is given itself
        with self._fresh_index():
            pass  # NotFound if the store folder is gone
        return [self._store_one(Path(path)) for path in paths]

    def delete_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> None:
        with self._fresh_index() as index:
            copies = index.copies(study_uid, series_uid, sop_uid)
        removed = [path for path in copies if self._unlink(path, f"deleting instance {sop_uid}")]
        for path in copies:
            self._prune_empty_folders(path)
        with self._scan_lock, self._lock:
            for path in copies:
                self._index.remove(path)
        if not removed:
            raise NotFound(f"instance {sop_uid} not found in store {self.name!r}")
        log.debug("deleted %s from %s (%d file(s))", sop_uid, self.name, len(removed))

    # -- writing helpers ------------------------------------------------------------------

    def _store_one(self, source: Path) -> StowOutcome:
        parsed = check_upload(source)
        if isinstance(parsed, str):
            log.info("store %s refused a file: %s", self.name, parsed)
            return StowOutcome(path=source, stored=False, reason=parsed)
        with self._lock:
            target = self._index.canonical_path(parsed)
            stale = [p for p in self._index.copies_of_sop(parsed.sop_uid) if p != target]
        try:
            source_file = open(source, "rb")
        except OSError as exc:
            reason = f"cannot read the file ({exc.strerror or type(exc).__name__})"
            return StowOutcome(path=source, stored=False, reason=reason)
        with source_file:
            temp = self._write_temporary(source_file, target, parsed.sop_uid)
        self._replace_with(temp, target, parsed.sop_uid)  # the source is closed: it may be the target
        for path in stale:
            with suppress(OSError):
                if os.path.samefile(path, target):
                    continue  # a case-insensitive file system (macOS): the same file, spelt otherwise
            self._unlink(path, f"replacing instance {parsed.sop_uid}")
            self._prune_empty_folders(path)
        with self._scan_lock, self._lock:
            for path in stale:
                self._index.remove(path)
            self._index.add(target, parsed)
        log.debug("stored %s in %s", parsed.sop_uid, self.name)
        return StowOutcome(source, True, parsed.study_uid, parsed.series_uid, parsed.sop_uid)

    def _write_temporary(self, source: BinaryIO, target: Path, sop_uid: str) -> Path:
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with self._layout_lock:
                target.parent.parent.mkdir(exist_ok=True)  # never parents=True: a deleted
                target.parent.mkdir(exist_ok=True)  # store folder must stay deleted (NotFound)
                out = open(temp, "xb")
            with out:
                shutil.copyfileobj(source, out, CHUNK_SIZE)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            with suppress(OSError):
                temp.unlink()
            raise _store_error(exc, f"writing instance {sop_uid} to store {self.name!r}") from exc
        return temp

    def _replace_with(self, temp: Path, target: Path, sop_uid: str) -> None:
        try:
            os.replace(temp, target)
            _fsync_folder(target.parent)
        except OSError as exc:
            with suppress(OSError):
                temp.unlink()
            raise _store_error(exc, f"writing instance {sop_uid} to store {self.name!r}") from exc

    def _unlink(self, path: Path, action: str) -> bool:
        """Remove a file; False if it was gone already."""
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _store_error(exc, action) from exc
        return True

    def _prune_empty_folders(self, path: Path) -> None:
        """Remove the series and study folders of a canonical path once they are empty."""
        series_dir = path.parent
        study_dir = series_dir.parent
        if study_dir.parent != self._root or not (is_uid(series_dir.name) and is_uid(study_dir.name)):
            return  # not a folder this store lays out
        with self._layout_lock:
            for folder in (series_dir, study_dir):
                try:
                    folder.rmdir()
                except OSError:
                    return  # not empty (or gone): leave it

    # -- index freshness ------------------------------------------------------------------

    def _listed(self, read: Callable[[_Index], _T], wanted: str | None) -> _T:
        """``read(index)`` on a fresh index. A lookup of one UID that the index lacks checks
        the folder tree again at once: navigating straight to a UID another process just wrote
        must not wait for the rescan interval."""
        with self._fresh_index() as index:
            found = read(index)
        if wanted is not None and wanted not in found:  # type: ignore[operator]
            with self._lock:
                self._checked_at = -math.inf
            with self._fresh_index() as index:
                found = read(index)
        return found

    @contextmanager
    def _fresh_index(self) -> Iterator[_Index]:
        """The index, checked against the folder tree if the last check is old enough, with
        ``_lock`` held. Raises :class:`NotFound` when the store folder does not exist."""
        self._refresh()
        with self._lock:
            if not self._exists:
                raise NotFound(f"store {self.name!r} does not exist")
            yield self._index

    def _refresh(self) -> None:
        if not self._is_due():
            return
        with self._lock:
            wait = not self._built  # without a first index there is nothing to answer from
        if not self._scan_lock.acquire(blocking=wait):
            return  # another thread is scanning: answer from the current index
        try:
            if self._is_due():
                self._scan()
        finally:
            self._scan_lock.release()

    def _invalidate(self) -> None:
        """Make the next use check the folder tree (after the dataset created or deleted it)."""
        with self._lock:
            self._built = False

    def _is_due(self) -> bool:
        with self._lock:
            return not self._built or time.monotonic() - self._checked_at >= self._rescan_interval

    def _scan(self) -> None:
        """Bring ``_dirs`` and the index up to date with the folder tree. Needs ``_scan_lock``."""
        started = time.monotonic()
        full = started - self._full_checked_at >= self._full_rescan_interval
        new_dirs = self._walk(time.time_ns(), full)
        if full:
            self._full_checked_at = started
        removed, added = _diff(self._dirs, new_dirs or {})
        self._dirs = new_dirs or {}
        with self._lock:
            self._exists = new_dirs is not None
            for path in removed:
                self._index.remove(path)
            for path, uids in added:
                self._index.add(path, uids)
            self._built = True
            self._checked_at = time.monotonic()
        if removed or added or new_dirs is None:
            log.debug(
                "indexed store %s: %d file(s) added, %d removed, %.3f s",
                self.name,
                len(added),
                len(removed),
                time.monotonic() - started,
            )

    def _walk(self, now_ns: int, full: bool) -> dict[Path, _DirState] | None:
        """The state of every folder below the root, re-listing only changed ones (all of them
        when ``full``); None when the root is not a folder."""
        found: dict[Path, _DirState] = {}
        pending = [self._root]
        while pending:
            folder = pending.pop()
            try:
                info = os.stat(folder)
            except OSError:
                info = None
            if info is None or not stat.S_ISDIR(info.st_mode):
                if folder == self._root:
                    return None
                continue
            state = self._dirs.get(folder)
            if full or state is None or state.mtime_ns != info.st_mtime_ns:
                state = self._list_folder(folder, info.st_mtime_ns, now_ns)
            found[folder] = state
            pending.extend(folder / name for name in state.subdirs)
        return found

    def _list_folder(self, folder: Path, mtime_ns: int, now_ns: int) -> _DirState:
        previous = self._dirs.get(folder)
        known = previous.files if previous else {}
        subdirs: list[str] = []
        files: dict[str, _FileState] = {}
        settled = now_ns - mtime_ns >= _RACY_WINDOW_NS
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.debug("store %s: cannot list a folder (%s)", self.name, exc.strerror)
            entries = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                    continue
                if not (entry.is_file() and _may_be_dicom_name(entry.name)):
                    continue
                info = entry.stat()
            except OSError:
                continue  # vanished while listing
            files[entry.name] = self._file_state(Path(entry.path), info, known.get(entry.name))
            settled = settled and now_ns - info.st_mtime_ns >= _RACY_WINDOW_NS
        return _DirState(mtime_ns if settled else _UNSETTLED, tuple(sorted(subdirs)), files)

    @staticmethod
    def _file_state(path: Path, info: os.stat_result, known: _FileState | None) -> _FileState:
        if known and known.size == info.st_size and known.mtime_ns == info.st_mtime_ns:
            return known
        return _FileState(info.st_size, info.st_mtime_ns, _read_indexed_uids(path))


def _copy_to_sink(source: BinaryIO, sink: BinaryIO, action: str) -> int:
    """Copy in chunks; a read failure is a store error, a sink failure propagates as it is."""
    written = 0
    while True:
        try:
            chunk = source.read(CHUNK_SIZE)
        except OSError as exc:
            raise _store_error(exc, action) from exc
        if not chunk:
            return written
        write_all(sink, chunk)  # a sink on a disk filling up may take part of a chunk
        written += len(chunk)


def _fsync_folder(folder: Path) -> None:
    """Persist a rename (POSIX only: Windows cannot open a folder)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Dataset


class LocalDataset:
    """A folder whose visible immediate sub-folders are stores."""

    def __init__(
        self,
        root: Path,
        *,
        rescan_interval: float = DEFAULT_RESCAN_INTERVAL,
        full_rescan_interval: float = DEFAULT_FULL_RESCAN_INTERVAL,
    ) -> None:
        self.root = Path(root)
        self.name = self.root.name or str(self.root)
        self._intervals = {
            "rescan_interval": rescan_interval,
            "full_rescan_interval": full_rescan_interval,
        }
        self._lock = threading.Lock()  # guards _stores
        self._stores: dict[str, LocalStore] = {}

    def list_stores(self) -> Iterator[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            raise NotFound(f"dataset folder {str(self.root)!r} does not exist") from None
        except OSError as exc:
            raise _store_error(exc, f"listing dataset folder {str(self.root)!r}") from exc
        names = []
        for entry in entries:
            try:
                if _is_plain_name(entry.name) and entry.is_dir():
                    names.append(entry.name)
            except OSError:
                continue
        return iter(sorted(names))

    def open_store(self, store_id: str) -> LocalStore:
        """A handle on one store; the same object for the same ID. Raises :class:`NotFound` at
        once for a name that cannot be a store folder (hidden, or not a single component)."""
        if not _is_plain_name(store_id) or store_id == "..":
            raise NotFound(f"no store called {store_id!r}")
        with self._lock:
            store = self._stores.get(store_id)
            if store is None:
                store = LocalStore(self.root / store_id, **self._intervals)
                self._stores[store_id] = store
        return store

    def create_store(self, store_id: str) -> None:
        _validate_new_store_id(store_id)
        try:
            (self.root / store_id).mkdir()
        except FileExistsError:
            raise AlreadyExists(f"store {store_id!r} already exists") from None
        except OSError as exc:
            # Windows says ERROR_INVALID_NAME (123, EINVAL) or ERROR_FILENAME_EXCED_RANGE (206, which
            # Python maps to ENOENT) for a name over 255 characters: check before FileNotFoundError
            if exc.errno == errno.ENAMETOOLONG or getattr(exc, "winerror", None) in (123, 206):
                raise InvalidName(f"store ID {store_id!r} is too long for this file system") from exc
            if isinstance(exc, FileNotFoundError):
                raise NotFound(f"dataset folder {str(self.root)!r} does not exist") from None
            raise _store_error(exc, f"creating store {store_id!r}") from exc
        self.open_store(store_id)._invalidate()
        log.info("created store %s in %s", store_id, self.root)

    def delete_store(self, store_id: str) -> None:
        """Delete an empty store folder. Refuses with :class:`NotEmpty` while *any* file remains
        below it (DICOM or not), so nothing is lost; empty sub-folders are removed."""
        folder = self.open_store(store_id)._root
        if not folder.is_dir():
            raise NotFound(f"no store called {store_id!r}")
        remaining = _count_files(folder)
        if remaining:
            raise NotEmpty(f"store {store_id!r} still holds {remaining} file(s)")
        try:
            _remove_empty_tree(folder)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise NotEmpty(f"store {store_id!r} received files while being deleted") from exc
            raise _store_error(exc, f"deleting store {store_id!r}") from exc
        self.open_store(store_id)._invalidate()
        log.info("deleted store %s from %s", store_id, self.root)

    def close(self) -> None:
        """Nothing to release: stores hold no open files between calls."""


def _count_files(folder: Path) -> int:
    """Every entry below ``folder`` that is not a real folder (hidden files and links count)."""
    count = 0
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                else:
                    count += 1
    return count


def _remove_empty_tree(folder: Path) -> None:
    """rmdir every folder bottom-up; fails (ENOTEMPTY) if a file appeared meanwhile."""
    for current, dirnames, _ in os.walk(folder, topdown=False):
        for name in dirnames:
            os.rmdir(os.path.join(current, name))
    os.rmdir(folder)
