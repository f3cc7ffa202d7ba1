"""What an idle connection holds (issue 12): counted, never timed (the figures: bench connections).

Rpc routes are light entries of the NATS client's subscription table (no queue, no task each);
the routes of connections that connect together share one PING/PONG.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.wsclient import RawClient, token, ws_url

pytestmark = pytest.mark.integration

N = 12


async def test_idle_connections_rpc_routes_hold_no_task_and_share_a_round_trip(
        make_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge import _nats_patches

    node = await make_node()
    nc: Any = node.nats.nc
    flushes = 0
    real_flush = _nats_patches.flush_later  # the round trip of NatsLink.confirmed()

    async def counting_flush(*args: Any, **kw: Any) -> Any:
        nonlocal flushes
        flushes += 1
        return await real_flush(*args, **kw)

    monkeypatch.setattr(_nats_patches, "flush_later", counting_flush)
    clients = await asyncio.gather(*(RawClient.connected(ws_url(node), token(f"idle-{i}"))
                                     for i in range(N)))
    routes = [s for s in nc._subs.values() if s._subject.startswith("rt.rpc.")]
    assert len(routes) == 2 * N  # client:<id> and user:<sub> of each
    assert all(getattr(s, "_wait_for_msgs_task", None) is None for s in routes)
    assert not any(t.get_coro().__qualname__.endswith("_wait_for_msgs")  # type: ignore[union-attr]
                   and "rt.rpc." in repr(t) for t in asyncio.all_tasks())
    # Connections that connected within one loop turn waited for the same PING/PONG.
    assert 1 <= flushes < N
    for c in clients:
        await c.close()

