"""Outer-optimizer study (issue #12): where server momentum pays off for LoRA with AdamW inner
steps, one factor at a time around a central setting, with the server lr tuned per method on a
held-out seed; and how far averaging the LoRA factors is from averaging the updates (measured in
every plain-averaging run of the study, so it costs no runs of its own).

Every run is `node.roles.simulate.Simulation` (the daemon's round code on the in-memory
transport), in parallel worker processes (1 torch thread each). Clients are dealt from shuffled
decks (`sampling: balanced`), so with rounds = 20/C every client takes part at least 20 times.

    .venv/bin/python bench/outer_study.py            # the study (make bench-outer)
    .venv/bin/python bench/outer_study.py --quick    # the same code on a small budget

Writes bench/out/outer[/quick]/results.json, bench/outer.png and bench/lora_error.png, and the
`outer-study` section of bench/RESULTS.md (not in --quick mode).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_md import replace_section  # noqa: E402

from swarmtune.node.config import SimConfig  # noqa: E402
from swarmtune.node.roles.simulate import Simulation  # noqa: E402

OUT = ROOT / "bench" / "out" / "outer"
TUNE_SEED = 100  # held out: only the lr choice sees it
EVAL_SEEDS = [0, 1, 2]
BASE: dict[
    str, Any
] = {  # the central setting: few volunteers, partial participation, one task each
    "clients": 10,
    "participation": 0.3,
    "steps": 5,
    "heterogeneity": {"kind": "task"},
    "inner": {"optimizer": "adamw", "lr": 0.003},
}
SETTINGS: dict[str, dict[str, Any]] = {  # one factor at a time around BASE
    "center": {},
    "H=20": {"steps": 20},
    "H=50": {"steps": 50},
    "dirichlet 0.1": {"heterogeneity": {"kind": "dirichlet", "alpha": 0.1}},
    "dirichlet 1": {"heterogeneity": {"kind": "dirichlet", "alpha": 1.0}},
    "iid (tokens)": {"heterogeneity": {"kind": "iid", "balance": "tokens"}},
    "C=0.1": {"clients": 20, "participation": 0.1},  # 2 per round
    "SGD inner": {"inner": {"optimizer": "sgd", "lr": 0.2}},
    # exact aggregation: A frozen at the shared seeded init, only B trained and averaged, so
    # mean(B_i) A = mean(B_i A) (FFA-LoRA, arXiv 2403.12313); half the bytes
    "FFA-LoRA": {"lora": {"freeze_a": True}},
}
# Three methods, for the budget: plain averaging, DiLoCo's default, and GHBM with tau = 1/C.
# (FedHBM and LocalGHBM tracked GHBM within noise in bench/ghbm_bench.py and in a quick run.)
METHODS: dict[str, dict[str, Any]] = {
    "FedAvg": {"name": "fedavg"},
    "Nesterov": {"name": "nesterov", "momentum": 0.9},
    "GHBM": {"name": "ghbm", "momentum": 0.9},
}
# Settings whose server lrs are tuned on their own (on the held-out seed); every other setting
# uses the central setting's. H=50 is left out for the budget: tuning it alone costs 15 min.
TUNED = ["center", "H=20", "C=0.1", "SGD inner"]
# Four lrs each, a factor ~3 apart; a first 3-lr grid chose an end of the grid for two methods
LR_GRID = {
    "FedAvg": [0.5, 1.0, 2.0, 4.0],
    "Nesterov": [0.03, 0.1, 0.3, 0.7],
    "GHBM": [0.03, 0.1, 0.3, 1.0],  # momentum 0.9: a step of lr / (1 - 0.9) once built up
}


def sim_config(setting: str, method: str, lr: float, seed: int, budget: dict) -> dict:
    """The SimConfig (as a dict) of one run."""
    s = {**BASE, **SETTINGS[setting]}
    inner = {**BASE["inner"], **SETTINGS[setting].get("inner", {})}
    outer = {**METHODS[method], "lr": lr}
    if method == "GHBM":
        outer["tau"] = max(1, round(1 / s["participation"]))
    rounds = math.ceil(s.get("participations", budget["participations"]) / s["participation"])
    config = {
        "run": {
            "run_id": "outer-study",
            "lora": s.get("lora", {}),
            "inner": {"steps": s["steps"], "batch_size": 4, "seq_len": 32, **inner},
            "outer": outer,
        },
        "clients": s["clients"],
        "participation": s["participation"],
        "sampling": "balanced",
        "heterogeneity": s["heterogeneity"],
        "rounds": rounds,
        "seeds": [seed],
        "texts_per_client": 200,
        "eval_every": max(1, rounds // budget["evals"]),
    }
    return SimConfig.model_validate(config).model_dump()


def run_job(config: dict) -> dict:
    """One run in a worker process: its rows, wall time and participations per client. A
    plain-averaging run of both factors also records, per round, how far averaging the factors
    is from the exact mean update (bench/ffa.py's MeasuredSimulation: aggregation/taskvec.py's
    factor_average_error, the mean over LoRA modules)."""
    import torch
    from ffa import MeasuredSimulation

    torch.set_num_threads(1)
    parsed = SimConfig.model_validate(config)
    measured = parsed.run.outer.name == "fedavg" and not parsed.run.lora.freeze_a
    sim = (MeasuredSimulation if measured else Simulation)(parsed, config["seeds"][0])
    errors: list[float] = []
    if isinstance(sim, MeasuredSimulation):
        sim.errors = errors
    result = sim.run()
    joined = [c.rounds_joined for c in sim.clients]
    params = sum(v.numel() for v in sim.state.params.values())
    out = {"rows": result.rows, "seconds": result.seconds, "joined": joined, "params": params}
    return {**out, "errors": errors} if measured else out


def cost(config: dict) -> int:
    """Inner steps of a run: longest runs go first, so no worker idles at the end."""
    members = max(1, round(config["participation"] * config["clients"]))
    return config["rounds"] * members * config["run"]["inner"]["steps"]


def run_pool(jobs: list[tuple[Any, dict]], fn: Any, workers: int, what: str) -> dict:
    """key -> fn(config) for every (key, config), in `workers` processes, one line per run."""
    results: dict = {}
    started = time.perf_counter()
    jobs = sorted(jobs, key=lambda job: -cost(job[1]))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(fn, config): key for key, config in jobs}
        for done, future in enumerate(as_completed(futures), start=1):
            key = futures[future]
            results[key] = out = future.result()
            elapsed = time.perf_counter() - started
            final = out["rows"][-1]["eval_loss"]
            print(
                f"[{what} {done}/{len(jobs)}] {' | '.join(map(str, key))}: final eval {final:.4f}"
                f" ({out['seconds']:.0f}s; {elapsed / 60:.1f} min, "
                f"~{elapsed / done * (len(jobs) - done) / 60:.1f} min left)",
                flush=True,
            )
    return results


def mb_per_round(config: dict, params: int) -> float:
    """MB of fp32 deltas that a round's members send each other (an all-gather)."""
    members = max(1, round(config["participation"] * config["clients"]))
    return members * (members - 1) * params * 4 / 1e6


def diverged(rows: list[dict]) -> bool:
    """Final eval loss not finite, or 1.5x the starting loss."""
    final = rows[-1]["eval_loss"]
    return not math.isfinite(final) or final > 1.5 * rows[0]["eval_loss"]


def tail_loss(rows: list[dict]) -> float:
    """Mean eval loss of the last two evaluations (less noisy than the last one alone)."""
    values = [r["eval_loss"] for r in rows[-2:]]
    return sum(values) / len(values)


def lr_setting(setting: str) -> str:
    """The setting whose tuned lrs `setting` uses: its own if tuned, else the central one."""
    return setting if setting in TUNED else "center"


def tune(settings: list[str], workers: int, budget: dict) -> tuple[dict, dict]:
    """Server lr per tuned setting and method: the lowest tail loss on the held-out seed."""
    jobs = [
        ((setting, method, lr), sim_config(setting, method, lr, TUNE_SEED, budget))
        for setting in settings
        for method, lrs in LR_GRID.items()
        for lr in lrs
    ]
    results = run_pool(jobs, run_job, workers, "tune")
    chosen = {
        setting: {
            method: min(lrs, key=lambda lr, s=setting, m=method: _key(results[(s, m, lr)]["rows"]))
            for method, lrs in LR_GRID.items()
        }
        for setting in settings
    }
    return chosen, {f"{s}|{m}|{lr}": r for (s, m, lr), r in results.items()}


def _key(rows: list[dict]) -> float:
    loss = tail_loss(rows)
    return loss if math.isfinite(loss) else float("inf")


def evaluate(chosen: dict, budget: dict, workers: int, done: dict) -> dict:
    """The evaluation runs of the budget's settings; those already in `done` (saved runs with
    the same lrs) are not run again."""
    jobs = [
        (
            (setting, method, seed),
            sim_config(setting, method, chosen[lr_setting(setting)][method], seed, budget),
        )
        for setting in budget["settings"]
        for method in METHODS
        for seed in budget["seeds"]
        if f"{setting}|{method}|{seed}" not in done
    ]
    results = run_pool(jobs, run_job, workers, "eval")
    return {f"{s}|{m}|{seed}": r for (s, m, seed), r in results.items()}


def factor_errors(runs: dict, budget: dict) -> dict[str, dict[str, float]]:
    """Per setting: the factor-average error of its plain-averaging runs, averaged over seeds
    (mean over rounds, first round, last round), with that setting's H."""
    out = {}
    for setting in SETTINGS:
        group = [runs.get(f"{setting}|FedAvg|{seed}") for seed in budget["seeds"]]
        if not all(g and g.get("errors") for g in group):
            continue
        series = [g["errors"] for g in group]  # type: ignore[index]
        out[setting] = {
            "h": sim_config(setting, "FedAvg", 1.0, 0, budget)["run"]["inner"]["steps"],
            "mean": statistics.mean(statistics.mean(x) for x in series),
            "first": statistics.mean(x[0] for x in series),
            "last": statistics.mean(x[-1] for x in series),
            "rounds": len(series[0]),
        }
    return out


def summarize(runs: dict, chosen: dict, budget: dict) -> dict:
    """Per setting and method: final loss mean/std, rounds and MB to FedAvg's final loss,
    divergence and participations."""
    table: dict[str, list[dict]] = {}
    for setting in (s for s in SETTINGS if f"{s}|FedAvg|{budget['seeds'][0]}" in runs):
        fedavg = [runs[f"{setting}|FedAvg|{s}"] for s in budget["seeds"]]
        target = statistics.mean(r["rows"][-1]["eval_loss"] for r in fedavg)
        rows = []
        for method in METHODS:
            group = [runs[f"{setting}|{method}|{s}"] for s in budget["seeds"]]
            finals = [r["rows"][-1]["eval_loss"] for r in group]
            lr = chosen[lr_setting(setting)][method]
            config = sim_config(setting, method, lr, 0, budget)
            mb_round = mb_per_round(config, group[0]["params"])
            reached = [
                next(
                    (int(x["round"]) for x in r["rows"] if x["round"] and x["eval_loss"] <= target),
                    None,
                )
                for r in group
            ]
            rows.append(
                {
                    "method": method,
                    "lr": lr,
                    "mean": statistics.mean(finals),
                    "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "rounds_to_fedavg": reached,
                    "mb_per_round": mb_round,
                    "diverged": sum(diverged(r["rows"]) for r in group),
                    "min_joined": min(min(r["joined"]) for r in group),
                    "rounds": config["rounds"],
                    "target": target,
                    "start": group[0]["rows"][0]["eval_loss"],
                }
            )
        table[setting] = rows
    return table


def _rounds_text(row: dict) -> str:
    hits = [r for r in row["rounds_to_fedavg"] if r is not None]
    if not hits:
        return "not reached | -"
    mean = statistics.mean(hits)
    spread = f" [{min(hits)}-{max(hits)}]" if len(hits) > 1 else ""
    seeds = len(row["rounds_to_fedavg"])
    missing = "" if len(hits) == seeds else f" ({len(hits)}/{seeds} seeds)"
    mb = mean * row["mb_per_round"]
    return f"{mean:.0f}{spread}{missing} | {mb:.0f} MB ({mean / row['rounds']:.2f}x)"


def plot(runs: dict, budget: dict, path: Path) -> None:
    """Loss against rounds and against bytes, one panel pair per setting (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if f"{s}|FedAvg|{budget['seeds'][0]}" in runs]
    fig, axes = plt.subplots(2, len(settings), figsize=(4.2 * len(settings), 7), squeeze=False)
    for col, setting in enumerate(settings):
        for method in METHODS:
            group = [runs[f"{setting}|{method}|{s}"] for s in budget["seeds"]]
            rounds = [x["round"] for x in group[0]["rows"]]
            mean = [
                statistics.mean(r["rows"][i]["eval_loss"] for r in group)
                for i in range(len(rounds))
            ]
            per_round = mb_per_round(
                sim_config(setting, method, 1.0, 0, budget), group[0]["params"]
            )
            mb = [x * per_round for x in rounds]
            axes[0][col].plot(rounds, mean, label=method)
            axes[1][col].plot(mb, mean, label=method)
        axes[0][col].set_title(setting, fontsize=9)
        axes[0][col].set_xlabel("round")
        axes[1][col].set_xlabel("MB sent by all members")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel("eval loss (mean of seeds)")
    axes[1][0].set_ylabel("eval loss (mean of seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_errors(runs: dict, errors: dict, budget: dict, path: Path) -> None:
    """The factor-average error per round of every measured setting (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for setting in errors:
        series = [runs[f"{setting}|FedAvg|{seed}"]["errors"] for seed in budget["seeds"]]
        mean = [statistics.mean(values) for values in zip(*series, strict=True)]
        ax.plot(range(1, len(mean) + 1), mean, label=setting)
    ax.set_xlabel("round with a group")
    ax.set_ylabel("||mean(B)mean(A) - mean(BA)|| / ||mean(BA) - B0A0||")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(table: dict, tuning: dict, chosen: dict, errors: dict, budget: dict, meta: dict) -> str:
    """The RESULTS.md section, from measured numbers only."""
    lines = [
        "## Outer-optimizer study: where momentum pays off for LoRA (bench/outer_study.py)",
        "",
        f"Measured on {meta['machine']}, {meta['workers']} worker processes; wall minutes by"
        f" invocation: {_minutes(meta)}. Reproduce: `{meta['command']}` (the whole study) or"
        " `.venv/bin/python bench/outer_study.py --settings NAME,...` (some settings, joined to"
        " the saved runs).",
        "",
        f"Central setting: K = {BASE['clients']} simulated clients, C = {BASE['participation']},"
        f" one task per client, H = {BASE['steps']} inner AdamW steps (lr"
        f" {BASE['inner']['lr']}, batch 4x32 tokens), LoRA r = 8 on the embedded tiny Llama."
        f" Rounds = {budget['participations']}/C, and each round's clients are dealt from"
        " shuffled decks of all K (`sampling: balanced`), so every client takes part at least"
        f" {budget['participations']} times (the least count is in the tables). Each row"
        " changes one factor. Server lr tuned per method on held-out seed"
        f" {TUNE_SEED} in each of the settings {', '.join(x for x in TUNED if x in chosen)}"
        " (every other setting uses the central setting's), then fixed; evaluated on seeds"
        f" {budget['seeds']}. GHBM uses tau = 1/C. Diverged: final eval loss 1.5x the start or"
        " not finite. MB = fp32 deltas sent by all members of a round's all-gather, summed to"
        " the round where the method first reached FedAvg's mean final eval loss.",
        "",
        f"### Server lr tuning (seed {TUNE_SEED}): tail eval loss per lr",
        "",
        "| setting | method | "
        + " | ".join(f"lr {i + 1}: tail loss" for i in range(4))
        + " | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in (x for x in TUNED if x in chosen):
        for method, lrs in LR_GRID.items():
            cells = []
            for lr in lrs:
                rows = tuning[f"{setting}|{method}|{lr}"]["rows"]
                mark = " (diverged)" if diverged(rows) else ""
                cells.append(f"{lr}: {tail_loss(rows):.4f}{mark}")
            lines.append(
                f"| {setting} | {method} | " + " | ".join(cells) + f" | {chosen[setting][method]} |"
            )
    lines.append("")
    for setting, rows in table.items():
        first = rows[0]
        lines += [
            f"### {setting}: {first['rounds']} rounds, start {first['start']:.4f},"
            f" FedAvg's final {first['target']:.4f}",
            "",
            "| method (lr) | final eval loss (mean ± std) | rounds to FedAvg's final [range] |"
            " MB to it (share of the run) | diverged | least participations |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} ({r['lr']}) | {r['mean']:.4f} ± {r['std']:.4f} |"
                f" {_rounds_text(r)} | {r['diverged']}/{len(r['rounds_to_fedavg'])} |"
                f" {r['min_joined']} |"
            )
        lines.append("")
    lines += ["![loss against rounds and against bytes](outer.png)", ""]
    if errors:
        lines += [
            "### Averaging the factors is not averaging the updates",
            "",
            "Measured in every plain-averaging run above (both factors averaged, seeds"
            f" {budget['seeds']}): per round, the relative Frobenius error"
            " || s mean(B_i) mean(A_i) - mean(s B_i A_i) || / || mean(s B_i A_i) - s B_0 A_0 ||,"
            " the mean over LoRA modules (as in bench/ffa.py), then the mean over seeds.",
            "",
            "| setting | H | mean over rounds | first round | last round | rounds |",
            "|---|---|---|---|---|---|",
        ]
        for setting, e in errors.items():
            lines.append(
                f"| {setting} | {e['h']} | {e['mean']:.4f} | {e['first']:.4f} |"
                f" {e['last']:.4f} | {e['rounds']} |"
            )
        lines += ["", "![factor-average error per round](lora_error.png)", ""]
    return "\n".join(lines)


FULL = {
    "participations": 20,
    "evals": 10,
    "seeds": EVAL_SEEDS,
    "settings": list(SETTINGS),
}
QUICK = {
    "participations": 4,
    "evals": 4,
    "seeds": EVAL_SEEDS,
    "settings": ["center", "H=20"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--quick", action="store_true", help="small budget; RESULTS.md untouched")
    parser.add_argument(
        "--settings",
        help=f"comma-separated subset of {list(SETTINGS)}; its runs join the saved ones "
        "(runs already saved are not run again; without --settings every run runs)",
    )
    parser.add_argument("--retune", action="store_true", help="tune again though lrs are saved")
    args = parser.parse_args()
    budget = dict(QUICK if args.quick else FULL)
    if args.settings:
        wanted = [x.strip() for x in args.settings.split(",")]
        unknown = [x for x in wanted if x not in SETTINGS]
        if unknown:
            parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
        budget["settings"] = wanted
    out = OUT / "quick" if args.quick else OUT
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    saved = (
        json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    )
    chosen, tuning = saved.get("chosen", {}), saved.get("tuning", {})
    if args.retune or not args.settings:  # a whole study tunes afresh
        chosen, tuning = {}, {}
    needed = sorted({lr_setting(x) for x in budget["settings"]} - set(chosen), key=TUNED.index)
    if chosen:
        print(f"server lrs tuned before: {chosen} (--retune to tune again)", flush=True)
    if needed:
        fresh, runs_ = tune(needed, args.workers, budget)
        chosen, tuning = {**chosen, **fresh}, {**tuning, **runs_}
        print(f"chosen server lrs: {fresh}", flush=True)
    # a whole study runs everything; a partial one keeps the saved runs whose lrs still hold
    done = saved.get("runs", {}) if args.settings and not args.retune else {}
    done = {k: v for k, v in done.items() if lr_setting(k.split("|")[0]) not in needed}
    runs = {**done, **evaluate(chosen, budget, args.workers, done)}
    table = summarize(runs, chosen, budget)
    errors = factor_errors(runs, budget)
    plot(runs, budget, out / "outer.png" if args.quick else ROOT / "bench" / "outer.png")
    path = out / "lora_error.png" if args.quick else ROOT / "bench" / "lora_error.png"
    plot_errors(runs, errors, budget, path)
    saved.update(
        {"chosen": chosen, "tuning": tuning, "runs": runs, "table": table, "errors": errors}
    )
    # a whole study (no --settings) is timed on its own; partial passes add to the saved ones
    minutes = dict(saved.get("meta", {}).get("minutes_by_part", {})) if args.settings else {}
    part = f"--settings {args.settings}" if args.settings else "whole study"
    minutes[part] = (time.perf_counter() - started) / 60
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {_torch_version()}",
        "workers": args.workers,
        "minutes_by_part": minutes,
        "command": "make bench-outer" + (" (--quick)" if args.quick else ""),
    }
    saved["meta"] = meta
    (out / "results.json").write_text(json.dumps(saved, indent=1, default=_plain))
    text = render(
        saved["table"], saved["tuning"], saved["chosen"], saved.get("errors", {}), budget, meta
    )
    if not args.quick:
        replace_section("outer-study", text)
    print(text)


def _minutes(meta: dict) -> str:
    parts = meta["minutes_by_part"].items()
    return ", ".join(f"{name}: {value:.1f}" for name, value in parts)


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


if __name__ == "__main__":
    main()
