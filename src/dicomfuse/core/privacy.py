"""Names users give files may be patients' names: log lines show them as ``<name-N>``.

Instances are listed under their UIDs, but a file copied in keeps the name it had (``cp
DOE^JANE.dcm store/``), and exports are often named after the patient. Every name below a store
that is not a UID is noted here when a path holding it is parsed (so before the kernel's first
lookup of it is logged); the log handlers' filter (``cli.logs``) replaces each noted name with its
placeholder in every line, wherever it appears as a path component (after ``/``), as the name
part of a kept upload's file (after ``-``) or quoted (after ``'``). The same name keeps the same
placeholder for the life of the process, so the lines about one file can still be followed.
"""

from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path

LIMIT = 20_000
"""Names remembered (the most recently seen): a mount that sees more forgets the oldest."""

OWN_NAMES = frozenset({"mounts", "cache", "spool", "failed", "writeback", "dicomfuse", "log"})
"""The mount's own folder names (``<cacheDir>/spool/failed``…): never hidden, or a stray ``ls
store/cache`` would garble every later line naming the cache folder."""

_BEFORE = re.compile("[/'\"-]")  # also " as repr() quotes a name holding an apostrophe
_AFTER = frozenset(" \t\n)]};,:'\"/")


class HiddenNames:
    """Thread-safe registry of names to keep out of log lines."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._names: OrderedDict[str, str] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self._by_length: list[int] = []  # distinct lengths, longest first
        self._next = 1
        self._shown: set[str] = set(OWN_NAMES)

    def keep_shown(self, path: str | Path) -> None:
        """The components of one of the mount's own paths (the mount point, the cache and log
        folders) are never hidden: a stray ``ls store/tmp`` would garble every later line naming
        them (where failed uploads are kept, say)."""
        names = {part for part in Path(path).parts if part and part != "/"}
        with self._lock:
            self._shown |= names
            for name in names & self._names.keys():
                del self._names[name]
                self._count(len(name), -1)

    def hide(self, name: str) -> None:
        if not name or name in self._shown:
            return
        with self._lock:
            if name in self._names:
                self._names.move_to_end(name)
                return
            self._names[name] = f"<name-{self._next}>"
            self._next += 1
            self._count(len(name), +1)
            while len(self._names) > self._limit:
                old, _ = self._names.popitem(last=False)
                self._count(len(old), -1)

    def hide_like(self, alias: str, name: str) -> None:
        """Show ``alias`` (another spelling of ``name``: the kept file of a failed upload) as
        ``name``'s placeholder, if ``name`` is hidden."""
        with self._lock:
            found = self._names.get(name)
            if found is None or not alias or alias in self._names:
                return
            self._names[alias] = found
            self._count(len(alias), +1)

    def _count(self, length: int, step: int) -> None:
        """Caller holds _lock. Count a name of ``length`` in (+1) or out (-1)."""
        known = length in self._lengths
        self._lengths[length] += step
        if self._lengths[length] <= 0:
            del self._lengths[length]
        if (length in self._lengths) != known:
            self._by_length = sorted(self._lengths, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every noted name that stands between the separators above replaced."""
        if not self._names:
            return text
        out: list[str] = []
        start, end = 0, len(text)
        with self._lock:
            for before in _BEFORE.finditer(text):
                first = before.end()
                if first <= start:
                    continue  # within a name just replaced
                for length in self._by_length:  # the longest name that stands there
                    stop = first + length
                    if stop > end or (stop < end and text[stop] not in _AFTER):
                        continue
                    found = self._names.get(text[first:stop])
                    if found is not None:
                        out += (text[start:first], found)
                        start = stop
                        break
        if not out:
            return text
        out.append(text[start:])
        return "".join(out)


HIDDEN = HiddenNames()
"""The process's registry: filled by ``DicomPath.parse``, read by the log filter."""
