"""A port picked for the embedded nats-server is never one the node is about to bind.

The node checks that its HTTP and MQTT ports are free, starts its nats-server on a port the OS
hands out, then binds HTTP and MQTT. A port in the OS's ephemeral range (as tests and
``--workers`` pick) was free when checked, so the OS could hand it out for NATS: the node's
HTTP port then answered with nats-server's INFO line. The OS is replaced here by a seeded fake
that hands out the avoided ports first, again and again.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from node import nats_server
from node.nats_server import EmbeddedNats, free_port

SEED = int(os.environ.get("RTNODE_TEST_FREE_PORT_SEED", "5150"))


class _FakeOs:
    """Hands out ports from ``ports`` in order, as bind(0) would."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.binds = 0

    def socket(self, *args: Any) -> Any:
        fake = self

        class _Sock:
            def __enter__(self) -> Any:
                return self

            def __exit__(self, *exc: Any) -> None:
                pass

            def bind(self, addr: tuple[str, int]) -> None:
                assert addr[1] == 0
                fake.binds += 1
                self.port = fake.ports.pop(0)

            def getsockname(self) -> tuple[str, int]:
                return ("127.0.0.1", self.port)

        return _Sock()


def _fake(monkeypatch: pytest.MonkeyPatch, ports: list[int]) -> _FakeOs:
    fake = _FakeOs(ports)
    monkeypatch.setattr(nats_server, "socket", type("S", (), {
        "socket": staticmethod(fake.socket), "AF_INET": socket.AF_INET,
        "SOCK_STREAM": socket.SOCK_STREAM}))
    return fake


def test_free_port_never_returns_an_avoided_port(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(SEED)
    for _ in range(200):
        avoid = set(rng.sample(range(32768, 32800), rng.randrange(0, 5)))
        handed = [rng.choice(sorted(avoid)) for _ in range(rng.randrange(0, 6))] if avoid else []
        other = rng.choice([p for p in range(32768, 32800) if p not in avoid])
        fake = _fake(monkeypatch, [*handed, other])
        assert free_port(avoid=avoid) == other
        assert fake.binds == len(handed) + 1


def test_the_embedded_server_is_not_put_on_the_nodes_ports(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake(monkeypatch, [40001, 40002, 40001, 40003])
    server = EmbeddedNats(tmp_path / "nats", avoid=(40001, 40002))
    assert server.port == 40003
