"""Hostile token claims over the network: seeded random values for every claim the node reads.

The issuer signs what it is given; a buggy or careless one can sign anything JSON holds. Each
token goes through the WebSocket door and the MQTT door (the device's password): the node
either accepts it (the client is then served: a join and a publish get their answers) or
refuses it with a reason (4001, 4003, 4010; a CONNACK refusal), and never fails inside (no
4500, no error logged with a stack trace). A plain client is served after every seed.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import aiomqtt
import jwt
import pytest

from tests.integration.test_identities import connack_code, refused_ws, uid
from tests.wsclient import SECRET, RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

CLAIMS = ("sub", "tenant", "kind", "rooms", "rpc", "admin", "exp", "nbf", "iat", "jti")
# Close codes a refused token may get: invalid (4001), forbidden (4003), expired (4010).
REFUSALS = {4001, 4003, 4010}


def _value(rng: random.Random, depth: int = 0) -> Any:
    """Anything JSON holds, leaning to what claims are made of."""
    kind = rng.randrange(11 if depth < 2 else 7)
    if kind == 0:
        return rng.choice([0, 1, -1, 2**31, 2**63, 2**64 + 5, -(2**70), 10**30])
    if kind == 1:
        return rng.choice([0.5, -1e300, 1e25, 1.7e308, -0.0])
    if kind == 2:
        return rng.choice(["", " ", "user", "device", "service", "*", "**", "a" * 300,
                           "\u00e9\u4e2d\U0001f600", "a.b", "a b", "x>", "x*", "@user:x",
                           "sys:all:x", "../x", "a\nb", "\\u0000", "join", "publish"])
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return int(time.time()) + rng.choice([-10**9, -3600, -1, 0, 30, 3600, 10**9])
    if kind == 5:
        return "".join(rng.choice("aZ09_-:.@*> \u00e9") for _ in range(rng.randrange(1, 12)))
    if kind == 6:
        return rng.choice(["join", "publish", "history", "presence", "admin", ""])
    if kind in (7, 8):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_value(rng, depth + 1))[:20]: _value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _claims(rng: random.Random, sub: str, hostile: bool) -> dict[str, Any]:
    """A plausible token; when ``hostile``, with one to three claims made hostile."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "rooms": {"*": ["join", "publish"]}, "iat": now,
                              "exp": now + 3600}
    for name in rng.sample(CLAIMS, rng.randint(1, 3) if hostile else 0):
        if rng.random() < 0.15:
            claims.pop(name, None)
        else:
            claims[name] = _value(rng)
    return claims


@pytest.mark.parametrize("seed", [101, 102, 103])
async def test_hostile_claims_are_served_or_refused_never_failed(make_node, seed: int,
                                                                 caplog) -> None:
    rng = random.Random(seed)
    node = await make_node()
    caplog.set_level(logging.WARNING)
    accepted = refused = 0
    for _ in range(25):
        sub = uid("fz")
        hostile = rng.random() < 0.8  # the rest plain: those must be served
        tok = jwt.encode(_claims(rng, sub, hostile), SECRET, "HS256")
        client = await RawClient.open(ws_url(node))
        await client.send({"type": "connect", "id": 1, "token": tok})
        first = await client.recv()
        if first.get("type") == "connected":
            accepted += 1
            room = unique("fz")
            joined = await client.request({"type": "join", "room": room})
            assert joined["type"] in ("joined", "error"), joined
            if joined["type"] == "error":
                assert joined["code"] in (4003, 4000), joined
            reply = await client.request({"type": "publish", "room": room, "event": "e",
                                          "data": 1})
            assert reply["type"] in ("published", "error"), reply
            if reply["type"] == "error":
                assert reply["code"] in (4003, 4000), reply
            await client.close()
        else:
            refused += 1
            assert hostile, first
            code, frames = await client.closed(timeout=10)
            last = frames[-1] if frames else first
            assert code in REFUSALS and last.get("code") == code, (tok, first, code)
        dev = uid("fzdev")
        dev_claims = {**_claims(rng, dev, hostile), "kind": "device"}
        if rng.random() < 0.5:
            dev_claims.pop("rooms", None)
        try:
            connack = await connack_code(node, dev, jwt.encode(dev_claims, SECRET, "HS256"))
        except aiomqtt.MqttError as exc:  # not a CONNACK refusal: the node failed the device
            pytest.fail(f"MQTT connect with {dev_claims}: {exc!r}")
        assert connack in (0, 4, 5, 134, 135) and (connack == 0 or hostile), (dev_claims,
                                                                             connack)
    failures = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures[:3]]
    assert accepted and refused, (accepted, refused)  # each seed reaches both outcomes
    ok = await RawClient.connected(ws_url(node), token(uid("plain")))
    assert (await ok.request({"type": "ping"}))["type"] == "pong"
    await ok.close()
    code, _ = await refused_ws(node, "not a token")
    assert code == 4001
