"""A volunteer's part in a clustered run: publish its task signature, follow the assignment.

The signature is a probe: before its first round, the volunteer runs H inner steps on its own
data from the run's seeded initial adapter (not from its current state) and sketches the
resulting dW change, then restores its state. A LoRA step's direction in dW space depends on
the factors it starts from, so only probes from one common start are comparable; this way a
volunteer that arrives after the others have specialised is compared on equal terms. Probing
before the first round keeps it from delaying this peer in a round its group is waiting on.

At each round boundary: after the warm-up, (re)publish the signed signature; read the
coordinator's assignment; once the group reaches the assignment's `effective_round` and it puts
this peer in a different cluster, switch the averager to that cluster's prefix and announce the
cluster. Every member of the old group switches at the same round, so nobody is left waiting
in a group the others have left; the mover then adopts its destination's state (Peer.sync with
adopt). Without a coordinator the last assignment simply stays.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from swarmtune.node.clusters.clusterer import TaskSignature, read_assignment
from swarmtune.node.config import RunConfig
from swarmtune.node.engine.checkpoint import atomic_write
from swarmtune.node.engine.state import GroupState
from swarmtune.node.engine.swarm_transport import HivemindTransport
from swarmtune.protocols.records import (
    PEER_TTL,
    ClusterRecord,
    ManifestRecord,
    clusters_key,
    signatures_key,
)
from swarmtune.protocols.swarm import SwarmNode

log = logging.getLogger("swarmtune.cluster")


def group_prefix(run_id: str, cluster: int) -> str:
    """The averaging prefix of a cluster (-1: the run-wide group used during warm-up)."""
    return f"{run_id}_global" if cluster < 0 else f"{run_id}_cluster{cluster}"


class ClusterMember:
    """Signature publishing and cluster moves for one volunteer (RoundHooks for its Peer)."""

    def __init__(
        self,
        node: SwarmNode,
        manifest: ManifestRecord,
        config: RunConfig,
        transport: HivemindTransport,
        workdir: Path,
        probe: Callable[[TaskSignature], None],
    ) -> None:
        self.node, self.manifest, self.transport = node, manifest, transport
        self.workdir = workdir
        self.probe = probe
        self.rounds_seen = 0
        self.settings = config.clustering
        self.signature = TaskSignature(config.lora.alpha / config.lora.rank, self.settings.sketch_k)
        self.version = 0
        self.pending: ClusterRecord | None = None
        self.cluster = -1  # this peer's current cluster (-1 before the first assignment)

    def prepare(self) -> None:
        """Compute the task signature (before the first round)."""
        if self.signature.total is None:
            self.probe(self.signature)
            log.info("task signature ready")

    def before_round(self, state: GroupState) -> bool:
        """Publish the signature and apply an assignment that is due; True when this peer moved
        to another cluster. The signature waits for the warm-up only while the run has no
        clusters yet; a volunteer arriving later publishes it at once."""
        self.prepare()
        self.rounds_seen += 1
        raw = self.node.records.get_owned(clusters_key(self.manifest.run_id))
        assignment = read_assignment(raw, self.manifest.coordinator_key)
        if self.rounds_seen > self.settings.warmup_rounds or assignment is not None:
            record = self.signature.record(self.node.peer_id, state.round)
            if record is not None:
                self.node.records.store_owned(
                    signatures_key(self.manifest.run_id), record.model_dump(), PEER_TTL
                )
        if assignment is not None and assignment.version > self.version:
            self.pending = assignment
        if self.pending is None or not self.due(self.pending, state):
            return False
        due, self.pending = self.pending, None
        self.version = due.version
        target = due.assignment.get(self.node.peer_id)
        if target is None or target == self.cluster:
            return False
        self.move_to(target)
        return True

    def due(self, assignment: ClusterRecord, state: GroupState) -> bool:
        """Members of the group being split switch together at the effective round; a peer
        still in the run-wide group after the first assignment (a newcomer) has nobody to
        switch with and goes at once."""
        newcomer = self.cluster < 0 and assignment.version > 1
        return newcomer or state.round >= assignment.effective_round

    def move_to(self, cluster: int) -> None:
        """Average with `cluster` from this round on."""
        self.transport.switch_group(group_prefix(self.manifest.run_id, cluster), cluster)
        self.cluster = cluster
        log.info(
            "moved to cluster %d (assignment v%d); taking its state from its members",
            cluster,
            self.version,
        )
        info = {"peer_id": self.node.peer_id, "cluster": cluster, "version": self.version}
        atomic_write(self.workdir / "cluster.json", json.dumps(info).encode())
