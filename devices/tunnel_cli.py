"""``rtnode devices tunnel DEVICE_ID``: try the MQTT protocol tunnel (PROTOCOL.md 6.1) from a shell.

Two ``mosquitto_pub``/``mosquitto_sub`` processes cannot do it: both would need the device's
client id, and each new connection with that id takes the other's over. This command is one
MQTT connection that does what a device does (docs/tunnel.md):

1. CONNECT with client id = user name = DEVICE_ID and the device's JWT as password;
2. SUBSCRIBE ``rtnode/v1/<id>/out`` (before anything is sent: the node drops what it would
   publish there before the subscription);
3. PUBLISH an explicit ``connect`` frame carrying the JWT again, and wait for ``connected``;

then it reads frames as JSON objects from stdin, one per line, PUBLISHes each as one CBOR map
(QoS 1) on ``rtnode/v1/<id>/in``, and prints every frame the node publishes on ``out`` as a JSON
line on stdout. Errors and notes are one line on stderr. End of input (Ctrl-D) waits for the
replies still due (at most ``--wait`` seconds), then disconnects; Ctrl-C disconnects at once.

The pure part (:func:`frame_from_line`, :func:`frames_from_payload`, :func:`parse_mqtt_url`,
:class:`PendingReplies`) has no I/O; :func:`run_tunnel` is the MQTT glue around it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from node.protocol.errors import CodecError, ConfigError, ProtocolError
from node.protocol.frames import CBOR, JSON, json_loads_strict, parse_frame
from node.protocol.ids import ID_RULE, is_valid_id
from node.protocol.settings import Settings, load_settings
from node.protocol.tokens import mint_token, parse_room_grant

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_GRANT",
    "MINTED_TTL_S",
    "PendingReplies",
    "TunnelError",
    "TunnelTarget",
    "end_tasks",
    "frame_from_line",
    "frames_from_payload",
    "main",
    "parse_mqtt_url",
    "run_tunnel",
    "tunnel_token",
]

#: How long the explicit ``connect`` waits for its ``connected``.
CONNECT_TIMEOUT_S = 10.0
#: Rights of a token minted here when no ``--token`` is given and no ``--room`` either.
DEFAULT_GRANT = "*=join,publish,history,presence"
#: Lifetime of a minted token: a session at a shell, not a device in the field.
MINTED_TTL_S = 3600.0
#: Client frame types whose reply carries the request's ``id`` (``reply`` and ``ack`` have none).
_ANSWERED = frozenset({"connect", "join", "leave", "publish", "history", "presence", "rpc",
                       "refresh", "ping"})
# Requests that get no typed reply without an ``id`` (``connect`` and ``join`` always get theirs).
_SILENT_WITHOUT_ID = frozenset({"leave", "publish", "history", "presence", "refresh", "ping"})
# CONNACK codes (MQTT 3.1.1 section 3.2.2.3) in words.
_CONNACK = {1: "unacceptable protocol version", 2: "identifier rejected",
            3: "server unavailable", 4: "bad user name or password", 5: "not authorized"}
_V5_TO_V3 = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class TunnelError(Exception):
    """The tunnel cannot go on: the message is the one line printed (exit status 1)."""


@dataclass(frozen=True)
class TunnelTarget:
    """Where the node's MQTT listener is."""

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> TunnelTarget:
    """``mqtt://HOST[:PORT]`` (default port 1883) or ``mqtts://HOST[:PORT]`` (8883).

    Raises:
        ValueError: Another scheme, no host, or a bad port (one line).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"--mqtt-url: bad port in {url!r}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"--mqtt-url must be mqtt://HOST:PORT or mqtts://HOST:PORT, not {url!r}")
    if parts.username or parts.password:
        raise ValueError("--mqtt-url takes no user or password: the device id and its token are")
    tls = parts.scheme == "mqtts"
    return TunnelTarget(parts.hostname, port if port is not None else (8883 if tls else 1883),
                        tls)


def frame_from_line(line: str, *, check: bool = True) -> dict[str, Any]:
    """The frame a line of input stands for: a JSON object, e.g. ``{"type":"ping","id":1}``.

    Args:
        line: One line of input (without or with its newline).
        check: Validate it as a client frame of PROTOCOL.md section 1 (``parse_frame``), so
            that a mistake costs no error against the node's tolerance; False sends any object.

    Returns:
        The object as it will be sent (unknown fields kept: the node ignores them).

    Raises:
        ValueError: Not JSON, not an object, or (with ``check``) not a valid frame; one line.
    """
    try:
        frame = json_loads_strict(line)
    except CodecError as exc:
        raise ValueError(exc.reason) from None
    if not isinstance(frame, dict):
        raise ValueError('a frame is a JSON object, e.g. {"type":"ping","id":1}')
    if check:
        try:
            parse_frame(frame)
        except ProtocolError as exc:
            raise ValueError(exc.reason) from None
        if frame["type"] == "rpc" and "id" not in frame:
            raise ValueError('an rpc needs an "id" (the node refuses one without: 4000)')
    return frame


def frames_from_payload(payload: bytes) -> list[dict[str, Any] | Any]:
    """The frames of one PUBLISH on ``out`` (one CBOR map; a sequence is read whole).

    Raises:
        ValueError: Not CBOR (one line).
    """
    try:
        return CBOR.decode(payload)
    except CodecError as exc:
        raise ValueError(exc.reason) from None


def json_line(frame: Any) -> str:
    """A frame as one line of compact JSON (byte strings as base64, like JSON clients get)."""
    return JSON.encode(frame).decode("utf-8")


class PendingReplies:
    """The ids of requests sent and not answered yet (what end of input waits for)."""

    def __init__(self) -> None:
        self._ids: set[tuple[str, Any]] = set()

    def sent(self, frame: dict[str, Any]) -> None:
        """Note a frame sent; only a request with an ``id`` expects a reply."""
        rid = frame.get("id")
        if frame.get("type") in _ANSWERED and _hashable(rid):
            self._ids.add((type(rid).__name__, rid))

    def received(self, frame: Any) -> None:
        """Note a frame from the node: a reply (or error) with an id settles its request."""
        if isinstance(frame, dict) and frame.get("type") != "rpc" and _hashable(frame.get("id")):
            rid = frame["id"]
            self._ids.discard((type(rid).__name__, rid))

    def __len__(self) -> int:
        return len(self._ids)


def _hashable(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


# -- the token -------------------------------------------------------------------------------


def tunnel_token(args: argparse.Namespace, settings: Settings,
                 note: Callable[[str], None]) -> str:
    """The JWT to connect with: ``--token``, ``--token-file``, or one minted with the node's key.

    A minted token is signed as ``rtnode token`` signs: ``RTNODE_JWT_SECRET``, else the secret
    the node keeps in ``<data-dir>/jwt-secret``. It is never created here: a secret made up
    by this command would only sign tokens that the node refuses.

    Raises:
        ConfigError: No token and no key to sign one, an unreadable file, a bad ``--room``.
    """
    if args.token is not None and args.token_file is not None:
        raise ConfigError("give --token or --token-file, not both")
    if args.token is not None:
        return str(args.token).strip()
    if args.token_file is not None:
        try:
            text = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"cannot read --token-file {args.token_file}: {reason}") from None
        if not text:
            raise ConfigError(f"--token-file {args.token_file} is empty")
        return text
    secret, where = settings.jwt_secret, "RTNODE_JWT_SECRET"
    if not secret:
        path = settings.data_dir / "jwt-secret"
        where = str(path)
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError:
            secret = ""
        if not secret:
            raise ConfigError(
                f"no --token, and no node key to sign one ({path} does not exist, "
                "RTNODE_JWT_SECRET is unset): pass --data-dir of the node, or "
                f"--token $(rtnode token --kind device --sub {args.device_id} "
                "--room 'ROOM=join,publish')")
    rooms: dict[str, list[str]] = {}
    for spec in args.room or [DEFAULT_GRANT]:
        try:
            pattern, rights = parse_room_grant(spec)
        except ValueError as exc:
            raise ConfigError(f"--room: {exc}") from None
        rooms.setdefault(pattern, []).extend(r for r in rights if r not in rooms[pattern])
    try:
        token = mint_token(secret, sub=args.device_id, tenant=args.tenant, kind="device",
                           rooms=rooms, ttl_s=MINTED_TTL_S, issuer=settings.jwt_issuer,
                           audience=settings.jwt_audience)
    except Exception as exc:  # PyJWT raises several types for unusable keys
        raise ConfigError(f"cannot sign a token: {exc}") from None
    grants = " ".join(f"{p}={','.join(r)}" for p, r in rooms.items())
    note(f"no --token: a device token for {args.device_id} (tenant {args.tenant}, rooms "
         f"{grants}, valid 1 h) signed with the node's key from {where}")
    return token


# -- the MQTT glue ---------------------------------------------------------------------------


def _stdin_lines(loop: asyncio.AbstractEventLoop, stream: TextIO,
                 queue: asyncio.Queue[str | None]) -> None:
    """Read ``stream`` in a daemon thread (a blocked read must not hold up the exit)."""

    def read() -> None:
        try:
            for line in stream:
                loop.call_soon_threadsafe(queue.put_nowait, line)
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="tunnel-stdin", daemon=True).start()


def _code(rc: Any) -> int:
    """An MQTT return code (an int, or paho's ReasonCode) as an int; -1 if it is neither."""
    try:
        return int(getattr(rc, "value", rc))
    except (TypeError, ValueError):
        return -1


def _connack_words(exc: MqttConnectError, device_id: str) -> str:
    code = _code(exc.rc)
    code = _V5_TO_V3.get(code, code)  # paho reports MQTT 3.1.1 codes as MQTT 5 reason codes
    if code < 0:
        return str(exc)
    words = f"{_CONNACK.get(code, 'refused')} (CONNACK {code})"
    if code in (4, 5):
        words += (f": the token must be a device token (kind device) whose sub is {device_id}, "
                  "signed with this node's key and not expired (the node's log says which)")
    return words


async def run_tunnel(target: TunnelTarget, device_id: str, token: str, *,
                     stdin: TextIO, out: Callable[[str], None], err: Callable[[str], None],
                     check: bool = True, wait_s: float = 5.0, keepalive: int = 30) -> int:
    """Run the tunnel until end of input, a cancel (Ctrl-C), or the node's close.

    Args:
        target: The node's MQTT listener.
        device_id: Client id, user name and the token's ``sub``.
        token: The device JWT: the MQTT password, and the ``connect`` frame's ``token``.
        stdin: Where JSON frames come from, one per line.
        out: Writes one line of output (a frame as JSON).
        err: Writes one line of errors and notes.
        check: Validate input frames before sending them (see :func:`frame_from_line`).
        wait_s: At end of input, how long to wait for replies still due.
        keepalive: MQTT keepalive in seconds.

    Returns:
        0 after end of input or a cancel.

    Raises:
        TunnelError: The node could not be reached, refused the device, or closed the tunnel.
    """
    topic_in, topic_out = f"rtnode/v1/{device_id}/in", f"rtnode/v1/{device_id}/out"
    tls = ssl.create_default_context() if target.tls else None
    client = aiomqtt.Client(target.host, target.port, identifier=device_id,
                            username=device_id, password=token, keepalive=keepalive,
                            timeout=CONNECT_TIMEOUT_S, tls_context=tls)
    pending = PendingReplies()
    settled = asyncio.Event()  # set when a reply arrives (end of input re-checks pending)
    connected = asyncio.Event()
    goodbye: list[dict[str, Any]] = []

    async def read() -> None:
        async for message in client.messages:
            if str(message.topic) != topic_out:
                continue
            payload = message.payload
            try:
                data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                frames = frames_from_payload(data)
            except ValueError as exc:
                err(f"rtnode: undecodable frame on {topic_out}: {exc}")
                continue
            for frame in frames:
                out(json_line(frame))
                pending.received(frame)
                settled.set()
                if isinstance(frame, dict):
                    if frame.get("type") == "connected":
                        connected.set()
                    elif frame.get("type") == "disconnect":
                        goodbye.append(frame)

    async def send(frame: dict[str, Any]) -> None:
        await client.publish(topic_in, CBOR.encode(frame), qos=1)
        pending.sent(frame)

    async def write() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        _stdin_lines(loop, stdin, queue)
        number = 0
        while (line := await queue.get()) is not None:
            number += 1
            if not line.strip():
                continue
            try:
                frame = frame_from_line(line, check=check)
            except ValueError as exc:
                err(f"rtnode: line {number}: {exc} (not sent)")
                continue
            if "id" not in frame and frame.get("type") in _SILENT_WITHOUT_ID:
                err(f"rtnode: line {number}: no \"id\": the node sends no reply to this "
                    f"{frame.get('type')} (errors still come)")
            await send(frame)
        # End of input: the replies still due, within wait_s.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                while len(pending):
                    settled.clear()
                    await settled.wait()

    try:
        async with client:
            granted = await client.subscribe(topic_out, qos=1)
            if any(_code(code) >= 0x80 for code in granted):
                raise TunnelError(f"the node refused the subscription to {topic_out}")
            reader = asyncio.create_task(read(), name=f"tunnel[{device_id}].read")
            writer: asyncio.Task[None] | None = None
            try:
                # The node needs the token again in an explicit connect (the frame's schema);
                # its ``connected`` says the device is registered (rpc) and out is flowing.
                await send({"type": "connect", "token": token,
                            "client": {"name": "rtnode-tunnel", "version": "1"}})
                hello = asyncio.create_task(connected.wait())
                done, _ = await asyncio.wait({hello, reader}, timeout=CONNECT_TIMEOUT_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                hello.cancel()
                if not done:
                    raise TunnelError(f"no connected frame within {CONNECT_TIMEOUT_S:g} s")
                if reader not in done:
                    writer = asyncio.create_task(write(), name=f"tunnel[{device_id}].write")
                    await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
                if writer is not None and writer.done():
                    writer.result()  # end of input: a clean DISCONNECT follows
                    return 0
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
                raise TunnelError("the node closed the connection")
            finally:
                await end_tasks(writer, reader)
    except MqttConnectError as exc:
        words = _connack_words(exc, device_id)
        raise TunnelError(f"{target} refused device {device_id}: {words}") from None
    except aiomqtt.MqttError as exc:
        if goodbye:
            frame = goodbye[-1]
            raise TunnelError(f"the node closed the tunnel: {frame.get('code')} "
                              f"{frame.get('reason')}") from None
        text = str(exc)
        if "Connection refused" in text or "Errno" in text or "timed out" in text.lower():
            raise TunnelError(f"cannot reach the node's MQTT listener at {target}: "
                              f"{text}") from None
        raise TunnelError(f"connection to {target} lost: {text} (the node stopped, or a "
                          f"newer connection with client id {device_id} took over)") from None
    except TunnelError:
        if goodbye:
            frame = goodbye[-1]
            raise TunnelError(f"the node closed the tunnel: {frame.get('code')} "
                              f"{frame.get('reason')}") from None
        raise


async def end_tasks(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel and await the tasks still running; take the error of those that ended with one.

    The writer's publish and the reader's iteration may both end with the connection: the
    error the tunnel reports is raised by its caller, and the other one is taken here, not
    printed at exit as "Task exception was never retrieved".
    """
    for task in tasks:
        if task is None:
            continue
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
        elif not task.cancelled():
            task.exception()


def _quiet_closed_socket(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler, without one known traceback.

    When the node closes the connection while a PUBLISH is on its way, aiomqtt still asks the
    loop to watch paho's socket, already closed (EBADF in a callback): the close is reported
    in one line anyway. Everything else goes to the default handler.
    """
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno == errno.EBADF:
        return
    loop.default_exception_handler(context)


def main(args: argparse.Namespace) -> int:
    """``rtnode devices tunnel``: check the flags, find the token, run until the end.

    Returns:
        0 at end of input or Ctrl-C; 1 when the node cannot be reached, refuses or closes.

    Raises:
        ConfigError: A bad flag (the caller prints it as one line, exit 2).
    """
    if not is_valid_id(args.device_id):
        raise ConfigError(f"DEVICE_ID must be {ID_RULE}, not {args.device_id!r}")
    flags: dict[str, Any] = {"data_dir": args.data_dir} if hasattr(args, "data_dir") else {}
    settings = load_settings(args.config, **flags)
    try:
        target = (parse_mqtt_url(args.mqtt_url) if args.mqtt_url
                  else TunnelTarget("127.0.0.1", settings.mqtt_port))
        wait_s = float(args.wait)
    except ValueError as exc:
        raise ConfigError(str(exc) if "mqtt-url" in str(exc)
                          else f"--wait must be a number of seconds, not {args.wait!r}") from None
    if not 0 <= wait_s < float("inf"):
        raise ConfigError(f"--wait must be a number of seconds, not {args.wait!r}")

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def out(line: str) -> None:
        print(line, flush=True)

    token = tunnel_token(args, settings, lambda text: err(f"rtnode: {text}"))
    if sys.stdin.isatty():
        err(f"rtnode: tunnel of {args.device_id} on {target}: one JSON frame per line, e.g. "
            '{"type":"join","id":1,"room":"sensors:lab"}; Ctrl-D or Ctrl-C to close')

    async def run() -> int:
        task = asyncio.ensure_future(run_tunnel(target, args.device_id, token, stdin=sys.stdin,
                                                out=out, err=err, check=not args.raw,
                                                wait_s=wait_s))
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_closed_socket)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return 0  # Ctrl-C: aiomqtt has sent DISCONNECT on the way out
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(run())
    except TunnelError as exc:
        err(f"rtnode: {exc}")
        return 1
    except OSError as exc:  # e.g. TLS trouble before MQTT
        err(f"rtnode: cannot reach the node's MQTT listener at {target}: {exc}")
        return 1
