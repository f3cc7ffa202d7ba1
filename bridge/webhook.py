"""Webhooks: every event a durable replay consumer yields, POSTed as JSON to an HTTP endpoint.

:func:`post_events` is the delivery loop, for any :class:`bridge.replay.ReplayConsumer`::

    async with ReplayConsumer(nc, rooms="orders:*", durable="billing-hook") as consumer:
        await post_events(consumer, "https://billing.example/rtnode", secret=key)

:class:`WebhookRunner` runs one such loop for ever (the node's ``[[webhooks]]`` setting): a
failure is logged in one line and the loop starts again after a pause, so that a webhook never
takes its node down. docs/webhooks.md is the receiver's side of the contract.

Design, in short:

* **One POST per event**, body :func:`webhook_body`, headers ``Rtnode-Event-Id``
  (``<tenant>/<room>/<seq>``: the same on every attempt, for idempotent receivers),
  ``Rtnode-Delivery-Attempt`` (the consumer's delivery count), ``Rtnode-Timestamp`` and, with a
  secret, ``Rtnode-Signature: sha256=<HMAC-SHA256 of "<timestamp>.<body>">``.
* **Settling.** A 2xx acks the event. Anything else (another status, 3xx included: redirects
  are not followed; a timeout; a connection error) naks it with a delay drawn uniformly from
  ``[0, min(backoff_max_s, backoff_s * 2**(attempt-1))]`` (exponential backoff, full jitter),
  and the consumer dead-letters it after its ``max_deliver``. 410 Gone is not special: a
  receiver that wants to skip an event answers 2xx; terminating events on 410 would drop them
  without a trace when an endpoint is misconfigured, a dead letter keeps them.
* **Order and concurrency.** At most ``concurrency`` POSTs are in flight; a slot is taken
  *before* the next event is pulled, so that the consumer is never drained into memory. Events
  of different rooms are posted concurrently; the consumer's ``serial_rooms`` (which
  :func:`post_events` turns on) never yields an event of a room while an earlier one of that
  room is unsettled, and its ``on_retry="block"`` brings a nakked event back before the later
  ones of its room: each room stays in order, retries included.
* **Slow receivers.** The consumer marks every event it handed out in progress every
  ``ack_wait_s / 3``: a slow POST is not redelivered under itself.
* **Logs.** Failures are counted and logged at most once per :data:`LOG_EVERY_S` per runner, with
  the URL without credentials or query; the secret is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from nats.aio.client import Client as NATS

from bridge.replay import ReplayConsumer, ReplayEvent
from node.protocol.frames import JSON

__all__ = [
    "LOG_EVERY_S",
    "WebhookRunner",
    "backoff_delay",
    "post_events",
    "redact_url",
    "sign",
    "webhook_body",
]

log = logging.getLogger("bridge.webhook")

#: At most one failure summary per runner in this many seconds.
LOG_EVERY_S = 10.0
_USER_AGENT = "rtnode-webhook"


def webhook_body(ev: ReplayEvent) -> bytes:
    """The JSON body POSTed for ``ev``: tenant, room, seq, event, data, ts, from, msg_id; and
    in a state room key (and unset: true when the event removes it)."""
    body = {"tenant": ev.tenant, **ev.as_map()}  # the event as members get it
    body.setdefault("msg_id", None)  # always in a webhook body: null without one
    return JSON.encode(body)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``Rtnode-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of ``<timestamp>.<body>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def backoff_delay(attempt: int, backoff_s: float, backoff_max_s: float) -> float:
    """The nak delay after failed attempt ``attempt`` (1 the first time): full jitter over
    ``backoff_s * 2**(attempt-1)``, capped at ``backoff_max_s``."""
    exponent = min(max(attempt, 1) - 1, 62)  # 2**62 s is past any cap; avoids huge floats
    return random.uniform(0.0, min(backoff_max_s, backoff_s * 2.0**exponent))


def redact_url(url: str) -> str:
    """``url`` fit for a log line: no user, password, query or fragment (they may hold keys)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _FailureLog:
    """Counts failed deliveries; logs one summary line per :data:`LOG_EVERY_S` at most."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self.last = ""
        self._next_at = 0.0

    def failed(self, ev: ReplayEvent, why: str) -> None:
        self.count += 1
        self.last = f"{ev.room} seq {ev.seq} attempt {ev.delivered}: {why}"
        now = time.monotonic()
        if now >= self._next_at:
            self._next_at = now + LOG_EVERY_S
            log.warning("! webhook %s: %d failed deliveries (last: %s)", self.where, self.count,
                        self.last)
            self.count = 0


async def _deliver(
    ev: ReplayEvent, session: aiohttp.ClientSession, url: str, secret: str | None,
    timeout_s: float, backoff_s: float, backoff_max_s: float, failures: _FailureLog,
) -> None:
    body = webhook_body(ev)
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": _USER_AGENT,
        "Rtnode-Event-Id": f"{ev.tenant}/{ev.room}/{ev.seq}",
        "Rtnode-Delivery-Attempt": str(ev.delivered),
        "Rtnode-Timestamp": stamp,
    }
    if secret:
        headers["Rtnode-Signature"] = sign(secret, stamp, body)
    why: str | None
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, data=body, headers=headers,
                                    allow_redirects=False) as resp:
                status = resp.status
        why = None if 200 <= status < 300 else f"HTTP {status}"
    except TimeoutError:
        why = f"no answer within {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if why is None:
        await ev.ack()
        return
    failures.failed(ev, why)
    await ev.nak(backoff_delay(ev.delivered, backoff_s, backoff_max_s))


async def post_events(
    consumer: ReplayConsumer,
    url: str,
    *,
    secret: str | None = None,
    concurrency: int = 16,
    timeout_s: float = 10.0,
    backoff_s: float = 1.0,
    backoff_max_s: float = 300.0,
    session: aiohttp.ClientSession | None = None,
) -> None:
    """POST every event of ``consumer`` to ``url`` until the consumer ends or this is cancelled.

    Each event is acked on a 2xx answer and nakked with a backoff delay otherwise (see the
    module's docstring). When this returns or is cancelled no POST is in flight: the events
    whose POST was cut short are still unsettled, and closing the consumer naks them.

    Args:
        consumer: An open consumer (its ``serial_rooms`` is turned on; with its default
            ``on_retry="block"``, each room is posted in order, retries included).
        url: The endpoint (http or https).
        secret: The HMAC key of ``Rtnode-Signature`` (None: no signature header).
        concurrency: POSTs in flight at most.
        timeout_s: Time allowed for one POST, from connecting to the status line.
        backoff_s: The first retry's maximum delay; it doubles with every attempt.
        backoff_max_s: The cap of the retry delay.
        session: An aiohttp client session to use (left open); default: one of our own.

    Raises:
        ValueError: An invalid argument.
        ReplayError: The consumer cannot go on (its connection closed).
    """
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise ValueError(f"invalid webhook URL {redact_url(url)!r}: http(s)://host/...")
    if concurrency < 1 or timeout_s <= 0 or backoff_s < 0 or backoff_max_s < 0:
        raise ValueError("concurrency and timeout_s must be > 0, backoff_s and backoff_max_s >= 0")
    own = session is None
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=None),  # asyncio.timeout(timeout_s) per POST
        )
    # Concurrent POSTs keep each room in order only if the consumer holds a room's next event
    # until the previous one is settled. Read per event: safe to turn on between events.
    consumer.serial_rooms = True
    failures = _FailureLog(redact_url(url))
    slots = asyncio.Semaphore(concurrency)
    inflight: set[asyncio.Task[None]] = set()
    crashed: list[BaseException] = []
    closing = False
    main = asyncio.current_task()
    assert main is not None

    def done(task: asyncio.Task[None]) -> None:
        inflight.discard(task)
        slots.release()
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not crashed and not closing:
            # A settle failed (NATS gone): stop here rather than let the room go on while the
            # event is still unacked on the server; the caller (WebhookRunner) starts again.
            crashed.append(exc)
            main.cancel()

    try:
        while True:
            await slots.acquire()  # before pulling: the consumer is not drained into memory
            try:
                ev = await anext(consumer)
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(
                _deliver(ev, session, url, secret, timeout_s, backoff_s, backoff_max_s,
                         failures),
                name=f"webhook.post[{ev.room}:{ev.seq}]",
            )
            inflight.add(task)
            task.add_done_callback(done)
    except StopAsyncIteration:
        pass
    except asyncio.CancelledError:
        if crashed and main.uncancel() == 0:  # cancelled by done(), not by our caller
            raise crashed[0] from None
        raise
    finally:
        closing = True
        for task in list(inflight):
            task.cancel()
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)
        if own:
            await session.close()


class WebhookRunner:
    """One always-on webhook: a :class:`ReplayConsumer` on the node's NATS connection feeding
    :func:`post_events`, restarted after ``restart_pause_s`` whatever happens to it.

    Every node of a cluster runs the same runners; with the same durable, the consumer's pinned
    priority group makes one node active per partition and the others stand by.

    Args:
        nc: The node's connected NATS client (left open).
        url: The endpoint.
        rooms: The room pattern (``orders:*``).
        durable: The durable consumer group's name.
        tenant: The tenant whose rooms are posted.
        secret: The HMAC key, or None.
        partitions: The consumer group's partitions.
        max_deliver: Attempts per event before it is dead-lettered.
        concurrency: POSTs in flight at most.
        timeout_s: Time allowed for one POST.
        backoff_s: See :func:`post_events`.
        backoff_max_s: See :func:`post_events`.
        restart_pause_s: Pause before starting again after a failure.
        consumer_options: More keyword arguments of :class:`ReplayConsumer`.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        url: str,
        rooms: str,
        durable: str,
        tenant: str = "default",
        secret: str | None = None,
        partitions: int = 1,
        max_deliver: int = 5,
        concurrency: int = 16,
        timeout_s: float = 10.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 300.0,
        restart_pause_s: float = 5.0,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        self.nc = nc
        self.url = url
        self.rooms = rooms
        self.durable = durable
        self.tenant = tenant
        self._secret = secret
        self.partitions = partitions
        self.max_deliver = max_deliver
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.restart_pause_s = restart_pause_s
        self.consumer_options = dict(consumer_options or {})
        self.restarts = 0
        #: The consumer while one is open (its ``serving`` tells whether this node is active).
        self.consumer: ReplayConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never the secret
        return (f"WebhookRunner({redact_url(self.url)}, tenant={self.tenant}, "
                f"rooms={self.rooms}, durable={self.durable})")

    def start(self) -> None:
        """Start delivering in the background."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"webhook[{self.tenant}:{self.durable}]")

    async def stop(self) -> None:
        """Cancel the POSTs in flight and close the consumer (which naks them). Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        where = f"{redact_url(self.url)} (durable {self.durable})"
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        try:
            while True:
                try:
                    async with ReplayConsumer(
                        self.nc, tenant=self.tenant, rooms=self.rooms, durable=self.durable,
                        max_deliver=self.max_deliver, partitions=self.partitions,
                        serial_rooms=True, **self.consumer_options,
                    ) as consumer:
                        self.consumer = consumer
                        log.info("= webhook %s: delivering %s of tenant %s", where, self.rooms,
                                 self.tenant)
                        await post_events(
                            consumer, self.url, secret=self._secret,
                            concurrency=self.concurrency, timeout_s=self.timeout_s,
                            backoff_s=self.backoff_s, backoff_max_s=self.backoff_max_s,
                            session=session,
                        )
                    why = "consumer ended"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                finally:
                    self.consumer = None
                self.restarts += 1
                log.warning("! webhook %s: %s; again in %g s", where, why, self.restart_pause_s)
                await asyncio.sleep(self.restart_pause_s)
        finally:
            await session.close()
