"""winfspy.plumbing of 0.8.4: the names its ``__all__`` lists that the adapter or tests use."""

from .bindings import enable_debug_log, ffi, lib
from .exceptions import (
    FileSystemAlreadyStarted,
    FileSystemNotStarted,
    NTStatusAccessDenied,
    NTStatusDirectoryNotEmpty,
    NTStatusEndOfFile,
    NTStatusError,
    NTStatusMediaWriteProtected,
    NTStatusNotADirectory,
    NTStatusObjectNameCollision,
    NTStatusObjectNameNotFound,
    WinFSPyError,
)
from .file_attribute import CREATE_FILE_CREATE_OPTIONS, FILE_ATTRIBUTE
from .security_descriptor import SecurityDescriptor
from .status import NTSTATUS, cook_ntstatus, nt_success
from .win32_filetime import dt_to_filetime, filetime_now, filetime_to_dt

__all__ = (
    "ffi",
    "lib",
    "enable_debug_log",
    "NTSTATUS",
    "nt_success",
    "cook_ntstatus",
    "FILE_ATTRIBUTE",
    "CREATE_FILE_CREATE_OPTIONS",
    "dt_to_filetime",
    "filetime_to_dt",
    "filetime_now",
    "SecurityDescriptor",
    "WinFSPyError",
    "FileSystemAlreadyStarted",
    "FileSystemNotStarted",
    "NTStatusError",
    "NTStatusObjectNameNotFound",
    "NTStatusObjectNameCollision",
    "NTStatusAccessDenied",
    "NTStatusNotADirectory",
    "NTStatusEndOfFile",
    "NTStatusDirectoryNotEmpty",
    "NTStatusMediaWriteProtected",
)
