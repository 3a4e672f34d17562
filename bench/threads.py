"""Several volunteers on one machine: inner-step time when their torch threads oversubscribe the
cores, against one thread each, and with OpenMP's passive wait policy.

Run:  .venv/bin/python bench/threads.py [--procs 2 --steps 20]
Prints one line per setting (seconds for the steps, per process, all started from a barrier).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from swarmtune.node.config import parse_config
from swarmtune.node.local.build import build_local_model
m = build_local_model(parse_config({{"run_id": "threads-bench"}}), "builtin:arithmetic", data_seed=1)
m.trainer.train_steps(2)  # warm up
open({ready!r}, "a").write("x")
while len(open({ready!r}).read()) < {procs}:  # a barrier across processes
    time.sleep(0.01)
t = time.perf_counter()
m.trainer.train_steps({steps})
print(f"{{time.perf_counter() - t:.2f}}")
"""


def measure(procs: int, steps: int, env: dict[str, str], tag: str) -> list[float]:
    ready = Path(f"/tmp/swarmtune-threads-{os.getpid()}-{tag}")
    ready.write_text("")
    code = WORKER.format(root=str(ROOT), ready=str(ready), procs=procs, steps=steps)
    started = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    try:
        return sorted(float(p.communicate(timeout=600)[0].split()[-1]) for p in started)
    finally:
        ready.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cores = os.cpu_count()
    settings = {
        "torch default threads": {},
        "torch default threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
        "1 thread each (--threads 1)": {"OMP_NUM_THREADS": "1"},
    }
    print(f"{args.procs} processes at once, {args.steps} inner steps each, {cores} cores")
    for label, env in settings.items():
        alone = measure(1, args.steps, env, "alone")
        together = measure(args.procs, args.steps, env, "together")
        print(
            f"{label}: alone {alone[0]:.2f} s; together {', '.join(f'{t:.2f}' for t in together)} s"
        )
        time.sleep(1)


if __name__ == "__main__":
    main()
