"""The one core error type and the one table from store errors to errno."""

from __future__ import annotations

import errno
import logging

from dicomfuse.stores import base

log = logging.getLogger(__name__)

ENOATTR = getattr(errno, "ENOATTR", errno.ENODATA)


class FsError(OSError):
    """An operation refused or failed, with the errno the OS should see, a message that is safe
    to log (no PHI, no tokens) and the level to log it at."""

    def __init__(self, err: int, message: str = "", level: int = logging.DEBUG) -> None:
        super().__init__(err, message or errno.errorcode.get(err, str(err)))
        self.level = level

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno or 0, self.errno)}] {self.strerror}"


def for_operation(operation: str, message: str) -> str:
    """What an adapter logs for an error of ``operation``: ``"operation: message"``, or the message
    alone when it names the operation already (the core's say ``"write: /s/x.dcm …"``)."""
    return message if message.startswith(f"{operation}: ") else f"{operation}: {message}"


# One row per store error: errno at the mount, level of the log line. Order matters only for
# subclasses (none overlap today).
STORE_ERRNO: tuple[tuple[type[base.StoreError], int, int], ...] = (
    (base.NotFound, errno.ENOENT, logging.DEBUG),
    (base.AlreadyExists, errno.EEXIST, logging.INFO),
    (base.InvalidDicom, errno.EINVAL, logging.ERROR),
    (base.InvalidName, errno.EINVAL, logging.WARNING),
    (base.NotEmpty, errno.ENOTEMPTY, logging.WARNING),
    (base.Forbidden, errno.EACCES, logging.ERROR),
    (base.Unsupported, errno.EPERM, logging.WARNING),
    (base.TooLarge, errno.EFBIG, logging.ERROR),
    (base.Unavailable, errno.EIO, logging.ERROR),
    (base.Transcoded, errno.EIO, logging.ERROR),
)


def from_store_error(exc: base.StoreError, doing: str) -> FsError:
    """Translate a store error into the FsError the OS sees; ``doing`` says what failed
    (e.g. "delete /store/1.2/1.3/1.4.dcm") and must not hold patient data."""
    for kind, err, level in STORE_ERRNO:
        if isinstance(exc, kind):
            return FsError(err, f"{doing}: {exc}", level)
    return FsError(errno.EIO, f"{doing}: {exc}", logging.ERROR)
