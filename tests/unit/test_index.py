"""The connection index (node/core/index.py): tenants, unique connection ids, compare-and-delete,
limits. No sockets."""

from __future__ import annotations

import asyncio
import random

import pytest

from node.core.index import ConnectionIndex, IndexedConnection
from node.protocol.errors import ProtocolError
from node.protocol.tokens import Principal

LIMITS = {"per_user": 64, "total": 10000}


def dev(sub: str, tenant: str = "t1") -> Principal:
    return Principal(sub=sub, tenant=tenant, kind="device")


def test_same_client_id_in_two_tenants_stays_apart() -> None:
    index = ConnectionIndex()
    a = index.add(dev("thermo-1", "ta"), "thermo-1", "ref-a", **LIMITS)
    b = index.add(dev("thermo-1", "tb"), "thermo-1", "ref-b", **LIMITS)
    assert a.conn_id != b.conn_id
    assert index.select("ta", client_id="thermo-1") == [a]
    assert index.select("tb", user="thermo-1") == [b]
    assert index.select("tc", client_id="thermo-1") == []
    assert index.select("ta", user="other", client_id="thermo-1") == [], "not that user's"
    assert index.select("ta") == [], "no target: nothing"


def test_removal_never_removes_a_successor() -> None:
    index = ConnectionIndex()
    old = index.add(dev("d1"), "d1", "old", **LIMITS)
    new = index.add(dev("d1"), "d1", "new", **LIMITS)  # a takeover: same id, both for a while
    assert index.user_count("t1", "d1") == 2 and len(index) == 2
    assert index.remove(old) and not index.remove(old), "compare-and-delete, once"
    assert index.select("t1", client_id="d1") == [new] and index.refs() == ["new"]
    assert index.user_count("t1", "d1") == 1


def test_limits() -> None:
    index = ConnectionIndex()
    index.add(dev("a"), "a1", "r1", per_user=2, total=3)
    index.add(dev("a"), "a2", "r2", per_user=2, total=3)
    with pytest.raises(ProtocolError) as info:
        index.add(dev("a"), "a3", "r3", per_user=2, total=3)
    assert info.value.code == 4029 and not info.value.retry
    index.add(dev("b"), "b1", "r4", per_user=2, total=3)
    with pytest.raises(ProtocolError) as info:
        index.add(dev("c"), "c1", "r5", per_user=2, total=3)
    assert info.value.code == 4503 and info.value.retry
    assert len(index) == 3, "a refusal indexes nothing"
    assert index.refusals == {4029: 1, 4503: 1}


def test_random_adds_and_removes_keep_the_tables_consistent() -> None:
    rng = random.Random(1104)
    index = ConnectionIndex()
    live = []
    for step in range(3000):
        if live and rng.random() < 0.45:
            entry = live.pop(rng.randrange(len(live)))
            assert index.remove(entry)
        else:
            sub = rng.choice(["a", "b", "c"])
            p = dev(sub, rng.choice(["t1", "t2"]))
            live.append(index.add(p, rng.choice(["x", "y", sub]), step, **LIMITS))
        assert len(index) == len(live)
    for tenant in ("t1", "t2"):
        for cid in ("x", "y", "a", "b", "c"):
            want = sorted((e for e in live if (e.tenant, e.client_id) == (tenant, cid)),
                          key=lambda e: e.conn_id)
            assert index.select(tenant, client_id=cid) == want


async def test_wait_empty() -> None:
    index = ConnectionIndex()
    await asyncio.wait_for(index.wait_empty(), 1)
    entry = index.add(dev("a"), "a", "r", **LIMITS)
    waiter = asyncio.ensure_future(index.wait_empty())
    await asyncio.sleep(0)
    assert not waiter.done()
    index.remove(entry)
    await asyncio.wait_for(waiter, 1)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_adds_and_removes_agree_with_a_plain_model(seed: int) -> None:
    """Keys with one connection and keys with several (a connection kept as itself or in a
    dict): every selection, count and removal agrees with a list of what is open."""
    rng = random.Random(seed)
    index = ConnectionIndex()
    open_: list[IndexedConnection] = []
    for _ in range(600):
        if open_ and rng.random() < 0.45:
            entry = open_.pop(rng.randrange(len(open_)))
            assert index.remove(entry) and not index.remove(entry)
        else:
            sub, cid = f"u{rng.randrange(4)}", f"c{rng.randrange(5)}"
            open_.append(index.add(dev(sub, rng.choice(["ta", "tb"])), cid, object(), **LIMITS))
        for tenant in ("ta", "tb"):
            for sub in ("u0", "u1", "u2", "u3"):
                mine = [e for e in open_ if (e.tenant, e.sub) == (tenant, sub)]
                assert index.select(tenant, user=sub) == mine  # oldest first
                assert index.user_count(tenant, sub) == len(mine)
            for cid in ("c0", "c1", "c2", "c3", "c4"):
                assert index.select(tenant, client_id=cid) == [
                    e for e in open_ if (e.tenant, e.client_id) == (tenant, cid)]
    assert len(index) == len(open_)


def test_compact_keeps_every_connection_findable() -> None:
    index = ConnectionIndex()
    entries = [index.add(dev(f"u{i % 7}"), f"c{i % 11}", i, **LIMITS) for i in range(300)]
    for entry in entries[:290]:
        index.remove(entry)
    before = {(e.sub, e.client_id): index.select("t1", user=e.sub) for e in entries[290:]}
    index.compact()
    assert len(index) == 10 and sorted(index.refs()) == list(range(290, 300))
    for (sub, cid), found in before.items():
        assert index.select("t1", user=sub) == found
        assert all(e.client_id == cid for e in index.select("t1", client_id=cid))
    assert all(index.remove(e) for e in entries[290:]) and len(index) == 0
