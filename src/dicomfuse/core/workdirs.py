"""The mount's private directories on disk: the instance cache (per mount, wiped at unmount and
at the next start after a crash) and the upload spool (kept across crashes: it may hold the
only copy of a file the server never confirmed). Everything is 0700 / 0600: instances are
patient data.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from dicomfuse.core import portable

log = logging.getLogger(__name__)

LOCK_NAME = "mount.lock"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700, whatever the umask."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class WorkDirs:
    """``root/mounts/<id>/cache`` for this mount (held by an flock while it lives) and
    ``root/spool`` shared by mounts of this user."""

    def __init__(self, root: Path) -> None:
        self.root = private_dir(root)
        self.mounts = private_dir(root / "mounts")
        self.spool = private_dir(root / "spool")
        self.failed = private_dir(self.spool / "failed")
        self._wipe_stale_mounts()
        self.mount_dir = private_dir(self.mounts / uuid.uuid4().hex)
        self._lock_fd = portable.open_fd(self.mount_dir / LOCK_NAME, os.O_CREAT | os.O_RDWR)
        if not portable.try_lock(self._lock_fd):
            raise RuntimeError(f"cannot lock the new cache folder {self.mount_dir}")
        self.cache = private_dir(self.mount_dir / "cache")
        self.side = private_dir(self.mount_dir / "side")

    def _wipe_stale_mounts(self) -> None:
        """Remove cache dirs of mounts whose process is gone (their lock is free)."""
        removed = 0
        for child in self.mounts.iterdir():
            lock_path = child / LOCK_NAME
            try:
                fd = portable.open_fd(lock_path, os.O_RDWR)
            except FileNotFoundError:
                fd = -1
            except OSError:
                continue
            if fd >= 0:
                free = portable.try_lock(fd)
                os.close(fd)  # before the rmtree: Windows cannot delete a file that is open
                if not free:
                    continue  # a live mount holds it
            shutil.rmtree(child, ignore_errors=True)
            removed += 1
        if removed:
            log.info("Removed the instance cache of %d mount(s) that ended without cleaning up", removed)

    def wipe(self) -> None:
        """Remove this mount's cache (the spool stays)."""
        try:
            os.close(self._lock_fd)  # first: Windows cannot delete the lock file while it is open
        except OSError:
            pass
        shutil.rmtree(self.mount_dir, ignore_errors=True)
