"""A paho-mqtt device for tests: paho's network loop in its own thread, feeding asyncio.

``PahoDevice(dev, port, clean=False)`` connects as the device ``dev`` (its device token as the
password); ``await start()`` gives the CONNACK's (session present, return code), ``await
subscribe(topics)`` the SUBACK's codes. Each message lands in ``messages`` with the time it
came (``time.monotonic()``); ``gone`` is set when the connection ends. With ``manual_ack`` the
test PUBACKs (``client.ack(mid, qos)``) what it has recorded: with paho's own PUBACK (after
``on_message`` returns, in paho's thread) a DISCONNECT sent from the test's thread could go
first, and a resend of that message would then be legitimate.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import cbor2
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.wsclient import token

__all__ = ["PahoDevice"]


class PahoDevice:
    """One paho-mqtt connection of device ``dev`` to the node's MQTT ``port`` (no reconnects
    of paho's own: a test opens a new one)."""

    def __init__(self, dev: str, port: int, *, clean: bool, manual_ack: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=dev,
                                  clean_session=clean, reconnect_on_failure=False)
        self.client.username_pw_set(dev, token(dev, kind="device"))
        if manual_ack:
            self.client.manual_ack_set(True)
        self.connack: asyncio.Future[tuple[bool, int]] = self.loop.create_future()
        self.suback: asyncio.Future[list[int]] = self.loop.create_future()
        self.gone = asyncio.Event()
        self.messages: asyncio.Queue[tuple[paho.MQTTMessage, float]] = asyncio.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    @staticmethod
    def _settle(future: asyncio.Future[Any], value: Any) -> None:
        if not future.done():
            future.set_result(value)

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        result = (bool(flags.session_present), int(rc.value))
        self.loop.call_soon_threadsafe(self._settle, self.connack, result)

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        granted = [int(code.value) for code in codes]
        self.loop.call_soon_threadsafe(self._settle, self.suback, granted)

    def _on_message(self, c: Any, u: Any, m: paho.MQTTMessage) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (m, time.monotonic()))

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.loop.call_soon_threadsafe(self.gone.set)

    async def start(self) -> tuple[bool, int]:
        """Connect; (session present, CONNACK return code)."""
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self.port, 30)
        self.client.loop_start()
        return await asyncio.wait_for(self.connack, 10)

    async def subscribe(self, topics: list[str], qos: int = 1) -> list[int]:
        self.client.subscribe([(t, qos) for t in topics])
        return await asyncio.wait_for(self.suback, 10)

    async def seqs(self, n: int, timeout: float = 30.0) -> list[int]:
        """The seqs of the next ``n`` messages, each a QoS 1 PUBLISH of an event."""
        out: list[int] = []
        async with asyncio.timeout(timeout):
            while len(out) < n:
                m, _ = await self.messages.get()
                assert m.qos == 1, f"QoS 1 PUBLISH expected, got {m.qos}"
                out.append(int(cbor2.loads(m.payload)["seq"]))
        return out

    async def stop(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)
