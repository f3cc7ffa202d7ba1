"""``join`` with ``rewind``: the room's last N stored events, then live, with no gap and no
duplicate (issue 15 point 7), on every door: the WebSocket frame, SSE ``?rewind=N``, the Python
client and the device SDK. And ``history`` paging backwards with ``since`` and ``reverse``.

The seeded test repeats a run with ``RTNODE_TEST_REWIND_SEED=<seed>``.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devices.client import Client, Event
from devices.sdk import Device
from tests.integration.test_sse import data, open_sse, sse_url
from tests.wsclient import RawClient, publish_many, token, unique, ws_url

pytestmark = pytest.mark.integration

# These tests publish hundreds of events quickly: no rate limit in the way.
FAST = {"rate_per_s": 1e6, "rate_burst": 1_000_000, "rooms_per_min": 100_000}



async def events_until(c: RawClient, room: str, last_seq: int) -> list[dict[str, Any]]:
    """Every event frame of ``room`` up to the one with ``last_seq``; then a ping proves that
    nothing else (a duplicate) was queued behind it."""
    out: list[dict[str, Any]] = []
    while not out or out[-1].get("seq") != last_seq:
        f = await c.recv(20)
        if f.get("type") == "event" and f.get("room") == room:
            out.append(f)
            assert f["seq"] <= last_seq, f"beyond the last event published: {f}"
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    extra = [f for f in c.buffer if f.get("type") == "event" and f.get("room") == room]
    assert not extra, f"duplicates after the last event: {extra}"
    return out


async def test_rewind_then_live_without_gap_or_duplicate(make_node: Any) -> None:
    seed = int(os.environ.get("RTNODE_TEST_REWIND_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    node = await make_node(**FAST)
    room = unique("rw")
    writer = await RawClient.connected(ws_url(node), token("w"))
    stored = await publish_many(writer, room, 50)
    data_of = {seq: i for i, seq in enumerate(stored)}
    for round_ in range(6):
        why = f"seed {seed}, round {round_}"
        member = await RawClient.connected(ws_url(node), token(f"m{round_}"))
        n = rng.choice([1, 10, 10, 37])
        burst = rng.randrange(1, 60)
        lead = rng.uniform(0, 0.01)
        # Publishing goes on while the member joins: the switch from replay to live must be
        # exact whatever the interleaving.

        async def writer_task(burst: int = burst, lead: float = lead,
                              start: int = len(stored)) -> list[int]:
            await asyncio.sleep(lead)
            return await publish_many(writer, room, burst, start=start)

        task = asyncio.create_task(writer_task())
        await asyncio.sleep(rng.uniform(0, 0.01))
        joined = await member.request({"type": "join", "room": room, "rewind": n})
        new = await asyncio.wait_for(task, 20)
        assert joined["type"] == "joined", (why, joined)
        for i, seq in enumerate(new, start=len(stored)):
            data_of[seq] = i
        stored += new
        got = await events_until(member, room, stored[-1])
        seqs = [e["seq"] for e in got]
        before = [s for s in stored if s <= joined["seq"]]
        assert joined["recovered"] is False and joined["replayed"] == n, (why, joined)
        assert seqs == before[-n:] + [s for s in stored if s > joined["seq"]], why
        assert [e["data"] for e in got] == [data_of[s] for s in seqs], why
        await member.close()


async def test_rewind_beyond_the_room_gives_all_of_it(make_node: Any) -> None:
    node = await make_node(**FAST)
    room, empty = unique("rw"), unique("rw")
    c = await RawClient.connected(ws_url(node))
    stored = await publish_many(c, room, 5)
    joined = await c.request({"type": "join", "room": room, "rewind": 1000})
    assert (joined["recovered"], joined["replayed"], joined["seq"]) == (False, 5, stored[-1])
    [live] = await publish_many(c, room, 1, start=5)
    got = await events_until(c, room, live)
    assert [e["seq"] for e in got] == [*stored, live]
    assert [e["data"] for e in got] == list(range(6))
    # an empty room: nothing replayed, live from its seq
    joined = await c.request({"type": "join", "room": empty, "rewind": 3})
    assert (joined["replayed"], joined["seq"]) == (0, 0)
    [live] = await publish_many(c, empty, 1)
    assert [e["seq"] for e in await events_until(c, empty, live)] == [live]


async def test_a_namespace_recovery_max_caps_the_rewind(make_node: Any) -> None:
    node = await make_node(**FAST, namespaces={"small": {"recovery_max": 3}})
    room = "small:" + uuid.uuid4().hex[:8]
    c = await RawClient.connected(ws_url(node))
    stored = await publish_many(c, room, 8)
    joined = await c.request({"type": "join", "room": room, "rewind": 100})
    assert joined["replayed"] == 3
    assert [e["seq"] for e in await events_until(c, room, stored[-1])] == stored[-3:]


@pytest.mark.parametrize("rewind", [0, -1, 1001, 10**30, "10", 1.5, True, [10], {"n": 1}])
async def test_bad_rewind_is_4000_and_the_connection_stays(make_node: Any, rewind: Any) -> None:
    node = await make_node()
    room = unique("rw")
    c = await RawClient.connected(ws_url(node))
    reply = await c.request({"type": "join", "room": room, "rewind": rewind})
    assert (reply["type"], reply["code"]) == ("error", 4000), reply
    assert reply["reason"].startswith("bad field rewind: "), reply
    assert "\n" not in reply["reason"] and "Traceback" not in reply["reason"]
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    joined = await c.request({"type": "join", "room": room})
    assert (joined["type"], joined["replayed"]) == ("joined", 0), "the same join, valid"


async def test_rewind_with_since_is_refused(make_node: Any) -> None:
    node = await make_node()
    room = unique("rw")
    c = await RawClient.connected(ws_url(node))
    reply = await c.request({"type": "join", "room": room, "rewind": 5, "since": {"seq": 1}})
    assert (reply["type"], reply["code"]) == ("error", 4000), reply
    assert "since" in reply["reason"] and reply["reason"].startswith("bad field rewind")
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    # null is no rewind: a plain join
    joined = await c.request({"type": "join", "room": room, "rewind": None})
    assert (joined["type"], joined["replayed"]) == ("joined", 0)


async def test_sse_rewind_on_first_connect_then_exact_resume(make_node: Any) -> None:
    node = await make_node(**FAST)
    room = unique("rw")
    pub = await RawClient.connected(ws_url(node))
    stored = await publish_many(pub, room, 30)
    async with open_sse(node, [room], params=[("rewind", "10")]) as sse:
        await sse.joined()
        first = [await sse.message() for _ in range(10)]
        [live] = await publish_many(pub, room, 1, start=30)
        after = await sse.message()
    assert [data(m)["seq"] for m in first] == stored[-10:]
    assert [data(m)["data"] for m in first] == list(range(20, 30))
    assert [m["id"] for m in first] == [f"{room}:{s}" for s in stored[-10:]]
    assert (data(after)["seq"], after["id"]) == (live, f"{room}:{live}")
    # A reconnect (Last-Event-ID) resumes exactly; the rewind in its URL is not applied.
    missed = await publish_many(pub, room, 2, start=31)
    async with open_sse(node, [room], params=[("rewind", "10")],
                        headers={"Last-Event-ID": first[4]["id"]}) as sse:
        await sse.joined()
        want = [*stored[-5:], live, *missed]
        resumed = [await sse.message() for _ in want]
        [live2] = await publish_many(pub, room, 1, start=33)
        last = await sse.message()
    assert [data(m)["seq"] for m in resumed] == want
    assert data(last)["seq"] == live2, "then live, no duplicate"
    # bad values: one clear line, before the stream starts
    async with aiohttp.ClientSession() as http:
        for bad in ("0", "1001", "x", "-3", "1e3", ""):
            async with http.get(sse_url(node), params=[("room", room), ("rewind", bad)],
                                headers={"Authorization": f"Bearer {token()}"}) as resp:
                body = await resp.json()
                assert (resp.status, body["code"]) == (400, 4000), (bad, body)
                assert body["reason"].startswith("bad field rewind"), (bad, body)


async def test_python_client_rewind(make_node: Any) -> None:
    node = await make_node(**FAST)
    room = unique("rw")
    pub = await RawClient.connected(ws_url(node))
    stored = await publish_many(pub, room, 20)
    async with Client(ws_url(node), token=token("a")) as c:
        joined = await c.join(room, rewind=5)
        assert (joined["recovered"], joined["replayed"]) == (False, 5)
        events = aiter(c.events())
        got = [await asyncio.wait_for(anext(events), 10) for _ in range(5)]
        seq = await c.publish(room, "e", 99)
        live = await asyncio.wait_for(anext(events), 10)
    assert all(isinstance(e, Event) for e in got)
    assert [e.seq for e in got] == stored[-5:]
    assert [e.data for e in got if isinstance(e, Event)] == list(range(15, 20))
    assert isinstance(live, Event) and (live.seq, live.data) == (seq, 99)


async def test_device_sdk_rewind(make_node: Any, tmp_path: Path) -> None:
    node = await make_node(**FAST)
    room = unique("rw")
    pub = await RawClient.connected(ws_url(node))
    stored = await publish_many(pub, room, 12)
    dev = f"d-{uuid.uuid4().hex[:8]}"
    async with Device("127.0.0.1", node.mqtt.port, dev, token=token(dev, kind="device"),
                      state_file=tmp_path / "cursors.json") as d:
        await d.wait_connected(10)
        joined = await d.join(room, rewind=4)
        assert joined["replayed"] == 4
        events = aiter(d.events())
        got = [await asyncio.wait_for(anext(events), 10) for _ in range(4)]
        [live] = await publish_many(pub, room, 1, start=12)
        after = await asyncio.wait_for(anext(events), 10)
    assert [e["seq"] for e in got if isinstance(e, dict)] == stored[-4:]
    assert isinstance(after, dict) and after["seq"] == live


async def test_history_since_and_reverse(make_node: Any) -> None:
    """What PROTOCOL.md's history row says, on a room of 10 events (other rooms in between)."""
    node = await make_node(**FAST)
    room, other = unique("h"), unique("h")
    c = await RawClient.connected(ws_url(node))
    s: list[int] = []
    for i in range(10):
        s += await publish_many(c, room, 1, start=i)
        await publish_many(c, other, 1)  # the seqs of room jump by 2

    async def hist(**kw: Any) -> list[int]:
        r = await c.request({"type": "history", "room": room, **kw})
        assert r["type"] == "history" and r["seq"] == s[-1], r
        return [e["seq"] for e in r["events"]]

    assert await hist(limit=3) == s[-3:], "no since: the latest 3, oldest first"
    assert await hist(limit=3, reverse=True) == s[:-4:-1], "the latest 3, newest first"
    assert await hist(since={"seq": s[2]}, limit=3) == s[3:6], "after since, oldest first"
    assert await hist(since={"seq": s[2]}) == s[3:], "after since: up to limit"
    assert await hist(since={"seq": s[6]}, limit=3, reverse=True) == [s[5], s[4], s[3]], \
        "reverse pages backwards: the 3 before since, newest first"
    assert await hist(since={"seq": s[1]}, limit=3, reverse=True) == [s[0]]
    assert await hist(since={"seq": s[0]}, limit=3, reverse=True) == []
    assert await hist(since={"seq": 0}, limit=3, reverse=True) == [], "nothing before seq 0"
    assert await hist(since={"seq": 0}, limit=3) == s[:3], "since 0: from the beginning"
    assert await hist(since={"seq": s[-1] + 1000}, limit=3, reverse=True) == s[:-4:-1]
