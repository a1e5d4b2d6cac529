"""DICOMFuse benchmarks: performance targets proven against baselines measured in the same run.

    python bench/run.py                      # full data, judge every target (exit 1 if one is missed)
    python bench/run.py --quick              # tiny data, seconds: proves the harness works, judges nothing
    python bench/run.py --scenario upload --mount-args "--downloadThreads 16"

Starts its own Orthanc servers (with the DICOMweb plugin) on 127.0.0.1, generates the data with
pydicom, mounts with ``python -m dicomfuse`` and prints a table; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench.data import FULL, QUICK  # noqa: E402
from bench.results import ERROR, FAIL, NOT_AVAILABLE, Row, table, write_json  # noqa: E402
from bench.scenarios import RUN_ORDER, SCENARIOS, Bench, Config  # noqa: E402

NAMES = [s.name for s in SCENARIOS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark DICOMFuse against direct DICOMweb clients on a local Orthanc.",
        epilog="Scenarios: " + "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS),
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny data (seconds): proves the harness works; ratios are printed, not judged")
    parser.add_argument("--scenario", action="append", metavar="NAME", default=[],
                        help=f"run only this scenario (repeatable or comma-separated): {', '.join(NAMES)}")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="where to write the results (default: bench/out/results-<timestamp>.json)")
    parser.add_argument("--mount-args", default="", metavar="ARGS",
                        help='extra dicomfuse options for every mount, e.g. "--downloadThreads 16"; '
                             "a scenario's own options (--cacheSize, --uploadMode) come after them")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="measurements per scenario, median reported (default: 1 in quick mode; "
                             "in full mode 3 for short measurements, 1 for long ones)")
    parser.add_argument("--floors", action=argparse.BooleanOptionalAction,
                        help="measure the unjudged floor rows (a do-nothing FUSE passthrough, the server's own "
                             "first byte) beside the mount; default: yes in full mode, no in quick mode")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="where data, copies, caches and mount logs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (mount logs) afterwards")
    args = parser.parse_args(argv)
    selected = [name.strip() for value in args.scenario for name in value.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(NAMES))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    args.selected = [name for name in RUN_ORDER if not selected or name in selected]
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.floors is None:
        args.floors = not args.quick
    return args


def check_environment() -> None:
    missing = [tool for tool in ("fusermount3", "curl", "cp", "ls", "find") if shutil.which(tool) is None]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)} (apt install fuse3 curl)")


def orthanc_version() -> str:
    from tests.orthanc_server import find_orthanc_binary

    try:
        result = subprocess.run([str(find_orthanc_binary()), "--version"], capture_output=True, text=True)
    except Exception as exc:  # noqa: BLE001 - only for the report
        return f"unknown ({exc})"
    return result.stdout.splitlines()[0].strip() if result.stdout else "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_environment()
    started_at = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    json_path = args.json or REPO / "bench" / "out" / f"results-{started_at:%Y%m%d-%H%M%S}.json"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicomfuse-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = Config(quick=args.quick, sizes=QUICK if args.quick else FULL, workdir=workdir,
                    mount_args=shlex.split(args.mount_args), repeat=args.repeat, selected=args.selected, log=log,
                    floors=args.floors)
    log(f"{'quick' if args.quick else 'full'} run of {', '.join(args.selected)}; work folder {workdir}")
    bench = Bench(config)
    rows: list[Row] = []
    try:
        with bench.stack:
            for name in args.selected:
                scenario = next(s for s in SCENARIOS if s.name == name)
                log(f"{name}: {scenario.summary}")
                began = time.perf_counter()
                try:
                    produced = scenario.run(bench)
                except Exception as exc:  # one broken scenario must not hide the others
                    traceback.print_exc()
                    produced = [Row(name, "", status=ERROR, notes=f"{type(exc).__name__}: {exc}")]
                for row in produced:
                    row.details["scenario_wall_s"] = round(time.perf_counter() - began, 2)
                    rows.append(row.settle(judge=not args.quick))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    order = [s.name for s in SCENARIOS]
    rows.sort(key=lambda r: order.index(r.scenario))
    errors = [r for r in rows if r.status == ERROR]
    failures = [r for r in rows if r.status == FAIL]
    unavailable = [r for r in rows if r.status == NOT_AVAILABLE]
    exit_code = 1 if errors or failures else 0
    meta = {
        "mode": "quick" if args.quick else "full",
        "started": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "exit_code": exit_code,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                 "orthanc": orthanc_version()},
        "mount_args": config.mount_args,
        "repeat": args.repeat,
        "floors": args.floors,
        "sizes": asdict(config.sizes),
        "failed": [r.name for r in failures],
        "errors": [r.name for r in errors],
        "not_available": [r.name for r in unavailable],
    }
    write_json(json_path, meta, rows)
    print()
    print(table(rows))
    print()
    if args.quick:
        print("quick mode: ratios are printed, not judged.")
    for row in unavailable:
        print(f"not judged: {row.name}: {row.notes}")
    for row in failures:
        print(f"target missed: {row.name}: {row.value:.2f} > {row.target:g}")
    for row in errors:
        print(f"error: {row.name}: {row.notes}")
    print(f"results: {json_path}  ({meta['duration_s']:.0f} s)")
    return exit_code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # mounts and servers were stopped on the way out
        sys.exit(130)
