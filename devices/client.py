"""The asyncio client of rtnode: one WebSocket connection at a time, resumed across reconnects.

The protocol logic is :class:`devices.client_session.ClientSession`; this module opens
connections, feeds the session and waits::

    async with Client("ws://localhost:8080/ws", token=jwt) as c:
        await c.join("chat:lobby")
        await c.publish("chat:lobby", "message", {"text": "hi"})
        async for ev in c.events():
            if isinstance(ev, Resync):
                ...  # events were lost: reload the room (history), then go on
            elif isinstance(ev, StateValues):
                ...  # a state room's current values, right after its join (c.values(room))
            else:
                print(ev.room, ev.seq, ev.data)

Events wait in a queue of at most :data:`EVENTS_QUEUE_SIZE` items. When it is full the reader
waits for the application (backpressure): no event is dropped, replies wait behind events,
and a node that waits too long closes with 4008, after which the client reconnects and
resumes after the last event queued. Consume :meth:`Client.events` in its own task.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from types import TracebackType
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException
from websockets.typing import Subprotocol

from devices.client_base import EVENTS_QUEUE_SIZE, ClientBase
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
    RpcRequest,
    StateValues,
)
from node.protocol.errors import CodecError
from node.protocol.frames import CBOR, JSON, Codec

__all__ = [
    "EVENTS_QUEUE_SIZE",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientState",
    "ConnectionLost",
    "Event",
    "RequestTimeout",
    "Resync",
    "RpcHandler",
    "StateValues",
]

# A batch of the node holds at most its slow-consumer budget (1 MiB) plus one frame.
MAX_MESSAGE_BYTES = 8 * 2**20

logger = logging.getLogger("rtnode.client")

RpcHandler = Callable[[str, Any, dict[str, Any]], Awaitable[Any]]


class ClientState(enum.Enum):
    """Where the client is in its life."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class Client(ClientBase[Event | Resync | StateValues]):
    """An rtnode client: requests, an event stream, automatic reconnect and resume.

    Args:
        url: The node's WebSocket URL (``ws://host:8080/ws``), or several: each reconnect
            tries the next one.
        token: The JWT sent in ``connect``.
        token_provider: Returns a fresh JWT; called when there is no ``token`` and after the
            node refused an expired one (4010). Without it, a 4010 ends the client.
        codec: ``"json"`` (text messages) or ``"cbor"`` (binary messages).
        min_backoff_s: Cap of the first reconnect delay; it doubles at each failed attempt.
        max_backoff_s: Largest cap of a reconnect delay (delays are uniform below the cap).
        request_timeout_s: How long a request waits for its reply (and for a connection).
        publish_timeout_s: How long :meth:`publish` retries, across reconnects, in total.
        client_name: Sent in ``connect`` as ``client.name``.
        open_timeout_s: How long opening a connection and its ``connect`` may take.
        rpc_handler: Answers node-sent rpcs: ``await rpc_handler(method, params, from)``.
        on_state: Called with each new :class:`ClientState`.
        on_resync: Called with each :class:`Resync` (which is also in :meth:`events`).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        token_provider: Callable[[], Awaitable[str]] | None = None,
        codec: Literal["json", "cbor"] = "json",
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
        request_timeout_s: float = 10.0,
        publish_timeout_s: float = 30.0,
        client_name: str = "rtnode-py",
        open_timeout_s: float = 10,
        rpc_handler: RpcHandler | None = None,
        on_state: Callable[[ClientState], None] | None = None,
        on_resync: Callable[[Resync], None] | None = None,
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("a token or a token_provider is needed")
        # Several URLs (nodes behind no load balancer): each reconnect tries the next one.
        self._urls = [url] if isinstance(url, str) else list(url)
        if not self._urls:
            raise ValueError("at least one URL is needed")
        session = ClientSession(
            min_backoff_s=min_backoff_s, max_backoff_s=max_backoff_s, client_name=client_name
        )
        super().__init__(session, request_timeout_s, publish_timeout_s, logger)
        self._url_index = 0
        self._token, self._token_provider = token, token_provider
        self._codec: Codec = CBOR if codec == "cbor" else JSON
        self._subprotocol = Subprotocol(f"rtnode.v1.{codec}")
        self._open_timeout_s = open_timeout_s
        self._rpc_handler, self._on_state, self._on_resync = rpc_handler, on_state, on_resync
        self._ws: ClientConnection | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._rpc_tasks: set[asyncio.Task[None]] = set()
        self.state = ClientState.CONNECTING

    @property
    def client_id(self) -> str | None:
        """The ``client_id`` of the current connection."""
        return self._session.client_id

    @property
    def node(self) -> str | None:
        """The name of the node of the current connection."""
        return self._session.node

    @property
    def connected_info(self) -> dict[str, Any] | None:
        """The ``connected`` frame of the current connection."""
        return self._session.connected_info

    @property
    def rooms(self) -> list[str]:
        """The rooms joined, personal ones included."""
        return self._session.rooms

    def last_seq(self, room: str) -> int:
        """The last seq received in ``room`` (0 when none)."""
        return self._session.last_seq(room)

    # -- life ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        """Open the first connection; a refusal raises :class:`ClientError` at once."""
        if self._started:
            raise RuntimeError("a Client can be entered once")
        self._started = True
        try:
            try:
                ws, leftovers = await self._open()
            except ClientError as exc:
                if exc.code != 4010 or self._token_provider is None:
                    raise
                ws, leftovers = await self._open(new_token=True)
        except BaseException:
            self._finish(None)
            raise
        name = f"rtnode-client[{self._session.client_name}].run"
        self._run_task = asyncio.create_task(self._run(ws, leftovers), name=name)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(1000 if exc_type is None else 1011)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection and stop every task; pending requests get ClientClosed."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close(code, reason)
        me = asyncio.current_task()
        tasks = [t for t in [self._run_task, *self._rpc_tasks] if t is not None and t is not me]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._finish(None)

    def _on_end(self) -> None:
        self._set_state(ClientState.CLOSED)
        for task in self._rpc_tasks:
            task.cancel()

    def _set_state(self, state: ClientState) -> None:
        if state is not self.state:
            logger.debug("= %s", state.value)
            self.state = state
            if self._on_state is not None:
                try:
                    self._on_state(state)
                except Exception:
                    logger.exception("! on_state callback failed")

    async def events(self) -> AsyncIterator[Event | Resync | StateValues]:
        """Every event and :class:`Resync`, in arrival order, until the client ends.

        A state room also gives one :class:`StateValues` right after each join (its current
        values, before its live events); :meth:`values` is kept up to date either way.

        Raises:
            ClientError: The node ended the client (``reconnect: false``, a refused token).
        """
        async for item in self._items():
            yield item

    # -- requests --------------------------------------------------------------------------

    async def join(self, room: str, *, presence: bool = False,
                   rewind: int | None = None) -> dict[str, Any]:
        """Join ``room``; it is re-joined with ``since`` after every reconnect.

        Args:
            room: The room.
            presence: Receive its ``presence:join``/``presence:leave`` events.
            rewind: Replay its last ``rewind`` stored events (1 to 1000) before the live ones,
                with no gap: the events come from :meth:`events` right after the join, and
                ``joined["replayed"]`` counts them. Only while no position is known: a
                re-join after a reconnect resumes with ``since`` instead.

        Returns:
            The ``joined`` frame.
        """
        deadline = self._deadline(self._request_timeout_s)
        return await self._retrying(lambda: self._session.join_frame(room, presence, rewind),
                                    deadline)

    async def leave(self, room: str) -> dict[str, Any]:
        """Leave ``room`` (at once locally: it is never re-joined). Returns ``left``."""
        self._session.drop_room(room)
        if self._ws is not None:
            with suppress(ConnectionLost):  # the next connection does not join it anyway
                deadline = self._deadline(self._request_timeout_s)
                return await self._attempt(lambda: self._session.leave_frame(room), deadline)
        return {"type": "left", "room": room}

    async def history(
        self, room: str, *, since: int | None = None, limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """Stored events of ``room``; returns the ``history`` frame."""
        return await self._attempt(
            lambda: self._session.history_frame(room, since, limit, reverse),
            self._deadline(self._request_timeout_s),
        )

    async def ping(self) -> dict[str, Any]:
        """A ``ping`` round trip; returns ``pong``."""
        return await self.request({"type": "ping"})

    async def ack(self, room: str, seq: int) -> None:
        """Tell the node every event of ``room`` up to ``seq`` was processed.

        Acks are cumulative, so one sent while disconnected is simply dropped.
        """
        if self._ws is not None:
            with suppress(ConnectionLost):
                await self._send([self._session.ack_frame(room, seq)])

    async def _send(self, frames: list[dict[str, Any]], ws: ClientConnection | None = None) -> None:
        ws = self._ws if ws is None else ws
        if ws is None:
            raise ConnectionLost("not connected")
        data = self._codec.join([self._codec.encode(f) for f in frames])
        try:
            await ws.send(data if self._codec.binary else data.decode("utf-8"))
        except ConnectionClosed:
            if self._ws is ws:  # retries then wait for the next connection instead of spinning
                self._ws = None
                self._connected.clear()
            raise ConnectionLost() from None

    # -- ClientBase ---------------------------------------------------------------------------

    def _can_send(self) -> bool:
        return self._ws is not None

    async def _send_request(self, frame: dict[str, Any],
                            future: asyncio.Future[dict[str, Any]]) -> None:
        await self._send([frame])

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        await self._send([frame])

    async def _call_rpc(self, req: RpcRequest) -> Any:
        if self._rpc_handler is None:
            raise ClientError(4004, "no handler")
        return await self._rpc_handler(req.method, req.params, req.from_)

    def _check_encodable(self, frame: dict[str, Any]) -> None:
        self._codec.encode(frame)

    # -- connections -----------------------------------------------------------------------

    async def _open(self, new_token: bool = False) -> tuple[ClientConnection, list[Any]]:
        """Open a connection and do the ``connect`` handshake.

        Returns:
            The connection, and the frames that followed ``connected`` in its message.

        Raises:
            ClientError: Refused (the node's code and ``reconnect`` as ``retry``), or
                ConnectionLost when the node could not be reached.
        """
        if (new_token or self._token is None) and self._token_provider is not None:
            self._token = await self._token_provider()
        elif new_token or self._token is None:
            raise ClientError(4010, "token expired and no token_provider")
        try:
            ws = await connect(
                self._urls[self._url_index], subprotocols=[self._subprotocol],
                open_timeout=self._open_timeout_s,
                max_size=MAX_MESSAGE_BYTES,
            )
        except InvalidURI as exc:
            raise ClientError(4000, f"invalid URL: {exc}") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ConnectionLost(f"cannot connect: {exc}") from None
        try:
            if self._codec.binary and ws.subprotocol != self._subprotocol:
                raise ClientError(4000, f"the node does not speak {self._subprotocol}")
            async with asyncio.timeout(self._open_timeout_s):
                await self._send([self._session.connect_frame(self._token)], ws)
                while True:
                    frames = self._codec.decode(await ws.recv())
                    for i, raw in enumerate(frames):
                        for item in self._session.receive(raw):
                            if isinstance(item, Connected):
                                logger.debug("= connected %s to %s", self.client_id, self.node)
                                return ws, frames[i + 1 :]
                            if isinstance(item, Disconnect):
                                raise ClientError(item.code, item.reason, item.reconnect)
                            if isinstance(item, Error):
                                raise item.to_exception()
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, ConnectionClosed):
                out = self._close_outcome(exc)
                raise ClientError(out.code, out.reason, out.reconnect) from None
            if isinstance(exc, TimeoutError | CodecError):
                raise ConnectionLost(f"no connected frame: {exc!r}") from None
            raise

    def _close_outcome(self, exc: ConnectionClosed) -> Disconnect:
        rcvd = exc.rcvd
        return self._session.close_outcome(rcvd.code if rcvd else None, rcvd.reason if rcvd else "")

    def _may_reconnect(self, reconnect: bool, expired: bool) -> bool:
        # An expired token (4010) is worth a new connection only with a new token.
        return self._token_provider is not None if expired else reconnect

    async def _run(self, ws: ClientConnection, leftovers: list[Any]) -> None:
        """Serve connections one after another until the client ends."""
        try:
            while True:
                outcome = await self._serve(ws, leftovers)
                if self._closing:
                    return
                logger.info("x disconnected: %s %s", outcome.code, outcome.reason)
                expired = outcome.code == 4010
                if not self._may_reconnect(outcome.reconnect, expired):
                    raise ClientError(outcome.code, outcome.reason)
                ws, leftovers = await self._reconnect(expired)
        except ClientError as exc:
            self._finish(exc)
        except Exception as exc:
            logger.exception("! client failed")
            self._finish(ClientError(4500, f"client failed: {exc!r}"))

    async def _reconnect(self, expired: bool) -> tuple[ClientConnection, list[Any]]:
        """Open a new connection, with backoff and full jitter before each attempt."""
        self._set_state(ClientState.RECONNECTING)
        attempt = 0
        while True:
            await asyncio.sleep(self._session.backoff_delay(attempt, random.random))
            attempt += 1
            self._url_index = (self._url_index + 1) % len(self._urls)
            try:
                result = await self._open(new_token=expired)
            except ClientError as exc:
                logger.debug("! reconnect attempt %d: %s", attempt, exc)
                expired = exc.code == 4010
                if not self._may_reconnect(exc.retry, expired):
                    raise
                continue
            except Exception:
                logger.exception("! token_provider failed")  # tried again after backoff
                continue
            self.reconnects += 1
            return result

    async def _serve(self, ws: ClientConnection, leftovers: list[Any]) -> Disconnect:
        """Read one connection until it ends; its requests then fail with ConnectionLost."""
        self._ws = ws
        self._set_state(ClientState.CONNECTED)
        self._connected.set()
        resume = asyncio.create_task(self._resume(), name="rtnode-client.resume")
        refresh = asyncio.create_task(self._refresh(), name="rtnode-client.refresh")
        try:
            return await self._read(ws, leftovers)
        finally:
            self._ws = None
            if not self._ended:
                self._connected.clear()
            resume.cancel()
            refresh.cancel()
            await asyncio.wait([resume, refresh])
            self._session.connection_lost()
            self._fail_waiters(ConnectionLost())
            await ws.close()

    async def _refresh(self) -> None:
        """Refresh the token ahead of its expiry (at 3/4 of its life) through token_provider."""
        if self._token_provider is None:
            return
        expires = (self.connected_info or {}).get("expires_in_s")
        while isinstance(expires, int | float):
            await asyncio.sleep(max(0.1, expires * 0.75))
            try:
                self._token = await self._token_provider()
                reply = await self.request({"type": "refresh", "token": self._token})
            except ClientError as exc:
                logger.warning("! token refresh failed: %s", exc)
                return
            except Exception:
                logger.exception("! token_provider failed")
                return
            expires = reply.get("expires_in_s")

    async def _resume(self) -> None:
        """Re-join every room with ``since`` (:meth:`ClientBase._rejoin`: until joined or
        refused for good)."""

        async def rejoin(frame: dict[str, Any]) -> None:
            room, presence, built = frame["room"], frame.get("presence") is True, [frame]

            def make() -> dict[str, Any]:
                return built.pop() if built else self._session.join_frame(room, presence)

            await self._rejoin(room, make)

        await asyncio.gather(*(rejoin(f) for f in self._session.rejoin_frames()))

    async def _read(self, ws: ClientConnection, frames: list[Any]) -> Disconnect:
        """Feed every frame to the session and act on the results, until the end."""
        while True:
            for raw in frames:
                for item in self._session.receive(raw):
                    if isinstance(item, Disconnect):
                        return item
                    if isinstance(item, Reply | Error) and self._resolve(item):
                        continue
                    if isinstance(item, Error):
                        logger.warning("! error %s %s (id %s)", item.code, item.reason, item.id)
                    elif isinstance(item, Event | Resync | StateValues):
                        if isinstance(item, Resync) and self._on_resync is not None:
                            try:
                                self._on_resync(item)
                            except Exception:
                                logger.exception("! on_resync callback failed")
                        await self._queue.put(item)  # backpressure: see the module docstring
                    elif isinstance(item, RpcRequest):
                        name = f"rtnode-client.rpc[{item.id}]"
                        task = asyncio.create_task(self._answer_rpc(item), name=name)
                        self._rpc_tasks.add(task)
                        task.add_done_callback(self._rpc_tasks.discard)
            try:
                message = await ws.recv()
            except ConnectionClosed as exc:
                return self._close_outcome(exc)
            try:
                frames = self._codec.decode(message)
            except CodecError as exc:
                logger.warning("! undecodable message from the node: %s", exc.reason)
                return Disconnect(1002, "undecodable message", reconnect=True)
