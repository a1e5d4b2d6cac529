"""Cloud Healthcare API datasets through a real mount, against the stand-in of Google's API
(tests/fakes/healthcare.py): stores, paging past the original's 15,000 limit, tokens that expire
during the test, retries, 409 on overwrite, permission errors, the anonymisation workflow.

The operations every backend shares run in test_mount_operations.py (the "google" backend)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PATIENT_NAME, Backend, DicomFactory, google_backend, requires_fuse, run
from tests.mounting import Mount

pytestmark = [pytest.mark.mount, requires_fuse]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def google(healthcare, tmp_path: Path) -> Backend:  # type: ignore[no-untyped-def]
    return google_backend(healthcare, tmp_path)


def start_failing(backend: Backend, tmp_path: Path, *args: str, env: dict[str, str] | None = None) \
        -> subprocess.CompletedProcess[str]:
    """Run a mount that must fail before mounting; return its result."""
    mnt = tmp_path / "mnt-fail"
    mnt.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "dicomfuse", "-a", backend.address, "-p", str(mnt),
            "--cacheDir", str(tmp_path / "cache-fail"), "--logDir", str(tmp_path / "logs-fail"), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    assert not os.path.ismount(mnt)
    return result


# ---------------------------------------------------------------------------------------------
# Addresses and credentials


@pytest.mark.parametrize("version,suffix", [("v1", "/"), ("v1beta1", "")])
def test_v1beta1_and_trailing_slash_addresses_mount(healthcare, tmp_path: Path, mount_factory,  # type: ignore[no-untyped-def]
                                                    dicom: DicomFactory, version: str, suffix: str):
    backend = google_backend(healthcare, tmp_path, version)
    backend.address += suffix
    inst = dicom.instance()
    backend.seed([inst])
    m = mount_factory(backend)
    assert os.listdir(m.path) == ["store-a"]
    assert backend.instance_path(m, inst).read_bytes() == inst.path.read_bytes()


def test_application_default_credentials_from_the_environment(google: Backend, tmp_path: Path,
                                                              dicom: DicomFactory):
    inst = dicom.instance()
    google.seed([inst])
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(google.key_file)}
    m = Mount(google.address, tmp_path / "adc", env=env).start()
    try:
        assert google.instance_path(m, inst).read_bytes() == inst.path.read_bytes()
    finally:
        m.stop()


def test_no_credentials_is_one_clear_line_and_no_mount(google: Backend, tmp_path: Path):
    env = {"GOOGLE_APPLICATION_CREDENTIALS": "", "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud"),
           "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9"}
    r = start_failing(google, tmp_path, env=env)
    assert r.returncode == 1, r.stderr
    assert "gcloud auth application-default login" in r.stderr and "--keyFile" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreadable_or_broken_key_file_is_named(google: Backend, tmp_path: Path):
    r = start_failing(google, tmp_path, "--keyFile", str(tmp_path / "nope.json"))
    assert r.returncode == 1 and "cannot read key file" in r.stderr and "nope.json" in r.stderr, r.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "service_account", "client_email": "x"}')
    r = start_failing(google, tmp_path, "--keyFile", str(broken))
    assert r.returncode == 1 and "broken.json" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_key_google_refuses_is_reported_at_start(google: Backend, tmp_path: Path):
    import json

    key = json.loads(google.key_file.read_text())  # type: ignore[union-attr]
    key["client_email"] = "deleted-account@test-project.iam.gserviceaccount.com"
    revoked = tmp_path / "revoked.json"
    revoked.write_text(json.dumps(key))
    revoked.chmod(0o600)
    r = start_failing(google, tmp_path, "--keyFile", str(revoked))
    assert r.returncode == 1 and "could not get a Google access token: invalid_grant" in r.stderr, r.stderr
    assert "DICOM Editor" not in r.stderr and "Traceback" not in r.stderr
    assert key["private_key"].splitlines()[1] not in r.stderr


def test_permission_denied_at_start_names_the_role(healthcare, google: Backend, tmp_path: Path):  # type: ignore[no-untyped-def]
    healthcare.deny("healthcare.dicomStores.list")
    try:
        r = start_failing(google, tmp_path, *google.extra_args)
    finally:
        healthcare.deny(None)
    assert r.returncode == 1, r.stderr
    assert "refused" in r.stderr and "Healthcare DICOM Editor" in r.stderr and "403" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_dataset_that_does_not_exist_is_named_at_start(google: Backend, tmp_path: Path):
    google.address = google.address.rsplit("/", 1)[0] + "/no-such-dataset"
    r = start_failing(google, tmp_path, *google.extra_args)
    assert r.returncode == 1 and "dataset was not found" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_write_permission_denied_fails_the_copy_and_keeps_the_file(healthcare, google: Backend,  # type: ignore[no-untyped-def]
                                                                   mount_factory, dicom: DicomFactory):
    m = mount_factory(google)
    inst = dicom.instance()
    healthcare.deny("healthcare.dicomStores.dicomWebWrite")
    try:
        r = run("cp", inst.path, m.path / "store-a")
    finally:
        healthcare.deny(None)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    assert "roles/healthcare.dicomEditor" in (m.log_dir / "error.log").read_text()  # the role it needs
    assert not google.has(inst)
    kept = list((m.cache_dir / "spool" / "failed").iterdir())
    assert any(p.read_bytes() == inst.path.read_bytes() for p in kept)


# ---------------------------------------------------------------------------------------------
# Tokens


def test_tokens_expiring_during_the_test_are_refreshed_ahead(healthcare, google: Backend, mount_factory,  # type: ignore[no-untyped-def]
                                                             dicom: DicomFactory):
    insts = dicom.series(3)
    google.seed(insts)
    healthcare.token_lifetime = 3
    try:
        issued_before = healthcare.tokens_issued
        expired_before = healthcare.expired_token_requests
        m = mount_factory(google, "--cacheTime", "0,0")
        deadline = time.monotonic() + 8
        rounds = 0
        while time.monotonic() < deadline:
            for inst in insts:
                assert google.instance_path(m, inst).read_bytes() == inst.path.read_bytes()
            rounds += 1
        assert rounds > 3
        assert healthcare.tokens_issued - issued_before >= 3, "short-lived tokens were refreshed"
        assert healthcare.expired_token_requests == expired_before, "no request went out with an expired token"
    finally:
        healthcare.token_lifetime = 3600


def test_a_token_refused_by_the_server_is_replaced_once(healthcare, google: Backend, mount_factory,  # type: ignore[no-untyped-def]
                                                        dicom: DicomFactory):
    inst = dicom.instance()
    google.seed([inst])
    m = mount_factory(google)
    healthcare.inject(status=401, times=1, path_contains="/dicomWeb/")
    assert google.instance_path(m, inst).read_bytes() == inst.path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Paging and retries


def test_a_store_with_more_studies_than_the_original_could_list(healthcare, google: Backend,  # type: ignore[no-untyped-def]
                                                                mount_factory):
    uids = healthcare.add_synthetic_studies(google.dataset_id, "store-a", 20_000)
    m = mount_factory(google)
    listed = os.listdir(m.path / "store-a")
    assert len(listed) == 20_000
    assert set(listed) == set(uids)
    healthcare.clear_log()
    study = uids[-1]
    series = os.listdir(m.path / "store-a" / study)
    instance = os.listdir(m.path / "store-a" / study / series[0])
    assert (m.path / "store-a" / study / series[0] / instance[0]).read_bytes()[128:132] == b"DICM"


def test_many_stores_are_listed_with_page_tokens(healthcare, google: Backend, mount_factory):  # type: ignore[no-untyped-def]
    names = [f"extra-{i:04d}" for i in range(1_050)]  # more than one page of 1,000
    for name in names:
        healthcare.create_store(google.dataset_id, name)
    m = mount_factory(google)
    assert set(os.listdir(m.path)) == {"store-a", *names}


def test_throttling_and_server_errors_are_retried(healthcare, google: Backend, mount_factory,  # type: ignore[no-untyped-def]
                                                  dicom: DicomFactory):
    inst = dicom.instance()
    google.seed([inst])
    m = mount_factory(google)
    healthcare.inject(status=429, times=2, path_contains="/dicomWeb/studies", retry_after="1")
    assert inst.study_uid in os.listdir(m.path / "store-a")
    healthcare.inject(status=503, times=2, path_contains=f"/instances/{inst.sop_uid}")
    assert google.instance_path(m, inst).read_bytes() == inst.path.read_bytes()
    new = dicom.instance(study=1)
    healthcare.clear_log()
    healthcare.inject(status=429, times=1, method="POST", retry_after="1")
    assert run("cp", new.path, m.path / "store-a").returncode == 0
    assert google.server_bytes(new) == new.path.read_bytes()
    posts = [r for r in healthcare.requests if r.method == "POST" and r.path.endswith("/dicomWeb/studies")]
    assert len(posts) == 2, "a 429 STOW is sent again, once"


def test_a_server_that_keeps_failing_gives_eio(healthcare, google: Backend, mount_factory,  # type: ignore[no-untyped-def]
                                               dicom: DicomFactory):
    inst = dicom.instance()
    google.seed([inst])
    m = mount_factory(google)
    os.listdir(google.series_path(m, inst))
    healthcare.inject(status=500, times=50, path_contains=f"/instances/{inst.sop_uid}")
    with pytest.raises(OSError) as e:
        google.instance_path(m, inst).read_bytes()
    assert e.value.errno == errno.EIO


# ---------------------------------------------------------------------------------------------
# Overwrite, conflicts, index lag


def test_overwrite_with_new_bytes_is_delete_then_store(google: Backend, mount_factory, dicom: DicomFactory,
                                                       tmp_path: Path):
    inst = dicom.instance()
    google.seed([inst])
    edited = dicom.instance(name="edited.dcm")
    from dicomfuse.samples import write_instance

    write_instance(edited.path, inst.study_uid, inst.series_uid, inst.sop_uid, patient_name=PATIENT_NAME,
                   pixel_bytes=8192)
    m = mount_factory(google)
    r = run("cp", edited.path, google.instance_path(m, inst))
    assert r.returncode == 0, r.stderr
    assert google.server_bytes(inst) == edited.path.read_bytes()


def test_refused_overwrite_keeps_the_original(healthcare, google: Backend, mount_factory, dicom: DicomFactory):  # type: ignore[no-untyped-def]
    inst = dicom.instance()
    google.seed([inst])
    original = inst.path.read_bytes()
    edited = dicom.instance(name="edited.dcm")
    from dicomfuse.samples import write_instance

    write_instance(edited.path, inst.study_uid, inst.series_uid, inst.sop_uid, patient_name=PATIENT_NAME,
                   pixel_bytes=8192)
    m = mount_factory(google)
    google.instance_path(m, inst).stat()
    healthcare.inject(status=409, times=1, method="POST")
    r = run("cp", edited.path, google.instance_path(m, inst))
    assert r.returncode != 0, "the refused overwrite fails the copy"
    assert google.server_bytes(inst) == original, "the original is back on the server"
    assert "stored back" in (m.log_dir / "error.log").read_text()


def test_upload_of_an_instance_the_index_does_not_show_yet(healthcare, google: Backend, mount_factory,  # type: ignore[no-untyped-def]
                                                           dicom: DicomFactory):
    """Another client stored the same SOP instance a moment ago (the search index lags): the
    mount's upload is then an overwrite, not a 409 failure."""
    m = mount_factory(google)
    inst = dicom.instance()
    edited = dicom.instance(name="edited.dcm")
    from dicomfuse.samples import write_instance

    write_instance(edited.path, inst.study_uid, inst.series_uid, inst.sop_uid, patient_name=PATIENT_NAME,
                   pixel_bytes=8192)
    healthcare.index_lag = 30
    try:
        google.server.store_files([inst.path])  # through the store view: at once in the true state
        r = run("cp", edited.path, m.path / "store-a")
        assert r.returncode == 0, r.stderr
        assert google.server_bytes(inst) == edited.path.read_bytes()
    finally:
        healthcare.index_lag = 1.0


def test_own_uploads_and_deletes_show_at_once_despite_a_lagging_index(healthcare, google: Backend,  # type: ignore[no-untyped-def]
                                                                     mount_factory, dicom: DicomFactory):
    m = mount_factory(google, "--cacheTime", "0,0")
    inst = dicom.instance()
    healthcare.index_lag = 30
    try:
        assert run("cp", inst.path, m.path / "store-a").returncode == 0
        assert inst.study_uid in os.listdir(m.path / "store-a")
        assert f"{inst.sop_uid}.dcm" in os.listdir(google.series_path(m, inst))
        assert google.instance_path(m, inst).read_bytes() == inst.path.read_bytes()
        assert run("rm", google.instance_path(m, inst)).returncode == 0
        # It was the only file of its study: gone, folders and all, whatever the lagging index shows.
        assert not google.instance_path(m, inst).exists()
        assert inst.study_uid not in os.listdir(m.path / "store-a")
        assert run("cp", inst.path, m.path / "store-a").returncode == 0, "re-upload after delete"
        assert google.server_bytes(inst) == inst.path.read_bytes()
    finally:
        healthcare.index_lag = 1.0


# ---------------------------------------------------------------------------------------------
# Stores


def test_store_lifecycle_mkdir_mv_rmdir(healthcare, google: Backend, mount_factory, dicom: DicomFactory):  # type: ignore[no-untyped-def]
    inst = dicom.instance()
    google.seed([inst])
    m = mount_factory(google)
    assert run("mkdir", m.path / "fresh.store_1").returncode == 0
    assert "fresh.store_1" in healthcare.store_ids(google.dataset_id)
    for bad in ("has space", "semi;colon", "x" * 257):
        r = run("mkdir", m.path / bad)
        assert r.returncode != 0 and ("Invalid argument" in r.stderr or "File name too long" in r.stderr), bad
    assert run("mv", m.path / "fresh.store_1", m.path / "renamed").returncode == 0
    assert {"renamed"} <= set(healthcare.store_ids(google.dataset_id))
    assert "fresh.store_1" not in healthcare.store_ids(google.dataset_id)
    r = run("rmdir", m.path / "store-a")
    assert r.returncode != 0 and "not empty" in r.stderr.lower(), r.stderr
    assert google.has(inst), "nothing deleted"
    assert run("rmdir", m.path / "renamed").returncode == 0
    assert "renamed" not in healthcare.store_ids(google.dataset_id)
    assert "renamed" not in os.listdir(m.path)


def test_rmdir_of_a_store_just_emptied_waits_for_the_lagging_index(healthcare, google: Backend, mount_factory,  # type: ignore[no-untyped-def]
                                                                    dicom: DicomFactory):
    """Google's study search shows a deleted instance for seconds: the store this mount just
    emptied is deleted anyway (the check is asked again), not refused as not empty."""
    inst = dicom.instance()
    google.seed([inst])
    m = mount_factory(google)
    path = google.instance_path(m, inst)
    assert path.exists()
    lag = healthcare.index_lag
    healthcare.index_lag = 3.0
    try:
        assert run("rm", path).returncode == 0
        r = run("rmdir", m.path / "store-a")
        assert r.returncode == 0, r.stderr
    finally:
        healthcare.index_lag = lag
    assert "store-a" not in healthcare.store_ids(google.dataset_id)


@pytest.mark.parametrize("op", ["rmdir", "mv"])
def test_a_store_another_client_just_wrote_to_is_not_deleted(healthcare, google: Backend, mount_factory,  # type: ignore[no-untyped-def]
                                                             dicom: DicomFactory, op: str):
    """Google deletes a store with everything in it, and its search index shows another
    client's writes seconds later: a store that looked empty for one search was deleted with
    the instance just stored in it. It must look empty twice, seconds apart."""
    healthcare.create_store(google.dataset_id, "s2")
    inst = dicom.instance()
    m = mount_factory(google)
    lag = healthcare.index_lag
    healthcare.index_lag = 3.0
    try:
        healthcare.store_view(google.dataset_id, "s2").store_files([inst.path], lagging=True)  # another client
        r = run("rmdir", m.path / "s2") if op == "rmdir" else run("mv", m.path / "s2", m.path / "s3")
        assert r.returncode != 0 and "not empty" in r.stderr.lower(), r.stderr
    finally:
        healthcare.index_lag = lag
    assert "s2" in healthcare.store_ids(google.dataset_id)
    assert "s3" not in healthcare.store_ids(google.dataset_id)  # mv: the new store is removed again
    assert healthcare.store_view(google.dataset_id, "s2").instance_bytes(
        inst.study_uid, inst.series_uid, inst.sop_uid) == inst.path.read_bytes()


def test_store_deletion_refused_when_deletion_is_disabled(healthcare, google: Backend, mount_factory):  # type: ignore[no-untyped-def]
    healthcare.create_store(google.dataset_id, "empty")
    m = mount_factory(google, "--enableDeletion", "false")
    r = run("rmdir", m.path / "empty")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    assert "empty" in healthcare.store_ids(google.dataset_id)


# ---------------------------------------------------------------------------------------------
# The original README's anonymisation workflow


def test_anonymisation_workflow(healthcare, google: Backend, mount_factory, dicom: DicomFactory,  # type: ignore[no-untyped-def]
                                tmp_path: Path):
    from google.auth.transport.requests import AuthorizedSession
    from google.oauth2 import service_account

    study = dicom.series(3, series=0) + dicom.series(2, series=1)
    google.seed(study)
    m = mount_factory(google)
    assert run("mkdir", m.path / "store-b").returncode == 0
    study_folder = m.path / "store-a" / study[0].study_uid
    anon = tmp_path / "anon"
    r = run(sys.executable, ROOT / "examples" / "deidentify.py", study_folder, anon)
    assert r.returncode == 0, r.stderr
    files = sorted(anon.glob("*.dcm"))
    assert len(files) == 5
    r = subprocess.run(["sh", "-c", f'cp "{anon}"/*.dcm "{m.path / "store-b"}/"'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    # Find them in store B by QIDO, straight from the API, and check no PHI came along.
    creds = service_account.Credentials.from_service_account_file(
        str(google.key_file), scopes=["https://www.googleapis.com/auth/cloud-healthcare"])
    session = AuthorizedSession(creds)
    base = google.address.rstrip("/") + "/dicomStores/store-b/dicomWeb"
    def search() -> tuple[int, list[dict]]:  # type: ignore[type-arg]
        answer = session.get(f"{base}/instances", params={"includefield": "00100010,00100020,0020000D"},
                             headers={"Accept": "application/dicom+json"})
        assert answer.status_code in (200, 204), answer.text
        assert PATIENT_NAME not in answer.text
        return answer.status_code, (answer.json() if answer.status_code == 200 else [])

    deadline = time.monotonic() + 10
    status, results = search()
    while len(results) < 5 and time.monotonic() < deadline:
        time.sleep(0.3)  # the search index lags behind the upload
        status, results = search()
    assert status == 200 and len(results) == 5
    original_uids = {i.study_uid for i in study} | {i.sop_uid for i in study}
    for item in results:
        assert item["0020000D"]["Value"][0] not in original_uids
        assert PATIENT_NAME not in str(item)
        assert not item.get("00100010", {}).get("Value")
