"""The embedded nats-server fsyncs every stored event by default (``nats_sync``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.nats_server import EmbeddedNats, free_port
from node.protocol.errors import ConfigError
from node.protocol.settings import load_settings
from tests.servers import http_get

pytestmark = pytest.mark.integration


async def _jetstream_config(server: EmbeddedNats) -> dict[str, object]:
    status, body = http_get(f"http://127.0.0.1:{server.monitor_port}/varz")
    assert status == 200
    return dict(json.loads(body)["jetstream"]["config"])


async def test_every_stored_event_is_synced_by_default(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "a", sync=load_settings().nats_sync,
                            monitor_port=free_port()) as server:
        config = await _jetstream_config(server)
    assert config["sync_always"] is True
    assert str(config["store_dir"]).startswith(str(tmp_path / "a"))


async def test_an_interval_may_be_chosen(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "b", sync="2m", monitor_port=free_port()) as server:
        config = await _jetstream_config(server)
    assert not config.get("sync_always", False)
    assert config["sync_interval"] == 120 * 10**9


def test_a_bad_sync_policy_is_refused() -> None:
    for bad in ("never", "2h", "0s", "1m\n", "always; x"):
        with pytest.raises(ConfigError, match="nats_sync"):
            load_settings(nats_sync=bad)
