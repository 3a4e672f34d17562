"""A peer's presence in the swarm: DHT with persistent identity, signed records, blob serving."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from protocols import lifeline
from protocols.direct import DirectServer
from protocols.identity import Identity, IdentityError
from protocols.reach import (
    REACH_MODES,
    DialBackServer,
    ask_dial_back,
    connect_through,
    install_p2pd_args,
    observed_ip,
)
from protocols.records import (
    PEER_TTL,
    RELAY_MADDR,
    ManifestRecord,
    PeerRecord,
    identity_proof,
    manifest_key,
    parse_peer_records,
    peers_key,
    with_fields,
)
from protocols.runner import LoopThread
from protocols.sockets import remove_stale_hivemind_sockets
from protocols.ticket_desk import Grant, TicketDesk, TicketDeskError, ask_ticket
from protocols.transfer import (
    MAX_PASSED_ON,
    VIA,
    BlobServer,
    StreamEndedEarly,
    TransferError,
    fetch_blob,
    pass_on_blob,
    refuse,
)
from protocols.validator import RunRecordValidator, owner_subkey

log = logging.getLogger("swarmtune.swarm")
DHT_GET_TIMEOUT = 10.0
UNKNOWN_RETRY_S = 0.2
RELAY_CHECK_S = 5.0  # how often relayed connections are checked and reopened
PASS_ON_TIMEOUT = 300.0  # one blob passed on by a relay, start to end
MAX_PASSING_ON = 8  # blobs a relay passes on at once
REVEAL_WAIT_S = 5.0  # how long a member may take to serve its blob once its group formed
TRUNCATED_RETRIES = 2  # fresh streams after one ended early (the sha256 checks every attempt)


class SwarmError(RuntimeError):
    """The swarm cannot be joined or used (unreachable peers, bad manifest); one line."""


def announce_multiaddrs(addresses: list[str], port: int) -> list[str]:
    """`--announce` IPv4 addresses as multiaddrs on our port; SwarmError (one line) if unusable."""
    if addresses and port == 0:
        raise SwarmError("--announce needs a fixed --port: the port other machines dial")
    maddrs = []
    for address in addresses:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise SwarmError(f"--announce {address!r} is not an IPv4 address") from None
        maddrs.append(f"/ip4/{address}/tcp/{port}")
    return maddrs


def address_kind(maddr: str) -> str:
    """Who can dial a multiaddr: `public`, `private network` (RFC 1918, CGNAT, link-local and
    the documentation ranges), `loopback` (this machine only), or `other` (not /ip4)."""
    parts = maddr.split("/")
    if len(parts) < 3 or parts[1] != "ip4":
        return "other"
    try:
        ip = ipaddress.IPv4Address(parts[2])
    except ValueError:
        return "other"
    if ip.is_loopback:
        return "loopback"
    if ip.is_private or ip in _CGNAT or ip.is_link_local or ip.is_reserved:
        return "private network"
    return "public"


_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_REACH = {"public": 0, "private network": 1, "other": 2, "loopback": 3}


def rank_maddrs(maddrs: list[str]) -> list[str]:
    """Public addresses first, then private-network ones, loopback last (stable otherwise)."""
    return sorted(maddrs, key=lambda m: _REACH[address_kind(m)])


def load_or_create_key(path: Path) -> RSAPrivateKey:
    """The RSA key that signs this peer's records, kept in its work dir across restarts."""
    key = RSAPrivateKey()
    if path.exists():
        key.__setstate__({"_private_key": path.read_bytes()})  # hivemind's own (de)serializer
    else:
        _create_private(path, key.to_bytes())
    return key


def _create_private(path: Path, data: bytes) -> None:
    """Write a new owner-only file, durably, via a temporary name (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def identity_peer_id(workdir: Path) -> str:
    """The peer id a node started in `workdir` has (its libp2p identity, created if missing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "p2p.key"
    if not path.exists():
        P2P.generate_identity(str(path))
    try:
        return PeerID.from_identity(path.read_bytes()).to_base58()
    except Exception:  # noqa: BLE001 - any parse failure: the file is not a key
        raise SwarmError(f"{path} is not a libp2p identity key") from None


def peer_id_of(maddr: str) -> PeerID:
    """The /p2p/<id> component of a multiaddr, with a clear error."""
    try:
        return PeerID.from_base58(Multiaddr(maddr).value_for_protocol("p2p"))
    except Exception:  # noqa: BLE001 - any parse failure is the same user error
        raise SwarmError(f"{maddr!r} is not a multiaddr ending in /p2p/<peer id>") from None


class SwarmNode:
    """DHT + P2P + blob server for one process; owns its background loop and heartbeat."""

    def __init__(
        self,
        *,
        initial_peers: list[str],
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        run_id: str | None = None,
        announce: list[str] | None = None,
        reach: str | None = None,
        relay_service: bool = False,
    ) -> None:
        """`reach`: "direct" (others can dial us), "relay" (through the first initial peer's
        relay), "auto" (ask that peer to dial us back, then pick) or None (we only dial out:
        `pull` and `status`; nothing said about it).
        `relay_service`: we are the swarm's public peer (the coordinator): relay for others,
        answer dial-backs and pass blobs on from relayed peers (protocols/reach.py)."""
        if reach is not None and reach not in REACH_MODES:
            raise SwarmError(f"reachability must be one of {', '.join(REACH_MODES)}, not {reach!r}")
        if reach in ("auto", "relay") and not initial_peers:
            raise SwarmError("relay and auto reachability need --initial-peers (the relay)")
        if reach in ("auto", "relay") and not re.match(RELAY_MADDR, initial_peers[0]):
            raise SwarmError(
                f"the first --initial-peers address, {initial_peers[0]!r}, cannot be a relay:"
                " it must look like /ip4/IP/tcp/PORT/p2p/ID (or /dns4/NAME/..., /ip6/...)"
            )
        if reach == "relay" and relay_service:
            raise SwarmError("--serve-relay needs a peer others can dial, not --reachability relay")
        self._announce_maddrs = announce_multiaddrs(announce or [], port)
        install_p2pd_args()
        remove_stale_hivemind_sockets()
        lifeline.install()  # the DHT, p2pd and averagers forked from here end with this process
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        key = load_or_create_key(workdir / "records.key") if workdir else RSAPrivateKey()
        self.signer = RSASignatureValidator(key)
        # our libp2p identity: p2pd runs with it, and it signs what must name us beyond forgery
        # (our records' owner key, round certificates); a node without a work dir gets a
        # throwaway one in a temporary directory
        self._scratch = None if workdir else tempfile.TemporaryDirectory(prefix="swarmtune-id-")
        self._identity_path = (workdir or Path(self._scratch.name)) / "p2p.key"  # type: ignore[union-attr]
        if not self._identity_path.exists():
            P2P.generate_identity(str(self._identity_path))
        try:
            self.identity = Identity.load(self._identity_path)
        except IdentityError as exc:
            raise SwarmError(str(exc)) from None
        proof = identity_proof(self.identity, owner_subkey(self.signer))
        self._record_key = {"key": proof.key, "key_sig": proof.sig}
        self._validators: list[Any] = [self.signer] + (
            [RunRecordValidator(run_id)] if run_id else []
        )
        self._initial_peers, self._workdir, self._host, self._port = (
            initial_peers,
            workdir,
            host,
            port,
        )
        self.run_id = run_id
        self.coordinator = ""  # the manifest's coordinator, once known (set_run)
        self.dropped_records = 0  # records in the last read that lied (parse_peer_records)
        self.store_failure = ""  # why storing our record last failed ("": it worked)
        self.relay_service = relay_service
        self.relay_maddr = ""  # the relay's multiaddr while we are reached through it
        self.reach = "direct"
        self.reach_note = "the swarm's public peer" if relay_service else ""
        self._start_dht(relayed=reach == "relay", first=True)
        # after the DHT's fork: a fresh process should not inherit a running loop thread
        self.loop = LoopThread()
        self.loop.loop.set_exception_handler(_quiet_disconnects)
        try:
            self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=30)
            if reach == "auto":
                self._decide_reach(relay_service)
        except BaseException:  # nothing of ours may outlive a failed start
            self.loop.shutdown()
            self.dht.shutdown()
            raise
        if reach in ("relay", "direct"):
            self.reach_note = f"as asked (--reachability {reach})"
        self.peer_id = self.dht.peer_id.to_base58()
        # relayed peers of the run -> the maddr we know for their relay ("" when it is us)
        self._relayed: dict[str, str] = {}
        self._relay_routes: list[str] = []  # every relay we know, other than us
        self._relays = {peer_id_of(m).to_base58(): m for m in initial_peers if "/p2p/" in m}
        self._passing_on = asyncio.Semaphore(MAX_PASSING_ON)
        self.blobs = BlobServer(self.p2p, proxy=self._pass_on if relay_service else None)
        self.loop.run(self.blobs.start(), timeout=30)
        self.direct = False  # large blobs over direct TCP where possible (enable_direct)
        self._no_direct: set[str] = set()  # peers a direct transfer failed with: p2p only
        if relay_service:
            self.loop.run(DialBackServer(self.p2p).start(), timeout=30)
        self._record: PeerRecord | None = None
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()
        if self.reach == "relay":
            log.info("reachability: relay through %s (%s)", self.relay_maddr, self.reach_note)
        elif reach is not None or relay_service:
            also = "; relays for volunteers behind NAT" if relay_service else ""
            log.info("reachability: direct (%s)%s", self.reach_note, also)

    def _start_dht(self, *, relayed: bool, first: bool) -> None:
        """Start the DHT (and p2pd); relayed: as a DHT client reserving a slot on the relay."""
        options: dict[str, Any] = {}
        if self.relay_service:
            options["force_reachability"] = "public"  # the relay serves only when public
        if relayed:
            self.relay_maddr = self._initial_peers[0]
            self.reach = "relay"
            options.update(
                client_mode=True,  # nobody can dial us for DHT requests
                use_auto_relay=True,
                force_reachability="private",  # libp2p never decides this on private networks
                trusted_relays=[self.relay_maddr],
            )
        if not first:  # our own identity's old connections may not have closed yet
            options["check_if_identity_free"] = False
        try:
            self.dht = QuietDHT(
                initial_peers=self._initial_peers,
                host_maddrs=[f"/ip4/{self._host}/tcp/{self._port}"],
                announce_maddrs=self._announce_maddrs or None,
                identity_path=str(self._identity_path),
                record_validators=self._validators,
                start=True,
                await_ready=True,
                **options,
            )
        except Exception as exc:  # noqa: BLE001 - hivemind reports bootstrap failures variously
            where = ", ".join(self._initial_peers) or f"{self._host}:{self._port}"
            raise SwarmError(f"cannot start a DHT peer with {where}: {str(exc)[:160]}") from None

    def _decide_reach(self, relay_service: bool) -> None:
        """`auto`: stay direct if the peer we joined through can dial us back, else restart
        the DHT in relay mode (a relay service must be dialable: SwarmError)."""
        reachable, why = self._dial_back()
        if reachable is not True and relay_service:
            raise SwarmError(f"--serve-relay needs a peer others can dial, and {why}")
        if reachable is False:
            self.reach_note = f"the peer we joined through could not dial us ({why})"
            self.dht.shutdown()
            self._start_dht(relayed=True, first=False)
            self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=30)
        else:
            self.reach_note = f"the peer we joined through dialed {why}" if reachable else why

    def _dial_back(self) -> tuple[bool | None, str]:
        """Ask the first initial peer to dial our listening port back (see protocols/reach.py)."""
        ports = {
            int(str(a).split("/")[4]) for a in self.dht.get_visible_maddrs() if "/tcp/" in str(a)
        }
        if not ports:
            return False, "we listen on no TCP port"
        coordinator = peer_id_of(self._initial_peers[0])
        return self.loop.run(ask_dial_back(self.p2p, coordinator, min(ports)), timeout=30)

    def maddrs(self) -> list[str]:
        """Multiaddrs others can use as --initial-peers, the most widely dialable first."""
        return rank_maddrs([str(a) for a in self.dht.get_visible_maddrs()])

    def set_run(self, run_id: str, coordinator: str = "") -> None:
        """Start validating this run's records (for peers that learn the run from the manifest);
        `coordinator`: the peer id the manifest names, the only one whose record may say so."""
        self.coordinator = coordinator or self.coordinator
        if self.run_id is None:
            self.run_id = run_id
            self.dht.add_validators([RunRecordValidator(run_id)])

    def publish_manifest(self, manifest: ManifestRecord) -> None:
        """Serve the manifest over p2p and store it, signed, in the DHT."""
        self.blobs.publish("manifest", manifest.model_dump_json().encode())
        ok = self.dht.store(
            manifest_key(manifest.run_id),
            manifest.model_dump(),
            expiration_time=get_dht_time() + 3600,
            subkey=owner_subkey(self.signer),
        )
        if not ok:
            log.warning("manifest was not stored in the DHT (no peers accepted it yet)")

    def fetch_manifest(self, maddr: str, timeout: float = 30.0) -> ManifestRecord:
        """Ask the peer at `maddr` (authenticated by its peer id) for the run manifest.

        A busy coordinator may drop a stream while many peers join at once: transfer errors
        are retried (3 attempts) before giving up with one line.
        """
        peer = peer_id_of(maddr)
        for attempt in range(3):
            try:
                blob = self.loop.run(
                    fetch_blob(self.p2p, peer, "manifest", max_size=1 << 20, timeout=timeout),
                    timeout=timeout + 5,
                )
                break
            except (TransferError, TimeoutError) as exc:
                if attempt == 2:
                    raise SwarmError(
                        f"could not get the run manifest from {maddr}: {exc}"
                    ) from None
                log.info("manifest fetch failed (%s); retrying", str(exc)[:80])
                time.sleep(1.0 + attempt)
        try:
            return ManifestRecord.model_validate_json(blob)
        except ValueError as exc:
            raise SwarmError(f"the manifest from {maddr} is malformed: {str(exc)[:120]}") from None

    def set_record(self, record: PeerRecord) -> None:
        """Replace this peer's heartbeat record and store it now."""
        self._record = record
        self._store_record()

    def peers(self) -> dict[str, PeerRecord]:
        """Live peer records of this run, by peer id."""
        if self.run_id is None:
            return {}
        found = self._get(peers_key(self.run_id))
        records, self.dropped_records = parse_peer_records(
            found.value if found is not None else None, self.coordinator
        )
        if found is not None:
            relays = self._known_relays(records)
            self._relayed = self._relays_of(records, relays)
            self._relay_routes = [m for pid, m in relays.items() if pid != self.peer_id]
        return records

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
            except SwarmError:
                continue
            if relay_id == self.peer_id:
                relayed[pid] = ""
            elif relay_id in relays:
                relayed[pid] = relays[relay_id]
        return relayed

    def _get(self, key: str) -> Any:
        """The newest value under `key`, or None when the DHT does not answer within
        DHT_GET_TIMEOUT (a busy swarm must not freeze a round loop or a Ctrl+C), or at once
        when its process is gone (a terminal's Ctrl+C signals it too)."""
        if not self.dht.is_alive():
            return None
        future = self.dht.get(key, latest=True, return_future=True)
        try:
            return future.result(timeout=DHT_GET_TIMEOUT)
        except TimeoutError:
            future.cancel()
            log.debug("DHT get of %s timed out", key)
            return None

    def store_owned(self, key: str, value: dict[str, Any], ttl: float) -> None:
        """Store a record under our owner subkey (signed; nobody else can overwrite it)."""
        self.dht.store(
            key,
            value,
            expiration_time=get_dht_time() + ttl,
            subkey=owner_subkey(self.signer),
            return_future=True,
        )

    def get_owned(self, key: str) -> dict[bytes, Any]:
        """Every owner's record under `key`, by owner subkey (values as stored, unvalidated)."""
        found = self._get(key)
        if found is None or not isinstance(found.value, dict):
            return {}
        return {k: getattr(v, "value", None) for k, v in found.value.items()}

    @property
    def owner_key(self) -> str:
        """This peer's owner subkey, as text (published in the manifest by the coordinator)."""
        return owner_subkey(self.signer).decode("ascii", errors="replace")

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
            self._routes(peer_id), peer_id, name, sha256, timeout, max_size, stats
        )

    def _routes(self, peer_id: str) -> list[str]:
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
                failure = exc if failure is None or "unknown blob" in str(exc) else failure
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
        self, wanted: dict[str, tuple[str, str, int]], timeout: float
    ) -> dict[str, bytes | TransferError]:
        """Blobs from several peers at once: peer -> (name, sha256, size) in; peer -> the
        verified bytes or the TransferError that says why not, out. A blob its peer does not
        serve yet is asked for again for REVEAL_WAIT_S (a member that withholds its blob costs
        the others that much, once per round); a stream that ended early, up to
        TRUNCATED_RETRIES more times within that window."""

        reveal_by = time.monotonic() + min(timeout, REVEAL_WAIT_S)

        async def one(peer: str, name: str, sha: str, size: int) -> bytes | TransferError:
            cut_short = 0
            while True:
                try:
                    return await self._fetch(peer, name, sha, timeout, max_size=size)
                except TransferError as exc:
                    # a member publishes its blob the moment its group formed: asked a moment
                    # earlier, it does not know the name yet; and a stream that a busy p2pd
                    # reset (seen on loopback under load) is worth another try or two
                    truncated = isinstance(exc, StreamEndedEarly)
                    cut_short += truncated
                    retry = "unknown blob" in str(exc) or (
                        truncated and cut_short <= TRUNCATED_RETRIES
                    )
                    if not retry or time.monotonic() >= reveal_by:
                        return exc
                await asyncio.sleep(UNKNOWN_RETRY_S)

        async def every() -> list[bytes | TransferError]:
            return await asyncio.gather(*(one(p, *w) for p, w in wanted.items()))

        if not wanted:
            return {}
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
            return await refuse(writer, f"{peer} is not a peer relayed here")
        if self._passing_on.locked():
            return await refuse(writer, "relay busy: try again")
        async with self._passing_on:
            try:
                return await asyncio.wait_for(
                    pass_on_blob(self.p2p, peer_id, name, writer, MAX_PASSED_ON),
                    PASS_ON_TIMEOUT,
                )
            except asyncio.TimeoutError:
                return 0  # the stream closes short: the asking side sees a truncation

    def _connect_relayed(self) -> None:
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

    def _store_record(self) -> None:
        if self._record is None or self.run_id is None:
            return
        self._record = with_fields(
            self._record,
            stored_at=time.time(),
            reach=self.reach,
            relay=self.relay_maddr,
            serves_relay=self.relay_service,
            **self._record_key,
        )
        future = self.dht.store(
            peers_key(self.run_id),
            self._record.model_dump(),
            expiration_time=get_dht_time() + PEER_TTL,
            subkey=owner_subkey(self.signer),
            return_future=True,
        )
        future.add_done_callback(self._record_stored)

    def _record_stored(self, future: Any) -> None:
        """Say when storing our record starts failing, and when it works again (not every
        beat): while it fails, other peers see none of this peer's progress."""
        try:
            why = "" if future.result() else "no DHT peer accepted it"
        except Exception as exc:  # noqa: BLE001 - whatever the DHT raised is the reason
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if why == self.store_failure or self._stop.is_set():
            return
        if why:
            log.warning("storing our peer record failed (%s): other peers do not see this"
                        " peer's progress until a store succeeds", why)  # fmt: skip
        else:
            log.info("our peer record is stored again")
        self.store_failure = why

    def _beat(self) -> None:
        next_store = time.monotonic() + PEER_TTL / 3
        last = ""
        while not self._stop.wait(RELAY_CHECK_S):
            try:
                if time.monotonic() >= next_store:  # by the clock: a slow check cannot delay it
                    next_store = time.monotonic() + PEER_TTL / 3
                    self._store_record()
                if self.reach == "relay":
                    self.peers()  # who else is relayed (other peers learn it from their reads)
                self._connect_relayed()
                last = ""
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive a bad beat
                if self._stop.is_set():
                    break
                if str(exc) != last:  # once per kind of failure, not once per beat
                    log.warning("heartbeat: %s: %s", type(exc).__name__, exc)
                last = str(exc)

    def serve_tickets(self, grant: Grant) -> None:
        """Answer ticket requests (`admission.policy: address`) with `grant(peer, address)`."""
        self.loop.run(TicketDesk(self.p2p, grant).start(), timeout=30)

    def ask_ticket(self, coordinator: str) -> str:
        """A ticket from the coordinator's desk; SwarmError with its reason when refused."""
        try:
            return self.loop.run(ask_ticket(self.p2p, PeerID.from_base58(coordinator)), timeout=30)
        except (TicketDeskError, TimeoutError) as exc:
            raise SwarmError(f"no admission ticket: {exc}") from None

    def enable_direct(self) -> None:
        """Serve and fetch large blobs over direct TCP connections where the peers can dial
        each other (protocols/direct.py; the run's averaging.direct_tcp). The listener takes
        any free port on this peer's --host."""
        if self.blobs.direct is None:
            self.blobs.direct = DirectServer(self._host)
            log.info("direct TCP transfers on %s:%d", self._host, self.blobs.direct.port)
        self.direct = True

    def shutdown(self) -> None:
        """Stop serving and leave; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.blobs.direct is not None:
            self.blobs.direct.close()
        try:
            self.loop.run(self.blobs.stop(), timeout=5)
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - best effort while leaving
            log.debug("p2p shutdown: %s", exc)
        self.loop.shutdown()
        self.dht.shutdown()
        if self._scratch is not None:
            self._scratch.cleanup()


class QuietDHT(DHT):
    """hivemind's DHT process, ending with one line instead of a traceback when its pipe from
    the main process breaks mid-request: a terminal's Ctrl+C stops the main process while a
    thread of it (an overlapped exchange) still hands the DHT a request, and the request's
    shared pipe end can no longer be fetched from the exiting process."""

    def run(self) -> None:
        try:
            super().run()
        except (EOFError, ConnectionError) as exc:
            log.info("DHT process: the main process went away mid-request (%r); ending", exc)


def _quiet_disconnects(loop: Any, context: dict[str, Any]) -> None:
    """A peer hanging up mid-handshake is routine on a P2P network, not an error to print."""
    if isinstance(context.get("exception"), (asyncio.IncompleteReadError, ConnectionError)):
        log.debug("peer disconnected: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)
