"""Compare-and-set session writes racing on a replicated bucket (bridge.mqtt_sessions).

Three session stores, one per server of a real 3-server cluster (three nodes), race claims and
writes of the same devices' sessions in seeded rounds. On a replicated stream JetStream answers
a write that meets another write of the key still in process with 10164 ("wrong last
sequence", no revision) rather than 10071: both are a lost race. A claim that loses one reads
again and wins later; it never reports the store unavailable (a CONNACK 3 to a device whose
session is there: what CI once saw when a device reconnected through another node while its
old connection's last write was in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from bridge.mqtt_sessions import SessionRecord, SessionStore, SessionTaken
from bridge.nats_link import NatsLink, StreamSettings
from bridge.room_store import JetStreamRoomStore
from tests.cluster import NatsCluster
from tests.servers import NatsProcess

pytestmark = pytest.mark.integration

SEED = 20261206
ROUNDS = 12


@pytest_asyncio.fixture
async def stores(cluster: NatsCluster) -> AsyncIterator[list[SessionStore]]:
    opened: list[tuple[NatsLink, JetStreamRoomStore, SessionStore]] = []
    try:
        for i, url in enumerate(cluster.urls):
            link = NatsLink([url], name=f"n{i}", stream=StreamSettings(replicas=3),
                            connect_timeout_s=20)
            await link.connect()
            store = JetStreamRoomStore(link)
            await store.start()
            sessions = SessionStore(store, replicas=3, node=f"n{i}")
            opened.append((link, store, sessions))
            await sessions.start()
        yield [s for _, _, s in opened]
    finally:
        for link, store, sessions in opened:
            with contextlib.suppress(Exception):
                await sessions.stop()
                await store.stop()
            await link.close()


async def _last_write(holder: SessionStore, record: SessionRecord, revision: int,
                      delay: float) -> int | None:
    """The old holder's last write (connected = False); None when a claim came first."""
    await asyncio.sleep(delay)
    record.connected = False
    try:
        return await holder.write(record, revision)
    except SessionTaken:
        return None  # the old holder is taken over


async def _claim(store: SessionStore, device: str, epoch: str, conn: str,
                 delay: float) -> tuple[int, bool]:
    await asyncio.sleep(delay)
    _, revision, present, _ = await store.claim("t", device, epoch=epoch, conn=conn)
    return revision, present


async def test_racing_claims_and_writes_never_report_a_lost_race_as_unavailable(
        stores: list[SessionStore]) -> None:
    rng = random.Random(SEED)
    epoch = stores[0].store.epoch
    for rnd in range(ROUNDS):
        device = f"dev-{rnd % 3}"
        # The device's current holder writes its last cursors (a lost connection) while
        # 1-3 claims of other connections, on any node, race it and each other.
        record, revision, _, _ = await stores[rng.randrange(3)].claim("t", device, epoch=epoch)
        record.cursors = {"r": rnd}
        holder = stores[rng.randrange(3)]
        claimers = [stores[rng.randrange(3)] for _ in range(rng.randint(1, 3))]

        results = await asyncio.wait_for(asyncio.gather(
            _last_write(holder, record, revision, rng.uniform(0, 0.004)),
            *(_claim(s, device, epoch, f"c{rnd}", rng.uniform(0, 0.004)) for s in claimers)),
            60)
        written, claims = results[0], results[1:]
        revisions = [rev for rev, _ in claims] + ([written] if written is not None else [])
        assert all(present for _, present in claims), f"round {rnd}: the session was there"
        assert len(set(revisions)) == len(revisions), f"round {rnd}: one revision, one writer"
        final, last = await stores[0].read("t", device)
        assert final is not None and last == max(revisions), f"round {rnd}: the last write won"
        if written is not None and written == last:
            assert final.cursors == {"r": rnd} and not final.connected
        else:
            assert final.connected, f"round {rnd}: a claim holds it"


async def test_a_write_nobody_takes_yet_waits_for_the_bucket(nats_proc: NatsProcess) -> None:
    """A session write that no server takes (no responders: the bucket's stream is not known
    there yet, as for a moment after it is created on a cluster) is sent again within the
    write deadline, not failed at once (CI saw a claim fail so right after the start)."""
    link = NatsLink([nats_proc.url], name="n0", stream=StreamSettings(), connect_timeout_s=20)
    await link.connect()
    store = JetStreamRoomStore(link)
    await store.start()
    sessions = SessionStore(store, node="n0")
    try:
        write = asyncio.create_task(sessions.write(SessionRecord("t", "early"), 0))
        await asyncio.sleep(0.3)
        assert not write.done(), "still sending"
        await sessions.start()  # the bucket comes
        assert await asyncio.wait_for(write, 10) >= 1
        record, revision = await sessions.read("t", "early")
        assert record is not None and revision >= 1
    finally:
        await sessions.stop()
        await store.stop()
        await link.close()
