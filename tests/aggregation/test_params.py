"""Pseudo-gradient algebra, checksums and hashes."""

import pytest
import torch

from aggregation.params import (
    projection_checksum,
    pseudo_gradient,
    round_like_codec,
    state_hash,
    weighted_mean,
)


def _p(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_pseudo_gradient_is_start_minus_end() -> None:
    delta = pseudo_gradient(_p(1.0, 2.0), _p(0.5, 3.0))
    assert torch.equal(delta["w"], torch.tensor([0.5, -1.0]))


def test_pseudo_gradient_rejects_mismatched_names() -> None:
    with pytest.raises(KeyError):
        pseudo_gradient({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_weighted_mean_uses_token_weights() -> None:
    mean = weighted_mean([_p(0.0, 4.0), _p(4.0, 0.0)], [1.0, 3.0])
    assert torch.allclose(mean["w"], torch.tensor([3.0, 1.0]))


@pytest.mark.parametrize("weights", [[0.0, 0.0], [-1.0, 2.0]])
def test_weighted_mean_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError):
        weighted_mean([_p(1.0), _p(2.0)], weights)


def test_checksum_commutes_with_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = [
        {"a": torch.randn(8, 4, generator=gen), "b": torch.randn(3, generator=gen)}
        for _ in range(3)
    ]
    weights = [2.0, 5.0, 1.0]
    expected = sum(
        w * projection_checksum(d, 7) for d, w in zip(deltas, weights, strict=True)
    ) / sum(weights)
    assert projection_checksum(weighted_mean(deltas, weights), 7) == pytest.approx(
        expected, rel=1e-6
    )
    assert projection_checksum(deltas[0], 7) != pytest.approx(projection_checksum(deltas[1], 7))


def test_state_hash_sensitive_to_one_ulp_and_names() -> None:
    base = _p(1.0, 2.0)
    bumped = {"w": torch.nextafter(base["w"], torch.full_like(base["w"], 9.0))}
    assert state_hash(base) == state_hash({"w": base["w"].clone()})
    assert state_hash(base) != state_hash(bumped)
    assert state_hash(base) != state_hash({"v": base["w"]})


def test_round_like_codec_fp16_is_idempotent() -> None:
    x = {"w": torch.tensor([0.1, 1.0 / 3.0])}
    once = round_like_codec(x, "fp16")
    assert not torch.equal(once["w"], x["w"])
    assert torch.equal(round_like_codec(once, "fp16")["w"], once["w"])
