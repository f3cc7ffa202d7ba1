"""A locked NATS: the embedded nats-server requires the node's credentials, and an external one
is reached with the credentials the settings give.

Attacks come from real nats-py clients on 127.0.0.1, as any local process (another container,
an SSRF to loopback) could make them: no credentials, or wrong ones, get no connection, so no
reading, no forged event and no purge; the node itself goes on serving its clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import stat
import sys
from pathlib import Path
from typing import Any

import nats
import pytest

from node.core.events import event_body
from node.nats_server import free_port
from node.protocol.subjects import STREAM_NAME, room_subject
from node.protocol.tokens import Principal
from tests.servers import MS, http_get
from tests.wsclient import RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

SEED = 11
REFUSED = "Authorization Violation"


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback, silent: the refusals are what the tests expect."""


def wrong_credentials(rng: random.Random, n: int = 4) -> list[dict[str, str]]:
    """None at all, then ``n`` random users, passwords and tokens (none of them the node's)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"

    def word(k: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(k))

    out: list[dict[str, str]] = [{}, {"user": "rtnode", "password": ""}]
    for _ in range(n):
        out.append(rng.choice([
            {"user": "rtnode", "password": word(rng.randint(1, 48))},
            {"user": word(rng.randint(1, 12)), "password": word(rng.randint(1, 48))},
            {"token": word(rng.randint(1, 48))},
        ]))
    return out


async def attack(url: str, tenant: str, room: str, **creds: Any) -> list[str]:
    """What a local attacker gets done on ``url``: connect, read the room's live events,
    forge a stored "from admin" event, purge the room stream. Returns the steps that worked."""
    done: list[str] = []
    try:
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1,
                                connect_timeout=2, error_cb=_quiet, **creds)
    except Exception as exc:
        assert REFUSED in str(exc), exc
        return done
    done.append("connect")
    try:
        await nc.subscribe("rt.>")
        await nc.flush(2)
        done.append("subscribe")
        js = nc.jetstream(timeout=2)
        admin = Principal(sub="admin", tenant=tenant, kind="service")
        forged = event_body(room, "chat:msg", {"text": "forged"}, admin, None, None)
        await js.publish(room_subject(tenant, room), forged)
        done.append("forge")
        await js.purge_stream(STREAM_NAME)
        done.append("purge")
    except Exception:  # a later step failing is fine: the earlier ones already count
        pass
    finally:
        await nc.close()
    return done


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def chat(node: Any, room: str, sub: str = "alice") -> tuple[RawClient, list[int]]:
    """A member of ``room`` that published two events and got them back; their seqs."""
    client = await RawClient.connected(ws_url(node), token(sub))
    assert (await client.request({"type": "join", "room": room}))["type"] == "joined"
    seqs = []
    for i in range(2):
        reply = await client.request({"type": "publish", "room": room, "event": "chat:msg",
                                      "data": {"i": i}})
        assert reply["type"] == "published", reply
        seqs.append(reply["seq"])
    events = await client.events(2, room)
    assert [e["seq"] for e in events] == seqs
    return client, seqs


# -- the embedded nats-server ------------------------------------------------------------------


async def test_embedded_nats_refuses_other_local_processes(make_node: Any) -> None:
    node = await make_node(nats_url=[])
    assert node.embedded is not None
    room = unique("chat")
    member, seqs = await chat(node, room)
    rng = random.Random(SEED)
    for creds in wrong_credentials(rng):
        assert await attack(node.embedded.url, "default", room, **creds) == [], creds
    # The node serves on: the member's history is whole, nothing forged arrived, and a new
    # publish goes through.
    history = await member.request({"type": "history", "room": room})
    assert [e["seq"] for e in history["events"]] == seqs
    assert all(e["data"] != {"text": "forged"} for e in history["events"])
    reply = await member.request({"type": "publish", "room": room, "event": "chat:msg",
                                  "data": {"i": 2}})
    assert reply["type"] == "published"
    (event,) = await member.events(1, room)
    assert event["seq"] == reply["seq"] and event["from"]["user"] == "alice"
    await member.close()


async def test_embedded_monitoring_is_off_unless_asked(make_node: Any) -> None:
    node = await make_node(nats_url=[])
    assert node.embedded is not None and node.embedded.pid is not None
    assert listening_ports(node.embedded.pid) == {node.embedded.port}, "only the client port"
    port = free_port()
    asked = await make_node(nats_url=[], nats_monitor_port=port)
    assert asked.embedded is not None and asked.embedded.pid is not None
    assert listening_ports(asked.embedded.pid) == {asked.embedded.port, port}
    status, body = http_get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200 and b"ok" in body


async def test_credentials_are_private_and_reused_after_a_restart(make_node: Any,
                                                                  tmp_path: Path) -> None:
    data = tmp_path / "kept"
    node = await make_node(nats_url=[], data_dir=data)
    creds_path = data / "nats-credentials.json"
    conn_path = data / "nats-connection.json"
    first = json.loads(creds_path.read_text())
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(conn_path.stat().st_mode) == 0o600
    conn = json.loads(conn_path.read_text())
    assert conn["url"] == node.embedded.url
    assert Path(conn["credentials"]) == creds_path.resolve()
    assert first["user"] and len(first["password"]) >= 32
    # The server's own configuration holds the password too: private as well.
    assert stat.S_IMODE((data / "nats" / "rtnode-nats.conf").stat().st_mode) == 0o600
    room = unique("chat")
    client, seqs = await chat(node, room)
    await client.close()
    await node.stop()
    assert not conn_path.exists(), "no connection file while no server runs"
    again = await make_node(nats_url=[], data_dir=data)
    assert json.loads(creds_path.read_text()) == first, "the same credentials after a restart"
    client = await RawClient.connected(ws_url(again), token())
    history = await client.request({"type": "history", "room": room})
    assert [e["seq"] for e in history["events"]] == seqs, "the same stream, reached"
    await client.close()
    # They are the server's, and only they open it.
    nc = await nats.connect(again.embedded.url, user=first["user"], password=first["password"])
    assert (await nc.jetstream().stream_info(STREAM_NAME)).state.messages >= 2
    await nc.close()


# -- the command line finds the node's NATS from --data-dir ----------------------------------


async def rtnode(*args: str, timeout: float = 30.0) -> tuple[int, list[str], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("RTNODE_")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout * MS * 1000)
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode()


async def test_replay_and_consume_need_only_the_data_dir(make_node: Any, tmp_path: Path) -> None:
    data = tmp_path / "cli"
    node = await make_node(nats_url=[], data_dir=data)
    room = unique("chat")
    client, seqs = await chat(node, room)
    await client.close()
    rc, lines, err = await rtnode("replay", room, "--json", "--data-dir", str(data))
    assert rc == 0, err
    assert [json.loads(line)["seq"] for line in lines] == seqs
    # consume: a durable, from --data-dir too; stopped by SIGTERM once it printed both.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", "consume", "--durable", "d1", "--rooms", room,
        "--data-dir", str(data), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("RTNODE_")})
    assert proc.stdout is not None
    got = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))["seq"]
           for _ in seqs]
    assert got == seqs
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    # What the command line says wins: a wrong password is refused, in one line.
    rc, lines, err = await rtnode("replay", room, "--data-dir", str(data), "--nats-url",
                                  node.embedded.url, "--nats-user", "rtnode",
                                  "--nats-password", "wrong")
    assert rc == 1 and lines == [], err
    assert "authorization violation" in err and len(err.strip().splitlines()) == 1, err
    # No node there: the error says what to give.
    rc, _, err = await rtnode("replay", room, "--data-dir", str(tmp_path / "none"))
    assert rc == 2 and "--nats-url" in err and "--data-dir" in err, err
    assert len(err.strip().splitlines()) == 1, err
