"""The outer optimizer's share of a group state: loaded with the run's hyperparameters, and
checked before a state from another peer (or a checkpoint) is used (docs/design.md, 8. Trust,
item 9).

A state carries the outer optimizer's buffers (momentum, Adam moments, the GHBM ring) and its
scalars. A hostile peer chooses every byte of it, so `check_outer` accepts exactly what the
configured optimizer itself writes: the same fields, the same scalar values after loading,
one tensor per adapter parameter with that parameter's shape, everything finite, and a step
from it that stays finite. `state_cap` is how large an honest state blob can be, so that a
fetch stops there instead of at a generic limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from swarmtune.aggregation.methods import make_outer
from swarmtune.aggregation.outer import OuterOptimizer, RoundContext
from swarmtune.node.config import RunConfig
from swarmtune.node.engine.state import MAX_OFFENDERS, GroupState, StateError

HEADER_ROOM = 1 << 20  # safetensors header and the round's scalars
OFFENCE_ROOM = MAX_OFFENDERS * (128 + 64 * 12)  # the largest offence record decode_state takes
FILL_STEPS = 64  # steps on zeros to reach an optimizer's largest state (the GHBM ring)


def load_outer(state: GroupState, config: RunConfig) -> OuterOptimizer:
    """The configured outer optimizer with the group's saved state. Hyperparameters come from
    the run's config (the signed manifest), never from a state: a state from another peer
    could otherwise turn descent into ascent. StateError when the saved state does not fit."""
    outer = make_outer(config.outer.name, **config.outer.hyperparameters())
    if state.outer_state:
        configured = outer.state_dict()
        fixed = _fixed(config, configured)
        try:
            outer.load_state_dict({**state.outer_state, **{k: configured[k] for k in fixed}})
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise StateError(
                f"outer optimizer state does not fit ({type(exc).__name__}: {exc})"
            ) from None
    return outer


def check_outer(state: GroupState, config: RunConfig) -> None:
    """StateError unless the outer state is exactly what the configured optimizer writes (see
    the module docstring) and a step from it is finite: a state from elsewhere must never
    crash a round, or a restart from its checkpoint."""
    saved = _layout(state.outer_state)
    _check_finite(saved[1])
    zeros = {k: torch.zeros_like(v) for k, v in state.params.items()}
    try:
        outer = load_outer(state, config)
        written = outer.state_dict()
        fixed, again = _fixed(config, written), _layout(written)
        if saved[0].keys() != again[0].keys() or _without(saved[1], fixed) != _without(
            again[1], fixed
        ):
            raise StateError("outer optimizer state holds fields its optimizer does not write")
        _check_shapes(saved[0], state.params)
        outer.inner_correction(state.params, config.inner.steps)
        new = outer.step(state.params, zeros, RoundContext(2, 2))
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise StateError(f"outer optimizer state is unusable ({type(exc).__name__})") from None
    if not all(torch.isfinite(v).all() for v in new.values()):
        raise StateError("outer optimizer state gives a non-finite step")


def state_cap(shapes: Mapping[str, torch.Size], config: RunConfig) -> int:
    """The most bytes an honest state blob of this run can take: the adapter in fp32, the
    outer optimizer's largest state (found by stepping it on zeros until it stops growing),
    the largest offence record, and header room."""
    params = {k: torch.zeros(shape) for k, shape in shapes.items()}
    outer = make_outer(config.outer.name, **config.outer.hyperparameters())
    largest = 0
    for _ in range(FILL_STEPS):
        params = outer.step(params, params, RoundContext(1, 1))
        size = sum(4 * t.numel() for t in _layout(outer.state_dict())[0].values())
        if size == largest:
            break
        largest = max(largest, size)
    adapter = sum(4 * math.prod(shape) for shape in shapes.values())
    return adapter + largest + OFFENCE_ROOM + HEADER_ROOM


def _fixed(config: RunConfig, configured: Mapping[str, Any]) -> set[str]:
    """The state fields the config decides (hyperparameters), which a saved state never sets."""
    return (set(config.outer.hyperparameters()) | {"form"}) & set(configured)


def _layout(
    tree: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, torch.Size], dict[str, Any]]:
    """Tensor paths with their shapes, and the tree of everything else."""
    tensors: dict[str, torch.Size] = {}
    scalars: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            tensors[path] = value.shape
        elif isinstance(value, Mapping):
            inner_tensors, inner_scalars = _layout(value, path)
            tensors.update(inner_tensors)
            if inner_scalars or not inner_tensors:
                scalars[str(key)] = inner_scalars
        else:
            scalars[str(key)] = value
    return tensors, scalars


def _without(scalars: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in scalars.items() if k not in keys}


def _check_finite(scalars: Any) -> None:
    if isinstance(scalars, Mapping):
        for value in scalars.values():
            _check_finite(value)
    elif isinstance(scalars, float) and not math.isfinite(scalars):
        raise StateError("outer optimizer state holds a non-finite number")


def _check_shapes(tensors: Mapping[str, torch.Size], params: Mapping[str, torch.Tensor]) -> None:
    """Every group of outer tensors is one per adapter parameter, with its shape."""
    groups: dict[str, dict[str, torch.Size]] = {}
    for path, shape in tensors.items():
        parent, _, name = path.rpartition("/")
        groups.setdefault(parent, {})[name] = shape
    for parent, group in groups.items():
        if set(group) != set(params):
            raise StateError(f"outer optimizer tensors under {parent!r} are not the adapter's")
        for name, shape in group.items():
            if shape != params[name].shape:
                raise StateError(f"outer optimizer tensor {parent}/{name} has shape {tuple(shape)}")
