"""A volunteer's part in a clustered run: publish its task signature, follow the assignment.

The signature is a probe: after the warm-up rounds, the volunteer runs H inner steps on its
own data from the run's seeded initial adapter (not from its current state) and sketches the
resulting dW change, then restores its state. A LoRA step's direction in dW space depends on
the factors it starts from, so only probes from one common start are comparable; this way a
volunteer that arrives after the others have specialised is compared on equal terms.

At each round boundary: after the warm-up, (re)publish the signed signature; read the
coordinator's assignment; when it puts this peer in a different cluster, switch the averager
to that cluster's prefix and announce the cluster, so that the round's state sync adopts the
cluster's state from its members. Without a coordinator the last assignment simply stays.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from node.checkpoint import atomic_write
from node.clusters import TaskSignature, read_assignment
from node.config import RunConfig
from node.state import GroupState
from node.swarm import HivemindTransport, SwarmNode
from protocols.averaging import GroupAverager
from protocols.records import PEER_TTL, ManifestRecord, clusters_key, signatures_key

log = logging.getLogger("swarmtune.cluster")


def group_prefix(run_id: str, cluster: int) -> str:
    """The averaging prefix of a cluster (-1: the run-wide group used during warm-up)."""
    return f"{run_id}_global" if cluster < 0 else f"{run_id}_cluster{cluster}"


class ClusterMember:
    """Signature publishing and cluster moves for one volunteer."""

    def __init__(
        self,
        node: SwarmNode,
        manifest: ManifestRecord,
        config: RunConfig,
        transport: HivemindTransport,
        make_averager: Callable[[str], GroupAverager],
        workdir: Path,
        probe: Callable[[TaskSignature], None],
    ) -> None:
        self.node, self.manifest, self.transport = node, manifest, transport
        self.workdir = workdir
        self.probe = probe
        self.rounds_seen = 0
        self.settings = config.clustering
        self.signature = TaskSignature(config.lora.alpha / config.lora.rank, self.settings.sketch_k)
        self.make_averager = make_averager
        self.version = 0

    @property
    def cluster(self) -> int:
        """This peer's current cluster (-1 before the first assignment)."""
        return self.transport.cluster

    def before_round(self, state: GroupState) -> None:
        """Publish the signature after warm-up and apply a newer assignment."""
        if self.rounds_seen >= self.settings.warmup_rounds and self.signature.total is None:
            self.probe(self.signature)
            log.info("task signature ready after %d warm-up rounds", self.rounds_seen)
        self.rounds_seen += 1
        record = self.signature.record(self.node.peer_id, state.round)
        if record is not None:
            self.node.store_owned(
                signatures_key(self.manifest.run_id), record.model_dump(), PEER_TTL
            )
        raw = self.node.get_owned(clusters_key(self.manifest.run_id))
        assignment = read_assignment(raw, self.manifest.coordinator_key)
        if assignment is None or assignment.version <= self.version:
            return
        self.version = assignment.version
        target = assignment.assignment.get(self.node.peer_id)
        if target is not None and target != self.cluster:
            self.move_to(target)

    def move_to(self, cluster: int) -> None:
        """Average with `cluster` from the next round on."""
        previous = self.transport.averager
        self.transport.averager = self.make_averager(group_prefix(self.manifest.run_id, cluster))
        previous.shutdown()
        log.info(
            "moved to cluster %d (assignment v%d); taking its state from its members",
            cluster,
            self.version,
        )
        self.transport.set_cluster(cluster)
        info = {"peer_id": self.node.peer_id, "cluster": cluster, "version": self.version}
        atomic_write(self.workdir / "cluster.json", json.dumps(info).encode())
