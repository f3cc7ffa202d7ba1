"""The ports through which domain actors reach the world, as protocols.

Actors know nothing of NATS or sockets: a :class:`RoomStore` stores and replays room events,
a :class:`LiveFeed` delivers them as they are stored, and a connection writes frames through
its :class:`Outbox` (see ``node.core.outbox``). ``bridge`` implements them for real; tests may use
recording fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "LiveFeed",
    "LiveMessage",
    "PresencePort",
    "RoomStore",
    "RpcError",
    "RpcPort",
    "Settled",
    "StatePort",
    "StoreError",
    "StoredEvent",
    "Subscription",
]


# StoredEvent and LiveMessage are values nothing changes, built for every event read or
# delivered: not ``frozen``, whose field-by-field object.__setattr__ made each ~3x dearer to build.
@dataclass(slots=True)
class StoredEvent:
    """One event as stored: its stream sequence and its CBOR body (the event map)."""

    seq: int
    body: bytes


@dataclass(slots=True)
class LiveMessage:
    """An event as it arrives on the live path.

    Attributes:
        seq: Its stream sequence (None for a volatile event).
        prev: The previous stream sequence of the same room, for gap detection (None if unknown).
        body: The CBOR event map.
    """

    seq: int | None
    prev: int | None
    body: bytes


class StoreError(Exception):
    """The store failed or did not answer in time.

    Attributes:
        retry: Whether the same request may succeed later.
    """

    def __init__(self, reason: str, *, retry: bool = True) -> None:
        super().__init__(reason)
        self.retry = retry


class Subscription(Protocol):
    """A live subscription; ``unsubscribe`` ends it."""

    async def unsubscribe(self) -> None: ...


class Settled(Protocol):
    """What ``publish_soon`` returns: an asyncio future's reading side. Its callbacks may be
    called in the loop step that settles it (not only in a later one), never within
    ``publish_soon`` itself."""

    def done(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def result(self) -> tuple[int, bool]: ...

    def exception(self) -> BaseException | None: ...

    def add_done_callback(self, fn: Callable[[Any], None], /) -> None: ...


class RoomStore(Protocol):
    """Durable room events (JetStream in production)."""

    @property
    def epoch(self) -> str:
        """The current life of the stream; changes when it is recreated."""

    async def publish(self, tenant: str, room: str, body: bytes, msg_id: str,
                      ttl_s: float | None = None) -> tuple[int, bool]:
        """Store one event (kept ``ttl_s``, or the store's max age); returns (seq, duplicate).
        Raises StoreError."""

    def publish_soon(self, tenant: str, room: str, body: bytes, msg_id: str,
                     ttl_s: float | None = None) -> Settled | None:
        """``publish`` without a coroutine, where the store can (it gathers publishes into
        batches): what ``publish`` would return or raise, once settled; None: call
        ``publish``."""

    async def trim(self, tenant: str, room: str, keep: int) -> None:
        """Keep only the room's latest ``keep`` events. Raises StoreError."""

    async def last_seq(self, tenant: str, room: str, *, after_subscribe: bool = False) -> int:
        """The latest acknowledged seq of the room, 0 if none (never a stale replica's).
        ``after_subscribe``: asked right after the room's live subscription, and answered
        after the server has it (what is stored after the answer comes live)."""

    async def read(
        self, tenant: str, room: str, after: int, limit: int, *, before: int | None = None
    ) -> list[StoredEvent]:
        """Up to ``limit`` events with ``after < seq`` (and ``seq < before``), ascending;
        complete: every acknowledged event in that range, up to ``limit``."""

    async def count(self, tenant: str, room: str) -> int:
        """How many events of the room are stored (exact)."""

    async def count_from(self, tenant: str, room: str, seq: int) -> int:
        """About how many stored events of the room have a seq >= ``seq`` (a hint: it may
        lag behind the latest publishes)."""

    async def has(self, tenant: str, room: str, seq: int) -> bool:
        """Whether event ``seq`` is stored and belongs to the room (exact)."""

    async def history(
        self, tenant: str, room: str, *, since: int | None, limit: int, reverse: bool
    ) -> list[StoredEvent]:
        """Events for a ``history`` request, in the order to send them (PROTOCOL.md)."""


class LiveFeed(Protocol):
    """Events of a room as they are stored (and volatile ones), for the room actor."""

    async def subscribe(
        self, tenant: str, room: str, callback: Callable[[list[LiveMessage]], None]
    ) -> Subscription:
        """Start delivering the room's live messages to ``callback``, in stream order: a list
        of those that arrived together (one read of the connection), at least one."""

    def publish_volatile(self, tenant: str, room: str, body: bytes, *,
                         later: bool = False) -> None:
        """Send a volatile event to every node (not stored): queued at once, from synchronous
        code (no task per event). Raises when it cannot be sent (the link closed, its buffer
        full while disconnected). ``later``: it may wait a few milliseconds to go with what
        the link sends next (a presence announcement; never a client's event)."""


class StatePort(Protocol):
    """The current values of state rooms: the latest stored event per key (a KV bucket)."""

    async def values(self, tenant: str, room: str) -> list[dict[str, Any]]:
        """The room's current values: event maps as stored, with ``seq`` and ``key``, ordered
        by key (unset keys left out). Raises StoreError."""

    async def put(self, tenant: str, room: str, key: str, seq: int, event_map: dict[str, Any],
                  unset: bool) -> None:
        """Record event ``seq`` (its map, as stored) as ``key``'s value, or remove ``key``
        when ``unset``; never over a higher seq (an older put arriving late changes nothing,
        the same seq again is a no-op). Raises StoreError."""

    async def may_add(self, tenant: str, room: str, key: str) -> bool:
        """Whether ``key`` may be set: it is set already, or the room holds fewer keys than
        its limit (``state_max_keys``). Raises StoreError."""


class PresencePort(Protocol):
    """Who is in a room, on every node."""

    def add(self, tenant: str, room: str, member: dict[str, Any]) -> None:
        """Record a local member (never waits)."""

    def remove(self, tenant: str, room: str, client_id: str,
               joined_at: int | None = None) -> None:
        """Forget a local member (never waits); with ``joined_at``, only the member that joined
        then: a successor with the same client id (an MQTT takeover) stays."""

    def watch(self, tenant: str, room: str, on: bool) -> None:
        """Count a local watcher of the room's presence events (on) or drop one (off)."""

    async def members(self, tenant: str, room: str) -> list[dict[str, Any]]:
        """Every member of the room, cluster-wide. Raises StoreError."""


class RpcError(Exception):
    """An rpc that failed with a protocol code (4004 offline, 4504 timeout, ...)."""

    def __init__(self, code: int, reason: str, *, retry: bool = False) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.retry = retry


class RpcPort(Protocol):
    """Rpc to clients anywhere in the cluster."""

    async def register(self, tenant: str, targets: list[str],
                       handler: Callable[[dict[str, Any], str], None]) -> None:
        """Route requests for ``targets`` to ``handler(request, reply_to)``; returns once the
        routes are in place."""

    def unregister(self, tenant: str, targets: list[str],
                   handler: Callable[[dict[str, Any], str], None]) -> None:
        """Stop routing ``targets`` to ``handler``."""

    async def request(self, tenant: str, target: str, request: dict[str, Any],
                      timeout: float) -> Any:
        """The target's result. Raises RpcError."""

    def respond(self, reply_to: str, answer: dict[str, Any]) -> None:
        """Answer a request (never waits)."""
