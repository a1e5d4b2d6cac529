"""Mount DICOMFuse for real in a subprocess, wait for it with a bound, always unmount."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MOUNT_TIMEOUT = 30.0


def unmount_command(path: Path | str, *, lazy: bool = False) -> list[str]:
    """How a user unmounts: fusermount3 on Linux, umount on macOS (macFUSE)."""
    if sys.platform == "darwin":
        return ["umount", *(["-f"] if lazy else []), str(path)]
    return ["fusermount3", "-uz" if lazy else "-u", str(path)]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until true or ``timeout`` seconds pass (then AssertionError)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Mount:
    """``python -m dicomfuse -a ADDRESS -p PATH ...`` as a user runs it."""

    def __init__(self, address: str, workdir: Path, *extra_args: str, env: dict[str, str] | None = None,
                 subcommand: tuple[str, ...] = ()) -> None:
        self.address = address
        self.subcommand = subcommand
        self.env = env
        self.path = workdir / "mnt"
        self.cache_dir = workdir / "cache"
        self.log_dir = workdir / "logs"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = workdir / "mount-output.txt"
        self.returncode: int | None = None

    @property
    def argv(self) -> list[str]:
        target = ["demo"] if self.address == "demo" else [*self.subcommand, "-a", self.address]
        return [sys.executable, "-m", "dicomfuse", *target, "-p", str(self.path),
                "--cacheDir", str(self.cache_dir), "--logDir", str(self.log_dir), *self.extra_args]

    def start(self) -> Mount:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise  # ENOTCONN: the dead mount of a killed process is there; the mount clears it
        out = open(self.output, "wb")
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        out.close()
        try:
            wait_for(lambda: os.path.ismount(self.path) or self.proc.poll() is not None,  # type: ignore[union-attr]
                     MOUNT_TIMEOUT, what="the mount")
        except AssertionError:
            self.stop()
            raise AssertionError(f"mount did not appear:\n{self.diagnostics()}") from None
        if not os.path.ismount(self.path):
            raise AssertionError(f"dicomfuse exited {self.proc.returncode} before mounting:\n{self.diagnostics()}")
        return self

    def stop(self, sig: int | None = None) -> int | None:
        """Unmount (by signal if given, else fusermount3 -u / umount), wait for the process."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig is not None:
                self.proc.send_signal(sig)
            else:
                subprocess.run(unmount_command(self.path), capture_output=True)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if os.path.ismount(self.path):
            subprocess.run(unmount_command(self.path, lazy=True), capture_output=True)
        self.returncode = self.proc.returncode
        return self.returncode

    def diagnostics(self) -> str:
        parts = [f"argv: {' '.join(self.argv)}"]
        mounts = subprocess.run(["mount"], capture_output=True, text=True).stdout
        parts.append("fuse mounts:\n" + "\n".join(line for line in mounts.splitlines() if "fuse" in line))
        if self.output.exists():
            parts.append("output:\n" + self.output.read_text(errors="replace")[-4000:])
        debug = self.log_dir / "debug.log"
        if debug.exists():
            parts.append("debug.log tail:\n" + debug.read_text(errors="replace")[-4000:])
        return "\n\n".join(parts)

    def log_text(self) -> str:
        """Every log file and what the process printed on the terminal."""
        files = sorted(self.log_dir.glob("*.log*")) + ([self.output] if self.output.exists() else [])
        return "".join(p.read_text(errors="replace") for p in files)

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
