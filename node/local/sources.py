"""Where a volunteer's examples come from: built-in tasks, files, or a cached Hugging Face set.

Every source yields `Example`s in one of three shapes, the ones fine-tuners already have:
chat (`{"messages": [{"role", "content"}, ...]}`), prompt/completion, or plain text. Files are
read by the `datasets` library (jsonl, json, csv, parquet); .txt files are split into
paragraphs, or lines when there are no blank lines. A bad record is one line naming its file
and its line (jsonl) or row (json, csv, parquet).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmtune.node.local.data import (
    BUILTIN_COUNT,
    BUILTIN_PREFIX,
    DataError,
    builtin_texts,
    split_cue,
)

HF_PREFIX = "hf:"
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DATA_SUFFIXES = (*TABLE_SUFFIXES, ".txt")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """One training example. Exactly one shape is set: `messages`, `prompt` + `completion`,
    or `text`. `where` names its origin for error lines; `cue` (built-in texts) is the offset
    where the part exact match judges begins."""

    where: str
    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    cue: int | None = None

    @property
    def kind(self) -> str:
        if self.messages is not None:
            return "chat"
        return "prompt/completion" if self.prompt is not None else "text"


def load_examples(spec: str, seed: int = 0) -> list[Example]:
    """Examples from `builtin:<task>`, `hf:NAME[:split]`, a data file, or a directory of them."""
    if spec.startswith(BUILTIN_PREFIX):
        task = spec[len(BUILTIN_PREFIX) :]
        texts = builtin_texts(task, BUILTIN_COUNT, seed)
        return [Example(f"{spec}#{i}", text=t, cue=split_cue(task, t)) for i, t in enumerate(texts)]
    if spec.startswith(HF_PREFIX):
        examples = _hub_examples(spec[len(HF_PREFIX) :])
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"data path does not exist: {spec}")
        examples = [e for file in _data_files(path) for e in _file_examples(file)]
    if not examples:
        raise DataError(f"no examples found in {spec}")
    return examples


def _data_files(path: Path) -> list[Path]:
    wanted = ", ".join(DATA_SUFFIXES)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"no data files ({wanted}) in directory {path}")
        return files
    if path.suffix not in DATA_SUFFIXES:
        raise DataError(f"unsupported data file {path} (expected one of {wanted})")
    return [path]


def _file_examples(path: Path) -> list[Example]:
    if path.suffix == ".txt":
        return [Example(f"{path}:{n}", text=t) for n, t in _split_txt(_read_text(path))]
    try:
        rows = _load_table(TABLE_SUFFIXES[path.suffix], str(path), str(path))
    except DataError:
        if path.suffix == ".jsonl":
            _diagnose_jsonl(path)  # pyarrow's own error names no line: find the first bad one
        raise
    if path.suffix == ".jsonl":
        numbers = _record_lines(_read_text(path))
        where = [f"{path}: line {numbers[i]}" for i in range(len(rows))]
    else:
        where = [f"{path}: row {i + 1}" for i in range(len(rows))]
    return [_example(row, w) for row, w in zip(rows, where, strict=True)]


def _hub_examples(name: str) -> list[Example]:
    """A data set from the local Hugging Face cache (or the hub where the network allows)."""
    dataset, _, split = name.partition(":")
    rows = _load_table(dataset, None, f"hf:{name}", split=split or "train")
    return [_example(row, f"hf:{name}: row {i + 1}") for i, row in enumerate(rows)]


def _load_table(
    builder: str, data_files: str | None, label: str, split: str = "train"
) -> list[dict[str, Any]]:
    import datasets  # noqa: PLC0415 - 2 s of imports, only when a file or hub set is read

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        table = datasets.load_dataset(builder, data_files=data_files, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one line for all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {label}: {first[:300]}") from None
    return list(table)


def _example(row: Any, where: str) -> Example:
    """One record as an Example; anything else is one error line naming where it was."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: not an object")
    messages = row.get("messages")
    if messages is not None:
        return Example(where, messages=_messages(messages, where))
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise DataError(f"{where}: empty 'completion'")
        return Example(where, prompt=prompt, completion=completion)
    text = row.get("text")
    if isinstance(text, str) and text.strip():
        return Example(where, text=text)
    raise DataError(
        f"{where}: expected 'messages' (a list of role/content objects), string 'prompt' and "
        "'completion', or a non-empty string 'text'"
    )


def _messages(messages: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    turns = []
    for i, turn in enumerate(messages):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise DataError(
                f"{where}: message {i + 1} needs a role ({', '.join(ROLES)}) and string content"
            )
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant message to train on")
    return tuple(turns)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None


def _record_lines(content: str) -> list[int]:
    """1-based numbers of the non-blank lines of a jsonl file: row i came from line [i]."""
    return [n for n, line in enumerate(content.splitlines(), start=1) if line.strip()]


def _diagnose_jsonl(path: Path) -> None:
    """Raise the first bad line's error (bad JSON or a record of no known shape), if any."""
    import json  # noqa: PLC0415

    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: bad JSON at line {number}: {err.msg}") from None
        _example(row, f"{path}: line {number}")


def _split_txt(content: str) -> list[tuple[int, str]]:
    """(first line number, text): paragraphs if the file has blank lines, else its lines."""
    lines = content.splitlines()
    if all(line.strip() for line in lines):
        return [(n, line) for n, line in enumerate(lines, start=1)]
    out, start, block = [], 0, []
    for n, line in enumerate([*lines, ""], start=1):
        if line.strip():
            start = start or n
            block.append(line.rstrip())
        elif block:
            out.append((start, "\n".join(block)))
            start, block = 0, []
    return out
