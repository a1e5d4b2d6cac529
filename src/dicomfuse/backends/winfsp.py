"""Windows adapter through winfspy (WinFsp): translation only.

Import this module on Windows only (or in tests with the stand-in binding, tests/fakes/winfspy):
it imports winfspy, which loads WinFsp's DLL. The pure Windows knowledge (errno → NTSTATUS, mount
points, volume parameters, FileInfo) is in :mod:`dicomfuse.backends.windows`.

Each callback of winfspy 0.8.4's ``BaseFileSystemOperations`` turns into core ``Vfs`` calls, and
``translate`` is the one place where errors become ``NTStatusError``. Method names, signatures
and return shapes follow winfspy 0.8.4's operations.py (e.g. ``get_security_by_name`` returns
``(attributes, descriptor handle, descriptor size)``; ``read_directory`` returns info dicts with
``file_name``; ``create``/``open`` return the file context winfspy hands back to every later call).

File contexts and the core's handles. WinFsp makes one file context per open (volume parameter
``um_file_context_is_user_context2``). A core handle is opened when data is first needed, not at
open, so the many opens Explorer makes to read attributes, check access or delete never download
an instance. Two exceptions: a create opens one at once (the core's upload spool), and an open
with read access of a file whose size is not known yet opens one at once, because the core
learns the size then and WinFsp's cache never reads past the size ``open`` reported.

Where uploads happen, and what Windows programs see when one fails:

- ``flush`` (FlushFileBuffers) uploads a written file and can fail: the program gets the NTSTATUS
  of the core's errno (an invalid DICOM file: STATUS_INVALID_PARAMETER, "The parameter is
  incorrect"; a server or network failure: STATUS_UNEXPECTED_IO_ERROR, "An unexpected network
  error occurred").
- Otherwise the upload happens in ``cleanup``, i.e. when the program closes its handle
  (CloseHandle): synchronously, after the FSD has written the Windows cache to us
  (``flush_and_purge_on_cleanup``), so a copy finishes when the server has the file. But Cleanup
  cannot fail: "There is no way to report failure of this operation. This is a Windows
  limitation." (winfsp.h, Cleanup; the IRP_MJ_CLEANUP status is ignored, winfsp issue #365), and
  no documented flush comes from Explorer's copy engine (winfsp issue #254: its copy dialog ends
  without waiting for a file system's flush). So when Explorer copies a file in and the server
  refuses it, Explorer reports success; the refusal is in the ERROR log with the folder where the
  bytes are kept (``dicomfuse status`` lists them), and the file is not in its folder when
  Explorer reads the folder again (F5; the FSD's cached information lasts one second).
- Deletes are the same: Windows deletes in Cleanup after ``can_delete`` said yes, so
  ``can_delete`` refuses what it can foresee (a missing file, a folder that is not empty), and a
  delete the server refuses later is logged at WARNING; the file shows again on refresh.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from winfspy import (
    CREATE_FILE_CREATE_OPTIONS,
    BaseFileContext,
    BaseFileSystemOperations,
    FileSystem,
    NTStatusError,
)
from winfspy.plumbing.security_descriptor import SecurityDescriptor

from dicomfuse.backends import windows
from dicomfuse.core.errors import FsError, for_operation
from dicomfuse.core.vfs import Vfs

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Everyone gets full access: what may be done where is the core's to decide (winfspy memfs.py's
# descriptor: owner and group Builtin Administrators; SYSTEM, Administrators and Everyone: all).
SDDL = "O:BAG:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;WD)"
DIRECTORY_FILE = int(CREATE_FILE_CREATE_OPTIONS.FILE_DIRECTORY_FILE)


def _status(name: str) -> NTStatusError:
    return NTStatusError(windows.NTSTATUS[name])


def _refusal(op: str, exc: OSError, context: str = windows.PLAIN) -> NTStatusError:
    """The NTStatusError for a core error, logged like fuse.py's translate: an FsError at its own
    level, another OSError at DEBUG, an errno missing from the table at WARNING."""
    name = windows.ntstatus_name(exc.errno, context)
    if name is None:
        log.warning("%s: no NTSTATUS for errno %s (%s); answering %s", op, exc.errno, exc.strerror,
                    windows.FALLBACK)
        name = windows.FALLBACK
    elif isinstance(exc, FsError):
        log.log(exc.level, "%s", for_operation(op, exc.strerror or ""))
    else:
        log.debug("%s: %s", op, exc)
    return _status(name)


def translate(func: F) -> F:
    """FsError or OSError → NTStatusError through ``windows``' table; anything else →
    STATUS_UNEXPECTED_IO_ERROR with one logged traceback (the dispatcher never sees a crash)."""

    @functools.wraps(func)
    def wrapper(self: WinFspOperations, *args: Any) -> Any:
        try:
            return func(self, *args)
        except NTStatusError:
            raise
        except OSError as exc:
            raise _refusal(func.__name__, exc) from None
        except Exception:
            log.exception("Unexpected error in %s; answering %s", func.__name__, windows.FALLBACK)
            raise _status(windows.FALLBACK) from None

    return wrapper  # type: ignore[return-value]


@dataclass(eq=False)
class OpenFile(BaseFileContext):
    """winfspy's file context: one per open. ``fh`` is the core's handle once data is needed."""

    path: str  # the core's path ("/store/study/series/x.dcm"); follows renames
    is_dir: bool
    access: int  # the access WinFsp granted
    fh: int | None = None
    writable: bool = False  # fh was opened for writing
    listing: list[dict[str, Any]] | None = None  # read_directory's snapshot, for marker paging
    lock: threading.Lock = field(default_factory=threading.Lock)  # protects fh, writable, listing


class WinFspOperations(BaseFileSystemOperations):
    """winfspy callbacks for a :class:`Vfs`."""

    def __init__(self, vfs: Vfs, label: str) -> None:
        super().__init__()
        self.vfs = vfs
        self.label = label  # a new label given in Explorer is kept for the mount's life only
        self.security = SecurityDescriptor.from_string(SDDL)
        self.initialized = False

    # -- volume ----------------------------------------------------------------------------

    @translate
    def get_volume_info(self) -> dict[str, Any]:
        st = self.vfs.statfs()
        return {"total_size": st["f_blocks"] * st["f_frsize"], "free_size": st["f_bavail"] * st["f_frsize"],
                "volume_label": self.label}

    @translate
    def set_volume_label(self, volume_label: str) -> None:
        self.label = windows.volume_label(volume_label)
        log.info("Volume label set to %r on this computer only, until unmount", self.label)

    # -- names, security -------------------------------------------------------------------

    @translate
    def get_security_by_name(self, file_name: str) -> tuple[int, Any, int]:
        path = windows.vfs_path(file_name)
        attr = self._lookup(path)
        return windows.file_info(attr, _name(path))["file_attributes"], self.security.handle, self.security.size

    @translate
    def get_security(self, file_context: OpenFile) -> SecurityDescriptor:
        return self.security  # a (handle, size) tuple, as ll_get_security unpacks it

    @translate
    def set_security(self, file_context: OpenFile, security_information: int, modification_descriptor: Any) -> None:
        self.vfs.setattr_noop(file_context.path)  # accepted, no effect (like chmod)

    # -- create, open, close ---------------------------------------------------------------

    @translate
    def create(self, file_name: str, create_options: int, granted_access: int, file_attributes: int,
               security_descriptor: Any, allocation_size: int) -> OpenFile:
        path = windows.vfs_path(file_name)
        try:
            if create_options & DIRECTORY_FILE:
                self.vfs.mkdir(path)
                return OpenFile(path, True, granted_access)
            if self._exists(path):  # WinFsp calls Create only for a name it must make (FILE_CREATE…)
                raise FsError(errno.EEXIST, f"create: {path} exists")
            result = self.vfs.create(path)
        except FsError as exc:
            raise _refusal("create", exc, windows.IN_FOLDER) from None
        return OpenFile(path, False, granted_access, fh=result.fh, writable=True)

    @translate
    def open(self, file_name: str, create_options: int, granted_access: int) -> OpenFile:
        path = windows.vfs_path(file_name)
        attr = self._lookup(path)
        context = OpenFile(path, attr.is_dir, granted_access)
        if not attr.is_dir and not attr.size_known and windows.reads_data(granted_access):
            self._handle(context, write=False)  # the core learns the size: FileInfo must carry it
        return context

    @translate
    def overwrite(self, file_context: OpenFile, file_attributes: int, replace_file_attributes: bool,
                  allocation_size: int) -> None:
        """Open with FILE_OVERWRITE(_IF)/FILE_SUPERSEDE of an existing file: truncate it through
        the core, as an open with O_TRUNC (the new bytes replace the instance at upload)."""
        self._handle(file_context, write=True, truncate=True)

    @translate
    def cleanup(self, file_context: OpenFile, file_name: str | None, flags: int) -> None:
        """The program closed its handle. Delete if asked (WinFsp deletes here, after
        ``can_delete``); else upload what was written. Nothing raised here reaches the program."""
        if flags & windows.CLEANUP_DELETE:
            self._delete(file_context)
            return
        with file_context.lock:
            fh = file_context.fh if file_context.writable else None
        if fh is not None:
            self.vfs.flush(fh)  # the upload; a failure is logged (translate, and the core's ERROR)

    @translate
    def close(self, file_context: OpenFile) -> None:
        with file_context.lock:
            fh, file_context.fh = file_context.fh, None
            file_context.listing = None
        if fh is not None:
            self.vfs.release(fh)

    # -- data ------------------------------------------------------------------------------

    @translate
    def read(self, file_context: OpenFile, offset: int, length: int) -> bytes:
        fh = self._handle(file_context, write=False)
        data = self.vfs.read(fh, length, offset)
        if not data and length:
            raise _status("STATUS_END_OF_FILE")  # as winfspy's memfs: a read at or past the end
        return data

    @translate
    def write(self, file_context: OpenFile, buffer: Any, offset: int, write_to_end_of_file: bool,
              constrained_io: bool) -> int:
        """``write_to_end_of_file``: append (offset is -1). ``constrained_io``: the cache
        manager's paging write, which must not extend the file (winfsp.h, Write)."""
        fh = self._handle(file_context, write=True)
        data = bytes(buffer)
        if write_to_end_of_file or constrained_io:
            size = self.vfs.getattr(file_context.path, fh).size
            if write_to_end_of_file:
                offset = size
            if constrained_io:
                if offset >= size:
                    return 0
                data = data[: size - offset]
        return self.vfs.write(fh, data, offset)

    @translate
    def flush(self, file_context: OpenFile | None) -> None:
        """FlushFileBuffers: upload a written file now (a refusal reaches the program) and, in
        write-back mode, have what is queued on disk, as fsync does. A flush of the whole volume
        comes with no file context: the queued uploads go to disk."""
        if file_context is None:
            self.vfs.sync()
            return
        with file_context.lock:
            fh = file_context.fh
        if fh is not None:
            self.vfs.fsync(fh)
        else:
            self.vfs.sync()

    @translate
    def set_file_size(self, file_context: OpenFile, new_size: int, set_allocation_size: bool) -> None:
        """The end of file through the core's truncate (only allowed on a file being written or
        as part of an overwrite: elsewhere the core's errno). An allocation size only matters when
        it cuts the file (winfsp.h, SetFileSize rules)."""
        if set_allocation_size:
            if new_size >= self._attr(file_context).size:
                return
        fh = file_context.fh
        if windows.writes_data(file_context.access) or fh is not None:
            fh = self._handle(file_context, write=True, truncate=new_size == 0)
        self.vfs.truncate(file_context.path, new_size, fh)

    # -- attributes --------------------------------------------------------------------------

    @translate
    def get_file_info(self, file_context: OpenFile) -> dict[str, Any]:
        return windows.file_info(self._attr(file_context), _name(file_context.path))

    @translate
    def set_basic_info(self, file_context: OpenFile, file_attributes: int, creation_time: int,
                       last_access_time: int, last_write_time: int, change_time: int,
                       file_info: Any) -> dict[str, Any]:
        """Attributes: accepted, no effect. The last-write time (0: unchanged) is what the file
        shows from now on while mounted, so copies that keep times keep them here too."""
        changed = 0 < last_write_time < 1 << 63  # 0: unchanged (and -1: "stop updating it")
        self.vfs.set_times(file_context.path, windows.seconds(last_write_time) if changed else None)
        return windows.file_info(self._attr(file_context), _name(file_context.path))

    # -- folders, delete, rename -------------------------------------------------------------

    @translate
    def read_directory(self, file_context: OpenFile, marker: str | None) -> list[dict[str, Any]]:
        """Entries after ``marker`` (None: from the start). The listing is read from the core at
        the start of a scan and kept on the context, so the FSD's follow-up calls (one per
        buffer it fills, each with the last name it got as marker) page through one consistent
        snapshot. "." and ".." come first in folders other than the root."""
        with file_context.lock:
            listing = file_context.listing
        if marker is None or listing is None:
            listing = self._listing(file_context)
            with file_context.lock:
                file_context.listing = listing
        if marker is None:
            return listing
        dots = 2 if file_context.path != "/" else 0
        if dots and marker in (".", ".."):
            return listing[1:] if marker == "." else listing[2:]
        names = [entry["file_name"] for entry in listing[dots:]]
        return listing[dots + bisect.bisect_right(names, marker):]

    @translate
    def get_dir_info_by_name(self, file_context: OpenFile, file_name: str) -> dict[str, Any]:
        """One name in a folder (FindFirstFile without wildcards: Explorer's desktop.ini probes)."""
        attr = self.vfs.getattr(windows.vfs_path(file_context.path + "/" + file_name))
        return {"file_name": file_name, **windows.file_info(attr, file_name)}

    @translate
    def can_delete(self, file_context: OpenFile, file_name: str) -> None:
        """What the core can foresee before Cleanup deletes (WinFsp's Cleanup cannot fail): the
        name exists, deletion is enabled at that level, a folder is empty."""
        self.vfs.check_delete(file_context.path)

    @translate
    def rename(self, file_context: OpenFile, file_name: str, new_file_name: str, replace_if_exists: bool) -> None:
        old, new = windows.vfs_path(file_name), windows.vfs_path(new_file_name)
        try:
            self.vfs.rename(old, new, replace=replace_if_exists)
        except FsError as exc:
            raise _refusal("rename", exc, windows.NAMING if file_context.is_dir else windows.PLAIN) from None
        with file_context.lock:
            file_context.path = new
            file_context.listing = None

    # -- helpers -----------------------------------------------------------------------------

    def _lookup(self, path: str) -> Any:
        """getattr; a missing name is STATUS_OBJECT_NAME_NOT_FOUND, or _PATH_NOT_FOUND when the
        folder it would be in is missing (what Windows programs expect; WinFsp's OpenIf and
        OverwriteIf create the file only after NAME_NOT_FOUND). The folder check hits the core's
        caches: the lookup that failed just resolved it."""
        try:
            return self.vfs.getattr(path)
        except FsError as exc:
            if exc.errno != errno.ENOENT or windows.parent_path(path) == "/":
                raise
            log.log(exc.level, "lookup: %s", exc.strerror)
        try:
            folder = self.vfs.getattr(windows.parent_path(path)).is_dir
        except FsError as exc:
            folder = exc.errno not in (errno.ENOENT, errno.ENOTDIR)
        raise _status("STATUS_OBJECT_NAME_NOT_FOUND" if folder else "STATUS_OBJECT_PATH_NOT_FOUND")

    def _exists(self, path: str) -> bool:
        try:
            self.vfs.getattr(path)
            return True
        except FsError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise

    def _attr(self, context: OpenFile) -> Any:
        with context.lock:
            fh = context.fh
        return self.vfs.getattr(context.path, fh)

    def _handle(self, context: OpenFile, *, write: bool, truncate: bool = False) -> int:
        """The core handle of ``context``, opened on first need: for reading, or for writing
        (an existing instance is then copied in first, unless ``truncate``). A read handle is
        swapped for a write handle when writing starts."""
        with context.lock:
            if context.fh is not None and (context.writable or not write):
                if truncate:
                    self.vfs.truncate(context.path, 0, context.fh)
                return context.fh
            old, context.fh = context.fh, None
            if old is not None:
                self.vfs.release(old)
            flags = (os.O_RDWR | (os.O_TRUNC if truncate else 0)) if write else os.O_RDONLY
            context.fh = self.vfs.open(context.path, flags).fh
            context.writable = write
            return context.fh

    def _delete(self, context: OpenFile) -> None:
        with context.lock:
            fh, context.fh = context.fh, None
            writable, context.writable = context.writable, False
        if fh is not None:
            try:
                if writable:  # deleted while being written (a copy cancelled in Explorer): not uploaded
                    self.vfs.discard(fh)
                else:
                    self.vfs.release(fh)
            except FsError as exc:
                log.debug("release before delete of %s: %s", context.path, exc.strerror)
        try:
            if context.is_dir:
                self.vfs.rmdir(context.path)
            else:
                self.vfs.unlink(context.path)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                log.debug("delete %s: already gone", context.path)
                return
            log.warning("Delete of %s failed after Windows took it as done (%s); it shows again on refresh",
                        context.path, exc.strerror)

    def _listing(self, context: OpenFile) -> list[dict[str, Any]]:
        entries = [{"file_name": name, **windows.file_info(attr, name)}
                   for name, attr in self.vfs.readdir(context.path)]
        if context.path == "/":
            return entries
        here = windows.file_info(self.vfs.getattr(context.path))
        return [{"file_name": ".", **here}, {"file_name": "..", **here}, *entries]


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Mounting

_stat = os.stat  # the mount point probe; tests replace it (nothing is mounted under the stand-in)


def _start(fs: Any, thread_count: int) -> None:
    """winfspy 0.8.4's ``FileSystem.start()`` with the dispatcher's thread count: 0.8.4 starts it
    with 0, WinFsp's default (one thread per processor), and every operation that waits for the
    server (an open that downloads, a cleanup that uploads) holds one; the original tool ran 16.
    Same steps as 0.8.4 (file_system.py: set the mount point, start the dispatcher, stat the
    mount point until WinFsp answers); any other version gets its own ``start()``."""
    import winfspy
    from winfspy import plumbing

    if winfspy.__version__ != "0.8.4" or not hasattr(fs, "_file_system_ptr"):
        log.info("winfspy %s: the dispatcher uses WinFsp's default thread count", winfspy.__version__)
        fs.start()
        return
    if fs.started:
        raise winfspy.FileSystemAlreadyStarted()
    fs.started = True
    result = plumbing.lib.FspFileSystemSetMountPoint(fs._file_system_ptr[0], fs.mountpoint)
    if not plumbing.nt_success(result):
        raise winfspy.WinFSPyError(f"Cannot mount file system: {plumbing.cook_ntstatus(result).name}")
    result = plumbing.lib.FspFileSystemStartDispatcher(fs._file_system_ptr[0], thread_count)
    if not plumbing.nt_success(result):
        raise winfspy.WinFSPyError(f"Cannot start file system dispatcher: {plumbing.cook_ntstatus(result).name}")
    for _ in range(10):  # since WinFsp 1.12 the volume may answer a moment after the dispatcher starts
        try:
            _stat(fs.mountpoint)
            return
        except OSError as exc:
            if exc.errno == errno.EINVAL and getattr(exc, "winerror", None) in (995, 1005):
                time.sleep(0.01)
                continue
            raise


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Ctrl+C (SIGINT), SIGTERM and Ctrl+Break (SIGBREAK, Windows) set ``stop``; returns the
    function that puts the previous handlers back. Outside the main thread: nothing installed."""
    previous: dict[int, Any] = {}
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
        except ValueError:  # not the main thread
            break

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def run(vfs: Vfs, mountpoint: str, options: dict[str, str | bool],
        on_stop: Callable[[], None] | None = None) -> None:
    """Mount and serve until Ctrl+C, Ctrl+Break or SIGTERM, then unmount and return (its own
    signal handlers stay until then; ``on_stop`` is accepted for the FUSE adapter's signature,
    and the caller's shutdown takes over the signals after this returns).
    ``mountpoint`` is what :func:`windows.check_mount_point` returned (an existing empty folder
    is removed for the mount's life and created again after). Raises RuntimeError if the mount
    never came up."""
    try:
        settings = windows.mount_settings(options)
        label = windows.volume_label(settings.label or getattr(vfs.dataset, "name", None))
        params = {**windows.volume_params(label, drive=windows.is_drive(mountpoint)), **settings.params}
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None
    operations = WinFspOperations(vfs, label)
    stop = threading.Event()
    restore_signals = _stop_on_signals(stop)
    fs = None
    refolder = False
    try:
        try:
            refolder = windows.free_mount_folder(mountpoint)
            fs = FileSystem(mountpoint, operations, debug=settings.debug, **params)
            vfs.start()
            _start(fs, settings.thread_count)
        except Exception as exc:
            raise RuntimeError(f"WinFsp could not mount {mountpoint}: {exc}") from exc
        operations.initialized = True
        log.info("Mounted at %s (volume %r, %d threads)", mountpoint, label, settings.thread_count)
        while not stop.wait(0.2):
            pass
        log.info("Unmounting %s", mountpoint)
    finally:
        if fs is not None and fs.started:
            fs.stop()
        restore_signals()
        if refolder:
            windows.restore_mount_folder(mountpoint)
