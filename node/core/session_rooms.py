"""The room rules of a :class:`~node.core.session.ConnectionSession`: joins with their rights
and limits, leaves, rejoins after a room actor restart, plain subscriptions, and the publishes
held right after a join. Pure, like the session it is part of.

Joining a room the connection is not in takes a token of its user's rooms bucket
(``rooms_per_min``, shared by every connection of the user on this node, so that reconnecting
does not start it afresh; beyond it: 4009 with retry), and no token of the request bucket. A join
that would start a room actor beyond the node's ``max_rooms`` is refused with 4503 with retry,
the connection staying open. Rejoins the node makes by itself (after a room actor restart, the
personal room at connect) are never refused: they start nothing new.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from node.core.admission import Admitted
from node.core.limits import KeyedBuckets
from node.core.session_commands import (
    CancelTimer,
    JoinPlainRoom,
    JoinRoom,
    LeavePlainRoom,
    LeaveRoom,
    StartTimer,
    StorePublish,
)
from node.core.session_presence import PresenceRules
from node.core.unwritten import UNWRITTEN
from node.protocol.errors import ProtocolError
from node.protocol.frames import Join, Leave

__all__ = ["JOIN_WAIT_S", "RoomRules"]

log = logging.getLogger("node.core.session")

#: How long publishes right after a join wait for the room to fix the join's position (a room
#: starts in ~1 ms, a replay reads in a few; one that cannot answers the join with an error).
JOIN_WAIT_S = 5.0


class RoomRules(PresenceRules):
    """Rooms of one connection (a part of ``ConnectionSession``, which sets the state)."""

    connected: bool
    #: Joined rooms -> whether the member asked for presence events.
    rooms: dict[str, bool]
    #: Plain subscriptions (MQTT ``rooms/<room>``), apart from the rooms of the frames.
    plain: dict[str, None]  # a set, as a dict (64 bytes empty, not 216)
    # Users' buckets of room joins (rooms_per_min), shared with the node's other connections.
    _room_buckets: KeyedBuckets
    # (tenant, room) -> whether the node may run that room: it runs already, or there is room
    # for one more room actor (max_rooms).
    _may_open_room: Callable[[str, str], bool]
    # Rooms joined but not yet taken in by their room, and the publishes held for them.
    _joining: dict[str, None]  # a set, as a dict
    _held: dict[str, list[tuple[Admitted, Any]]]

    def _join_room(self, room: str, since_seq: int | None, since_epoch: str | None,
                   request_id: Any, now: float, *, presence: bool, silent: bool,
                   rewind: int | None = None) -> None:
        old = self.rooms.pop(room, None)
        if old is not None:
            self._commands.append(LeaveRoom(room))
            self._presence_off(room, old, now, announce=False)
        if self._joining is UNWRITTEN:
            self._joining = {}
        self._joining[room] = None
        self.rooms[room] = presence
        self._commands.append(JoinRoom(room, since_seq, since_epoch, request_id, presence,
                                       silent, rewind))
        self._presence_on(room, presence, now, announce=old is None)

    def _open_room(self, room: str, now: float) -> None:
        """Count a join of ``room`` (not joined yet), or raise why it cannot be.

        Raises:
            ProtocolError: 4009 beyond ``rooms_per_min``; 4503 when the room would be one room
                actor too many on this node.
        """
        principal = self.principal
        assert principal is not None
        if not self._may_open_room(principal.tenant, room):
            raise ProtocolError(4503, "too many rooms on this node, retry later", retry=True)
        if not self._room_buckets.get((principal.tenant, principal.sub), now).take(now):
            raise ProtocolError(4009, "too many rooms joined, retry later", retry=True)

    def _opens_room(self, frame: Any) -> bool:
        """Whether ``frame`` joins a room the connection is not in: the rooms bucket limits it,
        not the request bucket (a client resuming all its rooms after a reconnect sends them at
        once)."""
        return isinstance(frame, Join) and frame.room not in self.rooms

    def _join(self, frame: Join, now: float) -> None:
        assert self.principal is not None
        if not self.principal.can("join", frame.room):
            raise ProtocolError(4003, "no join right on this room")
        if frame.presence and not self.principal.can("presence", frame.room):
            raise ProtocolError(4003, "no presence right on this room")
        if frame.rewind is not None and frame.since is not None:
            # One position per join: since resumes exactly, rewind starts a view afresh.
            raise ProtocolError(4000, "bad field rewind: not with since (a join resumes from "
                                      "since or rewinds, not both)")
        if frame.room not in self.rooms:
            if len(self.rooms) >= self.settings.max_rooms_per_connection:
                raise ProtocolError(4029, "too many rooms for this connection")
            self._open_room(frame.room, now)
        since = frame.since
        self._join_room(frame.room, since.seq if since else None, since.epoch if since else None,
                        frame.id, now, presence=frame.presence, silent=False,
                        rewind=frame.rewind)

    def _leave(self, frame: Leave, now: float) -> None:
        self._release(frame.room)  # publishes sent before the leave are stored
        presence = self.rooms.pop(frame.room, None)
        if presence is not None:
            self._commands.append(LeaveRoom(frame.room))
            self._presence_off(frame.room, presence, now, announce=True)
        self._reply(frame.id, {"type": "left", "room": frame.room})

    def receive_room_joined(self, room: str) -> None:
        """The room fixed the position of the current join of ``room``: release the publishes
        held for it."""
        self._release(room)

    def receive_room_lost(self, room: str, cursor: int | None, epoch: str, now: float, *,
                          answer: bool = False, request_id: Any = None) -> None:
        """The room actor of a joined room stopped: rejoin from ``cursor`` (the last seq the
        member got; None: live, a first join that had delivered nothing) in ``epoch`` (the
        store's), not counted as a join (the connection was in the room). Silently, unless
        ``answer``: the lost join was not answered yet, and this one answers it
        (``joined`` with ``request_id``)."""
        self._release(room)  # what was held for the lost join goes to the store now
        presence = self.rooms.get(room)
        if presence is not None:
            self._join_room(room, cursor, epoch, request_id if answer else None, now,
                            presence=presence, silent=not answer)

    def receive_join_refused(self, room: str, now: float) -> None:
        """The room refused the current join of ``room`` and told the client to join again
        (4500 with retry): the connection is no longer in the room (nothing is rejoined by
        itself; the client's own join comes as a new one)."""
        self._release(room)  # what was held for the join goes to the store now
        presence = self.rooms.pop(room, None)
        if presence is not None:
            self._presence_off(room, presence, now, announce=True)

    def receive_plain_join(self, room: str, source: Any, now: float) -> None:
        """Join ``room`` for a plain subscriber; ``source`` (the actor's, opaque here) comes
        back in :class:`JoinPlainRoom`. Counted like a join; what a join would be refused is
        logged and skipped (the bridge answered the subscription already). The subscriber is
        in the room's presence (``presence:join`` to its watchers) unless it was already."""
        principal = self.principal
        if principal is None or not self.connected:
            return
        if not principal.can("join", room):
            # The bridge checked it for its SUBACK; rights are checked on every action.
            log.warning("! %s: plain subscription to %s refused", self.client_id, room)
            return
        if room in self.plain:
            return  # a repeated SUBSCRIBE replaces the subscription: the membership goes on
        try:
            self._open_room(room, now)
        except ProtocolError as exc:
            log.warning("! %s: plain subscription to %s refused: %s", self.client_id, room,
                        exc.reason)
            return
        if self.plain is UNWRITTEN:
            self.plain = {}
        self.plain[room] = None
        self._commands.append(JoinPlainRoom(room, None, None, source))
        self._plain_presence_on(room, now)  # a member like any other (kind: its token's)

    def receive_plain_room_lost(self, room: str, since: int | None, epoch: str) -> None:
        """The room of a plain subscription stopped: rejoin from ``since`` (None: live)."""
        if room in self.plain:
            self._commands.append(JoinPlainRoom(room, since, None if since is None else epoch,
                                                None))

    def receive_plain_leave(self, room: str, now: float) -> None:
        """End the plain subscription to ``room`` (nothing if there is none): it leaves the
        room's presence (an UNSUBSCRIBE is a leave, also for a persistent session)."""
        if room in self.plain:
            self.plain.pop(room, None)
            self._commands.append(LeavePlainRoom(room))
            self._plain_presence_off(room, now)

    def _hold(self, admitted: Admitted, request_id: Any, now: float) -> None:
        # Joined a moment ago: store once the room has fixed the join's position, so the event
        # comes after it and reaches this member too. Held in order, released in
        # order (and after JOIN_WAIT_S at the latest).
        if self._held is UNWRITTEN:
            self._held = {}
        held = self._held.setdefault(admitted.room, [])
        if not held:
            self._commands.append(StartTimer(("held", admitted.room), now + JOIN_WAIT_S))
        held.append((admitted, request_id))

    def receive_join_sent(self, room: str, now: float) -> None:
        """The connection told the room the join of ``room`` only now (it waited for its
        turn): the publishes held for it wait JOIN_WAIT_S from now, not from when they came."""
        if self._held.get(room):
            self._commands.append(StartTimer(("held", room), now + JOIN_WAIT_S))

    def _release(self, room: str) -> None:
        self._joining.pop(room, None)
        held = self._held.pop(room, None)
        if held:
            self._commands.append(CancelTimer(("held", room)))
            self._commands.extend(StorePublish(admitted, rid) for admitted, rid in held)
