"""A device that reconnects at once, through another node or the same one, gets again exactly
what it had not acknowledged: never less (a gap), never more (a PUBLISH it had acknowledged).

Its old connection writes its last cursors as it ends, and the new connection's claim of the
session could land before that write (which then lost the race, and its cursors with it: the
device got acknowledged PUBLISHes again; CI saw it in test_devices_sessions_cluster). A claim
that finds the session held by a connection asks that connection's node to hand it over first:
the connection there is closed if it is still open, its last write is done, and only then is
the session read and claimed. Seeded rounds on real nodes: a bare MQTT client receives a few
QoS 1 PUBLISHes, acknowledges some, drops, and reconnects at once through either node.

Then the claims and handovers that the seeded device fault test (test_device_faults) found
wrong, each made to happen on purpose: a session write that fails or lands late, a claim whose
answer is lost or whose connection goes away, PUBACKs still unread when a handover closes the
connection, a session taken without its holder's last state (behind).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from bridge.mqtt_sessions import SessionRecord
from node.core.ports import StoreError
from tests.cluster import NatsCluster, RawMqtt
from tests.integration.test_mqtt_sessions import dev_token, receive, saved, store, until
from tests.wsclient import unique

pytestmark = pytest.mark.integration

SEED = 20261207
ROUNDS = 30


async def acknowledged(node: Any, room: str, dev: str) -> tuple[RawMqtt, list[int]]:
    """Device ``dev`` on ``node``, subscribed at QoS 1 to ``room``, has received and
    acknowledged its first 3 events (their seqs), and its session holds that cursor."""
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert await raw.subscribe(f"rooms/{room}") == [1]
    first = await store(node, room, 3)
    assert [m["seq"] for *_, m in await receive(raw, 3)] == first
    await saved(node, dev, lambda r: r.cursors.get(room) == first[-1])
    return raw, first


async def nothing_again(node: Any, room: str, dev: str, start: int) -> None:
    """``dev`` connects again, through ``node``: its session is there, and the first PUBLISH
    is the next event stored, without DUP (nothing it acknowledged comes again)."""
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present and raw.return_code == 0
    [live] = await store(node, room, 1, start=start)
    [(_pid, _qos, dup, event)] = await receive(raw, 1)
    assert (event["seq"], dup) == (live, False), "acknowledged events came again"
    await raw.disconnect()


async def held_by_a_gone_node(node: Any, room: str, dev: str,
                              holder: str = "a-node-gone") -> list[int]:
    """6 events stored in ``room`` (their seqs), and ``dev``'s session, subscribed at QoS 1,
    written as held by a connection of ``holder`` (by default a node that is gone) that
    wrote nothing since: its cursor and sent mark at the second event."""
    seqs = await store(node, room, 6)
    await node.sessions.write(SessionRecord(
        "default", dev, subs={f"rooms/{room}": 1}, cursors={room: seqs[1]},
        sent={room: seqs[1]}, epoch=node.store.epoch, node=holder, connected=True), 0)
    return seqs


async def test_a_reconnect_at_once_resumes_after_the_last_acknowledged(make_node: Any) -> None:
    await _rounds([await make_node(), await make_node()], random.Random(SEED), ROUNDS)


async def test_the_same_on_a_replicated_bucket(cluster: NatsCluster, make_node: Any) -> None:
    """Three nodes, one per server of a 3-server cluster, R3 stream and bucket: a write that
    meets another of the key still in process is refused with 10164 there, and the bucket's
    replicas answer reads. (The cluster is set up first, so that it stops after the nodes.)"""
    nodes = [await make_node(nats_url=url, stream_replicas=3, nats_connect_timeout_s=20)
             for url in cluster.urls]
    await _rounds(nodes, random.Random(SEED + 1), ROUNDS // 2)


async def _rounds(nodes: list[Any], rng: random.Random, rounds: int) -> None:
    """``rounds`` of: events stored, the device acknowledges the first k of what it is owed,
    drops, and reconnects at once through a node drawn from ``nodes``."""
    n = len(nodes)
    room, dev = unique("cmd"), unique("dev")
    at = rng.randrange(n)
    raw = await RawMqtt.connect(nodes[at].mqtt.port, dev, dev_token(dev))
    assert await raw.subscribe(f"rooms/{room}") == [1]
    await saved(nodes[at], dev, lambda r: r.connected and r.subs)
    acked = 0  # the seqs the device acknowledged, in order, end here
    seqs: list[int] = []
    for rnd in range(rounds):
        seqs += await store(nodes[rng.randrange(n)], room, 6, start=len(seqs))
        owed = [s for s in seqs if s > acked]
        got = await receive(raw, len(owed), ack=False)
        assert [m["seq"] for *_, m in got] == owed, f"round {rnd}: from {acked + 1} on"
        k = rng.randrange(len(owed) + 1)  # acknowledged now: the first k
        for pid, *_ in got[:k]:
            raw.puback(pid)
        if k:
            acked = owed[k - 1]
        await raw.drop()
        at = rng.randrange(n)
        raw = await RawMqtt.connect(nodes[at].mqtt.port, dev, dev_token(dev))
        assert (raw.session_present, raw.return_code) == (True, 0), f"round {rnd}"
    owed = [s for s in seqs if s > acked]
    got = await receive(raw, len(owed))
    assert [m["seq"] for *_, m in got] == owed


async def test_acknowledged_events_are_not_sent_again_when_the_last_write_failed(
        make_node: Any) -> None:
    """The device's node cannot write its session (JetStream electing a leader, as after a
    kill -9 of a nats-server): the device acknowledges, leaves, and comes back through another
    node, whose claim asks the first node to hand the session over. That write has not landed
    (it waited 2 s, then took the record as it was): the cursors of the first node's last
    state come with the handover, so nothing acknowledged is sent again. The seeded fault
    test (test_device_faults, seed 7) saw an acknowledged event come again with DUP."""
    n1, n2 = await make_node(), await make_node()
    room, dev = unique("cmd"), unique("dev").replace(":", "-")
    raw, first = await acknowledged(n1, room, dev)

    async def unavailable(*args: Any) -> int:
        raise StoreError("session write failed: TimeoutError")

    n1.sessions._write = unavailable  # the store stops taking n1's session writes
    more = await store(n1, room, 3, start=3)
    assert [m["seq"] for *_, m in await receive(raw, 3)] == more  # acknowledged
    await raw.disconnect()
    record = await n2.sessions.get("default", dev)
    assert record is not None and record.cursors[room] == first[-1], "not written"

    await nothing_again(n2, room, dev, start=6)


@pytest.mark.parametrize("lands", ["later", "before the claim's write"])
async def test_a_handover_during_a_slow_write_hands_over_the_acknowledgements_since(
        make_node: Any, lands: str) -> None:
    """The device's node is writing its session, slowly (JetStream electing a leader), when
    the device acknowledges more events, leaves with a DISCONNECT and comes back through
    another node. The claim there asks for a handover, which waits a while for that write and
    then answers with what was not stored: that was the state of the write in flight, asked
    for before those PUBACKs, so the device got the events it had acknowledged again
    (test_device_faults, seed 9930204). The answer is now the state the writer would write
    next: the last PUBACKs and the close's. "before the claim's write": the slow write lands
    between the claim's read and its write, which conflicts; the claim reads again and keeps
    the state handed over (it took the record for one without its last state, and sent every
    stored event again with DUP)."""
    n1, n2 = await make_node(), await make_node()
    room, dev = unique("cmd"), unique("dev").replace(":", "-")
    raw, _ = await acknowledged(n1, room, dev)

    real_write, real_claim_write = n1.sessions._write, n2.sessions.write
    started, release, landed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    the_end = asyncio.Event()

    async def in_flight(record: Any, state: Any, revision: int) -> int:
        if started.is_set():
            await the_end.wait()  # the writes after it: not before the test ends
            return int(await real_write(record, state, revision))
        started.set()
        await release.wait()  # longer than any handover waits
        try:
            return int(await real_write(record, state, revision))
        finally:
            landed.set()

    async def claim_write(record: Any, revision: int) -> int:
        if lands != "later" and not release.is_set():
            release.set()  # the holder's slow write lands first
            await landed.wait()
        return int(await real_claim_write(record, revision))

    n1.sessions._write = in_flight
    n2.sessions.write = claim_write  # type: ignore[method-assign]
    try:
        more = await store(n1, room, 3, start=3)
        got = await receive(raw, 3, ack=False)
        assert [m["seq"] for *_, m in got] == more
        await started.wait()  # the write of their sent marks, before any PUBACK
        for pid, *_ in got:
            raw.puback(pid)
        await raw.disconnect()

        raw = await RawMqtt.connect(n2.mqtt.port, dev, dev_token(dev))
        assert raw.session_present and raw.return_code == 0
        [live] = await store(n2, room, 1, start=6)
        [(_pid, _qos, dup, event)] = await receive(raw, 1)
        assert (event["seq"], dup) == (live, False), "acknowledged events came again"
    finally:
        release.set()
        the_end.set()
        n1.sessions._write = real_write
        n2.sessions.write = real_claim_write  # type: ignore[method-assign]
    await raw.disconnect()
    record = await saved(n2, dev, lambda r: not r.connected)
    assert record.cursors[room] == live


async def test_a_claim_whose_connection_went_away_takes_nothing_from_a_newer_one(
        make_node: Any) -> None:
    """A CONNECT's claim is slow (a loaded node, a leader election), and the device gives up
    on its CONNACK, closes, and connects to another node, which claims the session. The first
    claim went on (the connection's reading was paused until its CONNACK: the close went
    unseen): its handover closed the device's live connection and its write took the session,
    for a connection that was gone. A connection now reads while its claim runs: the close
    is seen, and the claim is cancelled."""
    n1, n2 = await make_node(), await make_node()
    room, dev = unique("cmd"), unique("dev").replace(":", "-")
    raw = await RawMqtt.connect(n1.mqtt.port, dev, dev_token(dev))
    assert await raw.subscribe(f"rooms/{room}") == [1]
    await raw.disconnect()
    await saved(n1, dev, lambda r: not r.connected)

    real_read, real_claim = n2.sessions.read, n2.sessions.claim
    asked, answer, claimed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_read(*args: Any) -> Any:
        if not asked.is_set():
            asked.set()
            await answer.wait()
        return await real_read(*args)

    async def claim(*args: Any, **kwargs: Any) -> Any:
        try:
            return await real_claim(*args, **kwargs)
        finally:
            claimed.set()

    n2.sessions.read = slow_read  # type: ignore[method-assign]
    n2.sessions.claim = claim  # type: ignore[method-assign]
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", n2.mqtt.port)
        body = (RawMqtt._str("MQTT") + bytes([4, 0x80 | 0x40]) + (60).to_bytes(2, "big")
                + RawMqtt._str(dev) + RawMqtt._str(dev) + RawMqtt._str(dev_token(dev)))
        writer.write(RawMqtt._packet(0x10, body))
        await asked.wait()  # n2's claim is on its way
        writer.transport.abort()  # the device gives up on it ...
        raw = await RawMqtt.connect(n1.mqtt.port, dev, dev_token(dev))  # ... and goes to n1
        assert raw.session_present and raw.return_code == 0
        answer.set()
        await claimed.wait()
    finally:
        answer.set()
        n2.sessions.read = real_read  # type: ignore[method-assign]
        n2.sessions.claim = real_claim  # type: ignore[method-assign]
    record = await n1.sessions.get("default", dev)
    assert record is not None and (record.node, record.connected) == (n1.sessions.node, True)
    seqs = await store(n1, room, 3)
    assert [m["seq"] for *_, m in await receive(raw, 3)] == seqs  # still connected
    await raw.disconnect()
    record = await saved(n1, dev, lambda r: not r.connected)
    assert record.cursors[room] == seqs[-1]


async def test_a_handover_counts_the_acknowledgements_its_holder_had_not_read(
        make_node: Any) -> None:
    """The device acknowledges its last events and leaves with a DISCONNECT, but its node has
    not read them yet (reading paused: its actor's mailbox was full, or a loaded node), when
    the device's next CONNECT, on another node, asks for a handover. The handover closed the
    connection at once, and what it read after that was discarded: the PUBACKs too, and the
    device got the events it had acknowledged again. Those read after the close still move
    the cursors, and the handover waits for their write."""
    n1, n2 = await make_node(), await make_node()
    room, dev = unique("cmd"), unique("dev").replace(":", "-")
    raw = await RawMqtt.connect(n1.mqtt.port, dev, dev_token(dev))
    assert await raw.subscribe(f"rooms/{room}") == [1]
    seqs = await store(n1, room, 3)
    got = await receive(raw, 3, ack=False)
    assert [m["seq"] for *_, m in got] == seqs
    held = n1.mqtt.sessions[("default", dev)]
    held._stalled = True  # n1 reads nothing from the device for now, as under backpressure
    held.transport.pause_reading()
    for pid, *_ in got:
        raw.puback(pid)
    raw.writer.write(b"\xe0\x00")  # DISCONNECT
    await raw.writer.drain()
    try:
        await nothing_again(n2, room, dev, start=3)
    finally:
        raw.writer.close()


async def test_a_handover_closes_a_holder_that_wrote_since_the_claim_read(
        make_node: Any) -> None:
    """The device connects again (another node) while its connection is still open; the claim
    reads the record, and the open connection writes its session once more (its sent mark
    moved) before the handover reaches it. The handover took that write for a newer claim
    and left the connection open, so that the claim found it still held, with no last state:
    behind, it sent every stored event with DUP, those never sent before too (and the
    connection, closed by the takeover notice, wrote no last state)."""
    n1, n2 = await make_node(mqtt_inflight=1), await make_node()
    room, dev = unique("cmd"), unique("dev").replace(":", "-")
    raw = await RawMqtt.connect(n1.mqtt.port, dev, dev_token(dev))
    assert await raw.subscribe(f"rooms/{room}") == [1]
    [first] = await store(n1, room, 1)
    assert [m["seq"] for *_, m in await receive(raw, 1)] == [first]
    await saved(n1, dev, lambda r: r.cursors.get(room) == first)

    real_ask, asked, answer = n2.sessions._ask_handover, asyncio.Event(), asyncio.Event()

    async def late_handover(*args: Any) -> Any:
        asked.set()
        await answer.wait()  # the claim has read the record
        return await real_ask(*args)

    n2.sessions._ask_handover = late_handover
    try:
        second = asyncio.create_task(RawMqtt.connect(n2.mqtt.port, dev, dev_token(dev)))
        await asked.wait()
        more = await store(n1, room, 2, start=1)  # one sent (a window of 1), one waits
        assert [m["seq"] for *_, m in await receive(raw, 1, ack=False)] == more[:1]
        await saved(n1, dev, lambda r: r.sent.get(room) == more[0])
        answer.set()
        again = await second
    finally:
        answer.set()
        n2.sessions._ask_handover = real_ask
    assert again.session_present and again.return_code == 0
    got = await receive(again, 2)
    assert [(m["seq"], d) for _, _q, d, m in got] == [(more[0], True), (more[1], False)]
    await again.disconnect()
    raw.writer.close()


@pytest.mark.parametrize("holder", ["gone", "this node"])
async def test_a_session_taken_without_its_last_state_sends_again_with_dup(
        make_node: Any, holder: str) -> None:
    """The session's record says a connection holds it, and nothing newer comes from that
    connection: its node is gone ("gone": nobody answers the handover) or was restarted since
    ("this node": a kill -9 and a restart, and the device comes back to it; the process that
    answers never held it). The record's cursor and sent mark may be behind what the device
    got and acknowledged (they are written behind the PUBACKs), so every event stored until the
    resume goes with DUP ("might be re-delivery"), and later ones without. They went without
    DUP: a device saw acknowledged events again with nothing to tell it so."""
    node = await make_node()
    room, dev = unique("cmd"), unique("dev")
    seqs = await held_by_a_gone_node(
        node, room, dev, "a-node-gone" if holder == "gone" else node.sessions.node)
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present
    again = await receive(raw, 4)
    assert [(m["seq"], d) for _, _q, d, m in again] == [(s, True) for s in seqs[2:]]
    record = await saved(node, dev, lambda r: r.cursors.get(room) == seqs[-1])
    assert record.sent[room] >= seqs[-1]  # kept: still DUP on a resume before they are acked
    [live] = await store(node, room, 1, start=6)
    [(_pid, _qos, dup, event)] = await receive(raw, 1)
    assert (event["seq"], dup) == (live, False)
    await raw.disconnect()


@pytest.mark.parametrize("how", ["answer lost", "connection gone"])
async def test_a_claim_behind_that_landed_unanswered_still_sends_again_with_dup(
        make_node: Any, how: str) -> None:
    """A claim of a session held by a node that is gone (its positions may be behind what the
    device got) lands, but does not return: its answer is lost (a leader election: the device
    gets CONNACK 3), or the device gives up waiting and closes (the claim is cancelled). The
    device comes back. The next claim found the first one's state kept for a handover, took
    its positions (those of the gone node's record) for the holder's last ones, and sent the
    events after its sent mark without DUP, though the gone node may have sent them."""
    node = await make_node()
    room, dev = unique("cmd"), unique("dev")
    seqs = await held_by_a_gone_node(node, room, dev)
    real_write, landed = node.sessions._write, asyncio.Event()

    async def no_answer(record: Any, state: Any, revision: int) -> int:
        landed_at = int(await real_write(record, state, revision))
        if not landed.is_set():
            landed.set()
            if how == "answer lost":
                raise StoreError("session write failed: TimeoutError")
            await asyncio.Event().wait()  # until cancelled
        return landed_at

    node.sessions._write = no_answer
    try:
        if how == "answer lost":
            raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
            assert raw.return_code == 3
            await raw.drop()
        else:
            _reader, writer = await asyncio.open_connection("127.0.0.1", node.mqtt.port)
            body = (RawMqtt._str("MQTT") + bytes([4, 0x80 | 0x40]) + (60).to_bytes(2, "big")
                    + RawMqtt._str(dev) + RawMqtt._str(dev) + RawMqtt._str(dev_token(dev)))
            writer.write(RawMqtt._packet(0x10, body))
            await landed.wait()
            writer.transport.abort()  # the device gives up on its CONNACK
    finally:
        node.sessions._write = real_write
    record = await node.sessions.get("default", dev)
    assert record is not None and record.node == node.sessions.node  # the claim had landed
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present and raw.return_code == 0
    again = await receive(raw, 4)
    assert [(m["seq"], d) for _, _q, d, m in again] == [(s, True) for s in seqs[2:]]
    await raw.disconnect()


async def test_a_connection_that_ends_behind_leaves_its_session_behind(make_node: Any) -> None:
    """A session taken without its holder's last state (its node gone) is behind: its resume
    reads how far the room went, and sends every event stored until then with DUP. The device
    leaves before that read is done (the stream electing a leader): the connection's last
    write said nothing of it, and the next claim, finding the session not held, resumed from
    the stale sent mark: the events past it came without DUP, though the gone node may have
    sent them. The record now says it is behind, until the resume knows how far."""
    node = await make_node()
    room, dev = unique("cmd"), unique("dev")
    seqs = await held_by_a_gone_node(node, room, dev)
    real_last_seq, asked, answer = node.store.last_seq, asyncio.Event(), asyncio.Event()

    async def slow_last_seq(tenant: str, name: str, **kwargs: Any) -> int:
        if name == room and not answer.is_set():
            asked.set()
            await answer.wait()  # the stream electing a leader
        return int(await real_last_seq(tenant, name, **kwargs))

    node.store.last_seq = slow_last_seq
    try:
        raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
        assert raw.session_present and raw.return_code == 0
        await asked.wait()  # the resume reads how far the room went ...
        await raw.disconnect()  # ... and the device leaves first
        record = await saved(node, dev, lambda r: not r.connected)
        assert record.behind and record.sent[room] == seqs[1]
    finally:
        answer.set()
        node.store.last_seq = real_last_seq
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert raw.session_present and raw.return_code == 0
    again = await receive(raw, 4)
    assert [(m["seq"], d) for _, _q, d, m in again] == [(s, True) for s in seqs[2:]]
    record = await saved(node, dev, lambda r: r.cursors.get(room) == seqs[-1])
    assert not record.behind  # it knows how far now
    await raw.disconnect()


async def test_a_session_write_whose_answer_was_lost_is_not_a_takeover(make_node: Any) -> None:
    """A session write lands, but its answer is lost (a timeout during a JetStream leader
    election). The next write names the revision before it and conflicts with it: that was
    taken for a takeover, which closed the device's connection and dropped every later
    position, its final cursor too, so that acknowledged events came again (seen in
    test_device_faults, seed 390329080: a clean DISCONNECT, then the events again). The
    connection now finds its own write there and goes on from its revision."""
    node = await make_node()
    room, dev = unique("cmd"), unique("dev").replace(":", "-")
    raw = await RawMqtt.connect(node.mqtt.port, dev, dev_token(dev))
    assert await raw.subscribe(f"rooms/{room}") == [1]
    real_write, lost = node.sessions._write, 1

    async def answer_lost(record: Any, state: Any, revision: int) -> int:
        nonlocal lost
        landed = int(await real_write(record, state, revision))
        if lost and record.cursors.get(room):
            lost -= 1
            raise StoreError("session write failed: TimeoutError")
        return landed

    node.sessions._write = answer_lost
    try:
        seqs = await store(node, room, 5)
        assert [m["seq"] for *_, m in await receive(raw, 5)] == seqs  # each acknowledged

        async def answer_was_lost() -> bool:
            return lost == 0

        await until(answer_was_lost)
        await saved(node, dev, lambda r: r.cursors.get(room) == seqs[-1])
        [live] = await store(node, room, 1, start=5)
        [(_pid, _qos, _dup, event)] = await receive(raw, 1)  # still connected
        assert event["seq"] == live
    finally:
        node.sessions._write = real_write
    await raw.disconnect()
    record = await saved(node, dev, lambda r: not r.connected)
    assert record.cursors[room] == live
