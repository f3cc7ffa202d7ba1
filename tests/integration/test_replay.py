"""Durable replay consumers (bridge/replay.py) and ``rtnode replay`` / ``rtnode consume``,
against the shared nats-server, with events stored by an in-process node."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from bridge.replay import ReplayConsumer, ReplayError, connect_nats, partition_of
from bridge.replay_groups import assign_partitions
from tests.cluster import NatsCluster
from tests.servers import MS, NatsProcess, wait_until
from tests.stored import dead_letters, store, tenant

pytestmark = pytest.mark.integration





async def drain(consumer: ReplayConsumer, timeout: float = 0.5, ack: bool = True) -> list[Any]:
    """Every event until none comes for ``timeout`` seconds."""
    out = []
    while (ev := await consumer.next(timeout)) is not None:
        out.append(ev)
        if ack:
            await ev.ack()
    return out


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition that has no event of its own, with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- the Python API ----------------------------------------------------------------------------


async def test_durable_resumes_after_the_last_acked_event(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    node = await make_node()
    t = tenant()
    # 3,000 events in two matching rooms and one that is not, interleaved in the stream.
    seqs: list[int] = []
    for k in range(30):
        seqs += await store(node, t, "sensors:a", 50, 100 * k)
        seqs += await store(node, t, "sensors:b", 50, 100 * k + 50)
        await store(node, t, "other:x", 1, k)
    assert len(seqs) == 3000
    opts: dict[str, Any] = {"tenant": t, "rooms": "sensors:*", "durable": "billing"}
    async with ReplayConsumer(shared_nats.url, **opts) as consumer:
        got = []
        async for ev in consumer:
            got.append(ev)
            if len(got) <= 1000:
                await ev.ack()
            if len(got) == 1003:
                break  # 1,001..1,003 delivered, never acked
    assert [e.seq for e in got] == seqs[:1003]
    first = got[0]
    assert (first.room, first.event, first.data, first.msg_id, first.tenant) == (
        "sensors:a", "reading", {"i": 0}, "m0", t)
    assert first.from_["user"] == "backend" and first.ts and first.delivered == 1
    # A second run goes on at the 1,001st event, in order, and nothing acked comes back.
    async with ReplayConsumer(shared_nats.url, **opts) as consumer:
        rest = await drain(consumer)
        assert consumer.skipped == 20  # the first run acked 10 other:x silently
    assert [e.seq for e in rest] == seqs[1000:]
    async with ReplayConsumer(shared_nats.url, **opts) as consumer:
        assert await consumer.next(0.3) is None, "everything was acked"


async def test_hard_crash_resumes_at_the_first_unacked_event(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    """No close, no naks (the process died holding 100 fetched events, ack_wait 30 s): the next
    run waits out the dead one's pin (priority_timeout_s), resets the durable to its ack floor
    and goes on at the first unacked event, in order, long before ack_wait."""
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "sensors:a", 300)
    opts: dict[str, Any] = {"tenant": t, "rooms": "sensors:*", "durable": "crashy",
                            "priority_timeout_s": 1.0}
    nc = NATS()
    await nc.connect(shared_nats.url)
    consumer = await ReplayConsumer(nc, **opts).open()
    for _ in range(100):
        ev = await consumer.next(5)
        assert ev is not None
        await ev.ack()
    assert (await consumer.next(5)) is not None  # the 101st, never acked
    await nc.flush()
    await nc.close()  # "kill -9": nothing nakked, nothing unpinned
    started = time.monotonic()
    async with ReplayConsumer(shared_nats.url, **opts) as again:
        first = await again.next(10)
        assert first is not None and first.seq == seqs[100]
        waited = time.monotonic() - started
        await first.ack()
        rest = await drain(again)
        assert again.takeovers == 1
    assert [e.seq for e in rest] == seqs[101:]
    assert 0.5 < waited < 5, waited


async def test_a_takeover_whose_reset_is_not_answered_waits_for_the_next_one(
    make_node: Any, shared_nats: NatsProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the hard crash above, but the new process's first reset to the ack floor is not
    answered (a leader election: nats' TimeoutError). It used to serve the partition anyway:
    the dead one's unacked event came back only after ack_wait, behind the later ones of its
    room. Now it serves nothing until it is pinned again and the reset answers: the unacked
    event first, then the rest, in order."""
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "sensors:a", 300)  # more than the first process fetched
    opts: dict[str, Any] = {"tenant": t, "rooms": "sensors:*", "durable": "unreset",
                            "priority_timeout_s": 1.0, "ack_wait_s": 30.0}
    nc = NATS()
    await nc.connect(shared_nats.url)
    consumer = await ReplayConsumer(nc, **opts).open()
    for _ in range(5):
        ev = await consumer.next(5)
        assert ev is not None
        await ev.ack()
    assert (await consumer.next(5)) is not None  # the 6th, never acked
    await nc.flush()
    await nc.close()  # "kill -9"

    api = ReplayConsumer._api
    failed: list[str] = []

    async def first_reset_unanswered(self: ReplayConsumer, subject: str,
                                     payload: dict[str, Any] | None = None) -> dict[str, Any]:
        if ".RESET." in subject and not failed:
            failed.append(subject)
            raise nats.errors.TimeoutError
        return await api(self, subject, payload)

    monkeypatch.setattr(ReplayConsumer, "_api", first_reset_unanswered)
    async with ReplayConsumer(shared_nats.url, **opts) as again:
        rest = await drain(again, timeout=5)
        assert failed, "the reset was never asked for"
        assert again.takeovers == 1
    assert [e.seq for e in rest] == seqs[5:]


async def test_a_standby_takes_over_in_order(make_node: Any, shared_nats: NatsProcess) -> None:
    """Two processes of one durable: one is served, the other waits; when the first stops
    pulling (hung, killed), the standby is pinned and goes on at the first unacked event."""
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "sensors:a", 50)
    opts: dict[str, Any] = {"tenant": t, "rooms": "sensors:*", "durable": "standby-pair",
                            "priority_timeout_s": 1.0}
    nc = NATS()
    await nc.connect(shared_nats.url)
    active = await ReplayConsumer(nc, **opts).open()
    first = await active.next(5)
    assert first is not None and first.seq == seqs[0]
    async with ReplayConsumer(shared_nats.url, **opts) as standby:
        assert await standby.next(1.5) is None, "the pinned process is alive"
        for _ in range(9):
            ev = await active.next(5)
            assert ev is not None
            await ev.ack()
        await first.ack()
        await nc.flush()
        await nc.close()  # dead: its pin times out, the standby takes over
        rest = await drain(standby, timeout=3)
    assert [e.seq for e in rest] == seqs[10:]


async def test_nak_blocks_its_room_only(make_node: Any, shared_nats: NatsProcess) -> None:
    """on_retry="block": a nakked event comes again (after its delay) before any later event of
    its room; the other rooms go on meanwhile."""
    node = await make_node()
    t = tenant()
    a = await store(node, t, "sensors:a", 2)
    b = await store(node, t, "sensors:b", 2)
    async with ReplayConsumer(shared_nats.url, tenant=t, rooms="sensors:*",
                              durable="naky") as consumer:
        ev = await consumer.next(5)
        assert ev is not None and ev.seq == a[0]
        at = time.monotonic()
        await ev.nak(delay=0.4)
        with pytest.raises(ReplayError):
            await ev.ack()  # settled once only
        got = []
        while len(got) < 4 and (ev := await consumer.next(5)) is not None:
            got.append((ev.seq, ev.delivered, time.monotonic() - at))
            await ev.ack()
        assert [(seq, n) for seq, n, _ in got] == [(b[0], 1), (b[1], 1), (a[0], 2), (a[1], 1)]
        assert got[2][2] >= 0.35
        assert await consumer.next(0.3) is None


async def test_nak_with_skip_dead_letters_at_once(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "sensors:a", 3)
    nc = NATS()
    await nc.connect(shared_nats.url)
    dead = await dead_letters(nc, f"rt.dlq.{t}.skippy")
    try:
        async with ReplayConsumer(nc, tenant=t, rooms="sensors:*", durable="skippy",
                                  on_retry="skip") as consumer:
            got = []
            while (ev := await consumer.next(1)) is not None:
                got.append(ev.seq)
                await (ev.nak() if ev.seq == seqs[1] else ev.ack())
        assert got == seqs and consumer.dead_lettered == 1
    finally:
        await nc.flush()
        await nc.close()
    assert [(m.headers or {}).get("Rtnode-Reason") for m in dead] == ["skip"]
    assert (dead[0].headers or {})["Rtnode-Seq"] == str(seqs[1])


async def test_max_deliver_dead_letters_and_term_drops(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "sensors:a", 3)
    nc = NATS()
    await nc.connect(shared_nats.url)
    dead = await dead_letters(nc, f"rt.dlq.{t}.poison")
    try:
        async with ReplayConsumer(nc, tenant=t, rooms="sensors:*", durable="poison",
                                  max_deliver=3) as consumer:
            deliveries = []
            while True:
                ev = await consumer.next(5)
                assert ev is not None
                if ev.seq == seqs[0]:  # the poison event: fails every time
                    deliveries.append(ev.delivered)
                    await ev.nak()
                elif ev.seq == seqs[1]:
                    await ev.term()  # given up: not redelivered, not dead-lettered
                else:
                    await ev.ack()
                    break
            while len(deliveries) < 3:
                ev = await consumer.next(5)
                assert ev is not None and ev.seq == seqs[0]
                deliveries.append(ev.delivered)
                await ev.nak()
            assert await consumer.next(0.5) is None, "no 4th delivery"
            assert deliveries == [1, 2, 3]
            assert consumer.dead_lettered == 1
    finally:
        await nc.flush()
        await nc.close()
    assert len(dead) == 1
    h = dead[0].headers or {}
    assert (h["Rtnode-Seq"], h["Rtnode-Room"], h["Rtnode-Reason"], h["Rtnode-Delivered"]) == (
        str(seqs[0]), "sensors:a", "max_deliver", "3")
    assert b"reading" in dead[0].data  # the stored CBOR event map, unchanged


def _newcomers_room(prefix: str, *, first: str, newcomer: str) -> tuple[int, str]:
    """The partition (of 2) that ``newcomer`` takes from ``first`` when it comes, and a room
    ``<prefix>:<n>`` of it."""
    taken = assign_partitions([first, newcomer], 2).index(newcomer)
    return taken, next(f"{prefix}:{i}" for i in range(100)
                       if partition_of(f"{prefix}:{i}", 2) == taken)


async def test_a_partition_back_after_its_nakked_event_was_handled_elsewhere(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    """A process naks an event (its room waits for the redelivery), its partition moves to a
    newcomer, which handles that event and the next; when the newcomer leaves and the partition
    comes back, the first process hands out the room's new events. (Its room stayed blocked
    for ever, waiting for a redelivery that had gone to the newcomer: the takeover kept the
    block of an event below the ack floor.)"""
    node = await make_node()
    t = tenant()
    _, room = _newcomers_room("sb", first="a", newcomer="b")
    x, y = await store(node, t, room, 2)
    opts: dict[str, Any] = {"tenant": t, "rooms": "sb:*", "durable": "back-again",
                            "partitions": 2, "priority_timeout_s": 1.0, "fetch_timeout_s": 0.5}
    first = ReplayConsumer(shared_nats.url, **opts)
    first.worker_id = "a"
    async with first:
        ev = await first.next(10)
        assert ev is not None and ev.seq == x
        await ev.nak(delay=3)  # the room waits for the redelivery here
        newcomer = ReplayConsumer(shared_nats.url, **opts)
        newcomer.worker_id = "b"
        async with newcomer:
            got = await drain(newcomer, timeout=5)
        assert [e.seq for e in got] == [x, y]
        (z,) = await store(node, t, room, 1, 2)
        # the newcomer's pin is gone at once, its membership after 3.5 s: then the partition
        # is the first process's again
        ev = await first.next(15)
        assert ev is not None and ev.seq == z, "the room's next event never came"
        await ev.ack()


async def test_a_partition_back_while_it_was_being_let_go(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    """A process loses a partition to a newcomer and waits for its event of that partition to
    be settled before it unpins; meanwhile the newcomer leaves and the partition is the first
    process's again. Once the event is acked and the pin let go, the first process serves the
    partition again. (It served nothing for ever: its puller cleared the wake-up it got during
    the release, and no other came as its partitions did not change again. Seen in
    test_replay_faults.py seed 836953162 on a loaded machine, where the unpin waited 5 s for a
    killed nats-server: a partition nobody served.)"""
    node = await make_node()
    t = tenant()
    taken, room = _newcomers_room("sr", first="z", newcomer="a")
    x, y = await store(node, t, room, 2)
    # priority_timeout_s 20: the release waits up to 16 s for the event in hand to be settled,
    # longer than the newcomer's membership lasts after it leaves (3.5 s)
    opts: dict[str, Any] = {"tenant": t, "rooms": "sr:*", "durable": "back-meanwhile",
                            "partitions": 2, "priority_timeout_s": 20.0,
                            "fetch_timeout_s": 0.5}
    first = ReplayConsumer(shared_nats.url, **opts)
    first.worker_id = "z"
    part = first._parts[taken]
    async with first:
        ev = await first.next(10)
        assert ev is not None and ev.seq == x  # in hand: the release waits for it
        newcomer = ReplayConsumer(shared_nats.url, **opts)
        newcomer.worker_id = "a"
        async with newcomer:
            await until(lambda: not part.assigned, 5, "the partition moving to the newcomer")
        await until(lambda: part.assigned, 8, "the partition coming back")
        assert part.pin, "still being let go"
        await ev.ack()  # the release ends: the pin is let go, then taken again
        again = await first.next(10)
        assert again is not None and again.seq == y, "the partition is served by nobody"
        await again.ack()


async def test_open_says_jetstream_not_answering_as_a_replay_error(
    make_node: Any, shared_nats: NatsProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open() raises ReplayError only: a timeout of the dead-letter stream's lookup (seen
    during a nats-server's kill -9 in test_replay_faults.py) came out as nats' TimeoutError."""
    async def timeout(*args: Any, **kwargs: Any) -> str:
        raise nats.errors.TimeoutError

    await make_node()  # the room stream
    monkeypatch.setattr(JetStreamContext, "find_stream_name_by_subject", timeout)
    consumer = ReplayConsumer(shared_nats.url, tenant=tenant(), rooms="sensors:*",
                              durable="lookup")
    with pytest.raises(ReplayError, match="JetStream not answering"):
        await consumer.open()


async def test_a_consumer_leaves_a_server_that_hangs(cluster: NatsCluster) -> None:
    """A replay consumer's connection (connect_nats) notices a server that answers nothing
    (SIGSTOP) within seconds, as the node's does, and goes on through another: nats-py's
    default pings (2 unanswered, 120 s apart) kept it there, handling nothing, for minutes."""
    nc = await connect_nats(cluster.urls, name="hang")
    paused = None
    try:
        first = nc.connected_url
        assert first is not None
        paused = next(i for i, url in enumerate(cluster.urls) if url.endswith(f":{first.port}"))
        cluster.pause(paused)
        started = time.monotonic()

        def moved() -> bool:
            url = nc.connected_url
            return nc.is_connected and url is not None and url.port != first.port

        await asyncio.to_thread(wait_until, moved, 30, what="the connection on another server")
        print(f"\n[hang] on another server after {time.monotonic() - started:.1f} s")
        await nc.flush(timeout=5)  # and it answers there
    finally:
        if paused is not None:
            cluster.resume(paused)
        await nc.close()


async def test_start_from_seq_and_from_time(make_node: Any, shared_nats: NatsProcess) -> None:
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "sensors:a", 3)
    await asyncio.sleep(0.05)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    seqs += await store(node, t, "sensors:a", 3, 3)
    async with ReplayConsumer(shared_nats.url, tenant=t, rooms="sensors:*", durable="by-seq",
                              start=seqs[2]) as consumer:
        assert [e.seq for e in await drain(consumer)] == seqs[2:]
    async with ReplayConsumer(shared_nats.url, tenant=t, rooms="sensors:*", durable="by-time",
                              start=middle) as consumer:
        assert [e.seq for e in await drain(consumer)] == seqs[3:]
    async with ReplayConsumer(shared_nats.url, tenant=t, rooms="sensors:*", durable="new",
                              start="new") as consumer:
        assert await consumer.next(0.2) is None
        more = await store(node, t, "sensors:a", 1, 9)
        ev = await consumer.next(5)
        assert ev is not None and ev.seq == more[0]
        await ev.ack()
    # The same durable with other rooms is refused, in one line.
    with pytest.raises(ReplayError, match="exists for tenant"):
        async with ReplayConsumer(shared_nats.url, tenant=t, rooms="other:*", durable="new"):
            pass
    with pytest.raises(ValueError, match="invalid room pattern"):
        ReplayConsumer(shared_nats.url, rooms="a.b", durable="x")


# -- the command line --------------------------------------------------------------------------


async def cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("RTNODE_")},
    )


async def run_cli(*args: str, timeout: float = 20.0) -> tuple[int, list[str], str]:
    proc = await cli(*args)
    out, err = await asyncio.wait_for(proc.communicate(), timeout * MS * 1000)
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode()


async def read_lines(proc: asyncio.subprocess.Process, n: int) -> list[str]:
    assert proc.stdout is not None
    return [(await asyncio.wait_for(proc.stdout.readline(), 10)).decode().rstrip("\n")
            for _ in range(n)]


async def test_cli_replay(make_node: Any, shared_nats: NatsProcess) -> None:
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "sensors:lab", 4)
    await store(node, t, "sensors:other", 1)
    url = ["--nats-url", shared_nats.url, "--tenant", t]
    (rc, lines, err), (rc2, since, _), (rc3, plain, _) = await asyncio.gather(
        run_cli("replay", "sensors:lab", "--json", *url),
        run_cli("replay", "sensors:lab", "--json", "--since", str(seqs[1]), *url),
        run_cli("replay", "sensors:lab", *url),
    )
    assert (rc, rc2, rc3) == (0, 0, 0), err
    events = [json.loads(line) for line in lines]
    assert [e["seq"] for e in events] == seqs
    assert events[0]["room"] == "sensors:lab" and events[0]["data"] == {"i": 0}
    assert events[0]["from"]["user"] == "backend" and events[0]["msg_id"] == "m0"
    assert [json.loads(line)["seq"] for line in since] == seqs[2:]
    assert plain[0] == f'{seqs[0]} reading {{"i":0}}'
    # An empty room, or nothing after --since: no output, exit 0.
    rc, lines, _ = await run_cli("replay", "sensors:none", *url)
    assert (rc, lines) == (0, [])
    # --follow: the stored ones, then live ones, until SIGINT.
    proc = await cli("replay", "sensors:lab", "--follow", "--since", str(seqs[2]), *url)
    assert [ln.split()[0] for ln in await read_lines(proc, 1)] == [str(seqs[3])]
    live = await store(node, t, "sensors:lab", 1, 7)
    assert (await read_lines(proc, 1))[0].startswith(f"{live[0]} reading")
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_cli_consume_acks_what_it_printed(make_node: Any, shared_nats: NatsProcess) -> None:
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "sensors:a", 3)
    await store(node, t, "other:a", 1)
    args = ["consume", "--durable", "tail", "--rooms", "sensors:*", "--tenant", t,
            "--nats-url", shared_nats.url]
    proc = await cli(*args)
    lines = [json.loads(line) for line in await read_lines(proc, 3)]
    assert [e["seq"] for e in lines] == seqs and lines[0]["room"] == "sensors:a"
    live = await store(node, t, "sensors:b", 1, 5)
    assert json.loads((await read_lines(proc, 1))[0])["seq"] == live[0]
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    # A second run prints nothing old: only what came since.
    newer = await store(node, t, "sensors:a", 1, 9)
    proc = await cli(*args)
    assert json.loads((await read_lines(proc, 1))[0])["seq"] == newer[0]
    await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0 and out == b""


async def test_cli_errors_are_one_line(shared_nats: NatsProcess) -> None:
    cases = [
        (("replay", "sensors:a"), 2, "needs --nats-url"),
        (("consume", "--durable", "d", "--rooms", "a.b", "--nats-url", shared_nats.url), 2,
         "invalid room pattern"),
        (("replay", "sensors:a", "--since-time", "yesterday", "--nats-url", shared_nats.url), 2,
         "invalid time"),
        (("replay", "sensors:a", "--nats-url", "nats://127.0.0.1:1"), 1, "cannot connect"),
    ]
    results = await asyncio.gather(*(run_cli(*args) for args, _, _ in cases))
    for (args, code, text), (rc, out, err) in zip(cases, results, strict=True):
        assert rc == code, (args, err)
        assert out == [] and text in err and len(err.strip().splitlines()) == 1, (args, err)
