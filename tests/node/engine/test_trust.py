"""Repeat offenders: offences recorded in the group state, bans derived from it, the same for
every member."""

from __future__ import annotations

import torch

from swarmtune.node.config import AdmissionSettings, parse_config
from swarmtune.node.engine.round import LocalUpdate, conclude_round
from swarmtune.node.engine.state import GroupState, decode_state, encode_state
from swarmtune.node.engine.transport import GroupResult, MemberMeta
from swarmtune.node.engine.trust import banned, record_offences
from swarmtune.node.local.trainer import InnerResult

SETTINGS = AdmissionSettings(ban_after=3, ban_rounds=10)
CONFIG = parse_config({"inner": {"steps": 2, "batch_size": 2, "seq_len": 8}})


def test_three_offences_within_the_window_ban_for_ban_rounds_after_the_last() -> None:
    record: dict[str, list[int]] = {}
    for round_ in (4, 6, 9):
        assert "x" not in banned(record, round_, SETTINGS)
        record = record_offences(record, {"x"}, round_, SETTINGS)
    assert record == {"x": [4, 6, 9]}
    why = banned(record, 10, SETTINGS)["x"]
    assert "until round 20" in why and "rounds 5, 7, 10" in why
    assert "x" in banned(record, 19, SETTINGS)
    assert "x" not in banned(record, 20, SETTINGS)


def test_offences_spread_wider_than_the_window_do_not_ban_and_old_ones_expire() -> None:
    record = record_offences({}, {"x"}, 0, SETTINGS)
    record = record_offences(record, {"x"}, 10, SETTINGS)
    record = record_offences(record, {"x"}, 11, SETTINGS)
    assert banned(record, 12, SETTINGS) == {}  # rounds 0..11 span more than 10 rounds
    record = record_offences(record, set(), 25, SETTINGS)
    assert record == {"x": [10, 11]}  # round 0 is beyond window plus ban
    assert record_offences(record, set(), 40, SETTINGS) == {}


def _update(peer: str, delta: float, weight: float = 2.0) -> LocalUpdate:
    meta = MemberMeta(peer, 3, "d" * 64, weight)  # an honest weight: its H = 2 steps
    inner = InnerResult(2, 1.0, 0.9, 0.95, 16, 0.1)
    return LocalUpdate({"w": torch.full((4,), delta)}, meta, inner)


def _state(offences: dict[str, list[int]] | None = None) -> GroupState:
    return GroupState(3, {"w": torch.zeros(4)}, {}, offences or {})


def test_an_overweight_member_is_recorded_banned_members_are_left_out_and_all_agree() -> None:
    honest = [_update(p, 0.1 * (i + 1)) for i, p in enumerate("abc")]
    liar = _update("z", -5.0, weight=1e9)
    group = GroupResult(
        [u.meta for u in [*honest, liar]], {u.meta.peer: u.delta for u in [*honest, liar]}
    )
    states = [conclude_round(_state(), u, group, CONFIG)[0] for u in honest]
    assert all(s.offences == {"z": [3]} for s in states)
    assert len({s.digest() for s in states}) == 1
    # a member that served bad contributions in three recent rounds is left out whatever it
    # sends now: the round ends exactly as if it had not come
    fair = _update("z", 0.2)
    group = GroupResult(
        [u.meta for u in [*honest, fair]], {u.meta.peer: u.delta for u in [*honest, fair]}
    )
    state, report = conclude_round(_state({"z": [0, 1, 2]}), honest[0], group, CONFIG)
    assert "z" in report.excluded and set(report.members) == {"a", "b", "c"}
    without = GroupResult([u.meta for u in honest], {u.meta.peer: u.delta for u in honest})
    alone, _ = conclude_round(_state({"z": [0, 1, 2]}), honest[0], without, CONFIG)
    assert torch.equal(state.params["w"], alone.params["w"]) and state.digest() == alone.digest()


def test_offences_travel_with_the_encoded_state_and_change_its_digest() -> None:
    state = _state({"z": [1, 2]})
    back = decode_state(encode_state(state))
    assert back.offences == {"z": [1, 2]} and back.digest() == state.digest()
    assert state.digest() != _state().digest()
