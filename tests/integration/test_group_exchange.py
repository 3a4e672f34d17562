"""The hivemind transport on real peers (127.0.0.1): unequal weights, bit-identical results, and
members of another round or state kept out of the group.

In the style of hivemind's test_allreduce_weighted, but through swarmtune's HivemindTransport
and the round's own contribution selection and weighted mean, as the daemon runs them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from aggregation.codec import from_int8_blocks, int8_blocks
from aggregation.params import weighted_mean
from node.engine.round import select_contributions
from node.engine.swarm_transport import HivemindTransport
from node.engine.transport import AveragingFailed, GroupResult, MemberMeta
from protocols.averaging import GroupAverager
from protocols.records import PeerRecord
from protocols.swarm import SwarmNode
from tests.integration.parallel import run_members

pytestmark = pytest.mark.slow
SHAPES = {"layer.lora_A": (8, 64), "layer.lora_B": (64, 8), "other.lora_A": (4, 300)}


def _nodes(count: int) -> list[SwarmNode]:
    first = SwarmNode(initial_peers=[], host="127.0.0.1")
    rest = [SwarmNode(initial_peers=first.maddrs(), host="127.0.0.1") for _ in range(count - 1)]
    return [first, *rest]


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[SwarmNode]]:
    """Three peers for the whole module (each test averages under its own prefix)."""
    made = _nodes(3)
    yield made
    for node in made:
        node.shutdown()


def _transport(node: SwarmNode, prefix: str, codec: str = "fp32") -> HivemindTransport:
    template = {k: torch.zeros(s) for k, s in SHAPES.items()}

    def make(group_prefix: str) -> GroupAverager:
        return GroupAverager(node, group_prefix, template, codec=codec, matchmaking_time=2.0)

    record = PeerRecord(peer_id=node.peer_id, role="volunteer")
    return HivemindTransport(node, make, prefix, role_record=record)


def _reduce_all(
    transports: list[HivemindTransport], deltas: list[dict], metas: list[MemberMeta]
) -> list[GroupResult | AveragingFailed]:
    return run_members(lambda i: transports[i].exchange(deltas[i], metas[i]), len(transports))


def _deltas(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s, generator=gen) * 1e-2 for k, s in SHAPES.items()} for _ in range(count)
    ]


def _aggregate(group: GroupResult, mine: MemberMeta) -> dict[str, torch.Tensor]:
    chosen, excluded = select_contributions(group, mine)
    assert not excluded, excluded
    return weighted_mean([group.contributions[m.peer] for m in chosen], [m.weight for m in chosen])


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_unequal_weights_give_identical_results_equal_to_the_weighted_mean(
    nodes: list[SwarmNode], codec: str
) -> None:
    # fp16 used to differ between members under hivemind's all-reduce (a reducer's own part
    # skipped compression); with the all-gather every member decodes the same fp16 bytes
    def wire(value: torch.Tensor) -> torch.Tensor:  # what its member's blob decodes to
        if codec == "int8":
            return from_int8_blocks(*int8_blocks(value))
        return value.to({"fp32": torch.float32, "fp16": torch.float16}[codec])

    transports = [_transport(n, f"wtest{codec}_global", codec) for n in nodes]
    try:
        weights = [384.0, 1024.0, 2560.0]  # e.g. batch sizes 3, 8 and 20 of 128 tokens
        for round_ in range(2):
            deltas = _deltas(3, round_)
            metas = [
                MemberMeta(t.peer, round_, "ab" * 32, w)
                for t, w in zip(transports, weights, strict=True)
            ]
            results = _reduce_all(transports, deltas, metas)
            assert all(isinstance(r, GroupResult) for r in results), results
            groups = [r for r in results if isinstance(r, GroupResult)]
            assert all(len(g.members) == 3 and not g.missing for g in groups)
            aggregates = [_aggregate(g, m) for g, m in zip(groups, metas, strict=True)]
            for name in SHAPES:
                first = aggregates[0][name]
                assert all(torch.equal(first, a[name]) for a in aggregates[1:])
                reference = sum(
                    w * wire(d[name]).double() for w, d in zip(weights, deltas, strict=True)
                ) / sum(weights)
                # float64 accumulation of exact fp32 inputs, one rounding to fp32 at the end
                atol = 2.0**-24 * reference.abs().max().item() * 2
                torch.testing.assert_close(first.double(), reference, rtol=0, atol=atol)
                unweighted = sum(d[name].double() for d in deltas) / 3
                assert (first.double() - unweighted).abs().max() > 100 * atol  # weights matter
    finally:
        for t in transports:
            t.averager.shutdown()


def test_a_member_of_another_round_is_kept_out_of_the_group(nodes: list[SwarmNode]) -> None:
    transports = [_transport(n, "stale_global") for n in nodes]
    transports[2].timeout = 5.0  # the stalled one finds no group: it gives up sooner
    try:
        deltas = _deltas(3, 7)
        rounds = [10, 10, 3]  # the third peer was stalled and is still at round 3
        metas = [
            MemberMeta(t.peer, r, "cd" * 32, 1.0) for t, r in zip(transports, rounds, strict=True)
        ]
        results = _reduce_all(transports, deltas, metas)
        healthy = [r for r in results[:2] if isinstance(r, GroupResult)]
        assert len(healthy) == 2, results
        assert all({m.peer for m in g.members} == {metas[0].peer, metas[1].peer} for g in healthy)
        aggregates = [_aggregate(g, m) for g, m in zip(healthy, metas[:2], strict=True)]
        assert all(torch.equal(aggregates[0][k], aggregates[1][k]) for k in SHAPES)
        assert isinstance(results[2], AveragingFailed)
    finally:
        for t in transports:
            t.averager.shutdown()


def test_a_stream_that_ends_early_is_fetched_again_a_bounded_number_of_times(
    nodes: list[SwarmNode],
) -> None:
    import hashlib
    import json

    from protocols import swarm
    from protocols.transfer import TransferError, write_frame

    server, client = nodes[:2]
    data = b"contribution bytes" * 1000
    server.blobs.publish("blob", data)
    wanted = {server.peer_id: ("blob", hashlib.sha256(data).hexdigest(), len(data))}
    send, cuts = server.blobs._send, {"left": 1}

    async def cut_short(name, writer):  # noqa: ANN001, ANN202 - like a stream p2pd reset
        if cuts["left"] > 0:
            cuts["left"] -= 1
            header = {"ok": True, "size": len(data), "sha256": wanted[server.peer_id][1]}
            await write_frame(writer, json.dumps(header).encode())
            writer.close()  # the stream ends before the payload
            return
        await send(name, writer)

    server.blobs._send = cut_short
    try:
        assert client.fetch_many(wanted, timeout=10)[server.peer_id] == data
        cuts["left"] = swarm.TRUNCATED_RETRIES + 1  # a peer that always cuts: given up on
        failed = client.fetch_many(wanted, timeout=10)[server.peer_id]
        assert isinstance(failed, TransferError) and "ended early" in str(failed)
        assert cuts["left"] == 0
    finally:
        server.blobs._send = send
        server.blobs.unpublish("blob")
