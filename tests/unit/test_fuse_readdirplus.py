"""The FUSE adapter answers READDIRPLUS with full attributes, except for files whose size is not
known yet (their stat must reach getattr: see core.sizes), page by page with each entry's offset
(libfuse 3 sends the attributes of an entry only then)."""

from __future__ import annotations

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

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        assert path == FOLDER
        return list(self.entries)

    def start(self) -> None:
        self.started = True


def fuse_for(vfs: FakeVfs) -> types.SimpleNamespace:
    ops = FuseOperations(vfs, uid=0, gid=0)  # type: ignore[arg-type]
    return types.SimpleNamespace(operations=ops, encoding="utf-8", errors="surrogateescape", use_ns=True)


def read_page(fuse: types.SimpleNamespace, offset: int, room: int = 1000) -> list[tuple[str, int | None, int, int]]:
    """One READDIRPLUS request: (name, size or mode, offset, fill flags) for each entry given,
    until ``room`` entries filled the page."""
    seen: list[tuple[str, int | None, int, int]] = []

    def filler(buf, name, st, entry_offset, fill_flags):  # type: ignore[no-untyped-def]
        if len(seen) == room:
            return 1  # full: this entry is not in the page
        seen.append((name.decode(), st.st_size if fill_flags else (st.st_mode if st is not None else None),
                     entry_offset, fill_flags))
        return 0

    assert _FUSE.readdir_fuse_3(fuse, FOLDER.encode(), None, filler, offset, None, FUSE_READDIR_PLUS) == 0
    return seen


def read_all_pages(fuse: types.SimpleNamespace, room: int) -> list[str]:
    names: list[str] = []
    offset = 0
    while page := read_page(fuse, offset, room):
        names += [name for name, *_ in page]
        offset = page[-1][2]
    return names


def test_readdirplus_gives_attributes_of_known_sizes_only():
    seen = read_page(fuse_for(FakeVfs()), 0)
    assert seen == [(".", None, 1, 0), ("..", None, 2, 0), ("1.4.dcm", 1234, 3, FUSE_FILL_DIR_PLUS),
                    ("1.5.dcm", stat.S_IFREG, 4, 0)], "unknown size: the type only, so find needs no stat"


def test_every_entry_has_its_offset_so_libfuse_passes_its_attributes():
    offsets = [offset for *_, offset, _ in read_page(fuse_for(FakeVfs(names=5)), 0)]
    assert offsets == list(range(1, 10))  # 0 would make libfuse drop every entry's attributes


def test_pages_continue_where_the_last_one_ended():
    names = read_all_pages(fuse_for(FakeVfs(names=10)), room=3)
    assert names == [".", "..", "1.4.dcm", "1.5.dcm", *(f"1.6.{n}.dcm" for n in range(10))]


def test_an_entry_removed_meanwhile_shifts_nothing_in_the_listing_being_read():
    vfs = FakeVfs(names=4)
    fuse = fuse_for(vfs)
    first = read_page(fuse, 0, room=3)  # ".", "..", "1.4.dcm"
    del vfs.entries[0]  # 1.4.dcm removed while the listing is being read
    rest = read_page(fuse, first[-1][2])
    assert [n for n, *_ in rest] == ["1.5.dcm", *(f"1.6.{n}.dcm" for n in range(4))]  # 1.5.dcm not skipped
    # The next listing (from offset 0) is read afresh.
    assert "1.4.dcm" not in [n for n, *_ in read_page(fuse, 0)]


def test_a_listing_read_to_its_end_is_not_kept():
    fuse = fuse_for(FakeVfs(names=3))
    read_all_pages(fuse, room=2)
    assert not fuse.operations._pages


def conn_info(want: int) -> object:
    return types.SimpleNamespace(want=want, want_ext=want)


def test_libfuse_3_sends_readdirplus_for_every_page():
    vfs = FakeVfs()
    ops = FuseOperations(vfs, uid=0, gid=0)  # type: ignore[arg-type]
    conn = conn_info(FUSE_CAP_READDIRPLUS_AUTO | 0b1011)
    ops.init_with_config(conn, object())
    assert (conn.want, conn.want_ext) == (0b1011, 0b1011)  # only "auto" is dropped
    assert vfs.started and ops.initialized


def test_libfuse_2_flags_are_left_alone():
    ops = FuseOperations(FakeVfs(), uid=0, gid=0)  # type: ignore[arg-type]
    conn = conn_info(FUSE_CAP_READDIRPLUS_AUTO)
    ops.init_with_config(conn, None)  # libfuse 2 (macFUSE): no config, other flag meanings
    assert conn.want == FUSE_CAP_READDIRPLUS_AUTO
