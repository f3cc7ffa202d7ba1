"""The node as a newcomer meets it (issue 15, points 6 and 8): one node per data dir, bind errors
in one line, a banner whose commands run as printed, and the README's copy-paste commands.

The "repo" of these tests is a temporary folder with a ``.venv`` link to the test's own virtual
environment: ``.venv/bin/rtnode run`` there is what ``make run`` runs in a fresh clone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.nats_server import EmbeddedNats
from node.protocol.errors import ConfigError
from node.protocol.tokens import mint_token
from tests.servers import MS, NodeProcess, children_of, free_ports, pid_alive, wait_until
from tests.wsclient import RawClient, unique

pytestmark = pytest.mark.integration

VENV = Path(sys.prefix)
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("RTNODE_")}


# The node's own log lines (info and debug, before the failure): not what the user must read.
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO) ")


def _one_line(stderr: str) -> str:
    """The one line a failed start prints (beside its info log), no traceback."""
    lines = [ln for ln in stderr.strip().splitlines() if not _LOG_LINE.match(ln)]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith("rtnode: ") and "Traceback" not in stderr
    return lines[0]


def _rtnode(*args: str, cwd: Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True,
                          text=True, timeout=timeout * MS * 1000, cwd=cwd, env=CLEAN_ENV)


class Program:
    """``rtnode run`` started like a user does: a command line and a folder, stdout kept."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.cwd = cwd
        self.http_port, self.mqtt_port = free_ports(2)
        self.out_path = cwd / f"node-{self.http_port}.out"
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [*argv, "--http-port", str(self.http_port), "--mqtt-port", str(self.mqtt_port)],
                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=CLEAN_ENV)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def banner(self) -> list[str]:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited {self.proc.returncode}:\n{self.output()}")
            return "\n  dev token  " in self.output()

        wait_until(ready, 30, what="the banner")
        return self.output().splitlines()

    def stop(self) -> None:
        if self.proc.poll() is None:
            kids = children_of(self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            for kid in kids:  # only this node's own children, by PID
                if pid_alive(kid):
                    os.kill(kid, 9)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A folder laid out like a clone after ``make run``'s set-up: ``.venv`` in it."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / ".venv").symlink_to(VENV, target_is_directory=True)
    return root


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    started: list[Program] = []
    yield started
    for program in started:
        program.stop()


def _shell(command: str, cwd: Path) -> str:
    """Run ``command`` exactly as printed, in bash from ``cwd``; its stdout."""
    r = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                       timeout=60 * MS * 1000, env=CLEAN_ENV)
    assert r.returncode == 0, f"{command!r} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


async def _live_view_and_chat(port: int, token: str, room: str) -> None:
    """What the console and the README do with the banner's token: join sys:stats and get the
    node's live figures; join and publish in a chat room."""
    client = await RawClient.connected(f"ws://127.0.0.1:{port}/ws", token)
    try:
        joined = await client.request({"type": "join", "room": "sys:stats"})
        assert joined["type"] == "joined", joined
        stats = await client.events(1, room="sys:stats", timeout=10)
        assert stats[0]["event"] == "stats"
        joined = await client.request({"type": "join", "room": room})
        assert joined["type"] == "joined", joined
        ack = await client.request({"type": "publish", "room": room, "event": "chat:msg",
                                    "data": {"text": "hi"}})
        assert ack["type"] == "published", ack
    finally:
        await client.close()


# -- one node per data dir ---------------------------------------------------------------------


def test_a_second_node_on_the_same_data_dir_stops_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = NodeProcess(data, "--api-key", "k-0123456789", name="first").start()
    try:
        first.wait_ready(30)
        assert first.proc is not None
        kids = children_of(first.proc.pid)
        assert len(kids) == 1, "the first node's embedded nats-server"
        http_port, mqtt_port = free_ports(2)
        started = time.monotonic()
        r = _rtnode("run", "--data-dir", str(data), "--http-port", str(http_port),
                    "--mqtt-port", str(mqtt_port))
        took = time.monotonic() - started
        line = _one_line(r.stderr)
        assert r.returncode == 2, r
        assert f"data dir {data}" in line and f"pid {first.proc.pid}" in line, line
        assert "run" in line and "--data-dir" in line, line
        assert "k-0123456789" not in line + (data / "rtnode.lock").read_text(), "secrets hidden"
        assert "ready" not in r.stdout and "starting embedded" not in r.stdout + r.stderr
        assert took < 15, f"the second node took {took:.1f} s to give up"
        # The first node, and its nats-server, go on as if nothing happened.
        assert children_of(first.proc.pid) == kids and pid_alive(kids[0])
        assert first.readyz()[0] == 200
        secret = (data / "jwt-secret").read_text().strip()
        token = mint_token(secret, sub="alice", rooms={"chat:*": ["join", "publish"],
                                                       "sys:stats": ["join"]})
        asyncio.run(_live_view_and_chat(first.http_port, token, unique("chat")))
        # A kill -9 leaves a lock file behind, but no lock: the next node starts.
        first.proc.kill()
        first.proc.wait(10)
    finally:
        first.stop()
    again = NodeProcess(data, name="again").start()
    try:
        again.wait_ready(40)
    finally:
        again.stop()


# -- bind errors -------------------------------------------------------------------------------


@contextlib.contextmanager
def _taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("setting", ["http_port", "mqtt_port", "nats_port"])
def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path: Path, setting: str) -> None:
    flag = "--" + setting.replace("_", "-")
    ports = dict(zip(["--http-port", "--mqtt-port"], map(str, free_ports(2)), strict=True))
    with _taken_port() as port:
        ports[flag] = str(port)
        args = [arg for item in ports.items() for arg in item]
        r = _rtnode("run", "--data-dir", str(tmp_path / "data"), *args)
    line = _one_line(r.stderr)
    assert r.returncode == 2, r
    assert line == f"rtnode: port {port} ({setting}, {flag}) is in use by another process", line
    assert "starting embedded nats-server" not in r.stderr, "stopped before starting anything"


@pytest.mark.parametrize("setting", ["nats_port", "nats_monitor_port"])
async def test_the_embedded_server_names_its_port_in_use(tmp_path: Path, setting: str) -> None:
    """A port taken between the node's check and the server's bind: the same one line."""
    with _taken_port() as port:
        ports = {"port": port} if setting == "nats_port" else {"monitor_port": port}
        server = EmbeddedNats(tmp_path / "nats", **ports)  # type: ignore[arg-type]
        with pytest.raises(ConfigError) as caught:
            await server.start()
    flag = "--" + setting.replace("_", "-")
    assert str(caught.value) == f"port {port} ({setting}, {flag}) is in use by another process"
    assert server.process is None


# -- the banner's commands run as printed ------------------------------------------------------


def _banner_token_command(lines: list[str]) -> str:
    commands = [ln.split("  dev token  ", 1)[1] for ln in lines
                if ln.startswith("  dev token  ") and " token --sub " in ln]
    assert len(commands) == 1, lines
    return commands[0]


def test_the_banner_token_command_runs_as_printed(repo: Path, programs: list[Program]) -> None:
    """From the repo as make run starts it, then from a node started elsewhere, the command is
    run from another folder than the node's."""
    node = Program([".venv/bin/rtnode", "run"], repo)
    programs.append(node)
    # The second node starts at once (its own folder, data dir and ports): both start-ups
    # overlap instead of one after the other.
    elsewhere = repo.parent / "elsewhere"
    elsewhere.mkdir()
    other = Program([str(repo / ".venv/bin/rtnode"), "run", "--data-dir", "mydata"], elsewhere)
    programs.append(other)
    command = _banner_token_command(node.banner())
    assert command.startswith(".venv/bin/rtnode token "), command
    token = _shell(command, repo).strip()
    asyncio.run(_live_view_and_chat(node.http_port, token, unique("chat")))

    command = _banner_token_command(other.banner())
    assert command.startswith(str(repo / ".venv/bin/rtnode") + " token "), command
    token = _shell(command, repo.parent).strip()  # not where the node runs
    asyncio.run(_live_view_and_chat(other.http_port, token, unique("chat")))


def test_the_dev_banner_prints_a_ready_token_for_the_console(repo: Path,
                                                              programs: list[Program]) -> None:
    node = Program([".venv/bin/rtnode", "run", "--dev"], repo)
    programs.append(node)
    lines = node.banner()
    tokens = [ln.split("  dev token  ", 1)[1] for ln in lines
              if ln.startswith("  dev token  ") and " " not in ln.split("  dev token  ", 1)[1]]
    assert len(tokens) == 1, lines
    assert any(f"http://127.0.0.1:{node.http_port}/" in ln for ln in lines), lines
    asyncio.run(_live_view_and_chat(node.http_port, tokens[0], unique("chat")))
    asyncio.run(_live_view_and_chat(node.http_port, tokens[0], unique("orders")))


# -- the README's commands, as proposed for it (HTTP API, device uplink, replay) -----------------

README_API = """\
TOKEN=$(.venv/bin/rtnode token --sub backend --kind service)   # a service token of this node
curl -s -H "Authorization: Bearer $TOKEN" -d '{"room":"chat:lobby","event":"chat:msg","data":{"text":"hi"},"msg_id":"m-1"}' \\
  http://127.0.0.1:8080/api/publish                                  # {"seq":14}
curl -s -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:8080/api/history?room=chat:lobby&limit=10'
curl -s -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:8080/api/presence?room=chat:lobby'
"""  # noqa: E501 (README lines, as a user pastes them)

README_DEVICE = """\
.venv/bin/python -c 'import cbor2,sys; sys.stdout.buffer.write(cbor2.dumps({"event":"reading","data":{"t":21.5}}))' > r.cbor
mosquitto_pub -h 127.0.0.1 -p 1883 -i thermo-1 -u thermo-1 -P "$(.venv/bin/rtnode token --sub thermo-1 --kind device --room 'sensors:*=publish')" \\
  -q 1 -t rooms/sensors:lab/up -f r.cbor
"""  # noqa: E501

README_REPLAY = """\
.venv/bin/rtnode replay chat:lobby --json
.venv/bin/rtnode replay sensors:lab --reverse --limit 10
"""


def test_the_readme_commands_run_after_make_run(repo: Path, programs: list[Program]) -> None:
    node = Program([".venv/bin/rtnode", "run"], repo)
    programs.append(node)
    node.banner()

    def on_this_node(text: str) -> str:
        return text.replace(":8080", f":{node.http_port}").replace(
            "-p 1883", f"-p {node.mqtt_port}")

    text = _shell(on_this_node(README_API), repo)
    replies, at = [], 0
    while at < len(text):  # curl prints the JSON bodies back to back
        reply, at = json.JSONDecoder().raw_decode(text, at)
        replies.append(reply)
        at += len(text[at:]) - len(text[at:].lstrip())
    assert len(replies) == 3 and replies[0]["seq"] >= 1, text
    assert [e["data"] for e in replies[1]["events"]] == [{"text": "hi"}], text
    assert replies[2] == {"members": []}, text
    _shell(on_this_node(README_DEVICE), repo)
    out = _shell(README_REPLAY, repo).splitlines()
    assert json.loads(out[0])["data"] == {"text": "hi"}, out
    assert "reading" in out[1] and "21.5" in out[1], out
