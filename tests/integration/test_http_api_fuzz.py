"""Seeded hostile requests to every route of the HTTP API, over the network.

Query parameters and JSON bodies of any shape (the routes' own fields with odd values, unknown
fields, bodies that are not JSON or not objects), any credentials (a service token, a user's,
the API key, garbage): each answer is JSON, a 2xx or a client-side ``{code, reason}`` with the
status of its code (never a 5xx or a stack trace), nothing fails inside the node, and the API
and a WebSocket client are served after every seed.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import aiohttp
import pytest

from bridge.api import HTTP_STATUS
from tests.integration.test_hostile_input import still_serves
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

API_KEY = "fuzz-api-key-0123456789-0123456789"
ROUTES = [("POST", "/api/publish"), ("GET", "/api/history"), ("GET", "/api/presence"),
          ("GET", "/api/state"), ("POST", "/api/disconnect"), ("GET", "/api/sessions"),
          ("GET", "/api/sessions/{id}"), ("DELETE", "/api/sessions/{id}")]
FIELDS = ("room", "event", "data", "msg_id", "since", "limit", "reverse", "user", "client_id",
          "reason", "reconnect", "key", "tenant", "cursor", "kind", "device")
CLIENT_CODES = {4000, 4001, 4003, 4004, 4009, 4010, 4013, 4029}


def _odd(rng: random.Random, room: str) -> Any:
    return rng.choice([
        room, "", " ", "a" * 3000, "\u00e9\u4e2d", "a\nb", "a\x00b", "@user:x", "sys:all:x",
        "a.b", "*", ">", -1, 0, 1, 2**64, 10**30, 1.5, float("nan"), True, None, [], {}, [room],
        {"seq": 1}, "1e3", "-5", "99999999999999999999999", "fz:1", "e", "presence:join",
    ])


def _query(rng: random.Random, room: str) -> dict[str, str]:
    q: dict[str, str] = {}
    for name in rng.sample(FIELDS, rng.randrange(0, 4)):
        value = _odd(rng, room)
        q[name] = value if isinstance(value, str) else json.dumps(value)
    if rng.random() < 0.6:
        q["room"] = room
    return q


def _body(rng: random.Random, room: str) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"a":NaN}', b"1" * 5000])
    body: dict[str, Any] = {"room": room, "event": "e", "data": rng.randrange(100)}
    if kind < 4:
        return json.dumps(body).encode()  # plain: a publish that is stored
    for name in rng.sample(FIELDS, rng.randint(1, 3)):
        body[name] = _odd(rng, room)
    return json.dumps(body).encode()


@pytest.mark.parametrize("seed", [61, 62])
async def test_seeded_hostile_api_requests_get_json_answers(make_node, seed: int,
                                                             caplog) -> None:
    rng = random.Random(seed)
    node = await make_node(api_key=API_KEY)
    caplog.set_level(logging.WARNING)
    room = unique("fz")
    member = await RawClient.connected(ws_url(node), token("fz-member"))
    assert (await member.request({"type": "join", "room": room}))["type"] == "joined"
    client_id = member.info["client_id"]
    auths = [{"Authorization": f"Bearer {token('backend', kind='service', rooms={})}"},
             {"X-API-Key": API_KEY}, {"Authorization": f"Bearer {token('someone')}"},
             {"Authorization": "Bearer garbage"}, {"X-API-Key": "wrong"}, {}]
    ok = refused = 0
    async with aiohttp.ClientSession() as http:
        for _ in range(80):
            method, path = rng.choice(ROUTES)
            path = path.replace("{id}", rng.choice([client_id, "nobody", "a%2Fb", "x" * 300]))
            headers = dict(rng.choice(auths[:2] if rng.random() < 0.7 else auths))
            kw: dict[str, Any] = {"params": _query(rng, room)}
            if method == "POST":
                kw["data"] = _body(rng, room)
                headers["Content-Type"] = rng.choice(["application/json"] * 4 + ["text/plain"])
            async with http.request(method, f"http://127.0.0.1:{node.http.port}{path}",
                                    headers=headers, **kw) as resp:
                assert resp.status < 500, (method, path, kw, resp.status, await resp.text())
                assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
                body = await resp.json()
                if resp.status >= 400:
                    refused += 1
                    assert body.get("code") in CLIENT_CODES, (method, path, kw, body)
                    assert HTTP_STATUS[body["code"]] == resp.status, body
                    assert "\n" not in body["reason"] and "Traceback" not in body["reason"]
                else:
                    ok += 1
    failures = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures[:3]]
    assert ok and refused, (ok, refused)
    await still_serves(node)
