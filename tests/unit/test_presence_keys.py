"""The presence tracker's local keys, without NATS: removal compares the member's joined_at, so
the old connection of an MQTT takeover (same client id) never deletes its successor's key."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from bridge.presence import PresenceTracker


class FakeNats:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Any]] = []

    async def publish(self, subject: str, body: bytes, headers: Any = None) -> None:
        self.sent.append((subject, body, headers))


def tracker() -> tuple[PresenceTracker, FakeNats]:
    nc = FakeNats()
    store: Any = SimpleNamespace(link=SimpleNamespace(nc=nc))
    return PresenceTracker(store, ttl_s=10), nc


def member(joined_at: int) -> dict[str, Any]:
    return {"client_id": "thermo-1", "user": "thermo-1", "kind": "device", "node": "n1",
            "joined_at": joined_at}


async def test_the_old_connection_of_a_takeover_leaves_its_successor_in_presence() -> None:
    presence, nc = tracker()
    presence.add("t", "sensors:lab", member(1000))
    presence.add("t", "sensors:lab", member(1005))  # the takeover's new connection joins
    presence.remove("t", "sensors:lab", "thermo-1", 1000)  # the old one's cleanup, late
    await asyncio.sleep(0)
    assert not [h for _, _, h in nc.sent if h], "no delete of the successor's key"
    assert len(presence._local) == 1
    presence.remove("t", "sensors:lab", "thermo-1", 1005)
    await asyncio.sleep(0)
    assert [h for _, _, h in nc.sent if h] == [{"KV-Operation": "DEL"}]
    assert presence._local == {}


async def test_remove_without_joined_at_removes_whoever_is_there() -> None:
    presence, nc = tracker()
    presence.add("t", "r", member(7))
    presence.remove("t", "r", "thermo-1")
    await asyncio.sleep(0)
    assert [h for _, _, h in nc.sent if h] == [{"KV-Operation": "DEL"}]
