"""The paced fan-out of ``make bench`` (bench/fanout_clients.py ``_slot``): one event per
message on a fixed schedule, whatever has been delivered; a late publisher is reported."""

from __future__ import annotations

import time

from bench.fanout_clients import _slot
from bench.fanout_results import LATE_S, BenchConfig, RunResult, problems


def test_paced_publishes_one_frame_per_message() -> None:
    assert BenchConfig(rate=1000.0).batch == 1
    assert BenchConfig().batch > 1  # pipelined: several publish frames per message


async def test_a_slot_waits_for_its_time_and_a_late_one_is_noted() -> None:
    res = RunResult("rtnode", BenchConfig(subscribers=1, events=3, rate=50.0))
    start = time.time()
    await _slot(res, 2, start)  # the third event's time: 40 ms after the start
    assert time.time() - start >= 0.039
    assert res.late == 0.0
    await _slot(res, 0, start - 1.0)  # a second behind: sent at once, the lag noted
    assert res.late >= 1.0 > LATE_S
    res.sent = 3
    assert any("behind its schedule of 50 events/s" in line for line in problems(res))
