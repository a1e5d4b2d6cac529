"""The write-back upload queue: real files and threads, a fake send_batch."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomfuse.core.writeback import QueueBusy, QueuedUpload, WriteBackQueue, queue_dir, read_status
from dicomfuse.dicomfile import DicomUids
from dicomfuse.stores.base import Unavailable
from tests.conftest import PATIENT_NAME, DicomFactory

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = Path(__file__).resolve().parents[2]

Result = list[tuple[QueuedUpload, bool, "str | None"]]


class FakeSender:
    """Records batches (with the bytes sent) and answers as ``decide`` says: True stored, a string
    is a refusal reason, an exception instance is raised for the whole batch."""

    def __init__(self, decide: Callable[[str, QueuedUpload, int], object] | None = None,
                 hold: threading.Event | None = None) -> None:
        self.decide = decide or (lambda store, item, call: True)
        self.hold = hold
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, list[str], float]] = []  # store, study, sop UIDs, time
        self.sent: dict[str, bytes] = {}  # sop UID -> bytes stored
        self.active: dict[str, int] = {}  # study -> batches being sent
        self.overlap_same_study = False
        self.flying_sops: set[str] = set()
        self.overlap_same_sop = False
        self.max_parallel = 0
        self.started = threading.Event()

    def __call__(self, store: str, items: list[QueuedUpload]) -> Result:
        studies = {i.uids.study_uid for i in items}
        assert len(studies) == 1, "one study per batch"
        (study,) = studies
        with self.lock:
            n = len(self.calls)
            self.calls.append((store, study, [i.uids.sop_uid for i in items], time.monotonic()))
            self.active[study] = self.active.get(study, 0) + 1
            self.overlap_same_study |= self.active[study] > 1
            self.max_parallel = max(self.max_parallel, sum(self.active.values()))
            sops = {i.uids.sop_uid for i in items}
            self.overlap_same_sop |= bool(sops & self.flying_sops)
            self.flying_sops |= sops
        self.started.set()
        try:
            if self.hold is not None:
                assert self.hold.wait(5)
            out: Result = []
            for item in items:
                answer = self.decide(store, item, n)
                if isinstance(answer, Exception):
                    raise answer
                if answer is True:
                    with self.lock:
                        self.sent[item.uids.sop_uid] = item.path.read_bytes()
                    out.append((item, True, None))
                else:
                    out.append((item, False, str(answer)))
            return out
        finally:
            with self.lock:
                self.active[study] -= 1
                self.flying_sops -= {i.uids.sop_uid for i in items}

    def batches(self, study: str | None = None) -> list[list[str]]:
        return [sops for _, st, sops, _ in self.calls if study is None or st == study]


class Files:
    """Upload sources in a spool folder (same filesystem as the queue) with distinct UIDs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def make(self, study: int = 1, size: int = 100, sop: str | None = None, data: bytes | None = None
             ) -> tuple[DicomUids, Path]:
        self.n += 1
        uids = DicomUids(f"1.2.826.{study}", f"1.2.826.{study}.1", sop or f"1.2.826.{study}.1.{self.n}")
        path = self.folder / f"upload-{self.n}.part"
        path.write_bytes(data if data is not None else bytes([self.n % 256]) * size)
        return uids, path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path / "cache" / "spool")


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return queue_dir(tmp_path / "cache")


@pytest.fixture
def queues():
    made: list[WriteBackQueue] = []
    yield made
    for q in made:
        q.stop(drain=False, timeout=2)


def make_queue(queues: list[WriteBackQueue], qdir: Path, sender, **kwargs) -> WriteBackQueue:
    kwargs.setdefault("settle", 0.02)
    kwargs.setdefault("backoff_base", 0.01)
    kwargs.setdefault("backoff_max", 0.05)
    kwargs.setdefault("status_interval", 0.05)
    kwargs.setdefault("sync_delay", 0.05)
    q = WriteBackQueue(qdir, sender, **kwargs)
    queues.append(q)
    return q


def journal(qdir: Path) -> list[str]:
    """Pending journal files (records and bytes), status and lock excluded."""
    return sorted(n for n in os.listdir(qdir) if re.fullmatch(r"[0-9a-f]{32}\.(json|dcm)", n))


def failed_files(qdir: Path) -> list[str]:
    return sorted(os.listdir(qdir / "failed"))


# ---------------------------------------------------------------------------------------------
# batching and parallelism


def test_one_batch_per_study_within_limits(queues, qdir, files):
    sender = FakeSender()
    done: list[tuple[str, bool]] = []
    q = make_queue(queues, qdir, sender, workers=2, batch_files=3,
                   on_done=lambda item, ok, why: done.append((item.uids.sop_uid, ok)))
    a = [q.submit("ct", *files.make(study=1)) for _ in range(7)]
    b = [q.submit("mr", *files.make(study=2)) for _ in range(2)]
    q.start()
    assert q.wait_idle(5)
    assert [len(x) for x in sender.batches("1.2.826.1")] == [3, 3, 1]
    assert sender.batches("1.2.826.2") == [[i.uids.sop_uid for i in b]]
    assert sorted(s for batch in sender.batches("1.2.826.1") for s in batch) == sorted(i.uids.sop_uid for i in a)
    assert {store for store, *_ in sender.calls} == {"ct", "mr"}
    assert not sender.overlap_same_sop
    assert sorted(done) == sorted((i.uids.sop_uid, True) for i in a + b)
    assert journal(qdir) == [] and failed_files(qdir) == []
    assert q.pending() == [] and q.failed() == []


def test_batch_bytes_limit(queues, qdir, files):
    sender = FakeSender()
    q = make_queue(queues, qdir, sender, batch_bytes=250)
    for _ in range(5):
        q.submit("ct", *files.make(size=100))
    q.submit("ct", *files.make(size=1000))  # larger than a batch: sent alone
    q.start()
    assert q.wait_idle(5)
    assert sorted(len(b) for b in sender.batches()) == [1, 1, 2, 2]


def test_studies_go_in_parallel_and_so_do_the_full_batches_of_one_study(queues, qdir, files):
    """A cp -r of one big study keeps every worker busy: its full batches do not wait for each
    other."""
    release = threading.Event()
    three = threading.Event()

    def decide(store, item, call):
        with sender.lock:
            if sum(sender.active.values()) >= 3:
                three.set()
        assert release.wait(5)
        return True

    sender = FakeSender(decide)
    q = make_queue(queues, qdir, sender, workers=3, batch_files=2, settle=60)
    q.start()
    for _ in range(4):
        q.submit("ct", *files.make(study=1))  # two full batches of study 1
    q.submit("ct", *files.make(study=2))
    q.submit("ct", *files.make(study=2))  # and one of study 2
    try:
        assert three.wait(5), "the batches were not sent at the same time"
    finally:
        release.set()
    assert q.wait_idle(5)
    assert sender.overlap_same_study and sender.max_parallel == 3
    assert sorted(map(len, sender.batches("1.2.826.1"))) == [2, 2] and len(sender.sent) == 6


def test_settle_lets_a_batch_fill(queues, qdir, files):
    sender = FakeSender()
    q = make_queue(queues, qdir, sender, settle=0.2)
    q.start()
    for _ in range(5):
        q.submit("ct", *files.make())
    assert q.wait_idle(3)
    assert [len(b) for b in sender.batches()] == [5]


# ---------------------------------------------------------------------------------------------
# retries, refusals, failures


def test_transient_failures_are_retried_with_backoff_then_succeed(queues, qdir, files):
    records: list[dict] = []

    def decide(store, item, call):
        if call == 1:
            records.append(json.loads((qdir / f"{item.id}.json").read_text()))
        return Unavailable("server busy (503)") if call < 2 else True

    sender = FakeSender(decide)
    done = []
    q = make_queue(queues, qdir, sender, backoff_base=0.05, backoff_max=0.2,
                   on_done=lambda item, ok, why: done.append((ok, why, item.attempts)))
    uids, src = files.make()
    q.submit("ct", uids, src)
    q.start()
    assert q.wait_idle(5)
    times = [t for *_, t in sender.calls]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.025 and times[2] - times[1] >= 0.05  # 0.05·2^n, jitter ≥ half
    assert records[0]["attempts"] == 1 and records[0]["last_error"] == "server busy (503)"
    assert done == [(True, None, 2)]
    assert journal(qdir) == [] and failed_files(qdir) == []


def test_backoff_is_exponential_capped_and_jittered(queues, qdir):
    q = make_queue(queues, qdir, FakeSender(), backoff_base=1.0, backoff_max=60.0)
    for attempts, full in ((1, 1.0), (2, 2.0), (4, 8.0), (7, 60.0), (30, 60.0)):
        delays = [q._backoff(attempts) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 1


def test_exhausted_retries_fail_with_bytes_kept_while_other_studies_go_on(queues, qdir, files, caplog):
    order: list[str] = []

    def decide(store, item, call):
        if item.uids.study_uid == "1.2.826.1":
            return Unavailable("connection reset")
        return True

    sender = FakeSender(decide)
    done = []
    q = make_queue(queues, qdir, sender, max_attempts=3, backoff_base=0.05, backoff_max=0.1,
                   on_done=lambda item, ok, why: (order.append(item.uids.study_uid), done.append((item, ok, why))))
    uids, src = files.make(study=1, data=b"precious bytes")
    bad = q.submit("ct", uids, src)
    q.submit("ct", *files.make(study=2))
    caplog.set_level(logging.DEBUG, logger="dicomfuse")
    q.start()
    assert q.wait_idle(5)
    assert len(sender.batches("1.2.826.1")) == 3
    assert order == ["1.2.826.2", "1.2.826.1"]  # the other study was not held up by the retries
    item, ok, why = done[-1]
    assert not ok and "connection reset" in why and "3 attempts" in why
    kept = qdir / "failed" / f"{bad.id}.dcm"
    assert item.path == kept and kept.read_bytes() == b"precious bytes"
    record = json.loads((qdir / "failed" / f"{bad.id}.json").read_text())
    assert record["sop_uid"] == uids.sop_uid and "connection reset" in record["last_error"]
    assert [f.id for f in q.failed()] == [bad.id]
    assert journal(qdir) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"Upload of ct/{uids.study_uid}/{uids.series_uid}/{uids.sop_uid}.dcm failed ({why}); "
                      f"its bytes are kept at {kept}"]


def test_a_server_that_cannot_be_reached_is_waited_for_past_max_attempts(queues, qdir, files):
    """No answer at all (the server or the network is down) uses up no attempts: the upload
    goes when the server is back, however long that takes, instead of being moved aside."""
    down = Unavailable("connection refused")
    down.unreachable = True

    def decide(store, item, call):
        return down if call < 6 else True

    sender = FakeSender(decide)
    done = []
    q = make_queue(queues, qdir, sender, max_attempts=3, backoff_base=0.01, backoff_max=0.02,
                   on_done=lambda item, ok, why: done.append(ok))
    uids, src = files.make(study=1, data=b"precious bytes")
    q.submit("ct", uids, src)
    q.start()
    assert q.wait_idle(10)
    assert len(sender.calls) == 7 and done == [True]
    assert sender.sent[uids.sop_uid] == b"precious bytes"
    assert q.failed() == [] and journal(qdir) == []


def test_refusal_fails_at_once_and_keeps_the_bytes(queues, qdir, files, caplog):
    refused_sop = "1.2.826.1.1.1"
    sender = FakeSender(lambda store, item, call: "SOP class not supported" if item.uids.sop_uid == refused_sop
                        else True)
    done = []
    q = make_queue(queues, qdir, sender, on_done=lambda item, ok, why: done.append((item.uids.sop_uid, ok, why)))
    refused = q.submit("ct", *files.make(sop=refused_sop, data=b"refused bytes"))
    accepted = q.submit("ct", *files.make())
    caplog.set_level(logging.INFO, logger="dicomfuse")
    q.start()
    assert q.wait_idle(5)
    assert len(sender.calls) == 1  # a refusal is final: not retried
    assert sorted(done) == sorted([(refused_sop, False, "SOP class not supported"),
                                   (accepted.uids.sop_uid, True, None)])
    assert failed_files(qdir) == sorted([f"{refused.id}.dcm", f"{refused.id}.json"])
    assert (qdir / "failed" / f"{refused.id}.dcm").read_bytes() == b"refused bytes"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "SOP class not supported" in errors[0] and refused_sop in errors[0]
    assert journal(qdir) == []


def test_an_unexpected_exception_is_retried_not_lost(queues, qdir, files, caplog):
    """...and logged by type and place (with its stack at DEBUG), never by message: sending
    reads DICOM files, and a message can quote a value, the patient's name say."""
    quoting = RuntimeError(f"invalid literal for int() with base 10: '{PATIENT_NAME}'")
    sender = FakeSender(lambda store, item, call: quoting if call == 0 else True)
    q = make_queue(queues, qdir, sender)
    q.submit("ct", *files.make())
    with caplog.at_level(logging.DEBUG):
        q.start()
        assert q.wait_idle(5)
    assert len(sender.calls) == 2 and len(sender.sent) == 1
    assert "unexpected RuntimeError" in caplog.text and "in __call__" in caplog.text
    assert PATIENT_NAME not in caplog.text


def test_a_failing_completion_callback_is_logged_without_its_message(queues, qdir, files, caplog):
    def on_done(item: QueuedUpload, stored: bool, reason: str | None) -> None:
        raise ValueError(f"invalid literal for int() with base 10: '{PATIENT_NAME}'")

    q = make_queue(queues, qdir, FakeSender(), on_done=on_done)
    q.submit("ct", *files.make())
    with caplog.at_level(logging.DEBUG):
        q.start()
        assert q.wait_idle(5)
    assert "completion callback failed" in caplog.text and "ValueError at test_writeback.py" in caplog.text
    assert PATIENT_NAME not in caplog.text


# ---------------------------------------------------------------------------------------------
# durability


CHILD = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from dicomfuse.core.writeback import WriteBackQueue
    from dicomfuse.dicomfile import DicomUids

    qdir, spool = Path(sys.argv[1]), Path(sys.argv[2])
    in_flight = threading.Event()

    def send_batch(store, items):
        in_flight.set()
        threading.Event().wait()  # the server never answers: killed mid-send

    q = WriteBackQueue(qdir, send_batch, settle=0.0, workers=2)
    for n in range(5):
        src = spool / f"f{n}.part"
        src.write_bytes(b"bytes %d" % n)
        q.submit("ct", DicomUids(f"1.2.3.{n % 2}", f"1.2.3.{n % 2}.1", f"1.2.3.{n % 2}.1.{n}"), src,
                 durable=sys.argv[3] == "durable")
    q.start()
    in_flight.wait(5)
    print("ready", flush=True)
    threading.Event().wait()
""")


@pytest.mark.parametrize("durable", ["durable", "group-commit"])
def test_a_crash_mid_send_loses_nothing(queues, qdir, files, tmp_path, durable):
    """Killed mid-send, fsynced at submit or not (a crash of the process keeps what the kernel
    was given; only a power cut before the group commit could lose it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(qdir), str(files.folder), durable],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    finally:
        child.kill()  # SIGKILL on POSIX, TerminateProcess on Windows (which has no SIGKILL)
        child.wait(5)
    sender = FakeSender()
    q = make_queue(queues, qdir, sender)
    recovered = q.recover()
    assert sorted(i.uids.sop_uid for i in recovered) == sorted(f"1.2.3.{n % 2}.1.{n}" for n in range(5))
    q.start()
    assert q.wait_idle(5)
    assert sender.sent == {f"1.2.3.{n % 2}.1.{n}": b"bytes %d" % n for n in range(5)}
    assert journal(qdir) == [] and list(files.folder.glob("*.part")) == []


def test_stop_without_drain_keeps_everything_for_the_next_start(queues, qdir, files):
    q = make_queue(queues, qdir, FakeSender(), dataset="https://user:secret@host/dicom-web")
    submitted = [q.submit("ct", *files.make(study=s)) for s in (1, 1, 2)]
    q.stop(drain=False)
    assert len(journal(qdir)) == 6
    assert "secret" not in "".join((qdir / n).read_text() for n in journal(qdir) if n.endswith(".json"))

    sender = FakeSender()
    q2 = make_queue(queues, qdir, sender, dataset="https://host/dicom-web")
    recovered = q2.recover()
    assert {(i.id, i.store, i.uids, i.size, i.queued_at) for i in recovered} == \
        {(i.id, i.store, i.uids, i.size, i.queued_at) for i in submitted}
    q2.start()
    assert q2.wait_idle(5)
    assert len(sender.sent) == 3 and journal(qdir) == []


def test_stop_without_drain_lets_the_batch_in_flight_finish(queues, qdir, files):
    hold = threading.Event()
    sender = FakeSender(hold=hold)
    q = make_queue(queues, qdir, sender, workers=1, settle=0.0)
    first = q.submit("ct", *files.make(study=1))
    q.start()
    assert sender.started.wait(2)
    second = q.submit("ct", *files.make(study=2))
    threading.Timer(0.1, hold.set).start()
    q.stop(drain=False)
    assert list(sender.sent) == [first.uids.sop_uid]
    assert journal(qdir) == sorted([f"{second.id}.dcm", f"{second.id}.json"])
    q2 = make_queue(queues, qdir, FakeSender())  # the lock was released
    assert [i.id for i in q2.recover()] == [second.id]


def test_an_upload_marked_removed_while_sent_stays_marked_through_a_retry_and_a_restart(queues, qdir, files):
    """rm of a file whose upload is being sent: the mark is journaled with the upload, so the
    instance is deleted once stored, also by the next process (it came back, once stored)."""
    hold = threading.Event()
    sender = FakeSender(decide=lambda store, item, call: Unavailable("down"), hold=hold)
    q = make_queue(queues, qdir, sender, workers=1, settle=0.0, backoff_base=60, backoff_max=60)
    item = q.submit("ct", *files.make(study=1))
    other = q.submit("ct", *files.make(study=2))
    q.start()
    assert sender.started.wait(2)
    in_flight = sender.calls[0][2][0]
    flying = item if item.uids.sop_uid == in_flight else other
    assert q.mark_removed("ct", flying.uids) and not q.mark_removed("ct", DicomUids("1.2", "1.2.1", "1.2.3"))
    assert not q.holds("ct", "1.2.826.1" if in_flight == item.uids.sop_uid else "1.2.826.2")
    hold.set()  # the send fails: retried later, still marked
    wait_until = time.monotonic() + 5
    while q.sending("ct", flying.uids) and time.monotonic() < wait_until:
        time.sleep(0.01)
    q.stop(drain=False)
    done: list[tuple[str, bool]] = []
    q2 = make_queue(queues, qdir, FakeSender(),
                    on_done=lambda i, stored, reason: done.append((i.uids.sop_uid, i.removed)))
    recovered = {i.uids.sop_uid: i.removed for i in q2.recover()}
    assert recovered == {item.uids.sop_uid: item.uids.sop_uid == in_flight,
                         other.uids.sop_uid: other.uids.sop_uid == in_flight}
    q2.start()
    assert q2.wait_idle(5)
    assert sorted(done) == sorted(recovered.items())


def test_a_refused_upload_whose_file_was_removed_is_not_kept_as_failed(queues, qdir, files):
    hold = threading.Event()
    q = make_queue(queues, qdir, FakeSender(decide=lambda store, item, call: "bad file", hold=hold), settle=0.0)
    item = q.submit("ct", *files.make(study=1))
    q.start()
    wait_until = time.monotonic() + 5
    while not q.sending("ct", item.uids) and time.monotonic() < wait_until:
        time.sleep(0.01)
    q.mark_removed("ct", item.uids)
    hold.set()
    assert q.wait_idle(5)
    assert q.failed() == [] and failed_files(qdir) == [] and journal(qdir) == []


def test_uploads_of_another_dataset_are_left_alone(queues, qdir, files):
    q = make_queue(queues, qdir, FakeSender(), dataset="A")
    item = q.submit("ct", *files.make())
    q.stop(drain=False)
    q_b = make_queue(queues, qdir, FakeSender(), dataset="B")
    assert q_b.recover() == []
    q_b.stop(drain=False)
    assert len(journal(qdir)) == 2
    q_a = make_queue(queues, qdir, FakeSender(), dataset="A")
    assert [i.id for i in q_a.recover()] == [item.id]


def test_a_damaged_journal_never_crashes_recover(queues, qdir, files, dicom: DicomFactory):
    q = make_queue(queues, qdir, FakeSender())
    good = q.submit("ct", *files.make())
    inst = dicom.instance()  # real DICOM (with a patient name) whose record gets torn
    torn_bytes = inst.path.read_bytes()
    torn = q.submit("ct", DicomUids(inst.study_uid, inst.series_uid, inst.sop_uid), inst.path)
    gone = q.submit("ct", *files.make())
    q.stop(drain=False)
    record = qdir / f"{torn.id}.json"
    record.write_bytes(record.read_bytes()[:40])  # torn mid-write
    (qdir / f"{gone.id}.dcm").unlink()  # a record whose bytes never arrived
    (qdir / f".{good.id}.json.123.456.tmp").write_text('{"half":')  # a temporary file left by a crash
    orphan = qdir / ("ab" * 16 + ".dcm")  # names are 32 hex digits
    orphan.write_bytes(b"bytes whose record was lost")
    (qdir / "0123.json").write_text("not ours")  # not a record name: ignored

    sender = FakeSender()
    q2 = make_queue(queues, qdir, sender)
    assert [i.id for i in q2.recover()] == [good.id]
    failed = {f.id: f for f in q2.failed()}
    assert set(failed) == {torn.id, "ab" * 16}
    assert failed[torn.id].uids.sop_uid == inst.sop_uid  # read back from the bytes; the store is lost
    assert failed[torn.id].path.read_bytes() == torn_bytes and failed[torn.id].store == "unknown"
    assert (qdir / "failed" / f"{'ab' * 16}.dcm").read_bytes() == b"bytes whose record was lost"
    assert not (qdir / f"{gone.id}.json").exists()
    assert not any(n.endswith(".tmp") for n in os.listdir(qdir))
    q2.start()
    assert q2.wait_idle(5)
    assert list(sender.sent) == [good.uids.sop_uid]
    assert journal(qdir) == []
    for name in failed_files(qdir):
        if name.endswith(".json"):
            assert PATIENT_NAME not in (qdir / "failed" / name).read_text()


def test_a_finished_uploads_record_file_is_reused_for_the_next_record(queues, qdir, files):
    """No new file (inode) per record while uploads come and go, and none left at stop."""
    hold = threading.Event()
    q = make_queue(queues, qdir, FakeSender(hold=hold), workers=1, settle=0.0)
    q.start()
    hold.set()
    first = q.submit("ct", *files.make())
    assert q.wait_idle(5)
    [free] = [n for n in os.listdir(qdir) if n.startswith(".free-")]
    inode = os.stat(qdir / free).st_ino
    hold.clear()
    second = q.submit("ct", *files.make())
    record = record_of(second)
    assert os.stat(record).st_ino == inode and not (qdir / free).exists()
    assert json.loads(record.read_text())["id"] == second.id != first.id
    assert journal(qdir) == sorted([f"{second.id}.dcm", f"{second.id}.json"])
    hold.set()
    assert q.wait_idle(5)
    q.stop()
    assert not any(n.startswith(".free-") for n in os.listdir(qdir))


def test_no_free_record_file_is_left_when_stop_returns_before_a_batch_in_flight(queues, qdir, files):
    """stop() with a sender still busy (a server that hangs): the process may exit before that
    sender ends, so the free record files go at stop, and the batch finishing later keeps none."""
    hold = threading.Event()
    sender = FakeSender(hold=hold)
    q = make_queue(queues, qdir, sender, workers=1, settle=0.0, heartbeat=60)
    q.start()
    for _ in range(2):  # both queued before either is sent: two record files
        q.submit("ct", *files.make())
    hold.set()
    assert q.wait_idle(5)
    assert sum(n.startswith(".free-") for n in os.listdir(qdir)) == 2
    hold.clear()
    q.submit("ct", *files.make())  # takes one of them for its record
    # the snapshot shows it in flight soon (not at the heartbeat): the pick marks it changed
    assert wait_for_status(qdir, lambda st: st.get("in_flight") == 1).get("in_flight") == 1
    q.stop(timeout=0.3)  # returns with the batch still in flight
    assert not any(n.startswith(".free-") for n in os.listdir(qdir))
    hold.set()
    deadline = time.monotonic() + 5
    while journal(qdir) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert journal(qdir) == [] and not any(n.startswith(".free-") for n in os.listdir(qdir))


def test_a_reused_record_file_not_yet_rewritten_is_never_taken_for_the_new_upload(queues, qdir, files):
    """A crash between taking a free record file and writing it: the file still describes the
    finished upload under the new name. Its id does not match: the bytes are kept in failed/,
    never sent where the old record says."""
    q = make_queue(queues, qdir, FakeSender())
    old = q.submit("ct", *files.make(study=1))
    new = q.submit("mr", *files.make(study=2))
    q.stop(drain=False)
    record_of(new).write_bytes(record_of(old).read_bytes())  # the stale contents, under the new name
    record_of(old).unlink()
    old.path.unlink()
    sender = FakeSender()
    q2 = make_queue(queues, qdir, sender)
    assert q2.recover() == []
    assert [f.id for f in q2.failed()] == [new.id]
    q2.start()
    assert q2.wait_idle(5) and sender.calls == []


def test_recover_finishes_an_interrupted_move_to_failed(queues, qdir, files):
    q = make_queue(queues, qdir, FakeSender())
    item = q.submit("ct", *files.make(data=b"abc"))
    q.stop(drain=False)
    # crash after the failed record was written, before the bytes moved
    record = json.loads((qdir / f"{item.id}.json").read_text())
    (qdir / "failed" / f"{item.id}.json").write_text(json.dumps({**record, "last_error": "refused"}))
    q2 = make_queue(queues, qdir, FakeSender())
    assert q2.recover() == []
    assert journal(qdir) == []
    assert (qdir / "failed" / f"{item.id}.dcm").read_bytes() == b"abc"
    assert [(f.id, f.last_error) for f in q2.failed()] == [(item.id, "refused")]


def test_a_newer_copy_of_the_same_sop_supersedes_the_queued_one(queues, qdir, files):
    sender = FakeSender()
    q = make_queue(queues, qdir, sender)
    old = q.submit("ct", *files.make(sop="1.2.826.1.1.99", data=b"old"))
    new = q.submit("ct", *files.make(sop="1.2.826.1.1.99", data=b"new"))
    other_store = q.submit("mr", *files.make(sop="1.2.826.1.1.99", data=b"mr"))
    assert [i.id for i in q.pending()] == [new.id, other_store.id]
    assert not old.path.exists() and not (qdir / f"{old.id}.json").exists()
    q.start()
    assert q.wait_idle(5)
    assert len(sender.calls) == 2 and sender.sent["1.2.826.1.1.99"] in (b"new", b"mr")
    assert sorted(sum(sender.batches(), [])) == ["1.2.826.1.1.99"] * 2


def test_a_newer_copy_supersedes_in_the_journal_too(queues, qdir, files):
    """A crash between journaling the newer copy and removing the older leaves both: recover keeps the newer."""
    q = make_queue(queues, qdir, FakeSender())
    first = q.submit("ct", *files.make(sop="1.2.826.1.1.7", data=b"first"))
    q.stop(drain=False)
    record = json.loads((qdir / f"{first.id}.json").read_text())
    later_id = "f" * 32
    (qdir / f"{later_id}.dcm").write_bytes(b"second")
    later = {**record, "id": later_id, "size": len(b"second"), "queued_at": first.queued_at + 1}
    (qdir / f"{later_id}.json").write_text(json.dumps(later))
    sender = FakeSender()
    q2 = make_queue(queues, qdir, sender)
    assert [i.id for i in q2.recover()] == [later_id]
    q2.start()
    assert q2.wait_idle(5)
    assert sender.sent == {"1.2.826.1.1.7": b"second"} and journal(qdir) == []


def test_a_copy_submitted_while_the_older_is_in_flight_follows_it(queues, qdir, files):
    """Never both copies at once, though workers are free (the server could keep the older)."""
    hold = threading.Event()
    sender = FakeSender(hold=hold)
    q = make_queue(queues, qdir, sender, settle=0.0, workers=4)
    q.start()
    q.submit("ct", *files.make(sop="1.2.826.1.1.5", data=b"one"))
    assert sender.started.wait(2)
    q.submit("ct", *files.make(sop="1.2.826.1.1.5", data=b"two"))
    q.submit("ct", *files.make(sop="1.2.826.1.1.6", data=b"other"))  # another instance goes at once
    deadline = time.monotonic() + 5
    while len(sender.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [sops for _, _, sops, _ in sender.calls] == [["1.2.826.1.1.5"], ["1.2.826.1.1.6"]]
    hold.set()
    assert q.wait_idle(5)
    assert len(sender.calls) == 3 and sender.sent["1.2.826.1.1.5"] == b"two"
    assert not sender.overlap_same_sop


# ---------------------------------------------------------------------------------------------
# stop, wait_idle, locking


def test_stop_with_drain_finishes_the_work_without_waiting_for_settle(queues, qdir, files):
    sender = FakeSender()
    q = make_queue(queues, qdir, sender, settle=5.0)
    q.start()
    for s in (1, 2, 2):
        q.submit("ct", *files.make(study=s))
    t0 = time.monotonic()
    q.stop(drain=True, timeout=5)
    assert time.monotonic() - t0 < 2
    assert len(sender.sent) == 3 and journal(qdir) == []
    assert read_status(qdir)["running"] is False
    with pytest.raises(RuntimeError):
        q.submit("ct", *files.make())


def test_stop_with_drain_is_bounded_by_its_timeout(queues, qdir, files):
    hold = threading.Event()
    q = make_queue(queues, qdir, FakeSender(hold=hold), settle=0.0)
    q.start()
    item = q.submit("ct", *files.make())
    t0 = time.monotonic()
    q.stop(drain=True, timeout=0.3)
    assert time.monotonic() - t0 < 1.0
    assert journal(qdir) == sorted([f"{item.id}.dcm", f"{item.id}.json"])  # still journaled
    with pytest.raises(QueueBusy):  # the batch in flight still owns the directory
        WriteBackQueue(qdir, FakeSender())
    hold.set()
    deadline = time.monotonic() + 3
    while q._lock_fd is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert journal(qdir) == []  # the send completed after stop and was recorded
    make_queue(queues, qdir, FakeSender())  # and the lock was released


def test_wait_idle(queues, qdir, files):
    q = make_queue(queues, qdir, FakeSender())
    assert q.wait_idle(0)
    q.submit("ct", *files.make())
    assert not q.wait_idle(0.1)  # not started
    q.start()
    assert q.wait_idle(5)


def test_one_queue_per_directory(queues, qdir):
    make_queue(queues, qdir, FakeSender())
    with pytest.raises(QueueBusy):
        WriteBackQueue(qdir, FakeSender())


def test_start_recovers_when_recover_was_not_called(queues, qdir, files):
    q = make_queue(queues, qdir, FakeSender())
    q.submit("ct", *files.make())
    q.stop(drain=False)
    sender = FakeSender()
    q2 = make_queue(queues, qdir, sender)
    q2.start()
    assert q2.wait_idle(5) and len(sender.sent) == 1
    with pytest.raises(RuntimeError):
        q2.recover()


# ---------------------------------------------------------------------------------------------
# status snapshot and permissions


def wait_for_status(qdir: Path, check: Callable[[dict], bool]) -> dict:
    deadline = time.monotonic() + 2
    while True:
        status = read_status(qdir) or {}
        if check(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def test_status_snapshot(queues, qdir, files):
    hold = threading.Event()
    sender = FakeSender(lambda store, item, call: "refused by the server: bad file", hold=hold)
    q = make_queue(queues, qdir, sender, workers=1, settle=0.0)
    first = q.submit("ct", *files.make(study=1, size=10))
    status = read_status(qdir)
    assert status is not None and status["pid"] == os.getpid() and status["running"] is False
    assert (status["pending"], status["pending_bytes"], status["in_flight"], status["failed"]) == (1, 10, 0, 0)
    assert 0 <= status["oldest_pending_age"] < 5 and abs(status["updated_at"] - time.time()) < 5
    assert status["oldest_queued_at"] == first.queued_at
    q.start()
    assert sender.started.wait(2)
    q.submit("ct", *files.make(study=2, size=20))
    status = wait_for_status(qdir, lambda s: s.get("pending") == 1 and s.get("in_flight") == 1)
    assert (status["pending"], status["pending_bytes"], status["in_flight"], status["in_flight_bytes"]) == \
        (1, 20, 1, 10)
    assert status["running"] is True and status["oldest_queued_at"] == first.queued_at
    hold.set()
    assert q.wait_idle(5)
    status = wait_for_status(qdir, lambda s: s.get("failed") == 2)
    assert (status["pending"], status["in_flight"], status["failed"]) == (0, 0, 2)
    assert status["last_error"] == "refused by the server: bad file" and status["oldest_pending_age"] is None
    q.stop()
    assert read_status(qdir)["running"] is False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX umask and mode bits; Windows has only a read-only flag")
def test_files_and_folders_are_private_whatever_the_umask(queues, qdir, files):
    old = os.umask(0)
    try:
        q = make_queue(queues, qdir, FakeSender(lambda store, item, call: "refused"))
        path = files.make()[1]
        os.chmod(path, 0o644)
        item = q.submit("ct", files.make()[0], path)
        for name in (f"{item.id}.json", f"{item.id}.dcm", "status.json", "queue.lock"):
            assert stat.S_IMODE((qdir / name).stat().st_mode) == 0o600, name
        q.start()
        assert q.wait_idle(5)
        q.stop()
    finally:
        os.umask(old)
    for folder in (qdir, qdir / "failed"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in failed_files(qdir):
        assert stat.S_IMODE((qdir / "failed" / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((qdir / "status.json").stat().st_mode) == 0o600


def test_submit_rejects_bad_input(queues, qdir, files):
    q = make_queue(queues, qdir, FakeSender())
    uids, path = files.make()
    with pytest.raises(ValueError):
        q.submit("", uids, path)
    with pytest.raises(ValueError):
        q.submit("ct", DicomUids("1.2", "1.2.3", "not a uid"), path)
    with pytest.raises(FileNotFoundError):
        q.submit("ct", uids, path.with_name("missing"))
    assert journal(qdir) == [] and path.exists()


def test_many_uploads_with_flaky_sends_all_arrive(queues, qdir, files):
    import random

    rng = random.Random(7)
    flaky = threading.Lock()

    def decide(store, item, call):
        with flaky:
            return Unavailable("flaky") if call % 3 == 1 and rng.random() < 0.9 else True

    sender = FakeSender(decide)
    q = make_queue(queues, qdir, sender, workers=4, batch_files=7, max_attempts=50, backoff_base=0.005,
                   backoff_max=0.02, settle=0.01)
    q.start()
    submitted = [q.submit("ct", *files.make(study=n % 5)) for n in range(150)]
    assert q.wait_idle(10)
    assert sorted(sender.sent) == sorted(i.uids.sop_uid for i in submitted)
    assert all(len(b) <= 7 for b in sender.batches()) and not sender.overlap_same_sop
    assert journal(qdir) == [] and q.failed() == []


# ---------------------------------------------------------------------------------------------
# durability: fsync at submit, or in groups moments later


class FsyncLog:
    """Records the paths the queue fsyncs (the real fsync still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from dicomfuse.core import writeback

        self.paths: list[Path] = []
        self.changed = threading.Condition()
        real = writeback._fsync_path

        def fsync_path(path: Path, **kwargs: object) -> None:
            real(path)
            with self.changed:
                self.paths.append(Path(path))
                self.changed.notify_all()

        monkeypatch.setattr(writeback, "_fsync_path", fsync_path)

    def wait_for(self, *paths: Path) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: set(paths) <= set(self.paths), 5)


def record_of(item: QueuedUpload) -> Path:
    return item.path.with_name(item.id + ".json")


def test_a_durable_submit_is_on_disk_when_it_returns(queues, qdir, files, monkeypatch):
    fsyncs = FsyncLog(monkeypatch)
    q = make_queue(queues, qdir, FakeSender())
    item = q.submit("ct", *files.make(), durable=True)
    assert {item.path, qdir} <= set(fsyncs.paths)  # the record is fsynced by write_json_atomic


def test_a_submit_without_fsync_is_fsynced_in_a_group_moments_later(queues, qdir, files, monkeypatch):
    fsyncs = FsyncLog(monkeypatch)
    hold = threading.Event()
    sender = FakeSender(hold=hold)  # nothing is sent (and removed) meanwhile
    q = make_queue(queues, qdir, sender, settle=60)
    items = [q.submit("ct", *files.make(), durable=False) for _ in range(3)]
    assert fsyncs.paths == []  # submit returned without waiting for the disk
    q.start()
    expected = [p for i in items for p in (i.path, record_of(i))]
    assert fsyncs.wait_for(*expected, qdir), "the group commit never fsynced the queued uploads"
    assert sender.calls == []
    hold.set()


def test_uploads_queued_in_a_burst_are_fsynced_as_one_group(queues, qdir, files, monkeypatch):
    """A cp of many files: the group commit waits sync_delay after the first, so the burst costs
    one group (one fsync of the folder), not one per file."""
    fsyncs = FsyncLog(monkeypatch)
    hold = threading.Event()
    q = make_queue(queues, qdir, FakeSender(hold=hold), settle=60, sync_delay=0.5)
    q.start()
    items = [q.submit("ct", *files.make(), durable=False) for _ in range(10)]
    assert fsyncs.wait_for(*(p for i in items for p in (i.path, record_of(i))), qdir)
    assert fsyncs.paths.count(qdir) == 1
    hold.set()


def test_a_status_change_while_a_snapshot_is_not_due_is_written_soon_after(queues, qdir, files):
    """The status thread is not woken for every upload queued, but a change is never left
    waiting for the heartbeat."""
    hold = threading.Event()
    q = make_queue(queues, qdir, FakeSender(hold=hold), settle=60, status_interval=0.3, heartbeat=60)
    q.start()
    assert wait_for_status(qdir, lambda s: s.get("running") is True).get("running") is True
    time.sleep(0.4)  # the status thread now sleeps for the heartbeat
    q.submit("ct", *files.make())  # written at once: a snapshot is due
    q.submit("ct", *files.make())  # not due: left to the status thread
    assert (read_status(qdir) or {}).get("pending") == 1
    assert wait_for_status(qdir, lambda s: s.get("pending") == 2).get("pending") == 2
    hold.set()


def test_sync_waits_for_the_uploads_queued_without_fsync(queues, qdir, files, monkeypatch):
    fsyncs = FsyncLog(monkeypatch)
    q = make_queue(queues, qdir, FakeSender())  # not started: only sync() can fsync them
    items = [q.submit("ct", *files.make(), durable=False) for _ in range(2)]
    assert fsyncs.paths == []
    q.sync()
    assert {p for i in items for p in (i.path, record_of(i))} | {qdir} <= set(fsyncs.paths)
    fsyncs.paths.clear()
    q.sync()  # nothing left to do
    assert fsyncs.paths == []


def test_stop_fsyncs_what_stays_queued(queues, qdir, files, monkeypatch):
    fsyncs = FsyncLog(monkeypatch)
    q = make_queue(queues, qdir, FakeSender())
    item = q.submit("ct", *files.make(), durable=False)
    q.stop(drain=False)
    assert {item.path, record_of(item), qdir} <= set(fsyncs.paths)
    assert len(journal(qdir)) == 2


def test_a_failed_upload_queued_without_fsync_is_fsynced_before_it_is_kept(queues, qdir, files, monkeypatch):
    fsyncs = FsyncLog(monkeypatch)
    monkeypatch.setattr(WriteBackQueue, "_sync_loop", lambda self: None)  # no group commit
    q = make_queue(queues, qdir, FakeSender(lambda store, item, call: "refused"))
    item = q.submit("ct", *files.make(), durable=False)
    q.start()
    assert q.wait_idle(5)
    assert item.path in fsyncs.paths  # before the move to failed/
    assert [f.path.name for f in q.failed()] == [item.path.name]


def test_sync_reports_a_failed_fsync_and_tries_again(queues, qdir, files, monkeypatch):
    """What fsync() of a file waits for must not say "on disk" when the disk said no."""
    from dicomfuse.core import writeback

    real = writeback._fsync_path
    failing = {"on": True}

    def fsync_path(path: Path, **kwargs: object) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(WriteBackQueue, "_sync_loop", lambda self: None)  # only sync() fsyncs
    q = make_queue(queues, qdir, FakeSender(), settle=60)
    item = q.submit("ct", *files.make(), durable=False)
    monkeypatch.setattr(writeback, "_fsync_path", fsync_path)
    with pytest.raises(OSError) as raised:
        q.sync()
    assert raised.value.errno == errno.EIO and item.uids.sop_uid in str(raised.value)
    failing["on"] = False
    fsyncs = FsyncLog(monkeypatch)  # the failed upload is still to be fsynced
    q.sync()
    assert {item.path, record_of(item)} <= set(fsyncs.paths)


def test_sync_waits_only_for_uploads_submitted_before_it(queues, qdir, files, monkeypatch):
    """Under a steady stream of copies, sync() fsyncs what came before it, not what arrives
    while it waits for a group being fsynced (else it might never return)."""
    monkeypatch.setattr(WriteBackQueue, "_sync_loop", lambda self: None)
    q = make_queue(queues, qdir, FakeSender(), settle=60)
    before = q.submit("ct", *files.make(), durable=False)
    fsyncs = FsyncLog(monkeypatch)
    waiting = threading.Event()
    real_commit = q._commit

    def commit(upto: int | None = None) -> list[QueuedUpload]:
        waiting.set()  # sync() has taken its mark, and now waits for the lock
        return real_commit(upto)

    monkeypatch.setattr(q, "_commit", commit)
    q._sync_lock.acquire()  # as if the group commit were fsyncing a group
    syncing = threading.Thread(target=q.sync)
    syncing.start()
    assert waiting.wait(5)
    after = q.submit("ct", *files.make(), durable=False)
    q._sync_lock.release()
    syncing.join(5)
    assert before.path in fsyncs.paths and after.path not in fsyncs.paths


def test_a_submit_racing_stop_is_fsynced_before_stop_returns(queues, qdir, files, monkeypatch):
    from dicomfuse.core import writeback

    fsyncs = FsyncLog(monkeypatch)
    gate, entered = threading.Event(), threading.Event()
    real_move = writeback._move_in

    def slow_move(src: Path, dst: Path, *, durable: bool = True) -> None:
        entered.set()
        assert gate.wait(5)
        real_move(src, dst, durable=durable)

    monkeypatch.setattr(writeback, "_move_in", slow_move)
    q = make_queue(queues, qdir, FakeSender(), settle=60)
    q.start()
    out: dict[str, QueuedUpload] = {}
    submitter = threading.Thread(target=lambda: out.setdefault("item", q.submit("ct", *files.make(), durable=False)))
    submitter.start()
    assert entered.wait(5)
    stopper = threading.Thread(target=lambda: q.stop(drain=False, timeout=5))
    stopper.start()
    gate.set()
    submitter.join(5)
    stopper.join(10)
    item = out["item"]
    assert {item.path, record_of(item)} <= set(fsyncs.paths)  # on disk for the next start


def test_recover_keeps_bytes_that_do_not_match_their_record_instead_of_sending_them(queues, qdir, files):
    """A power cut before the group fsync can leave a record with its bytes cut short."""
    q = make_queue(queues, qdir, FakeSender())
    item = q.submit("ct", *files.make(size=5000), durable=False)
    q.stop(drain=False)
    os.truncate(item.path, 100)
    sender = FakeSender()
    q2 = make_queue(queues, qdir, sender)
    assert q2.recover() == []
    q2.start()
    assert q2.wait_idle(5)
    assert sender.sent == {} and journal(qdir) == []
    (failed,) = q2.failed()
    assert failed.store == "ct" and "do not match" in (failed.last_error or "")
    assert failed.path.stat().st_size == 100  # kept, never deleted


def test_a_newer_copy_is_on_disk_before_the_older_is_removed(queues, qdir, files, monkeypatch):
    monkeypatch.setattr(WriteBackQueue, "_sync_loop", lambda self: None)  # no group commit
    q = make_queue(queues, qdir, FakeSender(), settle=60)
    uids, source = files.make()
    old = q.submit("ct", uids, source, durable=True)
    fsyncs = FsyncLog(monkeypatch)
    _, newer_source = files.make()
    new = q.submit("ct", uids, newer_source, durable=False)
    assert not old.path.exists()
    assert {new.path, record_of(new)} <= set(fsyncs.paths)


def test_a_small_study_does_not_wait_behind_a_big_studys_backlog(queues, qdir, files):
    release = threading.Event()

    def decide(store, item, call):
        release.wait(5)
        return True

    sender = FakeSender(decide)
    q = make_queue(queues, qdir, sender, workers=2, batch_files=2, settle=60)
    for _ in range(20):
        q.submit("ct", *files.make(study=1))
    q.submit("ct", *files.make(study=2))
    q.submit("ct", *files.make(study=2))  # a full batch, queued after study 1's ten
    q.start()
    deadline = time.monotonic() + 5
    while len(sender.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    assert q.wait_idle(10)
    order = [study for _, study, _, _ in sender.calls]
    assert order.index("1.2.826.2") == 1, order  # the second worker's first batch


def test_a_submit_wakes_one_sender_not_all(queues, qdir, files, monkeypatch):
    """cp of a thousand files must not wake every thread of the queue a thousand times, each to
    find nothing to send (that contention slowed the copy itself)."""
    looks = []
    real_pick = WriteBackQueue._pick

    def pick(self, now):
        looks.append(threading.get_ident())
        return real_pick(self, now)

    monkeypatch.setattr(WriteBackQueue, "_pick", pick)
    sender = FakeSender()
    q = make_queue(queues, qdir, sender, workers=4, batch_files=100, settle=60)
    q.start()
    deadline = time.monotonic() + 5
    while len(set(looks)) < 4 and time.monotonic() < deadline:  # every sender looked once and sleeps
        time.sleep(0.01)
    time.sleep(0.1)
    looks.clear()
    for _ in range(10):
        q.submit("ct", *files.make())
        time.sleep(0.01)
    time.sleep(0.3)  # time for every woken sender to look
    assert len(looks) <= 12, f"{len(looks)} looks for 10 submits"  # one per submit; all four woken: 40
    assert sender.calls == []  # the batch waits for its settle time
    q.stop(drain=True, timeout=5)
    assert len(sender.sent) == 10


def test_the_dataset_label_is_the_same_however_the_address_is_written() -> None:
    from dicomfuse.core.writeback import dataset_label

    assert dataset_label("http://H:8042/dicom-web/") == dataset_label("http://h:8042/dicom-web")
    assert dataset_label("http://user:pw@h/dicom-web") == "http://h/dicom-web"
    assert dataset_label("/data/ds/") == dataset_label("/data/ds")


HC = "https://healthcare.googleapis.com/{}/projects/p/locations/l/datasets/d"


def test_v1beta1_and_v1_spellings_of_a_healthcare_dataset_are_one_dataset() -> None:
    from dicomfuse.core.writeback import dataset_label, same_dataset

    assert dataset_label(HC.format("v1beta1")) == dataset_label(HC.format("v1")) == HC.format("v1")
    assert dataset_label(HC.format("v1beta1").replace("healthcare", "HEALTHCARE") + "/") == HC.format("v1")
    # the same path on another host (a private endpoint) is a Healthcare dataset too
    private = "http://10.0.0.1:8080/{}/projects/p/locations/l/datasets/d"
    assert dataset_label(private.format("v1beta1")) == private.format("v1")
    # other paths are not touched
    assert dataset_label("https://pacs/v1beta1/dicom-web") == "https://pacs/v1beta1/dicom-web"
    assert dataset_label(HC.format("v1beta1") + "/dicomStores/s") == HC.format("v1beta1") + "/dicomStores/s"
    # a record written with either spelling, before or after this label existed, is recognised
    assert same_dataset(HC.format("v1beta1"), HC.format("v1")) and same_dataset(HC.format("v1"), HC.format("v1beta1"))
    assert same_dataset(None, None) and not same_dataset(None, HC.format("v1"))
    assert not same_dataset(HC.format("v1").replace("/d", "/e"), HC.format("v1"))


@pytest.mark.parametrize("written,mounted", [("v1beta1", "v1"), ("v1", "v1beta1")])
def test_records_of_either_spelling_are_adopted(queues, qdir, files, written, mounted):
    """Records written before the label was normalised hold the address as it was typed: they
    belong to the dataset whichever version the next mount is given."""
    q = make_queue(queues, qdir, FakeSender(), dataset=HC.format(mounted))
    item = q.submit("ct", *files.make())
    q.stop(drain=False)
    record = qdir / f"{item.id}.json"
    data = json.loads(record.read_text())
    data["dataset"] = HC.format(written)  # as an earlier version wrote it, verbatim
    record.write_text(json.dumps(data))
    again = make_queue(queues, qdir, FakeSender(), dataset=HC.format(mounted))
    assert [i.id for i in again.recover()] == [item.id]


def test_the_warning_about_another_datasets_uploads_says_either_mode(queues, qdir, files, caplog):
    """A sync-mode mount sends what an earlier write-back run left (Vfs._open_queue): the warning
    must not say write-back mode is needed."""
    q = make_queue(queues, qdir, FakeSender(), dataset="A")
    q.submit("ct", *files.make())
    q.stop(drain=False)
    q_b = make_queue(queues, qdir, FakeSender(), dataset="B")
    with caplog.at_level(logging.WARNING, logger="dicomfuse.core.writeback"):
        assert q_b.recover() == []
    text = caplog.text
    assert "belong to another dataset" in text and "in either upload mode" in text
    assert "in write-back mode" not in text


def test_a_queue_folder_removed_while_mounted_is_made_again_with_its_lock(queues, qdir, files):
    """rm -rf of the cache folder while mounted: every later copy in failed with ENOENT (could
    not queue it), though the spool itself was made again."""
    import shutil

    sender = FakeSender()
    q = make_queue(queues, qdir, sender)
    q.start()
    shutil.rmtree(qdir)
    item = q.submit("ct", *files.make(study=1))
    assert q.wait_idle(5)
    assert sender.batches("1.2.826.1") == [[item.uids.sop_uid]]
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700 and failed_files(qdir) == []
    with pytest.raises(QueueBusy):
        WriteBackQueue(qdir, sender)  # the queue is held again
