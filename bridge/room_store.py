"""JetStream as the room store and the live feed (PROTOCOL.md section 9).

Publishes are pipelined: each one is a plain NATS publish with its own reply inbox, and the
JetStream acks come back on one wildcard subscription, so a connection never waits for one ack
before sending the next (serial acked publishes are ~10x slower here). Every publish carries a
``Nats-Msg-Id`` and is retried with it through leader elections and reconnects, until a deadline.

**Group commit.** With ``sync_interval: always`` every stored write is fsynced before its ack,
one fsync per event (~3k events/s on a disk with 0.3 ms fsyncs, whatever the pipelining). Once
a number of publishes are in flight (``group_after``), the next ones wait for their turn and go
together as one JetStream **atomic batch** (``Nats-Batch-Id``): nats-server 2.15 stores a
batch's events under one fsync and answers its commit only after it, with the last seq and the
count, so event k of a batch of n was stored at ``last - n + k`` (a batch is stored contiguously:
the commit holds the stream). Each event keeps its ``Nats-Msg-Id``. A batch that is refused as a
whole (a ``Nats-Msg-Id`` already stored is one reason), lost or not answered in time sends its
events again one by one, with the same ids: the dedupe window answers those already stored
with their original seq. While a batch commits, the next one gathers; at most two are in
flight. A quiet node publishes one by one, at the latency of one fsync.

Reads use JetStream direct gets (``$JS.API.DIRECT.GET``), batched and filtered on the room's
subject: no consumer is created for a history page or a recovery.

**Reads are checked against the stream leader.** Any replica answers a direct get, including
a follower that is behind (seen: a follower resumed from a pause answered with 1 event where
the leader had 11). A follower's store is always a prefix of the leader's (it applies the
replicated log in order), so what a direct get returns is true, only possibly cut short. Hence:

- ``last_seq`` and ``has`` ask the leader (``$JS.API.STREAM.MSG.GET``, which only the stream
  leader answers);
- ``read`` takes batches from any replica, and when it ends before its limit, asks the leader
  for the room's next event after the last one it has: none (or one at or beyond ``before``)
  proves the read complete; otherwise that event is taken from the leader's answer and the
  read goes on from there. One extra round trip per read, to the leader (~0.2 ms on loopback);
- counts (``Nats-Num-Pending``) are only hints, never the ground for "complete".

So recovery, history, SSE resume and gap repair never decide from a stale answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import NoRespondersError

from bridge._nats_patches import (
    GatheringRoute,
    RawRoute,
    direct_dispatch,
    header_lines,
    publish_many,
    publish_now,
    raw_route,
)
from bridge.nats_link import NatsLink
from node.core.ports import LiveMessage, StoredEvent, StoreError
from node.protocol.subjects import STREAM_NAME, eph_subject, live_subject, room_subject

__all__ = ["WRITE_IN_PROCESS", "WRONG_LAST_SEQUENCE", "Backoff", "JetStreamRoomStore"]

log = logging.getLogger("bridge.store")

_BATCH = 256
# STREAM.MSG.GET error codes: no such message (not an error for a read).
_NO_MESSAGE_ERR_CODE = 10037
_RETRYABLE_STATUS = {"503", "408"}
# JetStream error codes that mean "ask again", not a refusal. 10158 "duplicate message id is in
# process" (409): on a replicated stream, a copy of this Nats-Msg-Id is still being proposed,
# e.g. when the retries buffered by nats-py during a disconnect are flushed together on
# reconnect. Retrying soon gets the duplicate ack with the original seq.
_RETRYABLE_ERR_CODES = {10158}
# A compare-and-set write (Nats-Expected-Last-Subject-Sequence) that lost its race: 10071 "wrong
# last sequence: N" names the key's sequence; 10164 "wrong last sequence" (a replicated stream)
# says another write of the key is still in process on the leader, which a read at once would
# not show yet. The key-value writes (MQTT sessions, state rooms) take both as a conflict.
WRONG_LAST_SEQUENCE = 10071
WRITE_IN_PROCESS = 10164


# Group commit (see the module docstring): publishes in flight one by one before the next ones
# gather into a batch; fewer than GROUP_MIN gathered go one by one (a batch costs ~5 ms on the
# server whatever its size); the server's default limit of a batch (jetstream.limits.batch).
GROUP_AFTER = 16
GROUP_MIN = 8
GROUP_MAX = 1000
_COMMITS_IN_FLIGHT = 2


class _Outcome:
    """What a publish of :meth:`JetStreamRoomStore.publish_soon` comes to: ``(seq,
    duplicate)``, or the StoreError. The part of an asyncio future that the store and its
    callers use, but its callbacks are called at once when it is settled, in that loop step,
    not in the next one (and each one's exception is logged, never raised to whoever settled
    it). So a batch's acks reach their publishers in the step that reads the commit's answer,
    right after the batch's events, which come before it: a member's ``published`` reply and
    the events go out in one write. With a future, the replies came two steps later (the
    commit's task, then the callbacks): a second write per member and per batch.
    """

    __slots__ = ("_callbacks", "_error", "_state", "_value")

    _PENDING, _RESULT, _ERROR, _CANCELLED = range(4)

    def __init__(self) -> None:
        self._state = _Outcome._PENDING
        self._value: tuple[int, bool] | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[_Outcome], object]] | None = None

    def done(self) -> bool:
        return self._state != _Outcome._PENDING

    def cancelled(self) -> bool:
        return self._state == _Outcome._CANCELLED

    def result(self) -> tuple[int, bool]:
        if self._state == _Outcome._RESULT:
            assert self._value is not None
            return self._value
        if self._state == _Outcome._ERROR:
            assert self._error is not None
            raise self._error
        if self._state == _Outcome._CANCELLED:
            raise asyncio.CancelledError
        raise asyncio.InvalidStateError("publish not settled yet")

    def exception(self) -> BaseException | None:
        if self._state == _Outcome._CANCELLED:
            raise asyncio.CancelledError
        if self._state == _Outcome._PENDING:
            raise asyncio.InvalidStateError("publish not settled yet")
        return self._error

    def set_result(self, value: tuple[int, bool]) -> None:
        self._settle(_Outcome._RESULT, value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(_Outcome._ERROR, None, error)

    def cancel(self) -> bool:
        """Its publisher gave it up: not sent if it is still gathering."""
        if self._state != _Outcome._PENDING:
            return False
        self._settle(_Outcome._CANCELLED, None, None)
        return True

    def add_done_callback(self, fn: Callable[[_Outcome], object]) -> None:
        """``fn(self)`` once settled; when already settled, in the next loop step (as an
        asyncio future does: never within this call)."""
        if self._state != _Outcome._PENDING:
            asyncio.get_running_loop().call_soon(fn, self)
        elif self._callbacks is None:
            self._callbacks = [fn]
        else:
            self._callbacks.append(fn)

    def _settle(self, state: int, value: tuple[int, bool] | None,
                error: BaseException | None) -> None:
        if self._state != _Outcome._PENDING:
            raise asyncio.InvalidStateError("publish settled already")
        self._state, self._value, self._error = state, value, error
        callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:  # one publisher's failure is not the others' (nor the store's)
                log.exception("! callback of a publish failed")


class _Queued:
    """A publish: the result is (seq, duplicate), from its batch or from a publish on its own
    (or the StoreError of that)."""

    __slots__ = ("body", "deadline", "fut", "lines", "msg_id", "subject", "ttl_s")

    def __init__(self, subject: str, body: bytes, msg_id: str, ttl_s: float | None,
                 deadline: float, fut: _Outcome) -> None:
        self.subject = subject
        self.body = body
        self.msg_id, self.ttl_s = msg_id, ttl_s
        self.lines = _header_lines(msg_id, ttl_s)  # its headers, as a batch writes them
        self.deadline = deadline  # of its publish, on its own included
        self.fut = fut

    @property
    def headers(self) -> dict[str, str]:
        """Its headers, for a publish on its own."""
        return _headers(self.msg_id, self.ttl_s)


def _headers(msg_id: str, ttl_s: float | None) -> dict[str, str]:
    headers = {"Nats-Msg-Id": msg_id}
    if ttl_s is not None:
        headers["Nats-TTL"] = f"{max(1, int(ttl_s))}s"
    return headers


def _header_lines(msg_id: str, ttl_s: float | None) -> str:
    """``header_lines(_headers(msg_id, ttl_s))`` without the dict, for a msg id that needs no
    cleaning (every one the node makes)."""
    if "\r" in msg_id or "\n" in msg_id or msg_id.strip() != msg_id:
        return header_lines(_headers(msg_id, ttl_s))
    if ttl_s is None:
        return f"Nats-Msg-Id: {msg_id}\r\n"
    return f"Nats-Msg-Id: {msg_id}\r\nNats-TTL: {max(1, int(ttl_s))}s\r\n"


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _commit_answer(n: int, reply: Msg) -> int:
    """The last seq of a batch of ``n`` from its commit's answer. Raises StoreError when the
    batch was refused (or the count differs), ValueError/KeyError on a malformed answer."""
    ack: dict[str, Any] = orjson.loads(reply.data)
    if ack.get("error") or int(ack.get("count", -1)) != n:
        raise StoreError(f"batch refused: {ack.get('error')}")
    return int(ack["seq"])


def _copy(outcome: _Outcome, fut: asyncio.Future[tuple[int, bool]]) -> None:
    """``outcome`` into the future :meth:`JetStreamRoomStore.publish` awaits."""
    if fut.done():
        return
    if outcome.cancelled():
        fut.cancel()
    elif (error := outcome.exception()) is not None:
        fut.set_exception(error)
    else:
        fut.set_result(outcome.result())


class _StoredRoute(GatheringRoute):
    """A room's stored events, as the stream republishes them: its handler (the room's
    callback) gets those of one read as a list of ``LiveMessage`` with their seq and the room's
    previous seq."""

    __slots__ = ()

    def item(self, subject: bytes, data: bytes, headers: bytes | None) -> LiveMessage | None:
        # The stream's RePublish appends both headers (the first event's last seq is 0) after
        # the message's own, which may carry the same names (a backend's relay): the last line
        # of each name is the server's. Read as int(header_value(...)) reads them, in this
        # call (every live event of every room: two header_value calls cost ~8% of reading a
        # live message). int() skips the whitespace bytes.strip() would; an empty or missing
        # Nats-Sequence is refused, an empty or missing Nats-Last-Sequence is 0
        # (tests/unit/test_stored_route.py holds it to header_value).
        try:
            if not headers:
                raise ValueError
            i = headers.rfind(b"\r\nNats-Sequence:")
            if i < 0:
                raise ValueError
            end = headers.find(b"\r\n", i + 16)
            seq = int(headers[i + 16:end] if end >= 0 else headers[i + 16:])
            i = headers.rfind(b"\r\nNats-Last-Sequence:")
            if i < 0:
                prev = 0
            else:
                end = headers.find(b"\r\n", i + 21)
                text = headers[i + 21:end] if end >= 0 else headers[i + 21:]
                prev = int(text) if text.strip() else 0
        except ValueError:
            log.warning("! live message without sequence headers on %s",
                        subject.decode(errors="replace"))
            return None
        return LiveMessage(seq, prev, data)


class _VolatileRoute(RawRoute):
    """A room's volatile events: its handler gets each as a list of one ``LiveMessage``
    without a seq."""

    __slots__ = ()

    def deliver(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        try:
            self.handler([LiveMessage(None, None, data)])
        except Exception:  # never into nats-py's read loop, which would stop reading
            log.exception("! handler of %s failed", subject.decode(errors="replace"))


class _LiveSub:
    """A room's two subscriptions (stored events as the stream republishes them, volatile
    ones): both routes call the room's callback itself (no bound method of their own: a
    node has a room per user)."""

    __slots__ = ("subs",)

    def __init__(self) -> None:
        self.subs: tuple[RawRoute, ...] = ()  # a tuple: 0.1 KB less than a list, per room

    async def unsubscribe(self) -> None:
        subs, self.subs = self.subs, ()
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection closing: nothing left to unsubscribe from
                pass


class Backoff:
    """The waits between the tries of a request that may be answered a moment later (a leader
    election, a stream just created): ``first`` seconds, doubling up to 0.5 s, within
    ``timeout_s`` in all."""

    __slots__ = ("deadline", "delay")

    def __init__(self, timeout_s: float, first: float = 0.05) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.delay = first

    def left(self) -> float:
        """Seconds left until the deadline (<= 0: passed)."""
        return self.deadline - time.monotonic()

    async def wait(self) -> bool:
        """Sleep before the next try; False at once when the deadline has passed."""
        left = self.left()
        if left <= 0:
            return False
        await asyncio.sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, 0.5)
        return True


class _NoResponders(StoreError):
    """A direct get that no server answered (status 503)."""


class _Batch:
    """Collects the replies of one batched direct get until its end-of-batch marker."""

    __slots__ = ("done", "events", "headers", "pending", "reads", "single")

    def __init__(self, single: bool = False) -> None:
        self.single = single  # a plain (not batched) direct get: one reply, no end marker
        self.reads = False  # asked over the reads connection (else the main one)
        self.events: list[StoredEvent] = []
        self.headers: list[dict[str, str]] = []
        self.pending = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class JetStreamRoomStore:
    """The ``RoomStore`` and ``LiveFeed`` ports over one NATS connection.

    Args:
        link: The node's NATS link (connected, with the stream in place).
        ack_timeout_s: How long one publish attempt waits for its ack.
        publish_deadline_s: How long a publish keeps retrying before it fails.
        read_timeout_s: How long a read may take.
        group_after: Publishes in flight one by one from which the next ones gather into
            atomic batches (0: never; only on a stream that allows atomic batches, see
            ``NatsLink.atomic_batches``).
    """

    def __init__(
        self,
        link: NatsLink,
        *,
        ack_timeout_s: float = 5.0,
        publish_deadline_s: float = 15.0,
        read_timeout_s: float = 5.0,
        group_after: int = GROUP_AFTER,
    ) -> None:
        self.link = link
        self.group_after = group_after
        self.ack_timeout_s = ack_timeout_s
        self.publish_deadline_s = publish_deadline_s
        self.read_timeout_s = read_timeout_s
        self._tokens = itertools.count(1)
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        # The first tries of _send_lone among those: token -> (publish, its ack's timer, ack).
        self._lone: dict[str, tuple[_Queued, asyncio.TimerHandle, asyncio.Future[Msg]]] = {}
        self._batches: dict[str, _Batch] = {}
        # leader reads waiting for their answer: token -> (future, over the reads connection)
        self._gets: dict[str, tuple[asyncio.Future[Msg], bool]] = {}
        self._prefix = ""
        self._sub: NatsSubscription | None = None
        self._reads_prefix = ""
        self._reads_sub: NatsSubscription | None = None
        self.retries = 0
        self.errors = 0
        self.leader_reads = 0
        self.direct_retries = 0  # direct gets asked again: nobody answered (503)
        self._highest_acked = 0  # the highest seq a publish of this node was acked with
        self.stale_reads = 0  # reads a lagging replica cut short, completed from the leader
        self._queued: list[_Queued] = []  # publishes gathering for the next batch
        # Batches sent or being sent, until their commit is answered: token -> the future of
        # the answer (None once handed out in _on_reply), and the batch's publishes.
        self._commits: dict[str, asyncio.Future[Msg | None]] = {}
        self._batched: dict[str, list[_Queued]] = {}
        self._committing: set[asyncio.Task[None]] = set()  # their tasks, until they end
        self._alone_tasks: set[asyncio.Task[None]] = set()  # queued ones sent on their own
        self._kick_soon = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop  # the running loop, set by start()
        self.batches = 0  # batches stored
        self.batched = 0  # events stored in them
        self.batches_undone = 0  # batches whose events were sent again one by one

    @property
    def epoch(self) -> str:
        return self.link.epoch

    async def start(self) -> None:
        """Subscribe the reply inboxes: the main connection's, shared by every publish and
        read of other streams, and the reads connection's (reads of the room stream)."""
        self._loop = asyncio.get_running_loop()
        self.link.on_disconnected.append(self._on_disconnected)
        self.link.on_reads_disconnected.append(lambda: self._fail_batches(reads=True))
        nc = self.link.nc
        self._prefix = nc.new_inbox()
        self._sub = await direct_dispatch(nc, self._prefix + ".>", self._on_reply)
        reads = self.link.reads
        if reads is not nc:
            self._reads_prefix = reads.new_inbox()
            self._reads_sub = await direct_dispatch(reads, self._reads_prefix + ".>",
                                                    self._on_reply)

    def _reads_nc(self, stream: str) -> tuple[NATS, str]:
        """The connection and reply prefix for a read of ``stream``: the reads connection for
        the room stream (while it is up), the main one for the others."""
        if stream == STREAM_NAME and self._reads_sub is not None:
            reads = self.link.reads
            if reads is not self.link.nc:
                return reads, self._reads_prefix
        return self.link.nc, self._prefix

    async def stop(self) -> None:
        """Fail what is still waiting and unsubscribe."""
        self._stopping = True
        for futs in (self._acks, self._commits):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(StoreError("node stopping"))
        for queued in self._queued:
            if not queued.fut.done():
                queued.fut.set_exception(StoreError("node stopping"))
        self._queued.clear()
        # Reads waiting for a reply (a room starting while the node stops): their replies
        # would not come once NATS closes, next; each would wait out its own timeout.
        self._fail_batches(reads=None, why="node stopping")
        for sub in (self._sub, self._reads_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._sub = self._reads_sub = None

    def _on_disconnected(self) -> None:
        """The acks and replies of what was sent before are lost with the connection: retry
        those publishes (same Nats-Msg-Id) as soon as it is back, not after ack_timeout_s."""
        for futs in (self._acks, self._commits):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(ConnectionResetError("NATS disconnected"))
        self._fail_batches(reads=False)

    def _fail_batches(self, *, reads: bool | None, why: str = "NATS disconnected") -> None:
        """Fail the reads waiting for replies over the connection that dropped (the reads
        one, or the main one; None: both): the callers retry or answer an error; a read sent
        again goes over a connection that is up."""
        for batch in self._batches.values():
            if reads in (None, batch.reads) and not batch.done.done():
                batch.done.set_exception(StoreError(why))
        for fut, over_reads in self._gets.values():
            if reads in (None, over_reads) and not fut.done():
                fut.set_exception(ConnectionResetError(why))

    def _on_reply(self, msg: Msg) -> None:
        # <inbox prefix>.<kind>.<token>: either connection's prefix (both end in a nuid)
        kind, token = msg.subject.rsplit(".", 2)[-2:]
        if kind == "a":
            fut = self._acks.get(token)
            if fut is not None and not fut.done():
                fut.set_result(msg)
                self._lone_done(token)  # a first try's answer: handed out in this step
            if self._queued:
                self._kick()
            return
        if kind == "b":
            commit = self._commits.get(token)
            if commit is not None and not commit.done():
                # A plain answer is handed out here, in the step that read it (the next batch
                # is sent first); anything else is for the commit's task.
                last = self._stored_batch(self._batched[token], msg)
                if last is None:
                    commit.set_result(msg)
                else:
                    commit.set_result(None)
                    del self._commits[token]  # the next batch may go while this is handed out
                    taken = self._batched.pop(token)
                    if self._queued:
                        self._kick()
                    self._hand_out(taken, last)
                    return
            if self._queued:
                self._kick()
            return
        if kind == "g":
            waiting = self._gets.get(token)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_result(msg)
            return
        batch = self._batches.get(token)
        if batch is None or batch.done.done():
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            batch.events.append(StoredEvent(int(headers["Nats-Sequence"]), msg.data))
            batch.headers.append(headers)
            batch.pending = int(headers.get("Nats-Num-Pending", "0"))
            if batch.single:
                batch.done.set_result(None)
            return
        if status in ("204", "404"):
            batch.done.set_result(None)
        elif status == "503" and not batch.events:
            batch.done.set_exception(_NoResponders(f"direct get status {status}"))
        else:
            batch.done.set_exception(StoreError(f"direct get status {status}"))

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, tenant: str, room: str, body: bytes, msg_id: str,
                      ttl_s: float | None = None) -> tuple[int, bool]:
        """Store one event, retrying with the same ``Nats-Msg-Id`` until the deadline.

        Args:
            ttl_s: Keep the event this long (a namespace's history_ttl_s), or None for the
                stream's max age.

        Raises:
            StoreError: ``retry=True`` when the deadline passed, ``False`` when JetStream refused.
        """
        outcome = self.publish_soon(tenant, room, body, msg_id, ttl_s)
        fut: asyncio.Future[tuple[int, bool]] = self._loop.create_future()
        outcome.add_done_callback(lambda done: _copy(done, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            outcome.cancel()  # given up: not sent if it is still gathering
            raise

    def publish_soon(self, tenant: str, room: str, body: bytes, msg_id: str,
                     ttl_s: float | None = None) -> _Outcome:
        """:meth:`publish` without a coroutine: the outcome of what ``publish`` would return
        or raise (its callbacks are called when it is settled, in that loop step: see
        :class:`_Outcome`). While publishes gather into batches (a busy node) it joins the next
        batch (cancelled before its batch is sent, the event is not sent); otherwise it is sent
        at once, on its own (:meth:`_send_lone`)."""
        loop = self._loop  # asyncio.get_running_loop() asks the OS for the pid every time
        queued = _Queued(room_subject(tenant, room), body, msg_id, ttl_s,
                         time.monotonic() + self.publish_deadline_s, _Outcome())
        if not (self.group_after and self.link.atomic_batches and (
                self._queued or self._commits or len(self._acks) >= self.group_after)):
            self._send_lone(queued)
            return queued.fut
        self._queued.append(queued)
        if not self._kick_soon:
            self._kick_soon = True
            loop.call_soon(self._kick)
        return queued.fut

    def _send_alone(self, queued: _Queued, tried: str | None = None) -> None:
        """A publish goes on on its own in :meth:`_publish_alone`, with the same Nats-Msg-Id,
        unless its publisher gave up: one its batch did not store (the id finds it if the
        batch was stored after all), or one whose first try (``tried``: why it failed) was
        :meth:`_send_lone`'s."""
        if queued.fut.done():
            return
        self._run_for(queued.fut, lambda: self._publish_alone(
            queued.subject, queued.body, queued.headers, queued.deadline, tried=tried))

    def _send_lone(self, queued: _Queued) -> None:
        """The first try of a publish on its own, from synchronous code: the command is
        queued at once (``_nats_patches.publish_now``) and its ack is handed out as it is read
        (:meth:`_lone_done`), with no task and no coroutine (what a quiet node, one publish at
        a time, does for every event). Whatever is not a plain answer (no ack in time, the
        connection lost, a "try again" from JetStream, a seq that needs the epoch checked, a
        publish that could not be queued) goes on in :meth:`_send_alone`."""
        loop = self._loop
        token = str(next(self._tokens))
        try:
            publish_now(self.link.nc, queued.subject, queued.body, queued.lines,
                        f"{self._prefix}.a.{token}")
        except Exception as exc:  # closed, draining, buffer full while away: retried
            self._send_alone(queued, type(exc).__name__)
            return
        ack: asyncio.Future[Msg] = loop.create_future()
        self._acks[token] = ack
        left = queued.deadline - time.monotonic()
        timer = loop.call_later(max(0.01, min(self.ack_timeout_s, left)), _expire, ack)
        self._lone[token] = (queued, timer, ack)
        ack.add_done_callback(lambda _: self._lone_done(token))

    def _lone_done(self, token: str) -> None:
        """The ack of a first try is done: answered (called from :meth:`_on_reply`, in the
        step that read it, as a batch's answer is), or failed (expired, the connection lost,
        the node stopping: the ack's callback, a step later)."""
        lone = self._lone.pop(token, None)
        if lone is not None:
            queued, timer, ack = lone
            self._lone_answer(queued, token, timer, ack)

    def _lone_answer(self, queued: _Queued, token: str, timer: asyncio.TimerHandle,
                     ack: asyncio.Future[Msg]) -> None:
        """The answer to :meth:`_send_lone`'s try: the result, or a retry."""
        timer.cancel()
        self._acks.pop(token, None)
        if self._queued and not self._kick_soon:  # gathered ones may go now
            self._kick_soon = True
            self._loop.call_soon(self._kick)
        result = queued.fut
        if result.done():
            return  # its publisher gave up
        if ack.cancelled():  # not done by the store; nothing is known of this try
            self._send_alone(queued, "cancelled")
            return
        exc = ack.exception()
        if isinstance(exc, StoreError):  # the node stops
            result.set_exception(exc)
            return
        reason = "ack timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        if exc is None:
            reply = ack.result()
            reason = "stream unavailable"
            if (reply.headers or {}).get("Status") not in _RETRYABLE_STATUS:
                try:
                    acked = self._parse_ack(reply)
                except StoreError as refused:
                    result.set_exception(refused)
                    return
                reason = "duplicate message id in process"  # see _RETRYABLE_ERR_CODES
                if acked is not None and (acked[1] or acked[0] > self._highest_acked) and (
                        not self.link.epoch_suspect):
                    if not acked[1]:
                        self._highest_acked = acked[0]
                    result.set_result(acked)
                    return
                if acked is not None:  # a seq at or below one acked before (or an epoch
                    # that may be stale): the epoch is checked first
                    self._go_checked(acked, result)
                    return
        self._send_alone(queued, reason)

    def _go_checked(self, acked: tuple[int, bool], result: _Outcome) -> None:
        """A lone publish acked with a seq at or below one acked before: the result once the
        epoch is checked (:meth:`_check_order`)."""
        async def checked() -> tuple[int, bool]:
            await self._check_order(acked[0], acked[1])
            return acked
        self._run_for(result, checked, Exception)

    def _run_for(self, result: _Outcome,
                 make: Callable[[], Coroutine[Any, Any, tuple[int, bool]]],
                 caught: type[BaseException] = StoreError) -> None:
        """Run ``make()`` in a task kept until it ends: what it returns, or raises of
        ``caught``, is ``result``'s; the task is cancelled if the publisher gives ``result``
        up."""
        async def run() -> None:
            try:
                value = await make()
            except caught as exc:
                if not result.done():
                    result.set_exception(exc)
            else:
                if not result.done():
                    result.set_result(value)
        task = self._loop.create_task(run())
        self._alone_tasks.add(task)
        task.add_done_callback(self._alone_tasks.discard)
        result.add_done_callback(lambda fut: task.cancel() if fut.cancelled() else None)

    async def _publish_alone(self, subject: str, body: bytes, headers: dict[str, str],
                             deadline: float, tried: str | None = None) -> tuple[int, bool]:
        """One publish and its own ack, retried with the same headers until ``deadline``;
        ``tried``: why the first try (already made) failed, to go on from the second."""
        loop = self._loop
        delay = 0.05
        reason = "no answer"
        if tried is not None:
            delay = await self._pause(subject, tried, deadline, delay)
        while True:
            token = str(next(self._tokens))
            fut: asyncio.Future[Msg] = loop.create_future()
            self._acks[token] = fut
            try:
                await self.link.nc.publish(
                    subject, body, reply=f"{self._prefix}.a.{token}", headers=headers
                )
                left = deadline - time.monotonic()
                # A timer on the future itself: cheaper than wait_for on the hot path.
                timer = loop.call_later(max(0.01, min(self.ack_timeout_s, left)), _expire, fut)
                try:
                    reply = await fut
                finally:
                    timer.cancel()
                status = (reply.headers or {}).get("Status")
                if status in _RETRYABLE_STATUS:
                    reason = "stream unavailable"
                else:
                    acked = self._parse_ack(reply)
                    if acked is not None:
                        await self._check_order(acked[0], acked[1])
                        return acked
                    reason = "duplicate message id in process"  # see _RETRYABLE_ERR_CODES
            except TimeoutError:
                reason = "ack timed out"
            except StoreError:
                raise
            except Exception as exc:  # disconnected, draining, buffer full: retry
                reason = type(exc).__name__
            finally:
                self._acks.pop(token, None)
                if self._queued and not self._kick_soon:  # gathered ones may go now
                    self._kick_soon = True
                    loop.call_soon(self._kick)
            delay = await self._pause(subject, reason, deadline, delay)

    async def _pause(self, subject: str, reason: str, deadline: float, delay: float) -> float:
        """After a failed try: wait ``delay`` (less if the deadline comes first) and return
        the next one; raise StoreError once past ``deadline``."""
        left = deadline - time.monotonic()
        if left <= 0:
            self.errors += 1
            raise StoreError(f"publish failed: {reason}")
        self.retries += 1
        log.debug("! publish to %s retried: %s", subject, reason)
        await asyncio.sleep(min(delay, left))
        return min(delay * 2, 1.0)

    def _kick(self) -> None:
        """Send what gathered: as a batch when enough did, else one by one, unless the
        publishes in flight say the next batch should grow a while longer."""
        self._kick_soon = False
        while self._queued and len(self._commits) < _COMMITS_IN_FLIGHT:
            if self._commits and len(self._queued) < GROUP_MAX:
                return  # the next batch grows while this one commits
            if len(self._queued) < GROUP_MIN and len(self._acks) >= self.group_after:
                return  # an ack of those in flight kicks again
            taken = [q for q in self._queued[:GROUP_MAX] if not q.fut.done()]
            del self._queued[:GROUP_MAX]
            if len(taken) < GROUP_MIN:
                for queued in taken:
                    self._send_alone(queued)
                continue
            token = str(next(self._tokens))
            fut: asyncio.Future[Msg | None] = self._loop.create_future()
            self._commits[token] = fut  # in flight from now: counted by the loop above
            self._batched[token] = taken
            task = self._loop.create_task(self._commit(taken, token, fut))
            self._committing.add(task)
            task.add_done_callback(self._committed)

    def _committed(self, task: asyncio.Task[None]) -> None:
        self._committing.discard(task)
        if self._queued:
            self._kick()

    async def _commit(self, taken: list[_Queued], token: str,
                      fut: asyncio.Future[Msg | None]) -> None:
        """Store ``taken`` as one atomic batch (``_commits[token]``: ``fut`` gets the answer),
        and give each its seq; on any failure, each is sent again on its own (its Nats-Msg-Id
        finds it if the batch was stored after all). A plain answer is handed out as it is
        read (:meth:`_on_reply`); then ``fut`` is None and this ends."""
        loop = self._loop
        n = len(taken)
        try:
            if fut.done():  # failed before it was sent (the node stops, NATS dropped): raise it
                fut.result()
            batch_id = f"{self._prefix.rpartition('.')[2]}.{token}"  # unique: a nuid and a count
            # Only the commit has a reply: the server answers nothing else of a batch.
            msgs = [(queued.subject, "", queued.body,
                     f"{queued.lines}Nats-Batch-Id: {batch_id}\r\nNats-Batch-Sequence: {k}\r\n")
                    for k, queued in enumerate(taken, 1)]
            last_msg = msgs[-1]
            msgs[-1] = (last_msg[0], f"{self._prefix}.b.{token}", last_msg[2],
                        f"{last_msg[3]}Nats-Batch-Commit: 1\r\n")
            await publish_many(self.link.nc, msgs)
            timer = loop.call_later(self.ack_timeout_s, _expire, fut)
            try:
                reply_msg = await fut
            finally:
                timer.cancel()
            if reply_msg is None:
                return  # stored, and handed out as it was read (_stored_batch)
            last = _commit_answer(n, reply_msg)
            await self._check_order(last - n + 1)
            self._highest_acked = last
        except Exception as exc:  # refused, lost, timed out: one by one
            self.batches_undone += 1
            log.debug("! batch of %d sent again one by one: %s", n, exc)
            for queued in taken:
                if queued.fut.done():
                    continue
                if self._stopping:  # as the publishes in flight one by one are answered
                    queued.fut.set_exception(StoreError("node stopping"))
                else:
                    self._send_alone(queued)
            return
        finally:
            self._commits.pop(token, None)
            self._batched.pop(token, None)
        self._hand_out(taken, last)

    def _stored_batch(self, taken: list[_Queued], reply: Msg) -> int | None:
        """The last seq of the batch ``taken`` when the commit's answer says it was stored,
        after every seq acked before; None for anything else (a refusal, a count that does
        not match, a seq that needs the epoch checked): the commit task's to handle."""
        try:
            last = _commit_answer(len(taken), reply)
        except (StoreError, ValueError, TypeError, KeyError):
            return None
        if last - len(taken) + 1 <= self._highest_acked or self.link.epoch_suspect:
            return None
        self._highest_acked = last
        return last

    def _hand_out(self, taken: list[_Queued], last: int) -> None:
        """Each publish of a batch stored up to ``last``: its seq (stored contiguously)."""
        n = len(taken)
        self.batches += 1
        self.batched += n
        pending, result = _Outcome._PENDING, _Outcome._RESULT
        for k, queued in enumerate(taken, last - n + 1):
            fut = queued.fut
            if fut._state == pending:  # not given up: set_result, two calls fewer per event
                fut._settle(result, (k, False), None)

    async def _check_order(self, seq: int, duplicate: bool = False) -> None:
        """The stream's seqs only grow, and this node's acks come in order: a new event acked
        with a seq below one acked before means the stream was deleted and created again (a
        new epoch, seqs from 1). Ask now, before the publisher is answered and its event
        (a state room's value) is tagged with the old epoch, not at the next epoch check; and
        whenever the link's epoch is suspect (an advisory said the stream was deleted or
        created: a new life past this node's highest ack does not show in the seq)."""
        if self.link.epoch_suspect:
            await self.link.confirm_epoch()
        elif seq <= self._highest_acked and not duplicate:
            await self.link.check()
        if not duplicate:
            self._highest_acked = seq

    def _parse_ack(self, reply: Msg) -> tuple[int, bool] | None:
        """(seq, duplicate), or None when the error is worth a retry (_RETRYABLE_ERR_CODES)."""
        try:
            ack: dict[str, Any] = orjson.loads(reply.data)
        except ValueError:
            raise StoreError("bad ack from JetStream") from None
        err = ack.get("error")
        if err and err.get("err_code") in _RETRYABLE_ERR_CODES:
            return None
        if err:
            self.errors += 1
            log.warning("! JetStream refused a publish: %s", err)
            raise StoreError(str(err.get("description", "refused")), retry=False)
        return int(ack["seq"]), bool(ack.get("duplicate", False))

    # -- reading ---------------------------------------------------------------------------

    async def direct_get(self, request: dict[str, Any], stream: str = STREAM_NAME) -> _Batch:
        """A JetStream direct get on ``stream`` (batched when ``request`` has ``batch``).

        Asked again, within the read deadline, while nobody answers (503): no server serves
        direct gets of a stream for a moment after it is created, nor while its replicas
        change (each serves them once it has caught up).

        Raises:
            StoreError: No answer in time, or an error status.
        """
        body = orjson.dumps(request)
        backoff = Backoff(self.read_timeout_s)
        while True:
            token = str(next(self._tokens))
            batch = _Batch(single="batch" not in request)
            self._batches[token] = batch
            try:
                nc, prefix = self._reads_nc(stream)
                batch.reads = nc is not self.link.nc
                publish_now(nc, f"$JS.API.DIRECT.GET.{stream}", body, None,
                            f"{prefix}.d.{token}", later=True)
                await asyncio.wait_for(batch.done, max(0.0, backoff.left()))
                return batch
            except TimeoutError:
                raise StoreError("read timed out") from None
            except _NoResponders:
                pass  # asked again below
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"read failed: {type(exc).__name__}") from None
            finally:
                self._batches.pop(token, None)
            if not await backoff.wait():
                raise StoreError("direct get status 503")
            self.direct_retries += 1

    async def trim(self, tenant: str, room: str, keep: int) -> None:
        """Keep only the room's latest ``keep`` events (a namespace's history_size)."""
        try:
            await self.link.js.purge_stream(STREAM_NAME, subject=room_subject(tenant, room),
                                            keep=keep)
        except Exception as exc:
            raise StoreError(f"trim failed: {type(exc).__name__}") from None

    async def leader_get(self, request: dict[str, Any], stream: str = STREAM_NAME, *,
                         main: bool = False) -> StoredEvent | None:
        """One message as the stream leader has it (``$JS.API.STREAM.MSG.GET``), or None.

        Only the stream leader answers this API, so the answer reflects every acknowledged
        publish (unlike a direct get, which any replica answers).

        Raises:
            StoreError: No leader answered in time, or an error other than "no message".
        """
        # During a leader election (2-5 s after a leader dies or steps down) nobody answers,
        # or the answer is "cluster not available": ask again within the read deadline rather
        # than fail a join that would be answered a moment later.
        backoff = Backoff(self.read_timeout_s)
        loop = self._loop
        body = orjson.dumps(request)
        while True:
            left = backoff.left()
            # Asked like a publish's ack is awaited (the reply inbox's own route, a timer on
            # the future), not with nats-py's request: no task step and queue per answer.
            token = str(next(self._tokens))
            fut: asyncio.Future[Msg] = loop.create_future()
            try:
                nc, prefix = (self.link.nc, self._prefix) if main else self._reads_nc(stream)
                self._gets[token] = (fut, nc is not self.link.nc)
                publish_now(nc, f"$JS.API.STREAM.MSG.GET.{stream}", body, None,
                            f"{prefix}.g.{token}", later=True)
                timer = loop.call_later(max(0.05, min(2.0, left)), _expire, fut)
                try:
                    reply = await fut
                finally:
                    timer.cancel()
                if (reply.headers or {}).get("Status") == "503":
                    raise NoRespondersError  # no leader yet: asked again below
                answer: dict[str, Any] = orjson.loads(reply.data)
                err = answer.get("error")
                if not err:
                    break
                if err.get("err_code") == _NO_MESSAGE_ERR_CODE:
                    return None
                reason = str(err.get("description", "error"))
            except ValueError:
                raise StoreError("bad answer from JetStream") from None
            except Exception as exc:  # no responders (no leader yet), timeout, disconnected
                reason = type(exc).__name__
            finally:
                self._gets.pop(token, None)
            if self._stopping:  # NATS closes next: asking again would wait out the deadline
                raise StoreError("leader read failed: node stopping")
            if not await backoff.wait():
                raise StoreError(f"leader read failed: {reason}")
        message = answer.get("message") or {}
        self.leader_reads += 1
        data = message.get("data")
        return StoredEvent(int(message["seq"]), base64.b64decode(data) if data else b"")

    async def last_seq(self, tenant: str, room: str, *, after_subscribe: bool = False) -> int:
        """The room's latest seq, as the stream leader has it (0 if none).

        Args:
            after_subscribe: Asked right after the room's live subscription: over the main
                connection, behind the subscription (the server has it before it answers, so
                what is stored after the answer comes live), not over the reads connection.
        """
        ev = await self.leader_get({"last_by_subj": room_subject(tenant, room)},
                                   main=after_subscribe)
        return ev.seq if ev is not None else 0

    async def count(self, tenant: str, room: str) -> int:
        """How many events of the room the stream leader holds."""
        subject = room_subject(tenant, room)
        try:
            info = await self.link.js.stream_info(STREAM_NAME, subjects_filter=subject)
        except Exception as exc:
            raise StoreError(f"count failed: {type(exc).__name__}") from None
        return int((info.state.subjects or {}).get(subject, 0))

    async def count_from(self, tenant: str, room: str, seq: int) -> int:
        """How many events of the room have a seq >= ``seq`` (any replica: a hint)."""
        batch = await self.direct_get(
            {"seq": max(seq, 1), "next_by_subj": room_subject(tenant, room), "batch": 1}
        )
        return batch.pending + 1 if batch.events else 0

    async def has(self, tenant: str, room: str, seq: int) -> bool:
        """Whether event ``seq`` of the room is stored (asked of the stream leader)."""
        if seq <= 0:
            return False
        ev = await self.leader_get({"seq": seq, "next_by_subj": room_subject(tenant, room)})
        return ev is not None and ev.seq == seq

    async def read(
        self, tenant: str, room: str, after: int, limit: int, *, before: int | None = None
    ) -> list[StoredEvent]:
        """Up to ``limit`` events with ``after < seq < before``, ascending, complete.

        Batches come from any replica; a read that ends short is confirmed with the stream
        leader (see the module's docstring), so a replica that is behind cannot cut it short.
        """
        subject = room_subject(tenant, room)
        out: list[StoredEvent] = []
        start = after + 1
        deadline = time.monotonic() + 6 * self.read_timeout_s
        while len(out) < limit:
            want = min(_BATCH, limit - len(out))
            batch = await self.direct_get({"seq": start, "next_by_subj": subject, "batch": want})
            for ev in batch.events:
                if before is not None and ev.seq >= before:
                    return out
                out.append(ev)
            if batch.events:
                start = batch.events[-1].seq + 1
            if len(batch.events) == want:
                continue  # a full batch: true as far as it goes, and there may be more
            # Short: the end of the room, or a replica that is behind. The leader decides.
            nxt = await self.leader_get({"seq": start, "next_by_subj": subject})
            if nxt is None or (before is not None and nxt.seq >= before):
                return out
            self.stale_reads += 1
            if time.monotonic() > deadline:
                raise StoreError("read incomplete: replicas behind the leader")
            out.append(nxt)
            start = nxt.seq + 1
        return out

    async def _start_of_last(self, tenant: str, room: str, n: int, before: int | None) -> int:
        """A seq X such that about ``n`` events lie in [X, before) (counts are hints)."""
        tail = await self.count_from(tenant, room, before) if before else 0

        async def count(x: int) -> int:
            return await self.count_from(tenant, room, x) - tail

        if await count(1) <= n:
            return 1
        lo, hi = 1, before if before else await self.last_seq(tenant, room)
        while lo < hi:  # count() is non-increasing in x: find the first x with count <= n
            mid = (lo + hi) // 2
            if await count(mid) <= n:
                hi = mid
            else:
                lo = mid + 1
        return lo

    async def history(
        self, tenant: str, room: str, *, since: int | None, limit: int, reverse: bool
    ) -> list[StoredEvent]:
        if since is not None and not reverse:
            return await self.read(tenant, room, since, limit)
        if since is not None and since <= 1:
            return []  # reverse: nothing lies before the stream's first seq
        before = since if reverse else None
        if before is None:
            # The end of the page is the room's last event as the leader has it.
            before = await self.last_seq(tenant, room) + 1
        start = await self._start_of_last(tenant, room, limit, before)
        events = await self.read(tenant, room, start - 1, 1_000_000, before=before)
        # The start came from counts (hints): widen it backwards until the page is full or
        # the room's beginning is reached; every piece read is complete.
        while len(events) < limit and start > 1:
            wider = max(1, start - 2 * max(limit, before - start))
            events = await self.read(tenant, room, wider - 1, 1_000_000, before=start) + events
            start = wider
        events = events[-limit:] if limit > 0 else []
        return events[::-1] if reverse else events

    # -- live ------------------------------------------------------------------------------

    async def subscribe(
        self, tenant: str, room: str, callback: Callable[[list[LiveMessage]], None]
    ) -> _LiveSub:
        live = _LiveSub()
        nc = self.link.nc
        # Handed over in the read loop (bridge/_nats_patches.py): no task switch, no header
        # dict and no Msg per event, and the stored events of one read in one call.
        live.subs = (raw_route(nc, live_subject(tenant, room), callback, _StoredRoute),)
        try:
            live.subs += (raw_route(nc, eph_subject(tenant, room), callback, _VolatileRoute),)
        except BaseException:
            await live.unsubscribe()  # not left subscribed by a room that did not start
            raise
        return live

    def publish_volatile(self, tenant: str, room: str, body: bytes, *,
                         later: bool = False) -> None:
        self.link.publish_now(eph_subject(tenant, room), body, later=later)
