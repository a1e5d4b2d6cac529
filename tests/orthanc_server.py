"""A real Orthanc with its DICOMweb plugin, on 127.0.0.1 with free ports, for the tests.

Not a conftest: fixtures wrap :class:`OrthancServer` (session-scoped, Orthanc takes a moment to
start). Usage::

    with OrthancServer() as orthanc:
        orthanc.dicomweb_url  # "http://127.0.0.1:PORT/dicom-web"
        orthanc.reset()       # delete every patient
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_CHARS = 3000


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed, or Orthanc did not start."""


def find_orthanc_binary() -> Path:
    """The Orthanc executable, or :class:`OrthancUnavailable`."""
    for candidate in ORTHANC_BINARIES:
        if Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("Orthanc")
    if found:
        return Path(found)
    raise OrthancUnavailable(f"Orthanc is not installed (looked for {', '.join(ORTHANC_BINARIES)})")


def find_dicomweb_plugin() -> Path:
    """The DICOMweb plugin shared library, or :class:`OrthancUnavailable`."""
    for candidate in DICOMWEB_PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return Path(candidate)
    lib_dir = Path("/usr/lib/orthanc")
    if lib_dir.is_dir():
        versioned = sorted(lib_dir.glob("libOrthancDicomWeb.so*"))
        if versioned:
            return versioned[-1]
    raise OrthancUnavailable("the Orthanc DICOMweb plugin (libOrthancDicomWeb.so) is not installed")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrthancServer:
    """Start Orthanc in a temporary folder; stop it and remove the folder on :meth:`stop`."""

    def __init__(
        self,
        *,
        aet: str = "DICOMFUSE",
        start_timeout: float = START_TIMEOUT_S,
        extra_config: dict[str, object] | None = None,
        login: tuple[str, str] | None = None,
    ) -> None:
        """``login``: (user, password) that Orthanc then asks of every HTTP client (its
        ``AuthenticationEnabled``); this object's own requests send it."""
        self.binary = find_orthanc_binary()
        self.plugin = find_dicomweb_plugin()
        self.aet = aet
        self.start_timeout = start_timeout
        self.extra_config = dict(extra_config or {})
        self.http_port = 0
        self.dicom_port = 0
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.login = login
        self._session = requests.Session()
        self._session.auth = login
        self._session.trust_env = False  # a ~/.netrc of the test run is not this server's login

    # -- addresses ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The REST root, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root, ``http://127.0.0.1:PORT/dicom-web``."""
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None, "Orthanc is not started"
        return self._workdir / "orthanc.log"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until ``/system`` answers."""
        self._workdir = Path(tempfile.mkdtemp(prefix="dicomfuse-orthanc-"))
        self.http_port = free_port()
        self.dicom_port = free_port()
        config_path = self._workdir / "orthanc.json"
        config_path.write_text(json.dumps(self._config(), indent=2))
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [str(self.binary), "--verbose", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._workdir,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self) -> dict[str, object]:
        assert self._workdir is not None
        config: dict[str, object] = {
            "Name": "dicomfuse-test",
            "DicomAet": self.aet,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self._workdir / "storage"),
            "IndexDirectory": str(self._workdir / "index"),
            "StorageCompression": False,
            "ConcurrentJobs": 2,
            "Plugins": [str(self.plugin)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        if self.login is not None:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = {self.login[0]: self.login[1]}
        config.update(self.extra_config)
        return config

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise OrthancUnavailable(
                    f"Orthanc exited with status {self._process.returncode} during start-up:\n" + self.log_tail()
                )
            if self._answers_system():
                return
            time.sleep(POLL_INTERVAL_S)
        raise OrthancUnavailable(f"Orthanc did not answer within {self.start_timeout:.0f} s:\n" + self.log_tail())

    def _answers_system(self) -> bool:
        try:
            response = self._session.get(f"{self.url}/system", timeout=(1, 2))
        except requests.RequestException:
            return False
        if response.status_code != 200:
            return False
        # The DICOMweb plugin registers its routes before /system answers, but check anyway.
        try:
            plugins = self._session.get(f"{self.url}/plugins", timeout=(1, 2)).json()
        except (requests.RequestException, ValueError):
            return False
        return "dicom-web" in plugins

    def stop(self) -> None:
        """Terminate (then kill) Orthanc and remove its folder. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        self._session.close()
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers for tests ----------------------------------------------------------------------

    def reset(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        response = self._session.get(f"{self.url}/patients", timeout=(5, 30))
        response.raise_for_status()
        for patient_id in response.json():
            deleted = self._session.delete(f"{self.url}/patients/{patient_id}", timeout=(5, 60))
            if deleted.status_code not in (200, 404):
                deleted.raise_for_status()

    def instance_count(self) -> int:
        """How many instances Orthanc holds (from ``/statistics``)."""
        response = self._session.get(f"{self.url}/statistics", timeout=(5, 30))
        response.raise_for_status()
        return int(response.json()["CountInstances"])

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of Orthanc's log, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AssertionError):
            return "(no log)"
