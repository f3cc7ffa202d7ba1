"""The values of state rooms in a JetStream key-value bucket (``RTNODE_STATE``).

One key per (tenant, room, key): ``<tenant>.<room token>.<key token>``, the room and the key
base64url-encoded (KV keys cannot hold ``:``, ``@``, spaces...). The value is the CBOR event map
as stored in the room's stream, with its ``seq`` and the ``epoch`` of the stream it was stored
in (left out of what :meth:`StateStore.values` returns); headers ``Rtnode-Seq`` and
``Rtnode-Epoch`` repeat them so that a write can compare without decoding.

Writes are compare-and-set (the ``Nats-Expected-Last-Subject-Sequence`` of a KV update): read
the key's revision and seq, give up if the stored seq is as high or higher (an older event
arriving late, or the same event again), else write over that revision, and read again on a
conflict. So a lower seq never overwrites a higher one, whatever the order the writes of two
nodes arrive in. Seqs compare only within one epoch: a stream deleted and created again
(``bridge.nats_link``) numbers its events from 1 again, so a value of another epoch than the
node's is gone for reads and replaced by any write, whatever its seq (a value written before
values carried an epoch counts as the current epoch's). Writes of one key on one node are
coalesced: while one is in flight, later ones wait and the highest of them is written next; each
publisher is answered once the key holds its seq or a higher one (a pipelining publisher's 400
writes of one key would otherwise conflict with one another, each retried). An unset is written
as a tombstone (the event map with ``unset: true``), kept :data:`TOMBSTONE_TTL_S` (a per-message
TTL): an older put arriving late cannot resurrect the key. Reads skip tombstones, and values of
another epoch.

Reads take batches of direct gets filtered on the room's keys (``next_by_subj`` with
``<room>.>``), from any replica: a replica that is behind may miss the latest writes. The room
actor merges the events it delivered lately into what a joiner reads (``node.core.room``), so
a joiner never misses a value whose event it will not receive live.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from nats.js.api import StorageType, StreamConfig

from bridge.room_store import (
    WRITE_IN_PROCESS,
    WRONG_LAST_SEQUENCE,
    Backoff,
    JetStreamRoomStore,
)
from node.core.ports import StoreError
from node.protocol.errors import ProtocolError
from node.protocol.frames import CBOR, cbor_loads_strict

__all__ = ["BUCKET", "TOMBSTONE_TTL_S", "StateStore"]

log = logging.getLogger("bridge.state")

BUCKET = "RTNODE_STATE"
_STREAM = f"KV_{BUCKET}"
_PREFIX = f"$KV.{BUCKET}"
#: How long the tombstone of an unset key is kept: far beyond any publish retry (the stream's
#: dedupe window, 120 s by default), after which a write of the key is a new event anyway.
TOMBSTONE_TTL_S = 86400
_SEQ_HEADER = "Rtnode-Seq"
_EPOCH_HEADER = "Rtnode-Epoch"
_EPOCH_FIELD = "epoch"  # in the stored map only: taken out of what values() returns
_BATCH = 1000  # 10,000 keys: ~0.4 s in 10 batches (256: ~0.7 s); nats-py parses headers
_CAS_TRIES = 20
_WRITTEN_MAX = 65536  # keys whose last write by this node is remembered
_ROOMS_CACHED = 1024  # rooms whose key set is cached for may_add
_KEYS_FRESH_S = 10.0  # a cached key set is read again after this long (other nodes' keys)
_FULL_FRESH_S = 1.0  # a full one at most this often (not on every new key refused)


class _KeyWriter:
    """The writes of one key in progress on this node: the highest (epoch, seq) waiting to be
    written (a later epoch's over any seq of an earlier one), and the publishers waiting
    (epoch, seq, future) for a write that covers theirs."""

    __slots__ = ("best", "running", "waiters")

    def __init__(self) -> None:
        self.best: tuple[str, int, bytes, bool] | None = None
        self.waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        self.running = False


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _seq_of(event_map: Any) -> int:
    seq = event_map.get("seq") if isinstance(event_map, dict) else None
    return seq if type(seq) is int else 0


def _epoch_of(event_map: Any) -> str:
    """The epoch a stored value was written in ("" for one written before values had one)."""
    epoch = event_map.get(_EPOCH_FIELD) if isinstance(event_map, dict) else None
    return epoch if isinstance(epoch, str) else ""


def _same_epoch(stored: str, epoch: str) -> bool:
    """Whether a value stored in ``stored`` belongs to ``epoch``: its seq compares with the
    epoch's seqs. A value without an epoch (written before they were recorded) is taken as
    the current one's, so that an upgrade keeps the state."""
    return not stored or stored == epoch


class StateStore:
    """The :class:`~node.core.ports.StatePort` over the node's JetStream connection.

    Args:
        store: The node's JetStream store (its connection, direct and leader gets).
        replicas: Replicas of the bucket (the stream's).
        max_keys: Keys a state room may hold (``state_max_keys``).
        deadline_s: How long a write keeps trying (leader elections, reconnects).

    Example:
        state = StateStore(store, replicas=3, max_keys=10000)
        await state.start()
        await state.put("acme", "fleet:1", "dev-7", 42, event_map, unset=False)
        values = await state.values("acme", "fleet:1")
    """

    def __init__(self, store: JetStreamRoomStore, *, replicas: int = 1, max_keys: int = 10000,
                 deadline_s: float = 10.0) -> None:
        self.store = store
        self.replicas = replicas
        self.max_keys = max_keys
        self.deadline_s = deadline_s
        # (tenant, room) -> (monotonic time read, its live keys), for may_add: one read of a
        # room's keys per _KEYS_FRESH_S, shared by the checks waiting for it.
        self._rooms: OrderedDict[tuple[str, str], tuple[float, set[str]]] = OrderedDict()
        self._reading: dict[tuple[str, str], asyncio.Future[set[str]]] = {}
        self._writers: dict[str, _KeyWriter] = {}  # KV subject -> its writes in progress
        # KV subject -> (revision, seq, epoch) of this node's last write of it.
        self._written: OrderedDict[str, tuple[int, int, str]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.puts = 0
        self.conflicts = 0  # CAS writes that found a newer revision and read again
        self.stale = 0  # puts that found a seq as high or higher: nothing written

    async def start(self) -> None:
        """Create the bucket, or bring its settings to these."""
        cfg = StreamConfig(
            name=_STREAM, subjects=[f"{_PREFIX}.>"], storage=StorageType.FILE,
            num_replicas=self.replicas, max_msgs_per_subject=1, allow_direct=True,
            allow_rollup_hdrs=True, deny_delete=True, allow_msg_ttl=True,
        )
        await self.store.link.ensure_bucket(f"state bucket {_STREAM}", cfg)

    async def stop(self) -> None:
        """End the writes in progress (their publishers get a StoreError: 4503, retry)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the port ----------------------------------------------------------------------------

    @staticmethod
    def subject(tenant: str, room: str, key: str) -> str:
        """The KV subject of ``key`` in ``room``."""
        return f"{_PREFIX}.{tenant}.{_token(room)}.{_token(key)}"

    async def values(self, tenant: str, room: str) -> list[dict[str, Any]]:
        """The room's current values, ordered by key (tombstones left out).

        Raises:
            StoreError: JetStream did not answer.
        """
        latest = await self._scan(tenant, room)
        out = [v for v in latest.values() if not v.get("unset")]
        out.sort(key=lambda v: str(v.get("key", "")))
        return out

    async def may_add(self, tenant: str, room: str, key: str) -> bool:
        """Whether ``key`` may be set: it is set, or the room holds fewer than ``max_keys``
        keys. The room's keys are read once and kept for ``_KEYS_FRESH_S`` (with this node's
        own writes applied), so new keys published at once on several nodes may pass the limit
        by a few; a full room's, for ``_FULL_FRESH_S`` (a key unset on another node frees its
        place here within that).

        Raises:
            StoreError: JetStream did not answer.
        """
        room_id = (tenant, room)
        cached = self._rooms.get(room_id)
        now = time.monotonic()
        if cached is not None and key in cached[1]:
            return True
        if (cached is None or now - cached[0] > _KEYS_FRESH_S
                or (len(cached[1]) >= self.max_keys and now - cached[0] > _FULL_FRESH_S)):
            keys = await self._room_keys(room_id)
        else:
            keys = cached[1]
        if key in keys:
            return True
        if len(keys) < self.max_keys:
            keys.add(key)  # taken now: checks that follow count it
            return True
        return False

    async def _room_keys(self, room_id: tuple[str, str]) -> set[str]:
        """The room's live keys, read now (one read at a time per room, shared)."""
        reading = self._reading.get(room_id)
        if reading is not None:
            return await asyncio.shield(reading)
        fut: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._reading[room_id] = fut
        try:
            latest = await self._scan(*room_id)
            keys = {str(v["key"]) for v in latest.values() if not v.get("unset")}
            self._rooms[room_id] = (time.monotonic(), keys)
            self._rooms.move_to_end(room_id)
            if len(self._rooms) > _ROOMS_CACHED:
                self._rooms.popitem(last=False)
            fut.set_result(keys)
            return keys
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else StoreError("cancelled"))
            fut.exception()  # retrieved: no warning when nobody else waits
            raise
        finally:
            del self._reading[room_id]

    async def put(self, tenant: str, room: str, key: str, seq: int, event_map: dict[str, Any],
                  unset: bool) -> None:
        """Make event ``seq`` the value of ``key`` (a tombstone when ``unset``), unless the
        key holds a seq as high or higher of the same epoch; returns once the key holds ``seq``
        or a higher one (or a later epoch's value).

        The event's epoch is the stream's as this node knows it now (the put follows the
        stream's ack at once): the one ``joined`` frames name.

        Raises:
            StoreError: Not written within the deadline.
        """
        subject = self.subject(tenant, room, key)
        epoch = self.store.epoch
        value = dict(event_map)
        value["seq"] = seq
        value["key"] = key
        value[_EPOCH_FIELD] = epoch
        if unset:
            value["unset"] = True
        writer = self._writers.get(subject)
        if writer is None:
            writer = self._writers[subject] = _KeyWriter()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        writer.waiters.append((epoch, seq, fut))
        best = writer.best
        if best is None or best[0] != epoch or best[1] < seq:
            # Epochs only move on: a put of another epoch than the waiting one is a later one's.
            writer.best = (epoch, seq, CBOR.encode(value), unset)
        if not writer.running:
            writer.running = True
            task = asyncio.get_running_loop().create_task(
                self._drain(subject, writer, (tenant, room, key)), name=f"state[{subject}]")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await fut

    async def _drain(self, subject: str, writer: _KeyWriter,
                     known: tuple[str, str, str]) -> None:
        """Write the highest waiting seq of one key until none waits: a burst of publishes of
        one key (a pipelining publisher sends hundreds) costs a few writes, not one
        compare-and-set each, which would conflict with one another."""
        try:
            while writer.best is not None:
                epoch, seq, body, unset = writer.best
                writer.best = None
                error: StoreError | None = None
                try:
                    await self._write(subject, epoch, seq, body, unset)
                except StoreError as exc:
                    error = exc
                else:
                    cached = self._rooms.get(known[:2])
                    if cached is not None:
                        if unset:
                            cached[1].discard(known[2])
                        else:
                            cached[1].add(known[2])
                waiting: list[tuple[str, int, asyncio.Future[None]]] = []
                following = writer.best
                for waiter_epoch, waiter_seq, fut in writer.waiters:
                    covered = waiter_epoch == epoch and waiter_seq <= seq
                    if not covered and following is not None and waiter_epoch == following[0]:
                        # The next write covers it (the highest waiting seq of its epoch).
                        waiting.append((waiter_epoch, waiter_seq, fut))
                    elif not fut.done():  # covered, or of an earlier epoch than this write
                        if error is None:
                            fut.set_result(None)
                        else:
                            fut.set_exception(error)
                writer.waiters = waiting
        finally:
            writer.running = False
            for _, _, fut in writer.waiters:  # cancelled (the node stops): nothing covers them
                if not fut.done():
                    fut.set_exception(StoreError("state not written: node stopping"))
            if self._writers.get(subject) is writer:
                del self._writers[subject]

    async def _write(self, subject: str, epoch: str, seq: int, body: bytes,
                     unset: bool) -> None:
        """Compare-and-set ``body`` (event ``seq`` of ``epoch``) as ``subject``'s value: over a
        lower seq of the same epoch, or over any value of another epoch.

        Raises:
            StoreError: Not written within the deadline.
        """
        backoff = Backoff(self.deadline_s, first=0.02)
        reason = "no answer"
        for attempt in range(_CAS_TRIES):
            try:
                # This node's last write of the key saves a read (a device keeps publishing
                # through one node): a wrong guess is a conflict, and the next try reads.
                last = self._written.get(subject) if attempt == 0 else None
                if last is not None:
                    revision, current, held_epoch = last
                else:
                    revision, current, held_epoch = await self._current(
                        subject, leader=attempt > 0)
                if current >= seq and _same_epoch(held_epoch, epoch):
                    self.stale += 1
                    return
                headers = {"Nats-Expected-Last-Subject-Sequence": str(revision),
                           _SEQ_HEADER: str(seq), _EPOCH_HEADER: epoch}
                if unset:
                    headers["Nats-TTL"] = f"{TOMBSTONE_TTL_S}s"
                left = max(0.05, backoff.left())
                reply = await self.store.link.nc.request(subject, body, timeout=min(2.0, left),
                                                         headers=headers)
                answer = json.loads(reply.data) if reply.data else {}
                err = answer.get("error")
                if not err and "seq" in answer:
                    self.puts += 1
                    self._written[subject] = (int(answer["seq"]), seq, epoch)
                    self._written.move_to_end(subject)
                    if len(self._written) > _WRITTEN_MAX:
                        self._written.popitem(last=False)
                    return
                self._written.pop(subject, None)
                code = err.get("err_code") if err else None
                if code in (WRONG_LAST_SEQUENCE, WRITE_IN_PROCESS) and last is None:
                    self.conflicts += 1  # another node wrote it meanwhile: read again
                if code == WRONG_LAST_SEQUENCE:
                    continue  # (one in process: a moment's wait first, below)
                reason = str(err.get("description", "refused")) if err else "no ack"
            except StoreError as exc:
                reason = str(exc)
            except ValueError:
                reason = "bad answer from JetStream"
            except Exception as exc:  # no responders (election), timeout, disconnected
                reason = type(exc).__name__
            self._written.pop(subject, None)  # perhaps written: read before the next try
            if not await backoff.wait():
                raise StoreError(f"state not written: {reason}")
        raise StoreError("state not written: too many concurrent writes of the key")

    # -- reading -----------------------------------------------------------------------------

    async def _current(self, subject: str, *, leader: bool) -> tuple[int, int, str]:
        """(revision, seq, epoch) of ``subject``'s value, (0, 0, "") when it has none. The first
        try of a write reads any replica; after a conflict, the stream leader (a replica that is
        behind would answer the same stale revision again)."""
        if leader:
            ev = await self.store.leader_get({"last_by_subj": subject}, _STREAM)
            if ev is None:
                return 0, 0, ""
            try:
                value = cbor_loads_strict(ev.body)
            except ProtocolError:
                return ev.seq, 0, ""
            return ev.seq, _seq_of(value), _epoch_of(value)
        batch = await self.store.direct_get({"last_by_subj": subject}, _STREAM)
        if not batch.events:
            return 0, 0, ""
        ev, headers = batch.events[0], batch.headers[0]
        try:
            seq = int(headers.get(_SEQ_HEADER, "0"))
        except ValueError:
            seq = 0
        return ev.seq, seq, headers.get(_EPOCH_HEADER, "")

    async def _scan(self, tenant: str, room: str) -> dict[str, dict[str, Any]]:
        """Every key's latest value of the room, tombstones included, those of another epoch
        left out (their seqs number events of a stream that is gone): KV subject -> map."""
        prefix = f"{_PREFIX}.{tenant}.{_token(room)}."
        epoch = self.store.epoch
        latest: dict[str, dict[str, Any]] = {}
        start = 1
        while True:
            batch = await self.store.direct_get(
                {"seq": start, "next_by_subj": prefix + ">", "batch": _BATCH}, _STREAM)
            for ev, headers in zip(batch.events, batch.headers, strict=True):
                try:
                    value = cbor_loads_strict(ev.body)
                except ProtocolError:
                    continue
                if not isinstance(value, dict) or not isinstance(value.get("key"), str):
                    continue
                if not _same_epoch(_epoch_of(value), epoch):
                    continue
                value.pop(_EPOCH_FIELD, None)
                subject = headers.get("Nats-Subject", "")
                held = latest.get(subject)
                if held is None or _seq_of(held) < _seq_of(value):
                    latest[subject] = value  # a key written during the scan: the newer wins
            if len(batch.events) < _BATCH:
                return latest
            start = batch.events[-1].seq + 1
