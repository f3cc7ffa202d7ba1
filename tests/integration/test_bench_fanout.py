"""The fan-out benchmark (bench/fanout.py), small, with its subscribers in the benchmark's own
process and in reader processes of their own: through a node and through the websockets
baseline, every event stored (or sent) reaches every subscriber once, the readers' CPU is
counted with the load generator's, and no reader process is left behind."""

from __future__ import annotations

from multiprocessing import resource_tracker

import psutil
import pytest

from bench import fanout
from bench.fanout_clients import measure
from bench.fanout_results import BenchConfig, RunResult, lost
from bench.procs import run_loop
from node.nats_server import free_port

pytestmark = pytest.mark.integration


def _children() -> set[int]:
    """This process's children still running (a session's shared nats-server among them, and
    multiprocessing's resource tracker: started for the first process spawned, it lives as
    long as this one)."""
    resource_tracker.ensure_running()
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


# Plain functions: the benchmark runs its own event loops, as `make bench` does.
@pytest.mark.parametrize("procs", [1, 3])
def test_every_stored_event_reaches_every_subscriber_once(procs: int) -> None:
    before = _children()
    cfg = BenchConfig(subscribers=7, events=300, in_flight=16, timeout_s=30.0, procs=procs)
    res = fanout.run_rtnode(cfg)
    assert res.error is None and not res.stalled and not res.timed_out
    assert res.acked == 300 and res.delivered == 7 * 300 == res.expected
    assert [s.index for s in res.subs] == list(range(7))
    assert lost(res) == 0 and sum(s.duplicates for s in res.subs) == 0
    assert all(s.closed is None and not s.other for s in res.subs)
    assert res.latencies and res.rate > 0
    assert res.cpu["clients"] > 0 and res.cpu["node"] > 0
    assert _children() - before == set()


def test_the_baseline_with_reader_processes() -> None:
    before = _children()
    cfg = BenchConfig(subscribers=5, events=200, in_flight=16, timeout_s=30.0, procs=2)
    res = fanout.run_baseline(cfg)
    assert res.error is None and not res.stalled
    assert res.sent == 200 and res.delivered == 5 * 200
    assert sum(s.duplicates for s in res.subs) == 0
    assert _children() - before == set()


def test_subscribers_that_cannot_connect_are_said_and_nothing_is_left_running() -> None:
    """Reader processes whose subscribers find no server: the run says so, and ends."""
    before = _children()
    cfg = BenchConfig(subscribers=4, events=10, timeout_s=10.0, procs=2)
    res = RunResult("rtnode", cfg, acked_ids=bytearray(cfg.events))
    run_loop(measure(res, [f"ws://127.0.0.1:{free_port()}"], True, dict))
    assert res.error and "could not join" in res.error
    assert res.delivered == 0
    assert _children() - before == set()
