"""Events stored through an in-process node, for the tests of what reads the room stream
(durable consumers, webhooks, replay): a tenant of their own, numbered events, dead letters."""

from __future__ import annotations

import uuid
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from node.core.events import event_body
from node.protocol.tokens import Principal

WHO = Principal(sub="backend", kind="service")


def tenant() -> str:
    """A tenant no other test uses: patterns like ``sensors:*`` then see only this test."""
    return "t" + uuid.uuid4().hex[:10]


async def store(node: Any, tenant: str, room: str, n: int, start: int = 0) -> list[int]:
    """Store ``n`` events ``{"i": start..}`` in ``room`` through the node; their seqs."""
    seqs = []
    for i in range(start, start + n):
        body = event_body(room, "reading", {"i": i}, WHO, None, f"m{i}")
        seq, _ = await node.store.publish(tenant, room, body, f"{tenant}:{room}:{i}")
        seqs.append(seq)
    return seqs


async def dead_letters(nc: NATS, subject: str) -> list[Msg]:
    """Collect what reaches a dead-letter ``subject`` (subscribed and flushed on return)."""
    dead: list[Msg] = []

    async def on_dead(msg: Msg) -> None:
        dead.append(msg)

    await nc.subscribe(subject, cb=on_dead)
    await nc.flush()
    return dead
