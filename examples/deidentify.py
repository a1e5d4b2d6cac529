#!/usr/bin/env python3
"""De-identify a folder of DICOM files into another folder (the original DICOMFuse README's
anonymisation workflow, with pydicom).

    python examples/deidentify.py MOUNT/store-a/STUDY  ~/anon  [--salt SECRET]
    cp ~/anon/*.dcm MOUNT/store-b/

Every file below SOURCE is read; its copy in TARGET gets:

* new Study, Series and SOP Instance UIDs (and Frame of Reference UID), derived from the old ones
  and the salt, so files of one series stay together and a second run gives the same UIDs;
* patient name, ID, birth date and other direct identifiers removed, PatientIdentityRemoved = YES;
* private tags removed.

This is a starting point for a real de-identification profile (DICOM PS3.15 Annex E), not a
replacement for one: burned-in text in pixels and free-text fields need their own review.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "PatientComments",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName",
    "InstitutionAddress", "AccessionNumber", "StudyID", "IssuerOfPatientID", "MedicalRecordLocator",
)
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def new_uid(old: str, salt: str) -> str:
    return generate_uid(entropy_srcs=[salt, old])


def deidentify(source: Path, target: Path, salt: str) -> Path:
    ds = pydicom.dcmread(source)
    for keyword in UID_KEYWORDS:
        if keyword in ds:
            setattr(ds, keyword, new_uid(str(getattr(ds, keyword)), salt))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in IDENTIFYING_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "DICOMFuse example: UIDs replaced, direct identifiers removed"
    # Flat, named by the new SOP Instance UID: a store folder of the mount files each copy by
    # its own UIDs.
    out = target / f"{ds.SOPInstanceUID}.dcm"
    target.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a folder of DICOM files (e.g. a study folder of the mount)")
    parser.add_argument("target", type=Path, help="where the de-identified copies go (created)")
    parser.add_argument("--salt", default="dicomfuse", help="secret mixed into the new UIDs")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.source.rglob("*") if p.is_file())
    done = skipped = 0
    for path in files:
        try:
            deidentify(path, args.target, args.salt)
            done += 1
        except (InvalidDicomError, AttributeError) as exc:
            print(f"skipped {path.name}: {type(exc).__name__}", file=sys.stderr)
            skipped += 1
    print(f"{done} file(s) de-identified into {args.target}, {skipped} skipped")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
