"""The room stream's epoch: a random id in the stream's metadata, set once at creation.

Against a real nats-server: a second start keeps the epoch (and does not touch the stream), a
change of limits keeps it, a stream from before epochs lived in metadata gets the legacy one,
and only a stream deleted and created again has a new one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from bridge.nats_link import EPOCH_KEY, LEGACY_EPOCH, NatsLink, StreamSettings
from node.protocol.subjects import STREAM_NAME
from tests.servers import NatsProcess

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def links(nats_proc: NatsProcess) -> AsyncIterator[list[NatsLink]]:
    opened: list[NatsLink] = []
    yield opened
    for link in opened:
        await link.close()


async def _link(url: str, opened: list[NatsLink], **settings: int) -> NatsLink:
    link = NatsLink([url], name="t", stream=StreamSettings(**settings), connect_timeout_s=10)
    await link.connect()
    opened.append(link)
    return link


async def test_the_epoch_is_set_once_and_survives_restarts_and_updates(
        nats_proc: NatsProcess, links: list[NatsLink]) -> None:
    first = await _link(nats_proc.url, links)
    assert len(first.epoch) == 16
    info = await first.js.stream_info(STREAM_NAME)
    assert info.config.metadata[EPOCH_KEY] == first.epoch
    created = info.created

    again = await _link(nats_proc.url, links)
    assert again.epoch == first.epoch
    assert (await again.js.stream_info(STREAM_NAME)).created == created

    wider = await _link(nats_proc.url, links, history_size=500)
    assert wider.epoch == first.epoch
    info = await wider.js.stream_info(STREAM_NAME)
    assert info.config.max_msgs_per_subject == 500
    assert await first.check() is None and first.epoch == wider.epoch


async def test_a_stream_without_an_epoch_gets_the_legacy_one(
        nats_proc: NatsProcess, links: list[NatsLink]) -> None:
    setup = await _link(nats_proc.url, links)
    cfg = StreamSettings().config()
    await setup.js.delete_stream(STREAM_NAME)
    await setup.js.add_stream(cfg)  # as the node created it before epochs were in metadata
    link = await _link(nats_proc.url, links)
    assert link.epoch == LEGACY_EPOCH
    assert await setup.check() is None and setup.epoch == LEGACY_EPOCH


async def test_only_a_recreated_stream_has_a_new_epoch(
        nats_proc: NatsProcess, links: list[NatsLink]) -> None:
    link = await _link(nats_proc.url, links)
    old = link.epoch
    for _ in range(3):
        assert await link.check() is None
        assert link.epoch == old
    await link.js.delete_stream(STREAM_NAME)
    other = await _link(nats_proc.url, links)
    assert other.epoch != old
    assert await link.check() is None
    assert link.epoch == other.epoch
