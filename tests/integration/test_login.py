"""A DICOMweb server behind a login (HTTP basic authentication), as most Orthanc and dcm4chee
installations are: a real Orthanc with ``AuthenticationEnabled``, mounted with the login in the
address or in ``~/.netrc``, and refused with a message that says how to give one. The password
never reaches a log line or the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests.conftest import PATIENT_NAME, DicomFactory, requires_fuse, run
from tests.mounting import Mount

pytestmark = [requires_fuse, pytest.mark.mount]

USER = "radiologist"
PASSWORD = "pa:ss@w/rd 9"  # characters that must be percent-encoded in a URL
WRONG = "not-the-password-7"


@pytest.fixture(scope="module")
def guarded() -> Iterator[object]:
    from tests.orthanc_server import OrthancServer, OrthancUnavailable

    try:
        server = OrthancServer(login=(USER, PASSWORD)).start()
    except OrthancUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Orthanc unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


def _host(server: object) -> str:
    return str(server.url).split("://", 1)[1]  # type: ignore[attr-defined]


def _seed(server: object, paths: list[Path]) -> None:
    for path in paths:
        answer = requests.post(f"{server.url}/instances", data=path.read_bytes(),  # type: ignore[attr-defined]
                               auth=(USER, PASSWORD), timeout=30)
        answer.raise_for_status()


def _stored(server: object, sop_uid: str) -> bytes | None:
    """The file Orthanc holds for ``sop_uid`` (asked with the login, not through the mount)."""
    url = server.url  # type: ignore[attr-defined]
    found = requests.post(f"{url}/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}},
                          auth=(USER, PASSWORD), timeout=30)
    found.raise_for_status()
    if not found.json():
        return None
    answer = requests.get(f"{url}/instances/{found.json()[0]}/file", auth=(USER, PASSWORD), timeout=30)
    answer.raise_for_status()
    return answer.content


def _no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text and quote(secret, safe="") not in text, "a password reached a log or the terminal"
    assert PATIENT_NAME not in text


def _start(tmp_path: Path, address: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A mount that is expected to stop before mounting."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "dicomfuse", "-a", address, "-p", str(mnt),
                           "--cacheDir", str(tmp_path / "c"), "--logDir", str(tmp_path / "l")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def _logs(tmp_path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((tmp_path / "l").glob("*.log*")))


def test_login_in_the_address_reads_sizes_copies_out_and_in(guarded: object, dicom: DicomFactory, tmp_path: Path):
    """Listings come with sizes (Orthanc's REST API is reached with the same login), files copy
    out byte for byte and a file copied in is stored."""
    series = dicom.series(3)
    _seed(guarded, [i.path for i in series[:2]])
    address = f"http://{quote(USER)}:{quote(PASSWORD, safe='')}@{_host(guarded)}/dicom-web"
    home = tmp_path / "home"
    home.mkdir()
    with Mount(address, tmp_path / "m", env={"HOME": str(home)}) as m:
        folder = m.path / _host(guarded).split(":")[0] / series[0].study_uid / series[0].series_uid
        sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
        assert sizes == {f"{i.sop_uid}.dcm": i.path.stat().st_size for i in series[:2]}
        copy = tmp_path / "copy"
        assert run("cp", "-r", folder, copy).returncode == 0
        for inst in series[:2]:
            assert (copy / f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()
        r = run("cp", series[2].path, folder)
        assert r.returncode == 0, r.stderr
    assert _stored(guarded, series[2].sop_uid) == series[2].path.read_bytes()
    _no_secret(m.log_text(), PASSWORD)


def test_login_from_netrc(guarded: object, dicom: DicomFactory, tmp_path: Path):
    inst = dicom.instance(study=1)
    _seed(guarded, [inst.path])
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    host = _host(guarded).split(":")[0]
    netrc.write_text(f"machine {host}\nlogin {USER}\npassword {WRONG}\n")
    netrc.chmod(0o600)
    r = _start(tmp_path / "refused", f"http://{_host(guarded)}/dicom-web", env={"HOME": str(home)})
    assert r.returncode == 1 and "the server refused it" in r.stderr, r.stderr  # .netrc read, its login wrong
    netrc.write_text(f"machine {host}\nlogin {USER}\npassword \"{PASSWORD}\"\n")
    _no_secret(r.stdout + r.stderr + _logs(tmp_path / "refused"), WRONG)
    with Mount(f"http://{_host(guarded)}/dicom-web", tmp_path / "m", env={"HOME": str(home)}) as m:
        path = m.path / host / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
        assert path.read_bytes() == inst.path.read_bytes()
    _no_secret(m.log_text(), PASSWORD)


def test_no_login_says_how_to_give_one(guarded: object, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()  # no ~/.netrc
    r = _start(tmp_path, f"http://{_host(guarded)}/dicom-web", env={"HOME": str(home)})
    assert r.returncode == 1, r.stderr
    assert "401" in r.stderr and "~/.netrc" in r.stderr, r.stderr
    assert f"http://USER:PASSWORD@{_host(guarded)}/dicom-web" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not os.path.ismount(tmp_path / "mnt")


def test_a_wrong_password_is_said_and_never_shown(guarded: object, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    r = _start(tmp_path, f"http://{USER}:{WRONG}@{_host(guarded)}/dicom-web", env={"HOME": str(home)})
    assert r.returncode == 1, r.stderr
    assert "refused the user name and password given in the address" in r.stderr, r.stderr
    _no_secret(r.stdout + r.stderr + _logs(tmp_path), WRONG)
    # Nor when the address is wrong in another way (no DICOMweb root: the hint repeats the address).
    r = _start(tmp_path, f"http://{USER}:{WRONG}@{_host(guarded)}", env={"HOME": str(home)})
    assert r.returncode == 1, r.stderr
    _no_secret(r.stdout + r.stderr + _logs(tmp_path), WRONG)
