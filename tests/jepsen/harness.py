"""The fault test's run: servers, load, nemesis, the truth read back, the verdict.

Topology (everything on 127.0.0.1, free ports, one temporary directory):

- a 3-server NATS cluster (:class:`tests.cluster.NatsCluster`); the room stream is R3;
- node A reaches all three servers directly; node B reaches them only through three
  :class:`tests.cluster.TcpProxy` (one per server), so its NATS link can be cut;
- ``publishers`` raw clients publishing to ``rooms`` rooms with unique ``msg_id``s (retried),
  and ``subscribers`` raw clients in every room, churned (closed and reopened on the next node,
  rejoining with ``since``/``epoch``); a share ``kick`` of them also reconnects right after
  each heal, when a replica may still be behind.

Phases: start; subscribers join; publishers start; the nemesis injects faults for
``seconds`` (one at a time, healed in between); ``settle_s`` of load after the last heal;
publishers stop (each open publish ends by its deadline); churn stops (subscribers reconnect
one last time if needed and stay); the truth is read from JetStream (up to the last seq the
stream leader answers for each room); the subscribers get ``final_timeout_s`` to have every
stored event; the replicas are compared; :func:`tests.jepsen.checker.check` judges.
Every wait is bounded, so a broken node fails with a report instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NotFoundError

from node.nats_server import free_port
from node.protocol.frames import cbor_loads_strict
from node.protocol.subjects import STREAM_NAME, room_subject
from tests.cluster import NatsCluster, TcpProxy
from tests.jepsen.checker import Report, Stored, check
from tests.jepsen.clients import Publisher, Subscriber
from tests.jepsen.nemesis import KINDS, Nemesis
from tests.servers import NodeProcess
from tests.wsclient import SECRET, unique

__all__ = ["Config", "read_truth", "run"]

NODE_ARGS = ["--stream-replicas", "3", "--rate-per-s", "1000000", "--rate-burst", "1000000",
             "--history-size", "1000000", "--drain-timeout-s", "1"]


def _pair(text: str | None, default: tuple[float, float]) -> tuple[float, float]:
    if not text:
        return default
    low, high = (float(x) for x in text.split(","))
    return low, high


@dataclass
class Config:
    """What one run does. :meth:`from_env` reads the ``RTNODE_JEPSEN_*`` overrides."""

    seconds: float = 30.0  # of faults
    seed: int = 0
    rooms: int = 3
    publishers: int = 4
    subscribers: int = 4
    rate: float = 30.0  # publishes per second, per publisher
    window: int = 4  # publishes in flight, per publisher
    op_timeout_s: float = 8.0  # a publish retries until then, then is "unknown"
    churn_s: tuple[float, float] = (1.0, 3.0)  # a subscriber's connection lasts
    downtime_s: tuple[float, float] = (0.1, 1.0)  # and is reopened after
    gap_s: tuple[float, float] = (1.0, 3.0)  # quiet time between faults
    kick: float = 0.5  # share of subscribers reconnecting right after each heal
    settle_s: float = 3.0
    final_timeout_s: float = 15.0
    kinds: tuple[str, ...] = KINDS

    @classmethod
    def from_env(cls, seconds: float = 30.0) -> Config:
        env = os.environ
        seed = env.get("RTNODE_JEPSEN_SEED")
        kinds = tuple(k for k in env.get("RTNODE_JEPSEN_FAULTS", "").split(",") if k) or KINDS
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"RTNODE_JEPSEN_FAULTS: unknown kinds {sorted(unknown)}; "
                             f"known: {KINDS}")
        return cls(
            seconds=float(env.get("RTNODE_JEPSEN_SECONDS") or seconds),
            seed=int(seed) if seed else random.SystemRandom().randrange(2**31),
            rate=float(env.get("RTNODE_JEPSEN_RATE") or cls.rate),
            churn_s=_pair(env.get("RTNODE_JEPSEN_CHURN_S"), cls.churn_s),
            gap_s=_pair(env.get("RTNODE_JEPSEN_GAP_S"), cls.gap_s),
            kick=float(env.get("RTNODE_JEPSEN_KICK") or cls.kick),
            kinds=kinds,
        )

    @property
    def budget_s(self) -> float:
        """The longest a run may take, start and checks included (teardown comes on top)."""
        return self.seconds + 55.0


async def read_truth(urls: list[str], rooms: list[str], timeout: float = 30.0,
                     ) -> tuple[list[Stored], dict[str, int]]:
    """Every stored event of ``rooms``, read straight from JetStream, and each room's last seq.

    The last seq of each room comes from the stream leader (``STREAM.MSG.GET``, which only the
    leader answers); the events come from batched direct gets, asked again from the last seq
    read until that seq is reached (a replica that is behind answers a prefix: never wrong,
    only short).
    """
    async def quiet(exc: Exception) -> None:
        pass

    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=5,
                            reconnect_time_wait=0.5, error_cb=quiet)
    out: list[Stored] = []
    lasts: dict[str, int] = {}
    try:
        js = nc.jetstream(timeout=5)
        deadline = time.monotonic() + timeout
        for room in rooms:
            subject = room_subject("default", room)
            while True:  # the leader may still be settling: ask again until the deadline
                try:
                    last = (await js.get_last_msg(STREAM_NAME, subject)).seq or 0
                    break
                except NotFoundError:
                    last = 0
                    break
                except Exception as exc:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"truth read: the stream leader did not answer "
                                             f"for {room}: {exc!r}") from None
                    await asyncio.sleep(0.5)
            lasts[room] = last
            got: list[Stored] = []
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            try:
                while (got[-1].seq if got else 0) < last:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"truth read stuck in {room} at "
                                             f"{got[-1:]} of {last}")
                    after = got[-1].seq if got else 0
                    request = {"seq": after + 1, "next_by_subj": subject, "batch": 500}
                    await nc.publish(f"$JS.API.DIRECT.GET.{STREAM_NAME}",
                                     json.dumps(request).encode(), reply=inbox)
                    while True:  # one batch: messages, then a status (204 end, 404 none)
                        try:
                            msg = await sub.next_msg(timeout=5)
                        except NatsTimeout:
                            break  # asked again from the last seq read
                        headers = msg.headers or {}
                        if "Status" in headers:
                            break
                        seq = int(headers["Nats-Sequence"])
                        if got and seq <= got[-1].seq:
                            continue  # a late answer to an earlier request
                        event = cbor_loads_strict(msg.data)
                        mid = event.get("msg_id") if isinstance(event, dict) else None
                        got.append(Stored(room, seq, mid))
            finally:
                await sub.unsubscribe()
            out.extend(got)
    finally:
        await nc.close()
    return out, lasts


async def _replicas_agree(cluster: NatsCluster, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    states: dict[str, Any] = {}
    while time.monotonic() < deadline:
        states = await asyncio.to_thread(cluster.stream_states, STREAM_NAME)
        values = set(states.values())
        if len(states) == len(cluster.servers) and len(values) == 1 and None not in values:
            return f"yes {values.pop()}"
        await asyncio.sleep(0.3)
    return f"NO after {timeout:.0f} s: {states}"


async def _wait_all(subs: list[Subscriber], stored: dict[str, list[int]],
                    timeout: float) -> float | None:
    """Seconds until every subscriber has every stored event above its first cursor."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(s.missing(stored) == 0 for s in subs):
            return time.monotonic() - start
        for s in subs:
            s.progress.clear()
        waits = [asyncio.create_task(s.progress.wait()) for s in subs]
        await asyncio.wait(waits, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    return None


async def _wait_joined(subs: list[Subscriber], rooms: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(set(rooms) <= set(s.first) for s in subs):
            return True
        await asyncio.sleep(0.1)
    return False


def _spans(times: list[tuple[float, str]], t0: float, most: int = 10) -> str:
    """Troubles grouped into spans (less than 2 s apart), in seconds from ``t0``."""
    spans: list[tuple[float, float, Counter[str]]] = []
    for at, kind in sorted(times):
        if spans and at - spans[-1][1] <= 2.0:
            spans[-1] = (spans[-1][0], at, spans[-1][2])
        else:
            spans.append((at, at, Counter()))
        spans[-1][2][kind] += 1
    parts = [f"{a - t0:.1f}-{b - t0:.1f} s {dict(c)}" for a, b, c in spans[:most]]
    more = f"; {len(spans) - most} more" if len(spans) > most else ""
    return "; ".join(parts) + more if parts else "none"


def _log_counts(node: NodeProcess) -> str:
    try:
        text = node.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return "no log"
    counts = Counter(level for line in text.splitlines()
                     for level in ("ERROR", "WARNING", "Traceback") if level in line)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "clean"


@dataclass
class _Run:
    cfg: Config
    tmp: Path
    cluster: NatsCluster
    proxies: list[TcpProxy] = field(default_factory=list)
    nodes: list[NodeProcess] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await asyncio.to_thread(self.cluster.start, 20.0)
        for s in self.cluster.servers:
            self.proxies.append(await TcpProxy(free_port(), "127.0.0.1", s.port).start())
        env = {"RTNODE_JWT_SECRET": SECRET}
        direct = ",".join(self.cluster.urls)
        proxied = ",".join(p.url for p in self.proxies)
        self.nodes = [
            NodeProcess(self.tmp / "ja", "--nats-url", direct, *NODE_ARGS, name="ja", env=env),
            NodeProcess(self.tmp / "jb", "--nats-url", proxied, *NODE_ARGS, name="jb", env=env),
        ]
        for node in self.nodes:  # the node refuses RTNODE_* settings it does not know
            node.env = {k: v for k, v in node.env.items() if not k.startswith("RTNODE_JEPSEN_")}
            node.start()
        for node in self.nodes:
            await asyncio.to_thread(node.wait_ready, 40)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        await asyncio.gather(*(asyncio.to_thread(n.stop) for n in self.nodes),
                             return_exceptions=True)
        for proxy in self.proxies:
            await proxy.stop()
        await asyncio.to_thread(self.cluster.stop)


async def run(tmp: Path, cfg: Config, say: Any = print) -> Report:
    """One whole run; returns the checker's report (with the run's figures and timeline)."""
    t0 = time.monotonic()
    rng = random.Random(cfg.seed)
    say(f"[jepsen] seed {cfg.seed} (RTNODE_JEPSEN_SEED={cfg.seed} repeats the choices), "
        f"{cfg.seconds:.0f} s of faults {list(cfg.kinds)}")
    r = _Run(cfg, tmp, NatsCluster(tmp))
    try:
        await r.start()
        started_s = time.monotonic() - t0
        rooms = [unique("jp") for _ in range(cfg.rooms)]
        urls = [n.ws_url for n in r.nodes]
        subs = [Subscriber(f"jsub{i}", urls, rooms, random.Random(rng.getrandbits(64)),
                           churn_s=cfg.churn_s, downtime_s=cfg.downtime_s, start=i)
                for i in range(cfg.subscribers)]
        pubs = [Publisher(f"jpub{i}", urls, rooms, random.Random(rng.getrandbits(64)),
                          rate=cfg.rate, window=cfg.window, op_timeout_s=cfg.op_timeout_s,
                          start=i) for i in range(cfg.publishers)]
        stop_subs, churn, stop_pubs = asyncio.Event(), asyncio.Event(), asyncio.Event()
        churn.set()
        sub_tasks = [asyncio.create_task(s.run(stop_subs, churn)) for s in subs]
        r.tasks += sub_tasks
        joined = await _wait_joined(subs, rooms, 15)
        max_ops = int(cfg.rate * (cfg.seconds + cfg.settle_s + 60) * 1.5)
        pub_tasks = [asyncio.create_task(p.run(stop_pubs, max_ops)) for p in pubs]
        r.tasks += pub_tasks
        await asyncio.sleep(1.0)  # load before the first fault
        kick_rng = random.Random(rng.getrandbits(64))

        async def kick_some() -> None:  # rejoins right after each heal
            await asyncio.gather(*(s.kick() for s in subs if kick_rng.random() < cfg.kick))

        nemesis = Nemesis(random.Random(rng.getrandbits(64)), r.cluster, r.proxies, r.nodes,
                          kinds=cfg.kinds, gap_s=cfg.gap_s, on_heal=kick_some)
        fault_t0 = time.monotonic()
        # Every later phase is bounded by what is left of the budget (a broken node makes
        # the run fail with its report, not hang): 10 s are kept for the checks.
        end = t0 + cfg.budget_s - 10

        def left(most: float, least: float = 1.0) -> float:
            return max(least, min(most, end - time.monotonic()))

        await nemesis.run(cfg.seconds, deadline=end - 25)
        await asyncio.sleep(left(cfg.settle_s, 0.0))  # load on the healed cluster
        stop_pubs.set()
        await asyncio.wait(pub_tasks, timeout=left(cfg.op_timeout_s + 2))
        churn.clear()
        truth, lasts = await read_truth(r.cluster.urls, rooms, timeout=left(15, 5))
        stored: dict[str, list[int]] = {room: [] for room in rooms}
        for s in truth:
            stored[s.room].append(s.seq)
        caught_up = await _wait_all(subs, stored, left(cfg.final_timeout_s))
        stop_subs.set()
        await asyncio.wait(sub_tasks, timeout=3)
        agree = await _replicas_agree(r.cluster, left(5))
        publishes = [p for pub in pubs for p in pub.records]
        report = check(publishes, truth, [s.history for s in subs],
                       healed_at=nemesis.healed_at)
        if not joined:
            report.problems.append("not every subscriber joined every room within 15 s")
        for f in nemesis.faults:
            if f.healthy is None:
                report.problems.append(
                    f"not healthy again {nemesis.heal_timeout_s:.0f} s after {f.kind} "
                    f"{f.target} was healed (at {f.healed - fault_t0:.1f} s):{f.note}")
        if not agree.startswith("yes"):
            report.problems.append(f"replicas disagree: {agree}")
        errors: Counter[str] = sum((p.errors for p in pubs), Counter())
        failures: Counter[str] = sum((s.failures for s in subs), Counter())
        report.figures.update({
            "seed": cfg.seed,
            "faults": f"{len(nemesis.faults)} {nemesis.counts()}",
            "slowest return to healthy after a heal": nemesis.slowest(),
            "publish rate": f"{cfg.rate:g}/s x {cfg.publishers}, window {cfg.window}",
            "longest publish (first attempt to ack)":
                f"{max((p.longest_ack_s for p in pubs), default=0):.2f} s",
            "publish errors": dict(errors),
            "publisher connections": sum(p.conn.opened for p in pubs),
            "subscriber connections": (f"{sum(s.connections for s in subs)} "
                                       f"({sum(s.kicks for s in subs)} right after a heal)"),
            "subscriber failures": dict(failures),
            "stream last seq per room": lasts,
            "replicas agree": agree,
            "caught up after the load stopped":
                "NO (timed out)" if caught_up is None else f"{caught_up:.2f} s",
            "node logs": {n.name: _log_counts(n) for n in r.nodes},
            "run": f"{time.monotonic() - t0:.0f} s (start {started_s:.0f} s)",
        })
        report.log = [f.describe(fault_t0) for f in nemesis.faults]
        report.log.append("publish troubles: " + _spans(
            [t for p in pubs for t in p.errors.times], fault_t0))
        report.log.append("subscriber troubles: " + _spans(
            [t for s in subs for t in s.failures.times], fault_t0))
        if not report.ok:
            report.log.append(f"node logs: {[str(n.log_path) for n in r.nodes]}")
        return report
    finally:
        await r.stop()
