"""Seeded rpc ``params`` and ``result`` values between every kind of caller and callee.

docs/protocol-notes.md, "Value model" and "rpc": ``params`` outside the model get the caller
4000 and never reach the target; a ``reply`` whose ``result`` is outside it gets the target
4000 and the caller 4500 with ``retry: true``; whatever passes reaches the other side in its
codec (byte strings as base64 text in JSON), types kept. Two nodes: callers (WebSocket JSON and
CBOR on node 1, a tunnel device on node 2) call callees drawn at random (a WebSocket JSON
client on node 1, a CBOR one and a tunnel device on node 2, the server's ``echo``), each call's
``params`` drawn from the frame fuzz's hostile values. A callee answers ``echo`` with the
params it got, ``answer-<n>`` with a result drawn for it, and ``malformed-<n>`` with a reply
that fails validation (an ``error`` of the wrong shape): the caller gets 4500 with ``retry``
at once, not its timeout. Every frame is written and read with ``json`` and ``cbor2``, not the
node's codecs. ``RTNODE_TEST_VALUE_FUZZ_SEED`` repeats a
run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from typing import Any

import aiomqtt
import cbor2
import pytest

from tests.doors import mqtt_device
from tests.integration.test_request_limits import OPEN
from tests.integration.test_value_fuzz import SEED, _draw, _frames, canon, inside
from tests.wsclient import RawClient, as_json_member, token, ws_url

pytestmark = pytest.mark.integration

CALLS = 60
RIGHTS = {"rpc": ["client:*", "device:*", "server"]}
# Replies a callee may send that fail validation before their result is looked at.
MALFORMED = [
    {"error": {"code": "x", "reason": "r"}}, {"error": {"code": 4003, "reason": "r" * 600}},
    {"error": "no"}, {"error": {"reason": "no code"}}, {"error": {"code": 4003.5, "reason": "r"}},
]


def _view(value: Any, codec: str) -> Any:
    """``value`` as a peer of ``codec`` receives it."""
    return as_json_member(value) if codec == "json" else value


class Peer:
    """A caller and callee speaking raw frames: a WebSocket client or a tunnel device."""

    def __init__(self, name: str, codec: str, target: str) -> None:
        self.name, self.codec, self.target = name, codec, target
        self.replies: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.calls: list[dict[str, Any]] = []  # the rpc frames it got
        self.refused: list[dict[str, Any]] = []  # errors to its replies
        self.told = asyncio.Event()  # set when one comes
        self.answers: dict[str, Any] = {}  # method -> the result to reply
        self.ids = iter(range(1, 1 << 30))

    async def send(self, frame: dict[str, Any]) -> None:
        raise NotImplementedError

    async def frames(self) -> Any:
        raise NotImplementedError

    async def serve(self) -> None:
        """Read frames for ever: replies to its own calls, and calls to answer."""
        async for frame in self.frames():
            if not isinstance(frame, dict):
                continue
            kind = frame.get("type")
            if kind == "rpc":
                self.calls.append(frame)
                method = frame["method"]
                if method.startswith("malformed-"):  # fields of a reply that fail validation
                    await self.send({"type": "reply", "id": frame["id"], **self.answers[method]})
                    continue
                result = frame.get("params") if method == "echo" else self.answers[method]
                await self.send({"type": "reply", "id": frame["id"], "result": result})
            elif frame.get("id") in self.replies:  # a reply to its call (or its ping)
                self.replies.pop(frame["id"]).set_result(frame)
            elif kind == "error" and "id" not in frame and self.replies:
                # Its call could not be read (nested past what a reader decodes): the error
                # has no id. Calls go one at a time, so it is the one waiting.
                [rid] = self.replies
                self.replies.pop(rid).set_result(frame)
            elif kind == "error":
                self.refused.append(frame)
                self.told.set()

    async def call(self, to: str, method: str, params: Any) -> dict[str, Any]:
        rid = f"{self.name}-{next(self.ids)}"
        self.replies[rid] = answer = asyncio.get_running_loop().create_future()
        await self.send({"type": "rpc", "id": rid, "to": to, "method": method,
                         "params": params, "timeout_ms": 10_000})
        return await asyncio.wait_for(answer, 20)


class WsPeer(Peer):
    def __init__(self, client: RawClient, codec: str) -> None:
        super().__init__(f"ws-{codec}", codec, f"client:{client.info['client_id']}")
        self.client = client

    async def send(self, frame: dict[str, Any]) -> None:
        await self.client.ws.send(cbor2.dumps(frame) if self.codec == "cbor"
                                  else json.dumps(frame))

    async def frames(self) -> Any:
        while True:
            for frame in _frames(await self.client.ws.recv()):
                yield frame


class TunnelPeer(Peer):
    def __init__(self, client: aiomqtt.Client, dev: str) -> None:
        super().__init__("tunnel", "cbor", f"device:{dev}")
        self.client, self.dev = client, dev

    async def send(self, frame: dict[str, Any]) -> None:
        await self.client.publish(f"rtnode/v1/{self.dev}/in", cbor2.dumps(frame), qos=1)

    async def frames(self) -> Any:
        async for message in self.client.messages:
            yield cbor2.loads(bytes(message.payload))


async def test_seeded_rpc_values_between_every_caller_and_callee(make_node: Any) -> None:
    print(f"\nrpc value fuzz: seed {SEED} (RTNODE_TEST_VALUE_FUZZ_SEED={SEED})")
    rng = random.Random(SEED ^ 0x0DDC0DE)
    n1 = await make_node(**OPEN, max_errors_per_min=100_000)
    n2 = await make_node(**OPEN, max_errors_per_min=100_000)
    async with contextlib.AsyncExitStack() as stack:
        peers: list[Peer] = []
        for codec, node in (("json", n1), ("cbor", n2)):
            client = await RawClient.connected(ws_url(node), token(f"rv-{codec}", **RIGHTS),
                                               codec=codec)
            stack.push_async_callback(client.close)
            peers.append(WsPeer(client, codec))
        dev = f"rv-dev-{uuid.uuid4().hex[:6]}"
        mqtt = await stack.enter_async_context(mqtt_device(n2, dev, **RIGHTS))
        await mqtt.subscribe(f"rtnode/v1/{dev}/out", qos=1)
        peers.append(TunnelPeer(mqtt, dev))
        tasks = [asyncio.create_task(p.serve()) for p in peers]
        stack.callback(lambda: [t.cancel() for t in tasks])
        # The device's session is there once it answers a ping on its tunnel.
        ping = peers[2].replies["ping"] = asyncio.get_running_loop().create_future()
        await peers[2].send({"type": "ping", "id": "ping"})
        assert (await asyncio.wait_for(ping, 10))["type"] == "pong"
        counts: dict[str, int] = {}
        for i in range(CALLS):
            caller = rng.choice(peers)
            callee: Peer | None = rng.choice([*(p for p in peers if p is not caller), None])
            to = callee.target if callee else "server"
            params, read = _draw(rng, caller.codec)
            method = "echo"
            result_read = None
            malformed = callee is not None and rng.random() < 0.1
            if malformed:
                method = f"malformed-{i}"
                callee.answers[method] = rng.choice(MALFORMED)
            elif callee is not None and rng.random() < 0.35:
                method = f"answer-{i}"
                callee.answers[method], result_read = _draw(rng, callee.codec)
            calls = len(callee.calls) if callee else 0
            refused = len(callee.refused) if callee else 0
            where = f"seed {SEED}, call {i}: {caller.name} -> {to} {method}"
            try:
                answer = await caller.call(to, method, params)
            except TimeoutError:
                raise AssertionError(f"{where}: no answer to params {params!r}") from None
            if not inside(read):
                assert (answer["type"], answer.get("code")) == ("error", 4000), (where, answer)
                assert callee is None or len(callee.calls) == calls, (where, "reached")
                counts["params refused"] = counts.get("params refused", 0) + 1
                continue
            if callee is not None:
                got = callee.calls[-1]
                assert len(callee.calls) == calls + 1 and got["method"] == method, where
                assert canon(got["params"]) == canon(_view(read, callee.codec)), (
                    where, got["params"], read)
            if method == "echo":  # what the callee got, sent back
                sent_back = _view(read, callee.codec) if callee else read
                assert answer["type"] == "result", (where, answer)
                assert canon(answer["result"]) == canon(_view(sent_back, caller.codec)), (
                    where, answer["result"], sent_back)
                counts["echoed"] = counts.get("echoed", 0) + 1
            elif not malformed and inside(result_read):
                assert answer["type"] == "result", (where, answer)
                assert canon(answer["result"]) == canon(_view(result_read, caller.codec)), (
                    where, answer["result"], result_read)
                counts["answered"] = counts.get("answered", 0) + 1
            else:
                assert (answer["type"], answer.get("code"), answer.get("retry")) == (
                    "error", 4500, True), (where, answer, callee.answers[method])
                assert callee is not None
                async with asyncio.timeout(10):
                    while len(callee.refused) == refused:
                        callee.told.clear()
                        await callee.told.wait()
                assert callee.refused[-1]["code"] == 4000, (where, callee.refused[-1])
                label = "reply malformed" if malformed else "result refused"
                counts[label] = counts.get(label, 0) + 1
        for task in tasks:
            assert not task.done() or task.cancelled(), task.exception()
    print("rpc value fuzz: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
