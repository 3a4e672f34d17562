"""Benchmark: what one group of every volunteer costs as the swarm grows, on the simulator's clock.

The daemon forms one group of every live volunteer each round (README, "Known limits"). This
bench puts numbers on that for N = 16, 64, 256 and 1024 volunteers with the simulator's clock
(node/roles/clock.py; docs/design.md, "The simulator's clock", says where its distributions
come from): seconds per round (split into the wait for the slowest member, windows lost to
members that left, and the exchange) and bytes per member per round, without churn and with it.
Eval loss comes from the simulator's real training (the daemon's round code on the embedded
base, one task per client, every client in every round) for the sizes this machine can train
in reasonable time (--train-up-to); larger sizes report the clock only (marked "-").

Run:  .venv/bin/python bench/scale.py [--sizes 16 64 256 1024] [--rounds 10] [--train-up-to 64]
Writes bench/out/scale.json and the `scale` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from results_md import replace_section  # noqa: E402

from swarmtune.node.config import ClockSettings, SimConfig  # noqa: E402
from swarmtune.node.roles.clock import Clock, Profile, round_time  # noqa: E402
from swarmtune.node.roles.simulate import Simulation  # noqa: E402

OUT = ROOT / "bench" / "out" / "scale.json"
MB = 1_000_000


def sim_config(n: int, rounds: int, clock: ClockSettings) -> SimConfig:
    return SimConfig.model_validate(
        {
            "run": {"inner": {"steps": 10, "batch_size": 8, "seq_len": 48}},
            "clients": n,
            "participation": 1.0,
            "rounds": rounds,
            "texts_per_client": 40,
            "eval_batches": 2,
            "clock": clock.model_dump(),
        }
    )


def clock_only(n: int, rounds: int, clock: ClockSettings, blob: int, window: float, seed: int):
    """The clock's rounds for n volunteers without training (every live one in the group)."""
    timer = Clock(n, clock, window, seed)
    rows = []
    for _ in range(rounds):
        timer.churn()
        members = timer.present(range(n))
        spent = timer.advance(members, 10, blob)
        rows.append(
            {
                "members": spent.members,
                "missed": spent.missed,
                "round_s": spent.wall_s,
                "compute_s": spent.compute_s,
                "waited_s": spent.waited_s,
                "exchange_s": spent.exchange_s,
                "bytes_per_member": spent.bytes_per_member,
            }
        )
    return rows


def trained(n: int, rounds: int, clock: ClockSettings, seed: int) -> tuple[float, float, list]:
    """Eval loss at the start and after `rounds` of the simulator with its clock."""
    sim = Simulation(sim_config(n, rounds, clock), seed)
    start = sim.evaluate()["eval_loss"]
    rows = [sim.step() for _ in range(rounds)]
    return start, sim.evaluate()["eval_loss"], rows


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    return {
        "members": statistics.mean(r["members"] for r in rows),
        "missed": statistics.mean(r["missed"] for r in rows),
        "round_s": statistics.mean(r["round_s"] for r in rows),
        "compute_s": statistics.mean(r.get("compute_s", 0.0) for r in rows),
        "waited_s": statistics.mean(r.get("waited_s", 0.0) for r in rows),
        "exchange_s": statistics.mean(r.get("exchange_s", 0.0) for r in rows),
        "bytes_per_member": statistics.mean(r["bytes_per_member"] for r in rows),
    }


def against_real(path: Path, blob: int, window: float) -> dict[str, Any] | None:
    """The clock against bench/churn.py's steady run of real peers on this machine: every
    volunteer at the run's mean step time (utilization x seconds per round / H), loopback links
    (300 MB/s, bench/RESULTS.md "Transfer throughput"), no round trip; what the clock predicts
    per round against what the run measured."""
    if not path.exists():
        return None
    real = json.loads(path.read_text())
    steady = real["runs"]["steady"]
    n, steps = steady["stable_volunteers"], real["args"]["steps"]
    step_s = steady["utilization"] * steady["round_s"] / steps
    loopback = 300 * MB
    members = [Profile(step_s, loopback, loopback, 0.0)] * n
    predicted = round_time(members, steps, blob, window, no_show=False)
    return {
        "source": str(path.relative_to(ROOT)),
        "date": real["date"],
        "volunteers": n,
        "steps": steps,
        "eval_every": real["args"]["every"],
        "step_s": step_s,
        "measured_round_s": steady["round_s"],
        "predicted_round_s": predicted.wall_s,
    }


def render(data: dict[str, Any]) -> str:
    c = data["clock"]
    lines = [
        "### One group of everyone, on the simulator's clock: N = "
        + ", ".join(str(n) for n in data["sizes"]),
        "",
        f"Measured {data['date']} on {data['machine']}; command: `{data['command']}`."
        f" H = 10 inner steps; step times log-uniform in [1, {c['speed_spread']:g}] x"
        f" {c['step_s']:g} s; links log-normal (sigma {c['link_sigma']:g}) around"
        f" {c['up_mbps']:g} Mbit/s up and {c['down_mbps']:g} down; round trips"
        f" {c['rtt_ms'][0]:g}-{c['rtt_ms'][1]:g} ms; matchmaking window {data['window']:g} s;"
        f" {data['rounds']} rounds, seed {data['seed']}. Blob: one encoded contribution,"
        " fp32 (the embedded base's, measured; `SmolLM2-135M` is LoRA r=8 on all 7 projections:"
        f" {data['smollm2_values']:,} values x 4 bytes). Churn: a live volunteer leaves with"
        f" chance {data['churn']:g} each round and a gone one is back with chance"
        f" {data['back']:g}.",
        "",
        "| N | blob | churn | in the group per round | too late per round | s per round"
        " | until the last one in s | waiting s | exchange s | MB per member per round"
        " | eval loss (start -> end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        s = row["summary"]
        loss = f"{row['eval_start']:.4f} -> {row['eval_end']:.4f}" if "eval_end" in row else "-"
        lines.append(
            f"| {row['n']} | {row['blob']} | {row['churn']:g} | {s['members']:.1f}"
            f" | {s['missed']:.1f} | {s['round_s']:.1f} | {s['compute_s']:.1f} | {s['waited_s']:.1f}"
            f" | {s['exchange_s']:.1f} | {s['bytes_per_member'] / MB:.1f} | {loss} |"
        )
    real = data.get("real")
    if real:
        gap = real["measured_round_s"] - real["predicted_round_s"]
        lines += [
            "",
            f"A consistency check against real peers ({real['source']}, steady run of"
            f" {real['date']}: {real['volunteers']} volunteers on this machine, H ="
            f" {real['steps']}), not a validation: the step time is the run's own (its"
            f" utilization x seconds per round / H = {real['step_s']:.3f} s), so the compute part"
            " agrees by construction, and on loopback links the exchange is milliseconds. The"
            f" clock then predicts {real['predicted_round_s']:.2f} s a round against"
            f" {real['measured_round_s']:.2f} s measured: {gap:.2f} s a round that the clock"
            " leaves out on one machine (hivemind's matchmaking, the held-out eval every"
            f" {real['eval_every']} rounds, checkpoints, the spread of the volunteers' step"
            " times on shared cores). Its exchange term at large N is not checked by any run"
            " here.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--train-up-to", type=int, default=64)
    parser.add_argument("--churn", type=float, default=0.05)
    parser.add_argument("--back", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--real", type=Path, default=ROOT / "bench" / "out" / "churn.json", help="a churn run"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    quiet = ClockSettings()
    churny = quiet.model_copy(update={"churn": args.churn, "back": args.back})
    probe = Simulation(sim_config(2, 1, quiet), args.seed)
    embedded = probe.blob_bytes
    window = probe.config.run.averaging.matchmaking_time
    # SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, 3 of 9 heads' width for k and v:
    # 192): LoRA r=8 on q, k, v, o, gate, up, down, A (r x in) and B (out x r) per module
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    smollm2_values = 30 * sum(8 * (i + o) for i, o in shapes)
    blobs = {
        f"embedded {embedded / MB:.2f} MB": embedded,
        "SmolLM2-135M 9.8 MB": 4 * smollm2_values,
    }
    rows = []
    for n in args.sizes:
        for settings in (quiet, churny):
            for name, blob in blobs.items():
                started = time.perf_counter()
                row: dict[str, Any] = {"n": n, "blob": name, "churn": settings.churn}
                rounds = clock_only(n, args.rounds, settings, blob, window, args.seed)
                if blob == embedded and n <= args.train_up_to:
                    start, end, timed = trained(n, args.rounds, settings, args.seed)
                    row.update(eval_start=start, eval_end=end)
                    # the simulation's clock draws what the clock alone drew (same seed)
                    keys = ("members", "missed", "round_s", "bytes_per_member")
                    assert [[t[k] for k in keys] for t in timed] == [
                        [r[k] for k in keys] for r in rounds
                    ], "the simulation's clock differs from the clock alone"
                row["summary"] = summarize(rounds)
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
                print(json.dumps(row), flush=True)
    data = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "bench/scale.py " + " ".join(sys.argv[1:]),
        "sizes": args.sizes,
        "rounds": args.rounds,
        "seed": args.seed,
        "window": window,
        "churn": args.churn,
        "back": args.back,
        "clock": quiet.model_dump(),
        "smollm2_values": smollm2_values,
        "rows": rows,
        "real": against_real(args.real, embedded, window),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2))
    text = render(data)
    print(text)
    replace_section("scale", text)


if __name__ == "__main__":
    main()
