"""The rooms a node's stats events list (bridge/static.py), found by bisection in the sorted
names of its room actors: the same as sorting every tenant's rooms afresh. Pure, seeded."""

from __future__ import annotations

import random

from bridge.static import (
    MAX_ROOMS_LISTED,
    STATS_TENANT,
    _all_listed,
    _listed,
    _tenant_runs,
)


def _as_before(names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    # The pass over every name the stats made each second before (tenant -> sorted rooms; every
    # tenant's rooms, the default's by name and the others' as tenant/room, sorted).
    rooms: dict[str, list[str]] = {}
    for name in names:
        tenant, _, room = name[5:].partition(":")
        rooms.setdefault(tenant, []).append(room)
    for listed in rooms.values():
        listed.sort()
    every = sorted(room if tenant == STATS_TENANT else f"{tenant}/{room}"
                   for tenant, listed in rooms.items() for room in listed)
    return rooms, every


def test_the_listed_rooms_are_those_of_a_full_pass() -> None:
    rnd = random.Random(7)
    chars = "abAB09_-:@="
    tenants = [STATS_TENANT, "a", "a-b", "a_b", "a0", "aB", "ab", "b", "Z", "default-2"]
    for case in range(300):
        names = sorted({
            f"room:{rnd.choice(tenants)}:"
            + "".join(rnd.choice(chars) for _ in range(rnd.randrange(1, 6)))
            for _ in range(rnd.randrange(0, 3 * MAX_ROOMS_LISTED))})
        rooms, every = _as_before(names)
        runs = _tenant_runs(names)
        assert [tenant for tenant, _, _ in runs] == list(rooms), case
        for tenant, start, end in runs:
            assert end - start == len(rooms[tenant]), case
            assert _listed(names, tenant, start, end) == rooms[tenant][:MAX_ROOMS_LISTED], case
        assert _all_listed(names, runs) == every[:MAX_ROOMS_LISTED], case
