"""The command line of replay: ``rtnode replay`` (a room's stored events) and ``rtnode consume``.

``rtnode replay`` reads one room and prints its events: forwards with an ordered consumer
(then live with ``follow``), or newest first (``reverse``) in windows read with short-lived
pull consumers; ``until`` and ``limit`` bound it, and a :class:`_Progress` line on stderr says
how far it got when stdout is a pipe. ``rtnode consume`` runs a durable
:class:`bridge.replay.ReplayConsumer` (a group: ``partitions``, standbys) and prints each event
as a JSON line, acked once written, or POSTs it (``bridge.webhook``). :func:`run_command` runs
either until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bridge.nats_auth import NatsAuth
from bridge.replay import (
    ReplayConsumer,
    ReplayError,
    Start,
    connect_nats,
    require_room_stream,
)
from node.protocol.errors import CodecError
from node.protocol.frames import cbor_loads_strict
from node.protocol.subjects import STREAM_NAME, room_subject

__all__ = ["consume_rooms", "parse_time", "replay_room", "run_command"]

log = logging.getLogger("bridge.replay")

_STALL_CHECK_S = 5.0
# The progress line appears once a replay into a pipe has run this long. Hidden knob for the
# tests (RTNODE_TEST_* variables are not settings): RTNODE_TEST_REPLAY_PROGRESS_S=0.2.
_PROGRESS_AFTER_S = 3.0
_PROGRESS_EVERY_S = 1.0
# --reverse reads windows of stream seqs, each forwards, printed backwards. A window aims at
# _PAGE events of the room and never holds more than _PAGE_MAX of them in memory (the older
# ones are dropped and read again with the next window): a room of 100k events is read in
# about 100 windows of 1,000, each one pull consumer (~1 ms to create on loopback). The tests
# make windows small, to cross many of them, with RTNODE_TEST_REPLAY_PAGE=16.
_PAGE = 1000
_PAGE_MAX = 4 * _PAGE
_FETCH = 256
_EMPTY_FETCH_S = 0.25  # then the stream leader is asked whether the window is complete
_WINDOW_STALL_S = 30.0  # a window read that gets nothing this long while the leader has more


_LATEST = datetime(2200, 1, 1, tzinfo=UTC)


def _parse_start(text: str) -> Start:
    """``all``, ``new``, a seq or an ISO 8601 time (for ``rtnode consume --start``)."""
    if text in ("all", "new"):
        return text  # type: ignore[return-value]
    if text.isdigit():
        return int(text)
    return parse_time(text)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is local time.

    Raises:
        ValueError: Not an ISO 8601 time.
    """
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: expected ISO 8601, e.g. "
                         "2025-01-31T12:00:00Z") from None
    when = when if when.tzinfo else when.astimezone()
    # nats-server keeps times as int64 nanoseconds, which end in 2262 (a start time past it
    # wraps around to long ago): later times read as 2200, past anything stored.
    return min(when, _LATEST)


def _write_line(out: Any, line: str) -> None:
    out.write(line + "\n")
    out.flush()


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that exiting does not complain."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _event_line(seq: int, body: Any, room: str, as_json: bool) -> str:
    from node.protocol.frames import JSON

    if not isinstance(body, dict):
        body = {"event": None, "data": body}
    if as_json:
        out = {"room": room, "seq": seq, **{k: v for k, v in body.items() if k != "room"}}
        return JSON.encode(out).decode()
    return f"{seq} {body.get('event')} {JSON.encode(body.get('data')).decode()}"


def _rate(per_s: float) -> str:
    if per_s >= 999_950:
        return f"{per_s / 1e6:.1f}M/s"
    if per_s >= 999.5:
        return f"{per_s / 1e3:.1f}k/s"
    return f"{per_s:.0f}/s"


class _Progress:
    """``replayed 120000 events, seq 483201 (12.4k/s)`` on ``err``, rewritten in place (``\\r``)
    at most once a second, once the replay has run ``after_s``; a final newline at
    :meth:`close` if it was ever shown. Off when ``enabled`` is false (stdout is a terminal:
    the events themselves show the progress)."""

    def __init__(self, err: Any, *, enabled: bool, after_s: float = _PROGRESS_AFTER_S) -> None:
        self.err = err
        self.enabled = enabled
        self.started = time.monotonic()
        self.after_s = after_s
        self.shown_at = 0.0
        self.count = 0
        self.seq = 0

    def update(self, count: int, seq: int) -> None:
        """Record that ``count`` events are printed, the last one ``seq``."""
        self.count, self.seq = count, seq
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started >= self.after_s and now - self.shown_at >= _PROGRESS_EVERY_S:
            self._show(now, "")

    def _show(self, now: float, end: str) -> None:
        rate = self.count / max(now - self.started, 1e-6)
        with contextlib.suppress(Exception):  # stderr gone: nothing to report to
            self.err.write(f"\rreplayed {self.count} events, seq {self.seq} ({_rate(rate)})"
                           + end)
            self.err.flush()
        self.shown_at = now

    def close(self) -> None:
        """End the line (with the final figures) if it was shown."""
        if self.shown_at:
            self._show(time.monotonic(), "\n")
            self.shown_at = 0.0


class _Printer:
    """Prints events, counts them against ``limit`` and reports progress."""

    def __init__(self, out: Any, room: str, as_json: bool, limit: int | None,
                 progress: _Progress) -> None:
        self.out = out
        self.room = room
        self.as_json = as_json
        self.limit = limit
        self.progress = progress
        self.printed = 0
        self.broken = False

    @property
    def done(self) -> bool:
        """The limit is reached, or stdout is gone."""
        return self.broken or (self.limit is not None and self.printed >= self.limit)

    def emit(self, seq: int, data: bytes) -> bool:
        """Print one stored event; False when nothing more should be printed."""
        if self.done:
            return False
        try:
            body = cbor_loads_strict(data)
        except CodecError:
            body = {"event": None, "data": None, "undecodable": True}
        try:
            _write_line(self.out, _event_line(seq, body, self.room, self.as_json))
        except BrokenPipeError:
            _quiet_stdout()
            self.broken = True
            return False
        self.printed += 1
        self.progress.update(self.printed, seq)
        return not self.done


async def _leader_get(nc: NATS, request: dict[str, Any]) -> int:
    """The seq of the message that the stream leader returns for ``request`` (0: none).

    ``$JS.API.STREAM.MSG.GET`` is answered by the stream leader only, so the answer includes
    every acknowledged publish (a direct get may come from a replica that is behind).
    """
    try:
        reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{STREAM_NAME}",
                                 json.dumps(request).encode(), timeout=5)
        answer: dict[str, Any] = json.loads(reply.data)
    except Exception as exc:
        raise ReplayError(f"JetStream not answering: {exc or type(exc).__name__}") from None
    err = answer.get("error")
    if err:
        if err.get("code") == 404:
            return 0
        raise ReplayError(f"JetStream: {err.get('description', err)}")
    return int((answer.get("message") or {}).get("seq") or 0)


async def replay_room(
    servers: Sequence[str],
    room: str,
    *,
    tenant: str = "default",
    since: int | None = None,
    since_time: datetime | None = None,
    until: int | None = None,
    limit: int | None = None,
    reverse: bool = False,
    follow: bool = False,
    as_json: bool = False,
    out: Any = None,
    err: Any = None,
    auth: NatsAuth | None = None,
) -> int:
    """Print a room's stored events (``rtnode replay``).

    Args:
        servers: NATS URLs.
        room: The room.
        tenant: Its tenant.
        since: Only events after this seq.
        since_time: Only events stored from this time.
        until: Stop after this seq (inclusive).
        limit: Print at most this many events.
        reverse: Newest first (a bounded read: not with ``follow``).
        follow: After the stored events, print live ones until cancelled.
        as_json: JSON lines (the event maps) instead of ``seq event data``.
        out: Where the events go (default stdout).
        err: Where the progress line goes (default stderr); shown only when ``out`` is not a
            terminal and the replay runs for more than 3 s.
        auth: Credentials and TLS (default: none).

    Returns:
        The exit code (0).

    Raises:
        ReplayError: No NATS, or no room stream.
        ValueError: ``reverse`` with ``follow``, or ``limit`` < 1.
    """
    if reverse and follow:
        raise ValueError("--reverse reads a bounded range, newest first: not with --follow")
    if limit is not None and limit < 1:
        raise ValueError("--limit must be at least 1")
    out = out or sys.stdout
    isatty = getattr(out, "isatty", None)
    progress = _Progress(
        err or sys.stderr, enabled=not (isatty is not None and isatty()),
        after_s=float(os.environ.get("RTNODE_TEST_REPLAY_PROGRESS_S", _PROGRESS_AFTER_S)))
    printer = _Printer(out, room, as_json, limit, progress)
    nc = await connect_nats(servers, name="rtnode-replay-cli", auth=auth)
    try:
        js = nc.jetstream(timeout=5)
        await require_room_stream(js)
        subject = room_subject(tenant, room)
        if reverse:
            await _backwards(nc, js, subject, printer, since=since, since_time=since_time,
                             until=until)
        else:
            await _forwards(nc, js, subject, printer, since=since, since_time=since_time,
                            until=until, follow=follow)
        return 0
    finally:
        progress.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


async def _forwards(nc: NATS, js: JetStreamContext, subject: str, printer: _Printer, *,
                    since: int | None, since_time: datetime | None, until: int | None,
                    follow: bool) -> None:
    """Oldest first with an ordered consumer (AckNone, in-memory, deleted with the
    connection); when it stays silent while the room has newer events (nats.py#510), it is
    recreated after the last printed seq."""
    last_printed = since or 0

    async def subscribe(after: int, when: datetime | None) -> Any:
        cfg = ConsumerConfig()
        if when is not None:
            policy = DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = when
        elif after > 0:
            policy = DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = after + 1
        else:
            policy = DeliverPolicy.ALL
        return await js.subscribe(subject, stream=STREAM_NAME, ordered_consumer=True,
                                  deliver_policy=policy, config=cfg, idle_heartbeat=2.0)

    async def newest_seq() -> int:
        # Asked of the stream leader: the end of a replay without --follow must include
        # every acked event.
        return await _leader_get(nc, {"last_by_subj": subject})

    # Where a bounded replay ends: the leader's newest event (at most --until).
    target = 0
    if not follow:
        target = await newest_seq()
        if until is not None:
            target = min(target, until)
        if target <= last_printed:
            return
    if (not follow and since_time is not None
            and await _leader_get(nc, _from_time(subject, since_time)) == 0):
        return  # nothing stored since that time
    sub = await subscribe(last_printed, since_time)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=_STALL_CHECK_S)
            except TimeoutError:
                # Nothing for a while: is the consumer stalled while the room moved on?
                try:
                    newest = await newest_seq()
                except ReplayError:
                    continue
                if newest and newest > last_printed and (until is None or last_printed < until):
                    log.warning("! ordered consumer on %s stalled; resubscribing", subject)
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = await subscribe(last_printed, None if last_printed else since_time)
                elif not follow:
                    return
                continue
            seq = msg.metadata.sequence.stream
            if until is not None and seq > until:
                return
            if seq > last_printed:
                if not printer.emit(seq, msg.data):
                    return
                last_printed = seq
            # The consumer's num_pending comes from its own replica, which may lag: stop at
            # the leader's newest seq instead.
            if (target and last_printed >= target) or (until is not None and seq >= until):
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _from_time(subject: str, when: datetime) -> dict[str, Any]:
    """A leader get of the room's first event stored at or after ``when``."""
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"start_time": stamp, "next_by_subj": subject}


async def _backwards(nc: NATS, js: JetStreamContext, subject: str, printer: _Printer, *,
                     since: int | None, since_time: datetime | None,
                     until: int | None) -> None:
    """Newest first, in windows of stream seqs, each read forwards (:func:`_window`) and
    printed backwards; the first window ends at the leader's newest event of the room."""
    end = await _leader_get(nc, {"last_by_subj": subject})
    if until is not None:
        end = min(end, until)
    floor = (since or 0) + 1
    if since_time is not None:
        first = await _leader_get(nc, _from_time(subject, since_time))
        if not first:
            return
        floor = max(floor, first)
    page = int(os.environ.get("RTNODE_TEST_REPLAY_PAGE", _PAGE))
    page_max = page * (_PAGE_MAX // _PAGE)
    width = page
    while end >= floor and not printer.done:
        start = max(floor, end - width + 1)
        room_left = page_max if printer.limit is None else printer.limit - printer.printed
        keep: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=min(page_max, room_left))
        dropped = 0  # the newest seq pushed out of ``keep``: read again with the next window
        async for seq, data in _window(nc, js, subject, start, end):
            if len(keep) == keep.maxlen:
                dropped = keep[0][0]
            keep.append((seq, data))
        for seq, data in reversed(keep):
            if not printer.emit(seq, data):
                return
        if dropped:
            end, width = dropped, max(page, width // 2)
        else:
            end = start - 1
            # Aim the next window at about a page of events, growing at most 8x at a time.
            width = int(width * min(8.0, max(1.0, page / max(len(keep), 1))))


async def _window(nc: NATS, js: JetStreamContext, subject: str, start: int,
                  end: int) -> AsyncIterator[tuple[int, bytes]]:
    """The room's events with ``start <= seq <= end``, oldest first: (seq, stored bytes).

    Read with an ephemeral pull consumer (AckNone, in memory), deleted at the end. The read
    is complete when it reaches ``end`` or an event after it; when the consumer has nothing
    more, the stream leader decides (its next event of the room after the last one read: none,
    or one after ``end``), so a consumer on a replica that is behind cannot cut it short.
    """
    name = f"rtnode-replay-{secrets.token_hex(8)}"
    cfg = ConsumerConfig(
        name=name, filter_subject=subject, ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start),
        mem_storage=True, num_replicas=1, inactive_threshold=60.0,
    )
    await js.add_consumer(STREAM_NAME, config=cfg)
    try:
        psub = await js.pull_subscribe_bind(durable=None, stream=STREAM_NAME, name=name)
        last = start - 1
        deadline = time.monotonic() + _WINDOW_STALL_S
        while True:
            try:
                # Never more than the seqs left: a window overshoots its end by little.
                msgs: list[Msg] = await psub.fetch(max(1, min(_FETCH, end - last)),
                                                   timeout=_EMPTY_FETCH_S)
            except TimeoutError:  # nats.errors.TimeoutError too
                msgs = []
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if seq > end:
                    return
                yield seq, msg.data
                if seq == end:
                    return
                last = seq
            if msgs:
                deadline = time.monotonic() + _WINDOW_STALL_S
                continue
            nxt = await _leader_get(nc, {"seq": last + 1, "next_by_subj": subject})
            if not nxt or nxt > end:
                return
            if time.monotonic() > deadline:
                raise ReplayError(f"reading {subject} stalled after seq {last}: the consumer's "
                                  f"replica is behind the leader (seq {nxt})")
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(STREAM_NAME, name)


async def consume_rooms(
    servers: Sequence[str],
    *,
    durable: str,
    rooms: str,
    tenant: str = "default",
    start: str = "all",
    out: Any = None,
    post: str | None = None,
    secret: str | None = None,
    concurrency: int = 16,
    post_timeout_s: float = 10.0,
    **options: Any,
) -> int:
    """Run a durable consumer (``rtnode consume``) until cancelled: print each event as a JSON
    line and ack it once the line is written and flushed, or with ``post``, POST it there
    (:func:`bridge.webhook.post_events`: acked on 2xx, retried with backoff, dead-lettered
    after ``max_deliver``).

    Args:
        servers: NATS URLs.
        durable: The durable (group) name.
        rooms: An exact room or a prefix ending in ``*``.
        tenant: The tenant.
        start: Where a new durable starts: ``all``, ``new``, a seq or an ISO 8601 time.
        out: Where the JSON lines go (default stdout).
        post: A URL to POST each event to, instead of printing it.
        secret: The HMAC key of the signature header (empty or None: no signature).
        concurrency: POSTs in flight at most.
        post_timeout_s: Time allowed for one POST.
        **options: More arguments of :class:`bridge.replay.ReplayConsumer` (``auth``,
            ``partitions``, ``on_retry``, ``max_deliver``, ``ack_wait_s``,
            ``priority_timeout_s``).

    Returns:
        The exit code (0).

    Raises:
        ReplayError: No NATS, no room stream, or the durable exists for other rooms.
        ValueError: Bad pattern, durable, start or option.
    """
    out = out or sys.stdout
    from node.protocol.frames import JSON

    consumer = ReplayConsumer(list(servers), tenant=tenant, rooms=rooms, durable=durable,
                              start=_parse_start(start), **options)
    async with consumer:
        if post is not None:
            from bridge.webhook import post_events  # aiohttp only for --post

            await post_events(consumer, post, secret=secret or None, concurrency=concurrency,
                              timeout_s=post_timeout_s)
            return 0
        async for ev in consumer:
            try:
                _write_line(out, JSON.encode(ev.as_map()).decode())
            except BrokenPipeError:
                _quiet_stdout()
                return 0  # not acked: nakked at close, delivered to the next run
            await ev.ack()
            # Let nats-py's flusher hand the ack to the kernel before the next line is
            # written: a write that blocks (a reader that stopped) or a kill -9 then costs at
            # most the one line printed and not acked, never a batch of them.
            await asyncio.sleep(0)
    return 0


def run_command(coro: Any) -> int:
    """Run a replay command until it ends or SIGINT/SIGTERM; errors are one line on stderr.

    Returns:
        0, 1 (NATS or JetStream trouble) or 2 (bad arguments).
    """
    import signal

    async def main() -> int:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return int(await task)
        except asyncio.CancelledError:
            return 0
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        try:
            import uvloop  # the node's loop: replays 100k events 1.4-1.6x faster than asyncio
        except ImportError:
            return asyncio.run(main())
        return int(uvloop.run(main()))
    except ReplayError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # NATS trouble mid-way: one line, no traceback
        print(f"rtnode: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
