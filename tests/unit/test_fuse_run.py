"""How the FUSE adapter's run() tells a mount that stopped from one that never came up."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

mfusepy = pytest.importorskip("mfusepy")

from dicomfuse.backends import fuse  # noqa: E402
from dicomfuse.core.vfs import Vfs, VfsConfig  # noqa: E402
from dicomfuse.core.workdirs import WorkDirs  # noqa: E402
from dicomfuse.stores.local import LocalDataset  # noqa: E402


@pytest.fixture
def vfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "ds" / "store").mkdir(parents=True)
    v = Vfs(LocalDataset(tmp_path / "ds"), VfsConfig(), WorkDirs(tmp_path / "work"))
    yield v
    v.shutdown()


class FakeLibfuse:
    """Stands in for mfusepy's FUSE: calls init as libfuse does, then returns libfuse's status
    as mfusepy does (RuntimeError for non-zero). ``refuse``: the kernel then answers a stat of
    the mount point with ECONNREFUSED, as it does once libfuse refused its INIT."""

    def __init__(self, status: int, refuse: bool = False) -> None:
        self.status = status
        self.refuse = refuse
        self.conn = mfusepy.fuse_conn_info()
        self.options: dict[str, object] = {}

    def __call__(self, ops: fuse.FuseOperations, mountpoint: str, **options: object) -> None:
        self.options = options
        ops.init_with_config(self.conn, object())
        if self.status:
            raise RuntimeError(self.status)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """os.stat of the mount point answers as the kernel would: ECONNREFUSED when refused."""
    real = fuse.os.stat
    state = {"refuse": False}

    def stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if state["refuse"] and str(path) == str(tmp_path):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fuse.os, "stat", stat)
    return state


def test_a_mount_refused_after_init_is_a_failure_not_a_clean_stop(vfs: Vfs, tmp_path: Path, monkeypatch,
                                                                 kernel):
    """libfuse can refuse INIT after init() returned (max_read mismatch): it returns the same
    status as a loop ended by Ctrl+C, and the mount was taken for stopped cleanly (exit 0)."""
    kernel["refuse"] = True
    monkeypatch.setattr(fuse, "_FUSE", FakeLibfuse(status=8))
    with pytest.raises(RuntimeError):
        fuse.run(vfs, str(tmp_path), {})


def test_a_mount_stopped_by_a_signal_at_once_is_a_clean_stop(vfs: Vfs, tmp_path: Path, monkeypatch, kernel):
    """Ctrl+C right as the mount appeared (before anything was asked of it): a clean stop."""
    monkeypatch.setattr(fuse, "_FUSE", FakeLibfuse(status=8))
    fuse.run(vfs, str(tmp_path), {})


def test_the_max_read_option_is_asked_for_in_init_too(vfs: Vfs, tmp_path: Path, monkeypatch):
    libfuse = FakeLibfuse(status=0)
    monkeypatch.setattr(fuse, "_FUSE", libfuse)
    fuse.run(vfs, str(tmp_path), {"max_read": "131072"})
    assert libfuse.conn.max_read == 131072 and libfuse.options["max_read"] == "131072"
