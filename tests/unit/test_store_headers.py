"""A batched publish's header lines (bridge/room_store.py) are what nats-py's ``publish`` would
write for the same headers (bridge/_nats_patches.header_lines), for any msg id and ttl."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge._nats_patches import header_lines
from bridge.room_store import _header_lines, _headers

ttls = st.none() | st.floats(min_value=0, max_value=10**9, allow_nan=False)
ids = st.text() | st.text(alphabet=" \t\r\n\u00a0\u2028x:-", max_size=12)


@given(ids, ttls)
def test_the_lines_are_those_of_the_headers(msg_id: str, ttl_s: float | None) -> None:
    assert _header_lines(msg_id, ttl_s) == header_lines(_headers(msg_id, ttl_s))


def test_a_plain_id() -> None:
    assert _header_lines("u1:room:m-7", 30.5) == "Nats-Msg-Id: u1:room:m-7\r\nNats-TTL: 30s\r\n"
