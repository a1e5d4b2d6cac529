"""When to learn an unknown instance size at ``stat`` time.

Some servers list instances without sizes. Most readers (cp, cat, dd, rsync, Python) read to
the end whatever ``stat`` said, but ``tar`` archives exactly the size it saw before opening.
Fetching every instance on ``stat`` would make ``ls -l`` or a file manager download whole
series, so the rule is per calling process and folder:

- a process that stats an unknown-size instance gets its true size (the instance is fetched
  into the cache, where the read that usually follows finds it);
- a process that stats a *second* unknown-size instance in the same folder without having
  opened the first is scanning (``ls -l``, a file manager): it sees size 0 for the rest,
  and nothing more is fetched for it.

``tar``, ``cp -r`` and friends alternate stat and open, so they always get true sizes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from dicomfuse.core.paths import DicomPath

Caller = int


class StatProbePolicy:
    """Remembers, per (caller, folder), the last instance whose size was fetched for a stat and
    not opened since. Bounded; thread-safe."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._lock = threading.Lock()
        # Protected by _lock: (caller, folder) -> the probed, not yet opened, instance path.
        self._pending: OrderedDict[tuple[Caller, DicomPath], DicomPath] = OrderedDict()
        self._max = max_entries

    def should_fetch(self, caller: Caller | None, path: DicomPath) -> bool:
        """Whether a stat of ``path`` (size unknown) by ``caller`` should fetch the size; if so
        the probe is recorded."""
        if caller is None:
            return False
        key = (caller, path.parent)
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None and pending != path:
                return False  # the caller is scanning the folder
            self._pending[key] = path
            self._pending.move_to_end(key)
            while len(self._pending) > self._max:
                self._pending.popitem(last=False)
            return True

    def opened(self, caller: Caller | None, path: DicomPath) -> None:
        if caller is None:
            return
        with self._lock:
            if self._pending.get((caller, path.parent)) == path:
                del self._pending[(caller, path.parent)]
