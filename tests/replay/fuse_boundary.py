"""libfuse's side of the FUSE adapter, for replaying an OS's call sequences without a mount.

:class:`FuseBoundary` drives ``backends.fuse._FUSE`` exactly where libfuse would: it builds the
``struct fuse_operations`` callbacks the way ``mfusepy.FUSE.__init__`` does (a ``CFUNCTYPE`` of the
struct field's prototype around ``FUSE._wrapper`` and the ``*_fuse_2``/``*_fuse_3`` method), and
calls them through ctypes with C arguments (path bytes, ``struct stat *``, ``struct
fuse_file_info *``, byte buffers, a ``fuse_fill_dir_t`` filler). Every method returns
``(rc, result)`` with ``rc`` what libfuse would get back: ``>= 0`` success (a byte count for
read/write/xattr sizes), ``-errno`` a refusal. Nothing is mounted; ``FUSE.__init__`` is bypassed.

The other direction, what the adapter calls *in* libfuse (``fuse_get_context``,
``fuse_invalidate_path``, ``fuse_exit``), is answered by :class:`NativeStandIn`, which replaces
``mfusepy._libfuse`` while the boundary is open: the context names the calling process
(:attr:`FuseBoundary.caller`), and invalidations are recorded.

A call that would crash libfuse (an exception escaping the ctypes callback, a critical exception
that makes mfusepy call ``fuse_exit``) raises :class:`BoundaryBroken` here.

:func:`replay` runs a call sequence given as data (:class:`Step`), e.g. ``tests/replay/finder.py``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mfusepy

from dicomfuse.backends.fuse import _FUSE, FUSE_FILL_DIR_PLUS, FUSE_READDIR_PLUS, FuseOperations
from dicomfuse.backends.options import default_options
from dicomfuse.core.vfs import Vfs

FUSE_MAJOR: int = mfusepy.fuse_version_major
ENOATTR: int = mfusepy.ENOATTR  # ENODATA on Linux; what mfusepy treats as "no such attribute"
_PROTOTYPES: dict[str, Any] = {f[0]: f[1] for f in mfusepy.fuse_operations._fields_}  # type: ignore[attr-defined]
_FILLER_T = _PROTOTYPES["readdir"]._argtypes_[2]  # fuse_fill_dir_t of this libfuse


_RETURNS_A_COUNT = {"read", "write", "getxattr", "listxattr", "init"}  # the others: 0 or -errno


class BoundaryBroken(AssertionError):
    """Something happened at the C boundary that libfuse cannot survive."""


@dataclass(frozen=True)
class Caller:
    """The process a request comes from, as ``fuse_get_context()`` tells it."""

    name: str
    pid: int
    uid: int = 501
    gid: int = 20


@dataclass(frozen=True)
class Stat:
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(frozen=True)
class DirEntry:
    name: str
    mode: int | None  # the type bits the filler got (None: no stat)
    size: int | None  # with FUSE_FILL_DIR_PLUS only
    plus: bool


@dataclass(frozen=True)
class Call:
    """One callback as libfuse made it, for failure messages."""

    op: str
    path: str
    rc: int
    caller: str

    def __str__(self) -> str:
        outcome = "ok" if self.rc >= 0 else errno.errorcode.get(-self.rc, str(self.rc))
        return f"{self.caller}: {self.op} {self.path} -> {outcome}"


class _Invalidate:
    """``fuse_invalidate_path``: a callable that accepts ``argtypes`` like a ctypes function."""

    def __init__(self, native: NativeStandIn) -> None:
        self.native = native
        self.argtypes: list[Any] | None = None

    def __call__(self, fuse: int, path: bytes) -> int:
        if fuse != NativeStandIn.FUSE_HANDLE:
            raise BoundaryBroken(f"fuse_invalidate_path got struct fuse * {fuse!r}, not the one libfuse handed out")
        self.native.invalidated.append(path.decode("utf-8", "surrogateescape"))
        return 0


class NativeStandIn:
    """What the adapter calls in libfuse, answered as libfuse would during a request."""

    FUSE_HANDLE = 0x0F05E  # the struct fuse * that fuse_get_context().fuse points to

    def __init__(self, real: Any) -> None:
        self._real = real
        self.context = mfusepy.fuse_context()
        self.context.fuse = self.FUSE_HANDLE
        self.invalidated: list[str] = []
        self.exited = False
        self.fuse_invalidate_path = _Invalidate(self)

    def fuse_get_context(self) -> Any:
        return ctypes.pointer(self.context)

    def fuse_exit(self, fuse: Any) -> None:
        self.exited = True

    def __getattr__(self, name: str) -> Any:  # anything else: the real library (fuse_version, ...)
        return getattr(self._real, name)


def _registered_callbacks(fuse: Any) -> dict[str, Any]:
    """The ``fuse_operations`` entries ``mfusepy.FUSE.__init__`` would fill for this operations
    object, as ctypes function pointers around ``FUSE._wrapper`` (same rule: a method the
    operations object lacks, or marks ``libfuse_ignore``, is left NULL so libfuse falls back)."""
    ops = fuse.operations
    callbacks: dict[str, Any] = {}
    for name, prototype in _PROTOTYPES.items():
        if not hasattr(prototype, "argtypes"):
            continue  # flags and reserved slots
        wanted = name[1:] if name in ("ftruncate", "fgetattr") else name
        impl = getattr(ops, wanted, None)
        if wanted == "readdir" and (impl is None or getattr(impl, "libfuse_ignore", False)):
            impl = getattr(ops, "readdir_with_offset", None)
        if (impl is None or getattr(impl, "libfuse_ignore", False)) and name != "init":
            continue
        method = getattr(fuse, f"{name}_fuse_{FUSE_MAJOR}", None) or getattr(fuse, name)
        callbacks[name] = prototype(functools.partial(fuse._wrapper, method))
    return callbacks


class FuseBoundary:
    """The adapter's ``_FUSE`` over ``vfs``, driven as libfuse drives it. Use as a context manager
    (or call :meth:`close`): while open, ``mfusepy._libfuse`` is the :class:`NativeStandIn`."""

    def __init__(self, vfs: Vfs, caller: Caller, *, platform: str = "darwin",
                 options: Mapping[str, str | bool] | None = None) -> None:
        self.caller = caller
        self.trace: list[Call] = []
        self._real_libfuse = mfusepy._libfuse
        self.native = NativeStandIn(self._real_libfuse)
        mfusepy._libfuse = self.native
        self.options = dict(default_options(platform) if options is None else options)
        self._vfs, self._notify_before = vfs, vfs.notify_changed
        self.ops = FuseOperations(vfs, uid=caller.uid, gid=caller.gid)
        fuse = _FUSE.__new__(_FUSE)  # no FUSE.__init__: nothing is mounted
        fuse.operations = self.ops
        fuse.raw_fi = True  # as backends.fuse.run passes it
        fuse.encoding, fuse.errors = "utf-8", "surrogateescape"
        fuse.use_ns = getattr(self.ops, "use_ns", False)
        fuse._FUSE__critical_exception = None  # mfusepy.FUSE's private, set by _wrapper
        fuse._libfuse2_options_moved_into_libfuse3_config = {
            k: v for k, v in self.options.items() if k in mfusepy._LIBFUSE_2_OPTIONS_MOVED_INTO_FUSE_3_CONFIG
        }
        self.fuse = fuse
        self.callbacks = _registered_callbacks(fuse)
        self.config = mfusepy.fuse_config()
        self.conn = mfusepy.fuse_conn_info()
        self._unraisable: list[Any] = []
        self._init()

    # -- lifecycle -------------------------------------------------------------------------

    def _init(self) -> None:
        """libfuse calls init once, before any request."""
        if FUSE_MAJOR == 3:
            self._call("init", "/", ctypes.pointer(self.conn), ctypes.pointer(self.config))
        else:
            self._call("init", "/", ctypes.pointer(self.conn))
        if not self.ops.initialized:
            raise BoundaryBroken("init did not initialise the adapter")

    def close(self) -> None:
        """Give libfuse back to mfusepy, and unhook the adapter from the core: a later size
        learnt must not reach the real fuse_invalidate_path with this stand-in's handle."""
        self.ops._fuse = None
        self._vfs.notify_changed = self._notify_before
        if mfusepy._libfuse is self.native:
            mfusepy._libfuse = self._real_libfuse

    def __enter__(self) -> FuseBoundary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def as_process(self, caller: Caller) -> _AsProcess:
        """``with boundary.as_process(MDS): ...``: requests come from another process."""
        return _AsProcess(self, caller)

    # -- the call itself -------------------------------------------------------------------

    def _call(self, op: str, path: str, *args: Any) -> int:
        callback = self.callbacks.get(op)
        if callback is None:
            rc = -errno.ENOSYS  # libfuse's answer for a NULL operation
        else:
            ctx = self.native.context
            ctx.uid, ctx.gid, ctx.pid = self.caller.uid, self.caller.gid, self.caller.pid
            previous = sys.unraisablehook
            sys.unraisablehook = self._unraisable.append
            try:
                result = callback(*args)
            finally:
                sys.unraisablehook = previous
            rc = 0 if result is None else int(result)
            if rc > 0 and op not in _RETURNS_A_COUNT:
                raise BoundaryBroken(f"{op} {path}: returned {rc}; libfuse takes only 0 or -errno here")
            if self._unraisable:
                raise BoundaryBroken(f"{op} {path}: an exception escaped the ctypes callback: "
                                     f"{self._unraisable[0].exc_value!r}")
            critical = self.fuse._FUSE__critical_exception
            if critical is not None or self.native.exited:
                raise BoundaryBroken(f"{op} {path}: mfusepy aborted the mount ({critical!r})")
        self.trace.append(Call(op, path, rc, self.caller.name))
        return rc

    @staticmethod
    def _b(path: str) -> bytes:
        return path.encode("utf-8", "surrogateescape")

    @staticmethod
    def _fip(fi: mfusepy.fuse_file_info | None) -> Any:
        return ctypes.pointer(fi) if fi is not None else None

    # -- attributes ------------------------------------------------------------------------

    def getattr(self, path: str, fi: mfusepy.fuse_file_info | None = None) -> tuple[int, Stat | None]:
        st = mfusepy.c_stat()
        if FUSE_MAJOR == 3:
            rc = self._call("getattr", path, self._b(path), ctypes.pointer(st), self._fip(fi))
        elif fi is not None:
            rc = self._call("fgetattr", path, self._b(path), ctypes.pointer(st), self._fip(fi))
        else:
            rc = self._call("getattr", path, self._b(path), ctypes.pointer(st))
        if rc < 0:
            return rc, None
        mtime = st.st_mtimespec if hasattr(st, "st_mtimespec") else st.st_mtim
        return rc, Stat(st.st_mode, st.st_size, st.st_nlink, st.st_uid, st.st_gid,
                        mtime.tv_sec * 10**9 + mtime.tv_nsec)

    def access(self, path: str, amode: int = os.F_OK) -> tuple[int, None]:
        return self._call("access", path, self._b(path), amode), None

    def statfs(self, path: str = "/") -> tuple[int, dict[str, int] | None]:
        st = mfusepy.c_statvfs()
        rc = self._call("statfs", path, self._b(path), ctypes.pointer(st))
        if rc < 0:
            return rc, None
        return rc, {name: getattr(st, name) for name, *_ in st._fields_ if not name.startswith("_")}

    def chmod(self, path: str, mode: int, fi: mfusepy.fuse_file_info | None = None) -> tuple[int, None]:
        args: tuple[Any, ...] = (self._fip(fi),) if FUSE_MAJOR == 3 else ()
        return self._call("chmod", path, self._b(path), mode, *args), None

    def chown(self, path: str, uid: int, gid: int, fi: mfusepy.fuse_file_info | None = None) -> tuple[int, None]:
        args: tuple[Any, ...] = (self._fip(fi),) if FUSE_MAJOR == 3 else ()
        return self._call("chown", path, self._b(path), uid, gid, *args), None

    def utimens(self, path: str, times_ns: tuple[int, int] | None = None,
                fi: mfusepy.fuse_file_info | None = None) -> tuple[int, None]:
        """``times_ns`` = (atime, mtime) in nanoseconds; None is ``utimensat(..., NULL)`` (now)."""
        buf = None
        if times_ns is not None:
            tv = mfusepy.c_utimbuf()
            tv.actime.tv_sec, tv.actime.tv_nsec = divmod(times_ns[0], 10**9)
            tv.modtime.tv_sec, tv.modtime.tv_nsec = divmod(times_ns[1], 10**9)
            buf = ctypes.pointer(tv)
        args: tuple[Any, ...] = (self._fip(fi),) if FUSE_MAJOR == 3 else ()
        return self._call("utimens", path, self._b(path), buf, *args), None

    def truncate(self, path: str, length: int, fi: mfusepy.fuse_file_info | None = None) -> tuple[int, None]:
        if FUSE_MAJOR == 3:
            return self._call("truncate", path, self._b(path), length, self._fip(fi)), None
        if fi is not None:
            return self._call("ftruncate", path, self._b(path), length, self._fip(fi)), None
        return self._call("truncate", path, self._b(path), length), None

    # -- folders ---------------------------------------------------------------------------

    def readdir(self, path: str, *, plus: bool = False, offset: int = 0) -> tuple[int, list[DirEntry]]:
        """One READDIR (or READDIRPLUS with ``plus``, libfuse 3) from ``offset``, with a filler
        that accepts every entry, as libfuse's does while its buffer has room."""
        seen: list[DirEntry] = []

        def fill(buf: Any, name: bytes, st: Any, off: int, *flags: int) -> int:
            complete = bool(flags and flags[0] & FUSE_FILL_DIR_PLUS)
            mode = st.contents.st_mode if st else None
            size = st.contents.st_size if st and complete else None
            seen.append(DirEntry(name.decode("utf-8", "surrogateescape"), mode, size, complete))
            return 0

        filler = _FILLER_T(fill)
        fi = mfusepy.fuse_file_info()  # opendir is not implemented: libfuse passes fh 0
        if FUSE_MAJOR == 3:
            flags = FUSE_READDIR_PLUS if plus else 0
            rc = self._call("readdir", path, self._b(path), None, filler, offset, ctypes.pointer(fi), flags)
        else:
            rc = self._call("readdir", path, self._b(path), None, filler, offset, ctypes.pointer(fi))
        return rc, seen

    def mkdir(self, path: str, mode: int = 0o755) -> tuple[int, None]:
        return self._call("mkdir", path, self._b(path), mode), None

    def rmdir(self, path: str) -> tuple[int, None]:
        return self._call("rmdir", path, self._b(path)), None

    def rename(self, old: str, new: str, flags: int = 0) -> tuple[int, None]:
        if FUSE_MAJOR == 3:
            return self._call("rename", f"{old} -> {new}", self._b(old), self._b(new), flags), None
        if flags:
            raise ValueError("libfuse 2 has no rename flags")
        return self._call("rename", f"{old} -> {new}", self._b(old), self._b(new)), None

    def unlink(self, path: str) -> tuple[int, None]:
        return self._call("unlink", path, self._b(path)), None

    # -- files -----------------------------------------------------------------------------

    def create(self, path: str, mode: int = stat.S_IFREG | 0o644,
               flags: int = os.O_CREAT | os.O_EXCL | os.O_RDWR) -> tuple[int, mfusepy.fuse_file_info]:
        fi = mfusepy.fuse_file_info()
        fi.flags = flags
        return self._call("create", path, self._b(path), mode, ctypes.pointer(fi)), fi

    def open(self, path: str, flags: int = os.O_RDONLY) -> tuple[int, mfusepy.fuse_file_info]:
        fi = mfusepy.fuse_file_info()
        fi.flags = flags
        return self._call("open", path, self._b(path), ctypes.pointer(fi)), fi

    def read(self, path: str, fi: mfusepy.fuse_file_info, size: int, offset: int) -> tuple[int, bytes]:
        buf = (ctypes.c_byte * size)()
        rc = self._call("read", path, self._b(path), buf, size, offset, ctypes.pointer(fi))
        if rc > size:
            raise BoundaryBroken(f"read {path}: {rc} bytes for a {size}-byte request")
        return rc, bytes(buf)[: max(rc, 0)]

    def write(self, path: str, fi: mfusepy.fuse_file_info, data: bytes, offset: int) -> tuple[int, None]:
        buf = (ctypes.c_byte * len(data)).from_buffer_copy(data)
        rc = self._call("write", path, self._b(path), buf, len(data), offset, ctypes.pointer(fi))
        if rc > len(data):
            raise BoundaryBroken(f"write {path}: {rc} bytes written of {len(data)}")
        return rc, None

    def flush(self, path: str, fi: mfusepy.fuse_file_info) -> tuple[int, None]:
        return self._call("flush", path, self._b(path), ctypes.pointer(fi)), None

    def fsync(self, path: str, fi: mfusepy.fuse_file_info, datasync: int = 0) -> tuple[int, None]:
        return self._call("fsync", path, self._b(path), datasync, ctypes.pointer(fi)), None

    def release(self, path: str, fi: mfusepy.fuse_file_info) -> tuple[int, None]:
        return self._call("release", path, self._b(path), ctypes.pointer(fi)), None

    # -- extended attributes ---------------------------------------------------------------

    def _position(self, op: str, position: int) -> tuple[int, ...]:
        extra = len(_PROTOTYPES[op]._argtypes_) - (5 if op == "setxattr" else 4)
        return (position,) * extra  # macFUSE's prototypes carry a position argument

    def setxattr(self, path: str, name: str, value: bytes, options: int = 0,
                 position: int = 0) -> tuple[int, None]:
        buf = (ctypes.c_byte * len(value)).from_buffer_copy(value) if value else None
        return self._call("setxattr", f"{path} [{name}]", self._b(path), self._b(name), buf, len(value),
                          options, *self._position("setxattr", position)), None

    def getxattr(self, path: str, name: str, size: int = 0, position: int = 0) -> tuple[int, bytes | None]:
        """``size`` 0 is the size query (value NULL), as getxattr(2) callers first ask."""
        buf = (ctypes.c_byte * size)() if size else None
        rc = self._call("getxattr", f"{path} [{name}]", self._b(path), self._b(name), buf, size,
                        *self._position("getxattr", position))
        if buf is not None and rc > size:
            raise BoundaryBroken(f"getxattr {path} [{name}]: {rc} bytes into {size}")
        return rc, (bytes(buf)[:rc] if buf is not None and rc >= 0 else None)

    def listxattr(self, path: str, size: int = 0) -> tuple[int, list[str] | None]:
        buf = (ctypes.c_byte * size)() if size else None
        rc = self._call("listxattr", path, self._b(path), buf, size)
        if buf is not None and rc > size:
            raise BoundaryBroken(f"listxattr {path}: {rc} bytes into {size}")
        if buf is None or rc < 0:
            return rc, None
        return rc, [n.decode("utf-8", "surrogateescape") for n in bytes(buf)[:rc].split(b"\0") if n]

    def removexattr(self, path: str, name: str) -> tuple[int, None]:
        return self._call("removexattr", f"{path} [{name}]", self._b(path), self._b(name)), None

    # -- what callers of the system calls do with these ------------------------------------

    def read_xattr(self, path: str, name: str) -> tuple[int, bytes | None]:
        """getxattr(2) as applications use it: ask the size, then fetch."""
        rc, _ = self.getxattr(path, name)
        if rc <= 0:
            return rc, (b"" if rc == 0 else None)
        return self.getxattr(path, name, rc)

    def list_xattrs(self, path: str) -> tuple[int, list[str] | None]:
        rc, _ = self.listxattr(path)
        if rc <= 0:
            return rc, ([] if rc == 0 else None)
        return self.listxattr(path, rc)


class _AsProcess:
    def __init__(self, boundary: FuseBoundary, caller: Caller) -> None:
        self.boundary, self.caller, self.saved = boundary, caller, boundary.caller

    def __enter__(self) -> FuseBoundary:
        self.boundary.caller = self.caller
        return self.boundary

    def __exit__(self, *exc: object) -> None:
        self.boundary.caller = self.saved


# =============================================================================================
# Call sequences as data, and their replay


OK = 0  # in Step.ok: success (rc >= 0)


@dataclass(frozen=True)
class Data:
    """Bytes named in a step, resolved from the replay's ``files`` (e.g. the dragged file)."""

    key: str


@dataclass(frozen=True)
class Size:
    """The length of the bytes named ``key`` in the replay's ``files``."""

    key: str


@dataclass(frozen=True)
class Step:
    """One callback of a sequence. ``path`` is a template formatted with the replay's names
    (``"/{store}/{study}"``). ``ok`` lists the acceptable outcomes (``OK`` = success, an errno =
    that refusal) or names an entry of the replay's ``outcomes`` when it depends on the server.
    ``handle`` names the file handle an open/create makes, and the one read/write/flush/release/
    truncate/... use. ``why`` is the source of the step."""

    op: str
    path: str = ""
    args: tuple[Any, ...] = ()
    ok: tuple[int, ...] | str = (OK,)
    handle: str | None = None
    why: str = ""
    caller: Caller | None = None


# Macro steps the replay expands (what one system call of the application turns into):
WRITE_ALL = "write_all"      # args: (Data, chunk): write(2) of the whole file, in chunks
READ_TO_EOF = "read_to_eof"  # args: (chunk,): read(2) in chunks until it returns 0
READ_XATTR = "read_xattr"    # args: (name,): getxattr(2) = size query, then fetch
LIST_XATTRS = "list_xattrs"  # listxattr(2) = size query, then fetch


@dataclass
class ReplayResult:
    results: list[tuple[Step, int, Any]] = field(default_factory=list)
    read: dict[str, bytes] = field(default_factory=dict)  # handle -> bytes read to EOF

    def of(self, op: str, path_suffix: str = "") -> list[tuple[Step, int, Any]]:
        return [r for r in self.results if r[0].op == op and r[0].path.endswith(path_suffix)]


def _format(value: Any, names: Mapping[str, str]) -> Any:
    return value.format(**names) if isinstance(value, str) else value


def _allowed(step: Step, outcomes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    if isinstance(step.ok, str):
        return outcomes[step.ok]
    return step.ok


def _accepts(rc: int, allowed: Iterable[int]) -> bool:
    return any((a == OK and rc >= 0) or (a != OK and rc == -a) for a in allowed)


def _describe(allowed: Iterable[int]) -> str:
    return " or ".join("success" if a == OK else errno.errorcode.get(a, str(a)) for a in allowed)


def replay(boundary: FuseBoundary, steps: Sequence[Step], names: Mapping[str, str], *,
           files: Mapping[str, bytes] | None = None,
           outcomes: Mapping[str, tuple[int, ...]] | None = None) -> ReplayResult:
    """Run ``steps``; fail at the first step whose outcome is not an acceptable one, with the
    trace of callbacks so far."""
    files = files or {}
    outcomes = outcomes or {}
    handles: dict[str, mfusepy.fuse_file_info] = {}
    result = ReplayResult()
    for step in steps:
        path = _format(step.path, names)
        args = tuple(files[a.key] if isinstance(a, Data) else len(files[a.key]) if isinstance(a, Size)
                     else _format(a, names) for a in step.args)
        start = len(boundary.trace)
        if step.caller is not None:
            with boundary.as_process(step.caller):
                rc, value = _run_step(boundary, step, path, args, handles, result)
        else:
            rc, value = _run_step(boundary, step, path, args, handles, result)
        allowed = _allowed(step, outcomes)
        if not _accepts(rc, allowed):
            trace = "\n  ".join(str(c) for c in boundary.trace[max(0, start - 12):])
            raise AssertionError(
                f"step {step.op} {path}: expected {_describe(allowed)}, libfuse got "
                f"{'success' if rc >= 0 else errno.errorcode.get(-rc, rc)} ({step.why})\n  {trace}")
        result.results.append((step, rc, value))
    return result


def _run_step(boundary: FuseBoundary, step: Step, path: str, args: tuple[Any, ...],
              handles: dict[str, mfusepy.fuse_file_info], result: ReplayResult) -> tuple[int, Any]:
    op = step.op
    fi = handles.get(step.handle) if step.handle else None
    if op in ("open", "create"):
        rc, fi_new = getattr(boundary, op)(path, *args)
        if rc >= 0 and step.handle:
            handles[step.handle] = fi_new
        return rc, fi_new
    if op in ("read", "write", "flush", "fsync", "release"):
        if fi is None:
            raise AssertionError(f"step {op} {path}: no open handle {step.handle!r}")
        rc, value = getattr(boundary, op)(path, fi, *args)
        if op == "release":
            handles.pop(step.handle or "", None)
        return rc, value
    if op == WRITE_ALL:
        data, chunk = args
        assert fi is not None, f"write_all {path}: no open handle {step.handle!r}"
        for offset in range(0, len(data), chunk):
            rc, _ = boundary.write(path, fi, data[offset:offset + chunk], offset)
            if rc != len(data[offset:offset + chunk]):
                return (rc if rc < 0 else -errno.EIO), None  # a short write is an error to write(2)
        return len(data), None
    if op == READ_TO_EOF:
        (chunk,) = args
        assert fi is not None, f"read_to_eof {path}: no open handle {step.handle!r}"
        parts, offset = [], 0
        while True:
            rc, data = boundary.read(path, fi, chunk, offset)
            if rc < 0:
                return rc, None
            if rc == 0:
                break
            parts.append(data)
            offset += rc
        result.read[step.handle or path] = b"".join(parts)
        return offset, result.read[step.handle or path]
    if op == READ_XATTR:
        return boundary.read_xattr(path, *args)
    if op == LIST_XATTRS:
        return boundary.list_xattrs(path)
    if op in ("getattr", "truncate", "chmod", "chown", "utimens"):
        return getattr(boundary, op)(path, *args, **({"fi": fi} if fi is not None else {}))
    method: Callable[..., tuple[int, Any]] = getattr(boundary, op)
    return method(path, *args)
