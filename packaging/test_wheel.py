"""The wheel and sdist that packaging/build.sh (build.ps1 on Windows) makes with ``python -m build``:
what they contain, and that ``pipx install`` takes each and gives a working ``dicomfuse`` command.

Not part of the fast suite (pytest's testpaths is ``tests``): run ``bash packaging/build.sh`` first, then
``.venv/bin/python -m pytest packaging``. The files are read from ``$DICOMFUSE_DIST_DIR`` or
``packaging/dist/python``; pipx is the build venv's (``packaging/.build-venv``), else one on PATH. Missing
files or pipx skip these tests, except under CI (``CI=true``), where they fail. pipx installs into a temporary
PIPX_HOME and PIPX_BIN_DIR, never the user's; it downloads the dependencies from the package index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WINDOWS = sys.platform == "win32"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    if in_ci():
        pytest.fail(reason + " (CI=true: build.sh must have run)")
    pytest.skip(reason)


def dist_dir() -> Path:
    return Path(os.environ.get("DICOMFUSE_DIST_DIR") or HERE / "dist" / "python")


def one(pattern: str) -> Path:
    found = sorted(dist_dir().glob(pattern))
    if not found:
        missing(f"no {pattern} in {dist_dir()}: build it with 'bash packaging/build.sh'")
    assert len(found) == 1, f"several {pattern} in {dist_dir()}: {[p.name for p in found]}"
    return found[0]


@pytest.fixture(scope="module")
def wheel() -> Path:
    return one("dicomfuse-*.whl")


@pytest.fixture(scope="module")
def sdist() -> Path:
    return one("dicomfuse-*.tar.gz")


def says_apache(metadata: str) -> bool:
    """Core metadata 2.4 has License-Expression (pyproject ``license = "Apache-2.0"``); older
    setuptools write the same text under License (``license = {text = "Apache-2.0"}``)."""
    headers = HeaderParser().parsestr(metadata)
    return headers.get("License-Expression") == "Apache-2.0" or headers.get("License") == "Apache-2.0"


def test_wheel_carries_the_license_and_only_dicomfuse(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        licenses = [n for n in names if n.startswith(info) and n.rsplit("/", 1)[-1] == "LICENSE"]
        assert licenses, f"no LICENSE in {wheel.name}"
        assert zf.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert says_apache(metadata), "the wheel's metadata does not name Apache-2.0"
    assert "License-File: LICENSE" in metadata
    assert "dicomfuse = dicomfuse.cli.main:entry" in entry_points
    # DESIGN.md: top-level import names are dicomfuse.* only (never a package called core or cli).
    assert {n.split("/")[0] for n in names} == {"dicomfuse", info}


def test_sdist_carries_the_license(sdist: Path) -> None:
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        top = names[0].split("/")[0]
        assert f"{top}/LICENSE" in names
        pkg_info = tf.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        assert says_apache(pkg_info.read().decode()), "the sdist's PKG-INFO does not name Apache-2.0"


def find_pipx() -> Path:
    venv = HERE / ".build-venv"
    for candidate in (os.environ.get("DICOMFUSE_PIPX"), venv / "Scripts" / "pipx.exe", venv / "bin" / "pipx",
                      shutil.which("pipx")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    missing("pipx not found: 'bash packaging/build.sh' installs it into packaging/.build-venv")
    raise AssertionError("unreachable")


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_pipx_installs_a_working_command(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    package: Path = request.getfixturevalue(kind)
    pipx = find_pipx()
    env = {**os.environ, "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin"),
           "PIPX_MAN_DIR": str(tmp_path / "man"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([str(pipx), "install", "--force", str(package)], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, f"pipx install {package.name} failed:\n{result.stdout}\n{result.stderr}"
    command = tmp_path / "bin" / ("dicomfuse.exe" if WINDOWS else "dicomfuse")
    assert command.is_file(), f"pipx made no {command}:\n{result.stdout}"
    help_run = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert "--datasetAddr" in help_run.stdout and "--mountPath" in help_run.stdout
