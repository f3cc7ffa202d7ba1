"""The clients of ``python -m bench instructions`` (:mod:`bench.instructions`): members that
connect and join, pairs of members publishing to each other, and a member publishing one event
at a time to another, against rtnode or the plain ``websockets`` baseline; and MQTT devices
publishing to a room a member is in (rtnode only: the baseline has no MQTT). They run in the
benchmark's own process, not under valgrind."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import cbor2
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from bench.ingest_devices import EVENT, connect_packet, read_packet, utf8, varint
from bench.nodes import SECRET
from node.protocol.frames import JSON
from node.protocol.tokens import mint_token

__all__ = ["Device", "close", "connects", "device", "devices", "disconnect", "exchange", "ingest",
           "member", "one_at_a_time", "pairs"]

_T = TypeVar("_T")
_RIGHTS = {"*": ["join", "publish"]}
# An MQTT device: the two ends of its connection, after its CONNACK.
Device = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def all_of(aws: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await all; the first failure cancels the others and is raised as is."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_wrap(a)) for a in aws]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


async def _wrap(aw: Awaitable[_T]) -> _T:
    return await aw


async def member(kind: str, port: int, sub: str, room: str, token_kind: str = "user"
                  ) -> ClientConnection:
    """One connection in ``room``: connected and joined (rtnode), or told it joined."""
    if kind == "websockets":
        ws = await connect(f"ws://127.0.0.1:{port}/{room}", compression=None,
                           ping_interval=None, open_timeout=None)
        await ws.recv()  # {"type":"joined"}
        return ws
    ws = await connect(f"ws://127.0.0.1:{port}/ws", subprotocols=[Subprotocol("rtnode.v1.json")],
                       compression=None, ping_interval=None, open_timeout=None)
    token = mint_token(SECRET, sub=sub, rooms=_RIGHTS, kind=token_kind)
    await ws.send(json.dumps({"type": "connect", "id": "c", "token": token}) + "\n"
                  + json.dumps({"type": "join", "id": "j", "room": room}))
    while True:
        for f in JSON.decode(await ws.recv()):
            if f.get("type") in ("error", "disconnect") or f.get("id") == "j":
                if f.get("type") != "joined":
                    raise RuntimeError(f"{sub}: join answered {json.dumps(f)[:200]}")
                return ws


async def connects(kind: str, port: int, args: argparse.Namespace, n: int, prefix: str,
                    token_kind: str = "user") -> list[ClientConnection]:
    """``n`` members, ``args.concurrency`` opening at a time, rooms of ``args.room_size``."""
    gate = asyncio.Semaphore(args.concurrency)
    opened: list[ClientConnection] = []

    async def one(i: int) -> None:
        async with gate:
            opened.append(await member(kind, port, f"{prefix}-{i}",
                                        f"{prefix}-room-{i // args.room_size}", token_kind))

    try:
        await all_of(one(i) for i in range(n))
    except BaseException:
        await close(opened)
        raise
    return opened


async def close(conns: Iterable[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


async def talk(kind: str, ws: ClientConnection, me: str, room: str, events: int,
                window: int) -> int:
    """Publish ``events`` events, ``window`` in flight, until the other member's ``events``
    have come too. Returns those received.

    Raises:
        RuntimeError: An ``error`` or ``disconnect`` frame, or the connection closed early.
    """
    got = acked = sent = 0
    moved = asyncio.Event()

    async def read() -> None:
        nonlocal got, acked
        try:
            async for msg in ws:
                if kind == "websockets":
                    got += 1
                for f in JSON.decode(msg) if kind == "rtnode" else ():
                    if f.get("type") == "event" and (f.get("data") or {}).get("from") != me:
                        got += 1
                    elif f.get("type") == "published":
                        acked += 1
                    elif f.get("type") in ("error", "disconnect"):
                        raise RuntimeError(f"{room} {me}: {json.dumps(f)[:200]}")
                moved.set()
                if got >= events and (kind == "websockets" or acked >= events):
                    return
            raise RuntimeError(f"{room} {me}: closed after {got} of {events} events")
        finally:
            moved.set()

    reader = asyncio.create_task(read())
    try:
        while sent < events:
            # rtnode: our own unacknowledged publishes; the baseline: ahead of the other member
            while sent - (acked if kind == "rtnode" else got) >= window:
                if reader.done():
                    reader.result()  # what stopped it
                moved.clear()
                await moved.wait()
            data = {"from": me, "n": sent, "pad": "p" * 40}
            await ws.send(json.dumps(data) if kind == "websockets" else json.dumps(
                {"type": "publish", "id": sent, "room": room, "event": "m", "data": data}))
            sent += 1
        await reader
    finally:
        reader.cancel()
    return got


async def pairs(kind: str, port: int, rooms: int, prefix: str
                 ) -> list[tuple[str, ClientConnection, ClientConnection]]:
    out: list[tuple[str, ClientConnection, ClientConnection]] = []
    try:
        for r in range(rooms):
            room = f"{prefix}-r{r}"
            a = await member(kind, port, f"{prefix}-a{r}", room)
            out.append((room, a, await member(kind, port, f"{prefix}-b{r}", room)))
    except BaseException:
        await close(ws for _, a, b in out for ws in (a, b))
        raise
    return out


async def exchange(kind: str, pairs: list[tuple[str, ClientConnection, ClientConnection]],
                    events: int, window: int) -> int:
    """Every member of ``pairs`` publishing; returns the events delivered to the other."""
    got = await all_of(talk(kind, ws, me, room, events, window)
                     for room, a, b in pairs for ws, me in ((a, "a"), (b, "b")))
    return sum(got)


async def one_at_a_time(kind: str, room: str, a: ClientConnection, b: ClientConnection,
                        events: int, gap_s: float) -> int:
    """``a`` publishes ``events`` events one at a time, ``gap_s`` apart: each once the one
    before has reached ``b`` (and, on rtnode, ``a`` has its ``published`` reply), as in a
    quiet room. Returns the events ``b`` received.

    Raises:
        RuntimeError: An ``error`` or ``disconnect`` frame, or a connection closed early.
    """
    frames: dict[str, asyncio.Queue[dict[str, object]]] = {"a": asyncio.Queue(),
                                                           "b": asyncio.Queue()}

    async def read(ws: ClientConnection, me: str) -> None:
        async for msg in ws:
            for f in JSON.decode(msg) if kind == "rtnode" else [json.loads(msg)]:
                if f.get("type") in ("error", "disconnect"):
                    raise RuntimeError(f"{room} {me}: {json.dumps(f)[:200]}")
                frames[me].put_nowait(f)
        raise RuntimeError(f"{room} {me}: closed early")

    async def until(me: str, wanted: int, reader: asyncio.Task[None]) -> None:
        while True:
            waiting = asyncio.ensure_future(frames[me].get())
            await asyncio.wait({waiting, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                reader.result()  # what stopped it
            f = waiting.result()
            data = f.get("data") if kind == "rtnode" else f
            if kind == "rtnode" and me == "a":
                if f.get("type") == "published" and f.get("id") == wanted:
                    return
            elif isinstance(data, dict) and data.get("n") == wanted and (
                    kind == "websockets" or f.get("type") == "event"):
                return

    readers = {"a": asyncio.create_task(read(a, "a")), "b": asyncio.create_task(read(b, "b"))}
    try:
        for n in range(events):
            data = {"from": "a", "n": n, "pad": "p" * 40}
            await a.send(json.dumps(data) if kind == "websockets" else json.dumps(
                {"type": "publish", "id": n, "room": room, "event": "m", "data": data}))
            await until("b", n, readers["b"])
            if kind == "rtnode":
                await until("a", n, readers["a"])
            await asyncio.sleep(gap_s)
    finally:
        for task in readers.values():
            task.cancel()
        await asyncio.gather(*readers.values(), return_exceptions=True)
    return events


# -- MQTT devices (rtnode only) ----------------------------------------------------------------


async def device(mqtt_port: int, client_id: str, room: str) -> Device:
    """One MQTT 3.1.1 device (:mod:`bench.ingest_devices`' CONNECT: client id = username =
    ``client_id``, password = a device token that may publish to ``room``; clean session, no
    keep-alive, so no PINGREQ in a count), until its CONNACK.

    Raises:
        RuntimeError: The CONNACK refused it, or the node closed the connection.
    """
    token = mint_token(SECRET, sub=client_id, kind="device", rooms={room: ["publish"]})
    reader, writer = await asyncio.open_connection("127.0.0.1", mqtt_port)
    try:
        writer.write(connect_packet(client_id, token))
        kind, body = await read_packet(reader)
        if kind != 2 or len(body) < 2 or body[1] != 0:
            raise RuntimeError(f"{client_id}: CONNECT answered by packet type {kind} "
                               f"{body.hex()}")
    except asyncio.IncompleteReadError:
        writer.close()
        raise RuntimeError(f"{client_id}: closed before its CONNACK") from None
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def devices(mqtt_port: int, prefix: str, n: int, room: str) -> list[Device]:
    """``n`` devices (``<prefix>-d<i>``) that may publish to ``room``, connected at once."""
    opened: list[Device] = []

    async def one(i: int) -> None:
        opened.append(await device(mqtt_port, f"{prefix}-d{i}", room))

    try:
        await all_of(one(i) for i in range(n))
    except BaseException:
        await disconnect(opened)
        raise
    return opened


async def disconnect(devs: Iterable[Device]) -> None:
    """DISCONNECT and close each device."""
    writers = [writer for _, writer in devs]
    for writer in writers:
        if not writer.is_closing():
            writer.write(b"\xe0\x00")
            writer.close()
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _uplink(dev: Device, name: str, index: int, room: str, events: int, window: int,
                  progress: dict[str, float]) -> int:
    """Publish ``events`` events to ``rooms/<room>/up`` at QoS 1 (CBOR, as
    :mod:`bench.ingest_devices`), ``window`` of them unacknowledged, until every PUBACK has
    come (``progress``: counted in ``pubacks``, the time of the last in ``at``). Returns the
    PUBACKs.

    Raises:
        RuntimeError: Another packet than a PUBACK of ours, or the connection closed early.
    """
    reader, writer = dev
    topic = utf8(f"rooms/{room}/up")
    unacked: set[int] = set()
    acked = sent = 0
    moved = asyncio.Event()

    async def read() -> None:
        nonlocal acked
        try:
            while acked < events:
                kind, body = await read_packet(reader)
                pid = int.from_bytes(body[:2], "big")
                if kind != 4 or pid not in unacked:
                    raise RuntimeError(f"{name}: packet type {kind} {body[:40].hex()} "
                                       f"(PUBACKs {acked} of {events})")
                unacked.discard(pid)
                acked += 1
                progress["pubacks"] += 1
                progress["at"] = time.monotonic()
                moved.set()
        except asyncio.IncompleteReadError:
            raise RuntimeError(f"{name}: closed after {acked} of {events} PUBACKs") from None
        finally:
            moved.set()

    acks = asyncio.create_task(read())
    try:
        while sent < events:
            while sent - acked >= window:
                if acks.done():
                    acks.result()  # what stopped it
                moved.clear()
                await moved.wait()
            # no time in it: the same bytes, so the same instructions, in every run
            payload = cbor2.dumps({"event": EVENT, "data": {"d": index, "n": sent,
                                                           "pad": "p" * 40}})
            pid = sent % 65535 + 1
            unacked.add(pid)
            writer.write(b"\x32" + varint(len(topic) + 2 + len(payload)) + topic
                         + pid.to_bytes(2, "big") + payload)
            sent += 1
        await acks
    finally:
        acks.cancel()
    return acked


async def _arrivals(ws: ClientConnection, expected: int, progress: dict[str, float]) -> int:
    """Count the devices' events reaching member ``ws`` until ``expected`` have, each once
    (``progress``: counted in ``events``, the time of the last in ``at``). Returns them.

    Raises:
        RuntimeError: An ``error`` or ``disconnect`` frame, an event twice or not from a
            device, or the connection closed early.
    """
    seen: set[tuple[object, object]] = set()
    async for msg in ws:
        for f in JSON.decode(msg):
            if f.get("type") in ("error", "disconnect"):
                raise RuntimeError(f"ingest member: {json.dumps(f)[:200]}")
            if f.get("type") != "event":
                continue
            data = f.get("data")
            key = (data.get("d"), data.get("n")) if isinstance(data, dict) else (None, None)
            if None in key or key in seen:
                raise RuntimeError(f"ingest member: event twice or not from a device: "
                                   f"{json.dumps(f)[:200]}")
            seen.add(key)
            progress["events"] += 1
            progress["at"] = time.monotonic()
            if len(seen) >= expected:
                return len(seen)
    raise RuntimeError(f"ingest member: closed after {len(seen)} of {expected} events")


async def ingest(ws: ClientConnection, devs: list[Device], room: str, events: int,
                 window: int, stall_s: float) -> int:
    """Every device of ``devs`` publishing ``events`` events to ``room`` at QoS 1, ``window``
    unacknowledged, until member ``ws`` (in ``room``) has every one of them and every PUBACK
    has come. Returns the events the member received.

    Raises:
        RuntimeError: As :func:`_uplink` and :func:`_arrivals`; or no PUBACK and no event came
            for ``stall_s`` (an event lost: the node acknowledged it but did not deliver it).
    """
    expected = events * len(devs)
    progress = {"at": time.monotonic(), "pubacks": 0, "events": 0}
    work = asyncio.ensure_future(all_of([
        _arrivals(ws, expected, progress),
        *(_uplink(dev, f"device {i}", i, room, events, window, progress)
          for i, dev in enumerate(devs))]))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=1.0)
            if not work.done() and time.monotonic() - progress["at"] > stall_s:
                raise RuntimeError(
                    f"ingest: no PUBACK and no event at the member for {stall_s:.0f} s: "
                    f"{progress['pubacks']:.0f} PUBACKs, {progress['events']:.0f} events "
                    f"at the member, of {expected}")
        return work.result()[0]
    finally:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
