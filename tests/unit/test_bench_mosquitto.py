"""The ingest baseline's MQTT member (``bench.ingest_mosquitto``) counts what a broker sends.

Seeded streams of PUBLISH packets (QoS 0 and 1, topics of any length, readings of any device
and index, some twice, some not readings at all) and other packets, cut into random chunks:
read chunk by chunk, the member counts exactly what the whole stream holds.
"""

from __future__ import annotations

import os
import random

import cbor2

from bench.ingest import Member
from bench.ingest_devices import IngestConfig, utf8, varint
from bench.ingest_mosquitto import _publishes
from bench.ingest_report import IngestResult

SEED = int(os.environ.get("RTNODE_TEST_BENCH_MOSQUITTO_SEED", "2718"))


def _publish(rng: random.Random, payload: bytes) -> bytes:
    qos = rng.choice((0, 1))
    topic = utf8("rooms/" + "r" * rng.randrange(0, 300) + "/up")
    pid = rng.randrange(1, 65536).to_bytes(2, "big") if qos else b""
    body = topic + pid + payload
    return bytes((0x30 | qos << 1,)) + varint(len(body)) + body


def test_the_member_counts_every_reading_of_a_stream_cut_anywhere() -> None:
    rng = random.Random(SEED)
    for _ in range(60):
        cfg = IngestConfig(devices=rng.randrange(1, 6), events_per_device=rng.randrange(1, 40))
        stream, want_distinct, want_dups, want_foreign, want_other = b"", set(), 0, 0, 0
        for _ in range(rng.randrange(0, 200)):
            roll = rng.random()
            if roll < 0.8:
                d, i = rng.randrange(cfg.devices), rng.randrange(cfg.events_per_device)
                pad = "x" * rng.randrange(0, 400)
                stream += _publish(rng, cbor2.dumps(
                    {"event": "reading", "data": {"t": 1.0, "i": i, "d": d, "pad": pad}}))
                if (d, i) in want_distinct:
                    want_dups += 1
                want_distinct.add((d, i))
            elif roll < 0.9:  # not a reading: bad CBOR, no device, a device out of range
                stream += _publish(rng, rng.choice((
                    b"\xff\x00", cbor2.dumps({"data": {"i": 0, "t": 1.0}}),
                    cbor2.dumps({"data": {"i": 0, "t": 1.0, "d": cfg.devices}}))))
                want_foreign += 1
            else:
                stream += b"\xd0\x00"  # PINGRESP
                want_other += 1
        res = IngestResult(cfg)
        member = Member(res)
        buf = bytearray()
        pos = 0
        while pos < len(stream):
            step = rng.randrange(1, 700)
            buf += stream[pos:pos + step]
            pos += step
            del buf[:_publishes(buf, member, 2.0)]
        assert not buf  # nothing left over once the stream is whole
        assert res.distinct == len(want_distinct)
        assert res.duplicates == want_dups
        assert res.foreign == want_foreign
        assert sum(res.member_other.values()) == want_other
        assert {(d, i) for d, seen in enumerate(res.seen)
                for i, n in enumerate(seen) if n} == want_distinct
