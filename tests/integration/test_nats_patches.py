"""``publish_many``, ``direct_dispatch`` and the PING patch (bridge/_nats_patches.py) against a
real nats-server.

After ``subscribe`` and ``flush``, the server has the subscription: a message published right
then from another connection arrives (nats-py's own PING overtook the queued SUB, and lost it
about one time in five).

What a subscriber receives from ``publish_many`` is what as many ``publish`` calls would have
sent (subjects, replies, payloads, headers, in order), as is what ``publish_now`` sends from
synchronous code (interleaved with ``publish`` and ``publish_many``, in the order called, with
no flush asked for; refused as ``publish`` refuses, and nothing sent then), a bad subject
refuses the whole list before anything is written, and a ``direct_dispatch`` handler that
raises does not stop the connection's read loop; ``unsubscribe`` stops the handler. SUBs,
UNSUBs, requests and publishes queued in one loop step wake the flusher at most once and all
reach the server, in order, with no flush asked for; with the server stopped, the socket's
buffer stays bounded (the flusher waits for it to drain) and everything arrives once it goes
on. Seeded random payloads, headers and sequences of
operations (``RTNODE_TEST_PATCH_SEED``).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats import errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import RePublish, StorageType, StreamConfig

from bridge._nats_patches import (
    direct_dispatch,
    header_lines,
    header_value,
    install,
    publish_many,
    publish_now,
    raw_dispatch,
)
from tests.servers import NatsProcess

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RTNODE_TEST_PATCH_SEED", "1207"))


@pytest.fixture(autouse=True)
def _patched() -> None:
    install()  # as the node does (bridge/nats_link.py)


@pytest_asyncio.fixture
async def clients(shared_nats: NatsProcess) -> AsyncIterator[tuple[Client, Client]]:
    """A publishing and a subscribing connection to one nats-server."""
    pub = await nats.connect(shared_nats.url)
    sub_nc = await nats.connect(shared_nats.url)
    yield pub, sub_nc
    await pub.close()
    await sub_nc.close()


async def test_after_subscribe_and_flush_the_server_has_the_subscription(
        clients: tuple[Client, Client]) -> None:
    rng = random.Random(SEED + 2)
    pub, sub_nc = clients
    for i in range(200):
        got = asyncio.Event()
        subject = f"t.flush.{i}.{rng.randrange(10**6)}"
        if rng.random() < 0.5:
            sub = await direct_dispatch(sub_nc, subject, lambda m, got=got: got.set())
        else:
            async def on(msg: Msg, got: asyncio.Event = got) -> None:
                got.set()

            sub = await sub_nc.subscribe(subject, cb=on)
        if rng.random() < 0.5:  # something else queued behind the SUB
            await sub_nc.publish(f"t.noise.{i}", b"n")
        await sub_nc.flush()
        await pub.publish(subject, b"x")
        await pub.flush()
        await asyncio.wait_for(got.wait(), 5)
        await sub.unsubscribe()


def _random_messages(rng: random.Random, n: int) -> list[tuple[str, str, bytes, dict[str, str]]]:
    msgs = []
    for i in range(n):
        payload = rng.randbytes(rng.choice([0, 1, 7, 300, 5000]))
        headers = {"Nats-Msg-Id": f"k{i}",
                   "X-Value": "".join(rng.choice(" ab\r\n\t\u00e9") for _ in range(8))}
        reply = rng.choice(["", f"_INBOX.r{i}"])
        msgs.append((f"t.many.{rng.randrange(3)}", reply, payload, headers))
    return msgs


async def test_publish_many_delivers_what_single_publishes_would(
        clients: tuple[Client, Client]) -> None:
    rng = random.Random(SEED)
    pub, sub_nc = clients
    got_many: list[Msg] = []
    got_single: list[Msg] = []
    done = asyncio.Event()
    msgs = _random_messages(rng, 200)

    async def on(msg: Msg) -> None:
        (got_many if msg.subject.startswith("t.many") else got_single).append(msg)
        if len(got_many) == len(msgs) and len(got_single) == len(msgs):
            done.set()

    await sub_nc.subscribe("t.>", cb=on)
    await sub_nc.flush()
    await publish_many(pub, [(s, r, p, header_lines(h)) for s, r, p, h in msgs])
    for subject, reply, payload, headers in msgs:
        await pub.publish(subject.replace("t.many", "t.single"), payload, reply=reply,
                          headers=headers)
    await pub.flush()
    await asyncio.wait_for(done.wait(), 10)
    for a, b, sent in zip(got_many, got_single, msgs, strict=True):
        assert a.subject == sent[0]
        assert a.subject.replace("t.many", "t.single") == b.subject
        assert (a.reply, a.data, a.headers) == (b.reply, b.data, b.headers)
        assert a.data == sent[2]


async def test_publish_many_refuses_the_whole_list_on_a_bad_subject(
        clients: tuple[Client, Client]) -> None:
    pub, sub_nc = clients
    seen: list[bytes] = []
    ok = asyncio.Event()

    async def on(msg: Msg) -> None:
        seen.append(msg.data)
        if msg.data == b"ok":
            ok.set()

    sub = await sub_nc.subscribe("t.refuse.>", cb=on)
    await sub_nc.flush()
    bad = [("t.refuse.a", "", b"1", ""), ("t.refuse. b", "", b"2", "")]
    with pytest.raises(errors.BadSubjectError):
        await publish_many(pub, bad)
    huge = [("t.refuse.a", "", b"1", ""),
            ("t.refuse.b", "", b"x" * (pub.max_payload + 1), "")]
    with pytest.raises(errors.MaxPayloadError):
        await publish_many(pub, huge)
    await publish_many(pub, [("t.refuse.ok", "", b"ok", "")])
    await pub.flush()
    await asyncio.wait_for(ok.wait(), 10)
    assert seen == [b"ok"]  # in order from one connection: nothing of the refused lists
    await sub.unsubscribe()


async def test_publish_now_sends_in_order_with_publish_and_publish_many(
        clients: tuple[Client, Client]) -> None:
    rng = random.Random(SEED + 3)
    pub, sub_nc = clients
    msgs = _random_messages(rng, 300)
    got: list[Msg] = []
    done = asyncio.Event()

    async def on(msg: Msg) -> None:
        got.append(msg)
        if len(got) == len(msgs):
            done.set()

    await sub_nc.subscribe("t.many.*", cb=on)
    await sub_nc.flush()
    ids: list[str | None] = []  # the Nats-Msg-Id each message should arrive with
    i = 0
    while i < len(msgs):  # runs of each kind, mixed: what the node's sends look like
        run, how = msgs[i:i + rng.randint(1, 5)], rng.choice(["now", "publish", "many"])
        i += len(run)
        if how == "many":
            await publish_many(pub, [(s, r, p, header_lines(h)) for s, r, p, h in run])
            ids += [h["Nats-Msg-Id"] for _, _, _, h in run]
            continue
        for subject, reply, payload, headers in run:
            if how == "now" and not reply:  # publish_now sends no reply subject
                with_headers = rng.random() < 0.7
                publish_now(pub, subject, payload,
                            header_lines(headers) if with_headers else None)
                ids.append(headers["Nats-Msg-Id"] if with_headers else None)
            else:
                await pub.publish(subject, payload, reply=reply, headers=headers)
                ids.append(headers["Nats-Msg-Id"])
    await asyncio.wait_for(done.wait(), 10)  # no flush asked for: the flusher was woken
    assert [(m.subject, m.data) for m in got] == [(s, p) for s, _, p, _ in msgs]
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in got] == ids
    with pytest.raises(errors.BadSubjectError):
        publish_now(pub, "t.many. bad", b"x")
    with pytest.raises(errors.MaxPayloadError):
        publish_now(pub, "t.many.0", b"x" * (pub.max_payload + 1))
    await pub.close()
    with pytest.raises(errors.ConnectionClosedError):
        publish_now(pub, "t.many.0", b"x")
    await sub_nc.flush()
    assert len(got) == len(msgs)  # nothing of what was refused


async def test_commands_queued_in_one_step_wake_the_flusher_once_and_all_arrive(
        clients: tuple[Client, Client]) -> None:
    """Seeded runs of subscribe, unsubscribe, request and publish, several per loop step and
    never a flush: the flusher's queue holds at most one wake-up, and afterwards the server
    holds exactly the subscriptions left (a message to each subject reaches those and only
    those), every request was answered and every publish arrived, in order."""
    rng = random.Random(SEED + 4)
    pub, sub_nc = clients

    async def answer(msg: Msg) -> None:
        await pub.publish(msg.reply, msg.data)

    echo = await pub.subscribe("t.wake.echo", cb=answer)
    seen: dict[str, list[bytes]] = {}
    live: dict[str, Any] = {}
    published: list[bytes] = []
    order: list[bytes] = []
    probes_in, order_in = asyncio.Event(), asyncio.Event()

    async def on(msg: Msg) -> None:
        if msg.subject == "t.wake.end":  # sent last, from the same connection: all are in
            probes_in.set()
        else:
            seen.setdefault(msg.subject, []).append(msg.data)

    async def in_order(msg: Msg) -> None:
        if msg.data == b"end":
            order_in.set()
        else:
            order.append(msg.data)

    await pub.subscribe("t.wake.order", cb=in_order)
    await pub.flush()
    requests: list[asyncio.Task[Msg]] = []
    for step in range(60):
        for _ in range(rng.randint(1, 12)):  # no await that yields to the flusher between
            what = rng.random()
            if what < 0.35 or not live:
                subject = f"t.wake.{step}.{rng.randrange(10**6)}"
                live[subject] = await sub_nc.subscribe(subject, cb=on)
            elif what < 0.55:
                subject = rng.choice(sorted(live))
                await live.pop(subject).unsubscribe()
            elif what < 0.75:
                requests.append(asyncio.ensure_future(
                    sub_nc.request("t.wake.echo", b"%d" % len(requests), timeout=5)))
            else:
                data = rng.randbytes(rng.randint(0, 40))
                published.append(data)
                await sub_nc.publish("t.wake.order", data)
            assert sub_nc._flush_queue is not None and sub_nc._flush_queue.qsize() <= 1
        await asyncio.sleep(0)  # the flusher's step
    answers = await asyncio.gather(*requests)
    assert [a.data for a in answers] == [b"%d" % i for i in range(len(requests))]
    await sub_nc.subscribe("t.wake.end", cb=on)
    await sub_nc.publish("t.wake.order", b"end")
    await sub_nc.flush()
    assert not seen  # nothing was published to those subjects yet
    probe = [f"t.wake.{step}.probe" for step in range(3)]  # never subscribed
    for subject in [*live, *probe, "t.wake.end"]:
        await pub.publish(subject, b"probe")
    await pub.flush()
    await asyncio.wait_for(probes_in.wait(), 5)
    assert sorted(seen) == sorted(live)
    assert all(got == [b"probe"] for got in seen.values())
    await asyncio.wait_for(order_in.wait(), 5)
    assert order == published
    await echo.unsubscribe()


@pytest.mark.parametrize("raw", [False, True], ids=["msg", "raw"])
async def test_direct_dispatch_survives_a_failing_handler_and_unsubscribes(
        clients: tuple[Client, Client], raw: bool) -> None:
    rng = random.Random(SEED + 1)
    pub, sub_nc = clients
    got: list[bytes] = []
    failing = {i for i in range(300) if rng.random() < 0.2}
    last = asyncio.Event()

    def on_data(data: bytes) -> None:
        i = int(data)
        if i == 299:
            last.set()
        if i in failing:
            raise RuntimeError("a handler's bug")
        got.append(data)

    if raw:
        sub = await raw_dispatch(sub_nc, "t.direct", lambda data, hdr: on_data(data))
    else:
        sub = await direct_dispatch(sub_nc, "t.direct", lambda msg: on_data(msg.data))
    await sub_nc.flush()
    for i in range(300):
        await pub.publish("t.direct", str(i).encode())
    await pub.flush()
    await asyncio.wait_for(last.wait(), 10)
    assert got == [str(i).encode() for i in range(300) if i not in failing]
    assert sub.pending_msgs == 0 and sub.pending_bytes == 0

    # the connection still reads: another subscription still receives
    other = asyncio.Event()
    await direct_dispatch(sub_nc, "t.other", lambda m: other.set())
    await sub_nc.flush()
    await pub.publish("t.other", b"x")
    await pub.flush()
    await asyncio.wait_for(other.wait(), 10)

    await sub.unsubscribe()
    await sub_nc.flush()
    before = len(got)
    other.clear()
    await pub.publish("t.direct", b"1000")
    await pub.publish("t.other", b"y")
    await pub.flush()
    await asyncio.wait_for(other.wait(), 10)  # sent after t.direct, so that one is past
    assert len(got) == before


async def test_raw_headers_read_as_nats_py_reads_them(clients: tuple[Client, Client]) -> None:
    """A stream's RePublish, received twice: as nats-py's ``Msg`` (its header dict) and raw.
    Every header of the dict (the server's ``Nats-Sequence``, ``Nats-Last-Sequence``... and
    seeded random ones of the publisher, decoys such as ``X-Nats-Sequence`` among them, and
    some named as the server's own, which the server appends after them) reads the same with
    ``header_value``; a name that is not there reads None."""
    rng = random.Random(SEED + 3)
    pub, sub_nc = clients
    js = pub.jetstream()
    await js.add_stream(StreamConfig(
        name="RAWHDR", subjects=["rawsrc.>"], storage=StorageType.MEMORY,
        republish=RePublish(src="rawsrc.>", dest="rawdst.>")))
    as_msg: list[Msg] = []
    as_raw: list[tuple[bytes, bytes | None]] = []
    n = 300
    done = asyncio.Event()

    async def on(msg: Msg) -> None:
        as_msg.append(msg)
        if len(as_msg) == n and len(as_raw) == n:
            done.set()

    def on_raw(data: bytes, headers: bytes | None) -> None:
        as_raw.append((data, headers))
        if len(as_msg) == n and len(as_raw) == n:
            done.set()

    try:
        await sub_nc.subscribe("rawdst.>", cb=on)
        await raw_dispatch(sub_nc, "rawdst.>", on_raw)
        await sub_nc.flush()
        alphabet = "ab: -=\t\u00e9"
        for i in range(n):
            headers = {"Nats-Msg-Id": f"m{i}"}
            for name in rng.sample(["X-Nats-Sequence", "Sequence", "A", "x-b", "Nats-Seq",
                                    "Long-" + "h" * 200, "Nats-Sequence", "Nats-Last-Sequence",
                                    "Nats-Stream", "Nats-Subject"], rng.randrange(5)):
                headers[name] = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
            await js.publish(f"rawsrc.{rng.randrange(5)}", rng.randbytes(rng.randrange(50)),
                             headers=headers)
        await asyncio.wait_for(done.wait(), 10)
        for msg, (data, raw) in zip(as_msg, as_raw, strict=True):
            assert msg.data == data
            assert msg.headers and "Nats-Sequence" in msg.headers
            assert "Nats-Last-Sequence" in msg.headers
            for name, value in msg.headers.items():
                assert header_value(raw, name.encode()) == value.encode(), name
            assert header_value(raw, b"Nats-Absent") is None
        seqs = [int(header_value(raw, b"Nats-Sequence") or 0) for _, raw in as_raw]
        assert seqs == list(range(1, n + 1))
        assert header_value(None, b"Nats-Sequence") is None
        assert header_value(b"NATS/1.0\r\nNats-Sequence: 7", b"Nats-Sequence") == b"7"
    finally:
        await js.delete_stream("RAWHDR")


async def test_publish_now_while_reconnecting_is_sent_once_the_server_is_back(
        tmp_path: Path) -> None:
    """What ``publish_now`` queues while the client is away (its server killed) is sent once
    the restarted server has it back, in order; past the client's reconnect buffer it is
    refused at once, as ``publish`` refuses it, and nothing of it is sent. The client is its
    own subscriber: it subscribes again before it sends what it buffered."""
    rng = random.Random(SEED + 4)
    server = NatsProcess(tmp_path / "nats").start()
    away, back = asyncio.Event(), asyncio.Event()

    async def disconnected() -> None:
        away.set()

    async def reconnected() -> None:
        back.set()

    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
                            pending_size=64 * 1024, disconnected_cb=disconnected,
                            reconnected_cb=reconnected)
    got: list[bytes] = []
    done = asyncio.Event()
    try:
        sent: list[bytes] = []

        async def on(msg: Msg) -> None:
            got.append(msg.data)
            if len(got) >= len(sent):
                done.set()

        await nc.subscribe("t.away", cb=on)
        await nc.flush()
        server.kill()
        await asyncio.wait_for(away.wait(), 10)
        for i in range(rng.randint(20, 60)):
            payload = f"{i}:".encode() + rng.randbytes(rng.randint(0, 500))
            publish_now(nc, "t.away", payload)
            sent.append(payload)
        with pytest.raises(errors.OutboundBufferLimitError):
            publish_now(nc, "t.away", b"x" * 70 * 1024)  # more than the buffer holds
        server.start()
        await asyncio.wait_for(back.wait(), 10)
        await asyncio.wait_for(done.wait(), 10)
        await nc.flush()
        assert got == sent
    finally:
        await nc.close()
        server.stop()


@pytest.mark.timeout(60)
async def test_writes_of_a_stalled_server_wait_for_the_socket_and_all_arrive(
        tmp_path: Path) -> None:
    """What is pending is written at the end of the loop step while the socket takes it, and
    by nats-py's flusher, which waits for the socket to drain, once it does not: with the
    server stopped (SIGSTOP) while seeded bursts of ``publish_now`` go on for many loop steps,
    the client's socket buffer never holds more than a few steps' worth (the rest waits in the
    client's pending buffer), and once the server goes on, everything arrives in order, once,
    with what ``publish`` sends after it. (``publish`` itself waits while the server is
    stopped, once the pending buffer is past its limit: nats-py's backpressure.)"""
    import signal

    rng = random.Random(SEED + 5)
    server = NatsProcess(tmp_path / "nats").start()
    pub = await nats.connect(server.url, ping_interval=600)
    sub_nc = await nats.connect(server.url, ping_interval=600)
    got: list[bytes] = []
    sent: list[bytes] = []
    done = asyncio.Event()

    async def on(msg: Msg) -> None:
        got.append(msg.data)
        if len(got) >= len(sent) and sent and sent[-1] == b"end":
            done.set()

    try:
        await sub_nc.subscribe("t.stall", cb=on)
        await sub_nc.flush()
        writer = pub._transport._io_writer  # type: ignore[union-attr]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        most, step_most = 0, 0
        try:
            for step in range(150):
                step_bytes = 0
                for i in range(rng.randint(1, 12)):
                    payload = f"{step}.{i}:".encode() + rng.randbytes(rng.randint(1000, 60_000))
                    publish_now(pub, "t.stall", payload)
                    sent.append(payload)
                    step_bytes += len(payload)
                step_most = max(step_most, step_bytes)
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                most = max(most, writer.transport.get_write_buffer_size())
            assert pub._pending_data_size > 0, "the stalled socket left commands pending"
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert most <= 4 * (step_most + 64 * 1024), (most, step_most)
        for i in range(rng.randint(5, 20)):
            payload = f"after.{i}:".encode() + rng.randbytes(rng.randint(1, 5000))
            await pub.publish("t.stall", payload)
            sent.append(payload)
        publish_now(pub, "t.stall", b"end")
        sent.append(b"end")
        await asyncio.wait_for(done.wait(), 30)
        assert got == sent
    finally:
        await pub.close()
        await sub_nc.close()
        server.stop()


async def test_subscriptions_and_later_publishes_wait_for_the_next_write_never_an_event(
        clients: tuple[Client, Client]) -> None:
    """Seeded steps of SUB, UNSUB and ``publish_now(later=True)`` (lazy), ``publish_now``,
    ``publish`` and requests (eager), with pauses around ``COALESCE_S``: a step with an eager
    command writes everything pending at its end, in order; a step of lazy commands only does
    so when the last write is ``COALESCE_S`` old, else they wait for the next write (a timer
    due then, or an eager command first), so there are fewer writes than steps. Everything
    arrives, in the order queued, and the subscriptions left are exactly those in place."""
    from bridge import _nats_patches

    rng = random.Random(SEED + 6)
    pub, sub_nc = clients
    loop = asyncio.get_running_loop()
    writes: list[float] = []
    transport: Any = pub._transport
    real_writelines = transport.writelines

    def writelines(data: Any) -> None:
        writes.append(loop.time())
        real_writelines(data)

    async def answer(msg: Msg) -> None:
        await sub_nc.publish(msg.reply, msg.data)

    order: list[bytes] = []
    seen: dict[str, int] = {}
    end = asyncio.Event()

    async def in_order(msg: Msg) -> None:
        if msg.data == b"end":
            end.set()
        else:
            order.append(msg.data)

    async def on(msg: Msg) -> None:
        seen[msg.subject] = seen.get(msg.subject, 0) + 1

    await sub_nc.subscribe("t.lazy.echo", cb=answer)
    await sub_nc.subscribe("t.lazy.order", cb=in_order)
    await sub_nc.flush()
    transport.writelines = writelines
    published: list[bytes] = []
    live: dict[str, Any] = {}
    requests: list[asyncio.Task[Msg]] = []
    steps_written = 0
    for step in range(120):
        eager = False
        last = getattr(pub, "_rt_last_write", 0.0)
        before = len(writes)
        quiet = loop.time() - last >= _nats_patches.COALESCE_S
        for _ in range(rng.randint(1, 6)):
            what = rng.random()
            data = b"%d.%d" % (step, rng.randrange(10**6))
            if what < 0.3 or not live:
                subject = f"t.lazy.s.{step}.{rng.randrange(10**6)}"
                live[subject] = await pub.subscribe(subject, cb=on)
            elif what < 0.45:
                await live.pop(rng.choice(sorted(live))).unsubscribe()
            elif what < 0.75:
                publish_now(pub, "t.lazy.order", data, later=True)
                published.append(data)
            elif what < 0.85:
                publish_now(pub, "t.lazy.order", data)
                published.append(data)
                eager = True
            elif what < 0.95:
                await pub.publish("t.lazy.order", data)
                published.append(data)
                eager = True
            else:
                requests.append(asyncio.ensure_future(
                    pub.request("t.lazy.echo", b"%d" % len(requests), timeout=5)))
                eager = True
        await asyncio.sleep(0)  # the end of the step: its write, if it has one
        if requests and not requests[-1].done() and pub._pending:
            await asyncio.sleep(0)  # a request's task publishes in the step after
        if eager or quiet:
            assert not pub._pending, f"step {step}: an eager or quiet step waits"
        else:  # not written before last + COALESCE_S (the loop's clock ticks in ms)
            due = last + _nats_patches.COALESCE_S - 0.0011
            assert all(at >= due for at in writes[before:]), f"step {step}: written at once"
            assert len(writes) > before or pub._rt_write_timer is not None  # type: ignore
        steps_written += len(writes) > before
        await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001, 0.003]))
    for _ in range(1000):  # the last lazy commands' timer
        if not pub._pending:
            break
        await asyncio.sleep(0.001)
    assert not pub._pending
    assert len(writes) < 120
    assert [a.data for a in await asyncio.gather(*requests)] == [
        b"%d" % i for i in range(len(requests))]
    await pub.flush()
    probe = [f"t.lazy.s.{step}.probe" for step in range(3)]  # never subscribed
    for subject in [*live, *probe]:
        await sub_nc.publish(subject, b"probe")
    await sub_nc.publish("t.lazy.order", b"end")
    await sub_nc.flush()
    await pub.flush()
    await asyncio.wait_for(end.wait(), 5)
    assert order == published
    assert seen == dict.fromkeys(live, 1)


async def test_flush_later_confirms_what_was_written_before_with_its_ping_coalesced(
        clients: tuple[Client, Client]) -> None:
    """``flush_later``: its PING waits for the next write like a SUB (not written at the end
    of the step on a connection written to within ``COALESCE_S``), and once it returns the
    server has every subscription made before it (seeded rounds: a message published at once
    from another connection reaches each)."""
    from bridge._nats_patches import flush_later

    rng = random.Random(SEED + 7)
    pub, sub_nc = clients
    got: dict[str, int] = {}
    arrived = asyncio.Event()
    held = 0

    async def on(msg: Msg) -> None:
        got[msg.subject] = got.get(msg.subject, 0) + 1
        arrived.set()

    for round_ in range(20):
        await sub_nc.publish("t.later.warm", b"")  # a write now: what follows may wait
        subjects = [f"t.later.{round_}.{i}" for i in range(rng.randint(1, 5))]
        for subject in subjects:
            await sub_nc.subscribe(subject, cb=on)
        confirming = asyncio.ensure_future(flush_later(sub_nc, 2))
        await asyncio.sleep(0)
        if sub_nc._pending:  # held: the PING is queued behind the SUBs, unwritten
            held += 1
            assert sub_nc._pending[-1] == b"PING\r\n"
            assert sub_nc._rt_write_timer is not None  # type: ignore[attr-defined]
        await confirming
        for subject in subjects:  # the server has them: no retry, no sleep
            arrived.clear()
            await pub.publish(subject, b"x")
            await pub.flush()
            await asyncio.wait_for(arrived.wait(), 5)
        assert all(got[s] == 1 for s in subjects)
    assert held > 0, "the PING never waited"


async def test_a_route_unsubscribed_from_synchronous_code_is_gone_from_the_server(
        clients: tuple[Client, Client]) -> None:
    """``Route.unsubscribe_now`` (an rpc route dropped after its grace, with no task to run a
    coroutine): seeded rounds of routes made and dropped in one loop step, some of them at
    once and some later; after the next round trip, a request to a dropped route finds no
    responders, one to a kept route is answered, and the dropped routes' handlers got
    nothing."""
    rng = random.Random(SEED + 9)
    pub, sub_nc = clients
    late: list[str] = []

    def on(payload: bytes, headers: bytes | None) -> None:
        late.append(payload.decode())

    for rnd in range(20):
        routes = {f"t.unsub.{rnd}.{i}": await raw_dispatch(sub_nc, f"t.unsub.{rnd}.{i}", on)
                  for i in range(rng.randint(1, 8))}
        await sub_nc.flush()
        dropped = rng.sample(sorted(routes), rng.randint(0, len(routes)))
        for subject in dropped:
            routes[subject].unsubscribe_now()  # from synchronous code: queued, no task
            assert routes[subject]._id not in sub_nc._subs
        await sub_nc.flush()  # its PING follows the UNSUBs: the server has them
        for subject in sorted(routes):
            if subject in dropped:
                with pytest.raises(errors.NoRespondersError):
                    await pub.request(subject, b"x", timeout=2)
            else:
                await pub.publish(subject, b"kept")
        await pub.flush()
        await sub_nc.flush()
        assert late.count("kept") == len(routes) - len(dropped), rnd
        assert "x" not in late
        late.clear()
        for subject in set(routes) - set(dropped):
            routes[subject].unsubscribe_now()
