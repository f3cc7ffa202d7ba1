"""Tokens and permissions (PROTOCOL.md section 4). Pure: no I/O but reading key files once.

A token is a JWT (HS256, RS256 or ES256) whose claims become a :class:`Principal`. The principal
answers every authorisation question of the node: ``principal.can("publish", "chat:lobby")``.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt

from node.protocol.errors import AuthError, ConfigError

__all__ = [
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
    """

    sub: str
    tenant: str = "default"
    kind: Kind = "user"
    rooms: dict[str, frozenset[str]] = field(default_factory=dict)
    rpc: tuple[str, ...] = ()
    exp: float | None = None

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


def _claims_to_principal(claims: dict[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise AuthError("token has no valid sub")
    tenant = claims.get("tenant", "default")
    if not isinstance(tenant, str) or not tenant or len(tenant) > 64 or not _is_token_word(tenant):
        raise AuthError("token has an invalid tenant")
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
    exp = claims.get("exp")
    return Principal(
        sub=sub, tenant=tenant, kind=kind, rooms=rooms, rpc=tuple(raw_rpc),
        exp=float(exp) if isinstance(exp, int | float) else None,
    )


def _is_token_word(value: str) -> bool:
    # Tenants become a NATS subject token: no dots, wildcards or spaces.
    return all(c.isalnum() or c in "-_" for c in value)


class TokenVerifier:
    """Verifies JWTs with one key and turns them into principals.

    Args:
        secret: The HS256 secret, or "" when a public key is used.
        public_key_pem: A PEM public key (RS256 or ES256), or None.
        issuer: Required ``iss``, or "" for none.
        audience: Required ``aud``, or "" for none.
    """

    def __init__(
        self,
        *,
        secret: str = "",
        public_key_pem: bytes | None = None,
        issuer: str = "",
        audience: str = "",
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

    @classmethod
    def from_key_file(cls, path: Path, *, issuer: str = "", audience: str = "") -> TokenVerifier:
        """A verifier for RS256/ES256 tokens signed by the private half of the key in ``path``."""
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read jwt_public_key {path}: {exc.strerror}") from None
        return cls(public_key_pem=pem, issuer=issuer, audience=audience)

    def verify(self, token: object, *, now: float | None = None) -> Principal:
        """Check ``token`` and return its principal.

        Raises:
            AuthError: 4001 for anything wrong, 4010 when the token is valid but expired.
        """
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise AuthError("missing or malformed token")
        options: Any = {"require": ["sub"], "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                options=options,
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", expired=True) from None
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None
        principal = _claims_to_principal(claims)
        left = principal.expires_in(now)
        if left is not None and left <= 0:
            raise AuthError("token expired", expired=True)
        return principal


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
) -> str:
    """Sign a token with the claims of PROTOCOL.md section 4.

    Args:
        key: HS256 secret, or a PEM private key for RS256/ES256.
        ttl_s: Seconds until expiry; None for no ``exp``.
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(_ALGORITHMS)}")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "tenant": tenant, "kind": kind, "iat": issued}
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
