"""``rtnode devices tunnel``: the MQTT protocol tunnel tried from a shell (issue 15 point 9).

The command runs as a process (``.venv/bin/rtnode``) against a real in-process node; its stdin
and stdout are pipes, as in ``printf ... | rtnode devices tunnel ID``. A WebSocket member of
the room checks that what the tunnel sends is a device's publish like any other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.wsclient import SECRET, RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

RTNODE = str(Path(sys.executable).with_name("rtnode"))
# The command sees none of the caller's RTNODE_* settings.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("RTNODE_") or k.startswith("RTNODE_TEST_")}
TIMEOUT = 20.0


class Tunnel:
    """A running ``rtnode devices tunnel`` with its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.frames: list[dict[str, Any]] = []  # stdout, parsed
        self.errors: list[str] = []  # stderr lines

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def frame(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first frame printed (from the start) that ``match`` accepts."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            while True:
                for f in self.frames:
                    if match(f):
                        return f
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"stdout ended; frames {self.frames}, "
                                         f"stderr {await self.stderr()}")
                self.frames.append(json.loads(line))  # every stdout line is a JSON frame

    async def error_line(self) -> str:
        assert self.proc.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            line = (await self.proc.stderr.readline()).decode()
        assert line, "stderr ended"
        self.errors.append(line.rstrip("\n"))
        return self.errors[-1]

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()

    async def close_input(self) -> int:
        """End of input (Ctrl-D): the command exits by itself."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        async with asyncio.timeout(TIMEOUT):
            return await self.proc.wait()


@pytest_asyncio.fixture
async def tunnels() -> AsyncIterator[Callable[..., Any]]:
    """Start ``rtnode devices tunnel`` processes; any still running at the end is killed."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> Tunnel:
        proc = await asyncio.create_subprocess_exec(
            RTNODE, "devices", "tunnel", *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**CLEAN_ENV, **(env or {})})
        procs.append(proc)
        return Tunnel(proc)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def new_device() -> str:
    return f"thermo-{uuid.uuid4().hex[:8]}"


async def test_join_publish_and_a_bad_line(make_node: Any, tunnels: Any) -> None:
    """The command signs its own token (the node's key), joins, publishes; a WebSocket member
    gets the event; a bad line costs one error line and the tunnel goes on."""
    node = await make_node()
    room, dev = unique("sensors"), new_device()
    member = await RawClient.connected(ws_url(node), token("watcher"))
    try:
        assert (await member.request({"type": "join", "room": room}))["type"] == "joined"
        tun = await tunnels(dev, "--mqtt-url", f"mqtt://127.0.0.1:{node.mqtt.port}",
                            "--room", f"{room}=join,publish",
                            env={"RTNODE_JWT_SECRET": SECRET})
        connected = await tun.frame(lambda f: f["type"] == "connected")
        assert connected["client_id"] == dev and connected["rooms"] == [f"@device:{dev}"]
        note = await tun.error_line()  # says where its token came from
        assert note.startswith(f"rtnode: no --token: a device token for {dev}"), note

        await tun.send(json.dumps({"type": "join", "id": 1, "room": room}))
        joined = await tun.frame(lambda f: f.get("id") == 1)
        assert joined["type"] == "joined" and joined["room"] == room

        await tun.send('{"type":"publish","id":2,"room":')  # cut short
        bad = await tun.error_line()
        assert bad.startswith("rtnode: line 2: ") and "not sent" in bad, bad
        await tun.send(json.dumps({"type": "publish", "id": 3, "room": "no room"}))
        bad = await tun.error_line()
        assert bad.startswith("rtnode: line 3: bad field room"), bad

        await tun.send(json.dumps({"type": "publish", "id": 4, "room": room,
                                   "event": "reading", "data": {"t": 21.5}}))
        published = await tun.frame(lambda f: f.get("id") == 4)
        assert published["type"] == "published" and published["room"] == room
        [got] = await member.events(1, room)
        assert got["data"] == {"t": 21.5} and got["seq"] == published["seq"]
        assert got["from"] == {"user": dev, "kind": "device", "client_id": dev}
        # The tunnel is a member too: it prints the event, with the same seq.
        echoed = await tun.frame(lambda f: f["type"] == "event")
        assert echoed["seq"] == published["seq"] and echoed["event"] == "reading"

        await tun.send(json.dumps({"type": "ping", "id": "p"}))  # still going
        assert (await tun.frame(lambda f: f.get("id") == "p"))["type"] == "pong"
        assert await tun.close_input() == 0
        rest = (await tun.stderr()).strip()
        assert rest == "", rest  # one error line per bad line, nothing else
        assert all(set(f) >= {"type"} for f in tun.frames)
    finally:
        await member.close()


async def test_token_refused_is_one_line(make_node: Any, tunnels: Any) -> None:
    node = await make_node()
    dev = new_device()
    wrong = token("someone-else", kind="device")
    tun = await tunnels(dev, "--token", wrong, "--mqtt-url", f"mqtt://127.0.0.1:{node.mqtt.port}")
    async with asyncio.timeout(TIMEOUT):
        code = await tun.proc.wait()
    err = (await tun.stderr()).strip()
    assert code == 1
    assert "\n" not in err and "not authorized (CONNACK 5)" in err, err


async def test_ctrl_c_and_a_node_sent_disconnect(make_node: Any, tunnels: Any) -> None:
    """Ctrl-C disconnects cleanly (exit 0); a node's ``disconnect`` is printed, then one line
    and exit 1."""
    node = await make_node()
    dev = new_device()
    url = f"mqtt://127.0.0.1:{node.mqtt.port}"
    tok = token(dev, kind="device")
    tun = await tunnels(dev, "--token", tok, "--mqtt-url", url)
    await tun.frame(lambda f: f["type"] == "connected")
    tun.proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(TIMEOUT):
        assert await tun.proc.wait() == 0
    assert (await tun.stderr()).strip() == ""

    tun = await tunnels(dev, "--token", tok, "--mqtt-url", url, "--raw")
    await tun.frame(lambda f: f["type"] == "connected")
    # docs/tunnel.md: the explicit connect needs its token field; it is answered once.
    await tun.send(json.dumps({"type": "connect", "id": "bare"}))
    bare = await tun.frame(lambda f: f.get("id") == "bare")
    assert (bare["type"], bare["code"]) == ("error", 4000) and "token" in bare["reason"], bare
    await tun.send(json.dumps({"type": "connect", "id": "again", "token": tok}))
    again = await tun.frame(lambda f: f.get("id") == "again")
    assert (again["code"], again["reason"]) == (4000, "already connected"), again
    for i in range(12):  # --raw sends them; beyond the tolerance the node ends the tunnel
        await tun.send(json.dumps({"type": "bogus", "id": i}))
    bye = await tun.frame(lambda f: f["type"] == "disconnect")
    assert bye["code"] == 4000
    async with asyncio.timeout(TIMEOUT):
        assert await tun.proc.wait() == 1
    err = (await tun.stderr()).strip()
    assert err == "rtnode: the node closed the tunnel: 4000 too many errors", err
