"""Randomized pairwise gossip averaging (Boyd, Ghosh, Prabhakar, Shah, IEEE ToIT 2006).

Instead of one all-reduce over the whole group, a peer averages with one random partner:
x_i, x_j <- (w_i x_i + w_j x_j) / (w_i + w_j) and both keep weight (w_i + w_j) / 2. The
weighted sum sum_i w_i x_i is preserved by every exchange, so on a connected partner graph
all peers converge to the group's weighted mean (geometrically in expectation).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from aggregation.params import Params

Tensors = Mapping[str, torch.Tensor]


def pair_average(x: Tensors, w_x: float, y: Tensors, w_y: float) -> tuple[Params, float]:
    """The state both partners adopt, and the weight each keeps."""
    total = w_x + w_y
    if not total > 0:
        raise ValueError(f"gossip weights must have a positive sum, got {w_x}, {w_y}")
    mean = {k: (w_x * x[k].double() + w_y * y[k].double()).div(total).float() for k in sorted(x)}
    return mean, total / 2


def random_pairs(peers: Sequence[str], rng: random.Random) -> list[tuple[str, str]]:
    """A random matching of the peers (one is left out when their number is odd)."""
    order = list(peers)
    rng.shuffle(order)
    return [(order[i], order[i + 1]) for i in range(0, len(order) - 1, 2)]


def gossip_round(
    states: dict[str, Params], weights: dict[str, float], rng: random.Random
) -> tuple[dict[str, Params], dict[str, float]]:
    """One round: every matched pair averages; returns new states and weights (inputs kept)."""
    new_states, new_weights = dict(states), dict(weights)
    for a, b in random_pairs(sorted(states), rng):
        mean, weight = pair_average(states[a], weights[a], states[b], weights[b])
        new_states[a], new_states[b] = mean, {k: v.clone() for k, v in mean.items()}
        new_weights[a] = new_weights[b] = weight
    return new_states, new_weights
