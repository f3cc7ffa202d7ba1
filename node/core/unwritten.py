"""The one empty map that the rarely used maps of a connection or a room start as.

An empty dict is 64 bytes, and a connection has about ten maps that most connections never
write (rpc calls in flight, held publishes, plain rooms...): 10,000 connections would hold
6 MB of empty dicts. Such a map starts as :data:`UNWRITTEN` and its owner makes a map of its
own at the first write::

    if self._held is UNWRITTEN:
        self._held = {}
    self._held[room] = ...

Reading it works as for any empty dict (``get``, ``in``, ``len``, iteration, ``pop`` with a
default, ``clear``). Writing it raises ``TypeError``: a write that forgot the test above must
fail loudly, never put one connection's entries where every other connection reads.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["UNWRITTEN"]


class _Unwritten(dict[Any, Any]):
    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("the shared empty map is never written: make a map of its own first")

    __setitem__ = __delitem__ = setdefault = update = popitem = __ior__ = _refuse

    def pop(self, key: Any, *default: Any) -> Any:
        if default:
            return default[0]
        raise KeyError(key)

    def clear(self) -> None:
        return None


#: The shared empty map (see the module's docstring).
UNWRITTEN: dict[Any, Any] = _Unwritten()
