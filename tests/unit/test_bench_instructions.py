"""``python -m bench instructions`` (bench/instructions.py) from fixed dumps and figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.instructions import (
    ROWS,
    CallgrindServer,
    _to_json,
    dump_instructions,
    newest_dump,
    parse_args,
    render,
    spread,
)

# The head and tail of a dump by `callgrind_control -d` (valgrind 3.19), its body cut.
DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 1851
cmd:  /work/main/.venv/bin/python -m node run --http-port 41000
part: 2

desc: Trigger: dump

positions: line
events: Ir
summary: 263187940


ob=(3) /usr/lib/x86_64-linux-gnu/libc.so.6
fn=(610) (below main)
0 12

totals: 263187941
"""


def test_summary_of_a_dump_not_its_totals() -> None:
    # summary: callgrind's counter since the zero; totals may add stale costs (higher)
    assert dump_instructions(DUMP) == 263187940


def test_totals_when_there_is_no_summary_line() -> None:
    assert dump_instructions(DUMP.replace("summary: 263187940\n", "")) == 263187941


def test_the_ir_column_among_several_events() -> None:
    text = DUMP.replace("events: Ir", "events: sysCount sysTime Ir").replace(
        "summary: 263187940", "summary: 17 900 263187940")
    assert dump_instructions(text) == 263187940


def test_a_dump_without_figures_is_an_error() -> None:
    with pytest.raises(ValueError, match="summary"):
        dump_instructions("# callgrind format\nevents: Ir\n")
    with pytest.raises(ValueError, match="Ir"):
        dump_instructions("events: Dr Dw\ntotals: 1 2\n")


def test_newest_dump_by_number_not_by_name() -> None:
    names = ["cg.out", "cg.out.9", "cg.out.10", "cg.out.2", "server.log", "cg.out.x", "cg.out.11~"]
    assert newest_dump(names, "cg.out") == "cg.out.10"


def test_newest_dump_with_thread_suffix_and_none() -> None:
    assert newest_dump(["cg.out.3-01", "cg.out.2-01"], "cg.out") == "cg.out.3-01"
    assert newest_dump(["cg.out", "other.out.4"], "cg.out") is None


def test_arguments_defaults_and_bounds() -> None:
    args = parse_args([])
    assert (args.connects, args.events, args.rooms, args.window, args.repeat) == (
        100, 100, 5, 4, 1)
    assert (args.quiet_events, args.quiet_gap_s) == (100, 0.02)
    assert (args.devices, args.device_events) == (10, 100)
    assert args.json is None and args.keep_dumps is None
    assert parse_args(["--repeat", "3", "--json", "out.json"]).json.name == "out.json"
    assert parse_args(["--keep-dumps", "dumps"]).keep_dumps.name == "dumps"
    assert parse_args(["--devices", "3", "--device-events", "7"]).device_events == 7
    for bad in (["--repeat", "0"], ["--connects", "-1"], ["--connects", "200"],
                ["--devices", "0"], ["--device-events", "-5"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2


def _figures() -> dict[str, dict[str, list[float]]]:
    return {"rtnode": {"connect_user": [2_660_000.0, 2_640_000.0, 2_650_000.0],
                       "connect_service": [1_800_000.0, 1_810_000.0, 1_790_000.0],
                       "event": [330_000.0, 331_000.0, 329_000.0],
                       "quiet_event": [600_000.0, 590_000.0, 610_000.0],
                       "ingest": [450_000.0, 455_000.0, 448_000.0]},
            "websockets": {"connect": [620_000.0, 621_000.0, 619_000.0],
                           "event": [67_000.0, 67_100.0, 66_900.0],
                           "quiet_event": [150_000.0, 150_000.0, 150_000.0]}}


def test_spread_is_median_min_max() -> None:
    assert spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)


def test_table_side_by_side_with_ratio_range_and_notes() -> None:
    lines = render(_figures(), parse_args(["--repeat", "3"])).splitlines()
    assert "median (min-max, spread) of 3 runs" in lines[0]
    head = lines[1]
    assert head.index("rtnode") < head.index("websockets") < head.index("rtnode/websockets")
    user = next(line for line in lines if line.startswith("per connect, user token"))
    assert "2,650,000 (2,640,000-2,660,000, 0.8%)" in user
    assert "620,000 (619,000-621,000, 0.3%)" in user and user.endswith("4.27x")
    service = next(line for line in lines if line.startswith("per connect, service token"))
    assert service.endswith("2.90x")  # the baseline's one connect figure, in both rows
    event = next(line for line in lines if line.startswith("per event delivered"))
    assert event.endswith("4.93x")
    quiet = next(line for line in lines if line.startswith("per event, one at a time"))
    assert "600,000 (590,000-610,000, 3.3%)" in quiet and quiet.endswith("4.00x")
    text = " ".join(lines)
    assert "published reply and the echo" in text and "nats-server is not" in text
    assert "publishing 100 events, each once the one before" in text
    assert "10 MQTT devices, each publishing 100 events at QoS 1, 4 unacknowledged" in text
    assert all(len(line) <= 100 for line in lines[2 + len(ROWS):])  # the notes, wrapped


def test_the_baseline_has_no_mqtt_a_dash_and_no_ratio() -> None:
    lines = render(_figures(), parse_args(["--repeat", "3"])).splitlines()
    ingest = next(line for line in lines if line.startswith("per device event (MQTT QoS 1"))
    assert "450,000 (448,000-455,000, 1.6%)" in ingest
    assert ingest.split()[-2:] == ["-", "-"]
    # the columns kept: each dash right-aligned under its head, as the figures are
    head, event = lines[1], next(line for line in lines if line.startswith("per event del"))
    assert ingest[head.index("websockets") + len("websockets") - 1] == "-"
    assert len(ingest) == len(event) == len(head)


def test_a_baseline_figure_missing_from_the_runs_is_a_dash_too() -> None:
    figures = _figures()
    del figures["websockets"]["quiet_event"]
    quiet = next(line for line in render(figures, parse_args([])).splitlines()
                 if line.startswith("per event, one at a time"))
    assert quiet.split()[-2:] == ["-", "-"]


def test_json_rows_with_null_for_the_baseline_without_mqtt() -> None:
    out = _to_json(_figures(), parse_args(["--repeat", "3", "--json", "x.json",
                                           "--keep-dumps", "dumps"]))
    assert list(out["figures"]) == [key for key, *_ in ROWS]
    ingest = out["figures"]["ingest"]
    assert ingest["rtnode"] == {"median": 450_000.0, "min": 448_000.0, "max": 455_000.0}
    assert ingest["websockets"] is None and ingest["ratio"] is None
    assert out["figures"]["event"]["ratio"] == pytest.approx(330_000 / 67_000)
    assert "ingest" not in out["runs"]["websockets"]
    assert (out["args"]["devices"], out["args"]["device_events"]) == (10, 100)
    assert "json" not in out["args"] and "keep_dumps" not in out["args"]
    json.dumps(out)  # as main writes it (paths are not JSON)


def test_one_run_shows_the_figures_alone() -> None:
    figures = {s: {k: v[:1] for k, v in f.items()} for s, f in _figures().items()}
    text = render(figures, parse_args([]))
    assert "1 run;" in text.splitlines()[0]
    user = next(line for line in text.splitlines() if line.startswith("per connect, user"))
    assert user.split()[-3:] == ["2,660,000", "620,000", "4.29x"]


def test_each_figure_s_dump_is_kept_under_its_name(tmp_path: Path, monkeypatch) -> None:
    """``--keep-dumps``: the dump a figure was read from is copied under the figure's name; a
    dump that did not come is an error, as before. (The server is not started: its control
    writes the dumps callgrind_control -d would.)"""
    keep = tmp_path / "keep"
    keep.mkdir()
    server = CallgrindServer.__new__(CallgrindServer)
    server.kind, server.keep, server.run, server._dumps = "rtnode", keep, 2, 0
    server.out = tmp_path / "callgrind.out"
    written = []

    def control(flag: str) -> None:
        assert flag == "-d"
        if len(written) < 2:
            name = f"callgrind.out.{len(written) + 1}"
            (tmp_path / name).write_text(DUMP.replace("263187940", str(100 + len(written))))
            written.append(name)

    monkeypatch.setattr(server, "_control", control)
    assert server.dump("event") == 100
    assert server.dump("ingest") == 101
    assert sorted(p.name for p in keep.iterdir()) == [
        "rtnode-2-event.callgrind", "rtnode-2-ingest.callgrind"]
    assert dump_instructions((keep / "rtnode-2-ingest.callgrind").read_text()) == 101
    with pytest.raises(RuntimeError, match="no new dump"):
        server.dump("quiet_event")
