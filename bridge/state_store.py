"""The values of state rooms in a JetStream key-value bucket (``RTNODE_STATE``).

One key per (tenant, room, key): ``<tenant>.<room token>.<key token>``, the room and the key
base64url-encoded (KV keys cannot hold ``:``, ``@``, spaces...). The value is the CBOR event map
as stored in the room's stream, with its ``seq``; a header ``Rtnode-Seq`` repeats the seq so
that a write can compare without decoding.

Writes are compare-and-set (the ``Nats-Expected-Last-Subject-Sequence`` of a KV update): read
the key's revision and seq, give up if the stored seq is as high or higher (an older event
arriving late, or the same event again), else write over that revision, and read again on a
conflict. So a lower seq never overwrites a higher one, whatever the order the writes of two
nodes arrive in. An unset is written as a tombstone (the event map with ``unset: true``), kept
:data:`TOMBSTONE_TTL_S` (a per-message TTL): an older put arriving late cannot resurrect the
key. Reads skip tombstones.

Reads take batches of direct gets filtered on the room's keys (``next_by_subj`` with
``<room>.>``), from any replica: a replica that is behind may miss the latest writes. The room
actor merges the events it delivered lately into what a joiner reads (``node.core.room``), so
a joiner never misses a value whose event it will not receive live.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError

from bridge.room_store import JetStreamRoomStore
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
_BATCH = 256
# JetStream's answer to a write whose expected last subject sequence is not the key's.
_WRONG_LAST_SEQUENCE = 10071
_CAS_TRIES = 20
_KNOWN_MAX = 65536  # (tenant, room, key) known to be set, for may_add without a read


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _seq_of(event_map: Any) -> int:
    seq = event_map.get("seq") if isinstance(event_map, dict) else None
    return seq if type(seq) is int else 0


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
        self._known: OrderedDict[tuple[str, str, str], None] = OrderedDict()
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
        js = self.store.link.js

        async def ensure_bucket() -> None:
            try:
                await js.add_stream(cfg)
            except BadRequestError as exc:
                if exc.err_code != 10058:  # exists with another config
                    raise
                await js.update_stream(cfg)

        await self.store.link.set_up(f"state bucket {_STREAM}", ensure_bucket)

    async def stop(self) -> None:
        """Nothing to release: every write is awaited by its publisher."""

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
        """Whether ``key`` may be set: known to be set, or the room holds fewer than
        ``max_keys`` keys (counted by a read; concurrent new keys may pass it by a few).

        Raises:
            StoreError: JetStream did not answer.
        """
        known = (tenant, room, key)
        if known in self._known:
            return True
        latest = await self._scan(tenant, room)
        live = {v.get("key") for v in latest.values() if not v.get("unset")}
        if key in live:
            self._remember(known)
            return True
        return len(live) < self.max_keys

    async def put(self, tenant: str, room: str, key: str, seq: int, event_map: dict[str, Any],
                  unset: bool) -> None:
        """Make event ``seq`` the value of ``key`` (a tombstone when ``unset``), unless the
        key holds a seq as high or higher.

        Raises:
            StoreError: Not written within the deadline.
        """
        subject = self.subject(tenant, room, key)
        value = dict(event_map)
        value["seq"] = seq
        value["key"] = key
        if unset:
            value["unset"] = True
        body = CBOR.encode(value)
        deadline = time.monotonic() + self.deadline_s
        delay = 0.02
        reason = "no answer"
        for attempt in range(_CAS_TRIES):
            try:
                revision, current = await self._current(subject, leader=attempt > 0)
                if current >= seq:
                    self.stale += 1
                    break
                headers = {"Nats-Expected-Last-Subject-Sequence": str(revision),
                           _SEQ_HEADER: str(seq)}
                if unset:
                    headers["Nats-TTL"] = f"{TOMBSTONE_TTL_S}s"
                left = max(0.05, deadline - time.monotonic())
                reply = await self.store.link.nc.request(subject, body, timeout=min(2.0, left),
                                                         headers=headers)
                answer = json.loads(reply.data) if reply.data else {}
                err = answer.get("error")
                if not err and "seq" in answer:
                    self.puts += 1
                    break
                if err and err.get("err_code") == _WRONG_LAST_SEQUENCE:
                    self.conflicts += 1  # written meanwhile: read it again, from the leader
                    continue
                reason = str(err.get("description", "refused")) if err else "no ack"
            except StoreError as exc:
                reason = str(exc)
            except ValueError:
                reason = "bad answer from JetStream"
            except Exception as exc:  # no responders (election), timeout, disconnected
                reason = type(exc).__name__
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreError(f"state not written: {reason}")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)
        else:
            raise StoreError("state not written: too many concurrent writes of the key")
        known = (tenant, room, key)
        if unset:
            self._known.pop(known, None)
        else:
            self._remember(known)

    # -- reading -----------------------------------------------------------------------------

    async def _current(self, subject: str, *, leader: bool) -> tuple[int, int]:
        """(revision, seq) of ``subject``'s value, (0, 0) when it has none. The first try of a
        write reads any replica; after a conflict, the stream leader (a replica that is behind
        would answer the same stale revision again)."""
        if leader:
            ev = await self.store.leader_get({"last_by_subj": subject}, _STREAM)
            if ev is None:
                return 0, 0
            try:
                return ev.seq, _seq_of(cbor_loads_strict(ev.body))
            except ProtocolError:
                return ev.seq, 0
        batch = await self.store.direct_get({"last_by_subj": subject}, _STREAM)
        if not batch.events:
            return 0, 0
        ev, headers = batch.events[0], batch.headers[0]
        try:
            seq = int(headers.get(_SEQ_HEADER, "0"))
        except ValueError:
            seq = 0
        return ev.seq, seq

    async def _scan(self, tenant: str, room: str) -> dict[str, dict[str, Any]]:
        """Every key's latest value of the room, tombstones included: KV subject -> map."""
        prefix = f"{_PREFIX}.{tenant}.{_token(room)}."
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
                subject = headers.get("Nats-Subject", "")
                held = latest.get(subject)
                if held is None or _seq_of(held) < _seq_of(value):
                    latest[subject] = value  # a key written during the scan: the newer wins
            if len(batch.events) < _BATCH:
                return latest
            start = batch.events[-1].seq + 1

    def _remember(self, known: tuple[str, str, str]) -> None:
        self._known[known] = None
        self._known.move_to_end(known)
        if len(self._known) > _KNOWN_MAX:
            self._known.popitem(last=False)
