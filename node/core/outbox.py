"""The outbound buffer of one connection: where fan-out writes, without a coroutine hop.

A room delivers an event to a member by calling :meth:`Outbox.push` with bytes it encoded once
for every member using the same codec. Frames pushed during one turn of the event loop leave as
one transport message (PROTOCOL.md lets a message carry several frames): a burst of N events
costs each member one write, not N. A member whose unsent bytes pass ``limit`` is a slow consumer:
the outbox stops buffering for it and calls ``on_slow`` once; it recovers from the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["FlushTurn", "FrameCodec", "Outbox", "Transport"]

log = logging.getLogger("node.core.outbox")


class FrameCodec(Protocol):
    """How frames become bytes for one connection (see ``node.protocol.frames``)."""

    name: str

    def encode(self, frame: Any) -> bytes: ...

    def join(self, frames: list[bytes]) -> bytes: ...


class Transport(Protocol):
    """What a connection's bridge offers the outbox.

    A transport whose messages carry one frame each (MQTT: one frame per PUBLISH) sets
    ``frame_per_message = True``; the outbox then writes each frame as its own message.
    """

    def write_message(self, payload: bytes) -> None:
        """Send one message holding one or more encoded frames (never blocks)."""

    def buffered_bytes(self) -> int:
        """Bytes written but not yet sent by the OS (the transport's own buffer)."""


def _never_called() -> None:
    """The ``on_slow`` of a closed outbox."""


class FlushTurn:
    """The outboxes of a node with frames to write, flushed by one callback in the loop's next
    step, not by one callback each: an event that is alone in its turn (a room's event now and
    then, the usual case) costs each member one write and no scheduled callback of its own
    (~0.5 us less per delivery, a third of the outbox's part; outbox micro-measure, 100
    members, one event per turn)."""

    __slots__ = ("_armed", "_pending")

    def __init__(self) -> None:
        self._pending: list[Outbox] = []
        self._armed = False

    def add(self, outbox: Outbox) -> None:
        """Flush ``outbox`` with the others in the loop's next step."""
        self._pending.append(outbox)
        if not self._armed:
            self._armed = True
            outbox._loop.call_soon(self._run)

    def _run(self) -> None:
        self._armed = False
        pending, self._pending = self._pending, []
        for outbox in pending:
            outbox.flush()  # never raises: a failed write closes that outbox only


class Outbox:
    """Frames waiting to be written to one connection.

    Args:
        codec: The connection's codec.
        transport: Where messages go.
        limit: Unsent bytes (ours plus the transport's) beyond which the peer is a slow consumer.
        on_slow: Called once when the limit is passed (e.g. disconnect with 4008).
        max_message_bytes: Flush early when a message would grow past this.
        flush_turn: The node's :class:`FlushTurn` (None: one of its own, for this outbox).
    """

    __slots__ = (
        "_flush_turn",
        "_frames",
        "_loop",
        "_queued",
        "_scheduled",
        "_unsent",
        "closed",
        "codec",
        "limit",
        "max_message_bytes",
        "on_slow",
        "slow",
        "transport",
    )

    def __init__(
        self,
        codec: FrameCodec,
        transport: Transport,
        *,
        limit: int,
        on_slow: Callable[[], None],
        max_message_bytes: int = 256 * 1024,
        flush_turn: FlushTurn | None = None,
    ) -> None:
        self.codec = codec
        self.transport = transport
        self.limit = limit
        self.on_slow = on_slow
        self.max_message_bytes = max_message_bytes
        self.slow = False
        self.closed = False
        # None while nothing is queued (an idle connection's outbox holds no list).
        self._frames: list[bytes] | None = None
        self._queued = 0
        self._unsent = 0  # the transport's unsent bytes when the batch began
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self._flush_turn = FlushTurn() if flush_turn is None else flush_turn

    def push(self, encoded: bytes) -> bool:
        """Queue one encoded frame. Returns False if it was refused (slow or closed)."""
        if self.closed or self.slow:
            return False
        frames = self._frames
        if frames is None:
            # A batch begins: the transport's unsent bytes are read once for the batch, not
            # once a frame (a fan-out's every delivery). Within a loop step they only grow by
            # writes, and the batch's own are made at its flush; another write in the same
            # step (a pong) counts from the next batch on.
            self._frames = [encoded]
            self._queued = len(encoded)
            self._unsent = self.transport.buffered_bytes()
        else:
            frames.append(encoded)
            self._queued += len(encoded)
        if self._queued + self._unsent > self.limit:
            self.slow = True
            self._frames = None
            self._queued = 0
            self.on_slow()
            return False
        if self._queued >= self.max_message_bytes:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._flush_turn.add(self)
        return True

    def push_many(self, encoded: list[bytes], size: int) -> bool:
        """Queue encoded frames in order (``size``: their bytes), as :meth:`push` one by one
        would, in one call. ``encoded`` is not kept (a room hands the same list to every
        member)."""
        if self.closed or self.slow:
            return False
        frames = self._frames
        if frames is None:
            queued = size
        else:
            queued = self._queued + size
        if queued >= self.max_message_bytes:  # push flushes the message as it fills
            for data in encoded:
                if not self.push(data):
                    return False
            return True
        if frames is None:
            self._frames = encoded.copy()
            self._unsent = self.transport.buffered_bytes()
        else:
            frames.extend(encoded)
        self._queued = queued
        if queued + self._unsent > self.limit:
            self.slow = True
            self._frames = None
            self._queued = 0
            self.on_slow()
            return False
        if not self._scheduled:
            self._scheduled = True
            self._flush_turn.add(self)
        return True

    def send(self, frame: Any) -> bool:
        """Encode ``frame`` with this connection's codec and queue it."""
        return self.push(self.codec.encode(frame))

    def flush(self) -> None:
        """Write what is queued as one message."""
        self._scheduled = False
        frames = self._frames
        if not frames or self.closed:
            return
        self._frames, self._queued = None, 0
        try:
            if len(frames) == 1:
                self.transport.write_message(frames[0])
            elif getattr(self.transport, "frame_per_message", False):
                for frame in frames:
                    self.transport.write_message(frame)
            else:
                self.transport.write_message(self.codec.join(frames))
        except Exception as exc:  # the peer went away: its reader will notice and clean up
            log.debug("! write failed: %s", exc)
            self.closed = True

    def send_now(self, frame: Any) -> None:
        """Queue ``frame`` and flush at once (a last frame before closing), even when slow."""
        if self.closed:
            return
        self.slow = False
        encoded = self.codec.encode(frame)
        if self._frames is None:
            self._frames = [encoded]
        else:
            self._frames.append(encoded)
        self.flush()

    def close(self) -> None:
        """Refuse everything from now on."""
        self.closed = True
        self._frames = None
        self._queued = 0
        # Never called once closed; usually a bound method of the outbox's owner, which holds
        # the outbox: dropping it breaks that cycle for refcounting.
        self.on_slow = _never_called
