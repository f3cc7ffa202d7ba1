"""The report of ``make bench`` (bench/table.py, bench/plots.py) from fixed figures."""

from __future__ import annotations

import json
from pathlib import Path

from bench.plots import write_plots
from bench.table import Report, problems, render, to_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(lost: float = 0) -> Report:
    r = Report(machine={"system": "Linux", "machine": "x86_64", "cores": 2},
               started="2026-11-30 23:50 UTC", seconds=312.4, command="make bench")
    w = r.workload("memory", "idle WebSocket connection, connected and joined")
    w.metric("kb", "KB per connection", 1, "<= 12 KB").values.update(
        {"rtnode": 52.8, "rtnode-w2": 55.1, "websockets": 15.4})
    rooms = r.workload("rooms", "500 rooms x 2 members, every member publishing")
    rooms.metric("rate", "delivered events/s", 0, ">= 30,000").values.update(
        {"rtnode": 6123.4, "websockets": 47000.0})
    rooms.metric("lost", "lost").values.update({"rtnode": lost, "websockets": 0})
    rooms.metric("duplicated", "duplicated").values.update({"rtnode": 0, "websockets": 0})
    rooms.notes.append("rtnode also delivers each event to its publisher")
    r.series["fanout"] = {"rtnode": [[10, 2e5], [100, 1.2e6]], "websockets": [[10, 9e4]]}
    r.series["memory"] = {"rtnode": [[0, 60.0], [500, 86.0]]}
    r.percentiles["rooms"] = {"rtnode": {"p50": 1.5, "p99": 8.0, "max": 20.0}}
    return r


def test_table_puts_systems_side_by_side_with_goal_and_notes() -> None:
    text = render(_report())
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("workload / figure"))
    # the columns: only systems with a figure, in order; nats-server WS has none here
    assert head.index("rtnode 1 worker") < head.index("rtnode 2 workers") \
        < head.index("websockets") < head.index("goal")
    assert "nats-server" not in head
    kb = next(line for line in lines if "KB per connection" in line)
    assert kb.split()[3:7] == ["52.8", "55.1", "15.4", "<="]
    rate = next(line for line in lines if "delivered events/s" in line)
    assert "6,123" in rate and "47,000" in rate and " - " in rate  # no 2-worker figure
    assert "  note: rtnode also delivers each event to its publisher" in lines
    assert lines[-1] == "lost and duplicated: every count is 0"
    assert "reproduce: make bench" in text and "2 cores" in lines[0]


def test_a_lost_event_is_flagged_in_table_and_json() -> None:
    r = _report(lost=3)
    assert problems(r) == ["500 rooms x 2 members, every member publishing: "
                           "rtnode 1 worker lost 3"]
    text = render(r)
    assert "<- must be 0" in next(line for line in text.splitlines() if "  lost" in line)
    assert "NOT 0" in text.splitlines()[-1]
    data = json.loads(json.dumps(to_json(r)))
    assert data["problems"] == problems(r)


def test_json_holds_every_figure_and_series() -> None:
    data = json.loads(json.dumps(to_json(_report())))
    assert data["columns"] == {"rtnode": "rtnode 1 worker", "rtnode-w2": "rtnode 2 workers",
                               "websockets": "websockets"}
    kb = data["workloads"][0]["metrics"][0]
    assert kb["values"] == {"rtnode": 52.8, "rtnode-w2": 55.1, "websockets": 15.4}
    assert kb["goal"] == "<= 12 KB"
    assert data["series"]["fanout"]["rtnode"] == [[10, 2e5], [100, 1.2e6]]
    assert data["percentiles"]["rooms"]["rtnode"]["p99"] == 8.0
    assert data["problems"] == []


def test_plots_are_pngs(tmp_path: Path) -> None:
    written, note = write_plots(_report(), tmp_path / "out")
    assert note is None
    assert sorted(p.name for p in written) == ["deliveries.png", "latency.png", "memory.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_no_data_no_plot(tmp_path: Path) -> None:
    written, note = write_plots(Report(), tmp_path)
    assert written == [] and note is None
    assert list(tmp_path.iterdir()) == []


def test_several_runs_show_median_and_range_and_counts_add_up() -> None:
    r = Report()
    w = r.workload("rooms", "rooms")
    rate = w.metric("rate", "events/s", 0)
    lost = w.metric("lost", "lost")
    for v in (5000.0, 7000.0, 6000.0):
        rate.add("rtnode", v)
    for v in (0.0, 2.0, 1.0):
        lost.add("rtnode", v)
    rate.add("websockets", None)
    assert rate.values == {"rtnode": 6000.0, "websockets": None}
    assert rate.runs == {"rtnode": [5000.0, 7000.0, 6000.0]}
    assert lost.values["rtnode"] == 3.0  # every run's losses, not their median
    lines = render(r).splitlines()
    rate_line = lines.index(next(line for line in lines if "events/s" in line))
    assert "6,000" in lines[rate_line]
    assert "range of the runs" in lines[rate_line + 1]
    assert "5,000-7,000" in lines[rate_line + 1]


def test_the_first_progress_line_names_the_ingest_baseline() -> None:
    from bench.suite import _parse, _systems_said

    one = _parse(["--only", "ingest", "--workers", "1", "--repeat", "3"])
    assert _systems_said(one) == "rtnode, Mosquitto"
    assert _systems_said(_parse(["--only", "rooms,ingest", "--workers", "1,2"])) == (
        "rtnode, rtnode-w2, websockets, Mosquitto for the ingest")
    assert _systems_said(_parse(["--only", "rooms", "--workers", "1"])) == "rtnode, websockets"
    assert _systems_said(_parse(["--only", "ingest", "--skip-baseline"])) == "rtnode, rtnode-w2"
