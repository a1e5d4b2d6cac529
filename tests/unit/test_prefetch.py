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


@pytest.mark.parametrize("held,code,note", [
    ({"0.dcm": True, "1.dcm": True}, 0, None),
    ({"0.dcm": False, "1.dcm": True}, 3, "1 of the 2 files read did not stay in the cache"),
    ({"0.dcm": False, "1.dcm": False}, 3, "none of the 2 files read stayed in the cache"),
    ({"0.dcm": None, "1.dcm": False}, 0, None),  # a mount that cannot tell: nothing said
])
def test_files_that_did_not_stay_in_the_cache_are_said_and_exit_3(tree: Path, monkeypatch, held, code, note):
    """It was "2/2 files ... ETA done" and exit 0 while the cache, too small, had kept few of them."""
    monkeypatch.setattr(prefetch, "is_cached", lambda path: held[path.name])
    out = io.StringIO()
    assert prefetch.prefetch_running_mount(tree / "good", 2, out) == code
    lines = out.getvalue().splitlines()  # the progress line's redraws ("\r") split it too
    if note is None:
        assert "2/2 files" in lines[-1] and "ETA done" in lines[-1]
    else:
        assert "2/2 files" in lines[-2] and "ETA done" in lines[-2]
        assert lines[-1] == (f"dicomfuse prefetch: {note} (the mount's --cacheSize is too small, or its --cacheTime "
                             "shorter than this prefetch took): what did not stay is downloaded again when read")


def test_a_file_that_could_not_be_read_is_not_asked_whether_it_stayed(tree: Path, monkeypatch):
    asked: list[str] = []

    def is_cached(path: Path) -> bool:
        asked.append(path.name)
        return False

    def read_file(path: Path, count) -> None:
        if path.name == "0.dcm":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        count(10)

    monkeypatch.setattr(prefetch, "is_cached", is_cached)
    monkeypatch.setattr(prefetch, "read_file", read_file)
    out = io.StringIO()
    assert prefetch.prefetch_running_mount(tree / "good", 2, out) == 1  # a failure outranks the note
    assert asked == ["1.dcm"]
    assert out.getvalue().splitlines()[-1].startswith("dicomfuse prefetch: the file read did not stay in the cache (")


def test_only_instances_are_counted_not_placeholders_or_side_files(tmp_path: Path):
    """An empty placeholder a program made (touch series/placeholder.dcm stays on this computer)
    was counted as an instance that 'did not stay in the cache': exit 3 for a full cache."""
    series = tmp_path / "store" / "1.2" / "1.2.3"
    series.mkdir(parents=True)
    for name in ("1.2.3.4.dcm", "placeholder.dcm", ".DS_Store", "._1.2.3.5.dcm", "1.2.3.6.dcm"):
        (series / name).write_bytes(b"")
    assert prefetch.instance_files(tmp_path) == [series / "1.2.3.4.dcm", series / "1.2.3.6.dcm"]


def test_a_folder_the_mount_cannot_look_up_is_said_not_a_crash(tree: Path, monkeypatch):
    """The server down: stat of the study folder answers EIO, and prefetch stopped on "an
    unexpected OSError"."""
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(os.fspath(path)).name == "bad":
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    out = io.StringIO()
    assert prefetch.prefetch_running_mount(tree / "bad", 2, out) == 1
    assert out.getvalue() == f"dicomfuse prefetch: cannot look up {tree / 'bad'}: {os.strerror(errno.EIO)}\n"
