"""Batches of whole examples: packed into rows without attention across them, or padded.

A packed row holds several examples back to back; each example's position ids start again
at 0, which transformers reads as separate sequences (a block-diagonal causal mask), so no
token attends to another example. An example's first token is never a label: nothing of
that example precedes it. Batch k is drawn from a generator seeded with (seed, k), so a
resumed peer continues the exact stream it would have seen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from swarmtune.node.local.batch import Batch, SeededStream
from swarmtune.node.local.data import DataError
from swarmtune.node.local.render import Renderer, Tokenized
from swarmtune.node.local.sources import Example

IGNORE = -100  # label of a token outside the loss (transformers' convention)


@dataclass(frozen=True)
class DataSummary:
    """What start-up tells the user about their data."""

    examples: int
    kinds: dict[str, int]
    truncated: int
    dropped: int  # nothing left in the loss after truncation
    tokens: int
    loss_tokens: int
    max_length: int

    def line(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items()))
        parts = [f"{self.examples} examples ({kinds})", f"{self.tokens} tokens"]
        parts.append(f"{self.loss_tokens} in the loss")
        parts.append(f"{self.truncated} truncated to {self.max_length} tokens")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (no completion token left after truncation)")
        return "data: " + ", ".join(parts)


def tokenize_all(
    examples: Sequence[Example], renderer: Renderer
) -> tuple[list[Tokenized], DataSummary]:
    """Every example tokenized; those with no loss token left are dropped and counted."""
    kept, truncated, dropped = [], 0, 0
    for tokens in renderer.tokenize_many(examples):
        truncated += tokens.truncated
        if not tokens.loss_count:
            dropped += 1
            continue
        kept.append(tokens)
    if not kept:
        raise DataError("no example has a completion token within the length limit")
    summary = DataSummary(
        examples=len(examples),
        kinds=dict(Counter(e.kind for e in examples)),
        truncated=truncated,
        dropped=dropped,
        tokens=sum(len(t.ids) for t in kept),
        loss_tokens=sum(t.loss_count for t in kept),
        max_length=renderer.max_length,
    )
    return kept, summary


def _rows_batch(rows: list[list[Tokenized]], pad_id: int, packed: bool) -> Batch:
    """Rows of examples as one batch, right-padded to the fullest row."""
    width = max(sum(len(t.ids) for t in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example.ids)
            ids[r, at : at + n] = torch.tensor(example.ids)
            keep = torch.tensor(example.trained)
            keep[0] = False
            labels[r, at : at + n] = torch.where(keep, ids[r, at : at + n], IGNORE)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        mask[r, :at] = 1
        positions[r, at:] = torch.arange(width - at)  # padding: a sequence of its own
    tokens = int((labels != IGNORE).sum())
    if packed:
        return Batch(ids, labels, position_ids=positions, tokens=tokens)
    return Batch(ids, labels, attention_mask=mask, tokens=tokens)


class ExampleBatcher(SeededStream):
    """Random batches of whole examples, packed (default) or one per padded row."""

    def __init__(
        self,
        examples: Sequence[Tokenized],
        seq_len: int,
        batch_size: int,
        seed: int,
        pad_id: int,
        packed: bool = True,
    ) -> None:
        if seq_len < 2 or batch_size < 1:
            raise DataError(
                f"seq_len must be >= 2 and batch_size >= 1, got {seq_len}, {batch_size}"
            )
        if not examples:
            raise DataError("no examples to train on")
        if max(len(t.ids) for t in examples) > seq_len:
            raise DataError(f"an example is longer than seq_len {seq_len}; truncate it first")
        self.examples, self.seq_len, self.batch_size = list(examples), seq_len, batch_size
        super().__init__(seed)
        self.pad_id, self.packed = pad_id, packed

    def next_batch(self) -> Batch:
        draws = _draws(len(self.examples), self.next_generator())
        if not self.packed:
            singles = [[self.examples[next(draws)]] for _ in range(self.batch_size)]
            return _rows_batch(singles, self.pad_id, packed=False)
        examples = (self.examples[i] for i in draws)
        return _rows_batch(_pack(examples, self.seq_len, self.batch_size), self.pad_id, True)


def _pack(examples: Iterable[Tokenized], seq_len: int, max_rows: int) -> list[list[Tokenized]]:
    """Whole examples, in order, into rows of at most seq_len tokens; at most max_rows rows
    (the example that did not fit once they are full is left out)."""
    rows: list[list[Tokenized]] = []
    row: list[Tokenized] = []
    used = 0
    for example in examples:
        if row and used + len(example.ids) > seq_len:
            rows.append(row)
            row, used = [], 0
            if len(rows) == max_rows:
                return rows
        row.append(example)
        used += len(example.ids)
    return [*rows, row] if row else rows


def _draws(n: int, generator: torch.Generator, chunk: int = 64):  # noqa: ANN202
    """Endless uniform example indices from one generator."""
    while True:
        yield from torch.randint(0, n, (chunk,), generator=generator).tolist()


def fixed_batches(
    examples: Sequence[Tokenized], seq_len: int, batch_size: int, n_batches: int, pad_id: int
) -> list[Batch]:
    """Held-out batches: examples in order, packed into at most n_batches batches."""
    rows = _pack(examples, seq_len, batch_size * n_batches)
    return [
        _rows_batch(rows[i : i + batch_size], pad_id, packed=True)
        for i in range(0, len(rows), batch_size)
    ]
