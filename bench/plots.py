"""The PNG plots of ``make bench``, drawn from a :class:`bench.table.Report` with matplotlib.

- ``deliveries.png``: fan-out deliveries/s against subscribers (``series["fanout"]``);
- ``latency.png``: publish -> deliver latency percentiles, one panel per workload;
- ``memory.png``: server RSS against open connections (``series["memory"]``).

A plot with no data is not written. matplotlib is an extra of the ``test`` dependencies
(``make bench`` installs it); without it :func:`write_plots` returns a note instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

from bench.table import LABELS, SYSTEMS, Report

__all__ = ["write_plots"]

_ORDER = ("p50", "p90", "p99", "p99.9", "max")


def _systems(data: Mapping[str, object]) -> list[str]:
    return [s for s in (*SYSTEMS, *sorted(set(data) - set(SYSTEMS))) if data.get(s)]


def write_plots(report: Report, out_dir: Path) -> tuple[list[Path], str | None]:
    """Write the plots into ``out_dir``. Returns the files written and a note (or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install -e '.[test]')"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def xy(name: str, path: str, xlabel: str, ylabel: str, title: str, logx: bool) -> None:
        series = report.series.get(name) or {}
        systems = _systems(series)
        if not systems:
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in systems:
            by_x: dict[float, list[float]] = {}
            for x, y in series[s]:
                by_x.setdefault(x, []).append(y)
            xs = sorted(by_x)  # several runs: their median at each x
            ax.plot(xs, [statistics.median(by_x[x]) for x in xs], marker="o",
                    label=LABELS.get(s, s))
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / path, dpi=100)
        plt.close(fig)
        written.append(out_dir / path)

    xy("fanout", "deliveries.png", "subscribers (one room)", "deliveries/s",
       "fan-out: deliveries/s against subscribers", True)
    xy("memory", "memory.png", "open connections (connected and joined)",
       "server RSS (MB)", "memory against connections", False)

    panels = [(w, report.percentiles[w]) for w in report.percentiles
              if _systems(report.percentiles[w])]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
        for ax, (name, per_system) in zip(axes[0], panels, strict=True):
            for s in _systems(per_system):
                qs = [q for q in _ORDER if q in per_system[s]]
                ax.plot(qs, [per_system[s][q] for q in qs], marker="o", label=LABELS.get(s, s))
            ax.set_yscale("log")
            ax.set_title(name)
            ax.set_xlabel("percentile")
            ax.set_ylabel("publish -> deliver (ms)")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "latency.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "latency.png")
    return written, None
