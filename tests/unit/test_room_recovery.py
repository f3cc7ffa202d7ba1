"""The batching of recoveries (node.core.room_recovery): what one read serves, pure values."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actors import ActorSystem
from node.core.ports import StoredEvent, StoreError
from node.core.room import Join, RoomActor, RoomCounters, RoomSettings
from node.core.room_recovery import RecoveryBatch
from tests.unit.test_room import FakeStore, member


def _run(batch: RecoveryBatch, stored: list[int]) -> list[int]:
    """Answer the batch's reads from ``stored`` (seqs of the room); returns the reads' afters."""
    afters = []
    for since in batch.has_to_ask:
        batch.take_has(since, since in stored)
    if batch.count_needed:
        batch.take_count(len(stored))
    while (after := batch.next_read()) is not None:
        afters.append(after)
        page = [StoredEvent(s, b"") for s in stored if after < s <= batch.target][:batch.page]
        batch.take_page(page)
    return afters


def _slice(batch: RecoveryBatch, since: int) -> tuple[bool, list[int]]:
    ok, start = batch.outcome(since)
    return ok, [ev.seq for ev in batch.events[start:]] if ok else []


def test_one_read_serves_every_since_with_its_own_slice() -> None:
    stored = [2, 5, 7, 8, 12, 15]  # other rooms' events in between
    batch = RecoveryBatch([7, 5, 12, 7, 15], 15, recovery_max=100, history_size=0)
    assert batch.has_to_ask == [] and not batch.count_needed
    assert _run(batch, stored) == [4]  # one read, from the lowest since itself
    assert _slice(batch, 5) == (True, [7, 8, 12, 15])
    assert _slice(batch, 7) == (True, [8, 12, 15])
    assert _slice(batch, 12) == (True, [15])
    assert _slice(batch, 15) == (True, [])  # at target: nothing missed


def test_a_since_no_longer_stored_is_not_recovered() -> None:
    stored = [5, 7, 8]  # 6 is another room's, 3 was trimmed
    batch = RecoveryBatch([3, 6, 7], 8, recovery_max=100, history_size=0)
    _run(batch, stored)
    assert batch.outcome(3)[0] is False
    assert batch.outcome(6)[0] is False
    assert _slice(batch, 7) == (True, [8])


def test_beyond_target_asks_has_and_zero_asks_count() -> None:
    stored = [1, 2, 3]
    batch = RecoveryBatch([0, 9, 3], 3, recovery_max=100, history_size=10)
    assert batch.has_to_ask == [9] and batch.count_needed
    _run(batch, stored)
    assert _slice(batch, 0) == (True, [1, 2, 3])
    assert batch.outcome(9)[0] is False
    assert _slice(batch, 3) == (True, [])
    full = RecoveryBatch([0], 3, recovery_max=100, history_size=3)  # may have been trimmed
    _run(full, stored)
    assert full.outcome(0)[0] is False
    empty = RecoveryBatch([0], 0, recovery_max=100, history_size=3)
    assert _run(empty, []) == [] and empty.outcome(0) == (True, 0)


def test_recovery_max_bounds_the_window_and_each_member() -> None:
    stored = list(range(1, 101))
    batch = RecoveryBatch([10, 94, 95], 100, recovery_max=5, history_size=0, page=4)
    _run(batch, stored)
    assert len(batch.events) <= 5 + 1 + 4  # never more than one window and a page
    assert batch.outcome(10)[0] is False  # missed 90
    assert batch.outcome(94)[0] is False  # missed 6
    assert _slice(batch, 95) == (True, [96, 97, 98, 99, 100])


def test_the_read_skips_what_no_remaining_member_can_use() -> None:
    stored = list(range(1, 10_001))
    batch = RecoveryBatch([1, 9_990], 10_000, recovery_max=20, history_size=0, page=10)
    afters = _run(batch, stored)
    # From 1, one window and a page, then straight to 9,990: not 1,000 pages.
    assert len(afters) <= 6, afters
    assert 9_989 in afters
    assert batch.outcome(1)[0] is False
    assert _slice(batch, 9_990) == (True, list(range(9_991, 10_001)))


# -- the room actor: joins that arrive together share a batch ---------------------------------


class _Store(FakeStore):
    """The tests' in-memory store, whose reads say when they start."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()

    async def read(self, tenant: str, room: str, after: int, limit: int, *,
                   before: int | None = None) -> list[StoredEvent]:
        self.reading.set()
        return await super().read(tenant, room, after, limit, before=before)

    def publish_soon(self, tenant: str, room: str, body: bytes, msg_id: str,
                     ttl_s: float | None = None) -> None:
        return None  # never gathers: publish is awaited

    async def publish(self, tenant: str, room: str, body: bytes, msg_id: str,
                      ttl_s: float | None = None) -> tuple[int, bool]:
        raise NotImplementedError

    async def history(self, tenant: str, room: str, *, since: int | None, limit: int,
                      reverse: bool) -> list[StoredEvent]:
        raise NotImplementedError


@pytest.fixture
async def counted_room() -> Any:
    store = _Store()
    counters = RoomCounters()
    async with ActorSystem() as system:
        ref = system.spawn(lambda: RoomActor("t", "r", store, store, RoomSettings(), counters))
        yield store, ref, counters


async def test_recovering_joins_share_one_read_each_its_own_slice(counted_room: Any) -> None:
    store, ref, counters = counted_room
    old = store.add(10)
    store.gate = asyncio.Event()  # the batch's read waits: later joins queue for the next one
    members = [member() for _ in range(40)]
    for i, (m, _) in enumerate(members):
        ref.tell(Join(m, since_seq=old[i % 10], since_epoch="e1"))
    await asyncio.wait_for(store.reading.wait(), 5)  # the first batch is reading
    late = [member() for _ in range(20)]
    for i, (m, _) in enumerate(late):
        ref.tell(Join(m, since_seq=old[i % 5], since_epoch="e1"))
    store.gate.set()
    for i, (_, rec) in enumerate(members):
        assert await rec.until(9 - i % 10) == old[i % 10 + 1:]
        assert (await rec.joined())["recovered"] is True
    for i, (_, rec) in enumerate(late):
        assert await rec.until(9 - i % 5) == old[i % 5 + 1:]
    # 60 recoveries: two batches, each one latest seq and one read (not 3 requests each).
    assert counters.recovery_batches == 2
    assert store.reads == 2 and counters.recovery_reads == 4


async def test_a_failed_batch_answers_each_join_and_the_next_batch_runs(
        counted_room: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store, ref, _ = counted_room
    old = store.add(3)

    async def broken(*args: Any, **kwargs: Any) -> list[StoredEvent]:
        raise StoreError("read timed out")

    monkeypatch.setattr(store, "read", broken)
    failing = [member() for _ in range(3)]
    for m, _ in failing:
        ref.tell(Join(m, since_seq=old[0], since_epoch="e1", request_id=1))
    for _, rec in failing:
        while not rec.frames:
            rec.arrived.clear()
            await asyncio.wait_for(rec.arrived.wait(), 5)
        assert rec.frames[0]["type"] == "error" and rec.frames[0]["code"] == 4500
    monkeypatch.undo()
    m, rec = member()
    ref.tell(Join(m, since_seq=old[0], since_epoch="e1"))
    assert await rec.until(2) == old[1:]
