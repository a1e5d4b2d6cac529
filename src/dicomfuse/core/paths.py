"""The path model: "/store/study/series/<SOPInstanceUID>.dcm" to a level and its UIDs.

Folder and file names are DICOM UIDs, so a path is a stable address. Names the OS, Finder,
Explorer or an editor make on their own ("side files") are recognised here, once.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import IntEnum

from dicomfuse.core.privacy import HIDDEN
from dicomfuse.dicomfile import is_uid
from dicomfuse.stores.base import is_valid_store_id as is_valid_store_id  # the one store ID rule

INSTANCE_SUFFIX = ".dcm"

# Exact names (case-insensitive) and name patterns that are never DICOM data.
_SIDE_NAMES = {
    ".ds_store", "desktop.ini", "thumbs.db", "ehthumbs.db", "autorun.inf", "$recycle.bin",
    "system volume information", ".spotlight-v100", ".fseventsd", ".temporaryitems", ".trashes",
    ".apdisk", ".volumeicon.icns", ".localized", ".metadata_never_index", ".hidden", ".directory",
    ".xdg-volume-info", ".nfs", "icon\r", ".documentrevisions-v100", ".metadata_never_index_unless_rootfs",
    ".metadata_direct_scope_only", ".ql_disablethumbnails", ".ql_disablecache", "folder.jpg", "folder.gif",
}
_SIDE_PATTERNS = (
    re.compile(r"^\._"),                 # AppleDouble
    re.compile(r"^\.trash", re.I),       # .Trash, .Trash-1000
    re.compile(r"^~\$"),                 # Office lock files
    re.compile(r"^\.~lock\..*#$"),       # LibreOffice lock files
    re.compile(r"\.sw[a-p]$"),           # vim swap files
    re.compile(r"^\..*\.sw[a-p]x?$"),
    re.compile(r"~$"),                   # editor backups
    re.compile(r"^#.*#$"),               # emacs autosave
    re.compile(r"^\.goutputstream-"),    # GNOME
    re.compile(r"^\.fuse_hidden"),
    re.compile(r"^albumart.*\.jpg$", re.I),  # Windows Media Player's folder art
)
# Folder names a GUI gives a new folder before the user renames it.
_GUI_FOLDER_RE = re.compile(r"^(untitled folder|new folder)( \(?\d+\)?)?$", re.I)


class Level(IntEnum):
    ROOT = 0
    STORE = 1
    STUDY = 2
    SERIES = 3
    INSTANCE = 4


# rsync writes each file to ".<name>.XXXXXX" (one dot only for a name that has one) first.
_RSYNC_TEMP = re.compile(r"^\.(.+)\.[A-Za-z0-9]{6}$")


def is_side_file(name: str) -> bool:
    """A name the OS or an editor makes by itself: kept local, never sent to the server. Also
    rsync's temporary name for one (``.DS_Store.aCXX1x``, ``.Thumbs.db.0dhbsO``), which it
    renames to the side file's name once written."""
    low = name.lower()
    if low in _SIDE_NAMES or any(p.search(name) for p in _SIDE_PATTERNS):
        return True
    temp = _RSYNC_TEMP.match(name)
    return temp is not None and (is_side_file(temp.group(1)) or is_side_file("." + temp.group(1)))


def is_gui_folder_name(name: str) -> bool:
    """"untitled folder" (Finder), "New folder" (Explorer) and their numbered variants."""
    return bool(_GUI_FOLDER_RE.match(name))


def instance_uid(name: str) -> str | None:
    """The SOPInstanceUID a file name stands for ("<uid>.dcm", any case), else None."""
    if name.lower().endswith(INSTANCE_SUFFIX):
        stem = name[: -len(INSTANCE_SUFFIX)]
        if is_uid(stem):
            return stem
    return None


def instance_name(sop_uid: str) -> str:
    return sop_uid + INSTANCE_SUFFIX


@functools.lru_cache(maxsize=4096)
def _may_be_a_persons(name: str, top: bool) -> bool:
    """Whether ``name`` may be a patient's, so kept out of log lines (``core.privacy``): a name
    below a store that is no UID, and a file's at the top (store names are the dataset's, or the
    user's new store's, and stay visible); never Finder's or Explorer's default folder names.
    Cached: every path the kernel asks about is parsed, and its names are mostly the same UIDs."""
    if is_gui_folder_name(name):
        return False
    if top:
        return not is_valid_store_id(name) or name.lower().endswith(INSTANCE_SUFFIX)
    return not is_uid(name) and instance_uid(name) is None


@dataclass(frozen=True)
class DicomPath:
    """A parsed mount path. ``parts`` are the components below the root."""

    parts: tuple[str, ...]

    @classmethod
    def parse(cls, path: str) -> DicomPath:
        """``<uid>.DCM`` (any case of the suffix) names the same file as ``<uid>.dcm``: Windows
        looks names up case-insensitively, and a listing shows each instance once."""
        parts = tuple(p for p in path.split("/") if p not in ("", "."))
        if len(parts) == Level.INSTANCE and not parts[3].endswith(INSTANCE_SUFFIX):
            uid = instance_uid(parts[3])
            if uid is not None:
                parts = (*parts[:3], instance_name(uid))
        for index, part in enumerate(parts):
            if _may_be_a_persons(part, index == 0):
                HIDDEN.hide(part)
        return cls(parts)

    @property
    def level(self) -> Level:
        """The level of the thing this path names (deeper than an instance: too deep)."""
        return Level(min(len(self.parts), Level.INSTANCE))

    @property
    def too_deep(self) -> bool:
        return len(self.parts) > Level.INSTANCE

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else ""

    @property
    def parent(self) -> DicomPath:
        return DicomPath(self.parts[:-1])

    def child(self, name: str) -> DicomPath:
        return DicomPath((*self.parts, name))

    @property
    def store(self) -> str:
        return self.parts[0]

    @property
    def study(self) -> str:
        return self.parts[1]

    @property
    def series(self) -> str:
        return self.parts[2]

    @property
    def is_side_file(self) -> bool:
        return bool(self.parts) and is_side_file(self.name)

    @property
    def names_remote_object(self) -> bool:
        """Whether every component below the store is a well-formed UID (so it can exist on the
        server); a junk name is answered ENOENT without asking anyone."""
        if self.too_deep:
            return False
        n = len(self.parts)
        if n >= 2 and not is_uid(self.parts[1]):
            return False
        if n >= 3 and not is_uid(self.parts[2]):
            return False
        return n < 4 or instance_uid(self.parts[3]) is not None

    def __str__(self) -> str:
        return "/" + "/".join(self.parts)
