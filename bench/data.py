"""The benchmark's data: generated with pydicom (nothing is downloaded), seeded into Orthanc by STOW-RS.

Sizes per mode live in :data:`FULL` and :data:`QUICK`. Every data set gets UIDs from its own seed,
so data sets never collide; each one that a store-wide listing looks at has an Orthanc of its own.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID

from dicomfuse.samples import make_dataset, make_uid, write_instance
from dicomfuse.stores.dicomweb import DicomwebDataset

KIB = 1024
MIB = 1024 * 1024
MULTIFRAME_GRAYSCALE_BYTE_SC = UID("1.2.840.10008.5.1.4.1.1.7.2")
LARGE_FRAME_SIDE = 1024  # 1 MiB frames of 8-bit pixels
SEED_BATCH_FILES = 50


@dataclass(frozen=True)
class Sizes:
    """How much data each scenario uses."""

    series_instances: int
    series_instance_bytes: int
    store_studies: int
    large_bytes: int
    upload_instances: int
    upload_instance_bytes: int


FULL = Sizes(
    series_instances=1000,
    series_instance_bytes=512 * KIB,
    store_studies=2000,
    large_bytes=100 * MIB,
    upload_instances=200,
    upload_instance_bytes=256 * KIB,
)
QUICK = Sizes(
    series_instances=20,
    series_instance_bytes=64 * KIB,
    store_studies=50,
    large_bytes=8 * MIB,
    upload_instances=10,
    upload_instance_bytes=256 * KIB,
)


@dataclass(frozen=True)
class Instance:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def file_name(self) -> str:
        return f"{self.sop_uid}.dcm"


@dataclass(frozen=True)
class Series:
    """Instances of one series, written under ``folder``."""

    folder: Path
    study_uid: str
    series_uid: str
    instances: tuple[Instance, ...]

    @property
    def total_bytes(self) -> int:
        return sum(i.path.stat().st_size for i in self.instances)

    def sizes(self) -> dict[str, int]:
        """File name in the mount → file size."""
        return {i.file_name: i.path.stat().st_size for i in self.instances}


def write_series(folder: Path, seed: str, count: int, pixel_bytes: int) -> Series:
    """``count`` instances of one series, about ``pixel_bytes`` of pixel data each."""
    study_uid = make_uid(seed, "study")
    series_uid = make_uid(seed, "series")
    instances = []
    for i in range(count):
        sop_uid = make_uid(seed, "instance", i)
        path = write_instance(
            folder / f"{sop_uid}.dcm", study_uid, series_uid, sop_uid, pixel_bytes=pixel_bytes,
            patient_name=f"Bench^{seed}", patient_id=f"BENCH-{seed}", instance_number=i + 1,
        )
        instances.append(Instance(path, study_uid, series_uid, sop_uid))
    return Series(folder, study_uid, series_uid, tuple(instances))


def write_studies(folder: Path, seed: str, count: int, pixel_bytes: int = 1024) -> list[Instance]:
    """``count`` studies of one series holding one small instance each."""
    written = []
    for s in range(count):
        study_uid, series_uid, sop_uid = (make_uid(seed, kind, s) for kind in ("study", "series", "instance"))
        path = write_instance(
            folder / f"{sop_uid}.dcm", study_uid, series_uid, sop_uid, pixel_bytes=pixel_bytes,
            patient_name=f"Bench^{seed}", patient_id=f"BENCH-{seed}",
        )
        written.append(Instance(path, study_uid, series_uid, sop_uid))
    return written


def write_large(folder: Path, seed: str, size: int) -> Series:
    """One multi-frame instance of at least ``size`` bytes (1 MiB frames of 8-bit pixels).

    ``samples.make_dataset`` lays pixels out as 64 columns, which caps one frame at 4 MiB (Rows is
    16-bit), so the frames are set here."""
    study_uid, series_uid, sop_uid = (make_uid(seed, kind) for kind in ("study", "series", "instance"))
    frames = max(1, math.ceil(size / (LARGE_FRAME_SIDE * LARGE_FRAME_SIDE)))
    ds = make_dataset(study_uid, series_uid, sop_uid, pixel_bytes=64, patient_name=f"Bench^{seed}",
                      patient_id=f"BENCH-{seed}")
    ds.SOPClassUID = MULTIFRAME_GRAYSCALE_BYTE_SC
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_GRAYSCALE_BYTE_SC
    ds.Rows = ds.Columns = LARGE_FRAME_SIDE
    ds.NumberOfFrames = frames
    ds.PixelData = random.Random(seed).randbytes(frames * LARGE_FRAME_SIDE * LARGE_FRAME_SIDE)
    path = folder / f"{sop_uid}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return Series(folder, study_uid, series_uid, (Instance(path, study_uid, series_uid, sop_uid),))


def seed_server(dicomweb_url: str, paths: Sequence[Path], log: Callable[[str], None]) -> None:
    """Store ``paths`` on the server by STOW-RS (the project's own client), or raise."""
    started = time.perf_counter()
    dataset = DicomwebDataset(dicomweb_url, orthanc_rest_url=None, stow_batch_files=SEED_BATCH_FILES)
    try:
        store = dataset.open_store(next(dataset.list_stores()))
        refused = [o for o in store.store_files(list(paths)) if not o.stored]
    finally:
        dataset.close()
    if refused:
        raise RuntimeError(f"seeding refused {len(refused)} of {len(paths)} files, e.g. {refused[0].reason}")
    log(f"seeded {len(paths)} instances in {time.perf_counter() - started:.1f} s")
