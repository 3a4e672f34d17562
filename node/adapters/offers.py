"""Choosing what to download, and checking it (docs/design.md, 8. Trust, "What pull serves").

An adapter is on offer only with proof: either the coordinator offers it in its own record
(signed by its identity, which the manifest names; the adapters it makes itself, such as
`merged`, and the ones it mirrored after checking them), or it is the adapter of a group state
that a quorum of the volunteers offering that adapter vouch for (node/engine/certify.py). Among
proven offers the newest round wins, then the bundle most peers serve, then the smaller sha256.
Whoever downloads then checks the bundle against the state's round certificate.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from safetensors import SafetensorError
from safetensors.torch import load as st_load

from swarmtune.node.adapters.adapter import ADAPTER_FILES, AdapterError, adapter_digest
from swarmtune.node.config import parse_config
from swarmtune.node.engine.certify import MayVote, candidates, certified_votes, claims_of, quorum
from swarmtune.protocols.admission import Gate
from swarmtune.protocols.certificates import Certificate, Vote
from swarmtune.protocols.identity import owns
from swarmtune.protocols.records import ManifestRecord, PeerRecord
from swarmtune.protocols.transfer import unpack_files


@dataclass(frozen=True)
class Offer:
    """An adapter on offer in the swarm and the peers serving exactly these bytes: `state` is
    the digest of the group state it is the adapter of ("" for one the coordinator made), and
    `votes` the live votes for that state."""

    name: str
    round: int
    sha256: str
    size: int
    providers: tuple[str, ...]
    state: str = ""
    votes: tuple[Vote, ...] = ()
    population: int = 1  # volunteers offering this adapter (what a quorum is taken of)


def run_may_vote(manifest: ManifestRecord) -> MayVote:
    """Whose votes count for someone outside the groups (pull, status, the coordinator): the
    key must be the peer's, and in token runs the peer must hold a valid ticket."""
    gate = Gate(manifest.coordinator_key, manifest.run_id) if _token(manifest) else None
    return lambda v: owns(v.peer, v.key) and (gate is None or gate.check(v.peer, v.ticket) is None)


def _token(manifest: ManifestRecord) -> bool:
    return manifest.config.get("admission", {}).get("policy") in ("token", "address")


def vouched_offers(
    records: Mapping[str, PeerRecord], coordinator: str, may_vote: MayVote
) -> dict[str, Offer]:
    """Per adapter name, the newest proven offer (module docstring)."""
    return {
        name: ranked[0] for name, ranked in proven_offers(records, coordinator, may_vote).items()
    }


def proven_offers(
    records: Mapping[str, PeerRecord], coordinator: str, may_vote: MayVote
) -> dict[str, list[Offer]]:
    """Per adapter name, every proven offer, newest round first (one per round: the sha256
    most of that round's providers hold). A consumer falls back to an older one when the
    newest one's providers are gone (volunteers that just left still have live records)."""
    proven: dict[str, list[tuple[str, int, str, int, str, tuple[Vote, ...], int]]] = {}
    names = {name for r in records.values() for name in r.adapters}
    for name in sorted(names):
        holders = {
            pid: r for pid, r in records.items() if r.role == "volunteer" and name in r.adapters
        }
        found = candidates(claims_of(holders), len(holders), may_vote)
        vouched = {(c.round, c.digest): c.votes for c in found}
        for pid, record in records.items():
            offer = record.adapters.get(name)
            if offer is None:
                continue
            votes = vouched.get((offer.round, offer.state))
            if pid == coordinator or (votes is not None and record.role == "volunteer"):
                entry = (pid, offer.round, offer.sha256, offer.size, offer.state)
                proven.setdefault(name, []).append((*entry, votes or (), max(len(holders), 1)))
    ranked: dict[str, list[Offer]] = {}
    for name, entries in proven.items():
        for top in sorted({e[1] for e in entries}, reverse=True):
            level = [e for e in entries if e[1] == top]
            counts = Counter(e[2] for e in level)
            sha = min(counts, key=lambda s: (-counts[s], s))
            chosen = [e for e in level if e[2] == sha]
            votes = max((e[5] for e in chosen), key=len)
            providers = tuple(sorted(e[0] for e in chosen))
            first = chosen[0]
            ranked_offer = Offer(name, top, sha, first[3], providers, first[4], votes, first[6])
            ranked.setdefault(name, []).append(ranked_offer)
    return ranked


def check_bundle(
    files: Mapping[str, bytes], cert: Certificate | None, offer: Offer, may_vote: MayVote
) -> str:
    """What was verified about a downloaded adapter (one line); AdapterError when its
    certificate does not prove it. A coordinator-made adapter (no state) needs none: its
    offer is in the coordinator's signed record."""
    if not offer.state:
        return "made by the coordinator (offered in its signed record)"
    if cert is None:
        raise AdapterError("no round certificate comes with the adapter")
    body = cert.body
    if (body.round, body.new) != (offer.round, offer.state):
        raise AdapterError("the round certificate names another state")
    votes = certified_votes(cert.with_votes(list(offer.votes)), may_vote)
    need = quorum(offer.population)
    if len(votes) < need:
        raise AdapterError(f"the round certificate has {len(votes)} valid votes, {need} needed")
    try:
        tensors = st_load(files["adapter_model.safetensors"])
    except (KeyError, SafetensorError) as exc:
        raise AdapterError(f"adapter tensors unreadable ({exc})") from None
    if adapter_digest(tensors) != body.adapter:
        raise AdapterError("the adapter's tensors are not the ones its certificate names")
    return (
        f"round certificate: {len(votes)} of {len(body.members)} group members vouch for"
        f" round {body.round}; the adapter's tensors are the certified state's"
    )


# adapter_config.json fields that change what PEFT builds or loads, and the values a swarm
# adapter has (node/adapters/adapter.py writes them); anything else there is descriptive
_FIXED_FIELDS = {
    "peft_type": "LORA",
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "use_dora": False,
    "use_rslora": False,
}


def adapter_files(
    files: Mapping[str, bytes], offer: Offer, manifest: ManifestRecord
) -> dict[str, bytes]:
    """The files `pull` writes: exactly ADAPTER_FILES, with an adapter_config.json that builds
    the run's LoRA (a volunteer state's adapter: the manifest's rank, alpha and targets; one the
    coordinator made, such as a merge, may have another rank over those targets). AdapterError
    when anything is missing or the config asks PEFT for anything else."""
    lora, targets = parse_config(manifest.config).lora, manifest.target_modules
    rank, alpha = lora.rank, lora.alpha
    missing = [name for name in ADAPTER_FILES if name not in files]
    if missing:
        raise AdapterError(f"bundle lacks {missing}")
    try:
        config = json.loads(files["adapter_config.json"])
    except ValueError:
        raise AdapterError("adapter_config.json is not JSON") from None
    if not isinstance(config, dict):
        raise AdapterError("adapter_config.json is not a JSON object")
    for key, value in _FIXED_FIELDS.items():
        if config.get(key, value) != value:
            raise AdapterError(f"adapter_config.json sets {key}={config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) and offer.state:
            raise AdapterError(f"adapter_config.json sets {key}")
    named = config.get("target_modules")
    named = [named] if isinstance(named, str) else named
    if not isinstance(named, list) or not named or not set(named) <= set(targets):
        raise AdapterError(f"adapter_config.json targets {named!r}, the run {sorted(targets)}")
    if offer.state and (config.get("r"), config.get("lora_alpha"), sorted(named)) != (
        rank,
        alpha,
        sorted(targets),
    ):
        raise AdapterError(
            f"adapter_config.json has r={config.get('r')!r}, lora_alpha="
            f"{config.get('lora_alpha')!r}; the run's LoRA is r={rank}, alpha={alpha}"
        )
    return {name: files[name] for name in ADAPTER_FILES}


def verified_bundle(
    bundle: bytes,
    cert: Certificate | None,
    offer: Offer,
    manifest: ManifestRecord,
    may_vote: MayVote,
) -> tuple[dict[str, bytes], str]:
    """A downloaded bundle's adapter files (`adapter_files`) once its certificate proves them
    (`check_bundle`), and what was verified; AdapterError or TransferError when not."""
    files = adapter_files(unpack_files(bundle), offer, manifest)
    return files, check_bundle(files, cert, offer, may_vote)
