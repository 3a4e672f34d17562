"""Group state (theta^t, outer-optimizer state, round) and its safe wire/disk encoding.

Encoded with safetensors plus a JSON header, never pickle: state arrives from untrusted peers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from swarmtune.aggregation.params import Params, state_hash

MAX_OFFENDERS = 10_000


class StateError(ValueError):
    """A state blob that cannot be used (corrupt, wrong shapes, not finite); one clear line."""


@dataclass
class GroupState:
    """theta^round, the outer optimizer's state after `round` outer steps, and the rounds in
    which members served provably bad contributions (node/engine/trust.py)."""

    round: int
    params: Params
    outer_state: dict[str, Any] = field(default_factory=dict)
    offences: dict[str, list[int]] = field(default_factory=dict)

    def digest(self) -> str:
        """sha256 of round, params, outer state and offences: equal digests mean identical
        group state."""
        tensors, scalars = _split(self.outer_state, "outer")
        body = state_hash({**{f"params/{k}": v for k, v in self.params.items()}, **tensors})
        fields: dict[str, Any] = {"round": self.round, "outer": scalars}
        if self.offences:  # absent when empty: digests of runs without offences are unchanged
            fields["offences"] = self.offences
        header = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(f"{header}|{body}".encode()).hexdigest()


def _split(tree: Mapping[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten nested dicts into '/'-joined tensor entries and a JSON-able scalar tree."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for key, value in tree.items():
        if "/" in str(key):
            raise StateError(f"state key {key!r} contains '/'")
        path = f"{prefix}/{key}"
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().contiguous().float()
        elif isinstance(value, Mapping):
            sub_tensors, sub_scalars = _split(value, path)
            tensors.update(sub_tensors)
            scalars[str(key)] = sub_scalars
        else:
            scalars[str(key)] = value
    return tensors, scalars


def _nest(
    tensors: Mapping[str, torch.Tensor], scalars: dict[str, Any], prefix: str
) -> dict[str, Any]:
    tree: dict[str, Any] = json.loads(json.dumps(scalars))
    for path, tensor in tensors.items():
        if not path.startswith(prefix + "/"):
            continue
        node = tree
        *parents, leaf = path[len(prefix) + 1 :].split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return tree


def encode_state(state: GroupState) -> bytes:
    """GroupState -> bytes (safetensors with the round and scalars in its metadata)."""
    outer_tensors, outer_scalars = _split(state.outer_state, "outer")
    tensors = {f"params/{k}": v.detach().contiguous().float() for k, v in state.params.items()}
    meta = {"round": str(state.round), "outer": json.dumps(outer_scalars, sort_keys=True)}
    if state.offences:
        meta["offences"] = json.dumps(state.offences, sort_keys=True)
    return st_save({**tensors, **outer_tensors}, metadata=meta)


def decode_state(blob: bytes, expect: Mapping[str, torch.Size] | None = None) -> GroupState:
    """bytes -> GroupState, checking names and shapes against `expect` and finiteness."""
    try:
        tensors = st_load(blob)
        meta = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")]).get("__metadata__", {})
        round_ = int(meta["round"])
        outer_scalars = json.loads(meta["outer"])
        offences = _offences(json.loads(meta.get("offences", "{}")))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt blob
        raise StateError(f"corrupt state blob ({type(exc).__name__})") from None
    params = {k[len("params/") :]: v for k, v in tensors.items() if k.startswith("params/")}
    if expect is not None:
        check_params(params, expect)
    if any(not torch.isfinite(t).all() for t in tensors.values()):
        raise StateError("state contains NaN or Inf")
    if round_ < 0:
        raise StateError(f"negative round {round_}")
    return GroupState(round_, params, _nest(tensors, outer_scalars, "outer"), offences)


def _offences(raw: Any) -> dict[str, list[int]]:
    """peer -> offence rounds from untrusted JSON; ValueError when it is anything else."""
    if not isinstance(raw, dict) or len(raw) > MAX_OFFENDERS:
        raise ValueError("offences")
    for peer, rounds in raw.items():
        if not (isinstance(peer, str) and len(peer) <= 128 and isinstance(rounds, list)):
            raise ValueError("offences")
        if len(rounds) > 64 or not all(type(r) is int and r >= 0 for r in rounds):
            raise ValueError("offences")
    return raw


def check_params(params: Mapping[str, torch.Tensor], expect: Mapping[str, torch.Size]) -> None:
    """Raise StateError unless names and shapes match exactly."""
    if set(params) != set(expect):
        missing, extra = sorted(set(expect) - set(params)), sorted(set(params) - set(expect))
        raise StateError(f"parameter names differ (missing {missing[:2]}, unexpected {extra[:2]})")
    for name, shape in expect.items():
        if tuple(params[name].shape) != tuple(shape):
            raise StateError(f"{name}: shape {tuple(params[name].shape)} != {tuple(shape)}")
