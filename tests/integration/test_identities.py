"""Identities that cannot be forged or confused (issue 11), attacked over the network: hostile
token subjects and device ids, the same device id in two tenants, an MQTT takeover, token time
claims, the node-wide connection cap. Real WebSocket, MQTT (aiomqtt) and HTTP clients against a
node on a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import aiomqtt
import cbor2
import jwt
import pytest

from devices.sdk import Device
from node.protocol.settings import Settings
from tests.wsclient import SECRET, RawClient, token, ws_url

pytestmark = pytest.mark.integration

#: What a NATS subject or an MQTT topic gives meaning to, and then some.
HOSTILE = [">", "*", "a.b", "user.>", "*.x", "a>", "+", "#", "a/b", "a b", "$SYS", "x\ty", "é"]
SEED = 1111


def hostile_ids(n: int, seed: int = SEED) -> list[str]:
    """The fixed hostile ids, then random ones each holding one hostile character (seeded)."""
    rng = random.Random(seed)
    ids = list(HOSTILE)
    while len(ids) < n:
        good = "".join(rng.choices("abcxyz019_-:@=", k=rng.randint(0, 8)))
        at = rng.randint(0, len(good))
        ids.append(good[:at] + rng.choice(".*>+#/$ |é") + good[at:])
    return ids


def uid(prefix: str) -> str:
    """An id (user, device, tenant) no other test uses: the nats-server is shared."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def signed(sub: str, **claims: Any) -> str:
    """A token with exactly these claims (``mint_token`` refuses hostile ones, an attacker's
    issuer might not); every right on every room, an hour to live, unless overridden."""
    now = int(time.time())
    body = {"sub": sub, "rooms": {"*": ["join", "publish", "history", "presence"]},
            "iat": now, "exp": now + 3600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, "HS256")


def existing(**settings: Any) -> dict[str, Any]:
    """Only the settings this version of the node knows (the old code lacks the new ones)."""
    return {k: v for k, v in settings.items() if k in Settings.model_fields}


async def refused_ws(node: Any, tok: str) -> tuple[int | None, dict[str, Any]]:
    """Connect with ``tok``; return the close code and the last frame (the disconnect)."""
    c = await RawClient.open(ws_url(node))
    await c.send({"type": "connect", "id": 1, "token": tok})
    code, frames = await c.closed(timeout=10)
    return code, frames[-1] if frames else {}


def device(node: Any, dev: str, tok: str | None = None, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", node.mqtt.port, identifier=dev, username=dev,
                          password=tok or signed(dev, kind="device", **kw))


async def tunnel(client: aiomqtt.Client, dev: str) -> None:
    """Subscribe to the device's tunnel output (frames and the disconnect arrive there)."""
    await client.subscribe(f"rtnode/v1/{dev}/out", qos=1)


async def tunnel_ping(client: aiomqtt.Client, dev: str) -> dict[str, Any]:
    """A ping on the tunnel; its pong."""
    await client.publish(f"rtnode/v1/{dev}/in", cbor2.dumps({"type": "ping", "id": 7}), qos=1)
    async with asyncio.timeout(10):
        async for message in client.messages:
            frame = cbor2.loads(message.payload)
            if frame.get("id") == 7:
                return dict(frame)
    raise AssertionError("no pong")


async def until_closed(client: aiomqtt.Client, timeout: float = 10) -> list[dict[str, Any]]:
    """The tunnel frames the device gets until the node closes its connection."""
    frames = []
    async with asyncio.timeout(timeout):
        try:
            async for message in client.messages:
                frames.append(cbor2.loads(message.payload))
        except aiomqtt.MqttError:
            return frames
    raise AssertionError("the connection was not closed")


async def connack_code(node: Any, dev: str, tok: str | None = None) -> int:
    """The CONNACK code a device with id ``dev`` gets (0: accepted), as paho reports it."""
    try:
        async with device(node, dev, tok):
            return 0
    except aiomqtt.MqttCodeError as exc:
        rc = exc.rc
        return int(rc.value if hasattr(rc, "value") else rc)  # type: ignore[union-attr]


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Wait (bounded in time and steps) until ``condition()`` holds."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Api:
    """A backend of one tenant calling the node's HTTP API with a service token."""

    def __init__(self, node: Any, http: aiohttp.ClientSession, tenant: str) -> None:
        self.url = f"http://127.0.0.1:{node.http.port}/api"
        self.http = http
        tok = token("backend", kind="service", tenant=tenant)
        self.headers = {"Authorization": f"Bearer {tok}"}

    async def disconnect(self, **body: Any) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.url}/disconnect", json=body,
                                  headers=self.headers) as resp:
            return resp.status, await resp.json()


# -- hostile ids -------------------------------------------------------------------------------


async def test_hostile_subs_are_refused_and_catch_no_rpcs(make_node) -> None:
    node = await make_node()
    hostile = hostile_ids(24)
    for sub in hostile:
        code, last = await refused_ws(node, signed(sub))
        assert code == 4001 and last.get("code") == 4001, (sub, code, last)
    caller = await RawClient.connected(ws_url(node), token(uid("caller"), rpc=["user:*"]))
    offline = uid("offline")
    for _ in range(5):  # a `>` or `*` user would take (some of) these
        r = await caller.request({"type": "rpc", "to": f"user:{offline}", "method": "m",
                                  "timeout_ms": 3000})
        assert (r["type"], r["code"]) == ("error", 4004), r
    dave = uid("dave")
    target = await RawClient.connected(ws_url(node), token(dave))

    async def answer() -> None:
        for _ in range(10):
            f = await target.until("rpc")
            await target.send({"type": "reply", "id": f["id"], "result": f["params"]})

    responder = asyncio.create_task(answer())
    try:
        for i in range(10):  # every one reaches dave: no hostile subscriber shares his subject
            r = await caller.request({"type": "rpc", "to": f"user:{dave}", "method": "echo",
                                      "params": i, "timeout_ms": 3000})
            assert (r["type"], r.get("result")) == ("result", i), r
    finally:
        responder.cancel()


async def test_hostile_device_ids_are_refused(make_node) -> None:
    node = await make_node()
    for dev in hostile_ids(24, seed=SEED + 1):
        code = await connack_code(node, dev)
        # CONNACK 2 (identifier rejected): paho reports it as reason code 133.
        assert code in (2, 133), (dev, code)
        with pytest.raises(ValueError, match="device_id must be"):
            Device("127.0.0.1", node.mqtt.port, dev, token="t")  # the SDK says so at once
    assert node.mqtt.listening
    await allowed_ids_work(node)  # the node keeps serving users and devices


# -- tenants, takeover -------------------------------------------------------------------------


async def test_disconnect_stays_in_the_callers_tenant(make_node) -> None:
    node = await make_node()
    dev, ta, tb = uid("thermo"), uid("ta"), uid("tb")
    async with device(node, dev, tenant=ta) as a, device(node, dev, tenant=tb) as b:
        await tunnel(a, dev)
        await tunnel(b, dev)
        assert (await tunnel_ping(a, dev))["type"] == "pong"
        assert (await tunnel_ping(b, dev))["type"] == "pong"
        async with aiohttp.ClientSession() as http:
            api_a = Api(node, http, ta)
            assert await api_a.disconnect(client_id=dev) == (200, {"disconnected": 1})
            frames = await until_closed(a)
            assert frames and frames[-1]["code"] == 4001, "tenant A's device is disconnected"
            assert (await tunnel_ping(b, dev))["type"] == "pong", "tenant B's device is not"
            assert await Api(node, http, uid("tc")).disconnect(client_id=dev, user=dev) == (
                200, {"disconnected": 0})
            for bad in (">", "*", "a.b", "#"):
                status, body = await api_a.disconnect(client_id=bad)
                assert (status, body["code"]) == (400, 4000), bad
        assert (await tunnel_ping(b, dev))["type"] == "pong"


async def take_over(node: Any, dev: str) -> aiomqtt.Client:
    """Connect ``dev`` twice (the second takes the first over) and wait until the first
    session's actor is gone. Returns the second client, connected (to be exited)."""
    first = device(node, dev)
    await first.__aenter__()
    await tunnel(first, dev)
    assert (await tunnel_ping(first, dev))["type"] == "pong"
    old_ref = next(s.ref for s in node.mqtt.sessions.values() if s.client_id == dev)
    second = device(node, dev)
    await second.__aenter__()
    await until_closed(first)
    await wait_for(lambda: not old_ref.is_alive, "the old session's end")
    await tunnel(second, dev)
    assert (await tunnel_ping(second, dev))["type"] == "pong"
    with contextlib.suppress(aiomqtt.MqttError):
        await first.__aexit__(None, None, None)
    return second


async def test_after_a_takeover_the_new_session_is_revocable(make_node) -> None:
    node = await make_node()
    dev = uid("lamp")
    second = await take_over(node, dev)
    try:
        async with aiohttp.ClientSession() as http:
            assert await Api(node, http, "default").disconnect(client_id=dev) == (
                200, {"disconnected": 1})
        frames = await until_closed(second)
        assert frames and frames[-1]["type"] == "disconnect" and frames[-1]["code"] == 4001
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await second.__aexit__(None, None, None)


async def test_a_takeover_counts_once_for_the_per_user_limit(make_node) -> None:
    node = await make_node(max_connections_per_user=1)
    dev = uid("lamp")
    second = await take_over(node, dev)  # not refused for its predecessor's connection
    try:
        code, last = await refused_ws(node, signed(dev, kind="device"))
        assert (code, last.get("code")) == (4029, 4029), "the new session counts for the limit"
        assert (await tunnel_ping(second, dev))["type"] == "pong"
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await second.__aexit__(None, None, None)


async def test_a_drain_reaches_the_session_that_took_over(make_node) -> None:
    node = await make_node(drain_timeout_s=5)
    dev = uid("lamp")
    second = await take_over(node, dev)
    try:
        drain = asyncio.create_task(node.drain())
        frames = await until_closed(second)
        assert frames and (frames[-1]["code"], frames[-1]["reconnect"]) == (4503, True)
        await asyncio.wait_for(drain, 5)
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await second.__aexit__(None, None, None)


# -- token time claims -------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_time_claims_that_are_not_numbers_are_refused(make_node, claim: str) -> None:
    node = await make_node()
    later = int(time.time()) + 3600
    bads: list[Any] = [str(later), "never", True, [later], {"t": later}]
    if claim != "exp":
        bads.append(str(later - 7200))
    user = uid("u")
    for bad in bads:
        code, last = await refused_ws(node, signed(user, **{claim: bad}))
        assert (code, last.get("code")) == (4001, 4001), (claim, bad)
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{node.http.port}/sse"
        params = {"room": "r:1", "token": signed(user, exp=str(later))}
        async with http.get(url, params=params) as resp:
            assert resp.status == 401
    caller = await RawClient.connected(ws_url(node), signed(user, exp=later))
    assert (await caller.request({"type": "ping"}))["type"] == "pong"
    await caller.close()  # left open, the node's stop could wait 5 s for its close handshake


async def test_time_claims_beyond_any_date_are_refused_with_a_reason(make_node) -> None:
    """Finite times no date holds (1e25 s, 10**25, -2**70): a not-yet-valid nbf or iat is
    refused with 4001 and a long-past exp with 4010 (the log's reason says when, in numbers),
    on both doors, never a 4500; the node serves on."""
    node = await make_node()
    user = uid("u")
    for claims, want in (({"nbf": 1e25}, 4001), ({"iat": 10**25}, 4001),
                         ({"nbf": 2**70, "exp": 2**71}, 4001), ({"exp": -(2**70)}, 4010),
                         ({"exp": -1e25}, 4010)):
        code, last = await refused_ws(node, signed(user, **claims))
        assert (code, last.get("code")) == (want, want), (claims, last)
        dev = uid("dev")
        connack = await connack_code(node, dev, signed(dev, kind="device", **claims))
        assert connack in (4, 5, 134, 135), (claims, connack)  # bad credentials, not a 4500
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{node.http.port}/sse"
            params = {"room": "r:1", "token": signed(user, **claims)}
            async with http.get(url, params=params) as resp:
                assert resp.status == 401, claims
    for codec in ("json", "cbor"):  # far, not past: accepted; every codec reads its connected
        caller = await RawClient.connected(ws_url(node), signed(user, exp=1e25), codec=codec)
        assert caller.info["expires_in_s"] == 2**64 - 1, caller.info
        refreshed = await caller.request({"type": "refresh", "token": signed(user, exp=2**80)})
        assert refreshed == {"type": "refreshed", "expires_in_s": 2**64 - 1,
                             "id": refreshed["id"]}, refreshed
        assert (await caller.request({"type": "ping"}))["type"] == "pong"
        await caller.close()


async def test_require_exp(make_node) -> None:
    node = await make_node(**existing(require_exp=True))
    user = uid("u")
    code, last = await refused_ws(node, signed(user, exp=None))
    assert (code, last.get("code")) == (4001, 4001)
    ok = await RawClient.connected(ws_url(node), signed(user))
    assert (await ok.request({"type": "ping"}))["type"] == "pong"
    await ok.close()


async def test_max_token_lifetime(make_node) -> None:
    node = await make_node(**existing(token_max_lifetime_s=600))
    user, now = uid("u"), int(time.time())
    for tok in (signed(user), signed(user, exp=None), signed(user, iat=None, exp=now + 900),
                signed(user, iat=now - 60, exp=now + 590)):
        code, last = await refused_ws(node, tok)
        assert (code, last.get("code")) == (4001, 4001), jwt.decode(tok, options={
            "verify_signature": False})
    for tok in (signed(user, exp=now + 590), signed(user, iat=None, exp=now + 300)):
        ok = await RawClient.connected(ws_url(node), tok)
        assert (await ok.request({"type": "ping"}))["type"] == "pong"
        await ok.close()


# -- the connection cap ------------------------------------------------------------------------


async def test_the_connection_cap_answers_4503(make_node) -> None:
    node = await make_node(**existing(max_connections=3))
    users = [uid("u") for _ in range(3)]
    held = [await RawClient.connected(ws_url(node), token(u)) for u in users]
    code, last = await refused_ws(node, token(uid("late")))
    assert (code, last.get("code"), last.get("reconnect")) == (4503, 4503, True)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{node.http.port}/sse",
                            params={"room": "r:1", "token": token(uid("sse"))}) as resp:
            assert resp.status == 503
            assert (await resp.json())["code"] == 4503
    code = await connack_code(node, uid("dev"))
    assert code in (3, 136), code  # CONNACK 3, server unavailable (paho: reason code 136)
    for c in held:  # those in keep being served
        assert (await c.request({"type": "ping"}))["type"] == "pong"
    await held[0].close()
    await wait_for(lambda: len(node.ctx.index.by_id) < 3, "a free slot")
    again = await RawClient.connected(ws_url(node), token(uid("again")))
    assert (await again.request({"type": "ping"}))["type"] == "pong"


async def allowed_ids_work(node: Any) -> None:
    """Ids using the grammar's punctuation (``_ : @ = -``) reach rpc subjects, presence keys,
    personal rooms and MQTT topics without harm."""
    tail = uuid.uuid4().hex[:6]
    user, dev = f"u:a@b=c_{tail}-1", f"d:x@y=z_{tail}-2"
    caller = await RawClient.connected(ws_url(node), token(uid("caller"), rpc=["user:*",
                                                                              "device:*"]))
    member = await RawClient.connected(ws_url(node), signed(user))
    room = f"r:{tail}"
    assert (await member.request({"type": "join", "room": room, "presence": True}))["type"] \
        == "joined"
    async with device(node, dev) as d:
        await tunnel(d, dev)
        await d.publish(f"rtnode/v1/{dev}/in", cbor2.dumps(
            {"type": "join", "id": 1, "room": room}), qos=1)

        async def listed() -> set[str]:
            for _ in range(250):
                r = await caller.request({"type": "presence", "room": room})
                users = {m["user"] for m in r.get("members", [])}
                if {user, dev} <= users:
                    return users
                await asyncio.sleep(0.02)
            raise AssertionError("presence never listed both")

        await listed()

        async def answer() -> None:
            f = await member.until("rpc")
            await member.send({"type": "reply", "id": f["id"], "result": "ok"})

        responder = asyncio.create_task(answer())
        r = await caller.request({"type": "rpc", "to": f"user:{user}", "method": "m"})
        await responder
        assert r.get("result") == "ok", r
        assert (await tunnel_ping(d, dev))["type"] == "pong"
