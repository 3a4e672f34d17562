"""Benchmark: overlapped rounds (averaging.overlap) against synchronous ones.

1. Loss cost, in the simulator (the daemon's round code), on the same seeds: 4 clients, one
   task each, every client in every round, H inner steps.
2. Time split on real peers on loopback: a coordinator and 4 volunteers at H=20 on the embedded
   base, synchronous and overlapped; utilization = inner compute / wall, per volunteer.
3. The same on a local Hugging Face model directory given by --model (skipped without one;
   README, "Base model", says how to build SmolLM2-135M offline).

Run:  .venv/bin/python bench/overlap.py [--model DIR] [--quick] [--part sim|real]
Writes bench/out/overlap-sim.json / overlap-real.json (a --part run keeps the other part's
file) and the "overlap" section of bench/RESULTS.md.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_md import replace_section  # noqa: E402
from swarm_bench import run_swarm, summarize_swarm  # noqa: E402

from swarmtune.node.config import SimConfig, parse_config  # noqa: E402
from swarmtune.node.local.data import BUILTIN_TASKS  # noqa: E402
from swarmtune.node.roles.simulate import Simulation  # noqa: E402

TASKS = list(BUILTIN_TASKS[:4])
SIM_BATCH = {"batch_size": 8, "seq_len": 48}  # as bench/attacks.py: a step ~2x cheaper than 64
OUT = ROOT / "bench" / "out"


def sim_runs(rounds: int, steps: int, seeds: list[int]) -> dict:
    """Final eval loss per seed, synchronous vs overlapped, and the curves."""
    out: dict = {"sync": {}, "overlap": {}}
    for seed in seeds:
        for mode in out:
            config = SimConfig.model_validate(
                {
                    "run": {
                        "inner": {"steps": steps, **SIM_BATCH},
                        "averaging": {"overlap": mode == "overlap"},
                    },
                    "clients": 4,
                    "participation": 1.0,
                    "tasks": TASKS,
                    "rounds": rounds,
                    "eval_every": 5,
                    "texts_per_client": 200,
                    "eval_batches": 2,
                }
            )
            started = time.perf_counter()
            rows = Simulation(config, seed).run().rows
            out[mode][seed] = {
                "final": rows[-1]["eval_loss"],
                "curve": [(int(r["round"]), r["eval_loss"]) for r in rows],
                "seconds": time.perf_counter() - started,
            }
            print(f"sim seed {seed} {mode}: {out[mode][seed]['final']:.4f}", flush=True)
    return out


def real_runs(
    peers: int, rounds: int, steps: int, model: str | None, tmp: Path, eval_every: int = 1
) -> dict:
    """summarize_swarm of a synchronous and an overlapped run of the same config; the held-out
    eval after every `eval_every`-th round only."""
    out = {}
    for mode in ("sync", "overlap"):
        config = parse_config(
            {
                "run_id": f"bench-{mode}",
                "base_model": model or "embedded",
                "inner": {"steps": steps},
                "averaging": {"overlap": mode == "overlap", "matchmaking_time": 2.0},
            }
        )
        extra = (*(("--model", model) if model else ()), "--eval-every", str(eval_every))
        reports = run_swarm(config, peers, rounds, tmp / f"{mode}-{peers}", extra)
        summary = summarize_swarm(reports)
        out[mode] = summary
        print(
            f"real {mode}: utilization {summary['utilization']:.2f},"
            f" wall {summary['wall_s']:.1f} s, eval {summary['final_eval']:.4f}",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["sim", "real", "all"], default="all")
    parser.add_argument("--sim-rounds", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sim-steps", type=int, default=10, help="H in the simulator")
    parser.add_argument("--inner-steps", type=int, default=20, help="H on real peers")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8, help="real-peer rounds")
    parser.add_argument("--model", help="a local HF causal LM dir for the third part")
    parser.add_argument("--model-peers", type=int, default=2)
    parser.add_argument("--model-rounds", type=int, default=3)
    parser.add_argument("--model-steps", type=int, default=5)
    parser.add_argument(
        "--model-eval-every",
        type=int,
        help="held-out eval every N rounds on the model (default: after the last round only;"
        " one eval costs about 12 s on SmolLM2-135M)",
    )
    parser.add_argument("--quick", action="store_true", help="4 sim rounds, 1 seed, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.sim_rounds, args.seeds, args.rounds = 4, [0], 3
    args.model_eval_every = args.model_eval_every or args.model_rounds
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there (a HF model directory?)")
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    header = {
        "args": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": ".venv/bin/python " + " ".join(["bench/overlap.py", *sys.argv[1:]]),
    }
    suffix = "-quick" if args.quick else ""
    if args.part in ("sim", "all"):
        sim = sim_runs(args.sim_rounds, args.sim_steps, args.seeds)
        (OUT / f"overlap-sim{suffix}.json").write_text(json.dumps({**header, "sim": sim}))
    if args.part in ("real", "all"):
        real: dict = {}
        with tempfile.TemporaryDirectory(prefix="swarmtune-overlap-") as tmp:
            real["real"] = real_runs(args.peers, args.rounds, args.inner_steps, None, Path(tmp))
            if args.model:
                real["model"] = real_runs(
                    args.model_peers,
                    args.model_rounds,
                    args.model_steps,
                    args.model,
                    Path(tmp),
                    args.model_eval_every,
                )
            else:
                print("no --model: the real-model part is skipped")
        (OUT / f"overlap-real{suffix}.json").write_text(json.dumps({**header, **real}))
    parts = [OUT / f"overlap-{p}{suffix}.json" for p in ("sim", "real")]
    text = render(*(json.loads(p.read_text()) if p.exists() else None for p in parts))
    if not args.quick:
        replace_section("overlap", text)
    print(text)


def _split(summary: dict) -> str:
    rounds = summary["rounds"]

    def mean(key: str) -> float:
        return sum(r[key] for r in rounds) / len(rounds)

    middle = rounds[1:-1] or rounds  # without the first round and the last
    steady = sum(r["wall_s"] for r in middle) / len(middle)
    steady_use = sum(r["inner_s"] for r in middle) / sum(r["wall_s"] for r in middle)

    return (
        f"{mean('inner_s'):.2f} | {mean('matchmaking_s'):.2f} | {mean('transfer_s'):.2f} |"
        f" {mean('wall_s'):.2f} | {steady:.2f} | {summary['utilization']:.2f} |"
        f" {steady_use:.2f} |"
        f" {summary['bytes_per_peer'] / len(rounds) / 1e6:.2f} |"
        f" {summary['averaged']}/{summary['reports']} | {summary['final_eval']:.4f}"
    )


def render(sim_part: dict | None, real_part: dict | None) -> str:
    """The RESULTS.md section, from measured numbers only."""
    lines = ["## Overlapped rounds (bench/overlap.py)", ""]
    if sim_part is not None:
        a, sim = sim_part["args"], sim_part["sim"]
        seeds = [str(s) for s in a["seeds"]]
        lines += [
            f"### Loss cost, simulator: 4 clients (one task each), all in every round,"
            f" H={a['sim_steps']}, {a['sim_rounds']} rounds",
            "",
            f"Measured on {sim_part['machine']}. Reproduce: `{sim_part['command']}`",
            "",
            "| seed | synchronous | overlapped | difference |",
            "|---|---|---|---|",
        ]
        diffs = []
        for seed in seeds:
            s, o = sim["sync"][seed]["final"], sim["overlap"][seed]["final"]
            diffs.append(o / s - 1)
            lines.append(f"| {seed} | {s:.4f} | {o:.4f} | {o / s - 1:+.2%} |")
        mean_s = statistics.mean(sim["sync"][s]["final"] for s in seeds)
        mean_o = statistics.mean(sim["overlap"][s]["final"] for s in seeds)
        lines += [
            f"| mean | {mean_s:.4f} | {mean_o:.4f} | {mean_o / mean_s - 1:+.2%}"
            f" (per seed {min(diffs):+.2%} to {max(diffs):+.2%}) |",
            "",
        ]
    if real_part is not None:
        a = real_part["args"]
        header = [
            "| mode | inner s | matchmaking s | transfer s | round wall s |"
            " wall s, rounds 2..N-1 | utilization | utilization, rounds 2..N-1 |"
            " MB sent per peer per round | rounds averaged | final eval |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"### Real peers on loopback: {a['peers']} volunteers, embedded base,"
            f" H={a['inner_steps']}, {a['rounds']} rounds, 1 torch thread each",
            "",
            f"Measured on {real_part['machine']}. Reproduce: `{real_part['command']}`",
            "",
            "Means over rounds and volunteers. inner s is the compute inside a round's wall time"
            " (overlapped: the next round's compute, so the first round holds two and the last"
            " none); overlapped, matchmaking and transfer run on the exchange thread behind that"
            " compute. Utilization = all compute / all wall time; rounds 2..N-1 leaves out the"
            " first round and the last, which hold an overlapped run's fill (two inner phases)"
            " and drain (no inner phase, the last exchange and eval).",
            "",
            *header,
            *(f"| {m} | {_split(real_part['real'][m])} |" for m in ("sync", "overlap")),
            "",
        ]
        if "model" in real_part:
            lines += [
                f"### Real peers, `--model {a['model']}`: {a['model_peers']} volunteers,"
                f" H={a['model_steps']}, {a['model_rounds']} rounds, held-out eval every"
                f" {a.get('model_eval_every') or 1} rounds",
                "",
                *header,
                *(f"| {m} | {_split(real_part['model'][m])} |" for m in ("sync", "overlap")),
                "",
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
