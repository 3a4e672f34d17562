"""Benchmark: the swarm on slow links, direct and through the coordinator's relay.

Two volunteers, each in its own "home" network namespace behind a router namespace, and the
coordinator in a "public" one (tests/integration/netns.py). Each home's link to the public
segment is limited with tc tbf (both directions). Per setting: 2 volunteers, H=20 inner steps
on the embedded base, synchronous rounds, ROUNDS rounds.
- loopback: every process in the public namespace (no link between them);
- direct: the routers only route (the public segment has routes to the homes): the dial-back
  probe succeeds and the volunteers fetch from each other;
- relay: the routers are MASQUERADE NATs: the probe fails, blobs go through the coordinator.
Latency is not emulated: this kernel has no netem qdisc.

Needs root, `ip`, `tc` and `iptables` (like the emulated-network test); skips otherwise.
Run:  .venv/bin/python bench/wan.py [--rounds N]   (about 4 minutes on 2 cores)
Writes bench/out/wan.json and the "wan" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from netns import PUBLIC, Homes  # noqa: E402
from results_md import replace_section  # noqa: E402
from swarm_harness import Swarm  # noqa: E402

OUT = ROOT / "bench" / "out"
CONFIG = """run_id: wan-bench
inner: {{steps: 20, batch_size: 8, seq_len: 48}}
averaging: {{matchmaking_time: 2.0, overlap: {overlap}}}
"""
SETTINGS = [  # name, link rate, NAT, overlap
    ("loopback", "", False, False),
    ("100 Mbit/s direct", "100mbit", False, False),
    ("100 Mbit/s relay", "100mbit", True, False),
    ("10 Mbit/s direct", "10mbit", False, False),
    ("10 Mbit/s relay", "10mbit", True, False),
    ("10 Mbit/s relay, overlapped", "10mbit", True, True),
]


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def run_setting(name: str, rate: str, nat: bool, overlap: bool, rounds: int, tmp: Path) -> dict:
    """One swarm in fresh namespaces; per-volunteer round reports and the modes they chose."""
    homes = Homes(prefix=f"wb{os.getpid() % 10000}", rate=rate, nat=nat)
    why = homes.up()
    if why is not None:
        raise SystemExit(f"bench/wan.py: {why}")
    swarm = Swarm(tmp, config_text=CONFIG.format(overlap=str(overlap).lower()))
    try:
        loopback = name == "loopback"
        host = "127.0.0.1" if loopback else "0.0.0.0"
        swarm.start_coordinator("--host", host, netns=homes.pub)
        addrs = (tmp / "addr.txt").read_text().split()
        for i in (1, 2):
            swarm.maddr = addrs[0] if loopback else next(a for a in addrs if f"/{PUBLIC[i]}/" in a)
            swarm.join(f"v{i}", ("dates", "arithmetic")[i - 1], rounds, "--host", host,
                       netns=homes.pub if loopback else homes.home(i))  # fmt: skip
        for i in (1, 2):
            assert swarm.wait(f"v{i}", timeout=60 + 60 * rounds) == 0, swarm.log(f"v{i}")
        modes = [swarm.log(f"v{i}").splitlines()[0].split()[2] for i in (1, 2)]
        return {"reports": [metrics(tmp / f"v{i}") for i in (1, 2)], "modes": modes}
    finally:
        swarm.close()
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
        "uplink and downlink. No added latency (no netem here). Rounds 2 and later, both",
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
    for name, rate, nat, overlap in SETTINGS:
        print(f"{name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="swarmtune-wan-") as tmp:
            run = run_setting(name, rate, nat, overlap, args.rounds, Path(tmp))
        run["summary"] = summarize(run["reports"])
        results[name] = run
        print(f"  {run['modes']} {json.dumps(run['summary'])}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "wan.json").write_text(json.dumps(results, indent=1))
    command = "make bench-wan" + (f" ARGS='--rounds {args.rounds}'" if args.rounds != 8 else "")
    replace_section("wan", render(results, command, time.perf_counter() - started))
    print(render(results, command, time.perf_counter() - started))


if __name__ == "__main__":
    main()
