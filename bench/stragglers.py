"""Benchmark: one slow volunteer among fast ones, on real peers, with and without a deadline.

Coordinator + 4 volunteers (one built-in task each, embedded base, 1 torch thread each) on
127.0.0.1. The slow one runs bench/slow_join.py: each of its inner steps takes FACTOR times as
long (it sleeps the difference, so it does not slow the others on the shared cores). Runs:
- `even`: no slow volunteer (the reference);
- `wait`: one volunteer FACTOR x slower, every member trains H steps (the product before
  `inner.deadline_s`): matchmaking waits up to `averaging.matchmaking_time` for it;
- `deadline`: the same, with `inner.deadline_s` set to the fast volunteers' mean H-step time
  measured in `even` (x 1.1): each member trains until then (at most H steps) and contributions
  are rescaled by their step counts (aggregation/steps.py);
- `auto`: the same with `inner.deadline_s: auto`: no deadline in the first round, then H x the
  group's median seconds per step, agreed from the members' gathered step times.
Reported per run: wall seconds per round and the fast volunteers' utilization (inner seconds
over wall seconds), the slow volunteer's steps per round and how many of its contributions
entered the fast members' aggregates, and the mean held-out eval loss of the volunteers after
the last round, plus the `wait` run's eval loss at the `deadline` run's total wall time.

Run:  .venv/bin/python bench/stragglers.py [--rounds 8] [--steps 20] [--factor 4]
Writes bench/out/stragglers.json and the `stragglers` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_md import replace_section  # noqa: E402

from swarmtune.node.config import parse_config  # noqa: E402
from swarmtune.node.local.data import BUILTIN_TASKS  # noqa: E402
from swarmtune.node.roles.admit import peer_id  # noqa: E402
from swarmtune.node.roles.demo import Processes, start_coordinator  # noqa: E402

OUT = ROOT / "bench" / "out" / "stragglers.json"
SLOW = ROOT / "bench" / "slow_join.py"
TASKS = list(BUILTIN_TASKS[:4])


def run(
    args: argparse.Namespace, factor: float, deadline: float | str | None, work: Path
) -> dict[str, Any]:
    """One swarm; per-volunteer metrics (vol4 is the slow one when factor > 1)."""
    work.mkdir(parents=True)
    rounds = args.rounds
    inner: dict[str, Any] = {"steps": args.steps, "batch_size": 8, "seq_len": 48}
    if deadline is not None:
        inner["deadline_s"] = deadline
    config = {"run_id": "straggler-bench", "inner": inner,
              "averaging": {"matchmaking_time": args.matchmaking, "overlap": args.overlap}}  # fmt: skip
    parse_config(config)
    (work / "run.yaml").write_text(json.dumps(config))
    every = str(args.eval_every)
    procs = Processes()
    vols = [work / f"vol{i + 1}" for i in range(4)]
    started = time.perf_counter()
    try:
        maddr = start_coordinator(procs, work / "run.yaml", work / "c", work / "addr")
        for i, (task, vol) in enumerate(zip(TASKS, vols, strict=True)):
            join = ["--initial-peers", maddr, "--data", f"builtin:{task}", "--workdir", str(vol)]
            join += ["--rounds", str(rounds), "--threads", "1", "--wait-for", "4"]
            join += ["--eval-every", every]
            if i == 3 and factor > 1:
                procs.start(vol.name, [str(factor), *join], program=[str(SLOW)])
            else:
                procs.start(vol.name, ["join", *join])
        codes = [procs.procs[v.name].wait(timeout=300 + 120 * rounds) for v in vols]
        assert not any(codes), f"volunteers failed: {codes}"
    finally:
        procs.stop_all()
    metrics = [
        [json.loads(x) for x in (v / "metrics.jsonl").read_text().splitlines()] for v in vols
    ]
    return {"metrics": metrics, "seconds": time.perf_counter() - started}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    metrics, slow_peer = result["metrics"], result["slow_peer"]
    fast, slow = metrics[:3], metrics[3]
    inner = sum(r["inner_s"] for m in fast for r in m)
    wall = sum(r["wall_s"] for m in fast for r in m)
    finals = [
        next(r["eval_loss"] for r in reversed(m) if r["eval_loss"] is not None) for m in metrics
    ]
    curve, clock = [], 0.0  # the fast members' mean eval after each evaluated round, at its end
    for i in range(min(len(m) for m in fast)):
        clock += sum(m[i]["wall_s"] for m in fast) / len(fast)
        if all(m[i]["eval_loss"] is not None for m in fast):
            curve.append((clock, sum(m[i]["eval_loss"] for m in fast) / len(fast)))
    return {
        "round_s": wall / max(sum(len(m) for m in fast), 1),
        "utilization": inner / wall if wall else 0.0,
        "slow_steps": [r.get("steps", 0) for r in slow],
        # rounds in which the slow volunteer's contribution entered a fast member's aggregate
        "slow_counted": sum(1 for m in fast for r in m if slow_peer in r["members"]),
        "fast_rounds": sum(len(m) for m in fast),
        "averaged": sum(1 for m in metrics for r in m if r["outcome"] == "averaged"),
        "rounds_total": sum(len(m) for m in metrics),
        "eval_loss": sum(finals) / len(finals),
        "curve": curve,
        "seconds": result["seconds"],
        # `auto`: the deadlines the fast members' groups agreed (None in the other runs)
        "agreed_s": [r.get("next_deadline_s") for r in fast[0]],
    }


def eval_at(curve: list[list[float]], seconds: float) -> float:
    """The last eval on `curve` reached within `seconds` (the first one if none was)."""
    reached = [loss for t, loss in curve if t <= seconds]
    return reached[-1] if reached else curve[0][1]


def render(data: dict[str, Any]) -> str:
    runs, args = data["runs"], data["args"]
    lines = [
        f"### Stragglers on real peers: 4 volunteers, one {args['factor']:g}x slower,"
        f" H={args['steps']}, {args['rounds']} rounds"
        + (", overlapped rounds" if args["overlap"] else ""),
        "",
        f"Measured {data['date']} on {data['machine']}; command: `{data['command']}`. Built-in"
        " tasks, embedded base, batch 8 x 48 tokens, 1 torch thread per volunteer, matchmaking_time"
        f" {args['matchmaking']:g} s, held-out eval every {args['eval_every']} rounds, overlapped"
        f" rounds {'on' if args['overlap'] else 'off'}. The slow volunteer sleeps after each inner step"
        " (bench/slow_join.py). `deadline`: `inner.deadline_s`"
        f" = {data['deadline_s'] or 0:.1f} s, 1.1 x the fast volunteers' mean H-step time in `even`;"
        " `auto`: `inner.deadline_s: auto` (none in the first round, then H x the group's median"
        " step time).",
        "",
        "| run | s per round (fast) | fast utilization | slow volunteer's steps per round |"
        " its contributions counted (fast rounds) | rounds averaged | mean eval loss |"
        " total s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        steps = ", ".join(str(s) for s in r["slow_steps"])
        lines.append(
            f"| {name} | {r['round_s']:.1f} | {r['utilization']:.2f} | {steps} |"
            f" {r['slow_counted']} of {r['fast_rounds']} | {r['averaged']} of"
            f" {r['rounds_total']} | {r['eval_loss']:.4f} | {r['seconds']:.0f} |"
        )
    agreed = [d for d in runs.get("auto", {}).get("agreed_s", []) if d is not None]
    if agreed:
        lines += [
            "",
            f"`auto`: the deadlines vol1's groups agreed, round by round:"
            f" {', '.join(f'{d:.1f}' for d in agreed)} s.",
        ]
    for name in ("deadline", "auto"):
        if "wait" not in runs or name not in runs:
            continue
        budget = runs[name]["curve"][-1][0]
        lines += [
            "",
            f"At the `{name}` run's last round ({budget:.0f} s of rounds), the fast volunteers'"
            f" mean eval loss was {runs[name]['curve'][-1][1]:.4f} with `{name}` and"
            f" {eval_at(runs['wait']['curve'], budget):.4f} waiting for the straggler (its last"
            " eval by then).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--eval-every", type=int, default=1, help="held-out eval every N rounds")
    parser.add_argument("--overlap", action="store_true", help="averaging.overlap: true")
    parser.add_argument("--matchmaking", type=float, default=30.0,
                        help="averaging.matchmaking_time (long enough to wait for the slow one)")  # fmt: skip
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=["even", "wait", "deadline", "auto"],
        help="only these runs (`deadline` needs `even`); printed, RESULTS.md left as it is",
    )
    args = parser.parse_args()
    if args.runs and "deadline" in args.runs and "even" not in args.runs:
        parser.error("--runs deadline needs even (its deadline is measured there)")
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="swarmtune-stragglers-") as tmp:
        plan: list[tuple[str, float]] = [
            ("even", 1.0),
            ("wait", args.factor),
            ("deadline", args.factor),
            ("auto", args.factor),
        ]
        plan = [(name, f) for name, f in plan if not args.runs or name in args.runs]
        deadline = None
        for name, factor in plan:
            if name == "deadline":
                fast = runs["even"]
                deadline = 1.1 * fast["inner_total"] / fast["fast_rounds"]
            work = Path(tmp) / name
            given = {"deadline": deadline, "auto": "auto"}.get(name)
            result = run(args, factor, given, work)
            result["slow_peer"] = peer_id(work / "vol4")
            runs[name] = summarize(result)
            runs[name]["inner_total"] = sum(r["inner_s"] for m in result["metrics"][:3] for r in m)
            print(
                name, json.dumps({k: v for k, v in runs[name].items() if k != "curve"}), flush=True
            )
    data = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "command": "bench/stragglers.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "deadline_s": deadline,
        "runs": runs,
    }
    text = render(data)
    print(text)
    if args.runs:
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2))
    replace_section("stragglers-overlap" if args.overlap else "stragglers", text)


if __name__ == "__main__":
    main()
