"""Clustered training and merging, per task (issue 4): specialist vs merged vs one global adapter.

Clients, each holding one built-in task (two per task), run the daemon's round code through
the simulator: warm-up rounds in one group while each client sketches its task signature;
clustering (the coordinator's code) on those signatures; then DiLoCo rounds inside each
cluster. The same clients and steps without clustering give the single global DiLoCo adapter.
Every cluster adapter is merged with each method; every adapter is evaluated per task as
dense base + dW on the task's held-out set. The routed library (`pull --adapter library`) is
evaluated as plain PEFT's Arrow model over the cluster adapters' PEFT directories (written by
the product's own adapter export), with top k = 1 and with the library's default k. Writes bench/out/clusters/results.json,
bench/clusters.png and the `clusters` section of bench/RESULTS.md.

    .venv/bin/python bench/cluster_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
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

from swarmtune.aggregation.merge import MergeOptions, cat_factors, merge_adapters  # noqa: E402
from swarmtune.aggregation.taskvec import LoraFactors, adjusted_rand_index  # noqa: E402
from swarmtune.node.adapters.adapter import Provenance, adapter_files  # noqa: E402
from swarmtune.node.adapters.library import token_losses, top_k, write_library  # noqa: E402
from swarmtune.node.clusters.clusterer import TaskSignature, cluster_signatures, lora_modules  # noqa: E402
from swarmtune.node.config import ClusteringSettings, SimConfig  # noqa: E402
from swarmtune.node.engine.state import GroupState  # noqa: E402
from swarmtune.node.local.basemodel import load_base  # noqa: E402
from swarmtune.node.local.trainer import lm_loss  # noqa: E402
from swarmtune.node.roles.simulate import Simulation  # noqa: E402

TASKS = ["arithmetic", "reverse", "capitals", "dates"]
METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
OUTER = "fedavg"  # outer optimizer of every group (global and clusters); --outer to change
TA_SCALE = 0.5  # task arithmetic lambda (Ilharco et al. pick it on validation data; not tuned here)
# merged again with task vectors taken from the shared warm-up's end point instead of the base
# (linear is left out: with weights of mean 1 it is the same adapter either way)
FROM_WARMUP = ["task_arithmetic", "ties", "dare_ties"]
# --study: one factor at a time around the defaults (issue #12, item 4)
VARIANTS: dict[str, dict[str, int]] = {
    "defaults": {},
    "3x the rounds": {"rounds": 60},
    "2x the clients per task": {"per_task": 4},
    "8 warm-up rounds": {"warmup": 8},
    # is the longer horizon's loss overfitting of the small clusters? the same with more data
    "3x the rounds, 4x the texts per client": {"rounds": 60, "texts": 800},
}
OUT = ROOT / "bench" / "out" / "clusters"


def sim_config(rounds: int, per_task: int, inner_steps: int, texts: int = 200) -> SimConfig:
    """All clients take part in every round; one task each, `per_task` clients per task."""
    return SimConfig.model_validate(
        {
            "run": {
                "inner": {"steps": inner_steps, "batch_size": 4, "seq_len": 32, "lr": 0.003},
                "outer": {"name": OUTER},
            },
            "clients": per_task * len(TASKS),
            "participation": 1.0,
            "heterogeneity": {"kind": "task"},
            "tasks": TASKS,
            "rounds": rounds,
            "texts_per_client": texts,
            "eval_batches": 4,
        }
    )


class DenseEvaluator:
    """Eval loss of base + dW per module, on each task's held-out windows."""

    def __init__(self, eval_sets: dict[str, list[torch.Tensor]]) -> None:
        self.model, _, _ = load_base(None)
        self.model.eval()
        self.base = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.eval_sets = eval_sets

    @torch.no_grad()
    def losses(self, modules: dict[str, LoraFactors] | None) -> dict[str, float]:
        """Per-task loss with the task vectors applied (None: the base alone)."""
        params = dict(self.model.named_parameters())
        for name, value in self.base.items():
            params[name].copy_(value)
        for module, factors in (modules or {}).items():
            params[module.removeprefix("base_model.model.") + ".weight"].add_(factors.delta_w())
        return {
            task: sum(float(lm_loss(self.model, b)) for b in batches) / len(batches)
            for task, batches in self.eval_sets.items()
        }


def run_seed(
    seed: int, warmup: int, rounds: int, per_task: int, inner_steps: int, texts: int = 200
) -> dict:
    """One seed: warm-up + signatures, clustering, cluster rounds, global rounds, evaluation."""
    config = sim_config(warmup + rounds, per_task, inner_steps, texts)
    sim = Simulation(config, seed)
    lora = config.run.lora
    scaling = lora.alpha / lora.rank
    signatures = {c.name: TaskSignature(scaling, 6) for c in sim.clients}
    sim.observers = {name: sig.observe for name, sig in signatures.items()}
    everyone = list(range(len(sim.clients)))
    for _ in range(warmup):
        sim.group_round(everyone)
    sim.observers = {}
    records = {n: s.record(n + "-padded-id", warmup) for n, s in signatures.items()}
    labels = cluster_signatures(
        {n: r for n, r in records.items() if r}, ClusteringSettings(enabled=True)
    )
    truth = [next(iter(c.mixture)) for c in sim.clients]
    found = [labels[c.name] for c in sim.clients]
    warm = sim.state
    cluster_states: dict[int, GroupState] = {}
    for cluster in sorted(set(found)):
        sim.state = warm
        members = [i for i, label in enumerate(found) if label == cluster]
        for _ in range(rounds):
            sim.group_round(members)
        cluster_states[cluster] = sim.state
    sim.state = warm
    for _ in range(rounds):
        sim.group_round(everyone)
    global_state = sim.state
    evaluator = DenseEvaluator(sim.eval_sets)
    modules = {c: lora_modules(s.params, scaling) for c, s in cluster_states.items()}
    losses = {
        "base": evaluator.losses(None),
        "global": evaluator.losses(lora_modules(global_state.params, scaling)),
    }
    own = {}
    for task in TASKS:
        cluster = found[truth.index(task)]
        own[task] = evaluator.losses(modules[cluster])[task]
    losses["specialist"] = own
    sizes = [found.count(c) for c in sorted(modules)]
    relative = [size / statistics.mean(sizes) for size in sizes]  # mean 1, as the coordinator does
    energy = {}
    for method in METHODS:
        options = MergeOptions(seed=seed, scale=TA_SCALE if method == "task_arithmetic" else 1.0)
        merged = merge_adapters(
            [modules[c] for c in sorted(modules)], method, relative, options=options
        )
        losses[f"merged {method}"] = evaluator.losses(merged.modules)
        energy[method] = min(merged.energy.values()) if merged.energy else 1.0
    warm_modules = lora_modules(warm.params, scaling)
    vectors = [  # cluster minus warm-up, exactly (cat_factors stacks the factors: rank 2r)
        {name: cat_factors([f, warm_modules[name]], [1.0, -1.0]) for name, f in modules[c].items()}
        for c in sorted(modules)
    ]
    for method in FROM_WARMUP:
        options = MergeOptions(seed=seed, scale=TA_SCALE if method == "task_arithmetic" else 1.0)
        merged = merge_adapters(vectors, method, relative, options=options)  # rank 2r
        losses[f"warm-up + merged {method}"] = evaluator.losses(
            {
                name: cat_factors([warm_modules[name], f], [1.0, 1.0])
                for name, f in merged.modules.items()
            }
        )
    for k in sorted({1, top_k(len(cluster_states))}):
        losses[f"library arrow top-{k}"] = arrow_losses(sim, cluster_states, k)
    own_cluster = {task: f"cluster-{found[truth.index(task)]}" for task in TASKS}
    routing = routing_losses(sim, cluster_states, global_state, own_cluster)
    return {
        "seed": seed,
        "ari": adjusted_rand_index(truth, found),
        "clusters": found,
        "tasks": truth,
        "losses": losses,
        "energy": energy,
        "routing": routing,
    }


@torch.no_grad()
def arrow_losses(sim: Simulation, states: dict[int, GroupState], k: int) -> dict[str, float]:
    """Per-task eval loss of the routed library of `states` (one expert per cluster), loaded as
    its README says: plain PEFT's create_arrow_model over the library's directories."""
    from peft import ArrowConfig, create_arrow_model

    with tempfile.TemporaryDirectory(prefix="swarmtune-library-") as tmp:
        named = {f"cluster-{c}": state for c, state in sorted(states.items())}
        dirs = _library(sim, named, Path(tmp) / "lib")
        base, _, _ = load_base(None)
        routed = create_arrow_model(base, dirs, ArrowConfig(top_k=k, router_temperature=1.0))
        routed.eval()
        return {
            task: sum(float(lm_loss(routed, b)) for b in batches) / len(batches)
            for task, batches in sim.eval_sets.items()
        }


def _library(sim: Simulation, states: dict[str, GroupState], where: Path) -> list[str]:
    """`states` as PEFT adapter directories under `where` (the library's layout)."""
    adapters = {}
    for name, state in states.items():
        provenance = Provenance("bench", state.round, 1, OUTER, "", "embedded")
        files = adapter_files(sim.trainer, state.params, provenance)
        sha = hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
        adapters[name] = files, {"round": state.round, "sha256": sha}
    write_library(where, "bench", adapters)
    return [str(where / name) for name in adapters]


@torch.no_grad()
def routing_losses(
    sim: Simulation,
    clusters: dict[int, GroupState],
    global_state: GroupState,
    own: dict[str, str],
) -> dict[str, dict[str, float]]:
    """Per task, the mean loss on the second half of each held-out window, where routing by the
    prompt is fair: the prompt-routed library picks each window's expert by its loss on the
    first half (`route_by_prompt`), then is scored on the rest, as are the global adapter, the
    task's own cluster adapter (an oracle router) and Arrow (top 3). Also the share of windows
    routed to the task's own cluster."""
    from peft import ArrowConfig, PeftModel, create_arrow_model

    experts = [f"cluster-{c}" for c in sorted(clusters)]
    with tempfile.TemporaryDirectory(prefix="swarmtune-routing-") as tmp:
        states = {f"cluster-{c}": clusters[c] for c in sorted(clusters)}
        states["global"] = global_state
        dirs = _library(sim, states, Path(tmp) / "lib")
        model = PeftModel.from_pretrained(load_base(None)[0], dirs[0], adapter_name=experts[0])
        for name, where in zip([*experts[1:], "global"], dirs[1:], strict=True):
            model.load_adapter(where, adapter_name=name)
        model.eval()
        arrow = create_arrow_model(
            load_base(None)[0], dirs[:-1], ArrowConfig(top_k=top_k(len(experts)))
        )
        arrow.eval()
        rows: dict[str, dict[str, float]] = {}
        for task, batches in sim.eval_sets.items():
            sums: dict[str, float] = {}
            windows = hits = 0
            for batch in batches:
                ids = batch.input_ids
                half = ids.shape[1] // 2 - 1  # losses[:, :half] predict the first half
                per = {}
                for name in [*experts, "global"]:
                    model.set_adapter(name)
                    per[name] = token_losses(model, ids)
                per["arrow"] = token_losses(arrow, ids)
                choice = torch.stack([per[e][:, :half].mean(1) for e in experts], 1).argmin(1)
                routed = torch.stack([per[experts[int(i)]][r] for r, i in enumerate(choice)])
                second = {
                    "global": per["global"],
                    "own cluster (oracle router)": per[own[task]],
                    "library arrow top-3": per["arrow"],
                    "library routed by prompt": routed,
                }
                for row, losses in second.items():
                    sums[row] = sums.get(row, 0.0) + float(losses[:, half:].mean(1).sum())
                windows += ids.shape[0]
                hits += sum(experts[int(i)] == own[task] for i in choice)
            rows[task] = {row: total / windows for row, total in sums.items()}
            rows[task]["routed to own cluster"] = hits / windows
        return rows


def render(results: list[dict], meta: dict) -> str:
    """The RESULTS.md section from measured numbers only."""
    rows = list(results[0]["losses"])
    aris = ", ".join(f"{r['ari']:.2f}" for r in results)
    lines = [
        "## Clustered training and merging, per task (bench/cluster_bench.py)",
        "",
        f"Measured on {meta['machine']}; {meta['minutes']:.1f} min. Reproduce: `{meta['command']}`"
        " (or `make bench-clusters`).",
        "",
        f"Setup: {meta['per_task']} clients per task x {len(TASKS)} tasks ({', '.join(TASKS)}), all"
        f" taking part every round; {meta['warmup']} warm-up rounds in one group, then"
        f" {meta['rounds']} DiLoCo rounds ({meta['outer']} outer, H = {meta['inner_steps']}) inside each"
        " cluster found from the signatures, vs the same clients and steps in one global group."
        " Adapters evaluated as base + dW on each task's held-out windows; mean over seeds"
        f" {[r['seed'] for r in results]}. Cluster recovery (adjusted Rand index vs tasks):"
        f" {aris}.",
        "",
        "| adapter | " + " | ".join(TASKS) + " | mean | normalized (vs specialist) |",
        "|---|" + "---|" * (len(TASKS) + 2),
    ]
    for row in rows:
        per_task = [statistics.mean(r["losses"][row][t] for r in results) for t in TASKS]
        spec = [statistics.mean(r["losses"]["specialist"][t] for r in results) for t in TASKS]
        normalized = statistics.mean(p / s for p, s in zip(per_task, spec, strict=True))
        lines.append(
            f"| {row} | "
            + " | ".join(f"{v:.4f}" for v in per_task)
            + f" | {statistics.mean(per_task):.4f} | {normalized:.3f} |"
        )
    if all("routing" in r for r in results):
        lines += [
            "",
            "Routing, on the second half of each held-out window (the first half is the prompt the"
            " prompt router picks its expert by; every row is scored on the same second halves):",
            "",
            "| adapter | " + " | ".join(TASKS) + " | mean |",
            "|---|" + "---|" * (len(TASKS) + 1),
        ]
        for row in results[0]["routing"][TASKS[0]]:
            per_task = [statistics.mean(r["routing"][t][row] for r in results) for t in TASKS]
            share = row == "routed to own cluster"
            cells = [f"{v:.0%}" if share else f"{v:.4f}" for v in per_task]
            mean = statistics.mean(per_task)
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean:.0%} |" if share
                         else f"| {row} | " + " | ".join(cells) + f" | {mean:.4f} |")  # fmt: skip
    energy = {m: statistics.mean(r["energy"][m] for r in results) for m in METHODS}
    lines += [
        "",
        f"Merge weights: cluster size / mean cluster size; task arithmetic lambda = {TA_SCALE}"
        " (not tuned); TIES density 0.2, DARE drop 0.5 (defaults, not tuned).",
        "",
        "SVD energy kept when re-factorising to rank 8 (dense methods; 1.0 = exact): "
        + ", ".join(f"{m} {e:.3f}" for m, e in energy.items()),
        "",
        "![eval loss per task](clusters.png)",
        "",
    ]
    return "\n".join(lines)


def run_variant(job: tuple[str, int, dict]) -> tuple[str, int, dict]:
    """One (variant, seed) of --study, in a worker process (1 torch thread)."""
    name, seed, p = job
    torch.set_num_threads(1)
    started = time.perf_counter()
    out = run_seed(
        seed, p["warmup"], p["rounds"], p["per_task"], p["inner_steps"], p.get("texts", 200)
    )
    return name, seed, {**out, "params": p, "seconds": time.perf_counter() - started}


def _mean_loss(result: dict, row: str) -> float:
    return statistics.mean(result["losses"][row][t] for t in TASKS)


def render_study(runs: dict[str, list[dict]], meta: dict) -> str:
    """--study's RESULTS.md section: cluster adapters and merges against the global adapter."""
    lines = [
        "### Cluster adapters against one global adapter: what closes the gap",
        "",
        f"Measured on {meta['machine']}; {meta['minutes']:.1f} min (1-2 worker processes)."
        f" Reproduce: `{meta['command']}`"
        + (
            f" (measured in {meta['passes']} passes: `--study --variants NAME ...` runs only"
            " those variants and joins them to the saved ones)"
            if meta.get("passes", 1) > 1
            else ""
        )
        + ".",
        "",
        "One factor at a time around the table above (3 warm-up rounds, 20 rounds, 2 clients per"
        " task, 200 texts per client, H = 10, fedavg). specialist / global: each task's cluster adapter on its own"
        " task against the global adapter trained on the same clients and steps, as the ratio"
        " of the mean losses over the 4 tasks (the issue's 0.94x) and as the mean of the"
        " per-task ratios. Merges: the best of the merge rows, from the base (task vectors ="
        " cluster adapters) and from the warm-up (task vectors = cluster adapter minus the shared"
        " warm-up state, merged at rank 16, added to the warm-up state). Means over seeds"
        f" {meta['seeds']}; [min-max] over seeds.",
        "",
        "| variant | specialist / global | mean of per-task ratios | best merge from the base"
        " / global | best merge from the warm-up / global | ARI |",
        "|---|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        per_seed = [_mean_loss(r, "specialist") / _mean_loss(r, "global") for r in results]
        ratio = statistics.mean(_mean_loss(r, "specialist") for r in results) / statistics.mean(
            _mean_loss(r, "global") for r in results
        )
        per_task = statistics.mean(
            statistics.mean(r["losses"]["specialist"][t] for r in results)
            / statistics.mean(r["losses"]["global"][t] for r in results)
            for t in TASKS
        )
        global_mean = statistics.mean(_mean_loss(r, "global") for r in results)

        def best(prefix: str, rs: list[dict] = results, g: float = global_mean) -> str:
            rows = [row for row in rs[0]["losses"] if row.startswith(prefix)]
            means = {row: statistics.mean(_mean_loss(r, row) for r in rs) for row in rows}
            row = min(means, key=lambda k: means[k])
            return f"{means[row] / g:.3f} ({row.removeprefix(prefix)})"

        aris = statistics.mean(r["ari"] for r in results)
        lines.append(
            f"| {name} | **{ratio:.3f}** [{min(per_seed):.3f}-{max(per_seed):.3f}] |"
            f" {per_task:.3f} | {best('merged ')} | {best('warm-up + merged ')} | {aris:.2f} |"
        )
    return "\n".join(lines)


def study(args: argparse.Namespace) -> None:
    """--study: every variant on every seed, in 2 worker processes."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    base = {k: getattr(args, k) for k in ("warmup", "rounds", "per_task", "inner_steps")}
    saved_path = OUT / "study.json"
    saved = json.loads(saved_path.read_text()) if args.variants and saved_path.exists() else None
    names = args.variants or list(VARIANTS)
    jobs = [(name, seed, {**base, **VARIANTS[name]}) for name in names for seed in args.seeds]
    # the longest first, so the two workers end together
    jobs.sort(key=lambda j: -(j[2]["warmup"] + 2 * j[2]["rounds"]) * j[2]["per_task"])
    started = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {name: {} for name in names}
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, job) for job in jobs]
        for done, future in enumerate(as_completed(futures), start=1):
            name, seed, out = future.result()
            runs[name][seed] = out
            ratio = _mean_loss(out, "specialist") / _mean_loss(out, "global")
            print(
                f"[{done}/{len(jobs)}] {name}, seed {seed}: specialist/global {ratio:.3f}"
                f" ({out['seconds']:.0f}s; {(time.perf_counter() - started) / 60:.1f} min)",
                flush=True,
            )
    minutes = (time.perf_counter() - started) / 60
    kept = saved["runs"] if saved else {}
    ordered = {
        name: [runs[name][s] for s in args.seeds] if name in names else kept[name]
        for name in VARIANTS
        if name in names or name in kept
    }
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "minutes": minutes + (saved["meta"]["minutes"] if saved else 0.0),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/cluster_bench.py --study",
        "passes": (saved["meta"].get("passes", 1) if saved else 0) + 1,
        "seeds": args.seeds,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "study.json").write_text(json.dumps({"meta": meta, "runs": ordered}, indent=1))
    text = render_study(ordered, meta)
    replace_section("clusters-study", text)
    print(text)


def plot(results: list[dict], path: Path) -> None:
    """Grouped bars: loss per task for every adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results[0]["losses"] if r != "base"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [statistics.mean(r["losses"][row][t] for r in results) for t in TASKS]
        ax.bar([x + i * width for x in range(len(TASKS))], values, width, label=row)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(TASKS))], TASKS)
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-task", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--outer", default=OUTER, help="outer optimizer of every group (fedavg)")
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 2+3 rounds; RESULTS.md untouched"
    )
    parser.add_argument(
        "--study",
        action="store_true",
        help="longer horizon, more clients per task, longer warm-up: one at a time (fedavg)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        help="with --study: only these variants, joined to the saved study.json",
    )
    parser.add_argument("--workers", type=int, default=2, help="--study's worker processes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.study:
        study(args)
        return
    globals()["OUTER"] = args.outer
    if args.quick:
        args.seeds, args.warmup, args.rounds, args.inner_steps = [0], 2, 3, 5
    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args.warmup, args.rounds, args.per_task, args.inner_steps))
        print(
            f"seed {seed}: ARI {results[-1]['ari']:.2f}, {time.perf_counter() - started:.0f}s",
            flush=True,
        )
    out = OUT / "quick" if args.quick else OUT
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "minutes": (time.perf_counter() - started) / 60,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/cluster_bench.py"
        + (f" --outer {args.outer}" if args.outer != "fedavg" else "")
        + (" --quick" if args.quick else ""),
        **{k: v for k, v in vars(args).items() if k != "quick"},
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, out / "clusters.png" if args.quick else ROOT / "bench" / "clusters.png")
    text = render(results, meta)
    if not args.quick:
        replace_section("clusters", text)
    print(text)


if __name__ == "__main__":
    main()
