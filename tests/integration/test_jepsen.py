"""Nothing acknowledged is missed: a Jepsen-style fault test (issue 16).

A 3-server NATS cluster with the R3 room stream, two nodes (one reaches NATS through TCP
proxies), 4 publishers retrying with the same ``msg_id``, 4 subscribers in 3 rooms churned all
the time (so recovery with ``since`` runs constantly), and a seeded nemesis: kill -9 and pause
of nats-servers, cuts of a node's NATS link, kill -9 of nodes, stream leader step-downs. The
checker (:mod:`tests.jepsen.checker`) compares every publish and every subscriber's history
with the stream read back from JetStream.

Short by default (about 30 s of faults); ``make jepsen`` runs the long one. Environment:
``RTNODE_JEPSEN_SECONDS`` (of faults), ``RTNODE_JEPSEN_SEED`` (repeat a run's choices),
``RTNODE_JEPSEN_RATE`` (publishes/s per publisher), ``RTNODE_JEPSEN_FAULTS`` (kinds, comma
separated), ``RTNODE_JEPSEN_CHURN_S`` and ``RTNODE_JEPSEN_GAP_S`` ("low,high" seconds),
``RTNODE_JEPSEN_KICK`` (share of subscribers that rejoin right after each heal, 0.5).
The report is printed (``-s``) and is the failure message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.jepsen.harness import Config, run

pytestmark = pytest.mark.integration

CONFIG = Config.from_env(seconds=30.0)


@pytest.mark.timeout(CONFIG.budget_s + 60)
async def test_nothing_acknowledged_is_missed_under_faults(tmp_path: Path) -> None:
    # The run bounds each of its phases by its budget; 25 s more is for stopping everything.
    try:
        report = await asyncio.wait_for(run(tmp_path, CONFIG), CONFIG.budget_s + 25)
    except TimeoutError:
        pytest.fail(f"the run exceeded its budget of {CONFIG.budget_s:.0f} s "
                    f"(seed {CONFIG.seed}); logs in {tmp_path}")
    text = report.format(f"jepsen {CONFIG.seconds:.0f} s, seed {CONFIG.seed}")
    print("\n" + text)
    assert report.ok, text
