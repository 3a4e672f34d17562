"""The JSON view shared by `status --json` and the status page."""

from __future__ import annotations

from swarmtune.node.adapters.offers import Offer
from swarmtune.node.config import parse_config
from swarmtune.node.watch.snapshot import snapshot
from swarmtune.protocols.records import AdapterOffer, ClusterRecord, ManifestRecord, PeerRecord

SHA = "ab" * 32


def _manifest() -> ManifestRecord:
    config = parse_config({"run_id": "snap-run", "outer": {"name": "ghbm", "tau": 3}})
    return ManifestRecord(
        run_id="snap-run",
        base_fingerprint=SHA,
        target_modules=["q_proj", "v_proj"],
        config=config.model_dump(mode="json"),
        coordinator="Q" * 20,
    )


def test_the_view_holds_the_run_peers_clusters_and_adapters() -> None:
    offer = AdapterOffer(round=4, sha256=SHA, size=1234)
    records = {
        "v" * 20: PeerRecord(peer_id="v" * 20, role="volunteer", round=4, stored_at=100.0),
        "c" * 20: PeerRecord(peer_id="c" * 20, role="coordinator", adapters={"global": offer}),
    }
    clusters = ClusterRecord(version=2, round=3, assignment={"v" * 20: 1}, coordinator="c" * 20)
    offers = {"global": Offer("global", 4, SHA, 1234, ("c" * 20,))}
    view = snapshot(_manifest(), records, clusters, offers, now=112.5)
    run = view["run"]
    assert run["run_id"] == "snap-run" and run["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert run["outer"] == {
        "name": "ghbm",
        "label": "ghbm lr 1 tau 3",
        "lr": 1.0,
        "momentum": 0.9,
        "tau": 3,
    }
    assert [p["role"] for p in view["peers"]] == ["coordinator", "volunteer"]
    volunteer = view["peers"][1]
    assert volunteer["last_seen_s"] == 12.5 and volunteer["round"] == 4
    assert view["peers"][0]["last_seen_s"] is None and "adapters" not in view["peers"][0]
    assert view["clusters"] == {"version": 2, "round": 3, "assignment": {"v" * 20: 1}}
    assert view["adapters"] == [
        {"name": "global", "round": 4, "sha256": SHA, "size": 1234, "providers": 1}
    ]
