"""Bad input through a real mount, each with one clear outcome: an errno for the shell tool, a line
in the log, nothing stored, nothing lost. (Refused operations by level are in
test_mount_operations.py; bad flags and addresses in tests/unit/test_cli.py.)"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicomfuse.samples import make_dataset
from tests.conftest import PATIENT_NAME, Backend, DicomFactory, _local_backend, requires_fuse, run
from tests.fakes.http_server import LoopbackServer, Reply

pytestmark = [requires_fuse, pytest.mark.mount]


@pytest.fixture
def local(tmp_path: Path) -> Backend:
    return _local_backend(tmp_path / "dataset")


def kept_bytes(cache_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in (cache_dir / "spool" / "failed").iterdir() if not p.name.endswith(".json")]


def test_dicom_without_file_meta_or_without_uids_fails_the_copy(local: Backend, mount_factory,
                                                                dicom: DicomFactory, tmp_path: Path):
    inst = dicom.instance()
    no_meta = tmp_path / "no-meta.dcm"
    ds = pydicom.dcmread(inst.path)
    buffer = DicomBytesIO()  # the bare data set: no preamble, no "DICM", no file meta group
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    no_meta.write_bytes(buffer.getvalue())
    no_uid = tmp_path / "no-uid.dcm"
    ds2 = make_dataset("1.2.3.4", "1.2.3.5", "1.2.3.6")
    del ds2.SOPInstanceUID
    ds2.save_as(no_uid, enforce_file_format=False)
    m = mount_factory(local)
    for bad in (no_meta, no_uid):
        r = run("cp", bad, m.path / local.store_name)
        assert r.returncode != 0 and "Invalid argument" in r.stderr, (bad.name, r.stderr)
    assert not list(local.server.studies())
    assert len(kept_bytes(m.cache_dir)) == 2
    assert "ERROR" in (m.log_dir / "error.log").read_text()


def test_a_bad_value_holding_the_patient_name_is_refused_without_quoting_it(local: Backend, mount_factory,
                                                                              dicom: DicomFactory, tmp_path: Path):
    """An image attribute that should be a number holds text (part of the patient's name): the
    copy fails with a reason naming the attribute, and no log file, DEBUG included, quotes the
    value (the traceback of int() would: "invalid literal for int() with base 10: '...'")."""
    inst = dicom.instance()
    ds = pydicom.dcmread(inst.path)
    placeholder = "9" * len(PATIENT_NAME)
    ds.NumberOfFrames = placeholder
    bad = tmp_path / "bad-frames.dcm"
    ds.save_as(bad)
    bad.write_bytes(bad.read_bytes().replace(placeholder.encode(), PATIENT_NAME.encode()))
    m = mount_factory(local)
    r = run("cp", bad, m.path / local.store_name)
    assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
    assert not list(local.server.studies())
    assert "NumberOfFrames (0028,0008): not a number" in (m.log_dir / "error.log").read_text()
    assert (m.log_dir / "debug.log").exists()
    assert PATIENT_NAME not in m.log_text() and PATIENT_NAME.split("^")[0] not in m.log_text()


def test_files_named_after_the_patient_keep_the_name_out_of_the_logs(local: Backend, mount_factory,
                                                                    dicom: DicomFactory, tmp_path: Path):
    """Exports are often named after the patient. Copied in (stored, refused, overwritten,
    looked up before it exists, renamed, removed), the name never reaches a log line, DEBUG
    included, nor the terminal; the lines about one file still say which one (a placeholder)."""
    inst = dicom.instance()
    named = tmp_path / f"{PATIENT_NAME}.dcm"
    named.write_bytes(inst.path.read_bytes())
    refused = tmp_path / f"{PATIENT_NAME} notes.dcm"
    refused.write_text("not DICOM")
    m = mount_factory(local)
    store = m.path / local.store_name
    assert run("ls", store / named.name).returncode != 0  # looked up before it exists
    assert run("cp", named, store).returncode == 0
    assert run("cp", named, store).returncode == 0  # again: the same instance
    r = run("cp", refused, store)
    assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
    run("mv", store / named.name, store / f"{PATIENT_NAME} 2.dcm")  # allowed or not, both names are logged
    assert run("rm", "-f", store / named.name, store / f"{PATIENT_NAME} 2.dcm").returncode == 0
    assert len(kept_bytes(m.cache_dir)) == 1
    m.stop()
    text = m.log_text()
    assert "Uploaded /" in text and "<name-" in text
    assert PATIENT_NAME not in text and PATIENT_NAME.split("^")[0] not in text


def test_a_file_larger_than_a_quarter_of_the_cache_is_efbig(local: Backend, mount_factory, dicom: DicomFactory):
    big = dicom.instance(pixel_bytes=1_500_000)  # the cache's largest file is 4 MB / 4 = 1 MiB
    m = mount_factory(local, "--cacheSize", "4")
    r = run("cp", big.path, m.path / local.store_name)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr
    assert not local.has(big)


@pytest.mark.parametrize("name,err", [("has space", "Invalid argument"), ("semi;colon", "Invalid argument"),
                                      ("x" * 300, "Invalid argument")])
def test_store_names_the_server_would_refuse(local: Backend, mount_factory, name: str, err: str):
    m = mount_factory(local)
    r = run("mkdir", m.path / name)
    assert r.returncode != 0 and err in r.stderr, r.stderr
    assert local.store_ids is not None and name not in local.store_ids()


def test_unicode_store_name_and_dot_dot(local: Backend, mount_factory):
    m = mount_factory(local)
    assert run("mkdir", m.path / "études-2024").returncode == 0
    assert local.store_ids is not None and "études-2024" in local.store_ids()
    assert os.path.realpath(m.path / local.store_name / "..") == os.path.realpath(m.path)


def test_paths_deeper_than_the_model(local: Backend, mount_factory, dicom: DicomFactory):
    inst = dicom.instance()
    local.seed([inst])
    m = mount_factory(local)
    instance = local.instance_path(m, inst)
    with pytest.raises(OSError) as e:
        (instance / "inside").mkdir()
    assert e.value.errno in (errno.ENOTDIR, errno.EPERM, errno.ENOENT)
    with pytest.raises(OSError) as e:
        (local.series_path(m, inst) / "sub").mkdir()
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        open(instance / "x.dcm", "wb").close()
    assert e.value.errno in (errno.ENOTDIR, errno.ENOENT)


def test_writing_to_a_file_opened_read_only(local: Backend, mount_factory, dicom: DicomFactory):
    inst = dicom.instance()
    local.seed([inst])
    m = mount_factory(local)
    fd = os.open(local.instance_path(m, inst), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert local.server_bytes(inst) == inst.path.read_bytes()


def test_an_address_that_is_not_a_dicomweb_server_stops_with_one_line(tmp_path: Path):
    page = LoopbackServer(lambda seen: Reply(200, b"<html><body>Welcome</body></html>", {"Content-Type": "text/html"}))
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        r = subprocess.run([sys.executable, "-m", "dicomfuse", "-a", page.base_url + "/web", "-p", str(mnt),
                            "--cacheDir", str(tmp_path / "c"), "--logDir", str(tmp_path / "l")],
                           capture_output=True, text=True, timeout=60)
    finally:
        page.stop()
    assert r.returncode == 1, r.stderr
    assert "Cannot reach the dataset" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.ismount(mnt)


def test_the_readme_extra_mount_options_mount_and_bad_ones_fail_naming_them(local: Backend, mount_factory,
                                                                            dicom: DicomFactory, tmp_path: Path):
    """The README's example (allow_other,max_read=131072) mounted nothing, yet exited 0 and said
    it unmounted: libfuse 3 refuses max_read unless init() asks for it too. A libfuse user's
    "-o allow_other" works as well. An option libfuse refuses fails with exit 1, naming the
    option instead of blaming FUSE or the folder."""
    inst = dicom.instance()
    local.seed([inst])
    for extra in ("allow_other,max_read=131072", "-o allow_other -o max_read=65536"):
        m = mount_factory(local, "--extraMountOptions", extra)
        assert local.instance_path(m, inst).read_bytes() == inst.path.read_bytes()
        m.stop()
        assert m.returncode == 0 and "Unmounted" in m.log_text()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([sys.executable, "-m", "dicomfuse", "-a", local.address, "-p", str(mnt),
                        "--extraMountOptions", "bogus_opt", "--cacheDir", str(tmp_path / "c"),
                        "--logDir", str(tmp_path / "l")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "check --extraMountOptions bogus_opt" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("root", ["/dicomweb", "/wado", "/dicom-web/studies/x"])
def test_a_mistyped_dicomweb_root_stops_the_mount_with_one_line(orthanc: object, tmp_path: Path, root: str):
    """Orthanc answers 404 under a root that is not its DICOMweb one: the start-up check was a
    lookup of one UID, whose 404 means "no such study", so the mount started and showed the
    store empty (ls exit 0) while the server held studies."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    address = f"{orthanc.url}{root}"  # type: ignore[attr-defined]
    r = subprocess.run([sys.executable, "-m", "dicomfuse", "-a", address, "-p", str(mnt),
                        "--cacheDir", str(tmp_path / "c"), "--logDir", str(tmp_path / "l")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "No DICOMweb service at this address" in r.stderr and "/dicom-web" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not os.path.ismount(mnt)
