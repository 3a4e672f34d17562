"""The hivemind Transport the round loop runs against: a SwarmNode plus a group averager."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from typing import Any

from swarmtune.aggregation.params import Params
from swarmtune.node.engine.certify import Candidate, Claim, candidates, claims_of
from swarmtune.node.engine.state import GroupState, StateError, decode_state, encode_state
from swarmtune.node.engine.transport import (
    AveragingFailed,
    GroupResult,
    MemberMeta,
    StateUnavailable,
)
from swarmtune.protocols.averaging import SUSPECT_ROUNDS, AveragingError, GroupAverager
from swarmtune.protocols.certificates import (
    MAX_CHAIN_BYTES,
    Certificate,
    CertificateError,
    Vote,
    decode_chain,
    encode_chain,
)
from swarmtune.protocols.identity import owns
from swarmtune.protocols.records import AdapterOffer, PeerRecord, VoteRecord
from swarmtune.protocols.routing import REVEAL_WAIT_S, SUSPECT_WAIT_S
from swarmtune.protocols.swarm import SwarmNode
from swarmtune.protocols.transfer import TransferError

log = logging.getLogger("swarmtune.round")


class HivemindTransport:
    """Transport over a SwarmNode: group exchange, state announcements and state transfer."""

    def __init__(
        self,
        node: SwarmNode,
        make_averager: Callable[[str], GroupAverager],
        prefix: str,
        *,
        offers: Callable[[GroupState, int], dict[str, AdapterOffer]] | None = None,
        ticket: str = "",
        revoked: Callable[[], set[str]] | None = None,
        started_together: bool = False,
        admit: Callable[[str, str], str | None] | None = None,
    ) -> None:
        """The node's record store must hold our record (the role sets it): announcing a state
        adds to it what we announce. `offers(state, cluster)`: publishes the state's adapter
        under our group's name and returns the offers for our record. `revoked()`: peers the
        coordinator revoked, reread every round. `ticket`: sent with our metadata.
        `started_together`: the volunteer waits for the run's volunteers before its first
        round (join --wait-for), so every member expected then has announced already.
        `admit(peer, ticket)`: None when the ticket admits the peer, else why not (token runs:
        protocols.admission.Gate.check); peers it refuses neither count nor vouch."""
        self.node = node
        self.make_averager = make_averager
        self.averager = make_averager(prefix)
        self.peer = node.peer_id
        self.offers = offers
        # three matchmaking windows, plus room for one retry after hivemind's known race (a
        # follower gives up on its leader while the leader counts it in; the leader's one-number
        # all-reduce then times out, protocols/averaging.py)
        window = self.averager.matchmaking_time
        self.timeout = 3 * window + max(5.0, window)
        # the first round after (re)joining waits longer for its group: peers that start
        # together still finish loading and their first inner phase seconds apart (unless
        # they waited for each other: then the expected members are known from round one)
        self.first_window: float | None = None if started_together else 2 * window
        self.cluster = -1  # clustered runs: only members of this cluster count for state sync
        self.ticket = ticket  # our admission ticket (token runs), sent with our metadata
        self.revoked = revoked or set  # the coordinator's revocations, reread every round
        self.admit = admit
        self._revoked: set[str] = set()  # as last reread
        self._held: set[str] = set()  # digests of the states we announced
        self.banned: dict[str, str] = {}
        self.refused_before = 0  # join requests refused by averagers we closed
        # peers we waited a whole window for and that did not come, with the record they had
        # then: not waited for again until they store another (a dead member's
        # record outlives it by up to PEER_TTL; waiting for it every round cost a full window
        # per round until it expired, bench/churn.py)
        self.no_shows: dict[str, tuple[int, str, float]] = {}

    def switch_group(self, prefix: str, cluster: int) -> None:
        """Average under `prefix` from the next round on, and say so in our record. The state
        we announced belongs to the group we left: it is withdrawn (empty digest) until we
        announce one of the new group, so that our old round cannot outvote its members."""
        previous, self.averager = self.averager, self.make_averager(prefix)
        self.averager.suspects = dict(previous.suspects)  # a withholder is one still
        self.refused_before += previous.refused_joins
        previous.shutdown()
        self.cluster = cluster
        self.node.records.update_record(cluster=cluster, digest="")

    def close(self) -> None:
        """Stop the averager (the node is closed by whoever started it)."""
        self.averager.shutdown()

    def keep_out(self, peers: dict[str, str]) -> None:
        """Peers the group bans this round (refused in matchmaking, excluded if let in)."""
        self.banned = dict(peers)

    @property
    def refused_joins(self) -> int:
        """Join requests our averagers turned away (unadmitted, revoked or banned peers)."""
        return self.refused_before + self.averager.refused_joins

    def exchange(self, delta: Params, meta: MemberMeta, ahead: float = 0.0) -> GroupResult:
        """Form a group of meta's round and state through hivemind, all-gather contributions.
        With `ahead` (an overlapped member, which starts a compute before the others come),
        the first matchmaking window is that much longer; the group still closes as soon as
        every expected member is in."""
        self._revoked = set(self.revoked())
        revoked = {p: "ticket revoked by the coordinator" for p in self._revoked}
        refused = {**revoked, **self.banned}
        self.averager.set_refused(refused)
        window = self.first_window
        if ahead > 0:
            window = max(window or 0.0, self.averager.matchmaking_time + ahead)
        seen = self._members()  # the records as last read before the group formed
        kept_out, suspects = set(refused), set(self.averager.suspects)
        expected = self._expected_in(seen, kept_out, meta.start_digest, meta.round, suspects)
        counted = self.first_window is None

        def poll() -> bool:
            """Polled while matchmaking: did the group finish without us? And a peer that
            (re)announced since we counted (a restart the records had not shown yet) is
            waited for from now on."""
            members = self._members()  # one read of the records per poll
            seen.update(members)  # (a read that timed out returns nothing: keep what we had)
            if counted:
                fresh = self._expected_in(
                    members, kept_out, meta.start_digest, meta.round, suspects
                )
                if fresh - expected - {self.peer}:
                    expected.update(fresh)
                    self.averager.expect(len(expected))
            return self._moved_on(meta.round, members)

        try:
            out = self.averager.exchange(
                delta,
                dataclasses.replace(meta, ticket=self.ticket),
                timeout=self.timeout + ahead,
                moved_on=poll,
                window=window,
                # peers that start together reach their first exchange seconds apart: the
                # first round after (re)joining waits its window instead of closing early
                expected=len(expected) if counted else 0,
            )
            self.first_window = None
        except AveragingError as exc:
            raise AveragingFailed(str(exc)) from None
        self._note_no_shows(expected, {m.peer for m in out.members} | set(out.missing), seen)
        for peer in sorted(out.withheld):  # not refused in matchmaking (refusals that members
            # do not agree on split groups): its next reveals get a short wait instead
            log.warning(
                "round %d: %s committed a contribution and did not serve it"
                " (it gets %g s to serve, not %g s, until it serves or %d rounds pass)",
                meta.round + 1,
                peer[-8:],
                SUSPECT_WAIT_S,
                REVEAL_WAIT_S,
                SUSPECT_ROUNDS,
            )
        return out

    def _note_no_shows(
        self, expected: set[str], came: set[str], seen: dict[str, PeerRecord]
    ) -> None:
        """After a group formed with fewer members than we expected (so it waited out its
        window for the missing ones): remember the record we had last seen of each before the
        group formed (`seen`), and stop expecting it until it stores another (a restart, a
        resync, the next round: every store has a new time; one stored since then already is
        another)."""
        came = came | {self.peer}
        # no group at all says nothing about any one peer; nor does a full group (it closed on
        # its head count: someone we did not expect took the place, nobody was waited out)
        if len(came) >= 2 and len(came) < len(expected):
            for peer in expected - came:
                if peer in seen:
                    self.no_shows[peer] = _announced(seen[peer])
        # forget the ones that stored another record since, or whose record expired (throwaway
        # identities must not pile up here)
        if seen:
            self.no_shows = {
                p: r for p, r in self.no_shows.items() if p in seen and _announced(seen[p]) == r
            }

    def expected_peers(
        self, refused: set[str], start: str, round_: int, suspects: Collection[str] = ()
    ) -> set[str]:
        """`_expected_in` the records as they are now."""
        return self._expected_in(self._members(), refused, start, round_, suspects)

    def _expected_in(
        self,
        members: dict[str, PeerRecord],
        refused: set[str],
        start: str,
        round_: int,
        suspects: Collection[str] = (),
    ) -> set[str]:
        """The volunteers (ourselves included) that may join this round's group (which starts
        from `start`, at `round_`): every live volunteer of our group that announced a state of
        this round or an earlier one (it is behind, or missed a group, and may catch up within
        the window; counting only those already at our state would close every group before a
        late joiner's announcement arrives, and it would never catch up), or a later state we
        held. A state ahead of ours that we never held is not waited for: a stranger announcing
        one would otherwise hold every group for its full window. A member that died still
        counts until a group formed without it once; from then on it is a no-show
        (`no_shows`) until it stores another record, or its record expires. Nor is a
        `suspects` peer (it withheld its contribution) that announced another state: it fell
        out of sync, and waiting for it would cost part of a window every round; one at our
        state still counts, since it will join, and the group must not close before an honest
        member is in."""
        return {
            p
            for p, r in members.items()
            if (r.round <= round_ or r.digest in self._held | {start})
            and (p not in suspects or (r.round, r.digest) == (round_, start))
            and self.no_shows.get(p) != _announced(r)
        } - refused | {self.peer}

    def _moved_on(self, round_: int, members: dict[str, PeerRecord]) -> bool:
        """True once a quorum of our group vouches for a state past `round_` (that round's group
        has formed and finished without us); an announcement alone never cancels a round.
        `members`: the records as just read (`_members`)."""
        population = len(set(members) | {self.peer})
        found = candidates(claims_of(members), population, self.may_vote)
        return bool(found) and found[0].round > round_

    def announce_state(
        self, state: GroupState, claim: Claim | None = None, chain: list[Certificate] | None = None
    ) -> None:
        """Serve this state and the chain that proves it, and say so (with our vote, when our
        group concluded it) in our heartbeat."""
        self.node.blobs.publish("state", encode_state(state))
        self._held.add(state.digest())
        chain = list(chain or [])
        self.node.blobs.publish("chain", encode_chain(chain))
        offers = self.offers(state, self.cluster) if self.offers is not None else {}
        proof = chain[-1:] if chain and chain[-1].body.new == state.digest() else []
        for name in offers:  # what `pull` checks an adapter against
            self.node.blobs.publish(f"cert:{name}", encode_chain(proof))
        vote = VoteRecord(body=claim.body_sha, sig=claim.vote.sig) if claim is not None else None
        announced: dict[str, Any] = {"round": state.round, "digest": state.digest(), "vote": vote}
        if self.offers is not None:
            announced["adapters"] = offers
        self.node.records.update_record(**announced)

    def _admitted(self, peer: str, ticket: str) -> bool:
        if peer in self._revoked or peer in self.banned:
            return False
        return self.admit is None or self.admit(peer, ticket) is None

    def _members(self) -> dict[str, PeerRecord]:
        """Records of the volunteers of our group (cluster) that announced a state and may
        take part: admitted, not revoked, not banned by our group."""
        return {
            pid: r
            for pid, r in self.node.records.peers().items()
            if r.role == "volunteer"
            and r.digest
            and (self.cluster < 0 or r.cluster == self.cluster)
            and self._admitted(pid, r.ticket)
        }

    def announcements(self) -> dict[str, tuple[int, str]]:
        """(round, digest) of every member's last announced state (us included)."""
        return {pid: (r.round, r.digest) for pid, r in self._members().items()}

    def claims(self) -> dict[str, Claim]:
        """The votes in those members' records, each for the state its record announces."""
        return claims_of(self._members())

    def may_vote(self, vote: Vote) -> bool:
        """The vote's key is its peer's libp2p key, and the peer is admitted and not revoked."""
        return owns(vote.peer, vote.key) and self._admitted(vote.peer, vote.ticket)

    def fetch_state(
        self, candidate: Candidate, max_bytes: int
    ) -> tuple[GroupState, list[Certificate]]:
        """The state and its chain from the first provider that serves both readably, each
        refused past its size cap before its bytes arrive (the header states the size)."""
        errors = []
        for provider in candidate.providers:
            if provider == self.peer:
                continue
            try:
                blob = self.node.routes.fetch(provider, "state", timeout=60, max_size=max_bytes)
                state = decode_state(blob)
                chain = decode_chain(
                    self.node.routes.fetch(provider, "chain", timeout=30, max_size=MAX_CHAIN_BYTES)
                )
                return state, chain
            except (TransferError, StateError, CertificateError, TimeoutError) as exc:
                errors.append(f"{provider[-8:]}: {str(exc)[:240]}")  # try the next provider
        raise StateUnavailable("no provider served the state: " + "; ".join(errors or ["none"]))


def _announced(record: PeerRecord) -> tuple[int, str, float]:
    """What identifies one stored record of a peer: its state and when it stored it (a dead
    peer's record never changes; a live or restarted peer stores a new one each round)."""
    return record.round, record.digest, record.stored_at
