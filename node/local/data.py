"""The bundled multi-task corpus, and token windows of it (the simulator, pre-training).

A volunteer's own data is read by node/local/sources.py and batched as whole examples by
node/local/packing.py.

The built-in tasks are procedurally generated and deliberately different in their token
statistics (digits, letter strings, English facts, month names, Python), so that LoRA task
vectors trained on them differ by task and clustering has a ground truth.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from swarmtune.node.local.batch import Batch, SeededStream

BUILTIN_PREFIX = "builtin:"
BUILTIN_COUNT = 2000
EVAL_SEED = 1_000_003  # far from any seed a peer would use for training texts


class DataError(ValueError):
    """Unusable training data; the message is one line meant for the user."""


_WORDS = """
apple river planet garden window silver button orange pencil rocket castle dragon
summer winter bottle forest marble candle anchor bridge cactus desert engine falcon
guitar harbor island jacket kettle lemon magnet needle ocean parrot quartz rabbit
saddle tunnel violin walnut yellow zipper basket cherry dinner eagle feather ginger
hammer insect jungle kitten ladder mirror napkin oyster pepper puzzle ribbon shadow
ticket umbrella velvet wizard bamboo compass dolphin lantern meadow nectar orchid
pillow shovel spider thunder tomato valley copper glacier horizon mustard saffron
""".split()

_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Russia", "Moscow"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Cuba", "Havana"),
    ("Australia", "Canberra"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Iran", "Tehran"),
    ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Colombia", "Bogota"),
)  # fmt: skip

_CAPITAL_TEMPLATES = (
    "The capital of {country} is {city}.",
    "{city} is the capital city of {country}.",
    "Q: What is the capital of {country}? A: {city}",
    "If you travel to {country}, the government sits in {city}.",
)

_MONTHS = (
    "January February March April May June July August September October November December"
).split()

_CODE_NAMES = ("total", "count", "value", "item", "score", "price", "size", "index", "left")
_CODE_OPS = ("+", "-", "*", "//", "%")


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a}{op}{b}={result}"


def _reverse(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    return f"reverse: {word} -> {word[::-1]}"


def _capitals(rng: random.Random) -> str:
    country, city = rng.choice(_CAPITALS)
    return rng.choice(_CAPITAL_TEMPLATES).format(country=country, city=city)


def _dates(rng: random.Random) -> str:
    year, month, day = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    if rng.random() < 0.5:
        return f"date: {iso} => {_MONTHS[month - 1]} {day}, {year}"
    return f"date: {day} {_MONTHS[month - 1]} {year} => {iso}"


def _code(rng: random.Random) -> str:
    x, y = rng.sample(_CODE_NAMES, 2)
    op = rng.choice(_CODE_OPS)
    if rng.random() < 0.5:
        return f"def combine_{x}_{y}({x}, {y}):\n    return {x} {op} {y}"
    n = rng.randint(2, 20)
    return f"{x} = 0\nfor i in range({n}):\n    {x} = {x} {op} i\nprint({x})"


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "capitals": _capitals,
    "dates": _dates,
    "code": _code,
}
BUILTIN_TASKS: tuple[str, ...] = tuple(_GENERATORS)


# Where a built-in text's answer starts: after the last of its task's cues. Exact match asks
# the model to complete a text cut there (node/local/render.py).
_CUES: dict[str, tuple[str, ...]] = {
    "arithmetic": ("=",),
    "reverse": (" ->",),
    "capitals": (" is", " of", " A:", " in"),
    "dates": (" =>",),
    "code": (" return", "print("),
}


def split_cue(task: str, text: str) -> int | None:
    """Offset in a built-in text where its answer begins (None: the text has no cue)."""
    ends = [text.rfind(c) + len(c) for c in _CUES.get(task, ()) if c in text]
    cue = max(ends, default=None)
    return cue if cue is not None and 0 < cue < len(text) else None


def data_spec(task_or_spec: str) -> str:
    """A `--data` value from a built-in task's name, or the spec itself when it is one."""
    if ":" in task_or_spec or "/" in task_or_spec:
        return task_or_spec
    return f"{BUILTIN_PREFIX}{task_or_spec}"


def builtin_texts(task: str, n: int, seed: int) -> list[str]:
    """n examples of a built-in task; the same (task, n, seed) always gives the same list."""
    if task not in _GENERATORS:
        raise DataError(f"unknown builtin task {task!r}; valid tasks: {', '.join(BUILTIN_TASKS)}")
    rng = random.Random(f"{task}:{seed}")  # string seeds hash stably across runs and platforms
    generate = _GENERATORS[task]
    return [generate(rng) for _ in range(n)]


def builtin_eval_texts(task: str, n: int = 200) -> list[str]:
    """Held-out examples of a built-in task, drawn with a seed no training run uses."""
    return builtin_texts(task, n, EVAL_SEED)


def _token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no EOS token to separate texts")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = [token for text_ids in encoded for token in (*text_ids, tokenizer.eos_token_id)]
    return torch.tensor(ids, dtype=torch.long)


def _check_length(stream: torch.Tensor, seq_len: int) -> None:
    if stream.numel() < seq_len + 1:
        raise DataError(f"data has {stream.numel()} tokens; need at least {seq_len + 1}")


class TokenBatcher(SeededStream):
    """Random [batch_size, seq_len] windows from one EOS-joined token stream.

    Batch k's offsets come from a torch.Generator seeded with hash(seed, k), so the state is
    just k: a resumed peer continues the exact stream it would have seen.
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        batch_size: int,
        seed: int,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        self.stream = _token_stream(texts, tokenizer)
        _check_length(self.stream, seq_len)
        super().__init__(seed)
        self.seq_len, self.batch_size = seq_len, batch_size

    def next_batch(self) -> Batch:
        """Next [batch_size, seq_len] windows, every token in the loss."""
        generator = self.next_generator()
        high = self.stream.numel() - self.seq_len + 1
        offsets = torch.randint(0, high, (self.batch_size,), generator=generator)
        batch = torch.stack([self.stream[o : o + self.seq_len] for o in offsets.tolist()])
        return Batch.windows(batch)


def eval_batches(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    batch_size: int,
    n_batches: int,
) -> list[Batch]:
    """n_batches fixed [batch_size, seq_len] windows at evenly spaced offsets (no randomness)."""
    stream = _token_stream(texts, tokenizer)
    _check_length(stream, seq_len)
    count = batch_size * n_batches
    offsets = torch.linspace(0, stream.numel() - seq_len, count).long().tolist()
    windows = torch.stack([stream[o : o + seq_len] for o in offsets])
    return [Batch.windows(w) for w in windows.split(batch_size)]
