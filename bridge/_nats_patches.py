"""Six patches to nats-py 2.16, installed by the node at start: a faster header parser, a
PONG handler that survives a timed-out flush, a PING that keeps its place after what was
queued before it, one write per loop step of the commands queued (SUB, UNSUB and what may
wait, one per 2 ms), a message dispatch that
hands a ``raw`` subscription its payload and header bytes as they are, and a protocol parser
that reads MSG and HMSG lines without nats-py's regexes (:func:`_parse`). And helpers that go
around nats-py's per-message costs where the node sends or receives many messages:
:func:`publish_many`, :func:`publish_now` (a publish from synchronous code, no task),
:func:`direct_dispatch` and :func:`raw_dispatch` (with :func:`header_value` for its raw
headers: a room's live events).

**PONG after a timed-out flush.** ``flush(timeout=...)`` queues a future for the server's PONG
and cancels it when the timeout passes; the late PONG then meets a cancelled future and
``set_result`` raises ``InvalidStateError`` inside the read loop, which stops reading: the
connection stays "connected" but deaf (no messages, no acks) until the ping timer declares it
stale. Seen after a 3 s stall of a nats-server: the node answered nothing for ~15 s. PONGs
answer PINGs in order, so the oldest queued future is this PONG's own: a done (cancelled) one
is simply dropped.

**A flush that flushes.** ``flush()`` is meant to return once the server has everything sent
before it; nats-py 2.16 writes its PING straight to the socket while the SUBs and PUBs queued
before it wait in ``_pending`` for the flusher task, so the PONG can come back before the
server has seen a subscription (``subscribe``, ``flush``, then a publish elsewhere: the message
was lost about one time in five here; nats.py2 had fixed the same, its PR #24). The PING now
goes through ``_pending`` behind them, as nats.go does (``tests/integration/test_nats_patches.py``).

**One write for what a loop step queued.** Every SUB, UNSUB, request and PING made nats-py
create a future and ``await`` putting it on its flusher's queue, and the flusher then went
round once per future (a write of nothing and a drain for all but the first): ~15 Python calls
each, ~11 times for a user's connect and disconnect (its personal room's subscriptions, its
position read, presence, rpc route). Whatever is in ``_pending`` when it is next written goes
at once, so the patch arranges one write per loop step, without awaiting: a callback at the
end of the step writes ``_pending`` to the socket, as the flusher would, with no task step
and no queue (a quiet node's publish and its ack, one by one, pay it for every event). While
the socket still holds unsent bytes, the callback wakes the flusher instead, which writes and
waits for the socket to drain, so nats-py's backpressure holds (a forced flush, the pending
buffer over its limit, waits for it). A client not connected and a flusher that is gone keep
nats-py's own path.

**What nobody waits on waits for the next write.** A SUB or UNSUB, a message sent with
``publish_now(later=True)`` (a presence entry or announcement, a read of the store), and the
PING of :func:`flush_later` (the round trip that confirms a connect's rpc routes), on a
connection written to less than ``COALESCE_S`` (2 ms) ago is not written at the end of its
step: a timer writes it when that much time has passed, unless a command of any other kind (an
event's publish, a request, a PING, so every ``flush()``) comes first and takes it along, in
order. During a burst of connects (each a few subscriptions, two presence entries and
announcements and a read) that is one write every 2 ms instead of about one per connect: in
``make bench``'s connects, nats-server's CPU per connect went from ~225 to ~150 us and the
node's from ~705 to ~640 us. An event is never held: holding every write that way cost the
paced fan-out's p99 a few ms.

**Headers.**

nats-py 2.16 parses every message's headers with ``any(c.isspace() for c in key)`` per header
name: a generator step per character. Every live event carries five headers (the stream's
RePublish), so that loop alone cost ~40 us per event in the node's profile (0.85 s of 7 s for
20,000 device uplinks). This replacement returns exactly the same dict (same rules: split on the
first ``:``, skip lines without one, skip non-ASCII names and names containing whitespace,
strip, decode values as UTF-8 with replacement) with one regex search per name, but for one
rule of its own: a header *line* named ``Status`` or ``Description`` is skipped. nats-py puts a
server's status line (``NATS/1.0 404 No Messages``, a batch's ``204 EOB``, ``503`` no
responders) in the dict under those two names, and the lines after it under theirs, so a
message's own ``Status: 404`` line looked exactly like the server's status. A backend's event
stored with such a header (PROTOCOL.md section 9: it publishes into the stream) then ended
every direct-get batch that reached it, or failed it ("direct get status 500"): the room's
recovery and history failed with 4500 for as long as the event was kept. The server never
writes those names as lines, so only the status line sets them now. (``install`` also turns off
nats-py's optional ``fast_mail_parser``, which would bypass this parser.)

**MSG and HMSG lines.** nats-py matches each line against its patterns, one after the other:
~3,700 instructions per match in the regex engine (callgrind), two per event (its live HMSG
and its ack), 2.75% of an event's instructions in the node; and each message then went
through a coroutine (``_process_msg``). :func:`_parse` splits such a line on its spaces and hands a
room's or an ack's message over at once; every other line, and any it would read differently,
is nats-py's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from nats import errors
from nats.aio import client as _client_module
from nats.aio.client import Client, _validate_subject
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header
from nats.protocol import parser as _parser
from nats.protocol.command import sub_cmd, unsub_cmd
from nats.protocol.parser import Parser

__all__ = ["GatheringRoute", "RawRoute", "Route", "direct_dispatch", "flush_later", "header_lines",
           "header_value", "install", "publish_many", "publish_now", "raw_dispatch", "raw_route",
           "subscribe_now"]

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s")  # str patterns: the characters str.isspace() accepts


# The names nats-py gives a message's status line (``NATS/1.0 404 No Messages``): never taken
# from its header lines, where they are the message's own (a stored event's, see below).
_STATUS_NAMES = frozenset((Header.STATUS.value, Header.DESCRIPTION.value))


def _parse_header_lines(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _SPACE.search(key) or key in _STATUS_NAMES:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


async def _process_pong(self: Client) -> None:
    if self._pongs:
        future = self._pongs.pop(0)
        if not future.done():  # cancelled by a flush that timed out
            future.set_result(True)
        self._pongs_received += 1
        self._pings_outstanding = 0


_ORIGINAL_SEND_PING = Client._send_ping
_PING = b"PING\r\n"


async def _send_ping(self: Client, future: asyncio.Future[Any] | None = None) -> None:
    if not self.is_connected:  # nats-py's own (its reconnect handles what is pending)
        await _ORIGINAL_SEND_PING(self, future)
        return
    _queue_ping(self, asyncio.Future() if future is None else future)
    await self._flush_pending()


def _queue_ping(nc: Client, future: asyncio.Future[Any]) -> None:
    """A PING behind everything pending, and the future its PONG settles (PONGs answer PINGs
    in order, and every PING goes through the pending buffer)."""
    nc._pongs.append(future)
    nc._pending.append(_PING)
    nc._pending_data_size += len(_PING)


_ORIGINAL_PROCESS_MSG = Client._process_msg


async def _process_msg(self: Client, sid: int, subject: bytes, reply: bytes, data: bytes,
                       headers: bytes | None) -> None:
    """nats-py's, except for a subscription of :func:`direct_dispatch` with ``raw=True``: its
    handler gets the payload and the raw header block, with no header dict, no ``Msg`` and no
    coroutine of its own (a live event's seven headers cost ~6 us to parse into a dict)."""
    sub: Any = self._subs.get(sid)
    if isinstance(sub, RawRoute):  # and its subclasses (a room's routes)
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        sub._received += 1
        sub.deliver(subject, data, headers)
        return
    await _ORIGINAL_PROCESS_MSG(self, sid, subject, reply, data, headers)  # type: ignore[arg-type]


_ORIGINAL_FLUSH_PENDING = Client._flush_pending


async def _flush_pending(self: Client, force_flush: bool = False) -> Any:
    queue, flusher = self._flush_queue, self._flusher_task
    if (force_flush or queue is None or flusher is None or flusher.done()
            or not self.is_connected):
        return await _ORIGINAL_FLUSH_PENDING(self, force_flush)
    pending = self._pending
    if pending and pending[-1].startswith(_SUBSCRIPTIONS):
        _wake_later(self, queue)
    else:
        _wake(self, queue)
    return None


# SUB and UNSUB commands (``sub_cmd``, ``unsub_cmd``): nothing waits on them, so they may wait
# for the next write (see _wake_later).
_SUBSCRIPTIONS = (b"SUB ", b"UNSUB ")
# What may wait (a SUB, an UNSUB, publish_now(later=True)) waits at most this long after the
# connection's last write.
COALESCE_S = 0.002


def _wake(nc: Client, queue: asyncio.Queue[asyncio.Future[Any]]) -> None:
    """Have what is pending written at the end of this loop step (:func:`_write_soon`: one
    callback for every command of the step, no task), unless a write or a wake-up of the
    flusher is on its way already (it writes everything pending when it runs)."""
    if queue.empty() and not getattr(nc, "_rt_write_soon", False):
        nc._rt_write_soon = True  # type: ignore[attr-defined]
        asyncio.get_running_loop().call_soon(_write_soon, nc, queue)


def _wake_later(nc: Client, queue: asyncio.Queue[asyncio.Future[Any]]) -> None:
    """:func:`_wake` for what may wait (a SUB, an UNSUB, ``publish_now(later=True)``): on a
    connection written to within the last ``COALESCE_S``, it waits until that much time has
    passed since, unless something else is written first (a publish, a request, a PING: every
    other command still goes at the end of its loop step, and takes what is pending with it,
    in order). Under a burst of connects and disconnects that is one write of many commands
    every 2 ms rather than one per loop step: less CPU for the node and for nats-server. A
    quiet connection writes at once."""
    if not queue.empty() or getattr(nc, "_rt_write_soon", False):
        return  # a write is coming at the end of this step
    if getattr(nc, "_rt_write_timer", None) is not None:
        return  # a write is coming within COALESCE_S
    loop = asyncio.get_running_loop()
    at = getattr(nc, "_rt_last_write", 0.0) + COALESCE_S
    if at <= loop.time():
        _wake(nc, queue)
        return
    nc._rt_write_timer = loop.call_at(at, _write_late, nc, queue)  # type: ignore[attr-defined]


async def flush_later(nc: Client, timeout: float) -> None:
    """``nc.flush(timeout)`` whose PING may wait for the connection's next write, as a SUB
    does (:func:`_wake_later`): one round trip confirming that the server has everything
    written before, for callers that can wait a few more milliseconds (a connect's rpc
    routes). Raises what ``flush`` raises (``FlushTimeoutError`` when no PONG comes in time).
    """
    queue, reading, flusher = nc._flush_queue, nc._reading_task, nc._flusher_task
    if (not nc.is_connected or queue is None or reading is None or reading.done()
            or flusher is None or flusher.done()):
        await nc.flush(timeout)  # type: ignore[arg-type]  # nats-py's own path
        return
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    _queue_ping(nc, future)
    _wake_later(nc, queue)
    try:
        await asyncio.wait_for(future, timeout)
    except TimeoutError:
        future.cancel()  # its late PONG is dropped (_process_pong)
        raise errors.FlushTimeoutError from None


def _write_late(nc: Client, queue: asyncio.Queue[asyncio.Future[Any]]) -> None:
    nc._rt_write_timer = None  # type: ignore[attr-defined]
    if queue.empty() and not getattr(nc, "_rt_write_soon", False):
        _write_soon(nc, queue)


def _write_soon(nc: Client, queue: asyncio.Queue[asyncio.Future[Any]]) -> None:
    """Write what is pending to the socket, as the flusher would; but while the socket still
    holds unsent bytes, wake the flusher instead: it writes and waits for the socket to drain
    (nats-py's backpressure)."""
    nc._rt_write_soon = False  # type: ignore[attr-defined]
    transport, flusher = nc._transport, nc._flusher_task
    if not nc._pending or transport is None or not nc.is_connected:
        return  # written already, or by nats-py once connected again
    timer = getattr(nc, "_rt_write_timer", None)
    if timer is not None:  # what it waited for goes now
        timer.cancel()
        nc._rt_write_timer = None  # type: ignore[attr-defined]
    writer = getattr(transport, "_io_writer", None)  # a TCP (or TLS) transport's
    flusher_runs = flusher is not None and not flusher.done()
    if flusher_runs and (writer is None or writer.transport.get_write_buffer_size() > 0):
        if queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())
        return
    try:
        transport.writelines(nc._pending[:])
    except Exception:  # the socket is failing: the flusher (if any) and the reconnect see to it
        if flusher_runs and queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())
        return
    nc._pending = []
    nc._pending_data_size = 0
    nc._rt_last_write = asyncio.get_running_loop().time()  # type: ignore[attr-defined]


# -- the read loop's parser --------------------------------------------------------------------

_ORIGINAL_PARSE = Parser.parse
_AWAITING_CONTROL_LINE = _parser.AWAITING_CONTROL_LINE
_AWAITING_MSG_PAYLOAD = _parser.AWAITING_MSG_PAYLOAD


async def _parse(self: Parser, data: bytes = b"") -> None:
    """nats-py's ``Parser.parse``, with MSG and HMSG lines (nearly all the server sends) read
    by one split instead of nats-py's patterns, and their messages handed over without a
    coroutine where nothing of nats-py's own dispatch applies: a :class:`RawRoute`'s (a room's
    live events), and a :func:`direct_dispatch` subscription's message without headers
    (JetStream acks). Any other line (PING, PONG, INFO, +OK, -ERR, a line this reading would
    take differently from nats-py's patterns: doubled or odd whitespace, a count that is not
    digits) goes to nats-py's own parse, from there on, with the buffer as it is; so the
    result is nats-py's for every input (``tests/unit/test_nats_parser.py`` compares them on
    seeded streams cut at random). A :class:`GatheringRoute`'s messages are handed over as
    one list per read, before anything else is and at the end of the read."""
    buf = self.buf
    buf.extend(data)
    # Read from one bytes copy of the buffer, at ``pos``: each slice of it is the message's
    # bytes at once (a bytearray's slice is a bytearray, copied again by bytes()), and what was
    # read leaves the buffer once, at the end (deleting each message from its front moved the
    # rest of the buffer every time).
    view = bytes(buf)
    size = len(view)
    pos = 0
    nc = self.nc
    gathered: dict[GatheringRoute, list[Any]] = {}  # a GatheringRoute's, handed over below
    try:
        while pos < size:
            if self.state == _AWAITING_CONTROL_LINE:
                end = view.find(b"\r\n", pos)
                if end < 0:
                    return  # a line still coming (nats-py waits too: each pattern ends in CRLF)
                line = view[pos:end]
                parts = line.split(b" ")
                n = len(parts)
                op = parts[0]
                if op == b"MSG" and (n == 4 or n == 5):
                    header_size = b"0"
                elif op == b"HMSG" and (n == 5 or n == 6):
                    header_size = parts[-2]
                else:
                    break  # nats-py's own reading, below
                sid_text, size_text = parts[2], parts[-1]
                has_reply = n == (6 if op == b"HMSG" else 5)
                reply = parts[3] if has_reply else b""
                # Digits where nats-py wants them, no field empty, and no whitespace but single
                # spaces (what nats-py's \s takes). With every field non-empty, the single spaces
                # are the ones split on, and any other whitespace is \t, \n, \v, \f or \r:
                # looked for by byte value (a bytes needle costs an exception inside `in`), ~5x
                # cheaper than splitting again on whitespace.
                if (not sid_text.isdigit() or not size_text.isdigit()
                        or not header_size.isdigit() or not parts[1]
                        or (has_reply and not reply) or 9 in line
                        or 10 in line or 11 in line or 12 in line or 13 in line):
                    break
                subject, sid = parts[1], int(sid_text)
                needed = self.needed = int(size_text)
                header_needed = int(header_size)
                start = end + 2
                if size < start + needed + 2:  # the payload is still coming: wait for it
                    self.msg_arg["subject"] = subject
                    self.msg_arg["sid"] = sid
                    self.msg_arg["reply"] = reply
                    self.header_needed = header_needed
                    pos = start
                    self.state = _AWAITING_MSG_PAYLOAD
                    return
            else:
                needed = self.needed
                if size < pos + needed + 2:
                    return  # the payload is still coming
                header_needed = self.header_needed
                arg = self.msg_arg
                subject, sid, reply = arg["subject"], arg["sid"], arg["reply"]
                self.header_needed = 0
                self.state = _AWAITING_CONTROL_LINE
                start = pos
            # The message: its line read above (at pos), or read before (start = pos).
            if header_needed > 0:
                hdr: bytes | None = view[start:start + header_needed]
                payload = view[start + header_needed:start + needed]
            else:
                hdr = None
                payload = view[start:start + needed]
            pos = start + needed + 2
            sub: Any = nc._subs.get(sid)
            if isinstance(sub, RawRoute):  # as _process_msg would, without its coroutine
                nc.stats["in_msgs"] += 1
                nc.stats["in_bytes"] += len(payload)
                sub._received += 1
                if isinstance(sub, GatheringRoute):
                    try:
                        item = sub.item(subject, payload, hdr)
                    except Exception:  # never into nats-py's read loop, which would stop
                        log.exception("! message of %s not read", sub._subject)
                        item = None
                    if item is not None:
                        items = gathered.get(sub)
                        if items is None:
                            gathered[sub] = [item]
                        else:
                            items.append(item)
                    continue
                if gathered:
                    _hand_over(gathered)
                sub.deliver(subject, payload, hdr)
                continue
            if gathered:
                _hand_over(gathered)  # what came before goes first
            if (hdr is None and sub is not None and type(sub._pending_queue) is _Direct
                    and not sub._max_msgs and sub._jsi is None and sub._future is None
                    and sub._pending_size + len(payload) < sub._pending_bytes_limit):
                # nats-py's _process_msg for such a subscription, step by step (no message limit,
                # no JetStream context, no request future, within its pending bytes: the
                # handover's own put_nowait)
                nc.stats["in_msgs"] += 1
                nc.stats["in_bytes"] += len(payload)
                sub._received += 1
                msg = nc._build_message(sid, subject, reply, payload, None)
                sub._pending_size += len(payload)  # the handover takes it off again
                sub._pending_queue.put_nowait(msg)
            else:
                await nc._process_msg(sid, subject, reply, payload, hdr)
    finally:
        del buf[:pos]  # what was read (the rest, if any, is read on the next call)
        if gathered:
            _hand_over(gathered)
    if buf:
        await _ORIGINAL_PARSE(self)


def install() -> None:
    """Replace nats-py's header parser, PONG handler, PING, flusher wake-up, message
    dispatch and protocol parser (idempotent)."""
    Parser.parse = _parse  # type: ignore[method-assign]
    Client._send_ping = _send_ping  # type: ignore[method-assign]
    Client._flush_pending = _flush_pending  # type: ignore[method-assign]
    Client._parse_header_lines = staticmethod(_parse_header_lines)  # type: ignore[method-assign]
    _client_module.parse_email = None  # type: ignore[attr-defined]  # nats-py without fast_mail_parser
    Client._process_pong = _process_pong  # type: ignore[method-assign]
    Client._process_msg = _process_msg  # type: ignore[method-assign]


# -- many publishes, one command ---------------------------------------------------------------

_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def header_lines(headers: dict[str, str]) -> str:
    """``headers`` as the lines nats-py's ``publish`` would write for them (values stripped,
    CR and LF as spaces; names must be valid: the caller's constants), each ending in CRLF."""
    out = ""
    for k, v in headers.items():
        v = v.strip()
        if "\r" in v or "\n" in v:  # translate costs ~2 us even when it changes nothing
            v = v.translate(_NEWLINES)
        out += f"{k}: {v}\r\n"
    return out


_Msgs = Sequence[tuple[str, str, bytes, str | None]]
# Subjects that passed nats-py's check (a regex search, ~1% of an event's instructions): a
# room's subject is published to again and again. Emptied when full.
_VALID_SUBJECTS: set[str] = set()
_VALID_SUBJECTS_MAX = 4096


def _commands(nc: Client, msgs: _Msgs) -> bytes:
    """The HPUB commands of ``msgs`` (a PUB where the header lines are None) as one buffer,
    after the checks ``publish`` makes (raising what it would), all made before anything is
    queued."""
    if nc.is_closed:
        raise errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise errors.ConnectionDrainingError
    total = 0
    parts: list[bytes] = []
    max_payload = nc._max_payload
    valid = _VALID_SUBJECTS
    for subject, reply, payload, lines in msgs:
        if subject not in valid:
            _validate_subject(subject)  # raises for a bad one: never kept
            if len(valid) >= _VALID_SUBJECTS_MAX:
                valid.clear()
            valid.add(subject)
        if reply:
            _validate_subject(reply)
        size = len(payload)
        if size > max_payload:
            raise errors.MaxPayloadError
        total += size
        if lines is not None:
            hdr = f"NATS/1.0\r\n{lines}\r\n".encode()
            parts.append(f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + size}\r\n".encode())
            parts.append(hdr)
        else:
            parts.append(f"PUB {subject} {reply} {size}\r\n".encode())
        parts.append(payload)
        parts.append(b"\r\n")
    if not nc.is_connected and (nc._max_pending_size <= 0
                                or total + nc._pending_data_size > nc._max_pending_size):
        raise errors.OutboundBufferLimitError
    nc.stats["out_msgs"] += len(msgs)
    nc.stats["out_bytes"] += total
    return b"".join(parts)


async def publish_many(nc: Client, msgs: _Msgs) -> None:
    """Publish ``(subject, reply, payload, header lines)`` in order, as that many
    ``nc.publish`` calls would, as one write to nats-py's pending buffer and one flush.

    The header lines are :func:`header_lines`'s (so the same dict gives the same header as
    ``publish`` would: a ``Nats-Msg-Id`` sent in a batch and again on its own is one key).
    The same checks as ``publish``, made for all of them before any is written (so either all
    are queued or none is, with the error ``publish`` would raise). A JetStream atomic batch of
    1,000 events costs nats-py about 8 us per message one by one (a header dict walk, a
    subject regex, a future per flush).
    """
    command = _commands(nc, msgs)
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def publish_now(nc: Client, subject: str, payload: bytes, lines: str | None = None,
                reply: str = "", *, later: bool = False) -> None:
    """``nc.publish(subject, payload, reply)`` (with the header :func:`header_lines` gave
    ``lines``) without a coroutine, for a message sent from synchronous code (a presence
    entry, a volatile event, the first try of a JetStream publish whose ack comes back on a
    reply inbox): no task to run it. Raises what ``publish`` would.

    Queued in the client's pending buffer, in order with everything else sent, and the
    flusher task is woken as ``publish`` wakes it. One difference: past the client's pending
    limit ``publish`` waits for that flush, this does not wait (a caller sending many should
    use :func:`publish_many`).

    ``later``: the message may wait for the connection's next write, up to ``COALESCE_S``
    (:func:`_wake_later`): for what nobody waits on within milliseconds (a presence entry, a
    read of a join), never for an event.
    """
    _queue_command(nc, _commands(nc, [(subject, reply, payload, lines)]), later)


def subscribe_now(nc: Client, sub: Any) -> None:
    """``nc._send_subscribe(sub)`` (a ``Subscription`` or a :class:`Route`) from synchronous
    code, without its three coroutines: the SUB is queued as :meth:`Route.unsubscribe_now`
    queues an UNSUB, and may wait for the connection's next write, as every SUB does
    (:func:`_wake_later`). One difference, as :func:`publish_now`'s: past the client's pending
    limit nats-py would wait for a flush, this does not wait (a SUB is ~60 bytes)."""
    _queue_command(nc, sub_cmd(sub._subject, sub._queue or "", sub._id), later=True)


def _queue_command(nc: Client, command: bytes, later: bool) -> None:
    """Queue ``command`` in the client's pending buffer and have it written (see
    :func:`publish_now`)."""
    nc._pending.append(command)
    nc._pending_data_size += len(command)
    queue, flusher, transport = nc._flush_queue, nc._flusher_task, nc._transport
    if not nc.is_connected or queue is None or transport is None:
        return  # sent once connected again (nats-py flushes its pending buffer then)
    if flusher is None or flusher.done():
        # As _flush_pending does when the flusher is gone: write inline.
        transport.writelines(nc._pending[:])
        nc._pending = []
        nc._pending_data_size = 0
        return
    if later:
        _wake_later(nc, queue)
    else:
        _wake(nc, queue)


# -- messages handed over in the read loop -------------------------------------------------------


class _Handover:
    """Stands in for a subscription's pending queue, whose messages are handed to ``handler``
    at once in the connection's read loop: what nats-py's drain and close ask of a queue."""

    __slots__ = ("handler",)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        return None


class _Direct(_Handover):
    """Each message goes to the handler as nats-py's ``Msg`` (no queue, no task switch, no
    coroutine per message)."""

    __slots__ = ("sub",)

    def __init__(self, sub: Subscription, handler: Callable[[Msg], None]) -> None:
        self.sub = weakref.ref(sub)  # the subscription holds this: no cycle for the collector
        self.handler = handler

    def put_nowait(self, msg: Msg) -> None:
        sub = self.sub()
        if sub is not None:
            sub._pending_size -= len(msg.data)  # what nats-py's queue reader would do
        try:
            self.handler(msg)
        except Exception:  # never into nats-py's read loop, which would stop reading
            log.exception("! handler of %s failed", msg.subject)


class Route(_Handover):
    """A subscription as nats-py's client sees one (its read loop, the SUBs a reconnect sends
    again, close and drain), for the node's own many subscriptions: rpc targets and the rooms'
    live subjects. ~100 bytes with no queue and no task, against ~500 for a ``Subscription``
    with a :class:`_Direct`. Each message goes to ``handler`` at once, in the read loop, as
    nats-py's ``Msg``; exceptions are logged, never raised into the read loop."""

    __slots__ = ("_closed", "_id", "_nc", "_pending_size", "_queue", "_received", "_subject")
    # What nats-py reads and a route never has: a limit, a JetStream context, a future, a
    # bytes limit on pending messages (0: none), a task or iterator to stop.
    _max_msgs = 0
    _jsi = None
    _future = None
    _pending_bytes_limit = 0
    _wait_for_msgs_task = None
    _message_iterator = None
    _pending_next_msgs_calls = None

    def __init__(self, nc: Any, sid: int, subject: str, handler: Callable[..., None],
                 queue: str = "") -> None:
        self._nc = nc
        self._id, self._subject, self._queue = sid, subject, queue
        self.handler = handler
        self._received = 0
        self._pending_size = 0
        self._closed = False

    @property
    def _pending_queue(self) -> Route:
        return self

    @property
    def pending_msgs(self) -> int:
        """Messages waiting (as a ``Subscription`` says): none, each is handed over at once."""
        return 0

    @property
    def pending_bytes(self) -> int:
        return 0

    def put_nowait(self, msg: Msg) -> None:
        """nats-py's read loop hands over one message."""
        self._pending_size = 0
        try:
            self.handler(msg)
        except Exception:  # never into the client's read loop
            log.exception("! handler of %s failed", self._subject)

    async def _drain(self) -> None:  # the client drains: no more messages
        try:
            await self.unsubscribe()
        except Exception:  # closing meanwhile: nothing left to unsubscribe from
            pass

    async def unsubscribe(self) -> None:
        """No more messages; the server forgets the subscription."""
        self.unsubscribe_now()

    def unsubscribe_now(self) -> None:
        """:meth:`unsubscribe` from synchronous code, with no task to run it: the UNSUB is
        queued as :func:`publish_now` queues a message, and may wait for the next write (as
        every UNSUB does, see :func:`_wake_later`)."""
        nc = self._nc
        self._closed = True
        nc._remove_sub(self._id)
        if not nc.is_closed:
            # Also while reconnecting (unlike nats-py's own unsubscribe): its SUB may wait in
            # the client's buffer, sent after the reconnect; the UNSUB follows it there (a
            # subscription left on the server would take its share of a queue group's
            # messages, or keep sending a room's events).
            _queue_command(nc, unsub_cmd(self._id, 0), later=True)


class RawRoute(Route):
    """A ``raw`` :func:`direct_dispatch` route: nats-py's ``_process_msg`` (patched) hands its
    handler each message's payload and raw headers, with no ``Msg`` built."""

    __slots__ = ()

    def deliver(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        try:
            self.handler(data, headers)
        except Exception:  # never into nats-py's read loop, which would stop reading
            log.exception("! handler of %s failed", subject.decode(errors="replace"))


class GatheringRoute(RawRoute):
    """A :class:`RawRoute` whose handler gets the messages one read of the connection brought
    for it as one list, in order: the read loop's parser gathers them (:meth:`item` turns each
    into what the list holds, None to skip it) and hands each route its list (:meth:`hand_over`)
    before it hands over any other message (every route's list, so what a read brought goes out
    in the order it came, acks after the events they follow), and at the end of the read. A
    message read another way (nats-py's own dispatch) is a list of one. For a room's live
    events: one call of the room per read instead of one per event."""

    __slots__ = ()

    def item(self, subject: bytes, data: bytes, headers: bytes | None) -> Any:
        """What the handler's list holds for this message (None: nothing)."""
        return data

    def deliver(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        try:
            item = self.item(subject, data, headers)
        except Exception:  # never into nats-py's read loop, which would stop reading
            log.exception("! message of %s not read", self._subject)
            return
        if item is not None:
            self.hand_over([item])

    def hand_over(self, items: list[Any]) -> None:
        try:
            self.handler(items)
        except Exception:  # never into nats-py's read loop, which would stop reading
            log.exception("! handler of %s failed", self._subject)


def _hand_over(gathered: dict[GatheringRoute, list[Any]]) -> None:
    for route, items in gathered.items():
        route.hand_over(items)
    gathered.clear()


def header_value(raw: bytes | None, name: bytes) -> bytes | None:
    """The value of the header ``name`` (stripped) in a raw NATS header block as nats-server
    writes it (``NATS/1.0[ status]\r\nName: value\r\n...``), or None. For the headers the
    server sets itself (a stream's RePublish: ``Nats-Sequence``, ``Nats-Last-Sequence``...),
    this is what nats-py's header dict holds under that name.

    The last line of that name, as nats-py's dict keeps the last: a republished message keeps
    the headers it was published with, and the server appends its own after them. A backend
    publishing into a room with a ``Nats-Sequence`` header of its own (a relay copying
    another stream's message) must not be read as that seq
    (tests/integration/test_backend_headers.py)."""
    if not raw:
        return None
    key = b"\r\n" + name + b":"
    i = raw.rfind(key)
    if i < 0:
        return None
    i += len(key)
    j = raw.find(b"\r\n", i)
    return raw[i:j if j >= 0 else len(raw)].strip()


def _check_subscribe(nc: Client, subject: str) -> None:
    """What ``nc.subscribe`` checks first (and raises the same errors)."""
    if not nc._skip_subject_validation:
        _validate_subject(subject, strict=True)
    elif not subject:
        raise errors.BadSubjectError
    if nc.is_closed:
        raise errors.ConnectionClosedError
    if nc.is_draining:
        raise errors.ConnectionDrainingError


async def direct_dispatch(nc: Client, subject: str,
                          handler: Callable[[Msg], None]) -> Subscription:
    """``nc.subscribe(subject)`` whose messages are handed to ``handler`` as nats-py's ``Msg``
    (synchronous, quick, never raising into the read loop: exceptions are logged) as nats-py
    reads them, in order.

    A subscription with a ``cb`` costs a queue put, a task switch and a coroutine per message;
    for a room's live events that was ~7 us each. It also starts a task at subscribe time,
    which this does not. ``unsubscribe`` and ``drain`` work as usual.
    """
    _check_subscribe(nc, subject)
    nc._sid += 1
    # No cb and no future: nats-py starts no task for it. Its queue is replaced before the
    # server knows the subscription, so no message can be left in the old one.
    sub = Subscription(nc, nc._sid, subject)
    sub._pending_queue = _Direct(sub, handler)  # type: ignore[assignment]
    nc._subs[sub._id] = sub
    subscribe_now(nc, sub)
    return sub


async def raw_dispatch(nc: Client, subject: str, handler: Callable[..., None],
                       route_cls: type[RawRoute] = RawRoute) -> RawRoute:
    """:func:`raw_route`, awaitable as :func:`direct_dispatch` is."""
    return raw_route(nc, subject, handler, route_cls)


def raw_route(nc: Client, subject: str, handler: Callable[..., None],
              route_cls: type[RawRoute] = RawRoute) -> RawRoute:
    """:func:`direct_dispatch` with ``handler(payload, raw_headers)`` (read the headers with
    :func:`header_value`; needs :func:`install`): no ``Msg`` and no header dict per message,
    and a :class:`RawRoute` of ~100 bytes instead of a ``Subscription`` (every room has two).
    ``unsubscribe`` and ``drain`` work as usual. A subclass of :class:`RawRoute` as
    ``route_cls`` calls ``handler`` as its ``deliver`` says."""
    _check_subscribe(nc, subject)
    nc._sid += 1
    route = route_cls(nc, nc._sid, subject, handler)
    nc._subs[route._id] = route  # type: ignore[assignment]
    subscribe_now(nc, route)
    return route
