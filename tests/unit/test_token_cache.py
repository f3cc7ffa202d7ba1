"""The verifier remembers verified tokens (bounded), and still checks expiry and revocation."""

from __future__ import annotations

import random
import time
from pathlib import Path

import jwt
import pytest

from node.protocol.tokens import TokenRefused, TokenVerifier, mint_token

SECRET = "cache-secret-0123456789-0123456789-0123456789"


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = jwt.decode

    def counting(*args: object, **kw: object) -> object:
        calls[0] += 1
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_a_token_presented_again_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    v = TokenVerifier(secret=SECRET)
    calls = _count_decodes(monkeypatch)
    tok = mint_token(SECRET, sub="alice")
    first, second = v.verify(tok), v.verify(tok)
    assert calls[0] == 1
    assert second is first and first.sub == "alice"


def test_a_remembered_token_still_expires() -> None:
    v = TokenVerifier(secret=SECRET)
    now = time.time()
    tok = mint_token(SECRET, sub="alice", ttl_s=60, now=now)
    v.verify(tok, now=now)
    with pytest.raises(TokenRefused) as exc:
        v.verify(tok, now=now + 61)
    assert exc.value.expired


def test_a_remembered_token_can_be_revoked(tmp_path: Path) -> None:
    revoked = tmp_path / "revoked-tokens"
    v = TokenVerifier(secret=SECRET, revoked_file=revoked)
    v.revoked_check_s = 0.0
    tok = mint_token(SECRET, sub="alice", jti="j-1")
    v.verify(tok)
    revoked.write_text("j-1\n")
    with pytest.raises(TokenRefused, match="revoked"):
        v.verify(tok)


def test_a_refusal_is_not_remembered_and_a_forgery_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    v = TokenVerifier(secret=SECRET)
    good = mint_token(SECRET, sub="alice")
    v.verify(good)
    forged = mint_token("another-secret-0123456789-0123456789-0123", sub="alice")
    calls = _count_decodes(monkeypatch)
    for _ in range(2):
        with pytest.raises(TokenRefused):
            v.verify(forged)
    assert calls[0] == 2
    head, body, sig = good.split(".")
    with pytest.raises(TokenRefused):  # same header and claims, another signature
        v.verify(f"{head}.{body}.{sig[:-2]}AA")


def test_the_cache_is_bounded() -> None:
    v = TokenVerifier(secret=SECRET)
    v.verified_cache_size = 8
    toks = [mint_token(SECRET, sub=f"u{i}") for i in range(20)]
    for tok in toks:
        v.verify(tok)
    assert len(v._verified) == 8
    assert v.verify(toks[0]).sub == "u0"  # evicted: verified again


def _b64(data: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: dict[str, object], claims: object, key: str = SECRET, alg: str = "sha256",
            raw_body: str | None = None) -> str:
    import hashlib
    import hmac
    import json
    head = _b64(json.dumps(header).encode())
    body = raw_body if raw_body is not None else _b64(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{head}.{body}".encode(), getattr(hashlib, alg)).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _outcome(v: TokenVerifier, tok: str) -> tuple[object, ...]:
    try:
        p = v.verify(tok)
    except TokenRefused as exc:
        return ("refused", exc.code, exc.reason, exc.category)
    return ("ok", p)


def test_the_fast_hs256_path_decides_as_pyjwt() -> None:
    now = int(time.time())
    good = {"sub": "alice", "rooms": {"*": ["join"]}, "iat": now, "exp": now + 60}
    good_tok = mint_token(SECRET, sub="alice", rooms={"*": ["join"]})
    head, body, sig = good_tok.split(".")
    cases = [
        good_tok,
        _signed({"alg": "HS256", "typ": "JWT"}, good),
        _signed({"alg": "HS256"}, {**good, "exp": now - 5}),  # expired
        _signed({"alg": "HS256"}, good, key="another-secret-0123456789-0123456789-01"),
        _signed({"alg": "HS512"}, good, alg="sha512"),
        _signed({"alg": "none"}, good),
        _signed({"alg": "HS256", "kid": 7}, good),
        _signed({"alg": "HS256", "crit": ["b64"], "b64": False}, good),
        _signed({"alg": "HS256"}, [1, 2]),
        _signed({"alg": "HS256"}, {**good, "sub": 5}),
        _signed({"alg": "HS256"}, {**good, "jti": 5}),
        _signed({"alg": "HS256"}, {k: v for k, v in good.items() if k != "sub"}),
        _signed({"alg": "HS256"}, None, raw_body=body + "="),  # padded
        f"{head}.{body}.{sig}=",
        f"{head}.{body}.{sig[:-1]}{chr(ord(sig[-1]) ^ 1)}",  # spare bits: not canonical
        f"{head}.{body}.{sig.replace('-', '+').replace('_', '/')}",  # the standard alphabet
        f"{head}.{body}.{sig[:10]}\n{sig[10:]}",
        f"{head}.{body[:-1]}{'B' if body[-1] != 'B' else 'C'}.{sig}",  # tampered claims
        f"{head}.{body}",
        f"{head}.{body}.{sig}.x",
        "not a token",
    ]
    fast, slow = TokenVerifier(secret=SECRET), TokenVerifier(secret=SECRET)
    fast.verify(good_tok)  # PyJWT accepted the key once: the fast path is on
    slow._fast_key = None
    fast.verified_cache_size = slow.verified_cache_size = 0
    for tok in cases:
        assert _outcome(fast, tok) == _outcome(slow, tok), tok
    assert fast._fast_ok and _outcome(fast, cases[1])[0] == "ok"


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([0, -1, 2**31, 2**63 - 1, -2**63, 2**63, 2**64 + 1, -2**70, 10**25])
    if kind == 1:
        return rng.choice([0.5, -1e300, 1e-300, 3.0, 1e22])
    if kind == 2:
        chars = "aZ9 _-\\\"\u00e9\u4e2d\U0001f600\n"
        return "".join(rng.choice(chars) for _ in range(rng.randrange(6)))
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return rng.randrange(-10**6, 10**6)
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}


# Raw JSON bodies json and orjson might read apart: each must get the same answer either way.
_ODD_BODIES = [
    '{"sub":"a","sub":"admin"}', '{"sub":"a","exp":NaN}', '{"sub":"a","n":Infinity}',
    '{"sub":"\\ud800"}', '{"sub":"a","big":123456789012345678901234567890}',
    '{"sub":"a","exp":99999999999999999999}', '{"sub":"a","x":1e400}', ' {"sub":"a"} ',
    '{"sub":"a"}x', '{"sub":"a",}', '{"sub":"\u00e9"}',
    '{"sub":"a","d":' + "[" * 600 + "]" * 600 + "}",
]


@pytest.mark.parametrize("seed", range(6))
def test_the_fast_path_reads_claims_as_pyjwt_does_seeded(seed: int) -> None:
    """Random claims (integers past 64 bits, floats, any text, nesting) and raw bodies the two
    JSON readers might read apart: the fast path (orjson) and PyJWT (json) give the same answer,
    the same principal or the same refusal."""
    rng = random.Random(seed)
    now = int(time.time())
    fast, slow = TokenVerifier(secret=SECRET), TokenVerifier(secret=SECRET)
    fast.verify(mint_token(SECRET, sub="alice"))
    slow._fast_key = None
    fast.verified_cache_size = slow.verified_cache_size = 0
    cases = [_signed({"alg": "HS256"}, None, raw_body=_b64(body.encode("utf-8", "surrogatepass")))
             for body in _ODD_BODIES]
    for _ in range(40):
        claims: dict[str, object] = {"sub": rng.choice(["alice", "b\u00f6b", "svc-1"]),
                                     "iat": now, "exp": now + rng.choice([60, 3600])}
        for i in range(rng.randrange(5)):
            claims[rng.choice(["info", "meta", "rooms", f"c{i}", "jti", "nbf"])] = (
                _random_value(rng))
        cases.append(_signed({"alg": "HS256", "typ": "JWT"}, claims))
    for tok in cases:
        assert _outcome(fast, tok) == _outcome(slow, tok), tok
    assert any(_outcome(fast, tok)[0] == "ok" for tok in cases)


def test_the_fast_path_runs_without_pyjwt_for_a_plain_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    v = TokenVerifier(secret=SECRET)
    v.verify(mint_token(SECRET, sub="first"))
    calls = _count_decodes(monkeypatch)
    assert v.verify(mint_token(SECRET, sub="second")).sub == "second"
    assert calls[0] == 0


def test_principals_share_their_sets_of_rights() -> None:
    v = TokenVerifier(secret=SECRET)
    a = v.verify(mint_token(SECRET, sub="a", rooms={"chat:*": ["join", "publish"]}))
    b = v.verify(mint_token(SECRET, sub="b", rooms={"x": ["publish", "join"]}))
    assert a.rooms["chat:*"] is b.rooms["x"]


def test_equal_grants_share_one_map_and_unequal_ones_do_not() -> None:
    # Principals outlive their connect: equal grant maps are one object (memory per
    # connection), and sharing never mixes two different grants.
    v = TokenVerifier(secret=SECRET)
    grants = {"chat:*": ["join", "publish"], "news:*": ["join"]}
    a = v.verify(mint_token(SECRET, sub="a", rooms=grants))
    b = v.verify(mint_token(SECRET, sub="b", rooms=dict(grants), tenant="acme"))
    c = v.verify(mint_token(SECRET, sub="c", rooms={"chat:*": ["join"], "news:*": ["join"]}))
    assert a.rooms is b.rooms and a.rooms is not c.rooms
    assert a.can("publish", "chat:x") and b.can("publish", "chat:x")
    assert not c.can("publish", "chat:x") and c.can("join", "chat:x")
    assert a.tenant == "default" and b.tenant == "acme"


def test_the_table_of_shared_grant_maps_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.protocol import tokens

    monkeypatch.setattr(tokens, "_ROOM_MAPS", {})
    monkeypatch.setattr(tokens, "_ROOM_MAPS_MAX", 8)
    v = TokenVerifier(secret=SECRET)
    for i in range(20):
        p = v.verify(mint_token(SECRET, sub=f"u{i}", rooms={f"r{i}:*": ["join"]}))
        assert p.can("join", f"r{i}:x") and not p.can("join", f"r{i + 1}:x")
    assert len(tokens._ROOM_MAPS) == 8
