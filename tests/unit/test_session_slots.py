"""An idle connection's session keeps its state in slots (issue 12: the cost of a connection)."""

from __future__ import annotations

from node.core.limits import ErrorWindow
from tests.unit.test_session import T0, connected, feed, joined


def test_a_connected_joined_session_allocates_no_dict() -> None:
    s = connected()
    joined(s, "chat:a")
    feed(s, {"type": "publish", "room": "chat:a", "event": "x", "data": 1})
    s.keep_offline(5.0)
    assert vars(s) == {}  # every attribute is a slot (a __dict__ of them was ~1.5 KB)


def test_the_error_window_is_bounded_and_forgets() -> None:
    w = ErrorWindow(3)
    assert [w.add(T0 + i) for i in range(6)] == [False, False, False, True, True, True]
    assert len(w._times) == 4  # limit + 1 at most
    assert not w.empty(T0 + 61) and w.empty(T0 + 66)
    other = ErrorWindow(3)
    other.add(T0 + 100)
    w.merge(other)
    assert len(w._times) <= 4 and w._times[-1] == T0 + 100


def test_the_websocket_transport_has_slots() -> None:
    from bridge.ws import WsConnection

    t = WsConnection(None, None, "", None)  # type: ignore[arg-type]
    assert not hasattr(t, "__dict__")
