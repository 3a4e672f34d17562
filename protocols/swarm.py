"""A peer's presence in the swarm: its identity, the DHT and p2pd with the reachability decision,
and the heartbeat; its records (record_store.py) and blob routes (routing.py) hang off it."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey

from swarmtune.protocols import lifeline
from swarmtune.protocols.hivemind_private import QuietDHT, install_p2pd_args
from swarmtune.protocols.identity import Identity, IdentityError
from swarmtune.protocols.reach import (
    REACH_MODES,
    DialBackServer,
    ask_dial_back,
)
from swarmtune.protocols.record_store import RecordStore
from swarmtune.protocols.records import (
    PEER_TTL,
    RELAY_MADDR,
    ManifestRecord,
)
from swarmtune.protocols.routing import RELAY_CHECK_S, BlobRouter
from swarmtune.protocols.routing import peer_id_of as multiaddr_peer
from swarmtune.protocols.runner import LoopThread
from swarmtune.protocols.sockets import remove_stale_hivemind_sockets
from swarmtune.protocols.ticket_desk import (
    DeskUnanswered,
    Grant,
    TicketDesk,
    TicketDeskError,
    ask_ticket,
)
from swarmtune.protocols.transfer import (
    TransferError,
    fetch_blob,
)
from swarmtune.protocols.validator import RunRecordValidator

log = logging.getLogger("swarmtune.swarm")
TICKET_ATTEMPTS = 3  # requests to the ticket desk that get no answer before join gives up
TICKET_RETRY_S = 2.0  # wait before the next one, times the attempt number


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
        return multiaddr_peer(maddr)
    except ValueError as exc:
        raise SwarmError(str(exc)) from None


class SwarmNode:
    """One process's presence in the swarm: its identity, the DHT (and p2pd) with the
    reachability decision that may restart it, and a heartbeat. What it does there lives in
    two parts with narrow interfaces: `records` (RecordStore: our signed records, reads of the
    run's) and `routes` (BlobRouter: fetching others' blobs, relaying); `blobs` serves ours."""

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
        signer = RSASignatureValidator(key)
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
        self._validators: list[Any] = [signer] + ([RunRecordValidator(run_id)] if run_id else [])
        self._initial_peers, self._host, self._port = initial_peers, host, port
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
        self.records = RecordStore(self.dht, signer, self.identity, run_id)
        self.records.set_reach(self.reach, self.relay_maddr, relay_service)
        self.routes = BlobRouter(
            self.p2p, self.loop, self.peer_id, self.records.recent, initial_peers, relay_service
        )
        self.blobs = self.routes.server  # what we serve
        self.loop.run(self.blobs.start(), timeout=30)
        if relay_service:
            self.loop.run(DialBackServer(self.p2p).start(), timeout=30)
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

    def publish_manifest(self, manifest: ManifestRecord) -> None:
        """Serve the manifest over p2p and store it, signed, in the DHT."""
        self.blobs.publish("manifest", manifest.model_dump_json().encode())
        self.records.publish_manifest(manifest)

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

    def _beat(self) -> None:
        """Every RELAY_CHECK_S: store our record again when a third of its TTL has passed,
        relearn the routes from the run's records, and reopen relayed connections."""
        next_store = time.monotonic() + PEER_TTL / 3
        last = ""
        while not self._stop.wait(RELAY_CHECK_S):
            try:
                if time.monotonic() >= next_store:  # by the clock: a slow check cannot delay it
                    next_store = time.monotonic() + PEER_TTL / 3
                    self.records.store_record()
                self.routes.learn(RELAY_CHECK_S)
                self.routes.connect_relayed()
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

    def ask_ticket(self, coordinator: str, attempts: int = TICKET_ATTEMPTS) -> str:
        """A ticket from the coordinator's desk; SwarmError with its reason when refused, or
        when `attempts` requests got no answer (measured: with 12 volunteers joining at once
        on 2 cores one request's stream failed; asking again is cheap)."""
        for attempt in range(1, attempts + 1):
            try:
                ask = ask_ticket(self.p2p, PeerID.from_base58(coordinator))
                return self.loop.run(ask, timeout=30)
            except (DeskUnanswered, TimeoutError) as exc:
                if attempt == attempts:
                    raise SwarmError(f"no admission ticket: {exc}") from None
                log.info("ticket request %d of %d got no answer (%s); asking again", attempt,
                         attempts, exc)  # fmt: skip
                time.sleep(TICKET_RETRY_S * attempt)
            except TicketDeskError as exc:
                raise SwarmError(f"no admission ticket: {exc}") from None
        raise AssertionError("unreachable")

    def enable_direct(self) -> None:
        """Large blobs over direct TCP where peers can dial each other, listening on --host."""
        self.routes.enable_direct(self._host)

    def shutdown(self) -> None:
        """Stop serving and leave; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.records.close()
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


def _quiet_disconnects(loop: Any, context: dict[str, Any]) -> None:
    """A peer hanging up mid-handshake is routine on a P2P network, not an error to print."""
    if isinstance(context.get("exception"), (asyncio.IncompleteReadError, ConnectionError)):
        log.debug("peer disconnected: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)
