"""Which states a peer may adopt (docs/design.md, 8. Trust, "States carry proof").

A state is adopted from others only with proof that the run produced it: a quorum of votes
(protocols/certificates.py) from admitted, unbanned members of the group that concluded it,
quorum(population) = max(2, floor(population / 4) + 1), so that fewer than a quarter of the
live, admitted members of a group can never vouch for a state alone; and a chain of
certificates back to a state the adopter already holds (round 0, its checkpoint, any state it
held since). This module is the one place that decides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from swarmtune.node.adapters.adapter import adapter_digest
from swarmtune.node.engine.state import GroupState
from swarmtune.protocols.certificates import MAX_CHAIN, Body, Certificate, Vote, sign_body
from swarmtune.protocols.identity import Identity
from swarmtune.protocols.records import PeerRecord

# whose votes count: True when the vote's key is its peer's, and the peer is admitted (its
# ticket, in token runs), not revoked and not banned
MayVote = Callable[[Vote], bool]


class NotCertified(ValueError):
    """A state or chain without the proof adoption needs; one line."""


def quorum(population: int) -> int:
    """Votes a state needs: more than any quarter of `population` live members, at least 2."""
    return max(2, population // 4 + 1)


@dataclass(frozen=True)
class Claim:
    """A live peer's vote as its record carries it: the state it announces and the body
    sha256 it signed (the body itself comes with the state)."""

    round: int
    digest: str
    body_sha: str
    vote: Vote


@dataclass(frozen=True)
class Candidate:
    """A state that enough live members vouch for: fetch it from `providers`."""

    round: int
    digest: str
    body_sha: str
    votes: tuple[Vote, ...]

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(v.peer for v in self.votes)


def claims_of(records: Mapping[str, PeerRecord]) -> dict[str, Claim]:
    """The votes in peers' heartbeat records, each for the state its record announces (the
    key is the record's, which its peer id signed: protocols/records.py)."""
    return {
        pid: Claim(r.round, r.digest, r.vote.body, Vote(pid, r.key, r.vote.sig, r.ticket))
        for pid, r in records.items()
        if r.vote is not None
    }


def candidates(
    claims: Mapping[str, Claim], population: int, may_vote: MayVote, exclude: str = ""
) -> list[Candidate]:
    """States with a quorum of valid votes from admitted peers, best first: highest round,
    then most votes, then the smaller digest. `exclude`'s vote does not count."""
    grouped: dict[tuple[int, str, str], list[Vote]] = {}
    for peer, claim in sorted(claims.items()):
        if peer == exclude or claim.vote.peer != peer or not may_vote(claim.vote):
            continue
        if claim.vote.valid_for(claim.body_sha):
            grouped.setdefault((claim.round, claim.digest, claim.body_sha), []).append(claim.vote)
    need = quorum(population)
    found = [Candidate(r, d, b, tuple(v)) for (r, d, b), v in grouped.items() if len(v) >= need]
    return sorted(found, key=lambda c: (-c.round, -len(c.votes), c.digest))


def certified_votes(cert: Certificate, may_vote: MayVote) -> list[Vote]:
    """The certificate's valid votes from admitted members of its own group."""
    return [v for v in cert.valid_votes() if may_vote(v)]


def verify_chain(
    chain: list[Certificate],
    state: GroupState,
    run: str,
    trusted: Iterable[str],
    newest_votes: Iterable[Vote],
    population: int,
    may_vote: MayVote,
) -> list[Certificate]:
    """The chain as served, newest certificate's votes completed with `newest_votes` (live
    ones), when it proves `state`; NotCertified with the reason when it does not.

    It proves `state` when: its newest certificate names `state` (digest and adapter) in this
    run, with a quorum of valid, admitted votes; every link starts where the previous one ended,
    one round later, with at least two valid votes that are a majority of its members; and the
    oldest link needed starts at a digest in `trusted`, or, when a full chain (MAX_CHAIN links)
    reaches nothing we hold, the newest has votes from a majority of `population`."""
    if not chain:
        raise NotCertified("no certificate comes with the state")
    newest = chain[-1].with_votes(list(newest_votes))
    body = newest.body
    if body.run != run:
        raise NotCertified(f"certificate is for run {body.run!r}")
    if (body.round, body.new) != (state.round, state.digest()):
        raise NotCertified("certificate does not name the fetched state")
    if body.adapter != adapter_digest(state.params):
        raise NotCertified("certificate names other adapter tensors")
    votes = certified_votes(newest, may_vote)
    if len(votes) < quorum(population):
        raise NotCertified(f"{len(votes)} valid votes, {quorum(population)} needed")
    links = [*chain[:-1], newest]
    trusted = set(trusted)
    for i in range(len(links) - 1, -1, -1):
        link = links[i]
        if link.body.run != run:
            raise NotCertified(f"link to round {link.body.round} is from another run")
        if i < len(links) - 1:
            after = links[i + 1].body
            if (link.body.new, link.body.round + 1) != (after.start, after.round):
                raise NotCertified(
                    f"chain broken between rounds {link.body.round} and {after.round}"
                )
            valid = len(certified_votes(link, may_vote))
            if valid < max(2, len(link.body.members) // 2 + 1):
                raise NotCertified(f"round {link.body.round}'s link has {valid} valid votes")
        if link.body.start in trusted:
            # the whole chain goes on with the state: a peer further behind than us needs the
            # links we did not have to check (it checks them itself)
            return links
    # a peer further behind than the chain reaches (a new volunteer in a long run) takes the
    # state on a majority of its group's live votes instead of a quarter
    if len(votes) >= max(2, population // 2 + 1) and len(chain) >= MAX_CHAIN:
        return links
    raise NotCertified("the chain does not reach a state this peer holds")


def round_body(
    run: str, start: str, after: GroupState, members: Iterable[tuple[str, str, float]]
) -> Body:
    """What the members of the round from the state with digest `start` to `after` vouch for;
    `members`: (peer, contribution sha256, weight) of each aggregated contribution."""
    entries = tuple(sorted((p, sha, float(w)) for p, sha, w in members))
    return Body(run, after.round, start, after.digest(), adapter_digest(after.params), entries)


@dataclass
class Ledger:
    """A peer's certified history: the chain behind its state, the digests it trusts (states it
    held), its own vote for its state, and its newest witnessed state (a rollback target)."""

    identity: Identity
    peer: str  # our name as a member (our libp2p id on the wire)
    run: str
    ticket: str = ""
    chain: list[Certificate] = field(default_factory=list)
    trusted: set[str] = field(default_factory=set)
    claim: Claim | None = None  # our vote for the state we announce, if a group concluded it
    witnessed: GroupState | None = None  # newest state a group concluded or vouched for

    def hold(self, state: GroupState) -> None:
        """We now hold `state` (round 0, a checkpoint, a solo round): we trust its digest."""
        self.trusted.add(state.digest())
        if state.round == 0 and self.witnessed is None:
            self.witnessed = state  # everyone derives round 0 from the manifest's seed

    def resume(self, state: GroupState) -> None:
        """We restarted from our checkpoint: the furthest we can go back is `state`."""
        self.hold(state)
        self.witnessed = state

    def conclude(
        self, start: str, after: GroupState, members: Iterable[tuple[str, str, float]]
    ) -> None:
        """Our group concluded `after` from the state with digest `start`: vote for it."""
        self.hold(after)
        body = round_body(self.run, start, after, members)
        vote = sign_body(self.identity, body, self.peer, self.ticket)
        self.chain = [*self.chain, Certificate(body, (vote,))][-MAX_CHAIN:]
        self.claim = Claim(after.round, after.digest(), body.sha256(), vote)
        self.witnessed = after

    def alone(self, after: GroupState) -> None:
        """We applied our own update (no group): nobody vouches for `after`."""
        self.hold(after)
        self.claim = None

    def adopt(self, state: GroupState, chain: list[Certificate]) -> None:
        """We adopted a certified `state`; `chain` is its verified proof."""
        self.hold(state)
        self.chain = chain[-MAX_CHAIN:]
        self.claim = None
        self.witnessed = state

    def collect(self, claims: Mapping[str, Claim], may_vote: MayVote) -> None:
        """Add the live votes for our newest certificate (members announce after us)."""
        if not self.chain or self.claim is None:
            return
        sha = self.claim.body_sha
        votes = [
            c.vote
            for p, c in claims.items()
            if c.body_sha == sha and c.vote.peer == p and c.vote.valid_for(sha) and may_vote(c.vote)
        ]
        self.chain[-1] = self.chain[-1].with_votes(votes)
