"""What an ``rtnode`` command imports before it does anything, and the settings' sources.

Every ``rtnode`` (``python -m node``) process pays for its imports: the test suite starts dozens
of them. ``token``, ``run --help`` and a refused flag need neither NATS, aiohttp, the event loop,
PyJWT nor pydantic-settings; each command imports what it uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.protocol.errors import ConfigError
from node.protocol.settings import load_settings

# Imported by commands that use them, never by the command line itself.
HEAVY = ("aiohttp", "aiomqtt", "asyncio", "cbor2", "cryptography", "jwt", "nats",
         "pydantic_settings", "uvloop", "websockets")


def _imported_by(code: str, tmp_path: Path) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; the heavy modules it imported, and its result."""
    script = (
        "import json, sys\n"
        f"{code}\n"
        f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules), "
        "'result': result}))\n"
    )
    # No RTNODE_* of the test's environment; its PYTHONPATH, if any, to import the same code.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return answer


def test_the_command_line_imports_no_heavy_module(tmp_path: Path) -> None:
    answer = _imported_by("import node.cli\nresult = None", tmp_path)
    assert answer["heavy"] == []


def test_a_refused_flag_and_help_import_no_heavy_module(tmp_path: Path) -> None:
    code = ("import contextlib, io\nfrom node.cli import main\nresult = []\n"
            "for argv in (['run', '--http-port', 'notaport'], ['token', '--ttl', '1h'],\n"
            "             ['consume', '--group', 'g'], ['run', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.redirect_stderr(io.StringIO()):\n"
            "        try:\n"
            "            result.append(main(argv))\n"
            "        except SystemExit as exc:\n"
            "            result.append(exc.code)\n")
    answer = _imported_by(code, tmp_path)
    assert answer["result"] == [2, 2, 2, 0]
    assert answer["heavy"] == []


def test_token_imports_pyjwt_only(tmp_path: Path) -> None:
    code = ("import contextlib, io\nfrom node.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    code = main(['token', '--sub', 'alice', '--data-dir', 'data', "
            "'--create-secret'])\n"
            "result = [code, out.getvalue().count('.')]\n")
    answer = _imported_by(code, tmp_path)
    assert answer["result"] == [0, 2]  # one JWT printed
    assert answer["heavy"] == ["cryptography", "jwt"]


def test_environment_json_that_is_not_json_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTNODE_WEBHOOKS", "notjson")
    with pytest.raises(ConfigError, match=r"webhooks .*not a JSON list of webhooks"):
        load_settings()
    monkeypatch.delenv("RTNODE_WEBHOOKS")
    monkeypatch.setenv("RTNODE_NAMESPACES", "{bad")
    with pytest.raises(ConfigError, match=r"namespaces \(RTNODE_NAMESPACES\): not JSON"):
        load_settings()


def test_environment_sources_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Names in any case; a namespace from the environment joins the file's (tables merge).
    cfg = tmp_path / "rt.toml"
    cfg.write_text("http_port = 1111\n[namespaces.chat]\nhistory_size = 5\nvolatile = true\n")
    monkeypatch.setenv("rtnode_mqtt_port", "3333")
    monkeypatch.setenv("RTNODE_NAMESPACES", json.dumps({"chat": {"history_size": 7},
                                                        "dev": {"presence": False}}))
    monkeypatch.setenv("RTNODE_WEBHOOKS", json.dumps(
        [{"url": "http://127.0.0.1:1/", "rooms": "chat:*", "durable": "d"}]))
    s = load_settings(cfg, http_port="2222")
    assert (s.http_port, s.mqtt_port) == (2222, 3333)
    chat = s.room_policy("chat:x")
    assert (chat.history_size, chat.volatile) == (7, True)
    assert s.room_policy("dev:x").presence is False
    assert [hook.durable for hook in s.webhooks] == ["d"]
