"""The shared empty map (node/core/unwritten.py): read as any empty dict, never written."""

from __future__ import annotations

from typing import Any

import pytest

from node.core.unwritten import UNWRITTEN


def test_it_reads_as_an_empty_map() -> None:
    assert len(UNWRITTEN) == 0 and not UNWRITTEN
    assert "a" not in UNWRITTEN and UNWRITTEN.get("a") is None and UNWRITTEN.get("a", 1) == 1
    assert list(UNWRITTEN) == [] and list(UNWRITTEN.items()) == []
    assert UNWRITTEN.pop("a", None) is None and UNWRITTEN.pop("a", 2) == 2
    with pytest.raises(KeyError):
        UNWRITTEN.pop("a")
    UNWRITTEN.clear()
    assert UNWRITTEN == {}


@pytest.mark.parametrize("write", [
    lambda m: m.__setitem__("a", 1),
    lambda m: m.setdefault("a", []),
    lambda m: m.update({"a": 1}),
    lambda m: m.update(a=1),
    lambda m: m.popitem(),
    lambda m: m.__delitem__("a"),
    lambda m: m.__ior__({"a": 1}),
])
def test_every_write_raises_and_leaves_it_empty(write: Any) -> None:
    with pytest.raises(TypeError, match="never written"):
        write(UNWRITTEN)
    assert len(UNWRITTEN) == 0
