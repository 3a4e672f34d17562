"""Choosing what to download: the adapter offer most providers agree on, at the newest round."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from protocols.records import PeerRecord


@dataclass(frozen=True)
class Offer:
    """An adapter on offer in the swarm and the peers serving exactly these bytes."""

    name: str
    round: int
    sha256: str
    size: int
    providers: tuple[str, ...]


def best_offers(records: dict[str, PeerRecord]) -> dict[str, Offer]:
    """Per adapter name: newest round, then the sha256 most peers serve, then the smaller sha."""
    by_name: dict[str, list[tuple[str, int, str, int]]] = {}
    for peer_id, record in records.items():
        for name, offer in record.adapters.items():
            by_name.setdefault(name, []).append((peer_id, offer.round, offer.sha256, offer.size))
    best: dict[str, Offer] = {}
    for name, entries in by_name.items():
        top = max(r for _, r, _, _ in entries)
        votes = Counter(sha for _, r, sha, _ in entries if r == top)
        sha = min(votes, key=lambda s: (-votes[s], s))
        chosen = [(p, size) for p, r, s, size in entries if (r, s) == (top, sha)]
        best[name] = Offer(name, top, sha, chosen[0][1], tuple(sorted(p for p, _ in chosen)))
    return best
