"""The WebSocket door itself, attacked over raw TCP (bridge/ws.py, bridge/http_guard.py).

The node parses ``GET /ws`` upgrades and WebSocket frames itself (websockets' sans-I/O
protocol), not aiohttp: each test sends seeded random handshakes or frames, cut into random TCP
writes, and checks the answer a client must get (101, or an HTTP error with the security
headers; a close frame with the RFC 6455 code) and that the node keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import struct
from typing import Any

import cbor2
import pytest

from tests.integration.test_hostile_input import still_serves
from tests.wsclient import RawClient, read_server_frame, token, ws_url

pytestmark = pytest.mark.integration

_CONTROL = [b for b in range(32) if b not in (9, 10, 13)]
SEEDS = [int(os.environ.get("RTNODE_WS_DOOR_SEED", 0)) or s for s in (3, 17)]


def handshake(rng: random.Random, path: str = "/ws", *, method: str = "GET",
              key: str | None = "", version: str = "13", upgrade: str | None = "websocket",
              protocols: list[str] | None = None, extra: int = 0) -> bytes:
    """A client handshake; ``key=""`` makes a valid random key, None leaves it out."""
    if key == "":
        key = base64.b64encode(rng.randbytes(16)).decode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if upgrade is not None:
        lines += [f"{rng.choice(['Upgrade', 'upgrade', 'UPGRADE'])}: {upgrade}",
                  "Connection: " + rng.choice(["Upgrade", "keep-alive, Upgrade", "upgrade"])]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines.append(f"Sec-WebSocket-Version: {version}")
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    lines += [f"X-Pad-{i}: {'v' * rng.randrange(1, 200)}" for i in range(extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send_in_pieces(writer: asyncio.StreamWriter, data: bytes, rng: random.Random) -> None:
    """``data`` in 1-4 random pieces, each written and drained on its own."""
    cuts = sorted(rng.sample(range(1, len(data)), min(rng.randrange(0, 4), len(data) - 1)))
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        writer.write(data[a:b])
        await writer.drain()
        await asyncio.sleep(0)  # a turn of the loop: the pieces arrive as separate reads


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True,
          rsv: int = 0, length: int | None = None) -> bytes:
    """One client frame, as RFC 6455 section 5.2 draws it (``length`` may lie)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame (unmasked): its opcode and payload."""
    return await asyncio.wait_for(read_server_frame(reader), 10)


def frames_of(payload: bytes) -> list[Any]:
    """The JSON frames of one text message (the node may join several, one per line)."""
    return [json.loads(line) for line in payload.split(b"\n") if line]


async def read_until_close(reader: asyncio.StreamReader) -> tuple[int | None, list[Any]]:
    """The close code the node sent (None: the socket ended without one) and the text frames
    that came before it."""
    frames: list[Any] = []
    while True:
        try:
            op, payload = await read_frame(reader)
        except asyncio.IncompleteReadError:
            return None, frames
        if op == 0x8:
            return (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None), frames
        if op == 0x1:
            frames += frames_of(payload)


async def opened(node: Any, rng: random.Random
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw WebSocket (JSON), connected with a token."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.http.port)
    await send_in_pieces(writer, handshake(rng), rng)
    status, _ = await read_head(reader)
    assert status == 101
    writer.write(frame(0x1, json.dumps({"type": "connect", "token": token("raw")}).encode()))
    op, payload = await read_frame(reader)
    assert op == 0x1 and json.loads(payload)["type"] == "connected", payload
    return reader, writer


def check_refusal(status: int, headers: dict[str, str], expected: int, what: str) -> None:
    assert status == expected, (what, status, headers)
    if "garbage" in what or "'get " in what:
        return  # aiohttp's own 400 for a head it cannot parse: no app, no response hooks
    assert headers.get("x-content-type-options") == "nosniff", (what, headers)
    assert "content-security-policy" in headers, (what, headers)


@pytest.mark.parametrize("seed", SEEDS)
async def test_seeded_handshakes_get_their_answer(make_node, seed: int, caplog) -> None:
    """Valid upgrades (any header case, offers in any order, unknown offers, big heads, cut
    anywhere) get 101 and the first codec offered; broken ones get their HTTP error, with the
    security headers, from the door or from aiohttp behind it, and no traceback in the log."""
    node = await make_node(allowed_origins="https://app.example")
    rng = random.Random(seed)
    known = ["rtnode.v1.json", "rtnode.v1.cbor"]
    for i in range(40):
        kind = rng.choice(["valid", "valid", "no-key", "bad-key", "version", "no-upgrade",
                           "path", "method", "origin", "garbage"])
        offers = rng.sample(["x.chat", *known, "rtnode.v9.json"], rng.randrange(0, 4))
        chosen = next((p for p in offers if p in known), None)
        hello = {"type": "connect", "token": token(f"h{i}")}
        hello_frame = (frame(0x2, cbor2.dumps(hello)) if chosen == known[1] else
                       frame(0x1, json.dumps(hello).encode()))
        early = rng.random() < 0.5  # the first frame right behind the head, in the same write
        if kind == "valid":
            data = handshake(rng, rng.choice(["/ws", "/ws?v=1"]), protocols=offers,
                             extra=rng.randrange(0, 20)) + (hello_frame if early else b"")
        elif kind == "no-key":
            data = handshake(rng, key=None)
        elif kind == "bad-key":
            data = handshake(rng, key=rng.choice(["short", "!!!!", "a" * 30]))
        elif kind == "version":
            data = handshake(rng, version=rng.choice(["8", "12", "x"]))
        elif kind == "no-upgrade":
            data = handshake(rng, upgrade=None)
        elif kind == "path":
            data = handshake(rng, rng.choice(["/ws/", "/wsx", "/WS", "/ws2?a=b"]))
        elif kind == "method":
            data = handshake(rng, method=rng.choice(["POST", "PUT", "get"]))
        elif kind == "origin":
            data = handshake(rng).replace(b"\r\n\r\n", b"\r\nOrigin: https://evil.example\r\n\r\n")
        else:
            data = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n" + bytes(
                rng.choice(_CONTROL) for _ in range(rng.randrange(1, 40))) + b"\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", node.http.port)
        await send_in_pieces(writer, data, rng)
        status, headers = await read_head(reader)
        what = f"seed {seed} #{i} {kind} {data[:300]!r}"
        if kind == "valid":
            assert status == 101, (what, status, headers)
            assert headers.get("sec-websocket-protocol") == chosen, (what, headers)
            assert headers.get("x-content-type-options") == "nosniff", (what, headers)
            if not early:
                writer.write(hello_frame)
            op, payload = await read_frame(reader)
            reply = cbor2.loads(payload) if op == 0x2 else json.loads(payload)
            assert op == (0x2 if chosen == known[1] else 0x1), (what, op)
            assert reply["type"] == "connected", (what, reply)
        else:
            expected = {"no-key": 400, "bad-key": 400, "version": 400, "no-upgrade": 426,
                        "path": 404, "method": 405 if data.startswith(b"P") else 400,
                        "origin": 403, "garbage": 400}[kind]
            check_refusal(status, headers, expected, what)
            if headers.get("connection") == "close":  # else aiohttp's keep-alive
                await asyncio.wait_for(reader.read(), 10)  # then it ends
        writer.close()
    await still_serves(node)
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


@pytest.mark.parametrize("seed", SEEDS)
async def test_seeded_fragmented_messages_across_any_reads(make_node, seed: int) -> None:
    """Requests in fragments, pings between the fragments, everything cut into random TCP
    writes: each request gets its one reply, in order, and each ping its pong."""
    node = await make_node()
    rng = random.Random(seed)
    reader, writer = await opened(node, rng)
    stream = b""
    pings = 0
    for i in range(60):
        text = json.dumps({"type": "ping", "id": i, "pad": "é" * rng.randrange(0, 300)},
                          ensure_ascii=False).encode()
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, 4)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        for j, piece in enumerate(pieces):  # a fragment may end inside a UTF-8 character
            stream += frame(0x1 if j == 0 else 0x0, piece, fin=j == len(pieces) - 1)
            if rng.random() < 0.3:
                stream += frame(0x9, b"p%d" % pings)
                pings += 1
    await send_in_pieces(writer, stream, rng)
    replies, pongs = [], []
    while len(replies) < 60 or len(pongs) < pings:
        op, payload = await read_frame(reader)
        if op == 0xA:
            pongs.append(payload)
        else:
            replies += frames_of(payload)
    assert [r["id"] for r in replies] == list(range(60)) and {r["type"] for r in replies} == {
        "pong"}
    assert pongs == [b"p%d" % k for k in range(pings)]
    writer.write(frame(0x8, struct.pack("!H", 1000)))
    code, _ = await read_until_close(reader)
    assert code == 1000, "the close handshake is answered"
    writer.close()


# What a client sends after the handshake, and the close code it must get back.
HOSTILE: dict[str, tuple[list[bytes], int]] = {
    "unmasked": ([frame(0x1, b'{"type":"ping"}', mask=False)], 1002),
    "continuation first": ([frame(0x0, b"x")], 1002),
    "new message inside a fragmented one": (
        [frame(0x1, b'{"type"', fin=False), frame(0x1, b":1}")], 1002),
    "reserved opcode": ([frame(0x3, b"x")], 1002),
    "rsv bit without extension": ([frame(0x1, b'{"type":"ping"}', rsv=4)], 1002),
    "fragmented ping": ([frame(0x9, b"x", fin=False)], 1002),
    "ping over 125 bytes": ([frame(0x9, b"x" * 126)], 1002),
    "invalid UTF-8 in a text message": ([frame(0x1, b'{"type":"ping","x":"\xff"}')], 1007),
    "invalid UTF-8 cut across fragments": (
        [frame(0x1, b'{"x":"\xe2\x82', fin=False), frame(0x0, b'"}')], 1007),
    "length of 2**63": ([frame(0x1, b"", length=2**63 - 1)[:14]], 1009),
    "message too big in fragments": (
        [frame(0x1, b"x" * 65000, fin=False)] + [frame(0x0, b"x" * 65000, fin=False)] * 19,
        1009),
    "close code out of range": ([frame(0x8, struct.pack("!H", 999))], 1002),
    "close reason not UTF-8": ([frame(0x8, struct.pack("!H", 1000) + b"\xff")], 1007),
}


@pytest.mark.parametrize("seed", SEEDS)
async def test_hostile_frames_get_their_close_code(make_node, seed: int) -> None:
    """Each broken frame ends its connection with RFC 6455's code, after the replies owed to
    what came before it and a ``disconnect`` frame that says why, whatever the TCP cuts; the
    connections beside it and new ones are served."""
    node = await make_node()
    rng = random.Random(seed)
    bystander = await RawClient.connected(ws_url(node), token("bystander"))
    cases = list(HOSTILE.items()) * 2
    rng.shuffle(cases)
    for name, (frames, code) in cases:
        reader, writer = await opened(node, rng)
        good = rng.randrange(0, 3)  # valid requests first: their replies come before the close
        data = b"".join(frame(0x1, b'{"type":"ping","id":%d}' % k) for k in range(good))
        await send_in_pieces(writer, data + b"".join(frames), rng)
        got, replies = await read_until_close(reader)
        assert got == code, (seed, name, got)
        assert [r.get("id") for r in replies if r.get("type") == "pong"] == list(range(good)), (
            seed, name, replies)
        assert replies[-1]["type"] == "disconnect" and replies[-1]["code"] == code, (
            seed, name, replies)
        writer.close()
    assert (await bystander.request({"type": "ping"}))["type"] == "pong"
    await still_serves(node)


async def test_a_peer_that_answers_pings_stays(make_node) -> None:
    """The heartbeat pings a quiet connection every round; one that answers each ping (and
    sends nothing else) is kept through many rounds, and still served."""
    node = await make_node(heartbeat_s=0.2, connect_timeout_s=30)
    reader, writer = await opened(node, random.Random(5))
    for k in range(6):  # about 6 rounds of 0.2 s: more than the 2 a silent peer gets
        op, payload = await read_frame(reader)
        assert op == 0x9, (k, op, payload)
        writer.write(frame(0xA, payload))
    writer.write(frame(0x1, b'{"type":"ping","id":"still"}'))
    while True:
        op, payload = await read_frame(reader)
        if op == 0x1:
            break
        assert op == 0x9
        writer.write(frame(0xA, payload))
    assert frames_of(payload) == [{"type": "pong", "id": "still"}]
    writer.close()


async def test_compression_is_negotiated_and_compressed_input_is_read(make_node) -> None:
    """With ws_compression, permessage-deflate is agreed; the client's compressed messages are
    read (a large one too) and the node's uncompressed ones, which the extension allows, are
    read by the client."""
    from websockets.asyncio.client import connect

    node = await make_node(ws_compression=True)
    room = f"deflate-{random.randrange(1 << 30)}"
    async with connect(ws_url(node), subprotocols=["rtnode.v1.json"],  # type: ignore[list-item]
                       compression="deflate") as ws:
        assert "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions")
                                        or "")
        await ws.send(json.dumps({"type": "connect", "token": token("zip"), "id": 1}))
        assert frames_of((await ws.recv()).encode())[0]["type"] == "connected"
        await ws.send(json.dumps({"type": "join", "room": room, "id": 2}))
        big = "abc" * 15000  # 45 KB, a few hundred bytes compressed
        await ws.send(json.dumps({"type": "publish", "room": room, "event": "e",
                                  "data": big, "id": 3}))
        got: list[Any] = []
        while not any(f.get("type") == "event" for f in got):
            got += frames_of((await ws.recv()).encode())
        [event] = [f for f in got if f.get("type") == "event"]
        assert event["data"] == big


async def test_an_upgrade_head_beyond_the_door_bound_is_refused(make_node) -> None:
    """A ``GET /ws`` head longer than the door keeps (16 KiB) is refused with 431, however it
    is cut into writes (whole in one, or a line at a time), and the node serves on."""
    node = await make_node()
    rng = random.Random(9)
    data = handshake(rng, extra=120)  # many headers of up to 200 bytes, and one long one
    data = data.replace(b"X-Pad-0:", b"X-Pad-0: " + b"w" * 6000 + b"x")
    assert len(data) > 16384
    for pieces in ([data], data.split(b"\r\n")):
        reader, writer = await asyncio.open_connection("127.0.0.1", node.http.port)
        for k, piece in enumerate(pieces):
            writer.write(piece if len(pieces) == 1 or k == len(pieces) - 1 else piece + b"\r\n")
            await writer.drain()
        status, headers = await read_head(reader)
        assert status == 431, (status, headers)
        assert headers["content-type"] == "application/json"
        writer.close()
    await still_serves(node)


@pytest.mark.parametrize("compression", [False, True])
async def test_an_open_connection_keeps_no_handshake_request(make_node, compression,
                                                             monkeypatch) -> None:
    """Once the 101 is out, nothing of the connection holds the handshake's request (its
    headers: ~0.5 KB per idle connection, issue 12), and frames are read as before: a message
    sent behind the head in the same write, then a fragmented one (compressed when agreed)."""
    import gc
    import weakref

    from bridge.ws import WsConnection

    seen: list[weakref.ref[Any]] = []
    answer = WsConnection._open

    def spying_open(self: WsConnection, request: Any) -> None:
        seen.append(weakref.ref(request))
        answer(self, request)

    monkeypatch.setattr(WsConnection, "_open", spying_open)
    node = await make_node(ws_compression=compression)
    head = handshake(random.Random(11), protocols=["rtnode.v1.json"])
    if compression:
        head = head.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate"
                                         b"\r\n\r\n", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.http.port)
    hello = json.dumps({"type": "connect", "token": token("lean"), "id": 1}).encode()
    writer.write(head + frame(0x1, hello))
    status, headers = await read_head(reader)
    assert status == 101
    assert ("permessage-deflate" in headers.get("sec-websocket-extensions", "")) == compression
    op, payload = await read_frame(reader)
    assert op == 0x1 and frames_of(payload)[0]["type"] == "connected"
    ping = b'{"type":"ping","id":"after"}'
    writer.write(frame(0x1, ping[:10], fin=False) + frame(0x0, ping[10:]))
    op, payload = await read_frame(reader)
    assert op == 0x1 and frames_of(payload) == [{"type": "pong", "id": "after"}]
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None, "the handshake request is still held"
    writer.close()
