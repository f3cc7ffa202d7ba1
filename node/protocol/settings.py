"""The node's configuration: defaults, TOML file, RTNODE_* environment, command-line flags.

Precedence, highest first: flags, environment, the TOML file given with ``--config``, defaults.
Every setting has an environment variable ``RTNODE_<NAME>`` and a flag ``--<name>`` (underscores
become dashes). Namespace policies (``[namespaces.<ns>]``) come from the TOML file only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from node.protocol.errors import ConfigError
from node.protocol.ids import TENANT_PATTERN

__all__ = ["ENV_PREFIX", "NamespacePolicy", "RoomPolicy", "Settings", "WebhookSetting",
           "load_settings"]

ENV_PREFIX = "RTNODE_"

# Environment variables with our prefix that are not settings but are still allowed.
# RTNODE_WEBHOOK_SECRET: `rtnode consume --post`'s secret, allowed so that a shell exporting it
# can still run a node.
_ENV_NOT_SETTINGS = frozenset({"RTNODE_CONFIG", "RTNODE_NATS_SERVER", "RTNODE_WEBHOOK_SECRET"})
_ENV_IGNORED_PREFIXES = ("RTNODE_TEST_", "RTNODE_JEPSEN_")

# A comma-separated list: a string from the environment or a flag is split by _split_csv.
CsvList = list[str]
# Settings whose environment value is JSON (pydantic-settings' rule for a dict), e.g.
# RTNODE_NAMESPACES='{"chat": {"history_size": 100}}'. RTNODE_WEBHOOKS is JSON too, parsed by
# its own validator (as --webhooks is).
_ENV_JSON = frozenset({"namespaces"})

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# A webhook's rooms: an exact room or a prefix and a final '*' (bridge.replay's rule).
_ROOM_PATTERN_RE = re.compile(r"[A-Za-z0-9_:@=-]{1,128}|[A-Za-z0-9_:@=-]{0,128}\*")
_DURABLE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class NamespacePolicy(BaseModel):
    """Room policy of one namespace (the part of a room name before the first ``:``).

    Unset fields take the node-wide setting of the same name.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    history_size: int | None = Field(default=None, ge=0)
    history_ttl_s: float | None = Field(default=None, gt=0)
    recovery_max: int | None = Field(default=None, ge=0)
    volatile: bool = False
    presence: bool = True
    max_payload_bytes: int | None = Field(default=None, gt=0)
    #: A state room: the latest event per key is kept (docs/protocol-notes.md, State rooms).
    state: bool = False


class RoomPolicy(BaseModel):
    """The effective policy of a room: the namespace's, filled in with the node's settings."""

    model_config = ConfigDict(frozen=True)

    history_size: int
    history_ttl_s: float
    recovery_max: int
    volatile: bool
    presence: bool
    max_payload_bytes: int
    state: bool = False


class WebhookSetting(BaseModel):
    """One always-on webhook (``[[webhooks]]``): the events of ``rooms`` POSTed to ``url``
    (docs/webhooks.md). The secret is ``secret``, or read at start from the environment
    variable ``secret_env``; neither: no signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(max_length=2048)
    rooms: str
    tenant: str = Field("default", pattern=TENANT_PATTERN)
    durable: str
    secret: SecretStr | None = None
    secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    partitions: int = Field(1, ge=1, le=64)
    max_deliver: int = Field(5, ge=1)
    concurrency: int = Field(16, ge=1, le=1024)
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError on a bad port)
        except ValueError:
            raise ValueError("not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or any(
                c.isspace() for c in value):
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("rooms")
    @classmethod
    def _room_pattern(cls, value: str) -> str:
        if not _ROOM_PATTERN_RE.fullmatch(value):
            raise ValueError("a room name ([A-Za-z0-9_:@=-], up to 128) or a prefix ending "
                             "in '*'")
        return value

    @field_validator("durable")
    @classmethod
    def _durable_name(cls, value: str) -> str:
        if not _DURABLE_RE.fullmatch(value):
            raise ValueError("1-64 characters of A-Z a-z 0-9 _ -")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookSetting:
        if self.secret is not None and self.secret_env is not None:
            raise ValueError("secret and secret_env exclude each other")
        if (self.secret_env is not None and self.secret_env.startswith(ENV_PREFIX)
                and self.secret_env not in _ENV_NOT_SETTINGS):
            # _check_environment refuses unknown RTNODE_* variables.
            raise ValueError(f"secret_env must not start with {ENV_PREFIX} (those are settings)")
        return self

    def secret_value(self) -> str | None:
        """The HMAC secret, or None.

        Raises:
            ConfigError: ``secret_env`` names an unset or empty environment variable.
        """
        if self.secret is not None:
            return self.secret.get_secret_value() or None
        if self.secret_env is None:
            return None
        value = os.environ.get(self.secret_env)
        if not value:
            raise ConfigError(f"webhook {self.durable}: environment variable {self.secret_env} "
                              "(its secret_env) is not set")
        return value


class Settings(BaseModel):
    """Everything a node can be told. Field names are the setting names.

    Build it with :func:`load_settings`, which reads the environment and the TOML file.
    """

    # A plain model, its sources merged by load_settings: pydantic-settings cost every
    # 'rtnode' command ~70 ms of CPU to import, for an environment lookup and a TOML file.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # Listeners and identity
    host: str = Field("127.0.0.1", description="address the HTTP and MQTT listeners bind to")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP, WebSocket and SSE port")
    mqtt_port: int = Field(1883, ge=0, le=65535, description="MQTT listener port")
    mqtt_broker_url: str = Field(
        "", description="external MQTT broker, mqtt://[user:pass@]host:port (set: no listener)"
    )
    mqtt_tenant: str = Field("default", pattern=TENANT_PATTERN,
                             description="tenant of the external broker's rooms")
    mqtt_session_expiry_s: float = Field(
        604800, gt=0, description="persistent MQTT sessions (clean_session=0) kept this long")
    mqtt_inflight: int = Field(32, ge=1, le=65535,
                               description="QoS 1 MQTT downlinks unacknowledged at most")
    mqtt_max_sessions_per_tenant: int = Field(100000, ge=1,
                                              description="persistent MQTT sessions per tenant")
    node_name: str = Field("", description="name of this node (default: the host name)")
    data_dir: Path = Field(Path("rtnode-data"), description="where the node keeps its state")
    tls_cert: Path | None = Field(None, description="PEM certificate: serve https/wss")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    ws_compression: bool = Field(False, description="permessage-deflate on WebSockets")
    dev: bool = Field(False, description="development mode (console offers dev tokens; "
                                         "loopback listeners only)")
    production: bool = Field(False, description="production mode: tokens must carry exp, "
                                               "--dev is refused")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    drain_timeout_s: float = Field(10.0, ge=0, description="wait this long for clients on stop")

    # NATS
    nats_url: CsvList = Field(
        default_factory=list, description="NATS server URLs, comma-separated (unset: embedded)"
    )
    nats_port: int = Field(0, ge=0, le=65535, description="embedded nats-server port (0: free)")
    nats_sync: str = Field(
        "always", pattern=r"^(always|[1-9][0-9]{0,5}(ms|s|m))$",
        description="embedded nats-server: fsync every stored event (always), or every "
                    "interval like 2m (JetStream's default: faster, a power loss can lose acked "
                    "events)")
    nats_connect_timeout_s: float = Field(
        60.0, gt=0, description="give up connecting to NATS at start after this long"
    )
    stream_replicas: int = Field(1, ge=1, le=5, description="replicas of the room stream")
    nats_monitor_port: int = Field(
        0, ge=0, le=65535, description="embedded nats-server monitoring port (0: off)")
    nats_user: str = Field("", description="NATS user name (with --nats-password)")
    nats_password: str = Field("", description="NATS password")
    nats_token: str = Field("", description="NATS authentication token")
    nats_nkey_seed: Path | None = Field(None, description="file holding a NATS NKey seed")
    nats_creds: Path | None = Field(None, description="NATS .creds file (user JWT and seed)")
    nats_tls_ca: Path | None = Field(None, description="PEM CA bundle to verify NATS servers")
    nats_tls_cert: Path | None = Field(None, description="PEM client certificate for NATS")
    nats_tls_key: Path | None = Field(None, description="PEM private key of --nats-tls-cert")

    # Tokens
    jwt_secret: str = Field("", description="HS256 secret (unset: generated in the data dir)")
    jwt_public_key: Path | None = Field(None, description="PEM public key file for RS256/ES256")
    jwt_issuer: str = Field("", description="required token issuer (iss)")
    jwt_audience: str = Field("", description="required token audience (aud)")
    require_exp: bool | None = Field(
        None, description="refuse tokens without exp (unset: on in production mode)")
    token_max_lifetime_s: float = Field(
        0, ge=0, description="refuse tokens valid for longer than this (exp - iat; 0: no limit)")

    # PROTOCOL.md section 10: the environment names are part of the contract.
    max_frame_bytes: int = Field(65536, gt=0, description="max frame or payload size")
    rate_per_s: float = Field(50, gt=0, description="publishes per second per connection")
    rate_burst: int = Field(100, gt=0, description="publish burst per connection")
    max_rooms_per_connection: int = Field(128, gt=0, description="rooms per connection")
    max_connections_per_user: int = Field(64, gt=0, description="connections per user, per node")
    max_errors_per_min: int = Field(10, gt=0, description="errors per minute before closing")
    slow_consumer_bytes: int = Field(1048576, gt=0, description="bytes queued before 4008")
    connect_timeout_s: float = Field(5, gt=0, description="time allowed for the connect frame")
    heartbeat_s: float = Field(25, gt=0, description="WebSocket ping interval")
    history_size: int = Field(10000, ge=0, description="events kept per room")
    history_ttl_s: float = Field(604800, gt=0, description="how long events are kept")
    recovery_max: int = Field(10000, ge=0, description="most events replayed by a recovery")
    dedupe_window_s: float = Field(120, gt=0, description="publish dedupe window")
    state_max_keys: int = Field(
        10000, gt=0, description="keys per state room (a publish with a new key beyond it: "
                                 "4009 state room full)")
    presence_ttl_s: float = Field(10, gt=0, description="presence TTL")
    volatile_events: CsvList = Field(
        default_factory=lambda: ["user:typing"], description="volatile event names, comma-separated"
    )
    volatile_throttle_ms: int = Field(500, ge=0, description="volatile event throttle")
    allowed_origins: CsvList = Field(
        default_factory=list, description="allowed WebSocket origins, comma-separated (empty: any)"
    )
    api_key: str = Field("", description="HTTP API key (empty: none)")
    # Limits beyond PROTOCOL.md section 10 (rtnode decided: docs/protocol-notes.md).
    request_rate_per_s: float = Field(
        20, gt=0, description="join, leave, history, presence, rpc and refresh requests per "
                              "second per connection")
    request_burst: int = Field(40, gt=0, description="request burst per connection")
    rooms_per_min: int = Field(
        300, gt=0, description="rooms a user may join per minute on a node, across its "
                               "connections (joins of rooms the connection is not in)")
    heavy_requests_per_s: float = Field(
        20, gt=0, description="requests per second of a connection that cost NATS work "
                              "(history, presence, rpc, a join that starts a room), a tenth "
                              "of a second's worth at once; beyond, they wait their turn")
    connects_per_min: int = Field(
        60, gt=0, description="connections a user may open per minute on a node (then 4009)")
    room_idle_s: float = Field(
        1.0, ge=0, description="a room without members stops after this long")
    max_rooms: int = Field(100000, gt=0, description="room actors on this node (then 4503)")
    max_connections: int = Field(
        10000, gt=0, description="client connections on this node (then 4503 / HTTP 503)")
    max_connections_per_ip: int = Field(
        1000, gt=0, description="open HTTP/WebSocket/SSE connections per peer address")
    peer_failures_per_min: int = Field(
        60, gt=0, description="connections per peer address per minute that may end refused "
                              "(bad token, cut off for errors or limits) before that address "
                              "is refused at accept (503) until it slows down")
    http_header_timeout_s: float = Field(
        5, gt=0, description="time allowed for a request head (and WebSocket upgrade)")
    http_keepalive_s: float = Field(
        5, gt=0, description="idle HTTP keep-alive connections are closed after this long")
    rpc_modules: CsvList = Field(
        default_factory=list, description="modules registering server rpc methods, comma-separated"
    )

    namespaces: dict[str, NamespacePolicy] = Field(
        default_factory=dict, description="namespace policies (TOML file only)"
    )
    webhooks: list[WebhookSetting] = Field(
        default_factory=list,
        description="always-on webhooks: a JSON list of {url, rooms, durable, tenant, secret | "
                    "secret_env, partitions, max_deliver, concurrency, timeout_s} "
                    "(TOML: [[webhooks]])")

    # room_policy() runs on every publish: one RoomPolicy per namespace, built once.
    _policies: dict[str, RoomPolicy] = PrivateAttr(default_factory=dict)

    @field_validator("nats_url", "volatile_events", "allowed_origins", "rpc_modules",
                     mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhooks_json(cls, value: Any) -> Any:
        # --webhooks on the command line is a JSON text, like RTNODE_WEBHOOKS.
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else []
            except ValueError:
                raise ValueError("not a JSON list of webhooks") from None
        return value

    @field_validator("webhooks")
    @classmethod
    def _unique_durables(cls, value: list[WebhookSetting]) -> list[WebhookSetting]:
        seen: set[tuple[str, str]] = set()
        for hook in value:
            if (hook.tenant, hook.durable) in seen:
                raise ValueError(f"two webhooks with durable {hook.durable!r} of tenant "
                                 f"{hook.tenant!r}: each needs its own")
            seen.add((hook.tenant, hook.durable))
        return value

    @field_validator("node_name")
    @classmethod
    def _default_node_name(cls, value: str) -> str:
        name = value or platform.node() or "rtnode"
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError("use letters, digits, '-' and '_' only")
        return name

    @model_validator(mode="after")
    def _dev_on_loopback_only(self) -> Settings:
        # --dev hands out all-rights tokens: never to anyone beyond this machine.
        if self.dev and self.production:
            raise ValueError("dev: --dev and --production exclude each other")
        if self.dev and self.host not in _LOOPBACK_HOSTS:
            raise ValueError(f"dev: --dev needs a loopback --host (127.0.0.1, ::1 or localhost), "
                             f"not {self.host}")
        return self

    @property
    def tokens_need_exp(self) -> bool:
        """Whether tokens without ``exp`` are refused (``require_exp``, else production mode)."""
        return self.production if self.require_exp is None else self.require_exp

    @property
    def embedded_nats(self) -> bool:
        """True when the node starts its own nats-server."""
        return not self.nats_url

    def event_ttl(self, room: str) -> float | None:
        """The per-event TTL of a room whose namespace sets history_ttl_s, else None (the
        stream's max age, history_ttl_s, applies)."""
        ns = self.namespaces.get(room.split(":", 1)[0]) if ":" in room else None
        return ns.history_ttl_s if ns is not None else None

    def room_policy(self, room: str) -> RoomPolicy:
        """The effective policy of ``room``, from its namespace and the node's settings."""
        name = room.split(":", 1)[0] if ":" in room else ""
        # Read from pydantic's slot of private values: ``self._policies`` goes through
        # BaseModel.__getattr__, which raises and catches an AttributeError inside: the call
        # took 5.6 us, 0.4 now (python -m timeit); a connect makes three.
        policies: dict[str, RoomPolicy] = self.__pydantic_private__["_policies"]  # type: ignore[index]
        policy = policies.get(name)
        if policy is None:
            policy = policies[name] = self._policy(name)
        return policy

    def _policy(self, name: str) -> RoomPolicy:
        ns = self.namespaces.get(name) if name else None
        ns = ns or NamespacePolicy()
        return RoomPolicy(
            history_size=self.history_size if ns.history_size is None else ns.history_size,
            history_ttl_s=self.history_ttl_s if ns.history_ttl_s is None else ns.history_ttl_s,
            recovery_max=self.recovery_max if ns.recovery_max is None else ns.recovery_max,
            volatile=ns.volatile,
            presence=ns.presence,
            max_payload_bytes=(
                self.max_frame_bytes if ns.max_payload_bytes is None else ns.max_payload_bytes
            ),
            state=ns.state,
        )


def _read_toml(path: Path) -> dict[str, Any]:
    """The settings of a TOML file; unknown keys are caught by ``extra="forbid"``."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _environment_values() -> dict[str, Any]:
    """The settings given as ``RTNODE_<NAME>`` variables, by setting name.

    The variable's name may be in any case (``rtnode_http_port`` too), as pydantic-settings
    read it; values stay strings (the model converts them), but those of :data:`_ENV_JSON`.

    Raises:
        ConfigError: A JSON setting's value is not JSON.
    """
    env = {key.lower(): value for key, value in os.environ.items()}
    prefix = ENV_PREFIX.lower()
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = env.get(prefix + name)
        if value is None:
            continue
        if name in _ENV_JSON:
            try:
                values[name] = json.loads(value)
            except ValueError:
                raise ConfigError(f"invalid setting {name} ({ENV_PREFIX}{name.upper()}): "
                                  "not JSON") from None
        else:
            values[name] = value
    return values


def _deep_update(base: dict[str, Any], *updates: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by each of ``updates`` in turn, tables merged key by key (a flag or
    variable of a namespace keeps the file's other namespaces, as pydantic-settings did)."""
    merged = dict(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(merged.get(key), dict) and isinstance(value, dict):
                merged[key] = _deep_update(merged[key], value)
            else:
                merged[key] = value
    return merged


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_environment() -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for key in os.environ:
        if (
            key.startswith(ENV_PREFIX)
            and key not in known
            and key not in _ENV_NOT_SETTINGS
            and not key.startswith(_ENV_IGNORED_PREFIXES)
        ):
            raise ConfigError(f"unknown setting {key} (environment)")


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build the settings from every source.

    Args:
        config_file: A TOML file, or None (also taken from ``RTNODE_CONFIG``).
        **flags: Values given on the command line, by setting name.

    Returns:
        The validated settings.

    Raises:
        ConfigError: One line naming the first unknown or invalid setting.
    """
    _check_environment()
    if config_file is None and os.environ.get("RTNODE_CONFIG"):
        config_file = Path(os.environ["RTNODE_CONFIG"])
    toml = _read_toml(config_file) if config_file is not None else {}
    try:
        return Settings.model_validate(_deep_update(toml, _environment_values(), flags))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(part) for part in err["loc"]]
        if not loc:  # a rule across settings (a model validator): its message names them
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(f"invalid settings: {msg}") from None
        name = loc[0]
        if err["type"] == "extra_forbidden":
            where = f" in {config_file}" if config_file else ""
            raise ConfigError(f"unknown setting {'.'.join(loc)}{where}") from None
        sources = f"{_flag(name)} / {ENV_PREFIX}{name.upper()}"
        detail = ".".join(loc[1:])
        detail = f" ({detail})" if detail else ""
        raise ConfigError(f"invalid setting {name}{detail} ({sources}): {err['msg']}") from None
