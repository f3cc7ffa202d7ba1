"""Two nodes on one nats-server; kill -9 of one in the middle of a 5,000-event stream.

Its clients reconnect to the other node and resume: every acked event reaches every member
exactly once, in stream order.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from devices.client import Client, Event, Resync
from tests.servers import NatsProcess, NodeProcess
from tests.wsclient import SECRET, token, unique

pytestmark = pytest.mark.integration

TOTAL = 5000
FAST = ["--rate-per-s", "1000000", "--rate-burst", "1000000"]


def _node(tmp: Path, name: str, nats_url: str) -> NodeProcess:
    return NodeProcess(tmp / name, "--nats-url", nats_url, *FAST, name=name,
                       env={"RTNODE_JWT_SECRET": SECRET}).start()


async def _collect(client: Client, room: str, got: list[int], resyncs: list[Resync],
                   progress: asyncio.Event) -> None:
    async for item in client.events():
        if isinstance(item, Resync):
            resyncs.append(item)
        elif isinstance(item, Event) and item.room == room and item.seq is not None:
            got.append(item.seq)
            progress.set()


async def test_kill_9_of_a_node_loses_and_doubles_nothing(tmp_path: Path,
                                                          nats_proc: NatsProcess) -> None:
    n1, n2 = _node(tmp_path, "k1", nats_proc.url), _node(tmp_path, "k2", nats_proc.url)
    try:
        await asyncio.to_thread(n1.wait_ready)
        await asyncio.to_thread(n2.wait_ready)
        room = unique("kill")
        urls_1 = [n1.ws_url, n2.ws_url]
        members = [Client(urls_1, token=token(f"m{i}"), min_backoff_s=0.05, max_backoff_s=0.5)
                   for i in range(3)]
        members.append(Client([n2.ws_url], token=token("m3")))
        pub_1 = Client(urls_1, token=token("p1"), min_backoff_s=0.05, max_backoff_s=0.5)
        pub_2 = Client([n2.ws_url], token=token("p2"))
        for c in (*members, pub_1, pub_2):
            await c.__aenter__()
        for c in members:
            await c.join(room)
        acked: list[int] = []
        got: list[list[int]] = [[] for _ in members]
        resyncs: list[Resync] = []
        progress = asyncio.Event()
        readers = [asyncio.create_task(_collect(c, room, got[i], resyncs, progress))
                   for i, c in enumerate(members)]

        async def all_received() -> None:
            while not all(set(acked).issubset(g) for g in got):
                progress.clear()
                await progress.wait()

        third_acked = asyncio.Event()

        async def publish(client: Client, start: int, n: int) -> None:
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                async with sem:
                    seq = await client.publish(room, "e", {"i": i}, msg_id=f"e-{i}")
                    assert seq is not None
                    acked.append(seq)
                    if len(acked) >= TOTAL // 3:
                        third_acked.set()

            await asyncio.gather(*(one(i) for i in range(start, start + n)))

        async def killer() -> None:
            await third_acked.wait()
            assert n1.proc is not None
            os.kill(n1.proc.pid, signal.SIGKILL)

        await asyncio.wait_for(asyncio.gather(
            publish(pub_1, 0, TOTAL // 2), publish(pub_2, TOTAL // 2, TOTAL - TOTAL // 2),
            killer()), 180)
        assert len(acked) == TOTAL and len(set(acked)) == TOTAL, "each publish stored once"
        try:
            await asyncio.wait_for(all_received(), 120)
        except TimeoutError:
            report = [(len(g), len(set(acked) - set(g)), sorted(set(acked) - set(g))[:10],
                       c.reconnects, c.state) for g, c in zip(got, members, strict=True)]
            raise AssertionError(f"members incomplete: {report}; resyncs {resyncs}") from None
        for reader in readers:
            reader.cancel()
        assert not resyncs, f"recovery was never partial: {resyncs}"
        for seqs in got:
            assert len(seqs) == len(set(seqs)), "no event twice"
            assert seqs == sorted(seqs), "stream order"
            assert set(acked).issubset(seqs), "every acked event"
        assert members[0].reconnects >= 1 and pub_1.reconnects >= 1
        for c in (*members, pub_1, pub_2):
            await c.close()
    finally:
        n1.stop()
        n2.stop()
