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
from dataclasses import dataclass
from pathlib import Path

from dicomfuse.core.errors import FsError
from dicomfuse.core.paths import is_uid

log = logging.getLogger(__name__)

UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class DicomIdentity:
    study_uid: str
    series_uid: str
    sop_uid: str


def inspect_dicom(path: Path) -> DicomIdentity:
    """The UIDs of a complete Part-10 file; FsError(EINVAL) saying why it is not one.

    Large values are not loaded (memory stays flat); instead every element's declared length
    is checked against the file's size, so a truncated file is refused."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.errors import InvalidDicomError

    size = path.stat().st_size
    if size == 0:
        raise FsError(errno.EINVAL, "empty file is not DICOM", logging.ERROR)
    try:
        ds = pydicom.dcmread(path, defer_size=64 * 1024)
        for tag in list(ds.keys()):
            raw = ds.get_item(tag, keep_deferred=True)
            if (
                isinstance(raw, RawDataElement)
                and raw.length != UNDEFINED_LENGTH
                and raw.value_tell is not None
                and raw.value_tell + raw.length > size
            ):
                raise FsError(errno.EINVAL, f"truncated DICOM file (element {raw.tag} runs past the end)",
                              logging.ERROR)
        uids = (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID"))
    except FsError:
        raise
    except InvalidDicomError:
        raise FsError(errno.EINVAL, "not a DICOM Part-10 file (no preamble/DICM prefix or file meta)",
                      logging.ERROR) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on broken input
        raise FsError(errno.EINVAL, f"unreadable DICOM file ({type(exc).__name__})", logging.ERROR) from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise FsError(errno.EINVAL, "DICOM file meta has no TransferSyntaxUID", logging.ERROR)
    names = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    for name, value in zip(names, uids, strict=True):
        if not value or not is_uid(str(value)):
            raise FsError(errno.EINVAL, f"DICOM file has no valid {name}", logging.ERROR)
    return DicomIdentity(*(str(u) for u in uids))  # type: ignore[arg-type]


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
