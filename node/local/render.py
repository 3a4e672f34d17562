"""From an Example to the tokens a model trains on, and which of them are in the loss.

Chat and prompt/completion examples go through the tokenizer's chat template when it has
one, so an adapter trains on exactly what the model sees when it is prompted. The loss
covers only completion / assistant tokens by default (`loss="completion"`); `loss="full"`
trains on every token. A token is in the loss when any of its characters is: each assistant
turn's span is found by rendering the conversation up to that turn, with and without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from swarmtune.node.local.data import DataError
from swarmtune.node.local.sources import Example

LOSSES = ("completion", "full")


@dataclass(frozen=True)
class Tokenized:
    """Token ids and, per token, whether it is in the loss; `truncated`: cut at max_length."""

    ids: tuple[int, ...]
    trained: tuple[bool, ...]
    truncated: bool = False

    @property
    def loss_count(self) -> int:
        """Tokens that will be labels: an example's first token never is (nothing of it
        precedes it)."""
        return sum(self.trained[1:])


class Renderer:
    """Renders and tokenizes Examples for one tokenizer, length limit and loss mode."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, loss: str = "completion"
    ) -> None:
        if loss not in LOSSES:
            raise DataError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token to end examples with")
        self.tokenizer, self.max_length, self.loss = tokenizer, max_length, loss
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def segments(self, example: Example) -> list[tuple[str, bool]]:
        """The rendered example as consecutive (text, in the completion) pieces."""
        turns = self._turns(example)
        if turns is None:
            if example.prompt is not None:
                return [(example.prompt, False), (example.completion or "", True)]
            return [(example.text or "", True)]
        full = self._render(turns, prompt=False)
        pieces, done = [], 0
        for k, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = self._render(turns[:k], prompt=True)
            through = self._render(turns[: k + 1], prompt=False)
            start, end = len(before), len(through)
            if not (start >= done and through.startswith(before) and full.startswith(through)):
                raise DataError(
                    f"{example.where}: the chat template does not render the conversation "
                    "turn by turn, so assistant tokens cannot be found; use --loss full"
                )
            pieces += [(full[done:start], False), (full[start:end], True)]
            done = end
        return [p for p in [*pieces, (full[done:], False)] if p[0]]

    def text(self, example: Example) -> str:
        """The whole rendered example, as the model reads it (shown once at start-up)."""
        return "".join(piece for piece, _ in self.segments(example))

    def tokenize(self, example: Example) -> Tokenized:
        """Token ids and loss mask, truncated to max_length; plain (untemplated) examples end
        with EOS so the model learns to stop."""
        segments = self.segments(example)
        templated = self._turns(example) is not None
        ids: list[int] = []
        trained: list[bool] = []
        if self.tokenizer.is_fast:
            ids, trained = self._encode_with_offsets(segments, special=not templated)
        else:  # no offsets: piece by piece (boundaries may tokenize a little differently)
            for k, (piece, in_loss) in enumerate(segments):
                piece_ids = self._encode(piece, special=not templated and k == 0)
                ids += piece_ids
                trained += [in_loss] * len(piece_ids)
        return self._finish(ids, trained, segments, templated)

    def tokenize_many(self, examples: Sequence[Example], chunk: int = 1024) -> list[Tokenized]:
        """`tokenize` of every example, the same result, with a fast tokenizer `chunk` texts
        per call (one call per example cost most of a volunteer's start-up in Python
        overhead: 6,600 examples took 1.4 s one by one)."""
        backend = _plain_backend(self.tokenizer)
        if backend is None:
            return [self.tokenize(e) for e in examples]
        prepared = [(self.segments(e), self._turns(e) is not None) for e in examples]
        out: list[Tokenized | None] = [None] * len(examples)
        for templated in (False, True):  # template text carries its own special tokens
            todo = [i for i, (_, t) in enumerate(prepared) if t == templated]
            for at in range(0, len(todo), chunk):
                part = todo[at : at + chunk]
                texts = ["".join(piece for piece, _ in prepared[i][0]) for i in part]
                # the Rust tokenizer itself: transformers' own call converts each encoding in
                # Python, which cost as much again
                encoded = backend.encode_batch(texts, add_special_tokens=not templated)
                for one, i in zip(encoded, part, strict=True):
                    segments = prepared[i][0]
                    trained = _in_loss(segments, one.offsets)
                    out[i] = self._finish(list(one.ids), trained, segments, templated)
        return [t for t in out if t is not None]

    def _finish(
        self, ids: list[int], trained: list[bool], segments: list[tuple[str, bool]], templated: bool
    ) -> Tokenized:
        """EOS after a plain example, the loss mode, and the length limit."""
        if not templated and (not ids or ids[-1] != self.tokenizer.eos_token_id):
            ids.append(self.tokenizer.eos_token_id)
            trained.append(segments[-1][1])
        if self.loss == "full":
            trained = [True] * len(ids)
        cut = len(ids) > self.max_length
        return Tokenized(tuple(ids[: self.max_length]), tuple(trained[: self.max_length]), cut)

    def prompt_and_answer(self, example: Example) -> tuple[str, str] | None:
        """(prompt text, reference answer) for exact match; None where there is no answer."""
        turns = self._turns(example)
        if turns is not None:
            last = max(k for k, (role, _) in enumerate(turns) if role == "assistant")
            return self._render(turns[:last], prompt=True), turns[last][1]
        if example.prompt is not None:
            return example.prompt, example.completion or ""
        if example.cue is not None and example.text is not None:
            return example.text[: example.cue], example.text[example.cue :]
        return None

    def encode_prompt(self, prompt: str, example: Example) -> list[int]:
        """Token ids of a prompt from prompt_and_answer, as tokenize() would start them."""
        return self._encode(prompt, special=self._turns(example) is None)

    def _turns(self, example: Example) -> tuple[tuple[str, str], ...] | None:
        """The conversation to render with the chat template (None: render as plain text)."""
        if example.messages is not None:
            if not self.templated:
                raise DataError(
                    f"{example.where}: chat data needs a tokenizer with a chat template, and "
                    "this base model has none; give prompt/completion or text records"
                )
            return example.messages
        if example.prompt is not None and self.templated:
            completion = (example.completion or "").strip()
            return (("user", example.prompt.strip()), ("assistant", completion))
        return None

    def _render(self, turns: tuple[tuple[str, str], ...], prompt: bool) -> str:
        if not turns:
            return ""
        messages = [{"role": role, "content": content} for role, content in turns]
        rendered: Any = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )
        return str(rendered)

    def _encode(self, text: str, special: bool) -> list[int]:
        """Ids of text; `special`: with the tokenizer's own start tokens (BOS, where it adds
        one), as a plain example begins. Template text carries its own special tokens."""
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _encode_with_offsets(
        self, segments: list[tuple[str, bool]], special: bool
    ) -> tuple[list[int], list[bool]]:
        """Tokenize the joined text once (as it will be prompted) and put a token in the loss
        when any of its characters lies in a completion piece."""
        text = "".join(piece for piece, _ in segments)
        encoded = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(encoded["input_ids"]), _in_loss(segments, encoded["offset_mapping"])


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer behind `tokenizer` where calling it directly gives what the
    tokenizer's own call gives; None (tokenize one by one) for a slow tokenizer, a class that
    changes how text is encoded (CodeLlama's infilling, say), or a backend left with padding or
    truncation on (some tokenizer.json files do; transformers turns them off per call)."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    own_encoding = type(tokenizer)._encode_plus is not PreTrainedTokenizerFast._encode_plus
    if backend is None or own_encoding or backend.truncation or backend.padding:
        return None
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def _in_loss(segments: list[tuple[str, bool]], offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token (by its character offsets in the joined segments): in the loss when any of its
    characters lies in a completion piece."""
    spans, at = [], 0
    for piece, in_loss in segments:
        if in_loss:
            spans.append((at, at + len(piece)))
        at += len(piece)
    return [end > start and any(start < b and end > a for a, b in spans) for start, end in offsets]
