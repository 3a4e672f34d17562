"""Direct TCP transfers between two hosts (network namespaces routed to each other, no NAT):
the bytes go to the address the libp2p connection reaches, and a firewalled direct port falls
back to the p2p stream, once, then the stream is used from then on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netns import Homes  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HOST1, HOST2 = "192.168.11.2", "192.168.12.2"

SERVER = """
import hashlib, json, os, sys, time
sys.path.insert(0, {root!r})
from swarmtune.protocols.swarm import SwarmNode
node = SwarmNode(initial_peers=[], host={host!r})
node.enable_direct()
data = bytes(range(256)) * (8 << 10)  # 2 MiB
node.blobs.publish("big", data)
info = {{"maddr": node.maddrs()[0], "sha": hashlib.sha256(data).hexdigest(),
        "port": node.blobs.direct.port}}
open({out!r} + ".tmp", "w").write(json.dumps(info))
os.replace({out!r} + ".tmp", {out!r})  # the client reads it whole or not at all
time.sleep(120)
"""

CLIENT = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from swarmtune.protocols.swarm import SwarmNode
deadline = time.monotonic() + 90
while not os.path.exists({info!r}):  # the server starts beside us
    assert time.monotonic() < deadline, "the server did not start"
    time.sleep(0.1)
info = json.load(open({info!r}))
server = info["maddr"].rsplit("/p2p/", 1)[1]
for attempt in range(2):  # the test firewalls the server's direct port between the two
    if attempt:
        sys.stdin.readline()
    node = SwarmNode(initial_peers=[info["maddr"]], host={host!r})  # fresh: no memory of failures
    node.enable_direct()
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


def _python(namespace: str, code: str, log: Path | None = None) -> subprocess.Popen[str]:
    """`code` in a fresh interpreter inside `namespace`; its output to `log`, else a pipe."""
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE if log is None else open(log, "w"),  # noqa: SIM115 - the child's
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _outcomes(client: subprocess.Popen[str], seen: list[str], server_log: Path) -> list[int]:
    """The client's next OUTCOMES line (what it printed is kept in `seen` for the failure)."""
    assert client.stdout is not None
    for line in client.stdout:
        seen.append(line)
        if line.startswith("OUTCOMES"):
            return json.loads(line.split(" ", 1)[1])
    client.wait(timeout=30)
    server = server_log.read_text(errors="replace") if server_log.exists() else ""
    raise AssertionError(f"the client exited {client.returncode}:\n{''.join(seen)}\n{server}")


@pytest.mark.timeout(300)
def test_direct_transfers_reach_the_peers_address_and_a_firewall_sends_them_to_the_stream(
    hosts: Homes, tmp_path: Path
) -> None:
    info = tmp_path / "server.json"
    # both start at once (their imports overlap); the client waits for the server's info file
    server_log = tmp_path / "server.log"
    server_code = SERVER.format(root=str(ROOT), host=HOST1, out=str(info))
    server = _python(hosts.home(1), server_code, server_log)
    client = _python(hosts.home(2), CLIENT.format(root=str(ROOT), info=str(info), host=HOST2))
    seen: list[str] = []
    try:
        # both fetches went direct, across hosts
        assert _outcomes(client, seen, server_log) == [1, 1]
        port = json.loads(info.read_text())["port"]
        subprocess.run(
            ["ip", "netns", "exec", hosts.home(1), "iptables", "-A", "INPUT", "-p", "tcp",
             "--dport", str(port), "-j", "DROP"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        # a fresh client node: the direct port no longer answers; it falls back, then streams
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()
        assert _outcomes(client, seen, server_log) == [-1, 0]
        assert client.wait(timeout=60) == 0, "".join(seen)
    finally:
        for proc in (client, server):
            proc.kill()
            proc.wait()
