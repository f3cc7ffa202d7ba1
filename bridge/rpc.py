"""Rpc between clients across the cluster, over NATS request/reply.

A node subscribes, with one queue group for the whole cluster, to the subjects of the targets it
holds: ``rt.rpc.<tenant>.client.<client_id>`` for each connection and
``rt.rpc.<tenant>.<user|device>.<sub>`` for each principal. A request to a target nobody holds
gets NATS's "no responders" at once (4004); one held by several connections goes to one of them.

A route is cheap: not a nats-py ``Subscription`` (each has an ``asyncio.Queue`` and a task
running a coroutine, ~4 KB per connection for two routes) but a ``Route``
(``bridge/_nats_patches.py``) registered in the client's table of subscriptions, whose messages
are dispatched in the client's read loop, synchronously (a request is only told to an actor's
mailbox). The routes registered within one
turn of the event loop share one PING/PONG with the server: a connection gets its ``connected``
once the server has its routes, without a round trip of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import cbor2
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bridge._nats_patches import Route, subscribe_now
from bridge.nats_link import NatsLink
from node.core.ports import RpcError
from node.protocol.errors import CodecError
from node.protocol.frames import cbor_loads_strict

__all__ = ["NatsRpc", "rpc_subject"]

log = logging.getLogger("bridge.rpc")

_QUEUE = "rtnode"
_UNSUBSCRIBE_GRACE_S = 2.0
_NO_RESPONDERS_RETRY_S = 0.1


def rpc_subject(tenant: str, target: str) -> str:
    """``rt.rpc.<tenant>.<kind>.<id>`` for a target ``<kind>:<id>``."""
    kind, _, ident = target.partition(":")
    return f"rt.rpc.{tenant}.{kind}.{ident}"


class NatsRpc:
    """The ``RpcPort`` of a node.

    Args:
        link: The node's NATS link.
    """

    def __init__(self, link: NatsLink) -> None:
        self.link = link
        # subject -> [its route (None until subscribed), then the local handlers in
        # registration order]: one list, not a tuple and a list (~0.1 KB less per target).
        self._subs: dict[str, list[Any]] = {}
        self._handler = self._on_request  # one bound method for every route, not one each

    async def register(self, tenant: str, targets: list[str],
                       handler: Callable[[dict[str, Any], str], None]) -> None:
        """Route requests for ``targets`` (``client:<id>``, ``user:<sub>``...) to ``handler``,
        called with (request, reply subject). Returns once the server has the routes."""
        new = False
        for target in targets:
            subject = rpc_subject(tenant, target)
            entry = self._subs.get(subject)
            if entry is None:
                self._subs[subject] = [None, handler]
                if self._subscribe(subject):
                    new = True
                continue
            entry.append(handler)
        if new:
            await self.link.confirmed()  # the server has the routes

    def unregister(self, tenant: str, targets: list[str],
                   handler: Callable[[dict[str, Any], str], None]) -> None:
        """Stop routing ``targets`` to ``handler``."""
        for target in targets:
            subject = rpc_subject(tenant, target)
            entry = self._subs.get(subject)
            if entry is None:
                continue
            if handler in entry[1:]:
                del entry[entry.index(handler, 1)]
            if len(entry) == 1:
                # Keep the route for a grace period, answering 4004 at once: an UNSUB still
                # in flight would make the server deliver a request nobody answers (a 4504
                # after the caller's whole timeout instead of a 4004 now).
                asyncio.get_running_loop().call_later(
                    _UNSUBSCRIBE_GRACE_S, self._drop_if_unused, subject)

    def compact(self) -> None:
        """Size the table of routes to what there is now: a dict keeps its peak's size."""
        self._subs = dict(self._subs)

    def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        entry = self._subs.get(msg.subject)
        if entry is None or len(entry) == 1:
            # The target left between the request and now: say so rather than time out.
            self.respond(msg.reply, {"error": {"code": 4004, "reason": "rpc target offline",
                                               "retry": True}})
            return
        try:
            request = cbor_loads_strict(msg.data)
        except CodecError:
            return
        if isinstance(request, dict):
            entry[1](request, msg.reply)

    def _subscribe(self, subject: str) -> bool:
        """Send the SUB of a route (False: the client is closed or draining)."""
        nc: Any = self.link.nc  # its private table and SUB: a Route is no Subscription
        if nc.is_closed or nc.is_draining:
            log.warning("! cannot subscribe %s: NATS connection closed", subject)
            del self._subs[subject]
            return False
        nc._sid += 1
        route = Route(nc, nc._sid, subject, self._handler, _QUEUE)
        nc._subs[route._id] = route
        self._subs[subject][0] = route
        # Into the client's buffer at once (its flusher writes it); while it reconnects, the
        # client sends every subscription of its table again once connected.
        subscribe_now(nc, route)
        return True

    def _drop_if_unused(self, subject: str) -> None:
        entry = self._subs.get(subject)
        if entry is None or len(entry) > 1:
            return  # gone already, or in use again
        del self._subs[subject]
        if entry[0] is not None:
            entry[0].unsubscribe_now()

    async def request(self, tenant: str, target: str, request: dict[str, Any],
                      timeout: float) -> Any:
        """Send ``request`` to ``target`` and return its result.

        Raises:
            RpcError: 4004 target offline, 4504 timed out, or the target's own error.
        """
        subject, payload = rpc_subject(tenant, target), cbor2.dumps(request)
        deadline = asyncio.get_running_loop().time() + timeout
        for attempt in range(2):
            try:
                left = max(0.01, deadline - asyncio.get_running_loop().time())
                msg = await self.link.nc.request(subject, payload, timeout=left)
                break
            except NoRespondersError:
                # Interest in a target that has just connected may not have reached every
                # server yet (routes propagate subscriptions asynchronously): look once more.
                if attempt == 0 and deadline - asyncio.get_running_loop().time() > 0.2:
                    await asyncio.sleep(_NO_RESPONDERS_RETRY_S)
                    continue
                raise RpcError(4004, "rpc target offline", retry=True) from None
            except (TimeoutError, NatsTimeout):
                raise RpcError(4504, "rpc timed out", retry=True) from None
        try:
            answer = cbor_loads_strict(msg.data)
        except CodecError:
            raise RpcError(4500, "bad rpc answer", retry=True) from None
        if not isinstance(answer, dict):
            raise RpcError(4500, "bad rpc answer", retry=True)
        err = answer.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            reason = err.get("reason")
            # One line, as every reason (PROTOCOL.md): a target's may hold newlines.
            text = " ".join(str(reason).split())[:200] if reason else ""
            raise RpcError(code if isinstance(code, int) and 4000 <= code < 5000 else 4500,
                           text or "rpc failed", retry=bool(err.get("retry", False)))
        return answer.get("result")

    def respond(self, reply: str, answer: dict[str, Any]) -> None:
        """Send ``answer`` ({result} or {error}) to a waiting requester (never waits)."""
        async def send() -> None:
            try:
                await self.link.nc.publish(reply, cbor2.dumps(answer))
            except Exception as exc:
                log.debug("! rpc answer lost: %s", exc)

        asyncio.get_running_loop().create_task(send())
