"""The composition root: ``Node`` builds the actor system, NATS, the stream and the listeners,
and stops them in reverse order. Only this module imports every package of the project.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Awaitable
from typing import Any

from actors import ActorSystem
from bridge.api import HttpApi
from bridge.http import HttpBridge, HttpHooks, HttpLimits
from bridge.mqtt import MqttBridge
from bridge.mqtt_external import ExternalMqtt
from bridge.mqtt_sessions import SessionStore
from bridge.nats_auth import NatsAuth
from bridge.nats_link import NatsLink, StreamSettings
from bridge.presence import PresenceTracker
from bridge.room_store import JetStreamRoomStore
from bridge.rpc import NatsRpc
from bridge.sse import SseBridge, longest_cursor
from bridge.state_store import StateStore
from bridge.static import StaticSite, StatsPublisher
from bridge.webhook import WebhookRunner
from bridge.ws import WebSocketBridge
from node.core.connection import NodeContext, Shutdown
from node.core.events import event_body
from node.core.ports import LiveMessage
from node.core.room import CheckGap, Live
from node.core.rpc import load_rpc_modules
from node.memory import MemoryReturn, release
from node.metrics import CONTENT_TYPE, NodeMetrics
from node.nats_server import DataDirLock, EmbeddedNats
from node.protocol.errors import ConfigError
from node.protocol.settings import Settings
from node.protocol.tokens import KINDS, Principal, TokenVerifier

__all__ = ["Node", "check_free"]

log = logging.getLogger("node")

#: How often the node asks whether the room stream was recreated (a new epoch).
EPOCH_CHECK_S = 5.0
# How often the node looks whether a crowd of connections has gone (node/memory.py).
MEMORY_CHECK_S = 2.0
RELEASE_SETTLE_S = 1.5  # from "a release is due" to the release


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls_cert/tls_key: {exc}") from None
    return ctx


def _listen_error(exc: OSError, host: str, port: int, setting: str) -> ConfigError:
    """A failed bind as one line naming the port and the setting (and flag) to change."""
    flag = "--" + setting.replace("_", "-")
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"port {port} ({setting}, {flag}) is in use by another process")
    if exc.errno == errno.EACCES:
        return ConfigError(f"port {port} ({setting}, {flag}): permission denied (ports below "
                           "1024 need privileges)")
    reason = exc.strerror or str(exc)
    return ConfigError(f"cannot listen on {host}:{port} (host, --host; {setting}, {flag}): "
                       f"{reason}")


def check_free(host: str, port: int, setting: str) -> None:
    """Bind ``port`` for a moment, so that a port in use stops the node before it starts
    anything (the real bind, seconds later, reports a port taken meanwhile the same way).

    Raises:
        ConfigError: e.g. "port 8080 (http_port, --http-port) is in use by another process".
    """
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except OSError:
        return  # an unknown host: the listener's own bind says so
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            # As the listeners do: a port left in TIME_WAIT by a node just stopped is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise _listen_error(exc, host, port, setting) from None


async def _listen(start: Awaitable[None], host: str, port: int, setting: str) -> None:
    """Await a listener's ``start()``; a bind failure becomes one line naming the setting.

    Raises:
        ConfigError: The port is taken, forbidden, or the host is not this machine's.
    """
    try:
        await start
    except OSError as exc:
        raise _listen_error(exc, host, port, setting) from None


class Node:
    """One rtnode node, for the life of an ``async with`` block.

    Args:
        settings: The validated configuration.
        worker: One of the processes of ``rtnode run --workers N``: the parent holds the data
            dir's lock, runs the embedded nats-server (``settings`` name its URL) and checked
            the ports, which this node binds with SO_REUSEPORT beside its sibling workers.

    Example:
        async with Node(load_settings()) as node:
            await node.wait_closed()
    """

    def __init__(self, settings: Settings, *, worker: bool = False) -> None:
        self.settings = settings
        self.worker = worker
        self.name = settings.node_name
        self.system = ActorSystem(name=self.name)
        self.metrics = NodeMetrics(self.system)
        self.embedded: EmbeddedNats | None = None
        self.lock = DataDirLock(settings.data_dir)
        # External NATS: credentials and TLS checked now, so a bad file is one line at start.
        self.nats_auth = None if settings.embedded_nats else NatsAuth.from_settings(settings)
        self.nats: NatsLink | None = None
        self.http: HttpBridge | None = None
        self.store: JetStreamRoomStore | None = None
        self.ctx: NodeContext | None = None
        self.ws: WebSocketBridge | None = None
        self.sse: SseBridge | None = None
        self.mqtt: MqttBridge | None = None
        self.mqtt_external: ExternalMqtt | None = None
        self.sessions: SessionStore | None = None
        self.api: HttpApi | None = None
        self.presence: PresenceTracker | None = None
        self.state: StateStore | None = None
        self.stats_publisher: StatsPublisher | None = None
        self.memory = MemoryReturn()
        self.memory_releases = 0  # done (the watch decides; /metrics counts these)
        self._room_stops: set[asyncio.Task[None]] = set()  # rooms stopped by an epoch change
        self.webhooks: list[WebhookRunner] = []
        self.tokens = TokenVerifier.from_settings(settings)
        self._stack = contextlib.AsyncExitStack()
        self._closed = asyncio.Event()

    @property
    def nats_urls(self) -> list[str]:
        """The NATS servers this node uses."""
        if self.embedded is not None:
            return [self.embedded.url]
        return list(self.settings.nats_url)

    async def start(self) -> None:
        """Start everything, inside out: the data dir's lock, actors, NATS, the stream, the
        listeners.

        Raises:
            ConfigError: Another node holds the data dir, or a port is taken (one line each).
        """
        s = self.settings
        ssl_context = _ssl_context(s)
        load_rpc_modules(s.rpc_modules)
        webhook_secrets = [hook.secret_value() for hook in s.webhooks]  # a missing one: now
        try:
            # First: a second node on this data dir stops here, before it starts a second
            # nats-server on the first one's JetStream store.
            if not self.worker:  # a worker's parent holds the lock and checked the ports
                await self._stack.enter_async_context(self.lock)
                # Then the ports asked for: one taken is one line, before NATS starts.
                check_free(s.host, s.http_port, "http_port")
                if not s.mqtt_broker_url:
                    check_free(s.host, s.mqtt_port, "mqtt_port")
            if s.embedded_nats:
                check_free("127.0.0.1", s.nats_port, "nats_port")
                check_free("127.0.0.1", s.nats_monitor_port, "nats_monitor_port")
            await self._stack.enter_async_context(self.system)
            if s.embedded_nats:
                assert self.lock.fd is not None
                self.embedded = EmbeddedNats(
                    s.data_dir / "nats", data_dir=s.data_dir, port=s.nats_port,
                    monitor_port=s.nats_monitor_port, server_name=self.name, sync=s.nats_sync,
                    pass_fds=(self.lock.fd,), avoid=(s.http_port, s.mqtt_port),
                )
                await self._stack.enter_async_context(self.embedded)
                self.lock.note(nats_pid=self.embedded.pid)
            self.nats = NatsLink(
                self.nats_urls,
                name=self.name,
                stream=StreamSettings(
                    history_size=s.history_size,
                    history_ttl_s=s.history_ttl_s,
                    dedupe_window_s=s.dedupe_window_s,
                    replicas=s.stream_replicas,
                    max_msg_bytes=s.max_frame_bytes * 2,
                ),
                connect_timeout_s=s.nats_connect_timeout_s,
                auth=self.embedded.auth if self.embedded else self.nats_auth,
            )
            await self._stack.enter_async_context(self.nats)
            self.nats.on_reconnected.append(self._check_rooms)
            self.nats.on_epoch_changed.append(self._epoch_changed)
            self.store = JetStreamRoomStore(self.nats)
            await self.store.start()
            self._stack.push_async_callback(self.store.stop)
            self.presence = PresenceTracker(
                self.store, ttl_s=s.presence_ttl_s, replicas=s.stream_replicas,
                on_vanished=self._member_vanished,
                # An offline device (persistent MQTT session) is listed as long as its session.
                offline_max_s=s.mqtt_session_expiry_s,
            )
            await self.presence.start()
            self._stack.push_async_callback(self.presence.stop)
            self.state = StateStore(self.store, replicas=s.stream_replicas,
                                    max_keys=s.state_max_keys)
            await self.state.start()
            self._stack.push_async_callback(self.state.stop)
            self.ctx = NodeContext(
                settings=s, node_name=self.name, tokens=self.tokens, system=self.system,
                store=self.store, feed=self.store, presence=self.presence, state=self.state,
                rpc=NatsRpc(self.nats),
            )
            # Persistent MQTT sessions: stopped after the MQTT listener (their last writes).
            self.sessions = SessionStore(
                self.store, replicas=s.stream_replicas, expiry_s=s.mqtt_session_expiry_s,
                max_per_tenant=s.mqtt_max_sessions_per_tenant, node=self.name)
            await self.sessions.start()
            self._stack.push_async_callback(self.sessions.stop)
            self.ctx.sessions = self.sessions
            self.ws = WebSocketBridge(self.ctx)
            self.metrics.node_gauges(self)
            self.http = HttpBridge(
                s.host, s.http_port,
                HttpHooks(readiness=self.readiness, metrics=self._render_metrics),
                ssl_context=ssl_context,
                limits=HttpLimits(header_timeout_s=s.http_header_timeout_s,
                                  keepalive_s=s.http_keepalive_s,
                                  max_per_peer=s.max_connections_per_ip,
                                  failures_per_min=s.peer_failures_per_min,
                                  max_field_size=max(8190, longest_cursor(
                                      s.max_rooms_per_connection) + 64)),
                reuse_port=self.worker,
            )
            self.ws.on_failed = self.http.guard.failed
            self.http.guard.upgrade = self.ws.take  # a /ws upgrade is the bridge's, not aiohttp's
            self.http.add_route("GET", "/ws", self.ws.not_an_upgrade)
            self.sse = SseBridge(self.ctx)
            self.http.add_route("GET", "/sse", self.sse.handle)
            self.api = HttpApi(self.ctx, api_key=s.api_key)
            for method, path, handler in self.api.routes():
                self.http.add_route(method, path, handler)
            await self.api.start(self.nats.nc)
            self._stack.push_async_callback(self.api.stop)
            for method, path, web_handler in StaticSite(s, self.name).routes():
                self.http.add_route(method, path, web_handler)
            self._stack.push_async_callback(self.http.stop)  # also after a failed bind
            self._stack.callback(self.ws.stop)  # before http.stop: what the drain left
            await _listen(self.http.start(), s.host, s.http_port, "http_port")
            self.stats_publisher = StatsPublisher(self)
            self.stats_publisher.start()
            self._stack.push_async_callback(self.stats_publisher.stop)
            watch = asyncio.get_running_loop().create_task(self._watch_epoch(), name="epoch")
            self._stack.callback(watch.cancel)
            memory = asyncio.get_running_loop().create_task(self._watch_memory(), name="memory")
            self._stack.callback(memory.cancel)
            self._stack.callback(lambda: [t.cancel() for t in self._room_stops])
            if s.mqtt_broker_url:
                self.mqtt_external = ExternalMqtt(self.ctx, s.mqtt_broker_url, s.mqtt_tenant)
                await self.mqtt_external.start()
                self._stack.push_async_callback(self.mqtt_external.stop)
            else:
                self.mqtt = MqttBridge(self.ctx, s.host, s.mqtt_port, ssl_context=ssl_context,
                                       reuse_port=self.worker)
                await _listen(self.mqtt.start(), s.host, s.mqtt_port, "mqtt_port")
                self._stack.push_async_callback(self.mqtt.stop)
            self._start_webhooks(webhook_secrets)
            self._stack.push_async_callback(self.drain)
        except BaseException:
            await self._stack.aclose()
            raise

    def _start_webhooks(self, secrets: list[str | None]) -> None:
        """One runner per ``[[webhooks]]`` entry, on the node's own NATS connection; stopped
        after the clients are drained (events they publish meanwhile are still posted)."""
        assert self.nats is not None
        for hook, secret in zip(self.settings.webhooks, secrets, strict=True):
            runner = WebhookRunner(
                self.nats.nc, url=hook.url, rooms=hook.rooms, durable=hook.durable,
                tenant=hook.tenant, secret=secret, partitions=hook.partitions,
                max_deliver=hook.max_deliver, concurrency=hook.concurrency,
                timeout_s=hook.timeout_s,
            )
            runner.start()
            self._stack.push_async_callback(runner.stop)
            self.webhooks.append(runner)

    def _check_rooms(self) -> None:
        """After a NATS reconnect every room compares itself with the stream."""
        for name in self.system.names("room:"):
            ref = self.system.get(name)
            if ref is not None:
                with contextlib.suppress(Exception):
                    ref.tell(CheckGap())

    async def _watch_epoch(self) -> None:
        """Ask every EPOCH_CHECK_S whether the room stream was recreated (also asked by each
        readiness probe); NatsLink.check calls _epoch_changed when it was."""
        assert self.nats is not None
        while True:
            await asyncio.sleep(EPOCH_CHECK_S)
            try:
                await self.nats.check()
            except Exception:  # never: check() answers why; the watch must go on anyway
                log.exception("! epoch check failed")

    def _connections(self) -> tuple[int, int]:
        """Client connections open now (HTTP: WebSocket, SSE, API; and MQTT), and the most
        open at once since the last call (HTTP's high-water mark: a crowd that came and went
        between two calls counts)."""
        http = high = 0
        if self.http is not None:
            guard = self.http.guard
            http, high = guard.open, guard.high_water
            guard.high_water = http
        mqtt = len(self.mqtt.sessions) if self.mqtt is not None else 0
        return http + mqtt, high + mqtt

    def _compact(self) -> None:
        """The tables that grew for the crowd, sized to what is left (node/memory.py)."""
        parts: list[Any] = [self.system, self.ws, self.presence, self.nats]
        if self.ctx is not None:
            parts += [self.ctx.index, self.ctx.rpc]
        for part in parts:
            compact = getattr(part, "compact", None)
            if compact is not None:
                compact()

    def _sweep_limits(self) -> None:
        if self.ctx is not None:
            self.ctx.sweep_limits(time.monotonic())

    async def _watch_memory(self) -> None:
        """Give memory back once a crowd of connections has gone (node/memory.py)."""
        while True:
            await asyncio.sleep(MEMORY_CHECK_S)
            now, high = self._connections()
            # Connections whose sockets closed but whose actors still wind down: not yet.
            if self.memory.due(now, high, time.monotonic(), self.system.closing > 0):
                # The last sockets may have closed a moment ago: their handlers and close
                # tasks finish within the loop's next turns. Released before that, what they
                # held is freed after the trim and stays (test_idle_memory.py: 1 run in 4
                # with 0.5 s, 1 in 6 at 4,000 connections still; none in 5 with 1.5 s).
                await asyncio.sleep(RELEASE_SETTLE_S)
                took = release([self.tokens.forget, self._sweep_limits, self._compact])
                self.memory_releases += 1
                log.info("= %d connections open (%d at the peak): memory released in %.0f ms",
                         now, self.memory.last_peak, took * 1000)

    def _epoch_changed(self) -> None:
        """The room stream was deleted and created again: its seqs start over. Every running
        room knows the old life's latest seq (it would skip the new life's events as already
        delivered) and every client's cursor is of the old life. The rooms are stopped and the
        clients told to reconnect (4503 with reconnect): a client's rejoin with its ``since``
        is answered ``recovered: false`` with the new epoch (PROTOCOL.md), a persistent MQTT
        session's resume sends its gap notice (reason ``epoch``)."""
        ctx = self.ctx
        if ctx is None:
            return
        refs = ctx.index.refs()
        log.warning("! room stream recreated (epoch %s): %d clients told to reconnect",
                    self.nats.epoch if self.nats else "?", len(refs))
        for ref in refs:
            with contextlib.suppress(Exception):
                ref.tell(Shutdown(4503, "room stream recreated, rejoin", True))
        rooms = [r for r in map(self.system.get, self.system.names("room:")) if r is not None]
        task = asyncio.get_running_loop().create_task(self._stop_rooms(rooms), name="epoch.rooms")
        self._room_stops.add(task)
        task.add_done_callback(self._room_stops.discard)

    @staticmethod
    async def _stop_rooms(rooms: list[Any]) -> None:
        # A join that comes meanwhile starts a new room actor (a stopping one is unregistered).
        await asyncio.gather(*(r.stop(drain=False) for r in rooms), return_exceptions=True)

    def _member_vanished(self, tenant: str, room: str, member: dict[str, Any]) -> None:
        """A member whose node died: its presence key expired. Tell the local watchers."""
        ref = self.system.get(f"room:{tenant}:{room}")
        if ref is None:
            return
        kind: Any = member.get("kind") if member.get("kind") in KINDS else "user"
        who = Principal(sub=str(member.get("user", "?")), tenant=tenant, kind=kind)
        body = event_body(room, "presence:leave", member, who, member.get("client_id"), None)
        with contextlib.suppress(Exception):
            ref.tell(Live([LiveMessage(None, None, body)]))

    async def readiness(self) -> str | None:
        """None when this node can serve, else why not."""
        if self.nats is None:
            return "starting"
        if self.mqtt is not None and not self.mqtt.listening:
            return "MQTT listener not up"
        return await self.nats.check()

    async def drain(self) -> None:
        """Tell every client to go elsewhere (4503) and wait for them, up to drain_timeout_s."""
        ctx = self.ctx
        if ctx is None:
            return
        ctx.draining = True
        if self.http is not None:
            self.http.listening = False
        refs = ctx.index.refs()
        for ref in refs:
            with contextlib.suppress(Exception):
                ref.tell(Shutdown(4503, "node shutting down", True))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.index.wait_empty(), self.settings.drain_timeout_s)
        if refs:
            log.info("x drained %d connections", len(refs))

    def _render_metrics(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE

    async def stop(self) -> None:
        """Stop everything, outside in. Idempotent."""
        try:
            await self._stack.aclose()
        finally:
            self._closed.set()

    def close(self) -> None:
        """Ask the node to stop; :meth:`wait_closed` returns once it has."""
        asyncio.get_running_loop().create_task(self.stop(), name="node.stop")

    async def wait_closed(self) -> None:
        """Wait until the node has stopped."""
        await self._closed.wait()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
