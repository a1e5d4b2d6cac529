"""``python bench/run.py --quick`` works end to end: every scenario runs and reports numbers.

Only the harness is checked here (exit status, a complete JSON report); no timing is asserted,
quick mode's ratios are not judged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.orthanc_server import OrthancUnavailable, find_dicomweb_plugin, find_orthanc_binary

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("cold_cp_series", "cold_ls_l_series", "store_ls_find", "first_bytes_large", "warm_reread",
             "upload", "rss_cold_copy")
ROWS = {"store_ls_find": {"ls", "find", "find_floor"},
        "first_bytes_large": {"first_4k", "first_4k_vs_server_ttfb", "first_4k_floor", "full_copy"},
        "warm_reread": {"", "floor", "floor_c"}, "upload": {"sync", "writeback", "writeback_floor"}}
# Floors are measured here too: a floor that cannot run is N/A.
FLOORS = {"find_floor", "first_4k_floor", "floor", "writeback_floor"}
# The C floor is built at run time; without a compiler or libfuse3's headers it is N/A, and says so.
BUILT_FLOORS = {"floor_c": "not available: MountError: cannot build the C floor"}


def missing_requirement() -> str | None:
    """Why the benchmark cannot run here (None: it can). CI never skips: it has everything."""
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        return "needs /dev/fuse and fusermount3 (apt install fuse3)"
    if shutil.which("curl") is None:
        return "needs curl"
    try:
        find_orthanc_binary()
        find_dicomweb_plugin()
    except OrthancUnavailable as exc:
        return str(exc)
    return None


pytestmark = [
    pytest.mark.mount,
    pytest.mark.orthanc,
    pytest.mark.skipif(missing_requirement() is not None and not os.environ.get("CI"),
                       reason=str(missing_requirement())),
    pytest.mark.timeout(240),
]


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_quick_run_reports_every_scenario(tmp_path: Path) -> None:
    report = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--floors", "--json", str(report),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=220, cwd=REPO,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    data = json.loads(report.read_text())
    assert data["mode"] == "quick"
    assert data["errors"] == []
    assert set(data["scenarios"]) == set(SCENARIOS)
    for name, rows in data["scenarios"].items():
        assert {row["metric"] for row in rows} == ROWS.get(name, {""}), name
        for row in rows:
            assert row["status"] in ("INFO", "N/A"), row  # quick mode judges nothing
            assert row["status"] == "INFO" or row["metric"] not in FLOORS, row
            if row["status"] == "N/A":  # a feature this build lacks (write-back uploads)
                assert row["notes"].startswith(BUILT_FLOORS.get(row["metric"], "not available")), row
                continue
            assert is_number(row["mount"]) and row["mount"] > 0, row
            assert is_number(row["value"]), row
            if row["kind"] == "ratio":
                assert is_number(row["baseline"]) and row["baseline"] > 0, row
    assert "cold_cp_series" in result.stdout and "quick mode" in result.stdout
