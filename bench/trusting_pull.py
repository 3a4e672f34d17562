"""`swarmtune pull` as it was before round certificates, for bench/state_attacks.py only: the
newest round on offer wins (then the bundle most peers serve), and nothing is checked beyond the
bundle's sha256.

Usage: .venv/bin/python bench/trusting_pull.py [pull arguments...]
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import swarmtune.node.adapters.offers as offers  # noqa: E402
import swarmtune.node.roles.consumer as consumer  # noqa: E402
from swarmtune import cli  # noqa: E402
from swarmtune.node.adapters.offers import Offer  # noqa: E402
from swarmtune.protocols.records import PeerRecord  # noqa: E402


def newest_offers(records: Mapping[str, PeerRecord], *_: Any) -> dict[str, Offer]:
    """Per adapter name: the newest round, then the sha256 most peers serve."""
    best: dict[str, Offer] = {}
    for name in {n for r in records.values() for n in r.adapters}:
        entries = [(p, r.adapters[name]) for p, r in records.items() if name in r.adapters]
        top = max(o.round for _, o in entries)
        votes = Counter(o.sha256 for _, o in entries if o.round == top)
        sha = min(votes, key=lambda s: (-votes[s], s))
        chosen = [(p, o) for p, o in entries if (o.round, o.sha256) == (top, sha)]
        best[name] = Offer(name, top, sha, chosen[0][1].size, tuple(sorted(p for p, _ in chosen)))
    return best


def main(argv: list[str]) -> int:
    # what `pull` calls since it falls back to older proven offers (2026-12-06); patching the
    # function it called before left this baseline pulling through the defended path
    consumer.proven_offers = lambda records, *_: {  # type: ignore[assignment]
        name: [offer] for name, offer in newest_offers(records).items()
    }
    offers.check_bundle = lambda *_: "nothing (the pull before round certificates)"  # type: ignore[assignment]
    return cli.main(["pull", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
