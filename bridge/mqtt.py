"""The embedded MQTT 3.1.1 listener for devices (PROTOCOL.md section 6).

A lean listener, not a broker: devices never reach each other through it. Every uplink goes
through a room (it gets a seq and is stored), and every downlink comes from one. Packets are
parsed by the sans-I/O ``bridge.mqtt_codec``; each device session is a ``ConnectionActor`` with
an MQTT transport, so rights, limits, rooms, recovery, presence and rpc are the same code as for
browsers.

Two faces, usable together:

* the tunnel: protocol frames (CBOR) on ``rtnode/v1/<client_id>/in`` and ``/out``;
* plain topics: ``rooms/<room>/up`` (a CBOR map or a JSON object {event, data, msg_id?},
  stored like a publish)
  and ``rooms/<room>`` (a subscription is a join of the device's own connection actor, with
  its own outbox: it recovers from its cursor when the room actor is rebuilt, like any
  membership; each event arrives as a CBOR map, at QoS 0 or, for a QoS 1 subscription, as a
  QoS 1 PUBLISH under an in-flight window; a state room's current values come first, retained).

With ``clean_session = 0`` a device's session (subscriptions, a cursor per QoS 1 room) is kept
in JetStream KV (``bridge.mqtt_sessions``) and resumed on any node (``bridge.mqtt_session``).

A QoS 1 (or 2) uplink on a plain topic is acknowledged once it is stored in JetStream, in the
order received: a device that got its PUBACK knows the event is durable. A refused uplink is
PUBACKed too (MQTT 3.1.1 has no negative ack), and shows instead: counted by reason, logged at
info and told to the device in an ``error`` notice on its ``out`` topic, at most once per device
and reason per 10 s (``bridge.mqtt_uplinks``).

Each device socket is a :class:`bridge.mqtt_session.MqttSession` (flow control, closing);
this module serves the port, decides who may connect (:meth:`MqttBridge.check_connect`) and
keeps one session per device and tenant (:meth:`MqttBridge.register`: a reconnect takes the
older connection over, MQTT 3.1.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from actors.errors import ActorError
from bridge import mqtt_codec as mq
from bridge.mqtt_session import PLAIN_CBOR, MqttSession
from bridge.mqtt_uplinks import RefusalLog
from node.core.connection import NodeContext, TransportClosed
from node.protocol.errors import AuthError, ProtocolError
from node.protocol.ids import ID_RULE, is_valid_id
from node.protocol.tokens import Principal

__all__ = ["PLAIN_CBOR", "MqttBridge"]

log = logging.getLogger("bridge.mqtt")


class MqttBridge:
    """Serves the MQTT port of one node.

    Args:
        ctx: The node's shared context.
        host: Bind address.
        port: Port (0 picks a free one).
        ssl_context: Serve MQTT over TLS when given.
    """

    def __init__(self, ctx: NodeContext, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        self.ctx = ctx
        self.reuse_port = reuse_port  # SO_REUSEPORT: shared by the workers of one rtnode
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.sessions: dict[tuple[str, str], MqttSession] = {}
        self.refused_publishes = 0
        self.refused_subscribes = 0
        self.bad_payloads = 0
        self.uplinks = 0
        #: Refused uplinks by reason, and which to report (log line, notice): every session's.
        self.refusals = RefusalLog()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and start accepting devices."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: MqttSession(self), self.host, self.port, ssl=self.ssl_context,
            reuse_address=True, reuse_port=self.reuse_port or None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("= MQTT listening on %s:%s", self.host, self.port)

    def check_connect(self, packet: Any) -> Principal:
        """The device a CONNECT is for, if it may connect now.

        Raises:
            ConnectRefused: With the CONNACK code: 2 (identifier rejected) for a client id
                outside the id grammar (``node.protocol.ids``: it names MQTT topics and NATS
                subjects); 5 (not authorized) for a bad token, one not of this device, or a
                device at ``max_connections_per_user``; 3 (server unavailable) while the node
                drains or when it has ``max_connections`` (a takeover adds none).
        """
        if not is_valid_id(packet.client_id):
            raise mq.ConnectRefused(2, f"client id must be {ID_RULE}")
        tokens, where = self.ctx.tokens, f"mqtt {packet.client_id}"
        try:
            if packet.username != packet.client_id:
                tokens.refused("wrong_user", "the MQTT user name must be the client id (the "
                               "device id)", where)
                raise AuthError("client id and username must be the device id")
            try:
                token = (packet.password or b"").decode("utf-8", errors="strict")
            except UnicodeDecodeError:
                tokens.refused("malformed", "malformed: the MQTT password is not UTF-8", where)
                raise AuthError("not a token") from None
            principal = tokens.verify(token, where=where)
            if principal.kind != "device":
                tokens.refused("wrong_kind", f"wrong kind: a {principal.kind} token "
                               f"(sub {principal.sub}); MQTT needs a device token "
                               "('rtnode token --kind device')", where)
                raise AuthError("not a device token for this id")
            if principal.sub != packet.client_id:
                tokens.refused("wrong_sub", f"the token is for device {principal.sub}, not "
                               f"this client id", where)
                raise AuthError("not a device token for this id")
        except AuthError:
            raise mq.ConnectRefused(5, "not authorized") from None
        if self.ctx.draining:
            raise mq.ConnectRefused(3, "draining")
        if (principal.tenant, packet.client_id) not in self.sessions:
            settings = self.ctx.settings
            try:
                self.ctx.index.check_room(principal, per_user=settings.max_connections_per_user,
                                          total=settings.max_connections)
            except ProtocolError as exc:
                raise mq.ConnectRefused(3 if exc.retry else 5, exc.reason) from None
        return principal

    def register(self, session: MqttSession) -> None:
        """Make ``session`` its device's connection (in its tenant). An older one is taken
        over: closed, out of the connection index at once (only the new one is counted,
        revoked by ``/api/disconnect``, drained), and its actor stopped."""
        assert session.principal is not None
        tenant = session.principal.tenant
        old = self.sessions.get((tenant, session.client_id))
        self.sessions[(tenant, session.client_id)] = session
        if old is None or old is session:
            return
        old.close("taken over by a new connection")
        if old.ref is None:
            return
        for conn in self.ctx.index.select(tenant, client_id=old.client_id):
            if conn.ref is old.ref:
                self.ctx.index.remove(conn)
        with contextlib.suppress(ActorError):
            old.ref.tell(TransportClosed())

    @property
    def listening(self) -> bool:
        """Whether the listener accepts connections."""
        return self._server is not None and self._server.is_serving()

    async def stop(self) -> None:
        """Stop accepting and close every device session."""
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions.values()):
            session.close("node stopping", drain=False)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
