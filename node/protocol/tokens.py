"""Tokens and permissions (PROTOCOL.md section 4). Pure but for reading key files once, the
revocation list when it changes, and logging refusals.

A token is a JWT (HS256, RS256 or ES256) whose claims become a :class:`Principal`. The principal
answers every authorisation question of the node: ``principal.can("publish", "chat:lobby")``.

What a valid token is, beyond its signature (every refusal is 4001, an expired token 4010):

* ``sub`` is an id and ``tenant`` a tenant of ``node.protocol.ids`` (no ``.``, ``*``, ``>``,
  ``/``, ``+``, ``#``, whitespace...): both reach NATS subjects and MQTT topics;
* ``exp``, ``nbf`` and ``iat``, when present, are finite JSON numbers (not strings, not
  booleans); ``exp`` is in the future (no leeway), ``nbf`` and ``iat`` are not (beyond
  :data:`CLOCK_SKEW_S` of the issuer's clock ahead of the node's);
* with ``require_exp``, ``exp`` is present; with ``max_lifetime_s``, ``exp`` is present and
  ``exp - iat`` (``exp - now`` without ``iat``) is at most that;
* its ``jti``, when present, is a string of at most 128 characters that is not in the node's
  revocation list (``<data-dir>/revoked-tokens``, one ``jti`` a line, see
  :func:`revoke_token`): a long-lived device token is withdrawn by its id.

Every refusal is a :class:`TokenRefused`: ``reason`` is what the client gets (unchanged by
this module's logging), ``why`` what the node logs at info (``node.tokens``, at most
:attr:`TokenRefusalLog.lines_per_window` lines per 10 s), never the token itself.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import logging
import math
import os
import secrets
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from node.protocol.errors import AuthError, ConfigError
from node.protocol.ids import ID_RULE, TENANT_RULE, is_valid_id, is_valid_tenant
from node.protocol.values import has_long_digits

if TYPE_CHECKING:
    # PyJWT is imported where tokens are signed or checked (a TokenVerifier, mint_token): it
    # loads cryptography, ~60 ms of every 'rtnode' start that signs and checks nothing.
    import jwt

    from node.protocol.settings import Settings

__all__ = [
    "CLOCK_SKEW_S",
    "KINDS",
    "REVOKED_FILE",
    "RIGHTS",
    "SECRET_FILE",
    "Principal",
    "TokenRefusalLog",
    "TokenRefused",
    "TokenVerifier",
    "create_secret",
    "load_or_create_secret",
    "load_secret",
    "mint_token",
    "parse_room_grant",
    "pattern_matches",
    "read_revoked",
    "revoke_token",
]

log = logging.getLogger("node.tokens")

Kind = Literal["user", "device", "service"]
KINDS: tuple[str, ...] = ("user", "device", "service")
RIGHTS: tuple[str, ...] = ("join", "publish", "history", "presence")
_ALGORITHMS = ("HS256", "RS256", "ES256")
_TIME_CLAIMS = ("exp", "nbf", "iat")
#: How far ahead of the node's clock a token's ``nbf`` and ``iat`` may be (not ``exp``).
CLOCK_SKEW_S = 60.0
#: The HS256 secret's file in the data dir.
SECRET_FILE = "jwt-secret"
#: The revocation list's file in the data dir: one ``jti`` a line, ``#`` comments.
REVOKED_FILE = "revoked-tokens"
_JTI_MAX = 128


class TokenRefused(AuthError):
    """A token was refused: ``reason`` goes to the client, ``why`` to the node's log.

    Args:
        reason: The client's one line (as before: the wire does not change).
        why: What the operator needs: which check failed, by how much. Never the token.
        category: A short key counted per refusal (``expired``, ``bad_signature``...).
        expired: Only the expiry is wrong (4010).
    """

    def __init__(self, reason: str, why: str, category: str, *, expired: bool = False) -> None:
        super().__init__(reason, expired=expired)
        self.why = why
        self.category = category


def _ago(seconds: float) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``12 min 3 s`` or ``7 s``."""
    s = int(abs(seconds))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {s % 60} s"
    return f"{s} s"


def _iso(t: float) -> str:
    """``t`` (seconds since the epoch) as a UTC time for a log line, or as the number where no
    date holds it (a token's ``nbf`` of 1e25 is finite, and refused, but has no date)."""
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{t:g} s after the epoch"


class TokenRefusalLog:
    """Logs token refusals at info, at most ``lines_per_window`` per ``window_s``.

    Refusals beyond that are counted, and the next logged line says how many were not
    logged, by category. ``counts`` keeps every refusal by category.
    """

    lines_per_window = 20
    window_s = 10.0

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger
        self._window_start = -math.inf
        self._lines = 0
        self._skipped: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()

    def refused(self, category: str, why: str, where: str = "",
                now: float | None = None) -> None:
        """Count one refusal, and log it unless this window's lines are used up."""
        self.counts[category] += 1
        now = time.monotonic() if now is None else now
        if now - self._window_start >= self.window_s:
            self._window_start, self._lines = now, 0
            if self._skipped:
                self._log.info("x %d more token refusals not logged in %g s (%s)",
                               sum(self._skipped.values()), self.window_s,
                               ", ".join(f"{k} {n}" for k, n in self._skipped.most_common()))
                self._skipped.clear()
        if self._lines >= self.lines_per_window:
            self._skipped[category] += 1
            return
        self._lines += 1
        self._log.info("x token refused%s: %s", f" ({where})" if where else "", why)


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` covers ``name``: ``*`` at the end matches any rest, else exact.

    A ``*`` elsewhere is taken literally (room names cannot contain it anyway).
    """
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


_PUBLISH_KNOWN_MAX = 64


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
    #: ``can("publish", room)`` answers so far, by room (None until the first publish): the
    #: publish path asks for every event; the answer depends on nothing that changes.
    _publish: dict[str, bool] | None = field(default=None, init=False, repr=False,
                                             compare=False)

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
        if right != "publish":
            return self._can(right, room)
        known = self._publish
        if known is None:
            known = {}
            object.__setattr__(self, "_publish", known)  # frozen: set once, here
        ok = known.get(room)
        if ok is None:
            if len(known) >= _PUBLISH_KNOWN_MAX:
                known.clear()
            ok = known[room] = self._can(right, room)
        return ok

    def _can(self, right: str, room: str) -> bool:
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
        # System rooms (node stats) are for operators: only a grant that names the sys:
        # namespace reaches them; a catch-all "*" does not.
        system = room.startswith("sys:")
        for pattern, rights in self.rooms.items():  # a loop: any(genexpr) cost 2% per publish
            if right in rights and (not system or pattern.startswith("sys:")) and (
                    pattern == room
                    or (pattern.endswith("*") and room.startswith(pattern[:-1]))):
                return True
        return False

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


def _bad_claim(reason: str, claim: str, detail: str = "") -> TokenRefused:
    return TokenRefused(reason, f"invalid claim {claim}{': ' + detail if detail else ''}",
                        "bad_claim")


_RIGHT_SETS: dict[frozenset[str], frozenset[str]] = {}
# Grant maps of principals, by their items: tokens minted for one role have equal maps, and
# every connection's principal holds one (~0.2 KB). Never written once made; bounded.
_ROOM_MAPS: dict[tuple[tuple[str, frozenset[str]], ...], dict[str, frozenset[str]]] = {}
_ROOM_MAPS_MAX = 4096
_KIND_NAMES: dict[str, Kind] = {"user": "user", "device": "device", "service": "service"}


def _claims_to_principal(claims: dict[str, Any], exp: float | None) -> Principal:
    sub = claims.get("sub")
    if not is_valid_id(sub):
        raise _bad_claim(f"token sub must be {ID_RULE}", "sub", f"must be {ID_RULE}")
    tenant = claims.get("tenant", "default")
    if not is_valid_tenant(tenant):
        raise _bad_claim(f"token tenant must be {TENANT_RULE}", "tenant",
                         f"must be {TENANT_RULE} (sub {sub})")
    kind = claims.get("kind", "user")
    if kind not in KINDS:
        raise _bad_claim("token has an invalid kind", "kind",
                         f"must be one of {', '.join(KINDS)} (sub {sub})")
    # The principal outlives its connect: one string for each tenant, kind and room pattern,
    # not a copy per connection from each token's JSON.
    tenant, kind = sys.intern(tenant), _KIND_NAMES[kind]
    raw_rooms = claims.get("rooms", {})
    if not isinstance(raw_rooms, dict):
        raise _bad_claim("token rooms claim must be a map", "rooms", "not a map")
    rooms: dict[str, frozenset[str]] = {}
    for pattern, rights in raw_rooms.items():
        if not isinstance(pattern, str) or not isinstance(rights, list):
            raise _bad_claim("token rooms claim must map patterns to lists of rights", "rooms",
                             "not patterns mapped to lists of rights")
        if any(r not in RIGHTS for r in rights):
            raise _bad_claim("token rooms claim names an unknown right", "rooms",
                             f"names a right other than {', '.join(RIGHTS)}")
        got = frozenset(rights)
        # Shared: there are at most 2^len(RIGHTS) of them, and every principal holds some.
        rooms[sys.intern(pattern)] = _RIGHT_SETS.setdefault(got, got)
    items = tuple(rooms.items())
    shared = _ROOM_MAPS.get(items)
    if shared is not None:
        rooms = shared
    elif len(_ROOM_MAPS) < _ROOM_MAPS_MAX:
        _ROOM_MAPS[items] = rooms
    raw_rpc = claims.get("rpc", [])
    if not isinstance(raw_rpc, list) or not all(isinstance(p, str) for p in raw_rpc):
        raise _bad_claim("token rpc claim must be a list of patterns", "rpc",
                         "not a list of patterns")
    admin = claims.get("admin", False)
    if not isinstance(admin, bool) or (admin and kind != "service"):
        raise _bad_claim("token admin claim must be a boolean, true only for a service",
                         "admin", f"true only for a service, and a boolean (kind {kind})")
    return Principal(sub=sub, tenant=tenant, kind=kind, rooms=rooms, rpc=tuple(raw_rpc), exp=exp,
                     admin=admin)


def _time_claims(claims: dict[str, Any]) -> dict[str, float]:
    """``exp``, ``nbf`` and ``iat`` of ``claims`` (those present), as seconds since the epoch.

    Raises:
        TokenRefused: One is not a finite JSON number (a string, a boolean, NaN, too large).
    """
    times: dict[str, float] = {}
    for name in _TIME_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        # bool is an int subclass: true would be 1970-01-01T00:00:01.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad_claim(f"token {name} must be a number", name,
                             f"a {type(value).__name__}, not a number")
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            seconds = math.inf
        if not math.isfinite(seconds):
            raise _bad_claim(f"token {name} must be a finite number", name, "not finite")
        times[name] = seconds
    return times


def _who(claims: dict[str, Any]) -> str:
    """``device thermo-1`` (or ``tenant acme device thermo-1``) of signed claims, for the log;
    only values of the id grammar are shown (nothing that could forge a log line)."""
    sub, kind, tenant = claims.get("sub"), claims.get("kind", "user"), claims.get("tenant")
    who = f"{kind if kind in KINDS else 'token'} {sub if is_valid_id(sub) else '?'}"
    if tenant not in (None, "default") and is_valid_tenant(tenant):
        who = f"tenant {tenant} {who}"
    return who


def _jwt_errors() -> tuple[tuple[type[jwt.PyJWTError], str, str], ...]:
    """PyJWT's errors, most specific first, with the category and the why of the refusal."""
    import jwt

    return (
        # Most specific first: InvalidSignatureError is a DecodeError.
        (jwt.InvalidSignatureError, "bad_signature",
         "bad signature: signed with another key (was it minted with this node's secret: "
         "'rtnode token' run with the node's --data-dir, or the same RTNODE_JWT_SECRET?)"),
        (jwt.InvalidAlgorithmError, "bad_algorithm",
         "its algorithm is not one this node accepts"),
        (jwt.InvalidIssuerError, "bad_claim", "invalid claim iss (not the node's jwt_issuer)"),
        (jwt.InvalidAudienceError, "bad_claim",
         "invalid claim aud (not the node's jwt_audience)"),
        (jwt.MissingRequiredClaimError, "bad_claim", "missing claim"),
        (jwt.DecodeError, "malformed", "malformed: not a JWT"),
    )


def _jwt_refusal(exc: jwt.PyJWTError, algorithms: list[str]) -> TokenRefused:
    import jwt

    for error_type, category, why in _jwt_errors():
        if isinstance(exc, error_type):
            if error_type is jwt.InvalidAlgorithmError:
                why = f"{why} ({', '.join(algorithms)})"
            elif error_type is jwt.MissingRequiredClaimError:
                why = f"missing claim {getattr(exc, 'claim', '?')}"
            return TokenRefused("invalid token", why, category)
    return TokenRefused("invalid token", f"invalid ({type(exc).__name__})", "malformed")


# base64url to the standard alphabet, for binascii; what base64url does not hold ("+", "/",
# "=") becomes "!", which the standard alphabet does not hold either.
_URL_TO_STD = bytes.maketrans(b"-_+/=", b"+/!!!")


def _b64url(segment: str) -> bytes | None:
    """A canonical unpadded base64url segment, decoded (None: anything else).

    binascii's own functions, not base64's wrappers and a pattern: with the HMAC in one
    OpenSSL call, ~18,000 instructions less per token (bench instructions). A segment is
    taken only when its bytes read back as they came, which no other character, padding or
    non-zero spare bits can."""
    if not segment.isascii() or len(segment) % 4 == 1:
        return None
    std = segment.encode().translate(_URL_TO_STD) + b"=" * (-len(segment) % 4)
    try:
        raw = binascii.a2b_base64(std, strict_mode=True)
    except binascii.Error:
        return None
    if binascii.b2a_base64(raw, newline=False) != std:
        return None
    return raw


def _fast_hs256(token: str, key: bytes) -> dict[str, Any] | None:
    """The claims of an HS256 token in its plainest form, verified: header ``{"alg":"HS256"}``
    (``typ`` allowed), canonical unpadded base64url, a good signature, a JSON object with a
    string ``sub`` and no ``jti`` other than a string. None for anything else: PyJWT decides
    then (and says why). Several times faster than PyJWT, which checks each base64 character
    in a generator (~100 us a token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    head, body, sig = parts
    raw_head, raw_body, raw_sig = _b64url(head), _b64url(body), _b64url(sig)
    if raw_head is None or raw_body is None or raw_sig is None:
        return None
    expected = hmac.digest(key, f"{head}.{body}".encode(), "sha256")  # OpenSSL's one-shot
    if not hmac.compare_digest(expected, raw_sig):
        return None
    if has_long_digits(raw_body):  # orjson would read an integer past 64 bits as a float
        return None
    try:  # orjson: what it reads, json reads alike (it refuses NaN, lone surrogates, ...)
        header, claims = orjson.loads(raw_head), orjson.loads(raw_body)
    except ValueError:
        return None
    if (not isinstance(header, dict) or header.get("alg") != "HS256"
            or not header.keys() <= {"alg", "typ"} or not isinstance(header.get("typ", ""), str)
            or not isinstance(claims, dict) or not isinstance(claims.get("sub"), str)
            or not isinstance(claims.get("jti", ""), str)):
        return None
    return claims


class TokenVerifier:
    """Verifies JWTs with one key and turns them into principals; logs why it refuses one.

    Args:
        secret: The HS256 secret, or "" when a public key is used.
        public_key_pem: A PEM public key (RS256 or ES256), or None.
        issuer: Required ``iss``, or "" for none.
        audience: Required ``aud``, or "" for none.
        require_exp: Refuse tokens without ``exp``.
        max_lifetime_s: Refuse tokens valid for longer than this (``exp - iat``, or
            ``exp - now`` without ``iat``), and tokens without ``exp``; 0 for no limit.
        revoked_file: The revocation list (``<data-dir>/revoked-tokens``), or None. It may
            not exist yet; it is read again when its modification time or size changes
            (checked at most once a second), so a revocation needs no restart.

    Example:
        verifier = TokenVerifier.from_settings(settings)
        principal = verifier.verify(token, where="mqtt thermo-1")  # or TokenRefused
    """

    #: How often the revocation list's file is looked at (a stat), at most.
    revoked_check_s = 1.0

    def __init__(
        self,
        *,
        secret: str = "",
        public_key_pem: bytes | None = None,
        issuer: str = "",
        audience: str = "",
        require_exp: bool = False,
        max_lifetime_s: float = 0,
        revoked_file: Path | None = None,
    ) -> None:
        import jwt  # noqa: F401 (now, at the node's start, rather than at its first token)

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
        self.refusals = TokenRefusalLog()
        # HS256 without iss or aud to check: plain tokens are verified by _fast_hs256 once
        # PyJWT has accepted one with this key (it refuses some keys, e.g. PEM-like ones).
        self._fast_key = (secret.encode() if not public_key_pem and self._issuer is None
                          and self._audience is None else None)
        self._fast_ok = False
        self._revoked_file = revoked_file
        self._revoked: frozenset[str] = frozenset()
        self._revoked_stamp: tuple[int, int] | None = None
        self._revoked_checked = -math.inf
        # Tokens whose signature, iss and aud were verified, by digest: a token presented again
        # (a reconnect, a second tab) skips PyJWT (~100 us). Its times and its jti are checked
        # again on every use (expiry, revocation); refusals are never cached.
        self._verified: OrderedDict[bytes, tuple[Principal, dict[str, float], Any]] = \
            OrderedDict()

    #: Verified tokens remembered (least recently used first out): ~0.3 KB each.
    verified_cache_size = 1024

    def forget(self) -> None:
        """Empty the cache of verified tokens (after a crowd has gone, node/memory.py: its
        entries, made among the crowd's connections, would keep their memory pages)."""
        self._verified.clear()

    @classmethod
    def from_key_file(cls, path: Path, *, issuer: str = "", audience: str = "",
                      require_exp: bool = False, max_lifetime_s: float = 0,
                      revoked_file: Path | None = None) -> TokenVerifier:
        """A verifier for RS256/ES256 tokens signed by the private half of the key in ``path``."""
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read jwt_public_key {path}: {exc.strerror}") from None
        return cls(public_key_pem=pem, issuer=issuer, audience=audience, require_exp=require_exp,
                   max_lifetime_s=max_lifetime_s, revoked_file=revoked_file)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """The node's verifier: its key (``jwt_public_key``, else ``jwt_secret``, else the
        data dir's secret, created on the first start and said so in the log),
        ``jwt_issuer``, ``jwt_audience``, ``tokens_need_exp``, ``token_max_lifetime_s`` and
        the data dir's revocation list.

        Raises:
            ConfigError: The key file cannot be read.
        """
        s = settings
        policy: dict[str, Any] = {
            "issuer": s.jwt_issuer, "audience": s.jwt_audience,
            "require_exp": s.tokens_need_exp, "max_lifetime_s": s.token_max_lifetime_s,
            "revoked_file": s.data_dir / REVOKED_FILE,
        }
        if s.jwt_public_key is not None:
            return cls.from_key_file(s.jwt_public_key, **policy)
        secret = s.jwt_secret or load_secret(s.data_dir)
        if not secret:
            secret = create_secret(s.data_dir)
            log.info("= no token secret in %s: created %s (tokens signed with another secret "
                     "are refused; 'rtnode token --data-dir %s' signs with this one)",
                     s.data_dir, s.data_dir / SECRET_FILE, s.data_dir)
        return cls(secret=secret, **policy)

    def verify(self, token: object, *, now: float | None = None, where: str = "") -> Principal:
        """Check ``token`` and return its principal; log why when it is refused.

        Args:
            token: The JWT as received.
            now: The time (seconds since the epoch), for tests.
            where: Which door and connection asks (``mqtt thermo-1``, ``ws c1f3...``), for
                the log line of a refusal.

        Raises:
            TokenRefused: 4001 for anything wrong, 4010 when the token is valid but expired.
        """
        try:
            return self._verify(token, time.time() if now is None else now)
        except TokenRefused as exc:
            self.refusals.refused(exc.category, exc.why, where)
            raise

    def refused(self, category: str, why: str, where: str = "") -> None:
        """Log a refusal decided by a door after :meth:`verify` (``wrong_kind``...)."""
        self.refusals.refused(category, why, where)

    def _verify(self, token: object, now: float) -> Principal:
        if not isinstance(token, str) or not token:
            raise TokenRefused("missing or malformed token", "no token", "missing")
        if len(token) > 8192:
            raise TokenRefused("missing or malformed token",
                               f"malformed: {len(token)} characters (8192 at most)", "malformed")
        digest = hashlib.blake2b(token.encode(), digest_size=20).digest()
        hit = self._verified.get(digest)
        if hit is not None:
            self._verified.move_to_end(digest)
            principal, times, jti = hit
            # What the checks read of the claims: the names of _who, and the jti.
            claims = {"sub": principal.sub, "kind": principal.kind, "tenant": principal.tenant}
            if jti is not None:
                claims["jti"] = jti
            self._check_times(times, now, claims)
            self._check_revoked(claims)
            return principal
        fast = (_fast_hs256(token, self._fast_key)
                if self._fast_ok and self._fast_key is not None else None)
        if fast is not None:
            claims = fast
        else:
            import jwt

            try:
                claims = jwt.decode(
                    token,
                    self._key,
                    algorithms=self._algorithms,
                    issuer=self._issuer,
                    audience=self._audience,
                    options=self._options,
                )
            except jwt.PyJWTError as exc:
                raise _jwt_refusal(exc, self._algorithms) from None
            self._fast_ok = True
        times = _time_claims(claims)
        self._check_times(times, now, claims)
        self._check_revoked(claims)
        principal = _claims_to_principal(claims, times.get("exp"))
        # The principal has the names of _who; the jti is all else the checks read on a hit.
        self._verified[digest] = (principal, times, claims.get("jti"))
        if len(self._verified) > self.verified_cache_size:
            self._verified.popitem(last=False)
        return principal

    def _check_times(self, times: dict[str, float], now: float, claims: dict[str, Any]) -> None:
        exp = times.get("exp")
        if exp is None:
            if self.require_exp:
                raise TokenRefused("token has no exp (this node requires one)",
                                   f"missing claim exp ({_who(claims)}; this node requires one)",
                                   "no_exp")
        elif exp <= now:
            raise TokenRefused("token expired",
                               f"expired {_ago(now - exp)} ago (exp {_iso(exp)}; "
                               f"{_who(claims)})", "expired", expired=True)
        # exp has no leeway (a token is never used past it); nbf and iat allow the issuer's
        # clock to be a little ahead of the node's, or every fresh token would be refused.
        nbf, iat = times.get("nbf", now), times.get("iat", now)
        if nbf > now + CLOCK_SKEW_S:
            raise TokenRefused("token not valid yet (nbf)",
                               f"not yet valid: nbf {_iso(nbf)} is {_ago(nbf - now)} ahead of "
                               f"this node's clock ({CLOCK_SKEW_S:g} s allowed; {_who(claims)})",
                               "not_yet_valid")
        if iat > now + CLOCK_SKEW_S:
            raise TokenRefused("token issued in the future (iat)",
                               f"not yet valid: iat {_iso(iat)} is {_ago(iat - now)} ahead of "
                               f"this node's clock ({CLOCK_SKEW_S:g} s allowed; {_who(claims)})",
                               "not_yet_valid")
        if self.max_lifetime_s and exp is not None:
            lifetime = exp - times.get("iat", now)
            if lifetime > self.max_lifetime_s:
                raise TokenRefused(f"token valid for longer than this node allows "
                                   f"({self.max_lifetime_s:g} s)",
                                   f"valid for {_ago(lifetime)}, longer than "
                                   f"token_max_lifetime_s {self.max_lifetime_s:g} "
                                   f"({_who(claims)})", "too_long")

    def _check_revoked(self, claims: dict[str, Any]) -> None:
        jti = claims.get("jti")
        if jti is None:
            return
        if not isinstance(jti, str) or not jti or len(jti) > _JTI_MAX:
            raise _bad_claim("invalid token", "jti", f"a string of 1 to {_JTI_MAX} characters")
        if jti in self.revoked():
            safe = jti if is_valid_id(jti) else "(not printable)"
            raise TokenRefused("token revoked", f"revoked: jti {safe} is in {self._revoked_file}"
                               f" ({_who(claims)})", "revoked")

    def revoked(self) -> frozenset[str]:
        """The revoked ``jti`` values, read again when the file changed (stat at most 1/s)."""
        path = self._revoked_file
        mono = time.monotonic()
        if path is None or mono - self._revoked_checked < self.revoked_check_s:
            return self._revoked
        self._revoked_checked = mono
        try:
            st = path.stat()
        except FileNotFoundError:
            self._revoked, self._revoked_stamp = frozenset(), None
            return self._revoked
        except OSError as exc:
            log.warning("! cannot read the revocation list %s: %s (kept the last one)",
                        path, exc.strerror)
            return self._revoked
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._revoked_stamp:
            try:
                self._revoked = read_revoked(path)
            except OSError as exc:
                log.warning("! cannot read the revocation list %s: %s (kept the last one)",
                            path, exc.strerror)
                return self._revoked
            self._revoked_stamp = stamp
            log.info("= revocation list %s: %d token ids", path, len(self._revoked))
        return self._revoked


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
    jti: str | None = None,
) -> str:
    """Sign a token with the claims of PROTOCOL.md section 4.

    Args:
        key: HS256 secret, or a PEM private key for RS256/ES256.
        ttl_s: Seconds until expiry; None for no ``exp``.
        admin: Add ``admin: true`` (a service token that sees every tenant's ``sys:all:``
            rooms).
        jti: The token's id, by which it can be revoked; None for a random one (16 hex
            digits), "" for none.

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
    if jti is None:
        jti = secrets.token_hex(8)
    if jti:
        claims["jti"] = jti
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    import jwt

    return jwt.encode(claims, key, algorithm=algorithm)


def load_secret(data_dir: Path) -> str:
    """The HS256 secret kept in ``data_dir/jwt-secret``, or "" when there is none."""
    try:
        return (data_dir / SECRET_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def create_secret(data_dir: Path) -> str:
    """Create a new HS256 secret in ``data_dir/jwt-secret`` (mode 0600) and return it."""
    path = data_dir / SECRET_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    tmp = path.with_suffix(".tmp")
    # Created 0600 from the start: the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    tmp.replace(path)
    return secret


def load_or_create_secret(data_dir: Path) -> str:
    """The HS256 secret kept in ``data_dir/jwt-secret`` (mode 0600), created on first use."""
    return load_secret(data_dir) or create_secret(data_dir)


def read_revoked(path: Path) -> frozenset[str]:
    """The ``jti`` values of a revocation list: one a line (``#`` starts a comment).

    Raises:
        OSError: The file cannot be read (FileNotFoundError included).
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(
        jti for line in text.splitlines() if (jti := line.partition("#")[0].strip())
    )


def revoke_token(data_dir: Path, jti: str, note: str = "") -> tuple[Path, bool]:
    """Add ``jti`` to ``data_dir/revoked-tokens`` (created if needed).

    Nodes using this data dir refuse the token at its next connect or refresh, within about a
    second and without a restart; a connection open now is not cut (``POST /api/disconnect``
    does that).

    Returns:
        The file, and whether ``jti`` was added (False: it was already there).

    Raises:
        ValueError: ``jti`` is empty, too long, or holds whitespace or ``#``.
    """
    if not jti or len(jti) > _JTI_MAX or any(c.isspace() or c == "#" for c in jti):
        raise ValueError(f"a token id (jti) is 1 to {_JTI_MAX} characters without spaces "
                         f"or '#', not {jti!r}")
    path = data_dir / REVOKED_FILE
    try:
        if jti in read_revoked(path):
            return path, False
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    line = f"{jti}  # {note}\n" if note else f"{jti}\n"
    # One write of one line in append mode: concurrent revocations do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line)
    return path, True
