"""Device ingest through the node's embedded MQTT listener, end to end through JetStream.

``python -m bench ingest [--devices 100] [--events-per-device 200] [--payload-bytes 50]
[--qos 1] [--window 16] [--workers 2] [--timeout-s 120]``:

1. starts an rtnode node as a subprocess (with its embedded nats-server) on free ports, in a
   temporary data directory, with limits high enough that the benchmark measures ingest, not
   rate limiting;
2. joins one WebSocket member (JSON) to the room;
3. starts ``--workers`` client processes that connect D devices between them with a minimal
   raw-asyncio MQTT 3.1.1 client (client id = username = device id, password = a device JWT),
   each device publishing its readings ``{"event": "reading", "data": {"t", "i", "pad"}}``
   (CBOR) to ``rooms/<room>/up`` at QoS 1 as fast as its window of ``--window`` unacknowledged
   PUBLISHes allows (at QoS 0: as fast as its socket takes them);
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
import ctypes
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cbor2
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.fanout import (  # the same process handling as the fan-out bench
    _children_of,
    _cmdline,
    _cpu_seconds,
    _http_get,
    _log_lines,
    _ms,
    _run_loop,
    _size,
    _spawn,
    _stop,
    _terminated,
)
from node.nats_server import free_port
from node.protocol.tokens import mint_token

__all__ = ["IngestConfig", "IngestResult", "main", "run_ingest"]

ROOM = "bench:ingest"
EVENT = "reading"
SECRET = "bench-secret-" + os.urandom(16).hex()
REPO = Path(__file__).resolve().parent.parent

READY_TIMEOUT_S = 30.0
SETUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
STALL_S = 20.0  # no event at the member and no device finishing for this long: over
STALL_AFTER_DEVICES_S = 3.0  # the same, once every device has finished
CONNACK_TIMEOUT_S = 10.0
DEVICE_STALL_S = 10.0  # a worker gives up when none of its devices got a PUBACK for this long
GRACE_S = 1.0  # after the last expected event: time for stray (duplicate) frames to show up
MAX_LATENCY_SAMPLES = 1_000_000
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class IngestConfig:
    """What one ingest run measures."""

    devices: int = 100
    events_per_device: int = 200
    payload_bytes: int = 50
    qos: int = 1
    window: int = 16
    workers: int = 2
    timeout_s: float = 120.0
    node_optimize: bool = False  # run the node under ``python -O`` (asserts stripped)

    @property
    def expected(self) -> int:
        return self.devices * self.events_per_device

    def args(self) -> str:
        return (f"--devices {self.devices} --events-per-device {self.events_per_device} "
                f"--payload-bytes {self.payload_bytes} --qos {self.qos} --window {self.window} "
                f"--workers {self.workers}"
                + (f" --timeout-s {self.timeout_s:g}" if self.timeout_s != 120.0 else "")
                + (" --node-optimize" if self.node_optimize else ""))


@dataclass
class DeviceReport:
    """What one device did (sent by its worker process)."""

    index: int
    sent: int = 0
    acked: bytearray = field(default_factory=bytearray)  # 1 where the PUBACK came
    n_acked: int = 0
    first_send: float = 0.0  # time.time()
    last_ack: float = 0.0
    dup_acks: int = 0  # PUBACKs for a packet id not in flight (duplicates or strays)
    unexpected: dict[str, int] = field(default_factory=dict)  # other packets, by kind
    closed: str | None = None  # the connection ended before the device was done


@dataclass
class IngestResult:
    """Figures of one run."""

    config: IngestConfig
    devices: list[DeviceReport] = field(default_factory=list)
    ack_latencies: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # publish -> received by the member
    seen: list[bytearray] = field(default_factory=list)  # per device, 1 per event received
    received: int = 0  # event frames at the member (duplicates included)
    distinct: int = 0
    duplicates: int = 0
    foreign: int = 0  # events the member could not attribute to a (device, i)
    device_disorder: int = 0  # events of a device received after a later one of that device
    seq_disorder: int = 0  # events whose seq was not above the previous one's
    member_other: Counter[str] = field(default_factory=Counter)
    member_notes: list[str] = field(default_factory=list)
    member_closed: str | None = None
    last_event_at: float = 0.0
    done_at: float = 0.0  # every expected event received
    worker_notes: list[str] = field(default_factory=list)
    timed_out: bool = False
    stalled: str | None = None
    error: str | None = None
    server_log: list[str] = field(default_factory=list)
    shutdown_log: list[str] = field(default_factory=list)
    server_counters: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_wall: float = 0.0

    @property
    def t0(self) -> float:
        return min((d.first_send for d in self.devices if d.first_send), default=0.0)

    @property
    def sent(self) -> int:
        return sum(d.sent for d in self.devices)

    @property
    def acked(self) -> int:
        return sum(d.n_acked for d in self.devices)

    @property
    def last_ack(self) -> float:
        return max((d.last_ack for d in self.devices), default=0.0)

    @property
    def elapsed(self) -> float:
        end = self.done_at or self.last_event_at
        return end - self.t0 if self.t0 and end > self.t0 else 0.0

    @property
    def rate(self) -> float:
        return self.distinct / self.elapsed if self.elapsed else 0.0

    @property
    def stored_rate(self) -> float:
        span = self.last_ack - self.t0
        return self.acked / span if self.t0 and span > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# The devices: a minimal MQTT 3.1.1 client on asyncio protocols (runs in worker processes)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def _connect_packet(client_id: str, password: str) -> bytes:
    # protocol name, level 4, flags: user name, password, clean session; keep-alive 0 (off)
    body = (_utf8("MQTT") + bytes((4, 0xC2)) + (0).to_bytes(2, "big")
            + _utf8(client_id) + _utf8(client_id) + _utf8(password))
    return b"\x10" + _varint(len(body)) + body


class _Device(asyncio.Protocol):
    """One device: CONNECT, then PUBLISH its readings within a window of unacked packets."""

    def __init__(self, index: int, client_id: str, token: str, cfg: IngestConfig,
                 lat_stride: int, worker: _Worker) -> None:
        self.report = DeviceReport(index, acked=bytearray(cfg.events_per_device))
        self.client_id = client_id
        self.token = token
        self.events = cfg.events_per_device
        self.window = cfg.window
        self.qos = cfg.qos
        self.pad = "x" * cfg.payload_bytes
        self.lat_stride = lat_stride
        self.worker = worker
        topic = f"rooms/{ROOM}/up".encode()
        self.topic_field = _utf8(topic)
        self.first_byte = b"\x32" if cfg.qos else b"\x30"
        self.sent_at = array("d", bytes(8 * cfg.events_per_device))
        self.inflight: dict[int, int] = {}  # packet id -> event index
        self.next_i = 0
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[int] = loop.create_future()  # the CONNACK return code
        self.done: asyncio.Future[None] = loop.create_future()
        self.going = False
        self.paused = False
        self.stopping = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass: no isinstance check
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(_connect_packet(self.client_id, self.token))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopping and not self.done.done():
            self.report.closed = f"connection lost: {exc!r}" if exc else "closed by the node"
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(self.report.closed or "closed"))
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.going:
            self.fill()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, size = 0, len(buf)
        got_ack = False
        now = time.time()
        rep = self.report
        while size - pos >= 2:
            kind = buf[pos] >> 4
            if buf[pos + 1] == 2 and kind == 4:  # PUBACK, the hot path
                if size - pos < 4:
                    break
                pid = (buf[pos + 2] << 8) | buf[pos + 3]
                pos += 4
                i = self.inflight.pop(pid, None)
                if i is None or rep.acked[i]:
                    rep.dup_acks += 1
                    continue
                rep.acked[i] = 1
                rep.n_acked += 1
                rep.last_ack = now
                if i % self.lat_stride == 0:
                    self.worker.ack_latencies.append(now - self.sent_at[i])
                got_ack = True
                continue
            length, mult, j = 0, 1, pos + 1
            while j < size:
                length += (buf[j] & 0x7F) * mult
                mult *= 128
                j += 1
                if not buf[j - 1] & 0x80:
                    break
            else:
                break
            if size - j < length:
                break
            body = bytes(buf[j:j + length])
            pos = j + length
            if kind == 2 and len(body) >= 2:  # CONNACK
                if not self.connected.done():
                    self.connected.set_result(body[1])
            else:
                name = {3: "PUBLISH", 4: "PUBACK (bad length)", 5: "PUBREC", 9: "SUBACK",
                        13: "PINGRESP"}.get(kind, f"packet type {kind}")
                rep.unexpected[name] = rep.unexpected.get(name, 0) + 1
        del buf[:pos]
        if got_ack:
            self.worker.progress = now
            if rep.n_acked == self.events and not self.done.done():
                self.done.set_result(None)
            elif self.going:
                self.fill()

    # -- publishing
    def fill(self) -> None:
        """Send what the window allows (QoS 0: a window's worth, then again on the next turn)."""
        if self.paused or self.transport is None or self.transport.is_closing():
            return
        events, qos, inflight = self.events, self.qos, self.inflight
        limit = self.window
        out: list[bytes] = []
        now = time.time()
        i = self.next_i
        dumps, pad, topic, first = cbor2.dumps, self.pad, self.topic_field, self.first_byte
        while i < events and (len(inflight) < limit if qos else len(out) < limit):
            payload = dumps({"event": EVENT, "data": {"t": now, "i": i, "pad": pad}})
            if qos:
                pid = i % 65535 + 1
                inflight[pid] = i
                out.append(first + _varint(len(topic) + 2 + len(payload)) + topic
                           + pid.to_bytes(2, "big") + payload)
            else:
                out.append(first + _varint(len(topic) + len(payload)) + topic + payload)
            self.sent_at[i] = now
            i += 1
        if out:
            if not self.report.first_send:
                self.report.first_send = now
            self.next_i = self.report.sent = i
            self.transport.write(b"".join(out))
        if not qos:
            if i >= events:
                if not self.done.done():
                    self.done.set_result(None)
            else:
                asyncio.get_running_loop().call_soon(self.fill)

    def start(self) -> None:
        self.going = True
        self.fill()

    def stop(self) -> None:
        self.stopping = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\xe0\x00")  # DISCONNECT
            self.transport.close()


class _Worker:
    """The devices of one client process."""

    def __init__(self) -> None:
        self.ack_latencies: list[float] = []
        self.progress = 0.0  # time.time() of the last PUBACK


def _worker_main(conn: Connection, cfg: IngestConfig, port: int, secret: str,
                 indices: list[int]) -> None:
    """Entry point of a client process."""
    os.setpgid(0, 0)  # a Ctrl-C reaches the benchmark only, which stops us in order
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        runner(_worker(conn, cfg, port, secret, indices))
    except Exception as exc:  # reported, never hidden
        with contextlib.suppress(OSError):
            conn.send(("failed", f"worker failed: {exc!r}"))


async def _worker(conn: Connection, cfg: IngestConfig, port: int, secret: str,
                  indices: list[int]) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    stop_requested = asyncio.Event()

    def readable() -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                inbox.put_nowait(msg)
                if msg[0] == "stop":
                    stop_requested.set()
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("stop",))
            stop_requested.set()

    loop.add_reader(conn.fileno(), readable)
    worker = _Worker()
    share = max(1, MAX_LATENCY_SAMPLES * len(indices) // max(1, cfg.devices))
    stride = max(1, -(-len(indices) * cfg.events_per_device // share))
    devices: list[_Device] = []
    sem = asyncio.Semaphore(50)
    errors: list[str] = []

    async def open_one(k: int) -> None:
        cid = f"bench-dev-{k}"
        tok = mint_token(secret, sub=cid, kind="device", rooms={ROOM: ["publish"]},
                         ttl_s=3600 + cfg.timeout_s)
        dev = _Device(k, cid, tok, cfg, stride, worker)
        async with sem:
            try:
                await loop.create_connection(lambda: dev, "127.0.0.1", port)
                code = await asyncio.wait_for(dev.connected, CONNACK_TIMEOUT_S)
            except TimeoutError:
                errors.append(f"{cid}: no CONNACK within {CONNACK_TIMEOUT_S:.0f} s")
                dev.stop()
                return
            except (OSError, ConnectionError) as exc:
                errors.append(f"{cid}: {exc!r}")
                return
        if code != 0:
            errors.append(f"{cid}: CONNACK return code {code}")
            return
        devices.append(dev)

    try:
        try:
            await asyncio.wait_for(asyncio.gather(*(open_one(k) for k in indices)),
                                   SETUP_TIMEOUT_S)
        except TimeoutError:
            errors.append(f"devices not connected after {SETUP_TIMEOUT_S:.0f} s")
        conn.send(("ready", len(devices), errors[:5], len(errors)))
        msg = await inbox.get()
        if msg[0] != "go":
            return
        deadline: float = msg[1]
        worker.progress = time.time()
        for dev in devices:
            dev.start()
        pending = {dev.done for dev in devices}
        note = None
        while pending:
            now = time.time()
            if now >= deadline:
                note = "gave up at the deadline"
                break
            if now - worker.progress > DEVICE_STALL_S:
                note = f"gave up: no PUBACK for {DEVICE_STALL_S:.0f} s"
                break
            if stop_requested.is_set():
                note = "stopped by the benchmark before its devices were done"
                break
            _, pending = await asyncio.wait(pending, timeout=min(0.5, deadline - now))
        waiting = [d for d in devices if not d.done.done()]
        if note and waiting:
            note += (f" with {len(waiting)} devices not done, "
                     f"{sum(len(d.inflight) for d in waiting)} PUBLISHes unacknowledged")
        conn.send(("done", [d.report for d in devices], worker.ack_latencies, note))
        while (await inbox.get())[0] != "stop":
            pass
    finally:
        for dev in devices:
            dev.stop()
        await asyncio.sleep(0.05)  # let the DISCONNECTs out


# ---------------------------------------------------------------------------------------------
# The member (in the benchmark's process)


class _Member:
    """Counts and times the events received by the WebSocket member."""

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
        res = self.res
        res.received += 1
        res.last_event_at = now
        self.progress = time.monotonic()
        seq = f.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                res.seq_disorder += 1
            self.last_seq = seq
        try:
            d = self.ids[f["from"]["client_id"]]
            data = f["data"]
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


async def _read_member(ws: ClientConnection, member: _Member, finished: asyncio.Event) -> None:
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


# ---------------------------------------------------------------------------------------------
# The worker processes, seen from the benchmark


class _Proc:
    """One client process and its pipe."""

    def __init__(self, ctx: Any, cfg: IngestConfig, port: int, indices: list[int]) -> None:
        self.conn, child = ctx.Pipe()
        self.indices = indices
        self.proc = ctx.Process(target=_worker_main, args=(child, cfg, port, SECRET, indices),
                                daemon=True, name="bench-ingest-devices")
        self.proc.start()
        child.close()
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.ready: tuple[Any, ...] | None = None
        self.done: tuple[Any, ...] | None = None
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self.inbox.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            self.inbox.put_nowait(("gone",))

    async def expect(self, kinds: tuple[str, ...], timeout: float) -> tuple[Any, ...]:
        while True:
            msg = await asyncio.wait_for(self.inbox.get(), timeout)
            if msg[0] in (*kinds, "failed", "gone"):
                return msg

    def send(self, *msg: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(msg)

    def close(self, notes: list[str]) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.send("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            notes.append(f"device process {self.proc.pid} did not exit 5 s after stop: killed")
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


async def _measure(res: IngestResult, url: str, port: int, probe: Any,
                   worker_pids: list[int]) -> None:
    cfg = res.config
    n = max(1, min(cfg.workers, cfg.devices))
    ctx = multiprocessing.get_context("spawn")
    procs: list[_Proc] = []
    ws: ClientConnection | None = None
    reader: asyncio.Task[None] | None = None
    finished = asyncio.Event()
    try:
        ws = await asyncio.wait_for(_open_member(url), SETUP_TIMEOUT_S)
        member = _Member(res)
        for w in range(n):
            procs.append(_Proc(ctx, cfg, port, list(range(w, cfg.devices, n))))
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
        reader = asyncio.create_task(_read_member(ws, member, finished))
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
        if ws is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.close(), 10)
            ws.transport.abort()


# ---------------------------------------------------------------------------------------------
# The node process (as in bench.fanout)


_BANNER = ("rtnode bench ready", "  http ", "  websocket ", "  nats ", "  dev token ",
           "  mqtt ", "rtnode bench stopped")


_COUNTERS = (
    "rtnode_published", "rtnode_events_in", "rtnode_events_delivered", "rtnode_live_dropped",
    "rtnode_gap_repairs", "rtnode_events_replayed", "rtnode_slow_consumer_disconnects",
    "rtnode_rate_limited", "rtnode_jetstream_retries", "rtnode_jetstream_errors",
    "rtnode_mqtt_uplinks", "rtnode_mqtt_refused_publishes", "rtnode_mqtt_bad_payloads",
)


def _scrape(base: str) -> dict[str, float]:
    status, body = _http_get(base + "/metrics", timeout=5)
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
        if metric in _COUNTERS:
            out[metric] = number
        elif metric in ("rtnode_actor_overflows", "rtnode_actor_failures",
                        "rtnode_actor_restarts") and number:
            out[metric + brace + labels] = number
    return out


def run_ingest(cfg: IngestConfig) -> IngestResult:
    """Start a node subprocess, measure device ingest through it, stop it."""
    res = IngestResult(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="rtnode-bench-ingest-"))
    log_path = tmp / "node.log"
    http_port, mqtt_port = free_port(), free_port()
    cmd = [sys.executable, *(["-O"] if cfg.node_optimize else []), "-m", "node", "run",
           "--http-port", str(http_port), "--mqtt-port", str(mqtt_port),
           "--data-dir", str(tmp / "data"), "--node-name", "bench",
           "--rate-per-s", "1000000", "--rate-burst", "1000000",
           "--max-errors-per-min", "1000000", "--slow-consumer-bytes", "67108864",
           "--log-level", "warning"]
    if cfg.payload_bytes + 1024 > 60_000:
        cmd += ["--max-frame-bytes", str(2 * (cfg.payload_bytes + 1024))]
    env = {**os.environ, "RTNODE_JWT_SECRET": SECRET}
    base = f"http://127.0.0.1:{http_port}"
    proc: subprocess.Popen[bytes] | None = None
    notes: list[str] = []
    stop_at: int | None = None
    try:
        proc = _spawn(cmd, log_path, env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _http_get(base + "/readyz")[0] != 200:
            if proc.poll() is not None:
                res.error = f"node exited with {proc.returncode} before /readyz was 200"
                return res
            if time.monotonic() > deadline:
                res.error = f"node not ready after {READY_TIMEOUT_S:.0f} s"
                return res
            time.sleep(0.1)
        node_pid = proc.pid
        kids = {pid: _cmdline(pid) for pid in _children_of(node_pid)}
        workers: list[int] = []

        def probe() -> dict[str, float]:
            out = {"node": _cpu_seconds(node_pid)}
            for pid, kcmd in kids.items():
                name = "nats-server" if "nats-server" in kcmd else f"node child {pid}"
                out[name] = out.get(name, 0.0) + _cpu_seconds(pid)
            out["member (benchmark process)"] = time.process_time()
            out[f"device processes ({len(workers)})"] = sum(_cpu_seconds(p) for p in workers)
            return out

        _run_loop(_measure(res, f"ws://127.0.0.1:{http_port}/ws", mqtt_port, probe, workers))
        res.server_counters = _scrape(base)
    finally:
        if proc is not None:
            stop_at = _size(log_path)
            _stop(proc, "node", notes)
        res.server_log = _log_lines(log_path, 0, stop_at)
        res.shutdown_log = [*_log_lines(log_path, stop_at or _size(log_path)), *notes]
        shutil.rmtree(tmp, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------
# Report


def _pct(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def _ranges(indices: list[int]) -> str:
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


def _accounting(res: IngestResult) -> tuple[list[str], dict[str, int]]:
    """Lost (PUBACKed, never received), unacked but received, and per-device detail."""
    cfg = res.config
    totals = Counter(lost=0, unacked_received=0, unsent=0, unacked_lost=0)
    lines: list[str] = []
    by_index = {d.index: d for d in res.devices}
    for k in range(cfg.devices):
        dev = by_index.get(k)
        seen = res.seen[k] if k < len(res.seen) else bytearray(cfg.events_per_device)
        acked = dev.acked if dev else bytearray(cfg.events_per_device)
        sent = dev.sent if dev else 0
        lost = [i for i in range(cfg.events_per_device) if acked[i] and not seen[i]]
        unacked_rx = [i for i in range(cfg.events_per_device) if seen[i] and not acked[i]]
        unacked_lost = [i for i in range(sent) if not seen[i] and not acked[i]]
        dups = [i for i in range(cfg.events_per_device) if seen[i] > 1]
        totals["lost"] += len(lost)
        totals["unacked_received"] += len(unacked_rx)
        totals["unacked_lost"] += len(unacked_lost)
        totals["unsent"] += cfg.events_per_device - sent
        parts = []
        if lost:
            parts.append(f"PUBACKed but never received: i={_ranges(lost)} ({len(lost)})")
        if dups:
            parts.append(f"received more than once: i={_ranges(dups)} ({len(dups)})")
        if cfg.qos and unacked_rx:
            parts.append(f"received without PUBACK: i={_ranges(unacked_rx)} "
                         f"({len(unacked_rx)})")
        if unacked_lost and cfg.qos:
            parts.append(f"sent, neither PUBACKed nor received: i={_ranges(unacked_lost)}")
        if dev is not None and dev.closed:
            parts.append(f"closed early ({dev.closed})")
        if dev is not None and dev.dup_acks:
            parts.append(f"{dev.dup_acks} PUBACKs for no packet in flight")
        if dev is not None and dev.unexpected:
            parts.append("unexpected packets: " + ", ".join(
                f"{k2} x{v}" for k2, v in dev.unexpected.items()))
        if dev is None:
            parts.append("no report from its process")
        if parts and len(lines) < 20:
            lines.append(f"  device {k}: " + "; ".join(parts))
        elif parts:
            totals["more"] = totals.get("more", 0) + 1
    if totals.get("more"):
        lines.append(f"  ... and {totals['more']} more devices")
    return lines, dict(totals)


def report(res: IngestResult) -> None:
    """Print the figures of one run."""
    cfg = res.config
    lat = sorted(res.latencies)
    acks = sorted(res.ack_latencies)
    print()
    print(f"device ingest (embedded MQTT listener, QoS {cfg.qos}): {cfg.devices} devices x "
          f"{cfg.events_per_device} events = {cfg.expected} events, {cfg.payload_bytes}-byte "
          f"pad, window {cfg.window} per device, {max(1, min(cfg.workers, cfg.devices))} "
          f"device processes, 1 WebSocket member (json)")
    print(f"machine: {platform.system()} {platform.machine()}, os.cpu_count() = "
          f"{os.cpu_count()}; the node, its nats-server, the member and the device processes "
          f"share these cores")
    print(f"reproduce: python -m bench ingest {cfg.args()}")
    print()
    if res.error:
        print(f"  run failed: {res.error}")
    lines, totals = _accounting(res) if not res.error else ([], {})
    print(f"  sent {res.sent}, PUBACKed {res.acked}, received by the member "
          f"{res.distinct} distinct of {cfg.expected} ({res.received} event frames)")
    print(f"  end to end: {res.rate:,.0f} events/s over {res.elapsed:.2f} s "
          f"(first PUBLISH -> last event at the member)")
    if cfg.qos:
        span = res.last_ack - res.t0 if res.t0 else 0.0
        print(f"  stored:     {res.stored_rate:,.0f} events/s (PUBACKs) over {span:.2f} s")
    print(f"  publish -> deliver ms: p50 {_ms(_pct(lat, 0.5))}, p99 {_ms(_pct(lat, 0.99))}, "
          f"max {_ms(lat[-1] if lat else None)} ({len(lat)} samples)")
    if cfg.qos:
        print(f"  publish -> PUBACK ms:  p50 {_ms(_pct(acks, 0.5))}, p99 "
              f"{_ms(_pct(acks, 0.99))}, max {_ms(acks[-1] if acks else None)} "
              f"({len(acks)} samples)")
    if totals:
        what = "PUBACKed but never received" if cfg.qos else "sent but never received"
        lost = totals["lost"] if cfg.qos else totals["unacked_lost"]
        print(f"  lost ({what}): {lost}; duplicates at the member: {res.duplicates}"
              + (f"; received without PUBACK: {totals['unacked_received']}" if cfg.qos else "")
              + (f"; never sent: {totals['unsent']}" if totals["unsent"] else ""))
    if res.cpu:
        used = ", ".join(f"{k} {v:.2f} s" for k, v in res.cpu.items())
        print(f"  CPU during the measurement ({res.cpu_wall:.2f} s wall x {os.cpu_count()} "
              f"cores): {used}")
    out: list[str] = []
    if res.server_counters:
        out.append("node counters: " + ", ".join(
            f"{k.removeprefix('rtnode_')}={v:.0f}" for k, v in res.server_counters.items()))
    if res.timed_out:
        out.append(f"timed out after {cfg.timeout_s:g} s: partial counts")
    if res.stalled:
        out.append(f"{res.stalled}: partial counts")
    if lines:
        out.append("per device:")
        out.extend(lines)
    if res.foreign:
        out.append(f"{res.foreign} events at the member not from a bench device or unreadable")
    if res.device_disorder:
        out.append(f"{res.device_disorder} events of a device arrived after a later one of the "
                   f"same device (the window pipelines PUBLISHes)")
    if res.seq_disorder:
        out.append(f"{res.seq_disorder} events arrived with a seq not above the previous one "
                   f"(PROTOCOL.md section 2: strictly increasing)")
    if res.member_other:
        out.append("non-event frames at the member: "
                   + ", ".join(f"{k} x{v}" for k, v in res.member_other.most_common()))
    out.extend(f"member frame: {n}" for n in res.member_notes)
    if res.member_closed:
        out.append(f"member connection closed early: {res.member_closed}")
    out.extend(res.worker_notes)
    for log_lines, when in ((res.server_log, "until stopped"),
                            (res.shutdown_log, "while stopping")):
        if log_lines:
            shown = "" if len(log_lines) <= 40 else ", last 40 shown"
            out.append(f"node output {when} ({len(log_lines)} lines{shown}):")
            out.extend(f"  | {line[:300]}" for line in log_lines[-40:])
    for line in out:
        print(f"  {line}")


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
    signal.signal(signal.SIGTERM, _terminated)
    try:
        res = run_ingest(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    report(res)
    return 1 if res.error else 0
