"""The store's own latency under the paced workload: nats-server alone, as the node embeds it.

The paced fan-out (``bench.suite``, "paced") acknowledges an event once nats-server has stored
it, with an fsync per write by default, and delivers it after that: no node can answer sooner
than the store. This measures that floor in the same run: the node's embedded nats-server
(:class:`node.nats_server.EmbeddedNats`, the same binary and ``sync_interval``) in a temporary
directory, and one nats-py client that publishes to a file stream on the paced workload's
schedule (``rate`` per second, each publish sent at its time whether or not the earlier ones
were acknowledged) and times each publish until its JetStream ack. Never asserts.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import nats

from node.nats_server import EmbeddedNats

__all__ = ["publish_to_ack"]

_STREAM = "FLOOR"


def publish_to_ack(rate: float, events: int, payload_bytes: int, sync: str = "always",
                   timeout_s: float = 60.0) -> tuple[list[float], str]:
    """Seconds from each publish to its ack, and an error ("" when none), for ``events``
    publishes of ``payload_bytes`` at ``rate`` per second; bounded by ``timeout_s``."""
    latencies: list[float] = []
    try:
        asyncio.run(asyncio.wait_for(_measure(rate, events, payload_bytes, sync, latencies),
                                     timeout_s))
    except TimeoutError:
        return latencies, f"not every publish was acknowledged within {timeout_s:g} s"
    except Exception as exc:  # a bench reports, never raises
        return latencies, f"{type(exc).__name__}: {exc}"
    return latencies, ""


async def _measure(rate: float, events: int, payload_bytes: int, sync: str,
                   latencies: list[float]) -> None:
    with tempfile.TemporaryDirectory(prefix="rtnode-bench-floor-") as tmp:
        server = EmbeddedNats(Path(tmp), sync=sync, server_name="floor")
        await server.start()
        try:
            nc = await nats.connect(server.url, allow_reconnect=False,
                                    **server.auth.connect_options())
            try:
                js = nc.jetstream()
                await js.add_stream(name=_STREAM, subjects=["floor.>"])
                body = b"x" * payload_bytes

                async def one() -> None:
                    sent = time.perf_counter()
                    await js.publish("floor.room", body, stream=_STREAM)
                    latencies.append(time.perf_counter() - sent)

                loop = asyncio.get_running_loop()
                start = loop.time() + 0.1
                tasks = []
                for i in range(events):
                    delay = start + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one()))
                await asyncio.gather(*tasks)
            finally:
                await nc.close()
        finally:
            await server.stop()
