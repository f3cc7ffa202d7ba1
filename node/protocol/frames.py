"""Frames and codecs of PROTOCOL.md section 1. Pure: data in, data out, no I/O.

Client frames are validated strictly at the edge (:func:`parse_frame`) and passed inward as
typed objects. Node frames are plain dicts built by small functions, encoded once per codec.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol, get_args

import cbor2
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from node.protocol.errors import CodecError, ProtocolError
from node.protocol.values import FRAME_MAX_DEPTH, has_lone_surrogate, has_long_digits, to_safe

__all__ = [
    "CBOR",
    "CODECS",
    "JSON",
    "MIN_FRAME_BYTES",
    "REWIND_MAX",
    "ROOM_RE",
    "SEQ_MAX",
    "STATE_CHUNK_BYTES",
    "Ack",
    "ClientFrame",
    "Codec",
    "Connect",
    "History",
    "Join",
    "Leave",
    "Ping",
    "Presence",
    "Publish",
    "Refresh",
    "Reply",
    "RequestId",
    "Rpc",
    "Since",
    "error_frame",
    "is_reply",
    "json_loads_strict",
    "parse_frame",
    "publish_frame",
    "request_id_of",
    "salvage_frames",
    "state_frame",
    "state_frames",
]

# For pydantic, whose (Rust) regex engine matches ``$`` only at the very end of the text.
ROOM_PATTERN = r"^[A-Za-z0-9_:@=-]{1,128}$"
EVENT_PATTERN = r"^[A-Za-z0-9_:.@=/-]{1,128}$"
#: Room names for Python code: Python's ``$`` also matches before a trailing newline, so the
#: pattern ends in ``\Z``; use it with ``fullmatch``.
ROOM_RE = re.compile(r"[A-Za-z0-9_:@=-]{1,128}\Z")
#: The largest seq a client may name (``since``, ``ack``): JetStream counts in uint64, but a
#: stream never comes near 2**63, and the store reads from ``since + 1``, which must fit.
SEQ_MAX = 2**63 - 1
#: The most events a ``join`` with ``rewind`` replays (as many as one ``history`` page).
REWIND_MAX = 1000

RequestId = Annotated[StrictStr, Field(min_length=1, max_length=64)] | StrictInt
RoomName = Annotated[StrictStr, Field(pattern=ROOM_PATTERN)]
EventName = Annotated[StrictStr, Field(pattern=EVENT_PATTERN)]
Seq = Annotated[StrictInt, Field(ge=0, le=SEQ_MAX)]
#: A state room's key: 1 to 128 characters, none of them a control character (C0, DEL, C1).
STATE_KEY_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{1,128}$"
StateKey = Annotated[StrictStr, Field(pattern=STATE_KEY_PATTERN)]


class _Frame(BaseModel):
    # Unknown fields are ignored (newer clients may send more); known ones are strict.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    id: RequestId | None = None


class Since(BaseModel):
    """A recovery position: the last seq processed, and the epoch it belongs to."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    seq: Seq
    epoch: StrictStr | None = Field(default=None, max_length=64)


class ClientInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    name: StrictStr | None = Field(default=None, max_length=64)
    version: StrictStr | None = Field(default=None, max_length=64)


class Connect(_Frame):
    type: Literal["connect"]
    token: StrictStr = Field(max_length=8192)
    client: ClientInfo | None = None


class Join(_Frame):
    type: Literal["join"]
    room: RoomName
    since: Since | None = None
    presence: StrictBool = False
    #: Replay the room's last ``rewind`` stored events, then go live (not with ``since``).
    rewind: StrictInt | None = Field(default=None, ge=1, le=REWIND_MAX)


class Leave(_Frame):
    type: Literal["leave"]
    room: RoomName


class Publish(_Frame):
    type: Literal["publish"]
    room: RoomName
    event: EventName
    data: Any = None
    msg_id: StrictStr | None = Field(default=None, min_length=1, max_length=128)
    #: The key this event sets in a state room (default: the publisher's sub); only there.
    key: StateKey | None = None
    #: Remove ``key`` from the room's state (no ``data``); only in a state room.
    unset: StrictBool = False


class History(_Frame):
    type: Literal["history"]
    room: RoomName
    since: Since | None = None
    limit: StrictInt = Field(default=100, ge=1, le=1000)
    reverse: StrictBool = False


class Presence(_Frame):
    type: Literal["presence"]
    room: RoomName


class Rpc(_Frame):
    type: Literal["rpc"]
    to: StrictStr = Field(pattern=r"^(server|(user|device|client):[^\s.*>]{1,128})$")
    method: StrictStr = Field(min_length=1, max_length=128)
    params: Any = None
    timeout_ms: StrictInt = Field(default=5000, ge=1, le=60000)


class ReplyError(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    code: StrictInt
    reason: StrictStr = Field(max_length=512)


class Reply(_Frame):
    type: Literal["reply"]
    id: RequestId
    result: Any = None
    error: ReplyError | None = None


class Ack(_Frame):
    type: Literal["ack"]
    room: RoomName
    seq: Seq


class Refresh(_Frame):
    type: Literal["refresh"]
    token: StrictStr = Field(max_length=8192)


class Ping(_Frame):
    type: Literal["ping"]


ClientFrame = Annotated[
    Connect | Join | Leave | Publish | History | Presence | Rpc | Reply | Ack | Refresh | Ping,
    Field(discriminator="type"),
]


def _validator(model: type[BaseModel]) -> Callable[[Any], Any]:
    """``model.model_validate`` without its Python wrapper (~0.4 us a frame): the model's
    own validator, which ``model_validate`` calls with every option left at None."""
    assert model.__pydantic_complete__, model  # else its validator is a placeholder
    return model.__pydantic_validator__.validate_python


# Each frame type's own validation, picked by its ``type``: the same checks and errors as the
# union's (less the tag in the error's location), ~1.5 us a frame sooner
# (tests/unit/test_frame_validation.py holds it to the union).
_BY_TYPE: dict[str, Callable[[Any], Any]] = {
    model.model_fields["type"].annotation.__args__[0]: _validator(model)
    for model in get_args(get_args(ClientFrame)[0])
}


def is_reply(raw: object) -> bool:
    """Whether a raw frame says it is a ``reply`` (for errors about invalid frames: an invalid
    reply fails the rpc it answers)."""
    return isinstance(raw, dict) and raw.get("type") == "reply"


def request_id_of(raw: object) -> str | int | None:
    """The ``id`` of a raw frame, if it is a valid one (for errors about invalid frames)."""
    if isinstance(raw, dict):
        rid = raw.get("id")
        if (isinstance(rid, str) and 0 < len(rid) <= 64) or (
            isinstance(rid, int) and not isinstance(rid, bool)
        ):
            return rid
    return None


def parse_frame(raw: object) -> ClientFrame:
    """Validate one decoded client frame.

    Raises:
        ProtocolError: 4000 with a one-line reason naming the bad field.
    """
    if not isinstance(raw, dict):
        raise ProtocolError(4000, "a frame must be a map")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(4000, "frame has no type")
    validate = _BY_TYPE.get(kind)
    if validate is None:
        raise ProtocolError(4000, f"unknown frame type {kind[:32]!r}")
    try:
        frame: ClientFrame = validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        loc = [str(p) for p in err["loc"]] or ["frame"]
        raise ProtocolError(4000, f"bad field {'.'.join(loc)}: {err['msg']}") from None
    return frame


def publish_frame(fields: dict[str, Any], room: str | None = None) -> Publish:
    """A ``publish`` from the fields of a map {room, event, data, msg_id?, key?, unset?} that is
    not a frame: a plain MQTT uplink (whose room is in its topic), an HTTP API body, a broker
    uplink.

    Raises:
        ProtocolError: 4000 with a one-line reason naming the bad field.
    """
    raw = {"type": "publish", "room": fields.get("room") if room is None else room,
           "event": fields.get("event"), "data": fields.get("data"),
           "msg_id": fields.get("msg_id")}
    for name in ("key", "unset"):  # only when present, as in a frame
        if name in fields:
            raw[name] = fields[name]
    frame = parse_frame(raw)
    assert isinstance(frame, Publish)
    return frame


def state_frame(room: str, values: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``state`` frame sent right after ``joined`` of a state room: its current values,
    the stored event maps (with ``seq`` and ``key``), ordered by key."""
    return {"type": "state", "room": room, "values": values}


#: About how many bytes of values one ``state`` frame carries (their CBOR size): a room of
#: 10,000 keys is ~30 frames of 64 KB, which every client and the MQTT tunnel take, rather than
#: one of 2 MB.
STATE_CHUNK_BYTES = 64 * 1024


def state_frames(room: str, values: list[dict[str, Any]],
                 chunk_bytes: int = STATE_CHUNK_BYTES) -> list[dict[str, Any]]:
    """The ``state`` frames of a room's values: one, or several of about ``chunk_bytes`` each,
    all but the last with ``more: true`` (a value is never split; an empty state is one frame
    with no values)."""
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for value in values:
        n = len(CBOR.encode(value))
        if chunks[-1] and size + n > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(value)
        size += n
    frames = [state_frame(room, chunk) for chunk in chunks]
    for frame in frames[:-1]:
        frame["more"] = True
    return frames


def error_frame(
    code: int, reason: str, *, id: str | int | None = None, retry: bool = False
) -> dict[str, Any]:
    """An ``error`` frame."""
    frame: dict[str, Any] = {"type": "error", "code": code, "reason": reason, "retry": retry}
    if id is not None:
        frame["id"] = id
    return frame


# ---------------------------------------------------------------------------------------------
# Codecs


class Codec(Protocol):
    """Turns WebSocket messages into frames and frames into bytes."""

    name: str
    binary: bool

    def decode(self, data: bytes | str, max_frames: int | None = None) -> list[Any]:
        """Every frame of one message, in order. Raises CodecError, also for a message of
        more than ``max_frames`` frames (if given)."""

    def encode(self, frame: Any) -> bytes:
        """One frame, ready to be joined with others of the same message."""

    def join(self, frames: list[bytes]) -> bytes:
        """Several encoded frames as one message."""


def _json_default(value: object) -> object:
    # The value model allows bytes: they travel as base64 text to JSON clients.
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


# A JSON escape of a UTF-16 surrogate: only then can decoded text hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


_DECODER = json.JSONDecoder(parse_constant=lambda name: _reject_constant(name))  # defined below


def json_loads_strict(text: str | bytes) -> Any:
    """Decode one JSON document from untrusted text.

    Bytes must be UTF-8; ``NaN`` and ``Infinity`` are refused, and so is text with a lone
    surrogate (``"\\ud800"``: no codec could write it out again).

    orjson reads it when it can; whatever orjson refuses, and integers it would read as
    floats, go to the standard library, whose answer (value or error) is the contract
    (``tests/unit/test_json_fast.py`` compares the two on random and hostile text).

    Raises:
        CodecError: 4000.
    """
    if not has_long_digits(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # the slow path says why (or, where the two differ, reads it)
    return json_loads_slow(text)


def json_loads_slow(text: str | bytes) -> Any:
    """:func:`json_loads_strict` by the standard library alone (its reference)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError("message is not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise CodecError("message is not valid JSON") from None
    if _SURROGATE_ESCAPE.search(text) and has_lone_surrogate(value):
        raise CodecError("message is not valid JSON: text with a lone surrogate")
    return value


# What orjson would write by itself but json would not (dataclasses, dates, ...) goes to
# _json_default, which refuses it as json does.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


class JsonCodec:
    """JSON frames in text messages, several separated by ``\\n``."""

    name = "json"
    binary = False
    _encoder = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )

    def decode(self, data: bytes | str, max_frames: int | None = None) -> list[Any]:
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise CodecError("message is not valid UTF-8") from None
        lines = [line for line in data.split("\n") if line.strip()]
        if max_frames is not None and len(lines) > max_frames:
            raise _too_many(max_frames)
        return [json_loads_strict(line) for line in lines]

    def encode(self, frame: Any) -> bytes:
        """Never fails: what JSON cannot hold (from an older node's store) is made safe.

        orjson writes it unless it refuses (integers beyond 64 bits, lone surrogates, keys
        that are not text, nesting past 254); then the standard library does, as before.
        """
        try:
            return orjson.dumps(frame, default=_json_default, option=_ORJSON_OPTIONS)
        except (orjson.JSONEncodeError, ValueError, TypeError, RecursionError):
            pass
        try:
            return self._encoder.encode(frame).encode("utf-8")
        except (ValueError, TypeError, RecursionError):
            return self._encoder.encode(to_safe(frame)).encode("utf-8")

    def join(self, frames: list[bytes]) -> bytes:
        return b"\n".join(frames)


#: The fewest bytes a valid frame takes: ``{"type": "ping"}`` in CBOR (11; 15 in JSON). A
#: message of ``max_frame_bytes`` holds at most ``max_frame_bytes // MIN_FRAME_BYTES`` frames;
#: one that holds more has items no frame is made of.
MIN_FRAME_BYTES = 11


def _too_many(max_frames: int) -> CodecError:
    return CodecError(f"more than {max_frames} frames in one message")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _reject_tag(*_: Any) -> Any:
    raise ValueError("CBOR tags are not accepted")


# Every tag cbor2 decodes by itself, rejected: some are costly (4, 5), build cycles (28, 29) or
# compile regular expressions (35). Unknown tags go to tag_hook, rejected as well.
_SEMANTIC_REJECT = {
    tag: _reject_tag
    for tag in (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258, 260, 261, 1004,
                55799)
}
CBOR_MAX_DEPTH = FRAME_MAX_DEPTH


def cbor_loads_strict(data: bytes) -> Any:
    """Decode exactly one CBOR item from untrusted bytes (no tags, no trailing bytes).

    As ``CBOR.decode`` with a check of the count, with its decoder and without its list: every
    device uplink is read here (tests/unit/test_cbor_decoder.py holds the two to one answer).
    """
    if isinstance(data, str):
        raise CodecError("CBOR frames travel in binary messages")
    if not data:
        raise CodecError("expected exactly one CBOR item")
    decoder = CBOR.decoder()
    fp = decoder.fp = io.BytesIO(data)
    try:
        value = decoder.decode()
    except (cbor2.CBORError, ValueError, RecursionError):
        raise CodecError("message is not valid CBOR") from None
    if fp.tell() != len(data):
        CBOR.decode(data)  # read as the sequence it is, a bad item after the first raises
        raise CodecError("expected exactly one CBOR item")
    return value


def _cbor_decoder() -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        io.BytesIO(b""),
        tag_hook=_reject_tag,
        semantic_decoders=_SEMANTIC_REJECT,
        max_depth=CBOR_MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
    )


# -- salvage: a refused message read again, only to answer each of its frames by its id -------

#: How deep a salvaged CBOR message may nest: what JSON readers take (orjson reads 254 levels),
#: so that a CBOR frame nested past the frame limit is answered by its id as a JSON one is.
SALVAGE_MAX_DEPTH = 254


class LoneSurrogate:
    """Salvaged JSON text with a lone surrogate, in place of that text: no field takes it
    (text fields are strict ``str``), and the value check names it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LoneSurrogate()"


def _keep_tag(tag: cbor2.CBORTag, _immutable: bool) -> cbor2.CBORTag:
    return tag


# Every tag as a CBORTag around its decoded content, which is never interpreted: no bignum
# built, no regular expression compiled, no shared reference followed (no cycle).
_SEMANTIC_KEEP = {
    tag: (lambda value, _immutable, tag=tag: cbor2.CBORTag(tag, value))
    for tag in _SEMANTIC_REJECT
}
_SALVAGE_JSON = json.JSONDecoder(parse_constant=float)


def salvage_frames(data: bytes | str, binary: bool, max_frames: int) -> list[Any] | None:
    """The frames of a message its codec refused, read again so that each is answered with its
    own ``id``, or None when it cannot be read at all (not CBOR or JSON, not UTF-8, nested past
    :data:`SALVAGE_MAX_DEPTH`, more than ``max_frames`` frames).

    Only what the value model refuses is let through, kept so that it is refused later: CBOR
    tags (as ``cbor2.CBORTag``, never interpreted), JSON ``NaN`` and ``Infinity`` (as floats),
    JSON text with a lone surrogate (as :class:`LoneSurrogate`). A frame holding one fails
    ``parse_frame`` (every text or number field is strict) or the value check of its
    ``data``, ``params`` or ``result``: 4000 with its id and a reason naming the path. A
    ``reply`` so refused fails its caller's rpc at once (4500), not at its timeout.
    """
    try:
        if binary:
            if isinstance(data, str):
                return None
            decoder = cbor2.CBORDecoder(
                io.BytesIO(data), tag_hook=_keep_tag, semantic_decoders=_SEMANTIC_KEEP,
                max_depth=SALVAGE_MAX_DEPTH, allow_indefinite=False,
                allow_duplicate_keys=False, strict_hashable_types=False)
            frames: list[Any] = []
            while decoder.fp.tell() < len(data):
                if len(frames) >= max_frames:
                    return None
                frames.append(decoder.decode())
            return frames
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        lines = [line for line in text.split("\n") if line.strip()]
        if len(lines) > max_frames:
            return None
        return [_salvage_json(line) for line in lines]
    except (cbor2.CBORError, ValueError, RecursionError):
        return None


def _salvage_json(line: str) -> Any:
    try:
        return json_loads_strict(line)
    except CodecError:
        pass
    value = _SALVAGE_JSON.decode(line)  # ValueError, RecursionError: unreadable
    if _SURROGATE_ESCAPE.search(line) and has_lone_surrogate(value):
        value = _mark_surrogates(value)
    return value


def _mark_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value if not has_lone_surrogate(value) else LoneSurrogate()
    if isinstance(value, list):
        return [_mark_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_mark_surrogates(k): _mark_surrogates(v) for k, v in value.items()}
    return value


class CborCodec:
    """CBOR maps in binary messages, several one after another (an RFC 8742 sequence)."""

    name = "cbor"
    binary = True

    def __init__(self) -> None:
        # One decoder per thread, given each message's bytes (``fp``): building one costs ~40%
        # of decoding a small map. It keeps nothing from one message to the next, a message
        # that failed midway included (tests/unit/test_cbor_decoder.py holds it to a fresh
        # decoder's answers on seeded hostile input).
        self._local = threading.local()

    def decoder(self) -> cbor2.CBORDecoder:
        """This thread's decoder (built on its first use)."""
        local = self._local
        decoder: cbor2.CBORDecoder | None = getattr(local, "decoder", None)
        if decoder is None:
            decoder = local.decoder = _cbor_decoder()
        return decoder

    def decode(self, data: bytes | str, max_frames: int | None = None) -> list[Any]:
        if isinstance(data, str):
            raise CodecError("CBOR frames travel in binary messages")
        decoder = self.decoder()
        fp = decoder.fp = io.BytesIO(data)  # it holds the last message's bytes until the next
        frames: list[Any] = []
        end = len(data)
        most = end if max_frames is None else max_frames
        try:
            while fp.tell() < end:
                if len(frames) >= most:
                    raise _too_many(most)
                frames.append(decoder.decode())
        except (cbor2.CBORError, ValueError, RecursionError):
            raise CodecError("message is not valid CBOR") from None
        return frames

    def encode(self, frame: Any) -> bytes:
        """Never fails: what CBOR cannot hold (from an older node's store) is made safe."""
        try:
            return bytes(cbor2.dumps(frame))
        except (ValueError, TypeError, RecursionError, cbor2.CBOREncodeError):
            return bytes(cbor2.dumps(to_safe(frame)))

    def join(self, frames: list[bytes]) -> bytes:
        return b"".join(frames)


JSON = JsonCodec()
CBOR = CborCodec()
CODECS: dict[str, Codec] = {"rtnode.v1.json": JSON, "rtnode.v1.cbor": CBOR}
