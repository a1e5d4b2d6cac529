"""ensure_demo_dataset: the dataset `dicomfuse demo` mounts."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from dicomfuse.demo import DEMO_STORE, SCRATCH_STORE, ensure_demo_dataset
from dicomfuse.stores.local import LocalDataset


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_creates_two_stores_with_samples(tmp_path: Path) -> None:
    root = ensure_demo_dataset(tmp_path / "demo")
    assert root == tmp_path / "demo"
    dataset = LocalDataset(root)
    assert list(dataset.list_stores()) == sorted([DEMO_STORE, SCRATCH_STORE])
    assert list(dataset.open_store(SCRATCH_STORE).studies()) == []
    assert list((root / SCRATCH_STORE).iterdir()) == []

    store = dataset.open_store(DEMO_STORE)
    studies = list(store.studies())
    assert len(studies) == 2
    for study in studies:
        series = list(store.series(study))
        assert len(series) == 2
        for one in series:
            instances = list(store.instances(study, one))
            assert len(instances) == 3
            for info in instances:
                path = root / DEMO_STORE / study / one / f"{info.sop_uid}.dcm"  # canonical layout
                assert info.size == path.stat().st_size
                sink = io.BytesIO()
                store.retrieve(study, one, info.sop_uid, sink)
                assert pydicom.dcmread(io.BytesIO(sink.getvalue())).SOPInstanceUID == info.sop_uid


def test_is_idempotent(tmp_path: Path) -> None:
    root = ensure_demo_dataset(tmp_path / "demo")
    before = snapshot(root)
    assert ensure_demo_dataset(root) == root
    assert snapshot(root) == before


def test_fills_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    ensure_demo_dataset(tmp_path / "demo")
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [DEMO_STORE, SCRATCH_STORE]


def test_leaves_a_non_empty_folder_alone(tmp_path: Path) -> None:
    (tmp_path / "demo" / "mine").mkdir(parents=True)
    ensure_demo_dataset(tmp_path / "demo")
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["mine"]


def test_leaves_no_staging_folder_behind(tmp_path: Path) -> None:
    ensure_demo_dataset(tmp_path / "nested" / "demo")
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["demo"]


def test_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "demo").write_text("x")
    with pytest.raises(NotADirectoryError):
        ensure_demo_dataset(tmp_path / "demo")


def test_missing_parents_are_private_under_umask_000(tmp_path: Path) -> None:
    """~/.local/share made by the demo's first run was 0777 under umask 000 (mkdir -p)."""
    import os
    import stat

    old = os.umask(0)
    try:
        ensure_demo_dataset(tmp_path / "local" / "share" / "demo")
    finally:
        os.umask(old)
    for made in (tmp_path / "local", tmp_path / "local" / "share"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
