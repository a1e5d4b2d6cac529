"""Write-back uploads through a real mount: cp returns once files are checked and journaled, they
show at once, reach the server in the background, survive kill -9, and `dicomfuse status` tells."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from dicomfuse.stores.base import NotFound
from tests.conftest import Backend, DicomFactory, google_backend, requires_fuse, run
from tests.mounting import Mount, unmount_command, wait_for

pytestmark = [requires_fuse, pytest.mark.mount]


def status(m: Mount) -> tuple[int, str]:
    r = run(sys.executable, "-m", "dicomfuse", "status", "--cacheDir", m.cache_dir, "--logDir", m.log_dir)
    return r.returncode, r.stdout + r.stderr


def holds(backend: Backend, inst, data: bytes) -> bool:  # type: ignore[no-untyped-def]
    """Whether the server holds ``data`` for the instance (not yet, between the delete and the
    store of an overwrite)."""
    try:
        return backend.server_bytes(inst) == data
    except NotFound:
        return False


def test_copy_in_write_back_mode_lands_on_the_server(backend: Backend, mount_factory, dicom: DicomFactory,
                                                     tmp_path: Path):
    m = mount_factory(backend, "--uploadMode", "writeback")
    src = tmp_path / "src"
    src.mkdir()
    insts = [dicom.instance(study=i % 3, name=f"img{i}.dcm") for i in range(12)]
    for i in insts:
        os.replace(i.path, src / i.path.name)
    r = run("sh", "-c", f'cp "{src}"/*.dcm "{m.path / backend.store_name}/"')
    assert r.returncode == 0, r.stderr
    for i in insts:  # visible and readable at once, whatever the upload's progress
        assert (backend.instance_path(m, i)).read_bytes() == (src / f"{i.path.name}").read_bytes()
    wait_for(lambda: all(backend.has(i) for i in insts), 60, what="the queued uploads")
    for i in insts:
        assert backend.server_bytes(i) == (src / i.path.name).read_bytes()
    wait_for(lambda: status(m)[0] == 0, 10, what="an empty queue")
    assert "Secret^Patient" not in status(m)[1]


def test_write_back_refusal_keeps_the_bytes_and_status_lists_it(healthcare, tmp_path: Path, mount_factory,  # type: ignore[no-untyped-def]
                                                               dicom: DicomFactory):
    google = google_backend(healthcare, tmp_path)
    m = mount_factory(google, "--uploadMode", "writeback")
    inst = dicom.instance()
    healthcare.deny("healthcare.dicomStores.dicomWebWrite")
    try:
        assert run("cp", inst.path, m.path / "store-a").returncode == 0, "write-back: close() succeeds"
        wait_for(lambda: status(m)[0] == 1, 30, what="the refusal to show in dicomfuse status")
    finally:
        healthcare.deny(None)
    code, text = status(m)
    assert "failed" in text.lower() and inst.sop_uid in text
    kept = list((m.cache_dir / "spool" / "writeback" / "failed").glob("*.dcm"))
    assert any(p.read_bytes() == inst.path.read_bytes() for p in kept)
    assert "failed" in (m.log_dir / "error.log").read_text()
    wait_for(lambda: inst.sop_uid + ".dcm" not in os.listdir(google.series_path(m, inst))
             if google.series_path(m, inst).exists() else True, 10, what="the refused file to leave its folder")


def test_kill_9_mid_upload_then_the_next_start_sends_it(healthcare, tmp_path: Path, dicom: DicomFactory):
    google = google_backend(healthcare, tmp_path)
    inst = dicom.instance()
    workdir = tmp_path / "crash"
    m = Mount(google.address, workdir, *google.extra_args, "--uploadMode", "writeback").start()
    try:
        os.listdir(m.path / "store-a")  # a token first
        healthcare.clear_log()  # the session's stand-in has seen other tests' STOWs
        healthcare.inject(stall=True, times=1, method="POST", path_contains="/dicomWeb/studies")  # never answers
        assert run("cp", inst.path, m.path / "store-a").returncode == 0
        wait_for(lambda: any(r.method == "POST" and r.path.endswith("/dicomWeb/studies") for r in healthcare.requests),
                 20, what="the STOW to start")
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)
    finally:
        run(*unmount_command(m.path, lazy=True))
    wait_for(lambda: not os.path.ismount(m.path), 10, what="the dead mount to go")
    healthcare.clear_faults()
    code, text = status(m)
    assert code == 3 and "1 upload pending" in text and "No running mount" in text, text
    m2 = Mount(google.address, workdir, *google.extra_args).start()  # sync mode: still sends leftovers
    try:
        wait_for(lambda: google.has(inst), 60, what="the journaled upload to be sent again")
        assert google.server_bytes(inst) == inst.path.read_bytes()
        assert "left by an earlier run" in m2.log_text()
    finally:
        m2.stop()


def test_a_batch_that_overwrites_one_instance_and_adds_others(backend: Backend, mount_factory, dicom: DicomFactory,
                                                              tmp_path: Path):
    """The sender asks which files of a batch the series holds already: that one is replaced
    (delete, then store), the others go in one STOW. Orthanc keeps the old bytes if a STOW
    repeats a SOP Instance UID, so a file wrongly taken for new would never reach the server."""
    if not backend.can_delete:
        pytest.skip("overwrite needs delete on this server")
    old, *others = dicom.series(4)
    backend.seed([old])
    m = mount_factory(backend, "--uploadMode", "writeback")
    from dicomfuse.samples import write_instance

    newer = write_instance(tmp_path / "newer.dcm", old.study_uid, old.series_uid, old.sop_uid, pixel_bytes=3000)
    r = run("cp", newer, *(o.path for o in others), f"{m.path / backend.store_name}/")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: all(backend.has(o) for o in others) and holds(backend, old, newer.read_bytes()), 60,
             what="the batch on the server")
    for o in others:
        assert backend.server_bytes(o) == o.path.read_bytes()


@pytest.mark.parametrize("resend", ["answered", "answer lost"])
def test_an_overwrite_sent_with_new_files_while_the_index_lags_replaces_the_instance(
        healthcare, tmp_path: Path, mount_factory, dicom: DicomFactory, resend: str):  # type: ignore[no-untyped-def]
    """Another client stored C a moment ago; Google's index does not show it yet, so the mount
    sends the new bytes of C in one STOW with a new file D. Google stores D and refuses C (202,
    C failed with a processing failure): C was then kept as a failed upload and the server kept
    the old bytes. A file failing so in a mixed answer is sent again alone; its 409 says the
    instance exists, and it is replaced. If the answer to that resend is lost, the batch is
    sent again later: looking C up found the old instance, and the refusal counted as done."""
    from dicomfuse.samples import write_instance

    backend = google_backend(healthcare, tmp_path)
    old, new_file = dicom.series(2)
    m = mount_factory(backend, "--uploadMode", "writeback")
    lag = healthcare.index_lag
    healthcare.index_lag = 600.0 if resend == "answered" else 1.5
    try:
        backend.server.store_files([old.path], lagging=True)  # type: ignore[call-arg]  # another client's STOW
        newer = write_instance(tmp_path / "newer.dcm", old.study_uid, old.series_uid, old.sop_uid, pixel_bytes=3000)
        if resend == "answer lost":  # the index shows C by the time the answer is known lost
            healthcare.inject(status=503, delay=2.5, method="POST", path_contains="/dicomWeb/studies", skip=1)
        r = run("cp", newer, new_file.path, f"{m.path / backend.store_name}/")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: holds(backend, new_file, new_file.path.read_bytes())
                 and holds(backend, old, newer.read_bytes()), 30, what="the overwrite on the server")
        assert status(m)[0] == 0, status(m)[1]
    finally:
        healthcare.index_lag = lag


def test_a_file_refused_in_a_mixed_answer_leaves_its_folder(healthcare, tmp_path: Path, mount_factory,  # type: ignore[no-untyped-def]
                                                            dicom: DicomFactory):
    """Google refuses a file (here: no SOP Class UID) that went in one STOW with a good one
    (202). Sent again alone, it gets Google's 409 for any refusal, taken for "held already":
    the overwrite found nothing to replace and the file was refused again, yet it stayed listed
    (ls: "No such file"), as if a previous version had been kept. It is a failed upload: gone
    from its folder, listed by dicomfuse status, its bytes kept."""
    import pydicom

    from dicomfuse.samples import make_dataset, make_uid

    backend = google_backend(healthcare, tmp_path)
    good = dicom.instance()
    ds = make_dataset(good.study_uid, good.series_uid, make_uid(dicom.seed, "no class"), pixel_bytes=5000)
    del ds.SOPClassUID
    del ds.file_meta.MediaStorageSOPClassUID
    ds.preamble = b"\0" * 128
    refused = tmp_path / "noclass.dcm"
    pydicom.dcmwrite(refused, ds, write_like_original=True)
    m = mount_factory(backend, "--uploadMode", "writeback")
    r = run("cp", good.path, refused, f"{m.path / backend.store_name}/")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: status(m)[0] == 1, 30, what="the refusal in dicomfuse status")
    assert backend.server_bytes(good) == good.path.read_bytes()
    series = backend.series_path(m, good)
    wait_for(lambda: f"{ds.SOPInstanceUID}.dcm" not in os.listdir(series), 10, what="the refused file gone")
    r = run("ls", "-l", series)
    assert r.returncode == 0, r.stderr


def test_overwrite_of_a_file_this_mount_just_uploaded_while_the_index_lags(healthcare, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                          mount_factory, dicom: DicomFactory):
    """Google's search index lags behind writes: it does not show an instance this mount
    uploaded a moment ago. Overwriting it then must still be an overwrite (delete, then store),
    not a STOW of new bytes under an existing SOP Instance UID, which Google refuses (and the
    file vanished from its folder while the server kept the old bytes)."""
    from dicomfuse.samples import write_instance

    backend = google_backend(healthcare, tmp_path)
    old, other = dicom.series(2)
    m = mount_factory(backend, "--uploadMode", "writeback")
    lag = healthcare.index_lag
    healthcare.index_lag = 600.0
    try:
        assert run("cp", old.path, f"{m.path / backend.store_name}/").returncode == 0
        wait_for(lambda: backend.has(old), 30, what="the first upload")
        newer = write_instance(tmp_path / "newer.dcm", old.study_uid, old.series_uid, old.sop_uid, pixel_bytes=3000)
        target = backend.instance_path(m, old)
        r = run("sh", "-c", f'cp "{newer}" "{target}" && cp "{other.path}" "{m.path / backend.store_name}/"')
        assert r.returncode == 0, r.stderr
        wait_for(lambda: backend.has(other) and holds(backend, old, newer.read_bytes()), 30,
                 what="the overwrite on the server")
        assert status(m)[0] == 0, status(m)[1]
        assert target.read_bytes() == newer.read_bytes()
    finally:
        healthcare.index_lag = lag


def test_two_files_of_one_sop_uid_in_two_studies_are_both_sent(backend: Backend, mount_factory,
                                                                dicom: DicomFactory, tmp_path: Path):
    """A file and an edited copy of it (other study and series, same SOP Instance UID) copied
    in together, then the original removed: the queue took the copy for a newer version of
    the original and dropped it (or the rm cancelled it), cp and rm exited 0, and the server
    ended with one instance, or none, while status said nothing failed."""
    if backend.name == "local":
        pytest.skip("the local store keeps one copy per SOP Instance UID whatever its series")
    from dicomfuse.samples import write_instance

    a = dicom.instance(study=0, series=0, pixel_bytes=2000)
    b = dicom.edited_copy(a)
    study, series = b.study_uid, b.series_uid
    m = mount_factory(backend, "--uploadMode", "writeback")
    try:
        r = run("cp", a.path, b.path, m.path / backend.store_name)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: backend.has(a) and backend.has(b), 60, what="both uploads")
        assert backend.server_bytes(a) == a.path.read_bytes() and backend.server_bytes(b) == b.path.read_bytes()
        edited_again = tmp_path / "edited-again.dcm"
        write_instance(edited_again, study, series, a.sop_uid, pixel_bytes=3500)
        assert run("cp", edited_again, backend.instance_path(m, b)).returncode == 0  # b queued once more
        assert run("rm", backend.instance_path(m, a)).returncode == 0  # a's rm leaves b's upload alone
        wait_for(lambda: holds(backend, b, edited_again.read_bytes()), 60, what="b's new bytes")
        wait_for(lambda: status(m)[0] == 0, 30, what="an empty queue")
        assert not backend.has(a)
    finally:  # a server shared by other tests, which count on unique SOP Instance UIDs
        for inst in (a, b):
            if backend.has(inst):
                backend.server.delete_instance(inst.study_uid, inst.series_uid, inst.sop_uid)
