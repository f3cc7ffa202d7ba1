"""The admission pipeline (node.core.admission) with a recording store and feed: no sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import cbor2
import pytest

from node.core.admission import DOORS, Admission, VolatileThrottle
from node.core.limits import TokenBucket
from node.core.ports import StoreError
from node.protocol.errors import ProtocolError
from node.protocol.frames import Publish, publish_frame
from node.protocol.settings import load_settings
from node.protocol.tokens import Principal

ALICE = Principal(sub="alice", tenant="t1", rooms={"chat:*": frozenset({"publish"}),
                                                   "cur:*": frozenset({"publish"}),
                                                   "small:*": frozenset({"publish"})})


class RecordingStore:
    """RoomStore and LiveFeed: records what is stored and sent; fails when told to."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str, bytes, str, float | None]] = []
        self.sent: list[tuple[str, str, bytes]] = []
        self.fail: StoreError | None = None
        self.feed_fails = False
        self.keys: dict[str, int] = {}
        self.soon: list[asyncio.Future[tuple[int, bool]]] | None = None  # publish_soon's

    def publish_soon(self, tenant: str, room: str, body: bytes, msg_id: str,
                     ttl_s: float | None = None) -> asyncio.Future[tuple[int, bool]] | None:
        if self.soon is None:
            return None  # not gathering: await publish
        fut: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self.soon.append(fut)
        return fut

    async def publish(self, tenant: str, room: str, body: bytes, msg_id: str,
                      ttl_s: float | None = None) -> tuple[int, bool]:
        if self.fail is not None:
            raise self.fail
        if msg_id in self.keys:
            return self.keys[msg_id], True
        self.stored.append((tenant, room, body, msg_id, ttl_s))
        self.keys[msg_id] = len(self.stored)
        return len(self.stored), False

    def publish_volatile(self, tenant: str, room: str, body: bytes, *,
                         later: bool = False) -> None:
        if self.feed_fails:
            raise ConnectionError("nats closed")
        self.sent.append((tenant, room, body))


def admission(**overrides: Any) -> tuple[Admission, RecordingStore]:
    settings = load_settings(**{
        "jwt_secret": "x" * 32,
        "namespaces": {"cur": {"volatile": True}, "small": {"max_payload_bytes": 200,
                                                            "history_ttl_s": 60}},
        **overrides,
    })
    store = RecordingStore()
    return Admission(settings, store, store), store  # type: ignore[arg-type]


def frame(room: str = "chat:a", event: str = "msg", data: Any = None,
          msg_id: str | None = None) -> Publish:
    return publish_frame({"room": room, "event": event, "data": data, "msg_id": msg_id})


def refusal(adm: Admission, principal: Principal | None, f: Publish, **kw: Any) -> int:
    with pytest.raises(ProtocolError) as info:
        adm.admit("ws", principal, f, client_id="c1", **kw)
    assert "\n" not in info.value.reason
    return info.value.code


async def test_a_valid_publish_is_stored_with_its_scoped_dedupe_key() -> None:
    adm, store = admission()
    latencies: list[float] = []
    adm.stats.latency = latencies.append
    admitted = adm.admit("ws", ALICE, frame(data={"t": 1}, msg_id="m1"), client_id="c1")
    assert not admitted.volatile and admitted.dedupe == "t1/chat:a/alice/m1"
    event = cbor2.loads(admitted.body)
    assert event["data"] == {"t": 1} and event["from"] == {
        "user": "alice", "kind": "user", "client_id": "c1"} and event["msg_id"] == "m1"
    assert await adm.store(admitted) == 1
    again = adm.admit("mqtt", ALICE, frame(data={"t": 1}, msg_id="m1"), client_id="c1")
    assert await adm.store(again) == 1, "the same msg_id: the original's seq"
    assert len(store.stored) == 1 and len(latencies) == 2
    assert adm.stats.counts[("ws", "stored")] == 1
    assert adm.stats.counts[("mqtt", "duplicate")] == 1
    assert adm.stats.published == 2
    a = adm.admit("ws", ALICE, frame(), client_id=None)
    b = adm.admit("ws", ALICE, frame(), client_id=None)
    assert a.dedupe != b.dedupe, "without msg_id every publish gets a key of its own"
    assert "client_id" not in cbor2.loads(a.body)["from"]


async def test_the_rules_apply_in_order() -> None:
    adm, store = admission(rate_per_s=0.001, rate_burst=1)
    bucket = TokenBucket(0.001, 1, time.monotonic())  # admission reads time.monotonic()
    stranger = Principal(sub="bob", tenant="t1")
    assert refusal(adm, None, frame()) == 4001, "identity first"
    assert refusal(adm, Principal(sub="x", kind="robot"), frame()) == 4001  # type: ignore[arg-type]
    assert refusal(adm, stranger, frame(event="presence:join"), bucket=bucket) == 4003
    assert refusal(adm, ALICE, frame(event="presence:join"), bucket=bucket) == 4003
    assert bucket.take(time.monotonic()), "refusals before the rate limit cost no token"
    assert refusal(adm, ALICE, frame(), bucket=bucket) == 4009
    big_and_bad = frame("small:x", data=["x" * 300, cbor2.undefined])
    assert refusal(adm, ALICE, big_and_bad) == 4013, "size before the value model"
    assert refusal(adm, ALICE, frame("small:x", data=cbor2.undefined)) == 4000
    assert store.stored == [] and store.sent == []
    counts = adm.stats.counts
    assert (counts[("ws", "4001")], counts[("ws", "4003")], counts[("ws", "4009")],
            counts[("ws", "4013")], counts[("ws", "4000")]) == (2, 2, 1, 1, 1)
    assert adm.stats.rate_limited == 1


def test_a_rate_limit_refusal_says_retry() -> None:
    adm, _ = admission()
    bucket = TokenBucket(0.001, 1, time.monotonic())
    bucket.take(time.monotonic())
    with pytest.raises(ProtocolError) as info:
        adm.admit("ws", ALICE, frame(), client_id=None, bucket=bucket)
    assert info.value.code == 4009 and info.value.retry


def test_the_value_model_error_names_the_path() -> None:
    adm, _ = admission()
    with pytest.raises(ProtocolError) as info:
        adm.admit("api", ALICE, frame(data={"r": [0, 2**64]}), client_id=None)
    assert info.value.code == 4000 and info.value.reason.startswith("bad value at data.r[1]")


async def test_volatile_events_and_namespaces_are_never_stored() -> None:
    adm, store = admission()
    typing = adm.admit("mqtt", ALICE, frame(event="user:typing", msg_id="m"), client_id="d")
    cursor = adm.admit("broker", ALICE, frame("cur:1", event="move"), client_id=None)
    for admitted in (typing, cursor):
        assert admitted.volatile and admitted.dedupe == "" and admitted.ttl_s is None
        adm.send_volatile(admitted)
    assert store.stored == [] and len(store.sent) == 2
    assert adm.stats.counts[("mqtt", "volatile")] == adm.stats.counts[("broker", "volatile")] == 1
    store.feed_fails = True
    with pytest.raises(ProtocolError) as info:
        adm.send_volatile(typing)
    assert info.value.code == 4503 and info.value.retry and adm.stats.volatile_failed == 1
    adm.send_volatile_quietly(typing)  # fire and forget: counted, never raised
    assert adm.stats.volatile_failed == 2


async def test_store_failures_map_to_4503_retry_or_4500() -> None:
    adm, store = admission()
    small = adm.admit("broker", ALICE, frame("small:a", data=1), client_id=None)
    assert small.ttl_s == 60, "a namespace's history_ttl_s travels with the event"
    for error, code, retry in ((StoreError("timeout"), 4503, True),
                               (StoreError("too big", retry=False), 4500, False)):
        store.fail = error
        with pytest.raises(ProtocolError) as info:
            await adm.store(small)
        assert (info.value.code, info.value.retry) == (code, retry)
    assert adm.stats.counts[("broker", "4503")] == adm.stats.counts[("broker", "4500")] == 1
    assert adm.stats.published == 0


async def test_store_soon_answers_as_store_would() -> None:
    """Without a coroutine: ``done`` hears what ``store`` would return or raise, counted the
    same; a cancelled publish is never answered; a store's bug (any other exception) is a
    4503 to retry; a store that is not gathering, and a state room, take the coroutine path
    (False)."""
    adm, store = admission(namespaces={"st": {"state": True}})
    event = adm.admit("ws", ALICE, frame("chat:a", data=1), client_id="c1")
    heard: list[tuple[int, int | None, bool | None]] = []

    def done(seq: int, error: ProtocolError | None) -> None:
        heard.append((seq, error and error.code, error and error.retry))

    assert adm.store_soon(event, done) is False  # the store is not gathering
    store.soon = []
    for _ in range(6):
        assert adm.store_soon(event, done) is True
    assert heard == [], "never answered within the call"
    ok, dup, retry, refused, cancelled, bug = store.soon
    ok.set_result((7, False))
    dup.set_result((7, True))
    retry.set_exception(StoreError("timeout"))
    refused.set_exception(StoreError("too big", retry=False))
    cancelled.cancel()
    bug.set_exception(RuntimeError("a bug of the store"))
    await asyncio.sleep(0)  # the futures' callbacks run
    assert heard == [(7, None, None), (7, None, None), (0, 4503, True), (0, 4500, False),
                     (0, 4503, True)]
    counts = adm.stats.counts
    assert (counts[("ws", "stored")], counts[("ws", "duplicate")], counts[("ws", "4503")],
            counts[("ws", "4500")]) == (1, 1, 2, 1)
    writer = Principal(sub="w", tenant="t1", rooms={"st:*": frozenset({"publish"})})
    state = adm.admit("ws", writer, frame("st:a", data=1), client_id="c1")
    assert state.key == "w"
    assert adm.store_soon(state, done) is False


@pytest.mark.parametrize("door", DOORS)
async def test_every_door_gets_the_same_answer(door: str) -> None:
    adm, _ = admission()
    cases: list[tuple[Publish, Principal, str]] = [
        (frame(data=1), ALICE, "stored"),
        (frame("small:a", data="x" * 300), ALICE, "4013"),
        (frame(data=cbor2.undefined), ALICE, "4000"),
        (frame(event="presence:leave"), ALICE, "4003"),
        (frame(event="user:typing"), ALICE, "volatile"),
        (frame("other:a"), ALICE, "4003"),
    ]
    for f, who, expected in cases:
        try:
            admitted = adm.admit(door, who, f, client_id=None)
        except ProtocolError as exc:
            assert str(exc.code) == expected
            continue
        if admitted.volatile:
            assert expected == "volatile"
        else:
            await adm.store(admitted)
            assert expected == "stored"
    assert sorted(o for (d, o) in adm.stats.counts.elements() if d == door) == sorted(
        e for _, _, e in cases)


def test_volatile_throttle_sends_the_latest_of_a_burst_once_per_window() -> None:
    t: VolatileThrottle[str] = VolatileThrottle(0.5)
    assert t.offer("r", "a", 10.0) == ("a", None), "the first goes at once"
    assert t.offer("r", "b", 10.1) == (None, pytest.approx(0.4)), "held until the window ends"
    assert t.offer("r", "c", 10.2) == (None, None), "replaces the held one; flush already due"
    assert t.offer("other", "x", 10.2) == ("x", None), "rooms are throttled apart"
    assert t.flush("r", 10.5) == "c"
    assert t.flush("r", 10.5) is None
    assert t.offer("r", "d", 10.6) == (None, pytest.approx(0.4)), "a flush opens a window"
    assert t.offer("r", "e", 11.1) == (None, None), "still waiting for its flush"
    assert t.flush("r", 11.0) == "e"
    assert t.offer("r", "f", 11.6) == ("f", None)


def test_volatile_throttle_forgets_rooms_quiet_for_a_window() -> None:
    t: VolatileThrottle[int] = VolatileThrottle(1.0)
    for i in range(VolatileThrottle._PRUNE_AT):
        t.offer(f"r{i}", i, 0.0)
    t.offer("late", 0, 5.0)
    assert len(t._last) == 1


def test_volatile_throttle_does_not_rescan_rooms_that_are_all_within_their_window() -> None:
    """A burst over many rooms, each within its window: a prune that keeps them all is not run
    again at the next offer (that made every offer scan them all: quadratic)."""
    t: VolatileThrottle[int] = VolatileThrottle(10.0)
    scans = 0

    class Counting(dict):  # type: ignore[type-arg]
        def items(self):  # type: ignore[no-untyped-def]
            nonlocal scans
            scans += 1
            return super().items()

    t._last = Counting()
    n = 20 * VolatileThrottle._PRUNE_AT
    for i in range(n):
        t.offer(f"r{i}", i, i * 1e-6)
        if type(t._last) is dict:
            t._last = Counting(t._last)
    assert len(t._last) == n
    assert scans <= 6, scans  # at 1024, 2048, 4096, ... not at each offer beyond 1024
    for i in range(n):  # the window ends for all: the next prune forgets them
        t.offer(f"s{i}", i, 100.0 + i * 1e-6)
    assert len(t._last) <= 2 * n
