"""rtnode nodes as benchmark subprocesses: their command line, readiness, CPU and counters.

A benchmark starts each node as a :class:`NodeProcess` with limits high enough that it measures
the node, not its rate limiting, waits for :func:`wait_ready`, measures, reads the node's
counters with :func:`scrape`, then stops it and reports what it logged, until the stop and
while stopping, apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import (
    READY_TIMEOUT_S,
    children_of,
    cmdline,
    cpu_seconds,
    http_get,
    log_lines,
    size,
    spawn,
    stop,
)
from node.nats_server import free_port

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SECRET",
    "NodeProcess",
    "RunOutcome",
    "bench_node",
    "node_command",
    "open_limits",
    "rss_kib",
    "scrape",
    "scrape_settled",
    "wait_ready",
]

SECRET = "bench-secret-" + os.urandom(16).hex()
MAX_MESSAGE_BYTES = 60_000  # publisher messages stay under the node's max_frame_bytes (65536)

_COUNTERS = (
    "rtnode_published", "rtnode_events_in", "rtnode_events_delivered", "rtnode_gap_repairs",
    "rtnode_live_dropped", "rtnode_events_replayed", "rtnode_slow_consumer_disconnects",
    "rtnode_rate_limited", "rtnode_jetstream_retries", "rtnode_jetstream_errors",
)
_MQTT_COUNTERS = ("rtnode_mqtt_uplinks", "rtnode_mqtt_refused_publishes",
                  "rtnode_mqtt_bad_payloads")


@dataclass(kw_only=True)
class RunOutcome:
    """What every measured run reports besides its figures: how it ended, what servers said."""

    timed_out: bool = False
    stalled: str | None = None
    error: str | None = None  # the run could not take place (server did not start...)
    server_log: list[str] = field(default_factory=list)  # up to the stop signal
    shutdown_log: list[str] = field(default_factory=list)  # after it
    server_counters: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds during the measurement
    cpu_wall: float = 0.0  # wall seconds over which ``cpu`` was taken


def node_command(http_port: int, mqtt_port: int, data_dir: Path, *, name: str = "bench",
                 payload_bytes: int = 0, optimize: bool = False,
                 slow_consumer_bytes: int | None = 64 * 1024 * 1024,
                 extra: Sequence[str] = ()) -> list[str]:
    """``python -m node run`` on the given ports, with rate and error limits lifted.

    Args:
        payload_bytes: The largest payload a client will send; the frame limit is raised for
            payloads near it.
        optimize: Run the node under ``python -O`` (asserts stripped).
        slow_consumer_bytes: ``--slow-consumer-bytes``, or None for the node's default.
        extra: More flags (``--nats-url``...).
    """
    cmd = [sys.executable, *(["-O"] if optimize else []), "-m", "node", "run", *extra,
           "--http-port", str(http_port), "--mqtt-port", str(mqtt_port),
           "--data-dir", str(data_dir), "--node-name", name,
           "--rate-per-s", "1000000", "--rate-burst", "1000000",
           "--max-errors-per-min", "1000000", "--log-level", "warning"]
    if slow_consumer_bytes is not None:
        cmd += ["--slow-consumer-bytes", str(slow_consumer_bytes)]
    if payload_bytes + 1024 > MAX_MESSAGE_BYTES:
        cmd += ["--max-frame-bytes", str(2 * (payload_bytes + 1024))]
    return cmd


class NodeProcess:
    """One node subprocess, its log and the node's children (its embedded nats-server).

    Args:
        name: The node's ``--node-name`` (its banner is left out of the reported output).
        cmd: From :func:`node_command`.
        log_path: Where its stdout and stderr go.
        label: How the report names it ("node", "node n1").
    """

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str],
                 http_port: int, mqtt_port: int, label: str = "node") -> None:
        self.name = name
        self.label = label
        self.log_path = log_path
        self.mqtt_port = mqtt_port
        self.base = f"http://127.0.0.1:{http_port}"
        self.ws_url = f"ws://127.0.0.1:{http_port}/ws"
        self.proc: subprocess.Popen[bytes] = spawn(cmd, log_path, env)
        self.kids: dict[int, str] = {}  # known once ready: pid -> command line
        self.stop_at: int | None = None  # log size when it was asked to stop

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the node and of its nats-server (and other children)."""
        out = {"node": cpu_seconds(self.proc.pid)}
        for pid, cmd in self.kids.items():
            name = ("nats-server" if "nats-server" in cmd
                    else "node workers" if "--worker-index" in cmd else f"node child {pid}")
            out[name] = out.get(name, 0.0) + cpu_seconds(pid)
        return out

    def rss_kib(self) -> dict[str, int]:
        """Resident memory (KiB) now of the node processes (the node, or the parent and its
        ``--workers``) and of its nats-server."""
        out = {"node": rss_kib(self.proc.pid), "nats-server": 0}
        for pid, cmd in self.kids.items():
            out["nats-server" if "nats-server" in cmd else "node"] += rss_kib(pid)
        return out

    def mark_stop(self) -> None:
        """Note where its log stands: what follows is its output while stopping."""
        self.stop_at = size(self.log_path)

    def stop(self, notes: list[str]) -> None:
        """Stop it (bounded, by PID); what went wrong goes to ``notes``."""
        self.mark_stop()
        stop(self.proc, self.label, notes)

    def output(self) -> tuple[list[str], list[str]]:
        """What it logged until asked to stop, and while stopping, banner left out."""
        banner = f"rtnode {self.name} "
        end = self.stop_at if self.stop_at is not None else size(self.log_path)
        return ([line for line in log_lines(self.log_path, 0, end)
                 if not line.startswith(banner)],
                [line for line in log_lines(self.log_path, end)
                 if not line.startswith(banner)])


@contextmanager
def bench_node(res: RunOutcome, prefix: str, payload_bytes: int = 0,
               optimize: bool = False, workers: int = 1, extra: Sequence[str] = (),
               secret: str = SECRET) -> Iterator[NodeProcess | None]:
    """One node with its embedded nats-server, in a temporary directory removed at the end.

    With ``workers`` > 1 the node runs ``--workers N`` (N node processes sharing the ports)
    and is ready once every worker is; ``extra`` are more flags of ``node run``, ``secret``
    its HS256 secret. Yields the node once ready, or None when it could not
    start (``res.error`` says why). At the end it is stopped and what it logged is in
    ``res.server_log`` and ``res.shutdown_log``.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    http_port, mqtt_port = free_port(), free_port()
    cmd = node_command(http_port, mqtt_port, tmp / "data", payload_bytes=payload_bytes,
                       optimize=optimize,
                       extra=[*(["--workers", str(workers)] if workers > 1 else []), *extra])
    env = {**os.environ, "RTNODE_JWT_SECRET": secret}
    node: NodeProcess | None = None
    notes: list[str] = []
    try:
        node = NodeProcess("bench", cmd, tmp / "node.log", env, http_port, mqtt_port)
        res.error = wait_ready([node], READY_TIMEOUT_S)
        if not res.error and workers > 1:
            res.error = _wait_workers(node, tmp / "data" / "workers.json", workers,
                                      READY_TIMEOUT_S)
        yield None if res.error else node
    finally:
        if node is not None:
            node.stop(notes)
            res.server_log, res.shutdown_log = node.output()
        res.shutdown_log += notes
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_workers(node: NodeProcess, path: Path, workers: int, timeout: float) -> str | None:
    """Wait until ``workers.json`` says every worker is ready; then note the node's children."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ready = sum(1 for w in json.loads(path.read_text())["workers"] if w.get("ready"))
        except (OSError, ValueError, KeyError, TypeError):
            ready = 0
        if ready >= workers:
            node.kids = {pid: cmdline(pid) for pid in children_of(node.proc.pid)}
            return None
        if node.proc.poll() is not None:
            return f"{node.label} exited with {node.proc.returncode} before its workers were ready"
        if time.monotonic() > deadline:
            return f"{node.label}: {ready} of {workers} workers ready after {timeout:.0f} s"
        time.sleep(0.1)


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (Linux /proc; 0 elsewhere or once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


async def settled_rss_kib(pid: int, seconds: float = 4.0, tolerance: float = 0.005) -> int:
    """RSS of ``pid`` in KiB once it moved by at most ``tolerance`` over 0.5 s (waiting at
    most ``seconds``)."""
    last = rss_kib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) <= last * tolerance:
            return now
        last = now
    return last


def wait_ready(nodes: list[NodeProcess], timeout: float) -> str | None:
    """Wait until every node's ``/readyz`` is 200. Returns what went wrong, or None."""
    deadline = time.monotonic() + timeout
    waiting = list(nodes)
    while waiting:
        for node in list(waiting):
            if node.proc.poll() is not None:
                return f"{node.label} exited with {node.proc.returncode} before /readyz was 200"
            if http_get(node.base + "/readyz")[0] == 200:
                node.kids = {pid: cmdline(pid) for pid in children_of(node.proc.pid)}
                waiting.remove(node)
        if not waiting:
            break
        if time.monotonic() > deadline:
            return (f"{', '.join(n.label for n in waiting)} not ready after "
                    f"{timeout:.0f} s")
        time.sleep(0.1)
    return None


def scrape(base: str, mqtt: bool = False) -> dict[str, float]:
    """The node's counters that tell about fan-out (and MQTT ingest with ``mqtt``), mailbox
    overflows and failures by actor kind, live connection actors and open connections."""
    names = (*_COUNTERS, *_MQTT_COUNTERS) if mqtt else _COUNTERS
    status, body = http_get(base + "/metrics", timeout=5)
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        metric, brace, labels = name.partition("{")
        metric = metric.removesuffix("_total")
        try:
            number = float(value)
        except ValueError:
            continue
        if metric in names:
            out[metric] = number
        elif metric in ("rtnode_actor_overflows", "rtnode_actor_failures",
                        "rtnode_actor_restarts") and number:
            out[metric + brace + labels] = number
        elif metric == "rtnode_actors" and 'kind="connection"' in labels:
            out["rtnode_connection_actors"] = number
        elif metric == "rtnode_connections":
            out["rtnode_open_connections"] = out.get("rtnode_open_connections", 0) + number
    return out


def scrape_settled(base: str, timeout: float = 3.0, mqtt: bool = False) -> dict[str, float]:
    """Scrape once every client is closed: wait (bounded) for the node to let them go."""
    deadline = time.monotonic() + timeout
    while True:
        counters = scrape(base, mqtt)
        alive = counters.get("rtnode_connection_actors", 0) + counters.get(
            "rtnode_open_connections", 0)
        if not alive or time.monotonic() > deadline:
            return counters
        time.sleep(0.1)


def open_limits(connections: int) -> list[str]:
    """Node flags that let ``connections`` clients of one address in (a benchmark's clients
    all come from 127.0.0.1)."""
    big = str(max(100_000, 2 * connections))
    return ["--max-connections", big, "--max-connections-per-ip", big,
            "--peer-failures-per-min", big]
