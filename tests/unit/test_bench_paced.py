"""The paced fan-out of ``make bench`` (bench/fanout_clients.py ``_slot``): one event per
message on a fixed schedule, whatever has been delivered; a late publisher is reported. And
its subscribers' client (bench/fanout_subscriber.py) against a real websockets server, on
asyncio's loop and on uvloop's (the benchmark's)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.utils import accept_key

from bench.fanout_clients import _slot
from bench.fanout_results import LATE_S, BenchConfig, RunResult, problems
from bench.fanout_subscriber import Subscriber


def test_paced_publishes_one_frame_per_message() -> None:
    assert BenchConfig(rate=1000.0).batch == 1
    assert BenchConfig().batch > 1  # pipelined: several publish frames per message


async def test_a_slot_waits_for_its_time_and_a_late_one_is_noted() -> None:
    res = RunResult("rtnode", BenchConfig(subscribers=1, events=3, rate=50.0))
    start = time.time()
    await _slot(res, 2, start)  # the third event's time: 40 ms after the start
    assert time.time() - start >= 0.039
    assert res.late == 0.0
    await _slot(res, 0, start - 1.0)  # a second behind: sent at once, the lag noted
    assert res.late >= 1.0 > LATE_S
    res.sent = 3
    assert any("behind its schedule of 50 events/s" in line for line in problems(res))


BIG = "y" * 70_000  # a 10-byte header, and more than one read


async def _subscriber_round() -> list[object]:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("hello")
        async for message in ws:
            if message == "go":  # streaming: the frames the subscriber cuts out itself
                for m in ("a" * 300, b"\x00" * 126, BIG, "é"):
                    await ws.send(m)
                await asyncio.wait_for(await ws.ping(), 5.0)  # answered by websockets
                await ws.send("after the ping")
                continue
            await ws.send(f"echo {message!s}")
            await ws.send(b"\x01\x02")

    seen: list[object] = []
    async with serve(handler, "127.0.0.1", 0, subprotocols=["rtnode.v1.json"]) as server:
        port = server.sockets[0].getsockname()[1]
        sub = await Subscriber.open(f"ws://127.0.0.1:{port}/ws", "rtnode.v1.json", 5.0)
        seen.append(await sub.recv())
        sub.send("x")
        seen.append(await sub.recv())  # then every message to the handler, in order
        got = asyncio.Event()

        def take(message: str | bytes, now: float) -> None:
            seen.append(message)
            got.set()

        sub.stream(take)
        await asyncio.wait_for(got.wait(), 5.0)
        got.clear()
        sub.send("go")
        while seen[-1] != "after the ping":
            await asyncio.wait_for(got.wait(), 5.0)
            got.clear()
        await sub.close()
        seen.append(sub.close_code)
    return seen


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_subscriber_speaks_websocket_through_handshake_messages_and_close(loop: str) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    runner = factory()
    try:
        seen = runner.run_until_complete(asyncio.wait_for(_subscriber_round(), 20.0))
    finally:
        runner.close()
    assert seen == ["hello", "echo x", b"\x01\x02", "a" * 300, b"\x00" * 126, BIG, "é",
                    "after the ping", 1000]


async def _chunked_round(seed: int) -> tuple[list[object], bytes]:
    """A hand-made server: the 101 and the first message in one write, then messages of every
    header size, a ping and a close, all cut into seeded chunks (a header split anywhere)."""
    rng = random.Random(seed)
    got_pong = asyncio.Event()
    from_client = bytearray()

    def frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
        return head + payload

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                     + accept_key(key.decode()).encode() + b"\r\n\r\n" + frame(1, b"first"))
        await writer.drain()
        from_client.extend(await reader.read(1000))  # the client's "go"
        stream = b"".join([frame(1, b"x" * n) for n in (0, 125, 126, 300, 65535, 65536)]
                          + [frame(2, b"\x00\x01"), frame(9, b"p"), frame(1, "é".encode()),
                             frame(8, (1000).to_bytes(2, "big"))])
        pos = 0
        first = [4] if seed % 2 else []  # the first read ends just after a header
        while pos < len(stream):
            n = first.pop() if first else rng.choice([1, 2, 3, 4, 7, 100, 5000, 70000])
            writer.write(stream[pos:pos + n])
            pos += n
            await writer.drain()
            await asyncio.sleep(0.001)  # shapes the chunks the client reads, nothing awaited
        while not got_pong.is_set():
            data = await reader.read(1000)
            if not data:
                break
            from_client.extend(data)
            if b"\x8a" in from_client:  # a masked pong: FIN, opcode 10
                got_pong.set()
        writer.close()

    seen: list[object] = []
    server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        sub = await Subscriber.open(f"ws://127.0.0.1:{port}/ws", None, 5.0)
        seen.append(await sub.recv())
        done = asyncio.Event()

        def take(message: str | bytes, now: float) -> None:
            seen.append(message if len(message) < 10 else len(message))
            if message == "é":
                done.set()

        sub.stream(take)
        sub.send("go")
        await asyncio.wait_for(done.wait(), 10.0)
        await asyncio.wait_for(got_pong.wait(), 10.0)
        await asyncio.wait_for(asyncio.shield(sub.closed), 10.0)
        seen.append(sub.close_code)
    return seen, bytes(from_client)


@pytest.mark.parametrize("seed", range(8))
def test_subscriber_cuts_messages_out_of_any_chunks(seed: int) -> None:
    runner = uvloop.new_event_loop()
    try:
        seen, _ = runner.run_until_complete(asyncio.wait_for(_chunked_round(seed), 30.0))
    finally:
        runner.close()
    assert seen == ["first", "", 125, 126, 300, 65535, 65536, b"\x00\x01", "é", 1000]
