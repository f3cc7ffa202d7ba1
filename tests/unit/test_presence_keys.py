"""The presence tracker's local keys, without NATS: removal compares the member's joined_at, so
the old connection of an MQTT takeover (same client id) never deletes its successor's key."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from bridge.presence import PresenceTracker


class FakeNats:
    """The node's NATS link, as the tracker writes to it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Any]] = []

    def publish_now(self, subject: str, body: bytes, headers: Any = None, *,
                    later: bool = False) -> None:
        self.sent.append((subject, body, headers))


def tracker(there: dict[str, Any] | None = None) -> tuple[PresenceTracker, FakeNats]:
    """A tracker whose bucket holds ``there`` for every key read (None: nothing)."""
    nc = FakeNats()

    async def direct_get(request: dict[str, Any], stream: str) -> Any:
        if there is None:
            return SimpleNamespace(events=[], headers=[])
        return SimpleNamespace(events=[SimpleNamespace(seq=1, body=json.dumps(there).encode())],
                               headers=[{}])

    store: Any = SimpleNamespace(link=nc, direct_get=direct_get)
    return PresenceTracker(store, ttl_s=10), nc


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def deletes(nc: FakeNats) -> list[str]:
    return [h["KV-Operation"] for _, _, h in nc.sent if h and "KV-Operation" in h]


def member(joined_at: int) -> dict[str, Any]:
    return {"client_id": "thermo-1", "user": "thermo-1", "kind": "device", "node": "n1",
            "joined_at": joined_at}


async def test_the_old_connection_of_a_takeover_leaves_its_successor_in_presence() -> None:
    presence, nc = tracker()
    presence.add("t", "sensors:lab", member(1000))
    presence.add("t", "sensors:lab", member(1005))  # the takeover's new connection joins
    presence.remove("t", "sensors:lab", "thermo-1", 1000)  # the old one's cleanup, late
    await asyncio.sleep(0)
    assert not deletes(nc), "no delete of the successor's key"
    assert len(presence._local) == 1
    presence.remove("t", "sensors:lab", "thermo-1", 1005)
    await asyncio.sleep(0)
    assert deletes(nc) == ["DEL"]
    assert presence._local == {}


async def test_remove_without_joined_at_removes_whoever_is_there() -> None:
    presence, nc = tracker()
    presence.add("t", "r", member(7))
    presence.remove("t", "r", "thermo-1")
    await asyncio.sleep(0)
    assert deletes(nc) == ["DEL"]


async def test_every_write_carries_its_ttl_and_offline_members_the_sessions() -> None:
    presence, nc = tracker()
    presence.add("t", "r", member(7))
    presence.mark_offline("t", "r", {**member(7), "online": False}, 3600)
    await settle()
    (_, _, h1), (_, offline, h2) = nc.sent
    assert h1 == {"Nats-TTL": "10s"} and h2 == {"Nats-TTL": "3600s"}
    assert b'"online":false' in offline and b"offline_since" in offline
    assert presence._local == {}, "an offline member is refreshed by nobody"


async def test_the_old_connection_of_a_takeover_never_marks_its_successor_offline() -> None:
    presence, nc = tracker()
    presence.add("t", "r", member(1000))
    presence.add("t", "r", member(1005))  # the takeover's new connection
    presence.mark_offline("t", "r", member(1000), 3600)  # the old one ends, late
    await settle()
    assert len(nc.sent) == 2 and len(presence._local) == 1


async def test_a_successor_on_another_node_is_never_marked_offline() -> None:
    presence, nc = tracker(there={**member(2000), "node": "n2"})  # reconnected elsewhere
    presence.add("t", "r", member(1000))
    presence.mark_offline("t", "r", member(1000), 3600)
    await settle()
    assert len(nc.sent) == 1 and presence._local == {}  # its own put only
    presence, nc = tracker(there=member(1000))  # its own online entry: marked offline
    presence.add("t", "r", member(1000))
    presence.mark_offline("t", "r", member(1000), 3600)
    await settle()
    assert len(nc.sent) == 2 and b'"online":false' in nc.sent[1][1]
