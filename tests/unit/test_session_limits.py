"""ConnectionSession limits, with plain values (no event loop, no sockets): the request bucket,
rooms joined per minute, the node's room cap, the error tolerance and the presence throttle.
The rest of the session is in test_session.py (same helpers)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from node.core.limits import ErrorWindow, KeyedBuckets, LimitCarry, TokenBucket
from node.core.session import ConnectionSession
from node.core.session_commands import (
    AnnouncePresence,
    Close,
    Command,
    JoinPlainRoom,
    JoinRoom,
    PresenceAdd,
    PresenceRemove,
    ReadHistory,
    StartTimer,
    StorePublish,
)
from tests.unit.test_session import T0, connected, error_codes, feed, frames, joined, of, token

REQUESTS = [
    {"type": "join", "room": "chat:a"},
    {"type": "leave", "room": "chat:a"},
    {"type": "history", "room": "chat:a"},
    {"type": "presence", "room": "chat:a"},
    {"type": "rpc", "to": "server", "method": "m"},
    {"type": "refresh", "token": token()},
]


def limited(**overrides: Any) -> ConnectionSession:
    return connected(**{"request_rate_per_s": 1, "request_burst": 3,
                        "max_errors_per_min": 100, **overrides})


# -- the request bucket -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", REQUESTS, ids=[r["type"] for r in REQUESTS])
def test_every_request_kind_takes_from_the_request_bucket(raw: dict[str, Any]) -> None:
    s = limited()
    joined(s, "chat:a")  # its join was one of the free ones: joining it again is not
    for i in range(3):
        assert 4009 not in error_codes(feed(s, {**raw, "id": i}))
    out = feed(s, {**raw, "id": 9})
    assert frames(out) == [{"type": "error", "code": 4009, "id": 9, "retry": True,
                            "reason": "too many requests, retry later"}]
    assert len(out) == 1, "refused before any work is asked for"
    assert 4009 not in error_codes(feed(s, {**raw, "id": 10}, now=T0 + 1.0)), "refilled"


def test_request_kinds_share_one_bucket_and_publishes_acks_and_pings_are_apart() -> None:
    s = limited()
    for raw in REQUESTS[2:5]:
        assert 4009 not in error_codes(feed(s, {**raw, "id": 1}))
    for i in range(20):  # publishes: their own bucket (rate_burst 100)
        assert of(feed(s, {"type": "publish", "id": i, "room": "chat:a", "event": "m"}),
                  StorePublish)
    joined_room = "@user:alice"  # acks follow the node's events: never limited
    for seq in range(20):
        assert feed(s, {"type": "ack", "room": joined_room, "seq": seq}) == []
    for i in range(20):  # one small reply each, held back by the socket like any frame
        assert frames(feed(s, {"type": "ping", "id": i})) == [{"type": "pong", "id": i}]
    assert error_codes(feed(s, {"type": "history", "id": 2, "room": "chat:a"})) == [4009]


def test_a_request_flood_ends_with_4009_and_reconnect() -> None:
    s = connected(request_rate_per_s=1, request_burst=2)  # max_errors_per_min 3
    closes: list[Close] = []
    codes: list[int] = []
    for i in range(10):
        out = feed(s, {"type": "history", "id": i, "room": "chat:a"})
        codes += error_codes(out)
        closes += of(out, Close)
    assert codes == [4009] * 4 and closes == [Close(4009, "too many errors", True)]


# -- rooms joined per minute, and the node's room cap --------------------------------------------


def churn(s: ConnectionSession, n: int, now: float, prefix: str = "chat:r") -> list[int]:
    """Join and leave ``n`` distinct rooms, one at a time; the error codes of the joins."""
    codes: list[int] = []
    for i in range(n):
        codes += error_codes(feed(s, {"type": "join", "id": i, "room": f"{prefix}{i}"}, now))
        feed(s, {"type": "leave", "room": f"{prefix}{i}"}, now)
    return codes


def test_rooms_joined_per_minute_are_bounded_and_refill() -> None:
    s = connected(rooms_per_min=5, max_errors_per_min=100)
    assert churn(s, 5, T0) == []  # the bucket's burst (the personal room takes nothing)
    out = feed(s, {"type": "join", "id": "x", "room": "chat:next"}, T0 + 1)
    assert frames(out) == [{"type": "error", "code": 4009, "id": "x", "retry": True,
                            "reason": "too many rooms joined, retry later"}]
    assert not of(out, JoinRoom)
    # a room left and joined again counts again: it may cost a fresh room actor
    assert error_codes(feed(s, {"type": "join", "id": 1, "room": "chat:r0"}, T0 + 1)) == [4009]
    assert churn(s, 1, T0 + 12.5, "chat:s") == []  # 5 per minute: one every 12 s
    assert churn(s, 5, T0 + 72.5, "chat:t") == []


def test_the_rooms_bucket_is_the_users_across_its_connections() -> None:
    # A client cut off for churning starts no fresh allowance by reconnecting.
    buckets = KeyedBuckets(5 / 60, 5)
    first = connected(rooms_per_min=5, room_buckets=buckets)
    assert churn(first, 5, T0) == []
    again = connected(rooms_per_min=5, room_buckets=buckets)
    assert churn(again, 1, T0 + 1) == [4009]
    other = connected(rooms_per_min=5, room_buckets=buckets, tok=token("bob"))
    assert churn(other, 5, T0 + 1) == []


def test_joining_a_joined_room_again_is_not_a_new_room() -> None:
    s = connected(rooms_per_min=2, max_errors_per_min=100)
    for i in range(5):
        assert of(feed(s, {"type": "join", "id": i, "room": "chat:a"}), JoinRoom)


def test_the_node_room_cap_is_4503_with_retry_and_the_connection_stays() -> None:
    running = {("t1", "chat:old")}
    asked: list[tuple[str, str]] = []

    def may_open(tenant: str, room: str) -> bool:
        asked.append((tenant, room))
        return (tenant, room) in running

    s = connected(may_open_room=may_open, max_errors_per_min=3)
    assert asked == [], "the personal room at connect is never refused"
    for i in range(10):  # the node's fault: never counted toward the tolerance
        out = feed(s, {"type": "join", "id": i, "room": f"chat:new{i}"})
        assert frames(out) == [{"type": "error", "code": 4503, "id": i, "retry": True,
                                "reason": "too many rooms on this node, retry later"}]
        assert not of(out, JoinRoom) and not of(out, Close)
    assert of(feed(s, {"type": "join", "id": "o", "room": "chat:old"}), JoinRoom)
    running.clear()
    s.receive_room_lost("chat:old", 4, "e1", T0)  # a rejoin starts nothing new: never refused
    assert of(s.commands_to_send(), JoinRoom) == [JoinRoom("chat:old", 4, "e1", None, False,
                                                           True)]
    assert not s.closing


def test_plain_subscriptions_count_as_joins_and_are_skipped_beyond_the_limits() -> None:
    s = connected(rooms_per_min=2, may_open_room=lambda t, r: r != "chat:full")
    s.receive_plain_join("chat:full", "src", T0)  # the node is full: takes no token
    for room in "abcdef":  # two per minute
        s.receive_plain_join(f"chat:{room}", "src", T0)
    assert [c.room for c in of(s.commands_to_send(), JoinPlainRoom)] == ["chat:a", "chat:b"]
    assert error_codes(feed(s, {"type": "join", "id": 1, "room": "chat:g"})) == [4009]


def test_a_connection_may_join_all_its_rooms_at_once() -> None:
    # A client resuming its rooms after a reconnect sends every join at once: joins of new
    # rooms take from the rooms bucket only, not from the request bucket.
    s = connected(max_rooms_per_connection=50, request_rate_per_s=0.001, request_burst=1,
                  rooms_per_min=60)
    for i in range(49):  # and the personal room
        out = feed(s, {"type": "join", "id": i, "room": f"chat:{i}",
                       "since": {"seq": i, "epoch": "e1"}})
        assert of(out, JoinRoom) and not error_codes(out), i
    assert not error_codes(feed(s, {"type": "history", "id": "h", "room": "chat:1"}))
    assert error_codes(feed(s, {"type": "history", "id": "h", "room": "chat:1"})) == [4009]


# -- the error tolerance --------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "code"), [
    ({"type": "join", "room": "other:a"}, 4003),
    ({"type": "history", "room": "ro:a"}, 4003),
    ({"type": "presence", "room": "quiet:a"}, 4004),
    ({"type": "ack", "room": "chat:never", "seq": 1}, 4004),
    ({"type": "refresh", "token": token("bob")}, 4003),
    ({"type": "publish", "room": "chat:a", "event": "m", "data": "x" * 70000}, 4013),
])
def test_every_error_the_client_provokes_counts_toward_the_tolerance(
        raw: dict[str, Any], code: int) -> None:
    s = connected()  # max_errors_per_min 3
    outs = [feed(s, {**raw, "id": i}, now=T0 + i) for i in range(4)]
    assert [error_codes(out) for out in outs] == [[code]] * 4
    assert [of(out, Close) for out in outs] == [[], [], [], [Close(4009, "too many errors",
                                                                   True)]]
    assert feed(s, {**raw, "id": 9}) == [], "said goodbye: nothing more is answered"


def test_the_close_code_is_4000_when_the_last_error_was_4000() -> None:
    rng = random.Random(11)
    for _ in range(20):
        s = connected()
        codes = [rng.choice([4000, 4003, 4013]) for _ in range(4)]
        for i, code in enumerate(codes):
            s.receive_invalid(code, "bad", i, now=T0 + i)
        (close,) = of(s.commands_to_send(), Close)
        last = codes[-1]
        assert close == Close(4000 if last == 4000 else 4009, "too many errors", last != 4000)


def test_rpc_failures_are_the_targets_not_the_callers() -> None:
    s = connected()
    for i in range(6):
        feed(s, {"type": "rpc", "id": i, "to": "user:bob", "method": "m"}, now=T0 + i)
    s.commands_to_send()
    for call in ("o1", "o2", "o3", "o4", "o5", "o6"):
        s.receive_rpc_failed(call, 4004, "rpc target offline", True)
    out = s.commands_to_send()
    assert error_codes(out) == [4004] * 6 and not of(out, Close)


# -- the presence throttle ------------------------------------------------------------------------


class Clock:
    """Drives a session's timers: fires each StartTimer at its deadline as time advances."""

    def __init__(self, s: ConnectionSession) -> None:
        self.s = s
        self.now = T0
        self.timers: dict[Any, float] = {}
        self.out: list[Command] = []

    def take(self, commands: list[Command]) -> None:
        for c in commands:
            if isinstance(c, StartTimer):
                self.timers[c.key] = c.deadline
            self.out.append(c)

    def feed(self, raw: dict[str, Any]) -> None:
        self.take(feed(self.s, raw, self.now))

    def advance(self, dt: float) -> None:
        until = self.now + dt
        while True:
            due = sorted((t, k) for k, t in self.timers.items() if t <= until)
            if not due:
                break
            t, key = due[0]
            del self.timers[key]
            self.now = max(self.now, t)
            self.s.receive_timer(key, self.now)
            self.take(self.s.commands_to_send())
        self.now = until

    def announced(self) -> list[str]:
        return [c.name for c in of(self.out, AnnouncePresence)]


@pytest.mark.parametrize("end_joined", [False, True])
def test_join_leave_cycles_announce_a_few_events_ending_in_the_true_state(
        end_joined: bool) -> None:
    rng = random.Random(7 + end_joined)
    clock = Clock(connected(request_burst=1000, rooms_per_min=1000))
    cycles = 100
    for i in range(cycles):
        clock.feed({"type": "join", "id": i, "room": "chat:p"})
        clock.advance(rng.uniform(0, 0.01))
        if i < cycles - 1 or not end_joined:
            clock.feed({"type": "leave", "room": "chat:p"})
        clock.advance(rng.uniform(0, 0.01))
    clock.advance(1.0)
    events = clock.announced()
    # ~1 s of churn at a 500 ms window: a handful, alternating, ending in the true state
    assert 1 <= len(events) <= 6, events
    assert all(a != b for a, b in itertools.pairwise(events)), events
    assert events[0] == "presence:join"
    assert events[-1] == ("presence:join" if end_joined else "presence:leave"), events
    # the presence state is exact: every join and leave reached it
    assert len(of(clock.out, PresenceAdd)) == cycles
    assert len(of(clock.out, PresenceRemove)) == cycles - end_joined


def test_a_join_and_leave_within_one_window_after_a_shown_state_shows_nothing_new() -> None:
    clock = Clock(connected())
    clock.feed({"type": "join", "id": 1, "room": "chat:p"})
    assert clock.announced() == ["presence:join"]
    clock.advance(0.1)
    clock.feed({"type": "leave", "room": "chat:p"})
    clock.feed({"type": "join", "id": 2, "room": "chat:p"})
    clock.advance(1.0)
    assert clock.announced() == ["presence:join"], "the watchers already see it joined"


def test_stop_announces_the_leave_that_waited_and_none_for_what_was_never_shown() -> None:
    s = connected()
    joined(s, "chat:a", presence=True)
    s.stop()
    assert [c.name for c in of(s.commands_to_send(), AnnouncePresence)] == ["presence:leave"]
    s = connected()
    feed(s, {"type": "join", "room": "chat:a"})  # shown at once
    feed(s, {"type": "leave", "room": "chat:a"}, T0 + 0.1)  # waits for its window
    s.stop()
    out = s.commands_to_send()
    assert [c.name for c in of(out, AnnouncePresence)] == ["presence:leave"]
    assert not of(out, StartTimer), "nothing is left waiting for a timer"


def test_history_reads_are_refused_before_they_are_read() -> None:
    s = limited()
    reads = [of(feed(s, {"type": "history", "id": i, "room": "chat:a"}), ReadHistory)
             for i in range(6)]
    assert [len(r) for r in reads] == [1, 1, 1, 0, 0, 0]


def test_keyed_buckets_forget_refilled_buckets_and_stay_bounded() -> None:
    rng = random.Random(7)
    buckets = KeyedBuckets(rate=1.0, burst=2)
    now = T0
    for _ in range(20_000):  # many users, each seen a few times, time moving on
        now += rng.random() * 0.01
        key = rng.randrange(100_000)
        assert buckets.get(key, now) is buckets.get(key, now)
        buckets.get(key, now).take(now)
        assert len(buckets) <= 2 * 64 + 2 * 2 / 0.005, "only buckets not yet refilled are kept"
    busy = buckets.get("busy", now)
    assert busy.take(now) and busy.take(now) and not busy.take(now)
    assert buckets.get("busy", now + 0.5) is busy, "a bucket not refilled is kept"


def test_a_reconnect_takes_on_what_the_users_ended_connections_left() -> None:
    # Cut off for errors, a client that reconnects at once is not given a fresh tolerance or a
    # full request bucket: it goes on where its last connection ended.
    carry = LimitCarry()
    first = connected(carry=carry, max_errors_per_min=3, request_burst=3, request_rate_per_s=1)
    for i in range(3):
        feed(first, {"type": "history", "id": i, "room": "chat:a"})
    outs = [feed(first, {"type": "join", "id": i, "room": "other:a"}) for i in range(4)]
    assert of(outs[-1], Close) == [Close(4009, "too many errors", True)]
    first.stop()
    again = connected(carry=carry, max_errors_per_min=3, request_burst=3, request_rate_per_s=1)
    out = feed(again, {"type": "history", "id": 1, "room": "chat:a"})
    assert error_codes(out) == [4009], "the request bucket is where the last one left it"
    assert of(out, Close) == [Close(4009, "too many errors", True)], (
        "and its first error is one too many")
    other = connected(carry=carry, tok=token("bob"), max_errors_per_min=3, request_burst=3)
    assert not error_codes(feed(other, {"type": "history", "id": 1, "room": "chat:a"}))
    later = connected(carry=carry, max_errors_per_min=3, request_burst=3, request_rate_per_s=1)
    assert not error_codes(feed(later, {"type": "history", "id": 1, "room": "chat:a"},
                                now=T0 + 61)), "once refilled and a minute on, nothing binds"


def test_limit_carry_keeps_the_emptiest_and_forgets_what_refilled() -> None:
    carry = LimitCarry()
    full, empty = TokenBucket(1, 10, T0), TokenBucket(1, 10, T0)
    assert all(empty.take(T0) for _ in range(10))
    carry.keep("u", {"requests": empty}, ErrorWindow(3))
    carry.keep("u", {"requests": full}, ErrorWindow(3))
    left = carry.restore("u", T0 + 1)
    assert left is not None and left[0]["requests"].level(T0 + 1) == 1.0
    assert carry.restore("u", T0 + 11) is None and len(carry) == 0
    for i in range(1000):  # users whose limits refilled do not pile up
        carry.keep(i, {"requests": TokenBucket(1, 10, T0 + i)}, ErrorWindow(3))
        carry.restore(-1, T0 + i)
    assert len(carry) < 200
