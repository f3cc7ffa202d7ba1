"""``ConnectionSession``: the node's side of one client connection, without I/O.

The session holds the protocol rules of PROTOCOL.md sections 1, 4 and 5 for one connection:
``connect`` first, token verification, refresh and expiry, rights on every action, the error
tolerance, the request and room limits, held publishes right after a join, rpc bookkeeping,
and the volatile and presence throttles. It never awaits, never reads a clock and never
touches a socket, a room or NATS: it takes frames, results and the time, and returns
:data:`Command` values that :class:`~node.core.connection.ConnectionActor` executes, in
order::

    session = ConnectionSession(settings, node_name="n1", client_id="c1",
                                verify=tokens.verify, admit=admission.admit)
    session.start(now)                      # StartTimer(connect) or AdmitConnection
    session.receive_frame(frame, now)       # one validated client frame
    for command in session.commands_to_send():
        ...                                 # SendFrame, Close, JoinRoom, StorePublish...

Results of the work a command started come back through ``receive_*`` methods
(``receive_admitted``, ``receive_stored``, ``receive_history``, ``receive_rpc_result``,
``receive_timer``, ``receive_room_joined``, ``receive_room_lost``...); each may queue commands
of its own. Timers are named by a :data:`TimerKey` and carry a deadline on the clock ``now``
comes from; starting a key again replaces its timer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from node.core.admission import Admitted, VolatileThrottle
from node.core.limits import ErrorWindow, KeyedBuckets, LimitCarry, TokenBucket
from node.core.session_commands import (
    AdmitConnection,
    CancelTimer,
    Close,
    LeavePlainRoom,
    LeaveRoom,
    ReadHistory,
    ReadPresence,
    RegisterRpc,
    RespondRpc,
    SendVolatile,
    StartTimer,
    Stop,
    StorePublish,
    TimerKey,
    UnregisterRpc,
)
from node.core.session_rooms import JOIN_WAIT_S, RoomRules
from node.core.session_rpc import RpcRules
from node.core.unwritten import UNWRITTEN
from node.protocol.errors import AuthError, ProtocolError
from node.protocol.frames import (
    Ack,
    Connect,
    History,
    Join,
    Leave,
    Ping,
    Presence,
    Publish,
    Refresh,
    Reply,
    Rpc,
    error_frame,
)
from node.protocol.settings import Settings
from node.protocol.tokens import KINDS, Principal
from node.protocol.values import INT_MAX

__all__ = ["JOIN_WAIT_S", "ConnectionSession"]

_CONNECT: TimerKey = ("connect", "")
_EXPIRY: TimerKey = ("expiry", "")

Admit = Callable[..., Admitted]

# Requests that cost the node work (a room, a read, NATS, a token check) take a token of the
# request bucket (request_rate_per_s, request_burst). Publishes have their own bucket. Not
# limited: ``ack`` and ``reply`` answer what the node sent (events, rpcs), so they follow its
# pace, cost one lookup and no reply, and provoke an error (counted by the error tolerance)
# when they name nothing; ``ping`` costs one small reply and nothing else, and a ping flood is
# held back like any other frame (the socket is not read while the actor is behind, and a
# client that does not read its pongs is cut off as a slow consumer, 4008).
_REQUESTS = frozenset({Join, Leave, History, Presence, Rpc, Refresh})

# Errors that are the node's or the network's fault: they never count toward the tolerance.
_NOT_THE_CLIENTS_FAULT = frozenset({4500, 4503, 4504})


class Verify(Protocol):
    """What a session checks tokens with: ``TokenVerifier.verify``."""

    def __call__(self, token: object, *, where: str = "") -> Principal: ...


def _seconds_left(left: float | None) -> int | None:
    """A token's ``expires_in_s``: whole seconds, at most the value model's largest integer (an
    ``exp`` of 1e25 is a valid time, but no frame may hold an integer past 64 bits: CBOR would
    need a bignum tag, which every rtnode reader refuses)."""
    return None if left is None else min(int(left), INT_MAX)


def _any_room(tenant: str, room: str) -> bool:
    return True


class ConnectionSession(RoomRules, RpcRules):
    """The protocol state of one connection (see the module docstring for how to drive it).

    Args:
        settings: The node's settings (limits, timeouts, room policies).
        node_name: This node's name, for ``connected`` and presence.
        client_id: The connection's id.
        verify: Checks a token and returns its principal (raises ``AuthError``);
            ``TokenVerifier.verify``, told ``where`` for the log line of a refusal.
        admit: The admission pipeline (``Admission.admit``): rights, rate, size, value model.
        principal: Already authenticated by the transport (MQTT, SSE), or None: a ``connect``
            frame must come first.
        door: The door publishes are counted under (``ws`` or ``tunnel``).
        now: The time the transport opened (seconds on the clock of every later ``now``).
        joined_at_ms: Wall-clock ms of the opening, for presence.
        presence: Whether the node tracks presence (a presence port exists).
        rpc: Whether the node relays rpcs between clients (an rpc port exists).
        may_open_room: Whether a join of (tenant, room) may start that room on this node (it
            runs already, or the node is below ``max_rooms``); default: always.
        room_buckets: The node's per-user buckets of room joins (``rooms_per_min``), shared
            by every connection; default: a map of this connection's own.
        carry: What the user's ended connections left (their emptiest buckets, their recent
            errors): taken on at connect, and this connection's left there when it ends, so
            reconnecting starts no fresh allowance; default: nothing carries over.
    """

    __slots__ = (
        "_admit", "_announced", "_announcer", "_carry", "_door", "_held", "_joined_at",
        "_joining", "_may_open_room", "_offline_ttl_s", "_pending_accept", "_presence",
        "_room_buckets", "_rpc", "_rpc_in", "_rpc_out", "_rpc_serial", "_shown", "_throttle",
        "_verify", "bucket", "client_id", "closing", "connected", "errors", "node_name",
        "plain", "preauthenticated", "principal", "requests", "rooms", "settings",
    )

    def __init__(
        self, settings: Settings, *, node_name: str, client_id: str,
        verify: Verify, admit: Admit, principal: Principal | None = None,
        door: str = "ws", now: float = 0.0, joined_at_ms: int = 0, presence: bool = False,
        rpc: bool = False, may_open_room: Callable[[str, str], bool] = _any_room,
        room_buckets: KeyedBuckets | None = None, carry: LimitCarry | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.node_name = node_name
        self.client_id = client_id
        self.principal = principal
        self.preauthenticated = principal is not None
        self.connected = False
        self.closing = False
        #: Joined rooms -> whether the member asked for presence events.
        self.rooms = {}
        # Sets kept as dicts (keys only): an empty dict is 64 bytes, an empty set 216. Maps
        # most connections never write start as the shared UNWRITTEN (node/core/unwritten.py).
        self.plain = UNWRITTEN
        # The publish bucket and the volatile throttles are made at their first use (a bucket
        # made then is as full as one made now); most connections of a crowd never publish.
        self.bucket: TokenBucket | None = None
        self.requests = TokenBucket(settings.request_rate_per_s, settings.request_burst, now)
        self.errors = ErrorWindow(settings.max_errors_per_min)
        if room_buckets is None:
            room_buckets = KeyedBuckets(settings.rooms_per_min / 60.0, settings.rooms_per_min)
        self._room_buckets = room_buckets
        self._carry = LimitCarry() if carry is None else carry
        self._may_open_room = may_open_room
        self._verify = verify
        self._admit = admit
        self._door = door
        self._joined_at = joined_at_ms
        self._presence = presence
        self._rpc = rpc
        self._announced = False
        self._pending_accept: tuple[Principal, Any, bool] | None = None
        self._joining = UNWRITTEN
        self._held = UNWRITTEN
        self._throttle: VolatileThrottle[Admitted] | None = None
        self._init_presence()
        self._rpc_serial = 0
        self._rpc_in = UNWRITTEN
        self._rpc_out = UNWRITTEN

    # -- output ----------------------------------------------------------------------------

    def _disconnect(self, code: int, reason: str, reconnect: bool) -> None:
        if self.closing and code != 4008:
            return
        self.closing = True
        self._commands.append(Close(code, reason, reconnect))

    def _error(self, code: int, reason: str, request_id: Any, retry: bool, now: float) -> None:
        if code == 4001 or (code == 4010 and not self.connected):
            self._disconnect(code, reason, code == 4010)
            return
        self._send(error_frame(code, reason, id=request_id, retry=retry))
        # PROTOCOL.md section 5 ends the connection beyond the tolerance for 4000 and 4009; any
        # error the client's own frames provoke counts (4003, 4004, 4013, 4029...), else one
        # could be provoked without end. Beyond it: 4000 for a malformed last frame (do not
        # reconnect with the same bug), 4009 with reconnect for everything else.
        if code not in _NOT_THE_CLIENTS_FAULT and self.errors.add(now):
            self._disconnect(code if code == 4000 else 4009, "too many errors", code != 4000)

    # -- life ------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The transport is open: admit a pre-authenticated principal, or wait for ``connect``."""
        if self.principal is not None:
            self._accept(self.principal, None, announce=False)
        else:
            self._commands.append(StartTimer(_CONNECT, now + self.settings.connect_timeout_s))

    def receive_admitted(self, now: float, refused: int = 0, reason: str = "") -> None:
        """The node's answer to :class:`AdmitConnection`.

        Args:
            now: The time.
            refused: 0 when admitted; 4503 when the node drains or is full; 4009 when the user
                opened too many connections lately; 4029 when the user has too many connections.
            reason: Why it was refused, for the client (a default per code when empty).
        """
        pending, self._pending_accept = self._pending_accept, None
        if pending is None:
            return
        principal, request_id, announce = pending
        if refused in (4503, 4009):  # draining or full; connecting too often: retry later
            default = "node draining" if refused == 4503 else "too many connections opened"
            self._disconnect(refused, reason or default, True)
            return
        if refused:
            self._disconnect(4029, reason or "too many connections for this user", False)
            return
        self.principal = principal
        self.connected = True
        self._take_on_limits(now)
        if self._rpc:  # executed before ``connected``: once it is sent, rpcs find the client
            self._commands.append(RegisterRpc(principal.tenant, self.rpc_targets()))
        self._commands.append(CancelTimer(_CONNECT))
        self._schedule_expiry(now)
        personal = principal.personal_room
        if personal is not None:
            self._join_room(personal, None, None, None, now, presence=False, silent=True)
        if announce:
            self._announced = True
            self._send_connected(request_id)

    def receive_transport_closed(self) -> None:
        """The peer went away: stop, without a ``disconnect``."""
        self.closing = True
        self._commands.append(Stop())

    def receive_shutdown(self, code: int, reason: str, reconnect: bool) -> None:
        """The node ends the connection (drain, API disconnect, slow consumer)."""
        self._disconnect(code, reason, reconnect)

    def receive_overflow(self) -> None:
        """The actor's mailbox overflowed with its own messages: cut the connection off."""
        self._disconnect(4009, "too many frames", True)

    def _take_on_limits(self, now: float) -> None:
        assert self.principal is not None
        left = self._carry.restore((self.principal.tenant, self.principal.sub), now)
        if left is not None:
            buckets, errors = left
            self.bucket = buckets.get("publish", self.bucket)
            self.requests = buckets.get("requests", self.requests)
            self.errors = errors

    def stop(self) -> None:
        """The connection ends: leave every room, say goodbye to presence, fail pending rpcs."""
        if self.connected and self.principal is not None:
            buckets = {"requests": self.requests}
            if self.bucket is not None:
                buckets["publish"] = self.bucket
            self._carry.keep((self.principal.tenant, self.principal.sub), buckets, self.errors)
        self._throttle = None  # what waits is dropped
        for room, presence in self.rooms.items():
            self._commands.append(LeaveRoom(room))
            if self.connected:
                self._presence_end(room, presence)
        self.rooms.clear()
        if self.connected:
            self._say_goodbye()
        for room in sorted(self.plain):
            self._commands.append(LeavePlainRoom(room))
        self.plain.clear()
        if self.principal is not None and self.connected and self._rpc:
            self._commands.append(UnregisterRpc(self.principal.tenant, self.rpc_targets()))
            gone = {"error": {"code": 4004, "reason": "rpc target went away", "retry": True}}
            for reply_to in self._rpc_in.values():
                self._commands.append(RespondRpc(reply_to, gone))
            self._rpc_in.clear()

    # -- frames ----------------------------------------------------------------------------

    def receive_frame(self, frame: Any, now: float) -> None:
        """Feed one validated client frame (``node.protocol.frames.parse_frame``)."""
        if self.closing:
            return  # said goodbye: nothing more is answered
        try:
            if type(frame) is Connect:
                self._connect(frame)
            elif not self.connected:
                # PROTOCOL.md section 1: anything but a connect first ends the connection.
                self._disconnect(4001, "connect must be the first frame", False)
            else:
                self._limit(frame, now)
                handler = _HANDLERS.get(type(frame))
                if handler is not None:
                    handler(self, frame, now)
        except ProtocolError as exc:
            self._error(exc.code, exc.reason, getattr(frame, "id", None), exc.retry, now)

    def _limit(self, frame: Any, now: float) -> None:
        """Take a token of the request bucket for a request (see ``_REQUESTS``).

        Raises:
            ProtocolError: 4009 with retry when the bucket is empty.
        """
        if (type(frame) in _REQUESTS and not self._opens_room(frame)
                and not self.requests.take(now)):
            raise ProtocolError(4009, "too many requests, retry later", retry=True)

    def receive_invalid(self, code: int, reason: str, request_id: Any = None,
                        retry: bool = False, now: float = 0.0, *, reply: bool = False) -> None:
        """A frame the bridge could not decode or validate (unknown type, bad field, too big).
        An invalid ``reply`` to an rpc this client was sent fails that rpc for its caller."""
        if self.closing:
            return
        if not self.connected:
            self._disconnect(code, reason, False)  # malformed first frames end it too
        else:
            if reply and request_id is not None:
                self._rpc_reply_invalid(str(request_id))
            self._error(code, reason, request_id, retry, now)

    def _connect(self, frame: Connect) -> None:
        if self.connected and self.preauthenticated and not self._announced:
            # MQTT: the transport authenticated; an explicit connect gets its answer.
            self._announced = True
            self._send_connected(frame.id)
            return
        if self.connected or self._pending_accept is not None:
            raise ProtocolError(4000, "already connected")
        where = f"{self._door} {self.client_id}"
        self._accept(self._verify(frame.token, where=where), frame.id, announce=True)

    def _accept(self, principal: Principal, request_id: Any, *, announce: bool) -> None:
        if principal.kind not in KINDS:
            raise AuthError("invalid kind")
        self._pending_accept = (principal, request_id, announce)
        self._commands.append(AdmitConnection(principal))

    def _send_connected(self, request_id: Any) -> None:
        # Answered even without an id: the handshake is what a connect is for.
        principal = self.principal
        assert principal is not None
        expires = principal.expires_in()
        heartbeat = self.settings.heartbeat_s
        connected: dict[str, Any] = {
            "type": "connected", "client_id": self.client_id, "node": self.node_name,
            "heartbeat_s": int(heartbeat) if float(heartbeat).is_integer() else heartbeat,
            "expires_in_s": _seconds_left(expires),
            "rooms": [principal.personal_room] if principal.personal_room else [],
        }
        if request_id is not None:
            connected["id"] = request_id
        self._send(connected)

    def _schedule_expiry(self, now: float) -> None:
        assert self.principal is not None
        left = self.principal.expires_in()
        if left is None:
            self._commands.append(CancelTimer(_EXPIRY))
        else:
            self._commands.append(StartTimer(_EXPIRY, now + max(0.0, left)))

    def _refresh(self, frame: Refresh, now: float) -> None:
        assert self.principal is not None
        try:
            principal = self._verify(frame.token, where=f"{self._door} {self.client_id} refresh")
        except AuthError as exc:
            if exc.expired:  # the connection goes on until its current token expires
                raise ProtocolError(4010, "token expired", retry=True) from None
            raise
        old = self.principal
        if (principal.sub, principal.tenant, principal.kind) != (old.sub, old.tenant, old.kind):
            raise ProtocolError(4003, "refresh token is for another principal")
        self.principal = principal
        self._schedule_expiry(now)
        left = principal.expires_in()
        self._reply(frame.id, {"type": "refreshed",
                               "expires_in_s": _seconds_left(left)})

    def _ping(self, frame: Ping, now: float) -> None:
        self._reply(frame.id, {"type": "pong"})

    def _ack(self, frame: Ack, now: float) -> None:
        if frame.room not in self.rooms:
            raise ProtocolError(4004, "not joined to this room")

    # -- timers ----------------------------------------------------------------------------

    def receive_timer(self, key: TimerKey, now: float) -> None:
        """A timer started with :class:`StartTimer` reached its deadline."""
        if self.closing:
            return
        kind, name = key
        if kind == "connect":
            if not self.connected:
                self._disconnect(4001, "no connect frame in time", False)
        elif kind == "expiry":
            self._disconnect(4010, "token expired", True)
        elif kind == "held":
            self._release(name)
        elif kind == "presence":
            self._flush_presence(name, now)
        elif kind == "volatile":
            admitted = self._throttle.flush(name, now) if self._throttle is not None else None
            if admitted is not None:
                self._commands.append(SendVolatile(admitted))
        elif kind == "rpc-in":
            self._rpc_in.pop(name, None)  # the caller has had its timeout
        elif kind == "rpc-out":
            self.receive_rpc_failed(name, 4504, "rpc timed out")

    # -- publish, history, presence -----------------------------------------------------------

    def _publish(self, frame: Publish, now: float) -> None:
        bucket = self.bucket
        if bucket is None:
            bucket = self.bucket = TokenBucket(self.settings.rate_per_s, self.settings.rate_burst,
                                               now)
        admitted = self._admit(self._door, self.principal, frame, client_id=self.client_id,
                               bucket=bucket)
        if admitted.volatile:
            # Throttled per room: the latest of a burst wins, sent when its window ends.
            room = admitted.room
            throttle = self._throttle
            if throttle is None:
                throttle = self._throttle = VolatileThrottle(
                    self.settings.volatile_throttle_ms / 1000)
            send, flush_in = throttle.offer(room, admitted, now)
            if send is not None:
                self._commands.append(SendVolatile(send))
            if flush_in is not None:
                self._commands.append(StartTimer(("volatile", room), now + flush_in))
            self._reply(frame.id, {"type": "published", "room": room})
        elif admitted.room in self._joining:
            self._hold(admitted, frame.id, now)
        else:
            self._commands.append(StorePublish(admitted, frame.id))

    def receive_stored(self, request_id: Any, room: str, seq: int) -> None:
        """The store acknowledged a :class:`StorePublish`."""
        self._reply(request_id, {"type": "published", "room": room, "seq": seq})

    def receive_failed(self, request_id: Any, code: int, reason: str, retry: bool = False,
                       now: float = 0.0) -> None:
        """A store, history or presence read failed (4503, 4500...)."""
        self._error(code, reason, request_id, retry, now)

    def _history(self, frame: History, now: float) -> None:
        assert self.principal is not None
        if not self.principal.can("history", frame.room):
            raise ProtocolError(4003, "no history right on this room")
        self._commands.append(ReadHistory(
            frame.id, self.principal.tenant, frame.room,
            frame.since.seq if frame.since else None, frame.limit, frame.reverse))

    def receive_history(self, request_id: Any, room: str, events: list[Any],
                        latest: int, more: bool = False) -> None:
        """The answer to :class:`ReadHistory` (``more``: the page was cut to fit the outbox)."""
        reply: dict[str, Any] = {"type": "history", "room": room, "events": events,
                                 "seq": latest}
        if more:
            reply["more"] = True
        self._reply(request_id, reply)

    def _presence_request(self, frame: Presence, now: float) -> None:
        assert self.principal is not None
        if not self.principal.can("presence", frame.room):
            raise ProtocolError(4003, "no presence right on this room")
        if not self._tracked(frame.room):
            raise ProtocolError(4004, "presence is off for this room")
        self._commands.append(ReadPresence(frame.id, self.principal.tenant, frame.room))

    def receive_presence(self, request_id: Any, room: str,
                         members: list[dict[str, Any]]) -> None:
        """The answer to :class:`ReadPresence`."""
        unique = len({(m.get("user"), m.get("kind")) for m in members})
        self._reply(request_id, {"type": "presence", "room": room, "members": members,
                                 "unique_users": unique})


# Per class, not per session: a per-instance dict of bound methods would be a reference cycle
# (session -> dict -> method -> session), freed only by a full garbage collection.
_HANDLERS: dict[type, Callable[[ConnectionSession, Any, float], None]] = {
    Publish: ConnectionSession._publish, Join: ConnectionSession._join,
    Leave: ConnectionSession._leave, History: ConnectionSession._history,
    Ping: ConnectionSession._ping, Ack: ConnectionSession._ack,
    Refresh: ConnectionSession._refresh, Presence: ConnectionSession._presence_request,
    Rpc: ConnectionSession._rpc_call, Reply: ConnectionSession._rpc_reply,
}
