"""NATS credentials from the settings, and the embedded server's credentials and connection
files (bridge/nats_auth.py): plain values and files, no server."""

from __future__ import annotations

import json
import random
import stat
from pathlib import Path

import nats.errors
import pytest

from bridge.nats_auth import (
    NatsAuth,
    cli_target,
    connect_refusal,
    load_or_create_credentials,
    read_connection_file,
    remove_connection_file,
    write_connection_file,
)
from node.protocol.errors import ConfigError
from node.protocol.settings import load_settings


def test_each_method_becomes_its_connect_options(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text("SUAFAKESEED\n")
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    cases = [
        ({}, {}),
        ({"nats_user": "u", "nats_password": "p"}, {"user": "u", "password": "p"}),
        ({"nats_token": "t"}, {"token": "t"}),
        ({"nats_nkey_seed": seed}, {"nkeys_seed": str(seed)}),
        ({"nats_creds": creds}, {"user_credentials": str(creds)}),
    ]
    for settings, options in cases:
        auth = NatsAuth.from_settings(load_settings(**settings))
        assert auth.connect_options() == options
        assert auth.configured == bool(options)
    secret = NatsAuth.from_settings(load_settings(nats_user="u", nats_password="s3cr3t"))
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in secret.method


def test_settings_that_cannot_work_are_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    empty = tmp_path / "empty"
    empty.write_text("")
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("nope\n")
    cases = [
        ({"nats_user": "u"}, "nats_password"),
        ({"nats_password": "p"}, "nats_password"),
        ({"nats_token": "t", "nats_creds": empty}, "not several"),
        ({"nats_nkey_seed": tmp_path / "missing"}, "nats_nkey_seed"),
        ({"nats_nkey_seed": empty}, "empty"),
        ({"nats_creds": folder}, "directory"),
        ({"nats_tls_ca": tmp_path / "missing"}, "nats_tls_ca"),
        ({"nats_tls_ca": bad_pem}, "TLS"),
        ({"nats_tls_key": bad_pem}, "nats_tls_cert and nats_tls_key"),
    ]
    for settings, text in cases:
        with pytest.raises(ConfigError, match=text) as info:
            NatsAuth.from_settings(load_settings(**settings))
        assert "\n" not in str(info.value)


def test_credentials_are_made_once_private_and_reused(tmp_path: Path) -> None:
    auth, path = load_or_create_credentials(tmp_path / "data")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.user == "rtnode" and len(auth.password) >= 32
    again, _ = load_or_create_credentials(tmp_path / "data")
    assert again == auth
    path.chmod(0o644)  # loosened by someone: tightened again when read
    load_or_create_credentials(tmp_path / "data")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rng = random.Random(11)
    for _ in range(20):  # damaged files: one line saying what to do, never a trace
        text = "".join(rng.choice('{}[]":,abc \n') for _ in range(rng.randint(0, 30)))
        path.write_text(text)
        try:
            load_or_create_credentials(tmp_path / "data")
        except ConfigError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)


def test_the_connection_file_leads_the_cli_to_the_node(tmp_path: Path) -> None:
    data = tmp_path / "data"
    auth, path = load_or_create_credentials(data)
    assert read_connection_file(data) is None
    written = write_connection_file(data, "nats://127.0.0.1:4999", path)
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert json.loads(written.read_text())["credentials"] == str(path.resolve())
    endpoint = read_connection_file(data)
    assert endpoint is not None and endpoint.url == "nats://127.0.0.1:4999"
    assert endpoint.auth == auth
    # Only --data-dir: the node's URL and credentials.
    servers, used = cli_target(load_settings(data_dir=data), "replay")
    assert servers == ["nats://127.0.0.1:4999"] and used == auth
    # The same URL given: still the node's credentials; another URL: none of them.
    assert cli_target(load_settings(data_dir=data, nats_url="nats://127.0.0.1:4999"),
                      "replay")[1] == auth
    assert not cli_target(load_settings(data_dir=data, nats_url="nats://elsewhere:4222"),
                          "replay")[1].configured
    # Credentials given on the command line win.
    mine = cli_target(load_settings(data_dir=data, nats_token="tok"), "consume")
    assert mine == (["nats://127.0.0.1:4999"], NatsAuth(token="tok"))
    remove_connection_file(data)
    remove_connection_file(data)  # idempotent
    with pytest.raises(ConfigError, match="replay needs --nats-url"):
        cli_target(load_settings(data_dir=data), "replay")


def test_refusals_that_retrying_cannot_fix() -> None:
    none, some = NatsAuth(), NatsAuth(user="u", password="p")
    assert "nats_user/nats_password" in connect_refusal(nats.errors.AuthorizationError(), none)
    assert "user u" in connect_refusal(nats.errors.Error("nats: 'Authorization Violation'"),
                                       some)
    assert connect_refusal(ConnectionRefusedError(), some) == ""
    assert connect_refusal(nats.errors.NoServersError(), some) == ""
