"""Valid synthetic DICOM files: the demo store's sample studies and the tests' data.

Everything is generated with pydicom; no patient data, no downloads. UIDs are derived from a
seed so the same call gives the same files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's prefix, valid for generated UIDs


def make_uid(*parts: object) -> str:
    """A deterministic, valid UID from the given parts."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


@dataclass(frozen=True)
class SampleInstance:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str


def make_dataset(
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    pixel_bytes: int = 4096,
    patient_name: str = "Demo^Patient",
    patient_id: str = "DEMO-0001",
    instance_number: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A valid Secondary Capture instance whose 8-bit pixel data is about ``pixel_bytes`` long."""
    columns = 64
    rows = max(1, -(-pixel_bytes // columns))
    if rows * columns % 2:
        rows += 1
    seed = hashlib.sha256(sop_uid.encode()).digest()
    pixels = (seed * (rows * columns // len(seed) + 1))[: rows * columns]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = UID_PREFIX + "1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    return ds


def write_instance(path: Path, study_uid: str, series_uid: str, sop_uid: str, **kwargs: object) -> Path:
    """Write one valid Part-10 file at ``path`` and return the path."""
    ds = make_dataset(study_uid, series_uid, sop_uid, **kwargs)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_samples(
    folder: Path,
    *,
    studies: int = 2,
    series_per_study: int = 2,
    instances_per_series: int = 3,
    pixel_bytes: int = 4096,
    seed: str = "demo",
) -> list[SampleInstance]:
    """Write a small set of studies as ``folder/<SOPInstanceUID>.dcm`` files (flat), one
    patient per study, and return what was written."""
    written: list[SampleInstance] = []
    for st in range(studies):
        study_uid = make_uid(seed, "study", st)
        for se in range(series_per_study):
            series_uid = make_uid(seed, "series", st, se)
            for i in range(instances_per_series):
                sop_uid = make_uid(seed, "instance", st, se, i)
                path = folder / f"{sop_uid}.dcm"
                write_instance(
                    path,
                    study_uid,
                    series_uid,
                    sop_uid,
                    pixel_bytes=pixel_bytes,
                    patient_name=f"Demo^Patient{st + 1}",
                    patient_id=f"DEMO-{st + 1:04d}",
                    instance_number=i + 1,
                )
                written.append(SampleInstance(path, study_uid, series_uid, sop_uid))
    return written
