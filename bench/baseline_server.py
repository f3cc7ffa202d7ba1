"""The baseline of the fan-out benchmark: a plain ``websockets`` broadcast server.

This is the standard way people build a fan-out server with websockets 15: every connection is
kept in a set, and every message a connection sends is forwarded unchanged, one message per
event, to all the other connections with :func:`websockets.asyncio.server.broadcast`. No
storage, no sequencing, no batching, no acknowledgement. The request path is the room: the
connections of ``ws://host:port/a`` get each other's messages, not those of ``/b`` (``/`` is
one room, as the fan-out benchmark uses it).

Each connection gets one ``{"type":"joined"}`` message once it is in the set, so a client knows
it will receive what is published from then on. Run it as its own process (the benchmark does)::

    python -m bench.baseline_server --port 9000

It stops on SIGTERM or SIGINT. It runs on uvloop when installed, as the node does, so the
comparison is about the design, not the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["JOINED", "main", "serve_forever"]

JOINED = '{"type":"joined"}'


async def serve_forever(host: str, port: int) -> None:
    """Serve the broadcast server on ``host:port`` until SIGTERM or SIGINT."""
    rooms: dict[str, set[ServerConnection]] = {}

    async def handler(ws: ServerConnection) -> None:
        room = ws.request.path if ws.request is not None else "/"
        connections = rooms.setdefault(room, set())
        connections.add(ws)
        try:
            await ws.send(JOINED)
            async for message in ws:
                broadcast([c for c in connections if c is not ws], message)
        except ConnectionClosed:  # a client gone without a close frame: not worth a traceback
            pass
        finally:
            connections.discard(ws)
            if not connections:
                rooms.pop(room, None)

    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def stopping() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    async with serve(handler, host, port, compression=None, max_size=None):
        print(f"baseline ready on ws://{host}:{port}", flush=True)
        await stop


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--host`` (default 127.0.0.1) and ``--port`` (required)."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server",
                                     description="plain websockets broadcast server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    runner(serve_forever(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
