"""`swarmtune eval`: an adapter's completion loss and exact match beside the base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmtune.cli import main
from swarmtune.node.config import parse_config
from swarmtune.node.local.build import build_local_model
from swarmtune.node.local.evaluate import is_exact

# 12 made-up facts the base cannot know (it was pre-trained on the built-in tasks only)
WORDS = "apple river planet garden window silver button orange pencil rocket castle dragon"
PAIRS = [
    {"prompt": f"The secret word of {w} is", "completion": f" {w[::-1]}"} for w in WORDS.split()
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data file, adapter dir): an adapter trained on the very pairs it is scored on."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    config = parse_config({"inner": {"lr": 0.01, "batch_size": 8, "seq_len": 64}})
    local = build_local_model(config, str(data))
    local.trainer.train_steps(45)  # measured: exact 0% -> 42%, loss 4.73 -> 0.36
    local.model.save_pretrained(str(root / "adapter"))
    return data, root / "adapter"


def test_eval_reports_loss_exact_and_samples_against_the_base(trained, capsys):
    data, adapter = trained
    args = ["eval", "--adapter", str(adapter), "--data", str(data), "--device", "cpu"]
    assert main([*args, "--json", "--samples", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    base, tuned = result["base model"], result[str(adapter)]
    assert tuned["loss"] < base["loss"] - 0.5  # it learned these very pairs
    assert tuned["exact"] > base["exact"]
    assert len(tuned["samples"]) == 2 and tuned["samples"][0]["reference"] == "elppa"
    judged = [is_exact(s["completion"], s["reference"]) for s in tuned["samples"]]
    assert judged == [s["exact"] for s in tuned["samples"]]
    assert main([*args, "--samples", "1"]) == 0
    table = capsys.readouterr().out
    assert "loss/token" in table and "base model" in table and "reference: 'elppa'" in table


def test_exact_match_rule():
    assert is_exact(" Paris.\nQ: next", "Paris")
    assert is_exact("New  Delhi", " New Delhi")
    assert not is_exact("Pari", "Paris") and not is_exact("anything", "  ")


def test_eval_bad_input_is_one_line(trained, tmp_path, capsys):
    data, adapter = trained
    assert main(["eval", "--data", str(data)]) == 2
    assert "exactly one of --adapter" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path), "--data", str(data)]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(adapter), "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
