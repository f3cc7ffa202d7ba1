"""The command line of replay: ``rtnode replay`` (a room's stored events) and ``rtnode consume``.

``rtnode replay`` reads one room with an ordered consumer and prints its events;
``rtnode consume`` runs a durable :class:`bridge.replay.ReplayConsumer` and prints each event
as a JSON line, acked once written. :func:`run_command` runs either until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

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
    return when if when.tzinfo else when.astimezone()


def _write_line(out: Any, line: str) -> None:
    out.write(line + "\n")
    out.flush()


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that exiting does not complain."""
    import os
    import sys

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


async def replay_room(
    servers: Sequence[str],
    room: str,
    *,
    tenant: str = "default",
    since: int | None = None,
    since_time: datetime | None = None,
    follow: bool = False,
    as_json: bool = False,
    out: Any = None,
    auth: NatsAuth | None = None,
) -> int:
    """Print a room's stored events (``rtnode replay``): those after ``since``, or from
    ``since_time``, or all; with ``follow``, then the live ones until cancelled.

    Reads with an ordered consumer (AckNone, in-memory, deleted with the connection); when it
    stays silent while the room has newer events (nats.py#510), it is recreated after the
    last printed seq. ``auth`` gives the credentials and TLS (default: none).

    Returns:
        The exit code (0).

    Raises:
        ReplayError: No NATS, or no room stream.
    """
    import sys

    out = out or sys.stdout
    subject = room_subject(tenant, room)
    nc = await connect_nats(servers, name="rtnode-replay-cli", auth=auth)
    sub: Any = None
    try:
        js = nc.jetstream(timeout=5)
        await require_room_stream(js)
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
            # Asked of the stream leader (not a direct get, which a lagging replica may
            # answer): the end of a replay without --follow must include every acked event.
            try:
                return int((await js.get_msg(STREAM_NAME, subject=subject)).seq or 0)
            except NotFoundError:
                return 0

        target = 0 if follow else await newest_seq()
        if not follow and target <= last_printed and since_time is None:
            return 0
        sub = await subscribe(last_printed, since_time)
        if not follow and since_time is not None:
            info = await sub.consumer_info()
            if info.num_pending == 0 and info.delivered.consumer_seq == 0:
                return 0  # nothing stored since that time
        while True:
            try:
                msg = await sub.next_msg(timeout=_STALL_CHECK_S)
            except TimeoutError:
                # Nothing for a while: is the consumer stalled while the room moved on?
                try:
                    newest = await newest_seq()
                except Exception:
                    continue
                if newest and newest > last_printed:
                    log.warning("! ordered consumer on %s stalled; resubscribing", room)
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = await subscribe(last_printed, None if last_printed else since_time)
                elif not follow:
                    return 0
                continue
            seq = msg.metadata.sequence.stream
            if seq > last_printed:
                try:
                    body = cbor_loads_strict(msg.data)
                except CodecError:
                    body = {"event": None, "data": None, "undecodable": True}
                try:
                    _write_line(out, _event_line(seq, body, room, as_json))
                except BrokenPipeError:
                    _quiet_stdout()
                    return 0
                last_printed = seq
            # The consumer's num_pending comes from its own replica, which may lag: stop at
            # the leader's newest seq instead.
            if not follow and last_printed >= target:
                return 0
    finally:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


async def consume_rooms(
    servers: Sequence[str],
    *,
    durable: str,
    rooms: str,
    tenant: str = "default",
    start: str = "all",
    out: Any = None,
    **options: Any,
) -> int:
    """Run a durable consumer that prints each event as a JSON line and acks it once the line
    is written and flushed (``rtnode consume``). Runs until cancelled. ``options`` go to
    :class:`bridge.replay.ReplayConsumer` (``auth``: credentials and TLS).

    Raises:
        ReplayError: No NATS, no room stream, or the durable exists for other rooms.
        ValueError: Bad pattern, durable or start.
    """
    import sys

    out = out or sys.stdout
    from node.protocol.frames import JSON

    consumer = ReplayConsumer(list(servers), tenant=tenant, rooms=rooms, durable=durable,
                              start=_parse_start(start), **options)
    async with consumer:
        async for ev in consumer:
            try:
                _write_line(out, JSON.encode(ev.as_map()).decode())
            except BrokenPipeError:
                _quiet_stdout()
                return 0  # not acked: nakked at close, delivered to the next run
            await ev.ack()
    return 0


def run_command(coro: Any) -> int:
    """Run a replay command until it ends or SIGINT/SIGTERM; errors are one line on stderr.

    Returns:
        0, 1 (NATS or JetStream trouble) or 2 (bad arguments).
    """
    import signal
    import sys

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
        return asyncio.run(main())
    except ReplayError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # NATS trouble mid-way: one line, no traceback
        print(f"rtnode: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
