"""The harness's plain-PEFT checks fail when they should (fast: no swarm)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from swarm_harness import assert_lora_weights_are_the_files, load_with_plain_peft  # noqa: E402

from swarmtune.node.local.basemodel import export_base  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("harness")
    base = export_base(root / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def _copy_with(source: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    out.mkdir()
    (out / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def test_an_intact_adapter_passes(made: tuple[Path, Path]) -> None:
    base, adapter = made
    assert_lora_weights_are_the_files(load_with_plain_peft(base, adapter), adapter)


def test_a_missing_key_fails_the_load(made: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base, adapter = made
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    del tensors[sorted(tensors)[0]]
    with pytest.raises(AssertionError, match="missing adapter keys"):
        load_with_plain_peft(base, _copy_with(adapter, tmp_path / "short", tensors))


def test_a_changed_tensor_fails_the_comparison(made: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base, adapter = made
    model = load_with_plain_peft(base, adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.nextafter(tensors[first], torch.full_like(tensors[first], 9.0))
    with pytest.raises(AssertionError, match="lora"):
        assert_lora_weights_are_the_files(model, _copy_with(adapter, tmp_path / "other", tensors))


@pytest.mark.slow
def test_sigusr1_prints_every_stack_and_the_peer_goes_on(tmp_path: Path) -> None:
    """How a hung peer is diagnosed (and what the harness does on a start or exit timeout)."""
    from swarm_harness import Swarm, dump_stacks

    swarm = Swarm(tmp_path)
    try:
        swarm.start_coordinator()
        # its address file appears while `announce` still syncs the directory it wrote it to:
        # ask again (each dump must leave it running) until it is in its serving loop
        asked, log = 0, ""
        while asked < 10 and "serve_until_stopped" not in log:
            dump_stacks(swarm.procs["coord"].pid)
            asked += 1
            log = swarm.log("coord")
            assert swarm.procs["coord"].poll() is None, log
        # the coordinator and its forked DHT process each print theirs, every time
        assert log.count("most recent call first") >= 2 * asked, log
        assert "serve_until_stopped" in log and "hivemind/dht/dht.py" in log, log
    finally:
        swarm.close()
