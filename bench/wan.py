"""Benchmark: the swarm on slow links, direct and through the coordinator's relay.

Two volunteers, each in its own "home" network namespace behind a router namespace, and the
coordinator in a "public" one (tests/integration/netns.py). Each home's link to the public
segment is limited with tc tbf (both directions). Per setting: 2 volunteers, H=20 inner steps
on the embedded base, synchronous rounds, ROUNDS rounds.
- loopback: every process in the public namespace (no link between them);
- direct: the routers only route (the public segment has routes to the homes): the dial-back
  probe succeeds and the volunteers fetch from each other;
- relay: the routers are MASQUERADE NATs: the probe fails, blobs go through the coordinator.
Latency: the kernel has no netem qdisc, so the "RTT" rows put tests/integration/delayproxy.py
(a TCP forwarder delaying each direction) between the homes and the coordinator; relayed, every
byte between the volunteers passes there. The dial-back probe goes around it.

Needs root, `ip`, `tc` and `iptables` (like the emulated-network test); skips otherwise.
Run:  .venv/bin/python bench/wan.py [--rounds N]   (about 6 minutes on 2 cores)
Writes bench/out/wan.json and the "wan" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from netns import PUBLIC, Homes  # noqa: E402
from results_md import replace_section  # noqa: E402
from swarm_harness import Swarm  # noqa: E402

OUT = ROOT / "bench" / "out"
DELAY_PROXY = ROOT / "tests" / "integration" / "delayproxy.py"
CONFIG = """run_id: wan-bench
inner: {{steps: 20, batch_size: 8, seq_len: 48}}
averaging: {{matchmaking_time: 2.0, overlap: {overlap}, codec: {codec}}}
"""
DELAY_PORT = 47001  # the delay forwarder's port in the public namespace


@dataclass(frozen=True)
class Setting:
    name: str
    rate: str = ""  # tc tbf rate of each home's link; "" for loopback
    nat: bool = False
    overlap: bool = False
    codec: str = "fp32"
    one_way_ms: float = 0.0  # through tests/integration/delayproxy.py (relayed homes only)


SETTINGS = [
    Setting("loopback"),
    Setting("100 Mbit/s direct", "100mbit"),
    Setting("100 Mbit/s relay", "100mbit", nat=True),
    Setting("10 Mbit/s direct", "10mbit"),
    Setting("10 Mbit/s relay", "10mbit", nat=True),
    Setting("10 Mbit/s relay, overlapped", "10mbit", nat=True, overlap=True),
    Setting("10 Mbit/s relay, int8 codec", "10mbit", nat=True, codec="int8"),
    Setting("10 Mbit/s relay, 50 ms RTT", "10mbit", nat=True, one_way_ms=25),
    Setting("10 Mbit/s relay, 50 ms RTT, overlapped", "10mbit", nat=True, overlap=True,
            one_way_ms=25),
]  # fmt: skip


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _delay_forwarder(maddr: str, one_way_ms: float, homes: Homes) -> subprocess.Popen[str]:
    """A delay forwarder on DELAY_PORT of the public namespace, to the coordinator at `maddr`:
    volunteers dial it instead (it is their relay address too, so relayed bytes are delayed)."""
    parts = maddr.split("/")  # /ip4/IP/tcp/PORT/p2p/ID
    proxy = subprocess.Popen(
        ["ip", "netns", "exec", homes.pub, sys.executable, str(DELAY_PROXY),
         "0.0.0.0", str(DELAY_PORT), parts[2], parts[4], str(one_way_ms)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
    return proxy


def run_setting(setting: Setting, rounds: int, tmp: Path) -> dict:
    """One swarm in fresh namespaces; per-volunteer round reports and the modes they chose."""
    homes = Homes(prefix=f"wb{os.getpid() % 10000}", rate=setting.rate, nat=setting.nat)
    why = homes.up()
    if why is not None:
        raise SystemExit(f"bench/wan.py: {why}")
    config = CONFIG.format(overlap=str(setting.overlap).lower(), codec=setting.codec)
    swarm = Swarm(tmp, config_text=config, evaluate=True)
    proxies: list[subprocess.Popen[str]] = []
    try:
        loopback = not setting.rate
        host = "127.0.0.1" if loopback else "0.0.0.0"
        swarm.start_coordinator("--host", host, netns=homes.pub)
        addrs = (tmp / "addr.txt").read_text().split()
        if setting.one_way_ms:
            proxies.append(_delay_forwarder(addrs[0], setting.one_way_ms, homes))
        for i in (1, 2):
            swarm.maddr = addrs[0] if loopback else next(a for a in addrs if f"/{PUBLIC[i]}/" in a)
            if setting.one_way_ms:  # the same coordinator, through the forwarder
                ip, peer = PUBLIC[i], swarm.maddr.split("/")[6]
                swarm.maddr = f"/ip4/{ip}/tcp/{DELAY_PORT}/p2p/{peer}"
            swarm.join(f"v{i}", ("dates", "arithmetic")[i - 1], rounds, "--host", host,
                       netns=homes.pub if loopback else homes.home(i))  # fmt: skip
        for i in (1, 2):
            assert swarm.wait(f"v{i}", timeout=60 + 60 * rounds) == 0, swarm.log(f"v{i}")
        modes = [swarm.log(f"v{i}").splitlines()[0].split()[2] for i in (1, 2)]
        return {"reports": [metrics(tmp / f"v{i}") for i in (1, 2)], "modes": modes}
    finally:
        swarm.close()
        for proxy in proxies:
            proxy.kill()
            proxy.wait()
        homes.down()


def summarize(reports: list[list[dict]]) -> dict:
    """Means over rounds 2.. (round 1 includes start-up) of both volunteers."""
    rows = [r for report in reports for r in report[1:]]
    wall = sum(r["wall_s"] for r in rows)
    return {
        "rounds": min(len(r) for r in reports),
        "averaged": sum(r["group_size"] == 2 for r in rows) / len(rows),
        "round_s": statistics.median(r["wall_s"] for r in rows),
        "inner_s": statistics.mean(r["inner_s"] for r in rows),
        "matchmaking_s": statistics.mean(r["matchmaking_s"] for r in rows),
        "transfer_s": statistics.mean(r["transfer_s"] for r in rows),
        "utilization": sum(r["inner_s"] for r in rows) / wall,
        "mb_per_round": statistics.mean(r["bytes_sent"] + r["bytes_received"] for r in rows) / 1e6,
        "final_eval": statistics.mean(report[-1]["eval_loss"] for report in reports),
    }


def render(results: dict, command: str, seconds: float) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on this machine ({os.cpu_count()} cores,"
        f" {platform.machine()}, no GPU) in {seconds:.0f} s: `{command}`.",
        "",
        "Two volunteers (H=20 inner steps, embedded base, 0.3 MB contribution blobs), each in",
        "its own home namespace; the coordinator in the public one. Link: tc tbf on each home's",
        "uplink and downlink. RTT rows: a forwarder delaying each direction by half the RTT",
        "between the homes and the coordinator (no netem here). Rounds 2 and later, both",
        "volunteers: median round time, mean seconds per stage, utilization = inner / wall, MB",
        "sent + received per volunteer and round.",
        "",
        "| setting | mode | averaged | round s | inner s | matchmaking s | exchange s |"
        " utilization | MB/round | final eval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        s = entry["summary"]
        lines.append(
            f"| {name} | {'/'.join(sorted(set(entry['modes'])))} | {s['averaged']:.0%} |"
            f" {s['round_s']:.2f} | {s['inner_s']:.2f} | {s['matchmaking_s']:.2f} |"
            f" {s['transfer_s']:.2f} | {s['utilization']:.2f} | {s['mb_per_round']:.2f} |"
            f" {s['final_eval']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict = {}
    for setting in SETTINGS:
        print(f"{setting.name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="swarmtune-wan-") as tmp:
            run = run_setting(setting, args.rounds, Path(tmp))
        run["summary"] = summarize(run["reports"])
        results[setting.name] = run
        print(f"  {run['modes']} {json.dumps(run['summary'])}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "wan.json").write_text(json.dumps(results, indent=1))
    command = "make bench-wan" + (f" ARGS='--rounds {args.rounds}'" if args.rounds != 8 else "")
    replace_section("wan", render(results, command, time.perf_counter() - started))
    print(render(results, command, time.perf_counter() - started))


if __name__ == "__main__":
    main()
