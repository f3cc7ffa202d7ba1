"""The verifier remembers verified tokens (bounded), and still checks expiry and revocation."""

from __future__ import annotations

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
