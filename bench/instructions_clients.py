"""The clients of ``python -m bench instructions`` (:mod:`bench.instructions`): members that
connect and join, pairs of members publishing to each other, and a member publishing one event
at a time to another, against rtnode or the plain ``websockets`` baseline. They run in the
benchmark's own process, not under valgrind."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from bench.nodes import SECRET
from node.protocol.frames import JSON
from node.protocol.tokens import mint_token

__all__ = ["close", "connects", "exchange", "member", "one_at_a_time", "pairs"]

_T = TypeVar("_T")
_RIGHTS = {"*": ["join", "publish"]}


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
