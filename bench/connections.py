"""The cost of a connection: node memory per idle connection, and connects per second.

One nats-server with JetStream, one node on it (limits on connections lifted), and the plain
``websockets`` server of :mod:`bench.baseline_server`, each a process of its own. The load
generator is a process of its own too (``--clients`` of them): a minimal raw WebSocket client
(asyncio streams, no library) so that its own cost stays small next to the servers'.

Each run, for rtnode then for the baseline (interleaved, ``--runs`` times):

Each run has fresh server processes (one nats-server for all).

1. ``--conns`` connections are opened, ``--concurrency`` at a time. On rtnode each one is
   the upgrade, then one message with ``connect`` (its own token: a user of its own) and
   ``join`` (rooms of ``--room-size`` members), until ``joined`` arrives; on the baseline, the
   upgrade until its ``{"type":"joined"}`` arrives. connects/s = connections / wall time.
   The server's CPU seconds over that phase, per connection, do not depend on what else the
   machine runs (connects/s does: on 2 cores the load generator competes).
2. They are all held, idle; the server's RSS once it settles, minus its RSS before (after a
   warm-up of the same kind, closed again), divided by the connections: memory per idle
   connection. Then they all close.

Progress on stderr, the table on stdout. Run it with ``python -m bench connections``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.nodes import settled_rss_kib
from tests.wsclient import read_server_frame

__all__ = ["main"]

SECRET = "bench-connections-secret-0123456789-0123456789"
_KEY = base64.b64encode(b"rtnode-bench-key").decode()


def _log(msg: str) -> None:
    print(f"[bench connections] {msg}", file=sys.stderr, flush=True)


# -- the load generator (a process of its own) ----------------------------------------------


def _frame(payload: bytes) -> bytes:
    """A masked text frame (mask key 0: the payload goes as is, RFC 6455 allows any key)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer


async def _open(host: str, port: int, path: str, first: bytes | None, until: bytes) -> _Conn:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: rtnode.v1.json\r\n\r\n".encode())
    if first is not None:  # the client's first message may follow the upgrade at once
        writer.write(_frame(first))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        status = head.split(b"\r\n", 1)[0]
        raise RuntimeError(f"upgrade refused: {status!r}")
    while True:
        opcode, payload = await read_server_frame(reader)
        if opcode == 0x8:
            raise RuntimeError(f"closed: {payload[2:]!r}")
        if opcode == 0x9:  # a ping: pong
            writer.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            continue
        if until in payload:
            return _Conn(reader, writer)
        if b'"error"' in payload or b'"disconnect"' in payload:
            raise RuntimeError(payload[:200].decode(errors="replace"))


async def _client(args: argparse.Namespace) -> None:
    """Open ``--n`` connections, print the wall time, hold them until stdin closes."""
    from node.protocol.tokens import mint_token

    host, port = "127.0.0.1", args.port
    firsts: list[bytes | None] = []
    for i in range(args.n):
        if args.kind == "rtnode":
            sub = f"{args.prefix}-{i}"
            tok = mint_token(SECRET, sub=sub, rooms={"*": ["join", "publish"]}, ttl_s=3600,
                             kind=args.token_kind)
            room = f"{args.prefix}-room-{i // args.room_size}"
            firsts.append(json.dumps({"type": "connect", "token": tok}).encode() + b"\n"
                          + json.dumps({"type": "join", "id": 1, "room": room}).encode())
        else:
            firsts.append(None)
    until = b'"joined"'
    path = "/ws" if args.kind == "rtnode" else "/"
    conns: list[_Conn] = []
    sem = asyncio.Semaphore(args.concurrency)
    errors: list[str] = []

    async def one(first: bytes | None) -> None:
        async with sem:
            try:
                conns.append(await asyncio.wait_for(_open(host, port, path, first, until), 30))
            except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    await asyncio.gather(*(one(f) for f in firsts))
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": wall, "ok": len(conns), "errors": errors[:3],
                      "failed": len(errors)}), flush=True)

    async def pong(c: _Conn) -> None:  # keep idle connections answering the server's pings
        try:
            while True:
                opcode, payload = await read_server_frame(c.reader)
                if opcode == 0x9:
                    c.writer.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
        except (OSError, asyncio.IncompleteReadError):
            pass

    readers = [asyncio.create_task(pong(c)) for c in conns]
    await asyncio.to_thread(sys.stdin.readline)  # the benchmark says when
    for t in readers:
        t.cancel()
    for c in conns:
        c.writer.close()
    print(json.dumps({"closed": len(conns)}), flush=True)


def _client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.connections client")
    p.add_argument("--kind", choices=("rtnode", "baseline"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--room-size", type=int, default=100)
    p.add_argument("--prefix", default="c")
    p.add_argument("--token-kind", default="user")
    from bench.procs import run_loop

    run_loop(_client(p.parse_args(argv)))
    return 0


# -- the benchmark ----------------------------------------------------------------------------


class _Clients:
    """``count`` load-generator processes sharing ``n`` connections."""

    def __init__(self, kind: str, port: int, n: int, count: int, concurrency: int,
                 room_size: int, prefix: str, token_kind: str = "user") -> None:
        from bench.procs import die_with_parent

        self.procs: list[subprocess.Popen[str]] = []
        share = [n // count + (1 if i < n % count else 0) for i in range(count)]
        for i, k in enumerate(share):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.connections", "client", "--kind", kind,
                 "--port", str(port), "--n", str(k), "--concurrency",
                 str(max(1, concurrency // count)), "--room-size", str(room_size),
                 "--prefix", f"{prefix}-{i}", "--token-kind", token_kind],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                cwd=Path(__file__).resolve().parent.parent, preexec_fn=die_with_parent))

    async def opened(self, timeout: float) -> tuple[float, int, list[str]]:
        """(longest wall time, connections failed, first errors)."""
        results = await asyncio.wait_for(asyncio.gather(
            *(asyncio.to_thread(p.stdout.readline) for p in self.procs  # type: ignore[union-attr]
              )), timeout)
        parsed = [json.loads(r) for r in results if r.strip()]
        if len(parsed) != len(self.procs):
            raise RuntimeError("a load generator exited early")
        return (max(r["wall_s"] for r in parsed), sum(r["failed"] for r in parsed),
                [e for r in parsed for e in r["errors"]])

    async def close(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            try:
                assert p.stdin is not None
                p.stdin.write("close\n")
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                await asyncio.to_thread(p.wait, timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


async def _measure(kind: str, port: int, pid: int, args: argparse.Namespace, tag: str
                   ) -> tuple[float, float, float]:
    """(connects/s, KB per idle connection, server CPU ms per connect) of one run against one
    server."""
    from bench.procs import cpu_seconds

    warm = _Clients(kind, port, min(200, args.conns), 1, args.concurrency, args.room_size,
                    f"{tag}-warm", args.token_kind)
    await warm.opened(args.timeout)
    await warm.close()
    await asyncio.sleep(1.5)  # rooms without members stop after room_idle_s
    before = await settled_rss_kib(pid)
    clients = _Clients(kind, port, args.conns, args.clients, args.concurrency, args.room_size,
                       tag, args.token_kind)
    try:
        cpu0 = cpu_seconds(pid)
        wall, failed, errors = await clients.opened(args.timeout)
        cpu = cpu_seconds(pid) - cpu0
        if failed:
            raise RuntimeError(f"{kind}: {failed} connections failed, e.g. {errors}")
        after = await settled_rss_kib(pid)
    finally:
        await clients.close()
    rate, kb = args.conns / wall, (after - before) * 1024 / args.conns / 1000
    ms = cpu * 1000 / args.conns
    _log(f"{kind} ({tag}): {args.conns} in {wall:.2f} s = {rate:.0f}/s, server CPU {ms:.2f} ms "
         f"each; RSS {before} -> {after} KiB = {kb:.1f} KB per connection")
    return rate, kb, ms


def _span(xs: list[float], fmt: str) -> str:
    med = statistics.median(xs)
    return f"{med:{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


async def _run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    from bench.procs import spawn, stop, wait_line
    from tests.servers import NatsProcess, NodeProcess, free_ports

    tmp = Path(tempfile.mkdtemp(prefix="rtnode-bench-connections-"))
    server = NatsProcess(tmp / "nats")
    notes: list[str] = []
    big = str(max(100_000, 2 * args.conns))
    results: dict[str, list[tuple[float, float, float]]] = {"rtnode": [], "baseline": []}
    try:
        await asyncio.to_thread(server.start)
        # Fresh servers each run: a process's RSS does not shrink back once its connections
        # are gone (the allocator keeps its high-water mark), so a second run would read ~0.
        for run in range(args.runs):
            node: NodeProcess | None = None
            base: Any = None
            try:
                node = NodeProcess(
                    tmp / f"node{run}", "--nats-url", server.url, "--max-connections", big,
                    "--max-connections-per-ip", big, "--peer-failures-per-min", big,
                    name=f"bench-conns-{run}", env={"RTNODE_JWT_SECRET": SECRET})
                node.start()
                await asyncio.to_thread(node.wait_ready, 30)
                (bport,) = free_ports(1)
                blog = tmp / f"baseline{run}.log"
                base = spawn([sys.executable, "-m", "bench.baseline_server", "--port",
                              str(bport)], blog, dict(os.environ))
                if not await asyncio.to_thread(wait_line, blog, "baseline ready", base, 30):
                    raise RuntimeError("the baseline server did not start")
                assert node.proc is not None
                results["rtnode"].append(
                    await _measure("rtnode", node.http_port, node.proc.pid, args, f"r{run}"))
                results["baseline"].append(
                    await _measure("baseline", bport, base.pid, args, f"r{run}"))
            finally:
                if node is not None:
                    await asyncio.to_thread(node.stop)
                if base is not None:
                    stop(base, "baseline", notes)
        rows: list[tuple[str, str, str]] = []
        for what, i, fmt in (("connects/s (handshake + token + join)", 0, ".0f"),
                             ("KB per idle connection, connected and joined", 1, ".1f"),
                             ("server CPU ms per connect (CPU s / connections)", 2, ".3f")):
            rows.append((what, _span([r[i] for r in results["rtnode"]], fmt),
                         _span([r[i] for r in results["baseline"]], fmt)))
        return rows
    finally:
        server.stop()
        for n in notes:
            _log(n)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "client":
        return _client_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench connections", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", type=int, default=2000, help="connections per run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each server, interleaved")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="connections being opened at a time")
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument("--room-size", type=int, default=100, help="members per room")
    parser.add_argument("--token-kind", choices=("user", "service"), default="user",
                        help="the tokens' kind: a user has a personal room (@user:<sub>) and an "
                             "rpc route of its own; a service has neither")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound of each phase (s)")
    args = parser.parse_args(argv)
    try:
        rows = asyncio.run(_run(args))
    except (RuntimeError, TimeoutError, AssertionError, OSError) as exc:
        print(f"bench connections: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"the cost of a connection ({args.conns} connections, {args.concurrency} opening at "
          f"a time, {args.clients} load generator process(es); median (min-max) of "
          f"{args.runs} runs; python -m bench connections)")
    w = max(len(r[0]) for r in rows)
    print(f"{'':<{w}}  {'rtnode':>22}  {'websockets (baseline)':>22}")
    for what, a, b in rows:
        print(f"{what:<{w}}  {a:>22}  {b:>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
