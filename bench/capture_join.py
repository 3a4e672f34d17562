"""`swarmtune join` that copies another volunteer's task signature, then attacks its cluster: the
cluster capture of docs/design.md, 8. Trust ("Cluster seats are not earned"). For
bench/cluster_capture.py only.

Usage: .venv/bin/python bench/capture_join.py VICTIM_PEER_ID ATTACK [join arguments...]

Until the victim's signature is readable it publishes its own (it trains honestly through the
warm-up, as any volunteer does); from then on it publishes the victim's values under its own,
properly signed, peer id. Its contributions are ATTACK's forgeries (tests/attackers).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import hostile_join  # noqa: E402

from swarmtune.node.clusters import member  # noqa: E402
from swarmtune.node.clusters.clusterer import verified_signatures  # noqa: E402
from swarmtune.protocols.records import SignatureRecord, peers_key, signatures_key  # noqa: E402

log = logging.getLogger("swarmtune.capture")


def copying(victim: str) -> type[member.ClusterMember]:
    """A ClusterMember that publishes `victim`'s signature values as its own."""

    class Copier(member.ClusterMember):
        copied = False

        def before_round(self, state):  # noqa: ANN001, ANN202
            run = self.manifest.run_id
            found = verified_signatures(
                self.node.records.get_owned(peers_key(run)),
                self.node.records.get_owned(signatures_key(run)),
            )
            theirs = found.get(victim)
            if theirs is not None:
                own = self.signature.record
                self.signature.record = lambda peer_id, round_: SignatureRecord(  # type: ignore[method-assign]
                    peer_id=peer_id, round=round_, values=theirs.values
                )
                if not self.copied:
                    log.info("copying the task signature of %s", victim[-8:])
                    self.copied = True
                try:
                    return super().before_round(state)
                finally:
                    self.signature.record = own  # type: ignore[method-assign]
            return super().before_round(state)

    return Copier


def main(argv: list[str]) -> int:
    if not argv:  # (hostile_join checks the attack)
        print(
            "usage: bench/capture_join.py VICTIM_PEER_ID ATTACK [join arguments...]",
            file=sys.stderr,
        )
        return 2
    victim, rest = argv[0], argv[1:]
    member.ClusterMember = copying(victim)  # type: ignore[misc]
    import swarmtune.node.roles.volunteer as volunteer

    volunteer.ClusterMember = member.ClusterMember  # type: ignore[misc]
    return hostile_join.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
