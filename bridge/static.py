"""The browser side of a node: the static files of ``bridge/web`` (the ``/rtnode.js`` client
and the console at ``/``), the development token endpoint, and the stats publisher that feeds
the console's live view.

- Every file under ``bridge/web`` is served at its path (``/rtnode.js``, ``/console.css``,
  ``/vendor/cbor-x/index.js``...), ``index.html`` also at ``/``. The client and the vendored
  modules carry ``Access-Control-Allow-Origin: *`` so that an app on another origin can
  ``import`` them; the console pages do not.
- ``GET /console.json`` tells the console whether the node offers development tokens.
- ``POST /dev/token`` answers ``{token, expires_in_s}``, a user token with every right on every
  room and every rpc target, only when the node's ``dev`` setting is true (404 otherwise).
  ``POST /dev/token?kind=service`` answers a service token with the same rights instead: the
  console's sessions view calls the HTTP API (``/api/sessions``) with it.
- :class:`StatsPublisher` publishes the node's figures once a second as a volatile ``stats``
  event (pushed, never polled): in the room ``sys:stats`` of each tenant with a room on this
  node, listing that tenant's rooms only, and in ``sys:all:stats`` of the default tenant,
  listing every tenant's (``tenant/room``), which only an admin service token may join.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from node.core.events import event_body, now_ms
from node.protocol.settings import Settings
from node.protocol.tokens import Principal, load_or_create_secret, mint_token

__all__ = [
    "DEV_TOKEN_TTL_S",
    "STATS_ALL_ROOM",
    "STATS_EVENT",
    "STATS_ROOM",
    "STATS_TENANT",
    "WEB_DIR",
    "StaticSite",
    "StatsPublisher",
    "stats_snapshot",
]

log = logging.getLogger("bridge.static")

WEB_DIR = Path(__file__).parent / "web"
STATS_ROOM = "sys:stats"
STATS_ALL_ROOM = "sys:all:stats"
STATS_EVENT = "stats"
STATS_TENANT = "default"
DEV_TOKEN_TTL_S = 3600
# Rooms listed by name in one stats event (the count is always exact).
MAX_ROOMS_LISTED = 50

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Files an app may import from another origin.
_CORS_PREFIXES = ("/rtnode.", "/vendor/")


def _content_type(path: Path) -> str:
    return _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"


class StaticSite:
    """The routes of the browser side.

    Args:
        settings: The node's settings (``dev``, the token key, issuer and audience).
        node_name: Shown by the console.
        web_dir: The folder served (``bridge/web``).
    """

    def __init__(self, settings: Settings, node_name: str, web_dir: Path = WEB_DIR) -> None:
        self.settings = settings
        self.node_name = node_name
        self.web_dir = web_dir
        self._files: dict[str, Path] = {}
        for path in sorted(web_dir.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                self._files["/" + path.relative_to(web_dir).as_posix()] = path
        if "/index.html" in self._files:
            self._files["/"] = self._files["/index.html"]

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) for every route of the browser side."""
        out: list[tuple[str, str, Handler]] = [
            ("GET", url, self._serve_file) for url in self._files
        ]
        out.append(("GET", "/console.json", self._console_config))
        out.append(("POST", "/dev/token", self._dev_token))
        return out

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        path = self._files.get(request.path)
        if path is None:
            raise web.HTTPNotFound()
        try:
            body = await asyncio.to_thread(path.read_bytes)
        except OSError:
            raise web.HTTPNotFound() from None
        headers = {
            "Content-Type": _content_type(path),
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        if request.path.startswith(_CORS_PREFIXES):
            headers["Access-Control-Allow-Origin"] = "*"
        return web.Response(body=body, headers=headers)

    async def _console_config(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"dev": self._dev_secret() is not None, "node": self.node_name,
             "stats_room": STATS_ROOM},
            headers={"Cache-Control": "no-store"},
        )

    def _dev_secret(self) -> str | None:
        """The HS256 key dev tokens are signed with; None unless ``dev`` is on (or with an
        RS256/ES256 public key: the node cannot sign then)."""
        s = self.settings
        if not s.dev or s.jwt_public_key is not None:
            return None
        return s.jwt_secret or load_or_create_secret(s.data_dir)

    async def _dev_token(self, request: web.Request) -> web.Response:
        secret = self._dev_secret()
        if secret is None:
            return web.json_response({"code": 4004, "reason": "not found"}, status=404)
        s = self.settings
        kind = "service" if request.query.get("kind") == "service" else "user"
        token = mint_token(
            secret, sub="dev-console", kind=kind,
            rooms={"*": ["join", "publish", "history", "presence"], "sys:*": ["join"]},
            rpc=["*"],
            ttl_s=DEV_TOKEN_TTL_S, issuer=s.jwt_issuer, audience=s.jwt_audience,
        )
        return web.json_response(
            {"token": token, "expires_in_s": DEV_TOKEN_TTL_S},
            headers={"Cache-Control": "no-store"},
        )


def _tenant_runs(names: list[str]) -> list[tuple[str, int, int]]:
    """Each tenant's run in ``names``, the sorted names of the room actors
    (``room:<tenant>:<room>``), as (tenant, start, end): a tenant's names sort together, so a
    run is found with one bisection, not a step per room (a node with a room per user lists
    them every second)."""
    runs: list[tuple[str, int, int]] = []
    start, n = 0, len(names)
    while start < n:
        tenant = names[start][5:].partition(":")[0]
        end = bisect.bisect_left(names, f"room:{tenant};", start)  # ";" follows ":"
        runs.append((tenant, start, end))
        start = end
    return runs


def _listed(names: list[str], tenant: str, start: int, end: int) -> list[str]:
    """The first MAX_ROOMS_LISTED rooms of a tenant's run, by name."""
    cut = len(tenant) + 6  # "room:<tenant>:"
    return [name[cut:] for name in names[start:min(end, start + MAX_ROOMS_LISTED)]]


def _all_listed(names: list[str], runs: list[tuple[str, int, int]]) -> list[str]:
    """The first MAX_ROOMS_LISTED of every tenant's rooms: the default tenant's by name, the
    others' as ``tenant/room``, in the order of those names (among the first of each
    tenant)."""
    shown: list[str] = []
    for tenant, start, end in runs:
        listed = _listed(names, tenant, start, end)
        shown.extend(listed if tenant == STATS_TENANT else [f"{tenant}/{r}" for r in listed])
    shown.sort()
    return shown[:MAX_ROOMS_LISTED]


def _with_rooms(snap: dict[str, Any], count: int, listed: list[str]) -> dict[str, Any]:
    return {**snap, "rooms": count, "room_names": listed}


def stats_snapshot(node: Any, tenant: str | None = None) -> dict[str, Any]:
    """The cumulative figures of one node (``node`` is a :class:`node.app.Node`).

    Args:
        node: The running node.
        tenant: List only this tenant's rooms; None for every tenant's (``tenant/room``).
    """
    names = node.system.names("room:")
    runs = _tenant_runs(names)
    if tenant is None:
        return _with_rooms(_node_figures(node), len(names), _all_listed(names, runs))
    for t, start, end in runs:
        if t == tenant:
            return _with_rooms(_node_figures(node), end - start,
                               _listed(names, t, start, end))
    return _with_rooms(_node_figures(node), 0, [])


def _node_figures(node: Any) -> dict[str, Any]:
    """The node-wide figures of a stats event (counts only, no names)."""
    ctx = node.ctx
    connections: dict[str, int] = {}
    if node.ws is not None:
        for codec, n in node.ws.open.items():
            connections[f"ws/{codec}"] = int(n)
    if node.sse is not None:
        connections["sse/json"] = int(node.sse.open)
    if node.mqtt is not None:
        connections["mqtt/cbor"] = len(node.mqtt.sessions)
    counters = ctx.counters
    store = node.store
    return {
        "node": node.name,
        "ts": now_ms(),
        "connections": connections,
        "connections_total": sum(connections.values()),
        "events_in": counters.events_in,
        "events_out": counters.delivered,
        "published": ctx.admission.stats.published,
        "replayed": counters.replayed,
        "slow_consumers": ctx.slow_consumers,
        "rate_limited": ctx.admission.stats.rate_limited,
        "nats_connected": bool(node.nats is not None and node.nats.connected),
        "jetstream": {
            "retries": getattr(store, "retries", 0),
            "errors": getattr(store, "errors", 0),
        },
        "draining": ctx.draining,
    }


class StatsPublisher:
    """Publishes :func:`stats_snapshot` with per-second rates, every ``interval_s``: one event
    per tenant with a room on this node (and the default tenant) in its ``sys:stats``, and one
    with every tenant's rooms in ``sys:all:stats`` of the default tenant.

    Args:
        node: The running node (``ctx``, ``ws``, ``sse``, ``mqtt``, ``store``, ``system``).
        interval_s: Seconds between two stats events.
    """

    def __init__(self, node: Any, interval_s: float = 1.0) -> None:
        self.node = node
        self.interval_s = interval_s
        self.sent = 0
        self._task: asyncio.Task[None] | None = None
        self._sub = f"node:{node.name}"

    def start(self) -> None:
        """Start publishing (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="stats")

    async def stop(self) -> None:
        """Stop publishing. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        previous: dict[str, Any] | None = None
        prev_t = loop.time()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                snap = _node_figures(self.node)
                t = loop.time()
                span = max(t - prev_t, 1e-3)
                if previous is not None:
                    snap["in_per_s"] = round((snap["events_in"] - previous["events_in"]) / span, 2)
                    snap["out_per_s"] = round(
                        (snap["events_out"] - previous["events_out"]) / span, 2)
                else:
                    snap["in_per_s"] = snap["out_per_s"] = 0.0
                previous, prev_t = snap, t
                await self._publish_views(snap)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down: the next tick tries again
                log.debug("! stats not published: %r", exc)

    async def _publish_views(self, snap: dict[str, Any]) -> None:
        """Each tenant's view (its own rooms only), then the admins' view (every room)."""
        names = self.node.system.names("room:")
        runs = _tenant_runs(names)
        for tenant, start, end in runs:
            await self._publish(tenant, STATS_ROOM, _with_rooms(
                snap, end - start, _listed(names, tenant, start, end)))
        if all(tenant != STATS_TENANT for tenant, _, _ in runs):
            await self._publish(STATS_TENANT, STATS_ROOM, _with_rooms(snap, 0, []))
        await self._publish(STATS_TENANT, STATS_ALL_ROOM,
                            _with_rooms(snap, len(names), _all_listed(names, runs)))

    async def _publish(self, tenant: str, room: str, data: dict[str, Any]) -> None:
        who = Principal(sub=self._sub, tenant=tenant, kind="service")
        body = event_body(room, STATS_EVENT, data, who, None, None)
        self.node.ctx.feed.publish_volatile(tenant, room, body)
        self.sent += 1
