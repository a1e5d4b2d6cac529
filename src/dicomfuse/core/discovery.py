"""Filling a store's folder listings from one walk of the whole store, and deciding when to.

Listing folder by folder costs one request per study (its series) and one per series (its
instances): ``ls -R``, ``find``, ``du`` or ``cp -r`` over a store of 10,000 studies would send tens
of thousands of requests. A store-level search of instances
(:class:`~dicomfuse.stores.base.WalkableStore`) brings the same tree in one request per page of
instances (1,000 on Orthanc, up to 50,000 on Google). :class:`WalkDetector` tells the Vfs when a
walk pays off; :func:`build_tree` and :meth:`StoreTree.listings` turn the walk into listings for
:class:`~dicomfuse.core.tree.ListingCache`. No I/O and nothing OS-specific here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass

from dicomfuse.core.paths import DicomPath, Level, instance_name
from dicomfuse.core.tree import Entry
from dicomfuse.stores.base import InstanceInfo

log = logging.getLogger(__name__)

DEFAULT_TRIGGER = 3
DEFAULT_WINDOW = 5.0
DEFAULT_MAX_STUDIES = 200_000
DEFAULT_COOLDOWN = 60.0
"""The Vfs's default listing TTL: a walk's listings stay cached that long, so walking again sooner
would fetch what the cache already holds."""

_FOLDER = Entry(True)
_SIZE_UNKNOWN = Entry(False)


# ---------------------------------------------------------------------------------------------
# The tree a walk found


@dataclass(frozen=True)
class StoreTree:
    """A store's whole tree from one walk: studies -> series -> instances (name -> size or None).

    Plain dicts of str keep memory linear and small (a few hundred bytes per instance, most of it
    the name): each study and series UID is held once, as a key. A study or series absent from
    the tree was not seen by the walk (e.g. stored while it ran): list it the ordinary way, never
    take it for empty."""

    studies: dict[str, dict[str, dict[str, int | None]]]

    def listings(self, store: str) -> Iterator[tuple[DicomPath, list[tuple[str, Entry]]]]:
        """Every study folder listing (its series) and series folder listing (its instances)
        of ``store``, ready for :meth:`ListingCache.put`. Entries are shared, not one per child
        (they are immutable), so a million cached instances do not cost a million objects."""
        by_size: dict[int, Entry] = {}
        for study, series_map in self.studies.items():
            yield DicomPath((store, study)), [(series, _FOLDER) for series in series_map]
            for series, instances in series_map.items():
                children: list[tuple[str, Entry]] = []
                for name, size in instances.items():
                    if size is None:
                        entry = _SIZE_UNKNOWN
                    else:
                        entry = by_size.get(size) or by_size.setdefault(size, Entry(False, size))
                    children.append((name, entry))
                yield DicomPath((store, study, series)), children


def build_tree(infos: Iterable[InstanceInfo]) -> StoreTree:
    """Group a walk's instances by study and series, naming each instance as a listing does
    (``<SOPInstanceUID>.dcm``). Consumes ``infos`` as it goes: the walk never sits in memory as
    a list of records. An instance met twice keeps its last size."""
    studies: dict[str, dict[str, dict[str, int | None]]] = {}
    for info in infos:
        series_map = studies.get(info.study_uid)
        if series_map is None:
            series_map = studies[info.study_uid] = {}
        instances = series_map.get(info.series_uid)
        if instances is None:
            instances = series_map[info.series_uid] = {}
        instances[instance_name(info.sop_uid)] = info.size
    return StoreTree(studies)


# ---------------------------------------------------------------------------------------------
# When to walk


class WalkDetector:
    """Decides when a walk of the whole store is cheaper than listing folder by folder.

    A person opens one folder at a time; a tree walk (``ls -R``, ``find``, ``du``, ``cp -r``)
    lists folder after folder. So ``trigger`` listings of *different* study or series folders of
    one store within ``window`` seconds mean a tree walk, and the rest of the store is fetched at
    once. Not for stores of more than ``max_studies`` studies, nor when their size is unknown:
    there a walk could cost more than the folders that will really be listed. At most one walk
    per store per ``cooldown`` seconds (the listing TTL), so a walk is never repeated while its
    results are cached, nor retried at once after a failure. Thread-safe."""

    def __init__(
        self,
        *,
        trigger: int = DEFAULT_TRIGGER,
        window: float = DEFAULT_WINDOW,
        max_studies: int = DEFAULT_MAX_STUDIES,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if trigger < 1:
            raise ValueError("trigger must be at least 1")
        if window <= 0 or cooldown < 0 or max_studies < 0:
            raise ValueError("window must be positive, cooldown and max_studies not negative")
        self.trigger = trigger
        self.window = window
        self.max_studies = max_studies
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        # Both protected by _lock. Per store: the last `trigger` folders listed, oldest first,
        # with when; and when its last walk was decided.
        self._recent: dict[str, OrderedDict[Hashable, float]] = {}
        self._walked_at: dict[str, float] = {}

    def listed(
        self,
        store: str,
        level: Level,
        study_count_hint: int | None = None,
        *,
        folder: Hashable | None = None,
    ) -> bool:
        """Note that the Vfs is about to list a folder of ``store`` from the server; True when
        it should walk the store instead (the caller then owns the walk: no one else is told to
        until the cooldown ends).

        ``level`` is the folder's (``STUDY``: its series, ``SERIES``: its instances; other levels
        never count). ``study_count_hint`` is the store's study count from its cached listing,
        None when unknown. ``folder`` names the folder (its path) so that listing one folder
        again does not count twice; without it every call counts as a different folder."""
        if level not in (Level.STUDY, Level.SERIES):
            return False
        key: Hashable = folder if folder is not None else object()
        now = self._clock()
        with self._lock:
            walked_at = self._walked_at.get(store)
            if walked_at is not None and now - walked_at < self.cooldown:
                return False
            recent = self._recent.setdefault(store, OrderedDict())
            recent.pop(key, None)
            recent[key] = now
            while recent and (len(recent) > self.trigger or now - next(iter(recent.values())) >= self.window):
                recent.popitem(last=False)
            if len(recent) < self.trigger:
                return False
            if study_count_hint is None or study_count_hint > self.max_studies:
                return False
            del self._recent[store]
            self._walked_at[store] = now
        log.debug("store %s: %d folders listed within %.1f s, walking the store instead", store, self.trigger,
                  self.window)
        return True
