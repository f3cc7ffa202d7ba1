"""External MQTT broker mode: devices talk to Mosquitto or EMQX, and the nodes bridge it.

Only the plain-topic face is offered here (the broker authenticates the devices):

* uplinks: every node subscribes ``$share/rtnode/rooms/+/up`` (an MQTT 5 shared subscription),
  so the broker hands each uplink to one node of the cluster, which stores it in the room;
* downlinks: every node pulls from one shared JetStream durable consumer on the rooms of the
  bridged tenant, so each stored event is published to ``rooms/<room>`` once for the whole
  cluster, and acknowledged to JetStream only after the broker has it (QoS 1).

aiomqtt never reconnects by itself: the node does, with backoff and full jitter, and
resubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from typing import Any
from urllib.parse import unquote, urlparse

import aiomqtt
import cbor2
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from node.core.connection import NodeContext
from node.protocol.errors import ConfigError, ProtocolError
from node.protocol.frames import cbor_loads_strict, publish_frame
from node.protocol.subjects import STREAM_NAME, room_from_subject, room_subject
from node.protocol.tokens import Principal

__all__ = ["DURABLE", "ExternalMqtt", "parse_broker_url"]

log = logging.getLogger("bridge.mqtt.external")

DURABLE = "RTNODE_MQTT_OUT"
# A device named in an uplink becomes `from.user` and part of the Nats-Msg-Id header.
_DEVICE_RE = re.compile(r"[A-Za-z0-9_.:@=-]{1,128}\Z")
_BROKER_GRANT = {"*": frozenset({"publish"})}


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
        self.refused = 0
        self.connected = False
        self._client: aiomqtt.Client | None = None
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start the broker connection and the downlink consumer."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._uplink_loop(), name="mqtt-external.uplink"),
                       loop.create_task(self._downlink_loop(), name="mqtt-external.downlink")]

    async def stop(self) -> None:
        """Stop both loops."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

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
                    await client.subscribe("$share/rtnode/rooms/+/up", qos=1)
                    self._client = client
                    self.connected = True
                    self._ready.set()
                    attempt = 0
                    log.info("= connected to MQTT broker %s:%s", self.host, self.port)
                    async for message in client.messages:
                        stored = await self._uplink(message.topic.value, bytes(message.payload))
                        if not stored:
                            # Not stored and worth another try: no ack; reconnecting makes
                            # the broker resend it.
                            raise aiomqtt.MqttError("uplink not stored; reconnecting")
                        if message.qos:
                            client._client.ack(message.mid, message.qos)
            except aiomqtt.MqttError as exc:
                log.warning("! MQTT broker %s:%s: %s", self.host, self.port, exc)
            finally:
                self._client = None
                self.connected = False
                self._ready.clear()
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(20.0, 0.5 * 2**attempt)))

    async def _uplink(self, topic: str, payload: bytes) -> bool:
        """Admit one uplink (``node.core.admission``) and store it.

        Returns:
            False only when the store failed for now (retry it: not acked, the broker resends
            it); True when it is done: stored, sent (volatile), or refused for good (dropped
            and counted: there is no negative ack to send, and it must not block the uplinks
            behind it).
        """
        admission = self.ctx.admission
        try:
            if not (topic.startswith("rooms/") and topic.endswith("/up")):
                raise ProtocolError(4000, "not an uplink topic")
            raw = cbor_loads_strict(payload)
            if not isinstance(raw, dict):
                raise ProtocolError(4000, "expected a map")
            frame = publish_frame(raw, topic[6:-3])
            admitted = admission.admit("broker", self._sender(raw.get("device")), frame,
                                       client_id=None)
            if admitted.volatile:
                await admission.send_volatile_quietly(admitted)  # at most once, never retried
            else:
                await admission.store(admitted)
        except ProtocolError as exc:
            if exc.retry and exc.code == 4503:
                return False
            self.refused += 1
            return True
        self.uplinks += 1
        return True

    def _sender(self, device: object) -> Principal:
        """Who an uplink is from: the broker authenticated the device, and the node trusts it
        with publishing to the rooms of the bridged tenant (never to a personal or a ``sys:``
        room). The device may name itself in the map (``device``), else it is ``mqtt``."""
        sender = device if isinstance(device, str) and _DEVICE_RE.fullmatch(device) else "mqtt"
        return Principal(sub=sender, tenant=self.tenant, kind="device", rooms=_BROKER_GRANT)

    # -- downlinks -------------------------------------------------------------------------

    async def _downlink_loop(self) -> None:
        js = self.ctx.store.link.js  # type: ignore[attr-defined]
        config = ConsumerConfig(
            durable_name=DURABLE, deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30, max_ack_pending=1000,
        )
        psub: Any = None
        while psub is None:
            try:
                psub = await js.pull_subscribe(room_subject(self.tenant, ">"), durable=DURABLE,
                                               stream=STREAM_NAME, config=config)
            except Exception as exc:
                log.warning("! downlink consumer not ready: %s", exc)
                await asyncio.sleep(1)
        while True:
            await self._ready.wait()
            try:
                msgs = await psub.fetch(batch=100, timeout=1)
            except Exception:  # nothing new (timeout), or NATS reconnecting
                continue
            for msg in msgs:
                client = self._client
                if client is None:
                    break  # not acked: redelivered after ack_wait
                try:
                    _, room = room_from_subject(msg.subject)
                    event = cbor_loads_strict(msg.data)
                    if not isinstance(event, dict):
                        raise ProtocolError(4000, "not an event map")
                    event["room"] = room
                    event["seq"] = msg.metadata.sequence.stream
                    await client.publish(f"rooms/{room}", cbor2.dumps(event), qos=1)
                except (ProtocolError, ValueError):
                    await msg.ack()  # not an event: nothing to forward
                    continue
                except aiomqtt.MqttError:
                    break
                await msg.ack()
                self.downlinks += 1
