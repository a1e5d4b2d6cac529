"""Folder listings in RAM: a TTL cache, a bounded negative cache, and the local overlay that
makes the mount's own uploads and deletes visible at once whatever the server's index lags.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dicomfuse.core.paths import DicomPath


@dataclass(frozen=True)
class Entry:
    """One child of a folder. ``size`` is None for a file whose size is not known yet."""

    is_dir: bool
    size: int | None = None


Clock = Callable[[], float]
# Whether the mount still has work of its own on folder/name (a write-back upload not sent yet):
# what it added there stays shown past the overlay's lifetime.
Keep = Callable[[DicomPath, str], bool]


class ListingCache:
    """Listings per folder path for ``ttl`` seconds, plus names known to be absent for
    ``negative_ttl`` seconds (bounded), plus an overlay of local changes kept for
    ``overlay_ttl`` seconds and applied on top of every listing, fresh or cached. An added
    entry for which ``keep`` says yes stays past ``overlay_ttl``; ``keep`` is called with this
    cache's lock held, so it must never call back into the cache."""

    def __init__(
        self,
        ttl: float,
        *,
        negative_ttl: float = 5.0,
        overlay_ttl: float | None = None,
        max_negative: int = 10_000,
        clock: Clock = time.monotonic,
        keep: Keep | None = None,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = min(negative_ttl, ttl) if ttl > 0 else 0.0
        self.overlay_ttl = max(ttl, 30.0) if overlay_ttl is None else overlay_ttl
        self._clock = clock
        self.keep = keep
        self._lock = threading.Lock()
        # All fields below are protected by _lock.
        self._listings: dict[DicomPath, tuple[float, dict[str, Entry]]] = {}
        self._negative: OrderedDict[DicomPath, float] = OrderedDict()
        self._max_negative = max_negative
        # Names found by a lookup while their folder's listing is not cached (cd to a UID).
        self._positive: OrderedDict[DicomPath, tuple[float, Entry]] = OrderedDict()
        self._added: dict[DicomPath, dict[str, tuple[float, Entry]]] = {}
        self._removed: dict[DicomPath, dict[str, float]] = {}
        self._swept = clock()

    # -- listings -------------------------------------------------------------------------

    def get(self, folder: DicomPath) -> dict[str, Entry] | None:
        """The cached listing with the overlay applied, or None if absent or expired."""
        now = self._clock()
        with self._lock:
            cached = self._listings.get(folder)
            if cached is None or now - cached[0] >= self.ttl:
                return None
            return self._overlaid(folder, cached[1], now)

    def put(self, folder: DicomPath, children: Iterable[tuple[str, Entry]]) -> dict[str, Entry]:
        """Store a fresh listing; return it with the overlay applied."""
        now = self._clock()
        listing = dict(children)
        with self._lock:
            self._sweep(now)
            self._listings[folder] = (now, listing)
            return self._overlaid(folder, listing, now)

    def lookup(self, folder: DicomPath, name: str) -> Entry | None | bool:
        """Entry if known present; False if known absent (fresh listing without it, or a
        negative entry); None if the cache cannot tell."""
        now = self._clock()
        path = folder.child(name)
        with self._lock:
            local = self._local_change(folder, name, now)
            if local is not None:
                return local
            cached = self._listings.get(folder)
            if cached is not None and now - cached[0] < self.ttl and name in cached[1]:
                return cached[1][name]
            neg = self._negative.get(path)
            if neg is not None and now - neg < self.negative_ttl:
                return False
            pos = self._positive.get(path)
            if pos is not None and now - pos[0] < self.ttl:
                return pos[1]
            return None

    def local_change(self, folder: DicomPath, name: str) -> Entry | bool | None:
        """What the mount itself last did to ``name`` within the overlay's lifetime: the Entry
        it added, False if it removed it, None if it did neither (ask the server)."""
        now = self._clock()
        with self._lock:
            return self._local_change(folder, name, now)

    def _local_change(self, folder: DicomPath, name: str, now: float) -> Entry | bool | None:
        """Caller holds _lock."""
        added = self._added.get(folder, {}).get(name)
        if added and self._shown(folder, name, added[0], now):
            return added[1]
        removed = self._removed.get(folder, {}).get(name)
        if removed is not None and now - removed < self.overlay_ttl:
            return False
        return None

    def files_added_below(self, folder: DicomPath) -> bool:
        """Whether the mount added a file anywhere below ``folder`` within the overlay's lifetime
        (and did not remove it since): folders it added for them do not count on their own."""
        now = self._clock()
        with self._lock:
            return self._has_added_files(folder, now)

    def removed_below(self, folder: DicomPath) -> bool:
        """Whether the mount removed anything below ``folder`` within the overlay's lifetime."""
        now = self._clock()
        prefix = folder.parts
        with self._lock:
            return any(
                f.parts[: len(prefix)] == prefix and any(now - at < self.overlay_ttl for at in names.values())
                for f, names in self._removed.items()
            )

    def remember_absent(self, path: DicomPath) -> None:
        with self._lock:
            self._negative[path] = self._clock()
            self._negative.move_to_end(path)
            while len(self._negative) > self._max_negative:
                self._negative.popitem(last=False)

    def remember_present(self, folder: DicomPath, name: str, entry: Entry) -> None:
        """A lookup found ``name``: add it to a cached listing (if any) and drop negatives."""
        with self._lock:
            path = folder.child(name)
            self._negative.pop(path, None)
            cached = self._listings.get(folder)
            if cached is not None:
                cached[1][name] = entry
            self._positive[path] = (self._clock(), entry)
            self._positive.move_to_end(path)
            while len(self._positive) > self._max_negative:
                self._positive.popitem(last=False)

    def update_size(self, folder: DicomPath, name: str, size: int) -> None:
        with self._lock:
            cached = self._listings.get(folder)
            if cached is not None and name in cached[1]:
                cached[1][name] = Entry(False, size)
            pos = self._positive.get(folder.child(name))
            if pos is not None:
                self._positive[folder.child(name)] = (pos[0], Entry(False, size))
            added = self._added.get(folder, {}).get(name)
            if added is not None:
                self._added[folder][name] = (added[0], Entry(False, size))

    # -- local changes ----------------------------------------------------------------------

    def note_added(self, folder: DicomPath, name: str, entry: Entry) -> None:
        """The mount itself created ``name`` in ``folder``: show it at once."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            self._removed.get(folder, {}).pop(name, None)
            self._added.setdefault(folder, {})[name] = (now, entry)
            self._negative.pop(folder.child(name), None)
            cached = self._listings.get(folder)
            if cached is not None:
                cached[1][name] = entry

    def note_removed(self, folder: DicomPath, name: str) -> None:
        """The mount itself deleted ``name``: hide it at once, even from a lagging server."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            self._added.get(folder, {}).pop(name, None)
            self._removed.setdefault(folder, {})[name] = now
            cached = self._listings.get(folder)
            if cached is not None:
                cached[1].pop(name, None)
            self._positive.pop(folder.child(name), None)
            # Anything cached below the removed entry is gone too.
            prefix = folder.child(name).parts
            for path in [p for p in self._listings if p.parts[: len(prefix)] == prefix]:
                del self._listings[path]
            self._forget_emptied_folders(folder, now)

    def _forget_emptied_folders(self, folder: DicomPath, now: float) -> None:
        """Caller holds _lock. The study and series folders the mount added to show its uploads,
        once it removed the last of them: the server's listing says whether they still exist (an
        rm -r of a study just copied in left it and its series listed, empty, for the overlay's
        30 s). A folder the mount added itself (a new store) is not one of them."""
        while len(folder.parts) >= 2:  # a study or series folder: it has a parent below the root
            parent = folder.parent
            added = self._added.get(parent, {}).get(folder.name)
            if added is None or not added[1].is_dir or self._has_added_files(folder, now):
                return
            del self._added[parent][folder.name]
            folder = parent

    def _has_added_files(self, folder: DicomPath, now: float) -> bool:
        """Caller holds _lock."""
        prefix = folder.parts
        return any(
            f.parts[: len(prefix)] == prefix
            and any(not entry.is_dir and self._shown(f, name, at, now) for name, (at, entry) in names.items())
            for f, names in self._added.items()
        )

    def _overlaid(self, folder: DicomPath, listing: dict[str, Entry], now: float) -> dict[str, Entry]:
        """Caller holds _lock."""
        result = dict(listing)
        added = self._added.get(folder)
        if added:
            for name, (at, entry) in list(added.items()):
                if not self._shown(folder, name, at, now):
                    del added[name]
                elif name not in result or result[name].size is None:
                    result[name] = entry
        removed = self._removed.get(folder)
        if removed:
            for name, at in list(removed.items()):
                if now - at >= self.overlay_ttl:
                    del removed[name]
                else:
                    result.pop(name, None)
        return result

    def _sweep(self, now: float) -> None:
        """Caller holds _lock. At most once per overlay lifetime, forget what no longer counts:
        expired listings (a folder gone from the server is never listed again, and its listing
        stayed) and overlay entries past their time, with the folders left empty. Else a mount
        that runs for days grows with every folder it ever listed and every file it ever copied
        in and removed (and each rm scans them all)."""
        if now - self._swept < max(self.overlay_ttl, 1.0):
            return
        self._swept = now
        for folder in [f for f, (at, _) in self._listings.items() if now - at >= self.ttl]:
            del self._listings[folder]
        for folder, names in list(self._added.items()):
            for name in [n for n, (at, _) in names.items() if not self._shown(folder, n, at, now)]:
                del names[name]
            if not names:
                del self._added[folder]
        for folder, removed in list(self._removed.items()):
            for name in [n for n, at in removed.items() if now - at >= self.overlay_ttl]:
                del removed[name]
            if not removed:
                del self._removed[folder]

    def _shown(self, folder: DicomPath, name: str, added_at: float, now: float) -> bool:
        """Whether an entry the mount added at ``added_at`` still overlays the server's view."""
        return now - added_at < self.overlay_ttl or (self.keep is not None and self.keep(folder, name))
