"""How the FUSE adapter's run() tells a mount that stopped from one that never came up."""

from __future__ import annotations

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
    """Stands in for mfusepy's FUSE: calls init as libfuse does, maybe serves a request, then
    returns libfuse's status as mfusepy does (RuntimeError for non-zero)."""

    def __init__(self, serve: bool, status: int) -> None:
        self.serve = serve
        self.status = status
        self.conn = mfusepy.fuse_conn_info()
        self.options: dict[str, object] = {}

    def __call__(self, ops: fuse.FuseOperations, mountpoint: str, **options: object) -> None:
        self.options = options
        ops.init_with_config(self.conn, object())
        if self.serve:
            ops.getattr("/")
        if self.status:
            raise RuntimeError(self.status)


def test_a_mount_refused_after_init_is_a_failure_not_a_clean_stop(vfs: Vfs, tmp_path: Path, monkeypatch):
    """libfuse can refuse INIT after init() returned (max_read mismatch): it returns the same
    status as a loop ended by Ctrl+C, and the mount was taken for stopped cleanly (exit 0)."""
    libfuse = FakeLibfuse(serve=False, status=8)
    monkeypatch.setattr(fuse, "_FUSE", libfuse)
    with pytest.raises(RuntimeError):
        fuse.run(vfs, str(tmp_path), {})


def test_a_mount_that_served_and_was_stopped_by_a_signal_is_a_clean_stop(vfs: Vfs, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fuse, "_FUSE", FakeLibfuse(serve=True, status=8))
    fuse.run(vfs, str(tmp_path), {})


def test_the_max_read_option_is_asked_for_in_init_too(vfs: Vfs, tmp_path: Path, monkeypatch):
    libfuse = FakeLibfuse(serve=True, status=0)
    monkeypatch.setattr(fuse, "_FUSE", libfuse)
    fuse.run(vfs, str(tmp_path), {"max_read": "131072"})
    assert libfuse.conn.max_read == 131072 and libfuse.options["max_read"] == "131072"
