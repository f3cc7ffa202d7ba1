"""Seeded hostile SSE requests over the network: rooms, tokens, cursors and rewinds of any shape.

Each request to ``/sse`` gets either a stream (that joins and then carries a room's event) or
an HTTP error whose JSON body names a client-side code (400/4000, 401/4001 or 4010, 403/4003,
429/4029), never a 5xx and never a stack trace; nothing fails inside the node, and a plain
stream works after every seed.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.test_sse import SseStream, sse_url
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

ERRORS = {(400, 4000), (401, 4001), (401, 4010), (403, 4003), (429, 4029)}


def _text(rng: random.Random) -> str:
    return rng.choice([
        "", " ", ",", ":", "::", "a" * 3000, "\u00e9\u4e2d", "%00", "a\x00b", "a\nb", "-1", "0",
        "1e3", "99999999999999999999999", "x:1,y:2", "fz:1:5", "@user:x", "sys:all:x", "a.b",
        "*", ">", "r:1,", ",r:1", "r:-1", "r:01", "r: 1", "\ufeff1",
    ]) if rng.random() < 0.6 else "".join(
        rng.choice("az09:_-.,@%* \u00e9") for _ in range(rng.randrange(1, 30)))


def _request(rng: random.Random, room: str, reader: str) -> tuple[list[tuple[str, str]],
                                                                   dict[str, str]]:
    params: list[tuple[str, str]] = []
    headers: dict[str, str] = {}
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        params.append(("room", rng.choice([room, f"{room},{room}", _text(rng)])))
    if rng.random() < 0.8:
        tok = rng.choice([reader, reader, token(ttl_s=10, now=time.time() - 60), _text(rng),
                          reader + "x", "Bearer " + reader])
        if rng.random() < 0.5:
            params.append(("token", tok))
        else:
            headers["Authorization"] = f"Bearer {tok}"
    if rng.random() < 0.4:
        cursor = rng.choice([f"{room}:{rng.randrange(5)}", f"{room}:{2**64}", _text(rng)])
        if rng.random() < 0.5:
            headers["Last-Event-ID"] = cursor
        else:
            params.append(("last_event_id", cursor))
    if rng.random() < 0.3:
        params.append(("rewind", rng.choice(["1", "0", "-5", "1000000", "abc", _text(rng)])))
    if rng.random() < 0.2:
        params.append((_text(rng)[:10] or "x", _text(rng)))
    # aiohttp will not write a control character in a header (tests/integration/test_http_edge.py
    # sends raw heads); in the query string it is percent-encoded and reaches the node.
    return params, {k: "".join(c if c >= " " else "?" for c in v) for k, v in headers.items()}


@pytest.mark.parametrize("seed", [41, 42])
async def test_seeded_hostile_sse_requests_get_a_stream_or_a_clear_error(
        make_node, seed: int, caplog) -> None:
    rng = random.Random(seed)
    node = await make_node()
    caplog.set_level(logging.WARNING)
    room = unique("fz")
    reader = token("fz-reader", rooms={"fz:*": ["join", "history"]})
    publisher = await RawClient.connected(ws_url(node), token("fz-pub"))
    streams = refused = 0
    async with aiohttp.ClientSession() as http:
        for i in range(60):
            params, headers = _request(rng, room, reader)
            if i == 0:  # a plain one first: each seed has a stream
                params, headers = [("room", room)], {"Authorization": f"Bearer {reader}"}
            async with http.get(sse_url(node), params=params, headers=headers) as resp:
                if resp.status == 200:
                    streams += 1
                    sse = SseStream(resp)
                    await sse.joined()
                    asked = {r for k, v in params if k == "room" for r in v.split(",")}
                    if room not in asked:
                        continue  # another room of the namespace ("fz:1:5"): joined is enough
                    sent = await publisher.request({"type": "publish", "room": room,
                                                    "event": "e", "data": streams})
                    while True:  # its own event comes, after any replayed ones
                        msg = await sse.message()
                        if msg.get("event") == "e" and f":{sent['seq']}" in msg.get("id", ""):
                            break
                    continue
                refused += 1
                body: Any = await resp.json(content_type=None)
                assert (resp.status, body.get("code")) in ERRORS, (params, headers, resp.status,
                                                                  body)
                assert isinstance(body.get("reason"), str) and "Traceback" not in body["reason"]
    failures = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures[:3]]
    assert streams and refused, (streams, refused)
    await publisher.close()
