"""A do-nothing passthrough FUSE filesystem: the least any Python FUSE filesystem costs.

    python bench/floor.py SOURCE_DIR MOUNTPOINT [--no-readdirplus] [--writable]

Serves ``SOURCE_DIR`` at ``MOUNTPOINT`` in the foreground until ``fusermount3 -u``. It goes
through mfusepy and libfuse 3 as DICOMFuse does (``raw_fi=True``, ``use_ns``, multithreaded,
the same ``attr_timeout``/``entry_timeout``/``negative_timeout`` of 1 s as
``dicomfuse.backends.options.default_options``), and does nothing else: attributes from
``os.lstat``, listings from ``os.scandir`` (READDIRPLUS for every page, answered with full
attributes and offsets, as DICOMFuse answers it, unless ``--no-readdirplus``), ``open`` keeps
the kernel's page cache and asks for no flush on close, reads are ``os.pread``; each libfuse
worker keeps its Python thread state, as DICOMFuse's adapter does. Read-only unless
``--writable``: then files can be created and written (``os.pwrite`` into SOURCE_DIR, nothing
else; flush and release do nothing but close). The bench mounts it next to DICOMFuse to show the
cost of the FUSE round trips into Python themselves (see bench/README.md, "floor rows").

Standalone on purpose: it imports nothing from the package under test.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import stat
import sys
import threading
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # noqa: E402

OPTIONS: dict[str, str | bool] = {
    "fsname": "dicomfuse-floor",
    "attr_timeout": "1",
    "entry_timeout": "1",
    "negative_timeout": "1",
}
"""DICOMFuse's Linux defaults that change what the kernel asks (``hard_remove`` and ``subtype``
do not matter to a read-only filesystem)."""
FUSE_READDIR_PLUS = 1 << 0  # in readdir's flags: the kernel asks for attributes too
FUSE_FILL_DIR_PLUS = 1 << 1  # in the filler's flags: this entry's attributes are complete
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14  # fuse_common.h: READDIRPLUS for the first page only
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def attributes(st: os.stat_result) -> dict[str, int]:
    """An ``os.lstat`` result as mfusepy wants it (times in nanoseconds: ``use_ns``)."""
    return {"st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_size": st.st_size, "st_uid": st.st_uid,
            "st_gid": st.st_gid, "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}


class Passthrough(mfusepy.Operations):  # type: ignore[misc]
    """Read-only ``source`` as it is; only the callbacks a reader needs are defined (mfusepy
    leaves the others to libfuse, which answers them without calling Python)."""

    use_ns = True

    def __init__(self, source: str) -> None:
        self.source = os.path.realpath(source)

    def _real(self, path: str) -> str:
        return self.source + path

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        return attributes(os.lstat(self._real(path)))

    def readdir(self, path: str, fh: Any) -> list[Any]:
        with os.scandir(self._real(path)) as entries:
            return [".", "..", *((e.name, {"st_mode": stat.S_IFDIR if e.is_dir(follow_symlinks=False)
                                           else stat.S_IFREG}, 0) for e in entries)]

    def readdir_plus(self, path: str) -> list[tuple[str, dict[str, int]]]:
        """Sorted, so that every page of a listing sees the entries in one order."""
        with os.scandir(self._real(path)) as entries:
            return sorted((e.name, attributes(e.stat(follow_symlinks=False))) for e in entries)

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None and config is not None:  # READDIRPLUS for every page, as DICOMFuse asks
            conn.want &= ~FUSE_CAP_READDIRPLUS_AUTO
            if hasattr(conn, "want_ext"):
                conn.want_ext &= ~FUSE_CAP_READDIRPLUS_AUTO

    def open(self, path: str, fi: Any) -> int:
        if fi.flags & WRITE_FLAGS:
            raise mfusepy.FuseOSError(errno.EROFS)
        fi.fh = os.open(self._real(path), os.O_RDONLY)
        fi.keep_cache = 1
        if hasattr(fi, "noflush"):  # libfuse >= 3.11, kernel >= 5.17
            fi.noflush = 1
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return os.pread(fi.fh, size, offset)

    def release(self, path: str, fi: Any) -> int:
        os.close(fi.fh)
        return 0


class WritablePassthrough(Passthrough):
    """``--writable``: what ``cp`` into a folder needs, and nothing more."""

    def open(self, path: str, fi: Any) -> int:
        fi.fh = os.open(self._real(path), fi.flags & ~(os.O_CREAT | os.O_EXCL))
        fi.keep_cache = 1
        return 0

    def create(self, path: str, mode: int, fi: Any) -> int:
        fi.fh = os.open(self._real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return 0

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        return os.pwrite(fi.fh, data, offset)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        os.truncate(self._real(path), length)
        return 0

    def flush(self, path: str, fi: Any) -> int:
        return 0

    def chmod(self, path: str, mode: int) -> int:
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: Any = None) -> int:
        return 0


_ENSURE = ctypes.pythonapi["PyGILState_Ensure"]
_ENSURE.restype = ctypes.c_int


class FloorFuse(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with READDIRPLUS answered with full attributes and offsets (mfusepy passes
    modes only, at offset 0), so that a walk needs no lookup per entry, and each libfuse
    worker's Python thread state kept between callbacks (one ``PyGILState_Ensure`` per worker,
    never released), as in DICOMFuse's adapter: without it every callback builds and frees one."""

    readdirplus = True
    _thread = threading.local()

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self._thread, "kept", False):
            _ENSURE()
            self._thread.kept = True
        return super()._wrapper(func, *args, **kwargs)

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        """Each entry with its offset: libfuse 3 passes attributes to the kernel only then."""
        if not (self.readdirplus and flags & FUSE_READDIR_PLUS) or path is None:
            return int(super().readdir_fuse_3(path, buf, filler, offset, fip, flags))
        entries = self.operations.readdir_plus(path.decode(self.encoding, self.errors))
        for index in range(offset, len(entries)):
            name, attrs = entries[index]
            st = mfusepy.c_stat()
            mfusepy.set_st_attrs(st, attrs, use_ns=True)
            if filler(buf, name.encode(self.encoding, self.errors), st, index + 1, FUSE_FILL_DIR_PLUS) != 0:
                break
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/floor.py", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the folder to serve")
    parser.add_argument("mountpoint")
    parser.add_argument("--no-readdirplus", action="store_true",
                        help="answer READDIRPLUS as mfusepy does (names and types only)")
    parser.add_argument("--writable", action="store_true", help="files can be created and written")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.source):
        parser.error(f"{args.source} is not a folder")
    FloorFuse.readdirplus = not args.no_readdirplus
    operations = (WritablePassthrough if args.writable else Passthrough)(args.source)
    try:
        FloorFuse(operations, args.mountpoint, raw_fi=True, foreground=True, **OPTIONS)
    except RuntimeError as exc:  # libfuse's non-zero status: the mount failed, or a signal ended it
        print(f"floor: libfuse returned {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
