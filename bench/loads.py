"""Rooms of two members, every member publishing; the clients in processes of their own.

- :func:`rooms`: R rooms of two members, every member publishing for ``seconds`` within a
  window of ``window`` events not yet received by its peer; then a bounded drain. Gives
  events/s stored (rtnode's ``published`` replies) and delivered to the peer, publish ->
  deliver latency, and what was lost (stored, or for the baseline sent, and never received by
  the peer) or received twice.

The server is an rtnode node (``rtnode=True``: the v1 protocol, JSON) or
``bench.baseline_server`` (the request path is the room; messages forwarded unchanged).
:func:`rooms` takes a ``probe`` for the server's CPU seconds, and never raises on figures:
failures are in the result's ``errors``. Every step is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.exceptions import InvalidHandshake, InvalidState

from bench.fanout_subscriber import Subscriber
from bench.procs import SETUP_TIMEOUT_S, ClientProcs, die_with_parent, run_loop
from bench.report import pct
from node.protocol.tokens import mint_token

__all__ = ["RoomsResult", "rooms"]

OPEN_CONCURRENCY = 64
DRAIN_S = 30.0
LATENCY_SAMPLES = 20_000  # per client process

# The frames a member receives most, as the node writes them (compact JSON, ``type`` first,
# ``data`` as the publisher wrote it) and as the baseline forwards them: read with a regex,
# ``json.loads`` costing the load generator more CPU per event than the rest of its work.
_PUBLISHED_START = '{"type":"published",'
_PUBLISHED_RE = re.compile(r'\{"type":"published",.*"id":(\d+)[,}]')
_EVENT_START = '{"type":"event",'
_BASELINE_START = '{"data":'
_DATA_RE = re.compile(r'"data":\{"m":(\d+),"i":(\d+),"t":([-+0-9.eE]+)\}')


# ---------------------------------------------------------------------------------------------
# Client processes


async def _open(url: str, rtnode: bool, secret: str, sub: str, room: str) -> Subscriber:
    """One member, connected and joined (rtnode) or in its room (baseline)."""
    if not rtnode:
        ws = await Subscriber.open(f"{url}/{room}", None, SETUP_TIMEOUT_S)
        try:
            await asyncio.wait_for(ws.recv(), SETUP_TIMEOUT_S)  # {"type":"joined"}
        except BaseException:
            ws.abort()
            raise
        return ws
    ws = await Subscriber.open(url, "rtnode.v1.json", SETUP_TIMEOUT_S)
    try:
        tok = mint_token(secret, sub=sub, rooms={"bench-*": ["join", "publish"]})
        ws.send(json.dumps({"type": "connect", "id": "c", "token": tok}) + "\n"
                + json.dumps({"type": "join", "id": "j", "room": room}))
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while True:
            msg = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            for line in str(msg).split("\n"):
                f = json.loads(line) if line else {}
                if f.get("id") == "j" or f.get("type") == "disconnect":
                    if f.get("type") != "joined":
                        raise RuntimeError(f"join answered {line[:200]}")
                    return ws
    except BaseException:
        ws.abort()
        raise


@dataclass
class _Member:
    ws: Subscriber
    room: str
    me: int  # 0 or 1 within the room
    sent: int = 0
    acked: bytearray = field(default_factory=bytearray)  # 1 stored, 2 refused
    refused: int = 0
    seen: bytearray = field(default_factory=bytearray)  # the peer's events received
    received: int = 0  # distinct events of the peer received
    echoes: int = 0
    duplicates: int = 0
    peer: _Member | None = None
    last_recv: float = 0.0
    first_send: float = 0.0
    last_ack: float = 0.0
    closed: str | None = None


class _Client:
    """The client process: its connections, and the commands it gets on its pipe.

    While the rooms run, nothing waits in a task: each message is handled in its connection's
    read callback (:class:`~bench.fanout_subscriber.Subscriber`), and a member publishes its
    next event from there as soon as its window has room (its peer received one of its
    events, or one was refused). With websockets' asyncio client (a reader and a publisher
    task per member) the load generator spent about as much CPU per event as the node, on
    the two cores they share."""

    def __init__(self, conn: Connection, url: str, rtnode: bool, secret: str) -> None:
        self.conn, self.url, self.rtnode, self.secret = conn, url, rtnode, secret
        self.members: list[_Member] = []
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.n_errors = 0
        self.progress = asyncio.Event()  # set on every event received
        self.until = 0.0  # members publish until then
        self.window = 1
        self.stride = 7

    def _error(self, text: str) -> None:
        self.n_errors += 1
        if len(self.errors) < 3:
            self.errors.append(text)

    async def open_rooms(self, rooms: list[int]) -> None:
        sem = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def one(r: int, me: int) -> _Member | None:
            async with sem:
                try:
                    ws = await _open(self.url, self.rtnode, self.secret, f"bench-m-{r}-{me}",
                                     f"bench-r{r}")
                except (OSError, TimeoutError, ConnectionError, RuntimeError, ValueError,
                        InvalidHandshake) as exc:
                    self._error(f"room {r} member {me}: {exc!r}"[:200])
                    return None
                return _Member(ws, f"bench-r{r}", me)

        got = await asyncio.gather(*(one(r, me) for r in rooms for me in (0, 1)))
        for a, b in zip(got[0::2], got[1::2], strict=True):
            if a is not None and b is not None:
                a.peer, b.peer = b, a
                self.members += [a, b]
            else:
                for m in (a, b):
                    if m is not None:
                        m.ws.abort()

    def _message(self, m: _Member, msg: str | bytes, now: float) -> None:
        """Every frame of a message: the usual ones (``published``, the events) read with a
        regex, anything else, or a usual one the regex does not read, with ``json.loads``."""
        rtnode = self.rtnode
        for line in str(msg).split("\n"):
            if not line:
                continue
            if line.startswith(_PUBLISHED_START):
                hit = _PUBLISHED_RE.match(line)
                if hit is not None and rtnode:
                    self._published(m, int(hit[1]), now)
                    continue
            elif line.startswith(_EVENT_START if rtnode else _BASELINE_START):
                hit = _DATA_RE.search(line)
                if hit is not None:
                    self._event(m, int(hit[1]), int(hit[2]), float(hit[3]), now)
                    continue
            self._frame(m, line, now)

    def _frame(self, m: _Member, line: str, now: float) -> None:
        f = json.loads(line)
        kind = f.get("type")
        if kind == "published" and self.rtnode:
            self._published(m, f["id"], now)
        elif kind == "event" or (not self.rtnode and "data" in f):
            d = f["data"]
            self._event(m, d["m"], d["i"], d["t"], now)
        elif kind in ("error", "disconnect"):
            i = f.get("id")
            if isinstance(i, int) and 0 <= i < len(m.acked) and not m.acked[i]:
                m.acked[i] = 2  # refused (not stored): its slot is free again
                m.refused += 1
                self.progress.set()
                self._fill(m)
            self._error(f"{m.room}: {line[:200]}")

    def _published(self, m: _Member, i: int, now: float) -> None:
        if 0 <= i < len(m.acked):
            m.acked[i] = 1
        m.last_ack = now

    def _event(self, m: _Member, sender: int, i: int, t: float, now: float) -> None:
        if sender == m.me:
            m.echoes += 1
            return
        if i >= len(m.seen):
            m.seen.extend(bytes(max(i + 1 - len(m.seen), 4096)))
        if m.seen[i]:
            m.duplicates += 1
            return
        m.seen[i] = 1
        m.received += 1
        m.last_recv = now
        if i % self.stride == 0 and len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(now - t)
        self.progress.set()
        peer = m.peer
        assert peer is not None
        self._fill(peer)  # its window has room again

    def _fill(self, m: _Member) -> None:
        """Publish ``m``'s next events while its window has room and its time is not over."""
        peer = m.peer
        assert peer is not None
        if m.closed is not None:
            return
        room, me, rtnode, window = m.room, m.me, self.rtnode, self.window
        while m.sent - peer.received - m.refused < window:
            t = time.time()
            if t >= self.until:
                return
            if not m.first_send:
                m.first_send = t
            i = m.sent
            if i >= len(m.acked):
                m.acked.extend(bytes(4096))
            # What json.dumps writes for these keys and values (floats as repr), for less.
            data = f'{{"m":{me},"i":{i},"t":{t!r}}}'
            frame = (f'{{"type":"publish","id":{i},"room":"{room}","event":"m","data":{data}}}'
                     if rtnode else f'{{"data":{data}}}')
            try:
                m.ws.send(frame)
            except InvalidState:  # closing: said by its close code once it has closed
                return
            m.sent = i + 1

    def _ended(self, m: _Member) -> None:
        if m.closed is None:
            m.closed = f"{m.ws.close_code} {m.ws.close_reason or ''}".strip()

    async def run_rooms(self, seconds: float, window: int, go_at: float) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, go_at - time.time()))
        self.until, self.window = go_at + seconds, window
        for m in self.members:
            m.ws.stream(lambda msg, now, m=m: self._message(m, msg, now))
            m.ws.closed.add_done_callback(lambda _, m=m: self._ended(m))
        for m in self.members:
            self._fill(m)
        # From here on the members publish from their read callbacks, until self.until.
        await asyncio.sleep(max(0.0, self.until - time.time()))
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and any(self._pending(m) for m in self.members):
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), 0.2)
        await asyncio.sleep(0.2)  # stray duplicates
        ms = self.members
        return {
            "sent": sum(m.sent for m in ms),
            "acked": sum(m.acked[:m.sent].count(1) for m in ms),
            "refused": sum(m.refused for m in ms),
            "delivered": sum(m.received for m in ms),
            "duplicates": sum(m.duplicates for m in ms),
            "echoes": sum(m.echoes for m in ms),
            "lost": sum(self._owed(m) for m in ms),
            "unacked": (sum(m.acked[:m.sent].count(0) for m in ms) if self.rtnode else 0),
            "first_send": min((m.first_send for m in ms if m.first_send), default=0.0),
            "last_recv": max((m.last_recv for m in ms), default=0.0),
            "last_ack": max((m.last_ack for m in ms), default=0.0),
            "closed": sum(1 for m in ms if m.closed),
            "latencies": self.latencies,
        }

    def _pending(self, m: _Member) -> bool:
        """Has ``m`` sent an event that its peer has not received, or (rtnode) that is not
        acknowledged yet?"""
        seen = m.peer.seen if m.peer is not None else bytearray()
        acked = m.acked
        if not self.rtnode:
            return any(i >= len(seen) or not seen[i] for i in range(m.sent))
        return any(acked[i] == 0 or (acked[i] == 1 and (i >= len(seen) or not seen[i]))
                   for i in range(m.sent))

    def _owed(self, m: _Member) -> int:
        """Events of ``m`` stored (rtnode) or sent (baseline) that its peer has not received."""
        peer = m.peer
        assert peer is not None
        seen = peer.seen
        owed = m.acked if self.rtnode else None
        return sum(1 for i in range(m.sent)
                   if (owed is None or owed[i] == 1) and (i >= len(seen) or not seen[i]))

    async def close(self) -> None:
        conns = [m.ws for m in self.members]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.close() for c in conns),
                                                  return_exceptions=True), 10)
        for c in conns:
            c.abort()
        self.members = []

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, self.conn.recv)
            self.errors, self.n_errors = [], 0
            if msg[0] == "rooms":
                await self.open_rooms(msg[1])
                self.conn.send(("ready", len(self.members) // 2, self.n_errors, self.errors))
            elif msg[0] == "go":
                out = await self.run_rooms(msg[1], msg[2], msg[3])
                self.conn.send(("done", out, self.n_errors, self.errors))
            elif msg[0] == "close":
                await self.close()
                self.conn.send(("closed",))
            else:
                await self.close()
                return


def _client_main(conn: Connection, url: str, rtnode: bool, secret: str) -> None:
    die_with_parent()
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        run_loop(_Client(conn, url, rtnode, secret).serve())


# ---------------------------------------------------------------------------------------------
# The measurements


Probe = Callable[[], dict[str, float]]


@dataclass
class RoomsResult:
    """Rooms of two, every member publishing."""

    rooms: int = 0
    seconds: float = 0.0
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    unacked: int = 0  # rtnode: sent, never acknowledged (nor refused) after the drain
    refused: int = 0  # rtnode: answered with an error (not stored, retry)
    echoes: int = 0
    closed: int = 0
    span_s: float = 0.0  # first send -> last delivery
    ack_span_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    load_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.delivered / self.span_s if self.span_s else 0.0

    @property
    def stored_rate(self) -> float:
        return self.acked / self.ack_span_s if self.ack_span_s else 0.0

    def percentiles(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        out = {q: pct(lat, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99),
                                            ("p99.9", 0.999))}
        out["max"] = lat[-1] if lat else None
        return {k: v * 1000 for k, v in out.items() if v is not None}


def rooms(url: str, rtnode: bool, secret: str, n_rooms: int, seconds: float, window: int,
          procs: int, cpu: Probe, log: Callable[[str], None]) -> RoomsResult:
    """``n_rooms`` rooms of two members, every member publishing for ``seconds``."""
    res = RoomsResult(rooms=n_rooms, seconds=seconds)
    clients = ClientProcs(procs, _client_main, lambda _: (url, rtnode, secret))
    try:
        replies = clients.ask([("rooms", list(range(j, n_rooms, procs))) for j in range(procs)],
                              SETUP_TIMEOUT_S + n_rooms / 20)
        ready = sum(r[1] for r in replies)
        for r in replies:
            res.errors += [f"{r[2]} members failed: {'; '.join(r[3])}"] if r[2] else []
        res.rooms = ready
        log(f"    {ready} rooms ready ({2 * ready} members); publishing for {seconds:g} s")
        go_at = time.time() + 0.5
        c0, l0 = cpu(), clients.cpu()
        done = clients.ask([("go", seconds, window, go_at) for _ in range(procs)],
                           seconds + DRAIN_S + 30)
        c1 = cpu()
        res.load_cpu = clients.cpu() - l0
        res.cpu = {k: v - c0.get(k, 0.0) for k, v in c1.items()}
        outs = [d[1] for d in done]
        for d in done:
            res.errors += [f"{d[2]} errors: {'; '.join(d[3])}"] if d[2] else []
        for key in ("sent", "acked", "delivered", "duplicates", "lost", "unacked", "refused",
                    "echoes", "closed"):
            setattr(res, key, sum(o[key] for o in outs))
        first = min((o["first_send"] for o in outs if o["first_send"]), default=0.0)
        last = max(o["last_recv"] for o in outs)
        last_ack = max(o["last_ack"] for o in outs)
        res.span_s = last - first if first and last > first else 0.0
        res.ack_span_s = last_ack - first if first and last_ack > first else 0.0
        res.latencies = [x for o in outs for x in o["latencies"]]
        clients.ask([("close",)] * procs, 30)
    except (TimeoutError, OSError, EOFError) as exc:
        res.errors.append(f"stopped: {exc}")
    finally:
        clients.stop()
    return res
