"""Task metrics of an adapter on held-out examples: completion loss and exact match.

Exact match: the model completes each example's prompt greedily, and it scores when that
completion begins with the reference answer, both with runs of whitespace collapsed (what
the model writes after the answer is not judged). Examples without an answer (plain text
other than the built-in tasks) count only in the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from swarmtune.node.local.batch import Batch
from swarmtune.node.local.packing import DataSummary, fixed_batches, tokenize_all
from swarmtune.node.local.render import Renderer
from swarmtune.node.local.sources import Example

EXTRA_TOKENS = 4  # generated beyond the reference's own length
MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Sample:
    """One rendered prompt, the reference answer and what the model wrote."""

    prompt: str
    reference: str
    completion: str
    exact: bool


def scoring_set(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    batch_size: int,
    n_batches: int | None = None,
) -> tuple[Renderer, list[Batch], DataSummary]:
    """Held-out examples as fixed batches with the completion-only loss (whatever loss the
    volunteer trains with), and the renderer that prompts them; n_batches None: all."""
    renderer = Renderer(tokenizer, max_length, "completion")
    tokens, summary = tokenize_all(examples, renderer)
    n = len(tokens) if n_batches is None else n_batches
    batches = fixed_batches(tokens, max_length, batch_size, n, tokenizer.pad_token_id)
    return renderer, batches, summary


def _normal(text: str) -> str:
    return " ".join(text.split())


def is_exact(completion: str, reference: str) -> bool:
    """Does the completion begin with the reference (whitespace runs collapsed)?"""
    reference = _normal(reference)
    return bool(reference) and _normal(completion).startswith(reference)


@torch.no_grad()
def greedy_samples(
    model: torch.nn.Module,
    renderer: Renderer,
    examples: Sequence[Example],
    batch_size: int = 16,
) -> list[Sample]:
    """Greedy completions of every example that has a reference answer."""
    tokenizer = renderer.tokenizer
    pad = tokenizer.pad_token_id  # load_tokenizer sets one (EOS where the model has none)
    device = next(model.parameters()).device
    cases = []
    for example in examples:
        pair = renderer.prompt_and_answer(example)
        if pair is not None and pair[1].strip():
            ids = renderer.encode_prompt(pair[0], example)[-renderer.max_length :]
            cases.append((pair[0], pair[1], ids))
    model.eval()
    samples = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        width = max(len(ids) for _, _, ids in chunk)
        # left padding, so every prompt ends where generation begins
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, _, ids) in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        longest = max(
            len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref, _ in chunk
        )
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=min(longest + EXTRA_TOKENS, MAX_NEW_TOKENS),
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, (prompt, reference, _) in enumerate(chunk):
            text = str(tokenizer.decode(out[row, width:], skip_special_tokens=True))
            samples.append(Sample(prompt, reference, text, is_exact(text, reference)))
    return samples


def exact_rate(samples: Sequence[Sample]) -> float | None:
    """Share of samples whose completion matched (None: nothing had an answer)."""
    return sum(s.exact for s in samples) / len(samples) if samples else None
