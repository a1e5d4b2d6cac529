"""What Windows Explorer's requests become at the FUSE adapter when WinFsp's own FUSE layer
(winfsp-x64.dll, "WinFsp-FUSE") serves the mount: Windows with Python >= 3.12, where mfusepy
drives ``backends/fuse.py`` through WinFsp's FUSE 2.8 API instead of winfspy. The Explorer side
(NT calls, dispositions, access masks, 64 KiB chunks) is tests/replay/explorer.py's; this file
translates each of its WinFsp requests into the FUSE callbacks WinFsp-FUSE makes, as
:class:`tests.replay.fuse_boundary.Step` lists for :func:`tests.replay.fuse_boundary.replay`.

Sources (winfsp/winfsp as stored by the team's ``search`` tool, 2021-2022 versions):

[intf]     src/dll/fuse/fuse_intf.c, the FSP_FILE_SYSTEM_INTERFACE of WinFsp-FUSE:
           - fsp_fuse_intf_GetSecurityByName -> GetSecurityEx -> GetFileInfoEx: getattr(path);
             fgetattr only when a file handle is passed (GetFileInfoFunnel), never for folders
             (FUSE_FILE_INFO(IsDirectory, fi) is 0 for them).
           - fsp_fuse_intf_Create: folder -> mkdir(path, mode) then opendir (NULL here: fh = -1);
             file -> create(path, mode, fi) with fi.flags = O_CREAT|O_EXCL|O_RDWR in MSVC values
             (0x0100|0x0400|2); chown only when the new security descriptor names another owner
             than the caller's token; then GetFileInfoEx (fgetattr for files, getattr for folders).
           - fsp_fuse_intf_Open: getattr(path) FIRST, then opendir (folders; NULL here) or
             open(path, fi) with fi.flags from GrantedAccess & (FILE_READ_DATA|FILE_WRITE_DATA):
             0/READ -> O_RDONLY, WRITE -> O_WRONLY, both -> O_RDWR (FILE_APPEND_DATA alone ->
             O_WRONLY). Never O_TRUNC, never O_CREAT. An open for attributes or DELETE only is an
             O_RDONLY open.
           - fsp_fuse_intf_Overwrite: ftruncate(path, 0, fi) (truncate if no ftruncate), then
             fgetattr. No O_TRUNC anywhere: FUSE_CAP_ATOMIC_O_TRUNC is not offered ([loop]).
           - fsp_fuse_intf_Cleanup: only with FspCleanupDelete: rmdir (folders) or unlink (files);
             the result is IGNORED (void). Nothing else happens at Cleanup.
           - fsp_fuse_intf_Close: folders -> releasedir (NULL here); files -> flush, then release;
             both results ignored (void). So the upload at flush happens at Close, AFTER any
             Cleanup-time unlink.
           - fsp_fuse_intf_Read: read(path, buf, len, off, fi); 0 bytes -> STATUS_END_OF_FILE.
           - fsp_fuse_intf_Write: fgetattr, then write(); ConstrainedIo clips the write to the
             size fgetattr gave (no write at all at or past it); WriteToEndOfFile uses that size.
           - fsp_fuse_intf_Flush (FlushFileBuffers): fsync(path, 0, fi) (success if NULL), then
             fgetattr. Its status IS seen by the program.
           - fsp_fuse_intf_GetFileInfo / GetSecurity: fgetattr (files) / getattr (folders).
           - fsp_fuse_intf_SetBasicInfo: chflags only with FSP_FUSE_CAP_STAT_EX (not requested
             here); utimens(path, tv) WITHOUT a file handle when a time is given (getattr first if
             one of atime/mtime is 0); setcrtime/setchgtime (NULL here); then fgetattr.
           - fsp_fuse_intf_SetFileSize: fgetattr; then ftruncate(new size) for an end-of-file
             change, or for an allocation size only when it is below the current size.
           - fsp_fuse_intf_CanDelete: access(DELETE_OK) only with FSP_FUSE_CAP_DELETE_ACCESS (not
             requested); folders: readdir, "not empty" if a child other than . and .. comes.
           - fsp_fuse_intf_Rename: getattr(new) (the new name is the request's path); if it
             exists (and is not the same name up to case on a case-insensitive volume):
             STATUS_OBJECT_NAME_COLLISION without ReplaceIfExists, STATUS_ACCESS_DENIED for a
             folder target; else rename(old, new). The target's existence is WinFsp's check, not
             the file system's.
           - fsp_fuse_intf_ReadDirectory: with a fresh marker, readdir(path, fi) fills WinFsp's
             own directory buffer (the whole listing, once); then FixDirInfo: getattr of every
             entry (. is the folder, .. its parent; the root gets no dot entries) unless
             READDIR_PLUS was negotiated (not here); an entry whose getattr fails is dropped.
             Later pages (a marker) come from that buffer: no callback.
           - fsp_fuse_intf_GetDirInfoByName: getattr(folder/name); failure -> "not found".
           - fsp_fuse_intf_GetVolumeInfo: statfs("/").
           - fsp_fuse_op_enter: context uid/gid/pid come from the request's access token, which
             only Create and Rename requests carry; every other request runs with uid = gid =
             pid = -1.
[loop]     src/dll/fuse/fuse_loop.c, fsp_fuse_loop_start: init(conn), then statfs("/") and
           getattr("/") (readlink("/") only if implemented). conn.want decides: no
           FSP_FUSE_CAP_CASE_INSENSITIVE -> CaseSensitiveSearch (names reach getattr exactly as
           typed: "X.DCM" stays upper case) and PassQueryDirectoryFileName stays on; no
           FSP_FUSE_CAP_READDIR_PLUS, FSP_FUSE_CAP_STAT_EX, FSP_FUSE_CAP_DELETE_ACCESS (mfusepy
           sets no conn.want).
[fuse.c]   src/dll/fuse/fuse.c, fsp_fuse_new and its option table: FileInfoTimeout=1000 ms by
           default; attr_timeout=N sets it to N*1000 unless FileInfoTimeout= is given ("metadata
           timeout (millis, -1 for data caching)"); entry_timeout, negative_timeout, hard_remove
           are discarded; FlushAndPurgeOnCleanup, SupportsPosixUnlinkRename,
           PostCleanupWhenModifiedOnly, PassQueryDirectoryFileName, UmFileContextIsUserContext2
           on. "-o uid=N set file owner (-1 for mounting user id)", same for gid: with uid=-1 the
           uid of the mounting process's token is looked up once, and GetFileInfoFunnel replaces
           st_uid (st_gid) of EVERY stat with it. Without uid=, the adapter's st_uid stands.
[fsop]     src/dll/fsop.c: FspFileSystemOpCreate_FileOpen (OpenCheck = GetSecurityByName of the
           name, then Open), _FileCreate (CreateCheck = GetSecurityByName of the PARENT, then
           Create), _FileOpenIf (OpenCheck; on STATUS_OBJECT_NAME_NOT_FOUND CreateCheck+Create),
           _FileOverwriteIf (OverwriteCheck on the name; existing -> Open, and the FSD then sends
           a separate Overwrite request; missing -> CreateCheck+Create), _FileOpenTargetDirectory
           (check and Open the parent, then GetSecurityByName of the full name), _CollisionCheck
           (after a Create collision: GetSecurityByName of the name);
           FspFileSystemOpSetInformation: disposition -> GetFileInfo (read-only check) then
           CanDelete; rename -> FspFileSystemRenameCheck (GetSecurityByName of the new name,
           not-found allowed) then Rename; FspFileSystemOpQueryDirectory: GetDirInfoByName when
           the pattern is a file name; FspFileSystemOpFlushBuffers.
[security] src/dll/security.c, FspAccessCheckEx: GetSecurityByName (traverse checks only for a
           token without SeChangeNotifyPrivilege: not Explorer's), then AccessCheck against the
           security descriptor built from getattr's uid, gid and mode.
[posix]    src/dll/posix.c: FspPosixMapUidToSid (uid 0 -> S-1-5-0, not a user; local accounts are
           0x30000 + RID), FspPosixMapPermissionToAccessMask (r -> FILE_READ_DATA; w ->
           FILE_WRITE_DATA|FILE_APPEND_DATA|FILE_WRITE_ATTRIBUTES (+FILE_DELETE_CHILD on
           folders); the owner always gets DELETE).
[errno]    src/dll/fuse/errno.i: errno -> NTSTATUS (EPERM and EACCES -> STATUS_ACCESS_DENIED,
           ENOENT -> STATUS_OBJECT_NAME_NOT_FOUND, EEXIST -> STATUS_OBJECT_NAME_COLLISION, ...).
[relnotes] WinFsp 2017.2 release notes: "getting the originating process ID (PID) during Create,
           Open and Rename calls. FUSE file systems can now access fuse_context::pid".
[mfusepy]  mfusepy on Windows loads winfsp-x64.dll through the FUSE 2 API (the plain fuse_*
           exports of src/dll/fuse/fuse_compat.c, "for use only from programs using FFI
           technology (e.g. fusepy)"); FuseOperations does not implement opendir, releasedir,
           fsyncdir or readlink, so mfusepy leaves them NULL. GUESS: the DLL has no
           fuse_invalidate_path (WinFsp's FUSE 2.8 API invalidates with fuse_notify), so
           FuseOperations.init falls back to no invalidation and a size learnt later reaches
           Windows only when FileInfoTimeout expires.
[explorer] tests/replay/explorer.py: what Explorer asks (dispositions, access masks, the order).

The replay runs on this machine's libfuse prototypes. WinFsp calls fgetattr/ftruncate (FUSE 2.8);
FuseBoundary maps ``getattr``/``truncate`` with a handle onto fgetattr/ftruncate under libfuse 2
and onto getattr/truncate with a file info under libfuse 3: the same adapter methods either way.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from dicomfuse.backends import windows
from dicomfuse.backends.options import default_options
from dicomfuse.core.vfs import Vfs
from tests.replay import explorer as ex
from tests.replay.fuse_boundary import OK, Caller, Data, DirEntry, FuseBoundary, ReplayResult, Size, Stat, Step

# -- who asks ------------------------------------------------------------------------------------

# A local account (S-1-5-21-X-Y-Z-1001) and its primary group "None" (RID 513), as [posix] maps
# them: 0x30000 + RID.
USER_UID = 0x30000 + 1001
USER_GID = 0x30000 + 513
# Create and Rename requests carry Explorer's access token: its uid, gid and pid ([intf]
# fsp_fuse_op_enter, [relnotes]).
EXPLORER = Caller("explorer.exe", 5012, uid=USER_UID, gid=USER_GID)
# Every other request (read, write, cleanup, close, readdir, ...) has no token: -1 for all three.
NO_TOKEN = Caller("(no token)", -1, uid=-1, gid=-1)
# The adapter itself: backends/fuse.py takes os.getuid()/os.getgid(), absent on Windows -> 0.
ADAPTER_ON_WINDOWS = Caller("dicomfuse.exe", 4000, uid=0, gid=0)

# The mount options the replays assume: the FUSE adapter's Windows defaults plus uid=-1,gid=-1
# ([fuse.c]). NOT what backends/options.default_options("win32") gives today (see
# access_for_user and the report): without them Explorer cannot create anything.
WINFSP_FUSE_OPTIONS: dict[str, str | bool] = {**default_options("win32"), "uid": "-1", "gid": "-1"}

# -- constants of the translation ---------------------------------------------------------------

FILE_READ_DATA, FILE_WRITE_DATA, FILE_APPEND_DATA = (windows.FILE_READ_DATA, windows.FILE_WRITE_DATA,
                                                     windows.FILE_APPEND_DATA)
WINFSP_CREATE_FLAGS = 0x0100 | 0x0400 | 2  # [intf] fsp_fuse_intf_Create: MSVC O_CREAT|O_EXCL|O_RDWR
# GUESS: the mode create/mkdir get is 0777 narrowed by the security descriptor CreatePrivateObjectSecurity
# derives from the parent's (itself mapped from the adapter's 0755); the adapter ignores it anyway.
NEW_FILE_MODE = 0o755
NEW_FOLDER_MODE = 0o755
CHUNK = ex.CHUNK  # 64 KiB, Explorer's copy ([explorer])
TIMES_NS = (1_700_000_000 * 10**9, 1_700_000_000 * 10**9)  # what CopyFile copies from the source
# [loop]: SectorSize = statfs' f_frsize (clamped to 512..4096), one sector per allocation unit.
# GUESS: 4096, the f_frsize of the cache's NTFS disk; it only rounds the allocation size, which
# makes no callback here anyway.
ALLOCATION_UNIT = windows.ALLOCATION_UNIT

# [errno], the Windows (MSVC) column, by errno name: what Explorer sees for an adapter's errno.
NTSTATUS_OF_ERRNO = {
    "EPERM": "STATUS_ACCESS_DENIED", "ENOENT": "STATUS_OBJECT_NAME_NOT_FOUND", "EIO": "STATUS_IO_DEVICE_ERROR",
    "EACCES": "STATUS_ACCESS_DENIED", "EEXIST": "STATUS_OBJECT_NAME_COLLISION", "ENOTDIR": "STATUS_NOT_A_DIRECTORY",
    "EISDIR": "STATUS_FILE_IS_A_DIRECTORY", "EINVAL": "STATUS_INVALID_PARAMETER", "EFBIG": "STATUS_DISK_FULL",
    "ENOSPC": "STATUS_DISK_FULL", "ENOTEMPTY": "STATUS_DIRECTORY_NOT_EMPTY", "ENOSYS": "STATUS_INVALID_DEVICE_REQUEST",
}


def nt_status(rc: int) -> str:
    """The NTSTATUS WinFsp-FUSE makes of a callback's return value ([errno]; anything it does not
    list is STATUS_ACCESS_DENIED, fsp_fuse_ntstatus_from_errno's default)."""
    if rc >= 0:
        return "STATUS_SUCCESS"
    return NTSTATUS_OF_ERRNO.get(errno.errorcode.get(-rc, ""), "STATUS_ACCESS_DENIED")


def open_flags(access: int) -> int:
    """[intf] fsp_fuse_intf_Open: fi.flags from the granted access."""
    flags = {FILE_WRITE_DATA: os.O_WRONLY, FILE_READ_DATA | FILE_WRITE_DATA: os.O_RDWR}.get(
        access & (FILE_READ_DATA | FILE_WRITE_DATA), os.O_RDONLY)
    if access & FILE_APPEND_DATA and flags == os.O_RDONLY:
        flags = os.O_WRONLY
    return flags


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


# =============================================================================================
# The boundary: FuseBoundary as WinFsp-FUSE drives it


class WinFspFuseBoundary(FuseBoundary):
    """FuseBoundary with the adapter built as on Windows (owner uid/gid 0) and the callers
    WinFsp-FUSE names; plus the two requests whose callbacks depend on what readdir returns
    (ReadDirectory's FixDirInfo, CanDelete of a folder), as replay macros."""

    def __init__(self, vfs: Vfs, options: Mapping[str, str | bool] | None = None) -> None:
        super().__init__(vfs, ADAPTER_ON_WINDOWS, platform="win32",
                         options=WINFSP_FUSE_OPTIONS if options is None else options)
        self.caller = NO_TOKEN

    def read_directory(self, path: str) -> tuple[int, list[DirEntry]]:
        """[intf] fsp_fuse_intf_ReadDirectory with a fresh marker: readdir, then FixDirInfo's
        getattr of each entry; the listing Explorer gets (entries whose getattr failed dropped)."""
        rc, entries = self.readdir(path)
        if rc < 0:
            return rc, []
        listed: list[DirEntry] = []
        for entry in entries:
            if path == "/" and entry.name in (".", ".."):
                continue  # [intf] fsp_fuse_intf_AddDirInfo: no dot entries at the root
            target = {".": path, "..": _parent(path)}.get(entry.name, _join(path, entry.name))
            if self.getattr(target)[0] >= 0:
                listed.append(entry)
        return rc, listed

    def can_delete_folder(self, path: str) -> tuple[int, None]:
        """[intf] fsp_fuse_intf_CanDelete of a folder: readdir; any child but . and .. ->
        STATUS_DIRECTORY_NOT_EMPTY (given here as -ENOTEMPTY, [errno]'s errno for it)."""
        rc, entries = self.readdir(path)
        if any(e.name not in (".", "..") for e in entries):
            return -errno.ENOTEMPTY, None
        return rc, None


READ_DIRECTORY = "read_directory"
CAN_DELETE_FOLDER = "can_delete_folder"


# =============================================================================================
# One WinFsp request -> its FUSE callbacks


def mount() -> list[Step]:
    """[loop] fsp_fuse_loop_start after init (which FuseBoundary already made)."""
    return [Step("statfs", "/", why="[loop] statfs('/') for the sector size and name length"),
            Step("getattr", "/", why="[loop] getattr('/') for the volume creation time")]


def get_volume_info() -> list[Step]:
    return [Step("statfs", "/", why="[intf] fsp_fuse_intf_GetVolumeInfo")]


def get_security_by_name(path: str, *, exists: bool = True, caller: Caller = EXPLORER) -> list[Step]:
    return [Step("getattr", path, ok=(OK,) if exists else (errno.ENOENT,), caller=caller,
                 why="[security] FspAccessCheckEx -> [intf] GetSecurityByName -> getattr")]


def _open_existing(path: str, handle: str, access: int, *, folder: bool) -> list[Step]:
    steps = [Step("getattr", path, caller=EXPLORER, why="[intf] fsp_fuse_intf_Open: getattr before open")]
    if not folder:  # folders: opendir is NULL ([mfusepy]) -> fh = -1, no callback
        steps.append(Step("open", path, (open_flags(access),), handle=handle, caller=EXPLORER,
                          why="[intf] fsp_fuse_intf_Open: open, flags from the granted access"))
    return steps


def _create_new(path: str, handle: str, *, folder: bool, ok: tuple[int, ...] | str) -> list[Step]:
    check = Step("getattr", _parent(path), caller=EXPLORER,
                 why="[fsop] CreateCheck: GetSecurityByName of the parent -> getattr")
    if folder:
        made = Step("mkdir", path, (NEW_FOLDER_MODE,), ok=ok, caller=EXPLORER, why="[intf] Create: mkdir")
        info = Step("getattr", path, caller=EXPLORER, why="[intf] Create: GetFileInfoEx, no fi for a folder")
    else:
        made = Step("create", path, (NEW_FILE_MODE, WINFSP_CREATE_FLAGS), ok=ok, handle=handle, caller=EXPLORER,
                    why="[intf] Create: create(path, mode, O_CREAT|O_EXCL|O_RDWR)")
        info = Step("getattr", path, handle=handle, caller=EXPLORER, why="[intf] Create: GetFileInfoEx -> fgetattr")
    refused = not isinstance(ok, str) and OK not in ok
    return [check, made] if refused else [check, made, info]  # a refusal ends the request


def create_file(path: str, handle: str, disposition: int, access: int, *, folder: bool = False,
                exists: bool, ok: tuple[int, ...] | str = (OK,)) -> list[Step]:
    """NtCreateFile of ``path`` ([explorer]'s create_file), as [fsop] dispatches it by disposition.
    ``exists`` says which branch the request takes (the steps are data); ``ok`` is the outcome
    of the callback that decides (open/create/mkdir). A FILE_OPEN of a missing name ends at the
    check (STATUS_OBJECT_NAME_NOT_FOUND)."""
    if disposition == ex.FILE_OPEN:
        steps = get_security_by_name(path, exists=exists)
        return steps + (_open_existing(path, handle, access, folder=folder) if exists else [])
    if disposition == ex.FILE_CREATE:
        if exists:  # the file system's create answers EEXIST; [fsop] _CollisionCheck looks again
            return [*_create_new(path, handle, folder=folder, ok=(errno.EEXIST,))[:2],
                    *get_security_by_name(path)]
        return _create_new(path, handle, folder=folder, ok=ok)
    if disposition in (ex.FILE_OPEN_IF, ex.FILE_OVERWRITE_IF):
        steps = get_security_by_name(path, exists=exists)  # OpenCheck / OverwriteCheck
        if not exists:
            return steps + _create_new(path, handle, folder=folder, ok=ok)
        steps += _open_existing(path, handle, access, folder=folder)
        if disposition == ex.FILE_OVERWRITE_IF:
            steps += overwrite(path, handle)
        return steps
    raise ValueError(f"disposition {disposition} is not replayed")


def overwrite(path: str, handle: str) -> list[Step]:
    """The FSD's Overwrite request after an open with FILE_OVERWRITE(_IF) ([fsop]); no token."""
    return [Step("truncate", path, (0,), handle=handle, why="[intf] fsp_fuse_intf_Overwrite: ftruncate(0)"),
            Step("getattr", path, handle=handle, why="[intf] Overwrite: fgetattr")]


def get_file_info(path: str, handle: str, *, folder: bool = False) -> list[Step]:
    return [Step("getattr", path, handle=None if folder else handle, why="[intf] fsp_fuse_intf_GetFileInfo")]


def set_file_size(path: str, handle: str, size: int | Size, *, allocation: bool, current: int = 0) -> list[Step]:
    """SetInformation(FileAllocationInformation / FileEndOfFileInformation) -> [intf]
    fsp_fuse_intf_SetFileSize. ``current`` is the size the fgetattr gives (an allocation size
    above it changes nothing)."""
    steps = [Step("getattr", path, handle=handle, why="[intf] SetFileSize: fgetattr")]
    new = size if isinstance(size, int) else None
    if not allocation or (new is not None and current > new):
        steps.append(Step("truncate", path, (size,), handle=handle, why="[intf] SetFileSize: ftruncate"))
    return steps


def write_file(path: str, handle: str, key: str, size: int, *, chunk: int = CHUNK,
               chunks: int | None = None) -> list[Step]:
    """The copy's writes: per request, [intf] fsp_fuse_intf_Write's fgetattr then write. The
    data comes from ``files[f"{key}@{offset}"]`` (see :func:`split`). ``chunks`` stops early (a
    cancelled copy). GUESS: the cache manager's writes reach us in the program's 64 KiB pieces."""
    steps: list[Step] = []
    for n, offset in enumerate(range(0, size, chunk)):
        if chunks is not None and n >= chunks:
            break
        steps += [Step("getattr", path, handle=handle, why="[intf] Write: fgetattr (ConstrainedIo clipping)"),
                  Step("write", path, (Data(f"{key}@{offset}"), offset), handle=handle, why="[intf] Write: write")]
    return steps


def split(key: str, data: bytes, chunk: int = CHUNK) -> dict[str, bytes]:
    """``files`` entries for :func:`write_file`: the whole under ``key``, each chunk under
    ``key@offset``."""
    return {key: data, **{f"{key}@{off}": data[off:off + chunk] for off in range(0, len(data), chunk)}}


def read_file(path: str, handle: str, size: int, *, chunk: int = CHUNK) -> list[Step]:
    """The copy's reads, never past the size the Open's FileInfo gave ([explorer]: the cache
    manager reads up to the known end of file); [intf] fsp_fuse_intf_Read: read only."""
    return [Step("read", path, (min(chunk, size - off), off), handle=handle, why="[intf] fsp_fuse_intf_Read")
            for off in range(0, size, chunk)]


def set_basic_info(path: str, handle: str, *, folder: bool = False) -> list[Step]:
    """CopyFile gives the copy its source's times: [intf] fsp_fuse_intf_SetBasicInfo."""
    return [Step("utimens", path, (TIMES_NS,), why="[intf] SetBasicInfo: utimens(path, tv), no file handle"),
            Step("getattr", path, handle=None if folder else handle, why="[intf] SetBasicInfo: fgetattr")]


def flush_buffers(path: str, handle: str, *, ok: tuple[int, ...] | str = (OK,)) -> list[Step]:
    """FlushFileBuffers: [intf] fsp_fuse_intf_Flush; its status reaches the program."""
    return [Step("fsync", path, (0,), handle=handle, ok=ok, why="[intf] Flush: fsync(path, 0, fi)"),
            *([Step("getattr", path, handle=handle, why="[intf] Flush: fgetattr")] if ok == (OK,) else [])]


def set_delete(path: str, handle: str, *, folder: bool = False, ok: tuple[int, ...] | str = (OK,)) -> list[Step]:
    """SetInformation(FileDispositionInformation, delete) ([fsop]): GetFileInfo for the
    read-only check, then [intf] fsp_fuse_intf_CanDelete (a callback for folders only)."""
    steps = [Step("getattr", path, handle=None if folder else handle, why="[fsop] disposition: GetFileInfo")]
    if folder:
        steps.append(Step(CAN_DELETE_FOLDER, path, ok=ok, why="[intf] CanDelete: readdir, empty?"))
    return steps


def cleanup(path: str, *, delete: bool = False, folder: bool = False,
            ok: tuple[int, ...] | str = (OK,)) -> list[Step]:
    """[intf] fsp_fuse_intf_Cleanup: a callback only for a delete, its result ignored by WinFsp
    (``ok`` states what the core should answer all the same)."""
    if not delete:
        return []
    return [Step("rmdir" if folder else "unlink", path, ok=ok, why="[intf] Cleanup(FspCleanupDelete)")]


def close(path: str, handle: str, *, folder: bool = False) -> list[Step]:
    """[intf] fsp_fuse_intf_Close: files flush then release (results ignored); folders nothing
    (releasedir NULL, [mfusepy])."""
    if folder:
        return []
    return [Step("flush", path, handle=handle, why="[intf] Close: flush (the upload; status lost)"),
            Step("release", path, handle=handle, why="[intf] Close: release")]


def query_directory(path: str) -> list[Step]:
    return [Step(READ_DIRECTORY, path, why="[intf] ReadDirectory: readdir + FixDirInfo getattr per entry")]


def find_file(folder: str, name: str, *, exists: bool = False) -> list[Step]:
    """FindFirstFile of one name: [fsop] -> [intf] fsp_fuse_intf_GetDirInfoByName."""
    return [Step("getattr", _join(folder, name), ok=(OK,) if exists else (errno.ENOENT,),
                 why="[intf] GetDirInfoByName: getattr(folder/name)")]


def rename(old: str, new: str, *, exists: bool = False, replace: bool = False, folder_target: bool = False,
           ok: tuple[int, ...] | str = (OK,)) -> list[Step]:
    """MoveFileEx of ``old`` (already opened with DELETE) to ``new``, which ``exists`` or not.
    GUESS: the I/O manager opens the target's folder first (SL_OPEN_TARGET_DIRECTORY), as for
    any rename given a full path; [fsop] _FileOpenTargetDirectory then checks and opens the
    parent and looks the full name up. Then SetInformation(FileRenameInformation): [fsop]
    RenameCheck and [intf] fsp_fuse_intf_Rename, both on Explorer's token. When ``new`` exists,
    WinFsp decides without the file system: no ReplaceIfExists -> STATUS_OBJECT_NAME_COLLISION,
    a folder in the way -> STATUS_ACCESS_DENIED; rename() is called only when neither applies."""
    parent = _parent(new)
    there = (OK,) if exists else (errno.ENOENT,)
    steps = [
        Step("getattr", parent, caller=EXPLORER, why="[fsop] OpenTargetDirectoryCheck: the parent"),
        Step("getattr", parent, caller=EXPLORER, why="[intf] Open of the target's folder"),
        Step("getattr", new, ok=there, caller=EXPLORER, why="[fsop] FILE_EXISTS / FILE_DOES_NOT_EXIST"),
        Step("getattr", new, ok=there, caller=EXPLORER, why="[fsop] RenameCheck: GetSecurityByName(new)"),
        Step("getattr", new, ok=there, caller=EXPLORER, why="[intf] Rename: does the new name exist?"),
    ]
    if exists and (not replace or folder_target):
        return steps  # STATUS_OBJECT_NAME_COLLISION / STATUS_ACCESS_DENIED: no rename callback
    return steps + [Step("rename", old, (new, 0), ok=ok, caller=EXPLORER, why="[intf] Rename: rename(old, new)")]


# =============================================================================================
# Explorer's flows ([explorer]), translated


def open_folder(path: str, *, probes: Iterable[str] | None = None) -> list[Step]:
    """[explorer] open_folder: open, list, probe desktop.ini & co. (a folder's handle makes no
    callback at its close). GUESS: the FileInfo and security queries right after the open are
    answered from the FSD's cache (FileInfoTimeout 1 s, [fuse.c]) and reach no callback."""
    names = probes if probes is not None else (ex.PROBES_AT_ROOT if path == "/" else ex.PROBES_EVERYWHERE)
    steps = create_file(path, "dir", ex.FILE_OPEN, ex.LIST, folder=True, exists=True)
    steps += query_directory(path)
    for name in names:
        steps += find_file(path, name)
    return steps


def browse() -> list[Step]:
    """[explorer] BROWSE: the drive (autorun.inf), a store, a study, a series, one file's details."""
    series = "/{store}/{study}/{series}"
    instance = f"{series}/{{sop}}.dcm"
    return [
        *get_volume_info(),
        *create_file("/autorun.inf", "x", ex.FILE_OPEN, ex.READ, exists=False),
        *open_folder("/"),
        *open_folder("/{store}"),
        *open_folder("/{store}/{study}"),
        *open_folder(series),
        *create_file(f"{series}/desktop.ini", "x", ex.FILE_OPEN, ex.READ, exists=False),
        *create_file(instance, "details", ex.FILE_OPEN, ex.ATTRIBUTES, exists=True),
        *close(instance, "details"),
    ]


def copy_out(path: str, size: int, *, chunk: int = CHUNK) -> list[Step]:
    """[explorer] COPY_OUT: open for reading, read in 64 KiB pieces up to the Open's size, close."""
    return [
        *create_file(path, "src", ex.FILE_OPEN, ex.READ, exists=True),
        *read_file(path, "src", size, chunk=chunk),
        *close(path, "src"),
    ]


def copy_in(dest: str, key: str, size: int, *, disposition: int = ex.FILE_CREATE, exists: bool = False,
            preset_size: bool = True, flush: bool = False) -> list[Step]:
    """[explorer] copy_in: Explorer checks the name is free (when it is), creates or overwrites the
    file, presets its size, writes it, gives it the source's times, closes it."""
    steps: list[Step] = []
    if not exists:
        steps += create_file(dest, "probe", ex.FILE_OPEN, ex.ATTRIBUTES, exists=False)
    steps += create_file(dest, "dst", disposition, ex.WRITE, exists=exists)
    if preset_size:
        aligned = -(-size // ALLOCATION_UNIT) * ALLOCATION_UNIT
        steps += set_file_size(dest, "dst", aligned, allocation=True)  # new or just overwritten: size 0
        steps += set_file_size(dest, "dst", Size(key), allocation=False)
    steps += write_file(dest, "dst", key, size)
    steps += set_basic_info(dest, "dst")
    if flush:
        steps += flush_buffers(dest, "dst")
    steps += cleanup(dest)
    steps += close(dest, "dst")
    return steps


def drag_into_store(key: str, size: int) -> list[Step]:
    """[explorer] DRAG_INTO_STORE: a file keeps its own name; CopyFile2 flushes before closing."""
    return copy_in("/{store}/{name}", key, size, flush=True)


def drag_into_series(key: str, size: int) -> list[Step]:
    """[explorer] DRAG_INTO_SERIES: CREATE_ALWAYS (FILE_OVERWRITE_IF) of a new name, no preset size."""
    return copy_in("/{store}/{study}/{series}/{sop}.dcm", key, size, disposition=ex.FILE_OVERWRITE_IF,
                   preset_size=False)


def replace(key: str, size: int) -> list[Step]:
    """[explorer] OVERWRITE: "Replace the file in the destination" on an existing instance."""
    return copy_in("/{store}/{study}/{series}/{sop}.dcm", key, size, disposition=ex.FILE_OVERWRITE_IF,
                   exists=True, preset_size=True)


def delete(folder: str, name: str) -> list[Step]:
    """[explorer] DELETE: the Recycle Bin is looked for and refused, then the file is deleted
    for good (DeleteFile: open for DELETE, disposition, Cleanup with delete, Close), and the
    window refreshes."""
    path = _join(folder, name)
    return [
        *create_file("/$RECYCLE.BIN", "bin", ex.FILE_OPEN, ex.LIST, folder=True, exists=False),
        *create_file("/$RECYCLE.BIN", "bin", ex.FILE_CREATE, ex.LIST, folder=True, exists=False,
                     ok=(errno.EPERM, errno.EACCES)),
        *create_file(path, "victim", ex.FILE_OPEN, ex.REMOVE, exists=True),
        *set_delete(path, "victim"),
        *cleanup(path, delete=True),
        *close(path, "victim"),
        *create_file(folder, "dir", ex.FILE_OPEN, ex.LIST, folder=True, exists=True),
        *query_directory(folder),
    ]


def cancelled_copy_in(dest: str, key: str, size: int) -> list[Step]:
    """[explorer] CANCELLED_COPY_IN: one chunk, then Cancel: Explorer deletes the partial file
    through its own handle (disposition, Cleanup with delete, Close)."""
    return [
        *create_file(dest, "dst", ex.FILE_CREATE, ex.WRITE, exists=False),
        *set_file_size(dest, "dst", Size(key), allocation=False),
        *write_file(dest, "dst", key, size, chunks=1),
        *set_delete(dest, "dst"),
        *cleanup(dest, delete=True, ok=(OK, errno.ENOENT)),
        *close(dest, "dst"),
    ]


def new_folder_renamed(new: str = "{new}", *, rename_ok: tuple[int, ...] | str = (OK,)) -> list[Step]:
    """[explorer] new_folder_renamed: "New folder" at the dataset level, then the typed name."""
    return [
        *create_file("/New folder", "x", ex.FILE_OPEN, ex.ATTRIBUTES, folder=True, exists=False),
        *create_file("/New folder", "nf", ex.FILE_CREATE, ex.LIST, folder=True, exists=False),
        *close("/New folder", "nf", folder=True),
        *create_file(f"/{new}", "x", ex.FILE_OPEN, ex.ATTRIBUTES, folder=True, exists=False),
        *create_file("/New folder", "mv", ex.FILE_OPEN, ex.MOVE, folder=True, exists=True),
        *rename("/New folder", f"/{new}", ok=rename_ok),
        *close("/New folder", "mv", folder=True),
    ]


def delete_folder(path: str, *, ok: tuple[int, ...] | str = (OK,)) -> list[Step]:
    """[explorer] delete_folder: RemoveDirectory."""
    steps = [*create_file(path, "rd", ex.FILE_OPEN, ex.REMOVE, folder=True, exists=True),
             *set_delete(path, "rd", folder=True, ok=ok)]
    if ok == (OK,):
        steps += cleanup(path, delete=True, folder=True)
    return steps + close(path, "rd", folder=True)


def new_folder_kept() -> list[Step]:
    """[explorer] NEW_FOLDER_KEPT: made, never renamed, the root listed again."""
    return [
        *create_file("/New folder", "nf", ex.FILE_CREATE, ex.LIST, folder=True, exists=False),
        *close("/New folder", "nf", folder=True),
        *create_file("/", "root", ex.FILE_OPEN, ex.LIST, folder=True, exists=True),
        *query_directory("/"),
    ]


def new_folder_below(parent: str) -> list[Step]:
    """"New folder" in a store, study or series folder: Explorer finds the name free, the mkdir
    is refused (EPERM -> STATUS_ACCESS_DENIED, [errno])."""
    path = _join(parent, "New folder")
    return [*create_file(path, "x", ex.FILE_OPEN, ex.ATTRIBUTES, folder=True, exists=False),
            *create_file(path, "nf", ex.FILE_CREATE, ex.LIST, folder=True, exists=False,
                         ok=(errno.EPERM, errno.EACCES))]


def side_files(folder: str) -> list[Step]:
    """[explorer] side_files: desktop.ini and Thumbs.db written in ``folder`` (FILE_OPEN_IF),
    listed, and desktop.ini deleted; the data keys are "desktop.ini" and "Thumbs.db"."""
    steps = open_folder(folder)
    for made in ("desktop.ini", "Thumbs.db"):
        path = _join(folder, made)
        steps += [*create_file(path, "side", ex.FILE_OPEN_IF, ex.WRITE, exists=False),
                  *write_file(path, "side", made, len(SIDE_FILE)),
                  *set_basic_info(path, "side"),
                  *close(path, "side")]
    steps += query_directory(folder)
    path = _join(folder, "desktop.ini")
    steps += [*create_file(path, "rm", ex.FILE_OPEN, ex.REMOVE, exists=True),
              *set_delete(path, "rm"),
              *cleanup(path, delete=True),
              *close(path, "rm")]
    return steps


SIDE_FILE = b"[.ShellClassInfo]\r\n"


# =============================================================================================
# Reading results


def reads(result: ReplayResult, handle: str) -> bytes:
    """The bytes the read steps of ``handle`` got, in order."""
    return b"".join(value for step, rc, value in result.results if step.op == "read" and step.handle == handle)


def opened_size(result: ReplayResult, handle: str) -> int:
    """The file size WinFsp-FUSE's Open handed the FSD for ``handle``: the getattr Open makes
    just before open ([intf] fsp_fuse_intf_Open). Windows reads no further than that."""
    results = result.results
    at = next(i for i, (step, rc, _) in enumerate(results) if step.op == "open" and step.handle == handle)
    path = results[at][0].path
    for step, rc, value in reversed(results[:at]):
        if step.op == "getattr" and step.path == path and rc >= 0:
            assert isinstance(value, Stat)
            return value.size
    raise AssertionError(f"no getattr before the open of {handle}")


def listing(result: ReplayResult, path_template: str) -> list[str]:
    """The names the last ReadDirectory of ``path_template`` gave Explorer (dots included)."""
    found = [value for step, rc, value in result.results if step.op == READ_DIRECTORY and step.path == path_template]
    assert found, f"no ReadDirectory of {path_template}"
    return [e.name for e in found[-1]]


# =============================================================================================
# What WinFsp's access check decides ([security], [posix], [fuse.c])


def access_for_user(st: Stat, options: Mapping[str, Any], *, user_uid: int = USER_UID,
                    user_gid: int = USER_GID, mounting_uid: int = USER_UID, mounting_gid: int = USER_GID) -> int:
    """The rwx bits of ``st.mode`` the Windows user gets: WinFsp-FUSE first replaces st_uid/st_gid
    with the mounting user's when uid=-1/gid=-1 (or with N for uid=N) ([fuse.c], [intf]
    GetFileInfoFunnel); then the owner's bits apply to the owner, the group's to a member of the
    group, the others' to everyone else ([posix]). GUESS: the deny ACEs of the mapping make the
    owner's bits the whole answer for the owner (a user who is owner and group at once, as with
    some Microsoft accounts, gets the most restrictive of both unless DistinctPermsForSameOwnerGroup
    is set: WinFsp 2021.1 release notes; not modelled)."""
    def mapped(value: Any, own: int, mounting: int) -> int:
        if value is None:
            return own
        return mounting if int(value) == -1 else int(value)

    owner = mapped(options.get("uid"), st.uid, mounting_uid)
    group = mapped(options.get("gid"), st.gid, mounting_gid)
    mode = st.mode & 0o777
    if "umask" in options:  # [intf] GetFileInfoFunnel: umask= replaces the permission bits
        mode = 0o777 & ~int(str(options["umask"]), 8)
    if owner == user_uid:
        return (mode >> 6) & 7
    if group == user_gid:
        return (mode >> 3) & 7
    return mode & 7


def may_add_to(folder: Stat, options: Mapping[str, Any], **who: int) -> bool:
    """FILE_ADD_FILE / FILE_ADD_SUBDIRECTORY on a folder ([fsop] CreateCheck): its 'w' bit."""
    assert stat.S_ISDIR(folder.mode)
    return bool(access_for_user(folder, options, **who) & 2)
