"""An idle connection's session keeps its state in slots (issue 12: the cost of a connection)."""

from __future__ import annotations

from node.core.limits import ErrorWindow
from node.core.session import SendVolatile
from tests.unit.test_session import T0, connected, feed, joined, of


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


def test_an_idle_session_makes_its_publish_limit_and_throttles_at_first_use() -> None:
    """A connected, joined member that never publishes holds no publish bucket and no volatile
    or presence throttle (issue 12: ~0.2 KB per idle connection); the first publish makes the
    bucket (as full as one made at connect), a volatile one the throttle, and the limit and
    the throttle then work as before."""
    s = connected()
    joined(s, "chat:a", presence=True)
    assert s.bucket is None and s._throttle is None
    feed(s, {"type": "publish", "room": "chat:a", "event": "x", "data": 1})
    assert s.bucket is not None and s.bucket.level(T0) == s.settings.rate_burst - 1
    assert s._throttle is None
    for i in range(3):  # a burst of volatile events: the first goes, the latest waits
        sent = of(feed(s, {"type": "publish", "room": "chat:a", "event": "user:typing",
                           "data": i}, now=T0 + 0.001 * i), SendVolatile)
        assert len(sent) == (1 if i == 0 else 0)
    assert s._throttle is not None
    s.stop()
    assert s._throttle is None  # what waited is dropped with the connection
