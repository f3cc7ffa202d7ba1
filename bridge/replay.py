"""Durable replay consumers for backends: a tenant's rooms, from JetStream, at least once.

A :class:`ReplayConsumer` is a JetStream durable pull consumer on the room stream
``RTNODE_ROOMS`` (PROTOCOL.md section 9), filtered on one tenant's rooms by a room pattern
(``sensors:*``, or an exact room), yielding decoded events that the backend acknowledges::

    async with ReplayConsumer("nats://127.0.0.1:4222", rooms="sensors:*",
                              durable="billing") as consumer:
        async for ev in consumer:
            handle(ev.room, ev.seq, ev.event, ev.data)
            await ev.ack()          # or await ev.nak(delay=5), or await ev.term()

Design, in short:

* **Filter.** Room names contain no ``.`` (PROTOCOL.md section 3), so each room is exactly one
  subject token: an exact room is the subject filter ``rt.room.<tenant>.<room>``, a pattern
  ``prefix*`` is the filter ``rt.room.<tenant>.*`` and the prefix is matched here with the rule
  of token grants (:func:`node.protocol.tokens.pattern_matches`). Events of other rooms are
  acked silently.
* **Durable.** The consumer is created on first use with the ``start`` position (``"all"``,
  ``"new"``, a stream seq, inclusive, or a datetime) and is bound afterwards: ``start`` then no
  longer matters, the consumer resumes after its acked events. Its tenant and pattern are kept
  in the consumer's metadata; binding the same durable with another pattern is refused.
* **Resume.** Closing the consumer (normally, on an exception, on cancellation) naks every event
  it delivered that was not acked, and the events it had fetched but not yielded yet: the next
  run starts exactly at the first event that was not acked. After a hard kill nothing can be
  nakked: the unacked events (at most ``batch``) come back after ``ack_wait_s``, and events
  after them may come first unless ``max_ack_pending=1``. Nothing acked comes back.
* **Dead letters: counted here.** The JetStream consumer redelivers without limit
  (``max_deliver=-1`` on the server); every delivery carries its delivery count, and the
  delivery after the ``max_deliver``-th is not yielded but published to
  ``dead_letter_subject`` (default ``rt.dlq.<tenant>.<durable>``) and then terminated. This
  catches every way an event can fail (nak, ack timeout, a crash during the last attempt) without
  depending on a MAX_DELIVERIES advisory that nobody may be listening to when it fires. When a
  stream stores the dead-letter subject the publish is a JetStream publish (acked, deduplicated
  by ``Nats-Msg-Id``), else a core publish; a failed publish naks the event and tries again.
  The dead letter is the stored CBOR event map unchanged, with headers ``Rtnode-Room``,
  ``Rtnode-Tenant``, ``Rtnode-Seq``, ``Rtnode-Delivered``, ``Rtnode-Durable`` and
  ``Rtnode-Reason`` (``max_deliver``, or ``undecodable`` for a body that is not an event map:
  those go to the dead-letter subject at once). ``term()`` stops redelivery of one event without
  dead-lettering it.
* **Stalls.** Pulls are bounded requests; when one comes back empty while the consumer reports
  pending events, the pull subscription is recreated (nats.py#504).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bridge.nats_auth import NatsAuth, connect_refusal
from bridge.replay_event import ReplayError, ReplayEvent
from node.protocol.errors import CodecError
from node.protocol.frames import cbor_loads_strict
from node.protocol.subjects import STREAM_NAME, room_from_subject, room_subject
from node.protocol.tokens import pattern_matches

__all__ = [
    "ReplayConsumer",
    "ReplayError",
    "ReplayEvent",
    "Start",
    "connect_nats",
    "parse_room_pattern",
    "require_room_stream",
]

log = logging.getLogger("bridge.replay")

_ROOM_CHARS = re.compile(r"[A-Za-z0-9_:@=-]*")  # with fullmatch: Python's $ matches before \n
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_META_TENANT = "rtnode_tenant"
_META_ROOMS = "rtnode_rooms"

Start = Literal["all", "new"] | int | datetime


def parse_room_pattern(pattern: str) -> tuple[str, bool]:
    """Check a room pattern: an exact room, or a prefix followed by one final ``*``.

    Returns:
        (the exact room or the prefix, whether it is a prefix pattern).

    Raises:
        ValueError: Not a room name nor a room prefix followed by ``*``.
    """
    wildcard = pattern.endswith("*")
    body = pattern[:-1] if wildcard else pattern
    if (not wildcard and not body) or len(body) > 128 or not _ROOM_CHARS.fullmatch(body):
        raise ValueError(
            f"invalid room pattern {pattern!r}: a room name ([A-Za-z0-9_:@=-], up to 128) "
            "or a prefix ending in '*'"
        )
    return body, wildcard


async def require_room_stream(js: JetStreamContext) -> None:
    """Check that the room stream exists.

    Raises:
        ReplayError: No room stream (no node ever started on this NATS), or no JetStream.
    """
    try:
        await js.stream_info(STREAM_NAME)
    except NotFoundError:
        raise ReplayError(
            f"stream {STREAM_NAME} not found: start an rtnode node on this NATS first"
        ) from None
    except Exception as exc:
        raise ReplayError(f"JetStream not answering: {exc or type(exc).__name__}") from None


async def connect_nats(servers: Sequence[str], *, name: str = "rtnode-replay",
                       timeout_s: float = 5.0, auth: NatsAuth | None = None) -> NATS:
    """Connect once to one of ``servers`` (failing fast), then reconnect for ever.

    Args:
        servers: NATS URLs.
        name: The connection's name.
        timeout_s: Time allowed for the connect.
        auth: Credentials and TLS (default: none).

    Raises:
        ReplayError: No server answered, or it refused the credentials.
    """
    auth = auth or NatsAuth()
    nc = NATS()

    async def on_error(exc: Exception) -> None:  # nats-py would log a traceback per error
        log.debug("! NATS: %s", exc or type(exc).__name__)

    async def on_disconnected() -> None:
        # Not during the first connect, nor when closing.
        if nc.options.get("allow_reconnect") and not (nc.is_closed or nc.is_draining):
            log.warning("! NATS disconnected; reconnecting")

    try:
        await nc.connect(servers=list(servers), name=name, connect_timeout=int(timeout_s),
                         allow_reconnect=False, max_reconnect_attempts=1,
                         error_cb=on_error, disconnected_cb=on_disconnected,
                         **auth.connect_options())
    except Exception as exc:  # nats-py raises several unrelated types here
        # Bounded: after a failed TLS handshake nats-py's close() never returns.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)
        why = connect_refusal(exc, auth)
        if why:
            raise ReplayError(f"NATS at {', '.join(servers)} {why}") from None
        raise ReplayError(
            f"cannot connect to NATS at {', '.join(servers)}: {exc or type(exc).__name__}"
        ) from None
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.5
    return nc


class ReplayConsumer:
    """A durable consumer of one tenant's rooms (see the module's docstring).

    Args:
        nc_or_urls: A connected nats-py client (left open at exit), or NATS URLs (a string,
            comma-separated, or a list): the consumer then owns its connection.
        tenant: The tenant whose rooms are read.
        rooms: An exact room or a prefix ending in ``*`` (``sensors:*``; ``*`` is every room).
        durable: The durable consumer's name (letters, digits, ``-``, ``_``).
        start: Where a new durable starts: ``"all"``, ``"new"``, a stream seq (inclusive) or a
            datetime (naive: UTC). Ignored when the durable exists.
        max_deliver: Deliveries of one event before it is dead-lettered (<= 0: never).
        dead_letter_subject: Where dead letters go; default ``rt.dlq.<tenant>.<durable>``.
        ack_wait_s: An event not acked within this is delivered again.
        batch: Events fetched per pull (prefetched; nakked back at close).
        max_ack_pending: Events delivered and not yet acked, at most.
        fetch_timeout_s: How long one pull waits for new events.
        auth: Credentials and TLS for the URLs (unused with a connected client).

    Raises:
        ValueError: An invalid argument.
    """

    def __init__(
        self,
        nc_or_urls: NATS | str | Sequence[str],
        *,
        tenant: str = "default",
        rooms: str,
        durable: str,
        start: Start = "all",
        max_deliver: int = 5,
        dead_letter_subject: str | None = None,
        ack_wait_s: float = 30.0,
        batch: int = 100,
        max_ack_pending: int = 1000,
        fetch_timeout_s: float = 2.0,
        auth: NatsAuth | None = None,
    ) -> None:
        if not _NAME.fullmatch(tenant):
            raise ValueError(f"invalid tenant {tenant!r}")
        if not _NAME.fullmatch(durable):
            raise ValueError(f"invalid durable name {durable!r}: letters, digits, '-', '_'")
        self._prefix, self._wildcard = parse_room_pattern(rooms)
        if not (isinstance(start, int | datetime) or start in ("all", "new")):
            raise ValueError(f"invalid start {start!r}: 'all', 'new', a seq or a datetime")
        if isinstance(start, int) and not isinstance(start, bool) and start < 1:
            raise ValueError("start seq must be >= 1")
        if batch < 1 or max_ack_pending < 1 or ack_wait_s <= 0 or fetch_timeout_s <= 0:
            raise ValueError("batch, max_ack_pending, ack_wait_s and fetch_timeout_s must be > 0")
        self._auth = auth
        self._given_nc: NATS | None = None
        self._urls: list[str] = []
        if isinstance(nc_or_urls, NATS):
            self._given_nc = nc_or_urls
        else:
            urls = nc_or_urls.split(",") if isinstance(nc_or_urls, str) else list(nc_or_urls)
            self._urls = [u.strip() for u in urls if u.strip()]
            if not self._urls:
                raise ValueError("no NATS URL given")
        self.tenant = tenant
        self.rooms = rooms
        self.durable = durable
        self.start = start
        self.max_deliver = max_deliver
        self.dead_letter_subject = dead_letter_subject or f"rt.dlq.{tenant}.{durable}"
        self.ack_wait_s = ack_wait_s
        self.batch = batch
        self.max_ack_pending = max_ack_pending
        self.fetch_timeout_s = fetch_timeout_s
        self.dead_lettered = 0
        self.skipped = 0
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._psub: Any = None
        self._dlq_stream = False
        self._buffer: collections.deque[Msg] = collections.deque()
        self._unsettled: dict[int, Msg] = {}
        self._next_batch = 1
        self._closed = False

    # -- set-up ----------------------------------------------------------------------------

    @property
    def filter_subject(self) -> str:
        """The consumer's subject filter."""
        return room_subject(self.tenant, "*" if self._wildcard else self._prefix)

    def _config(self) -> ConsumerConfig:
        cfg = ConsumerConfig(
            name=self.durable, durable_name=self.durable,
            description=f"rtnode replay of tenant {self.tenant} rooms {self.rooms}",
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_deliver=-1,
            filter_subject=self.filter_subject, max_ack_pending=self.max_ack_pending,
            metadata={_META_TENANT: self.tenant, _META_ROOMS: self.rooms},
        )
        start = self.start
        if start == "all":
            cfg.deliver_policy = DeliverPolicy.ALL
        elif start == "new":
            cfg.deliver_policy = DeliverPolicy.NEW
        elif isinstance(start, datetime):
            cfg.deliver_policy = DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = start if start.tzinfo else start.replace(tzinfo=UTC)
        else:
            cfg.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = int(start)
        return cfg

    async def open(self) -> ReplayConsumer:
        """Connect (when given URLs), create or bind the durable.

        Raises:
            ReplayError: No NATS, no room stream, or the durable exists for other rooms.
        """
        if self._given_nc is not None:
            self._nc = self._given_nc
        else:
            self._nc = await connect_nats(self._urls, name=f"rtnode-replay-{self.durable}",
                                          auth=self._auth)
        try:
            self._js = self._nc.jetstream(timeout=5)
            await self._bind()
        except BaseException:
            await self._release_connection()
            raise
        return self

    async def _bind(self) -> None:
        js = self._js
        assert js is not None
        await require_room_stream(js)
        want = self._config()
        try:
            info = await js.consumer_info(STREAM_NAME, self.durable)
        except NotFoundError:
            info = None
        if info is None:
            await js.add_consumer(STREAM_NAME, config=want)
            log.info("= created durable %s on %s (start %s)", self.durable, self.filter_subject,
                     self.start)
        else:
            have = info.config
            meta = have.metadata or {}
            if (meta.get(_META_TENANT), meta.get(_META_ROOMS)) != (self.tenant, self.rooms):
                raise ReplayError(
                    f"durable {self.durable} exists for tenant {meta.get(_META_TENANT)} rooms "
                    f"{meta.get(_META_ROOMS)}: delete it or use another name"
                )
            if (have.ack_wait, have.max_ack_pending, have.max_deliver) != (
                    want.ack_wait, want.max_ack_pending, -1):
                await js.add_consumer(STREAM_NAME, config=dataclasses.replace(
                    have, ack_wait=want.ack_wait, max_ack_pending=want.max_ack_pending,
                    max_deliver=-1))
        try:
            await js.find_stream_name_by_subject(self.dead_letter_subject)
            self._dlq_stream = True
        except NotFoundError:
            self._dlq_stream = False
        self._psub = await js.pull_subscribe_bind(durable=self.durable, stream=STREAM_NAME)

    # -- iteration -------------------------------------------------------------------------

    def __aiter__(self) -> ReplayConsumer:
        return self

    async def __anext__(self) -> ReplayEvent:
        while True:
            if self._closed or self._psub is None:
                raise StopAsyncIteration
            if self._buffer:
                msg = self._buffer.popleft()
                ev = await self._handle(msg)
                if ev is not None:
                    return ev
                continue
            self._buffer.extend(await self._fetch())

    async def next(self, timeout: float | None = None) -> ReplayEvent | None:
        """The next event, or None if none came within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            return None

    async def _fetch(self) -> list[Msg]:
        psub = self._psub
        # Never ask for more than the server may hand out (max_ack_pending), or the pull
        # lingers until its timeout for events that cannot come.
        want = max(1, min(self._next_batch, self.max_ack_pending - len(self._unsettled)))
        try:
            msgs: list[Msg] = await psub.fetch(want, timeout=self.fetch_timeout_s)
        except TimeoutError:  # nats.errors.TimeoutError too: nothing new
            self._next_batch = 1
            await self._check_stall()
            return []
        except nats.errors.ConnectionClosedError:
            raise ReplayError("NATS connection closed") from None
        except Exception as exc:  # reconnecting, 409 status, ...: try again shortly
            log.debug("! fetch from %s: %s", self.durable, exc or type(exc).__name__)
            self._next_batch = 1
            await asyncio.sleep(0.2)
            return []
        # A backlog (num_pending) is fetched in batches whose first request takes what is
        # there at once; when caught up, one event per pull, which answers at the first event.
        pending = msgs[-1].metadata.num_pending if msgs else 0
        self._next_batch = max(1, min(self.batch, pending))
        return msgs

    async def _check_stall(self) -> None:
        js = self._js
        if js is None or self._closed:
            return
        try:
            info = await js.consumer_info(STREAM_NAME, self.durable)
        except Exception:
            return
        if info.num_pending and not info.num_ack_pending:
            log.warning("! durable %s: %d pending but nothing delivered; resubscribing",
                        self.durable, info.num_pending)
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
            self._psub = await js.pull_subscribe_bind(durable=self.durable, stream=STREAM_NAME)

    async def _handle(self, msg: Msg) -> ReplayEvent | None:
        try:
            tenant, room = room_from_subject(msg.subject)
        except ValueError:
            tenant, room = self.tenant, ""
        if not pattern_matches(self.rooms, room):
            self.skipped += 1
            await msg.ack()
            return None
        delivered = msg.metadata.num_delivered
        if 0 < self.max_deliver < delivered:
            await self._dead_letter(msg, room, "max_deliver")
            return None
        try:
            body = cbor_loads_strict(msg.data)
            if not isinstance(body, dict) or not isinstance(body.get("event"), str):
                raise CodecError("not an event map")
        except CodecError:
            await self._dead_letter(msg, room, "undecodable")
            return None
        sender = body.get("from")
        ts = body.get("ts")
        msg_id = body.get("msg_id")
        ev = ReplayEvent(
            room=room, seq=msg.metadata.sequence.stream, event=body["event"],
            data=body.get("data"), ts=ts if isinstance(ts, int) else None,
            from_=sender if isinstance(sender, dict) else {},
            msg_id=msg_id if isinstance(msg_id, str) else None,
            delivered=delivered, tenant=tenant, _msg=msg, _on_settle=self._settled,
        )
        self._unsettled[id(msg)] = msg
        return ev

    def _settled(self, msg: Msg) -> None:
        self._unsettled.pop(id(msg), None)

    async def _dead_letter(self, msg: Msg, room: str, reason: str) -> None:
        seq = msg.metadata.sequence.stream
        headers = {
            "Rtnode-Room": room, "Rtnode-Tenant": self.tenant, "Rtnode-Seq": str(seq),
            "Rtnode-Delivered": str(msg.metadata.num_delivered - (reason == "max_deliver")),
            "Rtnode-Durable": self.durable, "Rtnode-Reason": reason,
            "Nats-Msg-Id": f"rtnode-dlq:{self.durable}:{seq}",
        }
        nc, js = self._nc, self._js
        assert nc is not None and js is not None
        try:
            if self._dlq_stream:
                await js.publish(self.dead_letter_subject, msg.data, headers=headers)
            else:
                await nc.publish(self.dead_letter_subject, msg.data, headers=headers)
                await nc.flush(timeout=5)
        except Exception as exc:
            log.warning("! dead letter of %s seq %d not published (%s): retried later",
                        room, seq, exc or type(exc).__name__)
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(self.ack_wait_s, 5.0))
            return
        self.dead_lettered += 1
        log.warning("! %s seq %d dead-lettered to %s (%s)", room, seq,
                    self.dead_letter_subject, reason)
        await msg.term()

    # -- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Nak what was delivered and not acked, and close the connection if it is ours.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        nc = self._nc
        unsettled = list(self._unsettled.values()) + list(self._buffer)
        self._unsettled.clear()
        self._buffer.clear()
        if nc is not None and nc.is_connected:
            for msg in unsettled:
                with contextlib.suppress(Exception):
                    await msg.nak()
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
            self._psub = None
        await self._release_connection()

    async def _release_connection(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
            return
        if nc is self._given_nc:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=2)
            return
        try:
            await asyncio.wait_for(nc.drain(), 5)
        except Exception:
            with contextlib.suppress(Exception):
                await nc.close()

    async def __aenter__(self) -> ReplayConsumer:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
