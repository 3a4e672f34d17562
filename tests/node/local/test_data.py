"""Bundled tasks, user data files, and the token batcher."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from node.local.basemodel import ASSET_DIR, load_tokenizer
from node.local.data import (
    BUILTIN_COUNT,
    BUILTIN_TASKS,
    DataError,
    TokenBatcher,
    builtin_eval_texts,
    builtin_texts,
    eval_batches,
    load_texts,
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


def test_load_texts_builtin():
    texts = load_texts("builtin:dates", seed=5)
    assert len(texts) == BUILTIN_COUNT
    assert texts == builtin_texts("dates", BUILTIN_COUNT, 5)


def test_unknown_builtin_task_lists_valid_ones():
    with pytest.raises(DataError) as caught:
        load_texts("builtin:poetry")
    assert "poetry" in str(caught.value)
    assert all(task in str(caught.value) for task in BUILTIN_TASKS)


def _write_jsonl(path, records) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))


def test_jsonl_text_and_prompt_completion(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": "plain text"}, "", {"prompt": "Q: 2+2?", "completion": " 4"}])
    assert load_texts(str(path)) == ["plain text", "Q: 2+2? 4"]


def test_bad_json_reports_its_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": "ok"}, {"text": "ok"}, '{"text": broken'])
    with pytest.raises(DataError, match="line 3"):
        load_texts(str(path))


def test_record_without_text_reports_its_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": "ok"}, {"prompt": "only a prompt"}])
    with pytest.raises(DataError, match="line 2"):
        load_texts(str(path))


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no text"):
        load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported"):
        load_texts(str(tmp_path / "data.csv"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no .jsonl or .txt"):
        load_texts(str(tmp_path / "sub"))


def test_txt_paragraphs_lines_and_directories(tmp_path):
    (tmp_path / "b.txt").write_text("para one\nstill one\n\npara two\n")
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    assert load_texts(str(tmp_path / "b.txt")) == ["para one\nstill one", "para two"]
    assert load_texts(str(tmp_path)) == [
        "line one",
        "line two",
        "para one\nstill one",
        "para two",
        "from jsonl",
    ]


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
    batch, tokens = first.next_batch()
    assert batch.shape == (4, 32) and batch.dtype == torch.long and tokens == 128
    assert torch.equal(batch, second.next_batch()[0])
    assert not torch.equal(batch, other_seed.next_batch()[0])
    windows = first.stream.unfold(0, 32, 1)
    assert all((windows == row).all(dim=1).any() for row in batch)
    assert not torch.equal(batch, first.next_batch()[0])


def test_batcher_resumes_from_state_dict(tokenizer):
    texts = builtin_texts("reverse", 200, seed=0)
    original = TokenBatcher(texts, tokenizer, seq_len=16, batch_size=3, seed=1)
    for _ in range(3):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    expected = [original.next_batch()[0] for _ in range(2)]
    resumed = TokenBatcher(texts, tokenizer, seq_len=16, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()[0], e) for e in expected)
    with pytest.raises(ValueError, match="seed"):
        TokenBatcher(texts, tokenizer, seq_len=16, batch_size=3, seed=2).load_state_dict(state)


def test_batcher_rejects_too_short_data(tokenizer):
    with pytest.raises(DataError, match="tokens"):
        TokenBatcher(["1+1=2"], tokenizer, seq_len=64, batch_size=2, seed=0)


def test_eval_batches_are_fixed_and_leave_the_trainer_alone(tokenizer):
    texts = builtin_eval_texts("capitals")
    batches = eval_batches(texts, tokenizer, seq_len=32, batch_size=4, n_batches=3)
    again = eval_batches(texts, tokenizer, seq_len=32, batch_size=4, n_batches=3)
    assert len(batches) == 3 and all(b.shape == (4, 32) for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    train = builtin_texts("capitals", 200, seed=0)
    reference = TokenBatcher(train, tokenizer, seq_len=32, batch_size=4, seed=0)
    interleaved = TokenBatcher(train, tokenizer, seq_len=32, batch_size=4, seed=0)
    reference_batches = [reference.next_batch()[0] for _ in range(2)]
    interleaved_batches = []
    for _ in range(2):
        eval_batches(texts, tokenizer, seq_len=32, batch_size=4, n_batches=1)
        torch.rand(3)  # global RNG use must not matter either
        interleaved_batches.append(interleaved.next_batch()[0])
    pairs = zip(reference_batches, interleaved_batches, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
