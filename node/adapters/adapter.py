"""The files a consumer gets: a PEFT adapter directory with a model card."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as st_save

from swarmtune.aggregation.params import state_hash

if TYPE_CHECKING:  # peft costs seconds to import; `pull` and `status` never need it
    from peft import PeftModel

    from swarmtune.node.local.trainer import InnerTrainer

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
_PEFT_NAME = re.compile(r"\.lora_([AB])\.[^.]+\.weight$")


class AdapterError(ValueError):
    """An adapter that would not load cleanly in PEFT; one line."""


@dataclass(frozen=True)
class Provenance:
    """Where an adapter came from, for its model card."""

    run_id: str
    round: int
    peers: int
    method: str
    base_fingerprint: str
    base_model: str


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """PEFT-format LoRA tensors (base_model.model.<module>.lora_A/B.weight), checked for coverage."""
    from peft import get_peft_model_state_dict

    tensors = {
        k: v.detach().float().cpu().contiguous()
        # LoRA modules only ("auto" would ask the Hub whether the vocabulary changed)
        for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }
    modules = [
        name
        for name, m in model.named_modules()
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and m.lora_A
    ]
    expected = {f"{name}.lora_{part}.weight" for name in modules for part in "AB"}
    if not modules or set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(
            f"adapter keys do not cover the LoRA modules (missing {missing[:2]}, "
            f"unexpected {extra[:2]})"
        )
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise AdapterError(f"{key} is not finite")
    return tensors


def adapter_config(model: PeftModel, base_model: str) -> dict[str, object]:
    """adapter_config.json content (sets made JSON lists, base recorded)."""
    config = model.peft_config["default"].to_dict()
    for key, value in config.items():
        if isinstance(value, set):
            config[key] = sorted(value)
    config["base_model_name_or_path"] = base_model
    config["inference_mode"] = True
    return config


@dataclass(frozen=True)
class ModelCard:
    """The README.md of an adapter dir: a title, a table of where it came from, free text."""

    title: str
    tags: tuple[str, ...]
    fields: tuple[tuple[str, str], ...]
    notes: str = ""

    def render(self, weights_sha256: str) -> str:
        """Markdown with the weights' sha256 and how to load the adapter with plain PEFT."""
        rows = [*self.fields, ("adapter_model.safetensors sha256", f"`{weights_sha256}`")]
        table = "\n".join(f"| {name} | {value} |" for name, value in rows)
        return f"""---
library_name: peft
tags: [{", ".join(self.tags)}]
---
# {self.title}

| field | value |
|---|---|
{table}

{self.notes}

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("BASE_DIR")  # swarmtune export-base --out BASE_DIR
model = PeftModel.from_pretrained(base, "THIS_DIR")
```
"""


def peft_dir_files(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, object], card: ModelCard
) -> dict[str, bytes]:
    """The three files of a PEFT adapter dir: config, weights (safetensors) and model card."""
    weights = st_save(dict(tensors), metadata={"format": "pt"})
    sha = hashlib.sha256(weights).hexdigest()
    return {
        "adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
        "adapter_model.safetensors": weights,
        "README.md": card.render(sha).encode(),
    }


def swarm_card(provenance: Provenance, config: Mapping[str, object]) -> ModelCard:
    """The card of a group adapter trained by the swarm."""
    p = provenance
    lora = f"r={config.get('r')}, alpha={config.get('lora_alpha')}, targets={config.get('target_modules')}"
    return ModelCard(
        f"swarmtune adapter `{p.run_id}` (round {p.round})",
        ("swarmtune", "lora", "diloco"),
        (
            ("run", p.run_id),
            ("round", str(p.round)),
            ("peers", str(p.peers)),
            ("method", p.method),
            ("LoRA", lora),
            ("base model", p.base_model),
            ("base fingerprint (sha256 of weights)", f"`{p.base_fingerprint}`"),
        ),
        f"Trained collaboratively by {p.peers} peer(s) with DiLoCo rounds"
        f" (outer optimizer: {p.method}).",
    )


def adapter_files(
    trainer: InnerTrainer, params: Mapping[str, torch.Tensor], provenance: Provenance
) -> dict[str, bytes]:
    """The three files of a PEFT adapter dir for the LoRA parameters `params`."""
    trainer.set_params(params)
    model = trainer.model
    config = adapter_config(model, provenance.base_model)
    return peft_dir_files(adapter_tensors(model), config, swarm_card(provenance, config))


def adapter_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of LoRA tensors under their PEFT file names, the same for a trainer's parameters
    (`...lora_A.default.weight`) and a pulled adapter file (`...lora_A.weight`): what a round
    certificate names and `pull` checks."""
    return state_hash({_PEFT_NAME.sub(r".lora_\1.weight", k): v for k, v in tensors.items()})
