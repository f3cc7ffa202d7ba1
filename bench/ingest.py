"""Device ingest through the node's embedded MQTT listener, end to end through JetStream.

``python -m bench ingest [--devices 100] [--events-per-device 200] [--payload-bytes 50]
[--qos 1] [--window 16] [--workers 2] [--timeout-s 120]``:

1. starts an rtnode node as a subprocess (with its embedded nats-server) on free ports, in a
   temporary data directory, with limits high enough that the benchmark measures ingest, not
   rate limiting;
2. joins one WebSocket member (JSON) to the room;
3. starts ``--workers`` client processes that connect D devices between them with a minimal
   raw-asyncio MQTT 3.1.1 client (client id = username = device id, password = a device JWT),
   each device publishing its readings ``{"event": "reading", "data": {"t", "i", "d", "pad"}}``
   (CBOR; ``d``: the device's index) to ``rooms/<room>/up`` at QoS 1 as fast as its window
   of ``--window`` unacknowledged PUBLISHes allows (at QoS 0: as fast as its socket takes
   them);
4. measures events/s end to end (first PUBLISH sent -> last event received by the member),
   stored events/s (PUBACKs), publish->deliver and publish->PUBACK latency, and what was lost
   or doubled: every PUBACKed event must reach the member exactly once.

Never asserts: losses, duplicates, disconnects and anything the node logged are printed as
figures. Bounded by ``--timeout-s`` (the measurement) plus bounded set-up and shutdown; the
node, its nats-server and the client processes are stopped on every path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import signal
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.ingest_devices import (
    MAX_LATENCY_SAMPLES,
    ROOM,
    DeviceProcess,
    IngestConfig,
)
from bench.ingest_report import IngestResult, report
from bench.nodes import SECRET, bench_node, scrape_settled
from bench.procs import SETUP_TIMEOUT_S, cpu_seconds, run_loop, terminated
from node.protocol.tokens import mint_token

__all__ = ["IngestConfig", "IngestResult", "Member", "WsMember", "main", "measure", "report",
           "run_ingest"]

STALL_S = 20.0  # no event at the member and no device finishing for this long: over
STALL_AFTER_DEVICES_S = 3.0  # the same, once every device has finished
GRACE_S = 1.0  # after the last expected event: time for stray (duplicate) frames to show up


# ---------------------------------------------------------------------------------------------
# The member (in the benchmark's process)


class Member:
    """Counts and times the readings the member receives (the node's WebSocket client, or a
    baseline's MQTT subscriber: :meth:`reading`)."""

    def __init__(self, res: IngestResult) -> None:
        cfg = res.config
        self.res = res
        self.events = cfg.events_per_device
        self.ids = {f"bench-dev-{k}": k for k in range(cfg.devices)}
        res.seen = [bytearray(cfg.events_per_device) for _ in range(cfg.devices)]
        self.last_i = [-1] * cfg.devices
        self.last_seq = 0
        self.expected = cfg.expected
        self.stride = max(1, -(-cfg.expected // MAX_LATENCY_SAMPLES))
        self.all_done = asyncio.Event()
        self.progress = time.monotonic()

    def message(self, msg: str | bytes, now: float) -> None:
        res = self.res
        if isinstance(msg, bytes):
            res.member_other["<binary>"] += 1
            return
        for line in msg.split("\n"):
            if not line:
                continue
            try:
                f = json.loads(line)
            except ValueError:
                res.member_other["<not json>"] += 1
                continue
            if not isinstance(f, dict) or f.get("type") != "event":
                kind = f.get("type", "?") if isinstance(f, dict) else "?"
                res.member_other[str(kind)] += 1
                if kind in ("error", "disconnect") and len(res.member_notes) < 5:
                    res.member_notes.append(line[:200])
                continue
            self._event(f, now)

    def _event(self, f: dict[str, Any], now: float) -> None:
        seq = f.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                self.res.seq_disorder += 1
            self.last_seq = seq
        try:
            client_id = f["from"]["client_id"]
        except (KeyError, TypeError):
            client_id = None
        self.reading(client_id, f.get("data"), now)

    def reading(self, client_id: Any, data: Any, now: float) -> None:
        """One reading received: device ``client_id``'s ``data`` ({"t", "i", ...})."""
        res = self.res
        res.received += 1
        res.last_event_at = now
        self.progress = time.monotonic()
        try:
            d = self.ids[client_id]
            i, t = int(data["i"]), float(data["t"])
            if not 0 <= i < self.events:
                raise ValueError(i)
        except (KeyError, TypeError, ValueError):
            res.foreign += 1
            return
        seen = res.seen[d]
        if seen[i]:
            res.duplicates += 1
            seen[i] = min(255, seen[i] + 1)
            return
        seen[i] = 1
        res.distinct += 1
        if i < self.last_i[d]:
            res.device_disorder += 1
        self.last_i[d] = i
        if (d * self.events + i) % self.stride == 0:
            res.latencies.append(now - t)
        if res.distinct == self.expected:
            res.done_at = now
            self.all_done.set()


async def _open_member(url: str) -> ClientConnection:
    ws = await connect(url, subprotocols=["rtnode.v1.json"], max_size=None, compression=None,
                       ping_interval=None, open_timeout=SETUP_TIMEOUT_S)
    tok = mint_token(SECRET, sub="bench-member", rooms={ROOM: ["join"]})
    await ws.send(json.dumps({"type": "connect", "id": "connect", "token": tok}) + "\n"
                  + json.dumps({"type": "join", "id": "join", "room": ROOM}))
    while True:
        for line in str(await ws.recv()).split("\n"):
            f = json.loads(line) if line else {}
            if f.get("id") == "join" or f.get("type") == "disconnect":
                if f.get("type") != "joined":
                    raise RuntimeError(f"member: join answered {f}")
                return ws


async def _read_member(ws: ClientConnection, member: Member, finished: asyncio.Event) -> None:
    message = member.message
    try:
        async for msg in ws:
            message(msg, time.time())
    except ConnectionClosed:
        pass
    except Exception as exc:  # a bug of the benchmark's own: reported, not hidden
        member.res.member_closed = f"reader failed: {exc!r}"
        return
    if not finished.is_set():
        member.res.member_closed = f"{ws.close_code} {ws.close_reason or ''}".strip()


class WsMember:
    """The member as the node has it: a WebSocket client joined to the room (JSON)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> ClientConnection:
        return await _open_member(self.url)

    async def read(self, conn: ClientConnection, member: Member,
                   finished: asyncio.Event) -> None:
        await _read_member(conn, member, finished)

    async def close(self, conn: ClientConnection) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.close(), 10)
        conn.transport.abort()


async def measure(res: IngestResult, door: Any, port: int, probe: Any,
                  worker_pids: list[int]) -> None:
    """Devices on the MQTT ``port`` publish; the member opened by ``door`` (``open``,
    ``read`` until told ``finished``, ``close``: :class:`WsMember`, or a baseline's) counts
    what arrives. Figures go to ``res``."""
    cfg = res.config
    n = max(1, min(cfg.workers, cfg.devices))
    ctx = multiprocessing.get_context("spawn")
    procs: list[DeviceProcess] = []
    conn: Any = None
    reader: asyncio.Task[None] | None = None
    finished = asyncio.Event()
    try:
        conn = await asyncio.wait_for(door.open(), SETUP_TIMEOUT_S)
        member = Member(res)
        for w in range(n):
            procs.append(DeviceProcess(ctx, cfg, port, list(range(w, cfg.devices, n))))
            worker_pids.append(procs[-1].proc.pid)
        connected = 0
        for p in procs:
            msg = await p.expect(("ready",), SETUP_TIMEOUT_S + 15)
            if msg[0] != "ready":
                res.error = f"device process: {msg[1] if len(msg) > 1 else 'exited'}"
                return
            connected += msg[1]
            if msg[3]:
                res.worker_notes.append(
                    f"device process {p.proc.pid}: {msg[3]} of its {len(p.indices)} devices "
                    f"could not connect: " + "; ".join(msg[2]) + ("; ..." if msg[3] > 5 else ""))
        if connected < cfg.devices:
            res.error = f"only {connected} of {cfg.devices} devices connected"
            return
        reader = asyncio.create_task(door.read(conn, member, finished))
        cpu0, wall0 = probe(), time.monotonic()
        cpu1: dict[str, float] | None = None
        deadline_wall = time.time() + cfg.timeout_s
        deadline = time.monotonic() + cfg.timeout_s
        for p in procs:
            p.send("go", deadline_wall)
        waiting = {asyncio.create_task(p.expect(("done",), cfg.timeout_s + 30)): p
                   for p in procs}
        last_progress = time.monotonic()
        while True:
            now = time.monotonic()
            if member.all_done.is_set() and cpu1 is None:
                cpu1, res.cpu_wall = probe(), now - wall0
            if member.all_done.is_set() and not waiting:
                break
            if now >= deadline:
                res.timed_out = True
                break
            flag = asyncio.create_task(member.all_done.wait())
            done, _ = await asyncio.wait({flag, *waiting}, timeout=0.5,
                                         return_when=asyncio.FIRST_COMPLETED)
            flag.cancel()
            for t in done:
                if t in waiting:
                    p = waiting.pop(t)
                    last_progress = time.monotonic()
                    try:
                        msg = t.result()
                    except TimeoutError:
                        msg = ("failed", "no report from the device process")
                    if msg[0] == "done":
                        p.done = msg
                    else:
                        res.worker_notes.append(
                            f"device process: {msg[1] if len(msg) > 1 else 'exited early'}")
            now = time.monotonic()
            idle = now - max(last_progress, member.progress)
            if not waiting and idle > STALL_AFTER_DEVICES_S and not member.all_done.is_set():
                res.stalled = (f"stopped waiting: every device had finished and no event "
                               f"arrived for {STALL_AFTER_DEVICES_S:.0f} s")
                break
            if idle > STALL_S:
                res.stalled = (f"stopped waiting: no event and no device finished for "
                               f"{STALL_S:.0f} s")
                break
        if cpu1 is None:
            cpu1, res.cpu_wall = probe(), time.monotonic() - wall0
        res.cpu = {k: v - cpu0[k] for k, v in cpu1.items() if k in cpu0}
        for t in waiting:
            t.cancel()
        await asyncio.sleep(GRACE_S if member.all_done.is_set() else 0.1)  # stray duplicates
        for p in procs:
            if p.done is None:
                p.send("stop")  # a worker still publishing reports what it has, then stops
                with contextlib.suppress(TimeoutError):
                    msg = await p.expect(("done",), 10)
                    if msg[0] == "done":
                        p.done = msg
        for p in procs:
            if p.done is not None:
                res.devices.extend(p.done[1])
                res.ack_latencies.extend(p.done[2])
                if p.done[3]:
                    res.worker_notes.append(f"device process {p.proc.pid}: {p.done[3]}")
        res.devices.sort(key=lambda d: d.index)
    except (TimeoutError, OSError, ConnectionClosed, RuntimeError) as exc:
        res.error = res.error or f"set-up failed: {exc!r}"
    finally:
        finished.set()
        notes: list[str] = []
        for p in procs:
            p.close(notes)
        res.worker_notes.extend(notes)
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if conn is not None:
            await door.close(conn)


# ---------------------------------------------------------------------------------------------
# The node process


def run_ingest(cfg: IngestConfig, node_workers: int = 1) -> IngestResult:
    """Start a node subprocess (``--workers node_workers``), measure device ingest through it,
    stop it."""
    res = IngestResult(cfg)
    with bench_node(res, "rtnode-bench-ingest-", cfg.payload_bytes, cfg.node_optimize,
                    workers=node_workers) as node:
        if node is None:
            return res
        workers: list[int] = []

        def probe() -> dict[str, float]:
            assert node is not None
            out = node.cpu()
            out["member (benchmark process)"] = time.process_time()
            out[f"device processes ({len(workers)})"] = sum(cpu_seconds(p) for p in workers)
            return out

        run_loop(measure(res, WsMember(node.ws_url), node.mqtt_port, probe, workers))
        res.server_counters = scrape_settled(node.base, mqtt=True)
    return res


def _parse(argv: list[str]) -> IngestConfig:
    p = argparse.ArgumentParser(prog="python -m bench ingest",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--devices", type=int, default=100, help="MQTT device connections")
    p.add_argument("--events-per-device", type=int, default=200, help="readings per device")
    p.add_argument("--payload-bytes", type=int, default=50, help="padding in each reading")
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    p.add_argument("--window", type=int, default=16,
                   help="most unacknowledged PUBLISHes per device (QoS 0: per write)")
    p.add_argument("--workers", type=int, default=2, help="device client processes")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="bound of the measurement (partial counts are reported)")
    p.add_argument("--node-optimize", action="store_true",
                   help="run the node under python -O (asserts stripped): a stopgap for the "
                        "listener's assert that refuses uvloop transports (bridge/mqtt.py)")
    a = p.parse_args(argv)
    for name in ("devices", "events_per_device", "window", "workers"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.payload_bytes < 0:
        p.error("--payload-bytes must not be negative")
    return IngestConfig(a.devices, a.events_per_device, a.payload_bytes, a.qos, a.window,
                        a.workers, a.timeout_s, a.node_optimize)


def main(argv: list[str]) -> int:
    """Run the ingest benchmark and print its figures. Returns 0 unless the run failed."""
    cfg = _parse(argv)
    print(f"rtnode device ingest benchmark: {cfg.devices} devices x {cfg.events_per_device} "
          f"events, QoS {cfg.qos}" + (" (node under python -O)" if cfg.node_optimize else ""),
          flush=True)
    signal.signal(signal.SIGTERM, terminated)
    try:
        res = run_ingest(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    report(res)
    return 1 if res.error else 0
