"""Reading examples: chat, prompt/completion and text records from every supported source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmtune.node.local.data import DataError
from swarmtune.node.local.sources import Example, load_examples

CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_three_record_shapes_from_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [CHAT, {"prompt": "2+2=", "completion": " 4"}, {"text": "plain words"}],
    )
    chat, pair, text = load_examples(str(path))
    assert chat.kind == "chat" and chat.messages == (("user", "Hi?"), ("assistant", "Yo."))
    assert (pair.kind, pair.prompt, pair.completion) == ("prompt/completion", "2+2=", " 4")
    assert (text.kind, text.text) == ("text", "plain words")
    assert chat.where == f"{path}: line 1"


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_tables_read_through_datasets(tmp_path, suffix):
    import pandas  # noqa: PLC0415 - comes with datasets

    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(3)]
    path = tmp_path / f"d{suffix}"
    frame = pandas.DataFrame(rows)
    {
        ".json": lambda: path.write_text(json.dumps(rows)),
        ".csv": lambda: frame.to_csv(path, index=False),
        ".parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    examples = load_examples(str(path))
    assert [(e.prompt, e.completion) for e in examples] == [
        (r["prompt"], r["completion"]) for r in rows
    ]
    assert examples[2].where == f"{path}: row 3"


def test_hub_style_spec_reads_a_dataset_folder(tmp_path):
    folder = tmp_path / "my-set"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [CHAT, CHAT])
    examples = load_examples(f"hf:{folder}")
    assert len(examples) == 2 and examples[0].kind == "chat"
    assert examples[1].where == f"hf:{folder}: row 2"
    with pytest.raises(DataError, match="cannot read hf:"):
        load_examples(f"hf:{folder}:validation")


def test_txt_paragraphs_lines_and_directories(tmp_path):
    (tmp_path / "b.txt").write_text("para one\nstill one\n\npara two\n")
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "from jsonl"}])
    assert [e.text for e in load_examples(str(tmp_path / "b.txt"))] == [
        "para one\nstill one",
        "para two",
    ]
    assert [e.where for e in load_examples(str(tmp_path / "b.txt"))] == [
        f"{tmp_path / 'b.txt'}:1",
        f"{tmp_path / 'b.txt'}:4",
    ]
    texts = [e.text for e in load_examples(str(tmp_path))]
    assert texts == ["line one", "line two", "para one\nstill one", "para two", "from jsonl"]


def test_builtin_examples_carry_their_answer_cue():
    examples = load_examples("builtin:arithmetic", seed=5)
    assert len(examples) == 2000 and all(e.kind == "text" for e in examples)
    first = examples[0]
    assert first.text is not None and first.cue == first.text.index("=") + 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "ok"}, {"text": 3}], "line 2: expected 'messages'"),
        ([{"prompt": "p", "completion": "  "}], "line 1: empty 'completion'"),
        ([{"messages": []}], "line 1: 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "message 1 needs a role"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant message"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # a blank first line
    with pytest.raises(DataError) as caught:
        load_examples(str(path))
    line_no = int(message.split()[1].rstrip(":")) + 1 if message.startswith("line") else None
    text = str(caught.value)
    assert str(path) in text and "\n" not in text
    if line_no is not None:
        assert f"line {line_no}:" in text and message.split(": ", 1)[1] in text
    else:
        assert message in text


def test_bad_json_and_bad_paths(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match="bad JSON at line 3"):
        load_examples(str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_examples(str(tmp_path / "empty.txt"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported"):
        load_examples(str(tmp_path / "data.xml"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_examples(str(tmp_path / "sub"))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(str(tmp_path / "latin.txt"))


def test_example_kind():
    assert Example("x", text="t").kind == "text"


def test_a_volunteer_reads_its_data_once(tmp_path):
    """`join` reads the data before going online (bad data fails early) and hands those
    examples to the model builder, which then does not read the file again."""
    from swarmtune.node.config import parse_config
    from swarmtune.node.local.build import build_local_model

    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"q{i}?", "completion": f" a{i}"} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(str(path))
    path.unlink()  # a second read would fail now
    config = parse_config({"inner": {"steps": 1, "batch_size": 2, "seq_len": 32}})
    local = build_local_model(config, str(path), examples=examples)
    assert local.trainer.train_steps(1).steps == 1
    with pytest.raises(DataError, match="does not exist"):
        build_local_model(config, str(path))
