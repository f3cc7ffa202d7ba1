"""Hostile input for the fuzz and flood benchmarks: seeded, every door's own spelling.

:class:`HostileFrames` draws, from one :class:`random.Random`, what an attacker sends to a node:
WebSocket messages in JSON or CBOR (malformed bytes, wrong types, huge and deep values, unknown
frame types, ids of every type, room names with ``.``, ``*``, ``>``, ``/``, unicode and
overlong ones, forged tokens, oversized frames, request floods), payloads for the MQTT tunnel
(``rtnode/v1/<client_id>/in``) and plain uplinks (``rooms/<room>/up``). The same seed draws the
same sequence. Nothing here opens a socket: :mod:`bench.attackers` sends what it draws.
"""

from __future__ import annotations

import base64
import json
import random
import string
import time
from collections.abc import Callable
from typing import Any

import cbor2
import jwt

from node.protocol.tokens import mint_token

__all__ = ["HostileFrames", "encode"]

# Room names no room may have (PROTOCOL.md section 3), and some it may.
HOSTILE_ROOMS = (
    "a.b", "*", ">", "chat:*", "chat.>", "a/b", "rooms/x/up", "+", "#", "", " ", "\n",
    "caf\u00e9", "\u202e", "\U0001f600", "\x00", "a\tb", "..", "@user:>", "@device:*",
    "x" * 129, "x" * 5000, "\ud800",
)
# rpc targets, tunnel client ids and token subjects that must never reach a subject or a key.
HOSTILE_IDS = (">", "*", "a.b", "a b", "", "\x00", "x" * 300, "\u00e9", "user:>", "a/b", "+")
FRAME_TYPES = ("connect", "join", "leave", "publish", "history", "presence", "rpc", "reply",
               "ack", "refresh", "ping")


def encode(codec: str, frame: Any) -> str | bytes:
    """One frame as one WebSocket message of ``codec`` (what JSON cannot say: repr, or left
    out for keys)."""
    if codec == "cbor":
        return _cbor(frame)
    return json.dumps(frame, default=repr, skipkeys=True, separators=(",", ":"))


class HostileFrames:
    """Seeded hostile frames and payloads.

    Args:
        rng: Where every choice comes from (one per attacker: reproducible with its seed).
        secret: The node's HS256 secret, to mint valid tokens next to the forged ones.
        max_frame_bytes: The node's frame limit: oversized frames go beyond it.
    """

    def __init__(self, rng: random.Random, secret: str, max_frame_bytes: int = 65536) -> None:
        self.rng = rng
        self.secret = secret
        self.max_frame_bytes = max_frame_bytes
        self.n = 0  # a counter for distinct room names (churn)

    # -- values

    def text(self, max_len: int = 40) -> str:
        """A short string of mixed characters (controls, unicode, surrogates included)."""
        r = self.rng
        alphabet = string.printable + "\u00e9\u4e2d\U0001f600\u202e\x00\x7f"
        s = "".join(r.choice(alphabet) for _ in range(r.randint(0, max_len)))
        return s + ("\udc00" if r.random() < 0.05 else "")

    def number(self) -> Any:
        """A number at or beyond an edge of the value model."""
        return self.rng.choice((
            0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**40,
            1.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), True, False,
        ))

    def value(self, depth: int = 0) -> Any:
        """Any value, nested up to a few levels; now and then a huge or very deep one."""
        r = self.rng
        roll = r.random()
        if roll < 0.03:
            return self.deep(r.randint(30, 200))
        if roll < 0.05:
            return "x" * r.randint(1000, self.max_frame_bytes // 2)
        if roll < 0.07:
            return list(range(r.randint(100, 3000)))
        if depth < 3 and roll < 0.25:
            return [self.value(depth + 1) for _ in range(r.randint(0, 5))]
        if depth < 3 and roll < 0.4:
            return {self.key(): self.value(depth + 1) for _ in range(r.randint(0, 5))}
        if roll < 0.6:
            return r.choice((None, cbor2.undefined, cbor2.CBORSimpleValue(16),
                             cbor2.CBORTag(1, 1), b"\x00\xff", "\U0001f600", {}, []))
        return self.text() if roll < 0.8 else self.number()

    def key(self) -> Any:
        """A map key: text mostly, sometimes what JSON cannot have."""
        return self.rng.choice((self.text(8), self.text(8), "", 1, b"k", None, 1.5))

    def deep(self, depth: int) -> Any:
        """``depth`` nested lists or maps."""
        value: Any = 1
        for _ in range(depth):
            value = [value] if self.rng.random() < 0.5 else {"a": value}
        return value

    def request_id(self) -> Any:
        """An ``id`` of any type: valid, huge, nested, invalid text."""
        return self.rng.choice((
            1, -1, 0, 2**64, 1.5, float("nan"), True, None, "x", "x" * 1000, [], {}, [1],
            {"a": 1}, "\ud800", b"id", self.text(10),
        ))

    def room(self) -> Any:
        """A room name the grammar refuses, now and then a good one or a wrong type."""
        r = self.rng.random()
        if r < 0.7:
            return self.rng.choice(HOSTILE_ROOMS)
        if r < 0.85:
            return f"fuzz:{self.rng.randrange(1000)}"
        return self.value()

    # -- tokens

    def token(self) -> Any:
        """A token that must be refused: forged, tampered, expired, confused, malformed."""
        r = self.rng
        sub = r.choice((*HOSTILE_IDS, "fuzz-user"))
        rooms = {"*": ["join", "publish", "history", "presence"]}
        good = mint_token(self.secret, sub="fuzz-user", rooms=rooms)
        head, body, sig = good.split(".")
        choice = r.randrange(9)
        if choice == 0:
            return mint_token(f"not-the-secret-{r.randrange(1 << 64):x}", sub="fuzz-user",
                              rooms=rooms)
        if choice == 1:  # alg none
            none = _b64({"alg": "none", "typ": "JWT"})
            return f"{none}.{body}."
        if choice == 2:  # claims changed, signature kept
            return f"{head}.{_b64({'sub': 'admin', 'tenant': 'other', 'rooms': rooms})}.{sig}"
        if choice == 3:
            return mint_token(self.secret, sub="fuzz-user", rooms=rooms, ttl_s=-60)
        if choice == 4:  # a string exp, numbers only are allowed
            return f"{head}.{_b64({'sub': 'fuzz-user', 'exp': '9999999999'})}.{sig}"
        if choice == 5:  # a subject that would reach a NATS subject, signed with the secret
            return jwt.encode({"sub": sub, "kind": r.choice(("user", "device", "service")),
                               "rooms": rooms, "exp": int(time.time()) + 3600},
                              self.secret, algorithm="HS256")
        if choice == 6:
            return self.value()
        if choice == 7:
            return good[: r.randrange(len(good))]
        return "x" * r.randint(5000, 20000)

    # -- frames

    def frame(self) -> Any:
        """One hostile frame for a connected client (a map, mostly)."""
        r = self.rng
        make: Callable[[], Any] = r.choice((
            self._wrong_types, self._unknown_type, self._odd_id, self._odd_room,
            self._big_publish, self._odd_rpc, self._odd_token_frame, self._odd_seq,
            self._stray_reply, self._not_a_map,
        ))
        return make()

    def _template(self) -> dict[str, Any]:
        kind = self.rng.choice(FRAME_TYPES)
        base: dict[str, Any] = {"type": kind, "id": self.rng.randrange(1 << 30)}
        fields = {"room": "fuzz:r", "event": "e", "data": 1, "to": "server", "method": "m",
                  "params": {}, "since": {"seq": 1}, "limit": 10, "seq": 1, "token": "t",
                  "presence": True, "timeout_ms": 100, "result": 1, "msg_id": "m"}
        for name in self.rng.sample(sorted(fields), k=self.rng.randint(0, 6)):
            base[name] = fields[name]
        return base

    def _wrong_types(self) -> Any:
        frame = self._template()
        for name in list(frame):
            if self.rng.random() < 0.4:
                frame[name] = self.value()
        return frame

    def _unknown_type(self) -> Any:
        return {"type": self.rng.choice((self.text(12), "JOIN", "event", "disconnect", "",
                                         "connected", 7, None)), "id": self.request_id()}

    def _odd_id(self) -> Any:
        return {**self._template(), "id": self.request_id()}

    def _odd_room(self) -> Any:
        kind = self.rng.choice(("join", "leave", "publish", "history", "presence", "ack"))
        frame = {"type": kind, "id": self.rng.randrange(1 << 30), "room": self.room()}
        if kind == "publish":
            frame.update(event=self.text(20) or "e", data=self.value())
        return frame

    def _big_publish(self) -> Any:
        return {"type": "publish", "id": 1, "room": self.room(), "event": self.text(200),
                "data": self.value(), "msg_id": self.rng.choice((self.text(), "m" * 10000, 5))}

    def _odd_rpc(self) -> Any:
        target = self.rng.choice((*(f"{k}:{i}" for k in ("user", "device", "client")
                                    for i in HOSTILE_IDS), "server", "nobody", ""))
        return {"type": "rpc", "id": self.request_id(), "to": target, "method": self.text(20),
                "params": self.value(), "timeout_ms": self.number()}

    def _odd_token_frame(self) -> Any:
        return {"type": self.rng.choice(("connect", "refresh")), "id": 1, "token": self.token()}

    def _odd_seq(self) -> Any:
        kind = self.rng.choice(("join", "history", "ack"))
        room = f"fuzz:{self.rng.randrange(10)}"
        if kind == "ack":
            return {"type": "ack", "room": room, "seq": self.number()}
        return {"type": kind, "id": 1, "room": room,
                "since": self.rng.choice(({"seq": self.number()}, {"epoch": self.value()},
                                          self.value())), "limit": self.number()}

    def _stray_reply(self) -> Any:
        return {"type": "reply", "id": self.request_id(), "result": self.value(),
                "error": self.rng.choice((None, {"code": self.number(), "reason": self.text()},
                                          self.value()))}

    def _not_a_map(self) -> Any:
        return self.value()

    def malformed(self, codec: str) -> str | bytes:
        """A message no codec can read: random or truncated bytes, broken nesting."""
        r = self.rng
        good = encode(codec, {"type": "publish", "id": 1, "room": "fuzz:r", "event": "e",
                              "data": {"a": [1, 2, {"b": "c"}]}})
        choice = r.randrange(6)
        if choice == 0:
            return r.randbytes(r.randint(1, 200))
        if choice == 1:
            return good[: r.randrange(1, len(good))]
        if choice == 2:
            return ("[" * 100_000) if codec == "json" else b"\x81" * 100_000
        if choice == 3:  # an undeclared length far beyond the message
            return "{" + '"a":' * 1000 if codec == "json" else b"\xbb" + b"\xff" * 8
        if choice == 4:  # invalid UTF-8 where text is due
            return b'{"type":"ping","id":"\xff\xfe"}' if codec == "json" else b"\x62\xff\xfe"
        if isinstance(good, bytes):
            return good + b"\x62"  # a text string of two bytes, none follows
        return good + "\n{"

    def oversized(self, codec: str) -> str | bytes:
        """A frame beyond the node's limit (up to four times it)."""
        size = self.rng.randint(self.max_frame_bytes + 1, 4 * self.max_frame_bytes)
        return encode(codec, {"type": "publish", "id": 1, "room": "fuzz:big", "event": "e",
                              "data": "x" * size})

    def churn(self) -> list[dict[str, Any]]:
        """A join and a leave of a room never used before (one room at a time)."""
        self.n += 1
        room = f"churn:{self.rng.randrange(1 << 30):x}-{self.n}"
        return [{"type": "join", "id": 2 * self.n, "room": room, "presence": True},
                {"type": "leave", "id": 2 * self.n + 1, "room": room}]

    def request(self, room: str) -> dict[str, Any]:
        """A valid history, presence, rpc or ping request (what a request flood sends)."""
        kind = self.rng.choice(("history", "presence", "rpc", "rpc", "ping"))
        self.n += 1
        if kind == "rpc":
            return {"type": "rpc", "id": self.n, "method": "m", "params": {}, "timeout_ms": 50,
                    "to": self.rng.choice(("user:nobody", "device:none", "client:gone",
                                           "server"))}
        return {"type": kind, "id": self.n, "room": room, "limit": 1000}

    def over_rate(self, room: str) -> dict[str, Any]:
        """A valid publish (sent beyond the publish rate)."""
        self.n += 1
        return {"type": "publish", "id": self.n, "room": room, "event": "flood",
                "data": {"n": self.n}}

    def pre_connect(self) -> Any:
        """The first frame of a connection: anything but a good ``connect``."""
        if self.rng.random() < 0.5:
            return {"type": "connect", "id": 1, "token": self.token()}
        return self.frame()

    # -- MQTT

    def tunnel_payload(self) -> bytes:
        """A payload for ``rtnode/v1/<client_id>/in``: CBOR, valid or not."""
        if self.rng.random() < 0.25:
            return bytes(_as_bytes(self.malformed("cbor")))
        return _cbor(self.frame())

    def uplink(self) -> tuple[str, bytes]:
        """A plain uplink: a hostile topic or payload on ``rooms/<room>/up``."""
        r = self.rng
        room = r.choice((*HOSTILE_ROOMS, "fuzz:up", "fuzz:up"))
        roll = r.random()
        if roll < 0.3:
            payload = r.randbytes(r.randint(0, 100))
        elif roll < 0.5:
            payload = _cbor(self.value())
        else:
            payload = _cbor({"event": r.choice((self.text(20), "e", 5, None)),
                             "data": self.value(),
                             "msg_id": r.choice((self.text(), 1, None, "m" * 5000))})
        return f"rooms/{room}/up", payload


def _b64(claims: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


def _cbor(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except (ValueError, TypeError, OverflowError, cbor2.CBOREncodeError):  # a lone surrogate
        return b"\xa1\x64type"


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
