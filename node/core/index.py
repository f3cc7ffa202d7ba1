"""The connections of one node, by user and by id: the per-user limit, targeting
(``/api/disconnect``) and the drain."""

from __future__ import annotations

import asyncio
from typing import Any

from node.protocol.tokens import Principal

__all__ = ["ConnectionIndex"]


class ConnectionIndex:
    """Connections of this node by user, for the per-user limit and for targeting."""

    def __init__(self) -> None:
        self.by_user: dict[tuple[str, str], set[str]] = {}
        self.by_id: dict[str, Any] = {}
        self._empty_waiters: list[asyncio.Future[None]] = []

    async def wait_empty(self) -> None:
        """Return once no connection is left (for a drain)."""
        if self.by_id:
            fut = asyncio.get_running_loop().create_future()
            self._empty_waiters.append(fut)
            await fut

    def add(self, principal: Principal, client_id: str, ref: Any, limit: int) -> bool:
        key = (principal.tenant, principal.sub)
        ids = self.by_user.setdefault(key, set())
        if len(ids) >= limit:
            if not ids:
                del self.by_user[key]
            return False
        ids.add(client_id)
        self.by_id[client_id] = ref
        return True

    def remove(self, principal: Principal, client_id: str) -> None:
        key = (principal.tenant, principal.sub)
        ids = self.by_user.get(key)
        if ids is not None:
            ids.discard(client_id)
            if not ids:
                del self.by_user[key]
        self.by_id.pop(client_id, None)
        if not self.by_id:
            waiters, self._empty_waiters = self._empty_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
