"""What a fan-out run measures and what it found: configuration, per-subscriber counts, figures.

Shared by ``bench.fanout`` (one node against the baseline) and ``bench.scaleout`` (N nodes on
a cluster): :class:`RunResult` is filled by ``bench.fanout_clients.measure`` and read by their
reports through :func:`figures` and :func:`problems`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.nodes import MAX_MESSAGE_BYTES, RunOutcome
from bench.report import output_lines, pct, ranges

__all__ = ["BenchConfig", "RunResult", "SubStats", "figures", "lost", "problems"]

MAX_BATCH = 32
LATE_S = 0.05  # paced: a publisher later than this behind its schedule is reported


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark invocation measures."""

    subscribers: int = 100
    events: int = 2000
    payload_bytes: int = 100
    codec: str = "json"
    skip_baseline: bool = False
    in_flight: int = 256
    timeout_s: float = 120.0
    #: Events published per second, one per WebSocket message, on a schedule that does not
    #: wait for deliveries (0: pipelined within ``in_flight``, as fast as the server takes).
    rate: float = 0.0
    #: Processes of the subscribers (1: in the benchmark's own, with the publisher).
    procs: int = 1

    @property
    def batch(self) -> int:
        """Publish frames per WebSocket message (kept under the node's frame limit; one when
        paced)."""
        if self.rate:
            return 1
        per_frame = self.payload_bytes + 160
        return max(1, min(MAX_BATCH, self.in_flight, MAX_MESSAGE_BYTES // per_frame))


@dataclass
class SubStats:
    """What one subscriber received."""

    index: int
    events: int = 0  # event frames received (duplicates included)
    distinct: int = 0
    duplicates: int = 0
    out_of_order: int = 0  # events whose index is lower than the previous one's
    unparsed: int = 0  # event frames whose index/time could not be read
    other: Counter[str] = field(default_factory=Counter)  # non-event frames, by type
    notes: list[str] = field(default_factory=list)  # errors, disconnects (first few)
    closed: str | None = None  # close code and reason when the connection ended early
    last_at: float = 0.0  # time.time() of the last event received
    done_at: float = 0.0  # time.time() when every event had arrived
    last_index: int = -1
    seen: bytearray = field(default_factory=bytearray)


@dataclass
class RunResult(RunOutcome):
    """Figures of one system under test (rtnode or the baseline)."""

    name: str
    config: BenchConfig
    subs: list[SubStats] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, publish -> deliver
    acks: list[float] = field(default_factory=list)  # seconds, publish -> published
    t0: float = 0.0  # first publish sent
    sent: int = 0
    sent_done_at: float = 0.0
    acked: int = 0
    acked_ids: bytearray = field(default_factory=bytearray)  # 1 where ``published`` came
    last_ack_at: float = 0.0
    pub_errors: Counter[str] = field(default_factory=Counter)
    pub_notes: list[str] = field(default_factory=list)
    late: float = 0.0  # paced: how far behind its schedule the publisher fell at most (s)

    @property
    def expected(self) -> int:
        return self.config.subscribers * self.config.events

    @property
    def delivered(self) -> int:
        return sum(s.distinct for s in self.subs)

    @property
    def end(self) -> float:
        return max((s.done_at or s.last_at for s in self.subs), default=0.0)

    @property
    def elapsed(self) -> float:
        return self.end - self.t0 if self.t0 and self.end > self.t0 else 0.0

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed if self.elapsed else 0.0


def figures(res: RunResult) -> dict[str, Any]:
    """Deliveries/s, publish->deliver and publish->published latency quantiles (seconds)."""
    lat = sorted(res.latencies)
    acks = sorted(res.acks)
    return {
        "rate": res.rate,
        "p50": pct(lat, 0.50), "p99": pct(lat, 0.99), "max": lat[-1] if lat else None,
        "ack50": pct(acks, 0.50), "ack99": pct(acks, 0.99),
    }


def problems(res: RunResult) -> list[str]:
    """Per-subscriber anomalies, publisher errors and what the server logged."""
    cfg = res.config
    out: list[str] = []
    if res.error:
        out.append(f"run failed: {res.error}")
    if res.timed_out:
        out.append(f"timed out after {cfg.timeout_s:g} s: partial counts")
    if res.stalled:
        out.append(f"{res.stalled}: partial counts")
    if res.sent < cfg.events and not res.error:
        out.append(f"publisher sent {res.sent} of {cfg.events} events")
    # What a subscriber should have: rtnode, every event the node acknowledged as stored;
    # the baseline, every event the publisher sent. Missing ones of those are losses.
    if res.name == "rtnode":
        owed, owed_what = res.acked_ids, "acknowledged by the node"
    else:
        owed = bytearray(b"\x01" * res.sent + b"\x00" * (cfg.events - res.sent))
        owed_what = "sent"
    n_owed = sum(owed)

    def missing(s: SubStats) -> int:
        return sum(1 for o, g in zip(owed, s.seen, strict=False) if o and not g)

    bad = [s for s in res.subs
           if s.distinct != cfg.events or s.duplicates or s.unparsed or s.closed or s.notes]
    if bad:
        losses = {s.index: missing(s) for s in bad}
        dups = sum(s.duplicates for s in res.subs)
        out.append(f"{len(bad)} of {len(res.subs)} subscribers incomplete or odd; "
                   f"{n_owed} of {cfg.events} events {owed_what}; missing deliveries: "
                   f"{sum(losses.values())} of events {owed_what}, "
                   f"{res.expected - res.delivered} of all {res.expected}; duplicates: {dups}")
        groups: dict[str, list[int]] = {}
        for s in bad:
            line = (f"{s.events} event frames, {s.distinct} distinct, "
                    f"missing {losses[s.index]} of the {n_owed} {owed_what} "
                    f"({cfg.events - s.distinct} of all {cfg.events}), "
                    f"{s.duplicates} duplicates")
            if s.unparsed:
                line += f", {s.unparsed} unreadable"
            if s.closed:
                line += f", closed early ({s.closed})"
            if s.notes:
                line += f", frames: {'; '.join(s.notes)}"
            groups.setdefault(line, []).append(s.index)
        for line, indices in list(groups.items())[:20]:
            who = (f"subscriber {indices[0]}" if len(indices) == 1
                   else f"subscribers {ranges(indices)} ({len(indices)})")
            out.append(f"  {who}: {line}")
        if len(groups) > 20:
            out.append(f"  ... and {len(groups) - 20} more kinds")
    if cfg.rate and res.late > LATE_S:
        out.append(f"the publisher fell {res.late * 1000:.0f} ms behind its schedule of "
                   f"{cfg.rate:g} events/s (the load generator was short of CPU): it published "
                   f"slower than asked")
    disorder = sum(s.out_of_order for s in res.subs)
    if disorder:
        out.append(f"{disorder} deliveries arrived after a later-published event "
                   f"(publish order is per connection, not guaranteed across pipelined frames)")
    others: Counter[str] = Counter()
    for s in res.subs:
        others.update(s.other)
    if others:
        out.append("non-event frames at subscribers: "
                   + ", ".join(f"{k} x{v}" for k, v in others.most_common()))
    for reason, n in res.pub_errors.most_common():
        out.append(f"publisher: {reason} x{n}")
    out.extend(f"publisher: {note}" for note in res.pub_notes
               if not note.startswith("publisher connection closed: 1000"))
    out.extend(output_lines(res.name, res.server_log, res.shutdown_log))
    return out


def lost(res: RunResult) -> int:
    """Deliveries missing of events the node acknowledged as stored, over every subscriber."""
    return sum(sum(1 for o, g in zip(res.acked_ids, s.seen, strict=False) if o and not g)
               for s in res.subs)
