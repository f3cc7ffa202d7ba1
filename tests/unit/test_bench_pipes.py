"""The bench's device processes report over a pipe watched by the event loop
(``bench.ingest_devices.watch_pipe``): a report longer than the pipe holds arrives whole.

uvloop's ``add_reader`` makes the descriptor non-blocking; a send or recv of a long message
then failed midway with EAGAIN, the report was lost, and a run of 1,000 events per device
said 0 events/s.
"""

from __future__ import annotations

import asyncio
import os
import threading
from multiprocessing import Pipe

import uvloop

from bench.ingest_devices import watch_pipe

REPORT = {"acked": bytes(range(256)) * 4096, "latencies": [i / 7 for i in range(100_000)]}


def test_a_report_longer_than_the_pipe_arrives_whole() -> None:
    async def main() -> object:
        loop = asyncio.get_running_loop()
        parent, child = Pipe()
        got: asyncio.Future[object] = loop.create_future()

        def readable() -> None:
            if parent.poll() and not got.done():
                got.set_result(parent.recv())

        watch_pipe(loop, parent, readable)
        watch_pipe(loop, child, lambda: None)  # the child's end is watched as well
        assert os.get_blocking(parent.fileno()) and os.get_blocking(child.fileno())
        sender = threading.Thread(target=child.send, args=(REPORT,))
        sender.start()
        try:
            return await asyncio.wait_for(got, 30)
        finally:
            sender.join(30)
            loop.remove_reader(parent.fileno())
            loop.remove_reader(child.fileno())
            parent.close()
            child.close()

    assert uvloop.run(main()) == REPORT
