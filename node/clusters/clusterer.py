"""Similarity-clustered groups in the swarm (docs/design.md, 6. Clusters): the wiring around aggregation/.

- Volunteer: `TaskSignature` sketches the task vector of each round's local update (what the
  inner steps changed, in dW space, before averaging) and is published, signed, after the
  warm-up rounds. `read_assignment` returns the coordinator's assignment, accepted only under
  the coordinator key named in the manifest.
- Coordinator: `Clusterer` clusters the live volunteers' signatures (cosine, average linkage),
  keeps cluster ids stable across versions, and publishes a new version when the partition
  changes, when an unassigned volunteer's signature arrives, or every `reevaluate_every` rounds.
- Level 2: `merge_bundles` merges the clusters' adapter bundles with the configured method.
  The weighted means (linear, dare_linear) weight each cluster by its size; cat, task
  arithmetic, TIES and dare_ties take every cluster's task vector at its own scale (weight 1),
  as they have their own scale lambda and TIES' disjoint mean already averages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import ValidationError

from swarmtune.aggregation.merge import MergeOptions, merge_adapters, merge_method
from swarmtune.aggregation.params import Params
from swarmtune.aggregation.taskvec import (
    LoraFactors,
    absorb_small_clusters,
    agglomerate,
    auto_cluster,
    cosine_matrix,
    sketch_change,
    stable_ids,
)
from swarmtune.node.adapters.merge import lora_parts, output_files, parse_adapter
from swarmtune.node.config import ClusteringSettings
from swarmtune.protocols.records import ClusterRecord, PeerRecord, SignatureRecord, speaks_for
from swarmtune.protocols.transfer import pack_files, unpack_files

log = logging.getLogger("swarmtune.clusters")
SIGNATURE_SEED = 20261123  # shared by every peer, so sketches are comparable
# Rounds between the newest signature an assignment saw and the round at which members switch:
# every member must have read the assignment by then (it is read at each round boundary).
SWITCH_LEAD = 2


def lora_modules(params: Mapping[str, torch.Tensor], scaling: float) -> dict[str, LoraFactors]:
    """Trainable LoRA tensors (PEFT names) grouped into per-module factors."""
    parts = lora_parts(params)
    return {
        m: LoraFactors(p["A"], p["B"], scaling) for m, p in sorted(parts.items()) if len(p) == 2
    }


class TaskSignature:
    """Sum over rounds of sketch(dW after the inner steps) - sketch(dW at the round start)."""

    def __init__(self, scaling: float, k: int) -> None:
        self.scaling, self.k = scaling, k
        self.total: torch.Tensor | None = None
        self.rounds = 0

    def observe(self, start: Params, end: Params) -> None:
        """Add one round's local task direction (sketches are linear in dW)."""
        step = sketch_change(
            lora_modules(start, self.scaling),
            lora_modules(end, self.scaling),
            self.k,
            SIGNATURE_SEED,
        )
        self.total = step if self.total is None else self.total + step
        self.rounds += 1

    def record(self, peer_id: str, round_: int) -> SignatureRecord | None:
        """The unit-norm signature to publish, once there is one."""
        if self.total is None or not float(self.total.norm()) > 0:
            return None
        unit = (self.total / self.total.norm()).tolist()
        return SignatureRecord(peer_id=peer_id, round=round_, values=[round(v, 6) for v in unit])


def verified_signatures(
    raw_peers: Mapping[bytes, object], raw_signatures: Mapping[bytes, object]
) -> dict[str, SignatureRecord]:
    """peer_id -> signature, kept only when the same owner key also signed that peer's record,
    and that peer's libp2p identity signed the owner key (a signature cannot claim a peer)."""
    owners: dict[bytes, str] = {}
    for subkey, value in raw_peers.items():
        try:
            peer = PeerRecord.model_validate(value)
        except ValidationError:
            continue
        if speaks_for(peer, subkey):
            owners[subkey] = peer.peer_id
    found: dict[str, SignatureRecord] = {}
    for subkey, value in raw_signatures.items():
        try:
            record = SignatureRecord.model_validate(value)
        except ValidationError:
            continue
        if owners.get(subkey) == record.peer_id:
            found[record.peer_id] = record
    return found


def read_assignment(raw: Mapping[bytes, object], coordinator_key: str) -> ClusterRecord | None:
    """The assignment stored under the coordinator's key, if any and well-formed."""
    for subkey, value in raw.items():
        if coordinator_key and subkey.decode("ascii", errors="replace") == coordinator_key:
            try:
                return ClusterRecord.model_validate(value)
            except ValidationError:
                return None
    return None


def cluster_signatures(
    signatures: Mapping[str, SignatureRecord], settings: ClusteringSettings
) -> dict[str, int]:
    """peer_id -> cluster label from cosine similarity of their signatures."""
    peers = sorted(signatures)
    if len(peers) < 2:
        return {p: 0 for p in peers}
    lengths = {len(signatures[p].values) for p in peers}
    if len(lengths) != 1:
        raise ValueError(f"signatures of different lengths {sorted(lengths)}")
    similarity = cosine_matrix([torch.tensor(signatures[p].values) for p in peers])
    if settings.clusters == "auto":
        labels = auto_cluster(similarity)
    else:
        labels = agglomerate(similarity, k=min(settings.clusters, len(peers)))
    labels = absorb_small_clusters(similarity, labels, settings.min_cluster_size)
    return dict(zip(peers, labels, strict=True))


class Clusterer:
    """Coordinator side: decides when to (re)cluster and what to publish."""

    def __init__(self, settings: ClusteringSettings, coordinator: str) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.record: ClusterRecord | None = None
        self.clustered_at = -1

    def update(self, signatures: Mapping[str, SignatureRecord]) -> ClusterRecord | None:
        """A new assignment version when one is due and differs; None otherwise."""
        if len(signatures) < 2:
            return None
        newest = max(s.round for s in signatures.values())
        assigned = self.record.assignment if self.record else {}
        due = any(p not in assigned for p in signatures) or (
            newest >= self.clustered_at + self.settings.reevaluate_every
        )
        if not due:
            return None
        self.clustered_at = newest
        labels = stable_ids(cluster_signatures(signatures, self.settings), assigned)
        if labels == assigned:
            return None
        version = self.record.version + 1 if self.record else 1
        self.record = ClusterRecord(
            version=version,
            round=newest,
            effective_round=newest + SWITCH_LEAD,
            assignment=labels,
            coordinator=self.coordinator,
        )
        return self.record


def merge_weights(names: list[str], sizes: Mapping[str, float], method: str) -> list[float]:
    """Per-cluster merge weights: sizes for the weighted means, 1 each for every other method."""
    mean = merge_method(method).weighted_mean
    return [float(sizes[n]) if mean else 1.0 for n in names]


def merge_bundles(
    bundles: Mapping[str, bytes], sizes: Mapping[str, float], settings: ClusteringSettings
) -> bytes:
    """One packed PEFT adapter merging the named clusters' packed adapters (see merge_weights).

    Scaling a task vector before TIES or DARE changes the result (sizes 3 and 1 would merge
    1.5 dW and 0.5 dW), so only linear and dare_linear, which normalise them, see the sizes.
    """
    names = sorted(bundles)
    weights = merge_weights(names, sizes, settings.merge_method)
    sources = [parse_adapter(unpack_files(bundles[n]), Path(n)) for n in names]
    merged = merge_adapters(
        [s.modules for s in sources],
        settings.merge_method,
        weights,
        settings.merge_rank,
        MergeOptions(),
    )
    return pack_files(output_files(merged, sources, settings.merge_method, weights))
