"""The scenarios: each runs its baseline beside fresh mounts in the same run and returns rows.

Timed passes talk to Orthanc directly. Request counts come from a separate pass of the same
operation on another fresh mount that talks to Orthanc through :class:`~bench.proxy.CountingProxy`
(a Python proxy would slow the timed pass down).

Floor rows (never judged) measure, in the same repetitions and against the same baseline, what
no implementation of the mount can beat: the do-nothing FUSE passthrough of ``bench/floor.py``,
or the server's own first byte. A floor that cannot measure is reported N/A with the reason.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.orthanc_server import OrthancServer

from bench import clients
from bench.data import MIB, Instance, Series, Sizes, seed_server, write_large, write_series, write_studies
from bench.mounts import REPO, CFloorMount, FloorMount, Mount, MountError, PeakRss
from bench.proxy import CountingProxy, Counts
from bench.results import NOT_AVAILABLE, Row, median
from dicomfuse.stores.dicomweb import store_name_from_url

ORTHANC_CONFIG: dict[str, object] = {
    "LimitFindResults": 0,  # 0: QIDO answers are never cut short
    "LimitFindInstances": 0,
    "StorageCompression": False,
}
STORE_PAGE_SIZE = 1000
"""QIDO ``limit`` of the baselines' paged searches."""
UPLOAD_POLL_S = 0.05
UPLOAD_WAIT_S = 600.0
RSS_CACHE_MB = 500
FIRST_BYTES = 4096
T = TypeVar("T")


class BenchError(RuntimeError):
    """A scenario could not measure (a command failed, a copy differs)."""


@dataclass
class Config:
    quick: bool
    sizes: Sizes
    workdir: Path
    mount_args: list[str]
    repeat: int | None  # None: each scenario's default
    selected: list[str]
    log: Callable[[str], None]
    floors: bool = True  # measure the floor rows


@dataclass
class Env:
    """One Orthanc and the data seeded into it."""

    orthanc: OrthancServer
    series: Series | None = None
    studies: int = 0
    instances: tuple[Instance, ...] = ()  # the store data set's, one per study

    @property
    def dicomweb(self) -> str:
        return self.orthanc.dicomweb_url

    @property
    def store(self) -> str:
        return store_name_from_url(self.dicomweb)


@dataclass
class Warm:
    """A mount whose cache holds the series (after a cold copy), and that copy on local disk."""

    mount: Mount
    copy: Path


@dataclass
class Bench:
    config: Config
    stack: ExitStack = field(default_factory=ExitStack)
    _envs: dict[str, Env] = field(default_factory=dict)
    _mounts: int = 0
    warm: Warm | None = None
    _supports: dict[str, bool] = field(default_factory=dict)

    @property
    def sizes(self) -> Sizes:
        return self.config.sizes

    def log(self, message: str) -> None:
        self.config.log(message)

    def repeats(self, full_default: int) -> int:
        if self.config.repeat is not None:
            return self.config.repeat
        return 1 if self.config.quick else full_default

    def scratch(self, name: str) -> Path:
        """A path under the work folder that does not exist yet (its parent does)."""
        path = self.config.workdir / name
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- servers and data ----------------------------------------------------------------------

    def orthanc(self, label: str) -> OrthancServer:
        server = OrthancServer(extra_config={**ORTHANC_CONFIG, "Name": f"dicomfuse-bench-{label}"}).start()
        self.stack.callback(server.stop)
        return server

    def env(self, label: str) -> Env:
        """The Orthanc of a data set, started and seeded on first use."""
        if label not in self._envs:
            started = time.perf_counter()
            self.log(f"setting up data set {label!r}")
            env = Env(self.orthanc(label))
            folder = self.config.workdir / "data" / label
            if label == "series":
                env.series = write_series(folder, "bench-series", self.sizes.series_instances,
                                          self.sizes.series_instance_bytes)
                seed_server(env.dicomweb, [i.path for i in env.series.instances], self.log)
            elif label == "store":
                written = write_studies(folder, "bench-store", self.sizes.store_studies)
                seed_server(env.dicomweb, [i.path for i in written], self.log)
                env.studies = len(written)
                env.instances = tuple(written)
            elif label == "large":
                env.series = write_large(folder, "bench-large", self.sizes.large_bytes)
                seed_server(env.dicomweb, [env.series.instances[0].path], self.log)
            elif label == "upload":
                env.series = write_series(folder, "bench-upload", self.sizes.upload_instances,
                                          self.sizes.upload_instance_bytes)
            else:
                raise ValueError(label)
            if env.series is not None and label != "upload":
                # One untimed search, so that neither side pays for a cold server.
                clients.list_series(env.dicomweb, env.series.study_uid, env.series.series_uid)
            self.log(f"data set {label!r} ready in {time.perf_counter() - started:.1f} s")
            self._envs[label] = env
        return self._envs[label]

    # -- mounts --------------------------------------------------------------------------------

    def mount(self, label: str, address: str, extra: Sequence[str] = ()) -> Mount:
        """A fresh mount (its own empty cache); the user's ``--mount-args`` first, then the
        scenario's own options (which win)."""
        self._mounts += 1
        workdir = self.config.workdir / "mounts" / f"{self._mounts:03d}-{label}"
        mount = Mount(address, workdir, [*self.config.mount_args, *extra])
        self.stack.callback(mount.stop)
        return mount.start()

    def floor(self, label: str, source: Path, args: Sequence[str] = ()) -> FloorMount:
        """``bench/floor.py`` serving ``source``, mounted (MountError if it cannot be)."""
        self._mounts += 1
        mount = FloorMount(source, self.config.workdir / "mounts" / f"{self._mounts:03d}-{label}", args)
        self.stack.callback(mount.stop)
        return mount.start()

    def c_floor(self, label: str, source: Path) -> CFloorMount:
        """``bench/floor_c.c`` serving ``source``, built once per run and mounted (MountError if
        it cannot be built or mounted)."""
        self._mounts += 1
        mount = CFloorMount(source, self.config.workdir / "mounts" / f"{self._mounts:03d}-{label}",
                            self.config.workdir / "build")
        self.stack.callback(mount.stop)
        mount.start()
        return mount

    def counted(self, env: Env, label: str, action: Callable[[Mount], object], extra: Sequence[str] = ()) -> Counts:
        """Requests a fresh mount makes for ``action``, through the counting proxy (untimed)."""
        with CountingProxy(env.orthanc.url) as proxy:
            mount = self.mount(f"{label}-counted", f"{proxy.url}/dicom-web", extra)
            try:
                before = proxy.snapshot()
                action(mount)
                return proxy.snapshot() - before
            finally:
                mount.stop()

    def cli_supports(self, flag: str) -> bool:
        """Whether ``dicomfuse --help`` lists ``flag``."""
        if flag not in self._supports:
            env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
            result = subprocess.run([sys.executable, "-m", "dicomfuse", "--help"], capture_output=True, text=True,
                                    env=env)
            self._supports[flag] = flag in result.stdout
        return self._supports[flag]


# ---------------------------------------------------------------------------------------------
# helpers


def run_timed(argv: Sequence[str]) -> tuple[float, str]:
    """Run a command; (seconds, its output). BenchError if it fails."""
    started = time.perf_counter()
    result = subprocess.run(list(argv), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv[:2])} … exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return seconds, result.stdout


def series_path(mount: Mount, env: Env) -> Path:
    assert env.series is not None
    return mount.path / env.store / env.series.study_uid / env.series.series_uid


def verify_copy(copy: Path, series: Series) -> None:
    """Every instance of the series is in ``copy``, byte for byte, and nothing else."""
    names = sorted(os.listdir(copy))
    expected = sorted(i.file_name for i in series.instances)
    if names != expected:
        raise BenchError(f"{copy} holds {len(names)} files, expected the {len(expected)} instances of the series")
    differ = [i.file_name for i in series.instances if not filecmp.cmp(i.path, copy / i.file_name, shallow=False)]
    if differ:
        raise BenchError(f"{len(differ)} copied files differ from the stored instances, e.g. {differ[0]}")


def read_all(folder: Path) -> tuple[float, int]:
    """Read every file of ``folder`` to the end (1 MiB reads); (seconds, bytes)."""
    buffer = memoryview(bytearray(MIB))
    started = time.perf_counter()
    total = 0
    for name in sorted(os.listdir(folder)):
        with open(folder / name, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return time.perf_counter() - started, total


def samples(row: Row, mount: list[float], baseline: list[float]) -> Row:
    row.mount = median(mount) if mount else None
    row.baseline = median(baseline) if baseline else None
    row.details["mount_samples"] = [round(s, 4) for s in mount]
    row.details["baseline_samples"] = [round(s, 4) for s in baseline]
    return row


def counts_note(counts: Counts, baseline_requests: int) -> str:
    return f"{counts.total} req vs {baseline_requests}"


@dataclass
class Floor:
    """The samples of a floor row, or why it has none: a floor never fails or stops a run.

    :meth:`attempt` runs one step (mount, warm, measure); its first exception is kept as the
    reason (traceback on stderr) and every later step is skipped. With floors off
    (``--no-floors``, the default in quick mode) no step runs and there is no row."""

    b: Bench
    name: str
    samples: list[float] = field(default_factory=list)
    error: str = ""

    def attempt(self, step: Callable[[], T]) -> T | None:
        if self.error or not self.b.config.floors:
            return None
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - reported in the row instead
            traceback.print_exc()
            self.error = f"{type(exc).__name__}: {exc}"
            self.b.log(f"{self.name}: not available: {self.error}")
            return None

    def measure(self, step: Callable[[], float]) -> float | None:
        seconds = self.attempt(step)
        if seconds is not None:
            self.samples.append(seconds)
        return seconds

    def rows(self, scenario: str, metric: str, notes: str, baseline: list[float]) -> list[Row]:
        """The unjudged row: the floor's median vs the baseline's (N/A with the reason if it has
        no sample); none with floors off."""
        if not self.b.config.floors:
            return []
        row = Row(scenario, metric, judged=False)
        if self.error or not self.samples:
            row.status = NOT_AVAILABLE
            row.baseline = median(baseline) if baseline else None
            row.notes = f"not available: {self.error or 'nothing measured'}"
            return [row]
        row.notes = notes
        return [samples(row, self.samples, baseline)]


# ---------------------------------------------------------------------------------------------
# 1 + 5: cold copy of a series, then its warm re-read


def cold_cp_series(b: Bench) -> list[Row]:
    env = b.env("series")
    series = env.series
    assert series is not None
    row = Row("cold_cp_series", "", target=1.25)

    def copy(mount: Mount, dest: Path) -> float:
        seconds, _ = run_timed(["cp", "-r", str(series_path(mount, env)), str(dest)])
        return seconds

    counted_dest = b.scratch("cold_cp/counted")
    counts = b.counted(env, "cold_cp", lambda m: copy(m, counted_dest))
    verify_copy(counted_dest, series)
    shutil.rmtree(counted_dest)

    mount_s: list[float] = []
    base_s: list[float] = []
    runs = b.repeats(3)
    baseline_requests = 0
    for run in range(runs):
        dest = b.scratch("cold_cp/baseline")
        outcome = clients.download_series(env.dicomweb, series.study_uid, series.series_uid, dest)
        verify_copy(dest, series)
        shutil.rmtree(dest)
        base_s.append(outcome.seconds)
        baseline_requests = outcome.requests
        b.log(f"cold_cp_series: baseline {outcome.seconds:.2f} s")

        mount = b.mount("cold_cp", env.dicomweb)
        dest = b.scratch("cold_cp/mount")
        mount_s.append(copy(mount, dest))
        b.log(f"cold_cp_series: mount {mount_s[-1]:.2f} s")
        verify_copy(dest, series)
        if run == runs - 1 and "warm_reread" in b.config.selected:
            b.warm = Warm(mount, dest)
        else:
            mount.stop()
            shutil.rmtree(dest)
    mib = series.total_bytes / MIB
    row.notes = f"{len(series.instances)} files, {mib:.0f} MiB, all identical; {counts_note(counts, baseline_requests)}"
    row.details.update(requests=counts.requests, baseline_requests=baseline_requests, bytes=series.total_bytes,
                       mount_mib_per_s=mib / median(mount_s), baseline_mib_per_s=mib / median(base_s))
    return [samples(row, mount_s, base_s)]


def warm_reread(b: Bench) -> list[Row]:
    env = b.env("series")
    series = env.series
    assert series is not None
    warm, b.warm = b.warm, None
    if warm is None:  # run alone: warm a mount with an untimed cold copy first
        mount = b.mount("warm", env.dicomweb)
        dest = b.scratch("warm/copy")
        run_timed(["cp", "-r", str(series_path(mount, env)), str(dest)])
        verify_copy(dest, series)
        warm = Warm(mount, dest)
    row = Row("warm_reread", "", target=2.0)
    expected = series.total_bytes
    mount_s: list[float] = []
    base_s: list[float] = []
    floor = Floor(b, "warm_reread/floor")
    c_floor = Floor(b, "warm_reread/floor_c")

    def read_floor(mount: Mount) -> float:
        seconds, total = read_all(mount.path)
        if total != expected:
            raise BenchError(f"read {total} bytes through the floor filesystem, expected {expected}")
        return seconds

    floor_mount: Mount | None = None
    c_floor_mount: Mount | None = None
    try:
        # The same local copy through the do-nothing passthroughs (Python, then C); one untimed
        # read fills each one's page cache.
        floor_mount = floor.attempt(lambda: b.floor("warm_floor", warm.copy))
        if floor_mount is not None:
            floor.attempt(lambda: read_floor(floor_mount))
        c_floor_mount = c_floor.attempt(lambda: b.c_floor("warm_floor_c", warm.copy))
        if c_floor_mount is not None:
            c_floor.attempt(lambda: read_floor(c_floor_mount))
        for _ in range(b.repeats(3)):
            seconds, total = read_all(warm.copy)
            base_s.append(seconds)
            seconds_m, total_m = read_all(series_path(warm.mount, env))
            mount_s.append(seconds_m)
            if total != expected or total_m != expected:
                raise BenchError(f"read {total_m} bytes through the mount and {total} locally, expected {expected}")
            seconds_f = floor.measure(lambda: read_floor(floor_mount)) if floor_mount is not None else None
            seconds_c = c_floor.measure(lambda: read_floor(c_floor_mount)) if c_floor_mount is not None else None
            b.log(f"warm_reread: mount {seconds_m:.3f} s, local {seconds:.3f} s"
                  + (f", floor {seconds_f:.3f} s" if seconds_f is not None else "")
                  + (f", C floor {seconds_c:.3f} s" if seconds_c is not None else ""))
    finally:
        for mount in (floor_mount, c_floor_mount):
            if mount is not None:
                mount.stop()
        warm.mount.stop()
        shutil.rmtree(warm.copy, ignore_errors=True)
    row.notes = f"{expected / MIB:.0f} MiB read in full, vs the local copy (page cache warm)"
    return [samples(row, mount_s, base_s),
            *floor.rows("warm_reread", "floor", "a do-nothing Python FUSE passthrough (mfusepy, libfuse 3) over the "
                        "same local copy: the least any Python FUSE filesystem costs here", base_s),
            *c_floor.rows("warm_reread", "floor_c", "the same passthrough in C (bench/floor_c.c, libfuse 3): the "
                          "kernel's round trip per open, whatever the filesystem is written in", base_s)]


# ---------------------------------------------------------------------------------------------
# 2: ls -l of a series


def parse_ls_l(output: str) -> dict[str, int]:
    """``ls -l`` lines → name: size (the ``total`` line skipped)."""
    sizes = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 9 and not line.startswith("total"):
            sizes[fields[-1]] = int(fields[4])
    return sizes


def cold_ls_l_series(b: Bench) -> list[Row]:
    env = b.env("series")
    series = env.series
    assert series is not None
    expected = series.sizes()
    row = Row("cold_ls_l_series", "", target=1.5)

    def ls_l(mount: Mount) -> tuple[float, dict[str, int]]:
        seconds, output = run_timed(["ls", "-l", str(series_path(mount, env))])
        listed = parse_ls_l(output)
        if sorted(listed) != sorted(expected):
            raise BenchError(f"ls -l listed {len(listed)} instances, expected {len(expected)}")
        return seconds, listed

    counts = b.counted(env, "ls_l", ls_l)
    mount_s: list[float] = []
    base_s: list[float] = []
    true_sizes = 0
    for _ in range(b.repeats(3)):
        outcome = clients.list_series(env.dicomweb, series.study_uid, series.series_uid)
        if outcome.items != len(expected):
            raise BenchError(f"QIDO listed {outcome.items} instances, expected {len(expected)}")
        base_s.append(outcome.seconds)
        with b.mount("ls_l", env.dicomweb) as mount:
            seconds, listed = ls_l(mount)
        mount_s.append(seconds)
        true_sizes = sum(listed[name] == size for name, size in expected.items())
        b.log(f"cold_ls_l_series: mount {seconds:.3f} s, QIDO {outcome.seconds:.3f} s")
    row.notes = f"{len(expected)} entries, {true_sizes} true sizes; {counts_note(counts, 1)}"
    row.details.update(requests=counts.requests, baseline_requests=1, true_sizes=true_sizes, entries=len(expected))
    return [samples(row, mount_s, base_s)]


# ---------------------------------------------------------------------------------------------
# 3: ls and find of a whole store


def store_ls_find(b: Bench) -> list[Row]:
    env = b.env("store")
    n = env.studies

    def ls(mount: Mount) -> float:
        seconds, output = run_timed(["ls", str(mount.path / env.store)])
        if len(output.split()) != n:
            raise BenchError(f"ls listed {len(output.split())} studies, expected {n}")
        return seconds

    def find(mount: Mount) -> float:
        seconds, output = run_timed(["find", str(mount.path / env.store)])
        if len(output.splitlines()) != 1 + 3 * n:
            raise BenchError(f"find printed {len(output.splitlines())} paths, expected {1 + 3 * n}")
        return seconds

    steps: list[tuple[str, Callable[[Mount], float], Callable[[], clients.Outcome]]] = [
        ("ls", ls, lambda: clients.list_studies(env.dicomweb, STORE_PAGE_SIZE)),
        ("find", find, lambda: clients.list_tree(env.dicomweb, STORE_PAGE_SIZE)),
    ]
    # find's floor: the same tree (empty files) on local disk, through the do-nothing passthrough,
    # freshly mounted for each measurement as the mount is (no dentry cached by the kernel).
    floor = Floor(b, "store_ls_find/find_floor")
    tree = floor.attempt(lambda: store_tree(b, env))

    def find_floor() -> float:
        assert tree is not None
        with b.floor("store_find_floor", tree) as mount:
            return find(mount)

    rows = []
    for metric, action, baseline in steps:
        counts = b.counted(env, f"store_{metric}", action)
        mount_s: list[float] = []
        base_s: list[float] = []
        baseline_requests = 0
        for _ in range(b.repeats(3)):
            outcome = baseline()
            if outcome.items != n:
                raise BenchError(f"the {metric} baseline found {outcome.items} entries, expected {n}")
            base_s.append(outcome.seconds)
            baseline_requests = outcome.requests
            with b.mount(f"store_{metric}", env.dicomweb) as mount:
                mount_s.append(action(mount))
            seconds_f = floor.measure(find_floor) if metric == "find" and tree is not None else None
            b.log(f"store_ls_find/{metric}: mount {mount_s[-1]:.3f} s, QIDO {outcome.seconds:.3f} s"
                  + (f", floor {seconds_f:.3f} s" if seconds_f is not None else ""))
        row = Row("store_ls_find", metric, target=1.5)
        row.notes = f"{n} studies; {counts_note(counts, baseline_requests)}"
        row.details.update(requests=counts.requests, baseline_requests=baseline_requests, studies=n)
        rows.append(samples(row, mount_s, base_s))
        if metric == "find":
            rows += floor.rows("store_ls_find", "find_floor",
                               "the same tree through a do-nothing Python FUSE passthrough", base_s)
    return rows


def store_tree(b: Bench, env: Env) -> Path:
    """The store's tree as the mount shows it (``<store>/<study>/<series>/<sop>.dcm``, empty
    files) on local disk; the folder to serve (``<store>`` is in it)."""
    if len(env.instances) != env.studies:
        raise BenchError(f"the store data set lists {len(env.instances)} instances for {env.studies} studies")
    root = b.scratch("floor/store-tree")
    for instance in env.instances:
        folder = root / env.store / instance.study_uid / instance.series_uid
        folder.mkdir(parents=True)
        (folder / instance.file_name).touch()
    return root


# ---------------------------------------------------------------------------------------------
# 4: first bytes and full copy of one large instance


def first_bytes_large(b: Bench) -> list[Row]:
    env = b.env("large")
    assert env.series is not None
    instance = env.series.instances[0]
    size = instance.path.stat().st_size
    cache_mb = 4 * (size // MIB + 2)  # the largest readable file is cacheSize/4
    extra = ["--cacheSize", str(cache_mb)]
    url = f"{clients.series_url(env.dicomweb, instance.study_uid, instance.series_uid)}/instances/{instance.sop_uid}"
    with open(instance.path, "rb") as handle:
        head = handle.read(FIRST_BYTES)

    def in_mount(mount: Mount) -> Path:
        return series_path(mount, env) / instance.file_name

    def first_read(mount: Mount) -> float:
        started = time.perf_counter()
        fd = os.open(in_mount(mount), os.O_RDONLY)
        try:
            data = os.read(fd, FIRST_BYTES)
            seconds = time.perf_counter() - started
        finally:
            os.close(fd)
        if data != head:
            raise BenchError("the first 4 KiB read through the mount differ from the instance's")
        return seconds

    counts = b.counted(env, "first_bytes", first_read, extra)
    # The floor: curl's first byte of the Orthanc REST download the mount itself makes.
    floor = Floor(b, "first_bytes_large/first_4k_floor")
    file_url = floor.attempt(
        lambda: f"{env.orthanc.url}/instances/{clients.orthanc_instance_id(env.orthanc.url, instance.sop_uid)}/file")
    file_s: list[float] = []

    def native_first_byte() -> float:
        assert file_url is not None
        dest = b.scratch("large/file.out")
        outcome = clients.curl_download(file_url, dest, accept="application/dicom")
        if outcome.items != size:
            raise BenchError(f"curl got {outcome.items} bytes from {file_url}, the instance has {size}")
        dest.unlink()
        file_s.append(outcome.seconds)
        assert outcome.first_byte is not None
        return outcome.first_byte

    curl_s: list[float] = []
    ttfb_s: list[float] = []
    first_s: list[float] = []
    copy_s: list[float] = []
    for _ in range(b.repeats(3)):
        dest = b.scratch("large/curl.out")
        outcome = clients.curl_download(url, dest)
        if outcome.items < size:
            raise BenchError(f"curl got {outcome.items} bytes, the instance has {size}")
        dest.unlink()
        curl_s.append(outcome.seconds)
        assert outcome.first_byte is not None
        ttfb_s.append(outcome.first_byte)
        file_ttfb = floor.measure(native_first_byte) if file_url is not None else None
        with b.mount("first_bytes", env.dicomweb, extra) as mount:
            first_s.append(first_read(mount))
        with b.mount("large_copy", env.dicomweb, extra) as mount:
            dest = b.scratch("large/copy.dcm")
            seconds, _ = run_timed(["cp", str(in_mount(mount)), str(dest)])
            if not filecmp.cmp(instance.path, dest, shallow=False):
                raise BenchError("the copy through the mount differs from the instance")
            dest.unlink()
            copy_s.append(seconds)
        b.log(f"first_bytes_large: first 4 KiB {first_s[-1] * 1000:.1f} ms, cp {copy_s[-1]:.2f} s, "
              f"curl {curl_s[-1]:.2f} s (its first byte after {ttfb_s[-1] * 1000:.0f} ms)"
              + (f"; /instances/{{id}}/file: first byte after {file_ttfb * 1000:.0f} ms, all after "
                 f"{file_s[-1] * 1000:.0f} ms" if file_ttfb is not None else ""))
    mib = size / MIB
    fraction = median(ttfb_s) / median(curl_s)
    first = Row("first_bytes_large", "first_4k", target=0.1,
                notes=f"{mib:.0f} MiB; open+read 4 KiB vs full curl; the server's own first byte is at "
                      f"{fraction:.2f} of it; {counts_note(counts, 1)}")
    first.details.update(requests=counts.requests, bytes=size, server_first_byte_fraction=fraction)
    # Not judged: how much the mount adds to the server's own latency (WADO-RS answers of some
    # servers, Orthanc's among them, start only once the whole multipart body is built).
    server = Row("first_bytes_large", "first_4k_vs_server_ttfb", judged=False,
                 notes="open+read 4 KiB vs curl's time to the first byte of the same WADO-RS answer")
    floor_rows = floor.rows("first_bytes_large", "first_4k_floor",
                            "Orthanc's own first byte on the endpoint the mount reads (/instances/{id}/file): "
                            "no client can answer sooner", curl_s)
    for row in floor_rows:
        row.details["file_full_samples"] = [round(s, 4) for s in file_s]
    copy = Row("first_bytes_large", "full_copy", target=1.1, notes=f"cp vs curl -s -o, {mib:.0f} MiB, identical")
    copy.details.update(bytes=size)
    return [samples(first, first_s, curl_s), samples(server, first_s, ttfb_s), *floor_rows,
            samples(copy, copy_s, curl_s)]


# ---------------------------------------------------------------------------------------------
# 6: uploads


def _empty(env: Env) -> None:
    env.orthanc.reset()
    if env.orthanc.instance_count() != 0:
        raise BenchError("the upload server still holds instances after a reset")


def _wait_for_instances(env: Env, series: Series, timeout: float, since: float | None = None) -> float:
    """Poll the server until it holds every instance of ``series``; the seconds from ``since``
    (a ``time.perf_counter()``; default: the call) until then. Then, untimed, QIDO must list
    them all.

    The poll is Orthanc's index count (``/statistics``, about 1 ms, and the server was emptied
    before): a QIDO of a 200-instance series costs Orthanc ~65 ms of CPU, and polling with it
    every 50 ms took a core from the uploads being measured (the STOW baseline is not polled)."""
    started = time.perf_counter() if since is None else since
    while env.orthanc.instance_count() < len(series.instances):
        if time.perf_counter() - started > timeout:
            raise BenchError(f"the server did not store all {len(series.instances)} uploads within {timeout:.0f} s")
        time.sleep(UPLOAD_POLL_S)
    seconds = time.perf_counter() - started
    listed = clients.count_instances(env.dicomweb, series.study_uid, series.series_uid)
    if listed != len(series.instances):
        raise BenchError(f"the server holds {len(series.instances)} instances but lists {listed} in the series")
    return seconds


def _copy_in(env: Env, mount: Mount, sources: Sequence[Path]) -> tuple[float, float]:
    """``cp`` the files into the mount's store folder; (seconds until cp returned, seconds until
    the server holds them all)."""
    assert env.series is not None
    started = time.perf_counter()
    run_timed(["cp", *map(str, sources), f"{mount.path / env.store}/"])
    cp_s = time.perf_counter() - started
    return cp_s, _wait_for_instances(env, env.series, UPLOAD_WAIT_S, since=started)  # never counted


def _upload_floor(b: Bench, env: Env, sources: Sequence[Path], rep: int) -> float:
    """A floor for write-back: ``cp`` into the do-nothing passthrough (``--writable``) while the
    8-way STOW baseline sends the same files; the seconds until both are done (the server then
    holds them all). A write-back mount must take the bytes through FUSE into Python and the
    server must store them: no mount does both in less than this."""
    assert env.series is not None
    _empty(env)
    source = b.scratch(f"upload/floor-{rep}")
    source.mkdir(parents=True)
    mount = b.floor(f"upload_floor-{rep}", source, ["--writable"])
    try:
        outcome: list[clients.Outcome] = []
        started = time.perf_counter()
        sender = threading.Thread(target=lambda: outcome.append(clients.stow_parallel(env.dicomweb, sources)))
        sender.start()
        try:
            run_timed(["cp", *map(str, sources), f"{mount.path}/"])
        finally:
            sender.join()
        if not outcome:
            raise BenchError("the STOW beside the floor's cp failed")
        seconds = _wait_for_instances(env, env.series, UPLOAD_WAIT_S, since=started)
    finally:
        mount.stop()
    if sorted(p.name for p in source.iterdir()) != sorted(p.name for p in sources):
        raise BenchError("the floor filesystem did not receive every file")
    shutil.rmtree(source)
    return seconds


def upload(b: Bench) -> list[Row]:
    env = b.env("upload")
    series = env.series
    assert series is not None
    sources = [i.path for i in series.instances]
    count, kib = len(sources), series.total_bytes / 1024 / len(sources)
    # mode → its options; "" is the default mode of a dicomfuse without --uploadMode
    modes = {"sync": ["--uploadMode", "sync"], "writeback": ["--uploadMode", "writeback"]}
    unavailable = ""
    if not b.cli_supports("--uploadMode"):
        modes = {"sync": []}
        unavailable = "--uploadMode is not an option of this dicomfuse"
    counts: dict[str, Counts] = {}
    for mode, args in list(modes.items()):
        _empty(env)
        try:
            counts[mode] = b.counted(env, f"upload_{mode}", lambda m: _copy_in(env, m, sources), args)
        except MountError as exc:
            if exc.returncode != 2 or mode == "sync":
                raise
            unavailable = f"--uploadMode {mode} refused: {exc}"
            del modes[mode]

    base_s: list[float] = []
    cp_s: dict[str, list[float]] = {mode: [] for mode in modes}
    done_s: dict[str, list[float]] = {mode: [] for mode in modes}
    floor = Floor(b, "upload/writeback_floor")
    for rep in range(b.repeats(3)):
        _empty(env)
        outcome = clients.stow_parallel(env.dicomweb, sources)
        _wait_for_instances(env, series, UPLOAD_WAIT_S)
        base_s.append(outcome.seconds)
        for mode, args in modes.items():
            _empty(env)
            with b.mount(f"upload_{mode}", env.dicomweb, args) as mount:
                copied, listed = _copy_in(env, mount, sources)
            cp_s[mode].append(copied)
            done_s[mode].append(listed)
        floor_s = floor.measure(lambda rep=rep: _upload_floor(b, env, sources, rep)) if "writeback" in modes else None
        b.log(f"upload: 8-way STOW {outcome.seconds:.2f} s; "
              + "; ".join(f"{mode}: cp {cp_s[mode][-1]:.2f} s, all stored after {done_s[mode][-1]:.2f} s"
                          for mode in modes)
              + (f"; floor {floor_s:.2f} s" if floor_s is not None else ""))

    sync = Row("upload", "sync", judged=False,
               notes=f"{count} × {kib:.0f} KiB, cp into the store folder vs 8-way STOW; "
                     f"{counts_note(counts['sync'], count)}"
                     + ("" if modes["sync"] else " (default mode: no --uploadMode option)"))
    sync.details.update(requests=counts["sync"].requests, baseline_requests=count,
                        all_stored_s=[round(x, 4) for x in done_s["sync"]])
    rows = [samples(sync, cp_s["sync"], base_s)]
    writeback = Row("upload", "writeback", target=1.5)
    if "writeback" in modes:
        writeback.notes = (f"until the server holds all {count}; cp itself returned after "
                           f"{median(cp_s['writeback']):.2f} s; {counts_note(counts['writeback'], count)}")
        writeback.details.update(requests=counts["writeback"].requests, baseline_requests=count,
                                 cp_returned_s=[round(x, 4) for x in cp_s["writeback"]])
        rows.append(samples(writeback, done_s["writeback"], base_s))
        rows += floor.rows("upload", "writeback_floor",
                           "cp into a do-nothing writable Python FUSE passthrough while the 8-way STOW runs: "
                           "what any write-back mount must do, perfectly overlapped and nothing more", base_s)
    else:
        writeback.status = NOT_AVAILABLE
        writeback.baseline = median(base_s)
        writeback.notes = f"not available: {unavailable}"
        rows.append(writeback)
    return rows


# ---------------------------------------------------------------------------------------------
# 7: peak memory of the mount during a cold copy


def rss_cold_copy(b: Bench) -> list[Row]:
    env = b.env("series")
    series = env.series
    assert series is not None
    row = Row("rss_cold_copy", "", kind="absolute", unit="MiB", target=200.0)
    peaks: list[float] = []
    for _ in range(b.repeats(1)):
        dest = b.scratch("rss/copy")
        with b.mount("rss", env.dicomweb, ["--cacheSize", str(RSS_CACHE_MB)]) as mount, PeakRss(mount.pid) as rss:
            seconds, _ = run_timed(["cp", "-r", str(series_path(mount, env)), str(dest)])
        verify_copy(dest, series)
        shutil.rmtree(dest)
        peaks.append(rss.peak_mib)
        row.details.setdefault("copy_s", []).append(round(seconds, 3))
        row.details.setdefault("children", []).append(len(rss.children_kib))
        b.log(f"rss_cold_copy: peak {rss.peak_mib:.1f} MiB (main {rss.main_kib / 1024:.1f} MiB, "
              f"{len(rss.children_kib)} children), cp {seconds:.2f} s")
    row.mount = max(peaks)
    row.details["peak_samples_mib"] = [round(p, 1) for p in peaks]
    row.notes = (f"VmHWM of the mount process (+children), --cacheSize {RSS_CACHE_MB}, "
                 f"{series.total_bytes / MIB:.0f} MiB copied")
    return [row]


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Bench], list[Row]]
    summary: str


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("cold_cp_series", cold_cp_series, "cp -r of a series on a fresh mount vs 16-way WADO-RS"),
    Scenario("cold_ls_l_series", cold_ls_l_series, "ls -l of a series on a fresh mount vs one QIDO"),
    Scenario("store_ls_find", store_ls_find, "ls and find of a whole store vs paged QIDO"),
    Scenario("first_bytes_large", first_bytes_large, "first 4 KiB and full cp of a large instance vs curl"),
    Scenario("warm_reread", warm_reread, "re-read of the cached series vs the local copy"),
    Scenario("upload", upload, "cp of instances into the store (sync, write-back) vs 8-way STOW"),
    Scenario("rss_cold_copy", rss_cold_copy, "peak RSS of the mount during a cold cp -r"),
)
RUN_ORDER = ("cold_cp_series", "warm_reread", "cold_ls_l_series", "rss_cold_copy", "store_ls_find",
             "first_bytes_large", "upload")
"""warm_reread follows cold_cp_series to re-use its mount; the series data set is used first."""
