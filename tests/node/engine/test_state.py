"""Group-state codec: exact round trip, digest semantics, rejection of bad blobs."""

import pytest
import torch

from swarmtune.aggregation.ghbm import GHBMOuter
from swarmtune.aggregation.outer import MomentumOuter, RoundContext
from swarmtune.node.engine.state import GroupState, StateError, decode_state, encode_state


def _state() -> GroupState:
    gen = torch.Generator().manual_seed(0)
    params = {
        "layer.lora_A": torch.randn(4, 8, generator=gen),
        "layer.lora_B": torch.randn(8, 4, generator=gen),
    }
    outer = MomentumOuter()
    new = outer.step(
        params, {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}, RoundContext()
    )
    return GroupState(3, new, outer.state_dict())


def test_round_trip_is_exact_and_keeps_the_digest() -> None:
    state = _state()
    back = decode_state(encode_state(state), {k: v.shape for k, v in state.params.items()})
    assert back.round == 3 and back.digest() == state.digest()
    assert torch.equal(
        back.outer_state["buffer"]["layer.lora_A"], state.outer_state["buffer"]["layer.lora_A"]
    )
    restored = MomentumOuter()
    restored.load_state_dict(back.outer_state)
    assert restored.momentum == 0.9


def test_digest_covers_round_params_and_outer_state() -> None:
    state = _state()
    bumped_buffer = {
        **state.outer_state,
        "buffer": {k: v + 1 for k, v in state.outer_state["buffer"].items()},
    }
    assert GroupState(4, state.params, state.outer_state).digest() != state.digest()
    assert GroupState(3, state.params, bumped_buffer).digest() != state.digest()


@pytest.mark.parametrize("blob", [b"", b"\x00" * 16, b"garbage that is not safetensors"])
def test_corrupt_blob_is_rejected(blob: bytes) -> None:
    with pytest.raises(StateError, match="corrupt"):
        decode_state(blob)


def test_wrong_shapes_and_non_finite_are_rejected() -> None:
    state = _state()
    with pytest.raises(StateError, match="shape"):
        decode_state(
            encode_state(state),
            {"layer.lora_A": torch.Size([4, 9]), "layer.lora_B": torch.Size([8, 4])},
        )
    state.params["layer.lora_A"][0, 0] = float("nan")
    with pytest.raises(StateError, match="NaN"):
        decode_state(encode_state(state))


def test_ghbm_history_ring_survives_the_codec() -> None:
    params = _state().params
    outer = GHBMOuter(tau="auto", tau_max=3)
    for step in range(5):
        delta = {k: torch.full_like(v, 0.1 * (step + 1)) for k, v in params.items()}
        params = outer.step(params, delta, RoundContext(2, 8))
    state = GroupState(5, params, outer.state_dict())
    back = decode_state(encode_state(state))
    assert back.digest() == state.digest()
    restored = GHBMOuter()
    restored.load_state_dict(back.outer_state)
    assert restored.auto and restored.tau == outer.tau and len(restored.history) == 4
    for old, new in zip(outer.history, restored.history, strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)
