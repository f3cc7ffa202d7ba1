"""A device that reconnects at once, through another node or the same one, gets again exactly
what it had not acknowledged: never less (a gap), never more (a PUBLISH it had acknowledged).

Its old connection writes its last cursors as it ends, and the new connection's claim of the
session could land before that write (which then lost the race, and its cursors with it: the
device got acknowledged PUBLISHes again; CI saw it in test_devices_sessions_cluster). A claim
that finds the session held by a connection asks that connection's node to hand it over first:
the connection there is closed if it is still open, its last write is done, and only then is
the session read and claimed. Seeded rounds on real nodes: a bare MQTT client receives a few
QoS 1 PUBLISHes, acknowledges some, drops, and reconnects at once through either node.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.cluster import NatsCluster, RawMqtt
from tests.integration.test_mqtt_sessions import dev_token, receive, saved, store
from tests.wsclient import unique

pytestmark = pytest.mark.integration

SEED = 20261207
ROUNDS = 30


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
