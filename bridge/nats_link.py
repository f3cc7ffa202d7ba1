"""The node's NATS connection and the room stream.

``NatsLink`` connects (retrying with backoff and jitter at start-up, since nats-py's first
connect does not retry), keeps reconnecting for ever afterwards, makes sure the
``RTNODE_ROOMS`` stream exists with the configured limits, and answers the readiness probe.

The stream's **epoch** (PROTOCOL.md section 2: a client's cursor is valid only within one
epoch) is a random id stored in the stream's metadata when the stream is created, replicated
with its configuration, and never derived from a timestamp: nats-server 2.14.0 rewrites the
stream's ``created`` time on an idempotent ``add_stream`` (fixed in 2.14.5), so a creation
time seen through different servers flapped and every resuming client got
``recovered: false``. The stream is created only when it is missing (``add_stream`` then fails
with 10058 if another node won the race, and the winner's epoch is adopted) and updated only
when its limits differ, keeping its metadata. The epoch therefore changes exactly when the
stream, and with it the room history, really was deleted and created again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RePublish, StorageType, StreamConfig, StreamInfo
from nats.js.errors import BadRequestError, NotFoundError

from bridge import _nats_patches
from bridge.nats_auth import NatsAuth, connect_refusal
from node.protocol.errors import NatsUnavailable
from node.protocol.subjects import LIVE_PREFIX, ROOM_PREFIX, STREAM_NAME

__all__ = ["EPOCH_KEY", "LEGACY_EPOCH", "NatsLink", "StreamSettings", "config_differs"]

log = logging.getLogger("bridge.nats")

T = TypeVar("T")

_STREAM_NAME_IN_USE = 10058
# The first nats-server that stores an atomic batch under one fsync (nats-server#8539); before
# it, a batch costs as many fsyncs as events, and more time than publishing them one by one.
_GROUP_COMMIT_SINCE = (2, 15)
# The stream's metadata key holding its epoch.
EPOCH_KEY = "rtnode_epoch"
# The epoch given to a stream created before epochs lived in its metadata: a constant, so that
# nodes upgrading at the same time all write the same value (metadata has no compare-and-set).
LEGACY_EPOCH = "e0"
# nats-py annotates this as int but sleeps on it: half a second keeps fail-over short.
_RECONNECT_WAIT_S: Any = 0.5
_DRAIN_S = 5  # at most, per connection, when the node stops


@dataclass(frozen=True)
class StreamSettings:
    """The room stream's limits, from the node's configuration."""

    history_size: int = 10000
    history_ttl_s: float = 604800
    dedupe_window_s: float = 120
    replicas: int = 1
    max_msg_bytes: int = 65536 * 2

    def config(self) -> StreamConfig:
        """The JetStream configuration of ``RTNODE_ROOMS``."""
        return StreamConfig(
            name=STREAM_NAME,
            description="rtnode room events",
            subjects=[f"{ROOM_PREFIX}.>"],
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            max_msgs_per_subject=self.history_size if self.history_size > 0 else -1,
            max_age=self.history_ttl_s,
            duplicate_window=self.dedupe_window_s,
            max_msg_size=self.max_msg_bytes,
            allow_direct=True,
            allow_msg_ttl=True,  # per-namespace history_ttl_s: a Nats-TTL header per event
            allow_atomic=True,  # group commit: a batch of publishes under one fsync
            republish=RePublish(src=f"{ROOM_PREFIX}.>", dest=f"{LIVE_PREFIX}.>"),
        )


class NatsLink:
    """The node's NATS connections, with JetStream and the room stream.

    Two connections: the main one carries publishes, their acks, subscriptions and every
    other request; the reads connection carries reads of the room stream (history,
    recoveries, replays). nats-server answers one connection's messages in
    order, and a read waits for the stream's lock (held while a write is flushed to disk): a
    burst of reads on the main connection held up the acks of publishes behind it. Reads fall
    back to the main connection while the reads connection is down. (A starting room reads its
    latest seq on the main connection, right behind its subscription.)

    Args:
        servers: NATS URLs.
        name: Connection name shown by the server (the node's name).
        stream: Limits of the room stream.
        connect_timeout_s: Give up the first connection after this long.
        auth: Credentials and TLS for the servers (default: none).
    """

    def __init__(
        self,
        servers: list[str],
        *,
        name: str,
        stream: StreamSettings,
        connect_timeout_s: float = 60.0,
        auth: NatsAuth | None = None,
    ) -> None:
        self.servers = servers
        self.auth = auth or NatsAuth()
        self.name = name
        self.stream = stream
        self.connect_timeout_s = connect_timeout_s
        self._nc: NATS | None = None
        self._reads: NATS | None = None
        # The PING/PONG that the callers of confirmed() in this loop turn wait for.
        self._confirm: asyncio.Future[None] | None = None
        self._pinging = False  # a round trip of confirmed() is in flight
        self._js: JetStreamContext | None = None
        self.epoch = ""
        # Whether publishes may go as atomic batches (see JetStreamRoomStore): the stream
        # allows them and the server stores a batch under one fsync (2.15 on).
        self.atomic_batches = False
        self._setup_deadline = 0.0  # set-up steps retry until then (the connect deadline)
        # Called after every reconnect: what was published meanwhile never came live.
        self.on_reconnected: list[Callable[[], None]] = []
        # Called when the connection drops: replies to requests sent before are lost.
        self.on_disconnected: list[Callable[[], None]] = []
        # Called when the reads connection drops: replies to the reads sent on it are lost.
        self.on_reads_disconnected: list[Callable[[], None]] = []
        # Called when check() finds the stream recreated (``epoch`` is the new one by then).
        self.on_epoch_changed: list[Callable[[], None]] = []
        # The stream was deleted or created since check() last read the epoch (a JetStream
        # advisory), or the connection was away meanwhile: the epoch may be stale, so every ack
        # asks again (JetStreamRoomStore) until check() reads it. An ack's seq alone does not
        # tell: a new life that has passed this node's highest ack looks like the old one, and
        # a state value written then was tagged with the old epoch, so skipped by every reader.
        self.epoch_suspect = False
        self._suspect_check: asyncio.Task[str | None] | None = None
        # check()s begun, the latest one whose read was taken, and the count when the epoch
        # became suspect: a read asked for before another one's, or before the suspicion, may
        # predate the recreation, so it neither moves the epoch back nor clears the suspicion.
        self._checks = self._checked = self._suspected_at = 0

    def compact(self) -> None:
        """Size the client's table of subscriptions (every rpc route and room subscription of
        the node is there) to what there is now: a dict keeps the size of its peak."""
        if self._nc is not None:
            self._nc._subs = dict(self._nc._subs)

    @property
    def nc(self) -> NATS:
        """The connected client."""
        if self._nc is None:
            raise NatsUnavailable("not connected to NATS")
        return self._nc

    @property
    def reads(self) -> NATS:
        """The connection for reads of the room stream: the reads connection while it is
        up, else the main one."""
        reads = self._reads
        if reads is not None and reads.is_connected:
            return reads
        return self.nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context."""
        if self._js is None:
            raise NatsUnavailable("not connected to NATS")
        return self._js

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        return self._nc is not None and self._nc.is_connected

    async def connect(self) -> None:
        """Connect, retrying with exponential backoff and full jitter, then ensure the stream.

        Raises:
            NatsUnavailable: No server answered within ``connect_timeout_s``, or a server
                refused the credentials (at once: retrying cannot fix that).
        """
        _nats_patches.install()
        deadline = time.monotonic() + self.connect_timeout_s
        attempt = 0
        while True:
            nc = NATS()
            try:
                # One attempt per server, no reconnect: a failed first connect raises at once,
                # so this loop owns the start-up retries (exponential backoff, full jitter, a
                # deadline). nats-py would otherwise retry for ever inside connect().
                await nc.connect(
                    servers=self.servers,
                    name=self.name,
                    connect_timeout=2,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=_RECONNECT_WAIT_S,
                    # A link that dies or stalls silently (no FIN, no RST, a paused server)
                    # is noticed within 6-8 s (3 unanswered pings 2 s apart) and the client
                    # reconnects, not after nats-py's default of minutes. A stall shorter
                    # than that (a 3 s pause) costs no reconnect.
                    ping_interval=2,
                    max_outstanding_pings=3,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **self.auth.connect_options(),
                )
            except Exception as exc:  # nats-py raises several unrelated types here
                # Bounded: after a failed TLS handshake nats-py's close() never returns.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2)
                refused = connect_refusal(exc, self.auth)
                if refused:
                    raise NatsUnavailable(
                        f"NATS at {', '.join(self.servers)} {refused}") from None
                attempt += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NatsUnavailable(
                        f"cannot connect to NATS at {', '.join(self.servers)}: {exc or type(exc)}"
                    ) from None
                delay = min(left, random.uniform(0, min(5.0, 0.1 * 2**attempt)))
                log.warning("! NATS not reachable (%s); retry in %.1f s", exc or type(exc), delay)
                await asyncio.sleep(delay)
                continue
            # Once connected, reconnect for ever: /readyz reports the outage meanwhile.
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            self._nc = nc
            break
        self._js = self._nc.jetstream(timeout=5)
        self._setup_deadline = deadline
        self.epoch = await self.set_up(f"stream {STREAM_NAME}", self.ensure_stream)
        for kind in ("DELETED", "CREATED"):
            await self._nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.{kind}.{STREAM_NAME}",
                                     cb=self._on_stream_advisory)
        await self._connect_reads()
        url = self._nc.connected_url
        log.info("= connected to NATS %s, stream %s epoch %s",
                 url.netloc if url else "?", STREAM_NAME, self.epoch)

    def publish_now(self, subject: str, payload: bytes,
                    headers: dict[str, str] | None = None, *, later: bool = False) -> None:
        """Publish on the main connection from synchronous code, fire and forget: queued at
        once, in order with everything else sent, no task (``_nats_patches.publish_now``).
        Raises what ``nc.publish`` would (closed, draining, its buffer full while away).
        ``later``: it may wait up to 2 ms for the connection's next write (``publish_now``'s)."""
        _nats_patches.publish_now(
            self.nc, subject, payload,
            None if headers is None else _nats_patches.header_lines(headers), later=later)

    async def confirmed(self) -> None:
        """Wait for a PING/PONG on the main connection sent after everything written to it so
        far: the server has then processed it (a subscription is in place). One round trip
        serves every caller of the same loop turn (rpc routes and room subscriptions of
        connections that connect together), and one round trip at a time is in flight: the
        callers that come meanwhile share the next, sent once it is back (connections that
        connect one per turn, through the node's lane, share a few)."""
        if self._confirm is None:
            loop = asyncio.get_running_loop()
            self._confirm = loop.create_future()
            if not self._pinging:
                loop.call_soon(self._ping)
        await asyncio.shield(self._confirm)

    def _ping(self) -> None:
        done, self._confirm = self._confirm, None
        assert done is not None
        self._pinging = True

        async def flush() -> None:
            try:  # one round trip: the server has processed what was written before (its
                # PING may wait up to 2 ms for the next write: _nats_patches.flush_later)
                await _nats_patches.flush_later(self.nc, 2)
            except Exception as exc:
                log.warning("! NATS round trip not confirmed: %s", exc or type(exc).__name__)
            finally:
                if not done.done():
                    done.set_result(None)
                self._pinging = False
                if self._confirm is not None:  # callers that came while it was in flight
                    self._ping()

        asyncio.get_running_loop().create_task(flush(), name="nats.confirm")

    async def _on_stream_advisory(self, msg: Any) -> None:
        """The room stream was deleted or created (by an operator, another node): the epoch
        is suspect until check() reads it, asked at once (a creation gives the new one)."""
        log.warning("= stream %s: %s", STREAM_NAME, msg.subject.rsplit(".", 2)[-2].lower())
        self._suspect()

    def _suspect(self) -> None:
        self.epoch_suspect = True
        self._suspected_at = self._checks  # checks begun before now cannot clear it
        self._suspect_check = asyncio.get_running_loop().create_task(
            self.check(), name="nats[epoch check]")

    async def confirm_epoch(self) -> None:
        """While the epoch is suspect: wait for the check begun when it became so (begun after
        the stream's advisory, so it reads the stream as it is now), or a new one if that one
        could not read it. The acks that come meanwhile share one check, not one each."""
        task = self._suspect_check
        if task is None or task.done():
            task = self._suspect_check = asyncio.get_running_loop().create_task(
                self.check(), name="nats[epoch check]")
        await asyncio.shield(task)

    async def _connect_reads(self) -> None:
        """Open the reads connection, to the server of the main one (so that a room's
        subscription, made on the main connection, is known in the cluster before a read
        made after it). Without it (refused, unreachable) reads use the main connection."""
        main = self.nc
        url = main.connected_url
        servers = [f"{url.scheme}://{url.netloc}"] if url else []
        servers += [s for s in self.servers if s not in servers]
        nc = NATS()
        try:
            # One attempt per server (nats-py retries for ever inside connect() otherwise),
            # then reconnect for ever like the main connection.
            await nc.connect(
                servers=servers, name=f"{self.name} reads", connect_timeout=2,
                dont_randomize=True, allow_reconnect=False, max_reconnect_attempts=1,
                reconnect_time_wait=_RECONNECT_WAIT_S, ping_interval=2,
                max_outstanding_pings=3, error_cb=self._on_error,
                disconnected_cb=self._on_reads_disconnected,
                **self.auth.connect_options(),
            )
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
        except Exception as exc:  # reads go over the main connection: slower, not wrong
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2)
            log.warning("! no NATS reads connection (%s): reads share the main one",
                        exc or type(exc).__name__)
            return
        self._reads = nc

    async def set_up(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """Run a JetStream set-up step (create a stream or a bucket), retrying it until the
        connect deadline: JetStream may not answer yet, or not place replicas yet (a cluster
        still electing its meta leader, a server just restarted: "no suitable peers").

        Raises:
            NatsUnavailable: Still failing at the deadline.
        """
        delay = 0.1
        while True:
            try:
                return await step()
            except Exception as exc:
                left = self._setup_deadline - time.monotonic()
                if left <= 0:
                    raise NatsUnavailable(
                        f"JetStream did not set up {what}: {exc or type(exc)}") from None
                log.warning("! JetStream not ready for %s (%s); retry in %.1f s", what,
                            exc or type(exc).__name__, min(delay, left))
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)

    async def ensure_bucket(self, what: str, cfg: StreamConfig) -> None:
        """Create the stream of a key-value bucket (``cfg``), or bring an existing one to
        ``cfg`` (JetStream's "stream name already in use", 10058), retrying as :meth:`set_up`.

        Raises:
            NatsUnavailable: Still failing at the connect deadline.
        """
        async def step() -> None:
            try:
                await self.js.add_stream(cfg)
            except BadRequestError as exc:
                if exc.err_code != 10058:  # exists with another config
                    raise
                await self.js.update_stream(cfg)

        await self.set_up(what, step)

    async def ensure_stream(self) -> str:
        """Create ``RTNODE_ROOMS`` if it is missing, or bring its limits to the configured ones.

        Returns:
            The stream's epoch (from its metadata).
        """
        cfg = self.stream.config()
        try:
            info = await self.js.stream_info(STREAM_NAME)
        except NotFoundError:
            cfg.metadata = {EPOCH_KEY: secrets.token_hex(8)}
            try:
                info = await self.js.add_stream(cfg)
            except BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                # Another node created it first: its epoch is the stream's.
                info = await self.js.stream_info(STREAM_NAME)
        metadata = dict(info.config.metadata or {})
        if EPOCH_KEY not in metadata or config_differs(info.config, cfg):
            metadata.setdefault(EPOCH_KEY, LEGACY_EPOCH)
            cfg.metadata = {k: v for k, v in metadata.items() if not k.startswith("_nats")}
            info = await self.js.update_stream(cfg)
        version = self.nc.connected_server_version
        self.atomic_batches = bool(info.config.allow_atomic) and (
            (version.major, version.minor) >= _GROUP_COMMIT_SINCE)
        return _epoch(info)

    async def check(self, timeout: float = 2.0) -> str | None:
        """Readiness: None when NATS and JetStream answer, else the reason."""
        if not self.connected:
            return "NATS not connected"
        self._checks += 1
        mine = self._checks
        try:
            info = await asyncio.wait_for(self.js.stream_info(STREAM_NAME), timeout)
        except Exception as exc:
            return f"JetStream not answering ({type(exc).__name__})"
        if mine < self._checked:
            return None  # a check begun later has read the stream already: this read is older
        self._checked = mine
        if mine > self._suspected_at:
            self.epoch_suspect = False
        epoch = _epoch(info)
        if epoch and epoch != self.epoch:
            # Only a stream deleted and created again has another epoch in its metadata.
            log.warning("= stream %s recreated: epoch %s -> %s", STREAM_NAME, self.epoch, epoch)
            self.epoch = epoch
            _run_hooks(self.on_epoch_changed, "epoch change")
        return None

    async def close(self) -> None:
        """Drain and close the connections."""
        if self._suspect_check is not None:
            self._suspect_check.cancel()
        nc, self._nc, self._js = self._nc, None, None
        reads, self._reads = self._reads, None
        for client in (reads, nc):
            if client is None or client.is_closed:
                continue
            # nats-py gives up on its subscriptions' drains first (its own timeout, which
            # ends them and takes their outcome): cut short by ours, their gathered future
            # would be left failed and logged with a traceback ("never retrieved").
            client.options["drain_timeout"] = _DRAIN_S - 1
            try:
                await asyncio.wait_for(client.drain(), _DRAIN_S)
            except Exception:  # the server may already be gone: closing is all that is left
                with contextlib.suppress(Exception):
                    await client.close()

    async def _on_error(self, exc: Exception) -> None:
        if self._nc is not None:  # before the first connect, the retry loop logs
            log.warning("! NATS error: %s", exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self._nc is not None:  # not when we close it ourselves
            log.warning("! NATS disconnected")
            _run_hooks(self.on_disconnected, "disconnect")

    async def _on_reads_disconnected(self) -> None:
        if self._reads is not None:
            log.warning("! NATS reads connection lost: reads use the main one meanwhile")
            _run_hooks(self.on_reads_disconnected, "reads disconnect")

    async def _on_reconnected(self) -> None:
        nc = self._nc
        log.info("= NATS reconnected to %s", nc.connected_url if nc else "?")
        self._suspect()  # an advisory sent meanwhile was lost
        _run_hooks(self.on_reconnected, "reconnect")

    async def __aenter__(self) -> NatsLink:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _run_hooks(hooks: list[Callable[[], None]], what: str) -> None:
    for callback in hooks:
        try:
            callback()
        except Exception:  # one failing hook must not keep the others from running
            log.exception("! %s hook failed", what)


def _epoch(info: StreamInfo) -> str:
    """One life of the stream: the random id in its metadata ("" when it has none yet)."""
    return str((info.config.metadata or {}).get(EPOCH_KEY, ""))


# The configuration fields the node sets, compared with what the server reports.
_COMPARED = ("subjects", "storage", "num_replicas", "max_msgs_per_subject", "max_msg_size",
             "allow_direct", "allow_msg_ttl", "allow_atomic", "description")


def config_differs(current: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether ``current`` (as the server reports it) lacks one of ``wanted``'s settings."""
    for name in _COMPARED:
        if getattr(current, name, None) != getattr(wanted, name, None):
            return True
    for name in ("max_age", "duplicate_window"):  # seconds as floats, from nanoseconds
        if abs(float(getattr(current, name, 0) or 0) - float(getattr(wanted, name, 0) or 0)) > 1e-3:
            return True
    cur, want = current.republish, wanted.republish
    if (cur is None) != (want is None):
        return True
    return cur is not None and want is not None and (cur.src, cur.dest) != (want.src, want.dest)
