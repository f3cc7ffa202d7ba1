"""Cluster-wide presence in a JetStream key-value bucket (``RTNODE_PRESENCE``).

Each node puts one key per member (``<tenant>.<room>.<client_id>``, the room base64url-encoded
since KV keys cannot hold ``:`` or ``@``) and puts it again every third of the TTL. Every message
carries its own TTL (``Nats-TTL``, nats-server 2.11+, the stream ``allow_msg_ttl``), an online
member's the presence TTL, so the members of a node that dies vanish on their own within the TTL.

Offline members: a plain MQTT device with a persistent session that disconnects stays in its
rooms as ``online: false`` (:meth:`PresenceTracker.mark_offline`), in the same key with the
session's expiry as TTL and refreshed by nobody (no memory on any node), until the session
expires (the key vanishes: a leave, as below), the device comes back (its key is online again)
or the session is deleted (:meth:`PresenceTracker.clear_offline`). The stream's max age is only
a bound for all of them (``offline_max_s``, at least the TTL): a per-message TTL never outlives
it.

Leave events for them: every node that has local members watching a room's presence lists the
room's members every half TTL and compares with the previous listing; a member that vanished
without a leave is announced as ``presence:leave`` to the local watchers. No coordination
between nodes is needed, and each watcher hears each leave once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from nats.js.api import StorageType, StreamConfig

from bridge.room_store import JetStreamRoomStore
from node.core.events import event_body
from node.core.ports import LiveFeed, StoreError
from node.protocol.tokens import KINDS, Principal

__all__ = ["BUCKET", "OFFLINE_MAX_S", "PresenceTracker"]

log = logging.getLogger("bridge.presence")

BUCKET = "RTNODE_PRESENCE"
_STREAM = f"KV_{BUCKET}"
_PREFIX = f"$KV.{BUCKET}"
#: The longest an offline member is kept by default (a persistent MQTT session's default expiry).
OFFLINE_MAX_S = 604800.0
# Members read per request when a room has more than a multi_last answers.
_PAGE = 1000
# A member's entry as json.dumps(member, separators=(",", ":")) writes it, one encoder for all.
_JSON = json.JSONEncoder(separators=(",", ":"))


def _ttl(seconds: float) -> str:
    """A ``Nats-TTL`` header value: whole seconds, at least 1 (the server's minimum)."""
    return f"{max(1, math.ceil(seconds))}s"


def _room_token(room: str) -> str:
    return base64.urlsafe_b64encode(room.encode()).decode().rstrip("=")


def _key(tenant: str, room: str, client_id: str) -> str:
    return f"{_PREFIX}.{tenant}.{_room_token(room)}.{client_id}"


class PresenceTracker:
    """Records this node's members and answers who is in a room, cluster-wide.

    Args:
        store: The node's JetStream store (its connection and direct gets).
        ttl_s: How long a member outlives its node.
        replicas: Replicas of the bucket.
        on_vanished: Called with (tenant, room, member) for a member that left without a leave.
        offline_max_s: The longest an offline member may be kept (the bucket's max age; set it
            to the MQTT session expiry).
    """

    def __init__(
        self,
        store: JetStreamRoomStore,
        *,
        ttl_s: float,
        replicas: int = 1,
        on_vanished: Callable[[str, str, dict[str, Any]], None] | None = None,
        offline_max_s: float = OFFLINE_MAX_S,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.offline_max_s = max(ttl_s, offline_max_s)
        self.replicas = replicas
        self.on_vanished = on_vanished
        self._local: dict[str, bytes] = {}  # KV subject -> member JSON
        self._joined: dict[str, Any] = {}  # KV subject -> the local member's joined_at
        self._watched: dict[tuple[str, str], int] = {}  # rooms with local presence watchers
        self._seen: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Create or update the bucket, then start refreshing and watching."""
        cfg = StreamConfig(
            name=_STREAM, subjects=[f"{_PREFIX}.>"], storage=StorageType.MEMORY,
            num_replicas=self.replicas, max_msgs_per_subject=1, max_age=self.offline_max_s,
            allow_direct=True, allow_rollup_hdrs=True, deny_delete=True, allow_msg_ttl=True,
        )
        await self.store.link.ensure_bucket(f"presence bucket {_STREAM}", cfg)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._refresh_loop(), name="presence.refresh"),
            loop.create_task(self._watch_loop(), name="presence.watch"),
        ]

    async def stop(self) -> None:
        """Stop refreshing and remove this node's members at once."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for subject in list(self._local):
            self._delete(subject)
        self._local.clear()

    # -- this node's members -----------------------------------------------------------------

    def compact(self) -> None:
        """Size the tables of local members to what there is now (see ``node/memory.py``)."""
        self._local = dict(self._local)
        self._joined = dict(self._joined)

    def add(self, tenant: str, room: str, member: dict[str, Any]) -> None:
        """Record a member (``client_id``, ``user``, ``kind``, ``node``, ``joined_at``)."""
        subject = _key(tenant, room, member["client_id"])
        value = _JSON.encode(member).encode()
        self._local[subject] = value
        self._joined[subject] = member.get("joined_at")
        self._put(subject, value)

    def remove(self, tenant: str, room: str, client_id: str,
               joined_at: int | None = None) -> None:
        """Forget a member; with ``joined_at``, only if it is the member that joined then (the
        old connection of a takeover must not delete its successor's key)."""
        subject = _key(tenant, room, client_id)
        if joined_at is not None and self._joined.get(subject, joined_at) != joined_at:
            return
        self._joined.pop(subject, None)
        if self._local.pop(subject, None) is not None:
            self._delete(subject)

    def mark_offline(self, tenant: str, room: str, member: dict[str, Any],
                     ttl_s: float) -> asyncio.Task[bool] | None:
        """A local member goes offline but stays listed, with ``online: false``, for ``ttl_s``
        (its persistent session's expiry), refreshed by nobody: this node forgets it. Skipped
        when a successor with the same client id has its own entry, here or (read first) on
        another node: the device reconnected elsewhere before this connection ended. Returns
        the task that writes the entry (None when skipped): the leave is announced after it."""
        subject = _key(tenant, room, member["client_id"])
        joined_at = member.get("joined_at")
        if self._joined.get(subject, joined_at) != joined_at:
            return None
        self._joined.pop(subject, None)
        self._local.pop(subject, None)
        offline = {**member, "online": False, "offline_since": int(time.time() * 1000)}
        value = _JSON.encode(offline).encode()
        return asyncio.get_running_loop().create_task(
            self._put_offline(subject, value, min(ttl_s, self.offline_max_s), joined_at))

    async def _put_offline(self, subject: str, value: bytes, ttl_s: float,
                           joined_at: Any) -> bool:
        try:
            batch = await self.store.direct_get({"multi_last": [subject], "batch": 1}, _STREAM)
        except StoreError:
            batch = None  # written anyway: an offline entry is better than none
        for ev, headers in zip(batch.events, batch.headers, strict=True) if batch else ():
            if headers.get("KV-Operation") or not ev.body:
                break
            with contextlib.suppress(ValueError):
                there = json.loads(ev.body)
                if (isinstance(there, dict) and there.get("online", True) is not False
                        and there.get("joined_at") != joined_at):
                    return False  # a successor's online entry, from another node
        if subject in self._joined:
            return False  # a successor joined here during the read: its entry stands
        self._put(subject, value, ttl_s)
        return True

    async def clear_offline(self, tenant: str, room: str, client_id: str) -> dict[str, Any] | None:
        """Remove an offline member (its session was deleted); returns it, or None when it is
        not offline there (online somewhere, or not listed). The caller tells the watchers.

        Raises:
            StoreError: JetStream did not answer.
        """
        subject = _key(tenant, room, client_id)
        if subject in self._local:
            return None  # online on this node
        batch = await self.store.direct_get({"multi_last": [subject], "batch": 1}, _STREAM)
        for ev, headers in zip(batch.events, batch.headers, strict=True):
            if headers.get("KV-Operation") or not ev.body:
                return None
            try:
                member = json.loads(ev.body)
            except ValueError:
                member = None
            if not isinstance(member, dict) or member.get("online", True) is not False:
                return None
            self._delete(subject)
            return member
        return None

    async def forget_device(self, tenant: str, client_id: str, rooms: list[str],
                            feed: LiveFeed) -> int:
        """A device's persistent session is gone (deleted, or discarded by a
        ``clean_session = 1`` CONNECT): take it out of ``rooms`` where it is offline, with a
        ``presence:leave`` to the watchers of every node (through ``feed``). Returns how many
        entries went; a room whose presence cannot be read is logged and skipped."""
        gone = 0
        for room in rooms:
            try:
                member = await self.clear_offline(tenant, room, client_id)
            except StoreError:
                log.warning("! offline presence of %s in %s not cleared", client_id, room)
                continue
            if member is None:
                continue
            gone += 1
            kind: Any = member.get("kind") if member.get("kind") in KINDS else "device"
            who = Principal(sub=str(member.get("user", client_id)), tenant=tenant, kind=kind)
            body = event_body(room, "presence:leave", member, who, client_id, None)
            with contextlib.suppress(Exception):
                feed.publish_volatile(tenant, room, body, later=True)
        return gone

    def watch(self, tenant: str, room: str, on: bool) -> None:
        """Count local watchers of a room's presence (they get leave events of dead nodes)."""
        key = (tenant, room)
        n = self._watched.get(key, 0) + (1 if on else -1)
        if n > 0:
            self._watched[key] = n
        else:
            self._watched.pop(key, None)
            self._seen.pop(key, None)

    # Written at once into the NATS client's buffer (no task each: one per join and leave).
    def _put(self, subject: str, value: bytes, ttl_s: float | None = None) -> None:
        ttl = _ttl(self.ttl_s if ttl_s is None else ttl_s)
        with contextlib.suppress(Exception):  # refreshed again within a third of the TTL
            self.store.link.publish_now(subject, value, {"Nats-TTL": ttl}, later=True)

    def _delete(self, subject: str) -> None:
        # The marker lives a TTL too (leaves are told apart from vanished members meanwhile).
        headers = {"KV-Operation": "DEL", "Nats-TTL": _ttl(self.ttl_s)}
        with contextlib.suppress(Exception):
            self.store.link.publish_now(subject, b"", headers, later=True)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            for subject, value in list(self._local.items()):
                self._put(subject, value)

    # -- reading ---------------------------------------------------------------------------

    async def members(self, tenant: str, room: str) -> list[dict[str, Any]]:
        """Every member of the room on every node, oldest first; each with ``online`` (false
        for a device whose persistent session keeps it while it is away).

        Raises:
            StoreError: JetStream did not answer.
        """
        return (await self._listing(tenant, room))[0]

    async def _listing(self, tenant: str, room: str) -> tuple[list[dict[str, Any]], set[str]]:
        """The room's members, and the client ids that left normally (their delete markers)."""
        prefix = f"{_PREFIX}.{tenant}.{_room_token(room)}."
        try:
            batch = await self.store.direct_get(
                {"multi_last": [prefix + "*"], "batch": 10000}, _STREAM)
            found = list(zip(batch.events, batch.headers, strict=True))
        except StoreError as exc:
            if "413" not in str(exc):
                raise
            found = await self._scan(prefix + "*")  # more than the server's multi_last limit
        members = []
        deleted: set[str] = set()
        for ev, headers in found:
            if headers.get("KV-Operation") or not ev.body:
                deleted.add(headers.get("Nats-Subject", "")[len(prefix):])
                continue
            try:
                member = json.loads(ev.body)
            except ValueError:
                continue
            if isinstance(member, dict):
                member.setdefault("online", True)
                members.append(member)
        members.sort(key=lambda m: (m.get("joined_at", 0), m.get("client_id", "")))
        return members, deleted

    async def _scan(self, subjects: str) -> list[tuple[Any, dict[str, str]]]:
        """Every message on ``subjects``, page by page (the bucket keeps one per key, so these
        are the keys' values): for a room with more members than a multi_last answers
        (1024), e.g. a fleet of offline devices."""
        found: list[tuple[Any, dict[str, str]]] = []
        seq = 1
        while True:
            batch = await self.store.direct_get(
                {"next_by_subj": subjects, "seq": seq, "batch": _PAGE}, _STREAM)
            found.extend(zip(batch.events, batch.headers, strict=True))
            if not batch.events or not batch.pending:
                return found
            seq = batch.events[-1].seq + 1

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 2)
            for key in list(self._watched):
                try:
                    listed, deleted = await self._listing(*key)
                except StoreError:
                    continue
                now = {m["client_id"]: m for m in listed}
                before = self._seen.get(key)
                if key not in self._watched:
                    continue
                self._seen[key] = now
                if before is None or self.on_vanished is None:
                    continue
                for client_id, member in before.items():
                    # Gone without a delete marker: its key expired, its node is dead. (A
                    # normal leave deletes the key and sends presence:leave itself.)
                    if client_id not in now and client_id not in deleted:
                        self.on_vanished(key[0], key[1], member)
