"""The hivemind transport on real peers (127.0.0.1): unequal weights, bit-identical results, and
members of another round or state kept out of the group.

In the style of hivemind's test_allreduce_weighted, but through swarmtune's HivemindTransport
and the round's own contribution selection and weighted mean, as the daemon runs them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from swarmtune.aggregation.codec import from_int8_blocks, int8_blocks
from swarmtune.aggregation.outer import FedAvgOuter, RoundContext
from swarmtune.aggregation.params import weighted_mean
from swarmtune.node.engine.round import select_contributions
from swarmtune.node.engine.swarm_transport import HivemindTransport
from swarmtune.node.engine.transport import AveragingFailed, GroupResult, MemberMeta
from swarmtune.protocols.averaging import GroupAverager
from swarmtune.protocols.records import PeerRecord
from swarmtune.protocols.swarm import SwarmNode
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


def _transport(
    node: SwarmNode,
    prefix: str,
    codec: str = "fp32",
    expected: int = 3,
    template: dict[str, torch.Tensor] | None = None,
) -> HivemindTransport:
    template = template or {k: torch.zeros(s) for k, s in SHAPES.items()}

    def make(group_prefix: str) -> GroupAverager:
        return GroupAverager(
            node.dht, node.routes, group_prefix, template, codec=codec, matchmaking_time=2.0
        )

    node.records.set_record(PeerRecord(peer_id=node.peer_id, role="volunteer"), store=False)
    transport = HivemindTransport(node, make, prefix)
    # these peers publish no heartbeat records, so tell each how many of them take part (what
    # the records would say in a run): the group then closes as soon as they are all in,
    # instead of waiting out a window that is doubled for a first round
    transport.first_window = None
    expect = {f"peer{i}" for i in range(expected)}
    transport.expected_peers = lambda *_: expect  # type: ignore[method-assign]
    return transport


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


def test_contributions_over_direct_tcp_give_identical_results(nodes: list[SwarmNode]) -> None:
    # averaging.direct_tcp: 2 MiB contributions come over plain TCP beside the streams, and the
    # group still ends with bit-identical aggregates equal to the mean of what was sent
    template = {"big.lora_A": torch.zeros(512, 1024)}
    transports = [_transport(n, "direct_global", template=template) for n in nodes]
    for node in nodes:
        node.enable_direct()
    try:
        gen = torch.Generator().manual_seed(11)
        deltas = [{"big.lora_A": torch.randn(512, 1024, generator=gen)} for _ in nodes]
        metas = [MemberMeta(t.peer, 0, "ef" * 32, 1.0) for t in transports]
        results = _reduce_all(transports, deltas, metas)
        groups = [r for r in results if isinstance(r, GroupResult)]
        assert len(groups) == 3 and all(not g.missing for g in groups), results
        aggregates = [_aggregate(g, m)["big.lora_A"] for g, m in zip(groups, metas, strict=True)]
        assert all(torch.equal(aggregates[0], a) for a in aggregates[1:])
        reference = sum(d["big.lora_A"].double() for d in deltas) / 3
        atol = 2.0**-24 * reference.abs().max().item() * 2
        torch.testing.assert_close(aggregates[0].double(), reference, rtol=0, atol=atol)
        blob = 4 * 512 * 1024  # each member's blob went to the two others over TCP
        assert all(
            n.blobs.direct is not None and n.blobs.direct.bytes_sent >= 2 * blob for n in nodes
        )
    finally:
        for t in transports:
            t.averager.shutdown()
        for node in nodes:  # the other tests of the module use the p2p streams
            node.routes.direct = False
            if node.blobs.direct is not None:
                node.blobs.direct.close()
                node.blobs.direct = None


def test_a_peer_whose_direct_path_failed_is_fetched_over_the_stream_from_then_on(
    nodes: list[SwarmNode],
) -> None:
    import hashlib
    import socket

    server, client = nodes[:2]
    server.enable_direct()
    client.enable_direct()
    assert server.blobs.direct is not None
    with socket.create_server(("127.0.0.1", 0)) as gone:  # a port that stops answering
        dead = gone.getsockname()[1]  # (a firewall, a NAT in between)
    server.blobs.direct.offer = lambda _data: {"port": dead, "token": "00" * 32}  # type: ignore[method-assign]
    data = bytes(range(256)) * (8 << 10)  # 2 MiB
    server.blobs.publish("big", data)
    try:
        outcomes = []
        for _ in range(2):
            stats: dict[str, float] = {}
            got = client.routes.fetch(
                server.peer_id, "big", expected_sha256=hashlib.sha256(data).hexdigest(), stats=stats
            )
            assert got == data
            outcomes.append(stats["direct"])
        assert outcomes == [-1, 0]  # tried once, then not again
    finally:
        server.blobs.unpublish("big")
        for node in (server, client):
            if node.blobs.direct is not None:
                node.blobs.direct.close()  # (closing twice is harmless)
            node.routes.direct, node.blobs.direct = False, None
            node.routes._no_direct.clear()


def test_a_member_of_another_round_is_kept_out_of_the_group(nodes: list[SwarmNode]) -> None:
    transports = [_transport(n, "stale_global", expected=2) for n in nodes]
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

    from swarmtune.protocols import routing
    from swarmtune.protocols.transfer import TransferError, write_frame

    server, client = nodes[:2]
    data = b"contribution bytes" * 1000
    server.blobs.publish("blob", data)
    wanted = {server.peer_id: ("blob", hashlib.sha256(data).hexdigest(), len(data))}
    send, cuts = server.blobs._send, {"left": 1}

    async def cut_short(name, direct, writer):  # noqa: ANN001, ANN202 - like a p2pd reset
        if cuts["left"] > 0:
            cuts["left"] -= 1
            header = {"ok": True, "size": len(data), "sha256": wanted[server.peer_id][1]}
            await write_frame(writer, json.dumps(header).encode())
            writer.close()  # the stream ends before the payload
            return
        await send(name, direct, writer)

    server.blobs._send = cut_short
    try:
        assert client.routes.fetch_many(wanted, timeout=10)[server.peer_id] == data
        cuts["left"] = routing.TRUNCATED_RETRIES + 1  # a peer that always cuts: given up on
        failed = client.routes.fetch_many(wanted, timeout=10)[server.peer_id]
        assert isinstance(failed, TransferError) and "ended early" in str(failed)
        assert cuts["left"] == 0
    finally:
        server.blobs._send = send
        server.blobs.unpublish("blob")


def _trained_members(freeze_a: bool) -> tuple[float, dict, list[dict], dict]:
    """Three peers' LoRA from one seeded init, 4 inner steps each on its own task: the scaling,
    the start and end points (trainable tensors) and the frozen tensors (A, under FFA-LoRA)."""
    from swarmtune.node.config import parse_config
    from swarmtune.node.local.build import build_local_model

    config = parse_config(
        {
            "run_id": "exact-lora",
            "lora": {"freeze_a": freeze_a},
            "inner": {"steps": 4, "batch_size": 4, "seq_len": 32},
        }
    )
    members = [
        build_local_model(config, f"builtin:{task}", data_seed=i)
        for i, task in enumerate(["arithmetic", "capitals", "dates"])
    ]
    start = members[0].trainer.get_params()
    ends = []
    for member in members:
        member.trainer.train_steps(4)
        ends.append(member.trainer.get_params())
    frozen = {
        name: p.detach().clone()
        for name, p in members[0].model.named_parameters()
        if ".lora_A." in name and name not in start
    }
    return config.lora.alpha / config.lora.rank, start, ends, frozen


def _dw(params: dict, frozen: dict, scaling: float) -> dict[str, torch.Tensor]:
    """Per LoRA module, dW = s B A in float64 (A from `frozen` when it is not trained)."""
    out = {}
    for name, b in params.items():
        if ".lora_B." in name:
            a_name = name.replace(".lora_B.", ".lora_A.")
            a = params[a_name] if a_name in params else frozen[a_name]
            out[name] = scaling * (b.double() @ a.double())
    return out


@pytest.mark.parametrize("freeze_a", [True, False])
def test_ffa_lora_rounds_apply_exactly_the_weighted_mean_of_the_members_dw(
    nodes: list[SwarmNode], freeze_a: bool
) -> None:
    # FFA-LoRA (lora.freeze_a): with A the shared seeded init, mean(B_i) A = mean(B_i A), so a
    # plain-averaging round over real peers applies the exact weighted mean of the members'
    # updates dW, to fp32 precision. Training both factors (the control) does not.
    scaling, start, ends, frozen = _trained_members(freeze_a)
    template = {k: torch.zeros_like(v) for k, v in start.items()}
    transports = [_transport(n, f"ffa{int(freeze_a)}_global", template=template) for n in nodes]
    weights = [512.0, 1024.0, 2048.0]
    try:
        deltas = [{k: start[k] - end[k] for k in start} for end in ends]  # pseudo-gradients
        metas = [
            MemberMeta(t.peer, 0, "ef" * 32, w) for t, w in zip(transports, weights, strict=True)
        ]
        results = _reduce_all(transports, deltas, metas)
        assert all(isinstance(r, GroupResult) for r in results), results
        groups = [r for r in results if isinstance(r, GroupResult)]
        outer = FedAvgOuter(1.0)  # plain averaging: theta <- theta - mean(Delta)
        new = outer.step(start, _aggregate(groups[0], metas[0]), RoundContext())
    finally:
        for t in transports:
            t.averager.shutdown()
    before, after = _dw(start, frozen, scaling), _dw(new, frozen, scaling)
    members = [_dw(end, frozen, scaling) for end in ends]
    worst = 0.0
    for name, dw_start in before.items():
        applied = after[name] - dw_start
        exact = sum(w * (m[name] - dw_start) for w, m in zip(weights, members, strict=True)) / sum(
            weights
        )
        # the round's result is one fp32 rounding of each B (and A) entry, a relative error of
        # at most u = 2^-24: bound its effect on dW = s B A by 4 s r u max|B| max|A| (2x margin)
        a_name = name.replace(".lora_B.", ".lora_A.")
        a = new[a_name] if a_name in new else frozen[a_name]
        rank, u = a.shape[0], 2.0**-24
        atol = 4 * scaling * rank * u * new[name].abs().max().item() * a.abs().max().item()
        if freeze_a:
            torch.testing.assert_close(applied, exact, rtol=0, atol=atol)
        worst = max(worst, (applied - exact).abs().max().item() / atol)
    if not freeze_a:  # averaging both factors misses the mean update by far more than rounding
        assert worst > 1000, worst
