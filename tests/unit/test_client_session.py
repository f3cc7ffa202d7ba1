"""ClientSession: frames to send and frames received, with plain values (no event loop)."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from devices.client_session import (
    ClientSession,
    Connected,
    Disconnect,
    Error,
    Event,
    Reply,
    Resync,
    RpcRequest,
    backoff_cap,
)
from node.protocol.frames import CBOR, JSON

EPOCH = "e1"


def event(room: str, seq: int | None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "event", "room": room, "event": "msg", "data": {"n": seq}, "ts": 1700000000000,
        "from": {"user": "u1", "client_id": "c9", "kind": "user"},
    }
    if seq is not None:
        frame["seq"] = seq
    return frame | extra


def joined(rid: int, room: str, seq: int, *, recovered: bool = False,
           epoch: str = EPOCH) -> dict[str, Any]:
    return {"type": "joined", "id": rid, "room": room, "seq": seq, "epoch": epoch,
            "recovered": recovered, "replayed": 0}


def joined_session(room: str = "chat:a", seq: int = 10) -> ClientSession:
    """A session that joined ``room`` once, whose cursor is at ``seq``."""
    s = ClientSession()
    frame = s.join_frame(room)
    s.receive(joined(frame["id"], room, seq))
    return s


def events_of(items: list[Any]) -> list[Event]:
    return [i for i in items if isinstance(i, Event)]


# -- frames to send ----------------------------------------------------------------------------


def test_connect_frame_carries_token_and_client_name() -> None:
    s = ClientSession(client_name="app")
    frame = s.connect_frame("jwt")
    assert frame["type"] == "connect" and frame["token"] == "jwt"
    assert frame["client"]["name"] == "app" and "id" not in frame


def test_request_ids_are_increasing_integers_and_pending() -> None:
    s = ClientSession()
    ids = [s.join_frame("chat:a")["id"], s.publish_frame("chat:a", "m")["id"],
           s.request_frame({"type": "ping"})["id"]]
    assert ids == [1, 2, 3] and s.pending() == [1, 2, 3]
    s.forget(2)
    assert s.pending() == [1, 3]


def test_first_join_has_no_since() -> None:
    s = ClientSession()
    frame = s.join_frame("chat:a", presence=True)
    assert frame == {"type": "join", "room": "chat:a", "presence": True, "id": 1}


def test_rejoin_carries_since_with_seq_and_epoch_after_events() -> None:
    s = joined_session("chat:a", seq=10)
    s.receive(event("chat:a", 12))
    s.receive(event("chat:a", 15))
    s.connection_lost()
    frames = s.rejoin_frames()
    assert len(frames) == 1
    assert frames[0]["room"] == "chat:a"
    assert frames[0]["since"] == {"seq": 15, "epoch": EPOCH}
    assert frames[0]["id"] in s.pending()


def test_rejoin_keeps_presence_and_skips_rooms_never_joined() -> None:
    s = ClientSession()
    a = s.join_frame("chat:a", presence=True)
    s.join_frame("chat:b")  # no joined yet: the caller retries it
    s.receive(joined(a["id"], "chat:a", 3))
    s.connection_lost()
    assert s.rooms == ["chat:a"]
    [frame] = s.rejoin_frames()
    assert frame["presence"] is True and frame["since"] == {"seq": 3, "epoch": EPOCH}


def test_frames_encode_with_both_codecs() -> None:
    s = joined_session()
    frames = [s.publish_frame("chat:a", "m", {"x": 1}, "k1"), *s.rejoin_frames()]
    for codec in (JSON, CBOR):
        assert codec.decode(codec.join([codec.encode(f) for f in frames])) == frames


def test_history_and_ack_frames() -> None:
    s = ClientSession()
    assert s.history_frame("chat:a", since=5, limit=20, reverse=True) == {
        "type": "history", "room": "chat:a", "since": {"seq": 5}, "limit": 20,
        "reverse": True, "id": 1}
    assert s.history_frame("chat:a") == {"type": "history", "room": "chat:a", "id": 2}
    assert s.ack_frame("chat:a", 7) == {"type": "ack", "room": "chat:a", "seq": 7}


def test_publish_frame_keeps_msg_id() -> None:
    s = ClientSession()
    first, again = s.publish_frame("r", "e", 1, "abc"), s.publish_frame("r", "e", 1, "abc")
    assert first["msg_id"] == again["msg_id"] == "abc" and first["id"] != again["id"]


def test_leave_forgets_the_room_at_once() -> None:
    s = joined_session()
    frame = s.leave_frame("chat:a")
    assert frame["type"] == "leave" and s.rooms == [] and s.rejoin_frames() == []


# -- events and cursors ------------------------------------------------------------------------


def test_events_move_the_cursor_and_keep_their_fields() -> None:
    s = joined_session(seq=10)
    [ev] = s.receive(event("chat:a", 11, msg_id="k1"))
    assert ev == Event("chat:a", 11, "msg", {"n": 11}, 1700000000000,
                       {"user": "u1", "client_id": "c9", "kind": "user"}, "k1")
    assert s.last_seq("chat:a") == 11


def test_duplicate_and_old_events_are_dropped() -> None:
    s = joined_session(seq=10)
    assert s.receive(event("chat:a", 10)) == []  # the join's seq was already seen
    assert len(s.receive(event("chat:a", 12))) == 1
    assert s.receive(event("chat:a", 12)) == []
    assert s.receive(event("chat:a", 11)) == []
    assert s.last_seq("chat:a") == 12


def test_volatile_events_pass_and_do_not_move_cursors() -> None:
    s = joined_session(seq=10)
    items = s.receive(event("chat:a", None, event="user:typing"))
    assert [(e.seq, e.event) for e in events_of(items)] == [(None, "user:typing")]
    assert s.last_seq("chat:a") == 10
    assert len(s.receive(event("chat:a", None))) == 1  # volatile events are never duplicates


def test_several_frames_of_one_message_in_order() -> None:
    s = joined_session(seq=1)
    message = JSON.join([JSON.encode(event("chat:a", n)) for n in (2, 3, 3, 5)])
    got = [e.seq for raw in JSON.decode(message) for e in events_of(s.receive(raw))]
    assert got == [2, 3, 5]


def test_events_of_personal_rooms_pass_and_are_not_resumed() -> None:
    s = ClientSession()
    [connected] = s.receive({"type": "connected", "client_id": "c1", "node": "n1",
                             "heartbeat_s": 25, "expires_in_s": 60, "rooms": ["@user:u1"]})
    assert isinstance(connected, Connected) and s.client_id == "c1" and s.node == "n1"
    assert s.rooms == ["@user:u1"]
    assert len(s.receive(event("@user:u1", 40))) == 1
    assert s.receive(event("@user:u1", 40)) == []
    assert s.rejoin_frames() == []
    s.connection_lost()
    assert s.rooms == [] and s.client_id is None


# -- joined: recovery --------------------------------------------------------------------------


def test_recovered_rejoin_keeps_the_cursor_and_replay_follows() -> None:
    s = joined_session(seq=10)
    s.receive(event("chat:a", 12))
    s.connection_lost()
    [frame] = s.rejoin_frames()
    items = s.receive(joined(frame["id"], "chat:a", 20, recovered=True))
    assert items == [Reply(frame["id"], joined(frame["id"], "chat:a", 20, recovered=True))]
    assert s.last_seq("chat:a") == 12
    assert [e.seq for e in events_of(s.receive(event("chat:a", 15)))] == [15]


def test_unrecovered_rejoin_gives_resync_and_moves_the_cursor() -> None:
    s = joined_session(seq=10)
    s.receive(event("chat:a", 12))
    s.connection_lost()
    [frame] = s.rejoin_frames()
    items = s.receive(joined(frame["id"], "chat:a", 3, recovered=False, epoch="e2"))
    assert items[0] == Resync("chat:a", 3, "e2")
    assert isinstance(items[1], Reply) and items[1].id == frame["id"]
    assert s.last_seq("chat:a") == 3
    assert [e.seq for e in events_of(s.receive(event("chat:a", 4)))] == [4]
    s.connection_lost()
    [again] = s.rejoin_frames()
    assert again["since"] == {"seq": 4, "epoch": "e2"}


def test_first_join_is_not_a_resync() -> None:
    s = ClientSession()
    frame = s.join_frame("chat:a")
    items = s.receive(joined(frame["id"], "chat:a", 42))
    assert [type(i) for i in items] == [Reply] and s.last_seq("chat:a") == 42


# -- replies and errors ------------------------------------------------------------------------


def test_replies_are_matched_by_id_whatever_their_order() -> None:
    s = ClientSession()
    p1, p2 = s.publish_frame("r", "e"), s.publish_frame("r", "e")
    second = {"type": "published", "id": p2["id"], "room": "r", "seq": 8}
    first = {"type": "published", "id": p1["id"], "room": "r", "seq": 7}
    assert s.receive(second) == [Reply(p2["id"], second)]
    assert s.receive(first) == [Reply(p1["id"], first)]
    assert s.pending() == []
    assert s.receive(first) == []  # no longer waited for


def test_reply_to_a_forgotten_request_is_ignored() -> None:
    s = ClientSession()
    rid = s.request_frame({"type": "ping"})["id"]
    s.forget(rid)
    assert s.receive({"type": "pong", "id": rid}) == []


@pytest.mark.parametrize("retry", [True, False])
def test_errors_are_parsed_with_their_retry_flag(retry: bool) -> None:
    s = ClientSession()
    rid = s.publish_frame("r", "e")["id"]
    [err] = s.receive({"type": "error", "id": rid, "code": 4009, "reason": "slow down",
                       "retry": retry})
    assert err == Error(rid, 4009, "slow down", retry)
    exc = err.to_exception() if isinstance(err, Error) else None
    assert exc is not None and (exc.code, exc.reason, exc.retry) == (4009, "slow down", retry)
    assert s.pending() == []


def test_error_without_id_is_surfaced() -> None:
    s = ClientSession()
    assert s.receive({"type": "error", "code": 4003, "reason": "forbidden"}) == [
        Error(None, 4003, "forbidden", False)]


def test_refused_first_join_forgets_the_room() -> None:
    s = ClientSession()
    rid = s.join_frame("chat:x")["id"]
    s.receive({"type": "error", "id": rid, "code": 4003, "reason": "forbidden", "retry": False})
    assert s.rooms == []


def test_refused_rejoin_drops_the_room_retryable_keeps_it() -> None:
    s = joined_session("chat:a")
    frame = s.join_frame("chat:b")
    s.receive(joined(frame["id"], "chat:b", 1))
    s.connection_lost()
    a, b = s.rejoin_frames()
    s.receive({"type": "error", "id": a["id"], "code": 4003, "reason": "no", "retry": False})
    s.receive({"type": "error", "id": b["id"], "code": 4500, "reason": "oops", "retry": True})
    assert s.rooms == ["chat:b"]
    assert s.join_frame("chat:b")["since"] == {"seq": 1, "epoch": EPOCH}


# -- disconnect, rpc, unknown ------------------------------------------------------------------


def test_disconnect_is_parsed() -> None:
    s = ClientSession()
    assert s.receive({"type": "disconnect", "code": 4010, "reason": "token expired",
                      "reconnect": True}) == [Disconnect(4010, "token expired", True)]
    assert s.receive({"type": "disconnect", "code": 4001, "reason": "bad token"}) == [
        Disconnect(4001, "bad token", False)]


@pytest.mark.parametrize(
    ("code", "reconnect"), [(None, True), (1001, True), (4503, True), (4008, True),
                            (4001, False), (4003, False), (4029, False)])
def test_close_without_disconnect_frame(code: int | None, reconnect: bool) -> None:
    outcome = ClientSession().close_outcome(code)
    assert outcome.reconnect is reconnect and outcome.code == (code or 1006)


def test_rpc_requests_are_surfaced_and_answered() -> None:
    s = ClientSession()
    frm = {"user": "svc", "client_id": "c2", "kind": "service"}
    [req] = s.receive({"type": "rpc", "id": "r1", "from": frm, "method": "light.set",
                       "params": {"on": True}})
    assert req == RpcRequest("r1", "light.set", {"on": True}, frm)
    assert s.rpc_result_frame("r1", 5) == {"type": "reply", "id": "r1", "result": 5}
    assert s.rpc_error_frame(7, 4500, "boom\ntrace") == {
        "type": "reply", "id": 7, "error": {"code": 4500, "reason": "boom"}}


def test_unknown_and_malformed_frames_give_nothing() -> None:
    s = joined_session()
    assert s.receive({"type": "future-thing", "x": 1}) == []
    assert s.receive([1, 2]) == []
    assert s.receive({"type": "event", "seq": 3}) == []  # no room
    assert s.receive({"type": "rpc", "method": "m"}) == []  # no id


# -- backoff -----------------------------------------------------------------------------------


def test_backoff_cap_grows_then_saturates() -> None:
    caps = [backoff_cap(n, 0.5, 20.0) for n in range(10)]
    assert caps[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert caps[6:] == [20.0] * 4
    assert backoff_cap(10_000, 0.5, 20.0) == 20.0


@pytest.mark.parametrize("attempt", [0, 1, 3, 6, 50])
def test_backoff_delay_is_full_jitter_within_the_cap(attempt: int) -> None:
    s = ClientSession(min_backoff_s=0.5, max_backoff_s=20.0)
    cap = backoff_cap(attempt, 0.5, 20.0)
    assert s.backoff_delay(attempt, lambda: 0.0) == 0.0
    assert s.backoff_delay(attempt, lambda: 0.5) == cap / 2
    for r in (0.0, 0.25, 0.999999):
        assert 0.0 <= s.backoff_delay(attempt, partial(float, r)) <= cap
