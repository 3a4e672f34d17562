"""One JSON view of a run, shared by `swarmtune status --json` and the coordinator's status
page: the run, its peers, clusters and adapters (and, on the page, the per-round history)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from swarmtune.node.adapters.offers import Offer
from swarmtune.node.config import parse_config
from swarmtune.protocols.records import ClusterRecord, ManifestRecord, PeerRecord

PAGE_FILE = Path(__file__).with_name("page.html")  # the status page, self-contained


def manifest_digest(manifest: ManifestRecord) -> str:
    """The short manifest digest `bootstrap` prints (sha256 of its JSON, 12 hex digits)."""
    return hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()[:12]


def run_view(manifest: ManifestRecord) -> dict:
    """The run as a volunteer joins it: base, LoRA, inner and outer optimizer, policies."""
    config = parse_config(manifest.config)
    outer = config.outer
    return {
        "run_id": manifest.run_id,
        "manifest": manifest_digest(manifest),
        "base_fingerprint": manifest.base_fingerprint,
        "coordinator": manifest.coordinator,
        "lora": {
            "rank": config.lora.rank,
            "alpha": config.lora.alpha,
            "dropout": config.lora.dropout,
            "target_modules": list(manifest.target_modules),
        },
        "inner": config.inner.model_dump(),
        "outer": {
            "name": outer.name,
            "label": outer.label(),
            "lr": outer.effective_lr,
            "momentum": outer.effective_momentum,
            "tau": outer.tau,
        },
        "aggregator": config.averaging.aggregator,
        "codec": config.averaging.codec,
        "admission": config.admission.policy,
        "clustering": config.clustering.enabled,
    }


def peer_view(record: PeerRecord, now: float) -> dict:
    """A peer's record without its adapter offers, plus how long ago it stored it."""
    view = record.model_dump(exclude={"adapters"})
    view["last_seen_s"] = round(max(now - record.stored_at, 0.0), 1) if record.stored_at else None
    return view


def snapshot(
    manifest: ManifestRecord,
    records: Mapping[str, PeerRecord],
    clusters: ClusterRecord | None,
    offers: Mapping[str, Offer],
    now: float,
) -> dict:
    """The run, its live peers (by role, then id), the cluster assignment and adapters on offer."""
    peers = sorted(records.values(), key=lambda r: (r.role, r.peer_id))
    return {
        "time": round(now, 3),
        "run": run_view(manifest),
        "peers": [peer_view(r, now) for r in peers],
        "clusters": None
        if clusters is None
        else {
            "version": clusters.version,
            "round": clusters.round,
            "assignment": dict(sorted(clusters.assignment.items())),
        },
        "adapters": [
            {
                "name": o.name,
                "round": o.round,
                "sha256": o.sha256,
                "size": o.size,
                "providers": len(o.providers),
            }
            for o in sorted(offers.values(), key=lambda o: o.name)
        ],
    }
