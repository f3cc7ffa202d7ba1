"""The admission pipeline: one set of rules for every door a publish comes in by.

Every door (a WebSocket or MQTT tunnel connection, a plain MQTT uplink on ``rooms/<room>/up``,
``POST /api/publish``, an uplink through an external broker) turns what it received into a
:class:`~node.protocol.Publish` and calls :meth:`Admission.admit`, which applies the same rules
in the same order:

1. identity: a verified principal of a known kind (else 4001);
2. rights: ``publish`` on the room (4003);
3. reserved names: events starting with ``presence:`` are the node's (4003);
4. rate: the door's token bucket, if it has one (4009, retry later);
5. size: the stored event map within the namespace's ``max_payload_bytes`` (4013);
6. value model: ``data`` within ``node.protocol.values`` (4000, naming the offending path);
7. volatile or stored: ``volatile_events`` and volatile namespaces are not stored;
8. dedupe scope: the ``Nats-Msg-Id`` of a stored event (``node.core.events.dedupe_key``).

Between 3 and 4, the state fields: ``key`` and ``unset`` only in a state room (a namespace with
``state = true``), ``unset`` without ``data`` (4000). In a state room the effective key (the
frame's, else the publisher's ``sub``) goes into the stored event map, with ``unset: true`` when
it removes the key; :meth:`Admission.store` then writes the room's state (the
:class:`~node.core.ports.StatePort`) after the stream's ack and before it returns, so that every
door answers its publisher only once the state holds the event.

Then the door stores the admitted event with :meth:`Admission.store` (or sends a volatile one,
throttled by a :class:`VolatileThrottle` where the door has one) and maps a
:class:`~node.protocol.errors.ProtocolError` to its own error channel: an ``error`` frame, an HTTP
status, or, for plain MQTT uplinks (acknowledged: MQTT 3.1.1 has no negative ack), a counted and
logged refusal told to the device as an ``error`` notice on its tunnel's ``out`` topic.

Every door counts the same way: :class:`AdmissionStats` records one outcome per publish, by door
(the refusal code at admission; ``volatile`` at admission; ``stored``, ``duplicate``, or the
store's 4503/4500 when the store answers), and the latency from admission to the store's ack.
Pure domain code: no I/O library is imported here; the store and the feed are ports.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from node.core.events import RecentEvents, dedupe_key, event_map
from node.core.limits import TokenBucket
from node.core.ports import LiveFeed, RoomStore, Settled, StatePort, StoreError
from node.core.unwritten import UNWRITTEN
from node.protocol.errors import AuthError, ProtocolError
from node.protocol.frames import CBOR, Publish, cbor_loads_strict
from node.protocol.settings import Settings
from node.protocol.tokens import KINDS, Principal
from node.protocol.values import check_value

__all__ = [
    "DOORS",
    "NOT_STATE_ROOM",
    "RESERVED_EVENT_PREFIXES",
    "Admission",
    "AdmissionStats",
    "Admitted",
    "VolatilePublisher",
    "VolatileThrottle",
]

log = logging.getLogger("node.core.admission")

#: Event names only the node may use (presence events).
RESERVED_EVENT_PREFIXES = ("presence:",)
#: Why ``key`` or ``unset`` is refused outside a state room (4000).
NOT_STATE_ROOM = "key/unset need a state room (namespace with state = true)"
#: The doors, as counted: WebSocket, MQTT tunnel, plain MQTT uplink, HTTP API, external broker.
DOORS = ("ws", "tunnel", "mqtt", "api", "broker")

T = TypeVar("T")


class Admitted(NamedTuple):
    """An event that passed admission, ready to be stored (or sent, when volatile).

    Attributes:
        door: The door it came in by (one of :data:`DOORS`).
        tenant: The publisher's tenant.
        room: The room.
        body: The CBOR event map, as stored.
        volatile: Not stored: sent on the volatile path, without a seq.
        dedupe: The ``Nats-Msg-Id`` of a stored event ("" for a volatile one).
        ttl_s: The event's TTL in the stream (a namespace's ``history_ttl_s``), or None.
        started: ``time.perf_counter()`` at admission, for the publish latency.
        key: In a state room, the key the event sets (or removes); else None.
        unset: The event removes ``key`` from the room's state.
    """

    door: str
    tenant: str
    room: str
    body: bytes
    volatile: bool
    dedupe: str
    ttl_s: float | None
    started: float
    key: str | None = None
    unset: bool = False


@dataclass
class AdmissionStats:
    """Publish outcomes of every door, counted the same way (exported as metrics).

    Attributes:
        counts: (door, outcome) -> publishes; an outcome is ``stored``, ``duplicate``,
            ``volatile`` or a protocol code as text (``"4003"``).
        volatile_failed: Volatile events the feed could not send.
        latency: Called with the seconds from admission to the store's ack of each stored event.
    """

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    volatile_failed: int = 0
    latency: Callable[[float], None] = field(default=lambda seconds: None)

    @property
    def published(self) -> int:
        """Publishes acknowledged as stored, by every door (duplicates included)."""
        return sum(n for (_, outcome), n in self.counts.items()
                   if outcome in ("stored", "duplicate"))

    @property
    def rate_limited(self) -> int:
        """Publishes refused by a rate limit, by every door."""
        return sum(n for (_, outcome), n in self.counts.items() if outcome == "4009")


class Admission:
    """The admission pipeline of one node.

    Args:
        settings: The node's settings (room policies, volatile events).
        store: Where stored events go.
        feed: Where volatile events go.
        state: Where the values of state rooms go (None: nowhere; their events are stored).

    Example:
        admitted = admission.admit("ws", principal, frame, client_id=cid, bucket=bucket)
        seq = await admission.store(admitted)  # raises ProtocolError 4503 (retry) or 4500
    """

    def __init__(self, settings: Settings, store: RoomStore, feed: LiveFeed,
                 state: StatePort | None = None) -> None:
        self.settings = settings
        self.store_port = store
        self.feed = feed
        self.state = state
        self.stats = AdmissionStats()
        #: The event maps admitted here lately, for this node's room actors (RecentEvents).
        self.recent = RecentEvents()
        #: Whether a room actor of (tenant, room) runs on this node (set by the node).
        self.room_here: Callable[[str, str], bool] = _nowhere
        self._volatile_events = frozenset(settings.volatile_events)
        # namespace -> (max_payload_bytes, volatile, ttl_s, state), read on every publish:
        # 0.3 us, against 1.0 us to ask the settings (room_policy and event_ttl) each time.
        self._policies: dict[str, tuple[int, bool, float | None, bool]] = {}

    def _policy(self, room: str) -> tuple[int, bool, float | None, bool]:
        namespace = room.partition(":")[0] if ":" in room else ""
        if namespace not in self.settings.namespaces:
            namespace = ""  # every unconfigured namespace has the node's policy: one entry
        policy = self._policies.get(namespace)
        if policy is None:
            room_policy = self.settings.room_policy(room)
            policy = self._policies[namespace] = (
                room_policy.max_payload_bytes, room_policy.volatile,
                self.settings.event_ttl(room), room_policy.state)
        return policy

    def admit(self, door: str, principal: Principal | None, frame: Publish, *,
              client_id: str | None, bucket: TokenBucket | None = None) -> Admitted:
        """Apply the rules to one publish, in order; count a refusal.

        Args:
            door: The door it came in by (one of :data:`DOORS`).
            principal: Who publishes (from a verified token, or the broker's trust).
            frame: The publish, its fields already validated (``parse_frame``).
            client_id: The publishing connection, for ``from.client_id`` (None: none).
            bucket: The door's rate limit for this publisher, if any.

        Raises:
            ProtocolError: 4001, 4003, 4009, 4013 or 4000, with a reason for the client.
        """
        try:
            return self._admit(door, principal, frame, client_id, bucket)
        except ProtocolError as exc:
            self.stats.counts[(door, str(exc.code))] += 1
            raise

    def _admit(self, door: str, principal: Principal | None, frame: Publish,
               client_id: str | None, bucket: TokenBucket | None) -> Admitted:
        if principal is None or principal.kind not in KINDS:
            raise AuthError("not authenticated")
        room, event = frame.room, frame.event
        if not principal.can("publish", room):
            raise ProtocolError(4003, "no publish right on this room")
        if event.startswith(RESERVED_EVENT_PREFIXES):
            raise ProtocolError(4003, "event names starting with presence: are reserved")
        max_bytes, volatile, ttl_s, state = self._policy(room)
        key: str | None = None
        if state:
            if frame.unset and frame.data is not None:
                raise ProtocolError(4000, "unset: true takes no data")
            key = principal.sub if frame.key is None else frame.key
        elif frame.key is not None or frame.unset:
            raise _not_state_room()
        if bucket is not None and not bucket.take(time.monotonic()):
            raise ProtocolError(4009, "rate limited", retry=True)
        started = time.perf_counter()
        # The encoder never fails (what the model refuses is made safe), so the size is known
        # before the value model walks the data; either refusal leaves nothing stored.
        as_map = event_map(room, event, frame.data, principal, client_id, frame.msg_id, key,
                           frame.unset)
        body = CBOR.encode(as_map)
        if len(body) > max_bytes:
            raise ProtocolError(4013, "event too large")
        check_value(frame.data, "data")
        if key is None:
            self.keep_for_room(principal.tenant, room, body, as_map)
        if volatile or event in self._volatile_events:
            self.stats.counts[(door, "volatile")] += 1
            return Admitted(door, principal.tenant, room, body, True, "", None, started, key,
                            frame.unset)
        return Admitted(door, principal.tenant, room, body, False,
                        dedupe_key(principal, room, frame.msg_id), ttl_s, started, key,
                        frame.unset)

    def keep_for_room(self, tenant: str, room: str, body: bytes, as_map: dict[str, Any]) -> None:
        """Where this node's room actor delivers ``body`` (the encoded ``as_map``, built and
        checked here), keep the map for it: it need not decode what was built here."""
        if self.room_here(tenant, room):
            self.recent.put(body, as_map)

    async def store(self, admitted: Admitted) -> int:
        """Store an admitted event; returns its seq (the original's for a duplicate msg_id).

        In a state room, the key's value is written (:class:`~node.core.ports.StatePort`)
        after the stream's ack and before this returns; a new key beyond the room's
        ``state_max_keys`` is refused before anything is stored.

        Raises:
            ProtocolError: 4503 with ``retry`` when the store may take it later (same
                ``msg_id``: stored once), or when the event was stored but the state could
                not be written (the retry, deduplicated, writes it); 4500 when the store
                refused it for good; 4009 when a state room is full.
        """
        door = admitted.door
        state = self.state if admitted.key is not None else None
        try:
            if (state is not None and admitted.key is not None and not admitted.unset
                    and not await state.may_add(admitted.tenant, admitted.room, admitted.key)):
                self.stats.counts[(door, "4009")] += 1
                raise ProtocolError(4009, "state room full")
            seq, duplicate = await self.store_port.publish(
                admitted.tenant, admitted.room, admitted.body, admitted.dedupe, admitted.ttl_s)
        except StoreError as exc:
            raise self._not_stored(admitted, exc) from None
        if state is not None and admitted.key is not None:
            value = cbor_loads_strict(admitted.body)
            value["seq"] = seq
            try:
                await state.put(admitted.tenant, admitted.room, admitted.key, seq, value,
                                admitted.unset)
            except StoreError as exc:
                log.warning("! state of %s (%s) not written for seq %d: %s", admitted.room,
                            door, seq, exc)
                self.stats.counts[(door, "4503")] += 1
                raise ProtocolError(4503, "event stored, state not written: retry with the "
                                          "same msg_id", retry=True) from None
        self._stored(admitted, duplicate)
        return seq

    def store_soon(self, admitted: Admitted,
                   done: Callable[[int, ProtocolError | None], None]) -> bool:
        """:meth:`store` without a coroutine where the store can (an event of a room without
        state, while the store gathers publishes into batches): later, never within this
        call, ``done(seq, None)`` or ``done(0, error)`` with the error ``store`` would raise.

        Returns:
            False when nothing was started: then ``await store(...)``.
        """
        if admitted.key is not None:
            return False
        fut = self.store_port.publish_soon(admitted.tenant, admitted.room, admitted.body,
                                           admitted.dedupe, admitted.ttl_s)
        if fut is None:
            return False
        fut.add_done_callback(functools.partial(self._stored_soon, admitted, done))
        return True

    def _stored_soon(self, admitted: Admitted, done: Callable[[int, ProtocolError | None], None],
                     fut: Settled) -> None:
        try:
            seq, duplicate = fut.result()  # one call on the path of every stored event
        except asyncio.CancelledError:
            return
        except StoreError as exc:
            done(0, self._not_stored(admitted, exc))
            return
        except Exception as exc:  # a bug of the store: the publisher may retry (same msg_id)
            log.error("! publish to %s (%s) failed: %r", admitted.room, admitted.door, exc)
            self.stats.counts[(admitted.door, "4503")] += 1
            done(0, ProtocolError(4503, "event not stored, retry", retry=True))
            return
        self._stored(admitted, duplicate)
        done(seq, None)

    def _stored(self, admitted: Admitted, duplicate: bool) -> None:
        self.stats.counts[(admitted.door, "duplicate" if duplicate else "stored")] += 1
        self.stats.latency(time.perf_counter() - admitted.started)

    def _not_stored(self, admitted: Admitted, exc: StoreError) -> ProtocolError:
        """What the publisher is told of a StoreError (counted)."""
        door = admitted.door
        log.warning("! publish to %s (%s) not stored: %s", admitted.room, door, exc)
        if exc.retry:
            self.stats.counts[(door, "4503")] += 1
            return ProtocolError(4503, "event not stored, retry", retry=True)
        self.stats.counts[(door, "4500")] += 1
        return ProtocolError(4500, "event refused by the store")

    def send_volatile(self, admitted: Admitted) -> None:
        """Send an admitted volatile event to every node (not stored).

        Raises:
            ProtocolError: 4503 with ``retry`` when it could not be sent.
        """
        try:
            self.feed.publish_volatile(admitted.tenant, admitted.room, admitted.body)
        except Exception as exc:  # NATS closed or its buffer full: nothing was sent
            self.stats.volatile_failed += 1
            log.warning("! volatile publish to %s failed: %r", admitted.room, exc)
            raise ProtocolError(4503, "event not sent, retry", retry=True) from None

    def send_volatile_quietly(self, admitted: Admitted) -> None:
        """:meth:`send_volatile` for fire and forget: a failure is counted and logged only."""
        try:
            self.send_volatile(admitted)
        except ProtocolError:
            pass


def _nowhere(tenant: str, room: str) -> bool:
    return False


def _not_state_room() -> ProtocolError:
    exc = ProtocolError(4000, NOT_STATE_ROOM)
    exc.label = "not_state_room"  # type: ignore[attr-defined]  # the plain MQTT face's label
    return exc


class VolatilePublisher:
    """One publisher's volatile events (a connection, a device), throttled per room by a
    :class:`VolatileThrottle` and sent through the admission, fire and forget.

    Args:
        admission: The node's admission pipeline.
        window_s: The throttle window (``volatile_throttle_ms``), in seconds.
    """

    def __init__(self, admission: Admission, window_s: float) -> None:
        self.admission = admission
        self.throttle: VolatileThrottle[Admitted] = VolatileThrottle(window_s)
        self.closed = False
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def publish(self, admitted: Admitted) -> None:
        """Send ``admitted`` now, or when its room's window ends (unless a newer one comes)."""
        if self.closed:
            return
        send, flush_in = self.throttle.offer(admitted.room, admitted, time.monotonic())
        if send is not None:
            self.admission.send_volatile_quietly(send)
        if flush_in is not None:
            self._timers[admitted.room] = asyncio.get_running_loop().call_later(
                flush_in, self._flush, admitted.room)

    def close(self) -> None:
        """Send nothing more (what waits for its window is dropped)."""
        self.closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _flush(self, room: str) -> None:
        self._timers.pop(room, None)
        admitted = self.throttle.flush(room, time.monotonic())
        if admitted is not None and not self.closed:
            self.admission.send_volatile_quietly(admitted)


# The maps of a VolatileThrottle until its first write: shared, never written.
_UNWRITTEN: dict[str, Any] = UNWRITTEN


class VolatileThrottle(Generic[T]):
    """At most one volatile event per key (a room) per window; the latest of a burst wins.

    Within a window the newest event replaces any waiting one, and is sent when the window ends:
    a burst of typing notices costs the room one event per window. Pure: the caller passes the
    time, sends what :meth:`offer` returns at once, and calls :meth:`flush` after the delay it
    returns.

    Args:
        window_s: The window, in seconds.
    """

    _PRUNE_AT = 1024  # keys remembered before the stale ones are forgotten

    __slots__ = ("_last", "_pending", "_prune_at", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        # Both start as one shared empty map, never written: a map of its own is made at the
        # first write (every connection has two throttles; most never send a volatile event).
        self._last: dict[str, float] = _UNWRITTEN
        self._pending: dict[str, T] = _UNWRITTEN
        # The next prune, at twice what the last one kept: keys all within their window (a
        # burst over many rooms) are not scanned again at each offer.
        self._prune_at = self._PRUNE_AT

    def offer(self, key: str, item: T, now: float) -> tuple[T | None, float | None]:
        """Offer one event.

        Returns:
            The event to send now (or None), and the seconds after which :meth:`flush` must be
            called for ``key`` (or None: a flush is already due, or nothing waits).
        """
        last = self._last.get(key)
        if key not in self._pending and (last is None or now - last >= self.window_s):
            if self._last is _UNWRITTEN:
                self._last = {}
            elif len(self._last) >= self._prune_at:
                self._last = {k: t for k, t in self._last.items() if now - t < self.window_s}
                self._prune_at = max(self._PRUNE_AT, 2 * len(self._last))
            self._last[key] = now
            return item, None
        delay = None
        if key not in self._pending:
            delay = (last if last is not None else now) + self.window_s - now
        if self._pending is _UNWRITTEN:
            self._pending = {}
        self._pending[key] = item
        return None, delay

    def flush(self, key: str, now: float) -> T | None:
        """The event that waited for ``key``'s window to end, if any: send it now."""
        pending = self._pending
        item = pending.pop(key, None)  # (nothing to pop from the shared empty map)
        if item is not None:
            if not pending:
                self._pending = _UNWRITTEN
            if self._last is _UNWRITTEN:
                self._last = {}
            self._last[key] = now
        return item
