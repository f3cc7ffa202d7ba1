"""External MQTT broker mode: devices talk to Mosquitto or EMQX, and the nodes bridge it.

Only the plain-topic face is offered here (the broker authenticates the devices):

* uplinks: a device publishes to ``rooms/<room>/up/<device_id>``, a topic its broker's ACL
  lets it write only under its own name (Mosquitto: ``pattern write rooms/+/up/%u``, see
  compose/mosquitto.acl). Every node subscribes ``$share/rtnode/rooms/+/up/+`` (an MQTT 5
  shared subscription), so the broker hands each uplink to one node of the cluster, which
  stores it in the room. The sender (``from.user``) and the dedupe scope come from that topic
  level only: the payload cannot name anyone. The payload is a JSON object or a CBOR map
  (``bridge.mqtt_uplinks.decode_uplink``). An uplink on the bare ``rooms/<room>/up`` names
  nobody the broker vouched for: refused and counted (:class:`UplinkRefused`); any other
  refusal is counted, logged at info and told to the device in an ``error`` notice on
  ``rtnode/v1/<device_id>/out`` (QoS 0; the broker's ACL must let the bridge write it and the
  device read it), at most once per device and reason per 10 s;
* downlinks: one durable replay consumer (``bridge.replay``) on the rooms of the bridged tenant,
  pinned to one node at a time (the others stand by): each stored event is published to
  ``rooms/<room>`` once for the whole cluster, each room's in order, and acknowledged to
  JetStream only after the broker has it (QoS 1); across a takeover, at least once.

aiomqtt never reconnects by itself: the node does, with backoff and full jitter, and
resubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from typing import Any
from urllib.parse import unquote, urlparse

import aiomqtt
import cbor2
from nats.js.errors import NotFoundError
from paho.mqtt.reasoncodes import ReasonCode

from bridge.mqtt_uplinks import (
    RefusalLog,
    label_of,
    payload_preview,
    refusal_notice,
    uplink_publish,
)
from bridge.replay import ReplayConsumer, Start
from bridge.replay_event import ReplayEvent
from node.core.connection import NodeContext
from node.protocol.errors import AuthError, ConfigError, ProtocolError
from node.protocol.frames import CBOR, Publish
from node.protocol.ids import is_valid_id
from node.protocol.subjects import STREAM_NAME
from node.protocol.tokens import Principal

__all__ = [
    "DOWN_DURABLE",
    "DURABLE",
    "LEGACY_UPLINK_FILTER",
    "SHARE_GROUP",
    "UPLINK_FILTER",
    "ExternalMqtt",
    "UplinkRefused",
    "device_id_ok",
    "parse_broker_url",
    "uplink_route",
]

log = logging.getLogger("bridge.mqtt.external")

#: The downlink durable of old, pulled by every node at once: read at start for where the new
#: one starts, then deleted.
DURABLE = "RTNODE_MQTT_OUT"
#: The downlinks' durable replay consumer, pinned to one node at a time.
DOWN_DURABLE = "RTNODE_MQTT_DOWN"
#: The uplinks: ``rooms/<room>/up/<device_id>``, the last level pinned by the broker's ACL.
UPLINK_FILTER = "rooms/+/up/+"
#: The bare uplink topic of old, which names no device: subscribed only to refuse and count
#: what still comes by it (a broker whose ACL lets anyone write it).
LEGACY_UPLINK_FILTER = "rooms/+/up"
#: The MQTT 5 shared subscription group of the bridging nodes: one of them gets each uplink.
SHARE_GROUP = "$share/rtnode/"
_BROKER_GRANT = {"*": frozenset({"publish"})}
_WARN_INTERVAL_S = 60.0
_STOP_S = 5.0  # how long stop() waits for the loops, then for a DISCONNECT that never ends
#: A stopping node's uplinks: it leaves the share group, then reads what the broker had already
#: routed to it until none came for _QUIET_S (at most _LEAVE_S in all).
_QUIET_S = 0.3
_LEAVE_S = 5.0


class UplinkRefused(AuthError):
    """An uplink whose topic names no sender the broker vouched for (4001): dropped, counted.

    Args:
        label: What was wrong, as counted: ``no_identity`` (the bare ``rooms/<room>/up``),
            ``bad_device_id`` (a device level outside the id grammar), ``not_uplink``.
        reason: One line for the log.
    """

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label


def device_id_ok(device_id: str) -> bool:
    """Whether a topic level is a valid device id, fit for ``from.user``, a dedupe key and a
    subject: the project's id grammar (``node.protocol.ids``, ``ID_RULE``), the same as a
    device token's ``sub``; so no ``.``, ``*``, ``>``, ``/``, whitespace or control
    characters."""
    return is_valid_id(device_id)


def uplink_route(topic: str) -> tuple[str, str]:
    """``rooms/<room>/up/<device_id>`` -> ``(room, device_id)``. Pure.

    The device id is the sender: the broker's ACL lets a device write only the topics that end
    in its own name. The room is checked by admission like every publish's (4000).

    Raises:
        UplinkRefused: The topic names no valid sender (see its ``label``).
    """
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "rooms" and parts[2] == "up":
        raise UplinkRefused("no_identity", "rooms/<room>/up names no device "
                                           "(publish to rooms/<room>/up/<device_id>)")
    if len(parts) != 4 or parts[0] != "rooms" or parts[2] != "up":
        raise UplinkRefused("not_uplink", "not an uplink topic")
    if not device_id_ok(parts[3]):
        raise UplinkRefused("bad_device_id", "the topic's device id is outside the id grammar")
    return parts[1], parts[3]


class _WarnEvery:
    """A warning at most once per ``interval_s`` (a hostile client must not flood the log),
    saying how many it held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -math.inf
        self._held = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._held += 1
            return
        log.warning(msg + " (%d more since the last such warning)", *args, self._held)
        self._last, self._held = now, 0


def _session_properties() -> Any:
    """MQTT 5 CONNECT properties: keep the session 5 minutes after a disconnect."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 300
    return props


def parse_broker_url(url: str) -> tuple[str, int, str | None, str | None, bool]:
    """``mqtt[s]://[user[:password]@]host[:port]`` -> (host, port, user, password, tls).

    Raises:
        ConfigError: Not an MQTT URL.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigError(f"invalid mqtt_broker_url {url!r}: expected mqtt://host:port")
    tls = parsed.scheme == "mqtts"
    port = parsed.port or (8883 if tls else 1883)
    user = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password else None
    return parsed.hostname, port, user, password, tls


class ExternalMqtt:
    """Bridges rooms of one tenant with an external MQTT broker.

    Args:
        ctx: The node's shared context.
        url: The broker's URL.
        tenant: The tenant whose rooms are bridged (topics carry no tenant).
    """

    def __init__(self, ctx: NodeContext, url: str, tenant: str = "default") -> None:
        self.ctx = ctx
        self.host, self.port, self.user, self.password, self.tls = parse_broker_url(url)
        self.tenant = tenant
        self.uplinks = 0
        self.downlinks = 0
        #: Uplinks refused for good (dropped, acked), by every rule.
        self.refused = 0
        #: Of those, the ones whose topic named no valid sender, by ``UplinkRefused.label``.
        self.refused_topics: Counter[str] = Counter()
        #: Every refusal by reason, and which to report (log line, notice).
        self.refusals = RefusalLog()
        self.connected = False
        self._client: aiomqtt.Client | None = None
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Set by stop(): each loop also ends at its next step, since a cancel can be lost.
        self._stopping = False
        self._warn = _WarnEvery(_WARN_INTERVAL_S)
        #: Set at each uplink read and each one settled; _busy while one is being stored.
        self._activity = asyncio.Event()
        self._busy = False

    async def start(self) -> None:
        """Start the broker connection and the downlink consumer."""
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._uplink_loop(), name="mqtt-external.uplink"),
                       loop.create_task(self._downlink_loop(), name="mqtt-external.downlink")]

    async def stop(self) -> None:
        """Stop both loops, in bounded time.

        aiomqtt's ``Client.__aexit__`` waits for the broker's side of the DISCONNECT with no
        timeout (aiomqtt 2.5.1); when that never comes, a cancelled loop would keep the node's
        stop waiting for ever. After ``_STOP_S`` the client is marked disconnected, which ends
        that wait.

        A cancel can also be lost: Python 3.11's ``asyncio.wait_for`` (under aiomqtt's
        ``publish`` and nats-py's requests) returns the result instead of raising when the
        awaited PUBACK or reply lands with the cancel, which a loop busy with a backlog hits
        nearly every time. So each loop also checks ``_stopping`` after each message and ends
        there (that message handled and acknowledged), and stop() cancels again what is left.
        """
        await self._leave()
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=_STOP_S)
        for task in pending:
            task.cancel()  # a cancel swallowed in a wait: this one lands on the next await
        if pending:
            log.warning("! MQTT broker %s:%s: no answer to DISCONNECT; closing without it",
                        self.host, self.port)
            client = self._client
            if client is not None and not client._disconnected.done():
                client._disconnected.set_result(None)
            await asyncio.wait(pending, timeout=_STOP_S)
        for task in self._tasks:
            if task.done() and not task.cancelled():
                with contextlib.suppress(BaseException):
                    task.result()  # retrieved: no "exception was never retrieved"

    async def _leave(self) -> None:
        """Hand this node's share of the uplinks to the others before it goes.

        The session is persistent (a node that dies comes back under its name and gets again
        what it never acknowledged), so the broker goes on routing the share group's uplinks to
        it while it is away: a node that stopped for good (scaled down, or replaced by one of
        another name: a container's host name) would hold its share, acknowledged to the
        devices, until its session expired, then lose it. So a stopping node first
        unsubscribes (nothing new is routed to it; its session holds no subscription), then
        stores and acknowledges what the broker had already sent it, until none came for
        ``_QUIET_S``. If that cannot finish (the broker away, the store failing), the session
        keeps what is left, as before.
        """
        client = self._client
        if client is None or not self.connected:
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_LEAVE_S):
                await client.unsubscribe([SHARE_GROUP + UPLINK_FILTER,
                                          SHARE_GROUP + LEGACY_UPLINK_FILTER])
                quiet_since = loop.time()
                while self._busy or loop.time() - quiet_since < _QUIET_S:
                    self._activity.clear()
                    try:
                        await asyncio.wait_for(self._activity.wait(), _QUIET_S)
                        quiet_since = loop.time()
                    except TimeoutError:
                        pass
        except (TimeoutError, aiomqtt.MqttError) as exc:
            log.warning("! MQTT broker %s:%s: left with uplinks possibly unread (%r); they "
                        "stay in this node's session", self.host, self.port, exc)
            return
        log.info("= left the MQTT broker's share group: its uplinks go to the other nodes")

    # -- uplinks ---------------------------------------------------------------------------

    async def _uplink_loop(self) -> None:
        attempt = 0
        while True:
            try:
                async with aiomqtt.Client(
                    self.host, self.port, username=self.user, password=self.password,
                    identifier=f"rtnode-{self.ctx.node_name}",
                    protocol=aiomqtt.ProtocolVersion.V5, keepalive=30,
                    tls_params=aiomqtt.TLSParameters() if self.tls else None,
                    # A session that outlives a dropped connection: uplinks the broker sent
                    # but we never acknowledged are sent again after we reconnect.
                    clean_start=False, properties=_session_properties(),
                ) as client:
                    # Acknowledge an uplink to the broker only once it is stored (below).
                    client._client.manual_ack_set(True)
                    await self._subscribe(client)
                    self._client = client
                    self.connected = True
                    self._ready.set()
                    attempt = 0
                    log.info("= connected to MQTT broker %s:%s", self.host, self.port)
                    async for message in client.messages:
                        self._busy = True
                        self._activity.set()
                        try:
                            stored = await self._uplink(message.topic.value,
                                                        bytes(message.payload))
                        finally:
                            self._busy = False
                        if not stored:
                            # Not stored and worth another try: no ack; reconnecting makes
                            # the broker resend it.
                            raise aiomqtt.MqttError("uplink not stored; reconnecting")
                        if message.qos:
                            client._client.ack(message.mid, message.qos)
                        self._activity.set()
                        if self._stopping:
                            return  # stop() began while this uplink was stored (see stop)
            except aiomqtt.MqttError as exc:
                log.warning("! MQTT broker %s:%s: %s", self.host, self.port, exc)
            finally:
                self._client = None
                self.connected = False
                self._ready.clear()
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(20.0, 0.5 * 2**attempt)))

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        filters = [SHARE_GROUP + UPLINK_FILTER, SHARE_GROUP + LEGACY_UPLINK_FILTER]
        granted = await client.subscribe([(f, 1) for f in filters])
        for topic_filter, code in zip(filters, granted, strict=False):
            if (isinstance(code, ReasonCode) and code.is_failure) or code == 0x80:
                log.warning("! MQTT broker refused the subscription %s: %s", topic_filter, code)

    async def _uplink(self, topic: str, payload: bytes) -> bool:
        """Admit one uplink (``node.core.admission``) and store it.

        Returns:
            False only when the store failed for now (retry it: not acked, the broker resends
            it); True when it is done: stored, sent (volatile), or refused for good (dropped
            and counted: there is no negative ack to send, and it must not block the uplinks
            behind it).
        """
        admission = self.ctx.admission
        frame: Publish | None = None
        try:
            room, device = uplink_route(topic)
        except UplinkRefused as exc:
            self._refuse_topic(topic, exc)
            return True
        try:
            # Only event, data and msg_id are read: a `device` field names nobody.
            frame = uplink_publish(payload, room)
            admitted = admission.admit("broker", self._sender(device), frame, client_id=None)
            if admitted.volatile:
                admission.send_volatile_quietly(admitted)  # at most once, never retried
            else:
                await admission.store(admitted)
        except ProtocolError as exc:
            if exc.retry and exc.code == 4503:
                return False
            self.refused += 1
            await self._refuse(device, topic, payload, label_of(exc), exc, frame)
            return True
        self.uplinks += 1
        return True

    def _refuse_topic(self, topic: str, exc: UplinkRefused) -> None:
        # The topic names no device the broker vouched for: nobody to tell, nor to key a
        # per-device limit by (a hostile client can make up ids): a warning once a minute.
        self.refused += 1
        self.refused_topics[exc.label] += 1
        self.refusals.counts[exc.label] += 1
        log.debug("- uplink refused on %r: %s", topic[:256], exc.reason)
        self._warn("! uplink refused on %r: %s", topic[:256], exc.reason)

    async def _refuse(self, device: str, topic: str, payload: bytes, label: str,
                      exc: ProtocolError, frame: Publish | None) -> None:
        """Count a refused uplink; unless one of this device and reason was reported less
        than 10 s ago, log it at info and publish an ``error`` notice to the device's
        ``rtnode/v1/<device>/out`` on the broker (QoS 0, best effort)."""
        held = self.refusals.refuse(device, label, time.monotonic())
        if held is None:
            return
        log.info("! %s: uplink refused on %r: %s (%d %s); payload %s%s", device, topic[:128],
                 label, exc.code, exc.reason, payload_preview(payload),
                 f"; {held} more held back" if held else "")
        client = self._client
        if client is None:
            return
        notice = refusal_notice(exc.code, exc.reason, topic,
                                msg_id=frame.msg_id if frame else None, retry=exc.retry)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(5):
                await client.publish(f"rtnode/v1/{device}/out", CBOR.encode(notice), qos=0)

    def _sender(self, device_id: str) -> Principal:
        """Who an uplink is from: the device its topic names, which the broker authenticated
        and let write that topic only. The node trusts it with publishing to the rooms of the
        bridged tenant (never to a personal or a ``sys:`` room)."""
        return Principal(sub=device_id, tenant=self.tenant, kind="device", rooms=_BROKER_GRANT)

    # -- downlinks -------------------------------------------------------------------------

    async def _downlink_loop(self) -> None:
        """Publish each stored event of the tenant to ``rooms/<room>`` on the broker, in each
        room's order, once for the cluster.

        One durable replay consumer (``bridge.replay``) shared by the bridging nodes: the
        server pins it to one of them, which publishes one event after another (QoS 1: each
        acknowledged to JetStream once the broker has it); the others stand by, and take over
        within its ``priority_timeout_s`` when it goes (at once when it stops). The durable of
        old (:data:`DURABLE`, pulled by every node at once, which interleaved a room's events
        at the devices) is read once for where to start, and deleted.
        """
        js = self.ctx.store.link.js  # type: ignore[attr-defined]
        nc = self.ctx.store.link.nc  # type: ignore[attr-defined]
        while not self._stopping:
            try:
                start = await self._downlink_start(js)
                async with ReplayConsumer(nc, tenant=self.tenant, rooms="*",
                                          durable=DOWN_DURABLE, start=start,
                                          max_deliver=0) as consumer:
                    with contextlib.suppress(Exception):  # gone, or an older node's again
                        await js.delete_consumer(STREAM_NAME, DURABLE)
                    async for ev in consumer:
                        await self._downlink(ev)
                        if self._stopping:
                            return
            except Exception as exc:  # NATS away, a leader election: try again
                log.warning("! downlink consumer: %s", exc or type(exc).__name__)
                await asyncio.sleep(1)

    async def _downlink_start(self, js: Any) -> Start:
        """Where a new downlink durable starts: after what the durable of old acknowledged,
        if there is one (nothing skipped, nothing sent twice at an upgrade); else new events."""
        try:
            info = await js.consumer_info(STREAM_NAME, DURABLE)
        except NotFoundError:
            return "new"  # any other failure is the loop's to retry: "new" would skip events
        return int(info.ack_floor.stream_seq) + 1

    async def _downlink(self, ev: ReplayEvent) -> None:
        """Publish ``ev`` once the broker is there; acknowledged once the broker has it. A
        publish that fails is nakked: the room's later events wait for it (on_retry block)."""
        while True:
            await self._ready.wait()
            client = self._client
            if client is None:  # cleared in the same step as _ready: not seen here, but never spin
                await asyncio.sleep(0.1)
                continue
            try:
                await client.publish(f"rooms/{ev.room}", cbor2.dumps(ev.as_map()), qos=1)
            except aiomqtt.MqttError:
                await ev.nak(delay=1.0)
                return
            await ev.ack()
            self.downlinks += 1
            return
