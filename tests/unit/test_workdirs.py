"""The cache root and its private folders: a folder the user gave is never chmodded (it may be
shared, like /tmp); the mount's own folders in it are 0700 and checked; an unusable folder is
one line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from dicomfuse.cli.main import EXIT_USAGE, main
from dicomfuse.core.workdirs import FolderError, WorkDirs, private_dir, user_dir
from dicomfuse.core.writeback import WriteBackQueue, queue_dir, record_paths
from dicomfuse.dicomfile import DicomUids

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="no mode bits or owners on Windows")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line (the INFO lines of a mount that got as far as the server may precede it)."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err
    errors = [line for line in captured.err.splitlines() if not line.startswith("INFO ")]
    assert len(errors) == 1 and errors[0].startswith("dicomfuse: error: "), captured.err
    return errors[0]


@posix_only
def test_an_existing_shared_cache_folder_keeps_its_mode(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    (shared / "someone-elses-file").write_text("x")
    work = WorkDirs(shared)
    try:
        assert mode(shared) == 0o1777
        for own in (shared / "mounts", shared / "spool", shared / "spool" / "failed", work.mount_dir, work.cache,
                    work.side):
            assert mode(own) == 0o700, own
    finally:
        work.wipe()
    assert mode(shared) == 0o1777 and (shared / "someone-elses-file").read_text() == "x"


@posix_only
def test_a_cache_folder_the_mount_creates_is_private(tmp_path: Path):
    old = os.umask(0o022)
    try:
        work = WorkDirs(tmp_path / "new" / "cache")
    finally:
        os.umask(old)
    work.wipe()
    assert mode(tmp_path / "new" / "cache") == 0o700
    assert mode(tmp_path / "new") == 0o700  # a parent it had to make: private too (XDG base directories)


@posix_only
@pytest.mark.parametrize("folder", ["cache", "logs"])
def test_parents_made_under_umask_000_are_private_and_existing_ones_keep_their_mode(tmp_path: Path, folder):
    """Under umask 000 the first start made ~/.local, ~/.local/state, ~/.cache... 0777: another
    user could swap the log folder in them for one of theirs and read the mount's log."""
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o755)
    old = os.umask(0)
    try:
        if folder == "cache":
            target = home / ".cache" / "dicomfuse"
            WorkDirs(target).wipe()
        else:
            target = home / ".local" / "state" / "dicomfuse" / "log"
            user_dir(target)
    finally:
        os.umask(old)
    made = [p for p in target.parents if home in p.parents] + [target]
    assert made and all(mode(p) == 0o700 for p in made), [(p, oct(mode(p))) for p in made]
    assert mode(home) == 0o755


@posix_only
def test_a_private_folder_of_another_user_is_refused(tmp_path: Path, monkeypatch):
    root = tmp_path / "shared"
    (root / "spool").mkdir(parents=True)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)  # the spool now belongs to "someone else"
    with pytest.raises(FolderError, match=f"{root / 'spool'} belongs to another user \\(uid {uid}\\)"):
        private_dir(root / "spool")


def test_a_private_folder_that_is_a_link_is_refused(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "shared"
    root.mkdir()
    try:
        (root / "spool").symlink_to(elsewhere, target_is_directory=True)
    except OSError:
        pytest.skip("cannot make symbolic links here")
    for windows in (False, True):
        with pytest.raises(FolderError, match="is a symbolic link"):
            private_dir(root / "spool", windows=windows)
    (root / "mounts").write_text("a file")
    with pytest.raises(FolderError, match="is not a folder"):
        private_dir(root / "mounts")


@posix_only
def test_an_existing_private_folder_of_ours_is_made_0700_again(tmp_path: Path):
    (tmp_path / "spool").mkdir(mode=0o755)
    os.chmod(tmp_path / "spool", 0o755)
    private_dir(tmp_path / "spool")
    assert mode(tmp_path / "spool") == 0o700


def test_an_existing_cache_layout_keeps_working(tmp_path: Path):
    """A cache folder written by an earlier version (root 0700, queue under spool/writeback,
    failed sync uploads under spool/failed) is used as it is."""
    root = tmp_path / "cache"
    (root / "spool" / "failed").mkdir(parents=True)
    (root / "spool" / "failed" / "20240101-120000-0-scan.dcm").write_bytes(b"kept")
    os.chmod(root, 0o700)
    source = root / "spool" / "a"
    source.write_bytes(b"x")
    q = WriteBackQueue(queue_dir(root), lambda store, items: [], dataset="/data/ds")
    q.submit("ct", DicomUids("1.2.3", "1.2.3.4", "1.2.3.4.5"), source)
    q.stop(drain=False)
    work = WorkDirs(root)
    try:
        assert (work.failed / "20240101-120000-0-scan.dcm").read_bytes() == b"kept"
        assert len(record_paths(queue_dir(work.root))) == 1
        q = WriteBackQueue(queue_dir(work.root), lambda store, items: [], dataset="/data/ds")
        assert [item.store for item in q.recover()] == ["ct"]
        q.stop(drain=False)
    finally:
        work.wipe()


# ---------------------------------------------------------------------------------------------
# through the command line: one line, exit code 2


@pytest.fixture
def mount_args(tmp_path: Path, monkeypatch) -> list[str]:
    """Flags of a mount that must be refused before anything is mounted (if it is not, the test
    fails here instead of mounting)."""
    import dicomfuse.core.vfs

    def no_vfs(*args: object, **kwargs: object) -> None:
        raise AssertionError("the mount went on past an unusable folder")

    monkeypatch.setattr(dicomfuse.core.vfs, "Vfs", no_vfs)
    (tmp_path / "ds" / "store").mkdir(parents=True)
    (tmp_path / "mnt").mkdir()
    return ["-a", str(tmp_path / "ds"), "-p", str(tmp_path / "mnt")]


def test_a_cache_folder_under_a_file_is_one_line(tmp_path: Path, mount_args, capsys):
    (tmp_path / "afile").write_text("x")
    rc = main([*mount_args, "--cacheDir", str(tmp_path / "afile" / "cache"), "--logDir", str(tmp_path / "logs")])
    assert rc == EXIT_USAGE
    err = one_error_line(capsys)
    assert err == (f"dicomfuse: error: --cacheDir: {tmp_path / 'afile' / 'cache'} is not a folder "
                   f"({tmp_path / 'afile'} is a file)")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() != 0, reason="needs root to give a folder away")
def test_a_cache_folder_whose_spool_belongs_to_another_user_is_one_line(tmp_path: Path, mount_args, capsys):
    (tmp_path / "shared" / "spool").mkdir(parents=True)
    os.chmod(tmp_path / "shared", 0o1777)
    os.chown(tmp_path / "shared" / "spool", 4242, 4242)  # made by another user in a shared folder
    rc = main([*mount_args, "--cacheDir", str(tmp_path / "shared"), "--logDir", str(tmp_path / "logs")])
    assert rc == EXIT_USAGE
    err = one_error_line(capsys)
    assert err.startswith(f"dicomfuse: error: --cacheDir: {tmp_path / 'shared' / 'spool'} belongs to another user")


@pytest.mark.parametrize("command", [
    [],  # the mount (mount_args are added)
    ["status"],
    ["retry", "-a", "/nowhere"],
    ["prefetch", "/nowhere"],
])
def test_a_log_folder_under_a_file_is_one_line(tmp_path: Path, mount_args, command, capsys):
    (tmp_path / "afile").write_text("x")
    logs = tmp_path / "afile" / "logs"
    argv = [*command, "--logDir", str(logs)] if command else [*mount_args, "--logDir", str(logs)]
    assert main(argv) == EXIT_USAGE
    err = one_error_line(capsys)
    assert err == f"dicomfuse: error: --logDir: {logs} is not a folder ({tmp_path / 'afile'} is a file)"


def test_a_log_folder_that_is_a_file_is_one_line(tmp_path: Path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["status", "--logDir", str(tmp_path / "afile")]) == EXIT_USAGE
    assert one_error_line(capsys).endswith(f"--logDir: {tmp_path / 'afile'} is not a folder (it is a file)")


def test_retry_with_a_cache_folder_that_is_not_one_is_an_error_not_nothing_to_retry(tmp_path: Path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["retry", "-a", str(tmp_path), "--cacheDir", str(tmp_path / "afile" / "cache"),
                 "--logDir", str(tmp_path / "logs")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--cacheDir" in err and "is not a folder" in err


def test_a_start_never_sweeps_the_cache_folder_another_start_is_making(tmp_path: Path, monkeypatch):
    """Two mounts starting at the same moment on one cache folder: one start's new folder has no
    mount.lock yet (or one not taken yet) when the other sweeps stale caches; it must not be
    taken for a stale one and removed (the live mount would lose its cache; its start would fail
    with an unexpected FileNotFoundError)."""
    import threading

    from dicomfuse.core import portable, workdirs

    root = tmp_path / "cache"
    WorkDirs(root).wipe()  # the layout exists, no mount lives
    real_private_dir, real_try_lock = workdirs.private_dir, portable.try_lock
    this_start = threading.get_ident()
    other: dict[str, object] = {}
    other_swept_or_waits = threading.Event()

    def try_lock(fd: int, **kwargs: bool) -> bool:
        got = real_try_lock(fd, **kwargs)
        if not got and threading.get_ident() != this_start:
            other_swept_or_waits.set()  # the other start waits for this one
        return got

    def other_start() -> None:
        try:
            other["work"] = WorkDirs(root)
        except BaseException as exc:  # noqa: BLE001 - reported below
            other["error"] = exc
        finally:
            other_swept_or_waits.set()

    def private_dir(path: Path, **kwargs: bool) -> Path:
        made = real_private_dir(path, **kwargs)
        if path.parent == root / "mounts" and threading.get_ident() == this_start and "thread" not in other:
            # this start's new folder exists and its mount.lock does not yet: the other start now
            thread = other["thread"] = threading.Thread(target=other_start)
            thread.start()
            assert other_swept_or_waits.wait(60)
        return made

    monkeypatch.setattr(workdirs, "private_dir", private_dir)
    monkeypatch.setattr(portable, "try_lock", try_lock)
    work = WorkDirs(root)
    thread = other["thread"]
    assert isinstance(thread, threading.Thread)
    thread.join(60)
    assert "error" not in other, other.get("error")
    second = other["work"]
    assert isinstance(second, WorkDirs)
    assert work.cache.is_dir() and second.cache.is_dir() and work.mount_dir != second.mount_dir
    work.wipe()
    second.wipe()


def test_stale_caches_are_moved_aside_then_removed_also_those_a_stopped_start_left(tmp_path: Path, caplog):
    caplog.set_level("INFO", logger="dicomfuse.core.workdirs")
    root = tmp_path / "cache"
    live = WorkDirs(root)
    try:
        crashed = root / "mounts" / "0123"
        (crashed / "cache").mkdir(parents=True)
        (crashed / "cache" / "a.dcm").write_bytes(b"x")
        (crashed / "mount.lock").write_bytes(b"")  # free: its process is gone
        (root / "mounts" / ".stale-4567" / "cache").mkdir(parents=True)  # a start stopped removing it
        caplog.clear()
        work = WorkDirs(root)
        assert sorted(p.name for p in (root / "mounts").iterdir()) == sorted([live.mount_dir.name,
                                                                              work.mount_dir.name])
        assert "Removed the instance cache of 2 mount(s)" in caplog.text
        work.wipe()
    finally:
        live.wipe()


def test_a_mount_folder_removed_while_mounted_is_made_again_and_held(tmp_path: Path):
    """Made again without its lock, the next start took it for a dead mount's and removed it."""
    import shutil

    first = WorkDirs(tmp_path)
    shutil.rmtree(first.mounts)
    first.restore()
    assert first.cache.is_dir() and first.side.is_dir()
    second = WorkDirs(tmp_path)
    assert first.cache.is_dir(), "a live mount's folder is not stale"
    second.wipe()
    first.wipe()
