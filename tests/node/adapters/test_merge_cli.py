"""`swarmtune merge` on adapters made by plain PEFT; the result is checked through plain PEFT."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from swarmtune.cli import main
from swarmtune.node.adapters.adapter import AdapterError
from swarmtune.node.adapters.merge import check_same_base, read_adapter
from swarmtune.node.local.basemodel import export_base

TARGETS = ["q_proj", "v_proj"]
EPS32 = torch.finfo(torch.float32).eps
SOURCES = {  # name: (r, alpha, rslora, rank_pattern)
    "a": (4, 8, False, {}),
    "b": (2, 16, True, {}),
    "c": (8, 8, False, {"v_proj": 3}),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base_dir = export_base(root / "base")
    paths = {"base": Path(base_dir)}
    for seed, (name, (r, alpha, rslora, pattern)) in enumerate(SOURCES.items()):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir),
            LoraConfig(
                r=r,
                lora_alpha=alpha,
                use_rslora=rslora,
                rank_pattern=pattern,
                target_modules=TARGETS,
            ),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _merged_weights(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    merged = model.merge_and_unload()
    return {
        n: p.detach().clone() for n, p in merged.named_parameters() if n.endswith("proj.weight")
    }


def _delta(made: dict[str, Path], name: str) -> dict[str, torch.Tensor]:
    base = dict(AutoModelForCausalLM.from_pretrained(made["base"]).named_parameters())
    return {n: w - base[n].detach() for n, w in _merged_weights(made["base"], made[name]).items()}


def test_cat_merge_loads_in_peft_and_equals_the_weighted_sum(
    made: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cat"
    weights = [0.5, 1.0, -2.0]
    args = ["merge", *(str(made[n]) for n in "abc"), "--method", "cat", "--out", str(out)]
    assert main([*args, "--weights", *map(str, weights)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["use_rslora"] is False
    assert config["alpha_pattern"] == config["rank_pattern"]
    deltas = {n: _delta(made, n) for n in "abc"}
    merged = _delta({"base": made["base"], "m": out}, "m")
    base = dict(AutoModelForCausalLM.from_pretrained(made["base"]).named_parameters())
    for name, value in merged.items():
        expected = sum(w * deltas[s][name] for w, s in zip(weights, "abc", strict=True))
        if expected.abs().max() > 0:  # modules the sources adapt
            # each delta is fp32 (W + dW) - W, off by up to eps32 |W + dW|: value has one such
            # error, expected the sources' errors times |w_i|
            largest = max(float(d.abs().max()) for d in (value, *(deltas[s][name] for s in "abc")))
            scale = float(base[name].detach().abs().max()) + largest  # >= |W + dW|
            atol = 2 * EPS32 * (1 + sum(map(abs, weights))) * scale
            torch.testing.assert_close(value, expected, rtol=0, atol=atol)
    assert any(v.abs().max() > 0 for v in merged.values())


def test_ties_merge_is_refactored_to_rank_and_reports_energy(
    made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ties"
    args = ["merge", str(made["a"]), str(made["c"]), "--method", "ties", "--rank", "4"]
    assert main([*args, "--out", str(out)]) == 0
    assert "SVD energy kept" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {}
    assert "Truncated SVD kept" in (out / "README.md").read_text()
    _merged_weights(made["base"], out)  # loads cleanly


def test_incompatible_or_broken_inputs_are_one_line(
    made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    narrow = tmp_path / "narrow"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(made["base"]),
        LoraConfig(r=2, target_modules=["q_proj"]),
    )
    model.save_pretrained(narrow)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 30)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    other_base = tmp_path / "other-base"
    shutil.copytree(made["a"], other_base)
    config = json.loads((other_base / "adapter_config.json").read_text())
    (other_base / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "someone/else-7b"})
    )
    cases = [
        ([str(made["a"]), str(other_base)], "different base models"),
        ([str(made["a"]), str(narrow)], "different modules"),
        ([str(made["a"]), str(broken)], "unreadable adapter"),
        ([str(made["a"]), str(tmp_path / "nowhere")], "not a PEFT adapter directory"),
    ]
    # what the set-up above printed is not the command's: a worker where no command ran yet
    # still has transformers' progress bars on, and its from_pretrained drew one
    capsys.readouterr()
    for sources, message in cases:
        assert main(["merge", *sources, "--method", "linear", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not (tmp_path / "x").exists()
    assert main(["merge", str(made["a"]), "--method", "cat", "--out", str(full)]) == 2
    assert (full / "keep.txt").read_text() == "mine"
    assert main(["merge", str(made["a"]), "--method", "slerp", "--out", str(tmp_path / "y")]) == 2
    assert "unknown merge method" in capsys.readouterr().err


def test_swarm_model_card_fingerprints_must_agree(made: dict[str, Path]) -> None:
    first, second = read_adapter(made["a"]), read_adapter(made["b"])
    first.fingerprint, second.fingerprint = "1" * 64, "2" * 64
    with pytest.raises(AdapterError, match="different base models"):
        check_same_base([first, second])
    second.fingerprint = "1" * 64
    check_same_base([first, second])
