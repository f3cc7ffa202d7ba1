"""One raw WebSocket connection to a node, speaking the protocol's JSON frames.

Every frame received goes to ``on_frame`` first, in arrival order and synchronously in the
reading task (so a recorder sees a ``joined`` before the events that follow it in the same
message); then a frame whose ``id`` matches a pending request resolves it. When the connection
ends, every pending request fails with :class:`LinkLost`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

__all__ = ["Link", "LinkLost"]

Frame = dict[str, Any]


class LinkLost(Exception):
    """The connection ended before the reply arrived (the request may have been handled)."""


class Link:
    def __init__(self, ws: ClientConnection, on_frame: Callable[[Frame, float], None]) -> None:
        self.ws = ws
        self.on_frame = on_frame
        self.ids = itertools.count(1)
        self.waiters: dict[int, asyncio.Future[Frame]] = {}
        self.done = asyncio.Event()
        self.close_code: int | None = None
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, tok: str, on_frame: Callable[[Frame, float], None], *,
                   timeout: float = 3.0) -> Link:
        """Open, send ``connect`` and wait for ``connected`` (all within ``timeout``)."""
        async with asyncio.timeout(timeout):
            ws = await connect(url, subprotocols=["rtnode.v1.json"],  # type: ignore[list-item]
                               max_size=None, open_timeout=timeout, close_timeout=1.0)
            link = cls(ws, on_frame)
            try:
                reply = await link.request({"type": "connect", "token": tok}, timeout)
            except BaseException:
                await link.close()
                raise
        if reply.get("type") != "connected":
            await link.close()
            raise LinkLost(f"connect refused: {reply}")
        return link

    @property
    def alive(self) -> bool:
        return not self.done.is_set()

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                now = time.monotonic()
                text = message.decode() if isinstance(message, bytes) else message
                for line in text.split("\n"):
                    if not line.strip():
                        continue
                    frame = json.loads(line)
                    if not isinstance(frame, dict):
                        continue
                    self.on_frame(frame, now)
                    rid = frame.get("id")
                    waiter = self.waiters.pop(rid, None) \
                        if isinstance(rid, int) and frame.get("type") != "rpc" else None
                    if waiter is not None and not waiter.done():
                        waiter.set_result(frame)
        except Exception:  # closed, reset, garbage: the link is over either way
            pass
        finally:
            self.close_code = self.ws.close_code
            self.done.set()
            for waiter in self.waiters.values():
                if not waiter.done():
                    waiter.set_exception(LinkLost())
            self.waiters.clear()

    async def send(self, frame: Frame) -> None:
        if self.done.is_set():
            raise LinkLost()
        try:
            await self.ws.send(json.dumps(frame, separators=(",", ":")))
        except Exception as exc:
            raise LinkLost(repr(exc)) from None

    async def request(self, frame: Frame, timeout: float, rid: int | None = None) -> Frame:
        """Send ``frame`` with ``rid`` (default: a fresh id) and await its reply.

        Raises:
            LinkLost: the connection ended first; TimeoutError: no reply within ``timeout``.
        """
        rid = next(self.ids) if rid is None else rid
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.waiters[rid] = future
        try:
            await self.send({**frame, "id": rid})
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self.waiters.pop(rid, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved

    def next_id(self) -> int:
        return next(self.ids)

    async def close(self) -> None:
        with suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.ws.close()
        self.reader.cancel()
        with suppress(BaseException):
            await self.reader
        self.done.set()
