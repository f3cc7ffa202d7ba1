"""A local 3-server NATS cluster with JetStream, and a TCP proxy that can cut connections.

``NatsCluster`` runs three bundled nats-server processes clustered on 127.0.0.1 (free client,
cluster and monitor ports, one store directory each). A server can be killed (SIGKILL, by PID)
and restarted on the same ports and store, or paused (SIGSTOP) and resumed (SIGCONT); a
stream's leader can be asked to step down. ``TcpProxy`` is an asyncio TCP proxy in the test's
event loop: ``cut()`` closes every current connection and refuses new ones, ``restore()``
accepts again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.nats_server import nats_server_binary
from tests.servers import NodeProcess, free_ports, http_get, wait_until
from tests.wsclient import SECRET

__all__ = ["FAST", "NatsCluster", "RawMqtt", "TcpProxy", "cluster_node"]

CLUSTER_NAME = "rtc"


class _Server:
    def __init__(self, index: int, base: Path, ports: list[int]) -> None:
        self.index = index
        self.name = f"n{index}"
        self.port, self.cluster_port, self.monitor_port = ports
        self.dir = base / self.name
        self.conf = base / f"{self.name}.conf"
        self.log = base / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def monitor(self, path: str) -> dict[str, Any] | None:
        status, body = http_get(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=1.0)
        if status != 200:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


class NatsCluster:
    """Three nats-servers in one JetStream cluster on 127.0.0.1.

    The one cluster of the fault tests, the Jepsen test and ``bench.scaleout``.

    Args:
        base: A directory for the configuration files, logs and stores.
        preexec_fn: Run in each server process before exec (the benchmark's makes the servers
            die with it).
    """

    def __init__(self, base: Path, preexec_fn: Callable[[], None] | None = None) -> None:
        self.base = base / "nats-cluster"
        ports = free_ports(9)
        self.servers = [_Server(i, self.base, ports[3 * i:3 * i + 3]) for i in range(3)]
        self.paused: set[int] = set()
        self.preexec_fn = preexec_fn

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers if s.proc is not None]

    def _write_conf(self, s: _Server) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{o.cluster_port}" for o in self.servers)
        s.conf.write_text(
            f"server_name: {s.name}\n"
            f"listen: 127.0.0.1:{s.port}\n"
            f"http: 127.0.0.1:{s.monitor_port}\n"
            f'jetstream {{ store_dir: "{s.dir}", max_memory_store: 64MB, max_file_store: 1GB }}\n'
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{s.cluster_port}\n"
            # no_advertise: clients keep to the URLs they were given (a node pointed at the
            # TcpProxy must not discover the servers behind it and route around a cut).
            f"  routes: [ {routes} ]\n  no_advertise: true\n}}\n"
        )

    def _spawn(self, s: _Server) -> None:
        s.dir.mkdir(parents=True, exist_ok=True)
        log = open(s.log, "ab")
        s.proc = subprocess.Popen([nats_server_binary(), "-c", str(s.conf)],
                                  stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                  preexec_fn=self.preexec_fn)
        log.close()

    def start(self, timeout: float = 20.0) -> NatsCluster:
        """Start the three servers and wait until they agree on a JetStream meta leader."""
        self.base.mkdir(parents=True, exist_ok=True)
        for s in self.servers:
            self._write_conf(s)
            self._spawn(s)
        self.wait_meta_leader(timeout)
        return self

    def alive(self, i: int) -> bool:
        proc = self.servers[i].proc
        return proc is not None and proc.poll() is None

    def meta_leader(self) -> str | None:
        """The meta leader's server name, as every live server reports it (None if they differ
        or have none)."""
        seen = set()
        for s in self.servers:
            if not self.alive(s.index):
                continue
            jsz = s.monitor("/jsz")
            leader = ((jsz or {}).get("meta_cluster") or {}).get("leader")
            if not leader:
                return None
            seen.add(leader)
        return seen.pop() if len(seen) == 1 else None

    def wait_meta_leader(self, timeout: float = 20.0) -> str:
        return str(wait_until(self.meta_leader, timeout, 0.05, what="JetStream meta leader"))

    def stream_leader(self, stream: str) -> int | None:
        """The index of the server leading ``stream`` (from ``/jsz?streams=true``), or None."""
        names = {s.name: s.index for s in self.servers}
        for s in self.servers:
            if not self.alive(s.index):
                continue
            jsz = s.monitor("/jsz?streams=true")
            for account in (jsz or {}).get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") != stream:
                        continue
                    leader = (detail.get("cluster") or {}).get("leader")
                    if leader in names and self.alive(names[leader]):
                        return names[leader]
        return None

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` (by its PID) and reap it."""
        s = self.servers[i]
        if s.proc is not None:
            s.proc.kill()
            s.proc.wait(10)
            s.proc = None
        self.paused.discard(i)

    def pause(self, i: int) -> None:
        """SIGSTOP server ``i`` (by its PID): its sockets stay open, it answers nothing."""
        s = self.servers[i]
        assert s.proc is not None and s.proc.poll() is None, f"{s.name} is not running"
        os.kill(s.proc.pid, signal.SIGSTOP)
        self.paused.add(i)

    def resume(self, i: int) -> None:
        """SIGCONT server ``i`` after :meth:`pause`."""
        s = self.servers[i]
        if s.proc is not None and s.proc.poll() is None:
            os.kill(s.proc.pid, signal.SIGCONT)
        self.paused.discard(i)

    def _stream_detail(self, i: int, stream: str) -> dict[str, Any] | None:
        jsz = self.servers[i].monitor("/jsz?streams=true")
        for account in (jsz or {}).get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    return dict(detail)
        return None

    def stream_states(self, stream: str) -> dict[str, tuple[int, int] | None]:
        """(messages, last_seq) of ``stream`` as each live, running server holds it."""
        out: dict[str, tuple[int, int] | None] = {}
        for s in self.servers:
            if not self.alive(s.index) or s.index in self.paused:
                continue
            detail = self._stream_detail(s.index, stream)
            state = (detail or {}).get("state") or {}
            out[s.name] = (None if detail is None else
                           (int(state.get("messages", 0)), int(state.get("last_seq", 0))))
        return out

    def stream_healthy(self, stream: str, replicas: int = 3) -> bool:
        """``stream`` has a live leader whose ``replicas - 1`` followers are all current."""
        leader = self.stream_leader(stream)
        if leader is None or leader in self.paused:
            return False
        detail = self._stream_detail(leader, stream)
        peers = ((detail or {}).get("cluster") or {}).get("replicas") or []
        return len(peers) == replicas - 1 and all(p.get("current") for p in peers)

    async def step_down(self, stream: str, timeout: float = 5.0) -> dict[str, Any]:
        """Ask ``stream``'s leader to step down (``$JS.API.STREAM.LEADER.STEPDOWN``); returns
        the API's answer ({"success": true} or {"error": ...})."""
        import nats  # the cluster's own users may not need a client

        async def quiet(exc: Exception) -> None:
            pass

        urls = [s.url for s in self.servers if self.alive(s.index) and s.index not in self.paused]
        nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=1,
                                allow_reconnect=False, error_cb=quiet)
        try:
            msg = await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"",
                                   timeout=timeout)
            answer = json.loads(msg.data)
            return answer if isinstance(answer, dict) else {"error": answer}
        finally:
            await nc.close()

    def restart(self, i: int, timeout: float = 20.0) -> None:
        """Start server ``i`` again on the same ports and store; wait until it is healthy."""
        s = self.servers[i]
        assert s.proc is None, "kill it first"
        self._spawn(s)
        health = f"http://127.0.0.1:{s.monitor_port}/healthz?js-enabled-only=true"
        wait_until(lambda: http_get(health)[0] == 200, timeout, what=f"{s.name} health")

    def stop(self, notes: list[str] | None = None) -> None:
        """SIGTERM every server at once (paused ones resumed first); SIGKILL after 10 s.

        Args:
            notes: Where to say which server had to be killed.
        """
        for i in list(self.paused):
            self.resume(i)
        running = [s for s in self.servers if s.proc is not None]
        for s in running:
            assert s.proc is not None
            s.proc.terminate()
        for s in running:
            assert s.proc is not None
            try:
                s.proc.wait(10)
            except subprocess.TimeoutExpired:
                if notes is not None:
                    notes.append(f"{s.name} did not exit 10 s after SIGTERM: killed")
                s.proc.kill()
                s.proc.wait(10)
            s.proc = None

    def logs(self) -> str:
        out = []
        for s in self.servers:
            with contextlib.suppress(FileNotFoundError):
                text = s.log.read_text(errors="replace")
                out.append(f"--- {s.name}\n{text[-3000:]}")
        return "\n".join(out)


class TcpProxy:
    """A TCP proxy from 127.0.0.1:``listen_port`` to ``target_host``:``target_port``.

    It runs in the current event loop: ``await start()`` first, ``await stop()`` at the end.
    """

    def __init__(self, listen_port: int, target_host: str, target_port: int) -> None:
        self.listen_port = listen_port
        self.target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.connections = 0  # accepted in total

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.listen_port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.listen_port, reuse_address=True)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
            me.add_done_callback(self._handlers.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)),
                 asyncio.create_task(self._pipe(up_reader, writer))]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()
            self._tasks.difference_update(pipes)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass

    async def cut(self) -> None:
        """Stop listening (new connections are refused) and close every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            transport = w.transport
            transport.abort()  # no graceful flush: the link is gone
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()

    async def restore(self) -> None:
        """Accept connections again on the same port."""
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        await self.cut()
        if self._handlers:  # let each connection's handler see its pipes end
            await asyncio.wait(list(self._handlers), timeout=5)


# Rate limits lifted: the fault tests publish as fast as the cluster takes it.
FAST = ["--rate-per-s", "1000000", "--rate-burst", "1000000"]


def cluster_node(tmp: Path, name: str, urls: list[str]) -> NodeProcess:
    """A node on ``urls`` (a cluster's servers, or a proxy to one) with the R3 room stream."""
    return NodeProcess(tmp / name, "--nats-url", ",".join(urls), "--stream-replicas", "3",
                       *FAST, name=name, env={"RTNODE_JWT_SECRET": SECRET}).start()


class RawMqtt:
    """A bare MQTT 3.1.1 client on asyncio streams, for the persistent-session tests and
    ``bench.sessions``: it PUBACKs only when told (:meth:`puback`), so a test can leave
    messages unacknowledged and see them again, with DUP, after reconnecting.

    ``await RawMqtt.connect(port, client_id, password, clean=False)``; ``session_present`` and
    ``return_code`` come from the CONNACK. :meth:`publish_in` returns the next PUBLISH as
    ``(topic, payload, packet_id, qos, dup, retain)``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.session_present = False
        self.return_code = -1
        self._ids = 0
        # PUBLISHes read while waiting for another packet (a SUBACK), handed out first
        self.pending: list[tuple[str, bytes, int, int, bool, bool]] = []

    @staticmethod
    def _str(s: str | bytes) -> bytes:
        raw = s.encode() if isinstance(s, str) else s
        return len(raw).to_bytes(2, "big") + raw

    @staticmethod
    def _packet(b0: int, body: bytes) -> bytes:
        n, length = len(body), bytearray()
        while True:
            digit, n = n % 128, n // 128
            length.append(digit | (0x80 if n else 0))
            if not n:
                break
        return bytes([b0]) + bytes(length) + body

    @classmethod
    async def connect(cls, port: int, client_id: str, password: str, *, clean: bool = False,
                      keepalive: int = 60, timeout: float = 10.0) -> RawMqtt:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout)
        c = cls(reader, writer)
        flags = 0x80 | 0x40 | (0x02 if clean else 0)
        body = (cls._str("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
                + cls._str(client_id) + cls._str(client_id) + cls._str(password))
        writer.write(cls._packet(0x10, body))
        b0, rest = await asyncio.wait_for(c.read_packet(), timeout)
        assert b0 >> 4 == 2, f"expected CONNACK, got packet type {b0 >> 4}"
        c.session_present, c.return_code = bool(rest[0] & 1), rest[1]
        return c

    async def read_packet(self) -> tuple[int, bytes]:
        """The next packet: (first byte, the rest). IncompleteReadError when the socket ends."""
        b0 = (await self.reader.readexactly(1))[0]
        n, shift = 0, 0
        while True:
            digit = (await self.reader.readexactly(1))[0]
            n += (digit & 0x7F) << shift
            shift += 7
            if not digit & 0x80:
                break
        return b0, await self.reader.readexactly(n)

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> list[int]:
        """SUBSCRIBE one filter; the granted QoS list of the SUBACK."""
        self._ids = self._ids % 65535 + 1
        self.writer.write(self._packet(0x82, self._ids.to_bytes(2, "big") + self._str(topic)
                                       + bytes([qos])))
        while True:
            b0, rest = await asyncio.wait_for(self.read_packet(), timeout)
            if b0 >> 4 == 9:
                return list(rest[2:])
            assert b0 >> 4 == 3, f"unexpected packet type {b0 >> 4} before SUBACK"
            self.pending.append(self._parse_publish(b0, rest))

    @staticmethod
    def _parse_publish(b0: int, rest: bytes) -> tuple[str, bytes, int, int, bool, bool]:
        qos = (b0 >> 1) & 3
        tlen = int.from_bytes(rest[:2], "big")
        topic = rest[2:2 + tlen].decode()
        pos = 2 + tlen
        packet_id = 0
        if qos:
            packet_id = int.from_bytes(rest[pos:pos + 2], "big")
            pos += 2
        return topic, rest[pos:], packet_id, qos, bool(b0 & 0x08), bool(b0 & 0x01)

    async def publish_in(self, timeout: float = 10.0) -> tuple[str, bytes, int, int, bool, bool]:
        """The next PUBLISH from the server (other packets, e.g. PINGRESP, are skipped)."""
        if self.pending:
            return self.pending.pop(0)
        while True:
            b0, rest = await asyncio.wait_for(self.read_packet(), timeout)
            if b0 >> 4 == 3:
                return self._parse_publish(b0, rest)

    def puback(self, packet_id: int) -> None:
        self.writer.write(self._packet(0x40, packet_id.to_bytes(2, "big")))

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> int:
        """Send a PUBLISH (QoS 0 or 1); its packet id (0 for QoS 0). The PUBACK is not awaited."""
        pid = 0
        body = self._str(topic)
        if qos:
            self._ids = self._ids % 65535 + 1
            pid = self._ids
            body += pid.to_bytes(2, "big")
        self.writer.write(self._packet(0x30 | (qos << 1) | int(retain), body + payload))
        return pid

    async def disconnect(self) -> None:
        """A clean DISCONNECT, then close."""
        with contextlib.suppress(OSError):
            self.writer.write(b"\xe0\x00")
            await self.writer.drain()
        await self.drop()

    async def drop(self, timeout: float = 10.0) -> None:
        """End the connection without DISCONNECT (a lost connection, as the node sees it): our
        side is shut (FIN after every byte written, so PUBACKs sent before are read), then
        whatever the node still sends is read and dropped until it closes its side."""
        with contextlib.suppress(OSError):
            await self.writer.drain()
            self.writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
