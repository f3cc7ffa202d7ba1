"""The rooms benchmark (bench/loads.py), small, through a node and through the websockets
baseline: members in client processes of their own publish within their window from their
read callbacks, and every event stored (or sent, for the baseline) reaches the peer once."""

from __future__ import annotations

import pytest

from bench import loads
from bench.nodes import SECRET
from bench.suite import _server

pytestmark = pytest.mark.integration


# Plain functions: the benchmark runs its own event loops, as `make bench` does.
@pytest.mark.parametrize("workers", [1, 0], ids=["rtnode", "websockets"])
def test_every_event_reaches_the_peer_once(workers: int) -> None:
    errors: list[str] = []
    with _server("rtnode" if workers else "websockets", workers, errors) as target:
        assert target is not None, errors
        res = loads.rooms(target.url, target.rtnode, SECRET, 8, 1.0, 3, 2,
                          target.cpu, lambda _: None)
    assert res.errors == [] and errors == [], (res.errors, errors)
    assert res.rooms == 8 and res.sent > 8 * 2 * 3  # past the first window of every member
    assert (res.lost, res.duplicates, res.closed) == (0, 0, 0)
    assert res.delivered == (res.acked if workers else res.sent)
    if workers:
        assert (res.unacked, res.refused) == (0, 0)
        assert res.echoes == res.acked  # each publisher got its own events back too
    assert res.latencies and res.rate > 0

