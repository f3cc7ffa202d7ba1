"""The doors a publish comes in by, as test adapters over the real network.

Each door sends a publish its own way (WebSocket JSON or CBOR frames, a frame in the MQTT tunnel,
a CBOR map on ``rooms/<room>/up``, ``POST /api/publish``, an uplink through an external broker)
and reports what became of it as one :class:`Outcome`, so that a table of cases can expect the
same outcome from every door. Doors without an error channel (plain MQTT, the external broker)
read the outcome from the node's admission counters, which count every door the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiomqtt
import cbor2

from tests.wsclient import RawClient, token, ws_url

__all__ = ["DOORS", "Outcome", "make_door", "mqtt_device", "tunnel_request"]


@dataclass(frozen=True)
class Outcome:
    """What became of one publish: ``stored`` (with its seq when the door tells it),
    ``volatile`` (sent live, not stored) or ``refused`` with a protocol code."""

    kind: str
    code: int | None = None
    seq: int | None = None

    def same(self) -> tuple[str, int | None]:
        """The part every door must agree on (plain doors do not learn the seq)."""
        return self.kind, self.code


def mqtt_device(node: Any, dev: str, **token_kw: Any) -> aiomqtt.Client:
    """An MQTT client of the node's own listener, logged in as device ``dev``."""
    tok = token(dev, kind="device", **token_kw)
    return aiomqtt.Client("127.0.0.1", node.mqtt.port, identifier=dev, username=dev,
                          password=tok)


async def tunnel_request(client: aiomqtt.Client, dev: str, frame: dict[str, Any], *,
                         unread: bool = False) -> Any:
    """Send ``frame`` (with an ``id``) in device ``dev``'s tunnel; its reply (the device has
    subscribed ``rtnode/v1/<dev>/out``), or with ``unread`` the error without id of a frame
    the node could not read (a tag, nesting past the limit)."""
    await client.publish(f"rtnode/v1/{dev}/in", cbor2.dumps(frame), qos=1)
    async with asyncio.timeout(10):
        async for message in client.messages:
            reply = cbor2.loads(bytes(message.payload))
            if reply.get("id") == frame["id"] or (
                    unread and reply.get("type") == "error" and "id" not in reply):
                return reply
    raise AssertionError("no reply")


async def _reply_or_unread(client: RawClient, frame: dict[str, Any]) -> dict[str, Any]:
    """``frame``'s reply, or the error without id of a message the node could not read (a
    value its decoder refuses: a tag, nesting past the limit); events are kept."""
    rid = frame["id"] = f"door-{next(_IDS)}"
    # As a peer writes it: the codec's encoder would make safe what it cannot hold.
    await client.ws.send(cbor2.dumps(frame) if client.codec.binary else json.dumps(frame))
    kept: list[Any] = []
    try:
        while True:
            f = await client.recv(10.0)
            if isinstance(f, dict) and ((f.get("id") == rid and f.get("type") != "rpc") or (
                    f.get("type") == "error" and "id" not in f)):
                return f
            kept.append(f)
    finally:
        client.buffer[:0] = kept


_IDS = itertools.count(1)


def _from_reply(reply: dict[str, Any]) -> Outcome:
    if reply.get("type") == "published":
        seq = reply.get("seq")
        return Outcome("stored", seq=seq) if seq is not None else Outcome("volatile")
    return Outcome("refused", reply.get("code"))


class _Door:
    name = ""
    codec = "json"  # how a bad value is spelled for this door

    def __init__(self, node: Any, rooms: dict[str, list[str]]) -> None:
        self.node = node
        self.rooms = rooms  # the publisher's grants
        self.stack = contextlib.AsyncExitStack()

    async def open(self) -> None:
        """Connect the publisher."""

    async def close(self) -> None:
        await self.stack.aclose()

    async def publish(self, room: str, event: str, data: Any, msg_id: str | None,
                      *, allowed: bool = True, fields: dict[str, Any] | None = None) -> Outcome:
        raise NotImplementedError

    def _counts(self, door: str) -> dict[str, int]:
        """The admission counters of ``door``: outcome -> count."""
        counts = self.node.ctx.admission.stats.counts
        return {outcome: n for (d, outcome), n in counts.items() if d == door}

    def _unread(self) -> int:
        """Uplinks dropped before admission, their payload unreadable (a tag, a bignum)."""
        return int(self.node.mqtt.bad_payloads) if self.node.mqtt is not None else 0

    async def _counted(self, door: str, before: dict[str, int],
                       unread: int | None = None) -> Outcome:
        """The one outcome the admission counters recorded for ``door`` since ``before``; a
        payload dropped unread since ``unread`` (the count before) is refused with 4000."""
        async with asyncio.timeout(10):
            while sum(self._counts(door).values()) <= sum(before.values()):
                if unread is not None and self._unread() > unread:
                    return Outcome("refused", 4000)
                await asyncio.sleep(0.01)  # counters have no event to wait on
        after = self._counts(door)
        [outcome] = [o for o, n in after.items() if n != before.get(o, 0)]
        if outcome in ("stored", "duplicate"):
            return Outcome("stored")
        if outcome == "volatile":
            return Outcome("volatile")
        return Outcome("refused", int(outcome))


class WsDoor(_Door):
    name = "ws-json"

    async def open(self) -> None:
        self.client = await RawClient.connected(ws_url(self.node), self._token(True),
                                                codec=self.codec)
        self.limited = await RawClient.connected(ws_url(self.node), self._token(False),
                                                 codec=self.codec)
        for c in (self.client, self.limited):
            self.stack.push_async_callback(c.close)

    def _token(self, allowed: bool) -> str:
        return token(f"pub-{self.codec}", rooms=self.rooms if allowed else {"*": ["join"]})

    async def publish(self, room: str, event: str, data: Any, msg_id: str | None,
                      *, allowed: bool = True, fields: dict[str, Any] | None = None) -> Outcome:
        frame: dict[str, Any] = {"type": "publish", "room": room, "event": event, "data": data}
        if msg_id is not None:
            frame["msg_id"] = msg_id
        frame.update(fields or {})
        client = self.client if allowed else self.limited
        return _from_reply(await _reply_or_unread(client, frame))


class WsCborDoor(WsDoor):
    name = "ws-cbor"
    codec = "cbor"


class TunnelDoor(_Door):
    """Protocol frames in CBOR on ``rtnode/v1/<id>/in``, answers on ``/out``."""

    name = "tunnel"
    codec = "cbor"

    async def open(self) -> None:
        self.ids = itertools.count(1)
        self.devices = {}
        for allowed in (True, False):
            dev = f"tun-{uuid.uuid4().hex[:6]}"
            rooms = self.rooms if allowed else {"*": ["join"]}
            client = await self.stack.enter_async_context(mqtt_device(self.node, dev,
                                                                      rooms=rooms))
            await client.subscribe(f"rtnode/v1/{dev}/out", qos=1)
            self.devices[allowed] = (dev, client)

    async def publish(self, room: str, event: str, data: Any, msg_id: str | None,
                      *, allowed: bool = True, fields: dict[str, Any] | None = None) -> Outcome:
        dev, client = self.devices[allowed]
        frame: dict[str, Any] = {"type": "publish", "id": next(self.ids), "room": room,
                                 "event": event, "data": data}
        if msg_id is not None:
            frame["msg_id"] = msg_id
        frame.update(fields or {})
        return _from_reply(await tunnel_request(client, dev, frame, unread=True))


class PlainMqttDoor(_Door):
    """A CBOR map on ``rooms/<room>/up`` at QoS 1: no error channel, outcome counted."""

    name = "mqtt-plain"
    codec = "cbor"
    door = "mqtt"

    async def open(self) -> None:
        self.devices = {}
        for allowed in (True, False):
            rooms = self.rooms if allowed else {"*": ["join"]}
            self.devices[allowed] = await self.stack.enter_async_context(
                mqtt_device(self.node, f"up-{uuid.uuid4().hex[:6]}", rooms=rooms))

    async def publish(self, room: str, event: str, data: Any, msg_id: str | None,
                      *, allowed: bool = True, fields: dict[str, Any] | None = None) -> Outcome:
        before, unread = self._counts(self.door), self._unread()
        body: dict[str, Any] = {"event": event, "data": data}
        if msg_id is not None:
            body["msg_id"] = msg_id
        body.update(fields or {})
        await self.devices[allowed].publish(f"rooms/{room}/up", cbor2.dumps(body), qos=1)
        return await self._counted(self.door, before, unread)


class ApiDoor(_Door):
    """``POST /api/publish`` with a service token (a user token for the case without right:
    the API serves services only, and a service may publish to any room of its tenant)."""

    name = "http-api"

    async def open(self) -> None:
        self.http = await self.stack.enter_async_context(aiohttp.ClientSession())
        self.url = f"http://127.0.0.1:{self.node.http.port}/api/publish"

    async def publish(self, room: str, event: str, data: Any, msg_id: str | None,
                      *, allowed: bool = True, fields: dict[str, Any] | None = None) -> Outcome:
        tok = token("backend", kind="service") if allowed else token("user-not-service")
        body: dict[str, Any] = {"room": room, "event": event, "data": data}
        if msg_id is not None:
            body["msg_id"] = msg_id
        body.update(fields or {})
        text = json.dumps(body)
        async with self.http.post(self.url, data=text, headers={
                "Authorization": f"Bearer {tok}", "Content-Type": "application/json"}) as resp:
            answer = await resp.json()
        if resp.status == 200:
            seq = answer.get("seq")
            return Outcome("stored", seq=seq) if seq is not None else Outcome("volatile")
        return Outcome("refused", answer["code"])


class BrokerDoor(_Door):
    """An uplink through an external broker (Mosquitto) bridged by the node."""

    name = "broker"
    codec = "cbor"
    door = "broker"

    def __init__(self, node: Any, rooms: dict[str, list[str]], broker_port: int) -> None:
        super().__init__(node, rooms)
        self.broker_port = broker_port

    async def open(self) -> None:
        self.client = await self.stack.enter_async_context(
            aiomqtt.Client("127.0.0.1", self.broker_port, identifier=f"s-{uuid.uuid4().hex[:6]}"))

    async def publish(self, room: str, event: str, data: Any, msg_id: str | None,
                      *, allowed: bool = True, fields: dict[str, Any] | None = None) -> Outcome:
        # The broker authenticated the device (named by the topic's last level): the node
        # trusts it with publish rights on the rooms of its tenant, but never on personal rooms
        # (the case without a right).
        before = self._counts(self.door)
        body: dict[str, Any] = {"event": event, "data": data}
        if msg_id is not None:
            body["msg_id"] = msg_id
        body.update(fields or {})
        target = room if allowed else "@user:someone-else"
        unread = self._unread()
        await self.client.publish(f"rooms/{target}/up/sensor-1", cbor2.dumps(body), qos=1)
        return await self._counted(self.door, before, unread)

    def _unread(self) -> int:
        """Uplinks the bridge refused (dropped and counted): with no admission count beside
        it, one its decoder could not read (a tag, a bignum)."""
        return int(self.node.mqtt_external.refused)


DOORS: dict[str, type[_Door]] = {
    door.name: door for door in (WsDoor, WsCborDoor, TunnelDoor, PlainMqttDoor, ApiDoor)
}


def make_door(name: str, node: Any, rooms: dict[str, list[str]], **kw: Any) -> _Door:
    """The door ``name`` (a key of :data:`DOORS`, or ``broker`` with ``broker_port``)."""
    if name == "broker":
        return BrokerDoor(node, rooms, kw["broker_port"])
    return DOORS[name](node, rooms)
