"""Issue 15, points 3 and 4: a refused token says why in the node's log; ``rtnode token``
never creates a secret silently; device tokens last, can be revoked by id, and the device SDK
ends cleanly when its token expires.

Real nodes (in-process ``make_node``, or ``python -m node run`` children), real WebSocket,
SSE, HTTP and MQTT clients, the real ``rtnode token`` command.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt
import jwt
import pytest

import node as node_package
from devices.sdk import ClientError, Device
from node.protocol.tokens import mint_token
from tests.servers import NatsProcess, NodeProcess
from tests.wsclient import SECRET, RawClient, token, ws_url

pytestmark = pytest.mark.integration

REPO = Path(node_package.__file__).resolve().parent.parent


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "node.tokens" and r.levelno == logging.INFO
            and r.getMessage().startswith("x token refused")]


async def ws_refused(node: Any, tok: str) -> dict[str, Any]:
    """Connect over WebSocket with ``tok``; the frame that answers it (a disconnect)."""
    client = await RawClient.open(ws_url(node))
    try:
        return await client.request({"type": "connect", "token": tok}, timeout=5)
    finally:
        await client.ws.close()


async def mqtt_connack(node: Any, dev: str, tok: str) -> int:
    """The CONNACK code of an MQTT CONNECT as device ``dev`` with password ``tok``."""
    try:
        async with aiomqtt.Client("127.0.0.1", node.mqtt.port, identifier=dev, username=dev,
                                  password=tok, timeout=5):
            return 0
    except aiomqtt.MqttCodeError as exc:
        return int(getattr(exc.rc, "value", exc.rc))


def raw_token(claims: dict[str, Any], key: str = SECRET) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


async def test_each_refusal_says_why_in_the_log(make_node, caplog) -> None:
    caplog.set_level(logging.INFO, logger="node.tokens")
    node = await make_node()
    now = int(time.time())
    cases: list[tuple[str, str, int, str]] = [
        # (what, token, wire code, what the log line says)
        ("bad signature", mint_token("another-secret-" * 4, sub="alice"), 4001,
         "bad signature: signed with another key"),
        ("expired", token("alice", ttl_s=-3 * 3600 - 30), 4010, "expired 3 h 0 min ago"),
        ("not yet valid", raw_token({"sub": "alice", "nbf": now + 7200}), 4001,
         "not yet valid: nbf"),
        ("malformed", "not-a-jwt", 4001, "malformed: not a JWT"),
        ("missing claim", raw_token({"tenant": "default", "exp": now + 60}), 4001,
         "missing claim sub"),
        ("invalid tenant", raw_token({"sub": "alice", "tenant": "a.b"}), 4001,
         "invalid claim tenant"),
        ("invalid kind", raw_token({"sub": "alice", "kind": "robot"}), 4001,
         "invalid claim kind"),
        ("exp as a string", raw_token({"sub": "alice", "exp": str(now + 60)}), 4001,
         "invalid claim exp: a str"),
    ]
    for what, tok, code, why in cases:
        caplog.clear()
        reply = await ws_refused(node, tok)
        assert reply["type"] == "disconnect" and reply["code"] == code, (what, reply)
        lines = refusals(caplog)
        assert len(lines) == 1 and why in lines[0], (what, lines)
        assert lines[0].startswith("x token refused (ws "), lines[0]
        assert tok not in lines[0] and tok.split(".")[-1] not in lines[0], "token echoed"

    # MQTT CONNECT: the wire keeps CONNACK 5; the log tells a user token from a device's.
    caplog.clear()
    assert await mqtt_connack(node, "thermo-1", token("thermo-1")) in (5, 135)
    assert await mqtt_connack(node, "thermo-1", token("thermo-2", kind="device")) in (5, 135)
    assert await mqtt_connack(node, "thermo-1", token("thermo-1", kind="device",
                                                      ttl_s=-90)) in (5, 135)
    lines = refusals(caplog)
    assert len(lines) == 3, lines
    assert "(mqtt thermo-1): wrong kind: a user token" in lines[0]
    assert "(mqtt thermo-1): the token is for device thermo-2" in lines[1]
    assert "(mqtt thermo-1): expired 1 min 30 s ago" in lines[2] and "device thermo-1" in lines[2]

    # SSE and the HTTP API: their status codes as before, the reason in the log.
    caplog.clear()
    base = f"http://127.0.0.1:{node.http.port}"
    bad = mint_token("another-secret-" * 4, sub="alice")
    for url, headers, status in (
        (f"{base}/sse?room=chat:x&token={bad}", {}, 401),
        (f"{base}/api/history?room=chat:x", {"Authorization": f"Bearer {token('backend')}"},
         403),
    ):
        request = urllib.request.Request(url, headers=headers, data=None)
        with pytest.raises(urllib.error.HTTPError) as info:
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
        assert info.value.code == status, url
    lines = refusals(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("x token refused (sse): bad signature"), lines[0]
    assert lines[1].startswith("x token refused (api): wrong kind: a user token"), lines[1]


def test_refusal_lines_are_rate_limited(caplog) -> None:
    from node.protocol.tokens import TokenRefusalLog

    caplog.set_level(logging.INFO, logger="node.tokens")
    log = TokenRefusalLog(logging.getLogger("node.tokens"))
    for i in range(50):
        log.refused("expired" if i % 2 else "bad_signature", "why", "ws c1", now=100.0 + i / 10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == TokenRefusalLog.lines_per_window == 20
    log.refused("malformed", "why", "ws c1", now=111.0)  # the next window
    lines = [r.getMessage() for r in caplog.records]
    assert lines[20] == "x 30 more token refusals not logged in 10 s (bad_signature 15, expired 15)"
    assert lines[21] == "x token refused (ws c1): why" and len(lines) == 22
    assert log.counts == {"expired": 25, "bad_signature": 25, "malformed": 1}


def rtnode(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTNODE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "node", "token", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


async def test_rtnode_token_never_creates_a_secret_silently(shared_nats: NatsProcess,
                                                           tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTNODE_")}
    env["PYTHONPATH"] = str(REPO)
    node_dir = tmp_path / "project" / "rtnode-data"
    proc = NodeProcess(node_dir, "--nats-url", shared_nats.url, name="tok", env=env).start()
    try:
        await asyncio.to_thread(proc.wait_ready, 20)
        assert (node_dir / "jwt-secret").exists()
        assert f"no token secret in {node_dir}: created {node_dir / 'jwt-secret'}" in proc.log()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()

        # From another folder: refused in one line saying where it looked; nothing created.
        out = rtnode(elsewhere, "--sub", "alice", "--room", "chat:*=join")
        assert out.returncode == 2 and out.stdout == ""
        [line] = out.stderr.splitlines()
        assert f"no token secret at {elsewhere / 'rtnode-data' / 'jwt-secret'}" in line
        assert "--data-dir" in line and "RTNODE_JWT_SECRET" in line
        assert not (elsewhere / "rtnode-data").exists()

        # Pointed at the node's data dir: the node accepts the token.
        out = rtnode(elsewhere, "--sub", "alice", "--data-dir", str(node_dir))
        assert out.returncode == 0, out.stderr
        client = await RawClient.connected(proc.ws_url, out.stdout.strip())
        await client.ws.close()

        # --create-secret: created and said on stderr; the node refuses its tokens and says
        # why in its log.
        out = rtnode(elsewhere, "--sub", "alice", "--create-secret")
        assert out.returncode == 0
        assert f"created a new token secret in {elsewhere / 'rtnode-data' / 'jwt-secret'}" \
            in out.stderr
        reply = await ws_refused_url(proc.ws_url, out.stdout.strip())
        assert reply["code"] == 4001
        deadline = time.monotonic() + 5
        while "bad signature: signed with another key" not in proc.log():
            assert time.monotonic() < deadline, proc.log()
            await asyncio.sleep(0.05)
        assert out.stdout.strip() not in proc.log()
    finally:
        proc.stop()


async def ws_refused_url(url: str, tok: str) -> dict[str, Any]:
    client = await RawClient.open(url)
    try:
        return await client.request({"type": "connect", "token": tok}, timeout=5)
    finally:
        await client.ws.close()


def test_simulate_never_creates_a_secret_either(tmp_path: Path) -> None:
    """`rtnode devices simulate` signs device tokens like `rtnode token`: from another folder
    it says where it looked, instead of signing with a new secret the node would refuse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTNODE_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "node", "devices", "simulate", "--count", "1",
                           "--room", "sensors:lab"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.startswith("rtnode: no token secret at ") and len(
        done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "rtnode-data").exists(), "nothing created"


def test_device_tokens_default_to_a_year_and_say_so(tmp_path: Path) -> None:
    (tmp_path / "rtnode-data").mkdir()
    (tmp_path / "rtnode-data" / "jwt-secret").write_text(SECRET)
    out = rtnode(tmp_path, "--sub", "thermo-1", "--kind", "device")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 365 * 86400 and claims["jti"]
    assert "valid 365 days (the device default; --ttl to change)" in out.stderr
    assert f"rtnode token --revoke {claims['jti']}" in out.stderr
    user = jwt.decode(rtnode(tmp_path, "--sub", "alice").stdout.strip(), SECRET,
                      algorithms=["HS256"])
    assert user["exp"] - user["iat"] == 3600
    short = rtnode(tmp_path, "--sub", "thermo-1", "--kind", "device", "--ttl", "12h")
    assert jwt.decode(short.stdout.strip(), SECRET, algorithms=["HS256"])["exp"] \
        - claims["iat"] in range(12 * 3600, 12 * 3600 + 5)
    assert "never" not in short.stderr
    # No expiry: only where the node takes tokens without exp, never in production mode.
    never = rtnode(tmp_path, "--sub", "thermo-1", "--kind", "device", "--ttl", "never")
    assert never.returncode == 0 and "never expires" in never.stderr
    refused = rtnode(tmp_path, "--sub", "thermo-1", "--kind", "device", "--ttl", "never",
                     "--production")
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1 and "refuses tokens without exp" in refused.stderr
    bad = rtnode(tmp_path, "--sub", "thermo-1", "--ttl", "soon")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


async def test_a_revoked_device_token_is_refused_at_mqtt_and_websocket(make_node, caplog,
                                                                       tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="node.tokens")
    node = await make_node()
    data_dir = node.settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "jwt-secret").write_text(SECRET)  # the CLI signs as this node does
    out = rtnode(tmp_path, "--sub", "thermo-7", "--kind", "device", "--room", "sensors:*=publish",
                 "--data-dir", str(data_dir))
    assert out.returncode == 0, out.stderr
    tok = out.stdout.strip()
    jti = jwt.decode(tok, SECRET, algorithms=["HS256"])["jti"]
    assert await mqtt_connack(node, "thermo-7", tok) == 0
    client = await RawClient.connected(ws_url(node), tok)
    await client.ws.close()

    revoked = rtnode(tmp_path, "--revoke", jti, "--data-dir", str(data_dir))
    assert revoked.returncode == 0, revoked.stderr
    assert f"token {jti} revoked in {data_dir / 'revoked-tokens'}" in revoked.stderr
    again = rtnode(tmp_path, "--revoke", tok, "--data-dir", str(data_dir))  # the whole token
    assert again.returncode == 0 and f"token {jti} was already revoked" in again.stderr
    nowhere = rtnode(tmp_path, "--revoke", jti)  # no data dir here: refused, nothing written
    assert nowhere.returncode == 2 and "no data dir at" in nowhere.stderr
    assert not (tmp_path / "rtnode-data").exists()
    # The node reads the list again when it changes (a stat at most once a second).
    deadline = time.monotonic() + 5
    while (code := await mqtt_connack(node, "thermo-7", tok)) == 0:
        assert time.monotonic() < deadline, "the revoked token was still accepted"
        await asyncio.sleep(0.1)
    assert code in (5, 135)
    reply = await ws_refused(node, tok)
    assert reply["type"] == "disconnect" and reply["code"] == 4001
    lines = [line for line in refusals(caplog) if "revoked" in line]
    assert lines[0].startswith("x token refused (mqtt thermo-7): revoked: jti " + jti), lines
    assert lines[-1].startswith("x token refused (ws "), lines
    # Another device token of the same device is not affected.
    assert await mqtt_connack(node, "thermo-7", token("thermo-7", kind="device")) == 0


async def test_device_sdk_without_provider_ends_cleanly_when_its_token_expires(
        make_node, caplog) -> None:
    caplog.set_level(logging.INFO)
    node = await make_node()
    port = node.mqtt.port

    # A token that expires while connected: a disconnect 4010, then the device ends.
    dev = Device("127.0.0.1", port, "exp-1", token=token("exp-1", kind="device", ttl_s=2),
                 min_backoff_s=0.05, max_backoff_s=0.2)
    async with dev:
        await dev.wait_connected(5)
        with pytest.raises(ClientError) as info:
            async with asyncio.timeout(10):
                await dev.wait_closed()
        assert info.value.code == 4010 and "no token_provider" in info.value.reason
        with pytest.raises(ClientError) as info:
            await dev.publish("sensors:lab", "reading", {"t": 1})
        assert info.value.code == 4010
        refused_before = sum(node.tokens.refusals.counts.values())
        # No retry loop: the device makes no further connection attempt.
        await asyncio.sleep(1.0)
        assert sum(node.tokens.refusals.counts.values()) == refused_before
    assert any("token valid until" in r.getMessage() and "exp-1" in r.getMessage()
               for r in caplog.records if r.name == "rtnode.device")

    # A token already expired at start: it ends at once with 4010 (not a bare CONNACK 5),
    # without connecting at all.
    refused_before = sum(node.tokens.refusals.counts.values())
    dev = Device("127.0.0.1", port, "exp-2", token=token("exp-2", kind="device", ttl_s=-60),
                 min_backoff_s=0.05, max_backoff_s=0.2)
    async with dev:
        with pytest.raises(ClientError) as info:
            async with asyncio.timeout(5):
                await dev.wait_connected()
        assert info.value.code == 4010 and "expired 1 min" in info.value.reason
        with pytest.raises(ClientError):
            async with asyncio.timeout(5):
                async for _ in dev.events():
                    pass
    assert sum(node.tokens.refusals.counts.values()) == refused_before

    # A token refused for another reason: 4001, pointing at the node's log.
    dev = Device("127.0.0.1", port, "exp-3", token=token("exp-3"), min_backoff_s=0.05)
    async with dev:
        with pytest.raises(ClientError) as info:
            async with asyncio.timeout(5):
                await dev.wait_closed()
        assert info.value.code == 4001 and "the node's log says why" in info.value.reason

    gc.collect()
    await asyncio.sleep(0.05)
    noise = [r.getMessage() for r in caplog.records
             if r.name == "asyncio" or "never retrieved" in r.getMessage()]
    assert noise == []


def test_revocation_list_file_format(tmp_path: Path) -> None:
    from node.protocol.tokens import TokenVerifier, read_revoked, revoke_token

    path, added = revoke_token(tmp_path, "abc123", note="lost")
    assert added and revoke_token(tmp_path, "abc123") == (path, False)
    path.write_text(path.read_text() + "\n# a comment\n  def456  \n")
    assert read_revoked(path) == {"abc123", "def456"}
    verifier = TokenVerifier(secret=SECRET, revoked_file=path)
    with pytest.raises(Exception) as info:
        verifier.verify(mint_token(SECRET, sub="d", kind="device", jti="def456"))
    assert getattr(info.value, "code", None) == 4001 and "revoked" in str(info.value)
    assert verifier.verify(mint_token(SECRET, sub="d", kind="device", jti="zzz")).sub == "d"
    assert json.dumps(sorted(read_revoked(path)))
