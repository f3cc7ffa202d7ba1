"""The ``rtnode`` command line: ``rtnode run`` starts a node, ``rtnode token`` mints a token.

Every setting of :class:`node.config.Settings` is also a flag of both subcommands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from node.auth import KINDS, load_or_create_secret, mint_token, parse_room_grant
from node.config import Settings, load_settings
from node.errors import ConfigError, NodeError

__all__ = ["build_parser", "main"]

_TOML_ONLY = {"namespaces"}


def _settings_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "settings", "each also read from RTNODE_<NAME> and from the --config file"
    )
    group.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    for name, field in Settings.model_fields.items():
        if name in _TOML_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        help_ = f"{field.description} (RTNODE_{name.upper()})"
        if field.annotation is bool:
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
    sub.add_parser(
        "run", parents=[settings], help="start a node (zero configuration needed)",
        description="Start a node. With no --nats-url it starts the bundled nats-server with "
        "JetStream in <data-dir>/nats and stops it on exit.",
    )
    tok = sub.add_parser(
        "token", parents=[settings], help="print a signed token (JWT)",
        description="Print a JWT signed with the node's key: RTNODE_JWT_SECRET, or the secret "
        "the node generated in <data-dir>/jwt-secret, or --private-key for RS256/ES256.",
    )
    tok.add_argument("--sub", required=True, help="user, device or service id")
    tok.add_argument("--tenant", default="default", help="tenant (default: default)")
    tok.add_argument("--kind", choices=KINDS, default="user", help="principal kind")
    tok.add_argument("--room", action="append", default=[], metavar="PATTERN=RIGHTS",
                     help="grant, e.g. 'chat:*=join,publish,history,presence' (repeatable)")
    tok.add_argument("--rpc", action="append", default=[], metavar="PATTERN",
                     help="rpc target the holder may call, e.g. 'server' or 'device:*'")
    tok.add_argument("--ttl", type=float, default=3600.0, metavar="S",
                     help="seconds until expiry (default 3600; 0: no expiry)")
    tok.add_argument("--private-key", type=Path, metavar="FILE",
                     help="PEM private key: sign with RS256/ES256 instead of the HS256 secret")
    tok.add_argument("--alg", choices=["HS256", "RS256", "ES256"], default=None,
                     help="algorithm (default HS256, or RS256 with --private-key)")
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)
    }
    return load_settings(args.config, **flags)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def _banner(node: Any) -> str:
    s = node.settings
    http = node.http
    base = f"{http.scheme}://{s.host}:{http.port}"
    nats_line = (
        f"{node.embedded.url} (embedded, JetStream in {s.data_dir / 'nats'})"
        if node.embedded else ", ".join(s.nats_url)
    )
    return "\n".join([
        f"rtnode {node.name} ready",
        f"  http       {base}  (/healthz /readyz /metrics)",
        f"  websocket  {base.replace('http', 'ws', 1)}/ws    sse {base}/sse    api {base}/api",
        (f"  mqtt       {'mqtts' if http.ssl_context else 'mqtt'}://{s.host}:{node.mqtt.port}"
         "  (devices: client id = username = device id, password = device JWT)")
        if node.mqtt else f"  mqtt       external broker {s.mqtt_broker_url.split('@')[-1]}",
        f"  nats       {nats_line}",
        "  dev token  rtnode token --sub alice --room 'chat:*=join,publish,history,presence'"
        + (f" --data-dir {s.data_dir}" if str(s.data_dir) != "rtnode-data" else ""),
    ])


async def _run(settings: Settings) -> int:
    from node.app import Node  # the composition root imports everything: only when running

    node = Node(settings)
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
    except NodeError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 1
    print(_banner(node), flush=True)
    await node.wait_closed()
    print(f"rtnode {node.name} stopped", flush=True)
    return 0


def _token(args: argparse.Namespace, settings: Settings) -> int:
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
        key = settings.jwt_secret or load_or_create_secret(settings.data_dir)
        alg = args.alg or "HS256"
        if alg != "HS256":
            raise ConfigError(f"--alg {alg} needs --private-key")
    try:
        token = mint_token(
            key, sub=args.sub, tenant=args.tenant, kind=args.kind, rooms=rooms, rpc=args.rpc,
            ttl_s=args.ttl or None, algorithm=alg,
            issuer=settings.jwt_issuer, audience=settings.jwt_audience,
        )
    except Exception as exc:  # PyJWT raises several types for unusable keys
        raise ConfigError(f"cannot sign the token: {exc}") from None
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rtnode`` and ``python -m node``."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_from(args)
        if args.command == "token":
            return _token(args, settings)
        _setup_logging(settings.log_level)
        runner: Any = asyncio.run
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
        return int(runner(_run(settings)))
    except ConfigError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
