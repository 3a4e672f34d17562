"""Why the simulator's IID and Dirichlet splits train slower than one task per client (issue #12,
bench/RESULTS.md "Outer-optimizer study"): one round's pseudo-gradients from the same start,
per split, in the study's central setting (10 clients, H inner AdamW steps with fresh moments,
batch 4 x 32 tokens).

For each split it prints the mean norm of a client's Delta, the norm of the clients' mean Delta
(what plain averaging applies), their ratio (1: the clients agree; 1/sqrt(10) = 0.32: orthogonal),
and the mean eval loss over the tasks after applying the mean Delta once, from the start 1.1565.

With --rounds N it then trains the IID split for N rounds at C = 0.3 (plain averaging, lr 1)
twice: with each client's texts shuffled together into one stream (as the simulator did before
2026-11-25: most 32-token windows then mix tasks) and in one block per task (as it does now: a
window holds one task, as in the one-task split and in every eval window), and prints both
final eval losses.

Run:  .venv/bin/python bench/split_probe.py [--steps 5] [--seed 0] [--rounds 67]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swarmtune.aggregation.params import weighted_mean  # noqa: E402
from swarmtune.aggregation.robust import norm_of  # noqa: E402
from swarmtune.node.config import SimConfig  # noqa: E402
from swarmtune.node.engine.round import round_start  # noqa: E402
from swarmtune.node.engine.state import GroupState  # noqa: E402
from swarmtune.node.roles import simulate  # noqa: E402
from swarmtune.node.roles.simulate import Simulation  # noqa: E402

SPLITS = {
    "one task per client": {"kind": "task"},
    "dirichlet 0.1": {"kind": "dirichlet", "alpha": 0.1},
    "dirichlet 1": {"kind": "dirichlet", "alpha": 1.0},
    "iid (tokens)": {"kind": "iid", "balance": "tokens"},
}


def probe(split: dict, steps: int, seed: int) -> dict[str, float]:
    config = SimConfig.model_validate(
        {
            "run": {
                "run_id": "split-probe",
                "inner": {"steps": steps, "batch_size": 4, "seq_len": 32, "lr": 0.003},
            },
            "clients": 10,
            "participation": 1.0,
            "heterogeneity": split,
            "rounds": 1,
            "seeds": [seed],
            "texts_per_client": 200,
        }
    )
    sim = Simulation(config, seed)
    start = round_start(sim.state, config.run)
    deltas = [sim.client_update(c, start).delta for c in sim.clients]
    mean = weighted_mean(deltas, [1.0] * len(deltas))
    before = sim.evaluate()["eval_loss"]
    sim.state = GroupState(1, {k: sim.state.params[k] - mean[k] for k in mean}, {})
    after = sim.evaluate()["eval_loss"]
    own = sum(norm_of(d) for d in deltas) / len(deltas)
    return {
        "own": own,
        "mean": norm_of(mean),
        "ratio": norm_of(mean) / own,
        "before": before,
        "after": after,
    }


def mixed_texts(mixture: dict[str, float], n: int, client_seed: int) -> list[str]:
    """How the simulator built a client's texts before 2026-11-25: all tasks' texts shuffled
    together into one stream (simulate.client_texts now keeps one block per task)."""
    texts: list[str] = []
    for task, weight in sorted(mixture.items()):
        texts += simulate.builtin_texts(task, max(1, round(weight * n)), seed=client_seed)
    random.Random(client_seed).shuffle(texts)
    return texts


def train_iid(rounds: int, seed: int, mixed: bool) -> float:
    config = SimConfig.model_validate(
        {
            "run": {
                "run_id": "split-probe",
                "inner": {"steps": 5, "batch_size": 4, "seq_len": 32, "lr": 0.003},
                "outer": {"name": "fedavg", "lr": 1.0},
            },
            "clients": 10,
            "participation": 0.3,
            "heterogeneity": {"kind": "iid", "balance": "tokens"},
            "rounds": rounds,
            "seeds": [seed],
            "texts_per_client": 200,
            "eval_every": rounds,
        }
    )
    blocks = simulate.client_texts
    simulate.client_texts = mixed_texts if mixed else blocks
    try:
        return float(Simulation(config, seed).run().rows[-1]["eval_loss"])
    finally:
        simulate.client_texts = blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=0, help="also train the IID split")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"H={args.steps}, seed {args.seed}")
    print("| split | mean client |Delta| | |mean Delta| | ratio | eval after one round |")
    print("|---|---|---|---|---|")
    for label, split in SPLITS.items():
        r = probe(split, args.steps, args.seed)
        print(
            f"| {label} | {r['own']:.4f} | {r['mean']:.4f} | {r['ratio']:.2f} | "
            f"{r['before']:.4f} -> {r['after']:.4f} |",
            flush=True,
        )
    if args.rounds:
        for mixed in (True, False):
            final = train_iid(args.rounds, args.seed, mixed)
            how = "shuffled together (before)" if mixed else "one block per task (now)"
            print(f"iid (tokens), {args.rounds} rounds, texts {how}: eval {final:.4f}", flush=True)


if __name__ == "__main__":
    main()
