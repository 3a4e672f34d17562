"""Cluster wiring without a network: signatures, forged records, assignments, stable ids, merges."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from swarmtune.aggregation.merge import MergeOptions, merge_adapters
from swarmtune.aggregation.taskvec import SIGNATURE_DIM, adjusted_rand_index
from swarmtune.node.adapters.merge import parse_adapter
from swarmtune.node.clusters.clusterer import (
    Clusterer,
    TaskSignature,
    lora_modules,
    merge_bundles,
    read_assignment,
    verified_signatures,
)
from swarmtune.node.clusters.member import ClusterMember
from swarmtune.node.config import ClusteringSettings, parse_config
from swarmtune.node.engine.state import GroupState
from swarmtune.protocols.identity import Identity
from swarmtune.protocols.records import ClusterRecord, PeerRecord, SignatureRecord, identity_proof
from swarmtune.protocols.transfer import pack_files, unpack_files

MODULES = ["base_model.model.layers.0.q_proj", "base_model.model.layers.0.v_proj"]
EPS32 = torch.finfo(torch.float32).eps


def _params(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.default.weight"] = scale * torch.randn(4, 16, generator=gen)
        out[f"{m}.lora_B.default.weight"] = scale * torch.randn(16, 4, generator=gen)
    return out


def _signature(peer: str, values: list[float], round_: int = 3) -> dict:
    return SignatureRecord(peer_id=peer, round=round_, values=values).model_dump()


IDS = {name: Identity.generate() for name in "ab"}


def _peer(name: str, owner: bytes) -> dict:
    """A record of the peer whose identity is IDS[name], bound to `owner` (its records key)."""
    proof = identity_proof(IDS[name], owner)
    peer = IDS[name].peer_id
    return PeerRecord(peer_id=peer, role="volunteer", key=proof.key, key_sig=proof.sig).model_dump()


def test_lora_modules_pairs_peft_names() -> None:
    modules = lora_modules(_params(0), scaling=2.0)
    assert sorted(modules) == MODULES
    assert modules[MODULES[0]].rank == 4 and modules[MODULES[0]].scaling == 2.0


def test_signature_follows_the_local_task_direction() -> None:
    start = _params(1)
    direction_a, direction_b = _params(2, 0.1), _params(3, 0.1)
    signatures = []
    for direction in (direction_a, direction_a, direction_b):
        signature = TaskSignature(scaling=2.0, k=6)
        for step in range(2):
            end = {k: start[k] + (step + 1) * direction[k] for k in start}
            signature.observe(start, end)
        record = signature.record("peer-xxxxxxxxxx", 2)
        assert record is not None and signature.rounds == 2
        signatures.append(torch.tensor(record.values))
    same = float(signatures[0] @ signatures[1])
    other = float(signatures[0] @ signatures[2])
    n = len(signatures[0])
    # unit vectors published to 6 decimals (each off by <= 5e-7), then an fp32 dot over n terms
    assert same == pytest.approx(1.0, abs=2 * n**0.5 * 5e-7 + n * EPS32) and abs(other) < same
    assert TaskSignature(1.0, 6).record("peer-xxxxxxxxxx", 0) is None


def test_signatures_need_the_owner_that_signed_the_peer_record() -> None:
    a, b = IDS["a"].peer_id, IDS["b"].peer_id
    peers = {
        b"[owner:a]": _peer("a", b"[owner:a]"),
        b"[owner:b]": _peer("b", b"[owner:b]"),
        # e copies a's record (a's proof names a's records key, not e's)
        b"[owner:e]": _peer("a", b"[owner:a]"),
    }
    signatures = {
        b"[owner:a]": _signature(a, [1.0, 0.0]),
        b"[owner:b]": _signature(a, [0.0, 1.0]),  # b claims to be a
        b"[owner:c]": _signature("peer-cccccccccc", [0.0, 1.0]),  # no peer record
        b"[owner:d]": {"peer_id": "peer-dddddddddd", "round": 1, "values": [float("nan")]},
        b"[owner:e]": _signature(a, [0.0, 1.0]),
    }
    found = verified_signatures(peers, signatures)
    assert list(found) == [a] and found[a].values == [1.0, 0.0]
    assert b not in found


def test_assignment_is_only_taken_from_the_coordinator_key() -> None:
    record = {"version": 2, "round": 4, "assignment": {"p": 1}, "coordinator": "coord-xxxxxxxx"}
    assert read_assignment({b"[owner:evil]": record}, "[owner:coord]") is None
    found = read_assignment({b"[owner:coord]": record}, "[owner:coord]")
    assert found is not None and found.version == 2
    assert read_assignment({b"[owner:coord]": {"version": 0}}, "[owner:coord]") is None


def _planted_signatures(per_task: int, tasks: int, seed: int = 0) -> tuple[dict, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(tasks, 32, generator=gen)
    records, truth = {}, []
    for t in range(tasks):
        for i in range(per_task):
            peer = f"peer-{t}-{i}-xxxxxx"
            values = (centers[t] + 0.2 * torch.randn(32, generator=gen)).tolist()
            records[peer] = SignatureRecord(peer_id=peer, round=2, values=values)
            truth.append(t)
    return records, truth


def test_clusterer_recovers_planted_tasks_and_versions_only_on_change() -> None:
    signatures, truth = _planted_signatures(per_task=2, tasks=4)
    clusterer = Clusterer(ClusteringSettings(enabled=True, reevaluate_every=3), "coord-xxxxxxxx")
    first = clusterer.update(signatures)
    assert first is not None and first.version == 1
    labels = [first.assignment[p] for p in sorted(signatures)]
    assert adjusted_rand_index(truth, labels) == 1.0
    assert clusterer.update(signatures) is None  # nothing new, not due
    later = {p: s.model_copy(update={"round": 5}) for p, s in signatures.items()}
    assert clusterer.update(later) is None  # due, but the partition is the same
    newcomer, _ = _planted_signatures(per_task=1, tasks=1, seed=0)
    joined = {
        **later,
        **{f"{p}-new": s.model_copy(update={"peer_id": f"{p}-new"}) for p, s in newcomer.items()},
    }
    second = clusterer.update(joined)
    assert second is not None and second.version == 2
    assert (
        second.assignment[next(iter(joined.keys() - later.keys()))]
        == first.assignment["peer-0-0-xxxxxx"]
    )


def test_fixed_cluster_count_is_respected() -> None:
    signatures, _ = _planted_signatures(per_task=2, tasks=4)
    clusterer = Clusterer(ClusteringSettings(enabled=True, clusters=2), "coord-xxxxxxxx")
    record = clusterer.update(signatures)
    assert record is not None and len(set(record.assignment.values())) == 2


def _bundle(seed: int) -> bytes:
    tensors = {}
    for m in MODULES:
        gen = torch.Generator().manual_seed(seed)
        tensors[f"{m}.lora_A.weight"] = torch.randn(4, 16, generator=gen)
        tensors[f"{m}.lora_B.weight"] = torch.randn(16, 4, generator=gen)
    from safetensors.torch import save

    config = (
        b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
    )
    return pack_files({"adapter_config.json": config, "adapter_model.safetensors": save(tensors)})


def test_merge_bundles_gives_the_weighted_mean_of_cluster_adapters() -> None:
    bundles = {"cluster-0": _bundle(0), "cluster-1": _bundle(1)}
    settings = ClusteringSettings(enabled=True, merge_method="linear")
    merged = parse_adapter(
        unpack_files(merge_bundles(bundles, {"cluster-0": 1.0, "cluster-1": 3.0}, settings)), "m"
    )
    sources = [parse_adapter(unpack_files(b), "s") for b in bundles.values()]
    for module in (m.removeprefix("base_model.model.") for m in MODULES):
        pairs = [(0.25, sources[0].modules[module]), (0.75, sources[1].modules[module])]
        expected = sum(w * f.scaling * (f.B.double() @ f.A.double()) for w, f in pairs)
        # fp32 product over the merged rank: error <= (rank + 2) eps32 * sum_i w_i s_i |B_i| |A_i|
        scale = sum(w * f.scaling * (f.B.double().abs() @ f.A.double().abs()) for w, f in pairs)
        out = merged.modules[module]
        atol = (out.rank + 2) * EPS32 * float(scale.max())
        torch.testing.assert_close(out.delta_w().double(), expected, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "method,weights",
    [
        ("ties", [1.0, 1.0]),
        ("dare_ties", [1.0, 1.0]),
        ("task_arithmetic", [1.0, 1.0]),
        ("cat", [1.0, 1.0]),
        ("dare_linear", [3.0, 1.0]),
    ],
)
def test_only_the_weighted_means_see_the_cluster_sizes(method: str, weights: list[float]) -> None:
    """Sizes 3 and 1: TIES, DARE-TIES, task arithmetic and cat merge the unscaled task vectors."""
    bundles = {"cluster-0": _bundle(0), "cluster-1": _bundle(1)}
    settings = ClusteringSettings(enabled=True, merge_method=method)  # type: ignore[arg-type]
    packed = merge_bundles(bundles, {"cluster-0": 3.0, "cluster-1": 1.0}, settings)
    merged = parse_adapter(unpack_files(packed), "m")
    sources = [parse_adapter(unpack_files(bundles[n]), n).modules for n in sorted(bundles)]
    direct = merge_adapters(sources, method, weights, None, MergeOptions())
    assert sorted(merged.modules) == sorted(direct.modules)
    for module, factors in direct.modules.items():  # the same computation: bit for bit
        assert torch.equal(merged.modules[module].delta_w(), factors.delta_w())


class _Transport:
    def __init__(self, cluster: int) -> None:
        self.cluster = cluster


def _member(cluster: int, tmp_path: Path) -> ClusterMember:
    config = parse_config({"clustering": {"enabled": True}})
    node = SimpleNamespace(peer_id="QmPeer")
    manifest = SimpleNamespace(run_id="run", coordinator_key="[owner:c]")
    member = ClusterMember(node, manifest, config, _Transport(cluster), tmp_path, lambda s: None)  # type: ignore[arg-type]
    member.cluster = cluster  # where an earlier assignment put it
    return member


def _assignment(version: int, effective: int) -> ClusterRecord:
    return ClusterRecord(
        version=version,
        round=effective - 2,
        effective_round=effective,
        assignment={"QmPeer": 1},
        coordinator="QmCoordinator",
    )


def test_group_members_switch_at_the_effective_round_newcomers_at_once(tmp_path: Path) -> None:
    at_round = GroupState(5, {})
    # the first split of the run-wide group: everyone waits for the same round
    assert not _member(-1, tmp_path).due(_assignment(1, 7), at_round)
    assert _member(-1, tmp_path).due(_assignment(1, 5), at_round)
    # a later version: a peer already in a cluster still waits; a newcomer does not
    assert not _member(0, tmp_path).due(_assignment(3, 7), at_round)
    assert _member(-1, tmp_path).due(_assignment(3, 7), at_round)


def test_a_model_with_hundreds_of_lora_modules_publishes_a_signature_that_fits_a_record() -> None:
    """SmolLM2-135M with all 7 projections has 210 LoRA modules: 7,560 sketch values at k = 6,
    over the 4,096 a SignatureRecord holds (every clustered volunteer used to crash here)."""
    gen = torch.Generator().manual_seed(0)
    start, end = {}, {}
    for layer in range(30):
        for proj in ("q", "k", "v", "o", "gate", "up", "down"):
            module = f"base_model.model.layers.{layer}.{proj}_proj"
            for part, shape in (("A", (4, 16)), ("B", (16, 4))):
                name = f"{module}.lora_{part}.default.weight"
                start[name] = torch.randn(shape, generator=gen)
                end[name] = start[name] + 0.1 * torch.randn(shape, generator=gen)
    signature = TaskSignature(scaling=2.0, k=6)
    signature.observe(start, end)
    record = signature.record("peer-xxxxxxxxxx", 1)
    assert record is not None and len(record.values) == SIGNATURE_DIM
    norm = sum(v * v for v in record.values) ** 0.5
    assert norm == pytest.approx(1.0, abs=SIGNATURE_DIM**0.5 * 5e-7 + SIGNATURE_DIM * EPS32)
