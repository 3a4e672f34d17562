"""Every adversary of tests/attackers/adversaries.py against three honest members on real peers
(127.0.0.1), through the real exchange: the honest members end bit-identical, and their
robust aggregate stays within the documented bound of the honest mean (aggregation/robust.py,
`influence_bound`), whatever the attacker sends."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarmtune.aggregation.params import weighted_mean
from swarmtune.aggregation.robust import bound_norms, centered_clip, influence_bound
from swarmtune.node.config import parse_config
from swarmtune.node.engine.round import LocalUpdate, RoundReport, combine, conclude_round
from swarmtune.node.engine.state import GroupState
from swarmtune.node.local.trainer import InnerResult
from swarmtune.protocols.admission import Gate, issue_ticket
from swarmtune.protocols.averaging import GroupAverager
from swarmtune.protocols.group import GroupResult, MemberMeta
from swarmtune.protocols.swarm import SwarmNode
from tests.attackers.adversaries import ADVERSARIES
from tests.attackers.averager import HostileAverager
from tests.integration.parallel import run_members

pytestmark = pytest.mark.slow
RUN = "attack-test"
SHAPES = {"q.lora_A": (4, 48), "q.lora_B": (48, 4), "v.lora_A": (4, 48)}
WEIGHT = 4.0  # every honest member trained its H = 4 steps (the most a round can claim)
CONFIG = parse_config(
    {
        "inner": {"steps": 4, "batch_size": 4, "seq_len": 16},
        "averaging": {"aggregator": "centered-clip"},
        "admission": {"policy": "token"},
    }
)
KEY = RSAPrivateKey()
COORDINATOR = RSASignatureValidator(KEY).local_public_key.decode()


class Group:
    def __init__(self) -> None:
        first = SwarmNode(initial_peers=[])
        self.nodes = [first, *(SwarmNode(initial_peers=first.maddrs()) for _ in range(3))]
        template = {k: torch.zeros(s) for k, s in SHAPES.items()}
        self.averagers: list[GroupAverager] = [
            cls(
                node.dht,
                node.routes,
                f"{RUN}_global",
                template,
                matchmaking_time=2.0,
                gate=Gate(COORDINATOR, RUN),
            )
            for cls, node in zip([GroupAverager] * 3 + [HostileAverager], self.nodes, strict=True)
        ]
        self.tickets = [issue_ticket(KEY, RUN, n.peer_id, 3600) for n in self.nodes]

    def close(self) -> None:
        for averager in self.averagers:
            averager.shutdown()
        for node in self.nodes:
            node.shutdown()


@pytest.fixture(scope="module")
def group() -> Iterator[Group]:
    made = Group()
    yield made
    made.close()


def _deltas(seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) * 1e-2 for k, s in SHAPES.items()}
    return [
        {k: base[k] + 0.3 * torch.randn(s, generator=gen) * 1e-2 for k, s in SHAPES.items()}
        for _ in range(4)
    ]


def _conclude(
    out: GroupResult, delta: dict[str, torch.Tensor], meta: MemberMeta
) -> tuple[GroupState, RoundReport, dict[str, torch.Tensor]]:
    """The product's own end of a round (node/engine/round.py) from a zero start state, so the
    applied aggregate is exactly minus the new state (fedavg, lr 1: 0 - a = -a in any float)."""
    start = GroupState(meta.round, {k: torch.zeros(s) for k, s in SHAPES.items()}, {})
    update = LocalUpdate(delta, meta, InnerResult(4, 1.0, 1.0, 1.0, 256, 0.0))
    state, report = conclude_round(start, update, out, CONFIG)
    return state, report, {k: -v for k, v in state.params.items()}


def _norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


@pytest.mark.parametrize("name", sorted(ADVERSARIES))
def test_an_attacker_moves_the_honest_result_at_most_the_documented_bound(
    group: Group, name: str
) -> None:
    round_ = sorted(ADVERSARIES).index(name) + 1
    deltas = _deltas(round_)
    hostile = group.averagers[3]
    assert isinstance(hostile, HostileAverager)
    gen = torch.Generator().manual_seed(round_)
    hostile.forgery = ADVERSARIES[name]().forge(deltas[3], deltas[:3], WEIGHT, gen)
    metas = [
        MemberMeta(n.peer_id, round_, "ab" * 32, WEIGHT, ticket=t)
        for n, t in zip(group.nodes, group.tickets, strict=True)
    ]
    outcomes = run_members(
        # a refused attacker finds no group: let it give up soon after the honest ones are done
        lambda i: group.averagers[i].exchange(
            deltas[i], metas[i], timeout=15.0 if i < 3 else 5.0, expected=4
        ),
        4,
    )

    honest_mean = weighted_mean(deltas[:3], [WEIGHT] * 3)
    digests = []
    for i in range(3):
        out = outcomes[i]
        assert isinstance(out, GroupResult), (i, out)
        state, report, aggregate = _conclude(out, deltas[i], metas[i])
        assert report.outcome == "averaged", report.problem
        digests.append(state.digest())
        chosen = [m for m in (out.member(p) for p in report.members) if m is not None]
        contributions = [out.contributions[m.peer] for m in chosen]
        weights = [m.weight for m in chosen]
        attacker = group.nodes[3].peer_id
        excluded_kinds = ("weight-inflation", "weight-deflation", "equivocation")
        if name in (*excluded_kinds, "malformed-metadata", "unadmitted"):
            assert attacker not in report.members, report.excluded
            assert set(report.members) == {n.peer_id for n in group.nodes[:3]}
        if name == "withholding":  # committed, never served: named, and only it
            assert out.withheld == {attacker} and attacker in report.excluded, out.missing
            assert group.averagers[i].suspects == {attacker: round_}  # a short wait from now
            group.averagers[i].suspects.clear()  # the module's next attack starts unsuspected
        else:
            assert attacker not in out.withheld
        if name in ("weight-inflation", "weight-deflation"):  # its own blob's claim: an offence
            member = out.member(attacker)
            assert member is not None and member.weight == (1e9 if "infl" in name else 1e-300)
            assert attacker in report.offenders and state.offences == {attacker: [round_]}
        # the bound of aggregation/robust.py, from what the round saw: norms bounded first,
        # then CenteredClip, whose pull is bounded around the (bounded) honest members' mean
        bounded, _ = bound_norms(contributions, weights, CONFIG.averaging.norm_bound or 0.0)
        is_honest = [m.peer != attacker for m in chosen]
        honest = [b for b, h in zip(bounded, is_honest, strict=True) if h]
        honest_w = [w for w, h in zip(weights, is_honest, strict=True) if h]
        reference = weighted_mean(honest, honest_w)
        radius = max(_norm(h, reference) for h in honest)
        _, tau = centered_clip(bounded, weights, CONFIG.averaging.clip_scale)
        share = 1 - sum(honest_w) / sum(weights)
        iterations = CONFIG.averaging.clip_iterations
        bound = influence_bound(bounded, weights, reference, radius, share, tau, iterations)
        assert _norm(aggregate, reference) <= bound * (1 + 1e-6)
        if name in ("sign-flip", "ipm", "noise-50x"):  # the plain mean visibly fails
            plain = weighted_mean(contributions, weights)
            assert _norm(plain, honest_mean) > 2 * _norm(aggregate, honest_mean)
    assert len(set(digests)) == 1  # the honest members end on one state


def test_half_the_group_sending_zeros_no_longer_removes_the_honest_progress(group: Group) -> None:
    """Measured on real peers before: with half the weight sending zero updates, the lower
    median norm was 0 and every honest update was scaled to nothing (aggregation/robust.py,
    "Ties")."""
    round_ = 100
    deltas = _deltas(round_)
    zeros = {k: torch.zeros(s) for k, s in SHAPES.items()}
    sent = [deltas[0], deltas[1], zeros, zeros]  # two members of four send nothing
    hostile = group.averagers[3]
    assert isinstance(hostile, HostileAverager)
    hostile.forgery = None  # it sends what it is given: zeros
    metas = [
        MemberMeta(n.peer_id, round_, "ab" * 32, WEIGHT, ticket=t)
        for n, t in zip(group.nodes, group.tickets, strict=True)
    ]
    outcomes = run_members(
        lambda i: group.averagers[i].exchange(sent[i], metas[i], timeout=15.0, expected=4), 4
    )
    honest_alone = combine(deltas[:2], [WEIGHT] * 2, CONFIG)
    for i in range(2):
        out = outcomes[i]
        assert isinstance(out, GroupResult), (i, out)
        _, report, aggregate = _conclude(out, sent[i], metas[i])
        assert len(report.members) == 4  # all four averaged: nothing was excluded
        # the zeros are dropped: the same bits as the two real updates alone, far from zero
        assert all(torch.equal(aggregate[k], honest_alone[k]) for k in SHAPES)
        assert _norm(aggregate, zeros) > 0.5 * _norm(honest_alone, zeros)
