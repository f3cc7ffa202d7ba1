"""Tokens and rights (PROTOCOL.md section 4), without sockets."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from node.protocol.errors import AuthError
from node.protocol.tokens import (
    Principal,
    TokenVerifier,
    load_or_create_secret,
    mint_token,
    parse_room_grant,
    pattern_matches,
)

SECRET = "s" * 40


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
                "", None, 42, mint_token(SECRET, sub="a", kind="admin"),
                mint_token(SECRET, sub="a", tenant="a.b")):
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
