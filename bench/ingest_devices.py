"""The ingest benchmark's devices: a minimal MQTT 3.1.1 client on asyncio, in worker processes.

Each worker process (:class:`DeviceProcess`, from the benchmark's side) connects its share of
the devices (client id = username = device id, password = a device JWT), reports ``ready``,
publishes on ``go`` within each device's window of unacknowledged PUBLISHes, and reports its
:class:`DeviceReport` list and PUBACK latencies when done or told to ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import cbor2

from bench.nodes import SECRET
from bench.procs import SETUP_TIMEOUT_S, die_with_parent
from node.protocol.tokens import mint_token

__all__ = ["EVENT", "MAX_LATENCY_SAMPLES", "ROOM", "DeviceProcess", "DeviceReport",
           "IngestConfig", "connect_packet", "packet_at", "read_packet", "utf8", "varint"]

ROOM = "bench:ingest"
EVENT = "reading"
CONNACK_TIMEOUT_S = 10.0
DEVICE_STALL_S = 10.0  # a worker gives up when none of its devices got a PUBACK for this long
MAX_LATENCY_SAMPLES = 1_000_000


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


def watch_pipe(loop: asyncio.AbstractEventLoop, conn: Any, readable: Callable[[], None]) -> None:
    """Call ``readable`` when a message starts on the pipe ``conn``, which stays blocking.

    ``add_reader`` makes the descriptor non-blocking (uvloop's does), and a ``send`` or ``recv``
    of a message longer than the pipe holds (a report of a few thousand events) then fails
    midway with EAGAIN: the report was lost and the run said 0 events/s. Readiness only says a
    message starts; each is written and read whole.
    """
    loop.add_reader(conn.fileno(), readable)
    os.set_blocking(conn.fileno(), True)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next MQTT packet from ``reader``: (its type, its body).

    Raises:
        asyncio.IncompleteReadError: The connection ended first.
    """
    kind = (await reader.readexactly(1))[0] >> 4
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return kind, await reader.readexactly(length)


def packet_at(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """The body of the MQTT packet starting at ``buf[pos]`` and where the next one starts, or
    None while it is not all there."""
    size = len(buf)
    length, mult, j = 0, 1, pos + 1
    while j < size:
        length += (buf[j] & 0x7F) * mult
        mult *= 128
        j += 1
        if not buf[j - 1] & 0x80:
            break
    else:
        return None
    if size - j < length:
        return None
    return bytes(buf[j:j + length]), j + length


def connect_packet(client_id: str, password: str) -> bytes:
    # protocol name, level 4, flags: user name, password, clean session; keep-alive 0 (off)
    body = (utf8("MQTT") + bytes((4, 0xC2)) + (0).to_bytes(2, "big")
            + utf8(client_id) + utf8(client_id) + utf8(password))
    return b"\x10" + varint(len(body)) + body


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
        self.topic_field = utf8(topic)
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
        self.transport.write(connect_packet(self.client_id, self.token))

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
            whole = packet_at(buf, pos)
            if whole is None:
                break
            body, pos = whole
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
        index = self.report.index  # for a member that gets no sender with it (a baseline's)
        while i < events and (len(inflight) < limit if qos else len(out) < limit):
            payload = dumps({"event": EVENT, "data": {"t": now, "i": i, "d": index,
                                                      "pad": pad}})
            if qos:
                pid = i % 65535 + 1
                inflight[pid] = i
                out.append(first + varint(len(topic) + 2 + len(payload)) + topic
                           + pid.to_bytes(2, "big") + payload)
            else:
                out.append(first + varint(len(topic) + len(payload)) + topic + payload)
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
    die_with_parent(signal.SIGKILL)  # a Ctrl-C reaches the benchmark only, which stops us
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

    watch_pipe(loop, conn, readable)
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


class DeviceProcess:
    """One device worker process and its pipe, seen from the benchmark."""

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
        watch_pipe(loop, self.conn, self._readable)

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
