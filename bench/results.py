"""Result rows, the printed table and the JSON file."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, INFO, NOT_AVAILABLE, ERROR = "PASS", "FAIL", "INFO", "N/A", "ERROR"


@dataclass
class Row:
    """One measured comparison.

    ``kind`` is ``ratio`` (``value`` = mount / baseline, judged against ``target``) or
    ``absolute`` (``value`` = ``mount`` in ``unit``, no baseline). ``status`` is PASS/FAIL when
    judged, INFO when not (quick mode, report-only rows), N/A when the feature is missing, ERROR
    when the scenario broke."""

    scenario: str
    metric: str
    kind: str = "ratio"
    unit: str = "s"
    mount: float | None = None
    baseline: float | None = None
    value: float | None = None
    target: float | None = None
    judged: bool = True
    status: str = INFO
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.scenario}/{self.metric}" if self.metric else self.scenario

    def settle(self, judge: bool) -> Row:
        """Compute ``value`` and ``status`` (judged only if ``judge`` and the row is judged)."""
        if self.status in (NOT_AVAILABLE, ERROR):
            return self
        if self.kind == "ratio" and self.mount is not None and self.baseline:
            self.value = self.mount / self.baseline
        elif self.kind == "absolute":
            self.value = self.mount
        if judge and self.judged and self.target is not None and self.value is not None:
            self.status = PASS if self.value <= self.target else FAIL
        else:
            self.status = INFO
        return self


def median(values: list[float]) -> float:
    return statistics.median(values)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.1f} {unit}"


def _target(row: Row) -> str:
    if row.target is None:
        return "report"
    return f"<= {row.target:g}" + (f" {row.unit}" if row.kind == "absolute" else "")


def table(rows: list[Row]) -> str:
    header = ("scenario", "mount", "baseline", "ratio", "target", "result", "notes")
    lines = [header]
    for r in rows:
        ratio = f"{r.value:.2f}" if r.kind == "ratio" and r.value is not None else "-"
        lines.append((r.name, _fmt(r.mount, r.unit), _fmt(r.baseline, r.unit), ratio, _target(r), r.status, r.notes))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for i, line in enumerate(lines):
        cells = [cell.ljust(widths[j]) for j, cell in enumerate(line[:-1])]
        out.append("  ".join([*cells, line[-1]]).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  -----")
    return "\n".join(out)


def write_json(path: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    scenarios: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        scenarios.setdefault(row.scenario, []).append(asdict(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "scenarios": scenarios}, indent=2, sort_keys=False) + "\n")
