"""The README's first command: ``dicomfuse demo`` leaves a browsable mount of sample studies."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pydicom
import pytest

from tests.conftest import requires_fuse, run
from tests.mounting import Mount, wait_for

pytestmark = [requires_fuse, pytest.mark.mount]


def test_demo_mount_is_browsable_and_writable(tmp_path: Path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    m = Mount("demo", tmp_path, env=env).start()
    try:
        assert {"demo-store", "scratch"} <= set(os.listdir(m.path))
        files = sorted((m.path / "demo-store").glob("*/*/*.dcm"))
        assert len(files) >= 4
        ds = pydicom.dcmread(files[0])
        assert f"{ds.SOPInstanceUID}.dcm" == files[0].name
        r = run("cp", files[0], m.path / "scratch")
        assert r.returncode == 0, r.stderr
        assert (m.path / "scratch" / ds.StudyInstanceUID / ds.SeriesInstanceUID / files[0].name).read_bytes() == \
            files[0].read_bytes()
        # The README's "then, in another terminal" commands, as written there.
        readme = (Path(__file__).parents[2] / "README.md").read_text()
        line = readme[readme.index("Then, in another terminal:"):].split("\n\n")[0]
        commands = re.findall(r"`([^`]+)`", line)
        assert len(commands) == 3, line
        for command in commands:
            command = command.replace("/tmp/demo-copy", str(tmp_path / "demo-copy")).replace("~/dicomfuse-demo",
                                                                                             str(m.path))
            r = run("sh", "-c", command)
            assert r.returncode == 0, (command, r.stderr)
        copied = sorted(p.name for p in (tmp_path / "demo-copy").glob("*/*/*.dcm"))
        assert copied == sorted(f.name for f in files)
        assert m.stop(signal.SIGINT) == 0  # Ctrl+C
    finally:
        m.stop()
    assert not os.path.ismount(m.path)
    # What the user saw in the terminal: our lines only (libfuse 3.14 printed "Ignoring invalid max
    # threads value 4294967295" at every mount until max_idle_threads was set).
    terminal = m.output.read_text(errors="replace").splitlines()
    assert terminal and all(line.startswith(("INFO ", "Demo dataset:", "Mounting at ")) for line in terminal), terminal


def test_the_demo_starts_again_after_it_was_killed(tmp_path: Path):
    """kill -9 leaves the demo's folder answering "Transport endpoint is not connected": the
    next 'dicomfuse demo' failed making that folder ('unexpected OSError', exit 1) and left the
    dead mount, though a mount whose process died is unmounted at the next start."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    m = Mount("demo", tmp_path / "first", env=env).start()
    assert m.proc is not None
    assert "demo-store" in os.listdir(m.path)
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(10)
    with pytest.raises(OSError):
        os.listdir(m.path)  # the dead mount
    again = Mount("demo", tmp_path / "first", env=env).start()
    try:
        # (the dead mount passes for a mount point: wait for the new one to answer)
        wait_for(lambda: "demo-store" in _listing(again.path), 30, what="the demo to mount again")
    finally:
        code = again.stop(signal.SIGINT)
        m.stop()  # a dead mount left by a failure goes
    assert code == 0, again.diagnostics()
    assert "had stopped without unmounting" in again.log_text()


def _listing(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
