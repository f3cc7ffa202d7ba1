"""A flood from 20 hostile connections against a node process, over the network: the
well-behaved members of another room keep receiving every event, in order, once; the node
refuses each hostile kind clearly, stays up and answers /healthz.

The hostile connections are the flood benchmark's (``python -m bench flood``): five each of
join/leave churn on distinct rooms, oversized frames, malformed messages and
history/presence/rpc request floods, each reconnecting when the node closes it. Seeded
(``RTNODE_TEST_FLOOD_SEED`` repeats a run's draws). Behaviour only: the latencies are the
benchmark's to print, never asserted here.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.attackers import AttackerSpec, AttackStats, Target, run_attackers
from bench.members import WellBehaved
from tests.servers import NodeProcess, http_get, pid_alive, running_node
from tests.wsclient import SECRET

pytestmark = pytest.mark.integration

FLOOD_S = 6.0
PER_KIND = 5
# What the node must answer each kind of hostile connection, at least once: a refusal with
# the kind's own code (an error frame, or the disconnect once the tolerance is spent).
REFUSALS = {
    "churn": ("4009", "4029"),  # joins beyond the request rate or the rooms per minute
    "requests": ("4009",),  # history, presence and rpc beyond the request rate
    "oversized": ("4013",),
    "malformed": ("4000",),
}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node process with its own limits (the flood and the members all come from
    127.0.0.1, well under the per-peer cap)."""
    with running_node(tmp_path / "node", "--log-level", "warning",
                      env={"RTNODE_JWT_SECRET": SECRET}) as proc:
        yield proc


async def _healthz_within(node: NodeProcess, timeout_s: float) -> int:
    """GET /healthz until it answers 200 or ``timeout_s`` passes; the last status."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        status = (await asyncio.to_thread(http_get, node.base + "/healthz"))[0]
        if status == 200 or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.2)


def _refused(stats: AttackStats, codes: tuple[str, ...]) -> bool:
    return any(kind.endswith(f" {code}") for kind in stats.replies for code in codes)


async def test_members_of_another_room_get_every_event_during_a_flood(
        node: NodeProcess) -> None:
    seed = int(os.environ.get("RTNODE_TEST_FLOOD_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    target = Target(node.http_port, node.mqtt_port, SECRET)
    members = WellBehaved(node.ws_url, SECRET, rooms=1, members=4, rate_per_s=20)
    await members.start()
    try:
        floods = {kind: asyncio.create_task(run_attackers(
            [AttackerSpec(kind, rng.randrange(1 << 62)) for _ in range(PER_KIND)], target,
            frames=10**9, seconds=FLOOD_S, first_index=k * 100))
            for k, kind in enumerate(REFUSALS)}
        results = dict(zip(floods, await asyncio.gather(*floods.values()), strict=True))
        assert pid_alive(node.proc.pid) and node.proc.poll() is None, node.log()
        await members.stop(drain_s=10)
        assert members.received() > 0
        assert members.lost() == 0, (seed, members.problems())
        assert not members.problems(), (seed, members.problems())  # no dup, order, close
        assert not members.stuck_rooms(), (seed, members.stuck_rooms())
    finally:
        await members.close()
    for kind, stats in results.items():
        assert not stats.failures, (seed, stats.failures)
        assert stats.frames > 0 and stats.connections > 0, (seed, kind, stats)
        assert _refused(stats, REFUSALS[kind]), (seed, kind, dict(stats.replies))
    # The flood came from 127.0.0.1 too: new connections from it wait until its failures
    # (peer_failures_per_min) have drained a little, then are served again.
    assert await _healthz_within(node, 5.0) == 200
    log = node.log_path.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, node.log()
