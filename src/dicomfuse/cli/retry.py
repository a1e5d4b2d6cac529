"""``dicomfuse retry``: send the failed uploads kept in the cache folder again.

Sources: ``spool/failed`` (synchronous uploads; the sidecar ``<file>.json`` names the store), the
spool files a synchronous mount that stopped (crash, kill) left unconfirmed (moved to
``spool/failed`` first, as the next mount would; their store is not known: ``--store``) and the
write-back queue's ``failed/`` folder (records name the store and UIDs). Each file is checked
(complete Part-10 DICOM), compared with what the server already holds under its SOP Instance UID
(identical bytes: done; other bytes: never overwritten), then sent per store. A file is deleted
only once the server confirmed it; a refused one stays with the new reason in its sidecar or
record. Output names files, UIDs and stores only: never patient data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicomfuse.cli.settings import parse_http_timeout
from dicomfuse.cli.status import unreadable
from dicomfuse.core import portable
from dicomfuse.core.uploads import (
    FailedInfo,
    Spool,
    files_in,
    is_sidecar,
    orphan_files,
    read_sidecar,
    sidecar_path,
    write_json_atomic,
    write_sidecar,
)
from dicomfuse.core.writeback import (
    DATA_SUFFIX,
    FAILED_DIR,
    RECORD_SUFFIX,
    dataset_label,
    queue_dir,
    read_record,
    same_dataset,
)
from dicomfuse.dicomfile import DicomUids, check_upload
from dicomfuse.stores.base import Dataset, Store, StoreError
from dicomfuse.stores.http import hide_path_tokens

EXIT_DONE = 0
EXIT_REMAINING = 1
EXIT_USAGE = 2
EXIT_WOULD_SEND = 3  # --dry-run only: files would be sent (none would remain); nothing was
BATCH_FILES = 50
LOCK_NAME = ".retry.lock"
OTHER_VERSION = "the server holds another version"
_CHUNK = 1 << 20


@dataclass
class Failed:
    """One kept upload: its bytes, how to show it, its store (None: unknown), and its note (a
    sync sidecar or a write-back record; None when there is none)."""

    path: Path
    name: str
    store: str | None
    note: Path | None
    writeback: bool
    dataset: str | None = None
    uids: DicomUids | None = None
    orphan: bool = False  # a spool file a stopped mount left; moved to spool/failed before it is sent


class _Usage(Exception):
    pass


def run_retry(argv: list[str]) -> int:
    """``dicomfuse retry -a ADDRESS [...]``: 0 all sent (nothing left to send), 1 some remain, 2
    usage error; ``--dry-run``: 0 nothing needs sending, 3 the files would all be sent, 1 some would
    remain. A dry run never exits 0 while files are waiting to be sent: a script must not take it
    for a retry that sent them."""
    try:
        ns = _parse(argv)
    except _Usage as exc:
        return int(str(exc))
    from dicomfuse.cli.main import default_cache_dir

    root: Path = ns.cacheDir or default_cache_dir()
    if ns.cacheDir is not None and not root.is_dir():
        # A mistyped folder must not read as "nothing to retry" (as for dicomfuse status).
        print(f"dicomfuse retry: error: --cacheDir: {root} is not a folder (give the mount's --cacheDir)",
              file=sys.stderr)
        return EXIT_USAGE
    problem = unreadable(root)
    if problem is not None:  # an unreadable folder must not read as "nothing to retry" either
        print(f"dicomfuse retry: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _retry(root, ns)
    except _Usage as exc:
        print(f"dicomfuse retry: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dicomfuse retry",
        description="Send the failed uploads kept in the cache folder again. A file is deleted once the "
                    "server confirmed it; a file the server already holds identically counts as sent; a "
                    "different version on the server is never overwritten. "
                    "Exit code: 0 all sent (nothing left to send), 1 some remain, 2 usage error (or the cache "
                    "folder cannot be read by this user). "
                    "With --dry-run: 0 nothing needs sending (none, or all already on the server), "
                    "3 they would all be sent (nothing was), 1 some would remain.",
    )
    parser.add_argument("-a", "--datasetAddr", metavar="ADDRESS", required=True,
                        help="The dataset to send them to (as for the mount).")
    parser.add_argument("-k", "--keyFile", metavar="FILE", default=None, help="Service-account key (JSON).")
    parser.add_argument("--cacheDir", metavar="DIR", type=Path, default=None,
                        help="The mount's --cacheDir (default: the user cache folder).")
    parser.add_argument("--store", metavar="NAME", default=None,
                        help="Store for failed files that do not say which store they were for.")
    parser.add_argument("--orthancRest", metavar="MODE", default="auto", help="As for the mount. Default: auto.")
    parser.add_argument("--caBundle", metavar="FILE", default=None, help="PEM file of trusted CAs.")
    parser.add_argument("--httpTimeout", metavar="C,R", default=None,
                        help="As for the mount: seconds to connect, and between two bytes of an answer.")
    parser.add_argument("--logDir", metavar="DIR", type=Path, default=None,
                        help="Folder of the log files (as for the mount).")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="Check and compare, but send, delete and change nothing.")
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        raise _Usage(str(exc.code if isinstance(exc.code, int) else EXIT_USAGE)) from None


def _retry(root: Path, ns: argparse.Namespace) -> int:
    from dicomfuse.stores.auth import CredentialsError
    from dicomfuse.stores.open import open_dataset

    timeout = None
    if ns.httpTimeout is not None:
        try:
            timeout = parse_http_timeout(ns.httpTimeout)
        except ValueError as exc:
            raise _Usage(f"--httpTimeout: {exc}") from None
    items = gather(root)
    try:  # a wrong address is said even when nothing is to be sent (opening it sends no request)
        dataset = open_dataset(ns.datasetAddr, key_file=ns.keyFile, timeout=timeout,
                               orthanc_rest=ns.orthancRest, ca_bundle=ns.caBundle)
    except ValueError as exc:
        raise _Usage(f"--datasetAddr: {exc}") from None
    except CredentialsError as exc:
        if not items:
            print(f"Nothing to retry: no failed uploads in {root}.")
            return EXIT_DONE
        print(f"dicomfuse retry: cannot authenticate: {exc}", file=sys.stderr)
        return EXIT_REMAINING
    if not items:
        dataset.close()
        print(f"Nothing to retry: no failed uploads in {root}.")
        return EXIT_DONE
    lock_fd = -1
    try:
        try:
            stores = set(dataset.list_stores())
        except StoreError as exc:
            print(f"dicomfuse retry: cannot reach the dataset: {exc}", file=sys.stderr)
            return EXIT_REMAINING
        if ns.store is not None and ns.store not in stores:
            raise _Usage(f"--store: no store called {ns.store!r} in the dataset")
        if not ns.dry_run:
            lock_fd = _lock(root / "spool" / LOCK_NAME)
            if lock_fd < 0:
                print("dicomfuse retry: another 'dicomfuse retry' is running on this cache folder", file=sys.stderr)
                return EXIT_REMAINING
            if any(item.orphan for item in items):
                # As the next mount would: kept in spool/failed with a note, so that a file that
                # stays (no --store, refused) is listed and retried like any failed upload.
                (root / "spool" / "failed").mkdir(mode=0o700, exist_ok=True)
                Spool(root / "spool", root / "spool" / "failed").rescue_orphans()
                items = gather(root)
        sender = _Sender(dataset, stores, ns.store, dataset_label(ns.datasetAddr), ns.dry_run, root / "spool")
        sender.run(items)
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
        dataset.close()
    return sender.summary()


def gather(root: Path) -> list[Failed]:
    """The failed uploads kept under a cache root (reads only; creates nothing)."""
    items: list[Failed] = []
    for path in orphan_files(root / "spool"):
        try:
            empty = path.stat().st_size == 0  # opened and never written: nothing to send
        except OSError:
            continue  # a mount starting now took it
        if not empty:
            items.append(Failed(path, path.name, None, None, writeback=False, orphan=True))
    sync = root / "spool" / "failed"
    for path in files_in(sync):
        if is_sidecar(path):
            continue
        info = read_sidecar(path)
        note = sidecar_path(path) if info is not None else None
        items.append(Failed(path, path.name, info.store if info else None, note, writeback=False,
                            dataset=info.dataset if info else None))
    for path in files_in(queue_dir(root) / FAILED_DIR):
        if not path.name.endswith(DATA_SUFFIX):
            continue
        record_path = path.with_name(path.name[: -len(DATA_SUFFIX)] + RECORD_SUFFIX)
        record = read_record(record_path, strict=False)
        if record is None:
            items.append(Failed(path, path.name, None, None, writeback=True))
        else:
            items.append(Failed(path, record.display, record.store or None, record_path, writeback=True,
                                dataset=record.dataset))
    return items


class _Sender:
    def __init__(self, dataset: Dataset, stores: set[str], default_store: str | None, label: str | None,
                 dry_run: bool, scratch: Path) -> None:
        self.dataset = dataset
        self.stores = stores
        self.default_store = default_store
        self.label = label
        self.dry_run = dry_run
        self.scratch = scratch
        self.counts = {"stored": 0, "already": 0, "kept": 0}

    def run(self, items: list[Failed]) -> None:
        per_store: dict[str, list[Failed]] = defaultdict(list)
        for item in items:
            store_name = self._prepare(item)
            if store_name is not None:
                per_store[store_name].append(item)
        for store_name, group in sorted(per_store.items()):
            store = self.dataset.open_store(store_name)
            pending = [item for item in group if self._compare(store, store_name, item)]
            while pending:
                # Two kept versions of one instance (copies that failed one after the other, an
                # overwrite and the previous version it kept) never go together: the newest
                # first, then the others are compared with what the server holds like any file.
                now, pending = _newest_per_instance(pending)
                for start in range(0, len(now), BATCH_FILES):
                    self._send(store, store_name, now[start:start + BATCH_FILES])
                if self.dry_run:
                    for item in pending:
                        self._kept(item, "another version of this instance would be sent first")
                    break
                pending = [item for item in pending if self._compare(store, store_name, item)]

    def _prepare(self, item: Failed) -> str | None:
        """The store to send ``item`` to, or None when it stays (reported)."""
        store = item.store or self.default_store
        if store is None:
            self._kept(item, "no store known for this file: give --store NAME")
            return None
        if item.dataset and self.label and not same_dataset(item.dataset, self.label):
            self._kept(item, f"it was written to another dataset ({hide_path_tokens(item.dataset)})")
            return None
        if store not in self.stores:
            self._kept(item, f"no store called {store!r} in the dataset")
            return None
        checked = check_upload(item.path)
        if isinstance(checked, str):
            self._kept(item, checked, note=True)
            return None
        item.uids = checked
        item.store = store
        return store

    def _compare(self, store: Store, store_name: str, item: Failed) -> bool:
        """True to send it; False when it is done (identical copy on the server) or stays."""
        u = item.uids
        assert u is not None
        try:
            held = next(iter(store.instances(u.study_uid, u.series_uid, u.sop_uid)), None)
            if held is None:
                return True
            size = item.path.stat().st_size
            same = (held.size is None or held.size == size) and self._same_bytes(store, u, item.path)
        except StoreError as exc:
            self._kept(item, f"cannot check what the server holds: {exc}")
            return False
        except OSError as exc:
            self._kept(item, f"cannot read the file ({exc.strerror or type(exc).__name__})")
            return False
        if not same:
            self._kept(item, OTHER_VERSION, note=True)
            return False
        self._done(item, f"already on the server (store {store_name})", "already")
        return False

    def _same_bytes(self, store: Store, u: DicomUids, path: Path) -> bool:
        self.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.scratch) as copy:  # unnamed, in the private spool
            store.retrieve(u.study_uid, u.series_uid, u.sop_uid, copy)
            copy.seek(0)
            with open(path, "rb") as local:
                return _equal(copy, local)

    def _send(self, store: Store, store_name: str, batch: list[Failed]) -> None:
        if self.dry_run:
            for item in batch:
                self._line(item, f"would be sent to store {store_name}")
                self.counts["stored"] += 1
            return
        try:
            outcomes = store.store_files([item.path for item in batch])
        except StoreError as exc:
            for item in batch:
                self._kept(item, f"not sent: {exc}")
            return
        for item, outcome in zip(batch, outcomes, strict=False):
            if outcome.stored:
                self._done(item, f"stored (store {store_name})", "stored")
            else:
                self._kept(item, f"refused by the server: {outcome.reason or 'no reason given'}", note=True)
        for item in batch[len(outcomes):]:
            self._kept(item, "the server gave no answer for this file")

    # -- results --------------------------------------------------------------------------

    def _done(self, item: Failed, what: str, count: str) -> None:
        if not self.dry_run:
            _remove(item)
        self.counts[count] += 1
        self._line(item, what)

    def _kept(self, item: Failed, reason: str, *, note: bool = False) -> None:
        """``note``: a verdict on the file (invalid, refused, other version) worth writing down;
        transient or usage problems leave the earlier reason in place."""
        if note and not self.dry_run:
            try:
                _write_reason(item, reason)
            except OSError as exc:
                print(f"  (cannot write the reason beside {item.path}: {exc.strerror or exc})")
        self.counts["kept"] += 1
        self._line(item, f"kept: {reason}")

    def _line(self, item: Failed, text: str) -> None:
        print(f"{item.name}: {text}")

    def summary(self) -> int:
        c = self.counts
        verb = "would be sent" if self.dry_run else "stored"
        print(f"{c['stored']} {verb}, {c['already']} already on the server, {c['kept']} kept.")
        if c["kept"] and not self.dry_run:
            print("Kept files stay in the cache folder; 'dicomfuse status' lists them.")
        if c["kept"]:
            return EXIT_REMAINING
        return EXIT_WOULD_SEND if self.dry_run and c["stored"] else EXIT_DONE


def _newest_per_instance(items: list[Failed]) -> tuple[list[Failed], list[Failed]]:
    """The most recently kept file of each SOP Instance UID (in ``items``' order), and the rest."""
    def kept_at(item: Failed) -> int:
        try:
            return item.path.stat().st_ctime_ns  # moved into its failed folder then
        except OSError:
            return 0

    newest: dict[str, Failed] = {}
    for item in items:
        assert item.uids is not None
        held = newest.get(item.uids.sop_uid)
        if held is None or kept_at(item) > kept_at(held):
            newest[item.uids.sop_uid] = item
    chosen = {id(item) for item in newest.values()}
    return [i for i in items if id(i) in chosen], [i for i in items if id(i) not in chosen]


def _remove(item: Failed) -> None:
    """Delete a confirmed upload: a sync sidecar before its bytes (bytes without a note are still
    shown and retried), a write-back record after its bytes (a record alone is never shown)."""
    if not item.writeback and item.note is not None:
        _unlink(item.note)
    _unlink(item.path)
    if item.writeback and item.note is not None:
        _unlink(item.note)


def _write_reason(item: Failed, reason: str) -> None:
    if item.writeback:
        if item.note is None:
            return  # bytes without a record: nothing to write the reason into
        data = json.loads(item.note.read_text(encoding="utf-8"))
        data["last_error"] = reason
        write_json_atomic(item.note, data)
        return
    info = read_sidecar(item.path)
    write_sidecar(item.path, FailedInfo(item.store or (info.store if info else None),
                                        info.name if info else item.path.name, reason, time.time(),
                                        info.dataset if info else None))


def _equal(a: BinaryIO, b: BinaryIO) -> bool:
    while True:
        x, y = a.read(_CHUNK), b.read(_CHUNK)
        if x != y:
            return False
        if not x:
            return True


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _lock(path: Path) -> int:
    """An flock on ``path`` (fd), or -1 when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = portable.open_fd(path, os.O_CREAT | os.O_RDWR)
    if not portable.try_lock(fd):
        os.close(fd)
        return -1
    return fd
