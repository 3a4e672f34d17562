"""`swarmtune merge`: PEFT LoRA adapter directories in, one merged PEFT adapter directory out.

Reads any PEFT LoRA adapter (not only this swarm's): scaling alpha/r (alpha/sqrt(r) with
rslora) and rank_pattern/alpha_pattern are honoured. The output bakes the scaling into the
factors: lora_alpha = r for every module (alpha_pattern = rank_pattern where ranks differ),
use_rslora false, so plain PeftModel.from_pretrained gives exactly the merged dW.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from swarmtune.aggregation.merge import MergedAdapter, MergeOptions, merge_adapters
from swarmtune.aggregation.taskvec import LoraFactors
from swarmtune.node.adapters.adapter import AdapterError, ModelCard, peft_dir_files
from swarmtune.protocols.transfer import write_dir_atomically

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(\.[^.]+)?\.weight$")
PEFT_PREFIX = "base_model.model."


def lora_parts(
    tensors: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": tensor, "B": tensor} from PEFT LoRA names (`...lora_A[.adapter].weight`);
    names must start with `prefix`, which is removed from the module name."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match and key.startswith(prefix):
            parts.setdefault(match["module"][len(prefix) :], {})[match["part"]] = value
    return parts


_FINGERPRINT = re.compile(r"base fingerprint[^`]*`([0-9a-f]{64})`")


@dataclass
class PeftAdapter:
    """One adapter directory read from disk."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraFactors]
    fingerprint: str | None


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies when it matches the end of the module name."""
    for key, value in pattern.items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_adapter(path: Path) -> PeftAdapter:
    """Load an adapter directory (adapter_config.json, adapter_model.safetensors, README.md)."""
    files = {}
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        try:
            files[name] = (path / name).read_bytes()
        except FileNotFoundError:
            if name != "README.md":
                raise AdapterError(
                    f"{path}: not a PEFT adapter directory ({name} missing)"
                ) from None
        except OSError as exc:
            raise AdapterError(f"{path}: unreadable adapter ({type(exc).__name__})") from None
    return parse_adapter(files, path)


def parse_adapter(files: dict[str, bytes], path: Path) -> PeftAdapter:
    """Per-module factors from the bytes of an adapter's files (`path` names it in errors)."""
    try:
        config = json.loads(files["adapter_config.json"])
        tensors = st_load(files["adapter_model.safetensors"])
    except KeyError as exc:
        raise AdapterError(f"{path}: not a PEFT adapter ({exc.args[0]} missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable adapter ({type(exc).__name__})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{path}: not a LoRA adapter config")
    parts = lora_parts({k: v.float() for k, v in tensors.items()}, PEFT_PREFIX)
    if not parts:
        raise AdapterError(f"{path}: no LoRA A/B tensors in adapter_model.safetensors")
    modules = {m: _factors(path, m, p, config) for m, p in sorted(parts.items())}
    readme = files.get("README.md", b"").decode(errors="replace")
    found = _FINGERPRINT.search(readme)
    return PeftAdapter(path, config, modules, found.group(1) if found else None)


def _factors(path: Path, module: str, parts: dict[str, torch.Tensor], config: dict) -> LoraFactors:
    if set(parts) != {"A", "B"}:
        raise AdapterError(f"{path}: {module} has lora_{''.join(parts)} but not both A and B")
    a, b = parts["A"], parts["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"{path}: {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not chain"
        )
    rank = int(
        _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", a.shape[0]))
    )
    alpha = float(
        _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    )
    if rank != a.shape[0]:
        raise AdapterError(f"{path}: {module} has rank {a.shape[0]} but the config says {rank}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"{path}: {module} is not finite")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraFactors(a, b, scaling)


def check_same_base(adapters: list[PeftAdapter]) -> None:
    """Refuse adapters trained on different bases (fingerprints, else recorded base names)."""
    prints = {a.fingerprint for a in adapters if a.fingerprint}
    if len(prints) > 1:
        raise AdapterError(
            f"adapters were trained on different base models (fingerprints {sorted(p[:12] for p in prints)})"
        )
    names = {str(a.config.get("base_model_name_or_path") or "") for a in adapters} - {""}
    if len(names) > 1 and not prints:
        raise AdapterError(f"adapters name different base models: {sorted(names)}")


def output_files(
    merged: MergedAdapter, sources: list[PeftAdapter], method: str, weights: list[float]
) -> dict[str, bytes]:
    """adapter_config.json, adapter_model.safetensors and README.md for the merged adapter."""
    ranks = {m: f.rank for m, f in merged.modules.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in ranks.items() if r != common}
    tensors = {}
    for module, f in merged.modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = (f.A * f.scaling).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = f.B.contiguous()
    first = sources[0].config
    config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in merged.modules}),
        "inference_mode": True,
    }
    return peft_dir_files(tensors, config, _card(merged, sources, method, weights))


def _card(
    merged: MergedAdapter, sources: list[PeftAdapter], method: str, weights: list[float]
) -> ModelCard:
    rows = "\n".join(
        f"| {s.path} | {w:g} | `{(s.fingerprint or '-')[:16]}` |"
        for s, w in zip(sources, weights, strict=True)
    )
    energy = (
        f"Truncated SVD kept {min(merged.energy.values()):.4f}-{max(merged.energy.values()):.4f}"
        " of the squared singular values per module."
        if merged.energy
        else "Exact merge: no truncation."
    )
    fingerprint = next((s.fingerprint for s in sources if s.fingerprint), None)
    base = (
        ("base fingerprint (sha256 of weights)", f"`{fingerprint}`")
        if fingerprint
        else ("base", "see adapter_config.json")
    )
    notes = (
        "| source | weight | base fingerprint |\n|---|---|---|\n"
        f"{rows}\n\n{energy} Scaling is baked into the factors (lora_alpha = r)."
    )
    return ModelCard(
        f"Merged LoRA adapter ({method})",
        ("swarmtune", "lora", "merge"),
        (("method", method), base),
        notes,
    )


def merge_dirs(
    paths: list[Path],
    method: str,
    out: Path,
    weights: list[float] | None,
    rank: int | None,
    options: MergeOptions,
) -> MergedAdapter:
    """Read, check, merge and write atomically; returns the merge (for its energy report)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterError(f"refusing to write into {out}: it exists and is not empty")
    sources = [read_adapter(p) for p in paths]
    check_same_base(sources)
    weights = weights or [1.0] * len(sources)
    try:
        merged = merge_adapters([s.modules for s in sources], method, weights, rank, options)
    except (ValueError, KeyError) as exc:
        raise AdapterError(str(exc).strip("'\"")) from None
    write_dir_atomically(output_files(merged, sources, method, weights), out)
    return merged
