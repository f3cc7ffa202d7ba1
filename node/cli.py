"""The ``rtnode`` command line: ``rtnode run`` starts a node, ``rtnode token`` mints a token.

Every setting of :class:`node.protocol.settings.Settings` is also a flag of ``run`` and
``token``; ``rtnode replay`` and ``rtnode consume`` take only those that say where the node's
NATS is and how to authenticate to it (``_REPLAY_SETTINGS``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from node.protocol.errors import ConfigError, NodeError
from node.protocol.settings import Settings, load_settings
from node.protocol.tokens import (
    KINDS,
    SECRET_FILE,
    create_secret,
    load_or_create_secret,
    load_secret,
    mint_token,
    parse_room_grant,
    revoke_token,
)

__all__ = ["build_parser", "main"]

_TOML_ONLY = {"namespaces"}


def _settings_parser(only: frozenset[str] | None = None) -> argparse.ArgumentParser:
    """The settings as flags: every one of them, or ``only`` those named (and ``--config``)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "settings", "each also read from RTNODE_<NAME> and from the --config file"
    )
    group.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    for name, field in Settings.model_fields.items():
        if name in _TOML_ONLY or (only is not None and name not in only):
            continue
        flag = "--" + name.replace("_", "-")
        help_ = f"{field.description} (RTNODE_{name.upper()})"
        if field.annotation in (bool, bool | None):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                               metavar=name.upper(), help=help_)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rtnode``."""
    settings = _settings_parser()
    parser = argparse.ArgumentParser(
        prog="rtnode",
        description="A real-time messaging node: browsers (WebSocket, SSE), MQTT devices and "
        "backends (HTTP, NATS) in shared rooms, stored in NATS JetStream.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run", parents=[settings], help="start a node (zero configuration needed)",
        description="Start a node. With no --nats-url it starts the bundled nats-server with "
        "JetStream in <data-dir>/nats and stops it on exit.",
    )
    run.add_argument("--workers", default="1", metavar="N",
                     help="node processes sharing the HTTP and MQTT ports (SO_REUSEPORT) and "
                     "one NATS, each a node named <node-name>-w<i>; 'auto': one per core "
                     "(default 1)")
    # A process of 'run --workers N', started by its parent (node/workers.py).
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    tok = sub.add_parser(
        "token", parents=[settings], help="print a signed token (JWT), or revoke one",
        description="Print a JWT signed with the node's key: RTNODE_JWT_SECRET, or the secret "
        "the node generated in <data-dir>/jwt-secret (found as the node finds it: --data-dir, "
        "RTNODE_DATA_DIR, the --config file, else ./rtnode-data), or --private-key for "
        "RS256/ES256. Without a secret there it refuses, unless --create-secret. Device "
        "tokens last 365 days by default, others 1 hour; each carries an id (jti), printed "
        "on stderr, that 'rtnode token --revoke JTI' withdraws.",
    )
    tok.add_argument("--sub", help="user, device or service id (required unless --revoke)")
    tok.add_argument("--tenant", default="default", help="tenant (default: default)")
    tok.add_argument("--kind", choices=KINDS, default="user", help="principal kind")
    tok.add_argument("--room", action="append", default=[], metavar="PATTERN=RIGHTS",
                     help="grant, e.g. 'chat:*=join,publish,history,presence' (repeatable)")
    tok.add_argument("--rpc", action="append", default=[], metavar="PATTERN",
                     help="rpc target the holder may call, e.g. 'server' or 'device:*'")
    tok.add_argument("--ttl", default=None, metavar="TIME",
                     help="lifetime: seconds, or with a unit (90m, 12h, 365d); 'never' (or 0): "
                     "no exp, only where the node accepts that (not in production mode). "
                     "Default: 1h, 365d for --kind device")
    tok.add_argument("--admin", action="store_true",
                     help="with --kind service: may join sys:all:stats (every tenant's rooms)")
    tok.add_argument("--private-key", type=Path, metavar="FILE",
                     help="PEM private key: sign with RS256/ES256 instead of the HS256 secret")
    tok.add_argument("--alg", choices=["HS256", "RS256", "ES256"], default=None,
                     help="algorithm (default HS256, or RS256 with --private-key)")
    tok.add_argument("--create-secret", action="store_true",
                     help="when the data dir has no jwt-secret, create one (said on stderr; a "
                     "node already running elsewhere will not accept its tokens)")
    tok.add_argument("--revoke", metavar="JTI|TOKEN",
                     help="instead of minting: add the token id JTI (or the id of TOKEN) to "
                     "<data-dir>/revoked-tokens; the node refuses that token at its next "
                     "connect (no restart)")
    dev = sub.add_parser("devices", help="device tools (simulator, tunnel)")
    dev_sub = dev.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    sim = dev_sub.add_parser(
        "simulate", help="run simulated MQTT devices sim-<i> publishing readings to a room",
        description="Run N devices sim-0..sim-<N-1> (the device SDK over the node's MQTT "
        "tunnel) publishing {t, i} readings to ROOM at HZ each and answering rpc 'read'. "
        "Tokens are signed with the node's key, as by 'rtnode token': RTNODE_JWT_SECRET or "
        "<data-dir>/jwt-secret.",
    )
    sim.add_argument("--count", type=int, default=1, metavar="N", help="devices (default 1)")
    sim.add_argument("--room", required=True, help="room the readings go to")
    sim.add_argument("--rate", type=float, default=1.0, metavar="HZ",
                     help="readings per second per device (default 1)")
    sim.add_argument("--host", default="127.0.0.1", help="node MQTT host (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=None,
                     help="node MQTT port (default: the mqtt_port setting, 1883)")
    sim.add_argument("--duration", type=float, default=None, metavar="S",
                     help="seconds to run (default: until Ctrl-C)")
    sim.add_argument("--tenant", default="default", help="tenant of the tokens")
    sim.add_argument("--state", action="store_true",
                     help="reported/desired state (ROOM in a namespace with state = true): "
                     "readings are 'reported' events keyed by the device id, and each device "
                     "steers to the value of its key in ROOM-desired")
    sim.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    sim.add_argument("--data-dir", dest="data_dir", type=Path, default=argparse.SUPPRESS,
                     metavar="DATA_DIR", help="the node's data dir (for its jwt-secret)")
    tun = dev_sub.add_parser(
        "tunnel", help="be device DEVICE_ID on the MQTT tunnel: JSON frames in, frames out",
        description="One MQTT connection as device DEVICE_ID, as a device makes it (client "
        "id = user name = DEVICE_ID, password = its JWT; SUBSCRIBE rtnode/v1/<id>/out; an "
        "explicit connect frame with the JWT again). Then each line of stdin, a JSON frame "
        "such as {\"type\":\"join\",\"id\":1,\"room\":\"sensors:lab\"}, is sent as one CBOR "
        "PUBLISH on rtnode/v1/<id>/in, and each frame the node sends is printed as a JSON "
        "line. Ctrl-D waits for the replies due (--wait) and disconnects; Ctrl-C disconnects. "
        "Without --token, a 1-hour device token is signed with the node's key "
        "(RTNODE_JWT_SECRET or <data-dir>/jwt-secret). The wire: docs/tunnel.md.",
    )
    tun.add_argument("device_id", metavar="DEVICE_ID", help="the device id (its token's sub)")
    tun.add_argument("--token", metavar="JWT", help="the device's JWT (kind device)")
    tun.add_argument("--token-file", metavar="FILE",
                     help="read the JWT from FILE (a flag's value is visible in ps)")
    tun.add_argument("--mqtt-url", metavar="URL",
                     help="mqtt://HOST:PORT or mqtts://HOST:PORT (default: "
                     "mqtt://127.0.0.1:<the mqtt_port setting, 1883>)")
    tun.add_argument("--room", action="append", default=[], metavar="PATTERN=RIGHTS",
                     help="without --token: a grant of the signed token (repeatable; default "
                     "'*=join,publish,history,presence')")
    tun.add_argument("--tenant", default="default", help="without --token: the token's tenant")
    tun.add_argument("--wait", default="5", metavar="SECONDS",
                     help="at end of input, wait this long at most for replies (default 5)")
    tun.add_argument("--raw", action="store_true",
                     help="send any JSON object, even one the node will refuse (to see its "
                     "errors); by default invalid frames are reported here and not sent")
    tun.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    tun.add_argument("--data-dir", dest="data_dir", type=Path, default=argparse.SUPPRESS,
                     metavar="DATA_DIR", help="the node's data dir (for its jwt-secret)")
    _add_replay_parsers(sub)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)
    }
    return load_settings(args.config, **flags)


def _setup_logging(level: str, tag: str = "") -> None:
    """Log lines on stderr; ``tag`` (a worker's name) starts each one."""
    tag = tag.replace("%", "%%")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s",
    )


def _command_path() -> str:
    """This rtnode as a shell command that runs from the current folder.

    ``.venv/bin/rtnode`` when the script is under the current folder (``make run``), else its
    absolute path; ``<python> -m node`` when there is no ``rtnode`` script. Never a bare
    ``rtnode``, which is on no PATH after ``make run``.
    """
    import os
    import shlex

    argv0 = sys.argv[0] if sys.argv else ""
    script = argv0 if os.path.basename(argv0) == "rtnode" and os.path.isfile(argv0) else \
        os.path.join(os.path.dirname(sys.executable), "rtnode")
    if not os.path.isfile(script):
        return f"{shlex.quote(sys.executable)} -m node"
    script = os.path.abspath(script)
    here = os.getcwd()
    if script.startswith(here.rstrip("/") + "/"):
        rel = os.path.relpath(script, here)
        return shlex.quote(rel if "/" in rel else f"./{rel}")
    return shlex.quote(script)


# The banner's token: the README's chat rooms, plus the console's live view (sys:stats, which
# only a grant naming sys: opens).
_BANNER_GRANTS = ("chat:*=join,publish,history,presence", "sys:stats=join")
# The ready token printed with --dev: long enough for a working day on a loopback-only node.
_BANNER_TOKEN_TTL_S = 86400.0


def _token_command(s: Settings) -> str:
    """The ``rtnode token`` command for the banner, runnable as printed (same key, data dir)."""
    import shlex

    cmd = _command_path()
    words = [cmd, "token", "--sub", "alice"]
    for grant in _BANNER_GRANTS:
        words += ["--room", f"'{grant}'"]  # no quote in a grant
    relative = not cmd.startswith(("/", "'/"))
    if not (relative and s.data_dir == Path("rtnode-data")):
        # From another folder the default data dir would be another one, with another secret.
        words += ["--data-dir", shlex.quote(str(s.data_dir if relative else s.data_dir.resolve()))]
    if s.jwt_public_key is not None:
        words += ["--private-key", "YOUR-PRIVATE-KEY.pem"]
    return " ".join(words)


def _dev_token(s: Settings) -> str | None:
    """With --dev and an HS256 key: a token for the console (every room, its live view)."""
    if not s.dev or s.jwt_public_key is not None:
        return None
    ttl = _BANNER_TOKEN_TTL_S
    if s.token_max_lifetime_s:
        ttl = min(ttl, s.token_max_lifetime_s)
    return mint_token(
        s.jwt_secret or load_or_create_secret(s.data_dir), sub="alice",
        rooms={"*": ["join", "publish", "history", "presence"], "sys:*": ["join"]}, rpc=["*"],
        ttl_s=ttl, issuer=s.jwt_issuer, audience=s.jwt_audience,
    )


def _banner(node: Any) -> str:
    """The banner of a node (``Node``) or of the parent of workers (``Workers``)."""
    s = node.settings
    workers = getattr(node, "workers", None)
    if workers is not None:  # rtnode run --workers N: the ports the workers share
        from node.workers import workers_banner

        tls = s.tls_cert is not None
        scheme, http_port, mqtt_port = ("https" if tls else "http"), node.http_port, \
            (None if s.mqtt_broker_url else node.mqtt_port)
    else:
        tls = node.http.ssl_context is not None
        scheme, http_port = node.http.scheme, node.http.port
        mqtt_port = node.mqtt.port if node.mqtt else None
    base = f"{scheme}://{s.host}:{http_port}"
    nats_line = (
        f"{node.embedded.url} (embedded, JetStream in {s.data_dir / 'nats'}; user and "
        f"password in {node.embedded.credentials_path})"
        if node.embedded else ", ".join(s.nats_url)
    )
    lines = [
        f"rtnode {node.name} ready",
        f"  http       {base}  (console /, /rtnode.js, /healthz /readyz /metrics)",
        f"  websocket  {base.replace('http', 'ws', 1)}/ws    sse {base}/sse    api {base}/api",
        (f"  mqtt       {'mqtts' if tls else 'mqtt'}://{s.host}:{mqtt_port}"
         "  (devices: client id = username = device id, password = device JWT)")
        if mqtt_port is not None
        else f"  mqtt       external broker {s.mqtt_broker_url.split('@')[-1]}",
        f"  nats       {nats_line}",
        *([workers_banner(node)] if workers is not None else []),
        f"  dev token  {_token_command(s)}",
    ]
    token = _dev_token(s)
    if token is not None:
        hours = min(_BANNER_TOKEN_TTL_S, s.token_max_lifetime_s or _BANNER_TOKEN_TTL_S) / 3600
        lines += [
            f"  dev token  {token}",
            f"             (--dev: user alice, every room and the console's live view, "
            f"{hours:g} h; paste it in the console at {base}/)",
        ]
    return "\n".join(lines)


async def _run(settings: Settings, worker: bool = False) -> int:
    import asyncio

    from bridge.http_guard import raise_open_files_limit
    from node.app import Node  # the composition root imports everything: only when running

    # One descriptor per client socket: take all the kernel allows (the node's HTTP port keeps
    # a reserve of them for NATS and files, see bridge/http_guard.py).
    before, after = raise_open_files_limit()
    if after != before:
        logging.getLogger("node").info("= descriptor limit raised from %d to %d", before, after)
    node = Node(settings, worker=worker)
    loop = asyncio.get_running_loop()
    starting = asyncio.ensure_future(node.start())

    def on_signal() -> None:
        # Before the node is up (e.g. still waiting for NATS), a signal cancels the start.
        if not starting.done():
            starting.cancel()
        else:
            node.close()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await starting
    except asyncio.CancelledError:
        print(f"rtnode {node.name} stopped before it was ready", flush=True)
        return 0
    except ConfigError as exc:  # data dir in use, port taken: one line, as for bad flags
        print(f"rtnode: {exc}", file=sys.stderr)
        return 2
    except NodeError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 1
    from node.memory import allocator, tune_collector

    tune_collector()
    logging.getLogger("node.memory").info("= allocator: %s", allocator())
    if worker:  # the parent prints the banner once every worker is ready
        from node.workers import READY_LINE

        print(f"{READY_LINE} {node.name}", flush=True)
    else:
        print(_banner(node), flush=True)
    await node.wait_closed()
    print(f"rtnode {node.name} stopped", flush=True)
    return 0


async def _run_workers(settings: Settings, count: int, argv: list[str] | None) -> int:
    """``run --workers N``: the parent of N node processes (node/workers.py)."""
    from node.workers import Workers

    # The workers: this same command (flags, environment, config file); the parent adds
    # --worker-index and the ports, and the last --workers wins.
    command = [sys.executable, "-m", "node", *(sys.argv[1:] if argv is None else argv),
               "--workers", "1"]
    parent = Workers(settings, count, command)
    try:
        code = await parent.run(on_ready=lambda p: print(_banner(p), flush=True))
    except ConfigError as exc:  # data dir in use, port taken: one line, as for bad flags
        print(f"rtnode: {exc}", file=sys.stderr)
        return 2
    except NodeError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 1
    if code == 0:
        print(f"rtnode {parent.name} stopped ({count} workers)", flush=True)
    return code


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DEFAULT_TTL_S = {"device": 365 * 86400.0}  # others: 1 hour


def _ttl(text: str | None, kind: str) -> tuple[float | None, bool]:
    """``--ttl`` in seconds (None: no exp), and whether it is the kind's default.

    Raises:
        ConfigError: Not a duration (one line).
    """
    if text is None:
        return _DEFAULT_TTL_S.get(kind, 3600.0), True
    word = text.strip().lower()
    if word in ("never", "0"):
        return None, False
    number, unit = (word[:-1], word[-1]) if word[-1:] in _TTL_UNITS else (word, "s")
    try:
        value = float(number) * _TTL_UNITS[unit]
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"--ttl must be a duration such as 3600, 90m, 12h or 365d, or "
                          f"'never', not {text!r}")
    return value, False


def _lifetime(seconds: float) -> str:
    if seconds % 86400 == 0:
        return f"{seconds / 86400:g} days"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    return f"{seconds:g} s"


def _token_secret(args: argparse.Namespace, settings: Settings) -> str:
    """The node's HS256 secret, found as the node finds it; created only on request."""
    if settings.jwt_secret:
        return settings.jwt_secret
    data_dir = settings.data_dir
    secret = load_secret(data_dir)
    if secret:
        return secret
    where = data_dir.resolve() / SECRET_FILE
    if not args.create_secret:
        raise ConfigError(
            f"no token secret at {where} (the node creates it in its data dir at its first "
            f"start): run this where the node runs, or pass --data-dir DIR (the node's "
            f"banner shows it: 'JetStream in DIR/nats'), or set RTNODE_JWT_SECRET as the "
            f"node has it; --create-secret makes a new secret here instead")
    secret = create_secret(data_dir)
    print(f"rtnode: created a new token secret in {where}; only a node started with "
          f"--data-dir {data_dir.resolve()} accepts these tokens", file=sys.stderr)
    return secret


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    if args.sub is not None:
        raise ConfigError("--revoke JTI withdraws a token: not with --sub")
    if not settings.data_dir.is_dir():
        # As for the secret: never a revocation list where no node will read it.
        raise ConfigError(f"no data dir at {settings.data_dir.resolve()}: run this where the "
                          f"node runs, or pass its --data-dir DIR")
    jti = args.revoke
    if jti.count(".") == 2:  # a whole token: revoke its id (what it says, signed or not)
        import jwt

        try:
            claims = jwt.decode(jti, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise ConfigError("--revoke: neither a token id (jti) nor a token") from None
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise ConfigError("--revoke: this token has no id (jti), so it cannot be revoked; "
                              "only a new secret (or key) withdraws it")
    try:
        path, added = revoke_token(settings.data_dir, jti,
                                   note=time.strftime("revoked %Y-%m-%dT%H:%M:%SZ",
                                                      time.gmtime()))
    except ValueError as exc:
        raise ConfigError(f"--revoke: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"--revoke: cannot write {exc.filename}: {exc.strerror}") from None
    print(f"rtnode: token {jti} {'revoked' if added else 'was already revoked'} in "
          f"{path.resolve()}: a node on this data dir refuses it at its next connect or "
          f"refresh (a connection open now stays: POST /api/disconnect cuts it)",
          file=sys.stderr)
    return 0


def _token(args: argparse.Namespace, settings: Settings) -> int:
    if args.revoke is not None:
        return _revoke(args, settings)
    if args.sub is None:
        raise ConfigError("token needs --sub ID (or --revoke JTI)")
    ttl_s, default_ttl = _ttl(args.ttl, args.kind)
    if ttl_s is None and settings.tokens_need_exp:
        raise ConfigError("--ttl never: this node refuses tokens without exp (production mode "
                          "or require_exp); give a lifetime, e.g. --ttl 365d, and revoke a "
                          "lost device's token with --revoke JTI")
    limit = settings.token_max_lifetime_s
    if limit and ttl_s is not None and ttl_s > limit:
        raise ConfigError(f"--ttl {_lifetime(ttl_s)}: longer than this node's "
                          f"token_max_lifetime_s ({limit:g} s), which would refuse it")
    rooms: dict[str, list[str]] = {}
    for spec in args.room:
        try:
            pattern, rights = parse_room_grant(spec)
        except ValueError as exc:
            raise ConfigError(f"--room: {exc}") from None
        rooms.setdefault(pattern, []).extend(r for r in rights if r not in rooms.get(pattern, []))
    key: str | bytes
    if args.private_key is not None:
        try:
            key = args.private_key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --private-key: {exc.strerror}") from None
        alg = args.alg or "RS256"
    else:
        alg = args.alg or "HS256"
        if alg != "HS256":
            raise ConfigError(f"--alg {alg} needs --private-key")
        key = _token_secret(args, settings)
    jti = secrets.token_hex(8)
    try:
        token = mint_token(
            key, sub=args.sub, tenant=args.tenant, kind=args.kind, rooms=rooms, rpc=args.rpc,
            ttl_s=ttl_s, algorithm=alg, jti=jti,
            issuer=settings.jwt_issuer, audience=settings.jwt_audience, admin=args.admin,
        )
    except Exception as exc:  # PyJWT raises several types for unusable keys
        raise ConfigError(f"cannot sign the token: {exc}") from None
    if args.kind == "device" or ttl_s is None:
        # A device keeps its token: say how long, and how to withdraw it.
        default = " (the device default; --ttl to change)" if default_ttl else ""
        life = ("never expires" if ttl_s is None else
                f"valid {_lifetime(ttl_s)}{default}, until "
                f"{time.strftime('%Y-%m-%d', time.gmtime(time.time() + ttl_s))}")
        print(f"rtnode: {args.kind} token for {args.sub}, {life}; id {jti}: "
              f"'rtnode token --revoke {jti}' withdraws it", file=sys.stderr)
    print(token)
    return 0


async def _simulate_until_signal(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from devices.simulate import simulate  # the device SDK only when simulating

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    secret = settings.jwt_secret or load_secret(settings.data_dir)
    if not secret:  # never a new secret: the node would refuse every device token signed with it
        raise ConfigError(
            f"no token secret at {(settings.data_dir / SECRET_FILE).resolve()}: run this where "
            f"the node runs, or pass --data-dir DIR, or set RTNODE_JWT_SECRET as the node has it")
    port = args.port if args.port is not None else settings.mqtt_port
    stats = await simulate(
        args.host, port, count=args.count, room=args.room, rate=args.rate, secret=secret,
        duration=args.duration, stop=stop, tenant=args.tenant, issuer=settings.jwt_issuer,
        audience=settings.jwt_audience, out=lambda line: print(line, flush=True),
        state=args.state,
    )
    return 0 if stats.acked or not stats.sent else 1


def _devices(args: argparse.Namespace) -> int:
    if args.devices_command == "tunnel":
        from devices import tunnel_cli  # the MQTT client only for this command

        return tunnel_cli.main(args)
    if args.count < 1 or args.rate <= 0:
        raise ConfigError("--count must be at least 1 and --rate positive")
    flags: dict[str, Any] = {"data_dir": args.data_dir} if hasattr(args, "data_dir") else {}
    settings = load_settings(args.config, **flags)
    _setup_logging("warning")
    import asyncio

    return asyncio.run(_simulate_until_signal(args, settings))


# What `rtnode replay` and `rtnode consume` use of the settings: where the node's NATS is and
# how to authenticate to it. The rest (ports, limits, TLS of the listeners) is the node's.
_REPLAY_SETTINGS = frozenset({
    "data_dir", "log_level", "nats_url", "nats_user", "nats_password", "nats_token",
    "nats_nkey_seed", "nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key",
})


def _add_replay_parsers(sub: Any) -> None:
    settings = _settings_parser(_REPLAY_SETTINGS)
    need = ("Connects to --nats-url (or RTNODE_NATS_URL: the NATS servers of the nodes, "
            "comma-separated) with the --nats-user/--nats-password, --nats-token, "
            "--nats-nkey-seed or --nats-creds and --nats-tls-* settings; without --nats-url, "
            "to the embedded NATS of the node running with --data-dir (default rtnode-data: "
            "its URL and credentials are in <data-dir>/nats-connection.json), so that no flag "
            "is needed next to 'make run'. No server is started.")
    rep = sub.add_parser(
        "replay", parents=[settings], help="print a room's stored events (--follow: and live)",
        description="Print the stored events of ROOM, one line 'seq event data' each (--json: "
        "the event map as a JSON line), from the start, after --since SEQ or from "
        "--since-time, up to --until SEQ, at most --limit of them, oldest first (--reverse: "
        "newest first); --follow keeps printing live events until Ctrl-C. When stdout is not "
        "a terminal and the replay takes more than 3 s, a progress line goes to stderr. "
        + need,
    )
    rep.add_argument("room", metavar="ROOM", help="the room, e.g. sensors:lab")
    rep.add_argument("--tenant", default="default", help="tenant (default: default)")
    since = rep.add_mutually_exclusive_group()
    since.add_argument("--since", metavar="SEQ", help="only events after SEQ")
    since.add_argument("--since-time", metavar="ISO8601",
                       help="events stored from this time (no offset: local time)")
    rep.add_argument("--until", metavar="SEQ", help="stop after SEQ (inclusive)")
    rep.add_argument("--limit", metavar="N", help="print at most N events")
    rep.add_argument("--reverse", action="store_true",
                     help="newest first (a bounded read: not with --follow)")
    rep.add_argument("--follow", action="store_true", help="then print live events (Ctrl-C)")
    rep.add_argument("--json", action="store_true", help="JSON lines (the event maps)")
    con = sub.add_parser(
        "consume", parents=[settings], help="run a durable consumer (JSON lines or webhook)",
        description="Run the JetStream durable consumer (group) NAME on the rooms matching "
        "PATTERN: print each event as a JSON line and ack it once the line is written and "
        "flushed, or with --post URL, POST it and ack it on a 2xx. A group is one durable "
        "run as several processes (the same command started several times): its rooms are "
        "spread over --partitions, each partition served by one process at a time while the "
        "others stand by and take over within --takeover seconds when it dies; a room's "
        "events stay in order. A second run with the same NAME goes on at the first event "
        "not acked; Ctrl-C stops (unacked events go back to the group). " + need,
    )
    # Not an argparse group: "exactly one of the two" is checked in _consume_args, in one line.
    con.add_argument("--group", metavar="NAME",
                     help="the group (durable consumer) name; the same as --durable")
    con.add_argument("--durable", metavar="NAME",
                     help="durable consumer name (one of --group or --durable is required)")
    con.add_argument("--rooms", metavar="PATTERN",
                     help="a room, or a prefix ending in '*' (e.g. 'sensors:*'); required")
    con.add_argument("--tenant", default="default", help="tenant (default: default)")
    con.add_argument("--start", default="all", metavar="all|new|SEQ|ISO8601",
                     help="where a new durable starts (default all; ignored when it exists)")
    con.add_argument("--partitions", default="1", metavar="N",
                     help="partitions of the group, 1..64 (default 1: one active process)")
    con.add_argument("--takeover", default="5", metavar="SECONDS",
                     help="a standby takes over a partition whose process is silent this long "
                     "(default 5)")
    con.add_argument("--on-retry", default="block", metavar="block|skip",
                     help="a retried event blocks its room until settled (block, default), or "
                     "is dead-lettered at once and the room goes on (skip)")
    con.add_argument("--max-deliver", default="5", metavar="N",
                     help="deliveries before an event is dead-lettered (default 5)")
    con.add_argument("--ack-wait", default="30", metavar="SECONDS",
                     help="an event not acked within this is delivered again (default 30)")
    post = con.add_argument_group("webhook", "POST each event instead of printing it")
    post.add_argument("--post", metavar="URL",
                      help="POST each event as JSON to URL, ack on 2xx, retry with backoff")
    post.add_argument("--secret", metavar="KEY",
                      help="HMAC key of the signature header (default: RTNODE_WEBHOOK_SECRET; "
                      "prefer it: a flag is visible in ps)")
    post.add_argument("--concurrency", metavar="N", help="requests in flight (default 16)")
    post.add_argument("--post-timeout", metavar="SECONDS",
                      help="time allowed for one request (default 10)")


def _number(text: str | None, flag: str, *, low: float, high: float | None = None,
            integer: bool = True) -> Any:
    """``--flag`` as an int (or float) within ``low``..``high``; None stays None.

    Raises:
        ConfigError: Not a number, or out of range (one line, exit 2).
    """
    if text is None:
        return None
    try:
        value: float | None = int(text) if integer else float(text)
    except ValueError:
        value = None
    if (value is None or not math.isfinite(value) or value < low
            or (high is not None and value > high)):
        if not integer:
            raise ConfigError(f"{flag} must be a positive number of seconds, not {text!r}")
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise ConfigError(f"{flag} must be an integer {bound}, not {text!r}")
    return value


def _replay_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of bridge.replay_cli.replay_room, checked."""
    from bridge import replay, replay_cli

    try:
        when = replay_cli.parse_time(args.since_time) if args.since_time else None
        replay.parse_room_pattern(args.room)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.room.endswith("*"):
        raise ConfigError("replay takes one room (no '*'); 'rtnode consume' reads patterns")
    if args.reverse and args.follow:
        raise ConfigError("--reverse reads a bounded range, newest first: not with --follow")
    since = _number(args.since, "--since", low=0)
    until = _number(args.until, "--until", low=1)
    if until is not None and since is not None and until <= since:
        raise ConfigError(f"--until {until} is not after --since {since}: nothing to replay")
    return {"tenant": args.tenant, "since": since, "since_time": when, "until": until,
            "limit": _number(args.limit, "--limit", low=1), "reverse": args.reverse,
            "follow": args.follow, "as_json": args.json}


def _consume_args(args: argparse.Namespace, env_secret: str) -> dict[str, Any]:
    """The keyword arguments of bridge.replay_cli.consume_rooms, checked."""
    if (args.group is None) == (args.durable is None):
        raise ConfigError("consume needs one of --group NAME or --durable NAME (synonyms)")
    if args.rooms is None:
        raise ConfigError("consume needs --rooms PATTERN (a room, or a prefix ending in '*')")
    if args.on_retry not in ("block", "skip"):
        raise ConfigError(f"--on-retry must be block or skip, not {args.on_retry!r}")
    options: dict[str, Any] = {
        "durable": args.group if args.group is not None else args.durable,
        "rooms": args.rooms, "tenant": args.tenant, "start": args.start,
        "on_retry": args.on_retry,
        "partitions": _number(args.partitions, "--partitions", low=1, high=64),
        "max_deliver": _number(args.max_deliver, "--max-deliver", low=1),
        "ack_wait_s": _number(args.ack_wait, "--ack-wait", low=0.001, integer=False),
        "priority_timeout_s": _number(args.takeover, "--takeover", low=0.001, integer=False),
    }
    webhook = {"--secret": args.secret, "--concurrency": args.concurrency,
               "--post-timeout": args.post_timeout}
    if args.post is None:
        given = [flag for flag, value in webhook.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --post URL")
        return options
    from urllib.parse import urlsplit

    url = urlsplit(args.post)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"--post needs an http:// or https:// URL, not {args.post!r}")
    options.update(
        post=args.post, secret=args.secret or env_secret,
        concurrency=_number(args.concurrency or "16", "--concurrency", low=1, high=10000),
        post_timeout_s=_number(args.post_timeout or "10", "--post-timeout", low=0.001,
                               integer=False),
    )
    return options


def _replay_commands(args: argparse.Namespace) -> int:
    import os

    # consume --post's default secret, not a node setting: out of the environment before the
    # settings refuse it as an unknown RTNODE_* variable.
    env_secret = os.environ.pop("RTNODE_WEBHOOK_SECRET", "")
    settings = _settings_from(args)
    # Flags before NATS: a bad value is reported even when no node runs (and a bad flag of
    # consume costs no import of the NATS client and aiohttp, ~0.3 s of CPU).
    options = _replay_args(args) if args.command == "replay" else _consume_args(args, env_secret)
    from bridge import replay_cli  # NATS client code only for these commands
    from bridge.nats_auth import cli_target

    servers, auth = cli_target(settings, args.command)
    _setup_logging("warning" if settings.log_level == "info" else settings.log_level)
    if args.command == "replay":
        return replay_cli.run_command(replay_cli.replay_room(
            servers, args.room, auth=auth, **options))
    return replay_cli.run_command(replay_cli.consume_rooms(servers, auth=auth, **options))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rtnode`` and ``python -m node``."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "devices":
            return _devices(args)
        if args.command in ("replay", "consume"):
            return _replay_commands(args)
        settings = _settings_from(args)
        if args.command == "token":
            return _token(args, settings)
        # Only 'run' gets here: the commands above import no event loop (~30 ms of CPU).
        if argv is None:  # the program itself (not a call from a test): see node/memory.py
            import os

            from node.memory import wanted_env

            env = wanted_env(dict(os.environ))
            if env is not None:  # the allocator is chosen at start: start again with it
                sys.stdout.flush()
                prog = sys.argv[0]
                if os.access(prog, os.X_OK) and not prog.endswith(".py"):  # the rtnode script
                    os.execve(prog, sys.argv, env)
                os.execve(sys.executable, [sys.executable, "-m", "node", *sys.argv[1:]], env)
        import asyncio

        from node import workers

        count = workers.parse_workers(args.workers)  # before the logs: a bad N is one line
        worker = args.worker_index is not None
        if worker:
            settings = workers.worker_settings(settings, args.worker_index)
        _setup_logging(settings.log_level, f"[{settings.node_name}] " if worker else "")
        if count > 1 and not worker:
            return asyncio.run(_run_workers(settings, count, argv))
        runner: Any = asyncio.run
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
        return int(runner(_run(settings, worker)))
    except ConfigError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
