"""Round certificates on the wire (docs/design.md, 8. Trust, "States carry proof").

A member that concluded a round with its group signs the round's body: the run, the new
round, the state it started from, the state it ended at (digests), the hash of the new
adapter's tensors and the contributions it aggregated (peer, sha256, weight). Its vote is
that signature by its libp2p identity (protocols/identity.py), so a vote names its peer
beyond forgery. A certificate is a body and the votes collected for it; a chain is a list of
certificates, oldest first, each starting where the one before it ended.

This module only encodes, decodes and checks signatures; how many votes make a quorum and
whose votes count is the node's policy (node/engine/certify.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from swarmtune.protocols.identity import MAX_KEY_CHARS, MAX_SIG_CHARS, Identity, Signed, signed_with
from swarmtune.protocols.records import HEX64

PURPOSE = "round-certificate/v1"
MAX_CHAIN = 64  # certificates a peer keeps and serves with its state
MAX_MEMBERS = 1024
MAX_CHAIN_BYTES = 16 << 20
_HEX64 = re.compile(HEX64)
_PEER = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # a libp2p id in base58, or an in-process name
_RUN = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")


class CertificateError(ValueError):
    """A certificate or chain that cannot be read; one line."""


@dataclass(frozen=True)
class Vote:
    """One member's signature over a body's sha256, with its admission ticket (token runs)."""

    peer: str
    key: str
    sig: str
    ticket: str = ""

    def valid_for(self, body_sha: str) -> bool:
        """True when `key` signed `body_sha` (whether `key` is `peer`'s is the transport's
        question: protocols.identity.owns for libp2p peers)."""
        return _checked(self, body_sha)


@dataclass(frozen=True)
class Body:
    """What the members of a round's group vouch for."""

    run: str
    round: int  # the round the new state is at (the start state is at round - 1)
    start: str  # digest of theta^{t-1} with its outer state and offences
    new: str  # digest of theta^t, the same
    adapter: str  # hash of theta^t's LoRA tensors (node/adapters/adapter.py, adapter_digest)
    members: tuple[tuple[str, str, float], ...]  # (peer, contribution sha256, weight), sorted

    def encode(self) -> bytes:
        """Canonical bytes: equal bodies give equal bytes on every member."""
        return json.dumps(
            {
                "adapter": self.adapter,
                "members": [list(m) for m in self.members],
                "new": self.new,
                "round": self.round,
                "run": self.run,
                "start": self.start,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    def sha256(self) -> str:
        """What votes sign."""
        return hashlib.sha256(self.encode()).hexdigest()

    def signers(self) -> set[str]:
        """The members whose contributions the body says were aggregated."""
        return {peer for peer, _, _ in self.members}


@dataclass(frozen=True)
class Certificate:
    """A body and the votes collected for it (each one peer's; unchecked until verified)."""

    body: Body
    votes: tuple[Vote, ...] = ()

    def with_votes(self, votes: list[Vote] | tuple[Vote, ...]) -> Certificate:
        """This certificate with `votes` added (one per peer, the first kept)."""
        merged = {v.peer: v for v in reversed([*self.votes, *votes])}
        return Certificate(self.body, tuple(merged[p] for p in sorted(merged)))

    def valid_votes(self) -> list[Vote]:
        """The votes whose key signed this body, from members of its group."""
        sha = self.body.sha256()
        members = self.body.signers()
        return [v for v in self.votes if v.peer in members and v.valid_for(sha)]


@functools.lru_cache(maxsize=4096)
def _checked(vote: Vote, body_sha: str) -> bool:
    """Votes are re-read from records every round: check each signature once."""
    return signed_with(Signed(vote.key, vote.sig), PURPOSE, body_sha.encode())


def sign_body(identity: Identity, body: Body, peer: str, ticket: str = "") -> Vote:
    """Our vote for `body`, as member `peer` (our libp2p id, or an in-process name)."""
    signed = identity.sign(PURPOSE, body.sha256().encode())
    return Vote(peer, signed.key, signed.sig, ticket)


def _vote(raw: Any) -> Vote:
    if not isinstance(raw, dict) or set(raw) - {"peer", "key", "sig", "ticket"}:
        raise CertificateError("malformed vote")
    peer, key, sig, ticket = raw.get("peer"), raw.get("key"), raw.get("sig"), raw.get("ticket", "")
    if not (isinstance(peer, str) and _PEER.match(peer)):
        raise CertificateError("vote names no peer id")
    if not (isinstance(key, str) and len(key) <= MAX_KEY_CHARS):
        raise CertificateError("vote key malformed")
    if not (isinstance(sig, str) and len(sig) <= MAX_SIG_CHARS):
        raise CertificateError("vote signature malformed")
    if not (isinstance(ticket, str) and len(ticket) <= 2048):
        raise CertificateError("vote ticket malformed")
    return Vote(peer, key, sig, ticket)


def _member(raw: Any) -> tuple[str, str, float]:
    if not (isinstance(raw, list) and len(raw) == 3):
        raise CertificateError("malformed member entry")
    peer, sha, weight = raw
    if not (isinstance(peer, str) and _PEER.match(peer)):
        raise CertificateError("member names no peer id")
    if not (isinstance(sha, str) and (sha == "" or _HEX64.match(sha))):
        raise CertificateError("member sha256 malformed")
    if type(weight) not in (int, float) or not math.isfinite(weight) or weight < 0:
        raise CertificateError("member weight malformed")
    return peer, sha, float(weight)


def _body(raw: Any) -> Body:
    keys = {"adapter", "members", "new", "round", "run", "start"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise CertificateError("malformed certificate body")
    if not (isinstance(raw["run"], str) and _RUN.match(raw["run"])):
        raise CertificateError("certificate names no run")
    if not (type(raw["round"]) is int and raw["round"] >= 1):
        raise CertificateError("certificate round malformed")
    for key in ("start", "new", "adapter"):
        if not (isinstance(raw[key], str) and _HEX64.match(raw[key])):
            raise CertificateError(f"certificate {key} digest malformed")
    members = raw["members"]
    if not (isinstance(members, list) and 0 < len(members) <= MAX_MEMBERS):
        raise CertificateError("certificate member list malformed")
    return Body(
        raw["run"],
        raw["round"],
        raw["start"],
        raw["new"],
        raw["adapter"],
        tuple(_member(m) for m in members),
    )


def certificate_json(cert: Certificate) -> dict[str, Any]:
    """The JSON form of one certificate."""
    return {
        "body": json.loads(cert.body.encode()),
        "votes": [
            {"peer": v.peer, "key": v.key, "sig": v.sig, "ticket": v.ticket} for v in cert.votes
        ],
    }


def parse_certificate(raw: Any) -> Certificate:
    """A certificate from untrusted JSON (signatures not yet checked)."""
    if not isinstance(raw, dict) or set(raw) != {"body", "votes"}:
        raise CertificateError("malformed certificate")
    votes = raw["votes"]
    if not (isinstance(votes, list) and len(votes) <= MAX_MEMBERS):
        raise CertificateError("certificate vote list malformed")
    return Certificate(_body(raw["body"]), tuple(_vote(v) for v in votes))


def encode_chain(chain: list[Certificate]) -> bytes:
    """A chain (oldest first) as bytes, at most MAX_CHAIN certificates (the newest)."""
    return json.dumps([certificate_json(c) for c in chain[-MAX_CHAIN:]]).encode()


def decode_chain(blob: bytes) -> list[Certificate]:
    """A chain from untrusted bytes; CertificateError when malformed or too long."""
    if len(blob) > MAX_CHAIN_BYTES:
        raise CertificateError(f"chain larger than {MAX_CHAIN_BYTES} bytes")
    try:
        raw = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise CertificateError("chain is not JSON") from None
    if not (isinstance(raw, list) and len(raw) <= MAX_CHAIN):
        raise CertificateError(f"chain is not a list of at most {MAX_CHAIN} certificates")
    return [parse_certificate(c) for c in raw]
