"""A fan-out subscriber that costs the load generator little: websockets' sans-I/O protocol
driven from the transport's callbacks.

websockets' asyncio client wakes a reader task for every message (its ``recv``, its message
assembler, the task's step): ~5 us a message here, more than the node spends delivering it, so
a paced run of 100 subscribers at 1,000 events/s kept the load generator near 100% of a core
and its own queueing showed up as latency. This one hands each message to the collector in
``data_received``, in the read callback, with no task woken. The protocol (handshake, pings,
the closing handshake) is websockets', unchanged.

Past the opening handshake (websockets reads the response's head, and nothing after it), the
messages themselves are cut out of the byte stream here: a server's frames are not masked, and
a whole text or binary message in one frame is a 2-, 4- or 10-byte header and its payload.
websockets' parser (a generator, a frame object, a UTF-8 check: ~6 us a message) made the paced
run's load generator spend more per delivery than the node it measures, on a machine whose two
cores they share. Every other frame (control frames: ping, close) is handed whole to
websockets' protocol, which answers it as before; a fragmented or compressed message (never
sent by the servers measured here) ends the connection with a reason.
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
        self._raw = False  # past the handshake: frames are cut out here (the module's docstring)
        self._head: bytes | None = b""  # the handshake response's head, until it is whole
        self._rest = b""  # the start of a frame not yet whole

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
        if self._raw:
            self._frames(self._rest + data if self._rest else data)
            return
        if self._head is None:  # a refused handshake: websockets reads the rest
            self.proto.receive_data(data)
            self._events()
            return
        # websockets reads the handshake response's head, and nothing after it: its frame
        # parser then stands at a frame boundary for good (it gets whole control frames only).
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self._head = head
            return
        self._head = None
        self.proto.receive_data(head[:end + 4])
        self._events()
        rest = head[end + 4:]
        if (head.startswith(b"HTTP/1.1 101 ") and self.opened.done()
                and self.opened.exception() is None):
            self._raw = True
            if rest:
                self._frames(rest)
        elif rest:
            self.proto.receive_data(rest)
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
        handler = self._handler or self._keep
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
                handler(event.data.decode() if opcode is Opcode.TEXT else bytes(event.data), now)
            elif opcode is Opcode.CLOSE:
                self.close_code = self.proto.close_code
                self.close_reason = self.proto.close_reason or ""
        self._flush()

    def _frames(self, buf: bytes) -> None:
        handler = self._handler or self._keep
        now = time.time()
        end = len(buf)
        pos = 0
        while end - pos >= 2:
            b0 = buf[pos]
            size = buf[pos + 1]
            head = 2
            if size == 126:
                if end - pos < 4:
                    break
                size = int.from_bytes(buf[pos + 2:pos + 4])
                head = 4
            elif size == 127:
                if end - pos < 10:
                    break
                size = int.from_bytes(buf[pos + 2:pos + 10])
                head = 10
            elif size > 127:  # a masked frame from the server: websockets says what is wrong
                self._raw = False
                self.proto.receive_data(buf[pos:])
                self._events()
                return
            stop = pos + head + size
            if stop > end:
                break
            if b0 == 0x81:  # FIN, text
                try:
                    text = buf[pos + head:stop].decode()
                except UnicodeDecodeError:
                    self.close_reason = "a text message that is not UTF-8"
                    self.close_code = 1007
                    self.abort()
                    return
                handler(text, now)
            elif b0 == 0x82:  # FIN, binary
                handler(buf[pos + head:stop], now)
            elif b0 & 0x0F >= 8:  # a control frame: websockets answers it
                self.proto.receive_data(buf[pos:stop])
                self._events()
            else:
                self.close_reason = "fragmented or compressed message (not read by the benchmark)"
                self.close_code = 1003
                self.abort()
                return
            pos = stop
        self._rest = buf[pos:] if pos < end else b""

    def _keep(self, message: str | bytes, now: float) -> None:
        """A message before :meth:`stream`: for :meth:`recv`."""
        self._inbox.append(message)
        self._arrived.set()

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
