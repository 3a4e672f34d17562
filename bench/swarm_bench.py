"""Benchmark: a DiLoCo swarm on loopback vs plain local PEFT vs averaging after every step.

Run:  .venv/bin/python bench/swarm_bench.py [--peers 3 --rounds 4 --inner-steps 10]
Writes bench/out/results.json and rewrites bench/RESULTS.md with the measured tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_md import replace_section  # noqa: E402

from swarmtune.node.config import RunConfig, parse_config  # noqa: E402
from swarmtune.node.local.build import build_local_model  # noqa: E402
from swarmtune.node.local.data import BUILTIN_TASKS  # noqa: E402
from swarmtune.node.roles.demo import Processes, start_swarm  # noqa: E402
from swarmtune.protocols.lifeline import descendants  # noqa: E402

STAGES = ("inner_s", "matchmaking_s", "transfer_s", "outer_s", "checkpoint_s")


class CpuSampler:
    """CPU seconds by part of a swarm, read from /proc every `period` s while it runs: each
    volunteer's own process (training, exchange threads), its helper processes (hivemind's DHT
    and averager), the p2pd daemons, and the coordinator with everything under it. A process's
    last sample stands for its total, so up to `period` s of each one's end is missed."""

    def __init__(self, procs: Processes, period: float = 0.5) -> None:
        self.procs, self.period = procs, period
        self.ticks: dict[tuple[int, str], tuple[str, float]] = {}  # (pid, start) -> part, ticks
        self.timeline: list[tuple[float, dict[str, float]]] = []  # (time.time(), part -> ticks)
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for name, proc in list(self.procs.procs.items()):
                for pid in [proc.pid, *descendants(proc.pid)]:
                    self._sample(name, proc.pid, pid)
            totals: dict[str, float] = {}
            for part, ticks in self.ticks.values():  # ended processes keep their last sample
                totals[part] = totals.get(part, 0.0) + ticks
            self.timeline.append((time.time(), totals))

    def _sample(self, name: str, root: int, pid: int) -> None:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is the state (stat field 3)
        ticks = float(fields[11]) + float(fields[12])  # utime + stime (stat fields 14, 15)
        if name == "coord":
            part = "coordinator (all its processes)"
        elif comm == "p2pd":
            part = "p2pd daemons (volunteers')"
        elif pid == root:
            part = "volunteers' own processes (training, exchange)"
        else:
            part = "volunteers' DHT and averager processes"
        self.ticks[(pid, fields[19])] = (part, ticks)  # fields[19]: start time (stat field 22)

    def stop(self) -> dict[str, float]:
        """CPU seconds per part, plus the run's wall seconds and the cores it had."""
        self._stop.set()
        self._thread.join()
        per_second = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for part, ticks in self.ticks.values():
            out[part] = out.get(part, 0.0) + ticks / per_second
        out["wall_s"] = time.perf_counter() - self.started
        out["cores"] = float(os.cpu_count() or 1)
        return out

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per part between two time.time() moments (to the nearest samples
        inside them), plus that span's wall seconds and the cores; call after stop()."""
        inside = [(t, totals) for t, totals in self.timeline if start <= t <= end]
        if len(inside) < 2:
            return {}
        (t0, first), (t1, last) = inside[0], inside[-1]
        per_second = os.sysconf("SC_CLK_TCK")
        out = {part: (last[part] - first.get(part, 0.0)) / per_second for part in last}
        out["wall_s"] = t1 - t0
        out["cores"] = float(os.cpu_count() or 1)
        return out


def run_swarm(
    config: RunConfig,
    peers: int,
    rounds: int,
    workdir: Path,
    extra: tuple[str, ...] = (),
    cpu: dict[str, dict[str, float]] | None = None,
) -> list[list[dict]]:
    """Coordinator + volunteers as processes (`extra`: more join arguments); returns each
    volunteer's round reports, and fills `cpu` (if given) with CpuSampler's CPU seconds by
    part: "whole" (the coordinator's start to the last exit) and "rounds" (the first round's
    start to the last round's end, over all volunteers). `workdir` may hold the volunteers'
    dirs (vol1, ...) already."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "run.yaml").write_text(json.dumps(config.model_dump(mode="json")))
    procs = Processes()
    sampler = CpuSampler(procs) if cpu is not None else None
    try:
        tasks = list(BUILTIN_TASKS[:peers])
        _, vols = start_swarm(procs, workdir / "run.yaml", workdir, tasks, rounds, extra)
        codes = [procs.procs[v.name].wait() for v in vols]
        assert not any(codes), f"volunteers failed: {codes}"
    finally:
        if sampler is not None and cpu is not None:
            cpu["whole"] = sampler.stop()
        procs.stop_all()
    reports = [
        [json.loads(x) for x in (v / "metrics.jsonl").read_text().splitlines()] for v in vols
    ]
    if sampler is not None and cpu is not None:
        start = min(r[0]["time"] - r[0]["wall_s"] for r in reports)
        cpu["rounds"] = sampler.window(start, max(r[-1]["time"] for r in reports))
    return reports


def _local_worker(config_json: str, task: str, steps: int, barrier: Any, results: Any) -> None:
    """One plain local PEFT run in its own process (1 torch thread), timed from a barrier that
    every run of the batch passes together, so they share the cores as the swarm's do."""
    torch.set_num_threads(1)
    local = build_local_model(parse_config(json.loads(config_json)), f"builtin:{task}", data_seed=1)
    before = local.eval_loss()
    barrier.wait()
    started = time.perf_counter()
    inner = local.trainer.train_steps(steps)
    seconds = time.perf_counter() - started
    results.put(
        {
            "task": task,
            "seconds": seconds,
            "eval_before": before,
            "eval_after": local.eval_loss(),
            "loss_last": inner.loss_last,
        }
    )


def run_local(config: RunConfig, peers: int, steps: int) -> list[dict]:
    """Plain local PEFT training at the swarm's load: one process per volunteer's task, all at
    once, same steps and batch."""
    ctx = get_context("spawn")
    barrier, results = ctx.Barrier(peers), ctx.Queue()
    config_json = json.dumps(config.model_dump(mode="json"))
    procs = [
        ctx.Process(target=_local_worker, args=(config_json, task, steps, barrier, results))
        for task in BUILTIN_TASKS[:peers]
    ]
    for proc in procs:
        proc.start()
    out = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return sorted(out, key=lambda x: BUILTIN_TASKS.index(x["task"]))


def summarize_swarm(reports: list[list[dict]]) -> dict:
    """Per-round stage times (mean over peers), bytes per peer, utilization, final eval, and
    the volunteers' round reports that averaged, out of all."""
    rounds = []
    for index in range(min(len(r) for r in reports)):
        rows = [r[index] for r in reports]
        entry = {k: sum(row[k] for row in rows) / len(rows) for k in (*STAGES, "wall_s")}
        entry.update(
            round=index + 1,
            # the last member to arrive: forming the group once everyone is in
            matchmaking_last_s=min(row["matchmaking_s"] for row in rows),
            group=max(row["group_size"] for row in rows),
            sent_per_peer=sum(row["bytes_sent"] for row in rows) / len(rows),
            eval_loss=_mean_eval(rows),
        )
        rounds.append(entry)
    wall = sum(r["wall_s"] for r in rounds)
    return {
        "rounds": rounds,
        "wall_s": wall,
        "utilization": sum(r["inner_s"] for r in rounds) / wall,
        "bytes_per_peer": sum(r["sent_per_peer"] for r in rounds),
        "final_eval": next(
            (r["eval_loss"] for r in reversed(rounds) if r["eval_loss"] is not None), None
        ),
        "averaged": sum(row["outcome"] == "averaged" for r in reports for row in r),
        "reports": sum(len(r) for r in reports),
    }


def _mean_eval(rows: list[dict]) -> float | None:
    """Mean eval loss of a round's volunteers; None where none evaluated (join --eval-every)."""
    losses = [row["eval_loss"] for row in rows if row["eval_loss"] is not None]
    return sum(losses) / len(losses) if losses else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--matchmaking", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = {
        "run_id": "bench",
        "inner": {"steps": args.inner_steps},
        "averaging": {"matchmaking_time": args.matchmaking},
    }
    diloco = parse_config(base)
    overlapped = parse_config({**base, "averaging": {**base["averaging"], "overlap": True}})
    every_step = parse_config(
        {
            **base,
            "run_id": "bench-sync",
            "inner": {"steps": 1},
            "outer": {"name": "average", "lr": 1.0},
        }
    )
    steps = args.rounds * args.inner_steps
    # like the local runs: every volunteer starts once all have loaded (no first round that
    # waits for the slowest to load), and evaluates once, after its last round
    start = ("--wait-for", str(args.peers))
    diloco_args = (*start, "--eval-every", str(args.rounds))
    # local PEFT runs before and after the swarms: this VM's speed drifts by 10-20% within
    # minutes, and their mean is the fairer baseline for swarm runs in between
    local_before = run_local(diloco, args.peers, steps)
    with tempfile.TemporaryDirectory() as tmp:
        cpu: dict[str, dict[str, dict[str, float]]] = {"diloco": {}, "overlap": {}}
        swarm = summarize_swarm(
            run_swarm(
                diloco, args.peers, args.rounds, Path(tmp) / "diloco", diloco_args, cpu["diloco"]
            )
        )
        overlap = summarize_swarm(
            run_swarm(
                overlapped,
                args.peers,
                args.rounds,
                Path(tmp) / "overlap",
                diloco_args,
                cpu["overlap"],
            )
        )
        every = (*start, "--eval-every", str(steps))
        sync = summarize_swarm(run_swarm(every_step, args.peers, steps, Path(tmp) / "sync", every))
    local = run_local(diloco, args.peers, steps)
    results = {
        "args": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "diloco": swarm,
        "overlap": overlap,
        "every_step": sync,
        "local": local,
        "local_before": local_before,
        "cpu": cpu,
    }
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    replace_section("swarm", render(results))
    print(render(results))


def render(res: dict) -> str:
    """RESULTS.md from measured numbers only."""
    a, d, s = res["args"], res["diloco"], res["every_step"]
    steps = a["rounds"] * a["inner_steps"]
    lines = [
        "## Swarm overhead on loopback (bench/swarm_bench.py)",
        "",
        f"Measured on {res['machine']}, all peers on 127.0.0.1, 1 torch thread per process.",
        "",
        "Reproduce: `.venv/bin/python bench/swarm_bench.py --peers {peers} --rounds {rounds} "
        "--inner-steps {inner_steps} --matchmaking {matchmaking}` (or `make bench`)".format(**a),
        "",
        f"### DiLoCo swarm: {a['peers']} volunteers, H={a['inner_steps']}, {a['rounds']} rounds",
        "",
        "Seconds per round, mean over volunteers (wall includes the state sync; every volunteer"
        " starts once all are in, `join --wait-for`, and evaluates after its last round only,"
        " `--eval-every`, as the local runs do):",
        "",
        "| round | group | inner | matchmaking | exchange | outer | checkpoint | wall "
        "| MB sent/peer | eval loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rounds"]:
        lines.append(
            f"| {r['round']} | {r['group']} | {r['inner_s']:.2f} | {r['matchmaking_s']:.2f}"
            f" | {r['transfer_s']:.2f} | {r['outer_s']:.3f} | {r['checkpoint_s']:.3f} | "
            f"{r['wall_s']:.2f} | {r['sent_per_peer'] / 1e6:.2f} | {_loss(r['eval_loss'])} |"
        )
    lines += [
        "",
        f"Compute utilization (inner compute / wall): **{d['utilization']:.0%}**.",
        "",
        "Both round modes, means over rounds and volunteers (overlapped: inner is the compute "
        "inside a round's wall, the next round's; matchmaking and transfer run behind it):",
        "",
        "| mode | inner s | matchmaking s | transfer s | round wall s | utilization "
        "| MB sent per peer per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, run in (("synchronous", d), ("overlapped", res["overlap"])):
        n = len(run["rounds"])
        mean = {k: sum(r[k] for r in run["rounds"]) / n for k in (*STAGES, "wall_s")}
        lines.append(
            f"| {mode} | {mean['inner_s']:.2f} | {mean['matchmaking_s']:.2f} | "
            f"{mean['transfer_s']:.2f} | {mean['wall_s']:.2f} | {run['utilization']:.2f} | "
            f"{run['bytes_per_peer'] / n / 1e6:.2f} |"
        )
    if all("matchmaking_last_s" in r for r in d["rounds"]):
        n = len(d["rounds"])
        last = sum(r["matchmaking_last_s"] for r in d["rounds"]) / n
        everyone = sum(r["matchmaking_s"] for r in d["rounds"]) / n
        lines += [
            "",
            f"Synchronous matchmaking took {everyone:.2f} s a round on average; the last member to "
            f"arrive spent {last:.2f} s of it (forming the group once everyone was in), the "
            "others also waited for slower members' compute. Matchmaking scheduled ahead of the "
            f"compute's end could save at most the {last:.2f} s.",
        ]
    lines += [
        "",
        f"### Side by side at equal inner steps ({steps} AdamW steps per volunteer) and equal load",
        "",
        f"Each setup runs {a['peers']} training processes at once on the same cores (the swarm "
        "also runs its coordinator). steps/s is one volunteer's inner steps over its wall time "
        "(rounds only, from a start all volunteers wait for, `join --wait-for`; local: from a "
        "barrier all processes pass together). The swarm's wall includes its one held-out eval "
        "after the last round; the local runs' eval is outside their timing.",
        "",
        "| setup | wall s (per volunteer) | steps/s | vs local PEFT | MB sent per peer "
        "| mean eval loss after |",
        "|---|---|---|---|---|---|",
    ]
    local_wall = sum(x["seconds"] for x in res["local"]) / len(res["local"])
    local_eval = sum(x["eval_after"] for x in res["local"]) / len(res["local"])
    before = res.get("local_before")
    drift = ""
    if before:  # the mean of the runs before and after the swarms
        after_wall = local_wall
        before_wall = sum(x["seconds"] for x in before) / len(before)
        local_wall = (before_wall + after_wall) / 2
        drift = (
            f"Local PEFT ran before the swarm runs ({before_wall:.1f} s) and after them"
            f" ({after_wall:.1f} s); its row and the ratios use the mean of the two."
        )
    rows = [
        (f"DiLoCo swarm, average every {a['inner_steps']} steps", d),
        (f"DiLoCo swarm, overlapped rounds (H={a['inner_steps']})", res["overlap"]),
        ("swarm averaging after every step (outer: plain average)", s),
    ]
    for label, run in rows:
        lines.append(
            f"| {label} | {run['wall_s']:.1f} | {steps / run['wall_s']:.2f} | "
            f"{local_wall / run['wall_s']:.2f}x | {run['bytes_per_peer'] / 1e6:.2f} | "
            f"{run['final_eval']:.4f} |"
        )
    lines += [
        f"| plain local PEFT, no swarm (each task alone) | {local_wall:.1f} | "
        f"{steps / local_wall:.2f} | 1.00x | 0 | {local_eval:.4f} |",
        "",
        "Eval loss is each volunteer's held-out loss on its own task, averaged over tasks. "
        "The swarm trains one shared adapter for all tasks, while local PEFT trains one "
        "adapter per task, so local training is expected to fit its own task better; the "
        "swarm's value is one adapter that serves every member. Bytes are the contribution "
        "payloads each volunteer sent (its blob times the g-1 members that fetched it, "
        "framing not counted), not socket counters.",
        "",
        "Local PEFT per task (the run after the swarms): "
        + ", ".join(
            f"{x['task']} {x['eval_before']:.3f} -> {x['eval_after']:.3f} ({x['seconds']:.1f}s)"
            for x in res["local"]
        ),
        "",
        *([drift, ""] if drift else []),
    ]
    if res.get("cpu"):
        lines += render_cpu(res["cpu"])
    return "\n".join(lines)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_cpu(cpu: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Where the cores went during each swarm run (CpuSampler), as CPU seconds and shares of
    what the cores could give (cores x wall): over the whole run (start-up and shutdown
    included) and over the rounds only."""
    modes = {"diloco": "synchronous", "overlap": "overlapped"}
    spans = {"whole": "whole run", "rounds": "rounds only"}
    columns = [(m, k) for m in cpu for k in spans if cpu[m].get(k)]
    skip = ("wall_s", "cores")
    parts = sorted({p for m, k in columns for p in cpu[m][k] if p not in skip})
    lines = [
        "### Where the cores went during the swarm runs",
        "",
        "CPU seconds by part, read from /proc every 0.5 s (CpuSampler); share = CPU seconds /"
        " (cores x wall). Whole run: the coordinator's start to the last volunteer's exit."
        " Rounds only: the first volunteer's first round start to the last round's end.",
        "",
        "| part | " + " | ".join(f"{modes[m]}, {spans[k]}" for m, k in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for part in [*parts, "idle"]:
        cells = []
        for m, k in columns:
            run = cpu[m][k]
            capacity = run["cores"] * run["wall_s"]
            used = sum(v for name, v in run.items() if name not in skip)
            value = capacity - used if part == "idle" else run.get(part, 0.0)
            cells.append(f"{value:.1f} s ({value / capacity:.0%})")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    walls = ", ".join(f"{modes[m]} {spans[k]} {cpu[m][k]['wall_s']:.1f} s" for m, k in columns)
    cores = int(cpu[columns[0][0]][columns[0][1]]["cores"]) if columns else 0
    lines += ["", f"Wall: {walls}; {cores} cores.", ""]
    return lines


if __name__ == "__main__":
    main()
