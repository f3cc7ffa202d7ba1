"""An external NATS with credentials: user and password, a token, an NKey, TLS.

The node and the command-line tools pass what the settings give to nats-py; a server that refuses
them, or a certificate that does not verify, stops a node at once with one line (not after
``nats_connect_timeout_s`` of retries); a missing or unreadable file is one line too.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from node.nats_server import free_port
from tests.integration.test_nats_auth import chat, rtnode
from tests.servers import MS, NatsProcess, NodeProcess
from tests.wsclient import unique

pytestmark = pytest.mark.integration


@pytest.fixture
def locked_nats(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A nats-server requiring the user/password, token or NKey given by the test's param;
    yields (the node's settings for it, wrong settings, the server)."""
    kind = request.param
    wrong: dict[str, Any]
    if kind == "password":
        args = ["--user", "svc", "--pass", "p-" + "7" * 30]
        good: dict[str, Any] = {"nats_user": "svc", "nats_password": "p-" + "7" * 30}
        wrong = {"nats_user": "svc", "nats_password": "p-" + "1" * 30}
    elif kind == "token":
        args = ["--auth", "t-" + "3" * 30]
        good, wrong = {"nats_token": "t-" + "3" * 30}, {"nats_token": "t-" + "2" * 30}
    else:
        good_seed, good_public = _nkey(tmp_path / "good.nk")
        wrong_seed, _ = _nkey(tmp_path / "wrong.nk")
        conf = tmp_path / "nkey.conf"
        conf.write_text(f'authorization {{ users = [ {{ nkey: "{good_public}" }} ] }}\n')
        args = ["-c", str(conf)]
        good, wrong = {"nats_nkey_seed": good_seed}, {"nats_nkey_seed": wrong_seed}
    server = NatsProcess(tmp_path / "locked", args=args).start()
    yield good, wrong, server
    server.stop()


def _nkey(path: Path) -> tuple[Path, str]:
    """A new user NKey: its seed written to ``path`` (0600), and its public key."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


def _flags(settings: dict[str, Any]) -> list[str]:
    return [arg for name, value in settings.items()
            for arg in ("--" + name.replace("_", "-"), str(value))]


def assert_refused_at_once(tmp_path: Path, url: str, flags: list[str], text: str) -> None:
    """A node started with ``flags`` exits 1 at once with one line containing ``text``."""
    name = f"refused{len(list(tmp_path.glob('refused*')))}"
    proc = NodeProcess(tmp_path / name, "--nats-url", url, *flags, name=name).start()
    started = time.monotonic()
    try:
        rc = proc.wait(30 * MS * 1000)
    finally:
        proc.stop()
    log = proc.log()
    assert rc == 1, log
    # Retrying would take nats_connect_timeout_s (60 s); a refusal ends the start at once.
    assert time.monotonic() - started < 30 * MS * 1000
    lines = [ln for ln in log.splitlines() if ln.startswith("rtnode:")]
    assert len(lines) == 1 and text in lines[0], log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("locked_nats", ["password", "token", "nkey"], indirect=True)
async def test_external_nats_with_credentials(locked_nats: Any, make_node: Any,
                                              tmp_path: Path) -> None:
    good, wrong, server = locked_nats
    # Without them, or with wrong ones, a node stops at once with one line (no 60 s of retries).
    for flags in ([], _flags(wrong)):
        assert_refused_at_once(tmp_path, server.url, flags, "authorization violation")
    node = await make_node(nats_url=server.url, **good)
    room = unique("chat")
    client, seqs = await chat(node, room)
    await client.close()
    # The command line, with the same settings as flags.
    rc, lines, err = await rtnode("replay", room, "--json", "--nats-url", server.url,
                                  "--data-dir", str(tmp_path / "x"), *_flags(good))
    assert rc == 0, err
    assert [json.loads(line)["seq"] for line in lines] == seqs


# -- TLS ----------------------------------------------------------------------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: x509.Name | None, key: Any, signer: Any,
              ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca_cert = build("rtnode test CA", None, ca_key, ca_key, True)
    server_cert = build("127.0.0.1", ca_cert.subject, server_key, ca_key, False)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


async def test_external_nats_over_tls(make_node: Any, tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path)
    creds = {"nats_user": "svc", "nats_password": "p-" + "5" * 30}
    server = NatsProcess(tmp_path / "tls", args=[
        "--tls", "--tlscert", str(cert), "--tlskey", str(key),
        "--user", "svc", "--pass", creds["nats_password"]]).start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        # Without the CA the server's certificate does not verify: one line, at once.
        assert_refused_at_once(tmp_path, url, _flags(creds), "does not verify")
        node = await make_node(nats_url=url, nats_tls_ca=ca, **creds)
        room = unique("chat")
        client, seqs = await chat(node, room)
        await client.close()
        rc, lines, err = await rtnode("replay", room, "--json", "--nats-url", url,
                                      "--nats-tls-ca", str(ca), "--data-dir",
                                      str(tmp_path / "x"), *_flags(creds))
        assert rc == 0, err
        assert [json.loads(line)["seq"] for line in lines] == seqs
    finally:
        server.stop()


# -- settings that cannot work ------------------------------------------------------------------


async def test_bad_credential_settings_are_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.nk")
    empty = tmp_path / "empty.creds"
    empty.write_text("")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    url = f"nats://127.0.0.1:{free_port()}"
    cases = [
        (["--nats-nkey-seed", missing], "nats_nkey_seed"),
        (["--nats-creds", str(empty)], "nats_creds"),
        (["--nats-creds", str(tmp_path)], "nats_creds"),
        (["--nats-tls-ca", missing], "nats_tls_ca"),
        (["--nats-tls-ca", str(garbage)], "TLS"),
        (["--nats-tls-cert", missing], "nats_tls_key"),
        (["--nats-user", "u"], "nats_password"),
        (["--nats-token", "t", "--nats-user", "u", "--nats-password", "p"], "not several"),
    ]
    few = asyncio.Semaphore(4)  # each is a Python start-up: a handful at a time on 2 cores

    async def run(*args: str) -> tuple[int, list[str], str]:
        async with few:
            return await rtnode(*args, timeout=60)

    # (replay takes only the NATS client's flags: not the node's start-up timeout)
    for command in (["run", "--http-port", "0", "--mqtt-port", "0",
                     "--nats-connect-timeout-s", "30"], ["replay", "chat:a"]):
        results = await asyncio.gather(*(
            run(*command, "--nats-url", url, "--data-dir", str(tmp_path / "d"), *flags)
            for flags, _ in cases))
        for (flags, text), (rc, out, err) in zip(cases, results, strict=True):
            assert rc in (1, 2) and out == [], (command, flags, err)
            assert text in err and len(err.strip().splitlines()) == 1, (command, flags, err)
            assert "Traceback" not in err, err
