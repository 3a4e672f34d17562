"""Benchmark: the contribution codecs (fp32, fp16, int8 blockwise) on the same real swarm.

Run:  .venv/bin/python bench/codecs.py [--peers 3 --rounds 6 --inner-steps 10 --repeats 2]
Each codec runs the same coordinator + volunteers (same tasks, same data seeds) as separate
processes on loopback; rewrites the `codecs` section of bench/RESULTS.md. Group timing differs
between runs, so the repeats show the run-to-run spread next to the codec's cost.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_md import replace_section  # noqa: E402
from swarm_bench import run_swarm, summarize_swarm  # noqa: E402

from swarmtune.node.config import parse_config  # noqa: E402

CODECS = ("fp32", "fp16", "int8")


def measure(codec: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One swarm with this codec: final eval, bytes, transfer time, and whether all ended equal."""
    config = parse_config(
        {
            "run_id": f"bench-codec-{codec}",
            "inner": {"steps": args.inner_steps, "batch_size": 8, "seq_len": 48},
            "averaging": {"matchmaking_time": 2.0, "codec": codec},
        }
    )
    reports = run_swarm(config, args.peers, args.rounds, workdir)
    summary = summarize_swarm(reports)
    digests = {r[-1]["digest"] for r in reports}
    transfer = [row["transfer_s"] for r in reports for row in r if row["outcome"] == "averaged"]
    return {
        "final_eval": summary["final_eval"],
        "bytes_per_peer_round": summary["bytes_per_peer"] / len(summary["rounds"]),
        "transfer_s": sum(transfer) / max(len(transfer), 1),
        "identical": len(digests) == 1,
        "averaged": summary["averaged"],
        "rounds": summary["reports"],
        "excluded": sum(len(row["excluded"]) for r in reports for row in r),
        "problems": sorted({row["problem"][:160] for r in reports for row in r if row["problem"]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--codecs", nargs="+", choices=CODECS, default=list(CODECS))
    args = parser.parse_args()
    rows = [
        "| codec | final eval (mean of volunteers), per repeat | bytes sent per peer and round"
        " | transfer s (averaged rounds) | all volunteers end bit-identical | rounds averaged"
        " | contributions excluded |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs:
            runs = [measure(codec, args, Path(tmp) / f"{codec}-{i}") for i in range(args.repeats)]
            evals = ", ".join(f"{r['final_eval']:.4f}" for r in runs)
            transfer = ", ".join(f"{r['transfer_s']:.3f}" for r in runs)
            identical = ", ".join("yes" if r["identical"] else "NO" for r in runs)
            averaged = ", ".join(f"{r['averaged']}/{r['rounds']}" for r in runs)
            excluded = ", ".join(str(r["excluded"]) for r in runs)
            for problem in sorted({p for r in runs for p in r["problems"]}):
                print(f"{codec}: {problem}", flush=True)
            megabytes = runs[0]["bytes_per_peer_round"] / 1e6
            rows.append(
                f"| {codec} | {evals} | {megabytes:.3f} MB | {transfer} | {identical}"
                f" | {averaged} | {excluded} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(
        [
            "## Contribution codecs",
            "",
            f"`python bench/codecs.py --peers {args.peers} --rounds {args.rounds} --inner-steps"
            f" {args.inner_steps} --repeats {args.repeats}` ({platform.machine()}, loopback, the"
            " embedded base, LoRA r=8 on every projection, tasks"
            " arithmetic/reverse/capitals..., one process per peer):",
            "",
            *rows,
        ]
    )
    if set(args.codecs) != set(CODECS):
        print("a subset of the codecs: bench/RESULTS.md left as it is")
        return
    replace_section("codecs", text)
    print("wrote the codecs section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
