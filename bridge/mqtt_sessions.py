"""Persistent MQTT sessions (``clean_session = 0``) in a JetStream KV bucket.

Bucket ``RTNODE_MQTT_SESSIONS`` (the room stream's replicas, file storage), one key per device:
``<tenant>.<client_id>``, its value a :class:`SessionRecord` as JSON. The bucket's max age is
``mqtt_session_expiry_s``: every write refreshes a record, so a session expires that long after
its last write (a connected session is rewritten at least every half expiry).

Writes are compare-and-set on the key's revision (``Nats-Expected-Last-Subject-Sequence``):
the node that takes a device's CONNECT claims the record with the revision it read, and every
later write of that connection names the revision of its previous one. A write by an older
owner (the device has reconnected elsewhere meanwhile) fails with :class:`SessionTaken`, and
that connection is closed as taken over. A claim also tells every node at once on
``rtnode.mqtt.takeover.<tenant>.<client_id>`` (core NATS), so that an idle old connection on
another node is closed without waiting for its next write.

Before it claims a record that a connection holds (``connected``), a node asks that
connection's node to hand the session over (a request on ``rtnode.mqtt.handover.<node>``, or
in-process for its own connections): the connection there is closed if still open, its last
write (its last cursors, ``connected = False``) is waited for, and then the claim reads the
record. Without it the claim could land before that write, which then lost the race and its
cursors with it: the device got PUBLISHes again that it had acknowledged. A node that does
not answer (dead: no responders; or within ``_HANDOVER_TIMEOUT_S``) is not waited for. A
last write that has not landed within ``_HANDOVER_WAIT_S`` (JetStream electing a leader), or
that failed, does not lose the cursors either: the handover's answer carries the state the
connection's writer would write next (a write still in flight was asked for before the PUBACKs
that came during it: the connection's positions now), or that of its last failed write, and
the claim takes its subscriptions and positions, on each of its tries (the write in flight may
land between the claim's read and its write). When nothing newer comes
(the holder's node is gone, cut off from NATS, or restarted since: its new process never held
the connection), the record still says ``connected``, and its positions may be behind what the
device got: the claim says so (``behind``), and the resume sends every event stored until then
with DUP.

A notice names the claim it announces (headers, its body is the claiming node's name as before):
``Rtnode-Takeover-Before`` is a revision, and only a connection holding a revision below it is
taken over (a claim's own revision; a deleted record's revision + 1); ``Rtnode-Takeover-Conn``
is the claiming connection's id, which ignores its own notice. A notice that arrives late (the
device reconnected again meanwhile: A, B, then C, and B's notice comes after C's claim) is then
older than the connection it reaches and closes nothing. A notice without the headers (a node
of an older version) closes the device's connection on every other node, as it always did.

A write whose answer is lost (a timeout during a leader election) may have landed: the next
write, which names the revision before it, then conflicts with the connection's own write. The
connection reads the record, and when it holds one of its own lost writes it goes on from that
revision (``MqttSession._own_write_landed``) rather than take it for a takeover.

Deleting a session purges its key (no marker is left). Sessions per tenant are bounded
(``mqtt_max_sessions_per_tenant``): a claim of a new session beyond it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from nats.errors import NoRespondersError
from nats.js.api import StorageType, StreamConfig

from bridge.room_store import (
    WRITE_IN_PROCESS,
    WRONG_LAST_SEQUENCE,
    Backoff,
    JetStreamRoomStore,
)
from node.core.ports import StoreError

__all__ = ["BUCKET", "SessionRecord", "SessionStore", "SessionTaken", "SessionsFull", "Takeover"]

log = logging.getLogger("bridge.mqtt_sessions")

BUCKET = "RTNODE_MQTT_SESSIONS"
_STREAM = f"KV_{BUCKET}"
_PREFIX = f"$KV.{BUCKET}"
_TAKEOVER = "rtnode.mqtt.takeover"
_HANDOVER = "rtnode.mqtt.handover"
# How long a handover waits for the old connection's last write (on its node), and how long a
# claim waits for the answer: a write's own timeout is 5 s, but a holder that slow is passed
# over (the claim then takes the session, and that write fails as taken over). The answer
# carries the state of a write that has not landed, so the wait need not be long; the claim
# waits well beyond it: with 2.0 and 2.5 s, a holder on a loaded machine during a leader
# election answered after the claim had stopped waiting, and the device got its acknowledged
# events again (test_device_faults, seed 9930204).
_HANDOVER_WAIT_S = 1.5
_HANDOVER_TIMEOUT_S = 4.0
BEFORE_HEADER = "Rtnode-Takeover-Before"
CONN_HEADER = "Rtnode-Takeover-Conn"
# Someone else wrote (or is writing) the record (see bridge.room_store).
_LOST_RACE = (WRONG_LAST_SEQUENCE, WRITE_IN_PROCESS)
_CLAIM_TRIES = 8
_WRITE_TIMEOUT_S = 5.0
_PAGE = 1000  # records read per request by list()


class SessionTaken(Exception):
    """The record was written by someone else since we read it: the device is elsewhere."""


class SessionsFull(Exception):
    """The tenant has ``mqtt_max_sessions_per_tenant`` sessions already."""


@dataclass(frozen=True)
class Takeover:
    """A takeover notice: a claim of a device's session (or its deletion) somewhere.

    Attributes:
        tenant: The device's tenant.
        client_id: The device's client id.
        before: A connection holding a revision below this one is taken over; None for a
            notice of an older node (every connection of the device is, but the sender's
            node's own).
        conn: The id of the connection that claimed (or deleted) the session ("" if none).
    """

    tenant: str
    client_id: str
    before: int | None = None
    conn: str = ""

    def supersedes(self, revision: int) -> bool:
        """Whether a connection holding ``revision`` is taken over by this notice."""
        return self.before is None or revision < self.before


@dataclass
class SessionRecord:
    """One device's persistent session.

    Attributes:
        tenant: Its tenant.
        client_id: The device's client id.
        subs: Topic filter -> granted QoS (``rooms/<room>``, ``rtnode/v1/<id>/out``).
        cursors: Room -> the last seq the device acknowledged in order.
        epoch: The room stream's epoch the cursors belong to.
        node: The node holding (or that last held) the connection.
        connected: Whether a connection holds it now.
        created_ms: When the session was created (ms since the epoch).
        updated_ms: When it was last written.
        sent: Room -> the highest seq written to the device (sent again with DUP on a resume
            when above the cursor).
        behind: The positions may be behind what the device got: a claim took the session
            without its holder's last state, and its connection ended before its resume had
            read how far the rooms went (it sends every event stored until then with DUP); the
            next claim is behind too.
    """

    tenant: str
    client_id: str
    subs: dict[str, int] = field(default_factory=dict)
    cursors: dict[str, int] = field(default_factory=dict)
    epoch: str = ""
    node: str = ""
    connected: bool = False
    created_ms: int = 0
    updated_ms: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    behind: bool = False

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-able dict (what is stored, and what ``/api`` shows)."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> SessionRecord | None:
        """A record from its stored JSON (None when it is not one)."""
        if not isinstance(value, dict):
            return None
        try:
            return cls(
                tenant=str(value["tenant"]), client_id=str(value["client_id"]),
                subs={str(k): int(v) for k, v in dict(value.get("subs") or {}).items()},
                cursors={str(k): int(v) for k, v in dict(value.get("cursors") or {}).items()},
                epoch=str(value.get("epoch", "")), node=str(value.get("node", "")),
                connected=bool(value.get("connected", False)),
                created_ms=int(value.get("created_ms", 0)),
                updated_ms=int(value.get("updated_ms", 0)),
                sent={str(k): int(v) for k, v in dict(value.get("sent") or {}).items()},
                behind=bool(value.get("behind", False)),
            )
        except (KeyError, TypeError, ValueError):
            return None


def _take_positions(record: SessionRecord, newer: SessionRecord) -> None:
    """Give ``record`` the subscriptions and positions of ``newer``, a later state of the same
    connection's session that was not stored (a cursor never goes back)."""
    record.subs = dict(newer.subs)
    record.cursors = {r: max(c, record.cursors.get(r, 0)) for r, c in newer.cursors.items()}
    record.sent = {r: max(c, record.sent.get(r, 0)) for r, c in newer.sent.items()}
    record.behind = newer.behind


def _subject(tenant: str, client_id: str) -> str:
    return f"{_PREFIX}.{tenant}.{client_id}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class SessionStore:
    """The persistent sessions of every node, in ``RTNODE_MQTT_SESSIONS``.

    Args:
        store: The node's JetStream store (its connection, direct and leader gets).
        replicas: Replicas of the bucket.
        expiry_s: A session not written for this long is gone.
        max_per_tenant: Sessions per tenant at most.
        node: This node's name (for takeover notices).

    Attributes:
        on_takeover: Called with a :class:`Takeover` when a session was claimed or deleted
            (by another connection, of this node or another).
    """

    def __init__(self, store: JetStreamRoomStore, *, replicas: int = 1,
                 expiry_s: float = 604800, max_per_tenant: int = 100000,
                 node: str = "") -> None:
        self.store = store
        self.replicas = replicas
        self.expiry_s = expiry_s
        self.max_per_tenant = max_per_tenant
        self.node = node
        self.on_takeover: Callable[[Takeover], None] | None = None
        #: Called with (tenant, client_id, before) when another connection is about to claim
        #: a device's session: its connection here, if it holds a revision below ``before``,
        #: closes and writes its last cursors.
        self.on_handover: Callable[[str, str, int], None] | None = None
        self.writes = 0
        self.conflicts = 0
        self._sub: Any = None
        self._handover_sub: Any = None
        self._held: set[asyncio.Task[None]] = set()
        # The session writes of this node's connections, by device: a claim waits for them.
        self._writers: dict[tuple[str, str], asyncio.Task[None]] = {}
        # The newest state this node's connection of a device asked to write, until a write
        # of it lands (or the session is taken): a handover hands it to the claim when that
        # write failed (JetStream electing a leader).
        self._unwritten: dict[tuple[str, str], dict[str, Any]] = {}
        # The state a device's session writer here will write next, once its connection is
        # closed (its last positions; None before that, or once it has none to write), by
        # device: a handover hands it to the claim when the writer is still busy. The write in
        # flight is older than that: the PUBACKs that came during it (and the final write at
        # the close) wait behind it.
        self._latest: dict[tuple[str, str], Callable[[], dict[str, Any] | None]] = {}

    async def start(self) -> None:
        """Create or update the bucket; listen for takeovers by other nodes."""
        cfg = StreamConfig(
            name=_STREAM, subjects=[f"{_PREFIX}.>"], storage=StorageType.FILE,
            num_replicas=self.replicas, max_msgs_per_subject=1, max_age=self.expiry_s,
            allow_direct=True, allow_rollup_hdrs=True, deny_delete=True, deny_purge=False,
        )
        await self.store.link.ensure_bucket(f"MQTT session bucket {_STREAM}", cfg)
        self._sub = await self.store.link.nc.subscribe(f"{_TAKEOVER}.>", cb=self._on_takeover)
        self._handover_sub = await self.store.link.nc.subscribe(
            f"{_HANDOVER}.{self.node}", cb=self._on_handover_request)

    def hold(self, task: asyncio.Task[None], tenant: str, client_id: str,
             latest: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Keep a connection's session write until it is done: :meth:`stop` waits for it (the
        last cursors of the connections a stopping node closes), and so does a claim of the
        device's session (:meth:`hand_over`). ``latest``: the state the writer would write
        next, as a record's JSON (None when it has nothing to write)."""
        self._held.add(task)
        task.add_done_callback(self._held.discard)
        key = (tenant, client_id)
        self._writers[key] = task
        if latest is not None:
            self._latest[key] = latest
        else:
            self._latest.pop(key, None)
        task.add_done_callback(functools.partial(self._written, key))

    def _written(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._writers.get(key) is task:
            del self._writers[key]
            self._latest.pop(key, None)

    async def hand_over(self, tenant: str, client_id: str, before: int
                        ) -> dict[str, Any] | None:
        """Have this node's connection of the device, if it holds a revision below ``before``,
        closed with its last write; return once the device's session writes here are done
        (at most ``_HANDOVER_WAIT_S``): None, or the state its last write did not store (yet)
        as a record's JSON, for the claim to take its cursors from.

        A writer still busy then hands over the state it would write next (its connection's
        last positions, once it is closed: the close's write), not that of its write in
        flight: that one was asked for before the PUBACKs that came during it, and a claim
        that took it sent the device those acknowledged events again (test_device_faults,
        seed 9930204: a clean DISCONNECT, then the events again on the other node, with no
        ``behind``)."""
        key = (tenant, client_id)
        if self.on_handover is not None:
            self.on_handover(tenant, client_id, before)
        # The close's write, and the writes of PUBACKs read after it (the device's last ones,
        # still unread when it closed): a writer that ends may have a successor.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _HANDOVER_WAIT_S
        task = self._writers.get(key)
        while task is not None and not task.done() and loop.time() < deadline:
            await asyncio.wait({task}, timeout=deadline - loop.time())
            task = self._writers.get(key) or task
        if task is not None and not task.done():
            latest = self._latest.get(key)
            state = latest() if latest is not None else None
            if state is not None:
                log.info("= handover of %s/%s: its session write has not landed; its last "
                         "state goes with the answer", tenant, client_id)
                return state
        return self._unwritten.get(key)

    async def _on_handover_request(self, msg: Any) -> None:
        try:
            asked = json.loads(msg.data)
            tenant, client_id, before = asked["tenant"], asked["client_id"], int(asked["before"])
            if not (isinstance(tenant, str) and isinstance(client_id, str)):
                raise TypeError("tenant and client_id are strings")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("! bad handover request on %s: %s", msg.subject, exc)
            return
        # A task each: nats-py runs one subscription's callbacks one after the other, and a
        # handover may wait for a write (a drained node's devices all move at once).
        task = asyncio.get_running_loop().create_task(
            self._answer_handover(tenant, client_id, before, msg))
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def _answer_handover(self, tenant: str, client_id: str, before: int,
                               msg: Any) -> None:
        state = await self.hand_over(tenant, client_id, before)
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(b"" if state is None else json.dumps(state).encode())

    async def _ask_handover(self, tenant: str, client_id: str, holder: str,
                            revision: int) -> SessionRecord | None:
        """The session's holder (``revision``, on node ``holder``) hands it over; bounded.
        Returns the state of its last write when that write did not land (else None)."""
        if not holder:
            return None  # a record of an older node, which named none
        if holder == self.node:
            return SessionRecord.from_json(
                await self.hand_over(tenant, client_id, revision + 1))
        body = json.dumps({"tenant": tenant, "client_id": client_id,
                           "before": revision + 1}).encode()
        try:
            reply = await self.store.link.nc.request(f"{_HANDOVER}.{holder}", body,
                                                     timeout=_HANDOVER_TIMEOUT_S)
        except Exception as exc:  # no responders (that node is gone), timeout: not waited for
            log.debug("= handover of %s/%s by %s not answered: %s", tenant, client_id, holder,
                      type(exc).__name__)
            return None
        try:  # empty from a node of an older version, or when its writes landed
            return SessionRecord.from_json(json.loads(reply.data)) if reply.data else None
        except ValueError:
            return None

    async def stop(self) -> None:
        """Wait (at most 5 s) for the writes in progress, stop listening (records stay)."""
        if self._held:
            await asyncio.wait(list(self._held), timeout=5)
        for sub in (self._sub, self._handover_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._sub = self._handover_sub = None

    async def _on_takeover(self, msg: Any) -> None:
        parts = msg.subject[len(_TAKEOVER) + 1:].split(".", 1)
        if len(parts) != 2 or self.on_takeover is None:
            return
        headers = msg.headers or {}
        raw = headers.get(BEFORE_HEADER)
        if raw is None:
            # A node of an older version: it names no claim.
            if msg.data.decode(errors="replace") == self.node:
                return  # our own claim: the bridge already took its local connection over
            self.on_takeover(Takeover(parts[0], parts[1]))
            return
        try:
            before = int(raw)
        except ValueError:
            log.warning("! takeover notice on %s with a bad %s: %r", msg.subject,
                        BEFORE_HEADER, raw[:40])
            return
        self.on_takeover(Takeover(parts[0], parts[1], before,
                                  str(headers.get(CONN_HEADER, ""))))

    # -- reading ---------------------------------------------------------------------------

    async def read(self, tenant: str, client_id: str) -> tuple[SessionRecord | None, int]:
        """The record and its revision, as the stream leader has it ((None, 0) if none).

        Raises:
            StoreError: JetStream did not answer.
        """
        ev = await self.store.leader_get({"last_by_subj": _subject(tenant, client_id)},
                                         _STREAM)
        if ev is None:
            return None, 0
        try:
            record = SessionRecord.from_json(json.loads(ev.body)) if ev.body else None
        except ValueError:
            record = None
        return record, ev.seq

    async def get(self, tenant: str, client_id: str) -> SessionRecord | None:
        """The device's session, or None."""
        return (await self.read(tenant, client_id))[0]

    async def list(self, tenant: str) -> list[SessionRecord]:
        """Every session of ``tenant``, by client id (read page by page: the bucket keeps one
        message per key, and no delete markers).

        Raises:
            StoreError: JetStream did not answer.
        """
        out = []
        seq = 1
        while True:
            batch = await self.store.direct_get(
                {"next_by_subj": f"{_PREFIX}.{tenant}.*", "seq": seq, "batch": _PAGE}, _STREAM)
            for ev in batch.events:
                try:
                    record = SessionRecord.from_json(json.loads(ev.body)) if ev.body else None
                except ValueError:
                    record = None
                if record is not None:
                    out.append(record)
            if not batch.events or not batch.pending:
                break
            seq = batch.events[-1].seq + 1
        out.sort(key=lambda r: r.client_id)
        return out

    async def count(self, tenant: str) -> int:
        """How many sessions ``tenant`` has (a hint: from the stream's pending count)."""
        batch = await self.store.direct_get(
            {"seq": 1, "next_by_subj": f"{_PREFIX}.{tenant}.*", "batch": 1}, _STREAM)
        return batch.pending + 1 if batch.events else 0

    # -- writing ---------------------------------------------------------------------------

    async def write(self, record: SessionRecord, revision: int) -> int:
        """Write ``record`` over ``revision`` (0: it must not exist). Returns the new revision.

        Raises:
            SessionTaken: Someone else wrote it since.
            StoreError: JetStream did not answer, or refused.
        """
        record.updated_ms = _now_ms()
        key = (record.tenant, record.client_id)
        state = record.to_json()
        self._unwritten[key] = state
        try:
            revision = await self._write(record, state, revision)
        except SessionTaken:
            if self._unwritten.get(key) is state:
                del self._unwritten[key]  # the session is another connection's now
            raise
        if self._unwritten.get(key) is state:
            del self._unwritten[key]
        return revision

    async def _write(self, record: SessionRecord, state: dict[str, Any], revision: int) -> int:
        body = json.dumps(state, separators=(",", ":")).encode()
        headers = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
        backoff = Backoff(_WRITE_TIMEOUT_S)
        while True:
            try:
                reply = await self.store.link.nc.request(
                    _subject(record.tenant, record.client_id), body,
                    timeout=max(0.05, backoff.left()), headers=headers)
                ack: dict[str, Any] = json.loads(reply.data)
                break
            except NoRespondersError:
                # Nothing took it (stored nowhere): no server knows the bucket's stream yet,
                # for a moment after it is created on a cluster, or during an election.
                pass
            except ValueError:
                raise StoreError("bad ack from JetStream") from None
            except Exception as exc:
                raise StoreError(f"session write failed: {type(exc).__name__}") from None
            if not await backoff.wait():
                raise StoreError("session write failed: no responders")
        err = ack.get("error")
        if err:
            if err.get("err_code") in _LOST_RACE:
                self.conflicts += 1
                raise SessionTaken(f"session {record.tenant}/{record.client_id} taken")
            raise StoreError(str(err.get("description", "refused")))
        self.writes += 1
        return int(ack["seq"])

    async def claim(self, tenant: str, client_id: str, *, epoch: str,
                    conn: str = "") -> tuple[SessionRecord, int, bool, bool]:
        """Take the device's session for this node (CONNECT with ``clean_session = 0``); a
        takeover notice names the claim (its revision, ``conn``: the claiming connection's id).

        Returns:
            (record, revision, present, behind): the record now held (``connected``, this
            node), its revision, whether it existed (CONNACK's session-present), and whether
            its positions may be behind what the device got: a connection held it and no last
            state of that connection came (its node is gone, cut off from NATS, or restarted
            since; or another claim took the session meanwhile), so that the device may have
            been sent, and may have acknowledged, events past its cursors and sent marks.

        Raises:
            SessionsFull: A new session beyond ``max_per_tenant``.
            StoreError: JetStream did not answer.
        """
        handed = False
        holder = ""
        unwritten: SessionRecord | None = None
        for attempt in range(_CLAIM_TRIES):
            if attempt:
                # A lost race: the other write may still be in process on the leader (read
                # now, it would show the revision it replaces), so wait a moment, jittered.
                await asyncio.sleep(random.uniform(0.005, 0.01 * 2 ** attempt))
            record, revision = await self.read(tenant, client_id)
            if record is not None and record.connected and not handed:
                # Held by a connection: its last cursors first (see the module's docstring).
                handed = True
                holder = record.node
                unwritten = await self._ask_handover(tenant, client_id, holder, revision)
                record, revision = await self.read(tenant, client_id)
            took = False
            if (unwritten is not None and record is not None and record.node == holder
                    and unwritten.epoch == record.epoch
                    and record.updated_ms <= unwritten.updated_ms):
                # Its last write has not landed: its state is newer than the record's. On a
                # retry too: the holder's write in flight may land between the read and this
                # claim's write (a lost race), and the record is then that older state.
                _take_positions(record, unwritten)
                took = True
            # Still held, and no last state came: the holder wrote none (its final write says
            # connected = False) and handed none over. Or the last connection was behind
            # itself, and ended before it knew how far.
            behind = record is not None and ((record.connected and not took) or record.behind)
            holder_of = record.node if record is not None else ""
            present = record is not None
            if record is None:
                if await self.count(tenant) >= self.max_per_tenant:
                    raise SessionsFull(f"tenant {tenant} has {self.max_per_tenant} sessions")
                record = SessionRecord(tenant, client_id, epoch=epoch, created_ms=_now_ms())
            record.node = self.node
            record.connected = True
            record.behind = behind
            try:
                revision = await self.write(record, revision)
            except SessionTaken:
                continue  # written meanwhile (a racing CONNECT): read it again
            except BaseException:
                if behind:
                    # This claim may have landed (its answer lost, or its connection gone
                    # meanwhile: cancelled): the next one must not take its positions, kept for
                    # a handover, for a holder's last state, as they are those of the record
                    # that was behind.
                    self._unwritten.pop((tenant, client_id), None)
                raise
            self._unwritten.pop((tenant, client_id), None)  # an earlier connection's here
            self._announce(tenant, client_id, revision, conn)
            if behind:
                log.info("= session of %s/%s taken from %s without its last state: what it "
                         "may have sent goes again with DUP", tenant, client_id, holder_of)
            elif took:
                log.info("= session of %s/%s taken from %s with the last state it had not "
                         "stored", tenant, client_id, holder_of)
            return record, revision, present, behind
        raise StoreError("session claim kept conflicting")

    async def delete(self, tenant: str, client_id: str, *, conn: str = "") -> int:
        """Delete the device's session (purge its key; a ``clean_session = 1`` CONNECT, or
        ``/api``). A connection holding it on another node is closed (takeover notice, from
        ``conn``), one on any node at its next write. Returns the revision deleted (0: there
        was none).

        Raises:
            StoreError: JetStream did not answer.
        """
        record, revision = await self.read(tenant, client_id)
        try:
            await self.store.link.js.purge_stream(_STREAM,
                                                  subject=_subject(tenant, client_id))
        except Exception as exc:
            raise StoreError(f"session delete failed: {type(exc).__name__}") from None
        self._unwritten.pop((tenant, client_id), None)
        if record is None:
            return 0
        self._announce(tenant, client_id, revision + 1, conn)
        return revision

    def _announce(self, tenant: str, client_id: str, before: int, conn: str) -> None:
        asyncio.get_running_loop().create_task(
            self._publish_takeover(tenant, client_id, before, conn))

    async def _publish_takeover(self, tenant: str, client_id: str, before: int,
                                conn: str) -> None:
        with contextlib.suppress(Exception):
            await self.store.link.nc.publish(
                f"{_TAKEOVER}.{tenant}.{client_id}", self.node.encode(),
                headers={BEFORE_HEADER: str(before), CONN_HEADER: conn})
