"""The certificate check (node/engine/certify.py): who may vouch for a state, how many must,
and the chain back to a state the adopter holds. Each case is a forgery that must fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swarmtune.node.engine.certify import (
    Claim,
    NotCertified,
    candidates,
    quorum,
    round_body,
    verify_chain,
)
from swarmtune.node.engine.state import GroupState
from swarmtune.protocols.certificates import (
    Certificate,
    Vote,
    decode_chain,
    encode_chain,
    sign_body,
)
from swarmtune.protocols.identity import Identity, owns

RUN = "cert-test"
IDS = [Identity.generate() for _ in range(5)]
PEERS = [i.peer_id for i in IDS]


def _state(round_: int, scale: float) -> GroupState:
    return GroupState(round_, {"m.lora_A.default.weight": torch.full((2, 3), scale)}, {"lr": 1.0})


def _honest(vote: Vote) -> bool:
    return owns(vote.peer, vote.key)


def _link(before: GroupState, after: GroupState, signers: list[int], run: str = RUN) -> Certificate:
    members = [(PEERS[i], "ab" * 32, 10.0) for i in signers]
    body = round_body(run, before.digest(), after, members)
    return Certificate(body, tuple(sign_body(IDS[i], body, PEERS[i]) for i in signers))


STATES = [_state(r, 0.1 * r) for r in range(4)]
CHAIN = [_link(STATES[r], STATES[r + 1], [0, 1, 2]) for r in range(3)]
TRUSTED = {STATES[0].digest()}


def _verify(chain: list[Certificate], state: GroupState = STATES[3], **kw) -> list[Certificate]:
    args = dict(trusted=TRUSTED, newest_votes=(), population=5, may_vote=_honest)
    args.update(kw)
    return verify_chain(chain, state, RUN, **args)  # type: ignore[arg-type]


def test_quorum_is_more_than_a_quarter_and_at_least_two() -> None:
    assert [quorum(n) for n in (1, 2, 3, 4, 5, 8, 9, 100)] == [2, 2, 2, 2, 2, 3, 3, 26]
    for n in range(1, 200):  # fewer than a quarter of n can never reach it
        assert max(0, (n - 1) // 4) < quorum(n)


def test_a_quorum_chain_back_to_a_trusted_state_proves_the_state() -> None:
    proof = _verify(CHAIN)
    assert [c.body.round for c in proof] == [1, 2, 3]
    # a later trusted state shortens what must be checked, not what is passed on: a peer
    # further behind needs the older links
    weak = _link(STATES[0], STATES[1], [0])  # unchecked: we hold the state after it
    assert len(_verify([weak, *CHAIN[1:]], trusted={STATES[2].digest()})) == 3
    # the chain survives its wire form
    assert len(_verify(decode_chain(encode_chain(CHAIN)))) == 3


def test_forged_signatures_do_not_count() -> None:
    newest = CHAIN[-1]
    forged = [dataclasses.replace(v, sig=newest.votes[0].sig) for v in newest.votes]  # copied
    with pytest.raises(NotCertified, match="valid votes"):
        _verify([*CHAIN[:-1], Certificate(newest.body, tuple(forged))])
    # a vote signed by another key in a member's name (the key is not the peer's)
    stolen = sign_body(IDS[4], newest.body, PEERS[1])
    assert not _honest(stolen)
    with pytest.raises(NotCertified, match="valid votes"):
        _verify([*CHAIN[:-1], Certificate(newest.body, (newest.votes[0], stolen))])


def test_too_few_signers_for_the_population() -> None:
    two = _link(STATES[2], STATES[3], [0, 1])
    assert _verify([*CHAIN[:-1], two], population=7)  # quorum(7) = 2
    with pytest.raises(NotCertified, match="2 valid votes, 3 needed"):
        _verify([*CHAIN[:-1], two], population=8)
    one = _link(STATES[2], STATES[3], [0])
    with pytest.raises(NotCertified, match="1 valid votes"):
        _verify([*CHAIN[:-1], one], population=1)


def test_signers_not_admitted_or_banned_do_not_count() -> None:
    def not_banned(banned: set[str]):  # noqa: ANN202
        return lambda v: _honest(v) and v.peer not in banned

    _verify(CHAIN, may_vote=not_banned({PEERS[0]}))  # 2 of 3 left: quorum(5) = 2
    with pytest.raises(NotCertified, match="valid votes"):
        _verify(CHAIN, may_vote=not_banned({PEERS[0], PEERS[1]}))
    # a vote from outside the group that concluded the round does not count either
    outsider = sign_body(IDS[4], CHAIN[-1].body, PEERS[4])
    lone = _link(STATES[2], STATES[3], [0])
    with pytest.raises(NotCertified, match="1 valid votes"):
        _verify([*CHAIN[:-1], lone.with_votes([outsider])])
    # live votes (from records) complete the newest certificate
    pending = Certificate(CHAIN[-1].body, CHAIN[-1].votes[:1])
    with pytest.raises(NotCertified, match="1 valid votes"):
        _verify([*CHAIN[:-1], pending])
    assert _verify([*CHAIN[:-1], pending], newest_votes=[CHAIN[-1].votes[1]])


def test_a_broken_chain_is_refused() -> None:
    with pytest.raises(NotCertified, match="chain broken"):
        _verify([CHAIN[0], CHAIN[2]])
    with pytest.raises(NotCertified, match="does not reach"):
        _verify(CHAIN, trusted={"00" * 32})
    weak = _link(STATES[1], STATES[2], [0])  # an inner link one member vouched for
    with pytest.raises(NotCertified, match="round 2's link"):
        _verify([CHAIN[0], weak, CHAIN[2]])
    with pytest.raises(NotCertified, match="no certificate"):
        _verify([])


def test_the_certificate_must_name_the_fetched_state() -> None:
    other = _state(3, 9.0)
    with pytest.raises(NotCertified, match="does not name"):
        _verify(CHAIN, state=other)
    same_digest_other_tensors = dataclasses.replace(CHAIN[-1].body, adapter="cd" * 32)
    relinked = Certificate(
        same_digest_other_tensors,
        tuple(sign_body(IDS[i], same_digest_other_tensors, PEERS[i]) for i in range(3)),
    )
    with pytest.raises(NotCertified, match="other adapter tensors"):
        _verify([*CHAIN[:-1], relinked])


def test_a_replay_from_another_run_is_refused() -> None:
    elsewhere = [_link(STATES[r], STATES[r + 1], [0, 1, 2], run="other-run") for r in range(3)]
    with pytest.raises(NotCertified, match="run 'other-run'"):
        _verify(elsewhere)
    mixed = [elsewhere[0], *CHAIN[1:]]
    with pytest.raises(NotCertified, match="another run"):
        _verify(mixed)


def _claim(i: int, state: GroupState, cert: Certificate, vote: Vote | None = None) -> Claim:
    vote = vote or sign_body(IDS[i], cert.body, PEERS[i])
    return Claim(state.round, state.digest(), cert.body.sha256(), vote)


def test_candidates_need_a_quorum_then_prefer_round_votes_and_smaller_digest() -> None:
    ahead = _state(9, 5.0)  # one peer's own word for a far-ahead state
    forged = _link(STATES[3], ahead, [4])
    claims = {PEERS[i]: _claim(i, STATES[3], CHAIN[-1]) for i in range(3)}
    claims[PEERS[4]] = _claim(4, ahead, forged)
    found = candidates(claims, population=5, may_vote=_honest)
    assert [(c.round, len(c.votes)) for c in found] == [(3, 3)]
    # a vote filed under another peer's record does not count for that peer
    claims[PEERS[3]] = _claim(4, ahead, forged, sign_body(IDS[4], forged.body, PEERS[4]))
    assert [c.round for c in candidates(claims, 5, _honest)] == [3]
    # level rounds: more votes first; equal votes: the smaller digest
    a, b = _state(3, 7.0), _state(3, 8.0)
    ca, cb = _link(STATES[2], a, [0, 1]), _link(STATES[2], b, [2, 3])
    level = {PEERS[i]: _claim(i, a, ca) for i in (0, 1)}
    level.update({PEERS[i]: _claim(i, b, cb) for i in (2, 3)})
    order = [c.digest for c in candidates(level, 4, _honest)]
    assert order == sorted([a.digest(), b.digest()])
    # our own vote can be left out (a peer that just moved adopts its new group's state)
    assert candidates(level, 4, _honest, exclude=PEERS[0])[0].digest == b.digest()


def test_a_peer_behind_a_full_chain_needs_a_majority() -> None:
    from swarmtune.protocols.certificates import MAX_CHAIN

    states = [_state(r, 0.01 * r) for r in range(MAX_CHAIN + 2)]
    full = [_link(states[r], states[r + 1], [0, 1, 2]) for r in range(1, MAX_CHAIN + 1)]
    newest = states[MAX_CHAIN + 1]
    with pytest.raises(NotCertified, match="does not reach"):
        _verify(full, state=newest, population=7)  # 3 votes: a quorum, not a majority of 7
    assert len(_verify(full, state=newest, population=5)) == MAX_CHAIN  # 3 of 5
    with pytest.raises(NotCertified, match="does not reach"):
        _verify(full[1:], state=newest, population=5)  # a short chain must reach a held state
