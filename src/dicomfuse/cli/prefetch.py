"""``dicomfuse prefetch``: warm the instance cache of a store, study or series folder ahead of time,
with a progress line (files, bytes, rate, ETA).

Two forms:

* ``dicomfuse prefetch PATH`` where PATH is a folder of a running mount: every instance below it
  is read once through the mount, in parallel, so the mount's cache holds it afterwards;
* ``dicomfuse prefetch -a ADDRESS -p MOUNTPATH [mount options] FOLDER``: mounts like
  ``dicomfuse`` with the same flags, warms FOLDER (a path inside the mount, e.g.
  ``store/1.2.3``) in the background, and keeps serving until Ctrl+C.

The cache keeps what fits in ``--cacheSize`` for the second ``--cacheTime`` value. Afterwards each
file read is asked whether it stayed in the cache (the mount's read-only ``user.dicomfuse.cached``
attribute; Linux), and a closing note says how many did not: reading those downloads them again.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from dicomfuse.core.paths import instance_uid

CHUNK = 1 << 20
DEFAULT_THREADS = 8
EXIT_NOT_KEPT = 3  # every instance was read, but not all of them stayed in the cache


class Progress:
    """Counts files and bytes and draws one line, at most every ``interval`` seconds."""

    def __init__(self, total_files: int, out: TextIO = sys.stderr, *, interval: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total_files
        self.out = out
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self.files = 0
        self.failed = 0
        self.bytes = 0
        self._started = clock()
        self._drawn = 0.0

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n
        self._maybe_draw()

    def file_done(self, ok: bool) -> None:
        with self._lock:
            self.files += 1
            if not ok:
                self.failed += 1
        self._maybe_draw()

    def line(self) -> str:
        with self._lock:
            files, failed, done_bytes = self.files, self.failed, self.bytes
        elapsed = max(self._clock() - self._started, 1e-6)
        rate = done_bytes / elapsed
        eta = "--:--"
        if files and files < self.total:
            left = elapsed / files * (self.total - files)
            eta = f"{int(left // 60):02d}:{int(left % 60):02d}"
        elif files >= self.total:
            eta = "done"
        text = f"{files}/{self.total} files  {_mib(done_bytes)}  {_mib(rate)}/s  ETA {eta}"
        return text + (f"  ({failed} failed)" if failed else "")

    def draw(self, final: bool = False) -> None:
        end = "\n" if final else ""
        self.out.write("\r" + self.line().ljust(60) + end)
        self.out.flush()

    def _maybe_draw(self) -> None:
        now = self._clock()
        with self._lock:
            if now - self._drawn < self.interval:
                return
            self._drawn = now
        self.draw()


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def warm(files: Iterable[Path], threads: int, progress: Progress,
         read: Callable[[Path, Callable[[int], None]], None]) -> list[Path]:
    """Read every file once on ``threads`` threads, counting bytes as they arrive; return those
    that were read."""

    def one(path: Path) -> bool:
        try:
            read(path, progress.add_bytes)
        except OSError as exc:
            progress.out.write(f"\r{path}: {exc.strerror or exc}\n")
            progress.file_done(False)
            return False
        progress.file_done(True)
        return True

    files = list(files)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="prefetch") as pool:
        read_ok = list(pool.map(one, files))
    progress.draw(final=True)
    return [path for path, ok in zip(files, read_ok, strict=True) if ok]


def not_kept(files: Iterable[Path], cached: Callable[[Path], bool | None] | None = None) -> int | None:
    """How many of ``files`` (read just now) the mount's cache does not hold, or None when the
    mount cannot tell (an older mount, an OS without ``os.getxattr``)."""
    cached = cached or is_cached
    count = 0
    for path in files:
        held = cached(path)
        if held is None:
            return None
        count += not held
    return count


def is_cached(path: Path) -> bool | None:
    """Whether the mount holds ``path`` in its cache; None if it cannot tell."""
    from dicomfuse.core.vfs import CACHED_XATTR

    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:
        return None
    try:
        return bool(getxattr(path, CACHED_XATTR) == b"yes")
    except OSError:
        return None


def read_file(path: Path, count: Callable[[int], None]) -> None:
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            count(len(chunk))


def instance_files(root: Path, unlisted: list[OSError] | None = None) -> list[Path]:
    """Every instance below ``root``: the files named ``<SOPInstanceUID>.dcm`` as the mount lists
    them (side files, and names kept on this computer, as an empty placeholder a program made,
    are not instances: they never stay in the cache). A folder that cannot be listed (``root``
    itself included) is skipped and its error, naming it, added to ``unlisted``."""
    found: list[Path] = []

    def cannot_list(exc: OSError) -> None:
        if unlisted is not None:
            unlisted.append(exc)

    for folder, dirs, names in os.walk(root, onerror=cannot_list):
        dirs.sort()
        found += [Path(folder) / n for n in sorted(names) if instance_uid(n) is not None]
    return found


def mount_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The filesystem type of the mount holding ``path`` (``fuse.dicomfuse`` for ours), from
    Linux's mountinfo; None where there is none to read (macOS, Windows)."""
    try:
        lines = mountinfo.read_text(errors="replace").splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def prefetch_running_mount(path: Path, threads: int, out: TextIO = sys.stderr) -> int:
    try:
        folder = path.is_dir()
    except OSError as exc:  # the mount could not look it up (its server down: EIO)
        print(f"dicomfuse prefetch: cannot look up {path}: {exc.strerror or exc}", file=out)
        return 1
    if not folder:
        print(f"dicomfuse prefetch: {path} is not a folder of a mount", file=out)
        return 2
    kind = mount_type(path)
    if kind is not None and kind != "fuse.dicomfuse":
        print(f"dicomfuse prefetch: {path} is not on a DICOMFuse mount (it is on {kind}); give a store, study "
              "or series folder of a running mount, or -a ADDRESS -p MOUNTPATH to mount first", file=out)
        return 2
    unlisted: list[OSError] = []
    files = instance_files(path, unlisted)
    for exc in unlisted:
        print(f"dicomfuse prefetch: cannot list {exc.filename or path}: {exc.strerror or exc}", file=out)
    if any(exc.filename is None or Path(exc.filename) == path for exc in unlisted):
        return 1  # the folder itself: nothing was looked at (said above, not "no instances")
    failed, dropped = 0, None
    if files:
        progress = Progress(len(files), out)
        read = warm(files, threads, progress, read_file)
        failed = progress.failed
        dropped = not_kept(read)
    if dropped:
        print(f"dicomfuse prefetch: {_not_kept_text(dropped, len(files) - failed)} (the mount's --cacheSize is too "
              "small, or its --cacheTime shorter than this prefetch took): what did not stay is downloaded again "
              "when read", file=out)
    if unlisted:
        print(f"dicomfuse prefetch: {_folders(len(unlisted))} below {path} could not be listed; "
              "their instances were not prefetched", file=out)
        return 1
    if not files:
        print(f"dicomfuse prefetch: no instances below {path}", file=out)
        return 0
    return 1 if failed else EXIT_NOT_KEPT if dropped else 0


def _not_kept_text(dropped: int, read: int) -> str:
    if read == 1:
        return "the file read did not stay in the cache"
    if dropped == read:
        return f"none of the {read} files read stayed in the cache"
    return f"{dropped} of the {read} files read did not stay in the cache"


def _folders(n: int) -> str:
    return "1 folder" if n == 1 else f"{n} folders"


def run_prefetch(argv: list[str]) -> int:
    """Entry point of ``dicomfuse prefetch``."""
    if any(a in ("-a", "--datasetAddr") or a.startswith("--datasetAddr=") for a in argv):
        return _prefetch_standalone(argv)
    parser = argparse.ArgumentParser(
        prog="dicomfuse prefetch",
        description="Warm the cache of a running mount: read every instance below PATH once, in parallel. "
                    "With -a ADDRESS -p MOUNTPATH (and any mount option) it mounts first and warms the "
                    "folder given relative to the mount. Exit code: 0 every instance was read and stayed in "
                    "the cache; 1 some could not be read, or a folder could not be listed (each is named); "
                    "2 PATH is not a folder of a mount; 3 every instance was read but some did not stay in "
                    "the cache (--cacheSize too small, or --cacheTime too short, for them).")
    parser.add_argument("path", type=Path, help="a store, study or series folder of a running mount")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="parallel reads (default 8)")
    parser.add_argument("--logDir", type=Path, help="folder of the log files (as for the mount)")
    args = parser.parse_args(argv)
    return prefetch_running_mount(args.path, args.threads)


def _prefetch_standalone(argv: list[str]) -> int:
    """Mount with the same flags as ``dicomfuse``; warm FOLDER once the mount is up."""
    from dicomfuse.cli import main as cli

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("folder", help="the folder to warm, relative to the mount (e.g. store/1.2.3)")
        parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="parallel reads (default 8)")

    settings, ns = cli.parse_settings_with(argv, prog="dicomfuse prefetch", add_arguments=add)
    target = settings.mountPath / str(ns.folder).strip("/")

    def when_mounted() -> None:
        cli.log.info("Warming %s", target)
        prefetch_running_mount(target, ns.threads)

    return cli.mount(settings, on_mounted=when_mounted)
