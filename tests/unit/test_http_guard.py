"""The HTTP edge without a network: admission per peer and under the descriptor limit (a seeded
random walk against a model), the head deadline, throttled logging, the headers."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from typing import Any

from bridge.http import API_CSP, CONSOLE_CSP, security_headers
from bridge.http_guard import HttpGuard, LogThrottle
from bridge.sse import cors_headers


class FakeTransport:
    """What the guard uses of an asyncio transport."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.written = b""
        self.closed = False
        self.eof = False

    def get_extra_info(self, name: str) -> Any:
        return (self.peer, 40000) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed


class FakeHandler(asyncio.Protocol):
    """Stands for aiohttp's request handler: records what it is told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def connection_made(self, transport: Any) -> None:
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.calls.append("data")

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")


def connect(guard: HttpGuard, peer: str) -> tuple[Any, FakeTransport, list[FakeHandler]]:
    handlers: list[FakeHandler] = []

    def make() -> FakeHandler:
        handlers.append(FakeHandler())
        return handlers[-1]

    proto = guard.protocol_factory(make)()
    transport = FakeTransport(peer)
    proto.connection_made(transport)
    return proto, transport, handlers


async def test_admission_follows_the_per_peer_and_total_caps() -> None:
    rng = random.Random(20261130)
    guard = HttpGuard(header_timeout_s=60, max_per_peer=3, fd_limit=80)  # 16 open at most
    assert guard.max_open == 16
    peers = [f"10.0.0.{i}" for i in range(8)]
    model: Counter[str] = Counter()
    open_: list[tuple[Any, str]] = []
    refused = Counter[str]()
    for _ in range(2000):
        if open_ and rng.random() < 0.45:
            proto, peer = open_.pop(rng.randrange(len(open_)))
            proto.connection_lost(None)
            model[peer] -= 1
            continue
        peer = rng.choice(peers)
        proto, transport, handlers = connect(guard, peer)
        if model[peer] >= 3:
            refused["per_peer"] += 1
        elif model.total() >= 16:
            refused["descriptors"] += 1
        else:
            model[peer] += 1
            open_.append((proto, peer))
            assert handlers[0].calls == ["made"]
            continue
        assert transport.eof and transport.written.startswith(b"HTTP/1.1 503 "), transport
        assert b"Retry-After" in transport.written and handlers == []
        assert not transport.closed, "kept until the client's request is read"
        proto.data_received(b"GET / HTTP/1.1\r\n")
        assert transport.closed, "then closed: no reset with its request unread"
        proto.connection_lost(None)  # a refused connection's end changes nothing
        assert guard.open == model.total()
    assert guard.refused == refused and refused["per_peer"] and refused["descriptors"]
    assert guard.open == model.total() and guard.peers == len(+model)
    for proto, _ in open_:
        proto.connection_lost(None)
    assert guard.open == 0 and guard.peers == 0


async def test_the_head_deadline_closes_with_408_unless_a_request_came() -> None:
    guard = HttpGuard(header_timeout_s=0.05, max_per_peer=10, fd_limit=1000)
    silent, silent_t, _ = connect(guard, "10.0.0.1")
    served, served_t, handlers = connect(guard, "10.0.0.2")
    served.data_received(b"GET / HTTP/1.1\r\n")
    served.head_read()  # what guard.middleware does when aiohttp dispatches the request
    await asyncio.sleep(0.2)
    assert silent_t.closed and silent_t.written.startswith(b"HTTP/1.1 408 ")
    assert not served_t.closed and handlers[0].calls == ["made", "data"]
    assert guard.head_timeouts == 1
    silent.connection_lost(None)
    served.connection_lost(None)
    assert guard.open == 0


def test_log_throttle_says_how_many_lines_it_held_back(caplog: Any) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("test.throttle"), every_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.throttle"):
        for i in range(500):  # 500 refusals over 25 s: three lines, not 500
            now[0] = i * 0.05
            throttle.log(logging.WARNING, "per_peer", "refused %s", "10.0.0.1")
        throttle.log(logging.INFO, "other", "another kind")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused 10.0.0.1",
        "refused 10.0.0.1 (and 199 more in the last 10 s)",
        "refused 10.0.0.1 (and 199 more in the last 10 s)",
        "another kind",
    ]


def test_security_headers_by_media_type() -> None:
    page = security_headers("text/html")
    assert page["Content-Security-Policy"] == CONSOLE_CSP
    data = security_headers("application/json")
    assert data["Content-Security-Policy"] == API_CSP
    for headers in (page, data):
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
    assert "'unsafe" not in CONSOLE_CSP and "frame-ancestors 'none'" in CONSOLE_CSP


def test_cors_of_an_event_stream() -> None:
    assert cors_headers("https://evil.example", []) == {"Access-Control-Allow-Origin": "*"}
    assert cors_headers(None, []) == {"Access-Control-Allow-Origin": "*"}
    allowed = ["https://app.example"]
    assert cors_headers("https://app.example", allowed) == {
        "Access-Control-Allow-Origin": "https://app.example", "Vary": "Origin"}
    assert cors_headers("https://evil.example", allowed) == {"Vary": "Origin"}
    assert cors_headers(None, allowed) == {"Vary": "Origin"}
