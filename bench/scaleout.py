"""Room fan-out with 1, 2 and 3 rtnode nodes on one local 3-server NATS JetStream cluster.

``python -m bench scaleout [--nodes 1,2,3] [--subscribers 60] [--events 1000]
[--payload-bytes 100] [--codec json|cbor] [--in-flight 256] [--timeout-s 30]``:

1. starts three bundled nats-servers clustered on 127.0.0.1 (``tests.cluster.NatsCluster``,
   the fault tests' cluster: free client, cluster and monitor ports, one store directory each,
   in a temporary directory) and waits until they agree on a JetStream meta leader; the
   cluster serves every node count in turn;
2. for each node count N: starts N rtnode nodes as subprocesses pointed at the three servers
   (``--nats-url`` with all three URLs, ``--stream-replicas 3``: the room stream is R3), on
   free ports, with limits high enough that the benchmark measures fan-out, not rate limiting;
3. spreads S subscriber WebSockets evenly over the N nodes (subscriber ``i`` on node
   ``i % N``), each joining one room, and publishes M events from one publisher on node 1,
   pipelined within an in-flight window, with the clients of ``bench.fanout`` (the same frame
   counting and window: ``bench.fanout_clients``);
4. prints, per node count, delivered events/s (S*M over the time from the first publish sent
   to the last event received), publish->deliver latency (p50, p99), lost and duplicated
   deliveries, and the CPU seconds the nodes and the nats-servers used while measuring.

Never asserts: losses, duplicates, disconnects and anything a node logged are printed as
figures. Every step is bounded in time (start-up, each measurement, shutdown); every process
started here is stopped by its PID and the temporary directory is removed, on every path.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.fanout_clients import measure
from bench.fanout_results import BenchConfig, RunResult, lost, problems
from bench.nodes import SECRET, NodeProcess, node_command, scrape_settled, wait_ready
from bench.procs import (
    READY_TIMEOUT_S,
    cpu_seconds,
    die_with_parent,
    log_lines,
    run_loop,
    size,
    stop_all,
    terminated,
)
from bench.report import counter_lines, ms, pct
from node.nats_server import free_port
from tests.cluster import NatsCluster

__all__ = ["ScaleoutConfig", "main", "run_nodes"]

CLUSTER_TIMEOUT_S = 20.0
CAVEAT = (
    "note: this machine has {cores} cores. The figure shows the cost of the cluster path (R3 "
    "replication, three nats-servers and N nodes sharing {cores} cores) more than any gain "
    "from adding nodes: every node, every nats-server and the benchmark's own clients compete "
    "for the same cores, so more nodes mostly means more processes to schedule."
)


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


def run_nodes(cfg: ScaleoutConfig, n: int, cluster: NatsCluster, tmp: Path) -> NodeRun:
    """Start ``n`` nodes on ``cluster``, measure fan-out through them, stop them."""
    bcfg = cfg.bench()
    run = NodeRun(n, RunResult("rtnode", bcfg, acked_ids=bytearray(cfg.events)),
                  per_node=[len(range(i, cfg.subscribers, n)) for i in range(n)])
    res = run.res
    env = {**os.environ, "RTNODE_JWT_SECRET": SECRET}
    extra = ["--nats-url", ",".join(cluster.urls), "--stream-replicas", "3"]
    nodes: list[NodeProcess] = []
    try:
        for i in range(n):
            name = f"n{i + 1}"
            http_port, mqtt_port = free_port(), free_port()
            data = tmp / f"nodes{n}-{name}"
            data.mkdir(parents=True, exist_ok=True)
            cmd = node_command(http_port, mqtt_port, data / "data", name=name,
                               slow_consumer_bytes=None, extra=extra)
            nodes.append(NodeProcess(name, cmd, tmp / f"nodes{n}-{name}.log", env, http_port,
                                     mqtt_port, label=f"node {name}"))
        res.error = wait_ready(nodes, READY_TIMEOUT_S)
        if res.error:
            return run
        node_pids = [node.proc.pid for node in nodes]
        kids = [k for node in nodes for k in node.kids]

        def probe() -> dict[str, float]:
            return {
                "nodes": sum(cpu_seconds(pid) for pid in [*node_pids, *kids]),
                "nats-servers": sum(cpu_seconds(pid) for pid in cluster.pids),
                **{f"node {node.name}": cpu_seconds(node.proc.pid) for node in nodes},
            }

        run_loop(measure(res, [node.ws_url for node in nodes], True, probe))
        for node in nodes:
            for k, v in scrape_settled(node.base).items():
                run.counters[k] = run.counters.get(k, 0.0) + v
    finally:
        for node in nodes:
            node.mark_stop()
        stop_all([(node.name, node.proc) for node in nodes], run.notes)
        for node in nodes:
            until, stopping = node.output()
            res.server_log += [f"{node.name}: {line}" for line in until]
            res.shutdown_log += [f"{node.name}: {line}" for line in stopping]
        res.shutdown_log += run.notes
    return run


def _cluster_log(cluster: NatsCluster, start: list[int] | None = None,
                 end: list[int] | None = None, marks: tuple[str, ...] = ()) -> list[str]:
    """The servers' log lines between byte offsets (per server), those with a mark only."""
    out: list[str] = []
    for i, s in enumerate(cluster.servers):
        lines = log_lines(s.log, start[i] if start else 0, end[i] if end else None)
        out.extend(f"{s.name}: {line}" for line in lines
                   if not marks or any(m in line for m in marks))
    return out


def _log_sizes(cluster: NatsCluster) -> list[int]:
    return [size(s.log) for s in cluster.servers]


# ---------------------------------------------------------------------------------------------
# Report


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
              f"{res.rate:>13.0f} {ms(pct(lat, 0.50)):>8} {ms(pct(lat, 0.99)):>8} "
              f"{lost(res):>6} {dups:>5} {res.elapsed:>7.2f} {cpu_cells}")
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
        lines = [*counter_lines(run.counters, "node counters (summed over the nodes)", "nodes"),
                 *problems(run.res)]
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
    previous = signal.signal(signal.SIGTERM, terminated)
    tmp = Path(tempfile.mkdtemp(prefix="rtnode-scaleout-"))
    cluster = NatsCluster(tmp, preexec_fn=die_with_parent)
    cluster_notes: list[str] = []
    runs: list[NodeRun] = []
    ready_at: list[int] = []
    try:
        print("  starting the 3-server nats cluster ...", flush=True)
        try:
            cluster.start(CLUSTER_TIMEOUT_S)
        except AssertionError as exc:  # tests.servers.wait_until: no meta leader in time
            print(f"scale-out: {exc}", file=sys.stderr)
            for line in _cluster_log(cluster)[-40:]:
                print(f"  | {line[:300]}", file=sys.stderr)
            return 1
        ready_at = _log_sizes(cluster)
        for n in cfg.nodes:
            print(f"  {n} node(s) ...", flush=True)
            runs.append(run_nodes(cfg, n, cluster, tmp))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_at = _log_sizes(cluster)
        cluster.stop(cluster_notes)
        if ready_at:  # warnings and errors while measuring; errors only while stopping
            during = _cluster_log(cluster, ready_at, stop_at, ("[WRN]", "[ERR]", "[FTL]"))
            after = _cluster_log(cluster, stop_at, None, ("[ERR]", "[FTL]"))
            cluster_notes += [f"| {line[:300]}" for line in [*during, *after][-40:]]
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    _report(cfg, runs, cluster_notes)
    return 1 if any(r.res.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
