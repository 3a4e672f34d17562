"""Benchmark: cluster capture on real clustered peers (docs/design.md, 8. Trust, "Cluster seats
are not earned").

A coordinator and three honest volunteers on a clustered run (arithmetic, capitals, capitals:
the arithmetic volunteer is its task's only one), and bench/capture_join.py, which trains
honestly through the warm-up, then publishes the arithmetic volunteer's task signature as its
own and sends ATTACK's forgeries. Runs: clean and attacked at the defaults, attacked with
`averaging.min_group_size: 3`, attacked and clean with `clustering.min_cluster_size: 3`. Per row: whether the
attacker was clustered with its victim, the victim's final eval loss and how its rounds went,
the other honest volunteers' mean final eval loss.

Run:  .venv/bin/python bench/cluster_capture.py [--rounds 12] [--attack sign-flip]
Writes bench/out/cluster_capture.json and the `cluster-capture` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from results_md import replace_section  # noqa: E402

from swarmtune.node.roles.admit import peer_id  # noqa: E402
from swarmtune.node.roles.demo import Processes, start_swarm  # noqa: E402

TASKS = ["arithmetic", "capitals", "capitals"]  # the first is the victim


def config(min_group_size: int, min_cluster_size: int) -> dict[str, Any]:
    return {
        "run_id": "cluster-capture",
        "inner": {"steps": 10, "batch_size": 8, "seq_len": 48},
        "outer": {"name": "fedavg"},
        "averaging": {"matchmaking_time": 2.0, "min_group_size": min_group_size},
        "clustering": {
            "enabled": True,
            "warmup_rounds": 2,
            "merge_every": 2,
            "min_cluster_size": min_cluster_size,
        },
    }


def _metrics(vol: Path) -> list[dict]:
    path = vol / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _cluster(vol: Path) -> int | None:
    path = vol / "cluster.json"
    return json.loads(path.read_text())["cluster"] if path.exists() else None


def run(attack: str | None, sizes: tuple[int, int], rounds: int, workdir: Path) -> dict[str, Any]:
    """One run; the row's numbers."""
    workdir.mkdir(parents=True)
    (workdir / "run.yaml").write_text(json.dumps(config(*sizes)))
    victim = peer_id(workdir / "vol1")  # start_swarm's first volunteer: it keeps this identity
    procs = Processes()
    try:
        total = len(TASKS) + (attack is not None)
        wait = ("--wait-for", str(total))
        maddr, vols = start_swarm(procs, workdir / "run.yaml", workdir, TASKS, rounds, wait)
        if attack is not None:
            # the attacker trains on the victim's task during the warm-up, like an honest peer
            args = ["--data", f"builtin:{TASKS[0]}", "--workdir", str(workdir / "attacker")]
            args += ["--rounds", str(rounds + 10), "--initial-peers", maddr, "--threads", "1"]
            args += list(wait)
            program = [str(ROOT / "bench" / "capture_join.py"), victim, attack]
            procs.start("attacker", args, program=program)
        codes = [procs.procs[v.name].wait(timeout=120 + 40 * rounds) for v in vols]
    finally:
        procs.stop_all()
    metrics = [_metrics(v) for v in vols]
    finals = [m[-1] for m in metrics if m]
    clustered = [r for r in metrics[0] if r["round"] >= 3]  # after the warm-up and the switch
    attacker = workdir / "attacker"
    return {
        "exit_codes": codes,
        "victim_cluster": _cluster(vols[0]),
        "attacker_cluster": _cluster(attacker) if attack is not None else None,
        "victim_eval": finals[0]["eval_loss"] if finals else None,
        "victim_exact": finals[0].get("eval_exact") if finals else None,
        "others_eval": sum(f["eval_loss"] for f in finals[1:]) / max(len(finals) - 1, 1),
        "victim_rounds": {
            outcome: sum(1 for r in clustered if r["outcome"] == outcome)
            for outcome in sorted({r["outcome"] for r in clustered})
        },
        "victim_group_sizes": [r["group_size"] for r in clustered],
    }


def render(results: dict) -> str:
    """The RESULTS.md section."""
    lines = [
        "### Cluster capture: a copied task signature on real clustered peers",
        "",
        f"Coordinator + {len(TASKS)} honest volunteers ({', '.join(TASKS)}; the arithmetic one is"
        f" its task's only volunteer, the victim), clustered (warm-up 2 rounds), fedavg,"
        f" {results['rounds']} rounds; the attacker (bench/capture_join.py) copies the victim's"
        f" signature and sends {results['attack']}. `{results['command']}` on {results['machine']}.",
        "",
        "| run | attacker in the victim's cluster | victim's eval loss (exact) | victim's rounds after the warm-up | other honest eval loss |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        same = "-" if r["attacker_cluster"] is None else (
            "yes" if r["attacker_cluster"] == r["victim_cluster"] else "no"
        )  # fmt: skip
        rounds = ", ".join(f"{n} {k}" for k, n in r["victim_rounds"].items())
        exact = f" ({r['victim_exact']:.0%})" if r["victim_exact"] is not None else ""
        lines.append(
            f"| {name} | {same} | {r['victim_eval']:.3f}{exact} | {rounds} |"
            f" {r['others_eval']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--attack", default="sign-flip")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite RESULTS.md from the saved JSON"
    )
    args = parser.parse_args()
    saved = ROOT / "bench" / "out" / "cluster_capture.json"
    if args.render:
        replace_section("cluster-capture", render(json.loads(saved.read_text())))
        return
    runs = {  # (attack, (min_group_size, min_cluster_size))
        "clean, defaults": (None, (2, 1)),
        "attacked, defaults": (args.attack, (2, 1)),
        "attacked, min_group_size 3": (args.attack, (3, 1)),
        "attacked, min_cluster_size 3": (args.attack, (2, 3)),
        "clean, min_cluster_size 3": (None, (2, 3)),
    }
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="swarmtune-cluster-capture-") as tmp:
        for i, (name, (attack, sizes)) in enumerate(runs.items()):
            rows[name] = run(attack, sizes, args.rounds, Path(tmp) / f"run{i}")
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
    results = {
        "rows": rows,
        "rounds": args.rounds,
        "attack": args.attack,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": ".venv/bin/python " + " ".join(["bench/cluster_capture.py", *sys.argv[1:]]),
    }
    saved.parent.mkdir(exist_ok=True)
    saved.write_text(json.dumps(results, indent=1))
    replace_section("cluster-capture", render(results))
    print(render(results))


if __name__ == "__main__":
    main()
