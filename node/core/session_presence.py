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
"""

from __future__ import annotations

from typing import Any

from node.core.admission import VolatileThrottle
from node.core.session_commands import (
    AnnouncePresence,
    CommandQueue,
    PresenceAdd,
    PresenceRemove,
    PresenceWatch,
    StartTimer,
)
from node.protocol.settings import Settings
from node.protocol.tokens import Principal

__all__ = ["PRESENCE_JOIN", "PRESENCE_LEAVE", "PresenceRules"]

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
    # Rooms whose watchers were last told ``presence:join`` (they see this member there).
    _shown: set[str]
    # The announcements waiting for their room's throttle window, latest wins.
    _announcer: VolatileThrottle[str]

    def _init_presence(self) -> None:
        self._shown = set()
        self._announcer = VolatileThrottle(self.settings.volatile_throttle_ms / 1000)

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
        if announce:
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
        send, flush_in = self._announcer.offer(room, name, now)
        if send is not None:
            self._show(room, send)
        if flush_in is not None:
            self._commands.append(StartTimer(("presence", room), now + flush_in))

    def _flush_presence(self, room: str, now: float) -> None:
        """The throttle window of ``room`` ended: announce the state that waited, if any."""
        name = self._announcer.flush(room, now)
        if name is not None:
            self._show(room, name)

    def _show(self, room: str, name: str) -> None:
        joined = name == PRESENCE_JOIN
        if joined == (room in self._shown):
            return  # the watchers see this state already
        if joined:
            self._shown.add(room)
        else:
            self._shown.discard(room)
        self._commands.append(AnnouncePresence(room, name, self.member_info()))

    def _say_goodbye(self) -> None:
        """The connection ends: every room whose watchers see it gets its leave now (timers
        end with the connection, so nothing waits for a window)."""
        self._announcer = VolatileThrottle(self._announcer.window_s)
        for room in sorted(self._shown):
            self._show(room, PRESENCE_LEAVE)
