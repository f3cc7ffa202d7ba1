"""compose/: the production topology's configuration, proven without Docker.

(a) every RTNODE_* variable and every command-line flag the compose file gives rtnode exists;
(b) the compose file's NATS cluster configuration (compose/nats/n*.conf, hosts and ports
remapped to 127.0.0.1 and free ports, everything else kept) runs as three local nats-servers,
and a node with the compose file's settings stores and serves events on it with R3.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
import yaml

from node.app import Node
from node.cli import build_parser
from node.nats_server import nats_server_binary
from node.protocol.settings import ENV_PREFIX, Settings, load_settings
from tests.servers import free_ports, http_get, wait_until
from tests.wsclient import SECRET, RawClient, token, unique, ws_url

pytestmark = pytest.mark.integration

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
NATS_PASSWORD = "compose-test-nats-password"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return data


def rtnode_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run rtnode (built from the repo's Dockerfile)."""
    return {name: svc for name, svc in data["services"].items()
            if "compose/Dockerfile" in str((svc.get("build") or {}).get("dockerfile", ""))}


# -- (a) the settings the compose file passes exist -------------------------------------------


def test_compose_passes_only_real_settings_and_flags() -> None:
    data = compose()
    nodes = rtnode_services(data)
    assert {"rtnode1", "rtnode2", "rtnode3", "rtnode-bridge"} <= set(nodes)
    for name, svc in nodes.items():
        env = svc["environment"]
        for key in env:
            assert key.startswith(ENV_PREFIX), (name, key)
            assert key[len(ENV_PREFIX):].lower() in Settings.model_fields, (name, key)
        assert env["RTNODE_STREAM_REPLICAS"] == "3" and env["RTNODE_HOST"] == "0.0.0.0"
        assert len(env["RTNODE_NATS_URL"].split(",")) == 3
        command = svc["command"]
        try:  # the image's entrypoint is `rtnode`: every flag must parse
            build_parser().parse_args(command)
        except SystemExit:
            pytest.fail(f"{name}: rtnode rejects {command}")
    names = [svc["environment"].get("RTNODE_NODE_NAME") for svc in nodes.values()]
    assert len([n for n in names if n]) == len({n for n in names if n}), "node names unique"
    assert nodes["rtnode-bridge"]["environment"]["RTNODE_MQTT_BROKER_URL"].startswith("mqtt://")
    # Every file the compose file mounts is here; haproxy and Prometheus point at real nodes.
    for svc in data["services"].values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).is_file(), source
    for cfg in ("haproxy.cfg", "prometheus.yml"):
        text = (COMPOSE / cfg).read_text()
        for host in re.findall(r"(rtnode[\w-]*):(?:8080|1883)", text):
            assert host in nodes, (cfg, host)
    assert (COMPOSE / "Dockerfile").is_file() and (COMPOSE / "README.md").is_file()


# -- (b) the same NATS cluster, as local processes --------------------------------------------


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback, silent: the refusals are expected."""


async def stream_info(js: Any, name: str, deadline: float = 30.0) -> Any:
    """``name``'s info, asked again while the cluster gives no answer.

    An R3 stream's info comes from its leader only: a request that arrives while a new cluster
    (three servers fsyncing every write on two busy cores) moves a leader goes unanswered (a
    5 s timeout in nats-py, CI saw one) or gets a 503. A JetStream client asks again; so does
    this test, for at most ``deadline`` seconds. What it checks is the configuration.
    """
    until = time.monotonic() + deadline
    while True:
        try:
            return await js.stream_info(name)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if time.monotonic() > until:
                raise
            await asyncio.sleep(0.1)  # a 503 comes back at once: not a busy loop


class Server:
    def __init__(self, index: int, conf: str, ports: list[int]) -> None:
        self.index = index
        self.conf = conf
        self.port, self.http, self.route = ports
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def remap(server: Server, servers: list[Server], store: Path) -> str:
    """The compose file's config of ``server`` with hosts and ports made local."""
    text = server.conf
    head, cluster = text.split("cluster {", 1)
    head = re.sub(r"(?m)^listen:\s*\S+", f"listen: 127.0.0.1:{server.port}", head, count=1)
    head = re.sub(r"(?m)^http:\s*\S+", f"http: 127.0.0.1:{server.http}", head, count=1)
    head = re.sub(r'store_dir:\s*"[^"]*"', f'store_dir: "{store}"', head, count=1)
    cluster = re.sub(r"(?m)^(\s*)listen:\s*\S+", rf"\g<1>listen: 127.0.0.1:{server.route}",
                     cluster, count=1)
    by_host = {f"nats{s.index}": s for s in servers}
    cluster = re.sub(r"nats-route://(nats\d+):\d+",
                     lambda m: f"nats-route://127.0.0.1:{by_host[m.group(1)].route}", cluster)
    return head + "cluster {" + cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Server]]:
    data = compose()
    servers = []
    ports = free_ports(9)
    for i in (1, 2, 3):
        svc = data["services"][f"nats{i}"]
        assert f"./nats/n{i}.conf:/etc/nats/n{i}.conf:ro" in svc["volumes"]
        assert svc["command"] == ["-c", f"/etc/nats/n{i}.conf"]
        servers.append(Server(i, (COMPOSE / "nats" / f"n{i}.conf").read_text(),
                              ports[3 * i - 3:3 * i]))
    try:
        for s in servers:
            conf = tmp_path / f"n{s.index}.conf"
            conf.write_text(remap(s, servers, tmp_path / f"n{s.index}"))
            log = open(tmp_path / f"n{s.index}.log", "ab")
            # The servers require a user and password: the one compose gives them and the nodes.
            s.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                                      stdout=log, stderr=log,
                                      env={**os.environ, "NATS_PASSWORD": NATS_PASSWORD})
            log.close()

        def meta_leader() -> bool:
            for s in servers:
                status, body = http_get(f"http://127.0.0.1:{s.http}/jsz")
                if status != 200 or not json.loads(body).get("meta_cluster", {}).get("leader"):
                    return False
            return True

        wait_until(meta_leader, 15, what="a JetStream meta leader on every server")
        yield servers
    finally:
        for s in servers:  # by PID, each the one we started
            if s.proc is not None:
                s.proc.terminate()
                try:
                    s.proc.wait(10)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait(10)


async def test_node_with_compose_settings_on_the_compose_cluster(
    cluster: list[Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose()["services"]["rtnode1"]["environment"]
    local = {
        "RTNODE_NATS_URL": ",".join(s.url for s in cluster),  # the same three servers
        "RTNODE_HOST": "127.0.0.1",
        "RTNODE_DATA_DIR": str(tmp_path / "rtnode1"),
        "RTNODE_JWT_SECRET": SECRET,  # compose takes it from the host's environment
        "RTNODE_API_KEY": "",
        "RTNODE_NATS_PASSWORD": NATS_PASSWORD,  # compose: from the host's environment too
    }
    for key, value in {**env, **local}.items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings(http_port=0, mqtt_port=0)
    assert (settings.stream_replicas, settings.node_name, len(settings.nats_url)) == (
        3, "rtnode1", 3)
    started = time.monotonic()
    node = Node(settings)
    await node.start()
    try:
        startup = time.monotonic() - started
        client = await RawClient.connected(ws_url(node), token())
        room = unique("compose")
        assert (await client.request({"type": "join", "room": room}))["type"] == "joined"
        reply = await client.request({"type": "publish", "room": room, "event": "chat:msg",
                                      "data": {"text": "hi"}})
        assert reply["type"] == "published", reply
        event = await client.recv()
        assert (event["type"], event["seq"], event["data"]) == ("event", reply["seq"],
                                                                {"text": "hi"})
        history = await client.request({"type": "history", "room": room})
        assert [e["seq"] for e in history["events"]] == [reply["seq"]]
        await client.ws.close()

        nc = await nats.connect(servers=[s.url for s in cluster], user="rtnode",
                                password=NATS_PASSWORD)
        try:
            js = nc.jetstream()
            info = await stream_info(js, "RTNODE_ROOMS")
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            kv = await stream_info(js, "KV_RTNODE_PRESENCE")
            assert kv.config.num_replicas == 3
        finally:
            await nc.close()
        # Without the password, a client (another container) gets nothing from the servers.
        for creds in ({}, {"user": "rtnode", "password": "guess"}):
            with pytest.raises(Exception, match="Authorization Violation"):
                await nats.connect(servers=[s.url for s in cluster], allow_reconnect=False,
                                   max_reconnect_attempts=1, connect_timeout=2,
                                   error_cb=_quiet, **creds)
        assert startup < 15, startup
    finally:
        await node.stop()
