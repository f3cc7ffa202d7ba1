"""The store's floor of the paced benchmark (bench/jetstream_floor.py), small: nats-server alone,
as the node embeds it, acknowledges every publish of the schedule, each timed once."""

from __future__ import annotations

import psutil
import pytest

from bench import jetstream_floor

pytestmark = pytest.mark.integration


# A plain function: the benchmark runs its own event loop, as `make bench` does.
def test_every_publish_of_the_schedule_is_acknowledged_and_timed() -> None:
    latencies, error = jetstream_floor.publish_to_ack(rate=500.0, events=100, payload_bytes=200)
    assert error == ""
    assert len(latencies) == 100
    assert all(s > 0 for s in latencies)


def _children() -> set[int]:
    """This process's children still running (a session's shared nats-server among them)."""
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def test_a_run_that_cannot_finish_in_time_says_so_and_stops_its_server() -> None:
    before = _children()
    latencies, error = jetstream_floor.publish_to_ack(rate=1.0, events=1000, payload_bytes=10,
                                                      timeout_s=3.0)
    assert "within 3 s" in error
    assert len(latencies) < 1000
    assert _children() - before == set()
