"""ConnectionSession: frames and results in, commands out, with plain values (no event loop,
no sockets, no NATS). The admission pipeline is the real one; it never touches its store here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from node.core.admission import Admission
from node.core.limits import KeyedBuckets, LimitCarry
from node.core.session import JOIN_WAIT_S, ConnectionSession
from node.core.session_commands import (
    AdmitConnection,
    AnnouncePresence,
    CallRpc,
    CancelTimer,
    Close,
    Command,
    JoinPlainRoom,
    JoinRoom,
    LeavePlainRoom,
    LeaveRoom,
    PresenceAdd,
    PresenceRemove,
    PresenceWatch,
    ReadHistory,
    ReadPresence,
    RegisterRpc,
    RespondRpc,
    SendFrame,
    SendVolatile,
    StartTimer,
    Stop,
    StorePublish,
    UnregisterRpc,
)
from node.core.session_presence import PresenceOffline
from node.protocol.frames import parse_frame
from node.protocol.settings import Settings, load_settings
from node.protocol.tokens import Principal, TokenVerifier, mint_token

SECRET = "s" * 32
T0 = 1000.0
RIGHTS = {"chat:*": ["join", "publish", "history", "presence"], "ro:*": ["join"],
          "cur:*": ["join", "publish"], "quiet:*": ["join", "presence"]}


def settings(**overrides: Any) -> Settings:
    return load_settings(**{
        "jwt_secret": SECRET, "max_errors_per_min": 3, "max_rooms_per_connection": 3,
        "namespaces": {"cur": {"volatile": True}, "quiet": {"presence": False}},
        **overrides,
    })


def token(sub: str = "alice", *, ttl_s: float | None = 3600, kind: str = "user",
          rpc: list[str] | None = None, rooms: dict[str, list[str]] | None = None) -> str:
    return mint_token(SECRET, sub=sub, tenant="t1", kind=kind, ttl_s=ttl_s,
                      rooms=RIGHTS if rooms is None else rooms,
                      rpc=["user:*", "server"] if rpc is None else rpc)


def session(principal: Principal | None = None, *, presence: bool = True, rpc: bool = True,
            may_open_room: Callable[[str, str], bool] = lambda tenant, room: True,
            room_buckets: KeyedBuckets | None = None, carry: LimitCarry | None = None,
            **overrides: Any) -> ConnectionSession:
    s = settings(**overrides)
    return ConnectionSession(
        s, node_name="n1", client_id="c1", verify=TokenVerifier(secret=SECRET).verify,
        admit=Admission(s, None, None).admit,  # type: ignore[arg-type]
        principal=principal, now=T0, joined_at_ms=1, presence=presence, rpc=rpc,
        may_open_room=may_open_room, room_buckets=room_buckets, carry=carry)


def feed(s: ConnectionSession, raw: dict[str, Any], now: float = T0) -> list[Command]:
    s.receive_frame(parse_frame(raw), now)
    return s.commands_to_send()


def frames(commands: list[Command]) -> list[dict[str, Any]]:
    return [c.frame for c in commands if isinstance(c, SendFrame)]


def of(commands: list[Command], kind: type) -> list[Any]:
    return [c for c in commands if isinstance(c, kind)]


def connected(**kwargs: Any) -> ConnectionSession:
    """A session past its connect, with its commands read."""
    tok = kwargs.pop("tok", None) or token()
    s = session(**kwargs)
    s.start(T0)
    s.commands_to_send()
    feed(s, {"type": "connect", "id": 1, "token": tok})
    s.receive_admitted(T0)
    s.commands_to_send()
    return s


def joined(s: ConnectionSession, room: str, *, presence: bool = False) -> None:
    feed(s, {"type": "join", "id": "j", "room": room, "presence": presence})
    s.receive_room_joined(room)
    s.commands_to_send()


def error_codes(commands: list[Command]) -> list[int]:
    return [f["code"] for f in frames(commands) if f["type"] == "error"]


# -- connect, expiry, refresh -------------------------------------------------------------------


def test_connect_then_admitted_registers_rpc_joins_personal_room_and_answers() -> None:
    s = session()
    s.start(T0)
    assert s.commands_to_send() == [StartTimer(("connect", ""), T0 + 5)]
    assert of(feed(s, {"type": "connect", "id": 1, "token": token()}), AdmitConnection)
    assert not s.connected
    s.receive_admitted(T0)
    out = s.commands_to_send()
    kinds = [type(c) for c in out]
    assert kinds.index(RegisterRpc) < kinds.index(SendFrame)  # rpcs find it once connected
    assert RegisterRpc("t1", ["client:c1", "user:alice"]) in out
    assert CancelTimer(("connect", "")) in out
    expiry = of(out, StartTimer)[0]
    assert expiry.key == ("expiry", "") and 3590 < expiry.deadline - T0 <= 3600
    assert of(out, JoinRoom) == [JoinRoom("@user:alice", None, None, None, False, True)]
    (reply,) = frames(out)
    assert reply["type"] == "connected" and reply["id"] == 1 and reply["client_id"] == "c1"
    assert reply["node"] == "n1" and reply["heartbeat_s"] == 25
    assert reply["rooms"] == ["@user:alice"] and 3590 < reply["expires_in_s"] <= 3600


def test_connect_without_rpc_port_registers_nothing_and_no_exp_sets_no_timer() -> None:
    s = connected(rpc=False, tok=token(ttl_s=None))
    assert s.connected
    s2 = session(rpc=False)
    feed(s2, {"type": "connect", "token": token(ttl_s=None)})
    s2.receive_admitted(T0)
    out = s2.commands_to_send()
    assert not of(out, RegisterRpc) and CancelTimer(("expiry", "")) in out
    assert frames(out)[0]["expires_in_s"] is None and "id" not in frames(out)[0]


@pytest.mark.parametrize("raw", [{"type": "ping", "id": 1},
                                 {"type": "join", "room": "chat:a"},
                                 {"type": "publish", "room": "chat:a", "event": "m"}])
def test_first_frame_not_connect_ends_the_connection(raw: dict[str, Any]) -> None:
    s = session()
    assert feed(s, raw) == [Close(4001, "connect must be the first frame", False)]
    assert s.closing


def test_malformed_first_frame_ends_the_connection() -> None:
    s = session()
    s.receive_invalid(4000, "unknown frame type", 7)
    assert s.commands_to_send() == [Close(4000, "unknown frame type", False)]


def test_connect_timeout() -> None:
    s = session()
    s.start(T0)
    s.commands_to_send()
    s.receive_timer(("connect", ""), T0 + 5)
    assert s.commands_to_send() == [Close(4001, "no connect frame in time", False)]
    late = connected()
    late.receive_timer(("connect", ""), T0 + 5)  # already connected: nothing
    assert late.commands_to_send() == []


def test_bad_and_expired_tokens_at_connect() -> None:
    s = session()
    assert feed(s, {"type": "connect", "id": 1, "token": "nope"}) == [
        Close(4001, "invalid token", False)]
    s = session()
    expired = mint_token(SECRET, sub="alice", ttl_s=-10)
    assert feed(s, {"type": "connect", "id": 1, "token": expired}) == [
        Close(4010, "token expired", True)]


def test_second_connect_is_4000() -> None:
    s = connected()
    out = feed(s, {"type": "connect", "id": 2, "token": token()})
    assert frames(out) == [{"type": "error", "code": 4000, "reason": "already connected",
                            "retry": False, "id": 2}]


@pytest.mark.parametrize(("refused", "expected"), [
    (4503, Close(4503, "node draining", True)),
    (4029, Close(4029, "too many connections for this user", False)),
])
def test_refused_admission(refused: int, expected: Close) -> None:
    s = session()
    feed(s, {"type": "connect", "id": 1, "token": token()})
    s.receive_admitted(T0, refused)
    assert s.commands_to_send() == [expected] and not s.connected


def test_token_expiry_disconnects_4010() -> None:
    s = connected()
    s.receive_timer(("expiry", ""), T0 + 3600)
    assert s.commands_to_send() == [Close(4010, "token expired", True)]
    s.receive_timer(("expiry", ""), T0 + 3601)  # closing already: said once
    assert s.commands_to_send() == []


def test_refresh() -> None:
    s = connected()
    out = feed(s, {"type": "refresh", "id": 3, "token": token(ttl_s=7200)}, now=T0 + 10)
    timer = of(out, StartTimer)[0]
    assert timer.key == ("expiry", "") and 7190 < timer.deadline - T0 - 10 <= 7200
    (reply,) = frames(out)
    assert reply["type"] == "refreshed" and reply["id"] == 3 and reply["expires_in_s"] > 7000


def test_refresh_refusals() -> None:
    s = connected()
    expired = mint_token(SECRET, sub="alice", tenant="t1", ttl_s=-1)
    out = feed(s, {"type": "refresh", "id": 3, "token": expired})
    assert frames(out) == [{"type": "error", "code": 4010, "reason": "token expired",
                            "retry": True, "id": 3}]
    out = feed(s, {"type": "refresh", "id": 4, "token": token("bob")})
    assert error_codes(out) == [4003]
    assert feed(s, {"type": "refresh", "id": 5, "token": "junk"}) == [
        Close(4001, "invalid token", False)]


def test_preauthenticated_connection_answers_one_explicit_connect() -> None:
    alice = TokenVerifier(secret=SECRET).verify(token(kind="device"))
    s = session(alice)
    s.start(T0)
    assert s.commands_to_send() == [AdmitConnection(alice)]
    s.receive_admitted(T0)
    out = s.commands_to_send()
    assert not frames(out) and of(out, JoinRoom)[0].room == "@device:alice"
    assert frames(feed(s, {"type": "connect", "id": 1, "token": "x"}))[0]["type"] == "connected"
    assert error_codes(feed(s, {"type": "connect", "id": 2, "token": "x"})) == [4000]


# -- errors and their tolerance ------------------------------------------------------------------


def test_error_tolerance_ends_the_connection() -> None:
    s = connected()
    for i in range(3):
        s.receive_invalid(4000, "bad field", i, now=T0 + i)
        assert error_codes(s.commands_to_send()) == [4000]
    s.receive_invalid(4000, "bad field", 9, now=T0 + 3)
    out = s.commands_to_send()
    assert error_codes(out) == [4000] and out[-1] == Close(4000, "too many errors", False)


def test_error_window_forgets_after_a_minute_and_ignores_the_nodes_faults() -> None:
    s = connected()
    for i in range(6):
        s.receive_invalid(4000, "bad field", i, now=T0 + 61 * i)
    for code in (4500, 4503, 4504) * 4:  # the node's or the network's fault: never counted
        s.receive_failed(None, code, "x", True, now=T0 + 400)
    out = s.commands_to_send()
    assert not of(out, Close) and error_codes(out) == [4000] * 6 + [4500, 4503, 4504] * 4


def test_rate_limit_4009_then_disconnect_4009_with_reconnect() -> None:
    s = connected(rate_per_s=0.001, rate_burst=2)
    codes: list[int] = []
    closes: list[Close] = []
    for i in range(7):
        out = feed(s, {"type": "publish", "id": i, "room": "chat:a", "event": "m"})
        codes += error_codes(out)
        closes += of(out, Close)
    assert codes == [4009] * 4
    assert closes == [Close(4009, "too many errors", True)]


def test_unknown_frame_after_connect_is_an_error_with_the_request_id() -> None:
    s = connected()
    s.receive_invalid(4000, "unknown frame type", "q1")
    assert frames(s.commands_to_send()) == [
        {"type": "error", "code": 4000, "reason": "unknown frame type", "retry": False,
         "id": "q1"}]


# -- rooms ----------------------------------------------------------------------------------------


def test_join_with_since_and_presence_tracking() -> None:
    s = connected()
    out = feed(s, {"type": "join", "id": 5, "room": "chat:a", "presence": True,
                   "since": {"seq": 7, "epoch": "e1"}})
    assert of(out, JoinRoom) == [JoinRoom("chat:a", 7, "e1", 5, True, False)]
    assert PresenceWatch("chat:a", True) in out
    (add,) = of(out, PresenceAdd)
    assert add.member == {"client_id": "c1", "user": "alice", "kind": "user", "node": "n1",
                          "joined_at": 1}
    assert of(out, AnnouncePresence)[0].name == "presence:join"
    assert not frames(out)  # the room answers ``joined``


def test_rejoin_of_a_joined_room_replaces_the_membership_quietly() -> None:
    s = connected()
    joined(s, "chat:a")
    out = feed(s, {"type": "join", "id": 6, "room": "chat:a"})
    assert [type(c) for c in out] == [LeaveRoom, JoinRoom]


def test_join_rights_and_room_limit() -> None:
    s = connected()
    assert error_codes(feed(s, {"type": "join", "id": 1, "room": "other:a"})) == [4003]
    assert error_codes(feed(s, {"type": "join", "id": 2, "room": "ro:a", "presence": True})) == [
        4003]
    joined(s, "chat:a")  # with @user:alice: 2 of 3
    joined(s, "chat:b")
    out = feed(s, {"type": "join", "id": 3, "room": "chat:c"})
    assert frames(out) == [{"type": "error", "code": 4029, "retry": False, "id": 3,
                            "reason": "too many rooms for this connection"}]
    assert of(feed(s, {"type": "join", "id": 4, "room": "chat:b"}), JoinRoom)  # already in


def test_leave() -> None:
    s = connected()
    joined(s, "chat:a")
    out = feed(s, {"type": "leave", "id": 8, "room": "chat:a"}, now=T0 + 1)
    assert LeaveRoom("chat:a") in out and PresenceRemove("chat:a") in out
    assert of(out, AnnouncePresence)[0].name == "presence:leave"
    assert frames(out) == [{"type": "left", "room": "chat:a", "id": 8}]
    assert frames(feed(s, {"type": "leave", "id": 9, "room": "chat:z"})) == [
        {"type": "left", "room": "chat:z", "id": 9}]


def test_presence_off_for_personal_rooms_and_quiet_namespaces() -> None:
    s = connected()
    out = feed(s, {"type": "join", "id": 1, "room": "quiet:a", "presence": True})
    assert [type(c) for c in out] == [JoinRoom]
    s = connected(presence=False)
    assert [type(c) for c in feed(s, {"type": "join", "room": "chat:a"})] == [JoinRoom]


def test_room_lost_rejoins_from_the_cursor_silently() -> None:
    s = connected()
    joined(s, "chat:a", presence=True)
    s.receive_room_lost("chat:a", 42, "e2", T0)
    out = s.commands_to_send()
    assert of(out, JoinRoom) == [JoinRoom("chat:a", 42, "e2", None, True, True)]
    assert not of(out, PresenceAdd)  # still present: no second presence:join
    s.receive_room_lost("chat:gone", 1, "e2", T0)
    assert s.commands_to_send() == []


def test_ack() -> None:
    s = connected()
    assert error_codes(feed(s, {"type": "ack", "id": 1, "room": "chat:a", "seq": 3})) == [4004]
    joined(s, "chat:a")
    assert feed(s, {"type": "ack", "room": "chat:a", "seq": 3}) == []


def test_plain_subscriptions() -> None:
    s = connected(presence=False)
    s.receive_plain_join("chat:a", "src", T0)
    assert s.commands_to_send() == [JoinPlainRoom("chat:a", None, None, "src")]
    s.receive_plain_join("chat:a", "src2", T0)  # a repeated SUBSCRIBE: the membership goes on
    s.receive_plain_join("other:a", "src", T0)  # no right: refused
    assert s.commands_to_send() == []
    s.receive_plain_room_lost("chat:a", 9, "e1")
    s.receive_plain_room_lost("chat:a", None, "e1")
    assert s.commands_to_send() == [JoinPlainRoom("chat:a", 9, "e1", None),
                                    JoinPlainRoom("chat:a", None, None, None)]
    s.receive_plain_leave("chat:a", T0)
    s.receive_plain_leave("chat:a", T0)
    assert s.commands_to_send() == [LeavePlainRoom("chat:a")]
    fresh = session()
    fresh.receive_plain_join("chat:a", "src", T0)  # not connected yet
    assert fresh.commands_to_send() == []


def device(**kwargs: Any) -> ConnectionSession:
    """A plain MQTT device's session (pre-authenticated, kind device), admitted."""
    principal = TokenVerifier(secret=SECRET).verify(token("d1", kind="device"))
    s = session(principal, **kwargs)
    s.start(T0)
    s.receive_admitted(T0)
    s.commands_to_send()
    return s


def test_plain_subscriber_is_a_presence_member() -> None:
    s = device()
    s.receive_plain_join("chat:a", "src", T0)
    out = s.commands_to_send()
    assert [type(c) for c in out] == [JoinPlainRoom, PresenceAdd, AnnouncePresence]
    assert out[1].member == {"client_id": "c1", "user": "d1", "kind": "device", "node": "n1",
                             "joined_at": 1}
    assert out[2].name == "presence:join"
    s.receive_plain_join("quiet:a", "src", T0)  # presence off in the namespace: none
    assert [type(c) for c in s.commands_to_send()] == [JoinPlainRoom]
    s.receive_plain_leave("chat:a", T0 + 1)  # UNSUBSCRIBE
    out = s.commands_to_send()
    assert LeavePlainRoom("chat:a") in out and PresenceRemove("chat:a") in out
    assert [c.name for c in of(out, AnnouncePresence)] == ["presence:leave"]
    assert "online" not in of(out, AnnouncePresence)[0].member


def test_plain_and_frame_membership_of_one_room_is_one_member() -> None:
    s = device()
    s.receive_plain_join("chat:a", "src", T0)
    s.commands_to_send()
    out = feed(s, {"type": "join", "id": 1, "room": "chat:a"}, now=T0 + 1)
    assert not of(out, AnnouncePresence)  # its watchers see it already
    out = feed(s, {"type": "leave", "id": 2, "room": "chat:a"}, now=T0 + 2)
    assert not of(out, PresenceRemove) and not of(out, AnnouncePresence)  # still subscribed
    s.receive_plain_leave("chat:a", T0 + 3)
    out = s.commands_to_send()
    assert PresenceRemove("chat:a") in out
    assert [c.name for c in of(out, AnnouncePresence)] == ["presence:leave"]


def test_plain_subscriber_leaves_presence_when_it_ends() -> None:
    s = device()
    s.receive_plain_join("chat:a", "src", T0)
    s.commands_to_send()
    s.stop()
    out = s.commands_to_send()
    assert PresenceRemove("chat:a") in out and LeavePlainRoom("chat:a") in out
    assert not of(out, PresenceOffline)
    (leave,) = of(out, AnnouncePresence)
    assert leave.name == "presence:leave" and "online" not in leave.member


def test_persistent_session_leaves_its_plain_rooms_offline() -> None:
    s = device()
    s.keep_offline(3600.0)
    s.receive_plain_join("chat:a", "src", T0)
    joined(s, "chat:b")  # a tunnel room: gone as usual
    s.commands_to_send()
    s.stop()
    out = s.commands_to_send()
    (offline,) = of(out, PresenceOffline)
    assert offline.room == "chat:a" and offline.ttl_s == 3600.0
    assert offline.member["online"] is False and offline.member["kind"] == "device"
    assert PresenceRemove("chat:b") in out and PresenceRemove("chat:a") not in out
    leaves = {c.room: c for c in of(out, AnnouncePresence)}
    assert leaves["chat:a"].name == "presence:leave"
    assert leaves["chat:a"].member["online"] is False  # offline, not gone
    assert "online" not in leaves["chat:b"].member
    s = device()
    s.keep_offline(3600.0)
    s.keep_offline(None)  # its session was deleted: gone
    s.receive_plain_join("chat:a", "src", T0)
    s.commands_to_send()
    s.stop()
    out = s.commands_to_send()
    assert not of(out, PresenceOffline) and PresenceRemove("chat:a") in out


# -- publish --------------------------------------------------------------------------------------


def test_publish_is_stored_and_answered_with_its_seq() -> None:
    s = connected()
    out = feed(s, {"type": "publish", "id": 4, "room": "chat:a", "event": "m", "data": 1})
    (store,) = of(out, StorePublish)
    assert store.request_id == 4 and store.admitted.room == "chat:a"
    assert not store.admitted.volatile and store.admitted.door == "ws"
    s.receive_stored(4, "chat:a", 17)
    assert frames(s.commands_to_send()) == [
        {"type": "published", "room": "chat:a", "seq": 17, "id": 4}]
    s.receive_stored(None, "chat:a", 18)  # fire and forget: no reply
    assert s.commands_to_send() == []


def test_store_failure_is_an_error_with_retry() -> None:
    s = connected()
    s.receive_failed(4, 4503, "event not stored, retry", True)
    assert frames(s.commands_to_send()) == [
        {"type": "error", "code": 4503, "reason": "event not stored, retry", "retry": True,
         "id": 4}]


@pytest.mark.parametrize(("raw", "code"), [
    ({"room": "ro:a", "event": "m"}, 4003),
    ({"room": "chat:a", "event": "presence:join"}, 4003),
    ({"room": "chat:a", "event": "m", "data": "x" * 70000}, 4013),
    ({"room": "chat:a", "event": "m", "data": 2**70}, 4000),
])
def test_publish_refusals(raw: dict[str, Any], code: int) -> None:
    s = connected()
    out = feed(s, {"type": "publish", "id": 1, **raw})
    assert error_codes(out) == [code] and not of(out, StorePublish)


def test_volatile_publish_is_throttled_per_room() -> None:
    s = connected()
    out = feed(s, {"type": "publish", "id": 1, "room": "cur:a", "event": "x", "data": 1})
    assert len(of(out, SendVolatile)) == 1
    assert frames(out) == [{"type": "published", "room": "cur:a", "id": 1}]
    out = feed(s, {"type": "publish", "id": 2, "room": "cur:a", "event": "x", "data": 2},
               now=T0 + 0.1)
    assert not of(out, SendVolatile) and of(out, StartTimer) == [
        StartTimer(("volatile", "cur:a"), pytest.approx(T0 + 0.5))]
    feed(s, {"type": "publish", "room": "cur:a", "event": "x", "data": 3}, now=T0 + 0.2)
    s.receive_timer(("volatile", "cur:a"), T0 + 0.5)
    (latest,) = of(s.commands_to_send(), SendVolatile)
    assert latest.admitted.body != of(out, SendVolatile) and b"\x03" in latest.admitted.body


def test_publishes_held_right_after_a_join_until_the_room_takes_it_in() -> None:
    s = connected()
    feed(s, {"type": "join", "id": "j", "room": "chat:a"})
    out = feed(s, {"type": "publish", "id": 1, "room": "chat:a", "event": "m"})
    assert out == [StartTimer(("held", "chat:a"), T0 + JOIN_WAIT_S)]
    out = feed(s, {"type": "publish", "id": 2, "room": "chat:a", "event": "m"})
    assert out == []  # held behind the first, one timer
    other = feed(s, {"type": "publish", "id": 3, "room": "chat:b", "event": "m"})
    assert [c.request_id for c in of(other, StorePublish)] == [3]  # other rooms are not held
    s.receive_room_joined("chat:a")
    out = s.commands_to_send()
    assert out[0] == CancelTimer(("held", "chat:a"))
    assert [c.request_id for c in of(out, StorePublish)] == [1, 2]
    out = feed(s, {"type": "publish", "id": 4, "room": "chat:a", "event": "m"})
    assert [c.request_id for c in of(out, StorePublish)] == [4]


def test_held_publishes_go_at_the_latest_after_the_wait_or_on_leave() -> None:
    s = connected()
    feed(s, {"type": "join", "room": "chat:a"})
    feed(s, {"type": "publish", "id": 1, "room": "chat:a", "event": "m"})
    s.receive_timer(("held", "chat:a"), T0 + JOIN_WAIT_S)
    assert [c.request_id for c in of(s.commands_to_send(), StorePublish)] == [1]
    feed(s, {"type": "join", "room": "chat:b"})
    feed(s, {"type": "publish", "id": 2, "room": "chat:b", "event": "m"})
    out = feed(s, {"type": "leave", "id": 3, "room": "chat:b"})
    kinds = [type(c) for c in out]
    assert kinds.index(StorePublish) < kinds.index(LeaveRoom)  # sent before the leave: stored


# -- history, presence, ping ----------------------------------------------------------------------


def test_history() -> None:
    s = connected()
    assert error_codes(feed(s, {"type": "history", "id": 1, "room": "ro:a"})) == [4003]
    out = feed(s, {"type": "history", "id": 2, "room": "chat:a", "since": {"seq": 5},
                   "limit": 10, "reverse": True})
    assert out == [ReadHistory(2, "t1", "chat:a", 5, 10, True)]
    s.receive_history(2, "chat:a", [{"seq": 6}], 9)
    assert frames(s.commands_to_send()) == [
        {"type": "history", "room": "chat:a", "events": [{"seq": 6}], "seq": 9, "id": 2}]
    s.receive_failed(2, 4500, "could not read history")
    assert error_codes(s.commands_to_send()) == [4500]


def test_presence_requests() -> None:
    s = connected()
    assert error_codes(feed(s, {"type": "presence", "id": 1, "room": "ro:a"})) == [4003]
    assert error_codes(feed(s, {"type": "presence", "id": 2, "room": "quiet:a"})) == [4004]
    assert feed(s, {"type": "presence", "id": 3, "room": "chat:a"}) == [
        ReadPresence(3, "t1", "chat:a")]
    members = [{"user": "a", "kind": "user"}, {"user": "a", "kind": "user"},
               {"user": "b", "kind": "device"}]
    s.receive_presence(3, "chat:a", members)
    (reply,) = frames(s.commands_to_send())
    assert reply["unique_users"] == 2 and reply["members"] == members and reply["id"] == 3
    s = connected(presence=False)
    assert error_codes(feed(s, {"type": "presence", "id": 4, "room": "chat:a"})) == [4004]


def test_ping() -> None:
    s = connected()
    assert frames(feed(s, {"type": "ping", "id": 1})) == [{"type": "pong", "id": 1}]
    assert feed(s, {"type": "ping"}) == []


# -- rpc ------------------------------------------------------------------------------------------


def rpc(s: ConnectionSession, to: str = "user:bob", **extra: Any) -> list[Command]:
    return feed(s, {"type": "rpc", "id": 11, "to": to, "method": "m", "params": {"a": 1},
                    "timeout_ms": 2000, **extra})


def test_rpc_call_and_result() -> None:
    s = connected()
    out = rpc(s)
    (call,) = of(out, CallRpc)
    assert call.to == "user:bob" and call.timeout_s == 2.0
    assert call.request["from"] == {"user": "alice", "kind": "user", "client_id": "c1"}
    assert StartTimer(("rpc-out", call.call), T0 + 2.0) in out
    s.receive_rpc_result(call.call, {"ok": True})
    out = s.commands_to_send()
    assert CancelTimer(("rpc-out", call.call)) in out
    assert frames(out) == [{"type": "result", "result": {"ok": True}, "id": 11}]


def test_rpc_refusals() -> None:
    s = connected()
    assert error_codes(rpc(s, "device:x")) == [4003]
    assert error_codes(feed(s, {"type": "rpc", "to": "user:bob", "method": "m"})) == [4000]
    assert error_codes(rpc(s, params=2**70)) == [4000]
    assert error_codes(rpc(connected(rpc=False))) == [4004]


def test_rpc_to_an_offline_target_is_4004() -> None:
    s = connected()
    (call,) = of(rpc(s), CallRpc)
    s.receive_rpc_failed(call.call, 4004, "no such target", True)
    assert frames(s.commands_to_send())[0] == {
        "type": "error", "code": 4004, "reason": "no such target", "retry": True, "id": 11}


def test_rpc_timeout_is_4504_and_a_late_result_is_dropped() -> None:
    s = connected()
    (call,) = of(rpc(s), CallRpc)
    s.receive_timer(("rpc-out", call.call), T0 + 2)
    assert error_codes(s.commands_to_send()) == [4504]
    s.receive_rpc_result(call.call, 1)
    s.receive_rpc_failed(call.call, 4504, "rpc timed out")
    assert s.commands_to_send() == []


def test_server_rpc_with_an_undeliverable_result_is_4500() -> None:
    s = connected()
    (call,) = of(rpc(s, "server"), CallRpc)
    s.receive_rpc_result(call.call, 2**70)
    assert frames(s.commands_to_send())[-1] == {
        "type": "error", "code": 4500, "reason": "rpc method failed", "retry": True, "id": 11}


def test_rpc_in_reply_and_bookkeeping() -> None:
    s = connected()
    s.receive_rpc_request({"method": "m", "params": [1], "timeout_ms": 3000,
                           "from": {"user": "bob"}}, "inbox.1", T0)
    out = s.commands_to_send()
    assert out[0] == StartTimer(("rpc-in", "r1"), T0 + 3)
    assert frames(out) == [{"type": "rpc", "id": "r1", "from": {"user": "bob"}, "method": "m",
                            "params": [1]}]
    out = feed(s, {"type": "reply", "id": "r1", "result": {"x": 1}})
    assert out == [CancelTimer(("rpc-in", "r1")), RespondRpc("inbox.1", {"result": {"x": 1}})]
    assert feed(s, {"type": "reply", "id": "r1", "result": 2}) == []  # answered already
    assert feed(s, {"type": "reply", "id": "zz", "result": 2}) == []  # never sent


def test_rpc_in_error_reply_timeout_and_invalid_reply() -> None:
    s = connected()
    for reply_to in ("a", "b", "c"):
        s.receive_rpc_request({"method": "m"}, reply_to, T0)
    s.commands_to_send()
    out = feed(s, {"type": "reply", "id": "r1", "error": {"code": 4404, "reason": "nope"}})
    assert out[-1] == RespondRpc("a", {"error": {"code": 4404, "reason": "nope"}})
    s.receive_timer(("rpc-in", "r2"), T0 + 60)
    assert s.commands_to_send() == [] and feed(s, {"type": "reply", "id": "r2"}) == []
    out = feed(s, {"type": "reply", "id": "r3", "result": 2**70})
    assert RespondRpc("c", {"error": {"code": 4500, "reason": "rpc target sent an invalid reply",
                                      "retry": True}}) in out
    assert error_codes(out) == [4000]


def test_an_invalid_reply_fails_its_callers_rpc_at_once() -> None:
    # A reply the bridge could not validate (an error of the wrong shape) comes as Invalid:
    # its caller gets 4500 with retry now, the client its 4000; an invalid frame of another
    # type with the same id, or a reply to no rpc, touches no rpc.
    s = connected()
    for reply_to in ("a", "b"):
        s.receive_rpc_request({"method": "m"}, reply_to, T0)
    s.commands_to_send()
    s.receive_invalid(4000, "bad field error.code", "r1", now=T0)
    assert error_codes(s.commands_to_send()) == [4000], "not a reply: r1 still waits"
    s.receive_invalid(4000, "bad field error.code", "r1", now=T0, reply=True)
    out = s.commands_to_send()
    assert out[:2] == [CancelTimer(("rpc-in", "r1")), RespondRpc("a", {"error": {
        "code": 4500, "reason": "rpc target sent an invalid reply", "retry": True}})]
    assert error_codes(out) == [4000]
    assert feed(s, {"type": "reply", "id": "r2", "result": 1})[-1] == RespondRpc(
        "b", {"result": 1})
    for late in ("r1", "zz"):  # answered already; never sent
        s.receive_invalid(4000, "bad field error", late, now=T0, reply=True)
        assert error_codes(s.commands_to_send()) == [4000], late


def test_rpc_in_with_bad_params_or_no_method() -> None:
    s = connected()
    s.receive_rpc_request({"method": "m", "params": 2**70}, "a", T0)
    (answer,) = s.commands_to_send()
    assert isinstance(answer, RespondRpc) and answer.answer["error"]["code"] == 4000
    s.receive_rpc_request({"params": 1}, "b", T0)
    assert s.commands_to_send() == []


# -- the end --------------------------------------------------------------------------------------


def test_transport_closed_shutdown_and_overflow() -> None:
    s = connected()
    s.receive_transport_closed()
    assert s.commands_to_send() == [Stop()] and s.closing
    s = connected()
    s.receive_shutdown(4503, "node shutting down", True)
    s.receive_overflow()  # closing already: one goodbye
    assert s.commands_to_send() == [Close(4503, "node shutting down", True)]
    s = connected()
    s.receive_overflow()
    assert s.commands_to_send() == [Close(4009, "too many frames", True)]


def test_stop_leaves_rooms_and_fails_pending_rpcs() -> None:
    s = connected()
    joined(s, "chat:a")
    s.receive_plain_join("chat:b", "src", T0)
    s.receive_rpc_request({"method": "m"}, "inbox.9", T0)
    s.commands_to_send()
    s.stop()
    out = s.commands_to_send()
    assert LeaveRoom("chat:a") in out and LeaveRoom("@user:alice") in out
    assert PresenceRemove("chat:a") in out and LeavePlainRoom("chat:b") in out
    assert UnregisterRpc("t1", ["client:c1", "user:alice"]) in out
    assert RespondRpc("inbox.9", {"error": {"code": 4004, "reason": "rpc target went away",
                                            "retry": True}}) in out
    never = session()
    never.stop()
    assert never.commands_to_send() == []


def test_slow_consumer_4008_ends_even_a_closing_connection() -> None:
    s = connected()
    s.receive_shutdown(4503, "node shutting down", True)
    s.receive_shutdown(4008, "slow consumer", True)  # the outbox is past its limit: say so
    s.receive_shutdown(4503, "node shutting down", True)
    assert s.commands_to_send() == [Close(4503, "node shutting down", True),
                                    Close(4008, "slow consumer", True)]
