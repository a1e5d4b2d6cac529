"""Network faults between a real mount and a real Orthanc: a fault proxy (tests/fakes/fault_proxy.py)
sits in between, and the mount speaks only DICOMweb (``--orthancRest off``) through it. Users
copy with real shell tools; they must get whole, byte-identical files or a clean I/O error, never
a short file, a cached failure, a lost upload or a duplicate."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import PATIENT_NAME, Backend, DicomFactory, _orthanc_backend, requires_fuse, run
from tests.fakes.fault_proxy import FaultProxy
from tests.mounting import wait_for

pytestmark = [requires_fuse, pytest.mark.mount]

NO_CACHE = ("--cacheTime", "0,0")
EIO = "Input/output error"


@pytest.fixture
def proxy(orthanc: object) -> Iterator[FaultProxy]:
    with FaultProxy(orthanc.url) as p:  # type: ignore[attr-defined]
        yield p


@pytest.fixture
def via_proxy(orthanc: object, proxy: FaultProxy) -> Backend:
    """Orthanc as a plain DICOMweb server, reached through the proxy (seeded and checked directly)."""
    direct = _orthanc_backend(orthanc, rest=False)
    return dataclasses.replace(direct, address=proxy.url + "/dicom-web")


def wado(inst) -> str:  # type: ignore[no-untyped-def]
    """What a WADO-RS retrieve of ``inst`` has in its path (a QIDO search has ``/instances?``)."""
    return f"/instances/{inst.sop_uid}"


def sop_count(orthanc: object, sop_uid: str) -> int:
    """How many instances with this SOP Instance UID Orthanc holds (asked without the proxy)."""
    r = requests.post(f"{orthanc.url}/tools/find", timeout=30,  # type: ignore[attr-defined]
                      json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    r.raise_for_status()
    return len(r.json())


def copy_out(src: Path, dest: Path):  # type: ignore[no-untyped-def]
    return run("cp", src, dest)


# ---------------------------------------------------------------------------------------------
# Downloads


def test_download_dropped_mid_body_is_retried(via_proxy: Backend, proxy: FaultProxy, mount_factory,
                                              dicom: DicomFactory, tmp_path: Path):
    inst = dicom.instance(pixel_bytes=300_000)
    via_proxy.seed([inst])
    m = mount_factory(via_proxy, *NO_CACHE)
    proxy.fail("GET", wado(inst), times=1, drop_mid_body=True)
    r = copy_out(via_proxy.instance_path(m, inst), tmp_path / "out.dcm")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.dcm").read_bytes() == inst.path.read_bytes()
    faults = [s.fault for s in proxy.requests("GET", wado(inst))]
    assert faults[0] == "drop_mid_body" and None in faults, faults


def test_download_retries_503_with_retry_after_and_500(via_proxy: Backend, proxy: FaultProxy, mount_factory,
                                                       dicom: DicomFactory, tmp_path: Path):
    inst = dicom.instance(pixel_bytes=100_000)
    via_proxy.seed([inst])
    m = mount_factory(via_proxy, *NO_CACHE)
    proxy.fail("GET", wado(inst), times=2, status=503, retry_after=1)
    proxy.fail("GET", wado(inst), times=2, status=500)
    r = copy_out(via_proxy.instance_path(m, inst), tmp_path / "out.dcm")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.dcm").read_bytes() == inst.path.read_bytes()
    seen = proxy.requests("GET", wado(inst))
    assert [s.fault for s in seen[:5]] == ["status 503", "status 503", "status 500", "status 500", None], seen
    # Retry-After: 1 was honoured (the plain backoff before a first retry is at most 0.5 s).
    assert seen[1].at - seen[0].at >= 0.9, seen


def test_download_failing_past_the_retries_is_eio_and_not_cached(via_proxy: Backend, proxy: FaultProxy,
                                                                 mount_factory, dicom: DicomFactory,
                                                                 tmp_path: Path):
    inst = dicom.instance(pixel_bytes=100_000)
    via_proxy.seed([inst])
    m = mount_factory(via_proxy, *NO_CACHE)
    path = via_proxy.instance_path(m, inst)
    proxy.fail("GET", wado(inst), times=None, status=500)
    r = run("cat", path)
    assert r.returncode != 0 and EIO in r.stderr, (r.returncode, r.stderr)
    assert len(proxy.requests("GET", wado(inst))) >= 2  # it did retry
    proxy.clear()
    r = copy_out(path, tmp_path / "out.dcm")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.dcm").read_bytes() == inst.path.read_bytes()


def test_truncated_multipart_is_never_served(via_proxy: Backend, proxy: FaultProxy, mount_factory,
                                             dicom: DicomFactory, tmp_path: Path):
    inst = dicom.instance(pixel_bytes=100_000)
    via_proxy.seed([inst])
    m = mount_factory(via_proxy, *NO_CACHE)
    path = via_proxy.instance_path(m, inst)
    proxy.fail("GET", wado(inst), times=None, truncate_multipart=True)
    r = copy_out(path, tmp_path / "short.dcm")
    assert r.returncode != 0 and EIO in r.stderr, (r.returncode, r.stderr)
    short = tmp_path / "short.dcm"
    assert not short.exists() or short.stat().st_size == 0
    try:
        assert os.stat(path).st_size in (0, len(inst.path.read_bytes()))  # never the short size
    except OSError as exc:
        assert exc.errno == errno.EIO
    assert any(s.fault == "truncate_multipart" for s in proxy.requests("GET", wado(inst)))
    proxy.clear()
    r = copy_out(path, tmp_path / "out.dcm")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.dcm").read_bytes() == inst.path.read_bytes()


def test_hung_server_read_times_out_and_mount_stays_usable(via_proxy: Backend, proxy: FaultProxy, mount_factory,
                                                           dicom: DicomFactory):
    inst = dicom.instance(pixel_bytes=10_000)
    via_proxy.seed([inst])
    m = mount_factory(via_proxy, *NO_CACHE, "--httpTimeout", "2,2")
    path = via_proxy.instance_path(m, inst)
    proxy.fail("GET", wado(inst), times=None, stall=True)
    r = run("timeout", "60", "cat", path)  # returns, not hangs (timeout exits 124)
    assert r.returncode not in (0, 124) and EIO in r.stderr, (r.returncode, r.stderr)
    proxy.clear()
    r = run("ls", path.parent)
    assert r.returncode == 0 and f"{inst.sop_uid}.dcm" in r.stdout.split(), r.stderr



def test_a_hung_server_is_asked_once_more_not_for_every_retry(via_proxy: Backend, proxy: FaultProxy,
                                                             mount_factory, dicom: DicomFactory):
    """A server silent past --httpTimeout is asked once more, and not again through its other
    API (Orthanc's REST, then WADO-RS: the same server): EIO after about twice the timeout, not
    ten times it."""
    inst = dicom.instance(pixel_bytes=10_000)
    via_proxy.seed([inst])
    m = mount_factory(via_proxy, *NO_CACHE, "--httpTimeout", "2,1")
    path = via_proxy.instance_path(m, inst)
    path.stat()
    before = len(proxy.requests())
    proxy.fail(None, None, times=None, stall=True)
    r = run("timeout", "60", "cat", path)
    assert r.returncode not in (0, 124) and EIO in r.stderr, (r.returncode, r.stderr)
    asked = [s.path for s in proxy.requests()[before:]]
    assert len(asked) == 2, asked
    proxy.clear()
    assert path.read_bytes() == inst.path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Listings


def test_listing_answered_429_then_ok(via_proxy: Backend, proxy: FaultProxy, mount_factory, dicom: DicomFactory):
    insts = dicom.series(3, pixel_bytes=1000)
    via_proxy.seed(insts)
    m = mount_factory(via_proxy, *NO_CACHE)
    series = via_proxy.series_path(m, insts[0])
    qido = f"/series/{insts[0].series_uid}/instances"
    proxy.fail("GET", qido, times=1, status=429, retry_after=1)
    r = run("ls", series)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(f"{i.sop_uid}.dcm" for i in insts)
    seen = proxy.requests("GET", qido)
    assert seen[0].fault == "status 429" and seen[1].fault is None, seen
    assert seen[1].at - seen[0].at >= 0.9, seen  # Retry-After honoured


def test_server_down_during_listing(via_proxy: Backend, proxy: FaultProxy, mount_factory, dicom: DicomFactory):
    insts = dicom.series(2, pixel_bytes=1000)
    via_proxy.seed(insts)
    m = mount_factory(via_proxy, *NO_CACHE)
    series = via_proxy.series_path(m, insts[0])
    want = sorted(f"{i.sop_uid}.dcm" for i in insts)
    assert run("ls", m.path / via_proxy.store_name).returncode == 0  # the mount has live connections
    back = proxy.down(2.0)
    r = run("ls", series)
    assert r.returncode == 0 and sorted(r.stdout.split()) == want or EIO in r.stderr, (r.returncode, r.stderr)
    back.join()
    r = run("ls", series)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == want


def test_orthancs_index_failing_never_lists_files_as_empty(orthanc: object, proxy: FaultProxy, mount_factory,
                                                           dicom: DicomFactory, tmp_path: Path):
    """Orthanc's REST index gives the sizes the mount shows (the OS keeps them for a second).
    When one of its calls failed, a DICOMweb search answered instead, without sizes: every
    file showed size 0, and tar archived them empty with exit 0 (cp -r copied most empty).
    A failed walk now leaves the folders to be listed one by one through the index, and a
    failed series listing is an error asked again next time, never a listing of empty files."""
    insts = dicom.series(6, pixel_bytes=50_000) + dicom.series(4, study=1, pixel_bytes=50_000)
    direct = _orthanc_backend(orthanc)
    direct.seed(insts)
    backend = dataclasses.replace(direct, address=proxy.url + "/dicom-web")
    proxy.fail("GET", "/instances?expand", times=None, status=503)  # the walk of the whole index
    m = mount_factory(backend)
    store = m.path / backend.store_name
    r = run("find", store, "-name", "*.dcm")
    assert r.returncode == 0, r.stderr
    assert {f"{i.sop_uid}.dcm" for i in insts} <= {Path(line).name for line in r.stdout.split()}
    # The walk runs on in the background while its requests are retried, then gives up.
    wait_for(lambda: "Walked store" in m.log_text() or "Walk of store" in m.log_text(), 60, what="the walk's end")
    series = backend.series_path(m, insts[0])
    # ls -l shows what the OS then keeps for a second: tar right after archives those sizes.
    r = run("sh", "-c", f'ls -l "{series}" && tar cf "{tmp_path / "x.tar"}" -C "{store}" {insts[0].study_uid}')
    assert r.returncode == 0, r.stderr
    assert " 0 " not in r.stdout, r.stdout
    with tarfile.open(tmp_path / "x.tar") as tar:
        for inst in insts[:6]:
            member = tar.extractfile(f"{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm")
            assert member is not None and member.read() == inst.path.read_bytes()
    proxy.clear()
    # A series listing through the index failing past its retries: an error, not empty files.
    found = requests.post(f"{orthanc.url}/tools/find", timeout=30,  # type: ignore[attr-defined]
                          json={"Level": "Series", "Query": {"SeriesInstanceUID": insts[6].series_uid}})
    proxy.fail("GET", f"/series/{found.json()[0]}/instances", times=None, status=503)
    m2 = mount_factory(backend, "--cacheTime", "0,0")
    series = backend.series_path(m2, insts[6])
    r = run("ls", series)
    assert r.returncode != 0 and EIO in r.stderr, r.stdout
    proxy.clear()
    wait_for(lambda: run("ls", series).returncode == 0, 10, what="the listing once the index answers (a failure "
             "answers the listings right behind it for 2 s)")
    r = run("ls", "-l", series)
    assert r.returncode == 0, r.stderr
    listed = {line.split()[-1]: int(line.split()[4]) for line in r.stdout.splitlines()[1:]}
    assert listed == {f"{i.sop_uid}.dcm": i.path.stat().st_size for i in insts[6:]}


def test_an_orthanc_that_refuses_its_index_is_read_through_dicomweb(orthanc: object, proxy: FaultProxy,
                                                                     mount_factory, dicom: DicomFactory,
                                                                     tmp_path: Path):
    """An authorization plugin or a proxy lets /system and DICOMweb through but refuses
    /tools/find: every series failed to list (Permission denied). Such an Orthanc is read
    through DICOMweb only, as a server that lists no sizes."""
    insts = dicom.series(3, pixel_bytes=20_000)
    direct = _orthanc_backend(orthanc)
    direct.seed(insts)
    backend = dataclasses.replace(direct, address=proxy.url + "/dicom-web")
    proxy.fail("POST", "/tools/find", times=None, status=403)
    m = mount_factory(backend)
    series = backend.series_path(m, insts[0])
    r = run("cp", "-r", series, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for inst in insts:
        assert (tmp_path / "out" / f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()
    assert "refuses POST" in m.log_text() and "DICOMweb only" in m.log_text()


# ---------------------------------------------------------------------------------------------
# Uploads


def kept_in_failed(m, data: bytes) -> bool:  # type: ignore[no-untyped-def]
    return any(p.read_bytes() == data for p in (m.cache_dir / "spool" / "failed").rglob("*") if p.is_file())


def test_upload_dropped_before_forwarding_is_never_lost(via_proxy: Backend, proxy: FaultProxy, orthanc: object,
                                                        mount_factory, dicom: DicomFactory):
    """The STOW connection is closed before the server saw the request: either cp succeeds and the
    server holds the file once, or cp fails and its bytes are kept in spool/failed."""
    m = mount_factory(via_proxy, *NO_CACHE)
    inst = dicom.instance(name="scan.dcm", pixel_bytes=50_000)
    proxy.fail("POST", "/studies", times=1, drop_before=True)
    r = run("cp", inst.path, m.path / via_proxy.store_name)
    assert [s.fault for s in proxy.requests("POST", "/studies")][:1] == ["drop_before"]
    count = sop_count(orthanc, inst.sop_uid)
    if r.returncode == 0:
        assert count == 1 and via_proxy.server_bytes(inst) == inst.path.read_bytes()
    else:
        assert EIO in r.stderr and count == 0, (r.stderr, count)
        assert kept_in_failed(m, inst.path.read_bytes())


def test_upload_dropped_before_forwarding_is_stored_once(via_proxy: Backend, proxy: FaultProxy, orthanc: object,
                                                         mount_factory, dicom: DicomFactory):
    m = mount_factory(via_proxy, *NO_CACHE)
    inst = dicom.instance(name="scan.dcm", pixel_bytes=50_000)
    proxy.fail("POST", "/studies", times=1, drop_before=True)
    r = run("cp", inst.path, m.path / via_proxy.store_name)
    assert r.returncode == 0, r.stderr
    assert sop_count(orthanc, inst.sop_uid) == 1
    assert via_proxy.server_bytes(inst) == inst.path.read_bytes()


def test_upload_while_server_down_is_sent_again(via_proxy: Backend, proxy: FaultProxy, orthanc: object,
                                                mount_factory, dicom: DicomFactory):
    """The server restarts (connections refused, nothing sent) as cp uploads: the requests are sent
    again once it is back, and the file is stored once."""
    m = mount_factory(via_proxy, *NO_CACHE)
    inst = dicom.instance(name="scan.dcm", pixel_bytes=50_000)
    assert run("ls", m.path / via_proxy.store_name).returncode == 0
    back = proxy.down(2.0)
    r = run("cp", inst.path, m.path / via_proxy.store_name)
    back.join()
    assert r.returncode == 0, r.stderr
    assert sop_count(orthanc, inst.sop_uid) == 1
    assert via_proxy.server_bytes(inst) == inst.path.read_bytes()


def test_upload_answers_lost_twice_are_sent_again_after_a_wait(via_proxy: Backend, proxy: FaultProxy,
                                                                orthanc: object, mount_factory, dicom: DicomFactory):
    """A server restarting loses two STOWs in a row (connections cut before it read them): the
    file is looked up and sent again after each, with the HTTP retries' backoff, and cp succeeds
    with the file stored once. (It was sent again once, at once: the second loss failed cp.)"""
    m = mount_factory(via_proxy, *NO_CACHE)
    inst = dicom.instance(name="scan.dcm", pixel_bytes=50_000)
    proxy.fail("POST", "/studies", times=2, drop_before=True)
    r = run("cp", inst.path, m.path / via_proxy.store_name)
    assert [s.fault for s in proxy.requests("POST", "/studies")] == ["drop_before", "drop_before", None]
    assert r.returncode == 0, r.stderr
    assert sop_count(orthanc, inst.sop_uid) == 1
    assert via_proxy.server_bytes(inst) == inst.path.read_bytes()


def test_upload_answers_always_lost_fail_the_copy_keeping_its_bytes(via_proxy: Backend, proxy: FaultProxy,
                                                                    orthanc: object, mount_factory,
                                                                    dicom: DicomFactory):
    m = mount_factory(via_proxy, *NO_CACHE)
    inst = dicom.instance(name="scan.dcm", pixel_bytes=50_000)
    proxy.fail("POST", "/studies", times=None, drop_before=True)
    r = run("cp", inst.path, m.path / via_proxy.store_name)
    assert r.returncode != 0 and EIO in r.stderr, r.stderr
    assert len(proxy.requests("POST", "/studies")) == 5  # the first and the HTTP retries' 4 more, then no more
    assert sop_count(orthanc, inst.sop_uid) == 0
    assert kept_in_failed(m, inst.path.read_bytes())


@pytest.mark.parametrize("fault", ["drop_mid_body", "drop_response"])
def test_upload_answer_lost_never_duplicates_or_loses(fault: str, via_proxy: Backend, proxy: FaultProxy,
                                                      orthanc: object, mount_factory, dicom: DicomFactory):
    """The server stored the file but its answer was cut or never came: the mount looks the file
    up, finds it, and cp succeeds; the server holds the instance exactly once."""
    m = mount_factory(via_proxy, *NO_CACHE)
    inst = dicom.instance(name="scan.dcm", pixel_bytes=50_000)
    proxy.fail("POST", "/studies", times=1, **{fault: True})  # type: ignore[arg-type]
    r = run("cp", inst.path, m.path / via_proxy.store_name)
    assert [s.fault for s in proxy.requests("POST", "/studies")][:1] == [fault]
    assert sop_count(orthanc, inst.sop_uid) == 1
    assert via_proxy.server_bytes(inst) == inst.path.read_bytes()
    assert r.returncode == 0, r.stderr


ECHOED = f"Cannot store: PatientName '{PATIENT_NAME}' does not match PatientID 123"
"""A server's refusal quoting the instance it was sent, as servers do."""


def _holds_patient_name(text: str) -> bool:
    return PATIENT_NAME in text or PATIENT_NAME.split("^")[0] in text


@pytest.mark.parametrize(
    ("mode", "body", "content_type", "code"),
    [
        ("sync", json.dumps({"HttpStatus": 400, "Message": ECHOED, "Details": ECHOED, "OrthancStatus": 15}), "",
         "Orthanc error 15 (bad file format)"),
        ("writeback", ECHOED, "text/plain", None),
    ],
    ids=["sync-orthanc-json", "writeback-text"],
)
def test_a_refusal_quoting_the_patient_reaches_no_log_record_or_status(
        mode: str, body: str, content_type: str, code: str | None, via_proxy: Backend, proxy: FaultProxy,
        mount_factory, dicom: DicomFactory):
    """The server refuses a STOW with a body that quotes the patient's name: the upload fails
    with the status (and the server's error code) as its reason, and the name reaches no log
    file, terminal output, record kept on disk or ``dicomfuse status``."""
    m = mount_factory(via_proxy, *NO_CACHE, "--uploadMode", mode)
    inst = dicom.instance(name="scan.dcm")
    proxy.fail("POST", "/studies", times=None, status=400, body=body.encode(), content_type=content_type)
    r = run("cp", inst.path, m.path / via_proxy.store_name)
    assert (r.returncode != 0) == (mode == "sync"), r.stderr
    assert not _holds_patient_name(r.stderr)

    def status() -> str:
        done = run(sys.executable, "-m", "dicomfuse", "status", "--cacheDir", m.cache_dir)
        return done.stdout + done.stderr

    wait_for(lambda: "Failed uploads: 1" in status(), 30, what="the refusal in status")
    assert not _holds_patient_name(status())
    error_log = (m.log_dir / "error.log").read_text()
    assert "HTTP 400" in error_log and (code is None or code in error_log), error_log
    assert not _holds_patient_name(m.log_text())  # every log file and the terminal output
    for path in m.cache_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if data[128:132] != b"DICM":  # the kept upload itself holds the name, as it should
                assert PATIENT_NAME.split("^")[0].encode() not in data, path


def test_a_refused_overwrite_puts_the_original_back(orthanc: object, proxy: FaultProxy, mount_factory,
                                                    dicom: DicomFactory):
    """Overwrite = delete, then store; the server refuses the new bytes: the original is stored
    back and cp fails, with the reason in the ERROR log."""
    from dicomfuse.samples import write_instance

    backend = dataclasses.replace(_orthanc_backend(orthanc, rest=True), address=proxy.url + "/dicom-web")
    inst = dicom.instance()
    backend.seed([inst])
    edited = dicom.instance(name="edited.dcm")
    write_instance(edited.path, inst.study_uid, inst.series_uid, inst.sop_uid, pixel_bytes=9_000)
    m = mount_factory(backend, *NO_CACHE)
    backend.instance_path(m, inst).stat()
    proxy.fail("POST", "/dicom-web/studies", times=1, status=400)
    r = run("cp", edited.path, backend.instance_path(m, inst))
    assert r.returncode != 0, "the refused overwrite fails the copy"
    assert backend.server_bytes(inst) == inst.path.read_bytes(), "the original is back on the server"
    assert sop_count(orthanc, inst.sop_uid) == 1
    assert "stored back" in (m.log_dir / "error.log").read_text()
    # It shows as the original at once: tar would archive the refused file's size, and warn.
    assert backend.instance_path(m, inst).stat().st_size == inst.path.stat().st_size
    assert backend.instance_path(m, inst).read_bytes() == inst.path.read_bytes()
    assert "changed on the server" not in (m.log_dir / "info.log").read_text()


def test_a_refused_write_back_overwrite_of_as_many_bytes_reads_as_the_original_again(
        orthanc: object, proxy: FaultProxy, mount_factory, dicom: DicomFactory, tmp_path: Path):
    """The refused bytes were read back while queued (so the OS holds their pages): once the
    server refuses them and the original is stored back, the file reads as the original."""
    backend = dataclasses.replace(_orthanc_backend(orthanc, rest=True), address=proxy.url + "/dicom-web")
    inst = dicom.instance()
    backend.seed([inst])
    data = inst.path.read_bytes()
    edited = tmp_path / "edited.dcm"
    edited.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    m = mount_factory(backend, "--uploadMode", "writeback")
    target = backend.instance_path(m, inst)
    target.stat()
    proxy.fail("POST", "/dicom-web/studies", times=1, status=400)
    assert run("cp", edited, target).returncode == 0  # checked and queued
    assert target.read_bytes() == edited.read_bytes()
    error_log = m.log_dir / "error.log"
    wait_for(lambda: error_log.exists() and "stored back" in error_log.read_text(), 30, what="the refusal")
    assert backend.server_bytes(inst) == data
    wait_for(lambda: target.read_bytes() == data, 10, what="the original read back through the mount")


def test_a_refused_write_back_overwrite_leaves_the_original_in_its_folder(orthanc: object, proxy: FaultProxy,
                                                                         mount_factory, dicom: DicomFactory):
    """Write-back: the server refuses the new bytes of an overwrite and the original is stored
    back. The file stays in its folder and reads as the original; it does not vanish while the
    server still holds it."""
    from dicomfuse.samples import write_instance

    backend = dataclasses.replace(_orthanc_backend(orthanc, rest=True), address=proxy.url + "/dicom-web")
    inst = dicom.instance()
    backend.seed([inst])
    edited = dicom.instance(name="edited.dcm")
    write_instance(edited.path, inst.study_uid, inst.series_uid, inst.sop_uid, pixel_bytes=9_000)
    m = mount_factory(backend, "--uploadMode", "writeback")
    target = backend.instance_path(m, inst)
    target.stat()
    proxy.fail("POST", "/dicom-web/studies", times=1, status=400)
    assert run("cp", edited.path, target).returncode == 0  # checked and queued
    error_log = m.log_dir / "error.log"
    wait_for(lambda: error_log.exists() and "stored back" in error_log.read_text(), 30, what="the refusal")
    wait_for(lambda: "Failed uploads: 1" in run(sys.executable, "-m", "dicomfuse", "status", "--cacheDir",
                                                 m.cache_dir).stdout, 10, what="the refusal in status")
    assert backend.server_bytes(inst) == inst.path.read_bytes(), "the original is back on the server"
    assert target.name in os.listdir(target.parent)
    assert target.read_bytes() == inst.path.read_bytes()
