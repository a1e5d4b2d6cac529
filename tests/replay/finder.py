"""What macOS Finder (and the system services that follow it around) asks of a macFUSE volume,
as call sequences at the libfuse boundary, for :func:`tests.replay.fuse_boundary.replay`.

Sources (read 2026; the stored copies the team's ``search`` tool returns):

[trace]    A public ``-d`` trace of Finder browsing a macFUSE volume (README of a GitHub project
           "dfs", found by content "fuse.ENOSYS is 78 on Darwin"): getattr /, getxattr
           com.apple.FinderInfo (size 32) and com.apple.metadata:_kMDItemUserTags (size query),
           readdir, per entry getattr + getxattr FinderInfo + getxattr com.apple.ResourceFork
           (size query) + LOOKUP ``._<name>``, getxattr com.apple.LaunchServices.OpenWith, statfs,
           LOOKUP /.localized and /.DS_Store.
[gofuse410] hanwen/go-fuse#410 (macOS 11 Finder writing a file): LOOKUP name -> ENOENT,
           CREATE [CREAT,EXCL,RDWR], LOOKUP ``._name``, GETATTR.
[copyfile] Apple's copyfile.c (apple-oss-distributions/copyfile, as in darlinghq/darling
           src/copyfile/copyfile.c), the engine under Finder copies: copyfile_open opens the
           destination O_EXCL|O_CREAT|O_WRONLY and, on EEXIST, again without O_CREAT but with
           O_TRUNC; copyfile_internal then applies quarantine (qtn_file_apply_to_fd: fsetxattr
           com.apple.quarantine), COPYFILE_XATTR (copyfile_xattr: flistxattr dst, fremovexattr each
           but quarantine, then fsetxattr each source xattr), COPYFILE_DATA (copyfile_data: read
           and write in f_iosize blocks, then ftruncate(dst, totalCopied); on failure unlink(dst)),
           COPYFILE_SECURITY (fchmod) and COPYFILE_STAT (fsetattrlist times, fchown, fchmod).
           NB: extended attributes are set BEFORE the data, not after as often described.
[brok]     Stack Overflow 444561 (answer citing Apple's File Manager notes): while Finder copies a
           file the copy has HFS type 'brok' and creator 'MACS' in com.apple.FinderInfo, and a
           ``._`` companion holding that xattr on file systems without native xattrs.
[placeholder] rschroll/rmfuse#2 (macOS Finder copy to a FUSE volume: "Created ... Releasing
           inode" before any write; the file system's check of the content at release failed and
           Finder reported -43) and kahing/goofys#92 (Finder "will first create a 0-byte
           placeholder at the path it intends to write to, unlink it, and then actually write").
[noappledouble] macFUSE wiki "Mount Options" (same text as fuse4x.github.io/options.html):
           noappledouble denies ._ and .DS_Store files (the kext answers EPERM to their creation,
           ENOENT to lookups); macfuse/macfuse#1162: the FSKit backend of macFUSE 5 does not
           implement it; macos-fuse-t/fuse-t#81: fuse-t creates ._ files regardless. So ._ names
           do reach file systems on current Macs.
[xnu-ad]   When a volume does not keep an xattr natively, xnu keeps it in ``._name`` (AppleDouble,
           RFC 1740; layout in copyfile.c "Typical ._ AppleDouble Header File layout") and removes
           that companion when ``name`` is unlinked: hanwen/go-fuse#368 shows UNLINK foo then
           LOOKUP ._foo.
[trash]    macfuse/macfuse#246: without a .Trashes folder on a FUSE volume Finder says the item
           "will be deleted immediately" (and deletes it); hanwen/go-fuse#183: .Trashes must be
           created 0333 root:wheel for the Trash to work. We never let it be created.
[spotlight] macfuse/macfuse#139 (the system creates .Spotlight-V100 and .Trashes on a mount),
           macfuse#328 and pachyderm/pachyderm#611 (repeated lookups of .metadata_never_index and
           .metadata_never_index_unless_rootfs; the latter logged them as ERROR: the thing to
           avoid), bazil/fuse#40 (LOOKUP /.fseventsd right after mount), macfuse#408 (Spotlight
           does not index nonlocal volumes, so these stay probes).
[volicon]  fuse4x options "volicon": Finder reads /.VolumeIcon.icns and the root's FinderInfo for
           a volume icon.
[dsstore]  fuse-t#59: Finder writes .DS_Store on FUSE volumes unless DSDontWriteNetworkStores;
           format: 00 00 00 01 'Bud1' buddy-allocator header (metacpan Mac-Finder-DSStore
           DSStoreFormat.pod; formats.kaitai.io/ds_store).
[replace]  Not documented by Apple for volumes without RENAME_SWAP. macFUSE declares
           VOL_CAP_INT_RENAME_SWAP only when the file system implements ``renamex`` (mfusepy does
           not) and no longer supports exchangedata from macOS 11 (macfuse/macfuse#1027), so no
           atomic swap is possible. Two fallbacks are replayed: [copyfile]'s documented reopen
           with O_TRUNC, and "delete the old item, then copy" (reported behaviour, unverified).
[newfolder] Finder's "New Folder" makes "untitled folder" (then "untitled folder 2", ...) and
           puts its name in edit mode; the user's name arrives as rename().

Where macFUSE and libfuse 3 differ, the Linux libfuse 3 form is replayed (this is where the
tests run): an O_TRUNC open arrives with O_TRUNC in the open flags (FUSE_CAP_ATOMIC_O_TRUNC is on
by default, libfuse lib/fuse_lowlevel.c do_init), readdir has flags, rename has flags. The
non-atomic form (open, then truncate with the file handle) is replayed too.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Sequence

from tests.replay.fuse_boundary import (
    ENOATTR,
    LIST_XATTRS,
    OK,
    READ_TO_EOF,
    READ_XATTR,
    WRITE_ALL,
    Caller,
    Data,
    Size,
    Step,
)

FINDER = Caller("Finder", 401)
MDS = Caller("mds", 88)            # Spotlight's metadata server
FSEVENTSD = Caller("fseventsd", 60)
DESKTOPSERVICES = Caller("DesktopServicesHelper", 402)  # Finder's copy helper

MiB = 1 << 20
WRITE_CHUNK = 64 << 10  # hanwen/go-fuse#368: on macOS the copy's writes arrive as 64 KiB requests
FINDER_INFO = "com.apple.FinderInfo"
RESOURCE_FORK = "com.apple.ResourceFork"
QUARANTINE = "com.apple.quarantine"
USER_TAGS = "com.apple.metadata:_kMDItemUserTags"
OPEN_WITH = "com.apple.LaunchServices.OpenWith"
WHERE_FROMS = "com.apple.metadata:kMDItemWhereFroms"

# [brok]: type 'brok', creator 'MACS', then 24 bytes of flags; cleared when the copy ends.
FINDER_INFO_BUSY = b"brokMACS" + bytes(24)
FINDER_INFO_PLAIN = bytes(32)
# A quarantine value as Safari writes it: flags;hex time;agent;UUID.
QUARANTINE_VALUE = b"0083;6650a1b2;Safari;F3C1B7A2-1E2D-4C3B-9A8F-0123456789AB"
WHERE_FROMS_VALUE = b"bplist00\xa1\x01_\x10\x1ahttps://pacs.example/wado\x08\x0a\x00\x00\x00\x00\x00\x00\x01\x01"
CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_RDWR  # [gofuse410]
FILE_MODE = stat.S_IFREG | 0o644
TRASH_MODE = 0o1333  # [trash]
TIMES_NS = (1_700_000_000 * 10**9, 1_700_000_000 * 10**9)


def apple_double(finder_info: bytes = FINDER_INFO_BUSY) -> bytes:
    """A 4096-byte ``._`` file as xnu writes it: AppleDouble header (magic 0x00051607, version 2,
    "Mac OS X" filler), a FinderInfo entry holding the 32-byte FinderInfo and an empty xattr header
    ('ATTR'), then an empty resource fork ([xnu-ad], copyfile.c layout)."""
    header = struct.pack(">II16sH", 0x00051607, 0x00020000, b"Mac OS X        ", 2)
    entries = struct.pack(">III", 9, 50, 3698) + struct.pack(">III", 2, 3748, 286)
    attr_header = struct.pack(">4sIIIIIIIHH", b"ATTR", 0, 3748, 120, 0, 0, 0, 0, 0, 0)
    body = header + entries + finder_info + b"\0\0" + attr_header
    fork = bytes(256) + bytes(30)
    fork = fork[:16] + b"This resource fork intentionally left blank   " + fork[16 + 46:]
    return body + bytes(3748 - len(body)) + fork + bytes(4096 - 3748 - 286)


def ds_store() -> bytes:
    """A fresh .DS_Store: the 'Bud1' buddy-allocator header and zeros ([dsstore]), 6148 bytes."""
    head = b"\x00\x00\x00\x01Bud1" + struct.pack(">III", 0x1000, 0x800, 0x1000)
    return head + bytes(6148 - len(head))


# =============================================================================================
# Browse


def browse_folder(folder: str, entries: Sequence[str], *, files: Sequence[str] = ()) -> list[Step]:
    """Finder opens ``folder`` (a path template) in a window: [trace]. ``entries`` are the names
    the folder lists; ``files`` those of them that are files (they get the OpenWith probe)."""
    base = folder.rstrip("/")
    steps = [
        Step("getattr", folder, why="[trace] getattr of the folder"),
        Step("getxattr", folder, (FINDER_INFO, 32), ok=(ENOATTR,), why="[trace] folder FinderInfo"),
        Step("getxattr", folder, (USER_TAGS,), ok=(ENOATTR,), why="[trace] tags, size query"),
        Step("readdir", folder, why="[trace] opendir/readdir"),
    ]
    for name in entries:
        path = f"{base}/{name}"
        steps += [
            Step("getattr", path, why="[trace] getattr of each entry"),
            Step("getxattr", path, (FINDER_INFO, 32), ok=(ENOATTR,), why="[trace] entry FinderInfo"),
            Step("getxattr", path, (RESOURCE_FORK,), ok=(ENOATTR,), why="[trace] resource fork, size query"),
            Step("getattr", f"{base}/._{name}", ok=(errno.ENOENT,), why="[trace] AppleDouble companion probe"),
        ]
    for name in files:
        steps.append(Step("getxattr", f"{base}/{name}", (OPEN_WITH,), ok=(ENOATTR,), why="[trace] OpenWith"))
    steps += [
        Step("statfs", "/", why="[trace] volume free space"),
        Step("getattr", f"{base}/.localized", ok=(errno.ENOENT,), why="[trace] localized folder name"),
        Step("getattr", f"{base}/.DS_Store", ok=(errno.ENOENT,), why="[trace] view settings"),
    ]
    return steps


def write_ds_store(folder: str) -> list[Step]:
    """Finder saves the window's view settings in ``folder/.DS_Store`` ([dsstore]), then updates
    them in place (open read-write, read, rewrite, truncate)."""
    path = f"{folder.rstrip('/')}/.DS_Store"
    return [
        Step("getattr", path, ok=(errno.ENOENT,), why="[trace] probe before writing"),
        Step("create", path, (FILE_MODE, os.O_CREAT | os.O_RDWR), handle="ds", why="[dsstore]"),
        Step(WRITE_ALL, path, (Data(".DS_Store"), 4096), handle="ds", why="[dsstore]"),
        Step("fsync", path, handle="ds", why="[dsstore] DesktopServices syncs the store"),
        Step("flush", path, handle="ds"),
        Step("release", path, handle="ds"),
        Step("getattr", path, why="[dsstore] the store is there now"),
        Step("open", path, (os.O_RDWR,), handle="ds2", why="[dsstore] later update in place"),
        Step(READ_TO_EOF, path, (4096,), handle="ds2"),
        Step(WRITE_ALL, path, (Data(".DS_Store"), 4096), handle="ds2"),
        Step("truncate", path, (6148,), handle="ds2"),
        Step("flush", path, handle="ds2"),
        Step("release", path, handle="ds2"),
    ]


def volume_probes() -> list[Step]:
    """What the system asks of a fresh volume by itself: Spotlight, fseventsd, the volume icon,
    the Trash ([spotlight], [volicon], [trash]). The refusals must be quiet (no ERROR line)."""
    return [
        Step("getattr", "/", caller=MDS, why="[spotlight]"),
        Step("getattr", "/.metadata_never_index", ok=(errno.ENOENT,), caller=MDS, why="[spotlight] #611, #328"),
        Step("getattr", "/.metadata_never_index_unless_rootfs", ok=(errno.ENOENT,), caller=MDS,
             why="[spotlight] #611, #328"),
        Step("getattr", "/.Spotlight-V100", ok=(errno.ENOENT,), caller=MDS, why="[spotlight] #139"),
        Step("mkdir", "/.Spotlight-V100", (0o700,), ok=(errno.EPERM,), caller=MDS,
             why="[spotlight] #139: the index folder is never created here"),
        Step("getattr", "/.fseventsd", ok=(errno.ENOENT,), caller=FSEVENTSD, why="[spotlight] bazil/fuse#40"),
        Step("mkdir", "/.fseventsd", (0o700,), ok=(errno.EPERM,), caller=FSEVENTSD,
             why="fseventsd keeps its log on local volumes only; refused quietly here"),
        Step("getattr", "/.VolumeIcon.icns", ok=(errno.ENOENT,), why="[volicon]"),
        Step("getattr", "/._.", ok=(errno.ENOENT,), why="[volicon] the root's AppleDouble companion"),
        Step("getxattr", "/", (FINDER_INFO, 32), ok=(ENOATTR,), why="[trace] [volicon] root FinderInfo"),
        Step("getattr", "/.Trashes", ok=(errno.ENOENT,), why="[trash]"),
        Step("getattr", "/.localized", ok=(errno.ENOENT,), why="[trace]"),
        Step("getattr", "/.DS_Store", ok=(errno.ENOENT,), why="[trace]"),
        Step("statfs", "/", why="[trace]"),
    ]


# =============================================================================================
# Copy out of the mount (Finder drags an instance to the Desktop)


def copy_out(path: str, chunk: int = MiB) -> list[Step]:
    """copyfile(src on the mount, dst on the local disk), source side only ([copyfile]):
    stat, open read-only, quarantine and xattr reads (none present: ENOATTR), data read to EOF."""
    return [
        Step("getattr", path, why="[copyfile] statx_np of the source"),
        Step("open", path, (os.O_RDONLY,), handle="src", why="[copyfile] copyfile_open"),
        Step(READ_XATTR, path, (QUARANTINE,), ok=(ENOATTR,), why="[copyfile] copyfile_quarantine"),
        Step(LIST_XATTRS, path, why="[copyfile] copyfile_xattr: flistxattr(src)"),
        Step("getxattr", path, (FINDER_INFO, 32), ok=(ENOATTR,), why="[trace] Finder reads FinderInfo"),
        Step("getxattr", path, (RESOURCE_FORK,), ok=(ENOATTR,), why="[trace]"),
        Step("statfs", path, why="[copyfile] copyfile_data: fstatfs(src) for f_iosize"),
        Step("getattr", path, handle="src", why="fstat on the open file"),
        Step(READ_TO_EOF, path, (chunk,), handle="src", why="[copyfile] copyfile_data read loop"),
        Step("release", path, handle="src", why="close"),
    ]


# =============================================================================================
# Drag a file into the mount


def _companion(folder: str, name: str) -> list[Step]:
    """xnu keeps Finder's busy FinderInfo in ``._name`` when noappledouble is not in effect
    ([noappledouble], [xnu-ad], [brok])."""
    ad = f"{folder}/._{name}"
    return [
        Step("create", ad, (FILE_MODE, os.O_CREAT | os.O_RDWR), handle="ad", why="[xnu-ad] [brok]"),
        Step(WRITE_ALL, ad, (Data("._"), 4096), handle="ad", why="[xnu-ad] AppleDouble header"),
        Step("flush", ad, handle="ad"),
        Step("release", ad, handle="ad"),
        Step("getattr", ad, why="the companion is visible in its folder"),
    ]


def drag_in(folder: str, name: str, *, companion: bool = True, placeholder: bool = False,
            chunk: int = WRITE_CHUNK, data: str = "file") -> list[Step]:
    """Finder copies a local file into ``folder`` under ``name`` ([gofuse410], [copyfile],
    [brok]; [placeholder] first if asked). The upload happens at the flush of close()."""
    path = f"{folder}/{name}"
    steps = [
        Step("getattr", folder, why="[gofuse410] the destination folder"),
        Step("getattr", path, ok=(errno.ENOENT,), why="[gofuse410] LOOKUP name -> ENOENT"),
        Step("access", folder, (os.W_OK,), why="[gofuse410] ACCESS {w} on the folder"),
        Step("statfs", folder, why="Finder checks free space first (netheril96/securefs#22)"),
    ]
    if placeholder:
        steps += [
            Step("create", path, (FILE_MODE, CREATE_FLAGS), handle="ph", why="[placeholder] 0-byte placeholder"),
            Step("flush", path, handle="ph", why="[placeholder] closed before any write"),
            Step("release", path, handle="ph", why="[placeholder]"),
            Step("getattr", path, why="[placeholder] it exists, empty"),
            Step("unlink", path, why="[placeholder] goofys#92: unlinked before the real copy"),
        ]
    steps += [
        Step("create", path, (FILE_MODE, CREATE_FLAGS), handle="dst", why="[gofuse410] [copyfile] copyfile_open"),
        Step("getattr", f"{folder}/._{name}", ok=(errno.ENOENT,), why="[gofuse410] LOOKUP ._name"),
        Step("getattr", path, handle="dst", why="[gofuse410] GETATTR of the new file"),
        Step("setxattr", path, (FINDER_INFO, FINDER_INFO_BUSY), why="[brok] busy while copying"),
    ]
    if companion:
        steps += _companion(folder, name)
    steps += [
        Step("setxattr", path, (QUARANTINE, QUARANTINE_VALUE), why="[copyfile] qtn_file_apply_to_fd"),
        Step(LIST_XATTRS, path, why="[copyfile] copyfile_xattr: flistxattr(dst)"),
        Step("removexattr", path, (FINDER_INFO,), why="[copyfile] copyfile_xattr removes dst xattrs but quarantine"),
        Step("setxattr", path, (WHERE_FROMS, WHERE_FROMS_VALUE), why="[copyfile] the source's own xattrs"),
        Step("statfs", path, why="[copyfile] fstatfs(dst)"),
        Step(WRITE_ALL, path, (Data(data), chunk), handle="dst", why="[copyfile] copyfile_data write loop"),
        Step("truncate", path, (Size(data),), handle="dst", why="[copyfile] ftruncate(dst, totalCopied)"),
        Step("chmod", path, (FILE_MODE,), handle="dst", why="[copyfile] copyfile_security fchmod"),
        Step("utimens", path, (TIMES_NS,), handle="dst", why="[copyfile] copyfile_stat fsetattrlist"),
        Step("chown", path, (501, 20), handle="dst", why="[copyfile] copyfile_stat fchown"),
        Step("chmod", path, (FILE_MODE,), handle="dst", why="[copyfile] copyfile_stat fchmod"),
        Step("setxattr", path, (FINDER_INFO, FINDER_INFO_PLAIN), why="[brok] copy done: not busy any more"),
        Step("flush", path, handle="dst", why="close(): the upload"),
        Step("release", path, handle="dst", why="close()"),
        Step("getattr", path, why="Finder refreshes the new item"),
        Step(READ_XATTR, path, (QUARANTINE,), why="the quarantine stays readable (kept in memory)"),
    ]
    return steps


# =============================================================================================
# Replace an existing instance


def replace_by_truncate(folder: str, name: str, *, atomic_o_trunc: bool = True, chunk: int = WRITE_CHUNK,
                        data: str = "file") -> list[Step]:
    """[replace] fallback 1, documented: copyfile_open's O_EXCL create fails with EEXIST in the
    kernel (the name is known: no CREATE reaches the file system), and copyfile reopens with
    O_TRUNC. With libfuse 3's atomic O_TRUNC the flag is in the open; without it (macFUSE's VFS,
    or a kernel that did not negotiate it) the open comes plain, then a truncate to 0."""
    path = f"{folder}/{name}"
    if atomic_o_trunc:
        opening = [Step("open", path, (os.O_WRONLY | os.O_TRUNC,), handle="dst", why="[copyfile] EEXIST -> O_TRUNC")]
    else:
        opening = [
            Step("open", path, (os.O_WRONLY,), handle="dst", why="[copyfile] reopen, O_TRUNC done by the VFS"),
            Step("truncate", path, (0,), handle="dst", why="O_TRUNC as a setattr(size 0) with the handle"),
        ]
    return [
        Step("getattr", folder, why="[gofuse410]"),
        Step("getattr", path, why="the name exists: Finder asks Replace / Keep both / Stop"),
        *opening,
        Step("getattr", f"{folder}/._{name}", ok=(errno.ENOENT,), why="[gofuse410]"),
        Step("setxattr", path, (FINDER_INFO, FINDER_INFO_BUSY), why="[brok]"),
        Step("setxattr", path, (QUARANTINE, QUARANTINE_VALUE), why="[copyfile]"),
        Step(LIST_XATTRS, path, why="[copyfile]"),
        Step("removexattr", path, (FINDER_INFO,), why="[copyfile]"),
        Step(WRITE_ALL, path, (Data(data), chunk), handle="dst", why="[copyfile]"),
        Step("truncate", path, (Size(data),), handle="dst", why="[copyfile] ftruncate"),
        Step("chmod", path, (FILE_MODE,), handle="dst", why="[copyfile]"),
        Step("utimens", path, (TIMES_NS,), handle="dst", why="[copyfile]"),
        Step("setxattr", path, (FINDER_INFO, FINDER_INFO_PLAIN), why="[brok]"),
        Step("flush", path, handle="dst", why="close(): the overwrite"),
        Step("release", path, handle="dst"),
        Step("getattr", path, why="Finder refreshes the item"),
    ]


def replace_by_delete(folder: str, name: str, *, companion: bool = True, chunk: int = WRITE_CHUNK,
                      data: str = "file") -> list[Step]:
    """[replace] fallback 2, reported not documented: the old item is deleted (with its AppleDouble
    companion, [xnu-ad]), then the new one is copied in as by :func:`drag_in`."""
    path = f"{folder}/{name}"
    return [
        Step("getattr", path, why="the name exists: Finder asks Replace / Keep both / Stop"),
        Step("unlink", path, why="[replace] the old item goes first"),
        Step("getattr", f"{folder}/._{name}", ok=(errno.ENOENT,), why="[xnu-ad] companion lookup"),
        *drag_in(folder, name, companion=companion, chunk=chunk, data=data),
    ]


# =============================================================================================
# Delete


def delete(folder: str, name: str) -> list[Step]:
    """Move to Trash on a volume without a Trash ([trash]): Finder looks for /.Trashes, the attempt
    to make one is refused (quietly), Finder asks "delete immediately?", then unlinks; xnu removes
    the AppleDouble companion too ([xnu-ad])."""
    path = f"{folder}/{name}"
    return [
        Step("getattr", path, why="the selected item"),
        Step("getattr", "/.Trashes", ok=(errno.ENOENT,), why="[trash] no Trash on this volume"),
        Step("mkdir", "/.Trashes", (TRASH_MODE,), ok=(errno.EPERM,), why="[trash] never created here"),
        Step("getattr", "/.Trashes", ok=(errno.ENOENT,), why="[trash] -> 'will be deleted immediately'"),
        Step("unlink", path, why="the user confirmed"),
        Step("getattr", f"{folder}/._{name}", ok=(OK, errno.ENOENT), why="[xnu-ad] companion lookup"),
        Step("unlink", f"{folder}/._{name}", ok=(OK, errno.ENOENT), why="[xnu-ad] companion removed if any"),
        Step("getattr", path, ok=(errno.ENOENT,), why="gone from its folder at once"),
        Step("readdir", folder, why="Finder refreshes the window"),
    ]


def delete_folder(parent: str, name: str, contents: Sequence[str] = ()) -> list[Step]:
    """Move a folder to the Trash on a volume without one ([trash]): the same refused Trash, then
    Finder empties the folder (``contents``) and removes it."""
    path = f"{parent.rstrip('/')}/{name}"
    return [
        Step("getattr", path, why="the selected folder"),
        Step("getattr", "/.Trashes", ok=(errno.ENOENT,), why="[trash]"),
        Step("mkdir", "/.Trashes", (TRASH_MODE,), ok=(errno.EPERM,), why="[trash] never created here"),
        Step("readdir", path, why="Finder deletes the contents first"),
        *[Step("unlink", f"{path}/{entry}", why="contents") for entry in contents],
        Step("rmdir", path, why="the user confirmed 'delete immediately'"),
        Step("getattr", path, ok=(errno.ENOENT,), why="gone at once"),
    ]


# =============================================================================================
# New folder


def new_folder(parent: str, name: str = "untitled folder") -> list[Step]:
    """File > New Folder in ``parent`` ([newfolder])."""
    path = f"{parent.rstrip('/')}/{name}"
    return [
        Step("getattr", path, ok=(errno.ENOENT,), why="[newfolder] first free default name"),
        Step("mkdir", path, (0o755,), why="[newfolder]"),
        Step("getattr", path, why="[newfolder] the new folder"),
        Step("getxattr", path, (FINDER_INFO, 32), ok=(ENOATTR,), why="[trace]"),
        Step("readdir", parent, why="the window shows it"),
    ]


def rename_new_folder(parent: str, old: str, new: str, *, ok: tuple[int, ...] | str = (OK,)) -> list[Step]:
    """The user types the name over "untitled folder" ([newfolder])."""
    base = parent.rstrip("/")
    return [
        Step("getattr", f"{base}/{new}", ok=(errno.ENOENT,), why="[newfolder] Finder checks the name is free"),
        Step("rename", f"{base}/{old}", (f"{base}/{new}", 0), ok=ok, why="[newfolder] the typed name"),
    ]
