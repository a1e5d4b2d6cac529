"""What is allowed where: ONE table, operation × level → allowed, or the errno of the refusal.

The rows mirror ../SEMANTICS.md (and the README's operations table); ``tests/unit/test_policy.py``
reads both so they cannot drift apart. Cells that depend on the mount's settings or the
server's capabilities name the condition; the Vfs evaluates it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum

from dicomfuse.core.errors import FsError
from dicomfuse.core.paths import Level


class Op(str, Enum):
    LIST = "list"
    LOOKUP = "lookup"
    MKDIR = "mkdir"
    RMDIR = "rmdir"
    RENAME = "rename"
    UPLOAD = "upload"          # create + write + close of a new file in this folder
    OVERWRITE = "overwrite"    # open an existing file for writing
    READ = "read"
    UNLINK = "unlink"
    SETATTR = "setattr"        # chmod, chown, utimens
    TRUNCATE = "truncate"      # outside an overwrite
    LINK = "link"              # ln, ln -s, mknod
    XATTR = "xattr"


class Rule(str, Enum):
    ALLOW = "allow"
    IF_DELETION = "allowed when --enableDeletion is true, else EPERM"


@dataclass(frozen=True)
class Deny:
    errno: int

    def __str__(self) -> str:
        return errno.errorcode[self.errno]


EPERM, ENOTDIR, EISDIR, ENOENT = Deny(errno.EPERM), Deny(errno.ENOTDIR), Deny(errno.EISDIR), Deny(errno.ENOENT)
A, D = Rule.ALLOW, Rule.IF_DELETION

# Columns: the level of the path the operation names. For MKDIR/UPLOAD that is the new entry's
# path (mkdir /newstore is a STORE-level mkdir; a file copied into a store folder is an
# upload at STUDY level, into a series folder at INSTANCE level).
#                    ROOT     STORE    STUDY    SERIES   INSTANCE
TABLE: dict[Op, tuple[Rule | Deny, ...]] = {
    Op.LIST:      (A,       A,       A,       A,       ENOTDIR),
    Op.LOOKUP:    (A,       A,       A,       A,       A),
    Op.MKDIR:     (EPERM,   A,       EPERM,   EPERM,   EPERM),
    Op.RMDIR:     (EPERM,   D,       EPERM,   EPERM,   ENOTDIR),
    Op.RENAME:    (EPERM,   D,       EPERM,   EPERM,   EPERM),  # a store's: create new, delete old
    Op.UPLOAD:    (EPERM,   EPERM,   A,       EPERM,   A),
    Op.OVERWRITE: (EISDIR,  EISDIR,  EISDIR,  EISDIR,  A),
    Op.READ:      (EISDIR,  EISDIR,  EISDIR,  EISDIR,  A),
    Op.UNLINK:    (EPERM,   EISDIR,  EISDIR,  EISDIR,  D),
    Op.SETATTR:   (A,       A,       A,       A,       A),
    Op.TRUNCATE:  (EISDIR,  EISDIR,  EISDIR,  EISDIR,  EPERM),
    Op.LINK:      (EPERM,   EPERM,   EPERM,   EPERM,   EPERM),
    Op.XATTR:     (A,       A,       A,       A,       A),
}


class OperationPolicy:
    """Looks up the table and applies the mount's settings to conditional cells."""

    def __init__(self, *, deletion_enabled: bool) -> None:
        self.deletion_enabled = deletion_enabled

    @staticmethod
    def rule(op: Op, level: Level) -> Rule | Deny:
        return TABLE[op][level]

    def check(self, op: Op, level: Level, what: str) -> None:
        """Return if ``op`` is allowed at ``level``; else raise FsError with the table's errno.
        ``what`` names the path for the log line."""
        rule = self.rule(op, level)
        if isinstance(rule, Deny):
            raise FsError(rule.errno, f"{op.value} not allowed at {level.name.lower()} level: {what}")
        if rule is Rule.IF_DELETION and not self.deletion_enabled:
            raise FsError(errno.EPERM, f"{op.value} refused, deletion is disabled: {what}")
