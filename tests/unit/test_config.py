"""Settings: defaults, environment names of PROTOCOL.md section 10, TOML, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.protocol.errors import ConfigError
from node.protocol.settings import load_settings

PROTOCOL_ENV = {
    "RTNODE_MAX_FRAME_BYTES": ("max_frame_bytes", "1000", 1000),
    "RTNODE_RATE_PER_S": ("rate_per_s", "5", 5),
    "RTNODE_RATE_BURST": ("rate_burst", "7", 7),
    "RTNODE_MAX_ROOMS_PER_CONNECTION": ("max_rooms_per_connection", "3", 3),
    "RTNODE_MAX_CONNECTIONS_PER_USER": ("max_connections_per_user", "2", 2),
    "RTNODE_MAX_ERRORS_PER_MIN": ("max_errors_per_min", "4", 4),
    "RTNODE_SLOW_CONSUMER_BYTES": ("slow_consumer_bytes", "999", 999),
    "RTNODE_CONNECT_TIMEOUT_S": ("connect_timeout_s", "1.5", 1.5),
    "RTNODE_HEARTBEAT_S": ("heartbeat_s", "3", 3),
    "RTNODE_HISTORY_SIZE": ("history_size", "10", 10),
    "RTNODE_HISTORY_TTL_S": ("history_ttl_s", "60", 60),
    "RTNODE_RECOVERY_MAX": ("recovery_max", "50", 50),
    "RTNODE_DEDUPE_WINDOW_S": ("dedupe_window_s", "30", 30),
    "RTNODE_PRESENCE_TTL_S": ("presence_ttl_s", "4", 4),
    "RTNODE_VOLATILE_EVENTS": ("volatile_events", "a:b,c:d", ["a:b", "c:d"]),
    "RTNODE_VOLATILE_THROTTLE_MS": ("volatile_throttle_ms", "100", 100),
    "RTNODE_ALLOWED_ORIGINS": ("allowed_origins", "https://a.example", ["https://a.example"]),
    "RTNODE_API_KEY": ("api_key", "k", "k"),
}


def test_defaults_need_nothing() -> None:
    s = load_settings()
    assert s.http_port == 8080 and s.mqtt_port == 1883 and s.embedded_nats
    assert s.max_frame_bytes == 65536 and s.rate_per_s == 50 and s.rate_burst == 100
    assert s.volatile_events == ["user:typing"] and s.allowed_origins == []
    assert s.recovery_max == 10000 and s.dedupe_window_s == 120


@pytest.mark.parametrize("env", sorted(PROTOCOL_ENV))
def test_protocol_environment_names(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, raw, expected = PROTOCOL_ENV[env]
    monkeypatch.setenv(env, raw)
    assert getattr(load_settings(), name) == expected


def test_precedence_flag_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "rt.toml"
    cfg.write_text('http_port = 1111\nmqtt_port = 2222\nnats_url = "nats://a:1,nats://b:2"\n'
                   "[namespaces.chat]\nhistory_size = 5\nrecovery_max = 3\n")
    monkeypatch.setenv("RTNODE_MQTT_PORT", "3333")
    s = load_settings(cfg, host="0.0.0.0")
    assert (s.http_port, s.mqtt_port, s.host) == (1111, 3333, "0.0.0.0")
    assert s.nats_url == ["nats://a:1", "nats://b:2"] and not s.embedded_nats
    p = s.room_policy("chat:lobby")
    assert (p.history_size, p.recovery_max, p.max_payload_bytes) == (5, 3, 65536)
    assert s.room_policy("other:x").history_size == 10000
    assert load_settings(cfg, http_port="4444").http_port == 4444


@pytest.mark.parametrize(
    ("kwargs", "env", "needle"),
    [
        ({"http_port": "x"}, {}, "http_port"),
        ({"http_port": "70000"}, {}, "http_port"),
        ({}, {"RTNODE_RATE_PER_S": "-1"}, "RTNODE_RATE_PER_S"),
        ({}, {"RTNODE_TYPO": "1"}, "RTNODE_TYPO"),
        ({"node_name": "a b"}, {}, "node_name"),
    ],
)
def test_errors_name_the_setting(
    kwargs: dict[str, str], env: dict[str, str], needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("http_port = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    cfg.write_text("[namespaces.chat]\nfly = true\n")
    with pytest.raises(ConfigError, match=r"unknown setting namespaces\.chat\.fly"):
        load_settings(cfg)
