"""What the WebSocket client and the MQTT device share around a :class:`ClientSession`.

:class:`ClientBase` keeps the requests waiting for their replies, retries them with backoff
until a deadline, queues what the application reads in ``events()``, and answers node-sent
rpcs. A transport subclasses it and says how a frame goes out and whether it can go out now;
it feeds each :class:`~devices.client_session.Reply` and
:class:`~devices.client_session.Error` to :meth:`ClientBase._resolve`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import suppress
from typing import Any, Generic, TypeVar

from devices.client_session import (
    ClientClosed,
    ClientError,
    ClientSession,
    ConnectionLost,
    Error,
    Event,
    Reply,
    RequestTimeout,
    RpcRequest,
)

__all__ = ["EVENTS_QUEUE_SIZE", "ClientBase"]

EVENTS_QUEUE_SIZE = 10_000

ItemT = TypeVar("ItemT")


class ClientBase(Generic[ItemT]):
    """Requests, retries, the event queue and rpc answers of one client session.

    Subclasses implement :meth:`_can_send`, :meth:`_send_request`, :meth:`_send_frame`,
    :meth:`_call_rpc` and :meth:`_check_encodable`, and may extend :meth:`_on_end`.

    Args:
        session: The protocol state (ids, rooms, cursors, backoff).
        request_timeout_s: How long one request waits for its reply (and for a connection).
        publish_timeout_s: How long :meth:`publish` retries, across reconnects, in total.
        log: Where failures of rpc handlers are logged.
    """

    def __init__(self, session: ClientSession, request_timeout_s: float,
                 publish_timeout_s: float, log: logging.Logger) -> None:
        self._session = session
        self._request_timeout_s = request_timeout_s
        self._publish_timeout_s = publish_timeout_s
        self._log = log
        # None in the queue wakes the consumers of events() when the client ends.
        self._queue: asyncio.Queue[ItemT | None] = asyncio.Queue(EVENTS_QUEUE_SIZE)
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._connected = asyncio.Event()  # set while connected, and once ended (to wake)
        self._end = asyncio.Event()  # set once ended
        self._started = self._closing = self._ended = False
        self._failure: ClientError | None = None
        self.reconnects = 0  # connections after the first one

    # -- what a transport provides ----------------------------------------------------------

    def _can_send(self) -> bool:
        """Whether a request may be sent now (connected, and the node said ``connected``)."""
        raise NotImplementedError

    async def _send_request(self, frame: dict[str, Any],
                            future: asyncio.Future[dict[str, Any]]) -> None:
        """Send a request whose reply will resolve ``future``.

        Raises:
            ConnectionLost: It could not be sent (or fail ``future`` with it later).
        """
        raise NotImplementedError

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        """Send a frame that has no reply (an rpc answer). Raises ConnectionLost."""
        raise NotImplementedError

    async def _call_rpc(self, req: RpcRequest) -> Any:
        """Run the application's handler of ``req``; ClientError(4004) when there is none."""
        raise NotImplementedError

    def _check_encodable(self, frame: dict[str, Any]) -> None:
        """Raise if ``frame`` cannot be encoded by the transport's codec."""
        raise NotImplementedError

    def _on_end(self) -> None:
        """Called once when the client ends, before the consumers of events() are woken."""

    # -- the end ----------------------------------------------------------------------------

    def _finish(self, failure: ClientError | None) -> None:
        if self._ended:
            return
        self._ended, self._failure = True, failure
        self._fail_waiters(failure or ClientClosed())
        self._connected.set()
        self._end.set()
        self._on_end()
        # If the queue is full, no consumer waits: each finds the end once it is drained.
        with suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    @property
    def failure(self) -> ClientError | None:
        """Why the client ended (e.g. 4010: its token expired and no provider), or None."""
        return self._failure

    async def wait_closed(self) -> None:
        """Wait until the client ends: return after :meth:`close`, raise its failure.

        For an application that only answers rpcs or publishes now and then: run it next to
        the application's work to learn at once that the node refused the device for good.

        Raises:
            ClientError: Why the client ended (4010 expired token, 4001 refused...).
        """
        await self._end.wait()
        if self._failure is not None:
            raise self._failure

    def _fail_waiters(self, exc: ClientError) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(exc)
        self._waiters.clear()

    async def _items(self) -> AsyncIterator[ItemT]:
        """The queued items in arrival order, until the client ends (then its failure)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if self._ended:
                    with suppress(asyncio.QueueFull):
                        self._queue.put_nowait(None)  # wake the next consumer, if any
                    if self._failure is not None:
                        raise self._failure from None
                    return
                item = await self._queue.get()
            if item is not None:
                yield item

    # -- requests ---------------------------------------------------------------------------

    async def publish(
        self, room: str, event: str, data: Any = None, msg_id: str | None = None, *,
        key: str | None = None, unset: bool = False,
    ) -> int | None:
        """Publish an event, retried with the same ``msg_id`` until the node stores it.

        Args:
            key: In a state room, the key the event sets (default: the publisher's own id,
                e.g. a device's id). Elsewhere the node refuses it (4000).
            unset: In a state room, remove ``key`` instead (``data`` is not sent).

        Returns:
            The event's seq, None for volatile events.

        Raises:
            ClientError: A refusal (``retry: false``); RequestTimeout after
                ``publish_timeout_s``.
        """
        mid = msg_id or uuid.uuid4().hex
        reply = await self._retrying(
            lambda: self._session.publish_frame(room, event, data, mid, key, unset),
            self._deadline(self._publish_timeout_s),
        )
        seq = reply.get("seq")
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    async def unset(self, room: str, key: str | None = None, *,
                    event: str = "state:unset") -> int | None:
        """Remove ``key`` (default: the publisher's own id) from a state room; returns the seq."""
        return await self.publish(room, event, key=key, unset=True)

    def values(self, room: str) -> dict[str, Event]:
        """The current values of a state room, key -> its latest event, ordered by key.

        Filled by the ``state`` frame that follows each ``joined`` and kept up to date by the
        room's events (an older seq never replaces a newer one; ``unset`` removes a key).
        Empty for rooms that are not state rooms, or not joined.
        """
        return self._session.values(room)

    async def request(self, frame: Mapping[str, Any]) -> dict[str, Any]:
        """Send any request frame (its ``id`` is assigned) and return its typed reply.

        Raises:
            ClientError: The node answered ``error``; ConnectionLost, RequestTimeout.
        """
        return await self._attempt(
            lambda: self._session.request_frame(frame), self._deadline(self._request_timeout_s)
        )

    def _deadline(self, timeout: float) -> float:
        return asyncio.get_running_loop().time() + timeout

    async def _attempt(self, make: Callable[[], dict[str, Any]], deadline: float) -> dict[str, Any]:
        """Once connected, send the request ``make()`` and await its reply until ``deadline``."""
        while not self._can_send() or self._ended or self._closing:
            if self._ended or self._closing:
                raise self._failure or ClientClosed()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._connected.wait()
                    if not self._can_send():
                        await asyncio.sleep(0.01)
            except TimeoutError:
                raise RequestTimeout("not connected in time") from None
        frame = make()
        rid: int = frame["id"]
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = future
        try:
            await self._send_request(frame, future)
            async with asyncio.timeout_at(deadline):
                return await future
        except TimeoutError as exc:
            if isinstance(exc, ClientError):
                raise
            raise RequestTimeout() from None
        finally:
            self._waiters.pop(rid, None)
            self._session.forget(rid)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: nobody else awaits it

    async def _retrying(
        self, make: Callable[[], dict[str, Any]], deadline: float
    ) -> dict[str, Any]:
        """Attempt until a reply, a refusal (``retry: false``) or ``deadline``."""
        loop, attempt = asyncio.get_running_loop(), 0
        while True:
            try:
                each = min(deadline, loop.time() + self._request_timeout_s)
                return await self._attempt(make, each)
            except ClientClosed:
                raise
            except (ConnectionLost, RequestTimeout) as exc:
                if loop.time() >= deadline:
                    raise RequestTimeout(f"no reply in time ({exc.reason})") from None
            except ClientError as exc:
                if not exc.retry or self._ended or loop.time() >= deadline:
                    raise
                delay = self._session.backoff_delay(attempt, random.random)
                attempt += 1
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))

    async def _rejoin(self, room: str, make: Callable[[], dict[str, Any]]) -> None:
        """Re-join ``room`` on this connection (``make()``: its join with ``since``) until it
        is joined or refused for good. A timeout or a retryable refusal (the room's store
        electing a leader, say) is tried again with backoff for as long as the connection
        lasts: its end cancels this, and the next connection resumes the room. Giving up after
        one request's timeout left the room without events on a connection that otherwise
        worked, until the next reconnect. A second join of a room whose first one was answered
        late is harmless: the node rejoins from the new ``since`` and the session drops what it
        already has. A refusal for good (no right any more) is logged; the session has dropped
        the room."""
        attempt = 0
        while True:
            try:
                await self._retrying(make, self._deadline(self._request_timeout_s))
                return
            except ClientClosed:
                return
            except ClientError as exc:
                if not exc.retry or self._ended or self._closing:
                    self._log.warning("! %s not resumed: %s", room, exc)
                    return
                self._log.info("x %s not resumed yet (%s): trying again", room, exc)
            await asyncio.sleep(self._session.backoff_delay(attempt, random.random))
            attempt += 1

    def _resolve(self, item: Reply | Error) -> bool:
        """Hand a reply or an error to the request waiting for it; False if none waits."""
        future = self._waiters.get(item.id) if isinstance(item.id, int) else None
        if future is None:
            return False
        if not future.done():
            if isinstance(item, Reply):
                future.set_result(item.frame)
            else:
                future.set_exception(item.to_exception())
        return True

    # -- rpcs from the node -----------------------------------------------------------------

    async def _answer_rpc(self, req: RpcRequest) -> None:
        """Run the handler of a node-sent rpc and send its ``result`` or ``error``."""
        session = self._session
        try:
            result = await self._call_rpc(req)
            frame = session.rpc_result_frame(req.id, result)
            self._check_encodable(frame)  # fails here, not when sending, if it cannot be
        except ClientError as exc:
            frame = session.rpc_error_frame(req.id, exc.code, exc.reason)
        except Exception as exc:
            self._log.warning("! rpc %s failed: %r", req.method, exc)
            frame = session.rpc_error_frame(req.id, 4500, str(exc) or type(exc).__name__)
        try:
            await self._send_frame(frame)
        except ConnectionLost:
            self._log.debug("! rpc %s: connection lost before the reply", req.id)
