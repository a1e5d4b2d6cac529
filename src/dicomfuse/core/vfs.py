"""The OS-neutral filesystem: one method per operation, paths in, FsError(errno) out.

Adapters (``dicomfuse.backends``) translate OS callbacks to these methods and nothing else.
What is allowed where comes from ``policy.TABLE``; store errors become errno through
``errors.from_store_error``. Network calls are never made while ``_lock`` is held.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dicomfuse.core import portable
from dicomfuse.core.discovery import WalkDetector, build_tree
from dicomfuse.core.errors import ENOATTR, FsError, from_store_error
from dicomfuse.core.instance_cache import CachedInstance, CacheKey, InstanceCache, disk_block
from dicomfuse.core.paths import (
    DicomPath,
    Level,
    instance_name,
    instance_uid,
    is_gui_folder_name,
    is_valid_store_id,
)
from dicomfuse.core.policy import Op, OperationPolicy
from dicomfuse.core.readahead import ReadAhead
from dicomfuse.core.sizes import Caller, StatProbePolicy
from dicomfuse.core.tree import Entry, ListingCache
from dicomfuse.core.uploads import BACKUP_SUFFIX, ORPHANS_WARNING, Spool, inspect_dicom, sidecar_path
from dicomfuse.core.workdirs import WorkDirs
from dicomfuse.core.writeback import QueueBusy, QueuedUpload, WriteBackQueue, dataset_label, queue_dir, record_paths
from dicomfuse.dicomfile import DicomUids
from dicomfuse.stores.base import (
    Dataset,
    LocalReadError,
    Store,
    StoreError,
    Unavailable,
    WalkableStore,
    instances_present,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
ROOT = DicomPath(())
LISTING_FAILURE_REUSE_S = 2.0  # a folder's failed listing answers the callers right behind it
_PAGES_PENDING = 0  # the copy whose pages the OS may hold is the one the next first read pins
_PAGE_OWNERS = 65536
# Read-only and not listed (cp -a must not copy it): on an instance file, b"yes" while a fresh
# complete copy is in the instance cache, else b"no". How `dicomfuse prefetch` learns what stayed.
CACHED_XATTR = "user.dicomfuse.cached"


@dataclass(frozen=True)
class VfsConfig:
    listing_ttl: float = 60.0
    instance_ttl: float = 300.0
    cache_bytes: int = 10_000 * 1024 * 1024
    deletion_enabled: bool = True
    download_workers: int = 16
    read_ahead: int = 16  # files of a series fetched ahead of a reader going through it in order
    upload_mode: str = "sync"  # "sync": close() ends when the server stored the file; "writeback": queued
    dataset_label: str | None = None  # tells datasets apart in the write-back journal
    stat_fetch_timeout: float = 30.0  # longest a stat waits for an unknown size with no byte arriving
    drain_timeout: float = 60.0  # longest an unmount waits for queued uploads (the rest stays journaled)
    walk_grace: float = 3.0  # longest listings wait for a store walk in progress, from its start


@dataclass(frozen=True)
class Attr:
    """What ``stat`` shows. ``size_known`` is False for an instance not fetched yet (its size
    reads as 0 and its reads are not limited by it)."""

    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    size_known: bool = True


@dataclass(frozen=True)
class OpenResult:
    fh: int
    direct_io: bool = False  # reads must not be clipped to a size the kernel may hold stale
    keep_cache: bool = False
    no_flush: bool = False  # closing it needs no call into the core (a read-only handle)


@dataclass
class LocalNode:
    """A side file, a GUI "New folder" placeholder or an empty file nothing was written into
    yet: lives on this machine only."""

    is_dir: bool
    path: Path | None = None  # file content (side files)
    placeholder: bool = False  # a new file closed empty: writing into it uploads it
    mtime: float = field(default_factory=time.time)


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


@dataclass
class Alias:
    """A name the user wrote to that now stands for an uploaded instance (``cp a.dcm store/``,
    rsync's temp names): resolvable, renamable, removable, never listed."""

    ident: DicomUids
    size: int
    at: float
    # The copy stored a new instance (not one the server held already): rm of this name deletes
    # it; otherwise rm only forgets the name (rsync cleaning up its temporary name after an
    # identical re-send must not delete what was there before).
    created: bool = True


_RECENT_NAMES = 20_000
"""Names copied in, and times given to files, that a mount remembers (the newest): a mount runs
for days, and each costs about 0.3-0.9 KB. An older one forgotten reads as the instance's own
name and the mount's start time do: a second rsync -a then sends that file again."""


class _Recent(dict[K, V]):
    """A dict that keeps its ``max_size`` most recently set keys."""

    def __init__(self, max_size: int = _RECENT_NAMES) -> None:
        super().__init__()
        self.max_size = max_size

    def __setitem__(self, key: K, value: V) -> None:
        super().pop(key, None)  # to the end: the newest
        super().__setitem__(key, value)
        while len(self) > self.max_size:
            del self[next(iter(self))]


class _AliasTable(_Recent[DicomPath, Alias]):
    """Names written -> the instance each stands for, and the names of each instance: rm of an
    instance finds its names without going through every name (an rsync of thousands of files
    named otherwise leaves thousands). The ``max_size`` newest are kept. Use the dict operations
    below only."""

    def __init__(self, max_size: int = _RECENT_NAMES) -> None:
        super().__init__(max_size)
        self._names: dict[tuple[str, str], set[DicomPath]] = {}

    def __setitem__(self, name: DicomPath, alias: Alias) -> None:
        self.pop(name, None)
        self._names.setdefault((name.store, alias.ident.sop_uid), set()).add(name)
        super().__setitem__(name, alias)  # the oldest names go through __delitem__

    def __delitem__(self, name: DicomPath) -> None:
        self.pop(name)

    def pop(self, name: DicomPath, *default: Alias | None) -> Alias | None:  # type: ignore[override]
        alias = super().pop(name, *default)
        if alias is not None:
            names = self._names.get((name.store, alias.ident.sop_uid))
            if names is not None:
                names.discard(name)
                if not names:
                    del self._names[(name.store, alias.ident.sop_uid)]
        return alias

    def names_of(self, store: str, sop_uid: str) -> list[DicomPath]:
        return sorted(self._names.get((store, sop_uid), ()), key=str)


@dataclass
class ReadHandle:
    """An instance opened for reading. Its download starts at the first read, not at open:
    Windows opens files to read their properties or to delete them, and must not fetch them.
    A copy already cached is pinned at open."""

    path: DicomPath
    expected_size: int | None
    entry: CachedInstance | None = None
    fd: int = -1
    direct: bool = False  # its reads bypass the OS's page cache
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class LocalHandle:
    node: LocalNode
    fd: int


GIVE_WAY_BYTES = 16 << 20
"""Room asked of the cache beyond the write that found the disk full (the rest of the file is
likely to come): fewer rounds of deletions."""


@dataclass
class WriteHandle:
    """A file being written: bytes go to a spool file, sent at flush/close."""

    path: DicomPath
    spool_path: Path
    fd: int
    overwrites: DicomUids | None = None  # the instance opened for writing, if any
    dirty: bool = False
    uploaded: DicomUids | None = None
    altered: bool = False  # the server stored other bytes than these (a STOW WarningReason): not cached
    queued: bool = False  # handed to the write-back queue: its bytes are the queue's now
    discarded: bool = False  # its name was removed before it was sent: never sent
    new: bool = False  # created by this mount: closed empty, it stays a local placeholder
    write_error: int | None = None  # errno of a write that failed (EFBIG, ENOSPC): never sent
    given_mtime: float | None = None  # set while it was open (cp -p: futimens before close)
    lock: threading.Lock = field(default_factory=threading.Lock)

    closed_size: int | None = None  # its size when its file was closed

    @property
    def size(self) -> int:
        closed = self.closed_size
        if closed is not None:
            return closed
        try:
            return os.fstat(self.fd).st_size
        except OSError:  # closed meanwhile by release() (the OS sends it while a stat may be running)
            if self.closed_size is None:
                raise
            return self.closed_size


Handle = ReadHandle | LocalHandle | WriteHandle


class Vfs:
    def __init__(self, dataset: Dataset, config: VfsConfig, workdirs: WorkDirs) -> None:
        self.dataset = dataset
        self.config = config
        self.workdirs = workdirs
        self.policy = OperationPolicy(deletion_enabled=config.deletion_enabled)
        self.writeback: WriteBackQueue | None = None
        self.listings = ListingCache(config.listing_ttl, keep=self._still_queued)
        self.cache = InstanceCache(
            workdirs.cache, config.cache_bytes, config.instance_ttl, workers=config.download_workers,
            block=disk_block(workdirs.cache), remake=workdirs.restore,
        )
        self.readahead = ReadAhead(config.read_ahead, self._file_names, self._prefetch,
                                   lambda p: self.cache.cancel(self._key(p)))
        self.walks = WalkDetector(cooldown=max(config.listing_ttl, 1.0))
        self.writeback = self._open_queue()
        self.spool = Spool(workdirs.spool, workdirs.failed, dataset_label(config.dataset_label))
        rescued = self.spool.rescue_orphans()
        if rescued:
            log.warning(ORPHANS_WARNING, len(rescued), self.spool.failed)
        self.stat_probes = StatProbePolicy()
        self.mounted_at = time.time()
        # Called with a mount path whose attributes changed behind the OS's back (size learnt).
        self.notify_changed: Callable[[str], bool] = lambda path: False
        self._lock = threading.Lock()
        # Protected by _lock:
        self._stores: dict[str, Store] = {}
        self._local: dict[DicomPath, LocalNode] = {}
        self._aliases = _AliasTable()
        self._pending: dict[DicomPath, WriteHandle] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._xattrs: dict[DicomPath, dict[str, bytes]] = {}
        # Modification times (seconds) of files written or given a time (cp -p, rsync -a, touch)
        # through this mount, by path: kept in memory while mounted, like extended attributes.
        # The rest show the mount's start.
        self._times: _Recent[DicomPath, float] = _Recent()
        self._walking: dict[str, _Walk] = {}  # store -> its walk in progress
        self._listing_flights: dict[DicomPath, _Flight] = {}  # folder -> its listing being asked for
        # instance -> serial of the cached copy its pages in the OS came from (see _page_cache_use)
        self._page_owner: OrderedDict[DicomPath, int] = OrderedDict()
        # folder -> its last listing, if it failed: the kernel runs listings and lookups of one
        # folder one after another (libfuse's high-level API does not turn on parallel directory
        # operations), so callers waiting behind a failing one never join it; they get its error
        # for LISTING_FAILURE_REUSE_S instead of each going through the whole retry chain again.
        self._listing_failed: dict[DicomPath, _Flight] = {}
        self._side_names = 0
        # (store, SOP Instance UID) -> when this mount saw the server confirm it stored it: a
        # lagging search index (Google's) may not show it yet, yet a new copy overwrites it.
        self._stored_here: OrderedDict[tuple[str, str], float] = OrderedDict()
        # Write-back uploads whose overwrite was refused with the previous instance still on
        # the server (it stays in its folder).
        self._previous_kept: set[str] = set()
        self._altered: set[str] = set()  # write-back uploads the server stored altered (ids)
        # (store, SOP Instance UID) queued for write-back -> the other instance whose name it
        # was written over: deleted once the upload is confirmed (kept if the mount stops
        # first: nothing is lost).
        self._replaces: dict[tuple[str, str], DicomUids] = {}
        self._upload_slots: dict[tuple[str, str], _Slot] = {}  # (store, SOP UID) being uploaded or removed
        # Instances of unknown size found larger than cacheSize/4 (the newest 20,000: one
        # forgotten is only downloaded again by a stat, to be found too large again).
        self._too_large: _Recent[DicomPath, None] = _Recent()
        # instance -> (serial of its download, bytes it had) when a stat gave up waiting for its size
        self._stat_gave_up: dict[DicomPath, tuple[int, int]] = {}

    # ======================================================================================
    # lifecycle

    def start(self) -> None:
        """Start worker pools: call from the filesystem's init, after the mount forked."""
        self.cache.start()
        if self.writeback is not None:
            self.writeback.start()

    def _open_queue(self) -> WriteBackQueue | None:
        """The write-back queue (write-back mode), or, in sync mode, the queue of uploads an
        earlier write-back run left unsent, so they are sent anyway. Raises QueueBusy when
        write-back mode is asked and another mount holds the queue."""
        directory = queue_dir(self.workdirs.root)
        if self.config.upload_mode != "writeback" and not record_paths(directory):
            return None
        try:
            queue = WriteBackQueue(directory, self._send_batch, on_done=self._upload_done,
                                   dataset=self.config.dataset_label)
        except QueueBusy:
            if self.config.upload_mode == "writeback":
                raise
            return None
        left = queue.recover()
        if left:
            log.info("%d upload(s) left by an earlier run will be sent again (dicomfuse status shows them)",
                     len(left))
            for item in left:  # they show in their folders, as they did in the run that queued them
                target = self._queued_target(item)
                if item.removed:  # sent again, then deleted: hidden meanwhile, as the rm said
                    self.listings.note_removed(target.parent, target.name)
                else:
                    self._keep_listed(target, item.size)
        elif self.config.upload_mode != "writeback":
            queue.stop(drain=False)
            return None
        return queue

    def shutdown(self) -> None:
        """Close handles, stop pools, wipe the instance cache (the spool of failures stays)."""
        self.readahead.close()
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        deadline = time.monotonic() + self.config.drain_timeout
        for h in handles:
            if isinstance(h, WriteHandle):
                # An upload in flight holds the handle's lock: let it finish (bounded), so a file
                # is either on the server or kept, never cut off in the middle of its STOW.
                got = h.lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
                try:
                    self._close_fd(h.fd)  # first: Windows cannot move a file that is open
                    if h.dirty and not h.queued:
                        self._keep_failed(h, "the mount stopped before the upload")
                    elif h.uploaded is not None and h.spool_path.parent == self.spool.directory:
                        # Stored (its program had not closed it yet): the server has these bytes,
                        # and a copy left in the spool would be taken for a failed upload.
                        Spool.discard(h.spool_path)
                finally:
                    if got:
                        h.lock.release()
            else:
                self._close_fd(h.fd)
        if self.writeback is not None:
            queued = len(self.writeback.pending())
            if queued:
                log.info("Sending the %d queued upload(s) before unmounting (at most %.0f s; the rest is sent at "
                         "the next start)", queued, self.config.drain_timeout)
            self.writeback.stop(drain=True, timeout=self.config.drain_timeout)
            left = self.writeback.pending()
            if left:
                log.warning("%d upload(s) are still queued; they stay on disk and are sent at the next start "
                            "(dicomfuse status lists them)", len(left))
        self.cache.stop()
        self.cache.wipe()
        self.workdirs.wipe()
        self.dataset.close()

    # ======================================================================================
    # attributes and listings

    def getattr(self, path: str, fh: int | None = None, caller: Caller | None = None) -> Attr:
        """``caller`` identifies the calling process (see ``core.sizes``): it decides whether a
        stat of an instance of unknown size fetches it to tell its true size."""
        # By handle first: an open file removed meanwhile comes with no path (libfuse's
        # hard_remove), and its reader must keep its bytes and their size.
        handle = self._handle(fh, required=False) if fh is not None else None
        if isinstance(handle, ReadHandle):
            if handle.entry is not None and handle.entry.complete:
                return self._file_attr(handle.entry.written, handle.path)
            if path is None and handle.expected_size is not None:
                return self._file_attr(handle.expected_size, handle.path)
        if isinstance(handle, WriteHandle):
            return self._file_attr(handle.size, handle.path)
        if isinstance(handle, LocalHandle) and path is None:
            return self._file_attr(os.fstat(handle.fd).st_size)
        if path is None:
            raise FsError(errno.ENOENT, "no such entry: a removed file")
        p = DicomPath.parse(path)
        local = self._local_attr(p)
        if local is not None:
            return local
        if not p.parts:
            return Attr(True, mtime=self.mounted_at)
        entry = self._resolve(p)
        if entry.is_dir:
            return Attr(True, mtime=self.mounted_at)
        size = self._size_of(p, entry)
        if size is None and p not in self._too_large and self.stat_probes.should_fetch(caller, p):
            size = self._fetch_size(p)
        if size is None and p in self._too_large:
            # Larger than the cache may hold, so it cannot be read: shown at least that big, not
            # 0. tar archives exactly the size it saw and never opens a file of size 0: it would
            # archive it empty and exit 0; opened, it fails with EFBIG, as cp and cat do.
            return Attr(False, self.cache.max_file + 1, self._times.get(p, self.mounted_at), size_known=False)
        return self._file_attr(size, p)

    def _size_of(self, p: DicomPath, entry: Entry) -> int | None:
        """The size to show: that of the cached copy when there is one (reads come from it; the
        instance may have changed on the server since it was listed), else the listed one."""
        cached = self.cache.known_size(self._key(p))
        return cached if cached is not None else entry.size

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        p = DicomPath.parse(path)
        listing = self.listings.get(p)  # a cached listing is a folder's: no need to resolve it
        if listing is None:
            self._require_dir(p)
        self.policy.check(Op.LIST, p.level, str(p))
        if listing is None:
            with self._lock:
                node = self._local.get(p)
            # A folder that exists on this computer only (a "New folder" not renamed yet) holds
            # only what is local: the server knows nothing of it.
            listing = {} if node is not None and node.is_dir else self._listing(p)
        out: dict[str, Attr] = {}
        folder_attr = Attr(True, mtime=self.mounted_at)
        for name, entry in listing.items():
            if entry.is_dir:
                out[name] = folder_attr
            else:
                out[name] = self._file_attr(self._size_of(p.child(name), entry), p.child(name))
        with self._lock:
            if self._local:
                for lp, node in self._local.items():
                    if lp.parent == p:
                        out[lp.name] = self._local_node_attr(node, lp)
            if self._pending and p.level == Level.SERIES:
                for wp, wh in self._pending.items():
                    if wp.parent == p:
                        out.setdefault(wp.name, self._file_attr(wh.size, wp))
        return sorted(out.items())

    def statfs(self) -> dict[str, int]:
        return portable.disk_stats(self.workdirs.cache)

    # ======================================================================================
    # folders

    def mkdir(self, path: str) -> None:
        p = DicomPath.parse(path)
        if self._exists(p):
            raise FsError(errno.EEXIST, f"mkdir: exists: {p}")
        if p.level == Level.STORE and not p.too_deep:
            if is_gui_folder_name(p.name):
                with self._lock:
                    self._local[p] = LocalNode(is_dir=True)
                log.info("Folder %r stays on this computer until it is renamed to a store name", p.name)
                return
            self._refuse_hidden_store(p, "mkdir")
            if not is_valid_store_id(p.name):
                raise FsError(errno.EINVAL, f"mkdir: {p.name!r} is not a valid store ID "
                              "(1-256 letters, digits, '_', '-', '.')", logging.WARNING)
        self.policy.check(Op.MKDIR, p.level if not p.too_deep else Level.INSTANCE, str(p))
        self._create_store(p.name)

    def rmdir(self, path: str) -> None:
        p = DicomPath.parse(path)
        with self._lock:
            node = self._local.get(p)
            if node is not None and node.is_dir:
                if any(lp.parent == p for lp in self._local):
                    raise FsError(errno.ENOTEMPTY, f"rmdir: not empty: {p}")
                del self._local[p]
                return
        attr = self.getattr(path)
        if not attr.is_dir:
            raise FsError(errno.ENOTDIR, f"rmdir: not a folder: {p}")
        self.policy.check(Op.RMDIR, p.level, str(p))

        def delete_if_empty() -> None:
            self._require_empty_store(p, "rmdir")
            self._remote(f"delete store {p.name}", self.dataset.delete_store, p.name)

        self._until_index_shows_removals(p, delete_if_empty)
        self.listings.note_removed(ROOT, p.name)
        with self._lock:
            self._stores.pop(p.name, None)
        log.info("Deleted empty store %s", p.name)

    def rename(self, old: str, new: str, *, replace: bool = True) -> None:
        """``replace=False`` (``mv -n``'s RENAME_NOREPLACE, Windows without "replace if
        exists"): EEXIST when ``new`` exists, and nothing changes."""
        po, pn = DicomPath.parse(old), DicomPath.parse(new)
        if po == pn:
            return
        if not replace:
            self.getattr(old)
            if self._exists(pn):
                raise FsError(errno.EEXIST, f"rename: {pn} exists and is not replaced", logging.DEBUG)
        with self._lock:
            node = self._local.get(po)
            alias = self._aliases.get(po)
        if node is not None:
            self._rename_local(po, pn, node)
        elif alias is not None:
            self._rename_alias(po, pn, alias)
        elif po.level == Level.STORE and pn.level == Level.STORE and not pn.too_deep:
            self.getattr(old)
            self._rename_store(po, pn)
        else:
            self.getattr(old)
            self.policy.check(Op.RENAME, po.level, str(po))
            raise FsError(errno.EPERM, f"rename: a store can only be renamed to another store name: {po}")

    # ======================================================================================
    # files

    def unlink(self, path: str) -> None:
        p = DicomPath.parse(path)
        with self._lock:
            node = self._local.get(p)
            if node is not None and not node.is_dir:
                del self._local[p]
                self._xattrs.pop(p, None)
                self._times.pop(p, None)
                if node.path is not None:
                    Spool.discard(node.path)
                return
            alias = self._aliases.get(p)
            pending = self._pending.get(p)
        if pending is not None and pending.uploaded is None and not pending.queued:
            self._drop_unsent(pending)  # e.g. a copy cancelled by deleting the file it was writing
            if pending.overwrites is None:
                return  # a new file: nothing on the server
        if alias is not None and not alias.created:
            # The copy stored nothing new (the server held the instance already): rm undoes the
            # copy, the name goes and the instance stays.
            with self._lock:
                if self._aliases.get(p) is alias:
                    del self._aliases[p]
                self._times.pop(p, None)
            log.info("Removed the name %s; %s was on the server before it was copied in, and stays",
                     p, self._alias_target(p, alias))
            return
        if alias is not None:
            # A name a file was copied in as (cp x.dcm store/) that stored a new instance: rm of
            # it deletes the instance, as rm of the instance's own name does.
            target = self._alias_target(p, alias)
            self.policy.check(Op.UNLINK, Level.INSTANCE, str(p))
            with self._upload_slot(p.store, alias.ident.sop_uid):
                self._remove_instance(target, alias.ident.sop_uid)
            log.info("Deleted instance %s (copied in as %s)", target, p)
            return
        entry = self._resolve(p)
        if entry.is_dir:
            raise FsError(errno.EISDIR, f"unlink: is a folder: {p}")
        self.policy.check(Op.UNLINK, p.level, str(p))
        uid = instance_uid(p.name)
        assert uid is not None  # _resolve only finds instances under their UID names
        with self._lock:
            recent = time.monotonic() - _ALIAS_GUARD
            named = [n.name for n in self._aliases.names_of(p.store, uid)
                     if n.parent == p.parent and instance_uid(n.name) is None and self._aliases[n].at > recent]
        if named:
            # A mirroring tool (rsync --delete-after) copied files in under their own names, which
            # are never listed, then removes every listed name it did not copy: the very instances.
            raise FsError(errno.EBUSY, f"rm {p}: this instance was just copied into this folder as "
                          f"{named[0]}, which stands for it; remove that name to delete it", logging.WARNING)
        with self._upload_slot(p.store, uid):  # a copy of it closed meanwhile goes before or after
            self._remove_instance(p, uid)
        log.info("Deleted instance %s", p)

    def _remove_instance(self, p: DicomPath, uid: str) -> None:
        # The server's copy goes first: if it cannot, nothing changed (a queued copy stays
        # queued). Then a copy still waiting in the write-back queue is dropped, never sent; a
        # copy being sent cannot be stopped: it is deleted once the server confirms it.
        # The queue journals it, so that a restart does not bring the file back.
        removed = (p.store, uid)
        uids = DicomUids(p.study, p.series, uid)
        if self.writeback is not None:
            self.writeback.mark_removed(p.store, uids)
        try:
            self._remote(f"delete {p}", self._store(p.store).delete_instance, p.study, p.series, uid)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                if self.writeback is not None:
                    self.writeback.mark_removed(p.store, uids, False)
                raise
            # Not on the server: not sent yet, or gone already (another client, or a DELETE
            # whose answer was lost and whose retry found nothing). Gone is what rm asks for.
        if self.writeback is not None:
            self.writeback.cancel(p.store, uids)
            self.writeback.mark_removed(p.store, uids)  # one may have started meanwhile
        self.listings.note_removed(p.parent, p.name)
        self.cache.evict(self._key(p))
        with self._lock:
            self._stored_here.pop(removed, None)
            for name in self._aliases.names_of(p.store, uid):
                del self._aliases[name]  # other names written for it (cp B over A.dcm) go too
            self._times.pop(p, None)
            self._replaces.pop((p.store, uid), None)  # its queued copy was dropped: it replaces nothing

    def create(self, path: str) -> OpenResult:
        p = DicomPath.parse(path)
        if p.too_deep:
            raise FsError(errno.ENOENT, f"create: no such folder: {p.parent}")
        if p.is_side_file:
            return OpenResult(self._create_local(p), direct_io=True)
        with self._lock:
            node = self._local.get(p)
        if node is not None and node.placeholder:
            return self._fill_placeholder(p, node, truncate=True)
        parent = self.getattr(str(p.parent))
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, f"create: not a folder: {p.parent}")
        self.policy.check(Op.UPLOAD, p.level, str(p))
        if p.level == Level.INSTANCE and self._exists(p):
            return self._open_instance_for_writing(p, truncate=True)
        with self._lock:
            self._aliases.pop(p, None)
        # Not dirty: a file closed empty is not an upload. Finder and Explorer create the file
        # empty and close it before they copy into it; it stays a local placeholder.
        return self._new_write_handle(p, overwrites=None, seed_from=None, dirty=False, new=True)

    def open(self, path: str, flags: int, caller: Caller | None = None) -> OpenResult:
        p = DicomPath.parse(path)
        self.stat_probes.opened(caller, p)
        writing = (flags & portable.ACCMODE) != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC)
        with self._lock:
            node = self._local.get(p)
            alias = self._aliases.get(p)
            pending = self._pending.get(p)
        if node is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR, f"open: is a folder: {p}")
            assert node.path is not None
            if node.placeholder and writing:
                return self._fill_placeholder(p, node, truncate)
            fd = portable.open_fd(node.path, os.O_RDWR | (os.O_TRUNC if truncate else 0))
            return OpenResult(self._add_handle(LocalHandle(node, fd)), direct_io=True)
        if writing:
            if alias is not None:  # a name just uploaded: writing it again overwrites that instance
                target = None if truncate else self._alias_target(p, alias)
                return self._new_write_handle(p, overwrites=alias.ident, seed_from=target, dirty=truncate)
            if pending is not None:
                return self._new_write_handle(p, overwrites=None, seed_from=None, dirty=truncate)
            return self._open_instance_for_writing(p, truncate)
        if alias is not None:
            target = self._alias_target(p, alias)
            return self._open_read(target)
        if pending is not None:
            opened = self._open_pending(pending)
            if opened is not None:
                return opened
        queued = self._open_queued(p)
        return queued if queued is not None else self._open_read(p)

    def _open_pending(self, pending: WriteHandle) -> OpenResult | None:
        """The bytes of a file still open for writing; None once a write-back flush has handed
        them to the queue (moved there, while the writer may hold the file open for long): the
        name then reads as the queued instance, from the cache or the queue."""
        if not pending.queued:
            try:
                fd = portable.open_fd(pending.spool_path, os.O_RDONLY)
            except FileNotFoundError:
                with pending.lock:  # being moved into the queue right now: until that is done
                    pass
                if not pending.queued:
                    raise
            else:
                return OpenResult(self._add_handle(LocalHandle(LocalNode(False, pending.spool_path), fd)),
                                  direct_io=True)
        with self._lock:
            alias = self._aliases.get(pending.path)
        return self._open_read(self._alias_target(pending.path, alias)) if alias is not None else None

    def _open_queued(self, p: DicomPath) -> OpenResult | None:
        """An instance waiting in the write-back queue whose cached copy is gone (evicted from a
        small cache): read from the queue's own copy, as the server does not have it yet."""
        uid = instance_uid(p.name) if p.level == Level.INSTANCE else None
        if self.writeback is None or uid is None or self.cache.known_size(self._key(p)) is not None:
            return None
        path = self.writeback.queued_copy(p.store, DicomUids(p.study, p.series, uid))
        if path is None:
            return None
        try:
            fd = portable.open_fd(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # sent and removed meanwhile: the server has it
        return OpenResult(self._add_handle(LocalHandle(LocalNode(False, path), fd)), direct_io=True)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        handle = self._handle(fh)
        if isinstance(handle, ReadHandle):
            entry = handle.entry if handle.fd >= 0 and handle.entry is not None else self._start_reading(handle)
            try:
                data = self.cache.read(entry, handle.fd, offset, size)
            except StoreError as exc:
                raise from_store_error(exc, f"read {handle.path}") from None
            if entry.complete and handle.expected_size is not None and entry.written != handle.expected_size:
                self._size_changed(handle, entry.written)
            return data
        return portable.pread(handle.fd, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        handle = self._handle(fh)
        if isinstance(handle, ReadHandle):
            raise FsError(errno.EBADF, "write to a file opened read-only")
        if isinstance(handle, WriteHandle):
            if handle.queued:
                raise FsError(errno.EIO, f"write: {handle.path} was handed to the upload queue at close; "
                              "open it again to change it", logging.ERROR)
            if offset + len(data) > self.cache.max_file:
                handle.write_error = errno.EFBIG
                raise FsError(errno.EFBIG, f"write: {handle.path} would exceed the largest file "
                              f"(cacheSize/4 = {self.cache.max_file} bytes)", logging.ERROR)
            handle.dirty = not handle.discarded
            try:
                try:
                    return portable.pwrite(handle.fd, data, offset)
                except OSError as exc:
                    # The disk is full: copies nobody reads give way to the upload (the spool and
                    # the cache share a disk), once.
                    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
                    if not full or not self.cache.give_way(len(data) + GIVE_WAY_BYTES):
                        raise
                    return portable.pwrite(handle.fd, data, offset)
            except OSError as exc:  # the spool's disk is full (ENOSPC, EDQUOT) or failing
                handle.write_error = exc.errno or errno.EIO
                raise FsError(handle.write_error, f"write: {handle.path}: {exc.strerror or exc} "
                              f"(the cache folder's disk)", logging.ERROR) from None
        return portable.pwrite(handle.fd, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        handle = self._handle(fh, required=False) if fh is not None else None
        if handle is None:
            p = DicomPath.parse(path)
            with self._lock:
                node = self._local.get(p)
                handle = self._pending.get(p)
            if node is not None and node.path is not None and not node.is_dir:
                os.truncate(node.path, length)
                return
        if isinstance(handle, (WriteHandle, LocalHandle)):
            if isinstance(handle, WriteHandle):
                if handle.queued:  # its fd is the queued file itself, shared with the cache
                    raise FsError(errno.EIO, f"truncate: {handle.path} was handed to the upload queue; "
                                  "open it again to change it", logging.ERROR)
                if handle.overwrites is not None and not handle.dirty and length == handle.size and length > 0:
                    return  # to its own size (rsync --inplace of an unchanged file): changes nothing
                if length > 0 and handle.overwrites is not None and not handle.dirty:
                    # An instance opened for writing and cut to a size before anything was written
                    # (truncate -s N): not a rewrite. Cutting to 0 is how WinFsp and macFUSE
                    # without atomic O_TRUNC start a replacement, so that one is let through.
                    raise FsError(errno.EPERM, f"truncate: {handle.path} changes only by writing it anew "
                                  "(open with O_TRUNC)")
                handle.dirty = not handle.discarded
            os.ftruncate(handle.fd, length)
            return
        p = DicomPath.parse(path)
        attr = self.getattr(path)
        if not attr.is_dir and attr.size_known and attr.size == length:
            return  # a no-op truncate (e.g. to the current size) loses nothing
        self.policy.check(Op.TRUNCATE, p.level, str(p))

    def flush(self, fh: int) -> None:
        handle = self._handle(fh)
        if isinstance(handle, WriteHandle) and handle.dirty:
            self._upload(handle)

    def fsync(self, fh: int) -> None:
        """Like :meth:`flush`; in write-back mode the queued bytes are also on disk when it
        returns (close() alone leaves that to the queue's group commit, about a second later),
        whichever handle it comes through (``sync FILE`` opens the file read-only)."""
        handle = self._handle(fh)
        if isinstance(handle, WriteHandle) and handle.dirty:
            self._upload(handle, durable=True)
        self.sync()  # also when a flush of the same file queued it meanwhile

    def sync(self) -> None:
        """Write every upload queued without fsync to disk (FlushFileBuffers of a whole volume,
        fsync of a file). EIO when one could not be written."""
        if self.writeback is None:
            return
        try:
            self.writeback.sync()
        except OSError as exc:
            raise FsError(errno.EIO, f"fsync: {exc.strerror or exc}", logging.ERROR) from None

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is None:
            return
        if isinstance(handle, ReadHandle):
            with handle.lock:
                entry = handle.entry
                if entry is not None:
                    self._close_fd(handle.fd)
                    self.cache.release(entry)
            expected = handle.expected_size
            if entry is not None and expected is not None:
                # The reader may have stopped at the old size: said once the download has ended
                # (it may still be arriving when a quick reader closes).
                self.cache.when_complete(entry, lambda size: size > expected and self._size_changed(handle, size))
            return
        if isinstance(handle, WriteHandle):
            with self._lock:
                if self._pending.get(handle.path) is handle:
                    del self._pending[handle.path]
            if handle.dirty:  # no flush reached us (or it failed and the file changed since)
                try:
                    self._upload(handle)
                except FsError as exc:
                    log.debug("Upload at release failed: %s", exc)
                except Exception:  # a bug: the handle is still closed, and the bytes kept, not lost
                    log.exception("Upload of %s at release failed unexpectedly", handle.path)
                    handle.dirty = False
                    self._keep_failed(handle, "unexpected error; see the log")
            handle.closed_size = handle.size
            empty = handle.new and handle.closed_size == 0  # the size only matters for a new file
            self._close_fd(handle.fd)  # first: Windows cannot move or delete a file that is open
            if handle.queued:
                pass  # the queue owns the bytes; the cache shares them already
            elif empty and not handle.discarded and handle.uploaded is None and not handle.dirty:
                self._keep_placeholder(handle)
            elif handle.uploaded is not None and not handle.dirty and not handle.altered:
                ident = handle.uploaded
                self._adopt_stored((handle.path.store, ident.study_uid, ident.series_uid, ident.sop_uid),
                                   handle.spool_path)
            elif handle.spool_path.parent == self.spool.directory:
                Spool.discard(handle.spool_path)  # never written, or stored as the server changed it
            return
        self._close_fd(handle.fd)

    def discard(self, fh: int) -> None:
        """Close ``fh`` without uploading what was written through it: the program deletes the
        file it was writing (a copy cancelled in Explorer). Other handles: as release."""
        with self._lock:
            handle = self._handles.get(fh)
            if isinstance(handle, WriteHandle):
                del self._handles[fh]
        if not isinstance(handle, WriteHandle):
            self.release(fh)
            return
        self._drop_unsent(handle)
        with handle.lock:
            self._close_fd(handle.fd)  # first: Windows cannot delete a file that is open
            if not handle.queued and handle.uploaded is None and handle.spool_path.parent == self.spool.directory:
                Spool.discard(handle.spool_path)

    def _drop_unsent(self, handle: WriteHandle) -> None:
        """The name of a file being written is removed before its upload: nothing is sent, now
        or at flush or close (writes through a handle still open go nowhere, as on a disk)."""
        with handle.lock:
            handle.dirty = False
            handle.discarded = True
        with self._lock:
            if self._pending.get(handle.path) is handle:
                del self._pending[handle.path]
        log.info("%s was deleted before it was sent; nothing uploaded", handle.path)

    def check_delete(self, path: str) -> None:
        """Raise the FsError that unlink or rmdir of ``path`` would raise for a reason known
        in advance (no such name, deletion disabled, a level that cannot be deleted, a folder
        that is not empty); nothing changes. The server may still refuse later."""
        p = DicomPath.parse(path)
        with self._lock:
            node = self._local.get(p)
            if node is not None or p in self._aliases or p in self._pending:
                if node is not None and node.is_dir and any(lp.parent == p for lp in self._local):
                    raise FsError(errno.ENOTEMPTY, f"delete: not empty: {p}")
                return
        attr = self.getattr(path)
        self.policy.check(Op.RMDIR if attr.is_dir else Op.UNLINK, p.level, str(p))
        if attr.is_dir:
            self._require_empty_store(p, "delete")

    # -- attributes that change nothing ----------------------------------------------------

    def set_times(self, path: str, mtime: float | None) -> None:
        """utimens, touch, cp -p, rsync -a: the file shows ``mtime`` (seconds) from now on, while
        mounted (None: unchanged). Nothing reaches the server; a folder's time stays as it is."""
        attr = self.getattr(path)
        if mtime is None or attr.is_dir:
            return
        p = DicomPath.parse(path)
        with self._lock:
            alias = self._aliases.get(p)
            self._times[self._alias_target(p, alias) if alias is not None else p] = mtime
            for h in self._handles.values():  # cp -p sets it before close: it goes with the bytes
                if isinstance(h, WriteHandle) and h.path == p:
                    h.given_mtime = mtime

    def setattr_noop(self, path: str) -> None:
        """chmod, chown, utimens: accepted without effect so ``cp -a``/``rsync -a`` succeed."""
        self.getattr(path)

    def link(self, path: str) -> None:
        p = DicomPath.parse(path)
        self.policy.check(Op.LINK, p.level, str(p))

    # -- extended attributes: in memory for the mount's life -------------------------------

    def setxattr(self, path: str, name: str, value: bytes, *, create: bool = False, replace: bool = False) -> None:
        """``create`` (XATTR_CREATE): EEXIST if it is set already; ``replace`` (XATTR_REPLACE):
        ENODATA if it is not."""
        p = DicomPath.parse(path)
        self.getattr(path)
        if name == CACHED_XATTR:
            raise FsError(errno.EPERM, f"attribute {name} is read-only")
        with self._lock:
            attrs = self._xattrs.setdefault(p, {})
            if create and name in attrs:
                raise FsError(errno.EEXIST, f"attribute {name} exists")
            if replace and name not in attrs:
                raise FsError(ENOATTR, f"no attribute {name}")
            attrs[name] = bytes(value)

    def getxattr(self, path: str, name: str) -> bytes:
        p = DicomPath.parse(path)
        if name == CACHED_XATTR and p.level == Level.INSTANCE and not self.getattr(path).is_dir:
            return b"yes" if self.cache.known_size(self._key(p)) is not None else b"no"
        with self._lock:
            value = self._xattrs.get(p, {}).get(name)
        if value is None:
            self.getattr(path)
            raise FsError(ENOATTR, f"no attribute {name}")
        return value

    def listxattr(self, path: str) -> list[str]:
        p = DicomPath.parse(path)
        with self._lock:
            return sorted(self._xattrs.get(p, {}))

    def removexattr(self, path: str, name: str) -> None:
        p = DicomPath.parse(path)
        with self._lock:
            if self._xattrs.get(p, {}).pop(name, None) is None:
                raise FsError(ENOATTR, f"no attribute {name}")

    # ======================================================================================
    # internals: resolution

    def _file_attr(self, size: int | None, p: DicomPath | None = None) -> Attr:
        mtime = self._times.get(p, self.mounted_at) if p is not None else self.mounted_at
        return Attr(False, size or 0, mtime, size_known=size is not None)

    def _local_node_attr(self, node: LocalNode, p: DicomPath) -> Attr:
        mtime = self._times.get(p, node.mtime)
        if node.is_dir:
            return Attr(True, mtime=mtime)
        size = node.path.stat().st_size if node.path is not None else 0
        return Attr(False, size, mtime)

    def _local_attr(self, p: DicomPath) -> Attr | None:
        with self._lock:
            node = self._local.get(p)
            alias = self._aliases.get(p)
            pending = self._pending.get(p)
        if node is not None:
            return self._local_node_attr(node, p)
        if pending is not None:
            return self._file_attr(pending.size, p)
        if alias is not None:
            # What the instance is now (overwritten since, or removed by another client), not what
            # was copied: a size kept with the name would cut a larger instance's reads short.
            try:
                return self.getattr(str(self._alias_target(p, alias)))
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                with self._lock:
                    if self._aliases.get(p) is alias:
                        del self._aliases[p]
        return None

    def _exists(self, p: DicomPath) -> bool:
        try:
            self.getattr(str(p))
            return True
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise

    def _require_dir(self, p: DicomPath) -> None:
        if p.parts and not self.getattr(str(p)).is_dir:
            raise FsError(errno.ENOTDIR, f"not a folder: {p}")

    def _resolve(self, p: DicomPath) -> Entry:
        """The entry a remote path names, from the listing cache or one lookup request."""
        if p.is_side_file or not p.names_remote_object:
            raise FsError(errno.ENOENT, f"no such entry: {p}")
        if not p.parts:
            return Entry(True)
        known = self.listings.lookup(p.parent, p.name)
        if isinstance(known, Entry):
            return known  # named in its folder's listing: the folders above exist
        if p.level > Level.STORE:
            parent = self._resolve(p.parent)
            if not parent.is_dir:
                raise FsError(errno.ENOTDIR, f"not a folder: {p.parent}")
        known = self.listings.lookup(p.parent, p.name)
        if known is False:
            raise FsError(errno.ENOENT, f"no such entry: {p}")
        if isinstance(known, Entry):
            return known
        entry = self._lookup_remote(p)
        if entry is None:
            self.listings.remember_absent(p)
            raise FsError(errno.ENOENT, f"no such entry: {p}")
        self.listings.remember_present(p.parent, p.name, entry)
        return entry

    def _lookup_remote(self, p: DicomPath) -> Entry | None:
        """Ask the server for one name that no cached listing holds."""
        doing = f"look up {p}"
        if p.level == Level.STORE:
            listing = self._listing(ROOT)
            return listing.get(p.name)
        store = self._store(p.store)
        if p.level == Level.STUDY:
            found = self._remote(doing, lambda: next(iter(store.studies(p.study)), None))
            return Entry(True) if found else None
        if p.level == Level.SERIES:
            found = self._remote(doing, lambda: next(iter(store.series(p.study, p.series)), None))
            return Entry(True) if found else None
        uid = instance_uid(p.name)
        info = self._remote(doing, lambda: next(iter(store.instances(p.study, p.series, uid)), None))
        return Entry(False, info.size) if info else None

    def _listing(self, p: DicomPath) -> dict[str, Entry]:
        cached = self.listings.get(p)
        if cached is not None:
            return cached
        if p.level in (Level.STUDY, Level.SERIES) and self._walk_if_cheaper(p):
            cached = self.listings.get(p)
            if cached is not None:
                return cached
        return self._listing_from_server(p)

    def _listing_from_server(self, p: DicomPath) -> dict[str, Entry]:
        """The listing of ``p`` from the server, asked once for every caller that wants it at the
        same time (eight readers of a data loader starting on one series: one request, not eight)."""
        with self._lock:
            flight = self._listing_flights.get(p)
            if flight is None:
                failed = self._listing_failed.get(p)
                if failed is not None and time.monotonic() - failed.ended < LISTING_FAILURE_REUSE_S:
                    flight = failed  # the kernel asked again right after: the same answer
            leading = flight is None
            if flight is None:
                flight = self._listing_flights[p] = _Flight()
        if not leading:
            flight.done.wait()
            if isinstance(flight.error, FsError):  # each caller raises its own
                raise FsError(flight.error.errno or errno.EIO, flight.error.strerror or "", flight.error.level)
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        try:
            flight.result = self._ask_listing(p)
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            flight.ended = time.monotonic()
            with self._lock:
                del self._listing_flights[p]
                if isinstance(flight.error, FsError):
                    # Bounded by what failed in the last moments (an outage fails every folder).
                    for old in [f for f, o in self._listing_failed.items()
                                if flight.ended - o.ended >= LISTING_FAILURE_REUSE_S]:
                        del self._listing_failed[old]
                    self._listing_failed[p] = flight
                else:
                    self._listing_failed.pop(p, None)
            flight.done.set()

    def _ask_listing(self, p: DicomPath) -> dict[str, Entry]:
        doing = f"list {p}"
        if p.level == Level.ROOT:
            children = [(n, Entry(True)) for n in self._remote(doing, lambda: list(self.dataset.list_stores()))]
        else:
            store = self._store(p.store)
            if p.level == Level.STORE:
                children = [(u, Entry(True)) for u in self._remote(doing, lambda: list(store.studies()))]
            elif p.level == Level.STUDY:
                children = [(u, Entry(True)) for u in self._remote(doing, lambda: list(store.series(p.study)))]
            else:
                infos = self._remote(doing, lambda: list(store.instances(p.study, p.series)))
                children = [(instance_name(i.sop_uid), Entry(False, i.size)) for i in infos]
        log.debug("Listed %s: %d entries", p, len(children))
        return self.listings.put(p, children)

    def _walk_if_cheaper(self, p: DicomPath) -> bool:
        """When folders of a store are being listed one after another (ls -R, find, du, cp -r),
        walk the whole store once, paged (one request per page of instances, not one per
        folder), to fill every study and series listing. The walk runs in the background;
        listings wait for it at most ``walk_grace`` seconds after it started, then go on folder by
        folder, so even the walk of a huge store never holds a listing up for long. True when a
        walk was waited for (the listing may be cached now)."""
        with self._lock:
            running = self._walking.get(p.store)
        if running is None:
            store_listing = self.listings.get(DicomPath((p.store,)))
            hint = len(store_listing) if store_listing is not None else None
            if not self.walks.listed(p.store, p.level, hint, folder=p):
                return False
            with self._lock:
                running = self._walking.get(p.store)
                if running is None:
                    running = self._walking[p.store] = _Walk()
                    threading.Thread(target=self._walk_in_background, args=(p.store, running),
                                     name="store-walk", daemon=True).start()
        left = running.started + self.config.walk_grace - time.monotonic()
        return left > 0 and running.done.wait(left)

    def _walk_in_background(self, store: str, walk: _Walk) -> None:
        try:
            self._walk_store(store)
        except FsError as exc:
            log.info("Walk of store %s failed (%s); listing folder by folder", store, exc.strerror)
        finally:
            with self._lock:
                if self._walking.get(store) is walk:
                    del self._walking[store]
            walk.done.set()

    def _walk_store(self, name: str) -> None:
        store = self._store(name)
        if not isinstance(store, WalkableStore):
            return
        started = time.monotonic()
        try:
            tree = build_tree(store.walk())
        except StoreError as exc:
            log.info("Walk of store %s failed (%s); listing folder by folder", name, exc)
            return
        folders = 0
        for folder, children in tree.listings(name):
            self.listings.put(folder, children)
            folders += 1
        log.debug("Walked store %s: %d studies, %d folders listed in %.2f s", name, len(tree.studies), folders,
                  time.monotonic() - started)

    def _store(self, name: str) -> Store:
        with self._lock:
            store = self._stores.get(name)
        if store is None:
            store = self._remote(f"open store {name}", self.dataset.open_store, name)
            with self._lock:
                store = self._stores.setdefault(name, store)
        return store

    @staticmethod
    def _key(p: DicomPath) -> CacheKey:
        return (p.store, p.study, p.series, instance_uid(p.name) or p.name)

    def _remote(self, doing: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except StoreError as exc:
            raise from_store_error(exc, doing) from None

    # ======================================================================================
    # internals: handles

    def _add_handle(self, handle: Handle) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    def _handle(self, fh: int | None, required: bool = True) -> Handle:
        with self._lock:
            handle = self._handles.get(fh) if fh is not None else None
        if handle is None and required:
            raise FsError(errno.EBADF, f"no open file {fh}")
        return handle  # type: ignore[return-value]

    @staticmethod
    def _close_fd(fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def _open_read(self, p: DicomPath) -> OpenResult:
        entry = self._resolve(p)
        if entry.is_dir:
            raise FsError(errno.EISDIR, f"open: is a folder: {p}")
        self.policy.check(Op.READ, p.level, str(p))
        # The OS may hold size 0 for a file the listing gave no size for (an earlier stat), even
        # if the cache has learnt it since (read-ahead): treat it as unknown to the OS.
        size_before = self._size_of(p, entry)
        if size_before is not None and size_before != entry.size:
            # The OS may hold the listed size (0 for a listing without sizes, where read-ahead
            # learnt it); the listing keeps it once the cached copy is gone.
            self._learnt_size(p, size_before)
        if size_before is not None and size_before > self.cache.max_file:
            # Refused here, as for a file of unknown size: a mapping of it (numpy.memmap) would
            # fail only at its first page, with SIGBUS.
            raise FsError(errno.EFBIG, f"open {p}: {size_before} bytes, more than a quarter of --cacheSize")
        handle = ReadHandle(p, size_before)
        if size_before is None:
            # The OS holds size 0 for this file: learn the true size before open returns, so
            # fstat after open (rsync, tar's check) sees it.
            cached = self._start_reading(handle)
            try:
                size = cached.wait_complete()
            except BaseException as exc:  # a failed download, EFBIG, a full disk: nothing kept open
                self._close_fd(handle.fd)
                self.cache.release(cached)
                if isinstance(exc, StoreError):
                    raise from_store_error(exc, f"read {p}") from None
                raise
            # Told the true size, the OS reads through its page cache (and a program can map the
            # file); if it could not be told, it would stop at size 0 unless reads bypass that.
            unsized = not self._learnt_size(p, size)
        else:
            unsized = False
            # A copy cached now is the one it reads, pinned now, not at the first read, when it
            # may have expired: what the OS keeps of the file is decided for that copy. (Pinned
            # only: a warm read from the OS's pages opens nothing more.)
            handle.entry = self.cache.pin_fresh(self._key(p))
        direct, keep = self._page_cache_use(handle, unsized)
        return OpenResult(self._add_handle(handle), direct_io=direct, keep_cache=keep, no_flush=True)

    def _page_cache_use(self, handle: ReadHandle, unsized: bool) -> tuple[bool, bool]:
        """(direct_io, keep_cache) for a handle being opened. The OS has one page cache per
        file, shared by every program that reads it; the instance may have been replaced on the
        server since its pages were read, and each handle reads the copy it pinned. So the OS
        keeps its pages only when they came from this handle's copy; else it drops them, unless
        another program still reads the copy they came from: then this handle bypasses the page
        cache, and neither sees bytes of the other's version."""
        p = handle.path
        with self._lock:
            owner = self._page_owner.get(p)
            entry = handle.entry
            if unsized:
                handle.direct = True
                return True, False
            if entry is not None and owner == entry.serial:
                self._page_owner.move_to_end(p)
                return False, True
            if owner is not None and owner != _PAGES_PENDING and any(
                    isinstance(h, ReadHandle) and h.path == p and not h.direct and h.entry is not None
                    and h.entry.serial == owner for h in self._handles.values()):
                handle.direct = True
                return True, False
            self._page_owner[p] = entry.serial if entry is not None else _PAGES_PENDING
            self._page_owner.move_to_end(p)
            while len(self._page_owner) > _PAGE_OWNERS:
                self._page_owner.popitem(last=False)  # forgotten: that file's next open drops its pages
            return False, False

    def _size_changed(self, handle: ReadHandle, size: int) -> None:
        """The instance downloaded for ``handle`` is not the size it was listed with: it changed
        on the server since. Later stats and opens show the new size; a program already reading
        it may have stopped at the old one (the OS limits reads to the size it was told), so it
        is said in the log."""
        listed, handle.expected_size = handle.expected_size, size
        if listed is not None and size < listed:
            # The OS takes the end of the file from this short read by itself: telling it to
            # forget the file's size meanwhile would make it fill the rest up to the old size
            # with zeros instead.
            self.listings.update_size(handle.path.parent, handle.path.name, size)
            return
        log.warning("%s changed on the server since it was listed (%s bytes, now %d): a copy made "
                    "just now may be incomplete; copy it again", handle.path, listed, size)
        self._learnt_size(handle.path, size, in_read=True)

    def _learnt_size(self, p: DicomPath, size: int, *, in_read: bool = False) -> bool:
        """Listings show ``size`` for instance ``p`` from now on, and the OS is told to forget
        the size it holds; True when it was told. ``in_read``: called while the OS holds the
        pages being read, which its invalidation would wait for: told from another thread."""
        self.listings.update_size(p.parent, p.name, size)
        if in_read:
            threading.Thread(target=self.notify_changed, args=(str(p),), daemon=True).start()
            return False
        return bool(self.notify_changed(str(p)))

    def _start_reading(self, handle: ReadHandle) -> CachedInstance:
        """The first read of ``handle``: its cache entry (pinned at open when it was cached then,
        else now, downloading it if needed), the cache file opened, and read-ahead told a
        program goes through this folder."""
        for again in (True, False):
            cached = self._pin_copy(handle)
            with handle.lock:
                if handle.fd >= 0:
                    return cached
                try:
                    handle.fd = portable.open_fd(cached.path, os.O_RDONLY)
                    break
                except FileNotFoundError:
                    if not again:
                        raise
                    # Its file was deleted behind the mount (the cache folder removed): that copy
                    # is forgotten and the instance downloaded again; nothing was read from it yet.
                    handle.entry = None
                    self.cache.release(cached, gone=True)
        self.readahead.opened(handle.path)
        return cached

    def _pin_copy(self, handle: ReadHandle) -> CachedInstance:
        """The cached copy ``handle`` reads, pinned (downloading it if needed): chosen once."""
        with handle.lock:
            if handle.entry is not None:
                return handle.entry
            cached = handle.entry = self._cache_open(handle.path, handle.expected_size)
        if not handle.direct:
            with self._lock:
                if self._page_owner.get(handle.path) == _PAGES_PENDING:  # opened before its copy was known
                    self._page_owner[handle.path] = cached.serial
        return cached

    def _cache_open(self, p: DicomPath, expected_size: int | None = None, *, claim: bool = True) -> CachedInstance:
        """The pinned cache entry of instance ``p``, downloading it if needed (single-flight);
        ``claim=False`` for a stat's fetch (see InstanceCache.open)."""
        key = self._key(p)
        store = self._store(p.store)
        return self.cache.open(key, lambda sink: store.retrieve(p.study, p.series, key[3], sink), expected_size,
                               claim=claim)

    def _file_names(self, folder: DicomPath) -> list[str]:
        """The instance names of a series folder in the order readdir gives them (sorted):
        the order cp -r, tar and rsync go through them."""
        try:
            return sorted(name for name, entry in self._listing(folder).items() if not entry.is_dir)
        except FsError:
            return []

    def _prefetch(self, p: DicomPath) -> bool:
        """Fetch instance ``p`` ahead of time; False when the cache has no room for it now."""
        key = self._key(p)
        known = self.listings.lookup(p.parent, p.name)
        size = known.size if isinstance(known, Entry) else None
        try:
            store = self._store(p.store)
        except FsError:
            return True  # nothing to fetch ahead from; not a matter of room
        return self.cache.prefetch(key, lambda sink: store.retrieve(p.study, p.series, key[3], sink), size)

    @staticmethod
    def _wait_while_arriving(cached: CachedInstance, stall: float) -> int | None:
        """The size of a download once it ends (re-raising its error), waiting as long as its
        bytes keep arriving; None once none came for ``stall`` seconds. A slow link is waited
        for: a stat that gave up on a large file still arriving would show size 0, and tar
        would archive it empty."""
        seen = cached.written
        while True:
            size = cached.wait_complete(stall)
            if size is not None:
                return size
            if cached.written == seen:
                return None
            seen = cached.written

    def _fetch_size(self, p: DicomPath) -> int | None:
        """Fetch an instance into the cache to learn its size (bounded wait)."""
        try:
            cached = self._cache_open(p, claim=False)
        except FsError as exc:
            if exc.errno != errno.EFBIG:
                raise
            return None
        with self._lock:
            stalled = self._stat_gave_up.pop(p, None)
        if stalled == (cached.serial, cached.written) and not cached.complete:
            # A stat just gave up on this very download, and no byte came since: the kernel's
            # LOOKUP then GETATTR of one stat would each wait the whole time.
            self._remember_stall(p, cached)
            self.cache.release(cached)
            return None
        try:
            size = self._wait_while_arriving(cached, self.config.stat_fetch_timeout)
            if size is None:
                self._remember_stall(p, cached)
        except StoreError as exc:
            raise from_store_error(exc, f"stat {p}") from None
        except FsError as exc:
            if exc.errno != errno.EFBIG:
                raise
            # Larger than the cache may hold: its size stays unknown (reading it is EFBIG),
            # and no other stat downloads it again.
            with self._lock:
                self._too_large[p] = None
            return None
        finally:
            self.cache.release(cached)
        if size is not None:
            self.listings.update_size(p.parent, p.name, size)
        return size

    def _remember_stall(self, p: DicomPath, cached: CachedInstance) -> None:
        with self._lock:
            self._stat_gave_up[p] = (cached.serial, cached.written)
            while len(self._stat_gave_up) > 1024:  # a bound: one entry per stalled download
                del self._stat_gave_up[next(iter(self._stat_gave_up))]

    def _open_instance_for_writing(self, p: DicomPath, truncate: bool) -> OpenResult:
        """Open an existing instance for writing: an overwrite, sent at close."""
        entry = self._resolve(p)
        if entry.is_dir:
            raise FsError(errno.EISDIR, f"open: is a folder: {p}")
        self.policy.check(Op.OVERWRITE, p.level, str(p))
        uid = instance_uid(p.name)
        assert uid is not None
        return self._new_write_handle(p, overwrites=DicomUids(p.study, p.series, uid),
                                      seed_from=None if truncate else p, dirty=truncate)

    def _new_write_handle(self, p: DicomPath, *, overwrites: DicomUids | None,
                          seed_from: DicomPath | None, dirty: bool, new: bool = False) -> OpenResult:
        """A spooled write handle for ``p``, starting with the bytes of ``seed_from`` if given
        (an open for writing without O_TRUNC edits the current content)."""
        spool_path, fd = self.spool.new_file()
        if seed_from is not None:
            self._copy_instance_into(seed_from, fd)
        handle = WriteHandle(p, spool_path, fd, overwrites=overwrites, dirty=dirty, new=new)
        with self._lock:
            self._pending[p] = handle
        return OpenResult(self._add_handle(handle), direct_io=True)

    def _keep_placeholder(self, h: WriteHandle) -> None:
        """A new file closed with nothing written: listed (size 0) until something is written
        into it, it is removed, or the mount ends; never sent (it is not DICOM yet)."""
        path = self._new_side_path()
        os.replace(h.spool_path, path)
        with self._lock:
            if h.path not in self._pending:  # no newer handle writes this name meanwhile
                self._local[h.path] = LocalNode(False, path, placeholder=True)
                path = None
        if path is not None:
            Spool.discard(path)
        log.info("%s was closed empty: it stays on this computer until something is written into it", h.path)

    def _fill_placeholder(self, p: DicomPath, node: LocalNode, truncate: bool) -> OpenResult:
        """Writing into an empty placeholder: from now on an upload like any new file."""
        assert node.path is not None
        fd = portable.open_fd(node.path, os.O_RDWR | (os.O_TRUNC if truncate else 0))
        handle = WriteHandle(p, node.path, fd, dirty=False, new=True)
        with self._lock:
            if self._local.get(p) is node:
                del self._local[p]
            self._pending[p] = handle
        return OpenResult(self._add_handle(handle), direct_io=True)

    def _copy_instance_into(self, p: DicomPath, fd: int) -> None:
        result = self._open_read(p)
        try:
            offset, chunk = 0, 1 << 20
            while True:
                data = self.read(result.fh, chunk, offset)
                if not data:
                    break
                portable.pwrite(fd, data, offset)
                offset += len(data)
        finally:
            self.release(result.fh)

    def _alias_target(self, p: DicomPath, alias: Alias) -> DicomPath:
        i = alias.ident
        return DicomPath((p.store, i.study_uid, i.series_uid, instance_name(i.sop_uid)))

    # ======================================================================================
    # internals: uploads

    def _upload(self, h: WriteHandle, *, durable: bool = False) -> None:
        """Check and send a written file. On failure the bytes stay in the spool (moved to
        ``failed/`` with a log line saying where) and FsError reaches close()."""
        with h.lock:
            if not h.dirty:
                return
            if h.overwrites is not None and h.size == 0:
                # Cut to 0 (truncate -s 0, or a replacement that wrote nothing): an instance
                # cannot be emptied, and there is nothing worth keeping.
                h.dirty = False
                log.warning("%s was emptied and closed: an instance cannot be emptied; it is unchanged", h.path)
                with self._lock:  # its name shows the instance again, not this empty file
                    if self._pending.get(h.path) is h:
                        del self._pending[h.path]
                self.notify_changed(str(h.path))  # the OS took size 0 from the truncate: it is not
                raise FsError(errno.EPERM, f"upload {h.path}: an instance cannot be emptied")
            if h.write_error is not None:
                # The program was told at write() and holds the whole file; the part written is
                # of no use to anyone (and on a full disk it keeps the disk full): not kept.
                h.dirty = False
                why = os.strerror(h.write_error)
                log.error("Upload of %s failed: a write to it failed (%s); nothing was sent, and the part "
                          "written is not kept", h.path, why)
                raise FsError(h.write_error, f"upload {h.path}: a write failed ({why})")
            try:
                ident = self._send(h, durable=durable)
            except FsError as exc:
                self._keep_failed(h, exc.strerror or str(exc))
                exc.level = logging.DEBUG  # _keep_failed logged the one ERROR line
                # close() says it failed and where the bytes are kept: they are not sent again
                # behind the user's back (at release, or Windows' second flush at cleanup); a
                # new copy, `dicomfuse retry`, or writing the file again sends them.
                h.dirty = False
                raise
            h.dirty = False
            h.uploaded = ident
            if h.spool_path.parent == self.spool.failed:  # kept after a failure, written and sent since
                Spool.discard(sidecar_path(h.spool_path))  # its bytes go with the handle (cache or queue)
                log.info("Upload of %s succeeded after all; its kept copy is no longer listed as failed", h.path)

    def _send(self, h: WriteHandle, *, durable: bool = False) -> DicomUids:
        """Check and send (or queue) the file. No fsync on the way: in sync mode the server has
        the file when this returns (failed bytes are fsynced when kept); in write-back mode the
        queue fsyncs in groups, or now when ``durable`` (an fsync() of the file)."""
        size = h.size
        if size > self.cache.max_file:
            raise FsError(errno.EFBIG, f"upload {h.path}: {size} bytes exceeds cacheSize/4", logging.ERROR)
        try:
            ident = inspect_dicom(h.spool_path)
        except FsError as exc:  # its errno as inspect_dicom says: EINVAL refuses the file, others are ours
            refused = " refused" if exc.errno == errno.EINVAL else ""
            raise FsError(exc.errno or errno.EIO, f"upload {h.path}{refused}: {exc.strerror}", logging.ERROR) from None
        replaced = self._replaced_by(h, ident)
        if not self.config.deletion_enabled:
            self._refuse_deleting(h, ident, replaced)
        if self.writeback is not None and self.config.upload_mode == "writeback":
            return self._queue(h, ident, size, durable, replaced)
        store_name = h.path.store
        if h.path.level == Level.INSTANCE and (ident.study_uid, ident.series_uid) != (h.path.study, h.path.series):
            log.info("Upload %s: the file belongs to study %s series %s, filed there by its UIDs",
                     h.path, ident.study_uid, ident.series_uid)
        target = DicomPath((store_name, ident.study_uid, ident.series_uid, instance_name(ident.sop_uid)))
        store = self._store(store_name)
        # Two copies of one instance closed at once would both find it absent and both be sent;
        # a server like Orthanc keeps the first and says "stored" to the second. One at a time,
        # the second is an overwrite of the first.
        with self._upload_slot(store_name, ident.sop_uid):
            existed = self._instance_exists(store, ident)
            if existed:
                h.altered = self._replace(store, target, ident, h.spool_path, h.path)
            else:
                try:
                    h.altered = self._store_file(store, h.spool_path, target, ident)
                except _Conflict:
                    # The server holds these UIDs already though its search index did not show
                    # them (Google's lags behind writes): this upload is an overwrite after all.
                    log.info("Upload %s: %s is on the server already; overwriting it", h.path, target)
                    existed = True
                    h.altered = self._replace(store, target, ident, h.spool_path, h.path)
            if replaced is not None:
                # Another instance written over this one's name (whether or not the server held
                # the one written already): the name now holds it, the old instance goes.
                self._delete_replaced(store_name, replaced)
            self._note_uploaded(h.path, target, ident, size, created=not existed, altered=h.altered,
                                given_mtime=h.given_mtime)
            self._note_stored_here(store_name, ident.sop_uid)
        log.info("Uploaded %s as %s", h.path, target)
        return ident

    @contextmanager
    def _upload_slot(self, store: str, sop_uid: str) -> Iterator[None]:
        """Held while an instance is uploaded (sync), queued (write-back) or removed: those go
        one at a time for one instance."""
        key = (store, sop_uid)
        with self._lock:
            slot = self._upload_slots.setdefault(key, _Slot())
            slot.users += 1
        try:
            with slot.lock:
                yield
        finally:
            with self._lock:
                slot.users -= 1
                if slot.users == 0:
                    del self._upload_slots[key]

    def _note_stored_here(self, store: str, sop_uid: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._stored_here[(store, sop_uid)] = now
            self._stored_here.move_to_end((store, sop_uid))
            while self._stored_here and (len(self._stored_here) > _STORED_HERE_MAX
                                         or now - next(iter(self._stored_here.values())) > self.listings.overlay_ttl):
                self._stored_here.popitem(last=False)

    def _stored_here_lately(self, store: str, sop_uid: str) -> bool:
        """Whether this mount saw the server store this instance within the time a search
        index may lag (the listings' overlay lifetime)."""
        with self._lock:
            at = self._stored_here.get((store, sop_uid))
        return at is not None and time.monotonic() - at < self.listings.overlay_ttl

    @staticmethod
    def _replaced_by(h: WriteHandle, ident: DicomUids) -> DicomUids | None:
        """The other instance whose name ``h`` was written over (cp B.dcm A.dcm): it goes once
        this one is stored. None when the file is the instance its name says, also when that
        name stood for another instance until now (A copied back over A.dcm gets its name back,
        and the other instance stays). An instance is its three UIDs: a file with A's SOP
        Instance UID but another study or series (an editor that re-assigns those) is another
        instance, filed under its own UIDs, and A goes as for any other file written over it."""
        old = h.overwrites
        if old is None or old == ident:
            return None
        if instance_uid(h.path.name) == ident.sop_uid and (
                h.path.level != Level.INSTANCE or (h.path.study, h.path.series) == (ident.study_uid, ident.series_uid)):
            return None  # the name, in its folder, is this instance's own
        return old

    def _refuse_deleting(self, h: WriteHandle, ident: DicomUids, replaced: DicomUids | None) -> None:
        """Deletion disabled: refuse at close what would delete an instance, before anything is
        sent or queued (a write-back upload would otherwise be refused later, behind the
        program's back). Sync mode refuses an overwrite of the same instance when it finds the
        stored bytes differ (:meth:`_replace`)."""
        if replaced is not None:
            which = (f"instance {ident.sop_uid}" if replaced.sop_uid != ident.sop_uid
                     else f"the instance of study {ident.study_uid} series {ident.series_uid}")
            raise FsError(errno.EPERM, f"upload {h.path}: {which} written over the name of instance "
                          f"{replaced.sop_uid} would delete that one; deletion is disabled", logging.ERROR)
        if self.config.upload_mode == "writeback" and self._differs_from_stored(h, ident):
            raise FsError(errno.EPERM, f"upload {h.path}: overwriting instance {ident.sop_uid} with other bytes "
                          "is refused: deletion is disabled", logging.ERROR)

    def _differs_from_stored(self, h: WriteHandle, ident: DicomUids) -> bool:
        """Whether the server holds this instance with other bytes than ``h`` (a fresh cached
        copy answers without asking it again)."""
        store = self._store(h.path.store)
        if not self._instance_exists(store, ident) or self._same_as_cached(ident, h.path.store, h.fd):
            return False
        path, fd = self.spool.new_file(BACKUP_SUFFIX)
        try:
            self._read_stored(store, ident, fd, f"read instance {ident.sop_uid} to compare")
            return not _same_content(fd, h.fd)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return False  # listed, but gone meanwhile
            raise
        finally:
            self._close_fd(fd)
            Spool.discard(path)

    def _read_stored(self, store: Store, ident: DicomUids, fd: int, doing: str) -> None:
        """The server's bytes of the instance into the empty spool file ``fd`` (FsError ENOENT
        when it is gone)."""
        try:
            with open(fd, "wb", closefd=False) as sink:
                self._remote(doing, store.retrieve, ident.study_uid, ident.series_uid, ident.sop_uid, sink)
        except OSError as exc:  # the local copy (a full disk): the server is not at fault
            raise FsError(exc.errno or errno.EIO, f"{doing}: cannot keep a local copy of the stored instance "
                          f"({exc.strerror or type(exc).__name__})", logging.ERROR) from None

    def _same_as_cached(self, ident: DicomUids, store: str, fd: int) -> bool:
        """Whether the fresh cached copy of the instance holds the bytes of ``fd``."""
        entry = self.cache.fresh((store, ident.study_uid, ident.series_uid, ident.sop_uid))
        if entry is None or not entry.complete:
            return False
        try:
            cached = portable.open_fd(entry.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            return _same_content(cached, fd)
        finally:
            self._close_fd(cached)

    def _queue(self, h: WriteHandle, ident: DicomUids, size: int, durable: bool,
               replaced: DicomUids | None) -> DicomUids:
        """Write-back: hand the checked file to the durable queue; it shows in its folder and
        reads back from the cache at once, and is uploaded in the background."""
        assert self.writeback is not None
        target = DicomPath((h.path.store, ident.study_uid, ident.series_uid, instance_name(ident.sop_uid)))
        self._store(h.path.store)  # an unknown store fails the copy now, not in the background
        replacing = replaced is not None
        existed = self._known_locally(target)
        with self._lock:  # before it is queued: its upload may be confirmed at once
            if replacing:
                self._replaces[(h.path.store, ident.sop_uid)] = replaced  # type: ignore[assignment]
            else:
                self._replaces.pop((h.path.store, ident.sop_uid), None)  # an older copy's, no longer meant
            # This instance is written again: an earlier copy of another one over its name no
            # longer replaces it (cp B.dcm A.dcm, then A back over A.dcm).
            for key in [k for k, old in self._replaces.items() if k[0] == h.path.store and old == ident]:
                del self._replaces[key]
        with self._upload_slot(h.path.store, ident.sop_uid):  # not in the middle of an rm of it
            try:
                item = self.writeback.submit(h.path.store, ident, h.spool_path, durable=durable)
            except (OSError, RuntimeError) as exc:
                if replacing:
                    with self._lock:
                        self._replaces.pop((h.path.store, ident.sop_uid), None)
                code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO  # ENOSPC: a full disk
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise FsError(code, f"upload {h.path}: could not queue it ({why})", logging.ERROR) from None
            h.queued = True
            try:
                self.cache.adopt(self._key(target), item.path, link=True)  # the queued bytes, no copy
            except OSError as exc:
                log.debug("cannot link the queued %s into the cache: %s", target, exc.strerror or exc)
            self._note_uploaded(h.path, target, ident, size, evict=False, created=not existed,
                                given_mtime=h.given_mtime)
        log.info("Queued %s for upload as %s", h.path, target)
        return ident

    def _send_batch(self, store_name: str, items: list[QueuedUpload]) -> list[tuple[QueuedUpload, bool, str | None]]:
        """The write-back queue's sender: one search per series (for the batch's UIDs where the
        store can, else of the whole series) says which files overwrite an instance; the new ones
        go in one STOW, the others through delete-then-store. Raises StoreError (the queue
        retries) when the server could not be reached."""
        try:
            store = self._store(store_name)
        except FsError as exc:
            raise Unavailable(exc.strerror or str(exc)) from None
        results: list[tuple[QueuedUpload, bool, str | None]] = []
        try:
            self._send_batch_to(store, store_name, items, results)
        except (Unavailable, LocalReadError):
            raise  # the server could not be reached, or the files read: the queue sends them later
        except StoreError as exc:  # refused for good (permission, bad request): no retry helps
            done = {id(r[0]) for r in results}
            results += [(item, False, str(exc)) for item in items if id(item) not in done]
        return results

    def _send_batch_to(self, store: Store, store_name: str, items: list[QueuedUpload],
                       results: list[tuple[QueuedUpload, bool, str | None]]) -> None:
        fresh: list[QueuedUpload] = []
        existing: list[QueuedUpload] = []
        by_series: dict[tuple[str, str], list[str]] = {}
        for item in items:
            by_series.setdefault((item.uids.study_uid, item.uids.series_uid), []).append(item.uids.sop_uid)
        present = {series: instances_present(store, *series, sop_uids) for series, sop_uids in by_series.items()}
        for item in items:
            u = item.uids
            on_server = (u.sop_uid in present[(u.study_uid, u.series_uid)]
                         or self._stored_here_lately(store_name, u.sop_uid))
            (existing if on_server else fresh).append(item)
        if fresh:
            for item, outcome in zip(fresh, store.store_files([i.path for i in fresh], [i.uids for i in fresh]),
                                     strict=True):
                if outcome.stored:
                    if outcome.altered:
                        self._stored_altered(item)
                    results.append((item, True, None))
                elif outcome.conflict:
                    existing.append(item)
                else:
                    results.append((item, False, outcome.reason or "refused by the server"))
        for item in existing:
            u = item.uids
            target = DicomPath((store_name, u.study_uid, u.series_uid, instance_name(u.sop_uid)))
            try:
                altered = self._replace(store, target, u, item.path, target)
            except FsError as exc:
                if exc.errno == errno.EIO:
                    raise Unavailable(exc.strerror or str(exc)) from None
                if not isinstance(exc, (_PreviousLost, _NoPrevious)):
                    with self._lock:
                        self._previous_kept.add(item.id)
                results.append((item, False, exc.strerror or str(exc)))
            else:
                if altered:
                    self._stored_altered(item)
                results.append((item, True, None))

    def _stored_altered(self, item: QueuedUpload) -> None:
        """The server stored ``item`` with changes of its own: when the upload ends, its cached
        copy (the queued bytes) goes, and the listing forgets its size."""
        with self._lock:
            self._altered.add(item.id)

    @staticmethod
    def _queued_target(item: QueuedUpload) -> DicomPath:
        u = item.uids
        return DicomPath((item.store, u.study_uid, u.series_uid, instance_name(u.sop_uid)))

    def _still_queued(self, folder: DicomPath, name: str) -> bool:
        """Whether a write-back upload not ended yet goes to ``folder/name`` (a study, a series or
        the instance): what the mount showed there stays shown, however long the server is down."""
        queue = self.writeback
        if queue is None or folder.level < Level.STORE:
            return False
        p = folder.child(name)
        if p.level == Level.INSTANCE:
            uid = instance_uid(name)
            return uid is not None and queue.holds(p.store, p.study, p.series, uid)
        return queue.holds(p.store, p.study, p.series if p.level == Level.SERIES else None)

    def _upload_done(self, item: QueuedUpload, stored: bool, reason: str | None) -> None:
        """A queued upload ended. A stored one stays listed while the server's index may lag
        behind; a refused one disappears from its folder again (the queue logged the ERROR line
        and kept its bytes in its failed folder)."""
        u = item.uids
        target = self._queued_target(item)
        with self._lock:
            previous_kept = item.id in self._previous_kept
            self._previous_kept.discard(item.id)
            altered = item.id in self._altered
            self._altered.discard(item.id)
            replaced = self._replaces.pop((item.store, u.sop_uid), None)
        if stored:
            if item.removed:
                self._delete_removed(target)
            elif self.listings.local_change(target.parent, target.name) is False:
                # rm'd after the queue took its last look at the upload: the rm deletes it from
                # the server (after this upload, which ended before); shown again, it would
                # stay listed for the overlay's lifetime, gone.
                log.debug("%s was removed as its upload ended; not listed again", target)
            else:
                self._note_stored_here(item.store, u.sop_uid)
                # it may have waited in the queue past the overlay
                self._keep_listed(target, None if altered else item.size)
                if altered and not (self.writeback is not None and self.writeback.has_pending(item.store, u)):
                    self.cache.evict(self._key(target))  # the queued bytes, not the server's
                    self.notify_changed(str(target))
            if replaced is not None:
                self._delete_replaced(item.store, replaced)
            return
        if self.writeback is not None and self.writeback.has_pending(item.store, u):
            return  # a newer copy is queued: the file stays in its folder, with the newer bytes
        self.cache.evict(self._key(target))  # it holds the refused bytes
        if previous_kept:  # the overwrite was refused: the previous instance is still there
            self.listings.note_added(target.parent, target.name, Entry(False))
        else:
            self.listings.note_removed(target.parent, target.name)

    def _delete_removed(self, target: DicomPath) -> None:
        """An upload confirmed after its file was removed (rm while it was being sent): the
        instance goes from the server, as the rm said."""
        try:
            self._store(target.store).delete_instance(target.study, target.series, instance_uid(target.name))
        except (StoreError, FsError) as exc:
            log.error("%s was removed while it was being uploaded, and deleting it from the server afterwards "
                      "failed (%s): it is on the server", target, exc)
            return
        self.cache.evict(self._key(target))
        log.info("Deleted instance %s: removed while it was being uploaded", target)

    def _instance_exists(self, store: Store, ident: DicomUids) -> bool:
        """Whether the server holds the instance. What this mount itself just stored or deleted
        wins over the server's answer: a search index (Google's) can lag behind writes."""
        series = DicomPath((store.name, ident.study_uid, ident.series_uid))
        local = self.listings.local_change(series, instance_name(ident.sop_uid))
        if local is not None:
            return local is not False
        found = self._remote(
            f"look up instance {ident.sop_uid}",
            lambda: next(iter(store.instances(ident.study_uid, ident.series_uid, ident.sop_uid)), None),
        )
        return found is not None

    def _store_file(self, store: Store, path: Path, target: DicomPath, ident: DicomUids) -> bool:
        """Store one checked file (``ident``: its UIDs, read when it was checked). True when the
        server said it stored the instance altered (coerced): the file is not its copy."""
        outcomes = self._remote(f"upload {target}", store.store_files, [path], [ident])
        outcome = outcomes[0] if outcomes else None
        if outcome is None or not outcome.stored:
            reason = outcome.reason if outcome is not None else "no answer for the file"
            kind = _Conflict if outcome is not None and outcome.conflict else FsError
            raise kind(errno.EINVAL, f"the server refused {target}: {reason}", logging.ERROR)
        if outcome.altered:
            log.info("%s: the server stored it with changes of its own; reads show its copy", target)
        return outcome.altered

    def _replace(self, store: Store, target: DicomPath, ident: DicomUids, source: Path, label: DicomPath) -> bool:
        """Overwrite an existing instance with the file ``source`` (written as ``label``):
        delete, then store; if the new bytes are refused, the old instance is stored back.
        Identical bytes change nothing. True when the server stored the new bytes altered."""
        backup_path, backup_fd = self.spool.new_file(BACKUP_SUFFIX)
        source_fd = portable.open_fd(source, os.O_RDONLY)
        try:
            try:
                # From the server, never the cache: in write-back mode the cache already holds the
                # queued new bytes, and a backup made of them would make the overwrite a no-op.
                self._read_stored(store, ident, backup_fd, f"read {target} before overwriting it")
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                # Listed but gone (a lagging search index, or deleted meanwhile): a new file.
                try:
                    return self._store_file(store, source, target, ident)
                except FsError as refused:  # no previous version stays: none was there
                    raise _NoPrevious(refused.errno or errno.EIO, refused.strerror or str(refused),
                                      refused.level) from None
            if _same_content(backup_fd, source_fd):
                log.info("Upload %s: identical to the stored instance, nothing to do", label)
                return False
            if not self.config.deletion_enabled:
                raise FsError(errno.EPERM, f"overwrite of {target} refused: deletion is disabled", logging.ERROR)
            # Deleting may empty the study on the server until the new bytes are stored: the
            # file and its folders stay listed meanwhile (an overwrite, not a disappearance).
            self._keep_listed(target, os.fstat(source_fd).st_size)
            self._remote(f"delete {target} to overwrite it", store.delete_instance,
                         ident.study_uid, ident.series_uid, ident.sop_uid)
            self.cache.evict(self._key(target))
            try:
                return self._store_file(store, source, target, ident)
            except FsError as refused:
                try:
                    self._store_file(store, backup_path, target, ident)
                    log.error("Overwrite of %s refused; the previous instance was stored back", target)
                    self._keep_listed(target, os.fstat(backup_fd).st_size)  # not the refused file's size
                    self.notify_changed(str(target))
                except FsError as exc:
                    kept = self.spool.keep_failed(backup_path, "previous-" + target.name, store=target.store,
                                                  reason=f"previous version of {target}, not stored back")
                    log.error("Overwrite of %s refused and the previous instance could not be stored "
                              "back (%s); its bytes are kept at %s", target, exc.strerror, kept)
                    raise _PreviousLost(refused.errno or errno.EIO, refused.strerror or str(refused),
                                        refused.level) from None
                raise
        finally:
            self._close_fd(source_fd)
            self._close_fd(backup_fd)
            Spool.discard(backup_path)

    def _delete_replaced(self, store_name: str, old: DicomUids) -> None:
        path = DicomPath((store_name, old.study_uid, old.series_uid, instance_name(old.sop_uid)))
        if not self.config.deletion_enabled:
            log.warning("Overwrite with a different instance: %s is kept because deletion is disabled", path)
            return
        try:
            self._remote(f"delete {path}", self._store(store_name).delete_instance,
                         old.study_uid, old.series_uid, old.sop_uid)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                log.error("The replaced instance %s could not be deleted: %s", path, exc.strerror)
                return
        self.listings.note_removed(path.parent, path.name)
        self.cache.evict(self._key(path))

    def _known_locally(self, target: DicomPath) -> bool:
        """Whether this mount knows instance ``target`` is on the server, without asking it."""
        return (isinstance(self.listings.lookup(target.parent, target.name), Entry)
                or self.cache.known_size(self._key(target)) is not None)

    def _note_uploaded(self, written: DicomPath, target: DicomPath, ident: DicomUids, size: int,
                       *, evict: bool = True, created: bool = True, altered: bool = False,
                       given_mtime: float | None = None) -> None:
        """``altered``: the server stored other bytes (their size is not known here).
        ``given_mtime``: the time a program gave the file while writing it."""
        if self.writeback is not None:  # written again after an rm: it stays, whatever was sent before
            self.writeback.mark_removed(target.store, ident, False)
        self._keep_listed(target, None if altered else size)
        if evict:
            self.cache.evict(self._key(target))
        # The OS may hold pages of the instance read before: same size and time, so it would go on
        # serving them (a flush or release of this file is not an operation the notice waits for).
        self.notify_changed(str(target))
        with self._lock:
            if written != target:
                self._aliases[written] = Alias(ident, size, time.monotonic(), created)
            else:
                self._aliases.pop(written, None)  # the name stood for another instance: its own again
            # The time cp -p gave the file it wrote, else now. Not a time set before this copy
            # (rsync -a, touch): a plain cp of other bytes showed the old file's time, and the
            # next rsync -a took the changed file for the one it had sent, and left it.
            self._times.pop(written, None)
            self._times[target] = given_mtime if given_mtime is not None else time.time()

    def _keep_listed(self, target: DicomPath, size: int | None) -> None:
        """Instance ``target`` and its study and series folders are listed whatever the server's
        listings say meanwhile (the listings' overlay lifetime)."""
        store_path = DicomPath((target.store,))
        self.listings.note_added(store_path, target.study, Entry(True))
        self.listings.note_added(store_path.child(target.study), target.series, Entry(True))
        self.listings.note_added(target.parent, target.name, Entry(False, size))

    def _keep_failed(self, h: WriteHandle, why: str) -> Path:
        if h.spool_path.parent != self.spool.directory:
            return h.spool_path  # already kept
        try:
            portable.fsync_path(h.spool_path)  # the bytes may be the only copy: on disk before they are kept
        except OSError as exc:
            log.warning("Cannot write the failed upload %s to disk: %s", h.path, exc.strerror or exc)
        kept = self.spool.keep_failed(h.spool_path, h.path.name, store=h.path.store, reason=why)
        h.spool_path = kept
        log.error("Upload of %s failed (%s); its bytes are kept at %s", h.path, why, kept)
        return kept

    # ======================================================================================
    # internals: stores and local names

    def _create_store(self, name: str) -> None:
        self._remote(f"create store {name}", self.dataset.create_store, name)
        self.listings.note_added(ROOT, name, Entry(True))
        log.info("Created store %s", name)

    @staticmethod
    def _refuse_hidden_store(p: DicomPath, doing: str) -> None:
        """Spotlight, Trash, versions (.DocumentRevisions-V100) and other hidden system folders
        at the dataset level: refused quietly (the OS tries them by itself), never a store,
        whether made by mkdir or by renaming a folder."""
        if p.is_side_file or p.name.startswith("."):
            raise FsError(errno.EPERM, f"{doing}: {p.name!r} is a system folder, not a store", logging.DEBUG)

    def _remove_new_store(self, name: str) -> None:
        """Undo :meth:`_create_store` of a rename that could not delete the old store."""
        try:
            self._remote(f"delete store {name}", self.dataset.delete_store, name)
        except FsError as exc:
            log.error("Store %s, created to rename another, could not be removed again: %s", name, exc.strerror)
            return
        self.listings.note_removed(ROOT, name)
        with self._lock:
            self._stores.pop(name, None)

    def _rename_store(self, po: DicomPath, pn: DicomPath) -> None:
        self._refuse_hidden_store(pn, "rename")
        if self._exists(pn):
            raise FsError(errno.EEXIST, f"rename: {pn.name} exists already")
        if not is_valid_store_id(pn.name):
            raise FsError(errno.EINVAL, f"rename: {pn.name!r} is not a valid store ID", logging.WARNING)
        self.policy.check(Op.RENAME, Level.STORE, str(po))
        self._until_index_shows_removals(po, lambda: self._require_empty_store(po, "rename"))
        self._create_store(pn.name)
        try:
            self._remote(f"delete store {po.name}", self.dataset.delete_store, po.name)
        except FsError as exc:
            if exc.errno == errno.ENOTEMPTY:  # written into by another client meanwhile: nothing renamed
                self._remove_new_store(pn.name)
                raise
            log.error("Renamed store %s to %s, but the old store could not be deleted", po.name, pn.name)
            raise
        self.listings.note_removed(ROOT, po.name)
        with self._lock:
            self._stores.pop(po.name, None)
        log.info("Renamed empty store %s to %s", po.name, pn.name)

    def _until_index_shows_removals(self, store: DicomPath, step: Callable[[], object]) -> None:
        """Run ``step``; while it finds the store not empty and this mount itself deleted
        instances in it lately, run it again for a few seconds: a search index (Google's) shows
        deletions seconds late, and rm -r of a store's last study then rmdir must not fail."""
        deadline = time.monotonic() + (STORE_EMPTY_WAIT if self.listings.removed_below(store) else 0.0)
        while True:
            try:
                step()
                return
            except FsError as exc:
                if exc.errno != errno.ENOTEMPTY or time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    def _require_empty_store(self, p: DicomPath, doing: str) -> None:
        """ENOTEMPTY unless store ``p`` holds no study, asked of the server right now and of
        this mount's own recent uploads (which a lagging search index may not show yet)."""
        store = self._store(p.name)
        found = self.listings.files_added_below(p) or self._remote(
            f"check store {p.name} is empty", lambda: next(iter(store.studies()), None) is not None)
        if found:
            raise FsError(errno.ENOTEMPTY, f"{doing}: store {p.name} holds studies; only an empty "
                          "store can be deleted or renamed", logging.WARNING)

    def _rename_local(self, po: DicomPath, pn: DicomPath, node: LocalNode) -> None:
        if node.is_dir:
            if pn.level != Level.STORE or pn.too_deep:
                raise FsError(errno.EPERM, f"rename: {po} can only become a store")
            if not is_gui_folder_name(pn.name):
                self._refuse_hidden_store(pn, "rename")
                if not is_valid_store_id(pn.name):
                    raise FsError(errno.EINVAL, f"rename: {pn.name!r} is not a valid store ID", logging.WARNING)
                if self._exists(pn):
                    raise FsError(errno.EEXIST, f"rename: {pn.name} exists already")
                self._create_store(pn.name)
                with self._lock:
                    self._local.pop(po, None)
                return
            with self._lock:
                self._local[pn] = self._local.pop(po)
            return
        if pn.is_side_file or node.placeholder:  # stays on this computer, in any existing folder
            self._require_dir(pn.parent)
            with self._lock:
                self._local[pn] = self._local.pop(po)
                self._move_time(po, pn)
            return
        if pn.parent != po.parent:
            raise FsError(errno.EPERM, f"rename: {po} to another folder")
        # An editor or tool wrote a side/temp name and now gives it its real name: upload it.
        self.policy.check(Op.UPLOAD, pn.level, str(pn))
        assert node.path is not None
        fd = portable.open_fd(node.path, os.O_RDWR)
        handle = WriteHandle(pn, node.path, fd, overwrites=self._instance_named(pn), dirty=True)
        with self._lock:
            self._move_time(po, pn)  # rsync sets the time on its temporary file
        try:
            ident = self._send(handle)
        except BaseException:
            with self._lock:
                self._move_time(pn, po)
            raise
        finally:
            self._close_fd(fd)
        with self._lock:
            self._local.pop(po, None)
        if not handle.queued:  # write-back: the queue has the bytes, and the cache a link to them
            self._adopt_stored((pn.store, ident.study_uid, ident.series_uid, ident.sop_uid), node.path)

    def _adopt_stored(self, key: CacheKey, path: Path) -> None:
        """The spool file of an upload the server confirmed becomes its cached copy; if the cache
        cannot take it (its folder read-only, on another disk), it is only deleted: left in the
        spool, it would be reported as an upload the server may not have."""
        try:
            self.cache.adopt(key, path)
        except OSError as exc:
            log.debug("cannot keep the stored %s in the cache: %s", key[3], exc.strerror or exc)
        finally:
            Spool.discard(path)

    def _move_time(self, old: DicomPath, new: DicomPath) -> None:
        """Caller holds _lock. A time given to ``old`` goes with its file to ``new``."""
        given = self._times.pop(old, None)
        if given is not None:
            self._times[new] = given

    def _instance_named(self, p: DicomPath) -> DicomUids | None:
        """The instance the name ``p`` stands for now, if any (a rename over it replaces it)."""
        with self._lock:
            alias = self._aliases.get(p)
        if alias is not None:
            return alias.ident
        uid = instance_uid(p.name) if p.level == Level.INSTANCE else None
        if uid is None or not self._exists(p):
            return None
        return DicomUids(p.study, p.series, uid)

    def _rename_alias(self, po: DicomPath, pn: DicomPath, alias: Alias) -> None:
        if pn.parent != po.parent:
            raise FsError(errno.EPERM, f"rename: {po} to another folder")
        target = self._alias_target(po, alias)
        if pn != target and self._local_attr(pn) is None and self._exists(pn):
            raise FsError(errno.EPERM, f"rename: {pn} is another instance; it is not replaced")
        with self._lock:
            del self._aliases[po]
            if pn != target:
                self._aliases[pn] = alias

    def _new_side_path(self) -> Path:
        """A fresh file name in this mount's folder of local-only files (wiped with it)."""
        with self._lock:
            self._side_names += 1
            return self.workdirs.side / f"{self._side_names}"

    def _create_local(self, p: DicomPath) -> int:
        parent = self.getattr(str(p.parent)) if p.parent.parts else Attr(True)
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, f"create: not a folder: {p.parent}")
        path = self._new_side_path()
        fd = portable.open_fd(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR)
        node = LocalNode(False, path)
        with self._lock:
            self._local[p] = node
        log.debug("Side file %s kept on this computer only", p)
        return self._add_handle(LocalHandle(node, fd))


@dataclass
class _Walk:
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Flight:
    """A listing being asked for: its result or error, once ``done`` (at ``ended``)."""

    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Entry] | None = None
    error: BaseException | None = None
    ended: float = 0.0


class _Conflict(FsError):
    """A STOW refusal because the server holds other bytes under the same UIDs."""


class _PreviousLost(FsError):
    """An overwrite failed after the previous instance was deleted and could not be stored
    back (its bytes are kept locally): the server holds neither version."""


class _NoPrevious(FsError):
    """An overwrite found no previous instance on the server after all (the search listed it,
    or a 409 said so), and the file was refused as a new one: nothing stays under its name."""


STORE_EMPTY_WAIT = 15.0
"""Seconds an emptiness check of a store waits for the search index to show this mount's own
deletions (Google: "a few seconds")."""

_STORED_HERE_MAX = 100_000
_ALIAS_GUARD = 600.0
"""Seconds an instance's own name is refused to rm (EBUSY) after a file was copied into its folder
under another name that stands for it: a mirroring tool's --delete-after pass comes right after its
copies; later, rm is the user's."""
"""Instances remembered as stored by this mount (each ~200 bytes), newest kept."""


def _same_content(fd_a: int, fd_b: int) -> bool:
    if os.fstat(fd_a).st_size != os.fstat(fd_b).st_size:
        return False
    return _digest(fd_a) == _digest(fd_b)


def _digest(fd: int) -> bytes:
    h = hashlib.sha256()
    offset = 0
    while chunk := portable.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.digest()

