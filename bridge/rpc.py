"""Rpc between clients across the cluster, over NATS request/reply.

A node subscribes, with one queue group for the whole cluster, to the subjects of the targets it
holds: ``rt.rpc.<tenant>.client.<client_id>`` for each connection and
``rt.rpc.<tenant>.<user|device>.<sub>`` for each principal. A request to a target nobody holds
gets NATS's "no responders" at once (4004); one held by several connections goes to one of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import cbor2
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

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
        # subject -> (subscription, local handlers in registration order)
        self._subs: dict[str, tuple[Subscription | None, list[Callable[[dict[str, Any], str],
                                                                       None]]]] = {}

    async def register(self, tenant: str, targets: list[str],
                       handler: Callable[[dict[str, Any], str], None]) -> None:
        """Route requests for ``targets`` (``client:<id>``, ``user:<sub>``...) to ``handler``,
        called with (request, reply subject). Returns once the server has the routes."""
        new = []
        for target in targets:
            subject = rpc_subject(tenant, target)
            entry = self._subs.get(subject)
            if entry is None:
                entry = self._subs[subject] = (None, [])
                new.append(subject)
            entry[1].append(handler)
        for subject in new:
            await self._subscribe(subject)
        if new:
            try:  # one round trip: the server has processed the SUBs
                await self.link.nc.flush(timeout=2)
            except Exception as exc:
                log.warning("! rpc routes not confirmed: %s", exc)

    def unregister(self, tenant: str, targets: list[str],
                   handler: Callable[[dict[str, Any], str], None]) -> None:
        """Stop routing ``targets`` to ``handler``."""
        for target in targets:
            subject = rpc_subject(tenant, target)
            entry = self._subs.get(subject)
            if entry is None:
                continue
            if handler in entry[1]:
                entry[1].remove(handler)
            if not entry[1]:
                # Keep the route for a grace period, answering 4004 at once: an UNSUB still
                # in flight would make the server deliver a request nobody answers (a 4504
                # after the caller's whole timeout instead of a 4004 now).
                asyncio.get_running_loop().call_later(
                    _UNSUBSCRIBE_GRACE_S, self._drop_if_unused, subject)

    async def _subscribe(self, subject: str) -> None:
        async def on_request(msg: Msg) -> None:
            if not msg.reply:
                return
            entry = self._subs.get(subject)
            if entry is None or not entry[1]:
                # The target left between the request and now: say so rather than time out.
                self.respond(msg.reply, {"error": {"code": 4004, "reason": "rpc target offline",
                                                   "retry": True}})
                return
            try:
                request = cbor_loads_strict(msg.data)
            except CodecError:
                return
            if isinstance(request, dict):
                entry[1][0](request, msg.reply)

        try:
            sub = await self.link.nc.subscribe(subject, queue=_QUEUE, cb=on_request)
        except Exception as exc:
            log.warning("! cannot subscribe %s: %s", subject, exc)
            return
        entry = self._subs.get(subject)
        if entry is None:  # unregistered while subscribing
            await self._unsubscribe(sub)
        else:
            self._subs[subject] = (sub, entry[1])

    def _drop_if_unused(self, subject: str) -> None:
        entry = self._subs.get(subject)
        if entry is None or entry[1]:
            return  # gone already, or in use again
        del self._subs[subject]
        if entry[0] is not None:
            asyncio.get_running_loop().create_task(self._unsubscribe(entry[0]))

    async def _unsubscribe(self, sub: Subscription) -> None:
        try:
            await sub.unsubscribe()
        except Exception:
            pass

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
            raise RpcError(code if isinstance(code, int) and 4000 <= code < 5000 else 4500,
                           str(reason)[:200] if reason else "rpc failed",
                           retry=bool(err.get("retry", False)))
        return answer.get("result")

    def respond(self, reply: str, answer: dict[str, Any]) -> None:
        """Send ``answer`` ({result} or {error}) to a waiting requester (never waits)."""
        async def send() -> None:
            try:
                await self.link.nc.publish(reply, cbor2.dumps(answer))
            except Exception as exc:
                log.debug("! rpc answer lost: %s", exc)

        asyncio.get_running_loop().create_task(send())
