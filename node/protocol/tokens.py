"""Tokens and permissions (PROTOCOL.md section 4). Pure: no I/O but reading key files once.

A token is a JWT (HS256, RS256 or ES256) whose claims become a :class:`Principal`. The principal
answers every authorisation question of the node: ``principal.can("publish", "chat:lobby")``.

What a valid token is, beyond its signature (every refusal is 4001, an expired token 4010):

* ``sub`` is an id and ``tenant`` a tenant of ``node.protocol.ids`` (no ``.``, ``*``, ``>``,
  ``/``, ``+``, ``#``, whitespace...): both reach NATS subjects and MQTT topics;
* ``exp``, ``nbf`` and ``iat``, when present, are finite JSON numbers (not strings, not
  booleans); ``exp`` is in the future (no leeway), ``nbf`` and ``iat`` are not (beyond
  :data:`CLOCK_SKEW_S` of the issuer's clock ahead of the node's);
* with ``require_exp``, ``exp`` is present; with ``max_lifetime_s``, ``exp`` is present and
  ``exp - iat`` (``exp - now`` without ``iat``) is at most that.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt

from node.protocol.errors import AuthError, ConfigError
from node.protocol.ids import ID_RULE, TENANT_RULE, is_valid_id, is_valid_tenant
from node.protocol.settings import Settings

__all__ = [
    "CLOCK_SKEW_S",
    "KINDS",
    "RIGHTS",
    "Principal",
    "TokenVerifier",
    "load_or_create_secret",
    "mint_token",
    "parse_room_grant",
    "pattern_matches",
]

Kind = Literal["user", "device", "service"]
KINDS: tuple[str, ...] = ("user", "device", "service")
RIGHTS: tuple[str, ...] = ("join", "publish", "history", "presence")
_ALGORITHMS = ("HS256", "RS256", "ES256")
_TIME_CLAIMS = ("exp", "nbf", "iat")
#: How far ahead of the node's clock a token's ``nbf`` and ``iat`` may be (not ``exp``).
CLOCK_SKEW_S = 60.0


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` covers ``name``: ``*`` at the end matches any rest, else exact.

    A ``*`` elsewhere is taken literally (room names cannot contain it anyway).
    """
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other side of a connection, from a verified token.

    Attributes:
        sub: User or device id (the token's ``sub``).
        tenant: The tenant; rooms of different tenants never meet.
        kind: ``user``, ``device`` or ``service``.
        rooms: Room pattern -> rights.
        rpc: Target patterns this principal may call.
        exp: Expiry, seconds since the epoch, or None for a token without ``exp``.
        admin: A service token's ``admin: true``: it may join the ``sys:all:`` rooms, which
            show every tenant (node stats); nobody else may.
    """

    sub: str
    tenant: str = "default"
    kind: Kind = "user"
    rooms: dict[str, frozenset[str]] = field(default_factory=dict)
    rpc: tuple[str, ...] = ()
    exp: float | None = None
    admin: bool = False

    @property
    def personal_room(self) -> str | None:
        """The room this principal is joined to without asking, if any."""
        if self.kind == "user":
            return f"@user:{self.sub}"
        if self.kind == "device":
            return f"@device:{self.sub}"
        return None

    def can(self, right: str, room: str) -> bool:
        """Whether this principal holds ``right`` on ``room`` of its own tenant."""
        if room.startswith("sys:all:"):
            # Views across tenants: joined by admin service tokens only, published by nobody.
            return self.admin and right == "join"
        if self.kind == "service":
            return True
        if room.startswith("@"):
            # Personal rooms: only one's own, and only by an exact grant for publishing.
            if room != self.personal_room:
                return False
            if right == "publish":
                return "publish" in self.rooms.get(room, frozenset())
            return True
        if room.startswith("sys:"):
            # System rooms (node stats) are for operators: only a grant that names the sys:
            # namespace reaches them; a catch-all "*" does not.
            return any(
                right in rights and pattern.startswith("sys:") and pattern_matches(pattern, room)
                for pattern, rights in self.rooms.items()
            )
        return any(
            right in rights and pattern_matches(pattern, room)
            for pattern, rights in self.rooms.items()
        )

    def can_call(self, target: str) -> bool:
        """Whether this principal may send an rpc to ``target`` (``server``, ``user:<id>``...)."""
        if self.kind == "service":
            return True
        return any(pattern_matches(pattern, target) for pattern in self.rpc)

    def expires_in(self, now: float | None = None) -> float | None:
        """Seconds until expiry (may be negative), or None when the token never expires."""
        if self.exp is None:
            return None
        return self.exp - (time.time() if now is None else now)


def _claims_to_principal(claims: dict[str, Any], exp: float | None) -> Principal:
    sub = claims.get("sub")
    if not is_valid_id(sub):
        raise AuthError(f"token sub must be {ID_RULE}")
    tenant = claims.get("tenant", "default")
    if not is_valid_tenant(tenant):
        raise AuthError(f"token tenant must be {TENANT_RULE}")
    kind = claims.get("kind", "user")
    if kind not in KINDS:
        raise AuthError("token has an invalid kind")
    raw_rooms = claims.get("rooms", {})
    if not isinstance(raw_rooms, dict):
        raise AuthError("token rooms claim must be a map")
    rooms: dict[str, frozenset[str]] = {}
    for pattern, rights in raw_rooms.items():
        if not isinstance(pattern, str) or not isinstance(rights, list):
            raise AuthError("token rooms claim must map patterns to lists of rights")
        if any(r not in RIGHTS for r in rights):
            raise AuthError("token rooms claim names an unknown right")
        rooms[pattern] = frozenset(rights)
    raw_rpc = claims.get("rpc", [])
    if not isinstance(raw_rpc, list) or not all(isinstance(p, str) for p in raw_rpc):
        raise AuthError("token rpc claim must be a list of patterns")
    admin = claims.get("admin", False)
    if not isinstance(admin, bool) or (admin and kind != "service"):
        raise AuthError("token admin claim must be a boolean, true only for a service")
    return Principal(sub=sub, tenant=tenant, kind=kind, rooms=rooms, rpc=tuple(raw_rpc), exp=exp,
                     admin=admin)


def _time_claims(claims: dict[str, Any]) -> dict[str, float]:
    """``exp``, ``nbf`` and ``iat`` of ``claims`` (those present), as seconds since the epoch.

    Raises:
        AuthError: One is not a finite JSON number (a string, a boolean, NaN, too large).
    """
    times: dict[str, float] = {}
    for name in _TIME_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        # bool is an int subclass: true would be 1970-01-01T00:00:01.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AuthError(f"token {name} must be a number")
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            seconds = math.inf
        if not math.isfinite(seconds):
            raise AuthError(f"token {name} must be a finite number")
        times[name] = seconds
    return times


class TokenVerifier:
    """Verifies JWTs with one key and turns them into principals.

    Args:
        secret: The HS256 secret, or "" when a public key is used.
        public_key_pem: A PEM public key (RS256 or ES256), or None.
        issuer: Required ``iss``, or "" for none.
        audience: Required ``aud``, or "" for none.
        require_exp: Refuse tokens without ``exp``.
        max_lifetime_s: Refuse tokens valid for longer than this (``exp - iat``, or
            ``exp - now`` without ``iat``), and tokens without ``exp``; 0 for no limit.

    Example:
        verifier = TokenVerifier.from_settings(settings)
        principal = verifier.verify(token)  # AuthError 4001, or 4010 once expired
    """

    def __init__(
        self,
        *,
        secret: str = "",
        public_key_pem: bytes | None = None,
        issuer: str = "",
        audience: str = "",
        require_exp: bool = False,
        max_lifetime_s: float = 0,
    ) -> None:
        if public_key_pem:
            self._key: Any = public_key_pem
            self._algorithms = ["RS256", "ES256"]
        elif secret:
            self._key = secret
            self._algorithms = ["HS256"]
        else:
            raise ConfigError("no token key: set jwt_secret or jwt_public_key")
        self._issuer = issuer or None
        self._audience = audience or None
        self.require_exp = require_exp or max_lifetime_s > 0
        self.max_lifetime_s = max_lifetime_s
        # Signature, iss and aud by PyJWT; the time claims here, where their types are checked
        # first (PyJWT takes a string "exp" as int("...") and its expiry then goes unenforced).
        self._options: Any = {
            "require": ["sub"], "verify_aud": self._audience is not None,
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
        }

    @classmethod
    def from_key_file(cls, path: Path, *, issuer: str = "", audience: str = "",
                      require_exp: bool = False, max_lifetime_s: float = 0) -> TokenVerifier:
        """A verifier for RS256/ES256 tokens signed by the private half of the key in ``path``."""
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read jwt_public_key {path}: {exc.strerror}") from None
        return cls(public_key_pem=pem, issuer=issuer, audience=audience, require_exp=require_exp,
                   max_lifetime_s=max_lifetime_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """The node's verifier: its key (``jwt_public_key``, else ``jwt_secret``, else the
        data dir's secret), ``jwt_issuer``, ``jwt_audience``, ``tokens_need_exp`` and
        ``token_max_lifetime_s``.

        Raises:
            ConfigError: The key file cannot be read.
        """
        s = settings
        policy: dict[str, Any] = {
            "issuer": s.jwt_issuer, "audience": s.jwt_audience,
            "require_exp": s.tokens_need_exp, "max_lifetime_s": s.token_max_lifetime_s,
        }
        if s.jwt_public_key is not None:
            return cls.from_key_file(s.jwt_public_key, **policy)
        return cls(secret=s.jwt_secret or load_or_create_secret(s.data_dir), **policy)

    def verify(self, token: object, *, now: float | None = None) -> Principal:
        """Check ``token`` and return its principal.

        Raises:
            AuthError: 4001 for anything wrong, 4010 when the token is valid but expired.
        """
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise AuthError("missing or malformed token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                options=self._options,
            )
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None
        times = _time_claims(claims)
        self._check_times(times, time.time() if now is None else now)
        return _claims_to_principal(claims, times.get("exp"))

    def _check_times(self, times: dict[str, float], now: float) -> None:
        exp = times.get("exp")
        if exp is None:
            if self.require_exp:
                raise AuthError("token has no exp (this node requires one)")
        elif exp <= now:
            raise AuthError("token expired", expired=True)
        # exp has no leeway (a token is never used past it); nbf and iat allow the issuer's
        # clock to be a little ahead of the node's, or every fresh token would be refused.
        if times.get("nbf", now) > now + CLOCK_SKEW_S:
            raise AuthError("token not valid yet (nbf)")
        if times.get("iat", now) > now + CLOCK_SKEW_S:
            raise AuthError("token issued in the future (iat)")
        if self.max_lifetime_s and exp is not None:
            if exp - times.get("iat", now) > self.max_lifetime_s:
                raise AuthError(f"token valid for longer than this node allows "
                                f"({self.max_lifetime_s:g} s)")


def parse_room_grant(spec: str) -> tuple[str, list[str]]:
    """Parse ``'chat:*=join,publish'`` into ``('chat:*', ['join', 'publish'])``.

    Raises:
        ValueError: The spec is malformed or names an unknown right.
    """
    pattern, sep, rights_text = spec.partition("=")
    rights = [r.strip() for r in rights_text.split(",") if r.strip()]
    if not sep or not pattern or not rights:
        raise ValueError(f"expected PATTERN=right[,right...], got {spec!r}")
    unknown = [r for r in rights if r not in RIGHTS]
    if unknown:
        raise ValueError(f"unknown right {unknown[0]!r}; rights are {', '.join(RIGHTS)}")
    return pattern, rights


def mint_token(
    key: str | bytes,
    *,
    sub: str,
    tenant: str = "default",
    kind: str = "user",
    rooms: dict[str, list[str]] | None = None,
    rpc: list[str] | None = None,
    ttl_s: float | None = 3600,
    algorithm: str = "HS256",
    issuer: str = "",
    audience: str = "",
    now: float | None = None,
    admin: bool = False,
) -> str:
    """Sign a token with the claims of PROTOCOL.md section 4.

    Args:
        key: HS256 secret, or a PEM private key for RS256/ES256.
        ttl_s: Seconds until expiry; None for no ``exp``.
        admin: Add ``admin: true`` (a service token that sees every tenant's ``sys:all:``
            rooms).

    Raises:
        ValueError: ``sub``, ``tenant``, ``kind`` or ``algorithm`` is one no node accepts.
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(_ALGORITHMS)}")
    if not is_valid_id(sub):
        raise ValueError(f"sub must be {ID_RULE}, got {sub!r}")
    if not is_valid_tenant(tenant):
        raise ValueError(f"tenant must be {TENANT_RULE}, got {tenant!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    if admin and kind != "service":
        raise ValueError("admin is for service tokens only")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "tenant": tenant, "kind": kind, "iat": issued}
    if admin:
        claims["admin"] = True
    if rooms:
        claims["rooms"] = rooms
    if rpc:
        claims["rpc"] = rpc
    if ttl_s is not None:
        claims["exp"] = issued + int(ttl_s)
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, key, algorithm=algorithm)


def load_or_create_secret(data_dir: Path) -> str:
    """The HS256 secret kept in ``data_dir/jwt-secret`` (mode 0600), created on first use."""
    path = data_dir / "jwt-secret"
    try:
        secret = path.read_text(encoding="utf-8").strip()
        if secret:
            return secret
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    tmp = path.with_suffix(".tmp")
    # Created 0600 from the start: the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    tmp.replace(path)
    return secret
