"""Persistent MQTT sessions on the plain face (issue 13): clean_session=0, QoS 1 downlinks,
cursors in KV, resume on any node; real nodes, real MQTT clients (paho-mqtt, mosquitto_sub,
and ``tests.cluster.RawMqtt``, a bare client that PUBACKs only when told)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import Any

import cbor2
import paho.mqtt.client as paho
import pytest

from node.core.events import event_body
from node.protocol.tokens import Principal
from tests.cluster import RawMqtt
from tests.wsclient import token, unique

pytestmark = pytest.mark.integration

WHO = Principal(sub="backend", kind="service")


def dev_token(dev: str) -> str:
    return token(dev, kind="device")


async def store(node: Any, room: str, n: int, start: int = 0, tenant: str = "default",
                window: int = 500) -> list[int]:
    """Store ``n`` events {"i": start..} in ``room`` through the node's store, ``window`` at
    a time; their seqs, ascending."""
    seqs: list[int] = []
    for lo in range(start, start + n, window):
        hi = min(lo + window, start + n)
        acks = await asyncio.gather(*(
            node.store.publish(tenant, room, event_body(room, "reading", {"i": i}, WHO, None,
                                                        f"m{i}"), f"{room}:{i}")
            for i in range(lo, hi)))
        seqs += [seq for seq, _ in acks]
    return sorted(seqs)


async def receive(raw: RawMqtt, n: int, *, ack: bool = True, timeout: float = 10.0
                  ) -> list[tuple[int, int, bool, dict[str, Any]]]:
    """``n`` PUBLISHes: (packet id, qos, dup, payload map); PUBACKed when ``ack``."""
    out = []
    for _ in range(n):
        _topic, payload, pid, qos, dup, _retain = await raw.publish_in(timeout)
        if ack and qos:
            raw.puback(pid)
        out.append((pid, qos, dup, cbor2.loads(payload)))
    return out


async def saved(node: Any, dev: str, check: Any, timeout: float = 5.0) -> Any:
    """The device's stored session, once ``check(record)`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            record = await node.sessions.get("default", dev)
            if record is not None and check(record):
                return record
            await asyncio.sleep(0.02)


async def until(check: Any, timeout: float = 5.0) -> None:
    """Wait until ``await check()`` is true (polled)."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


async def test_missed_events_in_order_after_reconnect_then_live(make_node: Any) -> None:
    node = await make_node()
    room, dev = unique("cmd"), unique("dev")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert not raw.session_present and raw.return_code == 0
    assert await raw.subscribe(f"rooms/{room}", qos=2) == [1]  # QoS 2 is granted 1
    first = await store(node, room, 3)
    got = await receive(raw, 3)
    assert [m["seq"] for *_, m in got] == first and all(q == 1 and not d for _, q, d, _m in got)
    await saved(node, dev, lambda r: r.cursors.get(room) == first[-1])
    await raw.disconnect()
    await saved(node, dev, lambda r: not r.connected)

    missed = await store(node, room, 200, start=3)
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present  # no SUBSCRIBE: the subscription was kept
    got = await receive(raw, 200)
    assert [m["seq"] for *_, m in got] == missed
    assert [m["data"]["i"] for *_, m in got] == list(range(3, 203))
    assert not any(d for _, _q, d, _m in got)
    live = await store(node, room, 1, start=203)
    [(_, _, _, m)] = await receive(raw, 1)
    assert m["seq"] == live[0]
    record = await saved(node, dev, lambda r: r.cursors.get(room) == live[0])
    assert record.subs == {f"rooms/{room}": 1} and record.connected and record.node == "n1"
    await raw.disconnect()


async def test_unacknowledged_come_again_with_dup_and_clean_session_starts_empty(
        make_node: Any) -> None:
    node = await make_node(mqtt_inflight=4)
    room, dev = unique("cmd"), unique("dev")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    await raw.subscribe(f"rooms/{room}")
    seqs = await store(node, room, 10)
    got = await receive(raw, 4, ack=False)  # the window: 4 in flight, none acknowledged
    assert [m["seq"] for *_, m in got] == seqs[:4]
    with pytest.raises(TimeoutError):
        await raw.publish_in(timeout=0.3)  # nothing beyond the window
    raw.puback(got[0][0])  # the first one only: the cursor moves to it
    [(_, _, _, fifth)] = await receive(raw, 1, ack=False)
    assert fifth["seq"] == seqs[4]
    await saved(node, dev, lambda r: r.cursors.get(room) == seqs[0]
                and r.sent.get(room) == seqs[4])
    await raw.drop()
    await saved(node, dev, lambda r: not r.connected)

    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present
    again = await receive(raw, 9)
    assert [m["seq"] for *_, m in again] == seqs[1:]
    # Sent before and not acknowledged: DUP, with their packet ids of the first time.
    assert [d for _, _q, d, _m in again] == [True] * 4 + [False] * 5
    assert [p for p, *_ in again[:3]] == [p for p, *_ in got[1:4]]
    await raw.disconnect()

    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev), clean=True)
    assert not raw.session_present
    await store(node, room, 2, start=10)
    with pytest.raises(TimeoutError):
        await raw.publish_in(timeout=0.3)  # no subscription kept
    await raw.disconnect()
    assert await node.sessions.get("default", dev) is None  # clean: nothing kept
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert not raw.session_present
    await raw.disconnect()


async def test_paho_session_survives_a_node_restart(make_node: Any) -> None:
    first = await make_node()
    room, dev = unique("cmd"), unique("lamp")
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    connected: asyncio.Queue[bool] = asyncio.Queue()
    subscribed = asyncio.Event()

    def client(port: int) -> paho.Client:
        p = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=dev, clean_session=False)
        p.username_pw_set(dev, dev_token(dev))
        p.on_connect = lambda c, u, f, rc, props: loop.call_soon_threadsafe(
            connected.put_nowait, bool(f.session_present))
        p.on_subscribe = lambda c, u, mid, codes, props: loop.call_soon_threadsafe(
            subscribed.set)
        p.on_message = lambda c, u, m: loop.call_soon_threadsafe(
            got.put_nowait, (m.qos, m.payload))
        p.connect("127.0.0.1", port)
        p.loop_start()
        return p

    p = client(first.mqtt.port)
    try:
        assert await asyncio.wait_for(connected.get(), 10) is False
        p.subscribe(f"rooms/{room}", qos=1)
        await asyncio.wait_for(subscribed.wait(), 10)
        await saved(first, dev, lambda r: f"rooms/{room}" in r.subs)
    finally:
        p.disconnect()
        p.loop_stop()
    await first.stop()  # the node goes; the session is in the bucket

    second = await make_node()
    missed = await store(second, room, 20)
    p = client(second.mqtt.port)
    try:
        assert await asyncio.wait_for(connected.get(), 10) is True  # session present
        items = [await asyncio.wait_for(got.get(), 10) for _ in range(20)]
        assert [cbor2.loads(b)["seq"] for _, b in items] == missed
        assert {q for q, _ in items} == {1}
        await saved(second, dev, lambda r: r.cursors.get(room) == missed[-1]
                    and r.node == "n2")
    finally:
        p.disconnect()
        p.loop_stop()


async def test_ten_thousand_missed_events_resume_paged(make_node: Any) -> None:
    # recovery_max 2,000: a join could replay at most that many (the stream keeps 10,000 per
    # room, history_size)
    node = await make_node(recovery_max=2000)
    room, dev = unique("bulk"), unique("dev")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    await raw.subscribe(f"rooms/{room}")
    await saved(node, dev, lambda r: room in r.cursors)
    await raw.disconnect()
    await saved(node, dev, lambda r: not r.connected)
    n = 10_000
    missed = await store(node, room, n)
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present
    started = loop_time()
    got = await receive(raw, n, timeout=20)
    elapsed = loop_time() - started
    assert [m["seq"] for *_, m in got] == missed, "every missed event, in order, once"
    live = await store(node, room, 1, start=n)
    [(_, _, _, m)] = await receive(raw, 1)
    assert m["seq"] == live[0]
    await saved(node, dev, lambda r: r.cursors.get(room) == live[0])
    await raw.disconnect()
    print(f"resume of {n} missed events: {elapsed:.2f} s")


def loop_time() -> float:
    return asyncio.get_running_loop().time()


async def test_trimmed_cursor_gets_a_gap_notice_then_what_is_stored(make_node: Any) -> None:
    node = await make_node()
    room, dev = unique("short"), unique("dev")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    await raw.subscribe(f"rtnode/v1/{dev}/out", qos=0)
    await raw.subscribe(f"rooms/{room}")
    [seq] = await store(node, room, 1)
    await receive(raw, 1)
    await saved(node, dev, lambda r: r.cursors.get(room) == seq)
    await raw.disconnect()
    await saved(node, dev, lambda r: not r.connected)
    later = await store(node, room, 12, start=1)
    await node.store.trim("default", room, 5)
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present
    got = []
    for _ in range(6):
        topic, payload, pid, qos, _dup, _retain = await raw.publish_in()
        if qos:
            raw.puback(pid)
        got.append((topic, cbor2.loads(payload)))
    assert got[0] == (f"rtnode/v1/{dev}/out", {
        "type": "notice", "code": "gap", "room": room, "missed_from": seq + 1,
        "missed_to": later[-5] - 1, "reason": "trimmed"})
    assert [m["seq"] for _, m in got[1:]] == later[-5:]
    await raw.disconnect()


async def test_mosquitto_sub_persistent_and_a_takeover_from_another_node(make_node: Any) -> None:
    a = await make_node()
    b = await make_node()
    room, dev = unique("cmd"), unique("sub")
    exe = shutil.which("mosquitto_sub")
    assert exe, "make test installs Debian's mosquitto-clients"
    args = [exe, "-h", "127.0.0.1", "-i", dev, "-u", dev, "-P", dev_token(dev), "-c",
            "-q", "1", "-t", f"rooms/{room}", "-F", "%x"]
    # A first run makes the session (it ends after 1 s without messages).
    r = await asyncio.to_thread(subprocess.run, [*args, "-p", str(a.mqtt.port), "-W", "1"],
                                capture_output=True, timeout=20)
    assert r.returncode in (0, 27), r.stderr  # 27: timed out, as asked
    await saved(a, dev, lambda r: not r.connected and f"rooms/{room}" in r.subs)
    missed = await store(a, room, 5)
    r = await asyncio.to_thread(subprocess.run, [*args, "-p", str(b.mqtt.port), "-C", "5",
                                                 "-W", "10"], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    seqs = [cbor2.loads(bytes.fromhex(x))["seq"] for x in r.stdout.decode().split()]
    assert seqs == missed
    await saved(b, dev, lambda r: not r.connected)  # (else its last PUBACKs may come late)

    # Held on a, then taken by a CONNECT on b: a's connection is closed.
    raw_a = await RawMqtt.connect(a.mqtt.port, dev, dev_token(dev))
    assert raw_a.session_present
    await saved(a, dev, lambda r: r.connected and r.node == "n1")
    raw_b = await RawMqtt.connect(b.mqtt.port, dev, dev_token(dev))
    assert raw_b.session_present
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        async with asyncio.timeout(5):
            await raw_a.read_packet()
    more = await store(a, room, 2, start=5)
    got = await receive(raw_b, 2)
    assert [m["seq"] for *_, m in got] == more
    await raw_b.disconnect()


async def test_retained_uplink_outside_a_state_room_is_refused_and_expiry(make_node: Any
                                                                          ) -> None:
    node = await make_node(mqtt_session_expiry_s=1.5)
    room, dev = unique("plain"), unique("dev")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    await raw.subscribe(f"rtnode/v1/{dev}/out", qos=0)
    raw.publish(f"rooms/{room}/up", cbor2.dumps({"event": "reading", "data": 1}), qos=1,
                retain=True)
    topic, payload, *_ = await raw.publish_in()
    notice = cbor2.loads(payload)
    assert topic == f"rtnode/v1/{dev}/out" and notice["code"] == 4000
    assert "state room" in notice["reason"]
    assert node.mqtt.refusals.counts["not_state_room"] == 1
    await raw.disconnect()
    await saved(node, dev, lambda r: not r.connected)
    await asyncio.sleep(2.0)  # past the session expiry: the bucket's max age
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert not raw.session_present
    await raw.disconnect()


async def test_state_room_retained_values_first_and_retained_uplinks(make_node: Any) -> None:
    node = await make_node(namespaces={"st": {"state": True}})
    room, a, b = unique("st"), unique("dev"), unique("dev")
    sender = await RawMqtt.connect(node.mqtt.port, a, dev_token(a))
    pid = sender.publish(f"rooms/{room}/up", cbor2.dumps({"event": "reading", "data": 21}),
                         qos=1, retain=True)
    b0, rest = await sender.read_packet()
    assert (b0 >> 4, int.from_bytes(rest, "big")) == (4, pid)  # PUBACKed once stored
    watcher = await RawMqtt.connect(node.mqtt.port, b, dev_token(b))
    await watcher.subscribe(f"rooms/{room}")
    _t, payload, wpid, qos, dup, retain = await watcher.publish_in()
    value = cbor2.loads(payload)
    assert (qos, dup, retain) == (1, False, True)  # the current value, retained
    assert (value["key"], value["data"], value["event"]) == (a, 21, "reading")
    watcher.puback(wpid)
    sender.publish(f"rooms/{room}/up", b"", qos=1, retain=True)  # an empty payload: unset
    _t, payload, wpid, qos, _dup, retain = await watcher.publish_in()
    unset = cbor2.loads(payload)
    assert (qos, retain) == (1, False)  # a live event
    assert (unset["key"], unset["event"], unset["unset"]) == (a, "state:unset", True)
    watcher.puback(wpid)
    b0, _rest = await sender.read_packet()  # PUBACKed once the state is written too
    assert b0 >> 4 == 4
    assert await node.state.values("default", room) == []
    await watcher.disconnect()
    await sender.disconnect()


async def test_sessions_per_tenant_are_bounded(make_node: Any) -> None:
    node = await make_node(mqtt_max_sessions_per_tenant=1)
    tenant = "s" + unique("t")[2:]
    devs = [unique("dev") for _ in range(2)]
    toks = [token(d, kind="device", tenant=tenant) for d in devs]
    raw = await RawMqtt.connect(node.mqtt.port, devs[0], toks[0])
    assert raw.return_code == 0
    refused = await RawMqtt.connect(node.mqtt.port, devs[1], toks[1])
    assert refused.return_code == 3  # server unavailable: the tenant has its sessions
    clean = await RawMqtt.connect(node.mqtt.port, devs[1], toks[1], clean=True)
    assert clean.return_code == 0  # a clean session keeps nothing: not counted
    for c in (raw, clean):
        await c.disconnect()
    assert [r.client_id for r in await node.sessions.list(tenant)] == [devs[0]]


async def test_takeover_on_the_same_node_keeps_the_last_acknowledgements(make_node: Any
                                                                         ) -> None:
    node = await make_node()
    room, dev = unique("cmd"), unique("dev")
    old = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    await old.subscribe(f"rooms/{room}")
    seqs = await store(node, room, 3)
    await receive(old, 3)  # acknowledged: the takeover must not send them again
    await asyncio.sleep(0.05)  # the PUBACKs reach the node
    new = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert new.session_present
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        async with asyncio.timeout(5):
            await old.read_packet()  # the old connection is closed
    later = await store(node, room, 2, start=3)
    got = await receive(new, 2)
    assert [m["seq"] for *_, m in got] == later and seqs[-1] < later[0]
    await new.disconnect()


async def test_a_clean_connect_takes_the_offline_device_out_of_presence(make_node: Any
                                                                        ) -> None:
    node = await make_node()
    room, dev = unique("fleet"), unique("dev")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    await raw.subscribe(f"rooms/{room}")
    await raw.disconnect()
    await saved(node, dev, lambda r: not r.connected)

    async def listed() -> dict[str, Any]:
        return {m["client_id"]: m for m in await node.presence.members("default", room)}

    async def offline() -> bool:
        return (await listed()).get(dev, {}).get("online") is False

    async def gone() -> bool:
        return dev not in await listed()

    await until(offline)  # away: offline, not gone
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev), clean=True)
    assert not raw.session_present
    await until(gone)  # the discarded session's offline entry goes with it
    await raw.disconnect()


async def test_a_slow_persistent_device_is_cut_off_and_loses_nothing(make_node: Any) -> None:
    node = await make_node(mqtt_inflight=2, slow_consumer_bytes=20_000)
    room, dev = unique("cmd"), unique("dev")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    await raw.subscribe(f"rooms/{room}")
    await saved(node, dev, lambda r: room in r.cursors)
    big = "x" * 1000
    seqs = []
    for lo in range(0, 100, 10):  # live, in bursts: more than 20 kB wait beyond the window
        seqs += await store_data(node, room, [{"i": i, "pad": big} for i in range(lo, lo + 10)])
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        async with asyncio.timeout(5):
            while True:
                await raw.read_packet()  # never acknowledged: cut off as a slow consumer
    assert node.ctx.slow_consumers >= 1
    await saved(node, dev, lambda r: not r.connected)
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present
    got = await receive(raw, 100)
    assert [m["seq"] for *_, m in got] == seqs  # every one, in order, from the cursor
    await raw.disconnect()


async def store_data(node: Any, room: str, datas: list[Any]) -> list[int]:
    acks = []
    for data in datas:
        acks.append(await node.store.publish("default", room, event_body(
            room, "reading", data, WHO, None, None), unique("m")))
    return [seq for seq, _ in acks]


async def test_sessions_of_a_tenant_are_listed_whole(make_node: Any) -> None:
    from bridge.mqtt_sessions import SessionRecord

    node = await make_node()
    tenant = "l" + unique("t")[2:]
    n = 1100  # more than one multi_last (1024) or one page (1000) answers
    await asyncio.gather(*(node.sessions.write(SessionRecord(tenant, f"d-{i:04d}"), 0)
                           for i in range(n)))
    listed = await node.sessions.list(tenant)
    assert [r.client_id for r in listed] == [f"d-{i:04d}" for i in range(n)]
    assert await node.sessions.count(tenant) == n
    assert await node.sessions.delete(tenant, "d-0000")
    assert not await node.sessions.delete(tenant, "d-0000")
    assert len(await node.sessions.list(tenant)) == n - 1


async def test_a_recreated_stream_means_a_gap_notice_and_the_room_from_its_start(
        make_node: Any) -> None:
    from bridge.mqtt_sessions import SessionRecord

    node = await make_node()
    room, dev = unique("cmd"), unique("dev")
    seqs = await store(node, room, 3)
    # A session of an earlier life of the stream (another epoch), its cursor beyond.
    await node.sessions.write(SessionRecord(
        "default", dev, subs={f"rtnode/v1/{dev}/out": 0, f"rooms/{room}": 1},
        cursors={room: 10**9}, sent={room: 10**9}, epoch="an-old-epoch"), 0)
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present
    topic, payload, *_ = await raw.publish_in()
    assert topic == f"rtnode/v1/{dev}/out" and cbor2.loads(payload) == {
        "type": "notice", "code": "gap", "room": room, "missed_from": 10**9 + 1,
        "missed_to": None, "reason": "epoch"}
    got = await receive(raw, 3)
    assert [m["seq"] for *_, m in got] == seqs and not any(d for _, _q, d, _m in got)
    record = await saved(node, dev, lambda r: r.cursors.get(room) == seqs[-1])
    assert record.epoch == node.store.epoch
    await raw.disconnect()


async def test_events_stored_between_the_resume_and_the_live_join_are_not_skipped(
        make_node: Any) -> None:
    # The resume reads pages from the cursor, then joins the room live from the last event
    # sent. When more than recovery_max events are stored in between, the room cannot
    # replay them to that join: the device must not jump over them (it is cut off as a slow
    # consumer, 4008, and resumes from its cursor on its next connection).
    node = await make_node(recovery_max=4)
    room, dev = unique("gap"), unique("dev")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    await raw.subscribe(f"rooms/{room}")
    await saved(node, dev, lambda r: room in r.cursors)
    await raw.disconnect()
    await saved(node, dev, lambda r: not r.connected)
    first = await store(node, room, 1)
    later: list[int] = []
    real_read = node.store.read

    async def read(tenant: str, r: str, after: int, limit: int, **kw: Any) -> Any:
        events = await real_read(tenant, r, after, limit, **kw)
        if r == room and kw.get("before") is None and not later:
            later.extend(await store(node, room, 10, start=1))  # after the resume's last page
        return events

    node.store.read = read
    seqs: list[int] = []

    async def take(raw: RawMqtt) -> bool:
        """Receive until all 11 came (True) or the node closed the connection (False); a
        connection that stays open with events missing is the defect (TimeoutError)."""
        try:
            while len(seqs) < 11:
                _pid, _qos, _dup, m = (await receive(raw, 1, timeout=5))[0]
                if not seqs or m["seq"] > seqs[-1]:
                    seqs.append(m["seq"])
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        return True

    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present
    if not await take(raw):  # cut off (4008): resumed from the cursor on the next connection
        raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
        assert raw.session_present and await take(raw)
    assert seqs == first + later, "every event, in order"
    await raw.disconnect()


async def test_a_qos1_subscription_is_never_saved_without_its_cursor(make_node: Any) -> None:
    """A session written while a QoS 1 SUBSCRIBE reads its room's latest seq holds either
    the subscription with its cursor, or neither: a record with the subscription and no cursor
    was resumed as a QoS 0 one (live events only, nothing kept) on the next CONNECT, for good.
    The seeded fault test (test_device_faults) found it when a node was killed (-9) then."""
    node = await make_node()
    r1, r2, dev = unique("cmd"), unique("tel"), unique("dev").replace(":", "-")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert await raw.subscribe(f"rooms/{r1}") == [1]
    real_last_seq, held = node.store.last_seq, asyncio.Event()
    reading = asyncio.Event()

    async def last_seq(tenant: str, room: str, **kw: Any) -> int:
        if room == r2:
            reading.set()
            await held.wait()
        return int(await real_last_seq(tenant, room, **kw))

    node.store.last_seq = last_seq
    try:
        suback = asyncio.create_task(raw.subscribe(f"rooms/{r2}"))
        await asyncio.wait_for(reading.wait(), 5)
        session = node.mqtt.sessions[("default", dev)]
        session._persist()  # a write meanwhile, as a PUBACK or a refresh would ask
        await session.wait_saved()
        record = await node.sessions.get("default", dev)
        assert record is not None
        assert (f"rooms/{r2}" in record.subs) == (r2 in record.cursors), record
        held.set()
        assert await asyncio.wait_for(suback, 5) == [1]
    finally:
        held.set()
        node.store.last_seq = real_last_seq
    record = await saved(node, dev, lambda r: r2 in r.cursors)
    assert record.subs == {f"rooms/{r1}": 1, f"rooms/{r2}": 1}
    await raw.drop()  # lost: the next CONNECT resumes the session
    await saved(node, dev, lambda r: not r.connected)
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present
    [seq] = await store(node, r2, 1)
    [(_pid, qos, _dup, event)] = await receive(raw, 1)
    assert (qos, event["seq"]) == (1, seq), "still a QoS 1 subscription"
    await raw.disconnect()


@pytest.mark.parametrize(("qos", "namespace"), [(1, "cmd"), (0, "cmd"), (0, "st")])
async def test_a_suback_comes_once_the_session_holds_the_subscription(
        make_node: Any, qos: int, namespace: str) -> None:
    """The SUBACK of a subscription of a persistent session comes once the session holding it
    is written, at any QoS, to a state room too ("st"). It came first (at QoS 0 until now): a
    node killed before the write left a device that resumes its session (and need not
    subscribe again) without the subscription, silently."""
    node = await make_node(namespaces={"st": {"state": True}})
    room, dev = unique(namespace), unique("dev").replace(":", "-")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    real_write, held, writing = node.sessions.write, asyncio.Event(), asyncio.Event()

    async def write(record: Any, revision: int) -> int:
        if f"rooms/{room}" in record.subs:
            writing.set()
            await held.wait()
        return int(await real_write(record, revision))

    node.sessions.write = write
    try:
        suback = asyncio.create_task(raw.subscribe(f"rooms/{room}", qos))
        await asyncio.wait_for(writing.wait(), 5)
        done, _ = await asyncio.wait({suback}, timeout=0.5)
        assert not done, "SUBACK before the session holding the subscription was written"
        held.set()
        assert await asyncio.wait_for(suback, 5) == [qos]
    finally:
        held.set()
        node.sessions.write = real_write
    record = await node.sessions.get("default", dev)
    assert record is not None and record.subs.get(f"rooms/{room}") == qos, record
    assert (room in record.cursors) == bool(qos), record
    await raw.disconnect()
