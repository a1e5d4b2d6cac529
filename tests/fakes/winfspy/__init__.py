"""Stand-in for winfspy 0.8.4 (Scille/winfspy), the native binding replaced at the very boundary.

The same public names, signatures, exceptions and constants as the real package (read from its
0.8.4 wheel), so that ``dicomfuse.backends.winfsp`` runs unchanged on Linux in the tests:
``FileSystem`` records its volume parameters and the dispatcher calls instead of mounting, and
``SecurityDescriptor.from_string`` keeps the SDDL text instead of a binary descriptor. Anything
not read from winfspy's source is marked ``# GUESS:``.

Facts of 0.8.4 worth knowing (and mirrored here):
- ``NTSTATUS`` is not exported at the top level: it lives in ``winfspy.plumbing``.
- The Cleanup flags (FspCleanupDelete…) are not exported at all (memfs.py defines them locally).
- ``FileSystem.start()`` starts the dispatcher with ThreadCount 0 (WinFsp's default).

Test-only helpers live in ``_standin.py`` (not part of winfspy's surface).
"""

from ._version import __version__
from .file_system import FileSystem
from .operations import BaseFileContext, BaseFileSystemOperations
from .plumbing import CREATE_FILE_CREATE_OPTIONS, FILE_ATTRIBUTE, enable_debug_log
from .plumbing.exceptions import (
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

__all__ = (
    "__version__",
    "enable_debug_log",
    "FILE_ATTRIBUTE",
    "CREATE_FILE_CREATE_OPTIONS",
    "FileSystem",
    "BaseFileSystemOperations",
    "BaseFileContext",
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
