"""One inner step's model inputs (windows, packed or padded rows), and the seeded stream of them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """Model inputs of one step and the number of tokens in its loss (the peer's weight under
    `averaging.weight: tokens`)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None  # packed rows
    attention_mask: torch.Tensor | None = None  # padded rows
    tokens: int = 0

    @classmethod
    def windows(cls, input_ids: torch.Tensor) -> Batch:
        """Plain token windows, every token in the loss (the simulator, pre-training)."""
        return cls(input_ids, input_ids, tokens=input_ids.numel())

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        ids, labels = self.input_ids.to(device), self.labels.to(device)
        return Batch(ids, labels, move(self.position_ids), move(self.attention_mask), self.tokens)

    def inputs(self) -> dict[str, torch.Tensor | bool]:
        """Keyword arguments of the model's forward pass. No KV cache: transformers reads
        restarting position ids as packed sequences only without one."""
        out: dict[str, torch.Tensor | bool] = {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "use_cache": False,
        }
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out


class SeededStream:
    """A batch stream whose batch k is drawn by a generator seeded with (seed, k): its whole
    state is k, so a resumed peer continues the exact stream it would have seen."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.batches_drawn = 0

    def next_generator(self) -> torch.Generator:
        """The generator of the next batch (and the position moves on by one)."""
        generator = torch.Generator().manual_seed(batch_seed(self.seed, self.batches_drawn))
        self.batches_drawn += 1
        return generator

    def state_dict(self) -> dict[str, int]:
        """Position in the batch stream (JSON-serialisable)."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position saved by state_dict; the seed must match."""
        if state.get("seed") != self.seed:
            raise ValueError(f"batcher state is for seed {state.get('seed')}, not {self.seed}")
        batches_drawn = state.get("batches_drawn")
        if not isinstance(batches_drawn, int) or batches_drawn < 0:
            raise ValueError(f"bad batches_drawn in batcher state: {batches_drawn!r}")
        self.batches_drawn = batches_drawn


def batch_seed(seed: int, index: int) -> int:
    """The generator seed of batch `index` of a stream seeded with `seed`."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed wants a non-negative int64
