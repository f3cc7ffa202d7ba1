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
  longer matters, the consumer resumes after its acked events. Its tenant, pattern and partition
  count are kept in the consumer's metadata; binding the same durable otherwise is refused.
* **One active process, standbys (JetStream priority groups, pinned client).** Any number of
  processes may run the same durable: the server pins one of them, the others' pulls wait. The
  pinned one keeps its pin by pulling at least every ``priority_timeout_s / 2``; when it stops
  (killed, hung, cut off), the server unpins it after ``priority_timeout_s`` and pins a standby.
  Closing a consumer unpins it at once.
* **In order after a crash.** A process that becomes pinned first resets the consumer to its ack
  floor (``$JS.API.CONSUMER.RESET``, nats-server 2.14): everything the previous process left
  unacked (fetched, being handled, or lost with it) comes next, in stream order, before anything
  newer. Without the reset those events would come back only after ``ack_wait``, after later ones.
  Events acked *above* the floor (acked out of order) are delivered again: at least once. The
  reset also restarts the delivery counts.
* **Per-room order, always.** Events come in stream order. ``on_retry`` says what ``nak()``
  does to the events behind it: ``"block"`` (default) delivers the nakked event again (after
  its delay) before any later event of its room, the other rooms going on; ``"skip"``
  dead-letters it at once (reason ``skip``) and the room goes on. With ``serial_rooms=True`` an
  event of a room is not handed out while an earlier one of that room is unsettled (not acked,
  termed or dead-lettered), so a caller may handle several rooms at once (the webhook runner
  does) and keep each room in order. Events held in the consumer (fetched, yielded,
  blocked) get ``in_progress`` every ``ack_wait_s / 3``: a slow handler does not cause
  redeliveries. When ``max_ack_pending`` events are held, everything waits.
* **Groups (partitions).** With ``partitions=N`` the durable is N JetStream consumers
  (``<durable>-0`` ... ``-<N-1>``), each taking the rooms whose ``crc32(room) % N`` is its index
  (it reads the tenant's other events and acks them unseen). The processes of a group announce
  themselves on ``rt.grp.<tenant>.<durable>`` every second, and each works out alike, from the
  ids it hears, which live process serves each partition
  (:func:`bridge.replay_groups.assign_partitions`: balanced, and a change of membership moves
  few partitions); the others stand by for it. A process that loses a partition to a newcomer
  waits (up to ``0.8 * priority_timeout_s``) for its events of that partition to be settled,
  then unpins it; one that dies is replaced when its pins time out.
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
  ``Rtnode-Reason`` (``max_deliver``, ``skip``, or ``undecodable`` for a body that is not an
  event map: those go to the dead-letter subject at once). ``term()`` stops redelivery of one
  event without dead-lettering it.
* **Pulls** are raw ``$JS.API.CONSUMER.MSG.NEXT`` requests (nats-py has no priority groups):
  one outstanding per partition, for up to ``batch`` events, renewed every
  ``min(fetch_timeout_s, priority_timeout_s / 2)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import socket
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bridge import _nats_patches
from bridge.nats_auth import NatsAuth, connect_refusal
from bridge.replay_event import ReplayError, ReplayEvent
from bridge.replay_groups import SCHEME, assign_partitions, sorted_modulo
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
    "partition_of",
    "require_room_stream",
]

log = logging.getLogger("bridge.replay")

_ROOM_CHARS = re.compile(r"[A-Za-z0-9_:@=-]*")  # with fullmatch: Python's $ matches before \n
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_META_TENANT = "rtnode_tenant"
_META_ROOMS = "rtnode_rooms"
_META_PARTITIONS = "rtnode_partitions"
_GROUP = "rtnode"            # the priority group every pull names
_HEARTBEAT_S = 1.0           # a group member announces itself this often
_MEMBER_TTL_S = 3.5          # and is gone when not heard for this long
_API = "$JS.API.CONSUMER"
_NOT_FOUND = 10014           # JetStream error code: consumer not found
_RESET_TRIES = 3             # takeovers in a row whose reset failed before serving without one

Start = Literal["all", "new"] | int | datetime
OnRetry = Literal["block", "skip"]


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


def partition_of(room: str, partitions: int) -> int:
    """The partition of a group that takes ``room``: ``crc32(room) % partitions``."""
    return zlib.crc32(room.encode()) % partitions if partitions > 1 else 0


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
    _nats_patches.install()  # a flush that follows what was sent before it (dead letters)
    nc = NATS()

    async def on_error(exc: Exception) -> None:  # nats-py would log a traceback per error
        log.debug("! NATS: %s", exc or type(exc).__name__)

    async def on_disconnected() -> None:
        # Not during the first connect, nor when closing.
        if nc.options.get("allow_reconnect") and not (nc.is_closed or nc.is_draining):
            log.warning("! NATS disconnected; reconnecting")

    try:
        # A server that hangs (paused, a half-open link) is left within 6-8 s, as the node
        # does (bridge.nats_link): 3 unanswered pings 2 s apart. nats-py's default (2 of 120 s)
        # kept a consumer on it, handling nothing, for up to 4 minutes.
        await nc.connect(servers=list(servers), name=name, connect_timeout=int(timeout_s),
                         allow_reconnect=False, max_reconnect_attempts=1,
                         ping_interval=2, max_outstanding_pings=3,
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


class _ApiError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


@dataclass(eq=False)
class _Part:
    """One JetStream consumer of the durable (a partition) as this process sees it."""

    index: int
    name: str
    assigned: bool = False
    pin: str | None = None
    sub: Subscription | None = None
    inbox: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    reset_failures: int = 0  # takeovers in a row whose reset failed


@dataclass(eq=False)
class _Held:
    """An event delivered to this process and not settled yet."""

    msg: Msg
    part: _Part
    room: str
    seq: int
    since: float


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
        ack_wait_s: An event not acked (nor kept in progress) within this is delivered again.
        batch: Events asked for per pull.
        max_ack_pending: Events delivered and not yet acked, at most, per partition.
        fetch_timeout_s: How long one pull waits for new events.
        auth: Credentials and TLS for the URLs (unused with a connected client).
        partitions: Partitions of the group (1 to 64); every process of the group gives the
            same number.
        on_retry: What ``nak()`` does: ``"block"`` its room until it is redelivered, or
            ``"skip"``: dead-letter it at once.
        priority_timeout_s: How long the server waits for a silent pinned process before a
            standby takes over.
        serial_rooms: Hand out an event of a room only when the earlier ones of that room are
            settled: for callers that handle several events at once (one room at a time each).

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
        partitions: int = 1,
        on_retry: OnRetry = "block",
        priority_timeout_s: float = 5.0,
        serial_rooms: bool = False,
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
        if isinstance(partitions, bool) or not 1 <= partitions <= 64:
            raise ValueError(f"invalid partitions {partitions!r}: 1 to 64")
        if on_retry not in ("block", "skip"):
            raise ValueError(f"invalid on_retry {on_retry!r}: 'block' or 'skip'")
        if not 1.0 <= priority_timeout_s <= 3600:
            raise ValueError("priority_timeout_s must be between 1 and 3600 seconds")
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
        self.partitions = partitions
        self.on_retry: OnRetry = on_retry
        self.priority_timeout_s = priority_timeout_s
        self.serial_rooms = serial_rooms
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.dead_lettered = 0
        self.skipped = 0
        self.takeovers = 0
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._dlq_stream = False
        names = [durable] if partitions == 1 else [f"{durable}-{i}" for i in range(partitions)]
        self._parts = [_Part(i, name) for i, name in enumerate(names)]
        self._queue: list[_Held] = []           # delivered, not yielded yet, in arrival order
        self._unsettled: dict[int, _Held] = {}  # yielded, not settled, by seq
        self._blocked: dict[str, int] = {}      # room -> the seq that must settle first
        self._wake = asyncio.Event()
        self._error: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._members: dict[str, float] = {}  # id -> when it was last heard
        self._older: set[str] = set()  # members that announce no SCHEME: the group uses i % W
        self._owners: tuple[frozenset[str], bool, list[str]] | None = None  # the last answer
        self._member_sub: Subscription | None = None
        self._closed = False

    # -- set-up ----------------------------------------------------------------------------

    @property
    def filter_subject(self) -> str:
        """The consumer's subject filter."""
        return room_subject(self.tenant, "*" if self._wildcard else self._prefix)

    @property
    def serving(self) -> list[int]:
        """The partitions this process is pinned to now."""
        return [p.index for p in self._parts if p.pin]

    def _config(self, part: _Part) -> dict[str, Any]:
        cfg = ConsumerConfig(
            name=part.name, durable_name=part.name,
            description=f"rtnode replay of tenant {self.tenant} rooms {self.rooms}"
            + (f" (partition {part.index} of {self.partitions})" if self.partitions > 1 else ""),
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_deliver=-1,
            filter_subject=self.filter_subject, max_ack_pending=self.max_ack_pending,
            metadata={_META_TENANT: self.tenant, _META_ROOMS: self.rooms,
                      _META_PARTITIONS: str(self.partitions)},
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
        out = cfg.as_dict()
        out.update(self._priority())
        return out

    def _priority(self) -> dict[str, Any]:
        return {"priority_groups": [_GROUP], "priority_policy": "pinned_client",
                "priority_timeout": int(self.priority_timeout_s * 1e9)}

    async def _api(self, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        nc = self._nc
        assert nc is not None
        body = json.dumps(payload).encode() if payload is not None else b""
        resp = await nc.request(subject, body, timeout=5)
        data: dict[str, Any] = json.loads(resp.data or b"{}")
        err = data.get("error")
        if err:
            raise _ApiError(int(err.get("err_code") or err.get("code") or 0),
                            str(err.get("description") or err))
        return data

    async def open(self) -> ReplayConsumer:
        """Connect (when given URLs), create or bind the durable, start pulling.

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
            await require_room_stream(self._js)
            for part in self._parts:
                await self._bind(part)
            try:
                await self._js.find_stream_name_by_subject(self.dead_letter_subject)
                self._dlq_stream = True
            except NotFoundError:
                self._dlq_stream = False
            except Exception as exc:  # a timeout during a leader election: one ReplayError
                raise ReplayError(f"JetStream not answering: {exc or type(exc).__name__}") \
                    from None
        except BaseException:
            await self._release_connection()
            raise
        loop = asyncio.get_running_loop()
        for part in self._parts:
            part.task = loop.create_task(self._pump(part))
            self._tasks.append(part.task)
        self._tasks.append(loop.create_task(self._keep_in_progress()))
        if self.partitions == 1:
            self._parts[0].assigned = True
            self._parts[0].wake.set()
        else:
            self._member_sub = await self._nc.subscribe(self._group_subject, cb=self._heard)
            self._tasks.append(loop.create_task(self._announce()))
        return self

    async def _bind(self, part: _Part) -> None:
        try:
            info = await self._api(f"{_API}.INFO.{STREAM_NAME}.{part.name}")
        except _ApiError as exc:
            if exc.code != _NOT_FOUND:
                raise ReplayError(f"durable {part.name}: {exc}") from None
            info = None
        except Exception as exc:
            raise ReplayError(f"JetStream not answering: {exc or type(exc).__name__}") from None
        if info is None:
            cfg = self._config(part)
            log.info("= created durable %s on %s (start %s)", part.name, self.filter_subject,
                     self.start)
        else:
            cfg = dict(info.get("config") or {})
            meta = cfg.get("metadata") or {}
            have = (meta.get(_META_TENANT), meta.get(_META_ROOMS),
                    meta.get(_META_PARTITIONS, "1"))
            if have != (self.tenant, self.rooms, str(self.partitions)):
                raise ReplayError(
                    f"durable {self.durable} exists for tenant {have[0]} rooms {have[1]} "
                    f"partitions {have[2]}: delete it or use another name"
                )
            want = {"ack_wait": int(self.ack_wait_s * 1e9), "max_ack_pending":
                    self.max_ack_pending, "max_deliver": -1, **self._priority()}
            if all(cfg.get(k) == v for k, v in want.items()):
                return
            cfg.update(want)
            meta[_META_PARTITIONS] = str(self.partitions)
            cfg["metadata"] = meta
        try:
            await self._api(f"{_API}.CREATE.{STREAM_NAME}.{part.name}",
                            {"stream_name": STREAM_NAME, "config": cfg})
        except _ApiError as exc:
            raise ReplayError(f"cannot create durable {part.name}: {exc}") from None

    # -- group membership (partitions > 1) -------------------------------------------------

    @property
    def _group_subject(self) -> str:
        return f"rt.grp.{self.tenant}.{self.durable}"

    async def _heard(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            member = json.loads(msg.data)
            if (isinstance(member, dict) and isinstance(member.get("id"), str)
                    and member.get("partitions") == self.partitions):
                self._members[member["id"]] = asyncio.get_running_loop().time()
                if member.get("assign") == SCHEME:
                    self._older.discard(member["id"])
                else:
                    self._older.add(member["id"])

    def _owner_list(self) -> list[str]:
        """The owner of each partition for the members heard now (bridge/replay_groups.py)."""
        members, older = frozenset(self._members), bool(self._older)
        if self._owners is None or self._owners[:2] != (members, older):
            assign = sorted_modulo if older else assign_partitions
            self._owners = (members, older, assign(members, self.partitions))
        return self._owners[2]

    async def _announce(self) -> None:
        nc, loop = self._nc, asyncio.get_running_loop()
        assert nc is not None
        hello = json.dumps({"id": self.worker_id, "partitions": self.partitions,
                            "assign": SCHEME}).encode()
        first = True
        while not self._closed:
            with contextlib.suppress(Exception):
                await nc.publish(self._group_subject, hello)
            if first:  # hear who else is there before taking anything
                first = False
                await asyncio.sleep(_HEARTBEAT_S * 1.2)
            now = loop.time()
            self._members[self.worker_id] = now
            for member, seen in list(self._members.items()):
                if now - seen > _MEMBER_TTL_S:
                    del self._members[member]
                    self._older.discard(member)
            owners = self._owner_list()
            for part in self._parts:
                mine = owners[part.index] == self.worker_id
                if mine != part.assigned:
                    part.assigned = mine
                    part.wake.set()
            await asyncio.sleep(_HEARTBEAT_S)

    # -- pulling ---------------------------------------------------------------------------

    async def _pump(self, part: _Part) -> None:
        """Keep one pull outstanding on ``part`` while it is ours to serve."""
        try:
            while not self._closed:
                if not part.assigned:
                    if part.pin or part.sub:
                        # It may be ours again by the time the release ends (up to
                        # 0.8 * priority_timeout_s for the events to settle, then the unpin):
                        # look again, the wake-up it got meanwhile is not cleared.
                        await self._release(part)
                        continue
                    part.wake.clear()
                    await part.wake.wait()
                    continue
                await self._pull_once(part)
        except asyncio.CancelledError:
            raise
        except nats.errors.ConnectionClosedError:
            self._fail(ReplayError("NATS connection closed"))
        except ReplayError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: say it, do not hang the iterator
            log.exception("! durable %s: pulling partition %d failed", self.durable, part.index)
            self._fail(ReplayError(f"pulling failed: {exc or type(exc).__name__}"))

    async def _pull_once(self, part: _Part) -> None:
        nc = self._nc
        assert nc is not None
        loop = asyncio.get_running_loop()
        if part.sub is None:
            inbox: asyncio.Queue[Msg] = asyncio.Queue()

            async def put(msg: Msg) -> None:
                inbox.put_nowait(msg)

            part.inbox = inbox
            part.sub = await nc.subscribe(nc.new_inbox() + ".*", cb=put,
                                          pending_msgs_limit=-1, pending_bytes_limit=-1)
        sub, inbox = part.sub, part.inbox
        reply = sub.subject[:-1] + secrets.token_hex(4)
        expires = min(self.fetch_timeout_s, self.priority_timeout_s / 2)
        want = min(self.batch, self.max_ack_pending)
        request: dict[str, Any] = {"batch": want, "expires": int(expires * 1e9), "group": _GROUP}
        if part.pin:
            request["id"] = part.pin
        try:
            await nc.publish(f"{_API}.MSG.NEXT.{STREAM_NAME}.{part.name}",
                             json.dumps(request).encode(), reply=reply)
        except nats.errors.ConnectionClosedError:
            raise
        except Exception as exc:  # reconnecting: try again shortly
            log.debug("! pull on %s: %s", part.name, exc or type(exc).__name__)
            await asyncio.sleep(0.2)
            return
        deadline = loop.time() + expires + 1.0
        got = 0
        while got < want and part.sub is sub and part.assigned and not self._closed:
            try:
                msg = inbox.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    msg = await asyncio.wait_for(inbox.get(), max(0.01, deadline - loop.time()))
                except TimeoutError:
                    return  # the request got lost (a reconnect): ask again
            headers = msg.headers or {}
            status = headers.get("Status")
            if status and not msg.reply:
                if msg.subject != reply:
                    continue  # the end of an earlier request
                if status == "100":
                    continue
                if status == "423":  # not the pin: another process holds it, or the
                    # consumer's leader changed (a new leader forgets the pins)
                    if part.pin:
                        log.warning("! durable %s: partition %d no longer pinned to %s (another "
                                    "process holds it, or its leader changed)", self.durable,
                                    part.index, self.worker_id)
                        self._drop(part, unpinned=True)
                        part.pin = None
                    return
                if status in ("404", "408"):
                    if part.pin is None:
                        await self._unstick(part)
                    return
                description = headers.get("Description", "")
                if status == "409" and "Deleted" in description:
                    raise ReplayError(f"durable {part.name} was deleted")
                if status == "400":
                    raise ReplayError(f"durable {part.name}: {description}")
                log.debug("! pull on %s: %s %s", part.name, status, description)
                await asyncio.sleep(0.2)
                return
            pin = headers.get("Nats-Pin-Id")
            if pin and pin != part.pin:
                await self._take_over(part, pin)
                return
            got += 1
            await self._arrive(part, msg)

    async def _take_over(self, part: _Part, pin: str) -> None:
        """Pinned to ``part``: drop this pull and start at the ack floor."""
        sub, part.sub = part.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._drop(part, unpinned=False)
        try:
            reset = await self._api(f"{_API}.RESET.{STREAM_NAME}.{part.name}")
            at = reset.get("reset_seq")
            part.reset_failures = 0
        except Exception as exc:
            part.reset_failures += 1
            why = exc or type(exc).__name__
            if (part.reset_failures < _RESET_TRIES
                    and not isinstance(exc, nats.errors.NoRespondersError)):
                # Not answered (a leader election): not served yet. Served now, the events
                # left unacked would come back after ack_wait, behind later ones of their
                # rooms. The pulls do not name this pin, so it lapses (priority_timeout_s) and
                # the server pins a process again, whose takeover resets.
                log.info("! durable %s: reset of %s failed (%s); waiting to be pinned again",
                         self.durable, part.name, why)
                return
            # A server without the reset API (no responders), or one that keeps failing: at
            # least once, as before.
            log.warning("! durable %s: reset of %s failed (%s); unacked events come back "
                        "after ack_wait", self.durable, part.name, why)
            part.reset_failures = 0
            at = None
        # A room of this partition waiting for the redelivery of a nakked event (from an
        # earlier time this process served it) gets it now only if it is at or above the
        # floor: one below was settled meanwhile (by the process that served the partition),
        # and would block its room here for ever.
        self._drop(part, unpinned=True, below=at if isinstance(at, int) else None)
        part.pin = pin
        self.takeovers += 1
        log.info("= durable %s: %s serves partition %d from seq %s", self.durable,
                 self.worker_id, part.index, at)

    async def _unstick(self, part: _Part) -> None:
        """A standby whose pull got nothing: when no process holds the pin while events are
        still out (the holder died after taking all there was), reset to the ack floor, so that
        those events are delivered now (pinning a waiting process) instead of after
        ack_wait."""
        try:
            info = await self._api(f"{_API}.INFO.{STREAM_NAME}.{part.name}")
        except Exception:
            return
        groups = info.get("priority_groups") or [{}]
        if groups[0].get("pinned_client_id") or not info.get("num_ack_pending"):
            return
        with contextlib.suppress(Exception):
            await self._api(f"{_API}.RESET.{STREAM_NAME}.{part.name}")
            log.info("= durable %s: partition %d had no holder and %d events out: reset",
                     self.durable, part.index, info.get("num_ack_pending"))

    async def _release(self, part: _Part) -> None:
        """No longer ours: let the events handed out settle, then unpin."""
        sub, part.sub = part.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._drop(part, unpinned=False)
        if part.pin is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.8 * self.priority_timeout_s
        while (any(h.part is part for h in self._unsettled.values())
               and loop.time() < deadline and not self._closed):
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
        await self._unpin(part)

    async def _unpin(self, part: _Part) -> None:
        if part.pin is None:
            return
        part.pin = None
        try:
            await self._api(f"{_API}.UNPIN.{STREAM_NAME}.{part.name}", {"group": _GROUP})
            log.info("= durable %s: %s let go of partition %d", self.durable, self.worker_id,
                     part.index)
        except Exception as exc:  # the server unpins it after priority_timeout_s anyway
            log.info("! durable %s: %s could not let go of partition %d (%s); it is unpinned "
                     "after priority_timeout_s", self.durable, self.worker_id, part.index,
                     exc or type(exc).__name__)

    def _drop(self, part: _Part, *, unpinned: bool, below: int | None = None) -> None:
        """Forget the events of ``part`` not yet handed out (the next holder of the pin resets
        to the ack floor and gets them); with ``unpinned``, also unblock its rooms waiting for
        a redelivery that will now go elsewhere, or (``below``, the seq a reset to the ack
        floor starts at) that will not come again: those waiting for an event below it."""
        self._queue = [h for h in self._queue if h.part is not part]
        if unpinned:
            waiting = {h.room for h in self._unsettled.values() if h.part is part}
            for room in [r for r, seq in self._blocked.items() if r not in waiting
                         and partition_of(r, self.partitions) == part.index
                         and (below is None or seq < below)]:
                del self._blocked[room]

    async def _arrive(self, part: _Part, msg: Msg) -> None:
        try:
            _tenant, room = room_from_subject(msg.subject)
        except ValueError:
            room = ""
        if not pattern_matches(self.rooms, room) or partition_of(room, self.partitions) != \
                part.index:
            self.skipped += 1
            await msg.ack()
            return
        self._queue.append(_Held(msg, part, room, msg.metadata.sequence.stream,
                                 asyncio.get_running_loop().time()))
        self._wake.set()

    async def _keep_in_progress(self) -> None:
        """Events held here (queued, handed out, blocked) do not time out under a slow
        handler."""
        every = self.ack_wait_s / 3
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(every)
            now = loop.time()
            for held in [*self._queue, *self._unsettled.values()]:
                if now - held.since >= every:
                    held.since = now
                    with contextlib.suppress(Exception):
                        await held.msg.in_progress()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake.set()

    # -- iteration -------------------------------------------------------------------------

    def __aiter__(self) -> ReplayConsumer:
        return self

    async def __anext__(self) -> ReplayEvent:
        while True:
            if self._error is not None:
                raise self._error
            if self._closed or self._nc is None:
                raise StopAsyncIteration
            held = self._pick()
            if held is not None:
                ev = await self._handle(held)
                if ev is not None:
                    return ev
                continue
            self._wake.clear()
            await self._wake.wait()

    async def next(self, timeout: float | None = None) -> ReplayEvent | None:
        """The next event, or None if none came within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            return None

    def _pick(self) -> _Held | None:
        """The first queued event whose room is not waiting for an earlier event."""
        queue = self._queue
        i = 0
        while i < len(queue):
            held = queue[i]
            if held.seq in self._unsettled:  # a redelivery of one being handled: drop it
                del queue[i]
                continue
            blocking = self._blocked.get(held.room)
            if blocking is None or blocking == held.seq:
                del queue[i]
                return held
            i += 1
        return None

    async def _handle(self, held: _Held) -> ReplayEvent | None:
        msg = held.msg
        delivered = msg.metadata.num_delivered
        if self.serial_rooms:
            self._blocked[held.room] = held.seq
        if 0 < self.max_deliver < delivered:
            await self._dead_letter(held, "max_deliver")
            return None
        try:
            body = cbor_loads_strict(msg.data)
            if not isinstance(body, dict) or not isinstance(body.get("event"), str):
                raise CodecError("not an event map")
        except CodecError:
            await self._dead_letter(held, "undecodable")
            return None
        sender = body.get("from")
        ts = body.get("ts")
        msg_id = body.get("msg_id")
        key = body.get("key")
        ev = ReplayEvent(
            room=held.room, seq=held.seq, event=body["event"], data=body.get("data"),
            ts=ts if isinstance(ts, int) else None,
            from_=sender if isinstance(sender, dict) else {},
            msg_id=msg_id if isinstance(msg_id, str) else None,
            delivered=delivered, tenant=self.tenant,
            key=key if isinstance(key, str) else None,
            unset=isinstance(key, str) and body.get("unset") is True,
            _msg=msg, _on_settle=self._settle,
        )
        self._unsettled[held.seq] = held
        return ev

    def _unblock(self, held: _Held) -> None:
        if self._blocked.get(held.room) == held.seq:
            del self._blocked[held.room]
        self._wake.set()

    async def _settle(self, ev: ReplayEvent, msg: Msg, how: str, delay: float | None) -> None:
        held = self._unsettled.pop(ev.seq, None)
        if held is None:  # handed out before a takeover elsewhere: settle it anyway
            held = _Held(msg, self._parts[partition_of(ev.room, self.partitions)], ev.room,
                         ev.seq, 0.0)
        try:
            if how == "ack":
                await msg.ack()
            elif how == "term":
                await msg.term()
            elif self.on_retry == "skip":
                await self._dead_letter(held, "skip")
                return
            else:
                self._blocked[held.room] = held.seq  # its room waits for the redelivery
                await msg.nak(delay=delay)
                self._wake.set()
                return
        finally:
            if how != "nak":
                self._unblock(held)

    async def _dead_letter(self, held: _Held, reason: str) -> None:
        msg, room, seq = held.msg, held.room, held.seq
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
            self._blocked[room] = seq  # the room waits for the redelivery
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(self.ack_wait_s, 5.0))
            return
        self.dead_lettered += 1
        log.warning("! %s seq %d dead-lettered to %s (%s)", room, seq,
                    self.dead_letter_subject, reason)
        try:
            await msg.term()
        finally:
            self._unblock(held)

    # -- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Nak what was delivered and not acked, let go of the pins (a standby takes over at
        once), and close the connection if it is ours. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        nc = self._nc
        unsettled = [h.msg for h in self._unsettled.values()] + [h.msg for h in self._queue]
        self._unsettled.clear()
        self._queue.clear()
        if nc is not None and nc.is_connected:
            for msg in unsettled:
                with contextlib.suppress(Exception):
                    await msg.nak()
            for part in self._parts:
                if part.sub is not None:
                    with contextlib.suppress(Exception):
                        await part.sub.unsubscribe()
                    part.sub = None
                await self._unpin(part)
            if self._member_sub is not None:
                with contextlib.suppress(Exception):
                    await self._member_sub.unsubscribe()
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
