"""Server-side rpc handlers (``rpc`` frames with ``to: "server"``).

A deployment adds its own by importing a module that registers them, named by the
``rpc_modules`` setting (``RTNODE_RPC_MODULES=myapp.rpc``)::

    # myapp/rpc.py
    from pydantic import BaseModel
    from node.core.rpc import rpc_method

    class Add(BaseModel):
        a: int
        b: int

    @rpc_method("math.add")
    async def add(params: Add, caller: Principal) -> int:
        return params.a + params.b

``params`` are validated against the handler's first parameter's annotation (any type pydantic
understands); a mismatch is an ``error`` 4000 for the caller. ``caller`` is the principal of the
connection that called. Errors raised as ``ProtocolError`` reach the caller with their code;
anything else is 4500 (details only in the node's log).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, get_type_hints

from pydantic import TypeAdapter, ValidationError

from node.protocol.errors import ConfigError, ProtocolError
from node.protocol.tokens import Principal

__all__ = ["RpcRegistry", "default_registry", "load_rpc_modules", "rpc_method"]

log = logging.getLogger("node.core.rpc")

Handler = Callable[[Any, Principal], Awaitable[Any]]


class RpcRegistry:
    """Named handlers for server rpcs."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Handler, TypeAdapter[Any]]] = {}

    def register(self, name: str, handler: Handler) -> None:
        """Add ``handler`` under ``name`` (its first parameter's annotation validates params)."""
        if name in self._handlers:
            raise ValueError(f"rpc method {name!r} is already registered")
        params = list(inspect.signature(handler).parameters)
        hints = get_type_hints(handler)
        annotation = hints.get(params[0], Any) if params else Any
        self._handlers[name] = (handler, TypeAdapter(annotation))

    def __contains__(self, name: str) -> bool:
        return name in self._handlers

    async def call(self, name: str, params: Any, caller: Principal) -> Any:
        """Run handler ``name``.

        Raises:
            ProtocolError: 4004 unknown method, 4000 bad params, the handler's own code, or 4500.
        """
        entry = self._handlers.get(name)
        if entry is None:
            raise ProtocolError(4004, f"no rpc method {name[:64]!r}")
        handler, adapter = entry
        try:
            value = adapter.validate_python(params)
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in err["loc"]) or "params"
            raise ProtocolError(4000, f"bad params {where}: {err['msg']}") from None
        try:
            return await handler(value, caller)
        except ProtocolError:
            raise
        except Exception:
            log.exception("! rpc method %s failed", name)
            raise ProtocolError(4500, "rpc method failed", retry=True) from None


default_registry = RpcRegistry()


def rpc_method(name: str) -> Callable[[Handler], Handler]:
    """Register the decorated coroutine function as server rpc ``name``."""

    def decorate(fn: Handler) -> Handler:
        default_registry.register(name, fn)
        return fn

    return decorate


def load_rpc_modules(names: list[str]) -> None:
    """Import the modules that register a deployment's rpc methods.

    Raises:
        ConfigError: A module cannot be imported.
    """
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ConfigError(f"cannot import rpc module {name!r}: {exc}") from None


@rpc_method("echo")
async def _echo(params: Any, caller: Principal) -> Any:
    """Returns its params: a round-trip check."""
    return params


@rpc_method("time")
async def _time(params: Any, caller: Principal) -> dict[str, int]:
    """The node's clock, in ms since the epoch."""
    return {"ms": int(time.time() * 1000)}
