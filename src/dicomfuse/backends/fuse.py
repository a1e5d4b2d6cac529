"""libfuse (Linux) and macFUSE (macOS) adapter through mfusepy: translation only.

Each callback turns its arguments into one ``Vfs`` call and its result into what libfuse
wants; ``translate`` is the one place where errors become errno. Policy lives in the core.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

if sys.platform.startswith("linux") and not {"FUSE_LIBRARY_PATH", "FUSE_LIBRARY_NAME"} & set(os.environ):
    from ctypes.util import find_library

    # mfusepy tries libfuse 2 first: where both are installed, libfuse 3 (READDIRPLUS, noflush).
    if find_library("fuse3"):
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

import mfusepy  # noqa: E402

from dicomfuse.core.errors import FsError, for_operation
from dicomfuse.core.vfs import Attr, OpenResult, Vfs

log = logging.getLogger(__name__)

_UTIME_NOW = (1 << 30) - 1  # tv_nsec values of utimensat (tv_sec 0), as nanoseconds
_UTIME_OMIT = (1 << 30) - 2

F = TypeVar("F", bound=Callable[..., Any])


def translate(func: F) -> F:
    """FsError → its errno, logged at its level; OSError → its errno; anything else → EIO
    with one logged traceback (never a crash of the mount)."""

    @functools.wraps(func)
    def wrapper(self: FuseOperations, *args: Any) -> Any:
        try:
            return func(self, *args)
        except FsError as exc:
            log.log(exc.level, "%s", for_operation(func.__name__, exc.strerror or ""))
            raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None
        except mfusepy.FuseOSError:
            raise
        except OSError as exc:
            log.debug("%s: %s", func.__name__, exc)
            raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("Unexpected error in %s; answering EIO", func.__name__)
            raise mfusepy.FuseOSError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


XATTR_CREATE, XATTR_REPLACE = 1, 2  # setxattr(2) flags, the same on Linux and macOS


class FuseOperations(mfusepy.Operations):
    """mfusepy callbacks for a :class:`Vfs` (``raw_fi=True``: we set direct_io/keep_cache)."""

    use_ns = True

    def __init__(self, vfs: Vfs, uid: int | None = None, gid: int | None = None, *,
                 max_read: int | None = None, mountpoint: str | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.vfs = vfs
        self.on_stop = on_stop  # called by destroy: the mount is gone, the shutdown begins
        self.max_read = max_read  # the max_read mount option: init() must ask for it too
        self.mountpoint = mountpoint  # looked at once after init, to know the mount came up
        # Windows (WinFsp's FUSE layer) has no uid: its uid=-1,gid=-1 options map owners.
        self.uid = getattr(os, "getuid", lambda: 0)() if uid is None else uid
        self.gid = getattr(os, "getgid", lambda: 0)() if gid is None else gid
        self._fuse: int | None = None  # struct fuse *, for kernel cache invalidation
        self._pages: dict[int, list[tuple[str, dict[str, int] | None, bool]]] = {}  # open folder -> listing
        self._pages_lock = threading.Lock()
        self._handles = itertools.count(1)
        self.initialized = False
        self.refused = False  # libfuse refused the kernel's INIT after init(): the mount never came up
        self._check: threading.Thread | None = None
        vfs.notify_changed = self._invalidate

    # -- lifecycle ---------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        """libfuse 3: READDIRPLUS for every page of a listing, not the first page only (the
        kernel's "auto" mode). Programs read a whole folder before they stat or open what is in
        it (ls -l, cp -r, find, a viewer), so without it every entry past the first page cost
        a LOOKUP round trip into Python."""
        if conn is not None and config is not None:
            conn.want &= ~FUSE_CAP_READDIRPLUS_AUTO
            if hasattr(conn, "want_ext"):  # libfuse >= 3.17 keeps the flags in both
                conn.want_ext &= ~FUSE_CAP_READDIRPLUS_AUTO
            if self.max_read is not None:
                # libfuse 3 refuses the mount ("init() and fuse_session_new() requested different
                # maximum read size") unless init() asks for the max_read option's size too.
                conn.max_read = self.max_read
        self.init("/")

    def init(self, path: str) -> None:
        try:
            self._fuse = mfusepy._libfuse.fuse_get_context().contents.fuse
            mfusepy._libfuse.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            mfusepy._libfuse.fuse_invalidate_path.restype = ctypes.c_int
        except (AttributeError, ValueError):
            self._fuse = None
        self.vfs.start()
        self.initialized = True
        if self.mountpoint is not None:
            # libfuse may still refuse the kernel's INIT after this returns (a max_read it did
            # not get from init), and then ends its loop with the status a Ctrl+C gives: one stat
            # of the mount point tells them apart (the kernel answers ECONNREFUSED after a refusal).
            self._check = threading.Thread(target=self._look_once, name="mount-check", daemon=True)
            self._check.start()

    def destroy(self, path: str) -> None:
        """libfuse's last call, on the thread that mounted, once the mount is gone. libfuse
        has given Ctrl+C and SIGTERM back their default action (end the process at once) just
        before: the shutdown that follows (uploads in flight, the cache wipe) must not be cut
        short by the next one."""
        if self.on_stop is not None:
            self.on_stop()

    def _look_once(self) -> None:
        try:
            os.stat(self.mountpoint)  # type: ignore[arg-type]
        except OSError as exc:
            self.refused = exc.errno == errno.ECONNREFUSED

    def was_refused(self, timeout: float = 5.0) -> bool:
        """Whether libfuse refused the kernel's INIT (waits for the mount-check's answer)."""
        if self._check is not None:
            self._check.join(timeout)
        return self.refused

    def _invalidate(self, path: str) -> bool:
        """Tell the kernel to drop the cached attributes and pages of ``path`` (its size was learnt,
        or it was written anew); nothing to do if the kernel has never looked it up. True when
        the kernel was told."""
        if self._fuse:
            try:
                return mfusepy._libfuse.fuse_invalidate_path(self._fuse, path.encode("utf-8", "surrogateescape")) == 0
            except Exception:  # noqa: BLE001 - best effort: attributes also expire by timeout
                log.debug("fuse_invalidate_path failed for %s", path, exc_info=True)
        return False

    # -- attributes --------------------------------------------------------------------------

    def _stat(self, attr: Attr) -> dict[str, int]:
        ns = int(attr.mtime * 1e9)
        if attr.is_dir:
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0, "st_uid": self.uid,
                    "st_gid": self.gid, "st_mtime": ns, "st_ctime": ns, "st_atime": ns}
        return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": attr.size,
                "st_blocks": (attr.size + 511) // 512, "st_blksize": 1 << 17, "st_uid": self.uid,
                "st_gid": self.gid, "st_mtime": ns, "st_ctime": ns, "st_atime": ns}

    @staticmethod
    def _caller() -> int:
        return mfusepy.fuse_get_context()[2]

    @translate
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        return self._stat(self.vfs.getattr(path, fh.fh if fh is not None else None, self._caller()))

    @translate
    def readdir(self, path: str, fh: Any) -> list[Any]:
        entries: list[Any] = [".", ".."]
        for name, attr in self.vfs.readdir(path):
            entries.append((name, {"st_mode": stat.S_IFDIR if attr.is_dir else stat.S_IFREG}, 0))
        return entries

    def opendir(self, path: str) -> int:
        """A handle of its own for each open folder: its listing is kept from the first page to
        the last (see readdir_plus)."""
        return next(self._handles)

    def releasedir(self, path: str, fh: int) -> int:
        with self._pages_lock:
            self._pages.pop(fh, None)
        return 0

    @translate
    def readdir_plus(self, path: str, offset: int = 0, fh: int = 0) -> list[tuple[str, dict[str, int] | None, bool]]:
        """The listing with full attributes (third item True), so the kernel needs no lookup per
        entry (ls -l, find). A file of unknown size gets its type only: its stat must reach
        getattr, which learns the size for a program that will read the file (core.sizes).

        The kernel asks page by page, each from the offset where the last one ended. The listing
        of the open folder ``fh`` is kept from the page at offset 0 until the folder is closed,
        so an entry added or removed meanwhile shifts nothing (POSIX: an unchanged entry is
        returned exactly once); rewinddir starts a fresh one."""
        if offset:
            with self._pages_lock:
                kept = self._pages.get(fh)
            if kept is not None:
                return kept
        out: list[tuple[str, dict[str, int] | None, bool]] = [(".", None, False), ("..", None, False)]
        rendered: dict[Attr, dict[str, int]] = {}  # folders (and files of one size) share attributes
        for name, attr in self.vfs.readdir(path):
            if attr.size_known:
                st = rendered.get(attr)
                if st is None:
                    st = rendered[attr] = self._stat(attr)
                out.append((name, st, True))
            else:
                out.append((name, _TYPE_ONLY, False))
        with self._pages_lock:
            self._pages[fh] = out
        return out

    @translate
    def statfs(self, path: str) -> dict[str, int]:
        return self.vfs.statfs()

    @translate
    def chmod(self, path: str, mode: int) -> int:
        self.vfs.setattr_noop(path)
        return 0

    @translate
    def chown(self, path: str, uid: int, gid: int) -> int:
        self.vfs.setattr_noop(path)
        return 0

    @translate
    def utimens(self, path: str, times: Any = None) -> int:
        # libfuse passes utimensat's UTIME_NOW / UTIME_OMIT as tv_sec 0 and those tv_nsec values.
        mtime_ns = None if times is None else times[1]
        if mtime_ns is None or mtime_ns == _UTIME_NOW:
            mtime: float | None = time.time()
        elif mtime_ns == _UTIME_OMIT:
            mtime = None
        else:
            mtime = mtime_ns / 1e9
        self.vfs.set_times(path, mtime)
        return 0

    @translate
    def access(self, path: str, amode: int) -> int:
        self.vfs.getattr(path)
        return 0

    # -- folders ---------------------------------------------------------------------------

    @translate
    def mkdir(self, path: str, mode: int) -> int:
        self.vfs.mkdir(path)
        return 0

    @translate
    def rmdir(self, path: str) -> int:
        self.vfs.rmdir(path)
        return 0

    @translate
    def rename(self, old: str, new: str) -> int:
        self.vfs.rename(old, new)
        return 0

    @translate
    def rename_with_flags(self, old: str, new: str, flags: int) -> int:
        """renameat2(2): RENAME_NOREPLACE (``mv -n``) refuses an existing target; an exchange
        or a whiteout is not something a DICOM store can do."""
        if flags & ~RENAME_NOREPLACE:
            raise mfusepy.FuseOSError(errno.EINVAL)
        self.vfs.rename(old, new, replace=not flags & RENAME_NOREPLACE)
        return 0

    # -- files -----------------------------------------------------------------------------

    @translate
    def create(self, path: str, mode: int, fi: Any) -> int:
        self._fill(fi, self.vfs.create(path))
        return 0

    @translate
    def open(self, path: str, fi: Any) -> int:
        self._fill(fi, self.vfs.open(path, fi.flags, self._caller()))
        return 0

    @staticmethod
    def _fill(fi: Any, result: OpenResult) -> None:
        fi.fh = result.fh
        fi.direct_io = int(result.direct_io)
        fi.keep_cache = int(result.keep_cache)
        if result.no_flush and hasattr(fi, "noflush"):  # libfuse >= 3.11, kernel >= 5.17
            fi.noflush = 1  # close() of a read-only file costs no round trip into Python

    @translate
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return self.vfs.read(fi.fh, size, offset)

    @translate
    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        return self.vfs.write(fi.fh, data, offset)

    @translate
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        self.vfs.truncate(path, length, fh.fh if fh is not None else None)
        return 0

    @translate
    def flush(self, path: str, fi: Any) -> int:
        self.vfs.flush(fi.fh)
        return 0

    @translate
    def fsync(self, path: str, datasync: int, fi: Any) -> int:
        self.vfs.fsync(fi.fh)
        return 0

    @translate
    def release(self, path: str, fi: Any) -> int:
        self.vfs.release(fi.fh)
        return 0

    @translate
    def unlink(self, path: str) -> int:
        self.vfs.unlink(path)
        return 0

    @translate
    def link(self, target: str, source: str) -> int:
        self.vfs.link(target)
        return 0

    @translate
    def symlink(self, target: str, source: str) -> int:
        self.vfs.link(target)
        return 0

    @translate
    def mknod(self, path: str, mode: int, dev: int) -> int:
        self.vfs.link(path)
        return 0

    # -- extended attributes ---------------------------------------------------------------

    @translate
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.vfs.setxattr(path, name, value, create=bool(options & XATTR_CREATE),
                          replace=bool(options & XATTR_REPLACE))
        return 0

    @translate
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.vfs.getxattr(path, name)

    @translate
    def listxattr(self, path: str) -> list[str]:
        return self.vfs.listxattr(path)

    @translate
    def removexattr(self, path: str, name: str) -> int:
        self.vfs.removexattr(path, name)
        return 0


_TYPE_ONLY = {"st_mode": stat.S_IFREG}
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14  # fuse_common.h (libfuse 3)
RENAME_NOREPLACE = 1 << 0  # linux/fs.h, as renameat2(2) passes them through libfuse 3
FUSE_READDIR_PLUS = 1 << 0  # in readdir's flags: the kernel asks for attributes too
FUSE_FILL_DIR_PLUS = 1 << 1  # in the filler's flags: this entry's attributes are complete


class ThreadStates:
    """Keeps the Python thread state of each libfuse worker from one callback to the next.

    A ctypes callback on a thread Python did not start makes a thread state on entry and frees it
    on return (``PyGILState_Ensure``/``Release``): two mmaps, a munmap and a gettid for every FUSE
    request, a third of the mount's CPU in a warm re-read. :meth:`keep` takes one more
    ``PyGILState_Ensure`` on a thread's first callback, so its later callbacks only take the GIL.

    At most ``limit`` states are kept. libfuse 3 keeps its workers for the life of the mount
    (``max_idle_threads`` ≥ ``max_threads``), as WinFsp keeps its dispatchers, so all of them
    are. libfuse 2 (macFUSE) ends idle workers and starts new ones: a state kept for a worker
    that ended stays allocated (tens of KiB) until the mount exits, so past the limit new
    workers go without."""

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self.kept = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._ensure = ctypes.pythonapi["PyGILState_Ensure"]  # our own function object: ctypes.pythonapi's
        self._ensure.restype = ctypes.c_int                 # attributes are shared by the whole process

    def keep(self) -> None:
        """Called at the start of every callback, with the GIL held."""
        if self.kept >= self.limit or getattr(self._local, "kept", False):
            return
        with self._lock:
            if self.kept >= self.limit:
                return
            self.kept += 1
        self._ensure()  # never released: the thread's state outlives this callback
        self._local.kept = True


class _FUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with READDIRPLUS answered (mfusepy passes names and modes only, so the
    kernel would send one lookup per entry after every listing), rename flags kept (mfusepy
    drops them, so ``mv -n`` would overwrite) and each worker's thread state kept."""

    thread_states = ThreadStates()

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.thread_states.keep()
        return super()._wrapper(func, *args, **kwargs)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        if not flags:
            return int(super().rename_fuse_3(old, new, flags))
        return int(self.operations.rename_with_flags(
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags))

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        """READDIRPLUS with each entry's offset: libfuse 3 passes the attributes of an entry to the
        kernel only when the filler is given offsets (given 0, it keeps names and attributes in
        a list and sends every entry without them, so each one cost a LOOKUP)."""
        plus = getattr(self.operations, "readdir_plus", None)
        if not flags & FUSE_READDIR_PLUS or plus is None or path is None:
            return int(super().readdir_fuse_3(path, buf, filler, offset, fip, flags))
        fh = fip.contents.fh if fip else 0
        entries = plus(path.decode(self.encoding, self.errors), offset, fh)  # FuseOSError: the wrapper
        for index in range(offset, len(entries)):
            entry, attrs, complete = entries[index]
            st = mfusepy.c_stat()
            if attrs is not None:
                mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
            fill = FUSE_FILL_DIR_PLUS if complete else 0  # without it libfuse passes the type only
            if filler(buf, entry.encode(self.encoding, self.errors), st if attrs is not None else None,
                      index + 1, fill) != 0:
                break  # the page is full; the next one starts at this entry
        return 0


def run(vfs: Vfs, mountpoint: str, options: dict[str, str | bool],
        on_stop: Callable[[], None] | None = None) -> None:
    """Mount and serve in the foreground until unmounted (Ctrl+C, SIGTERM, fusermount -u).
    Raises RuntimeError only if the mount never came up. ``on_stop`` is called on this thread
    as soon as the mount is gone, before this returns."""
    max_read = options.get("max_read")
    ops = FuseOperations(vfs, max_read=int(max_read) if isinstance(max_read, str) and max_read.isdecimal() else None,
                         mountpoint=None if sys.platform == "win32" else mountpoint, on_stop=on_stop)
    try:
        _FUSE(ops, mountpoint, raw_fi=True, foreground=True, **options)
    except RuntimeError as exc:
        if not ops.initialized or ops.was_refused():  # refused at INIT (libfuse said why): never mounted
            raise
        # libfuse answers non-zero when a signal (Ctrl+C, SIGTERM) ended the loop: a clean stop.
        log.debug("libfuse returned %s after serving the mount", exc)
