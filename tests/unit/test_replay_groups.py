"""Which process of a replay group serves which partition (bridge/replay_groups.py): every
partition has one owner among the members, the shares are balanced, the answer depends on the
set of ids alone, and a change of membership moves few partitions. Seeded:
``RTNODE_TEST_GROUPS_SEED`` repeats a run."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from typing import Any

import pytest

from bridge.replay import ReplayConsumer
from bridge.replay_groups import SCHEME, assign_partitions, sorted_modulo

SEED = int(os.environ.get("RTNODE_TEST_GROUPS_SEED") or random.randrange(2**32))


def _ids(rng: random.Random, n: int) -> list[str]:
    # like ReplayConsumer.worker_id: host-pid-hex
    return [f"host{rng.randrange(4)}-{rng.randrange(1, 99999)}-{rng.randrange(16**6):06x}"
            for _ in range(n)]


def _moved(before: list[str], after: list[str], gone: set[str]) -> int:
    """Partitions whose owner changed, but for those of members that left (they must move)."""
    return sum(1 for a, b in zip(before, after, strict=True) if a != b and a not in gone)


def test_every_partition_has_one_member_and_the_shares_are_balanced() -> None:
    rng = random.Random(SEED)
    for _ in range(300):
        partitions, members = rng.randint(1, 64), _ids(rng, rng.randint(1, 12))
        owners = assign_partitions(members, partitions)
        assert len(owners) == partitions and set(owners) <= set(members), f"seed {SEED}"
        shares = Counter(owners)
        low, high = divmod(partitions, len(members))
        assert all(shares[m] in (low, low + (1 if high else 0)) for m in members), \
            f"seed {SEED}: {partitions} partitions over {len(members)}: {shares}"


def test_the_answer_depends_on_the_set_of_ids_alone() -> None:
    rng = random.Random(SEED)
    for _ in range(100):
        partitions, members = rng.randint(1, 64), _ids(rng, rng.randint(1, 8))
        shuffled = members + rng.sample(members, k=len(members) // 2)
        rng.shuffle(shuffled)
        assert assign_partitions(shuffled, partitions) == assign_partitions(members, partitions)
        assert sorted_modulo(shuffled, partitions) == sorted_modulo(members, partitions)


def test_no_member_or_no_partition_is_refused() -> None:
    for assign in (assign_partitions, sorted_modulo):
        with pytest.raises(ValueError):
            assign([], 3)
        with pytest.raises(ValueError):
            assign(["a"], 0)


def test_a_change_of_membership_moves_few_partitions() -> None:
    """Seeded groups of 1-8 members and 2-32 partitions: a newcomer, a member's leave, and a
    crash replaced by a newcomer while the dead member is still heard (two changes: the
    newcomer, then the dead one's end). Each move is a handover (a reset to the ack floor, and
    events acked above it come again): the rendezvous rule must move at most half of what
    ``i % W`` moved, and a newcomer must move little more than the partitions it takes."""
    rng = random.Random(SEED)
    moves: dict[str, Counter[str]] = {"rendezvous": Counter(), "i % W": Counter()}
    for _ in range(400):
        partitions, n = rng.choice([2, 3, 4, 6, 8, 16, 32]), rng.randint(1, 8)
        ids = _ids(rng, n + 1)
        group, newcomer = ids[:n], ids[n]
        for name, assign in (("rendezvous", assign_partitions), ("i % W", sorted_modulo)):
            before = assign(group, partitions)
            joined = assign([*group, newcomer], partitions)
            moves[name]["join"] += _moved(before, joined, set())
            moves[name]["taken by newcomers"] += joined.count(newcomer)
            if n > 1:
                dead = group[0]
                moves[name]["leave"] += _moved(before, assign(group[1:], partitions), {dead})
                replaced = assign([*group[1:], newcomer], partitions)
                moves[name]["crash and replace"] += (
                    _moved(before, joined, set()) + _moved(joined, replaced, {dead}))
    print(f"\nseed {SEED}: partitions moved, {dict(moves['rendezvous'])} against i % W's "
          f"{dict(moves['i % W'])}")
    ours = moves["rendezvous"]
    for kind in ("join", "leave", "crash and replace"):
        assert ours[kind] * 2 <= moves["i % W"][kind], f"seed {SEED}: {kind}: {moves}"
    assert ours["join"] <= 1.5 * ours["taken by newcomers"], f"seed {SEED}: {moves}"


class _Hello:
    def __init__(self, **fields: Any) -> None:
        self.data = json.dumps(fields).encode()


async def test_a_group_with_an_older_process_keeps_its_first_rule() -> None:
    """A process that announces no rule (an older one, mid-upgrade) makes every process of the
    group use ``i % W``, so that they still agree on one owner per partition; once it is gone,
    the group moves to the rendezvous rule."""
    consumer = ReplayConsumer("nats://127.0.0.1:1", tenant="t", rooms="r:*", durable="d",
                              partitions=4)
    consumer.worker_id = "me"
    consumer._members["me"] = 0.0
    await consumer._heard(_Hello(id="new", partitions=4, assign=SCHEME))
    await consumer._heard(_Hello(id="other", partitions=3))  # another group's: not a member
    assert consumer._owner_list() == assign_partitions(["me", "new"], 4)
    await consumer._heard(_Hello(id="old", partitions=4))
    assert consumer._owner_list() == sorted_modulo(["me", "new", "old"], 4)
    del consumer._members["old"]  # as when it is no longer heard
    consumer._older.discard("old")
    assert consumer._owner_list() == assign_partitions(["me", "new"], 4)
