"""The checker of the fault test: pure functions over a recorded history and the stored truth.

The history has three parts, all recorded by the test's own clients:

- **publishes** (:class:`Publish`): one per ``msg_id``, with its outcome. ``ok`` means a
  ``published`` reply with a seq was received (on any attempt); ``failed`` means the node
  refused it for good (an ``error`` with ``retry: false``, so it must not be stored);
  ``unknown`` means the client gave up without an answer it could trust (timeouts,
  disconnects, retryable errors until its deadline): it may be stored, at most once.
- **the truth** (:class:`Stored`): every event of the test's rooms read back from JetStream
  after the run, up to the stream leader's last seq. It is what "stored" means below.
- **subscriber histories** (:class:`SubscriberHistory`): per subscriber, in arrival order,
  every ``joined`` (:class:`Joined`: the connection number, the ``since`` cursor sent, and the
  reply's seq, epoch, recovered, replayed) and every event received (:class:`Received`).

What is checked, and why it is enough for "nothing acknowledged is missed":

1. Storage (:func:`check_storage`): every ``ok`` publish is in the stream exactly once, in its
   room, at the seq it was acknowledged with; no ``msg_id`` is stored twice; nothing is stored
   that no publisher sent; a ``failed`` publish is not stored.
2. Delivery (:func:`check_subscriber`), for each subscriber and room, after its first
   ``joined`` (whose seq is its first cursor): every stored event with a seq above that cursor
   was received (else a **gap**), unless a ``joined`` with ``recovered: false`` covers it (its
   ``since`` < seq <= its seq: the protocol's "reload your state" case, counted apart); no seq
   is received twice, across all its connections (a **duplicate**: the client resumed after it);
   within a connection, seqs rise strictly and start above the join's floor (``since`` when it
   recovered, else the joined seq) (else a **reorder**); every event received was stored; no
   event arrives on a connection before its ``joined``.
3. ``recovered: false`` on a join with ``since`` is a failure unless the run allows resets
   (history trimmed or beyond ``recovery_max``; the fault test allows none), and every
   ``joined`` names the same epoch (the stream is never recreated). A subscriber that never
   managed to join a room fails too (it would pass every delivery check vacuously).

Comparing against the stream rather than against the acks is stronger: an event whose publish
was ``unknown`` but that was stored must be delivered too. The harness makes sure the final
state is reached before it reads the truth (publishers stopped, subscribers caught up or the
wait timed out), so the subscribers' horizon is the stream's last seq.

Informational figures (not failures): stale joins (a ``joined`` seq lower than a seq already
acknowledged to a publisher when the join was sent: a read from a replica that was behind),
replay counts that differ from the stored events in ``(since, seq]``, and the time to recover.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "FAILED",
    "OK",
    "UNKNOWN",
    "Joined",
    "Publish",
    "Received",
    "Report",
    "StorageResult",
    "Stored",
    "SubscriberHistory",
    "SubscriberResult",
    "check",
    "check_storage",
    "check_subscriber",
    "time_to_recover",
]

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"
SHOWN = 8  # seqs listed per finding


@dataclass(frozen=True)
class Publish:
    msg_id: str
    room: str
    outcome: str  # OK, FAILED or UNKNOWN
    seq: int | None = None  # the acknowledged seq (OK only)
    attempts: int = 1
    acked_at: float | None = None  # monotonic time the ack was received


@dataclass(frozen=True)
class Stored:
    room: str
    seq: int
    msg_id: str | None


@dataclass(frozen=True)
class Joined:
    conn: int  # connection number within the subscriber
    room: str
    since: int | None  # the cursor sent; None: a first join
    seq: int
    epoch: str
    recovered: bool
    replayed: int
    sent_at: float = 0.0
    at: float = 0.0


@dataclass(frozen=True)
class Received:
    conn: int
    room: str
    seq: int
    at: float = 0.0


@dataclass
class SubscriberHistory:
    name: str
    entries: list[Joined | Received] = field(default_factory=list)


@dataclass
class StorageResult:
    acked: int = 0
    failed: int = 0
    unknown: int = 0
    unknown_stored: int = 0
    retried: int = 0  # publishes that needed more than one attempt
    attempts: int = 0
    stored: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class SubscriberResult:
    gaps: int = 0
    reset_losses: int = 0  # missed, covered by a recovered:false join
    duplicates: int = 0
    reorders: int = 0
    strays: int = 0  # events before any joined on their connection
    phantoms: int = 0  # events received that the stream does not hold
    joins: int = 0
    recovered_false: int = 0
    replayed: int = 0
    replay_mismatches: int = 0
    epochs: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    storage: StorageResult
    subscribers: dict[str, SubscriberResult]
    epochs: set[str]
    stale_joins: int
    recover_s: float | None
    problems: list[str]
    healed_at: float | None = None
    figures: dict[str, object] = field(default_factory=dict)  # the harness's own
    log: list[str] = field(default_factory=list)  # the harness's timeline (faults)

    @property
    def ok(self) -> bool:
        return not self.problems

    def total(self, name: str) -> int:
        return sum(int(getattr(r, name)) for r in self.subscribers.values())

    def summary(self) -> dict[str, object]:
        s = self.storage
        recover = (f"{self.recover_s:.2f} s" if self.recover_s is not None else
                   "no fault" if self.healed_at is None else "never (an acked event is missing)")
        return {
            "acked": s.acked, "failed": s.failed, "unknown": s.unknown,
            "unknown but stored": s.unknown_stored, "retried": s.retried,
            "attempts": s.attempts, "stored": s.stored,
            **self.figures,
            "joins": self.total("joins"), "replayed": self.total("replayed"),
            "gaps": self.total("gaps"), "duplicates": self.total("duplicates"),
            "reorders": self.total("reorders"),
            "recovered:false": self.total("recovered_false"),
            "missed after recovered:false": self.total("reset_losses"),
            "epochs seen": len(self.epochs),
            "stale joins (info)": self.stale_joins,
            "replay count mismatches (info)": self.total("replay_mismatches"),
            "time to recover after the last fault": recover,
        }

    def format(self, title: str = "jepsen") -> str:
        lines = [f"[{title}] {'PASS' if self.ok else 'FAIL'}"]
        lines += [f"  {key}: {value}" for key, value in self.summary().items()]
        if self.log:
            lines.append("  timeline:")
            lines += [f"    {line}" for line in self.log]
        if self.problems:
            lines.append(f"  problems ({len(self.problems)}):")
            lines += [f"    - {p}" for p in self.problems[:40]]
            if len(self.problems) > 40:
                lines.append(f"    ... {len(self.problems) - 40} more")
        notes = [n for name, r in self.subscribers.items() for n in
                 (f"{name}: {x}" for x in r.notes)]
        if notes:
            lines.append(f"  notes ({len(notes)}):")
            lines += [f"    - {n}" for n in notes[:20]]
        return "\n".join(lines)


def _seqs(seqs: Iterable[int]) -> str:
    ordered = sorted(seqs)
    text = ", ".join(str(s) for s in ordered[:SHOWN])
    return f"[{text}{', ...' if len(ordered) > SHOWN else ''}]"


def check_storage(publishes: Sequence[Publish], stored: Sequence[Stored]) -> StorageResult:
    """Every ok publish stored once at its seq; no msg_id twice; nothing unexpected."""
    r = StorageResult(stored=len(stored))
    by_id: dict[str | None, list[Stored]] = defaultdict(list)
    for s in stored:
        by_id[s.msg_id].append(s)
    seq_count = Counter((s.room, s.seq) for s in stored)
    read_twice = [k for k, n in seq_count.items() if n > 1]
    if read_twice:
        r.problems.append(f"truth: a seq read twice: {read_twice[:SHOWN]}")
    sent = {p.msg_id for p in publishes}
    unexpected = [s for s in stored if s.msg_id not in sent]
    if unexpected:
        r.problems.append(f"stored but never published: {len(unexpected)} events, e.g. "
                          f"{[(s.room, s.seq, s.msg_id) for s in unexpected[:SHOWN]]}")
    twice = {mid: [s.seq for s in rows] for mid, rows in by_id.items()
             if mid is not None and len(rows) > 1}
    if twice:
        r.problems.append(f"msg_id stored more than once: {len(twice)}, e.g. "
                          f"{list(twice.items())[:SHOWN]}")
    lost: list[tuple[str, int | None]] = []
    misplaced: list[tuple[str, int | None, list[tuple[str, int]]]] = []
    failed_stored: list[str] = []
    for p in publishes:
        r.attempts += p.attempts
        r.retried += p.attempts > 1
        rows = by_id.get(p.msg_id, [])
        if p.outcome == OK:
            r.acked += 1
            if not rows:
                lost.append((p.msg_id, p.seq))
            elif [(s.room, s.seq) for s in rows] != [(p.room, p.seq)]:
                misplaced.append((p.msg_id, p.seq, [(s.room, s.seq) for s in rows]))
        elif p.outcome == FAILED:
            r.failed += 1
            if rows:
                failed_stored.append(p.msg_id)
        else:
            r.unknown += 1
            r.unknown_stored += bool(rows)
    if lost:
        r.problems.append(f"acked but not stored: {len(lost)}, e.g. {lost[:SHOWN]}")
    if misplaced:
        r.problems.append(f"acked at one seq, stored elsewhere: {len(misplaced)}, e.g. "
                          f"{misplaced[:SHOWN]}")
    if failed_stored:
        r.problems.append(f"refused (retry: false) but stored: {failed_stored[:SHOWN]}")
    return r


def _first_cursors(history: SubscriberHistory) -> dict[str, int]:
    firsts: dict[str, int] = {}
    for e in history.entries:
        if isinstance(e, Joined) and e.room not in firsts:
            firsts[e.room] = e.seq
    return firsts


def check_subscriber(history: SubscriberHistory, stored_seqs: Mapping[str, Sequence[int]], *,
                     resets_allowed: bool = False) -> SubscriberResult:
    """Gaps, duplicates, reorders, strays, recovered:false and epochs of one subscriber.

    ``stored_seqs`` maps each room to the seqs the stream holds for it.
    """
    r = SubscriberResult()
    name = history.name
    joins: dict[tuple[int, str], Joined] = {}  # the current join of (connection, room)
    last: dict[tuple[int, str], int] = {}  # the floor, then the last seq, per connection
    got: dict[str, Counter[int]] = defaultdict(Counter)
    room_joins: dict[str, list[Joined]] = defaultdict(list)
    stored_sets = {room: set(seqs) for room, seqs in stored_seqs.items()}
    stored_sorted = {room: sorted(seqs) for room, seqs in stored_seqs.items()}
    reorders: list[tuple[str, int, int, int]] = []
    phantoms: list[tuple[str, int]] = []
    for e in history.entries:
        if isinstance(e, Joined):
            r.joins += 1
            r.epochs.add(e.epoch)
            room_joins[e.room].append(e)
            joins[(e.conn, e.room)] = e
            recovering = e.since is not None
            last[(e.conn, e.room)] = _floor(e)
            if recovering and not e.recovered:
                r.recovered_false += 1
                if not resets_allowed:
                    r.problems.append(
                        f"{name} {e.room}: recovered:false on conn {e.conn} (since {e.since}, "
                        f"joined seq {e.seq}, epoch {e.epoch}): no trim or recovery_max here")
            if e.since is not None and e.recovered:
                r.replayed += e.replayed
                ordered = stored_sorted.get(e.room, [])
                want = bisect_right(ordered, e.seq) - bisect_right(ordered, e.since)
                if want != e.replayed:
                    r.replay_mismatches += 1
                    r.notes.append(f"{e.room} conn {e.conn}: replayed {e.replayed}, the "
                                   f"stream holds {want} in ({e.since}, {e.seq}]")
            continue
        key = (e.conn, e.room)
        got[e.room][e.seq] += 1
        if e.seq not in stored_sets.get(e.room, set()):
            phantoms.append((e.room, e.seq))
        if key not in joins:
            r.strays += 1
            r.problems.append(f"{name} {e.room}: event {e.seq} on conn {e.conn} before joined")
            continue
        if e.seq <= last[key]:
            reorders.append((e.room, e.conn, last[key], e.seq))
        else:
            last[key] = e.seq
    r.reorders = len(reorders)
    if reorders:
        r.problems.append(f"{name}: {len(reorders)} out of order or at/below the join's "
                          f"floor (room, conn, previous, seq): {reorders[:SHOWN]}")
    r.phantoms = len(phantoms)
    if phantoms:
        r.problems.append(f"{name}: received events the stream does not hold: {phantoms[:SHOWN]}")
    for room, counts in got.items():
        twice = {seq: n for seq, n in counts.items() if n > 1}
        if twice:
            r.duplicates += sum(n - 1 for n in twice.values())
            r.problems.append(f"{name} {room}: received more than once: {_seqs(twice)}")
    firsts = _first_cursors(history)
    never = sorted(set(stored_seqs) - set(firsts))
    if never:
        r.problems.append(f"{name}: never joined {never}")
    for room, first in firsts.items():
        missing = {s for s in stored_seqs.get(room, ()) if s > first} - set(got[room])
        resets = [j for j in room_joins[room] if j.since is not None and not j.recovered]
        covered = {s for s in missing
                   if any(j.since is not None and j.since < s <= j.seq for j in resets)}
        r.reset_losses += len(covered)
        gaps = missing - covered
        r.gaps += len(gaps)
        if gaps:
            r.problems.append(f"{name} {room}: {len(gaps)} stored events never received "
                              f"(first cursor {first}): {_blame(gaps, room_joins[room])}")
        if covered and not resets_allowed:
            r.notes.append(f"{room}: {len(covered)} events missed after recovered:false "
                           f"{_seqs(covered)}")
    return r


def _floor(j: Joined) -> int:
    return j.since if j.since is not None and j.recovered else j.seq


def _blame(gaps: set[int], joins: list[Joined]) -> str:
    """For each missing seq, the last join whose floor is below it: the connection that should
    have delivered it (replayed when seq <= the joined seq, live otherwise). Grouped."""
    groups: dict[int, list[int]] = defaultdict(list)
    for seq in sorted(gaps):
        index = -1
        for i, j in enumerate(joins):
            if _floor(j) < seq:
                index = i
        groups[index].append(seq)
    parts = []
    for index, seqs in list(groups.items())[:3]:
        if index < 0:
            parts.append(f"{_seqs(seqs)} below every join")
            continue
        j = joins[index]
        how = "replay" if seqs[0] <= j.seq else "live"
        parts.append(f"{_seqs(seqs)} due by {how} on conn {j.conn} (join since {j.since} -> "
                     f"seq {j.seq}, epoch {j.epoch}, recovered {j.recovered}, "
                     f"replayed {j.replayed})")
    more = f"; {len(groups) - 3} more connections" if len(groups) > 3 else ""
    return "; ".join(parts) + more


def _stale_joins(publishes: Sequence[Publish],
                 histories: Sequence[SubscriberHistory]) -> int:
    """Joins whose seq is below a seq acked to a publisher before the join was sent."""
    acked: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for p in publishes:
        if p.outcome == OK and p.seq is not None and p.acked_at is not None:
            acked[p.room].append((p.acked_at, p.seq))
    best: dict[str, tuple[list[float], list[int]]] = {}
    for room, rows in acked.items():
        rows.sort()
        times, highs, high = [], [], 0
        for t, seq in rows:
            high = max(high, seq)
            times.append(t)
            highs.append(high)
        best[room] = (times, highs)
    stale = 0
    for h in histories:
        for e in h.entries:
            if isinstance(e, Joined) and e.room in best:
                times, highs = best[e.room]
                i = bisect_right(times, e.sent_at)
                if i and highs[i - 1] > e.seq:
                    stale += 1
    return stale


def time_to_recover(publishes: Sequence[Publish], histories: Sequence[SubscriberHistory],
                    healed_at: float | None) -> float | None:
    """Seconds from ``healed_at`` until every subscriber had every event acked by then.

    Only events above each subscriber's first cursor count. 0.0 when they all had them
    already; None when one never arrived (or there was no fault).
    """
    if healed_at is None:
        return None
    targets: dict[str, list[int]] = defaultdict(list)
    for p in publishes:
        if p.outcome == OK and p.seq is not None and (p.acked_at or 0.0) <= healed_at:
            targets[p.room].append(p.seq)
    worst = healed_at
    for h in histories:
        firsts = _first_cursors(h)
        seen: dict[tuple[str, int], float] = {}
        for e in h.entries:
            if isinstance(e, Received):
                seen.setdefault((e.room, e.seq), e.at)
        for room, seqs in targets.items():
            if room not in firsts:
                continue
            for seq in seqs:
                if seq <= firsts[room]:
                    continue
                at = seen.get((room, seq))
                if at is None:
                    return None
                worst = max(worst, at)
    return worst - healed_at


def check(publishes: Sequence[Publish], stored: Sequence[Stored],
          histories: Sequence[SubscriberHistory], *, resets_allowed: bool = False,
          healed_at: float | None = None) -> Report:
    """The whole verdict: storage, then every subscriber, then one epoch overall."""
    storage = check_storage(publishes, stored)
    seqs: dict[str, list[int]] = defaultdict(list)
    for s in stored:
        seqs[s.room].append(s.seq)
    for p in publishes:  # rooms with nothing stored still count (an empty room)
        seqs.setdefault(p.room, [])
    results = {h.name: check_subscriber(h, seqs, resets_allowed=resets_allowed)
               for h in histories}
    epochs: set[str] = set().union(*(r.epochs for r in results.values())) if results else set()
    problems = list(storage.problems)
    for r in results.values():
        problems += r.problems
    if len(epochs) > 1:
        problems.append(f"more than one epoch seen (the stream was never recreated): "
                        f"{sorted(epochs)}")
    return Report(storage=storage, subscribers=results, epochs=epochs,
                  stale_joins=_stale_joins(publishes, histories),
                  recover_s=time_to_recover(publishes, histories, healed_at),
                  problems=problems, healed_at=healed_at)
