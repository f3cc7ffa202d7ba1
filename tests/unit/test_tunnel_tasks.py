"""``devices.tunnel_cli.end_tasks``: the tunnel's reader and writer end without a stray report.

When the node closes the tunnel, the writer's publish and the reader's iteration can both end
with the connection's error in the same loop step; the tunnel reports one (its caller raises
it) and must not print the other at exit as "Task exception was never retrieved" (seen once in
CI on ``test_ctrl_c_and_a_node_sent_disconnect``).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aiomqtt

from devices.tunnel_cli import end_tasks


async def _fails(message: str) -> None:
    raise aiomqtt.MqttError(message)


async def _waits() -> None:
    await asyncio.Event().wait()


async def test_errors_of_ended_tasks_are_taken_and_running_ones_cancelled() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        writer = asyncio.create_task(_fails("publish: disconnected"))
        reader = asyncio.create_task(_fails("Disconnected during message iteration"))
        other = asyncio.create_task(_waits())
        await asyncio.wait({writer, reader})
        await end_tasks(writer, None, reader, other)
        assert other.cancelled()
        del writer, reader, other
        gc.collect()
        await asyncio.sleep(0)
        assert reported == []
    finally:
        loop.set_exception_handler(None)
