"""The mount's private directories on disk: the instance cache (per mount, wiped at unmount and
at the next start after a crash) and the upload spool (kept across crashes: it may hold the
only copy of a file the server never confirmed). Everything is 0700 / 0600: instances are
patient data.

The cache root (``--cacheDir``) is the user's folder: it may be shared (``/tmp``, a team's
folder), so its mode is never changed; it is made private only when this program creates it.
What it holds, ``mounts/`` and ``spool/``, are this program's own folders, always 0700 and
checked: one that is a symbolic link or belongs to another user (made by someone else in a
shared root, to read what the mount puts there) is refused with :class:`FolderError`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

from dicomfuse.core import portable

log = logging.getLogger(__name__)

LOCK_NAME = "mount.lock"
MOUNTS_LOCK_NAME = ".lock"  # Windows: mounts/.lock (elsewhere the folder mounts/ itself is locked)
STALE_PREFIX = ".stale-"  # mounts/.stale-<id>: a stale cache being removed
MOUNTS_LOCK_WAIT = 60.0  # seconds; it is held for a few renames and a mkdir


def _lock_mounts(mounts: Path, *, windows: bool = portable.WINDOWS) -> int:
    """Take the lock that a start holds while it sweeps stale caches and makes its own folder
    (waiting while another start holds it); return its fd, to close. Linux and macOS: an flock
    on the folder ``mounts`` itself (no file to leave in it); Windows cannot open a folder:
    ``mounts/.lock``."""
    if windows:
        fd = portable.open_fd(mounts / MOUNTS_LOCK_NAME, os.O_CREAT | os.O_RDWR)
    else:
        fd = os.open(mounts, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    deadline = time.monotonic() + MOUNTS_LOCK_WAIT
    while not portable.try_lock(fd, windows=windows):
        if time.monotonic() > deadline:
            os.close(fd)
            raise FolderError(f"{mounts} has been locked by another dicomfuse start for {MOUNTS_LOCK_WAIT:.0f} s; "
                              "try again")
        time.sleep(0.02)
    return fd


class FolderError(Exception):
    """A cache or log folder that cannot be used, or not safely; the message names the folder
    and says why, in one line (the CLI prefixes the option: ``--cacheDir: ...``)."""


def folder_problem(path: Path, exc: OSError) -> str:
    """One line saying why the folder ``path`` could not be created or used (``exc``)."""
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        for candidate in (path, *path.parents):
            if candidate.exists() and not candidate.is_dir():
                what = "it is a file" if candidate == path else f"{candidate} is a file"
                return f"{path} is not a folder ({what})"
        return f"{path} is not a folder ({exc.strerror or exc})"
    where = f": {exc.filename}" if exc.filename and Path(exc.filename) != path else ""
    return f"{path} cannot be used ({exc.strerror or exc}{where})"


def make_parents(path: Path) -> None:
    """Create the missing parents of ``path``, each 0700 whatever the umask (as the XDG base
    directory spec asks of ``~/.cache`` and ``~/.local/state``): under umask 000, ``mkdir -p``
    would make them 0777, and another user could then swap the folder below for one of theirs.
    A parent that exists, or that another process made meanwhile, is left as it is. Raises
    OSError when one cannot be made (a file in the way, no permission)."""
    missing = []
    parent = path.parent
    while not parent.is_dir():
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made meanwhile by another process: not ours to change
        os.chmod(folder, 0o700)  # ours: 0700 whatever the umask


def user_dir(path: Path) -> Path:
    """The folder the user gave (or the default one): used as it is when it exists, whatever
    its mode (it may be shared); created 0700 (and its missing parents too, see
    :func:`make_parents`) when it does not. Raises OSError when it cannot be (a file, no
    permission)."""
    if path.is_dir():
        return path
    make_parents(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return path  # made meanwhile by another process: not ours to change
    os.chmod(path, 0o700)  # ours: private whatever the umask
    return path


def private_dir(path: Path, *, windows: bool = portable.WINDOWS) -> Path:
    """This program's own folder ``path``, 0700: created so (missing parents too, see
    :func:`make_parents`), or, when it exists, checked to be a real folder of this user and made
    0700. Raises FolderError for a symbolic link, something that is not a folder, or a folder of
    another user: in a shared parent someone else may have made it, to read what would be put in
    it."""
    make_parents(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    _check_own_dir(path, windows=windows)
    return path


def _check_own_dir(path: Path, *, windows: bool) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise FolderError(f"{path} is a symbolic link; the cache's private folders must be real folders "
                          "(remove the link, or use another cache folder)")
    if not stat.S_ISDIR(st.st_mode):
        raise FolderError(f"{path} is not a folder (remove it, or use another cache folder)")
    if windows:
        return  # no owner or mode bits to check or set: the folder's ACL decides, as it always did
    if st.st_uid != os.geteuid():
        raise FolderError(f"{path} belongs to another user (uid {st.st_uid}), who could read what is kept "
                          "there; remove it, or use another cache folder")
    # Through a descriptor that cannot follow a link swapped in since the lstat: the chmod can
    # only reach the folder just checked.
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.path.islink(path) or not os.path.isdir(path):
            raise FolderError(f"{path} was replaced while it was being checked; try again") from None
        raise
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise FolderError(f"{path} was replaced while it was being checked; try again")
        if stat.S_IMODE(now.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def make_again(folder: Path, what: str) -> bool:
    """``folder``, one of this program's (``what`` names it in the log), made again (0700) if it
    was removed while the mount runs (a cleaner, rm -rf of the cache folder); False if it is
    there. OSError (EIO, with the reason) if it cannot be made safely."""
    if folder.exists():
        return False
    try:
        private_dir(folder)
    except FolderError as exc:
        raise OSError(errno.EIO, str(exc)) from None
    log.warning("The %s folder %s had been removed; it is made again", what, folder)
    return True


class WorkDirs:
    """``root/mounts/<id>/cache`` for this mount (held by an flock while it lives) and
    ``root/spool`` shared by mounts of this user. ``root`` itself holds nothing else and is left
    as it is when it exists (see :func:`user_dir`). Raises FolderError or OSError when a folder
    cannot be used."""

    def __init__(self, root: Path) -> None:
        self.root = user_dir(root)
        self.mounts = private_dir(root / "mounts")
        self.spool = private_dir(root / "spool")
        self.failed = private_dir(self.spool / "failed")
        # A start's new folder has no mount.lock yet, or one not taken yet: another start's sweep
        # must not see it then (it would remove a live mount's cache). Sweeping and creating are
        # done holding mounts/.lock; the stale caches are removed after it is released.
        guard = _lock_mounts(self.mounts)
        try:
            stale = self._take_stale_mounts()
            self.mount_dir = private_dir(self.mounts / uuid.uuid4().hex)
            self._lock_fd = portable.open_fd(self.mount_dir / LOCK_NAME, os.O_CREAT | os.O_RDWR)
            if not portable.try_lock(self._lock_fd):
                raise RuntimeError(f"cannot lock the new cache folder {self.mount_dir}")
        finally:
            os.close(guard)
        self._remove(stale)
        self.cache = private_dir(self.mount_dir / "cache")
        self.side = private_dir(self.mount_dir / "side")

    def restore(self) -> None:
        """This mount's folders, removed while it runs (a cleaner, rm -rf), made again and locked
        again, under mounts/.lock: without its lock another start would take the new cache
        folder for a dead mount's and remove it. OSError (EIO) if they cannot be made safely."""
        try:
            self._restore()
        except FolderError as exc:
            raise OSError(errno.EIO, str(exc)) from None
        log.warning("The instance cache folder %s had been removed; it is made again", self.cache)

    def _restore(self) -> None:
        self.mounts = private_dir(self.mounts)
        guard = _lock_mounts(self.mounts)
        try:
            private_dir(self.mount_dir)
            fd = portable.open_fd(self.mount_dir / LOCK_NAME, os.O_CREAT | os.O_RDWR)
            if not portable.try_lock(fd):
                os.close(fd)
                raise OSError(errno.EBUSY, f"cannot lock the cache folder {self.mount_dir} again")
            old, self._lock_fd = self._lock_fd, fd
            try:
                os.close(old)
            except OSError:
                pass
        finally:
            os.close(guard)
        private_dir(self.cache)
        private_dir(self.side)

    def _take_stale_mounts(self) -> list[Path]:
        """Rename the cache folders of mounts whose process is gone (their lock is free) out of
        the way (``.stale-<id>``), and return them with those a start that stopped while removing
        them left, to be removed once mounts/.lock is released. Expects mounts/.lock held."""
        stale: list[Path] = []
        for child in self.mounts.iterdir():
            if child.name == MOUNTS_LOCK_NAME:
                continue
            if child.name.startswith(STALE_PREFIX):
                stale.append(child)
                continue
            lock_path = child / LOCK_NAME
            try:
                fd = portable.open_fd(lock_path, os.O_RDWR)
            except FileNotFoundError:  # a mount that stopped before it made its lock
                fd = -1
            except OSError:
                continue
            if fd >= 0:
                free = portable.try_lock(fd)
                os.close(fd)  # before the rename: Windows cannot move a folder with a file open in it
                if not free:
                    continue  # a live mount holds it
            target = self.mounts / f"{STALE_PREFIX}{uuid.uuid4().hex}"
            try:
                os.rename(child, target)
            except OSError:
                target = child  # removed where it is
            stale.append(target)
        return stale

    def _remove(self, stale: list[Path]) -> None:
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        if stale:
            log.info("Removed the instance cache of %d mount(s) that ended without cleaning up", len(stale))

    def wipe(self) -> None:
        """Remove this mount's cache (the spool stays)."""
        try:
            os.close(self._lock_fd)  # first: Windows cannot delete the lock file while it is open
        except OSError:
            pass
        shutil.rmtree(self.mount_dir, ignore_errors=True)
