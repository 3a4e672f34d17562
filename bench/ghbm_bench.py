"""GHBM benchmark: outer optimizers under partial participation and heterogeneity (issue 3).

Runs the grid in bench/ghbm_grid.yaml through `node.roles.simulate` (the daemon's round code on the
in-memory transport), in parallel worker processes, and writes bench/out/ghbm/results.json (every curve),
bench/ghbm.png (curves and the tau sweep) and the `ghbm` section of bench/RESULTS.md.

    .venv/bin/python bench/ghbm_bench.py            # the full grid (make bench-ghbm)
    .venv/bin/python bench/ghbm_bench.py --quick    # a 1-minute smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_md import replace_section  # noqa: E402

from swarmtune.node.config import SimConfig, load_sim_config  # noqa: E402

OUT = ROOT / "bench" / "out" / "ghbm"


def jobs_from_grid(grid: dict[str, Any], quick: bool) -> list[tuple[str, str, int, dict]]:
    """(setting, label, seed, SimConfig dict) for every run of the grid and the tau sweep."""
    base = load_sim_config(ROOT / grid["base"]).model_dump()
    if quick:
        base.update(clients=10, participation=0.3, rounds=4, seeds=[0], eval_every=2)
    jobs = []
    runs = [(s, label, m) for s in grid["settings"] for label, m in grid["methods"].items()]
    sweep = grid["tau_sweep"]
    for tau in sweep["taus"]:
        runs.append((sweep["setting"], f"sweep tau={tau}", {**sweep["method"], "tau": tau}))
    for setting, label, method in runs:
        for seed in base["seeds"]:
            config = {**base, "heterogeneity": grid["settings"][setting], "seeds": [seed]}
            config["run"] = {**base["run"], "outer": method}
            jobs.append((setting, label, seed, SimConfig.model_validate(config).model_dump()))
    return jobs


def run_job(config: dict) -> tuple[list[dict], float]:
    """One seed of one config in a worker process (1 torch thread)."""
    import torch

    from swarmtune.node.roles.simulate import Simulation

    torch.set_num_threads(1)
    sim_config = SimConfig.model_validate(config)
    result = Simulation(sim_config, sim_config.seeds[0]).run()
    return result.rows, result.seconds


def run_all(jobs: list[tuple[str, str, int, dict]], workers: int) -> dict[str, dict]:
    """Results keyed 'setting|label' -> {seed: rows}; prints one line per finished run."""
    results: dict[str, dict] = {}
    started = time.perf_counter()
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_job, job[3]): job for job in jobs}
        for done, future in enumerate(as_completed(futures), start=1):
            setting, label, seed, _ = futures[future]
            rows, seconds = future.result()
            results.setdefault(f"{setting}|{label}", {})[seed] = rows
            elapsed = time.perf_counter() - started
            print(
                f"[{done}/{len(jobs)}] {setting:8s} {label:16s} seed {seed}: final eval"
                f" {rows[-1]['eval_loss']:.4f} ({seconds:.0f}s; {elapsed / 60:.1f} min elapsed,"
                f" ~{elapsed / done * (len(jobs) - done) / 60:.1f} min left)",
                flush=True,
            )
    return results


def finals(runs: dict) -> list[float]:
    """Final mean eval loss per seed."""
    return [rows[-1]["eval_loss"] for _, rows in sorted(runs.items())]


def rounds_to(rows: list[dict], target: float) -> int | None:
    """First evaluated round at or below target."""
    return next((int(r["round"]) for r in rows if r["eval_loss"] <= target), None)


def summarize(results: dict[str, dict], grid: dict) -> dict[str, list[dict]]:
    """Per setting: mean/std final loss, and rounds to reach FedAvg's mean final loss."""
    table: dict[str, list[dict]] = {}
    for setting in grid["settings"]:
        target = statistics.mean(finals(results[f"{setting}|FedAvg"]))
        start = statistics.mean(r[0]["eval_loss"] for r in results[f"{setting}|FedAvg"].values())
        rows = []
        for label in grid["methods"]:
            runs = results[f"{setting}|{label}"]
            values = finals(runs)
            reached = [rounds_to(rows_, target) for rows_ in runs.values()]
            rows.append(
                {
                    "method": label,
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "rounds_to_fedavg": reached,
                    "start": start,
                    "target": target,
                }
            )
        table[setting] = rows
    return table


def plot(results: dict[str, dict], grid: dict, path: Path) -> None:
    """Mean eval-loss curves per method, one panel per setting, plus the tau sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(grid["settings"])
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(6 * (len(settings) + 1), 4.5))
    for ax, setting in zip(axes, settings, strict=False):
        for label in grid["methods"]:
            runs = list(results[f"{setting}|{label}"].values())
            rounds = [r["round"] for r in runs[0]]
            mean = [statistics.mean(rr[i]["eval_loss"] for rr in runs) for i in range(len(rounds))]
            ax.plot(rounds, mean, label=label)
        ax.set_title(f"{setting}: mean eval loss over seeds")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    sweep = grid["tau_sweep"]
    taus = sweep["taus"]
    values = [finals(results[f"{sweep['setting']}|sweep tau={t}"]) for t in taus]
    means = [statistics.mean(v) for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    axes[-1].errorbar(taus, means, yerr=stds, marker="o", capsize=3)
    axes[-1].set_xscale("log")
    axes[-1].set_title(f"GHBM tau sweep ({sweep['setting']}): final eval loss")
    axes[-1].set_xlabel("tau")
    axes[-1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_rounds(reached: list[int | None]) -> str:
    hits = [r for r in reached if r is not None]
    if not hits:
        return "not reached"
    mean = statistics.mean(hits)
    return f"{mean:.0f}" + ("" if len(hits) == len(reached) else f" ({len(hits)}/{len(reached)})")


def render(table: dict, results: dict, grid: dict, meta: dict) -> str:
    """The RESULTS.md section, from measured numbers only."""
    base = meta["base"]
    lines = [
        "## Outer optimizers under partial participation (bench/ghbm_bench.py)",
        "",
        f"Measured on {meta['machine']}; {meta['minutes']:.1f} min wall with {meta['workers']}"
        f" worker processes. Reproduce: `{meta['command']}` (or `make bench-ghbm`).",
        "",
        f"Setup: K = {base['clients']} simulated clients, C = {base['participation']}"
        f" ({round(base['clients'] * base['participation'])} per round), {base['rounds']} rounds,"
        f" H = {base['run']['inner']['steps']} inner AdamW steps (lr {base['run']['inner']['lr']},"
        f" batch {base['run']['inner']['batch_size']}x{base['run']['inner']['seq_len']} tokens),"
        f" LoRA r = {base['run']['lora']['rank']} on the embedded tiny Llama, seeds"
        f" {base['seeds']}. Eval loss = mean over the 5 built-in tasks' held-out sets of the"
        " global adapter. Methods and hyperparameters: `bench/ghbm_grid.yaml`.",
        "",
    ]
    for setting, rows in table.items():
        lines += [
            f"### {setting}: eval loss after {base['rounds']} rounds (start"
            f" {rows[0]['start']:.4f})",
            "",
            "| method | final eval loss (mean ± std) | rounds to reach FedAvg's final"
            f" ({rows[0]['target']:.4f}) |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['mean']:.4f} ± {r['std']:.4f} |"
            f" {_fmt_rounds(r['rounds_to_fedavg'])} |"
            for r in rows
        ]
        lines.append("")
    sweep = grid["tau_sweep"]
    lines += [
        f"### GHBM tau sweep ({sweep['setting']}, C = {base['participation']})",
        "",
        "| tau | final eval loss (mean ± std) |",
        "|---|---|",
    ]
    for tau in sweep["taus"]:
        values = finals(results[f"{sweep['setting']}|sweep tau={tau}"])
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {tau} | {statistics.mean(values):.4f} ± {std:.4f} |")
    lines += ["", "![eval loss per round and tau sweep](ghbm.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=ROOT / "bench" / "ghbm_grid.yaml")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; RESULTS.md untouched")
    args = parser.parse_args()
    grid = yaml.safe_load(args.grid.read_text())
    jobs = jobs_from_grid(grid, args.quick)
    print(f"{len(jobs)} runs on {args.workers} workers", flush=True)
    started = time.perf_counter()
    results = run_all(jobs, args.workers)
    table = summarize(results, grid)
    out = OUT / "quick" if args.quick else OUT
    out.mkdir(parents=True, exist_ok=True)
    plot(results, grid, out / "ghbm.png" if args.quick else ROOT / "bench" / "ghbm.png")
    base = SimConfig.model_validate(jobs[0][3]).model_dump()
    base["seeds"] = sorted({job[2] for job in jobs})
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {_torch_version()}",
        "workers": args.workers,
        "minutes": (time.perf_counter() - started) / 60,
        "command": ".venv/bin/python bench/ghbm_bench.py" + (" --quick" if args.quick else ""),
        "base": base,
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "table": table, "runs": results}, indent=1, default=_nan)
    )
    text = render(table, results, grid, meta)
    if not args.quick:
        replace_section("ghbm", text)
    print(text)


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


if __name__ == "__main__":
    main()
