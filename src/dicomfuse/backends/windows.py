"""What the Windows adapter needs to know about Windows and WinFsp, as pure functions.

Importable on any OS (no winfspy here; ``backends/winfsp.py`` is the adapter that needs it):

- ONE table from errno to NTSTATUS, the Windows side of ``core.errors``' table from store errors
  to errno;
- the mount point rules (a free drive letter, or a folder that WinFsp creates itself);
- the volume parameters of winfspy's ``FileSystem``, the volume label, the mount options;
- the ``FileInfo`` dict winfspy wants for an :class:`~dicomfuse.core.vfs.Attr`.

Sources: winfspy 0.8.4 (``file_system.py``: the ``_volume_params_factory`` keywords;
``operations.py``: the FileInfo keys and the 64-byte label check; ``plumbing/status.py``: the
NTSTATUS values, those of Windows' ntstatus.h), WinFsp's ``inc/winfsp/winfsp.h``.
"""

from __future__ import annotations

import errno
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dicomfuse.core.paths import is_side_file
from dicomfuse.core.vfs import Attr

# ---------------------------------------------------------------------------------------------
# NTSTATUS: the values of Windows' ntstatus.h (winfspy.plumbing.NTSTATUS has the same members).

NTSTATUS: dict[str, int] = {
    "STATUS_SUCCESS": 0x00000000,
    "STATUS_INVALID_HANDLE": 0xC0000008,
    "STATUS_INVALID_PARAMETER": 0xC000000D,
    "STATUS_INVALID_DEVICE_REQUEST": 0xC0000010,
    "STATUS_END_OF_FILE": 0xC0000011,
    "STATUS_ACCESS_DENIED": 0xC0000022,
    "STATUS_OBJECT_NAME_INVALID": 0xC0000033,
    "STATUS_OBJECT_NAME_NOT_FOUND": 0xC0000034,
    "STATUS_OBJECT_NAME_COLLISION": 0xC0000035,
    "STATUS_OBJECT_PATH_NOT_FOUND": 0xC000003A,
    "STATUS_SHARING_VIOLATION": 0xC0000043,
    "STATUS_NO_EAS_ON_FILE": 0xC0000052,
    "STATUS_DISK_FULL": 0xC000007F,
    "STATUS_INSUFFICIENT_RESOURCES": 0xC000009A,
    "STATUS_MEDIA_WRITE_PROTECTED": 0xC00000A2,
    "STATUS_IO_TIMEOUT": 0xC00000B5,
    "STATUS_FILE_IS_A_DIRECTORY": 0xC00000BA,
    "STATUS_NOT_SUPPORTED": 0xC00000BB,
    "STATUS_NOT_SAME_DEVICE": 0xC00000D4,
    "STATUS_UNEXPECTED_IO_ERROR": 0xC00000E9,
    "STATUS_DIRECTORY_NOT_EMPTY": 0xC0000101,
    "STATUS_NOT_A_DIRECTORY": 0xC0000103,
    "STATUS_NAME_TOO_LONG": 0xC0000106,
    "STATUS_TOO_MANY_OPENED_FILES": 0xC000011F,
    "STATUS_FILE_TOO_LARGE": 0xC0000904,
}
STATUS_NAMES: dict[int, str] = {v: k for k, v in NTSTATUS.items()}
FALLBACK = "STATUS_UNEXPECTED_IO_ERROR"  # what an errno missing from the table becomes (logged)

# errno name -> NTSTATUS name. Names, not numbers, on the left: errno values differ between
# Linux, macOS and Windows, and some names exist on one OS only (EREMOTEIO, ENOATTR).
_BY_ERRNO_NAME: tuple[tuple[str, str], ...] = (
    ("ENOENT", "STATUS_OBJECT_NAME_NOT_FOUND"),  # a missing parent: STATUS_OBJECT_PATH_NOT_FOUND (see ntstatus_for)
    ("EEXIST", "STATUS_OBJECT_NAME_COLLISION"),
    ("EPERM", "STATUS_ACCESS_DENIED"),            # Explorer: "You need permission to perform this action"
    ("EACCES", "STATUS_ACCESS_DENIED"),
    ("ENOTEMPTY", "STATUS_DIRECTORY_NOT_EMPTY"),
    ("EBUSY", "STATUS_SHARING_VIOLATION"),       # Explorer: "the file is open in another program"
    ("ENOTDIR", "STATUS_NOT_A_DIRECTORY"),
    ("EISDIR", "STATUS_FILE_IS_A_DIRECTORY"),
    ("EINVAL", "STATUS_INVALID_PARAMETER"),      # a refused new name: STATUS_OBJECT_NAME_INVALID (see ntstatus_for)
    ("EFBIG", "STATUS_FILE_TOO_LARGE"),
    ("EIO", "STATUS_UNEXPECTED_IO_ERROR"),
    ("EREMOTEIO", "STATUS_UNEXPECTED_IO_ERROR"),
    ("ETIMEDOUT", "STATUS_IO_TIMEOUT"),
    ("ENOSPC", "STATUS_DISK_FULL"),
    ("EDQUOT", "STATUS_DISK_FULL"),
    ("ENODATA", "STATUS_NO_EAS_ON_FILE"),        # the core's "no such extended attribute"
    ("ENOATTR", "STATUS_NO_EAS_ON_FILE"),
    ("ENOTSUP", "STATUS_NOT_SUPPORTED"),
    ("EOPNOTSUPP", "STATUS_NOT_SUPPORTED"),
    ("ENOSYS", "STATUS_INVALID_DEVICE_REQUEST"),
    ("EBADF", "STATUS_INVALID_HANDLE"),
    ("EROFS", "STATUS_MEDIA_WRITE_PROTECTED"),
    ("ENAMETOOLONG", "STATUS_NAME_TOO_LONG"),
    ("EXDEV", "STATUS_NOT_SAME_DEVICE"),
    ("ENOMEM", "STATUS_INSUFFICIENT_RESOURCES"),
    ("EMFILE", "STATUS_TOO_MANY_OPENED_FILES"),
    ("ENFILE", "STATUS_TOO_MANY_OPENED_FILES"),
)
ERRNO_TO_NTSTATUS: dict[int, str] = {}
for _name, _status in _BY_ERRNO_NAME:
    _value = getattr(errno, _name, None)
    if _value is not None:
        ERRNO_TO_NTSTATUS.setdefault(_value, _status)  # first row wins where names share a value

# Where the same errno means something more precise on Windows.
PLAIN = "plain"
IN_FOLDER = "in-folder"  # making a new entry: ENOENT means its folder is missing
NAMING = "naming"        # making or renaming a folder: EINVAL means the new name is refused
_OVERRIDES: dict[str, dict[int, str]] = {
    PLAIN: {},
    IN_FOLDER: {errno.ENOENT: "STATUS_OBJECT_PATH_NOT_FOUND", errno.EINVAL: "STATUS_OBJECT_NAME_INVALID"},
    NAMING: {errno.EINVAL: "STATUS_OBJECT_NAME_INVALID"},
}


def ntstatus_name(err: int | None, context: str = PLAIN) -> str | None:
    """The NTSTATUS name for ``err``, or None when the table has no row for it."""
    if err is None:
        return None
    return _OVERRIDES[context].get(err) or ERRNO_TO_NTSTATUS.get(err)


def ntstatus_for(err: int | None, context: str = PLAIN) -> int:
    """The NTSTATUS value for ``err`` (STATUS_UNEXPECTED_IO_ERROR when the table has none)."""
    return NTSTATUS[ntstatus_name(err, context) or FALLBACK]


# ---------------------------------------------------------------------------------------------
# Constants of winnt.h / wdm.h / winfsp.h that winfspy 0.8.4 does not export.

FILE_READ_DATA = 0x0001
FILE_WRITE_DATA = 0x0002
FILE_APPEND_DATA = 0x0004
FILE_READ_EA = 0x0008
FILE_WRITE_EA = 0x0010
FILE_EXECUTE = 0x0020
FILE_READ_ATTRIBUTES = 0x0080
FILE_WRITE_ATTRIBUTES = 0x0100
DELETE = 0x00010000
READ_CONTROL = 0x00020000
SYNCHRONIZE = 0x00100000
FILE_GENERIC_READ = READ_CONTROL | FILE_READ_DATA | FILE_READ_ATTRIBUTES | FILE_READ_EA | SYNCHRONIZE
FILE_GENERIC_WRITE = (READ_CONTROL | FILE_WRITE_DATA | FILE_WRITE_ATTRIBUTES | FILE_WRITE_EA | FILE_APPEND_DATA
                      | SYNCHRONIZE)

# winfsp.h, enum of Cleanup flags (winfspy's memfs.py defines them locally: "TODO: expose").
CLEANUP_DELETE = 0x01
CLEANUP_SET_ALLOCATION_SIZE = 0x02
CLEANUP_SET_ARCHIVE_BIT = 0x10
CLEANUP_SET_LAST_ACCESS_TIME = 0x20
CLEANUP_SET_LAST_WRITE_TIME = 0x40
CLEANUP_SET_CHANGE_TIME = 0x80

FILE_ATTRIBUTE_READONLY = 0x1
FILE_ATTRIBUTE_HIDDEN = 0x2
FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_ARCHIVE = 0x20
FILE_ATTRIBUTE_NORMAL = 0x80


def reads_data(granted_access: int) -> bool:
    return bool(granted_access & (FILE_READ_DATA | FILE_EXECUTE))


def writes_data(granted_access: int) -> bool:
    return bool(granted_access & (FILE_WRITE_DATA | FILE_APPEND_DATA))


# ---------------------------------------------------------------------------------------------
# Names and file information


def vfs_path(file_name: str) -> str:
    """WinFsp's ``\\store\\study\\x.dcm`` (root ``\\``) as the core's ``/store/study/x.dcm``.
    Names pass through unchanged: ``<uid>.DCM`` is the core's to resolve."""
    return "/" + "/".join(part for part in file_name.replace("\\", "/").split("/") if part)


def parent_path(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


EPOCH_AS_FILETIME = 116_444_736_000_000_000  # 1970-01-01 in 100 ns units since 1601 (winfspy's filetime)
ALLOCATION_UNIT = 4096  # sector_size * sectors_per_allocation_unit below


def filetime(seconds: float) -> int:
    return EPOCH_AS_FILETIME + int(seconds * 10_000_000)


def seconds(filetime_value: int) -> float:
    """The inverse of :func:`filetime`: seconds since 1970 of a FILETIME."""
    return (filetime_value - EPOCH_AS_FILETIME) / 10_000_000


def file_info(attr: Attr, name: str = "") -> dict[str, int]:
    """The dict winfspy's ``ll_get_file_info`` and ``read_directory`` read (operations.py:
    file_attributes, allocation_size, file_size, creation_time, last_access_time,
    last_write_time, change_time, index_number). Side files (desktop.ini, Thumbs.db…) show as
    hidden, as Explorer would have made them: their attributes are not kept."""
    when = filetime(attr.mtime)
    if attr.is_dir:
        attributes, size = FILE_ATTRIBUTE_DIRECTORY, 0
    else:
        attributes, size = FILE_ATTRIBUTE_ARCHIVE, attr.size
    if name and is_side_file(name):
        attributes |= FILE_ATTRIBUTE_HIDDEN
    return {
        "file_attributes": attributes,
        "allocation_size": -(-size // ALLOCATION_UNIT) * ALLOCATION_UNIT,
        "file_size": size,
        "creation_time": when,
        "last_access_time": when,
        "last_write_time": when,
        "change_time": when,
        "index_number": 0,
    }


# ---------------------------------------------------------------------------------------------
# Volume


LABEL_MAX_UTF16 = 32  # FSP_FSCTL_VOLUME_INFO.VolumeLabel is WCHAR[32]; winfspy refuses > 64 bytes
FILE_SYSTEM_NAME = "DICOMFuse"  # FSP_FSCTL_VOLUME_PARAMS.FileSystemName is WCHAR[16]
THREAD_COUNT = 16  # the original Java tool ran WinFsp-FUSE with -oThreadCount=16
FILE_INFO_TIMEOUT_MS = 1000

# The keywords of winfspy 0.8.4's FileSystem(**volume_params) (file_system._volume_params_factory).
VOLUME_PARAM_NAMES = frozenset({
    "sector_size", "sectors_per_allocation_unit", "max_component_length", "volume_creation_time",
    "volume_serial_number", "transact_timeout", "irp_timeout", "irp_capacity", "file_info_timeout",
    "case_sensitive_search", "case_preserved_names", "unicode_on_disk", "persistent_acls", "reparse_points",
    "reparse_points_access_check", "named_streams", "hard_links", "extended_attributes", "read_only_volume",
    "post_cleanup_when_modified_only", "pass_query_directory_pattern", "always_use_double_buffering",
    "pass_query_directory_file_name", "flush_and_purge_on_cleanup", "device_control",
    "um_file_context_is_user_context2", "um_file_context_is_full_context", "um_reserved_flags",
    "allow_open_in_kernel_mode", "case_preserved_extended_attributes", "wsl_features",
    "directory_marker_as_next_offset", "reject_irp_prior_to_transact0", "km_reserved_flags", "prefix",
    "file_system_name", "volume_info_timeout_valid", "dir_info_timeout_valid", "security_timeout_valid",
    "stream_info_timeout_valid", "km_additional_reserved_flags", "volume_info_timeout", "dir_info_timeout",
    "security_timeout", "stream_info_timeout",
})


def volume_label(name: str | None) -> str:
    """The dataset name as a volume label: at most 32 UTF-16 code units (a character outside
    the BMP counts two and is never cut in half); "DICOMFuse" when empty."""
    label = (name or "").strip() or FILE_SYSTEM_NAME
    out, units = [], 0
    for ch in label:
        width = 2 if ord(ch) > 0xFFFF else 1
        if units + width > LABEL_MAX_UTF16:
            break
        out.append(ch)
        units += width
    return "".join(out)


def volume_params(label: str, *, drive: bool = True, file_info_timeout: int = FILE_INFO_TIMEOUT_MS,
                  now: float | None = None) -> dict[str, int | str]:
    """Keyword arguments for ``winfspy.FileSystem(mountpoint, operations, **params)``.

    - ``file_info_timeout`` 1 s: the FSD caches file information (and, with it, data through the
      Windows cache) that long; sizes the core learns show up within a second.
    - case-insensitive lookups, case-preserved names (``<uid>.DCM`` opens ``<uid>.dcm``).
    - ``post_cleanup_when_modified_only``: Cleanup comes only for written or deleted files.
    - ``flush_and_purge_on_cleanup``: the FSD writes cached data to us before posting Cleanup,
      so the upload done there sees the whole file (WinFsp-FUSE's own default, with
      FileInfoTimeout=1000: dll/fuse/fuse.c).
    - ``um_file_context_is_user_context2``: one file context per open, like the core's handles.
    - ``pass_query_directory_file_name``: Explorer's probes of one name (desktop.ini) come as
      ``get_dir_info_by_name`` instead of a whole listing.
    - ``reject_irp_prior_to_transact0`` on folder mounts only (winfspy memfs.py: a workaround for
      antivirus software, "not necessary with drives").
    The serial number is derived from the label, so a dataset keeps it across mounts."""
    if not 0 < len(label.encode("utf-16-le")) <= 2 * LABEL_MAX_UTF16:
        raise ValueError(f"volume label {label!r} is empty or longer than {LABEL_MAX_UTF16} characters")
    created = time.time() if now is None else now
    return {
        "sector_size": 512,
        "sectors_per_allocation_unit": ALLOCATION_UNIT // 512,
        "max_component_length": 255,
        "volume_creation_time": filetime(created),
        "volume_serial_number": zlib.crc32(label.encode("utf-8")) & 0xFFFFFFFF,
        "file_info_timeout": file_info_timeout,
        "case_sensitive_search": 0,
        "case_preserved_names": 1,
        "unicode_on_disk": 1,
        "persistent_acls": 1,
        "post_cleanup_when_modified_only": 1,
        "flush_and_purge_on_cleanup": 1,
        "um_file_context_is_user_context2": 1,
        "pass_query_directory_file_name": 1,
        "reject_irp_prior_to_transact0": 0 if drive else 1,
        "file_system_name": FILE_SYSTEM_NAME,
        "prefix": "",  # a disk volume: only those can be mounted on folders (WinFsp, SetMountPoint)
    }


@dataclass(frozen=True)
class MountSettings:
    """What ``--extraMountOptions`` and the per-OS defaults ask of a WinFsp mount."""

    params: dict[str, int | str]
    thread_count: int = THREAD_COUNT
    label: str | None = None
    debug: bool = False


# FUSE options of backends.options' defaults that WinFsp has no use for.
_FUSE_ONLY = frozenset({"fsname", "subtype", "entry_timeout", "negative_timeout", "hard_remove", "allow_other",
                        "default_permissions", "noappledouble", "defer_permissions", "nolocalcaches",
                        "noapplexattr", "uid", "gid", "umask"})
_ALIASES = {"ThreadCount": "thread_count", "FileInfoTimeout": "file_info_timeout", "volname": "label",
            "VolumeLabel": "label"}


def mount_settings(options: Mapping[str, str | bool]) -> MountSettings:
    """Read mount options (``-o`` style, as ``backends.options`` merges them) for WinFsp:
    ``ThreadCount``/``thread_count``, ``FileInfoTimeout``, ``volname``, ``debug``, any winfspy
    volume parameter by its name; FUSE's ``attr_timeout`` (seconds) sets ``FileInfoTimeout``
    unless given, as WinFsp-FUSE does. FUSE-only options are ignored. Raises ValueError with
    one line for anything else."""
    params: dict[str, int | str] = {}
    threads, label, debug = THREAD_COUNT, None, False
    attr_timeout: int | None = None
    for raw_key, value in options.items():
        key = _ALIASES.get(raw_key, raw_key)
        if key in _FUSE_ONLY:
            continue
        if key == "debug":
            debug = value is True or str(value).lower() in ("1", "true", "yes")
        elif key == "label":
            label = str(value)
        elif key == "thread_count":
            threads = _int_option(raw_key, value, minimum=1)
        elif key == "attr_timeout":
            attr_timeout = _int_option(raw_key, value, minimum=0) * 1000
        elif key in VOLUME_PARAM_NAMES:
            params[key] = value if key in ("prefix", "file_system_name") else _int_option(raw_key, value)
        else:
            raise ValueError(f"unknown mount option for WinFsp: {raw_key}")
    if attr_timeout is not None:
        params.setdefault("file_info_timeout", attr_timeout)
    if params.get("prefix"):
        raise ValueError("prefix (a network volume) is not supported: mount on a drive letter or a folder")
    return MountSettings(params, threads, label, debug)


def _int_option(key: str, value: str | bool, minimum: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"mount option {key} needs a whole number, not {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"mount option {key} must be at least {minimum}")
    return number


# ---------------------------------------------------------------------------------------------
# Mount point

_DRIVE = re.compile(r"^([A-Za-z]):[\\/]?$")
_BAD_CHARS = re.compile(r'[<>"|?*\x00-\x1f]')


def _drive_in_use(drive: str) -> bool:
    return os.path.exists(drive + "\\")


def is_drive(mount_point: str) -> bool:
    return bool(_DRIVE.match(mount_point))


def check_mount_point(text: str, *, drive_in_use: Callable[[str], bool] | None = None) -> str:
    """The mount point to give WinFsp, or ValueError with a one-line reason.

    - A drive letter: ``J:``, ``j:``, ``J:\\`` → ``J:`` (WinFsp mounts ``X:`` through
      DefineDosDevice; it must be free).
    - A folder: its parent must exist and it must not exist yet, as WinFsp makes it itself, a
      junction to the volume (rclone's mount docs: "parent directory or drive must exist, and
      mount must not exist"; WinFsp's dll/mount.c, FspMountSet_Directory, creates it with
      FILE_CREATE, so an existing folder fails with STATUS_OBJECT_NAME_COLLISION). Only disk
      volumes can be mounted on folders (winfsp.h, FspFileSystemSetMountPoint): ours is one.
      An existing EMPTY folder is accepted too: ``run`` removes it just before mounting and
      creates it again after unmounting (:func:`free_mount_folder`, :func:`restore_mount_folder`).
    Not ``J:\\``: WinFsp takes ``X:`` (and ``\\\\.\\X:``) as drive mount points only.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("no mount point: give a free drive letter such as J: or a folder path")
    match = _DRIVE.match(raw)
    if match:
        drive = match.group(1).upper() + ":"
        if (drive_in_use or _drive_in_use)(drive):
            raise ValueError(f"drive {drive} is already in use: choose a free drive letter")
        return drive
    if re.fullmatch(r"[A-Za-z]", raw):
        raise ValueError(f"{raw!r} is not a drive letter: write {raw.upper()}:")
    if raw.startswith(("\\\\", "//")):
        raise ValueError(f"{raw} is a network path: WinFsp mounts on a drive letter or a local folder")
    rest = raw[2:] if re.match(r"^[A-Za-z]:", raw) else raw
    if ":" in rest or _BAD_CHARS.search(raw):
        raise ValueError(f"{raw!r} is not a valid drive letter or folder path")
    if rest is not raw and not rest.startswith(("\\", "/")):
        raise ValueError(f"{raw} is relative to a drive's current folder: give a full path such as "
                         f"{raw[:2]}\\{rest}")
    path = os.path.abspath(raw)
    parent = os.path.dirname(path.rstrip("\\/")) or path
    if parent == path or not path.rstrip("\\/"):
        raise ValueError(f"{raw} is the root of a drive: give a drive letter (J:) or a folder path")
    if not os.path.isdir(parent):
        raise ValueError(f"the folder {parent} does not exist: create it first")
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise ValueError(f"{path} exists and is not a folder")
        if os.listdir(path):
            raise ValueError(f"the folder {path} is not empty: give a new or empty folder")
    return path


def free_mount_folder(mount_point: str) -> bool:
    """Remove the empty folder WinFsp must create itself; True if one was removed (then
    :func:`restore_mount_folder` puts it back after unmounting). Drive letters: False."""
    if is_drive(mount_point) or not os.path.isdir(mount_point):
        return False
    os.rmdir(mount_point)  # OSError if it is not empty (any more): the mount cannot proceed
    return True


def restore_mount_folder(mount_point: str) -> None:
    """Create again the empty folder :func:`free_mount_folder` removed (WinFsp deletes its
    own mount folder at unmount)."""
    os.makedirs(mount_point, exist_ok=True)

