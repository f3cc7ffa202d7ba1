"""Every module declares ``__all__``, every name in it exists, and packages re-export uniquely."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["node", "actors", "bridge", "devices"]


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_all_is_declared_and_complete(name: str) -> None:
    mod = importlib.import_module(name)
    assert hasattr(mod, "__all__"), f"{name} has no __all__"
    for item in mod.__all__:
        assert hasattr(mod, item), f"{name}.__all__ names missing {item}"
    assert len(set(mod.__all__)) == len(mod.__all__)
