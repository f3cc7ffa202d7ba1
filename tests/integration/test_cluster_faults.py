"""Fault tests on a local 3-server NATS cluster (R3 room stream) with 2 rtnode nodes.

Each test streams 5,000 events into one room from a publisher on each node (``Client.publish``
with a ``msg_id``, retried by the client and by the node's store), injects a fault a third of
the way in, then checks:

- every acked event is stored exactly once (the stream itself, read straight from JetStream);
- every member (``Client`` subscribers on both nodes, reconnected ones included) received every
  acked event exactly once, in stream order, with no partial recovery (``Resync``);
- nothing is stuck: an event published after the fault reaches every member.

The faults: kill -9 of the stream leader (a leader election of a few seconds), kill -9 of a
node (its clients move to the other node), and a 10 s cut of one node's NATS connection through
a TCP proxy. The figures (events, acked, delivered, time to recover) are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from devices.client import Client, Event, Resync
from node.nats_server import free_port
from node.protocol.frames import cbor_loads_strict
from node.protocol.subjects import STREAM_NAME, room_subject
from tests.cluster import NatsCluster, TcpProxy, cluster_node
from tests.servers import NodeProcess, http_get, wait_until
from tests.wsclient import token, unique

pytestmark = pytest.mark.integration

TOTAL = 5000
WINDOW = 64  # publishes in flight per publisher
CUT_S = 10.0


def _client(urls: str | list[str], name: str) -> Client:
    return Client(urls, token=token(name), min_backoff_s=0.05, max_backoff_s=0.5)


@dataclass
class Member:
    client: Client
    label: str
    got: list[int] = field(default_factory=list)


@dataclass
class Run:
    """One room, its members and publishers, and what each saw."""

    room: str
    members: list[Member]
    acked: dict[str, int] = field(default_factory=dict)  # msg_id -> seq
    ack_times: list[float] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # msg_id -> error
    resyncs: list[tuple[str, Resync]] = field(default_factory=list)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        for m in self.members:
            await m.client.join(self.room)
            self.readers.append(asyncio.create_task(self._collect(m)))

    async def _collect(self, m: Member) -> None:
        async for item in m.client.events():
            if isinstance(item, Resync):
                self.resyncs.append((m.label, item))
            elif isinstance(item, Event) and item.room == self.room and item.seq is not None:
                m.got.append(item.seq)
                self.progress.set()

    async def publish(self, client: Client, prefix: str, n: int,
                      on_ack: Callable[[], None] | None = None) -> None:
        sem = asyncio.Semaphore(WINDOW)

        async def one(i: int) -> None:
            mid = f"{prefix}-{i}"
            async with sem:
                try:
                    seq = await client.publish(self.room, "e", {"i": i}, msg_id=mid)
                except Exception as exc:  # reported and checked: stored at most once
                    self.failed[mid] = repr(exc)
                    return
            assert seq is not None
            self.acked[mid] = seq
            self.ack_times.append(time.monotonic())
            if on_ack is not None:
                on_ack()

        await asyncio.gather(*(one(i) for i in range(n)))

    async def wait_members_have(self, seqs: set[int], timeout: float) -> None:
        async def have_all() -> None:
            while not all(seqs.issubset(m.got) for m in self.members):
                self.progress.clear()
                await self.progress.wait()

        try:
            await asyncio.wait_for(have_all(), timeout)
        except TimeoutError:
            report = [(m.label, len(m.got), len(seqs - set(m.got)),
                       sorted(seqs - set(m.got))[:10], m.client.reconnects, m.client.state)
                      for m in self.members]
            raise AssertionError(f"members incomplete: {report}; resyncs {self.resyncs}") \
                from None

    async def stop(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)

    def stall_after(self, t: float) -> float:
        """The longest pause between acks after ``t`` (how long publishing was held up)."""
        times = sorted([t, *(x for x in self.ack_times if x >= t)])
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def _stored(urls: list[str], room: str) -> list[tuple[int, str]]:
    """(seq, msg_id) of every event of ``room`` in the stream, read straight from JetStream.

    The last seq comes from the stream leader (``STREAM.MSG.GET``); the events from batched
    direct gets (any replica answers; a lagging one only makes the loop ask again). No consumer
    is created: that needs the meta leader and the stream's peers, not what is checked here.
    """
    async def quiet(exc: Exception) -> None:  # a killed server in the list is expected
        pass

    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=3,
                            error_cb=quiet)
    try:
        js = nc.jetstream(timeout=10)
        subject = room_subject("default", room)
        last = (await js.get_last_msg(STREAM_NAME, subject)).seq
        out: list[tuple[int, str]] = []
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        deadline = time.monotonic() + 30
        while (out[-1][0] if out else 0) < last:
            assert time.monotonic() < deadline, f"stream read stuck at {out[-1:]} of {last}"
            after = out[-1][0] if out else 0
            request = {"seq": after + 1, "next_by_subj": subject, "batch": 500}
            await nc.publish(f"$JS.API.DIRECT.GET.{STREAM_NAME}", json.dumps(request).encode(),
                             reply=inbox)
            while True:  # one batch: messages, then a status (204 end of batch, 404 none)
                msg = await sub.next_msg(timeout=10)
                headers = msg.headers or {}
                if "Status" in headers:
                    break
                event = cbor_loads_strict(msg.data)
                out.append((int(headers["Nats-Sequence"]), event.get("msg_id")))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def _check(run: Run, urls: list[str], total: int, title: str,
                 figures: dict[str, object]) -> None:
    """The three guarantees, then the figures."""
    # Nothing stuck: a new event after the fault reaches every member.
    after_pub = run.members[0].client
    t0 = time.monotonic()
    seq_after = await after_pub.publish(run.room, "after", {}, msg_id="after-fault")
    assert seq_after is not None
    run.acked["after-fault"] = seq_after
    acked_seqs = set(run.acked.values())
    await run.wait_members_have(acked_seqs, 60)
    figures["after-fault event delivered in"] = f"{time.monotonic() - t0:.2f} s"
    await run.stop()

    # Every acked event stored exactly once.
    stored = await _stored(urls, run.room)
    ids = Counter(mid for _, mid in stored)
    twice = [mid for mid, n in ids.items() if n > 1]
    assert not twice, f"stored more than once: {twice[:10]}"
    by_id = {mid: seq for seq, mid in stored}
    for mid, seq in run.acked.items():
        assert by_id.get(mid) == seq, f"acked {mid} at seq {seq}, stored at {by_id.get(mid)}"
    assert len(run.acked) == total + 1, f"publishes not acked: {run.failed}"

    # Every member: every acked event, exactly once, in order, no partial recovery.
    assert not run.resyncs, f"recovery was never partial: {run.resyncs}"
    for m in run.members:
        assert len(m.got) == len(set(m.got)), f"{m.label}: an event twice"
        assert m.got == sorted(m.got), f"{m.label}: stream order"
        assert acked_seqs.issubset(m.got), f"{m.label}: every acked event"

    figures.update({
        "events published": total + 1, "acked": len(run.acked), "failed": len(run.failed),
        "stored (room)": len(stored),
        "delivered per member": {m.label: len(m.got) for m in run.members},
        "reconnects per member": {m.label: m.client.reconnects for m in run.members},
    })
    print(f"\n[{title}]")
    for key, value in figures.items():
        print(f"  {key}: {value}")


def _metric(node: NodeProcess, name: str) -> float | None:
    """One value of the node's /metrics (None when absent)."""
    _status, body = http_get(node.base + "/metrics")
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest_asyncio.fixture
async def opened() -> AsyncIterator[Callable[[Client], Awaitable[Client]]]:
    """Enter clients; all are closed at the end."""
    clients: list[Client] = []

    async def enter(c: Client) -> Client:
        await c.__aenter__()
        clients.append(c)
        return c

    yield enter
    for c in clients:
        await c.close()


async def test_kill_9_of_the_stream_leader_during_a_5000_event_publish(
        tmp_path: Path, cluster: NatsCluster, opened) -> None:
    a, b = cluster_node(tmp_path, "la", cluster.urls), cluster_node(tmp_path, "lb", cluster.urls)
    try:
        await asyncio.to_thread(a.wait_ready, 30)
        await asyncio.to_thread(b.wait_ready, 30)
        leader = cluster.stream_leader(STREAM_NAME)
        assert leader is not None, "the room stream has a leader"
        run = Run(unique("leader"), [
            Member(await opened(_client(a.ws_url, "ma0")), "A0"),
            Member(await opened(_client(a.ws_url, "ma1")), "A1"),
            Member(await opened(_client(b.ws_url, "mb0")), "B0"),
            Member(await opened(_client(b.ws_url, "mb1")), "B1"),
        ])
        await run.start()
        pub_a = await opened(_client(a.ws_url, "pa"))
        pub_b = await opened(_client(b.ws_url, "pb"))
        third = asyncio.Event()
        killed_at: list[float] = []

        def on_ack() -> None:
            if len(run.acked) >= TOTAL // 3:
                third.set()

        async def killer() -> None:
            await third.wait()
            cluster.kill(leader)
            killed_at.append(time.monotonic())

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(
            run.publish(pub_a, "a", TOTAL // 2, on_ack),
            run.publish(pub_b, "b", TOTAL - TOTAL // 2, on_ack),
            killer()), 120)
        publish_s = time.monotonic() - started
        new_leader = await asyncio.to_thread(
            wait_until, lambda: cluster.stream_leader(STREAM_NAME) is not None, 15)
        new_leader = cluster.stream_leader(STREAM_NAME)
        await _check(run, cluster.urls, TOTAL, "kill -9 of the stream leader", {
            "stream leader killed": f"n{leader} (new leader n{new_leader})",
            "acked when killed": TOTAL // 3,
            "publish of 5,000 took": f"{publish_s:.1f} s",
            "longest ack stall after the kill (time to recover)":
                f"{run.stall_after(killed_at[0]):.2f} s",
            "gap repairs (node A, node B)": (_metric(a, "rtnode_gap_repairs_total"),
                                             _metric(b, "rtnode_gap_repairs_total")),
        })
    finally:
        a.stop()
        b.stop()


async def test_kill_9_of_a_node_during_the_stream(tmp_path: Path, cluster: NatsCluster,
                                                   opened) -> None:
    a, b = cluster_node(tmp_path, "ka", cluster.urls), cluster_node(tmp_path, "kb", cluster.urls)
    try:
        await asyncio.to_thread(a.wait_ready, 30)
        await asyncio.to_thread(b.wait_ready, 30)
        both = [a.ws_url, b.ws_url]
        run = Run(unique("node"), [
            Member(await opened(_client(both, "m0")), "A0->B"),
            Member(await opened(_client(both, "m1")), "A1->B"),
            Member(await opened(_client(both, "m2")), "A2->B"),
            Member(await opened(_client(b.ws_url, "m3")), "B3"),
        ])
        await run.start()
        pub_1 = await opened(_client(both, "p1"))
        pub_2 = await opened(_client(b.ws_url, "p2"))
        third = asyncio.Event()
        killed_at: list[float] = []

        def on_ack() -> None:
            if len(run.acked) >= TOTAL // 3:
                third.set()

        async def killer() -> None:
            await third.wait()
            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(
            run.publish(pub_1, "p1", TOTAL // 2, on_ack),
            run.publish(pub_2, "p2", TOTAL - TOTAL // 2, on_ack),
            killer()), 120)
        publish_s = time.monotonic() - started
        # Time to recover: the moved members have every event acked so far.
        await run.wait_members_have(set(run.acked.values()), 60)
        recovered_s = time.monotonic() - killed_at[0]
        await _check(run, cluster.urls, TOTAL, "kill -9 of a node", {
            "acked when killed": TOTAL // 3,
            "publish of 5,000 took": f"{publish_s:.1f} s",
            "longest ack stall after the kill": f"{run.stall_after(killed_at[0]):.2f} s",
            "kill -> every member has every acked event": f"{recovered_s:.2f} s",
        })
        for m in run.members[:3]:
            assert m.client.reconnects >= 1, f"{m.label} moved to the other node"
        assert pub_1.reconnects >= 1
    finally:
        a.stop()
        b.stop()


async def test_a_10s_cut_of_a_nodes_nats_connection(tmp_path: Path, cluster: NatsCluster,
                                                     opened) -> None:
    proxy = await TcpProxy(free_port(), "127.0.0.1", cluster.servers[0].port).start()
    a = cluster_node(tmp_path, "pa", cluster.urls)
    b = cluster_node(tmp_path, "pb", [proxy.url])  # node B reaches NATS only through the proxy
    try:
        await asyncio.to_thread(a.wait_ready, 30)
        await asyncio.to_thread(b.wait_ready, 30)
        run = Run(unique("cut"), [
            Member(await opened(_client(a.ws_url, "ma0")), "A0"),
            Member(await opened(_client(a.ws_url, "ma1")), "A1"),
            Member(await opened(_client(b.ws_url, "mb0")), "B0"),
            Member(await opened(_client(b.ws_url, "mb1")), "B1"),
        ])
        await run.start()
        pub_a = await opened(_client(a.ws_url, "pa"))
        pub_b = await opened(_client(b.ws_url, "pb"))
        third = asyncio.Event()
        marks: dict[str, float] = {}
        b_not_ready: list[int] = []

        def on_ack() -> None:
            if len(run.acked) >= TOTAL // 3:
                third.set()

        async def cutter() -> None:
            await third.wait()
            await proxy.cut()
            marks["cut"] = time.monotonic()
            await asyncio.sleep(CUT_S / 2)  # waiting for time itself: the cut lasts 10 s
            b_not_ready.append((await asyncio.to_thread(b.readyz))[0])
            await asyncio.sleep(CUT_S / 2)
            marks["acked at restore"] = len(run.acked)
            before_restore = set(run.acked.values())
            await proxy.restore()
            marks["restore"] = time.monotonic()
            # Time to recover: every member has what was acked before the restore.
            await run.wait_members_have(before_restore, 60)
            marks["caught up"] = time.monotonic()

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(
            run.publish(pub_a, "a", TOTAL // 2, on_ack),
            run.publish(pub_b, "b", TOTAL - TOTAL // 2, on_ack),
            cutter()), 120)
        publish_s = time.monotonic() - started
        assert b_not_ready == [503], "node B reported the outage on /readyz"
        caught_up_s = marks["caught up"] - marks["restore"]
        await _check(run, cluster.urls, TOTAL, "10 s cut of node B's NATS connection", {
            "acked when cut": TOTAL // 3,
            "acked at restore": int(marks["acked at restore"]),
            "publish of 5,000 took": f"{publish_s:.1f} s",
            "longest ack stall after the cut": f"{run.stall_after(marks['cut']):.2f} s",
            "restore -> every member has every event acked before it": f"{caught_up_s:.2f} s",
            "proxy connections (1 = no reconnect)": proxy.connections,
            "node B gap repairs": _metric(b, "rtnode_gap_repairs_total"),
        })
        assert proxy.connections >= 2, "node B reconnected through the proxy"
    finally:
        a.stop()
        b.stop()
        await proxy.stop()
