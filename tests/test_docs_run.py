"""Every fenced block of README.md and docs/*.md runs as written (issue 15): a newcomer succeeds by
copy-paste.

Each block is taken with its language and line. A block runs unless the line right before its
fence is a marker comment:

- ``<!-- docs-test: skip REASON -->``: not run; the reason says which test covers it, or why it
  cannot run (another machine, a browser, a fragment of the sample above it).
- ``<!-- docs-test: output -->``: the expected output of the block before it, checked loosely
  (a JSON line: a line of the same ``type`` with at least its keys; other lines: the same words,
  ``<...>`` standing for anything). After the skipped ``make run`` block, the output checked is
  the banner of this test's node, which was started as ``make run`` starts it.
- ``<!-- docs-test: stream SECONDS -->``: a command that runs until stopped (``curl -N``, a
  consumer): it is stopped once it has printed what the docs say it prints (EXPECT below and the
  output block after it, when there are any), else after SECONDS; still running then is
  success, and what it says it prints must have come within SECONDS.

A block of another language without a marker fails the test. How each language runs:
``sh`` in ``bash -e -o pipefail`` with stdin closed; ``python`` with ``.venv/bin/python``, or, when
its first line is a usage comment (``# hello.py: COMMAND``), written to that file and run with
that command; ``toml`` parsed and loaded as a node config by ``node.protocol.settings`` (an unknown
or invalid key fails); ``json`` parsed. Each has a 20 s timeout and must exit 0; where the docs say
what a block prints, its output is checked loosely (EXPECT below).

They run in order against ONE node started as ``make run`` does: ``.venv/bin/rtnode run`` in a
temporary folder holding a ``.venv`` link to this virtual environment (so ``.venv/bin/rtnode``
works as written, and the data dir ``rtnode-data`` is that folder's), every block with that folder
as its working directory. The node takes the default ports 8080 and 1883 when they are free, else
free ports: then 8080 and 1883 in the blocks are rewritten to the node's ports, and
``RTNODE_HTTP_PORT`` / ``RTNODE_MQTT_PORT`` tell the CLI commands (``rtnode devices tunnel``) the
same. The node is stopped by its PID at the end. ``pytest -s`` prints every block's status.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node.protocol.errors import ConfigError
from node.protocol.settings import load_settings
from tests.servers import MS, children_of, free_ports, http_get, pid_alive, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV = Path(sys.prefix)
# A fresh shell: no RTNODE_ settings, no activated virtual environment (``rtnode`` and the
# venv's ``python`` are not on PATH, as after a clone: the docs must say ``.venv/bin/...``).
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("RTNODE_") and k != "VIRTUAL_ENV"}
CLEAN_ENV["PATH"] = os.pathsep.join(
    p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
    if p and Path(p).resolve() != (VENV / "bin").resolve())
TIMEOUT_S = 20.0

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(skip|output|stream)\b\s*(.*?)\s*-->$")
USAGE = re.compile(r"^#\s*([\w./-]+\.py):\s*(.+)$")
SHELL = {"sh", "bash", "shell", "console"}

# What the docs say a block prints, checked loosely: a distinctive piece of the block -> pieces of
# its output. A key that matches no block fails the test (the table follows the docs).
EXPECT: dict[str, list[str]] = {
    "# hello.py:": ["connected", "joined", "event", "published"],
    "# client_hello.py:": ["chat:lobby", "chat:msg"],
    "'{\"type\":\"publish\",\"id\":2,\"room\":\"sensors:lab\"": [
        '"type":"joined"', '"type":"event"', '"type":"published"'],
    "curl -N -H": [": joined chat:lobby"],
    "/api/publish": ['"seq"'],
    "# billing.py:": ["sensors:lab"],
    "| grep uplinks_refused": ["rtnode_mqtt_uplinks_refused_total"],
    "print(cbor2.loads(message.payload))": ["'code': 4000", "the map has no event"],
    ".venv/bin/rtnode replay chat:lobby ": ["chat:msg"],
    "--since-time 2025-01-31T12:00Z --follow": ["reading"],
    "# lamp.py:": ["connected: Success session present: True"],
    "'{\"type\":\"history\",\"id\":2": ['"type":"joined"', '"type":"history"'],
}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str = ""  # "", "skip", "output", "stream"
    arg: str = ""
    status: str = ""
    output: str = field(default="", repr=False)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, with the marker comment right before each."""
    lines = path.read_text().split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln
                         for ln in lines[i + 1:j])
        block = Block(path, i + 1, lang.lower(), body + "\n")
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        if marker:
            block.marker, block.arg = marker.group(1), marker.group(2)
        blocks.append(block)
        i = j + 1
    return blocks


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Node:
    folder: Path
    http_port: int
    mqtt_port: int
    proc: subprocess.Popen[bytes]
    env: dict[str, str]

    def log(self) -> str:
        return (self.folder / "node.out").read_text(errors="replace")

    def rewrite(self, text: str) -> str:
        text = re.sub(r"\b8080\b", str(self.http_port), text)
        return re.sub(r"\b1883\b", str(self.mqtt_port), text)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / ".venv").symlink_to(VENV, target_is_directory=True)
    if _port_free(8080) and _port_free(1883):
        http_port, mqtt_port = 8080, 1883
    else:
        http_port, mqtt_port = free_ports(2)
    env = dict(CLEAN_ENV)
    if (http_port, mqtt_port) != (8080, 1883):
        env.update(RTNODE_HTTP_PORT=str(http_port), RTNODE_MQTT_PORT=str(mqtt_port))
    with open(folder / "node.out", "wb") as out:
        proc = subprocess.Popen([".venv/bin/rtnode", "run"], cwd=folder, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    started = Node(folder, http_port, mqtt_port, proc, env)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"node exited {proc.returncode}:\n{started.log()}")
            return "\n  dev token  " in started.log() and http_get(
                f"http://127.0.0.1:{http_port}/readyz")[0] == 200

        wait_until(ready, 30, what="the node's banner and /readyz")
        yield started
    finally:
        if proc.poll() is None:
            kids = children_of(proc.pid)
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            for kid in kids:  # only this node's own children (its nats-server), by PID
                if pid_alive(kid):
                    os.kill(kid, signal.SIGKILL)


def _run(command: list[str], node: Node, stream_s: float | None = None,
         done: Callable[[str], bool] | None = None) -> tuple[int | None, str]:
    """Run ``command`` in the node's folder, stdin closed: (exit status, stdout and stderr).
    With ``stream_s``: stopped after that long, or as soon as ``done`` says its output so far is
    all it was to print, and None as its status if it was still running then."""
    proc = subprocess.Popen(command, cwd=node.folder, env=node.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    fd = proc.stdout.fileno()
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(fd, 65536), b"")),
                              daemon=True)
    reader.start()
    limit = (stream_s if stream_s is not None else TIMEOUT_S) * MS * 1000
    deadline = time.monotonic() + limit
    finished = False
    while time.monotonic() < deadline:  # bounded: the block's time limit
        try:
            proc.wait(timeout=0.05)
            finished = True
            break
        except subprocess.TimeoutExpired:
            pass
        if done is not None and done(b"".join(chunks).decode(errors="replace")):
            break  # all it prints has come: stopped as at the end of its SECONDS
    if finished:
        reader.join(5)
        proc.stdout.close()
        return proc.returncode, b"".join(chunks).decode(errors="replace")
    os.killpg(proc.pid, signal.SIGTERM)  # the block's own process group, by its id
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(5)
    proc.stdout.close()
    out = b"".join(chunks).decode(errors="replace")
    if stream_s is None:
        raise AssertionError(f"timed out after {TIMEOUT_S} s:\n{out}")
    return None, out


def _run_block(block: Block, node: Node, scratch: Path, shown: Block | None = None) -> str:
    """Run one block as the docs say; its output. Raises AssertionError when it fails.

    ``shown`` is the output block right after it, if any (a stream stops once that has come)."""
    text = node.rewrite(block.text)
    stream_s = float(block.arg or 5) if block.marker == "stream" else None
    if block.lang in SHELL:
        command = ["bash", "-e", "-o", "pipefail", "-c", text]
    elif block.lang == "python":
        usage = USAGE.match(text.splitlines()[0])
        if usage:
            (node.folder / usage.group(1)).write_text(text)
            command = ["bash", "-e", "-o", "pipefail", "-c", usage.group(2)]
        else:
            script = scratch / f"{block.path.stem}_{block.line}.py"
            script.write_text(text)
            command = [".venv/bin/python", str(script)]
    elif block.lang == "toml":
        config = scratch / f"{block.path.stem}_{block.line}.toml"
        config.write_text(text)
        tomllib.loads(text)
        try:
            load_settings(config)
        except ConfigError as exc:
            raise AssertionError(f"not a valid node config: {exc}") from None
        return ""
    elif block.lang == "json":
        json.loads(text)
        return ""
    else:
        raise AssertionError(f"a {block.lang or 'plain'} block cannot run: mark it "
                             "<!-- docs-test: skip REASON --> or <!-- docs-test: output -->")
    done = None
    expected = _expected_pieces(block)
    if stream_s is not None and (expected or shown is not None):
        def done(out: str) -> bool:
            if not all(piece in out for piece in expected):
                return False
            if shown is not None:
                try:
                    _check_output(shown.text, out, node)
                except AssertionError:
                    return False
            return True
    status, out = _run(command, node, stream_s, done)
    if status not in (0, None):
        raise AssertionError(f"exit {status}:\n{out}")
    return out


def _expected_pieces(block: Block) -> list[str]:
    return [piece for key, pieces in EXPECT.items() if key in block.text for piece in pieces]


def _check_output(expected: str, actual: str, node: Node) -> None:
    """``expected`` (a docs output block) matches ``actual`` loosely, line by line."""
    actual_json = []
    for line in actual.splitlines():
        try:
            frame = json.loads(line)
        except ValueError:
            continue
        if isinstance(frame, dict):
            actual_json.append(frame)
    for line in node.rewrite(expected).splitlines():
        if not line.strip():
            continue
        try:
            want = json.loads(line)
        except ValueError:
            want = None
        if isinstance(want, dict):
            assert any(got.get("type") == want.get("type") and set(want) <= set(got)
                       for got in actual_json), f"no frame like {line!r} in:\n{actual}"
            continue
        pattern = "".join(
            ".+?" if part.startswith("<") else re.sub(r"(\\\s)+", r"\\s+", re.escape(part))
            for part in re.split(r"(<[^>]*>)", line.strip()))
        assert re.search(pattern, actual), f"no line like {line!r} in:\n{actual}"


def test_every_docs_block_runs_as_written(node: Node, tmp_path: Path) -> None:
    scratch = tmp_path / "blocks"
    scratch.mkdir()
    blocks = [block for doc in DOCS for block in extract(doc)]
    unused = [key for key in EXPECT if not any(key in b.text for b in blocks)]
    assert not unused, f"EXPECT keys that match no block: {unused}"
    failures: list[str] = []
    banner = node.log()
    started = time.monotonic()
    for index, block in enumerate(blocks):
        previous = blocks[index - 1] if index and blocks[index - 1].path == block.path else None
        t0 = time.monotonic()
        try:
            if block.marker == "skip":
                assert block.arg, "a skip needs its reason"
                block.status = f"skip ({block.arg})"
                continue
            if block.marker == "output":
                assert previous is not None, "an output block follows the block it shows"
                if previous.text.startswith("make run"):
                    _check_output(block.text, banner, node)
                    block.status = "output of make run: the node's banner, matched"
                else:
                    assert previous.status.startswith(("ran", "stream")), \
                        f"the block before ({previous.where}) did not run"
                    _check_output(block.text, previous.output, node)
                    block.status = f"output of {previous.where}, matched"
                continue
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            shown = (following if following is not None and following.path == block.path
                     and following.marker == "output" else None)
            block.output = _run_block(block, node, scratch, shown)
            (scratch / f"{block.path.stem}_{block.line}.out").write_text(block.output)
            for piece in _expected_pieces(block):
                assert piece in block.output, f"output lacks {piece!r}:\n{block.output}"
            kind = "stream" if block.marker == "stream" else "ran"
            block.status = f"{kind} {block.lang} ok {time.monotonic() - t0:.1f} s"
        except AssertionError as exc:
            block.status = f"FAILED: {str(exc).splitlines()[0] if str(exc) else 'assert'}"
            failures.append(f"{block.where} [{block.lang}]: {exc}")
    print(f"\ndocs blocks ({len(blocks)}, {time.monotonic() - started:.1f} s, node on ports "
          f"{node.http_port}/{node.mqtt_port}):")
    for block in blocks:
        print(f"  {block.where:<32} {block.lang or '-':<7} {block.status}")
    assert not failures, "\n\n".join(failures) + f"\n\nnode log:\n{node.log()[-3000:]}"
