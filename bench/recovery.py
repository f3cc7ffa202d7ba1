"""What a recovery costs: the latency of a rejoin with ``since`` beside a plain join, same run.

A node (its embedded nats-server, rate limits lifted) and two WebSocket clients: for each of
``--rounds`` rounds, the publisher stores ``--missed`` events while the subscriber is out of the
room, then the subscriber rejoins with ``since`` (and its epoch) and receives them; the time from
sending the join to the last replayed event is one sample. Its baseline, measured in the same
rounds: a plain join (no ``since``, nothing replayed) of the same room.

A recovery asks the stream leader for the room's latest seq, whether ``since`` is still stored,
and confirms that the replay read is complete (docs/protocol-notes.md, "Reads are checked with
the stream leader"); the plain join reads nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from tests.servers import NodeProcess
from tests.wsclient import SECRET, RawClient, token, unique

__all__ = ["main"]


async def _run(rounds: int, missed: int) -> tuple[list[float], list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="rtnode-bench-recovery-"))
    node = NodeProcess(tmp / "node", "--rate-per-s", "1000000", "--rate-burst", "1000000",
                       name="bench-recovery", env={"RTNODE_JWT_SECRET": SECRET}).start()
    try:
        await asyncio.to_thread(node.wait_ready, 30)
        room = unique("recovery")
        pub = await RawClient.connected(node.ws_url, token("bench-pub"))
        sub = await RawClient.connected(node.ws_url, token("bench-sub"))
        joined = await sub.request({"type": "join", "room": room})
        epoch, since = joined["epoch"], joined["seq"]
        await sub.request({"type": "leave", "room": room})
        recovering: list[float] = []
        plain: list[float] = []
        for _ in range(rounds):
            for i in range(missed):
                await pub.request({"type": "publish", "room": room, "event": "e", "data": i})
            started = time.perf_counter()
            joined = await sub.request({"type": "join", "room": room,
                                        "since": {"seq": since, "epoch": epoch}})
            events = await sub.events(missed, room)
            recovering.append((time.perf_counter() - started) * 1000)
            assert joined["recovered"] and joined["replayed"] == missed, joined
            since = events[-1]["seq"]
            await sub.request({"type": "leave", "room": room})
            started = time.perf_counter()
            await sub.request({"type": "join", "room": room})
            plain.append((time.perf_counter() - started) * 1000)
            await sub.request({"type": "leave", "room": room})
        await pub.close()
        await sub.close()
        return recovering, plain
    finally:
        node.stop()


def _line(name: str, samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"{name:<34} p50 {q[49]:6.2f} ms   p99 {q[98]:6.2f} ms   max {max(samples):6.2f} ms"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench recovery", description=__doc__)
    parser.add_argument("--rounds", type=int, default=200, help="rejoins measured")
    parser.add_argument("--missed", type=int, default=10, help="events missed per rejoin")
    args = parser.parse_args(argv)
    recovering, plain = asyncio.run(_run(args.rounds, args.missed))
    print(f"recovery latency, {args.rounds} rounds, {args.missed} events missed each "
          "(one node, its embedded nats-server, loopback)")
    print(_line(f"rejoin with since ({args.missed} replayed)", recovering))
    print(_line("baseline: plain join", plain))
    return 0
