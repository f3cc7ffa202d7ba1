"""``make bench`` (``python -m bench [flags]``): every workload of issue 12, side by side.

Runs, each bounded in count and time, against rtnode with 1 worker, rtnode with 2 workers
(``rtnode run --workers 2``) and the plain ``websockets`` baseline (``bench.baseline_server``),
every server a fresh subprocess and the load generators in processes of their own:

- idle connections (``bench.loads.connections``): KB of server RSS per connection, connected
  and joined; connects/s; server CPU per connect; RSS against connections;
- 500 rooms x 2 members, every member publishing (``bench.loads.rooms``): events/s stored and
  delivered, CPU per event (node, nats-server, load generator), latency, lost, duplicated;
- device ingest (``bench.ingest``): 100 MQTT devices QoS 1 -> stored -> delivered; its
  baseline is Mosquitto with the same devices and an MQTT member (``bench.ingest_mosquitto``:
  nothing stored), as websockets has no MQTT;
- fan-out through JetStream (``bench.fanout``) at several subscriber counts, pipelined;
- the same, paced (``bench.fanout --rate``): 1,000 events/s to 100 subscribers, latency
  percentiles of a steady load, and the store's own publish -> ack latency on that schedule
  (``bench.jetstream_floor``: nats-server alone, as the node embeds it).

Prints the table on stdout (progress on stderr) and writes ``report.txt``, ``report.json``
and PNG plots (``deliveries.png``, ``latency.png``, ``memory.png``) to ``--out``. Exit code 1
when a run failed or anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import connections, fanout, ingest, jetstream_floor, loads
from bench.fanout_results import LATE_S, BenchConfig, RunResult
from bench.fanout_results import lost as fanout_lost
from bench.ingest_devices import IngestConfig
from bench.ingest_mosquitto import mosquitto_binary, run_mosquitto_ingest
from bench.ingest_report import IngestResult
from bench.nodes import SECRET, RunOutcome, bench_node, open_limits, rss_kib
from bench.plots import write_plots
from bench.procs import (
    READY_TIMEOUT_S,
    REPO,
    cpu_seconds,
    log_lines,
    run_loop,
    spawn,
    stop,
    terminated,
)
from bench.procs import wait_line as _wait_line
from bench.report import pct
from bench.table import Report, problems, render, to_json
from node.nats_server import free_port

__all__ = ["main"]

WORKLOADS = ("connections", "rooms", "ingest", "fanout", "paced")
#: The paced events' size as stored (a 100-byte payload in the event map the node stores).
FLOOR_PAYLOAD_BYTES = 200
# The longest wait, after the idle connections closed, for the node to give memory back.
AFTER_CLOSE_S = 80.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Target:
    """A server under test: where its clients connect, and its CPU and RSS probes."""

    system: str
    url: str
    rtnode: bool
    cpu: Callable[[], dict[str, float]]
    rss: Callable[[], float]  # KiB of the server processes (the node's, not nats-server's)


def _systems(a: argparse.Namespace) -> list[tuple[str, int]]:
    """(column, workers) for each system measured; workers 0 is the websockets baseline."""
    out = [("rtnode" if w == 1 else f"rtnode-w{w}", w) for w in a.workers]
    out = out if a.skip_baseline else [*out, ("websockets", 0)]
    return out * int(a.repeat)  # several runs: interleaved


def _systems_said(a: argparse.Namespace) -> str:
    """The systems of a run, for its first progress line: the baseline slot is Mosquitto for
    the device ingest (websockets has no MQTT)."""
    names = [s for s, w in _systems(a)[:len(_systems(a)) // a.repeat]]
    if not a.skip_baseline and "ingest" in a.only:
        names[-1] = ("websockets, Mosquitto for the ingest" if len(a.only) > 1
                     else "Mosquitto")
    return ", ".join(names)


@contextmanager
def _server(system: str, workers: int, errors: list[str], extra: Sequence[str] = (),
            secret: str = SECRET) -> Iterator[Target | None]:
    """A fresh rtnode node (``workers`` >= 1) or baseline server; None when it did not start."""
    if workers:
        res = RunOutcome()
        with bench_node(res, f"rtnode-bench-{system}-", workers=workers, extra=extra,
                        secret=secret) as node:
            if node is None:
                errors.append(f"{system}: {res.error}")
                yield None
            else:
                yield Target(system, node.ws_url, True, node.cpu,
                             lambda: float(node.rss_kib()["node"]))
        logged = [line for line in res.server_log if "workers.json" not in line]
        if logged:
            errors.append(f"{system} logged: " + " | ".join(logged[-3:])[:400])
        return
    port = free_port()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rtnode-bench-baseline-") as tmp:
        log_path = Path(tmp) / "baseline.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        proc = spawn([sys.executable, "-m", "bench.baseline_server", "--port", str(port)],
                     log_path, env)
        try:
            if not _wait_line(log_path, "baseline ready", proc, READY_TIMEOUT_S):
                errors.append(f"{system}: the baseline server did not start")
                yield None
            else:
                yield Target(system, f"ws://127.0.0.1:{port}", False,
                             lambda: {"server": cpu_seconds(proc.pid)},
                             lambda: float(rss_kib(proc.pid)))
        finally:
            stop(proc, "baseline server", notes)
            lines = log_lines(log_path)
            if lines or notes:
                errors.append(f"{system}: " + " | ".join([*lines[-3:], *notes])[:400])


def _split(cpu: dict[str, float]) -> tuple[float, float]:
    """(server, nats-server) CPU seconds of a probe's difference."""
    nats = cpu.get("nats-server", 0.0)
    server = sum(v for k, v in cpu.items() if k in ("node", "node workers", "server",
                                                    "baseline server")
                 or k.startswith("node child"))
    return server, nats


def _percentiles(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    out = {q: pct(lat, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99),
                                        ("p99.9", 0.999))}
    out["max"] = lat[-1] if lat else None
    return {k: v * 1000 for k, v in out.items() if v is not None}


def _us(seconds: float, count: float) -> float | None:
    return seconds / count * 1e6 if count else None


# ---------------------------------------------------------------------------------------------
# Workloads


async def _settled_kib(rss: Callable[[], float], seconds: float = 4.0) -> float:
    """RSS once it moved by less than 0.5% over 0.3 s (at most ``seconds``)."""
    last = rss()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = rss()
        if abs(now - last) <= 0.005 * max(last, 1.0):
            return now
        last = now
    return last


@dataclass
class _Conns:
    opened: int = 0
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    rss: list[list[float]] = field(default_factory=list)  # [connections, KiB]
    rss_closed: float | None = None  # KiB, once they all closed
    errors: list[str] = field(default_factory=list)


async def _hold(t: Target, a: argparse.Namespace, res: _Conns) -> None:
    """Open ``a.connections`` in ``a.steps`` steps with bench.connections' raw clients."""
    kind, port = ("rtnode" if t.rtnode else "baseline"), int(t.url.rsplit(":", 1)[1]
                                                              .split("/")[0])
    held: list[Any] = []
    try:
        warm = connections._Clients(kind, port, min(200, a.connections), 1, 100, 100, "warm")
        await warm.opened(a.timeout_s)
        await warm.close()
        await asyncio.sleep(1.5)  # rooms without members stop after room_idle_s
        res.rss.append([0, await _settled_kib(t.rss)])
        for k in range(1, a.steps + 1):
            n = a.connections * k // a.steps - a.connections * (k - 1) // a.steps
            c0 = t.cpu()
            clients = connections._Clients(kind, port, n, a.load_procs, 100, 100, f"s{k}")
            held.append(clients)
            wall, failed, errors = await clients.opened(a.timeout_s)
            c1 = t.cpu()
            for key, v in c1.items():
                res.cpu[key] = res.cpu.get(key, 0.0) + v - c0.get(key, 0.0)
            res.wall += wall
            res.opened += n - failed
            if failed:
                res.errors.append(f"{failed} connections failed: {'; '.join(errors[:2])}")
            res.rss.append([res.opened, await _settled_kib(t.rss)])
            log(f"    {res.opened} connections open, server RSS "
                f"{res.rss[-1][1] / 1024:.1f} MB")
    except (TimeoutError, OSError, RuntimeError, ValueError) as exc:
        res.errors.append(f"stopped: {exc!r}")
    finally:
        for clients in held:
            await clients.close()
    if res.opened and len(res.rss) >= 2:
        # rtnode gives memory back once its connections stopped falling (node/memory.py:
        # looked at every 2 s, and again 65 s later): the RSS once it fell by
        # a fifth of what the connections cost, or at most AFTER_CLOSE_S after they closed
        start, held = res.rss[0][1], res.rss[-1][1]
        deadline = time.monotonic() + (AFTER_CLOSE_S if t.rtnode else 5.0)
        while time.monotonic() < deadline:
            if t.rss() <= held - (held - start) / 5:
                break
            await asyncio.sleep(1.0)  # polling another process's RSS: no event to wait for
        res.rss_closed = await _settled_kib(t.rss)


def run_connections(r: Report, a: argparse.Namespace, errors: list[str]) -> None:
    w = r.workload("connections", "idle WebSocket connections, connected and joined "
                                  f"({a.connections}, rooms of 100)")
    limits = open_limits(a.connections)
    for system, workers in _systems(a):
        log(f"  connections: {system} ...")
        res = _Conns()
        with _server(system, workers, errors, limits, connections.SECRET) as t:
            if t is None:
                continue
            run_loop(_hold(t, a, res))
        errors.extend(f"connections, {system}: {e}" for e in res.errors)
        server, nats = _split(res.cpu)
        kib = None
        if len(res.rss) >= 2 and res.rss[-1][0] > 0:
            kib = (res.rss[-1][1] - res.rss[0][1]) / res.rss[-1][0]
        w.metric("kb", "KB of server RSS per connection", 1, "<= 12 KB").add(system, (
            kib * 1.024 if kib is not None else None))
        w.metric("rate", "connects/s (handshake + token + join)", 0,
                 ">= 3,000").add(system, res.opened / res.wall if res.wall else None)
        w.metric("cpu", "server CPU µs per connect", 0).add(system, _us(
            server, res.opened))
        w.metric("cpu_nats", "nats-server CPU µs per connect", 0).add(system, (
            _us(nats, res.opened) if t.rtnode else None))
        w.metric("rss", f"server RSS with {a.connections} open (MB)", 1).add(system, (
            res.rss[-1][1] / 1024 if res.rss else None))
        w.metric("rss_closed", "server RSS once they all closed (MB)",
                 1).add(system, res.rss_closed / 1024 if res.rss_closed is not None else None)
        w.metric("failed", "connections that failed", 0).add(system, float(
            a.connections - res.opened))
        r.series.setdefault("memory", {})[system] = [[n, k / 1024] for n, k in res.rss]
    w.notes.append("bench.connections' raw WebSocket clients in "
                   f"{a.load_procs} processes, {a.steps} steps; KB per connection: server "
                   "RSS (the node processes; nats-server apart) after the last step minus "
                   "before the first (after a warm-up of 200), per connection")


def run_rooms(r: Report, a: argparse.Namespace, errors: list[str]) -> None:
    w = r.workload("rooms", f"{a.rooms} rooms x 2 members, every member publishing "
                            f"({a.seconds:g} s, window {a.window})")
    for system, workers in _systems(a):
        log(f"  rooms: {system} ...")
        with _server(system, workers, errors) as t:
            if t is None:
                continue
            res = loads.rooms(t.url, t.rtnode, SECRET, a.rooms, a.seconds, a.window,
                              a.load_procs, t.cpu, log)
        errors.extend(f"rooms, {system}: {e}" for e in res.errors)
        server, nats = _split(res.cpu)
        wall = res.span_s or 1.0
        w.metric("stored", "events/s stored (published replies)", 0).add(system, (
            res.stored_rate if t.rtnode else None))
        w.metric("rate", "events/s delivered to the other member", 0,
                 ">= 30,000").add(system, res.rate)
        w.metric("cpu", "server CPU µs per event", 1).add(system, _us(server,
                                                                            res.delivered))
        w.metric("cpu_nats", "nats-server CPU µs per event", 1).add(system, (
            _us(nats, res.delivered) if t.rtnode else None))
        w.metric("core_server", "server CPU, % of one core", 0).add(system, (
            100 * server / wall))
        w.metric("core_nats", "nats-server CPU, % of one core", 0).add(system, (
            100 * nats / wall if t.rtnode else None))
        w.metric("core_load", "load generator CPU, % of one core", 0).add(system, (
            100 * res.load_cpu / wall))
        pcts = _percentiles(res.latencies)
        w.metric("p50", "latency p50 ms", 1).add(system, pcts.get("p50"))
        w.metric("p99", "latency p99 ms", 1).add(system, pcts.get("p99"))
        w.metric("lost", "lost", 0).add(system, float(res.lost))
        w.metric("duplicated", "duplicated", 0).add(system, float(res.duplicates))
        w.metric("refused", "publishes refused (4503 not stored, retry)", 0).add(
            system, float(res.refused) if t.rtnode else None)
        w.metric("unacked", "publishes unanswered after the drain", 0).add(
            system, float(res.unacked) if t.rtnode else None)
        r.percentiles.setdefault("rooms", {})[system] = pcts
    w.notes.append("rtnode also delivers each event back to its publisher (not counted); "
                   "lost: stored (rtnode) or sent (websockets) and never received by the peer")


def _ingest_lost(res: IngestResult) -> int:
    """Events PUBACKed to a device and never received by the member."""
    by_index = {d.index: d for d in res.devices}
    return sum(1 for k, seen in enumerate(res.seen) if k in by_index
               for i, acked in enumerate(by_index[k].acked) if acked and not seen[i])


def run_ingest(r: Report, a: argparse.Namespace, errors: list[str]) -> None:
    w = r.workload("ingest", f"device ingest, {a.devices} devices QoS 1 -> stored -> "
                             f"delivered ({a.devices * a.events_per_device} events)")
    for system, workers in _systems(a):
        cfg = IngestConfig(devices=a.devices, events_per_device=a.events_per_device,
                           timeout_s=a.timeout_s)
        if not workers:  # the baseline: the same devices and member's count, on Mosquitto
            if mosquitto_binary() is None:
                w.notes.append("no Mosquitto figure: no mosquitto binary (make installs "
                               "Debian's mosquitto)")
                continue
            system = "mosquitto"
            log("  ingest: mosquitto ...")
            res = run_mosquitto_ingest(cfg)
        else:
            log(f"  ingest: {system} ...")
            res = ingest.run_ingest(cfg, node_workers=workers)
        if res.error:
            errors.append(f"ingest, {system}: {res.error}")
        server, nats = _split(res.cpu)
        load = sum(v for k, v in res.cpu.items() if k.startswith(("member", "device")))
        wall = res.cpu_wall or 1.0
        w.metric("stored", "events/s stored (PUBACKed)", 0).add(system, res.stored_rate)
        w.metric("rate", "events/s delivered (end to end)", 0,
                 ">= 30,000 on one core").add(system, res.rate)
        w.metric("cpu", "node (broker) CPU µs per event", 1).add(system, _us(server,
                                                                              res.distinct))
        w.metric("cpu_nats", "nats-server CPU µs per event", 1).add(system, _us(
            nats, res.distinct) if workers else None)
        w.metric("core_server", "node (broker) CPU, % of one core", 0).add(system, (
            100 * server / wall))
        w.metric("core_nats", "nats-server CPU, % of one core", 0).add(system, (
            100 * nats / wall if workers else None))
        w.metric("core_load", "load generator CPU, % of one core", 0).add(system, (
            100 * load / wall))
        pcts = _percentiles(res.latencies)
        w.metric("p50", "latency p50 ms", 1).add(system, pcts.get("p50"))
        w.metric("p99", "latency p99 ms", 1).add(system, pcts.get("p99"))
        w.metric("lost", "lost", 0).add(system, float(_ingest_lost(res)))
        w.metric("duplicated", "duplicated", 0).add(system, float(res.duplicates))
        r.percentiles.setdefault("ingest", {})[system] = pcts
    w.notes.append("the baseline is Mosquitto (websockets has no MQTT): the same device "
                   "processes, its member an MQTT subscriber at QoS 0; it stores nothing")


def _fanout_lost(res: RunResult) -> int:
    if res.name == "rtnode":
        return fanout_lost(res)
    return sum(sum(1 for i in range(res.sent) if i >= len(s.seen) or not s.seen[i])
               for s in res.subs)


def run_fanout(r: Report, a: argparse.Namespace, errors: list[str]) -> None:
    w = r.workload("fanout", f"fan-out through JetStream, one room, {a.fanout_events} "
                             "events, pipelined")
    biggest = max(a.fanout_subscribers)
    for system, workers in _systems(a):
        lost = dups = 0
        for subs in a.fanout_subscribers:
            log(f"  fan-out: {system}, {subs} subscribers ...")
            cfg = BenchConfig(subscribers=subs, events=a.fanout_events,
                              timeout_s=a.timeout_s, procs=a.load_procs)
            res = (fanout.run_rtnode(cfg, workers=workers, extra=open_limits(subs)) if workers
                   else fanout.run_baseline(cfg))
            if res.error:
                errors.append(f"fan-out {subs}, {system}: {res.error}")
            lost += _fanout_lost(res)
            dups += sum(s.duplicates for s in res.subs)
            w.metric(f"rate{subs}", f"deliveries/s, {subs} subscribers", 0,
                     ">= 1.4M" if subs == 1000 else "").add(system, res.rate)
            r.series.setdefault("fanout", {}).setdefault(system, []).append([subs, res.rate])
            if subs == biggest or subs == 100:
                pcts = _percentiles(res.latencies)
                w.metric(f"p99_{subs}", f"latency p99 ms, {subs} subscribers",
                         1).add(system, pcts.get("p99"))
                r.percentiles.setdefault(f"fan-out, {subs} subscribers", {})[system] = pcts
            if subs == biggest:
                server, nats = _split(res.cpu)
                w.metric("cpu", f"server CPU µs per delivery, {subs} subscribers",
                         2).add(system, _us(server, res.delivered))
                w.metric("cpu_nats", f"nats-server CPU µs per delivery, {subs} subscribers",
                         2).add(system, _us(nats, res.delivered) if workers else None)
                wall = res.cpu_wall or 1.0
                w.metric("core_server", f"server CPU, % of one core, {subs} subscribers",
                         0).add(system, 100 * server / wall)
                w.metric("core_load", f"load generator CPU, % of one core, {subs} "
                                      "subscribers", 0).add(system, (
                                          100 * res.cpu.get("clients", 0.0) / wall))
        w.metric("lost", "lost", 0).add(system, float(lost))
        w.metric("duplicated", "duplicated", 0).add(system, float(dups))
    w.notes.append("latency here is of a pipelined flood (publishers within a window of "
                   "256); the issue's 1k msg/s x 100 subscribers p99 is the paced workload's")
    w.notes.append(f"the subscribers are in {a.load_procs} load generator process(es) of their "
                   "own (--load-procs), the publisher in the benchmark's: together they spend "
                   "more CPU per delivery than the server and share its cores, so the "
                   "deliveries/s depend on them; the server's CPU per delivery does not")


def _paced_floor(w: Any, rate: float, events: int, errors: list[str]) -> None:
    """The store's own latency on the paced schedule (``bench.jetstream_floor``), as a note:
    no node acknowledges an event sooner than its nats-server stores it."""
    log("  paced: nats-server alone (the store's floor) ...")
    payload = FLOOR_PAYLOAD_BYTES
    lat, error = jetstream_floor.publish_to_ack(rate, events, payload)
    if error:
        errors.append(f"paced, nats-server alone: {error}")
    pcts = _percentiles(lat)
    if pcts:
        w.notes.append(
            f"the store alone, on the same schedule: nats-server as the node embeds it (the "
            f"same binary and fsync per write), one nats-py client publishing {payload}-byte "
            f"messages (about a stored event's size): publish -> ack p50 "
            f"{pcts['p50']:.1f} ms, p99 {pcts['p99']:.1f} ms, max {pcts['max']:.1f} ms; "
            f"rtnode's publish -> published cannot be below it")


def run_paced(r: Report, a: argparse.Namespace, errors: list[str]) -> None:
    subs, rate = a.paced_subscribers, a.paced_rate
    events = max(1, round(rate * a.paced_seconds))
    w = r.workload("paced", f"fan-out through JetStream, paced: {rate:g} events/s to {subs} "
                            f"subscribers of one room ({events} events)")
    for system, workers in _systems(a):
        log(f"  paced: {system} ...")
        cfg = BenchConfig(subscribers=subs, events=events, rate=rate, timeout_s=a.timeout_s,
                          procs=a.load_procs)
        res = (fanout.run_rtnode(cfg, workers=workers, extra=open_limits(subs)) if workers
               else fanout.run_baseline(cfg))
        if res.error:
            errors.append(f"paced, {system}: {res.error}")
        if res.late > LATE_S:
            errors.append(f"paced, {system}: the publisher fell {res.late * 1000:.0f} ms "
                          f"behind its schedule")
        server, nats = _split(res.cpu)
        wall = res.cpu_wall or 1.0
        w.metric("rate", "deliveries/s", 0).add(system, res.rate)
        pcts = _percentiles(res.latencies)
        w.metric("p50", "latency p50 ms", 1).add(system, pcts.get("p50"))
        w.metric("p99", "latency p99 ms", 1, "<= 5 ms").add(system, pcts.get("p99"))
        w.metric("max", "latency max ms", 1).add(system, pcts.get("max"))
        acks = _percentiles(res.acks)
        w.metric("ack50", "publish -> published (stored) p50 ms", 1).add(system, (
            acks.get("p50") if workers else None))
        w.metric("ack99", "publish -> published (stored) p99 ms", 1).add(system, (
            acks.get("p99") if workers else None))
        w.metric("cpu", "server CPU µs per delivery", 2).add(system, _us(server,
                                                                         res.delivered))
        w.metric("core_server", "server CPU, % of one core", 0).add(system, 100 * server / wall)
        w.metric("core_nats", "nats-server CPU, % of one core", 0).add(system, (
            100 * nats / wall if workers else None))
        w.metric("core_load", "load generator CPU, % of one core", 0).add(system, (
            100 * res.cpu.get("clients", 0.0) / wall))
        lost, dups = _fanout_lost(res), sum(s.duplicates for s in res.subs)
        if workers:
            # The same without an fsync per event: how much of the latency is the disk's.
            log(f"  paced: {system}, --nats-sync 2m ...")
            fast = fanout.run_rtnode(cfg, workers=workers,
                                     extra=[*open_limits(subs), "--nats-sync", "2m"])
            if fast.error:
                errors.append(f"paced --nats-sync 2m, {system}: {fast.error}")
            fast_pcts = _percentiles(fast.latencies)
            w.metric("p50_2m", "latency p50 ms, --nats-sync 2m", 1).add(
                system, fast_pcts.get("p50"))
            w.metric("p99_2m", "latency p99 ms, --nats-sync 2m", 1).add(
                system, fast_pcts.get("p99"))
            lost += _fanout_lost(fast)
            dups += sum(s.duplicates for s in fast.subs)
        w.metric("lost", "lost", 0).add(system, float(lost))
        w.metric("duplicated", "duplicated", 0).add(system, float(dups))
        r.percentiles.setdefault(f"paced, {subs} subscribers", {})[system] = pcts
    _paced_floor(w, rate, events, errors)
    w.notes.append("one event per message on a fixed schedule; the subscribers in "
                   f"{a.load_procs} load generator process(es) (--load-procs), the publisher in "
                   "the benchmark's (their CPU above: the closer to the machine's cores, the "
                   "more of their own queueing is in the latency); "
                   "rtnode acknowledges an "
                   "event once nats-server has stored it with fsync (--nats-sync always, the "
                   "node's default), and delivers it after that; the --nats-sync 2m rows are "
                   "a second run without that fsync (a power loss may then lose acknowledged "
                   "events)")


# ---------------------------------------------------------------------------------------------
# Command line


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"numbers of at least 1 expected: {text!r}")
    return out


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default="bench-report",
                   help="directory for report.txt, report.json and the PNG plots")
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help=f"workloads to run, of {','.join(WORKLOADS)}")
    p.add_argument("--workers", type=_ints, default=[1, 2],
                   help="rtnode worker counts, one column each")
    p.add_argument("--skip-baseline", action="store_true", help="no websockets column")
    p.add_argument("--connections", type=int, default=2000, help="idle connections held")
    p.add_argument("--steps", type=int, default=4, help="steps of the idle connections")
    p.add_argument("--rooms", type=int, default=500, help="rooms of 2 members")
    p.add_argument("--seconds", type=float, default=8.0, help="publishing time in the rooms")
    p.add_argument("--window", type=int, default=4,
                   help="a member's events not yet received by its peer")
    p.add_argument("--devices", type=int, default=100, help="MQTT devices of the ingest")
    p.add_argument("--events-per-device", type=int, default=1000,
                   help="events each device publishes (the default: ~4 s of steady ingest)")
    p.add_argument("--fanout-subscribers", type=_ints, default=[10, 100, 1000])
    p.add_argument("--fanout-events", type=int, default=5000,
                   help="events of each fan-out run (the default: ~3.5 s at 1,000 "
                        "subscribers, long enough that the window's first fill and last "
                        "drain, ~0.3 s, are not most of the run)")
    p.add_argument("--paced-subscribers", type=int, default=100)
    p.add_argument("--paced-rate", type=float, default=1000.0,
                   help="events/s of the paced fan-out")
    p.add_argument("--paced-seconds", type=float, default=5.0,
                   help="publishing time of the paced fan-out")
    p.add_argument("--load-procs", type=int, default=2,
                   help="load generator processes: the rooms' members, the fan-out's "
                        "subscribers")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of every system, interleaved: the table shows the median and "
                        "the range")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="bound of each fan-out and ingest measurement")
    a = p.parse_args(argv)
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    for x in a.only:
        if x not in WORKLOADS:
            p.error(f"--only: unknown workload {x!r} (of {', '.join(WORKLOADS)})")
    for name in ("connections", "steps", "rooms", "window", "devices", "events_per_device",
                 "fanout_events", "paced_subscribers", "load_procs", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(a.seconds, a.timeout_s, a.paced_rate, a.paced_seconds) <= 0:
        p.error("--seconds, --timeout-s, --paced-rate and --paced-seconds must be positive")
    return a


def main(argv: list[str]) -> int:
    """Run the workloads, print the table, write the JSON and the plots."""
    a = _parse(argv)
    out = Path(a.out)
    r = Report(machine={"system": platform.system(), "machine": platform.machine(),
                        "cores": os.cpu_count(), "python": platform.python_version(),
                        "nats_sync": os.environ.get("RTNODE_NATS_SYNC", "the node's default"),
                        "load average": os.getloadavg()[0] if hasattr(os, "getloadavg")
                        else None},
               started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
               command="python -m bench " + shlex.join(argv) if argv else "make bench")
    errors: list[str] = []
    signal.signal(signal.SIGTERM, terminated)
    started = time.monotonic()
    runs: dict[str, Callable[[Report, argparse.Namespace, list[str]], None]] = {
        "connections": run_connections, "rooms": run_rooms, "ingest": run_ingest,
        "fanout": run_fanout, "paced": run_paced}
    log(f"make bench: {', '.join(a.only)}; systems: {_systems_said(a)}"
        f"{f', {a.repeat} runs each' if a.repeat > 1 else ''}; report to {out}/")
    try:
        for name in a.only:
            t0 = time.monotonic()
            try:
                runs[name](r, a, errors)
            except Exception as exc:  # a failed workload: said, and the others still run
                log(f"  {name} failed: {exc!r}")
                errors.append(f"{name}: failed: {exc!r}"[:400])
            log(f"  {name}: {time.monotonic() - t0:.0f} s")
    except KeyboardInterrupt:
        log("interrupted: the figures so far follow")
        errors.append("interrupted")
    r.seconds = time.monotonic() - started
    text = render(r)
    if errors:
        text += "\n\nrun notes:\n" + "\n".join(f"  {e}" for e in errors)
    print(text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.txt").write_text(text + "\n")
    data: dict[str, Any] = to_json(r)
    data["errors"] = errors
    (out / "report.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    written, note = write_plots(r, out)
    log(f"wrote {out / 'report.txt'}, {out / 'report.json'}"
        + "".join(f", {p}" for p in written) + (f" ({note})" if note else ""))
    return 1 if problems(r) or any(e.startswith("interrupted") or ": stopped" in e
                                   or ": failed" in e for e in errors) else 0
