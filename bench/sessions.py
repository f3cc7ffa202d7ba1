"""Persistent MQTT sessions: how many a node holds, what one costs it, how fast one resumes.

One nats-server with JetStream and one node on it (rate limits lifted), both processes of their
own. Measured in one run:

1. **sessions held**: ``--sessions`` devices (bare MQTT 3.1.1 clients, ``tests.cluster.RawMqtt``,
   ``--concurrency`` at a time) CONNECT with ``clean_session = 0``, SUBSCRIBE ``rooms/<room>`` at
   QoS 1 and DISCONNECT. The node's RSS before and after (and so per offline session), the
   nats-server's, and the ``RTNODE_MQTT_SESSIONS`` bucket's keys and bytes. Baseline: the node's
   RSS after as many devices went through the same steps with ``clean_session = 1`` (no session
   kept): what the connections' churn alone leaves (the allocator's high-water mark).
2. **resume**: a device with a session misses ``--missed`` events (stored by a WebSocket
   client), then CONNECTs again: the time from CONNECT to the last of them, PUBACKed one by one
   in order (each checked: every seq once, in order). Baseline: the same events read by a plain
   nats-py JetStream ordered consumer on the room's subject.

Progress on stderr, the table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import cbor2

from bench.nodes import rss_kib, settled_rss_kib
from tests.cluster import RawMqtt
from tests.servers import NatsProcess, NodeProcess
from tests.wsclient import SECRET, RawClient, publish_many, token, unique

__all__ = ["main"]

SESSIONS_BUCKET = "RTNODE_MQTT_SESSIONS"


def _log(msg: str) -> None:
    print(f"[bench sessions] {msg}", file=sys.stderr, flush=True)


async def _session(port: int, dev: str, room: str, *, clean: bool = False) -> None:
    """One device: CONNECT (clean_session = 0 unless ``clean``), SUBSCRIBE at QoS 1,
    DISCONNECT."""
    c = await RawMqtt.connect(port, dev, token(dev, kind="device"), clean=clean)
    if c.return_code != 0:
        raise RuntimeError(f"{dev}: CONNACK {c.return_code}")
    granted = await c.subscribe(f"rooms/{room}", 1)
    if granted != [1]:
        raise RuntimeError(f"{dev}: SUBACK {granted}, expected QoS 1")
    await c.disconnect()


async def _bucket(nats_url: str) -> tuple[int, int] | None:
    """(keys, bytes) of the sessions bucket, or None when it does not exist."""
    import nats

    nc = await nats.connect(nats_url, name="bench-sessions")
    try:
        kv = await nc.jetstream().key_value(SESSIONS_BUCKET)
        state = (await kv.status()).stream_info.state
        return len(await kv.keys()), int(state.bytes)
    except Exception as exc:  # the bucket is missing: the feature is not there
        _log(f"no {SESSIONS_BUCKET} bucket: {type(exc).__name__} {exc}")
        return None
    finally:
        await nc.close()


async def _ordered_baseline(nats_url: str, room: str, seqs: list[int], timeout: float) -> float:
    """Seconds for a nats-py ordered consumer to read the room's stored events."""
    import nats

    from node.protocol.subjects import room_subject

    nc = await nats.connect(nats_url, name="bench-sessions-baseline")
    try:
        js = nc.jetstream()
        done = asyncio.get_running_loop().create_future()
        got: list[int] = []

        async def cb(msg: object) -> None:
            got.append(msg.metadata.sequence.stream)  # type: ignore[attr-defined]
            if len(got) == len(seqs) and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        sub = await js.subscribe(room_subject("default", room), cb=cb, ordered_consumer=True)
        await asyncio.wait_for(done, timeout)
        spent = time.perf_counter() - started
        await sub.unsubscribe()
        if got != seqs:
            raise RuntimeError("the ordered consumer read other seqs than those stored")
        return spent
    finally:
        await nc.close()


async def _resume(node: NodeProcess, nats_url: str, missed: int, timeout: float
                  ) -> tuple[float, float, str]:
    """(resume seconds, nats-py baseline seconds, room)."""
    room = unique("bench-resume")
    dev = "bench-resume-1"
    await _session(node.mqtt_port, dev, room)
    pub = await RawClient.connected(node.ws_url, token("bench-pub"))
    _log(f"storing {missed} events in {room} while {dev} is away")
    seqs: list[int] = []
    for start in range(0, missed, 1000):
        seqs += await publish_many(pub, room, min(1000, missed - start), start)
    await pub.close()
    _log(f"{dev} reconnects")
    started = time.perf_counter()
    c = await RawMqtt.connect(node.mqtt_port, dev, token(dev, kind="device"))
    if not c.session_present:
        raise RuntimeError(f"{dev}: CONNACK without session present")
    got: list[int] = []
    async with asyncio.timeout(timeout):
        while len(got) < missed:
            _, payload, packet_id, _, _, _ = await c.publish_in(timeout)
            c.puback(packet_id)
            got.append(int(cbor2.loads(payload)["seq"]))
    spent = time.perf_counter() - started
    await c.disconnect()
    if got != seqs:
        bad = next(i for i, (a, b) in enumerate(zip(got, seqs, strict=True)) if a != b)
        raise RuntimeError(f"resume out of order at {bad}: got {got[bad]}, stored {seqs[bad]}")
    base = await _ordered_baseline(nats_url, room, seqs, timeout)
    return spent, base, room


async def _run(args: argparse.Namespace) -> list[tuple[str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="rtnode-bench-sessions-"))
    server = NatsProcess(tmp / "nats")
    node: NodeProcess | None = None
    try:
        await asyncio.to_thread(server.start)
        node = NodeProcess(tmp / "node", "--nats-url", server.url, "--rate-per-s", "1000000",
                           "--rate-burst", "1000000",
                           *(["--mqtt-inflight", str(args.inflight)] if args.inflight else []),
                           name="bench-sessions",
                           env={"RTNODE_JWT_SECRET": SECRET})
        node.start()
        await asyncio.to_thread(node.wait_ready, 30)
        assert node.proc is not None and server.proc is not None
        pid, npid = node.proc.pid, server.proc.pid
        room = unique("bench-sessions")
        await _session(node.mqtt_port, "bench-warmup", room)  # the code paths loaded
        rss0, nrss0 = await settled_rss_kib(pid, 2.0, 0.01), rss_kib(npid)
        _log(f"node pid {pid}: RSS {rss0} KiB with no session; nats-server {nrss0} KiB")

        async def devices(prefix: str, clean: bool) -> float:
            sem = asyncio.Semaphore(args.concurrency)
            done = 0

            async def one(i: int) -> None:
                nonlocal done
                async with sem:
                    await _session(node.mqtt_port, f"{prefix}-{i:06d}", room, clean=clean)
                done += 1
                if done % 500 == 0:
                    _log(f"{prefix}: {done}/{args.sessions} devices")

            started = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(args.sessions))),
                                   args.timeout)
            return time.perf_counter() - started

        # The same connections with clean_session = 1 first: what the churn of 2,000 devices
        # leaves in the node's RSS (allocator high-water mark) with no session kept.
        clean_s = await devices("bench-clean", True)
        rss_clean = await settled_rss_kib(pid, 2.0, 0.01)
        _log(f"{args.sessions} clean-session devices came and went; node RSS {rss_clean} KiB")
        made_s = await devices("bench", False)
        rss1, nrss1 = await settled_rss_kib(pid, 2.0, 0.01), rss_kib(npid)
        bucket = await _bucket(server.url)
        _log(f"{args.sessions} sessions in {made_s:.1f} s; node RSS {rss1} KiB")

        resume_s, base_s, _ = await _resume(node, server.url, args.missed, args.timeout)
        per = (rss1 - rss_clean) * 1024 / args.sessions
        rows = [
            ("sessions created (connect, subscribe QoS 1, disconnect)",
             f"{args.sessions} in {made_s:.1f} s ({args.sessions / made_s:.0f}/s)"),
            ("baseline: the same with clean_session = 1 (no session)",
             f"{args.sessions} in {clean_s:.1f} s ({args.sessions / clean_s:.0f}/s)"),
            (f"sessions held ({SESSIONS_BUCKET} keys)",
             "bucket missing" if bucket is None else f"{bucket[0]}"),
            ("session bucket bytes (per session)",
             "-" if bucket is None else
             f"{bucket[1]} ({bucket[1] / max(1, bucket[0]):.0f} B)"),
            ("node RSS with no session (one warm-up device)", f"{rss0 / 1024:.1f} MiB"),
            (f"baseline: node RSS after {args.sessions} clean-session devices",
             f"{rss_clean / 1024:.1f} MiB"),
            (f"node RSS with {args.sessions} offline sessions too", f"{rss1 / 1024:.1f} MiB"),
            ("node RSS per offline session (difference / sessions)", f"{per:.0f} B"),
            ("nats-server RSS before / after", f"{nrss0 / 1024:.1f} / {nrss1 / 1024:.1f} MiB"),
            (f"resume: {args.missed} missed events, CONNECT to the last "
             f"(window {args.inflight or 32})",
             f"{resume_s * 1000:.0f} ms ({args.missed / resume_s:.0f} events/s)"),
            (f"baseline: nats-py ordered consumer, same {args.missed}",
             f"{base_s * 1000:.0f} ms ({args.missed / base_s:.0f} events/s)"),
        ]
        return rows
    finally:
        if node is not None:
            node.stop()
        server.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sessions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000, help="offline sessions made")
    parser.add_argument("--missed", type=int, default=10_000,
                        help="events a device misses before it resumes")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="devices connecting at a time")
    parser.add_argument("--inflight", type=int, default=0,
                        help="the node's mqtt_inflight (0: its default, 32)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound of each phase (s)")
    args = parser.parse_args(argv)
    try:
        rows = asyncio.run(_run(args))
    except (RuntimeError, TimeoutError, AssertionError, OSError) as exc:
        print(f"bench sessions: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("persistent MQTT sessions (one node, one nats-server, loopback; "
          "python -m bench sessions)")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
