"""Mount options per OS, and the merge of ``--extraMountOptions`` over them."""

from __future__ import annotations

import logging
import re
import sys

log = logging.getLogger(__name__)

MountOptions = dict[str, "str | bool"]


def default_options(platform: str = sys.platform, volume_name: str = "DICOMFuse",
                    sizes_listed: bool = True) -> MountOptions:
    """Defaults that make the mount behave for the tools of each OS.

    Attribute and entry timeouts are small but not zero; ``hard_remove`` stops libfuse renaming
    open deleted files to ``.fuse_hidden*``. When listings give no sizes (``sizes_listed``
    False), the kernel keeps no attributes (``attr_timeout=0``) on Linux and macOS: a size 0
    shown to ``ls -l`` would otherwise be what ``tar`` sees for a second after, and tar archives
    exactly the size it saw: every stat has to reach the core, which gives tar the true size."""
    common: MountOptions = {
        "fsname": "dicomfuse",
        "attr_timeout": "1" if sizes_listed or platform == "win32" else "0",
        "entry_timeout": "1",
        "negative_timeout": "1",
        "hard_remove": True,
    }
    if platform.startswith("linux"):
        # max_idle_threads: libfuse 3.12-3.15 print "Ignoring invalid max threads value 4294967295"
        # at every mount when it is left at its default; 10 is the default libfuse had before.
        return {**common, "subtype": "dicomfuse", "max_idle_threads": "10"}
    if platform == "darwin":
        return {
            **common,
            "volname": volume_name,
            "noappledouble": True,   # Finder's ._* files are not written at all
            "defer_permissions": True,
            "nolocalcaches": True,   # sizes learnt on first read show up in Finder
            # No noapplexattr: with it macFUSE answers EPERM to every com.apple.* xattr before the
            # core sees it, and Finder's copy (copyfile) gives up before copying any data.
        }
    if platform == "win32":  # WinFsp's FUSE layer (Python >= 3.12; winfspy serves older ones)
        # uid/gid -1: files belong to the user who mounted (WinFsp maps the token's SID); else they
        # belong to uid 0 (S-1-5-0) and WinFsp refuses every create, write and delete by itself.
        return {**common, "uid": "-1", "gid": "-1", "volname": volume_name}
    return common


_DASH_O = re.compile(r"(?:^|\s)-o\s*")


def parse_extra(value: str | list[str] | None) -> MountOptions:
    """``allow_other,max_read=131072`` → {"allow_other": True, "max_read": "131072"}. Also as a
    libfuse user types them (``-o allow_other``, several ``-o``), and the original tool's printed
    default ``[]`` (a list: ``[allow_other, x=1]``)."""
    items: list[str] = []
    for part in [value] if isinstance(value, str) else (value or []):
        part = part.strip()
        if part.startswith("[") and part.endswith("]"):
            part = part[1:-1]
        # "-o a -o b=1": each -o starts an option; a value may hold spaces (volname=My Data)
        items.extend(x.strip() for x in _DASH_O.sub(",", part).split(","))
    options: MountOptions = {}
    for item in filter(None, items):
        key, sep, val = item.partition("=")
        options[key.strip()] = val.strip() if sep else True
    return options


def merge(defaults: MountOptions, extra: MountOptions) -> MountOptions:
    merged = {**defaults, **extra}
    if "allow_other" in extra:
        log.warning("allow_other is set: every user of this computer can read the mounted patient data")
    return merged
