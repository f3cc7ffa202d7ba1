"""The sans-I/O MQTT 3.1.1 codec, checked against paho-mqtt's and amqtt's encoders and decoders.

Client packets are built with paho-mqtt's own packet writers (captured instead of sent) and
with byte vectors from the MQTT 3.1.1 specification; server packets are decoded with amqtt's
packet classes. No sockets: paho's client is never connected, amqtt reads from a buffer.
"""

from __future__ import annotations

import itertools
from typing import Any

import paho.mqtt.client as paho
import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.unsuback import UnsubackPacket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.mqtt_codec import (
    MAX_REMAINING_LENGTH,
    Connect,
    ConnectRefused,
    Disconnect,
    MqttError,
    MqttParser,
    Packet,
    PacketTooLarge,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Unsubscribe,
    Will,
    connack,
    pingresp,
    puback,
    publish,
    publish_header,
    suback,
    topic_matches,
    unsuback,
)

# --------------------------------------------------------------------------- helpers


class PahoWire(paho.Client):
    """A paho client that is never connected: its packet writers append to ``sent``."""

    def __init__(self, client_id: str = "dev-1", protocol: int = paho.MQTTv311,
                 clean_session: bool = True) -> None:
        super().__init__(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=protocol, clean_session=clean_session)
        self.sent: list[bytes] = []

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: Any = None) -> paho.MQTTErrorCode:
        self.sent.append(bytes(packet))
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    def take(self) -> bytes:
        data = b"".join(self.sent)
        self.sent.clear()
        return data

    def connect_bytes(self, keepalive: int = 60) -> bytes:
        self._send_connect(keepalive)
        return self.take()

    def publish_bytes(self, topic: str, payload: bytes, qos: int = 0, mid: int = 0,
                      retain: bool = False, dup: bool = False) -> bytes:
        self._sock = object()  # type: ignore[assignment]  # _send_publish wants a socket
        try:
            self._send_publish(mid, topic.encode(), payload, qos, retain, dup)
        finally:
            self._sock = None
        return self.take()

    def subscribe_bytes(self, topics: list[tuple[str, int]]) -> tuple[bytes, int]:
        _, mid = self._send_subscribe(False, [(t.encode(), q) for t, q in topics])
        return self.take(), mid

    def unsubscribe_bytes(self, topics: list[str]) -> tuple[bytes, int]:
        _, mid = self._send_unsubscribe(False, [t.encode() for t in topics])
        return self.take(), mid


CONNECT = PahoWire("dev-1").connect_bytes()


def connected(max_packet_bytes: int = 1 << 20) -> MqttParser:
    parser = MqttParser(max_packet_bytes)
    assert parser.feed(CONNECT) == [Connect("dev-1", None, None, 60, True, None, 4)]
    return parser


def packet(b0: int, body: bytes) -> bytes:
    """A packet with a correctly encoded remaining length."""
    rl = bytearray()
    n = len(body)
    while True:
        n, byte = divmod(n, 128)
        rl.append(byte | (0x80 if n else 0))
        if not n:
            return bytes((b0,)) + bytes(rl) + body


def s16(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def connect_body(name: bytes = b"MQTT", level: int = 4, flags: int = 0x02, keepalive: int = 60,
                 rest: bytes = b"\x00\x04dev1") -> bytes:
    return s16(name) + bytes((level, flags)) + keepalive.to_bytes(2, "big") + rest


async def amqtt_decode(cls: Any, data: bytes) -> Any:
    reader = BufferReader(data)
    decoded = await cls.from_stream(reader)
    assert await reader.read(-1) == b"", "amqtt left bytes unread"
    return decoded


# --------------------------------------------------------------------------- CONNECT


def test_connect_from_paho_with_will_and_credentials() -> None:
    wire = PahoWire("sensor-7", clean_session=False)
    wire.username_pw_set("alice", "s3cret\u00e9")
    wire.will_set("devices/sensor-7/status", b"offline", qos=1, retain=True)
    assert MqttParser().feed(wire.connect_bytes(keepalive=15)) == [
        Connect("sensor-7", "alice", "s3cret\u00e9".encode(), 15, False,
                Will("devices/sensor-7/status", b"offline", 1, True), 4)
    ]


def test_connect_mqisdp_level_3_from_paho() -> None:
    data = PahoWire("old", protocol=paho.MQTTv31).connect_bytes(keepalive=0)
    assert data[2:10] == b"\x00\x06MQIsdp"
    [conn] = MqttParser().feed(data)
    assert conn == Connect("old", None, None, 0, True, None, 3)


def test_connect_spec_example() -> None:
    # MQTT 3.1.1 figure 3.6 / 3.7: "MQTT", level 4, flags 0xCE, keep alive 10.
    flags = 0xCE  # user name, password, will QoS 1, will flag, clean session
    rest = s16("c1") + s16("w") + s16(b"\x01\x02") + s16("u") + s16(b"p\x00w")
    parsed = MqttParser().feed(packet(0x10, connect_body(flags=flags, keepalive=10, rest=rest)))
    assert parsed == [Connect("c1", "u", b"p\x00w", 10, True, Will("w", b"\x01\x02", 1, False), 4)]


def test_empty_client_id_with_clean_session() -> None:
    [conn] = MqttParser().feed(PahoWire("").connect_bytes())
    assert isinstance(conn, Connect)
    assert conn.client_id == ""
    assert conn.clean_session


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (connect_body(level=5), 1),  # an MQTT 5 client
        (connect_body(level=3), 1),
        (connect_body(name=b"MQIsdp", level=4), 1),
        (connect_body(flags=0x00, rest=s16("")), 2),  # empty client id, no clean session
    ],
)
def test_connect_refused_with_connack_code(body: bytes, code: int) -> None:
    with pytest.raises(ConnectRefused) as info:
        MqttParser().feed(packet(0x10, body))
    assert info.value.return_code == code


BAD_CONNECTS = {
    "fixed header flags": packet(0x11, connect_body()),
    "unknown protocol name": packet(0x10, connect_body(name=b"MQTX")),
    "reserved connect flag": packet(0x10, connect_body(flags=0x03)),
    "will qos 3": packet(0x10, connect_body(flags=0x1E, rest=s16("c") + s16("w") + s16("m"))),
    "will qos without will": packet(0x10, connect_body(flags=0x0A)),
    "will retain without will": packet(0x10, connect_body(flags=0x22)),
    "password without user": packet(0x10, connect_body(flags=0x42, rest=s16("c") + s16("p"))),
    "will topic wildcard": packet(
        0x10, connect_body(flags=0x06, rest=s16("c") + s16("w/#") + s16(""))
    ),
    "will topic missing": packet(0x10, connect_body(flags=0x06, rest=s16("c"))),
    "user missing": packet(0x10, connect_body(flags=0x82, rest=s16("c"))),
    "trailing bytes": packet(0x10, connect_body(rest=s16("c") + b"\x00")),
    "truncated header": packet(0x10, s16("MQTT") + b"\x04\x02"),
    "no client id": packet(0x10, connect_body(rest=b"")),
    "client id bad utf-8": packet(0x10, connect_body(rest=s16(b"\xff\xfe"))),
    "client id NUL": packet(0x10, connect_body(rest=s16("a\x00b"))),
    "empty body": packet(0x10, b""),
}


@pytest.mark.parametrize("data", BAD_CONNECTS.values(), ids=BAD_CONNECTS.keys())
def test_malformed_connect(data: bytes) -> None:
    with pytest.raises(MqttError) as info:
        MqttParser().feed(data)
    assert not isinstance(info.value, ConnectRefused)


def test_first_packet_must_be_connect() -> None:
    for data in (b"\xc0\x00", PahoWire().publish_bytes("a", b"x"), b"\x40\x02\x00\x01"):
        with pytest.raises(MqttError):
            MqttParser().feed(data)


def test_second_connect() -> None:
    parser = connected()
    with pytest.raises(MqttError):
        parser.feed(CONNECT)


# --------------------------------------------------------------------------- other client packets


def test_client_packets_from_paho() -> None:
    wire = PahoWire()
    sub, sub_mid = wire.subscribe_bytes([("sport/tennis/+", 1), ("sport/#", 0), ("+", 2)])
    unsub, unsub_mid = wire.unsubscribe_bytes(["sport/#", "a/b"])
    wire._send_puback(1)
    wire._send_pubrec(2)
    wire._send_pubrel(3)
    wire._send_pubcomp(65535)
    wire._send_pingreq()
    acks_and_ping = wire.take()
    publishes = (
        wire.publish_bytes("devices/d1/temp", b"21.5", qos=1, mid=7)
        + wire.publish_bytes("devices/d1/hum", b"", qos=0, retain=True)
        + wire.publish_bytes("\u6e29\u5ea6/\u00fc", b"\x00\xff", qos=2, mid=9, dup=True)
    )
    wire._send_disconnect()
    stream = publishes + sub + unsub + acks_and_ping + wire.take()
    assert connected().feed(stream) == [
        Publish("devices/d1/temp", b"21.5", 1, False, False, 7),
        Publish("devices/d1/hum", b"", 0, True, False, None),
        Publish("\u6e29\u5ea6/\u00fc", b"\x00\xff", 2, False, True, 9),
        Subscribe(sub_mid, [("sport/tennis/+", 1), ("sport/#", 0), ("+", 2)]),
        Unsubscribe(unsub_mid, ["sport/#", "a/b"]),
        PubAck(1), PubRec(2), PubRel(3), PubComp(65535), PingReq(),
        Disconnect(),
    ]


def test_spec_examples() -> None:
    # 3.3.2.3: topic "a/b", packet identifier 10.
    pub = bytes((0x32, 9, 0, 3)) + b"a/b" + bytes((0, 10)) + b"hi"
    # 3.8.3.1: packet id 10, "a/b" QoS 1, "c/d" QoS 2.
    sub = bytes((0x82, 14, 0, 10, 0, 3)) + b"a/b" + bytes((1, 0, 3)) + b"c/d" + bytes((2,))
    # 3.10.3.1: packet id 10, "a/b", "c/d".
    unsub = bytes((0xA2, 12, 0, 10, 0, 3)) + b"a/b" + bytes((0, 3)) + b"c/d"
    assert connected().feed(pub + sub + unsub) == [
        Publish("a/b", b"hi", 1, False, False, 10),
        Subscribe(10, [("a/b", 1), ("c/d", 2)]),
        Unsubscribe(10, ["a/b", "c/d"]),
    ]


def test_large_publish_with_three_byte_remaining_length() -> None:
    payload = bytes(range(256)) * 100  # 25600 bytes: remaining length > 16383
    data = PahoWire().publish_bytes("big/one", payload, qos=1, mid=300)
    assert data[1] & 0x80 and data[2] & 0x80 and not data[3] & 0x80
    parser = connected()
    got: list[Packet] = []
    for i in range(0, len(data), 1000):
        got += parser.feed(data[i : i + 1000])
    assert got == [Publish("big/one", payload, 1, False, False, 300)]


def test_disconnect_stops_the_parser() -> None:
    parser = connected()
    assert parser.feed(b"\xc0\x00\xe0\x00\xff\xff garbage") == [PingReq(), Disconnect()]
    assert parser.closed
    assert parser.feed(b"\x30\x00 more garbage") == []


def test_packet_types_are_distinct_values() -> None:
    assert PubAck(1) != PubRec(1)
    assert PingReq() != Disconnect()
    assert PingReq() == PingReq()
    assert Publish("a", b"", 0, False, False, None) != Publish("a", b"", 1, False, False, 1)
    assert "topic='a'" in repr(Publish("a", b"", 0, False, False, None))


def test_packets_support_match() -> None:
    match Publish("t", b"p", 1, False, False, 3):
        case Publish(topic, payload, qos, packet_id=pid):
            assert (topic, payload, qos, pid) == ("t", b"p", 1, 3)
        case _:
            pytest.fail("no match")


# --------------------------------------------------------------------------- splitting


def split_stream() -> tuple[bytes, list[Packet]]:
    wire = PahoWire("split", clean_session=False)
    wire.will_set("w", b"bye", qos=0, retain=False)
    data = wire.connect_bytes(keepalive=5)
    data += wire.publish_bytes("a/b", b"x" * 200, qos=1, mid=1)  # 2-byte remaining length
    data += wire.publish_bytes("a/c", b"", qos=0)
    sub, mid = wire.subscribe_bytes([("a/#", 1)])
    data += sub + b"\x40\x02\x12\x34" + b"\xc0\x00" + wire.publish_bytes("z", b"1", qos=1, mid=2)
    expected: list[Packet] = [
        Connect("split", None, None, 5, False, Will("w", b"bye", 0, False), 4),
        Publish("a/b", b"x" * 200, 1, False, False, 1),
        Publish("a/c", b"", 0, False, False, None),
        Subscribe(mid, [("a/#", 1)]),
        PubAck(0x1234),
        PingReq(),
        Publish("z", b"1", 1, False, False, 2),
    ]
    return data, expected


def test_split_at_every_byte_boundary() -> None:
    data, expected = split_stream()
    assert MqttParser().feed(data) == expected
    for i in range(len(data) + 1):
        parser = MqttParser()
        assert parser.feed(data[:i]) + parser.feed(data[i:]) == expected, i


def test_split_at_every_pair_of_boundaries_in_the_headers() -> None:
    data, expected = split_stream()
    for i in range(0, 40):
        for j in range(i, len(data), 7):
            parser = MqttParser()
            got = parser.feed(data[:i]) + parser.feed(data[i:j]) + parser.feed(data[j:])
            assert got == expected, (i, j)


def test_one_byte_at_a_time() -> None:
    data, expected = split_stream()
    parser = MqttParser()
    got: list[Packet] = []
    for i in range(len(data)):
        got += parser.feed(data[i : i + 1])
    assert got == expected
    assert parser.feed(b"") == []


def test_bytearray_and_memoryview_input() -> None:
    data, expected = split_stream()
    parser = MqttParser()
    got = parser.feed(bytearray(data[:50])) + parser.feed(memoryview(data)[50:])  # type: ignore[arg-type]
    assert got == expected
    assert all(type(p.payload) is bytes for p in got if isinstance(p, Publish))


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_random_chunking(cuts: list[int]) -> None:
    data, expected = split_stream()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    parser = MqttParser()
    got: list[Packet] = []
    for a, b in itertools.pairwise(bounds):
        got += parser.feed(data[a:b])
    assert got == expected


# --------------------------------------------------------------------------- size limits


def test_too_large_is_refused_from_the_header() -> None:
    parser = connected(max_packet_bytes=100)
    with pytest.raises(PacketTooLarge):
        parser.feed(b"\x30\x65")  # remaining length 101, no body yet
    parser = connected(max_packet_bytes=100)
    assert parser.feed(b"\x30\x64") == []  # 100 is fine: wait for the body


def test_too_large_default_limit_and_varint_split() -> None:
    parser = connected()
    assert parser.feed(b"\x30\xff\xff") == []  # varint incomplete
    with pytest.raises(PacketTooLarge):
        parser.feed(b"\xff\x7f")  # 268435455


def test_too_large_connect() -> None:
    data, _ = split_stream()
    with pytest.raises(PacketTooLarge):
        MqttParser(max_packet_bytes=10).feed(data)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [  # MQTT 3.1.1 table 2.4
        (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"), (2097151, b"\xff\xff\x7f"), (2097152, b"\x80\x80\x80\x01"),
        (268435455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_table(value: int, encoded: bytes) -> None:
    if value >= 3:
        assert publish_header("a", value - 3) == b"\x30" + encoded + b"\x00\x01a"
    parser = connected(max_packet_bytes=MAX_REMAINING_LENGTH)
    if value == 0:
        assert parser.feed(b"\xc0" + encoded) == [PingReq()]
        return
    assert parser.feed(b"\x30" + encoded) == []  # a valid header: waits for the body
    if value <= 16384:
        payload = b"x" * (value - 3)
        assert parser.feed(b"\x00\x01a" + payload) == [Publish("a", payload, 0, False, False, None)]


def test_remaining_length_longer_than_four_bytes() -> None:
    with pytest.raises(MqttError):
        connected().feed(b"\x30\x80\x80\x80\x80\x01")
    with pytest.raises(MqttError):  # detected before the fifth byte arrives
        connected().feed(b"\x30\xff\xff\xff\xff")


# --------------------------------------------------------------------------- malformed packets

PUB_TOPIC = s16("a/b")
MALFORMED = {
    "qos 3": packet(0x36, PUB_TOPIC + b"\x00\x01x"),
    "qos 0 with dup": packet(0x38, PUB_TOPIC + b"x"),
    "publish plus wildcard": packet(0x30, s16("a/+/c") + b"x"),
    "publish hash wildcard": packet(0x32, s16("a/#") + b"\x00\x01x"),
    "publish lone hash": packet(0x30, s16("#")),
    "publish empty topic": packet(0x30, s16("") + b"x"),
    "publish NUL in topic": packet(0x30, s16("a\x00b")),
    "publish invalid utf-8": packet(0x30, s16(b"a\xffb")),
    "publish surrogate": packet(0x30, s16(b"\xed\xa0\x80")),
    "publish overlong utf-8": packet(0x30, s16(b"\xc0\xaf")),
    "publish zero packet id": packet(0x32, PUB_TOPIC + b"\x00\x00x"),
    "publish missing packet id": packet(0x32, PUB_TOPIC + b"\x00"),
    "publish topic overruns": packet(0x30, b"\x00\x09a/b"),
    "publish truncated": packet(0x30, b"\x00"),
    "puback zero id": b"\x40\x02\x00\x00",
    "puback flags": b"\x41\x02\x00\x01",
    "puback long": b"\x40\x03\x00\x01\x00",
    "puback short": b"\x40\x01\x00",
    "pubrec flags": b"\x52\x02\x00\x01",
    "pubrel flags 0": b"\x60\x02\x00\x01",
    "pubcomp zero id": b"\x70\x02\x00\x00",
    "subscribe flags": packet(0x80, b"\x00\x01" + s16("a") + b"\x00"),
    "subscribe no filters": packet(0x82, b"\x00\x01"),
    "subscribe zero id": packet(0x82, b"\x00\x00" + s16("a") + b"\x00"),
    "subscribe qos 3": packet(0x82, b"\x00\x01" + s16("a") + b"\x03"),
    "subscribe reserved qos bits": packet(0x82, b"\x00\x01" + s16("a") + b"\x81"),
    "subscribe missing qos": packet(0x82, b"\x00\x01" + s16("a")),
    "subscribe empty filter": packet(0x82, b"\x00\x01" + s16("") + b"\x00"),
    "subscribe hash not last": packet(0x82, b"\x00\x01" + s16("a/#/b") + b"\x00"),
    "subscribe hash in level": packet(0x82, b"\x00\x01" + s16("a/b#") + b"\x00"),
    "subscribe plus in level": packet(0x82, b"\x00\x01" + s16("a+/b") + b"\x00"),
    "subscribe second filter bad": packet(
        0x82, b"\x00\x01" + s16("a") + b"\x00" + s16("+x") + b"\x01"
    ),
    "unsubscribe flags": packet(0xA0, b"\x00\x01" + s16("a")),
    "unsubscribe no filters": packet(0xA2, b"\x00\x01"),
    "unsubscribe zero id": packet(0xA2, b"\x00\x00" + s16("a")),
    "unsubscribe bad filter": packet(0xA2, b"\x00\x01" + s16("#/a")),
    "pingreq flags": b"\xc1\x00",
    "pingreq body": b"\xc0\x01\x00",
    "disconnect flags": b"\xe2\x00",
    "disconnect body": b"\xe0\x01\x00",
    "connack from client": b"\x20\x02\x00\x00",
    "suback from client": b"\x90\x03\x00\x01\x00",
    "unsuback from client": b"\xb0\x02\x00\x01",
    "pingresp from client": b"\xd0\x00",
    "reserved type 0": b"\x00\x00",
    "reserved type 15": b"\xf0\x00",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(data: bytes) -> None:
    parser = connected()
    with pytest.raises(MqttError):
        parser.feed(data)
    with pytest.raises(MqttError):  # the parser stays failed
        parser.feed(b"\xc0\x00")
    assert parser.closed


def test_error_carries_the_packets_decoded_before_it() -> None:
    parser = connected()
    with pytest.raises(MqttError) as info:
        parser.feed(b"\xc0\x00\x40\x02\x00\x05" + MALFORMED["qos 3"] + b"\xc0\x00")
    assert info.value.packets == [PingReq(), PubAck(5)]


def test_valid_filters() -> None:
    filters = ["#", "+", "+/+", "/+", "sport/+/player1", "sport/#", "+/tennis/#", "a//b", "/",
               "$SYS/#"]
    body = b"\x00\x01" + b"".join(s16(f) + b"\x01" for f in filters)
    [sub] = connected().feed(packet(0x82, body))
    assert sub == Subscribe(1, [(f, 1) for f in filters])


# --------------------------------------------------------------------------- fuzzing

FIRST_BYTES = [0x10, 0x30, 0x31, 0x32, 0x34, 0x3B, 0x40, 0x50, 0x62, 0x70, 0x82, 0xA2, 0xC0,
               0xE0, 0x36, 0x38, 0x41, 0x80, 0xA0, 0x20, 0x00, 0xF0]


@st.composite
def framed_packets(draw: st.DrawFn) -> bytes:
    """Packets with a plausible fixed header and an arbitrary body, to get past the framing."""
    body = draw(st.one_of(
        st.binary(max_size=40),
        st.builds(lambda topic, rest: s16(topic) + rest,
                  st.text(alphabet="ab/+#$\x00\u00e9", max_size=6), st.binary(max_size=8)),
    ))
    return packet(draw(st.sampled_from(FIRST_BYTES)), body)


def feed_split(parser: MqttParser, data: bytes, cut: int) -> None:
    """Feed ``data`` in two chunks: only packets come out, or MqttError."""
    try:
        got = parser.feed(data[:cut])
        got += parser.feed(data[cut:])
    except MqttError:
        return
    for item in got:
        assert isinstance(item, (Publish, PubAck, PubRec, PubRel, PubComp, Subscribe,
                                 Unsubscribe, PingReq, Disconnect))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=200))
def test_fuzz_binary_after_connect(data: bytes, cut: int) -> None:
    feed_split(connected(max_packet_bytes=1000), data, cut)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(framed_packets(), max_size=5).map(b"".join),
       cut=st.integers(min_value=0, max_value=200))
def test_fuzz_framed_packets_after_connect(data: bytes, cut: int) -> None:
    feed_split(connected(max_packet_bytes=1000), data, cut)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=100))
def test_fuzz_before_connect(data: bytes) -> None:
    try:
        MqttParser().feed(data)
    except MqttError:
        pass


# --------------------------------------------------------------------------- encoders

topics = st.text(
    alphabet=st.characters(exclude_characters="+#\x00", exclude_categories=("Cs",)),
    min_size=1, max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(topic=topics, payload=st.binary(max_size=300), qos=st.integers(0, 2),
       mid=st.integers(1, 65535), retain=st.booleans(), dup=st.booleans())
def test_publish_matches_paho_and_round_trips(topic: str, payload: bytes, qos: int, mid: int,
                                               retain: bool, dup: bool) -> None:
    dup = dup and qos > 0
    packet_id = mid if qos else None
    encoded = publish(topic, payload, qos, packet_id, retain, dup)
    assert encoded == PahoWire().publish_bytes(topic, payload, qos, mid, retain, dup)
    assert encoded == publish_header(topic, len(payload), qos, packet_id, retain, dup) + payload
    assert connected().feed(encoded) == [Publish(topic, payload, qos, retain, dup, packet_id)]


async def test_publish_decoded_by_amqtt() -> None:
    payload = b"\x00\x01" * 9000
    for kwargs in ({}, {"qos": 1, "packet_id": 77, "dup": True}, {"qos": 2, "packet_id": 65535},
                   {"retain": True}):
        data = publish("\u6e29\u5ea6/room 1", payload, **kwargs)  # type: ignore[arg-type]
        assert data == PublishPacket.build(
            "\u6e29\u5ea6/room 1", payload, kwargs.get("packet_id"), bool(kwargs.get("dup")),
            int(kwargs.get("qos", 0)), bool(kwargs.get("retain"))).to_bytes()
        pkt = await amqtt_decode(PublishPacket, data)
        assert pkt.topic_name == "\u6e29\u5ea6/room 1"
        assert pkt.data == payload
        assert pkt.qos == kwargs.get("qos", 0)
        assert pkt.packet_id == kwargs.get("packet_id")
        assert pkt.dup_flag == bool(kwargs.get("dup"))
        assert pkt.retain_flag == bool(kwargs.get("retain"))


async def test_acks_decoded_by_amqtt() -> None:
    for code in (0, 1, 2, 3, 4, 5):
        pkt = await amqtt_decode(ConnackPacket, connack(code))
        assert (pkt.return_code, pkt.session_parent) == (code, 0)
        assert connack(code) == ConnackPacket.build(0, code).to_bytes()
    pkt = await amqtt_decode(ConnackPacket, connack(0, session_present=True))
    assert (pkt.return_code, pkt.session_parent) == (0, 1)

    for pid in (1, 10, 256, 65535):
        ack = await amqtt_decode(PubackPacket, puback(pid))
        assert ack.packet_id == pid
        assert puback(pid) == PubackPacket.build(pid).to_bytes()
        unsub = await amqtt_decode(UnsubackPacket, unsuback(pid))
        assert unsub.variable_header.packet_id == pid
        assert unsuback(pid) == UnsubackPacket.build(pid).to_bytes()

    for granted in ([0], [1, 2, 0x80, 0], [0x80] * 200):
        sub = await amqtt_decode(SubackPacket, suback(10, granted))
        assert sub.variable_header.packet_id == 10
        assert sub.payload.return_codes == granted
        assert suback(10, granted) == SubackPacket.build(10, granted).to_bytes()

    await amqtt_decode(PingRespPacket, pingresp())
    assert pingresp() == PingRespPacket.build().to_bytes() == b"\xd0\x00"


def test_encoder_byte_vectors() -> None:
    assert connack(0) == b"\x20\x02\x00\x00"
    assert connack(0, True) == b"\x20\x02\x01\x00"
    assert connack(5) == b"\x20\x02\x00\x05"
    assert puback(10) == b"\x40\x02\x00\x0a"
    assert unsuback(0x1234) == b"\xb0\x02\x12\x34"
    assert suback(10, [0, 1, 2, 0x80]) == b"\x90\x06\x00\x0a\x00\x01\x02\x80"
    assert publish("a/b", b"hi", 1, 10) == b"\x32\x09\x00\x03a/b\x00\x0ahi"
    assert publish("a/b", b"", retain=True) == b"\x31\x05\x00\x03a/b"
    assert publish("a", b"x", 1, 1, dup=True) == b"\x3a\x06\x00\x01a\x00\x01x"


def test_qos0_header_is_shared() -> None:
    assert publish_header("room/1", 30) == publish_header("room/1", 30)
    assert publish_header("room/1", 30, 1, 5) != publish_header("room/1", 30, 1, 6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: connack(6),
        lambda: connack(-1),
        lambda: connack(1, session_present=True),
        lambda: puback(0),
        lambda: puback(65536),
        lambda: unsuback(0),
        lambda: suback(1, []),
        lambda: suback(1, [3]),
        lambda: suback(0, [0]),
        lambda: publish("a/+", b""),
        lambda: publish("a/#", b""),
        lambda: publish("", b""),
        lambda: publish("a\x00", b""),
        lambda: publish("\ud800", b""),
        lambda: publish("a" * 65536, b""),
        lambda: publish("a", b"", qos=3, packet_id=1),
        lambda: publish("a", b"", qos=1),
        lambda: publish("a", b"", qos=1, packet_id=0),
        lambda: publish("a", b"", qos=0, packet_id=1),
        lambda: publish("a", b"", dup=True),
        lambda: publish_header("a", -1),
        lambda: publish_header("a", MAX_REMAINING_LENGTH),
    ],
)
def test_encoder_argument_errors(call: Any) -> None:
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------- topic matching

MATCHES = [
    # MQTT 3.1.1 section 4.7 examples
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("sport/tennis/#", "sport/tennis", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/player1", True),
    # empty levels
    ("a/+/c", "a//c", True),
    ("+/+/+", "//", True),
    ("+", "a", True),
    # plain filters
    ("a/b", "a/b", True),
    ("a/b", "A/b", False),
    ("a/b", "a/b/", False),
    ("a/b/", "a/b", False),
    ("a/#", "b", False),
    ("a/b/#", "a", False),
    ("a/+", "b/c", False),
    # $-topics
    ("#", "$SYS/broker/uptime", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("+", "$SYS", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS", "$SYS", True),
    ("a/$x/#", "a/$x/y", True),
    ("+/$x", "a/$x", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHES)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


level = st.sampled_from(["a", "b", "", "$s", "ab"])
filter_level = st.sampled_from(["a", "b", "", "$s", "+"])


@settings(max_examples=500, deadline=None)
@given(
    filter_levels=st.lists(filter_level, min_size=1, max_size=4),
    hash_tail=st.booleans(),
    topic_levels=st.lists(level, min_size=1, max_size=5),
)
def test_topic_matches_agrees_with_paho(filter_levels: list[str], hash_tail: bool,
                                        topic_levels: list[str]) -> None:
    topic_filter = "/".join([*filter_levels, "#"] if hash_tail else filter_levels)
    topic = "/".join(topic_levels)
    if not topic or not topic_filter:
        return
    assert topic_matches(topic_filter, topic) == paho.topic_matches_sub(topic_filter, topic)
