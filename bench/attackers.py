"""Hostile clients of the fuzz and flood benchmarks, in worker processes of their own.

An attacker is one client that keeps attacking: it sends what :class:`HostileFrames` draws on
its door (WebSocket JSON or CBOR, the MQTT tunnel, plain uplinks, or half-open sockets), reads
what the node answers, and when the node closes it, opens a new connection and goes on, until
its worker's frame budget or deadline is spent. Each waits, after a window of frames, until
the node has read them (a ``ping`` answered by ``pong``, a QoS 1 PUBLISH answered by PUBACK):
the frames counted as sent are at most one window ahead of what the node has read.
:class:`AttackProcess` runs a list of attackers in a separate process (``spawn``) and hands
back their :class:`AttackStats`.

Kinds (``AttackerSpec.kind``):

- ``ws-json``, ``ws-cbor``: a mix of everything: malformed messages, hostile frames, forged
  tokens and frames before ``connect``, oversized frames, join/leave churn, request floods and
  publishes beyond the rate.
- ``mqtt-tunnel``, ``mqtt-uplink``: a device (a raw MQTT 3.1.1 client, so that malformed
  topics get out too) publishing hostile payloads to its tunnel
  (``rtnode/v1/<client_id>/in``) or to ``rooms/<room>/up``, and now and then logging in with a
  forged token.
- ``half-open``: TCP connections to the HTTP and MQTT ports that send half a request head or
  half a CONNECT and then nothing.
- ``churn``, ``oversized``, ``malformed``, ``requests``: one thing only, over WebSocket (the
  flood measurement's four kinds of hostile connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from bench.hostile_frames import HostileFrames, encode
from bench.ingest_devices import read_packet
from bench.procs import die_with_parent
from node.protocol.frames import CBOR, JSON
from node.protocol.tokens import mint_token

__all__ = ["FUZZ_KINDS", "AttackProcess", "AttackStats", "AttackerSpec", "Target",
           "run_attackers"]

FUZZ_KINDS = ("ws-json", "ws-cbor", "mqtt-tunnel", "mqtt-uplink", "half-open")
OPEN_TIMEOUT_S = 10.0
HALF_OPEN_HOLD_S = 8.0  # a half-open socket is given up after this long if the node holds it
ERROR_PAUSE_S = 0.05  # after a refused connection attempt, before the next one
WS_WINDOW = 8  # WebSocket messages between two pings whose pongs pace the attacker
MQTT_WINDOW = 10  # QoS 0 PUBLISHes per QoS 1 one (whose PUBACK paces the attacker)
ATTACKER_NICE = 19  # attacker processes take the CPU only when the node and members leave it
SHARES = {"ws-json": 3, "ws-cbor": 3, "mqtt-tunnel": 2, "mqtt-uplink": 2}  # of the budget


@dataclass(frozen=True)
class Target:
    """Where the attackers go and what they know."""

    http_port: int
    mqtt_port: int
    secret: str
    max_frame_bytes: int = 65536

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"


@dataclass(frozen=True)
class AttackerSpec:
    """One attacker: its kind and its seed (the same seed sends the same frames)."""

    kind: str
    seed: int


@dataclass
class AttackStats:
    """What a worker's attackers did and what the node answered."""

    sent: Counter[str] = field(default_factory=Counter)  # frames sent, by attacker kind
    replies: Counter[str] = field(default_factory=Counter)  # "error 4000", "joined", ...
    closes: Counter[str] = field(default_factory=Counter)  # how the node ended connections
    connections: int = 0  # connections opened (a refused attempt counts in ``closes``)
    failures: list[str] = field(default_factory=list)  # an attacker's own bug, reported

    def add(self, other: AttackStats) -> None:
        self.sent.update(other.sent)
        self.replies.update(other.replies)
        self.closes.update(other.closes)
        self.connections += other.connections
        self.failures += other.failures

    @property
    def frames(self) -> int:
        return sum(self.sent.values())


class _Budget:
    """The frames a worker's attackers send (at least), shared among their kinds by
    :data:`SHARES`, and until when. Half-open sockets are few and slow: they go on until every
    other kind is done, outside the budget."""

    def __init__(self, frames: int, deadline: float, kinds: set[str]) -> None:
        weights = {k: SHARES.get(k, 1) for k in kinds if k != "half-open"}
        total = sum(weights.values()) or 1
        self.share = {k: -(-frames * w // total) for k, w in weights.items()}
        self.sent: Counter[str] = Counter()
        self.deadline = deadline

    def spent(self, kind: str) -> bool:
        if time.monotonic() >= self.deadline:
            return True
        if kind in self.share:
            return self.sent[kind] >= self.share[kind]
        return all(self.sent[k] >= n for k, n in self.share.items())


class _Attacker:
    """One attacker's state: its door, its draws, the stats it adds to."""

    def __init__(self, spec: AttackerSpec, index: int, target: Target, budget: _Budget,
                 stats: AttackStats) -> None:
        self.spec = spec
        self.index = index
        self.target = target
        self.budget = budget
        self.stats = stats
        self.rng = random.Random(spec.seed)
        self.draw = HostileFrames(self.rng, target.secret, target.max_frame_bytes)
        self.codec = "cbor" if spec.kind == "ws-cbor" else "json"
        self.conn_no = 0
        self.ping_id = ""  # the pong awaited (WebSocket)
        self.ponged = asyncio.Event()

    def sent(self, n: int = 1) -> None:
        self.stats.sent[self.spec.kind] += n
        self.budget.sent[self.spec.kind] += n

    @property
    def spent(self) -> bool:
        return self.budget.spent(self.spec.kind)

    async def run(self) -> None:
        kind = self.spec.kind
        loop: Callable[[], Awaitable[None]] = {
            "mqtt-tunnel": self._mqtt_session, "mqtt-uplink": self._mqtt_session,
            "half-open": self._half_open,
        }.get(kind, self._ws_session)
        while not self.spent:
            try:
                await loop()
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                self.stats.closes[f"{type(exc).__name__}"] += 1
                await asyncio.sleep(ERROR_PAUSE_S)
            except Exception as exc:  # a bug of the attacker's own: reported, the attack goes on
                self.stats.failures.append(f"{self.spec.kind} attacker: {exc!r}"[:300])
                await asyncio.sleep(ERROR_PAUSE_S)

    # -- WebSocket

    async def _ws_session(self) -> None:
        self.conn_no += 1
        # One identity per attacker, as a hostile client holds one token and reconnects with it
        # (the node's per-user limits see through reconnects; new identities need new tokens).
        sub = f"fuzz-{self.spec.seed % 10_000}-{self.index}"
        try:
            ws = await connect(self.target.ws_url,
                               subprotocols=[Subprotocol(f"rtnode.v1.{self.codec}")],
                               max_size=None, compression=None, ping_interval=None,
                               open_timeout=OPEN_TIMEOUT_S, close_timeout=1)
        except AssertionError:
            # websockets 15 asserts when the node's 503 and FIN (a refusal at accept) arrive
            # while it is still sending its request: a refused connection, not our bug.
            self.stats.closes["refused at accept"] += 1
            await asyncio.sleep(ERROR_PAUSE_S)
            return
        self.stats.connections += 1
        reader = asyncio.create_task(self._read(ws))
        try:
            await self._ws_attack(ws, sub)
        except ConnectionClosed:
            pass
        finally:
            if not reader.done():
                with contextlib.suppress(TimeoutError, ConnectionClosed):
                    await asyncio.wait_for(ws.close(), 2)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            code = ws.close_code if ws.close_code is not None else "none"
            self.stats.closes[f"close {code}"] += 1
            ws.transport.abort()

    async def _read(self, ws: ClientConnection) -> None:
        codec = CBOR if self.codec == "cbor" else JSON
        try:
            async for msg in ws:
                try:
                    frames = codec.decode(msg)
                except Exception:
                    self.stats.replies["<undecodable>"] += 1
                    continue
                for f in frames:
                    kind = f.get("type") if isinstance(f, dict) else "?"
                    if kind == "pong" and f.get("id") == self.ping_id:
                        self.ponged.set()
                        continue
                    if kind in ("error", "disconnect"):
                        kind = f"{kind} {f.get('code')}"
                    self.stats.replies[str(kind)] += 1
        except ConnectionClosed:
            pass
        finally:
            self.ponged.set()  # whoever waits for a pong: the connection is over

    async def _window_done(self, ws: ClientConnection) -> bool:
        """A ``ping`` after a window of frames; True once its ``pong`` says the node has read
        them all (a node's backlog is not counted as frames sent), False if it hung up."""
        self.ping_id = f"w{self.rng.randrange(1 << 60)}"
        self.ponged.clear()
        await ws.send(encode(self.codec, {"type": "ping", "id": self.ping_id}))
        try:
            await asyncio.wait_for(self.ponged.wait(), OPEN_TIMEOUT_S)
        except TimeoutError:
            self.stats.closes[f"no pong within {OPEN_TIMEOUT_S:.0f} s"] += 1
            return False
        return ws.close_code is None

    async def _send(self, ws: ClientConnection, *messages: str | bytes) -> bool:
        if self.spent:
            return False
        for m in messages:
            await ws.send(m)
        self.sent(len(messages))
        return True

    async def _connect(self, ws: ClientConnection, sub: str) -> None:
        tok = mint_token(self.target.secret, sub=sub, rpc=["user:*", "device:*", "server"],
                         rooms={"*": ["join", "publish", "history", "presence"]})
        await ws.send(encode(self.codec, {"type": "connect", "id": "c", "token": tok}))

    async def _ws_attack(self, ws: ClientConnection, sub: str) -> None:
        kind, draw, codec = self.spec.kind, self.draw, self.codec
        if kind.startswith("ws-") and self.rng.random() < 0.1:
            if await self._send(ws, encode(codec, draw.pre_connect())):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.wait_closed(), OPEN_TIMEOUT_S)
            return
        await self._connect(ws, sub)
        room = f"fuzz:{sub}"
        n = 0
        while not self.spent:
            messages = self._next(kind, room)
            if not await self._send(ws, *messages):
                return
            n += 1
            if n % WS_WINDOW == 0 and not await self._window_done(ws):
                return

    def _next(self, kind: str, room: str) -> list[str | bytes]:
        draw, codec = self.draw, self.codec
        if kind == "ws-json" or kind == "ws-cbor":
            kind = self.rng.choices(
                ("frame", "malformed", "oversized", "churn", "requests", "rate"),
                weights=(50, 15, 2, 13, 10, 10))[0]
        if kind == "frame":
            return [encode(codec, draw.frame())]
        if kind == "malformed":
            return [draw.malformed(codec)]
        if kind == "oversized":
            return [draw.oversized(codec)]
        if kind == "churn":
            return [encode(codec, f) for f in draw.churn()]
        if kind == "requests":
            return [encode(codec, draw.request(room))]
        return [encode(codec, draw.over_rate(room))]

    # -- MQTT

    async def _mqtt_session(self) -> None:
        """A device on a raw MQTT 3.1.1 connection: CONNECT (now and then with a forged
        token), then windows of QoS 0 PUBLISHes each closed by a QoS 1 one, until the node
        hangs up."""
        self.conn_no += 1
        dev = f"fuzz-dev-{self.spec.seed % 10_000}-{self.index}"
        forged = self.rng.random() < 0.1
        password = str(self.draw.token()) if forged else mint_token(
            self.target.secret, sub=dev, kind="device",
            rooms={"*": ["join", "publish", "history", "presence"]})
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.target.mqtt_port), OPEN_TIMEOUT_S)
        self.stats.connections += 1
        try:
            writer.write(_connect_packet(dev, password))
            self.sent()
            connack = await asyncio.wait_for(reader.readexactly(4), OPEN_TIMEOUT_S)
            if connack[0] != 0x20 or connack[3]:
                self.stats.closes[f"CONNACK refused ({connack[3]})"] += 1
                return
            pid = 0
            while not self.spent:
                # a window of QoS 0 PUBLISHes closed by a QoS 1 one: its PUBACK says the node
                # has read them all (a node's backlog is not counted as frames sent)
                pid = pid % 65535 + 1
                for k in range(MQTT_WINDOW):
                    writer.write(_publish_packet(*self._mqtt_message(dev),
                                                 pid if k == MQTT_WINDOW - 1 else 0))
                await writer.drain()
                if not await _puback(reader, pid):
                    self.stats.closes["mqtt closed by the node"] += 1
                    return
                self.sent(MQTT_WINDOW)
            self.stats.closes["mqtt closed by the attacker"] += 1
        except asyncio.IncompleteReadError:
            self.stats.closes["mqtt closed by the node before CONNACK"] += 1
        finally:
            writer.transport.abort()

    def _mqtt_message(self, dev: str) -> tuple[str, bytes]:
        if self.spec.kind == "mqtt-uplink":
            return self.draw.uplink()
        if self.rng.random() < 0.05:  # someone else's tunnel: refused
            return f"rtnode/v1/{dev}-other/in", self.draw.tunnel_payload()
        return f"rtnode/v1/{dev}/in", self.draw.tunnel_payload()

    # -- half-open sockets

    async def _half_open(self) -> None:
        """Half a request head (or half a CONNECT), then silence until the node hangs up."""
        if self.spent:
            return
        mqtt = self.rng.random() < 0.3
        port = self.target.mqtt_port if mqtt else self.target.http_port
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), OPEN_TIMEOUT_S)
        self.stats.connections += 1
        writer.write(b"\x10\x7f\x00\x04MQ" if mqtt else
                     b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        self.sent()
        try:
            data = await asyncio.wait_for(reader.read(), HALF_OPEN_HOLD_S)
            self.stats.closes["half-open closed by the node" if not data
                              else "half-open answered and closed"] += 1
        except TimeoutError:
            self.stats.closes[f"half-open still held after {HALF_OPEN_HOLD_S:.0f} s"] += 1
        except OSError:
            self.stats.closes["half-open reset by the node"] += 1
        finally:
            writer.transport.abort()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(text: str) -> bytes:
    """An MQTT string (a lone surrogate goes out as the invalid UTF-8 it is)."""
    data = text.encode("utf-8", "surrogatepass")[:65535]
    return len(data).to_bytes(2, "big") + data


def _connect_packet(client_id: str, password: str) -> bytes:
    """MQTT 3.1.1 CONNECT: user name and password, clean session, keep-alive off."""
    body = (_field("MQTT") + bytes((4, 0xC2)) + b"\x00\x00" + _field(client_id)
            + _field(client_id) + _field(password))
    return b"\x10" + _varint(len(body)) + body


def _publish_packet(topic: str, payload: bytes, pid: int = 0) -> bytes:
    """MQTT PUBLISH: QoS 1 with packet id ``pid``, else QoS 0."""
    body = _field(topic) + (pid.to_bytes(2, "big") if pid else b"") + payload
    return (b"\x32" if pid else b"\x30") + _varint(len(body)) + body


async def _puback(reader: asyncio.StreamReader, pid: int) -> bool:
    """Read packets until the PUBACK of ``pid`` (True), or the node hangs up (False)."""
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            while True:
                kind, body = await read_packet(reader)
                if kind == 4 and body[:2] == pid.to_bytes(2, "big"):
                    return True
    except (asyncio.IncompleteReadError, TimeoutError, OSError):
        return False


async def run_attackers(specs: list[AttackerSpec], target: Target, frames: int,
                        seconds: float, first_index: int = 0) -> AttackStats:
    """Run ``specs`` until ``frames`` are sent (all together) or ``seconds`` have passed."""
    stats = AttackStats()
    budget = _Budget(frames, time.monotonic() + seconds, {s.kind for s in specs})

    async def one(i: int, spec: AttackerSpec) -> None:
        try:
            await _Attacker(spec, first_index + i, target, budget, stats).run()
        except Exception as exc:  # an attacker's bug: reported, never hidden
            stats.failures.append(f"{spec.kind} attacker failed: {exc!r}")

    await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
    return stats


async def _attack_quietly(specs: list[AttackerSpec], target: Target, frames: int,
                          seconds: float, first_index: int) -> AttackStats:
    """:func:`run_attackers`, the client libraries' complaints about sockets the node closed
    under them counted instead of printed."""
    noise: Counter[str] = Counter()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        noise[type(exc).__name__ if exc else str(context.get("message"))[:60]] += 1

    asyncio.get_running_loop().set_exception_handler(handler)
    stats = await run_attackers(specs, target, frames, seconds, first_index)
    stats.closes.update({f"client library: {k}": v for k, v in noise.items()})
    return stats


def _worker_main(conn: Connection, specs: list[AttackerSpec], target: Target, frames: int,
                 seconds: float, first_index: int) -> None:
    """Entry point of an attacker process: report ``started``, attack, report ``done``."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Real attackers run on machines of their own: on a small box the attackers' own CPU must
    # not be what slows the node and the well-behaved clients down, so they yield the CPU.
    os.nice(ATTACKER_NICE)
    warnings.simplefilter("ignore")  # short HMAC keys of forged tokens, on purpose
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        conn.send(("started",))
        stats = runner(_attack_quietly(specs, target, frames, seconds, first_index))
        conn.send(("done", stats))
    except Exception as exc:  # reported, never hidden
        with contextlib.suppress(OSError):
            conn.send(("failed", f"attacker process failed: {exc!r}"))


class AttackProcess:
    """A worker process running some attackers, seen from the benchmark."""

    def __init__(self, ctx: Any, specs: list[AttackerSpec], target: Target, frames: int,
                 seconds: float, first_index: int) -> None:
        self.conn, child = ctx.Pipe()
        self.seconds = seconds
        self.proc = ctx.Process(target=_worker_main,
                                args=(child, specs, target, frames, seconds, first_index),
                                daemon=True, name="bench-attackers")
        self.proc.start()
        child.close()

    async def expect(self, kind: str, timeout: float) -> AttackStats | str | None:
        """Wait for the worker's ``kind`` message: its stats, or what went wrong (a str)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = await loop.run_in_executor(None, self.conn.poll, 0.5)
            if not ready:
                if not self.proc.is_alive():
                    return f"attacker process exited with {self.proc.exitcode}"
                continue
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                return f"attacker process exited with {self.proc.exitcode}"
            if msg[0] == kind:
                return msg[1] if len(msg) > 1 else None
            if msg[0] == "failed":
                return str(msg[1])
        return f"attacker process silent for {timeout:.0f} s"

    def close(self, notes: list[str]) -> None:
        self.proc.join(5)
        if self.proc.is_alive():
            notes.append(f"attacker process {self.proc.pid} still running: killed")
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()
