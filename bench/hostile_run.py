"""One hostile run, shared by ``bench fuzz`` and ``bench flood``: a node, its well-behaved
clients, attackers in processes of their own, and what came of it.

:func:`run_hostile` starts a node subprocess with the node's own limits (nothing lifted: the
attackers must meet what production meets), opens the well-behaved rooms
(:class:`~bench.members.WellBehaved`), measures them alone for ``baseline_s``, then starts the
attacker processes (:class:`~bench.attackers.AttackProcess`) and measures during the attack,
bounded in frames and in time. It fills a :class:`HostileResult`: frames sent, what the node
answered, the node's RSS before and after, its crashes (the process died, or a traceback or an
ERROR line in its log, or a well-behaved client missed an event), stuck rooms and the
well-behaved clients' p99 before and during the attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.attackers import AttackerSpec, AttackProcess, AttackStats, Target
from bench.members import WellBehaved
from bench.nodes import SECRET, NodeProcess, wait_ready
from bench.procs import READY_TIMEOUT_S, cpu_seconds, http_get, run_loop
from bench.report import ms, output_lines, pct
from node.nats_server import free_port

__all__ = ["HostileConfig", "HostileResult", "hostile_node", "log_crashes", "report_lines",
           "rss_mb", "run_hostile"]

START_TIMEOUT_S = 60.0  # for the attacker processes to import and report ``started``
SETTLE_S = 2.0  # after the attack, before the last look at the node's rooms and RSS
WARMUP_S = 2.0  # the members publish this long before the baseline counts (rooms warm up)
# The node's counters and gauges worth printing after an attack (those it has: older nodes
# lack some), summed over their labels.
METRICS = ("rtnode_rooms_active", "rtnode_rate_limited", "rtnode_http_refused",
           "rtnode_http_head_timeouts", "rtnode_mqtt_refused_publishes",
           "rtnode_mqtt_bad_payloads", "rtnode_slow_consumer_disconnects")


@dataclass(frozen=True)
class HostileConfig:
    """What one hostile run does."""

    seed: int
    specs: tuple[AttackerSpec, ...]  # every attacker, dealt round-robin to the workers
    frames: int  # hostile frames in all (the attack ends when they are sent...)
    seconds: float  # ... or after this long
    workers: int = 2
    baseline_s: float = 5.0
    rooms: int = 3
    members: int = 4
    rate_per_s: float = 20.0
    node_flags: tuple[str, ...] = ()


@dataclass
class HostileResult:
    """What a hostile run measured."""

    config: HostileConfig
    attack: AttackStats = field(default_factory=AttackStats)
    attack_started: float = 0.0  # time.time() once every attacker process had started
    attack_s: float = 0.0
    attackers_cpu: float = 0.0  # CPU seconds of the attacker processes, start-up included
    rss_before: dict[str, float] = field(default_factory=dict)  # MB, node and nats-server
    rss_after: dict[str, float] = field(default_factory=dict)
    metrics_end: dict[str, float] = field(default_factory=dict)  # as the attack ended
    metrics_settled: dict[str, float] = field(default_factory=dict)  # SETTLE_S later
    cpu_before: dict[str, float] = field(default_factory=dict)  # CPU s per wall s, by process
    cpu_during: dict[str, float] = field(default_factory=dict)
    p99_before: float | None = None
    p99_during: float | None = None
    # The p99 of the way into the node (until it stamped the event), before and during.
    p99_into: tuple[float | None, float | None] = (None, None)
    samples_before: int = 0
    samples_during: int = 0
    received: int = 0
    lost: int = 0
    missed_members: int = 0  # well-behaved members that missed an event
    stuck: list[str] = field(default_factory=list)
    client_problems: list[str] = field(default_factory=list)
    node_died: str | None = None
    healthz_after: int = 0
    log_crashes: list[str] = field(default_factory=list)
    server_log: list[str] = field(default_factory=list)
    shutdown_log: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the run could not take place

    @property
    def crashes(self) -> int:
        """Node deaths, tracebacks and ERROR lines in its log, and members that missed
        events."""
        return bool(self.node_died) + len(self.log_crashes) + self.missed_members


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss(node: NodeProcess) -> dict[str, float]:
    out = {"node": rss_mb(node.proc.pid)}
    for pid, cmd in node.kids.items():
        if "nats-server" in cmd:
            out["nats-server"] = rss_mb(pid)
    return out


def metrics(base: str) -> dict[str, float]:
    """The node's :data:`METRICS` it has, each summed over its labels."""
    status, body = http_get(base + "/metrics", timeout=5)
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.rpartition(" ")
        metric = name.partition("{")[0].removesuffix("_total")
        if metric in METRICS:
            with contextlib.suppress(ValueError):
                out[metric] = out.get(metric, 0.0) + float(value)
    return out


def log_crashes(lines: list[str]) -> list[str]:
    """The lines of a node's log that tell of a crash: a traceback, an ERROR or CRITICAL."""
    return [line for line in lines
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]


@contextmanager
def hostile_node(res: HostileResult) -> Iterator[NodeProcess | None]:
    """A node with its embedded nats-server and its own limits, in a temporary directory.

    Yields None when it could not start (``res.error`` says why); stopped at the end, its log
    in ``res.server_log`` and ``res.shutdown_log``.
    """
    tmp = Path(tempfile.mkdtemp(prefix="rtnode-hostile-"))
    http_port, mqtt_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "node", "run", "--http-port", str(http_port),
           "--mqtt-port", str(mqtt_port), "--data-dir", str(tmp / "data"),
           "--node-name", "hostile", "--log-level", "warning", *res.config.node_flags]
    env = {**os.environ, "RTNODE_JWT_SECRET": SECRET}
    node: NodeProcess | None = None
    try:
        node = NodeProcess("hostile", cmd, tmp / "node.log", env, http_port, mqtt_port)
        res.error = wait_ready([node], READY_TIMEOUT_S)
        yield None if res.error else node
    finally:
        if node is not None:
            if node.proc.poll() is not None and not res.error:
                res.node_died = f"the node exited with {node.proc.returncode}"
            node.stop(res.notes)
            res.server_log, res.shutdown_log = node.output()
        shutil.rmtree(tmp, ignore_errors=True)


async def _attack(res: HostileResult, node: NodeProcess) -> None:
    """Start the attacker processes, wait for them (bounded), add up their stats."""
    cfg = res.config
    target = Target(int(node.base.rsplit(":", 1)[1]), node.mqtt_port, SECRET)
    ctx = multiprocessing.get_context("spawn")
    n = max(1, min(cfg.workers, len(cfg.specs)))
    procs = [AttackProcess(ctx, list(cfg.specs[w::n]), target, cfg.frames // n
                           + (w < cfg.frames % n), cfg.seconds, w * 1000) for w in range(n)]
    try:
        for p in procs:
            got = await p.expect("started", START_TIMEOUT_S)
            if isinstance(got, str):
                res.notes.append(got)
        started = time.monotonic()
        res.attack_started = time.time()
        for p in procs:
            got = await p.expect("done", cfg.seconds + 60)
            if isinstance(got, AttackStats):
                res.attack.add(got)
            elif got:
                res.notes.append(got)
        res.attack_s = time.monotonic() - started
        res.attackers_cpu = sum(cpu_seconds(p.proc.pid) for p in procs)
    finally:
        for p in procs:
            p.close(res.notes)


async def _measure(res: HostileResult, node: NodeProcess) -> None:
    cfg = res.config
    wb = WellBehaved(node.ws_url, SECRET, cfg.rooms, cfg.members, cfg.rate_per_s)
    try:
        await wb.start()
        await asyncio.sleep(WARMUP_S)
        counted_from = time.time()
        res.rss_before = _rss(node)
        cpu0, w0 = {**node.cpu(), "clients": time.process_time()}, time.monotonic()
        await asyncio.sleep(cfg.baseline_s)
        t0 = time.time()
        cpu1, w1 = {**node.cpu(), "clients": time.process_time()}, time.monotonic()
        await _attack(res, node)
        t1 = time.time()
        cpu2, w2 = {**node.cpu(), "clients": time.process_time()}, time.monotonic()
        res.metrics_end = metrics(node.base)
        res.cpu_before = {k: (v - cpu0.get(k, 0)) / (w1 - w0) for k, v in cpu1.items()}
        res.cpu_during = {k: (v - cpu1.get(k, 0)) / (w2 - w1) for k, v in cpu2.items()}
        res.cpu_during["attackers"] = res.attackers_cpu / (w2 - w1)
        await wb.stop()
        before = wb.latencies(counted_from, t0)
        during = wb.latencies(res.attack_started or t0, t1)
        res.p99_before, res.p99_during = pct(before, 0.99), pct(during, 0.99)
        res.p99_into = (pct(wb.latencies_into(counted_from, t0), 0.99),
                        pct(wb.latencies_into(res.attack_started or t0, t1), 0.99))
        res.samples_before, res.samples_during = len(before), len(during)
        res.received, res.lost = wb.received(), wb.lost()
        res.missed_members = wb.missed_members()
        res.stuck, res.client_problems = wb.stuck_rooms(), wb.problems()
        await asyncio.sleep(max(0.0, SETTLE_S - (time.monotonic() - w2)))
        res.metrics_settled = metrics(node.base)
        res.rss_after = _rss(node)
    finally:
        await wb.close()
    if node.proc.poll() is not None:
        res.node_died = f"the node exited with {node.proc.returncode}"
    res.healthz_after = http_get(node.base + "/healthz")[0]


def run_hostile(cfg: HostileConfig) -> HostileResult:
    """One hostile run, start to end (bounded)."""
    res = HostileResult(cfg)
    with hostile_node(res) as node:
        if node is not None:
            try:
                run_loop(_measure(res, node))
            except (OSError, RuntimeError, TimeoutError, ConnectionClosed,
                    InvalidHandshake) as exc:
                res.error = f"the run failed: {exc!r}"
    res.log_crashes = log_crashes(res.server_log)
    return res


def report_lines(res: HostileResult) -> list[str]:
    """The figures every hostile run prints."""
    a = res.attack
    rate = a.frames / res.attack_s if res.attack_s else 0.0
    out = [
        f"hostile frames sent: {a.frames} in {res.attack_s:.1f} s ({rate:.0f}/s) over "
        f"{a.connections} connections: "
        + ", ".join(f"{k} {v}" for k, v in sorted(a.sent.items())),
        "node answered: " + ", ".join(f"{k} x{v}" for k, v in a.replies.most_common(12)),
        "connections ended: " + ", ".join(f"{k} x{v}" for k, v in a.closes.most_common(12)),
        "node RSS before / after: " + ", ".join(
            f"{k} {res.rss_before.get(k, 0):.0f} / {res.rss_after.get(k, 0):.0f} MB"
            for k in res.rss_before),
        "CPU (1.0 = a core) before / during the attack: " + ", ".join(
            f"{k} {res.cpu_before.get(k, 0):.2f} / {v:.2f}" for k, v in res.cpu_during.items())
        + f" (clients: the well-behaved ones; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f})",
        f"node metrics as the attack ended (and {SETTLE_S:g} s later): " + ", ".join(
            f"{k.removeprefix('rtnode_')} {v:g} ({res.metrics_settled.get(k, 0):g})"
            for k, v in res.metrics_end.items()),
        f"well-behaved p99 latency: {ms(res.p99_before)} ms before the attack "
        f"({res.samples_before} events), {ms(res.p99_during)} ms during it "
        f"({res.samples_during} events); of which the way into the node (until it stamped "
        f"the event): {ms(res.p99_into[0])} / {ms(res.p99_into[1])} ms",
        f"well-behaved events received: {res.received}, lost: {res.lost}",
        f"stuck rooms: {len(res.stuck)}" + "".join(f"\n  {s}" for s in res.stuck),
        f"crashes: {res.crashes} (node {'died: ' + res.node_died if res.node_died else 'up'}"
        f", /healthz {res.healthz_after}, {len(res.log_crashes)} traceback/ERROR lines "
        f"in its log, {res.lost} events lost)",
    ]
    out += [f"  | {line[:300]}" for line in res.log_crashes[:20]]
    out += [f"well-behaved client: {p}" for p in res.client_problems[:20]]
    out += [f"attacker: {f}" for f in a.failures[:10]]
    out += [f"note: {n}" for n in res.notes]
    if res.error:
        out.append(f"error: {res.error}")
    out += output_lines("node", res.server_log[-40:] if not res.log_crashes else [],
                        res.shutdown_log)
    return out
