"""Benchmark: volunteers that die and come back, on real peers, against a run without churn.

Coordinator + N volunteers (built-in tasks in turn, embedded base, 1 torch thread each) on
127.0.0.1, the product's default averaging settings. Runs:
- `steady`: nobody leaves;
- `churn`: every K rounds (as vol1 counts them) one volunteer other than vol1, in turn, is
  killed with SIGKILL mid-run and restarted from its work dir D seconds later; it runs until
  the swarm's last round.
Reported per run: the volunteers that were never killed (their rounds not averaged, mean wall
seconds per round, the longest matchmaking wait of any round, utilization = inner seconds over
wall seconds), each restarted volunteer's seconds from its restart to its first averaged round
and how many rounds it took, and the mean held-out eval loss of all volunteers at the end.

Run:  .venv/bin/python bench/churn.py [--volunteers 6] [--rounds 30] [--every 8]
Writes bench/out/churn.json and the `churn` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_md import replace_section  # noqa: E402

from swarmtune.node.config import RunConfig, parse_config  # noqa: E402
from swarmtune.node.local.data import BUILTIN_TASKS  # noqa: E402
from swarmtune.node.roles.demo import Processes, start_coordinator  # noqa: E402

OUT = ROOT / "bench" / "out" / "churn.json"


def _metrics(vol: Path) -> list[dict[str, Any]]:
    path = vol / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _join_args(args: argparse.Namespace, maddr: str, task: str, vol: Path, rounds: int) -> list:
    join = ["join", "--initial-peers", maddr, "--data", f"builtin:{task}", "--workdir", str(vol)]
    return [*join, "--rounds", str(rounds), "--threads", "1", "--eval-every", str(args.every)]


def _watch_rejoin(vol: Path, before: int, since: float, out: dict[str, Any]) -> None:
    """Record how long a restarted volunteer took to conclude an averaged round (and how many
    rounds after its restart that was); gives up after 10 minutes."""
    while time.perf_counter() - since < 600:
        rows = _metrics(vol)[before:]
        hit = next((i for i, r in enumerate(rows) if r["outcome"] == "averaged"), None)
        if hit is not None:
            out.update(seconds=time.perf_counter() - since, rounds=hit + 1)
            return
        time.sleep(0.2)


def run(args: argparse.Namespace, churn: bool, work: Path) -> dict[str, Any]:
    """One swarm; per-volunteer metrics, and each restart's time to its first averaged round."""
    work.mkdir(parents=True)
    inner = {"steps": args.steps, "batch_size": 8, "seq_len": 48}
    config = {"run_id": "churn-bench", "inner": inner}
    parse_config(config)
    (work / "run.yaml").write_text(json.dumps(config))
    n = args.volunteers
    tasks = [BUILTIN_TASKS[i % 4] for i in range(n)]
    vols = [work / f"vol{i + 1}" for i in range(n)]
    procs = Processes()
    rejoins: list[dict[str, Any]] = []
    watchers: list[threading.Thread] = []
    started = time.perf_counter()
    try:
        maddr = start_coordinator(procs, work / "run.yaml", work / "c", work / "addr")
        for task, vol in zip(tasks, vols, strict=True):
            join = _join_args(args, maddr, task, vol, args.rounds)
            procs.start(vol.name, [*join, "--wait-for", str(n)])
        victim = 1
        for at in range(args.every, args.rounds, args.every) if churn else ():
            while len(_metrics(vols[0])) < at:  # vol1 concluded round `at`
                assert procs.procs[vols[0].name].poll() is None, "vol1 exited early"
                time.sleep(0.2)
            vol = vols[victim]
            os.killpg(procs.procs[vol.name].pid, signal.SIGKILL)
            procs.procs[vol.name].wait(timeout=30)
            print(f"[bench] killed {vol.name} as vol1 finished round {at}", flush=True)
            time.sleep(args.down)
            left = args.rounds - len(_metrics(vols[0]))  # until the swarm's last round
            before = len(_metrics(vol))
            procs.start(vol.name, _join_args(args, maddr, tasks[victim], vol, max(left, 1)))
            record: dict[str, Any] = {"volunteer": vol.name, "killed_at": at, "rounds_left": left}
            rejoins.append(record)
            watch = threading.Thread(
                target=_watch_rejoin, args=(vol, before, time.perf_counter(), record), daemon=True
            )
            watch.start()
            watchers.append(watch)
            victim = victim % (n - 1) + 1
        restarted = {r["volunteer"] for r in rejoins}
        for vol in vols:  # the volunteers never killed end at the swarm's last round
            if vol.name not in restarted:
                code = procs.procs[vol.name].wait(timeout=300 + 60 * args.rounds)
                assert code == 0, f"{vol.name} exited with {code}"
        for record in rejoins:  # a restarted one may be rounds short of its count (it
            # synced ahead), or still starting up: Ctrl+C, and SIGKILL after 60 s (reported)
            proc = procs.procs[record["volunteer"]]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait(timeout=30)
                record["sigkilled"] = True
                print(f"[bench] {record['volunteer']} ignored Ctrl+C for 60 s", flush=True)
            # 130 or -SIGINT: Ctrl+C reached it still starting up (in the CLI or its imports)
            assert code in (0, 130, -signal.SIGINT, -signal.SIGKILL), (record, code)
        for watch in watchers:
            watch.join(timeout=1)
    finally:
        procs.stop_all()
    return {
        "metrics": {v.name: _metrics(v) for v in vols},
        "rejoins": rejoins,
        "seconds": time.perf_counter() - started,
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    metrics, rejoins = result["metrics"], result["rejoins"]
    killed = {r["volunteer"] for r in rejoins}
    rows = [r for name, m in metrics.items() if name not in killed for r in m]
    inner = sum(r["inner_s"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    finals = [
        next((r["eval_loss"] for r in reversed(m) if r["eval_loss"] is not None), None)
        for m in metrics.values()
    ]
    known = [f for f in finals if f is not None]
    return {
        "stable_volunteers": len(metrics) - len(killed),
        "stable_rounds": len(rows),
        "stable_not_averaged": sum(1 for r in rows if r["outcome"] != "averaged"),
        "stable_exclusions": sum(len(r["excluded"]) for r in rows),
        "round_s": wall / max(len(rows), 1),
        "max_matchmaking_s": max((r["matchmaking_s"] for r in rows), default=0.0),
        "utilization": inner / wall if wall else 0.0,
        "eval_loss": sum(known) / len(known),
        "seconds": result["seconds"],
        "rejoins": rejoins,
    }


def render(data: dict[str, Any]) -> str:
    args, runs = data["args"], data["runs"]
    lines = [
        f"### Churn on real peers: {args['volunteers']} volunteers, one killed (SIGKILL) and"
        f" restarted every {args['every']} rounds, {args['rounds']} rounds",
        "",
        f"Measured {data['date']} on {data['machine']}; command: `{data['command']}`. Built-in"
        f" tasks in turn, embedded base, H={args['steps']}, batch 8 x 48 tokens, 1 torch thread"
        " per volunteer, the default averaging settings (matchmaking_time"
        f" {data['matchmaking_time']:g} s), eval every {args['every']} rounds; a killed"
        f' volunteer restarts from its work dir {args["down"]:g} s later. "stable": the'
        " volunteers never killed.",
        "",
        "| run | stable volunteers' rounds not averaged | contributions they left out | s per"
        " round (stable) | longest matchmaking s | stable utilization | mean eval loss (all) |"
        " total s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['stable_not_averaged']} of {r['stable_rounds']} |"
            f" {r['stable_exclusions']} | {r['round_s']:.1f} | {r['max_matchmaking_s']:.1f} |"
            f" {r['utilization']:.2f} | {r['eval_loss']:.4f} | {r['seconds']:.0f} |"
        )
    rejoins = runs.get("churn", {}).get("rejoins", [])
    if rejoins:
        lines += ["", "| restarted | killed after vol1's round | s to its first averaged round |"
                  " rounds it took |", "|---|---|---|---|"]  # fmt: skip
        for r in rejoins:
            secs = f"{r['seconds']:.1f}" if "seconds" in r else "never"
            if r.get("sigkilled"):
                secs += " (ignored Ctrl+C at the end: SIGKILL)"
            lines.append(
                f"| {r['volunteer']} | {r['killed_at']} | {secs} | {r.get('rounds', '-')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volunteers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=8, help="kill one volunteer every K rounds")
    parser.add_argument("--down", type=float, default=2.0, help="seconds before its restart")
    args = parser.parse_args()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="swarmtune-churn-") as tmp:
        for name in ("steady", "churn"):
            result = run(args, name == "churn", Path(tmp) / name)
            runs[name] = summarize(result)
            print(name, json.dumps(runs[name]), flush=True)
    data = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "bench/churn.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "matchmaking_time": RunConfig().averaging.matchmaking_time,
        "runs": runs,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2))
    text = render(data)
    print(text)
    replace_section("churn", text)


if __name__ == "__main__":
    main()
