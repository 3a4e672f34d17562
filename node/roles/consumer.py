"""`swarmtune pull` and `swarmtune status`: read-only views of a run."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from swarmtune.node.adapters.adapter import AdapterError
from swarmtune.node.adapters.library import library_members, write_library
from swarmtune.node.adapters.offers import (
    Offer,
    proven_offers,
    run_may_vote,
    verified_bundle,
    vouched_offers,
)
from swarmtune.node.clusters.clusterer import read_assignment
from swarmtune.node.engine.certify import MayVote
from swarmtune.node.watch.snapshot import snapshot
from swarmtune.protocols.certificates import Certificate, CertificateError, decode_chain
from swarmtune.protocols.records import ClusterRecord, ManifestRecord, PeerRecord, clusters_key
from swarmtune.protocols.swarm import SwarmError, SwarmNode
from swarmtune.protocols.transfer import TransferError, write_dir_atomically

log = logging.getLogger("swarmtune.pull")


def connect(initial_peers: list[str]) -> tuple[SwarmNode, ManifestRecord]:
    """An ephemeral DHT client that knows the run's manifest."""
    node = SwarmNode(initial_peers=initial_peers)
    try:
        manifest = node.fetch_manifest(initial_peers[0])
        node.records.set_run(manifest.run_id, manifest.coordinator)
    except BaseException:
        node.shutdown()
        raise
    return node, manifest


def fetch_certificate(node: SwarmNode, provider: str, name: str) -> Certificate | None:
    """The round certificate a provider serves with adapter `name` (None if it has none)."""
    chain = decode_chain(node.routes.fetch(provider, f"cert:{name}", timeout=30))
    return chain[-1] if chain else None


def fetch_verified(
    node: SwarmNode, offer: Offer, may_vote: MayVote, manifest: ManifestRecord
) -> tuple[dict[str, bytes], dict[str, float], str]:
    """The adapter files of the first provider that serves `offer` intact and proven, with the
    transfer stats and what was verified."""
    errors: list[str] = []
    for provider in offer.providers:
        stats: dict[str, float] = {}
        try:
            bundle = node.routes.fetch(
                provider, f"adapter:{offer.name}", expected_sha256=offer.sha256, stats=stats
            )
            cert = fetch_certificate(node, provider, offer.name) if offer.state else None
            files, verified = verified_bundle(bundle, cert, offer, manifest, may_vote)
        except (TransferError, TimeoutError, AdapterError, CertificateError) as exc:
            errors.append(f"{provider[-8:]}: {exc}")
            continue
        return files, stats, verified
    raise SwarmError(f"no provider served adapter {offer.name!r} intact: " + "; ".join(errors))


def newest_verified(
    node: SwarmNode, offers: list[Offer], may_vote: MayVote, manifest: ManifestRecord
) -> tuple[Offer, dict[str, bytes], dict[str, float], str]:
    """The newest of `offers` (newest first) that a provider serves intact and proven, with its
    files, transfer stats and what was verified, saying on stderr when an older one is taken;
    SwarmError with the newest's reasons when none is."""
    first_error: SwarmError | None = None
    for offer in offers:
        try:
            files, stats, verified = fetch_verified(node, offer, may_vote, manifest)
        except SwarmError as exc:
            first_error = first_error or exc
            continue
        if offer is not offers[0]:
            print(
                f"round {offers[0].round}: {first_error}; took round {offer.round} instead",
                file=sys.stderr,
            )
        return offer, files, stats, verified
    assert first_error is not None
    raise first_error


def download_newest(
    node: SwarmNode, offers: list[Offer], out: Path, may_vote: MayVote, manifest: ManifestRecord
) -> tuple[Offer, dict[str, float], str]:
    """`newest_verified`, its adapter files (and nothing else) written to `out` atomically."""
    offer, files, stats, verified = newest_verified(node, offers, may_vote, manifest)
    write_dir_atomically(files, out)
    return offer, stats, verified


def pull(initial_peers: list[str], out: Path | None, name: str, list_only: bool) -> int:
    """Entry point of `swarmtune pull`."""
    if not list_only and out is not None and out.exists() and any(out.iterdir()):
        raise SwarmError(f"--out {out} exists and is not empty; choose a new directory")
    node, manifest = connect(initial_peers)
    try:
        may_vote = run_may_vote(manifest)
        ranked = proven_offers(node.records.peers(), manifest.coordinator, may_vote)
        if list_only:
            print(format_offers({n: offers[0] for n, offers in ranked.items()}))
            experts = library_members(list(ranked))
            if experts:
                print(
                    f"library: all {len(experts)} cluster adapters at once, routed"
                    " (pull --adapter library)"
                )
            return 0
        if name == "library":
            assert out is not None
            return pull_library(node, ranked, out, may_vote, manifest)
        if name not in ranked:
            known = ", ".join(sorted(ranked)) or "none yet"
            raise SwarmError(
                f"no adapter named {name!r} on offer in run {manifest.run_id} (on offer: {known})"
            )
        assert out is not None
        offer, stats, verified = download_newest(node, ranked[name], out, may_vote, manifest)
        print(
            f"pulled adapter {name!r} (run {manifest.run_id}, round {offer.round}, sha256 "
            f"{offer.sha256[:12]}…, {offer.size / 1e6:.2f} MB in {stats.get('seconds', 0):.2f}s)"
            f" into {out}\nverified: {verified}"
        )
        return 0
    finally:
        node.shutdown()


def pull_library(
    node: SwarmNode,
    ranked: dict[str, list[Offer]],
    out: Path,
    may_vote: MayVote,
    manifest: ManifestRecord,
) -> int:
    """`pull --adapter library`: every cluster adapter on offer (the newest proven one of each),
    verified, as one routed library (node/adapters/library.py)."""
    names = library_members(list(ranked))
    if not names:
        known = ", ".join(sorted(ranked)) or "none yet"
        raise SwarmError(
            f"no cluster adapters on offer in run {manifest.run_id}: a library needs a"
            f" clustered run (on offer: {known})"
        )
    adapters: dict[str, tuple[dict[str, bytes], dict[str, object]]] = {}
    for name in names:
        offer, files, _, verified = newest_verified(node, ranked[name], may_vote, manifest)
        adapters[name] = files, {"round": offer.round, "sha256": offer.sha256, "verified": verified}
        print(f"{name}: round {offer.round}, sha256 {offer.sha256[:12]}…; verified: {verified}")
    write_library(out, manifest.run_id, adapters)
    print(
        f"pulled a library of {len(names)} cluster adapters (run {manifest.run_id}) into {out},"
        f" routed by PEFT's Arrow: see {out / 'README.md'}"
    )
    return 0


def format_offers(offers: dict[str, Offer]) -> str:
    """A table of adapters on offer."""
    lines = [f"{'adapter':<16}{'round':>6}  {'sha256':<14}{'size':>10}  providers"]
    for offer in sorted(offers.values(), key=lambda o: o.name):
        lines.append(
            f"{offer.name:<16}{offer.round:>6}  {offer.sha256[:12]:<14}"
            f"{offer.size / 1e6:>8.2f}MB  {len(offer.providers)}"
        )
    return "\n".join(lines) if offers else "no adapters on offer yet"


def format_peers(records: dict[str, PeerRecord]) -> str:
    """A table of peers, their rounds and losses, and the rounds that did not go as planned
    (fallback: no group; rejected: a group left nothing usable; excluded: members'
    contributions left out; resync: adopted another member's state; unproven: announced states
    it refused for want of proof (docs/design.md, 8. Trust); banned: repeat offenders
    its group keeps out now; refused: join requests it turned away), and how others reach it
    (direct, or relay: through the coordinator)."""
    head = f"{'peer':<12}{'role':<13}{'reach':<8}{'round':>6}{'loss':>9}{'eval':>9}{'exact':>7}{'group':>7}{'cluster':>9}"
    head += f"{'fallback':>10}{'rejected':>10}{'excluded':>10}{'resync':>8}{'unproven':>10}"
    head += f"{'banned':>8}"
    head += f"{'refused':>9}"
    lines = [head + "  task"]
    for pid, r in sorted(records.items(), key=lambda item: (item[1].role, item[0])):
        loss = f"{r.loss:.3f}" if r.loss is not None else "-"
        ev = f"{r.eval_loss:.3f}" if r.eval_loss is not None else "-"
        exact = f"{r.eval_exact:.0%}" if r.eval_exact is not None else "-"
        cluster = str(r.cluster) if r.cluster >= 0 else "-"
        lines.append(
            f"…{pid[-10:]:<11}{r.role:<13}{r.reach or '-':<8}{r.round:>6}{loss:>9}{ev:>9}{exact:>7}{r.group_size:>7}"
            f"{cluster:>9}{r.fallbacks:>10}{r.rejections:>10}{r.exclusions:>10}{r.resyncs:>8}{r.unproven:>10}"
            f"{r.banned:>8}{r.refused:>9}  {r.task}"
        )
    return "\n".join(lines)


def format_clusters(record: ClusterRecord | None, peers: dict[str, PeerRecord]) -> str:
    """One line per cluster: its id, members and their tasks."""
    if record is None:
        return "clusters: none assigned yet"
    members: dict[int, list[str]] = {}
    for peer, cluster in sorted(record.assignment.items()):
        task = peers[peer].task if peer in peers else "gone"
        members.setdefault(cluster, []).append(f"…{peer[-8:]} ({task})")
    lines = [f"clusters (assignment v{record.version}, round {record.round}):"]
    lines += [f"  cluster {c}: " + ", ".join(m) for c, m in sorted(members.items())]
    return "\n".join(lines)


def status(initial_peers: list[str], as_json: bool = False) -> int:
    """Entry point of `swarmtune status`: tables, or the status page's JSON (no history)."""
    node, manifest = connect(initial_peers)
    try:
        records = node.records.peers()
        clustered = bool(manifest.config.get("clustering", {}).get("enabled"))
        clusters = None
        if clustered:
            raw = node.records.get_owned(clusters_key(manifest.run_id))
            clusters = read_assignment(raw, manifest.coordinator_key)
        offers = vouched_offers(records, manifest.coordinator, run_may_vote(manifest))
        if as_json:
            view = snapshot(manifest, records, clusters, offers, time.time())
            view["dropped_records"] = node.records.dropped_records
            view["unreadable_records"] = node.records.unreadable_records
            print(json.dumps(view, indent=1))
            return 0
        print(
            f"run {manifest.run_id}  base {manifest.base_fingerprint[:12]}…  "
            f"LoRA r={manifest.config['lora']['rank']} targets {','.join(manifest.target_modules)}"
        )
        print(
            f"outer {manifest.config['outer']['name']}  inner steps "
            f"{manifest.config['inner']['steps']}  peers {len(records)}  records dropped"
            f" {node.records.dropped_records} (not signed by their peer, or a false coordinator),"
            f" unreadable {node.records.unreadable_records} (no peer record this version reads)\n"
        )
        print(format_peers(records) + "\n")
        if clustered:
            print(format_clusters(clusters, records) + "\n")
        print(format_offers(offers))
        return 0
    finally:
        node.shutdown()
