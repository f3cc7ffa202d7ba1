"""Well-behaved clients next to the attackers: rooms whose members must get every event.

:class:`WellBehaved` opens, per room, one publisher and some members (JSON and CBOR, over
WebSocket), publishes at a steady rate within the node's limits, and keeps what each member
receives: every event carries its index ``i`` and send time ``t``, so each member's latency,
lost, duplicated and reordered events and its longest silence are known. A room is *stuck*
when one of its members went :data:`STUCK_S` without an event while its publisher kept
publishing, or still lacks events once the publishing is over and the deliveries drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from bench.procs import SETUP_TIMEOUT_S
from node.protocol.frames import CBOR, JSON
from node.protocol.tokens import mint_token

__all__ = ["STUCK_S", "MemberStats", "WellBehaved"]

STUCK_S = 5.0
EVENT = "wb:tick"
RIGHTS = ["join", "publish", "history", "presence"]


@dataclass
class MemberStats:
    """What one member received."""

    room: str
    index: int
    seen: set[int] = field(default_factory=set)
    # (sent at, latency, of which the way into the node: until the node stamped the event's ts)
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    duplicates: int = 0
    out_of_order: int = 0
    last_i: int = -1
    arrivals: list[float] = field(default_factory=list)
    closed: str | None = None  # the node ended the connection (reported)


@dataclass
class _Room:
    name: str
    publisher: ClientConnection
    members: list[tuple[ClientConnection, MemberStats]]
    acked: set[int] = field(default_factory=set)
    sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)


def _codec(i: int) -> str:
    return "cbor" if i % 2 else "json"


async def _open(url: str, codec: str, secret: str, sub: str) -> ClientConnection:
    ws = await connect(url, subprotocols=[Subprotocol(f"rtnode.v1.{codec}")], max_size=None,
                       compression=None, ping_interval=None, open_timeout=SETUP_TIMEOUT_S)
    await _send(ws, codec, {"type": "connect", "id": "c",
                            "token": mint_token(secret, sub=sub, rooms={"wb:*": RIGHTS})})
    reply = await _reply(ws, codec, "c")
    if reply.get("type") != "connected":
        raise RuntimeError(f"well-behaved client {sub}: connect answered {reply}")
    return ws


async def _send(ws: ClientConnection, codec: str, frame: dict[str, Any]) -> None:
    if codec == "cbor":
        await ws.send(CBOR.encode(frame))
    else:
        await ws.send(json.dumps(frame, separators=(",", ":")))


def _decode(msg: str | bytes) -> list[Any]:
    return CBOR.decode(msg) if isinstance(msg, bytes) else JSON.decode(msg)


async def _reply(ws: ClientConnection, codec: str, rid: str) -> dict[str, Any]:
    while True:
        for f in _decode(await asyncio.wait_for(ws.recv(), SETUP_TIMEOUT_S)):
            if isinstance(f, dict) and (f.get("id") == rid or f.get("type") == "disconnect"):
                return f


class WellBehaved:
    """Rooms of well-behaved members and their publishers.

    Args:
        url: The node's WebSocket URL.
        secret: The node's HS256 secret.
        rooms: How many rooms.
        members: Members per room.
        rate_per_s: Events per second published in each room.
    """

    def __init__(self, url: str, secret: str, rooms: int = 3, members: int = 4,
                 rate_per_s: float = 20.0) -> None:
        self.url = url
        self.secret = secret
        self.n_rooms = rooms
        self.n_members = members
        self.rate = rate_per_s
        self.rooms: list[_Room] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.publishing: asyncio.Task[None] | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0
        self.progress = asyncio.Event()  # set on every event and every publisher's reply

    async def start(self) -> None:
        """Open every client and join; then publish in every room until :meth:`stop`."""
        for r in range(self.n_rooms):
            name = f"wb:room-{r}"
            members = []
            for m in range(self.n_members):
                ws = await _open(self.url, _codec(m), self.secret, f"wb-{r}-{m}")
                await _send(ws, _codec(m), {"type": "join", "id": "j", "room": name})
                reply = await _reply(ws, _codec(m), "j")
                if reply.get("type") != "joined":
                    raise RuntimeError(f"member {m} of {name}: join answered {reply}")
                members.append((ws, MemberStats(name, m)))
            pub = await _open(self.url, "json", self.secret, f"wb-{r}-publisher")
            room = _Room(name, pub, members)
            self.rooms.append(room)
            self.tasks.append(asyncio.create_task(self._read_acks(room)))
            self.tasks += [asyncio.create_task(self._read_member(ws, st)) for ws, st in members]
        self.started_at = time.time()
        self.publishing = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        period = 1.0 / self.rate
        i = 0
        next_at = time.monotonic()
        while True:
            t = time.time()
            for room in self.rooms:
                frame = {"type": "publish", "id": i, "room": room.name, "event": EVENT,
                         "data": {"i": i, "t": t}}
                try:
                    await _send(room.publisher, "json", frame)
                    room.sent = i + 1
                except ConnectionClosed:
                    room.errors["publisher connection closed"] += 1
            i += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _read_acks(self, room: _Room) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for msg in room.publisher:
                for f in _decode(msg):
                    if not isinstance(f, dict):
                        continue
                    self.progress.set()
                    if f.get("type") == "published" and isinstance(f.get("id"), int):
                        room.acked.add(f["id"])
                    elif f.get("type") in ("error", "disconnect"):
                        room.errors[f"{f['type']} {f.get('code')} {f.get('reason')}"] += 1

    async def _read_member(self, ws: ClientConnection, st: MemberStats) -> None:
        try:
            async for msg in ws:
                now = time.time()
                for f in _decode(msg):
                    if isinstance(f, dict) and f.get("type") == "event" \
                            and f.get("event") == EVENT:
                        self._event(st, f["data"], now, f.get("ts"))
                        self.progress.set()
                    elif isinstance(f, dict) and f.get("type") == "disconnect":
                        st.closed = f"disconnect {f.get('code')} {f.get('reason')}"
        except ConnectionClosed:
            pass
        if st.closed is None:
            st.closed = f"closed {ws.close_code} {ws.close_reason}"

    @staticmethod
    def _event(st: MemberStats, data: dict[str, Any], now: float, ts: Any) -> None:
        i = int(data["i"])
        if i in st.seen:
            st.duplicates += 1
            return
        if i < st.last_i:
            st.out_of_order += 1
        st.last_i = max(st.last_i, i)
        st.seen.add(i)
        st.arrivals.append(now)
        sent = float(data["t"])
        into = ts / 1000 - sent if isinstance(ts, (int, float)) else float("nan")
        st.samples.append((sent, now - sent, into))

    def members(self) -> list[MemberStats]:
        return [st for room in self.rooms for _, st in room.members]

    def latencies(self, start: float, end: float) -> list[float]:
        """Every member's latency of the events sent between ``start`` and ``end``."""
        return [lat for st in self.members() for t, lat, _ in st.samples if start <= t < end]

    def latencies_into(self, start: float, end: float) -> list[float]:
        """The part of :meth:`latencies` until the node stamped the event (its ``ts``, in whole
        ms, cut: up to 1 ms low): the publisher's side and the node's read. The rest is the
        node's store and fan-out and the member's side. Events without ``ts`` are left out."""
        return [into for st in self.members() for t, _, into in st.samples
                if start <= t < end and into == into]  # NaN: no ts

    def received(self) -> int:
        return sum(len(st.seen) for st in self.members())

    async def stop(self, drain_s: float = 10.0) -> None:
        """Stop publishing; wait (bounded) until every member has every acked event."""
        if self.publishing is not None:
            self.publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.publishing
        self.stopped_at = time.time()
        deadline = time.monotonic() + drain_s
        while self.lost() or self._unanswered():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), left)

    def _unanswered(self) -> bool:
        return any(len(r.acked) + sum(r.errors.values()) < r.sent for r in self.rooms)

    def lost(self) -> int:
        """Acknowledged events some member did not receive (each member counted)."""
        return sum(len(room.acked - st.seen) for room in self.rooms for _, st in room.members)

    def missed_members(self) -> int:
        """Members that lack an acknowledged event."""
        return sum(1 for room in self.rooms for _, st in room.members if room.acked - st.seen)

    def stuck_rooms(self) -> list[str]:
        """The rooms where a member lacks events or went :data:`STUCK_S` without one."""
        stuck = []
        for room in self.rooms:
            for _, st in room.members:
                times = [self.started_at, *st.arrivals, self.stopped_at]
                gap = max(b - a for a, b in itertools.pairwise(times))
                if room.acked - st.seen or gap > STUCK_S:
                    stuck.append(f"{room.name} (member {st.index}: "
                                 f"{len(room.acked - st.seen)} missing, "
                                 f"longest silence {gap:.1f} s)")
                    break
        return stuck

    def problems(self) -> list[str]:
        """Everything a well-behaved client should never see, one line each."""
        out: list[str] = []
        for room in self.rooms:
            out += [f"{room.name} publisher: {k} (x{v})" for k, v in room.errors.items()]
            unacked = room.sent - len(room.acked)
            if unacked:
                out.append(f"{room.name} publisher: {unacked} of {room.sent} publishes "
                           f"not acknowledged")
            for _, st in room.members:
                if st.duplicates or st.out_of_order:
                    out.append(f"{room.name} member {st.index}: {st.duplicates} duplicates, "
                               f"{st.out_of_order} out of order")
                if st.closed:
                    out.append(f"{room.name} member {st.index}: connection ended: {st.closed}")
        return out

    async def close(self) -> None:
        """Close every client (bounded)."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        conns = [ws for room in self.rooms for ws in (room.publisher,
                                                      *(m for m, _ in room.members))]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(ws.close() for ws in conns),
                                                  return_exceptions=True), 5)
        for ws in conns:
            ws.transport.abort()
