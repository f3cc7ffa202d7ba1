"""Room fan-out, end to end through JetStream: rtnode against a plain websockets broadcast server.

``python -m bench fanout [--subscribers 100] [--events 2000] [--payload-bytes 100]
[--codec json|cbor] [--skip-baseline] [--in-flight 256] [--timeout-s 120] [--rate 0]
[--load-procs 1]`` (or ``make bench ARGS="fanout ..."``):

1. starts an rtnode node as a subprocess (with its embedded nats-server) on free ports, in a
   temporary data directory, with limits high enough that the benchmark measures fan-out, not
   rate limiting (its clients all come from 127.0.0.1: the per-address limits are lifted);
2. opens S subscriber WebSockets that ``connect`` and ``join`` one room (in ``--load-procs``
   processes of their own when more than 1), and one publisher that
   publishes M events to it, pipelined: several ``publish`` frames per WebSocket message, its
   ``published`` replies read by a task of their own;
3. measures delivered events/s (S*M over the time from the first publish sent to the last event
   received by the last subscriber), publish->deliver latency over every delivery (or an even
   sample of about 200,000), and publish->``published`` latency;
4. does the same against ``bench.baseline_server`` (``websockets.broadcast``, one event per
   message, also a subprocess) with the same clients;
5. prints a table and the ratio. Never asserts: losses, duplicates, disconnects and anything the
   node logged are printed as figures.

With ``--rate R`` the publishers are paced instead: one event per message, R per second, on a
schedule that does not wait for deliveries (the latency of a steady load, not of a flood).
Otherwise both publishers obey the same window: at most ``--in-flight`` events published and
not yet received, on average over the subscribers (a broadcast server has no acks to pace on,
and the node cuts off a client with more than 1024 frames queued). Each measurement is bounded by
``--timeout-s``, and ends early when deliveries stop; partial counts are then reported.

Every subscriber checks what it receives: events carry their index ``i`` in ``data`` (next to the
send time ``t`` and the padding), so missing, duplicated and reordered events are counted per
subscriber.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.fanout_clients import measure
from bench.fanout_results import BenchConfig, RunResult, figures, problems
from bench.nodes import bench_node, open_limits, scrape_settled
from bench.procs import (
    READY_TIMEOUT_S,
    REPO,
    cpu_seconds,
    log_lines,
    run_loop,
    size,
    spawn,
    stop,
    terminated,
    wait_line,
)
from bench.report import counter_lines, ms
from node.nats_server import free_port

__all__ = ["BenchConfig", "RunResult", "main", "run_baseline", "run_rtnode"]


def run_rtnode(cfg: BenchConfig, workers: int = 1, extra: Sequence[str] = ()) -> RunResult:
    """Start a node subprocess (``--workers`` N, more flags in ``extra``), measure fan-out
    through it, stop it. Never raises on figures.
    """
    res = RunResult("rtnode", cfg, acked_ids=bytearray(cfg.events))
    with bench_node(res, "rtnode-bench-", cfg.payload_bytes, workers=workers,
                    extra=extra) as node:
        if node is not None:
            run_loop(measure(res, [node.ws_url], True, node.cpu))
            res.server_counters = scrape_settled(node.base)
    return res


def run_baseline(cfg: BenchConfig) -> RunResult:
    """Start ``bench.baseline_server`` as a subprocess, measure the same fan-out, stop it."""
    res = RunResult("baseline", cfg)
    port = free_port()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rtnode-bench-baseline-") as tmp:
        log_path = Path(tmp) / "baseline.log"
        proc = spawn(
            [sys.executable, "-m", "bench.baseline_server", "--port", str(port)], log_path,
            {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)},
        )
        try:
            if not wait_line(log_path, "baseline ready", proc, READY_TIMEOUT_S):
                res.error = "baseline server did not start"
                return res
            run_loop(measure(res, [f"ws://127.0.0.1:{port}"], False,
                             lambda: {"baseline server": cpu_seconds(proc.pid)}))
        finally:
            stop_at = size(log_path)
            stop(proc, "baseline server", notes)
            res.server_log = log_lines(log_path, 0, stop_at)
            res.shutdown_log = [*log_lines(log_path, stop_at), *notes]
    return res


# ---------------------------------------------------------------------------------------------
# Report


def _report(cfg: BenchConfig, results: list[RunResult]) -> None:
    args = (f"--subscribers {cfg.subscribers} --events {cfg.events} "
            f"--payload-bytes {cfg.payload_bytes} --codec {cfg.codec} --in-flight {cfg.in_flight}"
            + (" --skip-baseline" if cfg.skip_baseline else "")
            + (f" --timeout-s {cfg.timeout_s:g}" if cfg.timeout_s != 120.0 else "")
            + (f" --rate {cfg.rate:g}" if cfg.rate else "")
            + (f" --load-procs {cfg.procs}" if cfg.procs > 1 else ""))
    print()
    print(f"fan-out: {cfg.subscribers} subscribers x {cfg.events} events = "
          f"{cfg.subscribers * cfg.events} deliveries, {cfg.payload_bytes}-byte payload, "
          f"{cfg.codec}")
    print(f"machine: {platform.system()} {platform.machine()}, os.cpu_count() = "
          f"{os.cpu_count()}; the server process (the node and its nats-server, or the "
          f"baseline) and all clients share these cores")
    print(f"reproduce: python -m bench fanout {args}")
    print(f"       or: make bench ARGS=\"fanout {args}\"")
    if cfg.rate:
        print(f"publishers: paced, {cfg.rate:g} events/s, one per message, whatever has been "
              f"delivered")
    else:
        print(f"publishers: at most {cfg.in_flight} events published and not yet received (on "
              f"average over the subscribers); rtnode: {cfg.batch} publish frames per message, "
              f"baseline: one event per message")
    print()
    header = (f"{'':<10} {'delivered':>17} {'deliveries/s':>13} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'max ms':>8} {'ack p50':>8} {'ack p99':>8} {'time s':>7} {'stored/s':>9}")
    print(header)
    print("-" * len(header))
    figs = {}
    for res in results:
        f = figs[res.name] = figures(res)
        stored = ""
        if res.name == "rtnode" and res.acked and res.last_ack_at > res.t0:
            stored = f"{res.acked / (res.last_ack_at - res.t0):.0f}"
        print(f"{res.name:<10} {f'{res.delivered}/{res.expected}':>17} {f['rate']:>13.0f} "
              f"{ms(f['p50']):>8} {ms(f['p99']):>8} {ms(f['max']):>8} "
              f"{ms(f['ack50']):>8} {ms(f['ack99']):>8} {res.elapsed:>7.2f} {stored:>9}")
    if "rtnode" in figs and "baseline" in figs:
        r, b = figs["rtnode"], figs["baseline"]

        def ratio(x: float | None, y: float | None) -> str:
            return f"{x / y:.2f}" if x and y else "-"

        print(f"ratio rtnode/baseline: deliveries/s {ratio(r['rate'], b['rate'])}, "
              f"p50 latency {ratio(r['p50'], b['p50'])}, p99 latency {ratio(r['p99'], b['p99'])}")
    print()
    for res in results:
        if res.cpu:
            used = ", ".join(f"{k} {v:.2f} s" for k, v in res.cpu.items())
            print(f"CPU while {res.name} was measured ({res.cpu_wall:.2f} s wall x "
                  f"{os.cpu_count()} cores): {used}")
    for res in results:
        lines = [*counter_lines(res.server_counters), *problems(res)]
        if lines:
            print()
            print(f"{res.name}:")
            for line in lines:
                print(f"  {line}")


def _parse(argv: list[str]) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--subscribers", type=int, default=100, help="subscriber connections")
    p.add_argument("--events", type=int, default=2000, help="events published")
    p.add_argument("--payload-bytes", type=int, default=100, help="padding in each event")
    p.add_argument("--codec", choices=("json", "cbor"), default="json")
    p.add_argument("--skip-baseline", action="store_true", help="measure rtnode only")
    p.add_argument("--in-flight", type=int, default=256,
                   help="most events published and not yet received (on average over the "
                        "subscribers), for both servers")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="bound of each measurement (partial counts are reported)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="paced: events published per second, one per message, whatever has "
                        "been delivered (0: pipelined within --in-flight)")
    p.add_argument("--load-procs", type=int, default=1,
                   help="processes of the subscribers (1: with the publisher, in the "
                        "benchmark's own)")
    a = p.parse_args(argv)
    for name in ("subscribers", "events", "in_flight", "load_procs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.payload_bytes < 0 or a.rate < 0:
        p.error("--payload-bytes and --rate must not be negative")
    return BenchConfig(a.subscribers, a.events, a.payload_bytes, a.codec, a.skip_baseline,
                       a.in_flight, a.timeout_s, a.rate, a.load_procs)


def main(argv: list[str]) -> int:
    """Run the fan-out benchmark and print its figures. Returns 0 unless a run failed to start."""
    cfg = _parse(argv)
    print(f"rtnode fan-out benchmark: {cfg.subscribers} subscribers, {cfg.events} events, "
          f"{cfg.payload_bytes}-byte payload, {cfg.codec}", flush=True)
    results: list[RunResult] = []
    signal.signal(signal.SIGTERM, terminated)
    try:
        print("  rtnode (through JetStream) ...", flush=True)
        results.append(run_rtnode(cfg, extra=open_limits(cfg.subscribers)))
        if not cfg.skip_baseline:
            print("  baseline (websockets.broadcast) ...", flush=True)
            results.append(run_baseline(cfg))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    _report(cfg, results)
    return 1 if any(r.error for r in results) else 0
