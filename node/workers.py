"""``rtnode run --workers N``: one node process per core, sharing the ports and one NATS.

The parent (:class:`Workers`) holds the data dir's lock, checks the ports, starts the embedded
nats-server once (unless the settings name an external NATS), then starts N worker processes:
``python -m node run <the same flags> --worker-index I``, each a full node named
``<node_name>-w<I>`` (its own presence, rpc routes, drain on SIGTERM) that binds the HTTP and
MQTT ports with SO_REUSEPORT, so that the kernel spreads the connections among them.

How a worker finds the NATS: the same settings (flags, environment, config file), and, for
the embedded server, the connection file the parent's server wrote in the data dir
(``nats-connection.json``, naming the URL and the credentials file, both mode 0600):
:func:`worker_settings`. No password is ever on a command line.

The parent restarts a worker that exits (with a backoff, logged), and on SIGINT or SIGTERM
sends SIGTERM to every worker (each drains its clients), waits for them, stops the
nats-server and exits 0. The workers run in their own process group (a Ctrl-C in the
terminal reaches the parent only) and get SIGTERM if the parent dies (Linux), as the
nats-server does. Their pids are in ``<data-dir>/workers.json`` and in the log.

Where the OS has no SO_REUSEPORT, N > 1 is refused (:func:`parse_workers`): one port cannot
be shared there, and a single process would serve it anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.nats_auth import read_connection_file, write_private_file
from node.nats_server import DataDirLock, EmbeddedNats, free_port
from node.protocol.errors import ConfigError
from node.protocol.settings import Settings

__all__ = ["READY_LINE", "WORKERS_FILE", "Workers", "parse_workers", "worker_settings",
           "workers_banner"]

log = logging.getLogger("node.workers")

WORKERS_FILE = "workers.json"
#: The first word of the line a worker prints on stdout once it serves.
READY_LINE = "rtnode-worker-ready"
_PR_SET_PDEATHSIG = 1
# A worker that dies is restarted after 0.5 s, then 1, 2, 4, 8, 10 s (it died again soon);
# the delay starts over once one has run this long.
_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 10.0)
_STABLE_S = 30.0
# How long the first start of the workers may take (NATS, the stream, the listeners).
_START_TIMEOUT_S = 120.0


def parse_workers(text: str) -> int:
    """``--workers``: a positive number, or ``auto`` (the number of cores).

    Raises:
        ConfigError: Not a positive integer, or N > 1 where the OS has no SO_REUSEPORT.
    """
    if text.strip().lower() == "auto":
        count = os.cpu_count() or 1
    else:
        try:
            count = int(text)
        except ValueError:
            count = 0
        if count < 1:
            raise ConfigError(f"--workers must be a number of processes (1 or more) or 'auto', "
                              f"not {text!r}")
    if count > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(f"--workers {text}: this OS has no SO_REUSEPORT, so worker "
                          "processes cannot share the HTTP and MQTT ports; run one process "
                          "(--workers 1), or several nodes on their own ports behind a proxy")
    return count


def worker_settings(settings: Settings, index: int) -> Settings:
    """The settings of worker ``index``: its own name, and the parent's embedded NATS.

    Raises:
        ConfigError: No embedded NATS runs for the data dir (the parent is gone).
    """
    update: dict[str, object] = {"node_name": f"{settings.node_name}-w{index}"}
    if settings.embedded_nats:
        endpoint = read_connection_file(settings.data_dir)
        if endpoint is None:
            raise ConfigError(f"worker {index}: no embedded NATS runs for data dir "
                              f"{settings.data_dir} (its parent 'rtnode run --workers' is gone)")
        update.update(nats_url=[endpoint.url], nats_user=endpoint.auth.user,
                      nats_password=endpoint.auth.password)
    return settings.model_copy(update=update)


def _worker_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    os.setpgid(0, 0)  # a Ctrl-C reaches the parent only, which stops the workers in order
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    """One worker process, restarted under the same index and name."""

    index: int
    name: str
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    ready: asyncio.Event | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


class Workers:
    """The parent of ``rtnode run --workers N``.

    Args:
        settings: The node's settings (``http_port`` and ``mqtt_port`` 0 pick a free port,
            once, for all the workers).
        count: Number of worker processes.
        command: The worker's command line, without ``--worker-index`` and the ports (e.g.
            ``[python, -m, node, run, <flags>]``).

    Example:
        workers = Workers(settings, 4, command)
        code = await workers.run(on_ready=lambda w: print(banner(w)))
    """

    def __init__(self, settings: Settings, count: int, command: list[str]) -> None:
        self.settings = settings
        self.count = count
        self.command = command
        self.name = settings.node_name
        self.http_port = settings.http_port
        self.mqtt_port = settings.mqtt_port
        self.lock = DataDirLock(settings.data_dir)
        self.embedded: EmbeddedNats | None = None
        self.workers = [Worker(i, f"{self.name}-w{i}") for i in range(count)]
        self.path = settings.data_dir / WORKERS_FILE
        self._stopping = asyncio.Event()
        self._forced = False

    # -- setup -------------------------------------------------------------------------

    def _check_ports(self) -> None:
        from node.app import check_free  # the same one-line errors as one node's

        s = self.settings
        if not self.http_port:
            self.http_port = free_port(s.host)
        check_free(s.host, self.http_port, "http_port")
        if not s.mqtt_broker_url:
            if not self.mqtt_port:
                self.mqtt_port = free_port(s.host, avoid=(self.http_port,))
            check_free(s.host, self.mqtt_port, "mqtt_port")
        if s.embedded_nats:
            check_free("127.0.0.1", s.nats_port, "nats_port")
            check_free("127.0.0.1", s.nats_monitor_port, "nats_monitor_port")

    async def _start_nats(self) -> None:
        s = self.settings
        if not s.embedded_nats:
            return
        assert self.lock.fd is not None
        self.embedded = EmbeddedNats(
            s.data_dir / "nats", data_dir=s.data_dir, port=s.nats_port,
            monitor_port=s.nats_monitor_port, server_name=self.name, sync=s.nats_sync,
            pass_fds=(self.lock.fd,), avoid=(self.http_port, self.mqtt_port),
        )
        await self.embedded.start()
        self.lock.note(nats_pid=self.embedded.pid)

    # -- the workers ---------------------------------------------------------------------

    async def _spawn(self, worker: Worker) -> None:
        args = [*self.command, "--worker-index", str(worker.index),
                "--http-port", str(self.http_port)]
        if not self.settings.mqtt_broker_url:
            args += ["--mqtt-port", str(self.mqtt_port)]
        assert self.lock.fd is not None
        worker.ready = asyncio.Event()
        worker.process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            preexec_fn=_worker_setup,
            # The workers hold the data dir's lock too: a new node waits for the last of them.
            pass_fds=(self.lock.fd,),
        )
        worker.started = time.monotonic()
        log.info("= worker %s started (pid %s)", worker.name, worker.process.pid)
        self._write_file()
        if self._stopping.is_set():
            # A stop came while it was being started: stop() signalled the others only.
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGKILL if self._forced else signal.SIGTERM)

    async def _read(self, worker: Worker) -> None:
        """Forward a worker's stdout; its ready line sets ``worker.ready``."""
        proc, ready = worker.process, worker.ready
        assert proc is not None and proc.stdout is not None and ready is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the reader's 64 KiB limit: asyncio dropped it
                log.warning("! worker %s printed a line over 64 KiB; dropped", worker.name)
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(READY_LINE):
                ready.set()
                log.info("= worker %s ready (pid %s)", worker.name, proc.pid)
                self._write_file()
            else:
                print(line, flush=True)

    async def _keep(self, worker: Worker) -> int | None:
        """Run ``worker`` until the parent stops, restarting it when it exits.

        Returns:
            The exit code of a worker that failed before it was ever ready (its first start:
            a setting it refuses), else None.
        """
        first = True
        while True:
            proc = worker.process
            assert proc is not None
            await self._read(worker)
            code = await proc.wait()
            assert worker.ready is not None
            if self._stopping.is_set():
                log.info("x worker %s (pid %s) exited with code %s", worker.name, proc.pid, code)
                return None
            if first and not worker.ready.is_set():
                return code or 1
            first = False
            ran = time.monotonic() - worker.started
            if ran >= _STABLE_S:
                worker.restarts = 0
            delay = _BACKOFF_S[min(worker.restarts, len(_BACKOFF_S) - 1)]
            worker.restarts += 1
            how = f"signal {-code}" if code < 0 else f"code {code}"
            log.warning("! worker %s (pid %s) exited with %s after %.1f s: restarting it in "
                        "%.1f s", worker.name, proc.pid, how, ran, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return None
            await self._spawn(worker)

    def _write_file(self) -> None:
        body = {"pid": os.getpid(),
                "nats_pid": self.embedded.pid if self.embedded else None,
                "workers": [{"index": w.index, "name": w.name, "pid": w.pid,
                             "ready": w.ready is not None and w.ready.is_set()}
                            for w in self.workers]}
        with contextlib.suppress(OSError):
            write_private_file(self.path, json.dumps(body) + "\n")

    def _signal(self, sig: int) -> None:
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.process.send_signal(sig)

    def stop(self, force: bool = False) -> None:
        """Stop: SIGTERM to every worker (each drains); once stopping, ``force`` (a second
        Ctrl-C) kills them. A repeated SIGTERM (a process manager's and its group's) does not.
        """
        if self._stopping.is_set():
            if force and not self._forced:
                self._forced = True
                log.warning("! second Ctrl-C: killing the workers")
                self._signal(signal.SIGKILL)
            return
        self._stopping.set()
        self._signal(signal.SIGTERM)

    async def _stop_workers(self, keepers: list[asyncio.Task[int | None]]) -> None:
        self.stop()
        # Each drains for up to drain_timeout_s; then they are killed.
        deadline = self.settings.drain_timeout_s + 15.0
        _, pending = await asyncio.wait(keepers, timeout=deadline)
        if pending:
            self._signal(signal.SIGKILL)
            await asyncio.wait(pending, timeout=10)
        for task in pending:
            task.cancel()

    async def run(self, on_ready: Callable[[Workers], None]) -> int:
        """Start, call ``on_ready`` once every worker serves, and run until :meth:`stop`.

        Returns:
            0 after a stop; a worker's exit code when one failed at its first start.

        Raises:
            ConfigError: The data dir is locked, a port is taken, a setting is refused.
            NatsUnavailable: The embedded nats-server did not start.
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.stop, True)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        keepers: list[asyncio.Task[int | None]] = []
        try:
            async with self.lock:
                self._check_ports()
                await self._start_nats()
                try:
                    # The first worker alone, then the others: a setting that every worker
                    # would refuse (TLS files, rpc modules) is said once, by the first, and
                    # the token secret is created once, not raced for.
                    code = None
                    for batch in (self.workers[:1], self.workers[1:]):
                        for w in batch:
                            if not self._stopping.is_set():
                                await self._spawn(w)
                                keepers.append(asyncio.create_task(
                                    self._keep(w), name=f"worker[{w.name}]"))
                        code = await self._until_ready(keepers)
                        if code is not None:
                            break
                    if code is None:
                        on_ready(self)
                        await self._stopping.wait()
                        code = 0
                    await self._stop_workers(keepers)
                    return code
                finally:
                    if self.embedded is not None:
                        await self.embedded.stop()
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
        finally:
            for task in keepers:
                task.cancel()

    async def _until_ready(self, keepers: list[asyncio.Task[int | None]]) -> int | None:
        """None once every worker is ready; the exit code of one that failed; 0 on stop."""
        if self._stopping.is_set():  # a signal while NATS started: no worker to wait for
            return 0
        readies = [asyncio.ensure_future(w.ready.wait()) for w in self.workers if w.ready]
        stopping = asyncio.ensure_future(self._stopping.wait())
        pending: set[asyncio.Future[Any]] = {*readies, *keepers, stopping}
        deadline = time.monotonic() + _START_TIMEOUT_S
        try:
            while not all(r.done() for r in readies):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("! the workers were not ready in %.0f s", _START_TIMEOUT_S)
                    return 1
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    return 0
                for task in keepers:
                    if task in done:
                        return task.result() or 1
            return None
        finally:
            for fut in (*readies, stopping):
                fut.cancel()


def workers_banner(workers: Workers) -> str:
    """The banner's line naming the workers and where their pids are."""
    names = ", ".join(f"{w.name} (pid {w.pid})" for w in workers.workers)
    return f"  workers    {workers.count}: {names}; pids in {workers.path}"
