"""The connections of one node: the node-wide and per-user limits, targeting
(``/api/disconnect``) and the drain.

Each admitted connection gets an :class:`IndexedConnection` with a connection id of its own (a
serial of this node, never reused), and is found by (tenant, user) and by (tenant, client id).
A client id is not unique: a device that reconnects with the same id (an MQTT takeover) has two
connections for a while, and the same device id may exist in two tenants. So nothing is keyed
by the client id alone, and removal is compare-and-delete: a connection removes its own entry,
never its successor's.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

from node.protocol.errors import ProtocolError
from node.protocol.tokens import Principal

__all__ = ["ConnectionIndex", "IndexedConnection"]

_Key = tuple[str, str]
# In the tables by user and by client id, one connection of a key is kept as itself, several
# as a dict by connection id: most users and client ids have one connection, and a dict of one
# is ~230 bytes per connection and table.


@dataclass(frozen=True, slots=True, eq=False)
class IndexedConnection:
    """One connection in the index; its actor keeps it to remove exactly this entry.

    Attributes:
        conn_id: Unique among this node's connections, never reused.
        tenant: The connection's tenant.
        sub: Its user or device id.
        client_id: Its client id (not unique: see the module's docstring).
        ref: Its actor, to tell it things (a ``Shutdown``).
    """

    conn_id: int
    tenant: str
    sub: str
    client_id: str
    ref: Any


class ConnectionIndex:
    """Connections of this node by connection id, by user and by client id, within a tenant.

    Attributes:
        by_id: Connection id -> entry.
        refusals: Connections refused by :meth:`check_room`, by code (4503, 4029), for metrics.

    Example:
        entry = index.add(principal, client_id, ref, per_user=64, total=10000)  # or 4029/4503
        ...
        index.remove(entry)  # only this connection, even if another has the same client id
    """

    def __init__(self) -> None:
        self.by_id: dict[int, IndexedConnection] = {}
        self._by_user: dict[_Key, IndexedConnection | dict[int, IndexedConnection]] = {}
        self._by_client: dict[_Key, IndexedConnection | dict[int, IndexedConnection]] = {}
        self._serial = itertools.count(1)
        self.refusals: Counter[int] = Counter()
        self._empty_waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self.by_id)

    def user_count(self, tenant: str, sub: str) -> int:
        """How many connections the user ``sub`` of ``tenant`` has on this node."""
        return len(_entries(self._by_user, (tenant, sub)))

    def check_room(self, principal: Principal, *, per_user: int, total: int) -> None:
        """Whether one more connection of ``principal`` fits.

        Raises:
            ProtocolError: 4503 (retry) when the node has ``total`` connections; 4029 when the
                user has ``per_user``.
        """
        if len(self.by_id) >= total:
            self.refusals[4503] += 1
            raise ProtocolError(4503, "too many connections on this node", retry=True)
        if self.user_count(principal.tenant, principal.sub) >= per_user:
            self.refusals[4029] += 1
            raise ProtocolError(4029, "too many connections for this user")

    def add(self, principal: Principal, client_id: str, ref: Any, *, per_user: int,
            total: int) -> IndexedConnection:
        """Index a new connection, within the limits (see :meth:`check_room`).

        Returns:
            The entry to pass to :meth:`remove` when the connection ends.

        Raises:
            ProtocolError: 4503 or 4029, as :meth:`check_room`; nothing is indexed then.
        """
        self.check_room(principal, per_user=per_user, total=total)
        entry = IndexedConnection(next(self._serial), principal.tenant, principal.sub,
                                  client_id, ref)
        self.by_id[entry.conn_id] = entry
        _add(self._by_user, (entry.tenant, entry.sub), entry)
        _add(self._by_client, (entry.tenant, client_id), entry)
        return entry

    def remove(self, entry: IndexedConnection) -> bool:
        """Remove ``entry`` if it is still indexed (compare-and-delete); False if it was not."""
        if self.by_id.get(entry.conn_id) is not entry:
            return False
        del self.by_id[entry.conn_id]
        _discard(self._by_user, (entry.tenant, entry.sub), entry.conn_id)
        _discard(self._by_client, (entry.tenant, entry.client_id), entry.conn_id)
        if not self.by_id:
            waiters, self._empty_waiters = self._empty_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        return True

    def select(self, tenant: str, user: str | None = None,
               client_id: str | None = None) -> list[IndexedConnection]:
        """The connections of ``tenant`` only: every one of ``user``, or those with
        ``client_id`` (of ``user`` when both are given), oldest first."""
        if client_id is not None:
            found = _entries(self._by_client, (tenant, client_id))
            return [c for _, c in sorted(found.items()) if user is None or c.sub == user]
        if user is None:
            return []
        return [c for _, c in sorted(_entries(self._by_user, (tenant, user)).items())]

    def compact(self) -> None:
        """Size the tables to the connections there are now (a dict keeps its peak's size)."""
        self.by_id = dict(self.by_id)
        self._by_user = dict(self._by_user)
        self._by_client = dict(self._by_client)

    def refs(self) -> list[Any]:
        """The actor of every connection (for the drain)."""
        return [entry.ref for entry in self.by_id.values()]

    async def wait_empty(self) -> None:
        """Return once no connection is left (for a drain)."""
        if self.by_id:
            fut = asyncio.get_running_loop().create_future()
            self._empty_waiters.append(fut)
            await fut


def _entries(table: dict[_Key, IndexedConnection | dict[int, IndexedConnection]],
             key: _Key) -> dict[int, IndexedConnection]:
    found = table.get(key)
    if found is None:
        return {}
    if isinstance(found, IndexedConnection):
        return {found.conn_id: found}
    return found


def _add(table: dict[_Key, IndexedConnection | dict[int, IndexedConnection]], key: _Key,
         entry: IndexedConnection) -> None:
    found = table.get(key)
    if found is None:
        table[key] = entry
    elif isinstance(found, IndexedConnection):
        table[key] = {found.conn_id: found, entry.conn_id: entry}
    else:
        found[entry.conn_id] = entry


def _discard(table: dict[_Key, IndexedConnection | dict[int, IndexedConnection]], key: _Key,
             conn_id: int) -> None:
    found = table.get(key)
    if found is None:
        return
    if isinstance(found, IndexedConnection):
        if found.conn_id == conn_id:
            del table[key]
        return
    found.pop(conn_id, None)
    if len(found) == 1:
        table[key] = next(iter(found.values()))
    elif not found:
        del table[key]
