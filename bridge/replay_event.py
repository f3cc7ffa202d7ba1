"""What a replay consumer hands out: stored events to settle, and its one error type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from node.protocol.errors import NodeError

__all__ = ["ReplayError", "ReplayEvent"]


class ReplayError(NodeError):
    """A replay consumer cannot start or go on; the message is one line, fit to print."""


@dataclass(eq=False)
class ReplayEvent:
    """One stored event of a room, delivered by a :class:`bridge.replay.ReplayConsumer`.

    Attributes:
        room: The room.
        seq: The stream sequence (the event's ``seq`` everywhere else).
        event: The event name.
        data: The event's data.
        ts: Milliseconds since the epoch, set by the node that stored it.
        from_: The publisher, ``{user, kind, client_id?}``.
        msg_id: The publisher's idempotency key, or None.
        delivered: How many times this event was delivered to this consumer (1 the first time).
        tenant: The tenant.
        key: In a state room, the key the event sets (or unsets); None elsewhere.
        unset: In a state room, True when the event removes ``key``.
    """

    room: str
    seq: int
    event: str
    data: Any
    ts: int | None
    from_: dict[str, Any]
    msg_id: str | None
    delivered: int
    tenant: str = "default"
    key: str | None = None
    unset: bool = False
    _msg: Msg | None = field(default=None, repr=False)
    _on_settle: Callable[[ReplayEvent, Msg, str, float | None], Awaitable[None]] | None = field(
        default=None, repr=False)

    def as_map(self) -> dict[str, Any]:
        """The fields of an ``event`` frame (without ``type``), as clients see them."""
        out: dict[str, Any] = {"room": self.room, "seq": self.seq, "event": self.event,
                               "data": self.data, "ts": self.ts, "from": self.from_}
        if self.msg_id is not None:
            out["msg_id"] = self.msg_id
        if self.key is not None:  # a state room's event, as its members get it
            out["key"] = self.key
            if self.unset:
                out["unset"] = True
        return out

    async def ack(self) -> None:
        """Done with this event. The ack is not confirmed by the server (one message, no
        round trip): an ack lost in a fault, or a takeover of its partition while it lies above
        the ack floor, delivers it again; at least once (``bridge.replay``)."""
        await self._settle("ack")

    async def nak(self, delay: float | None = None) -> None:
        """Not done: deliver it again, at once or after ``delay`` seconds. With the consumer's
        ``on_retry="block"`` (the default) no later event of this room comes before it; with
        ``"skip"`` it is dead-lettered at once and the room goes on."""
        await self._settle("nak", delay)

    async def term(self) -> None:
        """Give up on this event: never delivered again, and not dead-lettered."""
        await self._settle("term")

    async def in_progress(self) -> None:
        """Still working on it: restart its ``ack_wait``. (The consumer already does this for
        the events it holds; call it only to be explicit.)"""
        msg = self._msg
        if msg is not None:
            await msg.in_progress()

    async def _settle(self, how: str, delay: float | None = None) -> None:
        msg, on_settle = self._msg, self._on_settle
        if msg is None or on_settle is None:
            raise ReplayError(f"event {self.seq} was already acked, nakked or terminated")
        self._msg = None
        await on_settle(self, msg, how, delay)
