"""Shared fixtures: generated DICOM data, a real Orthanc, and real mounts of each backend."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dicomfuse.samples import SampleInstance, make_uid, write_instance
from dicomfuse.stores.base import Store
from tests.mounting import Mount

PATIENT_NAME = "Secret^Patient"  # must never appear in a log line


def fuse_available() -> bool:
    """Linux: /dev/fuse and fusermount3; macOS: macFUSE installed (its extension allowed is up
    to the machine: a mount that cannot load it fails the test, as it should)."""
    if sys.platform == "darwin":
        return os.path.isdir("/Library/Filesystems/macfuse.fs")
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


requires_fuse = pytest.mark.skipif(not fuse_available(), reason="needs FUSE: fuse3 (Linux) or macFUSE (macOS)")


@dataclass
class DicomFactory:
    """Writes valid, unique DICOM files for one test."""

    folder: Path
    seed: str = field(default_factory=lambda: uuid.uuid4().hex)
    count: int = 0

    def instance(self, study: int = 0, series: int = 0, *, name: str | None = None,
                 pixel_bytes: int = 4096, **kwargs: object) -> SampleInstance:
        self.count += 1
        study_uid = make_uid(self.seed, "study", study)
        series_uid = make_uid(self.seed, "series", study, series)
        sop_uid = make_uid(self.seed, "sop", self.count)
        path = self.folder / (name or f"{sop_uid}.dcm")
        kwargs.setdefault("patient_name", PATIENT_NAME)
        write_instance(path, study_uid, series_uid, sop_uid, pixel_bytes=pixel_bytes, **kwargs)  # type: ignore[arg-type]
        return SampleInstance(path, study_uid, series_uid, sop_uid)

    def edited_copy(self, original: SampleInstance, pixel_bytes: int = 3000) -> SampleInstance:
        """Another file of ``original``'s SOP Instance UID in another study and series (an edited
        copy stored beside it, as anonymisers and corrections make)."""
        study_uid, series_uid = make_uid(self.seed, "study", 8), make_uid(self.seed, "series", 8, 8)
        path = self.folder / f"edited-{original.sop_uid}.dcm"
        write_instance(path, study_uid, series_uid, original.sop_uid, pixel_bytes=pixel_bytes,
                       patient_name=PATIENT_NAME)
        return SampleInstance(path, study_uid, series_uid, original.sop_uid)

    def series(self, n: int, study: int = 0, series: int = 0, **kwargs: object) -> list[SampleInstance]:
        return [self.instance(study, series, **kwargs) for _ in range(n)]


@pytest.fixture
def dicom(tmp_path: Path) -> DicomFactory:
    folder = tmp_path / "dicom-files"
    folder.mkdir()
    return DicomFactory(folder)


# ---------------------------------------------------------------------------------------------
# Backends: the same user operations run against each.


@dataclass
class Backend:
    name: str
    address: str
    store_name: str
    server: Store  # to check what the server holds, without the mount
    can_create_stores: bool
    can_delete: bool
    sizes_known: bool
    extra_args: tuple[str, ...] = ()
    store_ids: Callable[[], list[str]] | None = None  # the stores the server holds, when it has several
    dataset_id: str | None = None  # Cloud Healthcare stand-in only
    key_file: Path | None = None  # Cloud Healthcare stand-in only

    def seed(self, instances: list[SampleInstance]) -> None:
        self.seed_files([i.path for i in instances])

    def seed_files(self, paths: list[Path]) -> None:
        outcomes = self.server.store_files(paths)
        assert all(o.stored for o in outcomes), outcomes

    def server_bytes(self, inst: SampleInstance) -> bytes:
        sink = io.BytesIO()
        self.server.retrieve(inst.study_uid, inst.series_uid, inst.sop_uid, sink)
        return sink.getvalue()

    def has(self, inst: SampleInstance) -> bool:
        return any(True for _ in self.server.instances(inst.study_uid, inst.series_uid, inst.sop_uid))

    def series_path(self, mount: Mount, inst: SampleInstance) -> Path:
        return mount.path / self.store_name / inst.study_uid / inst.series_uid

    def instance_path(self, mount: Mount, inst: SampleInstance) -> Path:
        return self.series_path(mount, inst) / f"{inst.sop_uid}.dcm"


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.orthanc_server import OrthancServer, OrthancUnavailable

    try:
        server = OrthancServer().start()
    except OrthancUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Orthanc unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


def _local_backend(root: Path) -> Backend:
    from dicomfuse.stores.local import LocalDataset

    (root / "store-a").mkdir(parents=True, exist_ok=True)
    dataset = LocalDataset(root)
    return Backend("local", str(root), "store-a", dataset.open_store("store-a"), can_create_stores=True,
                   can_delete=True, sizes_known=True,
                   store_ids=lambda: sorted(p.name for p in root.iterdir() if p.is_dir()))


def _orthanc_backend(server: object, *, rest: bool = True) -> Backend:
    from dicomfuse.stores.dicomweb import DicomwebDataset

    url = server.dicomweb_url  # type: ignore[attr-defined]
    dataset = DicomwebDataset(url, orthanc_rest_url="auto")
    extra = () if rest else ("--orthancRest", "off")
    return Backend("orthanc" if rest else "orthanc-norest", url, dataset.store.name, dataset.store,
                   can_create_stores=False, can_delete=rest, sizes_known=rest, extra_args=extra)


STANDINS: list[object] = []  # live Cloud Healthcare stand-ins: their tokens must never be logged

GOOGLE_INDEX_LAG = 1.0
"""Seconds the stand-in's search index lags behind writes in the shared backend tests, as
Google's does: the mount must show its own uploads and deletes at once anyway."""


@pytest.fixture(scope="session")
def healthcare() -> Iterator[object]:
    """The Cloud Healthcare API stand-in (tests/fakes/healthcare.py), one for the session; each
    test gets its own dataset in it."""
    from tests.fakes.healthcare import HealthcareStandIn

    server = HealthcareStandIn(index_lag=GOOGLE_INDEX_LAG).start()
    STANDINS.append(server)
    try:
        yield server
    finally:
        STANDINS.remove(server)
        server.stop()


def google_backend(standin: object, tmp_path: Path, version: str = "v1") -> Backend:
    """A fresh dataset with one store "store-a" on the stand-in, and a service-account key file
    whose token_uri is the stand-in's."""
    dataset_id = f"ds-{uuid.uuid4().hex[:10]}"
    url = standin.create_dataset(dataset_id, version)  # type: ignore[attr-defined]
    standin.create_store(dataset_id, "store-a")  # type: ignore[attr-defined]
    key = standin.write_key_file(tmp_path / f"key-{dataset_id}.json")  # type: ignore[attr-defined]
    key.chmod(0o600)
    return Backend("google", url, "store-a", standin.store_view(dataset_id, "store-a"),  # type: ignore[attr-defined]
                   can_create_stores=True, can_delete=True, sizes_known=False, extra_args=("--keyFile", str(key)),
                   store_ids=lambda: sorted(standin.store_ids(dataset_id)),  # type: ignore[attr-defined]
                   dataset_id=dataset_id, key_file=key)


@pytest.fixture(params=["local", "orthanc", "google"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return _local_backend(tmp_path / "dataset")
    if request.param == "google":
        return google_backend(request.getfixturevalue("healthcare"), tmp_path)
    return _orthanc_backend(request.getfixturevalue("orthanc"))


@pytest.fixture
def orthanc_norest(orthanc: object) -> Backend:
    """Orthanc seen as a plain DICOMweb server: no sizes in listings, no delete."""
    return _orthanc_backend(orthanc, rest=False)


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    mounts: list[Mount] = []

    def make(backend: Backend, *args: str) -> Mount:
        workdir = tmp_path / f"mount{len(mounts)}"
        workdir.mkdir()
        m = Mount(backend.address, workdir, *backend.extra_args, *args)
        mounts.append(m)
        return m.start()

    yield make
    for m in mounts:
        m.stop()
    for m in mounts:
        assert not os.path.ismount(m.path), m.diagnostics()
        # PHI and secrets: no patient name, access token or private key ever reaches a log line.
        text = m.log_text()
        assert PATIENT_NAME not in text
        assert "Bearer" not in text and "PRIVATE KEY" not in text
        for standin in STANDINS:
            leaked = [t for t in standin.issued_tokens() if t in text]  # type: ignore[attr-defined]
            assert not leaked, "an access token reached the logs"


def run(*cmd: str | Path, check: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a shell tool as a user would, capturing its output."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check, cwd=cwd,
                          timeout=120)
