"""Fetching other peers' blobs: which route reaches a peer (itself, or a relay that passes its
blobs on), direct TCP for large blobs, and the relay's side of passing blobs on.

Routes come from the run's records (who is relayed, through which relay), which the router
reads through its `records` callable; nothing writes its tables from outside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from swarmtune.protocols.direct import DirectServer
from swarmtune.protocols.reach import connect_through, observed_ip
from swarmtune.protocols.records import PeerRecord
from swarmtune.protocols.runner import LoopThread
from swarmtune.protocols.transfer import (
    MAX_PASSED_ON,
    UNKNOWN_BLOB,
    VIA,
    BlobServer,
    NotServed,
    StreamEndedEarly,
    TransferError,
    fetch_blob,
    pass_on_blob,
    refuse,
    unknown_blob,
)

log = logging.getLogger("swarmtune.swarm")
UNKNOWN_RETRY_S = 0.2
RELAY_CHECK_S = 5.0  # how old the records behind the routes may be; relayed links rechecked
# at fetch time the routes may come from a read this old: the heartbeat relearns them every
# RELAY_CHECK_S, so a round's fetches never wait on a DHT read of their own
FETCH_ROUTES_AGE_S = 30.0
PASS_ON_TIMEOUT = 300.0  # one blob passed on by a relay, start to end
MAX_PASSING_ON = 8  # blobs a relay passes on at once
REVEAL_WAIT_S = 5.0  # how long a member may take to serve its blob once its group formed
# ...and one that answered "unknown blob" through a whole earlier wait (a withholder): a blob
# is published the moment its group formed, so this covers the members' skew in learning that
SUSPECT_WAIT_S = 0.5
TRUNCATED_RETRIES = 2  # fresh streams after one ended early (the sha256 checks every attempt)
# a relay's refusals that a moment can change: all its pass-on slots taken, or the relayed
# peer's connection to it not (yet, or again) up; asked again within the reveal wait
RELAY_BUSY = "relay busy: try again"
NOT_RELAYED_HERE = "is not a peer relayed here"


def worth_retrying(error: str, cut_short: int) -> bool:
    """Whether a failed fetch is asked again (within its reveal wait): the member has not
    published the blob yet ("unknown blob"), a relay refused for a moment, or the stream ended
    early at most TRUNCATED_RETRIES times (`cut_short` counts those, this one included)."""
    if UNKNOWN_BLOB in error or RELAY_BUSY in error or NOT_RELAYED_HERE in error:
        return True
    return 0 < cut_short <= TRUNCATED_RETRIES


def peer_id_of(maddr: str) -> PeerID:
    """The /p2p/<id> component of a multiaddr; ValueError with one line when there is none."""
    try:
        return PeerID.from_base58(Multiaddr(maddr).value_for_protocol("p2p"))
    except Exception:  # noqa: BLE001 - any parse failure is the same error
        raise ValueError(f"{maddr!r} is not a multiaddr ending in /p2p/<peer id>") from None


class BlobRouter:
    """Fetches blobs from peers by the best route, and (relay service) passes blobs on."""

    def __init__(
        self,
        p2p: P2P,
        loop: LoopThread,
        peer_id: str,
        records: Callable[[float], dict[str, PeerRecord] | None],
        relays: list[str],
        relay_service: bool = False,
    ) -> None:
        """`records(max_age)`: the run's live records, read at most that many seconds ago (None
        before any read answered: the routes then stay as they are).
        `relays`: multiaddrs of relays we know from the start (our initial peers).
        `relay_service`: answer `via/PEER/NAME` requests for peers connected to us."""
        self.p2p, self.loop, self.peer_id = p2p, loop, peer_id
        self._records = records
        self._relays = {peer_id_of(m).to_base58(): m for m in relays if "/p2p/" in m}
        # relayed peers of the run -> the maddr we know for their relay ("" when it is us)
        self._relayed: dict[str, str] = {}
        self._relay_routes: list[str] = []  # every relay we know, other than us
        self._passing_on = asyncio.Semaphore(MAX_PASSING_ON)
        self.server = BlobServer(p2p, proxy=self._pass_on if relay_service else None)
        self.direct = False  # large blobs over direct TCP where possible (enable_direct)
        self._no_direct: set[str] = set()  # peers a direct transfer failed with: p2p only

    def learn(self, max_age: float = RELAY_CHECK_S) -> None:
        """Rebuild the routes from the run's records (a read at most `max_age` seconds old)."""
        records = self._records(max_age)
        if records is None:
            return
        relays = self._known_relays(records)
        self._relayed = self._relays_of(records, relays)
        self._relay_routes = [m for pid, m in relays.items() if pid != self.peer_id]

    def _known_relays(self, records: dict[str, PeerRecord]) -> dict[str, str]:
        """Relays we may use, by peer id: our initial peers (at the address we know) and the
        run's live direct peers whose records say they relay (`/p2p/ID`: p2pd finds them)."""
        relays = dict(self._relays)
        for pid, r in records.items():
            if r.serves_relay and r.reach != "relay" and pid not in relays:
                relays[pid] = f"/p2p/{pid}"
        return relays

    def _relays_of(self, records: dict[str, PeerRecord], relays: dict[str, str]) -> dict[str, str]:
        """Relayed peers whose relay is us or one of `relays` (_known_relays), with the address
        WE know for that relay ("" when it is us). A record cannot send every peer of the run
        dialing an address it chose."""
        relayed: dict[str, str] = {}
        for pid, record in records.items():
            if record.reach != "relay" or not record.relay or pid == self.peer_id:
                continue
            try:
                relay_id = peer_id_of(record.relay).to_base58()
            except ValueError:
                continue
            if relay_id == self.peer_id:
                relayed[pid] = ""
            elif relay_id in relays:
                relayed[pid] = relays[relay_id]
        return relayed

    def routes(self, peer_id: str) -> list[str]:
        """Where to ask for a peer's blobs, in order: "" for the peer itself, else a relay's
        maddr (`via/PEER/NAME` there). Its record's relay first, but every relay we know is a
        fallback, and so is the peer itself: records are self-reported, and a forged one must
        not be able to route a peer's blobs to where they are withheld."""
        claimed = self._relayed.get(peer_id)
        others = [r for r in self._relay_routes if r != claimed]
        if claimed is None:  # not relayed, as far as its record says
            return ["", *others]
        if claimed == "":  # relayed through us: we ask it over its own connection
            return [""]
        return [claimed, *others, ""]

    def fetch(
        self,
        peer_id: str,
        name: str,
        *,
        expected_sha256: str | None = None,
        timeout: float = 120.0,
        stats: dict[str, float] | None = None,
        max_size: int = 1 << 30,
    ) -> bytes:
        """A blob from a peer (streamed, chunked, sha-checked), refused when its header says it
        is over `max_size` bytes (and cut off if it sends more than its header said)."""
        self.learn(FETCH_ROUTES_AGE_S)
        fetch = self._fetch(peer_id, name, expected_sha256, timeout, max_size, stats)
        return self.loop.run(fetch, timeout=timeout + 5)

    def _fetch(
        self,
        peer_id: str,
        name: str,
        sha256: str | None,
        timeout: float,
        max_size: int = 1 << 30,
        stats: dict[str, float] | None = None,
    ) -> Coroutine[Any, Any, bytes]:
        return self._fetch_by_routes(
            self.routes(peer_id), peer_id, name, sha256, timeout, max_size, stats
        )

    async def _fetch_by_routes(
        self,
        routes: list[str],
        peer_id: str,
        name: str,
        sha256: str | None,
        timeout: float,
        max_size: int,
        stats: dict[str, float] | None,
    ) -> bytes:
        deadline = time.monotonic() + timeout
        failure: TransferError | None = None
        for route in routes:
            ask, wanted = (
                (peer_id, name)
                if not route
                else (peer_id_of(route).to_base58(), f"{VIA}{peer_id}/{name}")
            )
            own: dict[str, float] = {}
            try:
                return await fetch_blob(
                    self.p2p,
                    PeerID.from_base58(ask),
                    wanted,
                    expected_sha256=sha256,
                    max_size=max_size,
                    timeout=max(deadline - time.monotonic(), 0.1),
                    stats=own,
                    # relayed peers have no address to dial: the stream only
                    direct=self.direct
                    and not route
                    and ask not in self._no_direct
                    and ask not in self._relayed,
                )
            except TransferError as exc:
                failure = exc if failure is None or UNKNOWN_BLOB in str(exc) else failure
                if time.monotonic() >= deadline:
                    break
            finally:
                if own.get("direct", 0) < 0:  # unreachable that way (a NAT, a firewall)
                    self._no_direct.add(ask)
                if stats is not None:
                    stats.update(own)
        assert failure is not None
        raise failure

    def fetch_many(
        self,
        wanted: dict[str, tuple[str, str, int]],
        timeout: float,
        waits: Mapping[str, float] | None = None,
    ) -> dict[str, bytes | TransferError]:
        """Blobs from several peers at once: peer -> (name, sha256, size) in; peer -> the
        verified bytes or the TransferError that says why not, out. A blob its peer does not
        serve yet is asked for again for REVEAL_WAIT_S, or for `waits[peer]` seconds where
        given (the averager shortens it for a peer that withheld before); a stream that ended
        early, up to TRUNCATED_RETRIES more times within that window. A peer that still
        answers "unknown blob" for that very name at the end gets a NotServed error."""

        started = time.monotonic()
        waits = waits or {}

        async def one(peer: str, name: str, sha: str, size: int) -> bytes | TransferError:
            reveal_by = started + min(timeout, waits.get(peer, REVEAL_WAIT_S))
            cut_short = 0
            while True:
                try:
                    return await self._fetch(peer, name, sha, timeout, max_size=size)
                except TransferError as exc:
                    # a member publishes its blob the moment its group formed: asked a moment
                    # earlier, it does not know the name yet; a relay may refuse for a moment;
                    # and a stream that a busy p2pd reset (seen on loopback under load) is
                    # worth another try or two
                    truncated = isinstance(exc, StreamEndedEarly)
                    cut_short += truncated
                    retry = worth_retrying(str(exc), cut_short if truncated else 0)
                    if not retry or time.monotonic() >= reveal_by:
                        # the member itself (or a relay passing its answer on verbatim) said
                        # it has no blob of this name; a peer asked for `via/...` that relays
                        # nothing says so of the via name, which is no withholding
                        withheld = unknown_blob(name) in str(exc)
                        return NotServed(str(exc)) if withheld else exc
                await asyncio.sleep(UNKNOWN_RETRY_S)

        async def every() -> list[bytes | TransferError]:
            return await asyncio.gather(*(one(p, *w) for p, w in wanted.items()))

        if not wanted:
            return {}
        self.learn(FETCH_ROUTES_AGE_S)
        results = self.loop.run(every(), timeout=timeout + 5)
        return dict(zip(wanted, results, strict=True))

    async def _pass_on(self, peer: str, name: str, writer: asyncio.StreamWriter) -> int:
        """(relay service) Answer a `via/PEER/NAME` request with PEER's blob, passed on as it
        arrives over PEER's direct connection to us. Only for a peer connected to us directly
        (a fact of our own p2p daemon, not of any record), and never more than
        MAX_PASSING_ON at once (a request beyond is refused, not queued). Returns the bytes
        written."""
        try:
            peer_id = PeerID.from_base58(peer)
            connected = {
                p.peer_id for p in await self.p2p.list_peers() if observed_ip(list(p.addrs))
            }
        except Exception:  # noqa: BLE001 - a malformed id, or the daemon is going away
            peer_id, connected = None, set()
        if peer_id is None or peer_id not in connected:
            return await refuse(writer, f"{peer} {NOT_RELAYED_HERE}")
        if self._passing_on.locked():
            return await refuse(writer, RELAY_BUSY)
        async with self._passing_on:
            try:
                return await asyncio.wait_for(
                    pass_on_blob(self.p2p, peer_id, name, writer, MAX_PASSED_ON),
                    PASS_ON_TIMEOUT,
                )
            except asyncio.TimeoutError:
                return 0  # the stream closes short: the asking side sees a truncation

    def connect_relayed(self) -> None:
        """Open relayed connections to the run's relayed peers we are not connected to (small
        messages such as matchmaking then reach them; blobs go through _pass_on)."""
        relayed = {p: r for p, r in self._relayed.items() if r}
        if not relayed:
            return

        async def one(peer: str, relay: str) -> None:
            try:
                await asyncio.wait_for(
                    connect_through(self.p2p, PeerID.from_base58(peer), relay), RELAY_CHECK_S
                )
            except Exception as exc:  # noqa: BLE001 - it may have left; the next beat retries
                log.debug("relayed connection to %s failed: %s", peer[-8:], exc)

        async def connect() -> None:
            connected = {p.peer_id.to_base58() for p in await self.p2p.list_peers()}
            await asyncio.gather(*(one(p, r) for p, r in relayed.items() if p not in connected))

        try:
            self.loop.run(connect(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - the loop may be shutting down
            log.debug("connecting relayed peers: %s", exc)

    def enable_direct(self, host: str) -> None:
        """Serve and fetch large blobs over direct TCP connections where the peers can dial
        each other (protocols/direct.py; the run's averaging.direct_tcp). The listener takes
        any free port on `host`."""
        if self.server.direct is None:
            listener = DirectServer(host)
            self.server.enable_direct(listener)
            log.info("direct TCP transfers on %s:%d", host, listener.port)
        self.direct = True
