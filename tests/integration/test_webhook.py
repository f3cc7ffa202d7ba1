"""Webhooks (bridge/webhook.py): events of a durable consumer POSTed to a real HTTP server on
127.0.0.1 that fails, times out and recovers; and the node's ``webhooks`` setting."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bridge.replay import ReplayConsumer
from bridge.webhook import WebhookRunner, backoff_delay, post_events, redact_url, sign
from tests.servers import MS, NatsProcess
from tests.stored import store, tenant

pytestmark = pytest.mark.integration

SECRET = "whsec-test-7f3a"
ROOMS = [f"wh:r{i}" for i in range(5)]




@dataclass
class Hit:
    """One POST the receiver got."""

    room: str
    seq: int
    attempt: int
    answer: str  # "200", "500" or "slow" (a 200 sent after slow_s)
    signed: bool
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Receiver:
    """A webhook receiver: 500 for the first ``fail`` POSTs, then no answer in time for the next
    ``slow`` ones, then 200; always 500 for the seqs in ``poison``."""

    fail: int = 0
    slow: int = 0
    slow_s: float = 1.0
    poison: set[int] = field(default_factory=set)
    secret: str | None = SECRET
    hits: list[Hit] = field(default_factory=list)
    answered: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        stamp = request.headers.get("Rtnode-Timestamp", "")
        expected = "sha256=" + hmac.new((self.secret or "").encode(), f"{stamp}.".encode() + raw,
                                        hashlib.sha256).hexdigest()
        signed = hmac.compare_digest(request.headers.get("Rtnode-Signature", ""), expected)
        body = json.loads(raw)
        if body["seq"] in self.poison:
            answer = "500"
        elif self.fail > 0:
            self.fail -= 1
            answer = "500"
        elif self.slow > 0:
            self.slow -= 1
            answer = "slow"
        else:
            answer = "200"
        self.hits.append(Hit(body["room"], body["seq"],
                             int(request.headers["Rtnode-Delivery-Attempt"]), answer, signed,
                             body, dict(request.headers)))
        self.changed.set()
        if answer == "slow":
            await asyncio.sleep(self.slow_s)
        self.answered += 1
        self.changed.set()
        return web.Response(status=500 if answer == "500" else 200, text="ok")

    def ok(self) -> list[Hit]:
        return [h for h in self.hits if h.answer == "200"]

    async def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``predicate()`` holds after some POST, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout * MS * 1000
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


@contextlib.asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[Receiver]:
    """Run ``receiver`` on a free port of 127.0.0.1 (``receiver.url``)."""
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}/hook?key=not-for-logs"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def check_order_and_attempts(hits: list[Hit]) -> None:
    """Per room, POSTs (retries included) come in seq order; per event, attempts grow by one."""
    by_room: dict[str, list[int]] = {}
    attempts: dict[int, list[int]] = {}
    for h in hits:
        by_room.setdefault(h.room, []).append(h.seq)
        attempts.setdefault(h.seq, []).append(h.attempt)
    for room, seqs in by_room.items():
        assert seqs == sorted(seqs), f"{room} out of order: {seqs}"
    for seq, tries in attempts.items():
        assert tries == list(range(1, len(tries) + 1)), f"seq {seq} attempts {tries}"


async def test_failing_slow_then_recovering_receiver_gets_every_event_once(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    node = await make_node()
    t = tenant()
    seqs: dict[str, list[int]] = {room: [] for room in ROOMS}
    for i in range(40):  # 200 events, the rooms interleaved in the stream
        for room in ROOMS:
            seqs[room] += await store(node, t, room, 1, i)
    poison = seqs["wh:r2"][10]
    # timeout_s is generous so that a loaded machine's 200 is never taken for a timeout.
    timeout_s = 1.0 * MS * 1000
    receiver = Receiver(fail=12, slow=4, slow_s=2 * timeout_s, poison={poison})
    nc = NATS()
    await nc.connect(shared_nats.url)
    dead: list[Msg] = []

    async def on_dead(msg: Msg) -> None:
        dead.append(msg)
        receiver.changed.set()

    await nc.subscribe(f"rt.dlq.{t}.hook", cb=on_dead)
    await nc.flush()
    async with serving(receiver), ReplayConsumer(
        nc, tenant=t, rooms="wh:*", durable="hook", max_deliver=8
    ) as consumer:
        runner = asyncio.create_task(post_events(
            consumer, receiver.url, secret=SECRET, concurrency=16, timeout_s=timeout_s,
            backoff_s=0.05, backoff_max_s=0.4))
        try:
            await receiver.wait(lambda: len(receiver.ok()) >= 199 and len(dead) >= 1, 15,
                                "every event acked and the poison one dead-lettered")
            await asyncio.sleep(0.3)  # nothing more may come
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    await nc.close()
    everything = sorted(s for room in ROOMS for s in seqs[room] if s != poison)
    ok = receiver.ok()
    # Every event exactly once with a 2xx, each room's in order; the poison one never.
    assert sorted(h.seq for h in ok) == everything
    for room in ROOMS:
        assert [h.seq for h in ok if h.room == room] == [s for s in seqs[room] if s != poison]
    check_order_and_attempts(receiver.hits)
    # It failed, timed out, then recovered; retries said so.
    answers = [h.answer for h in receiver.hits if h.seq != poison]
    assert answers.count("500") == 12 and answers.count("slow") == 4
    assert max(h.attempt for h in ok) > 1
    # Every POST was signed and carried its stable id; the body is the event.
    assert all(h.signed for h in receiver.hits)
    first = next(h for h in ok if h.seq == seqs["wh:r0"][0])
    assert first.headers["Rtnode-Event-Id"] == f"{t}/wh:r0/{first.seq}"
    assert first.headers["Content-Type"] == "application/json"
    assert abs(int(first.headers["Rtnode-Timestamp"]) - time.time()) < 60
    assert first.body == {"tenant": t, "room": "wh:r0", "seq": first.seq, "event": "reading",
                          "data": {"i": 0}, "ts": first.body["ts"],
                          "from": first.body["from"], "msg_id": "m0"}
    assert first.body["from"]["user"] == "backend"
    # The poison event: max_deliver attempts, then the dead-letter subject; its room went on.
    assert [h.attempt for h in receiver.hits if h.seq == poison] == list(range(1, 9))
    assert len(dead) == 1
    h = dead[0].headers or {}
    assert (h["Rtnode-Seq"], h["Rtnode-Room"], h["Rtnode-Reason"], h["Rtnode-Delivered"]) == (
        str(poison), "wh:r2", "max_deliver", "8")
    assert any(hit.room == "wh:r2" and hit.seq > poison for hit in ok)


async def test_slow_receiver_is_not_redelivered_under_its_post(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    """A POST slower than ack_wait_s: the event is kept in progress, delivered once."""
    node = await make_node()
    t = tenant()
    seqs = await store(node, t, "wh:slow", 2)
    receiver = Receiver(slow=1, slow_s=2.5)
    async with serving(receiver), ReplayConsumer(
        shared_nats.url, tenant=t, rooms="wh:*", durable="slowhook", ack_wait_s=1.0
    ) as consumer:
        runner = asyncio.create_task(post_events(
            consumer, receiver.url, secret=SECRET, timeout_s=5.0, backoff_s=0.05))
        try:
            await receiver.wait(lambda: receiver.answered >= 2, 10, "both events answered")
            await asyncio.sleep(0.3)  # nothing more may come
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    assert [(h.seq, h.attempt) for h in receiver.hits] == [(seqs[0], 1), (seqs[1], 1)]


async def test_node_setting_delivers_to_the_receiver(
    make_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node started with a ``webhooks`` setting POSTs the events it stores, in order, signed
    with the secret named by ``secret_env``; stopping the node stops its runner."""
    t = tenant()
    monkeypatch.setenv("WH_SECRET_FOR_TEST", SECRET)
    async with serving(Receiver(fail=2)) as receiver:
        node = await make_node(webhooks=[{
            "url": receiver.url, "rooms": "wh:*", "tenant": t, "durable": "nodehook",
            "secret_env": "WH_SECRET_FOR_TEST", "timeout_s": 2,
        }])
        assert len(node.webhooks) == 1 and "not-for-logs" not in repr(node.webhooks[0])
        seqs = await store(node, t, "wh:a", 5) + await store(node, t, "wh:b", 5)
        await store(node, t, "other:x", 1)
        await receiver.wait(lambda: len(receiver.ok()) >= 10, 15, "10 events through the node")
        await node.stop()
        assert sorted(h.seq for h in receiver.ok()) == seqs
        assert all(h.signed for h in receiver.hits)
        check_order_and_attempts(receiver.hits)
        assert {h.room for h in receiver.hits} == {"wh:a", "wh:b"}


async def test_runner_survives_a_consumer_that_cannot_start(
    make_node: Any, shared_nats: NatsProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A runner whose consumer fails (its durable is bound to other rooms) logs one line per
    try and tries again after its pause; it never raises, and stop() ends it."""
    node = await make_node()
    t = tenant()
    async with ReplayConsumer(shared_nats.url, tenant=t, rooms="other:*", durable="taken"):
        pass
    runner = WebhookRunner(node.nats.nc, url="http://127.0.0.1:9/hook?key=not-for-logs",
                           rooms="wh:*", durable="taken", tenant=t, secret=SECRET,
                           restart_pause_s=0.05)
    runner.start()
    deadline = time.monotonic() + 10 * MS * 1000
    while runner.restarts < 3:
        assert time.monotonic() < deadline, "no restarts"
        await asyncio.sleep(0.02)
    await runner.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.webhook"]
    assert lines and all("again in" in line for line in lines)
    assert not any(SECRET in line or "not-for-logs" in line for line in lines)


async def test_cancel_cuts_the_posts_in_flight_and_their_events_come_back(
    make_node: Any, shared_nats: NatsProcess
) -> None:
    """Cancelled while every POST hangs: it returns at once, and the events whose POST was cut
    short are nakked by the consumer's close, so the next run posts them first, in order."""
    node = await make_node()
    t = tenant()
    seqs = {room: await store(node, t, room, 3) for room in ("wh:a", "wh:b")}
    receiver = Receiver(slow=2, slow_s=30)
    opts: dict[str, Any] = {"tenant": t, "rooms": "wh:*", "durable": "cut"}
    async with serving(receiver):
        async with ReplayConsumer(shared_nats.url, **opts) as consumer:
            runner = asyncio.create_task(post_events(consumer, receiver.url, timeout_s=60))
            await receiver.wait(lambda: len(receiver.hits) >= 2, 10, "two hanging POSTs")
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(runner, 2)
        first = sorted((h.room, h.seq) for h in receiver.hits)
        assert first == [("wh:a", seqs["wh:a"][0]), ("wh:b", seqs["wh:b"][0])]
        async with ReplayConsumer(shared_nats.url, **opts) as consumer:
            runner = asyncio.create_task(post_events(consumer, receiver.url, timeout_s=5))
            try:
                await receiver.wait(lambda: len(receiver.ok()) >= 6, 10, "all six")
            finally:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
    for room in ("wh:a", "wh:b"):
        assert [h.seq for h in receiver.ok() if h.room == room] == seqs[room]


def test_backoff_signature_and_redaction() -> None:
    """The pure parts: full-jitter bounds, the signature's input, URLs fit for logs."""
    for attempt, cap in [(1, 1.0), (2, 2.0), (4, 8.0), (10, 300.0), (200, 300.0)]:
        delays = [backoff_delay(attempt, 1.0, 300.0) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays) and max(delays) > cap / 2
    body = b'{"seq":1}'
    assert sign("k", "1700000000", body) == "sha256=" + hmac.new(
        b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert redact_url("https://user:pw@h.example:8443/p/x?token=abc#f") == \
        "https://h.example:8443/p/x"
    assert redact_url("http://[::1]/hook?k=v") == "http://[::1]/hook"


async def test_two_nodes_with_the_same_webhook_post_each_event_once(make_node: Any) -> None:
    """Both nodes run the webhook; the pinned consumer makes one post and the other stand by,
    and the standby takes over when the first node stops."""
    t = tenant()
    async with serving(Receiver()) as receiver:
        hook = {"url": receiver.url, "rooms": "wh:*", "tenant": t, "durable": "pair",
                "secret": SECRET, "timeout_s": 2}
        nodes = [await make_node(webhooks=[hook]), await make_node(webhooks=[hook])]
        seqs = await store(nodes[0], t, "wh:a", 10)
        await receiver.wait(lambda: len(receiver.ok()) >= 10, 10, "10 events")

        def active_here(node: Any) -> bool:
            consumer = node.webhooks[0].consumer
            return consumer is not None and consumer.serving == [0]

        active = [node for node in nodes if active_here(node)]
        assert len(active) == 1, "one node posts, the other stands by"
        standby = next(node for node in nodes if node is not active[0])
        await active[0].stop()
        seqs += await store(standby, t, "wh:a", 10, 10)
        await receiver.wait(lambda: len(receiver.ok()) >= 20, 15, "10 more after the stop")
        await asyncio.sleep(0.3)  # nothing more may come
    assert [h.seq for h in receiver.ok()] == seqs
    check_order_and_attempts(receiver.hits)
