"""Room events as stored: the event map and its dedupe key. Pure functions shared by every
door an event comes in by (WebSocket and MQTT connections, the HTTP API)."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from node.core.ports import RoomStore
from node.protocol.errors import ProtocolError
from node.protocol.frames import CBOR, cbor_loads_strict
from node.protocol.tokens import Principal

__all__ = [
    "EVENT_FIELDS", "RecentEvents", "dedupe_key", "event_body", "event_frame", "event_map",
    "fit_history", "now_ms", "read_history",
]


#: The fields of a stored event map that an ``event`` frame carries (PROTOCOL.md section 1).
EVENT_FIELDS = ("event", "data", "ts", "from", "msg_id", "key", "unset")


def event_frame(room: str, seq: int | None, event: Any) -> dict[str, Any] | None:
    """The ``event`` frame of a stored event map (``type`` first), or None when ``event`` is
    not an event map (a backend may publish anything to the stream)."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return None
    frame: dict[str, Any] = {"type": "event", "room": room}
    if seq is not None:
        frame["seq"] = seq
    for key in EVENT_FIELDS:
        if key in event:
            frame[key] = event[key]
    return frame


def now_ms() -> int:
    """Milliseconds since the epoch (the ``ts`` of events)."""
    return int(time.time() * 1000)


def event_map(
    room: str,
    event: str,
    data: Any,
    principal: Principal,
    client_id: str | None,
    msg_id: str | None,
    key: str | None = None,
    unset: bool = False,
) -> dict[str, Any]:
    """The event map stored in the stream (PROTOCOL.md section 9), before it is encoded.

    ``from`` always comes from the principal (the token), never from the client. ``key`` (and
    ``unset: true`` when the event removes it) only in a state room.
    """
    sender: dict[str, Any] = {"user": principal.sub, "kind": principal.kind}
    if client_id is not None:
        sender["client_id"] = client_id
    body: dict[str, Any] = {
        "room": room, "event": event, "data": data, "ts": now_ms(), "from": sender,
    }
    if key is not None:
        body["key"] = key
        if unset:
            body["unset"] = True
    if msg_id is not None:
        body["msg_id"] = msg_id
    return body


def event_body(
    room: str,
    event: str,
    data: Any,
    principal: Principal,
    client_id: str | None,
    msg_id: str | None,
) -> bytes:
    """The CBOR event map stored in the stream (:func:`event_map`, encoded)."""
    return CBOR.encode(event_map(room, event, data, principal, client_id, msg_id))


class RecentEvents:
    """The event maps this node admitted lately, by their stored bytes, until the node's room
    actor delivers them: the live path then skips the strict decode of what admission built
    and checked itself (the decode of a body is ~8% of an event's CPU in a busy room).

    Sound because equal bytes are equal maps: a map is only put beside the bytes it was
    encoded to, after the value model accepted it, and every node decodes those bytes to an
    equal map (``test_recent_events`` holds deliveries byte-identical in every codec). Each map
    is taken at most once; what is never taken (a store that failed, a room that stopped) is
    pushed out, oldest first, past ``capacity`` maps or ``max_bytes`` of bodies.
    """

    __slots__ = ("_bytes", "_maps", "capacity", "hits", "max_bytes")

    def __init__(self, capacity: int = 4096, max_bytes: int = 8 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.hits = 0  # maps taken: deliveries that needed no decode
        self._maps: dict[bytes, dict[str, Any]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._maps)

    def put(self, body: bytes, event: dict[str, Any]) -> None:
        """Keep ``event``, the map ``body`` encodes, until a delivery takes it."""
        maps = self._maps
        old = maps.pop(body, None)
        if old is not None:
            self._bytes -= len(body)
        maps[body] = event
        self._bytes += len(body)
        while len(maps) > self.capacity or self._bytes > self.max_bytes:
            oldest = next(iter(maps))
            del maps[oldest]
            self._bytes -= len(oldest)

    def take(self, body: bytes) -> dict[str, Any] | None:
        """The map of ``body`` if this node admitted it lately (and forget it), else None."""
        event = self._maps.pop(body, None)
        if event is not None:
            self._bytes -= len(body)
            self.hits += 1
        return event


class _Keys:
    """The node's own dedupe keys: a random prefix of the process and a counter.

    As unique as a uuid4 each (96 random bits per process, then a count), without reading the
    OS's randomness once per event; a forked child draws its own prefix.
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(12)
        self.count = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.count):x}"


_KEYS = _Keys()


def dedupe_key(principal: Principal, room: str, msg_id: str | None) -> str:
    """The ``Nats-Msg-Id`` of a publish.

    Scoped to tenant, room and publisher: nobody can suppress another's events by reusing
    their msg_id. Without a msg_id the node still sets a key of its own, so that its internal
    retries (leader election, reconnect) never store an event twice. A msg_id a NATS header
    would change on its way (spaces, control characters) is escaped, and so is ``%``.
    """
    key = _KEYS.next() if msg_id is None else msg_id if _header_safe(msg_id) \
        else _escape_msg_id(msg_id)
    return f"{principal.tenant}/{room}/{principal.sub}/{key}"


def _header_safe(msg_id: str) -> bool:
    # Printable and without space or %: what a NATS header carries as it is (most msg_ids).
    return msg_id.isprintable() and " " not in msg_id and "%" not in msg_id


def _escape_msg_id(msg_id: str) -> str:
    """``msg_id`` with ``%``, spaces and every character that is not printable as ``%XX`` of
    its UTF-8 bytes: one key per msg_id. A header value loses its trailing whitespace and has CR
    and LF made spaces on its way (nats-py, nats-server), so ``a``, ``a `` and ``a\u3000``, or
    ``a\nb`` and ``a b``, were one key: the second publish was answered with the first's seq
    and never stored."""
    return "".join(
        c if c.isprintable() and c not in " %"
        else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in msg_id)


async def read_history(
    store: RoomStore, tenant: str, room: str, *, since: int | None, limit: int, reverse: bool
) -> tuple[list[dict[str, Any]], int]:
    """A ``history`` answer: the event maps (with ``room`` and ``seq``) and the latest seq.

    Stored messages that are not event maps (a backend may publish anything to the stream)
    are skipped. Raises StoreError.
    """
    latest = await store.last_seq(tenant, room)
    stored = await store.history(tenant, room, since=since, limit=limit, reverse=reverse)
    events = []
    for ev in stored:
        try:
            event = cbor_loads_strict(ev.body)
        except ProtocolError:
            continue
        if isinstance(event, dict):
            event["room"] = room
            event["seq"] = ev.seq
            events.append(event)
    return events, latest


def fit_history(events: list[dict[str, Any]], encode: Callable[[Any], bytes], budget: int, *,
                keep_last: bool) -> tuple[list[dict[str, Any]], bool]:
    """The events of a ``history`` page that fit in ``budget`` bytes as ``encode`` writes them,
    and whether some were left out (the reply then says ``more: true``).

    A page is one frame, and a connection's outbox refuses more than ``slow_consumer_bytes``
    at once (4008): 100 events of 11 KB, or 16 of 64 KB of NUL characters (6 bytes each in
    JSON), closed the connection of every reader that asked, and again when it came back. The
    events kept are those next to where the page starts: the newest for a page of the latest
    events in ascending order (``keep_last``), else the first; always at least one, so that a
    reader paging on always moves on.
    """
    ordered = reversed(events) if keep_last else iter(events)
    kept: list[dict[str, Any]] = []
    size = 0
    for event in ordered:  # encodes no more than the budget and one event
        size += len(encode(event))
        if kept and size > budget:
            break
        kept.append(event)
    if len(kept) == len(events):
        return events, False
    if keep_last:
        kept.reverse()
    return kept, True
