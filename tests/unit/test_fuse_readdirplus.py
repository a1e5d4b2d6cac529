"""The FUSE adapter answers READDIRPLUS with full attributes, except for files whose size is not
known yet (their stat must reach getattr: see core.sizes)."""

from __future__ import annotations

import stat
import types

import pytest

mfusepy = pytest.importorskip("mfusepy")

from dicomfuse.backends.fuse import _FUSE, FUSE_FILL_DIR_PLUS, FUSE_READDIR_PLUS, FuseOperations  # noqa: E402
from dicomfuse.core.vfs import Attr  # noqa: E402


class FakeVfs:
    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        assert path == "/s/1.2/1.3"
        return [("1.4.dcm", Attr(False, 1234, 1.0)), ("1.5.dcm", Attr(False, 0, 1.0, size_known=False))]


def run_readdir(flags: int) -> list[tuple[str, int | None, int]]:
    ops = FuseOperations.__new__(FuseOperations)
    ops.vfs = FakeVfs()  # type: ignore[assignment]
    ops.uid, ops.gid = 0, 0
    fuse = types.SimpleNamespace(operations=ops, encoding="utf-8", errors="surrogateescape", use_ns=True)
    seen: list[tuple[str, int | None, int]] = []

    def filler(buf, name, st, offset, fill_flags):  # type: ignore[no-untyped-def]
        seen.append((name.decode(), st.st_size if fill_flags else (st.st_mode if st is not None else None),
                     fill_flags))
        return 0

    if flags & FUSE_READDIR_PLUS:
        assert _FUSE.readdir_fuse_3(fuse, b"/s/1.2/1.3", None, filler, 0, None, flags) == 0
    return seen


def test_readdirplus_gives_attributes_of_known_sizes_only():
    seen = run_readdir(FUSE_READDIR_PLUS)
    assert seen == [(".", None, 0), ("..", None, 0), ("1.4.dcm", 1234, FUSE_FILL_DIR_PLUS),
                    ("1.5.dcm", stat.S_IFREG, 0)], "unknown size: the type only, so find needs no stat"
