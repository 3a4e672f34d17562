"""Benchmark: contributions over the p2p stream against direct TCP (averaging.direct_tcp), in
real rounds on a real model.

Run:  .venv/bin/python bench/direct_real.py --model /tmp/smollm2-135m [--peers 2 --rounds 3]
(README, "Base model", says how to get such a directory offline). Without --model it exits
with one line. Each mode runs the same coordinator + volunteers (same tasks and data seeds) as
separate processes on loopback, synchronous rounds, held-out eval after the last round only;
rewrites the `direct-real` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_md import replace_section  # noqa: E402
from swarm_bench import run_swarm, summarize_swarm  # noqa: E402

from swarmtune.node.config import parse_config  # noqa: E402

MODES = {"p2p stream": False, "direct TCP": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local HF causal LM dir (required)")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=5)
    args = parser.parse_args()
    if not args.model:
        raise SystemExit(
            "direct_real: no --model given; nothing to measure (see README, Base model)"
        )
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"direct_real: --model {args.model}: no config.json there")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="swarmtune-direct-") as tmp:
        for label, direct in MODES.items():
            config = parse_config(
                {
                    "run_id": f"bench-direct-{int(direct)}",
                    "base_model": args.model,
                    "inner": {"steps": args.inner_steps},
                    "averaging": {"matchmaking_time": 2.0, "direct_tcp": direct},
                }
            )
            extra = ("--model", args.model, "--wait-for", str(args.peers))
            extra += ("--eval-every", str(args.rounds))
            work = Path(tmp) / label.replace(" ", "-")
            summary = summarize_swarm(run_swarm(config, args.peers, args.rounds, work, extra))
            transfers = [r["transfer_s"] for r in summary["rounds"]]
            rows.append(
                f"| {label} | {summary['bytes_per_peer'] / len(transfers) / 1e6:.2f} | "
                + ", ".join(f"{t:.3f}" for t in transfers)
                + f" | {sum(transfers) / len(transfers):.3f} | "
                f"{summary['averaged']}/{summary['reports']} | {summary['final_eval']:.4f} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(
        [
            "## Direct TCP in real rounds (bench/direct_real.py)",
            "",
            f"`.venv/bin/python bench/direct_real.py --model {args.model} --peers {args.peers}"
            f" --rounds {args.rounds} --inner-steps {args.inner_steps}` ({platform.machine()},"
            f" {os.cpu_count()} cores, torch {torch.__version__}, loopback, synchronous rounds,"
            " fp32 contributions, eval after the last round only):",
            "",
            "| contributions over | MB sent per peer and round | transfer s per round (mean over"
            " volunteers) | mean | rounds averaged | final eval |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    replace_section("direct-real", text)
    print(text)


if __name__ == "__main__":
    main()
