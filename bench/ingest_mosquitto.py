"""The device ingest's baseline: the same devices publishing to Mosquitto, no storage.

:func:`run_mosquitto_ingest` starts Debian's ``mosquitto`` (anonymous, no persistence, queues
unbounded) on a free port in a temporary directory, subscribes one MQTT member to the room's
topic at QoS 0 (as the node's WebSocket member gets its events: no ack of its own), and runs
:func:`bench.ingest.measure` with it: the same device processes, window and accounting as the
node's run (every PUBACKed reading must reach the member once). Mosquitto stores nothing, so
its figure is the ceiling of a broker that only forwards, measured on the same machine in the
same run. Without a ``mosquitto`` binary the result says so (``error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2

from bench.ingest import Member, measure
from bench.ingest_devices import (
    ROOM,
    IngestConfig,
    connect_packet,
    packet_at,
    read_packet,
    utf8,
)
from bench.ingest_report import IngestResult
from bench.procs import SETUP_TIMEOUT_S, cpu_seconds, run_loop, stop
from node.nats_server import free_port

__all__ = ["MqttMember", "mosquitto_binary", "run_mosquitto_ingest"]

_READ = 1 << 16


def mosquitto_binary() -> str | None:
    """Debian's ``mosquitto`` (``make`` installs it), or None."""
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return found if Path(found).exists() else None


class MqttMember:
    """The member as an MQTT client of the broker: subscribed to the room's uplink topic."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            await self._subscribe(reader, writer)
        except asyncio.IncompleteReadError:
            writer.close()
            raise RuntimeError("member: the broker closed the connection") from None
        except BaseException:
            writer.close()
            raise
        return reader, writer

    @staticmethod
    async def _subscribe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(connect_packet("bench-member", ""))
        kind, body = await read_packet(reader)
        if kind != 2 or len(body) < 2 or body[1] != 0:
            raise RuntimeError(f"member: CONNECT answered with packet {kind} {body!r}")
        topic = utf8(f"rooms/{ROOM}/up")
        body = (1).to_bytes(2, "big") + topic + b"\x00"  # packet id 1, QoS 0
        writer.write(bytes((0x82, len(body))) + body)
        kind, body = await read_packet(reader)
        if kind != 9 or body[-1:] != b"\x00":
            raise RuntimeError(f"member: SUBSCRIBE answered with packet {kind} {body!r}")

    async def read(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                   member: Member, finished: asyncio.Event) -> None:
        reader, _ = conn
        buf = bytearray()
        res = member.res
        try:
            while True:
                data = await reader.read(_READ)
                if not data:
                    break
                buf += data
                now = time.time()
                pos = _publishes(buf, member, now)
                del buf[:pos]
        except (OSError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a bug of the benchmark's own: reported, not hidden
            res.member_closed = f"reader failed: {exc!r}"
            return
        if not finished.is_set():
            res.member_closed = "closed by the broker"

    async def close(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        _, writer = conn
        with contextlib.suppress(OSError):
            writer.write(b"\xe0\x00")  # DISCONNECT
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


def _publishes(buf: bytearray, member: Member, now: float) -> int:
    """Count the whole packets at the start of ``buf``; returns where the first partial one
    begins."""
    pos, size = 0, len(buf)
    res = member.res
    while size - pos >= 2:
        first = buf[pos]
        whole = packet_at(buf, pos)
        if whole is None:
            break
        body, pos = whole
        if first >> 4 != 3:
            res.member_other[f"packet type {first >> 4}"] += 1
            continue
        start = 2 + int.from_bytes(body[:2], "big") + (2 if first & 0x06 else 0)
        try:
            reading = cbor2.loads(body[start:])["data"]
            client_id = f"bench-dev-{int(reading['d'])}"
        except (ValueError, KeyError, TypeError, cbor2.CBORError):
            reading, client_id = None, None
        member.reading(client_id, reading, now)
    return pos


def run_mosquitto_ingest(cfg: IngestConfig) -> IngestResult:
    """Start Mosquitto, measure device ingest through it, stop it."""
    res = IngestResult(cfg)
    exe = mosquitto_binary()
    if exe is None:
        res.error = "no mosquitto binary (Debian's mosquitto package)"
        return res
    tmp = Path(tempfile.mkdtemp(prefix="rtnode-bench-mosquitto-"))
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nmax_inflight_messages 0\nlog_dest none\n")
    log = open(tmp / "mosquitto.log", "wb")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    try:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                res.error = f"mosquitto exited with {proc.returncode} at start"
                return res
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                res.error = f"mosquitto not listening within {SETUP_TIMEOUT_S:.0f} s"
                return res
            time.sleep(0.05)
        workers: list[int] = []

        def probe() -> dict[str, Any]:
            return {"server": cpu_seconds(proc.pid),
                    "member (benchmark process)": time.process_time(),
                    f"device processes ({len(workers)})": sum(cpu_seconds(p) for p in workers)}

        run_loop(measure(res, MqttMember(port), port, probe, workers))
    finally:
        notes: list[str] = []
        stop(proc, "mosquitto", notes)
        res.worker_notes.extend(notes)
        shutil.rmtree(tmp, ignore_errors=True)
    return res
