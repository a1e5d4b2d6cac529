"""The upload spool: files being written through the mount live in private local files until
``close()``; then they are checked (complete Part-10 DICOM with its three UIDs) and sent.
A file that fails keeps its bytes in ``spool/failed`` and the user is told where.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import time
from pathlib import Path

from dicomfuse.core.errors import FsError
from dicomfuse.dicomfile import DicomUids, check_upload

log = logging.getLogger(__name__)

def inspect_dicom(path: Path) -> DicomUids:
    """The UIDs of a complete Part-10 file; FsError(EINVAL) saying why it is not one."""
    if path.stat().st_size == 0:
        raise FsError(errno.EINVAL, "empty file is not DICOM", logging.ERROR)
    result = check_upload(path)
    if isinstance(result, str):
        raise FsError(errno.EINVAL, result, logging.ERROR)
    return result


class Spool:
    """Private local files for writes in progress, and a ``failed`` folder for the bytes of
    uploads the server did not confirm."""

    def __init__(self, directory: Path, failed: Path) -> None:
        self.directory = directory
        self.failed = failed
        self._names = itertools.count()
        self._prefix = f"{os.getpid()}-{int(time.time())}"

    def new_file(self) -> tuple[Path, int]:
        """A new empty 0600 file and a read/write fd on it."""
        path = self.directory / f"{self._prefix}-{next(self._names)}.part"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        return path, fd

    def keep_failed(self, path: Path, label: str) -> Path:
        """Move a failed upload's bytes to ``failed/`` under a recognisable name; return it."""
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[-120:] or "upload"
        target = self.failed / f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._names)}-{safe}"
        try:
            os.replace(path, target)
        except OSError:
            shutil.copyfile(path, target)
        return target

    @staticmethod
    def discard(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
