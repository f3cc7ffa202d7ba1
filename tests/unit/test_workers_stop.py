"""node.workers: a stop that comes while a worker process is being started (pure but for one
short-lived child process)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from node.protocol.settings import load_settings
from node.workers import Workers


async def test_a_worker_started_while_stopping_gets_sigterm(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, nats_url=["nats://127.0.0.1:1"])
    workers = Workers(settings, 1, [sys.executable, "-c", "import time; time.sleep(30)"])
    async with workers.lock:
        worker = workers.workers[0]
        # SIGTERM reached the parent while it awaited the new process (a start or a restart):
        # stop() signalled the processes it knew, not this one.
        workers.stop()
        await workers._spawn(worker)
        assert worker.process is not None
        code = await asyncio.wait_for(worker.process.wait(), 3)
    assert code == -signal.SIGTERM  # not left to serve until the stop's deadline kills it


async def test_a_worker_line_over_64_kib_does_not_end_its_reader(tmp_path: Path) -> None:
    # The parent reads each worker's stdout by lines (its ready line, then what it prints): a
    # line over asyncio's 64 KiB limit raised and ended that reader, so the ready line after it
    # was never seen.
    from node.workers import READY_LINE
    settings = load_settings(data_dir=tmp_path, nats_url=["nats://127.0.0.1:1"])
    script = f"print('x' * 200000); print('{READY_LINE} w'); print('after', flush=True)"
    workers = Workers(settings, 1, [sys.executable, "-c", script])
    async with workers.lock:
        worker = workers.workers[0]
        await workers._spawn(worker)
        assert worker.ready is not None
        await asyncio.wait_for(workers._read(worker), 10)
        assert worker.ready.is_set()
        assert worker.process is not None
        await asyncio.wait_for(worker.process.wait(), 5)
