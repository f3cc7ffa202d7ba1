"""The report of ``make bench``: every workload's figures side by side, as a table and as JSON.

Pure: a :class:`Report` holds figures measured elsewhere (``bench.__main__`` fills it);
:func:`render` turns it into the printed table, :func:`to_json` into what ``report.json``
holds, and :func:`problems` lists the figures that must be 0 (lost, duplicated) and are not.
``bench.plots`` draws the same report's series.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LABELS", "MUST_BE_ZERO", "SYSTEMS", "Metric", "Report", "Workload", "problems",
           "render", "to_json"]

#: The columns, in order: rtnode with one worker, with two, and the baselines.
SYSTEMS = ("rtnode", "rtnode-w2", "websockets", "nats-server", "mosquitto")
LABELS = {
    "rtnode": "rtnode 1 worker",
    "rtnode-w2": "rtnode 2 workers",
    "websockets": "websockets",
    "nats-server": "nats-server WS",
    "mosquitto": "Mosquitto",
}
#: Metric keys whose every value must be 0.
MUST_BE_ZERO = ("lost", "duplicated")


@dataclass
class Metric:
    """One row: a figure of a workload for each system (None: not measured there).

    ``digits`` is the number of decimals shown; ``goal`` the issue's goal, as text.
    """

    key: str
    label: str
    values: dict[str, float | None] = field(default_factory=dict)
    digits: int = 0
    goal: str = ""
    runs: dict[str, list[float]] = field(default_factory=dict)  # every run's figure

    def add(self, system: str, value: float | None) -> None:
        """One run's figure: the value shown is the median of the runs (the sum for the
        counts that must be 0); every run's figure is kept in ``runs``."""
        if value is None:
            self.values.setdefault(system, None)
            return
        runs = self.runs.setdefault(system, [])
        runs.append(value)
        self.values[system] = (sum(runs) if self.key in MUST_BE_ZERO
                               else statistics.median(runs))

    def spread(self, system: str) -> str:
        """``min-max`` of the runs when there were several, else ""."""
        runs = self.runs.get(system, [])
        if len(runs) < 2 or self.key in MUST_BE_ZERO or min(runs) == max(runs):
            return ""
        return f"{_cell(min(runs), self.digits)}-{_cell(max(runs), self.digits)}"


@dataclass
class Workload:
    """One workload of the issue's table: its rows, and notes printed under it."""

    key: str
    title: str
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def metric(self, key: str, label: str, digits: int = 0, goal: str = "") -> Metric:
        """The row ``key``, added (empty) the first time."""
        for m in self.metrics:
            if m.key == key:
                return m
        m = Metric(key, label, {}, digits, goal)
        self.metrics.append(m)
        return m


@dataclass
class Report:
    """A whole run: where and when, the workloads, and the series the plots draw.

    ``series[name][system]`` is a list of ``[x, y]`` points (``"fanout"``: subscribers,
    deliveries/s; ``"memory"``: connections, RSS MB). ``percentiles[workload][system]`` maps
    ``"p50"``, ``"p90"``, ``"p99"``, ``"p99.9"``, ``"max"`` to milliseconds. With several
    runs, the table shows each figure's median and range (:meth:`Metric.add`).
    """

    machine: dict[str, Any] = field(default_factory=dict)
    started: str = ""
    seconds: float = 0.0
    command: str = ""
    workloads: list[Workload] = field(default_factory=list)
    series: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    percentiles: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def workload(self, key: str, title: str) -> Workload:
        """The workload ``key``, added (empty) the first time."""
        for w in self.workloads:
            if w.key == key:
                return w
        w = Workload(key, title)
        self.workloads.append(w)
        return w

    def columns(self) -> list[str]:
        """The systems with at least one figure, in :data:`SYSTEMS` order."""
        used = {s for w in self.workloads for m in w.metrics
                for s, v in m.values.items() if v is not None}
        return [s for s in (*SYSTEMS, *sorted(used - set(SYSTEMS))) if s in used]


def _cell(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def render(report: Report) -> str:
    """The side-by-side table (one line per figure, a column per system, the goal last)."""
    cols = report.columns()
    width = max([34, *(len(m.label) + 2 for w in report.workloads for m in w.metrics)])
    cw = max([12, *(len(LABELS.get(s, s)) for s in cols)])
    head = f"{'workload / figure':<{width}}" + "".join(
        f" {LABELS.get(s, s):>{cw}}" for s in cols) + "  goal"
    machine = report.machine
    lines = [
        f"rtnode bench report: {report.started}, {machine.get('system', '?')} "
        f"{machine.get('machine', '')}, {machine.get('cores', '?')} cores, "
        f"{report.seconds:.0f} s",
    ]
    extra = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
             for k, v in machine.items()
             if k not in ("system", "machine", "cores") and v is not None]
    if extra:
        lines.append(", ".join(extra))
    if report.command:
        lines.append(f"reproduce: {report.command}")
    lines += ["", head, "-" * len(head)]
    for w in report.workloads:
        lines.append(w.title)
        for m in w.metrics:
            cells = "".join(f" {_cell(m.values.get(s), m.digits):>{cw}}" for s in cols)
            flag = ""
            if m.key in MUST_BE_ZERO and any(v for v in m.values.values() if v is not None):
                flag = "  <- must be 0"
            lines.append(f"  {m.label:<{width - 2}}{cells}  {m.goal}{flag}".rstrip())
            spreads = [m.spread(s) for s in cols]
            if any(spreads):
                lines.append(f"  {'  range of the runs':<{width - 2}}"
                             + "".join(f" {x:>{cw}}" for x in spreads))
        lines.extend(f"  note: {n}" for n in w.notes)
    bad = problems(report)
    lines.append("")
    lines.append("lost and duplicated: " + ("every count is 0" if not bad else
                                             "NOT 0: " + "; ".join(bad)))
    return "\n".join(lines)


def problems(report: Report) -> list[str]:
    """Every lost or duplicated count that is not 0, one short text each."""
    out = []
    for w in report.workloads:
        for m in w.metrics:
            if m.key not in MUST_BE_ZERO:
                continue
            for s, v in m.values.items():
                if v:
                    out.append(f"{w.title}: {LABELS.get(s, s)} {m.label} {v:g}")
    return out


def to_json(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data (what ``report.json`` holds)."""
    data = asdict(report)
    data["columns"] = {s: LABELS.get(s, s) for s in report.columns()}
    data["problems"] = problems(report)
    return data
