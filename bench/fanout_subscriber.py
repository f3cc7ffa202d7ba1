"""A fan-out subscriber that costs the load generator little: websockets' sans-I/O protocol
driven from the transport's callbacks.

websockets' asyncio client wakes a reader task for every message (its ``recv``, its message
assembler, the task's step): ~5 us a message here, more than the node spends delivering it, so
a paced run of 100 subscribers at 1,000 events/s kept the load generator near 100% of a core
and its own queueing showed up as latency. This one hands each message to the collector in
``data_received``, in the read callback, with no task woken. The protocol (handshake, frames,
pings, the closing handshake) is websockets', unchanged: only the I/O around it is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

__all__ = ["Subscriber"]

CLOSE_WAIT_S = 5.0


class Subscriber(asyncio.Protocol):
    """One WebSocket connection; :meth:`open` it, :meth:`recv` replies while setting up, then
    :meth:`stream` every message to a handler."""

    def __init__(self, url: str, subprotocol: str | None) -> None:
        self.proto = ClientProtocol(
            parse_uri(url), max_size=None,
            subprotocols=[Subprotocol(subprotocol)] if subprotocol else None)
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._inbox: list[str | bytes] = []
        self._arrived = asyncio.Event()
        self._handler: Callable[[str | bytes, float], None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._abort_armed = False

    @classmethod
    async def open(cls, url: str, subprotocol: str | None, timeout: float) -> Subscriber:
        """Connect and finish the opening handshake (raises what websockets' client would)."""
        uri = parse_uri(url)
        loop = asyncio.get_running_loop()
        _, sub = await asyncio.wait_for(
            loop.create_connection(lambda: cls(url, subprotocol), uri.host, uri.port), timeout)
        try:
            await asyncio.wait_for(asyncio.shield(sub.opened), timeout)
        except BaseException:
            sub.abort()
            raise
        return sub

    # -- use -----------------------------------------------------------------------------------

    def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.proto.send_text(message.encode())
        else:
            self.proto.send_binary(message)
        self._flush()

    async def recv(self) -> str | bytes:
        """The next message (before :meth:`stream`); ConnectionError once closed."""
        while not self._inbox:
            if self.closed.done():
                raise ConnectionError(f"closed: {self.close_code} {self.close_reason}")
            self._arrived.clear()
            waiter = asyncio.ensure_future(self._arrived.wait())
            await asyncio.wait({waiter, self.closed}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        return self._inbox.pop(0)

    def stream(self, handler: Callable[[str | bytes, float], None]) -> None:
        """From now on, every message goes to ``handler(message, time.time())`` as it is read
        (what :meth:`recv` has not taken first)."""
        self._handler = handler
        now = time.time()
        inbox, self._inbox = self._inbox, []
        for message in inbox:
            handler(message, now)

    async def close(self) -> None:
        """The closing handshake, bounded; then the socket is closed."""
        if not self.closed.done():
            with contextlib.suppress(Exception):
                self.proto.send_close(1000)
                self._flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_WAIT_S)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        self._events()

    def eof_received(self) -> bool | None:
        self.proto.receive_eof()
        self._events()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if self.close_code is None:
            self.close_code = self.proto.close_code or 1006
            self.close_reason = self.proto.close_reason or ""
        if not self.closed.done():
            self.closed.set_result(None)

    # -- inside --------------------------------------------------------------------------------

    def _events(self) -> None:
        now = time.time()
        handler = self._handler
        for event in self.proto.events_received():
            if isinstance(event, Response):
                if self.opened.done():
                    continue
                if self.proto.handshake_exc is not None:
                    self.opened.set_exception(self.proto.handshake_exc)
                else:
                    self.opened.set_result(None)
                continue
            opcode = event.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if not event.fin:  # never sent by the servers measured here: said, not read
                    self.close_reason = "fragmented message (not read by the benchmark)"
                    self.close_code = 1003
                    self.abort()
                    return
                message = event.data.decode() if opcode is Opcode.TEXT else bytes(event.data)
                if handler is None:
                    self._inbox.append(message)
                    self._arrived.set()
                else:
                    handler(message, now)
            elif opcode is Opcode.CLOSE:
                self.close_code = self.proto.close_code
                self.close_reason = self.proto.close_reason or ""
        self._flush()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for chunk in self.proto.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()  # the closing handshake is done: half-close
        if self.proto.close_expected() and not self._abort_armed:
            # The server closes the TCP connection now; if it does not, abort after a while.
            self._abort_armed = True
            asyncio.get_running_loop().call_later(CLOSE_WAIT_S, transport.abort)
