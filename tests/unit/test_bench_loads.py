"""The rooms benchmark's members read what they receive (bench/loads.py): the usual frames with
a regex, anything else with json.loads, and both ways count the same."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from bench.loads import _Client, _Member


def _pair(rtnode: bool) -> tuple[_Client, _Member, _Member]:
    client = _Client(None, "ws://unused", rtnode, "secret")  # type: ignore[arg-type]
    client.stride = 1
    a = _Member(None, "bench-r1", 0, acked=bytearray(8))  # type: ignore[arg-type]
    b = _Member(None, "bench-r1", 1, acked=bytearray(8))  # type: ignore[arg-type]
    a.peer, b.peer = b, a
    return client, a, b


def _event(rtnode: bool, m: int, i: int, t: float, keys: list[str] | None = None) -> str:
    data: dict[str, Any] = {"m": m, "i": i, "t": t}
    if keys:
        data = {k: data[k] for k in keys}
    frame: dict[str, Any] = ({"type": "event", "room": "bench-r1", "seq": i + 1, "event": "m",
                              "data": data, "ts": 1, "from": "u"} if rtnode else {"data": data})
    return json.dumps(frame, separators=(",", ":"))


def _counts(m: _Member) -> tuple[Any, ...]:
    return (bytes(m.acked), bytes(m.seen), m.received, m.echoes, m.duplicates, m.refused)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("rtnode", [True, False])
def test_the_regex_and_json_count_the_same(seed: int, rtnode: bool) -> None:
    rnd = random.Random(seed)
    lines = []
    for _ in range(30):
        i = rnd.randrange(8)
        kind = rnd.choice(["published", "event", "event", "echo", "odd", "error"])
        if kind == "published" and rtnode:
            lines.append(json.dumps({"type": "published", "room": "bench-r1", "seq": i + 1,
                                     "id": i}, separators=(",", ":")))
        elif kind in ("event", "echo"):
            lines.append(_event(rtnode, 1 if kind == "event" else 0, i, rnd.random()))
        elif kind == "odd":  # keys in another order: only json.loads reads it
            lines.append(_event(rtnode, 1, i, rnd.random(), keys=["t", "i", "m"]))
        elif rtnode:
            lines.append(json.dumps({"type": "error", "id": i, "code": 4503,
                                     "reason": "not stored"}))
    fast, a1, _ = _pair(rtnode)
    slow, a2, _ = _pair(rtnode)
    fast._message(a1, "\n".join(lines), 1.0)
    for line in lines:
        slow._frame(a2, line, 1.0)
    assert _counts(a1) == _counts(a2)
    assert len(fast.latencies) == len(slow.latencies)
    assert fast.n_errors == slow.n_errors


def test_a_refused_publish_frees_its_slot() -> None:
    client, a, _ = _pair(True)
    client._message(a, '{"type":"error","id":3,"code":4503,"reason":"retry"}', 1.0)
    assert a.acked[3] == 2 and a.refused == 1 and client.n_errors == 1
