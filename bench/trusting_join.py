"""`swarmtune join` as it was before round certificates, for bench/state_attacks.py only: a
state is adopted on one peer's word (a quorum of one vote), the undefended path.

Usage: .venv/bin/python bench/trusting_join.py [join arguments...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import swarmtune.node.engine.certify as certify  # noqa: E402
from swarmtune import cli  # noqa: E402


def main(argv: list[str]) -> int:
    certify.quorum = lambda population: 1  # type: ignore[assignment]
    return cli.main(["join", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
