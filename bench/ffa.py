"""Benchmark: averaging LoRA factors vs FFA-LoRA (A frozen, exact), in the simulator.

Run:  .venv/bin/python bench/ffa.py [--rounds 12 --clients 8 --participation 0.5 --h 5 20]

For each H: one task per client (4 tasks), the same clients, data and seeds, run once with
today's factor averaging (A and B both trained and averaged) and once with `lora.freeze_a`
(FFA-LoRA, arXiv 2403.12313). Reports the final eval loss, the bytes a member sends per round,
and, for factor averaging, the relative Frobenius error of the applied update per round:
||s mean(B) mean(A) - mean(s B A)|| / ||mean(s B A) - s B0 A0||, the mean over modules
(aggregation/taskvec.py, factor_average_error). Rewrites the `ffa` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_md import replace_section  # noqa: E402

from swarmtune.aggregation.taskvec import factor_average_error  # noqa: E402
from swarmtune.node.clusters.clusterer import lora_modules  # noqa: E402
from swarmtune.node.config import SimConfig  # noqa: E402
from swarmtune.node.engine.transport import GroupResult  # noqa: E402
from swarmtune.node.roles.simulate import Simulation  # noqa: E402

TASKS = ["arithmetic", "capitals", "dates", "code"]


class MeasuredSimulation(Simulation):
    """Records, per round, how far factor averaging is from the exact mean update."""

    errors: list[float]

    def gather(self, updates):  # noqa: ANN001, ANN201
        answer = super().gather(updates)
        if isinstance(answer, GroupResult) and not self.config.run.lora.freeze_a:
            self.errors.append(self.factor_error(updates))
        return answer

    def factor_error(self, updates) -> float:  # noqa: ANN001
        lora = self.config.run.lora
        scaling = lora.alpha / lora.rank
        start = self.state.params
        ends = [{k: start[k] - u.delta[k] for k in start} for u in updates]
        weights = [u.meta.weight for u in updates]
        begin = lora_modules(start, scaling)
        members = [lora_modules(end, scaling) for end in ends]
        return statistics.mean(
            factor_average_error([m[name] for m in members], weights, begin[name])
            for name in sorted(begin)
        )


def run(args: argparse.Namespace, steps: int, freeze_a: bool) -> dict:
    """One simulated run; final eval, bytes per member and round, factor errors."""
    config = SimConfig.model_validate(
        {
            "run": {
                "run_id": "bench-ffa",
                "lora": {"freeze_a": freeze_a},
                "inner": {"steps": steps, "batch_size": 8, "seq_len": 32, "lr": 0.01},
                "outer": {"name": "fedavg"},
            },
            "clients": args.clients,
            "participation": args.participation,
            "heterogeneity": {"kind": "task"},
            "tasks": TASKS,
            "rounds": args.rounds,
            "seeds": [0],
            "texts_per_client": 150,
            "eval_every": args.rounds,
        }
    )
    sim = MeasuredSimulation(config, 0)
    sim.errors = []
    result = sim.run()
    floats = sum(p.numel() for p in sim.state.params.values())
    return {"eval": result.rows[-1]["eval_loss"], "bytes": 4 * floats, "errors": sim.errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--participation", type=float, default=0.5)
    parser.add_argument("--h", type=int, nargs="+", default=[5, 20])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        "| H | method | final eval | fp32 bytes a member sends per round | factor-average error"
        " per round: first, median, last |",
        "|---|---|---|---|---|",
    ]
    for steps in args.h:
        for freeze_a in (False, True):
            r = run(args, steps, freeze_a)
            errors = r["errors"]
            spread = (
                f"{errors[0]:.3f}, {statistics.median(errors):.3f}, {errors[-1]:.3f}"
                if errors
                else "0 (exact by construction)"
            )
            name = "FFA-LoRA (A frozen)" if freeze_a else "factor averaging (A and B)"
            rows.append(
                f"| {steps} | {name} | {r['eval']:.4f} | {r['bytes'] / 1e6:.3f} MB | {spread} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(
        [
            "## Exact LoRA aggregation: FFA-LoRA",
            "",
            f"`python bench/ffa.py --rounds {args.rounds} --clients {args.clients} --participation"
            f" {args.participation} --h {' '.join(map(str, args.h))}` ({platform.machine()},"
            " simulator, one task per client over arithmetic/capitals/dates/code, fedavg outer,"
            " inner AdamW lr 0.01, batch 8x32, seed 0):",
            "",
            *rows,
        ]
    )
    replace_section("ffa", text)
    print("wrote the ffa section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
