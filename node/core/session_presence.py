"""The presence rules of a :class:`~node.core.session.ConnectionSession`: presence state (the
presence port) and the ``presence:join`` / ``presence:leave`` events announced to watchers.
Pure, like the session it is part of.

The state is exact: every join and leave of a tracked room adds or removes the member at once,
so ``presence`` requests and ``/api/presence`` always tell the truth. The *events* go through a
per connection and room throttle, latest wins (PROTOCOL.md section 2: volatile events are
throttled per connection): a client joining and leaving a room in a loop costs the room's
watchers one event per ``volatile_throttle_ms`` at most, and the last event they get is the
member's true state. An event that would tell watchers what they already know (a leave after
a join they never saw, a join after a join) is not sent at all.

A plain MQTT subscriber (``rooms/<room>``) is a member like any other (its kind: ``device``,
from its token). A connection is one member of a room however it is in it (joined with a
frame, subscribed on a plain topic, or both): present from the first, gone with the last. A
connection told :meth:`PresenceRules.keep_offline` (a persistent MQTT session) leaves its plain
rooms *offline* when it ends: its entry stays with ``online: false`` for the given time (the
session's expiry) and the watchers' ``presence:leave`` carries ``online: false``
(docs/protocol-notes.md, "Devices in presence").
"""

from __future__ import annotations

from typing import Any

from node.core.admission import VolatileThrottle
from node.core.session_commands import (
    AnnouncePresence,
    CommandQueue,
    PresenceAdd,
    PresenceOffline,
    PresenceRemove,
    PresenceWatch,
    StartTimer,
)
from node.core.unwritten import UNWRITTEN
from node.protocol.settings import Settings
from node.protocol.tokens import Principal

__all__ = ["PRESENCE_JOIN", "PRESENCE_LEAVE", "PresenceOffline", "PresenceRules"]

PRESENCE_JOIN = "presence:join"
PRESENCE_LEAVE = "presence:leave"


class PresenceRules(CommandQueue):
    """Presence of one connection (a part of ``ConnectionSession``, which sets the state).

    Call :meth:`_init_presence` from the session's constructor.
    """

    settings: Settings
    principal: Principal | None
    client_id: str
    node_name: str
    _presence: bool
    _joined_at: int
    rooms: dict[str, bool]
    plain: dict[str, None]
    # Rooms whose watchers were last told ``presence:join`` (they see this member there).
    _shown: dict[str, None]  # a set, as a dict
    # The announcements waiting for their room's throttle window, latest wins.
    _announcer: VolatileThrottle[str] | None

    def _init_presence(self) -> None:
        self._shown = UNWRITTEN
        self._announcer = None  # made at the first announcement (most connections make none)
        self._offline_ttl_s: float | None = None

    def keep_offline(self, ttl_s: float | None) -> None:
        """When the connection ends, keep it in the presence of its plain rooms as offline for
        ``ttl_s`` seconds (a persistent MQTT session: until it expires); None: it is gone."""
        self._offline_ttl_s = ttl_s if ttl_s is None or ttl_s > 0 else None

    def _tracked(self, room: str) -> bool:
        return (self._presence and not room.startswith("@")
                and self.settings.room_policy(room).presence)

    def member_info(self) -> dict[str, Any]:
        """This connection as a presence member."""
        assert self.principal is not None
        return {"client_id": self.client_id, "user": self.principal.sub,
                "kind": self.principal.kind, "node": self.node_name,
                "joined_at": self._joined_at}

    def _presence_on(self, room: str, presence: bool, now: float, *, announce: bool) -> None:
        if not self._tracked(room):
            return
        if presence:
            self._commands.append(PresenceWatch(room, True))
        if announce:
            self._commands.append(PresenceAdd(room, self.member_info()))
            self._announce(room, PRESENCE_JOIN, now)

    def _presence_off(self, room: str, presence: bool, now: float, *, announce: bool) -> None:
        if not self._tracked(room):
            return
        if presence:
            self._commands.append(PresenceWatch(room, False))
        if announce and room not in self.plain:  # else still a member, by its subscription
            self._commands.append(PresenceRemove(room))
            self._announce(room, PRESENCE_LEAVE, now)

    def _plain_presence_on(self, room: str, now: float) -> None:
        """A plain subscription to ``room`` began (the connection is a member unless it joined
        the room with a frame already)."""
        if self._tracked(room) and room not in self.rooms:
            self._commands.append(PresenceAdd(room, self.member_info()))
            self._announce(room, PRESENCE_JOIN, now)

    def _plain_presence_off(self, room: str, now: float) -> None:
        """The plain subscription to ``room`` ended (unsubscribed): the connection leaves the
        room's presence unless it is in the room by a frame join too."""
        if self._tracked(room) and room not in self.rooms:
            self._commands.append(PresenceRemove(room))
            self._announce(room, PRESENCE_LEAVE, now)

    def _presence_end(self, room: str, presence: bool) -> None:
        """The connection ends: its presence state goes now; :meth:`_say_goodbye` tells the
        watchers."""
        if not self._tracked(room):
            return
        if presence:
            self._commands.append(PresenceWatch(room, False))
        self._commands.append(PresenceRemove(room))

    def _announce(self, room: str, name: str, now: float) -> None:
        announcer = self._announcer
        if announcer is None:
            announcer = self._announcer = VolatileThrottle(
                self.settings.volatile_throttle_ms / 1000)
        send, flush_in = announcer.offer(room, name, now)
        if send is not None:
            self._show(room, send)
        if flush_in is not None:
            self._commands.append(StartTimer(("presence", room), now + flush_in))

    def _flush_presence(self, room: str, now: float) -> None:
        """The throttle window of ``room`` ended: announce the state that waited, if any."""
        name = self._announcer.flush(room, now) if self._announcer is not None else None
        if name is not None:
            self._show(room, name)

    def _show(self, room: str, name: str, *, offline: bool = False) -> None:
        joined = name == PRESENCE_JOIN
        if joined == (room in self._shown):
            return  # the watchers see this state already
        if joined:
            if self._shown is UNWRITTEN:
                self._shown = {}
            self._shown[room] = None
        else:
            self._shown.pop(room, None)
        member = self.member_info()
        if offline:
            member["online"] = False
        self._commands.append(AnnouncePresence(room, name, member))

    def _say_goodbye(self) -> None:
        """The connection ends: its plain rooms' presence goes (or turns offline, see
        :meth:`keep_offline`), and every room whose watchers see it gets its leave now (timers
        end with the connection, so nothing waits for a window). Called after the frame rooms'
        :meth:`_presence_end`, with ``plain`` still set."""
        self._announcer = None  # what waits is dropped
        ttl_s = self._offline_ttl_s
        offline = {room for room in self.plain if self._tracked(room)} if ttl_s else set()
        for room in sorted(self.plain):
            if room in offline:
                assert ttl_s is not None
                member = self.member_info()
                member["online"] = False
                # Defined here, not in session_commands (whose Command union does not list
                # it); the actor executes it like the other presence commands.
                self._commands.append(PresenceOffline(room, member, ttl_s))
            elif self._tracked(room) and room not in self.rooms:
                self._commands.append(PresenceRemove(room))
        for room in sorted(self._shown):
            self._show(room, PRESENCE_LEAVE, offline=room in offline)
