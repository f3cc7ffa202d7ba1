"""The device SDK: an rtnode device over MQTT, through the protocol tunnel (PROTOCOL.md 6.1).

A :class:`Device` speaks the frames of PROTOCOL.md section 1 as CBOR, one per MQTT PUBLISH, on
``rtnode/v1/<id>/in`` (QoS 1) and reads the node's frames on ``rtnode/v1/<id>/out``
(subscribed with QoS 1). The protocol state (request ids, rooms, cursors, backoff) is the
WebSocket client's :class:`devices.client_session.ClientSession`; this module does the MQTT I/O
around it::

    async with Device("127.0.0.1", 1883, "thermo-1", token=jwt,
                      state_file=Path("thermo-1.json")) as d:

        @d.rpc("set_temp")
        async def set_temp(params, from_):
            return {"ok": True}

        await d.join("cmd:thermo-1")
        seq = await d.publish("sensors:lab", "reading", {"t": 21.5})
        async for ev in d.events():
            ...  # event frames (dicts), and Resync when a resume was impossible

aiomqtt never reconnects by itself: the device does, with exponential backoff and full jitter,
and after each reconnect it subscribes its ``out`` topic again, sends ``connect`` (answered with
``connected`` once the node has registered the device for rpc), and re-joins each room it
joined with ``since`` = its cursor. Cursors are kept in ``state_file`` so that a restarted
process resumes where the previous one stopped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt
import cbor2
import jwt
from aiomqtt.exceptions import MqttConnectError

from devices.client_base import ClientBase
from devices.client_session import (
    ClientClosed,
    ClientError,
    ClientSession,
    Connected,
    ConnectionLost,
    Disconnect,
    Error,
    Event,
    Reply,
    RequestTimeout,
    Resync,
    RoomState,
    RpcRequest,
    StateValues,
)
from devices.cursors import CursorStore
from node.protocol.ids import ID_RULE, is_valid_id

__all__ = [
    "ClientClosed",
    "ClientError",
    "ConnectionLost",
    "Device",
    "RequestTimeout",
    "Resync",
    "RpcHandlerFn",
]

log = logging.getLogger("rtnode.device")

RpcHandlerFn = Callable[[Any, dict[str, Any]], Awaitable[Any]]
TokenProvider = Callable[[], Awaitable[str]]

# CONNACK codes that mean "your credentials": 4 bad user name or password, 5 not authorized
# (MQTT 3.1.1), 134/135 their MQTT 5 spellings.
_AUTH_REFUSED = frozenset({4, 5, 134, 135})


class _DeviceSession(ClientSession):
    """A ClientSession that can resume rooms whose cursor comes from a state file."""

    def seed(self, room: str, seq: int, epoch: str) -> None:
        """Know ``room`` as joined at ``seq`` of ``epoch``: its next join carries ``since``."""
        if room not in self._rooms:
            self._rooms[room] = RoomState(last_seq=seq, epoch=epoch, joined=True)

    def epoch(self, room: str) -> str | None:
        state = self._rooms.get(room)
        return None if state is None else state.epoch


def _retrieve_disconnect_error(client: aiomqtt.Client) -> None:
    """Mark the error of a connection the node closed as retrieved.

    aiomqtt (2.5) sets it on its private ``_disconnected`` future and, when the broker closed
    first, its ``__aexit__`` returns without looking at it: asyncio then logs "Future exception
    was never retrieved" when the future is collected. We know the connection ended (that is
    why we are here), so the error says nothing more.
    """
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()


def _claim_exp(token: str) -> float | None:
    """The ``exp`` of a JWT, read without checking it (the node does); None if none."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def _expired_since(token: str) -> float | None:
    """Seconds since ``token`` expired, or None while it is valid (or has no exp)."""
    exp = _claim_exp(token)
    if exp is None or exp > time.time():
        return None
    return time.time() - exp


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _duration(seconds: float) -> str:
    s = int(abs(seconds))
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def _expired_error(ago: float) -> ClientError:
    return ClientError(4010, f"token expired {_duration(ago)} ago and no token_provider: give "
                             "the device a new token ('rtnode token --kind device' lasts 365 "
                             "days by default) or a token_provider")


def _code_int(rc: Any) -> int:
    """An MQTT return code (an int, or paho's ReasonCode) as an int; -1 if it is neither."""
    try:
        return int(getattr(rc, "value", rc))
    except (TypeError, ValueError):
        return -1


class Device(ClientBase[tuple[dict[str, Any] | Resync, str | None]]):
    """One rtnode device: requests over the MQTT tunnel, an event stream, rpc handlers.

    Args:
        host: The node's MQTT host.
        port: The node's MQTT port.
        device_id: The device id: MQTT client id, user name and the token's ``sub``.
        token: The device JWT (``kind: device``), the MQTT password. Without a
            ``token_provider``, the device ends when it expires (or at once if it has):
            :class:`ClientError` 4010 from requests, :meth:`events` and :meth:`wait_closed`,
            with no connection attempt after that.
        token_provider: Returns a fresh JWT; used when there is no ``token``, after the node
            refused the current one, and after a 4010 (token expired).
        state_file: Where the per-room cursors {seq, epoch} are kept (JSON, replaced
            atomically, written at most every 100 ms and on close); None keeps them in memory.
        min_backoff_s: Cap of the first reconnect delay; it doubles at each failed attempt.
        max_backoff_s: Largest cap of a reconnect delay (delays are uniform below the cap).
        keepalive: MQTT keepalive in seconds.
        request_timeout_s: How long one request waits for its reply.
        publish_timeout_s: How long :meth:`publish` retries, across reconnects, in total.

    Raises:
        ValueError: No token nor provider, or a device id outside the id grammar
            (``node.protocol.ids``), which no node accepts.
    """

    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        state_file: Path | None = None,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
        keepalive: int = 30,
        request_timeout_s: float = 10.0,
        publish_timeout_s: float = 30.0,
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("a token or a token_provider is needed")
        if not is_valid_id(device_id):  # the node would refuse it (CONNACK 2) on every try
            raise ValueError(f"device_id must be {ID_RULE}, got {device_id!r}")
        # The queue holds events with the epoch they were received in.
        self._session: _DeviceSession = _DeviceSession(
            min_backoff_s=min_backoff_s, max_backoff_s=max_backoff_s, client_name="rtnode-device"
        )
        super().__init__(self._session, request_timeout_s, publish_timeout_s, log)
        self.host, self.port, self.device_id = host, port, device_id
        self.keepalive = keepalive
        self.state_file = state_file
        self._token, self._token_provider = token, token_provider
        self._topic_in = f"rtnode/v1/{device_id}/in"
        self._topic_out = f"rtnode/v1/{device_id}/out"
        self._handlers: dict[str, RpcHandlerFn] = {}
        self._client: aiomqtt.Client | None = None
        self._hello: asyncio.Future[None] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rooms: dict[str, bool] = {}  # rooms joined by this process -> presence
        self._connections = 0
        # Cursors of the events handed to the application (what a restart resumes from).
        self._cursors = CursorStore(device_id, state_file)

    def cursor(self, room: str) -> dict[str, Any] | None:
        """The {seq, epoch} of the last event of ``room`` handed to the application."""
        return self._cursors.get(room)

    # -- life --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the device has a connection that the node answered with ``connected``."""
        return self._client is not None and self._connected.is_set() and not self._ended

    async def __aenter__(self) -> Device:
        """Start connecting (in the background: a device starts even with the node away)."""
        if self._started:
            raise RuntimeError("a Device can be entered once")
        self._started = True
        self._run_task = asyncio.create_task(self._run(), name=f"device[{self.device_id}]")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the device is connected (raises TimeoutError, or the device's failure)."""
        async with asyncio.timeout(timeout):
            while not self.connected:
                if self._ended:
                    raise self._failure or ClientClosed()
                await self._connected.wait()
                if not self.connected and not self._ended:
                    await asyncio.sleep(0)

    async def close(self) -> None:
        """Disconnect (MQTT DISCONNECT), stop every task, and write the state file."""
        self._closing = True
        me = asyncio.current_task()
        tasks = [t for t in [self._run_task, *self._tasks] if t is not None and t is not me]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._finish(None)

    def _on_end(self) -> None:
        self._cursors.flush()

    # -- the application's side ----------------------------------------------------------------

    def rpc(self, method: str) -> Callable[[RpcHandlerFn], RpcHandlerFn]:
        """Register ``async handler(params, from_) -> result`` for node-sent rpcs ``method``.

        A handler that raises :class:`ClientError` answers its code; any other exception is
        4500. Methods without a handler are answered 4004.
        """

        def register(fn: RpcHandlerFn) -> RpcHandlerFn:
            self._handlers[method] = fn
            return fn

        return register

    async def events(self) -> AsyncIterator[dict[str, Any] | Resync]:
        """Event frames (dicts) and :class:`Resync` notices, in order, until the device ends.

        A state room also gives its ``state`` frame (``{"type": "state", "room", "values"}``)
        right after each join; :meth:`values` holds the room's current values either way.

        Each event handed out moves the room's saved cursor; duplicates (seq at or below the
        cursor) never appear.

        Raises:
            ClientError: The node refused the device for good (token, rights).
        """
        async for value, epoch in self._items():
            if isinstance(value, Resync):
                self._cursors.set(value.room, value.seq, value.epoch)
            else:
                seq = value.get("seq")
                if isinstance(seq, int) and isinstance(value.get("room"), str):
                    self._cursors.set(value["room"], seq, epoch)
            yield value

    async def join(self, room: str, *, presence: bool = False,
                   rewind: int | None = None) -> dict[str, Any]:
        """Join ``room`` (resumed from the state file's cursor when it has one).

        The room is re-joined with ``since`` after every reconnect.

        Args:
            room: The room.
            presence: Receive its presence events.
            rewind: Without a saved cursor, replay the room's last ``rewind`` stored events
                (1 to 1000) first, then live ones with no gap (``joined["replayed"]`` counts
                them); with one, the saved cursor wins and the join resumes exactly.

        Returns:
            The ``joined`` frame (``recovered`` tells whether a resume replayed everything).
        """
        saved = self._cursors.get(room)
        if saved is not None and room not in self._rooms:
            self._session.seed(room, saved["seq"], saved["epoch"])
        reply = await self._retrying(
            lambda: self._session.join_frame(room, presence, rewind),
            self._deadline(self._request_timeout_s),
        )
        self._rooms[room] = presence
        rewound = isinstance(reply.get("replayed"), int) and reply["replayed"] > 0
        if reply.get("recovered") is not True and room not in self._cursors and not rewound:
            # A first join starts at the room's latest seq: a restart resumes from there (a
            # rewind's events, handed out by events(), move the cursor themselves).
            seq = reply.get("seq")
            self._cursors.set(room, seq if isinstance(seq, int) else 0,
                              self._session.epoch(room))
        return reply

    async def report(self, room: str, data: Any, *, key: str | None = None,
                     event: str = "reported") -> int | None:
        """Publish ``data`` as this device's value in the state room ``room``.

        The key defaults to the device id (the node's default), so a fleet room holds each
        device's latest report; returns the event's seq.
        """
        return await self.publish(room, event, data, key=key)

    async def leave(self, room: str) -> dict[str, Any]:
        """Leave ``room``; it is not re-joined, and its saved cursor is forgotten."""
        self._rooms.pop(room, None)
        self._cursors.forget(room)
        self._session.drop_room(room)
        return await self._attempt(lambda: self._session.leave_frame(room),
                                   self._deadline(self._request_timeout_s))

    # -- requests ----------------------------------------------------------------------------

    def _can_send(self) -> bool:
        return self._client is not None and self._connected.is_set()

    async def _send_request(self, frame: dict[str, Any],
                            future: asyncio.Future[dict[str, Any]]) -> None:
        # The reply, not the PUBACK, is what counts: a lost connection fails the future at
        # once (aiomqtt would wait for the PUBACK until its own timeout).
        sending = self._spawn(self._send(frame, self._client))
        sending.add_done_callback(lambda t: self._send_done(t, future))

    @staticmethod
    def _send_done(task: asyncio.Task[Any], future: asyncio.Future[dict[str, Any]]) -> None:
        if task.cancelled():
            exc: BaseException | None = ConnectionLost("send cancelled")
        else:
            exc = task.exception()
        if exc is not None and not future.done():
            future.set_exception(exc if isinstance(exc, ClientError) else ConnectionLost())

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        await self._send(frame)

    async def _call_rpc(self, req: RpcRequest) -> Any:
        handler = self._handlers.get(req.method)
        if handler is None:
            raise ClientError(4004, f"unknown method {req.method!r}"[:120])
        return await handler(req.params, req.from_)

    def _check_encodable(self, frame: dict[str, Any]) -> None:
        cbor2.dumps(frame)

    async def _send(self, frame: dict[str, Any], client: aiomqtt.Client | None = None) -> None:
        client = self._client if client is None else client
        if client is None:
            raise ConnectionLost("not connected")
        try:
            await client.publish(self._topic_in, cbor2.dumps(frame), qos=1,
                                 timeout=self._request_timeout_s)
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"publish failed: {exc}") from None

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- connections -------------------------------------------------------------------------

    async def _token_for(self, fresh: bool) -> str:
        if (fresh or self._token is None) and self._token_provider is not None:
            self._token = await self._token_provider()
        elif self._token is None:
            raise ClientError(4010, "token expired and no token_provider")
        elif self._token_provider is None:
            # An expired token without a provider can only be refused: end now, saying so,
            # rather than connect to be refused (CONNACK 5 does not say why).
            expired = _expired_since(self._token)
            if expired is not None:
                raise _expired_error(expired)
        return self._token

    def _refused(self, exc: MqttConnectError) -> ClientError:
        """The failure of a CONNACK "not authorized" that ends the device."""
        assert self._token is not None
        expired = _expired_since(self._token)
        if expired is not None:
            return _expired_error(expired)
        return ClientError(4001, f"MQTT connect refused: {exc} (the node's log says why: "
                                 "'x token refused (mqtt <device id>): ...')")

    def _warn_expiry(self, token: str) -> None:
        exp = _claim_exp(token)
        if self._token_provider is None and exp is not None:
            log.info("= %s: token valid until %s (%s); without a token_provider the device "
                     "ends then (ClientError 4010)", self.device_id, _iso(exp),
                     _duration(exp - time.time()))

    async def _run(self) -> None:
        """Connect, serve, and reconnect with backoff and full jitter, until closed."""
        attempt, fresh = 0, False
        try:
            while not self._closing:
                if attempt:
                    await asyncio.sleep(self._session.backoff_delay(attempt - 1, random.random))
                attempt += 1
                token = await self._token_for(fresh)
                used_fresh, fresh = fresh, False
                client = aiomqtt.Client(
                    self.host, self.port, identifier=self.device_id, username=self.device_id,
                    password=token, keepalive=self.keepalive, timeout=self._request_timeout_s,
                )
                try:
                    try:
                        async with client:
                            attempt = 1  # connected: the next delay starts from the first cap
                            outcome = await self._serve(client, token)
                    finally:
                        _retrieve_disconnect_error(client)
                except MqttConnectError as exc:
                    if _code_int(exc.rc) not in _AUTH_REFUSED:
                        log.info("x %s: refused (%s), retrying", self.device_id, exc)
                        continue
                    if self._token_provider is None or used_fresh:
                        raise self._refused(exc) from None
                    fresh = True  # maybe only expired: try once with a new token
                    continue
                except aiomqtt.MqttError as exc:
                    log.info("x %s: connection lost: %s", self.device_id, exc)
                    continue
                if outcome is None or self._closing:
                    continue
                log.info("x %s: disconnected: %s %s", self.device_id, outcome.code,
                         outcome.reason)
                if outcome.code == 4010:
                    if self._token_provider is None:
                        raise _expired_error(_expired_since(token) or 0.0)
                    fresh = True
                elif not outcome.reconnect:
                    raise ClientError(outcome.code, outcome.reason)
        except ClientError as exc:
            self._finish(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("! device %s failed", self.device_id)
            self._finish(ClientError(4500, f"device failed: {exc!r}"))

    async def _serve(self, client: aiomqtt.Client, token: str) -> Disconnect | None:
        """One connection: subscribe, ``connect``, resume rooms, read until it ends."""
        granted = await client.subscribe(self._topic_out, qos=1)
        if any(_code_int(code) >= 0x80 for code in granted):
            raise ClientError(4003, f"subscription to {self._topic_out} refused")
        loop = asyncio.get_running_loop()
        hello: asyncio.Future[Any] = loop.create_future()
        self._hello = hello
        reader = asyncio.create_task(self._read(client), name=f"device[{self.device_id}].read")
        resume: asyncio.Task[None] | None = None
        try:
            await self._send(self._session.connect_frame(token), client)
            waits: set[asyncio.Future[Any]] = {hello, reader}
            done, _ = await asyncio.wait(waits, timeout=self._request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                return reader.result()
            if not done:
                raise aiomqtt.MqttError("no connected frame in time")
            self._client = client
            self._connected.set()
            if not self._connections:
                self._warn_expiry(token)
            self._connections += 1
            self.reconnects = self._connections - 1
            resume = asyncio.create_task(self._resume(), name=f"device[{self.device_id}].resume")
            return await reader
        except ConnectionLost as exc:
            raise aiomqtt.MqttError(exc.reason) from None
        finally:
            self._client = None
            if not self._ended:
                self._connected.clear()
            for task in (reader, resume):
                if task is not None and not task.done():
                    task.cancel()
            pending: list[asyncio.Task[Any]] = [reader] if resume is None else [reader, resume]
            await asyncio.wait(pending)
            if not self._hello.done():
                self._hello.cancel()
            self._session.connection_lost()
            self._fail_waiters(ConnectionLost())

    async def _resume(self) -> None:
        """Re-join every room this process joined, with ``since`` = its cursor, until joined
        or refused for good (:meth:`ClientBase._rejoin`)."""

        async def rejoin(room: str, presence: bool) -> None:
            await self._rejoin(room, lambda: self._session.join_frame(room, presence))

        await asyncio.gather(*(rejoin(r, p) for r, p in list(self._rooms.items())))

    async def _read(self, client: aiomqtt.Client) -> Disconnect:
        """Feed each frame of the ``out`` topic to the session and act on it."""
        async for message in client.messages:
            if str(message.topic) != self._topic_out:
                continue
            payload = message.payload
            try:
                raw = cbor2.loads(bytes(payload) if isinstance(payload, bytes | bytearray)
                                  else b"")
            except (cbor2.CBORDecodeError, ValueError) as exc:
                log.warning("! %s: undecodable frame from the node: %s", self.device_id, exc)
                continue
            for item in self._session.receive(raw):
                if isinstance(item, Disconnect):
                    return item
                if isinstance(item, Connected):
                    if self._hello is not None and not self._hello.done():
                        self._hello.set_result(None)
                elif isinstance(item, Reply | Error) and self._resolve(item):
                    continue
                elif isinstance(item, Error):
                    log.warning("! %s: error %s %s (id %s)", self.device_id, item.code,
                                item.reason, item.id)
                elif isinstance(item, Event):
                    await self._queue.put((raw, self._session.epoch(item.room)))
                elif isinstance(item, Resync):
                    await self._queue.put((item, item.epoch))
                elif isinstance(item, StateValues):
                    await self._queue.put((raw, self._session.epoch(item.room)))
                elif isinstance(item, RpcRequest):
                    self._spawn(self._answer_rpc(item))
        return Disconnect(1006, "connection closed", True)
