"""Real servers for the tests: the bundled nats-server and rtnode node processes.

Everything binds 127.0.0.1 on free ports, lives in a temporary directory, and is stopped by the
test that started it, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from node.nats_server import nats_server_binary

__all__ = ["MS", "NatsProcess", "NodeProcess", "children_of", "free_ports", "http_get",
           "wait_until"]

# One time unit that a slow CI can scale: RTNODE_TEST_TIMESCALE=3 triples every test deadline.
MS = 0.001 * float(os.environ.get("RTNODE_TEST_TIMESCALE", "1"))


def _port_range() -> range:
    """The ports this test process picks from: below the OS's ephemeral range (from which it
    hands out ports for outgoing connections and ``bind(0)``: a port picked there and released
    can be taken by any connection before its server binds it), one slice per pytest-xdist
    worker, so that parallel workers never pick the same port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start, stop = 10000, max(low, 12000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    size = (stop - start) // max(count, 1)
    return range(start + index * size, start + (index + 1) * size)


_PORTS = _port_range()
_next_port = random.randrange(len(_PORTS))


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1, from this process's range (see
    :func:`_port_range`), taken in turn, each checked free by binding it (all at once, then
    released)."""
    global _next_port
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(len(_PORTS)):
            port = _PORTS[_next_port % len(_PORTS)]
            _next_port += 1
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or not yet released by a server stopped just now)
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"no {n} free ports in {_PORTS}")


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout * MS * 1000
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body), or (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def children_of(pid: int) -> list[int]:
    """Direct child PIDs of ``pid`` (Linux /proc)."""
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            text = (task / "children").read_text()
            kids.extend(int(x) for x in text.split())
    except (FileNotFoundError, ProcessLookupError):
        return []
    return kids


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class NatsProcess:
    """A nats-server with JetStream; can be killed and restarted on the same port and store.

    ``args`` are more flags for the server (``--user u --pass p``, ``--auth TOKEN``, ``-c FILE``).
    """

    def __init__(self, store: Path, port: int | None = None, args: list[str] | None = None
                 ) -> None:
        self.store = store
        self.args = list(args or [])
        fresh = free_ports(2)
        self.port = port or fresh[0]
        self.monitor_port = fresh[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsProcess:
        self.store.mkdir(parents=True, exist_ok=True)
        log = open(self.store / "server.log", "ab")
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port),
             "-m", str(self.monitor_port), "-js", "-sd", str(self.store), *self.args],
            stdout=log, stderr=log,
        )
        log.close()
        health = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        wait_until(lambda: http_get(health)[0] == 200, 10, what="nats-server health")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


class NodeProcess:
    """``python -m node run`` as a child process on free ports."""

    def __init__(self, data_dir: Path, *args: str, name: str = "t1",
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.http_port, self.mqtt_port = free_ports(2)
        self.name = name
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name}-{self.http_port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    def start(self) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "run", "--http-port", str(self.http_port),
             "--mqtt-port", str(self.mqtt_port), "--data-dir", str(self.data_dir),
             "--node-name", self.name, *self.args],
            stdout=log, stderr=log, env=self.env,
        )
        log.close()
        return self

    def readyz(self) -> tuple[int, dict[str, object]]:
        status, body = http_get(self.base + "/readyz")
        try:
            return status, json.loads(body) if body else {}
        except ValueError:
            return status, {}

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited {self.proc.returncode}:\n{self.log()}")
            return self.readyz()[0] == 200

        wait_until(ready, timeout, what=f"node {self.name} /readyz 200")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name`` (a counter's ``_total`` too) in /metrics."""
        _, body = http_get(self.base + "/metrics")
        total = 0.0
        for line in body.decode(errors="replace").splitlines():
            head, _, value = line.rpartition(" ")
            family = head.partition("{")[0]
            if family in (name, name + "_total"):
                total += float(value)
        return total

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        kids = children_of(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for kid in kids:  # only our own node's children, by PID
            if pid_alive(kid):
                os.kill(kid, signal.SIGKILL)


@contextlib.contextmanager
def running_node(data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> Iterator[NodeProcess]:
    """A node process started, ready within ``timeout``, and stopped at the end."""
    proc = NodeProcess(data_dir, *args, env=env).start()
    try:
        proc.wait_ready(timeout)
        yield proc
    finally:
        proc.stop()
