"""The routed library (`pull --adapter library`): written atomically, loaded by plain PEFT's
Arrow exactly as its README says, and routing among experts as Arrow defines it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import ArrowConfig, LoraConfig, PeftModel, create_arrow_model, get_peft_model
from transformers import AutoModelForCausalLM

from swarmtune.node.adapters.library import (
    library_members,
    route_by_prompt,
    token_losses,
    top_k,
    write_library,
)
from swarmtune.node.local.basemodel import export_base

TARGETS = ["q_proj", "v_proj"]
EPS32 = torch.finfo(torch.float32).eps


def _adapter_files(base_dir: Path, seed: int, where: Path, scale: float = 0.2) -> dict[str, bytes]:
    """A plain PEFT adapter on the embedded base, random LoRA factors (x `scale`), as its files
    (a large scale makes an adapter that wrecks every prediction)."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(where)
    return {f.name: f.read_bytes() for f in where.iterdir() if f.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("library")
    base_dir = Path(export_base(root / "base"))
    files = {i: _adapter_files(base_dir, i, root / f"src{i}") for i in range(2)}
    return {"root": root, "base": base_dir, "files": files}


def _info(i: int) -> dict[str, object]:
    return {"round": 10 + i, "sha256": f"{i}" * 64, "verified": "test"}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _readme_paths(library: Path) -> list[str]:
    text = (library / "README.md").read_text()
    found = re.search(r"task_specific_adapter_paths=\[(.*?)\]", text)
    assert found is not None, text
    return [p.strip().strip('"') for p in found.group(1).split(",")]


def test_only_cluster_adapters_in_cluster_order_make_a_library() -> None:
    names = ["global", "cluster-10", "merged", "cluster-2", "cluster-x", "cluster-0"]
    assert library_members(names) == ["cluster-0", "cluster-2", "cluster-10"]
    assert [top_k(n) for n in (1, 2, 3, 7)] == [1, 2, 3, 3]


def test_the_library_loads_in_plain_peft_as_its_readme_says(
    made: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = made["root"] / "lib"
    adapters = {f"cluster-{i}": (made["files"][i], _info(i)) for i in range(2)}
    write_library(out, "run-x", adapters)
    listing = json.loads((out / "library.json").read_text())
    assert [e["dir"] for e in listing["adapters"]] == ["cluster-0", "cluster-1"]
    assert listing["router"] == "arrow" and listing["top_k"] == 2
    for i in range(2):  # each expert is its adapter's files, byte for byte
        for name, data in made["files"][i].items():
            assert (out / f"cluster-{i}" / name).read_bytes() == data
    paths = _readme_paths(out)
    assert paths == ["cluster-0", "cluster-1"]
    monkeypatch.chdir(out)  # the README's code runs from inside the library
    base = AutoModelForCausalLM.from_pretrained(made["base"])
    routed = create_arrow_model(base, paths, ArrowConfig(top_k=2, router_temperature=1.0))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    got = _logits(routed, ids)
    plain = _logits(AutoModelForCausalLM.from_pretrained(made["base"]), ids)
    assert torch.isfinite(got).all() and not torch.allclose(got, plain)


def test_a_library_of_one_expert_twice_routes_to_exactly_that_expert(made: dict) -> None:
    """Arrow mixes its top k experts with softmax weights that sum to 1: two copies of one
    adapter must give that adapter's own output (an independent check that the library's
    directories are what the router loads)."""
    out = made["root"] / "twice"
    same = made["files"][0]
    write_library(out, "run-x", {"cluster-0": (same, _info(0)), "cluster-1": (same, _info(1))})
    ids = torch.tensor([[2, 8, 4, 11, 6]])
    base = AutoModelForCausalLM.from_pretrained(made["base"])
    routed = create_arrow_model(
        base, [str(out / "cluster-0"), str(out / "cluster-1")], ArrowConfig(top_k=2)
    )
    single = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(made["base"]), out / "cluster-0"
    )
    want, got = _logits(single, ids), _logits(routed, ids)
    scale = want.abs().max().item()
    assert torch.allclose(got, want, rtol=0, atol=64 * EPS32 * max(scale, 1.0))


def test_a_library_is_written_whole_or_not_at_all(made: dict) -> None:
    out = made["root"] / "broken"
    bad = {"../escape": b"x"}
    with pytest.raises(Exception, match="refusing to write"):
        write_library(
            out, "run-x", {"cluster-0": (made["files"][0], _info(0)), "cluster-1": (bad, _info(1))}
        )
    assert not out.exists()
    assert not [p for p in made["root"].iterdir() if p.name.startswith(".broken")]
    taken = made["root"] / "taken"
    (taken / "x").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        write_library(taken, "run-x", {"cluster-0": (made["files"][0], _info(0))})


def test_prompt_routing_picks_the_expert_that_predicts_the_prompt_and_the_readme_agrees(
    made: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrecking expert beside a mild one: every prompt goes to the mild one, in either order;
    the per-token losses average to transformers' own loss; and the README's plain-PEFT routing
    code, run as written, activates the same expert."""
    out = made["root"] / "routed"
    wreck = _adapter_files(made["base"], 7, made["root"] / "wreck", scale=3.0)
    write_library(
        out, "run-x", {"cluster-0": (wreck, _info(0)), "cluster-1": (made["files"][0], _info(1))}
    )
    base = AutoModelForCausalLM.from_pretrained(made["base"])
    model = PeftModel.from_pretrained(base, out / "cluster-0", adapter_name="cluster-0")
    model.load_adapter(out / "cluster-1", adapter_name="cluster-1")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2], [4, 4, 8, 1, 12, 6, 9]])
    assert route_by_prompt(model, ["cluster-0", "cluster-1"], ids) == ["cluster-1"] * 2
    assert route_by_prompt(model, ["cluster-1", "cluster-0"], ids) == ["cluster-1"] * 2
    model.set_adapter("cluster-0")
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss
    got = token_losses(model, ids).mean()
    assert torch.allclose(got, want, rtol=0, atol=64 * EPS32 * max(float(want), 1.0))
    blocks = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)
    code = blocks[1].replace('"PATH/TO/BASE"', repr(str(made["base"])))
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 (the README's own code, as a user would paste it)
    scope["route"](ids[:1])
    assert scope["model"].active_adapter == "cluster-1"
