"""Batches of whole examples: packed rows that do not attend across examples, padded rows."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from swarmtune.node.local.basemodel import ASSET_DIR, load_base
from swarmtune.node.local.data import DataError
from swarmtune.node.local.packing import IGNORE, ExampleBatcher, fixed_batches, tokenize_all
from swarmtune.node.local.render import Renderer, Tokenized
from swarmtune.node.local.sources import Example


@pytest.fixture(scope="module")
def base():
    model, tokenizer, _ = load_base(str(ASSET_DIR))
    return model.eval(), tokenizer


def tokens(renderer: Renderer, *texts: str) -> list[Tokenized]:
    return [renderer.tokenize(Example("t", text=t)) for t in texts]


def test_packed_examples_do_not_see_each_other(base):
    """An example's logits in a packed row equal its logits alone, within fp32 rounding."""
    model, tokenizer = base
    renderer = Renderer(tokenizer, max_length=64)
    first, second = tokens(renderer, "reverse: cat -> tac", "The capital of Peru is Lima.")
    batch = fixed_batches([first, second], seq_len=64, batch_size=1, n_batches=1, pad_id=0)[0]
    assert batch.input_ids.shape == (1, len(first.ids) + len(second.ids))
    with torch.no_grad():
        inputs = {k: v for k, v in batch.inputs().items() if k != "labels"}
        packed = model(**inputs).logits[0]
        alone = model(input_ids=torch.tensor([second.ids])).logits[0]
        # and the mask matters: without position ids the second example sees the first
        leaky = model(input_ids=batch.input_ids, use_cache=False).logits[0]
    part = packed[len(first.ids) :]
    scale = alone.abs().max()
    tolerance = 64 * torch.finfo(torch.float32).eps * scale
    assert (part - alone).abs().max() <= tolerance
    assert (leaky[len(first.ids) :] - alone).abs().max() > 1000 * tolerance


def test_labels_skip_prompts_padding_and_each_first_token(base):
    _, tokenizer = base
    renderer = Renderer(tokenizer, max_length=64)
    pair = renderer.tokenize(Example("t", prompt="12+30=", completion="42"))
    text = renderer.tokenize(Example("t", text="hello there"))
    batch = fixed_batches(
        [pair, text, pair],
        seq_len=len(pair.ids) + len(text.ids),
        batch_size=2,
        n_batches=1,
        pad_id=tokenizer.pad_token_id,
    )[0]
    assert batch.input_ids.shape[0] == 2  # the third example starts a second row
    row0 = batch.labels[0].tolist()
    n = len(pair.ids)
    expected_pair = [
        i if k and j else IGNORE
        for j, (i, k) in enumerate(zip(pair.ids, pair.trained, strict=True))
    ]
    expected_text = [IGNORE] + list(text.ids[1:])
    assert row0 == expected_pair + expected_text
    assert batch.labels[1, n:].eq(IGNORE).all()  # padding
    assert batch.position_ids[0].tolist() == [*range(n), *range(len(text.ids))]
    assert batch.tokens == sum(t != IGNORE for t in batch.labels.flatten().tolist())


def test_batcher_is_seeded_resumable_and_packs_whole_examples(base):
    _, tokenizer = base
    renderer = Renderer(tokenizer, max_length=32)
    examples = tokens(renderer, *[f"word {i} " * (1 + i % 5) for i in range(40)])
    make = lambda seed: ExampleBatcher(examples, 32, 4, seed, tokenizer.pad_token_id)  # noqa: E731
    first, again, other = make(7), make(7), make(8)
    batch = first.next_batch()
    assert torch.equal(batch.input_ids, again.next_batch().input_ids)
    assert not torch.equal(batch.input_ids, other.next_batch().input_ids)
    assert batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] <= 32
    # every example in a row is whole: position ids restart exactly at example boundaries
    known = {t.ids for t in examples}
    for r in range(4):
        ids, pos = batch.input_ids[r].tolist(), batch.position_ids[r].tolist()
        starts = [j for j, p in enumerate(pos) if p == 0] + [len(ids)]
        pieces = [tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
        pad = tokenizer.pad_token_id
        examples_in_row = [p for p in pieces if set(p) != {pad}]
        assert examples_in_row and all(p in known for p in examples_in_row)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_batch().input_ids for _ in range(2)]
    resumed = make(7)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch().input_ids, e) for e in expected)
    with pytest.raises(ValueError, match="seed"):
        make(9).load_state_dict(state)


def test_padded_rows_hold_one_example_each(base):
    _, tokenizer = base
    renderer = Renderer(tokenizer, max_length=32)
    examples = tokens(renderer, "a b", "a b c d e f g")
    batcher = ExampleBatcher(examples, 32, 6, 0, tokenizer.pad_token_id, packed=False)
    batch = batcher.next_batch()
    assert batch.position_ids is None and batch.attention_mask is not None
    lengths = batch.attention_mask.sum(dim=1).tolist()
    assert set(lengths) <= {len(e.ids) for e in examples}
    assert batch.input_ids.shape == (6, max(lengths))


def test_summary_counts_truncated_and_dropped(base):
    tokenizer = copy.deepcopy(base[1])
    tokenizer.chat_template = None  # prompt + completion as plain text: lengths are easy to see
    renderer = Renderer(tokenizer, max_length=8)
    long_prompt = Example("t", prompt="one two three four five six seven eight", completion=" x")
    short = Example("t", prompt="1+1=", completion="2")
    long_text = Example("t", text="alpha beta gamma delta epsilon zeta eta theta")
    kept, summary = tokenize_all([long_prompt, short, long_text], renderer)
    assert len(kept) == 2 and summary.dropped == 1 and summary.truncated == 2
    assert summary.kinds == {"prompt/completion": 2, "text": 1}
    assert "2 truncated to 8 tokens" in summary.line() and "1 dropped" in summary.line()
    with pytest.raises(DataError, match="no example"):
        tokenize_all([long_prompt], renderer)
    with pytest.raises(DataError, match="longer than seq_len"):
        ExampleBatcher(kept, 4, 2, 0, 0)
