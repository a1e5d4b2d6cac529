"""Read-ahead: when the files of a series folder are opened one after another in listing order
(``cp -r``, ``tar``, ``rsync``, a viewer loading a series), fetch the next ones in parallel
before they are asked for.

The pattern is per folder: two opens in a row at consecutive positions (or a step or two ahead,
as parallel readers do) start it; each further open keeps ``window`` files ahead. An open far
from the last one (random access) stops it and cancels what is queued but not started, and so
does a folder left alone for ``idle`` seconds (seen at the next open, or by a timer while anything
is queued: a reader that stopped opens nothing more). Fetching, single-flight and the cache bound are
the instance cache's business; this only decides *what* to fetch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dicomfuse.core.paths import DicomPath

MAX_STEP = 3
"""An open at most this many positions after the last one still continues the pattern."""

MAX_FOLDERS = 64
"""Folders whose pattern is remembered (least recently used are forgotten)."""


@dataclass
class _Pattern:
    names: Sequence[str]
    index: dict[str, int]
    listed_at: float
    last: int = -1
    streak: int = 0
    ahead: int = -1  # highest position scheduled so far
    scheduled: set[str] = field(default_factory=set)
    used_at: float = 0.0


class ReadAhead:
    """``names_of(folder)`` gives the folder's file names in listing order; ``fetch(path)``
    makes sure one file is cached or on its way (False only when there is no room for it now);
    ``cancel(path)`` drops one that has not started."""

    def __init__(
        self,
        window: int,
        names_of: Callable[[DicomPath], Sequence[str]],
        fetch: Callable[[DicomPath], bool],
        cancel: Callable[[DicomPath], bool],
        *,
        idle: float = 10.0,
        relist_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._names_of = names_of
        self._fetch = fetch
        self._cancel = cancel
        self.idle = idle
        self.relist_after = relist_after
        self._clock = clock
        self._lock = threading.Lock()
        self._patterns: OrderedDict[DicomPath, _Pattern] = OrderedDict()  # guarded by _lock
        # While anything is scheduled, a timer sweeps idle folders: with no further open (the
        # reader stopped), nothing else would cancel what they queued. Guarded by _lock.
        self._timer: threading.Timer | None = None
        self._closed = False

    def opened(self, path: DicomPath) -> None:
        """A file was opened for reading; fetch ahead if that continues a pattern."""
        if self.window <= 0:
            return
        folder, name = path.parent, path.name
        now = self._clock()
        to_cancel: list[DicomPath] = []
        to_fetch: list[DicomPath] = []  # in order
        pattern = self._pattern(folder, now)
        with self._lock:
            to_cancel += self._sweep_idle(now, keep=folder)
            position = pattern.index.get(name)
            if position is not None:
                step = position - pattern.last
                if pattern.last >= 0 and 0 < step <= MAX_STEP:
                    pattern.streak += 1
                elif pattern.last >= 0 and -MAX_STEP <= step < 0 and pattern.streak:
                    pass  # a parallel reader a little behind: the pattern goes on
                elif step != 0:
                    pattern.streak = 0
                    to_cancel += self._drop_scheduled(folder, pattern, keep_from=position)
                    pattern.ahead = position
                pattern.last = max(pattern.last, position) if pattern.streak else position
                pattern.used_at = now
                pattern.scheduled.discard(name)
            if position is not None and pattern.streak >= 1:
                position = pattern.last
                start = max(pattern.ahead + 1, position + 1)
                end = min(len(pattern.names), position + 1 + self.window)
                to_fetch = [folder.child(pattern.names[i]) for i in range(start, end)]
        for p in to_cancel:
            self._cancel(p)
        for p in to_fetch:
            if not self._fetch(p):
                break  # no room in the cache now: the next open tries again from here
            with self._lock:
                pattern.scheduled.add(p.name)
                pattern.ahead = max(pattern.ahead, pattern.index.get(p.name, pattern.ahead))
                self._arm()

    def sweep(self) -> None:
        """Cancel what folders left alone for ``idle`` seconds scheduled (the timer calls this
        while anything is scheduled)."""
        with self._lock:
            self._timer = None
            dropped = self._sweep_idle(self._clock(), keep=None)
            if any(p.scheduled for p in self._patterns.values()):
                self._arm()
        for p in dropped:
            self._cancel(p)

    def close(self) -> None:
        """Stop the sweeping timer (the mount is going away)."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    # -- internals ---------------------------------------------------------------------------

    def _pattern(self, folder: DicomPath, now: float) -> _Pattern:
        with self._lock:
            pattern = self._patterns.get(folder)
            if pattern is not None and now - pattern.listed_at < self.relist_after:
                self._patterns.move_to_end(folder)
                return pattern
        names = list(self._names_of(folder))  # outside the lock: may ask the server
        with self._lock:
            fresh = _Pattern(names, {n: i for i, n in enumerate(names)}, now)
            if pattern is not None:  # keep the state across a re-listing
                fresh.streak, fresh.scheduled = pattern.streak, pattern.scheduled
                fresh.last = fresh.index.get(pattern.names[pattern.last], -1) if pattern.last >= 0 else -1
                fresh.ahead = max(fresh.last, -1)
            self._patterns[folder] = fresh
            self._patterns.move_to_end(folder)
            while len(self._patterns) > MAX_FOLDERS:
                old_folder, old = self._patterns.popitem(last=False)
                self._drop_scheduled(old_folder, old, keep_from=len(old.names))
            return fresh

    def _drop_scheduled(self, folder: DicomPath, pattern: _Pattern, keep_from: int) -> list[DicomPath]:
        """Caller holds _lock. Forget scheduled names outside [keep_from, keep_from + window]."""
        keep = set(pattern.names[keep_from: keep_from + self.window + 1])
        dropped = [n for n in pattern.scheduled if n not in keep]
        pattern.scheduled -= set(dropped)
        return [folder.child(n) for n in dropped]

    def _arm(self) -> None:
        """Caller holds _lock. Start the sweeping timer unless it runs."""
        if self._timer is None and not self._closed:
            self._timer = threading.Timer(self.idle, self.sweep)
            self._timer.daemon = True
            self._timer.start()

    def _sweep_idle(self, now: float, keep: DicomPath | None) -> list[DicomPath]:
        """Caller holds _lock. Cancel what idle folders scheduled."""
        dropped: list[DicomPath] = []
        for folder, pattern in self._patterns.items():
            if folder != keep and pattern.scheduled and now - pattern.used_at >= self.idle:
                dropped += [folder.child(n) for n in pattern.scheduled]
                pattern.scheduled.clear()
                pattern.streak = 0
        return dropped
