"""The outer-optimizer study's winners on real peers (issue #12's final check).

bench/outer_study.py ranks the outer optimizers in the simulator. This runs the same methods,
at the server lrs the study tuned (bench/out/outer/results.json), on a real swarm: a coordinator
and one volunteer per task on loopback, every volunteer in every round. Beside it, the simulator
runs the same setting (same tasks, H, inner optimizer, rounds, every client in every round) on
three seeds, so the two paths can be read side by side.

Every method's swarm uses the same volunteer identities per repeat: a volunteer's data seed
comes from its peer id, so the methods of one repeat train on the same windows.

Run:  .venv/bin/python bench/outer_real.py [--rounds 20] [--repeats 2] [--quick]
Writes bench/out/outer-real.json and the `outer-real` section of bench/RESULTS.md (not --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from outer_study import BASE, METHODS, run_job, run_pool  # noqa: E402
from results_md import replace_section  # noqa: E402
from swarm_bench import run_swarm, summarize_swarm  # noqa: E402

from swarmtune.node.config import SimConfig, parse_config  # noqa: E402
from swarmtune.node.local.data import BUILTIN_TASKS  # noqa: E402
from swarmtune.protocols.swarm import identity_peer_id  # noqa: E402

STUDY = ROOT / "bench" / "out" / "outer" / "results.json"
OUT = ROOT / "bench" / "out" / "outer-real.json"
SIM_SEEDS = [0, 1, 2]


def chosen_lrs() -> dict[str, float]:
    """The server lr per method that the study tuned on its held-out seed, central setting."""
    if not STUDY.is_file():
        raise SystemExit(f"{STUDY} is missing: run `make bench-outer` first (it tunes the lrs)")
    return json.loads(STUDY.read_text())["chosen"]["center"]


def outer(method: str, lr: float) -> dict:
    """Every member takes part in every round here, so GHBM's tau = 1/C is 1."""
    return {**METHODS[method], "lr": lr, **({"tau": 1} if method == "GHBM" else {})}


def inner(steps: int) -> dict:
    return {"steps": steps, "batch_size": 4, "seq_len": 32, **BASE["inner"]}


def real_run(method: str, lr: float, keys: list[Path], rounds: int, steps: int, tmp: Path) -> dict:
    """One swarm of len(keys) volunteers with these identities; per-round mean eval loss."""
    config = parse_config(
        {
            "run_id": "outer-real",  # the same LoRA init and run for every method
            "inner": inner(steps),
            "outer": outer(method, lr),
            "averaging": {"matchmaking_time": 2.0},
        }
    )
    workdir = tmp / f"{method}-{keys[0].parent.parent.name}"
    for i, key in enumerate(keys):  # start_swarm's volunteer dirs, with the repeat's identities
        (workdir / f"vol{i + 1}").mkdir(parents=True)
        shutil.copy(key, workdir / f"vol{i + 1}" / "p2p.key")
    started = time.perf_counter()
    summary = summarize_swarm(run_swarm(config, len(keys), rounds, workdir, ()))
    return {
        "curve": [r["eval_loss"] for r in summary["rounds"]],
        "final": summary["final_eval"],
        "averaged": summary["averaged"],
        "reports": summary["reports"],
        "seconds": time.perf_counter() - started,
    }


def identities(tmp: Path, peers: int, repeats: int) -> list[list[Path]]:
    """`repeats` sets of `peers` libp2p keys (one set per repeat, shared by every method)."""
    sets = []
    for r in range(repeats):
        keys = []
        for i in range(peers):
            home = tmp / "ids" / f"repeat{r}" / f"vol{i + 1}"
            home.mkdir(parents=True)
            identity_peer_id(home)  # creates home/p2p.key
            keys.append(home / "p2p.key")
        sets.append(keys)
    return sets


def sim_runs(lrs: dict[str, float], peers: int, rounds: int, steps: int) -> dict:
    """The simulator on the same setting: final eval per method and seed."""
    jobs = []
    for method, lr in lrs.items():
        for seed in SIM_SEEDS:
            config = SimConfig.model_validate(
                {
                    "run": {
                        "run_id": "outer-real",
                        "inner": inner(steps),
                        "outer": outer(method, lr),
                    },
                    "clients": peers,
                    "participation": 1.0,
                    "tasks": list(BUILTIN_TASKS[:peers]),
                    "rounds": rounds,
                    "seeds": [seed],
                    "texts_per_client": 200,
                    "eval_every": max(1, rounds // 5),
                }
            ).model_dump()
            jobs.append(((method, seed), config))
    results = run_pool(jobs, run_job, 2, "sim")
    return {f"{m}|{s}": r["rows"][-1]["eval_loss"] for (m, s), r in results.items()}


def render(data: dict) -> str:
    a = data["args"]
    lines = [
        f"### Real peers against the simulator: {a['peers']} volunteers (one task each), every one"
        f" in every round, H={a['steps']}, {a['rounds']} rounds",
        "",
        f"Measured on {data['machine']}. Reproduce: `{data['command']}`",
        "",
        "Server lrs as tuned by the study (its central setting). Real: a coordinator and one"
        " volunteer per task on loopback, the mean of the volunteers' held-out loss on their own"
        " task; each repeat gives every method the same volunteer identities, so the same data"
        " windows. Simulator: the same tasks, H, inner AdamW and rounds, seeds"
        f" {', '.join(map(str, SIM_SEEDS))}.",
        "",
        "| method (lr) | real: final eval per repeat | real: mean | real: rounds averaged |"
        " simulator: final eval (mean ± std) |",
        "|---|---|---|---|---|",
    ]
    for method, lr in data["lrs"].items():
        runs = data["real"][method]
        finals = [r["final"] for r in runs]
        sims = [data["sim"][f"{method}|{s}"] for s in SIM_SEEDS]
        lines.append(
            f"| {method} ({lr}) | {', '.join(f'{x:.4f}' for x in finals)} |"
            f" {statistics.mean(finals):.4f} |"
            f" {sum(r['averaged'] for r in runs)}/{sum(r['reports'] for r in runs)} |"
            f" {statistics.mean(sims):.4f} ± {statistics.stdev(sims):.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=BASE["steps"], help="H")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats = 3, 1
    torch.set_num_threads(1)
    lrs = chosen_lrs()
    data: dict = {
        "args": vars(args),
        "lrs": lrs,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": ".venv/bin/python " + " ".join(["bench/outer_real.py", *sys.argv[1:]]),
        "real": {m: [] for m in lrs},
    }
    with tempfile.TemporaryDirectory(prefix="swarmtune-outer-real-") as name:
        tmp = Path(name)
        for repeat, keys in enumerate(identities(tmp, args.peers, args.repeats)):
            for method, lr in lrs.items():
                run = real_run(method, lr, keys, args.rounds, args.steps, tmp)
                data["real"][method].append(run)
                print(
                    f"[real repeat {repeat}] {method} (lr {lr}): final eval {run['final']:.4f},"
                    f" {run['averaged']}/{run['reports']} averaged, {run['seconds']:.0f} s",
                    flush=True,
                )
    data["sim"] = sim_runs(lrs, args.peers, args.rounds, args.steps)
    text = render(data)
    if not args.quick:
        OUT.write_text(json.dumps(data))
        replace_section("outer-real", text)
    print(text)


if __name__ == "__main__":
    main()
