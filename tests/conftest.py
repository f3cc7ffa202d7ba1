"""Fixtures shared by the suite: real servers on free ports in temporary directories."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from node.app import Node
from node.protocol.settings import load_settings
from tests.cluster import NatsCluster
from tests.servers import NatsProcess
from tests.wsclient import SECRET

# Tests that hold the machine's timing to account: seeded faults against real clusters, kills,
# pauses, RSS and load. `make test` runs them alone, after the rest has run in parallel
# (pytest-xdist), so that another test's load never makes them miss a deadline.
SERIAL_MODULES = frozenset({
    "test_jepsen", "test_sse_faults", "test_cluster_faults", "test_device_faults",
    "test_replay_faults", "test_state_faults", "test_state_races", "test_recovery_faults",
    "test_idle_memory", "test_devices_sessions_cluster", "test_kill_node", "test_group_commit",
    "test_reconnect_storm", "test_consumer_churn", "test_consume_groups", "test_gc_cycles",
    "test_pacing", "test_backpressure", "test_slow_consumer", "test_presence", "test_flood",
    "test_mqtt_takeover_race", "test_session_store_races",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run async tests on uvloop, the loop the node runs on in production."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def saved_garbage() -> Iterator[list[Any]]:
    """gc.garbage of everything that became cyclic garbage during the test."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-server NATS cluster with JetStream for one test (it may kill, pause, restart)."""
    c = NatsCluster(tmp_path).start()
    yield c
    c.stop()


@pytest.fixture
def nats_proc(tmp_path: Path) -> Iterator[NatsProcess]:
    """A nats-server with JetStream for one test (it may kill and restart it)."""
    server = NatsProcess(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsProcess]:
    """One nats-server with JetStream for the whole session (never killed by a test)."""
    server = NatsProcess(tmp_path_factory.mktemp("shared-nats")).start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def make_node(
    shared_nats: NatsProcess, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process nodes (on the shared nats-server unless ``nats_url`` is given); they
    all stop at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def make(**overrides: Any) -> Node:
            nonlocal count
            count += 1
            settings = load_settings(**{
                "nats_url": shared_nats.url, "http_port": 0, "mqtt_port": 0,
                "jwt_secret": SECRET,
                "data_dir": tmp_path / f"node{count}", "node_name": f"n{count}",
                "drain_timeout_s": 1.0,
                **overrides,
            })
            node = Node(settings)
            await node.start()
            stack.push_async_callback(node.stop)
            return node

        yield make
