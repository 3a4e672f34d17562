"""`swarmtune join`: check the manifest, then train DiLoCo rounds with the group until done."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swarmtune.node.adapters.adapter import Provenance, adapter_files
from swarmtune.node.clusters.clusterer import TaskSignature
from swarmtune.node.clusters.member import ClusterMember, group_prefix
from swarmtune.node.config import RunConfig, load_config, parse_config
from swarmtune.node.engine.checkpoint import Checkpoint
from swarmtune.node.engine.peer import Peer
from swarmtune.node.engine.round import RoundReport
from swarmtune.node.engine.state import GroupState
from swarmtune.node.engine.swarm_transport import HivemindTransport
from swarmtune.node.local.basemodel import check_local_base, resolve_device
from swarmtune.node.local.build import LocalModel, build_local_model
from swarmtune.node.local.sources import load_examples
from swarmtune.node.local.threads import ThreadShare
from swarmtune.node.roles.admit import read_revocations
from swarmtune.node.watch.tensorboard import ScalarLog, round_scalars
from swarmtune.protocols.admission import Gate, TicketError, read_ticket
from swarmtune.protocols.averaging import GroupAverager
from swarmtune.protocols.records import AdapterOffer, ManifestRecord, PeerRecord
from swarmtune.protocols.swarm import SwarmError, SwarmNode
from swarmtune.protocols.transfer import BlobServer, pack_files

log = logging.getLogger("swarmtune.join")
HANDOFF_TIMEOUT = 20.0


@dataclass
class JoinOptions:
    """Per-machine settings of a volunteer (everything else comes from the manifest)."""

    initial_peers: list[str]
    data: str
    workdir: Path
    rounds: int
    model: str | None = None
    quantize: str | None = None
    expect_config: Path | None = None  # refuse a run whose LoRA setup differs from this
    host: str = "127.0.0.1"
    port: int = 0
    ticket: str = ""  # admission ticket for token runs (`swarmtune admit`)
    report_to: str | None = None  # "tensorboard": event files in WORKDIR/tensorboard
    announce: list[str] | None = None  # addresses other machines dial (with a fixed port)
    overlap: bool | None = None  # None: the run's averaging.overlap
    eval_every: int = 1  # held-out eval every N rounds (it costs seconds on a real model)
    reachability: str = "auto"  # auto | direct | relay (protocols/reach.py)
    serve_relay: bool = False  # also relay for NATed volunteers (a dialable peer only)
    threads: int | None = None  # torch threads; None: a share of the cores (node/local/threads.py)
    wait_for: int = 1  # volunteers (this one included) to see announced before round one
    device: str = "auto"  # where the base and LoRA train: auto, cpu, cuda or mps
    precision: str = "fp32"  # autocast of the forward pass: fp32, bf16 or fp16
    loss: str = "completion"  # completion / assistant tokens only, or "full"
    packing: bool = True  # whole examples packed into rows; False: one padded example per row


def admission_gate(manifest: ManifestRecord, peer_id: str, ticket: str) -> Gate | None:
    """The run's ticket gate (None for open runs), after checking our own ticket: a volunteer
    without a valid one is refused here, with one line saying how to get one."""
    config = parse_config(manifest.config)
    if not config.admission.ticketed:
        return None
    try:
        gate = Gate(manifest.coordinator_key, manifest.run_id)
    except TicketError as exc:
        raise SwarmError(f"token run without a usable coordinator key: {exc}") from None
    why = gate.check(peer_id, ticket)
    if why is not None:
        raise SwarmError(
            f"run {manifest.run_id} admits ticket holders only ({why}): ask its coordinator"
            f" to run `swarmtune admit {peer_id}` and pass the ticket with --ticket"
        )
    expires = read_ticket(ticket).expires
    log.info(
        "admitted by ticket until %s", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))
    )
    return gate


def ticket_warning(expires: float, now: float) -> str | None:
    """What to tell a volunteer about its own ticket: None while it has over an hour left."""
    if expires <= now:
        return "your admission ticket has expired: members refuse you; ask for a new one"
    if expires - now < 3600:
        return f"your admission ticket expires in {(expires - now) / 60:.0f} min"
    return None


def check_compatible(manifest: ManifestRecord, local: LocalModel, own: RunConfig | None) -> None:
    """Refuse (SwarmError) when our base model or LoRA settings differ from the run's."""
    if local.fingerprint != manifest.base_fingerprint:
        raise SwarmError(
            f"base model mismatch: this model's fingerprint is {local.fingerprint[:12]}…,"
            f" the run expects {manifest.base_fingerprint[:12]}…"
        )
    if own is None:
        return
    run_lora = parse_config(manifest.config).lora
    ours = (own.lora.rank, own.lora.alpha, own.lora.dropout)
    theirs = (run_lora.rank, run_lora.alpha, run_lora.dropout)
    targets_differ = own.lora.target_modules not in ("auto", sorted(manifest.target_modules))
    if ours != theirs or targets_differ:
        raise SwarmError(
            f"LoRA config mismatch: yours (rank, alpha, dropout) = {ours}, "
            f"the run's = {theirs}, run targets {manifest.target_modules}"
        )


def progress_line(report: RoundReport, steps: int = 0) -> str:
    """One human line per round; a round that did not apply its group's aggregate says so,
    a round whose deadline stopped the inner steps short of `steps` (H) says how many it took,
    and the running totals of fallbacks, rejections and resyncs are always shown."""
    eval_part = ""
    if report.eval_loss is not None:
        exact = "" if report.eval_exact is None else f", exact {report.eval_exact:.0%}"
        eval_part = f" (eval {report.eval_loss:.3f}{exact})"
    status = "" if report.verified else f" [{report.outcome}: local update]"
    if report.outcome == "too-small":
        status = " [too-small: nothing aggregated]"
    resynced = " [resynced]" if report.resynced else ""
    tau = f" | ghbm tau {report.tau}" if report.tau is not None else ""
    if report.next_deadline_s is not None:  # inner.deadline_s: auto
        tau += f" | next deadline {report.next_deadline_s:.1f}s"
    short = f" ({report.steps} of {steps} steps: deadline)" if 0 < report.steps < steps else ""
    return (
        f"round {report.round + 1}: loss {report.loss_first:.3f} -> {report.loss_last:.3f}"
        f"{eval_part} | group {report.group_size}{status}{resynced}"
        f" | sent {report.bytes_sent / 1e6:.2f} MB recv {report.bytes_received / 1e6:.2f} MB"
        f" | inner {report.inner_s:.1f}s{short} matchmaking {report.matchmaking_s:.1f}s"
        f" exchange {report.transfer_s:.2f}s{' (overlapped)' if report.overlapped else ''} outer {report.outer_s:.3f}s"
        f" checkpoint {report.checkpoint_s:.3f}s{tau}"
        f" | fallbacks {report.fallbacks} rejected {report.rejections}"
        f" excluded {report.exclusions} resyncs {report.resyncs} unproven {report.unproven} banned {report.banned}"
    )


def adapter_name(cluster: int) -> str:
    """What a group's adapter is called: `global`, or `cluster-<id>` once assigned."""
    return "global" if cluster < 0 else f"cluster-{cluster}"


class AdapterShelf:
    """What a volunteer serves as its group's adapter: the state's LoRA tensors as a PEFT
    bundle, under the group's name (`global`, or `cluster-<id>`)."""

    def __init__(
        self, blobs: BlobServer, local: LocalModel, manifest: ManifestRecord, model: str
    ) -> None:
        self.blobs, self.local, self.manifest, self.model = blobs, local, manifest, model
        self.outer = parse_config(manifest.config).outer.name
        self.group = 1  # members of the last round, for the adapter's provenance

    def note_group(self, size: int) -> None:
        """The last round's group size (written into the next bundle's provenance)."""
        self.group = size

    def offer(self, state: GroupState, cluster: int) -> dict[str, AdapterOffer]:
        """Serve `state`'s adapter under its group's name; returns the offer for our record."""
        provenance = Provenance(
            self.manifest.run_id,
            state.round,
            self.group,
            self.outer,
            self.manifest.base_fingerprint,
            self.model,
        )
        bundle = pack_files(adapter_files(self.local.trainer, state.params, provenance))
        name = adapter_name(cluster)
        self.blobs.publish(f"adapter:{name}", bundle)
        sha = hashlib.sha256(bundle).hexdigest()
        offer = AdapterOffer(round=state.round, sha256=sha, size=len(bundle), state=state.digest())
        return {name: offer}


class Volunteer:
    """Wires a LocalModel to the swarm: averaging, announcements, adapter offers, metrics."""

    def __init__(
        self,
        node: SwarmNode,
        manifest: ManifestRecord,
        local: LocalModel,
        options: JoinOptions,
        stop: threading.Event,
        gate: Gate | None = None,
    ) -> None:
        self.node, self.manifest, self.local, self.options = node, manifest, local, options
        self.config = parse_config(manifest.config)
        self.gate = gate
        self.warned_expiry = False
        self.threads = ThreadShare(options.threads)
        self.threads.adjust()
        self.scalars = ScalarLog(options.workdir) if options.report_to == "tensorboard" else None
        # our heartbeat record is ours: the transport adds what it announces, report() the rest
        record = PeerRecord(
            peer_id=node.peer_id, role="volunteer", task=options.data[:64], ticket=options.ticket
        )
        node.records.set_record(record, store=False)  # stored with our first announcement
        self.totals = {"tokens": 0, "bytes_sent": 0, "bytes_received": 0}
        self.shelf = AdapterShelf(node.blobs, local, manifest, options.model or "embedded")
        revoked = (
            functools.partial(read_revocations, node, manifest.run_id, manifest.coordinator_key)
            if gate is not None
            else None
        )
        self.transport = HivemindTransport(
            node,
            functools.partial(make_averager, node, self.config, local.trainer.get_params(), gate),
            group_prefix(manifest.run_id, -1),
            offers=self.shelf.offer,
            ticket=options.ticket,
            revoked=revoked,
            started_together=options.wait_for > 1,
            admit=gate.check if gate is not None else None,
        )
        self.initial = local.trainer.get_params()  # the seeded round-0 adapter
        self.member: ClusterMember | None = None
        if self.config.clustering.enabled:
            self.member = ClusterMember(
                node, manifest, self.config, self.transport, options.workdir, self.probe_signature
            )
        self.peer = Peer(
            local.trainer,
            self.transport,
            self.config,
            Checkpoint(options.workdir),
            on_report=self.report,
            evaluate=local.evaluate,
            hooks=self.member,
            stop=stop,
            overlap=options.overlap,
            eval_every=options.eval_every,
            wait_for=options.wait_for,
            identity=node.identity,
            ticket=options.ticket,
        )

    def probe_signature(self, signature: TaskSignature) -> None:
        """H inner steps from the seeded initial adapter on our data; then restore our state."""
        trainer = self.local.trainer
        saved_params, saved_local = trainer.get_params(), copy.deepcopy(trainer.state_dict())
        trainer.set_params(self.initial)
        trainer.reset_optimizer()
        try:
            trainer.train_steps(self.config.inner.steps)
            signature.observe(self.initial, trainer.get_params())
        finally:
            trainer.set_params(saved_params)
            trainer.load_state_dict(saved_local)

    @property
    def adapter_name(self) -> str:
        """What this peer's group adapter is called: `global`, or `cluster-<id>` once assigned."""
        return adapter_name(self.member.cluster if self.member is not None else -1)

    def report(self, report: RoundReport) -> None:
        """Progress line, metrics file, and the numbers status shows."""
        log.info(progress_line(report, self.config.inner.steps))
        self.threads.adjust()  # other volunteers on this machine may have come or gone
        if self.gate is not None:
            expires = read_ticket(self.options.ticket).expires
            warning = ticket_warning(expires, time.time())
            if warning is not None and (time.time() >= expires or not self.warned_expiry):
                log.warning(warning)  # once before it expires, every round after
                self.warned_expiry = True
        self.shelf.note_group(report.group_size)
        with open(self.options.workdir / "metrics.jsonl", "a") as handle:
            refused = self.transport.refused_joins  # join requests our averagers turned away
            line = {**asdict(report), "refused": refused, "time": time.time()}  # time: the end
            line.pop("contributions")  # (the round certificate keeps them)
            handle.write(json.dumps(line) + "\n")
        if self.scalars is not None:  # step = the round the group state reached
            self.scalars.write(report.round + 1, round_scalars(report))
        for total in self.totals:
            self.totals[total] += getattr(report, total)
        self.node.records.update_record(
            store=False,  # stored with the announcement that follows every report
            loss=report.loss_mean,
            eval_loss=report.eval_loss,
            eval_exact=report.eval_exact,
            group_size=report.group_size,
            **self.totals,
            fallbacks=report.fallbacks,
            rejections=report.rejections,
            exclusions=report.exclusions,
            resyncs=report.resyncs,
            unproven=report.unproven,
            banned=report.banned,
            refused=self.transport.refused_joins,
            inner_s=report.inner_s,
            matchmaking_s=report.matchmaking_s,
            transfer_s=report.transfer_s,
            wall_s=report.wall_s,
            outcome=report.outcome,
            tau=report.tau or 0,
        )

    def run(self) -> GroupState:
        """Rounds until --rounds or a signal; returns the final group state."""
        settle = self.config.averaging.matchmaking_time * 2
        if self.member is not None:
            self.member.prepare()
        state = self.peer.run(self.options.rounds, settle_s=settle)
        if not self.peer.stop.is_set():
            self.hand_off(state.round, timeout=HANDOFF_TIMEOUT)
        return state

    def hand_off(self, round_: int, timeout: float) -> bool:
        """Before leaving, wait (bounded) until the coordinator serves our final adapter."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.peer.stop.is_set():
            for record in self.node.records.peers().values():
                offer = record.adapters.get(self.adapter_name)
                if record.role == "coordinator" and offer is not None and offer.round >= round_:
                    log.info("the coordinator now serves the round %d adapter", round_)
                    return True
            time.sleep(0.5)
        log.warning("no coordinator took over the round %d adapter within %.0fs", round_, timeout)
        return False

    def close(self) -> None:
        """Stop the averager and the event log (the node is closed by the caller)."""
        self.transport.close()
        if self.scalars is not None:
            self.scalars.close()


def make_averager(
    node: SwarmNode,
    config: RunConfig,
    template: dict[str, torch.Tensor],
    gate: Gate | None,
    prefix: str,
) -> GroupAverager:
    """An averager for one group prefix (the run-wide group, or a cluster's)."""
    averaging = config.averaging
    return GroupAverager(
        node.dht,
        node.routes,
        prefix,
        template,
        codec=averaging.codec,
        matchmaking_time=averaging.matchmaking_time,
        allreduce_timeout=averaging.allreduce_timeout,
        min_group_size=averaging.min_group_size,
        gate=gate,
    )


def join(options: JoinOptions) -> int:
    """Entry point of `swarmtune join`; returns the exit code."""
    own = load_config(options.expect_config) if options.expect_config else None
    examples = load_examples(options.data)  # unreadable data fails here, before any network
    check_local_base(options.model, options.quantize)  # and so does a wrong --model dir
    resolve_device(options.device)  # and a --device this machine does not have
    options.workdir.mkdir(parents=True, exist_ok=True)
    node = SwarmNode(
        initial_peers=options.initial_peers,
        workdir=options.workdir,
        host=options.host,
        port=options.port,
        announce=options.announce,
        reach=options.reachability,
        relay_service=options.serve_relay,
    )
    volunteer = None
    stop = threading.Event()
    try:
        manifest = node.fetch_manifest(options.initial_peers[0])
        node.records.set_run(manifest.run_id, manifest.coordinator)
        policy = parse_config(manifest.config).admission.policy
        if policy == "address" and not options.ticket:  # the coordinator prices identities
            options = dataclasses.replace(options, ticket=node.ask_ticket(manifest.coordinator))
        gate = admission_gate(manifest, node.peer_id, options.ticket)
        log.info("joined run %s as %s", manifest.run_id, node.peer_id)
        config = parse_config(manifest.config)
        if config.averaging.direct_tcp:
            node.enable_direct()
        seed = int(hashlib.sha256(node.peer_id.encode()).hexdigest()[:8], 16)
        local = build_local_model(
            config,
            options.data,
            model_path=options.model,
            target_modules=manifest.target_modules,
            data_seed=seed,
            quantize=options.quantize,
            stop=stop,
            device=options.device,
            precision=options.precision,
            loss=options.loss,
            packed=options.packing,
            examples=examples,  # read once
        )
        if local.summary is not None:
            log.info(local.summary.line())
        log.info("the first example, as the model reads it:\n%s", local.first_example)
        check_compatible(manifest, local, own)
        node.blobs.publish("manifest", manifest.model_dump_json().encode())
        volunteer = Volunteer(node, manifest, local, options, stop, gate)
        stop_on_signals(volunteer.peer)
        state = volunteer.run()
        log.info("done at round %d; adapter digest %s", state.round, state.digest()[:12])
        return 0
    finally:
        if volunteer is not None:
            volunteer.close()
        node.shutdown()


def stop_on_signals(peer: Peer) -> None:
    """First SIGINT/SIGTERM abandons the round in progress and leaves cleanly."""

    def handle(signum: int, _frame: object) -> None:
        log.info("%s: leaving after abandoning the current round", signal.Signals(signum).name)
        peer.stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    default_hook = threading.excepthook

    def quiet_after_stop(args: threading.ExceptHookArgs) -> None:
        # A terminal's Ctrl+C also reaches hivemind's p2pd (same process group), which can die
        # before the averager thread unregisters its handlers; that thread's failure is noise.
        if peer.stop.is_set():
            log.debug("thread %s ended during shutdown: %r", args.thread, args.exc_value)
            return
        default_hook(args)

    threading.excepthook = quiet_after_stop
