"""Exact recovery under NATS faults: the two ways resuming clients used to miss acked events.

Both run a 3-server NATS cluster (R3 room stream) and two nodes:

1. **The epoch never moves unless the stream is recreated.** nats-server 2.14.0 rewrites a
   stream's ``created`` time on an idempotent ``add_stream``, and the node used to derive its
   epoch from that time: after a node restart, a follower's kill -9 and restart, and a leader
   move onto it, the other node's readiness probe switched epochs ("stream recreated") and a
   subscriber that had missed 10 acked events rejoined with ``since`` and got none of them.
2. **Recovery never trusts a replica that is behind.** A direct get is answered by any replica,
   including a follower just resumed from a pause. The node is connected to that follower's
   server only, so its direct gets are answered there (NATS prefers a local queue subscriber);
   10 events are acked through the other node while the follower is paused; the subscriber
   rejoins with ``since`` just as it resumes. Every round must replay exactly those 10 events.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import nats
import pytest

from bridge.subjects import STREAM_NAME
from tests.cluster import NatsCluster
from tests.servers import NodeProcess, wait_until
from tests.wsclient import SECRET, RawClient, token, unique

pytestmark = pytest.mark.integration

FAST = ["--rate-per-s", "1000000", "--rate-burst", "1000000"]


@pytest.fixture
def cluster(tmp_path: Path):
    c = NatsCluster(tmp_path).start()
    yield c
    c.stop()


def _node(tmp: Path, name: str, urls: list[str]) -> NodeProcess:
    return NodeProcess(tmp / name, "--nats-url", ",".join(urls), "--stream-replicas", "3",
                       *FAST, name=name, env={"RTNODE_JWT_SECRET": SECRET}).start()


async def _stepdown_to(cluster: NatsCluster, target: int) -> None:
    """Move the stream's leadership to server ``target`` (step-downs with a preferred peer)."""
    nc = await nats.connect(servers=[s.url for i, s in enumerate(cluster.servers)
                                     if cluster.alive(i)], connect_timeout=2)
    try:
        for _ in range(20):
            await asyncio.to_thread(
                wait_until, lambda: cluster.stream_leader(STREAM_NAME) is not None, 15)
            if cluster.stream_leader(STREAM_NAME) == target:
                return
            body = json.dumps({"placement": {"preferred": cluster.servers[target].name}})
            try:
                await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM_NAME}",
                                 body.encode(), timeout=5)
            except Exception:  # an election in progress: ask again
                pass
            await asyncio.to_thread(
                wait_until, lambda: cluster.stream_leader(STREAM_NAME) is not None, 15)
        raise AssertionError(f"stream leader never moved to n{target}")
    finally:
        await nc.close()


async def _publish(url: str, room: str, n: int, tag: str) -> list[int]:
    pub = await RawClient.connected(url, token(f"pub-{tag}"))
    try:
        seqs = []
        for i in range(n):
            reply = await pub.request({"type": "publish", "room": room, "event": "e",
                                       "data": {"i": i}, "msg_id": f"{tag}-{i}"}, timeout=30)
            assert reply["type"] == "published", reply
            seqs.append(reply["seq"])
        return seqs
    finally:
        await pub.close()


async def _rejoin(url: str, room: str, since: int, epoch: str, n: int,
                  sub: str) -> tuple[dict, list[int]]:
    """Rejoin with ``since``/``epoch``; the ``joined`` reply and the seqs of ``n`` events."""
    c = await RawClient.connected(url, token(sub))
    try:
        joined = await c.request({"type": "join", "room": room,
                                  "since": {"seq": since, "epoch": epoch}}, timeout=30)
        assert joined["type"] == "joined", joined
        got = [f["seq"] for f in await c.events(n, room, timeout=15)] if n else []
        return joined, got
    finally:
        await c.close()


async def test_the_epoch_holds_through_restarts_and_leader_moves(
        tmp_path: Path, cluster: NatsCluster) -> None:
    a, b = _node(tmp_path, "ea", cluster.urls), _node(tmp_path, "eb", cluster.urls)
    try:
        await asyncio.to_thread(a.wait_ready, 30)
        await asyncio.to_thread(b.wait_ready, 30)
        room = unique("epoch")
        first = await RawClient.connected(b.ws_url, token("watcher"))
        joined = await first.request({"type": "join", "room": room})
        epoch, since = joined["epoch"], joined["seq"]
        await first.close()

        # Restart node A (a second create of the stream), then kill -9 and restart a follower
        # and move the stream's leadership onto it.
        a.stop()
        a = _node(tmp_path, "ea2", cluster.urls)
        await asyncio.to_thread(a.wait_ready, 30)
        leader = cluster.stream_leader(STREAM_NAME)
        follower = next(i for i in range(3) if i != leader)
        cluster.kill(follower)
        await asyncio.to_thread(cluster.restart, follower)
        await _stepdown_to(cluster, follower)
        for _ in range(5):  # the readiness probe is where the old code switched epochs
            await asyncio.to_thread(b.wait_ready, 30)

        seqs = await _publish(a.ws_url, room, 10, "ep")
        joined, got = await _rejoin(b.ws_url, room, since, epoch, 10, "watcher")
        assert joined["epoch"] == epoch, (joined, b.log())
        assert joined["recovered"] is True and joined["replayed"] == 10, joined
        assert got == seqs
        assert "stream recreated" not in b.log() + a.log()
    finally:
        a.stop()
        b.stop()


async def test_recovery_never_trusts_a_replica_that_is_behind(
        tmp_path: Path, cluster: NatsCluster) -> None:
    a = _node(tmp_path, "sa", cluster.urls)
    await asyncio.to_thread(a.wait_ready, 30)
    leader = await asyncio.to_thread(
        wait_until, lambda: cluster.stream_leader(STREAM_NAME), 15)
    follower = next(i for i in range(3) if i != leader)
    others = [s.url for i, s in enumerate(cluster.servers) if i != follower]
    # Node B reaches NATS through the follower's server only; node A through the others.
    b = _node(tmp_path, "sb", [cluster.servers[follower].url])
    a2 = _node(tmp_path, "sa2", others)
    try:
        await asyncio.to_thread(b.wait_ready, 30)
        await asyncio.to_thread(a2.wait_ready, 30)
        room = unique("stale")
        c = await RawClient.connected(b.ws_url, token("reader"))
        joined = await c.request({"type": "join", "room": room})
        epoch, since = joined["epoch"], joined["seq"]
        await c.close()
        rounds = []
        for r in range(8):
            proc = cluster.servers[follower].proc
            assert proc is not None
            c = await RawClient.connected(b.ws_url, token("reader"))
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                seqs = await _publish(a2.ws_url, room, 10, f"r{r}")
                # The rejoin's reads wait in the paused server's socket, beside the
                # replication traffic that would bring it up to date: whichever it handles
                # first decides what a direct get would answer.
                await c.send({"type": "join", "id": "j", "room": room,
                              "since": {"seq": since, "epoch": epoch}})
                await asyncio.sleep(0.3)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            joined = await c.until("joined", timeout=30)
            got = [f["seq"] for f in await c.events(len(seqs), room, timeout=15)]
            await c.close()
            rounds.append((joined["recovered"], joined["replayed"]))
            assert joined["recovered"] is True, (r, joined)
            assert joined["replayed"] == 10, (r, joined, rounds)
            assert got == seqs, (r, got, seqs)
            since = seqs[-1]
    finally:
        for node in (a, b, a2):
            node.stop()
