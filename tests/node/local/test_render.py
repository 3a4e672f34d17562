"""Rendering examples: the chat template round trip and the completion-only loss mask."""

from __future__ import annotations

import copy

import pytest

from swarmtune.node.local.basemodel import ASSET_DIR, load_tokenizer
from swarmtune.node.local.data import DataError
from swarmtune.node.local.render import Renderer
from swarmtune.node.local.sources import Example

# ChatML, as many instruct models write it
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def embedded():
    return load_tokenizer(ASSET_DIR)


@pytest.fixture(scope="module")
def plain(embedded):
    """The embedded tokenizer without its chat template, as many base models come."""
    tokenizer = copy.deepcopy(embedded)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="module")
def chat(plain):
    tokenizer = copy.deepcopy(plain)
    tokenizer.chat_template = CHATML
    return tokenizer


def chat_example(*turns: tuple[str, str]) -> Example:
    return Example("test", messages=turns)


def test_prompt_completion_mask_by_hand(plain):
    """Without a template: prompt tokens out of the loss, completion and EOS in it."""
    renderer = Renderer(plain, max_length=64)
    out = renderer.tokenize(Example("t", prompt="12+30=", completion="42"))
    prompt_ids = plain("12+30=", add_special_tokens=False)["input_ids"]
    answer_ids = plain("42", add_special_tokens=False)["input_ids"]
    assert plain("12+30=42", add_special_tokens=False)["input_ids"] == prompt_ids + answer_ids
    assert list(out.ids) == [*prompt_ids, *answer_ids, plain.eos_token_id]
    assert list(out.trained) == [False] * len(prompt_ids) + [True] * (len(answer_ids) + 1)
    assert out.trained.count(True) >= 2 and not out.truncated
    full = Renderer(plain, max_length=64, loss="full").tokenize(
        Example("t", prompt="12+30=", completion="42")
    )
    assert full.ids == out.ids and all(full.trained)


def test_hand_computed_mask_of_a_known_sentence(plain):
    """Checked against the tokenizer's own pieces: 'Q: sky? A:' then ' blue'."""
    renderer = Renderer(plain, max_length=64)
    out = renderer.tokenize(Example("t", prompt="Q: sky? A:", completion=" blue"))
    pieces = plain.convert_ids_to_tokens(list(out.ids))
    trained = [p for p, t in zip(pieces, out.trained, strict=True) if t]
    untrained = [p for p, t in zip(pieces, out.trained, strict=True) if not t]
    assert plain.convert_tokens_to_string(untrained) == "Q: sky? A:"
    assert plain.convert_tokens_to_string(trained[:-1]) == " blue"
    assert trained[-1] == plain.eos_token


def test_chat_template_round_trip(chat):
    example = chat_example(
        ("system", "Be brief."),
        ("user", "Capital of Peru?"),
        ("assistant", "Lima"),
        ("user", "And Chile?"),
        ("assistant", "Santiago"),
    )
    renderer = Renderer(chat, max_length=256)
    rendered = chat.apply_chat_template(
        [{"role": r, "content": c} for r, c in example.messages or ()], tokenize=False
    )
    assert renderer.text(example) == rendered
    out = renderer.tokenize(example)
    assert chat.decode(list(out.ids)) == rendered  # nothing lost or added on the way
    # only the two assistant turns (each with its end-of-turn marker) are in the loss
    trained = chat.decode([t for t, k in zip(out.ids, out.trained, strict=True) if k])
    assert trained == "Lima<|im_end|>\nSantiago<|im_end|>\n"
    assert "Capital" not in trained and "Be brief" not in trained


def test_prompt_completion_goes_through_the_template(chat):
    renderer = Renderer(chat, max_length=256)
    example = Example("t", prompt="Capital of Peru?", completion=" Lima")
    assert renderer.text(example) == (
        "<|im_start|>user\nCapital of Peru?<|im_end|>\n<|im_start|>assistant\nLima<|im_end|>\n"
    )
    prompt, answer = renderer.prompt_and_answer(example) or ("", "")
    assert prompt.endswith("<|im_start|>assistant\n") and answer == "Lima"


def test_answers_for_exact_match(plain):
    renderer = Renderer(plain, max_length=64)
    assert renderer.prompt_and_answer(Example("t", text="12+30=42", cue=6)) == ("12+30=", "42")
    assert renderer.prompt_and_answer(Example("t", text="no answer")) is None


def test_truncation_is_flagged_and_chat_without_template_refused(plain):
    out = Renderer(plain, max_length=4).tokenize(Example("t", text="one two three four five six"))
    assert len(out.ids) == 4 and out.truncated
    with pytest.raises(DataError, match="chat template"):
        Renderer(plain, max_length=64).tokenize(chat_example(("user", "a"), ("assistant", "b")))
    with pytest.raises(DataError, match="loss must be"):
        Renderer(plain, max_length=64, loss="prompt")


def test_template_that_rewrites_history_is_refused(chat):
    tokenizer = copy.deepcopy(chat)
    # drops earlier assistant turns when more follow: prefixes no longer line up
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    example = chat_example(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    with pytest.raises(DataError, match="turn by turn"):
        Renderer(tokenizer, max_length=64).tokenize(example)


def test_embedded_template_trains_the_answer_and_its_end(embedded):
    """The embedded base's own "role: content" template: the answer and the EOS that ends
    it are in the loss, the question and the role names are not."""
    renderer = Renderer(embedded, max_length=64)
    example = chat_example(("user", "2+2?"), ("assistant", "4"))
    assert renderer.text(example) == "user: 2+2?\nassistant: 4<|endoftext|>\n"
    out = renderer.tokenize(example)
    trained = embedded.decode([t for t, k in zip(out.ids, out.trained, strict=True) if k])
    assert trained == " 4<|endoftext|>\n"
    assert renderer.prompt_and_answer(example) == ("user: 2+2?\nassistant:", "4")


@pytest.mark.parametrize("loss", ["completion", "full"])
def test_tokenizing_many_at_once_gives_what_one_at_a_time_gives(plain, chat, loss):
    """tokenize_many (chunked calls of a fast tokenizer, what data loading uses) is tokenize()
    example by example: ids, mask and truncation, with and without a chat template, across
    chunk boundaries and with mixed templated and plain examples."""
    examples = [
        Example("t", text="one two three four five six seven eight nine ten eleven"),
        Example("t", prompt="12+30=", completion="42"),
        Example("t", text="date: 1 May 2001 => 2001-05-01", cue=17),
        chat_example(("user", "hi there"), ("assistant", "hello!")),
        Example("t", prompt="Q: sky? A:", completion=" blue"),
        chat_example(
            ("system", "be brief"),
            ("user", "2+2?"),
            ("assistant", "4"),
            ("user", "and 3+3?"),
            ("assistant", "6"),
        ),  # fmt: skip
        Example("t", text="x"),
    ]
    for tokenizer, turned_on in ((plain, None), (chat, None), (plain, "padding"),
                                 (plain, "truncation")):  # fmt: skip
        usable = [e for e in examples if e.messages is None or tokenizer is chat]
        one_by_one = [Renderer(tokenizer, max_length=12, loss=loss).tokenize(e) for e in usable]
        assert any(t.truncated for t in one_by_one)  # the long one is cut at 12 tokens
        for chunk in (1, 2, 1024):
            # a fresh copy each time: transformers' own call turns the backend's padding and
            # truncation off, and a tokenizer.json may turn them on (some hub ones do)
            fresh = copy.deepcopy(tokenizer)
            if turned_on == "padding":
                fresh.backend_tokenizer.enable_padding()
            elif turned_on == "truncation":
                fresh.backend_tokenizer.enable_truncation(4)
            assert turned_on is None or getattr(fresh.backend_tokenizer, turned_on) is not None
            many = Renderer(fresh, max_length=12, loss=loss).tokenize_many(usable, chunk=chunk)
            assert many == one_by_one, (turned_on, chunk)
