"""What Windows Explorer asks of a WinFsp file system, as data, and the driver that replays it
against the WinFsp adapter (``dicomfuse.backends.winfsp``) with only the native binding replaced.

Each sequence is a tuple of :class:`Call`: the callbacks of winfspy's BaseFileSystemOperations in
the order WinFsp delivers them, with the NTSTATUS the caller must see. A few steps stand for what
WinFsp's kernel driver (FSD) and user-mode DLL make of one Windows call, and are expanded by
:class:`Replay` the way WinFsp does it:

- ``CreateFile`` (NtCreateFile): WinFsp's DLL checks access with GetSecurityByName, then calls
  Open, Create or Open+Overwrite by disposition (dll/fsop.c, FspFileSystemOpCreate_*: FILE_OPEN_IF
  and FILE_OVERWRITE_IF create only when the open failed with STATUS_OBJECT_NAME_NOT_FOUND;
  FILE_OVERWRITE(_IF) and FILE_SUPERSEDE call Overwrite after Open, ReplaceFileAttributes being
  TRUE for FILE_SUPERSEDE only). A new entry's folder is checked first (its GetSecurityByName).
- ``QueryDirectory``: FindFirstFile/FindNextFile. The FSD calls ReadDirectory with no marker,
  then again with the last name it got each time winfspy filled the buffer
  (FspFileSystemAddDirInfo returned FALSE), until the end-of-directory entry fits.
- ``FindFile``: FindFirstFile of one name without wildcards, which WinFsp sends as
  GetDirInfoByName when ``pass_query_directory_file_name`` is set (Explorer's desktop.ini probes).
- ``ReadFile``/``WriteFile``: the whole file in chunks, through the Windows cache: reads never go
  past the size the last FileInfo gave; after the end of file was set first (CopyFile sets it to
  the source's size before writing: winfsp issue #95, "Open -> SetFileSize -> Write -> Cleanup"),
  the cache manager's writes come as ConstrainedIo (winfsp.h, Write).
- winfspy's ``ll_*`` wrappers (operations.py) are played too: NTStatusError → its value; any
  other exception → STATUS_UNEXPECTED_IO_ERROR; after create, open, overwrite, write, flush and
  set_file_size the FileInfo comes from get_file_info.

Cleanup and Close (winfsp.h): Cleanup follows the program's CloseHandle, with FspCleanupDelete
when the file was marked for deletion (after CanDelete said yes: DeleteFile/RemoveDirectory set the
disposition; "Deletion should happen during Cleanup with the FspCleanupDelete flag set");
Cleanup cannot report failure ("a Windows limitation"); Close comes when the system drops its
last reference. With ``post_cleanup_when_modified_only`` the FSD skips Cleanup for files only read:
the replays send it anyway (flags 0) where a volume without that flag would get it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dicomfuse.backends import windows

log = logging.getLogger(__name__)

# NtCreateFile dispositions (wdm.h).
FILE_SUPERSEDE, FILE_OPEN, FILE_CREATE, FILE_OPEN_IF, FILE_OVERWRITE, FILE_OVERWRITE_IF = range(6)

# CreateOptions (wdm.h; winfspy's CREATE_FILE_CREATE_OPTIONS has the same values).
DIRECTORY = 0x1
SEQUENTIAL = 0x4
SYNC_IO = 0x20
NON_DIRECTORY = 0x40
BACKUP_INTENT = 0x4000
FILE_OPTIONS = NON_DIRECTORY | SYNC_IO
COPY_OPTIONS = NON_DIRECTORY | SEQUENTIAL | SYNC_IO
FOLDER_OPTIONS = DIRECTORY | SYNC_IO

# Access masks (winnt.h).
LIST = 0x0001 | windows.SYNCHRONIZE | windows.FILE_READ_ATTRIBUTES  # FILE_LIST_DIRECTORY
ATTRIBUTES = windows.FILE_READ_ATTRIBUTES | windows.SYNCHRONIZE
READ = windows.FILE_GENERIC_READ
WRITE = windows.FILE_GENERIC_WRITE | windows.DELETE | windows.FILE_READ_ATTRIBUTES
REMOVE = windows.DELETE | windows.FILE_READ_ATTRIBUTES | windows.SYNCHRONIZE
MOVE = windows.DELETE | windows.SYNCHRONIZE

CHUNK = 64 * 1024  # the reads and writes of a copy
SMALL_BUFFER = 1024  # a QueryDirectory buffer that holds a few names, so listings page
MODIFIED = windows.CLEANUP_SET_ARCHIVE_BIT | windows.CLEANUP_SET_LAST_WRITE_TIME | windows.CLEANUP_SET_CHANGE_TIME
OK = "STATUS_SUCCESS"
NOT_FOUND = "STATUS_OBJECT_NAME_NOT_FOUND"
DENIED = "STATUS_ACCESS_DENIED"

# Names Explorer and the shell look for in every drive or folder they show. desktop.ini (folder
# customisation), autorun.inf (drives), Thumbs.db (thumbnail cache), folder.jpg/.gif and
# AlbumArt* (folder pictures, music folders), and what Windows keeps at a volume's root.
PROBES_EVERYWHERE = ("desktop.ini", "Thumbs.db", "folder.jpg", "folder.gif", "AlbumArtSmall.jpg",
                     "AlbumArt_{{00000000-0000-0000-0000-000000000000}}_Large.jpg")  # a template: braces doubled
PROBES_AT_ROOT = ("autorun.inf", "$RECYCLE.BIN", "System Volume Information", *PROBES_EVERYWHERE)


@dataclass(frozen=True)
class Call:
    """One step. ``path`` and string ``args`` are templates over the scenario's names
    (``{store}``, ``{study}``, ``{series}``, ``{sop}``, ``{name}``, ``{new}``…); ``handle`` names
    the file context the step uses, or, for ``CreateFile``, the one it makes."""

    op: str
    path: str = ""
    handle: str = ""
    args: tuple[Any, ...] = ()
    expect: str = OK


def create_file(path: str, handle: str, disposition: int, options: int, access: int, expect: str = OK) -> Call:
    return Call("CreateFile", path, handle, (disposition, options, access), expect)


def open_folder(path: str, handle: str) -> tuple[Call, ...]:
    """Explorer showing a folder: open it, its information, its listing, the probes."""
    probes = PROBES_AT_ROOT if path == "\\" else PROBES_EVERYWHERE
    return (
        create_file(path, handle, FILE_OPEN, FOLDER_OPTIONS, LIST),
        Call("get_file_info", handle=handle),
        Call("get_security", handle=handle),
        Call("QueryDirectory", handle=handle, args=(SMALL_BUFFER,)),
        *(Call("FindFile", handle=handle, args=(probe,), expect=NOT_FOUND) for probe in probes),
    )


# -- browse: the drive, then a store, a study and a series folder, then one file's details -----

BROWSE: tuple[Call, ...] = (
    Call("get_volume_info"),  # GetVolumeInformation, GetDiskFreeSpaceEx
    create_file("\\autorun.inf", "x", FILE_OPEN, FILE_OPTIONS, READ, NOT_FOUND),  # before showing a drive
    *open_folder("\\", "root"),
    *open_folder("\\{store}", "store"),
    *open_folder("\\{store}\\{study}", "study"),
    *open_folder("\\{store}\\{study}\\{series}", "series"),
    create_file("\\{store}\\{study}\\{series}\\desktop.ini", "x", FILE_OPEN, FILE_OPTIONS, READ, NOT_FOUND),
    # The details of one file (size, dates): an open for attributes only, which must not download.
    create_file("\\{store}\\{study}\\{series}\\{sop}.dcm", "details", FILE_OPEN, FILE_OPTIONS, ATTRIBUTES),
    Call("get_file_info", handle="details"),
    Call("close", handle="details"),
    Call("close", handle="series"),
    Call("close", handle="study"),
    Call("close", handle="store"),
    Call("close", handle="root"),
)

# -- copy out: drag an instance from the mount to the desktop (CopyFile2's source side) ---------

COPY_OUT: tuple[Call, ...] = (
    create_file("\\{store}\\{study}\\{series}\\{sop}.dcm", "src", FILE_OPEN, COPY_OPTIONS, READ),
    Call("get_file_info", handle="src"),
    Call("ReadFile", handle="src", args=(CHUNK,)),
    Call("cleanup", handle="src", args=(0,)),
    Call("close", handle="src"),
)


def copy_in(dest: str, source: str, *, disposition: int = FILE_CREATE, preset_size: bool = True,
            flush: bool = False, flush_expect: str = OK) -> tuple[Call, ...]:
    """CopyFile2's destination side: Explorer checked the name is free, creates the file, sets
    its size, writes it, gives it the source's times, closes it."""
    steps: list[Call] = [
        create_file(dest, "probe", FILE_OPEN, FILE_OPTIONS, ATTRIBUTES, NOT_FOUND),
        create_file(dest, "dst", disposition, COPY_OPTIONS, WRITE),
    ]
    if preset_size:
        steps += [Call("set_file_size", handle="dst", args=("allocation", source)),
                  Call("set_file_size", handle="dst", args=("size", source))]
    steps += [Call("WriteFile", handle="dst", args=(CHUNK, source)),
              Call("set_basic_info", handle="dst"),
              Call("get_file_info", handle="dst")]
    if flush:
        steps.append(Call("flush", handle="dst", expect=flush_expect))
    steps += [Call("cleanup", handle="dst", args=(MODIFIED,)), Call("close", handle="dst")]
    return tuple(steps)


# -- drag in: into a store folder (Explorer keeps the file's own name) and into a series folder --

DRAG_INTO_STORE = copy_in("\\{store}\\{name}", "{name}", flush=True)
DRAG_INTO_SERIES = copy_in("\\{store}\\{study}\\{series}\\{sop}.dcm", "{sop}", disposition=FILE_OVERWRITE_IF,
                           preset_size=False)

DRAG_INTO_ROOT: tuple[Call, ...] = (  # files belong in stores: the dataset level takes folders only
    create_file("\\{name}", "probe", FILE_OPEN, FILE_OPTIONS, ATTRIBUTES, NOT_FOUND),
    create_file("\\{name}", "dst", FILE_CREATE, COPY_OPTIONS, WRITE, DENIED),
)

# -- overwrite: "Replace the file in the destination" (CREATE_ALWAYS on an existing instance) ---

OVERWRITE: tuple[Call, ...] = (
    create_file("\\{store}\\{study}\\{series}\\{sop}.dcm", "dst", FILE_OVERWRITE_IF, COPY_OPTIONS, WRITE),
    Call("set_file_size", handle="dst", args=("size", "{sop}")),
    Call("WriteFile", handle="dst", args=(CHUNK, "{sop}")),
    Call("set_basic_info", handle="dst"),
    Call("cleanup", handle="dst", args=(MODIFIED,)),
    Call("close", handle="dst"),
)

# -- upload refused: a file that is not DICOM ---------------------------------------------------

REFUSED_WITH_FLUSH = copy_in("\\{store}\\{name}", "{name}", flush=True, flush_expect="STATUS_INVALID_PARAMETER")
REFUSED_AT_CLOSE = copy_in("\\{store}\\{name}", "{name}")  # what Explorer sees: every step succeeds

# -- delete: to the Recycle Bin first (refused on this volume), then for good --------------------

DELETE: tuple[Call, ...] = (
    create_file("\\$RECYCLE.BIN", "bin", FILE_OPEN, FOLDER_OPTIONS, LIST, NOT_FOUND),
    create_file("\\$RECYCLE.BIN", "bin", FILE_CREATE, FOLDER_OPTIONS, LIST, DENIED),
    create_file("\\{store}\\{study}\\{series}\\{sop}.dcm", "victim", FILE_OPEN, FILE_OPTIONS, REMOVE),
    Call("can_delete", handle="victim"),
    Call("cleanup", handle="victim", args=(windows.CLEANUP_DELETE,)),
    Call("close", handle="victim"),
    create_file("\\{store}\\{study}\\{series}", "series", FILE_OPEN, FOLDER_OPTIONS, LIST),
    Call("QueryDirectory", handle="series", args=(SMALL_BUFFER,)),
    Call("close", handle="series"),
)

# A copy cancelled half-way: Explorer deletes the partial destination through its own handle.

CANCELLED_COPY_IN: tuple[Call, ...] = (
    create_file("\\{store}\\{study}\\{series}\\{sop}.dcm", "dst", FILE_CREATE, COPY_OPTIONS, WRITE),
    Call("set_file_size", handle="dst", args=("size", "{sop}")),
    Call("WriteFile", handle="dst", args=(CHUNK, "{sop}", 1)),  # one chunk, then Cancel
    Call("can_delete", handle="dst"),
    Call("cleanup", handle="dst", args=(windows.CLEANUP_DELETE | MODIFIED,)),
    Call("close", handle="dst"),
)

# -- new folder: at the dataset level, renamed to a store ID; one never renamed; deeper ones -----


def new_folder_renamed(rename_expect: str) -> tuple[Call, ...]:
    return (
        create_file("\\New folder", "x", FILE_OPEN, FOLDER_OPTIONS, ATTRIBUTES, NOT_FOUND),  # a free name
        create_file("\\New folder", "nf", FILE_CREATE, FOLDER_OPTIONS, LIST),  # CreateDirectory
        Call("get_file_info", handle="nf"),
        Call("close", handle="nf"),
        create_file("\\{new}", "x", FILE_OPEN, FOLDER_OPTIONS, ATTRIBUTES, NOT_FOUND),  # the typed name is free
        create_file("\\New folder", "mv", FILE_OPEN, FOLDER_OPTIONS | BACKUP_INTENT, MOVE),  # MoveFileEx
        Call("rename", handle="mv", args=("\\New folder", "\\{new}", False), expect=rename_expect),
        Call("close", handle="mv"),
    )


def delete_folder(path: str, expect: str = OK) -> tuple[Call, ...]:
    """RemoveDirectory (Explorer's permanent delete of an empty folder)."""
    return (
        create_file(path, "rd", FILE_OPEN, FOLDER_OPTIONS | BACKUP_INTENT, REMOVE),
        Call("can_delete", handle="rd", expect=expect),
        *((Call("cleanup", handle="rd", args=(windows.CLEANUP_DELETE,)),) if expect == OK else ()),
        Call("close", handle="rd"),
    )


NEW_FOLDER_KEPT: tuple[Call, ...] = (
    create_file("\\New folder", "nf", FILE_CREATE, FOLDER_OPTIONS, LIST),
    Call("close", handle="nf"),
    create_file("\\", "root", FILE_OPEN, FOLDER_OPTIONS, LIST),
    Call("QueryDirectory", handle="root", args=(SMALL_BUFFER,)),
    Call("close", handle="root"),
)

NEW_FOLDER_DEEPER: tuple[Call, ...] = (
    create_file("\\{store}\\New folder", "nf", FILE_CREATE, FOLDER_OPTIONS, LIST, DENIED),
    create_file("\\{store}\\{study}\\New folder", "nf", FILE_CREATE, FOLDER_OPTIONS, LIST, DENIED),
    create_file("\\{store}\\{study}\\{series}\\New folder", "nf", FILE_CREATE, FOLDER_OPTIONS, LIST, DENIED),
)

# -- the shell's own files: found nowhere, created and deleted on this computer only -------------


def side_files(folder: str) -> tuple[Call, ...]:
    """Probes of every name Explorer looks for in ``folder``, then desktop.ini and Thumbs.db
    written there (folder customisation, thumbnail cache), listed, and deleted."""
    probes = PROBES_AT_ROOT if folder == "" else PROBES_EVERYWHERE
    steps: list[Call] = [create_file(folder or "\\", "dir", FILE_OPEN, FOLDER_OPTIONS, LIST)]
    for probe in probes:
        steps += [Call("FindFile", handle="dir", args=(probe,), expect=NOT_FOUND),
                  create_file(f"{folder}\\{probe}", "x", FILE_OPEN, FILE_OPTIONS, READ, NOT_FOUND)]
    for made in ("desktop.ini", "Thumbs.db"):
        steps += [create_file(f"{folder}\\{made}", "side", FILE_OPEN_IF, FILE_OPTIONS, WRITE),
                  Call("write", handle="side", args=(b"[.ShellClassInfo]\r\n", 0, False, False)),
                  Call("set_basic_info", handle="side"),
                  Call("cleanup", handle="side", args=(MODIFIED,)),
                  Call("close", handle="side")]
    steps += [Call("QueryDirectory", handle="dir", args=(SMALL_BUFFER,)),
              create_file(f"{folder}\\desktop.ini", "rm", FILE_OPEN, FILE_OPTIONS, REMOVE),
              Call("can_delete", handle="rm"),
              Call("cleanup", handle="rm", args=(windows.CLEANUP_DELETE,)),
              Call("close", handle="rm"),
              Call("close", handle="dir")]
    return tuple(steps)


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class Outcome:
    call: Call
    path: str
    status: str
    result: Any = None


@dataclass
class Replay:
    """Plays sequences against ``operations`` (a WinFspOperations). ``names`` fill the
    templates; ``sources`` are the bytes of the files a sequence writes, by template name."""

    operations: Any
    error_type: type[BaseException]  # winfspy's NTStatusError
    names: Mapping[str, str] = field(default_factory=dict)
    sources: Mapping[str, bytes] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # the file size the last FileInfo gave, per handle
    listings: dict[str, list[str]] = field(default_factory=dict)  # QueryDirectory's names, per handle
    pages: dict[str, int] = field(default_factory=dict)  # ReadDirectory calls of the last QueryDirectory
    read: dict[str, bytes] = field(default_factory=dict)  # ReadFile's bytes, per handle
    paths: dict[str, str] = field(default_factory=dict)  # the path each handle was opened or renamed to
    trace: list[Outcome] = field(default_factory=list)

    def run(self, calls: tuple[Call, ...]) -> list[Outcome]:
        """Play ``calls``; AssertionError (with the trace) when a status differs from ``expect``."""
        start = len(self.trace)
        for call in calls:
            path = self._fill(call.path)
            status, result = self._step(call, path)
            name = windows.STATUS_NAMES.get(status, hex(status))
            self.trace.append(Outcome(call, path, name, result))
            if name != call.expect:
                lines = "\n".join(f"  {o.call.op} {o.path} {o.call.handle} -> {o.status}" for o in self.trace[start:])
                raise AssertionError(f"{call.op} {path or call.handle}: {name}, expected {call.expect}\n{lines}")
        return self.trace[start:]

    # -- winfspy's ll_* part -------------------------------------------------------------------

    def ll(self, op: str, *args: Any) -> tuple[int, Any]:
        try:
            result = getattr(self.operations, op)(*args)
        except self.error_type as exc:
            return int(exc.value), None  # type: ignore[attr-defined]
        except BaseException:  # noqa: BLE001 - winfspy's _catch_unhandled_exceptions
            log.exception("Unhandled exception")
            return windows.NTSTATUS["STATUS_UNEXPECTED_IO_ERROR"], None
        if op in ("create", "open", "overwrite", "write", "flush", "set_file_size"):
            context = result if op in ("create", "open") else args[0]
            status, info = self.ll("get_file_info", context)
            if status:
                return status, None
            return 0, (result, info)
        return 0, result

    # -- the steps -----------------------------------------------------------------------------

    def _step(self, call: Call, path: str) -> tuple[int, Any]:
        handle = self.handles.get(call.handle)
        if call.op == "CreateFile":
            return self._create_file(call, path)
        if call.op == "QueryDirectory":
            return self._query_directory(call.handle, handle, call.args[0])
        if call.op == "FindFile":
            return self.ll("get_dir_info_by_name", handle, self._fill(call.args[0]))
        if call.op == "ReadFile":
            return self._read_file(call.handle, handle, call.args[0])
        if call.op == "WriteFile":
            return self._write_file(call.handle, handle, *call.args)
        if call.op == "get_volume_info":
            return self.ll("get_volume_info")
        if call.op == "set_file_size":
            which, source = call.args
            size = len(self.sources[self._fill(source)])
            if which == "allocation":  # the FSD sends aligned allocation sizes (winfsp.h, SetFileSize)
                size = -(-size // windows.ALLOCATION_UNIT) * windows.ALLOCATION_UNIT
            status, result = self.ll("set_file_size", handle, size, which == "allocation")
            return self._note(call.handle, status, result)
        if call.op == "set_basic_info":
            now = windows.filetime(1_700_000_000)
            return self.ll("set_basic_info", handle, windows.FILE_ATTRIBUTE_ARCHIVE, now, now, now, now, None)
        if call.op in ("can_delete",):
            return self.ll("can_delete", handle, self._path_of(call.handle))
        if call.op == "cleanup":
            flags = call.args[0]
            name = self._path_of(call.handle) if flags & windows.CLEANUP_DELETE else None
            self.ll("cleanup", handle, name, flags)
            return 0, None  # Cleanup has no status (winfsp.h: no way to report failure)
        if call.op == "close":
            self.ll("close", handle)
            return 0, None  # nor has Close
        if call.op == "rename":
            old, new, replace = call.args
            status, result = self.ll("rename", handle, self._fill(old), self._fill(new), replace)
            if not status:
                self.paths[call.handle] = self._fill(new)
            return status, result
        if call.op == "write":
            data, offset, to_end, constrained = call.args
            status, result = self.ll("write", handle, data, offset, to_end, constrained)
            return self._note(call.handle, status, result)
        return self._note(call.handle, *self.ll(call.op, *((handle,) if call.handle else ()), *call.args))

    def _create_file(self, call: Call, path: str) -> tuple[int, Any]:
        disposition, options, access = call.args
        not_found = windows.NTSTATUS[NOT_FOUND]
        # FILE_CREATE checks the folder only (Create must answer the collision); the others check
        # the name first.
        found = not_found if disposition == FILE_CREATE else self.ll("get_security_by_name", path)[0]
        if found == not_found and disposition not in (FILE_OPEN, FILE_OVERWRITE):
            status, _ = self.ll("get_security_by_name", path.rsplit("\\", 1)[0] or "\\")
            if status:
                path_missing = windows.NTSTATUS["STATUS_OBJECT_PATH_NOT_FOUND"]
                return (path_missing if status == not_found else status), None
            status, result = self.ll("create", path, options, access, windows.FILE_ATTRIBUTE_ARCHIVE, None, 0)
        elif found:
            return found, None
        else:
            status, result = self.ll("open", path, options, access)
            if not status and disposition in (FILE_OVERWRITE, FILE_OVERWRITE_IF, FILE_SUPERSEDE):
                context = result[0]
                status, over = self.ll("overwrite", context, windows.FILE_ATTRIBUTE_ARCHIVE,
                                       disposition == FILE_SUPERSEDE, 0)
                if status:  # the FSD closes what it opened
                    self.ll("cleanup", context, None, 0)
                    self.ll("close", context)
                    return status, None
                result = (context, over[1])
        if status:
            return status, None
        context, info = result
        self.handles[call.handle] = context
        self.paths[call.handle] = path
        self.sizes[call.handle] = info["file_size"]
        return 0, info

    def _query_directory(self, label: str, context: Any, buffer: int) -> tuple[int, Any]:
        names: list[str] = []
        marker = None
        pages = 0
        while True:
            status, entries = self.ll("read_directory", context, marker)
            if status:
                return status, None
            pages += 1
            used, full = 0, False
            for entry in entries:
                size = dir_info_size(entry["file_name"])
                if used + size > buffer:
                    full = True
                    break
                used += size
                names.append(entry["file_name"])
            if not full and used + 8 <= buffer:  # the end-of-directory entry fits: done
                break
            if not names or names[-1] == marker:
                raise AssertionError(f"read_directory made no progress after marker {marker!r}")
            marker = names[-1]
        self.listings[label] = names
        self.pages[label] = pages
        return 0, names

    def _read_file(self, label: str, context: Any, chunk: int) -> tuple[int, Any]:
        size = self.sizes[label]
        data = bytearray()
        while len(data) < size:  # the cache manager never reads past the size it was given
            status, got = self.ll("read", context, len(data), min(chunk, size - len(data)))
            if status:
                return status, None
            data += got
        self.read[label] = bytes(data)
        return 0, len(data)

    def _write_file(self, label: str, context: Any, chunk: int, source: str, chunks: int | None = None
                    ) -> tuple[int, Any]:
        data = self.sources[self._fill(source)]
        constrained = self.sizes.get(label, 0) >= len(data)  # end of file set first: paging writes
        offset, done = 0, 0
        while offset < len(data) and (chunks is None or done < chunks):
            piece = data[offset: offset + chunk]
            status, result = self.ll("write", context, piece, offset, False, constrained)
            if status:
                return status, None
            written, info = result
            if written != len(piece):
                raise AssertionError(f"write at {offset}: {written} of {len(piece)} bytes")
            self.sizes[label] = info["file_size"]
            offset += written
            done += 1
        return 0, offset

    def _note(self, label: str, status: int, result: Any) -> tuple[int, Any]:
        if not status and isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
            self.sizes[label] = result[1]["file_size"]
        return status, result

    def _path_of(self, label: str) -> str:
        return self.paths[label]

    def _fill(self, template: Any) -> Any:
        return template.format_map(self.names) if isinstance(template, str) else template


def dir_info_size(name: str) -> int:
    """Bytes one entry takes in a ReadDirectory buffer: FSP_FSCTL_DIR_INFO (fsctl.h: UINT16
    Size, FSP_FSCTL_FILE_INFO of 72 bytes, a 24-byte union, then the UTF-16 name), 8-aligned.
    GUESS: the 104-byte header and the 8-byte alignment are read off fsctl.h's layout, not measured."""
    return (104 + len(name.encode("utf-16-le")) + 7) // 8 * 8


# ---------------------------------------------------------------------------------------------
# Counting what reaches the server


class CountingProxy:
    """Wraps a Dataset (and the Stores it opens) and counts every method call made through it:
    each is a request to the server (or several, for a paged listing)."""

    def __init__(self, target: Any, counter: Counter[str] | None = None, lock: threading.Lock | None = None,
                 prefix: str = "") -> None:
        self._target = target
        self.calls: Counter[str] = counter if counter is not None else Counter()
        self._lock = lock or threading.Lock()
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value) or name.startswith("_"):
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[self._prefix + name] += 1
            result = value(*args, **kwargs)
            if name == "open_store":
                return CountingProxy(result, self.calls, self._lock, "store.")
            return result

        return counted

    def total(self, *, only: Callable[[str], bool] = lambda name: name != "close") -> int:
        with self._lock:
            return sum(n for name, n in self.calls.items() if only(name))

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
