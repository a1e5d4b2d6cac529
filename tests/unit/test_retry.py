"""``dicomfuse retry``: failed uploads of both modes sent again to a real local dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomfuse.cli.retry import EXIT_DONE, EXIT_REMAINING, EXIT_USAGE, EXIT_WOULD_SEND, run_retry
from dicomfuse.cli.status import status_report
from dicomfuse.core.uploads import Spool, read_sidecar, sidecar_path
from dicomfuse.core.writeback import QueuedUpload, WriteBackQueue, queue_dir
from dicomfuse.dicomfile import DicomUids
from dicomfuse.samples import make_uid, write_instance
from dicomfuse.stores.open import open_dataset
from tests.conftest import PATIENT_NAME


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dataset = tmp / "dataset"
        for store in ("ct", "mr"):
            (self.dataset / store).mkdir(parents=True)
        self.cache = tmp / "cache"
        failed = self.cache / "spool" / "failed"
        failed.mkdir(parents=True)
        self.spool = Spool(self.cache / "spool", failed)
        self.n = 0

    def dicom(self, tag: str = "a", **kwargs: object) -> tuple[Path, DicomUids]:
        self.n += 1
        uids = DicomUids(make_uid(tag), make_uid(tag, 1), make_uid(tag, 1, self.n))
        path = write_instance(self.tmp / "src" / f"{self.n}.dcm", uids.study_uid, uids.series_uid, uids.sop_uid,
                              patient_name=PATIENT_NAME, **kwargs)
        return path, uids

    def failed_sync(self, path: Path, label: str, store: str | None) -> Path:
        return self.spool.keep_failed(path, label, store=store, reason="the server was unreachable")

    def run(self, *args: str) -> int:
        return run_retry(["-a", str(self.dataset), "--cacheDir", str(self.cache), *args])

    def on_server(self, store: str, uids: DicomUids) -> bytes | None:
        ds = open_dataset(str(self.dataset))
        found = list(ds.open_store(store).instances(uids.study_uid, uids.series_uid, uids.sop_uid))
        if not found:
            return None
        sink = (self.tmp / "check.bin").open("wb+")
        with sink:
            ds.open_store(store).retrieve(uids.study_uid, uids.series_uid, uids.sop_uid, sink)
            sink.seek(0)
            return sink.read()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def refuse(store: str, items: list[QueuedUpload]):
    return [(item, False, "the server refused the file (409)") for item in items]


def test_sends_failed_files_of_both_modes_to_their_store(env, capsys):
    src1, u1 = env.dicom()
    data1 = src1.read_bytes()
    kept1 = env.failed_sync(src1, "scan one.dcm", "ct")
    src2, u2 = env.dicom("b")
    data2 = src2.read_bytes()
    q = WriteBackQueue(queue_dir(env.cache), refuse, settle=0.0, dataset=str(env.dataset))
    q.start()
    item = q.submit("mr", u2, src2)
    assert q.wait_idle(5)
    q.stop()
    record = queue_dir(env.cache) / "failed" / f"{item.id}.json"
    assert record.exists()
    assert env.run() == EXIT_DONE
    out = capsys.readouterr().out
    assert f"{kept1.name}: stored (store ct)" in out
    assert f"mr/{u2.study_uid}/{u2.series_uid}/{u2.sop_uid}.dcm: stored (store mr)" in out
    assert "2 stored, 0 already on the server, 0 kept." in out
    assert PATIENT_NAME not in out and PATIENT_NAME.split("^")[0] not in out
    assert env.on_server("ct", u1) == data1 and env.on_server("mr", u2) == data2
    assert env.on_server("mr", u1) is None
    assert not kept1.exists() and not sidecar_path(kept1).exists() and not record.exists()
    assert list((queue_dir(env.cache) / "failed").iterdir()) == []
    assert status_report(env.cache)[1] == 0
    assert env.run() == EXIT_DONE and "Nothing to retry" in capsys.readouterr().out


def test_invalid_file_stays_with_its_reason(env, capsys):
    src = env.tmp / "junk.dcm"
    src.write_bytes(b"not dicom at all")
    kept = env.failed_sync(src, "junk.dcm", "ct")
    assert env.run() == EXIT_REMAINING
    out = capsys.readouterr().out
    assert f"{kept.name}: kept: not a DICOM Part-10 file" in out and "0 stored, 0 already on the server, 1 kept." in out
    assert kept.read_bytes() == b"not dicom at all"
    info = read_sidecar(kept)
    assert info is not None and info.store == "ct" and info.reason.startswith("not a DICOM Part-10 file")
    text, code = status_report(env.cache)
    assert code == 1 and f"{kept.name} (store ct)" in text and "(not a DICOM Part-10 file" in text
    assert "dicomfuse retry -a ADDRESS" in text


def test_identical_server_copy_counts_as_done_and_another_version_is_never_overwritten(env, capsys):
    src, uids = env.dicom()
    data = src.read_bytes()
    same = env.tmp / "same.dcm"
    same.write_bytes(data)
    open_dataset(str(env.dataset)).open_store("ct").store_files([same])
    kept_same = env.failed_sync(src, "same.dcm", "ct")
    other, _ = env.dicom()  # the same UIDs with other bytes
    other_path = write_instance(env.tmp / "other.dcm", uids.study_uid, uids.series_uid, uids.sop_uid,
                                patient_name="Other^Name")
    assert other_path.read_bytes() != data
    kept_other = env.failed_sync(other_path, "other.dcm", "ct")
    assert env.run() == EXIT_REMAINING
    out = capsys.readouterr().out
    assert f"{kept_same.name}: already on the server (store ct)" in out
    assert f"{kept_other.name}: kept: the server holds another version" in out
    assert "0 stored, 1 already on the server, 1 kept." in out
    assert not kept_same.exists() and kept_other.exists()
    assert env.on_server("ct", uids) == data  # not overwritten
    assert read_sidecar(kept_other).reason == "the server holds another version"


def test_dry_run_changes_nothing(env, capsys):
    src, uids = env.dicom()
    kept = env.failed_sync(src, "a.dcm", "ct")
    note = sidecar_path(kept).read_bytes()
    junk = env.tmp / "junk"
    junk.write_bytes(b"junk")
    kept_junk = env.failed_sync(junk, "junk", "ct")
    junk_note = sidecar_path(kept_junk).read_bytes()
    assert env.run("--dry-run") == EXIT_REMAINING
    out = capsys.readouterr().out
    assert f"{kept.name}: would be sent to store ct" in out and f"{kept_junk.name}: kept: not a DICOM" in out
    assert "1 would be sent, 0 already on the server, 1 kept." in out
    assert kept.exists() and sidecar_path(kept).read_bytes() == note
    assert sidecar_path(kept_junk).read_bytes() == junk_note
    assert env.on_server("ct", uids) is None
    assert not (env.cache / "spool" / ".retry.lock").exists()


def test_a_dry_run_never_exits_0_while_files_wait_to_be_sent(env, capsys):
    """Its help says 0 means all sent: a script must not take a dry run for a retry that sent them."""
    src, uids = env.dicom()
    kept = env.failed_sync(src, "a.dcm", "ct")
    assert env.run("--dry-run") == EXIT_WOULD_SEND == 3
    assert "1 would be sent, 0 already on the server, 0 kept." in capsys.readouterr().out
    assert kept.exists() and env.on_server("ct", uids) is None
    same = env.tmp / "same.dcm"  # the server gets an identical copy: nothing needs sending any more
    same.write_bytes(kept.read_bytes())
    open_dataset(str(env.dataset)).open_store("ct").store_files([same])
    assert env.run("--dry-run") == EXIT_DONE
    assert "0 would be sent, 1 already on the server, 0 kept." in capsys.readouterr().out
    assert kept.exists()  # a dry run deletes nothing
    assert env.run() == EXIT_DONE and not kept.exists()
    assert env.run("--dry-run") == EXIT_DONE and "Nothing to retry" in capsys.readouterr().out


def test_retry_help_gives_the_dry_run_exit_codes(capsys):
    assert run_retry(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "0 all sent (nothing left to send), 1 some remain, 2 usage error" in out
    assert "With --dry-run: 0 nothing needs sending" in out and "3 they would all be sent (nothing was)" in out


def test_store_option_for_files_without_a_store(env, capsys):
    src, uids = env.dicom()
    kept = env.failed_sync(src, "a.dcm", None)
    legacy = env.cache / "spool" / "failed" / "20240101-120000-0-old.dcm"  # an older kept file: no sidecar
    src2, uids2 = env.dicom()
    legacy.write_bytes(src2.read_bytes())
    assert env.run() == EXIT_REMAINING
    out = capsys.readouterr().out
    assert out.count("kept: no store known for this file: give --store NAME") == 2
    assert kept.exists() and legacy.exists()
    assert env.run("--store", "mr") == EXIT_DONE
    assert env.on_server("mr", uids) is not None and env.on_server("mr", uids2) is not None
    assert not kept.exists() and not legacy.exists()


def stopped_mount_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_uploads_a_stopped_sync_mount_left_unconfirmed_are_sent(env, capsys):
    """kill -9 of a sync mount during a copy leaves the file in spool/*.part; retry takes it
    (its store is not known: --store), not only the next mount. A running mount's own file in
    progress is left alone."""
    src, uids = env.dicom()
    pid = stopped_mount_pid()
    left = env.cache / "spool" / f"{pid}-{int(time.time())}-0.part"
    left.write_bytes(src.read_bytes())
    (env.cache / "spool" / f"{pid}-{int(time.time())}-1.part").write_bytes(b"")  # opened, never written
    live = env.cache / "spool" / f"{os.getppid()}-{int(time.time())}-0.part"
    live.write_bytes(b"in progress")
    assert env.run("--dry-run", "--store", "ct") == EXIT_WOULD_SEND
    assert left.exists() and env.on_server("ct", uids) is None
    assert env.run() == EXIT_REMAINING  # no store known: kept, now in spool/failed with its note
    assert "kept: no store known for this file: give --store NAME" in capsys.readouterr().out
    text = status_report(env.cache)[0]
    assert not left.exists() and f"{uids.sop_uid}.dcm" in text and "Unconfirmed uploads" not in text
    assert env.run("--store", "ct") == EXIT_DONE
    assert env.on_server("ct", uids) == src.read_bytes()
    assert live.read_bytes() == b"in progress"
    assert [p.name for p in (env.cache / "spool" / "failed").iterdir()] == []


def test_usage_errors(env, capsys):
    src, _ = env.dicom()
    kept = env.failed_sync(src, "a.dcm", None)
    assert env.run("--store", "nope") == EXIT_USAGE
    assert "no store called 'nope'" in capsys.readouterr().err
    assert run_retry(["--cacheDir", str(env.cache)]) == EXIT_USAGE  # no address
    assert run_retry(["-a", "bogus://x", "--cacheDir", str(env.cache)]) == EXIT_USAGE
    assert run_retry(["-a", str(env.tmp / "missing"), "--cacheDir", str(env.cache)]) == EXIT_USAGE
    for timeout in ("inf", "nan", "0", "99999999999999999999"):  # as the mount's: never a traceback
        assert env.run("--httpTimeout", timeout) == EXIT_USAGE
        assert "--httpTimeout:" in capsys.readouterr().err
    assert env.run("--httpTimeout", "5,30", "--dry-run") != EXIT_USAGE
    assert kept.exists()


def test_a_cache_folder_this_user_cannot_read_is_an_error_not_nothing_to_retry(env, capsys, monkeypatch):
    src, _ = env.dicom()
    env.failed_sync(src, "scan.dcm", "ct")
    spool = env.cache / "spool"
    real = os.listdir

    def listdir(path="."):
        if Path(path) == spool or spool in Path(path).parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    assert env.run() == EXIT_USAGE
    captured = capsys.readouterr()
    assert "Nothing to retry" not in captured.out
    assert captured.err == (f"dicomfuse retry: error: cannot read {spool}: Permission denied (run as the user the "
                            "mount runs as)\n")


def test_a_wrong_address_is_said_even_when_nothing_is_to_be_sent(env, capsys):
    """With no failed upload, a mistyped address exited 0 with "Nothing to retry", as if it
    were right; a server's address is not contacted for that."""
    assert run_retry(["-a", str(env.tmp / "missing"), "--cacheDir", str(env.cache)]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert run_retry(["-a", "localhost:8042/dicom-web", "--cacheDir", str(env.cache)]) == EXIT_USAGE
    assert "did you mean http://localhost:8042/dicom-web" in capsys.readouterr().err
    assert run_retry(["-a", "http://127.0.0.1:9/dicom-web", "--cacheDir", str(env.cache)]) == EXIT_DONE
    assert "Nothing to retry" in capsys.readouterr().out


def test_a_sidecar_naming_a_store_the_dataset_lacks_keeps_the_file(env, capsys):
    src, _ = env.dicom()
    kept = env.failed_sync(src, "a.dcm", "gone")
    assert env.run() == EXIT_REMAINING
    assert f"{kept.name}: kept: no store called 'gone' in the dataset" in capsys.readouterr().out
    assert read_sidecar(kept).reason == "the server was unreachable"  # not a verdict on the file
    json.loads(sidecar_path(kept).read_text())


def test_write_back_record_gets_the_new_reason_and_other_datasets_are_left_alone(env, capsys):
    q = WriteBackQueue(queue_dir(env.cache), refuse, settle=0.0, dataset=str(env.dataset))
    q.start()
    junk = env.tmp / "junk"
    junk.write_bytes(b"junk")
    bad = q.submit("ct", DicomUids("1.2.3", "1.2.3.4", "1.2.3.4.5"), junk)
    src, uids = env.dicom()
    assert q.wait_idle(5)
    q.stop()
    elsewhere = WriteBackQueue(queue_dir(env.cache), refuse, settle=0.0, dataset="https://other/dicom-web")
    elsewhere.start()
    other = elsewhere.submit("ct", uids, src)
    assert elsewhere.wait_idle(5)
    elsewhere.stop()
    assert env.run() == EXIT_REMAINING
    out = capsys.readouterr().out
    assert "kept: it was written to another dataset (https://other/dicom-web)" in out
    failed = queue_dir(env.cache) / "failed"
    assert json.loads((failed / f"{bad.id}.json").read_text())["last_error"].startswith("not a DICOM Part-10 file")
    assert json.loads((failed / f"{other.id}.json").read_text())["last_error"] == "the server refused the file (409)"
    assert (failed / f"{other.id}.dcm").exists() and env.on_server("ct", uids) is None


def test_two_kept_versions_of_one_instance_never_go_together(env, capsys):
    """Two copies of one instance that failed one after the other: the newest is sent, the older
    stays kept (the server is never asked to take both, and nothing is deleted unconfirmed)."""
    import os
    import time

    src, uids = env.dicom()
    older = env.failed_sync(src, "v1.dcm", "ct")
    newer_src = write_instance(env.tmp / "v2.dcm", uids.study_uid, uids.series_uid, uids.sop_uid,
                               patient_name="Other^Name")
    time.sleep(0.01)
    newer = env.failed_sync(newer_src, "v2.dcm", "ct")
    assert os.stat(newer).st_ctime_ns > os.stat(older).st_ctime_ns
    newer_bytes = newer.read_bytes()
    assert newer_bytes != older.read_bytes()
    assert env.run() == EXIT_REMAINING
    out = capsys.readouterr().out
    assert f"{newer.name}: stored (store ct)" in out
    assert f"{older.name}: kept: the server holds another version" in out
    assert "1 stored, 0 already on the server, 1 kept." in out
    assert env.on_server("ct", uids) == newer_bytes
    assert older.exists() and not newer.exists()


def test_a_second_kept_version_identical_to_the_one_sent_is_done(env, capsys):
    src, uids = env.dicom()
    first = env.failed_sync(src, "a.dcm", "ct")
    copy = env.tmp / "copy.dcm"
    copy.write_bytes(first.read_bytes())
    second = env.failed_sync(copy, "b.dcm", "ct")
    assert env.run() == EXIT_DONE
    out = capsys.readouterr().out
    assert "1 stored, 1 already on the server, 0 kept." in out
    assert not first.exists() and not second.exists()


@pytest.mark.parametrize("written,given", [("v1beta1", "v1"), ("v1", "v1beta1")])
def test_a_healthcare_dataset_is_the_same_under_v1_and_v1beta1(env, capsys, written, given):
    """The README accepts v1beta1 URLs for the same dataset: a write-back record queued under one
    spelling (verbatim, as earlier versions wrote it) is sent by a retry given the other."""
    from tests.fakes.healthcare import HealthcareStandIn

    with HealthcareStandIn() as standin:
        standin.create_dataset("ds")
        standin.create_store("ds", "ct")
        key = standin.write_key_file(env.tmp / "key.json")
        key.chmod(0o600)
        src, uids = env.dicom()
        q = WriteBackQueue(queue_dir(env.cache), refuse, settle=0.0, dataset=standin.create_dataset("ds", written))
        q.start()
        item = q.submit("ct", uids, src)
        assert q.wait_idle(5)
        q.stop()
        record = queue_dir(env.cache) / "failed" / f"{item.id}.json"
        data = json.loads(record.read_text())
        data["dataset"] = standin.create_dataset("ds", written)
        record.write_text(json.dumps(data))
        rc = run_retry(["-a", standin.create_dataset("ds", given), "--keyFile", str(key),
                        "--cacheDir", str(env.cache)])
        out = capsys.readouterr().out
        assert rc == EXIT_DONE, out
        assert "another dataset" not in out and "1 stored, 0 already on the server, 0 kept." in out
        assert any(True for _ in standin.store_view("ds", "ct").instances(uids.study_uid, uids.series_uid,
                                                                          uids.sop_uid))


def test_a_failed_sync_upload_of_another_dataset_is_never_sent_to_this_one(env, capsys):
    """Two datasets share one cache folder (the default one): a sync upload kept after it failed
    for dataset A was sent by 'retry -a B' to B's store of the same name, and its bytes deleted
    when B held the instance already: A never got it, and status said nothing was left. The
    sidecar now names its dataset, as write-back records do."""
    src, uids = env.dicom()
    other = Spool(env.cache / "spool", env.cache / "spool" / "failed", dataset="https://other/dicom-web")
    kept = other.keep_failed(src, "scan.dcm", store="ct", reason="the server was unreachable")
    assert read_sidecar(kept).dataset == "https://other/dicom-web"  # type: ignore[union-attr]
    assert env.run() == EXIT_REMAINING
    assert "kept: it was written to another dataset (https://other/dicom-web)" in capsys.readouterr().out
    assert kept.exists() and env.on_server("ct", uids) is None
    mine = Spool(env.cache / "spool", env.cache / "spool" / "failed", dataset=str(env.dataset))
    src2, uids2 = env.dicom("b")
    mine.keep_failed(src2, "scan2.dcm", store="ct", reason="the server was unreachable")
    assert env.run() == EXIT_REMAINING  # its own is sent; the other dataset's stays
    assert env.on_server("ct", uids2) is not None and kept.exists()
