"""A raw protocol client for the tests: frames in, frames out, exactly as on the wire."""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from node.protocol.frames import CBOR, JSON
from node.protocol.tokens import mint_token

__all__ = ["SECRET", "RawClient", "as_json_member", "read_server_frame", "token", "unique",
           "ws_url"]

SECRET = "test-secret-0123456789-0123456789-0123456789"
ALL_RIGHTS = ["join", "publish", "history", "presence"]


def token(sub: str = "alice", *, rooms: dict[str, list[str]] | None = None, **kw: Any) -> str:
    """A token signed with the tests' secret; by default every right on every room."""
    return mint_token(SECRET, sub=sub, rooms={"*": ALL_RIGHTS} if rooms is None else rooms, **kw)


def unique(prefix: str = "t") -> str:
    """A room name no other test uses."""
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


class RawClient:
    """One WebSocket connection speaking PROTOCOL.md frames."""

    def __init__(self, ws: ClientConnection, codec: Any) -> None:
        self.ws = ws
        self.codec = codec
        self.buffer: list[Any] = []
        self.ids = itertools.count(1)

    @classmethod
    async def open(cls, url: str, *, codec: str = "json", **kw: Any) -> RawClient:
        c = CBOR if codec == "cbor" else JSON
        ws = await connect(url, subprotocols=[f"rtnode.v1.{codec}"], max_size=None, **kw)
        return cls(ws, c)

    @classmethod
    async def connected(cls, url: str, tok: str | None = None, *, codec: str = "json",
                        **kw: Any) -> RawClient:
        client = await cls.open(url, codec=codec, **kw)
        reply = await client.request({"type": "connect", "token": tok or token()})
        assert reply["type"] == "connected", reply
        client.info = reply
        return client

    async def send(self, *frames: Any) -> None:
        payload = self.codec.join([self.codec.encode(f) for f in frames])
        await self.ws.send(payload if self.codec.binary else payload.decode())

    async def recv(self, timeout: float = 10.0) -> Any:
        while not self.buffer:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
            self.buffer.extend(self.codec.decode(data))
        return self.buffer.pop(0)

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send ``frame`` with a fresh id; return its reply (events meanwhile stay queued)."""
        rid = next(self.ids)
        await self.send({**frame, "id": rid})
        kept: list[Any] = []
        try:
            while True:
                f = await self.recv(timeout)
                if isinstance(f, dict) and f.get("id") == rid and f.get("type") != "rpc":
                    return f
                if isinstance(f, dict) and f.get("type") == "disconnect":
                    return f
                kept.append(f)
        finally:
            self.buffer[:0] = kept

    async def events(self, n: int, room: str | None = None, timeout: float = 20.0) -> list[Any]:
        """The next ``n`` event frames (of ``room`` if given); other frames are dropped."""
        out: list[Any] = []
        while len(out) < n:
            f = await self.recv(timeout)
            if f.get("type") == "event" and (room is None or f.get("room") == room):
                out.append(f)
        return out

    async def until(self, type_: str, timeout: float = 10.0) -> dict[str, Any]:
        """Skip frames until one of ``type_`` arrives."""
        while True:
            f = await self.recv(timeout)
            if f.get("type") == type_:
                return f

    async def closed(self, timeout: float = 10.0) -> tuple[int | None, list[Any]]:
        """Read until the server closes; returns the close code and the frames seen."""
        seen = list(self.buffer)
        self.buffer.clear()
        try:
            while True:
                data = await asyncio.wait_for(self.ws.recv(), timeout)
                seen.extend(self.codec.decode(data))
        except Exception:
            pass
        return self.ws.close_code, seen

    async def close(self) -> None:
        await self.ws.close()


async def publish_many(c: RawClient, room: str, n: int, start: int = 0) -> list[int]:
    """Publish ``n`` events pipelined (50 per message); return their seqs in order."""
    seqs: dict[int, int] = {}
    for base in range(start, start + n, 50):
        frames = [{"type": "publish", "id": f"p{i}", "room": room, "event": "e", "data": i}
                  for i in range(base, min(base + 50, start + n))]
        await c.send(*frames)
    kept = []
    while len(seqs) < n:
        f = await c.recv(20)
        if f.get("type") == "published":
            seqs[int(f["id"][1:])] = f["seq"]
        elif f.get("type") == "error":
            raise AssertionError(f)
        else:
            kept.append(f)
    c.buffer[:0] = kept
    return [seqs[i] for i in range(start, start + n)]


def ws_url(node: Any) -> str:
    """The WebSocket URL of an in-process node."""
    return f"ws://127.0.0.1:{node.http.port}/ws"


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One WebSocket frame from a server (unmasked, RFC 6455 section 5.2), read off a raw
    socket: its opcode and payload."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


def as_json_member(value: Any) -> Any:
    """``value`` as a JSON member receives it: byte strings as base64 text (RFC 4648, padded),
    everything else as it is."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [as_json_member(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json_member(v) for k, v in value.items()}
    return value
