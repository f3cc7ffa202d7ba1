"""Figures and report lines shared by the benchmarks: percentiles, ranges, logs, counters."""

from __future__ import annotations

__all__ = ["counter_lines", "ms", "output_lines", "pct", "ranges"]


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float | None) -> str:
    """Seconds as milliseconds with one decimal, "-" for None."""
    return "-" if value is None else f"{value * 1000:.1f}"


def ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the first twelve ranges)."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) if len(parts) <= 12 else ",".join(parts[:12]) + ",..."


def output_lines(name: str, server_log: list[str], shutdown_log: list[str]) -> list[str]:
    """What a server wrote until stopped and while stopping, the last 40 lines of each."""
    out: list[str] = []
    for lines, when in ((server_log, "until stopped"), (shutdown_log, "while stopping")):
        if lines:
            shown = "" if len(lines) <= 40 else ", last 40 shown"
            out.append(f"{name} output {when} ({len(lines)} lines{shown}):")
            out.extend(f"  | {line[:300]}" for line in lines[-40:])
    return out


def counter_lines(counters: dict[str, float], what: str = "node counters",
                  whose: str = "node") -> list[str]:
    """The node counters, and connections still alive once every client had closed."""
    counters = dict(counters)
    out: list[str] = []
    alive = counters.pop("rtnode_connection_actors", 0)
    still_open = counters.pop("rtnode_open_connections", 0)
    if counters:
        out.append(f"{what}: " + ", ".join(
            f"{k.removeprefix('rtnode_')}={v:.0f}" for k, v in counters.items()))
    if alive or still_open:
        out.append(f"after every client had closed: {alive:g} connection actors still "
                   f"alive, {still_open:g} WebSocket connections still open ({whose})")
    return out
