"""Sans-I/O MQTT 3.1.1 server-side codec: client packets in, server packets out.

The parser never touches a socket or an event loop. The bridge hands every chunk it reads to
:meth:`MqttParser.feed`, which returns the complete packets it holds and keeps the rest
buffered. The encoders are plain functions that return the bytes to write. This mirrors the
``receive_data`` / ``events_received`` / ``data_to_send`` split of websockets' sans-I/O
protocol, with ``feed`` doing the first two at once and the encoders the third.

Any protocol violation raises :class:`MqttError` (and nothing else); the connection must then
be closed. Two subclasses tell the caller more: :class:`PacketTooLarge`, and
:class:`ConnectRefused`, whose ``return_code`` the server should send in a CONNACK before it
closes (MQTT 3.1.1 section 3.1.4: unacceptable protocol level, identifier rejected).

The hot paths (decoding PUBLISH and PUBACK, encoding PUBACK and PUBLISH) are written for
CPython speed: byte indexing and slicing, no per-byte loops except for the remaining-length
varint, ``__slots__`` packet classes, and small caches of validated topic names.
"""

from __future__ import annotations

import struct
from typing import ClassVar, TypeAlias

__all__ = [
    "MAX_REMAINING_LENGTH",
    "Connect",
    "ConnectRefused",
    "Disconnect",
    "MqttError",
    "MqttParser",
    "Packet",
    "PacketTooLarge",
    "PingReq",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "Subscribe",
    "Unsubscribe",
    "Will",
    "connack",
    "pingresp",
    "puback",
    "publish",
    "publish_header",
    "suback",
    "topic_matches",
    "unsuback",
]

MAX_REMAINING_LENGTH = 268_435_455
"""The largest remaining length a 4-byte varint can carry (MQTT 3.1.1 section 2.2.3)."""

_TOPIC_CACHE_SIZE = 1024  # topic names kept encoded by the PUBLISH encoders (process-wide)
_PARSER_TOPICS = 64  # topic names kept decoded per connection
_PARSER_TOPIC_BYTES = 256  # longer topic names are decoded every time


# --------------------------------------------------------------------------- errors


class MqttError(Exception):
    """A protocol violation: the connection must be closed.

    Attributes:
        packets: The packets decoded by the same :meth:`MqttParser.feed` call before the
            violation, in order. A server may act on them (as a broker reading the stream
            packet by packet would have) before it closes the connection.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.packets: list[Packet] = []


class PacketTooLarge(MqttError):
    """A packet's remaining length exceeds the parser's ``max_packet_bytes``."""


class ConnectRefused(MqttError):
    """A CONNECT the server must answer with a refusing CONNACK before closing.

    Attributes:
        return_code: The CONNACK return code to send: 1 (unacceptable protocol level) or
            2 (identifier rejected).
    """

    def __init__(self, return_code: int, message: str) -> None:
        super().__init__(message)
        self.return_code = return_code


# --------------------------------------------------------------------------- packets


class _Packet:
    """Base of the decoded packets: slots, value equality, a readable repr."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args})"


class Will(_Packet):
    """The last will carried by a CONNECT.

    Attributes:
        topic: The will topic (a valid topic name).
        payload: The will message.
        qos: 0, 1 or 2.
        retain: Whether the will is published retained.
    """

    __slots__ = ("payload", "qos", "retain", "topic")
    __match_args__ = ("topic", "payload", "qos", "retain")
    _fields = __match_args__

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain


class Connect(_Packet):
    """CONNECT.

    Attributes:
        client_id: The client identifier (empty only when ``clean_session``).
        username: The user name, or None when the flag is unset.
        password: The password, or None when the flag is unset.
        keepalive: The keep-alive interval in seconds (0 disables it).
        clean_session: The Clean Session flag.
        will: The last will, or None.
        protocol_level: 4 (MQTT 3.1.1) or 3 (MQIsdp, MQTT 3.1).
    """

    __slots__ = (
        "clean_session",
        "client_id",
        "keepalive",
        "password",
        "protocol_level",
        "username",
        "will",
    )
    __match_args__ = (
        "client_id",
        "username",
        "password",
        "keepalive",
        "clean_session",
        "will",
        "protocol_level",
    )
    _fields = __match_args__

    def __init__(
        self,
        client_id: str,
        username: str | None,
        password: bytes | None,
        keepalive: int,
        clean_session: bool,
        will: Will | None,
        protocol_level: int,
    ) -> None:
        self.client_id = client_id
        self.username = username
        self.password = password
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.will = will
        self.protocol_level = protocol_level


class Publish(_Packet):
    """PUBLISH.

    Attributes:
        topic: The topic name (no wildcards, not empty).
        payload: The application message.
        qos: 0, 1 or 2.
        retain: The RETAIN flag.
        dup: The DUP flag (always False for QoS 0).
        packet_id: The packet identifier (1-65535) for QoS 1 and 2, None for QoS 0.
    """

    __slots__ = ("dup", "packet_id", "payload", "qos", "retain", "topic")
    __match_args__ = ("topic", "payload", "qos", "retain", "dup", "packet_id")
    _fields = __match_args__

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        dup: bool,
        packet_id: int | None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id


class _PacketId(_Packet):
    __slots__ = ("packet_id",)
    __match_args__ = ("packet_id",)
    _fields = __match_args__

    def __init__(self, packet_id: int) -> None:
        self.packet_id = packet_id


class PubAck(_PacketId):
    """PUBACK: the client acknowledges one of our QoS 1 PUBLISH packets."""

    __slots__ = ()


class PubRec(_PacketId):
    """PUBREC (QoS 2, step 1)."""

    __slots__ = ()


class PubRel(_PacketId):
    """PUBREL (QoS 2, step 2)."""

    __slots__ = ()


class PubComp(_PacketId):
    """PUBCOMP (QoS 2, step 3)."""

    __slots__ = ()


class Subscribe(_Packet):
    """SUBSCRIBE.

    Attributes:
        packet_id: The packet identifier (1-65535).
        topics: ``(filter, requested_qos)`` pairs, at least one, filters validated.
    """

    __slots__ = ("packet_id", "topics")
    __match_args__ = ("packet_id", "topics")
    _fields = __match_args__

    def __init__(self, packet_id: int, topics: list[tuple[str, int]]) -> None:
        self.packet_id = packet_id
        self.topics = topics


class Unsubscribe(_Packet):
    """UNSUBSCRIBE.

    Attributes:
        packet_id: The packet identifier (1-65535).
        topics: The topic filters, at least one, validated.
    """

    __slots__ = ("packet_id", "topics")
    __match_args__ = ("packet_id", "topics")
    _fields = __match_args__

    def __init__(self, packet_id: int, topics: list[str]) -> None:
        self.packet_id = packet_id
        self.topics = topics


class PingReq(_Packet):
    """PINGREQ."""

    __slots__ = ()
    __match_args__ = ()


class Disconnect(_Packet):
    """DISCONNECT: a clean close; the server must discard the will."""

    __slots__ = ()
    __match_args__ = ()


Packet: TypeAlias = (
    Connect | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | Unsubscribe
    | PingReq | Disconnect
)
"""Any packet :meth:`MqttParser.feed` returns."""


# --------------------------------------------------------------------------- validation


def _check_topic_name(topic: str) -> None:
    if not topic:
        raise MqttError("empty topic name")
    if "+" in topic or "#" in topic:
        raise MqttError(f"wildcard in topic name {topic!r}")


def _check_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise MqttError("empty topic filter")
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "+" or (level == "#" and i == last):
            continue
        if "+" in level or "#" in level:
            raise MqttError(f"misplaced wildcard in topic filter {topic_filter!r}")


def _decode_utf8(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MqttError("invalid UTF-8 string") from exc
    if "\x00" in text:
        raise MqttError("U+0000 in a UTF-8 string")
    return text


def _read_str(body: bytes, pos: int) -> tuple[str, int]:
    raw, end = _read_bin(body, pos)
    return _decode_utf8(raw), end


def _read_bin(body: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(body):
        raise MqttError("truncated length-prefixed field")
    end = pos + 2 + ((body[pos] << 8) | body[pos + 1])
    if end > len(body):
        raise MqttError("length-prefixed field overruns the packet")
    return body[pos + 2 : end], end


def _packet_id(body: bytes, pos: int) -> int:
    if pos + 2 > len(body):
        raise MqttError("truncated packet identifier")
    packet_id = (body[pos] << 8) | body[pos + 1]
    if not packet_id:
        raise MqttError("packet identifier 0")
    return packet_id


# --------------------------------------------------------------------------- decoding


def _decode_connect(b0: int, body: bytes) -> Connect:
    if b0 != 0x10:
        raise MqttError("reserved flags set in CONNECT")
    name, p = _read_str(body, 0)
    if p + 4 > len(body):
        raise MqttError("truncated CONNECT variable header")
    level = body[p]
    flags = body[p + 1]
    keepalive = (body[p + 2] << 8) | body[p + 3]
    p += 4
    if name == "MQTT":
        if level != 4:
            raise ConnectRefused(1, f"unsupported protocol level {level}")
    elif name == "MQIsdp":
        if level != 3:
            raise ConnectRefused(1, f"unsupported MQIsdp protocol level {level}")
    else:
        raise MqttError(f"unknown protocol name {name!r}")
    if flags & 0x01:
        raise MqttError("reserved CONNECT flag set")
    clean_session = bool(flags & 0x02)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if flags & 0x04:
        if will_qos == 3:
            raise MqttError("will QoS 3")
    elif will_qos or will_retain:
        raise MqttError("will QoS or retain set without the will flag")
    if flags & 0x40 and not flags & 0x80:
        raise MqttError("password flag set without the user name flag")
    client_id, p = _read_str(body, p)
    will = None
    if flags & 0x04:
        will_topic, p = _read_str(body, p)
        _check_topic_name(will_topic)
        will_payload, p = _read_bin(body, p)
        will = Will(will_topic, will_payload, will_qos, will_retain)
    username = None
    password = None
    if flags & 0x80:
        username, p = _read_str(body, p)
    if flags & 0x40:
        password, p = _read_bin(body, p)
    if p != len(body):
        raise MqttError("trailing bytes in CONNECT")
    if not client_id and not clean_session:
        raise ConnectRefused(2, "empty client id requires clean session")
    return Connect(client_id, username, password, keepalive, clean_session, will, level)


def _decode_subscribe(b0: int, body: bytes) -> Subscribe:
    if b0 != 0x82:
        raise MqttError("reserved flags wrong in SUBSCRIBE")
    packet_id = _packet_id(body, 0)
    topics: list[tuple[str, int]] = []
    p = 2
    n = len(body)
    while p < n:
        topic_filter, p = _read_str(body, p)
        _check_filter(topic_filter)
        if p >= n:
            raise MqttError("SUBSCRIBE filter without requested QoS")
        qos = body[p]
        if qos > 2:
            raise MqttError(f"invalid requested QoS byte {qos:#x}")
        topics.append((topic_filter, qos))
        p += 1
    if not topics:
        raise MqttError("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, topics)


def _decode_unsubscribe(b0: int, body: bytes) -> Unsubscribe:
    if b0 != 0xA2:
        raise MqttError("reserved flags wrong in UNSUBSCRIBE")
    packet_id = _packet_id(body, 0)
    topics: list[str] = []
    p = 2
    n = len(body)
    while p < n:
        topic_filter, p = _read_str(body, p)
        _check_filter(topic_filter)
        topics.append(topic_filter)
    if not topics:
        raise MqttError("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, topics)


_ACK_TYPES: dict[int, type[PubAck | PubRec | PubRel | PubComp]] = {
    0x40: PubAck,
    0x50: PubRec,
    0x62: PubRel,
    0x70: PubComp,
}


def _decode_other(b0: int, body: bytes) -> Packet:
    """Decode any client packet but CONNECT and PUBLISH (not on the hot path)."""
    ptype = b0 & 0xF0
    if 0x40 <= ptype <= 0x70:
        cls = _ACK_TYPES.get(b0)
        if cls is None:
            raise MqttError(f"reserved flags wrong in packet type {ptype >> 4}")
        if len(body) != 2:
            raise MqttError(f"remaining length {len(body)} in packet type {ptype >> 4}")
        return cls(_packet_id(body, 0))
    if ptype == 0x80:
        return _decode_subscribe(b0, body)
    if ptype == 0xA0:
        return _decode_unsubscribe(b0, body)
    if ptype == 0xC0 or ptype == 0xE0:
        if b0 & 0x0F:
            raise MqttError(f"reserved flags set in packet type {ptype >> 4}")
        if body:
            raise MqttError(f"non-zero remaining length in packet type {ptype >> 4}")
        return PingReq() if ptype == 0xC0 else Disconnect()
    raise MqttError(f"packet type {ptype >> 4} is not sent by clients")


def _varint(data: bytes, pos: int, n: int) -> tuple[int, int]:
    """Decode a remaining length of 2 to 4 bytes starting at ``data[pos]``.

    Returns:
        ``(remaining_length, index after it)``, or ``(-1, 0)`` when more bytes are needed.

    Raises:
        MqttError: The varint is longer than 4 bytes.
    """
    value = 0
    shift = 0
    for i in range(pos, pos + 4):
        if i >= n:
            return -1, 0
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise MqttError("remaining length longer than 4 bytes")


_OPEN = 0
_DISCONNECTED = 1
_FAILED = 2


class MqttParser:
    """Incremental decoder of the packets a client sends to the server.

    The first packet must be CONNECT and a second one is a violation. After DISCONNECT the
    parser stops: the rest of that chunk and any later data are ignored. After an
    :class:`MqttError` the parser is failed and every later :meth:`feed` raises again.

    Args:
        max_packet_bytes: The largest remaining length accepted; a packet announcing more is
            refused from its fixed header, before its body is buffered.
    """

    __slots__ = ("_chunks", "_connected", "_have", "_max", "_need", "_state", "_topics")

    def __init__(self, max_packet_bytes: int = 1 << 20) -> None:
        self._max = max_packet_bytes
        self._state = _OPEN
        self._connected = False
        self._chunks: list[bytes] = []
        self._have = 0  # bytes held in _chunks
        self._need = 0  # bytes the incomplete packet needs in all, 0 when not known yet
        self._topics: dict[bytes, str] = {}

    @property
    def connected(self) -> bool:
        """Whether the CONNECT has been received."""
        return self._connected

    @property
    def closed(self) -> bool:
        """Whether the parser stopped, after a DISCONNECT or a protocol violation."""
        return self._state != _OPEN

    def feed(self, data: bytes) -> list[Packet]:
        """Add received bytes and return every packet they complete, in order.

        Args:
            data: The next bytes read from the connection (any split is fine).

        Returns:
            The complete packets; the bytes of an incomplete one stay buffered.

        Raises:
            PacketTooLarge: A remaining length exceeds ``max_packet_bytes``.
            ConnectRefused: The CONNECT must be refused with the CONNACK code it carries.
            MqttError: Any other protocol violation; the connection must be closed.
        """
        if self._state != _OPEN:
            if self._state == _DISCONNECTED:
                return []
            raise MqttError("the parser failed on an earlier protocol violation")
        if type(data) is not bytes:
            data = bytes(data)
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks = []
        elif not data:
            return []
        out: list[Packet] = []
        try:
            self._parse(data, out)
        except MqttError as exc:
            self._state = _FAILED
            exc.packets = out
            raise
        return out

    def _parse(self, data: bytes, out: list[Packet]) -> None:
        n = len(data)
        pos = 0
        max_len = self._max
        connected = self._connected
        topics = self._topics
        append = out.append
        need = 0  # length of the incomplete packet at pos, 0 while its header is incomplete
        while pos < n:
            if pos + 1 >= n:
                break
            b0 = data[pos]
            rl = data[pos + 1]
            if rl < 0x80:
                start = pos + 2
            else:
                rl, start = _varint(data, pos + 1, n)
                if rl < 0:
                    break
            if rl > max_len:
                raise PacketTooLarge(f"remaining length {rl} exceeds {max_len}")
            end = start + rl
            if end > n:
                need = end - pos
                break
            ptype = b0 >> 4
            if ptype == 3:  # PUBLISH: the hot path, inlined
                if not connected:
                    raise MqttError("PUBLISH before CONNECT")
                if rl < 2:
                    raise MqttError("truncated PUBLISH")
                p = start + 2 + ((data[start] << 8) | data[start + 1])
                if p > end:
                    raise MqttError("PUBLISH topic overruns the packet")
                raw = data[start + 2 : p]
                topic = topics.get(raw)
                if topic is None:
                    topic = _decode_utf8(raw)
                    _check_topic_name(topic)
                    if len(raw) <= _PARSER_TOPIC_BYTES:
                        if len(topics) >= _PARSER_TOPICS:
                            topics.clear()
                        topics[raw] = topic
                qos = (b0 >> 1) & 0x03
                if qos:
                    if qos == 3:
                        raise MqttError("PUBLISH with QoS 3")
                    if p + 2 > end:
                        raise MqttError("PUBLISH without packet identifier")
                    packet_id: int | None = (data[p] << 8) | data[p + 1]
                    if not packet_id:
                        raise MqttError("PUBLISH with packet identifier 0")
                    p += 2
                else:
                    if b0 & 0x08:
                        raise MqttError("DUP flag set on a QoS 0 PUBLISH")
                    packet_id = None
                append(Publish(topic, data[p:end], qos, bool(b0 & 1), bool(b0 & 8), packet_id))
            elif b0 == 0x40 and rl == 2:  # PUBACK: hot when we publish QoS 1
                if not connected:
                    raise MqttError("PUBACK before CONNECT")
                packet_id = (data[start] << 8) | data[start + 1]
                if not packet_id:
                    raise MqttError("PUBACK with packet identifier 0")
                append(PubAck(packet_id))
            elif ptype == 1:
                if connected:
                    raise MqttError("second CONNECT")
                append(_decode_connect(b0, data[start:end]))
                connected = self._connected = True
            elif not connected:
                raise MqttError(f"packet type {ptype} before CONNECT")
            else:
                packet = _decode_other(b0, data[start:end])
                append(packet)
                if type(packet) is Disconnect:
                    self._state = _DISCONNECTED
                    self._need = 0
                    return
            pos = end
        else:
            self._need = 0
            return
        # An incomplete packet starts at pos: keep it, and its length when known.
        rest = data[pos:]
        self._chunks = [rest]
        self._have = len(rest)
        self._need = need


# --------------------------------------------------------------------------- encoding

_RL1 = [bytes((i,)) for i in range(0x80)]
_ACK = struct.Struct(">BBH")
_PINGRESP = b"\xd0\x00"
_CONNACKS = {
    (code, present): bytes((0x20, 0x02, int(present), code))
    for code in range(6)
    for present in (False, True)
    if not (present and code)
}
_PUBLISH_FIRST = [bytes((0x30 | i,)) for i in range(16)]
_SUBACK_CODES = frozenset((0, 1, 2, 0x80))
_topic_prefixes: dict[str, bytes] = {}


def _remaining_length(n: int) -> bytes:
    if n < 0x80:
        return _RL1[n]
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {n} exceeds {MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _topic_prefix(topic: str) -> bytes:
    """The length-prefixed UTF-8 encoding of a topic name, validated and cached."""
    try:
        _check_topic_name(topic)
        if "\x00" in topic:
            raise MqttError("U+0000 in topic name")
        raw = topic.encode("utf-8")
    except (MqttError, UnicodeEncodeError) as exc:
        raise ValueError(f"invalid topic name {topic!r}: {exc}") from None
    if len(raw) > 0xFFFF:
        raise ValueError("topic name longer than 65535 bytes")
    prefix = len(raw).to_bytes(2, "big") + raw
    if len(_topic_prefixes) >= _TOPIC_CACHE_SIZE:
        _topic_prefixes.clear()
    _topic_prefixes[topic] = prefix
    return prefix


def _check_packet_id(packet_id: int) -> None:
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} outside 1-65535")


def connack(return_code: int, session_present: bool = False) -> bytes:
    """Encode CONNACK.

    Args:
        return_code: 0 accepted, 1 unacceptable protocol version, 2 identifier rejected,
            3 server unavailable, 4 bad user name or password, 5 not authorized.
        session_present: The Session Present flag (only with return code 0).

    Raises:
        ValueError: Unknown return code, or ``session_present`` with a refusal.
    """
    try:
        return _CONNACKS[return_code, bool(session_present)]
    except KeyError:
        raise ValueError(
            f"invalid CONNACK return code {return_code} / session_present {session_present}"
        ) from None


def puback(packet_id: int) -> bytes:
    """Encode PUBACK for a client's QoS 1 PUBLISH.

    Raises:
        ValueError: ``packet_id`` is outside 1-65535.
    """
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} outside 1-65535")
    return _ACK.pack(0x40, 2, packet_id)


def suback(packet_id: int, granted: list[int]) -> bytes:
    """Encode SUBACK.

    Args:
        packet_id: The SUBSCRIBE's packet identifier.
        granted: One return code per requested filter, in order: the granted QoS (0-2) or
            0x80 for a refused filter.

    Raises:
        ValueError: Bad packet identifier, empty ``granted`` or an invalid return code.
    """
    _check_packet_id(packet_id)
    if not granted:
        raise ValueError("SUBACK needs at least one return code")
    for code in granted:
        if code not in _SUBACK_CODES:
            raise ValueError(f"invalid SUBACK return code {code!r}")
    return b"".join(
        (b"\x90", _remaining_length(2 + len(granted)), packet_id.to_bytes(2, "big"), bytes(granted))
    )


def unsuback(packet_id: int) -> bytes:
    """Encode UNSUBACK.

    Raises:
        ValueError: ``packet_id`` is outside 1-65535.
    """
    _check_packet_id(packet_id)
    return _ACK.pack(0xB0, 2, packet_id)


def pingresp() -> bytes:
    """Encode PINGRESP."""
    return _PINGRESP


def publish_header(
    topic: str,
    payload_len: int,
    qos: int = 0,
    packet_id: int | None = None,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """Encode everything of a PUBLISH but its payload.

    ``publish_header(...) + payload`` is the whole packet, so a payload encoded once can be
    sent to many clients with only the header built per client. For QoS 0 the header depends
    on the topic and payload length only, so one header serves every subscriber.

    Args:
        topic: The topic name (no wildcards, not empty).
        payload_len: The payload length in bytes.
        qos: 0, 1 or 2.
        packet_id: Required (1-65535) for QoS 1 and 2, None for QoS 0.
        retain: The RETAIN flag (MQTT-3.3.1-9: False when forwarding to a subscription).
        dup: The DUP flag (redelivery of a QoS 1 or 2 message).

    Raises:
        ValueError: Invalid topic, QoS, packet identifier, flag combination or length.
    """
    prefix = _topic_prefixes.get(topic)
    if prefix is None:
        prefix = _topic_prefix(topic)
    if qos == 0:
        if packet_id is not None or dup:
            raise ValueError("QoS 0 PUBLISH takes neither a packet identifier nor DUP")
        if payload_len < 0:
            raise ValueError("negative payload length")
        return b"".join(
            (
                _PUBLISH_FIRST[retain],
                _remaining_length(len(prefix) + payload_len),
                prefix,
            )
        )
    if qos != 1 and qos != 2:
        raise ValueError(f"invalid QoS {qos!r}")
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"QoS {qos} PUBLISH needs a packet identifier in 1-65535")
    if payload_len < 0:
        raise ValueError("negative payload length")
    return b"".join(
        (
            _PUBLISH_FIRST[(dup << 3) | (qos << 1) | retain],
            _remaining_length(len(prefix) + 2 + payload_len),
            prefix,
            packet_id.to_bytes(2, "big"),
        )
    )


def publish(
    topic: str,
    payload: bytes,
    qos: int = 0,
    packet_id: int | None = None,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """Encode a whole PUBLISH.

    Args:
        topic: The topic name (no wildcards, not empty).
        payload: The application message.
        qos: 0, 1 or 2.
        packet_id: Required (1-65535) for QoS 1 and 2, None for QoS 0.
        retain: The RETAIN flag.
        dup: The DUP flag.

    Raises:
        ValueError: As :func:`publish_header`.
    """
    return publish_header(topic, len(payload), qos, packet_id, retain, dup) + payload


# --------------------------------------------------------------------------- matching


def topic_matches(filter: str, topic: str) -> bool:
    """Whether a topic name matches a topic filter (MQTT 3.1.1 section 4.7).

    ``+`` matches exactly one level (possibly empty), ``#`` the parent level and any number
    of child levels (``sport/#`` matches ``sport``). Topics starting with ``$`` are not
    matched by a filter starting with a wildcard.

    Args:
        filter: A valid topic filter.
        topic: A valid topic name.
    """
    if topic[:1] == "$" and filter[:1] in ("+", "#"):
        return False
    if "+" not in filter and "#" not in filter:
        return filter == topic
    filter_levels = filter.split("/")
    topic_levels = topic.split("/")
    n_topic = len(topic_levels)
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= n_topic:
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == n_topic
