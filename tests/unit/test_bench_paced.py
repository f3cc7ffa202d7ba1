"""The paced fan-out of ``make bench`` (bench/fanout_clients.py ``_slot``): one event per
message on a fixed schedule, whatever has been delivered; a late publisher is reported. And
its subscribers' client (bench/fanout_subscriber.py) against a real websockets server, on
asyncio's loop and on uvloop's (the benchmark's)."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from websockets.asyncio.server import ServerConnection, serve

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
