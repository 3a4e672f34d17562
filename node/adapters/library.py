"""A routed library: every cluster adapter of a run in one directory, routed by PEFT's Arrow.

`swarmtune pull --adapter library` writes each cluster's adapter (verified like any pulled
adapter) into its own PEFT directory, `cluster-N/`, beside a `library.json` that lists them and a
README with the plain PEFT code that loads them as one routed model: `peft.create_arrow_model`
(Arrow: Ostapenko et al. 2024, arXiv 2405.11157) loads every expert and adds a router that, per
token and per LoRA layer, ranks the experts by how well their top right singular vector (the
prototype of what each expert does to its input) matches the token's hidden state, and mixes
the top k with softmax weights. It needs no data at routing time and no training: a library
can be routed as soon as the run has clusters. Nothing here changes the adapters' bytes.

Arrow chooses per token from the weights alone. The other router here chooses per request
from the request itself: `route_by_prompt` runs the prompt through every expert and takes the
one that predicts the prompt's own tokens best (lowest next-token loss), one forward pass of
the prompt per expert; the README shows it in plain PEFT too.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from swarmtune.protocols.transfer import fsync_dir, write_dir_atomically, write_synced

if TYPE_CHECKING:
    from peft import PeftModel

LIBRARY_FILE = "library.json"
TOP_K = 3  # PEFT's default; a library of fewer experts routes among all of them
_CLUSTER = re.compile(r"cluster-(\d+)")


def library_members(names: list[str]) -> list[str]:
    """The cluster adapters among the names on offer, in cluster order."""
    found = [(int(m.group(1)), n) for n in names if (m := _CLUSTER.fullmatch(n))]
    return [n for _, n in sorted(found)]


def top_k(experts: int) -> int:
    """How many experts the router mixes per token."""
    return max(1, min(TOP_K, experts))


def readme(run_id: str, entries: list[dict[str, object]]) -> str:
    """The library's README: what it holds and how plain PEFT loads it."""
    dirs = ", ".join(f'"{e["dir"]}"' for e in entries)
    rows = "\n".join(f"| {e['dir']} | {e['round']} | {str(e['sha256'])[:12]}… |" for e in entries)
    return f"""# Routed library of run `{run_id}`

Every cluster adapter of the run, each a PEFT LoRA directory verified on download
(`swarmtune pull` checked its round certificate or the coordinator's signature), routed among
per token by PEFT's Arrow router (no training, no data needed to route).

| adapter | round | sha256 |
|---|---|---|
{rows}

Load it with plain PEFT (0.21 or newer, as swarmtune requires), from inside this
directory:

```python
from peft import ArrowConfig, create_arrow_model
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("PATH/TO/BASE")  # the run's base model
model = create_arrow_model(
    base_model=base,
    task_specific_adapter_paths=[{dirs}],
    arrow_config=ArrowConfig(top_k={top_k(len(entries))}, router_temperature=1.0),
)
```

Or route each request to one expert, the one that predicts the prompt itself best (one
forward pass of the prompt per expert):

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("PATH/TO/BASE")  # a fresh copy of the base
names = [{dirs}]
model = PeftModel.from_pretrained(base, names[0], adapter_name=names[0])
for name in names[1:]:
    model.load_adapter(name, adapter_name=name)

@torch.no_grad()
def route(input_ids):  # input_ids: the tokenized prompt, shape (1, n)
    losses = {{}}
    for name in names:
        model.set_adapter(name)
        losses[name] = model(input_ids=input_ids, labels=input_ids).loss.item()
    model.set_adapter(min(losses, key=losses.get))
```

Each `cluster-N` directory also loads on its own with `PeftModel.from_pretrained`.
"""


@torch.no_grad()
def token_losses(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(rows, n - 1): each row's next-token cross-entropy at every position."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), input_ids[:, 1:], reduction="none"
    )


@torch.no_grad()
def route_by_prompt(model: PeftModel, experts: Sequence[str], input_ids: torch.Tensor) -> list[str]:
    """For each row of `input_ids` (prompts of equal length), the expert (an adapter name
    loaded in `model`) with the lowest mean next-token loss on it. Leaves the last expert
    active."""
    scores = []
    for name in experts:
        model.set_adapter(name)
        scores.append(token_losses(model, input_ids).mean(dim=1))
    best = torch.stack(scores, dim=1).argmin(dim=1)
    return [experts[int(i)] for i in best]


def write_library(
    out: Path, run_id: str, adapters: Mapping[str, tuple[Mapping[str, bytes], dict[str, object]]]
) -> None:
    """Write `adapters` (name -> (adapter files, what to record about it: round, sha256, what
    was verified)) as a library in the fresh directory `out`, all at once or not at all."""
    if not adapters:
        raise ValueError("a library needs at least one adapter")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"refusing to write into {out}: it exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = []
        for name, (files, info) in adapters.items():
            write_dir_atomically(files, tmp / name)
            entries.append({"dir": name, **info})
        listing = {"run_id": run_id, "router": "arrow", "top_k": top_k(len(entries))}
        listing["adapters"] = entries
        write_synced(tmp / LIBRARY_FILE, (json.dumps(listing, indent=1) + "\n").encode())
        write_synced(tmp / "README.md", readme(run_id, entries).encode())
        tmp.chmod(0o755)
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        fsync_dir(out.parent)  # the rename itself survives a power loss
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
