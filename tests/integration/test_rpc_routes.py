"""Rpc routes (bridge.rpc) across a NATS outage, against a real nats-server that is killed and
started again on the same port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from nats.errors import NoRespondersError

from bridge.nats_link import NatsLink, StreamSettings
from bridge.rpc import NatsRpc, rpc_subject
from tests.servers import NatsProcess

pytestmark = pytest.mark.integration


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_route_opened_and_dropped_during_an_outage_is_not_left_on_the_server(
        nats_proc: NatsProcess) -> None:
    link = NatsLink([nats_proc.url], name="t", stream=StreamSettings(), connect_timeout_s=10)
    await link.connect()
    try:
        rpc = NatsRpc(link)
        nats_proc.kill()
        await _until(lambda: link.nc.is_reconnecting, 10, "the client to reconnect")

        def handler(request: object, reply: str) -> None:
            pass

        # A connection comes and goes while NATS is away: its SUB waits in the client's
        # buffer, its route is dropped after the grace.
        await rpc.register("t", ["user:gone"], handler)
        rpc.unregister("t", ["user:gone"], handler)
        subject = rpc_subject("t", "user:gone")
        await _until(lambda: subject not in rpc._subs, 5, "the route to be dropped")
        await asyncio.sleep(0.05)  # its unsubscribe task runs
        assert link.nc.is_reconnecting

        nats_proc.start()
        await _until(lambda: link.nc.is_connected, 15, "the client to reconnect")
        await link.nc.flush(timeout=5)
        # Nobody holds the target: "no responders" at once, not a request swallowed by a
        # subscription the server kept for this node.
        with pytest.raises(NoRespondersError):
            await link.nc.request(subject, b"", timeout=2)
    finally:
        await link.close()
