"""What an ingest run found, and its report: rates, latencies, and every event accounted for."""

from __future__ import annotations

import os
import platform
from collections import Counter
from dataclasses import dataclass, field

from bench.ingest_devices import DeviceReport, IngestConfig
from bench.nodes import RunOutcome
from bench.report import counter_lines, ms, output_lines, pct, ranges

__all__ = ["IngestResult", "report"]


@dataclass
class IngestResult(RunOutcome):
    """Figures of one run."""

    config: IngestConfig
    devices: list[DeviceReport] = field(default_factory=list)
    ack_latencies: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # publish -> received by the member
    seen: list[bytearray] = field(default_factory=list)  # per device, 1 per event received
    received: int = 0  # event frames at the member (duplicates included)
    distinct: int = 0
    duplicates: int = 0
    foreign: int = 0  # events the member could not attribute to a (device, i)
    device_disorder: int = 0  # events of a device received after a later one of that device
    seq_disorder: int = 0  # events whose seq was not above the previous one's
    member_other: Counter[str] = field(default_factory=Counter)
    member_notes: list[str] = field(default_factory=list)
    member_closed: str | None = None
    last_event_at: float = 0.0
    done_at: float = 0.0  # every expected event received
    worker_notes: list[str] = field(default_factory=list)

    @property
    def t0(self) -> float:
        return min((d.first_send for d in self.devices if d.first_send), default=0.0)

    @property
    def sent(self) -> int:
        return sum(d.sent for d in self.devices)

    @property
    def acked(self) -> int:
        return sum(d.n_acked for d in self.devices)

    @property
    def last_ack(self) -> float:
        return max((d.last_ack for d in self.devices), default=0.0)

    @property
    def elapsed(self) -> float:
        end = self.done_at or self.last_event_at
        return end - self.t0 if self.t0 and end > self.t0 else 0.0

    @property
    def rate(self) -> float:
        return self.distinct / self.elapsed if self.elapsed else 0.0

    @property
    def stored_rate(self) -> float:
        span = self.last_ack - self.t0
        return self.acked / span if self.t0 and span > 0 else 0.0


def _accounting(res: IngestResult) -> tuple[list[str], dict[str, int]]:
    """Lost (PUBACKed, never received), unacked but received, and per-device detail."""
    cfg = res.config
    totals = Counter(lost=0, unacked_received=0, unsent=0, unacked_lost=0)
    lines: list[str] = []
    by_index = {d.index: d for d in res.devices}
    for k in range(cfg.devices):
        dev = by_index.get(k)
        seen = res.seen[k] if k < len(res.seen) else bytearray(cfg.events_per_device)
        acked = dev.acked if dev else bytearray(cfg.events_per_device)
        sent = dev.sent if dev else 0
        lost = [i for i in range(cfg.events_per_device) if acked[i] and not seen[i]]
        unacked_rx = [i for i in range(cfg.events_per_device) if seen[i] and not acked[i]]
        unacked_lost = [i for i in range(sent) if not seen[i] and not acked[i]]
        dups = [i for i in range(cfg.events_per_device) if seen[i] > 1]
        totals["lost"] += len(lost)
        totals["unacked_received"] += len(unacked_rx)
        totals["unacked_lost"] += len(unacked_lost)
        totals["unsent"] += cfg.events_per_device - sent
        parts = []
        if lost:
            parts.append(f"PUBACKed but never received: i={ranges(lost)} ({len(lost)})")
        if dups:
            parts.append(f"received more than once: i={ranges(dups)} ({len(dups)})")
        if cfg.qos and unacked_rx:
            parts.append(f"received without PUBACK: i={ranges(unacked_rx)} "
                         f"({len(unacked_rx)})")
        if unacked_lost and cfg.qos:
            parts.append(f"sent, neither PUBACKed nor received: i={ranges(unacked_lost)}")
        if dev is not None and dev.closed:
            parts.append(f"closed early ({dev.closed})")
        if dev is not None and dev.dup_acks:
            parts.append(f"{dev.dup_acks} PUBACKs for no packet in flight")
        if dev is not None and dev.unexpected:
            parts.append("unexpected packets: " + ", ".join(
                f"{k2} x{v}" for k2, v in dev.unexpected.items()))
        if dev is None:
            parts.append("no report from its process")
        if parts and len(lines) < 20:
            lines.append(f"  device {k}: " + "; ".join(parts))
        elif parts:
            totals["more"] = totals.get("more", 0) + 1
    if totals.get("more"):
        lines.append(f"  ... and {totals['more']} more devices")
    return lines, dict(totals)


def report(res: IngestResult) -> None:
    """Print the figures of one run."""
    cfg = res.config
    lat = sorted(res.latencies)
    acks = sorted(res.ack_latencies)
    print()
    print(f"device ingest (embedded MQTT listener, QoS {cfg.qos}): {cfg.devices} devices x "
          f"{cfg.events_per_device} events = {cfg.expected} events, {cfg.payload_bytes}-byte "
          f"pad, window {cfg.window} per device, {max(1, min(cfg.workers, cfg.devices))} "
          f"device processes, 1 WebSocket member (json)")
    print(f"machine: {platform.system()} {platform.machine()}, os.cpu_count() = "
          f"{os.cpu_count()}; the node, its nats-server, the member and the device processes "
          f"share these cores")
    print(f"reproduce: python -m bench ingest {cfg.args()}")
    print()
    if res.error:
        print(f"  run failed: {res.error}")
    lines, totals = _accounting(res) if not res.error else ([], {})
    print(f"  sent {res.sent}, PUBACKed {res.acked}, received by the member "
          f"{res.distinct} distinct of {cfg.expected} ({res.received} event frames)")
    print(f"  end to end: {res.rate:,.0f} events/s over {res.elapsed:.2f} s "
          f"(first PUBLISH -> last event at the member)")
    if cfg.qos:
        span = res.last_ack - res.t0 if res.t0 else 0.0
        print(f"  stored:     {res.stored_rate:,.0f} events/s (PUBACKs) over {span:.2f} s")
    print(f"  publish -> deliver ms: p50 {ms(pct(lat, 0.5))}, p99 {ms(pct(lat, 0.99))}, "
          f"max {ms(lat[-1] if lat else None)} ({len(lat)} samples)")
    if cfg.qos:
        print(f"  publish -> PUBACK ms:  p50 {ms(pct(acks, 0.5))}, p99 "
              f"{ms(pct(acks, 0.99))}, max {ms(acks[-1] if acks else None)} "
              f"({len(acks)} samples)")
    if totals:
        what = "PUBACKed but never received" if cfg.qos else "sent but never received"
        lost = totals["lost"] if cfg.qos else totals["unacked_lost"]
        print(f"  lost ({what}): {lost}; duplicates at the member: {res.duplicates}"
              + (f"; received without PUBACK: {totals['unacked_received']}" if cfg.qos else "")
              + (f"; never sent: {totals['unsent']}" if totals["unsent"] else ""))
    if res.cpu:
        used = ", ".join(f"{k} {v:.2f} s" for k, v in res.cpu.items())
        print(f"  CPU during the measurement ({res.cpu_wall:.2f} s wall x {os.cpu_count()} "
              f"cores): {used}")
    out: list[str] = counter_lines(res.server_counters)
    if res.timed_out:
        out.append(f"timed out after {cfg.timeout_s:g} s: partial counts")
    if res.stalled:
        out.append(f"{res.stalled}: partial counts")
    if lines:
        out.append("per device:")
        out.extend(lines)
    if res.foreign:
        out.append(f"{res.foreign} events at the member not from a bench device or unreadable")
    if res.device_disorder:
        out.append(f"{res.device_disorder} events of a device arrived after a later one of the "
                   f"same device (the window pipelines PUBLISHes)")
    if res.seq_disorder:
        out.append(f"{res.seq_disorder} events arrived with a seq not above the previous one "
                   f"(PROTOCOL.md section 2: strictly increasing)")
    if res.member_other:
        out.append("non-event frames at the member: "
                   + ", ".join(f"{k} x{v}" for k, v in res.member_other.most_common()))
    out.extend(f"member frame: {n}" for n in res.member_notes)
    if res.member_closed:
        out.append(f"member connection closed early: {res.member_closed}")
    out.extend(res.worker_notes)
    out.extend(output_lines("node", res.server_log, res.shutdown_log))
    for line in out:
        print(f"  {line}")
