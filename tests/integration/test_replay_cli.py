"""``rtnode replay`` and ``rtnode consume`` next to a node started as ``make run`` starts it.

One node for the module: ``.venv/bin/rtnode run`` in a temporary folder, with ``make run``'s
defaults (embedded NATS, data dir ``rtnode-data`` relative to the folder) except its HTTP and
MQTT ports. Events are published through its HTTP API with a service token; the commands run
as processes with the same folder as their working directory and, unless a test says
otherwise, no flags: they find the node's NATS in ``rtnode-data/nats-connection.json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.servers import MS, children_of, free_ports, http_get, pid_alive, wait_until

pytestmark = pytest.mark.integration

RTNODE = str(Path(sys.executable).with_name("rtnode"))  # .venv/bin/rtnode, as after make run
# The node and the commands see none of the caller's RTNODE_* settings: make run's defaults.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("RTNODE_") or k.startswith("RTNODE_TEST_")}


@dataclass
class MadeRun:
    """A node started like ``make run`` in ``folder``."""

    folder: Path
    base: str
    token: str


@pytest.fixture(scope="module")
def made_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MadeRun]:
    folder = tmp_path_factory.mktemp("make-run")
    http_port, mqtt_port = free_ports(2)
    log = open(folder / "node.log", "wb")
    proc = subprocess.Popen([RTNODE, "run", "--http-port", str(http_port),
                             "--mqtt-port", str(mqtt_port)],
                            cwd=folder, stdout=log, stderr=log, env=CLEAN_ENV)
    log.close()
    base = f"http://127.0.0.1:{http_port}"
    kids: list[int] = []
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError((folder / "node.log").read_text(errors="replace"))
            return http_get(base + "/readyz")[0] == 200

        wait_until(ready, 30, what="the node's /readyz")
        kids = children_of(proc.pid)  # the embedded nats-server
        assert (folder / "rtnode-data" / "nats-connection.json").exists()
        token = subprocess.run([RTNODE, "token", "--sub", "backend", "--kind", "service"],
                               cwd=folder, env=CLEAN_ENV, capture_output=True, text=True,
                               timeout=30, check=True).stdout.strip()
        yield MadeRun(folder, base, token)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for kid in kids:  # only our node's own children, by PID
            if pid_alive(kid):
                os.kill(kid, signal.SIGKILL)


async def publish(node: MadeRun, rooms: list[str], start: int = 0) -> list[int]:
    """POST one ``chat:msg`` {"i": start + k} per entry of ``rooms`` (16 at a time, so their
    order in the stream is not the list's); their seqs, in the list's order."""
    sem = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {node.token}"}

    async def one(session: aiohttp.ClientSession, k: int, room: str) -> int:
        body = {"room": room, "event": "chat:msg", "data": {"i": start + k}}
        async with sem, session.post(node.base + "/api/publish", json=body,
                                     headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return int((await resp.json())["seq"])

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session, k, r) for k, r in enumerate(rooms))))


async def start(folder: Path, *args: str, env: dict[str, str] | None = None
                ) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        RTNODE, *args, cwd=folder, env={**CLEAN_ENV, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def rtnode(folder: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> tuple[int, list[str], str]:
    """Run ``rtnode ARGS`` in ``folder`` to its end: (exit code, stdout lines, stderr)."""
    proc = await start(folder, *args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout * MS * 1000)
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode()


def seqs_of(lines: list[str]) -> list[int]:
    return [int(line.split()[0]) for line in lines]


async def read_lines(proc: asyncio.subprocess.Process, n: int) -> list[str]:
    assert proc.stdout is not None
    return [(await asyncio.wait_for(proc.stdout.readline(), 15 * MS * 1000)).decode().rstrip()
            for _ in range(n)]


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, bytes]:
    """SIGTERM, then its exit code and what is left of its stdout."""
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 15 * MS * 1000)
    assert proc.returncode is not None
    return proc.returncode, out


async def test_replay_and_consume_find_the_node_with_no_flags(
        made_run: MadeRun, tmp_path: Path) -> None:
    seqs = await publish(made_run, ["chat:lobby"] * 3)
    rc, lines, err = await rtnode(made_run.folder, "replay", "chat:lobby")
    assert rc == 0, err
    assert sorted(seqs) == seqs_of(lines)
    assert {line.split(" ", 2)[2] for line in lines} == {f'{{"i":{i}}}' for i in range(3)}
    assert all(line.split()[1] == "chat:msg" for line in lines)

    proc = await start(made_run.folder, "consume", "--group", "lobby", "--rooms", "chat:lobby")
    got = [json.loads(line) for line in await read_lines(proc, 3)]
    assert [e["seq"] for e in got] == sorted(seqs) and got[0]["room"] == "chat:lobby"
    assert await stop(proc) == (0, b"")

    # Elsewhere there is no node: one line saying what to do; --data-dir points at it.
    rc, lines, err = await rtnode(tmp_path, "replay", "chat:lobby")
    assert (rc, lines) == (2, []) and "needs --nats-url" in err and err.count("\n") == 1
    rc, lines, err = await rtnode(tmp_path, "replay", "chat:lobby", "--limit", "1",
                                  "--data-dir", str(made_run.folder / "rtnode-data"))
    assert (rc, seqs_of(lines)) == (0, sorted(seqs)[:1]), err


async def test_until_limit_reverse(made_run: MadeRun) -> None:
    # 300 events of chat:big among 400 of chat:noise: a dense stretch, a sparse one (three
    # noise events per big one), a dense one; sorted, as the room holds them.
    dense1 = await publish(made_run, ["chat:big"] * 100)
    sparse = await publish(made_run, ["chat:big", "chat:noise", "chat:noise", "chat:noise",
                                      "chat:noise"] * 100, start=100)
    dense2 = await publish(made_run, ["chat:big"] * 100, start=200)
    noise_seqs = {s for k, s in enumerate(sparse) if k % 5}
    big = sorted(dense1 + [s for k, s in enumerate(sparse) if k % 5 == 0] + dense2)
    assert len(big) == 300
    after_gap = next(s for s in big if s + 1 in noise_seqs)  # until a seq of another room

    folder = made_run.folder
    cases: list[tuple[list[str], list[int]]] = [
        ([], big),
        (["--until", str(big[99])], big[:100]),
        (["--until", str(after_gap + 1)], [s for s in big if s <= after_gap]),
        (["--limit", "10"], big[:10]),
        (["--since", str(big[9]), "--until", str(big[19]), "--limit", "5"], big[10:15]),
        (["--since", str(big[-1])], []),
        (["--reverse"], big[::-1]),
        (["--reverse", "--limit", "7"], big[::-1][:7]),
        (["--reverse", "--until", str(big[199]), "--limit", "3"], big[197:200][::-1]),
        (["--reverse", "--until", str(after_gap + 1), "--limit", "2"],
         [s for s in big if s <= after_gap][-2:][::-1]),
        (["--reverse", "--since", str(big[249])], big[250:][::-1]),
        (["--reverse", "--since-time", "2000-01-01T00:00:00Z", "--limit", "1"], big[-1:]),
        (["--reverse", "--since-time", "2999-01-01T00:00:00Z"], []),
        (["--since-time", "2999-01-01T00:00:00Z"], []),
        (["--since-time", "2000-01-01T00:00:00+02:00", "--until", str(big[2])], big[:3]),
    ]
    results = await asyncio.gather(*(rtnode(folder, "replay", "chat:big", *args)
                                     for args, _ in cases))
    for (args, want), (rc, lines, err) in zip(cases, results, strict=True):
        assert rc == 0 and err == "", (args, err)
        assert seqs_of(lines) == want, args

    # Small windows (16 events): many windows; going from the sparse stretch to the dense
    # one, a window holds more than it may keep and reads the rest again. Same answer.
    small = {"RTNODE_TEST_REPLAY_PAGE": "16"}
    results = await asyncio.gather(
        rtnode(folder, "replay", "chat:big", "--reverse", env=small),
        rtnode(folder, "replay", "chat:big", "--reverse", "--limit", "150", env=small),
        rtnode(folder, "replay", "chat:big", "--reverse", "--since", str(big[40]), env=small),
    )
    assert [seqs_of(lines) for _, lines, _ in results] == [
        big[::-1], big[::-1][:150], big[41:][::-1]]


async def test_progress_line_when_piped(made_run: MadeRun) -> None:
    seqs = sorted(await publish(made_run, ["chat:progress"] * 40))
    # Quick, so no progress line by default (shown after 3 s)...
    rc, lines, err = await rtnode(made_run.folder, "replay", "chat:progress")
    assert (rc, seqs_of(lines), err) == (0, seqs, "")
    # ... and with it at once: rewritten in place, the final figures ending the line.
    began = time.monotonic()
    for args in ([], ["--reverse"]):
        rc, lines, err = await rtnode(made_run.folder, "replay", "chat:progress", *args,
                                      env={"RTNODE_TEST_REPLAY_PROGRESS_S": "0"})
        assert rc == 0 and len(lines) == 40
        assert err.startswith("\r") and err.endswith("\n") and err.count("\n") == 1, err
        shown = err.rstrip("\n").split("\r")[1:]
        last = seqs[0] if args else seqs[-1]
        assert re.fullmatch(rf"replayed 40 events, seq {last} \(\d+(\.\d)?[kM]?/s\)",
                            shown[-1]), shown
        assert all(s.startswith("replayed ") for s in shown)
        # At most once a second, plus the final one.
        assert len(shown) <= time.monotonic() - began + 2


async def test_consume_options(made_run: MadeRun, tmp_path: Path) -> None:
    seqs = sorted(await publish(made_run, ["orders:a", "orders:b"] * 3))
    proc = await start(made_run.folder, "consume", "--durable", "parts", "--rooms", "orders:*",
                       "--partitions", "3", "--on-retry", "skip", "--max-deliver", "2",
                       "--ack-wait", "5", "--takeover", "2")
    got = [json.loads(line) for line in await read_lines(proc, 6)]
    assert sorted(e["seq"] for e in got) == seqs
    for room in ("orders:a", "orders:b"):  # each room in order
        mine = [e["seq"] for e in got if e["room"] == room]
        assert mine == sorted(mine) and len(mine) == 3
    assert (await stop(proc))[0] == 0

    # --post: each event POSTed, signed with RTNODE_WEBHOOK_SECRET, instead of printed.
    posted: list[dict[str, Any]] = []
    all_in = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        stamp = request.headers.get("Rtnode-Timestamp", "")
        mac = hmac.new(b"s3cret", stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert request.headers.get("Rtnode-Signature") == f"sha256={mac}"
        posted.append(json.loads(body))
        if len(posted) >= 6:
            all_in.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        proc = await start(made_run.folder, "consume", "--group", "hook", "--rooms",
                           "orders:*", "--post", f"http://127.0.0.1:{port}/hook",
                           env={"RTNODE_WEBHOOK_SECRET": "s3cret"})
        await asyncio.wait_for(all_in.wait(), 20 * MS * 1000)
        assert await stop(proc) == (0, b"")
    finally:
        await runner.cleanup()
    assert sorted(p["seq"] for p in posted) == seqs


async def test_bad_values_are_one_line(made_run: MadeRun) -> None:
    folder = made_run.folder
    con = ("consume", "--group", "g", "--rooms", "chat:*")
    cases = [
        (("replay", "chat:lobby", "--reverse", "--follow"), "not with --follow"),
        (("replay", "chat:lobby", "--limit", "0"), "--limit"),
        (("replay", "chat:lobby", "--until", "x"), "--until"),
        (("replay", "chat:lobby", "--since", "9", "--until", "9"), "--until"),
        (("replay", "chat:*"), "one room"),
        (("consume", "--rooms", "chat:*"), "--group"),
        (("consume", "--group", "a", "--durable", "b", "--rooms", "chat:*"), "--group"),
        (("consume", "--group", "g"), "--rooms"),
        ((*con, "--partitions", "0"), "--partitions"),
        ((*con, "--partitions", "65"), "--partitions"),
        ((*con, "--on-retry", "later"), "--on-retry"),
        ((*con, "--max-deliver", "many"), "--max-deliver"),
        ((*con, "--ack-wait", "-1"), "--ack-wait"),
        ((*con, "--takeover", "nan"), "--takeover"),
        ((*con, "--secret", "k"), "--post"),
        ((*con, "--post", "ftp://example.com/x"), "--post"),
        ((*con, "--post", "http://127.0.0.1:1/x", "--concurrency", "0"), "--concurrency"),
    ]
    results = await asyncio.gather(*(rtnode(folder, *args) for args, _ in cases))
    for (args, text), (rc, out, err) in zip(cases, results, strict=True):
        assert rc == 2 and out == [], (args, rc, err)
        assert err.startswith("rtnode: ") and text in err and err.count("\n") == 1, (args, err)


async def test_help_shows_only_their_own_options(made_run: MadeRun) -> None:
    (rc1, rep, _), (rc2, con, _) = await asyncio.gather(
        rtnode(made_run.folder, "replay", "--help"), rtnode(made_run.folder, "consume", "--help"))
    assert rc1 == rc2 == 0
    rep_text, con_text = "\n".join(rep), "\n".join(con)
    for text in (rep_text, con_text):
        for flag in ("--data-dir", "--config", "--nats-url", "--nats-user", "--nats-creds",
                     "--nats-tls-ca", "--log-level"):
            assert flag in text
        for flag in ("--mqtt-port", "--http-port", "--rate-per-s", " --tls-cert", "--jwt-secret",
                     "--max-frame-bytes", "--history-size"):
            assert flag not in text
    for flag in ("--until", "--limit", "--reverse", "--follow", "--since-time"):
        assert flag in rep_text
    for flag in ("--group", "--durable", "--partitions", "--on-retry", "--max-deliver",
                 "--ack-wait", "--takeover", "--post", "--secret", "--concurrency",
                 "--post-timeout"):
        assert flag in con_text
