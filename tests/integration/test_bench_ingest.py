"""The device-ingest benchmark, small, through the node and through its Mosquitto baseline: the
same device processes and member count every PUBACKed reading once, on both."""

from __future__ import annotations

import pytest

from bench import ingest
from bench.ingest_devices import IngestConfig
from bench.ingest_mosquitto import mosquitto_binary, run_mosquitto_ingest
from bench.ingest_report import IngestResult
from bench.suite import _ingest_lost

pytestmark = pytest.mark.integration

CFG = IngestConfig(devices=6, events_per_device=40, window=4, workers=2, timeout_s=60)


def _check(res: IngestResult) -> None:
    assert res.error is None, res.error
    assert not res.timed_out and res.stalled is None, (res.timed_out, res.stalled)
    assert res.acked == CFG.expected, (res.acked, res.worker_notes)
    assert (res.distinct, res.duplicates, res.foreign) == (CFG.expected, 0, 0)
    assert _ingest_lost(res) == 0
    assert res.cpu_wall > 0


# Plain functions: the benchmark runs its own event loop, in the main thread (its SIGTERM
# handler), as `make bench` does.
def test_the_mosquitto_baseline_counts_every_reading_once() -> None:
    assert mosquitto_binary() is not None  # make installs Debian's mosquitto
    res = run_mosquitto_ingest(CFG)
    _check(res)
    assert "server" in res.cpu  # the broker's CPU, in the column's server row


def test_the_node_counts_every_reading_once() -> None:
    res = ingest.run_ingest(CFG)
    _check(res)
