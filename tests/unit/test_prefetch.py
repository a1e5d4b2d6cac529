"""``dicomfuse prefetch PATH`` without a mount: what it says and returns when folders cannot be
listed (the mounted tests are in tests/integration/test_prefetch.py)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest

from dicomfuse.cli import prefetch


@pytest.fixture
def tree(tmp_path: Path, monkeypatch) -> Path:
    """store/{good,bad}/series/*.dcm, where listing anything in ``bad`` fails with EIO (as a mount
    answers when the server keeps failing), taken for a DICOMFuse mount."""
    root = tmp_path / "store"
    for study in ("good", "bad"):
        (root / study / "series").mkdir(parents=True)
        for n in range(2):
            (root / study / "series" / f"{n}.dcm").write_bytes(b"x" * 10)
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if "bad" in Path(os.fspath(path)).parts:  # type: ignore[arg-type]
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))  # type: ignore[arg-type]
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(prefetch, "mount_type", lambda path: "fuse.dicomfuse")
    return root


def test_a_folder_below_that_cannot_be_listed_is_named_and_fails(tree: Path):
    unlisted: list[OSError] = []
    assert prefetch.instance_files(tree, unlisted) == [tree / "good" / "series" / f"{n}.dcm" for n in range(2)]
    assert [e.filename for e in unlisted] == [str(tree / "bad")]
    out = io.StringIO()
    assert prefetch.prefetch_running_mount(tree, 2, out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == f"dicomfuse prefetch: cannot list {tree / 'bad'}: {os.strerror(errno.EIO)}"
    assert "2/2 files" in lines[-2]
    assert lines[-1] == (f"dicomfuse prefetch: 1 folder below {tree} could not be listed; their instances were "
                         "not prefetched")


def test_a_folder_that_cannot_be_listed_itself_is_not_no_instances(tree: Path):
    out = io.StringIO()
    assert prefetch.prefetch_running_mount(tree / "bad", 2, out) == 1
    assert out.getvalue() == f"dicomfuse prefetch: cannot list {tree / 'bad'}: {os.strerror(errno.EIO)}\n"


def test_an_empty_folder_that_lists_is_still_no_instances(tree: Path):
    (tree / "empty").mkdir()
    out = io.StringIO()
    assert prefetch.prefetch_running_mount(tree / "empty", 2, out) == 0
    assert out.getvalue() == f"dicomfuse prefetch: no instances below {tree / 'empty'}\n"
