"""DHT key schema and the records of one run (no hivemind here: protocols/validator.py is
the DHT's check of every stored record against these schemas).

Keys live under the run id: `<run>_manifest`, `<run>_clusters` and `<run>_revoked` (one
record each, owned by the coordinator), `<run>_peers` and `<run>_signatures` (one record per
peer, subkey = the owner's public key). Every record under these keys must be signed by its
owner, be at most MAX_RECORD_BYTES, and match its schema.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from swarmtune.protocols.identity import Identity, Signed, verify

log = logging.getLogger("swarmtune.records")

MAX_RECORD_BYTES = 64 * 1024
PEER_TTL = 90.0
# a relay's address as a peer record names it: IPv4/IPv6/DNS, TCP, then its peer id
RELAY_MADDR = r"^(/(ip4|ip6|dns|dns4|dns6)/[^/]{1,253}/tcp/[0-9]{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]+)?$"
HEX64 = r"^[0-9a-f]{64}$"
OWNER_SUBKEY = re.compile(rb"^\[owner:.+\]$", re.DOTALL)


# a field this version does not know (from a newer peer) is ignored, not a reason to drop the
# whole record: records still have bounded sizes (MAX_RECORD_BYTES) and typed known fields
RECORD_CONFIG = ConfigDict(extra="ignore")
Record = TypeVar("Record", bound=BaseModel)


def with_fields(record: Record, **fields: Any) -> Record:
    """A copy of `record` with `fields` changed, validated as a record read from the DHT would
    be (pydantic's model_copy skips validation: a NaN written that way only failed later, in
    every other peer's validator, where no one saw it)."""
    return type(record).model_validate({**record.model_dump(), **fields})


class AdapterOffer(BaseModel):
    """An adapter bundle this peer serves: blob name, round, sha256 and size of the bundle, and
    the digest of the group state it is the adapter of (what its round certificate names;
    empty for adapters the coordinator makes itself)."""

    model_config = RECORD_CONFIG
    round: int = Field(ge=0)
    sha256: str = Field(pattern=HEX64)
    size: int = Field(ge=1, le=1 << 34)
    state: str = Field("", pattern=r"^([0-9a-f]{64})?$")


class VoteRecord(BaseModel):
    """A member's vote for the state its record announces: the sha256 of the round
    certificate's body and its signature by the record's identity key
    (protocols/certificates.py)."""

    model_config = RECORD_CONFIG
    body: str = Field(pattern=HEX64)
    sig: str = Field(min_length=1, max_length=1024)


class PeerRecord(BaseModel):
    """A peer's heartbeat: role, group state it holds, progress, and what it offers."""

    model_config = RECORD_CONFIG
    peer_id: str = Field(min_length=10, max_length=128)
    role: Literal["coordinator", "volunteer"]
    round: int = Field(0, ge=0)
    digest: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    loss: float | None = None
    eval_loss: float | None = None
    eval_exact: float | None = Field(None, ge=0.0, le=1.0)
    group_size: int = Field(0, ge=0, le=100_000)
    tokens: int = Field(0, ge=0)
    bytes_sent: int = Field(0, ge=0)
    bytes_received: int = Field(0, ge=0)
    fallbacks: int = Field(0, ge=0)  # rounds with no group (local update applied)
    rejections: int = Field(0, ge=0)  # groups that left nothing usable to aggregate
    exclusions: int = Field(0, ge=0)  # group members' contributions left out
    resyncs: int = Field(0, ge=0)  # states adopted from other members
    banned: int = Field(0, ge=0)  # repeat offenders its group keeps out now
    refused: int = Field(0, ge=0)  # join requests it refused (unadmitted, revoked, banned)
    task: str = Field("", max_length=64)
    cluster: int = Field(-1, ge=-1, le=100_000)
    # the last round's time split (seconds) and outcome, for the status page and its plots
    inner_s: float = Field(0.0, ge=0)
    matchmaking_s: float = Field(0.0, ge=0)
    transfer_s: float = Field(0.0, ge=0)
    wall_s: float = Field(0.0, ge=0)
    outcome: str = Field("", max_length=32)
    tau: int = Field(0, ge=0)  # GHBM's momentum window where it applies, else 0
    stored_at: float = Field(0.0, ge=0)  # the owner's wall clock when it stored this record
    # how others reach it: "direct" (it accepts connections) or "relay" (through the relay at
    # `relay`, a multiaddr ending in /p2p/<relay id>); "" from peers that did not say
    reach: Literal["", "direct", "relay"] = ""
    serves_relay: bool = (
        False  # a public peer that relays for NATed ones (coordinator, --serve-relay)
    )
    relay: str = Field("", max_length=256, pattern=RELAY_MADDR)
    adapters: dict[str, AdapterOffer] = Field(default_factory=dict, max_length=64)
    unproven: int = Field(0, ge=0)  # announced states it refused for want of proof
    # who wrote it: the libp2p public key of `peer_id` and its signature over this record's
    # owner key (protocols/records.py, identity_proof); records without one are dropped
    key: str = Field("", max_length=1024)
    key_sig: str = Field("", max_length=1024)
    vote: VoteRecord | None = None
    ticket: str = Field("", max_length=2048)  # admission ticket (token runs)

    @field_validator("loss", "eval_loss", "inner_s", "matchmaking_s", "transfer_s", "wall_s")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class ManifestRecord(BaseModel):
    """The run manifest as stored; node/ validates `config` against its RunConfig."""

    model_config = RECORD_CONFIG
    run_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{2,63}$")
    base_fingerprint: str = Field(pattern=HEX64)
    target_modules: list[str] = Field(min_length=1, max_length=64)
    config: dict[str, Any]
    coordinator: str = Field(min_length=10, max_length=128)
    coordinator_key: str = Field("", max_length=2048)


class SignatureRecord(BaseModel):
    """A volunteer's task signature: a shared-seed sketch of its local task vector."""

    model_config = RECORD_CONFIG
    peer_id: str = Field(min_length=10, max_length=128)
    round: int = Field(ge=0)
    values: list[float] = Field(min_length=1, max_length=4096)

    @field_validator("values")
    @classmethod
    def _all_finite(cls, values: list[float]) -> list[float]:
        if not all(math.isfinite(v) for v in values):
            raise ValueError("signature values must be finite")
        return values


class ClusterRecord(BaseModel):
    """The coordinator's versioned assignment of volunteers to clusters."""

    model_config = RECORD_CONFIG
    version: int = Field(ge=1)
    round: int = Field(ge=0)
    effective_round: int = Field(0, ge=0)  # members switch groups when they reach this round
    assignment: dict[str, int] = Field(max_length=10_000)
    coordinator: str = Field(min_length=10, max_length=128)


class RevocationRecord(BaseModel):
    """Peer ids whose admission tickets the coordinator revoked (token runs)."""

    model_config = RECORD_CONFIG
    version: int = Field(ge=0)
    revoked: list[str] = Field(default_factory=list, max_length=1000)


def revoked_key(run_id: str) -> str:
    """DHT key of the coordinator's revocation list."""
    return f"{run_id}_revoked"


def signatures_key(run_id: str) -> str:
    """DHT key under which volunteers keep their signed task signatures."""
    return f"{run_id}_signatures"


def clusters_key(run_id: str) -> str:
    """DHT key of the coordinator's cluster assignment."""
    return f"{run_id}_clusters"


def manifest_key(run_id: str) -> str:
    """DHT key of the run manifest."""
    return f"{run_id}_manifest"


def peers_key(run_id: str) -> str:
    """DHT key under which every peer keeps its signed heartbeat."""
    return f"{run_id}_peers"


KEY_PURPOSE = "records-key"


def identity_proof(identity: Identity, owner: bytes) -> Signed:
    """Our libp2p identity's signature over our records' owner subkey: binds every record we
    sign with that key to our peer id."""
    return identity.sign(KEY_PURPOSE, owner)


@functools.lru_cache(maxsize=4096)
def _bound(peer_id: str, key: str, key_sig: str, owner: bytes) -> bool:
    return verify(peer_id, Signed(key, key_sig), KEY_PURPOSE, owner)


def speaks_for(record: PeerRecord, owner: Any) -> bool:
    """True when the record's peer id signed `owner`, the subkey the record is stored under:
    only then is the record that peer's."""
    if not isinstance(owner, bytes):
        return False
    return _bound(record.peer_id, record.key, record.key_sig, owner)


def parse_peer_records(
    raw: dict[Any, Any] | None, coordinator: str = ""
) -> tuple[dict[str, PeerRecord], int, int]:
    """peer_id -> PeerRecord from a DHT get() dictionary; how many records were dropped for
    lying: one whose peer id did not sign the owner key it is stored under (a record cannot
    speak for another peer), or, once the manifest names the `coordinator`, one that claims
    that role for another peer; and how many could not be read as a peer record (another
    version's schema, or garbage that got past the DHT's validator), which `status` shows."""
    records: dict[str, PeerRecord] = {}
    lies = unreadable = 0
    for owner, entry in (raw or {}).items():
        try:
            record = PeerRecord.model_validate(entry.value)
        except (ValidationError, AttributeError) as exc:
            log.debug("an unreadable peer record: %s", str(exc).splitlines()[0])
            unreadable += 1
            continue
        if not speaks_for(record, owner):
            log.debug("dropped a record that %s did not sign", record.peer_id[-8:])
            lies += 1
            continue
        if coordinator and record.role == "coordinator" and record.peer_id != coordinator:
            log.debug("dropped a coordinator record from %s", record.peer_id[-8:])
            lies += 1
            continue
        records[record.peer_id] = record
    return records, lies, unreadable
