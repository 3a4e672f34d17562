"""Bundled tasks, their answer cues, and the token-window batcher."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from swarmtune.node.local.basemodel import ASSET_DIR, load_tokenizer
from swarmtune.node.local.data import (
    BUILTIN_TASKS,
    DataError,
    TokenBatcher,
    builtin_eval_texts,
    builtin_texts,
    eval_batches,
    split_cue,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSET_DIR)


def test_builtin_tasks_are_deterministic_and_seeded():
    assert len(BUILTIN_TASKS) >= 4
    for task in BUILTIN_TASKS:
        texts = builtin_texts(task, 50, seed=3)
        assert texts == builtin_texts(task, 50, seed=3)
        assert texts != builtin_texts(task, 50, seed=4)
        assert all(isinstance(t, str) and t for t in texts)


def test_builtin_tasks_have_distinct_token_statistics(tokenizer):
    def histogram(task: str, seed: int) -> torch.Tensor:
        counts = Counter(tokenizer("\n".join(builtin_texts(task, 300, seed))).input_ids)
        hist = torch.zeros(len(tokenizer))
        hist[list(counts)] = torch.tensor(list(counts.values()), dtype=torch.float)
        return hist / hist.norm()

    hists = {task: histogram(task, 0) for task in BUILTIN_TASKS}
    for task in BUILTIN_TASKS:
        assert torch.dot(hists[task], histogram(task, 1)) > 0.95
        for other in BUILTIN_TASKS:
            if other != task:
                assert torch.dot(hists[task], hists[other]) < 0.6, (task, other)


def test_eval_texts_are_held_out_from_training_texts():
    for task in BUILTIN_TASKS:
        assert builtin_eval_texts(task) == builtin_eval_texts(task)
        assert builtin_eval_texts(task) != builtin_texts(task, 200, seed=0)


def test_batcher_stream_joins_texts_with_eos(tokenizer):
    texts = ["37+48=85", "reverse: cat -> tac"]
    batcher = TokenBatcher(texts, tokenizer, seq_len=4, batch_size=2, seed=0)
    expected = []
    for text in texts:
        expected += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert batcher.stream.tolist() == expected


def test_batcher_windows_are_deterministic_slices_of_the_stream(tokenizer):
    texts = builtin_texts("code", 200, seed=0)
    first = TokenBatcher(texts, tokenizer, seq_len=32, batch_size=4, seed=7)
    second = TokenBatcher(texts, tokenizer, seq_len=32, batch_size=4, seed=7)
    other_seed = TokenBatcher(texts, tokenizer, seq_len=32, batch_size=4, seed=8)
    out = first.next_batch()
    batch, tokens = out.input_ids, out.tokens
    assert torch.equal(out.labels, batch)
    assert batch.shape == (4, 32) and batch.dtype == torch.long and tokens == 128
    assert torch.equal(batch, second.next_batch().input_ids)
    assert not torch.equal(batch, other_seed.next_batch().input_ids)
    windows = first.stream.unfold(0, 32, 1)
    assert all((windows == row).all(dim=1).any() for row in batch)
    assert not torch.equal(batch, first.next_batch().input_ids)


def test_batcher_resumes_from_state_dict(tokenizer):
    texts = builtin_texts("reverse", 200, seed=0)
    original = TokenBatcher(texts, tokenizer, seq_len=16, batch_size=3, seed=1)
    for _ in range(3):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    expected = [original.next_batch().input_ids for _ in range(2)]
    resumed = TokenBatcher(texts, tokenizer, seq_len=16, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch().input_ids, e) for e in expected)
    with pytest.raises(ValueError, match="seed"):
        TokenBatcher(texts, tokenizer, seq_len=16, batch_size=3, seed=2).load_state_dict(state)


def test_batcher_rejects_too_short_data(tokenizer):
    with pytest.raises(DataError, match="tokens"):
        TokenBatcher(["1+1=2"], tokenizer, seq_len=64, batch_size=2, seed=0)


def test_eval_batches_are_fixed_and_leave_the_trainer_alone(tokenizer):
    texts = builtin_eval_texts("capitals")
    batches = eval_batches(texts, tokenizer, seq_len=32, batch_size=4, n_batches=3)
    again = eval_batches(texts, tokenizer, seq_len=32, batch_size=4, n_batches=3)
    assert len(batches) == 3 and all(b.input_ids.shape == (4, 32) for b in batches)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again, strict=True))
    train = builtin_texts("capitals", 200, seed=0)
    reference = TokenBatcher(train, tokenizer, seq_len=32, batch_size=4, seed=0)
    interleaved = TokenBatcher(train, tokenizer, seq_len=32, batch_size=4, seed=0)
    reference_batches = [reference.next_batch().input_ids for _ in range(2)]
    interleaved_batches = []
    for _ in range(2):
        eval_batches(texts, tokenizer, seq_len=32, batch_size=4, n_batches=1)
        torch.rand(3)  # global RNG use must not matter either
        interleaved_batches.append(interleaved.next_batch().input_ids)
    pairs = zip(reference_batches, interleaved_batches, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_every_builtin_text_has_an_answer_after_its_cue():
    for task in BUILTIN_TASKS:
        for text in builtin_texts(task, 100, seed=2):
            cue = split_cue(task, text)
            assert cue is not None and text[cue:].strip(), (task, text)
    assert split_cue("arithmetic", "12+30=42") == len("12+30=")
    assert split_cue("capitals", "The capital of Peru is Lima.") == len("The capital of Peru is")
    assert split_cue("arithmetic", "no cue here") is None
