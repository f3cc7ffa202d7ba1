"""The HTTP API for backends (PROTOCOL.md section 8): publish, history, presence, disconnect,
and the values of a state room (``GET /api/state``, docs/protocol-notes.md).

Every request is authenticated by a service token (``Authorization: Bearer``) or the node's API
key (``X-API-Key``), validated by a pydantic model, and answered with JSON; an error is
``{code, reason}`` with the HTTP status of its code (:data:`HTTP_STATUS`), never a stack trace.
The handlers are thin: parsing and checks are the pure functions and models of this module.

``POST /api/disconnect`` ends the matching connections of this node at once, and tells the other
nodes on the core NATS subject ``rt.ctl.<tenant>.disconnect`` (see :meth:`HttpApi.start`).

``/api/sessions`` lists, shows and deletes the persistent MQTT sessions of the caller's tenant
(an admin service token may name another with ``?tenant=``); deleting one also ends the
device's connection wherever it is and takes it out of presence (no longer offline).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    model_validator,
)

from actors.errors import ActorError
from node.core.connection import KeepOffline, NodeContext, Shutdown
from node.core.events import fit_history, read_history
from node.core.ports import StoreError
from node.protocol.errors import AuthError, ProtocolError
from node.protocol.frames import JSON, ROOM_PATTERN, SEQ_MAX, json_loads_strict, publish_frame
from node.protocol.ids import ID_PATTERN, TENANT_PATTERN
from node.protocol.tokens import Principal, TokenVerifier

__all__ = [
    "API_HISTORY_BYTES",
    "API_KEY_PRINCIPAL",
    "DISCONNECT_CODE",
    "HTTP_STATUS",
    "DisconnectBody",
    "HistoryQuery",
    "HttpApi",
    "RoomQuery",
    "SessionsQuery",
    "authenticate",
    "bearer_token",
    "ctl_disconnect_subject",
    "decode_body",
    "error_response",
    "json_response",
    "parse_json_body",
    "validate",
]

log = logging.getLogger("bridge.api")

#: HTTP status of each protocol code (PROTOCOL.md section 8; 4010 and 4029 are our choices).
HTTP_STATUS: dict[int, int] = {
    4000: 400, 4001: 401, 4003: 403, 4004: 404, 4009: 429, 4010: 401, 4013: 413,
    4029: 429, 4500: 500, 4503: 503, 4504: 504,
}

#: Who a request authenticated by ``X-API-Key`` acts as.
API_KEY_PRINCIPAL = Principal(sub="api", tenant="default", kind="service")

#: The close code of a connection ended by ``POST /api/disconnect`` (with ``reconnect: false``).
DISCONNECT_CODE = 4001
_DEFAULT_REASON = "disconnected by the server"
_CTL_WILDCARD = "rt.ctl.*.disconnect"


M = TypeVar("M", bound=BaseModel)


def ctl_disconnect_subject(tenant: str) -> str:
    """The core NATS subject every node listens on for API disconnects of ``tenant``."""
    return f"rt.ctl.{tenant}.disconnect"


# -- requests --------------------------------------------------------------------------------


class _Body(BaseModel):
    # JSON bodies: unknown fields ignored (newer backends may send more), known ones strict.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class DisconnectBody(_Body):
    """``POST /api/disconnect``: a user's connections, or those with a client id (of that
    user), in the caller's tenant; both are ids (``node.protocol.ids``)."""

    user: Annotated[StrictStr, Field(pattern=ID_PATTERN)] | None = None
    client_id: Annotated[StrictStr, Field(pattern=ID_PATTERN)] | None = None
    reason: StrictStr = Field(default=_DEFAULT_REASON, min_length=1, max_length=120)

    @model_validator(mode="after")
    def _needs_a_target(self) -> DisconnectBody:
        if self.user is None and self.client_id is None:
            raise ValueError("user or client_id is required")
        if "\n" in self.reason or "\r" in self.reason:
            raise ValueError("reason must be one line")
        return self


class _Query(BaseModel):
    # Query strings are text: numbers and booleans are parsed from it ("10", "true").
    model_config = ConfigDict(extra="ignore", frozen=True)


class RoomQuery(_Query):
    """``GET /api/presence?room=``."""

    room: Annotated[str, Field(pattern=ROOM_PATTERN)]


class SessionsQuery(_Query):
    """``/api/sessions?tenant=`` (another tenant: admin service tokens only)."""

    tenant: Annotated[str, Field(pattern=TENANT_PATTERN)] | None = None


class _ClientId(_Query):
    client_id: Annotated[str, Field(pattern=ID_PATTERN)]


#: After a session is deleted, its offline presence entries are cleared once more this much
#: later: a connection ended on another node may have marked them offline meanwhile.
_RECLEAR_S = 2.0


class HistoryQuery(RoomQuery):
    """``GET /api/history?room=&since=&limit=&reverse=``, as the WebSocket ``history`` frame."""

    since: int | None = Field(default=None, ge=0, le=SEQ_MAX)
    limit: int = Field(default=100, ge=1, le=1000)
    reverse: bool = False


def validate(model: type[M], data: Any) -> M:
    """Validate ``data`` with ``model``.

    Raises:
        ProtocolError: 4000 with a one-line reason naming the first bad field.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        raise ProtocolError(4000, f"bad field {loc}: {err['msg']}") from None


#: The most bytes of events one ``/api/history`` answer holds (JSON): more are cut, with
#: ``more: true``. 1,000 events of 64 KB of NUL characters (6 bytes each in JSON) were one
#: answer of 390 MB, built in the node's memory.
API_HISTORY_BYTES = 8 * 2**20

#: ``Content-Encoding`` values a body may have: identity, or one of zlib's (wbits 47 reads a
#: gzip or a zlib header).
_ENCODINGS = {"": 0, "identity": 0, "gzip": 47, "x-gzip": 47, "deflate": 47}


def decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """A request body as sent before its ``Content-Encoding`` (gzip, deflate or none).

    The HTTP server does not decompress (``HttpBridge``): aiohttp inflated every body as it
    arrived, on the event loop and before any handler or token check, so a 200 KB gzip of zeros
    sent to any path (``POST /healthz``) held the node's loop ~1 s inflating 200 MB. Here only
    an API body is inflated, after authentication, and never beyond ``limit`` bytes.

    Raises:
        ProtocolError: 4000 for an unknown encoding or a body that does not inflate; 4013
            when it inflates beyond ``limit``.
    """
    encoding = (content_encoding or "").strip().lower()
    wbits = _ENCODINGS.get(encoding)
    if wbits is None:
        raise ProtocolError(4000, "unsupported Content-Encoding: send gzip, deflate or none")
    if not wbits:
        return raw
    inflate = zlib.decompressobj(wbits)
    try:
        body = inflate.decompress(raw, limit + 1)
    except zlib.error:
        raise ProtocolError(4000, f"body is not valid {encoding}") from None
    if len(body) > limit:
        raise ProtocolError(4013, "body too large")
    if not inflate.eof:
        raise ProtocolError(4000, f"body is not valid {encoding}: cut short")
    return body


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be one JSON object, as strictly as a JSON frame
    (``node.protocol.json_loads_strict``: UTF-8, no NaN or Infinity, no lone surrogate).

    Raises:
        ProtocolError: 4000 when it is not valid JSON or not an object.
    """
    try:
        value = json_loads_strict(raw)
    except ProtocolError as exc:
        raise ProtocolError(4000, exc.reason.replace("message", "body", 1)) from None
    if not isinstance(value, dict):
        raise ProtocolError(4000, "body must be a JSON object")
    return value


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def authenticate(headers: Mapping[str, str], tokens: TokenVerifier, api_key: str) -> Principal:
    """Who is calling the API: a service token, else the API key.

    An ``Authorization`` header, when present, decides alone (a bad token is not rescued by a
    good key). The key is compared in constant time.

    Raises:
        AuthError: 4001 (missing or invalid credentials), 4010 (the token expired).
        ProtocolError: 4003 when the token is not a service token.
    """
    authorization = headers.get("Authorization")
    if authorization is not None:
        token = bearer_token(authorization)
        if token is None:
            raise AuthError("expected Authorization: Bearer <token>")
        principal = tokens.verify(token, where="api")
        if principal.kind != "service":
            tokens.refused("wrong_kind", f"wrong kind: a {principal.kind} token (sub "
                           f"{principal.sub}); the HTTP API needs a service token", "api")
            raise ProtocolError(4003, "the HTTP API needs a service token")
        return principal
    key = headers.get("X-API-Key")
    if key is not None and api_key and hmac.compare_digest(key.encode(), api_key.encode()):
        return API_KEY_PRINCIPAL
    raise AuthError("missing or invalid credentials")


# -- responses -------------------------------------------------------------------------------


def json_response(value: Any, status: int = 200) -> web.Response:
    """A JSON response; CBOR-only values (bytes) travel as base64 text, as to JSON clients."""
    return web.Response(body=JSON.encode(value), status=status, content_type="application/json")


def error_response(code: int, reason: str) -> web.Response:
    """An error ``{code, reason}`` with the HTTP status of ``code``."""
    return json_response({"code": code, "reason": reason}, HTTP_STATUS.get(code, 500))


Handler = Callable[[web.Request, Principal], Awaitable[dict[str, Any]]]


class HttpApi:
    """Serves ``/api/*`` for one node.

    Args:
        ctx: The node's shared context (settings, tokens, store, connections).
        api_key: The ``X-API-Key`` accepted as the default tenant's service; "" for none.

    Example:
        api = HttpApi(ctx, api_key=settings.api_key)
        for method, path, handler in api.routes():
            http.add_route(method, path, handler)
        await api.start(nc)
    """

    def __init__(self, ctx: NodeContext, *, api_key: str = "") -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.api_key = api_key
        # Tells this node's own cluster messages apart (node names need not be unique).
        self.origin = secrets.token_hex(8)
        self._nc: Any = None
        self._sub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()  # delayed presence clean-ups

    def routes(self) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.Response]]]]:
        """The (method, path, handler) of every API route."""
        return [
            ("POST", "/api/publish", self.publish),
            ("GET", "/api/history", self.history),
            ("GET", "/api/presence", self.presence),
            ("GET", "/api/state", self.state),
            ("POST", "/api/disconnect", self.disconnect),
            ("GET", "/api/sessions", self.sessions),
            ("GET", "/api/sessions/{client_id}", self.session),
            ("DELETE", "/api/sessions/{client_id}", self.delete_session),
        ]

    async def start(self, nc: Any) -> None:
        """Follow the disconnects asked of other nodes (``rt.ctl.*.disconnect``).

        Args:
            nc: The node's connected NATS client.
        """
        self._nc = nc
        self._sub = await nc.subscribe(_CTL_WILDCARD, cb=self._on_ctl)
        await nc.flush()  # the server has the subscription before the first request is served

    async def stop(self) -> None:
        """Stop following other nodes' disconnects (and the delayed presence clean-ups)."""
        for task in list(self._tasks):
            task.cancel()
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # connection already closing
                await sub.unsubscribe()

    # -- handlers --------------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        """``POST /api/publish`` {room, event, data, msg_id?, key?, unset?} -> {seq}."""
        return await self._serve(request, self._publish)

    async def history(self, request: web.Request) -> web.Response:
        """``GET /api/history?room=&since=&limit=&reverse=`` -> {events, seq}."""
        return await self._serve(request, self._history)

    async def state(self, request: web.Request) -> web.Response:
        """``GET /api/state?room=`` -> {room, values, seq}: a state room's current values."""
        return await self._serve(request, self._state)

    async def presence(self, request: web.Request) -> web.Response:
        """``GET /api/presence?room=`` -> {members}."""
        return await self._serve(request, self._presence)

    async def disconnect(self, request: web.Request) -> web.Response:
        """``POST /api/disconnect`` {user | client_id, reason?} -> {disconnected}."""
        return await self._serve(request, self._disconnect)

    async def sessions(self, request: web.Request) -> web.Response:
        """``GET /api/sessions?tenant=`` -> {sessions: [record, ...]}."""
        return await self._serve(request, self._sessions)

    async def session(self, request: web.Request) -> web.Response:
        """``GET /api/sessions/<client_id>?tenant=`` -> the record (4004 if none)."""
        return await self._serve(request, self._session)

    async def delete_session(self, request: web.Request) -> web.Response:
        """``DELETE /api/sessions/<client_id>?tenant=`` -> {deleted: true} (4004 if none)."""
        return await self._serve(request, self._delete_session)

    async def _serve(self, request: web.Request, handler: Handler) -> web.Response:
        try:
            principal = authenticate(request.headers, self.ctx.tokens, self.api_key)
            return json_response(await handler(request, principal))
        except ProtocolError as exc:
            return error_response(exc.code, exc.reason)
        except Exception:
            log.exception("! %s %s failed", request.method, request.path)
            return error_response(4500, "internal error")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ProtocolError(4013, "body too large") from None
        except web.RequestPayloadError:  # a chunked body that breaks off or lies
            raise ProtocolError(4000, "body could not be read") from None
        return parse_json_body(decode_body(raw, request.headers.get("Content-Encoding"),
                                           request.client_max_size))

    @staticmethod
    def _query(request: web.Request) -> dict[str, str]:
        return {key: request.query[key] for key in request.query}  # first value of each

    async def _publish(self, request: web.Request, principal: Principal) -> dict[str, Any]:
        admission = self.ctx.admission
        admitted = admission.admit("api", principal, publish_frame(await self._body(request)),
                                   client_id=None)
        if admitted.volatile:
            admission.send_volatile(admitted)
            return {}  # volatile: no seq, as the WebSocket `published`
        return {"seq": await admission.store(admitted)}

    async def _history(self, request: web.Request, principal: Principal) -> dict[str, Any]:
        q = validate(HistoryQuery, self._query(request))
        if not principal.can("history", q.room):
            raise ProtocolError(4003, "no history right on this room")
        try:
            events, latest = await read_history(
                self.ctx.store, principal.tenant, q.room, since=q.since, limit=q.limit,
                reverse=q.reverse,
            )
        except StoreError:
            raise ProtocolError(4500, "could not read history", retry=True) from None
        events, more = fit_history(events, JSON.encode, API_HISTORY_BYTES,
                                   keep_last=q.since is None and not q.reverse)
        return {"events": events, "seq": latest, "more": True} if more else {
            "events": events, "seq": latest}

    async def _state(self, request: web.Request, principal: Principal) -> dict[str, Any]:
        q = validate(RoomQuery, self._query(request))
        if not principal.can("history", q.room):
            raise ProtocolError(4003, "no history right on this room")
        if not self.settings.room_policy(q.room).state:
            raise ProtocolError(4004, "not a state room (namespace with state = true)")
        state = getattr(self.ctx, "state", None)
        try:
            values = [] if state is None else await state.values(principal.tenant, q.room)
            latest = await self.ctx.store.last_seq(principal.tenant, q.room)
        except StoreError:
            raise ProtocolError(4500, "could not read the state", retry=True) from None
        return {"room": q.room, "values": values, "seq": latest}

    async def _presence(self, request: web.Request, principal: Principal) -> dict[str, Any]:
        q = validate(RoomQuery, self._query(request))
        if not principal.can("presence", q.room):
            raise ProtocolError(4003, "no presence right on this room")
        presence = getattr(self.ctx, "presence", None)
        if presence is None:
            raise ProtocolError(4004, "presence not available")
        if q.room.startswith("@") or not self.settings.room_policy(q.room).presence:
            raise ProtocolError(4004, "presence is off for this room")
        try:
            members = await presence.members(principal.tenant, q.room)
        except StoreError:
            raise ProtocolError(4500, "could not read presence", retry=True) from None
        return {"members": members}

    async def _disconnect(self, request: web.Request, principal: Principal) -> dict[str, Any]:
        body = validate(DisconnectBody, await self._body(request))
        tenant = principal.tenant
        count = self.disconnect_local(tenant, body.user, body.client_id, body.reason)
        if self._nc is None:
            return {"disconnected": count}  # not started: this node only
        message = {"user": body.user, "client_id": body.client_id, "reason": body.reason,
                   "origin": self.origin}
        try:
            await self._nc.publish(ctl_disconnect_subject(tenant), json.dumps(message).encode())
        except Exception as exc:  # the other nodes were not told: the caller may retry
            log.warning("! disconnect not sent to the cluster: %r", exc)
            raise ProtocolError(4503, "other nodes not reached, retry", retry=True) from None
        return {"disconnected": count}

    # -- persistent MQTT sessions ----------------------------------------------------------

    def _sessions_of(self, request: web.Request, principal: Principal) -> tuple[Any, str]:
        """The session store and the tenant a sessions request is about.

        Raises:
            ProtocolError: 4000 bad tenant; 4003 another tenant without an admin token; 4004
                without persistent sessions (no NATS).
        """
        q = validate(SessionsQuery, self._query(request))
        tenant = principal.tenant
        if q.tenant is not None and q.tenant != tenant:
            if not principal.admin:
                raise ProtocolError(4003, "another tenant's sessions need an admin service token")
            tenant = q.tenant
        store = getattr(self.ctx, "sessions", None)
        if store is None:
            raise ProtocolError(4004, "persistent sessions not available")
        return store, tenant

    @staticmethod
    def _client_id(request: web.Request) -> str:
        return validate(_ClientId, {"client_id": request.match_info.get("client_id", "")}
                        ).client_id

    async def _sessions(self, request: web.Request, principal: Principal) -> dict[str, Any]:
        store, tenant = self._sessions_of(request, principal)
        try:
            records = await store.list(tenant)
        except StoreError:
            raise ProtocolError(4500, "could not read sessions", retry=True) from None
        return {"sessions": [record.to_json() for record in records]}

    async def _session(self, request: web.Request, principal: Principal) -> dict[str, Any]:
        store, tenant = self._sessions_of(request, principal)
        client_id = self._client_id(request)
        try:
            record = await store.get(tenant, client_id)
        except StoreError:
            raise ProtocolError(4500, "could not read the session", retry=True) from None
        if record is None:
            raise ProtocolError(4004, "no such session")
        result: dict[str, Any] = record.to_json()
        return result

    async def _delete_session(self, request: web.Request,
                              principal: Principal) -> dict[str, Any]:
        """Delete a session: its connection ends (here at once, told to leave presence rather
        than go offline; elsewhere through the disconnect of ``/api/disconnect``), the record
        goes, and its offline presence entries go with a ``presence:leave`` to the watchers."""
        store, tenant = self._sessions_of(request, principal)
        client_id = self._client_id(request)
        try:
            record = await store.get(tenant, client_id)
        except StoreError:
            raise ProtocolError(4500, "could not read the session", retry=True) from None
        if record is None:
            raise ProtocolError(4004, "no such session")
        reason = "session deleted"
        for conn in self.ctx.index.select(tenant, None, client_id):
            with contextlib.suppress(ActorError):
                conn.ref.tell(KeepOffline(None))
                conn.ref.tell(Shutdown(DISCONNECT_CODE, reason, False))
        if self._nc is not None:
            message = {"user": None, "client_id": client_id, "reason": reason,
                       "origin": self.origin}
            with contextlib.suppress(Exception):  # the store's takeover notice also ends it
                await self._nc.publish(ctl_disconnect_subject(tenant),
                                       json.dumps(message).encode())
        try:
            await store.delete(tenant, client_id)
        except StoreError:
            raise ProtocolError(4500, "could not delete the session", retry=True) from None
        rooms = sorted(f[6:] for f in record.subs if f.startswith("rooms/"))
        await self.clear_offline(tenant, client_id, rooms)
        task = asyncio.get_running_loop().create_task(
            self.clear_offline(tenant, client_id, rooms, after_s=_RECLEAR_S),
            name=f"api.clear_offline[{client_id}]")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"deleted": True}

    async def clear_offline(self, tenant: str, client_id: str, rooms: list[str], *,
                            after_s: float = 0.0) -> None:
        """Take a device whose session is gone out of its rooms' presence where it is offline
        (``PresenceTracker.clear_offline``), with a ``presence:leave`` to the watchers of
        every node."""
        if after_s:
            await asyncio.sleep(after_s)
        presence = getattr(self.ctx, "presence", None)
        forget = getattr(presence, "forget_device", None)  # bridge.presence.PresenceTracker
        if forget is not None:
            await forget(tenant, client_id, rooms, self.ctx.feed)

    # -- disconnects -----------------------------------------------------------------------

    def disconnect_local(
        self, tenant: str, user: str | None, client_id: str | None, reason: str
    ) -> int:
        """End the matching connections of this node, in ``tenant`` only (a client id, even a
        device id, may exist in several tenants); returns how many were told to."""
        count = 0
        for conn in self.ctx.index.select(tenant, user, client_id):
            try:
                conn.ref.tell(Shutdown(DISCONNECT_CODE, reason, False))
            except ActorError:
                continue  # already stopping
            count += 1
        if count:
            log.info("x API disconnect of %s (tenant %s): %d connection(s)",
                     user or client_id, tenant, count)
        return count

    async def _on_ctl(self, msg: Any) -> None:
        """A disconnect asked of another node: apply it here."""
        parts = msg.subject.split(".")
        if len(parts) != 4:
            return
        try:
            data = json.loads(msg.data)
        except ValueError:
            return
        if not isinstance(data, dict) or data.get("origin") == self.origin:
            return
        user, client_id, reason = data.get("user"), data.get("client_id"), data.get("reason")
        if not (isinstance(user, str) or user is None) or not (
            isinstance(client_id, str) or client_id is None
        ) or (user is None and client_id is None):
            return
        if not isinstance(reason, str) or not reason:
            reason = _DEFAULT_REASON
        self.disconnect_local(parts[2], user, client_id, reason[:120])
