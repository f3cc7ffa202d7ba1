"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from actors import ActorSystem
from bridge.http_guard import open_files, open_files_limit
from bridge.mqtt_uplinks import REASONS

__all__ = ["CONTENT_TYPE", "NodeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ActorCollector(Collector):
    """Reads the actor system's counters at scrape time: nothing is counted twice."""

    def __init__(self, system: ActorSystem) -> None:
        self._system = system

    def collect(self) -> Iterator[Metric]:
        stats = self._system.stats()
        gauges = {
            "actors": GaugeMetricFamily("rtnode_actors", "Live actors", labels=["kind"]),
            "mailbox_depth": GaugeMetricFamily(
                "rtnode_actor_mailbox_depth", "Messages queued in mailboxes", labels=["kind"]
            ),
        }
        counters = {
            name: CounterMetricFamily(f"rtnode_actor_{name}", help_, labels=["kind"])
            for name, help_ in (
                ("handled", "Messages handled by actors"),
                ("failures", "Actor handler failures"),
                ("restarts", "Actor restarts by supervision"),
                ("overflows", "Messages refused or dropped by a full mailbox"),
                ("escalations", "Actors stopped after too many restarts"),
            )
        }
        for kind, s in sorted(stats.items()):
            for name, family in gauges.items():
                family.add_metric([kind], getattr(s, name))
            for name, cfamily in counters.items():
                cfamily.add_metric([kind], getattr(s, name))
        yield from gauges.values()
        yield from counters.values()


class _NodeCollector(Collector):
    def __init__(self, node: Any) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node
        up = GaugeMetricFamily("rtnode_nats_connected", "1 when the NATS connection is up")
        up.add_metric([], 1.0 if node.nats is not None and node.nats.connected else 0.0)
        yield up
        conns = GaugeMetricFamily(
            "rtnode_connections", "Open client connections", labels=["transport", "codec"]
        )
        if node.ws is not None:
            for codec, n in sorted(node.ws.open.items()):
                conns.add_metric(["ws", codec], n)
        if node.mqtt is not None:
            conns.add_metric(["mqtt", "cbor"], len(node.mqtt.sessions))
        yield conns
        if node.mqtt is not None:
            for name, help_, value in (
                ("rtnode_mqtt_uplinks", "Plain-topic uplinks stored", node.mqtt.uplinks),
                ("rtnode_mqtt_refused_publishes", "MQTT publishes refused and dropped",
                 node.mqtt.refused_publishes),
                ("rtnode_mqtt_refused_subscribes", "MQTT subscriptions refused (SUBACK 0x80)",
                 node.mqtt.refused_subscribes),
                ("rtnode_mqtt_bad_payloads", "MQTT payloads that were not valid frames",
                 node.mqtt.bad_payloads),
            ):
                fam = CounterMetricFamily(name, help_)
                fam.add_metric([], value)
                yield fam
        sources = [s.refusals for s in (node.mqtt, node.mqtt_external) if s is not None]
        if sources:
            fam = CounterMetricFamily(
                "rtnode_mqtt_uplinks_refused",
                "MQTT uplinks refused, acknowledged and dropped, by reason (see "
                "bridge.mqtt_uplinks.REASONS); each reported in the log and to the device at "
                "most once per device and reason per 10 s", labels=["reason"])
            for reason in REASONS:
                fam.add_metric([reason], sum(src.counts[reason] for src in sources))
            yield fam
        if node.mqtt_external is not None:
            fam = CounterMetricFamily(
                "rtnode_broker_refused_uplinks",
                "External broker uplinks refused for a topic naming no valid device id",
                labels=["reason"])
            for reason, n in sorted(node.mqtt_external.refused_topics.items()):
                fam.add_metric([reason], n)
            yield fam
        ctx = node.ctx
        if ctx is None:
            return
        rooms = GaugeMetricFamily("rtnode_rooms_active", "Room actors on this node")
        rooms.add_metric([], node.system.stats().get("room").actors
                         if "room" in node.system.stats() else 0)
        yield rooms
        c = ctx.counters
        for name, help_, value in (
            ("rtnode_events_in", "Room events received from the live feed", c.events_in),
            ("rtnode_events_delivered", "Event frames pushed to members", c.delivered),
            ("rtnode_events_replayed", "Events replayed by recoveries", c.replayed),
            ("rtnode_gap_repairs", "Live gaps repaired from the stream", c.gap_repairs),
            ("rtnode_recovery_reads", "Store requests made for recovering joins",
             c.recovery_reads),
            ("rtnode_recovery_batches", "Batches of recovering joins (one read serves each)",
             c.recovery_batches),
            ("rtnode_live_dropped", "Live messages dropped by a full room mailbox", c.live_dropped),
            ("rtnode_events_undeliverable", "Stored events skipped: not an event map",
             c.undeliverable),
            ("rtnode_published", "Events stored by publishes of this node, every door",
             ctx.admission.stats.published),
            ("rtnode_slow_consumer_disconnects", "Connections cut as slow consumers",
             ctx.slow_consumers),
            ("rtnode_rate_limited", "Publishes refused by the rate limit",
             ctx.admission.stats.rate_limited),
            ("rtnode_paced_requests", "Heavy requests (history, presence, rpc, joins that "
             "start a room) that waited for their connection's turn", ctx.paced),
            ("rtnode_volatile_failed", "Volatile events not sent (NATS unavailable)",
             ctx.admission.stats.volatile_failed),
        ):
            fam = CounterMetricFamily(name, help_)
            fam.add_metric([], value)
            yield fam
        releases = CounterMetricFamily(
            "rtnode_memory_releases", "Times memory was given back after connections went "
            "(a full collection and malloc_trim)")
        releases.add_metric([], node.memory_releases)
        yield releases
        outcomes = CounterMetricFamily(
            "rtnode_publishes", "Publishes by door and outcome (stored, duplicate, volatile, "
            "or the refusal code)", labels=["door", "outcome"])
        for (door, outcome), n in sorted(ctx.admission.stats.counts.items()):
            outcomes.add_metric([door, outcome], n)
        yield outcomes
        if node.store is not None:
            for name, help_, value in (
                ("rtnode_jetstream_retries", "JetStream publish retries", node.store.retries),
                ("rtnode_jetstream_errors", "JetStream publishes that failed", node.store.errors),
                ("rtnode_store_batches", "Atomic batches of publishes stored (group commit)",
                 node.store.batches),
                ("rtnode_store_batched", "Events stored in atomic batches", node.store.batched),
                ("rtnode_store_batches_undone", "Atomic batches not stored as one, their "
                 "events sent again one by one", node.store.batches_undone),
                ("rtnode_store_leader_reads", "Reads answered by the stream leader (checks)",
                 node.store.leader_reads),
                ("rtnode_store_stale_reads", "Reads a lagging replica cut short, completed "
                 "from the leader", node.store.stale_reads),
                ("rtnode_store_read_retries", "Direct gets asked again because no server "
                 "answered (503: a stream just created, replicas changing)",
                 node.store.direct_retries),
            ):
                fam = CounterMetricFamily(name, help_)
                fam.add_metric([], value)
                yield fam


class _HttpCollector(Collector):
    """The HTTP port's edge: open connections, refusals and head deadlines, descriptors."""

    def __init__(self, node: Any) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        http = self._node.http
        if http is None:
            return
        guard = http.guard
        for name, help_, value in (
            ("rtnode_http_connections", "Open HTTP connections (WebSocket and SSE included)",
             guard.open),
            ("rtnode_http_peers", "Peer addresses with an open HTTP connection", guard.peers),
            ("rtnode_http_connections_max", "Open HTTP connections allowed by the descriptor "
             "limit", guard.max_open),
            ("rtnode_open_fds_limit", "The process's descriptor limit (soft RLIMIT_NOFILE)",
             open_files_limit()),
            ("rtnode_open_fds", "Descriptors open in the process", open_files()),
        ):
            g = GaugeMetricFamily(name, help_)
            g.add_metric([], value)
            yield g
        accepted = CounterMetricFamily("rtnode_http_accepted", "HTTP connections admitted")
        accepted.add_metric([], guard.accepted)
        yield accepted
        refused = CounterMetricFamily(
            "rtnode_http_refused", "HTTP connections refused at once (503), by reason: "
            "per_peer (max_connections_per_ip) or descriptors (the descriptor limit)",
            labels=["reason"])
        for reason in ("per_peer", "descriptors"):
            refused.add_metric([reason], guard.refused[reason])
        yield refused
        timeouts = CounterMetricFamily(
            "rtnode_http_head_timeouts",
            "HTTP connections closed (408) without a request head in http_header_timeout_s")
        timeouts.add_metric([], guard.head_timeouts)
        yield timeouts


class _Latency(Collector):
    """A histogram observed once per stored event: plain counts, summed into the exposition
    at scrape time (prometheus_client's Histogram takes a lock for its sum and one for the
    bucket, ~1.2 us an observation; this is a bisect and two additions, ~0.2 us: the loop is
    one thread)."""

    def __init__(self, name: str, help_: str, bounds: tuple[float, ...]) -> None:
        self.name, self.help = name, help_
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def collect(self) -> Iterator[Metric]:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts,
                                strict=True):
            total += count
            buckets.append((bound, total))
        family = HistogramMetricFamily(self.name, self.help)
        family.add_metric([], buckets, self.sum)
        yield family


class _GaugeFn(Collector):
    def __init__(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        self._name, self._help, self._fn = name, help_, fn

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(self._name, self._help)
        g.add_metric([], self._fn())
        yield g


class NodeMetrics:
    """The metrics registry of one node.

    Args:
        system: The actor system whose counters are exported.
    """

    def __init__(self, system: ActorSystem) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ActorCollector(system))

    def node_gauges(self, node: Any) -> None:
        """Export the node's connection, room and store figures (read at scrape time)."""
        self.registry.register(_NodeCollector(node))
        self.registry.register(_HttpCollector(node))
        self.publish_latency = _Latency(
            "rtnode_publish_stored_seconds",
            "Time from a publish's admission to its JetStream ack, every door",
            (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.registry.register(self.publish_latency)
        node.ctx.admission.stats.latency = self.publish_latency.observe

    def gauge_fn(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        """Export ``fn()`` as a gauge read at scrape time."""
        self.registry.register(_GaugeFn(name, help_, fn))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))
