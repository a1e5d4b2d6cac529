"""The FUSE adapter answers READDIRPLUS with full attributes, except for files whose size is not
known yet (their stat must reach getattr: see core.sizes), page by page with each entry's offset
(libfuse 3 sends the attributes of an entry only then)."""

from __future__ import annotations

import ctypes
import stat
import types

import pytest

mfusepy = pytest.importorskip("mfusepy")

from dicomfuse.backends.fuse import (  # noqa: E402
    _FUSE,
    FUSE_CAP_READDIRPLUS_AUTO,
    FUSE_FILL_DIR_PLUS,
    FUSE_READDIR_PLUS,
    FuseOperations,
)
from dicomfuse.core.vfs import Attr  # noqa: E402

FOLDER = "/s/1.2/1.3"


class FakeVfs:
    def __init__(self, names: int = 0) -> None:
        self.entries = [("1.4.dcm", Attr(False, 1234, 1.0)), ("1.5.dcm", Attr(False, 0, 1.0, size_known=False))]
        self.entries += [(f"1.6.{n}.dcm", Attr(False, 10, 1.0)) for n in range(names)]
        self.started = False
        self.listings = 0

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        assert path == FOLDER
        self.listings += 1
        return list(self.entries)

    def start(self) -> None:
        self.started = True


def fuse_for(vfs: FakeVfs) -> types.SimpleNamespace:
    ops = FuseOperations(vfs, uid=0, gid=0)  # type: ignore[arg-type]
    return types.SimpleNamespace(operations=ops, encoding="utf-8", errors="surrogateescape", use_ns=True)


def open_folder(fuse: types.SimpleNamespace) -> object:
    """What libfuse passes to readdir: a fuse_file_info holding opendir's handle."""
    fi = mfusepy.fuse_file_info()
    fi.fh = fuse.operations.opendir(FOLDER)
    return ctypes.pointer(fi)


def read_page(fuse: types.SimpleNamespace, fip: object, offset: int, room: int = 1000
              ) -> list[tuple[str, int | None, int, int]]:
    """One READDIRPLUS request: (name, size or mode, offset, fill flags) for each entry given,
    until ``room`` entries filled the page."""
    seen: list[tuple[str, int | None, int, int]] = []

    def filler(buf, name, st, entry_offset, fill_flags):  # type: ignore[no-untyped-def]
        if len(seen) == room:
            return 1  # full: this entry is not in the page
        seen.append((name.decode(), st.st_size if fill_flags else (st.st_mode if st is not None else None),
                     entry_offset, fill_flags))
        return 0

    assert _FUSE.readdir_fuse_3(fuse, FOLDER.encode(), None, filler, offset, fip, FUSE_READDIR_PLUS) == 0
    return seen


def read_all_pages(fuse: types.SimpleNamespace, fip: object, room: int) -> list[str]:
    """Pages until one comes back empty, as getdents does."""
    names: list[str] = []
    offset = 0
    while page := read_page(fuse, fip, offset, room):
        names += [name for name, *_ in page]
        offset = page[-1][2]
    return names


def test_readdirplus_gives_attributes_of_known_sizes_only():
    fuse = fuse_for(FakeVfs())
    seen = read_page(fuse, open_folder(fuse), 0)
    assert seen == [(".", None, 1, 0), ("..", None, 2, 0), ("1.4.dcm", 1234, 3, FUSE_FILL_DIR_PLUS),
                    ("1.5.dcm", stat.S_IFREG, 4, 0)], "unknown size: the type only, so find needs no stat"


def test_every_entry_has_its_offset_so_libfuse_passes_its_attributes():
    fuse = fuse_for(FakeVfs(names=5))
    offsets = [offset for *_, offset, _ in read_page(fuse, open_folder(fuse), 0)]
    assert offsets == list(range(1, 10))  # 0 would make libfuse drop every entry's attributes


def test_pages_continue_where_the_last_one_ended_from_one_listing():
    vfs = FakeVfs(names=10)
    fuse = fuse_for(vfs)
    names = read_all_pages(fuse, open_folder(fuse), room=3)
    assert names == [".", "..", "1.4.dcm", "1.5.dcm", *(f"1.6.{n}.dcm" for n in range(10))]
    assert vfs.listings == 1  # the last (empty) page too comes from the kept listing


def test_an_entry_removed_meanwhile_shifts_nothing_in_the_listing_being_read():
    vfs = FakeVfs(names=4)
    fuse = fuse_for(vfs)
    fip = open_folder(fuse)
    first = read_page(fuse, fip, 0, room=3)  # ".", "..", "1.4.dcm"
    del vfs.entries[0]  # 1.4.dcm removed while the listing is being read
    rest = read_page(fuse, fip, first[-1][2])
    assert [n for n, *_ in rest] == ["1.5.dcm", *(f"1.6.{n}.dcm" for n in range(4))]  # 1.5.dcm not skipped
    # rewinddir (offset 0 again) reads it afresh
    assert "1.4.dcm" not in [n for n, *_ in read_page(fuse, fip, 0)]


def test_two_handles_of_one_folder_each_keep_their_own_listing():
    vfs = FakeVfs(names=6)
    fuse = fuse_for(vfs)
    one, two = open_folder(fuse), open_folder(fuse)
    a = read_page(fuse, one, 0, room=4)
    vfs.entries.insert(0, ("1.3.dcm", Attr(False, 10, 1.0)))  # added between the two openings' pages
    b = read_page(fuse, two, 0, room=4)
    assert [n for n, *_ in b][2] == "1.3.dcm"
    fuse.operations.releasedir(FOLDER, two.contents.fh)  # the second one is closed first
    rest = read_page(fuse, one, a[-1][2])
    names = [n for n, *_ in a + rest]
    assert len(names) == len(set(names)) == 2 + 2 + 6  # nothing twice, nothing skipped
    assert "1.3.dcm" not in names  # not in the listing this handle started from


def test_a_closed_folder_leaves_nothing_kept():
    fuse = fuse_for(FakeVfs(names=3))
    fip = open_folder(fuse)
    read_all_pages(fuse, fip, room=2)
    fuse.operations.releasedir(FOLDER, fip.contents.fh)
    assert not fuse.operations._pages


def test_handles_are_distinct():
    ops = FuseOperations(FakeVfs(), uid=0, gid=0)  # type: ignore[arg-type]
    assert len({ops.opendir(FOLDER) for _ in range(100)}) == 100


def test_libfuse_3_sends_readdirplus_for_every_page():
    vfs = FakeVfs()
    ops = FuseOperations(vfs, uid=0, gid=0)  # type: ignore[arg-type]
    conn = mfusepy.fuse_conn_info()  # the struct libfuse passes, as mfusepy lays it out
    conn.want = FUSE_CAP_READDIRPLUS_AUTO | 0b1011
    if hasattr(conn, "want_ext"):
        conn.want_ext = conn.want
    ops.init_with_config(conn, object())
    assert conn.want == 0b1011  # only "auto" is dropped
    assert getattr(conn, "want_ext", 0b1011) == 0b1011
    assert vfs.started and ops.initialized


def test_libfuse_2_flags_are_left_alone():
    ops = FuseOperations(FakeVfs(), uid=0, gid=0)  # type: ignore[arg-type]
    conn = types.SimpleNamespace(want=FUSE_CAP_READDIRPLUS_AUTO)
    ops.init_with_config(conn, None)  # libfuse 2 (macFUSE): no config, other flag meanings
    assert conn.want == FUSE_CAP_READDIRPLUS_AUTO
