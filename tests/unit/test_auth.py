"""Tokens and rights (PROTOCOL.md section 4), without sockets."""

from __future__ import annotations

import os
import random
import string
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from node.protocol.errors import AuthError, ConfigError
from node.protocol.ids import is_valid_id, is_valid_tenant
from node.protocol.settings import load_settings
from node.protocol.tokens import (
    CLOCK_SKEW_S,
    Principal,
    TokenVerifier,
    load_or_create_secret,
    mint_token,
    parse_room_grant,
    pattern_matches,
)

SECRET = "s" * 40


def signed(**claims: object) -> str:
    """A token with exactly these claims, signed with SECRET (mint_token refuses bad ones)."""
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_roundtrip_and_rights() -> None:
    token = mint_token(SECRET, sub="alice", tenant="acme",
                       rooms={"chat:*": ["join", "history"], "news": ["join"]}, rpc=["device:*"])
    p = TokenVerifier(secret=SECRET).verify(token)
    assert (p.sub, p.tenant, p.kind) == ("alice", "acme", "user")
    assert p.can("join", "chat:lobby") and p.can("history", "chat:") and p.can("join", "news")
    assert not p.can("publish", "chat:lobby") and not p.can("join", "news:x")
    assert p.can_call("device:thermo-1") and not p.can_call("server")
    assert 3590 < (p.expires_in() or 0) <= 3600


def test_personal_rooms() -> None:
    p = Principal(sub="alice", rooms={"*": ["join", "publish", "history", "presence"]})
    p = Principal(sub="alice", rooms={k: frozenset(v) for k, v in p.rooms.items()})
    assert p.can("join", "@user:alice") and p.can("history", "@user:alice")
    assert not p.can("publish", "@user:alice"), "publishing to one's own room needs an exact grant"
    assert not p.can("join", "@user:bob"), "no pattern reaches another user's personal room"
    exact = Principal(sub="alice", rooms={"@user:alice": frozenset({"publish"})})
    assert exact.can("publish", "@user:alice")
    dev = Principal(sub="d1", kind="device")
    assert dev.personal_room == "@device:d1" and dev.can("join", "@device:d1")
    svc = Principal(sub="backend", kind="service")
    assert svc.can("publish", "@user:bob") and svc.can_call("user:bob")
    assert svc.personal_room is None


def test_refusals() -> None:
    v = TokenVerifier(secret=SECRET)
    none_token = jwt.encode({"sub": "a"}, key=None, algorithm="none")
    for bad in (none_token, mint_token("other-secret-xxxxxxxxxxxxxxxxxxxxxxxxx", sub="a"), "x.y.z",
                "", None, 42, signed(sub="a", kind="admin"), signed(sub="a", tenant="a.b")):
        with pytest.raises(AuthError) as info:
            v.verify(bad)
        assert info.value.code == 4001
    expired = mint_token(SECRET, sub="a", ttl_s=10, now=time.time() - 100)
    with pytest.raises(AuthError) as info:
        v.verify(expired)
    assert info.value.code == 4010 and info.value.expired


def test_issuer_and_audience() -> None:
    v = TokenVerifier(secret=SECRET, issuer="me", audience="rt")
    ok = mint_token(SECRET, sub="a", issuer="me", audience="rt")
    assert v.verify(ok).sub == "a"
    for bad in (mint_token(SECRET, sub="a", issuer="you", audience="rt"),
                mint_token(SECRET, sub="a", issuer="me"),
                mint_token(SECRET, sub="a", issuer="me", audience="other")):
        with pytest.raises(AuthError):
            v.verify(bad)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_public_key_algorithms(alg: str, tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(
        ec.SECP256R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pub)
    v = TokenVerifier.from_key_file(tmp_path / "pub.pem")
    assert v.verify(mint_token(priv, sub="d", kind="device", algorithm=alg)).kind == "device"
    with pytest.raises(AuthError):
        v.verify(mint_token(SECRET, sub="d"))  # HS256 with a key-file verifier: refused


def test_grants_and_patterns() -> None:
    assert parse_room_grant("chat:*=join, publish") == ("chat:*", ["join", "publish"])
    for bad in ("chat:*", "=join", "chat:*=", "chat:*=fly"):
        with pytest.raises(ValueError):
            parse_room_grant(bad)
    assert pattern_matches("*", "anything") and pattern_matches("a:*", "a:")
    assert not pattern_matches("a:*", "b:x") and not pattern_matches("a", "ab")


def test_secret_is_created_once(tmp_path: Path) -> None:
    s1 = load_or_create_secret(tmp_path / "d")
    assert load_or_create_secret(tmp_path / "d") == s1 and len(s1) >= 48
    assert (tmp_path / "d" / "jwt-secret").stat().st_mode & 0o777 == 0o600


def test_system_rooms_need_a_sys_grant() -> None:
    everything = Principal(sub="u", rooms={"*": frozenset({"join"})})
    assert not everything.can("join", "sys:stats"), "a catch-all does not reach sys: rooms"
    admin = Principal(sub="ops", rooms={"sys:*": frozenset({"join"})})
    assert admin.can("join", "sys:stats")


# -- identities and time claims (issue 11) ---------------------------------------------------

#: Characters with a meaning somewhere an id goes: NATS subjects, MQTT topics, logs.
HOSTILE_CHARS = ".*>+#/$ \t\n\r\x00\x7f|%\\\"'{}éк😀"


def hostile_ids(seed: int, n: int) -> list[str]:
    """``n`` ids each holding at least one hostile character, reproducible from ``seed``."""
    rng = random.Random(seed)
    ids = [">", "*", "a.b", "#", "+", "a/b", "$SYS", " ", "", "a" * 121, "alice\n"]
    while len(ids) < n:
        good = "".join(rng.choices(string.ascii_letters + "_:@=-", k=rng.randint(0, 10)))
        at = rng.randint(0, len(good))
        ids.append(good[:at] + rng.choice(HOSTILE_CHARS) + good[at:])
    return ids


def test_the_id_grammar() -> None:
    for good in ("alice", "thermo-1", "a", "A_b:c@d=e-f", "x" * 120, "0", "@user", "-"):
        assert is_valid_id(good), good
    for bad in hostile_ids(1101, 300):
        assert not is_valid_id(bad), repr(bad)
    for bad in (None, 42, b"alice", ["alice"]):
        assert not is_valid_id(bad)
    assert is_valid_tenant("acme-1_x") and is_valid_tenant("t" * 64)
    for bad in ("a:b", "a@b", "a=b", "", "t" * 65, "tenänt", *hostile_ids(1102, 100)):
        assert not is_valid_tenant(bad), repr(bad)


def test_hostile_subs_and_tenants_are_refused() -> None:
    v = TokenVerifier(secret=SECRET)
    for bad in hostile_ids(1103, 200):
        for tok in (signed(sub=bad), signed(sub="a", tenant=bad or "x.y")):
            with pytest.raises(AuthError) as info:
                v.verify(tok)
            assert info.value.code == 4001
        with pytest.raises(ValueError, match="sub must be"):
            mint_token(SECRET, sub=bad)
    with pytest.raises(ValueError, match="tenant must be"):
        mint_token(SECRET, sub="a", tenant="a:b")
    assert v.verify(signed(sub="dev:a@b=c-1", tenant="t_1-x")).sub == "dev:a@b=c-1"


def test_time_claims_must_be_numbers() -> None:
    v = TokenVerifier(secret=SECRET)
    now = int(time.time())
    for name in ("exp", "nbf", "iat"):
        for bad in (str(now + 3600), "soon", True, False, None, [now], {"t": now}, 10**400):
            with pytest.raises(AuthError) as info:
                v.verify(signed(sub="a", **{name: bad}))
            assert info.value.code == 4001 and not info.value.expired, (name, bad)
    inf = jwt.api_jws.encode(b'{"sub":"a","exp":Infinity}', SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as info:
        v.verify(inf)
    assert info.value.code == 4001
    p = v.verify(signed(sub="a", exp=now + 60.5, nbf=now - 1, iat=now - 1.5))
    assert p.exp == now + 60.5


def test_expiry_nbf_and_iat_are_checked_at_now() -> None:
    v = TokenVerifier(secret=SECRET)
    tok = signed(sub="a", iat=1000, nbf=1000, exp=2000)
    assert v.verify(tok, now=1500).exp == 2000
    with pytest.raises(AuthError) as info:
        v.verify(tok, now=2000)
    assert info.value.code == 4010 and info.value.expired
    assert v.verify(tok, now=1000 - CLOCK_SKEW_S).sub == "a", "the issuer's clock may be ahead"
    for now in (999 - CLOCK_SKEW_S, 999.5 - CLOCK_SKEW_S):
        with pytest.raises(AuthError) as info:
            v.verify(tok, now=now)
        assert info.value.code == 4001 and not info.value.expired


def test_require_exp_and_max_lifetime() -> None:
    now = time.time()
    no_exp = mint_token(SECRET, sub="a", ttl_s=None)
    day = mint_token(SECRET, sub="a", ttl_s=86400)
    hour = mint_token(SECRET, sub="a", ttl_s=3600)
    assert TokenVerifier(secret=SECRET).verify(no_exp).exp is None
    strict = TokenVerifier(secret=SECRET, require_exp=True)
    with pytest.raises(AuthError, match="no exp") as info:
        strict.verify(no_exp)
    assert info.value.code == 4001
    assert strict.verify(day).exp is not None
    capped = TokenVerifier(secret=SECRET, max_lifetime_s=7200)
    assert capped.verify(hour).sub == "a"
    for bad in (day, no_exp, signed(sub="a", exp=int(now) + 7300)):  # without iat: exp - now
        with pytest.raises(AuthError) as info:
            capped.verify(bad)
        assert info.value.code == 4001
    old_but_short = signed(sub="a", iat=int(now) - 7000, exp=int(now) + 100)
    assert capped.verify(old_but_short).sub == "a", "exp - iat is the lifetime"


def test_the_verifier_is_built_from_settings(tmp_path: Path) -> None:
    base = {"jwt_secret": SECRET, "data_dir": tmp_path}
    no_exp = mint_token(SECRET, sub="a", ttl_s=None)
    assert TokenVerifier.from_settings(load_settings(**base)).verify(no_exp).sub == "a"
    for flags in ({"production": True}, {"require_exp": True}, {"token_max_lifetime_s": 60}):
        with pytest.raises(AuthError):
            TokenVerifier.from_settings(load_settings(**base, **flags)).verify(no_exp)
    lax = TokenVerifier.from_settings(load_settings(**base, production=True, require_exp=False))
    assert lax.verify(no_exp).sub == "a", "require_exp=false wins over production mode"
    generated = TokenVerifier.from_settings(load_settings(data_dir=tmp_path / "d"))
    key = load_or_create_secret(tmp_path / "d")
    assert generated.verify(mint_token(key, sub="a")).sub == "a"


def test_the_external_brokers_tenant_is_a_tenant() -> None:
    assert load_settings(mqtt_tenant="acme-1").mqtt_tenant == "acme-1"
    for bad in ("a.b", "a:b", "*", ""):
        with pytest.raises(ConfigError, match="mqtt_tenant"):
            load_settings(mqtt_tenant=bad)


def _can_reference(p: Principal, right: str, room: str) -> bool:
    """``Principal.can`` as the protocol states it (PROTOCOL.md section 4), written plainly."""
    if room.startswith("sys:all:"):
        return p.admin and right == "join"
    if p.kind == "service":
        return True
    if room.startswith("@"):
        if room != p.personal_room:
            return False
        return right != "publish" or "publish" in p.rooms.get(room, frozenset())
    return any(right in rights and pattern_matches(pattern, room)
               and (not room.startswith("sys:") or pattern.startswith("sys:"))
               for pattern, rights in p.rooms.items())


def test_can_answers_as_the_plain_rule_on_seeded_random_grants() -> None:
    rng = random.Random(int(os.environ.get("RTNODE_TEST_CAN_SEED", "4242")))
    parts = ["chat", "chat:", "chat:a", "chat:ab", "sys:", "sys:stats", "sys:all:x", "@user:u",
             "@user:v", "@device:u", "news", "", "a*b"]
    rights = ["join", "publish", "history", "presence"]
    asked = 0
    for _ in range(1000):
        grants = {}
        for _ in range(rng.randrange(5)):
            pattern = rng.choice(parts) + rng.choice(["", "*", "x", "x*"])
            grants[pattern] = frozenset(rng.sample(rights, rng.randrange(len(rights) + 1)))
        p = Principal(sub=rng.choice(["u", "v"]), kind=rng.choice(["user", "device", "service"]),
                      rooms=grants, admin=rng.random() < 0.2)
        # The same principal is asked again and again (it keeps its publish answers, at most
        # 64 rooms of them), about more rooms than it keeps.
        for _ in range(rng.choice([1, 3, 150])):
            room = rng.choice(parts) + rng.choice(["", "x", "y", "*", str(rng.randrange(80))])
            right = rng.choice(rights)
            assert p.can(right, room) == _can_reference(p, right, room), (p, right, room)
            asked += 1
    assert asked > 30_000
