"""Which process of a replay group serves which partition: pure, no I/O.

The processes of a group (:class:`bridge.replay.ReplayConsumer` with ``partitions`` > 1) hear
each other announce themselves, and each works out the owner of every partition from the ids it
has heard. They agree without talking because the answer depends on the set of ids alone.

A partition that changes owner is handed over: the old owner lets its events settle and unpins,
the new one resets the consumer to its ack floor, and events acked above the floor are delivered
again (at least once). So a change of membership should move few partitions, and every process
should serve its share:

* **Balanced:** with ``P`` partitions and ``W`` members, each member serves ``P // W`` or
  ``P // W + 1`` of them (the extra ones go to the members that rank highest on a fixed key).
* **Few moves** (rendezvous hashing): member ``m`` ranks partition ``i`` by a hash of both, and
  the pairs are taken from the highest rank down, each partition by the first member that still
  has room. A newcomer takes about its share, and a member's leave moves about its own
  partitions.

The group's first rule, partition ``i`` to the ``i % W``-th id in sorted order, was balanced
but moved most partitions on any change: a newcomer whose id sorted first shifted every one. In
400 seeded groups of 1-8 members and 2-32 partitions (``tests/unit/test_replay_groups.py``, seed
1), newcomers moved 1,135 partitions where ``i % W`` moved 2,732 (they took 851 of them), leaves
243 besides the leavers' own where it moved 1,592, and a crash replaced by a newcomer while the
dead member is still heard (for a few seconds) 1,230 where it moved 4,457, about half of them
twice. A process announces :data:`SCHEME`; while any member of the group announces none
(an older process), every process of the group uses ``i % W`` (:func:`sorted_modulo`), so that
a group in the middle of an upgrade still agrees on one owner per partition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["SCHEME", "assign_partitions", "sorted_modulo"]

#: What a process of the group announces (``"assign"`` in its hello) when it uses
#: :func:`assign_partitions`.
SCHEME = "rendezvous"


def _members(members: Iterable[str], partitions: int) -> list[str]:
    ids = sorted(set(members))
    if not ids or partitions < 1:
        raise ValueError("a group needs a member and a partition")
    return ids


def _rank(member: str, key: str) -> int:
    digest = hashlib.blake2b(f"{member}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_partitions(members: Iterable[str], partitions: int) -> list[str]:
    """The owner of each partition (index ``i`` of the list) among ``members``.

    Raises:
        ValueError: No member, or fewer than one partition.
    """
    ids = _members(members, partitions)
    base, extra = divmod(partitions, len(ids))
    by_rank = sorted(ids, key=lambda m: (_rank(m, "extra"), m), reverse=True)
    room = {m: base + (1 if n < extra else 0) for n, m in enumerate(by_rank)}
    pairs = sorted(((_rank(m, str(i)), m, i) for i in range(partitions) for m in ids),
                   reverse=True)
    owners: list[str | None] = [None] * partitions
    left = partitions
    for _, member, index in pairs:
        if owners[index] is None and room[member]:
            owners[index] = member
            room[member] -= 1
            left -= 1
            if not left:
                break
    return [owner for owner in owners if owner is not None]


def sorted_modulo(members: Iterable[str], partitions: int) -> list[str]:
    """The group's first rule: partition ``i`` to the ``i % W``-th member in sorted order.

    Raises:
        ValueError: No member, or fewer than one partition.
    """
    ids = _members(members, partitions)
    return [ids[i % len(ids)] for i in range(partitions)]
