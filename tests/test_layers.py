"""The layers of the code, checked mechanically from every module's imports.

From the inside out, imports flow one way:

- ``actors``: the generic actor runtime; imports nothing of the project.
- ``node.protocol``: the protocol leaves (frames, codecs, values, subjects, tokens, settings,
  errors); import only each other.
- ``node.core``: the domain (admission, sessions, connection and room actors, outbox, limits,
  ports); imports the runtime and the leaves, and no I/O library.
- ``bridge``: the adapters (NATS, HTTP, WebSocket, SSE, MQTT); import the runtime, the leaves
  and the domain, never the program.
- the program (``node``, ``node.app``, ``node.cli``, ``node.memory``, ``node.metrics``,
  ``node.nats_server``, ``node.workers``, ``node.__main__``): sees everything.
- ``devices``: the client side (device SDK, Python client, simulator); imports the leaves only,
  so it could ship on its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = {"node", "node.app", "node.cli", "node.memory", "node.metrics", "node.nats_server",
           "node.workers", "node.__main__"}
# Libraries that do I/O: never in the leaves or the domain.
IO_LIBRARIES = {"aiohttp", "nats", "websockets", "aiomqtt", "amqtt", "paho", "socket",
                "subprocess", "uvloop"}

ALLOWED = {
    "runtime": {"runtime"},
    "leaves": {"leaves"},
    "domain": {"runtime", "leaves", "domain"},
    "adapters": {"runtime", "leaves", "domain", "adapters"},
    "program": {"runtime", "leaves", "domain", "adapters", "program", "client"},
    "client": {"leaves", "client"},
}


def layer(module: str) -> str | None:
    """The layer of a project module (None for a third-party one)."""
    top = module.split(".")[0]
    if top == "actors":
        return "runtime"
    if module == "node.protocol" or module.startswith("node.protocol."):
        return "leaves"
    if module == "node.core" or module.startswith("node.core."):
        return "domain"
    if top == "bridge":
        return "adapters"
    if top == "devices":
        return "client"
    if top == "node":
        return "program"
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[str] = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append(name)
    return out


def _sources() -> list[Path]:
    return sorted(p for pkg in ("actors", "node", "bridge", "devices")
                  for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path: Path) -> None:
    module = _module_name(path)
    mine = layer(module)
    assert mine is not None
    bad = []
    for name in _imports(path, module):
        theirs = layer(name)
        if theirs is not None and theirs not in ALLOWED[mine]:
            bad.append(f"{name} ({theirs})")
        if mine in ("leaves", "domain", "runtime", "client") and \
                name.split(".")[0] in IO_LIBRARIES and mine != "client":
            bad.append(f"{name} (an I/O library)")
    assert not bad, f"{module} ({mine}) imports {', '.join(bad)}"


def test_the_program_is_only_what_it_says() -> None:
    """Every module of ``node`` outside the leaves and the domain is named in PROGRAM."""
    program = {m for m in map(_module_name, _sources()) if layer(m) == "program"}
    assert program <= PROGRAM, program - PROGRAM


def test_no_module_reaches_into_anothers_private_names() -> None:
    """``from x import _name`` only for a private module of the importer's own package."""
    bad = []
    for path in [*_sources(), *sorted((ROOT / "bench").rglob("*.py"))]:
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] not in ("actors", "node", "bridge", "devices",
                                                 "bench", "tests"):
                continue
            for alias in node.names:
                if not alias.name.startswith("_"):
                    continue
                own_module = node.module == package and \
                    (ROOT / Path(*package.split(".")) / f"{alias.name}.py").exists()
                if not own_module:
                    bad.append(f"{module}: from {node.module} import {alias.name}")
    assert not bad, bad
