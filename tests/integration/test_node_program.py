"""The node as a program: zero-config start, embedded NATS, signals, external NATS, readiness."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from node.nats_server import free_port
from node.protocol.subjects import STREAM_NAME
from tests.servers import NatsProcess, NodeProcess, children_of, http_get, pid_alive, wait_until

pytestmark = pytest.mark.integration


def _stream_created(url: str, data_dir: Path) -> str:
    """The stream's creation time, read through the node's embedded NATS with its credentials."""
    from bridge.nats_auth import read_connection_file

    endpoint = read_connection_file(data_dir)
    assert endpoint is not None and endpoint.url == url

    async def read() -> str:
        nc = await nats.connect(url, **endpoint.auth.connect_options())
        try:
            info = await nc.jetstream().stream_info(STREAM_NAME)
            return str(info.created)
        finally:
            await nc.close()

    return asyncio.run(read())


def test_embedded_start_stop_and_reuse(tmp_path: Path) -> None:
    data = tmp_path / "data"
    nats_port = free_port()
    created = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        node = NodeProcess(data, "--nats-port", str(nats_port)).start()
        try:
            node.wait_ready(15)
            kids = children_of(node.proc.pid)
            assert len(kids) == 1, "exactly one child: the embedded nats-server"
            created.append(_stream_created(f"nats://127.0.0.1:{nats_port}", data))
            status, body = http_get(node.base + "/metrics")
            assert status == 200 and b"rtnode_nats_connected 1.0" in body
            assert http_get(node.base + "/healthz")[0] == 200
            node.signal(sig)
            assert node.wait(20) == 0, node.log()
            wait_until(lambda kids=kids: not any(pid_alive(k) for k in kids), 10,
                       what="child gone")
        finally:
            node.stop()
        assert "ready" in node.log()
    secret = data / "jwt-secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert created[0] == created[1], "the second start reuses the stream"


def test_node_killed_leaves_no_orphan(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data").start()
    try:
        node.wait_ready(15)
        kids = children_of(node.proc.pid)
        assert kids
        node.proc.kill()
        node.proc.wait(10)
        wait_until(lambda: not any(pid_alive(k) for k in kids), 10, what="orphan to exit")
    finally:
        node.stop()


def test_external_nats_readiness_follows_server(tmp_path: Path, nats_proc: NatsProcess) -> None:
    node = NodeProcess(tmp_path / "data", "--nats-url", nats_proc.url).start()
    try:
        node.wait_ready(15)
        assert children_of(node.proc.pid) == [], "no embedded server with --nats-url"
        nats_proc.kill()
        wait_until(lambda: node.readyz()[0] == 503, 15, what="/readyz 503")
        _, body = node.readyz()
        assert "NATS" in str(body.get("reason")) or "JetStream" in str(body.get("reason"))
        nats_proc.start()
        node.wait_ready(20)
        assert node.proc.poll() is None, "the node kept running"
    finally:
        node.stop()


def test_external_nats_retried_at_start(tmp_path: Path) -> None:
    server = NatsProcess(tmp_path / "nats")
    node = NodeProcess(tmp_path / "data", "--nats-url", server.url).start()
    try:
        wait_until(lambda: "NATS not reachable" in node.log(), 15, what="a retry")
        server.start()
        node.wait_ready(20)
    finally:
        node.stop()
        server.stop()


def _rtnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_bad_settings_stop_with_one_line(tmp_path: Path) -> None:
    r = _rtnode("run", "--http-port", "notaport", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "http_port" in r.stderr and "RTNODE_HTTP_PORT" in r.stderr

    r = _rtnode("run", "--data-dir", str(tmp_path), env={"RTNODE_NO_SUCH": "1"})
    assert r.returncode == 2 and "RTNODE_NO_SUCH" in r.stderr and "Traceback" not in r.stderr

    cfg = tmp_path / "c.toml"
    cfg.write_text("http_port = 1\nbogus = 2\n")
    r = _rtnode("run", "--config", str(cfg), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "bogus" in r.stderr and "Traceback" not in r.stderr

    cfg.write_text("[namespaces.chat]\nhistory_size = -3\n")
    r = _rtnode("run", "--config", str(cfg), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "namespaces" in r.stderr and "Traceback" not in r.stderr


def test_help_is_complete() -> None:
    r = _rtnode("--help")
    assert r.returncode == 0 and "run" in r.stdout and "token" in r.stdout
    r = _rtnode("run", "--help")
    for flag in ("--http-port", "--nats-url", "--data-dir", "--max-frame-bytes",
                 "RTNODE_RATE_PER_S"):
        assert flag in r.stdout
    r = _rtnode("token", "--help")
    assert "--sub" in r.stdout and "--room" in r.stdout and "--ttl" in r.stdout


def test_token_command_signs_with_the_data_dir_secret(tmp_path: Path) -> None:
    from node.protocol.tokens import TokenVerifier, load_or_create_secret

    secret = load_or_create_secret(tmp_path)  # as the node does at its first start
    r = _rtnode("token", "--sub", "alice", "--room", "chat:*=join,publish", "--rpc", "server",
                "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    verifier = TokenVerifier(secret=secret)
    p = verifier.verify(r.stdout.strip())
    assert p.sub == "alice" and p.can("publish", "chat:x") and not p.can("history", "chat:x")
    assert p.can_call("server")
    r = _rtnode("token", "--sub", "a", "--room", "chat:*=fly", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "fly" in r.stderr
