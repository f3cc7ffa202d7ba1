"""The rpc rules of a :class:`~node.core.session.ConnectionSession`: rights and values of the
rpcs a client sends, the bookkeeping of those it answers (ids, timeouts, replies). Pure, like
the session it is part of."""

from __future__ import annotations

import logging
from typing import Any

from node.core.session_commands import (
    CallRpc,
    CancelTimer,
    CommandQueue,
    RespondRpc,
    StartTimer,
)
from node.core.unwritten import UNWRITTEN
from node.protocol.errors import ProtocolError
from node.protocol.frames import Reply, Rpc, error_frame
from node.protocol.tokens import Principal
from node.protocol.values import check_value

__all__ = ["RpcRules"]

log = logging.getLogger("node.core.session")


class RpcRules(CommandQueue):
    """Rpcs of one connection (a part of ``ConnectionSession``, which sets the state)."""

    principal: Principal | None
    client_id: str
    _rpc: bool
    _rpc_serial: int
    _rpc_in: dict[str, str]  # node-sent rpc id -> the caller's reply_to
    _rpc_out: dict[str, tuple[Any, bool, str]]  # call -> (request id, server, method)

    def rpc_targets(self) -> list[str]:
        """The rpc targets this connection answers for (``client:<id>``, ``user:<sub>``...)."""
        assert self.principal is not None
        targets = [f"client:{self.client_id}"]
        if self.principal.kind in ("user", "device"):
            targets.append(f"{self.principal.kind}:{self.principal.sub}")
        return targets

    def _rpc_call(self, frame: Rpc, now: float) -> None:
        principal = self.principal
        assert principal is not None
        if not principal.can_call(frame.to):
            raise ProtocolError(4003, "no rpc right for this target")
        if frame.id is None:
            raise ProtocolError(4000, "an rpc needs an id")
        check_value(frame.params, "params")  # the target may speak another codec
        server = frame.to == "server"
        if not server and not self._rpc:
            self._send(error_frame(4004, "rpc is not available", id=frame.id))
            return
        self._rpc_serial += 1
        call = f"o{self._rpc_serial}"
        if self._rpc_out is UNWRITTEN:
            self._rpc_out = {}
        self._rpc_out[call] = (frame.id, server, frame.method)
        request = {"method": frame.method, "params": frame.params, "timeout_ms": frame.timeout_ms,
                   "from": {"user": principal.sub, "kind": principal.kind,
                            "client_id": self.client_id}}
        timeout_s = frame.timeout_ms / 1000
        self._commands.append(CallRpc(call, frame.to, frame.method, frame.params, timeout_s,
                                      request))
        self._commands.append(StartTimer(("rpc-out", call), now + timeout_s))

    def receive_rpc_result(self, call: str, result: Any) -> None:
        """The answer to :class:`CallRpc` ``call`` (dropped when it came after its timeout)."""
        pending = self._rpc_out.pop(call, None)
        if pending is None:
            return
        request_id, server, method = pending
        self._commands.append(CancelTimer(("rpc-out", call)))
        if server:
            try:  # a server method's result must be deliverable in every codec
                check_value(result, "result")
            except ProtocolError as exc:
                log.error("! rpc method %s returned %s", method, exc.reason)
                self._send(error_frame(4500, "rpc method failed", id=request_id, retry=True))
                return
        self._reply(request_id, {"type": "result", "result": result})

    def receive_rpc_failed(self, call: str, code: int, reason: str, retry: bool = False) -> None:
        """:class:`CallRpc` ``call`` failed: 4004 (target offline), 4504 (timeout), 4500..."""
        pending = self._rpc_out.pop(call, None)
        if pending is not None:
            self._commands.append(CancelTimer(("rpc-out", call)))
            self._send(error_frame(code, reason, id=pending[0], retry=retry))

    def receive_rpc_request(self, request: dict[str, Any], reply_to: str, now: float) -> None:
        """An rpc for this client from another one: send it on as an ``rpc`` frame."""
        method = request.get("method")
        if not isinstance(method, str) or not self._rpc:
            return
        try:  # checked by the caller's node too; an older one may not have
            check_value(request.get("params"), "params")
        except ProtocolError as exc:
            self._commands.append(RespondRpc(reply_to, {"error": {"code": 4000,
                                                                  "reason": exc.reason}}))
            return
        self._rpc_serial += 1
        rpc_id = f"r{self._rpc_serial}"
        timeout_ms = request.get("timeout_ms")
        timeout = timeout_ms / 1000 if isinstance(timeout_ms, int) else 60.0
        if self._rpc_in is UNWRITTEN:
            self._rpc_in = {}
        self._rpc_in[rpc_id] = reply_to
        self._commands.append(StartTimer(("rpc-in", rpc_id), now + timeout))
        self._send({"type": "rpc", "id": rpc_id, "from": request.get("from"),
                    "method": method, "params": request.get("params")})

    def _rpc_reply_invalid(self, rpc_id: str) -> None:
        """A ``reply`` to ``rpc_id`` that could not be validated (a field of the wrong type, a
        value outside the model): its caller gets 4500 with ``retry`` now, not at its
        timeout (nothing if no such rpc waits: late, or an id of the client's own)."""
        reply_to = self._rpc_in.pop(rpc_id, None)
        if reply_to is None:
            return
        self._commands.append(CancelTimer(("rpc-in", rpc_id)))
        self._commands.append(RespondRpc(reply_to, {"error": {
            "code": 4500, "reason": "rpc target sent an invalid reply", "retry": True}}))

    def _rpc_reply(self, frame: Reply, now: float) -> None:
        rpc_id = str(frame.id)
        reply_to = self._rpc_in.pop(rpc_id, None)
        if reply_to is None:
            return  # late, or not ours: the caller has had its timeout
        self._commands.append(CancelTimer(("rpc-in", rpc_id)))
        if frame.error is not None:
            answer: dict[str, Any] = {"error": {"code": frame.error.code,
                                                "reason": frame.error.reason}}
            checked, where = frame.error.code, "error.code"
        else:
            answer = {"result": frame.result}
            checked, where = frame.result, "result"
        try:  # the caller may speak another codec
            check_value(checked, where)
        except ProtocolError:
            self._commands.append(RespondRpc(reply_to, {"error": {
                "code": 4500, "reason": "rpc target sent an invalid reply", "retry": True}}))
            raise
        self._commands.append(RespondRpc(reply_to, answer))
