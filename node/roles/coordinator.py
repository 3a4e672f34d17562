"""`swarmtune bootstrap`: a stable peer that publishes the signed manifest and mirrors adapters."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from swarmtune.node.adapters.adapter import AdapterError
from swarmtune.node.adapters.offers import Offer, run_may_vote, verified_bundle, vouched_offers
from swarmtune.node.clusters.clusterer import Clusterer, merge_bundles, verified_signatures
from swarmtune.node.config import load_config, parse_config
from swarmtune.node.engine.certify import certified_votes
from swarmtune.node.engine.checkpoint import atomic_write
from swarmtune.node.local.basemodel import load_base, resolve_target_modules
from swarmtune.node.roles.admit import AddressLedger, read_revoked, save_manifest
from swarmtune.node.roles.consumer import fetch_certificate
from swarmtune.node.watch.history import FILE_NAME, History
from swarmtune.node.watch.snapshot import PAGE_FILE, snapshot
from swarmtune.node.watch.tensorboard import SwarmLog
from swarmtune.protocols.certificates import CertificateError, encode_chain
from swarmtune.protocols.records import (
    AdapterOffer,
    ManifestRecord,
    PeerRecord,
    RevocationRecord,
    clusters_key,
    peers_key,
    revoked_key,
    signatures_key,
    with_fields,
)
from swarmtune.protocols.swarm import SwarmError, SwarmNode, address_kind
from swarmtune.protocols.transfer import TransferError
from swarmtune.protocols.web import StatusServer

log = logging.getLogger("swarmtune.bootstrap")
MIRROR_INTERVAL = 1.0
MANIFEST_REFRESH = 600.0
SIGNATURE_WAIT_S = 30.0
MIRROR_TIMEOUT = 20.0  # a busy volunteer's adapter can wait for the next tick; Ctrl+C cannot


@dataclass
class BootstrapOptions:
    """Per-machine settings of the coordinator."""

    config: Path
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    addr_file: Path | None = None
    announce: list[str] | None = None  # addresses other machines dial (with a fixed port)
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # the status page; None: not served
    report_to: str | None = None  # "tensorboard": swarm-wide event files in the work dir


class Coordinator:
    """Keeps the manifest alive, watches peers join and leave, mirrors the newest adapters."""

    def __init__(
        self,
        node: SwarmNode,
        manifest: ManifestRecord,
        workdir: Path | None = None,
        swarm_log: SwarmLog | None = None,
    ) -> None:
        """`swarm_log`: TensorBoard event files of the swarm's rounds (--report-to)."""
        self.node = node
        self.manifest = manifest
        self.workdir = workdir
        self.revoked: list[str] | None = None  # as last published
        self.record = PeerRecord(peer_id=node.peer_id, role="coordinator")
        self.known: set[str] = set()
        self.failed: set[tuple[str, int, str]] = set()
        self.stop = threading.Event()
        self.settings = parse_config(manifest.config).clustering
        self.clusterer = Clusterer(self.settings, node.peer_id) if self.settings.enabled else None
        self.merged_round = -1
        self.first_signature_at: float | None = None
        self.history = History(workdir / FILE_NAME if workdir is not None else None)
        self.swarm_log = swarm_log
        self.view_lock = threading.Lock()
        # what the status page shows, rebuilt every tick
        self.view = snapshot(manifest, {}, None, {}, time.time())
        self.may_vote = run_may_vote(manifest)  # whose votes prove an adapter it mirrors

    def page_data(self, query: Mapping[str, str]) -> dict:
        """The status page's JSON: the last tick's snapshot, and the history points after the
        query's `since` (a time the page got earlier points at), or all of them."""
        try:
            since = float(query["since"]) if "since" in query else None
        except ValueError:
            since = None
        with self.view_lock:
            view = dict(self.view)
            points = [p for p in self.history.points if since is None or p["t"] > since]
        view["history"] = points
        return view

    def watch(self, records: dict[str, PeerRecord]) -> None:
        """Record new round points, log them, and rebuild the status page's snapshot."""
        now = time.time()
        clusters = self.clusterer.record if self.clusterer is not None else None
        with self.view_lock:
            new = self.history.observe(records, now)
            offers = vouched_offers(records, self.node.peer_id, self.may_vote)
            view = snapshot(self.manifest, records, clusters, offers, now)
            self.view = view
        if self.swarm_log is not None and new:
            self.swarm_log.add(new, self.history.points)

    def tick(self) -> None:
        """One pass: report membership changes, update the status view, mirror newer adapters."""
        records = self.node.records.peers()
        records.setdefault(self.node.peer_id, self.record)
        peers = {pid: r for pid, r in records.items() if pid != self.node.peer_id}
        for pid in sorted(set(peers) - self.known):
            log.info("peer %s joined (%s)", pid[-8:], peers[pid].task or peers[pid].role)
        for pid in sorted(self.known - set(peers)):
            log.info("peer %s left", pid[-8:])
        self.known = set(peers)
        self.publish_revocations()
        if self.clusterer is not None:
            self.recluster({pid for pid, r in peers.items() if r.role == "volunteer"})
        self.watch(records)
        for offer in vouched_offers(peers, self.node.peer_id, self.may_vote).values():
            if self.stop.is_set():
                return
            mine = self.record.adapters.get(offer.name)
            if (mine is None or offer.round > mine.round) and (
                offer.name,
                offer.round,
                offer.sha256,
            ) not in self.failed:
                self.mirror(offer)

    def publish_revocations(self, force: bool = False) -> None:
        """Publish `swarmtune revoke`'s list when it changed (members reread it every round)."""
        if self.workdir is None:
            return
        revoked = read_revoked(self.workdir)
        if revoked == self.revoked and not force:
            return
        if revoked != self.revoked:
            for peer in sorted(set(revoked) - set(self.revoked or [])):
                log.info("ticket of %s revoked", peer[-8:])
        self.revoked = revoked
        record = RevocationRecord(version=len(revoked), revoked=revoked[-1000:])
        self.node.records.store_owned(
            revoked_key(self.manifest.run_id), record.model_dump(), 2 * MANIFEST_REFRESH
        )

    def recluster(self, live: set[str]) -> None:
        """Cluster the live volunteers' signatures; publish a new assignment when due."""
        assert self.clusterer is not None
        run = self.manifest.run_id
        signatures = verified_signatures(
            self.node.records.get_owned(peers_key(run)),
            self.node.records.get_owned(signatures_key(run)),
        )
        live_signatures = {p: s for p, s in signatures.items() if p in live}
        if self.first_partition_waits(live, live_signatures):
            return
        try:
            record = self.clusterer.update(live_signatures)
        except ValueError as exc:
            log.warning("could not cluster the signatures: %s", exc)
            return
        if record is not None:
            self.publish_clusters()
            members: dict[int, list[str]] = {}
            for peer, cluster in sorted(record.assignment.items()):
                members.setdefault(cluster, []).append(peer[-8:])
            log.info("clusters v%d at round %d: %s", record.version, record.round, members)
        self.maybe_merge()

    def first_partition_waits(self, live: set[str], signed: Mapping[str, object]) -> bool:
        """Before the first assignment, wait (at most SIGNATURE_WAIT_S after the first signature)
        until every live volunteer has published its signature, so that a group does not split
        in two steps (which would leave members waiting in a group the others just left)."""
        if self.clusterer is None or self.clusterer.record is not None or not signed:
            return False
        if self.first_signature_at is None:
            self.first_signature_at = time.monotonic()
        missing = live - set(signed)
        waited = time.monotonic() - self.first_signature_at
        return bool(missing) and waited < SIGNATURE_WAIT_S

    def publish_clusters(self) -> None:
        """(Re)store the current assignment, signed by the coordinator."""
        if self.clusterer is not None and self.clusterer.record is not None:
            record = self.clusterer.record.model_dump()
            self.node.records.store_owned(
                clusters_key(self.manifest.run_id), record, MANIFEST_REFRESH * 2
            )

    def maybe_merge(self) -> None:
        """Every merge_every rounds, merge the clusters' adapters into `merged`."""
        assert self.clusterer is not None
        record = self.clusterer.record
        clusters = sorted(set(record.assignment.values())) if record else []
        names = [f"cluster-{c}" for c in clusters]
        offers = [self.record.adapters.get(n) for n in names]
        if len(names) < 2 or any(o is None for o in offers):
            return
        newest = min(o.round for o in offers if o is not None)
        if newest < self.merged_round + self.settings.merge_every:
            return
        bundles = {n: self.node.blobs.get(f"adapter:{n}") for n in names}
        sizes = Counter(record.assignment.values()) if record else Counter()
        weights = {f"cluster-{c}": float(sizes[c]) for c in clusters}
        try:
            merged = merge_bundles({n: b for n, b in bundles.items() if b}, weights, self.settings)
        except (AdapterError, TransferError, ValueError) as exc:
            log.warning("merging the cluster adapters failed: %s", exc)
            return
        self.node.blobs.publish("adapter:merged", merged)
        sha = hashlib.sha256(merged).hexdigest()
        adapters = dict(self.record.adapters)
        adapters["merged"] = AdapterOffer(round=newest, sha256=sha, size=len(merged))
        self.record = with_fields(self.record, adapters=adapters)
        self.node.records.set_record(self.record)
        self.merged_round = newest
        log.info(
            "merged %d cluster adapters (%s) at round %d into `merged` (sha256 %s…)",
            len(names),
            self.settings.merge_method,
            newest,
            sha[:12],
        )

    def mirror(self, offer: Offer) -> None:
        """Download an adapter bundle (sha-checked) and its round certificate, check that the
        certificate proves it, and serve both."""
        for provider in offer.providers:
            if self.stop.is_set():
                return
            try:
                bundle = self.node.routes.fetch(
                    provider,
                    f"adapter:{offer.name}",
                    expected_sha256=offer.sha256,
                    timeout=MIRROR_TIMEOUT,
                )
                cert = fetch_certificate(self.node, provider, offer.name)
                verified_bundle(bundle, cert, offer, self.manifest, self.may_vote)
            except (TransferError, TimeoutError, AdapterError, CertificateError) as exc:
                log.warning("mirroring %s from %s failed: %s", offer.name, provider[-8:], exc)
                continue
            assert cert is not None  # (check_bundle refuses a state's adapter without one)
            proven = cert.with_votes(certified_votes(cert.with_votes(offer.votes), self.may_vote))
            self.node.blobs.publish(f"cert:{offer.name}", encode_chain([proven]))
            self.node.blobs.publish(f"adapter:{offer.name}", bundle)
            adapters = dict(self.record.adapters)
            adapters[offer.name] = AdapterOffer(
                round=offer.round, sha256=offer.sha256, size=len(bundle), state=offer.state
            )
            self.record = with_fields(self.record, adapters=adapters)
            self.node.records.set_record(self.record)
            log.info(
                "adapter %s round %d mirrored (sha256 %s…, %d votes)",
                offer.name,
                offer.round,
                offer.sha256[:12],
                len(proven.votes),
            )
            return
        self.failed.add((offer.name, offer.round, offer.sha256))

    def serve(self) -> None:
        """Run until stopped, refreshing the manifest well before it expires."""
        self.node.records.set_record(self.record)
        since_manifest = 0.0
        while not self.stop.wait(MIRROR_INTERVAL):
            self.tick()
            since_manifest += MIRROR_INTERVAL
            if since_manifest >= MANIFEST_REFRESH:
                self.node.publish_manifest(self.manifest)
                self.publish_clusters()
                self.publish_revocations(force=True)
                since_manifest = 0.0


def make_manifest(options: BootstrapOptions, peer_id: str, coordinator_key: str) -> ManifestRecord:
    """Resolve the config against the base model into the manifest volunteers must match."""
    config = load_config(options.config)
    base, _, fingerprint = load_base(config.base_model)
    targets = resolve_target_modules(config, base)
    return ManifestRecord(
        run_id=config.run_id,
        base_fingerprint=fingerprint,
        target_modules=targets,
        config=config.model_dump(mode="json"),
        coordinator=peer_id,
        coordinator_key=coordinator_key,
    )


def bootstrap(options: BootstrapOptions) -> int:
    """Entry point of `swarmtune bootstrap`; returns the exit code."""
    config = load_config(options.config)  # fail on a bad config before starting any process
    options.workdir.mkdir(parents=True, exist_ok=True)
    node = SwarmNode(
        initial_peers=[],
        workdir=options.workdir,
        host=options.host,
        port=options.port,
        run_id=config.run_id,
        announce=options.announce,
        relay_service=True,
    )
    server: StatusServer | None = None
    coordinator: Coordinator | None = None
    try:
        manifest = make_manifest(options, node.peer_id, node.records.owner_key)
        node.records.set_run(manifest.run_id, node.peer_id)  # no other record may claim our role
        if config.averaging.direct_tcp:  # the adapters it mirrors and serves
            node.enable_direct()
        node.publish_manifest(manifest)
        save_manifest(options.workdir, manifest.model_dump_json())
        if config.admission.policy == "address":  # tickets on request, priced by address
            ledger = AddressLedger(options.workdir, config.admission.identities_per_address)
            node.serve_tickets(ledger.grant)
        tensorboard = options.report_to == "tensorboard"
        swarm_log = SwarmLog(options.workdir) if tensorboard else None
        coordinator = Coordinator(node, manifest, options.workdir, swarm_log)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: coordinator.stop.set())
        announce(node, manifest, options.addr_file, options.workdir)
        if options.http_port is not None:
            server = serve_status_page(coordinator, options.http_host, options.http_port)
        serve_until_stopped(coordinator)
        log.info("shutting down")
        return 0
    finally:
        if server is not None:
            server.close()
        if coordinator is not None and coordinator.swarm_log is not None:
            coordinator.swarm_log.close(coordinator.history.points)
        node.shutdown()


def serve_status_page(coordinator: Coordinator, host: str, port: int) -> StatusServer:
    """Start the status page (docs/design.md, 9. Watching a run) and say where it is."""
    page = PAGE_FILE.read_bytes()
    try:
        server = StatusServer(host, port, page, coordinator.page_data)
    except OSError as exc:
        raise SwarmError(str(exc)) from None
    log.info("status page: %s (JSON: %sapi/status)", server.url, server.url)
    try:
        exposed = not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name such as `localhost`
        exposed = host != "localhost"
    if exposed:
        log.warning("the status page is open to anyone who can reach %s:%d", host, port)
    return server


def serve_until_stopped(coordinator: Coordinator, grace: float = 5.0) -> None:
    """Serve in a worker thread, so that a signal ends the coordinator within `grace` seconds
    even while a tick waits on a slow peer (the node's shutdown then cuts that wait short)."""
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            coordinator.serve()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, re-raised there
            failed.append(exc)

    worker = threading.Thread(target=serve, name="coordinator", daemon=True)
    worker.start()
    while worker.is_alive() and not coordinator.stop.wait(0.5):
        pass
    worker.join(grace)
    if failed:
        raise failed[0]
    if worker.is_alive():
        log.info("a transfer was still running; leaving without it")


def address_lines(maddrs: list[str]) -> str:
    """Every address the coordinator is reachable at, best first, with who can dial it."""
    reach = {
        "public": "public: what other machines should use",
        "private network": "private network: machines on the same network (or VPN) only",
        "loopback": "loopback: this machine only; listen with --host 0.0.0.0 for others",
        "other": "other",
    }
    width = max(len(m) for m in maddrs)
    lines = [f"  {m:<{width}}  {reach[address_kind(m)]}" for m in maddrs]
    kinds = {address_kind(m) for m in maddrs}
    if "private network" in kinds and "public" not in kinds:
        lines.append(
            "  (no public address: behind NAT, forward a fixed --port and pass --announce"
            " PUBLIC_IP)"
        )
    return "reachable at:\n" + "\n".join(lines)


def announce(
    node: SwarmNode, manifest: ManifestRecord, addr_file: Path | None, workdir: Path | None = None
) -> None:
    """Print the line to hand out, and write the multiaddrs to --addr-file."""
    maddrs = node.maddrs()
    digest = hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()[:12]
    log.info(
        "run %s: base %s…, LoRA targets %s, manifest %s",
        manifest.run_id,
        manifest.base_fingerprint[:12],
        ",".join(manifest.target_modules),
        digest,
    )
    if addr_file is not None:
        atomic_write(addr_file, ("\n".join(maddrs) + "\n").encode())
    print(address_lines(maddrs), flush=True)
    admission = parse_config(manifest.config).admission
    token = admission.policy == "token"
    if admission.policy == "address":
        print(
            "this run hands every volunteer a ticket when it joins, at most"
            f" {admission.identities_per_address} per IPv4 address",
            flush=True,
        )
    print(
        f"volunteers join with:\n  swarmtune join --initial-peers {maddrs[0]} "
        "--data builtin:arithmetic --workdir ./vol1" + (" --ticket TICKET" if token else ""),
        flush=True,
    )
    if token:
        print(
            "this run admits ticket holders only: a volunteer runs `swarmtune id --workdir"
            " ./vol1` and sends you its peer id; you run `swarmtune admit PEER_ID --workdir"
            f" {workdir or 'COORDINATOR_WORKDIR'}` and send back the ticket",
            flush=True,
        )
