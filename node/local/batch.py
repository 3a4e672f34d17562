"""One inner step's model inputs, whatever cut them: windows, packed rows or padded rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """Model inputs of one step and the number of tokens in its loss (the peer's weight)."""

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
