"""A DICOMFuse mount as a user starts it (``python -m dicomfuse -a ... -p ...``), in a subprocess.

Every mount gets fresh cache and log folders (a cold cache); :meth:`Mount.stop` unmounts with
``fusermount3 -u`` and waits, so pending uploads finish. :class:`FloorMount` mounts the
do-nothing passthrough of ``bench/floor.py`` the same way. :class:`PeakRss` samples the peak
resident memory of the mount process and its children while something runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

MOUNT_TIMEOUT_S = 30.0
UNMOUNT_TIMEOUT_S = 120.0  # unmount waits for uploads in progress
POLL_S = 0.02
REPO = Path(__file__).resolve().parent.parent


class MountError(RuntimeError):
    """The mount did not come up (or rejected its options)."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class Mount:
    """``with Mount(url, workdir, args) as m:`` → mounted at ``m.path`` until the block ends."""

    program = "dicomfuse"

    def __init__(self, address: str, workdir: Path, args: Sequence[str] = ()) -> None:
        self.address = address
        self.workdir = workdir
        self.path = workdir / "mnt"
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = workdir / "mount-output.txt"

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "dicomfuse", "-a", self.address, "-p", str(self.path),
                "--cacheDir", str(self.workdir / "cache"), "--logDir", str(self.workdir / "logs"), *self.args]

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                raise MountError(f"{self.program} exited with status {self.proc.returncode} before mounting: "
                                 f"{self.output_tail()}", self.proc.returncode)
            if time.monotonic() > deadline:
                self.stop()
                raise MountError(f"the mount did not appear within {MOUNT_TIMEOUT_S:.0f} s: {self.output_tail()}")
            time.sleep(POLL_S)
        return self

    def stop(self) -> None:
        """Unmount and wait for the process (SIGTERM, then SIGKILL, if it hangs)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            try:
                proc.wait(timeout=UNMOUNT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)

    def output_tail(self, chars: int = 2000) -> str:
        try:
            return self.output.read_text(errors="replace")[-chars:].strip() or "(no output)"
        except OSError:
            return "(no output)"

    def __enter__(self) -> Mount:
        return self if self.proc is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class FloorMount(Mount):
    """``bench/floor.py``, the do-nothing passthrough FUSE filesystem, serving ``source`` at
    ``workdir/mnt``: ``with FloorMount(source, workdir) as m:``."""

    program = "bench/floor.py"

    def __init__(self, source: Path, workdir: Path, args: Sequence[str] = ()) -> None:
        super().__init__(str(source), workdir, args)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, str(REPO / "bench" / "floor.py"), self.address, str(self.path), *self.args]


class CFloorMount(Mount):
    """``bench/floor_c.c``, the read-only floor written in C (libfuse 3's high-level API), built
    into ``build_dir`` the first time; MountError with the compiler's words when it cannot be
    (it needs gcc and libfuse3's headers: ``apt-get install gcc libfuse3-dev``)."""

    program = "bench/floor_c.c"

    def __init__(self, source: Path, workdir: Path, build_dir: Path) -> None:
        super().__init__(str(source), workdir)
        self.binary = build_dir / "floor_c"

    def build(self) -> None:
        if self.binary.exists():
            return
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        try:
            flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                                   check=True).stdout.split()
            subprocess.run(["gcc", "-O2", str(REPO / "bench" / "floor_c.c"), "-o", str(self.binary), *flags],
                           capture_output=True, text=True, check=True)
        except FileNotFoundError as exc:
            raise MountError(f"cannot build the C floor: {exc.filename} is not installed "
                             "(apt-get install gcc pkg-config libfuse3-dev)") from None
        except subprocess.CalledProcessError as exc:
            lines = (exc.stderr or "").strip().splitlines()
            last = lines[-1] if lines else f"status {exc.returncode}"
            words = next((line for line in lines if "error" in line), last)
            raise MountError(f"cannot build the C floor ({exc.cmd[0]}: {words.strip()}; "
                             "apt-get install gcc pkg-config libfuse3-dev)") from None

    def start(self) -> Mount:
        self.build()
        return super().start()

    @property
    def argv(self) -> list[str]:
        return [str(self.binary), self.address, str(self.path), "-f", "-o", "fsname=dicomfuse-floor-c"]


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    kids = [int(k) for k in children.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


class PeakRss:
    """Peak resident memory (``VmHWM``) of a process and of its children while the block runs.

    ``VmHWM`` is the kernel's own high-water mark, so a spike between two samples is not missed
    for the main process; children (if any) are sampled every ``POLL_S`` and their last seen
    high-water marks summed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.main_kib = 0
        self.children_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @property
    def peak_mib(self) -> float:
        return (self.main_kib + sum(self.children_kib.values())) / 1024

    def _sample(self) -> None:
        self.main_kib = max(self.main_kib, _status_kib(self.pid, "VmHWM") or 0)
        for child in _descendants(self.pid):
            hwm = _status_kib(child, "VmHWM")
            if hwm is not None:
                self.children_kib[child] = max(self.children_kib.get(child, 0), hwm)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
