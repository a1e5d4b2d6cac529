"""The standalone executable that packaging/build.sh (build.ps1 on Windows) makes, run as a user runs it.

Not part of the fast suite (pytest's testpaths is ``tests``): run ``bash packaging/build.sh`` first, then
``.venv/bin/python -m pytest packaging``. The binary is ``$DICOMFUSE_BINARY`` or ``packaging/dist/dicomfuse``
(``dicomfuse.exe`` on Windows). A missing binary skips these tests, except under CI (``CI=true``), where it fails.

The mount tests (the demo dataset; a dataset of the Cloud Healthcare stand-in, with a key file) need FUSE
(Linux: /dev/fuse and fusermount3; macOS: macFUSE with its kernel extension allowed) and POSIX tools (``cp``,
signals), so they run on Linux and macOS; on Windows only the checks that need no mount run
(tests/integration/test_windows_mount.py mounts through WinFsp).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WINDOWS = sys.platform == "win32"
MOUNT_TIMEOUT = 60.0  # the one-file binary unpacks itself first; the demo dataset is generated on the first run


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def binary_path() -> Path:
    default = HERE / "dist" / ("dicomfuse.exe" if WINDOWS else "dicomfuse")
    return Path(os.environ.get("DICOMFUSE_BINARY") or default)


@pytest.fixture(scope="module")
def binary() -> Path:
    path = binary_path()
    if not path.is_file():
        reason = (f"no standalone binary at {path}: build it with 'bash packaging/build.sh' "
                  "('packaging\\build.ps1' on Windows) or point DICOMFUSE_BINARY at one")
        if in_ci():
            pytest.fail(reason + " (CI=true: the binary must have been built)")
        pytest.skip(reason)
    return path


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Without a mount: every OS.


def test_help_names_every_option(binary: Path) -> None:
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--datasetAddr", "-a", "--mountPath", "-p", "--cacheTime", "-t", "--cacheSize", "-s",
                 "--enableDeletion", "-d", "--keyFile", "-k", "--extraMountOptions", "--cacheDir", "--logDir"):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", result.stdout), f"{flag} missing from --help"
    assert "dicomfuse demo" in result.stdout


def test_version_and_subcommand_help(binary: Path) -> None:
    from dicomfuse import __version__

    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.split() == ["dicomfuse", __version__]
    for sub in ("demo", "status", "prefetch", "retry"):
        result = subprocess.run([str(binary), sub, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{sub} --help: {result.stderr}"
        assert "usage:" in result.stdout


def test_bad_option_is_one_line_and_status_2(binary: Path, tmp_path: Path) -> None:
    result = subprocess.run([str(binary), "-a", str(tmp_path), "-p", str(tmp_path), "--cacheTime", "soon"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("dicomfuse: error: --cacheTime")


def bundle_names(path: Path) -> list[str]:
    """Names in the one-file bundle's table of contents, with ``/`` between folders (PyInstaller's
    CArchive, read as its ``pyi-archive_viewer --list`` does): a cookie ``!8sIIII64s`` at the end of
    the archive, then entries ``!IIIIBc`` + name."""
    data = path.read_bytes()
    cookie_at = data.rfind(b"MEI\014\013\012\013\016")
    assert cookie_at >= 0, f"{path} is not a PyInstaller one-file executable"
    _, archive_len, toc_offset, toc_len, _, _ = struct.unpack_from("!8sIIII64s", data, cookie_at)
    start = cookie_at + struct.calcsize("!8sIIII64s") - archive_len
    toc = data[start + toc_offset:start + toc_offset + toc_len]
    names, pos, head = [], 0, struct.calcsize("!IIIIBc")
    while pos < len(toc):
        (entry_len,) = struct.unpack_from("!I", toc, pos)
        names.append(toc[pos + head:pos + entry_len].rstrip(b"\0").decode("utf-8").replace("\\", "/"))
        pos += entry_len
    return names


def test_no_fuse_library_is_bundled(binary: Path) -> None:
    """The user's libfuse3 / macFUSE / WinFsp must be the one loaded, never a copy in the bundle."""
    names = bundle_names(binary)
    assert any(n.startswith("certifi/cacert.pem") for n in names), "the CA bundle is missing"
    assert any("pydantic_core" in n for n in names), "pydantic-core's compiled module is missing"
    fuse = re.compile(r"(^|/)(lib)?(fuse3?|osxfuse|macfuse|fuse-t)([.-]\d|\.so|\.dylib|\.dll)|winfsp-(x64|x86|a64)",
                      re.IGNORECASE)
    assert not [n for n in names if fuse.search(n)]


# ---------------------------------------------------------------------------------------------
# A real mount of the demo dataset with the binary: Linux and macOS.


def fuse_problem() -> str | None:
    if sys.platform.startswith("linux"):
        if os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
            return None
        return "needs /dev/fuse and fusermount3 (apt install fuse3)"
    if sys.platform == "darwin":
        if Path("/Library/Filesystems/macfuse.fs").exists():
            return None
        return "needs macFUSE (brew install --cask macfuse) with its kernel extension allowed"
    return "mounts with the binary are tested on Linux and macOS (Windows: tests/integration/test_windows_mount.py)"


def force_unmount(path: Path) -> None:
    if sys.platform.startswith("linux"):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, timeout=30)
    else:
        subprocess.run(["umount", "-f", str(path)], capture_output=True, timeout=30)


class BinaryMount:
    """``dicomfuse demo`` (or ``dicomfuse -a ADDRESS …``) ``-p MNT --cacheDir … --logDir …`` with the binary,
    in a session of its own (so that clean-up can signal the one-file bootloader and the Python process it
    starts together)."""

    def __init__(self, binary: Path, workdir: Path, *target: str) -> None:
        """``target``: ``demo`` (the default) or ``-a ADDRESS [options]``."""
        self.path = workdir / "mnt"
        self.logs = workdir / "logs"
        self.output = workdir / "output.txt"
        # A fresh HOME and XDG data folder: the binary generates its demo dataset there (platformdirs'
        # user data folder), not in the user's own.
        self.env = {**os.environ, "HOME": str(workdir / "home"), "XDG_DATA_HOME": str(workdir / "data")}
        self.argv = [str(binary), *(target or ("demo",)), "-p", str(self.path), "--cacheDir", str(workdir / "cache"),
                     "--logDir", str(self.logs)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BinaryMount:
        self.path.mkdir(parents=True)
        Path(self.env["HOME"]).mkdir()
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        proc = self.proc
        try:
            wait_for(lambda: os.path.ismount(self.path) or proc.poll() is not None, MOUNT_TIMEOUT, "the mount")
        except AssertionError:
            raise AssertionError(f"the mount did not appear:\n{self.diagnostics()}") from None
        assert os.path.ismount(self.path), f"dicomfuse exited {proc.returncode} before mounting:\n{self.diagnostics()}"
        return self

    def demo_root(self) -> Path:
        """Where the demo dataset is on disk: the demo prints it before it mounts."""
        found = re.search(r"^Demo dataset: (.+)$", self.output.read_text(errors="replace"), re.MULTILINE)
        assert found, f"the demo did not say where its dataset is:\n{self.diagnostics()}"
        return Path(found.group(1).strip())

    def interrupt(self, timeout: float = 60.0) -> int:
        """SIGINT to the executable (``kill -INT PID``), which the one-file bootloader forwards once to
        the Python process; the exit status.

        Not ``killpg``: a terminal's Ctrl+C reaches both processes, so Python gets SIGINT twice, and when
        the second one lands after libfuse has given the handler back, KeyboardInterrupt cuts the
        shutdown short (exit 130, cache not wiped; seen about 1 run in 30 on a loaded machine). That is
        for cli.main to absorb (ignore SIGINT once the mount has ended), not for the bootloader."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def log_text(self) -> str:
        files = sorted(self.logs.glob("*.log*")) + ([self.output] if self.output.exists() else [])
        return "".join(p.read_text(errors="replace") for p in files)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.path):
            force_unmount(self.path)

    def diagnostics(self) -> str:
        parts = [f"argv: {' '.join(self.argv)}", f"exit status: {self.proc.poll() if self.proc else None}"]
        mounts = subprocess.run(["mount"], capture_output=True, text=True).stdout
        parts.append("fuse mounts:\n" + "\n".join(line for line in mounts.splitlines() if "fuse" in line))
        if self.output.exists():
            parts.append("output:\n" + self.output.read_text(errors="replace")[-4000:])
        debug = self.logs / "debug.log"
        if debug.exists():
            parts.append("debug.log tail:\n" + debug.read_text(errors="replace")[-4000:])
        return "\n\n".join(parts)


@pytest.fixture
def demo_mount(binary: Path, tmp_path: Path) -> Iterator[BinaryMount]:
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    mount = BinaryMount(binary, tmp_path)
    try:
        yield mount.start()
    finally:
        mount.cleanup()


def files_under(root: Path, pattern: str = "*") -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob(pattern) if p.is_file()}


@pytest.mark.mount
def test_binary_mounts_the_demo_copies_out_and_in_and_unmounts_on_sigint(demo_mount: BinaryMount,
                                                                         tmp_path: Path) -> None:
    from dicomfuse.samples import make_uid, write_instance

    mnt = demo_mount.path
    root = demo_mount.demo_root()
    assert tmp_path in root.parents, f"the demo dataset should be under the test's HOME, not {root}"
    assert {"demo-store", "scratch"} <= set(os.listdir(mnt))

    # Everything out with the real cp, byte-identical with the dataset on disk.
    out = tmp_path / "copy"
    out.mkdir()
    result = subprocess.run(["cp", "-r", f"{mnt}/.", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    on_disk = files_under(root, "*.dcm")
    copied = files_under(out)
    assert len(on_disk) >= 4
    assert sorted(copied) == sorted(on_disk)
    different = [name for name, path in on_disk.items() if copied[name].read_bytes() != path.read_bytes()]
    assert not different, f"{len(different)} file(s) differ, e.g. {different[0]}"

    # One upload of a generated DICOM file, and one read back.
    seed = uuid.uuid4().hex
    study, series, sop = (make_uid(seed, level) for level in ("study", "series", "sop"))
    new = write_instance(tmp_path / "new.dcm", study, series, sop, patient_name="Binary^Test")
    result = subprocess.run(["cp", str(new), str(mnt / "scratch")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    uploaded = mnt / "scratch" / study / series / f"{sop}.dcm"
    assert uploaded.read_bytes() == new.read_bytes()
    assert (root / "scratch" / study / series / f"{sop}.dcm").read_bytes() == new.read_bytes()

    # SIGINT: exit status 0, the mount gone, the cache wiped.
    assert demo_mount.interrupt() == 0, demo_mount.diagnostics()
    assert not os.path.ismount(mnt)
    assert "cache wiped" in demo_mount.output.read_text(errors="replace")
    assert "Binary^Test" not in demo_mount.log_text()


@pytest.mark.mount
def test_binary_mounts_a_cloud_healthcare_dataset_with_a_key_file(binary: Path, tmp_path: Path) -> None:
    """The frozen google-auth path end to end: a service-account key signed with the bundled
    cryptography, a token from the Cloud Healthcare stand-in (tests/fakes, on 127.0.0.1), then
    DICOMweb through the bundled requests."""
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    from tests.fakes.healthcare import HealthcareStandIn

    from dicomfuse.samples import make_uid, write_instance

    seed = uuid.uuid4().hex
    study, series, sop = (make_uid(seed, level) for level in ("study", "series", "sop"))
    sample = write_instance(tmp_path / "sample.dcm", study, series, sop, patient_name="Binary^Google")
    with HealthcareStandIn() as standin:
        url = standin.create_dataset("binary-test")
        standin.create_store("binary-test", "store-a")
        assert all(o.stored for o in standin.store_view("binary-test", "store-a").store_files([sample]))
        key = standin.write_key_file(tmp_path / "key.json")
        key.chmod(0o600)
        mount = BinaryMount(binary, tmp_path, "-a", url, "--keyFile", str(key))
        try:
            mount.start()
            assert os.listdir(mount.path) == ["store-a"]
            assert (mount.path / "store-a" / study / series / f"{sop}.dcm").read_bytes() == sample.read_bytes()
            assert mount.interrupt() == 0, mount.diagnostics()
        finally:
            mount.cleanup()
        text = mount.log_text()
        assert "Binary^Google" not in text and "PRIVATE KEY" not in text
        assert not [token for token in standin.issued_tokens() if token in text]
        assert standin.issued_tokens(), "no access token was asked for"
