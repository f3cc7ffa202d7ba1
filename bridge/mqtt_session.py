"""One device's MQTT connection to the embedded listener: parse, authorise, route, ack.

:class:`MqttSession` is the ``asyncio.Protocol`` of one device socket (see ``bridge.mqtt``
for the two faces, tunnel and plain topics). Its device is a ``ConnectionActor`` whose
transports write PUBLISHes on the device's topics; plain uplinks are admitted here and
PUBACKed once stored, in the order received. A refused uplink is PUBACKed too, counted by
reason, and reported (a log line at info, an ``error`` notice on the device's ``out`` topic) at
most once per device and reason per 10 s (``bridge.mqtt_uplinks``).

Input is flow-controlled like a WebSocket's: packets are handled in order while the device's
actor has fewer than ``inbound_high`` messages queued; then the socket is paused, and the rest
waits until the actor is down to ``inbound_low``. Closing writes what is due, then half-closes
(FIN) and reads and discards the device's input until it closes too (at most
``_CLOSE_DRAIN_S``): closing a socket with unread input resets it, and the device's TCP stack
would drop our last frames (a ``disconnect`` on the tunnel).

QoS 1 subscriptions to ``rooms/<room>`` go through the session's window
(``bridge.mqtt_qos``): a room delivers to a :class:`_QosTransport` (events encoded with their
seq in front, once per room), which hands each event to the window; PUBACKs move the rooms'
cursors. With ``clean_session = 0`` the session is a record in ``bridge.mqtt_sessions``: claimed
at CONNECT (before the CONNACK; the packets that follow wait, as they do behind a QoS 1
SUBSCRIBE, which reads the room's latest seq first), written as cursors move (one write in
flight, the latest state next) and when the connection closes. A resumed QoS 1 room is read
from the stream after its cursor, page by page under the window, then joined live from the last
event sent (docs/protocol-notes.md, "Persistent MQTT sessions").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from actors.errors import ActorDeadError, ActorError
from bridge import mqtt_codec as mq
from bridge.mqtt_qos import Outgoing, QosWindow
from bridge.mqtt_sessions import SessionRecord, SessionsFull, SessionTaken, Takeover
from bridge.mqtt_uplinks import (
    UplinkDecodeError,
    check_will,
    label_of,
    payload_preview,
    refusal_notice,
    uplink_publish,
)
from node.core.admission import Admitted, VolatilePublisher
from node.core.connection import (
    ConnectionActor,
    Invalid,
    KeepOffline,
    PlainJoin,
    PlainLeave,
    TransportClosed,
)
from node.core.events import event_frame
from node.core.limits import TokenBucket
from node.core.ports import StoreError
from node.core.room import stored_lately
from node.core.room_state import with_stored
from node.protocol.errors import CodecError, ProtocolError
from node.protocol.frames import (
    CBOR,
    ROOM_RE,
    cbor_loads_strict,
    is_reply,
    parse_frame,
    publish_frame,
    request_id_of,
    salvage_frames,
)
from node.protocol.tokens import Principal

if TYPE_CHECKING:
    from bridge.mqtt import MqttBridge

__all__ = ["PLAIN_CBOR", "MqttSession"]


log = logging.getLogger("bridge.mqtt")

_ROOM_RE = ROOM_RE  # ends in \Z: "rooms/<name>\n" is no room (use fullmatch)
# After our FIN, the device's input is read and discarded for at most this long.
_CLOSE_DRAIN_S = 5.0


class _PlainCbor:
    """Room events for plain subscribers: the event frame without ``type``, as a CBOR map."""

    name = "cbor-plain"
    binary = True

    def encode(self, frame: Any) -> bytes:
        return CBOR.encode({k: v for k, v in frame.items() if k != "type"})  # never fails

    def join(self, frames: list[bytes]) -> bytes:
        return b"".join(frames)


PLAIN_CBOR = _PlainCbor()

# The fields of a stored event map a plain subscriber gets (as a room's event frame has them).
# A resumed QoS 1 room is read in pages of at most this many events, each sent under the
# window; the next page is read once no more than a window's worth waits.
_PAGE = 500
# A connected session's cursors are written at most this often (the last state, at once on
# close).
_WRITE_INTERVAL_S = 0.02
# How long a QoS 1 SUBACK waits for the session holding its subscription to be written.
_SUBACK_SAVE_S = 5.0
# Packets read (and kept for later) while a CONNECT's session is claimed, at most.
_GATED_PACKETS = 64


class _PlainCborSeq:
    """Room events for QoS 1 plain subscribers: the seq (8 bytes), then the plain CBOR map.
    The room encodes once per codec; :class:`_QosTransport` takes the seq off."""

    name = "cbor-plain-seq"
    binary = True

    def encode(self, frame: Any) -> bytes:
        seq = frame.get("seq") or 0
        return seq.to_bytes(8, "big") + PLAIN_CBOR.encode(frame)

    def join(self, frames: list[bytes]) -> bytes:
        return b"".join(frames)


PLAIN_CBOR_SEQ = _PlainCborSeq()


def plain_payload(room: str, seq: int, body: bytes) -> bytes | None:
    """The payload a plain subscriber gets for stored event ``seq`` (its CBOR event map), as
    the room would send it; None for a body that is not an event map."""
    try:
        frame = event_frame(room, seq, cbor_loads_strict(body))
    except CodecError:
        return None
    return None if frame is None else PLAIN_CBOR.encode(frame)


class _TopicTransport:
    """Writes each frame as one QoS 0 PUBLISH on a fixed topic of one device."""

    kind = "mqtt"
    frame_per_message = True

    def __init__(self, session: MqttSession, topic: str) -> None:
        self.session = session
        self.topic = topic
        self.enabled = True

    def write_message(self, payload: bytes) -> None:
        if self.enabled:
            self.session.send_publish(self.topic, payload)

    def buffered_bytes(self) -> int:
        return self.session.buffered_bytes()

    def close(self, code: int, reason: str) -> None:
        self.session.close(f"{code} {reason}")


class _QosTransport:
    """A QoS 1 plain subscription: each event goes through the session's window.

    Attributes:
        resume_from: (seq, epoch) to join the room from (read by the connection actor when it
            joins: ``node.core.connection``), or None to join live.
    """

    kind = "mqtt"
    frame_per_message = True

    def __init__(self, session: MqttSession, room: str,
                 resume_from: tuple[int, str] | None) -> None:
        self.session = session
        self.room = room
        self.resume_from = resume_from

    def write_message(self, payload: bytes) -> None:
        seq = int.from_bytes(payload[:8], "big")
        if seq:
            self.session.send_qos1(self.room, seq, payload[8:])
        else:  # a volatile event (no seq): QoS 0
            self.session.send_publish(f"rooms/{self.room}", payload[8:])

    def buffered_bytes(self) -> int:
        # What waits beyond the window counts: a device that does not acknowledge becomes a
        # slow consumer and is disconnected (it resumes from its cursor later).
        return self.session.buffered_bytes() + self.session.qos.waiting_bytes

    def close(self, code: int, reason: str) -> None:
        self.session.close(f"{code} {reason}")


def _taken_elsewhere(bridge: MqttBridge, notice: Takeover) -> None:
    """A takeover notice: another connection claimed the device's session (or discarded it),
    on this node or another. Its connection here is closed if the notice's claim is newer than
    the revision it holds; a notice that arrives late (older than that) closes nothing."""
    session = bridge.sessions.get((notice.tenant, notice.client_id))
    if session is None or session.closed:
        return
    if notice.before is not None:
        if notice.conn and notice.conn == session.conn_id:
            return  # its own claim
        if not session.opened:
            # Its claim is on its way: judged once its revision is known.
            session.notice_before = max(session.notice_before, notice.before)
            return
        if not notice.supersedes(session.revision):
            log.debug("= %s: a late takeover notice (before %d; it holds %d) ignored",
                      session.client_id, notice.before, session.revision)
            return
    session.taken_over("taken over by a new connection elsewhere")


def _hand_over(bridge: MqttBridge, tenant: str, client_id: str, before: int) -> None:
    """Another connection is about to claim the device's session: its connection here, if its
    claim's revision is below ``before``, is closed and writes its last cursors (the claim
    waits for that write). One whose claim is on its way (the claiming connection itself, on
    this node) is left alone."""
    session = bridge.sessions.get((tenant, client_id))
    if session is None or session.closed or not session.opened:
        return
    if session.claimed >= before:
        return  # it claimed after the one asking read the record: a newer claim
    # Its writes since its claim do not count (they were taken for a newer claim: the
    # connection was left open, and closed by the claim's takeover notice without its last
    # write, its last PUBACKs lost).
    session.hand_over("taken over by a new connection")


class MqttSession(asyncio.Protocol):
    """One device connection: parse, authorise, route; ack uplinks once stored."""

    # Slots: with more than 30 attributes, an instance would get a dict of its own (~1.6 KB
    # per device; an IoT fleet is many devices).
    __slots__ = (
        "_acks_out", "_asked", "_closing", "_dirty", "_drained", "_draining", "_end_reason",
        "_gated", "_landed", "_loop", "_notices_due", "_opening", "_peer_eof", "_pending",
        "_refresh", "_saved", "_saved_at_close", "_stalled", "_tasks", "_timer",
        "_unstall_task", "_writer", "acks",
        "bridge", "bucket", "claimed", "client_id", "closed", "conn_id", "ctx", "keepalive",
        "last_seen",
        "notice_before", "opened", "parser", "persistent", "plain", "principal", "qos",
        "qos2_seen", "record", "ref", "revision", "settings", "subs", "transport", "tunnel",
        "volatile", "will",
    )

    def __init__(self, bridge: MqttBridge) -> None:
        self.bridge = bridge
        self.ctx = bridge.ctx
        self.settings = bridge.ctx.settings
        self.parser = mq.MqttParser(max_packet_bytes=self.settings.max_frame_bytes + 1024)
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop  # the running loop, set by connection_made
        self.principal: Principal | None = None
        self.client_id = ""
        self.ref: Any = None
        self.tunnel: _TopicTransport | None = None
        self.plain: set[str] = set()  # rooms subscribed on plain topics (for the SUBACKs)
        self.acks: deque[list[Any]] = deque()  # [packet_id, done, qos] in arrival order
        # Acks due, written together at the end of the loop turn: a batch of stored uplinks
        # answers each of its devices with one write, not one per PUBACK.
        self._acks_out: list[bytes] | None = None
        self.qos2_seen: set[int] = set()
        self.will: Any = None
        self._notices_due: list[bytes] = []  # refusal notices waiting for the out subscription
        self.keepalive = 0
        self.last_seen = time.monotonic()
        self.bucket: TokenBucket | None = None
        self.volatile = VolatilePublisher(self.ctx.admission,
                                          self.settings.volatile_throttle_ms / 1000)
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        # Parsed packets waiting for room in the actor (None while there are none: an empty
        # deque is 0.6 KB, and a fleet's devices are idle most of the time).
        self._pending: deque[Any] | None = None
        self._stalled = False  # reading paused until the actor has room
        self._unstall_task: asyncio.Task[None] | None = None  # held: a task is weakly kept
        self._end_reason: str | None = None  # close once the pending packets are handled
        self._draining: asyncio.TimerHandle | None = None  # half-closed, discarding input
        self._peer_eof = False
        # QoS 1 downlinks and the persistent session (clean_session = 0).
        self.qos = QosWindow(self.settings.mqtt_inflight)
        self.subs: dict[str, int] = {}  # topic filter -> granted QoS
        self.persistent = False
        self.record: SessionRecord | None = None
        #: The session's revision this connection holds (its claim, then its last write; a
        #: clean connection: the revision it deleted): a takeover notice below it is late.
        self.revision = 0
        #: The revision of its claim (a clean connection: the revision it deleted): a handover
        #: asked by a claim that read an older one is this connection's to answer, however many
        #: writes it made since.
        self.claimed = 0
        #: Names this connection's claim in takeover notices (its own is ignored).
        self.conn_id = secrets.token_hex(8)
        self.opened = False  # its session is claimed (or discarded): its revision is known
        self.notice_before = 0  # the newest takeover notice that came before that
        self._opening: asyncio.Task[None] | None = None  # the session's claim, then CONNACK
        self._gated = False  # an async step (session load, QoS 1 subscribe) runs: wait
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer: asyncio.Task[None] | None = None
        self._dirty = False
        # Writes asked for (_persist) and the count that had been asked when the last one that
        # landed began: what a SUBACK waits for (_until_saved). _saved wakes such a wait.
        self._asked = self._landed = 0
        self._saved: asyncio.Event | None = None
        self._refresh: asyncio.TimerHandle | None = None
        # Made by their first waiter (an Event holds a deque: 0.7 KB each, per device).
        self._drained: asyncio.Event | None = None
        self._saved_at_close = False
        # Set by close() (_wake_writer): the last write waits for nothing.
        self._closing: asyncio.Event | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        loop = self._loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.settings.connect_timeout_s, self._check_alive)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            if self.persistent and self._draining is not None:
                self._late_acks(data)
            return  # closing: input is only drained
        self.last_seen = time.monotonic()
        try:
            packets = self.parser.feed(data)
        except mq.ConnectRefused as exc:
            self._write(mq.connack(exc.return_code))
            self.close("connect refused")
            return
        except mq.MqttError as exc:
            log.debug("! %s: bad MQTT packet: %s", self.client_id or "?", exc)
            packets = exc.packets  # what came before the bad bytes still counts
            self._end_reason = "protocol error"
        if self._pending is None:
            self._pending = deque(packets)
        else:
            self._pending.extend(packets)
        if not self._stalled and not self._gated:
            self._run()
        elif (self._gated and len(self._pending) >= _GATED_PACKETS
              and self.transport is not None and not self.transport.is_closing()):
            self.transport.pause_reading()  # resumed with the gate

    def _late_acks(self, data: bytes) -> None:
        """Input read after our close: only its PUBACKs count (they still move the cursors,
        for the session's last write). A handover closes a connection at once, wherever its
        reading was: the device's last PUBACKs (and its DISCONNECT) could still be unread, in
        the socket or behind a full mailbox, and the cursors they moved were lost: the device
        got acknowledged events again on the node that took its session."""
        try:
            packets = self.parser.feed(data)
        except mq.MqttError as exc:
            packets = getattr(exc, "packets", None) or []
        self._acks_of(packets)

    def _acks_of(self, packets: Any) -> None:
        for packet in packets:
            if isinstance(packet, mq.PubAck):
                self._on_puback(packet.packet_id)

    def eof_received(self) -> bool | None:
        self._peer_eof = True
        if not self.closed and (self._stalled or self._pending):
            # The device half-closed with packets still waiting for room: handle them first.
            self._end_reason = self._end_reason or "end of input"
            return True  # keep the transport open for their replies
        return None

    def _run(self) -> None:
        """Handle pending packets in order while the actor has room, else pause reading."""
        pending = self._pending
        high = ConnectionActor.inbound_high
        while pending and not self.closed:
            if self._gated:
                return  # resumed when the async step is done
            ref = self.ref
            if ref is not None and ref.queued >= high:
                self._stall(ref)
                return
            self._handle(pending.popleft())
        self._pending = None
        if self._end_reason is not None:
            self.close(self._end_reason)

    def _stall(self, ref: Any) -> None:
        self._stalled = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._unstall_task = asyncio.get_running_loop().create_task(
            self._unstall(ref), name=f"mqtt[{self.client_id}].unstall")

    async def _unstall(self, ref: Any) -> None:
        try:
            await ref.wait_for_room(ConnectionActor.inbound_low)
        except ActorDeadError:
            self._pending = None  # the connection is ending: nothing will handle them
        self._stalled = False
        self.last_seen = time.monotonic()  # our own pause is not the device's silence
        if self.closed:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._run()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._draining is not None:
            self._draining.cancel()
            self._draining = None
        if not self.closed:
            self.closed = True
            if self.will is not None:
                self._send_will()
        self._end()

    # -- helpers ---------------------------------------------------------------------------

    def buffered_bytes(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def send_publish(self, topic: str, payload: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and self._draining is None:
            transport.writelines((mq.publish_header(topic, len(payload)), payload))

    def _write(self, data: bytes) -> None:
        # Nothing after our FIN (half-closed while draining: a write would raise).
        transport = self.transport
        if transport is not None and not transport.is_closing() and self._draining is None:
            transport.write(data)

    def close(self, reason: str, *, drain: bool = True) -> None:
        """Close the device's connection (no will is sent for a close of ours).

        Args:
            reason: For the log.
            drain: Half-close and discard the device's input until it closes too (at most
                ``_CLOSE_DRAIN_S``), so that what was written reaches it; False closes at once.
        """
        if not self.closed:
            self.closed = True
            log.debug("x %s: %s", self.client_id or "?", reason)
            if self.persistent:
                if self._pending:
                    self._acks_of(self._pending)  # read, not handled yet (see _late_acks)
                self._persist()  # its last cursors (only PUBACKs move them after the close)
                self._saved_at_close = True
                self._wake_writer()
        self._pending = None
        if self._acks_out:
            self._flush_acks()  # the acks due go before the end
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not drain or self._peer_eof or not transport.can_write_eof():  # TLS: no half-close
            if self._draining is not None:
                self._draining.cancel()
                self._draining = None
            transport.close()
            return
        if self._draining is not None:
            return
        transport.write_eof()  # FIN after what is buffered; the device's close ends it
        if self._stalled or self._gated:
            # Read what the device still sends (discarded, but for its PUBACKs: _late_acks).
            transport.resume_reading()
        self._draining = asyncio.get_running_loop().call_later(
            _CLOSE_DRAIN_S, self._drain_expired, transport)

    def _drain_expired(self, transport: asyncio.Transport) -> None:
        self._draining = None
        if not transport.is_closing():
            # Still unread output after 5 s: the device does not read; abort (close would
            # wait for the flush forever).
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    def _end(self) -> None:
        self.volatile.close()
        for task in self._tasks:
            task.cancel()
        if self._refresh is not None:
            self._refresh.cancel()
        if self._drained is not None:
            self._drained.set()
        if self.persistent and not self._saved_at_close:
            self._persist()  # connected = False, the last cursors (a connection lost)
            self._wake_writer()
        if self.principal is not None:
            key = (self.principal.tenant, self.client_id)
            if self.bridge.sessions.get(key) is self:
                del self.bridge.sessions[key]
        if self.ref is not None:
            self.plain.clear()  # the actor's stop ends its plain memberships
            with contextlib.suppress(ActorError):
                self.ref.tell(TransportClosed())

    def _check_alive(self) -> None:
        if self.closed:
            return
        if self.principal is None:
            self.close("no CONNECT in time", drain=False)  # nothing to deliver
            return
        if self.keepalive:
            # While reading is paused by us, the device's silence is not its fault.
            idle = 0.0 if self._stalled else time.monotonic() - self.last_seen
            if idle > self.keepalive * 1.5:
                self.closed = True  # an expired keepalive publishes the will (MQTT 3.1.2.10)
                if self.will is not None:
                    self._send_will()
                if self.transport is not None:
                    self.transport.close()
                return
            self._timer = asyncio.get_running_loop().call_later(
                self.keepalive * 1.5 - idle + 0.05, self._check_alive)

    # -- packets ---------------------------------------------------------------------------

    def _handle(self, packet: Any) -> None:
        if isinstance(packet, mq.Publish):
            self._on_publish(packet)
        elif isinstance(packet, mq.PubAck):
            self._on_puback(packet.packet_id)
        elif isinstance(packet, mq.PubRel):
            self.qos2_seen.discard(packet.packet_id)
            self._write(bytes((0x70, 2)) + packet.packet_id.to_bytes(2, "big"))  # PUBCOMP
        elif isinstance(packet, mq.PingReq):
            self._write(mq.pingresp())
        elif isinstance(packet, mq.Subscribe):
            self._on_subscribe(packet)
        elif isinstance(packet, mq.Unsubscribe):
            self._on_unsubscribe(packet)
        elif isinstance(packet, mq.Connect):
            self._on_connect(packet)
        elif isinstance(packet, mq.Disconnect):
            self.will = None  # a clean goodbye: no will
            self.close("disconnect")

    def _on_connect(self, packet: Any) -> None:
        try:
            principal = self.bridge.check_connect(packet)
        except mq.ConnectRefused as exc:
            self._write(mq.connack(exc.return_code))
            self.close(str(exc))
            return
        self.principal = principal
        self.client_id = packet.client_id
        old = self.bridge.sessions.get((principal.tenant, packet.client_id))
        if old is not None and old is not self and old.ref is not None:
            with contextlib.suppress(ActorError):  # its successor is the device's presence
                old.ref.tell(KeepOffline(None))
        self.bridge.register(self)  # an older connection of the device is taken over
        self.will = self._checked_will(packet.will)
        self.keepalive = packet.keepalive
        self.bucket = TokenBucket(self.settings.rate_per_s, self.settings.rate_burst,
                                  time.monotonic())
        self.tunnel = _TopicTransport(self, f"rtnode/v1/{packet.client_id}/out")
        self.tunnel.enabled = False  # until the device subscribes to its out topic
        # A persistent session's device stays in its plain rooms' presence as offline while
        # away (until its session expires).
        keep = not packet.clean_session and self.ctx.sessions is not None
        actor = ConnectionActor(self.ctx, self.tunnel, CBOR, principal=principal,
                                client_id=packet.client_id,
                                offline_ttl_s=self.settings.mqtt_session_expiry_s if keep else None)
        self.ref = self.ctx.system.spawn(lambda: actor)
        if self.ctx.sessions is not None:
            if old is self:
                old = None
            # The session is loaded (or discarded) before the CONNACK; the packets after the
            # CONNECT wait for it.
            # Read meanwhile: a device that gives up on its CONNACK (and maybe connects
            # elsewhere) ends its claim. Read paused, its close went unseen: the claim went
            # on, and its handover and write took the session from the device's newer
            # connection.
            self._opening = self._gate(self._open_session(not packet.clean_session, old),
                                       "session", read=True)
        else:
            self._write(mq.connack(0))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.keepalive:
            self._check_alive()

    # -- uplinks ---------------------------------------------------------------------------

    def _on_publish(self, packet: Any) -> None:
        topic = packet.topic
        qos = packet.qos
        if qos == 2:
            if packet.packet_id in self.qos2_seen:
                self._write(bytes((0x50, 2)) + packet.packet_id.to_bytes(2, "big"))  # PUBREC
                return
            self.qos2_seen.add(packet.packet_id)
        entry: list[Any] | None = None
        if qos:
            entry = [packet.packet_id, False, qos]
            self.acks.append(entry)
        if topic == f"rtnode/v1/{self.client_id}/in":
            self._tunnel_in(packet.payload)
            self._done(entry)
        elif topic.startswith("rooms/") and topic.endswith("/up"):
            if not self._uplink(topic, packet.payload, entry, retain=packet.retain):
                self._done(entry)
        else:
            self.bridge.refused_publishes += 1  # another device's tunnel, or a topic of no use
            if topic.startswith("rtnode/v1/") and topic.endswith("/in"):
                self._refuse(topic, packet.payload, "other_tunnel", 4003,
                             f"a device publishes only on its own tunnel "
                             f"rtnode/v1/{self.client_id}/in")
            else:
                self._refuse(topic, packet.payload, "unknown_topic", 4000,
                             f"no such topic: publish to rooms/<room>/up or "
                             f"rtnode/v1/{self.client_id}/in")
            self._done(entry)

    def _done(self, entry: list[Any] | None) -> None:
        """Mark an uplink handled and send the acks that are due, in arrival order."""
        if entry is not None:
            entry[1] = True
        acks = self.acks
        if not (acks and acks[0][1]):
            return
        out = self._acks_out
        if out is None:
            out = self._acks_out = []
            self._loop.call_soon(self._flush_acks)
        while acks and acks[0][1]:
            packet_id, _, qos = acks.popleft()
            if qos == 1:
                out.append(mq.puback(packet_id))
            else:
                out.append(bytes((0x50, 2)) + packet_id.to_bytes(2, "big"))  # PUBREC

    def _flush_acks(self) -> None:
        out, self._acks_out = self._acks_out, None
        if out:
            self._write(b"".join(out))

    def _tunnel_in(self, payload: bytes) -> None:
        # A bad frame is answered on the tunnel by the device's actor (an error frame, within
        # max_errors_per_min); here it is only counted and logged.
        try:
            raw = cbor_loads_strict(payload)
        except CodecError as exc:
            # A tag: the frame is still answered by its id (bridge/ws.py does the same).
            salvaged = salvage_frames(payload, True, 1)
            if salvaged is not None and len(salvaged) == 1:
                self._tunnel_frame(salvaged[0], payload)
                return
            self.bridge.bad_payloads += 1
            self._refuse(f"rtnode/v1/{self.client_id}/in", payload, "bad_tunnel_frame",
                         exc.code, exc.reason, notify=False)
            self.ref.tell(Invalid(exc.code, exc.reason))
            return
        self._tunnel_frame(raw, payload)

    def _tunnel_frame(self, raw: Any, payload: bytes) -> None:
        try:
            frame = parse_frame(raw)
        except ProtocolError as exc:
            self.bridge.bad_payloads += 1
            self._refuse(f"rtnode/v1/{self.client_id}/in", payload, "bad_tunnel_frame",
                         exc.code, exc.reason, notify=False)
            self.ref.tell(Invalid(exc.code, exc.reason, request_id_of(raw), reply=is_reply(raw)))
            return
        with contextlib.suppress(ActorError):
            self.ref.tell(frame)

    def _uplink(self, topic: str, payload: bytes, entry: list[Any] | None, *,
                notify: bool = True, retain: bool = False) -> bool:
        """Admit a plain uplink on ``rooms/<room>/up`` (``node.core.admission``), a JSON
        object or a CBOR map, and store it.

        Args:
            topic: Its topic.
            payload: Its payload.
            entry: Its place in the ack queue (None: QoS 0, or a will).
            notify: Tell the device why, if refused (False for a will: the device is gone).
            retain: The RETAIN flag: sets the device's key in a state room (an empty payload
                removes it: event ``state:unset``); refused in any other room.

        Returns:
            True when its ack waits for the store; False when it is done: refused (dropped,
            counted and reported: MQTT 3.1.1 has no negative ack) or volatile (sent, never
            stored).
        """
        frame = None
        try:
            room = topic[6:-3]
            if not retain:
                frame = uplink_publish(payload, room)
            elif not self.settings.room_policy(room).state:
                raise UplinkDecodeError("not_state_room", "RETAIN needs a state room "
                                                          "(namespace with state = true)")
            elif payload:
                frame = uplink_publish(payload, room)
            else:
                frame = publish_frame({"event": "state:unset", "unset": True}, room)
            admitted = self.ctx.admission.admit(
                "mqtt", self.principal, frame, client_id=self.client_id, bucket=self.bucket)
        except ProtocolError as exc:
            if exc.code == 4000:
                self.bridge.bad_payloads += 1
            else:
                self.bridge.refused_publishes += 1
            self._refuse(topic, payload, label_of(exc), exc.code, exc.reason,
                         msg_id=frame and frame.msg_id, retry=exc.retry, notify=notify)
            return False
        if admitted.volatile:
            self.volatile.publish(admitted)
            return False
        msg_id = frame.msg_id
        # A busy node's store gathers publishes into batches: then no task per uplink (and a
        # partial, not a closure: no cell per variable it holds, no frame of its own).
        if not self.ctx.admission.store_soon(admitted, functools.partial(
                self._stored, entry, topic, payload, msg_id, notify)):
            self._loop.create_task(self._store(admitted, entry, topic, payload, msg_id, notify))
        return True

    async def _store(self, admitted: Admitted, entry: list[Any] | None, topic: str,
                     payload: bytes, msg_id: object, notify: bool) -> None:
        try:
            await self.ctx.admission.store(admitted)
        except ProtocolError as exc:
            self._stored(entry, topic, payload, msg_id, notify, 0, exc)
        else:
            self._stored(entry, topic, payload, msg_id, notify, 0, None)

    def _stored(self, entry: list[Any] | None, topic: str, payload: bytes, msg_id: object,
                notify: bool, _seq: int, exc: ProtocolError | None) -> None:
        if exc is None:
            self.bridge.uplinks += 1
        elif exc.retry:
            # Not stored: no ack. The device's session retries with the same packet (DUP),
            # or the connection is closed so that it reconnects and resends.
            self.close("store unavailable")
            return
        else:
            self.bridge.refused_publishes += 1  # refused for good: dropped, and acked
            self._refuse(topic, payload, "store_refused", exc.code, exc.reason, msg_id=msg_id,
                         notify=notify)
        self._done(entry)

    def _refuse(self, topic: str, payload: bytes, label: str, code: int, reason: str, *,
                msg_id: object = None, retry: bool = False, notify: bool = True) -> None:
        """Count a refused uplink; unless one of this device and reason was reported less
        than 10 s ago, log it at info and (``notify``) send the device an ``error`` notice on
        its ``out`` topic, if it subscribes to it (else the notice is dropped)."""
        tenant = self.principal.tenant if self.principal is not None else ""
        held = self.bridge.refusals.refuse(f"{tenant}/{self.client_id}", label,
                                           time.monotonic())
        if held is None:
            return
        log.info("! %s: uplink refused on %r: %s (%d %s); payload %s%s",
                 self.client_id or "?", topic[:128], label, code, reason,
                 payload_preview(payload), f"; {held} more held back" if held else "")
        if not notify:
            return
        notice = CBOR.encode(refusal_notice(code, reason, topic, msg_id=msg_id, retry=retry))
        if self.tunnel is None:  # a will checked at CONNECT: sent once the device subscribes
            self._notices_due.append(notice)
        elif self.tunnel.enabled:
            self.send_publish(self.tunnel.topic, notice)

    def _checked_will(self, will: Any) -> Any:
        """The will to keep, or None when it could never be stored: its topic, payload and
        the device's right are checked at CONNECT, and a refusal is reported at once (the
        notice waits for the device's subscription to its ``out`` topic)."""
        if will is None or self.principal is None:
            return will
        try:
            check_will(self.principal, will.topic, will.payload)
        except ProtocolError as exc:
            if exc.code == 4000:
                self.bridge.bad_payloads += 1
            else:
                self.bridge.refused_publishes += 1
            self._refuse(will.topic, will.payload, label_of(exc), exc.code,
                         f"will: {exc.reason}")
            return None
        return will

    def _send_will(self) -> None:
        will = self.will
        self.will = None
        if will is None or self.principal is None:
            return
        topic = will.topic
        if topic.startswith("rooms/") and topic.endswith("/up"):  # else refused at CONNECT
            self._uplink(topic, will.payload, None, notify=False)

    # -- subscriptions ---------------------------------------------------------------------

    def _on_subscribe(self, packet: Any) -> None:
        principal = self.principal
        assert principal is not None and self.tunnel is not None
        before = dict(self.subs)
        granted = []
        later: list[tuple[str, int, int]] = []  # (room, its place in granted, granted QoS)
        for topic_filter, qos in packet.topics:
            if topic_filter == self.tunnel.topic:
                self.tunnel.enabled = True
                self.subs[topic_filter] = 0
                granted.append(0)
            elif (topic_filter.startswith("rooms/") and _ROOM_RE.fullmatch(topic_filter[6:])
                  and principal.can("join", topic_filter[6:])
                  and (topic_filter[6:] in self.plain
                       or len(self.plain) < self.settings.max_rooms_per_connection)):
                room = topic_filter[6:]
                want = min(qos, 1)  # QoS 2 requests are granted 1
                if room in self.plain and self.subs.get(topic_filter, 0) != want:
                    self._unsubscribe_plain(room)  # a new QoS: a new subscription
                    self.subs.pop(topic_filter, None)
                if not want or room in self.qos.rooms:
                    # A new QoS 1 subscription is recorded with its cursor, once it has one
                    # (_subscribe_later): a session written meanwhile must not hold it without
                    # one, which a resume would take for QoS 0 (live only).
                    self.subs[topic_filter] = want
                if want or self._is_state_room(room):
                    later.append((room, len(granted), want))
                else:
                    self._subscribe_plain(room)
                granted.append(want)
            else:
                self.bridge.refused_subscribes += 1
                granted.append(0x80)
        if later:
            # Each QoS 1 room starts from the room's latest seq (its cursor, persisted), and a
            # state room's values are read, before the SUBACK; the packets after the
            # SUBSCRIBE wait for them.
            self._gate(self._subscribe_later(packet.packet_id, granted, later,
                                             self.subs != before), "subscribe")
            return
        if self.persistent and self.subs != before:
            self._gate(self._suback_once_saved(packet.packet_id, granted), "subscribe")
            return
        self._suback(packet.packet_id, granted)

    async def _suback_once_saved(self, packet_id: int, granted: list[int]) -> None:
        """The SUBACK of new QoS 0 subscriptions of a persistent session, once the session
        holding them is written, as for QoS 1 (:meth:`_subscribe_later`)."""
        await self._saved_before_suback()
        self._suback(packet_id, granted)

    async def _saved_before_suback(self) -> None:
        """Write the session and wait for it: the SUBACK says the session holds the
        subscription, and a node killed before the write would leave a device that resumes its
        session (and need not subscribe again) without it, silently. Bounded: a store that
        does not answer gets the SUBACK anyway."""
        self._persist()
        if not await self._until_saved():
            log.info("! %s: SUBACK before the session holding its subscription was written",
                     self.client_id)

    def _suback(self, packet_id: int, granted: list[int]) -> None:
        assert self.tunnel is not None
        self._write(mq.suback(packet_id, granted))
        self._persist()
        if self.tunnel.enabled and self._notices_due:
            due, self._notices_due = self._notices_due, []
            for notice in due:  # after its SUBACK: a client may drop what comes before
                self.send_publish(self.tunnel.topic, notice)

    async def _subscribe_later(self, packet_id: int, granted: list[int],
                               rooms: list[tuple[str, int, int]], changed: bool) -> None:
        """SUBSCRIBE to QoS 1 rooms and to state rooms: what they need read first, then the
        SUBACK (once the session holding new subscriptions is written), then each room's
        retained values and its events. ``changed``: the SUBSCRIBE added QoS 0 ones."""
        assert self.principal is not None
        tenant, store = self.principal.tenant, self.ctx.store
        todo: list[tuple[str, int | None, list[dict[str, Any]]]] = []
        for room, index, qos in rooms:
            if not qos:
                todo.append((room, -1, await self._state_values(room, None)))
                continue
            try:
                if room in self.plain and room in self.qos.rooms:
                    # Subscribed already at QoS 1: the subscription goes on (its retained
                    # values are sent again, MQTT 3.8.4).
                    todo.append((room, None, await self._state_values(room, None)))
                    continue
                latest = await store.last_seq(tenant, room)
            except StoreError as exc:
                log.info("! %s: QoS 1 subscription to %s failed: %s", self.client_id, room, exc)
                self.subs.pop(f"rooms/{room}", None)
                granted[index] = 0x80
                continue
            todo.append((room, latest, await self._state_values(room, latest)))
        tracked = False
        for room, start, _values in todo:
            if start is not None and start != -1:
                # The subscription and its cursor enter the session together.
                self.qos.track(room, start)
                self.subs[f"rooms/{room}"] = 1
                tracked = True
        if tracked or changed:
            await self._saved_before_suback()
        self._suback(packet_id, granted)
        for room, start, values in todo:
            if start == -1:  # QoS 0
                self._send_retained(room, values, 0)  # the current values first, then events
                self._subscribe_plain(room)
                continue
            self._send_retained(room, values, 1)
            if start is not None:
                self._subscribe_plain(room, resume_from=(start, store.epoch))
        self._persist()

    def _is_state_room(self, room: str) -> bool:
        return self.ctx.state is not None and self.settings.room_policy(room).state

    async def _state_values(self, room: str, upto: int | None) -> list[dict[str, Any]]:
        """A state room's current values (none for another room), those above ``upto`` left
        out (they come as events)."""
        state = self.ctx.state
        if state is None or self.principal is None or not self._is_state_room(room):
            return []
        tenant = self.principal.tenant
        try:
            values = await state.values(tenant, room)
            if upto is not None:
                # Up to upto, the events after it coming as they are stored: those stored
                # before it whose state another node is still writing are among the values.
                values = with_stored(values, await stored_lately(self.ctx.store, tenant, room,
                                                                 upto))
        except StoreError as exc:
            log.info("! %s: no retained values of %s: %s", self.client_id, room, exc)
            return []
        return [v for v in values if isinstance(v, dict)
                and (upto is None or int(v.get("seq") or 0) <= upto)]

    def _send_retained(self, room: str, values: list[dict[str, Any]], qos: int) -> None:
        """A state room's values as retained PUBLISHes (MQTT 3.3.1.3)."""
        topic = f"rooms/{room}"
        for value in values:
            seq = int(value.get("seq") or 0)
            frame = event_frame(room, seq, value)
            if frame is None:
                continue
            payload = PLAIN_CBOR.encode(frame)
            if qos and seq:
                self._write_outgoing(self.qos.offer_retained(room, seq, payload))
            else:
                self._publish(topic, payload, retain=True)

    def _subscribe_plain(self, room: str, *,
                         resume_from: tuple[int, str] | None = None) -> None:
        self.plain.add(room)
        if room in self.qos.rooms:
            codec: Any = PLAIN_CBOR_SEQ
            transport: Any = _QosTransport(self, room, resume_from)
        else:
            codec, transport = PLAIN_CBOR, _TopicTransport(self, f"rooms/{room}")
        with contextlib.suppress(ActorError):  # a stopping actor: the connection is ending
            self.ref.tell(PlainJoin(room, codec, transport))

    def _unsubscribe_plain(self, room: str) -> None:
        self.plain.discard(room)
        self.qos.untrack(room)
        with contextlib.suppress(ActorError):
            self.ref.tell(PlainLeave(room))

    def _on_unsubscribe(self, packet: Any) -> None:
        assert self.tunnel is not None
        for topic_filter in packet.topics:
            if topic_filter == self.tunnel.topic:
                self.tunnel.enabled = False
            elif topic_filter.startswith("rooms/") and topic_filter[6:] in self.plain:
                self._unsubscribe_plain(topic_filter[6:])
            self.subs.pop(topic_filter, None)
        self._write(mq.unsuback(packet.packet_id))
        self._persist()

    # -- QoS 1 downlinks -------------------------------------------------------------------

    def send_qos1(self, room: str, seq: int, payload: bytes) -> None:
        """An event of a QoS 1 subscription, in seq order: into the window."""
        self._write_outgoing(self.qos.offer(room, seq, payload))

    def _write_outgoing(self, out: list[Outgoing]) -> None:
        for msg in out:
            self._publish(f"rooms/{msg.room}", msg.payload, qos=1, packet_id=msg.packet_id,
                          retain=msg.retain, dup=msg.dup)
        if out:
            self._persist()  # the sent marks moved

    def _publish(self, topic: str, payload: bytes, *, qos: int = 0, packet_id: int | None = None,
                 retain: bool = False, dup: bool = False) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and self._draining is None:
            transport.writelines((mq.publish_header(topic, len(payload), qos, packet_id,
                                                    retain, dup), payload))

    def _on_puback(self, packet_id: int) -> None:
        self._write_outgoing(self.qos.ack(packet_id))
        if self.qos.changed:
            self._persist()
        if self._is_drained() and self._drained is not None:
            self._drained.set()

    # -- async steps -----------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"mqtt[{self.client_id}].{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _gate(self, coro: Any, name: str, *, read: bool = False) -> asyncio.Task[None]:
        """Run ``coro`` before the device's next packets are handled (reading is paused).

        Args:
            read: Go on reading meanwhile (up to ``_GATED_PACKETS`` packets kept for later),
                so that a device that goes away is seen (its connection lost: ``coro`` is
                cancelled).
        """
        self._gated = True
        if not read and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        return self._spawn(self._gated_run(coro), name)

    async def _gated_run(self, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("! %s: %r", self.client_id, exc)
            self.close("internal error")
        self._gated = False
        if self.closed:
            return
        if self.transport is not None and not self.transport.is_closing() and not self._stalled:
            self.transport.resume_reading()
        if not self._stalled:
            self._run()

    # -- the persistent session ------------------------------------------------------------

    async def _open_session(self, keep: bool, old: MqttSession | None) -> None:
        """CONNECT: claim the stored session (``keep``: clean_session = 0), or discard it;
        answer the CONNACK; resume the stored subscriptions."""
        sessions = self.ctx.sessions
        assert sessions is not None and self.principal is not None and self.tunnel is not None
        tenant = self.principal.tenant
        if sessions.on_takeover is None:
            sessions.on_takeover = functools.partial(_taken_elsewhere, self.bridge)
            sessions.on_handover = functools.partial(_hand_over, self.bridge)
        if old is not None:
            # A takeover on this node: the older connection's claim first (else it could land
            # after ours and take the session from the newest connection), then its last
            # cursors.
            await old.wait_opened()
            await old.wait_saved()
        if not keep:
            record = None
            try:
                record = await sessions.get(tenant, self.client_id)
                if record is not None:
                    self.revision = await sessions.delete(tenant, self.client_id,
                                                          conn=self.conn_id)
            except StoreError as exc:
                log.warning("! %s: stored session not discarded: %s", self.client_id, exc)
            self.claimed = self.revision
            self.opened = True
            if self.notice_before > self.revision:
                self.taken_over("taken over by a newer connection while connecting")
                return
            forget = getattr(self.ctx.presence, "forget_device", None)
            if record is not None and forget is not None:
                # Its offline entries go (with a presence:leave), before the CONNACK.
                rooms = sorted(t[6:] for t in record.subs if t.startswith("rooms/"))
                await forget(tenant, self.client_id, rooms, self.ctx.feed)
            self._write(mq.connack(0))
            return
        store = self.ctx.store
        try:
            record, revision, present, behind = await sessions.claim(
                tenant, self.client_id, epoch=store.epoch, conn=self.conn_id)
        except SessionsFull as exc:
            log.warning("! %s: %s", self.client_id, exc)
            self._write(mq.connack(3))
            self.close("too many sessions")
            return
        except StoreError as exc:
            log.warning("! %s: session not loaded: %s", self.client_id, exc)
            self._write(mq.connack(3))
            self.close("session store unavailable")
            return
        if self.closed:
            return
        self.record, self.revision, self.persistent = record, revision, True
        self.claimed = revision
        self.opened = True
        if self.notice_before > revision:
            # A newer claim was announced while ours was on its way.
            self.taken_over("taken over by a newer connection while connecting")
            return
        self._write(mq.connack(0, present))
        self._schedule_refresh()
        same_epoch = record.epoch == store.epoch
        record.epoch = store.epoch
        for topic, qos in record.subs.items():
            if topic == self.tunnel.topic:
                self.tunnel.enabled = True
                self.subs[topic] = 0
                continue
            room = topic[6:]
            if not (topic.startswith("rooms/") and self.principal.can("join", room)):
                continue  # the device lost the right meanwhile: the subscription goes
            self.subs[topic] = qos
            if qos and room in record.cursors:
                cursor = record.cursors[room]
                if same_epoch:
                    # Behind: kept with the session until the resume knows how far to go.
                    self.qos.track(room, cursor, record.sent.get(room, 0)).behind = behind
                else:
                    # The stream was recreated: its seqs start again, the cursor means nothing
                    # (reset at once, in the record too).
                    self.qos.track(room, 0)
                self.plain.add(room)
                self._spawn(self._resume_room(room, None if same_epoch else cursor,
                                              behind and same_epoch), f"resume[{room}]")
            else:
                self._subscribe_plain(room)
        self._persist()

    async def _resume_room(self, room: str, old_cursor: int | None,
                           behind: bool = False) -> None:
        """Send what the device missed in ``room`` since its cursor, page by page under the
        window, then join the room from the last one sent (its replay is small by then).
        ``old_cursor``: the cursor of a stream that was recreated since (gap notice, then the
        room from its start). ``behind``: the session's positions may be behind what the device
        got (``SessionStore.claim``), so every event stored until now may have been sent
        before: they all go with DUP (MQTT 3.3.1.1: it "might be re-delivery")."""
        assert self.principal is not None
        tenant, store = self.principal.tenant, self.ctx.store
        track = self.qos.rooms.get(room)
        if track is None:
            return  # unsubscribed meanwhile
        after = track.cursor
        if old_cursor is not None:
            self._notice_gap(room, old_cursor + 1, None, "epoch")
        checked = old_cursor is not None  # a recreated stream: from its start
        delay = 0.1
        while True:
            try:
                if behind:
                    last = await store.last_seq(tenant, room)
                    track = self.qos.rooms.get(room)
                    if track is None:
                        return  # unsubscribed meanwhile
                    track.dup_upto = max(track.dup_upto, last)
                    if last > track.sent:  # kept with the session: still so on a later resume
                        track.sent = last
                    track.behind = False
                    self.qos.changed = True
                    self._persist()
                    behind = False
                if not checked:
                    await self._check_gap(room, after)
                    checked = True  # not again on a retry after a failed read
                page = max(1, min(_PAGE, self.settings.recovery_max // 2))
                while True:
                    events = await store.read(tenant, room, after, page)
                    for ev in events:
                        payload = plain_payload(room, ev.seq, ev.body)
                        if payload is not None:
                            self.send_qos1(room, ev.seq, payload)
                        after = ev.seq
                    if not await self._window_drained():
                        return
                    if len(events) < page:
                        break
                break
            except StoreError as exc:
                log.info("! %s: resume of %s failed (%s); retry in %.1f s", self.client_id,
                         room, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self.closed or room not in self.plain:
            return
        self._subscribe_plain(room, resume_from=(after, store.epoch))

    async def _check_gap(self, room: str, after: int) -> None:
        """Send a gap notice if events after ``after`` (the cursor) may have been trimmed
        from the room's history.

        Raises:
            StoreError: The store did not answer.
        """
        assert self.principal is not None
        tenant, store = self.principal.tenant, self.ctx.store
        if after > 0:
            if not await store.has(tenant, room, after):
                first = await store.read(tenant, room, after, 1)
                self._notice_gap(room, after + 1, first[0].seq - 1 if first else None,
                                 "trimmed")
        elif (keep := self.settings.room_policy(room).history_size) and \
                await store.count(tenant, room) >= keep:
            # From the room's start: a room at its history limit may have lost some.
            first = await store.read(tenant, room, 0, 1)
            self._notice_gap(room, 1, first[0].seq - 1 if first else None, "trimmed")

    def _wake_writer(self) -> None:
        """End the session writer's wait between writes: the close's write goes at once."""
        if self._closing is not None:
            self._closing.set()

    def _is_drained(self) -> bool:
        """Whether the next page may be read: at most a window's worth waits, and less than a
        quarter of ``slow_consumer_bytes`` (live events count them too)."""
        return (self.qos.drained(self.qos.window)
                and self.qos.waiting_bytes <= self.settings.slow_consumer_bytes // 4)

    async def _window_drained(self) -> bool:
        """Wait until :meth:`_is_drained`; False when the connection ended meanwhile."""
        while not self._is_drained():
            if self.closed:
                return False
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            await self._drained.wait()
        return not self.closed

    def _notice_gap(self, room: str, missed_from: int, missed_to: int | None,
                    why: str) -> None:
        """Tell the device (on its ``out`` topic) that events of ``room`` it had not
        acknowledged are no longer stored: it gets what is, from the oldest on."""
        log.info("! %s: events of %s from seq %s to %s lost (%s)", self.client_id, room,
                 missed_from, missed_to, why)
        notice: dict[str, Any] = {"type": "notice", "code": "gap", "room": room,
                                  "missed_from": missed_from, "missed_to": missed_to,
                                  "reason": why}
        if self.tunnel is not None and self.tunnel.enabled:
            self.send_publish(self.tunnel.topic, CBOR.encode(notice))

    def _persist(self) -> None:
        """Write the session (coalesced: one write in flight, the latest state next)."""
        if not self.persistent:
            return
        self._dirty = True
        self._asked += 1
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name=f"mqtt[{self.client_id}].persist")
            if self.ctx.sessions is not None and self.principal is not None:
                self.ctx.sessions.hold(self._writer, self.principal.tenant, self.client_id,
                                       self._state_due)

    def _snapshot(self) -> SessionRecord:
        record = self.record
        assert record is not None
        cursors, sent = self.qos.positions()
        record.subs = dict(self.subs)
        record.cursors = {r: c for r, c in cursors.items() if f"rooms/{r}" in self.subs}
        record.sent = {r: c for r, c in sent.items() if f"rooms/{r}" in self.subs}
        record.connected = not self.closed
        record.node = self.ctx.node_name
        record.behind = self._behind()
        return record

    def _behind(self) -> bool:
        """Whether a subscribed room's sent mark may still be behind what an earlier connection
        sent (``RoomTrack.behind``): the record says so, and the next claim is behind too."""
        return any(t.behind for r, t in self.qos.rooms.items() if f"rooms/{r}" in self.subs)

    def _state_due(self) -> dict[str, Any] | None:
        """The state the session writer would write next, as a record's JSON: what a handover
        hands the claim while a write is in flight (``SessionStore.hand_over``). Only once the
        connection is closed (no PUBACK moves a cursor after that), and while the session is
        this connection's; else None. The record itself is left as sent."""
        if not (self.closed and self.persistent) or self.record is None:
            return None
        state = self.record.to_json()  # a copy (asdict)
        cursors, sent = self.qos.positions()
        state.update(subs=dict(self.subs), connected=False, node=self.ctx.node_name,
                     updated_ms=int(time.time() * 1000), behind=self._behind(),
                     cursors={r: c for r, c in cursors.items() if f"rooms/{r}" in self.subs},
                     sent={r: c for r, c in sent.items() if f"rooms/{r}" in self.subs})
        return state

    async def _write_loop(self) -> None:
        """Write the session while it changes: one write in flight, the latest state next."""
        sessions = self.ctx.sessions
        assert sessions is not None
        failures = 0
        # Writes whose answer was lost since the last one that landed: one of them (at most:
        # they all name the same revision) may have landed.
        doubts: list[dict[str, Any]] = []
        try:
            while self._dirty and self.persistent:
                self._dirty = False
                asked = self._asked
                try:
                    self.revision = await sessions.write(self._snapshot(), self.revision)
                    failures = 0
                    doubts.clear()
                    self._landed = asked
                    if self._saved is not None:
                        self._saved.set()
                    if self._dirty and not self.closed:
                        # A stream of PUBACKs: one write per interval, not one per ack (a
                        # close ends the wait: its write goes at once).
                        if self._closing is None:
                            self._closing = asyncio.Event()
                        self._closing.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._closing.wait(), _WRITE_INTERVAL_S)
                except SessionTaken:
                    landed = await self._own_write_landed(doubts) if doubts else False
                    if landed is not False:
                        if landed:
                            doubts.clear()  # written over next, from the revision it landed at
                        else:  # not known yet (the store does not answer): try again
                            failures += 1
                            await asyncio.sleep(min(0.1 * 2 ** failures, 2.0))
                        self._dirty = True
                        continue
                    self.taken_over("taken over by a new connection (or its session deleted)")
                    return
                except StoreError as exc:
                    if self.record is not None and len(doubts) < 16:
                        doubts.append(self.record.to_json())  # as sent (updated_ms included)
                    failures += 1
                    if self.closed and failures >= 5:
                        log.warning("! %s: last session write failed: %s", self.client_id,
                                    exc)
                        return
                    self._dirty = True
                    await asyncio.sleep(min(0.1 * 2 ** failures, 2.0))
        finally:
            self._writer = None

    async def _own_write_landed(self, doubts: list[dict[str, Any]]) -> bool | None:
        """After a conflict: whether the record is a write of ours whose answer was lost (a
        timeout during a leader election: it landed after all); then it takes that revision.
        None when the record could not be read. Taken for a takeover, such a write ended the
        connection and dropped every later position (its final cursors too): acknowledged
        events came again."""
        sessions = self.ctx.sessions
        if sessions is None or self.principal is None:
            return False
        try:
            record, revision = await sessions.read(self.principal.tenant, self.client_id)
        except StoreError:
            return None
        if record is None or record.to_json() not in doubts:
            return False
        log.info("= %s: a session write whose answer was lost had landed (revision %d)",
                 self.client_id, revision)
        self.revision = revision
        return True

    async def _until_saved(self, timeout: float = _SUBACK_SAVE_S) -> bool:
        """Whether the session as it is now was written within ``timeout`` (at once when it is
        not persistent)."""
        want = self._asked
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.persistent and not self.closed and self._landed < want:
            if self._saved is None:
                self._saved = asyncio.Event()
            self._saved.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._saved.wait()
            except TimeoutError:
                return False
        return self._landed >= want or not self.persistent or self.closed

    def _schedule_refresh(self) -> None:
        """Rewrite a connected session every half expiry: it expires only once unused."""
        sessions = self.ctx.sessions
        if sessions is None or self.closed:
            return
        self._refresh = asyncio.get_running_loop().call_later(
            sessions.expiry_s / 2, self._refresh_due)

    def _refresh_due(self) -> None:
        self._persist()
        self._schedule_refresh()

    def taken_over(self, reason: str) -> None:
        """The session is another connection's now (or deleted): close this one, leaving no
        offline presence and writing nothing more."""
        self.persistent = False  # its writes would fail: the record is the new holder's
        self.hand_over(reason)

    def hand_over(self, reason: str) -> None:
        """Another connection is about to claim the session: close this one, leaving no
        offline presence, with its last write (its cursors, ``connected = False``) unless it
        was taken over already."""
        if self.ref is not None:
            with contextlib.suppress(ActorError):
                self.ref.tell(KeepOffline(None))
        self.close(reason)

    async def wait_opened(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until this connection's session claim (or discard) is done."""
        task = self._opening
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)

    async def wait_saved(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until the last write of this closed connection is done."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._writer is not None:
                    await asyncio.shield(self._writer)
