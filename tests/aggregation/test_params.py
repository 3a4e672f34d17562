"""Pseudo-gradient algebra, checksums and hashes."""

import pytest
import torch

from swarmtune.aggregation.params import pseudo_gradient, state_hash, weighted_mean


def _p(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_pseudo_gradient_is_start_minus_end() -> None:
    delta = pseudo_gradient(_p(1.0, 2.0), _p(0.5, 3.0))
    assert torch.equal(delta["w"], torch.tensor([0.5, -1.0]))


def test_pseudo_gradient_rejects_mismatched_names() -> None:
    with pytest.raises(KeyError):
        pseudo_gradient({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_weighted_mean_uses_the_members_weights() -> None:
    mean = weighted_mean([_p(0.0, 4.0), _p(4.0, 0.0)], [1.0, 3.0])
    assert torch.equal(mean["w"], torch.tensor([3.0, 1.0]))  # small integers: exact in float64


@pytest.mark.parametrize("weights", [[0.0, 0.0], [-1.0, 2.0]])
def test_weighted_mean_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError):
        weighted_mean([_p(1.0), _p(2.0)], weights)


def test_state_hash_sensitive_to_one_ulp_and_names() -> None:
    base = _p(1.0, 2.0)
    bumped = {"w": torch.nextafter(base["w"], torch.full_like(base["w"], 9.0))}
    assert state_hash(base) == state_hash({"w": base["w"].clone()})
    assert state_hash(base) != state_hash(bumped)
    assert state_hash(base) != state_hash({"v": base["w"]})
