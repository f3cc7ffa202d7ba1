"""Room fan-out with 1, 2 and 3 rtnode nodes on one local 3-server NATS JetStream cluster.

``python -m bench scaleout [--nodes 1,2,3] [--subscribers 60] [--events 1000]
[--payload-bytes 100] [--codec json|cbor] [--in-flight 256] [--timeout-s 30]``:

1. starts three bundled nats-servers clustered on 127.0.0.1 (free client, cluster and monitor
   ports, one store directory each, in a temporary directory) and waits until they agree on a
   JetStream meta leader; the cluster serves every node count in turn;
2. for each node count N: starts N rtnode nodes as subprocesses pointed at the three servers
   (``--nats-url`` with all three URLs, ``--stream-replicas 3``: the room stream is R3), on
   free ports, with limits high enough that the benchmark measures fan-out, not rate limiting;
3. spreads S subscriber WebSockets evenly over the N nodes (subscriber ``i`` on node
   ``i % N``), each joining one room, and publishes M events from one publisher on node 1,
   pipelined within an in-flight window, exactly as ``bench.fanout`` does (its clients, its
   frame counting and its window are reused);
4. prints, per node count, delivered events/s (S*M over the time from the first publish sent
   to the last event received), publish->deliver latency (p50, p99), lost and duplicated
   deliveries, and the CPU seconds the nodes and the nats-servers used while measuring.

Never asserts: losses, duplicates, disconnects and anything a node logged are printed as
figures. Every step is bounded in time (start-up, each measurement, shutdown); every process
started here is stopped by its PID and the temporary directory is removed, on every path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bench.fanout import (
    READY_TIMEOUT_S,
    SECRET,
    SETUP_TIMEOUT_S,
    BenchConfig,
    RunResult,
    SubStats,
    _children_of,
    _Collector,
    _cpu_seconds,
    _http_get,
    _log_lines,
    _ms,
    _pct,
    _problems,
    _publish_rtnode,
    _read_subscriber,
    _rtnode_publisher,
    _rtnode_subscriber,
    _run_loop,
    _scrape_settled,
    _size,
    _spawn,
    _stop,
    _terminated,
    _wait_done,
)
from node.nats_server import free_port, nats_server_binary

__all__ = ["NatsCluster", "ScaleoutConfig", "main", "run_nodes"]

CLUSTER_NAME = "rtc"
CLUSTER_TIMEOUT_S = 20.0
GRACE_S = 1.0  # after the last expected event: time for stray (duplicate) frames to show up
CAVEAT = (
    "note: this machine has {cores} cores. The figure shows the cost of the cluster path (R3 "
    "replication, three nats-servers and N nodes sharing {cores} cores) more than any gain "
    "from adding nodes: every node, every nats-server and the benchmark's own clients compete "
    "for the same cores, so more nodes mostly means more processes to schedule."
)


# ---------------------------------------------------------------------------------------------
# A local 3-server JetStream cluster (as in tests/cluster.py; bench does not import tests)


class _Server:
    def __init__(self, index: int, base: Path) -> None:
        self.index = index
        self.name = f"nats{index}"
        self.port = free_port()
        self.cluster_port = free_port()
        self.monitor_port = free_port()
        self.dir = base / self.name
        self.conf = base / f"{self.name}.conf"
        self.log = base / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def monitor(self, path: str) -> dict[str, Any] | None:
        status, body = _http_get(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=1.0)
        if status != 200:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


class NatsCluster:
    """Three bundled nats-servers in one JetStream cluster on 127.0.0.1, under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base / "nats-cluster"
        self.servers = [_Server(i, self.base) for i in range(3)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers if s.proc is not None]

    def _write_conf(self, s: _Server) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{o.cluster_port}" for o in self.servers)
        s.conf.write_text(
            f"server_name: {s.name}\n"
            f"listen: 127.0.0.1:{s.port}\n"
            f"http: 127.0.0.1:{s.monitor_port}\n"
            f'jetstream {{ store_dir: "{s.dir}", max_memory_store: 64MB, max_file_store: 1GB }}\n'
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{s.cluster_port}\n"
            f"  routes: [ {routes} ]\n}}\n"
        )

    def start(self, timeout: float = CLUSTER_TIMEOUT_S) -> str | None:
        """Start the three servers; wait until they agree on a meta leader. Returns an error."""
        self.base.mkdir(parents=True, exist_ok=True)
        binary = nats_server_binary()
        for s in self.servers:
            s.dir.mkdir(parents=True, exist_ok=True)
            self._write_conf(s)
            s.proc = _spawn([binary, "-c", str(s.conf)], s.log, dict(os.environ))
        deadline = time.monotonic() + timeout
        while self.meta_leader() is None:
            dead = [s.name for s in self.servers if s.proc is None or s.proc.poll() is not None]
            if dead:
                return f"nats-server {', '.join(dead)} exited at start"
            if time.monotonic() > deadline:
                return f"no JetStream meta leader after {timeout:.0f} s"
            time.sleep(0.05)
        return None

    def meta_leader(self) -> str | None:
        """The meta leader's name, if every server reports the same one."""
        seen = set()
        for s in self.servers:
            jsz = s.monitor("/jsz")
            leader = ((jsz or {}).get("meta_cluster") or {}).get("leader")
            if not leader:
                return None
            seen.add(leader)
        return seen.pop() if len(seen) == 1 else None

    def stop(self, notes: list[str]) -> None:
        """SIGTERM each server by PID (SIGKILL after a bound), all at once."""
        procs = [(s.name, s.proc) for s in self.servers if s.proc is not None]
        _stop_all(procs, notes)
        for s in self.servers:
            s.proc = None

    def log_sizes(self) -> list[int]:
        return [_size(s.log) for s in self.servers]

    def logs(self, start: list[int] | None = None, end: list[int] | None = None,
             marks: tuple[str, ...] = ()) -> list[str]:
        """The servers' log lines between byte offsets (per server), those with a mark only."""
        out: list[str] = []
        for i, s in enumerate(self.servers):
            lines = _log_lines(s.log, start[i] if start else 0, end[i] if end else None)
            out.extend(f"{s.name}: {line}" for line in lines
                       if not marks or any(m in line for m in marks))
        return out


def _stop_all(procs: list[tuple[str, subprocess.Popen[bytes]]], notes: list[str]) -> None:
    """``bench.fanout._stop`` on every process in parallel (each is bounded)."""
    if not procs:
        return
    with ThreadPoolExecutor(max_workers=len(procs)) as pool:
        for _ in pool.map(lambda p: _stop(p[1], p[0], notes), procs):
            pass


# ---------------------------------------------------------------------------------------------
# One node count


@dataclass(frozen=True)
class ScaleoutConfig:
    """What one scale-out invocation measures."""

    nodes: tuple[int, ...] = (1, 2, 3)
    subscribers: int = 60
    events: int = 1000
    payload_bytes: int = 100
    codec: str = "json"
    in_flight: int = 256
    timeout_s: float = 30.0

    def bench(self) -> BenchConfig:
        return BenchConfig(self.subscribers, self.events, self.payload_bytes, self.codec,
                           True, self.in_flight, self.timeout_s)


@dataclass
class NodeRun:
    """The figures of one node count."""

    nodes: int
    res: RunResult
    per_node: list[int] = field(default_factory=list)  # subscribers on each node
    counters: dict[str, float] = field(default_factory=dict)  # summed over the nodes
    notes: list[str] = field(default_factory=list)


async def _measure(res: RunResult, urls: list[str],
                   cpu_probe: Callable[[], dict[str, float]]) -> None:
    """``bench.fanout._measure`` with subscriber ``i`` on ``urls[i % N]``, the publisher on
    ``urls[0]``: open the clients, publish, wait for every delivery (bounded), close all."""
    cfg = res.config
    sem = asyncio.Semaphore(50)
    opened: list[ClientConnection | None] = [None] * cfg.subscribers
    publisher: ClientConnection | None = None

    async def one(i: int) -> None:
        async with sem:
            opened[i] = await _rtnode_subscriber(urls[i % len(urls)], cfg, i)

    tasks: list[asyncio.Task[Any]] = []
    finished = asyncio.Event()
    try:
        outcome = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(cfg.subscribers)), return_exceptions=True),
            SETUP_TIMEOUT_S,
        )
        failed = [exc for exc in outcome if exc is not None]
        if failed:
            res.error = f"{len(failed)} subscribers could not join: {failed[0]!r}"
            return
        subs = [ws for ws in opened if ws is not None]
        publisher = await asyncio.wait_for(_rtnode_publisher(urls[0], cfg), SETUP_TIMEOUT_S)
        col = _Collector(res)
        res.subs = [SubStats(i, seen=bytearray(cfg.events)) for i in range(cfg.subscribers)]
        tasks = [asyncio.create_task(_read_subscriber(ws, s, col, finished))
                 for ws, s in zip(subs, res.subs, strict=True)]
        cpu0, wall0 = {**cpu_probe(), "clients": time.process_time()}, time.monotonic()
        pub = asyncio.create_task(_publish_rtnode(publisher, res, col))
        tasks.append(pub)
        res.stalled = await _wait_done(col, res, pub)
        res.timed_out = not col.all_done.is_set() and not res.stalled
        cpu1 = {**cpu_probe(), "clients": time.process_time()}
        res.cpu_wall = time.monotonic() - wall0
        res.cpu = {k: v - cpu0[k] for k, v in cpu1.items() if k in cpu0}
        grace = GRACE_S if col.all_done.is_set() else 0.1
        await asyncio.wait({pub}, timeout=grace)  # the last replies
        await asyncio.sleep(grace)  # stray (duplicate) frames
        if pub.done() and not pub.cancelled() and pub.exception() is not None:
            res.pub_notes.append(f"publisher failed: {pub.exception()!r}")
    except (TimeoutError, OSError, ConnectionClosed, RuntimeError) as exc:
        res.error = res.error or f"set-up failed: {exc!r}"
    finally:
        finished.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conns = [ws for ws in [*opened, publisher] if ws is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True), 10
            )
        for ws in conns:
            ws.transport.abort()


def run_nodes(cfg: ScaleoutConfig, n: int, cluster: NatsCluster, tmp: Path) -> NodeRun:
    """Start ``n`` nodes on ``cluster``, measure fan-out through them, stop them."""
    bcfg = cfg.bench()
    run = NodeRun(n, RunResult("rtnode", bcfg, acked_ids=bytearray(cfg.events)),
                  per_node=[len(range(i, cfg.subscribers, n)) for i in range(n)])
    res = run.res
    env = {**os.environ, "RTNODE_JWT_SECRET": SECRET}
    nats_url = ",".join(cluster.urls)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    logs: list[tuple[str, Path]] = []
    bases: list[str] = []
    stop_at: dict[str, int] = {}
    try:
        for i in range(n):
            name = f"n{i + 1}"
            http_port, mqtt_port = free_port(), free_port()
            data = tmp / f"nodes{n}-{name}"
            data.mkdir(parents=True, exist_ok=True)
            log = tmp / f"nodes{n}-{name}.log"
            cmd = [sys.executable, "-m", "node", "run", "--nats-url", nats_url,
                   "--stream-replicas", "3", "--http-port", str(http_port),
                   "--mqtt-port", str(mqtt_port), "--data-dir", str(data / "data"),
                   "--node-name", name, "--rate-per-s", "1000000", "--rate-burst", "1000000",
                   "--max-errors-per-min", "1000000", "--log-level", "warning"]
            procs.append((name, _spawn(cmd, log, env)))
            logs.append((name, log))
            bases.append(f"http://127.0.0.1:{http_port}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = set(range(n))
        while waiting:
            for i in sorted(waiting):
                name, proc = procs[i]
                if proc.poll() is not None:
                    res.error = f"node {name} exited with {proc.returncode} before /readyz was 200"
                    return run
                if _http_get(bases[i] + "/readyz")[0] == 200:
                    waiting.discard(i)
            if time.monotonic() > deadline:
                res.error = (f"node(s) {', '.join(procs[i][0] for i in sorted(waiting))} not "
                             f"ready after {READY_TIMEOUT_S:.0f} s")
                return run
            if waiting:
                time.sleep(0.1)
        node_pids = [p.pid for _, p in procs]
        kids = [k for pid in node_pids for k in _children_of(pid)]

        def probe() -> dict[str, float]:
            return {
                "nodes": sum(_cpu_seconds(pid) for pid in [*node_pids, *kids]),
                "nats-servers": sum(_cpu_seconds(pid) for pid in cluster.pids),
                **{f"node {name}": _cpu_seconds(p.pid) for name, p in procs},
            }

        urls = [b.replace("http://", "ws://", 1) + "/ws" for b in bases]
        _run_loop(_measure(res, urls, probe))
        for base in bases:
            for k, v in _scrape_settled(base).items():
                run.counters[k] = run.counters.get(k, 0.0) + v
    finally:
        for name, log in logs:
            stop_at[name] = _size(log)
        _stop_all(procs, run.notes)
        banner = (*(f"rtnode {name} " for name, _ in logs), "  mqtt ")
        for name, log in logs:
            res.server_log += [f"{name}: {line}" for line in _log_lines(log, 0, stop_at[name])
                               if not line.startswith(banner)]
            res.shutdown_log += [f"{name}: {line}" for line in _log_lines(log, stop_at[name])
                                 if not line.startswith(banner)]
        res.shutdown_log += run.notes
    return run


# ---------------------------------------------------------------------------------------------
# Report


def _lost(res: RunResult) -> int:
    """Deliveries missing of events the node acknowledged as stored, over every subscriber."""
    return sum(sum(1 for o, g in zip(res.acked_ids, s.seen, strict=False) if o and not g)
               for s in res.subs)


def _report(cfg: ScaleoutConfig, runs: list[NodeRun], cluster_notes: list[str]) -> None:
    cores = os.cpu_count()
    print()
    print(f"scale-out: {cfg.subscribers} subscribers spread evenly over N nodes x "
          f"{cfg.events} events = {cfg.subscribers * cfg.events} deliveries, "
          f"{cfg.payload_bytes}-byte payload, {cfg.codec}; one publisher on node 1 (at most "
          f"{cfg.in_flight} events in flight on average over the subscribers)")
    print("cluster: 3 nats-servers (JetStream, one cluster on 127.0.0.1), room stream R3; "
          "the same cluster for every N")
    print(f"machine: {platform.system()} {platform.machine()}, os.cpu_count() = {cores}")
    nodes = ",".join(str(n) for n in cfg.nodes)
    print(f"reproduce: python -m bench scaleout --nodes {nodes} --subscribers "
          f"{cfg.subscribers} --events {cfg.events} --payload-bytes {cfg.payload_bytes} "
          f"--codec {cfg.codec} --in-flight {cfg.in_flight} --timeout-s {cfg.timeout_s:g}")
    print()
    header = (f"{'nodes':>5} {'subs/node':>10} {'delivered':>13} {'deliveries/s':>13} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'lost':>6} {'dup':>5} {'time s':>7} "
              f"{'CPU nodes s':>12} {'CPU nats s':>11} {'CPU bench s':>12}")
    print(header)
    print("-" * len(header))
    for run in runs:
        res = run.res
        lat = sorted(res.latencies)
        dups = sum(s.duplicates for s in res.subs)
        per = "/".join(str(k) for k in run.per_node)
        cpu = res.cpu
        cpu_cells = (f"{cpu.get('nodes', 0.0):>12.2f} {cpu.get('nats-servers', 0.0):>11.2f} "
                     f"{cpu.get('clients', 0.0):>12.2f}" if cpu
                     else f"{'-':>12} {'-':>11} {'-':>12}")
        print(f"{run.nodes:>5} {per:>10} {f'{res.delivered}/{res.expected}':>13} "
              f"{res.rate:>13.0f} {_ms(_pct(lat, 0.50)):>8} {_ms(_pct(lat, 0.99)):>8} "
              f"{_lost(res):>6} {dups:>5} {res.elapsed:>7.2f} {cpu_cells}")
    print()
    print("lost: deliveries missing of events the publisher's node acknowledged as stored "
          "(summed over subscribers); dup: deliveries of an event a subscriber already had; "
          "CPU: user+system seconds during the measurement (nodes together, the three "
          "nats-servers together, the benchmark's clients)")
    for run in runs:
        if run.res.cpu:
            per_node = ", ".join(f"{k} {v:.2f}" for k, v in run.res.cpu.items()
                                 if k.startswith("node "))
            print(f"  {run.nodes} node(s): {run.res.cpu_wall:.2f} s wall x {cores} cores; "
                  f"per node: {per_node}")
    print()
    print(CAVEAT.format(cores=cores))
    for run in runs:
        lines = _problems(run.res)
        counters = dict(run.counters)
        alive = counters.pop("rtnode_connection_actors", 0)
        still_open = counters.pop("rtnode_open_connections", 0)
        if alive or still_open:
            lines.insert(0, f"after every client had closed: {alive:g} connection actors still "
                            f"alive, {still_open:g} WebSocket connections still open (nodes)")
        if counters:
            lines.insert(0, "node counters (summed over the nodes): " + ", ".join(
                f"{k.removeprefix('rtnode_')}={v:.0f}" for k, v in counters.items()))
        if lines:
            print()
            print(f"{run.nodes} node(s):")
            for line in lines:
                print(f"  {line}")
    if cluster_notes:
        print()
        print("nats cluster:")
        for line in cluster_notes:
            print(f"  {line}")


def _parse(argv: list[str]) -> ScaleoutConfig:
    p = argparse.ArgumentParser(prog="python -m bench scaleout",
                                description=__doc__.split("\n")[0])
    p.add_argument("--nodes", default="1,2,3",
                   help="node counts to measure, comma-separated (each 1 to 3)")
    p.add_argument("--subscribers", type=int, default=60,
                   help="subscriber connections, spread evenly over the nodes")
    p.add_argument("--events", type=int, default=1000, help="events published")
    p.add_argument("--payload-bytes", type=int, default=100, help="padding in each event")
    p.add_argument("--codec", choices=("json", "cbor"), default="json")
    p.add_argument("--in-flight", type=int, default=256,
                   help="most events published and not yet received (on average over the "
                        "subscribers)")
    p.add_argument("--timeout-s", type=float, default=30.0,
                   help="bound of each measurement (partial counts are reported)")
    a = p.parse_args(argv)
    try:
        nodes = tuple(int(x) for x in a.nodes.split(",") if x.strip())
    except ValueError:
        p.error("--nodes must be comma-separated integers")
    if not nodes or any(not 1 <= n <= 3 for n in nodes):
        p.error("--nodes must list node counts from 1 to 3")
    for name in ("subscribers", "events", "in_flight"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= a.payload_bytes <= 30_000:
        p.error("--payload-bytes must be from 0 to 30000")
    if a.timeout_s <= 0:
        p.error("--timeout-s must be positive")
    return ScaleoutConfig(nodes, a.subscribers, a.events, a.payload_bytes, a.codec,
                          a.in_flight, a.timeout_s)


def main(argv: list[str]) -> int:
    """Run the scale-out benchmark and print its figures. Returns 0 unless a run failed."""
    cfg = _parse(argv)
    print(f"rtnode scale-out benchmark: nodes {','.join(map(str, cfg.nodes))}, "
          f"{cfg.subscribers} subscribers, {cfg.events} events, 3-server JetStream cluster (R3)",
          flush=True)
    previous = signal.signal(signal.SIGTERM, _terminated)
    tmp = Path(tempfile.mkdtemp(prefix="rtnode-scaleout-"))
    cluster = NatsCluster(tmp)
    cluster_notes: list[str] = []
    runs: list[NodeRun] = []
    ready_at: list[int] = []
    try:
        print("  starting the 3-server nats cluster ...", flush=True)
        error = cluster.start()
        if error:
            print(f"scale-out: {error}", file=sys.stderr)
            for line in cluster.logs()[-40:]:
                print(f"  | {line[:300]}", file=sys.stderr)
            return 1
        ready_at = cluster.log_sizes()
        for n in cfg.nodes:
            print(f"  {n} node(s) ...", flush=True)
            runs.append(run_nodes(cfg, n, cluster, tmp))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_at = cluster.log_sizes()
        cluster.stop(cluster_notes)
        if ready_at:  # warnings and errors while measuring; errors only while stopping
            during = cluster.logs(ready_at, stop_at, ("[WRN]", "[ERR]", "[FTL]"))
            after = cluster.logs(stop_at, None, ("[ERR]", "[FTL]"))
            cluster_notes += [f"| {line[:300]}" for line in [*during, *after][-40:]]
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    _report(cfg, runs, cluster_notes)
    return 1 if any(r.res.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
