"""Direct TCP transfers between two hosts (network namespaces routed to each other, no NAT):
the bytes go to the address the libp2p connection reaches, and a firewalled direct port falls
back to the p2p stream, once, then the stream is used from then on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netns import Homes  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HOST1, HOST2 = "192.168.11.2", "192.168.12.2"

SERVER = """
import hashlib, json, sys, time
sys.path.insert(0, {root!r})
from swarmtune.protocols.swarm import SwarmNode
node = SwarmNode(initial_peers=[], host={host!r})
node.enable_direct()
data = bytes(range(256)) * (8 << 10)  # 2 MiB
node.blobs.publish("big", data)
info = {{"maddr": node.maddrs()[0], "sha": hashlib.sha256(data).hexdigest(),
        "port": node.blobs.direct.port}}
open({out!r}, "w").write(json.dumps(info))
time.sleep(120)
"""

CLIENT = """
import json, sys
sys.path.insert(0, {root!r})
from swarmtune.protocols.swarm import SwarmNode
info = json.load(open({info!r}))
node = SwarmNode(initial_peers=[info["maddr"]], host={host!r})
node.enable_direct()
server = info["maddr"].rsplit("/p2p/", 1)[1]
outcomes = []
for _ in range(2):
    stats = {{}}
    got = node.routes.fetch(server, "big", expected_sha256=info["sha"], stats=stats, timeout=60)
    assert len(got) == 2 << 20
    outcomes.append(stats["direct"])
print("OUTCOMES", json.dumps(outcomes), flush=True)
node.shutdown()
"""


@pytest.fixture(scope="module")
def hosts() -> Iterator[Homes]:
    if shutil.which("iptables") is None:
        pytest.skip(
            "this test firewalls a port: it needs `iptables` (Debian: apt-get install iptables)"
        )
    built = Homes(nat=False)  # plain routers: each home can dial the other
    why = built.up()
    if why is not None:
        pytest.skip(why)
    try:
        yield built
    finally:
        built.down()


def _python(namespace: str, code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _outcomes(hosts: Homes, info: Path) -> list[int]:
    client = _python(hosts.home(2), CLIENT.format(root=str(ROOT), info=str(info), host=HOST2))
    out, _ = client.communicate(timeout=120)
    assert client.returncode == 0, out
    line = next(x for x in out.splitlines() if x.startswith("OUTCOMES"))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.timeout(300)
def test_direct_transfers_reach_the_peers_address_and_a_firewall_sends_them_to_the_stream(
    hosts: Homes, tmp_path: Path
) -> None:
    info = tmp_path / "server.json"
    server = _python(hosts.home(1), SERVER.format(root=str(ROOT), host=HOST1, out=str(info)))
    try:
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text():
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        assert _outcomes(hosts, info) == [1, 1]  # both fetches went direct, across hosts
        port = json.loads(info.read_text())["port"]
        subprocess.run(
            ["ip", "netns", "exec", hosts.home(1), "iptables", "-A", "INPUT", "-p", "tcp",
             "--dport", str(port), "-j", "DROP"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        # a fresh client: the direct port no longer answers; it falls back, then streams
        assert _outcomes(hosts, info) == [-1, 0]
    finally:
        server.kill()
        server.wait()
