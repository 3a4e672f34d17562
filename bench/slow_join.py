"""`swarmtune join` on a slower device, emulated: after each inner step the volunteer sleeps
(FACTOR - 1) times that step's own time, so each step takes FACTOR times as long while the
sleeping volunteer leaves the shared cores to the others. For bench/stragglers.py only.

Usage: .venv/bin/python bench/slow_join.py FACTOR [join arguments...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swarmtune import cli  # noqa: E402
from swarmtune.node.local.trainer import InnerTrainer  # noqa: E402


def slowed(factor: float) -> Any:
    """InnerTrainer.train_steps with every step stretched to `factor` times its time."""
    original = InnerTrainer.train_steps

    def train_steps(self: InnerTrainer, steps: int, after_step: Any = None, **kw: Any) -> Any:
        last = [time.perf_counter()]

        def hook(j: int) -> None:
            if after_step is not None:
                after_step(j)
            time.sleep((factor - 1) * (time.perf_counter() - last[0]))
            last[0] = time.perf_counter()

        return original(self, steps, hook, **kw)

    return train_steps


def main(argv: list[str]) -> int:
    if not argv or float(argv[0]) < 1:
        print("usage: bench/slow_join.py FACTOR>=1 [join arguments...]", file=sys.stderr)
        return 2
    InnerTrainer.train_steps = slowed(float(argv[0]))  # type: ignore[method-assign]
    return cli.main(["join", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
